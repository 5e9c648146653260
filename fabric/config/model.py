"""The typed configuration of a fabric: one msgspec Struct per area, bounds and cross-field checks included.

This is the model every other part of :mod:`fabric.config` is derived from: the key
paths (``mem.capacity``), their environment names (:mod:`.keys`), the TOML layout and
the defaults.  The defaults are what fabric did before it had a configuration, so an
empty file changes nothing.  docs/config.md documents every key; keep the two in step.

Bounds live in the types (``msgspec.Meta``) and are checked whenever a configuration
is converted (:func:`msgspec.convert`, which :mod:`.load` uses); cross-field rules
live in ``__post_init__`` and hold for every instance, however it was made.  Every
section is frozen (a configuration never changes once read) and forbids unknown keys.
"""

from __future__ import annotations

import socket
from typing import Annotated

import msgspec
from msgspec import Meta

from ..protocol.subjects import NODE_NAME, sanitize_node_name

__all__ = ["FabricConfig", "NatsConfig", "UpConfig", "MemConfig", "PoolConfig", "TelemetryConfig", "TasksConfig",
           "GatewayConfig",
           "DEFAULT_NATS_URL", "LogLevel", "HINTS", "default_node"]

#: the NATS a service or client connects to when nothing says otherwise
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def default_node() -> str:
    """The node name when ``node`` is unset: this host's short name, sanitized (``db-1.example.com`` -> ``db-1``).

    One rule for ``fabric up`` and a service started on its own, so both name the node alike.
    """
    return sanitize_node_name(socket.gethostname().split(".")[0])

#: a logging level name, in any case ("info", "DEBUG")
LogLevel = Annotated[str, Meta(pattern=r"(?i)^(debug|info|warning|error|critical)$")]
#: a node name is one subject token (the contract's rule, fabric.protocol.subjects.NODE_NAME)
NodeName = Annotated[str, Meta(pattern=NODE_NAME.pattern)]
NatsUrl = Annotated[str, Meta(pattern=r"^(nats|tls|ws|wss)://")]
Bytes = Annotated[int, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
#: a spin time in microseconds (the warm worker refuses more than a second)
SpinUs = Annotated[float, Meta(ge=0, le=1_000_000)]


#: what a valid value of a key looks like, added to an error about it (the regex alone says little)
HINTS: dict[str, str] = {
    "node": "use 1 to 64 letters, digits, '_' and '-'",
    "nats.url": "expected nats://HOST:PORT (or tls://, ws://, wss://)",
    "log_level": "one of debug, info, warning, error, critical",
}


#: what an unset (None) key means, shown by ``fabric config show`` beside the "-"
UNSET_MEANS: dict[str, str] = {
    "node": "the host's short name",
    "state_dir": "the per-user state dir",
    "nats.url": "fabric up starts its own",
    "nats.server": "the one installed with fabric, else $PATH",
    "nats.credentials": "none: connect without auth",
    "up.services": "every known one",
    "mem.capacity": "a quarter of the RAM",
    "tasks.slots": "the logical CPUs",
}


class NatsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: the NATS to use: a service connects to it; ``fabric up`` joins it instead of starting one
    url: NatsUrl | None = None
    #: the address the embedded nats-server of ``fabric up`` binds to
    host: str = "127.0.0.1"
    #: the port of the embedded nats-server (0: pick a free one)
    port: Port = 4222
    #: the route port of the embedded nats-server once it is in a cluster (0: the one it had, else a free one)
    cluster_port: Port = 0
    #: the nats-server binary ``fabric up`` runs (default: the one installed with fabric, else $PATH)
    server: str | None = None
    #: the credentials file a service connects with (``fabric up`` gives each service its own)
    credentials: str | None = None


class UpConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: the services ``fabric up`` runs (default: every known one)
    services: list[str] | None = None
    #: how long ``fabric up`` waits until every service answers
    ready_timeout_s: Annotated[float, Meta(ge=0.1, le=3600)] = 30.0
    #: how long services get to drain when the fabric stops
    grace_s: Annotated[float, Meta(ge=0, le=3600)] = 10.0
    #: nkey authentication and per-role permissions on the embedded nats-server (docs/security.md)
    auth: bool = True
    #: TLS on the embedded nats-server, with the fabric's own CA (needs auth: credentials carry the CA)
    tls: bool = False


class MemConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: the allocator's arena size in bytes (default: a quarter of the node's RAM)
    capacity: Annotated[int, Meta(ge=1)] | None = None
    #: the quota of an owner without one of its own, in bytes in use (0: unlimited)
    quota: Bytes = 0
    #: quotas per owner, owner -> bytes in use (0: unlimited)
    quotas: dict[str, Bytes] = msgspec.field(default_factory=dict)
    #: the data plane: reads and writes point to point over TCP instead of through NATS (the allocator serves
    #: one, clients use it); a client reads this key from $FABRIC_MEM_DATA_PLANE (docs/protocol.md "Data plane")
    data_plane: bool = True
    #: the address the data plane listens on ("": the node's NATS address, which fabric up passes on)
    data_host: Annotated[str, Meta(max_length=255)] = ""
    #: its port (0: a free one, chosen by fabric up at the first start and kept in <state>/data.port; clients learn it
    #: from the ticket reply)
    data_port: Port = 0
    #: the largest frame one request or reply may be (a larger value travels in several)
    data_max_frame: Annotated[int, Meta(ge=1 << 16, le=(1 << 32) - 1)] = 64 << 20
    #: connections one user may hold open at once (each is one thread of the allocator)
    data_connections_per_user: Annotated[int, Meta(ge=1, le=4096)] = 16
    #: connections in all
    data_max_connections: Annotated[int, Meta(ge=1, le=65536)] = 256
    #: a connection idle this long between frames is closed (clients reconnect transparently)
    data_idle_s: Annotated[float, Meta(gt=0, le=86400)] = 60.0
    #: once a frame has started, the whole frame must arrive and its reply leave within this
    data_frame_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    #: how long a ticket admits a connection after it is issued
    data_ticket_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    #: TLS on the data plane: the certificate and key it serves with (fabric up --tls sets them to the node's)
    data_tls_cert: Annotated[str, Meta(max_length=4096)] = ""
    data_tls_key: Annotated[str, Meta(max_length=4096)] = ""


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: how long a pool's reader thread spins for the next result before it sleeps (docs/benchmarks.md)
    reader_spin_us: SpinUs = 250.0
    #: how long an idle warm worker spins on its job ring before it sleeps
    worker_spin_us: SpinUs = 1000.0


class TelemetryConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: the gpu-monitor's heartbeat interval
    interval_s: Annotated[float, Meta(ge=0.05, le=3600)] = 1.0
    #: how long a silent node stays in the registry (services/gpu_monitor/registry.py DEFAULT_TTL_S)
    node_ttl_s: Annotated[float, Meta(gt=0, le=86400)] = 5.0

    def __post_init__(self) -> None:
        # one late heartbeat must not drop a live node from the registry
        if self.node_ttl_s < 2 * self.interval_s:
            raise ValueError(f"telemetry.node_ttl_s ({self.node_ttl_s:g} s) must be at least twice the heartbeat "
                             f"interval telemetry.interval_s ({self.interval_s:g} s)")


class TasksConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: labels this node carries, matched by a task's Resources.labels
    labels: dict[str, Annotated[str, Meta(max_length=255)]] = msgspec.field(default_factory=dict)
    #: custom resources this node declares (name -> amount), held by tasks that ask for them
    resources: dict[str, Annotated[float, Meta(ge=0, le=1_000_000)]] = msgspec.field(default_factory=dict)
    #: tasks this node runs at once (the spawner's task pool); default: its logical CPUs
    slots: Annotated[int, Meta(ge=1, le=4096)] | None = None
    #: how long the record of an ended task is kept (the scheduler writes its end with this TTL)
    retention_s: Annotated[float, Meta(ge=1, le=365 * 24 * 3600)] = 86400.0


class SandboxConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: the OS user that processes and warm workers (cores, python and opencl tasks) of client-role users run as,
    #: when the spawner runs as root ("root": as the spawner, trusting every fabric user with root on the node)
    client_user: Annotated[str, Meta(max_length=64)] = "nobody"
    #: the Python interpreter client_user's workers run (default: the first of the spawner's own and the system's
    #: of the same version that user can run); the same Python version
    client_python: Annotated[str, Meta(max_length=4096)] = ""
    #: run only signed code: native executables, compute core libraries, Python tasks (fabric.signing)
    require_signed: bool = False
    #: the public keys (base64 ed25519, from ``fabric keys create``) whose signatures count
    trusted_keys: list[Annotated[str, Meta(pattern=r"^[A-Za-z0-9+/]{43}=$")]] = msgspec.field(default_factory=list)


#: what an HTTP caller may do (services/gateway/access.py): read state, submit work and use remote memory, or act
#: as the fabric's admin (every user's tasks)
Scope = Annotated[str, Meta(pattern=r"^(read|submit|admin)$")]


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: the address the HTTP gateway listens on (beyond loopback, every request needs a token)
    http_host: str = "127.0.0.1"
    #: its port (0: a free one, chosen at the first start and kept in the state directory)
    http_port: Port = 0
    #: what a request from loopback without a token may do (beyond loopback: nothing)
    loopback_scopes: list[Scope] = msgspec.field(default_factory=lambda: ["read"])
    #: the largest request body (bytes): a larger one is refused with 413 before it is read
    max_body: Annotated[int, Meta(ge=1024, le=1 << 30)] = 64 << 20
    #: requests per second each token (or each address, without one) may make, and the burst above that rate
    rate_per_s: Annotated[float, Meta(gt=0, le=1_000_000)] = 200.0
    burst: Annotated[int, Meta(ge=1, le=1_000_000)] = 400
    #: origins a browser may call the API from (CORS); none by default: only the gateway's own pages
    cors_origins: list[Annotated[str, Meta(max_length=255)]] = msgspec.field(default_factory=list)
    #: how many events an event-stream client may fall behind before the gateway drops it
    sse_queue: Annotated[int, Meta(ge=16, le=1_000_000)] = 1024
    #: the monitoring endpoint of this node's nats-server (its figures in /metrics, its routes in the topology);
    #: fabric up sets it for its embedded server; "": none
    nats_monitor_url: Annotated[str, Meta(max_length=255, pattern=r"^(https?://.*)?$")] = ""
    #: HTTPS: the certificate and key the gateway serves with (PEM files); fabric up --tls sets them to the node's
    #: certificate under the fabric's CA; "": plain HTTP
    tls_cert: Annotated[str, Meta(max_length=4096)] = ""
    tls_key: Annotated[str, Meta(max_length=4096)] = ""
    #: how many times a task's webhook is tried before it is recorded failed, the first wait between tries
    #: (doubled each time, at most 5 minutes), and how long one try may take (s)
    webhook_attempts: Annotated[int, Meta(ge=1, le=100)] = 8
    webhook_backoff_s: Annotated[float, Meta(ge=0.01, le=3600)] = 1.0
    webhook_timeout_s: Annotated[float, Meta(ge=0.1, le=300)] = 10.0


class FabricConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Everything a fabric is configured by (docs/config.md)."""

    #: this node's name (default: the host name, sanitized)
    node: NodeName | None = None
    #: the state directory (default: the per-user state dir)
    state_dir: str | None = None
    log_level: LogLevel = "info"
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    up: UpConfig = msgspec.field(default_factory=UpConfig)
    sandbox: SandboxConfig = msgspec.field(default_factory=SandboxConfig)
    mem: MemConfig = msgspec.field(default_factory=MemConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    tasks: TasksConfig = msgspec.field(default_factory=TasksConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
