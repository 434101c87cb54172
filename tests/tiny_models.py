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
