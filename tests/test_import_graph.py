"""The import graph of the ``dynamoe`` namespace, read statically (``ast``; nothing is imported).

Every ``.py`` file under the folders that ``pyproject.toml``'s ``package-dir`` maps into
``dynamoe`` (``moe/`` -> ``dynamoe``, ``kernels/`` -> ``dynamoe.kernels``, ...) gets its dotted
name, and its imports are collected with where they run:

* ``module``:        at import time (top level, inside top-level ``if``/``try``/``with``, class bodies);
* ``function``:      inside a function body (runs only when called);
* ``type_checking``: under ``if TYPE_CHECKING:`` (never runs).

The tests check that module-level imports among dynamoe modules have no cycle, that the model
library does not depend on the training/launch/eval layers or on distributed runtimes, and that
project code is only ever imported through ``dynamoe.``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = "dynamoe"


# --------------------------------------------------------------------------- the project's layout


def _load_pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_roots() -> dict[str, Path]:
    """``{dotted package: folder}`` for each entry of ``[tool.setuptools] package-dir``."""
    package_dir = _load_pyproject()["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in package_dir.items()}


def discover_modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under the mapped folders.

    A file belongs to the mapped package with the deepest folder that contains it (``kernels/``
    is ``dynamoe.kernels``, never ``dynamoe`` + something)."""
    roots = package_roots()
    modules: dict[str, Path] = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            owner = max(
                (p for p, f in roots.items() if path.is_relative_to(f)),
                key=lambda p: len(roots[p].parts),
            )
            if owner != package:
                continue
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            modules[".".join((package, *rel))] = path
    return modules


# --------------------------------------------------------------------------- collecting imports


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module (or ``module.name``) imported, absolute
    kind: str  # "module" | "function" | "type_checking"
    line: int
    text: str  # the statement as written, for messages
    names: tuple[str, ...] = ()  # for ``from X import a, b``: (a, b); target is X

    def candidates(self) -> tuple[str, ...]:
        """What this import may bind: ``X`` and, for ``from X import a``, ``X.a``."""
        return (self.target, *(f"{self.target}.{n}" for n in self.names if n != "*"))


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top-level package in {module}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, name] if name else base)


def collect_imports(module: str, source: str, is_package: bool, filename: str = "<src>") -> list[Import]:
    tree = ast.parse(source, filename=filename)
    found: list[Import] = []

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = "type_checking" if kind == "type_checking" else "function"
            for child in ast.iter_child_nodes(node):
                visit(child, inner)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "type_checking")
            for child in node.orelse:
                visit(child, kind)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, kind, node.lineno, ast.unparse(node)))
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve_relative(module, is_package, node.level, node.module)
            else:
                target = node.module or ""
            names = tuple(a.name for a in node.names)
            found.append(Import(module, target, kind, node.lineno, ast.unparse(node), names))
            return
        for child in ast.iter_child_nodes(node):
            visit(child, kind)

    visit(tree, "module")
    return found


def collect_attribute_uses(module: str, source: str, dotted: str) -> list[Import]:
    """``torch.distributed.x(...)`` after a plain ``import torch``: an import in all but name."""
    head, attr = dotted.rsplit(".", 1)
    uses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name):
            if node.value.id == head:
                uses.append(Import(module, dotted, "attribute", node.lineno, ast.unparse(node)))
    return uses


# --------------------------------------------------------------------------- the graph


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def edge_targets(imp: Import, known: set[str]) -> list[str]:
    """The dynamoe modules an import loads: ``from dynamoe.x import y`` is ``dynamoe.x.y`` when that
    is a module, else ``dynamoe.x`` (a package means its ``__init__``); no implicit parent edges."""
    if not _matches(imp.target, TOP):
        return []
    out = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known]
    if len(out) < len(imp.names) or not imp.names:  # some names are attributes of the package itself
        name = imp.target
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def build_graph(imports: list[Import], known: set[str], kinds=("module",)) -> dict[str, dict[str, Import]]:
    """``{importer: {imported: the first import statement making that edge}}``, self-loops dropped."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in known}
    for imp in imports:
        if imp.kind not in kinds:
            continue
        for target in edge_targets(imp, known):
            if target != imp.module:
                graph.setdefault(imp.module, {}).setdefault(target, imp)
    return graph


def find_cycles(graph: dict[str, dict[str, object]]) -> list[list[str]]:
    """One concrete cycle (``[a, b, ..., a]``) per strongly connected component of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan, iterative over edges to stay clear of deep recursion
        nonlocal counter
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:
        members = set(comp)
        start = min(comp)
        # Shortest path back to start inside the component (BFS), as the readable witness.
        prev: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        end = None
        while frontier and end is None:
            nxt = []
            for u in frontier:
                for w in sorted(graph.get(u, ())):
                    if w == start:
                        end = u
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = u
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return sorted(cycles)


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    hops = []
    for a, b in zip(cycle, cycle[1:]):
        imp = graph[a][b]
        hops.append(f"    {a} -> {b}   (line {imp.line}: {imp.text})")
    return "import cycle at module level:\n" + "\n".join(hops)


# --------------------------------------------------------------------------- rules


MODEL_LIBRARY = (
    "dynamoe.layers",
    "dynamoe.models",
    "dynamoe.depth",
    "dynamoe.exits",
    "dynamoe.compute",
    "dynamoe.kernels",
)
RUNTIME_ONLY = ("deepspeed", "ray", "dynamoe.training", "dynamoe.launch", "dynamoe.evals")
TORCH_DISTRIBUTED_ALLOWED = ("dynamoe.layers.expert_parallel",)
RAY_ALLOWED = ("dynamoe.launch", "dynamoe.evals")
OLD_TOP_LEVEL_NAMES = ("moe", "kernels", "launch", "evals", "configs")


@dataclass(frozen=True)
class Violation:
    rule: str  # a short id: runtime-dependency | torch-distributed | ray | old-top-level-name
    detail: str  # the rule in words
    imp: Import

    def __str__(self) -> str:
        i = self.imp
        return f"{i.module} (line {i.line}, {i.kind}): `{i.text}` breaks rule [{self.rule}]: {self.detail}"


def _in(module: str, prefixes) -> bool:
    return any(_matches(module, p) for p in prefixes)


def check_rules(imports: list[Import]) -> list[Violation]:
    out: list[Violation] = []
    for imp in imports:
        names = imp.candidates()
        if _in(imp.module, MODEL_LIBRARY):
            for banned in RUNTIME_ONLY:
                if any(_matches(n, banned) for n in names):
                    detail = f"the model library ({', '.join(MODEL_LIBRARY)}) must not import {banned}"
                    out.append(Violation("runtime-dependency", detail, imp))
            if any(_matches(n, "torch.distributed") for n in names) and not _in(imp.module, TORCH_DISTRIBUTED_ALLOWED):
                detail = f"in the model library only {', '.join(TORCH_DISTRIBUTED_ALLOWED)} may use torch.distributed"
                out.append(Violation("torch-distributed", detail, imp))
        if any(_matches(n, "ray") for n in names) and not _in(imp.module, RAY_ALLOWED):
            out.append(Violation("ray", f"only {' and '.join(RAY_ALLOWED)} may import ray", imp))
        top = imp.target.split(".")[0]
        if imp.kind != "attribute" and top in OLD_TOP_LEVEL_NAMES:
            detail = f"project code is imported only as dynamoe.*; `{top}` is not one of this project's import names"
            out.append(Violation("old-top-level-name", detail, imp))
    return out


# --------------------------------------------------------------------------- the real tree


@pytest.fixture(scope="module")
def tree():
    modules = discover_modules()
    imports: list[Import] = []
    errors = []
    for name, path in sorted(modules.items()):
        source = path.read_text()
        try:
            imports += collect_imports(name, source, path.name == "__init__.py", str(path))
        except (SyntaxError, ValueError) as err:
            errors.append(f"{path.relative_to(ROOT)}: {err}")
            continue
        imports += collect_attribute_uses(name, source, "torch.distributed")
    assert not errors, "cannot read:\n" + "\n".join(errors)
    return modules, imports


def test_layout_is_found(tree):
    modules, imports = tree
    for expected in ("dynamoe", "dynamoe.config", "dynamoe.layers.router", "dynamoe.kernels", "dynamoe.launch.cli"):
        assert expected in modules, sorted(modules)
    assert modules["dynamoe.kernels.triton.dispatch"] == ROOT / "kernels" / "triton" / "dispatch.py"
    assert modules["dynamoe"] == ROOT / "moe" / "__init__.py"
    assert any(i.target.startswith("dynamoe.") for i in imports)


def test_no_module_level_import_cycle(tree):
    modules, imports = tree
    graph = build_graph(imports, set(modules))
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(describe_cycle(c, graph) for c in cycles)


def test_layering_and_runtime_dependencies(tree):
    _, imports = tree
    violations = [v for v in check_rules(imports) if v.rule != "old-top-level-name"]
    assert not violations, "\n".join(map(str, violations))


def test_project_code_is_imported_only_through_dynamoe(tree):
    _, imports = tree
    violations = [v for v in check_rules(imports) if v.rule == "old-top-level-name"]
    assert not violations, "\n".join(map(str, violations))


def test_ray_is_imported_only_by_launch_and_evals(tree):
    _, imports = tree
    ray_users = {i.module for i in imports if any(_matches(n, "ray") for n in i.candidates())}
    assert ray_users, "expected dynamoe.launch.ray_launcher to import ray; did the scanner break?"
    assert all(_in(m, RAY_ALLOWED) for m in ray_users), sorted(ray_users)


# --------------------------------------------------------------------------- self-tests


def _synthetic(sources: dict[str, str]) -> tuple[set[str], list[Import]]:
    """``{module: source}``; a name with ``/__init__`` suffix is a package."""
    known, imports = set(), []
    for key, src in sources.items():
        is_package = key.endswith("/__init__")
        name = key.removesuffix("/__init__")
        known.add(name)
        imports += collect_imports(name, src, is_package)
        imports += collect_attribute_uses(name, src, "torch.distributed")
    return known, imports


def test_self_cycle_finder_sees_a_cycle_and_ignores_lazy_and_type_only_imports():
    known, imports = _synthetic(
        {
            "dynamoe/__init__": "",
            "dynamoe.models/__init__": "from dynamoe.models.a import A\nfrom . import b\n",
            "dynamoe.models.a": "from dynamoe.models import b\nclass A: pass\n",
            "dynamoe.models.b": "import torch\nfrom .c import C\n",
            "dynamoe.models.c": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from dynamoe.models.a import A\n"
                "def f():\n    from dynamoe.models.a import A\n    return A\n"
                "try:\n    from ..models import a as _a\nexcept ImportError:\n    pass\n"
                "C = 1\n"
            ),
        }
    )
    graph = build_graph(imports, known)
    assert graph["dynamoe.models.a"] == {"dynamoe.models.b": graph["dynamoe.models.a"]["dynamoe.models.b"]}
    assert "dynamoe.models.c" in graph["dynamoe.models.b"]  # relative import resolved
    assert "dynamoe.models" not in graph["dynamoe.models.a"]  # `from pkg import submodule` is an edge to the submodule
    assert find_cycles(graph) == [["dynamoe.models.a", "dynamoe.models.b", "dynamoe.models.c", "dynamoe.models.a"]]
    message = describe_cycle(find_cycles(graph)[0], graph)
    assert "dynamoe.models.c -> dynamoe.models.a" in message and "line 8" in message

    # Without the module-level `try: from ..models import a` the only way back is lazy or type-only.
    known, imports = _synthetic(
        {
            "dynamoe.models/__init__": "",
            "dynamoe.models.a": "from dynamoe.models import b\n",
            "dynamoe.models.b": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from dynamoe.models.a import A\n"
                "def f():\n    from dynamoe.models.a import A\n"
            ),
        }
    )
    assert find_cycles(build_graph(imports, known)) == []
    assert find_cycles(build_graph(imports, known, kinds=("module", "function"))) != []


def test_self_package_init_reexports_are_not_cycles_but_real_ones_are():
    # The package re-exports its submodule; the submodule imports a sibling, not the package.
    known, imports = _synthetic(
        {
            "dynamoe.layers/__init__": "from dynamoe.layers.router import Router\n",
            "dynamoe.layers.router": "from dynamoe.layers.stats import S\n",
            "dynamoe.layers.stats": "S = 1\n",
        }
    )
    assert find_cycles(build_graph(imports, known)) == []
    # ... but importing a name from the package itself (its __init__) is an edge to the __init__.
    known, imports = _synthetic(
        {
            "dynamoe.layers/__init__": "from dynamoe.layers.router import Router\nS = 1\n",
            "dynamoe.layers.router": "from dynamoe.layers import S\n",
        }
    )
    assert find_cycles(build_graph(imports, known)) == [["dynamoe.layers", "dynamoe.layers.router", "dynamoe.layers"]]


def test_self_rule_checker_flags_each_rule():
    _, imports = _synthetic(
        {
            "dynamoe.layers.moe_layer": "def f():\n    import deepspeed\n",
            "dynamoe.kernels.grouped_gemm": "from dynamoe.training.trainer import Trainer\n",
            "dynamoe.models.cnn": "from dynamoe import evals\n",
            "dynamoe.depth.halting": "import torch.distributed as dist\n",
            "dynamoe.exits.heads": "import torch\ndef f():\n    return torch.distributed.get_rank()\n",
            "dynamoe.compute.flops": "from torch import distributed\n",
            "dynamoe.layers.expert_parallel": "import torch.distributed as dist\n",  # allowed
            "dynamoe.training.trainer": "import ray\nimport torch.distributed\nimport deepspeed\n",
            "dynamoe.launch.ray_launcher": "import ray.train\n",  # allowed
            "dynamoe.evals.report": "def f():\n    from ray import train\n",  # allowed
            "dynamoe.config": "from moe.layers import router\nimport kernels\nfrom launch.cli import main\n",
        }
    )
    violations = check_rules(imports)
    found = {(v.rule, v.imp.module) for v in violations}
    assert ("runtime-dependency", "dynamoe.layers.moe_layer") in found  # function-level counts too
    assert ("runtime-dependency", "dynamoe.kernels.grouped_gemm") in found
    assert ("runtime-dependency", "dynamoe.models.cnn") in found  # `from dynamoe import evals`
    assert {m for r, m in found if r == "torch-distributed"} == {
        "dynamoe.depth.halting",
        "dynamoe.exits.heads",  # attribute use after `import torch`
        "dynamoe.compute.flops",  # `from torch import distributed`
    }
    assert {m for r, m in found if r == "ray"} == {"dynamoe.training.trainer"}
    old_names = [v.imp.target for v in violations if v.rule == "old-top-level-name"]
    assert old_names == ["moe.layers", "kernels", "launch.cli"]
    # dynamoe.training is not the model library: its deepspeed and torch.distributed are fine.
    assert not any(v.imp.module == "dynamoe.training.trainer" and v.rule != "ray" for v in violations)
    allowed = ("dynamoe.layers.expert_parallel", "dynamoe.launch.ray_launcher", "dynamoe.evals.report")
    assert not any(v.imp.module in allowed for v in violations)
    message = str(next(v for v in violations if v.imp.module == "dynamoe.layers.moe_layer"))
    assert message.startswith("dynamoe.layers.moe_layer (line 2, function): `import deepspeed` breaks rule [runtime-")


def test_self_relative_import_resolution():
    assert _resolve_relative("dynamoe.layers.router", False, 1, "stats") == "dynamoe.layers.stats"
    assert _resolve_relative("dynamoe.layers", True, 1, "router") == "dynamoe.layers.router"
    assert _resolve_relative("dynamoe.kernels.triton.dispatch", False, 2, None) == "dynamoe.kernels"
    assert _resolve_relative("dynamoe.kernels.triton", True, 2, "routing") == "dynamoe.kernels.routing"
    with pytest.raises(ValueError):
        _resolve_relative("dynamoe.config", False, 2, "x")


if __name__ == "__main__":  # a quick report: python tests/test_import_graph.py
    mods = discover_modules()
    imps = []
    for n, p in mods.items():
        s = p.read_text()
        imps += collect_imports(n, s, p.name == "__init__.py") + collect_attribute_uses(n, s, "torch.distributed")
    g = build_graph(imps, set(mods))
    for c in find_cycles(g):
        print(describe_cycle(c, g))
    for c in find_cycles(build_graph(imps, set(mods), kinds=("module", "function"))):
        print("(counting function-level imports too)", " -> ".join(c))
    for v in check_rules(imps):
        print(v)
    sys.exit(0)
