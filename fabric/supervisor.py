"""The supervisor behind ``fabric up``: starts, watches and restarts the processes.

One supervisor per state directory (it holds the directory's lock).  It runs:

* the embedded nats-server (unless it joins an existing NATS), and
* every service as its own OS process,
  ``python -P -m <module> --nats-url URL --node NODE --state-dir DIR [--config FILE]``
  (the flags win over the service's configuration, :mod:`fabric.config`),

each with its stdout and stderr in ``<state-dir>/logs/<name>.log``, and each in the
state directory as its working directory (:mod:`fabric.launch`: the directory
``fabric up`` was run in, a source checkout say, never shadows the installed
packages).  A child that
exits is restarted after an exponential backoff (0.1 s doubling to 5 s, back to
0.1 s once an incarnation has stayed up 30 s), and every exit and restart is
logged.  The fabric is *ready* when each service answers ``$SRV.PING.<name>``
with ``metadata["node"]`` equal to this node (and, when it reports one, the pid
the supervisor started), within ``ready_timeout``; otherwise the supervisor
records which services failed, stops everything and exits 1.

SIGTERM (``fabric down``) or SIGINT stops the fabric: services get SIGTERM and
drain while NATS is still up, whatever is left after the grace period gets
SIGKILL, then nats-server is stopped.  Children run in their own sessions, so a
Ctrl-C at the terminal reaches only the supervisor, which stops them in order.

Start-up is on the critical path of ``fabric up``: the children are spawned
before the supervisor imports its logging or NATS client.

The readiness pings are :func:`fabric.discovery.probe_services`; running the
supervisor detached (``fabric up -d``) and stopping it from outside are
:mod:`fabric.control`'s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import CLUSTERED_ENV
from .config import env_name
from .discovery import probe_services
from .launch import SERVICE_MODULES_ENV, module_launch
from .protocol.permissions import SERVICE_ROLES
from .state import FabricState, ProcessRecord, StateDir

__all__ = ["SERVICES", "SupervisorConfig", "Supervisor", "service_modules", "rotate_log", "USER_EXPIRY_EVERY_S"]

#: how often the supervisor drops users whose TTL ended (seconds)
USER_EXPIRY_EVERY_S = 10

#: every service ``fabric up`` knows: ADR-32 service name -> module run with ``python -P -m``
SERVICES: dict[str, str] = {
    "allocator": "fabric.services.allocator",
    "spawner": "fabric.services.spawner",
    "gpu-monitor": "fabric.services.gpu_monitor",
    "scheduler": "fabric.services.scheduler",
    "gateway": "fabric.services.gateway",
}

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
BACKOFF_RESET_AFTER_S = 30.0  # an incarnation that lived this long resets the backoff
NATS_STOP_TIMEOUT_S = 5.0
#: how long the scheduler waits, stopped, for the JetStream copy when the first machine joins (s)
MIGRATION_HOLD_S = 60.0


def service_modules() -> dict[str, str]:
    """:data:`SERVICES`, with the modules named in ``$FABRIC_SERVICE_MODULES`` applied."""
    modules = dict(SERVICES)
    raw = os.environ.get(SERVICE_MODULES_ENV)
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"${SERVICE_MODULES_ENV} is not JSON: {exc}") from None
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise ValueError(f'${SERVICE_MODULES_ENV} must be a JSON object {{"service": "module"}}')
        modules.update(extra)
    return modules


@dataclass
class SupervisorConfig:
    """What one ``fabric up`` runs (validated by the CLI)."""

    state: StateDir
    node: str
    services: dict[str, str]  # name -> module
    external_nats_url: str | None = None  # join this NATS instead of running one
    host: str = "127.0.0.1"
    port: int = 4222  # concrete: the CLI resolves --nats-port 0
    nats_binary: str | None = None  # resolved path; None with an external NATS
    ready_timeout: float = 30.0
    grace: float = 10.0
    python: str = field(default_factory=lambda: sys.executable)
    #: ``fabric up --config FILE`` (absolute): passed on to every service as ``--config FILE``;
    #: without it each service reads ``<state-dir>/fabric.toml`` itself (fabric.config)
    config_file: Path | None = None
    #: the configuration's log_level, for the supervisor's own log
    log_level: str = "info"
    #: auth on the embedded nats-server: every service gets its role's credentials (fabric.auth)
    auth: bool = False
    #: TLS on the embedded nats-server, from the fabric's CA (fabric.pki); needs auth (credentials carry the CA)
    tls: bool = False
    #: the route port this node's nats-server listens on once clustered (0: the one it had, else a free one)
    cluster_port: int = 0
    #: where this node's gateway listens (the CLI chose its port), recorded in the state; "" without one
    gateway_url: str = ""


class Child:
    """One supervised process and its restart bookkeeping."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str], cwd: str) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.record = ProcessRecord(name=name, command=command, log=str(log_path))
        self.backoff = BACKOFF_INITIAL_S
        self.started_mono = 0.0
        self.restart_handle: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def spawn(self) -> None:
        with open(self.log_path, "ab", buffering=0) as log:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                # its own session: a terminal's Ctrl-C reaches only the supervisor,
                # which stops the children in order (services first, then NATS)
                start_new_session=True,
            )
        self.started_mono = time.monotonic()
        self.record.pid = self.proc.pid
        self.record.started_at = time.time()
        self.record.create_time = _create_time(self.proc.pid)

    def returncode_or_none(self) -> int | None:
        """Its exit status (reaping it if it just exited), None while it runs."""
        return self.proc.poll() if self.proc is not None else None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _create_time(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Runs one fabric until SIGTERM/SIGINT; see the module docstring."""

    def __init__(
        self,
        config: SupervisorConfig,
        *,
        on_ready: Callable[[FabricState], None] | None = None,
        on_failed: Callable[[FabricState, list[str]], None] | None = None,
        hangup_stops: bool = False,
        logger: Any = None,
    ) -> None:
        """*logger* (anything with structlog's level methods) replaces the structlog setup."""
        self.config = config
        self.state_dir = config.state
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.hangup_stops = hangup_stops
        self.nats: Child | None = None
        self.services: dict[str, Child] = {}
        self.stopping = False
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._log: Any = None
        self._logger = logger
        self._early_log: list[tuple[str, str, dict[str, Any]]] = []
        # with auth on an embedded server: its users' keeper (joins, expiry: fabric.join)
        self._keeper: Any = None
        self._realm: Any = None
        self._pki: Any = None
        #: the embedded nats-server's monitoring port (loopback), chosen once per supervisor; 0: none
        self.monitor_port = 0
        #: this node's cluster settings (fabric.cluster); None while its nats-server runs alone
        self.cluster: Any = None
        if config.external_nats_url is None and config.auth:
            from . import cluster as cluster_mod

            self.cluster = cluster_mod.load(config.state)
        #: children not to restart while the supervisor works on them (clustering)
        self._held: set[str] = set()
        self._migration: asyncio.Task[None] | None = None
        cfg = config
        if cfg.external_nats_url:
            url = join = cfg.external_nats_url
        else:
            from .nats_server import client_url, join_url

            url, join = client_url(cfg.host, cfg.port), join_url(cfg.host, cfg.port)
        self.nats_url = url
        self.state = FabricState(
            state_dir=str(cfg.state.path),
            node=cfg.node,
            nats_url=url,
            join_url=join,
            embedded_nats=cfg.external_nats_url is None,
            host=None if cfg.external_nats_url else cfg.host,
            port=None if cfg.external_nats_url else cfg.port,
            gateway_url=cfg.gateway_url if "gateway" in cfg.services else "",
            supervisor_pid=os.getpid(),
            supervisor_create_time=_create_time(os.getpid()),
            started_at=time.time(),
            logs_dir=str(cfg.state.logs_dir),
        )

    # -- logging (deferred until the children are spawned) -------------------------

    def log(self, level: str, event: str, **kw: Any) -> None:
        if self._log is None:
            self._early_log.append((level, event, kw))
        else:
            getattr(self._log, level)(event, **kw)

    def _start_logging(self) -> None:
        if self._logger is not None:
            self._log = self._logger
        else:
            import structlog

            from .logs import configure_logging

            configure_logging(self.config.log_level)
            self._log = structlog.get_logger(component="supervisor", node=self.config.node)
        for level, event, kw in self._early_log:
            getattr(self._log, level)(event, **kw)
        self._early_log.clear()

    # -- the run ---------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, wait until ready, supervise until stopped; the exit code."""
        loop = asyncio.get_running_loop()
        stop_signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if self.hangup_stops else [])
        for sig in stop_signals:
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        try:
            self._prepare()
            self._write_state()
            if await self._start_nats():
                for child in self.services.values():
                    self._spawn(child)
                self._write_state()
                self._start_logging()
                self.log("info", "fabric starting", nats_url=self.nats_url, services=list(self.services),
                         pids={n: c.pid for n, c in self.services.items()}, state_dir=str(self.state_dir.path))
                ready = asyncio.create_task(self._wait_ready())
                poll = asyncio.create_task(self._poll_children())
                await self._stop.wait()
                ready.cancel()
                poll.cancel()
                await asyncio.gather(ready, poll, return_exceptions=True)
            else:
                self._start_logging()
        except Exception:
            if self._log is None:
                self._start_logging()
            self.log("exception", "supervisor failed")
            self.exit_code = 1
        try:
            # the stop signals stay handled (a second SIGTERM must not kill the
            # supervisor half-way through stopping its children)
            return await self._shutdown(self.exit_code)
        finally:
            for sig in stop_signals + [signal.SIGCHLD]:
                loop.remove_signal_handler(sig)

    def write_nats_config(self) -> Path:
        """(Re)write nats.conf from what this node is now: auth, TLS, cluster and the other nodes' routes."""
        from .nats_server import write_config

        cfg, realm = self.config, self._realm
        routes = [] if self.cluster is None or realm is None else [
            r.route for r in realm.nodes() if r.route and r.node != cfg.node]
        if self.cluster is not None and self.state.cluster_port != self.cluster.port:
            self.state.cluster_port = self.cluster.port
        return write_config(self.state_dir, host=cfg.host, port=cfg.port, node=cfg.node, auth=realm is not None,
                            tls=self._pki, cluster=self.cluster, routes=routes, monitor_port=self.monitor_port)

    def _prepare(self) -> None:
        cfg = self.config
        state = self.state_dir
        state.ensure()
        state.take_stop_request()  # a leftover from a previous run must not set our grace
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("FABRIC_NATS_URL", None)  # the command line says which NATS
        # every child runs in the state directory (absolute, like every path it is given)
        cwd = str(state.path)
        names: list[str] = []
        env.pop("FABRIC_NATS_CREDENTIALS", None)  # each service gets its own, on its command line
        realm = None
        if cfg.external_nats_url is not None and cfg.auth:
            # a node that joined with a token (fabric.join): its keys were made, and let in, before this start
            from .auth import AuthRealm

            realm = AuthRealm(state, cfg.node)
            self.state.credentials = str(realm.admin_credentials)
        if cfg.external_nats_url is None:
            from .nats_server import server_command

            assert cfg.nats_binary is not None
            pki = None
            if cfg.tls:
                from .nats_server import outward_address
                from .pki import Pki

                pki = Pki(state.path / "pki")
                if pki.ca_key.is_file() or not pki.cert.is_file():  # a joined node's certificate is the CA's gift
                    pki.ensure(cfg.node, [cfg.host, outward_address()])
                self.state.tls = True
                # the HTTP gateway serves HTTPS with the same certificate: TLS on means every port of the node
                env[env_name("gateway.tls_cert")], env[env_name("gateway.tls_key")] = str(pki.cert), str(pki.key)
                # and the allocator's data plane: TLS on means every port of the node
                env[env_name("mem.data_tls_cert")], env[env_name("mem.data_tls_key")] = str(pki.cert), str(pki.key)
            if cfg.auth:
                from .auth import AuthRealm

                realm = AuthRealm(state, cfg.node)
                # no URL in the admin's file: a local client finds the running fabric's
                realm.ensure(ca_pem=pki.ca_pem() if pki is not None else None)
                realm.render()
                self.state.credentials = str(realm.admin_credentials)
            self._realm, self._pki = realm, pki
            from .nats_server import free_port

            # the server's monitoring endpoint, on loopback: the gateway's /metrics and topology read it
            # not a port fabric up already promised to a service that has yet to bind it (a detached supervisor
            # is another process: it learns them from the environment it hands on)
            self.monitor_port = free_port("127.0.0.1", avoid=_promised_ports(env))
            env[env_name("gateway.nats_monitor_url")] = f"http://127.0.0.1:{self.monitor_port}"
            conf = self.write_nats_config()
            if self.cluster is not None:
                env[CLUSTERED_ENV] = "1"  # the services' streams get replicas (fabric.jetstream)
            if realm is not None:
                from .join import AuthKeeper

                self._keeper = AuthKeeper(realm, os.path.abspath(cfg.nats_binary), conf,
                                          lambda: self.nats.pid if self.nats is not None else None, self.log,
                                          pki.ca_pem() if pki is not None else None, supervisor=self)
            names.append("nats-server")
            binary = os.path.abspath(cfg.nats_binary)
            self.nats = Child("nats-server", server_command(binary, conf), state.log_file("nats-server"), env, cwd)
        args = ["--nats-url", self.nats_url, "--node", cfg.node, "--state-dir", str(state.path)]
        if cfg.config_file is not None:
            args += ["--config", str(cfg.config_file)]
        for name, module in cfg.services.items():
            own = args
            if realm is not None and name in SERVICE_ROLES:
                # a path, never the key itself: a command line is visible to every local user (ps)
                own = [*args, "--credentials", str(realm.service_credentials(name))]
            launch = module_launch(module, own, cwd=cwd, env=env, python=cfg.python)
            assert launch.cwd is not None
            self.services[name] = Child(name, launch.argv, state.log_file(name), launch.env, launch.cwd)
            names.append(name)
        for name in names:
            rotate_log(state.log_file(name))

    async def _start_nats(self) -> bool:
        """Start the embedded server and wait until it accepts connections."""
        if self.nats is None:
            return True
        for stale in self.state_dir.nats_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        try:
            self.nats.spawn()
        except OSError as exc:
            self._fail(f"cannot start {self.nats.command[0]}: {exc.strerror or exc}", ["nats-server"])
            return False
        self.state.nats = self.nats.record
        self._write_state()  # recorded at once: whoever cleans up after a dead supervisor finds it
        assert self.nats.proc is not None
        # the server writes this file once it listens: proof that *our* server
        # took the port (a TCP probe would also succeed against a squatter)
        ports_file = self.state_dir.nats_dir / f"{Path(self.nats.command[0]).name}_{self.nats.proc.pid}.ports"
        deadline = time.monotonic() + min(self.config.ready_timeout, 10.0)
        while time.monotonic() < deadline and not self._stop.is_set():
            proc = self.nats.proc
            assert proc is not None
            if proc.poll() is not None:
                tail = self.state_dir.tail("nats-server", 40)
                if "address already in use" in tail:
                    error = (f"port {self.config.port} on {self.config.host} is already in use: "
                             "pass --nats-port 0 to pick a free port, or --nats-url to join the NATS there")
                else:
                    error = f"nats-server exited ({_describe_exit(proc.returncode)}) before it accepted connections"
                self._fail(error, ["nats-server"])
                return False
            if ports_file.exists():
                self.log("info", "nats-server listening", pid=proc.pid, url=self.nats_url)
                return True
            await asyncio.sleep(0.005)
        if not self._stop.is_set():
            self._fail("nats-server did not accept connections in time", ["nats-server"])
        return False

    def _spawn(self, child: Child) -> None:
        child.restart_handle = None
        try:
            child.spawn()
        except OSError as exc:  # the executable vanished, fd exhaustion...: try again later
            self.log("error", "spawn failed", child=child.name, error=str(exc))
            self._schedule_restart(child)
            return
        if child is self.nats:
            self.state.nats = child.record
        else:
            self.state.services[child.name] = child.record

    # -- clustering ------------------------------------------------------------------

    def route_port(self) -> int:
        """The port this node's server will take routes on: the configured one, else a free one."""
        from .nats_server import free_port

        return self.config.cluster_port or free_port(self.config.host)

    def route_address(self, port: int) -> str:
        from .nats_server import route_address

        return route_address(self.config.host, port)

    def can_sign(self) -> bool:
        """Whether this node can answer every join: without TLS any node can; with it, the CA's holder."""
        return self._pki is None or self._pki.ca_key.is_file()

    def sign_csr(self, node: str, csr: str) -> str:
        """A certificate of this fabric's CA for a joining node's server (its CSR, PEM); "" without TLS."""
        if self._pki is None:
            return ""
        return str(self._pki.sign_csr(node, csr))

    async def become_clustered(self, spec: Any) -> None:
        """The first machine joined (fabric.join): restart nats-server with *spec*'s cluster block and carry its
        standalone JetStream into the cluster's (fabric.cluster_migrate).

        The scheduler -- the one service whose state lives in JetStream -- is stopped meanwhile and started again
        once the copy is done (or after :data:`MIGRATION_HOLD_S`, the copy then going on beside it).
        """
        from . import cluster as cluster_mod
        from . import cluster_migrate

        assert self.nats is not None
        self.cluster = spec
        cluster_mod.save(self.state_dir, spec)
        for child in self.services.values():  # their streams get replicas from now on (fabric.jetstream)
            child.env[CLUSTERED_ENV] = "1"
        scheduler = self.services.get("scheduler")
        self._held.update(["nats-server", *(["scheduler"] if scheduler is not None else [])])
        self.log("info", "clustering: restarting nats-server with routes", cluster=spec.name, route_port=spec.port)
        try:
            if scheduler is not None:
                await _terminate([scheduler], self.config.grace, self.log)
            await _terminate([self.nats], NATS_STOP_TIMEOUT_S, self.log)
            cluster_migrate.set_aside(self.state_dir.nats_dir)
            if self._realm is not None:
                self._realm.render()
            self.write_nats_config()
            self._held.discard("nats-server")
            self._spawn(self.nats)
            self._write_state()
            copy = self._migration = asyncio.create_task(self._migrate_when_ready())
            await asyncio.wait([copy], timeout=MIGRATION_HOLD_S)
        finally:
            self._held.discard("nats-server")
            self._held.discard("scheduler")
            if scheduler is not None and scheduler.pid is None and not self.stopping:
                self._spawn(scheduler)
                self._write_state()

    async def _migrate_when_ready(self) -> None:
        """Copy the standalone store set aside into the cluster once its JetStream answers (fabric.cluster_migrate)."""
        from . import cluster_migrate

        if self.config.nats_binary is not None:
            await cluster_migrate.copy_when_ready(
                self.nats_url, {"name": f"fabric-supervisor-migrate@{self.config.node}",
                                "error_cb": self._on_nats_error, **self._auth()},
                self.state_dir.nats_dir, os.path.abspath(self.config.nats_binary), self.log)

    # -- readiness -----------------------------------------------------------------

    async def _wait_ready(self) -> None:
        try:
            await self._probe_until_ready()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave the fabric "starting" forever
            self.log("exception", "readiness check crashed")
            self._fail(f"readiness check crashed: {type(exc).__name__}: {exc}", [])

    async def _probe_until_ready(self) -> None:
        import nats

        t_end = self.state.started_at + self.config.ready_timeout
        nc = None
        try:
            while nc is None:
                try:
                    nc = await nats.connect(
                        self.nats_url, name=f"fabric-supervisor@{self.config.node}", connect_timeout=1,
                        allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                        error_cb=self._on_nats_error, **self._auth(),
                    )
                except Exception as exc:
                    if time.time() > t_end:
                        self._fail(f"cannot connect to NATS at {self.nats_url}: {exc}",
                                   ["nats-server"] if self.nats else [])
                        return
                    await asyncio.sleep(0.02)
            missing = await probe_services(
                nc, self.config.node, lambda: {n: c.pid for n, c in self.services.items()},
                timeout=max(0.0, t_end - time.time()),
            )
            if not missing and "gateway" in self.services:
                await self._operator_token(nc)
        finally:
            if nc is not None:
                await nc.close()
        if missing:
            self._fail(f"not ready within {self.config.ready_timeout:.1f} s: {', '.join(missing)}", missing)
            return
        self.state.phase = "ready"
        self.state.ready_at = time.time()
        self._write_state()
        self.log("info", "fabric ready", seconds=round(self.state.ready_at - self.state.started_at, 3),
                 nats_url=self.nats_url)
        if self._keeper is not None:  # joins are answered once the fabric is ready
            await self._keeper.serve(self.nats_url, f"fabric-supervisor-joins@{self.config.node}", self._auth())
        from . import cluster_migrate

        if self.cluster is not None and cluster_migrate.pending(self.state_dir.nats_dir):
            # stopped half-way through the copy at the last start: finish it
            self._migration = asyncio.create_task(self._migrate_when_ready())
        if self.on_ready is not None:
            self.on_ready(self.state)

    async def _operator_token(self, nc: Any) -> None:
        """This machine's dashboard token (fabric.gateway_tokens), made at the first start, for the banner's link."""
        from .gateway_tokens import ensure_operator_token

        try:
            await ensure_operator_token(nc.jetstream(timeout=5.0), self.state_dir.auth_dir, self.config.node)
        except Exception as exc:  # the fabric runs without it: `fabric token create` makes others
            self.log("warning", "could not make the operator's gateway token", error=str(exc) or type(exc).__name__)

    def _auth(self) -> dict[str, Any]:
        """The probe's credentials: the admin's, with auth on."""
        if not self.state.credentials:
            return {}
        from .credentials import read_credentials

        return read_credentials(self.state.credentials).connect_options()

    async def _on_nats_error(self, exc: Exception) -> None:
        self.log("debug", "nats error", error=f"{type(exc).__name__}: {exc}")

    def _fail(self, error: str, failing: list[str]) -> None:
        self.state.phase = "failed"
        self.state.error = error
        self._write_state()
        self.log("error", "fabric failed to start", error=error, failing=failing)
        self.exit_code = 1
        if self.on_failed is not None:
            self.on_failed(self.state, failing)
        self._stop.set()

    # -- watching children -----------------------------------------------------------

    def _reap(self) -> None:
        """SIGCHLD: collect every child that exited and schedule its restart."""
        changed = False
        for child in self._children():
            if child.proc is None or child.proc.returncode is not None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            uptime = time.monotonic() - child.started_mono
            child.record.pid = None
            changed = True
            if self.stopping or child.name in self._held:
                continue  # _terminate reports it
            if uptime >= BACKOFF_RESET_AFTER_S:
                child.backoff = BACKOFF_INITIAL_S
            self.log("warning", "child exited", child=child.name, pid=child.proc.pid, status=_describe_exit(code),
                     uptime_s=round(uptime, 3), log=str(child.log_path))
            self._schedule_restart(child)
        if changed:
            self._write_state()

    def _schedule_restart(self, child: Child) -> None:
        if self.stopping or child.name in self._held:
            return
        delay = child.backoff
        child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)
        child.record.restarts += 1
        self.log("warning", "restarting child", child=child.name, delay_s=delay, restarts=child.record.restarts)
        child.restart_handle = asyncio.get_running_loop().call_later(delay, self._restart, child)

    def _restart(self, child: Child) -> None:
        if self.stopping or child.name in self._held:
            return
        self._spawn(child)
        if child.proc is not None and child.pid is not None:
            self.log("info", "child restarted", child=child.name, pid=child.pid, restarts=child.record.restarts)
        self._write_state()

    async def _poll_children(self) -> None:
        # SIGCHLD does the work; this only covers a signal lost in a race
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            self._reap()
            ticks += 1
            if self._keeper is not None and ticks % USER_EXPIRY_EVERY_S == 0:
                await self._keeper.expire_users()  # fabric user add --ttl
                await self._keeper.tend_replicas()

    def _children(self) -> list[Child]:
        return list(self.services.values()) + ([self.nats] if self.nats is not None else [])

    # -- stopping ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to stop the fabric (what SIGTERM does)."""
        self._stop.set()

    def _on_stop_signal(self, sig: int) -> None:
        if not self._stop.is_set():
            self.log("info", "stop requested", signal=signal.Signals(sig).name)
        self._stop.set()

    async def _shutdown(self, code: int) -> int:
        self.stopping = True
        if self._migration is not None:
            self._migration.cancel()
        if self._keeper is not None:
            await self._keeper.close()
        if self.state.phase != "failed":
            self.state.phase = "stopping"
        self._write_state()
        for child in self._children():
            if child.restart_handle is not None:
                child.restart_handle.cancel()
        grace = self.state_dir.take_stop_request()
        grace = self.config.grace if grace is None else grace
        services = list(self.services.values())
        await _terminate(services, grace, self.log)
        if self.nats is not None:
            await _terminate([self.nats], NATS_STOP_TIMEOUT_S, self.log)
        for child in self._children():
            child.record.pid = None
        if self.state.phase != "failed":
            self.state.phase = "stopped"
        self.state.stopped_at = time.time()
        self._write_state()
        self.log("info", "fabric stopped", exit_code=code)
        return code

    def _write_state(self) -> None:
        try:
            self.state_dir.write(self.state)
        except OSError as exc:  # a full disk must not take the fabric down
            self.log("error", "cannot write the state file", error=str(exc))


async def _terminate(children: list[Child], grace: float, log: Callable[..., None]) -> None:
    """SIGTERM, wait up to *grace* seconds, SIGKILL whatever is left, reap all."""
    procs = {c.name: c.proc for c in children if c.proc is not None and c.returncode_or_none() is None}
    running = [c for c in children if c.name in procs]
    for child in running:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        running = [c for c in running if c.proc is not None and c.proc.poll() is None]
    for child in running:
        log("warning", "child did not stop in time, killing it", child=child.name, pid=child.pid, grace_s=grace)
        child.signal(signal.SIGKILL)
    for child in running:
        assert child.proc is not None
        try:
            child.proc.wait(2.0)
        except subprocess.TimeoutExpired:  # unkillable (D state): nothing more to do
            log("error", "child survived SIGKILL", child=child.name, pid=child.proc.pid)
    for name, proc in procs.items():
        if proc.returncode is not None:
            log("info", "child stopped", child=name, pid=proc.pid, status=_describe_exit(proc.returncode))


def rotate_log(log: Path) -> None:
    """Keep the previous run's log as ``<name>.log.1``; each run starts a fresh log."""
    try:
        os.replace(log, log.with_name(log.name + ".1"))
    except FileNotFoundError:
        pass


def _promised_ports(env: dict[str, str]) -> set[int]:
    """The ports ``fabric up`` chose for the services (gateway, data plane), from their environment."""
    out = set()
    for key in ("gateway.http_port", "mem.data_port"):
        try:
            out.add(int(env.get(env_name(key), "0")))
        except ValueError:
            pass
    return out - {0}
