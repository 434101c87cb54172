"""Kernel entry points for sparse MoE: top-k routing, token dispatch and grouped expert GEMMs.

Each op has one public entry here and a pure-PyTorch reference (``<op>_ref``) beside its
implementation. ``kernels.backend`` is the single place that decides which implementation runs.
The references are the CPU path and the ground truth the accelerated kernels are tested against.

Shape legend used across this package:
    T tokens, E experts, k experts per token, d model width, f expert hidden width,
    N rows after dispatch (T * k when dropless).
"""

from kernels.backend import available_backends, backend_for
from kernels.dispatch import permute, permute_ref, row_map_ref, unpermute, unpermute_ref
from kernels.grouped_gemm import grouped_mm, grouped_mm_ref, offsets_from_counts
from kernels.routing import topk_route, topk_route_ref

__all__ = [
    "available_backends",
    "backend_for",
    "grouped_mm",
    "grouped_mm_ref",
    "offsets_from_counts",
    "permute",
    "permute_ref",
    "row_map_ref",
    "topk_route",
    "topk_route_ref",
    "unpermute",
    "unpermute_ref",
]
