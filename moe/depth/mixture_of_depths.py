"""Mixture-of-depths (Raposo et al. 2024): a router picks which tokens a block processes.

Per routed layer, a linear router scores every token; the top C = ceil(capacity * S) tokens of
each sequence go through the block (attention among the selected tokens only, in their order,
then the FFN or MoE), the others pass on the residual. The block's update is scaled by the router
weight, sigmoid(score), so the router gets gradient (``router_weight: straight_through`` uses
exactly 1 forward and the sigmoid's gradient backward).

Top-C over a sequence reads future tokens, so a decoder cannot use it when generating. The
causal-safe rule: a small predictor reads each token's layer input (stop-gradient) and is trained
with binary cross-entropy to say "this token is in the top-C"; decoding routes the tokens whose
predictor logit is > 0, a decision that depends on the token's own state only.
Shape legend: B batch, S sequence, C selected per sequence, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.compute import flops as F_


class MoDRouter(nn.Module):
    def __init__(self, d_model: int, predictor_hidden: int | None):
        super().__init__()
        self.score = nn.Linear(d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)
        self.predictor = None
        if predictor_hidden:
            self.predictor = nn.Sequential(
                nn.Linear(d_model, predictor_hidden), nn.ReLU(), nn.Linear(predictor_hidden, 1)
            )

    def scores(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.score(x_BSD).squeeze(-1).float()

    def predict(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Logit of "in the top-C" from the input alone, without training the layers below."""
        return self.predictor(x_BSD.detach()).squeeze(-1).float()

    def flops(self, rows, predictor: bool) -> dict:
        out = {"mod_router": F_.linear_flops(rows, self.score.in_features, 1)}
        if predictor and self.predictor is not None:
            out["mod_predictor"] = F_.linear_flops(
                rows, self.predictor[0].in_features, self.predictor[0].out_features
            ) + F_.linear_flops(rows, self.predictor[2].in_features, 1)
        return out


def capacity_tokens(capacity: float, seq: int) -> int:
    return max(1, min(seq, math.ceil(capacity * seq - 1e-9)))


def top_c(scores_BS: torch.Tensor, c: int, mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Positions [B, C] of each sequence's C best tokens, ascending so causal order is kept;
    padding is chosen last."""
    if mask_BS is not None:
        scores_BS = scores_BS.masked_fill(~mask_BS.bool(), float("-inf"))
    return scores_BS.topk(c, dim=1).indices.sort(dim=1).values


def router_weight(scores: torch.Tensor, kind: str) -> torch.Tensor:
    w = torch.sigmoid(scores)
    return 1.0 + (w - w.detach()) if kind == "straight_through" else w


def scale_update(x_old: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x_old + w (y - x_old), written so that w == 1 gives exactly y."""
    w = w.unsqueeze(-1).to(y.dtype)
    return y + (w - 1) * (y - x_old)


def predictor_loss(logits_BS: torch.Tensor, chosen_BS: torch.Tensor, mask_BS: torch.Tensor | None) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits_BS, chosen_BS.float(), reduction="none")
    if mask_BS is None:
        return loss.mean()
    m = mask_BS.float()
    return (loss * m).sum() / m.sum().clamp_min(1.0)
