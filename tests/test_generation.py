"""KV-cache generation and self-speculative decoding (``dynamoe.generation``, ``moe generate``).

The models are tiny random decoders of both blocks with MoE layers. Their weights are redrawn
larger than the initialisation (``lively``) so that every layer moves the argmax: with the
initial weights the residual stream is almost the embedding, every exit agrees with the final
head, and a speculative test would never see a rejected draft.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynamoe.config import ModelConfig, from_dict
from dynamoe.generation import (
    GenerationError,
    KVCache,
    SamplingConfig,
    check_decodable,
    generate,
    speculative_generate,
)
from dynamoe.generation.sampling import choose_next, filtered_probs
from dynamoe.models import build_model

from tiny_models import BLOCKS, small

REPO = Path(__file__).resolve().parent.parent
PROMPT_LENGTHS = (3, 7, 1, 5)


def decoder(block: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    fields = {**small(block), "kind": "decoder", "max_seq_len": 40, "exits": {"layers": [1, 2]}, **changes}
    return lively(build_model(from_dict(ModelConfig, fields)).eval(), seed)


def lively(model, seed: int, std: float = 0.1):
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def prompts_for(seed: int, lengths=PROMPT_LENGTHS, vocab: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


# --- the cache against the full pass -------------------------------------------------------------


# The modern block's other switches (OLMoE's whole-width QK-norm and clipping, GLM's partial
# rotary and biases, shared experts) go through the same cached attention and MoE layer.
VARIANTS = {
    "modern-variant": {
        "qk_norm": "whole",
        "clip_qkv": 0.5,
        "rope_fraction": 0.5,
        "qkv_bias": True,
        "moe": {**small("modern")["moe"], "num_shared_experts": 1},
    },
    "modern-learned-positions": {"position": "learned", "n_kv_heads": 1},
}


@pytest.mark.parametrize("block", [*BLOCKS, *VARIANTS])
def test_cached_logits_equal_a_full_forward_at_every_step(block):
    model = decoder("modern", **VARIANTS[block]) if block in VARIANTS else decoder(block)
    prompts = prompts_for(1)
    out = generate(model, prompts, max_new_tokens=12, record_logits=True)
    assert [len(t) for t in out.tokens] == [12] * len(prompts)
    for prompt, new, logits in zip(prompts, out.tokens, out.logits):
        seq = prompt + new
        with torch.no_grad():
            full = model(torch.tensor([seq])).logits[0].float()
        # Step s chose token s from the logits after position len(prompt) - 1 + s.
        want = full[len(prompt) - 1 : len(seq) - 1]
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
        assert new == logits.argmax(-1).tolist()


@pytest.mark.parametrize("block", BLOCKS)
def test_batched_prompts_of_unequal_length_equal_one_by_one(block):
    model = decoder(block, seed=2)
    prompts = prompts_for(2)
    batched = generate(model, prompts, max_new_tokens=10, record_logits=True)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=10, record_logits=True)
        assert alone.tokens[0] == batched.tokens[i]
        torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=0, atol=1e-5)
    assert generate(model, prompts, max_new_tokens=10, batch_size=3).tokens == batched.tokens
    assert batched.tokens[0] == full_greedy(model, prompts[0], 10)


def test_cache_slots_are_positions_and_rollback_is_a_length():
    cache = KVCache(layers=1, batch=2, capacity=6, kv_heads=1, head_dim=2)
    cache.lengths = torch.tensor([1, 3])
    positions = cache.positions(2)
    assert positions.tolist() == [[1, 2], [3, 4]]
    step = cache.step(positions)
    assert step.span == 5
    # Row 0's second token reads slots 0..2 only, never the slots beyond its position.
    assert step.mask[0, 0, 1].tolist() == [True, True, True, False, False]
    k = torch.arange(8.0).view(2, 1, 2, 2)
    k_all, _ = cache.layer(0, step).append(k, k)
    assert k_all[1, 0, 3:5].tolist() == k[1, 0].tolist()
    cache.advance(torch.tensor([1, 2]))
    assert cache.lengths.tolist() == [2, 5]
    cache.select(torch.tensor([1]))
    assert cache.lengths.tolist() == [5] and cache.k.shape[1] == 1
    with pytest.raises(ValueError, match="do not fit"):
        cache.step(torch.tensor([[6]]))


def test_eos_stops_a_row_and_the_others_go_on():
    model = decoder("gpt2", seed=3)
    prompts = prompts_for(3)
    free = generate(model, prompts, max_new_tokens=8).tokens
    eos = free[1][2]  # row 1 meets it by its third token
    out = generate(model, prompts, max_new_tokens=8, eos_id=eos)
    for row, (a, b) in enumerate(zip(free, out.tokens)):
        cut = a.index(eos) + 1 if eos in a else len(a)
        assert b == a[:cut], row
        assert out.finished_by_eos[row] == (eos in a)
    spec = speculative_generate(model, prompts, max_new_tokens=8, eos_id=eos, draft_tokens=3)
    assert spec.tokens == out.tokens


# --- sampling ------------------------------------------------------------------------------------


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = filtered_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (probs[0, 2:] == 0).all() and probs[0, :2].sum() == pytest.approx(1.0)
    full = torch.softmax(logits, -1)[0]
    p = float(full[0] + full[1] / 2)  # needs the first two tokens, not the third
    probs = filtered_probs(logits, SamplingConfig(temperature=1.0, top_p=p))
    assert (probs[0, :2] > 0).all() and (probs[0, 2:] == 0).all()
    probs = filtered_probs(logits, SamplingConfig(temperature=1.0, top_p=1e-6))
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # the most likely token always stays
    cold = filtered_probs(logits, SamplingConfig(temperature=0.01))
    assert float(cold[0, 0]) == pytest.approx(1.0)


def test_sampling_is_seeded_per_prompt_and_never_picks_a_filtered_token():
    cfg = SamplingConfig(temperature=1.0, top_k=3, seed=7)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).expand(400, 50)
    picks = choose_next(logits, cfg, [torch.Generator().manual_seed(i) for i in range(400)])
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(picks.tolist()) == allowed  # all three drawn, nothing else
    model = decoder("modern", seed=4)
    prompts = prompts_for(4)
    a = generate(model, prompts, max_new_tokens=6, sampling=SamplingConfig(temperature=0.9, top_p=0.9, seed=5))
    b = generate(model, prompts, max_new_tokens=6, sampling=SamplingConfig(temperature=0.9, top_p=0.9, seed=5))
    assert a.tokens == b.tokens
    # Prompt i samples with seed + i whatever its batch: alone with that seed, it continues the same.
    alone = generate(model, prompts[2:3], max_new_tokens=6, sampling=SamplingConfig(temperature=0.9, top_p=0.9, seed=7))
    assert alone.tokens[0] == a.tokens[2]


def test_bad_sampling_settings_are_refused():
    with pytest.raises(GenerationError, match="temperature"):
        SamplingConfig(top_k=5)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=1.5)
    with pytest.raises(GenerationError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1.0)


# --- self-speculative decoding -------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_speculative_output_is_full_greedy_token_for_token(block, seed):
    model = decoder(block, seed=seed)
    prompts = prompts_for(10 + seed)
    greedy = generate(model, prompts, max_new_tokens=14).tokens
    assert greedy[1] == full_greedy(model, prompts[1], 14)
    rates = []
    for draft_layers, draft_tokens, batch_size in ((1, 3, None), (2, 1, None), (2, 5, 3)):
        out = speculative_generate(
            model,
            prompts,
            max_new_tokens=14,
            draft_layers=draft_layers,
            draft_tokens=draft_tokens,
            batch_size=batch_size,
        )
        assert out.tokens == greedy, (draft_layers, draft_tokens)
        s = out.stats
        assert s.new_tokens == 14 * len(prompts) and 0 <= s.accepted <= s.drafted
        assert s.tokens_per_round == pytest.approx((s.accepted + s.rounds) / s.rounds)
        rates.append(s.acceptance_rate)
    # Rows accept different numbers of drafts: rollback and per-row lengths are exercised.
    assert any(0 < r < 1 for r in rates), rates


def test_speculation_needs_exits_and_greedy_decoding():
    plain = decoder("gpt2", exits={"layers": []})
    with pytest.raises(GenerationError, match=r"no(ne| exit).*fix: train the decoder with early exits"):
        speculative_generate(plain, [[1, 2]], max_new_tokens=2)
    model = decoder("gpt2")
    with pytest.raises(GenerationError, match=r"after layers \[1, 2\]"):
        speculative_generate(model, [[1, 2]], max_new_tokens=2, draft_layers=3)
    with pytest.raises(GenerationError, match="greedy only"):
        speculative_generate(model, [[1, 2]], max_new_tokens=2, sampling=SamplingConfig(temperature=1.0))


# --- what incremental decoding refuses -----------------------------------------------------------


def test_prompts_that_do_not_fit_are_refused():
    model = decoder("modern")
    with pytest.raises(GenerationError, match=r"prompt 2 has 38 tokens.*max_seq_len=40.*lower max_new_tokens to 2"):
        generate(model, [[1, 2], [3] * 38], max_new_tokens=5)
    with pytest.raises(GenerationError, match="shorten it to at most 39 tokens"):
        generate(model, [[3] * 45], max_new_tokens=5)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[]], max_new_tokens=5)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [[40]], max_new_tokens=5)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], max_new_tokens=5)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"moe": {**small()["moe"], "router": {"kind": "expert_choice"}}}, "not causal"),
        ({"moe": {**small()["moe"], "router": {"capacity_factor": 1.0}}}, "--dropless"),
        ({"depth": {"mode": "mod"}}, "mixture-of-depths"),
        ({"depth": {"mode": "act"}}, "model.depth.mode 'act'"),
        ({"kind": "encoder", "num_classes": 2}, "needs a decoder"),
    ],
)
def test_models_that_cannot_decode_incrementally_are_refused(changes, match):
    cfg = from_dict(ModelConfig, {**small(), "kind": "decoder", **changes})
    with pytest.raises(GenerationError, match=match):
        check_decodable(cfg)


def test_capacity_models_decode_dropless_when_asked():
    capped = decoder("gpt2", moe={**small()["moe"], "router": {"capacity_factor": 1.0}})
    with pytest.raises(GenerationError, match="capacity_factor"):
        generate(capped, [[1, 2, 3]], max_new_tokens=3)
    out = generate(capped, prompts_for(5), max_new_tokens=6, dropless=True, record_logits=True)
    assert capped.moe_layers()[0].router.cfg.capacity_factor == 1.0  # restored afterwards
    dropless = decoder("gpt2")  # the same weights (same seeds) without capacity
    want = generate(dropless, prompts_for(5), max_new_tokens=6, record_logits=True)
    assert out.tokens == want.tokens


def test_generation_leaves_the_model_as_it_was():
    model = decoder("gpt2").train()
    generate(model, [[1, 2, 3]], max_new_tokens=3)
    assert model.training
    assert all(float(m.stat_tokens) == 0 and m.record_stats for m in model.moe_layers())


# --- moe generate --------------------------------------------------------------------------------


def _moe(*args, timeout=300):
    from dist_helper import clean_env

    env = {**clean_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dynamoe.launch.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """debug_tiny with an exit after layer 1, trained a few steps (the weights hardly matter)."""
    run = tmp_path_factory.mktemp("gen") / "run"
    out = _moe(
        "train",
        "debug_tiny",
        "--set",
        "train.steps=4",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.eval_every=0",
        "--set",
        "model.exits.layers=[1]",
        "--run-dir",
        str(run),
        "--quiet",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_moe_generate_prints_completions_and_speculation_agrees(tiny_run, tmp_path, capsys):
    from dynamoe.launch.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n\nTo be, or not\n")
    args = ["generate", str(tiny_run), "--prompts-file", str(prompts), "--max-new-tokens", "12"]
    assert main([*args, "--json", str(tmp_path / "plain.json")]) == 0
    plain = capsys.readouterr().out
    assert "=== 1/2: 6 prompt tokens, 12 new ===" in plain and "\nROMEO:" in plain and "tokens/s" in plain
    assert main([*args, "--speculative", "--draft-tokens", "3", "--batch-size", "1"]) == 0
    spec = capsys.readouterr().out
    assert "self-speculative: drafts from the exit after layer 1 of 2" in spec
    body = lambda text: text.split("\ngenerated ")[0]  # noqa: E731
    assert body(spec) == body(plain)
    import json

    saved = json.loads((tmp_path / "plain.json").read_text())
    assert [len(r["tokens"]) for r in saved["completions"]] == [12, 12]
    assert main(["generate", str(tiny_run), "--prompt", "ROMEO:", "--temperature", "0.8", "--top-p", "0.9"]) == 0


def test_moe_generate_refuses_bad_input_before_loading(tiny_run, tmp_path, capsys):
    from dynamoe.launch.cli import main

    def refused(*args) -> str:
        assert main(["generate", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moe generate: error:") and "fix:" in err and "Traceback" not in err
        return err

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "holds no prompt" in refused(tiny_run, "--prompts-file", empty)
    assert "max_seq_len=32" in refused(tiny_run, "--prompt", "x" * 30, "--max-new-tokens", "8")
    assert "outside the run's vocabulary" in refused(tiny_run, "--prompt", "naïve ✓")
    assert "greedy" in refused(tiny_run, "--prompt", "a", "--speculative", "--temperature", "1")
    assert "--batch-size must be >= 1" in refused(tiny_run, "--prompt", "a", "--batch-size", "0")
    assert "after layers [1]" in refused(tiny_run, "--prompt", "a", "--speculative", "--draft-layers", "2")
    # A folder with a config and no weights: refused on the config, so nothing was loaded.
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["model"]["exits"]["layers"] = []
    (bare / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert "model.exits.layers" in refused(bare, "--prompt", "ROMEO:", "--speculative")
    assert "not a run folder" in refused(tmp_path, "--prompt", "a")
    assert "--prompt TEXT or --prompts-file" in refused(tiny_run)
