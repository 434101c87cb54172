"""Benchmark: dynamoe's MoELayer against DeepSpeed's MoE layer, forward + backward on CPU.

Both layers get the same router and expert weights (copied from ours into DeepSpeed's), the same
input and the same output gradient, so the timings differ only by implementation: routing,
dispatch, expert GEMMs, combine. DeepSpeed's expert Linears are built with bias=False so both do
the same FLOPs (ours are bias-free), and DeepSpeed's Gumbel sampling of the 2nd expert is turned
off so both routers make the same top-k choices.

    python -m dynamoe.evals.bench_moe_layer [--tokens 4096 --iters 10 --balanced --json PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import nn

from dynamoe.config import MoEConfig, RouterConfig
from dynamoe.evals.report import hardware_info, write_json
from dynamoe.layers.moe_layer import MoELayer
from dynamoe.training.cpu_runtime import keep_large_allocations
from dynamoe.training.deepspeed_setup import init_distributed

FLOP_NOTE = (
    "nominal FLOPs per fwd+bwd step, the same for every row (dropped assignments and DeepSpeed's "
    "capacity padding are not subtracted or added): experts 3 * (2*T*k*d*f*2) + router 3 * (2*T*d*E); "
    "activation, softmax, dispatch and combine are not counted"
)


def step_flops(T: int, d: int, f: int, E: int, k: int) -> dict:
    expert_fwd = 2 * T * k * d * f * 2  # two GEMMs (d->f, f->d) per kept assignment, 2 FLOPs per MAC
    router_fwd = 2 * T * d * E  # the gate GEMM
    # Backward = input grad + weight grad = 2x forward for each GEMM, so fwd+bwd = 3x forward.
    return {"expert_fwd": expert_fwd, "router_fwd": router_fwd, "total_fwd_bwd": 3 * (expert_fwd + router_fwd)}


def init_deepspeed():
    """DeepSpeed on CPU with a 1-process gloo group (its MoE layer needs torch.distributed)."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # this benchmark measures the CPU path even where a GPU exists
    return init_distributed("gloo")


def build_deepspeed(deepspeed, ours: MoELayer, args, capacity_factor: float | None) -> nn.Module:
    from deepspeed.moe.layer import MoE

    d, f, E = args.d_model, args.d_ff, args.experts
    expert = nn.Sequential(nn.Linear(d, f, bias=False), nn.GELU(), nn.Linear(f, d, bias=False))
    layer = MoE(
        hidden_size=d,
        expert=expert,
        num_experts=E,
        ep_size=1,
        k=args.top_k,
        capacity_factor=capacity_factor or 1.0,
        drop_tokens=capacity_factor is not None,
        top2_2nd_expert_sampling=False,
    )
    layer.set_deepspeed_parallelism()  # normally done by deepspeed.initialize; makes the ep group
    with torch.no_grad():  # same weights as ours: same routing, same numbers
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        for e, mlp in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            mlp[0].weight.copy_(ours.experts.w1_EDF[e].t())
            mlp[2].weight.copy_(ours.experts.w2_EFD[e].t())
    return layer


def make_input(args, gate_weight_ED: torch.Tensor, balanced: bool) -> torch.Tensor:
    """x [T, d] ~ N(0, 1); with ``balanced``, crafted so token t's top-k experts are t, t+1, ... (mod E).

    Balanced routing is made through the input, not by patching either layer: with orthonormal gate
    rows w_e, removing their span from x and adding (k - j) * w_{(t+j) % E} gives logits exactly
    k, k-1, ..., 1 on those experts and 0 elsewhere, so both real routers pick the same experts.
    """
    T, E, k = args.tokens, args.experts, args.top_k
    x = torch.randn(T, args.d_model)
    if not balanced:
        return x
    w = gate_weight_ED
    x = x - (x @ w.t()) @ w
    picks_Tk = (torch.arange(T).unsqueeze(1) + torch.arange(k)) % E
    coef_k = torch.arange(k, 0, -1, dtype=x.dtype)
    return x + (coef_k.unsqueeze(-1) * w[picks_Tk]).sum(dim=1)


def time_steps(step, params, iters: int, warmup: int) -> list[float]:
    """Milliseconds per forward + backward; grads are cleared outside the timed region."""
    times = []
    for i in range(warmup + iters):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed * 1e3)
    return times


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time dynamoe MoELayer vs DeepSpeed MoE (fwd+bwd, CPU).")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024, help="expert hidden width f")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25, help="for the capacity rows")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="craft inputs so every expert gets exactly T*k/E tokens")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's mmap threshold alone (default: raise it for both layers, as `moe train` does)",
    )
    p.add_argument("--json", default="runs/bench/moe_layer_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    malloc_tuned = False if args.default_malloc else keep_large_allocations()
    deepspeed = init_deepspeed()
    torch.set_num_threads(args.threads)  # after DeepSpeed's import, which may change the thread count
    torch.manual_seed(args.seed)
    T, d, f, E, k, cf = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k, args.capacity_factor

    def ours_layer(capacity_factor):
        torch.manual_seed(args.seed)  # both dynamoe rows get identical weights
        router = RouterConfig(top_k=k, capacity_factor=capacity_factor)
        layer = MoELayer(MoEConfig(num_experts=E, d_expert=f, activation="gelu", router=router), d_model=d)
        if args.balanced:  # orthonormal gate rows, so make_input can fix the logits exactly
            with torch.no_grad():
                layer.router.gate.weight.copy_(torch.linalg.qr(torch.randn(d, E))[0].t())
        return layer.train()

    reference = ours_layer(None)
    torch.manual_seed(args.seed + 1)
    x_data = make_input(args, reference.router.gate.weight.detach(), args.balanced)
    grad_y = torch.randn(T, d)  # fixed output gradient: backward cost without a loss reduction

    configs = [  # (name, implementation, capacity factor or None for dropless)
        ("dynamoe dropless", "dynamoe", None),
        ("deepspeed dropless", "deepspeed", None),
        (f"deepspeed capacity {cf:g}", "deepspeed", cf),
        (f"dynamoe capacity {cf:g}", "dynamoe", cf),
    ]
    flops = step_flops(T, d, f, E, k)
    rows = []
    for name, impl, capacity_factor in configs:
        layer = (
            ours_layer(capacity_factor)
            if impl == "dynamoe"
            else build_deepspeed(deepspeed, reference, args, capacity_factor)
        )
        layer.train()
        x = x_data.clone().requires_grad_(True)  # input grad is computed, as inside a real model
        dropped = []

        def step():
            if impl == "dynamoe":
                y, aux = layer(x)
                aux_loss, n_drop = aux.loss, aux.dropped
            else:
                y, aux_loss, exp_counts = layer(x)
                n_drop = torch.zeros(())
                if capacity_factor is not None:  # each expert keeps min(count, C) assignments
                    capacity = max(math.ceil(T / E * capacity_factor * k), layer.deepspeed_moe.gate.min_capacity)
                    n_drop = (exp_counts - capacity).clamp_min(0).sum()
            torch.autograd.backward((y, aux_loss), (grad_y, torch.ones_like(aux_loss)))
            dropped.append(int(n_drop))

        times = time_steps(step, [x, *layer.parameters()], args.iters, args.warmup)
        median = statistics.median(times)
        deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [median] * 9
        rows.append(
            {
                "name": name,
                "impl": impl,
                "capacity_factor": capacity_factor,
                "median_ms": median,
                "p10_ms": deciles[0],
                "p90_ms": deciles[-1],
                "times_ms": times,
                "tokens_per_s": T / (median / 1e3),
                "gflops_per_s": flops["total_fwd_bwd"] / (median / 1e3) / 1e9,
                "dropped_fraction": dropped[-1] / (T * k) if capacity_factor is not None else 0.0,
            }
        )

    by_name = {r["name"]: r for r in rows}
    ds_dropless = by_name["deepspeed dropless"]["median_ms"]
    for r in rows:
        r["speedup_vs_deepspeed_dropless"] = ds_dropless / r["median_ms"]
    ours_ms = by_name["dynamoe dropless"]["median_ms"]
    vs_dropless = ds_dropless / ours_ms
    vs_capacity = by_name[f"deepspeed capacity {cf:g}"]["median_ms"] / ours_ms

    hardware = {**hardware_info(), "torch_threads": torch.get_num_threads()}
    routing = "balanced (crafted inputs)" if args.balanced else "learned router on N(0,1) inputs"
    print(
        f"MoE layer fwd+bwd, CPU: T={T} d={d} f={f} E={E} k={k}, {args.iters} iters after {args.warmup} warm-up, "
        f"threads={hardware['torch_threads']}, routing: {routing}"
    )
    print(
        f"CPU: {hardware['cpu_model'] or hardware['processor']} ({hardware['cpu_count']} cores), "
        f"torch {hardware['torch']}, "
        f"deepspeed {deepspeed.__version__}"
    )
    header = ("config", "median ms", "p10 ms", "p90 ms", "tokens/s", "GFLOP/s", "dropped", "ratio vs DS dropless")
    table = [header] + [
        (
            r["name"],
            f"{r['median_ms']:.1f}",
            f"{r['p10_ms']:.1f}",
            f"{r['p90_ms']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['gflops_per_s']:.1f}",
            f"{100 * r['dropped_fraction']:.2f}%" if r["capacity_factor"] else "-",
            f"{r['speedup_vs_deepspeed_dropless']:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print(f"ratio = DeepSpeed dropless median / row median (>1 is faster). GFLOP/s: {FLOP_NOTE}.")
    print(
        "DeepSpeed experts: nn.Linear(bias=False) so FLOPs match ours (bias-free); same weights copied in; "
        "top2_2nd_expert_sampling=False. dropped = fraction of the T*k assignments over capacity "
        "(DeepSpeed: sum(max(0, exp_counts - C)), C = ceil(T/E * cf * k))."
    )
    print(
        "glibc mmap threshold raised for both layers (dynamoe.training.cpu_runtime)"
        if malloc_tuned
        else "glibc allocator left at its defaults (--default-malloc)"
    )
    print(
        f"dynamoe dropless is {vs_dropless:.2f}x faster than DeepSpeed dropless "
        f"and {vs_capacity:.2f}x vs DeepSpeed capacity {cf:g} (ratios of medians; below 1 means slower)"
    )

    result = {
        "benchmark": "moe_layer_fwd_bwd_cpu",
        "config": {
            "tokens": T,
            "d_model": d,
            "d_ff": f,
            "experts": E,
            "top_k": k,
            "capacity_factor": cf,
            "iters": args.iters,
            "warmup": args.warmup,
            "threads": args.threads,
            "seed": args.seed,
            "balanced": args.balanced,
            "activation": "gelu",
            "dtype": "float32",
            "malloc_tuned": malloc_tuned,
        },
        "hardware": {**hardware, "deepspeed": deepspeed.__version__},
        "flops": {**flops, "note": FLOP_NOTE},
        "rows": rows,
        "summary": {
            "dynamoe_dropless_vs_deepspeed_dropless": vs_dropless,
            "dynamoe_dropless_vs_deepspeed_capacity": vs_capacity,
        },
    }
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
