"""A self-contained HTML report of a `moe eval` result: tables, and the plots embedded as data
URIs, so the one file can be mailed or archived without its folder."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from dynamoe.evals.report import moe_layer_label

CAPTIONS = {
    "training_curves": "Training (and validation) loss, the learning rate as applied, and the scaled auxiliary "
    "router loss, at every training log step.",
    "load_heatmap": "Expert load over training: share of each expert's assignments per MoE layer and log step, "
    "on one colour scale for all layers.",
    "load_histogram": "Assignments per expert on the validation pass; dashed: perfect balance.",
    "compute_breakdown": "MFLOPs per token by component, full network and early exit.",
    "exit_distribution": "Share of validation samples leaving at each exit, named as in model.exits.layers.",
    "accuracy_vs_compute": "Validation accuracy against MFLOPs per sample: one exit for all (anytime) and "
    "a shared threshold swept (budgeted batch).",
    "depth_vs_compute": "Conditional depth: validation quality against executed MFLOPs per token as the mode's "
    "inference knob (halting threshold, capacity) is swept.",
    "loss_vs_compute": "Decoder with per-token exits: validation loss against layers per token, threshold swept.",
}


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(result: dict, plot_dir: Path, path: Path) -> Path:
    step = result.get("step")
    sections = [
        f"<h1>dynamoe evaluation: {html.escape(str(result.get('config') or 'run'))}"
        f"{'' if step is None else f', step {step}'}</h1>"
        f"<p>{html.escape(result['source'])}: {result['task']} ({result['model_kind']}), "
        f"{result['samples']} samples, {result['tokens']} tokens</p>"
    ]
    sections.append("<h2>Quality</h2>" + _table(["metric", "value"], [[k, v] for k, v in result["metrics"].items()]))
    c = result["compute"]["full"]
    rows = [[k, v / 1e6] for k, v in c["by_component_per_token"].items() if v]
    rows += [
        ["total", c["flops_per_token"] / 1e6],
        ["dense equivalent", result["compute"]["dense_equivalent_flops_per_token"] / 1e6],
        ["fraction of dense equivalent", c["fraction_of_dense_equivalent"]],
    ]
    sections.append("<h2>Compute per token (MFLOPs)</h2>" + _table(["component", "full network"], rows))
    if result["load_balance"]:
        rows = [
            [
                moe_layer_label(r, prefix=""),
                r["tokens"],
                r["max_over_mean"],
                r["cv"],
                100 * r["dropped_fraction"],
                r["entropy_normalized"],
                r["specialisation"]["nmi"],
            ]
            for r in result["load_balance"]
        ]
        sections.append(
            "<h2>Load balance</h2>"
            + _table(["MoE layer", "tokens", "max/mean", "CV", "dropped %", "H/lnE", "specialisation NMI"], rows)
        )
    if "routing_stability" in result:
        s = result["routing_stability"]
        rows = [[i, 100 * f] for i, f in enumerate(s["changed_fraction"])]
        sections.append(
            f"<h2>Routing stability</h2><p>against {html.escape(s['against'])}, on the same tokens</p>"
            + _table(["MoE layer", "top-1 expert changed, % of tokens"], rows)
        )
    if "exits" in result:
        e = result["exits"]
        labels = e.get("exit_labels") or [f"after layer {n}" for n in e["exit_layers"]]
        rows = [[label, n] for label, n in zip(labels, e["exit_counts"])]
        sections.append(
            f"<h2>Early exit</h2><p>policy {e['policy']}, thresholds from {html.escape(e['thresholds_from'])}: "
            f"accuracy {e['accuracy']:.4f} at {e['compute']['fraction_of_full']:.3f} of the full network's "
            "FLOPs</p>" + _table(["exit", "samples"], rows)
        )
    figures = []
    for name, file in result.get("plots", {}).items():
        data = base64.b64encode((plot_dir / file).read_bytes()).decode()
        figures.append(
            f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>"
        )
    sections.append("<h2>Plots</h2>" + "".join(figures))
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555;font-size:90%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dynamoe eval</title><style>{style}</style>"
        f"</head><body>{''.join(sections)}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
