"""A ResNet-style image classifier whose blocks can carry MoE and whose stages carry early exits.

Stages of basic residual blocks (two 3x3 convolutions); every stage after the first halves the
feature map and widens it. A block marked MoE adds, on the residual, a pointwise MoE over the
feature-map positions: every (sample, row, column) is a token of width C, routed through the
same :class:`MoELayer` (and kernels) as the Transformers' tokens. Exits sit after chosen stages:
global average pooling, then an :class:`ExitHead`. BatchNorm runs on running statistics at
inference, so each sample's output is independent of the others and compaction is exact.

Conditional depth (``model.depth``), per sample, with a block and its MoE as the unit:
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
from dynamoe.depth import DepthAux
from dynamoe.depth import halting as H
from dynamoe.depth.skipping import SkipGate, run_gated
from dynamoe.exits.multi_exit import MultiExitModel, State
from dynamoe.exits.heads import ExitHead, HeadOutput
from dynamoe.layers.moe_layer import MoELayer
from dynamoe.models.transformer import ModelOutput, classification_output


class PointwiseMoE(nn.Module):
    """Pre-norm MoE over feature-map positions, added on the residual."""

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.moe = MoELayer(cfg.moe, channels)

    def forward(self, x_BCHW: torch.Tensor):
        tokens = x_BCHW.permute(0, 2, 3, 1)  # channels last: one token per position
        y, aux = self.moe(self.norm(tokens))
        return x_BCHW + y.permute(0, 3, 1, 2), aux


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))

    def flops(self, batch: int, h_in: int, w_in: int) -> int:
        c_in, c_out = self.conv1.in_channels, self.conv1.out_channels
        h, w = (h_in + 2 - 3) // self.stride + 1, (w_in + 2 - 3) // self.stride + 1
        total = F_.conv2d_flops(batch, c_in, c_out, 3, h, w) + F_.conv2d_flops(batch, c_out, c_out, 3, h, w)
        if self.shortcut is not None:
            total += F_.conv2d_flops(batch, c_in, c_out, 1, h, w)
        return total


class ResNetExits(MultiExitModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.cnn
        if cfg.num_classes is None or c.in_channels is None or c.image_size is None:
            raise ValueError("model.num_classes, model.cnn.in_channels and model.cnn.image_size must be set "
                             "(building the data sets them)")
        self.cfg = cfg
        self.exit_cfg = cfg.exits
        self.stem = nn.Sequential(nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c.channels[0]), nn.ReLU())
        self.stages = nn.ModuleList()
        self.moes = nn.ModuleDict()  # "stage_block" -> PointwiseMoE
        c_in, block_no = c.channels[0], 0
        for s, width in enumerate(c.channels):
            blocks = nn.ModuleList()
            for b in range(c.blocks_per_stage):
                blocks.append(BasicBlock(c_in, width, 2 if (s > 0 and b == 0) else 1))
                c_in = width
                block_no += 1
                if c.moe_every and block_no % c.moe_every == 0:
                    self.moes[f"{s}_{b}"] = PointwiseMoE(cfg, width)
            self.stages.append(blocks)
        # Blocks in depth order as (stage, block within the stage): the units compaction works in.
        self.units = [(s, b) for s in range(len(c.channels)) for b in range(c.blocks_per_stage)]
        learned = cfg.exits.policy == "learned"
        self.head = ExitHead(c.channels[-1], cfg.num_classes, cfg.exits.head_hidden, cfg.dropout)
        self.exit_heads = nn.ModuleList(
            ExitHead(c.channels[self.units[unit][0]], cfg.num_classes, cfg.exits.head_hidden, cfg.dropout, learned)
            for unit in self.exit_stages[:-1]
        )
        d = cfg.depth
        self.gates = nn.ModuleDict()  # str(unit) -> SkipGate
        self.halting = nn.ModuleDict()  # str(unit) -> HaltingUnit, every block of a stage but its last
        for i, (s, b) in enumerate(self.units):
            width = c.channels[s]
            if d.mode == "skip" and i > 0 and self.stages[s][b].shortcut is None:
                self.gates[str(i)] = SkipGate(width, d)
            if d.mode == "act" and b < c.blocks_per_stage - 1:
                self.halting[str(i)] = H.HaltingUnit(width, d.halt_bias_init)
        if d.mode == "skip" and not len(self.gates):
            raise ValueError("model.depth.mode skip: no block can be skipped (each is the first or downsamples); "
                             "fix: raise model.cnn.blocks_per_stage to 2 or more")
        # Skip at inference: run a gated block only on the samples that execute it. Off runs every
        # sample and mixes, as training does (the two must agree; a test holds it).
        self.depth_compaction = True

    @property
    def num_stages(self) -> int:
        return len(self.units)

    @property
    def exit_stages(self) -> list[int]:
        per = self.cfg.cnn.blocks_per_stage if self.cfg.cnn.exit_after == "stage" else 1
        return [layer * per - 1 for layer in self.exit_cfg.layers] + [self.num_stages - 1]

    def begin(self, batch: dict) -> State:
        return {"x": batch["pixel_values"]}

    def _run_unit(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Block ``i`` and its pointwise MoE, if any (the stem is the caller's)."""
        s, b = self.units[i]
        x = self.stages[s][b](x)
        if f"{s}_{b}" in self.moes:
            x, aux = self.moes[f"{s}_{b}"](x)
            return x, [aux]
        return x, []

    def run_stage(self, i: int, state: State) -> tuple[State, list]:
        B = state["x"].shape[0]
        x = self.stem(state["x"]) if i == 0 else state["x"]
        H_in, W_in = state["x"].shape[2:]
        mode = self.cfg.depth.mode
        if mode == "skip" and str(i) in self.gates:
            return self._skip_unit(i, state, x)
        if mode == "act":
            return self._act_unit(i, state, x)
        x, records = self._run_unit(i, x)
        flops = self._unit_flops(i, B, H_in, W_in)
        records.append(DepthAux(i, "dense", B, B, flops, sum(flops.values())))
        return {**state, "x": x}, records

    def _unit_flops(self, i: int, n, H_in: int, W_in: int) -> dict:
        """FLOPs of unit ``i`` (stem for the first, block, pointwise MoE) on ``n`` samples."""
        s, b = self.units[i]
        block = self.stages[s][b]
        conv = block.flops(n, H_in, W_in)
        if i == 0:
            conv += F_.conv2d_flops(n, self.cfg.cnn.in_channels, self.cfg.cnn.channels[0], 3, H_in, W_in)
        out = {"conv": conv}
        if f"{s}_{b}" in self.moes:
            H, W = (H_in - 1) // block.stride + 1, (W_in - 1) // block.stride + 1
            out.update(F_.moe_ffn_flops_by_component(n * H * W, block.conv2.out_channels, self.cfg.moe))
        return out

    def _skip_unit(self, i: int, state: State, x: torch.Tensor) -> tuple[State, list]:
        B, _, H_in, W_in = x.shape
        gate = self.gates[str(i)]
        g = gate(x.mean(dim=(2, 3)))
        x, records = run_gated(lambda rows: self._run_unit(i, rows), x, g, not self.training and self.depth_compaction)
        executed = (g > 0.5).sum()
        flops = {**self._unit_flops(i, executed, H_in, W_in), "gate": gate.flops(B)}
        records.append(DepthAux(i, "skip", B, executed, flops, sum(self._unit_flops(i, B, H_in, W_in).values()),
                                rate=g.mean()))
        return {**state, "x": x}, records

    def _act_unit(self, i: int, state: State, x: torch.Tensor) -> tuple[State, list]:
        """One block of a stage's ACT: the first block of a stage runs every sample and starts the
        stage's halting; later ones run the samples still going, and the last one ends the stage
        with its halting-weighted output. ``ponder`` sums each sample's N + R over the stages."""
        s, b = self.units[i]
        B, _, H_in, W_in = x.shape
        d = self.cfg.depth
        records = []
        if b == 0:
            x, records = self._run_unit(i, x)
            running = torch.ones(B, dtype=torch.bool, device=x.device)
            st = H.act_start((B,), x.shape, running, x.dtype, x.device)
            idx = None
            executed = B
        else:
            st = {k: state[k] for k in ("running", "cum", "rem", "steps", "acc")}
            idx = st["running"].nonzero().squeeze(1)
            executed = st["running"].sum()
            if idx.numel():
                y, records = self._run_unit(i, x.index_select(0, idx))
                x = x.index_copy(0, idx, y)
        unit = self.halting[str(i)] if str(i) in self.halting else None
        h = None
        flops = self._unit_flops(i, executed, H_in, W_in)
        if unit is not None:
            pooled = x.mean(dim=(2, 3))
            h = unit(pooled) if idx is None else torch.zeros(B, device=x.device).index_copy(0, idx, unit(pooled.index_select(0, idx)))
            flops["halting"] = F_.linear_flops(executed, unit.linear.in_features, 1)
        st = H.act_update(st, x, h, d.halt_threshold)
        ponder = state.get("ponder", torch.zeros(B, device=x.device))
        loss = None
        new = {**state, "x": x, **st}
        if unit is None:  # the stage's last block: its output is the weighted sum
            ponder = ponder + H.ponder_cost(st)
            new["x"] = st["acc"]
            if i == len(self.units) - 1:
                loss = d.ponder_cost * ponder.mean()
        new["ponder"] = ponder
        records.append(DepthAux(i, "act", B, executed, flops, sum(self._unit_flops(i, B, H_in, W_in).values()), loss=loss,
                                stats={"ponder": ponder.mean().detach()} if loss is not None else {}))
        return new, records

    def stage_flops(self, i: int, state: State) -> float:
        if self.cfg.depth.mode == "none" or (self.cfg.depth.mode == "skip" and str(i) not in self.gates):
            B, _, H, W = state["x"].shape
            return float(sum(self._unit_flops(i, B, H, W).values()))
        return float(self._depth_unit_flops(i, state))

    def _depth_unit_flops(self, i: int, state: State) -> float:
        """What run_stage will execute for unit ``i`` on ``state``: the gate's decision, or the
        samples still running in the stage."""
        B, _, H, W = state["x"].shape
        if self.cfg.depth.mode == "skip":
            gate = self.gates[str(i)]
            with torch.no_grad():
                logits = gate.logits(state["x"].mean(dim=(2, 3)))
            executed = (logits[:, 1] > logits[:, 0]).sum()
            return sum(self._unit_flops(i, executed, H, W).values()) + gate.flops(B)
        executed = B if self.units[i][1] == 0 else state["running"].sum()
        total = sum(self._unit_flops(i, executed, H, W).values())
        if str(i) in self.halting:
            total += F_.linear_flops(executed, self.halting[str(i)].linear.in_features, 1)
        return total

    def set_depth_progress(self, fraction: float) -> None:
        for gate in self.gates.values():
            gate.set_progress(fraction)

    def _head(self, j: int) -> ExitHead:
        return self.head if j == len(self.exit_heads) else self.exit_heads[j]

    def run_head(self, j: int, state: State) -> HeadOutput:
        return self._head(j)(state["x"].mean(dim=(2, 3)))

    def head_flops(self, j: int, state: State) -> float:
        return float(state["x"].shape[0] * self._head(j).flops())

    def moe_layers(self) -> list[MoELayer]:
        return [m.moe for m in self.moes.values()]

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        heads, records = self.forward_heads({"pixel_values": pixel_values})
        return classification_output(self, heads, records, labels)
