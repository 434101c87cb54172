"""Triton top-k routing: scores, selection bias, top-k (ties to the lower index), renormalisation
and per-expert counts in one pass over the logits.

One program owns ``BLOCK_T`` tokens and all E experts (E <= 256 fits one tile row), so the softmax,
the k arg-max rounds and the counts never leave registers. Counts are integer atomics: exact and
order-independent. The backward is a few O(T*E) PyTorch ops on device (no host sync); the forward is
the part that runs on every step's critical path.

Scores use precise exp and division (libdevice ``expf`` and round-to-nearest ``div_rn``, what
``torch.softmax``/``torch.sigmoid`` use on CUDA; Triton's ``tl.exp`` and ``/`` are approximate, a few
ulps off, and flipped near-tied selections). The softmax sum still runs in another order than
PyTorch's, so a score may differ from the reference by a few ulps: selections are identical to the
reference wherever the selection scores (bias included) of two experts differ by more than
``TIE_EPS`` (``tie_eps``); closer than that, either order is a correct top-k, and the tests accept both.

``routed_scaling_factor`` is one product on the kernel's weights. Group-limited selection
(DeepSeek-V3's ``n_group``/``topk_group``) is not in the kernel; the backend sends it to the reference.
"""

from __future__ import annotations

import torch

from dynamoe.kernels.routing import check_route_args, limits_groups
from dynamoe.kernels.triton._jit import cdiv, check_device, kernel, next_pow2, tl, triton_interpreted

try:  # libdevice's expf (the interpreter has none: there numpy's exp, already precise, is used)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old triton
    libdevice = None

MAX_EXPERTS = 256
# Scores of the kernel and of torch's softmax/sigmoid differ by at most a few fp32 ulps (the sum's
# order); selections may differ only between experts whose selection scores are this close.
TIE_EPS = 1e-6


def tie_eps(scores: torch.Tensor) -> float:
    """The selection-score distance under which two experts count as tied: ``TIE_EPS`` times the
    largest selection score (at least 1; bias included), i.e. about 8 fp32 ulps."""
    return TIE_EPS * max(1.0, float(scores.detach().abs().max())) if scores.numel() else TIE_EPS


def selection_scores(logits: torch.Tensor, score: str, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference's selection scores [T, E] fp32: softmax or sigmoid of the logits, plus the bias."""
    x = logits.detach().float()
    s = torch.softmax(x, -1) if score == "softmax" else torch.sigmoid(x)
    return s + bias.detach().float() if bias is not None else s


def rows_differing_beyond_ties(experts: torch.Tensor, ref_experts: torch.Tensor, sel: torch.Tensor, eps: float):
    """[T] bool: rows whose selection differs from the reference's by more than a near-tie.

    Row t is fine when, for every rank j, the reference's selection score of the expert chosen j-th
    is within ``eps`` of that of the reference's j-th choice, and the row's experts are distinct:
    where scores are more than ``eps`` apart this means identical choices, closer it accepts either
    order of the near-tied experts."""
    if experts.numel() == 0:
        return torch.zeros(experts.shape[0], dtype=torch.bool, device=experts.device)
    a, b = sel.gather(1, experts), sel.gather(1, ref_experts)
    repeated = (
        (experts.sort(1).values.diff(dim=1) == 0).any(1)
        if experts.shape[1] > 1
        else torch.zeros_like(a[:, 0], dtype=torch.bool)
    )
    return ((a - b).abs() > eps).any(1) | repeated


def route_constexprs(T: int, E: int, score: str, has_bias: bool, normalize: bool) -> dict:
    """Every compile-time argument of ``_route_kernel`` (launches and the compile check use this)."""
    BLOCK_E = next_pow2(E)
    # Keep the [BLOCK_T, BLOCK_E] tile at about 4K elements: registers on GPU, few programs when interpreted.
    BLOCK_T = max(1, min(64, 4096 // BLOCK_E, next_pow2(T)))
    return {
        "BLOCK_T": BLOCK_T,
        "BLOCK_E": BLOCK_E,
        "SIGMOID": score == "sigmoid",
        "HAS_BIAS": has_bias,
        "NORMALIZE": normalize,
        "PRECISE": libdevice is not None and not triton_interpreted(),
        "num_warps": 4,
    }


@kernel
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    experts_ptr,
    counts_ptr,
    T,
    E,
    stride_t,
    k,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))
    if SIGMOID:
        if PRECISE:
            s = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + libdevice.exp(-x))
        else:
            s = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))
    else:
        if PRECISE:
            p = libdevice.exp(x - tl.max(x, axis=1)[:, None])
        else:
            p = tl.exp(x - tl.max(x, axis=1)[:, None])
        s = tl.math.div_rn(p, tl.broadcast_to(tl.sum(p, axis=1)[:, None], p.shape))
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        sel = s
    sel = tl.where(col_ok[None, :], sel, float("-inf"))
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for j in range(k):
        best = tl.max(sel, axis=1)
        # Lowest index among the maxima: the same choice as a stable descending sort.
        idx = tl.min(tl.where(sel == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(hit, s, 0.0), axis=1)
        sel = tl.where(hit, float("-inf"), sel)
        total += w
        counts += tl.sum(tl.where(hit & row_ok[:, None], 1, 0), axis=0).to(tl.int64)
        tl.store(weights_ptr + rows * k + j, w, mask=row_ok)
        tl.store(experts_ptr + rows * k + j, idx.to(tl.int64), mask=row_ok)
    if NORMALIZE:
        denom = tl.maximum(total, 1e-20)
        for j in range(k):
            w = tl.load(weights_ptr + rows * k + j, mask=row_ok, other=0.0)
            tl.store(weights_ptr + rows * k + j, tl.math.div_rn(w, denom), mask=row_ok)
    tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)


def route_forward(logits: torch.Tensor, k: int, score: str, bias: torch.Tensor | None, normalize: bool):
    """(weights [T, k] fp32, experts [T, k] int64, counts [E] int64) from the kernel; not differentiable."""
    T, E = logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(
            f"topk_route (triton): E={E} experts exceed the kernel's limit of {MAX_EXPERTS}; "
            "use DYNAMOE_KERNEL_BACKEND=reference for wider routers"
        )
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, experts, counts
    meta = route_constexprs(T, E, score, bias is not None, normalize)
    bias_arg = bias.contiguous() if bias is not None else logits  # any pointer; unused without HAS_BIAS
    grid = (cdiv(T, meta["BLOCK_T"]),)
    _route_kernel.on(logits.device)[grid](
        logits,
        bias_arg,
        weights,
        experts,
        counts,
        T,
        E,
        logits.stride(0),
        k,
        **meta,
    )
    return weights, experts, counts


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, k, score, normalize):
        weights, experts, counts = route_forward(logits, k, score, bias, normalize)
        ctx.save_for_backward(logits, experts)
        ctx.score, ctx.normalize = score, normalize
        ctx.mark_non_differentiable(experts, counts)
        return weights, experts, counts

    @staticmethod
    def backward(ctx, grad_w, _grad_experts, _grad_counts):
        logits, experts = ctx.saved_tensors
        x = logits.float()
        s_TE = torch.softmax(x, -1) if ctx.score == "softmax" else torch.sigmoid(x)
        p_Tk = s_TE.gather(1, experts)
        g_Tk = grad_w.float()
        if ctx.normalize:
            # w = p / max(S, 1e-20): where S is clamped, it is a constant and w is linear in p.
            S = p_Tk.sum(-1, keepdim=True)
            S_c = S.clamp_min(1e-20)
            through_S = torch.where(S > 1e-20, (g_Tk * p_Tk).sum(-1, keepdim=True) / S_c, torch.zeros_like(S))
            g_Tk = (g_Tk - through_S) / S_c
        g_TE = torch.zeros_like(s_TE).scatter_(1, experts, g_Tk)  # the k experts of a token are distinct
        if ctx.score == "softmax":
            d_TE = s_TE * (g_TE - (g_TE * s_TE).sum(-1, keepdim=True))
        else:
            d_TE = g_TE * s_TE * (1.0 - s_TE)
        return d_TE.to(logits.dtype), None, None, None, None


def topk_route_triton(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    normalize: bool = False,
    n_group: int = 1,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`dynamoe.kernels.routing.topk_route_ref` (same contract and outputs),
    except group-limited selection, which the kernel does not have: the backend's dispatch sends
    those calls to the reference, and a direct call here is refused rather than routed otherwise.
    """
    check_route_args(logits, k, score, bias, n_group, topk_group, routed_scaling_factor)
    if limits_groups(n_group, topk_group):
        raise ValueError(
            f"topk_route (triton): the kernel has no group-limited selection (n_group={n_group}, "
            f"topk_group={topk_group}); call dynamoe.kernels.topk_route, which runs the reference for it"
        )
    check_device(logits, "topk_route")
    if bias is not None and bias.device != logits.device:
        raise ValueError(
            f"topk_route: bias is on {bias.device} but logits on {logits.device}; move bias to the logits' device"
        )
    weights, experts, counts = _Route.apply(logits, bias, k, score, normalize)
    if routed_scaling_factor != 1.0:
        # After normalisation, as in the reference (same fp32 product); autograd carries the factor.
        weights = weights * routed_scaling_factor
    return weights, experts, counts
