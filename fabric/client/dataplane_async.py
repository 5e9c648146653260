"""The async client's data plane: one pipelined connection per node, on the client's event loop.

See :mod:`fabric.client.dataplane` for the whole picture.  Requests go out as they come and
replies come back in order (asyncio streams, the frame length and FDPE read by the C codec).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import FabricError, InvalidFrame, RequestTimedOut
from ..protocol import dataplane, wire
from ..protocol.dataplane import Broken, Refused
from ..schema import TicketReply
from .dataplane import NATS, NodeRoutes, UseNats, chunk_of, refused_error


async def _ask_async(ticket: Callable[[str], Awaitable[TicketReply]], node: str) -> TicketReply | FabricError:
    """:func:`_ask` for the async client."""
    try:
        return await ticket(node)
    except FabricError as exc:
        return exc


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
        return chunk_of(self.max_frame)

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
        self._opening: dict[str, asyncio.Future[AsyncConnection | UseNats]] = {}
        self._closed = False

    async def connection(self, node: str,
                         ticket: Callable[[str], Awaitable[TicketReply]]) -> AsyncConnection | UseNats:
        if self._closed or not self.routes.usable(node):
            return NATS
        conn = self._conns.get(node)
        if conn is not None and not conn.stale():
            return conn
        pending = self._opening.get(node)
        if pending is not None:  # one connect per node at a time; the others wait for it
            return await asyncio.shield(pending)
        fut: asyncio.Future[AsyncConnection | UseNats] = asyncio.get_running_loop().create_future()
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

    async def _open(self, node: str, ticket: Callable[[str], Awaitable[TicketReply]]) -> AsyncConnection | UseNats:
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
                   parts: Sequence[Any]) -> bytes | UseNats:
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
