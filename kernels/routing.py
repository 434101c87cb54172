"""Top-k routing: scores from router logits, top-k expert selection and per-expert counts.

Scores and selection are computed in fp32 whatever the logits' dtype, so that routing does not
change with the model's precision. Ties are broken toward the lower expert index, which makes
the selection a pure function of the logits (``torch.topk`` gives no such guarantee).
"""

from __future__ import annotations

import torch

from dynamoe.kernels.backend import REFERENCE, implementation, register_impl

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def check_route_args(logits: torch.Tensor, k: int, score: str, bias: torch.Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"topk_route: logits must be [T, E], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"topk_route: k={k} must be between 1 and the number of experts ({num_experts})")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"topk_route: score={score!r} must be one of {SCORE_FUNCTIONS}")
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"topk_route: bias must have shape [E]=({num_experts},), got {tuple(bias.shape)}")


@register_impl("topk_route", REFERENCE)
def topk_route_ref(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference top-k routing.

    Args:
        logits: [T, E] router logits, any float dtype.
        k: experts per token.
        score: "softmax" (over all E experts) or "sigmoid" (independent per expert).
        bias: optional [E] selection bias (auxiliary-loss-free balancing); it shifts which experts
            are selected but never the returned weights.
        normalize: divide the k selected scores by their sum.

    Returns:
        weights [T, k] fp32 (differentiable w.r.t. ``logits``), experts [T, k] int64 in descending
        score order, counts [E] int64 (assignments per expert).
    """
    check_route_args(logits, k, score, bias)
    logits_f32 = logits.float()
    scores_TE = torch.softmax(logits_f32, dim=-1) if score == "softmax" else torch.sigmoid(logits_f32)
    select_TE = scores_TE if bias is None else scores_TE + bias.float()
    # A stable descending sort keeps equal scores in index order: ties go to the lower expert.
    _, order_TE = torch.sort(select_TE.detach(), dim=-1, descending=True, stable=True)
    experts_Tk = order_TE[:, :k]
    weights_Tk = scores_TE.gather(1, experts_Tk)
    if normalize:
        weights_Tk = weights_Tk / weights_Tk.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    counts_E = torch.bincount(experts_Tk.reshape(-1), minlength=logits.shape[1])
    return weights_Tk, experts_Tk, counts_E


def topk_route(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing; see :func:`topk_route_ref` for the contract."""
    return implementation("topk_route", logits)(logits, k, score=score, bias=bias, normalize=normalize)
