"""What ``moe generate`` reads from a run folder, cheapest first: the prompts, the model config
(``config.yaml``), the tokenizer (``tokenizer/``), and only then the weights, so every bad request
is refused before anything slow is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dynamoe.generation.sampling import GenerationError


@dataclass(frozen=True)
class RunSource:
    run_dir: Path  # the folder holding config.yaml and tokenizer/
    weights: Path  # what load_model reads: the run folder (newest checkpoint) or one checkpoint
    model_cfg: object  # ModelConfig
    data_tokenizer: str  # data.tokenizer of the run ("char" or a transformers name)


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts of ``--prompt`` (each one) and ``--prompts-file`` (one a line, blank lines skipped)."""
    texts = list(prompts or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise GenerationError(f"prompts file '{path}' does not exist; fix: pass a text file, one prompt a line")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise GenerationError(
                f"prompts file '{path}' holds no prompt (it is empty or blank); fix: write one prompt a line"
            )
        texts += lines
    if not texts:
        raise GenerationError("nothing to continue; fix: give --prompt TEXT or --prompts-file FILE")
    return texts


def resolve_run(source: str | Path) -> RunSource:
    """The run folder behind ``source`` (a run folder or one of its checkpoint folders) and its
    model config, read from ``config.yaml`` without touching the weights."""
    import yaml

    from dynamoe.config import ModelConfig, from_dict
    from dynamoe.training.checkpoint import is_checkpoint_folder

    source = Path(source)
    if source.is_file():
        raise GenerationError(
            f"'{source}' is a file; moe generate reads a run folder (its config, tokenizer and checkpoints); "
            "fix: pass the run folder the model was trained in"
        )
    run_dir = source.parent.parent if is_checkpoint_folder(source) else source
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise GenerationError(
            f"'{run_dir}' has no config.yaml, so it is not a run folder; fix: pass the folder `moe train` "
            "wrote (runs/<config name> by default) or one of its checkpoints/step_* folders"
        )
    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    model_cfg = from_dict(ModelConfig, data.get("model") or {}, "model")
    return RunSource(run_dir, source, model_cfg, (data.get("data") or {}).get("tokenizer", "char"))


def load_tokenizer(run: RunSource):
    """The run's tokenizer as a transformers tokenizer: its ``tokenizer/`` folder (every run since
    the folder was written has one; a character tokenizer is saved there too), else a named
    ``data.tokenizer``."""
    from dynamoe.data.tokenizer_files import TOKENIZER_FOLDER

    folder = run.run_dir / TOKENIZER_FOLDER
    if folder.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    if run.data_tokenizer == "char":
        raise GenerationError(
            f"'{run.run_dir}' has no {TOKENIZER_FOLDER}/ folder, and its character vocabulary is built from "
            "the corpus; fix: train the run again with this version (it saves the tokenizer)"
        )
    from dynamoe.data.datasets import hf_tokenizer

    return hf_tokenizer(run.data_tokenizer).hf


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, without special tokens (training saw none inside the text)."""
    vocab = tokenizer.get_vocab()
    out = []
    for i, text in enumerate(texts, 1):
        try:
            out.append(tokenizer.encode(text, add_special_tokens=False))
        except Exception as err:  # tokenizers raises its own error type for a word outside its vocabulary
            unknown = sorted({c for c in text if c not in vocab})
            what = f"characters {unknown} outside the run's vocabulary" if unknown else str(err)
            raise GenerationError(
                f"prompt {i} cannot be encoded by the run's tokenizer ({what}); fix: use only text the model was "
                "trained on"
            ) from None
    return out
