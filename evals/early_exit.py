"""Early-exit evaluation of a trained run: accuracy against compute, every policy, and the measured
wall-clock speed of batched inference with compaction against the plain network.

    python -m dynamoe.evals.early_exit RUN_DIR [--budget 0.6 --unit layers --batch-sizes 1 8 64 --json PATH]

1. Thresholds are calibrated on the run's calibration split (never the validation split) for each
   policy at ``--budget``; validation accuracy and compute are then read from one full pass.
2. Compacted inference (``dynamoe.exits.multi_exit.infer``) is run on the validation split with the chosen
   policy's thresholds; its predictions must equal the full pass's simulated decisions.
3. Speed: the validation split in dataset order, in batches of each size (each batch cut to its
   longest row), timed end to end for the plain network (every layer, final head) and for early
   exit; the best of ``--repeats`` runs. FLOPs are counted on the rows actually present.
   Efficiency = measured speedup / FLOPs speedup (1.0: every saved FLOP became saved time).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dynamoe.data import trim_padding
from dynamoe.evals.calibrate_run import load_run
from dynamoe.evals.report import hardware_info, write_json
from dynamoe.exits.calibration import calibrate, evaluate_thresholds, record_exits
from dynamoe.exits.heads import first_exit
from dynamoe.exits.multi_exit import infer, infer_full

POLICIES = ("max_prob", "entropy", "margin", "patience", "learned")


def _batches(split: dict, batch_size: int) -> list[dict]:
    n = split["labels"].shape[0]
    out = []
    for lo in range(0, n, batch_size):
        out.append(trim_padding({k: v[lo : lo + batch_size] for k, v in split.items() if k != "labels"}))
    return out


def time_inference(model, batches: list[dict], policy: str, thresholds: list[float], repeats: int) -> dict:
    """Best-of-``repeats`` wall time of the plain network and of early exit over ``batches``."""
    full_s, exit_s = [], []
    full_flops = exit_flops = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        flops = sum(infer_full(model, b) for b in batches)
        full_s.append(time.perf_counter() - start)
        full_flops = flops
        start = time.perf_counter()
        flops = sum(infer(model, b, policy, thresholds).flops for b in batches)
        exit_s.append(time.perf_counter() - start)
        exit_flops = flops
    t_full, t_exit = min(full_s), min(exit_s)
    flops_speedup = full_flops / exit_flops
    speedup = t_full / t_exit
    return {
        "full_s": t_full,
        "exit_s": t_exit,
        "flops_ratio": exit_flops / full_flops,
        "flops_speedup": flops_speedup,
        "speedup": speedup,
        "efficiency": speedup / flops_speedup,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--budget", type=float, default=0.6, help="compute budget as a fraction of the full network")
    p.add_argument("--unit", choices=["layers", "flops"], default="layers")
    p.add_argument("--policy", default=None, help="policy for the speed measurement (default: the run's)")
    p.add_argument(
        "--per-exit", action="store_true", help="per-exit thresholds after the shared one (moe calibrate --per-exit)"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's)")
    p.add_argument("--json", default=None, help="write the results here (default: RUN_DIR/early_exit_eval.json)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, data = load_run(args.run_dir)
    calib, val = data.split("calib"), data.split("val")
    calib_rec, val_rec = record_exits(model, calib), record_exits(model, val)
    full_acc = float(val_rec.correct[:, -1].float().mean())
    exit_layers = [i + 1 for i in model.exit_stages]
    print(
        f"run {args.run_dir}: exits after layers {exit_layers}; validation {val_rec.labels.numel()} samples, "
        f"calibration {calib_rec.labels.numel()} samples"
    )
    print(f"full depth validation accuracy: {full_acc:.4f}")
    print(
        "anytime (every sample at one exit): "
        + ", ".join(
            f"L{layer} {float(val_rec.correct[:, j].float().mean()):.4f}" for j, layer in enumerate(exit_layers)
        )
    )

    policies = [q for q in POLICIES if q != "learned" or val_rec.predictor is not None]
    rows = []
    print(
        f"\nbudget {args.budget:.2f} of the full network's {args.unit}, thresholds calibrated on the calibration split"
    )
    print(f"{'policy':10s} {'val acc':>8s} {'Δ vs full':>9s} {'layers':>7s} {'FLOPs':>7s}  thresholds")
    for policy in policies:
        try:
            result = calibrate(calib_rec, policy, args.budget, args.unit, per_exit=args.per_exit)
        except ValueError as err:
            print(f"{policy:10s} {err}")
            continue
        point = evaluate_thresholds(val_rec, policy, result.thresholds, "layers")
        flops_point = evaluate_thresholds(val_rec, policy, result.thresholds, "flops")
        row = {
            "policy": policy,
            "thresholds": result.thresholds,
            "val_accuracy": point.accuracy,
            "delta_points": 100 * (point.accuracy - full_acc),
            "layers_fraction": point.cost,
            "flops_fraction": flops_point.cost,
            "exit_fractions": point.exit_fractions,
            "calib_accuracy": result.accuracy,
            "calib_cost": result.cost,
            "budgeted_curve_val": [
                {
                    "threshold": q.threshold,
                    "calib_cost": q.cost,
                    **_val_point(val_rec, policy, q.threshold, len(exit_layers) - 1),
                }
                for q in result.budgeted
            ],
        }
        rows.append(row)
        print(
            f"{policy:10s} {point.accuracy:8.4f} {row['delta_points']:+8.2f}p {point.cost:7.3f} "
            f"{flops_point.cost:7.3f}  " + ", ".join(f"{t:.3f}" for t in result.thresholds)
        )

    policy = args.policy or cfg.model.exits.policy
    chosen = next((r for r in rows if r["policy"] == policy), None)
    if chosen is None:
        raise SystemExit(
            f"policy {policy!r} could not be calibrated for this run (see above); pass --policy with another"
        )
    # Compaction must decide exactly as the full pass says it would.
    sim_exit = first_exit(val_rec.scores(policy), chosen["thresholds"])
    sim_pred = val_rec.logits.argmax(-1)[torch.arange(sim_exit.numel()), sim_exit]
    got_pred, got_exit = [], []
    for batch in _batches(val, 64):
        r = infer(model, batch, policy, chosen["thresholds"])
        got_pred.append(r.predictions)
        got_exit.append(r.exit_index)
    mismatched_pred = int((torch.cat(got_pred) != sim_pred).sum())
    mismatched_exit = int((torch.cat(got_exit) != sim_exit).sum())
    print(
        f"\ncompacted inference vs full pass ({policy}): {mismatched_pred} predictions and "
        f"{mismatched_exit} exit choices differ out of {sim_exit.numel()}"
    )

    print(f"\nwall clock on {torch.get_num_threads()} threads, policy {policy}, best of {args.repeats}")
    print(
        f"{'batch':>5s} {'full s':>8s} {'exit s':>8s} {'FLOPs ratio':>11s} {'FLOPs x':>8s} {'speedup':>8s} "
        f"{'efficiency':>10s}"
    )
    speed = []
    for bs in args.batch_sizes:
        t = time_inference(model, _batches(val, bs), policy, chosen["thresholds"], args.repeats)
        speed.append({"batch_size": bs, **t})
        print(
            f"{bs:5d} {t['full_s']:8.2f} {t['exit_s']:8.2f} {t['flops_ratio']:11.3f} {t['flops_speedup']:8.2f} "
            f"{t['speedup']:8.2f} {t['efficiency']:10.2f}"
        )
    result = {
        "run_dir": str(args.run_dir),
        "budget": args.budget,
        "unit": args.unit,
        "per_exit": args.per_exit,
        "exit_layers": exit_layers,
        "full_accuracy": full_acc,
        "anytime": [float(val_rec.correct[:, j].float().mean()) for j in range(len(exit_layers))],
        "policies": rows,
        "speed_policy": policy,
        "speed": speed,
        "threads": torch.get_num_threads(),
        "compaction_mismatched_predictions": mismatched_pred,
        "compaction_mismatched_exits": mismatched_exit,
        "hardware": hardware_info(),
    }
    write_json(result, args.json or str(Path(args.run_dir) / "early_exit_eval.json"))
    return result


def _val_point(record, policy: str, threshold: float, n_early: int) -> dict:
    point = evaluate_thresholds(record, policy, [threshold] * n_early, "layers")
    return {"val_accuracy": point.accuracy, "val_layers_fraction": point.cost}


if __name__ == "__main__":
    main()
