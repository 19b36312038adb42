"""The package layers of docs/design.md, read from the source: every import (at the top of a module or inside a
function) points to the same layer or below, and there is no import cycle between modules or between packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "alignflow"

# docs/design.md, "Layers": a module may import its own layer and the ones below
LAYERS = {
    "config": 0,
    "batch": 0,
    "__init__": 0,
    "algorithms": 1,
    "data": 1,
    "models": 1,
    "sandbox": 1,
    "rollout": 2,
    "rewards": 2,
    "distributed": 2,
    "envs": 2,
    "tasks": 2,
    "trainers": 3,
    "recipes": 4,
    "eval": 4,
    "demo": 4,
    "cli": 5,
}
# Upward imports allowed for now, as (importer, imported) module pairs: none are left. Keep it empty: move the
# imported piece down a layer instead (the test fails on a listed pair that is gone too, so it cannot go stale).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("alignflow",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict) -> list[str]:
    """The alignflow modules an import statement loads (``from pkg import mod`` names the module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")[: len(module.split(".")) - (path.name != "__init__.py")]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("alignflow"):
            out.append(name)
    return out


def import_edges() -> set[tuple[str, str]]:
    """(importer, imported) for every import of an alignflow module, anywhere in the file."""
    modules, edges = _modules(), set()
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= {(module, t) for t in _targets(module, path, node, modules) if t != module}
    return edges


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_layer():
    assert {package(m) for m in _modules()} <= set(LAYERS), "add the new package to LAYERS and docs/design.md"


def test_imports_point_down_only():
    upward = {(a, b) for a, b in import_edges() if LAYERS[package(b)] > LAYERS[package(a)]}
    assert upward - KNOWN_UPWARD == set(), "upward imports: move the imported piece down a layer"
    assert KNOWN_UPWARD - upward == set(), "these upward imports are gone: delete them from KNOWN_UPWARD"


def test_no_import_cycles_between_modules_or_packages():
    edges = import_edges() - KNOWN_UPWARD
    assert cycles(edges) == []
    for loop in cycles({(package(a), package(b)) for a, b in edges if package(a) != package(b)}):
        inside = sorted((a, b) for a, b in edges if package(a) != package(b) and {package(a), package(b)} <= set(loop))
        raise AssertionError(f"packages {loop} import each other; the imports between them: {inside}")


def test_the_checker_sees_upward_imports_and_cycles():
    """The checks themselves: a function-level import is an edge, and a two-module loop is a cycle."""
    tree = ast.parse("def f():\n    from alignflow.trainers import loop\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    got = _targets("alignflow.models.x", ROOT / "models" / "x.py", node, _modules())
    assert got == ["alignflow.trainers.loop"] and LAYERS[package(got[0])] > LAYERS["models"]
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
