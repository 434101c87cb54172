"""Triton grouped GEMMs: X_sorted [N, d] times W [E, d, f] with variable group sizes, no padding.

Forward and input gradient share one M-grouped kernel (the input gradient reads W through
transposed strides). Its grid is an upper bound on the row tiles, ceil(N / BLOCK_M) + E, so it is
known on the host without reading the group sizes back; each program finds its expert and tile in
a cumulative tile table built on device, and programs past the real tile count do nothing. The
weight gradient is K-grouped: one program per (expert, d tile, f tile) sums over that expert's rows.

Options used by the fused MoE MLP: ``gather`` reads A's rows through an index (the token of each
sorted row, so X is never permuted in memory), ``scale`` multiplies each output row by a weight
in the epilogue (the combine weight). ``gmm_act`` applies GELU or SwiGLU in the epilogue (writing a,
and h for a backward); ``gmm_act_grad`` turns dA = dY[gather] @ W2^T into dh = act'(h) * scale * dA
in its epilogue, with a and the combine-weight row dots; the weight gradient can read dY's rows
through the index (``gather_dy``). Accumulation is fp32 (fp64 for fp64 inputs).

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
    h_ptr,
    act_ptr,
    rowdot_ptr,
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
    stride_hm,
    stride_actm,
    stride_rowdot,
    HAS_GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_AUX: tl.constexpr,
    ROWDOT: tl.constexpr,
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
        if EPILOGUE == "swiglu":
            # h = [gate | up]: this program also owns the up columns N + cols, so the epilogue has
            # both halves of its outputs (a second B tile per step, a second accumulator).
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
            up_offset = N * stride_bn
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
                if EPILOGUE == "swiglu":
                    b_up = tl.load(b_ptrs + up_offset, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if EPILOGUE == "swiglu":
                    b_up = tl.load(b_ptrs + up_offset, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
                if EPILOGUE == "swiglu":
                    b_up = b_up.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if EPILOGUE == "swiglu":
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        out_ok = row_ok[:, None] & col_ok[None, :]
        c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
        h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :]
        out_ty = c_ptr.dtype.element_ty
        # Constants as tensors of the accumulator's type: a bare float literal is an fp32 constant,
        # which would cost fp64 runs their precision.
        rsqrt2 = tl.full((1, 1), 0.7071067811865476, acc.dtype)
        if EPILOGUE == "dgelu" or EPILOGUE == "dswiglu":
            # acc = dA = dY[token] @ W2^T, unscaled. From the saved h: a (the GEMM2 input, recomputed
            # and rounded as the forward rounded it), dh = act'(h) * w_row * dA in the input dtype,
            # and the combine-weight gradient's share of this column tile, rowdot(dA, a).
            if HAS_SCALE:
                s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(acc.dtype)[:, None]
            else:
                s = tl.full((1, 1), 1.0, acc.dtype)
            # Ordered so that few [BLOCK_M, BLOCK_N] temporaries are live at once: the epilogue, not the
            # K loop, is what bounds this kernel's tile (autotune.fits_registers, epilogue_tiles).
            act_ptrs = act_ptr + rows[:, None] * stride_actm + cols[None, :]
            rowdot_ptrs = rowdot_ptr + pid_n * stride_rowdot + rows
            if EPILOGUE == "dgelu":
                x = tl.load(h_ptrs, mask=out_ok, other=0.0).to(acc.dtype)
                cdf = 0.5 * (1.0 + tl.math.erf(x * rsqrt2))
                act_q = (x * cdf).to(out_ty)
                if STORE_AUX:
                    tl.store(act_ptrs, act_q, mask=out_ok)
                if ROWDOT:
                    tl.store(rowdot_ptrs, tl.sum(acc * act_q.to(acc.dtype), axis=1), mask=row_ok)
                dact = cdf + x * tl.exp(-0.5 * x * x) * tl.full((1, 1), 0.3989422804014327, acc.dtype)
                tl.store(c_ptrs, (acc * s * dact).to(out_ty), mask=out_ok)
            else:
                gate = tl.load(h_ptrs, mask=out_ok, other=0.0).to(acc.dtype)
                sig = 1.0 / (1.0 + tl.exp(-gate))
                silu = gate * sig
                dsilu = sig * (1.0 + gate * (1.0 - sig))
                up = tl.load(h_ptrs + N, mask=out_ok, other=0.0).to(acc.dtype)
                act_q = (silu * up).to(out_ty)
                if STORE_AUX:
                    tl.store(act_ptrs, act_q, mask=out_ok)
                if ROWDOT:
                    tl.store(rowdot_ptrs, tl.sum(acc * act_q.to(acc.dtype), axis=1), mask=row_ok)
                da = acc * s
                tl.store(c_ptrs + N * stride_cn, (da * silu).to(out_ty), mask=out_ok)
                tl.store(c_ptrs, (da * up * dsilu).to(out_ty), mask=out_ok)
        else:
            if HAS_SCALE:
                s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
                acc = acc * s.to(acc.dtype)[:, None]
            if EPILOGUE == "gelu":
                # The activation reads h rounded to the input dtype, as the unfused path does and as
                # the backward, which recomputes it from the saved h, will.
                h = acc.to(out_ty)
                if STORE_AUX:
                    tl.store(h_ptrs, h, mask=out_ok)
                x = h.to(acc.dtype)
                out = x * (0.5 * (1.0 + tl.math.erf(x * rsqrt2)))
            elif EPILOGUE == "swiglu":
                gate_q = acc.to(out_ty)
                up_q = acc_up.to(out_ty)
                if STORE_AUX:
                    tl.store(h_ptrs, gate_q, mask=out_ok)
                    tl.store(h_ptrs + N, up_q, mask=out_ok)
                gate = gate_q.to(acc.dtype)
                out = gate * (1.0 / (1.0 + tl.exp(-gate))) * up_q.to(acc.dtype)
            else:
                out = acc
            tl.store(c_ptrs, out.to(out_ty), mask=out_ok)


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
    GATHER_DY: tl.constexpr,
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
        if HAS_GATHER or GATHER_DY:
            src = tl.load(gather_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            src = rows
        if HAS_GATHER:
            x_rows = src
        else:
            x_rows = rows
        if GATHER_DY:
            # dY in token order, read through the row's token: the gathered [N, d] copy is never made.
            y_rows = src
        else:
            y_rows = rows
        xt = tl.load(
            x_ptr + x_rows[None, :] * stride_xm + dcols[:, None] * stride_xk,
            mask=d_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        g = tl.load(
            dy_ptr + y_rows[:, None] * stride_ym + fcols[None, :] * stride_yn,
            mask=r_ok[:, None] & f_ok[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=r_ok, other=0.0)
            g = (g.to(acc.dtype) * s.to(acc.dtype)[:, None]).to(g.dtype)
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


# Epilogues of ``_gmm_kernel``: "" stores C; "gelu"/"swiglu" store a = act(h) (and h when the backward
# needs it); "dgelu"/"dswiglu" turn dA into dh = act'(h) * scale * dA (and a, and rowdot(dA, a)).
FORWARD_ACTIVATIONS = ("gelu", "swiglu")
EPILOGUES = ("", *FORWARD_ACTIVATIONS, *(f"d{act}" for act in FORWARD_ACTIVATIONS))


def accumulators(epilogue: str) -> int:
    """fp32 accumulator tiles a ``_gmm_kernel`` program holds, which is also its B tiles per pipeline
    stage: two for the SwiGLU forward (the gate and the matching up columns), else one."""
    return 2 if epilogue == "swiglu" else 1


# fp32 tiles live at once in each epilogue, for the register pruning (autotune.fits_registers). Read
# off the compile check: at 64 accumulator elements a thread (128x128, 8 warps) the GELU forward
# uses 196 registers, the SwiGLU forward spills without h and both backward epilogues spill; at 32
# the SwiGLU backward, the heaviest (h's two halves, sigmoid, a, two dh halves), uses 240.
_EPILOGUE_TILES = {"": 1, "gelu": 2, "swiglu": 3, "dgelu": 3, "dswiglu": 4}


def epilogue_tiles(epilogue: str) -> int:
    return _EPILOGUE_TILES[epilogue]


def gmm_constexprs(
    dtype: torch.dtype,
    K: int,
    E: int,
    tile: Tile,
    *,
    gather: bool,
    scale: bool,
    precision: str | None = None,
    epilogue: str = "",
    store_aux: bool = False,
    rowdot: bool = False,
) -> dict:
    """Every compile-time argument of ``_gmm_kernel`` (the tile's launch options included).

    ``store_aux``: the forward activations also store h, the backward ones also store a;
    ``rowdot``: the backward ones write rowdot(dA, a) per column tile."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"gmm: epilogue {epilogue!r} must be one of {EPILOGUES}")
    if scale and epilogue in FORWARD_ACTIVATIONS:
        raise ValueError("gmm: a row scale before the activation is not supported")
    if (store_aux and not epilogue) or (rowdot and not epilogue.startswith("d")):
        raise ValueError(f"gmm: store_aux needs an activation epilogue and rowdot a backward one, not {epilogue!r}")
    return {
        "HAS_GATHER": gather,
        "HAS_SCALE": scale,
        "EPILOGUE": epilogue,
        "STORE_AUX": store_aux,
        "ROWDOT": rowdot,
        "UPCAST": upcast_for_dot(dtype),
        "ACC64": dtype == torch.float64,
        "DOT_PRECISION": precision or dot_precision(dtype),
        "EVEN_K": K % tile.BLOCK_K == 0,
        "BLOCK_E": next_pow2(E),
        **tile.launch_kwargs(),
    }


def gmm_dw_constexprs(
    dtype: torch.dtype,
    tile: Tile,
    *,
    gather: bool,
    scale: bool,
    gather_dy: bool = False,
    precision: str | None = None,
):
    """Every compile-time argument of ``_gmm_dw_kernel`` (the tile's launch options included)."""
    return {
        "HAS_GATHER": gather,
        "GATHER_DY": gather_dy,
        "HAS_SCALE": scale,
        "UPCAST": upcast_for_dot(dtype),
        "ACC64": dtype == torch.float64,
        "DOT_PRECISION": precision or dot_precision(dtype),
        **tile.launch_kwargs(),
    }


def gmm_op(
    gather: bool, scale: bool, trans_b: bool, epilogue: str = "", store_aux: bool = False, rowdot: bool = False
) -> str:
    """The op's name in tuning keys and compile-check labels: ``gmm`` + g (gathered A rows), s (scaled
    rows), t (transposed B); then ``_<epilogue>``, ``+h`` / ``+a`` (the stored h or a), ``+r`` (row dots)."""
    name = "gmm" + "g" * gather + "s" * scale + "t" * trans_b
    if epilogue:
        name += f"_{epilogue}"
    if store_aux:
        name += "+a" if epilogue.startswith("d") else "+h"
    return name + "+r" * rowdot


def gmm_dw_op(gather: bool, scale: bool, gather_dy: bool = False) -> str:
    """``gmm_dw`` + g (gathered X rows), y (gathered dY rows), s (scaled dY rows)."""
    return "gmm_dw" + "g" * gather + "y" * gather_dy + "s" * scale


def tune_key(
    op: str, capability: tuple[int, int], dtype: torch.dtype, out_dtype: torch.dtype, precision: str, dims: tuple
) -> str:
    """``op | sm_XY | triton version | input dtype | output dtype | precision | shape bucket``; the
    device name is prefixed by ``choose_tile``. Flags (gather, scale, transposed B, epilogue) are in ``op``."""
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


def _pick(
    op: str, a: torch.Tensor, out_dtype: torch.dtype, dims: tuple, widths: tuple, launch, epilogue: str = ""
) -> Tile:
    """The tile for this launch; ``dims`` go into the tuning key, ``widths`` are the row strides
    (alignment picks the tile class), ``epilogue`` prunes the tiles by its registers."""
    if triton_interpreted() or not a.is_cuda:
        return INTERPRETER_TILE
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    cap = _capability_of_current(a.device)
    if index not in _SMEM:
        _SMEM[index] = device_smem_per_block(a.device)
    precision = dot_precision(a.dtype)
    ok = aligned(*widths)
    regs = (accumulators(epilogue), epilogue_tiles(epilogue))
    cands = candidates(a.dtype, precision, cap, _SMEM[index], ok, *regs)
    default = default_tile(a.dtype, precision, cap, _SMEM[index], ok, *regs)
    key = tune_key(op, cap, a.dtype, out_dtype, precision, dims)
    return choose_tile(key, _device_name(a), cands, default, cuda_measure(launch))


def _launch_gmm(
    a: torch.Tensor,
    b: torch.Tensor,
    group_end: torch.Tensor,
    c: torch.Tensor,
    N: int,
    *,
    trans_b: bool = False,
    gather: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    epilogue: str = "",
    h: torch.Tensor | None = None,
    a_out: torch.Tensor | None = None,
    rowdot: bool = False,
) -> torch.Tensor | None:
    """One ``_gmm_kernel`` launch over N computed columns into ``c`` (rows = c's rows). ``h``: written by
    the forward epilogues, read by the backward ones; ``a_out``: written by the backward ones.
    Returns the row-dot partials [column tiles, rows] when ``rowdot``."""
    E = b.shape[0]
    K = b.shape[2] if trans_b else b.shape[1]
    M = c.shape[0]
    sb = (b.stride(0), b.stride(2), b.stride(1)) if trans_b else (b.stride(0), b.stride(1), b.stride(2))
    for t in (c, h, a_out):
        if t is not None and t.stride(1) != 1:
            raise ValueError("gmm: the epilogue's outputs must have unit column stride")
    precision = dot_precision(a.dtype)
    store_aux = (h is not None) if epilogue in FORWARD_ACTIVATIONS else a_out is not None
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    partial: list[torch.Tensor | None] = [None]

    def launch(tile: Tile) -> None:
        table = tile_table(group_end, tile.BLOCK_M)
        m_tiles = cdiv(M, tile.BLOCK_M) + E  # upper bound: each group wastes at most one partial tile
        n_tiles = cdiv(N, tile.BLOCK_N)
        if rowdot:
            # One partial per column tile, summed afterwards in a fixed order: deterministic, unlike
            # atomic adds across the column tiles.
            partial[0] = torch.empty(n_tiles, M, dtype=acc_dtype, device=a.device)
        unused = group_end
        _gmm_kernel.on(a.device)[(m_tiles * n_tiles,)](
            a,
            b,
            c,
            group_end,
            table,
            gather if gather is not None else unused,
            scale if scale is not None else unused,
            h if h is not None else unused,
            a_out if a_out is not None else unused,
            partial[0] if rowdot else unused,
            m_tiles,
            N,
            K,
            E,
            a.stride(0),
            a.stride(1),
            *sb,
            c.stride(0),
            c.stride(1),
            h.stride(0) if h is not None else 0,
            a_out.stride(0) if a_out is not None else 0,
            M if rowdot else 0,
            **gmm_constexprs(
                a.dtype,
                K,
                E,
                tile,
                gather=gather is not None,
                scale=scale is not None,
                precision=precision,
                epilogue=epilogue,
                store_aux=store_aux,
                rowdot=rowdot,
            ),
        )

    op = gmm_op(gather is not None, scale is not None, trans_b, epilogue, store_aux, rowdot)
    launch(_pick(op, a, c.dtype, (M, K, N, E), (K, N), launch, epilogue))
    return partial[0]


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
    K, N = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    M = gather.shape[0] if gather is not None else a.shape[0]
    c = torch.empty(M, N, dtype=out_dtype or a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    _launch_gmm(a, b, group_end, c, N, trans_b=trans_b, gather=gather, scale=scale)
    return c


def gmm_act(
    x: torch.Tensor,
    w1: torch.Tensor,
    group_end: torch.Tensor,
    activation: str,
    *,
    gather: torch.Tensor | None = None,
    keep_h: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """a = act(X[gather] @ W1) with the activation in the GEMM's epilogue: (a [M, f], h or None).

    w1 [E, d, f], or [E, d, 2f] = [gate | up] for SwiGLU; h = X @ W1 [M, f or 2f] is written only with
    ``keep_h`` (for a backward). Both in x's dtype; the activation reads h rounded to it."""
    if activation not in FORWARD_ACTIVATIONS:
        raise ValueError(f"gmm_act: activation {activation!r} must be one of {FORWARD_ACTIVATIONS}")
    width = w1.shape[2]
    N = width // 2 if activation == "swiglu" else width
    M = gather.shape[0] if gather is not None else x.shape[0]
    a = torch.empty(M, N, dtype=x.dtype, device=x.device)
    h = torch.empty(M, width, dtype=x.dtype, device=x.device) if keep_h else None
    if M and N:  # K = 0 needs no special case: h = 0 and act(0) = 0 come out of the epilogue
        _launch_gmm(x, w1, group_end, a, N, gather=gather, epilogue=activation, h=h)
    return a, h


def gmm_act_grad(
    dy: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    group_end: torch.Tensor,
    activation: str,
    *,
    gather: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    keep_a: bool = False,
    rowdot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The expert MLP's backward through its activation, from dA = dY[gather] @ W2^T (fp32, never stored).

    w2 [E, f, d] (read transposed), h [M, f or 2f] the forward's saved pre-activation. Returns
    dh = act'(h) * scale * dA [M, f or 2f] in dy's dtype; a = act(h) [M, f] when ``keep_a``; and
    rowdot(dA, a) [M] (fp32; fp64 for fp64) when ``rowdot``, summed over column tiles in a fixed order."""
    if activation not in FORWARD_ACTIVATIONS:
        raise ValueError(f"gmm_act_grad: activation {activation!r} must be one of {FORWARD_ACTIVATIONS}")
    M, F = h.shape[0], w2.shape[1]
    acc_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    dh = torch.empty(M, h.shape[1], dtype=dy.dtype, device=dy.device)
    a = torch.empty(M, F, dtype=dy.dtype, device=dy.device) if keep_a else None
    if M == 0 or F == 0:
        return dh, a, torch.zeros(M, dtype=acc_dtype, device=dy.device) if rowdot else None
    partial = _launch_gmm(
        dy,
        w2,
        group_end,
        dh,
        F,
        trans_b=True,
        gather=gather,
        scale=scale,
        epilogue=f"d{activation}",
        h=h.contiguous(),
        a_out=a,
        rowdot=rowdot,
    )
    return dh, a, partial.sum(0) if rowdot else None


def gmm_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    group_end: torch.Tensor,
    num_experts: int,
    *,
    gather: torch.Tensor | None = None,
    gather_dy: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dW[e] = X[rows of e]^T @ (scale * dY)[rows of e] as [E, d, f]; X rows read through ``gather``, or
    dY rows through ``gather_dy`` (dY in token order, rows = len(gather_dy))."""
    if gather is not None and gather_dy is not None:
        raise ValueError("gmm_weight_grad: gather either X's rows or dY's, not both")
    D, F = x.shape[1], dy.shape[1]
    rows = gather_dy.shape[0] if gather_dy is not None else dy.shape[0]
    dw = torch.empty(num_experts, D, F, dtype=out_dtype or x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    if rows == 0:
        return dw.zero_()
    index = gather if gather is not None else gather_dy

    def launch(tile: Tile) -> None:
        grid = (num_experts * cdiv(D, tile.BLOCK_M) * cdiv(F, tile.BLOCK_N),)
        _gmm_dw_kernel.on(x.device)[grid](
            x,
            dy,
            dw,
            group_end,
            index if index is not None else group_end,
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
            **gmm_dw_constexprs(
                x.dtype, tile, gather=gather is not None, gather_dy=gather_dy is not None, scale=scale is not None
            ),
        )

    op = gmm_dw_op(gather is not None, scale is not None, gather_dy is not None)
    launch(_pick(op, x, dw.dtype, (rows, D, F, num_experts), (D, F), launch))
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
