"""`moe plan`: the memory planner's counts against real models, runs and the command line."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from dynamoe.config import ConfigError, load_config
from dynamoe.training import memory_plan as mp
from dynamoe.training import preflight

VOCAB = 65  # Tiny Shakespeare's characters


def _cfg(name="quickstart", *sets):
    cfg = load_config(name, list(sets))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=VOCAB))


def test_parameter_gradient_and_adam_bytes_match_the_built_model():
    cfg = _cfg("debug_tiny")
    torch.manual_seed(0)
    from dynamoe.models import build_model

    model = build_model(cfg.model)
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    b = mp.plan(cfg, 1, device="cpu", available_bytes=1 << 40).by_precision["fp32"]
    assert (b.params, b.grads, b.optimizer_moments, b.master_weights) == (4 * n, 4 * n, 8 * n, 0)


def test_zero_and_ep_partitioning_arithmetic():
    dense, experts = 1000, 8000  # experts: the whole model's; each of 2 EP ranks holds half
    z0 = mp.model_state_bytes(dense, experts // 2, 4, 2, 0, "fp32", "cuda")
    assert z0["params"] == 4 * 5000 and z0["optimizer_moments"] == 8 * 5000
    z1 = mp.model_state_bytes(dense, experts // 2, 4, 2, 1, "bf16", "cuda")
    shard = dense / 4 + (experts // 2) / 2  # dense over 4 ranks, experts over the 2 ranks sharing them
    assert z1["params"] == 2 * 5000
    assert z1["master_weights"] == 4 * shard and z1["optimizer_moments"] == 8 * shard
    assert z1["grads"] == 2 * 5000 + 4 * shard
    z2 = mp.model_state_bytes(dense, experts // 2, 4, 2, 2, "bf16", "cuda")
    assert z2["grads"] == 2 * shard < z1["grads"]
    assert z2["zero_buffers"] == 2 * mp.REDUCE_BUCKET_ELEMENTS  # a GPU allocates the whole bucket


def test_bf16_needs_less_than_fp32_and_ep_size_splits_the_experts():
    one = mp.plan(_cfg(), 1, device="cpu", available_bytes=1 << 40)
    assert one.by_precision["bf16"].total("none") < one.by_precision["fp32"].total("none")
    two = mp.plan(_cfg("quickstart", "parallel.ep_size=2"), 2, device="cpu", available_bytes=1 << 40)
    assert two.params_per_rank == one.params - one.expert_params // 2
    assert two.all_to_all_bytes["bf16"] * 2 == two.all_to_all_bytes["fp32"] > 0


def _saved_bytes(cfg, mode: str, dtype) -> int:
    """Bytes autograd keeps for backward (unique storages, parameters excluded), one micro-batch."""
    from dynamoe.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).train().to(dtype)
    model.set_activation_checkpointing(mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.data.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    out.total_loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize(
    "sets", [(), ("model.moe.activation=swiglu", "model.moe.num_shared_experts=1", "model.moe_every=1")]
)
def test_activation_formula_matches_saved_tensors(precision, dtype, sets):
    cfg = _cfg("quickstart", "train.batch_size=2", *sets)
    saved, _, _ = mp.activation_bytes(cfg, 2, mp.BYTES[precision], 1)
    for mode in mp.MODES:
        measured = _saved_bytes(cfg, mode, dtype)
        assert abs(saved[mode] / measured - 1) < 0.15, (mode, saved[mode], measured)
    assert saved["blocks"] <= saved["moe_blocks"] < saved["none"]  # equal when every block has MoE


def test_cli_prints_the_table(capsys, tmp_path):
    from dynamoe.launch.cli import main

    out_json = tmp_path / "plan.json"
    assert main(["plan", "debug_tiny", "--gpus", "2", "--gpu-memory", "80GiB", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "total per rank" in text and "fits: yes" in text and "Adam moments" in text
    assert out_json.exists()
    uniform = json.loads(out_json.read_text())["total"]
    assert main(["plan", "debug_tiny", "--gpus", "2", "--set", "parallel.ep_size=2", "--json", str(out_json)]) == 0
    uniform_ep2 = json.loads(out_json.read_text())["total"]
    args = ["plan", "debug_tiny", "--gpus", "2", "--set", "parallel.ep_size=2", "--routing", "worst"]
    assert main([*args, "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["total"] > uniform_ep2 and uniform > 0
    assert "the total counts the busiest" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "3", "--set", "parallel.ep_size=2"], "does not divide the number of processes (3)"),
        (["--set", "parallel.ep_size=16"], "does not divide model.moe.num_experts=8"),
        (["--gpu-memory", "80 parsecs"], "is not a memory size"),
        (["--gpu-memory", "0GiB"], "is not positive"),
    ],
)
def test_bad_input_names_the_fix(args, message, capsys):
    from dynamoe.launch.cli import main

    assert main(["plan", "quickstart", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err


def test_bad_gpus_raise_the_trainers_error():
    with pytest.raises(ConfigError, match=r"parallel.ep_size: 2 does not divide .*; fix: launch a multiple of 2"):
        mp.plan(_cfg("quickstart", "parallel.ep_size=2"), 3, device="cpu")


@pytest.mark.parametrize("text,value", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20)])
def test_parse_size(text, value):
    assert mp.parse_size(text) == value


def test_warns_when_the_plan_exceeds_available_memory(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 100 << 20)
    with pytest.warns(UserWarning, match="memory plan estimates .* fix: set train.activation_checkpointing"):
        preflight.warn_if_plan_does_not_fit(_cfg(), world=1, on_gpu=False)
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 1 << 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight.warn_if_plan_does_not_fit(_cfg(), world=1, on_gpu=False)


@pytest.mark.slow
def test_measured_peak_of_a_real_run_is_within_15_percent(tmp_path):
    from dynamoe.evals import plan_check

    sets = plan_check.SIZES["d256"] + ["parallel.ep_size=1"]
    baseline = plan_check._train("quickstart", plan_check.TINY, 1, 3, tmp_path / "base")
    peak = plan_check._train("quickstart", sets, 1, 3, tmp_path / "run")
    planned, _ = plan_check.planned_mib("quickstart", sets, 1)
    assert abs(planned / (peak - baseline) - 1) < 0.15, (planned, peak, baseline)


@pytest.mark.slow
@pytest.mark.distributed
def test_all_to_all_bytes_match_the_trainers_counter(tmp_path):
    from dist_helper import torchrun_train, train_metrics

    sets = ["train.steps=3", "train.log_every=1", "train.checkpoint_every=0", "parallel.ep_size=2"]
    torchrun_train(2, "debug_tiny", "--run-dir", str(tmp_path), *[a for s in sets for a in ("--set", s)])
    counted = train_metrics(tmp_path, key="all_to_all_bytes")
    planned = mp.all_to_all_bytes(_cfg("debug_tiny", *sets), 2, 4)
    for step, value in counted.items():
        assert abs(value / planned - 1) < 0.25, (step, value, planned)  # routing is near, not exactly, uniform


# --- expert rows under expert parallelism, and the trainer's gradient-norm temporaries ---------


def test_received_rows_uniform_and_busiest_rank():
    T = 32 * 128  # quickstart: batch 32 x 128 tokens, 8 experts, top-2
    ep2 = _cfg("quickstart", "parallel.ep_size=2")
    assert mp._received_rows(ep2, T, 2, "uniform") == T * 2
    assert mp._received_rows(ep2, T, 2, "worst") == 2 * T * 2  # every rank sends its T*k rows here
    ep8 = _cfg("quickstart", "parallel.ep_size=8")  # one expert per rank: a token sends it one row at most
    assert mp._received_rows(ep8, T, 8, "worst") == 8 * T
    assert mp._received_rows(_cfg(), T, 1, "worst") == T * 2  # one rank holds every row either way
    capped = _cfg("quickstart", "parallel.ep_size=2", "model.moe.router.capacity_factor=1.0")
    assert mp._received_rows(capped, T, 2, "worst") == 2 * 4 * (T * 2 // 8)  # 4 local experts at capacity
    chosen = _cfg("moe_lm_expert_choice", "parallel.ep_size=2")
    assert mp._received_rows(chosen, T, 2, "worst") == mp._received_rows(chosen, T, 2, "uniform")


def test_worst_routing_adds_the_busiest_ranks_rows_to_the_total():
    cfg = _cfg("quickstart", "parallel.ep_size=2")
    uniform = mp.plan(cfg, 2, device="cpu", available_bytes=1 << 40)
    worst = mp.plan(cfg, 2, device="cpu", available_bytes=1 << 40, routing="worst")
    b = uniform.configured
    T, D, F, layers = 32 * 128, 128, 256, 2
    extra_rows = T * 2  # per MoE layer: the other rank's T*k rows
    per_row = 4 * D + 2 * 4 * F + 16  # experts' input and GELU's input/output rows, the row order
    assert b.uneven_routing["none"] == layers * extra_rows * per_row + extra_rows * 4 * (2 * F + 2 * D)
    assert worst.total - uniform.total == b.uneven_routing["none"] > 0
    assert worst.expert_rows == {"uniform": T * 2, "worst": 2 * T * 2}
    assert "busiest rank, all rows (not in total)" in uniform.format_table()
    one = mp.plan(_cfg(), 1, device="cpu", available_bytes=1 << 40, routing="worst").configured
    assert all(v == 0 for v in one.uneven_routing.values())
    with pytest.raises(ConfigError, match="routing: 'skewed' is not one of"):
        mp.plan(cfg, 2, device="cpu", routing="skewed")


def test_grad_norm_temporaries_are_16_bytes_per_element_of_the_largest_tensor_at_zero_0():
    from dynamoe.models import build_model
    from dynamoe.training.deepspeed_setup import global_grad_norm

    cfg = _cfg("quickstart", "train.batch_size=2")
    model = build_model(cfg.model)
    largest = max(p.numel() for p in model.parameters())
    assert largest == model.moe_layers()[0].experts.w1_EDF.numel() == mp.largest_local_tensor(cfg.model, 1)
    assert mp.largest_local_tensor(cfg.model, 2) == largest // 2  # each rank keeps half of the experts
    b = mp.plan(cfg, 1, device="cpu", available_bytes=1 << 40).by_precision
    assert b["fp32"].grad_norm_buffers == 16 * largest and b["bf16"].grad_norm_buffers == 0
    # The temporaries themselves: a float64 copy of the gradient, then its square, both alive.
    sizes = []
    real_square = torch.Tensor.square

    def square(t):
        out = real_square(t)
        sizes.append(t.untyped_storage().nbytes() + out.untyped_storage().nbytes())
        return out

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.Tensor.square = square
    try:
        global_grad_norm(model, None)
    finally:
        torch.Tensor.square = real_square
    assert max(sizes) == b["fp32"].grad_norm_buffers


def _busiest_rank_worker(rank, world, sets):
    """Bytes autograd saves on each rank when every token is routed to rank 0's experts."""
    import torch.distributed as dist

    from dynamoe.layers.expert_parallel import shard_experts

    cfg = _cfg("quickstart", *sets)
    torch.manual_seed(0)
    from dynamoe.models import build_model

    model = build_model(cfg.model).train()
    shard_experts(model, dist.group.WORLD, f"ep_size_{world}")
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.gate.weight.zero_()  # equal logits: every token takes experts 0 and 1
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1 + rank)
    ids = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.data.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    out.total_loss.backward()
    return sum(seen.values())


@pytest.mark.distributed
def test_busiest_rank_saves_what_the_worst_case_plans():
    from dist_helper import run_workers

    sets = ("train.batch_size=2", "parallel.ep_size=2")
    busiest, idle = run_workers(_busiest_rank_worker, 2, sets=sets)  # rank 0 receives 2N rows, rank 1 none
    cfg = _cfg("quickstart", *sets)
    worst, _, _ = mp.activation_bytes(cfg, 2, 4, 2, "worst")
    assert abs(worst["none"] / busiest - 1) < 0.15, (worst["none"], busiest)
    T, D, F = 2 * 128, 128, 256
    per_row = 4 * D + 2 * 4 * F + 16  # what a received row costs: 2N rows on rank 0, none on rank 1
    assert abs((busiest - idle) / (2 * 2 * T * 2 * per_row) - 1) < 0.02, (busiest, idle)
