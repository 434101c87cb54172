"""Bytes the fused expert MLP moves per training step (forward + backward), launch by launch, as the
code stood before the epilogue fusions of issue #19 (item 5) and as it stands now.

Counting convention (the same for both versions): each launch reads every element of every tensor it
uses once and writes every element of its outputs once, i.e. compulsory traffic. Re-reads that a
tile schedule sends to L2 (a GEMM's A panel once per column tile, W once per row tile) are not
counted, nor are ops on [E]-sized tensors (group ends, tile tables, prefix sums over experts: under
1 KB each). A gathered operand counts one row per sorted row: a token's k rows are k reads. Weights
and their gradients are counted like any other tensor. PyTorch element-wise ops count their inputs
and output (a cast to fp32 is a read and a write).

    python -m dynamoe.kernels.triton.traffic      # the tables in docs/kernels.md

Symbols: T tokens, d model width, f expert hidden width, E experts, k slots per token, A = T*k
assignments, N = A kept rows (dropless), w = W1's and h's width (f for GELU, 2f for SwiGLU), b bytes
per element of the input dtype, B = ceil(A / 128) dispatch-plan blocks, P = ceil(f / BLOCK_N) column
tiles of the fused backward GEMM (its row-dot partials). int64 indices are 8 bytes, fp32 4, bool 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GB = 1e9

# BLOCK_N of the fused backward GEMM's default tile for bf16 on sm_90a (128x64x64, 8 warps: its
# epilogue's registers rule out the 128x128 tile); tests/test_kernels_traffic.py checks it against
# autotune.default_tile.
BACKWARD_BLOCK_N = 64


@dataclass(frozen=True)
class Shape:
    T: int
    d: int
    f: int
    E: int
    k: int
    activation: str = "gelu"
    elt: int = 2  # bytes per element of x, the weights, h, a (bf16)
    block_n: int = BACKWARD_BLOCK_N

    def values(self) -> dict[str, int]:
        A = self.T * self.k
        return {
            "T": self.T,
            "d": self.d,
            "f": self.f,
            "E": self.E,
            "k": self.k,
            "A": A,
            "N": A,
            "w": 2 * self.f if self.activation == "swiglu" else self.f,
            "b": self.elt,
            "B": math.ceil(A / 128),
            "P": math.ceil(self.f / self.block_n),
        }


Term = tuple[str, str]  # (tensor, size in bytes as a product such as "N*d*b" or "2*N*f*4")


@dataclass(frozen=True)
class Launch:
    phase: str  # "forward" or "backward"
    name: str
    reads: tuple[Term, ...]
    writes: tuple[Term, ...]

    def bytes(self, shape: Shape) -> int:
        v = shape.values()
        return sum(size(expr, v) for _, expr in self.reads + self.writes)


def size(expr: str, values: dict[str, int]) -> int:
    out = 1
    for factor in expr.split("*"):
        out *= int(factor) if factor.isdigit() else values[factor]
    return out


def _L(phase: str, name: str, reads: list[Term], writes: list[Term]) -> Launch:
    return Launch(phase, name, tuple(reads), tuple(writes))


def _routing_bookkeeping() -> list[Launch]:
    """The dispatch plan and the per-row combine weights: the same before and after."""
    F = "forward"
    return [
        _L(F, "_plan_count_kernel", [("experts", "A*8")], [("block counts", "B*E*8")]),
        _L(F, "block counts .sum(0)", [("block counts", "B*E*8")], [("per expert", "E*8")]),
        _L(F, "cumsum(block counts)", [("block counts", "B*E*8")], [("cumsum", "B*E*8")]),
        _L(F, "cumsum - block counts", [("cumsum", "B*E*8"), ("block counts", "B*E*8")], [("tmp", "B*E*8")]),
        _L(F, "+ expert first row", [("tmp", "B*E*8")], [("first row", "B*E*8")]),
        _L(
            F,
            "_plan_rows_kernel",
            [("experts", "A*8"), ("first row", "A*8")],
            [("row_map", "A*8"), ("token_of_row", "N*8")],
        ),
        _L(F, "row_map >= 0", [("row_map", "A*8")], [("kept", "A*1")]),
        _L(F, "full_like(row_map)", [], [("spare", "A*8")]),
        _L(F, "where -> scatter target", [("kept", "A*1"), ("row_map", "A*8"), ("spare", "A*8")], [("target", "A*8")]),
        _L(F, "zeros(N + 1)", [], [("w_row", "N*4")]),
        _L(F, "scatter_ -> w_row", [("target", "A*8"), ("weights", "A*4")], [("w_row", "A*4")]),
    ]


def _slot_grads() -> list[Launch]:
    """The per-row combine-weight gradient back to [T, k] (both versions)."""
    B = "backward"
    return [
        _L(B, "row_map >= 0", [("row_map", "A*8")], [("kept", "A*1")]),
        _L(B, "row_map.clamp_min(0)", [("row_map", "A*8")], [("index", "A*8")]),
        _L(B, "dw_row[index]", [("index", "A*8"), ("dw_row", "A*4")], [("picked", "A*4")]),
        _L(B, "where -> d weights", [("kept", "A*1"), ("picked", "A*4")], [("d weights", "A*4")]),
    ]


def _combine(phase: str, what: str) -> Launch:
    return _L(phase, f"_combine_kernel ({what})", [("row_map", "A*8"), (what, "N*d*b")], [("out", "T*d*b")])


def _shared_tail() -> list[Launch]:
    """dW1 and dX: unchanged by the fusions."""
    B = "backward"
    return [
        _L(
            B,
            "_gmm_dw_kernel dW1 = X[tok]^T dh",
            [("token_of_row", "N*8"), ("x rows", "N*d*b"), ("dh", "N*w*b")],
            [("dW1", "E*d*w*b")],
        ),
        _L(B, "_gmm_kernel dh @ W1^T", [("dh", "N*w*b"), ("W1", "E*d*w*b")], [("dx rows", "N*d*b")]),
        _combine(B, "dx rows"),
    ]


def launches_before(activation: str, elt: int = 2) -> list[Launch]:
    """The fused MLP before item 5: GEMM1 writes h, PyTorch applies the activation; the backward
    gathers dY into a copy, writes dA in fp32, and runs the activation's backward through autograd."""
    F, B = "forward", "backward"
    act_fwd = (
        [_L(F, "F.gelu(h)", [("h", "N*f*b")], [("a", "N*f*b")])]
        if activation == "gelu"
        else [
            _L(F, "F.silu(gate)", [("gate", "N*f*b")], [("silu", "N*f*b")]),
            _L(F, "silu * up", [("silu", "N*f*b"), ("up", "N*f*b")], [("a", "N*f*b")]),
        ]
    )
    forward = [
        *_routing_bookkeeping(),
        _L(
            F,
            "_gmm_kernel h = X[tok] @ W1",
            [("token_of_row", "N*8"), ("x rows", "N*d*b"), ("W1", "E*d*w*b")],
            [("h", "N*w*b")],
        ),
        *act_fwd,
        _L(
            F,
            "_gmm_kernel z = w_row * (a @ W2)",
            [("a", "N*f*b"), ("W2", "E*f*d*b"), ("w_row", "N*4")],
            [("z", "N*d*b")],
        ),
        _combine(F, "z"),
    ]
    recompute = [_L(B, f"(recompute) {launch.name}", launch.reads, launch.writes) for launch in act_fwd]
    casts = elt != 4  # .float() and .to(a.dtype) copy only for a low-precision input
    act_bwd = (
        [_L(B, "GeluBackward(h)", [("g", "N*f*b"), ("h", "N*f*b")], [("dh", "N*f*b")])]
        if activation == "gelu"
        else [
            _L(B, "MulBackward: g * up", [("g", "N*f*b"), ("up", "N*f*b")], [("d silu", "N*f*b")]),
            _L(B, "MulBackward: g * silu", [("g", "N*f*b"), ("silu", "N*f*b")], [("d up", "N*f*b")]),
            _L(B, "SiluBackward(gate)", [("d silu", "N*f*b"), ("gate", "N*f*b")], [("d gate", "N*f*b")]),
            _L(B, "SplitBackward: cat", [("d gate", "N*f*b"), ("d up", "N*f*b")], [("dh", "N*w*b")]),
        ]
    )
    backward = [
        _L(B, "_gather_rows_kernel dY[tok]", [("token_of_row", "N*8"), ("dy", "N*d*b")], [("g_rows", "N*d*b")]),
        *recompute,
        _L(B, "_gmm_kernel dA = g_rows @ W2^T (fp32)", [("g_rows", "N*d*b"), ("W2", "E*f*d*b")], [("dA", "N*f*4")]),
        *([_L(B, "a.float()", [("a", "N*f*b")], [("a32", "N*f*4")])] if casts else []),
        _L(B, "dA * a", [("dA", "N*f*4"), ("a32", "N*f*4")], [("prod", "N*f*4")]),
        _L(B, ".sum(-1) -> dw_row", [("prod", "N*f*4")], [("dw_row", "N*4")]),
        *_slot_grads(),
        _L(
            B,
            "_gmm_dw_kernel dW2 = a^T (w_row g_rows)",
            [("a", "N*f*b"), ("g_rows", "N*d*b"), ("w_row", "N*4")],
            [("dW2", "E*f*d*b")],
        ),
        _L(B, "dA * w_row", [("dA", "N*f*4"), ("w_row", "N*4")], [("g32", "N*f*4")]),
        *([_L(B, ".to(a.dtype)", [("g32", "N*f*4")], [("g", "N*f*b")])] if casts else []),
        *act_bwd,
        *_shared_tail(),
    ]
    return forward + backward


def launches_after(activation: str, elt: int = 2) -> list[Launch]:
    """The fused MLP now: the activation in GEMM1's epilogue, the activation derivative, combine
    weight, a and the combine-weight row dots in the backward GEMM's epilogue, dY gathered in the
    backward GEMMs' loads. Only h is kept between the passes, as before."""
    F, B = "forward", "backward"
    forward = [
        *_routing_bookkeeping(),
        _L(
            F,
            f"_gmm_kernel [a, h] = {activation}(X[tok] @ W1)",
            [("token_of_row", "N*8"), ("x rows", "N*d*b"), ("W1", "E*d*w*b")],
            [("a", "N*f*b"), ("h", "N*w*b")],
        ),
        _L(
            F,
            "_gmm_kernel z = w_row * (a @ W2)",
            [("a", "N*f*b"), ("W2", "E*f*d*b"), ("w_row", "N*4")],
            [("z", "N*d*b")],
        ),
        _combine(F, "z"),
    ]
    backward = [
        _L(
            B,
            f"_gmm_kernel d{activation}: dA = dY[tok] @ W2^T -> dh, a, row dots",
            [("token_of_row", "N*8"), ("dy rows", "N*d*b"), ("W2", "E*f*d*b"), ("h", "N*w*b"), ("w_row", "N*4")],
            [("dh", "N*w*b"), ("a", "N*f*b"), ("row-dot partials", "P*N*4")],
        ),
        _L(B, "partials .sum(0) -> dw_row", [("row-dot partials", "P*N*4")], [("dw_row", "N*4")]),
        *_slot_grads(),
        _L(
            B,
            "_gmm_dw_kernel dW2 = a^T (w_row dY[tok])",
            [("a", "N*f*b"), ("token_of_row", "N*8"), ("dy rows", "N*d*b"), ("w_row", "N*4")],
            [("dW2", "E*f*d*b")],
        ),
        *_shared_tail(),
    ]
    return forward + backward


def launches(shape: Shape, fused: bool) -> list[Launch]:
    make = launches_after if fused else launches_before
    return make(shape.activation, shape.elt)


def total(shape: Shape, fused: bool, phase: str | None = None) -> int:
    return sum(launch.bytes(shape) for launch in launches(shape, fused) if phase in (None, launch.phase))


# The shape: fine-grained experts at 32K tokens a step, bf16.
TARGET = {"T": 32768, "d": 4096, "f": 1024, "E": 64, "k": 4}


def _fmt_terms(terms: tuple[Term, ...]) -> str:
    merged: dict[str, int] = {}
    for _, expr in terms:
        coef = 1
        rest = []
        for factor in expr.split("*"):
            if factor.isdigit():
                coef *= int(factor)
            else:
                rest.append(factor)
        key = "·".join(rest)
        merged[key] = merged.get(key, 0) + coef
    return " + ".join(f"{c}·{k}" if c != 1 else k for k, c in merged.items()) or "-"


def summary_table() -> str:
    """Bytes per step before and after, at the issue's shape, for both activations (GB = 1e9 B)."""
    rows = ["| activation | phase | before GB | after GB | saved GB |", "| --- | --- | --- | --- | --- |"]
    for activation in ("gelu", "swiglu"):
        shape = Shape(**TARGET, activation=activation)
        for phase in ("forward", "backward", None):
            before, after = total(shape, False, phase), total(shape, True, phase)
            name = phase or "**step**"
            rows.append(
                f"| {activation} | {name} | {before / GB:.2f} | {after / GB:.2f} | {(before - after) / GB:.2f} |"
            )
    return "\n".join(rows)


def launch_table(activation: str, fused: bool) -> str:
    """Every launch with what it reads and writes (bytes as products of the symbols) and its GB at
    the issue's shape."""
    shape = Shape(**TARGET, activation=activation)
    rows = ["| phase | launch | reads (B) | writes (B) | GB |", "| --- | --- | --- | --- | --- |"]
    for launch in launches(shape, fused):
        reads, writes = _fmt_terms(launch.reads), _fmt_terms(launch.writes)
        rows.append(f"| {launch.phase} | {launch.name} | {reads} | {writes} | {launch.bytes(shape) / GB:.3f} |")
    return "\n".join(rows)


def doc_blocks() -> dict[str, str]:
    """The generated blocks of docs/kernels.md, by marker name."""
    return {
        "traffic-summary": summary_table(),
        "traffic-before-gelu": launch_table("gelu", False),
        "traffic-after-gelu": launch_table("gelu", True),
        "traffic-before-swiglu": launch_table("swiglu", False),
        "traffic-after-swiglu": launch_table("swiglu", True),
    }


def blocks_in(text: str) -> dict[str, str]:
    """The blocks between ``<!-- traffic: NAME -->`` and ``<!-- /traffic -->`` markers of a document."""
    pattern = re.compile(r"<!-- (traffic-[\w-]+) -->\n(.*?)\n<!-- /traffic -->", re.S)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


if __name__ == "__main__":
    for name, block in doc_blocks().items():
        print(f"<!-- {name} -->\n{block}\n<!-- /traffic -->\n")
