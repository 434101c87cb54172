"""The models: Transformer decoder and encoder, the ResNet-style CNN, pretrained Hugging Face
encoders, all built from a :class:`~dynamoe.config.ModelConfig` by :func:`build_model`."""

from dynamoe.models.base import DynamoeModel
from dynamoe.models.build import MODEL_KINDS, build_model
from dynamoe.models.cnn import ResNetExits
from dynamoe.models.hf_encoder import HFExitClassifier
from dynamoe.models.output import ModelOutput
from dynamoe.models.transformer import TransformerClassifier, TransformerLM

__all__ = [
    "MODEL_KINDS",
    "DynamoeModel",
    "HFExitClassifier",
    "ModelOutput",
    "ResNetExits",
    "TransformerClassifier",
    "TransformerLM",
    "build_model",
]
