"""Ahead-of-time compile of the Triton kernels for GPU targets, on a machine without a GPU.

Triton's compiler runs on the CPU: given a target (``GPUTarget("cuda", 90, 32)`` is sm_90a, the
H100/H200; 80 is the A100), it lowers a kernel to PTX and, with the ``ptxas`` it ships, to a cubin.
This module enumerates the kernel variants the launch code can produce (the compile-time arguments
come from the same helpers the launches use: ``gmm_constexprs``, ``route_constexprs``, the tile
lists of ``autotune``), specialises the runtime arguments the way a launch does (through the JIT's
own binder: integers equal to 1 become constants, 16-divisible ones and pointers get alignment
hints), compiles each, and reads what the hardware would be asked for: shared memory (Triton's
metadata), registers and spills (``ptxas -v``), SASS instructions (``cuobjdump -sass``), and
whether the products use wgmma / mma.

    python -m dynamoe.kernels.triton.compile_check [--all] [--arch 90,80] [--json PATH]

prints the table that docs/kernels.md shows. ``tests/test_kernels_compile.py`` asserts on it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from dynamoe.kernels.triton import autotune

ARCHS = (90, 80)
_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass(frozen=True)
class Variant:
    """One compiled form of one kernel: runtime arguments (tensors as dtypes, integers as values
    of a representative shape) and the compile-time arguments and launch options."""

    kernel: str  # attribute of ``module``
    module: str
    label: str
    args: tuple
    constexprs: tuple  # sorted (name, value) pairs
    dtype: str = ""
    tensor_core: bool = False  # a product that should run on the tensor cores (wgmma on sm_90)
    smem_estimate: dict = field(default_factory=dict, compare=False, hash=False)  # capability -> bytes

    def kwargs(self) -> dict:
        return dict(self.constexprs)


@dataclass
class Result:
    label: str
    kernel: str
    arch: str
    ok: bool
    error: str = ""
    shared: int = 0
    smem_limit: int = 0
    smem_estimate: int | None = None
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    instructions: int = 0
    wgmma: int = 0
    mma: int = 0
    tensor_core: bool = False
    num_warps: int = 4
    num_stages: int = 3
    seconds: float = 0.0


def _v(module, kernel, label, args, constexprs, **kw) -> Variant:
    return Variant(kernel, module, label, tuple(args), tuple(sorted(constexprs.items())), **kw)


def _dt(d: torch.dtype) -> str:
    return _TORCH_TO_TRITON[d]


# ----------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class GemmOp:
    """One way the launch code calls a grouped-GEMM kernel (its flags, as the launches pass them)."""

    name: str
    dw: bool = False  # the K-grouped weight-gradient kernel
    gather: bool = False
    gather_dy: bool = False
    scale: bool = False
    trans: bool = False
    epilogue: str = ""
    store_aux: bool = False
    rowdot: bool = False


def gemm_ops() -> dict[str, GemmOp]:
    """Every flag combination the launches reach, by the name its tuning key uses: the plain forward,
    input gradient and scaled/gathered GEMMs; the fused MLP's GEMM1 with its activation (with and
    without h, i.e. training and inference) and its backward GEMM (with or without a and the row
    dots, as the gradients asked for decide); the weight gradients."""
    from dynamoe.kernels.triton.grouped_gemm import FORWARD_ACTIVATIONS, gmm_dw_op, gmm_op

    ops = [
        GemmOp(gmm_op(g, s, t), gather=g, scale=s, trans=t) for g, s, t in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))
    ]
    for act in FORWARD_ACTIVATIONS:
        for keep_h in (True, False):
            ops.append(GemmOp(gmm_op(True, False, False, act, keep_h), gather=True, epilogue=act, store_aux=keep_h))
        for keep_a in (True, False):
            for rowdot in (True, False):
                name = gmm_op(True, True, True, f"d{act}", keep_a, rowdot)
                ops.append(
                    GemmOp(
                        name, gather=True, scale=True, trans=True, epilogue=f"d{act}", store_aux=keep_a, rowdot=rowdot
                    )
                )
    for g, y, s in ((0, 0, 0), (1, 0, 0), (0, 0, 1), (0, 1, 1)):
        ops.append(GemmOp(gmm_dw_op(g, s, y), dw=True, gather=g, gather_dy=y, scale=s))
    return {op.name: op for op in ops}


# Default CI: every flag combination the MoE path uses in training, in bf16 (the dtype that matters)
# on sm_90a; on sm_80 and in the other dtypes, the register-heaviest ones.
_REPRESENTATIVE_OPS = (
    "gmm",
    "gmmg",
    "gmms",
    "gmmt",
    "gmmg_gelu+h",
    "gmmg_gelu",
    "gmmg_swiglu+h",
    "gmmg_swiglu",
    "gmmgst_dgelu+a+r",
    "gmmgst_dgelu",
    "gmmgst_dswiglu+a+r",
    "gmm_dw",
    "gmm_dwg",
    "gmm_dws",
    "gmm_dwys",
)
_SM80_OPS = ("gmm", "gmmg_swiglu+h", "gmmgst_dswiglu+a+r")


def gemm_combos(exhaustive: bool):
    """(input dtype, output dtype, fp32 precision, op name) the code launches (see ``gemm_ops``)."""
    combos = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        precisions = ("ieee", "tf32x3", "tf32") if dtype == torch.float32 else ("ieee",)
        for p in precisions:
            for op in gemm_ops():
                combos.append((dtype, dtype, p, op))
    if exhaustive:
        return combos
    keep = {(torch.bfloat16, torch.bfloat16, "ieee", op) for op in _REPRESENTATIVE_OPS}
    keep |= {(torch.float16, torch.float16, "ieee", "gmm")}
    keep |= {(torch.float32, torch.float32, p, "gmm") for p in ("ieee", "tf32x3", "tf32")}
    keep |= {(torch.float32, torch.float32, "ieee", op) for op in ("gmm_dw", "gmmg_swiglu+h", "gmmgst_dswiglu+a+r")}
    keep |= {(torch.float64, torch.float64, "ieee", op) for op in ("gmm", "gmm_dw", "gmmg_swiglu+h")}
    return [c for c in combos if c in keep]


def _gemm_args(op: GemmOp, dtype, out_dtype, tile, K: int, N: int, E: int) -> tuple:
    """The runtime arguments of one launch, tensors as dtypes, integers as a launch would pass them."""
    idx = torch.int64 if op.gather or op.gather_dy else torch.int32
    sc = torch.float32 if op.scale else torch.int32
    if op.dw:
        D, F = K, N
        return (dtype, dtype, out_dtype, torch.int32, idx, sc, D, F, D, 1, F, 1, D * F, F, 1)
    rows = 4096
    width = 2 * N if op.epilogue.endswith("swiglu") else N  # h's row; dh's too, in the backward
    backward = op.epilogue.startswith("d")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h = dtype if op.epilogue and (backward or op.store_aux) else torch.int32
    a_out = dtype if backward and op.store_aux else torch.int32
    rowdot = acc if op.rowdot else torch.int32
    sb = (N * K, 1, K) if op.trans else (K * N, N, 1)
    args = (dtype, dtype, out_dtype, torch.int32, torch.int32, idx, sc, h, a_out, rowdot, rows // tile.BLOCK_M + E)
    args += (N, K, E, K, 1, *sb, width if backward else N, 1)
    return args + (width if h != torch.int32 else 0, N if a_out != torch.int32 else 0, rows if op.rowdot else 0)


def gemm_variants(capability: tuple[int, int], exhaustive: bool) -> list[Variant]:
    from dynamoe.kernels.triton.grouped_gemm import accumulators, epilogue_tiles, gmm_constexprs, gmm_dw_constexprs

    out = []
    ops = gemm_ops()
    smem = autotune.smem_per_block(capability)
    # Representative shapes: fine-grained (d=4096, f=1024, E=64), and widths that are not multiples
    # of 16 (no alignment hints, masked K loop: the unaligned tile class).
    for dtype, out_dtype, precision, name in gemm_combos(exhaustive):
        if not exhaustive and capability[0] < 9 and name not in _SM80_OPS:
            continue  # sm_80: the plain GEMM and the SwiGLU ones (two accumulators, the heaviest epilogue)
        op = ops[name]
        elt = torch.tensor([], dtype=dtype).element_size()
        tensor_core = dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and precision != "ieee")
        dname = f"{_dt(dtype)}{'->' + _dt(out_dtype) if out_dtype != dtype else ''}"
        if dtype == torch.float32:
            dname += f"/{precision}"
        shapes = [("", 4096, 1024, 64)]
        if exhaustive or (name == "gmm" and dtype in (torch.bfloat16, torch.float32) and precision == "ieee"):
            shapes.append(("odd", 1000, 333, 7))
        n_acc = 1 if op.dw else accumulators(op.epilogue)
        regs = (n_acc, 1 if op.dw else epilogue_tiles(op.epilogue))
        for tag, K, N, E in shapes:
            cands = autotune.candidates(dtype, precision, capability, smem, autotune.aligned(K, N), *regs)
            for tile in cands if exhaustive else cands[:1]:
                t = tile
                label = f"{name} {dname} {t.BLOCK_M}x{t.BLOCK_N}x{t.BLOCK_K} w{t.num_warps} s{t.num_stages}"
                label += f" {tag}" if tag else ""
                kw = _tc(tensor_core, {capability: autotune.smem_estimate(tile, elt, capability, n_acc)})
                args = _gemm_args(op, dtype, out_dtype, tile, K, N, E)
                if op.dw:
                    ce = gmm_dw_constexprs(
                        dtype, tile, gather=op.gather, gather_dy=op.gather_dy, scale=op.scale, precision=precision
                    )
                    out.append(_v("grouped_gemm", "_gmm_dw_kernel", label, args, ce, dtype=dname, **kw))
                    continue
                ce = gmm_constexprs(
                    dtype,
                    K,
                    E,
                    tile,
                    gather=op.gather,
                    scale=op.scale,
                    precision=precision,
                    epilogue=op.epilogue,
                    store_aux=op.store_aux,
                    rowdot=op.rowdot,
                )
                out.append(_v("grouped_gemm", "_gmm_kernel", label, args, ce, dtype=dname, **kw))
    return out


def _tc(tensor_core: bool, est: dict) -> dict:
    return {"tensor_core": tensor_core, "smem_estimate": est}


def route_variants(exhaustive: bool) -> list[Variant]:
    from dynamoe.kernels.triton.routing import route_constexprs

    cases = [(256, 8, "sigmoid", True, True), (64, 6, "softmax", False, False), (8, 2, "softmax", False, True)]
    if exhaustive:
        cases += [(E, 2, s, b, n) for E in (2, 16, 128) for s in ("softmax", "sigmoid") for b in (0, 1) for n in (0, 1)]
    out = []
    for E, k, score, bias, norm in cases:
        ce = route_constexprs(32768, E, score, bool(bias), bool(norm))
        args = (torch.float32, torch.float32, torch.float32, torch.int64, torch.int64, 32768, E, E, k)
        flags = f"{score}{' bias' if bias else ''}{' norm' if norm else ''}"
        out.append(_v("routing", "_route_kernel", f"route E={E} k={k} {flags}", args, ce, dtype="fp32"))
    return out


def dispatch_variants(exhaustive: bool) -> list[Variant]:
    from dynamoe.kernels.triton.dispatch import _row_blocks, plan_constexprs

    out = []
    for E in (64, 256) if not exhaustive else (8, 64, 128, 256):
        ce = plan_constexprs(E)
        out.append(_v("dispatch", "_plan_count_kernel", f"plan_count E={E}", (torch.int64, torch.int64, 131072, E), ce))
        args = (torch.int64, torch.int64, torch.int64, torch.int64, 131072, E, 4, 131072)
        out.append(_v("dispatch", "_plan_rows_kernel", f"plan_rows E={E}", args, ce))
    dtypes = (torch.bfloat16,) if not exhaustive else (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    for dtype in dtypes:
        d = 4096
        BR, BD = _row_blocks(d)
        args = (dtype, torch.int64, dtype, 131072, d, d, d)
        out.append(
            _v(
                "dispatch",
                "_gather_rows_kernel",
                f"gather {_dt(dtype)} d={d}",
                args,
                {"BLOCK_R": BR, "BLOCK_D": BD},
                dtype=_dt(dtype),
            )
        )
        BT, BF = _row_blocks(d)
        BT = min(BT, 64)
        for has_w in (True, False):
            args = (dtype, torch.int64, torch.float32 if has_w else torch.int64, dtype, 32768, d, 4, d, d)
            ce = {"HAS_W": has_w, "ACC64": dtype == torch.float64, "BLOCK_T": BT, "BLOCK_F": BF}
            label = f"combine {_dt(dtype)}{' weighted' if has_w else ''}"
            out.append(_v("dispatch", "_combine_kernel", label, args, ce, dtype=_dt(dtype)))
        BF = min(128, autotune_next_pow2(d))
        BT = max(1, min(64, 2048 // BF))
        args = (dtype, torch.int64, torch.float32, dtype, dtype, torch.float32, 32768, d, 4, d, d, d)
        ce = {"NEED_DY": True, "NEED_DW": True, "ACC64": dtype == torch.float64, "BLOCK_T": BT, "BLOCK_F": BF}
        out.append(_v("dispatch", "_combine_bwd_kernel", f"combine_bwd {_dt(dtype)}", args, ce, dtype=_dt(dtype)))
    return out


def autotune_next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def variants(capability: tuple[int, int], exhaustive: bool = False) -> list[Variant]:
    """Representative (the default tile of every dtype and precision, the flags the MoE path uses,
    routing at E = 8/64/256, the dispatch kernels), or with ``exhaustive`` every candidate tile of
    every dtype/precision/flag combination the launch code can reach on this capability."""
    out = gemm_variants(capability, exhaustive) + route_variants(exhaustive) + dispatch_variants(exhaustive)
    if not exhaustive and capability[0] < 9:  # sm_80: the register-heaviest of the rest
        out = [v for v in out if v.kernel.startswith("_gmm") or "E=256" in v.label]
    return out


# ------------------------------------------------------------------------------------ compile


def _mock_args(args: tuple):
    from triton.runtime.jit import MockTensor

    return [MockTensor(a) if isinstance(a, torch.dtype) else a for a in args]


def _tool(name: str) -> str | None:
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except Exception:  # noqa: BLE001 - an older triton or a missing binary: the column stays empty
        return None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", re.M)


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile ``v`` for ``sm_<arch>`` (90 means sm_90a) with Triton on this CPU and measure it."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    mod = importlib.import_module(f"dynamoe.kernels.triton.{v.module}")
    fn = JITFunction(getattr(mod, v.kernel).fn)
    target = GPUTarget("cuda", arch, 32)
    cap = (arch // 10, arch % 10)
    kwargs = v.kwargs()
    res = Result(
        label=v.label,
        kernel=v.kernel,
        arch=f"sm_{arch}{'a' if arch == 90 else ''}",
        ok=False,
        smem_limit=autotune.smem_per_block(cap),
        smem_estimate=v.smem_estimate.get(cap),
        tensor_core=v.tensor_core,
        num_warps=kwargs.get("num_warps", 4),
        num_stages=kwargs.get("num_stages", 3),
    )
    start = time.perf_counter()
    log = io.StringIO()
    saved = (knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log)
    try:
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*_mock_args(v.args), **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        # Always run ptxas (a cache hit skips it) and keep its -v report, which names spills.
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as err:  # noqa: BLE001 - reported per variant; the test fails on it
        res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        res.seconds = time.perf_counter() - start
        return res
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    res.ok = True
    res.shared = int(kernel.metadata.shared)
    text = log.getvalue()
    if m := _PTXAS_REGS.search(text):
        res.registers = int(m.group(1))
    if m := _PTXAS_SPILL.search(text):
        res.stack, res.spill_stores, res.spill_loads = map(int, m.groups())
    ptx = kernel.asm.get("ptx", "")
    res.wgmma = ptx.count("wgmma.mma_async")
    res.mma = len(re.findall(r"\bmma\.sync", ptx))
    res.instructions = _sass_instructions(kernel.asm.get("cubin", b""))
    res.seconds = time.perf_counter() - start
    return res


def _sass_instructions(cubin: bytes) -> int:
    tool = _tool("cuobjdump")
    if not cubin or not tool:
        return 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
    return len(_SASS_LINE.findall(sass))


def problems(r: Result) -> list[str]:
    """What is wrong with a compiled variant (empty: fine)."""
    if not r.ok:
        return [f"does not compile: {r.error}"]
    out = []
    if r.shared > r.smem_limit:
        out.append(f"shared memory {r.shared} B > {r.smem_limit} B")
    if r.smem_estimate is not None and r.shared > r.smem_estimate:
        out.append(f"shared memory {r.shared} B above the pruning estimate {r.smem_estimate} B")
    if r.spill_stores or r.spill_loads:
        out.append(f"register spills ({r.spill_stores} B stored, {r.spill_loads} B loaded)")
    if r.tensor_core and r.arch == "sm_90a" and r.wgmma == 0:
        out.append("no wgmma on sm_90a")
    if r.tensor_core and r.arch == "sm_80" and r.mma == 0:
        out.append("no mma.sync on sm_80")
    return out


def _compile_star(job):
    return compile_variant(*job)


def run(archs=ARCHS, exhaustive: bool = False, only: str | None = None, jobs: int = 1) -> list[Result]:
    """Compile every variant for every arch; ``jobs`` > 1 compiles in that many spawned processes
    (each imports torch and triton once, so it pays off from a few dozen variants)."""
    work = [(v, arch) for arch in archs for v in variants((arch // 10, arch % 10), exhaustive)]
    work = [(v, arch) for v, arch in work if not only or only in v.label]
    if jobs <= 1 or len(work) < 8:
        return [compile_variant(v, arch) for v, arch in work]
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_star, work, chunksize=4))


def table(results: list[Result]) -> str:
    header = ("arch", "variant", "shared KB", "limit KB", "regs", "spills B", "SASS instrs", "wgmma", "mma", "status")
    rows = [header]
    for r in results:
        bad = problems(r)
        rows.append(
            (
                r.arch,
                r.label,
                f"{r.shared / 1024:.0f}" if r.ok else "-",
                f"{r.smem_limit / 1024:.0f}",
                str(r.registers) if r.ok else "-",
                str(r.spill_stores + r.spill_loads) if r.ok else "-",
                str(r.instructions) if r.ok else "-",
                str(r.wgmma) if r.ok else "-",
                str(r.mma) if r.ok else "-",
                "ok" if not bad else "; ".join(bad),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile every Triton kernel variant for GPU targets on this CPU.")
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90,80")
    p.add_argument("--all", action="store_true", help="every candidate tile, not just the defaults")
    p.add_argument("--only", default=None, help="only variants whose label contains this")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.perf_counter()
    results = run(tuple(int(a) for a in args.arch.split(",")), args.all, args.only, args.jobs)
    print(table(results))
    bad = [r for r in results if problems(r)]
    print(f"{len(results)} variants compiled in {time.perf_counter() - start:.0f} s; {len(bad)} with problems")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"problems": problems(r)} for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
