"""The memory plan against real training runs on this machine (`moe plan`'s check).

    python -m dynamoe.evals.plan_check [--steps 4] [--json runs/bench/plan_check.json]

Runs `moe train` (one process; two under torchrun for ep_size 2) at two model sizes and ep_size 1
and 2, reads each run's measured peak memory (``peak_memory_mib`` in metrics.jsonl: VmHWM on CPU,
of rank 0), subtracts the peak of the same pipeline with a negligible model (the runtime: Python,
PyTorch, DeepSpeed, the data), and compares what is left with the plan's total less its runtime
term. The plan counts the busiest rank's expert rows (``routing="worst"``): these runs' routers
send every token to the same two experts within their first steps (the logged max/mean expert
load reaches E / k = 4), and in some step rank 0 receives every row of the group; the plan with
uniform routing is printed beside it. Prints a table and writes JSON; the target is every row
within 15%.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dynamoe.evals.report import hardware_info, write_json

SIZES = {  # quickstart's shape, wider: model states and activations both well above the runtime's noise
    "d256": ["model.d_model=256", "model.d_ff=1024", "model.moe.d_expert=512", "train.batch_size=16"],
    "d512": ["model.d_model=512", "model.d_ff=2048", "model.moe.d_expert=1024", "train.batch_size=16"],
}
TINY = [  # the baseline: the same pipeline, a model of a few thousand parameters
    "model.d_model=8",
    "model.n_heads=1",
    "model.n_layers=1",
    "model.moe_every=1",
    "model.d_ff=8",
    "model.moe.d_expert=8",
    "model.moe.num_experts=2",
    "train.batch_size=1",
    "data.seq_len=8",
    "model.max_seq_len=8",
]
TOLERANCE = 0.15


def _train(config: str, sets: list[str], nproc: int, steps: int, run_dir: Path) -> float:
    """Peak memory (MiB, rank 0) of a short `moe train` run."""
    return _train_run(config, sets, nproc, steps, run_dir)[0]


def _train_run(config: str, sets: list[str], nproc: int, steps: int, run_dir: Path) -> tuple[float, float]:
    """(peak memory in MiB of rank 0, the largest max/mean expert load any MoE layer logged)."""
    common = [
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        "train.warmup_steps=1",
    ]
    args = ["train", config, "--run-dir", str(run_dir), "--quiet"]
    for s in common + sets:
        args += ["--set", s]
    if nproc == 1:
        cmd = [sys.executable, "-m", "dynamoe", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "dynamoe.launch.cli", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    from dynamoe.training.metrics import read_metrics

    records = read_metrics(run_dir, "train")
    peaks = [r["peak_memory_mib"] for r in records if r.get("peak_memory_mib")]
    loads = [v for r in records for key, v in r.items() if key.endswith("_max_over_mean") and v is not None]
    return max(peaks), max(loads, default=float("nan"))


def planned_mib(config: str, sets: list[str], world: int, routing: str = "worst") -> tuple[float, dict]:
    """The plan's per-rank total less its runtime term, for a CPU run of ``world`` processes."""
    from dynamoe.config import load_config
    from dynamoe.training.memory_plan import plan

    p = plan(load_config(config, sets), world, device="cpu", available_bytes=0, routing=routing)
    b = p.configured
    mode = p.checkpointing
    parts = {
        "model_states": b.model_states / 2**20,
        "activations": b.activations[mode] / 2**20,
        "recompute": b.recompute[mode] / 2**20,
        "workspace": b.workspace / 2**20,
        "grad_norm_buffers": b.grad_norm_buffers / 2**20,
        "uneven_routing": (b.uneven_routing[mode] if routing == "worst" else 0) / 2**20,
    }
    return (p.total - b.runtime_overhead) / 2**20, parts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--ep-sizes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--json", default="runs/bench/plan_check.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan_check_") as tmp:
        baseline = {}
        for ep in args.ep_sizes:
            sets = TINY + [f"parallel.ep_size={ep}"]
            baseline[ep] = _train(args.config, sets, ep, args.steps, Path(tmp) / f"baseline_ep{ep}")
        for size in args.sizes:
            for ep in args.ep_sizes:
                sets = SIZES[size] + [f"parallel.ep_size={ep}"]
                peak, load = _train_run(args.config, sets, ep, args.steps, Path(tmp) / f"{size}_ep{ep}")
                planned, parts = planned_mib(args.config, sets, ep)
                uniform, _ = planned_mib(args.config, sets, ep, routing="uniform")
                measured = peak - baseline[ep]
                rows.append(
                    {
                        "size": size,
                        "ep_size": ep,
                        "processes": ep,
                        "peak_mib": peak,
                        "baseline_mib": baseline[ep],
                        "measured_mib": measured,
                        "planned_mib": planned,
                        "error": planned / measured - 1,
                        "planned_uniform_mib": uniform,
                        "error_uniform": uniform / measured - 1,
                        "max_over_mean_load": load,
                        "planned_parts_mib": parts,
                    }
                )
    print(
        f"{args.config}: {args.steps} steps per run; measured = peak VmHWM of rank 0 - the same run's with a tiny model"
    )
    print("planned: the busiest rank's expert rows; uniform: the plan with uniform routing; load: max/mean expert load")
    print(
        f"{'size':>5} {'ep':>3} {'peak MiB':>9} {'base MiB':>9} {'measured':>9} {'planned':>9} {'error':>7} "
        f"{'uniform':>9} {'error':>7} {'load':>5}"
    )
    for r in rows:
        flag = "" if abs(r["error"]) <= TOLERANCE else "  (outside 15%)"
        print(
            f"{r['size']:>5} {r['ep_size']:>3} {r['peak_mib']:>9.1f} {r['baseline_mib']:>9.1f} "
            f"{r['measured_mib']:>9.1f} {r['planned_mib']:>9.1f} {100 * r['error']:>+6.1f}% "
            f"{r['planned_uniform_mib']:>9.1f} {100 * r['error_uniform']:>+6.1f}% {r['max_over_mean_load']:>5.2f}{flag}"
        )
    result = {"config": args.config, "steps": args.steps, "rows": rows, "hardware": hardware_info()}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
