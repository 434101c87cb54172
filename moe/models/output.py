"""What a model's forward returns, and how a multi-exit classifier's heads and records become it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynamoe.depth import DepthAux, depth_loss
from dynamoe.exits.heads import HeadOutput, exit_loss
from dynamoe.layers.moe_layer import MoEAux
from dynamoe.stage import RecordLog


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # task loss (cross-entropy), None without targets
    aux_loss: torch.Tensor | None = None  # summed router losses of all MoE layers
    moe: list[MoEAux] = field(default_factory=list)  # one entry per MoE layer, in depth order
    exits: list[HeadOutput] = field(default_factory=list)  # every exit's output, the final head last
    exit_losses: list[torch.Tensor] = field(default_factory=list)  # each exit's cross-entropy (detached)
    depth: list[DepthAux] = field(default_factory=list)  # what each block computed (dynamoe.depth.records)
    depth_loss: torch.Tensor | None = None  # ponder cost, skip-rate and MoD predictor losses; None without
    backbone_frozen: bool = False  # two-stage exit training's second stage: only the early exits train

    @property
    def total_loss(self) -> torch.Tensor:
        """The loss to train on. With the backbone frozen, the router and depth losses are left out
        (they stay in ``aux_loss``/``depth_loss`` for the log): they only train the backbone, whose
        learning rate is 0, and would cost a backward pass through it and inflate the gradient
        norm that clips the exits' gradients."""
        if self.backbone_frozen:
            return self.loss
        total = self.loss if self.aux_loss is None else self.loss + self.aux_loss
        return total if self.depth_loss is None else total + self.depth_loss


def aux_total(records: list[MoEAux]) -> torch.Tensor | None:
    """The summed router losses of the MoE layers, or None when there is none."""
    return sum((r.loss for r in records), start=records[0].loss.new_zeros(())) if records else None


def classification_output(model, heads: list[HeadOutput], log: RecordLog, labels) -> ModelOutput:
    """The ModelOutput of a multi-exit classifier: final logits, the exits' loss, router losses,
    and the depth records and losses."""
    loss, per_exit = None, []
    if labels is not None:
        if model.exit_cfg.enabled:
            loss, per_exit = exit_loss(model.exit_cfg, heads, labels, model.exit_phase)
        else:
            loss = F.cross_entropy(heads[-1].logits.float(), labels)
    d_loss = depth_loss(log.depth, model.cfg.depth) if log.depth else None
    return ModelOutput(
        heads[-1].logits,
        loss,
        aux_total(log.moe),
        log.moe,
        heads,
        per_exit,
        log.depth,
        d_loss,
        backbone_frozen=model.exit_phase == "exits",
    )
