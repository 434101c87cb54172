"""Every Triton kernel variant the code can launch, compiled ahead of time for sm_90a (H100/H200)
and sm_80 (A100) by Triton's own compiler on this CPU: no GPU needed.

The default run compiles a representative set (the default tile of every dtype and fp32 precision,
the flags the MoE path uses, routing at E = 8/64/256, the dispatch kernels); ``-m slow`` adds the
sweep over every candidate tile. Each variant must compile, fit the target's shared memory (and
stay within the estimate the tile pruning uses), not spill registers, and, for bf16/fp16/TF32
products, use wgmma on sm_90a (mma.sync on sm_80). The table it prints (``-s``) is the one in
docs/kernels.md. Compiling runs in a subprocess: Triton's interpreter mode, which
test_kernels_triton.py turns on for this process, cannot compile.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _compile(tmp_path, *extra, timeout: int = 1200) -> list[dict]:
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    cmd = [sys.executable, "-m", "dynamoe.kernels.triton.compile_check", "--json", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-20000:])
    if not out.exists():
        pytest.fail(f"the compile check wrote no result:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _check(results: list[dict]) -> None:
    bad = [f"{r['arch']} {r['label']}: {'; '.join(r['problems'])}" for r in results if r["problems"]]
    assert not bad, "\n".join(bad)
    for arch in ("sm_90a", "sm_80"):
        assert any(r["arch"] == arch for r in results)
    # wgmma is what makes Hopper fast: every bf16 GEMM variant on sm_90a uses it.
    bf16 = [r for r in results if r["arch"] == "sm_90a" and r["kernel"].startswith("_gmm") and "bf16" in r["label"]]
    assert bf16 and all(r["wgmma"] > 0 for r in bf16)
    # exact fp32 stays off the tensor cores (no TF32 unless allowed)
    ieee = [r for r in results if "fp32/ieee" in r["label"]]
    assert ieee and all(r["wgmma"] == 0 and r["mma"] == 0 for r in ieee)


def test_every_kernel_has_a_variant():
    from dynamoe.kernels.triton import compile_check, dispatch, grouped_gemm, routing
    from dynamoe.kernels.triton._jit import DeviceKernel

    defined = {
        name
        for mod in (dispatch, grouped_gemm, routing)
        for name, obj in vars(mod).items()
        if isinstance(obj, DeviceKernel)
    }
    for cap in ((9, 0), (8, 0)):
        covered = {v.kernel for v in compile_check.variants(cap, exhaustive=True)}
        assert defined <= covered, f"kernels without a compile-check variant: {defined - covered}"
    covered = {v.kernel for v in compile_check.variants((9, 0))}
    assert defined <= covered


def test_every_gemm_flag_combination_has_a_variant():
    """Each way the launches call the GEMM kernels (flags, epilogues, stored outputs) is compiled by the
    sweep on both targets; the default run covers every epilogue and the dY gather on sm_90a."""
    from dynamoe.kernels.triton import compile_check
    from dynamoe.kernels.triton.grouped_gemm import EPILOGUES

    ops = set(compile_check.gemm_ops())
    for cap in ((9, 0), (8, 0)):
        assert ops <= {v.label.split()[0] for v in compile_check.variants(cap, exhaustive=True)}
    default = [v.kwargs() for v in compile_check.variants((9, 0)) if v.kernel.startswith("_gmm")]
    assert {ce["EPILOGUE"] for ce in default if "EPILOGUE" in ce} == set(EPILOGUES)
    for flag in ("GATHER_DY", "STORE_AUX", "ROWDOT"):
        assert {ce[flag] for ce in default if flag in ce} == {True, False}, flag


def test_kernels_compile_for_sm90a_and_sm80(tmp_path):
    _check(_compile(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 1500 variants, near half an hour on 2 cores
def test_every_candidate_tile_compiles(tmp_path):
    _check(_compile(tmp_path, "--all", "--jobs", "2", timeout=3300))
