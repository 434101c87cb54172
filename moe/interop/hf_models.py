"""Hugging Face MoE language models in and out of dynamoe's modern decoder, tensor by tensor.

Import (:func:`import_model`): a family's config.json becomes a ``ModelConfig``
(``dynamoe.interop.hf_configs``), the model is built on the meta device and every parameter is
filled from the checkpoint as it is read, one tensor (one expert) at a time; a tensor the model
needs and the checkpoint lacks, or one the checkpoint has and the model would drop, is an error.
Export (:func:`export_model`): a checkpoint's fp32 weights (every expert, gathered at save time)
become the family's tensor names in the layout ``save_pretrained`` writes (one tensor per expert
and projection), with the family's config.json and the run's tokenizer.

Name mapping, per layer i (HF ``model.layers.i.`` -> dynamoe ``blocks.i.``):
input_layernorm -> ln1, post_attention_layernorm -> ln2, self_attn.{q,k,v,o}_proj / q_norm /
k_norm -> attn.*, dense mlp.{gate,up,down}_proj -> ffn.w_in ([gate; up] rows) / ffn.w_out; MoE
gate -> ffn.router.gate, gate.e_score_correction_bias -> ffn.router.expert_bias, experts e's
gate/up/down -> ffn.experts.w1_EDF[e] = [gate^T | up^T], w2_EFD[e] = down^T, shared_experts ->
ffn.shared; embed_tokens -> tok_emb, norm -> ln_f, lm_head -> head.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamoe.config import ModelConfig, to_dict
from dynamoe.interop.hf_configs import Family, choose_family, family_of, to_hf_config, to_model_config
from dynamoe.interop.hf_files import HFCheckpoint, HFFormatError, opened, resolve_source, write_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _moe_prefix(family: Family, i: int) -> str:
    return f"model.layers.{i}.block_sparse_moe" if family.model_type == "mixtral" else f"model.layers.{i}.mlp"


def _expert_names(family: Family, i: int, e: int) -> tuple[str, str, str]:
    """(gate, up, down) weight names of expert e in layer i, as save_pretrained writes them."""
    p = f"{_moe_prefix(family, i)}.experts.{e}"
    if family.model_type == "mixtral":
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def _plain_names(cfg: ModelConfig, family: Family) -> Iterator[tuple[str, str]]:
    """(HF name, dynamoe name) of every tensor copied as it is."""
    yield "model.embed_tokens.weight", "tok_emb.weight"
    yield "model.norm.weight", "ln_f.weight"
    if not cfg.tie_embeddings:
        yield "lm_head.weight", "head.weight"
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        yield hf + "input_layernorm.weight", ours + "ln1.weight"
        yield hf + "post_attention_layernorm.weight", ours + "ln2.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{hf}self_attn.{proj}.weight", f"{ours}attn.{proj}.weight"
        if cfg.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                yield f"{hf}self_attn.{proj}.bias", f"{ours}attn.{proj}.bias"
        if cfg.out_bias:
            yield f"{hf}self_attn.o_proj.bias", f"{ours}attn.o_proj.bias"
        if cfg.qk_norm != "none":
            yield f"{hf}self_attn.q_norm.weight", f"{ours}attn.q_norm.weight"
            yield f"{hf}self_attn.k_norm.weight", f"{ours}attn.k_norm.weight"
        if cfg.is_moe_layer(i):
            yield f"{_moe_prefix(family, i)}.gate.weight", f"{ours}ffn.router.gate.weight"


def _swiglu_pairs(cfg: ModelConfig, family: Family) -> Iterator[tuple[str, str, str]]:
    """(HF prefix of gate/up/down, dynamoe w_in, dynamoe w_out) of dense and shared SwiGLU FFNs."""
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.mlp", f"blocks.{i}.ffn"
        if not cfg.is_moe_layer(i):
            yield hf, f"{ours}.w_in.weight", f"{ours}.w_out.weight"
        elif cfg.moe.num_shared_experts:
            yield f"{hf}.shared_experts", f"{ours}.shared.w_in.weight", f"{ours}.shared.w_out.weight"


# --- import ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    config: ModelConfig
    model: torch.nn.Module
    family: str
    source: Path


def import_model(name_or_path: str) -> Imported:
    """A dynamoe model (fp32, modern decoder) with the weights of a Hugging Face folder or hub model."""
    from dynamoe.models import build_model

    folder = resolve_source(name_or_path)
    with opened(folder) as ckpt:
        family = family_of(ckpt.config)
        cfg = to_model_config(ckpt.config)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = build_model(cfg)
        filled = _fill(model, cfg, family, ckpt)
        unused = sorted(set(ckpt.names()) - filled)
        if unused:
            raise HFFormatError(
                f"'{folder}' holds tensors this {family.model_type} import does not place ({', '.join(unused[:5])}"
                f"{', ...' if len(unused) > 5 else ''}); fix: the checkpoint has options its config.json does not "
                "declare, or an architecture dynamoe does not cover"
            )
    model.eval()
    return Imported(cfg, model, family.model_type, folder)


def shareable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied tensor copied under its second name (safetensors stores no
    shared storage; loading ties them again)."""
    seen, state = set(), {}
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        state[name] = t.detach().clone() if ptr in seen else t.detach()
        seen.add(ptr)
    return state


def _read(ckpt: HFCheckpoint, name: str, shape: tuple, filled: set) -> torch.Tensor:
    t = ckpt.get(name)
    if t.dtype not in DTYPES.values():
        raise HFFormatError(
            f"tensor '{name}' is {t.dtype}, which dynamoe does not import; fix: convert the checkpoint to bf16 or fp32"
        )
    if tuple(t.shape) != tuple(shape):
        raise HFFormatError(
            f"tensor '{name}' has shape {tuple(t.shape)}, config.json implies {tuple(shape)}; fix: the checkpoint "
            "and its config.json disagree"
        )
    filled.add(name)
    return t.float()


def _fill(model: torch.nn.Module, cfg: ModelConfig, family: Family, ckpt: HFCheckpoint) -> set:
    """Give every parameter and buffer of a meta-device ``model`` its value; returns the HF names read."""
    own = dict(model.named_parameters(remove_duplicate=False))
    values: dict[str, torch.Tensor] = {}
    filled: set[str] = set()
    for hf_name, name in _plain_names(cfg, family):
        values[name] = _read(ckpt, hf_name, own[name].shape, filled)
    for hf, w_in, w_out in _swiglu_pairs(cfg, family):
        F2, D = own[w_in].shape
        gate = _read(ckpt, f"{hf}.gate_proj.weight", (F2 // 2, D), filled)
        up = _read(ckpt, f"{hf}.up_proj.weight", (F2 // 2, D), filled)
        values[w_in] = torch.cat([gate, up], dim=0)
        values[w_out] = _read(ckpt, f"{hf}.down_proj.weight", own[w_out].shape, filled)
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        ours = f"blocks.{i}.ffn"
        E, D, F2 = own[f"{ours}.experts.w1_EDF"].shape
        F = F2 // 2
        w1 = torch.empty(E, D, F2)
        w2 = torch.empty(E, F, D)
        fused = f"{_moe_prefix(family, i)}.experts.gate_up_proj"
        if fused in ckpt:  # transformers' in-memory layout, as some converted checkpoints keep it
            w1.copy_(_read(ckpt, fused, (E, F2, D), filled).transpose(1, 2))
            w2.copy_(_read(ckpt, f"{_moe_prefix(family, i)}.experts.down_proj", (E, D, F), filled).transpose(1, 2))
        else:
            for e in range(E):  # one expert at a time
                gate_name, up_name, down_name = _expert_names(family, i, e)
                w1[e, :, :F] = _read(ckpt, gate_name, (F, D), filled).t()
                w1[e, :, F:] = _read(ckpt, up_name, (F, D), filled).t()
                w2[e] = _read(ckpt, down_name, (D, F), filled).t()
        values[f"{ours}.experts.w1_EDF"], values[f"{ours}.experts.w2_EFD"] = w1, w2
        bias_name = f"{_moe_prefix(family, i)}.gate.e_score_correction_bias"
        if bias_name in ckpt:
            values[f"{ours}.router.expert_bias"] = _read(ckpt, bias_name, (E,), filled)
    if cfg.tie_embeddings:
        values["head.weight"] = values["tok_emb.weight"]
    missing = sorted(set(own) - set(values))
    if missing:
        raise HFFormatError(f"no checkpoint tensor for {', '.join(missing[:5])}; this is a bug in the importer")
    # Buffers not in the checkpoint start as a freshly built model's do: every buffer dynamoe's
    # models register (router bias, load and statistics counters) starts at zero.
    persistent = set(model.state_dict()) - set(own)
    state = {
        **{k: torch.zeros_like(v, device="cpu") for k, v in model.state_dict().items() if k in persistent},
        **values,
    }
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:  # non-persistent: not in any state dict
                module._buffers[name] = torch.zeros_like(buf, device="cpu")
    if cfg.tie_embeddings:  # assign gave each name its own Parameter: tie them again
        model.head.weight = model.tok_emb.weight
    return filled


# --- export ------------------------------------------------------------------------------------


def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, family: Family, dtype: torch.dtype):
    """(HF name, tensor) pairs of a dynamoe state dict in global form, one tensor at a time."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype).contiguous()

    for hf_name, name in _plain_names(cfg, family):
        yield hf_name, cast(state[name])
    for hf, w_in, w_out in _swiglu_pairs(cfg, family):
        gate, up = state[w_in].chunk(2, dim=0)
        yield f"{hf}.gate_proj.weight", cast(gate)
        yield f"{hf}.up_proj.weight", cast(up)
        yield f"{hf}.down_proj.weight", cast(state[w_out])
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        ours = f"blocks.{i}.ffn"
        w1, w2 = state[f"{ours}.experts.w1_EDF"], state[f"{ours}.experts.w2_EFD"]
        F = w2.shape[1]
        for e in range(w1.shape[0]):
            gate_name, up_name, down_name = _expert_names(family, i, e)
            yield gate_name, cast(w1[e, :, :F].t())
            yield up_name, cast(w1[e, :, F:].t())
            yield down_name, cast(w2[e].t())
        bias = state.get(f"{ours}.router.expert_bias")
        if family.router == "sigmoid":
            yield f"{_moe_prefix(family, i)}.gate.e_score_correction_bias", bias.detach().float().contiguous()
        elif bias is not None and bool(bias.any()):
            raise HFFormatError(
                f"model: block {i}'s router has a nonzero selection bias, which a {family.model_type} checkpoint "
                "cannot hold; fix: export to glm4_moe (--family glm4_moe)"
            )


@dataclass(frozen=True)
class ExportedHF:
    path: Path
    family: str
    step: int
    checkpoint: Path
    tokenizer: bool


def export_model(
    source: Path, out: Path, *, family: str | None = None, dtype: str = "float32", max_shard_bytes: int | None = None
) -> ExportedHF:
    """A checkpoint, a run folder's newest intact checkpoint, or a file written by ``moe export`` /
    ``moe import``, as a Hugging Face model folder (with the run's tokenizer where it has one)."""
    from dynamoe.config import ModelConfig, from_dict
    from dynamoe.data.tokenizer_files import TOKENIZER_FOLDER
    from dynamoe.training.checkpoint import is_checkpoint_folder, load_checkpoint, load_newest_intact, read_exported

    source = Path(source)
    tokenizer = None
    if source.is_file():
        metadata, state = read_exported(source)
        folder, model_config, step = source, json.loads(metadata["model_config"]), int(metadata.get("step", 0))
    else:
        if is_checkpoint_folder(source):
            folder, (state, _, trainer_state) = source, load_checkpoint(source)
        else:
            folder, (state, _, trainer_state), _ = load_newest_intact(source)
        model_config, step = trainer_state["model_config"], int(trainer_state["step"])
        run_tokenizer = folder.parent.parent / TOKENIZER_FOLDER
        tokenizer = run_tokenizer if run_tokenizer.is_dir() else None
    cfg = from_dict(ModelConfig, model_config, "model")
    if cfg.kind == "hf_encoder":
        from dynamoe.interop.hf_encoder_export import export_encoder

        labels_file = None if source.is_file() else folder.parent.parent / "labels.json"
        labels = json.loads(labels_file.read_text()) if labels_file is not None and labels_file.exists() else None
        encoder = export_encoder(
            state, cfg, Path(out), tokenizer=tokenizer, labels=labels, provenance={"step": step, "source": str(folder)}
        )
        return ExportedHF(encoder.path, encoder.architecture, step, folder, tokenizer is not None)
    path, fam = write_hf(
        state,
        cfg,
        Path(out),
        family=family,
        dtype=dtype,
        tokenizer=tokenizer,
        provenance={"step": step, "source": str(folder)},
        max_shard_bytes=max_shard_bytes,
    )
    return ExportedHF(path, fam.model_type, step, folder, tokenizer is not None)


def write_hf(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out: Path,
    *,
    family: str | None = None,
    dtype: str = "float32",
    tokenizer: Path | None = None,
    provenance: dict | None = None,
    max_shard_bytes: int | None = None,
) -> tuple[Path, Family]:
    """Write a dynamoe state dict (global form: every expert) as the family's model folder."""
    from dynamoe.data.tokenizer_files import TOKENIZER_FOLDER

    if dtype not in DTYPES:
        raise HFFormatError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}; fix: pick one")
    fam = choose_family(cfg, family)
    config = to_hf_config(cfg, fam)  # refuses what the family cannot hold, before anything is written
    config["torch_dtype"] = dtype
    extra = {TOKENIZER_FOLDER: tokenizer} if tokenizer is not None else {}
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        # Where the folder came from, so that dynamoe can tell its own exports (and their step) apart.
        record = Path(tmp) / "dynamoe.json"
        record.write_text(json.dumps({"model_config": to_dict(cfg), **(provenance or {})}))
        extra["dynamoe.json"] = record
        tensors = hf_tensors(state, cfg, fam, DTYPES[dtype])
        return write_folder(out, config, tensors, extra_files=extra, **kwargs), fam
