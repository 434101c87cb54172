"""Hugging Face MoE language models in and out, against transformers' own modules: tiny random
models of each family built here (no network), imported with equal logits, exported back to the
same tensors, and loaded by transformers from what dynamoe writes."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dynamoe.config import load_config
from dynamoe.interop.hf_files import HFFormatError
from dynamoe.interop.hf_models import export_model, import_model, shareable_state, write_hf

COMMON = dict(
    vocab_size=65,  # the character tokenizer of Tiny Shakespeare, so imported models can fine-tune on it
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, rope_theta=5000.0),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=12, mlp_only_layers=[1]),
    ),
    "qwen3_moe_norm": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
    ),
    "olmoe": (
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24, norm_topk_prob=False, clip_qkv=3.0),
    ),
    "glm4_moe": (
        transformers.Glm4MoeConfig,
        transformers.Glm4MoeForCausalLM,
        dict(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=True,
            head_dim=8,
        ),
    ),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=500000.0)),
}


def _hf_model(name: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra})).eval()
    with torch.no_grad():  # norms and biases away from their initial ones and zeros, so they count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(0.05 * torch.randn_like(module.e_score_correction_bias))
    return model


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    model = _hf_model(name)
    model.save_pretrained(folder / "hf", max_shard_size="40KB")  # sharded, with an index
    return name, model, folder


def test_imported_logits_equal_transformers(family):
    name, hf, folder = family
    assert (folder / "hf" / "model.safetensors.index.json").exists()
    imported = import_model(str(folder / "hf"))
    from dynamoe.models import build_model

    fresh = dict(build_model(imported.config).named_buffers())
    for name, buf in imported.model.named_buffers():  # none left on the meta device, all as built
        assert buf.device.type == "cpu" and name in fresh
        if "expert_bias" not in name:
            assert torch.equal(buf, fresh[name]), name
    ids = torch.randint(0, COMMON["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = imported.model(ids).logits, hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    tied = imported.model.head.weight is imported.model.tok_emb.weight
    assert tied == bool(hf.config.tie_word_embeddings)  # one parameter, as training must see it


def test_hf_to_dynamoe_to_hf_gives_identical_tensors_and_transformers_loads_it(family):
    name, hf, folder = family
    imported = import_model(str(folder / "hf"))
    out, fam = write_hf(shareable_state(imported.model), imported.config, folder / "back", max_shard_bytes=30_000)
    assert fam.model_type == hf.config.model_type
    original, written = _tensors(folder / "hf"), _tensors(out)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    reloaded = type(hf).from_pretrained(out).eval()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_unsupported_configs_are_refused_by_field(tmp_path):
    model = _hf_model("mixtral")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())

    def with_config(**changes):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **changes}))
        return str(tmp_path / "m")

    with pytest.raises(HFFormatError, match="model_type: 'gpt2' is not supported"):
        import_model(with_config(model_type="gpt2"))
    with pytest.raises(HFFormatError, match="model_type: 'deepseek_v3' .*latent attention"):
        import_model(with_config(model_type="deepseek_v3"))
    with pytest.raises(HFFormatError, match="rope_type: 'yarn'"):
        import_model(with_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    with pytest.raises(HFFormatError, match="hidden_act: 'gelu'"):
        import_model(with_config(hidden_act="gelu"))
    with pytest.raises(HFFormatError, match="sliding_window: 16"):
        import_model(with_config(sliding_window=16))
    with pytest.raises(HFFormatError, match="has shape .* config.json implies"):
        import_model(with_config(num_local_experts=8))
    with pytest.raises(HFFormatError, match="has no config.json"):
        import_model(str(tmp_path))
    with pytest.raises(HFFormatError, match="neither a folder nor a hub name"):
        import_model(str(tmp_path / "nothing" / "here"))


def test_a_tensor_the_import_would_drop_or_an_odd_dtype_is_refused(tmp_path):
    model = _hf_model("mixtral")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "model.layers.0.self_attn.rotary.extra": torch.zeros(3)}, weights)
    with pytest.raises(HFFormatError, match="does not place .*rotary.extra"):
        import_model(str(tmp_path / "m"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, weights)
    with pytest.raises(HFFormatError, match="'model.norm.weight' is torch.int32"):
        import_model(str(tmp_path / "m"))


def test_export_refuses_what_the_family_cannot_hold_and_writes_nothing(tmp_path):
    from dynamoe.models import build_model

    gpt2 = load_config("debug_tiny", ["model.vocab_size=65"]).model
    with pytest.raises(HFFormatError, match="block gpt2.*fix: train a decoder with model.block: modern"):
        write_hf(build_model(gpt2).state_dict(), gpt2, tmp_path / "out")
    imported = import_model(_saved(tmp_path, "mixtral"))
    with pytest.raises(HFFormatError, match="qk_norm none .*qwen3_moe|qk_norm"):
        write_hf(shareable_state(imported.model), imported.config, tmp_path / "out", family="qwen3_moe")
    with pytest.raises(HFFormatError, match="sigmoid routing|softmax routing"):
        write_hf(shareable_state(imported.model), imported.config, tmp_path / "out", family="glm4_moe")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _saved(tmp_path, name):
    folder = tmp_path / f"saved_{name}"
    if not folder.exists():
        _hf_model(name).save_pretrained(folder)
    return str(folder)


def test_moe_import_writes_a_model_train_init_from_takes(tmp_path):
    from dynamoe.launch.cli import main
    from dynamoe.training.checkpoint import load_exported

    source = _saved(tmp_path, "olmoe")
    out = tmp_path / "olmoe.safetensors"
    assert main(["import", source, str(out), "--config", str(tmp_path / "run.yaml")]) == 0
    cfg, model = load_exported(out)
    hf = transformers.OlmoeForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    run = load_config(str(tmp_path / "run.yaml"), ["train.steps=2", "data.seq_len=16", "train.batch_size=2"])
    assert run.train.init_from == str(out.resolve()) and run.model.block == "modern"
    # And back out from the imported file, no training in between: the same tensors.
    assert main(["export", str(out), str(tmp_path / "hf_again"), "--format", "hf"]) == 0
    original, written = _tensors(tmp_path / "saved_olmoe"), _tensors(tmp_path / "hf_again")
    assert all(torch.equal(written[k], v) for k, v in original.items()) and sorted(written) == sorted(original)


def test_a_run_exports_with_its_character_tokenizer(tmp_path):
    from dynamoe.training.trainer import train

    sets = [
        "model.block=modern",
        "model.moe.activation=swiglu",
        "model.n_kv_heads=1",
        "model.tie_embeddings=false",
        "model.moe.router.normalize=true",
        "train.steps=2",
        "train.eval_every=0",
        "train.warmup_steps=1",
        "train.checkpoint_every=0",
    ]
    cfg = load_config("debug_tiny", sets)
    train(cfg, run_dir=str(tmp_path / "run"), progress=False)
    result = export_model(tmp_path / "run", tmp_path / "hf")
    assert result.family == "mixtral" and result.tokenizer and result.step == 2
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("ROMEO: hi")])
    from dynamoe.training.checkpoint import load_model

    _, ours = load_model(tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_an_expert_parallel_fine_tune_exports_every_expert_and_its_bias(tmp_path):
    from dynamoe.training.checkpoint import load_checkpoint, load_model

    from dist_helper import torchrun_train

    sets = [
        "model.d_model=32",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.n_layers=3",
        "model.d_ff=48",
        "model.max_seq_len=32",
        "model.first_dense_layers=1",
        "model.qk_norm=per_head",
        "model.qkv_bias=true",
        "model.rope_fraction=0.5",
        "model.moe.num_experts=8",
        "model.moe.d_expert=16",
        "model.moe.num_shared_experts=1",
        "model.moe.router.top_k=3",
        "model.moe.router.score=sigmoid",
        "model.moe.router.aux_free_bias=true",
        "model.moe.router.bias_update_rate=0.01",
        "model.moe.router.n_group=4",
        "model.moe.router.topk_group=2",
        "model.moe.router.routed_scaling_factor=2.0",
        "model.moe.router.aux_loss_coef=0",
        "data.seq_len=32",
        "train.steps=6",
        "train.batch_size=4",
        "train.eval_every=0",
        "train.warmup_steps=1",
        "parallel.ep_size=2",
    ]
    args = ["modern_moe_lm", "--run-dir", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    torchrun_train(2, *args)
    result = export_model(tmp_path / "run", tmp_path / "hf", dtype="float32")
    assert result.family == "glm4_moe" and result.tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    state, _, _ = load_checkpoint(result.checkpoint)
    for i in (1, 2):  # both MoE layers: all 8 experts, gathered from the two ranks, and the learned bias
        bias = state[f"blocks.{i}.ffn.router.expert_bias"]
        assert bias.abs().sum() > 0
        assert torch.equal(hf.model.layers[i].mlp.gate.e_score_correction_bias, bias)
        assert hf.model.layers[i].mlp.experts.gate_up_proj.shape[0] == 8
    _, ours = load_model(tmp_path / "run")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok.encode("KING RICHARD III:\nNow is the")])
    with torch.no_grad():
        assert torch.allclose(ours.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_train_init_from_takes_a_hugging_face_folder(tmp_path):
    from dynamoe.config import ConfigError
    from dynamoe.launch.cli import main
    from dynamoe.training.trainer import Trainer

    source = _saved(tmp_path, "qwen3_moe_norm")
    assert main(["import", source, str(tmp_path / "q.safetensors"), "--config", str(tmp_path / "run.yaml")]) == 0
    sets = [f"train.init_from={source}", "train.steps=1", "data.seq_len=16", "train.batch_size=2"]
    trainer = Trainer(load_config(str(tmp_path / "run.yaml"), sets), run_dir=str(tmp_path / "run"), progress=False)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.allclose(trainer.model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    other = load_config("debug_tiny", [f"train.init_from={source}"])
    with pytest.raises(ConfigError, match=r"holds a different model .*moe import FOLDER OUT --config"):
        Trainer(other, run_dir=str(tmp_path / "other"), progress=False)
    with pytest.raises(ConfigError, match="neither a file nor a Hugging Face model folder"):
        load_config("debug_tiny", [f"train.init_from={tmp_path}"])
