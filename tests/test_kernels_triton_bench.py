"""``moe bench kernels`` on CPU: the rows it promises, figures that follow from its formulas, honest
"not run" rows for what needs a GPU, and the JSON with the machine named."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU table (Triton rows not run)")
def test_bench_kernels_small_cpu_table(tmp_path, monkeypatch, capsys):
    from dynamoe.evals.bench_kernels import FORMULAS, main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DYNAMOE_KERNEL_BACKEND", raising=False)
    out = tmp_path / "k.json"
    result = main(
        [
            "--small",
            "--shapes",
            "deepseek",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--no-layers",
            "--balanced",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["hardware"]["device"] == "cpu" and saved["formulas"] == FORMULAS
    s = result["config"]["shapes"]["deepseek"]
    assert (s["T"], s["d"], s["f"], s["E"], s["k"]) == (256, 128, 88, 64, 6)
    rows = {(r["op"], r["provider"]): r for r in result["rows"]}
    N = s["T"] * s["k"]
    for provider in ("dense", "reference", "torch loop"):
        r = rows[("grouped_mm fwd", provider)]
        assert r["tflops"] == pytest.approx(2 * N * s["d"] * s["f"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["pct_of_dense"] > 0
    assert rows[("permute", "reference")]["gb_per_s"] == pytest.approx(
        2 * N * s["d"] * 4 / (rows[("permute", "reference")]["median_ms"] * 1e-3) / 1e9
    )
    for op in ("route", "permute", "unpermute", "grouped_mm fwd", "grouped_mm fwd+bwd"):
        triton_row = rows[(op, "triton")]
        assert triton_row["median_ms"] is None and triton_row["note"].startswith("not run: Triton kernels need a CUDA")
    assert "% dense" in capsys.readouterr().out
