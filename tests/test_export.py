"""The whole model in one safetensors file: export, import, and start training from it."""

import pytest
import torch
import yaml

from dynamoe.config import ConfigError, RunConfig, from_dict, load_config
from dynamoe.training.checkpoint import CheckpointError, export_model, list_checkpoints, load_checkpoint, load_exported
from dynamoe.training.trainer import Trainer, train

TINY = ["train.log_every=1", "train.eval_every=0", "train.steps=3", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train(load_config("debug_tiny", TINY), run_dir=str(root / "run"), progress=False)
    out = export_model(root / "run", root / "model.safetensors").path
    return root, out


def test_export_round_trips_every_weight_and_the_config(exported):
    root, out = exported
    cfg, model = load_exported(out)
    resolved = from_dict(RunConfig, yaml.safe_load((root / "run" / "config.yaml").read_text()))
    assert cfg == resolved.model  # the config the run trained, vocabulary size filled in
    assert cfg.vocab_size == 65 and cfg.moe.num_experts == 4
    saved, _, _ = load_checkpoint(list_checkpoints(root / "run")[-1])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    ids = torch.randint(0, 65, (2, 16))
    assert torch.isfinite(model.eval()(ids).logits).all()


def test_training_can_start_from_an_exported_model(exported, tmp_path):
    _, out = exported
    _, model = load_exported(out)
    trainer = Trainer(
        load_config("debug_tiny", TINY + [f"train.init_from={out}"]), run_dir=str(tmp_path / "r"), progress=False
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name


def test_init_from_a_different_model_is_refused(exported, tmp_path):
    _, out = exported
    with pytest.raises(ConfigError, match="model.d_model: 32 there, 64 here"):
        Trainer(
            load_config("debug_tiny", TINY + [f"train.init_from={out}", "model.d_model=64"]),
            run_dir=str(tmp_path / "r"),
            progress=False,
        )


def test_corrupt_or_foreign_files_are_refused(exported, tmp_path):
    _, out = exported
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_exported(broken)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a dynamoe model export"):
        load_exported(foreign)
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config("debug_tiny", ["train.init_from=/no/such/file.safetensors"])


def test_init_from_may_change_loss_only_settings(exported, tmp_path):
    """Loss coefficients are not weights: a run may start from an export with other values."""
    _, out = exported
    cfg = load_config("debug_tiny", TINY + [f"train.init_from={out}", "model.moe.router.aux_loss_coef=0.05"])
    trainer = Trainer(cfg, run_dir=str(tmp_path / "run"), progress=False)
    _, model = load_exported(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
