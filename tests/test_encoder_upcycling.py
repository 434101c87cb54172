"""Sparse upcycling of a pretrained BERT-family encoder (``model.kind: hf_encoder`` with MoE
layers and ``train.upcycle``): the FFNs of the chosen layers become experts with the pretrained
FFN's biases, and wherever the maths says so the upcycled encoder computes exactly what
transformers' own dense model computes at initialisation. The real MiniLM-L6 checkpoint is the
dense model; tiny random BERTs built here carry what the upcycler must refuse."""

import dataclasses

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from dynamoe.config import ConfigError, check_upcycle, from_dict, load_config
from dynamoe.data.datasets import _encode_split, hf_tokenizer
from dynamoe.layers.experts import DenseMLP, GroupedExperts
from dynamoe.models.hf_encoder import HFExitClassifier, fill_from_pretrained, resolve_pretrained
from dynamoe.models.hf_encoder_moe import EncoderMoEFFN, dense_encoder
from dynamoe.models.upcycle import plan, upcycle_state

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés", "fine ."]
UPCYCLED = ["train.upcycle.enabled=true", "model.moe_every=2", "model.moe.num_experts=8", "model.moe.d_expert=1536"]


def _model_cfg(sets=(), **upcycle):
    cfg = load_config("bert_upcycled_sst2", list(sets))
    model = fill_from_pretrained(dataclasses.replace(cfg.model, num_classes=2))
    up = dataclasses.replace(cfg.train.upcycle, **upcycle)
    check_upcycle(model, up)
    return model, up


@pytest.fixture(scope="module")
def dense():
    model, _ = _model_cfg()
    dense_cfg, dense = dense_encoder(model, seed=0)
    return dense_cfg, dense.eval()


@pytest.fixture(scope="module")
def batch():
    return _encode_split(TEXTS, [1, 0, 1], hf_tokenizer("minilm"), seq_len=20)


@pytest.fixture(scope="module")
def transformers_hidden(batch):
    """transformers' own dense MiniLM: its hidden states after the embeddings and every layer."""
    theirs = AutoModel.from_pretrained(resolve_pretrained("minilm")).eval()
    with torch.no_grad():
        out = theirs(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    return out.hidden_states


def _upcycled(dense, sets=(), seed=0, **upcycle):
    dense_cfg, dense_model = dense
    cfg, up = _model_cfg(sets, **upcycle)
    model = HFExitClassifier(cfg)
    model.load_state_dict(upcycle_state(dense_cfg, dense_model.state_dict(), cfg, up, seed=seed), strict=True)
    return cfg, up, model.eval()


def _hidden(model, batch):
    with torch.no_grad():
        return model.hidden_states(batch["input_ids"], batch["attention_mask"])


EXACT = {
    # copies, renormalised top-2, random router: any two copies' weights sum to 1
    "copies_top2": ([], {}),
    # every FFN, not every other one
    "every_layer": (["model.moe_every=1"], {}),
    # 4 experts of half the units each (2 copies x 2 parts), zero router: every token takes a whole copy
    "fine_grained": (["model.moe.num_experts=4", "model.moe.d_expert=768"], {"granularity": 2}),
    # Switch's raw top-1 softmax: a zero router gives weight 1/E, the experts are scaled by E
    "switch_top1": (["model.moe.router.top_k=1", "model.moe.router.normalize=false"], {}),
    # the pretrained FFN kept as a shared expert, routed experts start silent
    "dense_as_shared": (
        ["model.moe.num_shared_experts=1", "model.moe.d_shared=1536"],
        {"keep_dense_as_shared": True, "noise": 0.05},
    ),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_upcycled_encoder_equals_transformers_dense_encoder_at_init(dense, batch, transformers_hidden, case):
    sets, upcycle = EXACT[case]
    cfg, up, model = _upcycled(dense, sets, **upcycle)
    assert plan(cfg, up).exact, plan(cfg, up).why
    assert any(isinstance(layer.intermediate, EncoderMoEFFN) for layer in model.layers)
    ours = _hidden(model, batch)
    mask = batch["attention_mask"].bool()
    assert len(ours) == len(transformers_hidden) == 7
    for i, (a, b) in enumerate(zip(ours, transformers_hidden)):
        assert torch.allclose(a[mask], b[mask], atol=2e-5, rtol=0), (case, i, (a - b)[mask].abs().max())
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
        dense_logits = dense[1](batch["input_ids"], batch["attention_mask"]).logits
    assert torch.allclose(logits, dense_logits, atol=1e-5, rtol=0)
    routed = [m.stat_counts.sum().item() for m in model.moe_layers()]
    assert all(r > 0 for r in routed)  # the experts really ran


def test_noise_and_reinitialisation_make_the_start_inexact_and_say_so(dense, batch):
    for upcycle in ({"noise": 0.05}, {"reinit_fraction": 0.5}):
        cfg, up, model = _upcycled(dense, **upcycle)
        p = plan(cfg, up)
        assert not p.exact and ("noise" in p.why or "re-initialisation" in p.why)
        diff = (_hidden(model, batch)[-1] - _hidden(dense[1], batch)[-1]).abs().max()
        assert diff > 1e-4, upcycle


def test_expert_biases_come_from_the_pretrained_ffn(dense):
    dense_cfg, dense_model = dense
    cfg, _, model = _upcycled(dense, ["model.moe.num_experts=4", "model.moe.d_expert=768"], granularity=2)
    pretrained = dense_model.layers[1]
    experts = model.layers[1].intermediate.moe.experts
    b_in, b_out = pretrained.intermediate.dense.bias, pretrained.output.dense.bias
    for e in range(4):
        part = e % 2  # expert c * g + p is part p of copy c
        assert torch.equal(experts.b1_EF[e], b_in[part * 768 : (part + 1) * 768])
        # each of the two parts adds half the output bias, times the exact scale g / (k w0) = 2
        assert torch.allclose(experts.b2_ED[e], b_out, atol=1e-7)
    assert isinstance(model.layers[0].intermediate.dense, torch.nn.Linear)  # layer 0 stays dense


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0]])
def test_grouped_experts_with_biases_equal_one_biased_mlp_per_expert(counts):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 12, "gelu", init_std=0.3, bias=True)
    with torch.no_grad():
        experts.b1_EF.normal_()
        experts.b2_ED.normal_()
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 8, requires_grad=True)
    y = experts(x, counts_E)
    rows = []
    for e, xe in enumerate(x.split(counts)):
        mlp = DenseMLP(8, 12, "gelu", bias=True)
        with torch.no_grad():
            mlp.w_in.weight.copy_(experts.w1_EDF[e].t())
            mlp.w_in.bias.copy_(experts.b1_EF[e])
            mlp.w_out.weight.copy_(experts.w2_EFD[e].t())
            mlp.w_out.bias.copy_(experts.b2_ED[e])
        rows.append(mlp(xe))
    assert torch.allclose(y, torch.cat(rows), atol=1e-6)
    y.pow(2).sum().backward()
    for e, n in enumerate(counts):  # an expert with no rows gets a zero bias gradient
        assert (experts.b2_ED.grad[e].abs().sum() == 0) == (n == 0)
    experts.shard(first=2, count=2)
    assert experts.b1_EF.shape == (2, 12) and experts.b2_ED.shape == (2, 8)


def test_expert_biases_are_not_weight_decayed():
    from dynamoe.training.deepspeed_setup import param_groups

    layer = GroupedExperts(4, 8, 12, bias=True)
    groups = param_groups(torch.nn.ModuleDict({"experts": layer}), 0.1, None)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert id(layer.w1_EDF) in decayed and id(layer.b1_EF) not in decayed and id(layer.b2_ED) not in decayed


def test_checkpointing_the_moe_layers_changes_no_gradient(dense, batch):
    _, _, model = _upcycled(dense)
    model.train()
    grads = []
    for mode in ("none", "moe_blocks"):
        model.set_activation_checkpointing(mode)
        model.zero_grad()
        torch.manual_seed(3)  # the same dropout masks
        out = model(batch["input_ids"], batch["attention_mask"], labels=torch.tensor([1, 0, 1]))
        out.total_loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(".moe.router." in n for n in grads[0])  # the balancing loss reaches the routers
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


# --- what the upcycler refuses ------------------------------------------------------------------


def _tiny_bert(tmp_path, **changes):
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **changes
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    return str(tmp_path)


def _tiny_cfg(folder, **model):
    data = {"kind": "hf_encoder", "pretrained": folder, "num_classes": 2, "moe_every": 1, **model}
    data["moe"] = {"num_experts": 2, "d_expert": 32, "router": {"top_k": 1}}
    return from_dict(type(load_config("bert_upcycled_sst2").model), data, "model")


def test_an_ffn_with_another_activation_is_refused_naming_the_module(tmp_path):
    cfg = _tiny_cfg(_tiny_bert(tmp_path, hidden_act="relu"))
    with pytest.raises(ConfigError, match=r"encoder.encoder.layer.0.intermediate uses activation 'relu'.*fix:"):
        HFExitClassifier(cfg)


def test_an_ffn_of_another_structure_is_refused_naming_the_module(tmp_path, monkeypatch):
    import dynamoe.models.hf_encoder as hf_encoder

    folder = _tiny_bert(tmp_path)
    load = hf_encoder.load_pretrained_encoder

    def without_bias(name):
        encoder = load(name)
        encoder.encoder.layer[0].output.dense = torch.nn.Linear(32, 16, bias=False)
        return encoder

    monkeypatch.setattr(hf_encoder, "load_pretrained_encoder", without_bias)
    with pytest.raises(ConfigError, match=r"encoder.encoder.layer.0.output.dense is Linear, not a Linear with bias"):
        HFExitClassifier(_tiny_cfg(folder))


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.upcycle.enabled=false"], "model.moe_every: MoE layers in the pretrained encoder 'minilm' would"),
        (["train.upcycle.granularity=5"], "train.upcycle.granularity: granularity=5 does not divide .*d_ff=1536"),
        (["model.moe.d_expert=512"], "model.moe.d_expert: .*fix: set model.moe.d_expert: 1536"),
        (["model.moe_layers=[1,6]"], r"model.moe_layers: \[1, 6\] must be layers of the encoder, 0..5"),
        (["model.moe.activation=swiglu"], "model.moe.activation: 'swiglu', but the pretrained FFNs .* are GELU"),
    ],
)
def test_configs_that_cannot_upcycle_an_encoder_are_refused_by_field(sets, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config("bert_upcycled_sst2", sets)
        model = fill_from_pretrained(dataclasses.replace(cfg.model, num_classes=2))
        check_upcycle(model, cfg.train.upcycle)
        HFExitClassifier(model)


def test_an_upcycled_encoder_has_no_hugging_face_classifier_to_export_to(dense, tmp_path):
    from dynamoe.interop.hf_encoder_export import export_encoder
    from dynamoe.interop.hf_files import HFFormatError

    cfg, _, model = _upcycled(dense)
    with pytest.raises(HFFormatError, match=r"layers \[1, 3, 5\] .* MoE layers .*fix: export it in dynamoe's format"):
        export_encoder(model.state_dict(), cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_moe_train_upcycles_minilm_and_reports_each_layers_balance(tmp_path):
    import json

    from dynamoe.training.checkpoint import load_model
    from dynamoe.training.trainer import train

    sets = [
        "train.steps=3",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "data.seq_len=24",
        "data.max_train_samples=64",
        "model.exits.layers=[2]",
    ]
    train(load_config("bert_upcycled_sst2", sets), run_dir=str(tmp_path / "run"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {k for row in rows for k in row}
    for block in (1, 3, 5):
        assert {f"block{block}_balance_loss", f"block{block}_max_over_mean"} <= logged
    cfg, model = load_model(tmp_path / "run")
    assert len(model.moe_layers()) == 3 and model.layers[1].intermediate.moe.experts.has_bias
    assert cfg.d_ff == 1536 and cfg.n_layers == 6

    from dynamoe.evals.model_eval import evaluate

    result = evaluate(str(tmp_path / "run"), out_dir=str(tmp_path / "eval"), batches=1, batch_size=16)
    assert len(result["load_balance"]) == 3  # moe eval's balance table: one row per MoE layer
    assert all(row["max_over_mean"] >= 1 for row in result["load_balance"])
    flops = result["compute"]["full"]
    assert flops["by_component_per_token"]["experts"] > 0 and flops["by_component_per_token"]["dense_ffn"] > 0, flops
