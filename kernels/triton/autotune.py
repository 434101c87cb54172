"""Tile configurations for the grouped GEMMs, measured once per device and shape bucket, kept in JSON.

Triton's own ``@triton.autotune`` forgets its choice when the process ends and re-measures inside a
CUDA-graph capture, where measuring is illegal. Here the choice is keyed by
``device name | op | dtype | shape bucket``, measured on the first call outside a capture, and
written to ``$DYNAMOE_TRITON_TUNE_CACHE`` (default ``~/.cache/dynamoe/triton_tiles.json``).
``DYNAMOE_TRITON_TUNE=0`` skips measuring and uses each op's default tile.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

try:  # a tile that needs more shared memory or registers than the GPU has fails to compile or launch
    from triton.runtime.errors import TritonError

    _TILE_ERRORS: tuple[type[Exception], ...] = (TritonError, RuntimeError, ValueError)
except ImportError:
    _TILE_ERRORS = (RuntimeError, ValueError)


@dataclass(frozen=True)
class Tile:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def launch_kwargs(self) -> dict:
        return asdict(self)


# Candidates for H100/A100-class GPUs: 128x128 and 128x256 tiles feed the tensor cores for big
# groups; 64-row tiles waste less on the last tile of small fine-grained groups.
GPU_TILES = (
    Tile(128, 128, 64, 8, 4, 4),
    Tile(128, 128, 64, 8, 8, 3),
    Tile(128, 256, 64, 8, 8, 3),
    Tile(256, 128, 64, 8, 8, 3),
    Tile(64, 128, 64, 8, 4, 4),
    Tile(64, 256, 64, 8, 8, 3),
    Tile(128, 64, 64, 8, 4, 4),
    Tile(64, 64, 64, 8, 4, 4),
)
GPU_DEFAULT = Tile(128, 128, 64, 8, 8, 3)
# The interpreter runs each program in Python: few, moderately sized programs are fastest.
INTERPRETER_TILE = Tile(32, 32, 32, 4, 1, 1)


def cache_path() -> Path:
    env = os.environ.get("DYNAMOE_TRITON_TUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dynamoe" / "triton_tiles.json"


def shape_bucket(rows: int, *dims: int) -> str:
    """Rows rounded up to a power of two (they change every step), other dims exact."""
    bucket = 1 << max(0, int(rows) - 1).bit_length()
    return "x".join(str(v) for v in (bucket, *dims))


class TileCache:
    """In-memory view of the JSON file; reloaded when the path changes (tests point it elsewhere)."""

    def __init__(self):
        self._path: Path | None = None
        self._entries: dict[str, dict] = {}

    def _sync(self) -> None:
        path = cache_path()
        if path != self._path:
            self._path, self._entries = path, {}
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                pass  # missing or unreadable: start empty, the next choice rewrites it

    def get(self, key: str) -> Tile | None:
        self._sync()
        entry = self._entries.get(key)
        try:
            return Tile(**entry["tile"]) if entry else None
        except (TypeError, KeyError):
            return None

    def put(self, key: str, tile: Tile, ms: float, failed: list[str]) -> None:
        self._sync()
        self._entries[key] = {"tile": asdict(tile), "ms": ms, "failed": failed}
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write-then-rename so concurrent processes never read half a file.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self._entries, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home still works, it just measures again next process


_CACHE = TileCache()


def choose_tile(
    key: str,
    device_name: str,
    candidates: tuple[Tile, ...],
    default: Tile,
    measure: Callable[[Tile], float] | None,
) -> Tile:
    """The cached tile for ``device_name|key``; else measure every candidate (ms) and persist the fastest.

    ``measure=None`` (inside a CUDA-graph capture, or tuning disabled) returns ``default`` uncached.
    """
    full_key = f"{device_name}|{key}"
    cached = _CACHE.get(full_key)
    if cached is not None:
        return cached
    if measure is None or os.environ.get("DYNAMOE_TRITON_TUNE", "1") == "0":
        return default
    timings, failed = [], []
    for tile in candidates:
        try:
            timings.append((measure(tile), tile))
        except _TILE_ERRORS as err:  # a tile this GPU cannot run is not a candidate; say which, in the file
            failed.append(f"{tile}: {type(err).__name__}")
    if not timings:
        return default
    ms, best = min(timings, key=lambda t: t[0])
    _CACHE.put(full_key, best, ms, failed)
    return best


def cuda_measure(launch: Callable[[Tile], None]) -> Callable[[Tile], float] | None:
    """A do_bench-based measure of ``launch``, or None while a CUDA graph is being captured."""
    if torch.cuda.is_current_stream_capturing():
        return None

    def measure(tile: Tile) -> float:
        from triton.testing import do_bench

        return float(do_bench(lambda: launch(tile), warmup=5, rep=20))

    return measure
