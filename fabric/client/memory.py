"""The memory area: rmalloc, rread, rwrite and the rest of docs/protocol.md "Memory".

Control requests (alloc, free, realloc, stat, share, renew) are JSON; reads and
writes are frames of :mod:`fabric_ext.wire`, split into chunks past the max payload
(reads past ``read_chunk_size``) and sent a few at a time.  A block whose allocator
runs on this host is read and written through the local fast path
(:mod:`fabric.client.local`) instead.  Leased blocks are renewed by a
:class:`~fabric.leases.LeaseKeeper` the area makes on first use.
"""

from __future__ import annotations

import asyncio
import functools
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
)
from .buffers import _BUFFER_TYPES, AsyncRemoteBuffer, _check_size, _token
from .local import _local_length, _LocalSegments
from .transport import Transport, _arguments_checked, _in_flight

if TYPE_CHECKING:
    from fabric_ext.arena import SegmentView

    from .aio import AsyncFabricClient


class MemoryArea(Transport):
    """Remote memory: the ``r*`` calls of the async client."""

    _local: _LocalSegments
    _leases: LeaseKeeper | None

    def _init_memory(self, local: bool) -> None:
        self._local = _LocalSegments(local)
        self._leases = None  # made on first use, on the running loop

    async def _close_memory(self) -> None:
        if self._leases is not None:
            await self._leases.close()  # renewals stop: leased blocks lapse after their ttl
        self._local.close()

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
        chunk = self.write_chunk
        if len(mv) <= chunk:
            return cast(int, await self._write_frame(h.node, [(token, offset, mv)]))
        return sum(await _in_flight([
            functools.partial(self._write_frame, h.node, [(token, offset + i, mv[i:i + chunk])])
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
        chunk = self.read_chunk
        if length is not None and length > chunk:
            return await self._read_chunked(h.node, token, offset, length, chunk)
        try:
            return await self._read_one(h.node, token, offset, wire.TO_END if length is None else length)
        except TooLarge:
            if length is not None:
                raise
            size = (await self.rstat(token)).size
            return await self._read_chunked(h.node, token, offset, max(size - offset, 0), chunk)

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
                          raise_failed: bool = True) -> list[Any]:
        """Items are ``(handle, offset, length, 0)``; see :meth:`_read_reply`."""
        return await self._read_reply(node, wire.encode(wire.KIND_READ, items), raise_failed=raise_failed)

    async def _read_one(self, node: str, token: str, offset: int, length: int) -> bytes:
        return cast(bytes, (await self._read_frame(node, [(token, offset, length, 0)]))[0])

    async def _read_reply(self, node: str, frame: bytes, *, raise_failed: bool = True) -> list[Any]:
        """Send a READ frame; the bytes of each item.

        A failed batch item raises its error (the first in item order), or with
        ``raise_failed=False`` stands in the list in place of its bytes.  A single
        item never gets a per-item status: it fails as an error reply.
        """
        # no Content-Type header: the frame's magic says what it is, and a header-less
        # request is a plain PUB, cheaper for nats-py and the server alike
        reply = await self.request(self._mem(node, subjects.Mem.READ), frame)
        payloads, statuses = wire.decode_payloads(reply.data)
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
        frame = wire.encode(wire.KIND_WRITE, [(t, o, len(d), 0) for t, o, d in items], [d for _t, _o, d in items])
        return await self._send_write_frame(node, frame, batch)

    async def _send_write_frames(self, node: str, frames: Sequence[bytes]) -> list[int]:
        return cast("list[int]", await asyncio.gather(*(self._send_write_frame(node, f) for f in frames)))

    async def _send_write_frame(self, node: str, frame: bytes, batch: bool = False) -> Any:
        reply = await self.request(self._mem(node, subjects.Mem.WRITE), frame)  # header-less, as for reads
        got = wire.decode(reply.data)
        out = [error_from_wire(st, f"batch item {i} failed") if st else n
               for i, (_h, _o, n, st) in enumerate(got.items)]
        if batch:
            return out
        if isinstance(out[0], FabricError):
            raise out[0]
        return out[0]

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
