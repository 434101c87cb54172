"""Routing metrics from recorded top-1 choices: load, stability between checkpoints, specialisation.

Pure functions on tensors, so they are tested on hand-constructed routing; ``RoutingRecorder``
collects the inputs from a model's routers with forward hooks during an evaluation pass.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn


def load_summary(counts_E: torch.Tensor, tokens: int, slots_per_token: int, dropped: float, entropy_sum: float) -> dict:
    """Tokens per expert, max/mean load, coefficient of variation, dropped fraction, entropy."""
    counts = counts_E.double()
    mean = float(counts.mean())
    E = counts.numel()
    entropy = entropy_sum / tokens if tokens else 0.0
    return {
        "tokens": int(tokens),
        "counts": [int(c) for c in counts.tolist()],
        "max_over_mean": float(counts.max()) / mean if mean > 0 else 0.0,
        "cv": float(counts.std(unbiased=False)) / mean if mean > 0 else 0.0,
        "dropped_fraction": dropped / (tokens * slots_per_token) if tokens else 0.0,
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(E) if E > 1 else 0.0,
    }


def routing_stability(top1_a: torch.Tensor, top1_b: torch.Tensor) -> float:
    """Fraction of tokens whose top-1 expert differs between two checkpoints (same tokens, same order)."""
    if top1_a.shape != top1_b.shape:
        raise ValueError(f"the two passes routed different token sets ({tuple(top1_a.shape)} vs {tuple(top1_b.shape)})")
    return float((top1_a != top1_b).double().mean()) if top1_a.numel() else 0.0


def specialisation(top1: torch.Tensor, keys: torch.Tensor, num_experts: int, top: int = 5) -> dict:
    """How much the top-1 expert says about a token's key (its token id, or its sample's class).

    Returns the normalised mutual information I(expert; key) / H(expert) (0: the expert tells
    nothing about the key, 1: it determines it... within the expert's own uncertainty), and for
    each expert its most frequent keys with their share of that expert's tokens. Keys < 0 are
    ignored (padding).
    """
    valid = keys >= 0
    top1, keys = top1[valid], keys[valid]
    if top1.numel() == 0:
        return {"nmi": 0.0, "experts": []}
    key_ids, key_index = torch.unique(keys, return_inverse=True)
    joint = torch.zeros(num_experts, key_ids.numel(), dtype=torch.float64)
    joint.index_put_((top1, key_index), torch.ones_like(top1, dtype=torch.float64), accumulate=True)
    p = joint / joint.sum()
    pe, pk = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pe @ pk)[nz]).log()).sum())
    he = float(-(pe[pe > 0] * pe[pe > 0].log()).sum())
    experts = []
    for e in range(num_experts):
        row = joint[e]
        total = float(row.sum())
        order = torch.argsort(row, descending=True)[:top]
        experts.append(
            {
                "expert": e,
                "tokens": int(total),
                "top_keys": [[int(key_ids[i]), float(row[i] / total)] for i in order.tolist() if row[i] > 0],
            }
        )
    return {"nmi": mi / he if he > 0 else 0.0, "experts": experts}


class RoutingRecorder:
    """Records, per MoE layer, every routed token's top-1 expert (the router's argmax) and its key."""

    def __init__(self, model: nn.Module):
        from dynamoe.layers.load_stats import moe_layers

        self.layers = moe_layers(model)
        self.top1: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.keys: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._batch_keys: torch.Tensor | None = None
        self._handles = []

    def set_keys(self, keys_B_or_BS: torch.Tensor) -> None:
        """Keys of the next forward: [B, S] per token (token ids), or [B] per sample (classes)."""
        self._batch_keys = keys_B_or_BS

    def _hook(self, index: int):
        def hook(module, inputs, routing):
            top1 = routing.probs.argmax(-1).cpu()
            keys = self._batch_keys
            if keys is not None and keys.dim() == 1 and top1.numel() % keys.shape[0] == 0:
                keys = keys.repeat_interleave(top1.numel() // keys.shape[0])  # a sample's key for each position
            if keys is None or keys.numel() != top1.numel():  # a subset of the tokens was routed: keys unknown
                keys = torch.full_like(top1, -1)
            self.top1[index].append(top1)
            self.keys[index].append(keys.reshape(-1).cpu())

        return hook

    def __enter__(self) -> RoutingRecorder:
        self._handles = [layer.router.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def result(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.top1[index]:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.top1[index]), torch.cat(self.keys[index])
