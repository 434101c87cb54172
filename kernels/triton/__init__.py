"""The Triton backend: routing, dispatch and grouped-GEMM kernels for CUDA tensors.

Registration imports nothing from triton: ``import dynamoe.kernels`` stays cheap and works where triton is
absent (macOS, minimal installs). The kernel modules load on the first call that selects this
backend: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter; for tests,
and it must be set before triton is first imported).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from dynamoe.kernels.backend import register_backend, register_impl

NAME = "triton"
_TRUE = ("1", "true", "yes", "on", "y")  # the spellings triton itself accepts


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def applies(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def _topk_route(
    logits, k, *, score="softmax", bias=None, normalize=False, n_group=1, topk_group=None, routed_scaling_factor=1.0
):
    from dynamoe.kernels.routing import limits_groups, topk_route_ref

    if limits_groups(n_group, topk_group):
        # The kernel's k arg-max rounds see experts, not groups: rather than pick from all of them
        # (a different routing), run the reference, which is exact, and say so once per setting.
        warnings.warn(
            f"topk_route: the Triton kernel has no group-limited selection (n_group={n_group}, "
            f"topk_group={topk_group}); routing runs on the PyTorch reference instead, which is slower "
            "on GPU but selects the same experts",
            RuntimeWarning,
            stacklevel=3,
        )
        return topk_route_ref(
            logits,
            k,
            score=score,
            bias=bias,
            normalize=normalize,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor,
        )
    from dynamoe.kernels.triton.routing import topk_route_triton

    return topk_route_triton(
        logits,
        k,
        score=score,
        bias=bias,
        normalize=normalize,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    )


def _permute(x, experts, num_experts, num_rows=None):
    from dynamoe.kernels.triton.dispatch import permute_triton

    return permute_triton(x, experts, num_experts, num_rows)


def _unpermute(y_sorted, row_map, weights):
    from dynamoe.kernels.triton.dispatch import unpermute_triton

    return unpermute_triton(y_sorted, row_map, weights)


def _grouped_mm(x, w, offsets):
    from dynamoe.kernels.triton.grouped_gemm import grouped_mm_triton

    return grouped_mm_triton(x, w, offsets)


def _moe_mlp(x, experts, weights, counts, w1, w2, *, activation="gelu", num_rows=None):
    from dynamoe.kernels.triton.fused_moe import moe_mlp_triton

    return moe_mlp_triton(x, experts, weights, counts, w1, w2, activation=activation, num_rows=num_rows)


def register() -> bool:
    """Register the backend if triton can be imported; returns whether it was."""
    if not available():
        return False
    register_backend(NAME, applies)
    register_impl("topk_route", NAME)(_topk_route)
    register_impl("permute", NAME)(_permute)
    register_impl("unpermute", NAME)(_unpermute)
    register_impl("grouped_mm", NAME)(_grouped_mm)
    register_impl("moe_mlp", NAME)(_moe_mlp)
    return True
