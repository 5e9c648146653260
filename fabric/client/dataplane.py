"""The client's end of the data plane: remote memory's bytes straight to the allocator over TCP.

A node's allocator may serve a data plane (docs/protocol.md "Data plane"): the same FBF1
frames as ``fabric.mem.<node>.read`` / ``write``, on a TCP port of its own, so the bytes
skip the broker's two hops and both NATS clients' copies.  The memory area uses it
whenever the node offers one and this client can reach it, and NATS otherwise; nothing
changes for the caller but the speed.

* A connection is admitted by a one-use ticket asked for over NATS
  (``fabric.mem.<node>.ticket``, in the client's user form: the data port admits exactly
  who NATS admits); the ticket reply also says where the port is and whether it is TLS.
* The sync client (:class:`SyncDataPlane`) does blocking I/O in the calling thread
  through :class:`fabric_ext.dataplane.Channel` (C, GIL released): no hop into the
  client's event-loop thread.  Connections are pooled per node; a thread takes one for
  a request and gives it back.  A forked child starts with none (it must never read
  the parent's stream).
* The async client (:class:`AsyncDataPlane`) keeps one pipelined connection per node:
  requests go out as they come, replies come back in order.
* Failure: a node whose data plane cannot be reached (refused, reset, no ticket
  endpoint) is used over NATS for :data:`RETRY_AFTER_S`, and the log says so once per
  node.  A request whose connection broke under it is done again over NATS (reads and
  writes are idempotent); one whose connection timed out raises
  :class:`~fabric.errors.RequestTimedOut` at once (the node is not answering: asking
  NATS would only wait a second timeout).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from ..config.keys import env_name
from ..errors import FabricError, InvalidFrame, RequestTimedOut, error_from_wire
from ..protocol import dataplane, wire
from ..protocol.dataplane import Broken, Channel, Refused
from ..schema import TicketReply

log = logging.getLogger("fabric.client")

T = TypeVar("T")

#: a node whose data plane failed is used over NATS for this long, then tried again
RETRY_AFTER_S: Final = 30.0
#: idle connections kept per node (the sync client's pool)
MAX_IDLE_PER_NODE: Final = 8
#: the frame header and item table of a one-item frame, and then some: a chunk's bytes are max_frame less this
FRAME_ROOM: Final = 4096
#: buffers one scatter-gather send takes (fabric_ext.dataplane); a batch of more items is copied into one frame
_PARTS_MAX: Final = 64


class _UseNats:
    """The answer "do this over NATS" (the node offers no data plane, or it failed)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NATS"


NATS: Final = _UseNats()


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
_CLOSING_KINDS: Final = frozenset({"invalid_frame", "too_large", "internal"})


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


def _ask(ticket: Callable[[str], TicketReply], node: str) -> TicketReply | FabricError:
    """A ticket for *node*, or the error asking for one gave (no ticket endpoint: an older allocator; no answer)."""
    try:
        return ticket(node)
    except FabricError as exc:
        return exc


async def _ask_async(ticket: Callable[[str], Awaitable[TicketReply]], node: str) -> TicketReply | FabricError:
    """:func:`_ask` for the async client."""
    try:
        return await ticket(node)
    except FabricError as exc:
        return exc


# -- the sync client's connections ------------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionResetError("the data plane closed the connection")
        got += k
    return bytes(buf)


def _handshake(sock: socket.socket, ticket: str) -> tuple[int, int]:
    """Send HELLO, read WELCOME (or the FDPE that refuses us): ``(max_frame, idle_ms)``."""
    sock.sendall(dataplane.hello(ticket))
    head = _recv_exactly(sock, dataplane.ERROR_FIXED)
    if head[:4] == dataplane.ERROR_MAGIC:
        head += _recv_exactly(sock, dataplane.error_frame_length(head) - dataplane.ERROR_FIXED)
        code, kind, message, _ = dataplane.parse_error(head)
        raise Refused(code, kind, message)
    return dataplane.parse_welcome(head + _recv_exactly(sock, dataplane.WELCOME_SIZE - dataplane.ERROR_FIXED))


class _TlsChannel:
    """:class:`fabric_ext.dataplane.Channel`'s requests over a TLS socket (ssl does its own I/O)."""

    def __init__(self, sock: ssl.SSLSocket, timeout_s: float, max_frame: int) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.max_frame = max_frame

    def request(self, parts: Sequence[Any]) -> bytes:
        sock = self.sock
        sock.settimeout(self.timeout_s)
        sent = False
        try:
            for part in parts:
                sock.sendall(part)
                sent = True
            head = _recv_exactly(sock, dataplane.ERROR_FIXED)
            if head[:4] == dataplane.ERROR_MAGIC:
                head += _recv_exactly(sock, dataplane.error_frame_length(head) - dataplane.ERROR_FIXED)
                code, kind, message, _ = dataplane.parse_error(head)
                raise Refused(code, kind, message)
            head += _recv_exactly(sock, wire.HEADER_SIZE - dataplane.ERROR_FIXED)
            total = wire.frame_length(head, max_payload=self.max_frame)
            return head + _recv_exactly(sock, total - wire.HEADER_SIZE)
        except TimeoutError:
            raise Broken("data plane reply timed out", "timeout", sent) from None
        except OSError as exc:
            raise Broken(f"data plane connection failed ({exc})", f"error: {exc}", sent) from None

    def read(self, frame: bytes) -> bytes:
        payloads, statuses = wire.decode_payloads(self.request((frame,)))
        if statuses is not None and statuses[0]:
            raise Refused(statuses[0], "", f"read failed with {statuses[0]}")
        return payloads[0]

    def write(self, head: bytes, data: Any) -> int:
        ack = wire.decode(self.request((head, data)))
        _h, _o, written, status = ack.items[0]
        if status:
            raise Refused(status, "", f"write failed with {status}")
        return written


class SyncConnection:
    """One admitted connection of the sync client (used by one thread at a time)."""

    __slots__ = ("sock", "channel", "node", "addr", "max_frame", "idle_s", "used_at")

    def __init__(self, node: str, addr: str, sock: socket.socket, channel: Channel | _TlsChannel,
                 max_frame: int, idle_ms: int) -> None:
        self.node, self.addr, self.sock, self.channel = node, addr, sock, channel
        self.max_frame = max_frame
        self.idle_s = idle_ms / 1000
        self.used_at = time.monotonic()

    @property
    def chunk(self) -> int:
        """The most bytes one request or reply of this connection carries."""
        return self.max_frame - FRAME_ROOM

    def stale(self) -> bool:
        # the server closes a connection idle for idle_s: never start a request on one near that age
        return time.monotonic() - self.used_at > self.idle_s * 0.8

    def read(self, token: str, offset: int, length: int) -> bytes:
        return self.channel.read(wire.encode(wire.KIND_READ, [(token, offset, length, 0)]))

    def write(self, token: str, offset: int, data: memoryview) -> int:
        return self.channel.write(wire.encode_head(wire.KIND_WRITE, [(token, offset, len(data), 0)]), data)

    def request(self, parts: Sequence[Any]) -> bytes | bytearray:
        return self.channel.request(parts)

    def read_all(self, token: str, offset: int, length: int) -> bytes:
        """*length* bytes at *offset*, in pieces of at most :attr:`chunk` (one request each)."""
        chunk = self.chunk
        if length <= chunk:
            return self.read(token, offset, length)
        return b"".join([self.read(token, offset + i, min(chunk, length - i)) for i in range(0, length, chunk)])

    def write_all(self, token: str, offset: int, data: memoryview) -> int:
        """All of *data* at *offset*, in pieces of at most :attr:`chunk`; the bytes written."""
        chunk, size = self.chunk, len(data)
        if size <= chunk:
            return self.write(token, offset, data)
        return sum(self.write(token, offset + i, data[i:i + chunk]) for i in range(0, size, chunk))

    def write_batch(self, items: Sequence[tuple[str, int, memoryview]]) -> bytes | bytearray:
        """One WRITE frame of many items: the ACK frame (the items' bytes sent from where they are)."""
        table = [(t, o, len(d), 0) for t, o, d in items]
        if len(items) < _PARTS_MAX:
            return self.channel.request((wire.encode_head(wire.KIND_WRITE, table), *(d for _t, _o, d in items)))
        return self.channel.request((wire.encode(wire.KIND_WRITE, table, [d for _t, _o, d in items]),))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SyncDataPlane:
    """The sync client's data plane connections, pooled per node (thread-safe; a forked child gets none)."""

    def __init__(self, routes: NodeRoutes, timeout: float, tls: Callable[[], ssl.SSLContext | None]) -> None:
        self.routes = routes
        self.timeout = timeout
        self._tls = tls
        self._idle: dict[str, list[SyncConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False
        _PLANES.add(self)

    def _after_fork(self) -> None:
        """In a forked child: never touch the parent's connections (two processes on one stream would read each
        other's replies); closing the child's copy of each descriptor leaves the parent's open."""
        self._lock = threading.Lock()  # a parent thread may have held it at the fork
        self._closed = True
        pools, self._idle = self._idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()

    def _take(self, node: str) -> SyncConnection | None:
        with self._lock:
            pool = self._idle.get(node)
            while pool:
                conn = pool.pop()
                if not conn.stale():
                    return conn
                conn.close()
        return None

    def _give(self, conn: SyncConnection) -> None:
        conn.used_at = time.monotonic()
        with self._lock:
            pool = self._idle.setdefault(conn.node, [])
            if not self._closed and len(pool) < MAX_IDLE_PER_NODE:
                pool.append(conn)
                return
        conn.close()

    def _open(self, node: str, ticket: Callable[[str], TicketReply]) -> SyncConnection | _UseNats:
        reply = _ask(ticket, node)
        if (where := self.routes.destination(node, reply)) is None or isinstance(reply, FabricError):
            return NATS
        host, port = where
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if reply.tls:
                ctx = self._tls()
                if ctx is None:
                    raise ssl.SSLError("the data plane is TLS and this client has no CA to trust it with")
                sock = ctx.wrap_socket(sock, server_hostname=host)
            max_frame, idle_ms = _handshake(sock, reply.ticket)
            channel: Channel | _TlsChannel = (_TlsChannel(sock, self.timeout, max_frame)
                                              if isinstance(sock, ssl.SSLSocket)
                                              else Channel(sock, self.timeout, max_frame))
            return SyncConnection(node, reply.data_addr, sock, channel, max_frame, idle_ms)
        except Refused as exc:
            if sock is not None:
                sock.close()
            if exc.kind == "rate_limited":  # this user holds its share of connections: NATS for this request only
                return NATS
            self.routes.fail(node, f"at {reply.data_addr} refused the connection", f"{exc.kind}: {exc.message}")
            return NATS
        except (OSError, ValueError, FabricError) as exc:
            if sock is not None:
                sock.close()
            self.routes.fail(node, f"at {reply.data_addr} is unreachable", str(exc) or type(exc).__name__)
            return NATS

    def call(self, node: str, ticket: Callable[[str], TicketReply],
             op: Callable[[SyncConnection], T]) -> T | _UseNats:
        """``op(connection)`` on a connection to *node*'s data plane; :data:`NATS` when it cannot be done there."""
        if self._closed or not self.routes.usable(node):
            return NATS
        conn: SyncConnection | _UseNats | None = self._take(node)
        fresh = conn is None
        if conn is None:
            conn = self._open(node, ticket)
            if conn is NATS:
                return NATS
        assert isinstance(conn, SyncConnection)
        while True:
            try:
                result = op(conn)
            except Refused as exc:
                if exc.kind in _CLOSING_KINDS:
                    conn.close()
                else:
                    self._give(conn)
                raise refused_error(exc) from None
            except Broken as exc:
                conn.close()
                if exc.reason == "timeout":
                    raise RequestTimedOut(f"node {node}'s data plane ({conn.addr}) did not answer within "
                                          f"{self.timeout:g} s") from None
                if not fresh:  # a pooled connection the server had closed: once more on a new one
                    fresh = True
                    conn = self._open(node, ticket)
                    if conn is NATS:
                        return NATS
                    assert isinstance(conn, SyncConnection)
                    continue
                self.routes.fail(node, f"at {conn.addr} broke a request", exc.reason)
                return NATS
            except BaseException:
                conn.close()  # the stream's state is unknown (e.g. a KeyboardInterrupt mid-reply)
                raise
            self._give(conn)
            return result

    def max_chunk(self, node: str, ticket: Callable[[str], TicketReply]) -> int | _UseNats:
        """The most bytes one request to *node* carries, opening a connection if need be."""
        return self.call(node, ticket, lambda c: c.chunk)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()


_PLANES: weakref.WeakSet[SyncDataPlane] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for plane in list(_PLANES):
        plane._after_fork()


os.register_at_fork(after_in_child=_forget_after_fork)


# -- the async client's connections ----------------------------------------------------------


class AsyncConnection:
    """One pipelined connection of the async client: requests go out in order, replies come back in order."""

    def __init__(self, node: str, addr: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int, idle_ms: int) -> None:
        self.node, self.addr = node, addr
        self.reader, self.writer = reader, writer
        self.max_frame = max_frame
        self.idle_s = idle_ms / 1000
        self.used_at = time.monotonic()
        self.closed = False
        self._waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._task = asyncio.ensure_future(self._read_replies())

    @property
    def chunk(self) -> int:
        return self.max_frame - FRAME_ROOM

    def stale(self) -> bool:
        return self.closed or (not self._waiters and time.monotonic() - self.used_at > self.idle_s * 0.8)

    async def request(self, parts: Sequence[Any], timeout: float) -> bytes:
        if self.closed:
            raise Broken("the data plane connection is closed", "closed", False)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.used_at = time.monotonic()
        self.writer.writelines(parts)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.close()  # the replies' order is lost with this one: nothing else may use the connection
            raise Broken("data plane reply timed out", "timeout", True) from None

    async def _read_replies(self) -> None:
        reader = self.reader
        failure: BaseException = Broken("the data plane closed the connection", "closed", True)
        try:
            while True:
                head = await reader.readexactly(dataplane.ERROR_FIXED)
                if head[:4] == dataplane.ERROR_MAGIC:
                    head += await reader.readexactly(dataplane.error_frame_length(head) - dataplane.ERROR_FIXED)
                    code, kind, message, _ = dataplane.parse_error(head)
                    result: bytes | BaseException = Refused(code, kind, message)
                else:
                    head += await reader.readexactly(wire.HEADER_SIZE - dataplane.ERROR_FIXED)
                    total = wire.frame_length(head, max_payload=self.max_frame)
                    result = head + await reader.readexactly(total - wire.HEADER_SIZE)
                if not self._waiters:
                    raise InvalidFrame("the data plane sent a reply nobody asked for")
                fut = self._waiters.popleft()
                if not fut.done():
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            failure = Broken(f"data plane connection failed ({exc!r})", "closed", True)
        except FabricError as exc:  # a reply that breaks the framing: this connection is done
            failure = Broken(f"data plane reply unreadable ({exc.message})", "invalid", True)
        except asyncio.CancelledError:
            failure = Broken("the data plane connection was closed", "closed", True)
        finally:
            self.closed = True
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_exception(failure)
            self.writer.close()

    def close(self) -> None:
        self.closed = True
        self._task.cancel()
        self.writer.close()


class AsyncDataPlane:
    """The async client's data plane: one pipelined connection per node, opened on first use."""

    def __init__(self, routes: NodeRoutes, timeout: float, tls: Callable[[], ssl.SSLContext | None]) -> None:
        self.routes = routes
        self.timeout = timeout
        self._tls = tls
        self._conns: dict[str, AsyncConnection] = {}
        self._opening: dict[str, asyncio.Future[AsyncConnection | _UseNats]] = {}
        self._closed = False

    async def connection(self, node: str,
                         ticket: Callable[[str], Awaitable[TicketReply]]) -> AsyncConnection | _UseNats:
        if self._closed or not self.routes.usable(node):
            return NATS
        conn = self._conns.get(node)
        if conn is not None and not conn.stale():
            return conn
        pending = self._opening.get(node)
        if pending is not None:  # one connect per node at a time; the others wait for it
            return await asyncio.shield(pending)
        fut: asyncio.Future[AsyncConnection | _UseNats] = asyncio.get_running_loop().create_future()
        self._opening[node] = fut
        try:
            got = await self._open(node, ticket)
            if isinstance(got, AsyncConnection):
                old = self._conns.pop(node, None)
                if old is not None:
                    old.close()
                self._conns[node] = got
            fut.set_result(got)
            return got
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a waiter that was cancelled must not leave it "never retrieved"
            raise
        finally:
            del self._opening[node]

    async def _open(self, node: str, ticket: Callable[[str], Awaitable[TicketReply]]) -> AsyncConnection | _UseNats:
        reply = await _ask_async(ticket, node)
        if (where := self.routes.destination(node, reply)) is None or isinstance(reply, FabricError):
            return NATS
        host, port = where
        writer: asyncio.StreamWriter | None = None
        try:
            ctx = self._tls() if reply.tls else None
            if reply.tls and ctx is None:
                raise ssl.SSLError("the data plane is TLS and this client has no CA to trust it with")
            reader, opened = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host if ctx else None,
                                        limit=1 << 20), self.timeout)
            writer = opened
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(dataplane.hello(reply.ticket))
            head = await asyncio.wait_for(reader.readexactly(dataplane.ERROR_FIXED), self.timeout)
            if head[:4] == dataplane.ERROR_MAGIC:
                head += await asyncio.wait_for(
                    reader.readexactly(dataplane.error_frame_length(head) - dataplane.ERROR_FIXED), self.timeout)
                code, kind, message, _ = dataplane.parse_error(head)
                raise Refused(code, kind, message)
            head += await asyncio.wait_for(
                reader.readexactly(dataplane.WELCOME_SIZE - dataplane.ERROR_FIXED), self.timeout)
            max_frame, idle_ms = dataplane.parse_welcome(head)
            return AsyncConnection(node, reply.data_addr, reader, opened, max_frame, idle_ms)
        except Refused as exc:
            if writer is not None:
                writer.close()
            if exc.kind != "rate_limited":
                self.routes.fail(node, f"at {reply.data_addr} refused the connection", f"{exc.kind}: {exc.message}")
            return NATS
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, FabricError) as exc:
            if writer is not None:
                writer.close()
            self.routes.fail(node, f"at {reply.data_addr} is unreachable", str(exc) or type(exc).__name__)
            return NATS

    async def call(self, node: str, ticket: Callable[[str], Awaitable[TicketReply]],
                   parts: Sequence[Any]) -> bytes | _UseNats:
        """Send one request frame (its parts) to *node*; the whole reply frame, or :data:`NATS`."""
        conn = await self.connection(node, ticket)
        if conn is NATS:
            return NATS
        assert isinstance(conn, AsyncConnection)
        retried = False
        while True:
            try:
                return await conn.request(parts, self.timeout)
            except Refused as exc:
                raise refused_error(exc) from None
            except Broken as exc:
                if exc.reason == "timeout":
                    raise RequestTimedOut(f"node {node}'s data plane ({conn.addr}) did not answer within "
                                          f"{self.timeout:g} s") from None
                if not retried:  # the server had closed it (idle, restart): once more on a new one
                    retried = True
                    got = await self.connection(node, ticket)
                    if got is NATS:
                        return NATS
                    assert isinstance(got, AsyncConnection)
                    conn = got
                    continue
                self.routes.fail(node, f"at {conn.addr} broke a request", exc.reason)
                return NATS

    async def close(self) -> None:
        self._closed = True
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            conn.close()
        await asyncio.sleep(0)  # let the reader tasks see their cancellation


