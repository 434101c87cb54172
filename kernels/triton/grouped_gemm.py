"""Triton grouped GEMMs: X_sorted [N, d] times W [E, d, f] with variable group sizes, no padding.

Forward and input gradient share one M-grouped kernel (the input gradient reads W through
transposed strides). Its grid is an upper bound on the row tiles, ceil(N / BLOCK_M) + E, so it is
known on the host without reading the group sizes back; each program finds its expert and tile in
a cumulative tile table built on device, and programs past the real tile count do nothing. The
weight gradient is K-grouped: one program per (expert, d tile, f tile) sums over that expert's rows.

Options used by the fused MoE MLP: ``gather`` reads A's rows through an index (the token of each
sorted row, so X is never permuted in memory), ``scale`` multiplies each output row by a weight
in the epilogue (the combine weight). Accumulation is fp32 (fp64 for fp64 inputs).

fp32 products take ``DOT_PRECISION`` (``_jit.dot_precision``): exact ("ieee") unless the user allows
TF32, as ``torch.mm`` does. Tiles: ``autotune.candidates``/``default_tile`` for the dtype, precision
and device; ``gmm_constexprs``/``gmm_dw_constexprs`` are the one place the kernels' compile-time
arguments are derived (the launches here and the ahead-of-time compile check both use them).
"""

from __future__ import annotations

import torch

from dynamoe.kernels.triton._jit import (
    cdiv,
    check_device,
    dot_precision,
    kernel,
    next_pow2,
    tl,
    triton_interpreted,
    upcast_for_dot,
)
from dynamoe.kernels.triton.autotune import (
    INTERPRETER_TILE,
    Tile,
    aligned,
    candidates,
    choose_tile,
    cuda_measure,
    default_tile,
    device_smem_per_block,
    shape_bucket,
)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@kernel
def _gmm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    group_end_ptr,
    tile_end_ptr,
    gather_ptr,
    scale_ptr,
    num_m_tiles,
    N,
    K,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    HAS_GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles sweep the column tiles together, so a W column panel is
    # reused from L2 by neighbouring programs instead of being re-read from memory.
    in_group = GROUP_M * num_n_tiles
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    experts = tl.arange(0, BLOCK_E)
    tile_end = tl.load(tile_end_ptr + experts, mask=experts < E, other=2147483647)
    total_tiles = tl.load(tile_end_ptr + E - 1)
    if pid_m < total_tiles:
        e = tl.sum((tile_end <= pid_m).to(tl.int64), axis=0)
        tiles_before = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
        row_start = tl.load(group_end_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
        row_end = tl.load(group_end_ptr + e).to(tl.int64)
        rows = row_start + (pid_m - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if HAS_GATHER:
            src = tl.load(gather_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        if ACC64:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
            acc = acc * s.to(acc.dtype)[:, None]
        c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@kernel
def _gmm_dw_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    group_end_ptr,
    gather_ptr,
    scale_ptr,
    D,
    F,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    stride_we,
    stride_wd,
    stride_wf,
    HAS_GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    d_tiles = tl.cdiv(D, BLOCK_M)
    f_tiles = tl.cdiv(F, BLOCK_N)
    per_expert = d_tiles * f_tiles
    e = pid // per_expert
    t = pid % per_expert
    in_group = GROUP_M * f_tiles
    first_m = (t // in_group) * GROUP_M
    group_rows = tl.minimum(d_tiles - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % group_rows
    pid_n = (t % in_group) // group_rows
    row_start = tl.load(group_end_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    row_end = tl.load(group_end_ptr + e).to(tl.int64)
    dcols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    fcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = dcols < D
    f_ok = fcols < F
    if ACC64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K-grouped: the reduction runs over this expert's rows only; an empty expert writes zeros.
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < row_end
        if HAS_GATHER:
            src = tl.load(gather_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            src = rows
        xt = tl.load(
            x_ptr + src[None, :] * stride_xm + dcols[:, None] * stride_xk, mask=d_ok[:, None] & r_ok[None, :], other=0.0
        )
        g = tl.load(
            dy_ptr + rows[:, None] * stride_ym + fcols[None, :] * stride_yn,
            mask=r_ok[:, None] & f_ok[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=r_ok, other=0.0)
            g = (g.to(tl.float32) * s.to(tl.float32)[:, None]).to(g.dtype)
        if UPCAST:
            xt = xt.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(xt, g, acc, input_precision=DOT_PRECISION)
    w_ptrs = dw_ptr + e * stride_we + dcols[:, None] * stride_wd + fcols[None, :] * stride_wf
    tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=d_ok[:, None] & f_ok[None, :])


def check_operands(x: torch.Tensor, w: torch.Tensor, op: str) -> None:
    if x.dtype != w.dtype:
        raise ValueError(f"{op}: x is {x.dtype} but w is {w.dtype}; cast w to x's dtype (w.to(x.dtype))")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: dtype {x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if x.device != w.device:
        raise ValueError(f"{op}: x is on {x.device} but w on {w.device}; put both on one device")
    check_device(x, op)


def tile_table(group_end: torch.Tensor, block_m: int) -> torch.Tensor:
    """Cumulative row-tile count per expert [E] int32, from the group ends, on device."""
    ends = group_end.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0).to(torch.int32)


def _device_name(t: torch.Tensor) -> str:
    return torch.cuda.get_device_name(t.device) if t.is_cuda else "interpreter"


def gmm_constexprs(
    dtype: torch.dtype, K: int, E: int, tile: Tile, *, gather: bool, scale: bool, precision: str | None = None
) -> dict:
    """Every compile-time argument of ``_gmm_kernel`` (the tile's launch options included)."""
    return {
        "HAS_GATHER": gather,
        "HAS_SCALE": scale,
        "UPCAST": upcast_for_dot(dtype),
        "ACC64": dtype == torch.float64,
        "DOT_PRECISION": precision or dot_precision(dtype),
        "EVEN_K": K % tile.BLOCK_K == 0,
        "BLOCK_E": next_pow2(E),
        **tile.launch_kwargs(),
    }


def gmm_dw_constexprs(dtype: torch.dtype, tile: Tile, *, gather: bool, scale: bool, precision: str | None = None):
    """Every compile-time argument of ``_gmm_dw_kernel`` (the tile's launch options included)."""
    return {
        "HAS_GATHER": gather,
        "HAS_SCALE": scale,
        "UPCAST": upcast_for_dot(dtype),
        "ACC64": dtype == torch.float64,
        "DOT_PRECISION": precision or dot_precision(dtype),
        **tile.launch_kwargs(),
    }


def tune_key(
    op: str, capability: tuple[int, int], dtype: torch.dtype, out_dtype: torch.dtype, precision: str, dims: tuple
) -> str:
    """``op | sm_XY | triton version | input dtype | output dtype | precision | shape bucket``; the
    device name is prefixed by ``choose_tile``. Flags (gather, scale, transposed B) are in ``op``."""
    import triton

    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    cap = "".join(map(str, capability))
    return f"{op}|sm{cap}|triton{triton.__version__}|{name(dtype)}|{name(out_dtype)}|{precision}|{shape_bucket(*dims)}"


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability_of_current(device: torch.device | None = None) -> tuple[int, int]:
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


_SMEM: dict[int, int] = {}


def _pick(op: str, a: torch.Tensor, out_dtype: torch.dtype, dims: tuple, widths: tuple, launch) -> Tile:
    """The tile for this launch; ``dims`` go into the tuning key, ``widths`` are the row strides
    (alignment picks the tile class)."""
    if triton_interpreted() or not a.is_cuda:
        return INTERPRETER_TILE
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    cap = _capability_of_current(a.device)
    if index not in _SMEM:
        _SMEM[index] = device_smem_per_block(a.device)
    precision = dot_precision(a.dtype)
    ok = aligned(*widths)
    cands = candidates(a.dtype, precision, cap, _SMEM[index], ok)
    default = default_tile(a.dtype, precision, cap, _SMEM[index], ok)
    key = tune_key(op, cap, a.dtype, out_dtype, precision, dims)
    return choose_tile(key, _device_name(a), cands, default, cuda_measure(launch))


def gmm(
    a: torch.Tensor,
    b: torch.Tensor,
    group_end: torch.Tensor,
    *,
    trans_b: bool = False,
    gather: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """C[r] = scale[r] * A[gather[r]] @ op(B[e(r)]) for rows r of group e; op = transpose if ``trans_b``.

    a [rows of A, K], b [E, K, N] (or [E, N, K] with ``trans_b``), group_end [E] int32; C has
    group_end[-1] rows (= len(gather) when gathering, else a's rows).
    """
    E = b.shape[0]
    K, N = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    M = gather.shape[0] if gather is not None else a.shape[0]
    c = torch.empty(M, N, dtype=out_dtype or a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    sb = (b.stride(0), b.stride(2), b.stride(1)) if trans_b else (b.stride(0), b.stride(1), b.stride(2))
    precision = dot_precision(a.dtype)

    def launch(tile: Tile) -> None:
        table = tile_table(group_end, tile.BLOCK_M)
        m_tiles = cdiv(M, tile.BLOCK_M) + E  # upper bound: each group wastes at most one partial tile
        grid = (m_tiles * cdiv(N, tile.BLOCK_N),)
        _gmm_kernel.on(a.device)[grid](
            a,
            b,
            c,
            group_end,
            table,
            gather if gather is not None else group_end,
            scale if scale is not None else group_end,
            m_tiles,
            N,
            K,
            E,
            a.stride(0),
            a.stride(1),
            *sb,
            c.stride(0),
            c.stride(1),
            **gmm_constexprs(
                a.dtype, K, E, tile, gather=gather is not None, scale=scale is not None, precision=precision
            ),
        )

    flags = ("g" if gather is not None else "") + ("s" if scale is not None else "") + ("t" if trans_b else "")
    launch(_pick(f"gmm{flags}", a, c.dtype, (M, K, N, E), (K, N), launch))
    return c


def gmm_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_end: torch.Tensor,
    num_experts: int,
    *,
    gather: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dW[e] = X[rows of e]^T @ (scale * dY)[rows of e] as [E, d, f]; X rows read through ``gather``."""
    D, F = x.shape[1], dy.shape[1]
    dw = torch.empty(num_experts, D, F, dtype=out_dtype or x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    if dy.shape[0] == 0:
        return dw.zero_()

    def launch(tile: Tile) -> None:
        grid = (num_experts * cdiv(D, tile.BLOCK_M) * cdiv(F, tile.BLOCK_N),)
        _gmm_dw_kernel.on(x.device)[grid](
            x,
            dy,
            dw,
            group_end,
            gather if gather is not None else group_end,
            scale if scale is not None else group_end,
            D,
            F,
            x.stride(0),
            x.stride(1),
            dy.stride(0),
            dy.stride(1),
            dw.stride(0),
            dw.stride(1),
            dw.stride(2),
            **gmm_dw_constexprs(x.dtype, tile, gather=gather is not None, scale=scale is not None),
        )

    flags = ("g" if gather is not None else "") + ("s" if scale is not None else "")
    launch(_pick(f"gmm_dw{flags}", x, dw.dtype, (dy.shape[0], D, F, num_experts), (D, F), launch))
    return dw


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group_end):
        ctx.save_for_backward(x, w, group_end)
        return gmm(x, w, group_end)

    @staticmethod
    def backward(ctx, dy):
        x, w, group_end = ctx.saved_tensors
        dy = dy.contiguous()
        dx = gmm(dy, w, group_end, trans_b=True) if ctx.needs_input_grad[0] else None
        dw = gmm_weight_grad(x, dy, group_end, w.shape[0]) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Triton implementation of the ``grouped_mm`` op (offsets already validated, int32 [E])."""
    check_operands(x, w, "grouped_mm")
    return _GroupedMM.apply(x.contiguous(), w.contiguous(), offsets.to(device=x.device, dtype=torch.int32).contiguous())
