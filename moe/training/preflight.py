"""Checks that need no process group, run before DeepSpeed starts, so a bad run fails in seconds.

The run folder (creatable, writable, not another run's, room on its disk for a checkpoint) and
the memory the model's weights, gradients and Adam state need are checked here; the data (present,
parseable, labels, tokenizer) is built before this runs, for the same reason. Each failure is a
:class:`~dynamoe.config.ConfigError` naming the problem and the fix.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from dynamoe.config import ConfigError, ModelConfig
from dynamoe.training import checkpoint as ckpt

# fp32 weights and gradients, and AdamW's two moments: bytes per parameter while training.
TRAINING_BYTES_PER_PARAM = 16
# What a checkpoint holds per parameter: fp32 weights and the two moments.
CHECKPOINT_BYTES_PER_PARAM = 12


def count_parameters(cfg: ModelConfig) -> tuple[int, int] | None:
    """(all parameters, those of routed experts), from a copy built on the meta device (no
    memory); None for a pretrained encoder, whose size comes from its own files."""
    if cfg.kind == "hf_encoder":
        return None
    from dynamoe.layers.experts import GroupedExperts
    from dynamoe.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    seen, total, experts = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:  # tied weights once
            seen.add(id(p))
            total += p.numel()
            experts += p.numel() if id(p) in expert_ids else 0
    return total, experts


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get: free memory of this process's GPU (``LOCAL_RANK``), else
    the host's MemAvailable (shared by the processes on the host)."""
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(params: int, expert_params: int, ep_size: int, available: int | None) -> None:
    """Each process holds the dense parameters and 1/ep_size of the experts', with gradients and
    Adam state; on CPU the processes this host runs (LOCAL_WORLD_SIZE) share its memory, on GPUs
    each has its own device."""
    if available is None:
        return
    per_process = (params - expert_params + expert_params / ep_size) * TRAINING_BYTES_PER_PARAM
    sharing = 1 if torch.cuda.is_available() else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_host = per_process * sharing
    if per_host > available:
        raise ConfigError(
            f"model: training needs about {_gib(per_host)} for weights, gradients and Adam state "
            f"({params:,} parameters) and this machine has {_gib(available)} available; fix: make the model "
            "smaller (model.d_model, model.n_layers, model.moe.num_experts, model.moe.d_expert), or spread the "
            "experts over more processes with parallel.ep_size"
        )


def warn_if_plan_does_not_fit(cfg, *, world: int | None = None, on_gpu: bool | None = None) -> int | None:
    """Warn when the memory plan (``dynamoe.training.memory_plan``) says one rank needs more than
    it has: a GPU's free memory, or the host's available memory shared by its processes. Returns
    the planned bytes per rank (None where the planner does not cover the model)."""
    from dynamoe.training.memory_plan import plan

    if cfg.model.kind not in ("decoder", "encoder"):
        return None
    world = world or int(os.environ.get("WORLD_SIZE", cfg.parallel.ep_size))
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    available = available_memory_bytes()
    if available is None:
        return None
    if not on_gpu:  # the processes of a CPU run share this host
        available //= int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        needed = plan(cfg, world, device="cuda" if on_gpu else "cpu", available_bytes=available)
    except ConfigError:
        return None  # the run itself reports a bad process count, with the same message
    if needed.total > available:
        warnings.warn(
            f"the memory plan estimates {_gib(needed.total)} per process and {_gib(available)} is available, so "
            "this run will probably run out of memory (see `moe plan`); fix: set train.activation_checkpointing "
            "(blocks), train.precision bf16 with parallel.zero_stage 1 or 2, a higher parallel.zero_stage or "
            "parallel.ep_size, or a smaller train.batch_size",
            stacklevel=2,
        )
    return needed.total


def check_run_dir(run_dir: Path, *, resuming: bool, restart: bool, checkpoint_bytes: int | None) -> None:
    """The run folder can be created and written, is not another run's, and its disk has room."""
    run_dir = Path(run_dir)
    if not resuming and not restart and ckpt.list_checkpoints(run_dir):
        raise ConfigError(
            f"train.run_dir: '{run_dir}' already holds checkpoints of another run; "
            "fix: pass --resume to continue it, --run-dir for a new folder, or delete it"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"train.run_dir: cannot write to '{run_dir}' ({err.strerror or err}); "
            "fix: choose a writable folder with --run-dir or train.run_dir"
        ) from None
    for stale in ckpt.remove_partial_saves(run_dir):
        warnings.warn(f"removed {stale}, left by a save that was cut short", stacklevel=2)
    if checkpoint_bytes:
        free = shutil.disk_usage(run_dir).free
        needed = int(checkpoint_bytes * 1.1) + (16 << 20)
        if free < needed:
            raise ConfigError(
                f"train.run_dir: '{run_dir}' has {_gib(free)} free and one checkpoint needs about "
                f"{_gib(checkpoint_bytes)}; fix: free disk space or choose a folder on a larger disk with --run-dir"
            )


def preflight(cfg, run_dir: Path, *, resuming: bool, restart: bool, is_main: bool) -> None:
    """Every check that needs no process group (``cfg``: the run config, filled from the data)."""
    counts = count_parameters(cfg.model)
    if counts is not None:
        check_memory(*counts, cfg.parallel.ep_size, available_memory_bytes())
    if is_main:
        warn_if_plan_does_not_fit(cfg)
        check_run_dir(
            run_dir,
            resuming=resuming,
            restart=restart,
            checkpoint_bytes=None if counts is None else counts[0] * CHECKPOINT_BYTES_PER_PARAM,
        )
