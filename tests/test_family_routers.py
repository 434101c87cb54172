"""TokenChoiceRouter against the routers of the Hugging Face families people train, each run from its
own transformers module on random inputs in fp32: Mixtral, Qwen3-MoE and OLMoE (softmax top-k, with
and without renormalisation), DeepSeek-V3 and GLM-4-MoE (sigmoid, a selection-only correction bias,
group-limited selection, routed_scaling_factor; their MoE blocks with shared experts too).

The families' top-k does not sort (``sorted=False``) and breaks no ties on purpose, so experts are
compared as sets per token and weights matched by expert id. Random fp32 inputs have no ties.

The Triton case needs Triton's interpreter on CPU, which must be on when triton is first imported:
tests/conftest.py imports it so before any test module (and before transformers can).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

from dynamoe import kernels
from dynamoe.config import MoEConfig, RouterConfig
from dynamoe.kernels.routing import topk_route_ref
from dynamoe.layers.moe_layer import MoELayer
from dynamoe.layers.router import TokenChoiceRouter, load_balancing_loss, router_z_loss

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()

try:
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek_v3
    from transformers.models.glm4_moe import modeling_glm4_moe as glm4_moe
    from transformers.models.mixtral import modeling_mixtral as mixtral
    from transformers.models.olmoe import modeling_olmoe as olmoe
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

    deepseek_v3.DeepseekV3TopkRouter, glm4_moe.Glm4MoeTopkRouter, mixtral.MixtralTopKRouter  # noqa: B018
except (ImportError, AttributeError) as e:
    pytest.skip(
        f"these checks call the families' router modules (DeepseekV3TopkRouter, MixtralTopKRouter, ...), "
        f"which this transformers lacks ({e}); transformers 5 has them",
        allow_module_level=True,
    )

D = 32  # hidden size
T = 300  # tokens


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_gate(gate: nn.Module, seed: int, bias_std: float = 0.0) -> None:
    """The families initialise their gates to zeros (weights are loaded); give them random ones."""
    g = _gen(seed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * D**-0.5)
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.copy_(bias_std * torch.randn(gate.weight.shape[0], generator=g))


def _dynamoe_router(gate: nn.Module, cfg: RouterConfig) -> TokenChoiceRouter:
    """A dynamoe router holding the family gate's weight (and correction bias, if any)."""
    router = TokenChoiceRouter(cfg, D, gate.weight.shape[0])
    with torch.no_grad():
        router.gate.weight.copy_(gate.weight)
        if hasattr(gate, "e_score_correction_bias"):
            router.expert_bias.copy_(gate.e_score_correction_bias)
    return router.eval()


def _dense(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] combine weights by expert id (0 where not selected): independent of slot order."""
    return torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype).scatter_add(1, experts, weights)


def assert_same_routing(hf_weights, hf_experts, routing, num_experts):
    assert torch.equal(hf_experts.sort(-1).values, routing.experts.sort(-1).values), "selected expert sets differ"
    torch.testing.assert_close(
        _dense(routing.weights.detach(), routing.experts, num_experts),
        _dense(hf_weights.detach().float(), hf_experts, num_experts),
        atol=1e-6,
        rtol=0,
    )


# --------------------------------------------------------------------------------- softmax top-k


def _mixtral(E, k, norm):
    assert norm is None, "Mixtral always renormalises"
    gate = mixtral.MixtralTopKRouter(
        mixtral.MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=k, intermediate_size=16)
    )
    # Mixtral renormalises at k=1 too (every weight 1.0), where dynamoe's default (None) keeps the raw score.
    return gate, RouterConfig(top_k=k, normalize=True)


def _qwen3_moe(E, k, norm):
    hf = qwen3_moe.Qwen3MoeConfig(
        hidden_size=D, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm, moe_intermediate_size=16
    )
    return qwen3_moe.Qwen3MoeTopKRouter(hf), RouterConfig(top_k=k, normalize=hf.norm_topk_prob)


def _olmoe(E, k, norm):
    extra = {} if norm is None else {"norm_topk_prob": norm}
    hf = olmoe.OlmoeConfig(hidden_size=D, num_experts=E, num_experts_per_tok=k, intermediate_size=16, **extra)
    if norm is None:
        assert hf.norm_topk_prob is False  # OLMoE's default: raw softmax probabilities
    return olmoe.OlmoeTopKRouter(hf), RouterConfig(top_k=k, normalize=hf.norm_topk_prob)


SOFTMAX_CASES = [
    ("mixtral", _mixtral, 8, 2, None),
    ("mixtral", _mixtral, 8, 1, None),
    ("qwen3_moe", _qwen3_moe, 16, 4, True),
    ("qwen3_moe", _qwen3_moe, 16, 4, False),
    ("qwen3_moe", _qwen3_moe, 8, 1, True),
    ("qwen3_moe", _qwen3_moe, 8, 1, False),
    ("olmoe", _olmoe, 16, 8, None),
    ("olmoe", _olmoe, 16, 2, True),
    ("olmoe", _olmoe, 8, 1, None),
]


@pytest.mark.parametrize(
    "name,build,E,k,norm", SOFTMAX_CASES, ids=[f"{c[0]}-E{c[2]}-k{c[3]}-{c[4]}" for c in SOFTMAX_CASES]
)
def test_softmax_families(name, build, E, k, norm):
    gate, cfg = build(E, k, norm)
    _randomise_gate(gate, seed=E * 10 + k)
    router = _dynamoe_router(gate, cfg)
    x = torch.randn(T, D, generator=_gen(k))
    hf_logits, hf_weights, hf_experts = gate(x)
    torch.testing.assert_close(router.logits(x), hf_logits, atol=0, rtol=0)
    r = router(x)
    assert_same_routing(hf_weights, hf_experts, r, E)
    if cfg.renormalize:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T), atol=1e-6, rtol=0)
    else:
        assert float(r.weights.detach().sum(-1).max()) < 1.0


# ------------------------------------------------------------------ sigmoid, bias, groups, scaling


def _sigmoid_family(module, config_cls, E, k, n_group, topk_group, norm, scale):
    hf = config_cls(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        moe_intermediate_size=16,
        n_shared_experts=1,
    )
    gate = getattr(module, config_cls.__name__.replace("Config", "TopkRouter"))(hf)
    cfg = RouterConfig(
        top_k=k,
        score="sigmoid",
        normalize=norm,
        aux_free_bias=True,
        n_group=n_group,
        # All groups is None in dynamoe; the families spell it topk_group = n_group.
        topk_group=None if topk_group == n_group else topk_group,
        routed_scaling_factor=scale,
    )
    return hf, gate, cfg


# (E, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
SIGMOID_CASES = [
    ("deepseek_v3", 32, 8, 8, 4, True, 2.5),  # DeepSeek-V3's own ratios: 256 experts, 8 groups, 4 kept, k=8
    ("deepseek_v3", 16, 4, 4, 2, False, 2.5),
    ("deepseek_v3", 16, 1, 4, 1, True, 1.0),
    ("deepseek_v3", 16, 1, 4, 2, False, 1.0),
    ("deepseek_v3", 16, 3, 4, 4, True, 1.5),  # every group kept: plain top-k
    ("deepseek_v3", 8, 2, 1, 1, True, 1.0),
    ("glm4_moe", 16, 4, 1, 1, True, 2.5),  # GLM-4.5: no group limit, scaled
    ("glm4_moe", 16, 2, 2, 1, False, 1.0),
    ("glm4_moe", 12, 1, 3, 2, True, 1.0),
]
FAMILY = {"deepseek_v3": (deepseek_v3, deepseek_v3.DeepseekV3Config), "glm4_moe": (glm4_moe, glm4_moe.Glm4MoeConfig)}


@pytest.mark.parametrize(
    "name,E,k,n_group,topk_group,norm,scale", SIGMOID_CASES, ids=["-".join(map(str, c)) for c in SIGMOID_CASES]
)
def test_sigmoid_families(name, E, k, n_group, topk_group, norm, scale):
    _, gate, cfg = _sigmoid_family(*FAMILY[name], E, k, n_group, topk_group, norm, scale)
    _randomise_gate(gate, seed=E + k + n_group, bias_std=0.2)
    router = _dynamoe_router(gate, cfg)
    x = torch.randn(T, D, generator=_gen(n_group * 7 + k))
    hf_logits, hf_weights, hf_experts = gate(x)
    torch.testing.assert_close(router.logits(x), hf_logits, atol=0, rtol=0)
    r = router(x)
    assert_same_routing(hf_weights, hf_experts, r, E)

    # The case exercises what it claims: the bias and the group limit each changed some selection.
    _, plain_ex, _ = topk_route_ref(hf_logits, k, score="sigmoid")
    _, biased_ex, _ = topk_route_ref(hf_logits, k, score="sigmoid", bias=router.expert_bias)
    assert not torch.equal(plain_ex.sort(-1).values, biased_ex.sort(-1).values)
    if cfg.topk_group is not None and cfg.n_group > 1:
        assert not torch.equal(biased_ex.sort(-1).values, r.experts.sort(-1).values)
        group_of = r.experts // (E // n_group)
        assert all(len(set(row)) <= topk_group for row in group_of.tolist())
    if norm:
        torch.testing.assert_close(r.weights.sum(-1), torch.full((T,), scale), atol=1e-6, rtol=0)


def test_loaded_correction_bias_selects_without_aux_free_bias():
    """An imported (or earlier learned) bias is part of the routing even when balancing is off;
    aux_free_bias only decides whether update_bias moves it."""
    _, gate, cfg = _sigmoid_family(deepseek_v3, deepseek_v3.DeepseekV3Config, 16, 4, 4, 2, True, 2.5)
    _randomise_gate(gate, seed=5, bias_std=0.3)
    cfg = dataclasses.replace(cfg, aux_free_bias=False)
    router = _dynamoe_router(gate, cfg).train()
    x = torch.randn(T, D, generator=_gen(5))
    _, hf_weights, hf_experts = gate(x)
    assert_same_routing(hf_weights, hf_experts, router(x), 16)
    before = router.expert_bias.clone()
    router.update_bias()
    assert torch.equal(router.expert_bias, before)


def test_aux_free_bias_update_moves_the_correction_bias():
    """With aux_free_bias the imported bias keeps learning by dynamoe's rule, and routing follows it."""
    _, gate, cfg = _sigmoid_family(glm4_moe, glm4_moe.Glm4MoeConfig, 16, 2, 2, 1, True, 2.5)
    _randomise_gate(gate, seed=9, bias_std=0.2)
    cfg = dataclasses.replace(cfg, bias_update_rate=0.05)
    router = _dynamoe_router(gate, cfg).train()
    x = torch.randn(T, D, generator=_gen(9))
    r = router(x)
    load = r.counts.float()
    assert torch.equal(router.load_since_update, load)
    before = router.expert_bias.clone()
    router.update_bias()
    torch.testing.assert_close(router.expert_bias - before, 0.05 * torch.sign(load.mean() - load), atol=1e-7, rtol=0)
    assert torch.all(router.load_since_update == 0)
    with torch.no_grad():  # the family's router given the moved bias picks what dynamoe's picks
        gate.e_score_correction_bias.copy_(router.expert_bias)
    _, hf_weights, hf_experts = gate(x)
    assert_same_routing(hf_weights, hf_experts, router.eval()(x), 16)


def test_losses_with_group_limited_sigmoid_routing():
    _, gate, cfg = _sigmoid_family(deepseek_v3, deepseek_v3.DeepseekV3Config, 16, 4, 4, 2, True, 2.5)
    _randomise_gate(gate, seed=3, bias_std=0.2)
    cfg = dataclasses.replace(cfg, aux_loss_coef=0.01, z_loss_coef=0.001)
    router = _dynamoe_router(gate, cfg).train()
    x = torch.randn(T, D, generator=_gen(3))
    r = router(x)
    logits = router.logits(x)
    scores = torch.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdim=True)  # normalised over all experts, excluded groups too
    torch.testing.assert_close(r.probs, probs, atol=1e-7, rtol=0)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T), atol=1e-6, rtol=0)
    assert int(r.counts.sum()) == T * 4 and torch.equal(r.counts, torch.bincount(r.experts.reshape(-1), minlength=16))
    torch.testing.assert_close(r.aux_loss, 0.01 * load_balancing_loss(probs, r.counts, 4), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(r.z_loss, 0.001 * router_z_loss(logits), atol=1e-8, rtol=1e-6)
    assert float(r.aux_loss.detach()) >= 0.01 * 0.9  # about 1 when balanced, above when not
    grad = torch.autograd.grad(r.aux_loss + r.z_loss + r.weights.sum(), router.gate.weight)[0]
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


# ------------------------------------------------------------------- whole MoE blocks, shared experts


@pytest.mark.parametrize(
    "name,E,k,n_group,topk_group,n_shared,scale",
    [("deepseek_v3", 16, 4, 4, 2, 2, 2.5), ("glm4_moe", 8, 2, 1, 1, 1, 2.5)],
)
def test_moe_block_with_shared_experts(name, E, k, n_group, topk_group, n_shared, scale):
    module, config_cls = FAMILY[name]
    hf_cfg, _, rcfg = _sigmoid_family(module, config_cls, E, k, n_group, topk_group, True, scale)
    hf_cfg.n_shared_experts = n_shared
    f = hf_cfg.moe_intermediate_size
    torch.manual_seed(0)
    block = getattr(module, config_cls.__name__.replace("Config", "MoE"))(hf_cfg).eval()
    g = _gen(E + n_shared)
    with torch.no_grad():
        for p in block.parameters():  # the families leave experts uninitialised (weights are loaded)
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    _randomise_gate(block.gate, seed=E, bias_std=0.2)
    layer = MoELayer(
        MoEConfig(num_experts=E, d_expert=f, activation="swiglu", num_shared_experts=n_shared, router=rcfg), D
    ).eval()
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.gate.weight)
        layer.router.expert_bias.copy_(block.gate.e_score_correction_bias)
        # gate_up_proj [E, 2f, d] with gate first; dynamoe's w1 is [E, d, 2f] = [gate | up].
        layer.experts.w1_EDF.copy_(block.experts.gate_up_proj.transpose(1, 2))
        layer.experts.w2_EFD.copy_(block.experts.down_proj.transpose(1, 2))
        shared = block.shared_experts
        layer.shared.w_in.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight], 0))
        layer.shared.w_out.weight.copy_(shared.down_proj.weight)
    x = torch.randn(3, 17, D, generator=g)
    y, _ = layer(x)
    torch.testing.assert_close(y, block(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- Triton


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_dispatch_runs_group_limited_routing_on_the_reference(monkeypatch):
    """The Triton kernel has no group-limited selection: the backend says so and runs the reference."""
    monkeypatch.setenv("DYNAMOE_KERNEL_BACKEND", "triton")
    logits = torch.randn(40, 16, generator=_gen(1))
    bias = 0.2 * torch.randn(16, generator=_gen(2))
    opts = dict(score="sigmoid", bias=bias, normalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    with pytest.warns(RuntimeWarning, match="no group-limited selection"):
        w, ex, counts = kernels.topk_route(logits, 4, **opts)
    rw, rex, rcounts = topk_route_ref(logits, 4, **opts)
    assert torch.equal(ex, rex) and torch.equal(counts, rcounts) and torch.equal(w, rw)

    from dynamoe.kernels.triton.routing import topk_route_triton

    with pytest.raises(ValueError, match="no group-limited selection"):
        topk_route_triton(logits, 4, **opts)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernel_scales_weights(monkeypatch):
    """routed_scaling_factor (and a group setting that limits nothing) stays on the Triton kernel."""
    from dynamoe.kernels.triton._jit import triton_interpreted

    if not CUDA and not triton_interpreted():
        pytest.skip("triton was imported earlier in this process without TRITON_INTERPRET=1")
    monkeypatch.delenv("DYNAMOE_KERNEL_BACKEND", raising=False)
    dev = torch.device("cuda" if CUDA else "cpu")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.backend_for(torch.zeros(1, device=dev), "topk_route") == "triton"
    logits = torch.randn(37, 16, generator=_gen(4)).to(dev).requires_grad_()
    bias = (0.2 * torch.randn(16, generator=_gen(5))).to(dev)
    up = torch.randn(37, 4, generator=_gen(6)).to(dev)
    for opts in (
        dict(score="sigmoid", bias=bias, normalize=True, routed_scaling_factor=2.5, n_group=4, topk_group=4),
        dict(score="softmax", normalize=False, routed_scaling_factor=1.5),
    ):
        w, ex, counts = kernels.topk_route(logits, 4, **opts)
        rw, rex, rcounts = topk_route_ref(logits, 4, **opts)
        assert torch.equal(ex, rex) and torch.equal(counts, rcounts)
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-6)
        (grad,) = torch.autograd.grad((w * up).sum(), logits)
        (rgrad,) = torch.autograd.grad((rw * up).sum(), logits)
        torch.testing.assert_close(grad, rgrad, atol=1e-6, rtol=1e-5)
