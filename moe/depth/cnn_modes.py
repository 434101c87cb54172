"""Conditional depth over a CNN's blocks, per sample: one class per mode, chosen by :func:`build_cnn_depth`.

The unit is a residual block and its pointwise MoE. The mode asks the model to run a unit
(``model.run_unit(i, x)``) and to count a unit's FLOPs on some samples
(``model.unit_flops_by_component(i, n, H, W)``), so it never depends on how the blocks are built.

skip: a gate on the pooled input of every block with an identity shortcut (not the first block,
which follows the stem, nor the downsampling blocks, whose input cannot pass on unchanged) runs
the block or passes the input on; at inference the block runs only on the samples that execute it.
act: adaptive computation time within each stage (its blocks share a shape): the stage's output is
the halting-weighted sum of its blocks' outputs, and a halted sample leaves the stage's later
blocks (compaction, in training too: BatchNorm then sees the running samples only).
Shape legend: B batch, C channels, H/W feature-map height/width.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.config import ModelConfig
from dynamoe.depth import halting as H
from dynamoe.depth.records import DepthAux
from dynamoe.depth.skipping import SkipGate, run_gated
from dynamoe.stage import StageRecords, StageState


class CnnDepthMode(nn.Module):
    """A depth mode over CNN units; the base runs every unit on every sample."""

    mode = "dense"

    def __init__(self, cfg: ModelConfig, units: list[tuple[int, int]], shortcut: list[bool]):
        super().__init__()
        self.cfg, self.dcfg = cfg, cfg.depth

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1], for schedules inside the mode (Gumbel temperature)."""

    def run(self, model, i: int, state: StageState, x: torch.Tensor) -> tuple[StageState, StageRecords]:
        """Unit ``i`` on ``x`` (the unit's input: the stem's output for the first)."""
        return plain_unit(model, i, state, x, self.mode)

    def unit_flops(self, model, i: int, state: StageState) -> float:
        """FLOPs of unit ``i`` on ``state`` (the state before it), as :meth:`run` will report them."""
        B, _, H_in, W_in = state.x.shape
        return float(sum(model.unit_flops_by_component(i, B, H_in, W_in).values()))


def plain_unit(
    model, i: int, state: StageState, x: torch.Tensor, kind: str = "dense"
) -> tuple[StageState, StageRecords]:
    B, _, H_in, W_in = state.x.shape
    x, moe = model.run_unit(i, x)
    flops = model.unit_flops_by_component(i, B, H_in, W_in)
    return state.replace(x=x), StageRecords(tuple(moe), DepthAux(i, kind, B, B, flops, sum(flops.values())))


class CnnSkipDepth(CnnDepthMode):
    mode = "skip"

    def __init__(self, cfg: ModelConfig, units: list[tuple[int, int]], shortcut: list[bool]):
        super().__init__(cfg, units, shortcut)
        channels = cfg.cnn.channels
        self.gates = nn.ModuleDict(
            {str(i): SkipGate(channels[s], self.dcfg) for i, (s, _) in enumerate(units) if i > 0 and shortcut[i]}
        )
        if not len(self.gates):
            raise ValueError(
                "model.depth.mode skip: no block can be skipped (each is the first or downsamples); "
                "fix: raise model.cnn.blocks_per_stage to 2 or more"
            )
        # At inference run a gated block only on the samples that execute it. Off runs every
        # sample and mixes, as training does (the two must agree; a test holds it).
        self.compaction = True

    def set_progress(self, fraction: float) -> None:
        for gate in self.gates.values():
            gate.set_progress(fraction)

    def run(self, model, i, state, x):
        if str(i) not in self.gates:
            return plain_unit(model, i, state, x)
        B, _, H_in, W_in = x.shape
        gate = self.gates[str(i)]
        g = gate(x.mean(dim=(2, 3)))
        x, moe = run_gated(lambda rows: model.run_unit(i, rows), x, g, not self.training and self.compaction)
        executed = (g > 0.5).sum()
        flops = {**model.unit_flops_by_component(i, executed, H_in, W_in), "gate": gate.flops(B)}
        full = sum(model.unit_flops_by_component(i, B, H_in, W_in).values())
        record = DepthAux(i, self.mode, B, executed, flops, full, rate=g.mean())
        return state.replace(x=x), StageRecords(tuple(moe), record)

    def unit_flops(self, model, i, state):
        if str(i) not in self.gates:
            return super().unit_flops(model, i, state)
        B, _, H_in, W_in = state.x.shape
        gate = self.gates[str(i)]
        with torch.no_grad():
            logits = gate.logits(state.x.mean(dim=(2, 3)))
        executed = (logits[:, 1] > logits[:, 0]).sum()
        return sum(model.unit_flops_by_component(i, executed, H_in, W_in).values()) + gate.flops(B)


class CnnActDepth(CnnDepthMode):
    """ACT within each stage; ``ActState.ponder`` sums each sample's N + R over the stages."""

    mode = "act"

    def __init__(self, cfg: ModelConfig, units: list[tuple[int, int]], shortcut: list[bool]):
        super().__init__(cfg, units, shortcut)
        self.units = units
        per_stage = cfg.cnn.blocks_per_stage
        self.halting = nn.ModuleDict(
            {
                str(i): H.HaltingUnit(cfg.cnn.channels[s], self.dcfg.halt_bias_init)
                for i, (s, b) in enumerate(units)
                if b < per_stage - 1
            }
        )

    def _halting_flops(self, i: int, executed) -> dict:
        unit = self.halting[str(i)] if str(i) in self.halting else None
        return {} if unit is None else {"halting": F_.linear_flops(executed, unit.linear.in_features, 1)}

    def run(self, model, i, state, x):
        """The first block of a stage runs every sample and starts the stage's halting; later ones
        run the samples still going, and the last one ends the stage with its halting-weighted output."""
        s, b = self.units[i]
        B, _, H_in, W_in = x.shape
        d = self.dcfg
        moe = []
        if b == 0:
            x, moe = model.run_unit(i, x)
            running = torch.ones(B, dtype=torch.bool, device=x.device)
            ponder = state.depth.ponder if state.depth is not None else torch.zeros(B, device=x.device)
            st = H.act_start((B,), x.shape, running, x.dtype, x.device, ponder=ponder)
            idx = None
            executed = B
        else:
            st = state.depth
            idx = st.running.nonzero().squeeze(1)
            executed = st.running.sum()
            if idx.numel():
                y, moe = model.run_unit(i, x.index_select(0, idx))
                x = x.index_copy(0, idx, y)
        unit = self.halting[str(i)] if str(i) in self.halting else None
        h = None
        flops = {**model.unit_flops_by_component(i, executed, H_in, W_in), **self._halting_flops(i, executed)}
        if unit is not None:
            pooled = x.mean(dim=(2, 3))
            h = (
                unit(pooled)
                if idx is None
                else torch.zeros(B, device=x.device).index_copy(0, idx, unit(pooled.index_select(0, idx)))
            )
        st = H.act_update(st, x, h, d.halt_threshold)
        loss, stats = None, {}
        if unit is None:  # the stage's last block: its output is the weighted sum
            st = H.ActState(st.running, st.cum, st.rem, st.steps, st.acc, st.ponder + H.ponder_cost(st))
            x = st.acc
            if i == len(self.units) - 1:
                loss = d.ponder_cost * st.ponder.mean()
                stats = {"ponder": st.ponder.mean().detach()}
        full = sum(model.unit_flops_by_component(i, B, H_in, W_in).values())
        record = DepthAux(i, self.mode, B, executed, flops, full, loss=loss, stats=stats)
        return state.replace(x=x, depth=st), StageRecords(tuple(moe), record)

    def unit_flops(self, model, i, state):
        B, _, H_in, W_in = state.x.shape
        executed = B if self.units[i][1] == 0 else state.depth.running.sum()
        flops = {**model.unit_flops_by_component(i, executed, H_in, W_in), **self._halting_flops(i, executed)}
        return sum(flops.values())


CNN_DEPTH_MODES: dict[str, type[CnnDepthMode]] = {"none": CnnDepthMode, "skip": CnnSkipDepth, "act": CnnActDepth}


def build_cnn_depth(cfg: ModelConfig, units: list[tuple[int, int]], shortcut: list[bool]) -> CnnDepthMode:
    """The depth mode ``cfg.depth.mode`` asks for (``none``: every unit on every sample).
    ``shortcut[i]``: unit ``i`` passes its input on unchanged when skipped (an identity shortcut)."""
    if cfg.depth.mode not in CNN_DEPTH_MODES:
        raise ValueError(
            f"model.depth.mode {cfg.depth.mode!r} has no CNN implementation; fix: use one of {sorted(CNN_DEPTH_MODES)}"
        )
    return CNN_DEPTH_MODES[cfg.depth.mode](cfg, units, shortcut)
