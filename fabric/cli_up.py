"""``fabric up``: check the options, then run the supervisor in the foreground or detached.

The supervisor itself is :mod:`fabric.supervisor`; ``-d`` hands it to
:func:`fabric.control.start_detached` (fork, own session, ready pipe) and waits for
its word.  This module reads the configuration (:mod:`fabric.config`, the flags
over it) and checks what can be checked before anything starts (the configuration,
node name, URL, the state directory's lock, the port) and presents the outcome: the
ready banner, or the failure with the tails of the logs that say why.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from .cli_common import (
    ConfigFileOption,
    err,
    escape,
    fail,
    load_config_or_fail,
    out,
    parse_services,
    state_flag,
    state_of,
)
from .config.keys import env_name
from .state import FabricState, StateDir, pid_alive

if TYPE_CHECKING:
    from .supervisor import SupervisorConfig

__all__ = ["up"]


def up(
    detach: Annotated[bool, typer.Option("--detach", "-d",
                                         help="Return once ready; the supervisor keeps running.")] = False,
    nats_url: Annotated[str | None, typer.Option(
        "--nats-url", show_default=False,
        help="Join this NATS instead of starting an embedded nats-server. Config: nats.url.")] = None,
    nats_port: Annotated[int | None, typer.Option(
        "--nats-port", min=0, max=65535, show_default=False,
        help="Port of the embedded nats-server (0: pick a free one). Config: nats.port (4222).")] = None,
    host: Annotated[str | None, typer.Option(
        "--host", show_default=False,
        help="Address the embedded nats-server binds to. Config: nats.host (127.0.0.1).")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", show_default=False,
        help="State directory of this fabric (pids, logs, NATS store). Config: state_dir "
             "(the per-user state dir).")] = None,
    services: Annotated[str | None, typer.Option(
        "--services", show_default=False,
        help="Comma-separated service names. Config: up.services (all known).")] = None,
    node: Annotated[str | None, typer.Option("--node", show_default=False,
                                                help="Node name. Config: node (the short host name).")] = None,
    nats_server: Annotated[str | None, typer.Option("--nats-server", show_default=False,
                                                       help="The nats-server binary to run. Config: nats.server.")
                           ] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=0.1, show_default=False,
        help="Seconds to wait until every service answers. Config: up.ready_timeout_s (30).")] = None,
    grace: Annotated[float | None, typer.Option(
        "--grace", min=0.0, show_default=False,
        help="Seconds services get to drain when stopped by a signal. Config: up.grace_s (10).")] = None,
    labels: Annotated[str | None, typer.Option(
        "--labels", show_default=False,
        help="This node's labels for task placement, KEY=VALUE,... Config: tasks.labels (none).")] = None,
    resources: Annotated[str | None, typer.Option(
        "--resources", show_default=False,
        help="Custom resources this node declares for tasks: a JSON object ('{\"licence\": 2}') or "
             "NAME=AMOUNT,... Config: tasks.resources (none).")] = None,
    auth: Annotated[bool | None, typer.Option(
        "--auth/--no-auth", show_default=False,
        help="Require credentials on the embedded nats-server, with per-role permissions (docs/security.md). "
             "Config: up.auth (on).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow --no-auth on an address other machines can reach.")] = False,
    tls: Annotated[bool | None, typer.Option(
        "--tls/--no-tls", show_default=False,
        help="TLS on the embedded nats-server, with this fabric's own CA (made in the state dir). "
             "Config: up.tls (off).")] = None,
    join: Annotated[str | None, typer.Option(
        "--join", show_default=False,
        help="Join the fabric whose NATS is at this URL as a full node: this machine runs its own nats-server, "
             "a route peer of the others (needs --token).")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="FABRIC_JOIN_TOKEN", show_default=False,
        help="With --join or --nats-url: the fabric's join token (`fabric join-token` there).")] = None,
    cluster_port: Annotated[int | None, typer.Option(
        "--cluster-port", min=0, max=65535, show_default=False,
        help="Route port of the embedded nats-server once clustered (0: the one it had, else a free one). "
             "Config: nats.cluster_port.")] = None,
    http_host: Annotated[str | None, typer.Option(
        "--http-host", show_default=False,
        help="Address the HTTP gateway listens on (beyond loopback every request needs a token). "
             "Config: gateway.http_host (127.0.0.1).")] = None,
    http_port: Annotated[int | None, typer.Option(
        "--http-port", min=0, max=65535, show_default=False,
        help="Port of the HTTP gateway (0: a free one, kept for the next start). Config: gateway.http_port (0).")
    ] = None,
    config_file: ConfigFileOption = None,
) -> None:
    """Start NATS (unless --nats-url) and the services, supervised; foreground unless -d.

    Settings come from the configuration (docs/config.md): defaults < --config FILE or
    <state-dir>/fabric.toml < FABRIC_* environment < these flags.  An invalid
    configuration fails here, every problem listed, before anything starts.
    """
    from . import nats_server as ns
    from .config import default_node
    from .protocol.subjects import valid_node_name
    from .supervisor import Supervisor, SupervisorConfig

    t0 = _process_start_time()
    if node is not None and not valid_node_name(node):
        fail(f"invalid node name {node!r}", "use 1 to 64 letters, digits, '_' and '-'")
    if nats_url and not nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
        fail(f"invalid NATS URL {nats_url!r}", "expected nats://HOST:PORT")
    if join is not None:
        if nats_url:
            fail("--join and --nats-url are two ways to join: pick one",
                 "--join runs this machine's own nats-server in the cluster; --nats-url uses the other's")
        if not join.startswith(("nats://", "tls://")):
            fail(f"invalid --join URL {join!r}", "expected nats://HOST:PORT (the NATS of a machine of the fabric)")
        if not token:
            fail("--join needs the fabric's join token: --token TOKEN (or $FABRIC_JOIN_TOKEN)",
                 "print it on a machine of the fabric with `fabric join-token`")
        if auth is False:
            fail("--join comes with auth: a cluster's servers admit only their users")
    loaded = load_config_or_fail(config_file, {
        "nats.url": ("--nats-url", nats_url or None),
        "nats.port": ("--nats-port", nats_port),
        "nats.host": ("--host", host),
        "nats.server": ("--nats-server", nats_server),
        "state_dir": ("--state-dir", str(state_dir) if state_dir is not None else None),
        "up.services": ("--services", [n.strip() for n in services.split(",") if n.strip()]
                        if services is not None else None),
        "node": ("--node", node),
        "up.ready_timeout_s": ("--timeout", timeout),
        "up.grace_s": ("--grace", grace),
        "tasks.labels": ("--labels", _pairs("--labels", labels)),
        "tasks.resources": ("--resources", _resources(resources)),
        "up.auth": ("--auth/--no-auth", auth),
        "up.tls": ("--tls/--no-tls", tls),
        "nats.cluster_port": ("--cluster-port", cluster_port),
        "gateway.http_host": ("--http-host", http_host),
        "gateway.http_port": ("--http-port", http_port),
    })
    for warning in loaded.warnings:  # a deprecated variable: the services log it too
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    cfg = loaded.config
    # the services read their configuration themselves (file, environment): hand them what only flags said
    if labels is not None:
        os.environ["FABRIC_TASKS_LABELS"] = ",".join(f"{k}={v}" for k, v in cfg.tasks.labels.items())
    if resources is not None:
        os.environ["FABRIC_TASKS_RESOURCES"] = ",".join(f"{k}={v!r}" for k, v in cfg.tasks.resources.items())
    state = state_of(Path(cfg.state_dir) if cfg.state_dir else None)
    modules = parse_services(",".join(cfg.up.services) if cfg.up.services is not None else None)
    from . import cluster

    member = cluster.load(state) if not cfg.nats.url else None
    if member is not None and member.node:
        # a node of a cluster keeps its name: its keys, routes and blocks are that node's
        if cfg.node is not None and cfg.node != member.node:
            fail(f"{state.path} holds node {member.node!r} of the NATS cluster {member.name}, not {cfg.node!r}",
                 f"drop --node (or pass --node {member.node}), or use another --state-dir for a new node")
        node = member.node
    else:
        node = cfg.node if cfg.node is not None else default_node()
    nats_url, host, timeout, grace = cfg.nats.url, cfg.nats.host, cfg.up.ready_timeout_s, cfg.up.grace_s

    try:
        lock_fd = state.acquire_lock()
    except OSError as exc:
        fail(f"cannot use state directory {state.path}: {exc.strerror or exc}")
    if lock_fd is None:
        running = state.running()
        what = f" (supervisor pid {running.supervisor_pid}, NATS {running.nats_url})" if running else ""
        fail(f"a fabric is already running in {state.path}{what}",
             f"stop it with `fabric down{state_flag(state)}`, or start another one with a different --state-dir")

    stale = state.read()
    if stale is not None:
        left = [f"{name} (pid {pid})" for name, (pid, created) in stale.pids().items() if pid_alive(pid, created)]
        if left:
            fail(f"the last fabric in {state.path} lost its supervisor but left processes running: {', '.join(left)}",
                 f"stop them with `fabric down{state_flag(state)}`, then `fabric up` again")

    from .nats_server import is_loopback

    if not nats_url and not cfg.up.auth and not is_loopback(host) and not insecure:
        fail(f"refusing to listen on {host} without auth: anyone who reaches port {cfg.nats.port} could run "
             "programs on this machine as this user",
             "drop --no-auth (clients then need credentials: `fabric user add NAME`), or say --insecure")
    if cfg.up.tls and not cfg.up.auth and not nats_url:
        fail("--tls comes with auth: the credentials files carry the CA clients must trust", "drop --no-auth")
    binary = None
    port = cfg.nats.port
    if not nats_url:
        try:
            binary = ns.find_binary(cfg.nats.server)
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

    gateway_url = ""
    if "gateway" in modules:
        from .gateway_addr import GatewayPortInUse, resolve

        try:
            gateway_url = resolve(state, cfg.gateway.http_host, cfg.gateway.http_port)
        except GatewayPortInUse as exc:
            fail(str(exc), "pass --http-port 0 to pick a free port")
        except OSError as exc:
            fail(f"the gateway cannot listen on {cfg.gateway.http_host}: {exc.strerror or exc}", "check --http-host")

    if "allocator" in modules and cfg.mem.data_plane:
        _data_plane_address(state, cfg.mem.data_host, cfg.mem.data_port, host if not nats_url else None)

    joined = False
    use_tls = cfg.up.tls and not nats_url
    if join is not None:
        assert token is not None
        use_tls = _join_cluster(join, token, state, node, host, cfg.nats.cluster_port)
        joined = True
    elif nats_url:
        joined = _join(nats_url, token, state, node)
    elif token:
        fail("--token joins another fabric: give its NATS with --join (or --nats-url)")
    spec = cluster.load(state) if not nats_url else None
    if spec is not None:
        use_tls = spec.tls  # a cluster's routes are TLS or not for every node alike
        if not cfg.up.auth and not joined:
            fail(f"this node is part of the NATS cluster {spec.name}: it cannot run without auth")

    if use_tls and gateway_url:  # the gateway serves HTTPS under the fabric's CA (the supervisor hands it the files)
        gateway_url = "https://" + gateway_url.removeprefix("http://")
    config = SupervisorConfig(
        state=state, node=node, services=modules, external_nats_url=nats_url, host=host, port=port,
        nats_binary=binary, ready_timeout=timeout, grace=grace,
        config_file=loaded.file if config_file is not None else None, log_level=cfg.log_level,
        auth=joined or spec is not None or (cfg.up.auth and not nats_url), tls=use_tls,
        cluster_port=cfg.nats.cluster_port, gateway_url=gateway_url,
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


def _join(url: str, token: str | None, state: StateDir, node: str) -> bool:
    """Before anything starts: join the fabric at *url* with *token* (True), or check it needs none (False).

    A refused join, or a fabric that wants credentials when no token was given, ends
    the start here with the reason: nothing is left half-started.
    """
    from .auth import AuthRealm
    from .errors import FabricError

    if token is None:
        needs = asyncio.run(_requires_credentials(url))
        if needs:
            fail(f"the fabric at {url} requires credentials (auth on)",
                 "get its join token on one of its machines with `fabric join-token`, then "
                 f"`fabric up --nats-url {url} --token TOKEN`")
        return False
    from .join import request_join

    realm = AuthRealm(state, node)
    realm.ensure()  # this node's own keys: only their public halves travel
    try:
        reply = asyncio.run(request_join(url, token, realm))
    except FabricError as exc:
        fail(f"cannot join the fabric at {url}: {exc.message}")
    err.print(f"joined the fabric at {escape(url)} as node {reply.node}"
              + ("" if reply.new else " (again: same keys)"))
    return True


def _join_cluster(url: str, token: str, state: StateDir, node: str, host: str, cluster_port: int) -> bool:
    """``--join``: before anything starts, be let into the fabric at *url* as a route peer; whether it runs TLS.

    This node's route port is fixed here (the other nodes name it); the reply brings the
    cluster's settings, the shared users table and, with TLS, this node's certificate.
    """
    from . import cluster
    from . import nats_server as ns
    from .auth import AuthError, AuthRealm, parse_token
    from .errors import FabricError
    from .join import request_join
    from .pki import Pki

    try:
        fingerprint = parse_token(token)[1]
    except AuthError as exc:
        fail(f"invalid join token: {exc}", "print the fabric's token with `fabric join-token` on one of its machines")
    old = cluster.load(state)
    port = old.port if old is not None else cluster_port or ns.free_port(host)
    try:
        ns.check_port(host, port)
    except ns.PortInUse:
        fail(f"route port {port} on {host} is already in use", "pass --cluster-port with a free port")
    realm = AuthRealm(state, node)
    realm.ensure()
    pki = Pki(state.path / "pki")
    csr = pki.request(node, [host, ns.outward_address()]) if fingerprint else ""
    try:
        reply = asyncio.run(request_join(url, token, realm, route=ns.route_address(host, port), csr=csr))
    except FabricError as exc:
        fail(f"cannot join the fabric at {url}: {exc.message}")
    grant = reply.cluster
    assert grant is not None
    if fingerprint:
        if not grant.cert:
            fail(f"the fabric at {url} runs TLS but signed no certificate for this node")
        pki.install(grant.cert, reply.ca)
        realm.ensure(ca_pem=reply.ca)
    realm.adopt(grant.table)
    cluster.save(state, cluster.ClusterSpec(name=grant.name, password=grant.password, port=port,
                                            tls=bool(fingerprint), node=node))
    err.print(f"joined the fabric at {escape(url)} as node {reply.node}: this node's nats-server routes into "
              f"cluster {grant.name} (route port {port})")
    return bool(fingerprint)


async def _requires_credentials(url: str) -> bool:
    """Whether the NATS at *url* refuses a connection without credentials (False if it is not there: the
    supervisor then reports what it finds)."""
    import nats

    from .credentials import refusal

    seen: list[str] = []

    async def quiet(exc: Exception) -> None:
        seen.append(str(exc))

    try:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0,
                                error_cb=quiet, name="fabric-up-check")
    except Exception as exc:
        # refused, or TLS with a CA of its own (which only a token pins): either way, it takes a token
        return refusal(" ".join([str(exc), *seen])) is not None
    await nc.close()
    return False


def _pairs(flag: str, raw: str | None) -> dict[str, str] | None:
    """``KEY=VALUE,...`` as a table (None when the flag was not given)."""
    if raw is None:
        return None
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            fail(f"invalid {flag} entry {part!r}", "expected KEY=VALUE,KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _resources(raw: str | None) -> dict[str, object] | None:
    """``--resources``: a JSON object, or ``NAME=AMOUNT,...``."""
    if raw is None:
        return None
    if raw.lstrip().startswith("{"):
        import json

        try:
            value = json.loads(raw)
        except ValueError as exc:
            fail(f"--resources is not valid JSON: {exc}", "expected an object such as '{\"licence\": 2}'")
        if not isinstance(value, dict):
            fail("--resources must be a JSON object", "expected an object such as '{\"licence\": 2}'")
        return value
    return dict(_pairs("--resources", raw) or {})


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


def _up_detached(config: SupervisorConfig, lock_fd: int, t0: float) -> NoReturn:
    """Start the supervisor detached; return when it reports ready or failed, leaving nothing behind on failure."""
    from .control import kill_leftovers, start_detached

    state = config.state
    sup = start_detached(config, lock_fd)
    try:
        report = sup.wait_report(config.ready_timeout + 5.0)
    except KeyboardInterrupt:
        err.print("interrupted: stopping the fabric")
        sup.terminate()
        sup.wait()
        raise typer.Exit(130) from None
    st = state.read()
    if report is not None and report.ready and st is not None:
        _print_ready(st, t0, state, detached=True)
        raise typer.Exit(0)
    if report is None:
        # EOF on the pipe comes a moment before the dead supervisor can be reaped:
        # give it that moment rather than report a time-out that did not happen
        if sup.exited() or (sup.hung_up and sup.wait(5.0)):
            err.print("[bold red]error:[/] the supervisor exited before it was ready")
        else:
            err.print(f"[bold red]error:[/] no word from the supervisor within {config.ready_timeout + 5:.0f} s; "
                      "stopping it")
            sup.terminate()
        _print_tail(state, "supervisor")
    else:
        assert st is not None
        _print_failure(st, report.failing, state)
    # the supervisor stops what it started; wait for it so nothing is left behind
    if not sup.wait(config.grace + 10.0):
        err.print(f"the supervisor (pid {sup.pid}) did not stop in time: killing it")
        sup.kill()
    # a supervisor that died (or was killed) leaves its children running: the state
    # file names them, and none may outlive a start that failed
    final = state.read()
    killed = kill_leftovers(final) if final is not None else []
    if killed:
        err.print(f"killed leftover processes: {', '.join(killed)}")
    raise typer.Exit(1)


def _print_ready(st: FabricState, t0: float, state: StateDir, *, detached: bool) -> None:
    from .nats_server import is_loopback

    seconds = (st.ready_at or time.time()) - t0
    services = ", ".join(st.services) or "none"
    out.print(f"[bold green]fabric ready[/] in {seconds:.2f} s — node [bold]{st.node}[/], services: {services}")
    where = f"embedded nats-server, pid {st.nats.pid}" if st.embedded_nats and st.nats else "joined"
    out.print(f"  NATS URL  {st.nats_url}  ({where})")
    if st.credentials:
        out.print(f"  auth      on: admin credentials {st.credentials} (found by the CLI and local clients); "
                  "`fabric user add NAME` for others")
        if st.tls:
            out.print(f"  tls       on: every connection verified against this fabric's CA ({st.state_dir}/pki/ca.pem, "
                      "carried by every credentials file)")
    elif st.embedded_nats:
        out.print("  auth      [bold yellow]off[/] (--no-auth): anyone who reaches the NATS port runs programs here")
    if st.credentials and st.embedded_nats:
        token = _join_token(state, st)
        out.print(f"  join      fabric up --join {st.join_url} --token {token or 'TOKEN'}")
        out.print("            (the token is a secret: it lets a machine in; `fabric join-token"
                  f"{state_flag(state)}` prints it again, --rotate replaces it; --nats-url instead of --join: "
                  "that machine's services only)")
        if st.cluster_port:
            out.print(f"  cluster   this nats-server takes routes on port {st.cluster_port}: `fabric status` shows the "
                      "cluster")
    else:
        out.print(f"  join      fabric up --nats-url {st.join_url}")
    if st.embedded_nats and st.host and is_loopback(st.host):
        out.print(f"            (nats-server listens on {st.host} only: start with --host 0.0.0.0 so other "
                  "machines can join)")
    if st.gateway_url:
        token_file = state.auth_dir / "operator.token"
        try:
            link = f"{st.gateway_url}/?token={token_file.read_text().strip()}"
        except OSError:
            link = st.gateway_url
        out.print(f"  dashboard {link}")
        out.print(f"            (the link holds this machine's operator token: read, submit, admin; REST API under "
                  f"{st.gateway_url}/api/, OpenAPI at /schema/swagger, Prometheus at /metrics; "
                  "`fabric token create` for others)")
    out.print(f"  logs      {st.logs_dir}/")
    flag = state_flag(state)
    if detached:
        out.print(f"  status    fabric status{flag}")
        out.print(f"  stop      fabric down{flag}")
    else:
        out.print("  stop      Ctrl-C, or fabric down" + flag)


def _join_token(state: StateDir, st: FabricState) -> str | None:
    """This fabric's join token (``fabric1.<seed>[.<CA fingerprint>]``), None if it cannot be read."""
    from .auth import make_token
    from .credentials import CredentialsError, read_credentials

    try:
        seed = read_credentials(state.auth_dir / "join.creds").seed
        ca = state.path / "pki" / "ca.pem"
        return make_token(seed, ca.read_text() if st.tls and ca.is_file() else None)
    except (CredentialsError, OSError):
        return None


def _print_failure(st: FabricState, failing: list[str], state: StateDir) -> None:
    err.print(f"[bold red]error:[/] fabric did not start: {escape(st.error)}")
    for name in failing or ["supervisor"]:
        _print_tail(state, name)


def _print_tail(state: StateDir, name: str) -> None:
    tail = state.tail(name, 20)
    err.print(f"--- last lines of {state.log_file(name)} ---")
    err.print(escape(tail) if tail else "(empty)")


def _data_plane_address(state: StateDir, data_host: str, data_port: int, nats_host: str | None) -> None:
    """Where the allocator's data plane listens, handed to it as ``$FABRIC_MEM_DATA_HOST/PORT``.

    The host: ``mem.data_host``, else where this node's NATS listens (reachable from exactly where
    NATS is), else -- a node that joined another machine's NATS has none of its own -- its address
    on the default route (never loopback: the fabric's other machines would dial their own).  The
    port: ``mem.data_port``, else one kept from start to start (:mod:`fabric.kept_ports`).
    """
    from .kept_ports import keep_port
    from .nats_server import PortInUse, check_port, outward_address

    host = data_host or nats_host or outward_address()
    os.environ[env_name("mem.data_host")] = host
    if data_port:
        try:
            check_port(host, data_port)
        except PortInUse:
            fail(f"the data plane's port {data_port} on {host} is already in use",
                 "set mem.data_port = 0 (a free one, kept from start to start) or free the port")
        return
    os.environ[env_name("mem.data_port")] = str(keep_port(state, "data", host))
