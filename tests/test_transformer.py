"""Backbones: MoE placement, causality of the decoder, padding invariance of the encoder."""

import pytest
import torch

from dynamoe.config import ModelConfig, MoEConfig, RouterConfig
from dynamoe.layers.moe_layer import MoELayer
from dynamoe.models import TransformerClassifier, TransformerLM, build_model

BLOCKS = ("gpt2", "modern")


def small(block="gpt2", **kw):
    """The GPT-2 block, or the modern one (grouped-query attention, QK-norm, SwiGLU experts)."""
    activation = "swiglu" if block == "modern" else "gelu"
    base = dict(
        vocab_size=50,
        d_model=32,
        n_layers=4,
        n_heads=4,
        d_ff=48,
        max_seq_len=24,
        moe=MoEConfig(
            num_experts=4, d_expert=16, activation=activation, router=RouterConfig(top_k=2, z_loss_coef=1e-3)
        ),
    )
    if block == "modern":
        base.update(block="modern", n_kv_heads=2, qk_norm="per_head")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("moe_every, expected", [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (0, [])])
@pytest.mark.parametrize("block", BLOCKS)
def test_moe_every_places_moe_ffns(block, moe_every, expected):
    model = build_model(small(block, moe_every=moe_every))
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)] == expected
    out = model(torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10)))
    assert len(out.moe) == len(expected)
    if expected:
        total = sum(r.aux_loss + r.z_loss for r in out.moe)
        torch.testing.assert_close(out.aux_loss, total)
        assert out.aux_loss > 0
    else:
        assert out.aux_loss is None
        torch.testing.assert_close(out.total_loss, out.loss)


@pytest.mark.parametrize("block", BLOCKS)
def test_decoder_is_causal_with_dropless_moe(block):
    torch.manual_seed(0)
    model = TransformerLM(small(block)).eval()
    a = torch.randint(0, 50, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(0, 50, (2, 7))  # change only the future of position 8
    la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :9], lb[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


@pytest.mark.parametrize("block", BLOCKS)
def test_decoder_loss_is_next_token_cross_entropy(block):
    torch.manual_seed(0)
    model = TransformerLM(small(block, moe_every=2)).eval()
    ids = torch.randint(0, 50, (3, 12))
    out = model(ids, ids)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 50), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert model.head.weight is model.tok_emb.weight  # tied


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_encoder_ignores_padding(block, pooling):
    torch.manual_seed(0)
    model = TransformerClassifier(small(block, num_classes=3, pooling=pooling)).eval()
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(ids, mask).logits, model(padded, padded_mask).logits, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 2])
    out = model(ids, mask, labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


@pytest.mark.parametrize("block", BLOCKS)
def test_sequences_longer_than_the_model_are_refused(block):
    model = TransformerLM(small(block))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("block", BLOCKS)
def test_gradients_reach_every_parameter(block):
    torch.manual_seed(0)
    model = TransformerLM(
        small(
            block,
            moe_every=2,
            moe=MoEConfig(
                num_experts=4, d_expert=16, num_shared_experts=1, activation="swiglu", router=RouterConfig(top_k=4)
            ),
        )
    )
    ids = torch.randint(0, 50, (4, 20))
    model(ids, ids).total_loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
