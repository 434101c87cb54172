"""A ResNet-style image classifier whose blocks can carry MoE and whose stages carry early exits.

Stages of basic residual blocks (two 3x3 convolutions); every stage after the first halves the
feature map and widens it. A block marked MoE adds, on the residual, a pointwise MoE over the
feature-map positions: every (sample, row, column) is a token of width C, routed through the
same :class:`MoELayer` (and kernels) as the Transformers' tokens. Exits sit after chosen stages:
global average pooling, then an :class:`ExitHead`. BatchNorm runs on running statistics at
inference, so each sample's output is independent of the others and compaction is exact.

Conditional depth (``model.depth``: skip, act) is per sample, with a block and its MoE as the unit
(``dynamoe.depth.cnn_modes``).
Shape legend: B batch, C channels, H/W feature-map height/width.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamoe.compute import flops as F_
from dynamoe.config import ModelConfig
from dynamoe.depth.cnn_modes import build_cnn_depth
from dynamoe.exits.heads import ExitHead, HeadOutput
from dynamoe.exits.multi_exit import MultiExitModel
from dynamoe.layers.moe_layer import MoELayer
from dynamoe.layers.recompute import checkpointed
from dynamoe.models.output import ModelOutput, classification_output
from dynamoe.stage import StageRecords, StageState

# Before the depth modes were classes, their units sat on the model itself: checkpoints written
# then name them so (a load-time hook renames them).
_LEGACY_DEPTH_PREFIXES = ("gates.", "halting.")


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
            raise ValueError(
                "model.num_classes, model.cnn.in_channels and model.cnn.image_size must be set "
                "(building the data sets them)"
            )
        self.cfg = cfg
        self.exit_cfg = cfg.exits
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(c.channels[0]), nn.ReLU()
        )
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
                    self.moes[f"{s}_{b}"].moe.block_index = block_no - 1  # the unit's index in depth order
            self.stages.append(blocks)
        # Blocks in depth order as (stage, block within the stage): the units compaction works in.
        self.units = [(s, b) for s in range(len(c.channels)) for b in range(c.blocks_per_stage)]
        learned = cfg.exits.policy == "learned"
        self.head = ExitHead(c.channels[-1], cfg.num_classes, cfg.exits.head_hidden, cfg.dropout)
        self.exit_heads = nn.ModuleList(
            ExitHead(c.channels[self.units[unit][0]], cfg.num_classes, cfg.exits.head_hidden, cfg.dropout, learned)
            for unit in self.exit_stages[:-1]
        )
        shortcut = [self.stages[s][b].shortcut is None for s, b in self.units]
        self.depth = build_cnn_depth(cfg, self.units, shortcut)
        self.checkpointed_units: set[int] = set()
        self._register_load_state_dict_pre_hook(_rename_legacy_depth_keys)

    @property
    def num_stages(self) -> int:
        return len(self.units)

    @property
    def exit_stages(self) -> list[int]:
        per = self.cfg.cnn.blocks_per_stage if self.cfg.cnn.exit_after == "stage" else 1
        return [layer * per - 1 for layer in self.exit_cfg.layers] + [self.num_stages - 1]

    def early_exit_parameters(self) -> list[nn.Parameter]:
        return list(self.exit_heads.parameters())

    def begin(self, batch: dict) -> StageState:
        return StageState(batch["pixel_values"])

    def set_activation_checkpointing(self, mode: str) -> None:
        self.checkpointed_units = {
            i
            for i, (s, b) in enumerate(self.units)
            if mode == "blocks" or (mode == "moe_blocks" and f"{s}_{b}" in self.moes)
        }

    def run_unit(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Block ``i`` and its pointwise MoE, if any (the stem is the caller's): the output and the
        MoE records."""
        if i in self.checkpointed_units and self.training and torch.is_grad_enabled():
            return checkpointed(self._run_unit, i, x)
        return self._run_unit(i, x)

    def _run_unit(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        s, b = self.units[i]
        x = self.stages[s][b](x)
        if f"{s}_{b}" in self.moes:
            x, aux = self.moes[f"{s}_{b}"](x)
            return x, [aux]
        return x, []

    def run_stage(self, i: int, state: StageState) -> tuple[StageState, StageRecords]:
        x = self.stem(state.x) if i == 0 else state.x
        return self.depth.run(self, i, state, x)

    def unit_flops_by_component(self, i: int, n, H_in: int, W_in: int) -> dict:
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

    def stage_flops(self, i: int, state: StageState) -> float:
        return float(self.depth.unit_flops(self, i, state))

    def set_depth_progress(self, fraction: float) -> None:
        self.depth.set_progress(fraction)

    def _head(self, j: int) -> ExitHead:
        return self.head if j == len(self.exit_heads) else self.exit_heads[j]

    def run_head(self, j: int, state: StageState) -> HeadOutput:
        return self._head(j)(state.x.mean(dim=(2, 3)))

    def head_flops(self, j: int, state: StageState) -> float:
        return float(state.batch_size * self._head(j).flops())

    def moe_layers(self) -> list[MoELayer]:
        return [m.moe for m in self.moes.values()]

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        heads, log = self.forward_heads({"pixel_values": pixel_values})
        return classification_output(self, heads, log, labels)


def _rename_legacy_depth_keys(state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.startswith(_LEGACY_DEPTH_PREFIXES):
            state_dict[prefix + "depth." + rest] = state_dict.pop(key)
