"""The NATS subjects of the public contract (docs/protocol.md "Subjects"), spelled once.

Cluster-wide endpoints are ``fabric.<area>.<verb>`` and listen in a queue group, so any
instance answers.  Requests that must reach one node use the node-scoped form
``fabric.<area>.<node>.<verb>``: a memory handle names its node, so a client derives
the subject from the handle alone and never needs to know the topology.  The areas are
the constants below; ``$SRV`` discovery subjects (ADR-32) and the telemetry heartbeats
are spelled here too.  Part of :mod:`fabric.protocol` (stdlib only).
"""

from __future__ import annotations

import re
from typing import Final

PREFIX: Final = "fabric"
NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: the queue group every cluster-wide endpoint of a service listens in
QUEUE_GROUP: Final = "fabric"

#: the areas of the contract: remote memory, processes, compute cores, nodes, tasks, heartbeats
MEM: Final = "mem"
PROC: Final = "proc"
CORE: Final = "core"
NODES: Final = "nodes"
TASK: Final = "task"
TELEMETRY: Final = "telemetry"
GATEWAY: Final = "gateway"


# The verbs of each area, as docs/protocol.md lists them: the services serve exactly these
# and the client asks for them by name (tests/test_protocol_doc.py checks the three agree).


class Mem:
    """``fabric.mem.<node>.<verb>`` (the allocator); ``alloc`` is also cluster-wide."""

    ALLOC: Final = "alloc"
    FREE: Final = "free"
    REALLOC: Final = "realloc"
    WRITE: Final = "write"
    READ: Final = "read"
    READV: Final = "readv"
    WRITEV: Final = "writev"
    STAT: Final = "stat"
    SHARE: Final = "share"
    RENEW: Final = "renew"
    ATTACH: Final = "attach"
    INFO: Final = "info"
    #: a one-use admission to the node's data plane (bytes point to point over TCP)
    TICKET: Final = "ticket"


class Proc:
    """``fabric.proc.<node>.<verb>`` (the spawner's processes); ``spawn`` is also cluster-wide."""

    SPAWN: Final = "spawn"
    WAIT: Final = "wait"
    KILL: Final = "kill"
    STDIN: Final = "stdin"
    STATUS: Final = "status"
    LIST: Final = "list"
    INFO: Final = "info"
    #: ``fabric.proc.<node>.out.<local>``: where a process's output is published (not a request)
    OUT: Final = "out"


class Core:
    """``fabric.core.<node>.<verb>`` (the spawner's compute cores); ``load`` is also cluster-wide.

    ``run`` and ``map`` take the core id as one more token: ``fabric.core.<node>.run.<core>``.
    """

    LOAD: Final = "load"
    LIST: Final = "list"
    STATS: Final = "stats"
    UNLOAD: Final = "unload"
    RUN: Final = "run"
    MAP: Final = "map"


class Nodes:
    """``fabric.nodes.<verb>`` (cluster-wide) and ``fabric.nodes.<node>.<verb>`` (the gpu-monitor)."""

    LIST: Final = "list"
    GET: Final = "get"
    DEVICES: Final = "devices"
    INFO: Final = "info"
    GPUS: Final = "gpus"


class Task:
    """``fabric.task.<verb>`` (the active scheduler; standbys do not listen).

    ``pull`` is the spawners' side: a node asks for work and reports results.
    ``events`` is published, not requested: every state change, in batches.
    """

    SUBMIT: Final = "submit"
    MAP: Final = "map"
    GET: Final = "get"
    WAIT: Final = "wait"
    CANCEL: Final = "cancel"
    LIST: Final = "list"
    #: a stored (large) result's bytes, and its deletion: the client reads results through the scheduler
    RESULT: Final = "result"
    RELEASE: Final = "release"
    PULL: Final = "pull"
    #: a gateway reports how a task's webhook went (kept on the record); like pull, trusted callers only
    CALLBACK: Final = "callback"
    #: the active scheduler's figures (tasks by state, by priority, ended, latency); trusted callers only
    STATS: Final = "stats"
    #: ``fabric.task.events``: where state changes are published (not a request)
    EVENTS: Final = "events"
    #: ``fabric.task.body.<id>``: the subjects of stream FABRIC_TASK_BODIES (not a request)
    BODY: Final = "body"


class Gateway:
    """``fabric.gateway.<verb>`` (any gateway) and ``fabric.gateway.<node>.<verb>`` (that node's HTTP gateway)."""

    INFO: Final = "info"


#: every (area, verb) a request can be sent to, for the checks that hold client, services and docs together
REQUEST_VERBS: Final = {
    MEM: frozenset(v for k, v in vars(Mem).items() if k.isupper()),
    PROC: frozenset(v for k, v in vars(Proc).items() if k.isupper() and k != "OUT"),
    CORE: frozenset(v for k, v in vars(Core).items() if k.isupper()),
    NODES: frozenset(v for k, v in vars(Nodes).items() if k.isupper()),
    TASK: frozenset(v for k, v in vars(Task).items() if k.isupper() and k not in ("EVENTS", "BODY")),
    GATEWAY: frozenset(v for k, v in vars(Gateway).items() if k.isupper()),
}

#: where a machine asks to join this fabric as a node (``fabric up --nats-url URL --token T``): answered by
#: the supervisor of the fabric that issued the token, and publishable only with the token's identity
JOIN_REQUEST: Final = "fabric.join.request"

#: the ADR-32 discovery verbs every service answers
SRV_PREFIX: Final = "$SRV"
SRV_VERBS: Final = ("PING", "INFO", "STATS")


def cluster(area: str, verb: str) -> str:
    """``fabric.<area>.<verb>``: answered by any instance (queue group)."""
    return f"{PREFIX}.{area}.{verb}"


def node_scoped(area: str, node: str, verb: str) -> str:
    """``fabric.<area>.<node>.<verb>``: answered by the service on *node*."""
    return f"{PREFIX}.{area}.{node}.{verb}"


def telemetry(node: str) -> str:
    """``fabric.telemetry.<node>``: where a node's gpu-monitor publishes its heartbeats (``*``: all nodes)."""
    return f"{PREFIX}.{TELEMETRY}.{node}"


def srv(verb: str, name: str = "", service_id: str = "") -> str:
    """``$SRV.<verb>[.<name>[.<id>]]``: ADR-32 discovery, of every service, one by name, or one instance."""
    return ".".join(p for p in (SRV_PREFIX, verb, name, service_id) if p)


def valid_node_name(node: str) -> bool:
    """Node names are single subject tokens: letters, digits, ``_`` and ``-``."""
    return bool(NODE_NAME.match(node))


def sanitize_node_name(raw: str) -> str:
    """Turn a host name into a valid node name (``db-1.example.com`` -> ``db-1_example_com``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:64]
    return cleaned or "node"
