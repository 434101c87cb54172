"""Where rows come from: users' own files (CSV, TSV, JSON, JSON Lines, parquet, text; a file or a
folder of them) and Hugging Face hub datasets (a config name, split names), through
``datasets.load_dataset`` and its builders, with every failure turned into a :class:`DataError`
that names the file and the fix.

A folder's files are split by name: ``train*`` is the training split, ``validation*``, ``valid*``,
``val*`` or ``dev*`` the validation split, ``test*`` the test split; a single file is the training
split (the validation split is then held out of it).
"""

from __future__ import annotations

from pathlib import Path

from dynamoe.config import DataConfig


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says where we looked and how to fix it."""


# File suffix -> (datasets builder, extra builder arguments).
TABLE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
SPLIT_PREFIXES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


def _format_of(path: Path) -> tuple[str, dict]:
    if path.suffix.lower() not in TABLE_FORMATS:
        raise DataError(
            f"data.path: '{path}' has the suffix '{path.suffix}', which dynamoe does not read; "
            f"fix: use one of {', '.join(sorted(TABLE_FORMATS))} (or a .bin token file for language modelling)"
        )
    return TABLE_FORMATS[path.suffix.lower()]


def check_text(path: Path) -> None:
    """Refuse a binary file given as text before a builder fails on it with a parser's traceback."""
    if TABLE_FORMATS.get(path.suffix.lower(), ("",))[0] == "parquet":
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not merely a character cut at the end of the sample
            raise DataError(
                f"data.path: '{path}' is not UTF-8 text (a binary file?); fix: point data.path at a text, "
                "CSV, TSV, JSON Lines or parquet file"
            ) from None
    if b"\x00" in head:
        raise DataError(f"data.path: '{path}' holds NUL bytes, so it is not a text file; fix: pass a text file")


def split_files(folder: Path) -> dict[str, list[Path]]:
    """The readable files of ``folder`` grouped by split name (see the module docstring)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TABLE_FORMATS)
    if not files:
        raise DataError(
            f"data.path: '{folder}' holds no file dynamoe reads; fix: add files named train.csv (or .tsv, .json, "
            ".jsonl, .parquet, .txt), optionally validation.* and test.*"
        )
    splits: dict[str, list[Path]] = {}
    for path in files:
        stem = path.stem.lower()
        for split, prefixes in SPLIT_PREFIXES.items():
            if stem.startswith(prefixes):
                splits.setdefault(split, []).append(path)
                break
    if "train" not in splits:
        if len({p.suffix.lower() for p in files}) == 1 and not any(splits.values()):
            splits = {"train": files}  # a folder of same-kind files with no split names: all training
        else:
            raise DataError(
                f"data.path: '{folder}' has no training file (train.*); fix: name the training file train.csv "
                "(or .tsv, .json, .jsonl, .parquet, .txt)"
            )
    return splits


def read_local(path: Path, text_by_document: bool = False):
    """A ``datasets.DatasetDict`` from a local file or folder; ``text_by_document``: a .txt file
    is one row (language modelling keeps its line breaks), not a row per line."""
    import datasets

    splits = split_files(path) if path.is_dir() else {"train": [path]}
    out = {}
    for split, files in splits.items():
        builders = {_format_of(f)[0] for f in files}
        if len(builders) > 1:
            raise DataError(
                f"data.path: the {split} files of '{path}' mix formats ({', '.join(f.name for f in files)}); "
                "fix: use one format per split"
            )
        builder, kwargs = _format_of(files[0])
        for f in files:
            check_text(f)
        if builder == "text" and text_by_document:
            kwargs = {**kwargs, "sample_by": "document"}
        try:
            out[split] = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        except Exception as err:  # the builders raise parser-specific errors: all mean "cannot parse"
            raise DataError(
                f"data.path: cannot read {', '.join(str(f) for f in files)} as {builder} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); fix: check the file's format"
            ) from None
    return datasets.DatasetDict(out)


def read_hub(name: str, cfg: DataConfig, searched: list[Path]):
    """A hub dataset (with ``data.hub_config``), as a DatasetDict of its splits."""
    import datasets

    try:
        return datasets.load_dataset(name, cfg.hub_config)
    except Exception as err:  # the hub raises many kinds (offline, missing, auth): all mean "not available"
        looked = ", ".join(str(d) for d in searched)
        raise DataError(
            f"dataset '{cfg.dataset}': no local copy found (data.path unset; looked in {looked}) and the "
            f"Hugging Face hub dataset '{name}' could not be loaded ({type(err).__name__}: {err}); "
            "fix: set data.path to a local copy (see shared/data/README.md), set DYNAMOE_DATA_DIR, "
            "or connect to the hub"
        ) from None


def pick_splits(ds, cfg: DataConfig, source: str) -> tuple[str, str | None]:
    """(training split, validation split or None to hold one out) of ``ds``, as the config names them."""
    if cfg.train_split not in ds:
        raise DataError(
            f"data.train_split: {source} has no split '{cfg.train_split}' (it has {sorted(ds)}); "
            "fix: set data.train_split to one of them"
        )
    if cfg.val_split is not None:
        if cfg.val_split not in ds:
            raise DataError(
                f"data.val_split: {source} has no split '{cfg.val_split}' (it has {sorted(ds)}); "
                "fix: set data.val_split to one of them, or remove it to hold out data.val_fraction"
            )
        return cfg.train_split, cfg.val_split
    for name in ("validation", "test"):
        if name in ds and name != cfg.train_split:
            return cfg.train_split, name
    return cfg.train_split, None


def column(ds, name: str, field: str, source: str) -> list:
    """Column ``name`` of ``ds`` (the ``data.<field>`` setting), or an error naming the columns."""
    if name not in ds.column_names:
        raise DataError(
            f"data.{field}: {source} has no column '{name}' (its columns: {ds.column_names}); "
            f"fix: set data.{field} to the column that holds it"
        )
    return ds[name]
