"""A fine-tuned pretrained encoder (``model.kind: hf_encoder``) out as its family's sequence
classifier: ``AutoModelForSequenceClassification.from_pretrained(OUT)`` loads it with the same
logits as dynamoe's final head, with the run's tokenizer and label names. Early-exit heads, which
the family's classifier cannot hold, go to a file of their own beside it (``exit_heads.safetensors``
with ``exit_heads.json``), never dropped.

The final head maps onto the family's classifier when it pools the first token through the
checkpoint's pooler (``model.pooling: pooler``, the default for checkpoints with one): BERT-style
models take the head's dense + tanh as ``pooler`` and its output layer as ``classifier``;
RoBERTa-style ones keep both in their classification head (``classifier.dense``,
``classifier.out_proj``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamoe.config import ModelConfig
from dynamoe.interop.hf_files import HFFormatError, copy_into, staged_folder

EXIT_HEADS_FILE = "exit_heads.safetensors"


@dataclass(frozen=True)
class ExportedEncoder:
    path: Path
    architecture: str
    exit_heads: int


def export_encoder(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out: Path,
    *,
    tokenizer: Path | None = None,
    labels: dict | None = None,
    provenance: dict | None = None,
) -> ExportedEncoder:
    """Write a checkpoint's hf_encoder model (global-form ``state``) as the family's classifier."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    from dynamoe.models.hf_encoder import resolve_pretrained

    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    if moe:
        raise HFFormatError(
            f"layers {moe} of this encoder are MoE layers (upcycled), and the family's sequence classifier has only "
            "dense FFNs; fix: export it in dynamoe's format (`moe export RUN OUT.safetensors`), which "
            "train.init_from, `moe eval` and the early-exit evaluation read"
        )
    if cfg.pooling not in ("pooler", "auto") or "head.hidden.0.weight" not in state:
        raise HFFormatError(
            f"model.pooling: {cfg.pooling}: the family's sequence classifier pools the first token through its pooler, "
            "so this head has no place there; fix: fine-tune with model.pooling: pooler (or auto)"
        )
    if any(k.startswith("encoder.pooler.") for k in state):
        raise HFFormatError(
            "the run kept the encoder's own pooler beside its head (trained with mean or first pooling); "
            "fix: fine-tune with model.pooling: pooler"
        )
    num_labels = int(state["head.out.weight"].shape[0])
    source = resolve_pretrained(cfg.pretrained)
    kwargs = {"num_labels": num_labels}
    if labels:
        names = labels.get("names") or labels.get("id2label")
        if isinstance(names, list):
            kwargs["id2label"] = {i: str(n) for i, n in enumerate(names)}
            kwargs["label2id"] = {str(n): i for i, n in enumerate(names)}
    model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    base = model.base_model
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    head = {
        "dense.weight": state["head.hidden.0.weight"],
        "dense.bias": state["head.hidden.0.bias"],
        "out.weight": state["head.out.weight"],
        "out.bias": state["head.out.bias"],
    }
    classifier = model.classifier
    if isinstance(classifier, torch.nn.Linear) and getattr(base, "pooler", None) is not None:  # BERT style
        targets = {
            "dense.weight": base.pooler.dense.weight,
            "dense.bias": base.pooler.dense.bias,
            "out.weight": classifier.weight,
            "out.bias": classifier.bias,
        }
    elif hasattr(classifier, "dense") and hasattr(classifier, "out_proj"):  # RoBERTa style
        targets = {
            "dense.weight": classifier.dense.weight,
            "dense.bias": classifier.dense.bias,
            "out.weight": classifier.out_proj.weight,
            "out.bias": classifier.out_proj.bias,
        }
    else:
        raise HFFormatError(
            f"model.pretrained: {type(model).__name__}'s classifier is neither BERT's (pooler + linear) nor "
            "RoBERTa's (dense + out_proj); fix: export with the dynamoe format (moe export without --format)"
        )
    result = base.load_state_dict(encoder_state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("pooler.")]
    if missing or result.unexpected_keys:
        raise HFFormatError(
            f"the run's encoder does not fit '{cfg.pretrained}' (missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}); fix: export with the checkpoint the run fine-tuned"
        )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(head[key])
    exits = sorted({int(k.split(".")[1]) for k in state if k.startswith("exit_heads.")})
    with staged_folder(Path(out)) as tmp:
        model.save_pretrained(str(tmp))
        copy_into(tmp, {"tokenizer": tokenizer} if tokenizer is not None else {})
        if exits:
            save_file(
                {k: v.contiguous() for k, v in state.items() if k.startswith("exit_heads.")}, str(tmp / EXIT_HEADS_FILE)
            )
            meta = {
                "layers": list(cfg.exits.layers),
                "pooling": (
                    "mean over the real tokens (attention_mask)" if cfg.exits.pooling == "mean" else "first token"
                )
                + ", through each head's own dense + tanh",
                "policy": cfg.exits.policy,
                "thresholds": cfg.exits.thresholds,
                "head": "exit_heads.<j>.hidden.0 (dense + tanh), dropout, exit_heads.<j>.out",
            }
            (tmp / "exit_heads.json").write_text(json.dumps(meta, indent=2))
        (tmp / "dynamoe.json").write_text(json.dumps(provenance or {}))
    return ExportedEncoder(Path(out), type(model).__name__, len(exits))
