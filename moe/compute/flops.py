"""Analytic FLOP counts of the building blocks, as executed (not as a dense equivalent).

Conventions match ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs, and
only matrix products, convolutions and attention are counted (norms, activations, softmax and
pooling are not). Counts are for the rows actually given: pass the number of tokens or samples
that really go through a block.
"""

from __future__ import annotations

from dynamoe.config import ModelConfig, MoEConfig


def linear_flops(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def attention_flops(batch: int, seq: int, d_model: int) -> int:
    """QKV and output projections plus the two attention products (scores, weighted values)."""
    projections = linear_flops(batch * seq, d_model, 3 * d_model) + linear_flops(batch * seq, d_model, d_model)
    products = 2 * 2 * batch * seq * seq * d_model
    return projections + products


def dense_ffn_flops(tokens: int, d_model: int, d_hidden: int, activation: str = "gelu") -> int:
    up = 2 if activation == "swiglu" else 1  # SwiGLU has a gate and an up projection
    return linear_flops(tokens, d_model, up * d_hidden) + linear_flops(tokens, d_hidden, d_model)


def moe_ffn_flops(tokens: int, d_model: int, cfg: MoEConfig, assignments: int | None = None) -> int:
    """Router, routed experts (``assignments`` token-expert pairs, default tokens * top_k, fewer when
    tokens are dropped) and shared experts."""
    return sum(moe_ffn_flops_by_component(tokens, d_model, cfg, assignments).values())


def moe_ffn_flops_by_component(tokens, d_model: int, cfg: MoEConfig, assignments=None) -> dict:
    """:func:`moe_ffn_flops` split into ``moe_router``, ``moe_experts`` and ``moe_shared``."""
    k = cfg.router.top_k
    assignments = tokens * k if assignments is None else assignments
    shared = 0
    if cfg.num_shared_experts:
        shared = dense_ffn_flops(
            tokens, d_model, cfg.num_shared_experts * (cfg.d_shared or cfg.d_expert), cfg.activation
        )
    return {
        "moe_router": linear_flops(tokens, d_model, cfg.num_experts),
        "moe_experts": dense_ffn_flops(assignments, d_model, cfg.d_expert, cfg.activation),
        "moe_shared": shared,
    }


def attention_rows_flops(queries, pairs, d_model: int, kv_rows=None):
    """Attention computed for ``queries`` rows only, with ``pairs`` query-key products in all and K
    and V projected for ``kv_rows`` rows (default: the queries). Every token a query and a key of
    every token of its sequence (``pairs = batch * seq**2``) is :func:`attention_flops`; fewer
    queries or keys is what halting and routing save. Counts may be tensors (no host sync)."""
    kv_rows = queries if kv_rows is None else kv_rows
    projections = linear_flops(queries, d_model, 2 * d_model) + linear_flops(kv_rows, d_model, 2 * d_model)
    return projections + 2 * 2 * pairs * d_model


def conv2d_flops(batch: int, c_in: int, c_out: int, kernel: int, h_out: int, w_out: int) -> int:
    return 2 * batch * c_in * c_out * kernel * kernel * h_out * w_out


def transformer_block_flops(cfg: ModelConfig, is_moe: bool, queries, pairs, kv_rows=None, ffn_rows=None) -> dict:
    """One Transformer block by component: attention for ``queries`` rows (``pairs`` query-key
    products, K/V for ``kv_rows``), then the FFN on ``ffn_rows`` (default the queries; dropless
    routing for MoE)."""
    ffn_rows = queries if ffn_rows is None else ffn_rows
    out = {"attention": attention_rows_flops(queries, pairs, cfg.d_model, kv_rows)}
    if is_moe:
        out.update(moe_ffn_flops_by_component(ffn_rows, cfg.d_model, cfg.moe))
    else:
        out["ffn_dense"] = dense_ffn_flops(ffn_rows, cfg.d_model, cfg.d_ff, cfg.moe.activation)
    return out
