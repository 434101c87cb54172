"""Dispatchers move routed tokens to their experts' rows and back.

This is the only place that will know where experts live: the local dispatcher here keeps every
expert on this device; an expert-parallel dispatcher (all-to-all over the expert-parallel group)
has the same two methods, so the MoE layer never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynamoe import kernels
from dynamoe.layers.router import Routing


@dataclass(frozen=True)
class DispatchState:
    row_map: torch.Tensor  # [T, k] sorted row of each assignment, -1 where dropped
    weights: torch.Tensor  # [T, k] combine weights


class LocalDispatcher:
    """All experts on this device: permute into expert order, unpermute with the combine weights."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Returns (x_sorted [N, d], counts [E_local], state for :meth:`combine`)."""
        x_sorted, row_map = kernels.permute(x_TD, routing.experts, self.num_experts, routing.num_rows)
        return x_sorted, routing.counts, DispatchState(row_map, routing.weights)

    def combine(self, y_sorted: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return kernels.unpermute(y_sorted, state.row_map, state.weights)

    def fuses(self, x_TD: torch.Tensor) -> bool:
        """Whether :meth:`fused` applies: a backend with a fused expert MLP (Triton) runs on ``x_TD``."""
        return kernels.fused_moe_available(x_TD)

    def fused(self, x_TD: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        """dispatch -> experts -> combine in one op: the permuted copy of x is never materialised."""
        return experts.forward_tokens(x_TD, routing.experts, routing.weights, routing.counts, routing.num_rows)
