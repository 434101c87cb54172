"""Hugging Face model folders on disk: read a config.json and (sharded) safetensors tensor by
tensor, never the whole model at once; write them the same way, into a temporary folder renamed
on success, so a failed export leaves nothing half-written.

Every error names the file or the field and the fix (``HFFormatError``, a ``ConfigError``, so the
command line prints one line and exits with status 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from dynamoe.config import ConfigError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 << 30


class HFFormatError(ConfigError):
    """A Hugging Face folder that cannot be read or written as asked."""


def resolve_source(name_or_path: str) -> Path:
    """A local folder as it is; otherwise a hub name, downloaded (config, weights, tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HFFormatError(f"'{path}' is a file; fix: pass the model's folder (holding {CONFIG_FILE})")
        return path
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise HFFormatError(
            f"'{name_or_path}' is neither a folder nor a hub name (owner/model); fix: pass a local model folder"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        )
    except Exception as err:  # offline, unknown repository, gated model: all end here
        raise HFFormatError(
            f"hub model '{name_or_path}' could not be downloaded ({type(err).__name__}: {err}); "
            "fix: check the name and the network, or download it and pass the local folder"
        ) from None
    return Path(folder)


class HFCheckpoint:
    """The tensors of a model folder by name, read one at a time from their shard."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config_path = self.folder / CONFIG_FILE
        if not config_path.is_file():
            raise HFFormatError(
                f"'{self.folder}' has no {CONFIG_FILE}; fix: pass the folder a transformers model was saved to"
            )
        try:
            self.config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise HFFormatError(f"'{config_path}' is not readable JSON ({err}); fix: restore the file") from None
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise HFFormatError(f"'{index}' has no readable weight_map ({err}); fix: restore the index") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise HFFormatError(
                        f"shard '{shard}' named in '{index}' is missing; fix: download or copy every shard the "
                        "index names into the folder"
                    )
            return dict(weight_map)
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            found = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = " (it holds PyTorch .bin files: re-save the model with safe_serialization)" if found else ""
            raise HFFormatError(
                f"'{self.folder}' has neither {INDEX_FILE} nor {SINGLE_FILE}{hint}; fix: pass a folder with "
                "safetensors weights"
            )
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise HFFormatError(
                f"tensor '{name}' is not in '{self.folder}'; fix: the checkpoint is incomplete or of another "
                "architecture than its config.json says"
            )
        shard = self.weight_map[name]
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def write_folder(
    out: Path,
    config: dict,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    extra_files: dict[str, Path] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``config`` and ``tensors`` (consumed one by one) as a transformers model folder:
    shards of at most ``max_shard_bytes`` with their index; ``extra_files`` (name -> a file or a
    folder whose files to copy) beside them. Written to ``OUT.partial`` and renamed at the end."""
    from safetensors.torch import save_file

    with staged_folder(out) as tmp:
        _write_shards(tmp, tensors, max_shard_bytes, save_file)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_into(tmp, extra_files or {})
    return Path(out)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new, empty ``OUT.partial`` to write into, renamed to ``out`` when the block ends well and
    removed when it does not; a non-empty ``out`` is refused before anything is written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HFFormatError(f"'{out}' exists and is not empty; fix: choose a new folder or delete it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HFFormatError(
            f"cannot write '{out}' ({getattr(err, 'strerror', None) or err}); fix: choose a writable folder with "
            "free space"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_into(folder: Path, files: dict[str, Path]) -> None:
    """Copy each file to ``folder / name``, or, for a folder, the files in it (a tokenizer's)."""
    for name, source in files.items():
        source = Path(source)
        if source.is_dir():
            for f in source.iterdir():
                if f.is_file():
                    shutil.copy2(f, folder / f.name)
        else:
            shutil.copy2(source, folder / name)


def _write_shards(folder: Path, tensors, max_shard_bytes: int, save_file) -> int:
    """Group tensors into shards in order; returns the number of shards written."""
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(written) + 1:05d}.safetensors.tmp"
            save_file(pending, str(folder / name), metadata={"format": "pt"})
            written.append((name, list(pending)))
            pending, pending_bytes = {}, 0

    for name, t in _unique(tensors):
        size = t.numel() * t.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = t.detach().cpu().contiguous()
        pending_bytes += size
        total += size
    flush()
    if len(written) == 1:  # one shard: transformers' single-file name, no index
        os.replace(folder / written[0][0], folder / SINGLE_FILE)
        return 1
    weight_map = {}
    for i, (tmp_name, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(folder / tmp_name, folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(written)


def _unique(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for name, t in tensors:
        if name in seen:
            raise HFFormatError(f"tensor '{name}' would be written twice; this is a bug in the exporter")
        seen.add(name)
        yield name, t


@contextlib.contextmanager
def opened(folder: Path):
    ckpt = HFCheckpoint(folder)
    try:
        yield ckpt
    finally:
        ckpt.close()
