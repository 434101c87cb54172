"""Halting: adaptive computation time (Graves 2016) and PonderNet (Banino et al. 2021).

A halting unit reads a row's state after step n and gives h_n in (0, 1).

ACT: the row halts at N = min{n : h_1 + ... + h_n >= halt_threshold}, or at the last step; the
remainder R = 1 - (h_1 + ... + h_{N-1}); halting weights p_n = h_n (n < N), p_N = R; the output is
sum_n p_n s_n and the ponder cost N + R is added to the loss (its gradient flows through R).

PonderNet: h_n is the conditional probability of halting at n (1 at the last step);
p_n = h_n * prod_{j<n} (1 - h_j). Training takes the expected task loss sum_n p_n L_n plus
kl_coef * KL(p || truncated geometric(lambda_p)); inference halts at the first n whose cumulative
p reaches ``halt_quantile`` and outputs that step's state.

A halted row keeps its state: it is not updated any more (state copying, as in CALM), and later
steps run only on the rows still going.
Shape legend: N rows (tokens or samples), D width, L steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class HaltingUnit(nn.Module):
    """h = sigmoid(w . s + b); the bias starts at ``bias_init`` so early training runs deep."""

    def __init__(self, d_in: int, bias_init: float):
        super().__init__()
        self.linear = nn.Linear(d_in, 1)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.constant_(self.linear.bias, bias_init)

    def forward(self, s_ND: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(s_ND).squeeze(-1).float())


@dataclass(frozen=True)
class ActState:
    """ACT bookkeeping per row, batch first: running [N] bool, cum (h summed while running),
    rem (R once halted), steps (N so far), acc (the halting-weighted sum of states), and ponder
    (N + R summed over earlier ACT spans: the CNN's stages; None for a Transformer)."""

    running: torch.Tensor
    cum: torch.Tensor
    rem: torch.Tensor
    steps: torch.Tensor
    acc: torch.Tensor
    ponder: torch.Tensor | None = None


@dataclass(frozen=True)
class PonderState:
    """PonderNet inference bookkeeping per row: running, survival probability, halting CDF, steps."""

    running: torch.Tensor
    survive: torch.Tensor
    cdf: torch.Tensor
    steps: torch.Tensor


def act_start(
    shape: tuple, state_shape: tuple, running: torch.Tensor, dtype, device, ponder: torch.Tensor | None = None
) -> ActState:
    """ACT bookkeeping for rows of ``shape`` whose states have ``state_shape``."""
    zeros = torch.zeros(shape, dtype=torch.float32, device=device)
    return ActState(
        running.clone(),
        zeros,
        zeros.clone(),
        zeros.clone(),
        torch.zeros(state_shape, dtype=dtype, device=device),
        ponder,
    )


def act_update(st: ActState, s_new: torch.Tensor, h: torch.Tensor | None, threshold: float) -> ActState:
    """One ACT step for every row of ``st``: ``s_new`` is the state after this step (halted rows
    unchanged), ``h`` its halting probability (None: the last step, every running row halts)."""
    running, cum = st.running, st.cum
    if h is None:
        halt = running
        h = torch.zeros_like(cum)
    else:
        halt = running & (cum + h >= threshold)
    p = torch.where(halt, 1.0 - cum, torch.where(running, h, torch.zeros_like(h)))
    extra = s_new.dim() - p.dim()
    acc = st.acc + p.view(*p.shape, *([1] * extra)).to(s_new.dtype) * s_new
    return ActState(
        running=running & ~halt,
        cum=torch.where(running & ~halt, cum + h, cum),
        rem=torch.where(halt, 1.0 - cum, st.rem),
        steps=st.steps + running.float(),
        acc=acc,
        ponder=st.ponder,
    )


def ponder_cost(st: ActState) -> torch.Tensor:
    """N + R per row (after the last step)."""
    return st.steps + st.rem


def pondernet_start(shape: tuple, running: torch.Tensor, device) -> PonderState:
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    return PonderState(running.clone(), ones, torch.zeros_like(ones), torch.zeros_like(ones))


def pondernet_update(st: PonderState, h: torch.Tensor | None, quantile: float) -> PonderState:
    """Inference: halt each running row at the first step where its halting CDF reaches ``quantile``."""
    running = st.running
    if h is None:
        halt = running
        p = st.survive
    else:
        p = h * st.survive
        halt = running & (st.cdf + p >= quantile)
    return PonderState(
        running=running & ~halt,
        survive=st.survive * (1 - (h if h is not None else 1.0)),
        cdf=st.cdf + p,
        steps=st.steps + running.float(),
    )


def halting_distribution(h_list: list[torch.Tensor]) -> torch.Tensor:
    """p [L, ...] from the conditional halting probabilities of steps 1..L-1 (the last step takes
    what is left, so every row's p sums to 1)."""
    survive = torch.ones_like(h_list[0])
    ps = []
    for h in h_list:
        ps.append(h * survive)
        survive = survive * (1 - h)
    ps.append(survive)
    return torch.stack(ps)


def geometric_prior(lambda_p: float, steps: int) -> torch.Tensor:
    """Geometric(lambda_p) over steps 1..L, truncated and renormalised."""
    n = torch.arange(steps, dtype=torch.float64)
    prior = lambda_p * (1 - lambda_p) ** n
    return (prior / prior.sum()).float()


def pondernet_loss(
    p_LN: torch.Tensor, losses_LN: torch.Tensor, valid_N: torch.Tensor | None, lambda_p: float, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected task loss, kl_coef * KL(p || prior)), both means over the valid rows."""
    prior = geometric_prior(lambda_p, p_LN.shape[0]).to(p_LN.device)
    expected = (p_LN * losses_LN).sum(0)
    kl = (p_LN * (p_LN.clamp_min(1e-12).log() - prior.log()[:, None])).sum(0)
    if valid_N is not None:
        expected, kl = expected[valid_N], kl[valid_N]
    return expected.mean(), kl_coef * kl.mean()


def expected_steps(p_LN: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(1, p_LN.shape[0] + 1, dtype=p_LN.dtype, device=p_LN.device)
    return (p_LN * steps[:, None]).sum(0)
