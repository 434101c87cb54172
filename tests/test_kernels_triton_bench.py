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


def test_bench_counts_are_counts_and_routing_is_balanced_by_default(monkeypatch):
    from dynamoe.evals import bench_kernels

    calls = []
    med, lo, hi = bench_kernels.time_ms(lambda: calls.append(1), torch.device("cpu"), iters=7, warmup=2)
    assert len(calls) == 9 and lo <= med <= hi  # 2 untimed + 7 timed runs, not milliseconds
    assert bench_kernels.parse_args([]).routing == "balanced"
    assert bench_kernels.parse_args(["--skewed"]).routing == "skewed"
    assert bench_kernels.parse_args(["--routing", "skewed"]).routing == "skewed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU table")
def test_bench_times_each_dense_baseline_once(tmp_path, monkeypatch):
    from dynamoe.evals import bench_kernels

    timed = []
    real = bench_kernels.time_ms

    def counting(fn, device, iters, warmup):
        timed.append(fn)
        return real(fn, device, iters, warmup)

    monkeypatch.setattr(bench_kernels, "time_ms", counting)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DYNAMOE_KERNEL_BACKEND", raising=False)
    argv = ["--small", "--shapes", "deepseek", "--iters", "1", "--warmup", "0", "--no-layers"]
    result = bench_kernels.main([*argv, "--json", str(tmp_path / "k.json")])
    rows = result["rows"]
    timed_rows = [r for r in rows if r.get("median_ms") is not None]
    assert len(timed) == len(timed_rows)  # one measurement per row: no dense baseline measured twice
    dense = {r["op"]: r for r in rows if r["provider"] == "dense"}
    assert set(dense) == {"grouped_mm fwd", "grouped_mm fwd+bwd", "expert MLP fwd", "expert MLP fwd+bwd"}
    for r in dense.values():
        assert r["pct_of_dense"] == pytest.approx(100.0)
    scatter = [r for r in rows if r["provider"] == "scattermoe"]
    assert scatter and all(r["median_ms"] is None and r["note"].startswith("not run") for r in scatter)


def test_gpu_check_dry_run_plans_tests_and_benchmark(tmp_path):
    """``make gpu-check`` on a machine without a GPU: ``--dry-run`` checks the plan and writes the JSON."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gc.json"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(root / "evals" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["ok"] and result["problems"] == []
    assert any("test_kernels_triton_gpu.py" in a for a in result["plan"]["tests"])
    shapes = [cmd[cmd.index("--shapes") + 1] for cmd in result["plan"]["bench"]]
    assert shapes == ["fine_grained", "mixtral"]
    assert all(cmd[cmd.index("--routing") + 1] == "balanced" for cmd in result["plan"]["bench"])
    collected = int(result["tests"]["collected"][0].split()[0])
    assert collected > 100
    assert "gpu-check summary" in proc.stdout


def test_gpu_check_link_farm_makes_dynamoe_importable(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check", root / "evals" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    farm = gpu_check.link_farm(tmp_path / "farm")
    assert (farm / "dynamoe" / "__init__.py").resolve() == (root / "moe" / "__init__.py").resolve()
    assert (farm / "dynamoe" / "kernels" / "triton" / "grouped_gemm.py").exists()
    cases = gpu_check.parse_junit(tmp_path / "missing.xml")
    assert cases == []
