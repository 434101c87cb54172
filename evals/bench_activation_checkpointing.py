"""Activation memory with and without activation checkpointing, for one training step.

    moe bench checkpointing [--config quickstart] [--batch-size 32] [--json PATH]

For each mode (none, moe_blocks, blocks), in a fresh process: one forward and backward of the
config's model on a batch of its data shape, reporting the bytes autograd saved for backward
(every tensor packed by ``saved_tensors_hooks``), how far the process's resident memory rose above
its level before the step (Linux's VmHWM, reset after a warm-up step), and the step time. Prints
a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dynamoe.evals.report import hardware_info, write_json

MODES = ("none", "moe_blocks", "blocks")


def measure(config: str, mode: str, batch_size: int) -> dict:
    """One step in this process (called in a child)."""
    import torch

    from dynamoe.config import load_config
    from dynamoe.models import build_model

    cfg = load_config(config)
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        import dataclasses

        model_cfg = dataclasses.replace(model_cfg, vocab_size=65)
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    model.set_activation_checkpointing(mode)
    ids = torch.randint(0, model_cfg.vocab_size, (batch_size, cfg.data.seq_len))
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    def step() -> float:
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, labels=ids)
        out.total_loss.backward()
        model.zero_grad(set_to_none=False)
        return time.perf_counter() - start

    step()  # warm-up: lazy initialisation, gradient buffers, the allocator's pools
    saved = 0
    _reset_peak_rss()
    before = _rss_kib("VmRSS")
    wall = step()
    growth = (_rss_kib("VmHWM") - before) / 1024 if before is not None else None
    return {"mode": mode, "saved_for_backward_mib": saved / 2**20, "peak_rss_growth_mib": growth, "step_s": wall}


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart", help="a shipped config name or YAML path (a decoder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", default="runs/bench/activation_checkpointing.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.config, args.child, args.batch_size)))
        return {}
    rows = []
    for mode in MODES:
        cmd = [
            sys.executable,
            "-m",
            "dynamoe.evals.bench_activation_checkpointing",
            "--config",
            args.config,
            "--batch-size",
            str(args.batch_size),
            "--child",
            mode,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"mode {mode} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{args.config}, batch {args.batch_size}: one training step per mode, each in a fresh process")
    print(f"{'mode':>11} {'saved for backward MiB':>23} {'peak RSS growth MiB':>20} {'step s':>7}")
    for r in rows:
        growth = "n/a" if r["peak_rss_growth_mib"] is None else f"{r['peak_rss_growth_mib']:.1f}"
        print(f"{r['mode']:>11} {r['saved_for_backward_mib']:>23.1f} {growth:>20} {r['step_s']:>7.3f}")
    saving = 1 - rows[-1]["saved_for_backward_mib"] / base["saved_for_backward_mib"]
    print(f"checkpointing every block keeps {100 * saving:.1f}% less for backward")
    result = {"config": args.config, "batch_size": args.batch_size, "rows": rows, "hardware": hardware_info()}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
