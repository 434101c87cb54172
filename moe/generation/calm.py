"""Per-token early exit while decoding (CALM, Schuster et al. 2022), greedy and batched.

Each step feeds every live row's pending token (its newest) at its own position and runs the
layers in order. After each exit layer the rows still running get a confidence score:

    margin       top-1 minus top-2 softmax probability of the exit's logits
    max_prob     top-1 probability;  entropy  1 - H(p) / ln V (as ``dynamoe.exits.heads``)
    saturation   cosine similarity of the state after the exit's layer and the state before it
                 (CALM's hidden-state saturation: the layer barely moved the token)
    learned      sigmoid of the model's exit predictor (``model.exits.policy: learned``)

A row whose score reaches its exit's threshold emits the exit's argmax and skips the remaining
layers. Later tokens still attend to it at those layers, so its state after the exit is copied
forward as the input of every skipped layer: each skipped layer computes only the key and value
of that state (its norm and K/V projections) and writes them into the cache (CALM's state
propagation). Rows leave at different exits; the rows still running go on through the next
layers alone (their cache rows are gathered, their new keys written back in place).

With thresholds no score reaches (+inf) every row runs every layer and the output is full
greedy decoding; ``result.stats`` counts the layers and FLOPs each token really ran, the
propagated key/value projections included. Thresholds with a stated agreement guarantee come
from ``calm_calibration.py``.
Shape legend: B live rows, R rows running at a layer, G key/value heads, C capacity, Dh head width,
D width, V vocabulary, J early exits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynamoe.compute import flops as F_
from dynamoe.generation.decode import (
    GenerationResult,
    GenerationStats,
    LiveRows,
    check_prompts,
    collect_result,
    decoding,
    prefill,
    prompt_batches,
)
from dynamoe.generation.kv_cache import CacheStep, KVCache
from dynamoe.generation.sampling import GenerationError, SamplingConfig

CONFIDENCES = ("margin", "max_prob", "entropy", "saturation", "learned")


# --- statistics ----------------------------------------------------------------------------------


@dataclass
class CalmStats(GenerationStats):
    decided: int = 0  # tokens chosen by a CALM step (one per live row per step)
    layers_run: int = 0  # full layers run, summed over those tokens
    n_layers: int = 0
    exit_layers: list[int] = field(default_factory=list)  # layer after which each early exit sits
    exit_counts: list[int] = field(default_factory=list)  # tokens emitted at each early exit, then the final head
    flops: float = 0.0  # of the decoding steps as run: layers, propagated K/V, heads and predictors
    full_flops: float = 0.0  # of the same steps with every layer and the final head only

    @property
    def layers_per_token(self) -> float | None:
        return self.layers_run / self.decided if self.decided else None

    @property
    def flops_ratio(self) -> float | None:
        return self.flops / self.full_flops if self.full_flops else None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(layers_per_token=self.layers_per_token, flops_ratio=self.flops_ratio)
        return out


class _Costs:
    """FLOPs of one token at one layer (``dynamoe.compute.flops`` conventions, dropless MoE): a full
    layer is ``fixed[i] + per_key * keys``; a propagated state costs its K and V projections."""

    def __init__(self, model):
        cfg = model.cfg
        D = cfg.d_model
        q_width, kv_width = F_.attention_widths(cfg)
        self.kv_only = F_.linear_flops(1, D, 2 * kv_width)
        projections = F_.linear_flops(1, D, 2 * q_width) + self.kv_only
        self.fixed = [
            projections
            + (
                F_.moe_ffn_flops(1, D, cfg.moe)
                if block.is_moe
                else F_.dense_ffn_flops(1, D, cfg.d_ff, cfg.moe.activation)
            )
            for block in model.blocks
        ]
        self.per_key = 4 * q_width  # scores and weighted values, per key read
        self.head = F_.linear_flops(1, D, cfg.vocab_size)
        self.predictor = F_.linear_flops(1, D, 1)

    def layer(self, i: int, rows: int, keys: float) -> float:
        return self.fixed[i] * rows + self.per_key * keys


# --- the cache of some rows ----------------------------------------------------------------------


class RowsLayerCache:
    """A layer's cache seen by some rows of the batch only (the rows still running): new keys and
    values are written into those rows of the full cache in place; attention reads a gathered copy
    of their slots up to the step's span."""

    def __init__(self, k_BGCD: torch.Tensor, v_BGCD: torch.Tensor, rows_R: torch.Tensor, step: CacheStep):
        self.k, self.v, self.rows, self.step = k_BGCD, v_BGCD, rows_R, step

    @property
    def positions(self) -> torch.Tensor:
        return self.step.positions

    @property
    def mask(self) -> torch.Tensor:
        return self.step.mask

    def append(self, k_RGnD: torch.Tensor, v_RGnD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        write_kv(self.k, self.v, self.rows, self.step.positions[:, 0], k_RGnD, v_RGnD)
        span = self.step.span
        return self.k[self.rows, :, :span], self.v[self.rows, :, :span]


def write_kv(k_BGCD, v_BGCD, rows_R, positions_R, k_RGnD, v_RGnD) -> None:
    """One new token per row: its key and value into slot ``positions[r]`` of row ``rows[r]``."""
    k_BGCD[rows_R, :, positions_R] = k_RGnD[:, :, 0].to(k_BGCD.dtype)
    v_BGCD[rows_R, :, positions_R] = v_RGnD[:, :, 0].to(v_BGCD.dtype)


def propagated_kv(block, x_RnD: torch.Tensor, positions_Rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [R, G, n, Dh] that ``block``'s attention makes of input states ``x``,
    as it caches them (the modern block's after QK-norm and rotation): what later tokens read of a
    token whose state was copied into this layer."""
    from dynamoe.models.modern import GroupedQueryAttention

    attn, u = block.attn, block.ln1(x_RnD)
    R, n, D = u.shape
    if isinstance(attn, GroupedQueryAttention):
        k = attn._rotate(attn._heads(attn.k_proj(u), attn.k_norm, attn.n_kv_heads), positions_Rn)
        return k, attn._heads(attn.v_proj(u), None, attn.n_kv_heads)
    k, v = F.linear(u, attn.qkv.weight[D:]).split(D, dim=-1)
    return tuple(t.view(R, n, attn.n_heads, D // attn.n_heads).transpose(1, 2) for t in (k, v))


# --- confidence ----------------------------------------------------------------------------------


def check_calm(model_cfg, confidence: str, thresholds: Sequence[float] | None = None) -> None:
    """Refuse a CALM request the model cannot serve, from its config alone (before weights load)."""
    if confidence not in CONFIDENCES:
        raise GenerationError(f"unknown CALM confidence {confidence!r}; fix: choose one of {list(CONFIDENCES)}")
    layers = list(model_cfg.exits.layers)
    if not layers:
        raise GenerationError(
            "CALM exits tokens at the model's early exit heads, and this model has none (model.exits.layers "
            "is empty); fix: train the decoder with early exits, e.g. --set 'model.exits.layers=[2,4]' "
            "(configs/shakespeare_layerskip.yaml), or generate without --calm"
        )
    if confidence == "learned" and model_cfg.exits.policy != "learned":
        raise GenerationError(
            f"confidence 'learned' reads the exit predictors, which only a model trained with "
            f"model.exits.policy: learned has (this one: '{model_cfg.exits.policy}'); fix: use margin or saturation"
        )
    if thresholds is not None and len(thresholds) != len(layers):
        raise GenerationError(
            f"{len(thresholds)} CALM thresholds for {len(layers)} early exits (after layers {layers}); "
            "fix: give one per exit, or a single number for all"
        )


def _confidence(model, kind: str, j: int, x_RD: torch.Tensor, before_RD: torch.Tensor):
    """(score [R] fp32, exit logits [R, V] or None when the score did not need them)."""
    if kind == "saturation":
        return F.cosine_similarity(x_RD.float(), before_RD.float(), dim=-1), None
    h = model.exit_norms[j](x_RD)
    if kind == "learned":
        return torch.sigmoid(model.exit_predictors[j](h).squeeze(-1).float()), None
    logits = model.head(h)
    probs = torch.softmax(logits.float(), dim=-1)
    if kind == "max_prob":
        return probs.max(-1).values, logits
    if kind == "entropy":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return 1.0 - entropy / math.log(probs.shape[-1]), logits
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    return (top2[:, 0] - top2[:, 1]) if top2.shape[-1] > 1 else top2[:, 0], logits


def _score_cost(costs: _Costs, kind: str) -> float:
    return {"saturation": 0.0, "learned": costs.predictor}.get(kind, costs.head)


# --- one decoding step ---------------------------------------------------------------------------


@dataclass
class StepRecord:
    """Calibration: every exit's score and argmax for each row of a step with nobody exiting."""

    scores: torch.Tensor  # [B, J] fp32
    exit_tokens: torch.Tensor  # [B, J]
    final_tokens: torch.Tensor  # [B]


def calm_step(
    model,
    cache: KVCache,
    tokens_B: torch.Tensor,
    thresholds: Sequence[float],
    confidence: str,
    stats: CalmStats,
    costs: _Costs,
    record: bool = False,
):
    """Decode one token per row: ``tokens`` enter at each row's next position, each row leaves at
    its first exit whose score reaches the threshold (its state then propagated into the skipped
    layers' cache), the rest reach the final head. Returns the next token of each row [B] (and,
    with ``record``, a :class:`StepRecord`; thresholds must then be unreachable). The caller
    advances the cache by one."""
    N = len(model.blocks)
    exit_after = {L - 1: j for j, L in enumerate(model.cfg.exits.layers)}
    B = tokens_B.shape[0]
    positions_B1 = cache.positions(1)
    keys_B = (positions_B1[:, 0] + 1).double()  # slots a query at position p reads: 0..p
    full_step = cache.step(positions_B1)
    x = model.embed_at(tokens_B[:, None], positions_B1)
    running = torch.arange(B, device=tokens_B.device)
    step = full_step
    out_B = torch.empty_like(tokens_B)
    layers_B = torch.full_like(tokens_B, N)
    J = len(exit_after)
    counts = [0] * (J + 1)
    if record:
        scores_BJ = torch.empty(B, J, dtype=torch.float32, device=x.device)
        exit_tokens_BJ = torch.empty(B, J, dtype=torch.long, device=x.device)
    flops = 0.0
    for i, block in enumerate(model.blocks):
        R = running.shape[0]
        if R == 0:
            break
        whole = R == B
        layer_cache = cache.layer(i, step) if whole else RowsLayerCache(cache.k[i], cache.v[i], running, step)
        before = x
        x = block.forward_cached(x, layer_cache)
        flops += costs.layer(i, R, float(keys_B[running].sum()))
        if i not in exit_after:
            continue
        j = exit_after[i]
        score_R, logits_RV = _confidence(model, confidence, j, x[:, 0], before[:, 0])
        flops += _score_cost(costs, confidence) * R
        if record:
            scores_BJ[running, j] = score_R
            if logits_RV is None:
                logits_RV = model.head(model.exit_norms[j](x[:, 0]))
            exit_tokens_BJ[running, j] = logits_RV.argmax(-1)
        leave_R = score_R >= thresholds[j]
        n_leave = int(leave_R.sum())
        if n_leave == 0:
            continue
        rows_E = running[leave_R]
        h_E1D = x[leave_R]
        if logits_RV is None:
            logits_EV = model.head(model.exit_norms[j](h_E1D[:, 0]))
            flops += costs.head * n_leave
        else:
            logits_EV = logits_RV[leave_R]
        out_B[rows_E] = logits_EV.argmax(-1)
        layers_B[rows_E] = i + 1
        counts[j] += n_leave
        # State propagation: the exited token's state is the input of every layer it skips.
        pos_E1 = positions_B1[rows_E]
        for later in range(i + 1, N):
            k, v = propagated_kv(model.blocks[later], h_E1D, pos_E1)
            write_kv(cache.k[later], cache.v[later], rows_E, pos_E1[:, 0], k, v)
        flops += costs.kv_only * n_leave * (N - 1 - i)
        running, x = running[~leave_R], x[~leave_R]
        if running.numel():
            step = cache.step(positions_B1[running])
    if running.numel():
        out_B[running] = model.head(model.ln_f(x[:, 0])).argmax(-1)
        flops += costs.head * running.numel()
        counts[J] += running.numel()
    stats.flops += flops
    stats.full_flops += sum(costs.layer(i, B, float(keys_B.sum())) for i in range(N)) + costs.head * B
    stats.decided += B
    stats.layers_run += int(layers_B.sum())
    stats.exit_counts = [a + b for a, b in zip(stats.exit_counts or [0] * (J + 1), counts)]
    if record:
        return out_B, StepRecord(scores_BJ, exit_tokens_BJ, out_B.clone())
    return out_B


# --- the decoding loop ---------------------------------------------------------------------------


def threshold_list(model_cfg, thresholds) -> list[float]:
    """One threshold per early exit from a number (shared) or a list."""
    J = len(model_cfg.exits.layers)
    if isinstance(thresholds, int | float):
        return [float(thresholds)] * J
    return [float(t) for t in thresholds]


def calm_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    thresholds: float | Sequence[float],
    confidence: str = "margin",
    max_new_tokens: int = 64,
    eos_id: int | None = None,
    batch_size: int | None = None,
    dropless: bool = False,
    records: list[StepRecord] | None = None,
) -> GenerationResult:
    """Greedy continuation of each prompt with per-token early exit: a token leaves at the first
    exit whose ``confidence`` score reaches that exit's threshold (one number for all exits, or
    one per exit; ``calm_calibration.calibrate`` chooses them). ``records`` (a list to fill; every
    threshold must then be +inf) receives every exit's score and argmax at every step, for
    calibration. ``result.stats`` is a :class:`CalmStats`."""
    check_calm(model.cfg, confidence)
    thr = threshold_list(model.cfg, thresholds)
    check_calm(model.cfg, confidence, thr)
    if records is not None and any(t != float("inf") for t in thr):
        raise GenerationError("recording exit scores needs every threshold at +inf (the full-model trajectory)")
    check_prompts(model.cfg, prompts, max_new_tokens)
    start = time.perf_counter()
    stats = CalmStats(prompts=len(prompts), n_layers=model.cfg.n_layers, exit_layers=list(model.cfg.exits.layers))
    done = []
    with decoding(model, dropless=dropless):
        costs = _Costs(model)
        for first, batch in prompt_batches(prompts, batch_size):
            done.append(
                _calm_batch(model, batch, first, max_new_tokens, thr, confidence, eos_id, stats, costs, records)
            )
    return collect_result(done, stats, False, start)


def _calm_batch(model, prompts, first, max_new, thr, confidence, eos_id, stats, costs, records) -> LiveRows:
    B = len(prompts)
    cache = KVCache.for_model(model, B, max(len(p) for p in prompts) + max_new)
    # The last prompt token is decided on like every later one: its own step may exit early.
    prefill(model, cache, [p[:-1] for p in prompts])
    device = cache.lengths.device
    pending_B = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
    live = LiveRows(first, B, max_new, eos_id, SamplingConfig())
    while len(live):
        out = calm_step(model, cache, pending_B, thr, confidence, stats, costs, record=records is not None)
        if records is not None:
            pending_B, rec = out
            records.append(rec)
        else:
            pending_B = out
        cache.advance(1)
        stats.steps += 1
        keep = live.extend([[t] for t in pending_B.tolist()])
        if keep is not None and len(live):
            rows = keep.nonzero().squeeze(1).to(device)
            cache.select(rows)
            pending_B = pending_B.index_select(0, rows)
    return live


# --- agreement with the full model ---------------------------------------------------------------


def agreement_with_full(model, prompts, calm_tokens, full_tokens) -> dict:
    """How CALM's output compares with full greedy decoding of the same prompts:

    ``token_agreement``  fraction of CALM's tokens that the full model's argmax picks after CALM's
                         own prefix (a full forward over prompt + CALM output): what calibration bounds
    ``sequence_agreement``  fraction of positions where CALM's sequence equals full greedy's (a single
                         early difference changes all that follows, so this is the stricter figure)
    ``identical``        fraction of prompts whose whole continuation is full greedy's
    """
    same_step = same_pos = total = identical = 0
    with decoding(model):
        for prompt, calm, full in zip(prompts, calm_tokens, full_tokens):
            if calm:
                seq = torch.tensor([list(prompt) + list(calm)], device=model.tok_emb.weight.device)
                logits = model(seq).logits[0, len(prompt) - 1 : -1]
                same_step += int((logits.argmax(-1).cpu() == torch.tensor(calm)).sum())
            same_pos += sum(a == b for a, b in zip(calm, full))
            total += len(calm)
            identical += int(list(calm) == list(full))
    return {
        "token_agreement": same_step / total if total else None,
        "sequence_agreement": same_pos / total if total else None,
        "identical": identical / len(prompts) if prompts else None,
    }
