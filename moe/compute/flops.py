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


def attention_widths(cfg: ModelConfig) -> tuple[int, int]:
    """(query width, key/value width): heads times head width; both d_model in the GPT-2 block,
    the key/value one narrower under grouped-query attention."""
    return cfg.n_heads * cfg.attn_head_dim, cfg.kv_heads * cfg.attn_head_dim


def attention_flops(batch: int, seq: int, d_model: int, q_width: int | None = None, kv_width: int | None = None) -> int:
    """Q, K, V and output projections plus the two attention products (scores, weighted values);
    widths as in :func:`attention_rows_flops`."""
    return attention_rows_flops(batch * seq, batch * seq * seq, d_model, None, q_width, kv_width)


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


def attention_rows_flops(queries, pairs, d_model: int, kv_rows=None, q_width=None, kv_width=None):
    """Attention computed for ``queries`` rows only, with ``pairs`` query-key products in all and K
    and V projected for ``kv_rows`` rows (default: the queries). Every token a query and a key of
    every token of its sequence (``pairs = batch * seq**2``) is :func:`attention_flops`; fewer
    queries or keys is what halting and routing save. Counts may be tensors (no host sync).
    ``q_width`` (query heads times head width, default d_model) sizes the Q and output projections
    and both products (every query head scores and reads keys, shared or not); ``kv_width``
    (default q_width) the K and V projections."""
    kv_rows = queries if kv_rows is None else kv_rows
    q_width = d_model if q_width is None else q_width
    kv_width = q_width if kv_width is None else kv_width
    # Q in and the output projection back: 2 * d_model * q_width per query row; K and V per key row.
    projections = linear_flops(queries, d_model, 2 * q_width) + linear_flops(kv_rows, d_model, 2 * kv_width)
    return projections + 2 * 2 * pairs * q_width


def conv2d_flops(batch: int, c_in: int, c_out: int, kernel: int, h_out: int, w_out: int) -> int:
    return 2 * batch * c_in * c_out * kernel * kernel * h_out * w_out


def transformer_block_flops(cfg: ModelConfig, is_moe: bool, queries, pairs, kv_rows=None, ffn_rows=None) -> dict:
    """One Transformer block by component: attention for ``queries`` rows (``pairs`` query-key
    products, K/V for ``kv_rows``), then the FFN on ``ffn_rows`` (default the queries; dropless
    routing for MoE)."""
    ffn_rows = queries if ffn_rows is None else ffn_rows
    out = {"attention": attention_rows_flops(queries, pairs, cfg.d_model, kv_rows, *attention_widths(cfg))}
    if is_moe:
        out.update(moe_ffn_flops_by_component(ffn_rows, cfg.d_model, cfg.moe))
    else:
        out["ffn_dense"] = dense_ffn_flops(ffn_rows, cfg.d_model, cfg.d_ff, cfg.moe.activation)
    return out
