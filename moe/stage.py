"""What passes between the stages of a model: a typed state in, a typed state and records out.

A stage is a Transformer layer, a CNN block or a pretrained encoder's layer. Between stages a
model carries a :class:`StageState` whose tensors all have the batch in dimension 0, so early-exit
compaction removes exited samples with one ``index_select`` per tensor (:meth:`StageState.select`)
whatever the model and its depth mode keep. Each stage returns :class:`StageRecords`: the MoE
layers' auxiliary records and the stage's depth record, kept apart, never told apart by type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it (through frozen dataclasses and tuples)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


@dataclass(frozen=True)
class StageState:
    """The residual stream between stages and what rides along with it, batch first.

    ``x``: [B, S, D] (Transformers) or [B, C, H, W] (CNNs). ``mask``: [B, S] key padding mask, or
    None. ``attn``: a pretrained encoder's attention mask in the form its own layers expect.
    ``depth``: the depth mode's bookkeeping (a frozen dataclass of batch-first tensors), or None.
    """

    x: torch.Tensor
    mask: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    depth: Any = None

    def replace(self, **changes) -> StageState:
        return dataclasses.replace(self, **changes)

    def select(self, idx: torch.Tensor) -> StageState:
        """The rows ``idx`` of every tensor (the samples that stay after an exit)."""
        return map_tensors(self, lambda t: t.index_select(0, idx))

    def detach(self) -> StageState:
        return map_tensors(self, torch.Tensor.detach)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class StageRecords:
    """What one stage reports: its MoE layers' records (in order) and its depth record."""

    moe: tuple = ()  # MoEAux of each MoE layer the stage ran
    depth: Any = None  # DepthAux of the stage, or None (a model without depth records)


@dataclass
class RecordLog:
    """The records of one forward pass, stage by stage, MoE and depth kept apart."""

    moe: list = field(default_factory=list)
    depth: list = field(default_factory=list)

    def add(self, records: StageRecords) -> None:
        self.moe.extend(records.moe)
        if records.depth is not None:
            self.depth.append(records.depth)
