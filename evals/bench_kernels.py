"""Benchmark: the MoE kernel ops (routing, dispatch, grouped GEMMs, fused expert MLP) and whole MoE
layers, per shape, against peers, with a dense GEMM of equal FLOPs as the yardstick.

Providers per op (each runs where it can; a row that cannot run says why):
    triton        dynamoe's Triton kernels (CUDA only; the CPU interpreter is for correctness, not speed)
    reference     dynamoe's PyTorch path (torch._grouped_mm where it applies, else a loop)
    torch loop    a Python loop over experts, one torch.mm per expert
    torch._grouped_mm   PyTorch's grouped GEMM (CUDA bf16 on sm90+, CPU fp32/bf16 with aligned widths)
    dense         one torch.mm with the same FLOPs (cuBLAS on GPU): the "% dense" column's baseline
    scattermoe    ScatterMoE's expert MLP (expert MLP rows; CUDA, when ``scattermoe`` is installed)
    deepspeed / megatron-core / megablocks   their MoE layers (whole layer rows only; Megatron-Core
                  with its grouped-GEMM experts, MegaBlocks' dropless dMoE; both need CUDA)

FLOPs and bytes are nominal, from the formulas in ``FORMULAS`` (dropless, so N = T * k rows).
Routing is balanced by default (every expert gets T*k/E rows: kernel speed apart from router
quality); ``--routing skewed`` draws log-normal expert popularity instead. ``--iters``/``--warmup``
are counts of timed and untimed runs (on CUDA timed with CUDA events, L2 flushed before each run).
Each dense baseline is timed once and used both for its own row and for the "% dense" column.

    python -m dynamoe.evals.bench_kernels [--shapes mixtral,fine_grained,deepseek] [--small]
                                  [--routing balanced|skewed] [--dtype bf16] [--iters 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dynamoe import kernels
from dynamoe.evals.report import hardware_info, write_json
from dynamoe.kernels.grouped_gemm import grouped_mm_pytorch, grouped_mm_ref, torch_grouped_mm_applies

SHAPES = {  # T tokens, d model width, f expert hidden width, E experts, k experts per token
    "mixtral": {"T": 8192, "d": 4096, "f": 14336, "E": 8, "k": 2},
    "fine_grained": {"T": 32768, "d": 4096, "f": 1024, "E": 64, "k": 4},
    "deepseek": {"T": 16384, "d": 2048, "f": 1408, "E": 64, "k": 6},
}
FORMULAS = {
    "route": "bytes = T*E*s(logits) + T*k*(4 + 8) + E*8  (read logits; write fp32 weights, int64 experts, counts)",
    "permute": "bytes = 2*N*d*s  (read each kept token row, write it; the plan's index traffic not counted)",
    "unpermute": "bytes = N*d*s + T*d*s + T*k*(4 + 8)  (read rows, write tokens, read weights and row_map)",
    "grouped_mm fwd": "FLOPs = 2*N*d*f  (X_sorted [N,d] @ W1 [E,d,f])",
    "grouped_mm fwd+bwd": "FLOPs = 3 * 2*N*d*f  (forward, input gradient, weight gradient)",
    "expert MLP fwd": "FLOPs = 2 * 2*N*d*f  (GEMM d->f, GEMM f->d; GELU, dispatch, combine not counted)",
    "expert MLP fwd+bwd": "FLOPs = 3 * 2 * 2*N*d*f",
    "MoE layer fwd+bwd": "FLOPs = 3 * (2 * 2*N*d*f + 2*T*d*E)  (experts and router gate)",
}
NOT_CUDA = "not run: Triton kernels need a CUDA device (the CPU interpreter checks correctness, not speed)"


def shape_of(name: str, small: bool) -> dict:
    s = dict(SHAPES[name])
    if small:  # a CPU-sized version with the same E and k (routing structure), smaller everything else
        s.update(T=max(64, s["T"] // 64), d=s["d"] // 16, f=s["f"] // 16)
    return s


_L2_FLUSH: dict = {}


def time_ms(fn, device: torch.device, iters: int, warmup: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds over ``iters`` timed runs after ``warmup`` untimed ones (both
    counts). On CUDA each run is timed with CUDA events and the L2 cache is flushed before it (as
    triton's do_bench does); on CPU, wall clock."""
    iters, warmup = max(1, int(iters)), max(0, int(warmup))
    times = []
    if device.type == "cuda":
        flush = _L2_FLUSH.setdefault(device, torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device))
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(warmup + iters):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def make_routing(s: dict, device, balanced: bool, seed: int):
    """(logits [T,E], experts [T,k], weights [T,k], counts [E]). Unbalanced: per-expert popularity
    drawn log-normally, as trained routers are; balanced: token t takes experts t, t+1, ... (mod E)."""
    g = torch.Generator().manual_seed(seed)
    T, E, k = s["T"], s["E"], s["k"]
    logits = torch.randn(T, E, generator=g) + (0 if balanced else torch.randn(E, generator=g))
    logits = logits.to(device)
    if balanced:
        experts = ((torch.arange(T).unsqueeze(1) + torch.arange(k)) % E).to(device)
        weights = torch.softmax(logits, -1).gather(1, experts)
        counts = torch.bincount(experts.reshape(-1), minlength=E)
    else:
        weights, experts, counts = kernels.topk_route_ref(logits, k)
    return logits, experts, weights.contiguous(), counts


def torch_loop(x, w, counts_list):
    return torch.cat([xe @ w[e] for e, xe in enumerate(torch.split(x, counts_list))])


def _row(shape, op, provider, fn, device, args, flops=None, nbytes=None, dense_ms=None, note="", timing=None):
    """One table row; ``timing`` (median, p20, p80) when already measured (the dense baselines)."""
    row = {"shape": shape, "op": op, "provider": provider, "note": note}
    if fn is None and timing is None:
        return {**row, "median_ms": None}
    try:
        med, lo, hi = timing if timing is not None else time_ms(fn, device, args.iters, args.warmup)
    except Exception as err:  # noqa: BLE001 - a peer that fails on this machine is reported, not fatal
        return {**row, "median_ms": None, "note": f"not run: {type(err).__name__}: {str(err)[:120]}"}
    row.update(median_ms=med, p20_ms=lo, p80_ms=hi)
    if flops is not None:
        row["tflops"] = flops / (med * 1e-3) / 1e12
    if nbytes is not None:
        row["gb_per_s"] = nbytes / (med * 1e-3) / 1e9
    if dense_ms is not None and flops is not None:
        row["pct_of_dense"] = 100.0 * dense_ms / med
    return row


def bench_ops(name: str, s: dict, args, device, dtype) -> list[dict]:
    T, d, f, E, k = s["T"], s["d"], s["f"], s["E"], s["k"]
    N = T * k
    elt = torch.finfo(dtype).bits // 8
    torch.manual_seed(args.seed)
    logits, experts, weights, counts = make_routing(s, device, args.routing == "balanced", args.seed)
    counts_list = counts.tolist()
    offsets = kernels.offsets_from_counts(counts)
    x = torch.randn(T, d, device=device, dtype=dtype)
    w1 = (torch.randn(E, d, f, device=device) / d**0.5).to(dtype)
    w2 = (torch.randn(E, f, d, device=device) / f**0.5).to(dtype)
    x_sorted, row_map = kernels.permute_ref(x, experts, E, N)
    y_sorted = torch.randn(N, d, device=device, dtype=dtype)
    wd = w1[0].contiguous()
    rows = []

    def add(op, provider, fn, **kw):
        rows.append(_row(name, op, provider, fn, device, args, **kw))

    triton = kernels.backend_for(x, "grouped_mm") == "triton"
    from dynamoe.kernels.backend import registered_implementation

    def impl(op):
        return registered_implementation(op, "triton") if triton else None

    # Routing and dispatch: memory-bound, so GB/s.
    b_route = T * E * logits.element_size() + T * k * 12 + E * 8
    add(
        "route",
        "triton",
        (lambda: impl("topk_route")(logits, k)) if triton else None,
        nbytes=b_route,
        note="" if triton else NOT_CUDA,
    )
    add("route", "reference", lambda: kernels.topk_route_ref(logits, k), nbytes=b_route)
    b_perm = 2 * N * d * elt
    add(
        "permute",
        "triton",
        (lambda: impl("permute")(x, experts, E, N)) if triton else None,
        nbytes=b_perm,
        note="" if triton else NOT_CUDA,
    )
    add("permute", "reference", lambda: kernels.permute_ref(x, experts, E, N), nbytes=b_perm)
    b_unperm = N * d * elt + T * d * elt + T * k * 12
    add(
        "unpermute",
        "triton",
        (lambda: impl("unpermute")(y_sorted, row_map, weights)) if triton else None,
        nbytes=b_unperm,
        note="" if triton else NOT_CUDA,
    )
    add("unpermute", "reference", lambda: kernels.unpermute_ref(y_sorted, row_map, weights), nbytes=b_unperm)

    # Grouped GEMM, forward and forward+backward, against a dense GEMM of the same FLOPs.
    fl = 2 * N * d * f
    t_dense = time_ms(lambda: x_sorted @ wd, device, args.iters, args.warmup)
    dense_fwd = t_dense[0]
    add("grouped_mm fwd", "dense", None, flops=fl, dense_ms=dense_fwd, note="one [N,d]x[d,f] mm", timing=t_dense)
    off_dev = offsets.to(device)
    tg = torch_grouped_mm_applies(x_sorted, w1)
    gmm_fwd = {
        "triton": (lambda: impl("grouped_mm")(x_sorted, w1, off_dev)) if triton else None,
        "reference": lambda: grouped_mm_pytorch(x_sorted, w1, offsets),
        "torch loop": lambda: torch_loop(x_sorted, w1, counts_list),
        "torch._grouped_mm": (lambda: torch._grouped_mm(x_sorted, w1, offs=off_dev)) if tg else None,
    }
    notes = {
        "triton": "" if triton else NOT_CUDA,
        "torch._grouped_mm": "" if tg else "not run: not supported for this dtype/device/alignment",
    }
    for provider, fn in gmm_fwd.items():
        add("grouped_mm fwd", provider, fn, flops=fl, dense_ms=dense_fwd, note=notes.get(provider, ""))

    xg = x_sorted.detach().requires_grad_()
    w1g = w1.detach().requires_grad_()
    wdg = wd.detach().requires_grad_()
    gy = torch.randn(N, f, device=device, dtype=dtype)

    def fwd_bwd(fn, inputs):
        return lambda: torch.autograd.grad(fn(), inputs, gy)

    t_dense = time_ms(fwd_bwd(lambda: xg @ wdg, (xg, wdg)), device, args.iters, args.warmup)
    dense_fb = t_dense[0]
    add("grouped_mm fwd+bwd", "dense", None, flops=3 * fl, dense_ms=dense_fb, timing=t_dense)
    gmm_fb = {
        "triton": fwd_bwd(lambda: impl("grouped_mm")(xg, w1g, off_dev), (xg, w1g)) if triton else None,
        "reference": fwd_bwd(lambda: grouped_mm_pytorch(xg, w1g, offsets), (xg, w1g)),
        "torch loop": fwd_bwd(lambda: grouped_mm_ref(xg, w1g, offsets), (xg, w1g)),
    }
    for provider, fn in gmm_fb.items():
        add("grouped_mm fwd+bwd", provider, fn, flops=3 * fl, dense_ms=dense_fb, note=notes.get(provider, ""))

    # The expert MLP as the layer runs it: dispatch -> GEMM -> GELU -> GEMM -> combine (routing given).
    mlp_fl = 2 * fl
    w2d = w2[0].contiguous()
    t_dense = time_ms(lambda: F.gelu(x_sorted @ wd) @ w2d, device, args.iters, args.warmup)
    dense_mlp = t_dense[0]
    add(
        "expert MLP fwd",
        "dense",
        None,
        flops=mlp_fl,
        dense_ms=dense_mlp,
        note="two dense mm, no dispatch",
        timing=t_dense,
    )
    mlp_args = (experts, weights, counts, w1, w2)
    add(
        "expert MLP fwd",
        "triton (fused)",
        (lambda: impl("moe_mlp")(x, *mlp_args, num_rows=N)) if triton else None,
        flops=mlp_fl,
        dense_ms=dense_mlp,
        note="" if triton else NOT_CUDA,
    )
    add(
        "expert MLP fwd",
        "reference",
        lambda: kernels.moe_mlp_ref(x, *mlp_args, num_rows=N),
        flops=mlp_fl,
        dense_ms=dense_mlp,
    )
    scatter, scatter_note = _scattermoe(s, device, dtype, w1, w2)
    add(
        "expert MLP fwd",
        "scattermoe",
        (lambda: scatter(x, weights, experts)) if scatter else None,
        flops=mlp_fl,
        dense_ms=dense_mlp,
        note=scatter_note,
    )
    xm, w1m, w2m = (t.detach().requires_grad_() for t in (x, w1, w2))
    gm = torch.randn(T, d, device=device, dtype=dtype)
    mlp_inputs = (xm, w1m, w2m)

    def mlp_fb(fn):
        return lambda: torch.autograd.grad(fn(xm, experts, weights, counts, w1m, w2m, num_rows=N), mlp_inputs, gm)

    xd, wdm, w2dm = (t.detach().requires_grad_() for t in (x_sorted, wd, w2d))
    gd = torch.randn(N, d, device=device, dtype=dtype)
    t_dense = time_ms(
        lambda: torch.autograd.grad(F.gelu(xd @ wdm) @ w2dm, (xd, wdm, w2dm), gd), device, args.iters, args.warmup
    )
    dense_mlp_fb = t_dense[0]
    add(
        "expert MLP fwd+bwd",
        "dense",
        None,
        flops=3 * mlp_fl,
        dense_ms=dense_mlp_fb,
        note="two dense mm, no dispatch",
        timing=t_dense,
    )

    add(
        "expert MLP fwd+bwd",
        "triton (fused)",
        mlp_fb(impl("moe_mlp")) if triton else None,
        flops=3 * mlp_fl,
        dense_ms=dense_mlp_fb,
        note="" if triton else NOT_CUDA,
    )
    add("expert MLP fwd+bwd", "reference", mlp_fb(kernels.moe_mlp_ref), flops=3 * mlp_fl, dense_ms=dense_mlp_fb)
    if scatter:
        sparams = [p for p in scatter.parameters() if p.requires_grad]
        add(
            "expert MLP fwd+bwd",
            "scattermoe",
            lambda: torch.autograd.grad(scatter(xm, weights, experts), [xm, *sparams], gm),
            flops=3 * mlp_fl,
            dense_ms=dense_mlp_fb,
            note=scatter_note,
        )
    else:
        add("expert MLP fwd+bwd", "scattermoe", None, note=scatter_note)
    return rows


def _scattermoe(s: dict, device, dtype, w1, w2):
    """(ScatterMoE's expert MLP holding our weights, note) or (None, why not)."""
    if device.type != "cuda":
        return None, "not run: ScatterMoE's kernels need CUDA"
    try:
        from scattermoe.mlp import MLP
    except ImportError:
        return None, "not run: scattermoe is not installed (pip install scattermoe)"
    try:
        mlp = MLP(
            input_size=s["d"], hidden_size=s["f"], num_experts=s["E"], top_k=s["k"], activation=torch.nn.GELU()
        ).to(device, dtype)
        with torch.no_grad():  # ParallelExperts keeps [E, out, in]
            mlp.experts.weight.copy_(w1.transpose(1, 2))
            mlp.output_experts.weight.copy_(w2.transpose(1, 2))
        return mlp, "ScatterMoE MLP (scatter2scatter kernels), same weights and routing"
    except Exception as err:  # noqa: BLE001 - a version whose API differs becomes the row's note
        return None, f"not run: {type(err).__name__}: {str(err)[:120]}"


def bench_layers(name: str, s: dict, args, device, dtype) -> list[dict]:
    """Whole MoE layers, forward + backward: dynamoe (its backend for this device), DeepSpeed, Megatron-Core."""
    from dynamoe.config import MoEConfig, RouterConfig
    from dynamoe.evals.bench_moe_layer import build_deepspeed, make_input
    from dynamoe.layers.moe_layer import MoELayer

    T, d, f, E, k = s["T"], s["d"], s["f"], s["E"], s["k"]
    flops = 3 * (2 * 2 * T * k * d * f + 2 * T * d * E)
    torch.manual_seed(args.seed)
    ours = MoELayer(MoEConfig(num_experts=E, d_expert=f, activation="gelu", router=RouterConfig(top_k=k)), d_model=d)
    if args.routing == "balanced":  # orthonormal gate rows so make_input can fix every router's choices exactly
        with torch.no_grad():
            ours.router.gate.weight.copy_(torch.linalg.qr(torch.randn(d, E))[0].t())
    ns = SimpleNamespace(tokens=T, experts=E, top_k=k, d_model=d, d_ff=f)
    x = make_input(ns, ours.router.gate.weight.detach(), args.routing == "balanced").to(device, dtype)
    gy = torch.randn(T, d, device=device, dtype=dtype)
    rows = []

    def step_of(layer, unpack):
        xx = x.detach().requires_grad_()
        params = [p for p in layer.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(unpack(layer(xx)), [xx, *params], gy, allow_unused=True)

    backend = kernels.backend_for(x, "moe_mlp")
    ours = ours.to(device, dtype)
    rows.append(
        _row(
            name,
            "MoE layer fwd+bwd",
            f"dynamoe ({backend})",
            step_of(ours, lambda out: out[0]),
            device,
            args,
            flops=flops,
        )
    )
    try:
        from dynamoe.training.deepspeed_setup import init_distributed

        deepspeed = init_distributed("auto")
        ds = build_deepspeed(deepspeed, ours, ns, None).to(device, dtype)  # copies our weights in
        rows.append(
            _row(
                name,
                "MoE layer fwd+bwd",
                "deepspeed MoE",
                step_of(ds, lambda out: out[0]),
                device,
                args,
                flops=flops,
                note="dropless (drop_tokens=False), same weights",
            )
        )
    except Exception as err:  # noqa: BLE001 - DeepSpeed's failure on this machine becomes the row's note
        rows.append(
            {
                "shape": name,
                "op": "MoE layer fwd+bwd",
                "provider": "deepspeed MoE",
                "median_ms": None,
                "note": f"not run: {type(err).__name__}: {str(err)[:120]}",
            }
        )
    rows.append(_megatron_row(name, s, args, device, dtype, x, gy, flops))
    rows.append(_megablocks_row(name, s, args, device, dtype, x, gy, flops))
    return rows


def _megablocks_row(name, s, args, device, dtype, x, gy, flops) -> dict:
    base = {"shape": name, "op": "MoE layer fwd+bwd", "provider": "megablocks dMoE", "median_ms": None}
    if device.type != "cuda":
        return {**base, "note": "not run: MegaBlocks' kernels need CUDA"}
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError:
        return {**base, "note": "not run: megablocks is not installed (pip install megablocks)"}
    try:
        margs = Arguments(
            hidden_size=s["d"],
            ffn_hidden_size=s["f"],
            moe_num_experts=s["E"],
            moe_top_k=s["k"],
            mlp_impl="grouped",
            mlp_type="mlp",
            activation_fn=F.gelu,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            init_device=device,
        )
        layer = dMoE(margs).to(device, dtype)
        xx = x.detach().unsqueeze(1).requires_grad_()  # [S, B, d]
        params = [p for p in layer.parameters() if p.requires_grad]

        def step():
            out = layer(xx)
            out = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(out, [xx, *params], gy.unsqueeze(1), allow_unused=True)

        return _row(name, base["op"], base["provider"], step, device, args, flops=flops, note="grouped GEMM, dropless")
    except Exception as err:  # noqa: BLE001 - MegaBlocks' failure on this machine becomes the row's note
        return {**base, "note": f"not run: {type(err).__name__}: {str(err)[:120]}"}


def _megatron_row(name, s, args, device, dtype, x, gy, flops) -> dict:
    base = {"shape": name, "op": "MoE layer fwd+bwd", "provider": "megatron-core MoELayer", "median_ms": None}
    if device.type != "cuda":
        return {**base, "note": "not run: Megatron-Core's router calls torch.cuda.current_device() (needs CUDA)"}
    try:
        from megatron.core import parallel_state
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.moe.moe_layer import MoELayer as MCoreMoE
        from megatron.core.transformer.transformer_config import TransformerConfig

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
        cfg = TransformerConfig(
            num_layers=1,
            hidden_size=s["d"],
            num_attention_heads=1,
            ffn_hidden_size=s["f"],
            moe_ffn_hidden_size=s["f"],
            num_moe_experts=s["E"],
            moe_router_topk=s["k"],
            add_bias_linear=False,
            gated_linear_unit=False,
            activation_func=F.gelu,
            moe_token_dispatcher_type="alltoall",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=True,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
        )
        spec = get_gpt_layer_local_spec(num_experts=s["E"], moe_grouped_gemm=True)
        layer = MCoreMoE(cfg, submodules=spec.submodules.mlp.submodules).to(device)
        xx = x.detach().unsqueeze(1).requires_grad_()  # Megatron's [S, B, d]
        params = [p for p in layer.parameters() if p.requires_grad]

        def step():
            return torch.autograd.grad(layer(xx)[0], [xx, *params], gy.unsqueeze(1), allow_unused=True)

        return _row(
            name,
            "MoE layer fwd+bwd",
            base["provider"],
            step,
            device,
            args,
            flops=flops,
            note=f"{type(layer.experts).__name__} experts (grouped GEMM), alltoall dispatcher, its own routing",
        )
    except Exception as err:  # noqa: BLE001 - Megatron-Core's failure on this machine becomes the row's note
        return {**base, "note": f"not run: {type(err).__name__}: {str(err)[:120]}"}


def print_table(rows: list[dict]) -> None:
    header = ("shape", "op", "provider", "median ms", "TFLOP/s", "GB/s", "% dense", "note")
    lines = [header]
    for r in rows:
        ms = r.get("median_ms")
        lines.append(
            (
                r["shape"],
                r["op"],
                r["provider"],
                f"{ms:.3f}" if ms is not None else "-",
                f"{r['tflops']:.3f}" if "tflops" in r else "",
                f"{r['gb_per_s']:.2f}" if "gb_per_s" in r else "",
                f"{r['pct_of_dense']:.0f}%" if "pct_of_dense" in r else "",
                r.get("note", ""),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [c.rjust(w) if 3 <= i <= 6 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells) + "  " + line[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time the MoE kernel ops and MoE layers against peers.")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    p.add_argument("--small", action="store_true", help="T/64, d/16, f/16 (same E, k): runs on a CPU in seconds")
    p.add_argument("--tokens", type=int, default=None, help="override T for every shape")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--routing",
        choices=["balanced", "skewed"],
        default="balanced",
        help="balanced (default): every expert gets exactly T*k/E rows, kernel speed apart from router "
        "quality; skewed: log-normal expert popularity, as trained routers have",
    )
    p.add_argument(
        "--balanced", dest="routing", action="store_const", const="balanced", help="same as --routing balanced"
    )
    p.add_argument("--skewed", dest="routing", action="store_const", const="skewed", help="same as --routing skewed")
    p.add_argument("--no-layers", action="store_true", help="skip the whole-layer rows (DeepSpeed, Megatron-Core)")
    p.add_argument("--iters", type=int, default=20, help="timed runs per row (a count)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before them (a count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="runs/bench/kernels.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    if device.type == "cuda":  # the dense baseline is cuBLAS at full precision: no TF32 shortcuts
        torch.backends.cuda.matmul.allow_tf32 = False
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"bench kernels: unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    hardware = {
        **hardware_info(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    rows, shapes = [], {}
    for name in names:
        s = shape_of(name, args.small)
        if args.tokens:
            s["T"] = args.tokens
        shapes[name] = s
        print(
            f"[{name}] T={s['T']} d={s['d']} f={s['f']} E={s['E']} k={s['k']} {str(dtype).removeprefix('torch.')} "
            f"routing={'balanced' if args.routing == 'balanced' else 'skewed (log-normal expert popularity)'}",
            flush=True,
        )
        rows += bench_ops(name, s, args, device, dtype)
        if not args.no_layers:
            rows += bench_layers(name, s, args, device, dtype)
    print(
        f"device: {hardware['device']} | CPU: {hardware['cpu_model'] or hardware['processor']} "
        f"({hardware['cpu_count']} cores, {hardware['torch_threads']} threads) | torch {hardware['torch']}"
    )
    print_table(rows)
    print("% dense = dense median / row median for a dense GEMM of the same FLOPs (100% = as fast as dense).")
    for op, formula in FORMULAS.items():
        print(f"  {op}: {formula}")
    result = {
        "benchmark": "moe_kernels",
        "config": {**vars(args), "dtype": str(dtype).removeprefix("torch."), "device": device.type, "shapes": shapes},
        "hardware": hardware,
        "formulas": FORMULAS,
        "rows": rows,
    }
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
