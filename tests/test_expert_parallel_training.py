"""Expert-parallel training through `moe train` under torchrun (CPU, gloo): the losses do not
depend on the expert-parallel size or ZeRO stage, and checkpoints reshard across EP sizes."""

import shutil

import pytest
import torch

from dynamoe.training.checkpoint import export_model, load_checkpoint, load_exported

from dist_helper import SAME_AT_ANY_WORLD_SIZE, torchrun_train, train_metrics

pytestmark = pytest.mark.distributed

STEPS20 = [
    "--set",
    "train.steps=20",
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.checkpoint_every=0",
    "--set",
    "train.batch_size=2",
]


@pytest.fixture(scope="module")
def ep1_losses(tmp_path_factory):
    run = tmp_path_factory.mktemp("ep1")
    torchrun_train(2, "debug_tiny", "--run-dir", str(run), *STEPS20, "--set", "parallel.ep_size=1")
    return train_metrics(run), train_metrics(run, key="grad_norm")


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_ep2_trains_like_ep1(tmp_path, ep1_losses, zero_stage):
    torchrun_train(
        2,
        "debug_tiny",
        "--run-dir",
        str(tmp_path),
        *STEPS20,
        "--set",
        "parallel.ep_size=2",
        "--set",
        f"parallel.zero_stage={zero_stage}",
    )
    losses, norms = ep1_losses
    got, got_norms = train_metrics(tmp_path), train_metrics(tmp_path, key="grad_norm")
    assert sorted(got) == list(range(1, 21))
    for step in losses:
        assert got[step] == pytest.approx(losses[step], abs=1e-4), step
        # The clipping norm covers every expert shard: the same as with the experts replicated.
        assert got_norms[step] == pytest.approx(norms[step], rel=1e-4), step


RESHARD = [*SAME_AT_ANY_WORLD_SIZE, "--set", "train.checkpoint_every=2"]


def _tensors(folder):
    model, optim, state = load_checkpoint(folder)
    return model, optim, state


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoints_reshard_across_expert_parallel_sizes(tmp_path):
    source = tmp_path / "ep2"
    torchrun_train(
        2,
        "debug_tiny",
        "--run-dir",
        str(source),
        *RESHARD,
        "--set",
        "train.steps=6",
        "--set",
        "train.batch_size=2",
        "--set",
        "parallel.ep_size=2",
    )
    saved = source / "checkpoints" / "step_00000004"
    model, optim, state = _tensors(saved)
    assert model["blocks.0.ffn.experts.w1_EDF"].shape[0] == 4  # global experts 0..3, not a shard
    assert optim["exp_avg/blocks.0.ffn.experts.w1_EDF"].shape[0] == 4
    assert state["ep_size"] == 2
    reference = train_metrics(source)
    _, exported = load_exported(export_model(saved, tmp_path / "model.safetensors").path)
    _assert_same_tensors(model, exported.state_dict())  # one file, every global expert

    for nproc, batch, zero in ((1, 4, 0), (4, 1, 0), (4, 1, 2)):
        # Load with another EP size and save again at once: every weight and moment survives exactly.
        round_trip = tmp_path / f"rt_ep{nproc}_zero{zero}" / "checkpoints"
        shutil.copytree(saved, round_trip / saved.name)
        torchrun_train(
            nproc,
            "debug_tiny",
            "--resume",
            str(round_trip / saved.name),
            *RESHARD,
            "--set",
            "train.steps=4",
            "--set",
            f"train.batch_size={batch}",
            "--set",
            f"parallel.ep_size={nproc}",
            "--set",
            f"parallel.zero_stage={zero}",
        )
        again_model, again_optim, _ = _tensors(round_trip / saved.name)
        _assert_same_tensors(model, again_model)
        _assert_same_tensors(optim, again_optim)

        if zero:
            continue
        # Resume training with the other EP size: the same losses as the uninterrupted EP=2 run.
        resumed = tmp_path / f"resumed_ep{nproc}" / "checkpoints"
        shutil.copytree(saved, resumed / saved.name)
        torchrun_train(
            nproc,
            "debug_tiny",
            "--resume",
            str(resumed / saved.name),
            *RESHARD,
            "--set",
            "train.steps=6",
            "--set",
            f"train.batch_size={batch}",
            "--set",
            f"parallel.ep_size={nproc}",
        )
        got = train_metrics(resumed.parent)
        for step in (5, 6):
            assert got[step] == pytest.approx(reference[step], abs=1e-4), (nproc, step)


def test_the_deepspeed_launcher_runs_expert_parallel_training(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from dist_helper import clean_env, free_port

    repo = Path(__file__).resolve().parent.parent
    env = {**clean_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "dynamoe.launch.cli",
        "train",
        "debug_tiny",
        "--quiet",
        "--run-dir",
        str(tmp_path),
        "--set",
        "parallel.ep_size=2",
        "--set",
        "train.steps=4",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.log_every=1",
    ]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(train_metrics(tmp_path)) == [1, 2, 3, 4]
    assert all(v > 0 for v in train_metrics(tmp_path, key="all_to_all_bytes").values())
