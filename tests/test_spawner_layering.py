"""Imports inside ``services/`` run one way: no module imports itself back through others.

The graph is read from the source with :mod:`ast`, not by importing anything: every
import statement at module level (including those under ``if TYPE_CHECKING:`` or
``try:``, which still tie two modules together) that names a module of ``services``.
``from pkg import name`` counts as an import of ``pkg.name`` when that is a module,
else of ``pkg``.  Imports inside functions are left out: they are how a module
loads something heavy late, and they do not run at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = "services"


def _modules(root: Path, top: str) -> dict[str, Path]:
    """Every module under *root*/*top*, by dotted name (a package by its ``__init__``)."""
    mods: dict[str, Path] = {}
    for path in sorted((root / top).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module body, descending into if/try/with but not into defs or classes."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            found += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            found += _module_level(node.body) + _module_level(node.orelse) + _module_level(node.finalbody)
            for handler in node.handlers:
                found += _module_level(handler.body)
        elif isinstance(node, ast.With):
            found += _module_level(node.body)
    return found


def import_graph(root: Path = ROOT, top: str = TOP) -> dict[str, set[str]]:
    """module -> the modules of *top* it imports at module level."""
    mods = _modules(root, top)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                           for alias in node.names]
            for target in targets:
                # the deepest module of ours the dotted name reaches
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_in_services() -> None:
    graph = import_graph()
    assert "services.spawner.procs" in graph or "services.spawner.procs.table" in graph, "the graph read nothing"
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    # the check itself: two modules that import each other (one only for type checking) are a cycle
    pkg = tmp_path / "svc" / "part"
    pkg.mkdir(parents=True)
    (tmp_path / "svc" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("def late():\n    from .a import x\n")
    graph = import_graph(tmp_path, "svc")
    assert graph["svc.part.b"] == {"svc.part.a"} and graph["svc.part.c"] == set()
    assert find_cycles(graph) == [["svc.part.a", "svc.part.b"]]
