"""dynamoe's model library: configs, routers, experts, the MoE layer, backbones, data and training.

Model code here is single-device PyTorch; DeepSpeed is imported only by the trainer, lazily.
"""

from moe.config import ConfigError, RunConfig, load_config
from moe.layer import MoEAux, MoELayer
from moe.transformer import ModelOutput, TransformerClassifier, TransformerLM, build_model

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
