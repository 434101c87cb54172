"""``build_model``: the model a :class:`~dynamoe.config.ModelConfig` describes."""

from __future__ import annotations

from dynamoe.config import ModelConfig
from dynamoe.models.base import DynamoeModel
from dynamoe.models.cnn import ResNetExits
from dynamoe.models.hf_encoder import HFExitClassifier
from dynamoe.models.transformer import TransformerClassifier, TransformerLM

MODEL_KINDS: dict[str, type[DynamoeModel]] = {
    "decoder": TransformerLM,
    "encoder": TransformerClassifier,
    "hf_encoder": HFExitClassifier,
    "cnn": ResNetExits,
}


def build_model(cfg: ModelConfig) -> DynamoeModel:
    if cfg.kind not in MODEL_KINDS:
        raise ValueError(f"unknown model.kind {cfg.kind!r}; fix: use one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[cfg.kind](cfg)
