"""Pooling of a padded sequence into one vector per sample (classification heads, skip gates)."""

from __future__ import annotations

import torch


def masked_mean(h_BSD: torch.Tensor, mask_BS: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of each sequence (``mask`` 1 = real); every token without a mask."""
    if mask_BS is None:
        return h_BSD.mean(dim=1)
    m = mask_BS.unsqueeze(-1).to(h_BSD.dtype)
    return (h_BSD * m).sum(1) / m.sum(1).clamp_min(1.0)
