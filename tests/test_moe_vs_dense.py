"""evals/moe_vs_dense.py: the variants spend equal active FLOPs, unequal ones are refused, and the
table and JSON come from the runs (a micro end-to-end sweep on a user's own text file)."""

from __future__ import annotations

import json

import pytest

from dynamoe.config import ConfigError, load_config
from dynamoe.evals import moe_vs_dense as M
from dynamoe.launch.cli import main as cli_main

# A decoder small enough that two 4-step runs take seconds; every variant splits d_ff=64 evenly.
MICRO = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.d_ff=64",
    "model.max_seq_len=32",
    "data.seq_len=32",
]


@pytest.fixture
def corpus(tmp_path):
    """A small second corpus: varied lines, so the held-out tail shares the training characters."""
    words = ["router", "expert", "token", "dense", "sparse", "layer", "gate", "load", "loss", "step"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5)) + "." for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("d_ff", [512, 64])
def test_every_variant_spends_the_dense_active_flops(d_ff):
    base = [f"model.d_ff={d_ff}"]
    dense = M.active_flops_per_token(load_config("quickstart", base + M.variant_overrides("dense", d_ff)))
    for name in M.VARIANTS[1:]:
        cfg = load_config("quickstart", base + M.variant_overrides(name, d_ff))
        flops = M.active_flops_per_token(cfg)
        moe = cfg.model.moe
        routed = moe.router.top_k * moe.d_expert * (moe.router.capacity_factor or 1.0)
        assert routed + moe.num_shared_experts * (moe.d_shared or moe.d_expert) == d_ff, name
        # Only the router (d_model x E per token per MoE layer) separates a variant from dense.
        router = 2 * 2 * cfg.model.d_model * moe.num_experts  # two MoE layers of four
        assert flops["ffn"] == pytest.approx(dense["ffn"], rel=1e-9), name
        assert flops["total"] - dense["total"] == pytest.approx(router), name


def test_variant_overrides_refuse_bad_input():
    with pytest.raises(ConfigError, match="unknown variant 'top7'"):
        M.variant_overrides("top7", 512)
    with pytest.raises(ConfigError, match="multiple of 4"):
        M.variant_overrides("finegrained", 510)


def test_unequal_active_flops_are_refused_before_training(tmp_path, capsys):
    # Twice the top-2 expert width: 2x the dense FFN's compute, refused with the variant named.
    argv = ["--variants", "dense", "top2", "--steps", "2", "--json", str(tmp_path / "r.json")]
    with pytest.raises(ConfigError, match=r"variant 'top2' runs .* equal active compute"):
        M.main(argv + ["--set", "model.moe.d_expert=512"])
    # A base that places MoE layers itself would leave "dense" sparse: refused as well.
    with pytest.raises(ConfigError, match=r"variant 'dense'.*--set model.moe_layers=null"):
        M.main(argv + ["--set", "model.moe_layers=[1]"])
    assert not (tmp_path / "r.json").exists()
    # Through the CLI: one line naming the problem and exit code 2.
    assert cli_main(["bench", "moe-vs-dense", *argv, "--set", "model.moe.d_expert=512"]) == 2
    assert "equal active compute" in capsys.readouterr().err


def test_data_path_needs_a_dataset_name(tmp_path, corpus):
    with pytest.raises(SystemExit):
        M.main(["--data-path", str(corpus), "--json", str(tmp_path / "r.json")])


def test_micro_sweep_on_a_users_corpus(tmp_path, corpus):
    out_json, table = tmp_path / "results.json", tmp_path / "table.md"
    argv = ["--variants", "dense", "top2", "--seeds", "3", "--steps", "4", "--eval-every", "2"]
    argv += ["--batch-size", "4", "--eval-batches", "1", "--dataset", "mine", "--data-path", str(corpus)]
    argv += ["--out-dir", str(tmp_path / "runs"), "--json", str(out_json), "--markdown", str(table)]
    argv += ["--plot", str(tmp_path / "curve.png")]
    for override in MICRO:
        argv += ["--set", override]
    result = M.main(argv)

    saved = json.loads(out_json.read_text())
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [("dense", 3), ("top2", 3)]
    dense, top2 = saved["runs"]
    for run in (dense, top2):
        assert [p["step"] for p in run["curve"]] == [2, 4]
        assert run["val_loss"] == run["curve"][-1]["val_loss"]
        # Trained on the user's corpus (its characters), not Tiny Shakespeare.
        assert run["unigram_baseline_loss"] < 3.2
    # Equal training FLOPs: the ledger's executed counts differ by the router only, and each run's
    # FLOPs per token less the shared LM head is its planned active FLOPs per token.
    tokens = 4 * 4 * 32
    head = [
        r["train_flops"] / (3 * tokens) - saved["plans"][r["variant"]]["active_flops_per_token"]["total"]
        for r in (dense, top2)
    ]
    assert head[0] == pytest.approx(head[1], rel=1e-9) and head[0] > 0
    assert top2["train_flops"] / dense["train_flops"] == pytest.approx(1.0, abs=0.02)
    # The MoE run holds more weights than it uses; the dense one uses all of its weights.
    assert dense["active_params"] == dense["total_params"]
    assert top2["total_params"] > 1.5 * top2["active_params"]
    assert top2["active_params"] == pytest.approx(dense["active_params"], rel=0.02)
    assert dense["max_over_mean"] is None and top2["max_over_mean"] >= 1.0
    assert len(top2["load_balance_train_end"]) == 1 and top2["load_balance_train_end"][0]["tokens"] == 32 * 4

    # The summary and the table are built from those runs.
    summary = result["summary"]
    assert summary["top2"]["val_loss_mean"] == top2["val_loss"] and summary["dense"]["val_loss_std"] == 0.0
    text = table.read_text()
    for run in (dense, top2):
        assert f"| {run['variant']} | {run['val_loss']:.4f} ± 0.0000 |" in text
    assert result["verdict"]["best_moe"] == "top2"
    assert result["verdict"]["beyond_spread"] == (top2["val_loss"] < dense["val_loss"])
    assert result["verdict"]["paired_gaps"] == [dense["val_loss"] - top2["val_loss"]]
    assert (tmp_path / "curve.png").stat().st_size > 0

    # --resume keeps those runs and trains only the missing pair; other settings are refused.
    with pytest.raises(ConfigError, match="--resume: the 'dense' runs .* other settings"):
        M.main([*argv, "--resume", "--steps", "6"])
    resumed = M.main([*argv, "--resume", "--variants", "dense", "--seeds", "3", "4"])
    assert [(r["variant"], r["seed"]) for r in resumed["runs"]] == [("dense", 3), ("top2", 3), ("dense", 4)]
    assert resumed["runs"][:2] == saved["runs"]
    assert resumed["summary"]["dense"]["seeds"] == [3, 4] and resumed["summary"]["top2"]["seeds"] == [3]
    assert resumed["verdict"]["paired_gaps"] == result["verdict"]["paired_gaps"]  # seed 3 only: the pair
    assert [s["trained"] for s in resumed["sessions"]] == [[["dense", 3], ["top2", 3]], [["dense", 4]]]
    assert resumed["total_wall_s"] == pytest.approx(sum(s["wall_s"] for s in resumed["sessions"]))
