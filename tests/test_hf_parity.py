"""``moe bench hf-parity``: transformers' own sequence classifier fine-tuned on the run's batches
with the run's hyperparameters, beside the run's own dev accuracy."""

import json

import pytest

from dynamoe.config import ConfigError, load_config

SETS = [
    "train.steps=3",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "data.seq_len=24",
    "data.max_train_samples=64",
    "model.exits.layers=[]",
]


def test_transformers_fine_tunes_on_the_runs_own_batches_and_both_are_scored(tmp_path, monkeypatch):
    from dynamoe.data import datasets
    from dynamoe.evals import hf_parity
    from dynamoe.training.trainer import train

    run = tmp_path / "run"
    train(load_config("bert_early_exit_sst2", SETS), run_dir=str(run), progress=False)
    seen = []
    original = datasets.ClassificationData.train_batch

    def recording(self, seed, index, batch_size, rank=0, world=1):
        seen.append((seed, index, batch_size))
        return original(self, seed, index, batch_size, rank, world)

    monkeypatch.setattr(datasets.ClassificationData, "train_batch", recording)
    assert hf_parity.main([str(run), "--threads", "1"]) == 0
    assert seen == [(0, 0, 4), (0, 1, 4), (0, 2, 4)]  # the run's batches, in its order
    result = json.loads((run / "hf_parity.json").read_text())
    assert result["steps"] == 3 and result["dev_examples"] == 872
    for side in ("dynamoe_accuracy", "transformers_accuracy"):
        assert 0.3 < result[side] < 0.95
    assert result["within_target"] == (abs(result["difference_points"]) <= 0.5)


def test_runs_that_are_not_a_plain_fine_tune_are_refused(tmp_path):
    from dynamoe.config import to_dict
    from dynamoe.evals.hf_parity import fine_tune_steps, read_run

    joint = load_config("bert_early_exit_sst2", ["model.exits.training=distill"])
    with pytest.raises(ConfigError, match="exits trained jointly .*fix: use a run with exits.training: two_stage"):
        fine_tune_steps(joint)
    assert fine_tune_steps(load_config("bert_early_exit_sst2")) == 2100  # the two-stage run's first stage
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config("bert_upcycled_sst2"))))
    with pytest.raises(ConfigError, match="has MoE layers, and transformers' classifier is dense"):
        read_run(tmp_path)
    with pytest.raises(ConfigError, match="has no config.yaml"):
        read_run(tmp_path / "nowhere")
