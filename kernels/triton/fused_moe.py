"""Fused Triton expert MLP: the gather rides in the GEMMs' loads, the activation and its derivative in
their epilogues, the combine weight in the second GEMM's epilogue, and the combine itself is an
unweighted sum of each token's k rows.

Forward:  [a, h] = act(X[token_of_row] @ W1) in GEMM1's epilogue (h written only for a backward);
          z = w_row * (a @ W2); y[t] = sum_j z[row_map[t, j]].
Backward: one GEMM computes dA = dY[token_of_row] @ W2^T (dY gathered in its loads, dA kept in
          registers) and in its epilogue, from the saved h: dh = act'(h) * w_row * dA, a = act(h),
          and the combine-weight gradient's partial row dots rowdot(dA, a) per column tile;
          dW2 = a^T (w_row * dY[token_of_row]) with the gather and scale in the second operand's loads;
          dW1 = X[token_of_row]^T dh; dX[t] = sum_j (dh @ W1^T)[row_map[t, j]].
Only h is kept between forward and backward, as on the unfused path. a is written a second time by
the backward GEMM (N x f) rather than recomputed inside the weight-gradient kernel's loads: there
every element of a is loaded by d / BLOCK_N programs, so the activation (erf, or exp and a divide)
would run about 32 times per element on the CUDA cores beside a tensor-core product that is only
2 * BLOCK_N flops per element, enough to make that kernel ALU-bound.
Bytes moved per training step, before and after these fusions: ``traffic.py`` and docs/kernels.md.
"""

from __future__ import annotations

import torch

from dynamoe.kernels.moe_mlp import check_mlp_args
from dynamoe.kernels.triton._jit import check_device
from dynamoe.kernels.triton.dispatch import dispatch_plan, sum_rows
from dynamoe.kernels.triton.grouped_gemm import check_operands, gmm, gmm_act, gmm_act_grad, gmm_weight_grad


def _row_weights(weights_Tk: torch.Tensor, row_map_Tk: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Combine weight of each sorted row [N] fp32, by scatter (dropped slots go to a spare last slot)."""
    target = torch.where(row_map_Tk >= 0, row_map_Tk, torch.full_like(row_map_Tk, num_rows)).reshape(-1)
    w_row = torch.zeros(num_rows + 1, dtype=torch.float32, device=weights_Tk.device)
    return w_row.scatter_(0, target, weights_Tk.detach().reshape(-1).float())[:num_rows]


def _slot_grads(dw_row: torch.Tensor, row_map: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-row combine-weight gradient [N] back in (token, slot) order [T, k]; dropped slots get 0."""
    if not dw_row.numel():
        return torch.zeros(row_map.shape, dtype=dtype, device=row_map.device)
    zero = torch.zeros((), dtype=dw_row.dtype, device=dw_row.device)
    return torch.where(row_map >= 0, dw_row[row_map.clamp_min(0)], zero).to(dtype)


class _FusedMoEMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, row_map, token_of_row, group_end, activation, training):
        N = token_of_row.shape[0]
        w_row = _row_weights(weights, row_map, N)
        a, h = gmm_act(x, w1, group_end, activation, gather=token_of_row, keep_h=training)
        z = gmm(a, w2, group_end, scale=w_row)
        ctx.activation = activation
        ctx.save_for_backward(x, weights, w1, w2, row_map, token_of_row, group_end, h, w_row)
        return sum_rows(z, row_map, None)

    @staticmethod
    def backward(ctx, dy):
        x, weights, w1, w2, row_map, token_of_row, group_end, h, w_row = ctx.saved_tensors
        need_dx, need_dweights, need_dw1, need_dw2 = ctx.needs_input_grad[:4]
        E = w1.shape[0]
        dy = dy.contiguous()
        dh, a, dw_row = gmm_act_grad(
            dy,
            w2,
            h,
            group_end,
            ctx.activation,
            gather=token_of_row,
            scale=w_row,
            keep_a=need_dw2,
            rowdot=need_dweights,
        )
        d_weights = _slot_grads(dw_row, row_map, weights.dtype) if need_dweights else None
        dw2 = gmm_weight_grad(a, dy, group_end, E, gather_dy=token_of_row, scale=w_row) if need_dw2 else None
        dw1 = gmm_weight_grad(x, dh, group_end, E, gather=token_of_row) if need_dw1 else None
        dx = sum_rows(gmm(dh, w1, group_end, trans_b=True), row_map, None) if need_dx else None
        return dx, d_weights, dw1, dw2, None, None, None, None, None


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
    # Inside forward, needs_input_grad is set even under no_grad: decide here whether h is kept.
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, w2))
    return _FusedMoEMLP.apply(
        x.contiguous(),
        weights,
        w1.contiguous(),
        w2.contiguous(),
        row_map,
        token_of_row,
        group_end,
        activation,
        training,
    )
