"""Conditional depth over a Transformer's layers: one class per mode, chosen by :func:`build_transformer_depth`.

A mode works on the :class:`StageState` a model carries between layers (``x`` [B, S, D], ``mask``
[B, S] or None, and the mode's own bookkeeping in ``state.depth``, batch first so early-exit
compaction can drop samples). :meth:`TransformerDepthMode.layer` runs block ``i`` under the mode
and returns the new state with the block's MoE records and one :class:`DepthAux`;
:meth:`~TransformerDepthMode.unit_flops` gives the same FLOPs from the state before the layer (what
``stage_flops`` of a multi-exit model must report).

Halting is per token: a halted token keeps its state, which still serves as key and value (state
copying), and later layers update only the running tokens (queries packed per sequence), so the
FLOPs saved are computed nowhere. Skipping is per sample: a gate on the mean-pooled input.
Mixture-of-depths is per token with top-C, or the causal predictor rule (``mod_rule="causal"``).
Shape legend: B batch, S sequence, Q packed queries per sequence, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.compute.flops import transformer_block_flops
from dynamoe.config import ModelConfig
from dynamoe.depth import halting as H
from dynamoe.depth import mixture_of_depths as MoD
from dynamoe.depth.records import DepthAux
from dynamoe.depth.skipping import SkipGate, run_gated
from dynamoe.models.pooling import masked_mean
from dynamoe.stage import StageRecords, StageState

MOD_RULES = ("top_c", "causal")


@dataclass(frozen=True)
class PonderTrace:
    """PonderNet training: every layer's output and the halting probability after it (batch first)."""

    states: tuple = ()
    halting: tuple = ()


@dataclass(frozen=True)
class ModRule:
    """Mixture-of-depths: which routing rule this pass uses (``top_c`` or the decoding rule ``causal``)."""

    rule: str = "top_c"


def pack_rows(sel_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each sequence's selected tokens, first and in order, padded to the largest
    count: (q_idx [B, Q], q_valid [B, Q])."""
    counts = sel_BS.sum(1)
    Q = int(counts.max()) if sel_BS.numel() else 0
    order = torch.argsort((~sel_BS).to(torch.int8), dim=1, stable=True)
    q_idx = order[:, :Q]
    q_valid = torch.arange(Q, device=sel_BS.device)[None, :] < counts[:, None]
    return q_idx, q_valid


def full_block_flops(cfg: ModelConfig, block, B: int, S: int) -> float:
    return sum(transformer_block_flops(cfg, block.is_moe, B * S, B * S * S).values())


def moe_records(aux) -> tuple:
    return () if aux is None else (aux,)


def plain_layer(
    cfg: ModelConfig, i: int, block, state: StageState, kind: str = "dense"
) -> tuple[StageState, StageRecords]:
    """Block ``i`` on every token, as the plain backbone runs it."""
    x, aux = block(state.x, state.mask)
    B, S = x.shape[:2]
    flops = transformer_block_flops(cfg, block.is_moe, B * S, B * S * S)
    record = DepthAux(i, kind, B * S, B * S, flops, full_block_flops(cfg, block, B, S))
    return state.replace(x=x), StageRecords(moe_records(aux), record)


def plain_layer_flops(cfg: ModelConfig, block, state: StageState) -> float:
    B, S = state.x.shape[:2]
    return float(full_block_flops(cfg, block, B, S))


class TransformerDepthMode(nn.Module):
    """One conditional-depth mode over a Transformer's layers (the base runs every layer plainly)."""

    mode = "dense"
    # PonderNet trains on the task loss expected under the halting distribution: the model's
    # training forward reads every layer's state (state.depth) instead of the last one.
    trains_on_halting_distribution = False

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.cfg, self.dcfg, self.causal = cfg, cfg.depth, causal

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1], for schedules inside the mode (Gumbel temperature)."""

    def start(self, state: StageState, mod_rule: str = "top_c") -> StageState:
        return state

    def output(self, state: StageState) -> torch.Tensor:
        """The hidden state the final head reads."""
        return state.x

    def layer(self, i: int, block, state: StageState) -> tuple[StageState, StageRecords]:
        return plain_layer(self.cfg, i, block, state, self.mode)

    def unit_flops(self, i: int, block, state: StageState) -> float:
        """FLOPs of layer ``i`` on ``state`` (the state before it), as :meth:`layer` will report them."""
        return plain_layer_flops(self.cfg, block, state)


class _HaltingDepth(TransformerDepthMode):
    """Per-token halting: a halting unit after every layer but the last (every token halts there)."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__(cfg, causal)
        self.halting = nn.ModuleList(
            H.HaltingUnit(cfg.d_model, self.dcfg.halt_bias_init) for _ in range(cfg.n_layers - 1)
        )

    def _halting_flops(self, i: int, block, running_BS: torch.Tensor) -> dict:
        B, S = running_BS.shape
        Q = int(running_BS.sum(1).max()) if running_BS.numel() else 0
        if Q == 0:
            return {}
        executed = running_BS.sum()
        # Queries are packed to Q per sequence (padding included); keys are every token's state.
        flops = transformer_block_flops(self.cfg, block.is_moe, B * Q, B * Q * S, kv_rows=B * S, ffn_rows=executed)
        if i < len(self.halting):
            flops["halting"] = F_.linear_flops(executed, self.cfg.d_model, 1)
        return flops

    def unit_flops(self, i: int, block, state: StageState) -> float:
        return float(sum(self._halting_flops(i, block, state.depth.running).values()))

    def _update(self, bookkeeping, x: torch.Tensor, h: torch.Tensor | None):
        """The mode's bookkeeping after this layer (``h`` None: the last layer)."""
        raise NotImplementedError

    def _final_loss(self, bookkeeping, valid_BS: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """The mode's loss and statistics after the last layer."""
        return None, {}

    def layer(self, i: int, block, state: StageState) -> tuple[StageState, StageRecords]:
        x, mask, running = state.x, state.mask, state.depth.running
        B, S, D = x.shape
        flops = self._halting_flops(i, block, running)
        q_idx, q_valid = pack_rows(running)
        moe, h = (), None
        last = i == self.cfg.n_layers - 1
        if q_idx.shape[1] > 0:
            rows, flat, aux = block.forward_rows(x, q_idx, q_valid, mask, keys="all")
            x = x.reshape(B * S, D).index_copy(0, flat, rows).view(B, S, D)
            moe = moe_records(aux)
            if not last:
                h = torch.zeros(B * S, device=x.device).index_copy(0, flat, self.halting[i](rows)).view(B, S)
        elif not last:
            h = torch.zeros(B, S, device=x.device)
        bookkeeping = self._update(state.depth, x, h)
        loss, stats = None, {}
        if last:
            valid = torch.ones_like(running) if mask is None else mask.bool()
            loss, stats = self._final_loss(bookkeeping, valid)
        record = DepthAux(
            i, self.mode, B * S, running.sum(), flops, full_block_flops(self.cfg, block, B, S), loss=loss, stats=stats
        )
        return state.replace(x=x, depth=bookkeeping), StageRecords(moe, record)


class ActDepth(_HaltingDepth):
    """Adaptive computation time per token; the final head reads the halting-weighted sum of states."""

    mode = "act"

    def start(self, state: StageState, mod_rule: str = "top_c") -> StageState:
        x, mask = state.x, state.mask
        B, S = x.shape[:2]
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        return state.replace(depth=H.act_start((B, S), x.shape, valid, x.dtype, x.device))

    def output(self, state: StageState) -> torch.Tensor:
        return state.depth.acc

    def _update(self, bookkeeping, x, h):
        return H.act_update(bookkeeping, x, h, self.dcfg.halt_threshold)

    def _final_loss(self, bookkeeping, valid_BS):
        ponder = H.ponder_cost(bookkeeping)[valid_BS].mean()
        return self.dcfg.ponder_cost * ponder, {"ponder": ponder.detach()}


class PonderNetDepth(_HaltingDepth):
    """PonderNet: training runs every layer and records the halting distribution; inference halts
    each token where its halting CDF reaches ``halt_quantile``."""

    mode = "pondernet"
    trains_on_halting_distribution = True

    def start(self, state: StageState, mod_rule: str = "top_c") -> StageState:
        if self.training:
            return state.replace(depth=PonderTrace())
        x, mask = state.x, state.mask
        B, S = x.shape[:2]
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        return state.replace(depth=H.pondernet_start((B, S), valid, x.device))

    def _update(self, bookkeeping, x, h):
        return H.pondernet_update(bookkeeping, h, self.dcfg.halt_quantile)

    def layer(self, i: int, block, state: StageState) -> tuple[StageState, StageRecords]:
        if not self.training:
            return super().layer(i, block, state)
        new, records = plain_layer(self.cfg, i, block, state, self.mode)
        h = self.halting[i](new.x) if i < len(self.halting) else None
        record = records.depth
        if h is not None:
            flops = {**record.flops, "halting": F_.linear_flops(h.numel(), self.cfg.d_model, 1)}
            record = DepthAux(record.unit, record.kind, record.rows, record.executed, flops, record.full_flops)
        trace = PonderTrace(state.depth.states + (new.x,), state.depth.halting + (() if h is None else (h,)))
        return new.replace(depth=trace), StageRecords(records.moe, record)

    def unit_flops(self, i: int, block, state: StageState) -> float:
        if self.training:
            flops = plain_layer_flops(self.cfg, block, state)
            B, S = state.x.shape[:2]
            return flops + (F_.linear_flops(B * S, self.cfg.d_model, 1) if i < len(self.halting) else 0)
        return super().unit_flops(i, block, state)


class SkipDepth(TransformerDepthMode):
    """Per-sample gated skipping of every layer (a gate on the mean-pooled input)."""

    mode = "skip"

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__(cfg, causal)
        self.gates = nn.ModuleList(SkipGate(cfg.d_model, self.dcfg) for _ in range(cfg.n_layers))
        # At inference run a gated block only on the samples that execute it. Off runs every
        # sample and mixes, as training does (the two must agree; a test holds it).
        self.compaction = True

    def set_progress(self, fraction: float) -> None:
        for gate in self.gates:
            gate.set_progress(fraction)

    def _skip_flops(self, i: int, block, executed, B: int, S: int) -> dict:
        flops = transformer_block_flops(self.cfg, block.is_moe, executed * S, executed * S * S)
        flops["gate"] = self.gates[i].flops(B)
        return flops

    def unit_flops(self, i: int, block, state: StageState) -> float:
        B, S = state.x.shape[:2]
        with torch.no_grad():
            logits = self.gates[i].logits(masked_mean(state.x, state.mask))
        return float(sum(self._skip_flops(i, block, (logits[:, 1] > logits[:, 0]).sum(), B, S).values()))

    def layer(self, i: int, block, state: StageState) -> tuple[StageState, StageRecords]:
        x, mask = state.x, state.mask
        B, S = x.shape[:2]
        g = self.gates[i](masked_mean(x, mask))

        def run(xx, mm):
            y, aux = block(xx, mm)
            return y, list(moe_records(aux))

        x, moe = run_gated(run, x, g, not self.training and self.compaction, mask)
        executed = (g > 0.5).sum()
        record = DepthAux(
            i,
            self.mode,
            B * S,
            executed * S,
            self._skip_flops(i, block, executed, B, S),
            full_block_flops(self.cfg, block, B, S),
            rate=g.mean(),
        )
        return state.replace(x=x), StageRecords(tuple(moe), record)


class MoDDepth(TransformerDepthMode):
    """Mixture-of-depths every ``mod_every`` layers: top-C routing, or the causal predictor rule."""

    mode = "mod"

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__(cfg, causal)
        d = self.dcfg
        hidden = d.predictor_hidden if causal else None  # an encoder may read the whole sequence
        self.routers = nn.ModuleDict(
            {str(i): MoD.MoDRouter(cfg.d_model, hidden) for i in range(cfg.n_layers) if (i + 1) % d.mod_every == 0}
        )

    def start(self, state: StageState, mod_rule: str = "top_c") -> StageState:
        if mod_rule not in MOD_RULES:
            raise ValueError(f"mod_rule must be 'top_c' or 'causal', got {mod_rule!r}")
        if mod_rule == "causal" and not self.causal:
            raise ValueError("mod_rule 'causal' is the decoding rule of a decoder; an encoder routes with top-C")
        return state.replace(depth=ModRule(mod_rule))

    def _topc_flops(self, i: int, block, B: int, S: int) -> dict:
        C = MoD.capacity_tokens(self.dcfg.capacity, S)
        flops = transformer_block_flops(self.cfg, block.is_moe, B * C, B * C * C)
        flops.update(self.routers[str(i)].flops(B * S, predictor=True))
        return flops

    def unit_flops(self, i: int, block, state: StageState) -> float:
        if str(i) not in self.routers:
            return plain_layer_flops(self.cfg, block, state)
        B, S = state.x.shape[:2]
        return float(sum(self._topc_flops(i, block, B, S).values()))

    def layer(self, i: int, block, state: StageState) -> tuple[StageState, StageRecords]:
        if str(i) not in self.routers:
            return plain_layer(self.cfg, i, block, state, self.mode)
        x, mask = state.x, state.mask
        B, S, D = x.shape
        d, router = self.dcfg, self.routers[str(i)]
        scores = router.scores(x)
        C = MoD.capacity_tokens(d.capacity, S)
        idx = MoD.top_c(scores.detach(), C, mask)
        topc = torch.zeros(B, S, dtype=torch.bool, device=x.device).scatter(1, idx, True)
        pred = router.predict(x) if router.predictor is not None else None
        loss, stats = None, {}
        if pred is not None:
            loss = d.predictor_loss_coef * MoD.predictor_loss(pred, topc, mask)
            stats["predictor_agreement"] = ((pred > 0) == topc).float().mean().detach()
        if state.depth.rule == "top_c":
            gather = idx.unsqueeze(-1).expand(B, C, D)
            xs = x.gather(1, gather)
            # The chosen tokens keep their sequence positions (rotary attention reads them).
            y, aux = block(xs, None if mask is None else mask.gather(1, idx), positions=idx)
            out = MoD.scale_update(xs, y, MoD.router_weight(scores.gather(1, idx), d.router_weight))
            x = x.scatter(1, gather, out)
            executed = B * C
            flops = transformer_block_flops(self.cfg, block.is_moe, B * C, B * C * C)
        else:  # decoding: each token's own predictor decides; attention among the routed tokens
            chosen = pred > 0
            q_idx, q_valid = pack_rows(chosen)
            Q = q_idx.shape[1]
            aux = None
            if Q > 0:
                rows, flat, aux = block.forward_rows(x, q_idx, q_valid, mask, keys="queries")
                w = MoD.router_weight(scores.reshape(-1).index_select(0, flat), d.router_weight)
                flat_x = x.reshape(B * S, D)
                x = flat_x.index_copy(0, flat, MoD.scale_update(flat_x.index_select(0, flat), rows, w)).view(B, S, D)
            executed = chosen.sum()
            flops = transformer_block_flops(self.cfg, block.is_moe, B * Q, B * Q * Q, kv_rows=B * Q, ffn_rows=executed)
            stats["routed_fraction"] = chosen.float().mean().detach()
        flops.update(router.flops(B * S, predictor=pred is not None))
        record = DepthAux(
            i, self.mode, B * S, executed, flops, full_block_flops(self.cfg, block, B, S), loss=loss, stats=stats
        )
        return state.replace(x=x), StageRecords(moe_records(aux), record)


TRANSFORMER_DEPTH_MODES: dict[str, type[TransformerDepthMode]] = {
    "act": ActDepth,
    "pondernet": PonderNetDepth,
    "skip": SkipDepth,
    "mod": MoDDepth,
}


def build_transformer_depth(cfg: ModelConfig, causal: bool) -> TransformerDepthMode | None:
    """The depth mode ``cfg.depth.mode`` asks for, or None for ``none`` (the plain layers run)."""
    if not cfg.depth.enabled:
        return None
    if cfg.depth.mode not in TRANSFORMER_DEPTH_MODES:
        raise ValueError(
            f"model.depth.mode {cfg.depth.mode!r} has no Transformer implementation; "
            f"fix: use one of {sorted(TRANSFORMER_DEPTH_MODES)} or none"
        )
    return TRANSFORMER_DEPTH_MODES[cfg.depth.mode](cfg, causal)
