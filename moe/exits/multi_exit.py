"""Multi-exit models as a sequence of stages, and batched early-exit inference with compaction.

A :class:`MultiExitModel` is a sequence of stages (Transformer layers, CNN stages) with exit heads
after some of them, the last stage always carrying the final head. Subclasses say how to start
(``begin``), run one stage, run one head, and how many FLOPs each costs on the rows present; the
state between stages is a dict of tensors whose first dimension is the batch, so removing exited
samples is one ``index_select`` per tensor. Training runs every stage and head on every sample
(``forward_heads``); inference (:func:`infer`) drops each sample as soon as its exit's policy
says so, so later stages run on fewer rows and the FLOPs saved are wall time saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynamoe.config import ExitConfig
from dynamoe.exits.heads import HeadOutput, PolicyState, exit_score, thresholds_for

State = dict  # name -> tensor with the batch in dimension 0 (or None)


def select_rows(state: State, idx: torch.Tensor) -> State:
    return {k: (v.index_select(0, idx) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def detach_state(state: State) -> State:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


class MultiExitModel(nn.Module):
    """Base of the models with early exits; see the module docstring for the contract."""

    exit_cfg: ExitConfig
    exit_phase: str = "joint"  # set by the trainer: joint, or two-stage's "backbone" then "exits"

    @property
    def num_stages(self) -> int:
        raise NotImplementedError

    @property
    def exit_stages(self) -> list[int]:
        """0-based stage after which each exit sits, the final head last."""
        return [i - 1 for i in self.exit_cfg.layers] + [self.num_stages - 1]

    def begin(self, batch: dict) -> State:
        raise NotImplementedError

    def run_stage(self, i: int, state: State) -> tuple[State, list]:
        """Stage ``i`` on the rows present; returns the new state and MoE aux records."""
        raise NotImplementedError

    def run_head(self, j: int, state: State) -> HeadOutput:
        raise NotImplementedError

    def stage_flops(self, i: int, state: State) -> float:
        """FLOPs of stage ``i`` on every row of ``state`` (the state before the stage)."""
        raise NotImplementedError

    def head_flops(self, j: int, state: State) -> float:
        raise NotImplementedError

    def forward_heads(self, batch: dict) -> tuple[list[HeadOutput], list]:
        """Every stage and every head on every sample (training and full evaluation)."""
        state = self.begin(batch)
        heads, records = [], []
        stages = self.exit_stages
        detach_early = self.exit_phase == "exits"  # two-stage, second stage: the backbone is frozen
        for i in range(self.num_stages):
            state, aux = self.run_stage(i, state)
            records.extend(aux)
            for j, s in enumerate(stages):
                if s == i:
                    heads.append(self.run_head(j, detach_state(state) if detach_early and j < len(stages) - 1 else state))
        return heads, records

    def full_flops(self, batch: dict) -> float:
        """FLOPs of the whole network with every head, on every sample of ``batch``."""
        with torch.no_grad():
            state = self.begin(batch)
            total = 0.0
            for i in range(self.num_stages):
                total += self.stage_flops(i, state)
                state, _ = self.run_stage(i, state)
                total += sum(self.head_flops(j, state) for j, s in enumerate(self.exit_stages) if s == i)
        return total


@dataclass
class ExitResult:
    predictions: torch.Tensor  # [B] class chosen for each sample
    exit_index: torch.Tensor  # [B] exit each sample left at (0 = first early exit, J-1 = final head)
    flops: float  # FLOPs executed for the whole batch (stages + heads, rows actually present)
    stages_run: torch.Tensor  # [B] number of stages each sample went through


@torch.no_grad()
def infer(model: MultiExitModel, batch: dict, policy: str | None = None, thresholds: list[float] | None = None) -> ExitResult:
    """Batched early-exit inference: after each exit, the samples that leave are removed from the
    batch before the next stage. ``policy``/``thresholds`` default to the model's exit config."""
    cfg = model.exit_cfg
    policy = policy or cfg.policy
    thresholds = thresholds_for(cfg) if thresholds is None else list(thresholds)
    stages = model.exit_stages
    if len(thresholds) != len(stages) - 1:
        raise ValueError(f"{len(thresholds)} thresholds for {len(stages) - 1} early exits")
    state = model.begin(batch)
    B = next(v for v in state.values() if isinstance(v, torch.Tensor)).shape[0]
    device = next(v for v in state.values() if isinstance(v, torch.Tensor)).device
    rows = torch.arange(B, device=device)  # original position of each row still in the batch
    preds = torch.full((B,), -1, dtype=torch.long, device=device)
    exit_at = torch.full((B,), -1, dtype=torch.long, device=device)
    pstate = PolicyState()
    flops = 0.0
    for i in range(model.num_stages):
        flops += model.stage_flops(i, state)
        state, _ = model.run_stage(i, state)
        for j, s in enumerate(stages):
            if s != i:
                continue
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
                state, pstate = select_rows(state, keep), pstate.select(keep)
        if rows.numel() == 0:
            break
    stages_run = torch.tensor(stages, device=device)[exit_at] + 1
    return ExitResult(preds, exit_at, flops, stages_run)


@torch.no_grad()
def infer_full(model: MultiExitModel, batch: dict) -> float:
    """The plain network on ``batch`` (every stage, the final head only); returns its FLOPs.
    The baseline that early-exit wall time is compared with."""
    state = model.begin(batch)
    flops = 0.0
    for i in range(model.num_stages):
        flops += model.stage_flops(i, state)
        state, _ = model.run_stage(i, state)
    last = len(model.exit_stages) - 1
    model.run_head(last, state)
    return flops + model.head_flops(last, state)
