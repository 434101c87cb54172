"""Checkpoints written before the package regrouping (tests/fixtures/checkpoint_v0_1) still load,
give the logits they gave then, and resume training."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynamoe.config import load_config
from dynamoe.training.checkpoint import is_sharded, load_checkpoint, load_model
from dynamoe.training.trainer import train

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint_v0_1"
RUNS = ["decoder_moe", "decoder_act", "cnn_skip", "cnn_act"]


@pytest.mark.parametrize("run", RUNS)
def test_an_old_checkpoint_loads_and_gives_the_same_logits(run):
    cfg, model = load_model(FIXTURES / run)
    expected = load_file(FIXTURES / run / "expected_logits.safetensors")
    with torch.no_grad():
        logits = model(expected["inputs"]).logits
    # The same arithmetic as when they were written: equal up to float reassociation.
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def test_an_old_checkpoint_resumes_training(tmp_path):
    run = tmp_path / "decoder_moe"
    shutil.copytree(FIXTURES / "decoder_moe", run)
    cfg = load_config(str(run / "config.yaml"), ["train.steps=6", "train.eval_every=0", "train.checkpoint_every=0"])
    result = train(cfg, run_dir=str(run), resume=str(run / "checkpoints" / "step_00000004"), progress=False)
    assert sorted(result.train_losses) == [4, 5]
    assert all(0.0 < loss < 10.0 for loss in result.train_losses.values())


def test_an_old_checkpoint_saves_again_as_the_same_tensors_in_the_sharded_format(tmp_path):
    """Old (full-format) checkpoints need no conversion: resuming one with the sharded format and
    saving at once rewrites it sharded, with every weight and Adam moment as it was."""
    run = tmp_path / "decoder_moe"
    shutil.copytree(FIXTURES / "decoder_moe", run)
    folder = run / "checkpoints" / "step_00000004"
    old_model, old_optim, _ = load_checkpoint(folder)
    sets = ["train.steps=4", "train.eval_every=0", "train.checkpoint_every=0", "train.checkpoint_format=sharded"]
    cfg = load_config(str(run / "config.yaml"), sets)
    train(cfg, run_dir=str(run), resume=str(folder), progress=False)
    assert is_sharded(folder)
    new_model, new_optim, _ = load_checkpoint(folder)
    for old, new in ((old_model, new_model), (old_optim, new_optim)):
        assert sorted(old) == sorted(new)
        for name in old:
            assert torch.equal(old[name], new[name]), name
