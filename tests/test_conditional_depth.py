"""Conditional depth: ACT / PonderNet halting, gated skipping and mixture-of-depths, against hand
computations and the plain backbone, with compaction and compute accounting checked."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dynamoe.compute.flops import transformer_block_flops
from dynamoe.config import ConfigError, ModelConfig, from_dict
from dynamoe.depth import depth_summary
from dynamoe.depth import halting as H
from dynamoe.exits.multi_exit import infer
from dynamoe.models import build_model
from dynamoe.stage import StageState

from tiny_models import BLOCKS, small

torch.set_num_threads(1)


def lm_cfg(block: str = "gpt2", **depth) -> ModelConfig:
    return from_dict(ModelConfig, {**small(block), "kind": "decoder", "depth": depth})


def enc_cfg(block: str = "gpt2", **depth) -> ModelConfig:
    return from_dict(ModelConfig, {**small(block), "kind": "encoder", "num_classes": 3, "depth": depth})


def cnn_cfg(exits=(), **depth) -> ModelConfig:
    return from_dict(
        ModelConfig,
        {
            "kind": "cnn",
            "num_classes": 10,
            "exits": {"layers": list(exits)},
            "cnn": {"in_channels": 1, "image_size": 8, "moe_every": 2, "blocks_per_stage": 3},
            "depth": depth,
        },
    )


def with_weights_of(cfg: ModelConfig, model: torch.nn.Module) -> torch.nn.Module:
    """A model of ``cfg`` holding ``model``'s weights (depth units excepted)."""
    other = build_model(cfg)
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return other


def randomise_halting(units, seed: int, scale: float = 1.0) -> None:
    """Halting probabilities that differ from row to row, so some rows halt early and some late."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in units:
            unit.linear.weight.copy_(torch.randn(unit.linear.weight.shape, generator=g) * scale)
            unit.linear.bias.fill_(-0.5)


# --- ACT -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
def test_act_halts_every_token_and_outputs_the_hand_computed_weighted_sum(block):
    torch.manual_seed(0)
    model = build_model(lm_cfg(block, mode="act", halt_threshold=0.9)).eval()
    randomise_halting(model.depth.halting, 1, scale=40.0)
    ids = torch.randint(0, 40, (3, 11))
    with torch.no_grad():
        out = model(ids, labels=ids)
        # By hand: plain blocks on every token, halted tokens frozen, Graves' halting rule per token.
        L, thr = len(model.blocks), 0.9
        x = model._embed(ids)
        B, S, D = x.shape
        running = torch.ones(B, S, dtype=torch.bool)
        cum, acc = torch.zeros(B, S), torch.zeros(B, S, D)
        steps, rem = torch.zeros(B, S), torch.zeros(B, S)
        ran = []
        for i, layer in enumerate(model.blocks):
            ran.append(int(running.sum()))
            y, _ = layer(x)
            x = torch.where(running[..., None], y, x)
            for b in range(B):
                for t in range(S):
                    if not running[b, t]:
                        continue
                    steps[b, t] += 1
                    h = 1.0 if i == L - 1 else float(torch.sigmoid(model.depth.halting[i].linear(x[b, t])))
                    if i == L - 1 or float(cum[b, t]) + h >= thr:
                        p = 1.0 - float(cum[b, t])
                        rem[b, t] = p
                        running[b, t] = False
                    else:
                        p = h
                        cum[b, t] += h
                    acc[b, t] += p * x[b, t]
        want = model.head(model.ln_f(acc))
    assert not running.any()  # every token halted, by the last layer at the latest
    assert (steps < L).any() and (steps == L).any() and (steps >= 1).all()
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert out.depth[-1].stats["ponder"].item() == pytest.approx(float((steps + rem).mean()), rel=1e-5)
    # Reported compute: each layer counts the tokens still running, and its FLOPs follow.
    assert [int(r.executed) for r in out.depth] == ran
    assert ran[-1] < B * S and ran[0] == B * S


@pytest.mark.parametrize("block", BLOCKS)
def test_act_weights_sum_to_one_and_the_ponder_cost_has_a_gradient(block):
    torch.manual_seed(1)
    model = build_model(lm_cfg(block, mode="act", ponder_cost=1.0))
    ids = torch.randint(0, 40, (2, 9))
    out = model(ids, labels=ids)
    assert out.depth_loss is not None
    out.depth_loss.backward()
    assert any(u.linear.bias.grad.abs().item() > 0 for u in model.depth.halting)
    st = H.act_start((4,), (4, 1), torch.ones(4, dtype=torch.bool), torch.float32, "cpu")
    for h in (torch.tensor([0.3, 0.995, 0.5, 0.1]), torch.tensor([0.3, 0.9, 0.6, 0.1]), None):
        st = H.act_update(st, torch.ones(4, 1), h, 0.99)
    # acc of a constant state 1 is the sum of the weights; N + R: 1 + 1 (halts at once), 3 + 0.4, ...
    torch.testing.assert_close(st.acc.squeeze(1), torch.ones(4))
    torch.testing.assert_close(H.ponder_cost(st), torch.tensor([3 + 0.4, 1 + 1.0, 2 + 0.5, 3 + 0.8]))


@pytest.mark.parametrize("block", BLOCKS)
def test_act_in_the_encoder_with_padding_and_early_exits_compacts_like_the_full_pass(block):
    torch.manual_seed(2)
    cfg = from_dict(
        ModelConfig,
        {
            **small(block),
            "kind": "encoder",
            "num_classes": 3,
            "exits": {"layers": [1, 2]},
            "depth": {"mode": "act", "halt_threshold": 0.9},
        },
    )
    model = build_model(cfg).eval()
    randomise_halting(model.depth.halting, 3, scale=40.0)
    ids = torch.randint(0, 40, (6, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        heads, _ = model.forward_heads(batch)
    from dynamoe.exits.heads import all_exit_scores, first_exit

    scores = all_exit_scores("max_prob", heads)
    thresholds = scores[:, :-1].median(0).values.tolist()
    got = infer(model, batch, "max_prob", thresholds)
    assert got.exit_index.tolist() == first_exit(scores, thresholds).tolist()


@pytest.mark.parametrize("block", BLOCKS)
def test_pondernet_distribution_loss_and_inference_halting(block):
    h = [torch.tensor([0.5, 0.1]), torch.tensor([0.5, 0.2])]
    p = H.halting_distribution(h)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.1], [0.25, 0.18], [0.25, 0.72]]))
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    task, kl = H.pondernet_loss(p, losses, None, 0.5, 1.0)
    prior = torch.tensor([4 / 7, 2 / 7, 1 / 7])
    want_kl = (p * (p.log() - prior.log()[:, None])).sum(0).mean()
    assert task.item() == pytest.approx(float((p * losses).sum(0).mean()))
    assert kl.item() == pytest.approx(want_kl.item(), rel=1e-5)
    # Inference halts where the CDF first reaches the quantile: 0.5 at step 1, 0.1+0.18 < 0.5 -> step 3.
    st = H.pondernet_start((2,), torch.ones(2, dtype=torch.bool), "cpu")
    for hh in h + [None]:
        st = H.pondernet_update(st, hh, 0.5)
    assert st.steps.tolist() == [1.0, 3.0]
    torch.manual_seed(3)
    model = build_model(lm_cfg(block, mode="pondernet"))
    ids = torch.randint(0, 40, (2, 8))
    out = model(ids, labels=ids)
    out.total_loss.backward()
    assert out.depth_loss.item() > 0 and model.depth.halting[0].linear.bias.grad.abs().item() > 0


# --- skipping ------------------------------------------------------------------------------------


def force_gates(gates, open_: bool) -> None:
    with torch.no_grad():
        for gate in gates:
            gate.out.weight.zero_()
            gate.out.bias.copy_(torch.tensor([-50.0, 50.0] if open_ else [50.0, -50.0]))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_encoder_gates_forced_open_are_the_plain_backbone_and_closed_the_identity(block, train):
    torch.manual_seed(4)
    model = build_model(enc_cfg(block, mode="skip"))
    plain = with_weights_of(enc_cfg(block), model)
    model.train(train), plain.train(train)
    ids = torch.randint(0, 40, (4, 9))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    force_gates(model.depth.gates, True)
    with torch.no_grad():
        out, want = model(ids, mask), plain(ids, mask)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    gate_flops = sum(g.flops(4) for g in model.depth.gates)
    assert depth_summary(out.depth)["flops"] == depth_summary(want.depth)["flops"] + gate_flops
    force_gates(model.depth.gates, False)
    with torch.no_grad():
        out = model(ids, mask)
        identity = model.classifier(model._pool(model.ln_f(model._embed(ids)), mask))
    torch.testing.assert_close(out.logits, identity, rtol=0, atol=0)
    assert depth_summary(out.depth)["flops"] == gate_flops
    assert bool(out.moe) == train  # inference skips the blocks outright; training runs them for the gradient


def test_cnn_gates_forced_open_and_closed_and_compaction_equals_the_mixed_pass():
    torch.manual_seed(5)
    model = build_model(cnn_cfg(mode="skip")).eval()
    plain = with_weights_of(cnn_cfg(), model).eval()
    x = torch.randn(12, 1, 8, 8)
    force_gates(model.depth.gates.values(), True)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=0)
    force_gates(model.depth.gates.values(), False)
    with torch.no_grad():
        state = StageState(x)
        for i in range(model.num_stages):  # the plain network without the gated blocks
            if str(i) not in model.depth.gates:
                state, _ = plain.run_stage(i, state)
        want = plain.run_head(0, state).logits
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=0)
    # Random gates: compacted inference takes the same decisions and outputs as running every sample.
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for gate in model.depth.gates.values():
            gate.out.weight.copy_(torch.randn(gate.out.weight.shape, generator=g) * 3)
            gate.out.bias.zero_()
    dense = copy.deepcopy(model)
    dense.depth.compaction = False
    with torch.no_grad():
        got, ref = model(x), dense(x)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    executed = [int(r.executed) for r in got.depth if r.kind == "skip"]
    assert executed == [int(r.executed) for r in ref.depth if r.kind == "skip"]
    assert 0 < sum(executed) < 12 * len(executed)
    # Reported compute: the gated blocks on the executing samples only, plus gates; infer agrees.
    result = infer(model, {"pixel_values": x})
    assert result.flops == pytest.approx(
        depth_summary(got.depth)["flops"] + model.head_flops(0, StageState(torch.zeros(12)))
    )
    assert result.predictions.tolist() == got.logits.argmax(-1).tolist()


def test_skip_rate_loss_pulls_toward_the_target():
    torch.manual_seed(7)
    model = build_model(enc_cfg(mode="skip", target_rate=0.25, rate_loss_coef=1.0)).train()
    ids = torch.randint(0, 40, (8, 6))
    out = model(ids)
    rates = torch.stack([r.rate.detach() for r in out.depth])
    assert out.depth_loss.detach().item() == pytest.approx(float(((rates - 0.25) ** 2).mean()), rel=1e-6)
    out.depth_loss.backward()  # gates start open (rate 1 > 0.25): the loss lowers their "execute" logit
    assert all(g.out.bias.grad[1] > 0 for g in model.depth.gates)


# --- mixture-of-depths ---------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_mod_at_full_capacity_is_the_plain_backbone(block, train):
    torch.manual_seed(8)
    model = build_model(lm_cfg(block, mode="mod", capacity=1.0, mod_every=1, router_weight="straight_through"))
    plain = with_weights_of(lm_cfg(block), model)
    model.train(train), plain.train(train)
    ids = torch.randint(0, 40, (3, 13))
    out, want = model(ids, labels=ids), plain(ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    assert out.loss.item() == want.loss.item()
    # The straight-through weight is exactly 1 forward but trains the router.
    out.total_loss.backward()
    assert all(r.score.weight.grad.abs().sum() > 0 for r in model.depth.routers.values())


@pytest.mark.parametrize("block", BLOCKS)
def test_mod_routes_the_top_c_tokens_through_the_block_by_hand(block):
    torch.manual_seed(9)
    model = build_model(lm_cfg(block, mode="mod", capacity=0.5, mod_every=2)).eval()
    ids = torch.randint(0, 40, (2, 10))
    C = 5
    with torch.no_grad():
        out = model(ids)
        x = model._embed(ids)
        for i, layer in enumerate(model.blocks):
            if str(i) not in model.depth.routers:
                x, _ = layer(x)
                continue
            r = model.depth.routers[str(i)].score(x).squeeze(-1)
            for b in range(2):
                sel = sorted(r[b].topk(C).indices.tolist())
                # The selected tokens alone, in order, causal, at their own positions (rotary attention).
                y, _ = layer(x[b : b + 1, sel], positions=torch.tensor([sel]))
                w = torch.sigmoid(r[b, sel])[:, None]
                x[b, sel] = x[b, sel] + w * (y[0] - x[b, sel])
        want = model.head(model.ln_f(x))
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    # Reported compute: C tokens per sequence through each routed layer; its MoE saw exactly those.
    routed = [r for r in out.depth if r.kind == "mod" and "mod_router" in r.flops]
    assert [int(r.executed) for r in routed] == [2 * C] * 2
    assert [a.num_tokens for a in out.moe] == [2 * C] * 2
    want_flops = transformer_block_flops(model.cfg, True, 2 * C, 2 * C * C)
    assert {k: routed[0].flops[k] for k in want_flops} == want_flops


@pytest.mark.parametrize("block", BLOCKS)
def test_mod_causal_rule_does_not_read_future_tokens_and_reports_agreement(block):
    torch.manual_seed(10)
    model = build_model(lm_cfg(block, mode="mod", capacity=0.5)).eval()
    ids = torch.randint(0, 40, (3, 12))
    with torch.no_grad():  # predictors that route about half of the tokens: split at their median
        for router in model.depth.routers.values():  # layer order: a router reads earlier layers only
            router.predictor[2].weight.normal_(0, 1.0)
            seen = []
            hook = router.predictor.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
            model(ids, mod_rule="causal")
            hook.remove()
            router.predictor[2].bias.sub_(seen[-1].median())
    changed = ids.clone()
    changed[:, 8:] = torch.randint(0, 40, (3, 4))
    with torch.no_grad():
        a, b = model(ids, mod_rule="causal"), model(changed, mod_rule="causal")
    torch.testing.assert_close(a.logits[:, :8], b.logits[:, :8], rtol=1e-5, atol=1e-5)
    routed = [r for r in a.depth if "routed_fraction" in r.stats]
    assert all(0 < r.stats["routed_fraction"] < 1 for r in routed)
    assert all(0 <= r.stats["predictor_agreement"] <= 1 for r in routed)
    # Compute follows the tokens the predictor routed.
    assert [int(r.executed) for r in routed] == [round(float(r.stats["routed_fraction"]) * 36) for r in routed]


@pytest.mark.parametrize("block", BLOCKS)
def test_mod_encoder_with_padding_and_training_loss(block):
    torch.manual_seed(11)
    model = build_model(enc_cfg(block, mode="mod", capacity=0.5, mod_every=1))
    ids = torch.randint(0, 40, (4, 8))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    out = model(ids, mask, labels=torch.tensor([0, 1, 2, 0]))
    out.total_loss.backward()
    assert out.depth_loss is None  # an encoder routes by top-C at inference too: no predictor
    assert all(r.score.weight.grad.abs().sum() > 0 for r in model.depth.routers.values())
    model.eval()
    state = model.begin({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        flops = model.stage_flops(0, state)
        _, records = model.run_stage(0, state)
    assert flops == pytest.approx(records.depth.total_flops)


# --- CNN halting ---------------------------------------------------------------------------------


def test_cnn_act_compaction_equals_the_hand_computed_stagewise_act():
    torch.manual_seed(12)
    model = build_model(cnn_cfg(exits=[1, 2], mode="act", halt_threshold=0.8)).eval()
    randomise_halting(model.depth.halting.values(), 13)
    x = torch.randn(10, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
        h = model.stem(x)
        executed = []
        per = model.cfg.cnn.blocks_per_stage
        for s in range(3):  # every block on every sample, then Graves' weights per sample
            states, hs = [], []
            for b in range(per):
                i = s * per + b
                h, _ = model.run_unit(i, h if not states else states[-1])
                states.append(h)
                if str(i) in model.depth.halting:
                    hs.append(model.depth.halting[str(i)](h.mean(dim=(2, 3))))
            acc = torch.zeros_like(states[0])
            for n in range(10):
                cum, steps = 0.0, 0
                for b in range(per):
                    steps += 1
                    hb = 1.0 if b == per - 1 else float(hs[b][n])
                    if b == per - 1 or cum + hb >= 0.8:
                        acc[n] += (1 - cum) * states[b][n]
                        break
                    acc[n] += hb * states[b][n]
                    cum += hb
                executed.append(steps)
            h = acc
        want = model.head(h.mean(dim=(2, 3))).logits
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    steps = torch.tensor(executed).view(3, 10)
    assert (steps < per).any()
    got = [int(r.executed) for r in out.depth]
    assert got == [int((steps[s] > b).sum()) for s in range(3) for b in range(per)]
    # Batched early-exit inference with compaction takes the same exits as the full pass.
    from dynamoe.exits.heads import all_exit_scores, first_exit

    scores = all_exit_scores("max_prob", out.exits)
    thresholds = scores[:, :-1].median(0).values.tolist()
    assert (
        infer(model, {"pixel_values": x}, "max_prob", thresholds).exit_index.tolist()
        == first_exit(scores, thresholds).tolist()
    )


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, match",
    [
        ({"kind": "decoder", "depth": {"mode": "mod", "capacity": 0}}, r"model.depth.capacity: must be in \(0, 1\]"),
        ({"kind": "decoder", "depth": {"mode": "mod", "capacity": 1.5}}, r"model.depth.capacity"),
        (
            {"kind": "encoder", "depth": {"mode": "skip", "target_rate": 0}},
            r"model.depth.target_rate: must be in \(0, 1\]",
        ),
        (
            {"kind": "decoder", "depth": {"mode": "skip"}},
            r"model.depth.mode: 'skip' is not supported with kind 'decoder'.*use mod",
        ),
        ({"kind": "encoder", "depth": {"mode": "pondernet"}}, r"'pondernet' is not supported with kind 'encoder'"),
        ({"kind": "cnn", "depth": {"mode": "mod"}}, r"'mod' is not supported with kind 'cnn'"),
        ({"kind": "decoder", "exits": {"layers": [1]}, "depth": {"mode": "pondernet"}}, r"remove model.exits.layers"),
        ({"kind": "decoder", "depth": {"mode": "act", "halt_threshold": 0}}, r"model.depth.halt_threshold"),
        ({"kind": "decoder", "depth": {"mode": "pondernet", "lambda_p": 1.0}}, r"model.depth.lambda_p"),
        ({"kind": "encoder", "depth": {"mode": "skip", "gumbel_temperature_min": 2.0}}, r"anneal downwards"),
        ({"kind": "decoder", "n_layers": 2, "depth": {"mode": "mod", "mod_every": 3}}, r"model.depth.mod_every"),
        ({"kind": "decoder", "depth": {"mode": "halting"}}, r"model.depth.mode: 'halting' is not allowed"),
    ],
)
def test_depth_config_errors(model, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, model, "model")


def test_a_cnn_with_nothing_to_skip_is_refused():
    cfg = from_dict(
        ModelConfig,
        {
            "kind": "cnn",
            "num_classes": 10,
            "cnn": {"in_channels": 1, "image_size": 8, "blocks_per_stage": 1},
            "depth": {"mode": "skip"},
        },
    )
    with pytest.raises(ValueError, match="blocks_per_stage to 2"):
        build_model(cfg)


@pytest.mark.parametrize("block", BLOCKS)
def test_mode_none_adds_no_parameters(block):
    torch.manual_seed(0)
    a = build_model(lm_cfg(block))
    assert a.depth is None and not any("depth" in k for k in a.state_dict())
    assert math.isclose(
        sum(r.total_flops for r in a(torch.randint(0, 40, (2, 5))).depth), sum(a.layer_flops(i, 2, 5) for i in range(4))
    )


# --- the results script, end to end --------------------------------------------------------------


def test_conditional_depth_eval_quick(tmp_path):
    import json

    from dynamoe.evals.conditional_depth import main

    result = main(
        ["--quick", "--threads", "1", "--json", str(tmp_path / "r.json"), "--out-dir", str(tmp_path / "runs")]
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["hardware"]["cpu_count"] and [r["name"] for r in saved["lm"]] == ["dense", "mod_50", "act"]
    dense, mod, act = result["lm"]
    # Equal training FLOPs: the cheaper models train proportionally more steps.
    assert mod["steps"] > dense["steps"] and 0.85 < mod["train_flops_vs_dense"] < 1.15
    assert 0.5 < act["train_flops_vs_dense"] < 1.15
    assert dense["val_compute_fraction"] == 1.0 and mod["val_compute_fraction"] < 0.8
    assert 0 <= mod["causal_agreement_with_top_c"] <= 1 and all(math.isfinite(r["val_loss"]) for r in result["lm"])
    (cnn,) = result["cnn"]
    assert 0 < cnn["blocks_executed"] <= 1 and 0 <= cnn["accuracy"] <= 1
