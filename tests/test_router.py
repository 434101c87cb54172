"""dynamoe.layers.router: hand-computed routings and losses, Megatron-Core cross-checks, capacity, aux-free bias,
jitter and expert choice."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dynamoe import kernels
from dynamoe.config import RouterConfig
from dynamoe.layers.router import (
    ExpertChoiceRouter,
    TokenChoiceRouter,
    build_router,
    load_balancing_loss,
    router_z_loss,
)

P = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1]], dtype=torch.float64)
SHIFT = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)  # logsumexp of each row of the logits


def _identity_router(cls=TokenChoiceRouter, **cfg):
    """A router on d = E = 4 whose gate is the identity, so the input rows are the logits."""
    router = cls(RouterConfig(**cfg), 4, 4)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    return router.eval()


def _hand_logits():
    return (P.log() + SHIFT[:, None]).float()  # softmax(row) = P[row], logsumexp(row) = SHIFT[row]


def _dense(weights, experts, E):
    kept = experts >= 0
    return torch.zeros(weights.shape[0], E, dtype=weights.dtype).scatter_add(
        1, experts.clamp_min(0), torch.where(kept, weights, torch.zeros_like(weights))
    )


def _router(T=40, E=6, d=10, seed=0, cls=TokenChoiceRouter, skew=0.0, **cfg):
    g = torch.Generator().manual_seed(seed)
    router = cls(RouterConfig(**cfg), d, E)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(E, d, generator=g))
        router.gate.weight[0, 0] += skew  # with x[:, 0] > 0 this overloads expert 0
    x = torch.randn(T, d, generator=g)
    x[:, 0] = x[:, 0].abs() + 0.5
    return router.eval(), x


# ------------------------------------------------------------------------------- hand computed


def test_hand_computed_top2():
    router = _identity_router(top_k=2, aux_loss_coef=0.1, z_loss_coef=0.5)
    r = router(_hand_logits())
    assert r.experts.tolist() == [[3, 2], [0, 1], [0, 1]]  # token 2: tie 0.2/0.2 goes to expert 1
    expected_w = torch.tensor([[0.4 / 0.7, 0.3 / 0.7], [0.4 / 0.7, 0.3 / 0.7], [0.5 / 0.7, 0.2 / 0.7]])
    torch.testing.assert_close(r.weights, expected_w, atol=1e-6, rtol=1e-6)
    assert r.counts.tolist() == [2, 2, 1, 1] and r.num_rows == 6 and int(r.dropped) == 0
    # f = [2, 2, 1, 1] / 6, P = [1.0, 0.7, 0.7, 0.6] / 3  ->  E * sum f P = 4 * 4.7 / 18
    torch.testing.assert_close(r.aux_loss, torch.tensor(0.1 * 4 * 4.7 / 18), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r.z_loss, torch.tensor(0.5 * (1 + 4 + 1) / 3), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(r.probs, P.float(), atol=1e-6, rtol=1e-6)


def test_hand_computed_switch_top1():
    router = _identity_router(top_k=1, aux_loss_coef=1.0)
    r = router(_hand_logits())
    assert r.experts.tolist() == [[3], [0], [0]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.4], [0.4], [0.5]]), atol=1e-6, rtol=1e-6)  # k=1: raw
    assert r.counts.tolist() == [2, 0, 0, 1]
    # f = [2, 0, 0, 1] / 3, P_0 = 1/3, P_3 = 0.6/3  ->  4 * (2/3 * 1/3 + 1/3 * 0.2)
    torch.testing.assert_close(r.aux_loss, torch.tensor(4 * (2 / 9 + 0.2 / 3)), atol=1e-6, rtol=1e-6)
    assert float(r.z_loss) == 0.0  # z_loss_coef = 0


def test_uniform_routing_aux_loss_is_exactly_one():
    E = 4
    assert float(load_balancing_loss(torch.eye(E), torch.ones(E, dtype=torch.long), 1)) == 1.0
    probs = torch.full((8, E), 1.0 / E)  # uniform probabilities: 1.0 whatever the counts
    assert float(load_balancing_loss(probs, torch.tensor([8, 0, 0, 0]), 1)) == 1.0
    router = _identity_router(top_k=2, aux_loss_coef=0.25)
    r = router(torch.zeros(5, 4))  # all logits equal: P uniform
    assert float(r.aux_loss.detach()) == 0.25
    # skewed: all mass and all tokens on one expert gives E
    assert float(load_balancing_loss(torch.eye(E)[[0, 0, 0]], torch.tensor([3, 0, 0, 0]), 1)) == 4.0


def test_z_loss_and_aux_loss_gradient():
    logits = _hand_logits().requires_grad_()
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.0), atol=1e-5, rtol=0)
    (g,) = torch.autograd.grad(router_z_loss(logits), logits)
    # d/dl mean(lse^2) = 2 * lse * softmax / T
    torch.testing.assert_close(g, (2 * SHIFT[:, None] * P / 3).float(), atol=1e-6, rtol=1e-5)
    probs = P.clone().requires_grad_()
    (gp,) = torch.autograd.grad(load_balancing_loss(probs, torch.tensor([2, 2, 1, 1]), 2), probs)
    torch.testing.assert_close(gp, (4 * torch.tensor([2, 2, 1, 1]) / 6 / 3).double().expand(3, 4))


# ------------------------------------------------------------------------------ Megatron-Core


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.transformer.moe.moe_utils", reason="megatron-core not importable")


@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (7, 4, 2), (64, 9, 3), (33, 8, 8)])
def test_softmax_routing_matches_megatron(mcore, T, E, k):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E + k))
    for pre_softmax, normalize in ((True, False), (False, True)):
        probs, rmap = mcore.topk_routing_with_score_function(logits, k, use_pre_softmax=pre_softmax)
        w, ex, counts = kernels.topk_route(logits, k, normalize=normalize)
        assert torch.equal(_dense(w, ex, E) > 0, rmap)
        torch.testing.assert_close(_dense(w, ex, E), probs, atol=1e-6, rtol=1e-5)
        assert torch.equal(counts, rmap.sum(0))


@pytest.mark.parametrize("T,E,k", [(7, 4, 2), (50, 16, 4)])
def test_sigmoid_bias_routing_matches_megatron(mcore, T, E, k):
    g = torch.Generator().manual_seed(T + E)
    logits, bias = torch.randn(T, E, generator=g), 0.3 * torch.randn(E, generator=g)
    probs, rmap = mcore.topk_routing_with_score_function(logits, k, score_function="sigmoid", expert_bias=bias)
    w, ex, _ = kernels.topk_route(logits, k, score="sigmoid", bias=bias, normalize=True)
    w0, ex0, _ = kernels.topk_route(logits, k, score="sigmoid", normalize=True)
    assert not torch.equal(ex, ex0)  # the bias changed some selection
    assert torch.equal(_dense(w, ex, E) > 0, rmap)
    torch.testing.assert_close(_dense(w, ex, E), probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k,E", [(1, 4), (2, 8), (4, 6)])
def test_losses_match_megatron(mcore, k, E):
    coef, zcoef = 0.03, 0.002
    router, x = _router(T=37, E=E, seed=k, top_k=k, aux_loss_coef=coef, z_loss_coef=zcoef)
    r = router(x)
    logits = router.logits(x)
    ref_aux = mcore.switch_load_balancing_loss_func(
        probs=torch.softmax(logits, -1),
        tokens_per_expert=r.counts,
        total_num_tokens=37,
        topk=k,
        num_experts=E,
        moe_aux_loss_coeff=coef,
    )
    torch.testing.assert_close(r.aux_loss, ref_aux, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(r.z_loss, mcore.z_loss_func(logits, zcoef), atol=1e-7, rtol=1e-5)
    assert float(r.aux_loss.detach()) > coef * 0.5 and float(r.z_loss.detach()) > 0


# ------------------------------------------------------------------------------------ capacity


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("k,cf", [(1, 1.0), (2, 1.0), (2, 0.5)])
def test_capacity_drops(policy, k, cf):
    T, E = 40, 6
    base, x = _router(T, E, seed=3, skew=4.0, top_k=k)
    capped, _ = _router(T, E, seed=3, skew=4.0, top_k=k, capacity_factor=cf, drop_policy=policy)
    r0, r = base(x), capped(x)
    cap = math.ceil(cf * T * k / E)
    assert int(r0.counts.max()) > cap  # the skew really overflows expert 0
    dropped = r.experts < 0
    assert int(r.dropped) == int(dropped.sum()) > 0
    assert torch.equal(r.counts, torch.bincount(r.experts[~dropped], minlength=E))
    assert int(r.counts.max()) <= cap and r.num_rows == int(r.counts.sum()) == T * k - int(r.dropped)
    # kept slots are unchanged, dropped slots carry weight 0 and expert -1
    assert torch.equal(r.experts[~dropped], r0.experts[~dropped])
    assert torch.equal(r.weights[~dropped], r0.weights[~dropped]) and torch.all(r.weights[dropped] == 0)
    for e in range(E):
        slots = (r0.experts == e).reshape(-1).nonzero().squeeze(1)
        kept = ~dropped.reshape(-1)[slots]
        assert int(kept.sum()) == min(cap, len(slots))
        if policy == "probs":  # the kept ones are the highest-weight ones
            w = r0.weights.reshape(-1)[slots]
            if kept.any() and (~kept).any():
                assert w[kept].min() >= w[~kept].max()
        else:  # the kept ones are the earliest tokens
            assert kept.tolist() == [True] * int(kept.sum()) + [False] * int((~kept).sum())


def test_capacity_without_overflow_equals_dropless():
    base, x = _router(T=25, E=5, seed=7, skew=2.0, top_k=2, aux_loss_coef=0.01)
    big, _ = _router(T=25, E=5, seed=7, skew=2.0, top_k=2, aux_loss_coef=0.01, capacity_factor=5.0)
    r0, r = base(x), big(x)
    for name in ("weights", "experts", "counts", "aux_loss", "z_loss", "probs", "dropped"):
        assert torch.equal(getattr(r, name), getattr(r0, name)), name
    assert r.num_rows == r0.num_rows == 50


# -------------------------------------------------------------------------------- aux-free bias


def test_aux_free_bias_update():
    rate = 0.05
    router, x = _router(
        T=30, E=5, seed=11, skew=3.0, top_k=2, score="sigmoid", aux_free_bias=True, bias_update_rate=rate
    )
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0]))  # forces expert 4 in
    router.train()
    r1, r2 = router(x), router(x[:11])
    load = (r1.counts + r2.counts).float()
    assert torch.equal(router.load_since_update, load)
    assert torch.all(r1.experts[:, 0] == 4)
    scores = torch.sigmoid(router.logits(x))
    raw = scores.gather(1, r1.experts)
    torch.testing.assert_close(r1.weights, raw / raw.sum(-1, keepdim=True), atol=1e-6, rtol=1e-6)  # no bias inside
    before = router.expert_bias.clone()
    router.update_bias()
    step = router.expert_bias - before
    expected = rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(step, expected, atol=1e-7, rtol=0)
    assert abs(float(step[load.argmax()]) + rate) < 1e-7 and abs(float(step[load.argmin()]) - rate) < 1e-7
    assert torch.all(router.load_since_update == 0)
    router.eval()
    router(x)
    assert torch.all(router.load_since_update == 0)  # eval passes do not count


def test_aux_free_bias_uses_reduced_load():
    router, x = _router(T=20, E=4, seed=5, top_k=1, aux_free_bias=True, bias_update_rate=0.1)
    router.train()
    router(x)
    seen = []

    def reduce(load):  # stand-in for an all-reduce: replace with a "global" load
        seen.append(load.clone())
        load.copy_(torch.tensor([0.0, 10.0, 5.0, 5.0]))

    router.update_bias(reduce)
    assert len(seen) == 1 and float(seen[0].sum()) == 20
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.1, -0.1, 0.0, 0.0]), atol=0, rtol=0)


def test_aux_free_bias_disabled_is_noop():
    router, x = _router(T=20, E=4, seed=5, top_k=1)
    router.train()
    router(x)
    router.update_bias()
    assert torch.all(router.expert_bias == 0) and torch.all(router.load_since_update == 0)


# ---------------------------------------------------------------------------------------- jitter


def test_jitter_only_in_training():
    torch.manual_seed(0)
    plain, x = _router(T=50, E=6, seed=2, top_k=2)
    jit, _ = _router(T=50, E=6, seed=2, top_k=2, jitter_eps=0.2)
    a, b, ref = jit(x), jit(x), plain(x)
    for name in ("weights", "experts", "counts", "aux_loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)) and torch.equal(getattr(a, name), getattr(ref, name))
    jit.train()
    lt = jit.logits(x)
    assert not torch.equal(lt, plain.logits(x))
    # jitter multiplies each input by U(0.8, 1.2): logits stay within sum_d |x_d w_d| * 0.2 of the clean ones
    bound = 0.2 * (x.abs() @ jit.gate.weight.abs().t())
    assert torch.all((lt - plain.logits(x)).abs() <= bound + 1e-5)
    assert not torch.equal(jit(x).weights, ref.weights)


# ---------------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize("T,E,k,cf", [(10, 4, 2, 1.0), (7, 3, 1, 1.0), (5, 4, 2, 4.0), (1, 4, 1, 1.0), (23, 6, 2, 0.5)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice(T, E, k, cf, score):
    router, x = _router(
        T,
        E,
        seed=T + E,
        cls=ExpertChoiceRouter,
        kind="expert_choice",
        top_k=k,
        capacity_factor=cf,
        score=score,
        z_loss_coef=0.01,
    )
    assert isinstance(build_router(router.cfg, 10, E), ExpertChoiceRouter)
    r = router(x)
    C = min(T, math.ceil(cf * T * k / E))
    logits = router.logits(x)
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    assert r.experts.shape == (T, E) and r.num_rows == C * E
    assert torch.equal(r.counts, torch.full((E,), C))
    chosen = r.experts >= 0
    assert torch.equal(r.experts[chosen], torch.arange(E).expand(T, E)[chosen])  # slot e holds expert e
    for e in range(E):
        mine = chosen[:, e]
        assert int(mine.sum()) == C
        if C < T:
            assert scores[mine, e].min() >= scores[~mine, e].max()  # its top-C tokens by score
    torch.testing.assert_close(r.weights, torch.where(chosen, scores, torch.zeros_like(scores)), atol=0, rtol=0)
    assert int(r.dropped) == int((~chosen.any(1)).sum())
    assert float(r.aux_loss.detach()) == 0.0
    torch.testing.assert_close(r.z_loss, 0.01 * router_z_loss(logits))
    router.update_bias()  # no-op, must not fail


def test_build_router_kinds():
    assert type(build_router(RouterConfig(), 8, 4)) is TokenChoiceRouter
    assert type(build_router(RouterConfig(kind="expert_choice"), 8, 4)) is ExpertChoiceRouter
