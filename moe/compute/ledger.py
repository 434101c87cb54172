"""FLOPs actually executed, by component, measured with forward hooks.

A :class:`ComputeLedger` hooks the modules that do the work (attention, dense FFNs, MoE layers,
convolutions, exit heads, heads, and any other linear layer such as halting or gating units) and
adds, on every call, the FLOPs of the rows that really went through them: a skipped block or an
exited sample never calls its modules, and an MoE layer is charged for the assignments it kept.
Counts follow ``torch.utils.flop_counter`` conventions (a multiply-add is 2 FLOPs; matrix
products, convolutions and attention only), and ``flop_counter_mapping`` supplies the formulas
FlopCounterMode lacks on CPU (``_grouped_mm``, CPU flash attention) so the two can be compared.

Components: attention, dense_ffn, experts (routed), shared_experts, router (MoE), mod_router
(mixture-of-depths router and its causal predictor), conv, exit_heads, head (the final
classifier or LM head), halting, gating, other.

The conditional-depth blocks also report their own compute analytically as they run
(``dynamoe.depth.records.DepthAux``, cheap enough for every training step); the ledger measures
the same thing independently from the module calls, and a test holds the two to each other.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.layers.recompute import recomputing

COMPONENTS = (
    "attention",
    "dense_ffn",
    "experts",
    "shared_experts",
    "router",
    "mod_router",
    "conv",
    "exit_heads",
    "head",
    "halting",
    "gating",
    "other",
)


def _linear_component(name: str) -> str:
    """Component of a linear layer not covered by a dedicated hook, from its module path."""
    lowered = name.lower()
    for keys, component in (
        (("halt", "ponder"), "halting"),
        (("gate", "skip"), "gating"),
        (("depth.routers",), "mod_router"),
        (("router",), "router"),
        (("exit",), "exit_heads"),
    ):
        if any(k in lowered for k in keys):
            return component
    return "other"


class ComputeLedger:
    """Context manager that counts executed FLOPs per component while it is active.

    ``samples`` and ``tokens`` are added by the caller (``count_batch``) so that per-sample and
    per-token figures can be formed.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.flops: dict[str, float] = defaultdict(float)
        self.samples = 0
        self.tokens = 0
        # What the routed experts would cost if every expert ran on every token (dense MoE).
        self.dense_experts = 0.0
        self._handles = []

    # --- hooks ----------------------------------------------------------------------------------

    def _hooks(self):
        from dynamoe.exits.heads import ExitHead
        from dynamoe.layers.experts import DenseMLP
        from dynamoe.layers.moe_layer import MoELayer
        from dynamoe.models.modern import GroupedQueryAttention
        from dynamoe.models.transformer import SelfAttention

        covered: set[int] = set()  # modules inside a hooked module are not hooked again
        final_heads = {
            id(m) for m in (getattr(self.model, n, None) for n in ("head", "classifier")) if isinstance(m, nn.Module)
        }
        hf_layers = list(getattr(self.model, "layers", [])) if hasattr(self.model, "encoder") else []
        for layer in hf_layers:  # a pretrained encoder layer: attention + a dense FFN or an MoE layer
            yield layer, self._hf_layer(layer)
            moe = {id(m) for m in layer.modules() if isinstance(m, MoELayer)}
            covered.update(id(m) for m in layer.modules() if id(m) not in moe)
        for name, module in self.model.named_modules():
            if id(module) in covered:
                continue
            hook = None
            if isinstance(module, (SelfAttention, GroupedQueryAttention)):
                hook = self._attention
            elif isinstance(module, MoELayer):
                hook = self._moe(module)
            elif isinstance(module, DenseMLP):
                hook = self._dense("dense_ffn", module)
            elif isinstance(module, ExitHead):
                hook = self._exit_head("head" if id(module) in final_heads else "exit_heads", module)
            elif isinstance(module, nn.Conv2d):
                hook = self._conv
            elif isinstance(module, nn.Linear):
                hook = self._linear("head" if id(module) in final_heads else _linear_component(name))
            if hook is not None:
                covered.update(id(m) for m in module.modules())
                yield module, hook

    def _attention(self, module, inputs, kwargs, output):
        x = inputs[0]
        B, S, D = x.shape
        rows = kwargs.get("rows")
        widths = module.q_width, module.kv_width  # grouped-query attention: narrower K and V
        if rows is None:
            self.flops["attention"] += F_.attention_flops(B, S, D, *widths)
        else:  # S query rows against the K key rows of each sequence (halting, mixture-of-depths)
            K = rows[1].shape[1]
            self.flops["attention"] += F_.attention_rows_flops(B * S, B * S * K, D, B * K, *widths)

    def _hf_layer(self, layer):
        dense = getattr(layer.intermediate, "dense", None)  # None: an MoE layer, counted by its own hook
        d_ff = dense.out_features if dense is not None else 0

        def hook(module, inputs, output):
            x = inputs[0] if inputs else None
            B, S, D = x.shape
            self.flops["attention"] += F_.attention_flops(B, S, D)
            if d_ff:
                self.flops["dense_ffn"] += F_.dense_ffn_flops(B * S, D, d_ff)

        return hook

    def _moe(self, layer):
        cfg = layer.cfg

        def hook(module, inputs, output):
            x = inputs[0]
            D = x.shape[-1]
            tokens = x.numel() // D
            aux = output[1]
            kept = int(aux.counts.sum())
            self.flops["router"] += F_.linear_flops(tokens, D, module.num_experts)
            self.flops["experts"] += F_.dense_ffn_flops(kept, D, cfg.d_expert, cfg.activation)
            self.dense_experts += cfg.num_experts * F_.dense_ffn_flops(tokens, D, cfg.d_expert, cfg.activation)
            if module.shared is not None:
                shared = cfg.num_shared_experts * (cfg.d_shared or cfg.d_expert)
                self.flops["shared_experts"] += F_.dense_ffn_flops(tokens, D, shared, cfg.activation)

        return hook

    def _dense(self, component, mlp):
        def hook(module, inputs, output):
            x = inputs[0]
            D = x.shape[-1]
            hidden = mlp.w_out.in_features
            self.flops[component] += F_.dense_ffn_flops(x.numel() // D, D, hidden, mlp.activation)

        return hook

    def _exit_head(self, component, head):
        def hook(module, inputs, output):
            self.flops[component] += inputs[0].shape[0] * head.flops()

        return hook

    def _conv(self, module, inputs, output):
        B, C_out, H, W = output.shape
        k = module.kernel_size[0] * module.kernel_size[1]
        self.flops["conv"] += 2 * B * (module.in_channels // module.groups) * C_out * k * H * W

    def _linear(self, component):
        def hook(module, inputs, output):
            x = inputs[0]
            self.flops[component] += F_.linear_flops(x.numel() // x.shape[-1], module.in_features, module.out_features)

        return hook

    # --- use ------------------------------------------------------------------------------------

    def __enter__(self) -> ComputeLedger:
        for module, hook in self._hooks():
            with_kwargs = hook == self._attention
            self._handles.append(module.register_forward_hook(_once(hook, with_kwargs), with_kwargs=with_kwargs))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def count_batch(self, batch: dict) -> None:
        labels = batch.get("labels")
        mask = batch.get("attention_mask")
        if "input_ids" in batch:
            self.samples += batch["input_ids"].shape[0]
            self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        elif labels is not None:
            self.samples += labels.shape[0]
            self.tokens += labels.shape[0]

    @property
    def total(self) -> float:
        return float(sum(self.flops.values()))

    def by_component(self) -> dict[str, float]:
        return {c: float(self.flops.get(c, 0.0)) for c in COMPONENTS}

    @property
    def dense_equivalent(self) -> float:
        """This pass's FLOPs with every routed expert run on every token."""
        return self.total - self.flops.get("experts", 0.0) + self.dense_experts


def flop_counter_mapping() -> dict:
    """Formulas for ops FlopCounterMode does not count on CPU, in its own conventions."""
    from torch.utils.flop_counter import sdpa_flop_count

    aten = torch.ops.aten

    def grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs):
        # x [N, K] @ w [E, K, M] with groups along N: every row meets one K x M matrix.
        if len(a_shape) == 2 and len(b_shape) == 3:
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        if len(a_shape) == 2 and len(b_shape) == 2:  # weight-gradient form: [K, N] @ [N, M] -> [E, K, M]
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        raise NotImplementedError(f"_grouped_mm shapes {a_shape} x {b_shape}")

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {aten._grouped_mm: grouped_mm}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_flash
    return mapping


@contextmanager
def flop_counter():
    """``FlopCounterMode`` with :func:`flop_counter_mapping`; yields it (read ``get_total_flops()``)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False, custom_mapping=flop_counter_mapping())
    with mode:
        yield mode


def _once(hook, with_kwargs: bool):
    """``hook``, silent while a checkpointed block is run again for backward (already counted)."""
    if with_kwargs:

        def counted_kw(module, inputs, kwargs, output):
            if not recomputing():
                hook(module, inputs, kwargs, output)

        return counted_kw

    def counted(module, inputs, output):
        if not recomputing():
            hook(module, inputs, output)

    return counted
