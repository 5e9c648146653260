"""The sync client's data plane: blocking connections in the caller's thread, pooled per node.

See :mod:`fabric.client.dataplane` for the whole picture.  Each request runs in the thread
that asked, through :class:`fabric_ext.dataplane.Channel` (C, GIL released; a Python twin
over TLS); a thread takes a connection from its node's pool for one request and gives it
back.  A forked child starts with none: it must never read the parent's stream.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import FabricError, RequestTimedOut
from ..protocol import dataplane, wire
from ..protocol.dataplane import Broken, Channel, Refused
from ..schema import TicketReply
from .dataplane import CLOSING_KINDS, MAX_IDLE_PER_NODE, NATS, NodeRoutes, UseNats, chunk_of, refused_error

T = TypeVar("T")


def _ask(ticket: Callable[[str], TicketReply], node: str) -> TicketReply | FabricError:
    """A ticket for *node*, or the error asking for one gave (no ticket endpoint: an older allocator; no answer)."""
    try:
        return ticket(node)
    except FabricError as exc:
        return exc


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
        return chunk_of(self.max_frame)

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
        if len(items) < dataplane.MAX_PARTS:
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

    def _open(self, node: str, ticket: Callable[[str], TicketReply]) -> SyncConnection | UseNats:
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
             op: Callable[[SyncConnection], T]) -> T | UseNats:
        """``op(connection)`` on a connection to *node*'s data plane; :data:`NATS` when it cannot be done there."""
        if self._closed or not self.routes.usable(node):
            return NATS
        conn: SyncConnection | UseNats | None = self._take(node)
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
                if exc.kind in CLOSING_KINDS:
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
