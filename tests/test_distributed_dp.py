"""Several processes on one machine (torchrun, gloo): data parallelism with experts replicated
reproduces the single-process run on the same global batch."""

import pytest

from dist_helper import torchrun_train, train_metrics

pytestmark = pytest.mark.distributed

COMMON = [
    "--set",
    "train.log_every=1",
    "--set",
    "train.steps=6",
    "--set",
    "train.warmup_steps=1",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.checkpoint_every=0",
    "--set",
    "model.moe.router.aux_free_bias=true",
]


def test_two_processes_with_half_batches_equal_one_process(tmp_path):
    torchrun_train(1, "debug_tiny", "--run-dir", str(tmp_path / "dp1"), "--set", "train.batch_size=8", *COMMON)
    torchrun_train(2, "debug_tiny", "--run-dir", str(tmp_path / "dp2"), "--set", "train.batch_size=4", *COMMON)
    one, two = train_metrics(tmp_path / "dp1"), train_metrics(tmp_path / "dp2")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step  # fp32 reduction order
