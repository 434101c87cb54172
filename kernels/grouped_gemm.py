"""Grouped expert GEMM: rows of X_sorted [N, d], grouped by expert, times that expert's W [E, d, f].

Groups are given by per-expert ``counts`` [E] or by cumulative end ``offsets`` [E] (int32, the
convention of ``torch._grouped_mm``). Tokens are never padded: a group may be empty.

Two PyTorch implementations live here: ``grouped_mm_ref`` (a loop over experts, the ground truth)
and a ``torch._grouped_mm`` path wrapped in an autograd function whose backward is two more grouped
GEMMs (input gradient: dY W^T per group; weight gradient: X^T dY per group, K-grouped).
"""

from __future__ import annotations

import torch

from dynamoe.kernels.backend import REFERENCE, implementation, register_impl


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative end offsets [E] int32 from per-expert counts [E]."""
    return torch.cumsum(counts, dim=0).to(torch.int32)


def resolve_groups(x, w, counts, offsets) -> torch.Tensor:
    if (counts is None) == (offsets is None):
        raise ValueError("grouped_mm: pass exactly one of counts= or offsets=")
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"grouped_mm: expected x [N, d] and w [E, d, f] with matching d; got x {tuple(x.shape)}, w {tuple(w.shape)}"
        )
    offsets = offsets_from_counts(counts) if counts is not None else offsets.to(torch.int32)
    if offsets.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: counts/offsets must have shape [E]=({w.shape[0]},), got {tuple(offsets.shape)}")
    # torch._grouped_mm does not check that the groups cover x exactly (it leaves uncovered rows
    # uninitialised); check it here when the offsets live on the host, where it costs no device sync.
    if offsets.device.type == "cpu" and offsets.numel() and int(offsets[-1]) != x.shape[0]:
        raise ValueError(f"grouped_mm: groups cover {int(offsets[-1])} rows but x has {x.shape[0]}")
    return offsets


def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Loop over experts: y[rows of e] = x[rows of e] @ w[e]. Differentiable by autograd."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    if ends and ends[-1] != x.shape[0]:
        raise ValueError(f"grouped_mm: groups cover {ends[-1]} rows but x has {x.shape[0]}")
    pieces = [x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends))]
    if not pieces:
        return x.new_zeros(x.shape[0], w.shape[2])
    return torch.cat(pieces, dim=0)


class _TorchGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        if x.shape[0] == 0:  # no rows: torch._grouped_mm rejects the empty operands of the backward
            return torch.zeros_like(x), torch.zeros_like(w), None
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy, w.transpose(-2, -1), offs=offsets)
        if ctx.needs_input_grad[1]:
            # K-grouped: each expert's weight gradient is a sum over its own rows only.
            dw = torch._grouped_mm(x.t(), dy, offs=offsets)
        return dx, dw, None


def torch_grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.device != w.device:
        return False
    if x.device.type == "cuda":
        # cuBLAS-backed grouped GEMM: bf16 on Hopper (sm90) and newer.
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    # Every row stride must be a multiple of 16 bytes.
    itemsize = x.element_size()
    return (w.shape[1] * itemsize) % 16 == 0 and (w.shape[2] * itemsize) % 16 == 0


@register_impl("grouped_mm", REFERENCE)
def grouped_mm_pytorch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if torch_grouped_mm_applies(x, w):
        return _TorchGroupedMM.apply(x.contiguous(), w.contiguous(), offsets)
    return grouped_mm_ref(x, w, offsets)


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped GEMM ``[N, d] x [E, d, f] -> [N, f]``; rows of expert e are ``offsets[e-1]:offsets[e]``.

    Differentiable w.r.t. ``x`` and ``w``. Uses ``torch._grouped_mm`` where it applies (CPU fp32/bf16,
    CUDA bf16 on sm90+, 16-byte aligned widths) and a loop over experts otherwise.
    """
    offsets = resolve_groups(x, w, counts, offsets)
    return implementation("grouped_mm", x)(x, w, offsets)
