"""The supervisor, the embedded nats-server launcher and the state directory.

Real processes throughout: a real nats-server from its generated config, children
that crash, ignore SIGTERM or live a while and exit (small modules written to the
test's directory), nats-server killed with SIGKILL.  The supervisor runs in this
process with a logger that records its events, so the tests read exactly what it
would log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from fabric import launch
from fabric import nats_server as ns
from fabric import supervisor as sv
from fabric.state import FabricState, ProcessRecord, StateDir, pid_alive
from fabric.supervisor import Supervisor, SupervisorConfig


class Recorder:
    """Stands in for the structlog logger: keeps each event with its time."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def log(event: str, **kw: Any) -> None:
            self.events.append({"level": level, "event": event, "t": time.monotonic(), **kw})

        return log

    def named(self, event: str, child: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event and (child is None or e.get("child") == child)]


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def make_supervisor(tmp_path: Path, services: dict[str, str], **kw: Any) -> tuple[Supervisor, Recorder]:
    state = StateDir(tmp_path / "state")
    config = SupervisorConfig(
        state=state, node="test-node", services=services, host="127.0.0.1", port=ns.free_port("127.0.0.1"),
        nats_binary=ns.find_binary(), ready_timeout=kw.pop("ready_timeout", 10.0), grace=kw.pop("grace", 5.0),
    )
    log = Recorder()
    return Supervisor(config, logger=log, **kw), log


def run_until(sup: Supervisor, condition: Callable[[], bool], timeout: float = 10.0) -> int:
    """Run *sup*, stop it once *condition* holds (or at *timeout*), return its exit code."""

    async def main() -> int:
        task = asyncio.create_task(sup.run())
        deadline = time.monotonic() + timeout
        while not task.done() and not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sup.stop()
        return await task

    return asyncio.run(main())


@pytest.fixture
def modules_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on the children's PYTHONPATH for the test's own service modules."""
    d = tmp_path / "mods"
    d.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")]))
    return d


# -- the supervisor -------------------------------------------------------------------


def test_crashing_service_backs_off_then_start_fails(tmp_path: Path) -> None:
    failed: list[list[str]] = []
    # json.tool rejects the service arguments and exits 2 at once
    sup, log = make_supervisor(tmp_path, {"allocator": "json.tool"}, ready_timeout=2.0,
                               on_failed=lambda st, failing: failed.append(failing))
    t0 = time.monotonic()
    code = run_until(sup, lambda: False, timeout=15)
    assert code == 1
    assert 2.0 <= time.monotonic() - t0 < 8.0
    assert failed == [["allocator"]]
    delays = [e["delay_s"] for e in log.named("restarting child", "allocator")]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    exits = log.named("child exited", "allocator")
    assert exits and all(e["status"] == "exit code 2" for e in exits)
    # each restart really waited its delay
    restarted = log.named("child restarted", "allocator")
    for exited, back in zip(exits, restarted, strict=False):
        assert back["t"] - exited["t"] >= 0.09
    state = sup.state_dir.read()
    assert state is not None and state.phase == "failed" and "allocator" in state.error
    assert sup.nats is not None and sup.nats.proc is not None
    assert log.named("child stopped", "nats-server") and not pid_alive(sup.nats.proc.pid)


def test_backoff_resets_after_a_long_enough_life(tmp_path: Path, modules_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sv, "BACKOFF_RESET_AFTER_S", 0.2)
    write_module(modules_dir, "shortlived", "import time, sys\ntime.sleep(0.4)\nsys.exit(1)\n")
    sup, log = make_supervisor(tmp_path, {"shortlived": "shortlived"}, ready_timeout=30)
    run_until(sup, lambda: len(log.named("restarting child", "shortlived")) >= 3)
    assert [e["delay_s"] for e in log.named("restarting child", "shortlived")][:3] == [0.1, 0.1, 0.1]


def test_stop_sigkills_a_service_that_ignores_sigterm(tmp_path: Path, modules_dir: Path) -> None:
    write_module(modules_dir, "stubborn", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(600)
    """)
    sup, log = make_supervisor(tmp_path, {"stubborn": "stubborn"}, grace=0.3)
    log_file = sup.state_dir.log_file("stubborn")
    run_until(sup, lambda: log_file.exists() and "ignoring SIGTERM" in log_file.read_text())
    pid = log.named("child did not stop in time, killing it", "stubborn")
    assert len(pid) == 1 and pid[0]["grace_s"] == 0.3
    child = sup.services["stubborn"]
    assert child.proc is not None and child.proc.returncode == -signal.SIGKILL
    state = sup.state_dir.read()
    assert state is not None and state.phase == "stopped" and state.stopped_at
    # the stop order: services first, NATS last
    stopped = log.named("child stopped")
    assert [e["child"] for e in stopped] == ["stubborn", "nats-server"]


def test_no_services_is_ready_and_a_killed_nats_server_comes_back(tmp_path: Path) -> None:
    ready: list[tuple[str, str]] = []
    sup, log = make_supervisor(tmp_path, {}, on_ready=lambda st: ready.append((st.phase, st.nats_url)))
    port = sup.config.port
    seen: dict[str, int] = {}

    def scenario() -> bool:
        if not ready:
            return False
        assert sup.nats is not None and sup.nats.proc is not None
        if "first" not in seen:
            seen["first"] = sup.nats.proc.pid
            os.kill(seen["first"], signal.SIGKILL)
            return False
        pid = sup.nats.pid
        if pid is None or pid == seen["first"]:
            return False
        try:  # the new server listens on the same port, so clients reconnect
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        seen["second"] = pid
        return True

    assert run_until(sup, scenario) == 0
    assert ready == [("ready", f"nats://127.0.0.1:{port}")]
    assert "second" in seen
    assert log.named("child exited", "nats-server")[0]["status"] == "killed by SIGKILL"
    assert log.named("child restarted", "nats-server")
    state = sup.state_dir.read()
    assert state is not None and state.nats is not None and state.nats.restarts == 1
    assert not pid_alive(seen["second"])


def test_port_taken_while_starting_is_reported(tmp_path: Path) -> None:
    failed: list[tuple[str, list[str]]] = []
    sup, log = make_supervisor(tmp_path, {}, on_failed=lambda st, failing: failed.append((st.error, failing)))
    with socket.socket() as s:  # taken after `fabric up` checked it, before nats-server binds
        s.bind(("127.0.0.1", sup.config.port))
        s.listen()
        assert run_until(sup, lambda: False) == 1
    [(error, failing)] = failed
    assert "already in use" in error and "--nats-port 0" in error and failing == ["nats-server"]


def test_services_never_import_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fabric up` run in a source checkout: its fabric/ (unbuilt) must not shadow the one installed."""
    checkout = tmp_path / "checkout"
    (checkout / "fabric").mkdir(parents=True)
    (checkout / "fabric" / "__init__.py").write_text("raise ImportError('imported from the working directory')\n")
    # the service module is found through a *relative* PYTHONPATH entry, which must keep its meaning
    (checkout / "rel-mods").mkdir()
    write_module(checkout / "rel-mods", "where", """
        import json, os, sys, time
        import fabric
        state_dir = sys.argv[sys.argv.index("--state-dir") + 1]
        with open(os.path.join(state_dir, "where.json"), "w") as f:
            json.dump({"fabric": fabric.__file__, "cwd": os.getcwd(), "flags": sys.orig_argv}, f)
        time.sleep(60)
    """)
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["rel-mods", "", os.environ.get("PYTHONPATH", "")]))
    sup, log = make_supervisor(tmp_path, {"where": "where"})
    out = sup.state_dir.path / "where.json"
    run_until(sup, out.exists)
    seen = json.loads(out.read_text())
    assert Path(seen["fabric"]) == Path(sv.__file__).parent / "__init__.py"
    assert seen["cwd"] == str(sup.state_dir.path)
    assert ("-P" in seen["flags"]) == (sys.version_info >= (3, 11))


@pytest.mark.unit
def test_module_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = launch.package_root()
    assert (Path(root) / "fabric" / "launch.py").is_file()
    got = launch.module_launch("pkg.mod", ["--x", "1"], cwd="state", env={"PYTHONPATH": f"a{os.pathsep}{os.pathsep}/b",
                                                                         "KEEP": "1"})
    assert got.argv == [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "pkg.mod", "--x", "1"]
    assert got.cwd == str(tmp_path / "state")
    assert got.env["KEEP"] == "1"
    # relative entries made absolute, the empty one (the working directory) dropped, fabric's root first
    assert got.env["PYTHONPATH"].split(os.pathsep) == [root, str(tmp_path / "a"), "/b"]
    assert launch.module_launch("m", cwd=None, env={"PYTHONPATH": root}).env["PYTHONPATH"] == root
    assert launch.module_launch("m", cwd=None, python="/x/python3").argv[0] == "/x/python3"


@pytest.mark.unit
def test_service_modules_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sv.SERVICE_MODULES_ENV, raising=False)
    assert sv.service_modules() == sv.SERVICES
    monkeypatch.setenv(sv.SERVICE_MODULES_ENV, json.dumps({"allocator": "my.alloc", "extra": "my.extra"}))
    assert sv.service_modules() == {**sv.SERVICES, "allocator": "my.alloc", "extra": "my.extra"}
    for bad in ("{not json", '["allocator"]', '{"allocator": 1}'):
        monkeypatch.setenv(sv.SERVICE_MODULES_ENV, bad)
        with pytest.raises(ValueError, match=sv.SERVICE_MODULES_ENV):
            sv.service_modules()


# -- the nats-server launcher ------------------------------------------------------------


def test_generated_config_runs_a_real_server(tmp_path: Path) -> None:
    import subprocess

    import nats

    state = StateDir(tmp_path)
    port = ns.free_port("127.0.0.1")
    conf = ns.write_config(state, host="127.0.0.1", port=port, node="n1")
    proc = subprocess.Popen(ns.server_command(ns.find_binary(), conf), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    async def check() -> tuple[int, Any]:
        deadline = time.monotonic() + 10
        while True:
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        try:
            info = await nc.jetstream().account_info()
            return nc.max_payload, info
        finally:
            await nc.close()

    try:
        max_payload, account = asyncio.run(check())
    finally:
        proc.terminate()
        proc.wait(10)
    assert max_payload == ns.MAX_PAYLOAD == 8 * 1024 * 1024
    assert account is not None  # JetStream answers
    assert (state.nats_dir / "jetstream").is_dir()


@pytest.mark.unit
def test_find_binary() -> None:
    found = ns.find_binary()
    assert os.access(found, os.X_OK)
    assert ns.find_binary(found) == found
    with pytest.raises(ns.NatsServerNotFound, match="no such executable"):
        ns.find_binary("/nonexistent/nats-server")


@pytest.mark.unit
def test_ports() -> None:
    port = ns.free_port("127.0.0.1")
    ns.check_port("127.0.0.1", port)  # free: no error
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(ns.PortInUse) as info:
            ns.check_port("127.0.0.1", port)
    assert info.value.port == port


@pytest.mark.unit
@pytest.mark.parametrize(
    "host, url",
    [("127.0.0.1", "nats://127.0.0.1:4222"), ("0.0.0.0", "nats://127.0.0.1:4222"),
     ("10.1.2.3", "nats://10.1.2.3:4222"), ("::", "nats://[::1]:4222")],
)
def test_client_url(host: str, url: str) -> None:
    assert ns.client_url(host, 4222) == url


@pytest.mark.unit
def test_join_url_never_names_loopback() -> None:
    assert ns.join_url("10.1.2.3", 4222) == "nats://10.1.2.3:4222"
    for host in ("0.0.0.0", "127.0.0.1"):
        assert "127.0.0.1" not in ns.join_url(host, 4222)


# -- the state directory ---------------------------------------------------------------------


@pytest.mark.unit
def test_state_file_roundtrip_is_atomic(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    assert state.read() is None
    st = FabricState(state_dir=str(tmp_path), node="n", nats_url="nats://127.0.0.1:1", join_url="nats://h:1",
                     supervisor_pid=os.getpid(),
                     services={"allocator": ProcessRecord(name="allocator", pid=123, restarts=2)})
    state.write(st)
    assert state.read() == st
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    state.state_file.write_text("{garbage")
    assert state.read() is None


@pytest.mark.unit
def test_lock_is_exclusive_and_running_follows_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert not state.is_locked() and state.running() is None
    fd = state.acquire_lock()
    assert fd is not None
    try:
        assert state.acquire_lock() is None
        assert state.is_locked()
        state.write(FabricState(state_dir=str(tmp_path), node="n", nats_url="nats://x:1", join_url="nats://x:1",
                                supervisor_pid=os.getpid(),
                                supervisor_create_time=psutil.Process().create_time()))
        running = state.running()
        assert running is not None and running.supervisor_pid == os.getpid()
    finally:
        os.close(fd)
    assert not state.is_locked() and state.running() is None


@pytest.mark.unit
def test_stop_request_is_consumed(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    assert state.take_stop_request() is None
    state.request_stop(2.5)
    assert state.take_stop_request() == 2.5
    assert state.take_stop_request() is None


@pytest.mark.unit
def test_pid_alive_checks_the_create_time() -> None:
    me = psutil.Process()
    assert pid_alive(me.pid) and pid_alive(me.pid, me.create_time())
    assert not pid_alive(me.pid, me.create_time() - 100)  # a reused pid is not ours


# -- the CLI reaches the supervisor and the services only through public entry points ---------------------

_CONTROL_SIDE = ("cli.py", "cli_*.py", "control.py", "discovery.py", "supervisor.py", "state.py", "launch.py",
                 "nats_server.py")


def _boundary_offences(module: str, source: str) -> list[str]:
    """Imports in *source* (anywhere, lazy ones too) that reach into services or take another module's private name."""
    import ast

    def is_services(name: str, level: int = 0) -> bool:
        # the installed name (fabric.services), the repository folder's (services), or relative (.services)
        parts = name.split(".")
        return parts[0] == "services" or parts[:2] == ["fabric", "services"] if level == 0 else parts[0] == "services"

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{module}: import {a.name}" for a in node.names if is_services(a.name)]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if is_services(target, node.level):
                found.append(f"{module}: from {'.' * node.level}{target} import ...")
            found += [f"{module}: from {'.' * node.level}{target} import {a.name}" for a in node.names
                      if a.name.startswith("_") and target != "__future__"]
    return found


@pytest.mark.unit
def test_fabric_imports_no_service_and_the_cli_no_private_name() -> None:
    """fabric/ runs the services (by module name), never imports them; the CLI side takes no ``_private`` name.

    ``fabric down --purge`` runs ``python -m fabric.services.allocator.identity --release-memory`` (fabric.control),
    and the daemon code ``fabric up -d`` needs is fabric.control's public start_detached.
    """
    fabric_dir = Path(sv.__file__).parent
    services_imports = [o for path in sorted(fabric_dir.rglob("*.py"))
                        for o in _boundary_offences(path.name, path.read_text()) if "services" in o]
    assert services_imports == []
    control_side = sorted({p for pattern in _CONTROL_SIDE for p in fabric_dir.glob(pattern)})
    assert len(control_side) >= 10  # the globs match
    assert [o for path in control_side for o in _boundary_offences(path.name, path.read_text())] == []
    # the checker itself: what cli.py did before it was split
    old = ("def f():\n    from .supervisor import Supervisor, _rotate\n"
           "def g():\n    from fabric.services.allocator.identity import release_memory\n"
           "def h():\n    from .services.spawner import SpawnerService\n    import services.gpu_monitor\n")
    assert _boundary_offences("cli.py", old) == [
        "cli.py: from .supervisor import _rotate", "cli.py: from fabric.services.allocator.identity import ...",
        "cli.py: from .services.spawner import ...", "cli.py: import services.gpu_monitor"]


@pytest.mark.unit
def test_a_supervisor_that_dies_without_a_word_is_told_apart_from_a_silent_one() -> None:
    """EOF on the report pipe sets ``hung_up`` (the CLI then waits to reap it); silence only times out.

    The kernel closes a dead process's pipe a moment before it can be reaped, so
    ``exited()`` right after the EOF may still say no: the flag is what tells the two apart.
    """
    from fabric.control import DetachedSupervisor

    def child(then: Callable[[int], None]) -> DetachedSupervisor:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            then(w)
            os._exit(0)
        os.close(w)
        return DetachedSupervisor(pid, r)

    dead = child(lambda w: os.close(w))
    assert dead.wait_report(10.0) is None and dead.hung_up
    assert dead.wait(5.0)
    silent = child(lambda w: time.sleep(1.0))
    t0 = time.monotonic()
    assert silent.wait_report(0.3) is None and not silent.hung_up
    assert time.monotonic() - t0 >= 0.3
    assert silent.wait(5.0)
    ready = child(lambda w: os.write(w, b'{"ready": true}\n'))
    report = ready.wait_report(10.0)
    assert report is not None and report.ready and not ready.hung_up
    assert ready.wait(5.0)
