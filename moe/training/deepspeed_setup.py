"""DeepSpeed set-up for the trainer: the process group, optimizer groups, the engine's view of
MoE layers, and gradient clipping over sharded experts. The only module besides the trainer that
imports DeepSpeed, and it does so lazily."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from datetime import timedelta

import torch

from dynamoe.layers.expert_parallel import is_expert_param


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_precision_supported(precision: str) -> None:
    """bf16 needs a device that computes in it: any CPU PyTorch runs (DeepSpeed's CPU accelerator
    takes bf16), and GPUs from NVIDIA's Ampere (or AMD's MI200) on."""
    if precision != "bf16" or not torch.cuda.is_available():
        return
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        from dynamoe.config import ConfigError

        raise ConfigError(
            f"train.precision: bf16 is not supported by this GPU ({torch.cuda.get_device_name()}); "
            "fix: set train.precision: fp32, or run on a GPU with bf16 (NVIDIA A100, H100, L4 and later)"
        )


def init_distributed(backend: str, collective_timeout_s: float | None = None):
    """Prepare the environment DeepSpeed expects, then import it and start the process group, whose
    collectives give up after ``collective_timeout_s`` (``parallel.collective_timeout_s``)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Also when a launcher (Ray Train) already started the torch process group: DeepSpeed then
    # wraps the existing group instead of creating one.
    kwargs = {} if collective_timeout_s is None else {"timeout": timedelta(seconds=collective_timeout_s)}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
    return deepspeed


def apply_collective_timeout(collective_timeout_s: float) -> int:
    """Give every process group of this process the collective timeout; returns how many.

    ``init_distributed`` cannot cover them all: a group a launcher created first (Ray Train's, with
    its own 30-minute default) is only wrapped, and ``new_group`` (DeepSpeed's expert-parallel and
    expert-data-parallel groups) takes torch's backend default, not the world group's timeout. So
    this runs once every group exists, after the engine is built."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=collective_timeout_s)
    groups = [pg for pg in c10d._world.pg_map if pg is not c10d.GroupMember.NON_GROUP_MEMBER]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    expert_group: str | None,
    early_exit: set[int] | frozenset = frozenset(),
):
    """AdamW groups: matrices decay; norms, biases and embeddings do not. Expert parameters form a
    group of their own, marked the way DeepSpeed's ZeRO expects (``moe``, ``name``), so ZeRO
    partitions them over the expert-data-parallel group. Parameters whose id is in ``early_exit``
    get groups of their own, marked ``early_exit`` (two-stage exit training sets their rate apart)."""
    decay, no_decay, experts, expert_biases, exit_decay, exit_no_decay = [], [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Stacked expert biases are matrices ([E, width]) but biases all the same: no decay.
        bias = name.endswith((".b1_EF", ".b2_ED"))
        if expert_group is not None and is_expert_param(p):
            (expert_biases if bias else experts).append(p)
        elif p.dim() >= 2 and "emb" not in name and not bias:
            (exit_decay if id(p) in early_exit else decay).append(p)
        else:
            (exit_no_decay if id(p) in early_exit else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [
        g
        for g in (
            {"params": exit_decay, "weight_decay": weight_decay, "early_exit": True},
            {"params": exit_no_decay, "weight_decay": 0.0, "early_exit": True},
        )
        if g["params"]
    ]
    if experts:
        groups.append({"params": experts, "weight_decay": weight_decay, "moe": True, "name": expert_group})
    if expert_biases:
        groups.append({"params": expert_biases, "weight_decay": 0.0, "moe": True, "name": expert_group})
    return groups


@contextmanager
def deepspeed_recognises(layer_cls):
    """Let DeepSpeed's engine treat ``layer_cls`` modules as its MoE layers while it is built.

    The engine switches on its expert-parallel machinery (expert-data-parallel gradient
    reduction and broadcast, MoE-aware ZeRO partitioning) only when it finds an instance of its
    own ``MoE`` class; it reads nothing from the module but ``num_experts``.
    """
    import deepspeed.runtime.engine as engine_module

    original = engine_module.MoE
    engine_module.MoE = (original, layer_cls)
    try:
        yield
    finally:
        engine_module.MoE = original


def global_grad_norm(model: torch.nn.Module, ep_group) -> float:
    """L2 norm of the whole model's gradient: replicated parameters once, expert shards summed over
    the expert-parallel group, so every rank gets the norm one device would compute."""
    shared = torch.zeros((), dtype=torch.float64)
    experts = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().square().sum()
            if is_expert_param(p):
                experts += sq
            else:
                shared += sq
    if ep_group is not None and torch.distributed.get_world_size(ep_group) > 1:
        torch.distributed.all_reduce(experts, group=ep_group)
    return float((shared + experts).sqrt())


def clip_gradients_(model: torch.nn.Module, max_norm: float, total_norm: float) -> None:
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
