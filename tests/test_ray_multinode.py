"""`moe launch` on a real two-node Ray cluster on this machine (`ray start` twice, `ray job
submit`): workers spread over both nodes, the second node killed mid-run and started again, the job
resumed from the last committed checkpoint with no step lost or repeated and the weights of an
uninterrupted run; plus the placement checks that need no cluster of their own."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dynamoe.launch.local_cluster import MARKER_ENV, node_loss_drill
from dynamoe.training.checkpoint import list_checkpoints, load_checkpoint

from dist_helper import clean_env, train_metrics

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
HOLD_STEP = 6  # after the step-4 checkpoint, before the step-8 one (debug_tiny checkpoints every 4)


def _left_over_processes(root: Path) -> list[int]:
    import psutil

    left = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_ENV) == str(root) and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return left


@pytest.fixture(scope="module")
def drill():
    # Ray's Unix socket paths must stay short, so not pytest's long tmp_path.
    root = Path(tempfile.mkdtemp(prefix="dmn", dir="/tmp")).resolve()
    try:
        record = node_loss_drill(root, hold_step=HOLD_STEP, timeout=600)
        record["left_over"] = _left_over_processes(root)
        yield record
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_killed_node_is_replaced_and_the_job_resumes_from_the_last_committed_checkpoint(drill):
    assert drill["status"] == "SUCCEEDED", drill["logs"][-4000:]
    assert drill["reference_status"] == "SUCCEEDED"
    run, reference = Path(drill["run"]), Path(drill["reference"])
    events = [e["what"] for e in drill["events"]]
    assert events.index(f"both workers held after step {HOLD_STEP}") < events.index("worker node's raylet killed")
    # Attempt 1 on the two original nodes, one worker each; attempt 2 on the head and the new node.
    placement = drill["placement"]
    assert len(placement) == 4, placement
    first, second = sorted(placement[:2], key=lambda r: r["rank"]), sorted(placement[2:], key=lambda r: r["rank"])
    assert {r["node"] for r in first} == {"head", "worker"}
    assert {r["node"] for r in second} == {"head", "worker (restarted)"}
    killed_at = next(e["t"] for e in drill["events"] if e["what"] == "worker node's raylet killed")
    assert max(r["t"] for r in first) < killed_at < min(r["t"] for r in second)
    # Steps 5-6 ran before the kill and again after it; the metrics keep each step once, with the
    # losses of the uninterrupted run, and Ray committed the same checkpoints.
    losses = train_metrics(run)
    assert sorted(losses) == list(range(1, 9))
    assert losses == train_metrics(reference)
    assert sorted(p.name for p in (run / "ray" / "train").glob("step_*")) == ["step_00000004", "step_00000008"]
    final, _, state = load_checkpoint(list_checkpoints(run)[-1])
    expected, _, _ = load_checkpoint(list_checkpoints(reference)[-1])
    assert state["step"] == 8
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    assert drill["left_over"] == [], "processes of the local cluster outlived it"


def test_strict_spread_on_one_node_is_refused_before_training(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dynamoe.launch.cli", "launch", "debug_tiny", "--workers", "2", "--quiet"]
        + ["--run-dir", str(tmp_path / "run"), "--set", "launch.placement_strategy=STRICT_SPREAD"],
        cwd=REPO,
        env={**clean_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert "STRICT_SPREAD puts each of the 2 workers on its own node" in out.stderr and "fix:" in out.stderr
    assert not (tmp_path / "run" / "placement.jsonl").exists()  # no worker started


def test_the_job_runtime_env_wins_over_the_launchers(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from dynamoe.launch.ray_launcher import _without_job_env_vars

    ours = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert _without_job_env_vars(ours) == ours
    job = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "4", "OTHER": "x"}}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    assert _without_job_env_vars(ours) == {"DS_ACCELERATOR": "cpu"}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": None}))
    assert _without_job_env_vars(ours) == ours


def test_an_unknown_placement_strategy_names_the_field_and_the_choices():
    from dynamoe.config import ConfigError, load_config

    assert load_config("debug_tiny", ["launch.placement_strategy=STRICT_SPREAD"]).launch.placement_strategy == (
        "STRICT_SPREAD"
    )
    with pytest.raises(ConfigError, match=r"launch.placement_strategy: 'spread' is not allowed; fix: .*'SPREAD'"):
        load_config("debug_tiny", ["launch.placement_strategy=spread"])


def test_a_drill_that_cannot_resume_anything_is_refused_before_any_node_starts(tmp_path):
    from dynamoe.launch.local_cluster import ClusterError

    with pytest.raises(
        ClusterError, match=r"hold step 2 must come after a checkpoint.*fix: pick a hold step in \[4, 7\]"
    ):
        node_loss_drill(tmp_path, hold_step=2)
    with pytest.raises(ClusterError, match="hold step 6 must come after a checkpoint"):
        node_loss_drill(tmp_path, hold_step=6, overrides=("train.checkpoint_every=0",))
    assert not (tmp_path / "head").exists()
