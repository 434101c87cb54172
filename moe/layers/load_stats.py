"""Load-balance summaries of MoE layers, read from the statistics each layer accumulates."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from torch import nn

from dynamoe.layers.moe_layer import MoELayer


@dataclass
class LayerBalance:
    layer: int  # index of the MoE layer among the model's MoE layers, in depth order
    tokens: int  # tokens routed through the layer
    counts: list[int]  # kept assignments per expert
    max_over_mean: float  # 1.0 is perfect balance; E means one expert took everything
    cv: float  # coefficient of variation of the per-expert load
    dropped_fraction: float  # token choice: dropped / (tokens * k); expert choice: tokens no expert took
    entropy: float  # mean routing entropy per token, nats
    entropy_normalized: float  # entropy / ln(E): 1.0 is uniform routing, 0 fully confident
    block: int | None = None  # index of the model block (Transformer layer, CNN unit) the layer sits in

    def as_dict(self) -> dict:
        return asdict(self)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def layer_balance(model: nn.Module) -> list[LayerBalance]:
    rows = []
    for i, layer in enumerate(moe_layers(model)):
        counts = layer.stat_counts.double().cpu()
        tokens = float(layer.stat_tokens)
        mean = float(counts.mean())
        std = float(counts.std(unbiased=False))
        E = layer.num_experts
        router = layer.cfg.router
        slots = tokens if router.kind == "expert_choice" else tokens * router.top_k
        entropy = float(layer.stat_entropy_sum) / tokens if tokens else 0.0
        rows.append(
            LayerBalance(
                layer=i,
                block=layer.block_index,
                tokens=int(tokens),
                counts=[int(c) for c in counts.tolist()],
                max_over_mean=float(counts.max()) / mean if mean > 0 else 0.0,
                cv=std / mean if mean > 0 else 0.0,
                dropped_fraction=float(layer.stat_dropped) / slots if slots else 0.0,
                entropy=entropy,
                entropy_normalized=entropy / math.log(E) if E > 1 else 0.0,
            )
        )
    return rows


@contextmanager
def stats_paused(model: nn.Module):
    """Forward passes inside this block leave the MoE statistics untouched."""
    layers = moe_layers(model)
    for layer in layers:
        layer.record_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.record_stats = True


def reset_stats(model: nn.Module) -> None:
    for layer in moe_layers(model):
        layer.reset_stats()


def reduce_stats(model: nn.Module, reduce) -> None:
    """Sum every MoE layer's statistics over processes in place (``reduce`` e.g. an all-reduce)."""
    for layer in moe_layers(model):
        for buf in layer.stat_buffers():
            reduce(buf)


def format_balance_table(rows: list[LayerBalance]) -> str:
    if not rows:
        return "(no MoE layers)"
    header = (
        f"{'layer':>5} {'block':>5} {'tokens':>9} {'max/mean':>9} {'cv':>6} {'dropped':>8} {'entropy':>8} {'H/lnE':>6}"
        "  tokens per expert"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        block = "-" if r.block is None else r.block
        lines.append(
            f"{r.layer:>5} {block:>5} {r.tokens:>9} {r.max_over_mean:>9.3f} {r.cv:>6.3f} {r.dropped_fraction:>8.2%} "
            f"{r.entropy:>8.3f} {r.entropy_normalized:>6.3f}  {r.counts}"
        )
    return "\n".join(lines)
