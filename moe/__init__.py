"""dynamoe's model library: configs, routers, experts, the MoE layer, backbones, data and training.

Model code here is single-device PyTorch; DeepSpeed is imported only by the trainer, lazily.
"""

from dynamoe.config import ConfigError, RunConfig, load_config
from dynamoe.layers.moe_layer import MoEAux, MoELayer
from dynamoe.models.transformer import ModelOutput, TransformerClassifier, TransformerLM, build_model

__all__ = [
    "ConfigError",
    "ModelOutput",
    "MoEAux",
    "MoELayer",
    "RunConfig",
    "TransformerClassifier",
    "TransformerLM",
    "build_model",
    "load_config",
]
