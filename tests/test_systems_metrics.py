"""Systems metrics: model FLOPs agree with the compute ledger, the window arithmetic, and every
figure lands in metrics.jsonl."""

from __future__ import annotations

import pytest
import torch

from dynamoe.compute.ledger import ComputeLedger
from dynamoe.config import ModelConfig, from_dict, load_config
from dynamoe.models import build_model
from dynamoe.training.metrics import read_metrics
from dynamoe.training.systems import forward_flops, window_fields

from tiny_models import SMALL

SPEC = {**SMALL, "kind": "decoder", "moe": {**SMALL["moe"], "router": {"top_k": 2}}}


def test_model_flops_equal_what_the_ledger_measures():
    model = build_model(from_dict(ModelConfig, SPEC)).eval()
    ids = torch.randint(0, 40, (3, 16))
    with torch.no_grad(), ComputeLedger(model) as ledger:
        out = model(ids)
    assert forward_flops(model, out) == pytest.approx(ledger.total, rel=1e-9)


def test_window_fields():
    fields = window_fields(steps=4, elapsed=2.0, tokens=8000, train_flops=4e12, world=2, peak_tflops=1.0)
    assert fields["step_time_s"] == 0.5 and fields["tokens_per_s"] == 4000
    assert fields["tokens_per_s_per_process"] == 2000 and fields["model_tflops_per_s"] == 2.0
    assert fields["mfu"] == pytest.approx(1.0)  # 2 TFLOP/s over two devices of 1 TFLOP/s
    assert window_fields(1, 1.0, 1, 1.0, 1, None)["mfu"] is None


def test_training_logs_the_systems_figures(tmp_path):
    from dynamoe.training.trainer import train

    cfg = load_config(
        "debug_tiny",
        [
            "train.steps=4",
            "train.log_every=2",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.warmup_steps=1",
            "train.peak_tflops=1.0",
        ],
    )
    train(cfg, run_dir=str(tmp_path), progress=False)
    rows = read_metrics(tmp_path, "train")
    assert len(rows) == 2
    for row in rows:
        assert row["step_time_s"] > 0 and row["tokens_per_s"] == row["tokens_per_s_per_process"] > 0
        assert row["model_tflops_per_s"] > 0 and 0 < row["mfu"] < 1
        assert row["peak_memory_mib"] > 0
        assert row["balance_loss"] + row["z_loss"] == pytest.approx(row["aux_loss"], rel=1e-6)
