"""The ``fabric`` command: ``up``, ``down``, ``status``, ``nodes`` and ``req``.

``fabric up`` runs the supervisor (:mod:`fabric.supervisor`) in the foreground,
or with ``-d`` forks it into its own session and returns once every service
answers its ADR-32 ping.  ``fabric status`` asks ``$SRV.PING|INFO|STATS`` who is
there, and shows the nodes when a gpu-monitor runs; ``fabric nodes [--watch]``
shows the nodes' live telemetry (:mod:`fabric.cli_nodes`); ``fabric req`` is a small
stand-in for ``nats req`` that understands fabric's encodings and error headers.
Every command takes ``--state-dir``, so several fabrics run side by side.

Expected failures (port in use, a fabric already running, no responders) print
one clear line on stderr and exit 1; tracebacks are for bugs.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from .cli_nodes import NoMonitor, add_columns, fetch_nodes, nodes_table
from .schema import NodeRecord
from .state import FabricState, StateDir, default_state_dir, pid_alive

__all__ = ["app", "main"]

app = typer.Typer(
    name="fabric",
    help="A resource fabric over NATS: remote memory, processes, tasks and telemetry.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# soft wrap: a long path or URL stays on one line (and copy-pastable) when piped
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="FABRIC_STATE_DIR", show_default=False,
                 help="State directory of this fabric (pids, logs, NATS store). Default: the per-user state dir."),
]
NatsUrlOption = Annotated[
    str | None,
    typer.Option("--nats-url", envvar="FABRIC_NATS_URL", show_default=False,
                 help="NATS to use. Default: the one of the fabric running in --state-dir."),
]
ServicesOption = Annotated[
    str | None,
    typer.Option("--services", show_default=False, help="Comma-separated service names. Default: all known."),
]


def fail(message: str, hint: str | None = None) -> NoReturn:
    """Print an expected failure (no traceback) and exit 1."""
    err.print(f"[bold red]error:[/] {_escape(message)}")
    if hint:
        err.print(f"  {_escape(hint)}")
    raise typer.Exit(1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _state(state_dir: Path | None) -> StateDir:
    return StateDir(state_dir if state_dir is not None else default_state_dir())


def _state_flag(state: StateDir) -> str:
    """The ``--state-dir`` a follow-up command needs (empty for the default)."""
    return "" if state.path == StateDir(default_state_dir()).path else f" --state-dir {state.path}"


def _parse_services(raw: str | None) -> dict[str, str]:
    from .supervisor import service_modules

    try:
        known = service_modules()
    except ValueError as exc:
        fail(str(exc))
    if raw is None:
        return known
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        fail("--services is empty", f"known services: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        fail(f"unknown service(s): {', '.join(unknown)}", f"known services: {', '.join(known)}")
    return {n: known[n] for n in dict.fromkeys(names)}


def _nats_url(nats_url: str | None, state: StateDir) -> tuple[str, FabricState | None]:
    running = state.running()
    if nats_url:
        return nats_url, running
    if running is None:
        stale = state.read()
        if stale is not None and stale.phase in ("starting", "ready", "stopping"):
            fail(f"the supervisor of the fabric in {state.path} is gone (pid {stale.supervisor_pid})",
                 f"`fabric down{_state_flag(state)}` stops what it left running; then `fabric up` again")
        fail(f"no fabric is running in {state.path}",
             "start one with `fabric up`, pass --state-dir, or give the NATS to use with --nats-url")
    return running.nats_url, running


def _process_start_time() -> float:
    """Wall-clock time this process was created: "time to ready" counts from here."""
    try:
        # the process's start in clock ticks since boot, against the boot clock:
        # psutil's create_time adds the boot time rounded to a whole second
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        return float(psutil.Process().create_time())


# -- fabric up ------------------------------------------------------------------------


@app.command()
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d",
                                         help="Return once ready; the supervisor keeps running.")] = False,
    nats_url: Annotated[str | None, typer.Option(
        "--nats-url", envvar="FABRIC_NATS_URL", show_default=False,
        help="Join this NATS instead of starting an embedded nats-server.")] = None,
    nats_port: Annotated[int, typer.Option("--nats-port", min=0, max=65535,
                                           help="Port of the embedded nats-server (0: pick a free one).")] = 4222,
    host: Annotated[str, typer.Option("--host", help="Address the embedded nats-server binds to.")] = "127.0.0.1",
    state_dir: StateDirOption = None,
    services: ServicesOption = None,
    node: Annotated[str | None, typer.Option("--node", show_default=False,
                                                help="Node name. Default: the host name, sanitized.")] = None,
    nats_server: Annotated[str | None, typer.Option("--nats-server", show_default=False,
                                                       help="The nats-server binary to run.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1,
                                           help="Seconds to wait until every service answers.")] = 30.0,
    grace: Annotated[float, typer.Option("--grace", min=0.0,
                                         help="Seconds services get to drain when stopped by a signal.")] = 10.0,
) -> None:
    """Start NATS (unless --nats-url) and the services, supervised; foreground unless -d."""
    from . import nats_server as ns
    from .subjects import sanitize_node_name, valid_node_name
    from .supervisor import Supervisor, SupervisorConfig

    t0 = _process_start_time()
    state = _state(state_dir)
    modules = _parse_services(services)
    node = node if node is not None else sanitize_node_name(socket.gethostname().split(".")[0])
    if not valid_node_name(node):
        fail(f"invalid node name {node!r}", "use 1 to 64 letters, digits, '_' and '-'")
    if nats_url and not nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
        fail(f"invalid NATS URL {nats_url!r}", "expected nats://HOST:PORT")

    try:
        lock_fd = state.acquire_lock()
    except OSError as exc:
        fail(f"cannot use state directory {state.path}: {exc.strerror or exc}")
    if lock_fd is None:
        running = state.running()
        what = f" (supervisor pid {running.supervisor_pid}, NATS {running.nats_url})" if running else ""
        fail(f"a fabric is already running in {state.path}{what}",
             f"stop it with `fabric down{_state_flag(state)}`, or start another one with a different --state-dir")

    stale = state.read()
    if stale is not None:
        left = [f"{name} (pid {pid})" for name, (pid, created) in stale.pids().items() if pid_alive(pid, created)]
        if left:
            fail(f"the last fabric in {state.path} lost its supervisor but left processes running: {', '.join(left)}",
                 f"stop them with `fabric down{_state_flag(state)}`, then `fabric up` again")

    binary = None
    port = nats_port
    if not nats_url:
        try:
            binary = ns.find_binary(nats_server)
            if port == 0:
                port = ns.free_port(host)
            ns.check_port(host, port)
        except ns.NatsServerNotFound as exc:
            fail(str(exc))
        except ns.PortInUse as exc:
            fail(f"{exc}: is another NATS or fabric running?",
                 "pass --nats-port 0 to pick a free port, or --nats-url to join the NATS already there")
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", "check --host")

    config = SupervisorConfig(
        state=state, node=node, services=modules, external_nats_url=nats_url, host=host, port=port,
        nats_binary=binary, ready_timeout=timeout, grace=grace,
    )
    if detach:
        _up_detached(config, lock_fd, t0)
    else:
        sup = Supervisor(
            config,
            on_ready=lambda st: _print_ready(st, t0, state, detached=False),
            on_failed=lambda st, failing: _print_failure(st, failing, state),
            hangup_stops=True,
        )
        code = asyncio.run(sup.run())
        os.close(lock_fd)
        raise typer.Exit(code)


def _up_detached(config: Any, lock_fd: int, t0: float) -> NoReturn:
    """Fork the supervisor into its own session; return when it reports ready or failed."""
    from .supervisor import Supervisor, _rotate

    state: StateDir = config.state
    log_path = state.log_file("supervisor")
    _rotate(log_path)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 1
        try:
            os.close(r)
            os.setsid()
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a daemon: no terminal to hang up
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(null)
            os.close(log)

            def report(msg: dict[str, Any]) -> None:
                nonlocal w
                if w >= 0:
                    try:
                        os.write(w, json.dumps(msg).encode() + b"\n")
                        os.close(w)
                    except OSError:  # `fabric up` is gone (killed): nobody to tell
                        pass
                    w = -1

            sup = Supervisor(
                config,
                on_ready=lambda st: report({"ready": True}),
                on_failed=lambda st, failing: report({"ready": False, "failing": failing}),
            )
            code = asyncio.run(sup.run())
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)

    # `fabric up -d` itself: wait for the supervisor's word
    os.close(w)
    os.close(lock_fd)  # the supervisor holds the lock through its own copy
    try:
        reply = _read_report(r, config.ready_timeout + 5.0)
    except KeyboardInterrupt:
        err.print("interrupted: stopping the fabric")
        os.kill(pid, signal.SIGTERM)
        while not _child_exited(pid):
            time.sleep(0.02)
        raise typer.Exit(130) from None
    os.close(r)
    st = state.read()
    if reply is not None and reply.get("ready") and st is not None:
        _print_ready(st, t0, state, detached=True)
        raise typer.Exit(0)
    if reply is None:
        if _child_exited(pid):
            err.print("[bold red]error:[/] the supervisor exited before it was ready")
        else:
            err.print(f"[bold red]error:[/] no word from the supervisor within {config.ready_timeout + 5:.0f} s; "
                      "stopping it")
            os.kill(pid, signal.SIGTERM)
        _print_tail(state, "supervisor")
    else:
        assert st is not None
        _print_failure(st, reply.get("failing") or [], state)
    # the supervisor stops what it started; wait for it so nothing is left behind
    deadline = time.monotonic() + config.grace + 10.0
    while not _child_exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not _child_exited(pid):
        err.print(f"the supervisor (pid {pid}) did not stop in time: killing it")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # a supervisor that died (or was killed) leaves its children running: the state
    # file names them, and none may outlive a start that failed
    final = state.read()
    killed = _kill_leftovers(final) if final is not None else []
    if killed:
        err.print(f"killed leftover processes: {', '.join(killed)}")
    raise typer.Exit(1)


def _read_report(fd: int, timeout: float) -> dict[str, Any] | None:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:  # EOF: the supervisor died without a word
            return None
        buf += chunk
    try:
        msg = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _child_exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _print_ready(st: FabricState, t0: float, state: StateDir, *, detached: bool) -> None:
    from .nats_server import is_loopback

    seconds = (st.ready_at or time.time()) - t0
    services = ", ".join(st.services) or "none"
    out.print(f"[bold green]fabric ready[/] in {seconds:.2f} s — node [bold]{st.node}[/], services: {services}")
    where = f"embedded nats-server, pid {st.nats.pid}" if st.embedded_nats and st.nats else "joined"
    out.print(f"  NATS URL  {st.nats_url}  ({where})")
    out.print(f"  join      fabric up --nats-url {st.join_url}")
    if st.embedded_nats and st.host and is_loopback(st.host):
        out.print(f"            (nats-server listens on {st.host} only: "
                  "start with --host 0.0.0.0 so other machines can join)")
    out.print(f"  logs      {st.logs_dir}/")
    flag = _state_flag(state)
    if detached:
        out.print(f"  status    fabric status{flag}")
        out.print(f"  stop      fabric down{flag}")
    else:
        out.print("  stop      Ctrl-C, or fabric down" + flag)


def _print_failure(st: FabricState, failing: list[str], state: StateDir) -> None:
    err.print(f"[bold red]error:[/] fabric did not start: {_escape(st.error)}")
    for name in failing or ["supervisor"]:
        _print_tail(state, name)


def _print_tail(state: StateDir, name: str) -> None:
    tail = state.tail(name, 20)
    err.print(f"--- last lines of {state.log_file(name)} ---")
    err.print(_escape(tail) if tail else "(empty)")


# -- fabric down ------------------------------------------------------------------------


@app.command()
def down(
    state_dir: StateDirOption = None,
    grace: Annotated[float, typer.Option("--grace", min=0.0,
                                         help="Seconds services get to drain before SIGKILL.")] = 10.0,
    purge: Annotated[bool, typer.Option("--purge", help="Also release the allocator's shared memory: "
                                        "every block and handle is gone for good.")] = False,
) -> None:
    """Stop the fabric running in --state-dir: services drain, then NATS stops.

    Remote memory stays in shared memory, so the next `fabric up` with this state dir
    finds every block again; --purge releases it.
    """
    from .supervisor import NATS_STOP_TIMEOUT_S

    state = _state(state_dir)
    running = state.running()
    if running is None:
        stale = state.read()
        killed = _kill_leftovers(stale) if stale is not None else []
        if killed:
            out.print(f"no supervisor was running in {state.path}; killed leftover processes: {', '.join(killed)}")
        else:
            out.print(f"no fabric is running in {state.path}")
        if purge:
            _purge(state.path)
        raise typer.Exit(0)

    pid = running.supervisor_pid
    state.request_stop(grace)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace + NATS_STOP_TIMEOUT_S + 5.0
    while pid_alive(pid, running.supervisor_create_time) and time.monotonic() < deadline:
        time.sleep(0.02)
    forced = pid_alive(pid, running.supervisor_create_time)
    if forced:
        err.print(f"the supervisor (pid {pid}) did not stop in time: killing it")
        os.kill(pid, signal.SIGKILL)
    final = state.read()
    killed = _kill_leftovers(running) + (_kill_leftovers(final) if final is not None else [])
    if killed:
        err.print(f"killed leftover processes: {', '.join(sorted(set(killed)))}")
    names = ["nats-server"] if running.embedded_nats else []
    out.print(f"fabric stopped in {state.path} (node {running.node}; supervisor pid {pid}; "
              f"{', '.join(names + list(running.services)) or 'nothing else'})")
    if purge:
        _purge(state.path)


def _purge(path: Path) -> None:
    from services.allocator.identity import release_memory

    released = release_memory(Path(path))
    out.print(f"released the shared memory of {len(released)} allocator arena(s)"
              + (f": {', '.join(released)}" if released else ""))


def _kill_leftovers(st: FabricState, wait: float = 5.0) -> list[str]:
    """SIGKILL every process *st* lists that still runs, wait until they are gone; the names of those killed."""
    killed: dict[str, tuple[int, float]] = {}
    for name, (pid, created) in st.pids().items():
        if pid != os.getpid() and pid_alive(pid, created):
            try:
                os.kill(pid, signal.SIGKILL)
                killed[f"{name} (pid {pid})"] = (pid, created)
            except ProcessLookupError:
                pass
    # they are not our children: watch them go (a zombie counts as gone)
    deadline = time.monotonic() + wait
    while any(pid_alive(*p) for p in killed.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(killed)


# -- fabric status ------------------------------------------------------------------------


@app.command()
def status(
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
    services: ServicesOption = None,
    node: Annotated[str | None, typer.Option("--node", show_default=False,
                                                help="Node the expected services must run on.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    endpoints: Annotated[bool, typer.Option("--endpoints",
                                            help="One row per endpoint of each service instance.")] = False,
    wait: Annotated[float, typer.Option("--wait", min=0.05, help="Seconds to collect replies.")] = 0.5,
) -> None:
    """Show every service on the NATS ($SRV.PING, INFO, STATS); exit 1 if one is missing.

    One row per service instance (requests, errors and latency over all its endpoints)
    and a line with the services up on each node; --endpoints shows every endpoint.
    """
    state = _state(state_dir)
    url, running = _nats_url(nats_url, state)
    if services is not None:
        expected = list(_parse_services(services))
    elif running is not None and running.nats_url == url:
        expected = list(running.services)
    else:
        expected = []
    expected_node = node or (running.node if running is not None and running.nats_url == url else None)

    found = asyncio.run(_discover(url, wait))
    rows = sorted(found.values(), key=lambda s: (s["name"], s["node"] or "", s["id"]))
    missing = [
        name for name in expected
        if not any(s["name"] == name and (expected_node is None or s["node"] == expected_node) for s in rows)
    ]
    # the nodes, live, when a gpu-monitor runs (its registry holds every node's record)
    nodes = asyncio.run(_nodes_or_none(url)) if any(s["name"] == "gpu-monitor" for s in rows) else None
    if as_json:
        doc = {
            "nats_url": url,
            "state_dir": str(state.path),
            "node": expected_node,
            "supervisor_pid": running.supervisor_pid if running is not None else None,
            "phase": running.phase if running is not None else None,
            "expected": expected,
            "missing": missing,
            "ok": not missing,
            "services": [_public(s) for s in rows],
            "nodes": [msgspec.to_builtins(r) for r in nodes] if nodes is not None else None,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        if endpoints:
            _print_status_table(url, rows, running)
        else:
            _print_instances_table(url, rows, running)
            per_node = _expected_per_node(rows, services, expected, expected_node)
            if per_node:
                _console().print(_summary(rows, per_node))
        if nodes is not None:
            _console().print(nodes_table(nodes, f"nodes ({len(nodes)})"))
        for name in missing:
            where = f" on node {expected_node}" if expected_node else ""
            err.print(f"[bold red]missing:[/] {name}{where} did not answer $SRV.PING")
    raise typer.Exit(1 if missing else 0)


async def _nodes_or_none(url: str) -> list[NodeRecord] | None:
    nc = await _connect(url)
    try:
        return await fetch_nodes(nc)
    except NoMonitor:
        return None
    finally:
        await nc.close()


# -- fabric nodes ---------------------------------------------------------------------------


@app.command()
def nodes(
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")] = 1.0,
    count: Annotated[int, typer.Option("--count", min=0,
                                       help="With --watch: stop after this many refreshes (0: never).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON (one line per refresh).")] = False,
) -> None:
    """Show every node: CPUs, load, memory, disk, network, GPUs and OpenCL devices (from the gpu-monitors)."""
    state = _state(state_dir)
    url, _ = _nats_url(nats_url, state)
    try:
        asyncio.run(_nodes_loop(url, watch, interval, count, as_json))
    except KeyboardInterrupt:
        pass


async def _nodes_loop(url: str, watch: bool, interval: float, count: int, as_json: bool) -> None:
    from rich.live import Live

    nc = await _connect(url)
    try:
        async def one() -> list[NodeRecord]:
            try:
                return await fetch_nodes(nc)
            except NoMonitor:
                fail(f"no gpu-monitor answers on {url}", "is the fabric up with its gpu-monitor? (`fabric status`)")

        def title(records: list[NodeRecord]) -> str:
            return f"nodes on {url} ({len(records)}) at {datetime.now().strftime('%H:%M:%S')}"

        records = await one()
        if as_json:
            sys.stdout.write(json.dumps([msgspec.to_builtins(r) for r in records]) + "\n")
        elif not watch:
            _console().print(nodes_table(records, title(records)))
        if not watch:
            return
        shown = 1
        live = None if as_json else Live(nodes_table(records, title(records)), console=_console(),
                                         auto_refresh=False)
        if live is not None:
            live.start(refresh=True)
        try:
            while count == 0 or shown < count:
                await asyncio.sleep(interval)
                records = await one()
                shown += 1
                if live is not None:
                    live.update(nodes_table(records, title(records)), refresh=True)
                else:
                    sys.stdout.write(json.dumps([msgspec.to_builtins(r) for r in records]) + "\n")
                    sys.stdout.flush()
        finally:
            if live is not None:
                live.stop()
    finally:
        await nc.close()


def _console() -> Console:
    # piped output has no terminal width to fit: show every column in full
    return out if out.is_terminal else Console(highlight=False, width=250)


async def _connect(url: str) -> Any:
    import nats

    async def quiet(*_: Any) -> None:
        return None

    try:
        return await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0,
                                  error_cb=quiet, disconnected_cb=quiet, closed_cb=quiet, name="fabric-cli")
    except Exception as exc:
        fail(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}",
             "is the fabric up? (`fabric status --state-dir ...`, or check --nats-url)")


async def _discover(url: str, window: float) -> dict[str, dict[str, Any]]:
    """Every service instance that answers $SRV.PING, INFO and STATS, by id."""
    from .supervisor import collect_replies

    nc = await _connect(url)
    try:
        pings, infos, stats = await asyncio.gather(
            collect_replies(nc, ["$SRV.PING"], window=window),
            collect_replies(nc, ["$SRV.INFO"], window=window),
            collect_replies(nc, ["$SRV.STATS"], window=window),
        )
    finally:
        await nc.close()
    found: dict[str, dict[str, Any]] = {}

    def entry(reply: dict[str, Any]) -> dict[str, Any] | None:
        sid = reply.get("id")
        if not isinstance(sid, str):
            return None
        meta = reply.get("metadata") or {}
        e = found.setdefault(sid, {
            "name": reply.get("name"), "id": sid, "version": reply.get("version"),
            "node": meta.get("node"), "pid": _int(meta.get("pid")), "metadata": meta,
            "description": None, "started": None, "uptime_s": None, "endpoints": [],
        })
        return e

    for reply in pings:
        if isinstance(reply, dict):
            entry(reply)
    for reply in infos:
        if isinstance(reply, dict) and (e := entry(reply)) is not None:
            e["description"] = reply.get("description")
            if not e["endpoints"]:
                e["endpoints"] = [{"name": ep.get("name"), "subject": ep.get("subject")}
                                  for ep in reply.get("endpoints") or []]
    now = datetime.now(timezone.utc)
    for reply in stats:
        if not isinstance(reply, dict) or (e := entry(reply)) is None:
            continue
        started = _parse_time(reply.get("started"))
        e["started"] = reply.get("started")
        e["uptime_s"] = round((now - started).total_seconds(), 3) if started else None
        e["endpoints"] = [
            {
                "name": ep.get("name"),
                "subject": ep.get("subject"),
                "num_requests": ep.get("num_requests", 0),
                "num_errors": ep.get("num_errors", 0),
                "average_processing_time_ns": ep.get("average_processing_time", 0),
                "processing_time_ns": ep.get("processing_time"),  # for the instance's average (not in --json)
                "last_error": ep.get("last_error") or "",
            }
            for ep in reply.get("endpoints") or []
        ]
    return found


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _parse_time(raw: Any) -> datetime | None:
    """ADR-32 ``started``: RFC 3339 in UTC, with up to nanoseconds (Go) or milliseconds."""
    if not isinstance(raw, str) or "T" not in raw:
        return None
    text = raw.strip().replace("Z", "+00:00")
    date, _, rest = text.partition("T")
    clock, sign, offset = rest, "", ""
    for s in ("+", "-"):
        if s in rest:
            clock, offset = rest.split(s, 1)
            sign = s
            break
    if "." in clock:
        whole, frac = clock.split(".", 1)
        clock = f"{whole}.{frac[:6].ljust(6, '0')}"
    try:
        parsed = datetime.fromisoformat(f"{date}T{clock}{sign}{offset}" if sign else f"{date}T{clock}")
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _public(svc: dict[str, Any]) -> dict[str, Any]:
    """A service instance as ``fabric status --json`` shows it."""
    return {**svc, "endpoints": [{k: v for k, v in ep.items() if k != "processing_time_ns"}
                                 for ep in svc["endpoints"]]}


def _status_title(url: str, running: FabricState | None) -> str:
    title = f"fabric services on {url}"
    if running is not None:
        title += f" (supervisor pid {running.supervisor_pid}, {running.phase})"
    return title


def _instance_totals(svc: dict[str, Any]) -> tuple[int, int, float | None] | None:
    """Requests, errors and average latency (ns) over every endpoint; None without a STATS reply."""
    eps = [ep for ep in svc["endpoints"] if "num_requests" in ep]
    if not eps:
        return None
    requests = sum(int(ep["num_requests"] or 0) for ep in eps)
    errors = sum(int(ep["num_errors"] or 0) for ep in eps)
    # total processing time / total requests (the endpoints' averages weighted by their requests
    # where a service reports no total)
    total_ns = sum(ep["processing_time_ns"] if isinstance(ep.get("processing_time_ns"), int)
                   else int(ep["num_requests"] or 0) * (ep["average_processing_time_ns"] or 0) for ep in eps)
    return requests, errors, (total_ns / requests if requests else None)


def _print_instances_table(url: str, rows: list[dict[str, Any]], running: FabricState | None) -> None:
    """One row per service instance: what a fabric of many nodes can show on one screen."""
    table = Table(title=_status_title(url, running), title_justify="left")
    add_columns(table, [("service", "left"), ("node", "left"), ("version", "left"), ("uptime", "right"),
                        ("requests", "right"), ("errors", "right"), ("avg latency", "right")])
    for svc in rows:
        totals = _instance_totals(svc)
        requests, errors, avg = totals if totals is not None else ("?", "?", None)
        table.add_row(svc["name"], svc["node"] or "?", svc["version"] or "?", _duration(svc["uptime_s"]),
                      str(requests), str(errors), _latency(avg))
    if not rows:
        table.caption = "no service answered"
    _console().print(table)


def _expected_per_node(rows: list[dict[str, Any]], services: str | None, expected: list[str],
                       expected_node: str | None) -> dict[str, list[str]]:
    """The services each node should run: --services, else those ``fabric up`` runs (this node's own list)."""
    from .supervisor import SERVICES

    default = list(_parse_services(services)) if services is not None else list(SERVICES)
    per_node = {s["node"]: default for s in rows if s["node"]}
    if expected_node is not None:
        per_node[expected_node] = expected or default
    return per_node


def _summary(rows: list[dict[str, Any]], per_node: dict[str, list[str]]) -> str:
    """One line: the services up out of those expected, per node (the incomplete ones in red)."""
    parts = []
    up_total = want_total = 0
    for node in sorted(per_node):
        want = per_node[node]
        here = {s["name"] for s in rows if s["node"] == node}
        missing = [name for name in want if name not in here]
        up = len(want) - len(missing)
        up_total += up
        want_total += len(want)
        if missing:
            parts.append(f"[bold red]{_escape(node)} {up}/{len(want)}[/] (missing {_escape(', '.join(missing))})")
        else:
            parts.append(f"[green]{_escape(node)} {up}/{len(want)}[/]")
    count = f"{len(per_node)} node{'s' if len(per_node) != 1 else ''}"
    return f"services up: {up_total}/{want_total} on {count}: " + ", ".join(parts)


def _print_status_table(url: str, rows: list[dict[str, Any]], running: FabricState | None) -> None:
    """``--endpoints``: one row per endpoint of each service instance."""
    table = Table(title=_status_title(url, running), title_justify="left")
    add_columns(table, [("service", "left"), ("node", "left"), ("version", "left"), ("id", "left"),
                        ("uptime", "right"), ("endpoint", "left"), ("requests", "right"),
                        ("errors", "right"), ("avg latency", "right")])
    for svc in rows:
        first = [svc["name"], svc["node"] or "?", svc["version"] or "?", svc["id"], _duration(svc["uptime_s"])]
        endpoints = svc["endpoints"] or [{}]
        for i, ep in enumerate(endpoints):
            head = first if i == 0 else ["", "", "", "", ""]
            table.add_row(
                *head,
                ep.get("name") or "",
                str(ep.get("num_requests", "")),
                str(ep.get("num_errors", "")),
                _latency(ep.get("average_processing_time_ns")),
                end_section=i == len(endpoints) - 1,
            )
    if not rows:
        table.caption = "no service answered"
    _console().print(table)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _latency(ns: Any) -> str:
    if not isinstance(ns, (int, float)) or ns <= 0:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.2f} ms"
    return f"{ns / 1_000_000_000:.2f} s"


# -- fabric req ----------------------------------------------------------------------------


@app.command()
def req(
    subject: Annotated[str, typer.Argument(help="Subject to send the request to.")],
    data: Annotated[str, typer.Argument(help="Request body ('-' reads stdin).")] = "",
    header: Annotated[list[str] | None, typer.Option("--header", "-H", show_default=False,
                                                        help="Header K:V (repeatable).")] = None,
    msgpack: Annotated[bool, typer.Option("--msgpack",
                                          help="Send JSON DATA as MessagePack; decode the reply.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds to wait for the reply.")] = 5.0,
    show_headers: Annotated[bool, typer.Option("--show-headers", help="Print the reply's headers on stderr.")] = False,
    nats_url: NatsUrlOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Send one request and print the reply (a stand-in for `nats req`)."""
    import msgspec

    from .errors import ERROR_CODE_HEADER, ERROR_HEADER, ERROR_KIND_HEADER
    from .schema import CONTENT_TYPE_HEADER, MSGPACK_CONTENT_TYPE

    url, _ = _nats_url(nats_url, _state(state_dir))
    body = sys.stdin.buffer.read() if data == "-" else data.encode()
    headers: dict[str, str] = {}
    for item in header or []:
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            fail(f"bad --header {item!r}", "use --header KEY:VALUE")
        headers[key.strip()] = value.strip()
    if msgpack:
        try:
            body = msgspec.msgpack.encode(msgspec.json.decode(body)) if body.strip() else msgspec.msgpack.encode({})
        except msgspec.DecodeError as exc:
            fail(f"--msgpack needs JSON data: {exc}")
        headers[CONTENT_TYPE_HEADER] = MSGPACK_CONTENT_TYPE

    async def send() -> Any:
        import nats.errors

        nc = await _connect(url)
        try:
            return await nc.request(subject, body, timeout=timeout, headers=headers or None)
        except nats.errors.NoRespondersError:
            fail(f"no responders on {subject}: no service listens on that subject",
                 "check the subject, and `fabric status` for the services that run")
        except nats.errors.TimeoutError:
            fail(f"no reply on {subject} within {timeout:g} s")
        finally:
            await nc.close()

    msg = asyncio.run(send())
    reply_headers = msg.headers or {}
    if show_headers:
        for key, value in reply_headers.items():
            err.print(f"{_escape(key)}: {_escape(value)}")
    code = reply_headers.get(ERROR_CODE_HEADER)
    kind = reply_headers.get(ERROR_KIND_HEADER)
    if code or kind:
        text = reply_headers.get(ERROR_HEADER) or kind or ""
        sys.stderr.write(f"error {code or kind}: {text}\n")
        raise typer.Exit(1)
    _print_body(msg.data, msgpack or reply_headers.get(CONTENT_TYPE_HEADER) == MSGPACK_CONTENT_TYPE)


def _print_body(data: bytes, is_msgpack: bool) -> None:
    import msgspec

    if is_msgpack:
        try:
            obj = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            pass
        else:
            # bytes become base64 strings: the reply is shown, not round-tripped
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n")
            return
    try:
        obj = json.loads(data)
    except ValueError:
        sys.stdout.buffer.write(data)
        if data and not data.endswith(b"\n") and sys.stdout.isatty():
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
        return
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fabric`` console script."""
    app(args=argv, prog_name="fabric")


if __name__ == "__main__":
    main()
