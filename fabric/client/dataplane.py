"""The client's end of the data plane: remote memory's bytes straight to the allocator over TCP.

A node's allocator may serve a data plane (docs/protocol.md "Data plane"): the same FBF1
frames as ``fabric.mem.<node>.read`` / ``write``, on a TCP port of its own, so the bytes
skip the broker's two hops and both NATS clients' copies.  The memory area uses it
whenever the node offers one and this client can reach it, and NATS otherwise; nothing
changes for the caller but the speed.

* A connection is admitted by a one-use ticket asked for over NATS
  (``fabric.mem.<node>.ticket``, in the client's user form: the data port admits exactly
  who NATS admits); the ticket reply also says where the port is and whether it is TLS.
* The sync client (:class:`~fabric.client.dataplane_sync.SyncDataPlane`) does blocking I/O in the calling thread
  through :class:`fabric_ext.dataplane.Channel` (C, GIL released): no hop into the
  client's event-loop thread.  Connections are pooled per node; a thread takes one for
  a request and gives it back.  A forked child starts with none (it must never read
  the parent's stream).
* The async client (:class:`~fabric.client.dataplane_async.AsyncDataPlane`) keeps one
  pipelined connection per node: requests go out as they come, replies come back in order.
* This module is what both share: which nodes go over NATS for now and why (said once),
  where a ticket says to dial, the limits.
* Failure: a node whose data plane cannot be reached (refused, reset, no ticket
  endpoint) is used over NATS for :data:`RETRY_AFTER_S`, and the log says so once per
  node.  A request whose connection broke under it is done again over NATS (reads and
  writes are idempotent); one whose connection timed out raises
  :class:`~fabric.errors.RequestTimedOut` at once (the node is not answering: asking
  NATS would only wait a second timeout).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import urllib.parse
from typing import Final

from ..config.keys import env_name
from ..errors import FabricError, error_from_wire
from ..protocol.dataplane import Refused
from ..schema import TicketReply

log = logging.getLogger("fabric.client")


#: a node whose data plane failed is used over NATS for this long, then tried again
RETRY_AFTER_S: Final = 30.0
#: idle connections kept per node (the sync client's pool)
MAX_IDLE_PER_NODE: Final = 8
#: the frame header and item table of a one-item frame, and then some: a chunk's bytes are max_frame less this
FRAME_ROOM: Final = 4096


class UseNats:
    """The answer "do this over NATS" (the node offers no data plane, or it failed)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NATS"


NATS: Final = UseNats()


def chunk_of(max_frame: int) -> int:
    """The most bytes of a value one request or reply carries on a connection of *max_frame*."""
    return max_frame - FRAME_ROOM


def enabled_by_default() -> bool:
    """The configuration's ``mem.data_plane`` as a client reads it: ``$FABRIC_MEM_DATA_PLANE`` (default on)."""
    value = os.environ.get(env_name("mem.data_plane"), "").strip().lower()
    return value not in ("0", "false", "no", "off")


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)``; raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bad data plane address {addr!r}")
    return host.strip("[]"), int(port)


def refused_error(exc: Refused) -> FabricError:
    """The fabric error an FDPE (or a failed item's status) stands for."""
    return error_from_wire(exc.code, exc.message, exc.kind or None)


# a refusal after which the server closes the connection (or may have: the client closes it too)
CLOSING_KINDS: Final = frozenset({"invalid_frame", "too_large", "internal"})


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class NodeRoutes:
    """Which nodes are used over NATS for now, and the one log line per node that says why.

    *nats_url*: the NATS this client uses.  A data plane that names a loopback address is
    dialled only by a client whose NATS is on loopback too (on the node's own host): from
    another host that address would be the client's own machine, and the ticket would go
    to whatever listens there.
    """

    def __init__(self, nats_url: str = "") -> None:
        self._off: dict[str, float] = {}
        self._said: set[str] = set()
        first = nats_url.split(",")[0].strip()
        self.loopback_ok = not first or is_loopback(urllib.parse.urlsplit(first).hostname)

    def destination(self, node: str, reply: TicketReply | FabricError) -> tuple[str, int] | None:
        """Where a ticket *reply* says to dial; None (said once why) when the node's memory goes over NATS:
        no ticket (the error asking for one), or no data plane there, or one this client may not dial."""
        if isinstance(reply, FabricError):
            self.fail(node, "gave no ticket", reply.message)
            return None
        if not reply.data_addr:
            self.serves_none(node)
            return None
        return self.reachable(node, reply.data_addr)

    def reachable(self, node: str, addr: str) -> tuple[str, int] | None:
        """``(host, port)`` of *addr* when this client may dial it; else says why (once) and None."""
        try:
            host, port = split_addr(addr)
        except ValueError as exc:
            self.fail(node, f"at {addr!r}", str(exc))
            return None
        if is_loopback(host) and not self.loopback_ok:
            self.fail(node, f"at {addr}", "a loopback address, and this client's NATS is on another host")
            return None
        return host, port

    def usable(self, node: str) -> bool:
        until = self._off.get(node)
        return until is None or time.monotonic() >= until

    def fail(self, node: str, where: str, reason: str) -> None:
        self._off[node] = time.monotonic() + RETRY_AFTER_S
        if node not in self._said:
            self._said.add(node)
            log.warning("data plane of node %s %s: %s; using NATS for its memory (tried again every %.0f s)",
                        node, where, reason, RETRY_AFTER_S)

    def serves_none(self, node: str) -> None:
        self._off[node] = time.monotonic() + RETRY_AFTER_S
        if node not in self._said:
            self._said.add(node)
            log.info("node %s serves no data plane: its memory goes over NATS", node)
