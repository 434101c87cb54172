"""The whole expert MLP of a local MoE layer as one op: permute -> GEMM -> activation -> GEMM -> combine.

The reference composes the reference ops exactly as the MoE layer's unfused path does (dispatcher,
``GroupedExperts``, combine), so it is the ground truth for fused implementations. The Triton one
(``kernels/triton/fused_moe.py``) gathers token rows inside the GEMMs' loads, applies the activation
in the first GEMM's epilogue and the combine weights in the second's, and runs the activation's
backward in the epilogue of the GEMM that computes its input gradient, so neither the permuted input,
the permuted output gradient, a weighted copy of the output nor an fp32 intermediate is ever
materialised. The layer takes this op only when an accelerated backend has it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynamoe.kernels.backend import REFERENCE, backend_for, implementation, register_impl
from dynamoe.kernels.dispatch import permute_ref, unpermute_ref
from dynamoe.kernels.grouped_gemm import grouped_mm_pytorch, resolve_groups

ACTIVATIONS = ("gelu", "swiglu")


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU (erf form), or SwiGLU on h = [gate | up]: silu(gate) * up."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def check_mlp_args(x, experts, weights, w1, w2, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_mlp: activation={activation!r} must be one of {ACTIVATIONS}")
    if x.dim() != 2 or experts.shape != weights.shape or experts.shape[0] != x.shape[0]:
        raise ValueError(
            f"moe_mlp: expected x [T, d], experts and weights [T, k]; got x {tuple(x.shape)}, "
            f"experts {tuple(experts.shape)}, weights {tuple(weights.shape)}"
        )
    hidden = w2.shape[1] * (2 if activation == "swiglu" else 1)
    if (
        w1.dim() != 3
        or w2.dim() != 3
        or w1.shape[1] != x.shape[1]
        or w1.shape[2] != hidden
        or w2.shape[2] != x.shape[1]
    ):
        raise ValueError(
            f"moe_mlp: expected w1 [E, d, {'2f' if activation == 'swiglu' else 'f'}] and w2 [E, f, d] "
            f"for d={x.shape[1]}; got w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}"
        )


@register_impl("moe_mlp", REFERENCE)
def moe_mlp_ref(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: str = "gelu",
    num_rows: int | None = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * MLP_{experts[t, j]}(x[t]) over kept slots (experts = -1 skipped).

    Args:
        x: [T, d]; experts, weights: [T, k] (routing output); counts: [E] kept rows per expert;
        w1: [E, d, f] ([E, d, 2f] for SwiGLU, gate then up); w2: [E, f, d]; num_rows: see ``permute``.
    """
    check_mlp_args(x, experts, weights, w1, w2, activation)
    x_sorted, row_map = permute_ref(x, experts, w1.shape[0], num_rows)
    offsets = resolve_groups(x_sorted, w1, counts, None)
    h = grouped_mm_pytorch(x_sorted, w1, offsets)
    y_sorted = grouped_mm_pytorch(activate(h, activation), w2, offsets)
    return unpermute_ref(y_sorted, row_map, weights)


def moe_mlp(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: str = "gelu",
    num_rows: int | None = None,
) -> torch.Tensor:
    """Routed expert MLP in token order; see :func:`moe_mlp_ref` for the contract."""
    return implementation("moe_mlp", x)(x, experts, weights, counts, w1, w2, activation=activation, num_rows=num_rows)


def fused_moe_available(x: torch.Tensor) -> bool:
    """Whether ``moe_mlp`` on ``x`` runs a fused (non-reference) implementation."""
    return backend_for(x, "moe_mlp") != REFERENCE
