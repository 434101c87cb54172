"""Routers: which experts each token goes to, with what combine weight, and the balancing losses.

Two families share one output type, :class:`Routing`:
- token choice (``TokenChoiceRouter``): each token picks its top-k experts (Switch k=1, GShard
  and Mixtral k=2, fine-grained k up to E), optionally with a capacity that drops overflow;
- expert choice (``ExpertChoiceRouter``, Zhou et al. 2022): each expert picks its top-C tokens,
  so load is balanced by construction and a token may get any number of experts.

Assignments are ``experts`` [T, k] with -1 marking a dropped (or, for expert choice, unused)
slot, which is exactly what the dispatch kernels take.

Token choice reproduces the routers of the Hugging Face families (``tests/test_family_routers.py``
checks each against its transformers module): Mixtral (softmax, renormalised, also at k=1, so
``normalize: true``), Qwen3-MoE and OLMoE (softmax, ``normalize`` = ``norm_topk_prob``), DeepSeek-V3
and GLM-4-MoE (sigmoid, ``expert_bias`` = ``e_score_correction_bias``, ``n_group``/``topk_group``,
``normalize`` = ``norm_topk_prob``, ``routed_scaling_factor``; their shared experts are the MoE
layer's ``num_shared_experts``). One difference is left: those two divide by ``sum + 1e-20`` where
dynamoe divides by ``max(sum, 1e-20)``, the same number unless a token's k sigmoid scores sum to
less than about 1e-13 (every logit below about -30).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe import kernels
from dynamoe.config import RouterConfig
from dynamoe.layers.recompute import recomputing


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, k] fp32 combine weights, 0 where dropped; differentiable
    experts: torch.Tensor  # [T, k] int64 expert ids, -1 where dropped
    counts: torch.Tensor  # [E] int64 kept assignments per expert
    num_rows: int  # kept assignments in all (= counts.sum()), known without a device sync when dropless
    aux_loss: torch.Tensor  # scalar load-balancing loss, already scaled by its coefficient
    z_loss: torch.Tensor  # scalar router z-loss, already scaled by its coefficient
    probs: torch.Tensor  # [T, E] fp32 routing distribution (rows sum to 1), detached, for statistics
    dropped: torch.Tensor  # scalar int64: dropped assignments (token choice) or unserved tokens (expert choice)


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e is the fraction of the T*k assignments routed to expert e (not differentiable), P_e the
    mean routing probability of e (differentiable).
    """
    num_tokens, num_experts = probs_TE.shape
    f_E = counts_E.to(probs_TE.dtype) / (num_tokens * top_k)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, keeping router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def routing_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution."""
    p = probs_TE.clamp_min(1e-20)
    return -(p * p.log()).sum(dim=-1).mean()


def _keep_within_capacity(priority_N: torch.Tensor, experts_N: torch.Tensor, num_experts: int, capacity: int):
    """Boolean [N]: True for the ``capacity`` highest-priority assignments of each expert."""
    by_priority = torch.argsort(priority_N, descending=True, stable=True)
    by_expert = torch.argsort(experts_N[by_priority], stable=True)
    order = by_priority[by_expert]  # grouped by expert, highest priority first
    counts = torch.bincount(experts_N, minlength=num_experts)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - group_start[experts_N[order]]
    keep = torch.empty_like(experts_N, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep


class _RouterBase(nn.Module):
    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        # Router math in fp32 whatever the model's precision: small logit errors flip selections.
        return F.linear(x_TD.float(), self.gate.weight.float())

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_TE, -1) if self.cfg.score == "softmax" else torch.sigmoid(logits_TE)

    def capacity(self, num_tokens: int, factor: float) -> int:
        return max(1, math.ceil(factor * num_tokens * self.cfg.top_k / self.num_experts))


class TokenChoiceRouter(_RouterBase):
    """Each token takes its top-k experts; dropless unless a capacity factor is set."""

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        # Selection bias (auxiliary-loss-free balancing; DeepSeek-V3's e_score_correction_bias): it
        # moves which experts are chosen, never the combine weights, and is learned from load, not by
        # gradient. It is part of the routing function whenever it is nonzero: ``aux_free_bias`` only
        # decides whether ``update_bias`` moves it. A nonzero bias comes from training with
        # aux_free_bias or from an imported checkpoint, and the gate was trained beside it, so dropping
        # it when balancing is switched off would change which experts a trained model picks. It
        # starts at zero, and adding zero changes no score, so a router that never learned or loaded
        # a bias routes exactly as plain top-k. To freeze a learned bias set aux_free_bias false (or
        # bias_update_rate 0); to discard it, zero the buffer.
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("load_since_update", torch.zeros(num_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        num_tokens, k = x_TD.shape[0], cfg.top_k
        logits_TE = self.logits(x_TD)
        weights_Tk, experts_Tk, counts_E = kernels.topk_route(
            logits_TE,
            k,
            score=cfg.score,
            bias=self.expert_bias,
            normalize=cfg.renormalize,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        scores_TE = self.scores(logits_TE)
        # The balance loss takes every expert's probability, also those a group limit left out for
        # the token, and sigmoid scores normalised per token: DeepSeek-V3's balance loss does both.
        probs_TE = scores_TE if cfg.score == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        aux = (
            cfg.aux_loss_coef * load_balancing_loss(probs_TE, counts_E, k)
            if cfg.aux_loss_coef
            else logits_TE.new_zeros(())
        )
        z = cfg.z_loss_coef * router_z_loss(logits_TE) if cfg.z_loss_coef else logits_TE.new_zeros(())
        if self.training and cfg.aux_free_bias and not recomputing():
            self.load_since_update += counts_E.to(self.load_since_update.dtype)

        num_rows = num_tokens * k
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        if cfg.capacity_factor is not None:
            capacity = self.capacity(num_tokens, cfg.capacity_factor)
            flat_experts = experts_Tk.reshape(-1)
            if cfg.drop_policy == "probs":
                priority = weights_Tk.detach().reshape(-1)
            else:  # earlier tokens first
                priority = -torch.arange(flat_experts.numel(), device=x_TD.device, dtype=torch.float32)
            keep_Tk = _keep_within_capacity(priority, flat_experts, self.num_experts, capacity).view_as(experts_Tk)
            experts_Tk = torch.where(keep_Tk, experts_Tk, torch.full_like(experts_Tk, -1))
            weights_Tk = weights_Tk * keep_Tk
            kept_counts_E = torch.bincount(experts_Tk[keep_Tk], minlength=self.num_experts)
            dropped = counts_E.sum() - kept_counts_E.sum()
            counts_E = kept_counts_E
            num_rows = int(counts_E.sum())  # data-dependent: the one sync of the capacity path
        return Routing(weights_Tk, experts_Tk, counts_E, num_rows, aux, z, probs_TE.detach(), dropped)

    @torch.no_grad()
    def discard_load(self) -> None:
        """Forget the load counted since the last bias update (a step that applied no update)."""
        self.load_since_update.zero_()

    @torch.no_grad()
    def update_bias(self, reduce=None) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the over-loaded.

        Call once per optimizer step. ``reduce`` (e.g. an all-reduce over data-parallel ranks)
        makes every replica see the same global load, so their biases stay identical.
        """
        if not self.cfg.aux_free_bias:
            return
        load = self.load_since_update.clone()
        if reduce is not None:
            reduce(load)
        if load.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()


class ExpertChoiceRouter(_RouterBase):
    """Each expert takes its top-C tokens, C = capacity_factor * T * top_k / E (capped at T).

    The result uses k = E slots per token: slot e holds expert e if it chose the token, else -1.
    """

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        num_tokens, num_experts = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        scores_TE = self.scores(logits_TE)
        probs_TE = scores_TE if cfg.score == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        capacity = min(num_tokens, self.capacity(num_tokens, cfg.capacity_factor or 1.0))
        # Stable sort so equal scores go to the earlier token, as top-k routing prefers lower experts.
        _, order_ET = torch.sort(scores_TE.detach().t(), dim=-1, descending=True, stable=True)
        chosen_EC = order_ET[:, :capacity]
        chosen_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x_TD.device)
        chosen_TE[chosen_EC, torch.arange(num_experts, device=x_TD.device).unsqueeze(1)] = True
        expert_ids = torch.arange(num_experts, device=x_TD.device).expand(num_tokens, num_experts)
        experts_TE = torch.where(chosen_TE, expert_ids, torch.full_like(expert_ids, -1))
        weights_TE = scores_TE * chosen_TE
        counts_E = torch.full((num_experts,), capacity, dtype=torch.long, device=x_TD.device)
        z = cfg.z_loss_coef * router_z_loss(logits_TE) if cfg.z_loss_coef else logits_TE.new_zeros(())
        dropped = (~chosen_TE.any(dim=1)).sum()
        aux = logits_TE.new_zeros(())  # balanced by construction
        return Routing(weights_TE, experts_TE, counts_E, capacity * num_experts, aux, z, probs_TE.detach(), dropped)

    def update_bias(self, reduce=None) -> None:
        return None

    def discard_load(self) -> None:
        return None


def build_router(cfg: RouterConfig, d_model: int, num_experts: int) -> nn.Module:
    if cfg.kind == "expert_choice":
        return ExpertChoiceRouter(cfg, d_model, num_experts)
    return TokenChoiceRouter(cfg, d_model, num_experts)
