"""The built wheel: one import name (``dynamoe``), every module importable from the installed copy
(not from this checkout), the YAML configs shipped, and room beside it for Hugging Face's own
``kernels`` package (the hub-kernels loader that ``transformers`` probes for)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The subprocesses must not see this checkout: no cwd in it, nothing of it on PYTHONPATH.
_ENV_KEEP = dict(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _env(pythonpath: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env.update(_ENV_KEEP)
    env["PYTHONPATH"] = str(pythonpath)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _pip_install_target(target: Path, *what: str, cwd: Path, timeout: int = 300):
    """``pip install --no-deps --target`` (never touches the venv's own packages)."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), *what]
    return cmd, _run(cmd, cwd=cwd, timeout=timeout)


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> dict[str, Path]:
    """``{package: folder}`` for ``[tool.setuptools] packages``, resolved as setuptools does: the
    longest ``package-dir`` prefix gives the folder, the rest of the dotted name the path under it."""
    setup = _pyproject()["tool"]["setuptools"]
    package_dir: dict[str, str] = setup["package-dir"]
    out = {}
    for package in setup["packages"]:
        prefix = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len, default="")
        rest = package[len(prefix) :].strip(".")
        out[package] = (ROOT / package_dir.get(prefix, "")).joinpath(*(rest.split(".") if rest else ()))
    return out


def expected_modules() -> set[str]:
    """Every module the wheel should hold, from ``packages`` applied to this checkout's files."""
    out = set()
    for package, folder in _package_folders().items():
        assert (folder / "__init__.py").is_file(), f"{package} is listed in packages; {folder} has no __init__"
        out.add(package)
        out.update(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")
    return out


def unlisted_packages() -> list[str]:
    """Folders with an ``__init__.py`` under a mapped folder that ``packages`` leaves out (they would not ship)."""
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    listed = {f.resolve() for f in _package_folders().values()}
    missing = set()
    for folder in package_dir.values():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts and init.parent.resolve() not in listed:
                missing.add(str(init.parent.relative_to(ROOT)))
    return sorted(missing)


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a clean copy of the checkout (so a stale ``build/`` or egg-info here can't leak
    files into the wheel, and the build writes nothing into the work tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "runs", "tests", "*.egg-info", "__pycache__", ".pytest_cache", "*.pyc"
        ),
    )
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    proc = _run(cmd, cwd=src)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("dynamoe-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_every_package_folder_is_listed_in_pyproject():
    assert unlisted_packages() == [], (
        "these folders have an __init__.py but are not in [tool.setuptools] packages, so the wheel "
        "leaves them out; add them to the list in pyproject.toml"
    )


def test_wheel_installs_one_import_name_and_every_module_imports_from_it(built_wheel, tmp_path):
    with zipfile.ZipFile(built_wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = [t for t in tops if t.endswith(".dist-info")]
    assert tops - set(dist_info) == {"dynamoe"}, f"the wheel has other top-level entries: {sorted(tops)}"
    assert len(dist_info) == 1 and dist_info[0].startswith("dynamoe-"), dist_info
    assert "dynamoe/configs/quickstart.yaml" in names
    assert not any(n.startswith("dynamoe/tests/") or "/__pycache__/" in n for n in names)

    site = tmp_path / "site"
    cmd, proc = _pip_install_target(site, str(built_wheel), cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"

    probe = textwrap.dedent(
        """
        import importlib, json, pkgutil, sys
        import dynamoe
        files, errors = {"dynamoe": dynamoe.__file__}, {}
        def onerror(name):
            errors[name] = "walk_packages could not import it: " + repr(sys.exc_info()[1])
        for info in pkgutil.walk_packages(dynamoe.__path__, "dynamoe.", onerror=onerror):
            try:
                files[info.name] = importlib.import_module(info.name).__file__
            except BaseException as err:  # SystemExit too: report, don't die
                errors[info.name] = f"{type(err).__name__}: {err}"
        from dynamoe.config import shipped_configs
        configs = {k: str(v) for k, v in shipped_configs().items()}
        print(json.dumps({"files": files, "errors": errors, "configs": configs}))
        """
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = _run([sys.executable, "-c", probe], cwd=cwd, env=_env(site))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert report["errors"] == {}, json.dumps(report["errors"], indent=1)
    site_root = str(site.resolve())
    outside = {m: f for m, f in report["files"].items() if not str(Path(f).resolve()).startswith(site_root + os.sep)}
    assert outside == {}, f"imported from outside the installed wheel (the checkout?): {outside}"
    assert set(report["files"]) == expected_modules(), (
        f"missing from the wheel: {sorted(expected_modules() - set(report['files']))}; "
        f"unexpected: {sorted(set(report['files']) - expected_modules())}"
    )

    configs = report["configs"]
    assert "quickstart" in configs, configs
    assert all(str(Path(p).resolve()).startswith(site_root + os.sep) for p in configs.values()), configs
    assert set(configs) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}


def test_hugging_face_kernels_installs_beside_dynamoe(tmp_path):
    """HF's ``kernels`` (the hub-kernels loader) and ``dynamoe.kernels`` no longer share a name."""
    from importlib import metadata

    from packaging.requirements import Requirement

    hfk = tmp_path / "hfk"
    cmd, proc = _pip_install_target(hfk, "kernels", cwd=tmp_path, timeout=180)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        offline = ("No matching distribution", "Could not find a version", "onnection", "resolve", "timed out")
        if any(s in text for s in offline):
            pytest.skip(f"cannot install Hugging Face's `kernels` from PyPI (no network?): {text.strip()[-300:]}")
        pytest.fail(f"{' '.join(cmd)} failed:\n{text}")

    # Its runtime requirements (no extras) that this environment lacks go into the same folder, --no-deps.
    meta = next(hfk.glob("kernels-*.dist-info")) / "METADATA"
    missing = []
    for line in meta.read_text().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        assert req.specifier.contains(have, prereleases=True), f"kernels needs {req}; this venv has {req.name} {have}"
    if missing:
        cmd, proc = _pip_install_target(hfk, *missing, cwd=tmp_path, timeout=180)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"

    probe = textwrap.dedent(
        """
        import importlib.util, json
        import kernels
        import dynamoe.kernels as ours
        import transformers
        from importlib import metadata
        from transformers.utils import is_kernels_available
        print(json.dumps({
            "hf_file": kernels.__file__,
            "hf_has_get_kernel": callable(getattr(kernels, "get_kernel", None)),
            "hf_has_kernelize": callable(getattr(kernels, "kernelize", None)),
            "spec_origin": importlib.util.find_spec("kernels").origin,
            "ours_file": ours.__file__,
            "ours_has": [n for n in ("grouped_mm", "topk_route") if callable(getattr(ours, n, None))],
            "ours_is_not_hf": not hasattr(ours, "get_kernel"),
            "transformers": transformers.__version__,
            "kernels_dist_version": metadata.version("kernels"),  # what transformers reads
            "transformers_uses_hub_kernels": is_kernels_available(),
        }))
        """
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = _run([sys.executable, "-c", probe], cwd=cwd, env=_env(hfk))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    hfk_root = str(hfk.resolve()) + os.sep
    assert got["hf_file"].startswith(hfk_root) and got["spec_origin"] == got["hf_file"], got
    assert got["hf_has_get_kernel"] and got["hf_has_kernelize"], got
    assert got["ours_has"] == ["grouped_mm", "topk_route"] and got["ours_is_not_hf"], got
    assert Path(got["ours_file"]).parent.name == "kernels", got
    assert got["transformers"]
    # transformers finds HF's distribution; whether it *uses* it (is_kernels_available) depends on
    # transformers' own supported version window, not on us, so that is not asserted.
    version = next(v.split(":", 1)[1].strip() for v in meta.read_text().splitlines() if v.startswith("Version:"))
    assert got["kernels_dist_version"] == version, got
