"""Multi-exit models as a sequence of stages, and batched early-exit inference with compaction.

A :class:`MultiExitModel` is a sequence of stages (Transformer layers, CNN stages) with exit heads
after some of them, the last stage always carrying the final head. Subclasses say how to start
(``begin``), run one stage, run one head, and how many FLOPs each costs on the rows present; the
state between stages is a :class:`~dynamoe.stage.StageState` whose tensors have the batch first,
so removing exited samples is one ``index_select`` per tensor. Training runs every stage and head on every sample
(``forward_heads``); inference (:func:`infer`) drops each sample as soon as its exit's policy
says so, so later stages run on fewer rows and the FLOPs saved are wall time saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynamoe.config import ExitConfig
from dynamoe.exits.heads import HeadOutput, PolicyState, exit_score, thresholds_for
from dynamoe.models.base import DynamoeModel
from dynamoe.stage import RecordLog, StageRecords, StageState


class MultiExitModel(DynamoeModel):
    """Base of the models with early exits; see the module docstring for the contract."""

    exit_cfg: ExitConfig

    @property
    def num_stages(self) -> int:
        raise NotImplementedError

    @property
    def num_exits(self) -> int:
        return len(self.exit_cfg.layers) + 1 if self.exit_cfg.enabled else 0

    @property
    def exit_stages(self) -> list[int]:
        """0-based stage after which each exit sits, the final head last."""
        return [i - 1 for i in self.exit_cfg.layers] + [self.num_stages - 1]

    def heads_after(self, i: int) -> list[int]:
        """The exits (indices into :attr:`exit_stages`) that read the state after stage ``i``."""
        return [j for j, s in enumerate(self.exit_stages) if s == i]

    @property
    def final_head(self) -> int:
        return len(self.exit_stages) - 1

    def begin(self, batch: dict) -> StageState:
        raise NotImplementedError

    def run_stage(self, i: int, state: StageState) -> tuple[StageState, StageRecords]:
        """Stage ``i`` on the rows present; returns the new state and the stage's records."""
        raise NotImplementedError

    def run_head(self, j: int, state: StageState) -> HeadOutput:
        raise NotImplementedError

    def stage_flops(self, i: int, state: StageState) -> float:
        """FLOPs of stage ``i`` on every row of ``state`` (the state before the stage)."""
        raise NotImplementedError

    def head_flops(self, j: int, state: StageState) -> float:
        raise NotImplementedError

    def run_stages(self, state: StageState) -> tuple[StageState, RecordLog, float]:
        """Every stage on every row of ``state``, no head: the last state, the records and the FLOPs."""
        log, flops = RecordLog(), 0.0
        for i in range(self.num_stages):
            flops += self.stage_flops(i, state)
            state, records = self.run_stage(i, state)
            log.add(records)
        return state, log, flops

    def forward_heads(self, batch: dict) -> tuple[list[HeadOutput], RecordLog]:
        """Every stage and every head on every sample (training and full evaluation)."""
        state = self.begin(batch)
        heads, log = [], RecordLog()
        detach_early = self.exit_phase == "exits"  # two-stage, second stage: the backbone is frozen
        for i in range(self.num_stages):
            state, records = self.run_stage(i, state)
            log.add(records)
            for j in self.heads_after(i):
                heads.append(self.run_head(j, state.detach() if detach_early and j < self.final_head else state))
        return heads, log

    def full_flops(self, batch: dict) -> float:
        """FLOPs of the whole network with every head, on every sample of ``batch``."""
        with torch.no_grad():
            state = self.begin(batch)
            total = 0.0
            for i in range(self.num_stages):
                total += self.stage_flops(i, state)
                state, _ = self.run_stage(i, state)
                total += sum(self.head_flops(j, state) for j in self.heads_after(i))
        return total


@dataclass
class ExitResult:
    predictions: torch.Tensor  # [B] class chosen for each sample
    exit_index: torch.Tensor  # [B] exit each sample left at (0 = first early exit, J-1 = final head)
    flops: float  # FLOPs executed for the whole batch (stages + heads, rows actually present)
    stages_run: torch.Tensor  # [B] number of stages each sample went through


@torch.no_grad()
def infer(
    model: MultiExitModel, batch: dict, policy: str | None = None, thresholds: list[float] | None = None
) -> ExitResult:
    """Batched early-exit inference: after each exit, the samples that leave are removed from the
    batch before the next stage. ``policy``/``thresholds`` default to the model's exit config."""
    cfg = model.exit_cfg
    policy = policy or cfg.policy
    thresholds = thresholds_for(cfg) if thresholds is None else list(thresholds)
    stages = model.exit_stages
    if len(thresholds) != len(stages) - 1:
        raise ValueError(f"{len(thresholds)} thresholds for {len(stages) - 1} early exits")
    state = model.begin(batch)
    B, device = state.batch_size, state.x.device
    rows = torch.arange(B, device=device)  # original position of each row still in the batch
    preds = torch.full((B,), -1, dtype=torch.long, device=device)
    exit_at = torch.full((B,), -1, dtype=torch.long, device=device)
    pstate = PolicyState()
    flops = 0.0
    for i in range(model.num_stages):
        flops += model.stage_flops(i, state)
        state, _ = model.run_stage(i, state)
        for j in model.heads_after(i):
            head = model.run_head(j, state)
            flops += model.head_flops(j, state)
            pred = head.logits.argmax(-1)
            if j == len(stages) - 1:
                preds[rows], exit_at[rows] = pred, j
                rows = rows[:0]
                break
            score, pstate = exit_score(policy, head, pstate)
            leave = score >= thresholds[j]
            if bool(leave.any()):
                preds[rows[leave]], exit_at[rows[leave]] = pred[leave], j
                keep = (~leave).nonzero().squeeze(1)
                rows = rows[keep]
                state, pstate = state.select(keep), pstate.select(keep)
        if rows.numel() == 0:
            break
    stages_run = torch.tensor(stages, device=device)[exit_at] + 1
    return ExitResult(preds, exit_at, flops, stages_run)


@torch.no_grad()
def infer_full(model: MultiExitModel, batch: dict) -> float:
    """The plain network on ``batch`` (every stage, the final head only); returns its FLOPs.
    The baseline that early-exit wall time is compared with."""
    state, _, flops = model.run_stages(model.begin(batch))
    model.run_head(model.final_head, state)
    return flops + model.head_flops(model.final_head, state)
