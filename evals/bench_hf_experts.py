"""Benchmark: a transformers MoE model's training step with its experts run by ``eager``,
``grouped_mm`` and ``dynamoe`` (``dynamoe.interop.hf_experts``), on CPU.

One step = forward, loss, backward and an AdamW step of the same Mixtral-style model
(``MixtralForCausalLM``, random weights, identical in every row) on the same random batch. Rows are
timed in interleaved rounds (one step of each implementation per round, the order rotated each
round), so drift in a shared machine's load reaches every row alike; the median over the timed
rounds is reported. The first step's loss of each row is printed as a check that they compute the
same model.

    python -m dynamoe.evals.bench_hf_experts [--large] [--steps 20 --warmup 3 --dtype fp32 --json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dynamoe.evals.report import hardware_info, write_json
from dynamoe.training.cpu_runtime import keep_large_allocations

IMPLEMENTATIONS = ("eager", "grouped_mm", "dynamoe")
# (hidden, layers, experts, top_k, expert width, vocab, heads, kv heads, batch, sequence)
SIZES = {
    "small": dict(hidden=128, layers=4, experts=8, top_k=2, ffn=192, vocab=1024, heads=8, kv_heads=4, batch=4, seq=128),
    "large": dict(hidden=512, layers=8, experts=8, top_k=2, ffn=832, vocab=8192, heads=8, kv_heads=4, batch=4, seq=256),
}


def build_config(size: dict, implementation: str):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        num_local_experts=size["experts"],
        num_experts_per_tok=size["top_k"],
        max_position_embeddings=size["seq"],
        experts_implementation=implementation,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one training step (fwd, bwd, AdamW) of a transformers Mixtral-style model per "
        "experts implementation (eager, grouped_mm, dynamoe) on CPU."
    )
    p.add_argument("--large", action="store_true", help="~100M parameters instead of ~3M (minutes per step on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per implementation (20; --large: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per implementation first (3; --large: 1)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model and activation dtype")
    p.add_argument(
        "--implementations", default=",".join(IMPLEMENTATIONS), help="comma-separated experts implementations"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's mmap threshold alone (default: raise it, as `moe train` does on CPU)",
    )
    p.add_argument("--json", default="runs/bench/hf_experts_cpu.json", help="where to write the results ('' for none)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.large else 20
    if args.warmup is None:
        args.warmup = 1 if args.large else 3
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0; got {args.steps} and {args.warmup}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    malloc_tuned = False if args.default_malloc else keep_large_allocations()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    import dynamoe.interop.hf_experts  # noqa: F401  (registers the "dynamoe" experts implementation)

    names = [n.strip() for n in args.implementations.split(",") if n.strip()]
    if not names:
        raise SystemExit("--implementations: name at least one experts implementation, e.g. eager,dynamoe")
    size = SIZES["large" if args.large else "small"]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    torch.manual_seed(args.seed)
    reference = AutoModelForCausalLM.from_config(build_config(size, names[0]), dtype=dtype)
    state = reference.state_dict()
    n_params = sum(p.numel() for p in reference.parameters())
    n_expert_params = sum(p.numel() for n, p in reference.named_parameters() if ".experts." in n)
    del reference
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=generator)

    runs = {}
    for name in names:
        model = AutoModelForCausalLM.from_config(build_config(size, name), dtype=dtype).train()
        model.load_state_dict(state)  # every row trains the same weights on the same batch
        if model.config._experts_implementation != name:  # transformers may fall back silently
            raise SystemExit(
                f"asked for experts_implementation={name!r}, the model runs {model.config._experts_implementation!r}"
            )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs[name] = {"model": model, "opt": opt, "times_ms": [], "losses": []}

    def step(run) -> None:
        start = time.perf_counter()
        loss = run["model"](input_ids=ids, labels=ids).loss
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        run["times_ms"].append((time.perf_counter() - start) * 1e3)
        run["losses"].append(loss.item())

    for r in range(args.warmup + args.steps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            step(runs[name])

    tokens = size["batch"] * size["seq"]
    rows = []
    for name in names:
        times = runs[name]["times_ms"][args.warmup :]
        median = statistics.median(times)
        rows.append(
            {
                "implementation": name,
                "median_ms": median,
                "min_ms": min(times),
                "max_ms": max(times),
                "times_ms": times,
                "tokens_per_s": tokens / (median / 1e3),
                "first_loss": runs[name]["losses"][0],
                "last_loss": runs[name]["losses"][-1],
            }
        )
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_first"] = base / row["median_ms"]

    hardware = {**hardware_info(), "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__}
    print(
        f"MixtralForCausalLM training step (fwd + bwd + AdamW), CPU, {args.dtype}: {n_params / 1e6:.2f}M parameters "
        f"({n_expert_params / 1e6:.2f}M in experts), hidden={size['hidden']} layers={size['layers']} "
        f"E={size['experts']} k={size['top_k']} ffn={size['ffn']} vocab={size['vocab']}, "
        f"batch {size['batch']}x{size['seq']} tokens"
    )
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up per implementation, interleaved rounds; "
        f"CPU: {hardware['cpu_model'] or hardware['processor']} ({hardware['cpu_count']} cores, "
        f"{hardware['torch_threads']} threads), torch {hardware['torch']}, transformers {transformers.__version__}"
    )
    header = ("experts implementation", "median ms", "min ms", "max ms", "tokens/s", f"vs {names[0]}", "first loss")
    table = [header] + [
        (
            r["implementation"],
            f"{r['median_ms']:.1f}",
            f"{r['min_ms']:.1f}",
            f"{r['max_ms']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['speedup_vs_first']:.2f}x",
            f"{r['first_loss']:.6f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print(f"vs {names[0]} = its median / the row's median (>1 is faster)")
    if not malloc_tuned:
        print("glibc allocator left at its defaults")

    result = {
        "benchmark": "hf_experts_train_step_cpu",
        "config": {
            **size,
            "large": args.large,
            "dtype": args.dtype,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "parameters": n_params,
            "expert_parameters": n_expert_params,
            "malloc_tuned": malloc_tuned,
        },
        "hardware": hardware,
        "rows": rows,
    }
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
