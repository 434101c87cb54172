"""Process-level settings that make CPU training fast.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and
returns them to the OS on free, so every large activation tensor is page-faulted and zeroed by the
kernel again on each step: an elementwise op on a [8192, 1024] fp32 tensor ran 6x slower for it
here. Raising the thresholds keeps freed blocks in the heap for reuse, the effect that jemalloc or
tcmalloc give CPU PyTorch jobs.

oneDNN, which runs CPU bf16 matrix products, caches a compiled primitive per shape (1024 by
default). Expert groups change their row counts every step, so bf16 MoE training fills that cache
with primitives used once. A bf16 quickstart run (ZeRO 1) peaked at 1,643, 1,752 and 1,862 MiB
after 20, 40 and 60 steps with oneDNN's default, and at 1,252, 1,270 and 1,270 MiB with a cache of
64, at the same step time (0.19-0.21 s): docs/benchmarks.md has the command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_large_allocations(threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes``; False where glibc is absent."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
    return _applied


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def limit_onednn_primitive_cache(capacity: int = 64) -> None:
    """Cap oneDNN's primitive cache, unless the user set it; oneDNN reads the variable when it
    first creates a primitive, so this must run before the first bf16 matrix product."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))
