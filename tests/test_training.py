"""Training on the DeepSpeed engine (CPU, gloo, one process): loss goes down, resume is exact,
the run folder holds what it promises, and bad checkpoints are refused."""

import json
import shutil

import pytest
import torch
import yaml

from dynamoe.config import ConfigError, load_config
from dynamoe.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from dynamoe.training.trainer import lr_at, train

TINY = ["train.log_every=1", "train.eval_every=0"]


def test_a_few_steps_lower_the_loss(tmp_path):
    cfg = load_config(
        "debug_tiny", TINY + ["train.steps=60", "train.batch_size=16", "train.lr=1e-2", "train.checkpoint_every=0"]
    )
    result = train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    first = sum(result.train_losses[s] for s in range(3)) / 3
    last = sum(result.train_losses[s] for s in range(57, 60)) / 3
    assert last < first - 0.5, (first, last)
    assert result.final_eval["loss"] < result.baseline_loss  # beats the unigram model already


def test_run_folder_holds_config_metrics_tensorboard_and_balance(tmp_path):
    cfg = load_config("debug_tiny", ["train.eval_every=4"])
    run = tmp_path / "run"
    result = train(cfg, run_dir=str(run), progress=False)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["vocab_size"] == 65  # filled in from the data
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    # Per-layer series are named by the block the MoE layer sits in (debug_tiny: MoE in both blocks).
    for r in train_rows:
        assert r["tokens_per_s"] > 0 and {"block0_max_over_mean", "block1_counts"} <= set(r)
        assert r["block0_balance_loss"] + r["block1_balance_loss"] == pytest.approx(r["balance_loss"], rel=1e-9)
        assert r["block0_z_loss"] + r["block1_z_loss"] == pytest.approx(r["z_loss"], rel=1e-9)
        assert r["block0_z_loss"] > 0 and r["block0_z_loss"] != r["block1_z_loss"]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [4, 8]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["load_balance"]) == 2  # two MoE layers
    for layer in result.balance:
        # The final pass: every validation token routed to top-2 of 4 experts, nothing dropped.
        assert sum(layer.counts) == layer.tokens * 2
        assert layer.dropped_fraction == 0.0
        assert 1.0 <= layer.max_over_mean <= 4.0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008"]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "model.dropout=0.1",
            "model.moe.router.jitter_eps=0.05",
            "model.moe.router.aux_free_bias=true",
            "train.grad_accum=2",
        ],
    ],
)
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, extra):
    cfg = load_config("debug_tiny", TINY + ["train.steps=10", "train.checkpoint_every=4"] + extra)
    full = train(cfg, run_dir=str(tmp_path / "full"), progress=False)
    # Only the newest two checkpoints are kept; resume from a copy of the step-8 one in a new folder.
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step_00000008", "step_00000010"]
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000008", resumed_dir / "step_00000008")
    resumed = train(cfg, resume=str(resumed_dir / "step_00000008"), progress=False)
    assert sorted(resumed.train_losses) == [8, 9]
    for step in (8, 9):
        assert resumed.train_losses[step] == full.train_losses[step]
    assert resumed.final_eval == full.final_eval
    model_full, _, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000010")
    model_resumed, _, _ = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000010")
    for name, tensor in model_full.items():
        assert torch.equal(tensor, model_resumed[name]), name


def test_resume_latest_continues_in_the_same_folder(tmp_path):
    run = tmp_path / "run"
    short = load_config("debug_tiny", TINY + ["train.steps=4", "train.warmup_steps=1"])
    train(short, run_dir=str(run), progress=False)
    longer = load_config("debug_tiny", TINY + ["train.steps=6", "train.warmup_steps=1"])
    result = train(longer, resume=str(run), progress=False)
    assert sorted(result.train_losses) == [4, 5]
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing logged twice


def test_a_run_folder_with_checkpoints_is_not_overwritten(tmp_path):
    cfg = load_config("debug_tiny", TINY + ["train.steps=2", "train.warmup_steps=1"])
    train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, run_dir=str(tmp_path / "run"), progress=False)


def test_corrupt_and_partial_checkpoints_are_refused(tmp_path):
    cfg = load_config("debug_tiny", TINY + ["train.steps=2", "train.warmup_steps=1"])
    train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    folder = list_checkpoints(tmp_path / "run")[-1]
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg, resume=str(folder), progress=False)
    weights.write_bytes(data)
    (folder / "manifest.json").unlink()  # the commit marker never got written
    with pytest.raises(CheckpointError, match="incomplete"):
        train(cfg, resume=str(folder), progress=False)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = load_config("debug_tiny", TINY + ["train.steps=2", "train.warmup_steps=1"])
    train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    wider = load_config("debug_tiny", TINY + ["train.steps=4", "train.warmup_steps=1", "model.moe.num_experts=2"])
    with pytest.raises((CheckpointError, RuntimeError), match="checkpoint|size mismatch"):
        train(wider, resume=str(tmp_path / "run"), progress=False)


def test_learning_rate_schedule_warms_up_then_decays():
    cfg = load_config("quickstart").train
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lrs[cfg.warmup_steps - 1] == pytest.approx(cfg.lr)
    assert max(lrs) == pytest.approx(cfg.lr)
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[cfg.warmup_steps :], lrs[cfg.warmup_steps + 1 :]))


def test_expert_parallel_size_must_divide_the_processes(tmp_path):
    with pytest.raises(ConfigError, match="parallel.ep_size: 2 does not divide the number of processes"):
        train(load_config("debug_tiny", ["parallel.ep_size=2"]), run_dir=str(tmp_path / "a"), progress=False)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_train_and_resume_exactly(tmp_path, stage):
    cfg = load_config(
        "debug_tiny", TINY + ["train.steps=6", "train.checkpoint_every=3", f"parallel.zero_stage={stage}"]
    )
    full = train(cfg, run_dir=str(tmp_path / "full"), progress=False)
    resumed = train(cfg, resume=str(tmp_path / "full" / "checkpoints" / "step_00000003"), progress=False)
    for step in (3, 4, 5):
        assert resumed.train_losses[step] == pytest.approx(full.train_losses[step], abs=1e-6)


def test_encoder_classifier_trains_on_sst2(tmp_path):
    cfg = load_config(
        "sst2_moe_classifier",
        TINY
        + [
            "data.tokenizer=char",
            "data.seq_len=32",
            "data.max_train_samples=256",
            "model.max_seq_len=32",
            "model.d_model=32",
            "model.n_layers=2",
            "model.moe.d_expert=32",
            "model.d_ff=64",
            "model.n_heads=2",
            "train.steps=6",
            "train.warmup_steps=1",
            "train.batch_size=16",
            "train.checkpoint_every=0",
        ],
    )
    result = train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    assert 0.0 <= result.final_eval["accuracy"] <= 1.0
    assert result.balance[0].tokens > 0
    assert sum(result.balance[0].counts) == 2 * result.balance[0].tokens


def test_a_restarted_job_drops_its_own_uncommitted_checkpoints(tmp_path):
    cfg = load_config("debug_tiny", TINY + ["train.steps=2", "train.warmup_steps=1"])
    first = train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    from dynamoe.training.trainer import Trainer

    restarted = Trainer(cfg, run_dir=str(tmp_path / "run"), progress=False, restart=True).fit()
    assert restarted.train_losses == first.train_losses
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_per_layer_series_are_named_by_block_index(tmp_path):
    cfg = load_config("debug_tiny", TINY + ["train.steps=2", "model.n_layers=4", "model.moe_every=2"])
    result = train(cfg, run_dir=str(tmp_path), progress=False)
    blocks = [i for i in range(4) if cfg.model.is_moe_layer(i)]
    assert len(blocks) == 2 and [b.block for b in result.balance] == blocks
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-2]
    for block in range(4):
        named = {f"block{block}_{k}" for k in ("balance_loss", "z_loss", "max_over_mean", "counts")}
        assert named <= set(row) if block in blocks else not named & set(row)
