"""dynamoe's grouped-GEMM experts inside transformers: the experts implementation ``"dynamoe"``.

transformers (5.x) routes every experts module decorated with ``@use_experts_implementation``
(Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE, GPT-OSS, ...) through its ``ExpertsInterface``:
the module's ``forward(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k])`` becomes
the function registered under ``config._experts_implementation``. Importing this module registers
:func:`dynamoe_experts_forward` under ``"dynamoe"``, after which

    AutoModelForCausalLM.from_pretrained(path, experts_implementation="dynamoe")
    model.set_experts_implementation("dynamoe")          # or switch a loaded model

run the experts through dynamoe's kernels: ``permute`` (rows sorted by expert) -> ``grouped_mm``
(gate/up) -> the module's own gate (``_apply_gate``) or activation (``act_fn``) -> ``grouped_mm``
(down) -> ``unpermute`` (weighted combine, summed in fp32). Triton runs them on CUDA tensors, the
PyTorch reference (``torch._grouped_mm`` where it applies) on CPU tensors (``docs/kernels.md``).

``import dynamoe`` never imports this module (nor transformers); only ``import
dynamoe.interop.hf_experts`` does. See ``docs/hf_experts.md`` for the supported layouts and limits.
"""

from __future__ import annotations

import torch

from dynamoe import kernels

try:
    from transformers.integrations import moe as _hf_moe
    from transformers.integrations.moe import ExpertsInterface
except ImportError as err:  # transformers 4.x has no experts interface to register with
    import transformers

    raise ImportError(
        f"dynamoe.interop.hf_experts needs transformers' experts interface "
        f"(transformers.integrations.moe.ExpertsInterface), which transformers {transformers.__version__} "
        "does not have; install a transformers release that has it (5.24 is the one tested here)"
    ) from err

NAME = "dynamoe"

# The flags ``@use_experts_implementation`` sets on every instance; a module without them was not
# built for the experts interface, so its weight layout is unknown.
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def register(name: str = NAME) -> None:
    """Register :func:`dynamoe_experts_forward` with transformers under ``name`` (idempotent).

    ``ExpertsInterface.register`` writes the class-wide mapping, which is also the list transformers
    validates ``experts_implementation=`` against (``PreTrainedModel.get_correct_experts_implementation``),
    so once this has run the name is accepted everywhere: ``from_pretrained``, ``from_config``, the
    config's ``experts_implementation`` and ``set_experts_implementation``.
    """
    ExpertsInterface.register(name, dynamoe_experts_forward)


def _expert_weights(module: torch.nn.Module):
    """(w_in [E, d, f_in], b_in [E, f_in] | None, w_out [E, f, d], b_out [E, d] | None) in dynamoe's
    input-major layout (views; no copy here), after refusing layouts this implementation cannot run."""
    missing = [flag for flag in _LAYOUT_FLAGS if not hasattr(module, flag)]
    if missing:
        raise TypeError(
            f"{type(module).__name__} lacks the layout flags {missing} that transformers' "
            "@use_experts_implementation decorator sets; the dynamoe experts implementation only runs "
            "experts classes decorated with it (transformers.integrations.use_experts_implementation)"
        )
    if module.has_gate and not module.is_concatenated:
        # Interleaved [g0, u0, g1, u1, ...] columns are fine as long as the class's own _apply_gate
        # de-interleaves them (GPT-OSS does); transformers' default gate splits [gate | up] halves and
        # would silently pair the wrong columns.
        default_gate = getattr(_hf_moe, "_default_apply_gate", None)
        if default_gate is not None and getattr(type(module), "_apply_gate", None) is default_gate:
            raise ValueError(
                f"{type(module).__name__} has is_concatenated=False (interleaved gate/up columns) but uses "
                "transformers' default _apply_gate, which splits [gate | up] halves; the dynamoe experts "
                "implementation does not de-interleave by itself: give the class an _apply_gate that reads "
                "the interleaved layout, or store gate_up_proj concatenated"
            )
    prefix = "gate_up_proj" if module.has_gate else "up_proj"
    w_in, w_out = getattr(module, prefix), module.down_proj
    for name, w in ((prefix, w_in), ("down_proj", w_out)):
        if w.dim() != 3 or not w.dtype.is_floating_point or w.element_size() < 2:
            raise ValueError(
                f"{type(module).__name__}.{name} is {w.dtype} of shape {tuple(w.shape)}; the dynamoe experts "
                "implementation needs unquantized [E, out, in] (or, with is_transposed, [E, in, out]) fp32, "
                "bf16 or fp16 weights: dequantize the experts or use one of transformers' quantized "
                "experts implementations"
            )
    b_in = b_out = None
    if module.has_bias:
        b_in, b_out = getattr(module, f"{prefix}_bias", None), getattr(module, "down_proj_bias", None)
        if b_in is None or b_out is None:
            raise ValueError(
                f"{type(module).__name__} has has_bias=True but no {prefix}_bias / down_proj_bias "
                "parameters; set has_bias=False in its @use_experts_implementation or add the biases"
            )
    if not module.is_transposed:  # stored as nn.Linear weights, [E, out, in]
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    return w_in, b_in, w_out, b_out


def dynamoe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts of ``self`` on ``hidden_states`` [T, d] with dynamoe's dispatch and grouped GEMMs.

    y[t] = sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t]), in the dtype of
    ``hidden_states``; differentiable in the input, the routing weights and every expert parameter.
    Slots whose index is not a local expert (the sentinels >= num_experts that transformers' expert
    parallelism writes for experts held by other ranks, or negative ones) contribute nothing.
    """
    w_in, b_in, w_out, b_out = _expert_weights(self)
    num_experts = w_in.shape[0]  # the experts held here (a shard under expert parallelism)
    if hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape:
        raise ValueError(
            f"dynamoe experts: expected hidden_states [T, d] and top_k_index, top_k_weights [T, k]; got "
            f"{tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}"
        )
    if hidden_states.shape[1] != w_in.shape[1] or top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"dynamoe experts: hidden_states {tuple(hidden_states.shape)} does not match the expert input width "
            f"{w_in.shape[1]} or the {top_k_index.shape[0]} routed tokens"
        )
    num_tokens, k = top_k_index.shape
    dtype = hidden_states.dtype

    # Slots that name no local expert are sent to expert 0 with weight 0 rather than dropped: the
    # plan stays dropless (num_rows = T*k, known on the host), so nothing is read back from the
    # device, and the zero weight removes them from the output and from every gradient (the
    # combine's row gradient is weight * dy). Routers of the supported families never emit them.
    local = (top_k_index >= 0) & (top_k_index < num_experts)
    experts_Tk = torch.where(local, top_k_index, torch.zeros_like(top_k_index)).long()
    weights_Tk = torch.where(local, top_k_weights, torch.zeros_like(top_k_weights))
    # Rows per expert on device: scatter_add, unlike bincount, never reads its maximum back.
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=experts_Tk.device)
    counts_E.scatter_add_(0, experts_Tk.reshape(-1), torch.ones_like(experts_Tk.reshape(-1)))
    offsets_E = kernels.offsets_from_counts(counts_E)

    x_ND, row_map_Tk = kernels.permute(hidden_states, experts_Tk, num_experts, num_tokens * k)
    expert_of_row_N = None
    if b_in is not None:  # each row's expert, for its bias: row_map is a bijection onto the rows here
        expert_of_row_N = torch.empty_like(experts_Tk.reshape(-1))
        expert_of_row_N.scatter_(0, row_map_Tk.reshape(-1), experts_Tk.reshape(-1))

    # Weights in the activations' dtype (as dynamoe's own experts do): bf16 activations run bf16
    # GEMMs with fp32 accumulation, whatever the master weights are kept in.
    h_NF = kernels.grouped_mm(x_ND, w_in.to(dtype), offsets=offsets_E)
    if b_in is not None:
        h_NF = h_NF + b_in.to(dtype).index_select(0, expert_of_row_N)
    a_NF = self._apply_gate(h_NF) if self.has_gate else self.act_fn(h_NF)
    y_ND = kernels.grouped_mm(a_NF.to(dtype), w_out.to(dtype), offsets=offsets_E)
    if b_out is not None:
        y_ND = y_ND + b_out.to(dtype).index_select(0, expert_of_row_N)
    if self.has_post_expert_norm:
        y_ND = self.post_expert_norm(y_ND)
    # unpermute sums each token's weighted rows in fp32 and returns y_ND's dtype.
    return kernels.unpermute(y_ND.to(dtype), row_map_Tk, weights_Tk).to(dtype)


register()
