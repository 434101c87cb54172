"""Hugging Face MoE language-model configs to dynamoe's model config and back, family by family:
Mixtral, Qwen3-MoE, OLMoE, GLM-4-MoE (and dense Llama / Qwen3 decoders).

Everything a family's config can say is either mapped exactly or refused with an error that names
the config field; nothing is dropped silently. Importing keeps the family's router losses
(``router_aux_loss_coef``) so a fine-tune trains as the family does; exporting writes the
family's own config class (``transformers``' ``to_dict``), so transformers loads it with no
custom code.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamoe.config import ModelConfig, MoEConfig, RouterConfig
from dynamoe.interop.hf_files import HFFormatError

ACTIVATIONS = ("silu", "swish")


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class written into config.json
    experts_key: str  # config field with the number of routed experts (num_local_experts also read)
    expert_width_key: str  # config field with one expert's hidden width
    router: str  # "softmax" or "sigmoid"
    moe: bool = True


FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "num_local_experts", "intermediate_size", "softmax"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size", "softmax"),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "num_experts", "intermediate_size", "softmax"),
    "glm4_moe": Family("glm4_moe", "Glm4MoeForCausalLM", "n_routed_experts", "moe_intermediate_size", "sigmoid"),
    "llama": Family("llama", "LlamaForCausalLM", "", "", "softmax", moe=False),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "", "", "softmax", moe=False),
}


def family_of(hf: dict) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        hint = " (DeepSeek-V3's multi-head latent attention is not implemented)" if model_type == "deepseek_v3" else ""
        raise HFFormatError(
            f"config.json model_type: '{model_type}' is not supported{hint}; fix: import one of "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def _rope(hf: dict) -> tuple[float, float]:
    """(theta, fraction rotated) from either the flat fields or transformers 5's rope_parameters."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFFormatError(
            f"config.json rope_parameters.rope_type: '{kind}' (scaled rotary positions) is not supported; "
            "fix: import a checkpoint with the default rotary embedding"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return float(theta), float(fraction)


def _refuse(hf: dict, field: str, ok, why: str, fix: str) -> None:
    value = hf.get(field)
    if not ok(value):
        raise HFFormatError(f"config.json {field}: {value!r} {why}; fix: {fix}")


def to_model_config(hf: dict) -> ModelConfig:
    """dynamoe's ``ModelConfig`` (the modern decoder) of a family's config.json."""
    fam = family_of(hf)
    _refuse(hf, "hidden_act", lambda v: v in ACTIVATIONS, "is not SwiGLU's silu", "import a SwiGLU model")
    _refuse(
        hf,
        "sliding_window",
        lambda v: v is None or not hf.get("use_sliding_window", fam.model_type == "mixtral"),
        "(sliding-window attention) is not supported",
        "import a model with full attention (sliding_window: null)",
    )
    _refuse(hf, "attention_dropout", lambda v: not v, "is not supported", "set attention_dropout to 0.0")
    theta, fraction = _rope(hf)
    n_layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) == d_model // heads and d_model % heads == 0:
        head_dim = None
    fields = dict(
        kind="decoder",
        block="modern",
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        d_ff=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        dropout=0.0,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_fraction=fraction,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    bias = bool(hf.get("attention_bias", False))
    if fam.model_type == "glm4_moe":  # its attention_bias is on q, k and v, never on the output
        fields.update(qkv_bias=bias, out_bias=False, qk_norm="per_head" if hf.get("use_qk_norm") else "none")
    else:
        fields.update(qkv_bias=bias, out_bias=bias)
    if fam.model_type in ("qwen3_moe", "qwen3"):
        fields["qk_norm"] = "per_head"
    if fam.model_type == "olmoe":
        fields["qk_norm"] = "whole"
        fields["clip_qkv"] = hf.get("clip_qkv")
    if not fam.moe:
        fields.update(moe_every=0, moe=MoEConfig(activation="swiglu"))  # no MoE layer: only the activation counts
        return ModelConfig(**fields)
    num_experts = hf.get(fam.experts_key, hf.get("num_local_experts"))  # transformers 5 renamed some
    if num_experts is None:
        raise HFFormatError(f"config.json {fam.experts_key}: missing; fix: restore the config's number of experts")
    num_experts = int(num_experts)
    top_k = int(hf["num_experts_per_tok"])
    aux_coef = float(hf.get("router_aux_loss_coef", 0.0) or 0.0)
    if fam.router == "softmax":
        router = RouterConfig(
            top_k=top_k,
            score="softmax",
            normalize=True if fam.model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=aux_coef,
            jitter_eps=float(hf.get("router_jitter_noise", 0.0) or 0.0),
        )
    else:
        router = RouterConfig(
            top_k=top_k,
            score="sigmoid",
            normalize=bool(hf.get("norm_topk_prob", True)),
            n_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or hf.get("n_group") or 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            aux_free_bias=True,  # the family's e_score_correction_bias, moved by dynamoe's balancing rule
            aux_loss_coef=0.0,
        )
    shared = int(hf.get("n_shared_experts") or 0) if fam.model_type == "glm4_moe" else 0
    d_expert = int(hf[fam.expert_width_key])
    fields["moe"] = MoEConfig(
        num_experts=num_experts,
        d_expert=d_expert,
        activation="swiglu",
        num_shared_experts=shared,
        d_shared=d_expert if shared else None,
        router=router,
    )
    fields.update(_moe_placement(hf, fam, n_layers))
    return ModelConfig(**fields)


def _moe_placement(hf: dict, fam: Family, n_layers: int) -> dict:
    if fam.model_type == "glm4_moe":
        return {"moe_every": 1, "first_dense_layers": int(hf.get("first_k_dense_replace") or 0)}
    if fam.model_type == "qwen3_moe":
        step = int(hf.get("decoder_sparse_step") or 1)
        dense = set(hf.get("mlp_only_layers") or [])
        layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
        if layers == list(range(n_layers)):
            return {"moe_every": 1}
        return {"moe_layers": layers, "moe_every": 1}
    return {"moe_every": 1}


# --- export ------------------------------------------------------------------------------------


def choose_family(cfg: ModelConfig, requested: str | None = None) -> Family:
    """The family that holds ``cfg``: ``requested`` if given (checked), else the one its features
    name (sigmoid routing -> GLM-4-MoE, per-head QK-norm -> Qwen3-MoE, whole -> OLMoE, else Mixtral)."""
    if requested is not None:
        if requested not in FAMILIES:
            raise HFFormatError(f"--family: '{requested}' is not one of {', '.join(sorted(FAMILIES))}; fix: pick one")
        return FAMILIES[requested]
    moe = any(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if not moe:
        return FAMILIES["qwen3" if cfg.qk_norm == "per_head" else "llama"]
    if cfg.moe.router.score == "sigmoid" or cfg.moe.num_shared_experts:
        return FAMILIES["glm4_moe"]
    return FAMILIES[{"per_head": "qwen3_moe", "whole": "olmoe"}.get(cfg.qk_norm, "mixtral")]


def _cannot(family: Family, what: str, fix: str) -> HFFormatError:
    return HFFormatError(f"model: {what}, which a {family.model_type} checkpoint cannot hold; fix: {fix}")


def to_hf_config(cfg: ModelConfig, family: Family) -> dict:
    """The family's config.json for ``cfg``; anything the family cannot hold is refused by name."""
    import transformers

    f = family.model_type
    if cfg.kind != "decoder" or cfg.block != "modern":
        raise _cannot(family, f"kind {cfg.kind} with block {cfg.block}", "train a decoder with model.block: modern")
    if cfg.norm_kind != "rmsnorm" or cfg.position_kind != "rope":
        raise _cannot(family, f"norm {cfg.norm_kind} with {cfg.position_kind} positions", "keep rmsnorm and rope")
    if cfg.exits.enabled:
        raise _cannot(family, "early exits", "export a model without model.exits (its exit heads would be lost)")
    if cfg.depth.enabled:
        raise _cannot(family, f"depth mode {cfg.depth.mode}", "export a model without model.depth")
    if cfg.dropout:
        raise _cannot(family, f"dropout {cfg.dropout}", "set model.dropout: 0")
    moe, router = cfg.moe, cfg.moe.router
    moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    head_dim = cfg.attn_head_dim
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
    )
    want_qk = {"qwen3_moe": "per_head", "qwen3": "per_head", "olmoe": "whole"}.get(f, "none")
    if f == "glm4_moe":
        if cfg.qk_norm == "whole":
            raise _cannot(family, "qk_norm whole", "use qk_norm per_head or none")
        if cfg.out_bias:
            raise _cannot(family, "a bias on the attention output", "set model.out_bias: false")
    elif cfg.qk_norm != want_qk:
        raise _cannot(family, f"qk_norm {cfg.qk_norm} ({want_qk} in this family)", f"set model.qk_norm: {want_qk}")
    elif cfg.qkv_bias != cfg.out_bias:
        raise _cannot(family, "biases on q/k/v but not the output (or the reverse)", "use both or neither")
    if cfg.rope_fraction != 1.0 and f != "glm4_moe":
        raise _cannot(family, f"rope_fraction {cfg.rope_fraction}", "set model.rope_fraction: 1.0")
    if cfg.clip_qkv is not None and f != "olmoe":
        raise _cannot(family, "clip_qkv", "remove model.clip_qkv")
    if not family.moe:
        if moe_layers:
            raise _cannot(family, "MoE layers", "export to an MoE family with --family")
        cls = transformers.LlamaConfig if f == "llama" else transformers.Qwen3Config
        extra = {"head_dim": head_dim, "attention_bias": cfg.qkv_bias}
        return _finish(cls(intermediate_size=cfg.d_ff, **common, **extra), family)
    if not moe_layers:
        raise _cannot(family, "no MoE layer", "export with --family llama or qwen3")
    if moe.activation != "swiglu":
        raise _cannot(family, f"{moe.activation} experts", "train with model.moe.activation: swiglu")
    if router.kind != "token_choice" or router.capacity_factor is not None:
        raise _cannot(family, "expert-choice or capacity-limited routing", "use dropless token choice")
    if router.jitter_eps and f != "mixtral":
        raise _cannot(family, "router jitter", "set model.moe.router.jitter_eps: 0")
    sigmoid = f == "glm4_moe"
    if (router.score == "sigmoid") != sigmoid:
        raise _cannot(
            family, f"{router.score} routing", "export to glm4_moe for sigmoid routing, else a softmax family"
        )
    if not sigmoid and (router.n_group > 1 or router.routed_scaling_factor != 1.0 or router.aux_free_bias):
        raise _cannot(
            family,
            "group-limited selection, a routed scaling factor or a selection bias",
            "export to glm4_moe (--family glm4_moe)",
        )
    if moe.num_shared_experts and (not sigmoid or (moe.d_shared or moe.d_expert) != moe.d_expert):
        raise _cannot(family, "shared experts of another width than the routed ones", "export to glm4_moe")
    if f == "mixtral" and router.renormalize is not True:
        raise _cannot(family, "top-k weights left unnormalised", "set model.moe.router.normalize: true")
    dense_layers = [i for i in range(cfg.n_layers) if i not in moe_layers]
    if dense_layers and f in ("mixtral", "olmoe"):
        raise _cannot(family, f"dense FFN layers {dense_layers}", "export to qwen3_moe or glm4_moe")
    if f == "glm4_moe" and moe_layers != list(range(len(dense_layers), cfg.n_layers)):
        raise _cannot(family, f"dense layers {dense_layers} not all before the MoE layers", "export to qwen3_moe")
    experts = {
        "mixtral": dict(num_local_experts=moe.num_experts, intermediate_size=moe.d_expert),
        "olmoe": dict(num_experts=moe.num_experts, intermediate_size=moe.d_expert, clip_qkv=cfg.clip_qkv),
        "qwen3_moe": dict(
            num_experts=moe.num_experts,
            moe_intermediate_size=moe.d_expert,
            intermediate_size=cfg.d_ff,
            mlp_only_layers=dense_layers,
            decoder_sparse_step=1,
            norm_topk_prob=router.renormalize,
            head_dim=head_dim,
        ),
        "glm4_moe": dict(
            n_routed_experts=moe.num_experts,
            moe_intermediate_size=moe.d_expert,
            intermediate_size=cfg.d_ff,
            n_shared_experts=moe.num_shared_experts,
            first_k_dense_replace=len(dense_layers),
            n_group=router.n_group,
            topk_group=router.topk_group or router.n_group,
            routed_scaling_factor=router.routed_scaling_factor,
            norm_topk_prob=router.renormalize,
            partial_rotary_factor=cfg.rope_fraction,
            attention_bias=cfg.qkv_bias,
            use_qk_norm=cfg.qk_norm == "per_head",
            head_dim=head_dim,
        ),
    }[f]
    if f == "olmoe":
        experts["norm_topk_prob"] = router.renormalize
    if f in ("mixtral", "olmoe", "qwen3_moe"):
        experts["router_aux_loss_coef"] = router.aux_loss_coef
    if f in ("mixtral",):
        experts["router_jitter_noise"] = router.jitter_eps
    if f != "glm4_moe":
        experts["attention_bias"] = cfg.qkv_bias
    cls = {
        "mixtral": transformers.MixtralConfig,
        "olmoe": transformers.OlmoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "glm4_moe": transformers.Glm4MoeConfig,
    }[f]
    return _finish(cls(num_experts_per_tok=router.top_k, **common, **experts), family)


def _finish(hf_config, family: Family) -> dict:
    hf_config.architectures = [family.architecture]
    return hf_config.to_dict()
