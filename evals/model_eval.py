"""`moe eval`: load balance, compute per token and accuracy against compute for a run or checkpoint.

    moe eval RUN_DIR|CHECKPOINT|EXPORT.safetensors [--config CONFIG] [--compare OTHER] [--report report.html]

One JSON (``eval.json``) with every figure, PNG plots and, with ``--report``, a self-contained
HTML page embedding them, all in ``--out`` (default: ``RUN_DIR/eval/``).

- Load balance per MoE layer from a dedicated pass over the validation split (tokens per expert,
  max/mean, coefficient of variation, routing entropy, dropped fraction), specialisation (what
  the top-1 expert says about a token's id, or its sample's class), routing stability against
  another checkpoint (``--compare``, by default the run's previous checkpoint), and the same
  load over training from the run's ``metrics.jsonl``.
- Compute: FLOPs executed per token and per sample by component (``dynamoe.compute.ledger.ComputeLedger``),
  for the full network and, for models with early exits, for compacted early-exit inference at
  the thresholds in ``calibration.json`` (or the config's); the dense-equivalent model (every
  expert on every token) and the fractions.
- Accuracy (or loss) against GFLOPs: the exits' anytime and budgeted-batch curves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dynamoe.compute.ledger import ComputeLedger
from dynamoe.evals.report import hardware_info, moe_layer_label
from dynamoe.evals.routing_metrics import RoutingRecorder, load_summary, routing_stability, specialisation
from dynamoe.exits.multi_exit import MultiExitModel


def load_source(source: str | Path, config: str | None = None, task: str | None = None):
    """(RunConfig, model in eval mode, data, run folder or None) of a run folder, checkpoint folder or
    export; ``task`` evaluates on another dataset than the run's (the model must fit it)."""
    import yaml

    from dynamoe.config import ConfigError, RunConfig, from_dict, load_config, to_dict
    from dynamoe.data import build_data
    from dynamoe.training.checkpoint import CheckpointError, load_model, resolve_resume

    source = Path(source)
    if not source.exists():
        raise CheckpointError(
            f"'{source}' does not exist; fix: pass a run folder, a checkpoint folder or an exported file"
        )
    run_dir = None
    if source.is_file():
        model_cfg, model = load_model(source)
        if config is None:
            raise ConfigError(
                "an exported model carries no data settings; fix: pass --config with the run's config "
                "(a YAML path or a shipped config name)"
            )
        cfg = load_config(config)
        cfg = from_dict(RunConfig, {**to_dict(cfg), "model": to_dict(model_cfg)})
    else:
        folder = resolve_resume(source)
        run_dir = folder.parent.parent
        config_file = Path(config) if config else run_dir / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"'{config_file}' not found; fix: pass a run folder written by `moe train` or --config")
        cfg = from_dict(RunConfig, yaml.safe_load(config_file.read_text()))
        _, model = load_model(folder)
    if task is not None and task != cfg.data.dataset:
        raw = to_dict(cfg)
        raw["data"] = {**raw["data"], "dataset": task, "path": None}
        cfg = from_dict(RunConfig, raw)  # re-validated: the model kind must fit the task
    data = build_data(cfg.data, cfg.task)
    classes = getattr(data, "num_classes", None)
    if classes is not None and cfg.model.num_classes is not None and classes > cfg.model.num_classes:
        raise ConfigError(
            f"--task {cfg.data.dataset}: the data has {classes} classes but the model predicts "
            f"{cfg.model.num_classes}; fix: evaluate on a task with the classes the model was trained on"
        )
    return cfg, model.eval(), data, run_dir


def _eval_batches(cfg, data, batches: int | None, batch_size: int):
    if cfg.task == "lm":
        return list(data.eval_batches(batches or cfg.train.eval_batches, batch_size))
    out = list(data.eval_batches(None, batch_size))
    return out[:batches] if batches else out


def _keys(cfg, batch: dict) -> torch.Tensor:
    """What specialisation is measured against: token ids (LM), else the sample's class."""
    if cfg.task == "lm":
        return batch["input_ids"]
    if "attention_mask" in batch:  # every token of a sentence carries its class; padding is ignored
        return torch.where(
            batch["attention_mask"].bool(), batch["labels"][:, None], torch.full_like(batch["input_ids"], -1)
        )
    return batch["labels"]


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def full_pass(cfg, model, batches: list[dict]) -> dict:
    """Every layer for every sample: loss/accuracy, FLOPs by component, routing records, MoE load."""
    from dynamoe.layers.load_stats import moe_layers, reset_stats

    reset_stats(model)
    recorder = RoutingRecorder(model)
    loss_sum, correct, count = 0.0, 0, 0
    # Under conditional depth an MoE layer may see any subset of the tokens or samples, so which
    # key each routed row carries is not known: specialisation is left out there.
    keyed = cfg.model.depth.mode == "none"
    with ComputeLedger(model) as ledger, recorder:
        for batch in batches:
            recorder.set_keys(_keys(cfg, batch) if keyed else None)
            ledger.count_batch(batch)
            if isinstance(model, MultiExitModel):  # run the plain network (final head only)
                logits = _final_logits(model, batch)
                loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            else:
                out = model(**batch)
                logits = out.logits
                loss = out.exit_losses[-1] if out.exit_losses else out.loss
            n = batch["labels"].shape[0]
            loss_sum += float(loss) * n
            count += n
            if cfg.task != "lm":
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
    layers = []
    for i, layer in enumerate(moe_layers(model)):
        router = layer.cfg.router
        slots = 1 if router.kind == "expert_choice" else router.top_k
        row = load_summary(
            layer.stat_counts.cpu(),
            int(layer.stat_tokens),
            slots,
            float(layer.stat_dropped),
            float(layer.stat_entropy_sum),
        )
        top1, keys = recorder.result(i)
        row["specialisation"] = specialisation(top1, keys, layer.num_experts)
        layers.append({"layer": i, "block": layer.block_index, **row})
    metrics = {"loss": loss_sum / count}
    if cfg.task != "lm":
        metrics["accuracy"] = correct / count
    return {"metrics": metrics, "ledger": ledger, "layers": layers, "recorder": recorder}


def _final_logits(model, batch: dict) -> torch.Tensor:
    state, _, _ = model.run_stages(model.begin(_model_inputs(batch)))
    return model.run_head(model.final_head, state).logits


def _thresholds(model, run_dir: Path | None) -> tuple[str, list[float], str]:
    from dynamoe.exits.heads import thresholds_for

    if run_dir is not None and (run_dir / "calibration.json").is_file():
        cal = json.loads((run_dir / "calibration.json").read_text())
        return cal["policy"], cal["thresholds"], f"calibration.json (budget {cal['budget']} of {cal['unit']})"
    return model.exit_cfg.policy, thresholds_for(model.exit_cfg), "model.exits config"


@torch.no_grad()
def exit_pass(cfg, model, batches: list[dict], policy: str, thresholds: list[float]) -> dict:
    """Compacted early-exit inference: accuracy, exit distribution, FLOPs executed by component."""
    from dynamoe.exits.multi_exit import infer

    correct, count = 0, 0
    exits = torch.zeros(len(model.exit_stages), dtype=torch.long)
    with ComputeLedger(model) as ledger:
        for batch in batches:
            ledger.count_batch(batch)
            result = infer(model, _model_inputs(batch), policy, thresholds)
            correct += int((result.predictions == batch["labels"]).sum())
            count += batch["labels"].shape[0]
            exits += torch.bincount(result.exit_index.cpu(), minlength=exits.numel())
    return {"accuracy": correct / count, "exit_counts": exits.tolist(), "ledger": ledger}


def _compute_block(ledger: ComputeLedger, full: ComputeLedger) -> dict:
    return {
        "flops_total": ledger.total,
        "flops_per_sample": ledger.total / max(ledger.samples, 1),
        "flops_per_token": ledger.total / max(ledger.tokens, 1),
        "by_component_per_token": {k: v / max(ledger.tokens, 1) for k, v in ledger.by_component().items()},
        "fraction_of_full": ledger.total / full.total if full.total else 1.0,
        "fraction_of_dense_equivalent": ledger.total / full.dense_equivalent if full.dense_equivalent else 1.0,
    }


def training_curves(run_dir: Path | None) -> dict | None:
    """Loss, learning rate and auxiliary loss at each training log step, and the validation loss."""
    from dynamoe.training.metrics import read_metrics

    if run_dir is None:
        return None
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    val = [r for r in rows if r.get("split") == "eval" and r.get("loss") is not None]
    return {
        "train": {k: [r.get(k) for r in train] for k in ("step", "loss", "lr", "aux_loss")},
        "eval": {k: [r[k] for r in val] for k in ("step", "loss")},
    }


def source_step(source: Path) -> int | None:
    """The training step of the weights evaluated (a checkpoint's, or an export's)."""
    from safetensors import safe_open

    from dynamoe.training.checkpoint import resolve_resume

    try:
        if source.is_file():
            with safe_open(str(source), framework="pt") as f:
                return int((f.metadata() or {}).get("step"))
        return int(json.loads((resolve_resume(source) / "trainer.json").read_text())["step"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def training_load(run_dir: Path | None) -> dict:
    """Per MoE layer, the tokens per expert logged at each training log step."""
    from dynamoe.training.metrics import read_metrics

    if run_dir is None:
        return {"steps": [], "layers": []}
    rows = [r for r in read_metrics(run_dir, "train") if any(k.endswith("_counts") for k in r)]
    # Series are named by block (``block3_counts``); runs written before that, by MoE layer (``moe0_counts``).
    keys = sorted((k for k in rows[0] if k.endswith("_counts")), key=_series_order) if rows else []
    return {"steps": [r["step"] for r in rows], "layers": [[r.get(k) for r in rows] for k in keys]}


def _series_order(key: str) -> tuple[str, int]:
    prefix = key.removesuffix("_counts")
    digits = prefix.lstrip("abcdefghijklmnopqrstuvwxyz")
    return prefix[: len(prefix) - len(digits)], int(digits or 0)


def _previous_model(run_dir: Path | None, current: Path):
    """(folder, model) of the newest intact checkpoint before ``current`` (routing stability is
    measured against it), or None; a corrupt one is skipped with a warning."""
    import warnings

    from dynamoe.training.checkpoint import CheckpointError, list_checkpoints, load_model

    if run_dir is None:
        return None
    for folder in reversed([c for c in list_checkpoints(run_dir) if c.resolve() != current.resolve()]):
        try:
            return folder, load_model(folder)[1]
        except CheckpointError as err:
            warnings.warn(f"routing stability: skipped {folder.name}: {err}", stacklevel=2)
    return None


def evaluate(
    source: str,
    *,
    config: str | None = None,
    task: str | None = None,
    compare: str | None = None,
    batches: int | None = None,
    batch_size: int = 64,
    out_dir: str | None = None,
    report: str | None = None,
) -> dict:
    from dynamoe.training.checkpoint import load_model, resolve_resume

    cfg, model, data, run_dir = load_source(source, config, task)
    out = (
        Path(out_dir)
        if out_dir
        else (run_dir / "eval" if run_dir is not None else Path(source).with_suffix("") / "eval")
    )
    out.mkdir(parents=True, exist_ok=True)
    eval_batches = _eval_batches(cfg, data, batches, batch_size)
    full = full_pass(cfg, model, eval_batches)
    result = {
        "source": str(source),
        "config": cfg.train.name,
        "step": source_step(Path(source)),
        "task": cfg.task,
        "model_kind": cfg.model.kind,
        "samples": full["ledger"].samples,
        "tokens": full["ledger"].tokens,
        "metrics": full["metrics"],
        "load_balance": full["layers"],
        "hardware": hardware_info(),
    }
    ledger = full["ledger"]
    result["compute"] = {
        "full": _compute_block(ledger, ledger),
        "dense_equivalent_flops_per_token": ledger.dense_equivalent / max(ledger.tokens, 1),
        "dense_equivalent_flops_per_sample": ledger.dense_equivalent / max(ledger.samples, 1),
    }
    # Routing stability against another checkpoint, on exactly the same tokens.
    found = None
    if full["layers"]:
        found = (
            (Path(compare), load_model(Path(compare))[1])
            if compare
            else _previous_model(run_dir, resolve_resume(Path(source)))
        )
    if found is not None:
        other, other_model = found
        other_full = full_pass(cfg, other_model.eval(), eval_batches)
        try:
            result["routing_stability"] = {
                "against": str(other),
                "changed_fraction": [
                    routing_stability(full["recorder"].result(i)[0], other_full["recorder"].result(i)[0])
                    for i in range(len(full["layers"]))
                ],
            }
        except ValueError as err:  # conditional depth routed different tokens in the two checkpoints
            result["routing_stability_unavailable"] = str(err)
    result["training_load"] = training_load(run_dir)
    result["training_curves"] = training_curves(run_dir)
    if isinstance(model, MultiExitModel) and model.exit_cfg.enabled:
        result["exits"] = _exit_section(cfg, model, data, eval_batches, run_dir, ledger)
    elif cfg.model.kind == "decoder" and cfg.model.exits.enabled:
        result["token_exits"] = _token_exit_curve(model, eval_batches)
    if cfg.task == "lm" and cfg.model.kind == "decoder":
        result["generation"] = _generation_section(model, data, run_dir)
    if cfg.model.depth.mode != "none":
        result["depth"] = _depth_curve(cfg, model, eval_batches)
    _write_json(out / "eval.json", result)
    from dynamoe.evals.eval_plots import write_plots

    result["plots"] = write_plots(result, out)
    _write_json(out / "eval.json", result)
    if report:
        from dynamoe.evals.html_report import write_report

        report_path = Path(report).resolve()  # relative to the current folder, as any path given on the command line
        report_path.parent.mkdir(parents=True, exist_ok=True)
        write_report(result, out, report_path)
        result["report"] = str(report_path)
    result["json"] = str(out / "eval.json")
    return result


def exit_labels(model_cfg) -> list[str]:
    """Each exit as the config names it (``model.exits.layers``: Transformer layers, CNN stages or
    blocks), the final head last."""
    if model_cfg.kind == "cnn":
        unit = "stage" if model_cfg.cnn.exit_after == "stage" else "block"
    else:
        unit = "layer"
    return [f"after {unit} {n}" for n in model_cfg.exits.layers] + ["final"]


def _exit_section(cfg, model, data, eval_batches, run_dir, full_ledger) -> dict:
    from dynamoe.exits.calibration import anytime_curve, record_exits, shared_threshold_sweep

    policy, thresholds, origin = _thresholds(model, run_dir)
    passed = exit_pass(cfg, model, eval_batches, policy, thresholds)
    record = record_exits(model, data.split("val"))
    gflops_full = float(record.full_flops.mean()) / 1e9
    anytime = [
        {"exit_layer": layer + 1, "accuracy": p.accuracy, "gflops_per_sample": p.cost * gflops_full}
        for layer, p in zip(model.exit_stages, anytime_curve(record, "flops"))
    ]
    budgeted = [
        {"threshold": p.threshold, "accuracy": p.accuracy, "gflops_per_sample": p.cost * gflops_full}
        for p in shared_threshold_sweep(record, policy, "flops")
    ]
    return {
        "policy": policy,
        "thresholds": thresholds,
        "thresholds_from": origin,
        "exit_layers": [s + 1 for s in model.exit_stages],
        "exit_labels": exit_labels(cfg.model),
        "accuracy": passed["accuracy"],
        "exit_counts": passed["exit_counts"],
        "compute": _compute_block(passed["ledger"], full_ledger),
        "curves": {"anytime": anytime, "budgeted": budgeted, "full_gflops_per_sample": gflops_full},
    }


# The knob of each conditional-depth mode that trades quality for compute at inference.
DEPTH_SWEEPS = {
    "act": ("halt_threshold", [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]),
    "pondernet": ("halt_quantile", [0.1, 0.3, 0.5, 0.7, 0.9]),
    "mod": ("capacity", [0.125, 0.25, 0.5, 0.75, 1.0]),
    "skip": (None, [None]),  # gates decide by their argmax: one setting
}


def _set_depth(model, depth_cfg) -> None:
    """Give the model's depth units another setting (inference only; the weights are unchanged)."""
    import dataclasses

    model.cfg = dataclasses.replace(model.cfg, depth=depth_cfg)
    if getattr(model, "depth", None) is not None:  # Transformers keep their depth units apart
        model.depth.cfg, model.depth.dcfg = model.cfg, depth_cfg


@torch.no_grad()
def _depth_curve(cfg, model, batches: list[dict]) -> dict:
    """Quality against executed FLOPs per token as the depth mode's knob is swept."""
    import dataclasses

    trained = cfg.model.depth
    knob, values = DEPTH_SWEEPS[trained.mode]
    points = []
    try:
        for value in values:
            setting = trained if knob is None else dataclasses.replace(trained, **{knob: value})
            _set_depth(model, setting)
            passed = full_pass(cfg, model, batches)
            ledger = passed["ledger"]
            points.append(
                {
                    "setting": value,
                    "trained_setting": knob is None or value == getattr(trained, knob),
                    **passed["metrics"],
                    "flops_per_token": ledger.total / max(ledger.tokens, 1),
                    "by_component_per_token": {
                        k: v / max(ledger.tokens, 1) for k, v in ledger.by_component().items() if v
                    },
                }
            )
    finally:
        _set_depth(model, trained)
    return {"mode": trained.mode, "knob": knob, "curve": points}


@torch.no_grad()
def _token_exit_curve(model, batches: list[dict]) -> dict:
    """Decoder with per-token exits: validation loss against layers per token, a shared threshold
    swept over the policy's scores (state copying, ``TransformerLM.generate_exit_eval``)."""
    n_early = len(model.exit_cfg.layers)
    points = []
    for t in [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, float("inf")]:
        loss = layers = 0.0
        for batch in batches:
            r = model.generate_exit_eval(batch["input_ids"], batch["labels"], thresholds=[t] * n_early)
            loss += r["loss"]
            layers += r["mean_layers"]
        points.append(
            {
                "threshold": t,
                "loss": loss / len(batches),
                "layers_per_token": layers / len(batches),
                "layers_fraction": layers / len(batches) / model.cfg.n_layers,
            }
        )
    return {"policy": model.exit_cfg.policy, "curve": points}


def _generation_section(model, data, run_dir: Path | None, prompts: int = 8, new_tokens: int = 32) -> dict:
    """Decoding on a few validation windows (cheap: ``prompts`` x ``new_tokens`` tokens): tokens/s of
    plain KV-cache greedy decoding; with exits, self-speculative decoding from the exit nearest half
    the depth (acceptance) and, when the run holds ``calm_thresholds.json``, CALM with those
    thresholds (agreement with full greedy, layers per token, FLOPs ratio)."""
    import json as _json

    from dynamoe.generation import GenerationError, check_decodable, generate, speculative_generate
    from dynamoe.generation.calm import agreement_with_full, calm_generate
    from dynamoe.generation.calm_calibration import THRESHOLDS_FILE, held_out_prompts

    try:
        check_decodable(model.cfg)
    except GenerationError as err:
        return {"unavailable": str(err)}
    context = model.cfg.max_seq_len
    prompt_len = max(1, min(32, context // 4))
    new = max(1, min(new_tokens, context - prompt_len))
    windows = held_out_prompts(data.val_ids, prompts, prompt_len, seed=1)
    generate(model, windows[:1], max_new_tokens=2)  # a warm-up: the first call pays for lazy set-up
    full = generate(model, windows, max_new_tokens=new)
    out = {"prompts": prompts, "prompt_tokens": prompt_len, "new_tokens": new, "full": full.stats.to_dict()}
    if not model.cfg.exits.enabled:
        return out
    spec = speculative_generate(model, windows, max_new_tokens=new)
    out["speculative"] = {**spec.stats.to_dict(), "identical": spec.tokens == full.tokens}
    stored = None if run_dir is None else Path(run_dir) / THRESHOLDS_FILE
    if stored is not None and stored.is_file():
        cal = _json.loads(stored.read_text())
        calm = calm_generate(
            model, windows, thresholds=cal["thresholds"], confidence=cal["confidence"], max_new_tokens=new
        )
        out["calm"] = {
            "delta": cal["delta"],
            "confidence": cal["confidence"],
            "threshold": cal["threshold"],
            **calm.stats.to_dict(),
            **agreement_with_full(model, windows, calm.tokens, full.tokens),
            "speedup": calm.stats.tokens_per_second / full.stats.tokens_per_second,
        }
    return out


def format_summary(result: dict) -> str:
    lines = [
        f"{result['source']}: {result['task']} ({result['model_kind']}), {result['samples']} samples, "
        f"{result['tokens']} tokens"
    ]
    lines.append("full network: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    c = result["compute"]["full"]
    lines.append(
        f"compute: {c['flops_per_token'] / 1e6:.3f} MFLOPs per token, {c['flops_per_sample'] / 1e9:.4f} GFLOPs "
        f"per sample; dense equivalent {result['compute']['dense_equivalent_flops_per_token'] / 1e6:.3f} "
        f"MFLOPs per token ({c['fraction_of_dense_equivalent']:.3f} of it)"
    )
    parts = [f"{k} {v / 1e6:.3f}" for k, v in c["by_component_per_token"].items() if v]
    lines.append("  by component (MFLOPs per token): " + ", ".join(parts))
    for row in result["load_balance"]:
        lines.append(
            f"{moe_layer_label(row)}: max/mean {row['max_over_mean']:.3f}, cv {row['cv']:.3f}, "
            f"dropped {100 * row['dropped_fraction']:.2f}%, H/lnE {row['entropy_normalized']:.3f}, "
            f"specialisation NMI {row['specialisation']['nmi']:.3f}"
        )
    if "routing_stability" in result:
        s = result["routing_stability"]
        lines.append(
            f"routing stability vs {s['against']}: top-1 changed for "
            + ", ".join(f"{100 * f:.1f}%" for f in s["changed_fraction"])
            + " of tokens"
        )
    if "exits" in result:
        e = result["exits"]
        lines.append(
            f"early exit ({e['policy']}, thresholds from {e['thresholds_from']}): accuracy {e['accuracy']:.4f} "
            f"at {e['compute']['fraction_of_full']:.3f} of the full network's FLOPs; samples per exit "
            + ", ".join(f"L{layer}: {n}" for layer, n in zip(e["exit_layers"], e["exit_counts"]))
        )
    if "depth" in result:
        d = result["depth"]
        metric = "accuracy" if result["task"] != "lm" else "loss"
        lines.append(
            f"conditional depth ({d['mode']}, {d['knob'] or 'trained setting'}): "
            + ", ".join(
                f"{p['setting']}: {metric} {p[metric]:.4f} at {p['flops_per_token'] / 1e6:.3f} MFLOPs/token"
                for p in d["curve"]
            )
        )
    if "token_exits" in result:
        lines.append(
            "per-token exits (loss at layers per token): "
            + ", ".join(f"{p['loss']:.3f}@{p['layers_per_token']:.2f}" for p in result["token_exits"]["curve"])
        )
    g = result.get("generation") or {}
    if "full" in g:
        line = (
            f"generation ({g['prompts']} validation windows, {g['new_tokens']} new tokens): "
            f"full {g['full']['tokens_per_second']:.1f} tokens/s"
        )
        if "speculative" in g:
            rate = g["speculative"]["acceptance_rate"]
            line += f"; self-speculative {g['speculative']['tokens_per_second']:.1f} tokens/s, " + (
                "n/a accepted" if rate is None else f"{rate:.1%} accepted"
            )
        if "calm" in g:
            c = g["calm"]
            line += (
                f"; CALM (delta {c['delta']}) {c['tokens_per_second']:.1f} tokens/s, "
                f"{c['token_agreement']:.1%} agreement, "
                f"{c['layers_per_token']:.2f} layers/token, {c['flops_ratio']:.1%} of the FLOPs"
            )
        lines.append(line)
    return "\n".join(lines)


def _write_json(path: Path, result: dict) -> None:
    """Strict JSON: non-finite numbers (a diverged run's losses) become null."""
    from dynamoe.training.metrics import finite

    plain = json.loads(json.dumps(result, default=float))
    path.write_text(json.dumps(finite(plain), indent=2, allow_nan=False))
