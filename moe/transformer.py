"""Transformer backbones with MoE FFNs: a decoder (causal LM) and an encoder (classifier).

Pre-LayerNorm blocks; layer i has an MoE FFN when ``cfg.is_moe_layer(i)`` and a dense FFN
otherwise. Every forward returns a :class:`ModelOutput` whose ``aux_loss`` sums the routers'
balancing and z-losses, so the trainer adds them without knowing where the MoE layers are.
Shape legend: B batch, S sequence, D model width, V vocabulary, C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.experts import DenseMLP
from moe.layer import MoEAux, MoELayer


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # task loss (cross-entropy), None without targets
    aux_loss: torch.Tensor | None = None  # summed router losses of all MoE layers
    moe: list[MoEAux] = field(default_factory=list)  # one entry per MoE layer, in depth order

    @property
    def total_loss(self) -> torch.Tensor:
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool, out_init_std: float):
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=out_init_std)

    def forward(self, x_BSD: torch.Tensor, key_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, S, Dh)
        attn_mask = None if key_mask_BS is None else key_mask_BS[:, None, None, :].bool()  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, causal: bool):
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual projections by depth
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, causal, out_std)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe, cfg.d_model, out_init_std=out_std)
        else:
            self.ffn = DenseMLP(cfg.d_model, cfg.d_ff, cfg.moe.activation)
            nn.init.normal_(self.ffn.w_out.weight, std=out_std)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.drop(self.attn(self.ln1(x), key_mask))
        aux = None
        if self.is_moe:
            h, aux = self.ffn(self.ln2(x))
        else:
            h = self.ffn(self.ln2(x))
        return x + self.drop(h), aux


class _Backbone(nn.Module):
    causal: bool

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset: build the data first (it sets the vocabulary) or set it")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, self.causal) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def hidden(self, idx_BS: torch.Tensor, key_mask_BS: torch.Tensor | None = None):
        """Final hidden states [B, S, D] and the MoE layers' aux records."""
        S = idx_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(S, device=idx_BS.device)
        x = self.drop(self.tok_emb(idx_BS) + self.pos_emb(pos))
        records = []
        for block in self.blocks:
            x, aux = block(x, key_mask_BS)
            if aux is not None:
                records.append(aux)
        return self.ln_f(x), records

    @staticmethod
    def _aux_total(records: list[MoEAux]) -> torch.Tensor | None:
        return sum((r.loss for r in records), start=records[0].loss.new_zeros(())) if records else None

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]


class TransformerLM(_Backbone):
    """GPT-style decoder: next-token prediction."""

    causal = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        h_BSD, records = self.hidden(input_ids)
        logits_BSV = self.head(h_BSD)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return ModelOutput(logits_BSV, loss, self._aux_total(records), records)


class TransformerClassifier(_Backbone):
    """BERT-style encoder with a pooled classification head."""

    causal = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.num_classes is None:
            raise ValueError("model.num_classes is unset: build the data first (it sets the classes) or set it")
        self.classifier = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> ModelOutput:
        h_BSD, records = self.hidden(input_ids, attention_mask)
        if self.cfg.pooling == "first":
            pooled_BD = h_BSD[:, 0]
        elif attention_mask is None:
            pooled_BD = h_BSD.mean(dim=1)
        else:
            m = attention_mask.unsqueeze(-1).to(h_BSD.dtype)
            pooled_BD = (h_BSD * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits_BC = self.classifier(pooled_BD)
        loss = None if labels is None else F.cross_entropy(logits_BC.float(), labels)
        return ModelOutput(logits_BC, loss, self._aux_total(records), records)


def build_model(cfg: ModelConfig) -> _Backbone:
    return TransformerLM(cfg) if cfg.kind == "decoder" else TransformerClassifier(cfg)
