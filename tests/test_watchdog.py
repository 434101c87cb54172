"""Collectives under timeouts: a rank that dies or stalls in the middle of a step makes every other
rank stop within the timeout + 30 s, with one message that names the operation, the step and the
missing rank (moe/training/watchdog.py).

Three tiers: the diagnosis on an in-process store (fast); a sharded MoE layer on gloo processes
with a rank killed or stalled inside its all-to-all (distributed, a few seconds); and `moe train`
itself on 2 and 4 processes (distributed and slow: each start costs DeepSpeed's import)."""

import io
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dynamoe.config import ConfigError, ParallelConfig
from dynamoe.training import watchdog as wd
from dynamoe.training.watchdog import EXIT_CODE, CollectiveWatchdog, Fault, assess_peers, timings

from dist_helper import clean_env, free_port, run_workers

REPO = Path(__file__).resolve().parent.parent
GLOO_RESET = "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4242"


class Exits:
    """Stands in for ``os._exit``: records the code and lets the test go on."""

    def __init__(self):
        self.codes = []
        self.done = threading.Event()

    def __call__(self, code):
        self.codes.append(code)
        self.done.set()


def _watchdog(rank, world, store, timeout_s=1.0):
    exits, out = Exits(), io.StringIO()
    return CollectiveWatchdog(rank, world, timeout_s, store, exit_fn=exits, stream=out, linger=False), exits, out


def _dead_heartbeat(store, rank, step, seq):
    """What a rank that died leaves behind: one heartbeat that never changes again."""
    import json

    beat = {"beat": 3, "step": step, "seq": seq, "op": None, "elapsed_s": 0.1, "failed": None}
    store.set(f"{wd.KEY_PREFIX}/rank{rank}", json.dumps(beat))


# --- configuration and timings ---------------------------------------------------------------


def test_the_timeout_is_configured_and_validated():
    assert ParallelConfig().collective_timeout_s == 600
    for bad in (0, -5, float("inf")):
        with pytest.raises(ConfigError, match="parallel.collective_timeout_s"):
            ParallelConfig(collective_timeout_s=bad)


@pytest.mark.parametrize("timeout_s", [0.5, 5, 60, 600, 7200])
def test_every_rank_stops_within_the_timeout_plus_30_s(timeout_s):
    period, window, grace = timings(timeout_s)
    # Worst case after the timeout: the backstop's grace and check interval, the diagnosis window,
    # rank 0 lingering one more window for the others' diagnoses.
    assert grace + min(period, 1.0) + 2 * window <= 30
    assert window >= 2 * period  # a live rank beats at least twice while it is watched


# --- the diagnosis -----------------------------------------------------------------------------


def _hb(beat, step, seq, op=None, failed=None):
    return {"beat": beat, "step": step, "seq": seq, "op": op, "elapsed_s": 12.0, "failed": failed}


def test_peers_are_told_apart_by_their_heartbeats():
    first = {1: _hb(5, 7, 40), 2: _hb(5, 7, 38), 3: _hb(5, 7, 40, op="x"), 4: _hb(1, 7, 40, failed="in x")}
    second = {1: _hb(5, 7, 40), 2: _hb(7, 7, 38), 3: _hb(7, 7, 40, op="x"), 4: _hb(2, 7, 40, failed="in x")}
    reports = {r.rank: r for r in assess_peers(0, 6, 7, 40, first, second)}
    assert sorted(reports) == [1, 2, 3, 4, 5]
    assert reports[1].missing and "stopped answering" in reports[1].text  # no beat in the window: dead
    assert reports[2].missing and "alive but never reached it: at step 7, outside any collective" in reports[2].text
    assert not reports[3].missing and "same collective" in reports[3].text
    assert not reports[4].missing and "hit the failure too" in reports[4].text
    assert reports[5].missing and "never published" in reports[5].text


def test_a_rank_that_died_in_the_all_to_all_is_named_and_the_others_stop():
    store = torch.distributed.HashStore()
    w0, exits0, out0 = _watchdog(0, 3, store)
    w2, exits2, out2 = _watchdog(2, 3, store)
    _dead_heartbeat(store, 1, step=7, seq=0)
    w0.step = w2.step = 7
    op = "all_to_all (dispatch, MoE layer 1)"
    with w2.collective(op):  # rank 2 waits in the same all-to-all
        with pytest.raises(RuntimeError, match="Connection closed"):
            with w0.collective(op):
                raise RuntimeError(GLOO_RESET)
        assert exits2.done.wait(5)  # rank 2's watchdog follows rank 0's report
    assert exits0.codes == [EXIT_CODE] and exits2.codes == [EXIT_CODE]
    message = out0.getvalue()
    assert message.startswith(f"dynamoe: collective failure: rank 1 of 3 stopped answering during {op} at step 7")
    assert "parallel.collective_timeout_s=1" in message and "moe launch" in message
    assert "Connection closed by peer" in message  # the transport's own error, for the record
    assert "rank 2 was waiting in the same collective" in message
    assert "reported by rank 0: rank 1 of 3 stopped answering" in out2.getvalue()
    w0.stop(), w2.stop()


def test_a_rank_stalled_outside_the_collective_is_named_when_the_collective_never_returns():
    store = torch.distributed.HashStore()
    w0, exits0, out0 = _watchdog(0, 2, store)
    w1, exits1, _ = _watchdog(1, 2, store)
    w0.step = w1.step = 4
    with w1.collective("all_reduce (step metrics)"):
        pass  # rank 1 finished the step before, then stalls (its heartbeat thread still beats)
    started = time.monotonic()
    with w0.collective("all_reduce (step metrics)"), w0.collective("all_to_all (combine, MoE layer 0)"):
        # A collective that never gives up: the heartbeat thread's backstop has to act.
        assert exits0.done.wait(30)
    elapsed = time.monotonic() - started
    _, window, grace = timings(1.0)
    assert 1.0 + grace <= elapsed <= 1.0 + grace + window + 2.0
    message = out0.getvalue()
    assert (
        "rank 1 of 2 stopped answering during all_to_all (combine, MoE layer 0) in all_reduce (step metrics)" in message
    )
    assert "rank 1 is alive but never reached it: at step 4, outside any collective" in message
    assert "the collective itself never gave up" in message
    assert exits1.done.wait(5)  # and the stalled rank stops too
    w0.stop(), w1.stop()


def test_a_span_that_also_computes_is_not_timed():
    store = torch.distributed.HashStore()
    w0, exits0, _ = _watchdog(0, 2, store, timeout_s=0.2)
    with w0.collective("backward (gradient all_reduce)", timed=False):
        time.sleep(2.0)  # timeout + grace passed: a long backward is not a hang
    assert exits0.codes == []
    w0.stop()


def test_other_errors_pass_through_untouched():
    store = torch.distributed.HashStore()
    w0, exits0, _ = _watchdog(0, 2, store)
    with pytest.raises(ValueError, match="a bug"), w0.collective("all_reduce (step metrics)"):
        raise ValueError("a bug")
    with pytest.raises(RuntimeError, match="shape"), w0.collective("all_reduce (step metrics)"):
        raise RuntimeError("shape mismatch")
    assert exits0.codes == []
    w0.stop()


def test_a_store_that_is_gone_names_rank_0():
    class GoneStore:
        """Rank 0's store, until rank 0 stops."""

        def __init__(self):
            self.store, self.gone = torch.distributed.HashStore(), False

        def __getattr__(self, name):
            if self.gone:
                raise ConnectionRefusedError("store is gone")
            return getattr(self.store, name)

    store = GoneStore()
    w1, exits1, out1 = _watchdog(1, 2, store)
    store.gone = True
    w1.step = 2
    with pytest.raises(RuntimeError), w1.collective("all_reduce (agreement of all ranks)"):
        raise RuntimeError(GLOO_RESET)
    assert exits1.codes == [EXIT_CODE]
    assert "rank 0 of 2 stopped answering during all_reduce (agreement of all ranks) at step 2" in out1.getvalue()
    assert "rendezvous store does not answer" in out1.getvalue()
    w1.stop()


def test_one_process_has_nothing_to_watch():
    w, exits, _ = _watchdog(0, 1, None)
    with pytest.raises(RuntimeError), w.collective("all_reduce (step metrics)"):
        raise RuntimeError(GLOO_RESET)
    assert exits.codes == [] and w._thread is None


def test_the_fault_test_aid_is_parsed_and_fires_once(tmp_path, monkeypatch):
    assert Fault.parse("1:3:all_to_all:kill") == Fault(1, 3, "all_to_all", "kill")
    assert Fault.parse("0:2:all_reduce:sleep=4.5") == Fault(0, 2, "all_reduce", "sleep", 4.5)
    for bad in ("1:3:all_to_all", "x:3:a:kill", "1:3:a:nap=2", "1:3:a:sleep=0", "1:3::kill"):
        with pytest.raises(ValueError, match="RANK:STEP:OP"):
            Fault.parse(bad)
    marker = tmp_path / "fired"
    monkeypatch.setenv(wd.FAULT_ENV, "0:1:all_reduce:sleep=0.01")
    monkeypatch.setenv(wd.FAULT_MARKER_ENV, str(marker))
    w, _, _ = _watchdog(0, 2, torch.distributed.HashStore())
    w.step = 1
    with w.collective("all_reduce (step metrics)"):
        pass
    assert marker.exists() and w.fault is None
    assert wd.fault_from_env() is None  # a restarted job runs clean
    w.stop()


# --- gloo processes: the process groups and a sharded MoE layer --------------------------------


def _timeout_worker(rank, world):
    import torch.distributed as dist

    from dynamoe.training.deepspeed_setup import apply_collective_timeout

    group = dist.new_group(list(range(world)))  # created with torch's 30-minute default
    assert apply_collective_timeout(2.0) == 2
    if rank == 1:
        time.sleep(5)  # never joins; stays alive so that rank 0 must time out, not lose a peer
        return None
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError as err:
        return time.monotonic() - started, str(err)
    return None


@pytest.mark.distributed
def test_every_process_group_gets_the_timeout():
    waited, error = run_workers(_timeout_worker, 2, timeout=60)[0]
    assert "Timed out" in error
    assert 1.5 <= waited <= 6


def _layer_worker(rank, world, port, timeout_s, fault, log):
    """A sharded MoE layer trained for 6 steps, with the watchdog as the trainer sets it up."""
    from datetime import timedelta

    import torch.distributed as dist

    from dynamoe.config import MoEConfig, RouterConfig
    from dynamoe.layers.expert_parallel import shard_experts, watch_all_to_alls
    from dynamoe.layers.moe_layer import MoELayer
    from dynamoe.training.deepspeed_setup import apply_collective_timeout
    from dynamoe.training.watchdog import start_watchdog

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ[wd.FAULT_ENV] = fault
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, d_expert=16, router=RouterConfig(top_k=2)), d_model=8)
    shard_experts(layer, dist.new_group(list(range(world))), "ep", None)
    apply_collective_timeout(timeout_s)
    watchdog = start_watchdog(timeout_s)
    watch_all_to_alls(layer, watchdog)
    for step in range(1, 7):
        watchdog.step = step
        y, _ = layer(torch.randn(16, 8))
        with watchdog.collective("backward (gradient all_reduce)", timed=False):
            y.square().sum().backward()
    with watchdog.collective("all_reduce (agreement of all ranks)"):
        dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()


def _run_layer(tmp_path, world, timeout_s, fault, deadline=90):
    """Start the workers; returns (exit codes, logs, seconds from the first exit to the last)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = [
        ctx.Process(target=_layer_worker, args=(r, world, port, timeout_s, fault, str(logs[r]))) for r in range(world)
    ]
    for p in procs:
        p.start()
    ended = {}
    start = time.monotonic()
    while len(ended) < world and time.monotonic() - start < deadline:
        for r, p in enumerate(procs):
            if r not in ended and p.exitcode is not None:
                ended[r] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    assert len(ended) == world, f"ranks {sorted(set(range(world)) - set(ended))} never stopped (a hang)"
    return [p.exitcode for p in procs], [log.read_text() for log in logs], ended


@pytest.mark.distributed
def test_a_rank_killed_inside_the_all_to_all_stops_the_other_with_its_name(tmp_path):
    codes, logs, ended = _run_layer(tmp_path, 2, timeout_s=5.0, fault="1:3:all_to_all (dispatch,:kill")
    assert codes == [EXIT_CODE, -9]
    assert ended[0] - ended[1] <= 5.0 + 30
    assert "rank 1 of 2 stopped answering during all_to_all (dispatch, MoE layer 0) at step 3" in logs[0], logs[0]


@pytest.mark.distributed
def test_a_rank_sleeping_past_the_timeout_is_named_and_both_stop(tmp_path):
    codes, logs, ended = _run_layer(tmp_path, 2, timeout_s=3.0, fault="1:4:all_to_all (combine:sleep=60")
    assert codes == [EXIT_CODE, EXIT_CODE]  # the sleeper stops too, long before its sleep ends
    assert "rank 1 of 2 stopped answering during all_to_all (combine, MoE layer 0) at step 4" in logs[0], logs[0]
    assert "rank 1 is alive but never reached it: at step 4, outside any collective" in logs[0]
    assert "Timed out waiting 3000ms" in logs[0]  # gloo gave up at the timeout
    assert "reported by rank 0" in logs[1], logs[1]


# --- `moe train` on gloo processes ------------------------------------------------------------


def _train(tmp_path, world, fault, timeout_s, deadline=240):
    """`moe train debug_tiny` as ``world`` processes joined by env:// (no torchrun, whose agent
    would stop the others itself); returns (exit codes, stderr by rank, exit times by rank)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **clean_env(),
            "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            wd.FAULT_ENV: fault,
        }
        cmd = [sys.executable, "-m", "dynamoe.launch.cli", "train", "debug_tiny", "--quiet"]
        cmd += ["--run-dir", str(tmp_path / "run"), "--set", f"parallel.ep_size={world}"]
        cmd += ["--set", f"parallel.collective_timeout_s={timeout_s}", "--set", "train.batch_size=2"]
        cmd += ["--set", "train.steps=6", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]
        err = open(tmp_path / f"rank{rank}.err", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err), err))
    ended = {}
    start = time.monotonic()
    while len(ended) < world and time.monotonic() - start < deadline:
        for r, (p, _) in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.monotonic()
        time.sleep(0.1)
    for p, err in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        err.close()
    assert len(ended) == world, f"ranks {sorted(set(range(world)) - set(ended))} never stopped (a hang)"
    logs = [(tmp_path / f"rank{r}.err").read_text() for r in range(world)]
    return [p.returncode for p, _ in procs], logs, ended


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world, victim", [(2, 1), (4, 2)])
def test_training_stops_on_every_rank_when_one_dies_in_the_all_to_all(tmp_path, world, victim):
    timeout_s = 10
    codes, logs, ended = _train(tmp_path, world, f"{victim}:3:all_to_all (dispatch,:kill", timeout_s)
    for rank in range(world):
        if rank == victim:
            assert codes[rank] == -9
            continue
        assert codes[rank] == EXIT_CODE, logs[rank][-3000:]
        assert ended[rank] - ended[victim] <= timeout_s + 30
        assert (
            f"rank {victim} of {world} stopped answering during all_to_all (dispatch, MoE layer 0, block 0) "
            "at step 3" in logs[rank]
        ), logs[rank][-3000:]
        assert "Traceback" not in logs[rank]


@pytest.mark.distributed
@pytest.mark.slow
def test_training_stops_when_a_rank_sleeps_past_the_timeout(tmp_path):
    timeout_s = 5
    codes, logs, ended = _train(tmp_path, 2, "1:3:all_reduce (step metrics:sleep=120", timeout_s)
    assert codes == [EXIT_CODE, EXIT_CODE], logs
    assert "rank 1 of 2 stopped answering during all_reduce (step metrics) at step 3" in logs[0], logs[0][-3000:]
    assert "rank 1 is alive but never reached it: at step 3, outside any collective" in logs[0]
    assert f"rank 0 waited {timeout_s}." in logs[0]  # gloo's own timeout, from parallel.collective_timeout_s
    assert "reported by rank 0" in logs[1], logs[1][-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_moe_launch_restarts_a_job_the_watchdog_stopped_from_its_last_checkpoint(tmp_path):
    """A Ray worker stalls past the timeout in step 6: the other stops with the diagnosis, and Ray
    Train restarts the group from the step-4 checkpoint; the job then finishes all 8 steps."""
    from dist_helper import train_metrics

    run, marker = tmp_path / "run", tmp_path / "fault_fired"
    env = {
        **clean_env(),
        "PYTHONPATH": str(REPO),
        "RAY_DEDUP_LOGS": "0",
        # Workers of the embedded local cluster inherit this environment.
        wd.FAULT_ENV: "1:6:all_to_all (dispatch,:sleep=300",
        wd.FAULT_MARKER_ENV: str(marker),
    }
    cmd = [sys.executable, "-m", "dynamoe.launch.cli", "launch", "debug_tiny", "--workers", "2", "--ep-size", "2"]
    cmd += ["--run-dir", str(run), "--quiet", "--set", "train.log_every=1", "--set", "launch.max_failures=1"]
    cmd += ["--set", "parallel.collective_timeout_s=10"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-4000:]
    assert marker.exists()  # the stall did happen, once
    log = out.stdout + out.stderr
    assert "rank 1 of 2 stopped answering during all_to_all (dispatch, MoE layer 0, block 0) at step 6" in log
    assert sorted(train_metrics(run)) == list(range(1, 9))  # none lost, none counted twice
    assert sorted(p.name for p in (run / "ray" / "train").glob("step_*")) == ["step_00000004", "step_00000008"]
