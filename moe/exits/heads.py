"""Early-exit heads, their training losses, and the exit policies that decide at inference.

Every exit produces logits; a policy turns an exit's logits (and, for the learned policy, the
exit predictor's output) into a per-sample *confidence score*, and a sample leaves at the first
exit whose score reaches that exit's threshold. All policies share this one rule, so calibration
(``calibration.py``) and compaction (``multi_exit.py``) never special-case a policy:

    max_prob   top-1 probability                              in [1/C, 1]
    entropy    1 - H(p) / ln C (1: certain, 0: uniform)        in [0, 1]
    margin     top-1 minus top-2 probability                  in [0, 1]
    patience   consecutive earlier exits agreeing with this one (PABEE), 0 at the first exit
    learned    sigmoid of an exit predictor trained to say "this exit is right"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.config import ExitConfig

DEFAULT_THRESHOLDS = {"max_prob": 0.9, "entropy": 0.6, "margin": 0.8, "patience": 2.0, "learned": 0.9}


@dataclass(frozen=True)
class HeadOutput:
    logits: torch.Tensor  # [N, C]
    predictor: torch.Tensor | None = None  # [N] exit-predictor logit (learned policy), else None


class ExitHead(nn.Module):
    """A classifier on a pooled feature vector: [hidden layer, tanh], dropout, linear; optionally a
    predictor of its own correctness that reads the head's features without training them."""

    def __init__(self, d_in: int, num_classes: int, hidden: int | None, dropout: float = 0.1, predictor: bool = False):
        super().__init__()
        hidden = d_in if hidden is None else hidden
        self.hidden = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh()) if hidden else nn.Identity()
        width = hidden or d_in
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, num_classes)
        self.predictor = nn.Linear(width, 1) if predictor else None

    def forward(self, pooled_ND: torch.Tensor) -> HeadOutput:
        h = self.hidden(pooled_ND)
        logits = self.out(self.drop(h))
        pred = None if self.predictor is None else self.predictor(h.detach()).squeeze(-1)
        return HeadOutput(logits, pred)

    def flops(self) -> int:
        """Multiply-add FLOPs per sample (pooling not counted)."""
        total = 2 * self.out.in_features * self.out.out_features
        if isinstance(self.hidden, nn.Sequential):
            total += 2 * self.hidden[0].in_features * self.hidden[0].out_features
        if self.predictor is not None:
            total += 2 * self.predictor.in_features
        return total


def exit_weights(cfg: ExitConfig) -> list[float]:
    """One loss weight per exit, the final head last."""
    n = len(cfg.layers) + 1
    if cfg.weighting == "custom":
        return list(cfg.weights)
    if cfg.weighting == "linear":
        return [float(j + 1) for j in range(n)]
    return [1.0] * n


def active_exits(cfg: ExitConfig, step: int, steps: int) -> list[bool]:
    """Whose losses count at training step ``step`` of ``steps`` under the exit curriculum
    (LayerSkip): one flag per exit, the final head last (always on)."""
    J = len(cfg.layers)
    if cfg.curriculum == "rotational":
        early = [(step - j) % cfg.curriculum_every == 0 for j in range(J)]
    elif cfg.curriculum == "gradual":
        # J + 1 equal phases: none of the early exits in the first, then one more (deepest first) per phase.
        on = min(J, step * (J + 1) // max(steps, 1))
        early = [j >= J - on for j in range(J)]
    else:
        early = [True] * J
    return [*early, True]


def exit_loss(
    cfg: ExitConfig,
    heads: list[HeadOutput],
    labels: torch.Tensor,
    phase: str = "joint",
    ignore_index: int = -100,
    active: list[bool] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training loss over all exits, and each exit's cross-entropy (detached) for logging.

    ``phase``: "joint" (all exits), "backbone" (two-stage, first stage: the final head only) or
    "exits" (two-stage, second stage: the early exits only; the caller detaches their inputs).
    ``active``: the exits the curriculum turns on now (:func:`active_exits`; None: all).
    Weighted mean over exits, so the loss keeps the scale of one cross-entropy.
    """
    weights = exit_weights(cfg)
    ces = [F.cross_entropy(h.logits.float(), labels, ignore_index=ignore_index) for h in heads]
    terms = list(ces)
    if cfg.training == "distill" and len(heads) > 1:
        T, alpha = cfg.distill_temperature, cfg.distill_alpha
        teacher = F.softmax(heads[-1].logits.detach().float() / T, dim=-1)
        valid = labels != ignore_index
        for j, h in enumerate(heads[:-1]):
            log_student = F.log_softmax(h.logits.float() / T, dim=-1)
            kl = (teacher * (teacher.clamp_min(1e-12).log() - log_student)).sum(-1)
            kl = kl[valid].mean() if valid.any() else kl.sum() * 0
            terms[j] = (1 - alpha) * ces[j] + alpha * T * T * kl
    if phase == "backbone":
        use = [len(heads) - 1]
    elif phase == "exits":
        use = list(range(len(heads) - 1))
    else:
        use = list(range(len(heads)))
    if active is not None:
        use = [j for j in use if active[j]]
    total = sum(weights[j] * terms[j] for j in use) / max(sum(weights[j] for j in use), 1e-12)
    if phase != "backbone" and cfg.policy == "learned":
        total = total + cfg.predictor_loss_coef * predictor_loss(heads[:-1], labels, ignore_index)
    return total, [c.detach() for c in ces]


def predictor_loss(heads: list[HeadOutput], labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Binary cross-entropy of each early exit's predictor against "this exit's argmax is right"."""
    valid = labels != ignore_index
    losses = []
    for h in heads:
        if h.predictor is None:
            raise ValueError("the learned exit policy needs exit heads built with a predictor")
        right = (h.logits.detach().argmax(-1) == labels).float()
        losses.append(F.binary_cross_entropy_with_logits(h.predictor[valid], right[valid]))
    return torch.stack(losses).mean() if losses else labels.new_zeros((), dtype=torch.float32)


# --- policies -----------------------------------------------------------------------------------


class PolicyState:
    """What a policy carries from one exit to the next, per sample: the previous exit's prediction
    and the count of consecutive agreeing exits (patience). Rows follow the compacted batch."""

    def __init__(self, prev_pred: torch.Tensor | None = None, streak: torch.Tensor | None = None):
        self.prev_pred = prev_pred
        self.streak = streak

    def select(self, idx: torch.Tensor) -> PolicyState:
        if self.prev_pred is None:
            return self
        return PolicyState(self.prev_pred.index_select(0, idx), self.streak.index_select(0, idx))


def exit_score(policy: str, head: HeadOutput, state: PolicyState) -> tuple[torch.Tensor, PolicyState]:
    """Per-sample confidence score [N] (fp32) at this exit, and the state for the next exit."""
    logits = head.logits.float()
    pred = logits.argmax(-1)
    if state.prev_pred is None:
        streak = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
    else:
        streak = torch.where(pred == state.prev_pred, state.streak + 1, torch.zeros_like(state.streak))
    new_state = PolicyState(pred, streak)
    if policy == "patience":
        return streak, new_state
    if policy == "learned":
        if head.predictor is None:
            raise ValueError(
                "policy 'learned' needs exit heads with predictors: train with model.exits.policy: learned"
            )
        return torch.sigmoid(head.predictor.float()), new_state
    probs = torch.softmax(logits, dim=-1)
    if policy == "max_prob":
        return probs.max(-1).values, new_state
    if policy == "margin":
        top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        margin = top2[:, 0] - top2[:, 1] if top2.shape[-1] > 1 else top2[:, 0]
        return margin, new_state
    if policy == "entropy":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return 1.0 - entropy / math.log(probs.shape[-1]), new_state
    raise ValueError(f"unknown exit policy {policy!r}; choose one of {list(DEFAULT_THRESHOLDS)}")


def thresholds_for(cfg: ExitConfig) -> list[float]:
    """The threshold of each early exit: calibrated ``thresholds``, else ``threshold``, else the default."""
    if cfg.thresholds is not None:
        return list(cfg.thresholds)
    value = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLDS[cfg.policy]
    return [float(value)] * len(cfg.layers)


def all_exit_scores(policy: str, heads: list[HeadOutput]) -> torch.Tensor:
    """Scores [N, J] of every exit for every sample, computed as if no sample had left. The final
    head has no exit predictor: under the learned policy its score is 1 (everyone leaves there)."""
    state = PolicyState()
    cols = []
    for j, h in enumerate(heads):
        if policy == "learned" and h.predictor is None and j == len(heads) - 1:
            h = HeadOutput(h.logits, torch.full(h.logits.shape[:1], 1e4, device=h.logits.device))
        score, state = exit_score(policy, h, state)
        cols.append(score)
    return torch.stack(cols, dim=1)


def first_exit(scores_NJ: torch.Tensor, thresholds: list[float] | torch.Tensor) -> torch.Tensor:
    """Index of the exit each sample leaves at: the first early exit whose score reaches its
    threshold, else the final head (index J - 1). ``thresholds`` has one entry per early exit."""
    N, J = scores_NJ.shape
    thr = torch.as_tensor(thresholds, dtype=scores_NJ.dtype, device=scores_NJ.device)
    if thr.numel() != J - 1:
        raise ValueError(f"{thr.numel()} thresholds for {J - 1} early exits")
    passes = torch.cat([scores_NJ[:, :-1] >= thr, torch.ones(N, 1, dtype=torch.bool, device=scores_NJ.device)], dim=1)
    return passes.int().argmax(dim=1)  # argmax returns the first maximum
