"""How the next token is chosen from a row's logits: greedy, or sampled with temperature, top-k and
top-p (nucleus). Each row draws from its own seeded generator, so a prompt's completion depends on
its seed and its own text, never on which other prompts share its batch.
Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class GenerationError(ValueError):
    """A generation request that cannot be served; the message names the problem and the fix."""


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0 is greedy (argmax); above 0 the softmax of logits / temperature is
    sampled, cut to the ``top_k`` most likely tokens and then to the smallest set whose
    probability reaches ``top_p``. Prompt ``i`` of a request samples with seed ``seed + i``."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}; fix: 0 for greedy, e.g. 0.8")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}; fix: e.g. 50, or leave it out")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}; fix: e.g. 0.9, or leave it out")
        if self.greedy and (self.top_k is not None or self.top_p is not None):
            raise GenerationError(
                "top_k and top_p shape sampling, but temperature is 0 (greedy); fix: set a temperature > 0, e.g. 0.8"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generators(self, first_prompt: int, count: int) -> list[torch.Generator] | None:
        """One CPU generator per prompt ``first_prompt .. first_prompt + count - 1`` (None when greedy)."""
        if self.greedy:
            return None
        return [torch.Generator().manual_seed(self.seed + first_prompt + i) for i in range(count)]


def filtered_probs(logits_BV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution [B, V] (fp32) sampling draws from after temperature, top-k and top-p."""
    logits = logits_BV.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p: the most likely token always stays.
        before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = before < cfg.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose_next(logits_BV: torch.Tensor, cfg: SamplingConfig, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token of each row [B] (int64): argmax when greedy, else one draw per row from its generator."""
    if cfg.greedy:
        return logits_BV.argmax(-1)
    probs = filtered_probs(logits_BV, cfg)
    # Inverse CDF with one uniform per row from the row's own generator (batch-independent draws).
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device)
    cdf = probs.cumsum(-1)
    # The first token whose cdf passes u: tokens without mass (cdf flat there) are never it.
    picked = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1)
    # Rounding can leave the cdf's tail below u: never pick past the last token with mass.
    last_kept = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(picked, last_kept)
