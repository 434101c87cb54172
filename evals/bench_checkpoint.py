"""Checkpoint save and load per rank: wall time and peak extra host memory, the full format (every
tensor gathered to rank 0, which writes) against the sharded one (every rank writes what it owns).

Each of N gloo processes (CPU) builds the trainer for the config, takes one optimizer step (so Adam
moments exist), then saves and loads a checkpoint in each format: full, sharded, and sharded with
the asynchronous save (``blocks s``: how long the save holds training up; ``save s``: until the
checkpoint is committed). Memory is the process's peak resident set during the call minus its
resident set just before (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``, read from
``/proc/self/status``): it counts every allocation the call touches, torch's and Python's,
including safetensors' serialisation buffers (the heap's free pages are handed back to the OS
first, so memory freed by an earlier call is counted again). Times are each rank's own (every call
is collective, so they differ little): the save with the median total time of ``--repeat`` runs
(and its blocking part), the median load; peaks are the largest.

    moe bench checkpoint --procs 2 4 --json runs/bench/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# A model whose expert weights dominate, as in the MoE models this is for: 4 MoE layers of 8
# experts, 17.9 M parameters (16.8 M in experts), 204 MiB of fp32 weights and Adam moments.
MODEL = [
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.d_ff=1024",
    "model.moe.num_experts=8",
    "model.moe.d_expert=1024",
    "data.seq_len=32",
    "train.batch_size=2",
    "train.eval_every=0",
    "train.steps=2",
    "train.warmup_steps=1",
]


MODES = ("full", "sharded", "sharded+async")
FULL_FILES = ("model.safetensors", "optimizer.safetensors")


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): the trainer keeps freed
    blocks for reuse (``cpu_runtime.keep_large_allocations``), and an allocation served from them
    would not raise the resident set, hiding it from the measurement."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is not None:
        ctypes.CDLL(name).malloc_trim(0)


def measure(fn):
    """(fn's result, wall seconds, peak extra resident bytes while it ran)."""
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, max(0, _status("VmHWM") - before)


def owned_bytes(folder: Path, rank: int) -> int:
    """Bytes of tensor data rank ``rank`` wrote into a sharded checkpoint (its file's size)."""
    from dynamoe.training.checkpoint_files import rank_file

    return (Path(folder) / rank_file(rank)).stat().st_size


def _worker(rank: int, world: int, port: int, overrides: list, out_dir: str, ep_size: int, repeat: int, results):
    os.environ.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        results.put((rank, "ok", bench_rank(overrides, out_dir, ep_size, repeat)))
    except BaseException:  # the parent reports it
        import traceback

        results.put((rank, "error", traceback.format_exc()))


def bench_rank(overrides: list, out_dir: str, ep_size: int, repeat: int = 1) -> list[dict]:
    """This rank's rows, one per format: the median times and the largest peaks over ``repeat``
    saves and loads (collective; every rank calls it)."""
    import statistics

    import torch
    import torch.distributed as dist

    from dynamoe.config import load_config
    from dynamoe.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config("debug_tiny", [*MODEL, *overrides, f"parallel.ep_size={ep_size}"])
    trainer = Trainer(cfg, run_dir=out_dir, progress=False)
    trainer.train_step(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    step = 0
    for mode in MODES:
        fmt, background = mode.split("+")[0], mode.endswith("+async")
        trainer.cfg.train.checkpoint_format = fmt
        trainer.cfg.train.async_checkpoint = background
        samples = []
        for _ in range(repeat):
            step += 1
            marks = []

            def save(s=step, marks=marks):
                marks.append(time.perf_counter())
                trainer.save(s)
                marks.append(time.perf_counter())  # training would go on from here
                trainer.finish_checkpoint()
                marks.append(time.perf_counter())

            dist.barrier()
            _, _, save_mem = measure(save)
            dist.barrier()
            folder = Path(out_dir) / "checkpoints" / f"step_{step:08d}"
            _, load_s, load_mem = measure(lambda f=folder: trainer._resume(f))
            samples.append((marks[1] - marks[0], marks[2] - marks[0], save_mem, load_s, load_mem))
        if fmt == "sharded":
            written = owned_bytes(folder, rank)
        else:
            written = sum((folder / n).stat().st_size for n in FULL_FILES) if rank == 0 else 0
        # Times of the save with the median total (its blocking part from the same save).
        blocking, total = sorted((s[1], s[0]) for s in samples)[len(samples) // 2][::-1]
        rows.append(
            {
                "format": mode,
                "procs": world,
                "ep_size": ep_size,
                "rank": rank,
                "repeats": repeat,
                "save_blocking_s": blocking,
                "save_s": total,
                "save_peak_extra_bytes": max(s[2] for s in samples),
                "load_s": statistics.median(s[3] for s in samples),
                "load_peak_extra_bytes": max(s[4] for s in samples),
                "written_bytes": written,
            }
        )
    return rows


def run(procs: int, ep_size: int, overrides: list, out_dir: Path, repeat: int = 1) -> list[dict]:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(r, procs, port, overrides, str(out_dir), ep_size, repeat, results))
        for r in range(procs)
    ]
    for w in workers:
        w.start()
    rows = []
    try:
        for _ in range(procs):
            rank, status, value = results.get(timeout=900)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            rows += value
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    return sorted(rows, key=lambda r: (r["procs"], r["format"], r["rank"]))


def format_table(rows: list[dict]) -> str:
    mib = 1 << 20
    lines = [
        f"{'procs':>5} {'format':>13} {'rank':>4} {'written MiB':>11} {'blocks s':>8} {'save s':>7} "
        f"{'save peak MiB':>13} {'load s':>7} {'load peak MiB':>13}"
    ]
    for r in rows:
        lines.append(
            f"{r['procs']:>5} {r['format']:>13} {r['rank']:>4} {r['written_bytes'] / mib:>11.1f} "
            f"{r['save_blocking_s']:>8.2f} {r['save_s']:>7.2f} {r['save_peak_extra_bytes'] / mib:>13.1f} "
            f"{r['load_s']:>7.2f} {r['load_peak_extra_bytes'] / mib:>13.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moe bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="process counts (ep_size = procs)")
    p.add_argument("--set", action="append", default=[], metavar="A.B=C", help="config overrides")
    p.add_argument("--repeat", type=int, default=3, help="saves and loads per format (median time, largest peak)")
    p.add_argument("--out", default="runs/bench/checkpoint", help="run folders of the measurements")
    p.add_argument("--json", default="runs/bench/checkpoint.json")
    args = p.parse_args(argv)
    rows = []
    for n in args.procs:
        out = Path(args.out) / f"procs{n}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        rows += run(n, n, args.set, out, args.repeat)
    import platform

    print(format_table(rows))
    report = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "model": MODEL + args.set,
        "memory": "peak resident set during the call minus the resident set before it (VmHWM, VmRSS)",
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
