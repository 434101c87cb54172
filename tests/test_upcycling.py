"""Sparse upcycling (``train.upcycle``, ``dynamoe.models.upcycle``): a dense decoder's FFNs become
MoE layers started from them. For the GPT-2 and the modern block, and for dense Llama and Qwen3
checkpoints brought in by ``moe import``: every option the maths says is exact gives the dense
model's logits at initialisation (fp32), every other one is not exact and says why; a fine-tune
from an upcycled start trains; what does not fit is a ConfigError naming the field, before
DeepSpeed starts."""

import json
import math

import pytest
import torch
import transformers

from dynamoe.config import ConfigError, ModelConfig, UpcycleConfig, from_dict, load_config, to_dict
from dynamoe.interop.hf_models import import_model
from dynamoe.kernels.moe_mlp import activate
from dynamoe.models import build_model
from dynamoe.models.upcycle import plan, upcycle_ffn, upcycle_model, upcycle_state

from tiny_models import BLOCKS, small

D_FF = 64


def _cfg(block: str, **changes) -> ModelConfig:
    data = {**small(block), "d_ff": D_FF, **changes}
    data["moe"] = {**small(block)["moe"], **changes.get("moe", {})}
    return from_dict(ModelConfig, data, "model")


def _up(**fields) -> UpcycleConfig:
    return from_dict(UpcycleConfig, {"enabled": True, **fields}, "train.upcycle")


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights five times their initial scale and norms away from 1 and 0, so the FFNs (and any
    error in them) weigh in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5)
    return model.eval()


@pytest.fixture(scope="module", params=BLOCKS)
def dense(request):
    cfg = _cfg(request.param, moe_every=0)
    torch.manual_seed(0)
    return request.param, cfg, _perturbed(build_model(cfg))


IDS = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, ids=IDS) -> tuple[float, float]:
    with torch.no_grad():
        x, y = a(ids).logits, b(ids).logits
    return float((x - y).abs().max()), float(y.abs().max())


# (model.moe changes, train.upcycle fields, exact at init?)
CASES = {
    "copies_top2": ({"num_experts": 4, "d_expert": 64, "router": {"top_k": 2}}, {}, True),
    "copies_top2_random_router": (
        {"num_experts": 4, "d_expert": 64, "router": {"top_k": 2}},
        {"router_init_std": 0.5},
        True,
    ),
    "switch_top1_raw_weights": (
        {"num_experts": 4, "d_expert": 64, "router": {"top_k": 1, "normalize": False}},
        {},
        True,
    ),
    "fine_grained_g2": ({"num_experts": 4, "d_expert": 32, "router": {"top_k": 2}}, {"granularity": 2}, True),
    "fine_grained_g4_e16": ({"num_experts": 16, "d_expert": 16, "router": {"top_k": 8}}, {"granularity": 4}, True),
    "sigmoid_scaled_groups": (
        {
            "num_experts": 8,
            "d_expert": 32,
            "router": {
                "top_k": 4,
                "score": "sigmoid",
                "normalize": False,
                "routed_scaling_factor": 2.5,
                "n_group": 2,
                "topk_group": 1,
            },
        },
        {"granularity": 2},
        True,
    ),
    "shared_dense_noisy_reinit": (
        {"num_experts": 4, "d_expert": 32, "num_shared_experts": 1, "d_shared": 64, "router": {"top_k": 2}},
        {"granularity": 2, "keep_dense_as_shared": True, "noise": 0.1, "reinit_fraction": 0.5},
        True,
    ),
    "shared_dense_routed_on": (
        {"num_experts": 4, "d_expert": 64, "num_shared_experts": 1, "router": {"top_k": 2}},
        {"keep_dense_as_shared": True, "output_scale": 1.0},
        False,
    ),
    "noise": ({"num_experts": 4, "d_expert": 64, "router": {"top_k": 2}}, {"noise": 0.01}, False),
    "drop_upcycling": ({"num_experts": 4, "d_expert": 64, "router": {"top_k": 2}}, {"reinit_fraction": 0.25}, False),
    "g2_odd_top_k": ({"num_experts": 6, "d_expert": 32, "router": {"top_k": 3}}, {"granularity": 2}, False),
    "g2_random_router": (
        {"num_experts": 4, "d_expert": 32, "router": {"top_k": 2}},
        {"granularity": 2, "router_init_std": 0.02},
        False,
    ),
    "capacity": (
        {"num_experts": 4, "d_expert": 64, "router": {"top_k": 2, "capacity_factor": 1.0}},
        {"router_init_std": 0.0},
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_upcycled_logits_equal_the_dense_model_exactly_where_the_maths_says(dense, case):
    block, dense_cfg, dense_model = dense
    moe, fields, exact = CASES[case]
    cfg, up = _cfg(block, moe=moe), _up(**fields)
    p = plan(cfg, up)
    assert p.exact == exact, p.why
    _, model = upcycle_model(dense_cfg, dense_model, cfg, up, seed=3)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    diff, scale = _max_diff(model, dense_model)
    if exact:  # fp32: as close as a different summation order allows
        assert diff <= 1e-6 * scale, (diff, scale)
    else:
        assert diff > 1e-3 * scale, (diff, p.why)


def test_dynamoe_encoders_upcycle_the_same_way():
    dense_cfg = _cfg("gpt2", kind="encoder", num_classes=3, moe_every=0)
    torch.manual_seed(0)
    dense_model = _perturbed(build_model(dense_cfg))
    cfg = _cfg("gpt2", kind="encoder", num_classes=3, moe={"num_experts": 4, "d_expert": 32})
    _, model = upcycle_model(dense_cfg, dense_model, cfg, _up(granularity=2))
    diff, scale = _max_diff(model, dense_model)
    assert diff <= 1e-6 * scale


def test_exact_scales_and_router_defaults():
    cfg = _cfg("gpt2", moe={"num_experts": 8, "d_expert": 16, "router": {"top_k": 4}})
    p = plan(cfg, _up(granularity=4))
    assert (p.copies, p.output_scale, p.router_init_std) == (2, 4.0, 0.0)  # dense / g, scaled back by g
    # g = 1 with renormalised top-k is exact for any router: the default router is a random one.
    cfg = _cfg("gpt2", moe={"num_experts": 8, "d_expert": 64, "router": {"top_k": 2}})
    assert (plan(cfg, _up()).output_scale, plan(cfg, _up()).router_init_std) == (1.0, 0.02)
    # Switch (k = 1, raw softmax weight 1/E at a zero router): scaled by E.
    cfg = _cfg("gpt2", moe={"num_experts": 8, "d_expert": 64, "router": {"top_k": 1}})
    assert (plan(cfg, _up()).output_scale, plan(cfg, _up()).router_init_std) == (8.0, 0.0)
    cfg = _cfg("gpt2", moe={"num_experts": 4, "d_expert": 64, "num_shared_experts": 1})
    assert plan(cfg, _up(keep_dense_as_shared=True)).output_scale == 0.0


@pytest.mark.parametrize("block", BLOCKS)
def test_experts_are_the_dense_ffn_parts_in_copy_major_order(block):
    cfg = _cfg(block, moe={"num_experts": 8, "d_expert": 16, "router": {"top_k": 4}})
    dense = build_model(_cfg(block, moe_every=0)).blocks[1].ffn
    x = torch.randn(5, cfg.d_model)
    weights = upcycle_ffn(dense.w_in.weight, dense.w_out.weight, cfg, _up(granularity=4), torch.Generator())
    w1, w2 = weights["experts.w1_EDF"], weights["experts.w2_EFD"]
    assert w1.shape[0] == 8 and torch.equal(w1[:4], w1[4:]) and torch.equal(w2[:4], w2[4:])  # 2 copies
    assert not weights["router.gate.weight"].any() and not weights["router.expert_bias"].any()
    parts = [activate(x @ w1[e], cfg.moe.activation) @ w2[e] for e in range(4)]  # copy 0: parts 0..3
    assert torch.allclose(sum(parts) / 4, dense(x), atol=1e-6)  # each part scaled by g = 4


def test_noise_and_drop_upcycling_change_what_they_say():
    cfg = _cfg("modern", moe={"num_experts": 4, "d_expert": 64, "router": {"top_k": 2}})
    dense = _perturbed(build_model(_cfg("modern", moe_every=0))).blocks[1].ffn
    w_in, w_out = dense.w_in.weight.detach(), dense.w_out.weight.detach()
    x = torch.randn(64, cfg.d_model)
    plain = upcycle_ffn(w_in, w_out, cfg, _up(), torch.Generator())
    for sigma in (0.01, 0.04):
        noisy = upcycle_ffn(w_in, w_out, cfg, _up(noise=sigma), torch.Generator().manual_seed(0))
        rel = (noisy["experts.w1_EDF"] / plain["experts.w1_EDF"] - 1).std()
        assert 0.8 * sigma < rel < 1.2 * sigma  # multiplicative, per weight
        y = activate(x @ noisy["experts.w1_EDF"][0], "swiglu") @ noisy["experts.w2_EFD"][0]
        err = float((y - dense(x)).detach().norm() / dense(x).detach().norm())
        assert 0.1 * sigma < err < 5 * sigma, (sigma, err)
    dropped = upcycle_ffn(w_in, w_out, cfg, _up(reinit_fraction=0.25), torch.Generator().manual_seed(0))
    changed = []
    for e in range(4):
        gate_up = dropped["experts.w1_EDF"][e] != plain["experts.w1_EDF"][e]
        down = dropped["experts.w2_EFD"][e] != plain["experts.w2_EFD"][e]
        units = gate_up[:, :64].any(0) | gate_up[:, 64:].any(0) | down.any(1)
        assert int(units.sum()) == 16  # 25% of each expert's 64 hidden units, gate, up and down together
        changed.append(frozenset(units.nonzero().flatten().tolist()))
    assert len(set(changed)) == 4  # a different random set per expert
    new = dropped["experts.w2_EFD"][0][sorted(changed[0])]
    assert abs(float(new.std()) / float(w_out.std()) - 1) < 0.2  # re-drawn with the dense matrix's statistics


def test_upcycling_is_deterministic_in_the_seed(dense):
    block, dense_cfg, dense_model = dense
    cfg = _cfg(block, moe={"num_experts": 4, "d_expert": 64})
    up = _up(noise=0.01, reinit_fraction=0.1)
    a, b, c = (upcycle_state(dense_cfg, dense_model.state_dict(), cfg, up, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # every rank builds the same experts before sharding
    assert not torch.equal(a["blocks.1.ffn.experts.w1_EDF"], c["blocks.1.ffn.experts.w1_EDF"])


# --- dense Hugging Face decoders through `moe import` --------------------------------------------

HF_COMMON = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
HF_FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_theta": 500000.0}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 12, "tie_word_embeddings": True}),
}


def _hf_dense(name: str, folder, **changes):
    config_cls, model_cls, extra = HF_FAMILIES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**HF_COMMON, **extra, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_imported_dense_hf_decoders_upcycle_to_their_own_logits(family, tmp_path):
    hf = _hf_dense(family, tmp_path / family)
    imported = import_model(str(tmp_path / family))
    assert imported.config.moe_every == 0
    ids = torch.randint(0, HF_COMMON["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids).logits
    options = [
        ({"num_experts": 4, "d_expert": 40, "router": {"top_k": 2}}, {}, {}),
        ({"num_experts": 4, "d_expert": 20, "router": {"top_k": 2}}, {"granularity": 2}, {"moe_layers": [0, 2]}),
        (
            {"num_experts": 8, "d_expert": 10, "num_shared_experts": 1, "d_shared": 40, "router": {"top_k": 2}},
            {"granularity": 4, "keep_dense_as_shared": True, "noise": 0.05},
            {"first_dense_layers": 1},
        ),
    ]
    for moe, fields, placement in options:
        run = {**to_dict(imported.config), "moe_every": 1, **placement}
        run["moe"] = {**run["moe"], **moe}
        cfg, up = from_dict(ModelConfig, run, "model"), _up(**fields)
        assert plan(cfg, up).exact
        _, model = upcycle_model(imported.config, imported.model, cfg, up)
        assert any(b.is_moe for b in model.blocks)
        with torch.no_grad():
            ours, dense_ours = model(ids).logits, imported.model(ids).logits
        assert float((ours - dense_ours).abs().max()) <= 1e-6 * float(dense_ours.abs().max()), fields
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)  # and transformers' dense model's


# --- training from an upcycled start ---------------------------------------------------------------


UPCYCLE_SETS = [
    "model.moe_every=2",
    "model.moe.num_experts=4",
    "model.moe.d_expert=20",
    "model.moe.router.top_k=2",
    "train.upcycle.enabled=true",
    "train.upcycle.granularity=2",
    "train.steps=6",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "data.seq_len=16",
]


@pytest.fixture(scope="module")
def imported_llama(tmp_path_factory):
    """A dense Llama with the tiny-Shakespeare character vocabulary, through `moe import --config`."""
    from dynamoe.launch.cli import main

    root = tmp_path_factory.mktemp("llama")
    _hf_dense("llama", root / "hf", vocab_size=65)
    assert main(["import", str(root / "hf"), str(root / "dense.safetensors"), "--config", str(root / "run.yaml")]) == 0
    return root


def _train_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if m.get("split") == "train"]


def test_moe_train_fine_tunes_an_upcycled_llama(imported_llama, tmp_path):
    from dynamoe.launch.cli import main

    run = str(imported_llama / "run.yaml")
    sets = [x for s in UPCYCLE_SETS for x in ("--set", s)]
    assert main(["train", run, *sets, "--run-dir", str(tmp_path / "moe"), "--quiet"]) == 0
    losses = _train_losses(tmp_path / "moe")
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    saved = load_config(str(tmp_path / "moe" / "config.yaml"))
    assert saved.model.is_moe_layer(1) and not saved.model.is_moe_layer(0) and saved.train.upcycle.granularity == 2
    # The first step's loss is the dense model's on the same batch: the upcycled start is exact.
    dense_sets = [x for s in UPCYCLE_SETS[6:] + ["train.steps=1"] for x in ("--set", s)]
    assert main(["train", run, *dense_sets, "--run-dir", str(tmp_path / "dense"), "--quiet"]) == 0
    assert abs(losses[0] - _train_losses(tmp_path / "dense")[0]) < 1e-5


def test_moe_upcycle_writes_a_file_that_init_from_and_hf_export_take(imported_llama, tmp_path):
    from dynamoe.launch.cli import main
    from dynamoe.training.checkpoint import load_exported

    run = str(imported_llama / "run.yaml")
    sets = [x for s in UPCYCLE_SETS[:6] + ["data.seq_len=16"] for x in ("--set", s)]
    out = tmp_path / "moe.safetensors"
    assert main(["upcycle", run, str(out), *sets]) == 0
    cfg, model = load_exported(out)
    dense_cfg, dense_model = load_exported(imported_llama / "dense.safetensors")
    ids = torch.randint(0, 65, (2, 9))
    diff, scale = _max_diff(model.eval(), dense_model.eval(), ids)
    assert cfg.moe.num_experts == 4 and diff <= 1e-6 * scale
    # Every FFN upcycled, plain copies: a Mixtral that transformers loads and that computes the Llama.
    sets += ["--set", "model.moe_every=1", "--set", "train.upcycle.granularity=1", "--set", "model.moe.d_expert=40"]
    assert main(["upcycle", run, str(tmp_path / "mixtral.safetensors"), *sets]) == 0
    assert main(["export", str(tmp_path / "mixtral.safetensors"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    llama = transformers.AutoModelForCausalLM.from_pretrained(imported_llama / "hf").eval()
    assert mixtral.config.model_type == "mixtral" and mixtral.config.num_local_experts == 4
    with torch.no_grad():
        assert torch.allclose(mixtral(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)


# --- what does not fit: ConfigError naming the field, before DeepSpeed ------------------------------


@pytest.mark.parametrize(
    "sets, field",
    [
        (["train.upcycle.granularity=3"], "train.upcycle.granularity: granularity=3 does not divide .*d_ff=40"),
        (["model.moe.d_expert=16"], "model.moe.d_expert: .*fix: set model.moe.d_expert: 20"),
        (["model.moe.num_experts=5", "model.moe.router.top_k=1"], "model.moe.num_experts: .*multiple of 2"),
        (["train.upcycle.keep_dense_as_shared=true"], "model.moe.num_shared_experts: .*d_shared: 40"),
        (["model.moe.num_shared_experts=1"], "model.moe.num_shared_experts: .*keep_dense_as_shared: true"),
        (["model.moe_every=0"], "model.moe_every: upcycling turns dense FFNs into MoE layers"),
        (["train.init_from=null"], "train.upcycle.enabled: .*set train.init_from"),
        (["train.upcycle.reinit_fraction=1.5"], r"train.upcycle.reinit_fraction: must be in \[0, 1\]"),
    ],
)
def test_configs_that_cannot_upcycle_are_refused_by_field(imported_llama, sets, field):
    with pytest.raises(ConfigError, match=field):
        load_config(str(imported_llama / "run.yaml"), UPCYCLE_SETS + sets)


@pytest.fixture
def no_deepspeed(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("DeepSpeed started before the upcycling was checked")

    monkeypatch.setattr("dynamoe.training.trainer.init_distributed", refuse)


def _train(run, sets, tmp_path):
    from dynamoe.training.trainer import train

    train(load_config(run, UPCYCLE_SETS + sets), run_dir=str(tmp_path / "run"), progress=False)


def test_a_source_that_is_not_dense_or_does_not_fit_fails_before_deepspeed(imported_llama, tmp_path, no_deepspeed):
    from dynamoe.training.checkpoint import write_exported

    run = str(imported_llama / "run.yaml")
    # A source with MoE layers.
    moe_cfg = load_config(run, UPCYCLE_SETS).model
    moe_file = tmp_path / "moe.safetensors"
    write_exported(to_dict(moe_cfg), build_model(moe_cfg).state_dict(), moe_file)
    with pytest.raises(ConfigError, match=r"train.init_from: .* has MoE FFNs in layers \[1\].*fix: pass a dense"):
        _train(run, [f"train.init_from={moe_file}"], tmp_path)
    # A dense model of another width.
    with pytest.raises(ConfigError, match="train.init_from: .*model.d_model: 32 there, 64 here.*fix: use the dense"):
        _train(run, ["model.d_model=64"], tmp_path)
    # The same settings, but a weight this run has and the dense model lacks (an early exit's norm).
    with pytest.raises(ConfigError, match="train.init_from: .*exit_norms.0.weight missing"):
        _train(run, ["model.exits.layers=[1]"], tmp_path)


def test_a_dense_init_from_without_upcycle_points_to_it(imported_llama, tmp_path):
    with pytest.raises(ConfigError, match="different model .*set train.upcycle.enabled: true"):
        _train(str(imported_llama / "run.yaml"), ["train.upcycle.enabled=false"], tmp_path)


def test_under_bf16_the_upcycled_fp32_weights_are_the_masters(imported_llama, tmp_path):
    from deepspeed.utils import safe_get_full_fp32_param

    from dynamoe.training.checkpoint import load_exported
    from dynamoe.training.trainer import Trainer

    sets = ["train.precision=bf16", "parallel.zero_stage=1", "train.upcycle.noise=0.01", "train.seed=5"]
    cfg = load_config(str(imported_llama / "run.yaml"), UPCYCLE_SETS + sets)
    trainer = Trainer(cfg, run_dir=str(tmp_path / "run"), progress=False)
    dense_cfg, dense_model = load_exported(imported_llama / "dense.safetensors")
    state = upcycle_state(dense_cfg, dense_model.state_dict(), cfg.model, cfg.train.upcycle, seed=5)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(p).cpu(), state[name]), name
