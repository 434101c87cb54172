"""Tile configurations for the grouped GEMMs: candidates pruned by shared memory for the dtype and
device, measured once per machine and shape bucket, kept in JSON.

Triton's own ``@triton.autotune`` forgets its choice when the process ends and re-measures inside a
CUDA-graph capture, where measuring is illegal. Here the choice is keyed by
``device name | sm_XY | triton version | op | input dtype | output dtype | fp32 dot precision | shape bucket``
(everything that changes the compiled kernel; the tile-dependent ``EVEN_K`` follows from the shape),
measured on the first call outside a capture, and written to ``$DYNAMOE_TRITON_TUNE_CACHE``
(default ``~/.cache/dynamoe/triton_tiles.json``). Measuring holds an exclusive lock on
``<cache>.lock``: the first process on a machine measures, the others (every rank of a node) wait
for it and read its choice, so a machine measures each key once. ``DYNAMOE_TRITON_TUNE=0`` skips
measuring and uses the default tile; ``DYNAMOE_TRITON_TUNE_TOP=N`` measures only the first N
candidates (each is compiled once, about a second of CPU).

Candidates and the default are chosen before anything is compiled: a tile is kept only if its
pipeline buffers (``smem_estimate``) fit the device's shared memory per block, and each dtype class
has its own list (tensor-core tiles for bf16/fp16/TF32; smaller tiles for exact fp32 and fp64,
whose products run on the FMA units and keep more in registers). ``tests/test_kernels_compile.py``
compiles every tile the code can launch for sm_90a and sm_80 and checks the estimate bounds what
Triton allocates, that nothing spills, and that bf16 uses wgmma on sm_90a.
"""

from __future__ import annotations

import contextlib
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

try:
    import fcntl
except ImportError:  # not on POSIX: no cross-process lock, each process measures (still once per process)
    fcntl = None


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


# Candidates, best-first (the first that fits is the default). bf16/fp16 and TF32 fp32 products run
# on the tensor cores (wgmma on sm_90): 128x128 and 128x256 tiles feed them for big groups; 64-row
# tiles waste less on the last tile of small fine-grained groups.
TENSOR_CORE_TILES = (
    Tile(128, 128, 64, 8, 8, 3),
    Tile(128, 128, 64, 8, 4, 4),
    Tile(128, 256, 64, 8, 8, 3),
    Tile(256, 128, 64, 8, 8, 3),
    Tile(64, 128, 64, 8, 4, 4),
    Tile(64, 256, 64, 8, 8, 3),
    Tile(128, 64, 64, 8, 4, 4),
    # 32 accumulator elements a thread over 128 rows: for the fused MLP's epilogues, whose temporaries
    # (h, a, dh, the SwiGLU halves) do not fit beside a 64-element accumulator.
    Tile(128, 64, 64, 8, 8, 3),
    Tile(64, 64, 64, 8, 4, 4),
    Tile(128, 128, 32, 8, 8, 3),  # the fallback for fp32 where 64-deep stages do not fit (99 KB parts)
    Tile(64, 64, 32, 8, 4, 3),
)
# fp32 three-pass TF32 keeps hi/lo halves of both operands in registers: more warps per tile.
TF32X3_TILES = (
    Tile(128, 64, 32, 8, 8, 3),
    Tile(128, 128, 32, 8, 8, 3),
    Tile(64, 128, 32, 8, 8, 3),
    Tile(64, 64, 32, 8, 4, 3),
    Tile(64, 64, 32, 8, 8, 3),  # the fused SwiGLU epilogues
)
# Widths that are not multiples of 16 elements: no alignment hints, so no asynchronous copies; the
# operands pass through registers and the big tiles spill. Small tiles only.
UNALIGNED_TILES = (
    Tile(64, 64, 32, 8, 4, 3),
    Tile(64, 64, 32, 8, 8, 3),
    Tile(64, 32, 32, 8, 4, 3),
)
UNALIGNED_FMA_TILES = (Tile(32, 32, 32, 8, 4, 3),)
UNALIGNED_TF32_TILES = (
    Tile(64, 64, 32, 8, 8, 3),  # 4-warp tiles spill on sm_80
    Tile(64, 16, 32, 8, 4, 3),  # the fused SwiGLU epilogues with tf32x3 (32-row tiles lose wgmma)
)
# Exact fp32 ("ieee") products are FMAs on the CUDA cores: the operands live in registers.
FMA_TILES = (
    Tile(64, 64, 32, 8, 8, 3),
    Tile(32, 32, 32, 8, 4, 3),
)
# fp64 (tests only): an fp64 accumulator is two registers an element.
FP64_TILES = (
    Tile(64, 64, 16, 8, 4, 2),
    Tile(32, 64, 32, 8, 4, 2),
    Tile(32, 32, 32, 8, 4, 2),
    Tile(16, 32, 32, 8, 4, 2),  # the fused SwiGLU epilogues
)
GPU_TILES = TENSOR_CORE_TILES  # kept for callers of the old name
# The interpreter runs each program in Python: few, moderately sized programs are fastest.
INTERPRETER_TILE = Tile(32, 32, 32, 4, 1, 1)

# Shared memory a block may opt into, by compute capability (CUDA programming guide, table of
# technical specifications). Unknown parts get the smallest (99 KB) so a tile never overflows.
SMEM_PER_BLOCK = {
    (7, 0): 98304,
    (7, 5): 65536,
    (8, 0): 166912,
    (8, 6): 101376,
    (8, 7): 166912,
    (8, 9): 101376,
    (9, 0): 232448,
    (10, 0): 232448,
    (10, 3): 232448,
    (12, 0): 101376,
}
_DEFAULT_SMEM = 101376


def smem_per_block(capability: tuple[int, int]) -> int:
    return SMEM_PER_BLOCK.get(tuple(capability), _DEFAULT_SMEM)


def device_smem_per_block(device: torch.device) -> int:
    """What the device reports (``shared_memory_per_block_optin``), else the table for its capability."""
    props = torch.cuda.get_device_properties(device)
    reported = getattr(props, "shared_memory_per_block_optin", 0) or 0
    return int(reported) or smem_per_block((props.major, props.minor))


def smem_estimate(tile: Tile, elt_bytes: int, capability: tuple[int, int], n_acc: int = 1) -> int:
    """Bytes of shared memory the GEMM kernels need with ``tile``: the software pipeline keeps
    ``num_stages`` A and B tiles in flight (sm_90; ``num_stages - 1`` before), and the epilogue's
    layout change may reuse the same memory for the fp32 accumulator; 1 KB for barriers and scratch.
    ``n_acc`` accumulators (2 for the SwiGLU forward) mean as many B tiles a stage and fp32 tiles in
    the epilogue. An upper bound of what Triton allocates (checked by tests/test_kernels_compile.py)."""
    stages = tile.num_stages if capability[0] >= 9 else max(1, tile.num_stages - 1)
    buffers = stages * (tile.BLOCK_M * tile.BLOCK_K + n_acc * tile.BLOCK_K * tile.BLOCK_N) * elt_bytes
    epilogue = n_acc * tile.BLOCK_M * tile.BLOCK_N * max(4, elt_bytes)
    # an operand's layout change (the scaled or transposed operand of the weight gradient) in fp32
    convert = tile.BLOCK_K * max(tile.BLOCK_M, tile.BLOCK_N) * max(4, elt_bytes)
    return max(buffers, epilogue) + convert + 1024


def fits_registers(
    tile: Tile,
    dtype: torch.dtype,
    precision: str,
    capability: tuple[int, int],
    n_acc: int = 1,
    epilogue_tiles: int = 1,
    is_aligned: bool = True,
) -> bool:
    """Accumulator elements a thread holds (``n_acc`` tiles of them), against what leaves room for the
    operands: wgmma (sm_90) reads its operands from shared memory, mma.sync (sm_80) and FMA keep them
    in registers, and three-pass TF32 keeps three of each. The epilogue's ``epilogue_tiles`` live
    tiles (two registers an element in fp64) get 128 registers, halved for each of: unaligned widths
    (the operands pass through registers), three-pass TF32 (split operands) and fp64, which keep more
    live around it. The compile check's sweep is what these bounds come from."""
    per_thread = tile.BLOCK_M * tile.BLOCK_N // (32 * tile.num_warps)
    fp64 = dtype == torch.float64
    heavy = (not is_aligned) + (precision == "tf32x3" and dtype == torch.float32) + fp64
    if epilogue_tiles > 1 and epilogue_tiles * per_thread * (2 if fp64 else 1) > 128 >> heavy:
        return False
    per_thread *= n_acc
    if dtype == torch.float64:
        return per_thread <= 32
    if dtype == torch.float32 and precision == "ieee":
        return per_thread <= 16
    tf32x3 = dtype == torch.float32 and precision == "tf32x3"
    if capability[0] >= 9:
        return per_thread <= (64 if tf32x3 else 128)
    return per_thread <= (32 if tf32x3 else 64)


def aligned(*widths: int) -> bool:
    """Whether every width (row stride) is a multiple of 16 elements, which is when Triton's launch
    gives the loads alignment hints (its integer specialisation) and the pipeline can use them."""
    return all(int(w) % 16 == 0 for w in widths)


def tile_class(dtype: torch.dtype, precision: str, is_aligned: bool = True) -> tuple[Tile, ...]:
    if dtype == torch.float64:
        return FP64_TILES
    if dtype == torch.float32 and precision == "ieee":
        return FMA_TILES if is_aligned else UNALIGNED_FMA_TILES
    if not is_aligned:
        return UNALIGNED_TF32_TILES if dtype == torch.float32 else UNALIGNED_TILES
    if dtype == torch.float32 and precision == "tf32x3":
        return TF32X3_TILES
    return TENSOR_CORE_TILES


def candidates(
    dtype: torch.dtype,
    precision: str,
    capability: tuple[int, int],
    smem: int | None = None,
    is_aligned: bool = True,
    n_acc: int = 1,
    epilogue_tiles: int = 1,
) -> tuple[Tile, ...]:
    """The tiles worth measuring for this dtype, dot precision, alignment and device, for a kernel
    holding ``n_acc`` accumulators and ``epilogue_tiles`` live tiles in its epilogue: those whose
    shared memory and registers fit (pruned here, before anything is compiled). Best-first; never
    empty."""
    limit = smem_per_block(capability) if smem is None else smem
    elt = torch.tensor([], dtype=dtype).element_size()
    cls = tile_class(dtype, precision, is_aligned)
    tiles = tuple(
        t
        for t in cls
        if smem_estimate(t, elt, capability, n_acc) <= limit
        and fits_registers(t, dtype, precision, capability, n_acc, epilogue_tiles, is_aligned)
    )
    return tiles or (min(cls, key=lambda t: smem_estimate(t, elt, capability, n_acc)),)


def default_tile(
    dtype: torch.dtype,
    precision: str,
    capability: tuple[int, int],
    smem: int | None = None,
    is_aligned: bool = True,
    n_acc: int = 1,
    epilogue_tiles: int = 1,
) -> Tile:
    """The tile used untuned (``DYNAMOE_TRITON_TUNE=0``, or inside a CUDA-graph capture for an unseen
    shape): the first candidate that fits."""
    return candidates(dtype, precision, capability, smem, is_aligned, n_acc, epilogue_tiles)[0]


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

    def _sync(self, force: bool = False) -> None:
        path = cache_path()
        if force or path != self._path:
            self._path, self._entries = path, {}
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                pass  # missing or unreadable: start empty, the next choice rewrites it

    def get(self, key: str, reload: bool = False) -> Tile | None:
        self._sync(force=reload)
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


@contextlib.contextmanager
def _machine_lock():
    """An exclusive lock beside the cache file, held while measuring: the other processes of this
    machine (the ranks of a node) wait, then read the winner instead of measuring again. The kernel
    drops the lock when its holder exits, so a crashed process cannot block the rest."""
    path = cache_path()
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - closed in finally
    except OSError:
        yield  # read-only home: measure unlocked
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def choose_tile(
    key: str,
    device_name: str,
    candidates: tuple[Tile, ...],
    default: Tile,
    measure: Callable[[Tile], float] | None,
) -> Tile:
    """The cached tile for ``device_name|key``; else measure every candidate (ms) and persist the fastest.

    ``measure=None`` (inside a CUDA-graph capture, or tuning disabled) returns ``default`` uncached.
    Measuring happens under a machine-wide lock, and the file is read again once the lock is held:
    a key is measured once per machine however many processes ask for it at the same time.
    """
    full_key = f"{device_name}|{key}"
    cached = _CACHE.get(full_key)
    if cached is not None:
        return cached
    if measure is None or os.environ.get("DYNAMOE_TRITON_TUNE", "1") == "0":
        return default
    with _machine_lock():
        cached = _CACHE.get(full_key, reload=True)  # another process may have measured it meanwhile
        if cached is not None:
            return cached
        timings, failed = [], []
        top = int(os.environ.get("DYNAMOE_TRITON_TUNE_TOP", "0") or 0)  # measure only the first N (best-first)
        for tile in candidates[:top] if top > 0 else candidates:
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
