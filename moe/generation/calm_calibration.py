"""CALM thresholds chosen on held-out text so that exited tokens agree with the full model.

1. **Records.** Held-out prompts (windows of the run's validation split) are decoded greedily
   by the full model (every threshold +inf); at every generated token every exit's confidence
   score and argmax are recorded, with the full model's token: T tokens, J exits.
2. **Risk.** For a shared threshold t, a token leaves at its first exit whose score reaches t;
   it *disagrees* when that exit's argmax differs from the full model's token (a token that
   reaches the final head always agrees). The empirical risk is the disagreeing fraction of all
   T tokens, i.e. one minus the agreement with full greedy decoding.
3. **Choice.** Thresholds on a grid fixed in advance are tested from the strictest down
   (fixed-sequence testing, as in Learn-then-Test, Angelopoulos et al. 2021, which CALM uses):
   t passes when the one-sided Clopper-Pearson upper bound at level 1 - epsilon of the risk is
   at most delta, and testing stops at the first t that fails. The chosen threshold is the
   last that passed (+inf, no early exit, when the strictest fails).

What this gives: if the calibration tokens and the tokens later decoded are independent draws
from the same distribution, then with probability at least 1 - epsilon over the calibration set
the chosen threshold's risk, measured on full-model trajectories, is at most delta (testing a
fixed sequence and stopping at the first failure needs no multiplicity correction). What it does
not give: (a) tokens of one window are not independent, so the binomial bound is optimistic
when exits err in bursts; (b) CALM's own decoding differs from the full-model trajectory (exited
tokens give later tokens propagated keys and values, and once a token differs the text differs),
so the bound is on per-step agreement along full-model trajectories, and ``agreement_with_full``
measures it on CALM's own output; (c) prompts unlike the validation text are not covered.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamoe.generation.calm import StepRecord, calm_generate, check_calm
from dynamoe.generation.sampling import GenerationError

THRESHOLDS_FILE = "calm_thresholds.json"
GRID_POINTS = 400


# --- the binomial bound --------------------------------------------------------------------------


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for the sizes used here)."""
    if k >= n or p <= 0.0:
        return 1.0
    if k < 0 or p >= 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_terms = (
        math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    )
    return float(torch.logsumexp(log_terms, 0).exp().clamp(max=1.0))


def clopper_pearson_upper(k: int, n: int, epsilon: float) -> float:
    """One-sided Clopper-Pearson upper bound at level 1 - epsilon on a binomial proportion after
    ``k`` events in ``n`` trials: the p at which P(X <= k) = epsilon (1 when k = n)."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):  # the CDF falls as p grows: bisect to double precision
        mid = (lo + hi) / 2
        if binomial_cdf(k, n, mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# --- records and the choice ----------------------------------------------------------------------


@dataclass
class CalmRecords:
    scores: torch.Tensor  # [T, J] fp32 every exit's confidence score
    agree: torch.Tensor  # [T, J] bool: the exit's argmax is the full model's token
    exit_layers: list[int]
    n_layers: int

    @classmethod
    def from_steps(cls, steps: list[StepRecord], exit_layers: list[int], n_layers: int) -> CalmRecords:
        scores = torch.cat([s.scores.cpu() for s in steps])
        agree = torch.cat([(s.exit_tokens == s.final_tokens[:, None]).cpu() for s in steps])
        return cls(scores, agree, list(exit_layers), n_layers)

    @property
    def tokens(self) -> int:
        return self.scores.shape[0]

    def first_exit(self, thresholds: list[float]) -> torch.Tensor:
        """[T] the early exit each token would leave at (J: the final head)."""
        thr = torch.tensor(thresholds, dtype=self.scores.dtype)
        passes = torch.cat([self.scores >= thr, torch.ones(self.tokens, 1, dtype=torch.bool)], 1)
        return passes.int().argmax(1)

    def outcome(self, thresholds: list[float]) -> dict:
        """Disagreements, exit fractions and layers per token under ``thresholds`` (full trajectories)."""
        J = self.scores.shape[1]
        exit_at = self.first_exit(thresholds)
        agree = torch.cat([self.agree, torch.ones(self.tokens, 1, dtype=torch.bool)], 1)
        wrong = int((~agree.gather(1, exit_at[:, None])).sum())
        layers = torch.tensor([*self.exit_layers, self.n_layers], dtype=torch.float64)[exit_at]
        return {
            "disagreements": wrong,
            "exit_fractions": (torch.bincount(exit_at, minlength=J + 1).double() / max(self.tokens, 1)).tolist(),
            "layers_per_token": float(layers.mean()) if self.tokens else None,
        }


def threshold_grid(confidence: str, points: int = GRID_POINTS) -> list[float]:
    """Candidate thresholds, strictest first, fixed before any record is seen (as fixed-sequence
    testing needs): denser near the top of the score range, where useful thresholds lie. Scores
    lie in [0, 1], saturation (a cosine) in [-1, 1]."""
    low = -1.0 if confidence == "saturation" else 0.0
    return [1.0 - (1.0 - low) * (k / points) ** 2 for k in range(points + 1)]


def calibrate(records: CalmRecords, delta: float, epsilon: float, confidence: str) -> dict:
    """The smallest shared threshold, testing the grid from the strictest down and stopping at the
    first failure, whose Clopper-Pearson bound (level 1 - epsilon) on the disagreement rate is at
    most ``delta``; +inf when none passes. Returns the choice with its calibration figures."""
    if not 0 < delta < 1:
        raise GenerationError(f"delta must be in (0, 1), got {delta}; fix: e.g. 0.05")
    if not 0 < epsilon < 1:
        raise GenerationError(f"epsilon must be in (0, 1), got {epsilon}; fix: e.g. 0.05")
    J, T = len(records.exit_layers), records.tokens
    chosen, bound, tested = float("inf"), clopper_pearson_upper(0, T, epsilon), 0
    for t in threshold_grid(confidence):
        tested += 1
        wrong = records.outcome([t] * J)["disagreements"]
        if wrong / max(T, 1) > delta:  # the bound is above the empirical rate: no need to compute it
            break
        # The bound is at most delta exactly when P(X <= wrong) at p = delta is at most epsilon.
        if binomial_cdf(wrong, T, delta) > epsilon:
            break
        chosen = t
    if chosen != float("inf"):
        bound = clopper_pearson_upper(records.outcome([chosen] * J)["disagreements"], T, epsilon)
    out = records.outcome([chosen] * J)
    return {
        "confidence": confidence,
        "delta": delta,
        "epsilon": epsilon,
        "threshold": chosen,
        "thresholds": [chosen] * J,
        "exit_layers": records.exit_layers,
        "calibration_tokens": T,
        "disagreement_rate": out["disagreements"] / max(T, 1),
        "upper_bound": bound,
        "grid_tested": tested,
        **out,
    }


def record_calibration(model, prompts, *, max_new_tokens: int, confidence: str, batch_size: int | None = 32):
    """:class:`CalmRecords` of full-model greedy decoding of ``prompts``."""
    steps: list[StepRecord] = []
    calm_generate(
        model,
        prompts,
        thresholds=float("inf"),
        confidence=confidence,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        records=steps,
    )
    return CalmRecords.from_steps(steps, list(model.cfg.exits.layers), model.cfg.n_layers)


# --- a run folder --------------------------------------------------------------------------------


def held_out_prompts(val_ids: torch.Tensor, windows: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """``windows`` prompts of ``prompt_tokens`` tokens from random places of the validation stream."""
    n = len(val_ids)
    if n <= prompt_tokens:
        raise GenerationError(
            f"the validation split has {n} tokens, too few for calibration prompts of {prompt_tokens}; "
            "fix: lower --calibration-prompt-tokens"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - prompt_tokens, (windows,), generator=g)
    idx = starts[:, None] + torch.arange(prompt_tokens)
    return val_ids[idx].tolist()


@dataclass(frozen=True)
class CalibrationSettings:
    delta: float = 0.05
    epsilon: float = 0.05
    confidence: str = "margin"
    windows: int = 64
    prompt_tokens: int | None = None  # default: a quarter of the context, at most 32
    new_tokens: int | None = None  # default: what the context leaves, at most 64
    seed: int = 0

    def sizes(self, context: int) -> tuple[int, int]:
        prompt = self.prompt_tokens or max(1, min(32, context // 4))
        new = self.new_tokens or max(1, min(64, context - prompt))
        if prompt + new > context:
            raise GenerationError(
                f"calibration prompts of {prompt} tokens plus {new} new ones exceed the context of {context}; "
                "fix: lower --calibration-prompt-tokens or --calibration-new-tokens"
            )
        return prompt, new


def _checkpoint_name(run) -> str:
    from dynamoe.training.checkpoint import resolve_resume

    weights = Path(run.weights)
    return str(weights if weights.is_file() else resolve_resume(weights))


def read_thresholds(run, settings: CalibrationSettings) -> dict | None:
    """The run's stored calibration when it was made for these settings and these weights, else None."""
    path = Path(run.run_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    want = {
        "delta": settings.delta,
        "epsilon": settings.epsilon,
        "confidence": settings.confidence,
        "checkpoint": _checkpoint_name(run),
        "exit_layers": list(run.model_cfg.exits.layers),
        "windows": settings.windows,
    }
    return saved if all(saved.get(k) == v for k, v in want.items()) else None


def calibrate_run(run, model, settings: CalibrationSettings, *, batch_size: int = 32, log=print) -> dict:
    """Calibrate ``model`` (loaded from ``run``, a ``RunSource``) on its run's validation split and
    write ``calm_thresholds.json`` into the run folder."""
    import yaml

    from dynamoe.config import RunConfig, from_dict
    from dynamoe.data import DataError, build_data

    check_calm(run.model_cfg, settings.confidence)
    cfg = from_dict(RunConfig, yaml.safe_load((Path(run.run_dir) / "config.yaml").read_text()))
    try:
        data = build_data(cfg.data, "lm")
    except DataError as err:
        raise GenerationError(
            f"CALM calibrates on the run's validation split, which could not be loaded ({err}); fix: make "
            "the run's data available, or pass --calm-threshold T (no guarantee)"
        ) from None
    prompt_len, new = settings.sizes(run.model_cfg.max_seq_len)
    prompts = held_out_prompts(data.val_ids, settings.windows, prompt_len, settings.seed)
    log(
        f"CALM calibration: {settings.windows} validation windows of {prompt_len} tokens, {new} new tokens each, "
        f"full-model greedy; confidence {settings.confidence}, delta {settings.delta}, epsilon {settings.epsilon}"
    )
    records = record_calibration(
        model, prompts, max_new_tokens=new, confidence=settings.confidence, batch_size=batch_size
    )
    result = calibrate(records, settings.delta, settings.epsilon, settings.confidence)
    result.update(
        checkpoint=_checkpoint_name(run),
        windows=settings.windows,
        prompt_tokens=prompt_len,
        new_tokens=new,
        seed=settings.seed,
    )
    path = Path(run.run_dir) / THRESHOLDS_FILE
    path.write_text(json.dumps(result, indent=2))
    log(describe(result) + f"\nwrote {path}")
    return result


def describe(result: dict) -> str:
    t = result["threshold"]
    if t == float("inf"):
        return (
            f"CALM threshold: none passes (even the strictest exits disagree too often for delta {result['delta']} "
            f"on {result['calibration_tokens']} tokens): every token runs the full model"
        )
    fractions = ", ".join(f"{f:.1%}" for f in result["exit_fractions"])
    return (
        f"CALM threshold {t:.4f} ({result['confidence']}): {result['disagreement_rate']:.2%} of "
        f"{result['calibration_tokens']} calibration tokens disagree, upper bound {result['upper_bound']:.2%} "
        f"at {1 - result['epsilon']:.0%} confidence (delta {result['delta']}); exits after layers "
        f"{result['exit_layers']} + final take {fractions}; {result['layers_per_token']:.2f} layers per token"
    )
