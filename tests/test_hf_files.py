"""Hugging Face model folders: sharded safetensors with their index written and read tensor by
tensor, transformers reading what we write, and every bad folder refused by name."""

import json

import pytest
import torch

from dynamoe.interop.hf_files import INDEX_FILE, HFCheckpoint, HFFormatError, write_folder


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [(f"layer.{i}.weight", torch.randn(64, 64, generator=g)) for i in range(5)]


def test_sharded_write_and_tensor_by_tensor_read(tmp_path):
    tensors = _tensors()
    out = write_folder(tmp_path / "out", {"model_type": "x"}, iter(tensors), max_shard_bytes=2 * 64 * 64 * 4)
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    ckpt = HFCheckpoint(out)
    assert ckpt.config == {"model_type": "x"} and ckpt.names() == [n for n, _ in tensors]
    for name, t in tensors:
        assert torch.equal(ckpt.get(name), t)
    assert not (tmp_path / "out.partial").exists()


def test_transformers_reads_the_index_we_write(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    model = LlamaForCausalLM(cfg)
    state = model.state_dict()
    out = write_folder(tmp_path / "llama", cfg.to_dict(), state.items(), max_shard_bytes=4096)
    assert (out / INDEX_FILE).exists()
    loaded = LlamaForCausalLM.from_pretrained(out)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_bad_folders_are_refused_by_name(tmp_path):
    with pytest.raises(HFFormatError, match="has no config.json"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HFFormatError, match="neither model.safetensors.index.json nor model.safetensors"):
        HFCheckpoint(tmp_path)
    out = write_folder(tmp_path / "sharded", {}, iter(_tensors()), max_shard_bytes=64 * 64 * 4)
    (out / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(HFFormatError, match="shard 'model-00002-of-00005.safetensors' named in .* is missing"):
        HFCheckpoint(out)
    with pytest.raises(HFFormatError, match="exists and is not empty"):
        write_folder(out, {}, iter(_tensors()))


def test_a_failed_write_leaves_no_folder(tmp_path):
    def failing():
        yield "a", torch.zeros(2)
        raise RuntimeError("the model could not give its next tensor")

    with pytest.raises(RuntimeError, match="the model could not give its next tensor"):
        write_folder(tmp_path / "out", {}, failing())
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
