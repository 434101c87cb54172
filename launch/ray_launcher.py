"""`moe launch`: the trainer on Ray Train workers, on an embedded local cluster or an existing one.

Ray Train's ``TorchTrainer`` starts one worker per process and the torch process group that
DeepSpeed then wraps; each worker runs the same :class:`dynamoe.training.trainer.Trainer` as `moe train`.
Checkpoints are the trainer's own (safetensors + manifest); each is reported to Ray Train when it
is written, and the worker waits until Ray has committed it before going on, so that after a
failure the restarted workers resume from the newest checkpoint Ray knows, with the step counter
and the data position it implies. The job directory is the run folder; Ray's copies of the
checkpoints live in its ``ray/`` subfolder.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from dynamoe.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from dynamoe.training.checkpoint import list_checkpoints
from dynamoe.training.trainer import TrainerHooks, resolve_run_dir
from dynamoe.training.watchdog import FAULT_ENV, FAULT_MARKER_ENV

# Test aid: the worker of this rank exits abruptly after this step, once per run folder.
KILL_AT_STEP_ENV = "DYNAMOE_KILL_WORKER_AT_STEP"
KILL_RANK_ENV = "DYNAMOE_KILL_WORKER_RANK"
# Test aid: every worker stops after this step, once per run folder, and waits there (up to
# DYNAMOE_HOLD_SECONDS, default 300) so that a test can kill a node at a known point of the run.
HOLD_AT_STEP_ENV = "DYNAMOE_HOLD_WORKERS_AT_STEP"
HOLD_SECONDS_ENV = "DYNAMOE_HOLD_SECONDS"
PLACEMENT_FILE = "placement.jsonl"


class LaunchError(RuntimeError):
    """The job could not be started or did not finish; the message says why and what to do."""


class _RayTrainHooks(TrainerHooks):
    def __init__(self, run_dir: Path, rank: int):
        self.run_dir, self.rank = run_dir, rank

    def on_log(self, step: int, metrics: dict) -> None:
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": step})

    def on_checkpoint(self, step: int, folder: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:08d}")
        # report() only queues the upload: wait until Ray has committed it, or a failure right after
        # this point would restart from the checkpoint before.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def after_step(self, step: int) -> None:
        if os.environ.get(HOLD_AT_STEP_ENV) == str(step):
            marker = self.run_dir / f".held_at_step_{step}_rank_{self.rank}"
            if not marker.exists():
                marker.touch()
                time.sleep(float(os.environ.get(HOLD_SECONDS_ENV, "300")))
        if os.environ.get(KILL_AT_STEP_ENV) != str(step) or os.environ.get(KILL_RANK_ENV, "1") != str(self.rank):
            return
        marker = self.run_dir / f".killed_at_step_{step}"
        if not marker.exists():
            marker.touch()
            os._exit(17)  # a crash, not an exception: no clean-up, no report


def _worker(loop_config: dict) -> None:
    import ray.train

    from dynamoe.training.trainer import Trainer

    cfg = from_dict(RunConfig, loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    _record_placement(run_dir, rank)
    hooks = _RayTrainHooks(run_dir, rank)
    progress = loop_config["progress"] and rank == 0
    if loop_config.get("eval_only"):
        _evaluate(cfg, run_dir, rank)
        return
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # The driver refused a run folder with checkpoints, so any found now are this job's own,
        # from an attempt that failed before Ray committed them.
        trainer = Trainer(cfg, run_dir=str(run_dir), progress=progress, hooks=hooks, restart=True)
    else:
        with checkpoint.as_directory() as folder:
            trainer = Trainer(cfg, run_dir=str(run_dir), resume=folder, progress=progress, hooks=hooks)
    trainer.fit()


def _record_placement(run_dir: Path, rank: int) -> None:
    """One line per worker start in RUN/placement.jsonl: which node ran which rank, attempt after
    attempt, for checking a spread placement and finding a failed worker's node logs."""
    import json

    import ray

    row = {
        "time": time.time(),
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    # One short O_APPEND write per line, so the ranks' lines do not interleave.
    with open(run_dir / PLACEMENT_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def _evaluate(cfg: RunConfig, run_dir: Path, rank: int) -> None:
    import json

    import ray.train

    from dynamoe.layers.load_stats import format_balance_table
    from dynamoe.training.trainer import Trainer

    trainer = Trainer(cfg, run_dir=str(run_dir), resume=str(run_dir), progress=False)
    metrics, balance = trainer.evaluate_with_balance()
    if rank == 0:
        out = {"step": trainer.start_step, "eval": metrics, "load_balance": [b.as_dict() for b in balance]}
        (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
        print(
            f"evaluation of {run_dir} at step {trainer.start_step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            flush=True,
        )
        print(format_balance_table(balance), flush=True)
    ray.train.report({"step": trainer.start_step, **metrics})


def _check_address(address: str) -> None:
    """Fail within seconds when nothing listens at ``host:port`` (Ray itself retries for minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(
            f"--address {address!r} is not host:port, ray://host:port or auto; "
            "fix: e.g. --address ray://head-node:10001 or --address auto"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as err:
        raise LaunchError(
            f"no Ray cluster answers at {address} ({err}); fix: start one with `ray start --head` "
            "there, check the host and port, or leave --address out to run on this machine"
        ) from None


def _without_job_env_vars(env_vars: dict) -> dict:
    """Under `ray job submit` the job's runtime env is merged into ray.init's, and Ray refuses a
    variable set in both: keep the job's (the submitter chose it), drop ours."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_config = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not job_config:
        return env_vars
    job_vars = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env_vars.items() if k not in job_vars}


def _start_ray(address: str | None, env_vars: dict):
    import ray

    runtime_env = {"env_vars": _without_job_env_vars(env_vars)}
    if address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    else:
        _check_address(address)
        try:
            ray.init(address=address, runtime_env=runtime_env)
        except ConnectionError as err:
            raise LaunchError(
                f"could not join the Ray cluster at {address} ({err}); "
                "fix: check the address, or leave --address out to run on this machine"
            ) from None
    return ray


def _check_resources(ray, workers: int, cpus_per_worker: int, gpus_per_worker: float) -> None:
    available = ray.cluster_resources()
    need_cpu = workers * cpus_per_worker
    if need_cpu > available.get("CPU", 0):
        raise LaunchError(
            f"{workers} workers x {cpus_per_worker} CPU need {need_cpu} CPUs but the Ray cluster has "
            f"{available.get('CPU', 0):g}; fix: lower --workers or launch.cpus_per_worker, or add nodes"
        )
    need_gpu = workers * gpus_per_worker
    if need_gpu > available.get("GPU", 0):
        raise LaunchError(
            f"{workers} workers x {gpus_per_worker:g} GPU need {need_gpu:g} GPUs but the Ray cluster has "
            f"{available.get('GPU', 0):g}; fix: lower --workers or --gpus-per-worker"
        )


def _check_placement(ray, workers: int, launch_cfg, gpus_per_worker: float) -> None:
    """The strict strategies need a node per worker (STRICT_SPREAD) or one node for all of them
    (STRICT_PACK); Ray would wait forever for a placement that cannot happen, so say it now."""
    strategy = launch_cfg.placement_strategy
    if strategy not in ("STRICT_SPREAD", "STRICT_PACK"):
        return
    need = {"CPU": launch_cfg.cpus_per_worker, "GPU": gpus_per_worker}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if strategy == "STRICT_SPREAD":
        fitting = sum(all(res.get(k, 0) >= v for k, v in need.items()) for res in nodes)
        if fitting < workers:
            raise LaunchError(
                f"launch.placement_strategy STRICT_SPREAD puts each of the {workers} workers on its own node, "
                f"but only {fitting} of the cluster's {len(nodes)} nodes have {launch_cfg.cpus_per_worker} CPU"
                + (f" and {gpus_per_worker:g} GPU" if gpus_per_worker else "")
                + "; fix: add nodes, lower --workers, or use SPREAD (spread where possible)"
            )
    elif not any(all(res.get(k, 0) >= workers * v for k, v in need.items()) for res in nodes):
        raise LaunchError(
            f"launch.placement_strategy STRICT_PACK puts all {workers} workers on one node, and no node has "
            f"{workers * launch_cfg.cpus_per_worker} CPU"
            + (f" and {workers * gpus_per_worker:g} GPU" if gpus_per_worker else "")
            + "; fix: use PACK (packs where possible) or lower --workers"
        )


def launch(
    config: str,
    *,
    overrides=(),
    workers: int = 1,
    ep_size: int | None = None,
    gpus_per_worker: float = 0,
    address: str | None = None,
    run_dir: str | None = None,
    eval_run: str | None = None,
    progress: bool = True,
) -> Path:
    """Run a training job (or, with ``eval_run``, an evaluation of a run folder) on Ray Train."""
    if workers < 1:
        raise LaunchError(f"--workers must be at least 1, got {workers}")
    overrides = list(overrides) + ([f"parallel.ep_size={ep_size}"] if ep_size else [])
    cfg = load_config(config, overrides)
    if workers % cfg.parallel.ep_size:
        raise ConfigError(
            f"parallel.ep_size: {cfg.parallel.ep_size} does not divide --workers {workers}; "
            f"fix: use a multiple of {cfg.parallel.ep_size} workers"
        )
    if eval_run is None:
        from dynamoe.training.preflight import warn_if_plan_does_not_fit

        # The workers' own warning is in their logs; say it here too, before Ray starts.
        warn_if_plan_does_not_fit(cfg, world=workers, on_gpu=bool(gpus_per_worker))
    folder = Path(eval_run) if eval_run else resolve_run_dir(cfg, run_dir)
    folder = folder.resolve()
    if eval_run is None and list_checkpoints(folder):
        raise LaunchError(
            f"the run folder {folder} already holds checkpoints of another run; "
            "fix: pass --run-dir for a new folder, or delete it"
        )
    if eval_run is not None and not list_checkpoints(folder):
        raise LaunchError(
            f"{folder} holds no committed checkpoint to evaluate; fix: pass a run folder of a finished run"
        )
    env_vars = {
        "OMP_NUM_THREADS": str(cfg.launch.cpus_per_worker),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not gpus_per_worker:
        env_vars["DS_ACCELERATOR"] = "cpu"
    for key in (KILL_AT_STEP_ENV, KILL_RANK_ENV, HOLD_AT_STEP_ENV, HOLD_SECONDS_ENV, FAULT_ENV, FAULT_MARKER_ENV):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    ray = _start_ray(address, env_vars)
    try:
        _check_resources(ray, workers, cfg.launch.cpus_per_worker, gpus_per_worker)
        _check_placement(ray, workers, cfg.launch, gpus_per_worker)
        from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
        from ray.train import RunConfig as RayRunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        resources = {"CPU": cfg.launch.cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "config": to_dict(cfg),
                "run_dir": str(folder),
                "progress": progress,
                "eval_only": eval_run is not None,
            },
            torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=bool(gpus_per_worker),
                resources_per_worker=resources,
                placement_strategy=cfg.launch.placement_strategy,
            ),
            run_config=RayRunConfig(
                name="eval" if eval_run else "train",
                storage_path=str(folder / "ray"),
                failure_config=FailureConfig(max_failures=0 if eval_run else cfg.launch.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            ),
        )
        from ray.train import TrainingFailedError

        try:
            trainer.fit()
        except TrainingFailedError as err:
            raise LaunchError(f"the job failed: {err}") from None
    finally:
        ray.shutdown()
    return folder


def main(args) -> int:
    try:
        folder = launch(
            args.config,
            overrides=args.set,
            workers=args.workers,
            ep_size=args.ep_size,
            gpus_per_worker=args.gpus_per_worker,
            address=args.address,
            run_dir=args.run_dir,
            eval_run=args.eval,
            progress=not args.quiet,
        )
    except LaunchError as err:
        print(f"moe launch: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summarize(folder, evaluation=args.eval is not None))
    return 0


def summarize(folder: Path, evaluation: bool) -> str:
    """What the job left in its run folder, for the console."""
    import json

    from dynamoe.layers.load_stats import LayerBalance, format_balance_table

    name = "eval.json" if evaluation else "summary.json"
    summary = json.loads((folder / name).read_text())
    metrics = summary["eval"] if evaluation else summary["final_eval"]
    lines = [f"run folder: {folder}", "validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())]
    if not evaluation:
        lines.append(f"trained {summary['steps']} steps in {summary['train_wall_s']:.1f} s (this attempt)")
    balance = [LayerBalance(**row) for row in summary["load_balance"]]
    return "\n".join(lines + ["load balance per MoE layer:", format_balance_table(balance)])
