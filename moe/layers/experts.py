"""Expert weights: dense MLPs and stacked per-expert MLPs that run as grouped GEMMs.

Shape legend: N dispatched rows, d model width, f hidden width, E experts.
Weights are stored as ``[E, d, f]`` (input-major) so a row block times its expert's slice is a
plain ``x @ w[e]``; both MLP kinds are bias-free, so one expert equals a dense FFN exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamoe import kernels
from dynamoe.kernels.moe_mlp import activate


class DenseMLP(nn.Module):
    """A bias-free FFN: d -> f -> d with GELU, or SwiGLU (two input projections)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu", init_std: float = 0.02):
        super().__init__()
        self.activation = activation
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Linear(d_model, width, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class GroupedExperts(nn.Module):
    """E independent MLPs stored as stacked weights, applied to expert-sorted rows."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "gelu", init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts  # global count; this module may hold a shard of them
        self.first_expert = 0  # global id of the first expert held here
        self.num_local = num_experts
        self.activation = activation
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, width))  # SwiGLU: [gate | up]
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        nn.init.normal_(self.w1_EDF, std=init_std)
        nn.init.normal_(self.w2_EFD, std=init_std)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets = kernels.offsets_from_counts(counts_E)
        h_NF = kernels.grouped_mm(x_ND, self.w1_EDF.to(x_ND.dtype), offsets=offsets)
        return kernels.grouped_mm(activate(h_NF, self.activation), self.w2_EFD.to(x_ND.dtype), offsets=offsets)

    def forward_tokens(
        self,
        x_TD: torch.Tensor,
        experts_Tk: torch.Tensor,
        weights_Tk: torch.Tensor,
        counts_E: torch.Tensor,
        num_rows: int,
    ) -> torch.Tensor:
        """Dispatch, both GEMMs and the weighted combine as one op (``dynamoe.kernels.moe_mlp``), token order in
        and out; the layer uses it when a fused backend applies (Triton on CUDA)."""
        return kernels.moe_mlp(
            x_TD,
            experts_Tk,
            weights_Tk,
            counts_E,
            self.w1_EDF.to(x_TD.dtype),
            self.w2_EFD.to(x_TD.dtype),
            activation=self.activation,
            num_rows=num_rows,
        )

    @torch.no_grad()
    def shard(self, first: int, count: int) -> None:
        """Keep only the global experts [first, first + count) (expert parallelism)."""
        if first < 0 or count < 1 or first + count > self.num_local + self.first_expert:
            raise ValueError(
                f"cannot keep experts [{first}, {first + count}) of [{self.first_expert}, "
                f"{self.first_expert + self.num_local})"
            )
        lo = first - self.first_expert
        self.w1_EDF = nn.Parameter(self.w1_EDF[lo : lo + count].clone())
        self.w2_EFD = nn.Parameter(self.w2_EFD[lo : lo + count].clone())
        self.first_expert, self.num_local = first, count

    @torch.no_grad()
    def load_dense(self, expert: int, mlp: DenseMLP) -> None:
        """Copy a DenseMLP's weights into expert ``expert`` (used to upcycle dense FFNs into experts)."""
        self.w1_EDF[expert].copy_(mlp.w_in.weight.t())
        self.w2_EFD[expert].copy_(mlp.w_out.weight.t())
