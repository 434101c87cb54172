"""LayerSkip's training recipe for decoders with early exits (``model.exits.layer_dropout`` and
``model.exits.curriculum``): layer dropout per sequence rising with depth, training only, and an
early-exit loss whose exits a curriculum switches on (rotational or gradual)."""

import pytest
import torch

from dynamoe.config import ConfigError, ModelConfig, from_dict, load_config
from dynamoe.exits.heads import active_exits
from dynamoe.models import build_model

from tiny_models import BLOCKS, small


def _decoder(block="gpt2", **exits) -> torch.nn.Module:
    data = {**small(block), "dropout": 0.0, "exits": {"layers": [1, 2, 3], **exits}}
    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, data, "model"))


@pytest.mark.parametrize("block", BLOCKS)
def test_each_sequence_skips_layer_l_with_a_rate_rising_linearly_with_depth(block):
    model = _decoder(block, layer_dropout=0.6).train()
    assert [model.layer_drop_rate(i) for i in range(4)] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    ids = torch.randint(0, 40, (3000, 4), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with torch.no_grad():
        state = model.start_state(model._embed(ids), None)
        for i in range(4):
            new, _ = model.run_layer(i, state)
            same = (new.x == state.x).flatten(1).all(1)  # a dropped sequence keeps its input exactly
            assert abs(same.float().mean().item() - model.layer_drop_rate(i)) < 0.03, i
            changed = (new.x != state.x).flatten(1).all(1)
            assert bool((same | changed).all())  # per sequence: all of it or none of it
            state = new


def test_layer_dropout_is_off_in_evaluation_and_zero_is_the_plain_model():
    ids = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(1))
    plain, dropping = _decoder().eval(), _decoder(layer_dropout=0.5).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, dropping(ids).logits)
        plain.train()
        torch.manual_seed(0)
        a = plain(ids).logits
        torch.manual_seed(0)
        assert torch.equal(a, plain(ids).logits)  # no layer dropout: training mode is deterministic here


def test_the_curricula_switch_exits_as_layerskip_does():
    rotational = from_dict(
        ModelConfig, {**small(), "exits": {"layers": [1, 2, 3], "curriculum": "rotational"}}, "model"
    )
    assert active_exits(rotational.exits, 0, 10) == [True, False, True, True]
    assert active_exits(rotational.exits, 1, 10) == [False, True, False, True]
    gradual = from_dict(ModelConfig, {**small(), "exits": {"layers": [1, 2, 3], "curriculum": "gradual"}}, "model")
    seen = [active_exits(gradual.exits, s, 8) for s in range(8)]
    assert seen[0] == seen[1] == [False, False, False, True]  # the final head alone first
    assert seen[2] == seen[3] == [False, False, True, True]  # then the deepest early exit
    assert seen[4] == [False, True, True, True] and seen[7] == [True, True, True, True]


def test_only_the_active_exits_count_in_training_and_every_exit_in_evaluation():
    model = _decoder(curriculum="rotational").train()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))
    model.set_training_step(1, 10)  # exit 1 and the final head
    out = model(ids, labels)
    ces = out.exit_losses
    assert out.loss.item() == pytest.approx((ces[1].item() + ces[3].item()) / 2, rel=1e-6)
    out.loss.backward()
    assert model.exit_norms[0].weight.grad is None and model.exit_norms[1].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(ids, labels)
    assert out.loss.item() == pytest.approx(sum(c.item() for c in out.exit_losses) / 4, rel=1e-6)


def test_moe_train_runs_the_layerskip_recipe(tmp_path):
    from dynamoe.training.trainer import train

    sets = [
        "train.steps=4",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "model.exits.layers=[1]",
        "model.exits.layer_dropout=0.2",
        "model.exits.curriculum=rotational",
    ]
    train(load_config("debug_tiny", sets), run_dir=str(tmp_path / "run"), progress=False)
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.exits.curriculum=gradual", "model.exits.layers=[]"], "model.exits.curriculum: a curriculum sched"),
        (["model.exits.layer_dropout=1.0"], r"model.exits.layer_dropout: must be in \[0, 1\)"),
        (
            ["model.exits.curriculum=rotational", "model.exits.training=two_stage"],
            "model.exits.curriculum: two_stage trains the early exits in a stage of their own",
        ),
        (
            ["model.exits.layer_dropout=0.1", "model.depth.mode=mod"],
            "LayerSkip's layer dropout .* for decoders without",
        ),
    ],
)
def test_layerskip_settings_that_do_not_fit_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("debug_tiny", ["model.exits.layers=[1]", *sets])


def test_layerskip_is_for_decoders():
    with pytest.raises(ConfigError, match=r"model.exits.layer_dropout: LayerSkip's .* \(kind is 'encoder'"):
        load_config("sst2_moe_classifier", ["model.exits.layers=[1]", "model.exits.layer_dropout=0.1"])
