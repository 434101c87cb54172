"""The MoE feed-forward layer: router -> dispatch -> grouped expert GEMMs -> combine.

Statistics are both returned per call (:class:`MoEAux`) and accumulated in non-persistent buffers
(tokens per expert, dropped assignments, routing entropy), so evaluation can read the load of a
whole pass without any module-level state. Nothing here knows about processes or devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynamoe.config import MoEConfig
from dynamoe.layers.dispatcher import LocalDispatcher
from dynamoe.layers.experts import DenseMLP, GroupedExperts
from dynamoe.layers.recompute import recomputing
from dynamoe.layers.router import build_router, routing_entropy


@dataclass(frozen=True)
class MoEAux:
    aux_loss: torch.Tensor  # scaled load-balancing loss (differentiable)
    z_loss: torch.Tensor  # scaled router z-loss (differentiable)
    counts: torch.Tensor  # [E] kept assignments per expert (detached)
    dropped: torch.Tensor  # dropped assignments (token choice) or unserved tokens (expert choice)
    entropy: torch.Tensor  # mean routing entropy, nats
    num_tokens: int
    block: int | None = None  # index of the model block the layer sits in (None: a layer on its own)

    @property
    def loss(self) -> torch.Tensor:
        return self.aux_loss + self.z_loss


class MoELayer(nn.Module):
    def __init__(
        self,
        cfg: MoEConfig,
        d_model: int,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        bias: bool = False,
    ):
        """``bias``: experts (and shared experts) with biases, as the FFNs of BERT-family encoders have."""
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = build_router(cfg.router, d_model, cfg.num_experts)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.d_expert, cfg.activation, init_std, bias)
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        self.shared = None
        if cfg.num_shared_experts:
            d_shared = cfg.num_shared_experts * (cfg.d_shared or cfg.d_expert)
            self.shared = DenseMLP(d_model, d_shared, cfg.activation, init_std, bias)
        if out_init_std is not None:
            nn.init.normal_(self.experts.w2_EFD, std=out_init_std)
            if self.shared is not None:
                nn.init.normal_(self.shared.w_out.weight, std=out_init_std)
        E = cfg.num_experts
        self.block_index: int | None = None  # set by the model: metrics name the layer by its block
        self.record_stats = True  # off for passes that must not count (stand-in rows)
        self.register_buffer("stat_counts", torch.zeros(E, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_dropped", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("stat_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("stat_entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """x [..., d] -> (y [..., d], MoEAux)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        routing = self.router(x_TD)
        fusable = isinstance(self.dispatcher, LocalDispatcher) and not self.experts.has_bias
        if fusable and self.dispatcher.fuses(x_TD):
            y_TD = self.dispatcher.fused(x_TD, routing, self.experts)
        else:
            x_sorted, counts_E, state = self.dispatcher.dispatch(x_TD, routing)
            y_sorted = self.experts(x_sorted, counts_E)
            y_TD = self.dispatcher.combine(y_sorted, state)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        with torch.no_grad():
            entropy = routing_entropy(routing.probs)
            num_tokens = x_TD.shape[0]
            if self.record_stats and not recomputing():  # a recomputation for backward counted already
                self.stat_counts += routing.counts.to(torch.float64)
                self.stat_dropped += routing.dropped.to(torch.float64)
                self.stat_tokens += num_tokens
                self.stat_entropy_sum += entropy.to(torch.float64) * num_tokens
        aux = MoEAux(
            routing.aux_loss,
            routing.z_loss,
            routing.counts.detach(),
            routing.dropped,
            entropy,
            num_tokens,
            self.block_index,
        )
        return y_TD.reshape(shape), aux

    def stat_buffers(self) -> tuple[torch.Tensor, ...]:
        """The accumulated statistics, all sums, so they can be added across processes."""
        return self.stat_counts, self.stat_dropped, self.stat_tokens, self.stat_entropy_sum

    @torch.no_grad()
    def reset_stats(self) -> None:
        for buf in self.stat_buffers():
            buf.zero_()
