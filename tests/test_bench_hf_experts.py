"""The transformers-vs-dynamoe training-step benchmark (dynamoe.evals.bench_hf_experts) on a tiny
model: every row trains the same model on the same loss, and the guards that say so hold."""

import json

import pytest
import torch

from dynamoe.evals import bench_hf_experts as bench

TINY = ["--size", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1"]


def _row(result, name):
    return next(r for r in result["rows"] if r["implementation"] == name)


def test_every_row_trains_the_same_model_on_the_same_loss(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main([*TINY, "--json", str(out)])
    assert [r["implementation"] for r in result["rows"]] == list(bench.ROWS)
    assert json.loads(out.read_text())["rows"][3]["implementation"] == bench.MODEL_ROW
    same = result["same_model"]
    assert same["max_abs_logit_diff"] <= bench.LOGITS_ATOL
    assert same["aux_loss_coef"] == bench.AUX_COEF == result["config"]["aux_loss_coef"]
    assert same["lm_loss_dynamoe"] == pytest.approx(same["lm_loss_transformers"], abs=1e-5)
    # The first step's cross-entropy is the same model's on every row; the balancing loss is in
    # every row's loss (its value differs between the frameworks' formulas).
    first_ce = [r["first_lm_loss"] for r in result["rows"]]
    assert max(first_ce) - min(first_ce) < 1e-5
    for r in result["rows"]:
        assert r["first_aux_loss"] > 0
        assert r["first_loss"] == pytest.approx(r["first_lm_loss"] + r["first_aux_loss"], abs=1e-6)
        assert len(r["times_ms"]) == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    hf_aux = {round(r["first_aux_loss"], 7) for r in result["rows"] if r["framework"] == "transformers"}
    assert len(hf_aux) == 1
    target = result["target"]
    assert target["best_transformers"] in bench.NATIVE
    assert target["met"] == (
        _row(result, bench.MODEL_ROW)["median_ms"] <= _row(result, target["best_transformers"])["median_ms"]
    )


def test_no_aux_leaves_the_balancing_loss_out_of_every_row():
    result = bench.main([*TINY, "--no-aux", "--json", ""])
    assert result["config"]["aux"] is False and result["same_model"]["aux_loss_coef"] == 0.0
    for r in result["rows"]:
        assert r["first_aux_loss"] == 0.0 and r["first_loss"] == r["first_lm_loss"]


def test_a_subset_of_rows_without_the_model_row():
    result = bench.main([*TINY, "--implementations", "grouped_mm,dynamoe", "--json", ""])
    assert [r["implementation"] for r in result["rows"]] == ["grouped_mm", "dynamoe"]
    assert result["same_model"] is None and result["target"] is None


def test_an_import_that_differs_is_refused_before_timing(monkeypatch):
    real = bench.import_into_dynamoe

    def perturbed(reference):
        imported = real(reference)
        with torch.no_grad():
            imported.model.blocks[0].ffn.experts.w1_EDF[0, 0, 0] += 1.0
        return imported

    monkeypatch.setattr(bench, "import_into_dynamoe", perturbed)
    with pytest.raises(SystemExit, match="logits up to"):
        bench.main([*TINY, "--json", ""])


def test_a_different_balancing_coefficient_is_refused(monkeypatch):
    import dataclasses

    real = bench.import_into_dynamoe

    def other_coef(reference):
        imported = real(reference)
        router = imported.model.blocks[1].ffn.router
        router.cfg = dataclasses.replace(router.cfg, aux_loss_coef=0.5)
        return imported

    monkeypatch.setattr(bench, "import_into_dynamoe", other_coef)
    with pytest.raises(SystemExit, match="aux_loss_coef"):
        bench.main([*TINY, "--json", ""])


def test_imported_model_has_no_meta_tensors_left():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(bench.build_config(bench.SIZES["tiny"], "eager"))
    model = bench.import_into_dynamoe(reference).model
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.to(torch.bfloat16)  # a meta buffer would refuse this


def test_next_token_labels_match_transformers_shift():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert bench.next_token_labels(ids).tolist() == [[6, 7, -100], [2, 3, -100]]


def test_arguments():
    args = bench.parse_args([])
    assert (args.size, args.steps, args.warmup, args.aux) == ("small", 20, 3, True)
    args = bench.parse_args(["--large"])
    assert (args.size, args.steps, args.warmup) == ("large", 5, 3)
    assert bench.parse_args(["--size", "large"]).steps == 5
    for bad in (["--large", "--size", "tiny"], ["--steps", "0"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    with pytest.raises(SystemExit, match="name at least one row"):
        bench.main(["--implementations", " , ", "--json", ""])
