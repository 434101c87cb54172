"""Top-k routing: scores from router logits, top-k expert selection and per-expert counts.

Scores and selection are computed in fp32 whatever the logits' dtype, so that routing does not
change with the model's precision. Ties are broken toward the lower expert index, which makes
the selection a pure function of the logits (``torch.topk`` gives no such guarantee).

Beyond plain top-k, the options of the DeepSeek-V3 / GLM-4-MoE routers: group-limited selection
(``n_group``, ``topk_group``) and a constant factor on the combine weights
(``routed_scaling_factor``). Their defaults leave the result bit-for-bit what plain top-k gives.
"""

from __future__ import annotations

import torch

from dynamoe.kernels.backend import REFERENCE, implementation, register_impl

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def limits_groups(n_group: int, topk_group: int | None) -> bool:
    """Whether group-limited selection can exclude an expert (else it is plain top-k, and skipped)."""
    return n_group > 1 and topk_group is not None and topk_group < n_group


def check_route_args(
    logits: torch.Tensor,
    k: int,
    score: str,
    bias: torch.Tensor | None,
    n_group: int = 1,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"topk_route: logits must be [T, E], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"topk_route: k={k} must be between 1 and the number of experts ({num_experts})")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"topk_route: score={score!r} must be one of {SCORE_FUNCTIONS}")
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"topk_route: bias must have shape [E]=({num_experts},), got {tuple(bias.shape)}")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(
            f"topk_route: n_group={n_group} must be a positive divisor of the number of experts ({num_experts})"
        )
    if topk_group is not None and not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_route: topk_group={topk_group} must be between 1 and n_group={n_group} (or None)")
    if limits_groups(n_group, topk_group):
        group_size = num_experts // n_group
        if group_size < 2:
            raise ValueError(
                f"topk_route: a group scores its two best experts, so n_group={n_group} needs at least "
                f"2 experts per group ({num_experts} experts); lower n_group"
            )
        if k > topk_group * group_size:
            raise ValueError(
                f"topk_route: k={k} experts cannot be picked from topk_group={topk_group} groups of {group_size}; "
                "raise topk_group or lower k"
            )
    if not routed_scaling_factor > 0:
        raise ValueError(f"topk_route: routed_scaling_factor={routed_scaling_factor} must be > 0")


def group_limited(select_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``select_TE`` with the experts outside each token's ``topk_group`` best groups set to -inf.

    A group's score is the sum of its two best selection scores (DeepSeek-V3's rule, bias included);
    groups tied on score go to the lower group index, as tied experts go to the lower expert.
    """
    num_tokens, num_experts = select_TE.shape
    group_size = num_experts // n_group
    select_TGS = select_TE.view(num_tokens, n_group, group_size)
    # topk's values do not depend on how it breaks ties, so this sum is the same as the families'.
    group_TG = select_TGS.topk(2, dim=-1).values.sum(dim=-1)
    _, group_order_TG = torch.sort(group_TG, dim=-1, descending=True, stable=True)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, group_order_TG[:, :topk_group], True)
    return select_TGS.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


@register_impl("topk_route", REFERENCE)
def topk_route_ref(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    normalize: bool = False,
    n_group: int = 1,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference top-k routing.

    Args:
        logits: [T, E] router logits, any float dtype.
        k: experts per token.
        score: "softmax" (over all E experts) or "sigmoid" (independent per expert).
        bias: optional [E] selection bias (auxiliary-loss-free balancing, DeepSeek's
            ``e_score_correction_bias``); it shifts which experts (and groups) are selected but
            never the returned weights.
        normalize: divide the k selected scores by their sum (clamped below at 1e-20).
        n_group, topk_group: group-limited selection (DeepSeek-V3, GLM-4-MoE). The E experts form
            ``n_group`` consecutive groups; each group scores the sum of its two best selection
            scores (bias included), a token keeps its ``topk_group`` best groups and picks its k
            experts among them. ``topk_group=None`` (or ``n_group=1``) keeps every group: plain top-k.
        routed_scaling_factor: multiplies the weights after any normalisation (DeepSeek-V3: 2.5).

    Returns:
        weights [T, k] fp32 (differentiable w.r.t. ``logits``), experts [T, k] int64 in descending
        selection-score order, counts [E] int64 (assignments per expert).
    """
    check_route_args(logits, k, score, bias, n_group, topk_group, routed_scaling_factor)
    logits_f32 = logits.float()
    scores_TE = torch.softmax(logits_f32, dim=-1) if score == "softmax" else torch.sigmoid(logits_f32)
    select_TE = scores_TE.detach() if bias is None else scores_TE.detach() + bias.float()
    if limits_groups(n_group, topk_group):
        select_TE = group_limited(select_TE, n_group, topk_group)
    # A stable descending sort keeps equal scores in index order: ties go to the lower expert.
    _, order_TE = torch.sort(select_TE, dim=-1, descending=True, stable=True)
    experts_Tk = order_TE[:, :k]
    weights_Tk = scores_TE.gather(1, experts_Tk)
    if normalize:
        weights_Tk = weights_Tk / weights_Tk.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if routed_scaling_factor != 1.0:
        weights_Tk = weights_Tk * routed_scaling_factor
    counts_E = torch.bincount(experts_Tk.reshape(-1), minlength=logits.shape[1])
    return weights_Tk, experts_Tk, counts_E


def topk_route(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    normalize: bool = False,
    n_group: int = 1,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing; see :func:`topk_route_ref` for the contract."""
    return implementation("topk_route", logits)(
        logits,
        k,
        score=score,
        bias=bias,
        normalize=normalize,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    )
