"""Triton token dispatch: the dispatch plan (row_map), the row gather, and the weighted combine.

The plan is a two-pass counting sort over the T*k assignments, so rows come out exactly as
``dynamoe.kernels.dispatch.row_map_ref`` orders them (expert ascending, then token, then slot):
  1. each block of assignments counts its experts -> [blocks, E];
  2. exclusive prefix sums over blocks and experts (PyTorch, on device) give each block's first
     row per expert; each assignment adds its rank among equal experts earlier in its block.
No step reads a value back to the host, and every output element is written by one program, so
neither direction needs atomics: the gather writes distinct rows, the combine writes one token per
program, and the combine's backward scatters each (token, slot) to the one row it came from.
"""

from __future__ import annotations

import torch

from dynamoe.kernels.dispatch import check_assignments
from dynamoe.kernels.triton._jit import acc_is_f64, cdiv, check_device, kernel, next_pow2, tl

BLOCK_ASSIGN = 128  # assignments per plan program; the one-hot tile is [128, next_pow2(E)]


@kernel
def _plan_count_kernel(experts_ptr, block_counts_ptr, A, E, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    e = tl.load(experts_ptr + idx, mask=idx < A, other=-1).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    onehot = (e[:, None] == cols[None, :]).to(tl.int64)
    tl.store(block_counts_ptr + pid * E + cols, tl.sum(onehot, axis=0), mask=cols < E)


@kernel
def _plan_rows_kernel(
    experts_ptr,
    first_row_ptr,
    row_map_ptr,
    token_of_row_ptr,
    A,
    E,
    k,
    num_rows,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    in_range = idx < A
    e = tl.load(experts_ptr + idx, mask=in_range, other=-1).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    # int32: the [BLOCK_A, BLOCK_E] cumulative sum is the kernel's register budget (int64 spills at E=256).
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    # Rank among the same expert's assignments earlier in this block (inclusive count minus one).
    rank = (tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1).to(tl.int64)
    kept = in_range & (e >= 0)
    first = tl.load(first_row_ptr + pid * E + e, mask=kept, other=0)
    row = first + rank
    kept = kept & (row < num_rows)
    row = tl.where(kept, row, -1)
    tl.store(row_map_ptr + idx, row, mask=in_range)
    tl.store(token_of_row_ptr + row, idx // k, mask=kept)


@kernel
def _gather_rows_kernel(
    x_ptr,
    token_of_row_ptr,
    out_ptr,
    N,
    D,
    stride_x,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    src = tl.load(token_of_row_ptr + rows, mask=row_ok, other=0)
    v = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v, mask=mask)


@kernel
def _combine_kernel(
    y_ptr,
    row_map_ptr,
    w_ptr,
    out_ptr,
    T,
    F,
    k,
    stride_y,
    stride_out,
    HAS_W: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1).to(tl.int64)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    tok_ok = toks < T
    col_ok = cols < F
    if ACC64:
        acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    for j in range(k):
        r = tl.load(row_map_ptr + toks * k + j, mask=tok_ok, other=-1)
        kept = r >= 0
        v = tl.load(y_ptr + r[:, None] * stride_y + cols[None, :], mask=kept[:, None] & col_ok[None, :], other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + toks * k + j, mask=kept, other=0.0)
            acc += w.to(acc.dtype)[:, None] * v.to(acc.dtype)
        else:
            acc += v.to(acc.dtype)
    tl.store(
        out_ptr + toks[:, None] * stride_out + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=tok_ok[:, None] & col_ok[None, :],
    )


@kernel
def _combine_bwd_kernel(
    y_ptr,
    row_map_ptr,
    w_ptr,
    g_ptr,
    dy_ptr,
    dw_ptr,
    T,
    F,
    k,
    stride_y,
    stride_g,
    stride_dy,
    NEED_DY: tl.constexpr,
    NEED_DW: tl.constexpr,
    ACC64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < T
    for j in range(k):
        r = tl.load(row_map_ptr + toks * k + j, mask=tok_ok, other=-1)
        kept = r >= 0
        w = tl.load(w_ptr + toks * k + j, mask=kept, other=0.0)
        if ACC64:
            dot = tl.zeros((BLOCK_T,), dtype=tl.float64)
        else:
            dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            m = kept[:, None] & (cols[None, :] < F)
            g = tl.load(g_ptr + toks[:, None] * stride_g + cols[None, :], mask=m, other=0.0).to(dot.dtype)
            if NEED_DY:
                # Every kept row has exactly one (token, slot): a plain store, no accumulation.
                tl.store(
                    dy_ptr + r[:, None] * stride_dy + cols[None, :],
                    (w.to(dot.dtype)[:, None] * g).to(dy_ptr.dtype.element_ty),
                    mask=m,
                )
            if NEED_DW:
                v = tl.load(y_ptr + r[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(dot.dtype)
                dot += tl.sum(v * g, axis=1)
        if NEED_DW:
            tl.store(dw_ptr + toks * k + j, tl.where(kept, dot, 0.0).to(dw_ptr.dtype.element_ty), mask=tok_ok)


def plan_constexprs(num_experts: int) -> dict:
    """Compile-time arguments of the plan kernels (launches and the compile check use this): a
    [BLOCK_ASSIGN, BLOCK_E] one-hot tile, over 8 warps from 128 experts so it stays in registers."""
    BLOCK_E = next_pow2(num_experts)
    return {"BLOCK_A": BLOCK_ASSIGN, "BLOCK_E": BLOCK_E, "num_warps": 8 if BLOCK_E >= 128 else 4}


def _row_blocks(width: int) -> tuple[int, int]:
    """(rows, columns) per program for row-wise copies: wide column blocks, ~4K elements a tile."""
    block_cols = min(256, next_pow2(width))
    return max(1, 4096 // block_cols), block_cols


def dispatch_plan(experts: torch.Tensor, num_experts: int, num_rows: int | None):
    """(row_map [T, k] int64, token_of_row [N] int64, kept assignments per expert [E] int64), on device."""
    check_assignments(experts, num_experts)
    T, k = experts.shape
    A = T * k
    if num_rows is None:
        num_rows = int((experts >= 0).sum())  # the capacity path's one host sync, as in the reference
    dev = experts.device
    row_map = torch.empty(T, k, dtype=torch.int64, device=dev)
    token_of_row = torch.empty(num_rows, dtype=torch.int64, device=dev)
    if A == 0:
        return row_map, token_of_row, torch.zeros(num_experts, dtype=torch.int64, device=dev)
    flat = experts.contiguous().view(-1)
    blocks = cdiv(A, BLOCK_ASSIGN)
    meta = plan_constexprs(num_experts)
    block_counts = torch.empty(blocks, num_experts, dtype=torch.int64, device=dev)
    _plan_count_kernel.on(dev)[(blocks,)](flat, block_counts, A, num_experts, **meta)
    per_expert = block_counts.sum(0)
    expert_first = torch.cumsum(per_expert, 0) - per_expert
    first_row = torch.cumsum(block_counts, 0) - block_counts + expert_first  # [blocks, E]
    _plan_rows_kernel.on(dev)[(blocks,)](flat, first_row, row_map, token_of_row, A, num_experts, k, num_rows, **meta)
    return row_map, token_of_row, per_expert


def gather_rows(x: torch.Tensor, token_of_row: torch.Tensor) -> torch.Tensor:
    """x[token_of_row] as [N, d]."""
    N, D = token_of_row.shape[0], x.shape[1]
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0 or D == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    BR, BD = _row_blocks(D)
    _gather_rows_kernel.on(x.device)[(cdiv(N, BR), cdiv(D, BD))](
        x, token_of_row, out, N, D, x.stride(0), out.stride(0), BLOCK_R=BR, BLOCK_D=BD
    )
    return out


def sum_rows(rows_Nf: torch.Tensor, row_map_Tk: torch.Tensor, weights_Tk: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * rows[row_map[t, j]] (w = 1 when None), dropped slots skipped."""
    T, k = row_map_Tk.shape
    F = rows_Nf.shape[1]
    out = torch.empty(T, F, dtype=rows_Nf.dtype, device=rows_Nf.device)
    if T == 0 or F == 0:
        return out
    rows_Nf = rows_Nf if rows_Nf.stride(1) == 1 or rows_Nf.shape[0] == 0 else rows_Nf.contiguous()
    w = weights_Tk.contiguous() if weights_Tk is not None else row_map_Tk
    BT, BF = _row_blocks(F)
    BT = min(BT, 64)
    _combine_kernel.on(rows_Nf.device)[(cdiv(T, BT), cdiv(F, BF))](
        rows_Nf,
        row_map_Tk.contiguous(),
        w,
        out,
        T,
        F,
        k,
        max(rows_Nf.stride(0), 1),
        out.stride(0),
        HAS_W=weights_Tk is not None,
        ACC64=acc_is_f64(rows_Nf),
        BLOCK_T=BT,
        BLOCK_F=BF,
    )
    return out


def combine_backward(y_sorted, row_map, weights, grad, need_dy: bool, need_dw: bool):
    """(d y_sorted [N, f] or None, d weights [T, k] or None) of the weighted combine."""
    T, k = row_map.shape
    N, F = y_sorted.shape
    dy = torch.empty(N, F, dtype=y_sorted.dtype, device=y_sorted.device) if need_dy else None
    dw = torch.empty(T, k, dtype=weights.dtype, device=weights.device) if need_dw else None
    if T == 0:
        return dy, dw
    if F == 0:
        return dy, (dw.zero_() if need_dw else None)
    grad = grad.contiguous()
    y = y_sorted if y_sorted.stride(1) == 1 or N == 0 else y_sorted.contiguous()
    BF = min(128, next_pow2(F))
    BT = max(1, min(64, 2048 // BF))
    _combine_bwd_kernel.on(y.device)[(cdiv(T, BT),)](
        y,
        row_map.contiguous(),
        weights.contiguous(),
        grad,
        dy if need_dy else y,
        dw if need_dw else weights,
        T,
        F,
        k,
        max(y.stride(0), 1),
        grad.stride(0),
        dy.stride(0) if need_dy else 0,
        NEED_DY=need_dy,
        NEED_DW=need_dw,
        ACC64=acc_is_f64(y_sorted, grad),
        BLOCK_T=BT,
        BLOCK_F=BF,
    )
    return dy, dw


class _GatherRows(torch.autograd.Function):
    """x_sorted = x[token_of_row]; the backward sums each token's k copies through row_map."""

    @staticmethod
    def forward(ctx, x, token_of_row, row_map):
        ctx.save_for_backward(row_map)
        return gather_rows(x, token_of_row)

    @staticmethod
    def backward(ctx, grad_sorted):
        (row_map,) = ctx.saved_tensors
        return sum_rows(grad_sorted, row_map, None), None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, row_map, weights):
        ctx.save_for_backward(y_sorted, row_map, weights)
        return sum_rows(y_sorted, row_map, weights)

    @staticmethod
    def backward(ctx, grad):
        y_sorted, row_map, weights = ctx.saved_tensors
        dy, dw = combine_backward(y_sorted, row_map, weights, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return dy, None, dw


def permute_triton(x: torch.Tensor, experts: torch.Tensor, num_experts: int, num_rows: int | None = None):
    """Triton implementation of :func:`dynamoe.kernels.dispatch.permute_ref` (same outputs and row order)."""
    if x.dim() != 2 or x.shape[0] != experts.shape[0]:
        raise ValueError(
            f"permute: x must be [T, d] with T = experts.shape[0]; got x {tuple(x.shape)}, "
            f"experts {tuple(experts.shape)}"
        )
    check_device(x, "permute")
    row_map, token_of_row, _ = dispatch_plan(experts, num_experts, num_rows)
    return _GatherRows.apply(x, token_of_row, row_map), row_map


def unpermute_triton(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Triton implementation of :func:`dynamoe.kernels.dispatch.unpermute_ref`."""
    if row_map.shape != weights.shape:
        raise ValueError(f"unpermute: row_map {tuple(row_map.shape)} and weights {tuple(weights.shape)} must match")
    if y_sorted.dim() != 2:
        raise ValueError(f"unpermute: y_sorted must be [N, f], got shape {tuple(y_sorted.shape)}")
    check_device(y_sorted, "unpermute")
    return _CombineRows.apply(y_sorted, row_map, weights)
