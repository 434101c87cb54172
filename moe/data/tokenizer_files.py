"""A run's tokenizer as files that ``transformers.AutoTokenizer.from_pretrained`` loads with no
custom code: a transformers tokenizer saves itself; the character tokenizer becomes a ``tokenizers``
word-level model over single characters (each character one token, the same ids, decoding joins
them back without spaces)."""

from __future__ import annotations

import shutil
from pathlib import Path

from dynamoe.data.datasets import Tokenizer
from dynamoe.data.sources import DataError

TOKENIZER_FOLDER = "tokenizer"  # inside a run folder


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> Path:
    """Write ``tokenizer`` to ``folder`` (created, replaced whole: written beside it, then renamed)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _as_transformers(tokenizer).save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"the tokenizer could not be written to '{folder}' ({err.strerror or err}); "
            "fix: choose a writable folder with free space"
        ) from None
    return folder


def _as_transformers(tokenizer: Tokenizer):
    if tokenizer.hf is not None:
        return tokenizer.hf
    if tokenizer.vocab is None:
        raise DataError(f"tokenizer '{tokenizer.name}' has neither a transformers tokenizer nor a vocabulary to write")
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    specials = {"pad_token": "<pad>", "unk_token": "<unk>"} if "<unk>" in tokenizer.vocab else {}
    rust = RustTokenizer(models.WordLevel(tokenizer.vocab, unk_token=specials.get("unk_token")))
    # Every character on its own, newlines and spaces included (the regex's "." would skip "\n").
    rust.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    rust.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=rust, clean_up_tokenization_spaces=False, **specials)
