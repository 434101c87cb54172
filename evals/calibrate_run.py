"""``moe calibrate``: a run folder's exit thresholds, calibrated on its calibration split and
checked on its validation split (the calibration itself is ``dynamoe.exits.calibration``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from dynamoe.config import ConfigError, RunConfig, from_dict
from dynamoe.data import build_data
from dynamoe.exits.calibration import calibrate, evaluate_thresholds, record_exits
from dynamoe.training.checkpoint import load_model, resolve_resume

CALIBRATION_FILE = "calibration.json"


def load_run(source: str | Path):
    """(RunConfig, model in eval mode, data) of a run folder or one of its checkpoint folders."""
    source = Path(source)
    folder = resolve_resume(source)
    run_dir = folder.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"'{run_dir}' has no config.yaml; fix: pass a run folder written by `moe train`")
    cfg = from_dict(RunConfig, yaml.safe_load(config_file.read_text()))
    if not cfg.model.exits.enabled:
        raise ConfigError(
            f"the run in '{run_dir}' has no early exits (model.exits.layers is empty); "
            "fix: train with exits, e.g. `moe train bert_early_exit_sst2`"
        )
    _, model = load_model(folder)
    return cfg, model, build_data(cfg.data, cfg.task)


def calibrate_run(
    source: str | Path,
    budget: float,
    unit: str = "layers",
    policy: str | None = None,
    batch_size: int = 64,
    write: bool = True,
    per_exit: bool = False,
) -> dict:
    """Calibrate a run's exits on its calibration split, check the thresholds on its validation
    split, and write ``calibration.json`` into the run folder."""
    cfg, model, data = load_run(source)
    policy = policy or cfg.model.exits.policy
    if policy == "learned" and cfg.model.exits.policy != "learned":
        raise ValueError(
            "policy 'learned' needs exit predictors, trained with model.exits.policy: learned; "
            "fix: choose max_prob, entropy, margin or patience for this run"
        )
    calib_record = record_exits(model, data.split("calib"), batch_size)
    result = calibrate(calib_record, policy, budget, unit, per_exit=per_exit)
    val_record = record_exits(model, data.split("val"), batch_size)
    val_point = evaluate_thresholds(val_record, policy, result.thresholds, unit)
    cost_layers = evaluate_thresholds(val_record, policy, result.thresholds, "layers").cost
    cost_flops = evaluate_thresholds(val_record, policy, result.thresholds, "flops").cost
    out = {
        "policy": policy,
        "unit": unit,
        "budget": budget,
        "per_exit": per_exit,
        "thresholds": result.thresholds,
        "calibration": {
            "split": "calib",
            "samples": int(calib_record.labels.numel()),
            "accuracy": result.accuracy,
            "cost": result.cost,
            "full_accuracy": result.full_accuracy,
        },
        "validation": {
            "samples": int(val_record.labels.numel()),
            "accuracy": val_point.accuracy,
            "full_accuracy": float(val_record.correct[:, -1].float().mean()),
            "layers_fraction": cost_layers,
            "flops_fraction": cost_flops,
            "exit_fractions": val_point.exit_fractions,
        },
        "curves": {"anytime": [asdict(p) for p in result.anytime], "budgeted": [asdict(p) for p in result.budgeted]},
        "exit_layers": [i + 1 for i in model.exit_stages],
    }
    if write:
        run_dir = resolve_resume(Path(source)).parent.parent
        (run_dir / CALIBRATION_FILE).write_text(json.dumps(out, indent=2, default=float))
        out["written"] = str(run_dir / CALIBRATION_FILE)
    return out


def format_calibration(out: dict) -> str:
    v, c = out["validation"], out["calibration"]
    lines = [
        f"policy {out['policy']}, budget {out['budget']:.2f} of the full network's {out['unit']}",
        "thresholds per early exit (after layers "
        + ", ".join(map(str, out["exit_layers"][:-1]))
        + "): "
        + ", ".join(f"{t:.4f}" for t in out["thresholds"]),
        f"calibration split ({c['samples']} samples): accuracy {c['accuracy']:.4f} at {c['cost']:.3f} "
        f"(full depth {c['full_accuracy']:.4f})",
        f"validation split ({v['samples']} samples): accuracy {v['accuracy']:.4f} "
        f"(full depth {v['full_accuracy']:.4f}), "
        f"layers {v['layers_fraction']:.3f}, FLOPs {v['flops_fraction']:.3f} of the full network",
        "share leaving at each exit: "
        + ", ".join(f"L{layer} {s:.3f}" for layer, s in zip(out["exit_layers"], v["exit_fractions"])),
    ]
    return "\n".join(lines)
