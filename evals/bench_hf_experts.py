"""Benchmark: one training step of the same MoE language model in transformers, with its experts
run by ``eager``, ``grouped_mm`` and ``dynamoe`` (``dynamoe.interop.hf_experts``), and in dynamoe's
own decoder (``dynamoe-model``).

One step = forward, loss, backward and an AdamW step (``torch.optim.AdamW``, lr 1e-3, on every row)
of a Mixtral-style model (``MixtralForCausalLM``, random weights) on one random batch. The
transformers rows load the same weights; the ``dynamoe-model`` row is that model written by
``save_pretrained`` and read back by ``dynamoe.interop.hf_models.import_model`` (dynamoe's modern
decoder, identical weights), and its logits are checked against transformers' (within 1e-5, fp32,
eval mode) before anything is timed.

The loss is the same on every row: next-token cross-entropy plus the router load-balancing loss
times Mixtral's ``router_aux_loss_coef`` (transformers: ``output_router_logits=True``; dynamoe: the
imported router's ``aux_loss_coef``, checked equal to it, and ``total_loss``). The two balancing
losses are the Switch loss written differently (transformers pools the counts and probabilities
of all layers and counts top-k slots per token; dynamoe sums a loss per layer, each normalised by
T*k), so their values differ while their cost is alike; ``--no-aux`` leaves them out on every row.
The first step's cross-entropy, equal on every row, is printed as a check that they compute the
same model.

Rows are timed in interleaved rounds (one step of each row per round, the order rotated each
round), so drift in a shared machine's load reaches every row alike; the median over the timed
rounds is reported with its min and max.

    python -m dynamoe.evals.bench_hf_experts [--large] [--steps 20 --warmup 3 --dtype fp32 --json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from dynamoe.evals.report import hardware_info, write_json
from dynamoe.training.cpu_runtime import keep_large_allocations

IMPLEMENTATIONS = ("eager", "grouped_mm", "dynamoe")  # transformers' experts implementations
NATIVE = ("eager", "grouped_mm")  # transformers' own: the target is to be no slower than the faster of them
MODEL_ROW = "dynamoe-model"  # the same model in dynamoe's own decoder
ROWS = (*IMPLEMENTATIONS, MODEL_ROW)
LOGITS_ATOL = 1e-5  # imported model against transformers, fp32, before timing
LR = 1e-3
# (hidden, layers, experts, top_k, expert width, vocab, heads, kv heads, batch, sequence)
SIZES = {
    "tiny": dict(hidden=32, layers=2, experts=4, top_k=2, ffn=48, vocab=128, heads=4, kv_heads=2, batch=2, seq=16),
    "small": dict(hidden=128, layers=4, experts=8, top_k=2, ffn=192, vocab=1024, heads=8, kv_heads=4, batch=4, seq=128),
    "large": dict(hidden=512, layers=8, experts=8, top_k=2, ffn=832, vocab=8192, heads=8, kv_heads=4, batch=4, seq=256),
}
AUX_COEF = 0.001  # MixtralConfig's default router_aux_loss_coef


def build_config(size: dict, implementation: str, aux_coef: float = AUX_COEF):
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
        router_aux_loss_coef=aux_coef,
        experts_implementation=implementation,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one training step (fwd, bwd, AdamW) of the same Mixtral-style model in transformers "
        "per experts implementation (eager, grouped_mm, dynamoe) and in dynamoe's own decoder (dynamoe-model)."
    )
    p.add_argument("--large", action="store_true", help="~100M parameters instead of ~3M (seconds per step on 2 cores)")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="small (default), large (= --large) or tiny")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (20; --large: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (3)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model and activation dtype")
    p.add_argument(
        "--no-aux",
        dest="aux",
        action="store_false",
        help="leave the router load-balancing loss out of every row's loss (default: in, Mixtral's coefficient)",
    )
    p.add_argument(
        "--implementations",
        default=",".join(ROWS),
        help=f"comma-separated rows: transformers experts implementations and/or {MODEL_ROW}",
    )
    p.add_argument("--device", default="cpu", help="cpu (measured) or cuda (not run yet)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's mmap threshold alone (default: raise it, as `moe train` does on CPU)",
    )
    p.add_argument("--json", default="runs/bench/hf_experts_cpu.json", help="where to write the results ('' for none)")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = "large" if args.large else "small"
    elif args.large and args.size != "large":
        p.error(f"--large contradicts --size {args.size}")
    if args.steps is None:
        args.steps = 5 if args.size == "large" else 20
    if args.warmup is None:
        args.warmup = 3
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0; got {args.steps} and {args.warmup}")
    return args


def import_into_dynamoe(reference):
    """``reference`` (a transformers Mixtral) as dynamoe's modern decoder with the same weights:
    ``save_pretrained`` to a temporary folder, then ``dynamoe.interop.hf_models.import_model``."""
    from dynamoe.interop.hf_models import import_model

    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        imported = import_model(folder)
    # import_model builds on the meta device and fills parameters and persistent buffers; the
    # non-persistent ones (the MoE layers' statistics, the router's load count) stay on meta, where
    # they cannot be moved or cast. A freshly built model has them at zero: give them that.
    for module in imported.model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    return imported


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """dynamoe's LM takes labels aligned with the logits; transformers shifts ``labels=ids`` itself."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


@torch.no_grad()
def check_same_model(reference, imported, ids: torch.Tensor) -> dict:
    """The imported model computes what ``reference`` does: the same balancing-loss coefficient and
    logits within LOGITS_ATOL (eval mode). Raises SystemExit otherwise; returns what was compared."""
    coef = float(reference.config.router_aux_loss_coef)
    routers = {
        float(layer.ffn.router.cfg.aux_loss_coef) for layer in imported.model.blocks if getattr(layer, "is_moe", False)
    }
    if routers != {coef}:
        raise SystemExit(
            f"the imported routers' aux_loss_coef {sorted(routers)} differs from Mixtral's router_aux_loss_coef {coef}"
        )
    was = reference.training, imported.model.training
    reference.eval()
    imported.model.eval()
    ours = imported.model(ids, labels=next_token_labels(ids))
    theirs = reference(input_ids=ids, labels=ids)
    reference.train(was[0])
    imported.model.train(was[1])
    diff = (ours.logits.float() - theirs.logits.float()).abs().max().item()
    if not diff <= LOGITS_ATOL:
        raise SystemExit(
            f"dynamoe's import of the model gives logits up to {diff:.3g} away from transformers' (allowed "
            f"{LOGITS_ATOL}); the rows would not time the same model"
        )
    return {
        "max_abs_logit_diff": diff,
        "lm_loss_dynamoe": ours.loss.item(),
        "lm_loss_transformers": theirs.loss.item(),
        "aux_loss_coef": coef,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    malloc_tuned = False if args.default_malloc or device.type != "cpu" else keep_large_allocations()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    import dynamoe.interop.hf_experts  # noqa: F401  (registers the "dynamoe" experts implementation)

    names = [n.strip() for n in args.implementations.split(",") if n.strip()]
    if not names:
        raise SystemExit(f"--implementations: name at least one row, e.g. grouped_mm,{MODEL_ROW}")
    size = SIZES[args.size]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    aux_coef = AUX_COEF if args.aux else 0.0

    # The reference in fp32 (the import and the logits check are fp32); every row starts from its weights.
    torch.manual_seed(args.seed)
    reference = AutoModelForCausalLM.from_config(build_config(size, "eager", aux_coef), dtype=torch.float32)
    state = reference.state_dict()
    n_params = sum(p.numel() for p in reference.parameters())
    n_expert_params = sum(p.numel() for n, p in reference.named_parameters() if ".experts." in n)
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=generator)
    labels = next_token_labels(ids)

    same_model = None
    runs = {}
    for name in names:
        if name == MODEL_ROW:
            imported = import_into_dynamoe(reference)
            same_model = check_same_model(reference, imported, ids)
            model = imported.model.to(device=device, dtype=dtype).train()
        else:
            model = AutoModelForCausalLM.from_config(build_config(size, name, aux_coef), dtype=dtype)
            model.load_state_dict(state)  # every row trains the same weights on the same batch
            model = model.to(device).train()
            if model.config._experts_implementation != name:  # transformers may fall back silently
                runs_impl = model.config._experts_implementation
                raise SystemExit(f"asked for experts_implementation={name!r}, the model runs {runs_impl!r}")
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        runs[name] = {"model": model, "opt": opt, "times_ms": [], "losses": [], "lm_losses": [], "aux_losses": []}
    del reference, state
    ids, labels = ids.to(device), labels.to(device)

    def step(name: str) -> None:
        run = runs[name]
        _sync(device)
        start = time.perf_counter()
        if name == MODEL_ROW:
            out = run["model"](ids, labels=labels)
            loss = out.total_loss  # cross-entropy + the routers' losses, each already scaled by its coefficient
        else:
            out = run["model"](input_ids=ids, labels=ids, output_router_logits=args.aux)
            loss = out.loss  # transformers adds router_aux_loss_coef * aux_loss when output_router_logits
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        _sync(device)
        run["times_ms"].append((time.perf_counter() - start) * 1e3)
        # Outside the timed region: the loss split into cross-entropy and scaled balancing loss.
        if name == MODEL_ROW:
            aux = 0.0 if out.aux_loss is None else out.aux_loss.item()
        else:
            aux = aux_coef * out.aux_loss.item() if args.aux else 0.0
        run["losses"].append(loss.item())
        run["aux_losses"].append(aux)
        run["lm_losses"].append(out.loss.item() if name == MODEL_ROW else loss.item() - aux)

    for r in range(args.warmup + args.steps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            step(name)

    tokens = size["batch"] * size["seq"]
    rows = []
    for name in names:
        run = runs[name]
        times = run["times_ms"][args.warmup :]
        median = statistics.median(times)
        rows.append(
            {
                "implementation": name,
                "framework": "dynamoe" if name == MODEL_ROW else "transformers",
                "median_ms": median,
                "min_ms": min(times),
                "max_ms": max(times),
                "times_ms": times,
                "tokens_per_s": tokens / (median / 1e3),
                "first_loss": run["losses"][0],
                "first_lm_loss": run["lm_losses"][0],
                "first_aux_loss": run["aux_losses"][0],
                "last_loss": run["losses"][-1],
            }
        )
    base = rows[0]["median_ms"]
    best_hf = min((r for r in rows if r["implementation"] in NATIVE), key=lambda r: r["median_ms"], default=None)
    for row in rows:
        row["speedup_vs_first"] = base / row["median_ms"]
        if best_hf is not None:
            row["speedup_vs_best_transformers"] = best_hf["median_ms"] / row["median_ms"]
    target = None  # issue #14: dynamoe's model no slower than transformers' best
    if best_hf is not None and MODEL_ROW in names:
        ours = next(r for r in rows if r["implementation"] == MODEL_ROW)
        target = {
            "best_transformers": best_hf["implementation"],
            "ratio": ours["speedup_vs_best_transformers"],
            "met": ours["median_ms"] <= best_hf["median_ms"],
        }

    hardware = {
        **hardware_info(),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(
        f"Mixtral-style LM training step (fwd + bwd + AdamW), {device.type}, {args.dtype}: "
        f"{n_params / 1e6:.2f}M parameters ({n_expert_params / 1e6:.2f}M in experts), hidden={size['hidden']} "
        f"layers={size['layers']} E={size['experts']} k={size['top_k']} ffn={size['ffn']} vocab={size['vocab']}, "
        f"batch {size['batch']}x{size['seq']} tokens; loss = cross-entropy"
        + (f" + {aux_coef:g} x router balancing loss" if args.aux else " (no balancing loss)")
    )
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up per row, interleaved rounds; "
        f"CPU: {hardware['cpu_model'] or hardware['processor']} ({hardware['cpu_count']} cores, "
        f"{hardware['torch_threads']} threads), torch {hardware['torch']}, transformers {transformers.__version__}"
        + (f", load average {hardware['load_average'][0]:.2f} at the end" if hardware["load_average"] else "")
    )
    if same_model is not None:
        print(
            f"{MODEL_ROW}: transformers' model imported by dynamoe.interop.hf_models; logits within "
            f"{same_model['max_abs_logit_diff']:.2g} of transformers' (fp32, checked before timing)"
        )
    header = (
        "row",
        "median ms",
        "min ms",
        "max ms",
        "tokens/s",
        f"vs {names[0]}",
        "vs hf best",
        "first CE",
        "first aux",
    )
    table = [header] + [
        (
            r["implementation"] if r["framework"] == "dynamoe" else f"transformers {r['implementation']}",
            f"{r['median_ms']:.1f}",
            f"{r['min_ms']:.1f}",
            f"{r['max_ms']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['speedup_vs_first']:.2f}x",
            f"{r['speedup_vs_best_transformers']:.2f}x" if best_hf is not None else "-",
            f"{r['first_lm_loss']:.6f}",
            f"{r['first_aux_loss']:.6f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print(
        "vs X = X's median / the row's median (>1 is faster); hf best = the faster of transformers' own "
        "implementations (eager, grouped_mm)"
        + (f": {best_hf['implementation']}" if best_hf is not None else "")
        + "; first CE = the first step's cross-entropy, first aux = its scaled balancing loss"
    )
    if target is not None:
        print(
            f"{MODEL_ROW} vs transformers {target['best_transformers']}: {target['ratio']:.3f}x "
            f"({'no slower' if target['met'] else 'slower'}; medians of one run, see min/max for the spread)"
        )
    if not malloc_tuned and device.type == "cpu":
        print("glibc allocator left at its defaults")

    result = {
        "benchmark": f"hf_experts_train_step_{device.type}",
        "config": {
            **size,
            "size": args.size,
            "large": args.size == "large",
            "dtype": args.dtype,
            "aux": args.aux,
            "aux_loss_coef": aux_coef,
            "lr": LR,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "parameters": n_params,
            "expert_parameters": n_expert_params,
            "malloc_tuned": malloc_tuned,
        },
        "same_model": same_model,
        "target": target,
        "hardware": hardware,
        "rows": rows,
    }
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
