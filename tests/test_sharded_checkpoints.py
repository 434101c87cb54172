"""Sharded checkpoints (moe/training/checkpoint_sharded.py): every rank writes what it owns; the
files tile every global tensor exactly; they hold the same tensors as the full format, reshard to
other world sizes, ep_size and ZeRO stages, resume bit for bit (also when written asynchronously),
refuse bad input with the tensor or file named, and a rank's memory while saving stays within its
own shard plus a small buffer."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dynamoe.config import load_config
from dynamoe.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, verify_checkpoint
from dynamoe.training.checkpoint_files import (
    Piece,
    ShardedReader,
    build_index,
    rank_file,
    write_pieces,
)
from dynamoe.training.trainer import train

from dist_helper import SAME_AT_ANY_WORLD_SIZE, torchrun_train, train_metrics

FAST = ["train.log_every=1", "train.eval_every=0", "train.warmup_steps=1"]


# --- the file format ------------------------------------------------------------------------


def test_pieces_are_standard_safetensors_and_the_hash_is_the_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    pieces = [
        Piece("model/w", 7, torch.randn(13, generator=g)),
        Piece("optim/exp_avg/w", 0, torch.randn(5, generator=g).bfloat16()),
        Piece("model/ids", 3, torch.arange(4)),
        Piece("model/mask", 0, torch.tensor([True, False, True])),
        Piece("model/empty", 0, torch.empty(0)),
    ]
    stored = write_pieces(tmp_path / "r.safetensors", pieces, {"format": "x"})
    data = (tmp_path / "r.safetensors").read_bytes()
    import hashlib

    assert stored == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "x"}
        for piece in pieces:
            assert torch.equal(f.get_tensor(piece.key), piece.tensor), piece.key


def _tile(tmp_path, full: torch.Tensor, cuts: list[int]) -> ShardedReader:
    """``full`` stored as the pieces between ``cuts``, each in the file of its own rank."""
    flat = full.reshape(-1)
    bounds = [0, *cuts, flat.numel()]
    placed = []
    for rank, (a, b) in enumerate(zip(bounds, bounds[1:])):
        write_pieces(tmp_path / rank_file(rank), [Piece("model/t", a, flat[a:b])])
        placed.append((rank_file(rank), "model/t", a, b - a))
    metas = {"model/t": {"shape": list(full.shape), "dtype": "float32"}}
    index = build_index(metas, placed, {"model/alias": "model/t"}, {"world_size": len(placed)})
    (tmp_path / "index.json").write_text(json.dumps(index))
    return ShardedReader(tmp_path)


def test_any_range_reads_across_pieces_and_files(tmp_path):
    full = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(1))
    reader = _tile(tmp_path, full, cuts=[7, 40])  # pieces [0, 7), [7, 40), [40, 90)
    flat = full.reshape(-1)
    for start, numel in [(0, 90), (0, 1), (6, 2), (7, 33), (39, 2), (5, 80), (89, 1), (30, 0)]:
        assert torch.equal(reader.read("model/t", start, numel), flat[start : start + numel]), (start, numel)
    assert torch.equal(reader.read_rows("model/t", 2, 3), full[2:5])
    assert torch.equal(reader.read_full("model/alias"), full)  # a tied name reads its target
    with pytest.raises(CheckpointError, match="elements"):
        reader.read("model/t", 80, 20)
    reader.close()


def test_the_index_refuses_pieces_that_do_not_tile_a_tensor():
    metas = {"model/w": {"shape": [4, 2], "dtype": "float32"}}
    with pytest.raises(ValueError, match="model/w: a gap at element 3"):
        build_index(metas, [("a", "model/w", 0, 3), ("b", "model/w", 4, 4)], {}, {})
    with pytest.raises(ValueError, match="model/w: a overlap"):
        build_index(metas, [("a", "model/w", 0, 5), ("b", "model/w", 4, 4)], {}, {})
    with pytest.raises(ValueError, match="hold 6 of its 8"):
        build_index(metas, [("a", "model/w", 0, 6)], {}, {})


# --- one process: equal to the full format, exact resume, async, bad input --------------------


CASES = {
    "fp32_zero0": [],
    "bf16_zero1": ["train.precision=bf16", "parallel.zero_stage=1"],  # masters from ZeRO's fragments
}


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_full_and_resumes_exactly(tmp_path, case):
    common = FAST + CASES[case] + ["train.steps=4", "train.checkpoint_every=2", "model.moe.router.aux_free_bias=true"]
    full_cfg = load_config("debug_tiny", common + ["train.checkpoint_format=full"])
    full = train(full_cfg, run_dir=str(tmp_path / "f"), progress=False)
    sharded_cfg = load_config("debug_tiny", common + ["train.checkpoint_format=sharded"])
    sharded = train(sharded_cfg, run_dir=str(tmp_path / "s"), progress=False)
    assert full.train_losses == sharded.train_losses
    for step in ("step_00000002", "step_00000004"):
        folder = tmp_path / "s" / "checkpoints" / step
        assert sorted(p.name for p in folder.iterdir()) == [
            "index.json",
            "manifest.json",
            "rank00000.safetensors",
            "trainer.json",
        ]
        _assert_same_checkpoint(tmp_path / "f" / "checkpoints" / step, folder)
    resumed_dir = tmp_path / "r" / "checkpoints"
    shutil.copytree(tmp_path / "s" / "checkpoints" / "step_00000002", resumed_dir / "step_00000002")
    resumed = train(sharded_cfg, resume=str(resumed_dir / "step_00000002"), progress=False)
    assert resumed.train_losses == {s: v for s, v in sharded.train_losses.items() if s >= 2}
    _assert_same_checkpoint(tmp_path / "s" / "checkpoints" / "step_00000004", resumed_dir / "step_00000004")


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    (a_model, a_optim, a_state), (b_model, b_optim, b_state) = load_checkpoint(a), load_checkpoint(b)
    assert a_state["step"] == b_state["step"]
    for x, y in ((a_model, b_model), (a_optim, b_optim)):
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("fmt", ["sharded", "full"])
def test_an_asynchronous_save_commits_what_a_synchronous_one_writes(tmp_path, fmt):
    common = FAST + [
        "train.steps=5",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=5",
        f"train.checkpoint_format={fmt}",
    ]
    train(load_config("debug_tiny", common), run_dir=str(tmp_path / "sync"), progress=False)
    async_cfg = load_config("debug_tiny", common + ["train.async_checkpoint=true"])
    train(async_cfg, run_dir=str(tmp_path / "async"), progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "async")]
    assert names == ["step_00000002", "step_00000004", "step_00000005"]
    assert not list((tmp_path / "async" / "checkpoints").glob("*.partial"))
    for name in names:  # the copy was taken at the step, not while training went on
        _assert_same_checkpoint(tmp_path / "sync" / "checkpoints" / name, tmp_path / "async" / "checkpoints" / name)


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_sharded_save_leaves_no_partial_folder_and_keeps_the_earlier_ones(tmp_path, monkeypatch, background):
    import dynamoe.training.checkpoint_sharded as sharded

    real, calls = sharded.write_pieces, []

    def second_save_fails(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(sharded, "write_pieces", second_save_fails)
    sets = ["train.steps=4", "train.checkpoint_every=2", "train.checkpoint_format=sharded"]
    cfg = load_config("debug_tiny", FAST + sets + [f"train.async_checkpoint={str(background).lower()}"])
    with pytest.raises(CheckpointError, match="rank 0 could not write rank00000.safetensors .No space left on device"):
        train(cfg, run_dir=str(tmp_path), progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    verify_checkpoint(tmp_path / "checkpoints" / "step_00000002")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sharded")
    cfg = load_config("debug_tiny", FAST + ["train.steps=2", "train.checkpoint_format=sharded"])
    train(cfg, run_dir=str(run), progress=False)
    return run / "checkpoints" / "step_00000002", cfg


def test_a_checkpoint_of_another_model_shape_names_the_tensor(sharded_run, tmp_path):
    folder, _ = sharded_run
    other = load_config("debug_tiny", FAST + ["train.steps=4", "model.moe.d_expert=48"])
    with pytest.raises(CheckpointError, match=r"tensor blocks\.0\.ffn\.experts\.w1_EDF has shape \[4, 32, 32\] there"):
        train(other, resume=str(_copy(folder, tmp_path)), progress=False)


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run" / "checkpoints" / folder.name
    shutil.copytree(folder, dest)
    return dest


def test_a_manifest_that_does_not_match_is_refused(sharded_run, tmp_path):
    folder, cfg = sharded_run
    copy = _copy(folder, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["rank00000.safetensors"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="rank00000.safetensors is corrupt"):
        train(cfg, resume=str(copy), progress=False)
    del manifest["files"]["rank00000.safetensors"]  # the index names a file the manifest does not
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="index names rank00000.safetensors, which manifest.json does not list"):
        verify_checkpoint(copy)
    (copy / "manifest.json").unlink()  # never committed: never loaded
    with pytest.raises(CheckpointError, match="incomplete"):
        train(cfg, resume=str(copy), progress=False)


# --- several processes ------------------------------------------------------------------------


def _sets(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_shards_equal_the_full_format_reshard_and_refuse_a_missing_rank(tmp_path):
    steps = _sets("train.steps=4", "train.checkpoint_every=2", "train.batch_size=2", "parallel.ep_size=2")
    zero2 = _sets("parallel.zero_stage=2")
    torchrun_train(2, "debug_tiny", "--run-dir", str(tmp_path / "sharded"), *SAME_AT_ANY_WORLD_SIZE, *steps, *zero2)
    torchrun_train(
        2,
        "debug_tiny",
        "--run-dir",
        str(tmp_path / "full"),
        *SAME_AT_ANY_WORLD_SIZE,
        *steps,
        *zero2,
        *_sets("train.checkpoint_format=full"),
    )
    saved = tmp_path / "sharded" / "checkpoints" / "step_00000002"
    assert {p.name for p in saved.glob("rank*.safetensors")} == {"rank00000.safetensors", "rank00001.safetensors"}
    index = json.loads((saved / "index.json").read_text())
    # Each rank wrote its ZeRO fragment of the masters and moments: two pieces of each expert tensor.
    assert len(index["tensors"]["model/blocks.0.ffn.experts.w1_EDF"]["pieces"]) == 2
    sizes = [(saved / rank_file(r)).stat().st_size for r in (0, 1)]
    assert max(sizes) < 0.6 * sum(sizes)  # neither rank wrote (much more than) its half
    _assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000002", saved)
    reference = train_metrics(tmp_path / "sharded")

    for nproc, zero in ((1, 0), (4, 1)):
        # Load at another world size, ep_size and ZeRO stage and save at once: nothing changes.
        again = tmp_path / f"rt{nproc}" / "checkpoints" / saved.name
        shutil.copytree(saved, again)
        sets = _sets("train.steps=2", f"train.batch_size={4 // nproc}", f"parallel.ep_size={nproc}")
        fmt = _sets("train.checkpoint_format=sharded", f"parallel.zero_stage={zero}")
        torchrun_train(nproc, "debug_tiny", "--resume", str(again), *SAME_AT_ANY_WORLD_SIZE, *sets, *fmt)
        assert len(list(again.glob("rank*.safetensors"))) == nproc
        _assert_same_checkpoint(saved, again)
    # And train on from it with one process and ZeRO 0: the losses of the uninterrupted run.
    resumed = tmp_path / "resumed" / "checkpoints" / saved.name
    shutil.copytree(saved, resumed)
    sets = _sets("train.steps=4", "train.batch_size=4", "parallel.ep_size=1")
    torchrun_train(1, "debug_tiny", "--resume", str(resumed), *SAME_AT_ANY_WORLD_SIZE, *sets)
    got = train_metrics(resumed.parent.parent)
    for step in (3, 4):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step

    missing = tmp_path / "missing" / "checkpoints" / saved.name
    shutil.copytree(saved, missing)
    (missing / "rank00001.safetensors").unlink()
    cfg = load_config("debug_tiny", FAST + ["train.steps=4", "parallel.zero_stage=2"])
    with pytest.raises(CheckpointError, match="missing rank00001.safetensors"):
        train(cfg, resume=str(missing), progress=False)


@pytest.mark.distributed
@pytest.mark.slow
def test_an_asynchronous_two_rank_save_resumes_bit_for_bit(tmp_path):
    common = [
        *SAME_AT_ANY_WORLD_SIZE,
        *_sets("train.steps=6", "train.checkpoint_every=2", "train.batch_size=2", "parallel.ep_size=2"),
        *_sets("parallel.zero_stage=1"),
    ]
    torchrun_train(2, "debug_tiny", "--run-dir", str(tmp_path / "sync"), *common)
    torchrun_train(
        2, "debug_tiny", "--run-dir", str(tmp_path / "async"), *common, *_sets("train.async_checkpoint=true")
    )
    for name in ("step_00000002", "step_00000004", "step_00000006"):
        _assert_same_checkpoint(tmp_path / "sync" / "checkpoints" / name, tmp_path / "async" / "checkpoints" / name)
    resumed = tmp_path / "resumed" / "checkpoints" / "step_00000004"
    shutil.copytree(tmp_path / "async" / "checkpoints" / "step_00000004", resumed)
    torchrun_train(2, "debug_tiny", "--resume", str(resumed), *common, *_sets("train.async_checkpoint=true"))
    reference, got = train_metrics(tmp_path / "sync"), train_metrics(tmp_path / "resumed")
    assert [got[s] for s in (5, 6)] == [reference[s] for s in (5, 6)]  # bit for bit
    _assert_same_checkpoint(
        tmp_path / "sync" / "checkpoints" / "step_00000006", tmp_path / "resumed" / "checkpoints" / "step_00000006"
    )


# A rank's peak extra memory while saving may exceed the bytes it owns by at most this (and a
# sharded load, which reads into the live tensors, may use at most this): Python objects, JSON,
# small tensors. The full format's rank 0 exceeds it by the whole gathered state (checked below,
# so the measurement is seen to catch it).
SAVE_MEMORY_BUFFER = 8 << 20


def _memory_worker(rank: int, world: int, out_dir: str) -> list[dict]:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from dynamoe.evals.bench_checkpoint import bench_rank

    overrides = ["model.n_layers=2", "model.d_model=128", "model.d_ff=256"]  # experts: 8 x 128 x 1024, 2 layers
    return bench_rank(overrides, out_dir, ep_size=world)


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux /proc")
def test_no_rank_holds_more_than_its_own_shard_while_saving(tmp_path):
    from dist_helper import run_workers

    rows = [r for per_rank in run_workers(_memory_worker, 2, timeout=300, out_dir=str(tmp_path)) for r in per_rank]
    full = {r["rank"]: r for r in rows if r["format"] == "full"}
    total = full[0]["written_bytes"]
    assert total > 40 << 20  # big enough that the buffer is small beside a shard
    for r in rows:
        if r["format"].startswith("sharded"):
            assert r["written_bytes"] < 0.6 * total, r  # each rank owns about half
            assert r["save_peak_extra_bytes"] <= r["written_bytes"] + SAVE_MEMORY_BUFFER, r
            assert r["load_peak_extra_bytes"] <= SAVE_MEMORY_BUFFER, r  # read in place, range by range
    # The gather: rank 0 holds at least the whole state while it writes.
    assert full[0]["save_peak_extra_bytes"] >= 0.9 * total


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_never_saved(tmp_path, bad):
    from dynamoe.training.trainer import Trainer, TrainingDiverged

    trainer = Trainer(load_config("debug_tiny", FAST + ["train.steps=2"]), run_dir=str(tmp_path), progress=False)
    with torch.no_grad():
        trainer.model.blocks[1].ffn.experts.w2_EFD[3, 5, 7] = bad
    with pytest.raises(TrainingDiverged, match="weights are not finite"):
        trainer.save(1)
    assert not list_checkpoints(tmp_path)
