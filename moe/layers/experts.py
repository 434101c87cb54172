"""Expert weights: dense MLPs and stacked per-expert MLPs that run as grouped GEMMs.

Shape legend: N dispatched rows, d model width, f hidden width, E experts.
Weights are stored as ``[E, d, f]`` (input-major) so a row block times its expert's slice is a
plain ``x @ w[e]``. Both MLP kinds are bias-free unless asked (``bias=True``: the FFNs of a
pretrained BERT-family encoder have biases, and experts upcycled from them keep them), so one
expert equals a dense FFN exactly either way.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamoe import kernels
from dynamoe.kernels.moe_mlp import activate


class DenseMLP(nn.Module):
    """An FFN: d -> f -> d with GELU, or SwiGLU (two input projections); bias-free unless ``bias``."""

    def __init__(
        self, d_model: int, d_hidden: int, activation: str = "gelu", init_std: float = 0.02, bias: bool = False
    ):
        super().__init__()
        self.activation = activation
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Linear(d_model, width, bias=bias)
        self.w_out = nn.Linear(d_hidden, d_model, bias=bias)
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=init_std)
        if bias:
            nn.init.zeros_(self.w_in.bias)
            nn.init.zeros_(self.w_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class GroupedExperts(nn.Module):
    """E independent MLPs stored as stacked weights, applied to expert-sorted rows; with ``bias``,
    each expert also has its own input bias ``b1_EF`` and output bias ``b2_ED`` (zero at init)."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        init_std: float = 0.02,
        bias: bool = False,
    ):
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
        self.has_bias = bias
        if bias:
            self.b1_EF = nn.Parameter(torch.zeros(num_experts, width))
            self.b2_ED = nn.Parameter(torch.zeros(num_experts, d_model))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets = kernels.offsets_from_counts(counts_E)
        h_NF = kernels.grouped_mm(x_ND, self.w1_EDF.to(x_ND.dtype), offsets=offsets)
        if self.has_bias:
            h_NF = h_NF + self._per_row(self.b1_EF, counts_E, x_ND)
        y_ND = kernels.grouped_mm(activate(h_NF, self.activation), self.w2_EFD.to(x_ND.dtype), offsets=offsets)
        if self.has_bias:
            y_ND = y_ND + self._per_row(self.b2_ED, counts_E, x_ND)
        return y_ND

    @staticmethod
    def _per_row(bias_E: torch.Tensor, counts_E: torch.Tensor, x_ND: torch.Tensor) -> torch.Tensor:
        """Each sorted row's expert's bias; ``output_size`` spares the device a sync on the counts."""
        return torch.repeat_interleave(bias_E.to(x_ND.dtype), counts_E, dim=0, output_size=x_ND.shape[0])

    def forward_tokens(
        self,
        x_TD: torch.Tensor,
        experts_Tk: torch.Tensor,
        weights_Tk: torch.Tensor,
        counts_E: torch.Tensor,
        num_rows: int,
    ) -> torch.Tensor:
        """Dispatch, both GEMMs and the weighted combine as one op (``dynamoe.kernels.moe_mlp``), token order in
        and out; the layer uses it when a fused backend applies (Triton on CUDA) and the experts have no biases."""
        if self.has_bias:
            raise ValueError("the fused expert MLP has no biases; fix: run experts with biases through forward()")
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
        if self.has_bias:
            self.b1_EF = nn.Parameter(self.b1_EF[lo : lo + count].clone())
            self.b2_ED = nn.Parameter(self.b2_ED[lo : lo + count].clone())
        self.first_expert, self.num_local = first, count

    @torch.no_grad()
    def load_dense(self, expert: int, mlp: DenseMLP) -> None:
        """Copy a DenseMLP's weights into expert ``expert`` (used to upcycle dense FFNs into experts)."""
        self.w1_EDF[expert].copy_(mlp.w_in.weight.t())
        self.w2_EFD[expert].copy_(mlp.w_out.weight.t())
        if self.has_bias:
            self.b1_EF[expert].copy_(mlp.w_in.bias)
            self.b2_ED[expert].copy_(mlp.w_out.bias)
