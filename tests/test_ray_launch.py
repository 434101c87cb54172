"""`moe launch` on an embedded local Ray cluster (CPU, gloo): the same losses as torchrun, a
worker crash resumed from the last committed checkpoint, evaluation jobs, and clear errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dynamoe.training.checkpoint import list_checkpoints, load_checkpoint

from dist_helper import clean_env, free_port, torchrun_train, train_metrics

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
JOB = ["debug_tiny", "--workers", "2", "--ep-size", "2", "--set", "train.log_every=1", "--quiet"]


def moe_launch(*args, extra_env=None, timeout=400):
    env = {**clean_env(), "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "1", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dynamoe.launch.cli", "launch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ray") / "run"
    out = moe_launch(*JOB, "--run-dir", str(run))
    assert out.returncode == 0, out.stderr[-4000:]
    return run


def test_two_ray_workers_train_like_torchrun(ray_run, tmp_path):
    torchrun_train(
        2, "debug_tiny", "--run-dir", str(tmp_path), "--set", "parallel.ep_size=2", "--set", "train.log_every=1"
    )
    ray_losses, torchrun_losses = train_metrics(ray_run), train_metrics(tmp_path)
    assert sorted(ray_losses) == list(range(1, 9))
    for step, loss in torchrun_losses.items():
        assert ray_losses[step] == pytest.approx(loss, abs=1e-6), step
    # Every checkpoint the trainer wrote was also committed to Ray Train's storage.
    assert sorted(p.name for p in (ray_run / "ray" / "train").glob("step_*")) == ["step_00000004", "step_00000008"]


def test_a_crashed_worker_resumes_from_the_last_committed_checkpoint(ray_run, tmp_path):
    run = tmp_path / "run"
    out = moe_launch(
        *JOB,
        "--run-dir",
        str(run),
        "--set",
        "launch.max_failures=1",
        extra_env={"DYNAMOE_KILL_WORKER_AT_STEP": "6", "DYNAMOE_KILL_WORKER_RANK": "1"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (run / ".killed_at_step_6").exists()  # the crash did happen, after the step-4 checkpoint
    # No step lost or counted twice, and the losses continue exactly from the checkpoint.
    assert train_metrics(run) == train_metrics(ray_run)
    final, _, state = load_checkpoint(list_checkpoints(run)[-1])
    reference, _, _ = load_checkpoint(list_checkpoints(ray_run)[-1])
    assert state["step"] == 8
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name


def test_a_crash_without_restarts_left_fails_with_the_workers_error(tmp_path):
    out = moe_launch(
        *JOB,
        "--run-dir",
        str(tmp_path / "run"),
        extra_env={"DYNAMOE_KILL_WORKER_AT_STEP": "2", "DYNAMOE_KILL_WORKER_RANK": "0"},
    )
    assert out.returncode == 1
    assert "moe launch: error: the job failed" in out.stderr


def test_evaluation_job_of_a_run_folder(ray_run):
    out = moe_launch("--eval", str(ray_run), "--workers", "2", "--ep-size", "2")
    assert out.returncode == 0, out.stderr[-4000:]
    evaluation = json.loads((ray_run / "eval.json").read_text())
    summary = json.loads((ray_run / "summary.json").read_text())
    assert evaluation["step"] == 8
    assert evaluation["eval"]["loss"] == pytest.approx(summary["final_eval"]["loss"], abs=1e-6)
    assert "validation: loss" in out.stdout


def test_a_bad_address_fails_within_seconds():
    started = time.monotonic()
    out = moe_launch("debug_tiny", "--address", f"127.0.0.1:{free_port()}", timeout=60)
    assert out.returncode == 1
    assert "no Ray cluster answers" in out.stderr and "fix:" in out.stderr
    assert time.monotonic() - started < 30


def test_more_workers_than_cpus_is_a_clear_error():
    out = moe_launch("debug_tiny", "--workers", str(4 * (os.cpu_count() or 1)), timeout=120)
    assert out.returncode == 1
    assert "CPUs but the Ray cluster has" in out.stderr and "fix:" in out.stderr


def test_a_run_folder_with_checkpoints_is_refused_before_ray_starts(ray_run):
    out = moe_launch(*JOB, "--run-dir", str(ray_run), timeout=60)
    assert out.returncode == 1
    assert "already holds checkpoints" in out.stderr
