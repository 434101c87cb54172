"""Sparse upcycling: a dense Transformer's FFNs become MoE layers whose experts start from them.

The run's model config says where MoE sits and what the experts are; the dense model (an exported
file: ``moe import`` of a Llama or Qwen3 checkpoint, or ``moe export`` of a dense dynamoe run; for
a pretrained encoder, the encoder itself) must be the same model with dense FFNs everywhere.
Everything but the upcycled FFNs is copied as it is.

A dense FFN is f(x) = W_out phi(W_in x) over F hidden units (SwiGLU: unit i is
silu(gate_i . x) * (up_i . x)); the units are independent, so f is the sum of the FFNs over any
partition of them. With granularity g, part p is units [p F/g, (p + 1) F/g), and routed expert
e = c g + p is part p of copy c (``num_experts / g`` copies). Each expert's down projection is
multiplied by ``output_scale`` s; optional multiplicative noise and Drop-Upcycling's partial
re-initialisation make the copies differ. An FFN with biases (a BERT-family encoder's) splits the
same way: part p keeps its units' input bias and adds 1/g of the output bias, which s scales with
the down projection, so everything below holds for it unchanged.

When the upcycled model equals the dense one at initialisation (``plan(...).exact``): every token
gets k experts with combine weights w_j, y = s * sum_j w_j f_{p(j)}.
- g = 1 with renormalised top-k: sum_j w_j = rho (``routed_scaling_factor``) for any router, so
  s = 1 / rho gives y = f whatever the router's weights;
- otherwise a zero router makes every score tie; ties go to the lower expert, so each token takes
  experts 0..k-1, which are k / g whole copies when g divides k, all with the same weight w0
  (1/k renormalised, else the score of a zero logit, 1/E softmax or 1/2 sigmoid, times rho), and
  s = g / (k w0) gives y = f;
- with the dense FFN kept as the shared expert, s = 0 zeroes the routed experts' output: exact for
  any router, noise or re-initialisation (their down projections learn from the first step; their
  input projections and the router from the second).
Noise, re-initialisation, a scale other than these, expert-choice routing and a capacity (which
drops assignments) make the start inexact. With a zero router every token goes to the same k
experts until the balancing loss (or the aux-free bias) spreads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dynamoe.config import ConfigError, ModelConfig, UpcycleConfig

DEFAULT_ROUTER_STD = 0.02  # dynamoe's own router initialisation

# The settings that decide the dense model's function: they must be the same in the dense model
# and the run's model. (label, attribute): properties resolve the block's defaults.
_SAME = (
    ("kind", "kind"),
    ("block", "block"),
    ("d_model", "d_model"),
    ("n_layers", "n_layers"),
    ("n_heads", "n_heads"),
    ("d_ff", "d_ff"),
    ("vocab_size", "vocab_size"),
    ("norm", "norm_kind"),
    ("norm_eps", "norm_eps"),
    ("position", "position_kind"),
    ("rope_theta", "rope_theta"),
    ("rope_fraction", "rope_fraction"),
    ("n_kv_heads", "kv_heads"),
    ("head_dim", "attn_head_dim"),
    ("qk_norm", "qk_norm"),
    ("qkv_bias", "qkv_bias"),
    ("out_bias", "out_bias"),
    ("clip_qkv", "clip_qkv"),
    ("tie_embeddings", "tie_embeddings"),
)


@dataclass(frozen=True)
class UpcyclePlan:
    moe_layers: tuple[int, ...]  # the layers whose dense FFN becomes an MoE layer
    copies: int  # num_experts / granularity
    granularity: int
    output_scale: float  # the routed experts' down projections are multiplied by this
    router_init_std: float  # 0: zero routers
    exact: bool  # the upcycled model gives the dense model's output at initialisation
    why: str  # why it is (or is not) exact

    def describe(self) -> str:
        layers = ", ".join(map(str, self.moe_layers))
        split = f"{self.copies} copies x {self.granularity} parts" if self.granularity > 1 else "copies"
        return (
            f"upcycled the dense FFNs of layers {layers} into {self.copies * self.granularity} experts each "
            f"({split}), expert output scale {self.output_scale:g}, router init std {self.router_init_std:g}: "
            f"{'exact' if self.exact else 'not exact'} at initialisation ({self.why})"
        )


def _zero_router_weight(cfg: ModelConfig) -> float:
    """The combine weight every selected expert gets from a zero router (all logits 0)."""
    r, E = cfg.moe.router, cfg.moe.num_experts
    if r.renormalize:
        w = 1.0 / r.top_k
    else:
        w = 1.0 / E if r.score == "softmax" else 0.5
    return w * r.routed_scaling_factor


def plan(cfg: ModelConfig, up: UpcycleConfig) -> UpcyclePlan:
    """The upcycling of the run's model ``cfg``: its MoE layers, the resolved scale and router
    initialisation, and whether the start is exact."""
    moe, r = cfg.moe, cfg.moe.router
    g, k = up.granularity, r.top_k
    layers = tuple(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i))
    any_router = g == 1 and r.renormalize  # every selection of whole copies sums to rho
    if up.keep_dense_as_shared:
        exact_scale = 0.0
    elif any_router:
        exact_scale = 1.0 / r.routed_scaling_factor
    else:
        exact_scale = g / (k * _zero_router_weight(cfg))
    scale = exact_scale if up.output_scale is None else up.output_scale
    silent = up.keep_dense_as_shared and scale == 0.0  # the routed experts add nothing
    needs_zero_router = not silent and not any_router
    std = up.router_init_std
    if std is None:
        std = 0.0 if needs_zero_router else DEFAULT_ROUTER_STD
    if silent:
        exact, why = True, "the shared expert is the dense FFN and the routed experts' down projections are zero"
    elif scale != exact_scale:
        exact, why = False, f"output_scale {scale:g}; {exact_scale:g} would be exact"
    elif up.noise or up.reinit_fraction:
        exact, why = False, "noise or re-initialisation makes the copies differ from the dense FFN"
    elif r.kind == "expert_choice":
        exact, why = False, "expert-choice routing gives tokens any number of experts"
    elif r.capacity_factor is not None:
        exact, why = False, "a capacity drops assignments"
    elif up.keep_dense_as_shared:
        exact, why = False, "the routed experts add to the shared dense FFN"
    elif any_router:
        exact, why = True, "every token's top-k copies of the dense FFN have combine weights summing to 1 / scale"
    elif std != 0.0:
        exact, why = False, "a random router picks parts of different copies; router_init_std: 0 is exact"
    elif k % g:
        exact, why = False, f"top_k={k} experts are not whole copies of the dense FFN split into {g} parts"
    else:
        exact, why = True, "a zero router sends every token to the first k / granularity whole copies, equal weights"
    return UpcyclePlan(layers, moe.num_experts // g, g, float(scale), float(std), exact, why)


def check_source(source: ModelConfig, cfg: ModelConfig, *, name: str = "the dense model") -> None:
    """ConfigError unless ``source`` is the run's model ``cfg`` with dense FFNs in every layer."""
    where = f"train.init_from: '{name}'"
    source_moe = [i for i in range(source.n_layers) if source.is_moe_layer(i)]
    if source_moe:
        raise ConfigError(
            f"{where} has MoE FFNs in layers {source_moe}, and upcycling starts from a dense model; "
            "fix: pass a dense model (model.moe_every: 0), such as one `moe import` writes from a Llama or Qwen3 "
            "checkpoint, or train it from that file without train.upcycle"
        )
    diff = []
    for label, attr in _SAME:
        there, here = getattr(source, attr), getattr(cfg, attr)
        if there != here:
            diff.append(f"model.{label}: {there!r} there, {here!r} here")
    if source.moe.activation != cfg.moe.activation:
        diff.append(f"model.moe.activation: {source.moe.activation!r} there, {cfg.moe.activation!r} here")
    if diff:
        raise ConfigError(
            f"{where} is not this model with dense FFNs ({'; '.join(diff[:3])}); fix: use the dense model's "
            "settings in the model section and change only where MoE sits (moe_every, first_dense_layers, "
            "moe_layers) and model.moe"
        )


@dataclass(frozen=True)
class FFNSlot:
    """Where one layer's dense FFN is in a model's state dict, and where its MoE layer goes."""

    w_in: str
    w_out: str
    b_in: str | None  # the FFN's biases (a BERT-family encoder's FFNs have them)
    b_out: str | None
    moe_prefix: str

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(k for k in (self.w_in, self.w_out, self.b_in, self.b_out) if k is not None)


def ffn_slot(cfg: ModelConfig, i: int) -> FFNSlot:
    """Layer ``i``'s FFN: dynamoe's own blocks (bias-free, the MoE layer in its place), or a
    pretrained encoder's (``dynamoe.models.hf_encoder_moe``)."""
    if cfg.kind == "hf_encoder":
        from dynamoe.models.hf_encoder_moe import encoder_ffn_slot

        return FFNSlot(**encoder_ffn_slot(i))
    prefix = f"blocks.{i}.ffn."
    return FFNSlot(prefix + "w_in.weight", prefix + "w_out.weight", None, None, prefix)


def _parts(w_in: torch.Tensor, w_out: torch.Tensor, activation: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense FFN (w_in [F or 2F, D], w_out [D, F]) as g experts over consecutive hidden units:
    w1 [g, D, F/g or 2F/g] ([gate | up] columns for SwiGLU), w2 [g, F/g, D]."""
    F = w_out.shape[1]
    f = F // g
    units = [slice(p * f, (p + 1) * f) for p in range(g)]
    if activation == "swiglu":
        gate, up = w_in[:F], w_in[F:]
        w1 = [torch.cat((gate[u].t(), up[u].t()), dim=1) for u in units]
    else:
        w1 = [w_in[u].t() for u in units]
    w2 = [w_out[:, u].t() for u in units]
    return torch.stack(w1), torch.stack(w2)


def _bias_parts(b_in: torch.Tensor, b_out: torch.Tensor, activation: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense FFN's biases split as :func:`_parts` splits its units: b1 [g, F/g or 2F/g] follows
    the units; the output bias is added once by the whole FFN, so each of the g parts adds b_out / g."""
    F = b_in.shape[0] // (2 if activation == "swiglu" else 1)
    f = F // g
    if activation == "swiglu":
        b1 = [torch.cat((b_in[p * f : (p + 1) * f], b_in[F + p * f : F + (p + 1) * f])) for p in range(g)]
    else:
        b1 = [b_in[p * f : (p + 1) * f] for p in range(g)]
    return torch.stack(b1), (b_out / g).expand(g, -1)


def _split_units(b_in: torch.Tensor | None, activation: str) -> list[torch.Tensor]:
    """The input bias as the matrices it belongs to (gate and up apart for SwiGLU); none without one."""
    if b_in is None:
        return []
    return list(b_in.chunk(2)) if activation == "swiglu" else [b_in]


def _normal_like(t: torch.Tensor, mean: float, std: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(t.shape, generator=gen) * std + mean).to(t.dtype)


@torch.no_grad()
def upcycle_ffn(
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    cfg: ModelConfig,
    up: UpcycleConfig,
    gen: torch.Generator,
    p: UpcyclePlan | None = None,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One dense FFN's weights (and biases, for an FFN that has them) as the MoE layer's (names
    under the MoE layer)."""
    p = p or plan(cfg, up)
    activation, g = cfg.moe.activation, up.granularity
    F = w_out.shape[1]
    f = F // g
    w1_part, w2_part = _parts(w_in.float(), w_out.float(), activation, g)
    w1 = w1_part.repeat(p.copies, 1, 1)  # expert c * g + p is part p of copy c
    w2 = w2_part.repeat(p.copies, 1, 1)
    biased = b_in is not None
    if biased:
        b1_part, b2_part = _bias_parts(b_in.float(), b_out.float(), activation, g)
        b1, b2 = b1_part.repeat(p.copies, 1), b2_part.repeat(p.copies, 1)
    if up.noise:
        w1 = w1 * (1 + up.noise * torch.randn(w1.shape, generator=gen))
        w2 = w2 * (1 + up.noise * torch.randn(w2.shape, generator=gen))
    n_reinit = round(up.reinit_fraction * f)
    if n_reinit:
        # Drop-Upcycling: each expert re-draws its own random set of hidden units from the statistics
        # of the dense matrix they came from (gate, up and down apart).
        sources = [w_in[:F], w_in[F:]] if activation == "swiglu" else [w_in]
        stats = [(float(m.float().mean()), float(m.float().std())) for m in sources]
        down = (float(w_out.float().mean()), float(w_out.float().std()))
        bias_stats = [(float(b.float().mean()), float(b.float().std())) for b in _split_units(b_in, activation)]
        for e in range(w1.shape[0]):
            idx = torch.randperm(f, generator=gen)[:n_reinit]
            for j, (mean, std) in enumerate(stats):
                cols = idx + j * f
                w1[e][:, cols] = _normal_like(w1[e][:, cols], mean, std, gen)
                if biased:
                    b1[e][cols] = _normal_like(b1[e][cols], *bias_stats[j], gen)
            w2[e][idx] = _normal_like(w2[e][idx], *down, gen)
    w2 = w2 * p.output_scale
    E, D = cfg.moe.num_experts, cfg.d_model
    router = torch.zeros(E, D) if p.router_init_std == 0 else torch.randn(E, D, generator=gen) * p.router_init_std
    out = {
        "router.gate.weight": router,
        "router.expert_bias": torch.zeros(E),
        "experts.w1_EDF": w1,
        "experts.w2_EFD": w2,
    }
    if biased:
        # The output bias is part of each expert's output, so the output scale multiplies it too.
        out["experts.b1_EF"], out["experts.b2_ED"] = b1, b2 * p.output_scale
    if up.keep_dense_as_shared:
        out["shared.w_in.weight"] = w_in.float().clone()
        out["shared.w_out.weight"] = w_out.float().clone()
        if biased:
            out["shared.w_in.bias"], out["shared.w_out.bias"] = b_in.float().clone(), b_out.float().clone()
    dtype = w_in.dtype
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def upcycle_state(
    source: ModelConfig,
    source_state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    up: UpcycleConfig,
    *,
    seed: int = 0,
    name: str = "the dense model",
) -> dict[str, torch.Tensor]:
    """The state dict of the run's model ``cfg`` upcycled from the dense model (``source``,
    ``source_state``); every name and shape is checked against ``cfg``'s model (built on the meta
    device), so what does not fit is a ConfigError here, not a failed load later."""
    from dynamoe.models.build import build_model

    if cfg.vocab_size is None:  # not known from data (e.g. `moe upcycle`): the dense model's
        cfg = dataclasses.replace(cfg, vocab_size=source.vocab_size)
    check_source(source, cfg, name=name)
    p = plan(cfg, up)
    gen = torch.Generator().manual_seed(seed)
    slots = {i: ffn_slot(cfg, i) for i in p.moe_layers}
    replaced = {key for slot in slots.values() for key in slot.sources}
    state: dict[str, torch.Tensor] = {k: v for k, v in source_state.items() if k not in replaced}
    for i, slot in slots.items():
        absent = [key for key in slot.sources if key not in source_state]
        if absent:
            raise ConfigError(
                f"train.init_from: '{name}' has no dense FFN where layer {i}'s should be ({absent[0]} missing); "
                "fix: upcycle a dense model of this kind (model.moe_every: 0 there)"
            )
        weights = [source_state[key] for key in slot.sources]
        biases = dict(b_in=weights[2], b_out=weights[3]) if slot.b_in else {}
        for key, value in upcycle_ffn(weights[0], weights[1], cfg, up, gen, p, **biases).items():
            state[slot.moe_prefix + key] = value
    with torch.device("meta"):
        target = build_model(cfg).state_dict()
    for slot in slots.values():  # an expert-choice router has no selection bias
        if slot.moe_prefix + "router.expert_bias" not in target:
            state.pop(slot.moe_prefix + "router.expert_bias")
    expected = {k: tuple(v.shape) for k, v in target.items()}
    got = {k: tuple(v.shape) for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(state))
    unplaced = sorted(set(state) - set(expected))
    wrong = [f"{k} {got[k]} there, {expected[k]} here" for k in sorted(got) if got[k] != expected[k]]
    problems = [f"{k} missing" for k in missing[:3]] + [f"{k} has no place here" for k in unplaced[:3]] + wrong[:3]
    if problems:
        raise ConfigError(
            f"train.init_from: '{name}' does not fit this run's model after upcycling ({'; '.join(problems[:3])}); "
            "fix: use the dense model's settings in the model section (early exits, depth modes and learned "
            "positions have weights of their own) and change only where MoE sits and model.moe"
        )
    return {k: state[k] for k in expected}


def upcycle_model(
    source: ModelConfig,
    source_model: torch.nn.Module,
    cfg: ModelConfig,
    up: UpcycleConfig,
    *,
    seed: int = 0,
    name: str = "the dense model",
):
    """(the run's model config with its vocabulary filled, the upcycled model in eval mode)."""
    from dynamoe.models.build import build_model

    if cfg.vocab_size is None:
        cfg = dataclasses.replace(cfg, vocab_size=source.vocab_size)
    state = upcycle_state(source, source_model.state_dict(), cfg, up, seed=seed, name=name)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    return cfg, model.eval()
