"""Conditional depth over a Transformer's layers: one method per layer, on the stage state.

The state is the dict a multi-exit model carries between layers (``x`` [B, S, D], ``mask`` [B, S]
or None, plus each mode's bookkeeping, all with the batch first so early-exit compaction can drop
samples). :meth:`TransformerDepth.layer` runs block ``i`` under the mode and returns the new state
with the MoE records and one :class:`DepthAux`; :meth:`unit_flops` gives the same FLOPs from the
state before the layer (what ``stage_flops`` of a multi-exit model must report).

Halting is per token: a halted token keeps its state, which still serves as key and value (state
copying), and later layers update only the running tokens (queries packed per sequence), so the
FLOPs saved are computed nowhere. Skipping is per sample: a gate on the mean-pooled input.
Mixture-of-depths is per token with top-C, or the causal predictor rule (``mod_rule="causal"``).
Shape legend: B batch, S sequence, Q packed queries per sequence, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.config import ModelConfig
from dynamoe.depth import halting as H
from dynamoe.depth import mixture_of_depths as MoD
from dynamoe.depth.records import DepthAux, transformer_block_flops
from dynamoe.depth.skipping import SkipGate, run_gated

ACT_KEYS = ("running", "cum", "rem", "steps", "acc")
PONDER_KEYS = ("running", "survive", "cdf", "steps")


def pack_rows(sel_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each sequence's selected tokens, first and in order, padded to the largest
    count: (q_idx [B, Q], q_valid [B, Q])."""
    counts = sel_BS.sum(1)
    Q = int(counts.max()) if sel_BS.numel() else 0
    order = torch.argsort((~sel_BS).to(torch.int8), dim=1, stable=True)
    q_idx = order[:, :Q]
    q_valid = torch.arange(Q, device=sel_BS.device)[None, :] < counts[:, None]
    return q_idx, q_valid


def _pool(x_BSD: torch.Tensor, mask_BS: torch.Tensor | None) -> torch.Tensor:
    if mask_BS is None:
        return x_BSD.mean(dim=1)
    m = mask_BS.unsqueeze(-1).to(x_BSD.dtype)
    return (x_BSD * m).sum(1) / m.sum(1).clamp_min(1.0)


def full_block_flops(cfg: ModelConfig, block, B: int, S: int) -> float:
    return sum(transformer_block_flops(cfg, block.is_moe, B * S, B * S * S).values())


def plain_layer(cfg: ModelConfig, i: int, block, state: dict, kind: str = "dense") -> tuple[dict, list]:
    """Block ``i`` on every token, as the plain backbone runs it."""
    x, aux = block(state["x"], state["mask"])
    B, S = x.shape[:2]
    flops = transformer_block_flops(cfg, block.is_moe, B * S, B * S * S)
    record = DepthAux(i, kind, B * S, B * S, flops, full_block_flops(cfg, block, B, S))
    return {**state, "x": x}, ([] if aux is None else [aux]) + [record]


class TransformerDepth(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        d = cfg.depth
        self.cfg, self.dcfg, self.causal = cfg, d, causal
        L, D = cfg.n_layers, cfg.d_model
        self.halting = self.gates = self.routers = None
        if d.mode in ("act", "pondernet"):  # the last layer needs none: every token halts there
            self.halting = nn.ModuleList(H.HaltingUnit(D, d.halt_bias_init) for _ in range(L - 1))
        elif d.mode == "skip":
            self.gates = nn.ModuleList(SkipGate(D, d) for _ in range(L))
        elif d.mode == "mod":
            hidden = d.predictor_hidden if causal else None  # an encoder may read the whole sequence
            self.routers = nn.ModuleDict({str(i): MoD.MoDRouter(D, hidden) for i in range(L) if (i + 1) % d.mod_every == 0})
        # Skip at inference: run a gated block only on the samples that execute it. Off runs every
        # sample and mixes, as training does (the two must agree; a test holds it).
        self.compaction = True

    def set_progress(self, fraction: float) -> None:
        for gate in self.gates or []:
            gate.set_progress(fraction)

    # --- state ----------------------------------------------------------------------------------

    def start(self, state: dict, mod_rule: str = "top_c") -> dict:
        x, mask = state["x"], state["mask"]
        B, S = x.shape[:2]
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        mode = self.dcfg.mode
        if mode == "act":
            return {**state, **H.act_start((B, S), x.shape, valid, x.dtype, x.device)}
        if mode == "pondernet" and not self.training:
            return {**state, **H.pondernet_start((B, S), valid, x.device)}
        if mode == "pondernet":
            return {**state, "pn_states": [], "pn_h": []}
        if mode == "mod":
            if mod_rule not in ("top_c", "causal"):
                raise ValueError(f"mod_rule must be 'top_c' or 'causal', got {mod_rule!r}")
            if mod_rule == "causal" and not self.causal:
                raise ValueError("mod_rule 'causal' is the decoding rule of a decoder; an encoder routes with top-C")
            return {**state, "mod_rule": mod_rule}
        return state

    def output(self, state: dict) -> torch.Tensor:
        """The hidden state the final head reads: ACT's weighted sum, else the last state."""
        return state["acc"] if self.dcfg.mode == "act" else state["x"]

    # --- one layer ------------------------------------------------------------------------------

    def layer(self, i: int, block, state: dict) -> tuple[dict, list]:
        mode = self.dcfg.mode
        if mode == "act" or (mode == "pondernet" and not self.training):
            return self._halting_layer(i, block, state)
        if mode == "pondernet":
            new, records = plain_layer(self.cfg, i, block, state, "pondernet")
            h = self.halting[i](new["x"]) if i < len(self.halting) else None
            if h is not None:
                records[-1].flops["halting"] = F_.linear_flops(h.numel(), self.cfg.d_model, 1)
            return {**new, "pn_states": state["pn_states"] + [new["x"]],
                    "pn_h": state["pn_h"] + ([] if h is None else [h])}, records
        if mode == "skip":
            return self._skip_layer(i, block, state)
        if str(i) in self.routers:
            return self._mod_layer(i, block, state)
        return plain_layer(self.cfg, i, block, state, "mod")

    def unit_flops(self, i: int, block, state: dict) -> float:
        """FLOPs of layer ``i`` on ``state`` (the state before it), as :meth:`layer` will report them."""
        mode = self.dcfg.mode
        B, S = state["x"].shape[:2]
        if mode == "act" or (mode == "pondernet" and not self.training):
            flops = self._halting_flops(i, block, state["running"])
        elif mode == "skip":
            with torch.no_grad():
                logits = self.gates[i].logits(_pool(state["x"], state["mask"]))
            flops = self._skip_flops(i, block, (logits[:, 1] > logits[:, 0]).sum(), B, S)
        elif mode == "mod" and str(i) in self.routers:
            flops = self._mod_topc_flops(i, block, B, S)
        else:
            flops = transformer_block_flops(self.cfg, block.is_moe, B * S, B * S * S)
        return float(sum(flops.values()))

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

    def _halting_layer(self, i: int, block, state: dict) -> tuple[dict, list]:
        x, mask, running = state["x"], state["mask"], state["running"]
        B, S, D = x.shape
        flops = self._halting_flops(i, block, running)
        q_idx, q_valid = pack_rows(running)
        records, h = [], None
        last = i == self.cfg.n_layers - 1
        if q_idx.shape[1] > 0:
            rows, flat, aux = block.forward_rows(x, q_idx, q_valid, mask, keys="all")
            x = x.reshape(B * S, D).index_copy(0, flat, rows).view(B, S, D)
            if aux is not None:
                records.append(aux)
            if not last:
                h = torch.zeros(B * S, device=x.device).index_copy(0, flat, self.halting[i](rows)).view(B, S)
        elif not last:
            h = torch.zeros(B, S, device=x.device)
        d = self.dcfg
        loss, stats = None, {}
        if d.mode == "act":
            st = H.act_update({k: state[k] for k in ACT_KEYS}, x, h, d.halt_threshold)
            if last:
                ponder = H.ponder_cost(st)
                valid = torch.ones_like(running) if mask is None else mask.bool()
                loss = d.ponder_cost * ponder[valid].mean()
                stats["ponder"] = ponder[valid].mean().detach()
        else:
            st = H.pondernet_update({k: state[k] for k in PONDER_KEYS}, h, d.halt_quantile)
        record = DepthAux(i, d.mode, B * S, running.sum(), flops, full_block_flops(self.cfg, block, B, S), loss=loss,
                          stats=stats)
        return {**state, "x": x, **st}, records + [record]

    def _skip_flops(self, i: int, block, executed, B: int, S: int) -> dict:
        flops = transformer_block_flops(self.cfg, block.is_moe, executed * S, executed * S * S)
        flops["gate"] = self.gates[i].flops(B)
        return flops

    def _skip_layer(self, i: int, block, state: dict) -> tuple[dict, list]:
        x, mask = state["x"], state["mask"]
        B, S = x.shape[:2]
        g = self.gates[i](_pool(x, mask))

        def run(xx, mm):
            y, aux = block(xx, mm)
            return y, ([] if aux is None else [aux])

        x, records = run_gated(run, x, g, not self.training and self.compaction, mask)
        executed = (g > 0.5).sum()
        record = DepthAux(i, "skip", B * S, executed * S, self._skip_flops(i, block, executed, B, S),
                          full_block_flops(self.cfg, block, B, S), rate=g.mean())
        return {**state, "x": x}, records + [record]

    def _mod_topc_flops(self, i: int, block, B: int, S: int) -> dict:
        C = MoD.capacity_tokens(self.dcfg.capacity, S)
        flops = transformer_block_flops(self.cfg, block.is_moe, B * C, B * C * C)
        flops.update(self.routers[str(i)].flops(B * S, predictor=True))
        return flops

    def _mod_layer(self, i: int, block, state: dict) -> tuple[dict, list]:
        x, mask = state["x"], state["mask"]
        B, S, D = x.shape
        d, router = self.dcfg, self.routers[str(i)]
        scores = router.scores(x)
        C = MoD.capacity_tokens(d.capacity, S)
        idx = MoD.top_c(scores.detach(), C, mask)
        topc = torch.zeros(B, S, dtype=torch.bool, device=x.device).scatter(1, idx, True)
        pred = router.predict(x) if router.predictor is not None else None
        loss, stats, records = None, {}, []
        if pred is not None:
            loss = d.predictor_loss_coef * MoD.predictor_loss(pred, topc, mask)
            stats["predictor_agreement"] = ((pred > 0) == topc).float().mean().detach()
        if state.get("mod_rule", "top_c") == "top_c":
            gather = idx.unsqueeze(-1).expand(B, C, D)
            xs = x.gather(1, gather)
            y, aux = block(xs, None if mask is None else mask.gather(1, idx))
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
        if aux is not None:
            records.append(aux)
        flops.update(router.flops(B * S, predictor=pred is not None))
        record = DepthAux(i, "mod", B * S, executed, flops, full_block_flops(self.cfg, block, B, S), loss=loss, stats=stats)
        return {**state, "x": x}, records + [record]
