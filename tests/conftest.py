import os

# DeepSpeed picks its accelerator at import: make the CPU choice before any test imports it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util

import pytest
import torch

# Triton fixes interpreter mode at its first import, and other libraries import it too (transformers'
# BERT modelling code does): without a GPU, import it in interpreter mode before anything else, so
# the Triton kernel tests can run theirs on the CPU whatever test ran first. The environment variable
# is restored, so every other test keeps the reference backend (kernels/backend.py reads it per call).
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    finally:
        if _saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _saved


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
