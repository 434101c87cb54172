"""Token dispatch: permute tokens into expert-contiguous order, and unpermute with the weighted combine.

The dispatch plan is a ``row_map`` [T, k]: for token t's j-th expert assignment, the row of the
expert-sorted buffer that holds its copy, or -1 when the assignment was dropped (capacity
overflow, expert choice). Rows are grouped by expert in ascending expert order and, within an
expert, in token order, so the plan is deterministic. Both directions are gathers or scatters to
distinct rows: no atomics are needed in either pass.
"""

from __future__ import annotations

import torch

from kernels.backend import REFERENCE, implementation, register_impl


def _check_assignments(experts: torch.Tensor, num_experts: int) -> None:
    if experts.dim() != 2:
        raise ValueError(f"experts must be [T, k], got shape {tuple(experts.shape)}")
    if experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"experts must be an integer tensor, got {experts.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def _dispatch_plan(experts: torch.Tensor, num_experts: int, num_rows: int | None):
    """(row_map [T, k], token_of_row [N]) for ``experts`` [T, k] (entries in [0, E), -1 when dropped)."""
    _check_assignments(experts, num_experts)
    flat = experts.reshape(-1).long()
    # Dropped assignments sort after every real expert and receive no row.
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    if num_rows is None:
        num_rows = int((flat >= 0).sum())
    order_N = torch.argsort(key, stable=True)[:num_rows]  # flat assignment index of each sorted row
    row_map = torch.full_like(flat, -1)
    row_map[order_N] = torch.arange(num_rows, device=flat.device)
    return row_map.view(experts.shape), order_N // experts.shape[1]


def row_map_ref(experts: torch.Tensor, num_experts: int, num_rows: int | None = None) -> torch.Tensor:
    """The dispatch plan for ``experts`` [T, k]: row_map [T, k] int64, -1 for dropped assignments."""
    return _dispatch_plan(experts, num_experts, num_rows)[0]


@register_impl("permute", REFERENCE)
def permute_ref(
    x: torch.Tensor, experts: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather token rows into expert-contiguous order.

    Args:
        x: [T, d] token activations.
        experts: [T, k] expert of each assignment, -1 where the assignment is dropped.
        num_experts: E.
        num_rows: number of kept assignments N; pass ``T * k`` when nothing can be dropped to
            avoid a device-to-host synchronisation (it is counted otherwise).

    Returns:
        x_sorted [N, d] (differentiable w.r.t. ``x``) and row_map [T, k] int64.
    """
    if x.dim() != 2 or x.shape[0] != experts.shape[0]:
        raise ValueError(
            f"permute: x must be [T, d] with T = experts.shape[0]; got x {tuple(x.shape)}, "
            f"experts {tuple(experts.shape)}"
        )
    row_map_Tk, token_of_row_N = _dispatch_plan(experts, num_experts, num_rows)
    return x[token_of_row_N], row_map_Tk


@register_impl("unpermute", REFERENCE)
def unpermute_ref(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to token order: y[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]].

    Dropped assignments (row_map = -1) contribute nothing. Differentiable w.r.t. ``y_sorted`` and
    ``weights``. The sum is taken in fp32 (fp64 for fp64 inputs) and cast back to ``y_sorted``'s dtype.
    """
    if row_map.shape != weights.shape:
        raise ValueError(f"unpermute: row_map {tuple(row_map.shape)} and weights {tuple(weights.shape)} must match")
    kept_Tk = row_map >= 0
    if y_sorted.shape[0] == 0:  # every assignment dropped: give the masked gather a (zero) row to read
        y_sorted = torch.cat([y_sorted, y_sorted.new_zeros(1, *y_sorted.shape[1:])])
    rows_Tkf = y_sorted[row_map.clamp_min(0)]  # (T, k, f)
    acc = torch.promote_types(y_sorted.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    w_Tk = torch.where(kept_Tk, weights.to(acc), torch.zeros((), dtype=acc, device=weights.device))
    y_Tf = (rows_Tkf.to(acc) * w_Tk.unsqueeze(-1)).sum(dim=1)
    return y_Tf.to(y_sorted.dtype)


def permute(
    x: torch.Tensor, experts: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather tokens into expert-contiguous order; see :func:`permute_ref`."""
    return implementation("permute", x)(x, experts, num_experts, num_rows)


def unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to token order; see :func:`unpermute_ref`."""
    return implementation("unpermute", y_sorted)(y_sorted, row_map, weights)
