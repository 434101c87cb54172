"""A pretrained encoder fine-tunes by its family's conventions: text encoded with the tokenizer's
special tokens in one batched call, and the classifier on the first token through the checkpoint's
pooler, so that dynamoe's classifier computes what transformers' sequence classifier computes."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dynamoe.config import ConfigError, load_config
from dynamoe.data.datasets import _encode_split, hf_tokenizer, resolve_tokenizer_path
from dynamoe.models.hf_encoder import HFExitClassifier, resolve_pretrained

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés from start to finish"]


def test_texts_are_encoded_with_the_tokenizers_special_tokens():
    tok = AutoTokenizer.from_pretrained(resolve_tokenizer_path("minilm"))
    enc = _encode_split(TEXTS, [1, 0], hf_tokenizer("minilm"), seq_len=12)
    for i, text in enumerate(TEXTS):
        expected = tok(text, max_length=12, truncation=True)["input_ids"]
        assert enc["input_ids"][i, : len(expected)].tolist() == expected
        assert expected[0] == tok.cls_token_id and expected[-1] == tok.sep_token_id  # kept when truncated
        assert int(enc["attention_mask"][i].sum()) == len(expected)
        assert (enc["input_ids"][i, len(expected) :] == tok.pad_token_id).all()


def _classifier(pooling="auto", **exits):
    cfg = load_config("bert_early_exit_sst2", [f"model.pooling={pooling}"]).model
    return dataclasses.replace(cfg, num_classes=2, exits=dataclasses.replace(cfg.exits, **exits))


def test_the_final_head_is_the_familys_sequence_classifier():
    ours = HFExitClassifier(_classifier(layers=[])).eval()
    assert ours.pooling == "pooler" and ours.encoder.pooler is None
    theirs = AutoModelForSequenceClassification.from_pretrained(resolve_pretrained("minilm"), num_labels=2).eval()
    with torch.no_grad():
        assert torch.equal(ours.head.hidden[0].weight, theirs.bert.pooler.dense.weight)  # started from the pooler
        theirs.classifier.weight.copy_(ours.head.out.weight)
        theirs.classifier.bias.copy_(ours.head.out.bias)
        batch = _encode_split(TEXTS, [1, 0], hf_tokenizer("minilm"), seq_len=24)
        a = ours(batch["input_ids"], batch["attention_mask"]).logits
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_exit_heads_start_from_the_pooler_too_and_mean_pooling_stays_available():
    with_exits = HFExitClassifier(_classifier(layers=[2, 4]))
    for head in with_exits.exit_heads:
        assert torch.equal(head.hidden[0].weight, with_exits.head.hidden[0].weight)
    mean = HFExitClassifier(_classifier("mean", layers=[]))
    assert mean.pooling == "mean" and mean.encoder.pooler is not None


def test_pooling_errors_name_the_fix():
    with pytest.raises(ConfigError, match="model.pooling: pooler is the pretrained checkpoint's pooler"):
        load_config("sst2_moe_classifier", ["model.pooling=pooler"])
    with pytest.raises(ConfigError, match="model.exits.head_hidden: 64, but the heads start from the .*pooler"):
        HFExitClassifier(_classifier(layers=[2], head_hidden=64))


def test_a_fine_tuned_encoder_exports_as_the_familys_classifier_with_its_exits_beside(tmp_path):
    import json

    from dynamoe.interop.hf_models import export_model
    from dynamoe.training.checkpoint import load_model
    from dynamoe.training.trainer import train

    sets = [
        "train.steps=2",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        "data.seq_len=24",
        "data.max_train_samples=64",
        "model.exits.layers=[2,4]",
    ]
    train(load_config("bert_early_exit_sst2", sets), run_dir=str(tmp_path / "run"), progress=False)
    result = export_model(tmp_path / "run", tmp_path / "hf")
    assert result.family == "BertForSequenceClassification" and result.tokenizer
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, ours = load_model(tmp_path / "run")
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = ours.eval()(batch["input_ids"], batch["attention_mask"]).logits
        b = theirs(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    meta = json.loads((tmp_path / "hf" / "exit_heads.json").read_text())
    assert meta["layers"] == [2, 4] and (tmp_path / "hf" / "exit_heads.safetensors").exists()
    assert theirs.config.id2label == {0: "0", 1: "1"} or theirs.config.num_labels == 2


def test_an_encoder_fine_tuned_with_mean_pooling_is_refused(tmp_path):
    from dynamoe.interop.hf_encoder_export import export_encoder
    from dynamoe.interop.hf_files import HFFormatError

    cfg = _classifier("mean", layers=[])
    state = HFExitClassifier(cfg).state_dict()
    with pytest.raises(HFFormatError, match="model.pooling: mean.*fix: fine-tune with model.pooling: pooler"):
        export_encoder(state, cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_early_exits_can_pool_by_mean_while_the_final_head_keeps_the_pooler():
    from dynamoe.models.pooling import masked_mean

    cfg = _classifier(layers=[2])
    cfg = dataclasses.replace(cfg, exits=dataclasses.replace(cfg.exits, pooling="mean"))
    model = HFExitClassifier(cfg).eval()
    batch = _encode_split(TEXTS, [1, 0], hf_tokenizer("minilm"), seq_len=24)
    with torch.no_grad():
        heads, _ = model.forward_heads({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        states = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        early = model.exit_heads[0](masked_mean(states[2], batch["attention_mask"])).logits
        final = model.head(states[-1][:, 0]).logits
    assert torch.allclose(heads[0].logits, early, atol=1e-6) and torch.allclose(heads[-1].logits, final, atol=1e-6)
    with pytest.raises(ConfigError, match="model.exits.pooling: is read by pretrained encoders"):
        load_config("sst2_moe_classifier", ["model.exits.layers=[1]", "model.exits.pooling=mean"])
