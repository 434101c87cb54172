"""PNG plots of a `moe eval` result (matplotlib, headless): load over training, load histogram,
compute by component, exit-layer distribution, accuracy against GFLOPs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from dynamoe.evals.report import moe_layer_label  # noqa: E402


def _save(fig, path: Path, tight: bool = True) -> str:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def load_heatmap(training: dict, path: Path) -> str | None:
    """Share of each expert's load (colour) per MoE layer, over the training log steps; one colour
    scale for every layer, so layers compare by colour."""
    layers = training["layers"]
    if not layers or not training["steps"]:
        return None
    shares = [[[c / max(sum(row), 1) for c in row] for row in counts] for counts in layers]
    top = max(max(max(row) for row in share) for share in shares) or 1.0
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.8 + 1.6 * len(layers)), squeeze=False)
    for i, share in enumerate(shares):
        ax = axes[i][0]
        columns = list(map(list, zip(*share)))  # expert x step
        first, last = training["steps"][0], training["steps"][-1]
        if first == last:  # one log step: give the single column some width
            first, last = first - 0.5, last + 0.5
        im = ax.imshow(
            columns,
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            extent=(first, last, len(columns) - 0.5, -0.5),
            vmin=0.0,
            vmax=top,
        )
        ax.set_ylabel(f"MoE layer {i}\nexpert")
    axes[-1][0].set_xlabel("training step")
    axes[0][0].set_title("expert load over training (layer x expert)")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    # One colour bar in a column of its own, for every layer (they share the scale).
    cax = fig.add_axes((0.89, 0.12, 0.025, 0.76))
    fig.colorbar(im, cax=cax, label="share of the layer's assignments")
    return _save(fig, path, tight=False)


def load_histogram(load: list[dict], path: Path) -> str | None:
    if not load:
        return None
    fig, axes = plt.subplots(1, len(load), figsize=(3.2 * len(load) + 1, 3), squeeze=False)
    for ax, row in zip(axes[0], load):
        counts = row["counts"]
        ax.bar(range(len(counts)), counts, color="C0")
        mean = sum(counts) / len(counts)
        ax.axhline(mean, color="C3", linestyle="--")  # perfect balance (the caption says so: no legend on the bars)
        ax.set_title(f"{moe_layer_label(row)}: max/mean {row['max_over_mean']:.2f}", fontsize=9)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("assignments (validation)")
    return _save(fig, path)


def compute_breakdown(compute: dict, path: Path, exit_compute: dict | None) -> str:
    rows = [("full network", compute["by_component_per_token"])]
    if exit_compute is not None:
        rows.append(("early exit", exit_compute["by_component_per_token"]))
    components = [c for c in rows[0][1] if any(r[1].get(c, 0) for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 2.2 + 0.8 * len(rows)))
    for y, (_label, values) in enumerate(rows):
        left = 0.0
        for k, c in enumerate(components):
            width = values.get(c, 0.0) / 1e6
            ax.barh(y, width, left=left, color=f"C{k % 10}", label=c if y == 0 else None)
            left += width
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("MFLOPs per token")
    ax.set_title("compute per token by component")
    # Below the axes, so it hides no bar.
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
    return _save(fig, path)


def exit_distribution(exits: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    total = sum(exits["exit_counts"]) or 1
    labels = exits.get("exit_labels") or [str(layer) for layer in exits["exit_layers"]]
    ax.bar(labels, [n / total for n in exits["exit_counts"]], color="C2")
    ax.set_xlabel("exit (as the config names it)")
    ax.set_ylabel("share of samples")
    ax.set_title(f"where samples leave ({exits['policy']})")
    return _save(fig, path)


def accuracy_vs_compute(exits: dict, path: Path) -> str:
    curves = exits["curves"]
    fig, ax = plt.subplots(figsize=(6, 4))
    # MFLOPs, the unit of every FLOP figure in the report.
    b = sorted(curves["budgeted"], key=lambda p: p["gflops_per_sample"])
    ax.plot(
        [1e3 * p["gflops_per_sample"] for p in b], [p["accuracy"] for p in b], "-", color="C0", label="budgeted batch"
    )
    a = curves["anytime"]
    ax.plot(
        [1e3 * p["gflops_per_sample"] for p in a],
        [p["accuracy"] for p in a],
        "o--",
        color="C1",
        label="anytime (one exit)",
    )
    ax.axvline(1e3 * curves["full_gflops_per_sample"], color="grey", linestyle=":", label="full network")
    ax.set_xlabel("MFLOPs per sample")
    ax.set_ylabel("validation accuracy")
    ax.set_title("accuracy against compute")
    ax.legend()
    return _save(fig, path)


def loss_vs_compute(token_exits: dict, path: Path) -> str:
    points = sorted(token_exits["curve"], key=lambda p: p["layers_per_token"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["layers_per_token"] for p in points], [p["loss"] for p in points], "o-", color="C0")
    ax.set_xlabel("layers per token")
    ax.set_ylabel("validation loss")
    ax.set_title(f"per-token exits: loss against depth ({token_exits['policy']})")
    return _save(fig, path)


def depth_vs_compute(depth: dict, task: str, path: Path) -> str:
    metric = "loss" if task == "lm" else "accuracy"
    points = sorted(depth["curve"], key=lambda p: p["flops_per_token"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["flops_per_token"] / 1e6 for p in points], [p[metric] for p in points], "o-", color="C4")
    for p in points:
        ax.annotate(str(p["setting"]), (p["flops_per_token"] / 1e6, p[metric]), fontsize=7)
    ax.set_xlabel("MFLOPs per token (executed)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{depth['mode']}: {metric} against compute" + (f" ({depth['knob']} swept)" if depth["knob"] else ""))
    return _save(fig, path)


def training_curves(curves: dict, path: Path) -> str | None:
    """Training and validation loss, learning rate and auxiliary (router) loss against the step."""
    if not curves or not curves["train"]["step"]:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    train, val = curves["train"], curves["eval"]
    axes[0].plot(train["step"], train["loss"], color="C0", label="training")
    if val["step"]:
        axes[0].plot(val["step"], val["loss"], "o-", color="C1", label="validation")
    axes[0].set_title("loss (nats per token or sample)", fontsize=9)
    axes[0].legend(fontsize=7, frameon=False)
    axes[1].plot(train["step"], train["lr"], color="C2")
    axes[1].set_title("learning rate (as applied)", fontsize=9)
    axes[2].plot(train["step"], train["aux_loss"], color="C3")
    axes[2].set_title("auxiliary loss (balance + z, scaled)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("training step")
    return _save(fig, path)


def write_plots(result: dict, out: Path) -> dict:
    """Write every plot the result supports into ``out``; returns {name: file name}."""
    plots = {}
    for name, make in (
        ("training_curves", lambda p: training_curves(result.get("training_curves"), p)),
        ("load_heatmap", lambda p: load_heatmap(result["training_load"], p)),
        ("load_histogram", lambda p: load_histogram(result["load_balance"], p)),
        (
            "compute_breakdown",
            lambda p: compute_breakdown(result["compute"]["full"], p, result.get("exits", {}).get("compute")),
        ),
        ("exit_distribution", lambda p: exit_distribution(result["exits"], p) if "exits" in result else None),
        ("accuracy_vs_compute", lambda p: accuracy_vs_compute(result["exits"], p) if "exits" in result else None),
        ("loss_vs_compute", lambda p: loss_vs_compute(result["token_exits"], p) if "token_exits" in result else None),
        (
            "depth_vs_compute",
            lambda p: depth_vs_compute(result["depth"], result["task"], p) if "depth" in result else None,
        ),
    ):
        written = make(out / f"{name}.png")
        if written:
            plots[name] = written
    return plots
