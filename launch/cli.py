"""The ``moe`` command line.

    moe train CONFIG [--set key=value ...] [--resume [PATH]] [--run-dir DIR]
    moe launch CONFIG --workers N [--ep-size E] [--gpus-per-worker G] [--address ADDR]
    moe launch --eval RUN_DIR --workers N
    moe bench layer [...]        MoE layer vs DeepSpeed's MoE on this machine
    moe bench kernels [...]      routing, dispatch, grouped GEMMs and layers vs peers (see --help)
    moe export RUN_OR_CHECKPOINT OUT.safetensors   the whole model in one file
    moe export RUN_OR_CHECKPOINT OUT/ --format hf [--family F]   a Hugging Face model folder
    moe import HF_FOLDER_OR_HUB_NAME OUT.safetensors [--config RUN.yaml]   a Hugging Face MoE LM in
    moe upcycle CONFIG OUT.safetensors [--set ...]   the run's MoE model made from the dense train.init_from
    moe calibrate RUN_DIR --budget 0.6 [--unit layers|flops] [--policy P]   exit thresholds for a budget
    moe exit-eval RUN_DIR [--budget 0.6 ...]  early exits: accuracy vs compute, compacted-inference speed
    moe bench all-to-all|depth [...]  all-to-all cost for 1, 2, 4 processes; MoD / ACT vs dense
    moe bench moe-vs-dense [...] every router against the dense decoder at equal active and training FLOPs
    moe bench plan [...]         the memory plan against measured peak memory of short runs
    moe bench throughput [...]   tokens/s and peak memory: fp32 vs bf16, activation checkpointing off and on
    moe bench hf-experts [...]   an MoE training step: transformers (eager, grouped_mm, dynamoe experts) vs dynamoe
    moe bench generation RUN     tokens/s of KV-cache decoding: full model vs self-speculative
    moe bench hf-parity RUN      a dense encoder fine-tune against transformers' own on the same batches
    moe eval RUN_DIR|CHECKPOINT [--report report.html]   load balance, compute per token, plots
    moe generate RUN_DIR --prompt TEXT [--prompts-file F] [--max-new-tokens N] [--temperature T
        --top-k K --top-p P --seed S] [--speculative --draft-layers L --draft-tokens D] [--batch-size B]
        [--calm [--delta 0.05 --epsilon 0.05 --confidence margin|saturation|learned] [--calibrate-only]]
    moe plan CONFIG [--gpus N] [--gpu-memory 80GiB] [--routing worst] [--set ...]   memory per rank, all-to-all
    moe configs                  list the shipped configs

CONFIG is a YAML path or the name of a shipped config (``moe train quickstart``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from dynamoe.config import load_config
    from dynamoe.training.trainer import resolve_run_dir, train

    cfg = load_config(args.config, args.set)
    resume = args.resume
    if resume == "latest":
        resume = str(resolve_run_dir(cfg, args.run_dir))
    train(cfg, run_dir=args.run_dir, resume=resume, progress=not args.quiet)
    return 0


BENCHMARKS = {  # `moe bench NAME` -> the module whose main(argv) runs it
    "layer": "dynamoe.evals.bench_moe_layer",
    "kernels": "dynamoe.evals.bench_kernels",
    "all-to-all": "dynamoe.evals.bench_all_to_all",
    "checkpointing": "dynamoe.evals.bench_activation_checkpointing",
    "checkpoint": "dynamoe.evals.bench_checkpoint",  # save and load: full vs sharded
    "depth": "dynamoe.evals.conditional_depth",
    "moe-vs-dense": "dynamoe.evals.moe_vs_dense",
    "plan": "dynamoe.evals.plan_check",
    "throughput": "dynamoe.evals.bench_throughput",
    "hf-experts": "dynamoe.evals.bench_hf_experts",
    "generation": "dynamoe.evals.bench_generation",
    "hf-parity": "dynamoe.evals.hf_parity",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    importlib.import_module(BENCHMARKS[args.what]).main(args.rest)
    return 0


def _launch(args: argparse.Namespace) -> int:
    from dynamoe.launch.ray_launcher import main as launch_main

    if args.config is None:
        if args.eval is None:
            raise SystemExit("moe launch: error: give a CONFIG, or --eval RUN_DIR")
        args.config = str(Path(args.eval) / "config.yaml")
    return launch_main(args)


def _export(args: argparse.Namespace) -> int:
    from dynamoe.training.checkpoint import export_model

    if args.format == "hf":
        from dynamoe.interop.hf_models import export_model as export_hf

        hf = export_hf(args.source, args.out, family=args.family, dtype=args.dtype)
        tokenizer = " with its tokenizer" if hf.tokenizer else " (the run has no tokenizer folder)"
        print(f"wrote {hf.path}: a {hf.family} model{tokenizer}, the model at step {hf.step} ({hf.checkpoint})")
        return 0
    if args.family is not None:
        raise SystemExit("moe export: error: --family goes with --format hf")
    result = export_model(args.source, args.out)
    for folder, why in result.skipped:
        print(f"moe export: warning: skipped {folder.name}: {why}", file=sys.stderr)
    print(f"wrote {result.path}: the model at step {result.step} ({result.checkpoint})")
    return 0


def _import(args: argparse.Namespace) -> int:
    import yaml

    from dynamoe.config import to_dict
    from dynamoe.interop.hf_models import import_model, shareable_state
    from dynamoe.training.checkpoint import write_exported

    imported = import_model(args.source)
    out = write_exported(
        to_dict(imported.config), shareable_state(imported.model), Path(args.out), source=str(args.source)
    )
    cfg = imported.config
    params = sum(p.numel() for p in imported.model.parameters())
    print(f"wrote {out}: {imported.family} as dynamoe's modern decoder, {cfg.n_layers} layers, {params:,} parameters")
    if args.config:
        has_tokenizer = any((imported.source / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        run = {
            "model": to_dict(cfg),
            "data": {"dataset": "tinyshakespeare", "tokenizer": str(imported.source) if has_tokenizer else "char"},
            "train": {"init_from": str(Path(args.out).resolve()), "lr": 1e-5, "warmup_steps": 10},
        }
        Path(args.config).write_text(
            "# Fine-tune an imported model: set data.dataset (and data.path) to your corpus.\n"
            + yaml.safe_dump(run, sort_keys=False)
        )
        print(f"wrote {args.config}: moe train {args.config} fine-tunes it")
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from dynamoe.config import load_config, to_dict
    from dynamoe.interop.hf_models import shareable_state
    from dynamoe.models.upcycle import plan, upcycle_model
    from dynamoe.training.checkpoint import load_init_model, write_exported

    cfg = load_config(args.config, [*args.set, "train.upcycle.enabled=true"])
    source = cfg.train.init_from
    dense_cfg, dense = load_init_model(source)
    model_cfg, model = upcycle_model(dense_cfg, dense, cfg.model, cfg.train.upcycle, seed=cfg.train.seed, name=source)
    out = write_exported(to_dict(model_cfg), shareable_state(model), Path(args.out), source=f"upcycled from {source}")
    print(plan(model_cfg, cfg.train.upcycle).describe())
    print(f"wrote {out}: train.init_from takes it (without train.upcycle), `moe export --format hf` converts it")
    return 0


def _exit_eval(args: argparse.Namespace) -> int:
    from dynamoe.evals.early_exit import run as exit_eval

    exit_eval(args)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from dynamoe.evals.calibrate_run import calibrate_run, format_calibration

    try:
        out = calibrate_run(args.source, args.budget, args.unit, args.policy, args.batch_size, per_exit=args.per_exit)
    except ValueError as err:
        print(f"moe calibrate: error: {err}", file=sys.stderr)
        return 2
    print(format_calibration(out))
    print(f"wrote {out['written']}")
    values = ", ".join(f"{t:.6g}" for t in out["thresholds"])
    print(f"to run with them: --set model.exits.policy={out['policy']} --set 'model.exits.thresholds=[{values}]'")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dynamoe.evals.model_eval import evaluate, format_summary

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = evaluate(
        args.source,
        config=args.config,
        task=args.task,
        compare=args.compare,
        batches=args.batches,
        batch_size=args.batch_size,
        out_dir=args.out,
        report=args.report,
    )
    print(format_summary(result))
    print(f"wrote {result['json']}" + (f" and {result['report']}" if "report" in result else ""))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dynamoe.generation import GenerationError

    try:
        return _run_generate(args)
    except GenerationError as err:
        if args.debug:
            raise
        print(f"moe generate: error: {err}", file=sys.stderr)
        return 2


def _generation_request(args: argparse.Namespace):
    """Everything ``moe generate`` checks before loading weights, so a bad request costs seconds:
    (prompt texts, their ids, run, sampling, draft layers or None, tokenizer, new tokens per prompt)."""
    from dynamoe.generation import GenerationError, SamplingConfig, check_decodable, draft_exit
    from dynamoe.generation.decode import check_prompts
    from dynamoe.generation.run_folder import encode_prompts, load_tokenizer, read_prompts, resolve_run

    texts = read_prompts(args.prompt, args.prompts_file)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.speculative and not sampling.greedy:
        raise GenerationError(
            "--speculative decodes greedily (it reproduces full-model greedy decoding); "
            "fix: drop --temperature/--top-k/--top-p, or drop --speculative to sample"
        )
    _check_calm_request(args, sampling)
    for flag, value in (("--draft-tokens", args.draft_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise GenerationError(f"{flag} must be >= 1, got {value}; fix: e.g. 4")
    run = resolve_run(args.source)
    check_decodable(run.model_cfg, dropless=args.dropless)
    draft_layers = draft_exit(run.model_cfg, args.draft_layers)[0] if args.speculative else None
    if args.calm:
        from dynamoe.generation.calm import check_calm

        check_calm(run.model_cfg, args.confidence)
    tokenizer = load_tokenizer(run)
    prompts = encode_prompts(tokenizer, texts)
    max_new = args.max_new_tokens
    if max_new is None:  # as many as the context leaves the longest prompt, up to 64
        max_new = max(1, min(64, run.model_cfg.max_seq_len - max(len(p) for p in prompts)))
    check_prompts(run.model_cfg, prompts, max_new)
    return texts, prompts, run, sampling, draft_layers, tokenizer, max_new


def _check_calm_request(args: argparse.Namespace, sampling) -> None:
    from dynamoe.generation import GenerationError

    if not args.calm:
        if args.calibrate_only or args.calm_threshold is not None:
            raise GenerationError("--calibrate-only and --calm-threshold belong to CALM decoding; fix: add --calm")
        return
    if args.speculative:
        raise GenerationError("--calm and --speculative are two ways to decode; fix: choose one")
    if args.calibrate_only and args.calm_threshold is not None:
        raise GenerationError("--calm-threshold sets the threshold, so there is nothing to calibrate; fix: drop one")
    for flag, value in (("--delta", args.delta), ("--epsilon", args.epsilon)):
        if not 0 < value < 1:
            raise GenerationError(f"{flag} must be in (0, 1), got {value}; fix: e.g. 0.05")
    if args.calibration_windows < 1:
        raise GenerationError(f"--calibration-windows must be >= 1, got {args.calibration_windows}; fix: e.g. 64")
    if not sampling.greedy:
        raise GenerationError(
            "--calm decodes greedily (its thresholds bound the disagreement with full greedy decoding); "
            "fix: drop --temperature/--top-k/--top-p"
        )


def _calm_thresholds(args: argparse.Namespace, run, model) -> list[float]:
    """--calm-threshold, else the run's calm_thresholds.json when it was made for these settings and
    weights, else a calibration now (written to that file)."""
    from dynamoe.generation.calm import threshold_list
    from dynamoe.generation.calm_calibration import CalibrationSettings, calibrate_run, describe, read_thresholds

    if args.calm_threshold is not None:
        return threshold_list(run.model_cfg, args.calm_threshold)
    settings = CalibrationSettings(
        delta=args.delta, epsilon=args.epsilon, confidence=args.confidence, windows=args.calibration_windows
    )
    saved = None if args.calibrate_only else read_thresholds(run, settings)
    if saved is not None:
        print(f"{describe(saved)} (from {run.run_dir / 'calm_thresholds.json'})")
        return saved["thresholds"]
    return calibrate_run(run, model, settings, batch_size=max(args.batch_size, 32))["thresholds"]


def _run_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from dynamoe.generation import generate, speculative_generate
    from dynamoe.training.checkpoint import load_model

    if args.calibrate_only:  # no prompts: only the thresholds
        from dynamoe.generation import SamplingConfig, check_decodable
        from dynamoe.generation.calm import check_calm
        from dynamoe.generation.run_folder import resolve_run

        _check_calm_request(args, SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed))
        run = resolve_run(args.source)
        check_decodable(run.model_cfg, dropless=args.dropless)
        check_calm(run.model_cfg, args.confidence)
        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(run.weights)[1].to(args.device)
        _calm_thresholds(args, run, model)
        return 0
    texts, prompts, run, sampling, draft_layers, tokenizer, max_new = _generation_request(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    _, model = load_model(run.weights)
    model.to(args.device)
    load_seconds = time.perf_counter() - started
    common = dict(max_new_tokens=max_new, eos_id=tokenizer.eos_token_id, batch_size=args.batch_size)
    if args.calm:
        from dynamoe.generation.calm import calm_generate

        thresholds = _calm_thresholds(args, run, model)
        result = calm_generate(
            model, prompts, thresholds=thresholds, confidence=args.confidence, dropless=args.dropless, **common
        )
    elif draft_layers is not None:
        result = speculative_generate(
            model, prompts, draft_layers=draft_layers, draft_tokens=args.draft_tokens, dropless=args.dropless, **common
        )
    else:
        result = generate(model, prompts, sampling=sampling, dropless=args.dropless, **common)
    completions = [tokenizer.decode(t) for t in result.tokens]
    for i, (text, ids, new, completion) in enumerate(zip(texts, prompts, result.tokens, completions), 1):
        print(f"=== {i}/{len(texts)}: {len(ids)} prompt tokens, {len(new)} new ===")
        print(text + completion)
    _report_generation(args, result, sampling, draft_layers, run.model_cfg.n_layers, load_seconds)
    if args.json:
        import json

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": t, "completion": c, "tokens": n} for t, c, n in zip(texts, completions, result.tokens)]
        out.write_text(json.dumps({"completions": rows, "stats": result.stats.to_dict()}, indent=2))
        print(f"wrote {out}")
    return 0


def _report_generation(args, result, sampling, draft_layers, n_layers: int, load_seconds: float) -> None:
    s = result.stats
    mode = "greedy" if sampling.greedy else f"sampled (temperature {sampling.temperature}, seed {sampling.seed})"
    print(
        f"generated {s.new_tokens} tokens for {s.prompts} prompt(s) in {s.seconds:.2f} s "
        f"({s.tokens_per_second:.1f} tokens/s, {mode}; model loaded in {load_seconds:.2f} s)"
    )
    if getattr(s, "layers_per_token", None) is not None:
        exits = ", ".join(
            f"{c / max(s.decided, 1):.1%} after layer {layer}"
            for c, layer in zip(s.exit_counts, [*s.exit_layers, s.n_layers])
        )
        print(
            f"CALM ({args.confidence}): {s.layers_per_token:.2f} of {n_layers} layers per token, "
            f"{s.flops_ratio:.1%} of the full model's FLOPs; tokens left {exits}"
        )
    if draft_layers is not None:
        rate = "n/a" if s.acceptance_rate is None else f"{s.acceptance_rate:.1%}"
        print(
            f"self-speculative: drafts from the exit after layer {draft_layers} of {n_layers}, "
            f"{args.draft_tokens} per round: {rate} of {s.drafted} drafted tokens accepted, "
            f"{s.tokens_per_round:.2f} tokens per verification pass"
        )


def _plan(args: argparse.Namespace) -> int:
    import json

    from dynamoe.config import load_config
    from dynamoe.training.memory_plan import parse_size, plan

    cfg = load_config(args.config, args.set)
    gpu_memory = None if args.gpu_memory is None else parse_size(args.gpu_memory)
    result = plan(cfg, args.gpus, gpu_memory, routing=args.routing)
    print(result.format_table())
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {out}")
    return 0


def _configs(args: argparse.Namespace) -> int:
    from dynamoe.config import shipped_configs

    for name, path in sorted(shipped_configs().items()):
        print(f"{name:32s} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe", description="Train and measure sparse MoE and conditional-compute models."
    )
    # The deepspeed launcher passes --local_rank; the trainer reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks and full warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model in this process (DeepSpeed engine, CPU or one GPU)")
    p.add_argument("config", help="a YAML config path or a shipped config name (see `moe configs`)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. train.steps=50"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from a checkpoint folder or a run folder's newest checkpoint (default: this run's folder)",
    )
    p.add_argument("--run-dir", default=None, help="run folder (default: train.run_dir from the config)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_train)

    p = sub.add_parser("launch", help="run training (or --eval) on Ray Train workers: a local Ray by default")
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="a YAML path or shipped config name (with --eval: defaults to the run's config.yaml)",
    )
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (processes)")
    p.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (sets parallel.ep_size)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (0: CPU and gloo)")
    p.add_argument(
        "--address",
        default=None,
        help="an existing Ray cluster: auto, host:port or ray://host:port (default: start one here)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--run-dir", default=None, help="run folder (default: train.run_dir from the config)")
    p.add_argument("--eval", default=None, metavar="RUN_DIR", help="evaluate a run folder's newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_launch)

    p = sub.add_parser("bench", help="benchmarks that print tables and write JSON")
    p.add_argument(
        "what",
        choices=list(BENCHMARKS),
        help="layer: MoE layer forward+backward vs DeepSpeed's MoE; kernels: MoE kernel ops vs peers; "
        "all-to-all: bytes and step time for 1, 2, 4 processes; depth: MoD and ACT vs dense at equal training FLOPs; "
        "moe-vs-dense: every MoE router vs the dense decoder at equal active and training FLOPs; "
        "checkpointing: activation memory with and without activation checkpointing; "
        "checkpoint: save and load time and peak memory per rank, full vs sharded checkpoints",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark (see `moe bench layer --help`)")
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "export", help="write a checkpoint's whole model to one safetensors file, or as a Hugging Face model folder"
    )
    p.add_argument("source", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument(
        "out", help="the .safetensors file to write (the model config in its metadata), or with --format hf a folder"
    )
    p.add_argument(
        "--format",
        choices=["dynamoe", "hf"],
        default="dynamoe",
        help="hf: config.json, sharded safetensors and the tokenizer, loadable by AutoModelForCausalLM",
    )
    p.add_argument(
        "--family",
        default=None,
        help="hf: mixtral, qwen3_moe, olmoe, glm4_moe, llama or qwen3 (default: the one the model's features name)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="hf: tensor dtype")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="a Hugging Face MoE language model (folder or hub name) as a dynamoe model")
    p.add_argument("source", help="a local model folder (config.json and safetensors) or a hub name")
    p.add_argument("out", help="the .safetensors file to write (train.init_from takes it)")
    p.add_argument("--config", default=None, metavar="YAML", help="also write a training config that fine-tunes it")
    p.set_defaults(func=_import)

    p = sub.add_parser("upcycle", help="write the MoE model a config upcycles from its dense train.init_from")
    p.add_argument("config", help="a YAML config with train.init_from (a dense model) and train.upcycle options")
    p.add_argument("out", help="the .safetensors file to write (train.init_from takes it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=_upcycle)

    from dynamoe.evals.early_exit import add_arguments as exit_eval_arguments

    p = sub.add_parser(
        "exit-eval", help="early exits of a run: accuracy against compute per policy, and compacted-inference speed"
    )
    exit_eval_arguments(p)
    p.set_defaults(func=_exit_eval)

    p = sub.add_parser("calibrate", help="choose early-exit thresholds that fit a compute budget")
    p.add_argument("source", help="a run folder (its newest checkpoint) or a checkpoint folder of a run with exits")
    p.add_argument(
        "--budget",
        type=float,
        required=True,
        help="average compute per sample as a fraction of the full network, e.g. 0.6",
    )
    p.add_argument("--unit", choices=["layers", "flops"], default="layers", help="what the budget counts")
    p.add_argument(
        "--policy",
        choices=["max_prob", "entropy", "margin", "patience", "learned"],
        default=None,
        help="exit criterion (default: the run's model.exits.policy)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--per-exit",
        action="store_true",
        help="refine each exit's threshold after the shared one "
        "(fits the calibration split closer, may generalise worse)",
    )
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("eval", help="load balance, compute per token, accuracy vs compute; JSON, plots, HTML report")
    p.add_argument("source", help="a run folder, a checkpoint folder, or an exported .safetensors (with --config)")
    p.add_argument("--config", default=None, help="config for the data (default: the run's config.yaml)")
    p.add_argument(
        "--task",
        default=None,
        help="dataset to evaluate on (default: the run's), e.g. sst2, tinyshakespeare, digits, cifar10",
    )
    p.add_argument(
        "--compare",
        default=None,
        help="checkpoint for routing stability (default: the run's previous checkpoint, if any)",
    )
    p.add_argument(
        "--batches", type=int, default=None, help="validation batches (default: all, or train.eval_batches for LMs)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval)")
    p.add_argument(
        "--report",
        default=None,
        metavar="HTML",
        help="also write a self-contained HTML report to this path (relative to the current folder)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "generate", help="continue prompts with a trained decoder (KV cache; optionally self-speculative)"
    )
    p.add_argument("source", help="a run folder (its newest checkpoint and tokenizer) or one of its checkpoint folders")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, metavar="FILE", help="a text file, one prompt a line")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to add to each prompt (default: 64, or what the context leaves the longest prompt)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sample")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding mass P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i samples with seed + i")
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative greedy decoding: an early exit drafts, the remaining layers verify",
    )
    p.add_argument(
        "--draft-layers",
        type=int,
        default=None,
        metavar="L",
        help="layers the draft runs: one of model.exits.layers (default: the exit nearest half the depth)",
    )
    p.add_argument("--draft-tokens", type=int, default=4, metavar="D", help="tokens drafted per round (default 4)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument(
        "--calm",
        action="store_true",
        help="per-token early exit (CALM): a token leaves at the first exit confident enough, with thresholds "
        "calibrated on the run's validation text (calm_thresholds.json in the run folder)",
    )
    p.add_argument(
        "--delta", type=float, default=0.05, help="CALM: tolerated share of tokens unlike full greedy (default 0.05)"
    )
    p.add_argument("--epsilon", type=float, default=0.05, help="CALM: the guarantee holds with probability 1 - epsilon")
    p.add_argument(
        "--confidence",
        default="margin",
        choices=["margin", "saturation", "learned", "max_prob", "entropy"],
        help="CALM: softmax margin (default), hidden-state saturation, or the learned exit predictor",
    )
    p.add_argument(
        "--calm-threshold",
        type=float,
        default=None,
        metavar="T",
        help="CALM: this threshold at every exit, no calibration",
    )
    p.add_argument(
        "--calibration-windows", type=int, default=64, help="CALM: validation windows to calibrate on (default 64)"
    )
    p.add_argument("--calibrate-only", action="store_true", help="CALM: (re)calibrate, write the thresholds, stop")
    p.add_argument(
        "--dropless",
        action="store_true",
        help="decode a model trained with expert capacity routing every token to its top-k experts",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the completions and statistics as JSON")
    p.set_defaults(func=_generate)

    p = sub.add_parser("plan", help="memory per rank and all-to-all bytes per step of a config, and whether it fits")
    p.add_argument("config", help="a YAML config path or a shipped config name (see `moe configs`)")
    p.add_argument("--gpus", type=int, default=None, help="processes (GPUs) in all (default: parallel.ep_size)")
    p.add_argument(
        "--gpu-memory", default=None, metavar="SIZE", help="memory of one GPU, e.g. 80GiB (default: this machine's)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON")
    p.add_argument(
        "--routing",
        choices=["uniform", "worst"],
        default="uniform",
        help="expert rows per rank: uniform routing, or the busiest rank taking every row its experts can get",
    )
    p.set_defaults(func=_plan)

    p = sub.add_parser("configs", help="list the shipped configs")
    p.set_defaults(func=_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dynamoe.config import ConfigError
    from dynamoe.data import DataError
    from dynamoe.training.checkpoint import CheckpointError
    from dynamoe.training.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    default_format = warnings.formatwarning
    if not args.debug:  # warnings as one line each, without the source line
        warnings.formatwarning = lambda message, category, *rest: f"moe {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as err:
        if args.debug:
            raise
        print(f"moe {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
