"""Activation checkpointing that counts nothing twice.

:func:`checkpointed` runs a block under ``torch.utils.checkpoint`` (non-reentrant): the forward
keeps only the block's inputs, and backward runs the block again to rebuild what it needs. The
second run is the same computation, so what the first one already counted (MoE load statistics,
the aux-loss-free router's load, the compute ledger's FLOPs) must not be counted again: while it
runs, :func:`recomputing` is true, and those counters skip. The flag is a context variable set only
inside the recomputation itself, so it is local to the thread running it (the autograd engine's).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

from torch.utils.checkpoint import checkpoint

_RECOMPUTING = contextvars.ContextVar("dynamoe_recomputing", default=False)


def recomputing() -> bool:
    """True while a checkpointed block is being run again for backward."""
    return _RECOMPUTING.get()


def checkpointed(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, keeping only its inputs for backward (it is run again then)."""
    calls = 0

    def run(*a, **kw):
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*a, **kw)
        token = _RECOMPUTING.set(True)
        try:
            return fn(*a, **kw)
        finally:
            _RECOMPUTING.reset(token)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)
