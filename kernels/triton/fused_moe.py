"""Fused Triton expert MLP: the gather rides in the first GEMM's loads, the combine weight in the
second GEMM's epilogue, and the combine itself is an unweighted sum of each token's k rows.

Forward:  h = X[token_of_row] @ W1 ; a = act(h) ; z = w_row * (a @ W2) ; y[t] = sum_j z[row_map[t, j]]
Backward: g_rows = dy[token_of_row]; da0 = g_rows @ W2^T (fp32), so the combine-weight gradient is
          rowdot(da0, a) without keeping the unweighted a @ W2; dW2 = a^T (w_row * g_rows);
          dh = act'(h) * w_row * da0; dW1 = X[token_of_row]^T dh (gathered again, never stored);
          dX[t] = sum_j (dh @ W1^T)[row_map[t, j]].
Only h is kept for the backward (a is recomputed from it), as in the unfused path.
"""

from __future__ import annotations

import torch

from dynamoe.kernels.moe_mlp import activate, check_mlp_args
from dynamoe.kernels.triton._jit import check_device
from dynamoe.kernels.triton.dispatch import dispatch_plan, gather_rows, sum_rows
from dynamoe.kernels.triton.grouped_gemm import check_operands, gmm, gmm_weight_grad


def _row_weights(weights_Tk: torch.Tensor, row_map_Tk: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Combine weight of each sorted row [N] fp32, by scatter (dropped slots go to a spare last slot)."""
    target = torch.where(row_map_Tk >= 0, row_map_Tk, torch.full_like(row_map_Tk, num_rows)).reshape(-1)
    w_row = torch.zeros(num_rows + 1, dtype=torch.float32, device=weights_Tk.device)
    return w_row.scatter_(0, target, weights_Tk.detach().reshape(-1).float())[:num_rows]


class _FusedMoEMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, row_map, token_of_row, group_end, activation):
        N = token_of_row.shape[0]
        w_row = _row_weights(weights, row_map, N)
        h = gmm(x, w1, group_end, gather=token_of_row)
        z = gmm(activate(h, activation), w2, group_end, scale=w_row)
        ctx.activation = activation
        ctx.save_for_backward(x, weights, w1, w2, row_map, token_of_row, group_end, h, w_row)
        return sum_rows(z, row_map, None)

    @staticmethod
    def backward(ctx, dy):
        x, weights, w1, w2, row_map, token_of_row, group_end, h, w_row = ctx.saved_tensors
        E = w1.shape[0]
        g_rows = gather_rows(dy.contiguous(), token_of_row)
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(True)
            a = activate(h_, ctx.activation)
        da0 = gmm(g_rows, w2, group_end, trans_b=True, out_dtype=torch.float32)
        d_weights = None
        if ctx.needs_input_grad[1]:
            dw_row = (da0 * a.detach().float()).sum(-1)
            if dw_row.numel():
                d_weights = torch.where(
                    row_map >= 0, dw_row[row_map.clamp_min(0)], torch.zeros((), device=dw_row.device)
                )
            else:
                d_weights = torch.zeros(row_map.shape, device=weights.device)
            d_weights = d_weights.to(weights.dtype)
        dw2 = gmm_weight_grad(a.detach(), g_rows, group_end, E, scale=w_row) if ctx.needs_input_grad[3] else None
        (dh,) = torch.autograd.grad(a, h_, (da0 * w_row[:, None]).to(a.dtype))
        dh = dh.contiguous()
        dw1 = gmm_weight_grad(x, dh, group_end, E, gather=token_of_row) if ctx.needs_input_grad[2] else None
        dx = sum_rows(gmm(dh, w1, group_end, trans_b=True), row_map, None) if ctx.needs_input_grad[0] else None
        return dx, d_weights, dw1, dw2, None, None, None, None


def moe_mlp_triton(x, experts, weights, counts, w1, w2, *, activation="gelu", num_rows=None):
    """Triton implementation of :func:`dynamoe.kernels.moe_mlp.moe_mlp_ref` (``counts`` is re-derived from
    ``experts`` by the dispatch plan, so the groups always agree with the rows)."""
    check_mlp_args(x, experts, weights, w1, w2, activation)
    check_operands(x, w1, "moe_mlp")
    check_operands(x, w2, "moe_mlp")
    check_device(x, "moe_mlp")
    E = w1.shape[0]
    # bincount would read its maximum back to the host on CUDA; the plan's counts need no sync.
    row_map, token_of_row, per_expert = dispatch_plan(experts, E, num_rows)
    group_end = torch.cumsum(per_expert, 0).to(torch.int32)
    return _FusedMoEMLP.apply(
        x.contiguous(), weights, w1.contiguous(), w2.contiguous(), row_map, token_of_row, group_end, activation
    )
