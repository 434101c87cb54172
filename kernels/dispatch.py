"""Token dispatch: permute tokens into expert-contiguous order, and unpermute with the weighted combine.

The dispatch plan is a ``row_map`` [T, k]: for token t's j-th expert assignment, the row of the
expert-sorted buffer that holds its copy, or -1 when the assignment was dropped (capacity
overflow, expert choice). Rows are grouped by expert in ascending expert order and, within an
expert, in token order, so the plan is deterministic. Both directions are gathers or scatters to
distinct rows: no atomics are needed in either pass.
"""

from __future__ import annotations

import torch

from dynamoe.kernels.backend import REFERENCE, implementation, register_impl


def check_assignments(experts: torch.Tensor, num_experts: int) -> None:
    if experts.dim() != 2:
        raise ValueError(f"experts must be [T, k], got shape {tuple(experts.shape)}")
    if experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"experts must be an integer tensor, got {experts.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def _dispatch_plan(experts: torch.Tensor, num_experts: int, num_rows: int | None):
    """(row_map [T, k], token_of_row [N]) for ``experts`` [T, k] (entries in [0, E), -1 when dropped)."""
    check_assignments(experts, num_experts)
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


class _GatherRows(torch.autograd.Function):
    """x_sorted = x[token_of_row]; the backward sums each token's k copies by gathering through
    row_map (every row has exactly one source), which avoids a scatter-add."""

    @staticmethod
    def forward(ctx, x, token_of_row_N, row_map_Tk):
        ctx.save_for_backward(row_map_Tk)
        return x.index_select(0, token_of_row_N)

    @staticmethod
    def backward(ctx, grad_sorted_Nd):
        (row_map_Tk,) = ctx.saved_tensors
        return _sum_rows(grad_sorted_Nd, row_map_Tk, None), None, None


class _CombineRows(torch.autograd.Function):
    """y[t] = sum_j w[t, j] * y_sorted[row_map[t, j]] with dropped slots (row_map = -1) skipped."""

    @staticmethod
    def forward(ctx, y_sorted_Nf, row_map_Tk, weights_Tk):
        ctx.save_for_backward(y_sorted_Nf, row_map_Tk, weights_Tk)
        return _sum_rows(y_sorted_Nf, row_map_Tk, weights_Tk)

    @staticmethod
    def backward(ctx, grad_Tf):
        y_sorted_Nf, row_map_Tk, weights_Tk = ctx.saved_tensors
        acc = torch.promote_types(y_sorted_Nf.dtype, torch.float32)
        kept_Tk = row_map_Tk >= 0
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            # Each sorted row came from one (token, slot): its gradient is that slot's weight times
            # the token's output gradient. Written row by row through the inverse of row_map.
            flat_map = row_map_Tk.reshape(-1)
            assignment_of_row = torch.empty(y_sorted_Nf.shape[0], dtype=torch.long, device=flat_map.device)
            kept_flat = kept_Tk.reshape(-1)
            assignment_of_row[flat_map[kept_flat]] = torch.arange(flat_map.numel(), device=flat_map.device)[kept_flat]
            k = row_map_Tk.shape[1]
            w_of_row = weights_Tk.reshape(-1).to(acc).index_select(0, assignment_of_row)
            g_of_row = grad_Tf.to(acc).index_select(0, assignment_of_row // k)
            grad_y = (g_of_row * w_of_row.unsqueeze(-1)).to(y_sorted_Nf.dtype)
        if ctx.needs_input_grad[2]:
            rows_Tkf = _gather_slots(y_sorted_Nf, row_map_Tk).to(acc)
            grad_w = torch.bmm(rows_Tkf, grad_Tf.to(acc).unsqueeze(-1)).squeeze(-1)  # (T, k)
            grad_w = torch.where(kept_Tk, grad_w, torch.zeros_like(grad_w)).to(weights_Tk.dtype)
        return grad_y, None, grad_w


def _gather_slots(rows_Nf: torch.Tensor, row_map_Tk: torch.Tensor) -> torch.Tensor:
    """rows_Nf[row_map] as [T, k, f]; dropped slots read row 0 (or zeros when there are no rows)."""
    if rows_Nf.shape[0] == 0:
        return rows_Nf.new_zeros(*row_map_Tk.shape, rows_Nf.shape[1])
    return rows_Nf.index_select(0, row_map_Tk.clamp_min(0).reshape(-1)).view(*row_map_Tk.shape, rows_Nf.shape[1])


def _sum_rows(rows_Nf: torch.Tensor, row_map_Tk: torch.Tensor, weights_Tk: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * rows[row_map[t, j]] (w = 1 when None), in fp32 or wider, dropped slots skipped."""
    acc = torch.promote_types(rows_Nf.dtype, torch.float32)
    kept_Tk = row_map_Tk >= 0
    w_Tk = (
        kept_Tk.to(acc)
        if weights_Tk is None
        else torch.where(kept_Tk, weights_Tk.to(acc), torch.zeros((), dtype=acc, device=rows_Nf.device))
    )
    rows_Tkf = _gather_slots(rows_Nf, row_map_Tk).to(acc)
    out_Tf = torch.bmm(w_Tk.unsqueeze(1), rows_Tkf).squeeze(1)  # (T, 1, k) @ (T, k, f)
    return out_Tf.to(rows_Nf.dtype)


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
    return _GatherRows.apply(x, token_of_row_N, row_map_Tk), row_map_Tk


@register_impl("unpermute", REFERENCE)
def unpermute_ref(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to token order: y[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]].

    Dropped assignments (row_map = -1) contribute nothing. Differentiable w.r.t. ``y_sorted`` and
    ``weights``. The sum is taken in fp32 (fp64 for fp64 inputs) and cast back to ``y_sorted``'s dtype.
    """
    if row_map.shape != weights.shape:
        raise ValueError(f"unpermute: row_map {tuple(row_map.shape)} and weights {tuple(weights.shape)} must match")
    return _CombineRows.apply(y_sorted, row_map, weights)


def permute(
    x: torch.Tensor, experts: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather tokens into expert-contiguous order; see :func:`permute_ref`."""
    return implementation("permute", x)(x, experts, num_experts, num_rows)


def unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to token order; see :func:`unpermute_ref`."""
    return implementation("unpermute", y_sorted)(y_sorted, row_map, weights)
