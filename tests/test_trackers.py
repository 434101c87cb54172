"""Experiment trackers for real: MLflow (a SQLite store in the run folder) and Weights & Biases
(offline mode) get the same rows as metrics.jsonl, a resumed run continues the same tracker run,
and a tracker that cannot start is refused before DeepSpeed starts."""

import importlib.util
import json

import pytest

from dynamoe.config import ConfigError, load_config
from dynamoe.training.metrics import read_metrics
from dynamoe.training.trainer import train

RUN = ["train.steps=4", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=1"]


def _needs(module):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed (pip install 'dynamoe[tracking]')"
    )


@_needs("mlflow")
def test_mlflow_gets_every_scalar_the_metrics_file_gets_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("debug_tiny", RUN + ["train.trackers=[mlflow]"])
    run = tmp_path / "run"
    train(cfg, run_dir=str(run), progress=False)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["model.d_model"] == "32" and logged.data.params["train.trackers"] == "['mlflow']"
    rows = read_metrics(run, "train")
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert {m.step for m in client.get_metric_history(run_id, "eval/loss")} == {2, 4}
    assert {m.step for m in client.get_metric_history(run_id, "train/block1_z_loss")} == {1, 2, 3, 4}

    longer = load_config("debug_tiny", RUN + ["train.steps=6", "train.trackers=[mlflow]"])
    train(longer, resume=str(run), progress=False)
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == run_id  # the same tracker run
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]


@_needs("wandb")
def test_wandb_offline_run_holds_the_metrics_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("debug_tiny", RUN + ["train.trackers=[wandb]"])
    run = tmp_path / "run"
    train(cfg, run_dir=str(run), progress=False)
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    (record,) = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    data = record.read_bytes()
    # W&B's own record file (protobuf): our series by name, and the config we gave it.
    for key in (b"train/loss", b"train/block0_balance_loss", b"train/tokens_per_s", b"eval/loss", b"d_model"):
        assert key in data, key


def test_a_tracker_that_is_not_installed_is_refused_before_start_up(tmp_path, monkeypatch):
    import dynamoe.training.trackers as trackers

    monkeypatch.setattr(trackers, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"train.trackers: 'mlflow' is asked for and not installed; fix: pip install"):
        trackers.check_trackers(["mlflow"])


def test_wandb_without_credentials_is_refused_with_the_fix(monkeypatch, tmp_path):
    import dynamoe.training.trackers as trackers

    monkeypatch.setattr(trackers, "_installed", lambda module: True)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="wandb login.*WANDB_MODE=offline"):
        trackers.check_trackers(["wandb"])


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.trackers.*'tensorboardx' is not allowed"):
        load_config("debug_tiny", ["train.trackers=[tensorboardx]"])
