"""The trainer: one loop on the DeepSpeed engine for every model and task.

DeepSpeed is imported only here and in ``dynamoe.training.deepspeed_setup``, lazily, after the accelerator
is chosen (``DS_ACCELERATOR=cpu`` when no GPU is present; gloo on CPU). ``moe train`` runs one process;
under a standard launcher (torchrun, deepspeed) each process runs this same loop.

Reproducibility: the batch and the random state of every step are functions of (seed, step), the
learning rate is a function of the step, and checkpoints hold the exact optimizer state, so a
resumed run continues with the losses the uninterrupted run would have had.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dynamoe.config import ConfigError, RunConfig, check_upcycle, to_dict
from dynamoe.data import build_data
from dynamoe.data.tokenizer_files import TOKENIZER_FOLDER, save_tokenizer
from dynamoe.depth import depth_summary
from dynamoe.layers.expert_parallel import TrafficCounter, shard_experts, watch_all_to_alls
from dynamoe.layers.load_stats import (
    format_balance_table,
    layer_balance,
    reduce_stats,
    reset_stats,
    stats_paused,
)
from dynamoe.layers.moe_layer import MoELayer
from dynamoe.models import build_model
from dynamoe.training import checkpoint as ckpt
from dynamoe.training.checkpoint_sharded import load_sharded, save_sharded, start_full_save
from dynamoe.training.cpu_runtime import keep_large_allocations, limit_onednn_primitive_cache
from dynamoe.training.deepspeed_setup import (
    apply_collective_timeout,
    check_precision_supported,
    clip_gradients_,
    deepspeed_recognises,
    global_grad_norm,
    init_distributed,
    param_groups,
)
from dynamoe.training.memory_plan import check_world
from dynamoe.training.metrics import MetricsWriter, finite, truncate_metrics
from dynamoe.training.preflight import preflight
from dynamoe.training.sharded_state import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    optimizer_groups,
    set_fp32_masters,
)
from dynamoe.training.systems import device_peak_tflops, forward_flops, window_fields
from dynamoe.training.trackers import check_trackers, start_trackers
from dynamoe.training.watchdog import start_watchdog


class TrainingDiverged(RuntimeError):
    """Training cannot go on: the loss or gradient norm stayed non-finite, or the weights are."""


class TrainerHooks:
    """Seams for a launcher, called on every rank in the same order (so they may be collective)."""

    def on_log(self, step: int, metrics: dict) -> None:
        """After the training metrics of ``step`` are logged."""

    def on_checkpoint(self, step: int, folder: Path | None) -> None:
        """After a committed checkpoint of ``step`` (``folder`` on rank 0, None elsewhere)."""

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (counted from 1) and its logging and checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    wall_s: float
    train_losses: dict[int, float]  # step -> task loss (mean over the step's micro-batches)
    final_eval: dict
    balance: list = field(default_factory=list)
    baseline_loss: float | None = None  # LM: validation loss of a unigram model


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _code_version() -> str:
    try:
        repo = Path(__file__).resolve().parents[2]  # moe/training/trainer.py -> the checkout
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_run_dir(cfg: RunConfig, override: str | None) -> Path:
    return Path(override or cfg.train.run_dir.format(name=cfg.train.name or "run"))


def _fill_from_data(cfg: RunConfig, data) -> RunConfig:
    model = cfg.model
    if cfg.task == "image_classification":
        C, H, W = data.image_shape
        cnn = dataclasses.replace(
            model.cnn, in_channels=model.cnn.in_channels or C, image_size=model.cnn.image_size or H
        )
        if cnn.in_channels != C or cnn.image_size != H:
            raise ConfigError(
                f"model.cnn: in_channels={cnn.in_channels}, image_size={cnn.image_size} do not fit the data's "
                f"{C}x{H}x{W} images; fix: remove them to take them from the data"
            )
        model = dataclasses.replace(model, cnn=cnn, num_classes=model.num_classes or data.num_classes)
        return dataclasses.replace(cfg, model=model)
    if model.kind == "hf_encoder":
        from dynamoe.models.hf_encoder import fill_from_pretrained

        model = fill_from_pretrained(model)
        if cfg.train.upcycle.enabled:  # the encoder's sizes are known now
            check_upcycle(model, cfg.train.upcycle)
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=data.vocab_size)
    elif model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {model.vocab_size} is smaller than the tokenizer's vocabulary ({data.vocab_size}); "
            "fix: remove model.vocab_size to take it from the data"
        )
    if cfg.task == "classification" and model.num_classes is None:
        model = dataclasses.replace(model, num_classes=data.num_classes)
    return dataclasses.replace(cfg, model=model)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        run_dir: str | None = None,
        resume: str | None = None,
        progress: bool = True,
        hooks: TrainerHooks | None = None,
        restart: bool = False,
    ):
        """``restart``: a launcher restarts this job with no checkpoint to resume from; checkpoints
        already in the run folder are this job's own, written but never committed, and are dropped."""
        self.hooks = hooks or TrainerHooks()
        self._pending_save = None  # a save whose files are still being written (train.async_checkpoint)
        self._restart = restart
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if not torch.cuda.is_available():
            keep_large_allocations()
            limit_onednn_primitive_cache()
        # Everything that can fail without a process group fails here, before DeepSpeed starts:
        # the data, the model config it completes, the run folder and the memory the model needs.
        self.data = build_data(cfg.data, cfg.task)
        self.cfg = _fill_from_data(cfg, self.data)
        if resume is not None and run_dir is None:  # a resumed run continues in its checkpoint's run folder
            self.run_dir = ckpt.resolve_resume(Path(resume)).parent.parent
        else:
            self.run_dir = resolve_run_dir(self.cfg, run_dir)
        launcher_rank = int(os.environ.get("RANK", "0"))
        preflight(self.cfg, self.run_dir, resuming=resume is not None, restart=restart, is_main=launcher_rank == 0)
        check_precision_supported(self.cfg.train.precision)
        check_trackers(self.cfg.train.trackers)
        # Upcycling reads and checks the dense model here, so what does not fit fails before DeepSpeed.
        self._upcycled = self._upcycle(progress and launcher_rank == 0) if self.cfg.train.upcycle.enabled else None
        timeout_s = cfg.parallel.collective_timeout_s
        self.deepspeed = init_distributed(cfg.parallel.backend, timeout_s)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        # Names the operation, step and missing rank when a collective fails (moe/training/watchdog.py).
        self.watchdog = start_watchdog(timeout_s)
        check_world(self.world, cfg.parallel.ep_size)  # the same error `moe plan` gives
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        torch.manual_seed(self.cfg.train.seed)  # every rank builds the same global model, then keeps its shard
        self.model = build_model(self.cfg.model)
        try:
            self.model.set_activation_checkpointing(self.cfg.train.activation_checkpointing)
        except ValueError as err:
            raise ConfigError(f"train.activation_checkpointing: {err}") from None
        self._init_state = None  # fp32 weights the bf16 engine's masters are set from (_init_from)
        if self.cfg.train.init_from or self._upcycled is not None:
            self._init_from(self.cfg.train.init_from)
        self.traffic = TrafficCounter()
        self.ep_group, expert_group = self._shard_experts()
        self.optimizer = torch.optim.AdamW(
            param_groups(
                self.model,
                self.cfg.train.weight_decay,
                expert_group,
                {id(p) for p in self.model.early_exit_parameters()},
            ),
            lr=self.cfg.train.lr,
            betas=self.cfg.train.betas,
        )
        # A step whose loss or gradient norm is not finite applies no update. ZeRO 0: the trainer
        # decides before the engine's step and this guard skips AdamW's step (so weights, moments
        # and AdamW's step count stay as they were). ZeRO 1/2: DeepSpeed's optimizer skips a step
        # whose global gradient norm is not finite itself.
        self._skip_update = False
        self.optimizer.step = self._guarded_step(self.optimizer.step)
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        self._wall_before = 0.0  # training wall time of the run before this process resumed it
        self._fit_started = time.perf_counter()
        t = self.cfg.train
        ds_config = {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            # ZeRO 0: the trainer clips by the norm over all experts itself (DeepSpeed's engine would
            # take each rank's expert shard alone). ZeRO 1/2 clip inside their optimizer, whose norm
            # already sums every partition over the whole data-parallel group.
            "gradient_clipping": t.grad_clip if self.cfg.parallel.zero_stage > 0 else 0.0,
            "zero_optimization": {"stage": self.cfg.parallel.zero_stage},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.cfg.parallel.zero_stage == 2:
            ds_config["zero_optimization"]["contiguous_gradients"] = True  # required by ZeRO-2 with MoE
        if t.precision == "bf16":
            # bf16 weights, activations and gradients; ZeRO's optimizer keeps the fp32 masters and
            # Adam state. Buffers (the routers' aux-free bias, statistics) stay fp32.
            ds_config["bf16"] = {"enabled": True}
        with deepspeed_recognises(MoELayer):
            self.engine, _, _, _ = self.deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, config=ds_config
            )
        # Every group exists now (the launcher's, DeepSpeed's expert groups): all get the timeout.
        apply_collective_timeout(timeout_s)
        watch_all_to_alls(self.model, self.watchdog)
        if self._init_state is not None:
            # The engine made its masters from the bf16 copies; the exported weights are finer.
            set_fp32_masters(self.engine.optimizer, self.model, self._init_state)
        self._init_state = None
        self.start_step = 0
        if resume is not None:
            self._resume(Path(resume))
        elif self.is_main:
            self._prepare_run_dir()
        trackers = []
        if self.is_main and self.cfg.train.trackers:
            name = self.cfg.train.name or self.run_dir.name
            trackers = start_trackers(
                self.cfg.train.trackers, self.run_dir, name, to_dict(self.cfg), resuming=resume is not None
            )
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main, trackers=trackers)

    # --- set-up -------------------------------------------------------------------------------

    def _guarded_step(self, step_fn):
        def step(*args, **kwargs):
            if self._skip_update:
                return None
            return step_fn(*args, **kwargs)

        return step

    def _all_ranks(self, flag: bool) -> bool:
        """``flag`` and the same flag of every other rank (collective when there are several)."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.engine.device)
        with self.watchdog.collective("all_reduce (agreement of all ranks)"):
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item() > 0)

    def _shard_experts(self):
        """Create DeepSpeed's expert-parallel and expert-data-parallel groups and keep this rank's
        experts; returns (expert-parallel group, DeepSpeed group name), or (None, None) without MoE."""
        if not any(isinstance(m, MoELayer) for m in self.model.modules()):
            return None, None
        from deepspeed.utils import groups

        ep_size = self.cfg.parallel.ep_size
        name = f"ep_size_{ep_size}"
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep_size)
        ep_group = groups._get_expert_parallel_group(name)
        shard_experts(self.model, ep_group, name, self.traffic)
        return ep_group, name

    def _upcycle(self, report: bool) -> dict:
        """train.upcycle: the run's model state made from the dense model in train.init_from, or
        from a pretrained encoder's own FFNs (``dynamoe.models.upcycle``); checked against the run's
        model here, before DeepSpeed starts."""
        from dynamoe.models.upcycle import plan, upcycle_state

        path = self.cfg.train.init_from
        if path is None:  # a pretrained encoder's own FFNs
            from dynamoe.models.hf_encoder_moe import dense_encoder

            path = f"{self.cfg.model.pretrained} (model.pretrained)"
            dense_cfg, dense = dense_encoder(self.cfg.model, seed=self.cfg.train.seed)
        else:
            dense_cfg, dense = ckpt.load_init_model(path)
        up = self.cfg.train.upcycle
        state = upcycle_state(dense_cfg, dense.state_dict(), self.cfg.model, up, seed=self.cfg.train.seed, name=path)
        if report:
            print(plan(self.cfg.model, up).describe(), file=sys.stderr)
        return state

    def _init_from(self, path: str | None) -> None:
        """Start from the weights of an exported model (``moe export``) or the upcycled model, before
        experts are sharded."""
        if self._upcycled is not None:  # its names and shapes are checked already
            state, self._upcycled = self._upcycled, None
            self._init_state = state if self.cfg.train.precision != "fp32" else None
            self.model.load_state_dict(state, strict=True)
            return
        exported_cfg, exported = ckpt.load_init_model(path)
        # Settings that only shape the loss or inference (exit weights, policy thresholds, router
        # loss coefficients) may change between runs; the weights must fit exactly.
        state = exported.state_dict()
        # Kept until the engine exists, whose bf16 masters it replaces (see __init__).
        self._init_state = state if self.cfg.train.precision != "fp32" else None
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError:
            hint = ""
            if not any(map(exported_cfg.is_moe_layer, range(exported_cfg.n_layers))) and self.model.moe_layers():
                hint = " (to turn its dense FFNs into this model's experts, set train.upcycle.enabled: true)"
            raise ConfigError(
                f"train.init_from: '{path}' holds a different model ({_config_diff(exported_cfg, self.cfg.model)}); "
                f"fix: use the exported model's settings in the model section{hint}"
                + (" (`moe import FOLDER OUT --config RUN.yaml` writes them)" if Path(path).is_dir() else "")
            ) from None

    def _prepare_run_dir(self) -> None:
        if self._restart:
            for stale in ckpt.list_checkpoints(self.run_dir):
                shutil.rmtree(stale)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        if self.cfg.task == "classification" and self.data.labels is not None:
            (self.run_dir / "labels.json").write_text(json.dumps(self.data.labels.as_dict(), indent=2))
        tokenizer = getattr(self.data, "tokenizer", None)
        if tokenizer is not None:  # loadable by AutoTokenizer; `moe export --format hf` ships it
            save_tokenizer(tokenizer, self.run_dir / TOKENIZER_FOLDER)
        meta = {
            "code_version": _code_version(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "deepspeed": self.deepspeed.__version__,
            "host": platform.node(),
            "world_size": self.world,
            "argv": sys.argv,
        }
        (self.run_dir / "run.json").write_text(json.dumps(meta, indent=2))

    def _resume(self, path: Path) -> None:
        folder = ckpt.resolve_resume(path)
        if ckpt.is_sharded(folder):  # each rank reads only the ranges it holds
            state = load_sharded(
                folder, self.model, self.engine.optimizer, ep_size=self.cfg.parallel.ep_size, device=self.engine.device
            )
            self._resumed_from(state)
            return
        model_state, optim, state = ckpt.load_checkpoint(folder)
        try:
            missing, unexpected = load_full_model_state(self.model, model_state)
        except RuntimeError as err:  # shape mismatches
            missing, unexpected = [str(err).splitlines()[0]], []
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"checkpoint '{folder}' does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                "fix: resume with the config the checkpoint was trained with"
            )
        load_full_optimizer_state(self.engine.optimizer, self.model, optim, state["optimizer_groups"], model_state)
        self._resumed_from(state)

    def _resumed_from(self, state: dict) -> None:
        self.start_step = state["step"]
        self._wall_before = float(state.get("train_wall_s", 0.0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.run_dir, self.start_step)

    # --- the loop -----------------------------------------------------------------------------

    def _micro_batch(self, step: int, micro: int) -> dict:
        t = self.cfg.train
        return self._on_device(
            self.data.train_batch(t.seed, step * t.grad_accum + micro, t.batch_size, self.rank, self.world)
        )

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _tokens(batch: dict) -> int:
        """Tokens (text) or samples (images) in a batch."""
        mask = batch.get("attention_mask")
        if mask is not None:
            return int(mask.sum())
        return batch["input_ids"].numel() if "input_ids" in batch else batch["labels"].shape[0]

    def _set_learning_rates(self, step: int) -> float:
        """The schedule, and two-stage exit training: first the backbone and final head (early
        exits frozen), then the early exits on a frozen backbone, each stage with its own
        warm-up and decay. A learning rate of 0 leaves AdamW's weights exactly as they are."""
        t = self.cfg.train
        exits = self.cfg.model.exits
        if not (exits.enabled and exits.training == "two_stage"):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, t)
            self.model.exit_phase = "joint"
            return lr_at(step, t)
        first = max(1, int(t.steps * exits.stage_one_fraction))
        in_first = step < first
        stage = dataclasses.replace(
            t,
            steps=first if in_first else t.steps - first,
            warmup_steps=min(t.warmup_steps, first if in_first else t.steps - first),
        )
        lr = lr_at(step if in_first else step - first, stage)
        for group in self.optimizer.param_groups:
            trains = group.get("early_exit", False) != in_first
            group["lr"] = lr if trains else 0.0
        self.model.exit_phase = "backbone" if in_first else "exits"
        return lr  # of the parameters this stage trains (the others' is 0)

    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        self.watchdog.step = step + 1  # as logged: the step this one completes
        lr = self._set_learning_rates(step)
        torch.manual_seed(_step_seed(t.seed, step, self.rank))  # dropout and jitter depend on the step only
        self.engine.train()
        self.model.set_depth_progress(step / max(1, t.steps - 1))  # depth schedules (Gumbel temperature)
        self.model.set_training_step(step, t.steps)  # the exit curriculum
        loss_sum = aux_sum = depth_loss_sum = flops = 0.0
        layers = self.model.moe_layers()
        slots = {layer.block_index: j for j, layer in enumerate(layers) if layer.block_index is not None}
        router_losses = torch.zeros(2, len(layers), dtype=torch.float64)  # balance, z per MoE layer
        depth_flops = [0.0, 0.0, 0.0]  # executed block FLOPs, plain-network block FLOPs, rows
        exit_sums = None
        tokens = 0
        loss_finite = True
        for micro in range(t.grad_accum):
            batch = self._micro_batch(step, micro)
            out = self.engine(**batch)
            loss_finite = loss_finite and bool(torch.isfinite(out.total_loss.detach()))
            with self.watchdog.collective("backward (gradient all_reduce)", timed=False):
                self.engine.backward(out.total_loss)
            if micro == t.grad_accum - 1 and self.cfg.parallel.zero_stage == 0:
                # Gradients are complete (and reduced over ranks) only now.
                with self.watchdog.collective("all_reduce (gradient norm of the experts)"):
                    grad_norm = global_grad_norm(self.model, self.ep_group)
                self._skip_update = not (math.isfinite(grad_norm) and self._all_ranks(loss_finite))
                if t.grad_clip > 0 and not self._skip_update:
                    clip_gradients_(self.model, t.grad_clip, grad_norm)
            with self.watchdog.collective("optimizer step (ZeRO reductions and gathers)", timed=False):
                self.engine.step()
            loss_sum += out.loss.item()
            aux_sum += out.aux_loss.item() if out.aux_loss is not None else 0.0
            if out.moe:
                # By block: a layer that a depth mode skipped for every token sends no record.
                where = torch.tensor([slots.get(m.block, j) for j, m in enumerate(out.moe)])
                values = torch.stack([torch.stack([m.aux_loss, m.z_loss]) for m in out.moe], dim=1)
                router_losses.index_add_(1, where, values.detach().double().cpu())
            block_flops = _add_depth(depth_flops, out)
            flops += 3.0 * forward_flops(self.model, out, block_flops)  # forward and backward
            depth_loss_sum += out.depth_loss.item() if out.depth_loss is not None else 0.0
            if out.exit_losses:
                values = torch.stack(out.exit_losses).double().cpu()
                exit_sums = values if exit_sums is None else exit_sums + values
            tokens += self._tokens(batch)
        if self.cfg.parallel.zero_stage > 0:
            grad_norm = float(self.engine.get_global_grad_norm())
            bad = not (math.isfinite(grad_norm) and self._all_ranks(loss_finite))
        else:
            bad = self._skip_update
        self._skip_update = False
        with self.watchdog.collective("all_reduce (router loads)"):
            for layer in self.model.moe_layers():  # a skipped step's routing does not move the bias either
                if bad or self.model.exit_phase == "exits":  # nor does the frozen backbone's, in stage two
                    layer.router.discard_load()
                else:
                    layer.router.update_bias(self.reduce)
        a2a_bytes = self.traffic.reset()
        if self.reduce is not None:  # report the global batch's loss: the mean of equal-sized shards
            sums = torch.tensor([loss_sum, aux_sum, float(a2a_bytes), flops], dtype=torch.float64)
            sums = torch.cat([sums, router_losses.flatten()]).to(self.engine.device)
            with self.watchdog.collective("all_reduce (step metrics)"):
                self.reduce(sums)
            loss_sum, aux_sum = (float(v) / self.world for v in sums[:2])
            a2a_bytes, flops = int(sums[2]), float(sums[3])
            router_losses = sums[4:].cpu().view_as(router_losses) / self.world
        row = {}
        if exit_sums is not None:  # each exit's cross-entropy; with several processes, rank 0's
            row = {f"exit{j}_loss": float(v) / t.grad_accum for j, v in enumerate(exit_sums)}
        if self.cfg.model.depth.enabled:  # rank 0's micro-batches
            row.update(_depth_fields(depth_flops))
            row["depth_loss"] = depth_loss_sum / t.grad_accum
        router_losses = router_losses / t.grad_accum
        for name, (balance, z) in zip(_moe_layer_names(self.model), router_losses.t().tolist()):
            row[f"{name}_balance_loss"] = balance
            row[f"{name}_z_loss"] = z
        return {
            **row,
            "loss": loss_sum / t.grad_accum,
            "aux_loss": aux_sum / t.grad_accum,
            # The routers' load-balancing losses and z-losses, scaled, summed over the MoE layers.
            "balance_loss": float(router_losses[0].sum()),
            "z_loss": float(router_losses[1].sum()),
            "train_flops": flops,  # model FLOPs of the step, all ranks, forward and backward
            "lr": lr,  # as applied (two-stage exit training: the stage's own schedule)
            "tokens": tokens * self.world,
            "grad_norm": grad_norm,  # before clipping
            "skipped": bad,  # the loss or gradient norm was not finite: no update
            "all_to_all_bytes": a2a_bytes,  # token rows sent between ranks, all ranks, fwd + bwd
        }

    @property
    def reduce(self):
        """Sum a tensor over all ranks in place; None in a single process, where there is nothing to sum."""
        return torch.distributed.all_reduce if self.world > 1 else None

    def evaluate_with_balance(self) -> tuple[dict, list]:
        """Validation metrics and the per-layer load balance of exactly that pass, over all ranks."""
        reset_stats(self.model)
        metrics = self.evaluate()
        if self.reduce is not None:
            with self.watchdog.collective("all_reduce (load statistics)"):
                reduce_stats(self.model, self.reduce)
        return metrics, layer_balance(self.model)

    @torch.no_grad()
    def evaluate(self) -> dict:
        with self.watchdog.collective("evaluation", timed=False):
            return self._evaluate()

    def _evaluate(self) -> dict:
        self.engine.eval()
        t = self.cfg.train
        loss_sum, correct, count = 0.0, 0, 0
        classify = self.cfg.task != "lm"
        n_exits = self.model.num_exits
        exit_totals = torch.zeros(n_exits, dtype=torch.float64)  # correct (classification) or loss sums (LM)
        depth_flops = [0.0, 0.0, 0.0]
        for batch in self.data.eval_batches(t.eval_batches, t.batch_size, self.rank, self.world):
            n = batch["labels"].shape[0]
            if n == 0:
                # Nothing left for this rank, but its experts still serve the other ranks' tokens:
                # run a stand-in row through the model and count nothing from it.
                with stats_paused(self.model):
                    self.engine(**self._on_device(next(self.data.eval_batches(t.eval_batches, 1, 0, 1))))
                continue
            batch = self._on_device(batch)
            out = self.engine(**batch)
            labels = batch["labels"]
            # The loss reported is the final head's, comparable with a model without exits.
            final_loss = out.exit_losses[-1] if out.exit_losses else out.loss
            loss_sum += float(final_loss) * n
            count += n
            _add_depth(depth_flops, out)
            if classify:
                correct += int((out.logits.argmax(-1) == labels).sum())
                for j, head in enumerate(out.exits[:n_exits]):
                    exit_totals[j] += float((head.logits.argmax(-1) == labels).sum())
            else:
                for j, value in enumerate(out.exit_losses[:n_exits]):
                    exit_totals[j] += float(value) * n
        totals = torch.cat(
            [
                torch.tensor([loss_sum, float(correct), float(count)], dtype=torch.float64),
                exit_totals,
                torch.tensor(depth_flops, dtype=torch.float64),
            ]
        )
        totals = totals.to(self.engine.device)
        if self.reduce is not None:
            with self.watchdog.collective("all_reduce (evaluation totals)"):
                self.reduce(totals)
        result = {"loss": float(totals[0] / totals[2])}
        if classify:
            result["accuracy"] = float(totals[1] / totals[2])
        for j in range(n_exits):
            result[f"exit{j}_{'accuracy' if classify else 'loss'}"] = float(totals[3 + j] / totals[2])
        if self.cfg.model.depth.enabled:
            result.update(_depth_fields(totals[3 + n_exits :].tolist()))
        return result

    def save(self, step: int) -> Path | None:
        """Write a checkpoint of the whole model and optimizer; collective. Sharded (every rank
        writes what it owns) or full (rank 0 writes the gathered state), per train.checkpoint_format.
        With train.async_checkpoint only the copy to host memory happens here and None is returned;
        the save commits later (:meth:`poll_checkpoint`, :meth:`finish_checkpoint`). Returns the
        committed folder on rank 0, None elsewhere. Weights that are not finite are never written
        (nor allowed to prune a finite checkpoint)."""
        # min and max carry any NaN or infinity, without isfinite's parameter-sized temporaries
        # (which would cost a save more memory than a sharded checkpoint's own writing).
        finite_weights = all(
            bool(torch.isfinite(torch.stack(p.detach().aminmax())).all()) for p in self.model.parameters() if p.numel()
        )
        if not self._all_ranks(finite_weights):
            raise TrainingDiverged(
                f"step {step}: the model's weights are not finite, so no checkpoint was written (the earlier "
                "ones are kept); fix: lower train.lr or raise train.warmup_steps, and resume from the last checkpoint"
            )
        self.finish_checkpoint()  # one save in flight at a time: the previous one commits first
        t, par = self.cfg.train, self.cfg.parallel
        state = {
            "step": step,
            "optimizer_groups": optimizer_groups(self.engine.optimizer, self.model),
            "seed": t.seed,
            "world_size": self.world,
            "ep_size": par.ep_size,
            "zero_stage": par.zero_stage,
            "model_config": to_dict(self.cfg.model),
            "train_wall_s": self._wall_before + time.perf_counter() - self._fit_started,
            "skipped_steps": self.skipped_steps,
        }
        folder = self.run_dir / "checkpoints" / f"step_{step:08d}"
        sharded = t.checkpoint_format == "sharded" or (t.checkpoint_format == "auto" and self.world > 1)
        if sharded:
            self._pending_save = save_sharded(
                folder,
                self.model,
                self.engine.optimizer,
                state,
                ep_size=par.ep_size,
                zero_stage=par.zero_stage,
                device=self.engine.device,
                background=t.async_checkpoint,
            )
        else:
            model_state = full_model_state(self.model, self.ep_group, self.engine.optimizer)
            tensors, _ = full_optimizer_state(self.engine.optimizer, self.model, self.ep_group)
            self._pending_save = start_full_save(
                folder, model_state, tensors, state, device=self.engine.device, background=t.async_checkpoint
            )
        return None if t.async_checkpoint else self.finish_checkpoint()

    def finish_checkpoint(self) -> Path | None:
        """Wait for the save in flight, if any, and commit it; collective. Calls the checkpoint hook
        and prunes old checkpoints; returns the committed folder on rank 0."""
        pending, self._pending_save = self._pending_save, None
        if pending is None:
            return None
        folder = pending.finish()  # every rank raises the same CheckpointError if any rank failed
        if self.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        self.hooks.on_checkpoint(pending.step, folder)
        return folder

    def poll_checkpoint(self) -> None:
        """Commit the save in flight once every rank has written its files (collective: one
        all-reduce of a flag while a save is in flight, nothing otherwise)."""
        if self._pending_save is not None and self._all_ranks(self._pending_save.ready()):
            self.finish_checkpoint()

    def _count_bad_step(self, step: int, row: dict, bar) -> None:
        """Count a skipped step; stop once ``train.max_bad_steps`` come in a row."""
        bad = row.pop("skipped")
        self.skipped_steps += int(bad)
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if bad else 0
        row["skipped_steps"] = self.skipped_steps  # in the whole run so far
        if not bad:
            return
        message = f"step {step + 1}: loss {row['loss']:.4g}, gradient norm {row['grad_norm']:.4g}: step skipped"
        if bar is not None:
            bar.write(message)
        elif self.is_main:
            print(message, file=sys.stderr)
        t = self.cfg.train
        if self.bad_steps_in_a_row >= t.max_bad_steps:
            self.metrics.write(step + 1, "train", row)
            raise TrainingDiverged(
                f"training stopped at step {step + 1}: the loss or gradient norm was not finite for "
                f"{self.bad_steps_in_a_row} steps in a row (train.max_bad_steps={t.max_bad_steps}); no checkpoint "
                f"was written since; fix: lower train.lr (now {t.lr:g}), raise train.warmup_steps (now "
                f"{t.warmup_steps}) or keep train.grad_clip > 0 (now {t.grad_clip:g}), then resume from the last "
                "checkpoint with --resume"
            )

    def fit(self) -> TrainResult:
        t = self.cfg.train
        losses: dict[int, float] = {}
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)
        started = self._fit_started = time.perf_counter()
        window_tokens, window_flops, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
        peak = device_peak_tflops(t.peak_tflops)
        last_eval: dict = {}
        for step in range(self.start_step, t.steps):
            row = self.train_step(step)
            losses[step] = row["loss"]
            window_tokens += row.pop("tokens")
            window_flops += row.pop("train_flops")
            window_steps += 1
            self._count_bad_step(step, row, bar)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                elapsed = time.perf_counter() - window_start
                row.update(window_fields(window_steps, elapsed, window_tokens, window_flops, self.world, peak))
                with self.watchdog.collective("all_reduce (load statistics)"):
                    row.update(_moe_log_fields(self.model, self.reduce))
                self.metrics.write(done, "train", row)
                with self.watchdog.collective("launcher report (metrics)", timed=False):
                    self.hooks.on_log(done, row)
                window_tokens, window_flops, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
                if bar is not None:
                    postfix = {
                        "loss": f"{row['loss']:.3f}",
                        "tok_s": f"{row['tokens_per_s']:.0f}",
                        "step_s": f"{row['step_time_s']:.3f}",
                    }
                    if row["mfu"] is not None:
                        postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
                    bar.set_postfix(**postfix)
            if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                last_eval = self.evaluate()
                self.metrics.write(done, "eval", last_eval)
                if bar is not None:
                    bar.write(f"step {done}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in last_eval.items()))
            # Not while steps are being skipped: a checkpoint then would only prune a good one.
            if (
                t.checkpoint_every
                and done % t.checkpoint_every == 0
                and done != t.steps
                and not self.bad_steps_in_a_row
            ):
                with self.watchdog.collective(f"checkpoint of step {done}", timed=False):
                    self.save(done)
            self.poll_checkpoint()
            self.hooks.after_step(done)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        wall = self._wall_before + time.perf_counter() - started  # the whole run's, resumed or not
        # Final evaluation doubles as the load-balance pass.
        final, balance = self.evaluate_with_balance()
        self.metrics.write(t.steps, "eval", final)
        self.save(t.steps)
        self.finish_checkpoint()  # an asynchronous save is committed before training returns
        baseline = self.data.unigram_loss() if self.cfg.task == "lm" else None
        if self.is_main:
            summary = {
                "final_eval": final,
                "train_wall_s": wall,
                "steps": t.steps,
                "unigram_baseline_loss": baseline,
                "load_balance": [b.as_dict() for b in balance],
            }
            (self.run_dir / "summary.json").write_text(json.dumps(finite(summary), indent=2, allow_nan=False))
        self.metrics.close()
        return TrainResult(self.run_dir, t.steps, wall, losses, final, balance, baseline)


def _config_diff(a, b) -> str:
    da, db = to_dict(a), to_dict(b)

    def walk(x, y, prefix):
        for key in x:
            if isinstance(x[key], dict):
                yield from walk(x[key], y[key], f"{prefix}{key}.")
            elif x[key] != y[key]:
                yield f"model.{prefix}{key}: {x[key]!r} there, {y[key]!r} here"

    return "; ".join(list(walk(da, db, ""))[:3])


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_973 + rank) % (2**63 - 1)


def _moe_layer_names(model: torch.nn.Module) -> list[str]:
    """Metric name of each MoE layer, in depth order: ``block<i>`` after the block it sits in."""
    return [
        f"moe{j}" if layer.block_index is None else f"block{layer.block_index}"
        for j, layer in enumerate(model.moe_layers())
    ]


def _moe_log_fields(model: torch.nn.Module, reduce=None) -> dict:
    """Per-layer load of all ranks since the last log, then reset: max/mean load, dropped
    assignments and tokens per expert, each series named by the layer's block."""
    if reduce is not None:
        reduce_stats(model, reduce)
    fields = {}
    for name, row in zip(_moe_layer_names(model), layer_balance(model)):
        fields[f"{name}_max_over_mean"] = row.max_over_mean
        fields[f"{name}_dropped_fraction"] = row.dropped_fraction
        fields[f"{name}_counts"] = row.counts
    reset_stats(model)
    return fields


def _add_depth(sums: list[float], out) -> float:
    """Add one forward pass's executed and plain-network block FLOPs and rows to ``sums``; returns
    the executed block FLOPs (0 for a model without depth records)."""
    summary = depth_summary(out.depth)
    if not summary:
        return 0.0
    sums[0] += summary["flops"]
    sums[1] += summary["full_flops"]
    sums[2] += float(out.depth[0].rows)
    return summary["flops"]


def _depth_fields(sums: list[float]) -> dict:
    """Compute per token (sample, for images) of the blocks and its share of the plain network's."""
    flops, full, rows = sums
    return {
        "depth_compute_fraction": flops / full if full else 1.0,
        "depth_flops_per_token": flops / rows if rows else 0.0,
    }


def train(
    cfg: RunConfig, *, run_dir: str | None = None, resume: str | None = None, progress: bool = True
) -> TrainResult:
    """Train ``cfg`` to completion (or continue from ``resume``) and return the summary."""
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume, progress=progress)
    result = trainer.fit()
    if trainer.is_main and progress:
        print(format_summary(trainer.cfg, result))
    return result


def format_summary(cfg: RunConfig, result: TrainResult) -> str:
    lines = [f"run folder: {result.run_dir}", f"trained {result.steps} steps in {result.wall_s:.1f} s"]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items())
    lines.append(f"final validation: {metrics}")
    if result.baseline_loss is not None:
        lines.append(f"unigram baseline validation loss: {result.baseline_loss:.4f}")
    lines.append("")
    lines.append("load balance per MoE layer (final validation pass):")
    lines.append(format_balance_table(result.balance))
    return "\n".join(lines)
