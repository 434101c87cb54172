"""The small Transformer the model-level tests share: 4 layers, MoE in every other one."""

SMALL = {
    "d_model": 32,
    "n_layers": 4,
    "n_heads": 4,
    "d_ff": 64,
    "max_seq_len": 16,
    "vocab_size": 40,
    "moe_every": 2,
    "moe": {"num_experts": 4, "d_expert": 24},
}

# The same model with the modern block (RMSNorm, rotary positions, grouped-query attention with
# per-head QK-norm, SwiGLU): the decoder tests run on both blocks.
MODERN = {"block": "modern", "n_kv_heads": 2, "qk_norm": "per_head", "moe": {**SMALL["moe"], "activation": "swiglu"}}
BLOCKS = ("gpt2", "modern")


def small(block: str = "gpt2") -> dict:
    """SMALL with ``block``'s fields."""
    return {**SMALL, **(MODERN if block == "modern" else {})}
