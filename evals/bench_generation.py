"""Decoding speed of a trained decoder: KV-cache greedy decoding against self-speculative decoding.

    python -m dynamoe.evals.bench_generation RUN [--prompts-file F] [--batch-sizes 1 8]
        [--draft-layers L ...] [--draft-tokens D] [--max-new-tokens N] [--repeats 3] [--json OUT]

The same prompts (a file's lines, or a few Shakespeare openings, the shipped corpus) are decoded
greedily at each batch size: plainly with the cache, then self-speculatively from each exit named
(default: every exit of the model). Each cell is the best of ``--repeats`` timed runs after one
warm-up; tokens/s counts new tokens only. Every speculative run is checked to give the plain run's
tokens. Prints a table and writes JSON (default RUN/bench_generation.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dynamoe.evals.report import hardware_info, write_json

DEFAULT_PROMPTS = [
    "ROMEO:\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "KING RICHARD II:\n",
    "JULIET:\nO Romeo, Romeo!",
    "MENENIUS:\n",
    "Second Servingman:\n",
    "DUKE VINCENTIO:\nNo, holy father;",
    "QUEEN ELIZABETH:\n",
]


def _timed(fn, repeats: int):
    """The fastest of ``repeats`` calls after a warm-up (the first call pays for lazy set-up)."""
    fn()
    best = None
    for _ in range(repeats):
        result = fn()
        if best is None or result.stats.seconds < best.stats.seconds:
            best = result
    return best


def bench(model, prompts, batch_sizes, draft_layers, draft_tokens, max_new, repeats) -> list[dict]:
    from dynamoe.generation import generate, speculative_generate

    rows = []
    for batch in batch_sizes:
        full = _timed(lambda: generate(model, prompts, max_new_tokens=max_new, batch_size=batch), repeats)  # noqa: B023
        base = full.stats.tokens_per_second
        rows.append({"batch": batch, "mode": "full", **full.stats.to_dict(), "speedup": 1.0, "identical": True})
        print(f"  batch {batch} full: {base:.1f} tokens/s", flush=True)
        for L in draft_layers:
            spec = _timed(
                lambda: speculative_generate(  # noqa: B023
                    model,
                    prompts,
                    max_new_tokens=max_new,
                    draft_layers=L,  # noqa: B023
                    draft_tokens=draft_tokens,
                    batch_size=batch,  # noqa: B023
                ),
                repeats,
            )
            s = spec.stats
            rows.append(
                {
                    "batch": batch,
                    "mode": f"speculative L={L} d={draft_tokens}",
                    "draft_layers": L,
                    "draft_tokens": draft_tokens,
                    **s.to_dict(),
                    "speedup": s.tokens_per_second / base,
                    "identical": spec.tokens == full.tokens,
                }
            )
            print(f"  batch {batch} speculative L={L}: {s.tokens_per_second:.1f} tokens/s", flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'batch':>5} {'mode':<24} {'tokens/s':>9} {'speedup':>8} {'accepted':>9} {'tok/round':>9} {'same':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        rate = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}"
        per_round = "" if r["tokens_per_round"] is None else f"{r['tokens_per_round']:.2f}"
        lines.append(
            f"{r['batch']:>5} {r['mode']:<24} {r['tokens_per_second']:>9.1f} {r['speedup']:>7.2f}x "
            f"{rate:>9} {per_round:>9} {'yes' if r['identical'] else 'NO':>5}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder of a decoder (with early exits, for the speculative rows)")
    p.add_argument("--prompts-file", default=None, help="one prompt a line (default: eight Shakespeare openings)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--draft-layers", type=int, nargs="*", default=None, help="exits to draft from (default: all)")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 64, or what the context leaves")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="default: RUN/bench_generation.json")
    args = p.parse_args(argv)

    import torch

    from dynamoe.generation import check_decodable
    from dynamoe.generation.decode import check_prompts
    from dynamoe.generation.run_folder import encode_prompts, load_tokenizer, read_prompts, resolve_run
    from dynamoe.training.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    run = resolve_run(args.run)
    check_decodable(run.model_cfg)
    texts = read_prompts(None, args.prompts_file) if args.prompts_file else DEFAULT_PROMPTS
    context = run.model_cfg.max_seq_len
    # A small model's context may not hold a whole prompt: keep each prompt's end, half the context at most.
    prompts = [p[-(context // 2) :] for p in encode_prompts(load_tokenizer(run), texts)]
    max_new = args.max_new_tokens or max(1, min(64, context - max(len(t) for t in prompts)))
    check_prompts(run.model_cfg, prompts, max_new)
    draft_layers = list(run.model_cfg.exits.layers) if args.draft_layers is None else args.draft_layers
    _, model = load_model(run.weights)
    model.to(args.device)
    print(f"{len(prompts)} prompts, {max_new} new tokens each, best of {args.repeats}", flush=True)
    rows = bench(model, prompts, args.batch_sizes, draft_layers, args.draft_tokens, max_new, args.repeats)
    print(format_table(rows))
    result = {
        "run": str(run.run_dir),
        "n_layers": run.model_cfg.n_layers,
        "exits": list(run.model_cfg.exits.layers),
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "hardware": hardware_info(),
    }
    write_json(result, args.json or str(Path(run.run_dir) / "bench_generation.json"))
    return result


if __name__ == "__main__":
    main()
