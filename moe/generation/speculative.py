"""Self-speculative greedy decoding: the model's own early exit drafts, its remaining layers verify.

One round, for every live row at once (each at its own position ``m``, the slot of its pending
token: the newest token, whose full-depth pass has not run yet):

1. Draft: the pending token and then each drafted token go through layers ``0 .. L-1`` alone,
   writing those layers' keys and values into the cache; the exit head after layer ``L`` turns
   each one's hidden state into the next draft token (argmax), ``d`` drafts in all. The last draft
   also goes through layers ``< L`` (its exit head is not needed), so the layer-``L`` states of
   all ``d + 1`` tokens are kept.
2. Verify: layers ``L .. N-1`` run once on those ``d + 1`` states (positions ``m .. m+d``),
   reading and writing only those layers' cache; layers ``< L`` are not run again: the keys and
   values the draft wrote for the same tokens at the same positions are exactly what a full pass
   would have computed there (the earlier layers see the same causal prefix).
3. Accept the longest prefix of drafts that equals the full model's argmax, plus the full model's
   next token after it (its correction, or a bonus token when every draft was right): ``k + 1``
   tokens for a row that accepted ``k``. Slots ``m .. m+k`` now hold the pending token and the
   accepted drafts, correct at every layer; the row's cache length moves past them and the
   rejected drafts' slots are simply beyond it (rolled back: nothing reads them, the next round
   overwrites them). The full model's token becomes the new pending token.

So the output is full-model greedy decoding, token for token, and each row accepts its own
number of drafts. Only greedy decoding is served (sampling would need rejection sampling against
the draft's distribution).
Shape legend: B live rows, d drafts per round, D width, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from dynamoe.generation.decode import (
    GenerationResult,
    GenerationStats,
    LiveRows,
    check_prompts,
    collect_result,
    decoding,
    final_logits,
    prefill,
    prompt_batches,
    run_layers,
)
from dynamoe.generation.kv_cache import KVCache
from dynamoe.generation.sampling import GenerationError, SamplingConfig


def draft_exit(model_cfg, draft_layers: int | None) -> tuple[int, int]:
    """(L, j): the draft runs layers ``1..L`` and reads early exit ``j`` (the one after layer L).
    Default L: the exit closest to half the depth. Read from the config alone, so the command line
    refuses a model without exits before loading it."""
    layers = list(model_cfg.exits.layers)
    if not layers:
        raise GenerationError(
            "self-speculative decoding drafts with an early exit head, and this model has none "
            "(model.exits.layers is empty); fix: train the decoder with early exits, e.g. "
            "--set 'model.exits.layers=[2]' (then two-stage or joint exit training), or generate "
            "without speculation"
        )
    if draft_layers is None:
        return min(((abs(2 * L - model_cfg.n_layers), L, j) for j, L in enumerate(layers)))[1:]
    if draft_layers not in layers:
        raise GenerationError(
            f"draft_layers={draft_layers} has no exit head after it; the model's exits sit after layers "
            f"{layers}; fix: choose one of them"
        )
    return draft_layers, layers.index(draft_layers)


def speculative_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    draft_layers: int | None = None,
    draft_tokens: int = 4,
    eos_id: int | None = None,
    batch_size: int | None = None,
    dropless: bool = False,
    sampling: SamplingConfig | None = None,
) -> GenerationResult:
    """Greedy continuation of each prompt, drafting ``draft_tokens`` tokens a round with the first
    ``draft_layers`` layers and their exit head (default: the exit nearest half the depth) and
    verifying them with the remaining layers in one pass. The tokens equal :func:`generate`'s greedy
    output; ``result.stats`` holds drafted and accepted counts."""
    if sampling is not None and not sampling.greedy:
        raise GenerationError(
            "self-speculative decoding here is greedy only (its output is full-model greedy decoding); "
            "fix: set temperature 0, or generate without speculation to sample"
        )
    if draft_tokens < 1:
        raise GenerationError(f"draft_tokens must be >= 1, got {draft_tokens}; fix: e.g. 4")
    L, j = draft_exit(model.cfg, draft_layers)
    check_prompts(model.cfg, prompts, max_new_tokens)
    start = time.perf_counter()
    stats = GenerationStats(prompts=len(prompts))
    done = []
    with decoding(model, dropless=dropless):
        for first, batch in prompt_batches(prompts, batch_size):
            done.append(_speculate_batch(model, batch, first, max_new_tokens, L, j, draft_tokens, eos_id, stats))
    return collect_result(done, stats, False, start)


def _speculate_batch(model, prompts, first, max_new, L, j, d, eos_id, stats) -> LiveRows:
    B, N = len(prompts), len(model.blocks)
    # Room for the drafts of the last round; positions past the context have no embedding.
    capacity = min(model.cfg.max_seq_len, max(len(p) for p in prompts) + max_new + d)
    cache = KVCache.for_model(model, B, capacity)
    prefill(model, cache, [p[:-1] for p in prompts])  # the last prompt token is the first pending one
    device = cache.lengths.device
    pending_B = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
    live = LiveRows(first, B, max_new, eos_id, SamplingConfig())
    while len(live):
        # Drafts past a row's remaining budget are wasted; positions must stay inside the cache.
        d_round = max(0, min(d, capacity - 1 - int(cache.lengths.max()), max(live.remaining()) - 1))
        drafts_Bd, h_BnD = _draft(model, cache, pending_B, L, j, d_round)
        positions = cache.positions(d_round + 1)
        x = run_layers(model, h_BnD, cache, positions, range(L, N))
        full_Bn = final_logits(model, x).argmax(-1)  # the full model's greedy token after each position
        stats.steps += 1
        accepted_B = (drafts_Bd == full_Bn[:, :d_round]).int().cumprod(1).sum(1)
        cache.advance(accepted_B + 1)
        pending_B = full_Bn.gather(1, accepted_B[:, None]).squeeze(1)
        stats.rounds += len(live)
        stats.drafted += d_round * len(live)
        stats.accepted += int(accepted_B.sum())
        new = [row[: k + 1] for row, k in zip(full_Bn.tolist(), accepted_B.tolist())]
        keep = live.extend(new)
        if keep is not None and len(live):
            rows = keep.nonzero().squeeze(1).to(device)
            cache.select(rows)
            pending_B = pending_B.index_select(0, rows)
    return live


def _draft(model, cache: KVCache, pending_B: torch.Tensor, L: int, j: int, d: int):
    """The draft of one round: ``d`` tokens [B, d] from exit ``j``, and the layer-``L`` states
    [B, d + 1, D] of the pending token and every draft, their layers ``< L`` cached."""
    token_B, drafts, states = pending_B, [], []
    for i in range(d + 1):
        positions = cache.positions(1, offset=i)
        h = run_layers(model, model.embed_at(token_B[:, None], positions), cache, positions, range(L))
        states.append(h)
        if i < d:
            token_B = model._exit_head(j, h[:, 0]).logits.argmax(-1)
            drafts.append(token_B)
    empty = pending_B.new_zeros(pending_B.shape[0], 0)
    return (torch.stack(drafts, 1) if drafts else empty), torch.cat(states, 1)
