"""Incremental (KV-cache) decoding for dynamoe's decoders: greedy or sampled, batched.

A batch of prompts is prefilled in one pass (right-padded; each row's slots are its positions,
see ``kv_cache.py``), then every step feeds each live row's newest token at its own position and
reads the next token's logits. Rows that finish (``max_new_tokens`` reached, or the tokenizer's
EOS) leave the batch, cache included, so later steps compute only the rows still generating. At
every step the logits equal those of a full forward over the row's whole sequence (within fp32
rounding; ``tests/test_generation.py``), because every part of the decoder is causal per token:
:func:`check_decodable` refuses what is not.
Shape legend: B rows, P longest prompt, n new tokens per row, D width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dynamoe.generation.kv_cache import KVCache
from dynamoe.generation.sampling import GenerationError, SamplingConfig, choose_next


def check_decodable(cfg, *, dropless: bool = False) -> None:
    """Refuse a model (by its ``ModelConfig``) whose full pass is not what incremental decoding
    computes, naming why and the fix. Read from the config alone, before any weight is loaded."""
    if cfg.kind != "decoder":
        raise GenerationError(
            f"generation needs a decoder (model.kind: decoder), this model is '{cfg.kind}'; "
            "fix: pass the run folder of a language model"
        )
    if cfg.depth.enabled:
        raise GenerationError(
            f"model.depth.mode '{cfg.depth.mode}' decides per layer from the whole sequence (halting, "
            "skipping or mixture-of-depths routing), which a KV cache decoding one token at a time does "
            "not reproduce; fix: generate with a model trained with model.depth.mode: none"
        )
    router = cfg.moe.router
    has_moe = any(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if has_moe and router.kind == "expert_choice":
        raise GenerationError(
            "expert-choice routing lets each expert pick its top tokens among the whole batch, so a "
            "token's experts depend on later tokens (it is not causal) and cannot be decoded one token "
            "at a time; fix: generate with a token-choice model (model.moe.router.kind: token_choice)"
        )
    if has_moe and router.capacity_factor is not None and not dropless:
        raise GenerationError(
            f"model.moe.router.capacity_factor={router.capacity_factor} drops tokens by how many share an "
            "expert in the batch, so a token decoded alone would route differently from the same token "
            "in a full pass; fix: decode dropless (every token to its top-k experts: `moe generate "
            "--dropless`, or dropless=True), which equals a full pass with capacity_factor: null"
        )


@contextlib.contextmanager
def decoding(model, *, dropless: bool = False):
    """``model`` set up for decoding: checked, in eval mode, its MoE layers not counting load
    statistics (generation is not an evaluation pass), and, with ``dropless``, its routers without
    capacity. Everything is restored on exit."""
    from dynamoe.models.transformer import TransformerLM

    if not isinstance(model, TransformerLM):
        raise GenerationError(
            f"generation needs a TransformerLM decoder, got {type(model).__name__}; fix: pass a language model"
        )
    check_decodable(model.cfg, dropless=dropless)
    layers = model.moe_layers()
    saved = [(m, m.record_stats, m.router.cfg) for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.record_stats = False
        if dropless:
            m.router.cfg = dataclasses.replace(m.router.cfg, capacity_factor=None)
    try:
        with torch.inference_mode():
            yield model
    finally:
        for m, stats, router_cfg in saved:
            m.record_stats, m.router.cfg = stats, router_cfg
        model.train(was_training)


# --- the cached forward, in parts ----------------------------------------------------------------


def run_layers(model, x_BnD: torch.Tensor, cache: KVCache, positions_Bn: torch.Tensor, layers: range) -> torch.Tensor:
    """Blocks ``layers`` on new tokens at ``positions``, each writing its keys and values into ``cache``."""
    step = cache.step(positions_Bn)
    for i in layers:
        x_BnD = model.blocks[i].forward_cached(x_BnD, cache.layer(i, step))
    return x_BnD


def final_logits(model, x_BnD: torch.Tensor) -> torch.Tensor:
    return model.head(model.ln_f(x_BnD))


def prefill(model, cache: KVCache, sequences: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """Every layer over the sequences (right-padded into one batch), caching their keys and values;
    sets each row's length. Returns the final hidden states [B, P, D], or None when all are empty."""
    lens = [len(s) for s in sequences]
    P = max(lens)
    device = cache.lengths.device
    cache.lengths = torch.tensor(lens, dtype=torch.long, device=device)
    if P == 0:
        return None
    # Padding slots of a shorter row are overwritten by its next tokens before any query reads them.
    ids = torch.zeros(len(sequences), P, dtype=torch.long, device=device)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    positions = torch.arange(P, device=device).expand(len(sequences), P)
    return run_layers(model, model.embed_at(ids, positions), cache, positions, range(len(model.blocks)))


def check_prompts(model_cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse prompts that are empty, hold ids outside the vocabulary, or leave no room for
    ``max_new_tokens`` within the context (``model.max_seq_len``: positions past it have no
    embedding, and no full pass of that length exists to equal)."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}; fix: e.g. 64")
    if not prompts:
        raise GenerationError("no prompts to generate from; fix: give at least one prompt")
    context = model_cfg.max_seq_len
    for i, p in enumerate(prompts, 1):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty (no tokens to continue); fix: give it some text")
        bad = [t for t in p if not 0 <= int(t) < model_cfg.vocab_size]
        if bad:
            raise GenerationError(
                f"prompt {i} holds token ids {bad[:5]} outside the vocabulary of {model_cfg.vocab_size}; "
                "fix: encode it with the model's tokenizer"
            )
        if len(p) + max_new_tokens > context:
            room = context - len(p)
            fix = (
                f"lower max_new_tokens to {room} or shorten the prompt"
                if room > 0
                else f"shorten it to at most {context - 1} tokens (keep its end)"
            )
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens and {max_new_tokens} new tokens would make {len(p) + max_new_tokens}, "
                f"longer than the model's context (model.max_seq_len={context}; there is no sliding window); fix: {fix}"
            )


# --- bookkeeping shared by plain and speculative decoding ----------------------------------------


@dataclass
class GenerationStats:
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0  # full-depth forward passes after the prefill (one per token, or one per speculative round)
    drafted: int = 0  # speculative: draft tokens proposed (summed over rows)
    accepted: int = 0  # speculative: draft tokens the full model agreed with
    rounds: int = 0  # speculative: draft-and-verify rounds (each row counted once per round)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_round(self) -> float | None:
        """Speculative: tokens each row gains per verification pass (accepted drafts plus one)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(
            tokens_per_second=self.tokens_per_second,
            acceptance_rate=self.acceptance_rate,
            tokens_per_round=self.tokens_per_round,
        )
        return out


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each prompt, in prompt order (an EOS it met included)
    stats: GenerationStats
    logits: list[torch.Tensor] | None = None  # with record_logits: [new tokens, V] per prompt, fp32
    finished_by_eos: list[bool] = field(default_factory=list)


class LiveRows:
    """The rows of one batch still generating: which prompt each is, their outputs so far, their
    generators; finished rows leave (and the caller drops them from its tensors with ``keep``)."""

    def __init__(self, first: int, count: int, max_new: int, eos_id: int | None, sampling: SamplingConfig):
        self.prompt = list(range(first, first + count))  # live row -> prompt index
        self.max_new, self.eos_id = max_new, eos_id
        self.outputs: dict[int, list[int]] = {p: [] for p in self.prompt}
        self.logits: dict[int, list[torch.Tensor]] = {p: [] for p in self.prompt}
        self.eos: dict[int, bool] = {p: False for p in self.prompt}
        self.generators = sampling.generators(first, count)

    def __len__(self) -> int:
        return len(self.prompt)

    def remaining(self) -> list[int]:
        return [self.max_new - len(self.outputs[p]) for p in self.prompt]

    def extend(self, new: list[list[int]]) -> torch.Tensor | None:
        """Append each live row's new tokens (cut at max_new_tokens and after an EOS); rows that
        finished leave. Returns the live rows to keep (a bool mask), None when all stay."""
        done = []
        for p, toks in zip(self.prompt, new):
            out = self.outputs[p]
            for t in toks[: self.max_new - len(out)]:
                out.append(t)
                if t == self.eos_id:
                    self.eos[p] = True
                    break
            done.append(self.eos[p] or len(out) >= self.max_new)
        if not any(done):
            return None
        keep = [not d for d in done]
        self.prompt = [p for p, k in zip(self.prompt, keep) if k]
        if self.generators is not None:
            self.generators = [g for g, k in zip(self.generators, keep) if k]
        return torch.tensor(keep)


def prompt_batches(prompts: Sequence, batch_size: int | None):
    size = len(prompts) if batch_size is None else batch_size
    if size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}; fix: e.g. 8")
    for first in range(0, len(prompts), size):
        yield first, prompts[first : first + size]


def collect_result(rows: list[LiveRows], stats: GenerationStats, record_logits: bool, start: float) -> GenerationResult:
    tokens, logits, eos = [], [], []
    for live in rows:
        for p in sorted(live.outputs):
            tokens.append(live.outputs[p])
            eos.append(live.eos[p])
            if record_logits:
                logits.append(torch.stack(live.logits[p]) if live.logits[p] else torch.empty(0))
    stats.new_tokens = sum(len(t) for t in tokens)
    stats.seconds = time.perf_counter() - start
    return GenerationResult(tokens, stats, logits if record_logits else None, eos)


# --- plain incremental decoding ------------------------------------------------------------------


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    eos_id: int | None = None,
    batch_size: int | None = None,
    dropless: bool = False,
    record_logits: bool = False,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens with a KV
    cache, ``batch_size`` prompts at a time (default all). ``record_logits`` keeps the logits each
    token was chosen from (fp32), for checking against a full pass."""
    sampling = sampling or SamplingConfig()
    check_prompts(model.cfg, prompts, max_new_tokens)
    start = time.perf_counter()
    stats = GenerationStats(prompts=len(prompts))
    done = []
    with decoding(model, dropless=dropless):
        for first, batch in prompt_batches(prompts, batch_size):
            done.append(_generate_batch(model, batch, first, max_new_tokens, sampling, eos_id, stats, record_logits))
    return collect_result(done, stats, record_logits, start)


def _generate_batch(model, prompts, first, max_new, sampling, eos_id, stats, record_logits) -> LiveRows:
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    cache = KVCache.for_model(model, B, int((lens + max_new).max()))
    h_BPD = prefill(model, cache, prompts)
    last = h_BPD[torch.arange(B, device=h_BPD.device), (lens - 1).to(h_BPD.device)]
    logits_BV = final_logits(model, last)
    live = LiveRows(first, B, max_new, eos_id, sampling)
    while True:
        next_B = choose_next(logits_BV, sampling, live.generators)
        if record_logits:
            for p, row in zip(live.prompt, logits_BV.float().cpu()):
                live.logits[p].append(row)
        keep = live.extend([[t] for t in next_B.tolist()])
        if not len(live):
            return live
        if keep is not None:
            rows = keep.nonzero().squeeze(1).to(next_B.device)
            cache.select(rows)
            next_B = next_B.index_select(0, rows)
        positions = cache.positions(1)
        x = run_layers(model, model.embed_at(next_B[:, None], positions), cache, positions, range(len(model.blocks)))
        cache.advance(1)
        logits_BV = final_logits(model, x[:, 0])
        stats.steps += 1
