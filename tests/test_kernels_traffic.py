"""The bytes-moved model of the fused expert MLP (kernels/triton/traffic.py): the tables in
docs/kernels.md are what it prints, its savings match a closed form derived separately, the issue's
target (at least 8 GB less per step at T=32768, d=4096, f=1024, E=64, k=4 in bf16) holds, and the
backward GEMM's tile it assumes is the one the launch picks."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from dynamoe.kernels.triton import traffic

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"


def test_doc_tables_are_the_models_output():
    blocks = traffic.blocks_in(DOC.read_text())
    expected = traffic.doc_blocks()
    assert set(blocks) == set(expected), "docs/kernels.md lacks or has extra traffic blocks"
    for name, block in expected.items():
        assert blocks[name] == block, f"{name} in docs/kernels.md is stale: python -m dynamoe.kernels.triton.traffic"


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_issue_target_met(activation):
    shape = traffic.Shape(**traffic.TARGET, activation=activation)
    saved = traffic.total(shape, fused=False) - traffic.total(shape, fused=True)
    assert saved >= 8e9


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dims", [traffic.TARGET, {"T": 1000, "d": 512, "f": 96, "E": 8, "k": 2}])
def test_savings_match_the_closed_form(activation, dims):
    """What each fusion removes, derived by hand from the two versions' code (bf16, b = 2):
    forward: the activation pass (GELU reads h and writes a; SwiGLU's silu and product read 3Nf and
    write 2Nf) minus GEMM1's extra write of a (Nf).
    backward: the dY[tok] copy (read and write N*d*b, and token_of_row once); the activation's
    recompute (as in the forward, without the a write credit); the fp32 dA write and the passes
    over it (a.float(), dA * a, .sum, dA * w_row, the cast back: 36 N*f bytes, 2 N*f*b, 8 N); the
    autograd activation backward (GELU: 3 N*f*b; SwiGLU: 13 N*f*b, the two products, silu's
    backward and the cat); against the fused
    GEMM's extra reads and writes (h in, dh and a out: 2 N*w*b + N*f*b - the dh the autograd backward
    also wrote; two more token_of_row reads, w_row, the row-dot partials and their sum)."""
    shape = traffic.Shape(**dims, activation=activation)
    v = shape.values()
    N, d, f, b, w, P = v["N"], v["d"], v["f"], v["b"], v["w"], v["P"]
    Nf = N * f * b
    if activation == "gelu":
        fwd = 2 * Nf - Nf
        recompute, autograd_bwd = 2 * Nf, 3 * Nf
    else:
        fwd = 5 * Nf - Nf
        recompute, autograd_bwd = 5 * Nf, 6 * Nf + 3 * Nf + 2 * Nf + N * w * b
    gather_copy = 8 * N + 2 * N * d * b
    fp32_passes = 36 * N * f + 2 * Nf + 8 * N
    fused_extra = N * w * b + N * w * b + Nf + 16 * N + 4 * N + 8 * P * N + 4 * N
    bwd = gather_copy + recompute + fp32_passes + autograd_bwd - fused_extra
    for phase, expected in (("forward", fwd), ("backward", bwd)):
        saved = traffic.total(shape, False, phase) - traffic.total(shape, True, phase)
        assert saved == expected, (phase, saved, expected)


def test_after_has_no_fp32_row_tensor_and_no_dy_copy():
    for activation in ("gelu", "swiglu"):
        after = traffic.launches_after(activation)
        terms = [expr for launch in after for _, expr in launch.reads + launch.writes]
        assert "N*f*4" not in terms and not any("g_rows" in t for launch in after for t, _ in launch.writes)
        weights = [t for launch in after for t, _ in launch.reads if t in ("W1", "W2")]
        assert sorted(weights) == ["W1", "W1", "W2", "W2"]  # each GEMM reads its expert weights once


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_backward_tile_is_the_launched_default():
    import torch

    # tests/conftest.py has imported triton in interpreter mode already where there is no GPU.
    from dynamoe.kernels.triton import autotune
    from dynamoe.kernels.triton.grouped_gemm import accumulators, epilogue_tiles

    for epilogue in ("dgelu", "dswiglu"):
        regs = (accumulators(epilogue), epilogue_tiles(epilogue))
        tile = autotune.default_tile(torch.bfloat16, "ieee", (9, 0), None, True, *regs)
        assert tile.BLOCK_N == traffic.BACKWARD_BLOCK_N
    assert traffic.Shape(**traffic.TARGET).values()["P"] == math.ceil(1024 / traffic.BACKWARD_BLOCK_N)
