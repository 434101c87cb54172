"""The one place that chooses which implementation of a kernel op runs.

Every op registers a pure-PyTorch reference, which runs on any device. Accelerated backends
register a predicate saying which tensors they can take, and per-op implementations. The choice is
made per call from the main input tensor, so model code never branches on hardware.
``DYNAMOE_KERNEL_BACKEND=<name>`` forces one backend everywhere (for debugging and tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

REFERENCE = "reference"

_APPLIES: dict[str, Callable[[torch.Tensor], bool]] = {}  # accelerated backends, in priority order
_IMPLS: dict[str, dict[str, Callable]] = {}  # op name -> backend name -> implementation


def register_backend(name: str, applies: Callable[[torch.Tensor], bool]) -> None:
    """Register an accelerated backend; ``applies(tensor)`` says whether it can run on that tensor."""
    _APPLIES[name] = applies


def register_impl(op: str, backend: str):
    """Decorator registering ``fn`` as ``op``'s implementation for ``backend``."""

    def wrap(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def available_backends() -> list[str]:
    return [REFERENCE, *_APPLIES]


def backend_for(t: torch.Tensor, op: str | None = None) -> str:
    """Name of the backend that runs ``op`` (or any op, if None) on main input ``t``."""
    forced = os.environ.get("DYNAMOE_KERNEL_BACKEND")
    if forced:
        if forced not in available_backends():
            raise ValueError(
                f"DYNAMOE_KERNEL_BACKEND={forced!r} is not a known backend; "
                f"choose one of {available_backends()} or unset it"
            )
        return forced
    for name, applies in _APPLIES.items():
        if (op is None or name in _IMPLS.get(op, {})) and applies(t):
            return name
    return REFERENCE


def registered_implementation(op: str, backend: str) -> Callable:
    """The implementation ``backend`` registered for ``op`` (benchmarks time each backend by name)."""
    try:
        return _IMPLS[op][backend]
    except KeyError:
        raise NotImplementedError(f"kernel op {op!r} has no {backend!r} implementation") from None


def implementation(op: str, t: torch.Tensor) -> Callable:
    """The implementation of ``op`` chosen for main input ``t``."""
    backend = backend_for(t, op)
    try:
        return _IMPLS[op][backend]
    except KeyError:
        raise NotImplementedError(f"kernel op {op!r} has no {backend!r} implementation") from None
