"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow, each used
only when installed and named in ``train.trackers`` (off by default).

A tracker sees what TensorBoard sees: every finite scalar of every metrics row, as
``<split>/<name>`` at the row's step, and the resolved config as parameters. The tracker's run id
is kept in the run folder (``trackers.json``), so a resumed run continues the same tracker run.

Where they write: W&B as its own settings say (``wandb login``, or ``WANDB_MODE=offline`` to
write under the run folder alone), in project ``WANDB_PROJECT`` (default "dynamoe"); MLflow to
``MLFLOW_TRACKING_URI``, by default a SQLite database in the run folder (``mlflow.db``), in
experiment ``MLFLOW_EXPERIMENT_NAME`` (default "dynamoe").
"""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
from pathlib import Path

from dynamoe.config import ConfigError

TRACKERS = ("wandb", "mlflow")
IDS_FILE = "trackers.json"
_INSTALL = {"wandb": "wandb", "mlflow": "mlflow-skinny sqlalchemy alembic"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].rstrip("/")
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """Every tracker asked for is installed and can start; checked before DeepSpeed starts."""
    for name in names:
        module = "mlflow" if name == "mlflow" else name
        if not _installed(module):
            raise ConfigError(
                f"train.trackers: '{name}' is asked for and not installed; fix: pip install {_INSTALL[name]} "
                f"(or pip install 'dynamoe[tracking]'), or remove '{name}' from train.trackers"
            )
        if name == "wandb" and not _wandb_has_credentials():
            raise ConfigError(
                "train.trackers: 'wandb' has no API key on this machine; fix: run `wandb login` (or set "
                "WANDB_API_KEY), or set WANDB_MODE=offline to keep the W&B run in the run folder"
            )
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") and not _installed("sqlalchemy"):
            raise ConfigError(
                "train.trackers: 'mlflow' writes to a SQLite database in the run folder by default, which needs "
                "SQLAlchemy; fix: pip install sqlalchemy alembic, or set MLFLOW_TRACKING_URI to your MLflow server"
            )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _scalars(split: str, values: dict) -> dict[str, float]:
    return {
        f"{split}/{key}": float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, config: dict, run_id: str | None):
        import wandb

        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dynamoe"),
            name=name,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )
        self.run_id = self._run.id

    def log(self, step: int, split: str, values: dict) -> None:
        self._run.log(_scalars(split, values), step=step)

    def close(self) -> None:
        import wandb

        self._run.finish()
        # finish() returns before W&B's service has written the run's record file (an offline run
        # was found holding only its header); teardown waits for it, so the run folder is complete
        # when training returns, also in a Ray worker that exits without atexit hooks. Skipped
        # when the user has another W&B run open in this process.
        if wandb.run is None:
            wandb.teardown()


class MlflowTracker:
    def __init__(self, run_dir: Path, name: str, config: dict, run_id: str | None):
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
        self._client = mlflow.tracking.MlflowClient(uri)
        self.tracking_uri = uri
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dynamoe")
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
            run = self._client.create_run(experiment_id, run_name=name)
            run_id = run.info.run_id
            params = [
                mlflow.entities.Param(key, str(value)[:6000]) for key, value in _flatten(config).items()
            ]  # MLflow caps a value's length
            for start in range(0, len(params), 100):  # and a batch's size
                self._client.log_batch(run_id, params=params[start : start + 100])
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, split: str, values: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in _scalars(split, values).items()]
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def start_trackers(names, run_dir: Path, name: str, config: dict, *, resuming: bool) -> list:
    """Start the trackers named (rank 0 only); a resumed run continues the runs whose ids the run
    folder kept, a new run forgets them."""
    path = Path(run_dir) / IDS_FILE
    ids = json.loads(path.read_text()) if resuming and path.exists() else {}
    classes = {"wandb": WandbTracker, "mlflow": MlflowTracker}
    trackers = [classes[n](run_dir, name, config, ids.get(n)) for n in names]
    if trackers or path.exists():
        path.write_text(json.dumps({n: t.run_id for n, t in zip(names, trackers)}, indent=2))
    return trackers
