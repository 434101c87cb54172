"""Nothing lost, nothing silent: bad input is refused early with a named error and a fix, a
diverging run stops without overwriting good checkpoints, and run files survive torn writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dynamoe.config import ConfigError, load_config
from dynamoe.training import checkpoint as ckpt
from dynamoe.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from dynamoe.training.preflight import check_memory, check_run_dir, count_parameters

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.steps=4", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2", "train.warmup_steps=1"]


def moe(*args, cwd=None, timeout=300):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "dynamoe", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out, time.perf_counter() - start


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("train.lr=.inf", "train.lr", "finite"),
        ("train.lr=.nan", "train.lr", "finite"),
        ("train.betas=[0.9, 1.5]", "train.betas", "outside [0, 1)"),
        ("train.betas=[-0.1, 0.9]", "train.betas", "outside [0, 1)"),
        ("train.run_dir=runs/{user}", "train.run_dir", "placeholder {user}"),
        ("train.run_dir=runs/{name.__class__}", "train.run_dir", "placeholder"),
        ("train.max_bad_steps=0", "train.max_bad_steps", "at least 1"),
        ("data.num_classes=0", "data.num_classes", "positive"),
    ],
)
def test_bad_settings_are_refused_with_the_field_and_a_fix(override, field, words):
    with pytest.raises(ConfigError, match=field) as err:
        load_config("debug_tiny", [override])
    assert words in str(err.value) and "fix:" in str(err.value)


def test_empty_and_binary_config_files_are_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing here\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(str(empty))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(str(binary))


def test_a_warm_up_longer_than_the_run_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="clamped to 3"):
        cfg = load_config("debug_tiny", ["train.steps=3", "train.warmup_steps=50"])
    assert cfg.train.warmup_steps == 3


# --- the command line: one line, exit code 2, before DeepSpeed -----------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lr=.nan"], "train.lr: must be a finite number"),
        (["--set", "data.path=/does/not/exist"], "data.path"),
        (
            ["--set", "model.d_model=16384", "--set", "model.d_ff=65536", "--set", "model.n_layers=64"],
            "model: training needs about",
        ),
    ],
)
def test_errors_are_one_line_exit_2_and_fast(args, message):
    out, seconds = moe("train", "debug_tiny", *args, "--quiet")
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "fix:" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert seconds < 30  # well before any DeepSpeed start-up (generous for a loaded CI machine)


def test_debug_shows_the_traceback():
    out, _ = moe("--debug", "train", "debug_tiny", "--set", "train.lr=.nan", "--quiet")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_a_run_folder_that_cannot_be_written_is_refused_before_deepspeed(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out, _ = moe("train", "debug_tiny", "--run-dir", str(blocker / "run"), "--quiet")
    assert out.returncode == 2 and "cannot write to" in out.stderr and "fix:" in out.stderr
    assert "DeepSpeed" not in out.stderr  # refused before DeepSpeed was imported


def test_binary_data_given_as_text_is_a_named_error(tmp_path):
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    out, _ = moe("train", "debug_tiny", "--set", f"data.path={binary}", "--run-dir", str(tmp_path / "r"), "--quiet")
    assert out.returncode == 2 and "not UTF-8 text" in out.stderr, out.stderr


# --- pre-flight checks, directly -----------------------------------------------------------------


def test_memory_check_counts_experts_sharded_over_ep_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_memory(1000, 800, 1, available=16 * 1000)  # exactly fits
    with pytest.raises(ConfigError, match="training needs about"):
        check_memory(1000, 800, 1, available=16 * 1000 - 1)
    check_memory(1000, 800, 4, available=16 * 400)  # 200 dense + 800 / 4 experts
    cfg = load_config("debug_tiny", ["model.vocab_size=65"]).model
    total, experts = count_parameters(cfg)
    from dynamoe.models import build_model

    model = build_model(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert 0 < experts < total


def test_run_dir_checks_disk_room_and_removes_partial_saves(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004.partial").mkdir(parents=True)
    with pytest.warns(UserWarning, match="cut short"):
        check_run_dir(run, resuming=False, restart=False, checkpoint_bytes=1000)
    assert not (run / "checkpoints" / "step_00000004.partial").exists()
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match="free and one checkpoint needs"):
        check_run_dir(run, resuming=False, restart=False, checkpoint_bytes=10**6)


# --- checkpoints ---------------------------------------------------------------------------------


def _state():
    return {"model_state": {"w": torch.ones(3)}, "optim_tensors": {"m": torch.zeros(3)}, "trainer_state": {"step": 2}}


def test_a_failed_save_leaves_no_partial_folder_and_keeps_older_checkpoints(tmp_path, monkeypatch):
    run = tmp_path / "run"
    good = ckpt.save_checkpoint(run / "checkpoints" / "step_00000002", **_state())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device") as err:
        ckpt.save_checkpoint(run / "checkpoints" / "step_00000004", **_state())
    assert "fix:" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    ckpt.verify_checkpoint(good)


def test_a_manifest_without_file_entries_is_refused(tmp_path):
    folder = ckpt.save_checkpoint(tmp_path / "checkpoints" / "step_00000002", **_state())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="lists no entry for"):
        ckpt.verify_checkpoint(folder)


def test_export_skips_a_corrupt_newer_checkpoint_and_says_which_step(tmp_path):
    from dynamoe.config import to_dict

    cfg = load_config("debug_tiny", ["model.vocab_size=65"])
    from dynamoe.models import build_model

    state = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    for step in (2, 4):
        ckpt.save_checkpoint(
            tmp_path / "checkpoints" / f"step_{step:08d}",
            model_state=state,
            optim_tensors={},
            trainer_state={"step": step, "model_config": to_dict(cfg.model)},
        )
    (tmp_path / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"torn")
    result = ckpt.export_model(tmp_path, tmp_path / "out" / "model.safetensors")
    assert result.step == 2 and [p.name for p, _ in result.skipped] == ["step_00000004"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="cannot write"):
        ckpt.export_model(tmp_path, blocker / "model.safetensors")


# --- metrics files ------------------------------------------------------------------------------


def test_metrics_are_strict_json_and_a_torn_last_line_is_dropped(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, "train", {"loss": float("nan"), "grad_norm": float("inf"), "counts": [1, 2]})
    writer.write(2, "train", {"loss": 1.5})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all("NaN" not in line and "Infinity" not in line for line in lines)
    assert json.loads(lines[0])["loss"] is None
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tr')  # a write cut short
    with pytest.warns(UserWarning, match="torn last line"):
        rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    with pytest.warns(UserWarning, match="torn last line"):
        truncate_metrics(tmp_path, 1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    # A resumed writer starts on a fresh line after a torn one.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9')
    with pytest.warns(UserWarning, match="torn last line"):
        writer = MetricsWriter(tmp_path)
    writer.write(2, "train", {"loss": 1.0})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# --- a diverging run -----------------------------------------------------------------------------


def test_a_diverging_run_skips_steps_stops_with_a_named_error_and_keeps_good_checkpoints(tmp_path):
    from dynamoe.training.trainer import Trainer, TrainingDiverged

    cfg = load_config(
        "debug_tiny",
        TINY
        + [
            "train.steps=40",
            "train.checkpoint_every=1",
            "train.max_bad_steps=3",
            "train.lr=1e3",
            "train.warmup_steps=4",
            "train.keep_checkpoints=2",
        ],
    )
    trainer = Trainer(cfg, run_dir=str(tmp_path), progress=False)
    with pytest.raises(TrainingDiverged, match=r"not finite for 3 steps in a row.*fix: lower train.lr"):
        trainer.fit()
    rows = read_metrics(tmp_path, "train")
    skipped = [r for r in rows if r.get("skipped_steps")]
    assert skipped and skipped[-1]["skipped_steps"] >= 3
    assert any(r["grad_norm"] is None or r["loss"] is None for r in skipped)
    # Every checkpoint left is finite, and the last good step's is among them.
    kept = ckpt.list_checkpoints(tmp_path)
    assert kept
    for folder in kept:
        model_state, _, _ = ckpt.load_checkpoint(folder)
        assert all(torch.isfinite(v).all() for v in model_state.values())
    first_bad = min(r["step"] for r in skipped)
    assert int(kept[-1].name.split("_")[1]) < first_bad
    # Skipped steps changed nothing: the weights equal the last checkpoint's.
    model_state, _, _ = ckpt.load_checkpoint(kept[-1])
    live = trainer.model.state_dict()
    assert all(torch.equal(live[k], v) for k, v in model_state.items() if k in live)


def test_under_zero_1_a_non_finite_step_is_skipped_too(tmp_path):
    from dynamoe.training.trainer import Trainer, TrainingDiverged

    cfg = load_config(
        "debug_tiny",
        TINY
        + [
            "train.steps=30",
            "train.checkpoint_every=0",
            "train.max_bad_steps=2",
            "train.lr=1e3",
            "train.warmup_steps=2",
            "parallel.zero_stage=1",
        ],
    )
    trainer = Trainer(cfg, run_dir=str(tmp_path), progress=False)
    with pytest.raises(TrainingDiverged, match="2 steps in a row"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = read_metrics(tmp_path, "train")
    assert rows[-1]["skipped_steps"] >= 2


def test_a_safetensors_write_error_is_a_checkpoint_error_too(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def failing(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / "step_00000002", **_state())
    assert not list((tmp_path / "checkpoints").iterdir())


def test_a_whole_last_metrics_line_without_its_newline_is_kept(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "train"}')
    writer = MetricsWriter(tmp_path)
    writer.write(3, "train", {"loss": 1.0})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_skipped_step_discards_the_routing_load_of_the_aux_free_bias():
    from dynamoe.config import RouterConfig
    from dynamoe.layers.router import build_router

    router = build_router(RouterConfig(top_k=1, aux_free_bias=True), 8, 4).train()
    router(torch.randn(16, 8))
    assert router.load_since_update.sum() == 16
    router.discard_load()
    router.update_bias()
    assert torch.equal(router.expert_bias, torch.zeros(4))  # nothing counted: no move
