"""Grouped expert GEMM: rows of X_sorted [N, d], grouped by expert, times that expert's W [E, d, f].

Groups are given by per-expert ``counts`` [E] or by cumulative end ``offsets`` [E] (int32, the
convention of ``torch._grouped_mm``). Tokens are never padded: a group may be empty.

Two PyTorch implementations live here: ``grouped_mm_ref`` (a loop over experts, the ground truth)
and a ``torch._grouped_mm`` path wrapped in an autograd function whose backward is two more grouped
GEMMs (input gradient: dY W^T per group; weight gradient: X^T dY per group, K-grouped).

``w`` may be a strided view: ``torch._grouped_mm`` reads each expert's matrix row-major or
column-major (one unit stride, the other a multiple of 16 bytes), so a transposed view such as
transformers' ``gate_up_proj.transpose(1, 2)`` is used as it is, in forward and in backward, and
its weight gradient is made in its own layout (``dW^T = dY^T X`` per group), so it reaches the
parameter without a copy. Other strides are made contiguous first.
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


def _reads_as_is(t: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``t``'s last two dimensions as they are: one of their
    strides 1 and the other at least the extent it steps over and a multiple of 16 bytes (the test
    of ATen's ``check_valid_strides_and_return_transposed``, in its order: a unit stride on the
    second-to-last dimension counts as transposed first). On CUDA the data pointer must also be
    16-byte aligned; on CPU (torch 2.13) it need not be."""
    if t.device.type == "cuda" and t.data_ptr() % 16:
        return False
    align = 16 // t.element_size()
    (rows, cols), (s_rows, s_cols) = t.shape[-2:], t.stride()[-2:]
    if s_rows == 1 and s_cols >= max(1, rows):
        return s_cols % align == 0
    if s_cols == 1 and s_rows >= max(1, cols):
        return s_rows % align == 0
    return False


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` [N, k] with strides (k, 1) exactly (and, on CUDA, 16-byte aligned): ``contiguous()``
    keeps odd strides on a dimension of size 1 (a [1, k] view may have strides (1, 1)) and a
    contiguous slice's address, both of which ``torch._grouped_mm`` may refuse."""
    if t.stride() == (t.shape[1], 1) and (t.device.type != "cuda" or t.data_ptr() % 16 == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _transposed(w: torch.Tensor) -> bool:
    """``w`` [E, d, f] stores each expert column-major (a ``transpose(-2, -1)`` view of [E, f, d],
    transformers' layout): its weight gradient is made in that layout too."""
    return w.stride(-2) == 1 and w.stride(-1) != 1


class _TorchGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` with a backward of two more grouped GEMMs. ``w`` is used as it is
    (a strided view is neither copied nor kept as a copy for backward), and its gradient comes back
    in ``w``'s layout, so a transposed view's gradient reaches its parameter without a copy."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        if x.shape[0] == 0:  # no rows: torch._grouped_mm rejects the empty operands of the backward
            return torch.zeros_like(x), torch.zeros_like(w), None
        dy = _row_major(dy)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy, w.transpose(-2, -1), offs=offsets)
        if ctx.needs_input_grad[1]:
            # K-grouped: each expert's weight gradient is a sum over its own rows only.
            if _transposed(w):  # dW^T = dY^T X per group, contiguous [E, f, d], returned as its [E, d, f] view
                dw = torch._grouped_mm(dy.t(), x, offs=offsets).transpose(-2, -1)
            else:
                dw = torch._grouped_mm(x.t(), dy, offs=offsets)
        return dx, dw, None


def torch_grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the ``torch._grouped_mm`` path runs ``x`` [N, d] times ``w`` [E, d, f]: a dtype and
    device it supports, and ``d`` and ``f`` whole multiples of 16 bytes (the rows of ``x``, of its
    transpose and of the output gradient in backward). ``w`` may have any strides; those
    ``torch._grouped_mm`` cannot read are made contiguous first (:func:`grouped_mm_pytorch`)."""
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
        x = _row_major(x)
        if not _reads_as_is(w):
            w = w.contiguous()
            if not _reads_as_is(w):  # already contiguous, but at an address CUDA cannot take
                w = w.clone()
        return _TorchGroupedMM.apply(x, w, offsets)
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
