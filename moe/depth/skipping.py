"""Gated block skipping (SkipNet / ConvNet-AIG style): per sample, run a block or pass its input on.

A gate is a small MLP on the block input pooled over positions, giving two logits (skip, execute).
Training samples a hard decision with Gumbel-softmax and the straight-through estimator, so the
forward pass is exactly "block" or "identity" while the gate still gets gradient; inference takes
the larger logit. The temperature is annealed by the trainer (``set_progress``). A loss pulls the
execution rate to ``model.depth.target_rate`` (``accounting.skip_rate_loss``).
Shape legend: N samples, D pooled width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.config import DepthConfig


class SkipGate(nn.Module):
    def __init__(self, d_in: int, cfg: DepthConfig):
        super().__init__()
        self.hidden = nn.Linear(d_in, cfg.gate_hidden)
        self.out = nn.Linear(cfg.gate_hidden, 2)
        # Start open: a bias toward "execute" keeps the early network the plain one.
        nn.init.constant_(self.out.bias, 0.0)
        with torch.no_grad():
            self.out.bias[1] = 2.0
        self.t_start, self.t_end = cfg.gumbel_temperature, cfg.gumbel_temperature_min
        self.temperature = cfg.gumbel_temperature

    def set_progress(self, fraction: float) -> None:
        """Linear annealing of the Gumbel temperature over training (``fraction`` in [0, 1])."""
        self.temperature = self.t_start + (self.t_end - self.t_start) * min(max(fraction, 0.0), 1.0)

    def logits(self, pooled_ND: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(pooled_ND))).float()

    def forward(self, pooled_ND: torch.Tensor) -> torch.Tensor:
        """Per-sample decision [N] in {0, 1}: Gumbel straight-through in training, argmax otherwise."""
        logits = self.logits(pooled_ND)
        if self.training:
            return F.gumbel_softmax(logits, tau=self.temperature, hard=True)[:, 1]
        return (logits[:, 1] > logits[:, 0]).float()

    def flops(self, rows) -> int:
        return F_.linear_flops(rows, self.hidden.in_features, self.hidden.out_features) + F_.linear_flops(
            rows, self.out.in_features, 2
        )


def mix(x: torch.Tensor, y: torch.Tensor, g_N: torch.Tensor) -> torch.Tensor:
    """x + g (y - x) with g in {0, 1}, written so that g = 1 gives exactly y and g = 0 exactly x
    while d/dg is y - x either way (what the straight-through estimator passes to the gate)."""
    g = g_N.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    delta = y - x
    return torch.where(g > 0.5, y + (g - 1) * delta, x + g * delta)


def run_gated(block, x: torch.Tensor, g_N: torch.Tensor, compact: bool, *extra) -> tuple[torch.Tensor, list]:
    """The block where g = 1, the input where g = 0. ``compact`` (inference) runs the block only on
    the executing samples (index_select, index_copy); otherwise every sample runs and the result is
    mixed, which training needs for the gate's gradient. ``extra``: per-sample inputs of the block
    (an attention mask, or None). ``block`` returns (y, aux records)."""
    if not compact:
        y, aux = block(x, *extra)
        return mix(x, y, g_N), aux
    idx = (g_N > 0.5).nonzero().squeeze(1)
    if idx.numel() == 0:
        return x, []
    sub = [e.index_select(0, idx) if isinstance(e, torch.Tensor) else e for e in extra]
    y, aux = block(x.index_select(0, idx), *sub)
    return x.index_copy(0, idx, y), aux
