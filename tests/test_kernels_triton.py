"""The Triton kernels against their PyTorch references, in Triton's interpreter on CPU (on CUDA when
there is a GPU): routing, dispatch, grouped GEMMs, the fused expert MLP, the MoE layer on top.

Triton fixes interpreter mode when it is imported, so without a GPU tests/conftest.py imports it with
``TRITON_INTERPRET=1`` before any test module and restores the variable; an autouse fixture here
sets it again only around each test, so other test modules in the same process keep the reference
path.
Every op's outputs are allocated poisoned (NaN, or a garbage integer) so an unwritten element fails.

Tolerances (max abs error against a float64 reference; bf16/fp16 also against PyTorch's own op):
    fp64: 1e-12   fp32: 1e-5 * scale   bf16, fp16: at most 2x PyTorch's error in the same dtype
    plus 1 ulp of the output (the kernel rounds once, after an fp32 sum in a different order).
bf16 GEMM operands are widened to fp32 before tl.dot in the interpreter (numpy has no bf16), so
interpreter runs check bf16 loads, stores and rounding, not the tensor-core bf16 product.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")  # in interpreter mode without a GPU: conftest imports it so first
from dynamoe.kernels.triton._jit import triton_interpreted  # noqa: E402

if not CUDA and not triton_interpreted():
    pytest.skip(
        "triton was imported in this process without TRITON_INTERPRET=1 before tests/conftest.py could; "
        "run this file in its own pytest process",
        allow_module_level=True,
    )

from dynamoe import kernels
from dynamoe.kernels.dispatch import permute_ref, unpermute_ref
from dynamoe.kernels.grouped_gemm import grouped_mm_ref
from dynamoe.kernels.routing import topk_route_ref
from dynamoe.kernels.triton import autotune
from dynamoe.kernels.triton.grouped_gemm import tile_table
from dynamoe.kernels.triton.routing import rows_differing_beyond_ties, selection_scores, tie_eps

DEV = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Select the Triton backend for CPU tensors for this test only, and poison fresh outputs."""
    monkeypatch.delenv("DYNAMOE_KERNEL_BACKEND", raising=False)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    real_empty = torch.empty

    def poisoned_empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-987654)
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _ulp(t: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """One unit in the last place of ``dtype`` (default: t's) at t's largest magnitude."""
    return float(t.detach().abs().max()) * torch.finfo(dtype or t.dtype).eps if t.numel() else 0.0


def assert_close_lowp(out, ref64, torch_out, what):
    """out's error vs the fp64 reference at most twice PyTorch's own (same dtype), plus one output ulp."""
    if out.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    bound = 2 * torch_err + _ulp(ref64.to(out.dtype)) + 1e-6
    assert math.isfinite(err) and err <= bound, (
        f"{what}: error {err:.3g} > bound {bound:.3g} (torch's error {torch_err:.3g})"
    )


def test_backend_is_triton_here_and_reference_without_interpreter(monkeypatch):
    x = torch.zeros(2, device=DEV)
    for op in ("topk_route", "permute", "unpermute", "grouped_mm", "moe_mlp"):
        assert kernels.backend_for(x, op) == "triton"
    monkeypatch.setenv("DYNAMOE_KERNEL_BACKEND", "reference")
    assert kernels.backend_for(x, "grouped_mm") == "reference" and not kernels.fused_moe_available(x)
    if not CUDA:
        monkeypatch.delenv("DYNAMOE_KERNEL_BACKEND")
        monkeypatch.delenv("TRITON_INTERPRET")
        assert kernels.backend_for(x, "permute") == "reference"


# ----------------------------------------------------------------------------------- routing

ROUTE_CASES = [(1, 1, 1), (7, 4, 1), (7, 4, 4), (600, 9, 2), (600, 9, 9), (33, 64, 6), (20, 256, 8)]


def assert_same_routing(out, ref, logits, k, score, bias, normalize):
    """Selections equal to the reference's except between near-tied experts (selection scores within
    ``tie_eps``: the kernel's scores may differ from torch's by a few ulps, the softmax sum's order);
    weights equal to the reference's scores of the experts actually chosen; counts exact for them."""
    w, ex, counts = out
    rw, rex, rcounts = ref
    sel = selection_scores(logits, score, bias)
    eps = tie_eps(sel)
    bad = rows_differing_beyond_ties(ex, rex, sel, eps)
    assert not bad.any(), f"rows {bad.nonzero().flatten().tolist()[:8]} pick other experts than the reference"
    E = logits.shape[1]
    assert torch.equal(counts, torch.bincount(ex.reshape(-1), minlength=E))
    if torch.equal(ex, rex):
        assert torch.equal(counts, rcounts)
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-6)
        return
    p = selection_scores(logits, score, None).gather(1, ex)
    if normalize:
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    torch.testing.assert_close(w, p, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("T,E,k", ROUTE_CASES)
def test_topk_route_matches_reference(T, E, k, score, normalize):
    g = _gen("route", T, E, k, score, normalize)
    logits = torch.randn(T, E, generator=g).to(DEV).requires_grad_()
    bias = (0.1 * torch.randn(E, generator=g)).to(DEV) if E > 1 else None
    w, ex, counts = kernels.topk_route(logits, k, score=score, bias=bias, normalize=normalize)
    rw, rex, rcounts = topk_route_ref(logits, k, score=score, bias=bias, normalize=normalize)
    assert (w.dtype, ex.dtype, counts.dtype) == (torch.float32, torch.int64, torch.int64)
    assert_same_routing((w, ex, counts), (rw, rex, rcounts), logits, k, score, bias, normalize)
    if not torch.equal(ex, rex):
        return  # a near-tie chose other experts: the gradients are of another selection
    up = torch.randn(T, k, generator=g).to(DEV)
    (grad,) = torch.autograd.grad((w * up).sum(), logits)
    (rgrad,) = torch.autograd.grad((rw * up).sum(), logits)
    torch.testing.assert_close(grad, rgrad, atol=1e-6, rtol=1e-5)


def test_near_tie_comparison_accepts_ties_only():
    sel = torch.tensor([[0.5, 0.5 + 1e-8, 0.1, 0.3], [0.5, 0.4, 0.1, 0.3]])
    ref = torch.tensor([[1, 0], [0, 3]])
    eps = tie_eps(sel)
    assert not rows_differing_beyond_ties(torch.tensor([[0, 1], [0, 3]]), ref, sel, eps).any()  # near-tie swap
    assert rows_differing_beyond_ties(torch.tensor([[1, 0], [0, 1]]), ref, sel, eps).tolist() == [False, True]
    assert rows_differing_beyond_ties(torch.tensor([[1, 1], [0, 3]]), ref, sel, eps).tolist() == [True, False]


def test_topk_route_ties_and_bf16_logits():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0] * 5, [0.0, 5.0, 0.0, 5.0, 0.0]], device=DEV)
    for k in (1, 2, 3, 5):
        for score in ("softmax", "sigmoid"):
            ex = kernels.topk_route(logits, k, score=score)[1]
            assert torch.equal(ex, topk_route_ref(logits, k, score=score)[1])
    assert kernels.topk_route(logits, 2)[1].tolist() == [[1, 2], [0, 1], [1, 3]]
    x = torch.randn(37, 8, generator=_gen("bf16")).bfloat16().to(DEV)
    w, ex, c = kernels.topk_route(x, 3, normalize=True)
    rw, rex, rc = topk_route_ref(x, 3, normalize=True)
    assert torch.equal(ex, rex) and torch.equal(c, rc)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-6)


def test_topk_route_errors():
    with pytest.raises(ValueError, match="exceed the kernel's limit"):
        kernels.topk_route(torch.randn(2, 300, device=DEV), 2)
    with pytest.raises(ValueError, match="k=9 must be between 1"):
        kernels.topk_route(torch.randn(2, 8, device=DEV), 9)


# ------------------------------------------------------------------------- permute/unpermute


def _assignments(T, E, k, g, drop=0.25):
    """[T, k] distinct experts per token; experts 1 and E-1 starved (E > 2), ~25% of slots dropped."""
    ex = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if E > 2:
        ex[(ex == E - 1) | (ex == 1)] = -1
    ex[torch.rand(T, k, generator=g) < drop] = -1
    return ex


DISPATCH_CASES = [(1, 1, 1), (7, 4, 1), (7, 4, 4), (600, 9, 1), (600, 9, 9), (37, 64, 8)]


# d = 12 and 300 (neither a multiple of the 256-wide column block); the 600-token, wide case in fp32 only.
DISPATCH_PARAMS = [
    (T, E, k, d, dtype)
    for T, E, k in DISPATCH_CASES
    for d in (12, 300)
    for dtype in (torch.float32, torch.float64, torch.bfloat16)
    if not (T == 600 and d == 300 and (dtype != torch.float32 or k == 9))
]


@pytest.mark.parametrize("T,E,k,d,dtype", DISPATCH_PARAMS)
def test_permute_unpermute_match_reference(T, E, k, d, dtype):
    g = _gen("perm", T, E, k, d, str(dtype))
    experts = _assignments(T, E, k, g).to(DEV)
    x = torch.randn(T, d, generator=g).to(DEV, dtype).requires_grad_()
    weights = torch.rand(T, k, generator=g).to(DEV).requires_grad_()
    xs, row_map = kernels.permute(x, experts, E)
    rxs, rrow_map = permute_ref(x, experts, E)
    assert torch.equal(row_map, rrow_map) and torch.equal(xs, rxs)  # a copy: bit-exact in every dtype
    y_sorted = torch.tanh(xs.float()).to(dtype) * 2  # something non-linear and differentiable per row
    ry_sorted = torch.tanh(rxs.float()).to(dtype) * 2
    y = kernels.unpermute(y_sorted, row_map, weights)
    ry = unpermute_ref(ry_sorted, rrow_map, weights)
    assert y.dtype == dtype and torch.isfinite(y).all()
    up = torch.randn(T, d, generator=g).to(DEV, dtype)
    gx, gw = torch.autograd.grad(y, (x, weights), up, allow_unused=True)
    rgx, rgw = torch.autograd.grad(ry, (x, weights), up, allow_unused=True)
    atol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.0}[dtype]
    # bf16: the same fp32 sums rounded once; the order of the k terms may differ, and the interpreter's
    # fp32 -> bf16 conversion may round differently from PyTorch's: allow 2 ulps.
    ulp = 0.0 if dtype != torch.bfloat16 else 2 * _ulp(ry)
    torch.testing.assert_close(y.double(), ry.double(), atol=atol + ulp, rtol=0)
    torch.testing.assert_close(gx.double(), rgx.double(), atol=atol + 2 * ulp, rtol=0)
    torch.testing.assert_close(gw, rgw, atol=1e-5 * d if dtype != torch.float64 else 1e-12, rtol=1e-5)
    assert torch.all(gw[experts < 0] == 0)


def test_permute_num_rows_hint_and_all_dropped():
    experts = torch.tensor([[2, 0], [0, 1], [1, 2]], device=DEV)
    x = torch.arange(6.0, device=DEV).view(3, 2)
    xs, rm = kernels.permute(x, experts, 3, num_rows=6)
    assert rm.tolist() == [[4, 0], [1, 2], [3, 5]] and torch.equal(xs, x[[0, 1, 1, 2, 0, 2]])
    x = torch.randn(3, 5, device=DEV, requires_grad=True)
    dropped = torch.full((3, 2), -1, device=DEV)
    xs, rm = kernels.permute(x, dropped, 4)
    assert xs.shape == (0, 5) and torch.equal(rm, dropped)
    w = torch.rand(3, 2, device=DEV, requires_grad=True)
    y = kernels.unpermute(xs, rm, w)
    assert torch.equal(y, torch.zeros(3, 5, device=DEV))
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


# -------------------------------------------------------------------------------- grouped_mm

COUNT_CASES = {
    "mixed": [3, 0, 5, 0, 9],
    "one_expert": [0, 0, 17, 0, 0],
    "last": [0, 0, 0, 0, 4],
    "single": [1, 1, 0, 1, 0],
    "none": [0, 0, 0],
    "many": [0, 101, 7, 0, 33, 0, 64, 1, 394],  # 600 rows, several partial tiles
}
TOL32 = 1e-5


GMM_PARAMS = [
    (name, d, f, dtype)
    for name in COUNT_CASES
    for d, f in ((32, 16), (13, 10), (70, 33))  # block multiples, and widths that are not
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    if name != "many" or (d, f) == (70, 33)
]


@pytest.mark.parametrize("counts_name,d,f,dtype", GMM_PARAMS)
def test_grouped_mm_matches_reference(counts_name, d, f, dtype):
    g = _gen("gmm", counts_name, d, f, str(dtype))
    counts = torch.tensor(COUNT_CASES[counts_name])
    N, E = int(counts.sum()), len(counts)
    x64 = torch.randn(N, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(E, d, f, generator=g, dtype=torch.float64) / math.sqrt(d)
    up64 = torch.randn(N, f, generator=g, dtype=torch.float64)
    x = x64.to(DEV, dtype).requires_grad_()
    w = w64.to(DEV, dtype).requires_grad_()
    offsets = kernels.offsets_from_counts(counts).to(DEV)
    y = kernels.grouped_mm(x, w, offsets=offsets)
    assert y.dtype == dtype and y.shape == (N, f) and "GroupedMM" in type(y.grad_fn).__name__
    gx, gw = torch.autograd.grad(y, (x, w), up64.to(DEV, dtype))
    # fp64 reference from the same (rounded) inputs; PyTorch's own loop in this dtype for the bound.
    xr, wr = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ry = grouped_mm_ref(xr, wr, offsets.cpu())
    rgx, rgw = torch.autograd.grad(ry, (xr, wr), up64.to(dtype).double()) if N else (xr * 0, wr * 0)
    assert torch.all(gw[counts.to(DEV) == 0] == 0)  # empty experts: exact zeros, not poison
    if dtype == torch.float32:
        for out, ref in ((y, ry), (gx, rgx), (gw, rgw)):
            torch.testing.assert_close(out.double().cpu(), ref, atol=TOL32 * max(1, math.sqrt(N)), rtol=TOL32)
        return
    xt, wt = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    ty = grouped_mm_ref(xt, wt, offsets.cpu())
    tgx, tgw = torch.autograd.grad(ty, (xt, wt), up64.to(dtype)) if N else (xt * 0, wt * 0)
    for name, out, ref, tout in (("y", y, ry, ty), ("dx", gx, rgx, tgx), ("dw", gw, rgw, tgw)):
        assert_close_lowp(out.cpu(), ref, tout, name)


def test_grouped_mm_float64_exact_enough_and_tile_table():
    counts = torch.tensor([0, 5, 0, 40, 1])
    x = torch.randn(46, 9, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(5, 9, 7, dtype=torch.float64, device=DEV, requires_grad=True)
    y = kernels.grouped_mm(x, w, counts=counts.to(DEV))
    ry = grouped_mm_ref(x, w, kernels.offsets_from_counts(counts))
    torch.testing.assert_close(y, ry, atol=1e-12, rtol=1e-12)
    ends = kernels.offsets_from_counts(counts)
    assert tile_table(ends, 32).tolist() == [0, 1, 1, 3, 4]  # cumulative ceil(count / 32)
    assert tile_table(ends, 32)[-1] <= math.ceil(46 / 32) + 5  # within the launch grid's bound


def test_grouped_mm_errors():
    x, w = torch.randn(6, 8, device=DEV), torch.randn(2, 8, 4, device=DEV)
    with pytest.raises(ValueError, match="cast w to x's dtype"):
        kernels.grouped_mm(x, w.double(), counts=torch.tensor([3, 3], device=DEV))
    with pytest.raises(ValueError, match="not supported"):
        kernels.grouped_mm(x.int(), w.int(), counts=torch.tensor([3, 3], device=DEV))


# -------------------------------------------------------------------- fused MLP and MoE layer

MLP_CASES = [(1, 1, 1, "gelu"), (7, 4, 4, "swiglu"), (7, 4, 2, "gelu"), (200, 9, 2, "swiglu"), (60, 16, 6, "gelu")]


def _mlp_inputs(T, E, k, activation, dtype, drop, d=24, f=20, tag="mlp"):
    """x, experts, weights, counts, w1, w2 on DEV; experts 1 and E-1 starved (E > 2), ``drop`` of the slots -1."""
    g = _gen(tag, T, E, k, activation, str(dtype))
    experts = _assignments(T, E, k, g, drop=drop).to(DEV)
    counts = torch.bincount(experts[experts >= 0].cpu(), minlength=E).to(DEV)
    width = 2 * f if activation == "swiglu" else f
    x = torch.randn(T, d, generator=g).to(DEV, dtype).requires_grad_()
    weights = torch.rand(T, k, generator=g).to(DEV).requires_grad_()
    w1 = (torch.randn(E, d, width, generator=g) / math.sqrt(d)).to(DEV, dtype).requires_grad_()
    w2 = (torch.randn(E, f, d, generator=g) / math.sqrt(f)).to(DEV, dtype).requires_grad_()
    return x, experts, weights, counts, w1, w2, torch.randn(T, d, generator=g).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T,E,k,activation", MLP_CASES)
def test_fused_moe_mlp_matches_unfused_reference(T, E, k, activation, dtype):
    x, experts, weights, counts, w1, w2, up = _mlp_inputs(T, E, k, activation, dtype, 0.2 if k > 1 else 0.0)
    args = (experts, weights, counts, w1, w2)
    y = kernels.moe_mlp(x, *args, activation=activation)
    ry = kernels.moe_mlp_ref(x, *args, activation=activation)
    assert y.dtype == dtype and torch.isfinite(y).all()
    inputs = (x, weights, w1, w2)
    grads = torch.autograd.grad(y, inputs, up)
    rgrads = torch.autograd.grad(ry, inputs, up)
    if dtype == torch.float64:
        tol = {"atol": 1e-10, "rtol": 1e-10}
    elif dtype == torch.float32:
        tol = {"atol": 2e-5, "rtol": 1e-4}
    else:  # the fused path rounds w * (a @ W2) once, the unfused a @ W2 then w * (...): a few ulps apart
        tol = {"atol": 4 * _ulp(ry) + 1e-3, "rtol": 2e-2}
    torch.testing.assert_close(y.double(), ry.double(), **tol)
    for name, a, b in zip(("dx", "dweights", "dw1", "dw2"), grads, rgrads):
        scale = max(1.0, float(b.double().abs().max()))
        # the combine weights are fp32 (also with fp64 activations): their gradient is rounded to fp32
        t = {"atol": 1e-6, "rtol": 1e-6} if name == "dweights" and dtype == torch.float64 else tol
        torch.testing.assert_close(a.double() / scale, b.double() / scale, **t, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.all(grads[1][experts < 0] == 0)


def _tol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Max abs error allowed for a kernel output against an fp64 reference from the same inputs: the
    fp32 accumulation, plus for bf16 the rounding to it (2 ulps at the largest magnitude: the
    interpreter's fp32 -> bf16 conversion may round differently from PyTorch's)."""
    big = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    if dtype == torch.float64:
        return 1e-12 * big
    return (2 * _ulp(ref, dtype) if dtype != torch.float32 else 0.0) + 1e-5 * big


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_activation_epilogues_match_pytorch(activation, dtype):
    """Each fused piece alone, against PyTorch in fp64 from the same rounded inputs: GEMM1 with the
    activation in its epilogue (a and h), the backward GEMM (dh, the recomputed a, the row dots), and
    the weight gradient with dY gathered; empty experts, a group over one tile, widths off the tile."""
    from dynamoe.kernels.moe_mlp import activate
    from dynamoe.kernels.triton.grouped_gemm import gmm_act, gmm_act_grad, gmm_weight_grad

    g = _gen("epilogues", activation, str(dtype))
    counts = torch.tensor([3, 0, 37, 0, 9, 1])
    E, N, T, d, f = len(counts), int(counts.sum()), 23, 24, 20
    width = 2 * f if activation == "swiglu" else f
    tok = torch.randint(0, T, (N,), generator=g).to(DEV)
    x = torch.randn(T, d, generator=g).to(DEV, dtype)
    w1 = (torch.randn(E, d, width, generator=g) / math.sqrt(d)).to(DEV, dtype)
    w2 = (torch.randn(E, f, d, generator=g) / math.sqrt(f)).to(DEV, dtype)
    dy = torch.randn(T, d, generator=g).to(DEV, dtype)
    scale = torch.rand(N, generator=g).to(DEV)
    ends = kernels.offsets_from_counts(counts).to(DEV)
    offsets = ends.cpu()

    a, h = gmm_act(x, w1, ends, activation, gather=tok, keep_h=True)
    assert (a.shape, h.shape, a.dtype, h.dtype) == ((N, f), (N, width), dtype, dtype)
    h_ref = grouped_mm_ref(x.double().cpu()[tok.cpu()], w1.double().cpu(), offsets)
    assert (h.double().cpu() - h_ref).abs().max() <= _tol(h_ref, dtype)
    a_ref = activate(h.double().cpu(), activation)  # from the kernel's rounded h, as the epilogue reads it
    assert (a.double().cpu() - a_ref).abs().max() <= _tol(a_ref, dtype)
    a_only, no_h = gmm_act(x, w1, ends, activation, gather=tok)
    assert no_h is None and torch.equal(a_only, a)

    dh, a_bwd, rowdot = gmm_act_grad(dy, w2, h, ends, activation, gather=tok, scale=scale, keep_a=True, rowdot=True)
    assert (dh.shape, dh.dtype, rowdot.shape) == ((N, width), dtype, (N,))
    da = grouped_mm_ref(dy.double().cpu()[tok.cpu()], w2.double().cpu().transpose(1, 2), offsets)
    h64 = h.double().cpu().requires_grad_()
    (dh_ref,) = torch.autograd.grad(activate(h64, activation), h64, da * scale.double().cpu()[:, None])
    assert (dh.double().cpu() - dh_ref).abs().max() <= _tol(dh_ref, dtype)
    # The backward's a is the forward's, recomputed from h the same way (bit-equal in the interpreter).
    if CUDA:
        assert (a_bwd.double() - a.double()).abs().max() <= _ulp(a, dtype)
    else:
        assert torch.equal(a_bwd, a)
    rowdot_ref = (da * a.double().cpu()).sum(-1)
    assert rowdot.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (rowdot.double().cpu() - rowdot_ref).abs().max() <= _tol(
        rowdot_ref, torch.float32 if dtype != torch.float64 else dtype
    )
    dh2, none_a, none_rowdot = gmm_act_grad(dy, w2, h, ends, activation, gather=tok, scale=scale)
    assert none_a is None and none_rowdot is None and torch.equal(dh2, dh)

    dw2 = gmm_weight_grad(a, dy, ends, E, gather_dy=tok, scale=scale)
    # the kernel scales dY's rows in fp32 and rounds them to the input dtype before the product
    g_rows = (dy.double().cpu()[tok.cpu()] * scale.double().cpu()[:, None]).to(dtype).double()
    dw2_ref = torch.stack(
        [a.double().cpu()[s:e].T @ g_rows[s:e] for s, e in zip([0, *offsets[:-1].tolist()], offsets.tolist())]
    )
    assert torch.all(dw2[counts.to(DEV) == 0] == 0)  # empty experts: zeros, not poison
    assert (dw2.double().cpu() - dw2_ref).abs().max() <= _tol(dw2_ref, dtype)


def test_activation_epilogues_without_rows():
    from dynamoe.kernels.triton.grouped_gemm import gmm_act, gmm_act_grad, gmm_weight_grad

    ends = torch.zeros(3, dtype=torch.int32, device=DEV)
    tok = torch.zeros(0, dtype=torch.int64, device=DEV)
    x, dy = torch.randn(4, 8, device=DEV), torch.randn(4, 8, device=DEV)
    w1, w2 = torch.randn(3, 8, 10, device=DEV), torch.randn(3, 5, 8, device=DEV)
    a, h = gmm_act(x, w1, ends, "swiglu", gather=tok, keep_h=True)
    assert a.shape == (0, 5) and h.shape == (0, 10)
    dh, a2, rowdot = gmm_act_grad(dy, w2, h, ends, "swiglu", gather=tok, keep_a=True, rowdot=True)
    assert dh.shape == (0, 10) and a2.shape == (0, 5) and rowdot.shape == (0,)
    assert torch.equal(gmm_weight_grad(a, dy, ends, 3, gather_dy=tok), torch.zeros(3, 5, 8, device=DEV))


def test_epilogue_flags_are_checked_where_they_are_derived():
    from dynamoe.kernels.triton.grouped_gemm import gmm_constexprs, gmm_op

    tile = autotune.Tile(32, 32, 32)
    ce = gmm_constexprs(
        torch.bfloat16, 64, 4, tile, gather=True, scale=True, epilogue="dswiglu", store_aux=True, rowdot=True
    )
    assert (ce["EPILOGUE"], ce["STORE_AUX"], ce["ROWDOT"]) == ("dswiglu", True, True)
    assert gmm_op(True, True, True, "dswiglu", True, True) == "gmmgst_dswiglu+a+r"
    assert gmm_op(True, False, False, "gelu", True) == "gmmg_gelu+h" and gmm_op(False, False, True) == "gmmt"
    for bad in (
        {"epilogue": "relu"},
        {"epilogue": "gelu", "scale": True},  # a row scale before the activation: not what the MLP needs
        {"store_aux": True},
        {"epilogue": "swiglu", "rowdot": True},
    ):
        kw = {"gather": False, "scale": False, **bad}
        with pytest.raises(ValueError):
            gmm_constexprs(torch.bfloat16, 64, 4, tile, **kw)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Every tensor an op creates (storage not shared with its inputs): (op, shape, dtype)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, tuple, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor) and t.numel()}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in inputs:
                self.made.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_mlp_writes_no_intermediate_it_fuses_away(activation):
    """What the fusions remove is never created: no activation pass over h, no gathered copy of dY, no
    fp32 [N, f] tensor in the backward; and under no_grad, no h."""
    T, E, k, d, f = 40, 4, 2, 24, 20
    x, experts, weights, counts, w1, w2, up = _mlp_inputs(T, E, k, activation, torch.bfloat16, 0.0, tag="allocs")
    N, width = int((experts >= 0).sum()), w1.shape[2]  # kept rows (experts 1 and 3 are starved)
    args = (experts, weights, counts, w1, w2)
    with _Allocations() as fwd:
        y = kernels.moe_mlp(x, *args, activation=activation)
    big = [(op, shape) for op, shape, _ in fwd.made if math.prod(shape) >= N * f]
    # a [N, f] and h [N, w] (for the backward) from the first GEMM, z [N, d] from the second, y: nothing else
    assert sorted(shape for _, shape in big) == sorted([(N, f), (N, width), (N, d), (T, d)]), big
    with _Allocations() as bwd:
        torch.autograd.grad(y, (x, weights, w1, w2), up)
    assert not [m for m in bwd.made if m[2] == torch.float32 and math.prod(m[1]) >= N * f], bwd.made
    assert [shape for _, shape, _ in bwd.made].count((N, d)) == 1, bwd.made  # dh @ W1^T only: no dY[tok] copy
    with torch.no_grad(), _Allocations() as inference:
        kernels.moe_mlp(x, *args, activation=activation)
    shapes = [shape for _, shape, _ in inference.made]
    assert shapes.count((N, f)) == 1 and (width == f or (N, width) not in shapes), inference.made


def _layer(activation, capacity_factor=None, k=2, score="softmax"):
    from dynamoe.config import MoEConfig, RouterConfig
    from dynamoe.layers.moe_layer import MoELayer

    torch.manual_seed(0)
    router = RouterConfig(
        top_k=k,
        score=score,
        capacity_factor=capacity_factor,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        aux_free_bias=score == "sigmoid",
    )
    cfg = MoEConfig(num_experts=6, d_expert=16, activation=activation, num_shared_experts=1, router=router)
    layer = MoELayer(cfg, 20, init_std=0.3)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
        if score == "sigmoid":  # a selection bias that changes choices (aux-loss-free balancing)
            layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 6))
    return layer.to(DEV)


@pytest.mark.parametrize("activation,capacity_factor,score", [("gelu", None, "softmax"), ("swiglu", 1.0, "sigmoid")])
def test_moe_layer_triton_path_equals_reference_path(monkeypatch, activation, capacity_factor, score):
    layer = _layer(activation, capacity_factor, score=score)
    x = torch.randn(3, 11, 20, generator=_gen("layer", activation)).to(DEV)

    def run():
        xx = x.clone().requires_grad_()
        y, aux = layer(xx)
        loss = (y * torch.linspace(-1, 1, y.numel(), device=DEV).view_as(y)).sum() + aux.loss
        grads = torch.autograd.grad(loss, [xx, *layer.parameters()])
        return y.detach(), aux, grads

    y, aux, grads = run()
    assert layer.dispatcher.fuses(x.reshape(-1, 20))  # the fused Triton MLP ran
    monkeypatch.setenv("DYNAMOE_KERNEL_BACKEND", "reference")
    ry, raux, rgrads = run()
    torch.testing.assert_close(y, ry, atol=2e-5, rtol=1e-4)
    assert torch.equal(aux.counts, raux.counts) and torch.equal(aux.dropped, raux.dropped)
    if capacity_factor is not None:
        assert int(aux.dropped) > 0  # the capacity path (dropped slots) is exercised
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ tile cache


def test_tile_cache_measures_once_and_persists(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    monkeypatch.setenv("DYNAMOE_TRITON_TUNE_CACHE", str(path))
    monkeypatch.delenv("DYNAMOE_TRITON_TUNE", raising=False)
    calls = []
    cands = (autotune.Tile(64, 64, 32), autotune.Tile(128, 64, 32), autotune.Tile(32, 32, 32))

    def measure(tile):
        calls.append(tile)
        if tile.BLOCK_M == 32:
            raise RuntimeError("out of shared memory")  # a failing tile is skipped, not fatal
        return {64: 2.0, 128: 1.0}[tile.BLOCK_M]

    key = "gmm|bfloat16|" + autotune.shape_bucket(3000, 4096, 1024, 64)
    assert key.endswith("4096x4096x1024x64")  # rows round up to a power of two
    best = autotune.choose_tile(key, "GPU-A", cands, cands[0], measure)
    assert best == cands[1] and len(calls) == 3
    assert autotune.choose_tile(key, "GPU-A", cands, cands[0], measure) == cands[1] and len(calls) == 3
    assert "GPU-A|" + key in path.read_text() and "RuntimeError" in path.read_text()
    assert autotune.choose_tile(key, "GPU-B", cands, cands[0], None) == cands[0]  # other device, no measuring
    monkeypatch.setenv("DYNAMOE_TRITON_TUNE_CACHE", str(tmp_path / "other.json"))
    monkeypatch.setenv("DYNAMOE_TRITON_TUNE", "0")
    assert autotune.choose_tile(key, "GPU-A", cands, cands[2], measure) == cands[2] and len(calls) == 3
    monkeypatch.setenv("DYNAMOE_TRITON_TUNE_CACHE", str(path))  # back to the first file: read from disk
    assert autotune.choose_tile(key, "GPU-A", cands, cands[0], None) == cands[1]


def test_registration_needs_triton(monkeypatch):
    import importlib.util

    import dynamoe.kernels.triton as backend

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert backend.register() is False


# ------------------------------------------------------------------- precision and tile choice


def test_fp32_dot_precision_follows_torch(monkeypatch):
    from dynamoe.kernels.triton._jit import dot_precision
    from dynamoe.kernels.triton.grouped_gemm import gmm_constexprs

    monkeypatch.delenv("DYNAMOE_FP32_DOT", raising=False)
    matmul = torch.backends.cuda.matmul  # a module object with __setattr__: monkeypatch cannot undo it
    saved, saved_tf32 = torch.get_float32_matmul_precision(), matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "ieee"
        tile = autotune.Tile(64, 64, 32)
        assert gmm_constexprs(torch.float32, 64, 4, tile, gather=False, scale=False)["DOT_PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        monkeypatch.setenv("DYNAMOE_FP32_DOT", "tf32x3")
        assert dot_precision(torch.float32) == "tf32x3" and dot_precision(torch.float16) == "ieee"
        monkeypatch.setenv("DYNAMOE_FP32_DOT", "fast")
        with pytest.raises(ValueError, match="DYNAMOE_FP32_DOT"):
            dot_precision(torch.float32)
    finally:
        torch.set_float32_matmul_precision(saved)
        matmul.allow_tf32 = saved_tf32


def test_tiles_fit_shared_memory_for_dtype_and_device():
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    for cap in ((9, 0), (8, 0), (8, 9), (12, 0), (7, 5)):
        limit = autotune.smem_per_block(cap)
        for dtype, precision in ((bf16, "ieee"), (f32, "ieee"), (f32, "tf32"), (f32, "tf32x3"), (f64, "ieee")):
            elt = torch.tensor([], dtype=dtype).element_size()
            for aligned in (True, False):
                cands = autotune.candidates(dtype, precision, cap, is_aligned=aligned)
                assert cands[0] == autotune.default_tile(dtype, precision, cap, is_aligned=aligned)
                assert all(autotune.smem_estimate(t, elt, cap) <= limit for t in cands), (cap, dtype, precision)
    # The review's numbers: the old 128x128x64, 3-stage fallback needs 192 KB in fp32 and 256 KB in
    # fp64, over the A100's 163 KB; fp32 TF32 on an A100 keeps only tiles that fit.
    old = autotune.Tile(128, 128, 64, 8, 8, 3)
    assert autotune.smem_estimate(old, 4, (9, 0)) > 192 * 1024 > autotune.smem_per_block((8, 0))
    assert old not in autotune.candidates(f32, "tf32", (8, 6))
    assert autotune.Tile(128, 256, 64, 8, 8, 3) not in autotune.candidates(f32, "tf32", (9, 0))
    assert autotune.Tile(128, 256, 64, 8, 8, 3) in autotune.candidates(bf16, "ieee", (9, 0))
    assert autotune.aligned(4096, 1024) and not autotune.aligned(4096, 333)


def test_tile_pruning_counts_the_fused_epilogues():
    """The SwiGLU forward's second accumulator and B tile, and the fused epilogues' live tiles, shrink
    the default tile where the plain GEMM's would not fit (what the compile check measured)."""
    from dynamoe.kernels.triton.grouped_gemm import EPILOGUES, accumulators, epilogue_tiles

    bf16, big = torch.bfloat16, autotune.Tile(128, 128, 64, 8, 8, 3)
    assert autotune.smem_estimate(big, 2, (9, 0), 2) > autotune.smem_estimate(big, 2, (9, 0))
    assert autotune.fits_registers(big, bf16, "ieee", (9, 0)) and not autotune.fits_registers(
        big, bf16, "ieee", (8, 0), 2
    )
    for cap in ((9, 0), (8, 0), (8, 9)):
        limit = autotune.smem_per_block(cap)
        for epilogue in EPILOGUES:
            regs = (accumulators(epilogue), epilogue_tiles(epilogue))
            for dtype, precision, elt in ((bf16, "ieee", 2), (torch.float32, "ieee", 4), (torch.float64, "ieee", 8)):
                for tile in autotune.candidates(dtype, precision, cap, None, True, *regs):
                    assert autotune.smem_estimate(tile, elt, cap, regs[0]) <= limit
                    assert autotune.fits_registers(tile, dtype, precision, cap, *regs)
    default = {
        e: autotune.default_tile(bf16, "ieee", (9, 0), None, True, accumulators(e), epilogue_tiles(e))
        for e in EPILOGUES
    }
    assert default[""] == default["gelu"] == big
    assert {default[e] for e in ("swiglu", "dgelu", "dswiglu")} == {autotune.Tile(128, 64, 64, 8, 8, 3)}


def test_tune_key_names_everything_that_changes_the_kernel():
    from dynamoe.kernels.triton.grouped_gemm import tune_key

    base = tune_key("gmmt", (9, 0), torch.bfloat16, torch.bfloat16, "ieee", (3000, 4096, 1024, 64))
    assert base.startswith("gmmt|sm90|triton") and base.endswith("|bfloat16|bfloat16|ieee|4096x4096x1024x64")
    assert tune_key("gmmt", (9, 0), torch.bfloat16, torch.float32, "ieee", (3000, 4096, 1024, 64)) != base
    assert tune_key("gmmt", (8, 0), torch.bfloat16, torch.bfloat16, "ieee", (3000, 4096, 1024, 64)) != base
    f32 = [tune_key("gmm", (9, 0), torch.float32, torch.float32, p, (8, 8, 8, 2)) for p in ("ieee", "tf32")]
    assert f32[0] != f32[1]


def test_tuning_waits_for_another_process_and_reads_its_choice(tmp_path, monkeypatch):
    import json

    path = tmp_path / "tiles.json"
    monkeypatch.setenv("DYNAMOE_TRITON_TUNE_CACHE", str(path))
    monkeypatch.delenv("DYNAMOE_TRITON_TUNE", raising=False)
    cands = (autotune.Tile(64, 64, 32), autotune.Tile(128, 64, 32))
    assert autotune.choose_tile("k0", "GPU", cands, cands[0], lambda t: float(t.BLOCK_M)) == cands[0]
    # Another rank measured "k1" and wrote the file after this process last read it: once this
    # process holds the machine lock it reads the file again and does not measure.
    entries = json.loads(path.read_text())
    entries["GPU|k1"] = {"tile": {**cands[1].launch_kwargs()}, "ms": 0.5, "failed": []}
    path.write_text(json.dumps(entries))

    def measure(tile):
        raise AssertionError("measured although another process had")

    assert autotune.choose_tile("k1", "GPU", cands, cands[0], measure) == cands[1]
    assert (tmp_path / "tiles.json.lock").exists()
