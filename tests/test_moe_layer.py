"""dynamoe.layers.moe_layer.MoELayer against a naive per-token loop: outputs, every gradient, dense equivalence,
statistics."""

from __future__ import annotations

import math

import pytest
import torch

from dynamoe.config import MoEConfig, RouterConfig
from dynamoe.kernels.grouped_gemm import torch_grouped_mm_applies
from dynamoe.layers.experts import DenseMLP
from dynamoe.layers.moe_layer import MoELayer

D, F, E = 12, 10, 5


def _act(h, activation):
    if activation == "swiglu":
        gate, up = h[: h.shape[0] // 2], h[h.shape[0] // 2 :]
        return gate * torch.sigmoid(gate) * up
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def naive_layer(layer, x):
    """Per-token loop, float64: route each token, run each chosen expert's MLP on it, weight and sum."""
    cfg, rc = layer.cfg, layer.cfg.router
    xs = x.reshape(-1, x.shape[-1]).double()
    T = xs.shape[0]
    wg = layer.router.gate.weight.double()
    w1, w2 = layer.experts.w1_EDF.double(), layer.experts.w2_EFD.double()

    def expert(e, v):
        return _act(v @ w1[e], cfg.activation) @ w2[e]

    logits = torch.stack([xs[t] @ wg.t() for t in range(T)])
    scores = torch.softmax(logits, -1) if rc.score == "softmax" else torch.sigmoid(logits)
    ys = [torch.zeros(xs.shape[1], dtype=torch.float64) for _ in range(T)]
    counts = torch.zeros(cfg.num_experts, dtype=torch.long)
    if rc.kind == "token_choice":
        for t in range(T):
            s = scores[t]
            chosen = sorted(range(cfg.num_experts), key=lambda e: (-float(s[e].detach()), e))[: rc.top_k]
            total = sum(s[e] for e in chosen) if rc.renormalize else 1.0
            for e in chosen:
                ys[t] = ys[t] + s[e] / total * expert(e, xs[t])
                counts[e] += 1
    else:
        C = min(T, math.ceil((rc.capacity_factor or 1.0) * T * rc.top_k / cfg.num_experts))
        for e in range(cfg.num_experts):
            for t in sorted(range(T), key=lambda t: (-float(scores[t, e].detach()), t))[:C]:
                ys[t] = ys[t] + scores[t, e] * expert(e, xs[t])
                counts[e] += 1
    if layer.shared is not None:
        w_in, w_out = layer.shared.w_in.weight.double(), layer.shared.w_out.weight.double()
        ys = [y + _act(w_in @ v, cfg.activation) @ w_out.t() for y, v in zip(ys, xs)]
    probs = scores / scores.sum(-1, keepdim=True)
    aux = logits.new_zeros(())
    if rc.kind == "token_choice" and rc.aux_loss_coef:
        aux = rc.aux_loss_coef * cfg.num_experts * (counts / (T * rc.top_k) * probs.mean(0)).sum()
    z = rc.z_loss_coef * (torch.logsumexp(logits, -1) ** 2).mean()
    return torch.stack(ys).reshape(x.shape), aux + z, counts, probs


def make_layer(
    activation="gelu", shared=0, kind="token_choice", k=2, score="softmax", starve=False, seed=0, d=D, f=F, **rkw
):
    torch.manual_seed(seed)
    router = RouterConfig(kind=kind, top_k=k, score=score, aux_loss_coef=0.05, z_loss_coef=0.01, **rkw)
    cfg = MoEConfig(
        num_experts=E, d_expert=f, activation=activation, num_shared_experts=shared, d_shared=7, router=router
    )
    layer = MoELayer(cfg, d, init_std=0.4)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.7)
        if starve:  # with x[..., 0] >= 1 the last expert's logit is <= -20: it is never chosen
            layer.router.gate.weight[-1] = 0.0
            layer.router.gate.weight[-1, 0] = -20.0
    return layer


def make_input(shape, seed, starve=False, dtype=torch.float64, d=D):
    x = torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if starve:
        x[..., 0] = x[..., 0].abs() + 1.0
    return x.to(dtype).requires_grad_()


def _params(layer):
    named = {"gate": layer.router.gate.weight, "w1": layer.experts.w1_EDF, "w2": layer.experts.w2_EFD}
    if layer.shared is not None:
        named.update(shared_in=layer.shared.w_in.weight, shared_out=layer.shared.w_out.weight)
    return named


def _close(actual, expected, tol, what):
    """Close up to ``tol`` relative to the reference's largest magnitude (fp32 router error spreads evenly)."""
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}"
    )


def check_against_naive(layer, x, tol, shared_tol=None, starve=False):
    """Output, losses and every gradient of ``layer`` against :func:`naive_layer`. ``shared_tol``: for the
    shared expert's weights, whose gradients never touch the fp32 router."""
    y, aux = layer(x)
    ref_y, ref_loss, ref_counts, ref_probs = naive_layer(layer, x)
    T = x.numel() // x.shape[-1]
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    _close(y, ref_y, tol, "output")
    assert torch.equal(aux.counts, ref_counts) and aux.num_tokens == T
    if starve:
        assert int(aux.counts[-1]) == 0 and int(aux.counts[:-1].sum()) > 0  # an empty expert is exercised
    _close(aux.loss, ref_loss, tol, "router losses")
    ent = -(ref_probs * ref_probs.log()).sum(-1).mean()
    torch.testing.assert_close(aux.entropy.double(), ent, atol=1e-5, rtol=1e-5)

    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    params = _params(layer)
    leaves = [x, *params.values()]
    grads = torch.autograd.grad((y.double() * up).sum() + aux.loss, leaves)
    ref_grads = torch.autograd.grad((ref_y * up).sum() + ref_loss, leaves)
    for name, g, rg in zip(["x", *params], grads, ref_grads):
        assert rg.abs().max() > 0, name  # every parameter really receives gradient
        _close(g, rg, shared_tol if name.startswith("shared") and shared_tol else tol, f"grad {name}")
    if starve:
        assert torch.all(grads[2][-1] == 0) and torch.all(grads[3][-1] == 0)  # the unused expert's weights


SHAPES = [(1,), (7,), (61,), (2, 3), (1, 7)]
ROUTINGS = [
    dict(kind="token_choice", k=1),
    dict(kind="token_choice", k=2),
    dict(kind="token_choice", k=2, score="sigmoid"),
    dict(kind="expert_choice", k=2, capacity_factor=1.0),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(str(v) for v in r.values()))
@pytest.mark.parametrize("activation,shared", [("gelu", 0), ("swiglu", 0), ("gelu", 2), ("swiglu", 1)])
def test_layer_matches_naive_float64(shape, routing, activation, shared):
    T = math.prod(shape)
    starve = routing["kind"] == "token_choice" and T > 1
    layer = make_layer(activation, shared, starve=starve, seed=T, **routing).double()
    x = make_input(shape, seed=T + shared, starve=starve)
    # router and routing weights run in fp32 by design, the rest in fp64
    check_against_naive(layer, x, tol=1e-5, shared_tol=1e-12, starve=starve)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_fp32_grouped_mm_path(activation):
    layer = make_layer(activation, shared=1, starve=True, seed=3, d=32, f=16)  # 16-byte aligned widths
    assert torch_grouped_mm_applies(torch.zeros(1, 32), layer.experts.w1_EDF)
    assert torch_grouped_mm_applies(torch.zeros(1, 16), layer.experts.w2_EFD)
    x = make_input((3, 9), seed=4, starve=True, dtype=torch.float32, d=32)
    check_against_naive(layer, x, tol=1e-4, starve=True)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_single_expert_equals_dense_mlp(activation):
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=1, d_expert=F, activation=activation, router=RouterConfig(top_k=1))
    layer = MoELayer(cfg, D, init_std=0.3).double()
    mlp = DenseMLP(D, F, activation, init_std=0.3).double()
    layer.experts.load_dense(0, mlp)
    x = make_input((4, 5), seed=2)
    y, aux = layer(x)
    ref = mlp(x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    assert aux.counts.tolist() == [20] and int(aux.dropped) == 0
    (gx,) = torch.autograd.grad(y.sum(), x)
    (rgx,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gx, rgx, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_equals_capacity_without_drops(k):
    dropless = make_layer(k=k, seed=5)
    capped = make_layer(k=k, seed=6, capacity_factor=float(E))
    capped.load_state_dict(dropless.state_dict())
    x = make_input((3, 13), seed=7, dtype=torch.float32)
    (y0, a0), (y1, a1) = dropless(x), capped(x)
    assert torch.equal(y0, y1)
    assert torch.equal(a0.counts, a1.counts) and int(a1.dropped) == 0 and torch.equal(a0.loss, a1.loss)
    g0 = torch.autograd.grad(y0.square().sum(), [x, *_params(dropless).values()])
    g1 = torch.autograd.grad(y1.square().sum(), [x, *_params(capped).values()])
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def test_capacity_drops_reach_the_output():
    layer = make_layer(k=2, seed=8, capacity_factor=0.5, starve=True)
    x = make_input((40,), seed=9, starve=True, dtype=torch.float32)
    y, aux = layer(x)
    cap = math.ceil(0.5 * 40 * 2 / E)
    assert int(aux.dropped) > 0 and int(aux.counts.max()) <= cap
    assert int(aux.counts.sum()) + int(aux.dropped) == 80
    routing = layer.router(x.reshape(-1, D))
    full = torch.zeros_like(y)
    for t in range(40):  # recombine by hand from the kept assignments only
        for j in range(2):
            e = int(routing.experts[t, j])
            if e >= 0:
                h = layer.experts.w1_EDF[e].t() @ x[t]
                full[t] += routing.weights[t, j] * (_act(h, "gelu") @ layer.experts.w2_EFD[e])
    torch.testing.assert_close(y, full, atol=1e-5, rtol=1e-5)


def test_statistics_accumulate_and_reset():
    layer = make_layer(k=2, seed=10, capacity_factor=1.0, starve=True)
    x1, x2 = make_input((2, 10), seed=11, starve=True), make_input((13,), seed=12, starve=True)
    layer = layer.double()
    _, a1 = layer(x1)
    _, a2 = layer(x2)
    assert torch.equal(layer.stat_counts, (a1.counts + a2.counts).double())
    assert float(layer.stat_tokens) == 33 and a1.num_tokens == 20 and a2.num_tokens == 13
    assert float(layer.stat_dropped) == float(a1.dropped + a2.dropped) > 0
    assert int(a1.counts.sum()) + int(a1.dropped) == 40  # T * k assignments, kept or dropped
    torch.testing.assert_close(layer.stat_entropy_sum, (a1.entropy * 20 + a2.entropy * 13).double())
    layer.reset_stats()
    for buf in (layer.stat_counts, layer.stat_tokens, layer.stat_dropped, layer.stat_entropy_sum):
        assert torch.all(buf == 0)
    _, a3 = layer(x2)
    assert torch.equal(layer.stat_counts, a3.counts.double()) and float(layer.stat_tokens) == 13


@pytest.mark.parametrize("k", [1, 3])
def test_dropless_aux_fields(k):
    layer = make_layer(k=k, seed=13)
    x = make_input((4, 6), seed=14, dtype=torch.float32)
    _, aux = layer(x)
    assert int(aux.counts.sum()) == 24 * k and int(aux.dropped) == 0 and aux.num_tokens == 24
    assert not aux.counts.requires_grad and aux.aux_loss.requires_grad
    torch.testing.assert_close(aux.loss, aux.aux_loss + aux.z_loss, atol=0, rtol=0)
    assert 0 < float(aux.entropy) <= math.log(E) + 1e-6
