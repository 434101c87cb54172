"""Training throughput and peak memory: fp32 against bf16, activation checkpointing off and on.

    moe bench throughput [--models quickstart 100m] [--steps N] [--json PATH]

Each cell is a short `moe train` run in a fresh process (one process, ZeRO 1 for both precisions,
so that only the precision differs): tokens/s over the steps after the first logging window (the
first steps pay for lazy initialisation), and the run's peak memory as the trainer logs it (CUDA
max allocated on a GPU; on a CPU the process's peak resident memory, which includes the runtime
of about half a GiB). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dynamoe.evals.report import hardware_info, write_json

MODELS = {
    # The quickstart model as shipped: 1.6M parameters, 128 tokens x 32 sequences per step.
    "quickstart": ("quickstart", [], 24),
    # About 100M parameters: 8 layers of width 768, MoE (8 experts of 1280, top-2) in every other.
    "100m": (
        "quickstart",
        [
            "model.d_model=768",
            "model.n_heads=12",
            "model.n_layers=8",
            "model.d_ff=3072",
            "model.moe.d_expert=1280",
            "train.batch_size=8",
        ],
        8,
    ),
}  # name -> (config, overrides, default steps)
PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("none", "blocks")


def run_cell(config: str, sets: list[str], steps: int, log_every: int, run_dir: Path) -> dict:
    from dynamoe.training.metrics import read_metrics

    common = [
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        "train.warmup_steps=1",
        "parallel.zero_stage=1",
    ]
    args = [sys.executable, "-m", "dynamoe", "train", config, "--run-dir", str(run_dir), "--quiet"]
    for s in common + sets:
        args += ["--set", s]
    out = subprocess.run(args, env={**os.environ}, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    rows = read_metrics(run_dir, "train")
    steady = rows[1:] or rows  # the first window pays for start-up
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] * log_every for r in steady)
    seconds = sum(r["step_time_s"] * log_every for r in steady)
    return {
        "tokens_per_s": tokens / seconds,
        "step_time_s": seconds / (log_every * len(steady)),
        "peak_memory_mib": max(r["peak_memory_mib"] for r in rows),
        "final_train_loss": rows[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["quickstart", "100m"], choices=list(MODELS))
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 24 quickstart, 8 100m)")
    p.add_argument("--json", default="runs/bench/throughput.json")
    args = p.parse_args(argv)
    from dynamoe.config import load_config
    from dynamoe.training.preflight import count_parameters

    rows = []
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        for model in args.models:
            config, sets, default_steps = MODELS[model]
            steps = args.steps or default_steps
            log_every = max(1, steps // 4)
            cfg = load_config(config, sets + ["model.vocab_size=65"])
            params, _ = count_parameters(cfg.model)
            tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
            for precision in PRECISIONS:
                for mode in CHECKPOINTING:
                    cell = sets + [f"train.precision={precision}", f"train.activation_checkpointing={mode}"]
                    folder = Path(tmp) / f"{model}_{precision}_{mode}"
                    result = run_cell(config, cell, steps, log_every, folder)
                    rows.append(
                        {
                            "model": model,
                            "parameters": params,
                            "tokens_per_step": tokens_per_step,
                            "steps": steps,
                            "precision": precision,
                            "activation_checkpointing": mode,
                            **result,
                        }
                    )
                    print(f"  {model} {precision} {mode}: {result['tokens_per_s']:.0f} tokens/s", flush=True)
    print("\none process, ZeRO 1; tokens/s over the steps after the first logging window (a quarter of the run)")
    header = f"{'model':>10} {'params':>8} {'precision':>9} {'ckpt':>6} {'tokens/s':>9} {'step s':>7} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:>10} {r['parameters'] / 1e6:>7.1f}M {r['precision']:>9} {r['activation_checkpointing']:>6} "
            f"{r['tokens_per_s']:>9.0f} {r['step_time_s']:>7.3f} {r['peak_memory_mib']:>9.0f}"
        )
    result = {"rows": rows, "hardware": hardware_info()}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
