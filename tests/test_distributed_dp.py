"""Several processes on one machine (torchrun, gloo): data parallelism with experts replicated
reproduces the single-process run on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dist_helper import clean_env

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed


def train_losses(run_dir: Path, nproc: int, batch_size: int) -> dict[int, float]:
    env = {**clean_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "launch.cli", "train", "debug_tiny", "--quiet", "--run-dir", str(run_dir),
           "--set", f"train.batch_size={batch_size}", "--set", "train.log_every=1", "--set", "train.steps=6",
           "--set", "train.warmup_steps=1", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0",
           "--set", "model.moe.router.aux_free_bias=true"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_two_processes_with_half_batches_equal_one_process(tmp_path):
    one = train_losses(tmp_path / "dp1", 1, 8)
    two = train_losses(tmp_path / "dp2", 2, 4)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step  # fp32 reduction order
