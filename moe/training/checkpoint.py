"""Checkpoints in an unpickled format: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``step_XXXXXXXX/`` in one of two formats, told apart by the files in it:

- full (format version 1): ``model.safetensors``, ``optimizer.safetensors`` and ``trainer.json``,
  every tensor in global form, written by rank 0 after a gather (:func:`save_checkpoint`);
- sharded (format version 2, ``checkpoint_sharded.py``): one ``rankNNNNN.safetensors`` per rank
  with the pieces it owns, ``index.json`` saying which file holds which range of each global
  tensor, and ``trainer.json``; every rank writes its own file, nothing is gathered.

Both end with ``manifest.json``, each file's size and SHA-256, written last and atomically as the
commit marker into a ``.partial`` folder that is then renamed. A folder without a manifest (a save
that was cut short) or whose files do not match it is refused with an error; nothing is ever
unpickled, so a checkpoint cannot run code. :func:`load_checkpoint` reads either format in global
form, so tools (export, eval) need not care which one a run wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1  # the full format: model.safetensors, optimizer.safetensors, trainer.json
SHARDED_FORMAT_VERSION = 2  # the sharded format (checkpoint_sharded.py): rank files, index.json, trainer.json
MANIFEST = "manifest.json"
SHARDED_INDEX = "index.json"
REQUIRED_FILES = frozenset({"model.safetensors", "optimizer.safetensors", "trainer.json"})
SHARDED_REQUIRED_FILES = frozenset({SHARDED_INDEX, "trainer.json"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message says which and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_checkpoint(folder: Path, *, model_state: dict, optim_tensors: dict, trainer_state: dict) -> Path:
    """Write a complete checkpoint into ``folder`` (replaced if it exists); returns the folder.
    A save that fails (a full disk, a folder made read-only) removes what it wrote and raises
    CheckpointError; the checkpoints already there are untouched."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    try:
        _write_checkpoint(tmp, model_state, optim_tensors, trainer_state)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"checkpoint '{folder}' could not be written ({_reason(err)}); fix: free disk space or make "
            f"'{folder.parent}' writable, then resume from the last checkpoint with --resume"
        ) from None
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Remove what saves cut short left behind (``*.partial`` folders); returns them."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(root.glob("*.partial")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _write_checkpoint(tmp: Path, model_state: dict, optim_tensors: dict, trainer_state: dict) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # safetensors refuses aliased storage (tied embeddings): store independent copies.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    save_file(optim_tensors, tmp / "optimizer.safetensors")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    _write_json_atomic(
        tmp / MANIFEST, {"format_version": FORMAT_VERSION, "files": files, "step": trainer_state["step"]}
    )


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder, checked for form only; raises CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint '{folder}' does not exist; fix: pass an existing checkpoint or run folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"checkpoint '{folder}' is incomplete (no {MANIFEST}: the save was interrupted); "
            "fix: resume from an earlier checkpoint, or delete this folder"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint '{folder}': {MANIFEST} is unreadable; fix: resume from an earlier checkpoint"
        ) from None
    version = manifest.get("format_version")
    if version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint '{folder}' has format version {version}, "
            f"this dynamoe reads {FORMAT_VERSION} and {SHARDED_FORMAT_VERSION}; "
            "fix: use the dynamoe version that wrote it"
        )
    required = REQUIRED_FILES if version == FORMAT_VERSION else SHARDED_REQUIRED_FILES
    if not isinstance(files, dict) or not required <= set(files):
        missing = sorted(required - set(files if isinstance(files, dict) else ()))
        raise CheckpointError(
            f"checkpoint '{folder}': {MANIFEST} lists no entry for {', '.join(missing)}; "
            "fix: resume from an earlier checkpoint"
        )
    return manifest


def verify_checkpoint(folder: Path, hash_files: set[str] | None = None) -> dict:
    """Check a checkpoint against its manifest; returns the manifest or raises CheckpointError.
    Every file's presence and size are checked; ``hash_files`` limits the SHA-256 checks to those
    files (ranks of a sharded load share the hashing), None hashes all. A sharded checkpoint's
    index must name only files the manifest lists."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name, meta in sorted(files.items()):
        path = folder / name
        if not isinstance(meta, dict) or not {"bytes", "sha256"} <= set(meta):
            raise CheckpointError(
                f"checkpoint '{folder}': {MANIFEST} entry {name} is malformed; fix: resume from an earlier checkpoint"
            )
        if not path.exists():
            raise CheckpointError(f"checkpoint '{folder}' is missing {name}; fix: resume from an earlier checkpoint")
        hashed = hash_files is None or name in hash_files
        if path.stat().st_size != meta["bytes"] or (hashed and _sha256(path) != meta["sha256"]):
            raise CheckpointError(
                f"checkpoint '{folder}': {name} is corrupt (size or SHA-256 differs from the manifest); "
                "fix: resume from an earlier checkpoint"
            )
    if manifest["format_version"] == SHARDED_FORMAT_VERSION:
        from dynamoe.training.checkpoint_files import ShardedReader

        unlisted = sorted(ShardedReader(folder).files() - set(files))
        if unlisted:
            raise CheckpointError(
                f"checkpoint '{folder}': its index names {', '.join(unlisted)}, which {MANIFEST} does not list; "
                "fix: resume from an earlier checkpoint"
            )
    return manifest


def is_sharded(folder: Path) -> bool:
    """A checkpoint in the sharded format (per-rank files and an index) rather than the full one."""
    return (Path(folder) / SHARDED_INDEX).exists()


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """Verify, then read (model_state, optimizer_tensors, trainer_state), every tensor in global
    form, from a checkpoint of either format (a sharded one is assembled from its ranks' files)."""
    folder = Path(folder)
    manifest = verify_checkpoint(folder)
    trainer_state = json.loads((folder / "trainer.json").read_text())
    if manifest["format_version"] == SHARDED_FORMAT_VERSION:
        from dynamoe.training.checkpoint_files import ShardedReader

        with ShardedReader(folder) as reader:
            model_state = {k.removeprefix("model/"): reader.read_full(k) for k in reader.keys("model/")}
            optim = {k.removeprefix("optim/"): reader.read_full(k) for k in reader.keys("optim/")}
        return model_state, optim, trainer_state
    try:
        model_state = load_file(folder / "model.safetensors")
        optim = load_file(folder / "optimizer.safetensors")
    except SafetensorError as err:
        raise CheckpointError(
            f"checkpoint '{folder}' cannot be read ({err}); fix: resume from an earlier checkpoint"
        ) from None
    return model_state, optim, trainer_state


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints (with a manifest) under ``run_dir/checkpoints``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).exists() and not p.name.endswith(".partial")
    )


def is_checkpoint_folder(path: Path) -> bool:
    """A checkpoint's own folder (rather than a run folder holding checkpoints)."""
    return (path / MANIFEST).exists() or path.name.startswith("step_")


def resolve_resume(path: Path) -> Path:
    """A checkpoint folder, or the newest committed checkpoint of a run folder."""
    path = Path(path)
    if is_checkpoint_folder(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"no committed checkpoint under '{path}/checkpoints'; "
            "fix: pass a checkpoint folder or start without --resume"
        )
    return found[-1]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        # The manifest goes first: a prune cut short leaves an uncommitted folder, never a
        # half-deleted one that still looks committed.
        with contextlib.suppress(OSError):
            (old / MANIFEST).unlink()
        shutil.rmtree(old, ignore_errors=True)


EXPORT_FORMAT = "dynamoe-model-1"


def load_newest_intact(run_dir: Path) -> tuple[Path, tuple[dict, dict, dict], list[tuple[Path, str]]]:
    """The newest checkpoint of ``run_dir`` that verifies and reads, what :func:`load_checkpoint`
    gives for it, and the newer ones skipped with why (each checkpoint verified once)."""
    skipped = []
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return folder, load_checkpoint(folder), skipped
        except CheckpointError as err:
            skipped.append((folder, str(err)))
    if skipped:
        raise CheckpointError(
            f"no intact checkpoint under '{run_dir}/checkpoints' ({len(skipped)} corrupt: {skipped[0][1]})"
        )
    raise CheckpointError(
        f"no committed checkpoint under '{run_dir}/checkpoints'; fix: pass a run folder with checkpoints"
    )


@dataclass(frozen=True)
class ExportResult:
    path: Path
    step: int
    checkpoint: Path
    skipped: list  # (newer checkpoint, why it was skipped)


def export_model(source: Path, out: Path) -> ExportResult:
    """Write a checkpoint's whole model (every global expert) to one safetensors file, with the
    model config in the file's metadata so that :func:`load_exported` can rebuild it alone. A run
    folder exports its newest intact checkpoint (newer corrupt ones are skipped and named)."""
    source = Path(source)
    if is_checkpoint_folder(source):
        folder, (model_state, _, state), skipped = source, load_checkpoint(source), []
    else:
        folder, (model_state, _, state), skipped = load_newest_intact(source)
    if "model_config" not in state:
        raise CheckpointError(
            f"checkpoint '{folder}' records no model config; fix: export a checkpoint written by this version"
        )
    write_exported(state["model_config"], model_state, out, step=int(state["step"]))
    return ExportResult(Path(out), int(state["step"]), folder, skipped)


def write_exported(model_config: dict, model_state: dict, out: Path, *, step: int = 0, source: str = "") -> Path:
    """One safetensors file with the whole model and its config in the metadata (what
    :func:`load_exported` and ``train.init_from`` read), written beside ``out`` and renamed."""
    out = Path(out)
    metadata = {"format": EXPORT_FORMAT, "model_config": json.dumps(model_config), "step": str(step)}
    if source:
        metadata["source"] = source
    tmp = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model_state.items()}, tmp, metadata=metadata)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write '{out}' ({_reason(err)}); fix: choose a writable folder with free space"
        ) from None
    return out


def read_exported(path: Path) -> tuple[dict, dict]:
    """(metadata, {name: tensor}) of a file written by :func:`write_exported`, checked to be one; the
    metadata's ``model_config`` is JSON, ``step`` a string."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported model '{path}' does not exist; fix: pass the file written by `moe export`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"exported model '{path}' cannot be read ({err}); fix: export it again") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"'{path}' is not a dynamoe model export (format {metadata.get('format')!r}); "
            "fix: pass a file written by `moe export`"
        )
    return metadata, tensors


def load_init_model(path: str | Path):
    """(model config, model) that ``train.init_from`` names: an exported file (``moe export``,
    ``moe import``), or a Hugging Face model folder imported on the fly."""
    source = Path(path).expanduser()
    if source.is_dir():
        from dynamoe.interop.hf_models import import_model

        imported = import_model(str(source))
        return imported.config, imported.model
    return load_exported(source)


def load_exported(path: Path):
    """(ModelConfig, model) from a file written by :func:`export_model`; the weights load strictly."""
    from dynamoe.config import ModelConfig, from_dict
    from dynamoe.models import build_model

    metadata, tensors = read_exported(path)
    cfg = from_dict(ModelConfig, json.loads(metadata["model_config"]), "model")
    model = build_model(cfg)
    model.load_state_dict(tensors, strict=True)
    return cfg, model


def load_model(source: Path):
    """(ModelConfig, model in eval mode) from an exported file, a checkpoint folder or a run folder
    (its newest checkpoint)."""
    from dynamoe.config import ModelConfig, from_dict
    from dynamoe.models import build_model

    source = Path(source)
    if source.is_file():
        cfg, model = load_exported(source)
        return cfg, model.eval()
    folder = resolve_resume(source)
    model_state, _, state = load_checkpoint(folder)
    if "model_config" not in state:
        raise CheckpointError(
            f"checkpoint '{folder}' records no model config; fix: use a checkpoint written by this version"
        )
    cfg = from_dict(ModelConfig, state["model_config"], "model")
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{folder}' does not fit its recorded model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); fix: load it with the version of dynamoe that wrote it"
        )
    return cfg, model.eval()
