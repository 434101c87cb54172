"""Under data (and expert) parallelism each rank reads only its own shard of every batch, for
training and evaluation, and the shards of all ranks make exactly the batch one process reads."""

import pytest
import torch

from dynamoe.data.datasets import ClassificationData, LMData, TokenArray, Tokenizer


class CountingTokens(TokenArray):
    """A token array that counts the tokens read from it, as a memory-mapped token file would
    read them from disk."""

    def __init__(self, ids):
        super().__init__(ids.numpy())
        self.read = 0

    def __getitem__(self, index):
        self.read += index.numel()
        return super().__getitem__(index)


def _lm(seq_len=16, n=5000):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n,), generator=gen)
    tok = Tokenizer("test", 50, list, str, 0)
    return LMData(CountingTokens(ids[: n - 500]), CountingTokens(ids[n - 500 :]), tok, seq_len)


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_slice_of_the_training_batch(world):
    data, bs = _lm(), 3
    whole = data.train_batch(7, 11, world * bs, 0, 1)
    shards = []
    for rank in range(world):
        data.train_ids.read = 0
        shards.append(data.train_batch(7, 11, bs, rank, world))
        # Its own windows (seq_len + 1 tokens each: inputs and shifted labels), not all ranks'.
        assert data.train_ids.read == bs * (data.seq_len + 1), rank
    for key in whole:
        assert torch.equal(torch.cat([s[key] for s in shards]), whole[key]), key


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_evaluates_only_its_slice_of_the_validation_windows(world):
    data, bs, batches = _lm(), 2, 3
    whole = list(data.eval_batches(batches, world * bs, 0, 1))
    per_rank = []
    for rank in range(world):
        data.val_ids.read = 0
        per_rank.append(list(data.eval_batches(batches, bs, rank, world)))
        assert data.val_ids.read == batches * bs * (data.seq_len + 1), rank
    for b in range(batches):  # same number of batches on every rank, together the global batch
        for key in whole[b]:
            assert torch.equal(torch.cat([shards[b][key] for shards in per_rank]), whole[b][key]), (b, key)


def test_classification_evaluation_covers_every_row_once_over_the_ranks():
    n, world, bs = 23, 4, 2  # 23 rows: the last global batch leaves some ranks empty
    rows = {"input_ids": torch.arange(n)[:, None].repeat(1, 3), "labels": torch.arange(n)}
    rows["attention_mask"] = torch.ones_like(rows["input_ids"])
    data = ClassificationData(rows, rows, num_classes=n, tokenizer=None, seq_len=3)
    per_rank = [list(data.eval_batches(None, bs, rank, world)) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # lockstep: expert parallelism needs every rank's passes
    seen = torch.cat([batch["labels"] for batches in per_rank for batch in batches])
    assert sorted(seen.tolist()) == list(range(n))


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_evaluation_with_data_parallel_replicas_equals_one_process(tmp_path):
    """4 processes, experts split 2 ways (2 data-parallel replicas): the final evaluation is one
    process's, and its load-balance pass counts every validation token once (a rank evaluating
    the whole set would count it 4 times)."""
    import json

    from dist_helper import torchrun_train

    # Router losses are means over each rank's own tokens; off, so the runs train alike.
    common = ["--set", "train.steps=4", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]
    common += ["--set", "model.moe.router.aux_loss_coef=0", "--set", "model.moe.router.z_loss_coef=0"]
    torchrun_train(1, "debug_tiny", "--run-dir", str(tmp_path / "one"), *common, "--set", "train.batch_size=4")
    torchrun_train(
        4,
        "debug_tiny",
        "--run-dir",
        str(tmp_path / "ep2dp2"),
        *common,
        "--set",
        "train.batch_size=1",
        "--set",
        "parallel.ep_size=2",
    )
    one, sharded = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "ep2dp2"))
    assert sharded["final_eval"]["loss"] == pytest.approx(one["final_eval"]["loss"], abs=1e-4)
    for a, b in zip(one["load_balance"], sharded["load_balance"]):
        assert b["tokens"] == a["tokens"]
        assert b["counts"] == a["counts"]
