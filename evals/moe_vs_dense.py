"""Every router against the dense decoder at equal active FLOPs per token and equal training FLOPs.

    moe bench moe-vs-dense [--steps 600] [--seeds 0 1 2] [--variants dense top2 ...] [--threads 1]
                           [--dataset NAME --data-path FILE] [--set key=value ...]
                           [--json PATH] [--plot PATH] [--markdown PATH] [--resume] [--quick]

One base decoder (``--base``, default the ``quickstart`` config: 4 layers, d_model 128, d_ff 512,
its MoE placement: every other block) and one set of overrides per variant:

    dense         every FFN dense (width d_ff)
    switch_top1   8 experts of width d_ff, top-1 (Switch), dropless, balance loss
    top2          8 experts of width d_ff/2, top-2, dropless, balance loss
    finegrained   16 experts of width d_ff/4, top-3, plus 1 shared expert of width d_ff/4 (DeepSeekMoE)
    expert_choice 8 experts of width d_ff/2, each takes its top 2T/8 tokens (k = 2 on average)
    sigmoid_free  8 experts of width d_ff/2, top-2, sigmoid scores, auxiliary-loss-free bias, no balance loss
    top2_cap1     as top2 with capacity factor 1.0 and dropping (the lowest-score assignments go)

Equal active FLOPs: the widths are derived from the base d_ff, so top_k x d_expert (+ shared) = d_ff
for every variant; before anything trains, each variant's forward FLOPs per token (dropless, from
``dynamoe.compute.flops``, router included) must be within ``--flops-tolerance`` of the dense
model's, or the script stops and names the variant (a ``--set`` that changes an expert width
breaks the equality and is refused). Equal training FLOPs: same steps, batch, sequence length and
learning-rate schedule for every run; the FLOPs each run really executed are counted by
``ComputeLedger`` hooks during training (3x the forward: backward costs twice the forward of what
ran; dropped assignments are not run, so not counted) and are in the table.

``--resume`` keeps the runs already in ``--json`` (made with the same settings, or it refuses) and
trains only the missing (variant, seed) pairs: more seeds for the close variants, or a sweep that
was cut short.

Per run: validation loss along training (every ``--eval-every`` steps, against training FLOPs so
far) and at the end, total and active parameters, training tokens/s, and the load of every MoE layer
over the last tenth of training (max/mean load, dropped fraction). A run whose worst layer ends at
max/mean >= ``--collapse-ratio`` is marked as collapsed. Per variant: the mean over seeds, the
sample standard deviation, the range, and the gap to dense seed by seed (a seed fixes the order of
the training batches). The verdict compares the best MoE variant with dense: beyond the seed spread
when its seeds' range lies wholly below the dense seeds' range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dynamoe.config import ConfigError, load_config
from dynamoe.evals.report import hardware_info, write_json

VARIANTS = ("dense", "switch_top1", "top2", "finegrained", "expert_choice", "sigmoid_free", "top2_cap1")

DESCRIPTIONS = {
    "dense": "dense FFN (width d_ff) in every block",
    "switch_top1": "8 experts of d_ff, top-1 (Switch), dropless",
    "top2": "8 experts of d_ff/2, top-2, dropless",
    "finegrained": "16 experts of d_ff/4, top-3 + 1 shared of d_ff/4",
    "expert_choice": "8 experts of d_ff/2, expert choice, capacity 1.0 (k=2 on average)",
    "sigmoid_free": "8 experts of d_ff/2, top-2, sigmoid, aux-loss-free bias",
    "top2_cap1": "8 experts of d_ff/2, top-2, capacity 1.0, dropping",
}

# Router fields every MoE variant sets, so nothing is inherited from the base config's router.
_ROUTER_DEFAULTS = {
    "kind": "token_choice",
    "score": "softmax",
    "normalize": "null",
    "aux_loss_coef": 0.01,
    "z_loss_coef": 0.001,
    "aux_free_bias": "false",
    "capacity_factor": "null",
    "jitter_eps": 0.0,
}


def variant_overrides(name: str, d_ff: int, moe_every: int = 2) -> list[str]:
    """The ``--set`` overrides that turn the base decoder into variant ``name`` with equal active
    FLOPs per token: routed width x top_k (+ shared width) = ``d_ff``; the MoE variants put an MoE
    FFN in every ``moe_every``-th block (the base config's placement)."""
    if name == "dense":
        return ["model.moe_every=0"]
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
    quarter, half = d_ff // 4, d_ff // 2
    if d_ff % 4:
        raise ConfigError(
            f"model.d_ff: {d_ff} does not split into the fine-grained variant's quarter-width experts; "
            f"fix: set model.d_ff to a multiple of 4 (e.g. {4 * round(d_ff / 4) or 4})"
        )
    router = dict(_ROUTER_DEFAULTS)
    moe = {"num_experts": 8, "d_expert": half, "num_shared_experts": 0, "d_shared": "null", "activation": "gelu"}
    if name == "switch_top1":
        moe["d_expert"] = d_ff
        router["top_k"] = 1
    elif name == "top2":
        router["top_k"] = 2
    elif name == "finegrained":
        moe.update(num_experts=16, d_expert=quarter, num_shared_experts=1, d_shared=quarter)
        router["top_k"] = 3
    elif name == "expert_choice":
        router.update(kind="expert_choice", top_k=2, capacity_factor=1.0, aux_loss_coef=0.0)
    elif name == "sigmoid_free":
        router.update(top_k=2, score="sigmoid", normalize="true", aux_loss_coef=0.0, aux_free_bias="true")
    elif name == "top2_cap1":
        router.update(top_k=2, capacity_factor=1.0, drop_policy="probs")
    return (
        [f"model.moe_every={moe_every}"]
        + [f"model.moe.{k}={v}" for k, v in moe.items()]
        + [f"model.moe.router.{k}={v}" for k, v in router.items()]
    )


def active_flops_per_token(cfg) -> dict:
    """Forward FLOPs per token of the model's blocks and LM head, dropless: a token-choice MoE
    layer runs top_k experts per token, an expert-choice one capacity_factor x top_k on average."""
    from dynamoe.compute import flops as F_

    m, seq = cfg.model, cfg.data.seq_len
    out = {"attention": 0.0, "ffn": 0.0, "router": 0.0}
    for i in range(m.n_layers):
        block = F_.transformer_block_flops(m, m.is_moe_layer(i), seq, seq * seq)
        out["attention"] += block["attention"] / seq
        if m.is_moe_layer(i):
            r = m.moe.router
            per_expert = F_.dense_ffn_flops(1, m.d_model, m.moe.d_expert, m.moe.activation)
            share = (r.capacity_factor or 1.0) if r.kind == "expert_choice" else 1.0
            out["ffn"] += share * r.top_k * per_expert + block["moe_shared"] / seq
            out["router"] += block["moe_router"] / seq
        else:
            out["ffn"] += block["ffn_dense"] / seq
    out["head"] = float(F_.linear_flops(1, m.d_model, m.vocab_size)) if m.vocab_size else 0.0
    out["total"] = sum(out.values())
    return out


def parameter_counts(model) -> dict:
    """Total parameters, and those one token uses: every routed expert's weights count in the
    share of experts a token meets (top_k / E, or capacity_factor x top_k / E in expert choice)."""
    from dynamoe.layers.load_stats import moe_layers

    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for layer in moe_layers(model):
        r = layer.cfg.router
        k = r.top_k * ((r.capacity_factor or 1.0) if r.kind == "expert_choice" else 1.0)
        routed = sum(p.numel() for p in layer.experts.parameters())
        inactive += routed * (1 - k / layer.num_experts)
    return {"total_params": total, "active_params": int(round(total - inactive))}


def train_one(name: str, seed: int, args, overrides: list[str], out_dir: Path) -> dict:
    from dynamoe.compute.ledger import ComputeLedger
    from dynamoe.layers.load_stats import layer_balance, reset_stats, stats_paused
    from dynamoe.training.trainer import Trainer

    cfg = load_config(args.base, overrides + [f"train.seed={seed}"])
    trainer = Trainer(cfg, run_dir=str(out_dir / f"{name}_seed{seed}"), progress=False)
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    # The load at the end of training: the last tenth of the steps, evaluations not counted.
    window_start = t.steps - max(1, t.steps // 10)
    ledger = ComputeLedger(trainer.model)
    # Tokens/s in the steady state: the first steps pay one-off costs (allocator, first-call setup).
    timed_from = min(t.steps // 20, t.steps - 1)
    curve, wall, timed, losses = [], 0.0, 0.0, []
    for step in range(t.steps):
        if step == window_start:
            reset_stats(trainer.model)
        start = time.perf_counter()
        with ledger:
            row = trainer.train_step(step)
        elapsed = time.perf_counter() - start
        wall += elapsed
        timed += elapsed if step >= timed_from else 0.0
        losses.append(row["loss"])
        balance_loss = row["balance_loss"]
        done = step + 1
        if done == t.steps or (args.eval_every and done % args.eval_every == 0):
            with stats_paused(trainer.model):
                loss = trainer.evaluate()["loss"]
            curve.append({"step": done, "train_flops": 3.0 * ledger.total, "val_loss": loss})
    train_balance = [b.as_dict() for b in layer_balance(trainer.model)]
    _, val_balance = trainer.evaluate_with_balance()
    worst = max((b["max_over_mean"] for b in train_balance), default=None)
    result = {
        "variant": name,
        "seed": seed,
        "steps": t.steps,
        "tokens": t.steps * tokens_per_step,
        "val_loss": curve[-1]["val_loss"],
        "train_loss_last": statistics.fmean(losses[window_start:]),
        "balance_loss_last": balance_loss,
        "train_flops": 3.0 * ledger.total,
        "train_flops_by_component": {k: 3.0 * v for k, v in ledger.by_component().items() if v},
        "train_wall_s": wall,
        "tokens_per_s": (t.steps - timed_from) * tokens_per_step / timed,
        "curve": curve,
        "load_balance_train_end": train_balance,
        "load_balance_val": [b.as_dict() for b in val_balance],
        "max_over_mean": worst,
        "dropped_fraction": max((b["dropped_fraction"] for b in train_balance), default=None),
        "collapsed": worst is not None and worst >= args.collapse_ratio,
        "unigram_baseline_loss": trainer.data.unigram_loss(),
    }
    result.update(parameter_counts(trainer.model))
    return result


def _previous_result(path: str) -> dict | None:
    """The sweep already written to ``path`` (``--resume``), or None when there is none yet."""
    if not path or not Path(path).exists():
        return None
    try:
        previous = json.loads(Path(path).read_text())
    except ValueError as err:
        previous = f"not JSON: {err}"
    if not isinstance(previous, dict) or not {"runs", "plans"} <= previous.keys():
        problem = previous if isinstance(previous, str) else "no 'runs' and 'plans'"
        raise ConfigError(
            f"--resume: {path} is not a sweep this script wrote ({problem}); fix: name its own --json, or drop --resume"
        )
    return previous


def _session_of(previous: dict) -> dict:
    """A sweep written before sessions were recorded, as one session (its time if it finished)."""
    runs = [[r["variant"], r["seed"]] for r in previous["runs"]]
    return {"args": previous.get("args"), "wall_s": previous.get("total_wall_s"), "trained": runs}


def check_equal_active_flops(plans: dict, tolerance: float) -> None:
    """Refuse a comparison whose variants do not spend the dense model's FLOPs per token."""
    reference_name = "dense" if "dense" in plans else next(iter(plans))
    reference = plans[reference_name]["active_flops_per_token"]["total"]
    for name, plan in plans.items():
        flops = plan["active_flops_per_token"]["total"]
        miss = flops / reference - 1
        if abs(miss) > tolerance:
            raise ConfigError(
                f"variant {name!r} runs {flops / 1e6:.4f} MFLOPs per token, {100 * miss:+.1f}% against "
                f"{reference_name!r}'s {reference / 1e6:.4f} (tolerance {100 * tolerance:.1f}%): the comparison "
                f"would not be at equal active compute. Remove the --set that changes model.moe widths or top_k "
                f"(the script sets top_k x d_expert + shared = model.d_ff itself), or raise --flops-tolerance"
            )


def summarise(runs: list[dict], names: list[str]) -> dict:
    """Per variant: mean, sample standard deviation and range over seeds, and the mean curve."""
    out = {}
    for name in names:
        rows = [r for r in runs if r["variant"] == name]
        losses = [r["val_loss"] for r in rows]
        balance = [r["max_over_mean"] for r in rows if r["max_over_mean"] is not None]
        dropped = [r["dropped_fraction"] for r in rows if r["dropped_fraction"] is not None]
        curve = [
            {
                "step": points[0]["step"],
                "train_flops": statistics.fmean(p["train_flops"] for p in points),
                "val_loss": statistics.fmean(p["val_loss"] for p in points),
            }
            for points in zip(*(r["curve"] for r in rows))
        ]
        out[name] = {
            "seeds": [r["seed"] for r in rows],
            "val_loss_by_seed": {str(r["seed"]): r["val_loss"] for r in rows},
            "val_loss_mean": statistics.fmean(losses),
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "val_loss_min": min(losses),
            "val_loss_max": max(losses),
            "train_flops_mean": statistics.fmean(r["train_flops"] for r in rows),
            "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in rows),
            "total_params": rows[0]["total_params"],
            "active_params": rows[0]["active_params"],
            "max_over_mean_worst": max(balance) if balance else None,
            "dropped_fraction_worst": max(dropped) if dropped else None,
            "collapsed_seeds": [r["seed"] for r in rows if r["collapsed"]],
            "curve": curve,
        }
    return out


def paired_gaps(summary: dict, name: str) -> list[float]:
    """Dense loss minus the variant's, seed by seed over the seeds both ran: a seed fixes the order
    of the training batches, so the part of the seed-to-seed spread that comes from the data
    cancels in the pair."""
    dense, other = summary["dense"]["val_loss_by_seed"], summary[name]["val_loss_by_seed"]
    return [dense[s] - other[s] for s in sorted(dense.keys() & other.keys(), key=int)]


def verdict(summary: dict) -> dict | None:
    """The best MoE variant (lowest mean validation loss) against dense, and whether the gap exceeds
    the seed spread (its worst seed below dense's best seed); also the same-seed (paired) gaps."""
    moe = {k: v for k, v in summary.items() if k != "dense"}
    if "dense" not in summary or not moe:
        return None
    best = min(moe, key=lambda k: moe[k]["val_loss_mean"])
    d, b = summary["dense"], moe[best]
    gaps = paired_gaps(summary, best)
    return {
        "paired_gaps": gaps,
        "paired_gap_min": min(gaps) if gaps else None,
        "best_moe": best,
        "best_val_loss_mean": b["val_loss_mean"],
        "dense_val_loss_mean": d["val_loss_mean"],
        "gap": d["val_loss_mean"] - b["val_loss_mean"],
        "seeds": min(len(d["seeds"]), len(b["seeds"])),
        "beyond_spread": b["val_loss_max"] < d["val_loss_min"],
        "all_stable": all(not v["collapsed_seeds"] for v in moe.values()),
    }


def format_table(summary: dict, plans: dict) -> str:
    lines = [
        "| variant | val loss (mean ± std) | range | active / total params | active MFLOPs/token "
        "| train TFLOPs | vs dense | tokens/s | max/mean load | dropped | dense - variant, same seed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense_flops = summary.get("dense", next(iter(summary.values())))["train_flops_mean"]
    for name, s in summary.items():
        load = "-" if s["max_over_mean_worst"] is None else f"{s['max_over_mean_worst']:.2f}"
        if s["collapsed_seeds"]:
            load += f" (collapsed: seeds {', '.join(map(str, s['collapsed_seeds']))})"
        dropped = "-" if s["dropped_fraction_worst"] is None else f"{100 * s['dropped_fraction_worst']:.2f}%"
        lines.append(
            f"| {name} | {s['val_loss_mean']:.4f} ± {s['val_loss_std']:.4f} | {s['val_loss_min']:.4f}-"
            f"{s['val_loss_max']:.4f} | {s['active_params'] / 1e6:.3f}M / {s['total_params'] / 1e6:.3f}M | "
            f"{plans[name]['active_flops_per_token']['total'] / 1e6:.4f} | {s['train_flops_mean'] / 1e12:.3f} | "
            f"{s['train_flops_mean'] / dense_flops:.4f} | {s['tokens_per_s_mean']:.0f} | {load} | {dropped} | "
            f"{_paired_text(summary, name)} |"
        )
    return "\n".join(lines)


def _paired_text(summary: dict, name: str) -> str:
    gaps = paired_gaps(summary, name) if "dense" in summary and name != "dense" else []
    if not gaps:
        return "-"
    spread = f" ± {statistics.stdev(gaps):.4f}" if len(gaps) > 1 else ""
    return f"{statistics.fmean(gaps):+.4f}{spread} (min {min(gaps):+.4f}, n={len(gaps)})"


def format_verdict(v: dict | None) -> str:
    if v is None:
        return "no verdict: the comparison needs dense and at least one MoE variant"
    text = (
        f"best MoE variant: {v['best_moe']}, validation loss {v['best_val_loss_mean']:.4f} against dense "
        f"{v['dense_val_loss_mean']:.4f} (dense - MoE = {v['gap']:+.4f} nats, means of {v['seeds']} seeds); "
        + (
            "one seed each: no spread measured"
            if v["seeds"] < 2
            else "beyond the seed spread (its worst seed beats dense's best)"
            if v["beyond_spread"]
            else "within the seed spread"
        )
    )
    if v["paired_gaps"]:
        text += (
            f"; seed by seed, dense - {v['best_moe']} = "
            + ", ".join(f"{g:+.4f}" for g in v["paired_gaps"])
            + (" (every seed in MoE's favour)" if v["paired_gap_min"] > 0 else "")
        )
    return text + ("; every MoE variant stable" if v["all_stable"] else "; some runs collapsed (see the table)")


def plot_curves(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, s) in enumerate(summary.items()):
        pts = s["curve"]
        style = "k-o" if name == "dense" else "-o"
        ax.plot(
            [p["train_flops"] / 1e12 for p in pts],
            [p["val_loss"] for p in pts],
            style,
            markersize=3,
            label=f"{name} (n={len(s['seeds'])})",
            **({} if name == "dense" else {"color": f"C{i}"}),
        )
    ax.set_xlabel("training TFLOPs (executed, forward + backward)")
    ax.set_ylabel("validation loss (nats/token), mean over seeds")
    ax.set_title("MoE routers against dense at equal active FLOPs per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # The early points are far above the rest; the comparison is in the last third.
    finals = [p["val_loss"] for s in summary.values() for p in s["curve"][len(s["curve"]) // 3 :]]
    if finals:
        ax.set_ylim(min(finals) - 0.05, max(finals) + 0.05)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="quickstart", help="the base decoder config (name or YAML path)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=50, help="steps between points of the loss curve")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--dataset", default=None, help="data.dataset (default: the base config's, tinyshakespeare)")
    p.add_argument("--data-path", default=None, help="data.path: a text file or folder (see docs/data.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    p.add_argument("--flops-tolerance", type=float, default=0.02, help="largest active-FLOPs miss against dense")
    p.add_argument("--collapse-ratio", type=float, default=2.0, help="max/mean load at which a run counts as collapsed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--json", default="runs/moe_vs_dense/results.json")
    p.add_argument("--plot", default=None, help="PNG of validation loss against training FLOPs")
    p.add_argument("--markdown", default=None, help="write the table and verdict to this file")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --json (same settings required) and train only the missing (variant, seed)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: dense and top2, one seed, 20 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.variants, args.seeds, args.steps, args.eval_every, args.eval_batches = ["dense", "top2"], [0], 20, 10, 2
    if args.steps < 1 or args.eval_every < 0:
        p.error("--steps must be >= 1 and --eval-every >= 0")
    if args.data_path and not args.dataset:
        p.error("--data-path needs --dataset NAME (any name that is not a built-in dataset, e.g. --dataset mine)")
    torch.set_num_threads(args.threads)

    common = [
        f"train.threads={args.threads}",
        f"train.steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 20)}",
        f"train.batch_size={args.batch_size}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        f"train.eval_batches={args.eval_batches}",
        "train.log_every=1000000",
    ]
    if args.dataset:
        common.append(f"data.dataset={args.dataset}")
    if args.data_path:
        common.append(f"data.path={args.data_path}")
    base = load_config(args.base, common + args.set).model
    d_ff, moe_every = base.d_ff, base.moe_every or 2  # a dense base gets MoE in every other block
    previous = _previous_result(args.json) if args.resume else None
    kept = previous["runs"] if previous else []
    names = [n for n in VARIANTS if n in args.variants or any(r["variant"] == n for r in kept)]
    plans = {}
    for name in names:
        overrides = common + variant_overrides(name, d_ff, moe_every) + args.set
        saved = previous["plans"].get(name, {}).get("overrides") if previous else None
        if saved is not None and saved != overrides:
            first = next((f"{a!r} there, {b!r} here" for a, b in zip(saved, overrides) if a != b), "a different count")
            raise ConfigError(
                f"--resume: the {name!r} runs in {args.json} were made with other settings ({first}); fix: give "
                f"the same options as that sweep, or a new --json to start afresh"
            )
        # Before any data is read the vocabulary may be unknown (head FLOPs 0): the head is the same
        # in every variant, so the blocks decide the check either way.
        cfg = load_config(args.base, overrides)
        if any(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers)) != (name != "dense"):
            raise ConfigError(
                f"variant {name!r}: the base config's MoE placement (model.moe_layers="
                f"{cfg.model.moe_layers}) overrides the variant's; fix: --set model.moe_layers=null"
            )
        flops = active_flops_per_token(cfg)
        plans[name] = {"overrides": overrides, "active_flops_per_token": flops}
    check_equal_active_flops(plans, args.flops_tolerance)

    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="moe_vs_dense_"))
    sessions = (previous.get("sessions") or [_session_of(previous)]) if previous else []
    result = {"hardware": hardware_info(), "args": vars(args), "plans": plans, "runs": list(kept)}
    session = {"args": vars(args), "wall_s": None, "trained": []}
    result["sessions"] = sessions + [session]
    done = {(r["variant"], r["seed"]) for r in kept}
    start = time.perf_counter()
    # Seed by seed, every variant each time, and the JSON rewritten after every run: a sweep cut
    # short still holds whole seeds of every variant, and --resume trains only what is missing.
    for seed in args.seeds:
        for name in args.variants:
            if (name, seed) in done:
                continue
            run = train_one(name, seed, args, plans[name]["overrides"], out_dir)
            result["runs"].append(run)
            session["trained"].append([name, seed])
            session["wall_s"] = time.perf_counter() - start
            write_json(result, args.json)
            print(
                f"{name} seed {seed}: val loss {run['val_loss']:.4f}, {run['train_flops'] / 1e12:.3f} TFLOPs, "
                f"{run['tokens_per_s']:.0f} tokens/s, max/mean {run['max_over_mean'] or 0:.2f}, "
                f"{time.perf_counter() - start:.0f} s so far",
                flush=True,
            )
    session["wall_s"] = time.perf_counter() - start
    walls = [s["wall_s"] for s in result["sessions"]]
    # A session cut short before it recorded its time leaves the total open (None), not understated.
    result["total_wall_s"] = sum(walls) if all(w is not None for w in walls) else None
    result["summary"] = summarise(result["runs"], names)
    result["verdict"] = verdict(result["summary"])
    table = format_table(result["summary"], plans)
    walls = ", ".join("unrecorded" if w is None else f"{w:.0f} s" for w in walls)
    text = f"{table}\n\n{format_verdict(result['verdict'])}\n\nwall time per session: {walls}"
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        plot_curves(result["summary"], args.plot)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
