"""Launch plumbing shared by the Triton kernels: interpreter detection, lazy jit, small helpers.

Triton fixes its mode when ``triton`` is imported: with ``TRITON_INTERPRET=1`` its own library
functions (``tl.max``, ``tl.sum``, ``tl.cumsum`` ...) become interpreted functions, and only then
can kernels run on CPU tensors. So the mode is process-wide and is read from the library itself,
not from the variable, which may have changed since (tests set it only around their own calls).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_TRUE = ("1", "true", "yes", "on", "y")  # what triton.knobs accepts for a boolean variable


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def triton_interpreted() -> bool:
    """Whether triton was imported in interpreter mode (its standard library is interpreted)."""
    return isinstance(tl.standard.max, InterpretedFunction)


def check_device(t: torch.Tensor, op: str) -> None:
    if t.is_cuda:
        if triton_interpreted():
            return  # the interpreter copies CUDA tensors to the host and back: slow but correct
        return
    if t.device.type != "cpu" or not triton_interpreted():
        raise RuntimeError(
            f"{op} (triton): tensors on {t.device} need CUDA, or Triton's interpreter, which must be "
            "enabled with TRITON_INTERPRET=1 before triton is first imported; or use "
            "DYNAMOE_KERNEL_BACKEND=reference"
        )


class DeviceKernel:
    """A kernel decorated on first launch, in the mode triton was imported in.

    Decorating lazily keeps ``import dynamoe.kernels.triton.*`` cheap and means a module imported before the
    mode was settled still gets the right variant."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted = None

    def on(self, device: torch.device):
        if self._jitted is None:
            self._jitted = InterpretedFunction(self.fn) if triton_interpreted() else JITFunction(self.fn)
        return self._jitted


def kernel(fn) -> DeviceKernel:
    return DeviceKernel(fn)


def acc_is_f64(*tensors: torch.Tensor) -> bool:
    """Accumulate in fp64 only for fp64 inputs, like the references (promote_types(dtype, fp32))."""
    return any(t.dtype == torch.float64 for t in tensors)


def upcast_for_dot(dtype: torch.dtype) -> bool:
    """The interpreter evaluates tl.dot with numpy, which misreads bf16 operands (numpy has no bf16):
    there, operands are widened to fp32 first. Compiled kernels keep the native tensor-core dot."""
    return triton_interpreted() and dtype == torch.bfloat16


FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` operands.

    Only fp32 products have a choice. Like ``torch.mm``, they are exact ("ieee", FMAs) unless the user
    allows TF32 (``torch.backends.cuda.matmul.allow_tf32``, or a float32 matmul precision of "high" or
    "medium"), then "tf32". ``DYNAMOE_FP32_DOT=ieee|tf32x3|tf32`` overrides both; "tf32x3" (three TF32
    passes, error about 1e-6 relative, about 3x faster than "ieee" on tensor-core GPUs) is opt-in.
    Other dtypes report "ieee" (the argument does not apply to them)."""
    if dtype != torch.float32:
        return "ieee"
    forced = os.environ.get("DYNAMOE_FP32_DOT", "").strip().lower()
    if forced:
        if forced not in FP32_PRECISIONS:
            raise ValueError(f"DYNAMOE_FP32_DOT={forced!r}: choose one of {FP32_PRECISIONS}")
        return forced
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "DeviceKernel",
    "acc_is_f64",
    "cdiv",
    "check_device",
    "dot_precision",
    "interpreter_enabled",
    "kernel",
    "next_pow2",
    "tl",
    "triton",
    "triton_interpreted",
    "upcast_for_dot",
]
