"""The `moe` command line, run as a user would: a subprocess, exit codes, what it prints."""

import subprocess
import sys
from pathlib import Path

from dist_helper import clean_env

REPO = Path(__file__).resolve().parent.parent


def run_moe(*args, cwd=REPO, timeout=300):
    env = {**clean_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dynamoe.launch.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_configs_lists_the_shipped_configs():
    out = run_moe("configs")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert "quickstart" in names and "debug_tiny" in names


def test_train_runs_and_reports_load_balance(tmp_path):
    out = run_moe(
        "train",
        "debug_tiny",
        "--set",
        "train.steps=4",
        "--set",
        "train.warmup_steps=1",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final validation: loss" in out.stdout
    assert "unigram baseline" in out.stdout
    assert "max/mean" in out.stdout and "tokens per expert" in out.stdout
    assert (tmp_path / "run" / "summary.json").exists()


def test_bad_config_exits_2_with_the_field_and_fix(tmp_path):
    out = run_moe("train", "debug_tiny", "--set", "model.moe.router.top_k=9", "--run-dir", str(tmp_path / "x"))
    assert out.returncode == 2
    assert "model.moe.router.top_k" in out.stderr and "fix:" in out.stderr
    out = run_moe("train", "debug_tiny", "--set", "model.moe.num_expert=4")
    assert out.returncode == 2 and "did you mean 'num_experts'" in out.stderr
    assert "Traceback" not in out.stderr


def test_resume_without_checkpoints_is_a_clear_error(tmp_path):
    out = run_moe("train", "debug_tiny", "--resume", str(tmp_path))
    assert out.returncode == 2
    assert "no committed checkpoint" in out.stderr
