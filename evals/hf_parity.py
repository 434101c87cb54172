"""Is dynamoe's fine-tune of a pretrained encoder as good as transformers' own? A plain
``AutoModelForSequenceClassification`` is fine-tuned here with the run's hyperparameters, steps and
the very same batches, and both are scored on the same dev set.

    python -m dynamoe.evals.hf_parity RUN_DIR [--json PATH] [--threads N]

``RUN_DIR`` is a dense ``hf_encoder`` run of ``moe train``. Its plain fine-tune is the whole run,
or, with two-stage exit training, the first stage: the backbone and final head alone (the exits
are frozen at learning rate 0, and in the second stage the backbone and final head are), so its
full-depth accuracy is that of a fine-tune without exits. Jointly trained exits pull on the
backbone: such a run is refused.

transformers' side: the checkpoint's sequence classifier (pooler + a new classifier), AdamW with
the run's learning rate, betas, weight decay (matrices only, as dynamoe's groups) and gradient
clipping, dynamoe's warm-up + cosine schedule over the same steps, batch ``i`` of the run at step
``i``, dropout as the checkpoint's config says. The only differences are the random draws
(classifier initialisation, dropout masks). Prints a table and writes JSON (``hf_parity.json`` in
the run folder by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml

from dynamoe.config import ConfigError, RunConfig, from_dict
from dynamoe.data import build_data
from dynamoe.evals.report import hardware_info, write_json

TARGET_POINTS = 0.5  # the bound on |dynamoe - transformers| in dev accuracy points


def fine_tune_steps(cfg: RunConfig) -> int:
    """The steps of the run that were a plain fine-tune (backbone and final head only)."""
    exits = cfg.model.exits
    if not exits.enabled:
        return cfg.train.steps
    if exits.training != "two_stage":
        raise ConfigError(
            f"model.exits.training: {exits.training}: the run's exits trained jointly with the backbone, so it is "
            "not a plain fine-tune to compare; fix: use a run with exits.training: two_stage, or without exits"
        )
    return max(1, int(cfg.train.steps * exits.stage_one_fraction))


def read_run(run_dir: Path) -> RunConfig:
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"'{run_dir}' has no config.yaml; fix: pass a run folder written by `moe train`")
    cfg = from_dict(RunConfig, yaml.safe_load(config_file.read_text()))
    m = cfg.model
    if m.kind != "hf_encoder":
        raise ConfigError(f"'{run_dir}' is a {m.kind} run; fix: pass a fine-tune of a pretrained encoder (hf_encoder)")
    if any(m.is_moe_layer(i) for i in range(m.n_layers)):
        raise ConfigError(
            f"'{run_dir}' has MoE layers, and transformers' classifier is dense; fix: pass the dense fine-tune"
        )
    fine_tune_steps(cfg)
    return cfg


@torch.no_grad()
def accuracy(logits_of, batches) -> float:
    right = total = 0
    for batch in batches:
        logits = logits_of(batch)
        right += int((logits.argmax(-1) == batch["labels"]).sum())
        total += batch["labels"].numel()
    return right / total


def fine_tune_transformers(cfg: RunConfig, data, steps: int, progress: bool = True):
    """transformers' sequence classifier fine-tuned on the run's batches; returns it in eval mode."""
    from transformers import AutoModelForSequenceClassification

    from dynamoe.models.hf_encoder import resolve_pretrained
    from dynamoe.training.deepspeed_setup import param_groups
    from dynamoe.training.trainer import lr_at

    t = cfg.train
    torch.manual_seed(t.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained(cfg.model.pretrained), num_labels=cfg.model.num_classes or data.num_classes
    )
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, None), lr=t.lr, betas=t.betas)
    schedule = dataclasses.replace(t, steps=steps, warmup_steps=min(t.warmup_steps, steps))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        batch = data.train_batch(t.seed, step, t.batch_size)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        if progress and (step + 1) % max(1, t.log_every * 5) == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"  transformers step {step + 1}/{steps}  loss {out.loss.item():.4f}  {rate:.2f} steps/s", flush=True)
    return model.eval()


def fine_tuned_checkpoint(run_dir: Path, steps: int) -> Path:
    """The run's checkpoint at the end of its plain fine-tune, or a later one: after it only the
    early exits train, so the backbone and final head are the same."""
    from dynamoe.training.checkpoint import list_checkpoints

    found = [(int(json.loads((c / "trainer.json").read_text())["step"]), c) for c in list_checkpoints(run_dir)]
    done = [(step, c) for step, c in found if step >= steps]
    if not done:
        latest = max((step for step, _ in found), default=0)
        raise ConfigError(
            f"'{run_dir}' has no checkpoint at or after step {steps}, where its plain fine-tune ends (the latest is "
            f"step {latest}); fix: let the run get there (`moe train --resume`), then compare"
        )
    return min(done)[1]


def run(run_dir: Path, threads: int | None = None, progress: bool = True) -> dict:
    """transformers' fine-tune first (the run may still be training its exits), then the run's."""
    from dynamoe.training.checkpoint import load_model

    cfg = read_run(run_dir)
    torch.set_num_threads(threads or cfg.train.threads or torch.get_num_threads())
    data = build_data(cfg.data, cfg.task)
    steps = fine_tune_steps(cfg)
    dev = list(data.eval_batches(None, 64, split="val"))
    start = time.perf_counter()
    theirs = fine_tune_transformers(cfg, data, steps, progress)
    seconds = time.perf_counter() - start
    checkpoint = fine_tuned_checkpoint(run_dir, steps)
    _, ours = load_model(checkpoint)
    ours_acc = accuracy(lambda b: ours(b["input_ids"], b["attention_mask"]).logits, dev)
    theirs_acc = accuracy(lambda b: theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, dev)
    diff = 100 * (ours_acc - theirs_acc)
    return {
        "run": str(run_dir),
        "checkpoint": checkpoint.name,
        "pretrained": cfg.model.pretrained,
        "dataset": cfg.data.dataset,
        "dev_examples": sum(b["labels"].numel() for b in dev),
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "dynamoe_accuracy": ours_acc,
        "transformers_accuracy": theirs_acc,
        "difference_points": diff,
        "target_points": TARGET_POINTS,
        "within_target": abs(diff) <= TARGET_POINTS,
        "transformers_seconds": seconds,
        "hardware": hardware_info(),
    }


def print_table(r: dict) -> None:
    print(f"\n{r['pretrained']} on {r['dataset']}: {r['steps']} steps, batch {r['batch_size']}, lr {r['lr']:g}")
    print(f"| fine-tune | dev accuracy ({r['dev_examples']} examples) |")
    print("|---|---:|")
    print(f"| dynamoe (hf_encoder run) | {100 * r['dynamoe_accuracy']:.2f}% |")
    print(f"| transformers AutoModelForSequenceClassification | {100 * r['transformers_accuracy']:.2f}% |")
    verdict = "within" if r["within_target"] else "OUTSIDE"
    print(f"difference {r['difference_points']:+.2f} points: {verdict} the {r['target_points']} point target")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamoe.evals.hf_parity", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a dense hf_encoder run folder")
    p.add_argument("--json", default=None, help="where to write the result (default: RUN/hf_parity.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the run's train.threads)")
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    result = run(run_dir, args.threads)
    print_table(result)
    write_json(result, args.json or str(run_dir / "hf_parity.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
