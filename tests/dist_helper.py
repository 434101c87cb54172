"""One spawn helper for multi-process tests: N gloo processes on this machine, with a deadline.

A hang (a collective waiting for a peer that never comes) fails the test at the deadline instead
of stalling the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from datetime import timedelta

# `moe train` settings under which runs with 1, 2 and 4 processes must agree step for step: router
# losses are means over each process's own tokens, so they change with the number of processes and
# are off; every step is logged and nothing is evaluated.
SAME_AT_ANY_WORLD_SIZE = [
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.keep_checkpoints=5",
    "--set",
    "model.moe.router.aux_loss_coef=0",
    "--set",
    "model.moe.router.z_loss_coef=0",
]

RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def clean_env() -> dict:
    """This process's environment without the rendezvous variables that an in-process training
    test may have set: a child process must not try to join (or bind) this process's group."""
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(value) -> bytes:
    """Tensors put on a queue as they are travel as shared-memory file descriptors that the parent
    fetches from this process later; a worker that has exited by then leaves the parent a dangling
    socket (FileNotFoundError). Plain bytes are copied into the pipe before the worker exits."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world: int, port: int, fn, kwargs: dict, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        results.put((rank, "ok", _to_bytes(fn(rank, world, **kwargs))))
    except BaseException:  # report every failure, including assertion errors, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world: int, timeout: float = 120, **kwargs) -> list:
    """Run ``fn(rank, world, **kwargs)`` in ``world`` processes; returns the results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, kwargs, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = _from_bytes(value)
    except mp.queues.Empty:
        raise AssertionError(f"workers did not finish within {timeout} s (a hang?); finished: {sorted(out)}") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


def torchrun_train(nproc: int, *args: str, timeout: float = 300) -> None:
    """``moe train ARGS`` under torchrun with ``nproc`` CPU processes; fails the test on error."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**clean_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dynamoe.launch.cli",
        "train",
        *args,
        "--quiet",
    ]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} with {nproc} processes failed:\n{out.stderr[-4000:]}"


def train_metrics(run_dir, split: str = "train", key: str = "loss") -> dict:
    from dynamoe.training.metrics import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run_dir, split)}
