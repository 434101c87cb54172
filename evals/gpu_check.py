#!/usr/bin/env python3
"""One-shot GPU check of the Triton kernels: ``make gpu-check`` on a fresh single-GPU machine.

Steps, each a subprocess with its own time limit inside a total budget (default 8 minutes):
  1. environment: python, torch, CUDA device, triton;
  2. install: make ``dynamoe`` importable without the network (``pip install --no-deps
     --no-build-isolation -e .``, else a link farm on PYTHONPATH; the kernels need only torch and
     triton); the MoE peers (ScatterMoE, MegaBlocks) are only reported unless ``--install-peers``;
  3. tests: the ``gpu``-marked tests (tests/test_kernels_triton_gpu.py) and the kernel suite compiled
     on the GPU (tests/test_kernels_triton.py), default tiles (``DYNAMOE_TRITON_TUNE=0``: the tiles a
     CUDA-graph capture uses), junit XML parsed into pass/fail per test;
  4. benchmark: ``dynamoe.evals.bench_kernels`` at the fine-grained and Mixtral-like shapes, balanced
     routing, one process per shape (a timeout loses one shape, not all), tuning bounded to the
     first candidates (``DYNAMOE_TRITON_TUNE_TOP``);
  5. one JSON file (``--out``) and a printed summary: pass/fail per test, TFLOP/s per op and
     provider, percentage of dense.

``--dry-run`` needs no GPU: it checks the plan (files present, the tests collect, the benchmark
accepts its arguments), prints it, and writes the JSON with ``"dry_run": true``.

    python3 evals/gpu_check.py [--dry-run] [--out runs/gpu_check.json] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = ["tests/test_kernels_triton_gpu.py", "tests/test_kernels_triton.py"]
SHAPES = ["fine_grained", "mixtral"]
# Where the import name dynamoe comes from (pyproject's package-dir).
PACKAGE_DIRS = {"": "moe", "kernels": "kernels", "launch": "launch", "evals": "evals", "configs": "configs"}


def _run(cmd, timeout, env=None, cwd=ROOT) -> dict:
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(1, timeout))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (
            e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        ) + f"\ntimed out after {timeout:.0f} s"
    return {
        "cmd": [str(c) for c in cmd],
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "stdout": out,
        "stderr": err,
    }


def environment() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                device=torch.cuda.get_device_name(0),
                capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1),
                sms=props.multi_processor_count,
            )
    except ImportError:
        info.update(torch=None, cuda=False)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _importable(name: str, env: dict) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({name!r}) else 1)"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir()).returncode == 0


def link_farm(dest: Path) -> Path:
    """A folder whose ``dynamoe`` package is made of links to the checkout's folders (no install)."""
    pkg = dest / "dynamoe"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (ROOT / "moe").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for sub, folder in PACKAGE_DIRS.items():
        if sub:
            (pkg / sub).symlink_to(ROOT / folder)
    return dest


def install(env: dict, mode: str, peers: bool, dry_run: bool) -> dict:
    """Make dynamoe importable (returns what was done; updates env's PYTHONPATH for the link farm)."""
    out = {"mode": mode, "steps": []}
    probe_env = dict(env)
    if mode != "links" and _importable("dynamoe", probe_env):
        out["dynamoe"] = "already importable"
    elif dry_run:
        out["dynamoe"] = f"would install ({mode})"
    else:
        done = False
        if mode in ("auto", "pip"):
            r = _run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], 180, env
            )
            out["steps"].append({k: r[k] for k in ("cmd", "rc", "seconds")} | {"stderr": r["stderr"][-1500:]})
            done = r["rc"] == 0 and _importable("dynamoe", env)
        if not done and mode in ("auto", "links"):
            farm = link_farm(Path(tempfile.gettempdir()) / "dynamoe_gpu_check")
            env["PYTHONPATH"] = os.pathsep.join([str(farm), *filter(None, [env.get("PYTHONPATH")])])
            done = _importable("dynamoe", env)
            out["steps"].append({"link_farm": str(farm), "ok": done})
        out["dynamoe"] = "installed" if done else "NOT importable"
    for name in ("pytest", "triton"):
        out[name] = _importable(name, env)
    for peer, pip_name in (("scattermoe", "scattermoe"), ("megablocks", "megablocks")):
        if peers and not dry_run and not _importable(peer, env):
            r = _run(
                [sys.executable, "-m", "pip", "install", "-q", "--retries", "0", "--timeout", "10", pip_name], 120, env
            )
            out["steps"].append({k: r[k] for k in ("cmd", "rc", "seconds")})
        out[peer] = _importable(peer, env)
    return out


def parse_junit(path: Path) -> list[dict]:
    cases = []
    if not path.exists():
        return cases
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "")[:500]
                break
        name = f"{tc.get('classname', '').replace('.', '/')}.py::{tc.get('name')}"
        cases.append({"test": name, "outcome": outcome, "seconds": float(tc.get("time") or 0), "message": message})
    return cases


# -P: the checkout's root stays off sys.path, where its folders (kernels/, launch/) would shadow
# installed packages of those names (the Makefile runs pytest's script for the same reason).
PY = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


def plan(args) -> dict:
    tests_cmd = [*PY, "-m", "pytest", "-p", "no:cacheprovider", "-q", *TEST_FILES, "-m", "gpu or not slow"]
    bench = [
        [*PY, "-m", "dynamoe.evals.bench_kernels", "--shapes", shape, "--routing", "balanced"]
        + ["--iters", str(args.iters), "--warmup", "3"]
        for shape in args.shapes.split(",")
    ]
    return {"tests": tests_cmd, "bench": bench, "budget_s": args.budget_s, "test_share": args.test_share}


def summarize(result: dict) -> str:
    lines = ["", "== gpu-check summary =="]
    env = result["environment"]
    lines.append(f"device: {env.get('device', 'none')} | torch {env.get('torch')} | triton {env.get('triton')}")
    t = result.get("tests", {})
    if t.get("cases"):
        counts = {}
        for c in t["cases"]:
            counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
        lines.append(f"tests: {counts} (rc {t.get('rc')}, {t.get('seconds')} s)")
        for c in t["cases"]:
            if c["outcome"] in ("failed", "error"):
                lines.append(f"  FAIL {c['test']}: {c['message'][:160]}")
        for c in t["cases"]:
            if c["outcome"] == "passed" and "gpu" in c["test"]:
                lines.append(f"  pass {c['test']}")
    elif result.get("dry_run"):
        lines.append(f"tests (dry run, collected only): {' '.join(t.get('collected', [])) or 'nothing'}")
    elif t:
        lines.append(f"tests: none ran (rc {t.get('rc')}): {t.get('stderr', '')[-300:]}")
    for shape, b in result.get("bench", {}).items():
        lines.append(f"bench {shape}: rc {b.get('rc')} ({b.get('seconds')} s)")
        for r in b.get("rows", []):
            if r.get("median_ms") is None:
                continue
            tf = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r.get('gb_per_s', 0):.0f} GB/s"
            pct = f" {r['pct_of_dense']:.0f}% dense" if "pct_of_dense" in r else ""
            lines.append(f"  {r['op']:<20} {r['provider']:<26} {r['median_ms']:9.3f} ms  {tf}{pct}")
    lines.append(
        f"overall: {'PASS' if result.get('ok') else 'FAIL'} in {result.get('elapsed_s')} s -> {result.get('out')}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="check the plan without a GPU")
    p.add_argument("--out", default="runs/gpu_check.json")
    p.add_argument("--budget-s", type=float, default=480.0, help="total time budget (default 8 minutes)")
    p.add_argument("--test-share", type=float, default=0.5, help="share of the budget for the tests")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--install", choices=["auto", "pip", "links", "none"], default="auto")
    p.add_argument("--install-peers", action="store_true", help="try pip for scattermoe and megablocks")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out_path = (ROOT / args.out) if not os.path.isabs(args.out) else Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("DYNAMOE_KERNEL_BACKEND", None)
    env.setdefault("DYNAMOE_TRITON_TUNE_CACHE", str(ROOT / "runs" / "gpu_check_tiles.json"))
    result = {"dry_run": args.dry_run, "environment": environment(), "plan": plan(args), "out": str(out_path)}
    result["install"] = install(env, args.install, args.install_peers, args.dry_run)
    problems = []
    if not args.dry_run and not result["environment"].get("cuda"):
        problems.append("no CUDA device visible to torch")
    if result["install"].get("dynamoe") == "NOT importable":
        problems.append("dynamoe could not be made importable")
    for f in TEST_FILES:
        if not (ROOT / f).exists():
            problems.append(f"missing {f}")
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731

    if args.dry_run:
        # The tests collect, the benchmark accepts its arguments: what can be checked without a GPU.
        r = _run([*result["plan"]["tests"], "--collect-only"], 300, env)
        result["tests"] = {
            "collect_rc": r["rc"],
            "collected": r["stdout"].strip().splitlines()[-1:] if r["stdout"] else [],
        }
        if r["rc"] not in (0, 5):
            problems.append(f"pytest could not collect the tests: {r['stderr'][-300:]}")
        for cmd in result["plan"]["bench"]:
            check = (
                "import sys; from dynamoe.evals.bench_kernels import parse_args; "
                f"a = parse_args({cmd[cmd.index('--shapes') :]!r}); assert a.routing == 'balanced' and a.shapes"
            )
            r = _run([sys.executable, "-c", check], 120, env)
            if r["rc"] != 0:
                problems.append(f"bench arguments rejected: {r['stderr'][-300:]}")
        result["bench"] = {}
    elif not problems:
        env_tests = dict(env, DYNAMOE_TRITON_TUNE="0")
        junit = out_path.with_suffix(".junit.xml")
        r = _run([*result["plan"]["tests"], f"--junitxml={junit}"], left() * args.test_share, env_tests)
        cases = parse_junit(junit)
        result["tests"] = {"rc": r["rc"], "seconds": r["seconds"], "cases": cases, "stderr": r["stderr"][-2000:]}
        result["tests"]["stdout_tail"] = r["stdout"][-4000:]
        if r["rc"] != 0 or any(c["outcome"] in ("failed", "error") for c in cases) or not cases:
            problems.append("tests failed or did not run")
        result["bench"] = {}
        env_bench = dict(env, DYNAMOE_TRITON_TUNE_TOP=env.get("DYNAMOE_TRITON_TUNE_TOP", "4"))
        cmds = result["plan"]["bench"]
        for i, cmd in enumerate(cmds):
            shape = cmd[cmd.index("--shapes") + 1]
            jpath = out_path.with_name(f"{out_path.stem}.bench_{shape}.json")
            share = left() / (len(cmds) - i) - 5
            if share < 20:
                result["bench"][shape] = {"rc": None, "note": "skipped: time budget spent"}
                problems.append(f"bench {shape} skipped (budget)")
                continue
            r = _run([*cmd, "--json", str(jpath)], share, env_bench)
            rows = json.loads(jpath.read_text())["rows"] if jpath.exists() else []
            result["bench"][shape] = {
                "rc": r["rc"],
                "seconds": r["seconds"],
                "rows": rows,
                "stderr": r["stderr"][-2000:],
            }
            if r["rc"] != 0:
                problems.append(f"bench {shape} failed (rc {r['rc']})")
    result["problems"] = problems
    result["ok"] = not problems
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    out_path.write_text(json.dumps(result, indent=1, default=str))
    if args.dry_run:
        print("gpu-check plan:")
        print("  tests:", " ".join(result["plan"]["tests"]))
        for cmd in result["plan"]["bench"]:
            print("  bench:", " ".join(cmd))
        print(f"  budget: {args.budget_s:.0f} s ({args.test_share:.0%} tests)")
    print(summarize(result))
    for problem in problems:
        print("problem:", problem)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
