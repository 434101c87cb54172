"""Conditional depth against the dense model: mixture-of-depths and ACT on Tiny Shakespeare at
equal training FLOPs, and the digits CNN with gated block skipping at several target rates.

    python -m dynamoe.evals.conditional_depth [--lm-steps 600] [--cnn-steps 400] [--rates 0.25 0.5 0.75 1.0]
                                      [--threads 1] [--json PATH] [--quick]

(a) Language modelling: configs shakespeare_dense, shakespeare_mod (capacity 0.5 in every other
    layer) and shakespeare_act. Equal training FLOPs: the dense model trains ``--lm-steps`` steps;
    a conditional model trains steps_dense * F_dense / F_model steps, where F is the forward FLOPs
    per token of the blocks as the model reports them (``ModelOutput.depth``) on its first training
    step (training FLOPs are taken as 3x forward: backward costs twice the forward of what ran).
    The table gives the training FLOPs each run really used (the sum of its steps' reported
    FLOPs); when they miss the dense run's by more than ``--flops-tolerance`` (ACT learns to halt
    earlier, so its compute drifts), the model is trained again from scratch with its steps scaled
    by the miss, and the first attempt is kept in the JSON. Validation: loss and
    block FLOPs per token in inference; for MoD also the causal decoding rule (predictor > 0
    instead of top-C), its loss, and how often it agrees with top-C.
(b) Digits CNN (configs digits_cnn_skip): one run per target execution rate; validation accuracy
    against the share of blocks executed (of all blocks, and of the gated ones), FLOPs against the
    plain network, and inference wall time with compaction against running every sample.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dynamoe.config import load_config
from dynamoe.depth import depth_summary
from dynamoe.evals.report import hardware_info, write_json


def _trainer(config: str, overrides: list[str], run_dir: Path):
    from dynamoe.training.trainer import Trainer

    cfg = load_config(config, overrides)
    return Trainer(cfg, run_dir=str(run_dir), progress=False)


def _forward_flops_per_token(trainer, step: int) -> float:
    """Block FLOPs per token of the model's forward on training batch ``step`` (training mode)."""
    batch = trainer._micro_batch(step, 0)
    trainer.model.train()
    with torch.no_grad():
        out = trainer.model(**batch)
    return depth_summary(out.depth)["flops_per_row"]


def train_lm(name: str, config: str, steps: int, common: list[str], out_dir: Path) -> dict:
    trainer = _trainer(
        config, common + [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}"], out_dir / name
    )
    dense_mode = not trainer.cfg.model.depth.enabled
    train_flops, start = 0.0, time.perf_counter()
    tokens_per_step = trainer.cfg.train.batch_size * trainer.cfg.data.seq_len
    # The plain model's compute does not change from step to step: measure it once, up front.
    per_token = _forward_flops_per_token(trainer, 0) if dense_mode else 0.0
    for step in range(steps):
        row = trainer.train_step(step)
        if not dense_mode:
            per_token = row["depth_flops_per_token"]
        train_flops += 3 * per_token * tokens_per_step
    wall = time.perf_counter() - start
    final = trainer.evaluate()
    result = {
        "name": name,
        "config": config,
        "steps": steps,
        "train_wall_s": wall,
        "train_flops": train_flops,
        "train_flops_per_token_step": train_flops / (3 * steps * tokens_per_step),
        "val_loss": final["loss"],
        "train_loss_last": row["loss"],
    }
    result.update(_lm_inference_compute(trainer))
    return result


@torch.no_grad()
def _lm_inference_compute(trainer) -> dict:
    """Validation block FLOPs per token (top-C for MoD), and for MoD the causal decoding rule."""
    model, t = trainer.model.eval(), trainer.cfg.train
    sums = {
        "flops": 0.0,
        "full": 0.0,
        "tokens": 0.0,
        "causal_loss": 0.0,
        "causal_flops": 0.0,
        "agree": 0.0,
        "routed": 0.0,
        "n": 0,
        "routed_layers": 0,
    }
    mod = trainer.cfg.model.depth.mode == "mod"
    for batch in trainer.data.eval_batches(t.eval_batches, t.batch_size):
        out = model(batch["input_ids"], labels=batch["labels"])
        summary = depth_summary(out.depth)
        sums["flops"] += summary["flops"]
        sums["full"] += summary["full_flops"]
        sums["tokens"] += batch["input_ids"].numel()
        sums["n"] += 1
        if mod:
            causal = model(batch["input_ids"], labels=batch["labels"], mod_rule="causal")
            sums["causal_loss"] += float(causal.loss)
            sums["causal_flops"] += depth_summary(causal.depth)["flops"]
            routed = [r for r in causal.depth if "routed_fraction" in r.stats]
            sums["agree"] += sum(float(r.stats["predictor_agreement"]) for r in routed)
            sums["routed"] += sum(float(r.stats["routed_fraction"]) for r in routed)
            sums["routed_layers"] += len(routed)
    result = {
        "val_flops_per_token": sums["flops"] / sums["tokens"],
        "val_compute_fraction": sums["flops"] / sums["full"],
    }
    if mod:
        k = max(sums["routed_layers"], 1)
        result.update(
            {
                "causal_val_loss": sums["causal_loss"] / sums["n"],
                "causal_flops_per_token": sums["causal_flops"] / sums["tokens"],
                "causal_agreement_with_top_c": sums["agree"] / k,
                "causal_routed_fraction": sums["routed"] / k,
            }
        )
    return result


def run_lm(args, out_dir: Path) -> list[dict]:
    common = [
        f"train.threads={args.threads}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        f"train.eval_batches={args.eval_batches}",
        "train.log_every=1000000",
    ]
    rows = [train_lm("dense", "shakespeare_dense", args.lm_steps, common, out_dir)]
    dense_per_token = rows[0]["train_flops_per_token_step"]
    for name, config in (("mod_50", "shakespeare_mod"), ("act", "shakespeare_act")):
        probe = _trainer(config, common + ["train.steps=10", "train.warmup_steps=1"], out_dir / f"{name}_probe")
        per_token = _forward_flops_per_token(probe, 0)
        steps = max(1, round(args.lm_steps * dense_per_token / per_token))
        row = train_lm(name, config, steps, common, out_dir)
        # A model whose compute drifts while it learns (ACT learns to halt earlier) misses the budget
        # the first-step estimate set; one rerun with the steps scaled by the miss corrects it.
        ratio = row["train_flops"] / rows[0]["train_flops"]
        if abs(ratio - 1) > args.flops_tolerance:
            first = {"steps": row["steps"], "train_flops_vs_dense": ratio, "val_loss": row["val_loss"]}
            row = train_lm(name, config, max(1, round(steps / ratio)), common, out_dir / "rerun")
            row["first_attempt"] = first
        rows.append(row)
    for r in rows:
        r["train_flops_vs_dense"] = r["train_flops"] / rows[0]["train_flops"]
        r["val_flops_vs_dense"] = r["val_flops_per_token"] / rows[0]["val_flops_per_token"]
    return rows


@torch.no_grad()
def _cnn_eval(trainer, repeats: int) -> dict:
    model = trainer.model.eval()
    val = trainer.data.split("val")
    x, labels = val["pixel_values"], val["labels"]
    out = model(x)
    summary = depth_summary(out.depth)
    gated = [r for r in out.depth if r.kind == "skip"]
    result = {
        "accuracy": float((out.logits.argmax(-1) == labels).float().mean()),
        "blocks_executed": summary["executed_fraction"],
        "gated_blocks_executed": sum(float(r.executed) for r in gated) / max(sum(float(r.rows) for r in gated), 1.0),
        "compute_fraction": summary["compute_fraction"],
    }
    times = {}
    for compact in (True, False):
        model.depth.compaction = compact
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
        times[compact] = best
    model.depth.compaction = True
    result.update(
        {"wall_s_compacted": times[True], "wall_s_every_sample": times[False], "speedup": times[False] / times[True]}
    )
    return result


def run_cnn(args, out_dir: Path) -> list[dict]:
    rows = []
    for rate in args.rates:
        overrides = [
            f"train.threads={args.threads}",
            f"train.steps={args.cnn_steps}",
            f"train.warmup_steps={max(1, args.cnn_steps // 10)}",
            f"model.depth.target_rate={rate}",
        ]
        trainer = _trainer("digits_cnn_skip", overrides, out_dir / f"cnn_rate_{rate}")
        start = time.perf_counter()
        for step in range(args.cnn_steps):
            trainer.train_step(step)
        row = {"target_rate": rate, "train_wall_s": time.perf_counter() - start}
        row.update(_cnn_eval(trainer, args.repeats))
        rows.append(row)
    return rows


def format_lm(rows: list[dict]) -> str:
    lines = [
        "| model | steps | train FLOPs vs dense | val loss | val MFLOPs/token (blocks) | vs dense | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['train_flops_vs_dense']:.3f} | {r['val_loss']:.4f} | "
            f"{r['val_flops_per_token'] / 1e6:.3f} | {r['val_flops_vs_dense']:.3f} | {r['train_wall_s']:.0f} |"
        )
    for r in rows:
        if "causal_val_loss" in r:
            lines.append("")
            lines.append(
                f"{r['name']} decoding rule (predictor > 0): val loss {r['causal_val_loss']:.4f}, "
                f"{r['causal_flops_per_token'] / 1e6:.3f} MFLOPs/token, routed {r['causal_routed_fraction']:.3f} "
                f"of tokens, agreement with top-C {r['causal_agreement_with_top_c']:.3f}"
            )
    return "\n".join(lines)


def format_cnn(rows: list[dict]) -> str:
    lines = [
        "| target rate | accuracy | blocks executed | gated blocks executed | FLOPs vs plain | compacted ms "
        "| every-sample ms | speedup |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['target_rate']:.2f} | {r['accuracy']:.4f} | {r['blocks_executed']:.3f} | "
            f"{r['gated_blocks_executed']:.3f} | {r['compute_fraction']:.3f} | {1e3 * r['wall_s_compacted']:.1f} | "
            f"{1e3 * r['wall_s_every_sample']:.1f} | {r['speedup']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-steps", type=int, default=600, help="training steps of the dense language model")
    p.add_argument("--cnn-steps", type=int, default=400)
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="skip target rates")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument(
        "--flops-tolerance",
        type=float,
        default=0.05,
        help="rerun a conditional model once with scaled steps when its training FLOPs miss the dense "
        "model's by more than this fraction",
    )
    p.add_argument("--repeats", type=int, default=5, help="timing repeats of the CNN inference (best taken)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--json", default="runs/conditional_depth/results.json")
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run (tiny step counts)")
    args = p.parse_args(argv)
    if args.quick:
        args.lm_steps, args.cnn_steps, args.rates, args.eval_batches, args.repeats = 12, 20, [0.5], 2, 1
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="conditional_depth_"))
    result = {"hardware": hardware_info(), "args": vars(args), "lm": [], "cnn": []}
    start = time.perf_counter()
    if not args.skip_lm:
        result["lm"] = run_lm(args, out_dir)
        print("Tiny Shakespeare, equal training FLOPs\n" + format_lm(result["lm"]) + "\n")
    if not args.skip_cnn:
        result["cnn"] = run_cnn(args, out_dir)
        print("Digits CNN with gated block skipping\n" + format_cnn(result["cnn"]) + "\n")
    result["total_wall_s"] = time.perf_counter() - start
    print(f"total {result['total_wall_s']:.0f} s")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
