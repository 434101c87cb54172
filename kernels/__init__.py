"""Kernel entry points for sparse MoE: top-k routing, token dispatch and grouped expert GEMMs.

Each op has one public entry here and a pure-PyTorch reference (``<op>_ref``) beside its
implementation. ``dynamoe.kernels.backend`` is the single place that decides which implementation runs.
The references are the CPU path and the ground truth the accelerated kernels are tested against.
The Triton backend (``kernels/triton/``) registers itself when triton is installed and runs on CUDA
tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1``.

Shape legend used across this package:
    T tokens, E experts, k experts per token, d model width, f expert hidden width,
    N rows after dispatch (T * k when dropless).
"""

from dynamoe.kernels.backend import available_backends, backend_for
from dynamoe.kernels.dispatch import permute, permute_ref, row_map_ref, unpermute, unpermute_ref
from dynamoe.kernels.grouped_gemm import grouped_mm, grouped_mm_ref, offsets_from_counts
from dynamoe.kernels.moe_mlp import fused_moe_available, moe_mlp, moe_mlp_ref
from dynamoe.kernels.routing import topk_route, topk_route_ref
from dynamoe.kernels.triton import register as _register_triton

_register_triton()  # only if triton is installed; it is imported on the first Triton call

__all__ = [
    "available_backends",
    "backend_for",
    "fused_moe_available",
    "grouped_mm",
    "grouped_mm_ref",
    "moe_mlp",
    "moe_mlp_ref",
    "offsets_from_counts",
    "permute",
    "permute_ref",
    "row_map_ref",
    "topk_route",
    "topk_route_ref",
    "unpermute",
    "unpermute_ref",
]
