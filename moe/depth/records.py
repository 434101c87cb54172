"""What each block really computed: one :class:`DepthAux` per block (Transformer layer or CNN block)
and forward pass, FLOPs split by component, and the sums that turn them into compute per token.

FLOPs follow ``dynamoe.compute.flops`` (multiply-add = 2, matrix products only) and count the rows actually
given to each matrix product, padding rows included where a packed batch carries them. Counts may be
0-d tensors, so no host synchronisation is needed until a summary is read.
Components: attention, ffn_dense, moe_router, moe_experts, moe_shared, conv (CNN blocks),
halting (halting units), gate (skip gates), mod_router, mod_predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dynamoe.config import DepthConfig


@dataclass(frozen=True)
class DepthAux:
    unit: int  # layer (Transformer) or block (CNN), in depth order
    kind: str  # dense, act, pondernet, skip or mod
    rows: Any  # tokens (Transformer: batch * seq) or samples (CNN) that reached the unit
    executed: Any  # of those, the rows the block updated (number or 0-d tensor)
    flops: dict  # component -> FLOPs executed
    full_flops: float  # the plain block on every row, without depth units
    loss: torch.Tensor | None = None  # this unit's weighted depth loss (ponder cost, predictor loss)
    rate: torch.Tensor | None = None  # skip: share of rows executed, differentiable (straight-through)
    stats: dict = field(default_factory=dict)  # detached extras (e.g. MoD predictor agreement)

    @property
    def total_flops(self):
        return sum(self.flops.values())


def skip_rate_loss(records: list[DepthAux], cfg: DepthConfig) -> torch.Tensor | None:
    """Pull the gates' execution rate to ``target_rate``: each gated block's rate ("layer", as in
    ConvNet-AIG), or the FLOPs-weighted mean rate over the gated blocks ("flops")."""
    gated = [r for r in records if r.rate is not None]
    if not gated:
        return None
    rates = torch.stack([r.rate for r in gated])
    if cfg.rate_loss == "layer":
        gap = ((rates - cfg.target_rate) ** 2).mean()
    else:
        weights = torch.tensor([float(r.full_flops) for r in gated], dtype=rates.dtype, device=rates.device)
        gap = ((weights * rates).sum() / weights.sum() - cfg.target_rate) ** 2
    return cfg.rate_loss_coef * gap


def depth_loss(records: list[DepthAux], cfg: DepthConfig) -> torch.Tensor | None:
    """Every depth loss of one forward pass: the units' own terms plus the skip-rate term; None
    when there is none (mode none), so a plain model's total loss is untouched."""
    terms = [r.loss for r in records if r.loss is not None]
    rate = skip_rate_loss(records, cfg)
    if rate is not None:
        terms.append(rate)
    if not terms:
        return None
    return torch.stack([t.float() for t in terms]).sum()


def depth_summary(records: list[DepthAux]) -> dict:
    """Compute of one pass: FLOPs by component, their total, per token (or sample), the share of
    the plain network's block FLOPs, and the share of (row, block) pairs executed."""
    if not records:
        return {}
    by_component: dict[str, float] = {}
    for r in records:
        for name, value in r.flops.items():
            by_component[name] = by_component.get(name, 0.0) + float(value)
    total = sum(by_component.values())
    full = sum(float(r.full_flops) for r in records)
    rows = float(records[0].rows)
    executed = sum(float(r.executed) for r in records) / max(sum(float(r.rows) for r in records), 1.0)
    return {
        "flops": total,
        "full_flops": full,
        "flops_per_row": total / max(rows, 1.0),
        "compute_fraction": total / full if full else 1.0,
        "executed_fraction": executed,
        "by_component": by_component,
    }
