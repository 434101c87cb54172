"""Transformer backbones with MoE FFNs: a decoder (causal LM) and an encoder (classifier).

Pre-norm blocks, ``cfg.block``: the GPT-2 block (LayerNorm, learned positions, fused QKV) or the
modern one (RMSNorm, rotary positions, grouped-query attention, SwiGLU: ``dynamoe.models.modern``).
Layer i has an MoE FFN when ``cfg.is_moe_layer(i)`` and a dense FFN otherwise. Every forward
returns a :class:`ModelOutput` whose ``aux_loss`` sums the routers' balancing and z-losses, so the
trainer adds them without knowing where the MoE layers are.
Shape legend: B batch, S sequence, D model width, V vocabulary, C classes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.config import ModelConfig
from dynamoe.depth import depth_loss
from dynamoe.depth.halting import expected_steps, halting_distribution, pondernet_loss
from dynamoe.depth.transformer_modes import build_transformer_depth, plain_layer
from dynamoe.exits.heads import (
    ExitHead,
    HeadOutput,
    PolicyState,
    active_exits,
    exit_loss,
    exit_score,
    thresholds_for,
)
from dynamoe.exits.multi_exit import MultiExitModel
from dynamoe.layers.experts import DenseMLP
from dynamoe.layers.moe_layer import MoEAux, MoELayer
from dynamoe.layers.recompute import checkpointed
from dynamoe.models.base import DynamoeModel
from dynamoe.models.modern import GroupedQueryAttention, make_norm
from dynamoe.models.output import ModelOutput, aux_total, classification_output
from dynamoe.models.pooling import masked_mean
from dynamoe.stage import RecordLog, StageRecords, StageState


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool, out_init_std: float):
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.q_width = self.kv_width = d_model  # read by the FLOP counts
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=out_init_std)

    def forward(
        self,
        x_BSD: torch.Tensor,
        key_mask_BS: torch.Tensor | None = None,
        *,
        rows: tuple | None = None,
        positions: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Self-attention over the whole sequence, or, with ``rows = (q_pos, x_kv, k_pos, k_valid)``,
        for the query rows ``x_BSD`` only against the key rows ``x_kv`` (:meth:`attend`), or, with
        ``cache`` (a ``dynamoe.generation.kv_cache.LayerCache``), for new tokens against the cached
        keys and values (:meth:`attend_cached`). All go through the module call, so forward hooks
        (compute accounting) see every use. ``positions`` is not read: this block's positions are
        in the embeddings (learned), so gathered tokens keep theirs."""
        if cache is not None:
            return self.attend_cached(x_BSD, cache)
        if rows is not None:
            return self.attend(x_BSD, *rows)
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, S, Dh)
        attn_mask = None if key_mask_BS is None else key_mask_BS[:, None, None, :].bool()  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        return self.proj(y.transpose(1, 2).reshape(B, S, D))

    def attend(
        self,
        xq_BQD: torch.Tensor,
        q_pos_BQ: torch.Tensor,
        xkv_BKD: torch.Tensor,
        k_pos_BK: torch.Tensor,
        k_valid_BK: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention for some query rows against some key rows, each with its sequence position
        (causal order by position); ``k_valid`` marks real keys. Only the queries' Q and output
        projections and the keys' K and V are computed."""
        B, Q, D = xq_BQD.shape
        K = xkv_BKD.shape[1]
        Dh = D // self.n_heads
        q = F.linear(xq_BQD, self.qkv.weight[:D]).view(B, Q, self.n_heads, Dh).transpose(1, 2)  # (B, H, Q, Dh)
        k, v = (
            t.view(B, K, self.n_heads, Dh).transpose(1, 2) for t in F.linear(xkv_BKD, self.qkv.weight[D:]).split(D, -1)
        )
        allowed = torch.ones(B, Q, K, dtype=torch.bool, device=xq_BQD.device)
        if self.causal:
            allowed = k_pos_BK[:, None, :] <= q_pos_BQ[:, :, None]
        if k_valid_BK is not None:
            allowed = allowed & k_valid_BK[:, None, :].bool()
        # A query always sees itself, so padding queries have no empty row (no NaN to mask later).
        allowed = allowed | (k_pos_BK[:, None, :] == q_pos_BQ[:, :, None])
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, Q, D))

    def attend_cached(self, x_BnD: torch.Tensor, cache) -> torch.Tensor:
        """New tokens ``x`` [B, n, D] (at the cache step's positions) against every cached key at
        or before their position: their K and V are written into the cache first."""
        B, n, D = x_BnD.shape
        q, k, v = (
            t.view(B, n, self.n_heads, D // self.n_heads).transpose(1, 2) for t in self.qkv(x_BnD).split(D, dim=-1)
        )
        k_all, v_all = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=cache.mask)
        return self.proj(y.transpose(1, 2).reshape(B, n, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, causal: bool):
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual projections by depth
        self.ln1 = make_norm(cfg)
        if cfg.block == "modern":
            self.attn = GroupedQueryAttention(cfg, causal, out_std)
        else:
            self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, causal, out_std)
        self.ln2 = make_norm(cfg)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe, cfg.d_model, out_init_std=out_std)
            self.ffn.block_index = layer
        else:
            self.ffn = DenseMLP(cfg.d_model, cfg.d_ff, cfg.moe.activation)
            nn.init.normal_(self.ffn.w_out.weight, std=out_std)
        self.drop = nn.Dropout(cfg.dropout)

    checkpointing = False  # set_activation_checkpointing: keep only the input for backward

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux | None]:
        """The block on every token of ``x``; ``positions`` [B, S] are the tokens' sequence
        positions when ``x`` holds some tokens of longer sequences (mixture-of-depths gathers them;
        rotary attention needs them), default 0..S-1."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed(self._forward, x, key_mask, positions)
        return self._forward(x, key_mask, positions)

    def _forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.drop(self.attn(self.ln1(x), key_mask, positions=positions))
        aux = None
        if self.is_moe:
            h, aux = self.ffn(self.ln2(x))
        else:
            h = self.ffn(self.ln2(x))
        return x + self.drop(h), aux

    def forward_cached(self, x_BnD: torch.Tensor, cache) -> torch.Tensor:
        """The block on new tokens only (incremental decoding, eval mode), their attention reading
        earlier tokens' keys and values from ``cache`` (a ``LayerCache``) and adding their own.
        The FFN sees each token alone, which is what a full pass does with dropless token-choice
        routing (``dynamoe.generation.decode.check_decodable`` refuses the rest)."""
        x = x_BnD + self.drop(self.attn(self.ln1(x_BnD), cache=cache))
        h = self.ffn(self.ln2(x))
        if self.is_moe:
            h = h[0]
        return x + self.drop(h)

    def forward_rows(
        self,
        x_BSD: torch.Tensor,
        q_idx_BQ: torch.Tensor,
        q_valid_BQ: torch.Tensor,
        key_mask_BS: torch.Tensor | None = None,
        keys: str = "all",
    ):
        """The block for some tokens only: positions ``q_idx`` of each sequence (``q_valid`` marks
        real ones; the rest is padding). Keys are every token (``keys="all"``: halting, where halted
        tokens still serve as keys) or the chosen tokens only (``"queries"``: mixture-of-depths).
        Returns the chosen tokens' new states [T, D], their flat positions in [B * S] and the MoE
        aux record (None for a dense FFN); the FFN runs on the T real tokens only."""
        B, S, D = x_BSD.shape
        xq = x_BSD.gather(1, q_idx_BQ.unsqueeze(-1).expand(-1, -1, D))  # (B, Q, D)
        hq = self.ln1(xq)
        if keys == "all":
            hkv, k_pos = self.ln1(x_BSD), torch.arange(S, device=x_BSD.device).expand(B, S)
            k_valid = key_mask_BS
        else:
            hkv, k_pos = hq, q_idx_BQ
            k_valid = q_valid_BQ if key_mask_BS is None else q_valid_BQ & key_mask_BS.gather(1, q_idx_BQ).bool()
        xq = xq + self.drop(self.attn(hq, rows=(q_idx_BQ, hkv, k_pos, k_valid)))
        rows = xq[q_valid_BQ]  # (T, D): real tokens only from here on
        aux = None
        if self.is_moe:
            h, aux = self.ffn(self.ln2(rows))
        else:
            h = self.ffn(self.ln2(rows))
        flat = (torch.arange(B, device=x_BSD.device)[:, None] * S + q_idx_BQ)[q_valid_BQ]
        return rows + self.drop(h), flat, aux


class _Backbone(DynamoeModel):
    causal: bool

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset: build the data first (it sets the vocabulary) or set it")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Rotary attention puts positions into queries and keys; there is no position table.
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position_kind == "learned" else None
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, self.causal) for i in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        self.depth = build_transformer_depth(cfg, self.causal)

    def _embed(self, idx_BS: torch.Tensor) -> torch.Tensor:
        S = idx_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(idx_BS)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(S, device=idx_BS.device))
        return self.drop(x)

    def embed_at(self, idx_Bn: torch.Tensor, positions_Bn: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokens at explicit sequence positions (incremental decoding: each row's
        new tokens sit at its own length), as :meth:`_embed` gives them inside a whole sequence."""
        x = self.tok_emb(idx_Bn)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions_Bn)
        return self.drop(x)

    def start_state(self, x_BSD: torch.Tensor, key_mask_BS: torch.Tensor | None, mod_rule: str = "top_c") -> StageState:
        state = StageState(x_BSD, key_mask_BS)
        return state if self.depth is None else self.depth.start(state, mod_rule)

    def run_layer(self, i: int, state: StageState) -> tuple[StageState, StageRecords]:
        """Layer ``i`` on the state (under the depth mode, if any): the new state and the layer's records."""
        if self.depth is None:
            new, records = plain_layer(self.cfg, i, self.blocks[i], state)
            rate = self.layer_drop_rate(i)
            if rate and self.training:
                # LayerSkip's layer dropout, per sequence: a dropped sequence keeps its input.
                keep = torch.rand(state.x.shape[0], device=state.x.device) >= rate
                new = new.replace(x=torch.where(keep[:, None, None], new.x, state.x))
            return new, records
        return self.depth.layer(i, self.blocks[i], state)

    def layer_drop_rate(self, i: int) -> float:
        """Training-time probability that a sequence skips layer ``i`` (``exits.layer_dropout``)."""
        L = len(self.blocks)
        return self.cfg.exits.layer_dropout * i / (L - 1) if L > 1 else 0.0

    def final_state(self, state: StageState) -> torch.Tensor:
        """The residual stream the final head reads (ACT: the halting-weighted sum of states)."""
        return state.x if self.depth is None else self.depth.output(state)

    def hidden(
        self, idx_BS: torch.Tensor, key_mask_BS: torch.Tensor | None = None, mod_rule: str = "top_c"
    ) -> tuple[torch.Tensor, RecordLog, StageState]:
        """Final hidden states [B, S, D], the records of every layer, and the last state."""
        state = self.start_state(self._embed(idx_BS), key_mask_BS, mod_rule)
        log = RecordLog()
        for i in range(len(self.blocks)):
            state, records = self.run_layer(i, state)
            log.add(records)
        return self.ln_f(self.final_state(state)), log, state

    def set_depth_progress(self, fraction: float) -> None:
        if self.depth is not None:
            self.depth.set_progress(fraction)

    def set_activation_checkpointing(self, mode: str) -> None:
        """Blocks that halting or mixture-of-depths runs on some tokens only (``forward_rows``) are
        not checkpointed; every other block call is."""
        for block in self.blocks:
            block.checkpointing = mode == "blocks" or (mode == "moe_blocks" and block.is_moe)

    def layer_flops(self, i: int, batch: int, seq: int) -> int:
        """FLOPs of block ``i`` on ``batch`` sequences of ``seq`` tokens (dropless routing)."""
        cfg = self.cfg
        tokens = batch * seq
        ffn = (
            F_.moe_ffn_flops(tokens, cfg.d_model, cfg.moe)
            if self.blocks[i].is_moe
            else F_.dense_ffn_flops(tokens, cfg.d_model, cfg.d_ff, cfg.moe.activation)
        )
        return F_.attention_flops(batch, seq, cfg.d_model, *F_.attention_widths(cfg)) + ffn


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

        # Per-token early exits: a norm per exit in front of the shared output projection.
        self.exit_cfg = cfg.exits
        self.exit_norms = nn.ModuleList(make_norm(cfg) for _ in cfg.exits.layers)
        self.exit_predictors = nn.ModuleList(
            nn.Linear(cfg.d_model, 1) for _ in (cfg.exits.layers if cfg.exits.policy == "learned" else [])
        )

        self.active_exits: list[bool] | None = None  # the exit curriculum's choice at this step

    @property
    def num_exits(self) -> int:
        return len(self.exit_cfg.layers) + 1 if self.exit_cfg.enabled else 0

    def early_exit_parameters(self) -> list[nn.Parameter]:
        return [*self.exit_norms.parameters(), *self.exit_predictors.parameters()]

    def set_training_step(self, step: int, steps: int) -> None:
        if self.exit_cfg.curriculum != "none":
            self.active_exits = active_exits(self.exit_cfg, step, steps)

    def _exit_head(self, j: int, x_BSD: torch.Tensor) -> HeadOutput:
        if j == len(self.exit_norms):
            return HeadOutput(self.head(self.ln_f(x_BSD)))
        h = self.exit_norms[j](x_BSD)
        pred = self.exit_predictors[j](h.detach()).squeeze(-1) if len(self.exit_predictors) else None
        if self.exit_phase == "exits":  # two-stage, second stage: the shared head is the frozen backbone's
            return HeadOutput(F.linear(h, self.head.weight.detach()), pred)
        return HeadOutput(self.head(h), pred)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, mod_rule: str = "top_c"
    ) -> ModelOutput:
        """``mod_rule``: mixture-of-depths routing by top-C over the sequence (training, and the
        reference), or "causal", the decoding rule (each token's predictor decides)."""
        if self.depth is not None and self.depth.trains_on_halting_distribution and self.training:
            return self._pondernet_forward(input_ids, labels)
        if not self.exit_cfg.enabled:
            h_BSD, log, _ = self.hidden(input_ids, mod_rule=mod_rule)
            logits_BSV = self.head(h_BSD)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            return ModelOutput(
                logits_BSV,
                loss,
                aux_total(log.moe),
                log.moe,
                depth=log.depth,
                depth_loss=depth_loss(log.depth, self.cfg.depth),
            )
        state = self.start_state(self._embed(input_ids), None, mod_rule)
        heads, log = [], RecordLog()
        exit_after = {layer - 1: j for j, layer in enumerate(self.exit_cfg.layers)}
        for i in range(len(self.blocks)):
            state, records = self.run_layer(i, state)
            log.add(records)
            if i in exit_after:  # in two-stage training's second stage the backbone is frozen
                x_BSD = state.x.detach() if self.exit_phase == "exits" else state.x
                heads.append(self._exit_head(exit_after[i], x_BSD))
        heads.append(self._exit_head(len(self.exit_norms), self.final_state(state)))
        loss, per_exit = None, []
        if labels is not None:
            flat = [
                HeadOutput(h.logits.flatten(0, 1), None if h.predictor is None else h.predictor.flatten())
                for h in heads
            ]
            active = self.active_exits if self.training else None  # evaluation scores every exit
            loss, per_exit = exit_loss(self.exit_cfg, flat, labels.flatten(), self.exit_phase, active=active)
        return ModelOutput(
            heads[-1].logits,
            loss,
            aux_total(log.moe),
            log.moe,
            heads,
            per_exit,
            log.depth,
            depth_loss(log.depth, self.cfg.depth),
            backbone_frozen=self.exit_phase == "exits",
        )

    def _pondernet_forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> ModelOutput:
        """PonderNet training: every layer on every token; the loss is the task loss expected under
        each token's halting distribution, plus the KL to the geometric prior (the depth loss)."""
        _, log, state = self.hidden(input_ids)
        p_LBS = halting_distribution(list(state.depth.halting))
        logits_L = [self.head(self.ln_f(s)) for s in state.depth.states]
        loss = kl = None
        if labels is not None:
            ce_LT = torch.stack(
                [
                    F.cross_entropy(lg.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
                    for lg in logits_L
                ]
            )
            d = self.cfg.depth
            loss, kl = pondernet_loss(p_LBS.flatten(1), ce_LT, labels.flatten() != -100, d.lambda_p, d.kl_coef)
        last = log.depth[-1]
        stats = {**last.stats, "expected_layers": expected_steps(p_LBS.flatten(1)).mean().detach()}
        depth = log.depth[:-1] + [dataclasses.replace(last, loss=kl if kl is not None else last.loss, stats=stats)]
        return ModelOutput(logits_L[-1], loss, aux_total(log.moe), log.moe, depth=depth, depth_loss=kl)

    @torch.no_grad()
    def generate_exit_eval(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        policy: str | None = None,
        thresholds: list[float] | None = None,
    ) -> dict:
        """Per-token early exit on a whole sequence, with state copying (CALM): a token that exits
        keeps its hidden state for the later layers, which still read it as a key and value, so the
        causal computation stays well defined. Returns the loss of the exits the tokens chose and
        the layers each token ran; the FLOPs saved are those of a KV-cache decoder that skips the
        exited tokens' later layers (this dense pass computes them and discards them)."""
        if self.depth is not None:
            raise ValueError(
                "generate_exit_eval runs the plain layers; with model.depth use forward(..., mod_rule=...)"
            )
        cfg = self.exit_cfg
        policy = policy or cfg.policy
        thresholds = thresholds_for(cfg) if thresholds is None else thresholds
        x = self._embed(input_ids)
        B, S = input_ids.shape
        active = torch.ones(B, S, dtype=torch.bool, device=x.device)
        chosen = torch.zeros(B, S, self.cfg.vocab_size, device=x.device)
        layers = torch.full((B, S), self.cfg.n_layers, dtype=torch.long, device=x.device)
        exit_after = {layer - 1: j for j, layer in enumerate(cfg.layers)}
        pstate = PolicyState()
        for i, block in enumerate(self.blocks):
            y, _ = block(x)
            x = torch.where(active.unsqueeze(-1), y, x)
            if i in exit_after:
                j = exit_after[i]
                head = self._exit_head(j, x)
                flat = HeadOutput(
                    head.logits.flatten(0, 1), None if head.predictor is None else head.predictor.flatten()
                )
                score, pstate = exit_score(policy, flat, pstate)
                leave = (score.view(B, S) >= thresholds[j]) & active
                chosen[leave] = head.logits[leave].float()
                layers[leave] = i + 1
                active &= ~leave
        final = self._exit_head(len(self.exit_norms), x)
        chosen[active] = final.logits[active].float()
        loss = F.cross_entropy(chosen.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"loss": float(loss), "layers_per_token": layers.float(), "mean_layers": float(layers.float().mean())}


class TransformerClassifier(_Backbone, MultiExitModel):
    """BERT-style encoder with a pooled classification head, and optional early exits."""

    causal = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.num_classes is None:
            raise ValueError("model.num_classes is unset: build the data first (it sets the classes) or set it")
        self.classifier = nn.Linear(cfg.d_model, cfg.num_classes)
        self.exit_cfg = cfg.exits
        # The residual stream of a pre-LN model is not normalised: each exit gets its own norm.
        self.exit_norms = nn.ModuleList(make_norm(cfg) for _ in cfg.exits.layers)
        self.exit_heads = nn.ModuleList(
            ExitHead(cfg.d_model, cfg.num_classes, cfg.exits.head_hidden, cfg.dropout, cfg.exits.policy == "learned")
            for _ in cfg.exits.layers
        )

    @property
    def num_stages(self) -> int:
        return self.cfg.n_layers

    def early_exit_parameters(self) -> list[nn.Parameter]:
        return [*self.exit_norms.parameters(), *self.exit_heads.parameters()]

    def begin(self, batch: dict) -> StageState:
        return self.start_state(self._embed(batch["input_ids"]), batch.get("attention_mask"))

    def run_stage(self, i: int, state: StageState) -> tuple[StageState, StageRecords]:
        return self.run_layer(i, state)

    def _pool(self, h_BSD: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return h_BSD[:, 0] if self.cfg.pooling == "first" else masked_mean(h_BSD, mask)  # auto: mean

    def run_head(self, j: int, state: StageState) -> HeadOutput:
        if j == len(self.exit_heads):
            return HeadOutput(self.classifier(self._pool(self.ln_f(self.final_state(state)), state.mask)))
        return self.exit_heads[j](self._pool(self.exit_norms[j](state.x), state.mask))

    def stage_flops(self, i: int, state: StageState) -> float:
        if self.depth is not None:
            return self.depth.unit_flops(i, self.blocks[i], state)
        B, S = state.x.shape[:2]
        return float(self.layer_flops(i, B, S))

    def head_flops(self, j: int, state: StageState) -> float:
        B = state.batch_size
        if j == len(self.exit_heads):
            return float(F_.linear_flops(B, self.cfg.d_model, self.cfg.num_classes))
        return float(B * self.exit_heads[j].flops())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> ModelOutput:
        heads, log = self.forward_heads({"input_ids": input_ids, "attention_mask": attention_mask})
        return classification_output(self, heads, log, labels)
