"""Sharded checkpoints: every rank writes the tensors it owns, in parallel, and nothing is gathered.

What a rank owns:

- Under ZeRO 1/2, the fragments of its optimizer partition: the fp32 master weights (so a bf16
  run's checkpoint holds the masters, as the full format does) and both Adam moments.
- Everything replicated (weights and moments under ZeRO 0, buffers such as the aux-free bias,
  frozen parameters, step counts) is written once, by one of the ranks that hold it; owners are
  chosen by the same greedy balance of bytes on every rank (largest first, to the least loaded
  holder), so no rank writes much more than its share. An expert shard's holders are the ranks
  with its expert-parallel index; a dense tensor's are all ranks.

Each rank writes ``rankNNNNN.safetensors`` into the checkpoint's ``.partial`` folder and hashes it
as it writes; the piece lists and hashes (small JSON) are gathered to rank 0, which writes
``index.json`` and ``trainer.json``, then ``manifest.json`` last, and renames the folder: a
checkpoint cut short anywhere is never loaded. With ``background=True`` only the copy of the owned
tensors to host memory happens in :func:`save_sharded`; the files are written by a thread and
committed by :meth:`PendingSave.finish`, which every rank calls at the same point of the loop.

Loading reads only the ranges this rank needs (its experts, its ZeRO fragments), whatever the
world size, expert-parallel size and ZeRO stage that wrote the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dynamoe.training import checkpoint as ckpt
from dynamoe.training.checkpoint_files import (
    INDEX,
    INDEX_FORMAT,
    Piece,
    ShardedReader,
    build_index,
    dtype_name,
    rank_file,
    write_pieces,
)
from dynamoe.training.sharded_state import ADAM_MOMENTS, _is_zero, _relink_fragments, expert_shards

MODEL, OPTIM = "model/", "optim/"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_json(obj, device: torch.device | str = "cpu") -> list:
    """``obj`` of every rank, as JSON (never pickled), in rank order. Collective."""
    rank, world = _world()
    if world == 1:
        return [json.loads(json.dumps(obj))]
    data = json.dumps(obj).encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else buf[:0]
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return [json.loads(bytes(b[: int(s.item())].cpu().numpy())) for b, s in zip(bufs, sizes)]


@dataclass
class _Replicated:
    """A tensor every holder has the same copy of; one of them writes it."""

    key: str
    holders: tuple[int, ...]
    nbytes: int
    local: torch.Tensor | None  # this rank's copy (None when it is another shard's)
    offset: int
    shape: tuple[int, ...]


@dataclass
class Snapshot:
    """What this rank writes: its pieces and the global shape and dtype of each."""

    pieces: list[Piece] = field(default_factory=list)
    metas: dict[str, dict] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, offset: int, tensor: torch.Tensor, shape) -> None:
        self.pieces.append(Piece(key, offset, tensor.detach().reshape(-1)))
        self.metas[key] = {"shape": list(shape), "dtype": dtype_name(tensor.dtype)}


def _row(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def snapshot(model: nn.Module, optimizer, ep_size: int, *, copy: bool = False) -> Snapshot:
    """The pieces this rank owns (views of the live tensors, or host copies with ``copy``)."""
    rank, world = _world()
    if world % ep_size:
        raise ValueError(f"world size {world} is not a multiple of ep_size {ep_size}")
    shards = expert_shards(model)
    for name, (first, count) in shards.items():
        # Owners are planned from DeepSpeed's layout: expert-parallel groups of consecutive ranks.
        if first != (rank % ep_size) * count:
            raise ValueError(
                f"{name}: rank {rank} holds experts from {first}, not {(rank % ep_size) * count} as expert-parallel "
                f"groups of {ep_size} consecutive ranks would"
            )
    zero = _is_zero(optimizer) if optimizer is not None else False
    snap = Snapshot()
    replicated: list[_Replicated] = []

    def replicate(key: str, name: str, t: torch.Tensor) -> None:
        if t.is_floating_point():
            t = t.float()  # weights and moments are fp32 in every checkpoint
        if name in shards and t.dim() > 0:
            _, count = shards[name]
            shape = (count * ep_size, *t.shape[1:])
            for j in range(ep_size):  # every shard, so all ranks plan the same owners
                replicated.append(
                    _Replicated(
                        key,
                        tuple(range(j, world, ep_size)),
                        t.numel() * t.element_size(),
                        t if j == rank % ep_size else None,
                        j * count * _row(shape),
                        shape,
                    )
                )
        else:
            replicated.append(_Replicated(key, tuple(range(world)), t.numel() * t.element_size(), t, 0, tuple(t.shape)))

    def global_shape(name: str, t: torch.Tensor) -> tuple[tuple[int, ...], int]:
        if name not in shards:
            return tuple(t.shape), 0
        first, count = shards[name]
        shape = (count * ep_size, *t.shape[1:])
        return shape, first * _row(shape)

    canonical: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in canonical:  # a tied weight: stored once, named twice
            snap.aliases[MODEL + name] = MODEL + canonical[id(t)]
            continue
        canonical[id(t)] = name
        if zero and hasattr(t, "_hp_mapping"):
            mapping = t._hp_mapping
            if mapping is not None:  # this rank's fragment of the fp32 master weights
                shape, base = global_shape(name, t)
                snap.add(MODEL + name, base + mapping.lp_fragment_address.start, mapping.get_hp_fragment(), shape)
        else:
            replicate(MODEL + name, name, t.detach())

    params = dict(model.named_parameters())
    if zero:
        base_opt = optimizer.optimizer
        steps = [s["step"] for s in base_opt.state.values() if "step" in s]
        if steps:
            _relink_fragments(optimizer)
            step = torch.as_tensor(steps[0], dtype=torch.float32)
            for name, p in params.items():
                if not hasattr(p, "_hp_mapping"):
                    continue
                replicate(f"{OPTIM}step/{name}", name, step.clone())
                if p._hp_mapping is None:
                    continue
                shape, base = global_shape(name, p)
                for key in ADAM_MOMENTS:
                    fragment = p._hp_mapping.get_hp_fragment(key)
                    snap.add(f"{OPTIM}{key}/{name}", base + p._hp_mapping.lp_fragment_address.start, fragment, shape)
    else:
        for name, p in params.items():
            for key, value in optimizer.state.get(p, {}).items() if optimizer is not None else ():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                replicate(f"{OPTIM}{key}/{name}", name, t.detach())

    # Owners: the largest tensors first, each to its least loaded holder (ties: the lowest rank).
    load = [0] * world
    for item in sorted(replicated, key=lambda r: (-r.nbytes, r.key, r.offset)):
        owner = min(item.holders, key=lambda r: (load[r], r))
        load[owner] += item.nbytes
        if owner == rank:
            snap.add(item.key, item.offset, item.local, item.shape)
    if copy:  # the training loop may change the live tensors while a thread writes these
        snap.pieces = [Piece(p.key, p.offset, p.tensor.to("cpu", copy=True)) for p in snap.pieces]
    return snap


class PendingSave:
    """A save whose files are being written (by a thread, or already); :meth:`finish` commits it."""

    def __init__(self, folder: Path, tmp: Path, snap: Snapshot, trainer_state: dict, info: dict, device, background):
        self.folder, self.tmp, self.step = folder, tmp, int(trainer_state["step"])
        self._trainer_state, self._info, self._device = trainer_state, info, device
        self._aliases = snap.aliases
        self._report: dict | None = None
        rank, _ = _world()
        self._rank = rank
        if background:
            self._thread = threading.Thread(target=self._write, args=(snap,), name="dynamoe-checkpoint", daemon=True)
            self._thread.start()
        else:
            self._thread = None
            self._write(snap)

    def _write(self, snap: Snapshot) -> None:
        name = rank_file(self._rank)
        try:
            stored = write_pieces(self.tmp / name, snap.pieces, {"format": INDEX_FORMAT})
            self._report = {
                "file": name,
                **stored,
                "pieces": [[p.key, p.offset, p.tensor.numel()] for p in snap.pieces],
                "metas": snap.metas,
                "error": None,
            }
        except Exception as err:  # in a thread: whatever failed must reach finish() on every rank
            self._report = {"error": f"rank {self._rank} could not write {name} ({ckpt._reason(err)})"}

    def ready(self) -> bool:
        """This rank's files are written (no collective)."""
        return self._thread is None or not self._thread.is_alive()

    def finish(self) -> Path | None:
        """Wait for this rank's files, then commit on rank 0: index, trainer state, manifest last,
        rename. Collective; every rank raises the same CheckpointError when any part failed.
        Returns the committed folder on rank 0 and None elsewhere."""
        if self._thread is not None:
            self._thread.join()
        reports = all_gather_json(self._report, self._device)
        failure = next((r["error"] for r in reports if r["error"]), None)
        if self._rank == 0:
            if failure is None:
                failure = self._commit(reports)
            if failure is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        (failure,) = all_gather_json(failure, self._device)[:1]
        if failure is not None:
            raise ckpt.CheckpointError(
                f"checkpoint '{self.folder}' could not be written ({failure}); fix: free disk space or make "
                f"'{self.folder.parent}' writable, then resume from the last checkpoint with --resume"
            )
        return self.folder if self._rank == 0 else None

    def _commit(self, reports: list[dict]) -> str | None:
        metas: dict = {}
        placed = []
        for r in reports:
            metas.update(r["metas"])
            placed += [(r["file"], key, offset, numel) for key, offset, numel in r["pieces"]]
        try:
            index = build_index(metas, placed, self._aliases, self._info)
        except ValueError as err:  # a rank left out something it owns: a bug, never a partial load
            return f"the ranks' pieces do not make whole tensors: {err}"
        try:
            files = {r["file"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in reports}
            # The index is for programs (compact: it lists every piece); the trainer state stays readable.
            texts = (
                (INDEX, json.dumps(index, sort_keys=True)),
                ("trainer.json", json.dumps(self._trainer_state, indent=2)),
            )
            for name, text in texts:
                path = self.tmp / name
                path.write_text(text)
                files[name] = {"bytes": path.stat().st_size, "sha256": ckpt._sha256(path)}
            ckpt._write_json_atomic(
                self.tmp / ckpt.MANIFEST,
                {"format_version": ckpt.SHARDED_FORMAT_VERSION, "files": files, "step": self.step},
            )
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(self.tmp, self.folder)
        except OSError as err:
            return ckpt._reason(err)
        return None


def save_sharded(
    folder: Path,
    model: nn.Module,
    optimizer,
    trainer_state: dict,
    *,
    ep_size: int,
    zero_stage: int,
    device: torch.device | str = "cpu",
    background: bool = False,
) -> PendingSave:
    """Start a sharded save of ``model`` and ``optimizer`` (the engine's) into ``folder``; collective.
    ``trainer_state`` is rank 0's. Without ``background`` the files are written before this
    returns; call :meth:`PendingSave.finish` on every rank to commit either way."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    rank, world = _world()
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            error = ckpt._reason(err)
    (error,) = all_gather_json(error, device)[:1]  # nobody writes before the folder exists
    if error is not None:
        raise ckpt.CheckpointError(
            f"checkpoint '{folder}' could not be written ({error}); fix: free disk space or make "
            f"'{folder.parent}' writable, then resume from the last checkpoint with --resume"
        )
    snap = snapshot(model, optimizer, ep_size, copy=background)
    info = {"world_size": world, "ep_size": ep_size, "zero_stage": zero_stage}
    return PendingSave(folder, tmp, snap, trainer_state, info, device, background)


class PendingFullSave:
    """A full-format save (rank 0 writes the gathered state), maybe in a thread; :meth:`finish` waits
    for it and tells every rank the outcome."""

    def __init__(self, folder: Path, model_state, optim_tensors, trainer_state, device, background):
        self.folder, self.step, self._device = Path(folder), int(trainer_state["step"]), device
        self._error: str | None = None
        self._rank = _world()[0]
        args = (model_state, optim_tensors, trainer_state)
        self._thread = None
        if self._rank != 0:
            return
        if background:
            self._thread = threading.Thread(target=self._write, args=args, name="dynamoe-checkpoint", daemon=True)
            self._thread.start()
        else:
            self._write(*args)

    def _write(self, model_state, optim_tensors, trainer_state) -> None:
        try:
            ckpt.save_checkpoint(
                self.folder, model_state=model_state, optim_tensors=optim_tensors, trainer_state=trainer_state
            )
        except ckpt.CheckpointError as err:
            self._error = str(err)
        except Exception as err:  # in a thread: whatever failed must reach finish() on every rank
            self._error = f"checkpoint '{self.folder}' could not be written ({ckpt._reason(err)})"

    def ready(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def finish(self) -> Path | None:
        if self._thread is not None:
            self._thread.join()
        (error,) = all_gather_json(self._error, self._device)[:1]
        if error is not None:
            raise ckpt.CheckpointError(error)
        return self.folder if self._rank == 0 else None


def start_full_save(
    folder: Path, model_state: dict, optim_tensors: dict, trainer_state: dict, *, device="cpu", background=False
) -> PendingFullSave:
    """A full-format save of state gathered on rank 0 (:mod:`dynamoe.training.sharded_state`);
    with ``background`` rank 0 copies the tensors that are views of live ones and writes in a thread."""
    if background and _world()[0] == 0:
        model_state = {k: v.clone() for k, v in model_state.items()}
        optim_tensors = {k: v.clone() for k, v in optim_tensors.items()}
    return PendingFullSave(folder, model_state, optim_tensors, trainer_state, device, background)


# --- loading -----------------------------------------------------------------------------------


def verify_distributed(folder: Path, device: torch.device | str = "cpu") -> None:
    """Check ``folder`` against its manifest with the hashing spread over the ranks (each hashes
    every world-th file); every rank raises the same CheckpointError if any check fails. Collective."""
    rank, world = _world()
    error = None
    try:
        manifest = ckpt.read_manifest(folder)
        names = sorted(manifest["files"])
        ckpt.verify_checkpoint(folder, hash_files=set(names[rank::world]))
    except ckpt.CheckpointError as err:
        error = str(err)
    errors = [e for e in all_gather_json(error, device) if e]
    if errors:
        raise ckpt.CheckpointError(errors[0])


def _shape_error(folder, name: str, there, here) -> ckpt.CheckpointError:
    return ckpt.CheckpointError(
        f"checkpoint '{folder}': tensor {name} has shape {list(there)} there but {list(here)} in this model; "
        "fix: resume with the model config the checkpoint was trained with"
    )


def _local_range(name: str, t: torch.Tensor, shards: dict, ep_size: int) -> tuple[tuple[int, ...], int]:
    """(global shape, flat offset of this rank's local tensor in the global one)."""
    if name not in shards:
        return tuple(t.shape), 0
    first, count = shards[name]
    shape = (count * ep_size, *t.shape[1:])
    return shape, first * _row(shape)


def load_sharded(folder: Path, model: nn.Module, optimizer, *, ep_size: int, device="cpu") -> dict:
    """Load a sharded checkpoint into this rank's part of ``model`` and ``optimizer`` (the
    engine's); returns the trainer state. Reads only what this rank holds. Collective (the check)."""
    folder = Path(folder)
    verify_distributed(folder, device)
    trainer_state = json.loads((folder / "trainer.json").read_text())
    shards = expert_shards(model)
    zero = _is_zero(optimizer)
    with ShardedReader(folder) as reader:
        own = model.state_dict(keep_vars=True)
        wanted = {MODEL + n for n in own}
        stored = set(reader.keys(MODEL))
        if wanted != stored:
            missing = sorted(k.removeprefix(MODEL) for k in wanted - stored)
            unexpected = sorted(k.removeprefix(MODEL) for k in stored - wanted)
            raise ckpt.CheckpointError(
                f"checkpoint '{folder}' does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                "fix: resume with the config the checkpoint was trained with"
            )
        ranges = {}
        for name, t in own.items():  # every shape first, so a wrong model changes nothing
            shape, offset = _local_range(name, t, shards, ep_size)
            if reader.shape(MODEL + name) != shape:
                raise _shape_error(folder, name, reader.shape(MODEL + name), shape)
            ranges[name] = offset
        with torch.no_grad():
            for name, t in own.items():  # into the model's own memory, or one tensor at a time
                if reader.fits(MODEL + name, t):
                    reader.read(MODEL + name, ranges[name], t.numel(), out=t.data)
                else:
                    t.copy_(reader.read(MODEL + name, ranges[name], t.numel()).view(t.shape))
        _load_optimizer(reader, folder, optimizer, model, trainer_state, shards, ep_size, zero)
    return trainer_state


@torch.no_grad()  # ZeRO's fragments are views of leaves that require grad
def _load_optimizer(reader, folder, optimizer, model, trainer_state, shards, ep_size, zero) -> None:
    from dynamoe.training.sharded_state import restore_param_groups

    restore_param_groups(optimizer, trainer_state["optimizer_groups"])
    params = dict(model.named_parameters())
    by_param: dict[str, dict[str, str]] = {}
    for key in reader.keys(OPTIM):
        state_key, _, name = key.removeprefix(OPTIM).partition("/")
        by_param.setdefault(name, {})[state_key] = key
    if not zero:
        for name, p in params.items():
            state = {}
            for state_key, key in by_param.get(name, {}).items():
                if len(reader.shape(key)) == 0:
                    state[state_key] = reader.read_full(key).clone()
                    continue
                shape, offset = _local_range(name, p, shards, ep_size)
                if reader.shape(key) != shape:
                    raise _shape_error(folder, key.removeprefix(OPTIM), reader.shape(key), shape)
                current = optimizer.state.get(p, {}).get(state_key)
                if torch.is_tensor(current) and current.shape == p.shape and reader.fits(key, current):
                    reader.read(key, offset, p.numel(), out=current)  # in place: no second copy of the moments
                    state[state_key] = current
                else:
                    state[state_key] = reader.read(key, offset, p.numel()).view(p.shape).to(p.device)
            if state:
                optimizer.state[p] = state
        return
    steps = {float(reader.read_full(k)) for k in reader.keys(OPTIM + "step/")}
    base = optimizer.optimizer
    if len(steps) > 1:
        raise ckpt.CheckpointError(
            f"checkpoint '{folder}' holds several optimizer step counts {sorted(steps)[:3]}, which ZeRO keeps as "
            "one; fix: resume it with parallel.zero_stage: 0"
        )
    if steps:
        (step,) = steps
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}}
        _relink_fragments(optimizer)
    for name, p in params.items():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue
        shape, offset = _local_range(name, p, shards, ep_size)
        start = offset + mapping.lp_fragment_address.start
        numel = mapping.lp_fragment_address.numel
        # The fp32 masters from the checkpoint's fp32 weights, not from the (maybe bf16) model.
        _read_into(reader, MODEL + name, start, numel, mapping.get_hp_fragment())
        if not steps:
            continue
        for key in ADAM_MOMENTS:
            full_key = f"{OPTIM}{key}/{name}"
            if full_key not in reader:
                continue
            if reader.shape(full_key) != shape:
                raise _shape_error(folder, f"{key}/{name}", reader.shape(full_key), shape)
            _read_into(reader, full_key, start, numel, mapping.get_hp_fragment(key))


def _read_into(reader: ShardedReader, key: str, start: int, numel: int, dest: torch.Tensor) -> None:
    if reader.fits(key, dest):
        reader.read(key, start, numel, out=dest)
    else:
        dest.copy_(reader.read(key, start, numel).view(dest.shape))
