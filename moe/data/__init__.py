"""Datasets and tokenizers: language-model corpora, text classification, images (``datasets.py``);
users' own files and hub datasets (``sources.py``); class labels checked and named (``labels.py``)."""

from dynamoe.data.datasets import (
    DataError,
    build_data,
    data_search_dirs,
    load_classification,
    load_digits_data,
    load_hub_images,
    load_lm,
    resolve_bundled,
    trim_padding,
)

__all__ = [
    "DataError",
    "build_data",
    "data_search_dirs",
    "load_classification",
    "load_digits_data",
    "load_hub_images",
    "load_lm",
    "resolve_bundled",
    "trim_padding",
]
