"""Language-model corpora larger than memory: stream the rows, tokenise them in batches, write the
ids once to a token file in a cache folder, then memory-map it like any ``*.bin`` token file.

``data.streaming: true`` reads the training split row by row (``datasets`` streaming, for a hub
dataset or the user's own files); nothing but one batch of rows is in memory at a time. The token
file is named by what made it (the source, its size and time for local files, the split, the text
column and the tokenizer), written under a temporary name and renamed when complete, so a second
run reuses it and an interrupted one is never read.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from pathlib import Path

from dynamoe.config import DataConfig
from dynamoe.data.sources import TABLE_FORMATS, DataError, split_files

ROWS_PER_BATCH = 1024


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAMOE_CACHE_DIR", Path.home() / ".cache" / "dynamoe")) / "tokens"


def _source_key(cfg: DataConfig, local: Path | None) -> dict:
    if local is None:
        return {"hub": cfg.dataset, "config": cfg.hub_config, "split": cfg.train_split}
    files = split_files(local)["train"] if local.is_dir() else [local]
    return {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def _stream_rows(cfg: DataConfig, local: Path | None):
    import datasets

    try:
        if local is None:
            return datasets.load_dataset(cfg.dataset, cfg.hub_config, split=cfg.train_split, streaming=True)
        files = split_files(local)["train"] if local.is_dir() else [local]
        builder, kwargs = TABLE_FORMATS[files[0].suffix.lower()]
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs
        )
    except Exception as err:  # the hub and the builders raise many kinds: all mean "cannot stream it"
        raise DataError(
            f"data.streaming: cannot stream '{local or cfg.dataset}' ({type(err).__name__}: {err}); "
            "fix: check data.path or the hub name, data.hub_config and data.train_split"
        ) from None


def streamed_token_file(cfg: DataConfig, local: Path | None, tokenizer) -> tuple[Path, str]:
    """The token file of the streamed training split (written on first use): (path, id dtype).
    ``tokenizer`` is a transformers tokenizer (the caller refuses the character one)."""
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    key = {**_source_key(cfg, local), "text_field": cfg.text_field, "tokenizer": tokenizer.name, "dtype": dtype}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / f"{digest}.bin"
    if path.exists():
        return path, dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    # One process writes (the others of a multi-process job wait for it, then read its file).
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            for stale in path.parent.glob(f"{digest}.partial*"):  # left by a writer that was killed
                stale.unlink(missing_ok=True)
            _write_token_file(cfg, local, tokenizer, path, key, dtype)
    return path, dtype


def _write_token_file(cfg: DataConfig, local: Path | None, tokenizer, path: Path, key: dict, dtype: str) -> None:
    import numpy as np

    tmp = path.with_suffix(f".partial{os.getpid()}")
    rows, written = _stream_rows(cfg, local), 0
    try:
        with open(tmp, "wb") as f:
            batch: list[str] = []
            for row in rows:
                if cfg.text_field not in row:
                    raise DataError(
                        f"data.text_field: the streamed rows have no column '{cfg.text_field}' (they have "
                        f"{sorted(row)}); fix: set data.text_field to the column that holds the text"
                    )
                batch.append(str(row[cfg.text_field]) + "\n")
                if len(batch) == ROWS_PER_BATCH:
                    written += _write_ids(f, tokenizer, batch, np.dtype(dtype))
                    batch = []
            if batch:
                written += _write_ids(f, tokenizer, batch, np.dtype(dtype))
        if written == 0:
            raise DataError(f"data.streaming: '{local or cfg.dataset}' has no text rows; fix: check the source")
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps({**key, "tokens": written}, indent=2))
    finally:
        tmp.unlink(missing_ok=True)


def _write_ids(f, tokenizer, texts: list[str], dtype) -> int:
    import numpy as np

    ids = tokenizer.hf(texts, add_special_tokens=False)["input_ids"]
    flat = np.fromiter((i for row in ids for i in row), dtype=dtype)
    f.write(flat.tobytes())
    return int(flat.size)


def load_streamed(cfg: DataConfig, local: Path | None, tokenizer):
    """LMData over the token file of a streamed corpus (the tail ``data.val_fraction`` validates)."""
    from dynamoe.data.datasets import load_token_file

    path, dtype = streamed_token_file(cfg, local, tokenizer)
    return load_token_file(dataclasses.replace(cfg, token_dtype=dtype), path)
