"""Benchmark: all-to-all traffic and step time of expert-parallel training, 1, 2 and 4 processes.

For each world size N it runs ``moe train`` under torchrun on this machine (CPU, gloo) with
``parallel.ep_size = N`` and the same GLOBAL batch (per-process batch = global / N), then reads
the run's metrics.jsonl: ``all_to_all_bytes`` (token rows sent between ranks by all ranks in a
step: dispatch and combine, forward and backward) and ``tokens_per_s`` (logged every step). The
measured bytes are printed next to the analytic expectation for uniform routing,

    bytes/step = 4 * L_moe * T * k * d * b * (P - 1) / P

(4 exchanges per MoE layer: dispatch and combine, each forward and backward; L_moe MoE layers,
T tokens per global step, top-k, d_model, b bytes per element, P = ep_size). The fraction
(P-1)/P does not need balanced experts, only that every rank's tokens pick experts from the same
distribution, since the experts' shares summed over ranks are 1 whatever the imbalance.

    python -m dynamoe.evals.bench_all_to_all [--worlds 1,2,4 --steps 12 --global-batch 32 --json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynamoe.config import load_config
from dynamoe.evals.report import hardware_info, write_json
from dynamoe.training.metrics import read_metrics

# torchrun sets these for its children; inherited ones (e.g. from a test process) would make the
# children join or bind the wrong rendezvous.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
BYTES_PER_ELEMENT = 4  # the trainer runs fp32 on CPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="All-to-all bytes and step time of expert-parallel training (CPU, torchrun)."
    )
    p.add_argument("--config", default="configs/quickstart.yaml", help="a YAML path or shipped config name")
    p.add_argument("--worlds", default="1,2,4", help="comma-separated process counts; ep_size = process count")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the medians")
    p.add_argument("--global-batch", type=int, default=32, help="sequences per step over all processes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--out-dir", default=None, help="run folders go here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per torchrun run")
    p.add_argument("--json", default="runs/bench/all_to_all_cpu.json")
    return p.parse_args(argv)


def overrides_for(args, world: int) -> list[str]:
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by world size {world}")
    return [
        f"train.steps={args.steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.warmup_steps=1",
        "train.eval_batches=1",  # the final evaluation always runs: keep it short
        f"parallel.ep_size={world}",
        f"train.batch_size={args.global_batch // world}",
        *args.set,  # last, so they win
    ]


def run_training(config: str, world: int, overrides: list[str], run_dir: Path, timeout: float) -> float:
    """``moe train`` under torchrun with ``world`` CPU processes; returns the wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        "-m",
        "dynamoe",
        "train",
        config,
        "--quiet",
        "--run-dir",
        str(run_dir),
    ]
    for assignment in overrides:
        cmd += ["--set", assignment]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{world} processes: moe train failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return wall


def expected_bytes(moe_layers: int, tokens: int, top_k: int, d_model: int, ep_size: int) -> float:
    return 4 * moe_layers * tokens * top_k * d_model * BYTES_PER_ELEMENT * (ep_size - 1) / ep_size


def measure(args, world: int, out_dir: Path) -> dict:
    overrides = overrides_for(args, world)
    cfg = load_config(args.config, overrides)  # the resolved config: validates before launching
    if cfg.task != "lm":  # classification counts unpadded tokens in tokens_per_s, but the MoE sees every position
        raise SystemExit(f"{args.config}: this benchmark needs a language-model config (every position is a token)")
    moe_layers = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers))
    tokens = args.global_batch * cfg.train.grad_accum * cfg.data.seq_len  # global tokens per optimizer step
    run_dir = out_dir / f"world{world}"
    if run_dir.exists():  # the trainer would refuse a folder with checkpoints; never mix two runs' metrics
        raise SystemExit(f"{run_dir} exists: pass another --out-dir or delete it")
    wall = run_training(args.config, world, overrides, run_dir, args.timeout)
    steady = [r for r in read_metrics(run_dir, "train") if r["step"] > args.warmup]
    if not steady:
        raise SystemExit(f"no steps after the {args.warmup} warm-up steps: raise --steps")
    a2a = [r["all_to_all_bytes"] for r in steady]
    step_ms = [1e3 * tokens / r["tokens_per_s"] for r in steady]  # log_every=1: one step per window
    measured = statistics.median(a2a)
    expected = expected_bytes(moe_layers, tokens, cfg.model.moe.router.top_k, cfg.model.d_model, world)
    return {
        "world_size": world,
        "ep_size": world,
        "batch_size_per_process": args.global_batch // world,
        "tokens_per_step": tokens,
        "moe_layers": moe_layers,
        "top_k": cfg.model.moe.router.top_k,
        "d_model": cfg.model.d_model,
        "num_experts": cfg.model.moe.num_experts,
        "a2a_bytes_per_step": measured,
        "a2a_bytes_min": min(a2a),
        "a2a_bytes_max": max(a2a),
        "a2a_bytes_per_token": measured / tokens,
        "expected_bytes_per_step": expected,
        "measured_over_expected": measured / expected if expected else None,
        "step_ms": statistics.median(step_ms),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "steps_in_median": len(steady),
        "run_wall_s": wall,
        "overrides": overrides,
        "a2a_bytes_by_step": {r["step"]: r["all_to_all_bytes"] for r in steady},
        "step_ms_by_step": {r["step"]: ms for r, ms in zip(steady, step_ms)},
    }


def _load(avg) -> str:
    return f"{avg[0]:.1f}" if avg else "?"


def format_table(rows: list[dict]) -> str:
    def mib(b):
        return f"{b / 2**20:.2f}"

    header = (
        "procs=EP",
        "tokens/step",
        "a2a MiB/step",
        "expected MiB",
        "measured/expected",
        "a2a B/token",
        "step ms",
        "tokens/s",
    )
    table = [header] + [
        (
            str(r["world_size"]),
            str(r["tokens_per_step"]),
            mib(r["a2a_bytes_per_step"]),
            mib(r["expected_bytes_per_step"]),
            f"{r['measured_over_expected']:.3f}" if r["measured_over_expected"] is not None else "-",
            f"{r['a2a_bytes_per_token']:,.0f}",
            f"{r['step_ms']:.0f}",
            f"{r['tokens_per_s']:,.0f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table)


def resolve_config(name_or_path: str) -> str:
    """An absolute path when the config is a file, else a shipped config's name."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.is_file() else name_or_path


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.config = resolve_config(args.config)
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    hardware = hardware_info()
    # Timings on a shared machine mean little without the load: record it around the runs.
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="bench_a2a_") as tmp:
        out_dir = Path(args.out_dir).resolve() if args.out_dir else Path(tmp)
        rows = []
        for world in worlds:
            rows.append(measure(args, world, out_dir))
            wall = rows[-1]["run_wall_s"]
            print(f"{world} process(es): {wall:.0f} s wall (start-up and final evaluation included)", flush=True)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    first = rows[0]
    router = load_config(args.config, args.set).model.moe.router
    if router.kind != "token_choice" or router.capacity_factor is not None:
        print("note: the expected column assumes dropless token choice (T*k rows); this router keeps fewer rows")
    print(
        f"all-to-all per training step, CPU/gloo: {Path(args.config).name}, global batch {args.global_batch} x "
        f"{first['tokens_per_step'] // args.global_batch} tokens, L_moe={first['moe_layers']} k={first['top_k']} "
        f"d={first['d_model']} E={first['num_experts']} fp32; median of steps {args.warmup + 1}..{args.steps}"
    )
    print(
        f"CPU: {hardware['cpu_model'] or hardware['machine']} ({hardware['cpu_count']} cores), "
        f"torch {hardware['torch']}, deepspeed {hardware['deepspeed']}; "
        f"1-min load average before/after: {_load(load_before)}/{_load(load_after)}"
    )
    print(format_table(rows))
    print(
        "expected = 4 * L_moe * T * k * d * 4 B * (P-1)/P (dispatch + combine, forward + backward; token rows only, "
        "the per-expert count exchanges are not counted). step ms = tokens/step / tokens/s of that step."
    )
    result = {
        "benchmark": "all_to_all_expert_parallel_cpu",
        "config": {
            "config": args.config,
            "worlds": worlds,
            "steps": args.steps,
            "warmup": args.warmup,
            "global_batch": args.global_batch,
            "extra_overrides": args.set,
            "bytes_per_element": BYTES_PER_ELEMENT,
            "launcher": "torch.distributed.run --standalone, gloo",
        },
        "formula": "4 * L_moe * T * k * d * bytes_per_element * (P-1)/P",
        "hardware": hardware,
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "rows": rows,
    }
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
