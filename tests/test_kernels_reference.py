"""kernels.topk_route, kernels.permute/unpermute and kernels.grouped_mm against naive per-token loops."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from dynamoe import kernels
from dynamoe.kernels.grouped_gemm import torch_grouped_mm_applies

SHAPES_T = [1, 7, 600]
EXPERTS = [1, 4, 9]
# (atol, rtol) per dtype for results compared with a float64 reference; bf16 has an 8-bit mantissa.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float64: (1e-12, 1e-12)}


def _gen(*seed_parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(seed_parts).encode()))


def _cases():
    for T in SHAPES_T:
        for E in EXPERTS:
            for k in sorted({1, E}):
                yield T, E, k


# ----------------------------------------------------------------------------------- topk_route


def naive_route(logits, k, score="softmax", bias=None, normalize=False):
    """Per-token python loop in float64; ties go to the lower expert index."""
    weights, experts = [], []
    for row in logits.double():
        s = torch.softmax(row, -1) if score == "softmax" else torch.sigmoid(row)
        sel = s if bias is None else s + bias.double()
        order = sorted(range(len(row)), key=lambda e: (-float(sel[e].detach()), e))[:k]
        w = torch.stack([s[e] for e in order])
        weights.append(w / w.sum() if normalize else w)
        experts.append(order)
    counts = torch.zeros(logits.shape[1], dtype=torch.long)
    for row in experts:
        for e in row:
            counts[e] += 1
    return torch.stack(weights), torch.tensor(experts, dtype=torch.long), counts


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("T,E,k", list(_cases()))
def test_topk_route_matches_naive_loop(T, E, k, score, normalize):
    g = _gen("route", T, E, k, score, normalize)
    logits = torch.randn(T, E, generator=g)
    bias = 0.1 * torch.randn(E, generator=g) if E > 1 else None
    w, ex, counts = kernels.topk_route(logits, k, score=score, bias=bias, normalize=normalize)
    rw, rex, rcounts = naive_route(logits, k, score, bias, normalize)
    assert w.dtype == torch.float32 and ex.dtype == torch.int64 and counts.dtype == torch.int64
    torch.testing.assert_close(ex, rex, rtol=0, atol=0)
    torch.testing.assert_close(w.double(), rw, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(counts, rcounts, rtol=0, atol=0)
    torch.testing.assert_close(counts, torch.bincount(ex.reshape(-1), minlength=E), rtol=0, atol=0)
    assert int(counts.sum()) == T * k
    if normalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(T), atol=1e-6, rtol=0)


def test_topk_route_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 0.0, 5.0, 0.0]])
    _, ex, counts = kernels.topk_route(logits, 2)
    assert ex.tolist() == [[1, 2], [0, 1], [1, 3]]
    assert counts.tolist() == [1, 3, 1, 1, 0]
    _, ex3, _ = kernels.topk_route(logits, 3, score="sigmoid")
    assert ex3.tolist() == [[1, 2, 3], [0, 1, 2], [1, 3, 0]]


def test_bias_shifts_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 1.5]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    for score in ("softmax", "sigmoid"):
        s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
        w0, ex0, _ = kernels.topk_route(logits, 1, score=score)
        w, ex, counts = kernels.topk_route(logits, 1, score=score, bias=bias)
        assert ex0.tolist() == [[0], [3]] and ex.tolist() == [[3], [3]]
        assert counts.tolist() == [0, 0, 0, 2]
        torch.testing.assert_close(w, s[:, 3:4], rtol=0, atol=0)  # unbiased score of the chosen expert
        wn, _, _ = kernels.topk_route(logits, 2, score=score, bias=bias, normalize=True)
        torch.testing.assert_close(wn[0], torch.stack([s[0, 3], s[0, 0]]) / (s[0, 3] + s[0, 0]))


def test_softmax_and_sigmoid_scores_differ_and_are_exact():
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    ws, _, _ = kernels.topk_route(logits, 3, score="softmax")
    wg, _, _ = kernels.topk_route(logits, 3, score="sigmoid")
    torch.testing.assert_close(ws, torch.softmax(logits, -1)[:, [2, 0, 1]], rtol=0, atol=0)
    torch.testing.assert_close(wg, torch.sigmoid(logits)[:, [2, 0, 1]], rtol=0, atol=0)
    assert abs(float(ws.sum()) - 1.0) < 1e-6 and float(wg.sum()) > 1.5


def test_bf16_logits_give_fp32_scores():
    logits = torch.randn(33, 6, generator=_gen("bf16")).bfloat16()
    w, ex, counts = kernels.topk_route(logits, 2, normalize=True)
    w32, ex32, counts32 = kernels.topk_route(logits.float(), 2, normalize=True)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, w32, rtol=0, atol=0)
    assert torch.equal(ex, ex32) and torch.equal(counts, counts32)


@pytest.mark.parametrize(
    "score,normalize,k", [("softmax", False, 2), ("softmax", True, 3), ("sigmoid", True, 2), ("sigmoid", False, 1)]
)
def test_topk_route_gradient_matches_naive(score, normalize, k):
    g = _gen("grad", score, normalize, k)
    logits = torch.randn(9, 5, generator=g, requires_grad=True)
    up = torch.randn(9, k, generator=g)
    w, ex, _ = kernels.topk_route(logits, k, score=score, normalize=normalize)
    rw, rex, _ = naive_route(logits, k, score, None, normalize)
    assert torch.equal(ex, rex)
    (grad,) = torch.autograd.grad((w * up).sum(), logits)
    (rgrad,) = torch.autograd.grad((rw * up.double()).sum(), logits)
    assert rgrad.abs().max() > 1e-3  # the reference gradient is not trivially zero
    torch.testing.assert_close(grad, rgrad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=5), "k=5 must be between 1"),
        (dict(k=0), "k=0 must be between 1"),
        (dict(k=1, bias=torch.zeros(3)), r"bias must have shape \[E\]"),
        (dict(k=1, score="relu"), "score='relu' must be one of"),
    ],
)
def test_topk_route_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.topk_route(torch.randn(3, 4), **kwargs)
    with pytest.raises(ValueError, match=r"logits must be \[T, E\]"):
        kernels.topk_route(torch.randn(3, 4, 2), 1)


def naive_group_route(logits, k, n_group, topk_group, bias=None, normalize=False, scale=1.0):
    """Per-token python loop in float64 of DeepSeek-V3's sigmoid routing: group score = sum of the two
    best biased scores in the group, the topk_group best groups kept (ties to the lower group), then
    top-k inside them (ties to the lower expert), weights from the unbiased scores."""
    E = logits.shape[1]
    size = E // n_group
    weights, experts = [], []
    for row in logits.double():
        s = torch.sigmoid(row)
        sel = [float(v) for v in (s if bias is None else s + bias.double()).detach()]
        group_score = [sum(sorted(sel[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        allowed = [e for e in range(E) if e // size in kept]
        order = sorted(allowed, key=lambda e: (-sel[e], e))[:k]
        w = torch.stack([s[e] for e in order])
        w = w / w.sum() if normalize else w
        weights.append(w * scale)
        experts.append(order)
    return torch.stack(weights), torch.tensor(experts, dtype=torch.long)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("E,k,n_group,topk_group,scale", [(16, 4, 4, 2, 2.5), (8, 1, 4, 1, 1.0), (12, 6, 3, 2, 1.5)])
def test_group_limited_route_matches_naive_loop(E, k, n_group, topk_group, scale, normalize):
    g = _gen("groups", E, k, n_group, topk_group, normalize)
    logits = torch.randn(50, E, generator=g, requires_grad=True)
    bias = 0.2 * torch.randn(E, generator=g)
    opts = dict(score="sigmoid", bias=bias, normalize=normalize, n_group=n_group, topk_group=topk_group)
    w, ex, counts = kernels.topk_route(logits, k, routed_scaling_factor=scale, **opts)
    rw, rex = naive_group_route(logits, k, n_group, topk_group, bias, normalize, scale)
    torch.testing.assert_close(ex, rex, rtol=0, atol=0)  # also in descending biased-score order
    torch.testing.assert_close(w.double(), rw, atol=1e-6, rtol=1e-6)
    assert torch.equal(counts, torch.bincount(ex.reshape(-1), minlength=E))
    assert all(len(set(row)) <= topk_group for row in (ex // (E // n_group)).tolist())
    # the scale is a plain product after normalisation, gradients included
    w1, ex1, _ = kernels.topk_route(logits, k, **opts)
    assert torch.equal(ex1, ex)
    torch.testing.assert_close(w, w1 * scale, atol=0, rtol=0)
    up = torch.randn(50, k, generator=g)
    (grad,) = torch.autograd.grad((w * up).sum(), logits)
    (rgrad,) = torch.autograd.grad((rw * up.double()).sum(), logits)
    torch.testing.assert_close(grad, rgrad, atol=1e-6, rtol=1e-5)


def test_group_ties_go_to_the_lower_group():
    # groups {0,1} {2,3} {4,5}: biased scores 1.5+0.5, 1.0+1.0, 0.5+1.5, all 2.0 -> group 0 wins the tie
    logits = torch.zeros(1, 6)
    bias = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0])
    _, ex, _ = kernels.topk_route(logits, 2, score="sigmoid", bias=bias, n_group=3, topk_group=1)
    assert ex.tolist() == [[0, 1]]
    _, ex, _ = kernels.topk_route(logits, 2, score="sigmoid", bias=bias, n_group=3, topk_group=2)
    assert ex.tolist() == [[0, 2]]  # groups 0 and 1 kept; expert 5 (group 2) is left out


def test_new_route_options_default_to_plain_topk_bit_for_bit():
    g = _gen("defaults")
    logits = torch.randn(64, 16, generator=g)
    for score in ("softmax", "sigmoid"):
        plain = kernels.topk_route(logits, 4, score=score, normalize=True)
        for opts in (
            dict(bias=torch.zeros(16)),  # what a router that never learned or loaded a bias passes
            dict(n_group=4),  # topk_group None: every group
            dict(n_group=4, topk_group=4),
            dict(n_group=1, topk_group=1),
            dict(routed_scaling_factor=1.0),
        ):
            out = kernels.topk_route(logits, 4, score=score, normalize=True, **opts)
            for a, b in zip(out, plain):
                assert torch.equal(a, b), opts


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_group=3), "n_group=3 must be a positive divisor"),
        (dict(n_group=0), "n_group=0 must be a positive divisor"),
        (dict(n_group=4, topk_group=5), "topk_group=5 must be between 1 and n_group=4"),
        (dict(n_group=4, topk_group=0), "topk_group=0 must be between 1"),
        (dict(n_group=8, topk_group=2), "needs at least 2 experts per group"),
        (dict(k=5, n_group=4, topk_group=2), "k=5 experts cannot be picked from topk_group=2 groups of 2"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0 must be > 0"),
    ],
)
def test_group_route_bad_inputs(kwargs, match):
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        kernels.topk_route(torch.randn(3, 8), score="sigmoid", **kwargs)


# ------------------------------------------------------------------------------ permute/unpermute


def naive_rows(experts, E):
    """(t, j) of every kept assignment, in the documented row order: expert, then token, then slot."""
    ex = experts.tolist()
    return [(t, j) for e in range(E) for t, row in enumerate(ex) for j, ej in enumerate(row) if ej == e]


def naive_moe(x, experts, weights, mats):
    """y[t] = sum_j w[t, j] * f_e(x[t]) with f_e(v) = tanh(v @ mats[e]); NaN-poisoned, every row written."""
    y = torch.full((x.shape[0], mats.shape[2]), float("nan"), dtype=torch.float64)
    for t, row in enumerate(experts.tolist()):
        acc = torch.zeros(mats.shape[2], dtype=torch.float64)
        for j, e in enumerate(row):
            if e >= 0:
                acc = acc + weights[t, j].double() * torch.tanh(x[t].double() @ mats[e].double())
        y[t] = acc
    return y


def _assignments(T, E, k, g):
    """[T, k] distinct experts per token; experts 1 and E-1 starved (E > 2) and ~25% of slots dropped (-1)."""
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if E > 2:
        experts[(experts == E - 1) | (experts == 1)] = -1
    experts[torch.rand(T, k, generator=g) < 0.25] = -1
    return experts


@pytest.mark.parametrize("d", [12, 32])
@pytest.mark.parametrize("T,E,k", list(_cases()))
def test_permute_unpermute_match_naive_loop(T, E, k, d):
    g = _gen("perm", T, E, k, d)
    experts = _assignments(T, E, k, g)
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    mats = torch.randn(E, d, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)

    x_sorted, row_map = kernels.permute(x, experts, E)
    rows = naive_rows(experts, E)
    N = len(rows)
    assert x_sorted.shape == (N, d) and row_map.dtype == torch.int64
    # row_map: -1 exactly on dropped slots, a bijection of kept slots onto 0..N-1 in the documented order.
    assert torch.equal(row_map < 0, experts < 0)
    assert sorted(row_map[row_map >= 0].tolist()) == list(range(N))
    for r, (t, j) in enumerate(rows):
        assert int(row_map[t, j]) == r
    torch.testing.assert_close(x_sorted, x.detach()[[t for t, _ in rows]], rtol=0, atol=0)
    torch.testing.assert_close(row_map, kernels.row_map_ref(experts, E), rtol=0, atol=0)

    counts = torch.bincount(experts[experts >= 0], minlength=E)
    if E > 2:
        assert int(counts[-1]) == 0  # a starved expert is exercised
    y_sorted = torch.cat([torch.tanh(blk @ mats[e]) for e, blk in enumerate(torch.split(x_sorted, counts.tolist()))])
    y = kernels.unpermute(y_sorted, row_map, weights)
    ref = naive_moe(x, experts, weights, mats)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, **dict(zip(("atol", "rtol"), TOL[torch.float64])))

    if N == 0:  # every slot dropped (possible for T = 1): nothing flows back
        assert torch.equal(y, torch.zeros_like(y))
        return
    up = torch.randn(T, 5, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * up).sum(), (x, mats, weights))
    rgrads = torch.autograd.grad((ref * up).sum(), (x, mats, weights))
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads[2][experts < 0], torch.zeros(int((experts < 0).sum()), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unpermute_gradient_wrt_y_sorted_and_weights(dtype):
    g = _gen("unperm", str(dtype))
    T, E, k = 11, 5, 3
    experts = _assignments(T, E, k, g)
    row_map = kernels.row_map_ref(experts, E)
    rows = naive_rows(experts, E)
    y_sorted = torch.randn(len(rows), 6, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weights = torch.rand(T, k, generator=g).requires_grad_()
    y = kernels.unpermute(y_sorted, row_map, weights)
    assert y.dtype == dtype
    ref = torch.zeros(T, 6, dtype=torch.float64)
    for r, (t, j) in enumerate(rows):
        ref[t] = ref[t] + weights[t, j].double() * y_sorted[r].double()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    up = torch.randn(T, 6, generator=g, dtype=torch.float64)
    gy, gw = torch.autograd.grad((y.double() * up).sum(), (y_sorted, weights))
    rgy, rgw = torch.autograd.grad((ref * up).sum(), (y_sorted, weights))
    torch.testing.assert_close(gy.double(), rgy.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(gw.double(), rgw.double(), atol=atol * 5, rtol=rtol)


def test_poisoned_reference_catches_unwritten_rows():
    ref = torch.full((4, 3), float("nan"))
    ref[:3] = 1.0  # row 3 "unwritten"
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.ones(4, 3), ref)
    # and a token whose every slot is dropped combines to exact zeros, not garbage
    experts = torch.tensor([[0, 1], [-1, -1], [1, -1]])
    x_sorted, row_map = kernels.permute(torch.randn(3, 4), experts, 2)
    y = kernels.unpermute(torch.full_like(x_sorted, 7.0), row_map, torch.ones(3, 2))
    assert torch.equal(y[1], torch.zeros(4)) and torch.equal(y[0], torch.full((4,), 14.0))


@pytest.mark.parametrize("d", [12, 32])
def test_all_slots_dropped(d):
    x = torch.randn(3, d, requires_grad=True)
    experts = torch.full((3, 2), -1)
    x_sorted, row_map = kernels.permute(x, experts, 4)
    assert x_sorted.shape == (0, d) and torch.equal(row_map, experts)
    y_sorted = kernels.grouped_mm(x_sorted, torch.randn(4, d, 16), counts=torch.zeros(4, dtype=torch.long))
    weights = torch.rand(3, 2, requires_grad=True)
    y = kernels.unpermute(y_sorted, row_map, weights)
    assert torch.equal(y, torch.zeros(3, 16))
    gx, gw = torch.autograd.grad(y.sum(), (x, weights))
    assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gw, torch.zeros_like(weights))


def test_permute_num_rows_hint_and_errors():
    experts = torch.tensor([[2, 0], [0, 1], [1, 2]])
    x = torch.arange(6.0).view(3, 2)
    xs, rm = kernels.permute(x, experts, 3, num_rows=6)
    xs2, rm2 = kernels.permute(x, experts, 3)
    assert torch.equal(xs, xs2) and torch.equal(rm, rm2)
    assert rm.tolist() == [[4, 0], [1, 2], [3, 5]]
    with pytest.raises(ValueError, match="x must be"):
        kernels.permute(torch.randn(4, 2), experts, 3)
    with pytest.raises(ValueError, match="integer"):
        kernels.permute(x, experts.float(), 3)
    with pytest.raises(ValueError, match="must match"):
        kernels.unpermute(xs, rm, torch.ones(3, 3))


# ------------------------------------------------------------------------------------ grouped_mm


def naive_grouped(x, w, counts):
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        for r in range(start, start + c):
            outs.append(x[r].double() @ w[e].double())
        start += c
    return torch.stack(outs) if outs else torch.zeros(0, w.shape[2], dtype=torch.float64)


COUNT_CASES = {
    "mixed": [3, 0, 5, 0, 9],
    "one_expert": [0, 0, 17, 0, 0],
    "last": [0, 0, 0, 0, 4],
    "single": [1, 1, 0, 1, 0],
}


@pytest.mark.parametrize("counts_name", list(COUNT_CASES))
# Alignment is in bytes (16): (12, 20) is aligned for fp32 but not bf16; (13, 10) for neither.
@pytest.mark.parametrize("d,f", [(32, 16), (12, 20), (13, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["counts", "offsets"])
def test_grouped_mm_matches_loop(counts_name, d, f, dtype, form):
    g = _gen("gmm", counts_name, d, f, str(dtype), form)
    counts = torch.tensor(COUNT_CASES[counts_name])
    N, E = int(counts.sum()), len(counts)
    x = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(E, d, f, generator=g) / math.sqrt(d)).to(dtype).requires_grad_()
    fast = torch_grouped_mm_applies(x, w)
    assert fast == (d * x.element_size() % 16 == 0 and f * x.element_size() % 16 == 0)
    groups = dict(counts=counts) if form == "counts" else dict(offsets=torch.cumsum(counts, 0))
    y = kernels.grouped_mm(x, w, **groups)
    assert ("TorchGroupedMM" in type(y.grad_fn).__name__) == fast
    ref = naive_grouped(x, w, counts)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    up = torch.randn(N, f, generator=g).to(dtype)
    gx, gw = torch.autograd.grad(y, (x, w), up)
    rgx, rgw = torch.autograd.grad(ref, (x, w), up.double())
    torch.testing.assert_close(gx.double(), rgx.double(), atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(gw.double(), rgw.double(), atol=atol * 4, rtol=rtol)
    assert torch.all(gw[counts == 0] == 0)  # empty experts get exactly zero weight gradient


@pytest.mark.parametrize("d,f", [(32, 16), (13, 10)])
def test_grouped_mm_loop_path_forced_and_float64(d, f):
    g = _gen("gmm64", d, f)
    counts = torch.tensor([4, 0, 2])
    x = torch.randn(6, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, d, f, generator=g, dtype=torch.float64, requires_grad=True)
    y_ref = kernels.grouped_mm_ref(x, w, kernels.offsets_from_counts(counts))
    y = kernels.grouped_mm(x, w, counts=counts)  # fp64 never takes torch._grouped_mm
    torch.testing.assert_close(y, naive_grouped(x, w, counts), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y_ref, y, atol=0, rtol=0)
    assert torch.autograd.gradcheck(lambda a, b: kernels.grouped_mm(a, b, counts=counts), (x, w))


@pytest.mark.parametrize("d", [32, 13])
def test_grouped_mm_no_rows(d):
    x = torch.zeros(0, d, requires_grad=True)
    w = torch.randn(3, d, 16, requires_grad=True)
    y = kernels.grouped_mm(x, w, counts=torch.zeros(3, dtype=torch.long))
    assert y.shape == (0, 16)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == (0, d)
    assert torch.equal(gw, torch.zeros_like(w))


def test_offsets_from_counts():
    off = kernels.offsets_from_counts(torch.tensor([3, 0, 7, 0]))
    assert off.dtype == torch.int32 and off.tolist() == [3, 3, 10, 10]


@pytest.mark.parametrize("d", [32, 13])  # aligned (torch._grouped_mm) and loop paths
def test_grouped_mm_errors(d):
    x, w = torch.randn(6, d), torch.randn(2, d, 16)
    with pytest.raises(ValueError, match="exactly one of counts= or offsets="):
        kernels.grouped_mm(x, w, counts=torch.tensor([3, 3]), offsets=torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="exactly one of counts= or offsets="):
        kernels.grouped_mm(x, w)
    with pytest.raises(ValueError, match="matching d"):
        kernels.grouped_mm(torch.randn(6, d + 1), w, counts=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"shape \[E\]"):
        kernels.grouped_mm(x, w, counts=torch.tensor([2, 2, 2]))
    for bad in ([1, 2], [4, 5]):  # groups covering fewer or more rows than x has
        with pytest.raises(ValueError, match="groups cover"):
            kernels.grouped_mm(x, w, counts=torch.tensor(bad))


# --------------------------------------------------------------------------------------- backend


def test_backend_selection(monkeypatch):
    assert "reference" in kernels.available_backends()
    monkeypatch.delenv("DYNAMOE_KERNEL_BACKEND", raising=False)
    assert kernels.backend_for(torch.zeros(2)) == "reference"  # CPU tensors: no accelerated backend
    monkeypatch.setenv("DYNAMOE_KERNEL_BACKEND", "reference")
    assert kernels.backend_for(torch.zeros(2), "grouped_mm") == "reference"
    monkeypatch.setenv("DYNAMOE_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="'bogus' is not a known backend"):
        kernels.backend_for(torch.zeros(2))
    with pytest.raises(ValueError, match="DYNAMOE_KERNEL_BACKEND"):
        kernels.topk_route(torch.randn(2, 3), 1)


# ----------------------------------------------------------------------- grouped_mm, strided weights


def _weight_view(layout: str, E: int, d: int, f: int, dtype, g):
    """(parameter, w [E, d, f] view of it) for a weight layout of ``w``."""
    if layout == "transposed":  # transformers' [E, f, d] read as [E, d, f]
        p = torch.randn(E, f, d, generator=g).to(dtype).requires_grad_()
        return p, p.transpose(1, 2)
    if layout == "padded_rows":  # each row of a wider matrix: row stride f + 8
        p = torch.randn(E, d, f + 8, generator=g).to(dtype).requires_grad_()
        return p, p[:, :, :f]
    if layout == "experts_strided":  # experts interleaved with others: [2E, d, f][::2]
        p = torch.randn(2 * E, d, f, generator=g).to(dtype).requires_grad_()
        return p, p[::2]
    assert layout == "contiguous"
    p = torch.randn(E, d, f, generator=g).to(dtype).requires_grad_()
    return p, p


STRIDED_COUNTS = {**COUNT_CASES, "none": [0, 0, 0, 0, 0], "large": [40, 1, 0, 70, 2]}


@pytest.mark.parametrize("counts_name", list(STRIDED_COUNTS))
@pytest.mark.parametrize("layout", ["transposed", "padded_rows", "experts_strided"])
@pytest.mark.parametrize("d,f", [(32, 48), (16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_strided_weights_are_not_copied(counts_name, layout, d, f, dtype, monkeypatch):
    if dtype == torch.bfloat16 and (d, f) == (16, 8):
        d, f = 16, 24  # keep every width a multiple of 16 bytes, so torch._grouped_mm applies
    g = _gen("gmm-strided", counts_name, layout, d, f, str(dtype))
    counts = torch.tensor(STRIDED_COUNTS[counts_name])
    N, E = int(counts.sum()), len(counts)
    offsets = kernels.offsets_from_counts(counts)
    p, w = _weight_view(layout, E, d, f, dtype, g)
    x = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    up = torch.randn(N, f, generator=g).to(dtype)
    assert not w.is_contiguous() and torch_grouped_mm_applies(x, w)

    seen = []
    real = torch._grouped_mm

    def spy(a, b, offs=None, **kw):
        seen.append((a.data_ptr(), b.data_ptr(), b.stride()))
        return real(a, b, offs=offs, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    y = kernels.grouped_mm(x, w, offsets=offsets)
    assert "TorchGroupedMM" in type(y.grad_fn).__name__
    assert seen[0][1:] == (w.data_ptr(), w.stride())  # the view itself, not a copy
    y.backward(up)
    monkeypatch.setattr(torch, "_grouped_mm", real)
    gx, gp = x.grad, p.grad

    # The loop over experts on the same view: identical numbers (CPU torch._grouped_mm is one GEMM
    # per group, with the operands' layouts as given), and its gradients by autograd.
    xr, pr = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    wr = pr.transpose(1, 2) if layout == "transposed" else pr[:, :, :f] if layout == "padded_rows" else pr[::2]
    yr = kernels.grouped_mm_ref(xr, wr, offsets)
    yr.backward(up)
    assert torch.equal(y, yr)
    assert torch.equal(gx, xr.grad) and torch.equal(gp, pr.grad)
    # The contiguous path: the same products, summed in another order at most.
    xc, wc = x.detach().clone().requires_grad_(), w.detach().contiguous().requires_grad_()
    yc = kernels.grouped_mm(xc, wc, offsets=offsets)
    yc.backward(up)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(y, yc, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx, xc.grad, atol=atol, rtol=rtol)
    gw = gp.transpose(1, 2) if layout == "transposed" else gp[:, :, :f] if layout == "padded_rows" else gp[::2]
    torch.testing.assert_close(gw, wc.grad, atol=atol * 4, rtol=rtol)
    # The weight gradient comes back in the parameter's own layout (no copy on accumulation), exactly
    # zero for experts without rows and for the parts of the parameter the view does not cover.
    assert gp.stride() == p.stride()
    assert torch.all(gw[counts == 0] == 0)
    if layout == "padded_rows":
        assert torch.all(gp[:, :, f:] == 0)
    if layout == "experts_strided":
        assert torch.all(gp[1::2] == 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(3, 16, 8),  # row-major
        lambda: torch.randn(3, 8, 16).transpose(1, 2),  # column-major
        lambda: torch.randn(3, 16, 12)[:, :, :8],  # row stride 12: a multiple of 16 bytes
        lambda: torch.randn(3, 16, 10)[:, :, :8],  # row stride 10: not
        lambda: torch.randn(3, 10, 8).transpose(1, 2)[:, :8],  # column stride 10: not
        lambda: torch.randn(3, 16, 16)[:, :, ::2],  # no unit stride
        lambda: torch.randn(1, 16, 8).expand(3, 16, 8),  # experts share one matrix
        lambda: torch.randn(3, 1, 8).expand(3, 16, 8),  # rows share one vector
        lambda: torch.randn(3 * 16 * 8 + 1)[1:].view(3, 16, 8),  # data not 16-byte aligned (CPU: fine)
    ],
)
def test_reads_as_is_matches_what_torch_grouped_mm_accepts(make):
    from dynamoe.kernels.grouped_gemm import _reads_as_is

    w = make()
    x = torch.randn(5, w.shape[1])
    offsets = torch.tensor([2, 2, 5], dtype=torch.int32)
    try:
        torch._grouped_mm(x, w, offs=offsets)
        accepted = True
    except RuntimeError:
        accepted = False
    assert _reads_as_is(w) == accepted
    # Whatever the layout, kernels.grouped_mm gives the loop's result (copying what torch cannot read).
    torch.testing.assert_close(
        kernels.grouped_mm(x, w, offsets=offsets), kernels.grouped_mm_ref(x, w, offsets), atol=1e-5, rtol=1e-5
    )


def test_grouped_mm_single_row_with_unit_strides():
    # A [1, d] view may carry strides (1, 1), which contiguous() keeps and torch._grouped_mm refuses.
    x = torch.randn(16, 1).t().requires_grad_()
    w = torch.randn(2, 8, 16).transpose(1, 2).requires_grad_()
    assert x.stride() == (1, 1) and x.is_contiguous()
    counts = torch.tensor([0, 1])
    y = kernels.grouped_mm(x, w, counts=counts)
    torch.testing.assert_close(y, x @ w[1], atol=1e-6, rtol=1e-6)
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    torch.testing.assert_close(gx, w[1].sum(1)[None], atol=1e-6, rtol=1e-6)
    assert torch.all(gw[0] == 0)
