"""The modern decoder block against Hugging Face's implementations, and the GPT-2 block unchanged.

Each family's tiny random model (fp32, weights redrawn large enough that norms, rotations and
routing matter) is copied into a dynamoe decoder by a renaming written here, and the logits must
agree to 1e-5: Llama (RMSNorm, RoPE theta, GQA, untied embeddings), Qwen3 (per-head QK-norm, a
head width apart from d_model / n_heads), Mixtral (SwiGLU experts, top-2), OLMoE (QK-norm over the
whole projection, clip_qkv), Qwen3-MoE (dense first layer, MoE after) and GLM-4-MoE (partial
rotary, q/k/v biases, shared expert, sigmoid group-limited routing with a correction bias).
"""

from __future__ import annotations

import pytest
import torch

from dynamoe.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from dynamoe.models import TransformerLM, build_model

transformers = pytest.importorskip("transformers")

D, FF, FE, V, HEADS, KV = 48, 40, 24, 61, 6, 2


def _redraw(hf) -> None:
    """Weights large enough that every part matters (HF's 0.02 init makes logits nearly flat)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _hf_to_dynamoe(sd: dict, n_layers: int) -> dict:
    """Hugging Face Llama-family names -> dynamoe's. Everything is a renaming except the SwiGLU
    FFNs: a dense FFN's ``w_in`` is [gate; up] stacked on the output dimension, and the experts'
    ``w1_EDF`` [E, D, 2F] is HF's fused ``gate_up_proj`` [E, 2F, D] transposed (gate first)."""
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"]}
    out["head.weight"] = sd["lm_head.weight"]
    for i in range(n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "ln1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln2.weight"] = sd[p + "post_attention_layernorm.weight"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            for kind in ("weight", "bias"):
                if f"{p}self_attn.{name}.{kind}" in sd:
                    out[f"{q}attn.{name}.{kind}"] = sd[f"{p}self_attn.{name}.{kind}"]
        m = p + "mlp."
        if m + "gate_proj.weight" in sd:  # dense SwiGLU
            out[q + "ffn.w_in.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]])
            out[q + "ffn.w_out.weight"] = sd[m + "down_proj.weight"]
            continue
        out[q + "ffn.router.gate.weight"] = sd[m + "gate.weight"]
        bias = sd.get(m + "gate.e_score_correction_bias")
        out[q + "ffn.router.expert_bias"] = torch.zeros(sd[m + "gate.weight"].shape[0]) if bias is None else bias
        out[q + "ffn.experts.w1_EDF"] = sd[m + "experts.gate_up_proj"].transpose(1, 2)
        out[q + "ffn.experts.w2_EFD"] = sd[m + "experts.down_proj"].transpose(1, 2)
        if m + "shared_experts.gate_proj.weight" in sd:
            s = m + "shared_experts."
            out[q + "ffn.shared.w_in.weight"] = torch.cat([sd[s + "gate_proj.weight"], sd[s + "up_proj.weight"]])
            out[q + "ffn.shared.w_out.weight"] = sd[s + "down_proj.weight"]
    return out


def _common_hf(**kw) -> dict:
    base = dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FF,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return {**base, **kw}


def _modern(n_layers: int, moe: MoEConfig | None = None, **kw) -> ModelConfig:
    base = dict(
        block="modern",
        vocab_size=V,
        d_model=D,
        n_layers=n_layers,
        n_heads=HEADS,
        n_kv_heads=KV,
        d_ff=FF,
        max_seq_len=64,
        tie_embeddings=False,
        moe_every=0 if moe is None else 1,
        moe=moe or MoEConfig(activation="swiglu"),
    )
    base.update(kw)
    return ModelConfig(**base)


def _experts(shared: int = 0, **router) -> MoEConfig:
    return MoEConfig(
        num_experts=4,
        d_expert=FE,
        num_shared_experts=shared,
        activation="swiglu",
        router=RouterConfig(top_k=2, **router),
    )


FAMILIES = {
    "llama": (
        "LlamaConfig",
        dict(num_hidden_layers=2, rope_theta=500000.0, rms_norm_eps=1e-6),
        lambda **hf: _modern(2, **hf),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(num_hidden_layers=2, head_dim=12, rms_norm_eps=1e-6, rope_theta=1000.0),
        lambda **hf: _modern(2, head_dim=12, qk_norm="per_head", **hf),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(num_hidden_layers=2, intermediate_size=FE, num_local_experts=4, num_experts_per_tok=2),
        lambda **hf: _modern(2, _experts(), **hf),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(num_hidden_layers=2, intermediate_size=FE, num_experts=4, num_experts_per_tok=2, clip_qkv=1.5),
        lambda **hf: _modern(2, _experts(normalize=False), qk_norm="whole", clip_qkv=1.5, **hf),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=3,
            head_dim=12,
            moe_intermediate_size=FE,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            rms_norm_eps=1e-6,
        ),
        lambda **hf: _modern(3, _experts(), head_dim=12, qk_norm="per_head", first_dense_layers=1, **hf),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            num_hidden_layers=2,
            head_dim=16,
            moe_intermediate_size=FE,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=True,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
        ),
        lambda **hf: _modern(
            2,
            _experts(
                shared=1,
                score="sigmoid",
                normalize=True,
                aux_free_bias=True,
                n_group=2,
                topk_group=1,
                routed_scaling_factor=1.5,
            ),
            head_dim=16,
            rope_fraction=0.5,
            qkv_bias=True,
            qk_norm="per_head",
            first_dense_layers=1,
            **hf,
        ),
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_hugging_face(family):
    config_name, hf_kw, ours = FAMILIES[family]
    hf_cfg = getattr(transformers, config_name)(**_common_hf(**hf_kw))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    _redraw(hf)
    # The families' own defaults differ (Mixtral: theta 1e6; Llama, Qwen3: eps 1e-6): read them back.
    cfg = ours(rope_theta=hf_cfg.rope_parameters["rope_theta"], norm_eps=hf_cfg.rms_norm_eps)
    model = build_model(cfg).eval()
    model.load_state_dict(_hf_to_dynamoe(hf.state_dict(), cfg.n_layers), strict=True)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids).logits
    assert want.abs().max() > 1  # the comparison is not between two nearly flat outputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_on_some_rows_rotates_them_by_their_own_positions():
    """``attend`` (halting, mixture-of-depths) with query rows at positions q_idx against every key
    gives the whole-sequence attention's rows there: RoPE reads the given positions."""
    torch.manual_seed(0)
    cfg = _modern(1, head_dim=12, qk_norm="whole", rope_fraction=0.5, clip_qkv=2.0)
    attn = build_model(cfg).blocks[0].attn.eval()
    x = torch.randn(2, 9, D)
    q_idx = torch.tensor([[1, 4, 8], [0, 5, 6]])
    with torch.no_grad():
        full = attn(x)
        rows = attn(
            x.gather(1, q_idx[..., None].expand(-1, -1, D)), rows=(q_idx, x, torch.arange(9).expand(2, 9), None)
        )
        gathered = attn(x.gather(1, q_idx[..., None].expand(-1, -1, D)), positions=q_idx)
        among = attn.attend(x[:, [1, 4, 8]], q_idx[:1].expand(2, 3), x[:, [1, 4, 8]], q_idx[:1].expand(2, 3), None)
    torch.testing.assert_close(rows, full.gather(1, q_idx[..., None].expand(-1, -1, D)), rtol=1e-5, atol=1e-6)
    # Gathered tokens attend among themselves with their own positions, as attend() does.
    torch.testing.assert_close(gathered[:1], among[:1], rtol=1e-5, atol=1e-6)


def test_gpt2_block_is_unchanged():
    """The default (gpt2) block's parameter names and, from a fixed seed, its logits are those of
    the model before the modern block existed (values taken from that code)."""
    from dynamoe.config import ExitConfig

    cfg = ModelConfig(
        vocab_size=40,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=16,
        moe_every=0,
        exits=ExitConfig(layers=[1]),
    )
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    layer = ["ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.proj.weight", "ln2.weight", "ln2.bias"]
    layer += ["ffn.w_in.weight", "ffn.w_out.weight"]
    assert list(model.state_dict()) == [
        "tok_emb.weight",
        "pos_emb.weight",
        *(f"blocks.{i}.{k}" for i in range(2) for k in layer),
        "ln_f.weight",
        "ln_f.bias",
        "head.weight",
        "exit_norms.0.weight",
        "exit_norms.0.bias",
    ]
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
    want = [
        [0.1559155136346817, -0.05523372441530228, -0.04659251496195793, -0.1243826150894165],
        [0.044946663081645966, -0.07729868590831757, 0.23376880586147308, 0.08198446035385132],
        [0.004011466167867184, -0.02361539751291275, -0.20787811279296875, -0.0360686257481575],
    ]
    torch.testing.assert_close(logits[0, :3, :4], torch.tensor(want), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        logits[1, -1, -3:],
        torch.tensor([0.04335423931479454, 0.05527695268392563, -0.06732697039842606]),
        rtol=0,
        atol=1e-6,
    )


def test_modern_parameter_names_and_tied_embeddings():
    cfg = _modern(3, _experts(shared=1), tie_embeddings=True, qk_norm="per_head", first_dense_layers=1)
    model = build_model(cfg)
    keys = set(model.state_dict())
    assert "pos_emb.weight" not in keys and model.head.weight is model.tok_emb.weight
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        assert f"blocks.0.attn.{name}.weight" in keys
    assert not any(k.endswith(".bias") for k in keys)  # no biases anywhere (RMSNorm has none)
    assert model.blocks[0].attn.k_proj.weight.shape == (KV * D // HEADS, D)
    assert model.blocks[0].ffn.w_in.weight.shape == (2 * FF, D)  # SwiGLU [gate; up]
    assert model.blocks[1].ffn.experts.w1_EDF.shape == (4, D, 2 * FE)


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(moe_every=1), [0, 1, 2, 3, 4]),
        (dict(moe_every=1, first_dense_layers=1), [1, 2, 3, 4]),
        (dict(moe_every=2, first_dense_layers=2), [3]),
        (dict(moe_every=0, first_dense_layers=2), []),
        (dict(moe_layers=[0, 3]), [0, 3]),
        (dict(moe_layers=[]), []),
    ],
)
def test_moe_placement(kw, expected):
    cfg = ModelConfig(n_layers=5, **kw)
    assert [i for i in range(5) if cfg.is_moe_layer(i)] == expected


@pytest.mark.parametrize(
    "kw, field, fix",
    [
        (dict(n_kv_heads=2), "model.block", "block: modern"),
        (dict(qk_norm="whole"), "model.block", "block: modern"),
        (dict(norm="rmsnorm"), "model.block", "block: modern"),
        (dict(block="modern"), "model.moe.activation", "swiglu"),
        (dict(block="modern", moe=MoEConfig(activation="swiglu"), n_kv_heads=3), "model.n_kv_heads", "[1, 2, 4]"),
        (dict(block="modern", moe=MoEConfig(activation="swiglu"), rope_fraction=0.1), "model.rope_fraction", "even"),
        (dict(block="modern", moe=MoEConfig(activation="swiglu"), n_heads=3), "model.n_heads", "head_dim"),
        (dict(moe_layers=[2, 1]), "model.moe_layers", "increasing"),
        (dict(moe_layers=[4]), "model.moe_layers", "below n_layers"),
        (dict(moe_layers=[1], first_dense_layers=1), "model.moe_layers", "remove first_dense_layers"),
        (dict(first_dense_layers=5), "model.first_dense_layers", "leading dense layers"),
        (dict(norm_eps=0.0), "model.norm_eps", "1e-6"),
    ],
)
def test_block_config_errors_name_the_field_and_the_fix(kw, field, fix):
    with pytest.raises(ConfigError, match=field) as err:
        ModelConfig(n_layers=4, **kw)
    assert fix in str(err.value)


def test_modern_block_with_head_dim_apart_from_d_model():
    ModelConfig(block="modern", moe=MoEConfig(activation="swiglu"), d_model=48, n_heads=5, head_dim=16)


def test_shipped_modern_config_trains_exports_and_reloads(tmp_path):
    """configs/modern_moe_lm.yaml, shrunk: a few steps of training, then the exported file rebuilds
    the same model (the modern block's config fields survive the round trip)."""
    from dynamoe.config import load_config
    from dynamoe.training.checkpoint import export_model, load_exported
    from dynamoe.training.trainer import train

    sets = ["model.d_model=32", "model.d_ff=48", "model.moe.d_expert=16", "model.max_seq_len=32"]
    sets += ["data.seq_len=32", "train.batch_size=4", "train.steps=3", "train.warmup_steps=1"]
    sets += ["train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=3"]
    cfg = load_config("modern_moe_lm", sets)
    result = train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.train_losses.values())
    out = export_model(tmp_path / "run", tmp_path / "model.safetensors").path
    loaded_cfg, model = load_exported(out)
    assert loaded_cfg.block == "modern" and loaded_cfg.n_kv_heads == 2 and loaded_cfg.first_dense_layers == 1
    assert [b.is_moe for b in model.blocks] == [False, True, True, True]
    assert torch.isfinite(model.eval()(torch.randint(0, loaded_cfg.vocab_size, (2, 16))).logits).all()


def test_bf16_forward_stays_close_to_fp32():
    """Norms in fp32 inside and rotations made in fp32: bf16 logits within bf16's error of fp32."""
    torch.manual_seed(0)
    cfg = _modern(2, _experts(), qk_norm="whole", head_dim=12, rope_fraction=0.5)
    model = build_model(cfg).eval()
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        want = model(ids).logits
        got = model.to(torch.bfloat16)(ids).logits.float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()))
