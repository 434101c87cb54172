"""dynamoe's experts inside transformers (``dynamoe.interop.hf_experts``): the ``"dynamoe"`` experts
implementation against transformers' ``eager`` one.

Each family is built twice from a tiny random config (no network), once per implementation, with the
same weights (every parameter perturbed so biases and norms are not at their trivial init); the
logits and every parameter's gradient must agree within 1e-5 in fp32. Module-level tests cover
experts that receive no tokens, slots that name no local expert, an empty batch, bf16, the
layouts without a gate or with a post-expert norm, and the layouts that are refused.
"""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import dynamoe.interop.hf_experts as hf_experts  # registers "dynamoe"
from dynamoe import kernels

ATOL = 1e-5
VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _mixtral():
    return transformers.MixtralConfig(
        **COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2
    )


def _qwen3_moe():
    return transformers.Qwen3MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )


def _olmoe():
    return transformers.OlmoeConfig(
        **COMMON, intermediate_size=16, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2
    )


def _deepseek_v3():
    # Group-limited sigmoid routing (2 groups, 1 kept), a shared expert, a dense first layer.
    return transformers.DeepseekV3Config(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        routed_scaling_factor=2.5,
    )


def _glm4_moe():
    return transformers.Glm4MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_key_value_heads=2,
        head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
    )


def _gpt_oss():
    # Transposed [E, d, 2f] weights, biases, interleaved gate/up read by the class's own _apply_gate.
    return transformers.GptOssConfig(
        **COMMON,
        intermediate_size=16,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # its YaRN default expects 4096 positions
    )


FAMILIES = {
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _glm4_moe,
    "gpt_oss": _gpt_oss,
}


def _build(make_config, implementation: str, state: dict | None = None) -> nn.Module:
    # A fresh config per model: from_config writes experts_implementation into the config it is given.
    model = AutoModelForCausalLM.from_config(make_config(), experts_implementation=implementation).train()
    if state is None:
        torch.manual_seed(0)
        with torch.no_grad():  # move every weight off its init (zero biases, unit norms) so each one matters
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    else:
        model.load_state_dict(state)
    return model


def _num_moe_layers(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj"))


def _forward_backward(model: nn.Module, ids: torch.Tensor):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(logits_a, grads_a, logits_b, grads_b):
    assert (logits_a - logits_b).abs().max().item() <= ATOL
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert (g is None) == (grads_b[name] is None), name
        if g is not None:
            err = (g - grads_b[name]).abs().max().item()
            assert err <= ATOL, f"{name}: gradient differs by {err:.2e}"


def test_registered_with_transformers():
    assert "dynamoe" in ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS["dynamoe"] is hf_experts.dynamoe_experts_forward
    # The list transformers validates experts_implementation= against, read through its own method.
    model = AutoModelForCausalLM.from_config(_mixtral(), experts_implementation="eager")
    assert model.get_correct_experts_implementation("dynamoe") == "dynamoe"


def test_import_dynamoe_does_not_import_transformers():
    code = "import sys, dynamoe, dynamoe.interop; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_eager(family):
    make_config = FAMILIES[family]
    eager = _build(make_config, "eager")
    ours = _build(make_config, "dynamoe", eager.state_dict())
    assert ours.config._experts_implementation == "dynamoe"
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    logits_e, grads_e = _forward_backward(eager, ids)
    with mock.patch.object(kernels, "grouped_mm", wraps=kernels.grouped_mm) as gmm:
        logits_d, grads_d = _forward_backward(ours, ids)
    assert gmm.call_count == 2 * _num_moe_layers(ours) > 0  # the experts ran through dynamoe: 2 GEMMs per layer
    _assert_same(logits_e, grads_e, logits_d, grads_d)


def test_from_pretrained_and_switch(tmp_path):
    eager = _build(_mixtral, "eager")
    eager.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    want = eager(input_ids=ids).logits.detach()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="dynamoe")
    assert loaded.config._experts_implementation == "dynamoe"
    assert (loaded(input_ids=ids).logits - want).abs().max().item() <= ATOL
    eager.set_experts_implementation("dynamoe")  # transformers' switch on a built model
    with mock.patch.object(kernels, "grouped_mm", wraps=kernels.grouped_mm) as gmm:
        got = eager(input_ids=ids).logits.detach()
    assert gmm.call_count == 4 and (got - want).abs().max().item() <= ATOL


# --------------------------------------------------------------------------- module level


def _mixtral_experts(dtype=torch.float32):
    experts = transformers.models.mixtral.modeling_mixtral.MixtralExperts(_mixtral())
    torch.manual_seed(3)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return experts.to(dtype)


def _run(experts, impl, x, index, weights):
    """Output and the gradients of x, the routing weights and every parameter, under ``impl``."""
    experts.config._experts_implementation = impl
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    y = experts(x, index, weights)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in experts.named_parameters()}
    return y.detach(), x.grad, weights.grad, grads


def _compare(experts, x, index, weights, atol=ATOL):
    # rtol 1e-6 beside atol: a routing-weight gradient of ~44 sums hundreds of products, where fp32
    # summation order alone moves it by ~1e-5 (both sides err about equally against fp64).
    y_e, gx_e, gw_e, gp_e = _run(experts, "eager", x, index, weights)
    y_d, gx_d, gw_d, gp_d = _run(experts, "dynamoe", x, index, weights)
    torch.testing.assert_close(y_d, y_e, atol=atol, rtol=1e-6)
    torch.testing.assert_close(gx_d, gx_e, atol=atol, rtol=1e-6)
    torch.testing.assert_close(gw_d, gw_e, atol=atol, rtol=1e-6)
    for name in gp_e:
        torch.testing.assert_close(gp_d[name], gp_e[name], atol=atol, rtol=1e-6, msg=name)
    return gp_d


def test_experts_without_tokens_and_foreign_slots():
    experts = _mixtral_experts()  # 8 experts
    T = 6
    x = torch.randn(T, 32)
    # Experts 1, 3, 4, 6, 7 receive nothing (0 is first, a gap in the middle, the tail is empty).
    # Index 8 = num_experts marks a slot eager skips (transformers' expert-parallel sentinel).
    index = torch.tensor([[0, 2], [5, 0], [2, 5], [8, 0], [5, 2], [0, 8]])
    weights = torch.rand(T, 2)
    grads = _compare(experts, x, index, weights)
    for e in (1, 3, 4, 6, 7):
        assert grads["gate_up_proj"][e].abs().max() == 0 and grads["down_proj"][e].abs().max() == 0


def test_every_slot_on_one_expert_and_empty_batch():
    experts = _mixtral_experts()
    x = torch.randn(5, 32)
    _compare(experts, x, torch.full((5, 2), 7), torch.rand(5, 2))
    experts.config._experts_implementation = "dynamoe"
    y = experts(torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert y.shape == (0, 32)


def test_expert_parallel_sentinels_above_num_experts():
    # Under transformers' expert parallelism every index >= num_experts belongs to another rank.
    experts = _mixtral_experts()
    experts._is_expert_parallel = True
    x = torch.randn(4, 32)
    index = torch.tensor([[0, 11], [9, 3], [3, 0], [12, 13]])
    weights = torch.rand(4, 2)
    experts.config._experts_implementation = "dynamoe"
    y = experts(x, index, weights)
    kept = torch.where(index < 8, weights, torch.zeros_like(weights))
    experts.config._experts_implementation = "eager"
    y_ref = experts(x, index.clamp(max=8), kept)  # eager skips exactly index 8
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    assert y[3].abs().max() == 0


def test_bf16_error_no_worse_than_eager_bf16():
    experts = _mixtral_experts()
    torch.manual_seed(4)
    x, index, weights = torch.randn(40, 32), torch.randint(0, 8, (40, 2)), torch.rand(40, 2)
    experts.config._experts_implementation = "eager"
    with torch.no_grad():
        exact = experts.double()(x.double(), index, weights.double())
        experts.to(torch.bfloat16)
        outs = {}
        for impl in ("eager", "dynamoe"):
            experts.config._experts_implementation = impl
            outs[impl] = experts(x.bfloat16(), index, weights)
    assert outs["dynamoe"].dtype == torch.bfloat16
    err = {impl: (y.double() - exact).abs().max().item() for impl, y in outs.items()}
    ulp = exact.abs().max().item() * 2**-8
    assert err["dynamoe"] <= 2 * err["eager"] + ulp, err


def test_layout_without_gate():
    config = transformers.NemotronHConfig(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2, mlp_hidden_act="relu2"
    )
    experts = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHExperts(config)
    assert experts.has_gate is False
    torch.manual_seed(5)
    with torch.no_grad():  # relu^2 grows fast: small weights keep values O(1), where 1e-5 is meaningful
        for p in experts.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    _compare(experts, torch.randn(7, 32), torch.randint(0, 6, (7, 2)), torch.rand(7, 2))


def test_layout_with_post_expert_norm():
    config = transformers.MuseSparkTextConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_hidden_size=32,
        moe_intermediate_size=16,
        num_local_experts=6,
        num_experts_per_tok=2,
    )
    experts = transformers.models.muse_spark.modeling_muse_spark.MuseSparkExperts(config)
    assert experts.has_post_expert_norm is True
    torch.manual_seed(6)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # the norm scales by (1 + weight)
    _compare(experts, torch.randn(7, 32), torch.randint(0, 6, (7, 2)), torch.rand(7, 2))


# --------------------------------------------------------------------------- refused layouts


class _Config:
    _experts_implementation = "dynamoe"


def _interleaved_default_gate():
    @use_experts_implementation(is_concatenated=False)
    class InterleavedExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 32, 16))
            self.down_proj = nn.Parameter(torch.randn(4, 16, 8))
            self.act_fn = nn.SiLU()

    return InterleavedExperts(_Config())


def test_refuses_interleaved_gate_up_without_own_gate():
    experts = _interleaved_default_gate()
    with pytest.raises(ValueError, match="is_concatenated=False.*_apply_gate"):
        experts(torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


def test_refuses_quantized_and_undecorated_experts():
    experts = _mixtral_experts()
    experts.down_proj = nn.Parameter(torch.zeros(8, 32, 16, dtype=torch.int8), requires_grad=False)
    args = (torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(ValueError, match="down_proj is torch.int8.*dequantize"):
        hf_experts.dynamoe_experts_forward(experts, *args)

    class Plain(nn.Module):  # stacked weights, but not built for transformers' experts interface
        gate_up_proj = down_proj = None

    with pytest.raises(TypeError, match="use_experts_implementation"):
        hf_experts.dynamoe_experts_forward(Plain(), *args)


def test_refuses_bias_flag_without_biases():
    experts = _mixtral_experts()
    experts.has_bias = True
    with pytest.raises(ValueError, match="has_bias=True but no gate_up_proj_bias"):
        experts.config._experts_implementation = "dynamoe"
        experts(torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
