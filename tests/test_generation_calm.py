"""CALM per-token early exit while decoding (``dynamoe.generation.calm``) and its calibration.

The models are test_generation's tiny random decoders of both blocks (exits after layers 1 and
2 of 4, MoE layers, weights redrawn large so that the exits disagree with the final head). The
reference decoder below has no cache: at every step it runs every layer over the whole sequence,
a token that exited keeping its exit state as the input of every later layer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_generation import decoder, full_greedy, prompts_for, tiny_run  # noqa: F401 (a fixture)

from dynamoe.generation import GenerationError, KVCache, generate
from dynamoe.generation.calm import CalmStats, _Costs, calm_generate, calm_step
from dynamoe.generation.calm_calibration import (
    CalmRecords,
    binomial_cdf,
    calibrate,
    clopper_pearson_upper,
    record_calibration,
    threshold_grid,
)
from dynamoe.generation.decode import decoding, prefill
from dynamoe.models.modern import apply_rotary, rotary_cos_sin

from tiny_models import BLOCKS

INF = float("inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation (hundreds of times slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _score(model, confidence: str, j: int, h, before) -> float:
    if confidence == "saturation":
        return float(F.cosine_similarity(h, before, dim=-1))
    p = torch.softmax(model.head(model.exit_norms[j](h)), -1)
    top = p.topk(2).values
    return float(top[0] - top[1])


@torch.no_grad()
def calm_reference(model, prompt, n, thresholds, confidence="margin"):
    """(new tokens, exit layer of each): CALM by full recomputation at every step."""
    N = len(model.blocks)
    exits = {L - 1: j for j, L in enumerate(model.cfg.exits.layers)}
    seq, left = list(prompt), [N] * (len(prompt) - 1)  # layer after which each position left
    out, layers = [], []
    for _ in range(n):
        x = model._embed(torch.tensor([seq]))
        frozen_from = torch.tensor([*left, N])
        token = None
        for i, block in enumerate(model.blocks):
            y, _ = block(x)
            new = torch.where((frozen_from <= i)[None, :, None], x, y)
            if token is None and i in exits:
                j = exits[i]
                if _score(model, confidence, j, new[0, -1], x[0, -1]) >= thresholds[j]:
                    token = int(model.head(model.exit_norms[j](new[0, -1])).argmax())
                    frozen_from[-1] = i + 1
            x = new
        if token is None:
            token = int(model.head(model.ln_f(x[0, -1])).argmax())
        left.append(int(frozen_from[-1]))
        layers.append(int(frozen_from[-1]))
        seq.append(token)
        out.append(token)
    return out, layers


def between_scores(model, prompts, confidence, n=10):
    """Per-exit thresholds between two recorded scores near each exit's median: some tokens leave,
    some do not, and no score sits on a threshold (where rounding could decide)."""
    rec = record_calibration(model, prompts, max_new_tokens=n, confidence=confidence)
    out = []
    for j in range(rec.scores.shape[1]):
        s = rec.scores[:, j].sort().values
        m = len(s) * 2 // 3 if j == 0 else len(s) // 3
        out.append(float((s[m] + s[m + 1]) / 2))
    return out


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("confidence", ["margin", "saturation"])
def test_unreachable_thresholds_give_full_greedy_decoding(block, confidence):
    model = decoder(block, seed=1)
    prompts = prompts_for(21)
    greedy = generate(model, prompts, max_new_tokens=12).tokens
    out = calm_generate(model, prompts, thresholds=INF, confidence=confidence, max_new_tokens=12, batch_size=3)
    assert out.tokens == greedy
    assert out.tokens[1] == full_greedy(model, prompts[1], 12)
    s = out.stats
    assert s.layers_per_token == 4 and s.exit_counts == [0, 0, 12 * len(prompts)]
    # Every layer ran; scoring the exits (two head projections a token for the margin) is the overhead.
    costs = _Costs(model)
    extra = (2 * costs.head if confidence == "margin" else 0) * s.decided
    assert s.flops == pytest.approx(s.full_flops + extra)


@pytest.mark.parametrize("block", BLOCKS)
def test_always_exiting_at_the_first_exit_equals_the_first_layers_with_propagated_state(block):
    model = decoder(block, seed=2)
    prompts = prompts_for(22)
    out = calm_generate(model, prompts, thresholds=-INF, max_new_tokens=10)
    for prompt, got in zip(prompts, out.tokens):
        want, layers = calm_reference(model, prompt, 10, [-INF, -INF])
        assert got == want and set(layers) == {1}
    s = out.stats
    assert s.layers_per_token == 1 and s.exit_counts == [s.decided, 0, 0]
    # Per token: layer 1, its exit head, and the K/V projections of the state in layers 2..4.
    costs = _Costs(model)
    keys = sum(len(p) + k for p in prompts for k in range(10))  # a token at position q reads q + 1 slots
    want = costs.fixed[0] * s.decided + costs.per_key * keys + (costs.head + 3 * costs.kv_only) * s.decided
    assert s.flops == pytest.approx(want)
    assert s.flops_ratio < 0.5


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("confidence", ["margin", "saturation"])
def test_mixed_exits_equal_the_recomputing_reference(block, confidence):
    model = decoder(block, seed=3)
    prompts = prompts_for(23)
    thresholds = between_scores(model, prompts, confidence)
    out = calm_generate(model, prompts, thresholds=thresholds, confidence=confidence, max_new_tokens=10)
    seen = set()
    for prompt, got in zip(prompts, out.tokens):
        want, layers = calm_reference(model, prompt, 10, thresholds, confidence)
        assert got == want
        seen |= set(layers)
    assert seen == {1, 2, 4}, seen  # rows left at every exit and at the end, in the same batch
    assert sum(out.stats.exit_counts) == out.stats.decided == 10 * len(prompts)


@pytest.mark.parametrize("block", BLOCKS)
def test_a_batch_of_unequal_prompts_equals_one_by_one(block):
    model = decoder(block, seed=4)
    prompts = prompts_for(24)
    thresholds = between_scores(model, prompts, "margin")
    batched = calm_generate(model, prompts, thresholds=thresholds, max_new_tokens=10)
    assert len({len(p) for p in prompts}) > 1
    for i, prompt in enumerate(prompts):
        assert calm_generate(model, [prompt], thresholds=thresholds, max_new_tokens=10).tokens[0] == batched.tokens[i]
    assert (
        calm_generate(model, prompts, thresholds=thresholds, max_new_tokens=10, batch_size=3).tokens == batched.tokens
    )


@pytest.mark.parametrize("block", BLOCKS)
def test_skipped_layers_cache_the_keys_and_values_of_the_exit_state(block):
    model = decoder(block, seed=5)
    prompt = [3, 1, 4, 1, 5]
    p = len(prompt) - 1  # the last prompt token decides the first new token, at position p
    with decoding(model):
        cache = KVCache.for_model(model, 1, 12)
        prefill(model, cache, [prompt[:-1]])
        calm_step(model, cache, torch.tensor([prompt[-1]]), [-INF, -INF], "margin", CalmStats(), _Costs(model))
        # The token's state after layer 1 (exit 0), computed without the cache.
        x = model._embed(torch.tensor([prompt]))
        h = model.blocks[0](x)[0][0, p]
        D = model.cfg.d_model
        for layer in (1, 2, 3):
            block_l = model.blocks[layer]
            u = block_l.ln1(h)
            if block == "gpt2":
                k, v = F.linear(u, block_l.attn.qkv.weight[D:]).split(D)
                heads = block_l.attn.n_heads
                k, v = k.view(heads, -1), v.view(heads, -1)
            else:
                attn = block_l.attn
                G, Dh = attn.n_kv_heads, attn.head_dim
                k = attn.k_norm(attn.k_proj(u).view(G, Dh))  # per-head QK-norm
                cos, sin = rotary_cos_sin(torch.tensor([[p]]), attn.rotary_dim, attn.rope_theta, k.dtype)
                k = apply_rotary(k[None, :, None], cos, sin)[0, :, 0]
                v = attn.v_proj(u).view(G, Dh)
            torch.testing.assert_close(cache.k[layer, 0, :, p], k, rtol=0, atol=1e-6)
            torch.testing.assert_close(cache.v[layer, 0, :, p], v, rtol=0, atol=1e-6)


def test_learned_confidence_and_refusals():
    model = decoder("gpt2", seed=6, exits={"layers": [1, 2], "policy": "learned"})
    prompts = prompts_for(26)
    out = calm_generate(model, prompts, thresholds=[0.5, 0.5], confidence="learned", max_new_tokens=6)
    assert out.stats.decided == 6 * len(prompts)
    inf = calm_generate(model, prompts, thresholds=INF, confidence="learned", max_new_tokens=6)
    assert inf.tokens == generate(model, prompts, max_new_tokens=6).tokens
    with pytest.raises(GenerationError, match="exit predictors.*policy: learned"):
        calm_generate(decoder("gpt2"), prompts, thresholds=0.5, confidence="learned", max_new_tokens=2)
    with pytest.raises(GenerationError, match="has none.*fix: train the decoder with early exits"):
        calm_generate(decoder("gpt2", exits={"layers": []}), prompts, thresholds=0.5, max_new_tokens=2)
    with pytest.raises(GenerationError, match="3 CALM thresholds for 2 early exits"):
        calm_generate(model, prompts, thresholds=[0.1, 0.2, 0.3], max_new_tokens=2)
    with pytest.raises(GenerationError, match="unknown CALM confidence"):
        calm_generate(model, prompts, thresholds=0.5, confidence="patience", max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"\+inf"):
        calm_generate(model, prompts, thresholds=0.5, max_new_tokens=2, records=[])


# --- calibration ---------------------------------------------------------------------------------


def test_clopper_pearson_upper_bound_matches_hand_values():
    # k = 0: P(X <= 0) = (1 - p)^n = eps.  k = n - 1: P(X <= n - 1) = 1 - p^n = eps.
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05**0.1, abs=1e-9)
    assert clopper_pearson_upper(9, 10, 0.05) == pytest.approx(0.95**0.1, abs=1e-9)
    assert clopper_pearson_upper(0, 1000, 0.05) == pytest.approx(1 - 0.05**0.001, abs=1e-9)
    # 2 in 20: the two-sided 95% interval is (0.0123, 0.3170), so the one-sided 97.5% bound is 0.3170.
    assert clopper_pearson_upper(2, 20, 0.025) == pytest.approx(0.3170, abs=1e-4)
    # n = 3, k = 1: (1 - p)^3 + 3 p (1 - p)^2 = eps, solved by hand for eps = 0.1 (p = 0.8042).
    assert clopper_pearson_upper(1, 3, 0.1) == pytest.approx(0.8042, abs=1e-4)
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0
    assert binomial_cdf(1, 3, 0.5) == pytest.approx(0.5)
    assert binomial_cdf(3, 3, 0.5) == 1.0 and binomial_cdf(-1, 3, 0.5) == 0.0


def _synthetic(T=2000, seed=0):
    """Two exits; exit j's argmax is right exactly when its score is above 0.6 (exit 0) or 0.3
    (exit 1), with a 1% sprinkling of errors above."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, 2, generator=g)
    agree = scores > torch.tensor([0.6, 0.3])
    noise = torch.rand(T, 2, generator=g) < 0.01
    return CalmRecords(scores, agree & ~noise, [2, 4], 6)


def test_calibration_meets_delta_on_its_records_and_stops_at_the_first_failure():
    rec = _synthetic()
    for delta in (0.02, 0.05, 0.2):
        res = calibrate(rec, delta, 0.05, "margin")
        t = res["threshold"]
        wrong = rec.outcome([t, t])["disagreements"]
        assert res["disagreements"] == wrong and wrong / rec.tokens <= delta
        assert res["upper_bound"] == pytest.approx(clopper_pearson_upper(wrong, rec.tokens, 0.05))
        assert res["upper_bound"] <= delta
        grid = threshold_grid("margin")
        k = grid.index(t)
        # The next, laxer threshold was the first to fail (or the grid ran out).
        if k + 1 < len(grid):
            nxt = rec.outcome([grid[k + 1]] * 2)["disagreements"]
            assert clopper_pearson_upper(nxt, rec.tokens, 0.05) > delta
        assert res["layers_per_token"] < 6
    # A laxer delta never picks a stricter threshold.
    ts = [calibrate(rec, d, 0.05, "margin")["threshold"] for d in (0.02, 0.05, 0.2)]
    assert ts == sorted(ts, reverse=True)
    # Too few tokens for the bound: no threshold passes, nobody exits.
    few = CalmRecords(rec.scores[:20], rec.agree[:20], [2, 4], 6)
    res = calibrate(few, 0.05, 0.05, "margin")
    assert res["threshold"] == INF and res["layers_per_token"] == 6
    with pytest.raises(GenerationError, match="delta"):
        calibrate(rec, 0.0, 0.05, "margin")


def test_calibrated_thresholds_from_a_model_meet_delta_on_its_records():
    model = decoder("modern", seed=7)
    prompts = prompts_for(27, lengths=(3, 5, 2, 6, 4, 7, 3, 5))
    rec = record_calibration(model, prompts, max_new_tokens=16, confidence="margin", batch_size=3)
    assert rec.tokens == 16 * len(prompts)
    greedy = generate(model, prompts, max_new_tokens=16).tokens
    # The records' final tokens are full greedy decoding: a threshold of +inf agrees everywhere.
    assert rec.outcome([INF, INF])["disagreements"] == 0
    res = calibrate(rec, 0.3, 0.1, "margin")
    assert res["disagreement_rate"] <= 0.3 and res["upper_bound"] <= 0.3
    assert math.isfinite(res["threshold"])
    out = calm_generate(model, prompts, thresholds=res["thresholds"], max_new_tokens=16)
    assert [len(t) for t in out.tokens] == [len(t) for t in greedy]


# --- moe generate --calm -------------------------------------------------------------------------


def test_moe_generate_calm_calibrates_once_then_reuses_the_thresholds(tiny_run, capsys):  # noqa: F811
    from dynamoe.launch.cli import main

    args = ["generate", str(tiny_run), "--prompt", "ROMEO:", "--prompt", "To be", "--max-new-tokens", "10"]
    calm = [*args, "--calm", "--calibration-windows", "8", "--delta", "0.2", "--threads", "1"]
    assert main(calm) == 0
    out = capsys.readouterr().out
    assert "CALM calibration: 8 validation windows of 8 tokens, 24 new tokens each" in out
    assert "calm_thresholds.json" in out and "layers per token" in out and "of the full model's FLOPs" in out
    saved = json.loads((tiny_run / "calm_thresholds.json").read_text())
    assert saved["delta"] == 0.2 and saved["calibration_tokens"] == 8 * 24 and len(saved["thresholds"]) == 1
    assert saved["disagreement_rate"] <= 0.2
    assert main(calm) == 0
    out = capsys.readouterr().out
    assert "CALM calibration" not in out and "(from " in out  # the stored thresholds, no second calibration
    # Another delta recalibrates; --calibrate-only needs no prompt.
    assert main(["generate", str(tiny_run), "--calm", "--calibrate-only", "--calibration-windows", "8"]) == 0
    assert json.loads((tiny_run / "calm_thresholds.json").read_text())["delta"] == 0.05
    capsys.readouterr()
    # An unreachable threshold decodes the full model's greedy text.
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--calm", "--calm-threshold", "inf"]) == 0
    body = lambda text: text.split("\ngenerated ")[0]  # noqa: E731
    assert body(capsys.readouterr().out) == body(plain)

    def refused(*extra) -> str:
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "fix:" in err and "Traceback" not in err
        return err

    assert "choose one" in refused("--calm", "--speculative")
    assert "greedily" in refused("--calm", "--temperature", "0.8")
    assert "add --calm" in refused("--calibrate-only")
    assert "policy: learned" in refused("--calm", "--confidence", "learned")
    assert "--delta must be in (0, 1)" in refused("--calm", "--delta", "0")
