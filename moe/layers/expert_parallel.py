"""Expert parallelism: experts sharded over a process group, tokens exchanged with all-to-all.

Rank r of an expert-parallel group of size P owns the global experts [r * E/P, (r+1) * E/P).
The dispatcher keeps the MoE layer's interface (``dispatch`` / ``combine``) and is the only code
that communicates; parallelism is applied to a built single-device model from outside with
:func:`shard_experts`, so model constructors never see a process group.

One dispatch, per layer and step:
    permute locally by global expert -> x_sorted [N, d]
    all-to-all the per-expert counts [E] (so every rank knows what it will receive)
    all-to-all the rows, uneven splits (rows for rank p are contiguous in x_sorted)
    reorder received rows from (source, local expert) to (local expert, source) -> grouped GEMMs
and ``combine`` runs the same steps backwards. Each all-to-all is an autograd function whose
backward is the reverse exchange.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dynamoe import kernels
from dynamoe.layers.dispatcher import DispatchState
from dynamoe.layers.moe_layer import MoELayer
from dynamoe.layers.router import Routing


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group, traffic, watch):
        ctx.splits = (output_splits, input_splits)
        ctx.group, ctx.traffic = group, traffic
        ctx.watch = None if watch is None else (watch[0], f"backward of {watch[1]}")
        return _exchange(x, output_splits, input_splits, group, traffic, watch)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        out = _AllToAll.apply(grad, input_splits, output_splits, ctx.group, ctx.traffic, ctx.watch)
        return out, None, None, None, None, None


def _watched(watch):
    """The collective marker of ``watch`` = (monitor, label), e.g. the trainer's
    ``CollectiveWatchdog``, which names this all-to-all if a rank goes missing in it."""
    return nullcontext() if watch is None else watch[0].collective(f"all_to_all ({watch[1]})")


def _exchange(x, output_splits, input_splits, group, traffic, watch=None) -> torch.Tensor:
    out = x.new_empty(sum(output_splits), *x.shape[1:])
    with _watched(watch):
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    if traffic is not None:
        me = dist.get_rank(group)
        remote_rows = sum(n for p, n in enumerate(input_splits) if p != me)
        traffic.bytes_sent += remote_rows * math.prod(x.shape[1:]) * x.element_size()
    return out


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, traffic=None, watch=None
) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group, traffic, watch)


class _Permutation(torch.autograd.Function):
    """y = x[order] for a permutation ``order``; the gradient is the inverse permutation."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass(frozen=True)
class ExpertParallelState(DispatchState):
    send_splits: list[int]  # rows this rank sends to each rank of the group
    recv_splits: list[int]  # rows this rank receives from each rank
    order: torch.Tensor  # received rows -> (local expert, source) order
    inverse: torch.Tensor


@dataclass
class TrafficCounter:
    """Bytes of token rows this rank sent to other ranks through the all-to-alls: dispatch and
    combine, forward and backward (the per-expert counts, E integers per dispatch, are not counted)."""

    bytes_sent: int = 0

    def reset(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent


class AllToAllDispatcher:
    """Dispatch over an expert-parallel group; the layer's experts are this rank's shard."""

    def __init__(self, num_experts: int, group, traffic: TrafficCounter | None = None):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local = num_experts // self.ep_size
        self.traffic = traffic
        self.monitor = None  # marks each all-to-all (``watch_all_to_alls``)
        self.name = "MoE layer"

    def _watch(self, what: str):
        return None if self.monitor is None else (self.monitor, f"{what}, {self.name}")

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        P, E_local = self.ep_size, self.num_local
        x_sorted, row_map = kernels.permute(x_TD, routing.experts, self.num_experts, routing.num_rows)
        counts_PE = routing.counts.view(P, E_local)
        recv_counts = torch.empty_like(routing.counts)
        with _watched(self._watch("dispatch counts")):
            dist.all_to_all_single(recv_counts, routing.counts.contiguous(), group=self.group)
        recv_counts_PE = recv_counts.view(P, E_local)  # [source rank, my local expert]
        # Uneven splits must be host integers: the one synchronisation expert parallelism needs.
        send_splits = counts_PE.sum(1).tolist()
        recv_splits = recv_counts_PE.sum(1).tolist()
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, self.group, self.traffic, self._watch("dispatch"))
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(E_local, device=x_TD.device).repeat(P), recv_counts.to(x_TD.device)
        )
        order = torch.argsort(local_expert_of_row, stable=True)  # (local expert, source) order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        x_local = _Permutation.apply(x_recv, order, inverse)
        state = ExpertParallelState(row_map, routing.weights, send_splits, recv_splits, order, inverse)
        return x_local, recv_counts_PE.sum(0), state

    def combine(self, y_local: torch.Tensor, state: ExpertParallelState) -> torch.Tensor:
        y_recv = _Permutation.apply(y_local, state.inverse, state.order)
        y_sorted = all_to_all(
            y_recv, state.send_splits, state.recv_splits, self.group, self.traffic, self._watch("combine")
        )
        return kernels.unpermute(y_sorted, state.row_map, state.weights)


def watch_all_to_alls(model: nn.Module, monitor) -> None:
    """Mark every all-to-all of ``model``'s expert-parallel layers with ``monitor`` (anything with a
    ``collective(label)`` context manager), each labelled with its MoE layer's index."""
    for j, layer in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            layer.dispatcher.monitor = monitor
            block = "" if layer.block_index is None else f", block {layer.block_index}"
            layer.dispatcher.name = f"MoE layer {j}{block}"


def is_expert_param(p: nn.Parameter) -> bool:
    return getattr(p, "allreduce", True) is False


@torch.no_grad()
def shard_experts(model: nn.Module, group, group_name: str, traffic: TrafficCounter | None = None) -> None:
    """Keep only this rank's experts in every MoE layer of ``model`` and route through all-to-all.

    Expert parameters are tagged the way DeepSpeed recognises MoE parameters (``allreduce =
    False`` and ``group_name``), so their gradients are reduced over the expert-data-parallel group
    only, and everything else over the whole data-parallel group.
    """
    ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        experts = layer.experts
        if experts.num_experts % ep_size:
            raise ValueError(f"{experts.num_experts} experts cannot be split over {ep_size} ranks")
        n = experts.num_experts // ep_size
        experts.shard(first=ep_rank * n, count=n)
        if ep_size > 1:
            layer.dispatcher = AllToAllDispatcher(layer.num_experts, group, traffic)
        for p in experts.parameters():
            p.allreduce = False
            p.group_name = group_name
