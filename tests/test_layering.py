"""Which way imports run: fabric_ext needs nothing from fabric, no import cycles, tests import no tests.

The layering (issue 13): ``fabric_ext`` (the Cython codecs and the arena) is the bottom
layer and loads without the ``fabric`` package; ``fabric`` and ``services`` build on it
and have no import cycle among their modules; test modules share code through
``tests/_*.py`` helpers and ``conftest.py``, never by importing another ``test_*`` module.

Imports are read with :mod:`ast`.  Only module-level imports count (also those inside
``try``/``if`` at module level, but not ``if TYPE_CHECKING:``): an import inside a
function is lazy by design and runs only when called, so it cannot take part in an
import-time cycle.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._nats import SERVER_FIXTURES, env_with_repo, start_nats

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# Module-level import edges that are allowed to close a cycle today, each with the issue
# that removes it; empty now: the test holds the tree to no cycles at all.
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()


# -- reading the import graph --------------------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] == "services":  # installed as fabric.services (setup.py's package_dir)
        parts.insert(0, "fabric")
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level_imports(block)
            for handler in node.handlers:
                yield from _module_level_imports(handler.body)


def _imported_names(module: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    """Every module *module* imports at module level (``from pkg import sub`` counts as pkg.sub if it is one)."""
    out: set[str] = set()
    for node in _module_level_imports(tree.body):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        for alias in node.names:
            sub = f"{pkg}.{alias.name}"
            out.add(sub if sub in known else pkg)
    return out


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of *packages* it imports at module level."""
    files = {_module_name(p, root): p for top in packages for p in sorted((root / top).rglob("*.py"))}
    known = set(files)
    return {
        mod: {t for t in _imported_names(mod, path.name == "__init__.py", ast.parse(path.read_text()), known)
              if t in known and t != mod}
        for mod, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# -- fabric_ext is the bottom layer --------------------------------------------------------------------------


def test_extensions_load_without_the_fabric_package() -> None:
    """Importing every extension in a fresh interpreter loads no ``fabric`` or ``fabric.*`` module."""
    code = (
        "import json, sys\n"
        "from fabric_ext import arena, errors, ring, spawn, wire\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'fabric' or m.startswith('fabric.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=env_with_repo())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_a_warm_worker_starts_without_nats_msgspec_or_the_client() -> None:
    """The worker module lives under ``fabric.services``, so ``fabric/__init__`` runs first: it must stay light.

    A pool starts a worker per core and again after every crash; nats-py, msgspec, numpy
    and the client would add tens of milliseconds to each start for nothing a worker uses.
    """
    loaded, printed = heavy_modules_after(
        "import runpy\n"
        "sys.argv = ['worker', '--help']\n"
        "try:\n"
        "    runpy.run_module('fabric.services.spawner.worker', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n")
    assert "usage: python -m fabric.services.spawner.worker" in printed  # it did run
    assert loaded == []


def heavy_modules_after(code: str) -> tuple[list[str], str]:
    """Run *code* in a fresh interpreter (outside the repository); the heavy modules it loaded, and what it printed.

    Heavy: nats-py, msgspec, numpy, and fabric's client, schema and service kit.
    """
    probe = (
        "import json, sys\n" + code
        + "heavy = ('nats', 'msgspec', 'numpy')\n"
        "ours = ('fabric.client', 'fabric.schema', 'fabric.service')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "                        or m in ours or m.startswith(tuple(o + '.' for o in ours)))))\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=60,
                         cwd="/", env=env_with_repo())
    assert out.returncode == 0, out.stderr
    *printed, last = out.stdout.splitlines()
    return json.loads(last), "\n".join(printed)


_FABRIC_IMPORT = re.compile(r"^\s*(from\s+fabric(\.\w+)*\s+c?import\b|c?import\s+fabric(\.\w+)*\s*(,|$|\s+as\b))")


def test_extension_sources_name_no_fabric_module() -> None:
    """No .pyx/.pxd/.pyi/.py under fabric_ext imports from fabric (the stubs included, for mypy's sake)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "fabric_ext").iterdir())
        if path.suffix in {".pyx", ".pxd", ".pyi", ".py"}
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _FABRIC_IMPORT.match(line)
    ]
    assert offenders == []


def test_the_errors_the_extensions_raise_are_fabric_errors() -> None:
    """fabric.errors re-exports the extension's classes themselves, so ``except fabric.errors.X`` catches them."""
    import fabric.errors
    import fabric_ext.errors
    from fabric_ext import wire

    for name in fabric_ext.errors.__all__:
        assert getattr(fabric.errors, name) is getattr(fabric_ext.errors, name), name
    assert issubclass(wire.V1InvalidFrame, fabric.errors.InvalidFrame)
    with pytest.raises(fabric.errors.InvalidFrame):
        wire.decode(b"FBF1")


# -- no import cycles --------------------------------------------------------------------------------------


def test_no_import_cycle_in_fabric_services_or_fabric_ext() -> None:
    graph = import_graph(ROOT, ("fabric", "fabric_ext", "services"))
    assert "fabric.errors" in graph and "fabric_ext.errors" in graph["fabric.errors"]  # the graph is read
    pruned = {m: {t for t in ts if (m, t) not in ALLOWED_CYCLE_EDGES} for m, ts in graph.items()}
    found = cycles(pruned)
    assert found == [], "\n".join(
        " <-> ".join(comp) + "\n" + "\n".join(f"    {m} -> {sorted(pruned[m] & set(comp))}" for m in comp)
        for comp in found)


def test_services_are_imported_by_their_installed_name_only() -> None:
    """``services/`` installs as ``fabric.services``: the bare name would load every module twice.

    From the repository root ``import services.spawner`` would still work (the folder is on
    sys.path), giving a second copy of each module beside ``fabric.services.spawner``, with
    its own classes and globals; installed, it would fail.  Nothing may use it.
    """
    graph = import_graph(ROOT, ("fabric", "fabric_ext", "services"))
    assert "fabric.services.spawner.service" in graph  # services/ is read under its installed name
    offences = []
    for top in ("fabric", "services", "tests", "bench", "examples"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                offences += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "services"]
    assert offences == []


def test_fabric_ext_imports_nothing_from_fabric_in_the_graph() -> None:
    graph = import_graph(ROOT, ("fabric", "fabric_ext"))
    assert {(m, t) for m, ts in graph.items() if m.startswith("fabric_ext")
            for t in ts if not t.startswith("fabric_ext")} == set()


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    """The checker itself: a two-module cycle through a relative import is found, a lazy import is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("try:\n    from pkg.a import thing\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n")
    (pkg / "e.py").write_text("from pkg import d\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.c"] == set() and graph["pkg.d"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


# -- tests share helpers, not test modules -------------------------------------------------------------------


def _test_module_imports(path: Path) -> list[str]:
    """The ``test_*`` modules *path* imports (anywhere in it: a test module is never a library)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = [mod] + [f"{mod}.{alias.name}" if mod else alias.name for alias in node.names]
        else:
            continue
        bad += [n for n in names if n.split(".")[-1].startswith("test_")]
    return bad


def test_no_test_module_imports_another_test_module() -> None:
    tests_dir = ROOT / "tests"
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted(tests_dir.rglob("*.py"))
        if "node_modules" not in path.parts
        if (found := _test_module_imports(path))
    }
    assert offenders == {}


def test_the_test_import_check_catches_one(tmp_path: Path) -> None:
    path = tmp_path / "test_x.py"
    path.write_text("from tests.test_cores import build\nimport tests._cores\nfrom . import test_y\n")
    assert _test_module_imports(path) == ["tests.test_cores", "test_y"]


# -- `pytest -m unit` stays server-free ----------------------------------------------------------------------


def test_a_unit_test_cannot_start_a_nats_server(tmp_path: Path) -> None:
    """This module is marked unit, so conftest makes start_nats refuse (a server here would be a mislabel)."""
    with pytest.raises(RuntimeError, match="is marked unit but starts a nats-server"):
        start_nats(tmp_path / "nats")
    assert not (tmp_path / "nats").exists()


def test_the_server_fixtures_are_conftests() -> None:
    """Every name the unit check refuses is a fixture conftest.py defines (a renamed one would slip through)."""
    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and any("fixture" in ast.unparse(d) for d in node.decorator_list)}
    assert SERVER_FIXTURES <= defined


# -- the contract has one home: fabric.protocol ---------------------------------------------------------------

#: what a module of fabric.protocol may import: the standard library, the extensions, fabric.errors (light)
_PROTOCOL_MAY_IMPORT = ("fabric_ext", "fabric.errors", "fabric.protocol")


def _protocol_offences(root: Path) -> list[str]:
    """Imports of fabric/protocol/*.py (anywhere in a module, lazy ones too) that are not light."""
    graph_root = root / "fabric" / "protocol"
    offences = []
    for path in sorted(graph_root.rglob("*.py")):
        module = _module_name(path, root)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    names = [".".join(base + ([node.module] if node.module else []))]
                else:
                    names = [node.module or ""]
            else:
                continue
            offences += [f"{path.relative_to(root)}: {n}" for n in names
                         if n.split(".")[0] not in sys.stdlib_module_names
                         and not any(n == ok or n.startswith(ok + ".") for ok in _PROTOCOL_MAY_IMPORT)]
    return offences


def test_the_protocol_package_imports_only_light_modules() -> None:
    """A warm worker imports fabric.protocol: its modules may use the stdlib, fabric_ext and fabric.errors only."""
    assert (ROOT / "fabric" / "protocol" / "reader.py").exists()  # the package is read
    assert _protocol_offences(ROOT) == []
    loaded, _ = heavy_modules_after(
        "import importlib, pkgutil\n"
        "import fabric.protocol as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module('fabric.protocol.' + m.name)\n")
    assert loaded == []


def test_the_protocol_import_check_catches_a_heavy_import(tmp_path: Path) -> None:
    pkg = tmp_path / "fabric" / "protocol"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ok.py").write_text("import struct\nfrom ..errors import InvalidFrame\nfrom .reader import Reader\n"
                               "from fabric_ext import wire\n")
    (pkg / "bad.py").write_text("def f():\n    import msgspec\nfrom ..schema import JSON\n")
    assert sorted(_protocol_offences(tmp_path)) == ["fabric/protocol/bad.py: fabric.schema",
                                                    "fabric/protocol/bad.py: msgspec"]


def _contract_names() -> tuple[set[str], re.Pattern[str]]:
    """The names only fabric.protocol may spell: exact strings, and a pattern for subject literals."""
    from fabric.protocol import clframes, cores, env, headers, jobframes, wire

    exact = set(headers.ALL_HEADERS) | set(cores.BUILTIN_CORES)
    exact |= {env.PROC_ENV, env.CORE_ID_ENV, env.MARKER_ENV, env.STAGING_ENV}
    exact |= {m.decode() for m in (wire.MAGIC, jobframes.JOB_BATCH_MAGIC, jobframes.JOB_RESULTS_MAGIC,
                                   clframes.JOB_MAGIC, clframes.RESULT_MAGIC)}  # the frame magics
    return exact, re.compile(r"^(\$SRV(\.|$)|fabric\.(mem|proc|core|nodes|telemetry)(\.|$))")


def _docstring_ids(tree: ast.Module) -> set[int]:
    """The string statements of *tree* (docstrings and the like): prose, not spellings."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def contract_spellings(root: Path, tops: tuple[str, ...] = ("fabric", "services")) -> list[str]:
    """Every string or bytes literal outside fabric/protocol that spells a contract name (docstrings aside)."""
    exact, subject = _contract_names()
    found = []
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            if path.relative_to(root).parts[:2] == ("fabric", "protocol"):
                continue
            tree = ast.parse(path.read_text())
            prose = _docstring_ids(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Constant) or id(node) in prose:
                    continue
                value = node.value
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                if not isinstance(value, str):
                    continue
                if value in exact or value.rstrip("=") in exact or subject.match(value):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {value!r}")
            found += [f"{path.relative_to(root)}:{a.lineno}: in a subject {a.value!r}" for a in _subject_literals(tree)]
    return found


_SUBJECT_BUILDERS = {"cluster", "node_scoped", "cluster_endpoint", "node_endpoint"}


def _subject_literals(tree: ast.Module) -> list[ast.Constant]:
    """Areas and verbs spelled as strings in a subject builder (``cluster("mem", "alloc")``), not subjects' names.

    A name bound to ``functools.partial(<builder>, ...)`` (``ep = partial(self.node_endpoint, subjects.MEM)``)
    counts as a builder too.
    """
    def name(func: ast.expr) -> str:
        return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""

    def is_partial_of_builder(value: ast.expr) -> bool:
        return (isinstance(value, ast.Call) and name(value.func) == "partial" and bool(value.args)
                and name(value.args[0]) in _SUBJECT_BUILDERS)

    builders = set(_SUBJECT_BUILDERS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and is_partial_of_builder(node.value):
            builders |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if is_partial_of_builder(node):
            args = node.args[1:]
        elif name(node.func) in builders:
            args = node.args
        else:
            continue
        found += [a for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return found


def test_no_module_outside_the_protocol_package_spells_a_contract_name() -> None:
    """Header, core and marker names, frame magics, subjects, areas, verbs: spelled in fabric/protocol only."""
    assert contract_spellings(ROOT) == []


def test_the_spelling_check_finds_a_spelled_name(tmp_path: Path) -> None:
    (tmp_path / "fabric" / "protocol").mkdir(parents=True)
    (tmp_path / "fabric" / "protocol" / "headers.py").write_text('H = "Fabric-Exit-Code"\n')  # its home: fine
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "a.py").write_text(
        '"""Docstrings may say Fabric-Exit-Code and fabric.python."""\n'
        'H = {"Nats-Service-Error-Code": "1"}\n'
        'def f(node):\n    """fabric.mem.alloc in prose is fine."""\n'
        '    return f"fabric.telemetry.{node}", b"FABRIC_PROC_ID=", "fabric.opencl", "$SRV.PING"\n'
        'LOG, MAGIC = "fabric.client", b"FJB1"\n'
        'EP = [self.cluster_endpoint("mem", subjects.Mem.ALLOC), subjects.node_scoped(subjects.PROC, n, "wait"),\n'
        '      functools.partial(self.node_endpoint, "proc"), cluster(AREA, Nodes.LIST)]\n'
        'ep = functools.partial(self.node_endpoint, subjects.MEM)\n'
        'EPS = [ep("free", self.free), ep(subjects.Mem.READ, self.read), other("free")]\n')
    assert sorted(contract_spellings(tmp_path)) == [
        "services/a.py:10: in a subject 'free'", "services/a.py:2: 'Nats-Service-Error-Code'",
        "services/a.py:5: '$SRV.PING'",
        "services/a.py:5: 'FABRIC_PROC_ID='", "services/a.py:5: 'fabric.opencl'",
        "services/a.py:5: 'fabric.telemetry.'", "services/a.py:6: 'FJB1'",
        "services/a.py:7: in a subject 'mem'", "services/a.py:7: in a subject 'wait'",
        "services/a.py:8: in a subject 'proc'"]


def test_the_frame_codecs_are_imported_from_the_protocol_package() -> None:
    """fabric_ext.wire is found through fabric.protocol.wire: no module of fabric/ or services/ imports it directly."""
    def imports_wire(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "fabric_ext.wire" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (
                    node.module == "fabric_ext.wire"
                    or (node.module == "fabric_ext" and any(a.name == "wire" for a in node.names))):
                return True
        return False

    home = ROOT / "fabric" / "protocol" / "wire.py"
    assert imports_wire(home)  # the check sees the one import there is
    assert [str(p.relative_to(ROOT)) for top in ("fabric", "services") for p in sorted((ROOT / top).rglob("*.py"))
            if p != home and imports_wire(p)] == []


def test_the_worker_uses_the_contracts_core_names() -> None:
    """The warm worker and the pools take the built-in core names from fabric.protocol, not from a copy."""
    from fabric.protocol import cores
    from fabric.services.spawner import core_api, pools, worker_core

    assert not hasattr(core_api, "PYTHON_CORE") and not hasattr(core_api, "BUILTIN_CORES")
    assert worker_core.PYTHON_CORE is cores.PYTHON_CORE and worker_core.OPENCL_CORE is cores.OPENCL_CORE
    assert pools.BUILTIN_CORES is cores.BUILTIN_CORES
