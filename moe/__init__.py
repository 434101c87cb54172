"""dynamoe: sparse Mixture-of-Experts and conditional-compute networks, trained on DeepSpeed.

The packages, from the bottom up: ``kernels`` (routing, dispatch, grouped GEMMs), ``layers`` (the
MoE layer: router, experts, dispatcher, expert parallelism, load statistics), ``depth``
(halting, skipping, mixture-of-depths), ``exits`` (exit heads and policies, multi-exit models,
calibration), ``models`` (backbones and ``build_model``), ``compute`` (FLOP formulas and the
executed-FLOPs ledger), ``data``, ``training`` (trainer, DeepSpeed, checkpoints, metrics),
``launch`` (the ``moe`` command, Ray) and ``evals``. Model code is single-device PyTorch; DeepSpeed
and Ray are imported by ``training`` and ``launch`` only, lazily.
"""

from dynamoe.config import ConfigError, ModelConfig, MoEConfig, RouterConfig, RunConfig, load_config
from dynamoe.layers.moe_layer import MoEAux, MoELayer
from dynamoe.models import ModelOutput, TransformerClassifier, TransformerLM, build_model

__all__ = [
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "RouterConfig",
    "RunConfig",
    "TransformerClassifier",
    "TransformerLM",
    "build_model",
    "load_config",
]
