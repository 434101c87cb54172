"""How much memory a run needs per process, and how many bytes its all-to-alls send: ``moe plan``.

Everything is counted per rank (one process, one GPU) from the config, without building the model's
weights: parameters come from a copy built on the meta device, activations from a formula of what
each block saves for backward (checked against ``saved_tensors_hooks`` in the tests), and the
optimizer and ZeRO figures from what DeepSpeed allocates (``deepspeed/runtime/zero/stage_1_and_2.py``).
Under expert parallelism the busiest rank's expert rows are reported beside uniform routing
(``routing`` picks which the total counts).
``docs/planning.md`` gives the formulas and the measured-against-planned table.

Shape legend: B micro-batch, S sequence, T = B*S tokens, D model width, H heads, V vocabulary,
E experts, k experts per token, N = T*k expert rows, F hidden width of an FFN or expert, R the
rows one rank's experts receive (N with uniform routing; up to ep_size * N on the busiest rank).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from dynamoe.config import ConfigError, RunConfig

MODES = ("none", "moe_blocks", "blocks")
# How many rows a rank's experts receive under expert parallelism: "uniform" (T*k, every rank the
# same), or "worst" (the busiest rank receives every row its experts can take, as when the router
# sends all tokens to experts of one rank; measured in the first steps of quickstart, docs/planning.md).
ROUTINGS = ("uniform", "worst")
PRECISIONS = ("fp32", "bf16")
BYTES = {"fp32": 4, "bf16": 2}

# DeepSpeed's ZeRO 1/2 gradient bucket (``reduce_bucket_size``, elements) as the trainer leaves it.
REDUCE_BUCKET_ELEMENTS = 500_000_000
# A GPU process also holds the CUDA context, cuBLAS workspaces and NCCL buffers, which PyTorch's
# allocator does not count. An estimate for current drivers, not a measurement.
CUDA_OVERHEAD_BYTES = 1 << 30
# A CPU process's resident memory before its model exists: Python, PyTorch, DeepSpeed, the data.
# Measured here (VmHWM of a run whose model is negligible, `python -m dynamoe.evals.plan_check`).
CPU_OVERHEAD_BYTES = 570 << 20

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, what: str = "--gpu-memory") -> int:
    """Bytes from "80GiB", "80GB", "512MiB", "1.5 TiB" or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{what}: '{text}' is not a memory size; fix: write a number and a unit, such as 80GiB, 80GB or 512MiB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"{what}: '{text}' is not positive; fix: give the memory of one GPU, such as 80GiB")
    return int(value)


def check_world(world: int, ep_size: int) -> None:
    """The processes split into whole expert-parallel groups (the trainer's own check)."""
    if world % ep_size:
        raise ConfigError(
            f"parallel.ep_size: {ep_size} does not divide the number of processes ({world}); "
            f"fix: launch a multiple of {ep_size} processes (e.g. torchrun --nproc_per_node "
            f"{ep_size}) or lower parallel.ep_size"
        )


@dataclass(frozen=True)
class Breakdown:
    """Per-rank bytes in one precision (bf16: ZeRO at least stage 1, as the config requires)."""

    precision: str
    zero_stage: int
    params: int
    grads: int
    master_weights: int
    optimizer_moments: int
    zero_buffers: int
    activations: dict[str, int]  # saved for backward, by activation-checkpointing mode
    recompute: dict[str, int]  # one checkpointed block run again in backward, live at the peak
    workspace: int  # gradients of activations and temporaries alive while backward runs
    grad_norm_buffers: int  # ZeRO 0: the trainer's float64 copy and square of one gradient tensor
    runtime_overhead: int
    # The busiest rank's expert rows over the uniform share (activations, recomputed block and
    # workspace together), by mode; in the total only when ``routing`` is "worst".
    uneven_routing: dict[str, int]
    routing: str

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.master_weights + self.optimizer_moments + self.zero_buffers

    def total(self, mode: str) -> int:
        uneven = self.uneven_routing[mode] if self.routing == "worst" else 0
        return (
            self.model_states
            + self.activations[mode]
            + self.recompute[mode]
            + self.workspace
            + self.grad_norm_buffers
            + uneven
            + self.runtime_overhead
        )


@dataclass(frozen=True)
class MemoryPlan:
    name: str
    device: str  # "cuda" or "cpu": where the overhead term comes from
    world: int
    ep_size: int
    zero_stage: int
    precision: str
    checkpointing: str
    micro_batch: int
    seq_len: int
    params: int  # whole model
    expert_params: int  # routed experts, whole model
    params_per_rank: int  # dense + this rank's share of the experts
    by_precision: dict[str, Breakdown]
    all_to_all_bytes: dict[str, int]  # per step, all ranks together (the trainer's all_to_all_bytes), by precision
    available_bytes: int | None  # per rank
    routing: str  # "uniform" or "worst": which expert rows the total counts (ROUTINGS)
    expert_rows: dict[str, int]  # rows one MoE layer's experts process on a rank, by routing
    notes: list[str] = field(default_factory=list)

    @property
    def configured(self) -> Breakdown:
        return self.by_precision[self.precision]

    @property
    def total(self) -> int:
        return self.configured.total(self.checkpointing)

    @property
    def fits(self) -> bool | None:
        return None if self.available_bytes is None else self.total <= self.available_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["total"] = self.total
        out["fits"] = self.fits
        return out

    def format_table(self) -> str:
        other = "bf16" if self.precision == "fp32" else "fp32"
        mine, theirs = self.by_precision[self.precision], self.by_precision[other]
        header = (
            f"{self.name}: {self.world} process(es), ep_size {self.ep_size}, ZeRO {self.zero_stage}, "
            f"{self.precision}, micro-batch {self.micro_batch} x {self.seq_len} tokens, "
            f"activation checkpointing {self.checkpointing}"
        )
        params = (
            f"parameters: {self.params:,} ({self.expert_params:,} in routed experts); "
            f"{self.params_per_rank:,} on each rank"
        )
        label_other = f"{other} (ZeRO {theirs.zero_stage})" if theirs.zero_stage != mine.zero_stage else other
        rows = [
            ("parameters", mine.params, theirs.params),
            ("gradients", mine.grads, theirs.grads),
            ("fp32 master weights", mine.master_weights, theirs.master_weights),
            ("Adam moments", mine.optimizer_moments, theirs.optimizer_moments),
            ("ZeRO buffers", mine.zero_buffers, theirs.zero_buffers),
            ("gradient-norm temporaries", mine.grad_norm_buffers, theirs.grad_norm_buffers),
        ]
        for mode in MODES:
            mark = " *" if mode == self.checkpointing else ""
            rows.append((f"activations, ckpt {mode}{mark}", mine.activations[mode], theirs.activations[mode]))
        rows += [
            (
                f"recomputed block ({self.checkpointing})",
                mine.recompute[self.checkpointing],
                theirs.recompute[self.checkpointing],
            ),
            ("backward workspace", mine.workspace, theirs.workspace),
        ]
        if self.ep_size > 1:
            counted = "" if self.routing == "worst" else " (not in total)"
            mode = self.checkpointing
            rows.append((f"busiest rank, all rows{counted}", mine.uneven_routing[mode], theirs.uneven_routing[mode]))
        rows += [
            (f"runtime overhead ({self.device})", mine.runtime_overhead, theirs.runtime_overhead),
            ("total per rank", mine.total(self.checkpointing), theirs.total(self.checkpointing)),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [header, params, "", f"{'per rank':<{width}}  {self.precision + ' *':>14}  {label_other:>16}"]
        for label, a, b in rows:
            if label == "total per rank":
                lines.append("-" * (width + 34))
            lines.append(f"{label:<{width}}  {_fmt(a):>14}  {_fmt(b):>16}")
        a2a = self.all_to_all_bytes
        lines.append("")
        if self.ep_size > 1:
            rows_u, rows_w = self.expert_rows["uniform"], self.expert_rows["worst"]
            lines.append(
                f"expert rows per MoE layer on a rank: {rows_u:,} with uniform routing, up to {rows_w:,} on the "
                f"busiest rank; the total counts {'the busiest' if self.routing == 'worst' else 'uniform routing'}"
            )
            lines.append(
                f"all-to-all per step, all ranks (uniform routing): {_fmt(a2a[self.precision])} "
                f"({_fmt(a2a[other])} in {other})"
            )
        else:
            lines.append("all-to-all per step: none (ep_size 1)")
        if self.available_bytes is None:
            lines.append("fits: unknown (no memory size given or found)")
        else:
            verdict = "yes" if self.fits else "NO"
            lines.append(f"fits: {verdict}: {_fmt(self.total)} needed per rank, {_fmt(self.available_bytes)} available")
        lines.append("* the configured precision and checkpointing mode")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


# --- model states ------------------------------------------------------------------------------


def model_state_bytes(
    dense: int, experts_local: int, world: int, ep_size: int, zero_stage: int, precision: str, device: str
) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients, fp32 master weights, Adam moments and ZeRO buffers.

    ZeRO 0 (fp32 only): PyTorch's AdamW on the module's own fp32 weights, nothing partitioned.
    ZeRO 1/2: DeepSpeed moves the weights into flat buffers of the model dtype (the module's
    parameters become views of them), and each rank keeps an fp32 copy of its partition as master
    weights, even when the model is fp32 already, with Adam's two moments beside it. Dense
    parameters are partitioned over all ``world`` ranks, expert parameters over the
    expert-data-parallel group (``world / ep_size`` ranks)."""
    p = BYTES[precision]
    local = dense + experts_local
    shard = dense / world + experts_local / (world // ep_size)
    if zero_stage == 0:
        # The engine all-reduces gradients through flat copies (one per bucket of 5e8 elements:
        # the dense gradients, then this rank's expert gradients), even on one process.
        flat = 4 * min(REDUCE_BUCKET_ELEMENTS, max(dense, experts_local))
        return {
            "params": 4 * local,
            "grads": 4 * local,
            "master_weights": 0,
            "optimizer_moments": 8 * local,
            "zero_buffers": flat,
        }
    # The gradient bucket DeepSpeed reduces through: on a GPU the caching allocator hands out all of
    # it; on a CPU only the pages the gradients are copied into become resident.
    bucket_elems = REDUCE_BUCKET_ELEMENTS if device == "cuda" else min(REDUCE_BUCKET_ELEMENTS, local)
    if zero_stage == 1:
        # Full gradients in the model dtype, reduced through an fp32 bucket into an fp32 partition.
        grads = p * local + 4 * shard
        buffers = 4 * bucket_elems
    else:
        # Gradients leave the parameters for the bucket (model dtype) as backward produces them;
        # each rank keeps its own partition of them.
        grads = p * shard
        buffers = p * bucket_elems
    return {
        "params": p * local,
        "grads": int(grads),
        "master_weights": int(4 * shard),
        "optimizer_moments": int(8 * shard),
        "zero_buffers": int(buffers),
    }


# --- activations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    """Bytes one micro-batch saves for backward, block by block (transformer models)."""

    full: list[int]  # each block run normally
    is_moe: list[bool]
    block_input: int  # what a checkpointed block keeps instead: its input
    outside: int  # embeddings, final norm, head and loss
    workspace: list[int]  # largest gradient buffers alive while each block's backward runs


def _ffn_width_factor(activation: str) -> int:
    """Saved [rows, F] tensors per FFN row: GELU keeps its input and output; SwiGLU its [gate | up]
    input (2F), silu(gate) and the product."""
    return 4 if activation == "swiglu" else 2


def _transformer_blocks(cfg: RunConfig, batch: int, act_bytes: int, ep_size: int, routing: str) -> _Blocks:
    m, moe = cfg.model, cfg.model.moe
    a = act_bytes
    S = cfg.data.seq_len
    T, D, H = batch * S, m.d_model, m.n_heads
    k = moe.num_experts if moe.router.kind == "expert_choice" else moe.router.top_k
    E = moe.num_experts
    N = _expert_rows(cfg, T)  # rows this rank's tokens send to experts (and get back)
    R = _received_rows(cfg, T, ep_size, routing)  # rows this rank's experts process
    w = _ffn_width_factor(moe.activation)
    # Attention: LayerNorm inputs (with their mean and rstd), the qkv projection's input and
    # output, the fused attention's output and log-sum-exp (fp32), the second LayerNorm's input.
    # The fused (flash) kernels keep no [S, S] scores.
    common = a * (7 * T * D + 4 * T) + 4 * T * H
    if m.kind == "encoder":
        # A key-padding mask sends attention to the unfused kernel, which keeps the [B, H, S, S]
        # probabilities (and the boolean mask).
        common += a * batch * H * S * S + batch * S * S
    dense = a * (T * D + w * T * m.d_ff)
    # Router in fp32 whatever the precision: its fp32 input, logits, scores, probabilities, the
    # top-k sort's indices (int64 [T, E]), the combine weights; the gate weight's fp32 copy in bf16.
    router = 4 * T * D + 20 * T * E + 4 * T * k + 12 * T + 4 * E + (4 * D * E if a != 4 else 0)
    # Dispatch keeps the row map (int64) and weights, combine the expert outputs of this rank's
    # rows (N), the experts their input rows and hidden activations (R rows: those received).
    routed = 12 * T * k + a * N * D + 4 * E + a * R * D + a * w * R * moe.d_expert
    if ep_size > 1:
        routed += 2 * 8 * R  # the order of received rows and its inverse
    shared = 0
    if moe.num_shared_experts:
        d_shared = moe.num_shared_experts * (moe.d_shared or moe.d_expert)
        shared = a * w * T * d_shared + (a * T * D if a != 4 else 0)  # bf16: the LayerNorm output too
    moe_ffn = router + routed + shared
    full, is_moe, work = [], [], []
    for i in range(m.n_layers):
        mo = m.is_moe_layer(i)
        is_moe.append(mo)
        full.append(common + (moe_ffn if mo else dense))
        # Backward of the FFN: the gradients of its hidden activation and of its input rows, and
        # of the residual stream around it (in the model dtype).
        rows, width = (R, moe.d_expert) if mo else (T, m.d_ff)
        work.append(a * (w * rows * width + 2 * rows * D + 3 * T * D))
    outside = a * (2 * T * D + 2 * T) + 8 * T + 8 * S  # final LayerNorm, head input, token ids
    if m.kind == "decoder":
        outside += 4 * T * m.vocab_size  # log-softmax of the fp32 logits
        # The loss's backward: the logits' gradient in fp32 and in the model dtype.
        work.append((4 + a) * T * m.vocab_size + 4 * T * m.vocab_size)
    else:
        outside += a * T * D
    return _Blocks(full, is_moe, a * T * D, outside, work)


def _expert_rows(cfg: RunConfig, tokens: int) -> int:
    """Rows the experts of one MoE layer process per micro-batch (on a rank, with uniform routing)."""
    router, E = cfg.model.moe.router, cfg.model.moe.num_experts
    if router.kind == "expert_choice":
        capacity = min(tokens, math.ceil((router.capacity_factor or 1.0) * tokens * router.top_k / E))
        return capacity * E
    rows = tokens * router.top_k
    if router.capacity_factor is not None:
        rows = min(rows, E * math.ceil(router.capacity_factor * tokens * router.top_k / E))
    return rows


def _received_rows(cfg: RunConfig, tokens: int, ep_size: int, routing: str = "uniform") -> int:
    """Rows one MoE layer's experts process on a rank per micro-batch. Uniform: what its own
    tokens send (``_expert_rows``). Worst: the busiest rank, to which every rank of the group sends
    all the rows its experts can take: each token at most min(k, E / ep_size) rows (its k experts
    are distinct), each local expert at most its capacity when a capacity factor is set. Expert
    choice takes exactly its capacity from every rank, so it is the same either way."""
    rows = _expert_rows(cfg, tokens)
    router, E = cfg.model.moe.router, cfg.model.moe.num_experts
    if routing == "uniform" or ep_size == 1 or router.kind == "expert_choice":
        return rows
    local = E // ep_size
    per_source = tokens * min(router.top_k, local)
    if router.capacity_factor is not None:
        per_source = min(per_source, local * math.ceil(router.capacity_factor * tokens * router.top_k / E))
    return max(rows, ep_size * per_source)


def _checkpointed(mode: str, is_moe: bool) -> bool:
    return mode == "blocks" or (mode == "moe_blocks" and is_moe)


def activation_bytes(
    cfg: RunConfig, batch: int, act_bytes: int, ep_size: int, routing: str = "uniform"
) -> tuple[dict, dict, int]:
    """(saved for backward by mode, the recomputed block by mode, backward workspace) in bytes,
    with the expert rows that ``routing`` gives this rank (``_received_rows``)."""
    blocks = _transformer_blocks(cfg, batch, act_bytes, ep_size, routing)
    saved, recompute = {}, {}
    for mode in MODES:
        kept = [
            blocks.block_input if _checkpointed(mode, mo) else full
            for full, mo in zip(blocks.full, blocks.is_moe, strict=True)
        ]
        saved[mode] = sum(kept) + blocks.outside
        again = [full - blocks.block_input for full, mo in zip(blocks.full, blocks.is_moe) if _checkpointed(mode, mo)]
        recompute[mode] = max(again, default=0)
    return saved, recompute, max(blocks.workspace)


def all_to_all_bytes(cfg: RunConfig, world: int, act_bytes: int) -> int:
    """Token rows sent to other ranks in one optimizer step, all ranks together, as the trainer's
    counter counts them: dispatch and combine, forward and backward, and once more each when an
    MoE block is checkpointed (its forward runs again in backward). Routing is taken as uniform:
    a fraction (ep_size - 1) / ep_size of each rank's rows goes to another rank."""
    ep = cfg.parallel.ep_size
    m = cfg.model
    if ep == 1:
        return 0
    rows = _expert_rows(cfg, cfg.train.batch_size * cfg.data.seq_len)
    total = 0
    for i in range(m.n_layers):
        if m.is_moe_layer(i):
            passes = 6 if _checkpointed(cfg.train.activation_checkpointing, True) else 4
            total += passes * rows * (ep - 1) / ep * m.d_model * act_bytes
    return int(total * cfg.train.grad_accum * world)


def largest_local_tensor(model_cfg, ep_size: int) -> int:
    """Elements of the largest parameter tensor a rank holds (a routed expert tensor keeps
    1 / ep_size of its experts), from a copy of the model built on the meta device."""
    import torch

    from dynamoe.layers.experts import GroupedExperts
    from dynamoe.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    return max(p.numel() // ep_size if id(p) in expert_ids else p.numel() for p in model.parameters())


def grad_norm_bytes(largest: int, zero_stage: int) -> int:
    """ZeRO 0: the trainer computes the gradient norm itself (``global_grad_norm``), one tensor
    at a time, through a float64 copy of the gradient and its square: 16 bytes per element of the
    largest tensor. ZeRO 1/2 take the norm inside DeepSpeed's optimizer, from its flat partition."""
    return 16 * largest if zero_stage == 0 else 0


# --- the plan ----------------------------------------------------------------------------------


def fill_vocabulary(cfg: RunConfig) -> RunConfig:
    """The config with what the data decides (vocabulary, classes) filled in, as the trainer does."""
    m = cfg.model
    if m.vocab_size is not None and (cfg.task == "lm" or m.num_classes is not None):
        return cfg
    from dynamoe.data import build_data
    from dynamoe.training.trainer import _fill_from_data

    return _fill_from_data(cfg, build_data(cfg.data, cfg.task))


def plan(
    cfg: RunConfig,
    gpus: int | None = None,
    gpu_memory_bytes: int | None = None,
    *,
    device: str | None = None,
    available_bytes: int | None = None,
    routing: str = "uniform",
) -> MemoryPlan:
    """Per-rank memory and all-to-all bytes of training ``cfg`` on ``gpus`` processes (default:
    ``parallel.ep_size``, the fewest that hold every expert). ``gpu_memory_bytes``: each GPU's
    memory; without it, the memory of this machine (its GPU, or its RAM shared by the processes).
    ``device`` ("cuda" or "cpu") picks the overhead term; default: cuda when GPUs are named or
    present. ``available_bytes`` overrides the per-rank memory compared with. ``routing``
    ("uniform" or "worst", ``ROUTINGS``): the expert rows a rank's experts process in the total; the
    busiest rank's excess over uniform routing is reported either way (``uneven_routing``)."""
    import torch

    if routing not in ROUTINGS:
        raise ConfigError(f"routing: '{routing}' is not one of {', '.join(ROUTINGS)}; fix: pick one of them")
    if cfg.model.kind not in ("decoder", "encoder"):
        raise ConfigError(
            f"model.kind: the planner counts Transformer models (decoder, encoder), not '{cfg.model.kind}'; "
            "fix: plan a decoder or encoder config, or measure this model with a short `moe train` run "
            "(its metrics.jsonl logs peak_memory_mib)"
        )
    cfg = dataclasses.replace(cfg)  # re-runs the config's own checks (ep_size divides the experts)
    ep = cfg.parallel.ep_size
    world = ep if gpus is None else gpus
    if world < 1:
        raise ConfigError(f"--gpus: must be at least 1, got {world}; fix: give the number of GPUs (processes)")
    check_world(world, ep)
    cfg = fill_vocabulary(cfg)
    from dynamoe.training.preflight import available_memory_bytes, count_parameters

    total, experts = count_parameters(cfg.model)
    dense, experts_local = total - experts, experts // ep
    largest = largest_local_tensor(cfg.model, ep)
    if device is None:
        device = "cuda" if gpu_memory_bytes is not None or torch.cuda.is_available() else "cpu"
    overhead = CUDA_OVERHEAD_BYTES if device == "cuda" else CPU_OVERHEAD_BYTES
    t = cfg.train
    stage = cfg.parallel.zero_stage
    by_precision, a2a = {}, {}
    for precision in PRECISIONS:
        # bf16 needs ZeRO's optimizer for its fp32 master weights: at least stage 1.
        z = max(stage, 1) if precision == "bf16" else stage
        a = BYTES[precision]
        states = model_state_bytes(dense, experts_local, world, ep, z, precision, device)
        if device == "cpu":
            # Every rank builds the whole model, then keeps its experts' shard; the heap keeps the
            # freed experts' blocks (glibc, as keep_large_allocations sets it).
            states["zero_buffers"] += 4 * (experts - experts_local)
        saved, recompute, work = activation_bytes(cfg, t.batch_size, a, ep)
        saved_w, recompute_w, work_w = activation_bytes(cfg, t.batch_size, a, ep, "worst")
        uneven = {m: saved_w[m] + recompute_w[m] + work_w - saved[m] - recompute[m] - work for m in MODES}
        by_precision[precision] = Breakdown(
            precision=precision,
            zero_stage=z,
            **states,
            activations=saved,
            recompute=recompute,
            workspace=work,
            grad_norm_buffers=grad_norm_bytes(largest, z),
            runtime_overhead=overhead,
            uneven_routing=uneven,
            routing=routing,
        )
        a2a[precision] = all_to_all_bytes(cfg, world, a)
    notes = []
    if available_bytes is None:
        if gpu_memory_bytes is not None:
            available_bytes = gpu_memory_bytes
        else:
            here = available_memory_bytes()
            if here is not None and device == "cpu":
                # The processes of a CPU run share this host's memory.
                notes.append(f"{world} process(es) share this host's {_fmt(here)} of available memory")
                here //= world
            available_bytes = here
    if cfg.model.depth.enabled:
        notes.append(f"depth mode {cfg.model.depth.mode} is counted as if every token ran every layer (an upper bound)")
    if cfg.model.block == "modern":
        notes.append(
            "modern block: attention activations are counted with the GPT-2 block's shapes (d_model-wide q, k, v; "
            "no rotary or QK-norm copies), not yet measured for grouped-query attention"
        )
    if device == "cuda":
        notes.append(
            f"runtime overhead on GPU is an estimate ({_fmt(CUDA_OVERHEAD_BYTES)}: CUDA context, cuBLAS, NCCL)"
        )
    return MemoryPlan(
        name=cfg.train.name or "run",
        device=device,
        world=world,
        ep_size=ep,
        zero_stage=stage,
        precision=t.precision,
        checkpointing=t.activation_checkpointing,
        micro_batch=t.batch_size,
        seq_len=cfg.data.seq_len,
        params=total,
        expert_params=experts,
        params_per_rank=dense + experts_local,
        by_precision=by_precision,
        all_to_all_bytes=a2a,
        available_bytes=available_bytes,
        routing=routing,
        expert_rows={r: _received_rows(cfg, t.batch_size * cfg.data.seq_len, ep, r) for r in ROUTINGS},
        notes=notes,
    )
