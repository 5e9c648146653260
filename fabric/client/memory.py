"""The memory area: rmalloc, rread, rwrite and the rest of docs/protocol.md "Memory".

Control requests (alloc, free, realloc, stat, share, renew) are JSON; reads and
writes are frames of :mod:`fabric_ext.wire`, split into chunks past the max payload
(reads past ``read_chunk_size``) and sent a few at a time.  A block whose allocator
runs on this host is read and written through the local fast path
(:mod:`fabric.client.local`) instead; a remote block's reads and writes go over its
node's data plane when it serves one (:mod:`fabric.client.dataplane`), in pieces of up
to its frame limit.  Leased blocks are renewed by a
:class:`~fabric.leases.LeaseKeeper` the area makes on first use.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from ..errors import FabricError, TooLarge, error_from_wire
from ..handles import _PARSED, HandleParts
from ..handles import parse_cached as parse
from ..leases import LeaseKeeper
from ..protocol import subjects, wire
from ..schema import (
    JSON,
    AllocReply,
    AllocRequest,
    AttachReply,
    FreeReply,
    HandleRequest,
    MemInfoReply,
    ReallocRequest,
    RenewReply,
    RenewRequest,
    ShareReply,
    StatReply,
    TicketReply,
)
from .buffers import _BUFFER_TYPES, AsyncRemoteBuffer, _check_size, _token
from .dataplane import NATS, NodeRoutes
from .dataplane_async import AsyncConnection, AsyncDataPlane
from .local import _local_length, _LocalSegments
from .transport import Transport, _arguments_checked, _in_flight

if TYPE_CHECKING:
    from fabric_ext.arena import SegmentView

    from .aio import AsyncFabricClient


class _RedoOverNats(Exception):
    """A piece sized for the data plane found it gone: the memory call starts again, over NATS."""


class MemoryArea(Transport):
    """Remote memory: the ``r*`` calls of the async client."""

    _local: _LocalSegments
    _leases: LeaseKeeper | None

    def _init_memory(self, local: bool, data_plane: bool = False) -> None:
        self._local = _LocalSegments(local)
        self._leases = None  # made on first use, on the running loop
        #: the data plane (fabric.client.dataplane): which nodes use NATS for now, shared with the sync client
        self._dp_routes = NodeRoutes(self.url)
        self._dp_enabled = data_plane
        self._adp = AsyncDataPlane(self._dp_routes, self.timeout, self._tls_context) if data_plane else None
        self._tls_ctx: ssl.SSLContext | None | bool = False  # False: not made yet

    async def _close_memory(self) -> None:
        if self._leases is not None:
            await self._leases.close()  # renewals stop: leased blocks lapse after their ttl
        if self._adp is not None:
            await self._adp.close()
        self._local.close()

    def _tls_context(self) -> ssl.SSLContext | None:
        """The context a TLS data plane is trusted with: the fabric's CA, from the credentials (None: none)."""
        if self._tls_ctx is False:
            self._tls_ctx = self.credentials.tls_context() if self.credentials is not None else None
        return cast("ssl.SSLContext | None", self._tls_ctx)

    async def _data_ticket(self, node: str) -> TicketReply:
        """A one-use admission to *node*'s data plane, and where it is (docs/protocol.md "Data plane")."""
        reply = await self.request(self._mem(node, subjects.Mem.TICKET), b"{}")
        return JSON.decode(reply.data, TicketReply)

    async def _data_chunk(self, node: str) -> int | None:
        """The most bytes one data plane request to *node* carries; None when its memory goes over NATS."""
        if self._adp is None:
            return None
        conn = await self._adp.connection(node, self._data_ticket)
        return conn.chunk if isinstance(conn, AsyncConnection) else None

    def _buffer(self, handle: str, size: int) -> AsyncRemoteBuffer:
        return AsyncRemoteBuffer(cast("AsyncFabricClient", self), handle, size)

    async def rmalloc(self, size: int, *, ttl: float | None = None, node: str | None = None,
                      owner: str | None = None, keepalive: bool = True) -> AsyncRemoteBuffer:
        """Allocate *size* zeroed bytes on *node* (default: any allocator); returns a buffer.

        With *ttl* (seconds) the block is leased: the allocator frees it *ttl* seconds
        after the last renewal.  This client renews it every ``ttl / 3`` while it is
        open (``keepalive=False`` leaves renewing to you, see :meth:`renew`), so the
        memory comes back by itself when the client closes or its process dies.
        """
        subject = self._mem(node, subjects.Mem.ALLOC) if node else subjects.cluster(subjects.MEM, subjects.Mem.ALLOC)
        req = AllocRequest(size=_check_size(size), owner=self.owner if owner is None else owner, ttl_s=ttl or 0.0)
        r = await self._call(subject, req, AllocReply)
        if ttl and keepalive:
            self._lease_keeper().add(r.handle, ttl)
        return self._buffer(r.handle, r.size)

    def _lease_keeper(self) -> LeaseKeeper:
        if self._leases is None:
            self._leases = LeaseKeeper(self.renew)
        return self._leases

    async def rfree(self, handle: str | AsyncRemoteBuffer) -> int:
        """Free the block; returns its size.  A second free raises DoubleFree."""
        token = _token(handle)
        h = parse(token)
        r = await self._call(self._mem(h.node, subjects.Mem.FREE), HandleRequest(handle=token), FreeReply)
        if self._leases is not None:
            self._leases.discard(token)
        return r.freed

    async def rrealloc(self, handle: str | AsyncRemoteBuffer, size: int) -> AsyncRemoteBuffer:
        """Resize the block (in place when possible); returns the buffer, whose handle may change."""
        token = _token(handle)
        h = parse(token)
        r = await self._call(self._mem(h.node, subjects.Mem.REALLOC),
                             ReallocRequest(handle=token, size=_check_size(size)), AllocReply)
        if self._leases is not None and r.handle != token:
            self._leases.replace(token, r.handle)
        if isinstance(handle, AsyncRemoteBuffer):
            handle.handle, handle.size = r.handle, r.size
            return handle
        return self._buffer(r.handle, r.size)

    async def rstat(self, handle: str | AsyncRemoteBuffer) -> StatReply:
        token = _token(handle)
        return await self._call(self._mem(parse(token).node, subjects.Mem.STAT), HandleRequest(handle=token), StatReply)

    async def rshare(self, handle: str | AsyncRemoteBuffer) -> str:
        """A read-only handle to the same block, safe to give to another program."""
        token = _token(handle)
        r = await self._call(self._mem(parse(token).node, subjects.Mem.SHARE), HandleRequest(handle=token), ShareReply)
        return r.handle

    async def renew(self, handle: str | AsyncRemoteBuffer, ttl: float) -> int:
        """Extend the block's lease by *ttl* seconds from now; returns the new deadline (ms)."""
        token = _token(handle)
        r = await self._call(self._mem(parse(token).node, subjects.Mem.RENEW), RenewRequest(handle=token, ttl_s=ttl),
                             RenewReply)
        return r.lease_deadline_ms

    async def meminfo(self, node: str) -> MemInfoReply:
        reply = await self.request(self._mem(node, subjects.Mem.INFO), b"{}")
        return JSON.decode(reply.data, MemInfoReply)

    @_arguments_checked
    async def rwrite(self, handle: str | AsyncRemoteBuffer, data: Any, offset: int = 0) -> int:
        """Write *data* (any bytes-like object) at *offset*; returns the bytes written."""
        token = _token(handle)
        h = parse(token)
        view = await self._local_view(h, token)
        if view is not None:
            return view.write(h.off, h.gen, offset, data)
        mv = memoryview(data).cast("B")
        try:
            return await self._rwrite_remote(h.node, token, mv, offset)
        except _RedoOverNats:  # the data plane failed under a piece too large for NATS: the node is NATS-only now
            return await self._rwrite_remote(h.node, token, mv, offset)

    async def _rwrite_remote(self, node: str, token: str, mv: memoryview, offset: int) -> int:
        chunk = self.write_chunk
        if len(mv) > chunk:
            chunk = await self._data_chunk(node) or chunk  # the data plane takes far larger pieces
        if len(mv) <= chunk:
            return cast(int, await self._write_frame(node, [(token, offset, mv)]))
        return sum(await _in_flight([
            functools.partial(self._write_frame, node, [(token, offset + i, mv[i:i + chunk])])
            for i in range(0, len(mv), chunk)]))

    @_arguments_checked
    async def rread(self, handle: str | AsyncRemoteBuffer, length: int | None = None, offset: int = 0) -> bytes:
        """Read *length* bytes at *offset* (``None``: to the end of the block)."""
        token = _token(handle)
        h = parse(token)
        view = await self._local_view(h, token)
        if view is not None:
            return view.read(h.off, h.gen, offset, _local_length(length))
        if length is None and isinstance(handle, AsyncRemoteBuffer):
            length = max(handle.size - offset, 0)
        try:
            return await self._rread_remote(h.node, token, length, offset)
        except _RedoOverNats:  # as in rwrite
            return await self._rread_remote(h.node, token, length, offset)

    async def _rread_remote(self, node: str, token: str, length: int | None, offset: int) -> bytes:
        chunk = self.read_chunk
        if length is not None and length > chunk:
            chunk = await self._data_chunk(node) or chunk  # the data plane takes far larger pieces
            if length > chunk:
                return await self._read_chunked(node, token, offset, length, chunk)
        try:
            return await self._read_one(node, token, offset, wire.TO_END if length is None else length)
        except TooLarge:
            if length is not None:
                raise
            size = (await self.rstat(token)).size
            chunk = await self._data_chunk(node) or chunk
            return await self._read_chunked(node, token, offset, max(size - offset, 0), chunk)

    @_arguments_checked
    async def rreadv(self, items: Iterable[tuple[Any, int, int | None]], *,
                     return_exceptions: bool = False) -> list[bytes | FabricError]:
        """Read many ``(handle, offset, length)`` items in one request per node, results in order."""
        if type(items) is not list and type(items) is not tuple:
            items = list(items)
        # the common case (handles seen before, all on one node) is planned and encoded in C
        fast = wire.encode_reads(items, _PARSED, _BUFFER_TYPES)
        if fast is not None:
            node, frame = fast
            return await self._read_reply(node, frame, raise_failed=not return_exceptions)
        results = await self._rreadv_general(items)
        if not return_exceptions:
            for value in results:  # the first failed item in item order, whatever its node
                if isinstance(value, FabricError):
                    raise value
        return results

    async def _rreadv_general(self, items: Sequence[tuple[Any, int, int | None]]) -> list[Any]:
        plan: list[tuple[str, int, int, int]] = []
        by_node: dict[str, list[int]] = {}
        for hd, off, n in items:
            token = _token(hd)
            node = parse(token).node
            by_node.setdefault(node, []).append(len(plan))
            plan.append((token, off, wire.TO_END if n is None else n, 0))
        results: list[Any] = [None] * len(plan)

        async def one_node(node: str, idx: list[int]) -> None:
            got = await self._read_frame(node, [plan[i] for i in idx], raise_failed=False)
            for i, value in zip(idx, got, strict=True):
                results[i] = value

        await asyncio.gather(*(one_node(n, idx) for n, idx in by_node.items()))
        return results

    @_arguments_checked
    async def rwritev(self, items: Iterable[tuple[Any, int, Any]], *,
                      return_exceptions: bool = False) -> list[int | FabricError]:
        """Write many ``(handle, offset, data)`` items in one request per node; returns bytes written each."""
        plan = [(_token(hd), off, memoryview(data).cast("B")) for hd, off, data in items]
        by_node: dict[str, list[int]] = {}
        for i, (token, _o, _d) in enumerate(plan):
            by_node.setdefault(parse(token).node, []).append(i)
        results: list[Any] = [None] * len(plan)

        async def one_node(node: str, idx: list[int]) -> None:
            got = await self._write_frame(node, [plan[i] for i in idx], batch=True)
            for i, value in zip(idx, got, strict=True):
                results[i] = value

        await asyncio.gather(*(one_node(n, idx) for n, idx in by_node.items()))
        if not return_exceptions:
            for value in results:
                if isinstance(value, FabricError):
                    raise value
        return results

    # -- frames ----------------------------------------------------------------

    async def _read_frame(self, node: str, items: Sequence[tuple[str, int, int, int]], *,
                          raise_failed: bool = True, nats_ok: bool = True) -> list[Any]:
        """Items are ``(handle, offset, length, 0)``; see :meth:`_read_reply`."""
        return await self._read_reply(node, wire.encode(wire.KIND_READ, items), raise_failed=raise_failed,
                                      nats_ok=nats_ok)

    async def _read_one(self, node: str, token: str, offset: int, length: int) -> bytes:
        nats_ok = length == wire.TO_END or length <= self.read_chunk  # (to the end: NATS says when it is too large)
        return cast(bytes, (await self._read_frame(node, [(token, offset, length, 0)], nats_ok=nats_ok))[0])

    async def _read_reply(self, node: str, frame: bytes, *, raise_failed: bool = True,
                          nats_ok: bool = True) -> list[Any]:
        """Send a READ frame; the bytes of each item.

        A failed batch item raises its error (the first in item order), or with
        ``raise_failed=False`` stands in the list in place of its bytes.  A single
        item never gets a per-item status: it fails as an error reply.
        """
        data = await self._data_call(node, (frame,), nats_ok)
        if data is NATS:
            # no Content-Type header: the frame's magic says what it is, and a header-less
            # request is a plain PUB, cheaper for nats-py and the server alike
            data = (await self.request(self._mem(node, subjects.Mem.READ), frame)).data
        return self._payloads(data, raise_failed)

    @staticmethod
    def _payloads(data: Any, raise_failed: bool) -> list[Any]:
        """The items of a DATA reply: each item's bytes, or its error (raised, the first, with *raise_failed*)."""
        payloads, statuses = wire.decode_payloads(data)
        out: list[Any] = payloads  # failed items are replaced by their errors below
        if statuses is not None:
            for i, status in enumerate(statuses):
                if status:
                    err = error_from_wire(status, f"batch item {i} failed with {status}")
                    if raise_failed:
                        raise err
                    out[i] = err
        return out

    async def _write_frame(self, node: str, items: Sequence[tuple[str, int, memoryview]], batch: bool = False) -> Any:
        table = [(t, o, len(d), 0) for t, o, d in items]
        if self._adp is not None:
            # the head, then each item's bytes from where they are: nothing copied into a frame
            size = sum(n for _t, _o, n, _s in table)
            data = await self._data_call(node, (wire.encode_head(wire.KIND_WRITE, table), *(d for _t, _o, d in items)),
                                         size <= self.write_chunk)
            if data is not NATS:
                return self._acks(data, batch)
        frame = wire.encode(wire.KIND_WRITE, table, [d for _t, _o, d in items])
        return await self._send_write_frame(node, frame, batch)

    async def _data_call(self, node: str, parts: Sequence[Any], nats_ok: bool) -> Any:
        """One request frame over *node*'s data plane: the reply frame, or NATS to send it there instead.

        *nats_ok* false: the request or its reply is larger than NATS carries (sized for the data
        plane), so a data plane that failed under it raises :class:`_RedoOverNats` for the whole call
        to start again in NATS-sized pieces (reads and writes are idempotent) instead.
        """
        if self._adp is None:
            return NATS
        data = await self._adp.call(node, self._data_ticket, parts)
        if data is NATS and not nats_ok:
            raise _RedoOverNats(node)
        return data

    @staticmethod
    def _acks(data: Any, batch: bool) -> Any:
        got = wire.decode(data)
        out = [error_from_wire(st, f"batch item {i} failed") if st else n
               for i, (_h, _o, n, st) in enumerate(got.items)]
        if batch:
            return out
        if isinstance(out[0], FabricError):
            raise out[0]
        return out[0]

    async def _send_write_frames(self, node: str, frames: Sequence[bytes]) -> list[int]:
        return cast("list[int]", await asyncio.gather(*(self._send_write_frame(node, f) for f in frames)))

    async def _send_write_frame(self, node: str, frame: bytes, batch: bool = False) -> Any:
        reply = await self.request(self._mem(node, subjects.Mem.WRITE), frame)  # header-less, as for reads
        return self._acks(reply.data, batch)

    async def _read_chunked(self, node: str, token: str, offset: int, length: int, chunk: int) -> bytes:
        return b"".join(await _in_flight(
            functools.partial(self._read_one, node, token, offset + i, min(chunk, length - i))
            for i in range(0, length, chunk)))

    # -- what the sync twin does in its caller's thread ----------------------------
    # (fabric.client.sync): no await and no request, so safe from any thread; the
    # segment map is guarded by its lock, and the frames only travel on the loop.

    def _known_local_view(self, h: HandleParts) -> SegmentView | None:
        """The mapped segment of *h* when it is already known to be local, else None."""
        return self._local.view(h)

    def _needs_attach(self, h: HandleParts) -> bool:
        """The first use of a writable block's segment: the async call must attach it (or learn it is remote)."""
        return self._local.enabled and h.writable and not self._local.known(h)

    # -- local fast path --------------------------------------------------------

    async def _local_view(self, h: HandleParts, token: str) -> SegmentView | None:
        local = self._local
        if not local.enabled or not h.writable:
            return None
        if not local.known(h):
            try:
                reply = await self._call(self._mem(h.node, subjects.Mem.ATTACH), HandleRequest(handle=token),
                                         AttachReply)
            except FabricError:
                reply = None  # e.g. a stale handle: let the real operation report it
                if not local.known(h):
                    return None
            local.add(h, reply)
        return local.view(h)
