"""Early exits: heads and losses, policies on hand-made logits, compaction against the full pass,
calibration against brute force, and the Hugging Face wrapper against the unwrapped encoder."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dynamoe.config import ConfigError, ExitConfig, ModelConfig, from_dict
from dynamoe.exits.calibration import ExitRecord, calibrate, evaluate_thresholds, record_exits
from dynamoe.exits.heads import HeadOutput, PolicyState, all_exit_scores, exit_loss, exit_score, first_exit
from dynamoe.exits.multi_exit import infer, infer_full
from dynamoe.models import build_model


def encoder_cfg(**exits) -> ModelConfig:
    return from_dict(
        ModelConfig,
        {
            "kind": "encoder",
            "vocab_size": 60,
            "num_classes": 3,
            "d_model": 32,
            "n_layers": 4,
            "n_heads": 4,
            "d_ff": 64,
            "moe_every": 2,
            "moe": {"num_experts": 4, "d_expert": 32, "router": {"top_k": 2}},
            "exits": exits,
        },
    )


def cnn_cfg(**exits) -> ModelConfig:
    return from_dict(
        ModelConfig,
        {
            "kind": "cnn",
            "num_classes": 10,
            "cnn": {"in_channels": 1, "image_size": 8, "moe_every": 2},
            "moe": {"num_experts": 4, "d_expert": 16},
            "exits": {"head_hidden": 0, **exits},
        },
    )


def text_batch(B=12, S=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        mask[b, 3 + b % (S - 3) :] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- exits on or off ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["encoder", "cnn", "decoder"])
def test_final_output_is_the_plain_backbone(kind):
    """Adding exit heads changes nothing on the final head: same weights, same logits."""
    if kind == "encoder":
        plain_cfg, exit_cfg = encoder_cfg(), encoder_cfg(layers=[1, 2, 3])
        inputs = text_batch()
    elif kind == "cnn":
        plain_cfg, exit_cfg = cnn_cfg(), cnn_cfg(layers=[1, 2])
        inputs = {"pixel_values": torch.randn(6, 1, 8, 8)}
    else:
        base = {
            "kind": "decoder",
            "vocab_size": 60,
            "d_model": 32,
            "n_layers": 3,
            "n_heads": 4,
            "moe_every": 2,
            "moe": {"num_experts": 4, "d_expert": 32},
        }
        plain_cfg = from_dict(ModelConfig, base)
        exit_cfg = from_dict(ModelConfig, {**base, "exits": {"layers": [1, 2]}})
        inputs = {"input_ids": torch.randint(0, 60, (3, 9))}
    torch.manual_seed(0)
    plain = build_model(plain_cfg).eval()
    with_exits = build_model(exit_cfg).eval()
    missing, unexpected = with_exits.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("exit" in k for k in missing)
    with torch.no_grad():
        ref = plain(**inputs)
        out = with_exits(**inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert len(out.exits) == len(exit_cfg.exits.layers) + 1
    assert not ref.exits or len(ref.exits) == 1


def test_exits_disabled_is_the_plain_loss():
    torch.manual_seed(0)
    model = build_model(encoder_cfg())
    batch = text_batch()
    labels = torch.randint(0, 3, (12,))
    out = model(**batch, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


# --- losses -------------------------------------------------------------------------------------


def _heads(seed=0, n=3, B=5, C=4):
    g = torch.Generator().manual_seed(seed)
    return [
        HeadOutput(torch.randn(B, C, generator=g, requires_grad=True), torch.randn(B, generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize(
    "weighting,weights,expected",
    [("uniform", None, [1, 1, 1]), ("linear", None, [1, 2, 3]), ("custom", [0.5, 0.0, 2.0], [0.5, 0.0, 2.0])],
)
def test_weighted_joint_loss(weighting, weights, expected):
    cfg = ExitConfig(layers=[1, 2], weighting=weighting, weights=weights)
    heads = _heads()
    labels = torch.tensor([0, 1, 2, 3, 0])
    total, per_exit = exit_loss(cfg, heads, labels)
    ces = [F.cross_entropy(h.logits, labels) for h in heads]
    want = sum(w * c for w, c in zip(expected, ces)) / sum(expected)
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(torch.stack(per_exit), torch.stack(ces).detach())


def test_two_stage_phases_use_their_heads_only():
    cfg = ExitConfig(layers=[1, 2], training="two_stage")
    heads = _heads()
    labels = torch.tensor([0, 1, 2, 3, 0])
    backbone, _ = exit_loss(cfg, heads, labels, phase="backbone")
    torch.testing.assert_close(backbone, F.cross_entropy(heads[-1].logits, labels))
    exits, _ = exit_loss(cfg, heads, labels, phase="exits")
    torch.testing.assert_close(
        exits, (F.cross_entropy(heads[0].logits, labels) + F.cross_entropy(heads[1].logits, labels)) / 2
    )


def test_self_distillation_term():
    cfg = ExitConfig(layers=[1], training="distill", distill_temperature=2.0, distill_alpha=0.25)
    heads = _heads(n=2)
    labels = torch.tensor([0, 1, 2, 3, 0])
    total, _ = exit_loss(cfg, heads, labels)
    T = 2.0
    teacher = F.softmax(heads[1].logits.detach() / T, -1)
    kl = F.kl_div(F.log_softmax(heads[0].logits / T, -1), teacher, reduction="batchmean")
    first = 0.75 * F.cross_entropy(heads[0].logits, labels) + 0.25 * T * T * kl
    torch.testing.assert_close(total, (first + F.cross_entropy(heads[1].logits, labels)) / 2)
    total.backward()
    assert heads[1].logits.grad is not None  # the teacher still learns from its own label loss


def test_learned_policy_trains_predictors_on_correctness():
    cfg = ExitConfig(layers=[1], policy="learned", predictor_loss_coef=1.0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    pred = torch.tensor([0.3, -0.2], requires_grad=True)
    heads = [HeadOutput(logits, pred), HeadOutput(logits.clone(), None)]
    labels = torch.tensor([0, 0])  # exit 0 is right on row 0, wrong on row 1
    total, per_exit = exit_loss(cfg, heads, labels)
    bce = F.binary_cross_entropy_with_logits(pred, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(total, (per_exit[0] + per_exit[1]) / 2 + bce)


# --- policies on hand-made logits ----------------------------------------------------------------


def test_policies_on_hand_made_logits():
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    head = HeadOutput(probs.log(), torch.tensor([0.0, 2.0, -2.0]))
    s, _ = exit_score("max_prob", head, PolicyState())
    torch.testing.assert_close(s, torch.tensor([0.7, 1 / 3, 0.5]))
    s, _ = exit_score("margin", head, PolicyState())
    torch.testing.assert_close(s, torch.tensor([0.5, 0.0, 0.0]), atol=1e-6, rtol=0)
    s, _ = exit_score("entropy", head, PolicyState())
    h0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    torch.testing.assert_close(
        s, torch.tensor([1 - h0 / math.log(3), 0.0, 1 - math.log(2) / math.log(3)]), atol=1e-5, rtol=0
    )
    s, _ = exit_score("learned", head, PolicyState())
    torch.testing.assert_close(s, torch.sigmoid(torch.tensor([0.0, 2.0, -2.0])))


def test_patience_counts_consecutive_agreeing_exits():
    # Predictions per exit for 3 samples: [0, 0, 0], [1, 0, 0], [2, 2, 1]
    preds = [[0, 1, 2], [0, 0, 2], [0, 0, 1]]
    heads = [HeadOutput(F.one_hot(torch.tensor(p), 3).float() * 5) for p in preds]
    scores = all_exit_scores("patience", heads)
    assert scores.tolist() == [[0, 1, 2], [0, 0, 1], [0, 1, 0]]
    # Patience 2 (PABEE): sample 0 leaves at the third exit; the others reach the final head.
    assert first_exit(torch.cat([scores, scores[:, -1:]], 1), [2, 2, 2]).tolist() == [2, 3, 3]


def test_first_exit_takes_the_first_passing_exit():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.95, 0.0], [0.1, 0.2, 0.0], [0.95, 0.95, 0.0]])
    assert first_exit(scores, [0.8, 0.9]).tolist() == [0, 1, 2, 0]
    assert first_exit(scores, [math.inf, math.inf]).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="thresholds"):
        first_exit(scores, [0.5])


# --- compaction ---------------------------------------------------------------------------------


def _check_compaction(model, batch, policy, thresholds):
    with torch.no_grad():
        heads, _ = model.forward_heads(batch)
    scores = all_exit_scores(policy, heads)
    want_exit = first_exit(scores, thresholds)
    logits = torch.stack([h.logits for h in heads], 1)
    want_pred = logits.argmax(-1)[torch.arange(want_exit.numel()), want_exit]
    got = infer(model, batch, policy, thresholds)
    assert got.exit_index.tolist() == want_exit.tolist()
    assert got.predictions.tolist() == want_pred.tolist()
    return got, want_exit


@pytest.mark.parametrize("policy", ["max_prob", "entropy", "margin", "patience"])
def test_compaction_equals_the_full_pass_encoder(policy):
    torch.manual_seed(1)
    model = build_model(encoder_cfg(layers=[1, 2, 3])).eval()
    batch = text_batch(B=16)
    with torch.no_grad():
        scores = all_exit_scores(policy, model.forward_heads(batch)[0])
    # Thresholds at the median score of each exit: some samples leave at every exit.
    thresholds = [1.0] * 3 if policy == "patience" else scores[:, :-1].median(0).values.tolist()
    got, want = _check_compaction(model, batch, policy, thresholds)
    assert len(set(want.tolist())) > 1, "the case should exercise several exits"
    full = infer_full(model, batch)
    assert got.flops < full


def test_compaction_equals_the_full_pass_cnn_with_moe():
    torch.manual_seed(2)
    model = build_model(cnn_cfg(layers=[1, 2])).eval()
    batch = {"pixel_values": torch.randn(20, 1, 8, 8)}
    with torch.no_grad():
        scores = all_exit_scores("max_prob", model.forward_heads(batch)[0])
    _check_compaction(model, batch, "max_prob", scores[:, :-1].median(0).values.tolist())


def test_compaction_counts_flops_of_the_rows_present():
    torch.manual_seed(3)
    model = build_model(encoder_cfg(layers=[1, 2, 3])).eval()
    batch = text_batch(B=8)
    S = batch["input_ids"].shape[1]
    everyone_leaves = infer(model, batch, "max_prob", [0.0, 0.0, 0.0])
    assert everyone_leaves.exit_index.tolist() == [0] * 8
    want = model.layer_flops(0, 8, S) + 8 * model.exit_heads[0].flops()
    assert everyone_leaves.flops == want
    nobody_leaves = infer(model, batch, "max_prob", [math.inf] * 3)
    assert nobody_leaves.exit_index.tolist() == [3] * 8
    assert nobody_leaves.flops == model.full_flops(batch)


# --- calibration --------------------------------------------------------------------------------


def synthetic_record(n=400, J=4, seed=0) -> ExitRecord:
    """Later exits are more often right; confidence correlates with being right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    logits = torch.zeros(n, J, 2)
    for j in range(J):
        right = torch.rand(n, generator=g) < 0.6 + 0.1 * j
        conf = torch.rand(n, generator=g) * 2 + right.float() * 1.5
        pred = torch.where(right, labels, 1 - labels)
        logits[torch.arange(n), j, pred] = conf
    layers = torch.arange(1, J + 1).repeat(n, 1)
    flops = layers.double() * 10 + torch.arange(1, J + 1).double()  # 10 per layer, 1 per head so far
    return ExitRecord(logits, None, labels, layers, flops, torch.full((n,), 10.0 * J + 1), J)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("unit", ["layers", "flops"])
@pytest.mark.parametrize("per_exit", [False, True])
def test_calibration_respects_the_budget_and_beats_every_shared_threshold(budget, unit, per_exit):
    rec = synthetic_record()
    result = calibrate(rec, "max_prob", budget, unit, per_exit=per_exit)
    check = evaluate_thresholds(rec, "max_prob", result.thresholds, unit)
    assert check.cost <= budget + 1e-9
    assert check.accuracy == pytest.approx(result.accuracy)
    scores = rec.scores("max_prob")[:, :-1]
    for t in torch.quantile(scores.flatten(), torch.linspace(0, 1, 50)).tolist():
        p = evaluate_thresholds(rec, "max_prob", [t] * 3, unit)
        if p.cost <= budget:
            assert result.accuracy >= p.accuracy - 1e-9


def test_calibration_finds_the_brute_force_optimum_on_a_small_grid():
    rec = synthetic_record(n=200, J=3, seed=4)
    scores = rec.scores("max_prob")[:, :-1]
    grid = sorted(set(torch.quantile(scores.flatten(), torch.linspace(0, 1, 12)).tolist())) + [math.inf]
    best = max(
        (
            evaluate_thresholds(rec, "max_prob", [a, b], "layers")
            for a, b in itertools.product(grid, grid)
            if evaluate_thresholds(rec, "max_prob", [a, b], "layers").cost <= 0.6
        ),
        key=lambda p: p.accuracy,
    )
    result = calibrate(rec, "max_prob", 0.6, "layers", per_exit=True)
    assert result.cost <= 0.6 + 1e-9
    assert result.accuracy >= best.accuracy - 1e-9


def test_default_calibration_shares_one_threshold_and_per_exit_never_does_worse_on_its_split():
    rec = synthetic_record(n=300, J=4, seed=5)
    shared = calibrate(rec, "entropy", 0.6, "layers")
    assert len(set(shared.thresholds)) == 1 and shared.cost <= 0.6 + 1e-9
    refined = calibrate(rec, "entropy", 0.6, "layers", per_exit=True)
    assert refined.cost <= 0.6 + 1e-9 and refined.accuracy >= shared.accuracy - 1e-12


def test_calibration_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="below the cheapest"):
        calibrate(synthetic_record(), "entropy", 0.1, "layers")


def test_curves_anytime_and_budgeted():
    rec = synthetic_record()
    result = calibrate(rec, "margin", 0.5)
    assert [p.cost for p in result.anytime] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    costs = [p.cost for p in result.budgeted]
    accs = [p.accuracy for p in result.budgeted]
    assert costs == sorted(costs) and accs == sorted(accs)  # a Pareto frontier
    assert result.budgeted[-1].cost == pytest.approx(1.0) or result.budgeted[-1].accuracy >= result.full_accuracy


def test_record_exits_matches_the_model():
    torch.manual_seed(5)
    model = build_model(encoder_cfg(layers=[2])).eval()
    split = {**text_batch(B=10), "labels": torch.randint(0, 3, (10,))}
    rec = record_exits(model, split, batch_size=4)
    for i in range(10):
        row = {k: v[i : i + 1, : int(split["attention_mask"][i].sum())] for k, v in split.items() if k != "labels"}
        with torch.no_grad():
            heads, _ = model.forward_heads(row)
        torch.testing.assert_close(rec.logits[i], torch.cat([h.logits for h in heads]), atol=1e-5, rtol=1e-5)
        assert rec.full_flops[i] == infer_full(model, row)


# --- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exits,match",
    [
        ({"layers": [2, 1]}, "increasing"),
        ({"layers": [1], "weighting": "custom"}, "no weights"),
        ({"layers": [1], "weighting": "custom", "weights": [1.0]}, "needs 2"),
        ({"layers": [1], "weights": [1.0, 1.0]}, "only read with weighting: custom"),
        ({"layers": [1, 2], "thresholds": [0.5]}, "one threshold per early exit"),
        ({"layers": [4]}, "before the last"),
        ({"layers": [1], "policy": "entropie"}, "did you mean 'entropy'"),
    ],
)
def test_exit_config_errors(exits, match):
    with pytest.raises(ConfigError, match=match):
        encoder_cfg(**exits)


def test_hf_encoder_config_errors():
    with pytest.raises(ConfigError, match="pretrained"):
        from_dict(ModelConfig, {"kind": "hf_encoder", "moe_every": 0})
    from dynamoe.config import RunConfig

    # MoE layers (the default moe_every) in a pretrained encoder start from its FFNs or not at all.
    with pytest.raises(ConfigError, match="model.moe_every: MoE layers .* set train.upcycle.enabled: true"):
        from_dict(
            RunConfig,
            {
                "model": {"kind": "hf_encoder", "pretrained": "minilm"},
                "data": {"dataset": "sst2", "tokenizer": "minilm"},
            },
        )

    with pytest.raises(ConfigError, match="data.tokenizer"):
        from_dict(
            RunConfig,
            {
                "model": {"kind": "hf_encoder", "pretrained": "minilm", "moe_every": 0},
                "data": {"dataset": "sst2", "tokenizer": "char"},
            },
        )


def test_cnn_exits_after_blocks():
    torch.manual_seed(6)
    cfg = from_dict(
        ModelConfig,
        {
            "kind": "cnn",
            "num_classes": 10,
            "cnn": {"in_channels": 1, "image_size": 8, "exit_after": "block", "moe_every": 3},
            "moe": {"num_experts": 4, "d_expert": 16},
            "exits": {"layers": [1, 3, 4], "head_hidden": 0},
        },
    )
    model = build_model(cfg).eval()
    assert model.num_stages == 6 and model.exit_stages == [0, 2, 3, 5]
    assert [h.out.in_features for h in model.exit_heads] == [16, 32, 32]
    batch = {"pixel_values": torch.randn(10, 1, 8, 8)}
    with torch.no_grad():
        scores = all_exit_scores("entropy", model.forward_heads(batch)[0])
    _check_compaction(model, batch, "entropy", scores[:, :-1].median(0).values.tolist())
    with pytest.raises(ConfigError, match="before the last of the 6 blocks"):
        from_dict(ModelConfig, {"kind": "cnn", "cnn": {"exit_after": "block"}, "exits": {"layers": [6]}})


def test_learned_policy_compaction_and_calibration():
    torch.manual_seed(7)
    model = build_model(cnn_cfg(layers=[1, 2], policy="learned")).eval()
    batch = {"pixel_values": torch.randn(12, 1, 8, 8)}
    with torch.no_grad():
        heads = model.forward_heads(batch)[0]
    assert heads[-1].predictor is None and all(h.predictor is not None for h in heads[:-1])
    scores = all_exit_scores("learned", heads)
    assert torch.all(scores[:, -1] == 1.0)
    _check_compaction(model, batch, "learned", scores[:, :-1].median(0).values.tolist())
    rec = record_exits(model, {**batch, "labels": torch.randint(0, 10, (12,))})
    assert calibrate(rec, "learned", 0.8, "flops").cost <= 0.8 + 1e-9
