"""Decoding speed of a trained decoder: KV-cache greedy decoding against self-speculative decoding
and CALM per-token early exit.

    python -m dynamoe.evals.bench_generation RUN [--prompts-file F | --openings] [--num-prompts 32]
        [--batch-sizes 1 8 32] [--draft-layers L ...] [--draft-tokens D] [--calm-deltas 0.05 ...]
        [--confidence margin] [--max-new-tokens N] [--repeats 3] [--json OUT]

The prompts are a file's lines, the eight Shakespeare openings (``--openings``), or by default
``--num-prompts`` windows of 32 tokens from the run's validation split (seed 1; CALM calibrates on
other windows, seed 0). They are decoded greedily at each batch size: plainly with the cache,
self-speculatively from each exit named (default: every exit of the model), and with CALM at
each delta (thresholds from the run's ``calm_thresholds.json``, calibrated first when it was made
for other settings). Each cell is the best of ``--repeats`` timed runs after one warm-up;
tokens/s counts new tokens only.

Beside tokens/s and the speedup over the plain run: agreement with full greedy decoding
(speculative: identical by construction, checked; CALM: the share of its tokens that the full
model's argmax picks after CALM's own prefix, and in brackets the share of positions equal to the
full greedy text), layers per token, and the FLOPs ratio to the plain run (CALM: counted as run,
propagated keys and values and exit scoring included; speculative: token-layers run over tokens
kept, an estimate that ignores heads and attention lengths). Writes JSON (default
RUN/bench_generation.json).
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


def bench(model, prompts, batch_sizes, draft_layers, draft_tokens, max_new, repeats, calm=None) -> list[dict]:
    """Rows of the table; ``calm`` is a list of (delta, calibration dict) for the CALM rows."""
    from dynamoe.generation import generate, speculative_generate
    from dynamoe.generation.calm import agreement_with_full, calm_generate

    N = model.cfg.n_layers
    rows = []
    for batch in batch_sizes:
        full = _timed(lambda: generate(model, prompts, max_new_tokens=max_new, batch_size=batch), repeats)  # noqa: B023
        base = full.stats.tokens_per_second
        rows.append(
            {
                "batch": batch,
                "mode": "full",
                **full.stats.to_dict(),
                "speedup": 1.0,
                "identical": True,
                "token_agreement": 1.0,
                "sequence_agreement": 1.0,
                "layers_per_token": float(N),
                "flops_ratio": 1.0,
            }
        )
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
            identical = spec.tokens == full.tokens
            rows.append(
                {
                    "batch": batch,
                    "mode": f"speculative L={L} d={draft_tokens}",
                    "draft_layers": L,
                    "draft_tokens": draft_tokens,
                    **s.to_dict(),
                    "speedup": s.tokens_per_second / base,
                    "identical": identical,
                    "token_agreement": 1.0 if identical else None,
                    "sequence_agreement": 1.0 if identical else None,
                    # Every round runs the pending token and each draft through all N layers.
                    "layers_per_token": N * (s.drafted + s.rounds) / max(s.new_tokens, 1),
                    "flops_ratio": (s.drafted + s.rounds) / max(s.new_tokens, 1),
                    "flops_ratio_estimated": True,
                }
            )
            print(f"  batch {batch} speculative L={L}: {s.tokens_per_second:.1f} tokens/s", flush=True)
        for delta, cal in calm or []:
            out = _timed(
                lambda: calm_generate(  # noqa: B023
                    model,
                    prompts,
                    thresholds=cal["thresholds"],  # noqa: B023
                    confidence=cal["confidence"],  # noqa: B023
                    max_new_tokens=max_new,
                    batch_size=batch,  # noqa: B023
                ),
                repeats,
            )
            s = out.stats
            agree = agreement_with_full(model, prompts, out.tokens, full.tokens)
            rows.append(
                {
                    "batch": batch,
                    "mode": f"CALM {cal['confidence']} delta={delta}",
                    "delta": delta,
                    "threshold": cal["threshold"],
                    **s.to_dict(),
                    "exit_fractions": [c / max(s.decided, 1) for c in s.exit_counts],
                    "speedup": s.tokens_per_second / base,
                    "identical": out.tokens == full.tokens,
                    **agree,
                }
            )
            print(f"  batch {batch} CALM delta={delta}: {s.tokens_per_second:.1f} tokens/s", flush=True)
    return rows


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'batch':>5} {'mode':<26} {'tokens/s':>9} {'speedup':>8} {'accepted':>9} {'agreement':>17} "
        f"{'layers/tok':>10} {'FLOPs':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        rate = _pct(r.get("acceptance_rate"))
        agree = _pct(r.get("token_agreement"))
        if r.get("sequence_agreement") is not None and r["sequence_agreement"] != r.get("token_agreement"):
            agree += f" ({_pct(r['sequence_agreement'])})"
        flops = ("~" if r.get("flops_ratio_estimated") else "") + _pct(r.get("flops_ratio"))
        lines.append(
            f"{r['batch']:>5} {r['mode']:<26} {r['tokens_per_second']:>9.1f} {r['speedup']:>7.2f}x "
            f"{rate:>9} {agree:>17} {r['layers_per_token']:>10.2f} {flops:>7}"
        )
    lines.append(
        "agreement: tokens the full model's argmax picks after the same prefix (in brackets: positions equal "
        "to full greedy); FLOPs: of the plain run (~: estimated)"
    )
    return "\n".join(lines)


def _calibrations(run, model, deltas, confidence, windows, batch_size) -> list[tuple[float, dict]]:
    from dynamoe.generation.calm_calibration import CalibrationSettings, calibrate_run, describe, read_thresholds

    out = []
    for delta in deltas:
        settings = CalibrationSettings(delta=delta, confidence=confidence, windows=windows)
        cal = read_thresholds(run, settings)
        if cal is None:
            cal = calibrate_run(run, model, settings, batch_size=batch_size)
        else:
            print(describe(cal))
        out.append((delta, cal))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder of a decoder (with early exits, for the speculative rows)")
    p.add_argument("--prompts-file", default=None, help="one prompt a line (default: validation windows)")
    p.add_argument("--openings", action="store_true", help="the eight Shakespeare openings as prompts")
    p.add_argument("--num-prompts", type=int, default=32, help="validation windows to decode (default 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--draft-layers", type=int, nargs="*", default=None, help="exits to draft from (default: all)")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument(
        "--calm-deltas", type=float, nargs="*", default=[0.05], help="CALM rows, one per delta (none: no CALM rows)"
    )
    p.add_argument("--confidence", default="margin", help="CALM confidence: margin, saturation, learned, ...")
    p.add_argument("--calibration-windows", type=int, default=64)
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
    context = run.model_cfg.max_seq_len
    if args.prompts_file or args.openings:
        texts = read_prompts(None, args.prompts_file) if args.prompts_file else DEFAULT_PROMPTS
        # A small model's context may not hold a whole prompt: keep each prompt's end, half the context at most.
        prompts = [p[-(context // 2) :] for p in encode_prompts(load_tokenizer(run), texts)]
    else:
        prompts = _validation_prompts(run, args.num_prompts, min(32, context // 2))
    max_new = args.max_new_tokens or max(1, min(64, context - max(len(t) for t in prompts)))
    check_prompts(run.model_cfg, prompts, max_new)
    draft_layers = list(run.model_cfg.exits.layers) if args.draft_layers is None else args.draft_layers
    if args.calm_deltas:
        from dynamoe.generation.calm import check_calm

        check_calm(run.model_cfg, args.confidence)
    _, model = load_model(run.weights)
    model.to(args.device)
    calm = _calibrations(
        run, model, args.calm_deltas or [], args.confidence, args.calibration_windows, max(args.batch_sizes)
    )
    print(f"{len(prompts)} prompts, {max_new} new tokens each, best of {args.repeats}", flush=True)
    rows = bench(model, prompts, args.batch_sizes, draft_layers, args.draft_tokens, max_new, args.repeats, calm)
    print(format_table(rows))
    result = {
        "run": str(run.run_dir),
        "n_layers": run.model_cfg.n_layers,
        "exits": list(run.model_cfg.exits.layers),
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "calm_calibration": [cal for _, cal in calm],
        "rows": rows,
        "hardware": hardware_info(),
    }
    write_json(result, args.json or str(Path(run.run_dir) / "bench_generation.json"))
    return result


def _validation_prompts(run, count: int, tokens: int) -> list[list[int]]:
    """``count`` windows of the run's validation split (seed 1: not the calibration windows, seed 0)."""
    import yaml

    from dynamoe.config import RunConfig, from_dict
    from dynamoe.data import build_data
    from dynamoe.generation.calm_calibration import held_out_prompts

    cfg = from_dict(RunConfig, yaml.safe_load((Path(run.run_dir) / "config.yaml").read_text()))
    return held_out_prompts(build_data(cfg.data, "lm").val_ids, count, tokens, seed=1)


if __name__ == "__main__":
    main()
