"""Whole-model training state, independent of how experts and optimizer state are partitioned.

This is the full checkpoint format's side (``train.checkpoint_format: full``): every tensor in its
global (unsharded) form, experts 0..E-1 stacked and the optimizer moments of every parameter at
full size. Saving gathers expert shards over the expert-parallel group (and, under ZeRO, optimizer
partitions through DeepSpeed's fragment API) to rank 0; loading takes this rank's slice. So a
checkpoint written with one expert-parallel size or ZeRO stage loads into any other. Weights are
always fp32: under bf16 they are the optimizer's fp32 master weights, not the bf16 copies the model
computes with, so a checkpoint resumes exactly and loads into a run of either precision. The
sharded format (``checkpoint_sharded.py``) writes the same tensors without the gather.

Every function here that gathers or scatters is collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dynamoe.layers.experts import GroupedExperts

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_shards(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (first global expert, experts held)} for every expert parameter."""
    shards = {}
    for prefix, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            for name, _ in module.named_parameters(recurse=False):
                shards[f"{prefix}.{name}" if prefix else name] = (module.first_expert, module.num_local)
    return shards


def _for_writer(t: torch.Tensor, group, is_expert: bool) -> torch.Tensor | None:
    """``t`` in global form on the host of global rank 0, which writes checkpoints; None elsewhere.

    Expert shards are gathered over the expert-parallel group that holds rank 0 only (the other
    groups hold replicas of the same experts), so no other rank ever holds the whole model.
    """
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if not is_expert or group is None or dist.get_world_size(group) == 1:
        return t.detach().cpu() if writer else None
    if 0 not in dist.get_process_group_ranks(group):
        return None
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))] if writer else None
    dist.gather(t.detach().contiguous(), gather_list=pieces, dst=0, group=group)
    return torch.cat([p.cpu() for p in pieces]) if writer else None


def _local(full: torch.Tensor, name: str, shards: dict) -> torch.Tensor:
    if name not in shards:
        return full
    first, count = shards[name]
    return full[first : first + count]


def _masters_of(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """{parameter name: its fp32 master weights, this rank's experts} for parameters the model
    holds in lower precision (bf16 under ZeRO); empty when the model is fp32. Collective."""
    low = [(n, p) for n, p in model.named_parameters() if p.dtype != torch.float32]
    if not low:
        return {}
    if optimizer is None or not _is_zero(optimizer):
        raise ValueError("bf16 parameters without ZeRO's fp32 master weights")
    from deepspeed.utils import safe_get_full_fp32_param

    by_id = {}
    for _, p in low:
        if id(p) not in by_id:
            by_id[id(p)] = safe_get_full_fp32_param(p)  # gathered over p's data-parallel group
    # Every name of a tied parameter (the LM head and the embedding) gets the master.
    return {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id}


def full_model_state(model: nn.Module, ep_group, optimizer=None) -> dict[str, torch.Tensor]:
    """The whole model in global form and fp32 on rank 0 (an empty dict elsewhere); ``optimizer``
    (the engine's) supplies the master weights of a bf16 model."""
    shards = expert_shards(model)
    masters = _masters_of(model, optimizer)
    state = {}
    for name, t in model.state_dict().items():
        value = _for_writer(masters.get(name, t), ep_group, name in shards)
        if value is not None:
            state[name] = value.float() if value.is_floating_point() else value
    return state


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Load global tensors, keeping this rank's experts; returns (missing, unexpected) keys."""
    shards = expert_shards(model)
    own = model.state_dict()
    local = {}
    for name, t in state.items():
        if name in shards and name in own and t.shape[0] != own[name].shape[0] and t.shape[0] % own[name].shape[0] == 0:
            t = _local(t, name, shards)
        local[name] = t
    result = model.load_state_dict(local, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def _is_zero(optimizer) -> bool:
    return hasattr(optimizer, "single_partition_of_fp32_groups")


def full_optimizer_state(optimizer, model: nn.Module, ep_group) -> tuple[dict, list]:
    """Optimizer state as {"<key>/<parameter name>": global tensor} (on rank 0; empty elsewhere) and
    JSON parameter groups.

    ``optimizer`` is the engine's optimizer: a torch optimizer (ZeRO 0) or DeepSpeed's ZeRO 1/2
    optimizer, whose partitions are assembled with DeepSpeed's fragment API.
    """
    shards = expert_shards(model)
    tensors: dict[str, torch.Tensor] = {}
    if _is_zero(optimizer):
        from deepspeed.utils import safe_get_full_optimizer_state

        base = optimizer.optimizer
        steps = [s["step"] for s in base.state.values() if "step" in s]
        if steps:
            _relink_fragments(optimizer)
        step = torch.as_tensor(steps[0] if steps else 0.0, dtype=torch.float32)
        for name, p in model.named_parameters():
            for key in ADAM_MOMENTS:
                value = safe_get_full_optimizer_state(p, key)  # collective over p's data-parallel group
                if value is not None:
                    value = _for_writer(value, ep_group, name in shards)
                if value is not None:
                    tensors[f"{key}/{name}"] = value
            if steps:
                tensors[f"step/{name}"] = step.clone()
    else:
        for name, p in model.named_parameters():
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                t = _for_writer(t, ep_group, name in shards and t.dim() > 0)
                if t is not None:
                    tensors[f"{key}/{name}"] = t
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, optimizer_groups(optimizer, model)


def optimizer_groups(optimizer, model: nn.Module) -> list[dict]:
    """The engine's optimizer's parameter groups as JSON: hyperparameters and parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    if _is_zero(optimizer):
        source = list(zip(optimizer.optimizer.param_groups, optimizer.bit16_groups))  # flat partitions -> params
    else:
        source = [(g, g["params"]) for g in optimizer.param_groups]
    groups = []
    for group, params in source:
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({"params": [names[id(p)] for p in params if id(p) in names], **hyper})
    return groups


_GROUP_KEYS_NOT_RESTORED = ("params", "moe", "name")  # layout, not hyperparameters: set by this run


def load_full_optimizer_state(
    optimizer, model: nn.Module, tensors: dict, groups: list, model_state: dict | None = None
) -> None:
    """Restore state saved by :func:`full_optimizer_state` into this run's (possibly sharded)
    optimizer. Under ZeRO the fp32 master weights are set too: from ``model_state`` (the
    checkpoint's fp32 weights, global form) where given, else from the model."""
    restore_param_groups(optimizer, groups)
    shards = expert_shards(model)
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        state_key, name = key.split("/", 1)
        by_param.setdefault(name, {})[state_key] = t
    if _is_zero(optimizer):
        _load_zero_state(optimizer, model, by_param, shards, model_state or {})
        return
    for name, p in model.named_parameters():
        state = by_param.get(name)
        if state:
            optimizer.state[p] = {
                k: (_local(v, name, shards).to(p.device).clone() if v.dim() else v.clone()) for k, v in state.items()
            }


def restore_param_groups(optimizer, groups: list[dict]) -> None:
    """Set the hyperparameters of the optimizer's groups from :func:`optimizer_groups`' JSON."""
    from dynamoe.training.checkpoint import CheckpointError

    param_groups = optimizer.param_groups
    if len(groups) != len(param_groups):
        raise CheckpointError(
            f"optimizer has {len(param_groups)} parameter groups but the checkpoint has {len(groups)}; "
            "fix: resume with the same model and optimizer configuration"
        )
    for group, saved in zip(param_groups, groups):
        for key, value in saved.items():
            if key not in _GROUP_KEYS_NOT_RESTORED:
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def _relink_fragments(optimizer) -> None:
    """Point every parameter's ZeRO fragment at the current Adam state. DeepSpeed links them once,
    lazily, and can do it while only some groups have state yet (seen with 0.19), leaving the other
    groups' parameters without optimizer-state fragments."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def set_fp32_masters(optimizer, model: nn.Module, model_state: dict[str, torch.Tensor]) -> None:
    """Set ZeRO's fp32 master weights from global-form fp32 weights (this rank's experts sliced
    out), so a bf16 model's masters keep the precision its bf16 copies lost. Collective."""
    from deepspeed.utils import safe_set_full_fp32_param

    shards = expert_shards(model)
    for name, p in model.named_parameters():
        full = model_state.get(name)
        master = p.detach().float() if full is None else _local(full, name, shards).float()
        safe_set_full_fp32_param(p, master.to(p.device))


def _load_zero_state(optimizer, model: nn.Module, by_param: dict, shards: dict, model_state: dict) -> None:
    """ZeRO 1/2: the flat fp32 partitions get Adam state first (DeepSpeed creates it lazily at the
    first step), are linked to the parameters' fragments, then every fragment is written."""
    from deepspeed.utils import safe_set_full_optimizer_state

    steps = {float(state["step"]) for state in by_param.values() if "step" in state}
    base = optimizer.optimizer
    if steps:
        (step,) = steps  # one step count for the whole optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}}
        _relink_fragments(optimizer)
    set_fp32_masters(optimizer, model, model_state)
    for name, p in model.named_parameters():
        for key in ADAM_MOMENTS:
            if key in by_param.get(name, {}):
                safe_set_full_optimizer_state(p, _local(by_param[name][key], name, shards).float(), key)
