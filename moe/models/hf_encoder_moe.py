"""MoE layers in a pretrained BERT-family encoder: chosen layers' FFNs become routed experts.

A BERT-family layer's feed-forward is ``intermediate`` (dense d -> F with bias, then GELU) and
``output`` (dense F -> d with bias, dropout, then LayerNorm over the residual sum). An MoE layer
replaces the two dense products and the activation between them: ``intermediate`` becomes
:class:`EncoderMoEFFN` (router, experts with biases, combine: d -> d) and ``output.dense`` an
identity, so the family's own code still applies dropout, the residual and the LayerNorm exactly
as before. The experts start as copies of the pretrained FFN (``train.upcycle``,
``dynamoe.models.upcycle``), which makes the upcycled encoder give the dense one's output at
initialisation wherever the upcycling plan says it is exact.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dynamoe.config import ConfigError, ModelConfig
from dynamoe.layers.moe_layer import MoEAux, MoELayer

LAYERS = "encoder.encoder.layer"  # the encoder's layers in HFExitClassifier's state dict

# transformers' names for the activation dynamoe's experts compute (erf GELU).
_GELU = ("gelu",)


def encoder_ffn_slot(i: int) -> dict[str, str]:
    """Layer ``i``'s dense FFN in HFExitClassifier's state dict, and where its MoE layer goes."""
    base = f"{LAYERS}.{i}."
    return {
        "w_in": base + "intermediate.dense.weight",
        "w_out": base + "output.dense.weight",
        "b_in": base + "intermediate.dense.bias",
        "b_out": base + "output.dense.bias",
        "moe_prefix": base + "intermediate.moe.",
    }


class EncoderMoEFFN(nn.Module):
    """In place of a layer's ``intermediate``: the MoE FFN (d -> d), whose record of the last call
    the model collects after the layer ran (the family's layer returns hidden states only)."""

    def __init__(self, cfg: ModelConfig, block_index: int):
        super().__init__()
        self.moe = MoELayer(cfg.moe, cfg.d_model, bias=True)
        self.moe.block_index = block_index
        self.last_aux: MoEAux | None = None

    def forward(self, hidden):
        y, self.last_aux = self.moe(hidden)
        return y

    def take_aux(self) -> MoEAux:
        aux, self.last_aux = self.last_aux, None
        return aux


def check_ffn_structure(layer: nn.Module, i: int, cfg: ModelConfig, hidden_act) -> None:
    """ConfigError naming the module unless layer ``i`` has the FFN the MoE layer replaces."""
    where = f"{LAYERS}.{i}"
    intermediate = getattr(layer, "intermediate", None)
    output = getattr(layer, "output", None)
    for module, name, shape in (
        (getattr(intermediate, "dense", None), "intermediate.dense", (cfg.d_ff, cfg.d_model)),
        (getattr(output, "dense", None), "output.dense", (cfg.d_model, cfg.d_ff)),
    ):
        if not isinstance(module, nn.Linear) or module.bias is None or tuple(module.weight.shape) != shape:
            raise ConfigError(
                f"model.moe_every: the FFN of '{cfg.pretrained}' is not one the upcycler recognises: {where}.{name} "
                f"is {type(module).__name__ if module is not None else 'missing'}, not a Linear with bias "
                f"[{shape[0]}, {shape[1]}] (BERT's intermediate.dense -> GELU -> output.dense); fix: use a "
                "BERT-family encoder (BERT, RoBERTa, ELECTRA, MiniLM), or model.moe_every: 0"
            )
    if hidden_act not in _GELU:
        raise ConfigError(
            f"model.moe_every: the FFN of '{cfg.pretrained}' at {where}.intermediate uses activation "
            f"{hidden_act!r} (the config's hidden_act), and dynamoe's experts compute erf GELU; fix: use an "
            "encoder with hidden_act 'gelu', or model.moe_every: 0"
        )
    if cfg.moe.activation != "gelu":
        raise ConfigError(
            f"model.moe.activation: {cfg.moe.activation!r}, but the pretrained FFNs at {where} are GELU; "
            "fix: set model.moe.activation: gelu"
        )


def install_moe_ffns(encoder: nn.Module, cfg: ModelConfig) -> None:
    """Put an MoE FFN (experts not yet initialised from anything: upcycling or a checkpoint fills
    them) in place of the dense FFN of every MoE layer of ``cfg``."""
    hidden_act = getattr(encoder.config, "hidden_act", None)
    for i, layer in enumerate(encoder.encoder.layer):
        if not cfg.is_moe_layer(i):
            continue
        check_ffn_structure(layer, i, cfg, hidden_act)
        layer.intermediate = EncoderMoEFFN(cfg, i)
        layer.output.dense = nn.Identity()


def moe_ffn(layer: nn.Module) -> EncoderMoEFFN | None:
    """The layer's MoE FFN, or None for a dense layer."""
    return layer.intermediate if isinstance(layer.intermediate, EncoderMoEFFN) else None


def dense_encoder(cfg: ModelConfig, *, seed: int):
    """(config, model) of the run's pretrained encoder with dense FFNs everywhere: what upcycling
    starts from. Its new heads are drawn from ``seed`` so that every rank builds the same ones."""
    from dynamoe.models.hf_encoder import HFExitClassifier

    dense_cfg = dataclasses.replace(cfg, moe_every=0, moe_layers=None, first_dense_layers=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dense_cfg, HFExitClassifier(dense_cfg)
