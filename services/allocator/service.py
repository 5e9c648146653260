"""The allocator's endpoints: alloc, free, realloc, write, read, batches, stat, share, renew, attach, info.

Every handler is a plain function: arena work is a few microseconds of CPU that
never waits, so the service kit runs it inline rather than as a task.

Memory lives in this node's :class:`fabric_ext.arena.Arena` (shared-memory
segments, so a restarted allocator reattaches every block).  Handles are
capabilities minted by :class:`fabric.handles.HandleSigner`; every endpoint that
takes a handle verifies its MAC first, so a forged or widened handle is 404
``unknown_handle`` and never reaches the arena.

Subjects (see docs/protocol.md): ``fabric.mem.alloc`` (any node, queue group) and
``fabric.mem.<node>.<verb>`` for everything on this node.  ``read`` and ``write``
also take the binary frame of :mod:`fabric_ext.wire` (single items and batches).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import psutil

from fabric.errors import BadRequest, FabricError, OutOfRange, PermissionDenied, TooLarge
from fabric.handles import PERM_R, HandleParts, HandleSigner
from fabric.hostid import boot_id
from fabric.protocol import subjects, wire
from fabric.schema import (
    INT_MAX,
    JSON,
    AllocReply,
    AllocRequest,
    AttachReply,
    FreeReply,
    HandleRequest,
    MemInfoReply,
    ReadReply,
    ReadRequest,
    ReadResult,
    ReadvReply,
    ReadvRequest,
    ReallocRequest,
    RenewReply,
    RenewRequest,
    ShareReply,
    StatReply,
    WriteReply,
    WriteRequest,
    WriteResult,
    WritevReply,
    WritevRequest,
    error_info,
)
from fabric.service import Endpoint, FabricService, Reply, Request, ServiceSettings
from fabric_ext.arena import MAX_BLOCK_SIZE, Arena

from .identity import load_or_create

# Success frames carry no headers: the magic says what they are, and a header-less
# reply is cheaper on both ends.  Error replies always carry the ADR-32 headers.


class AllocatorService(FabricService):
    name = "allocator"
    description = "fabric remote memory: shared-memory arena behind rmalloc/rwrite/rread/rfree"

    def __init__(self, settings: ServiceSettings, *, capacity: int | None = None,
                 quotas: dict[str, int] | None = None) -> None:
        super().__init__(settings)
        ident = load_or_create(Path(settings.state_dir), settings.node)
        mem = settings.config.mem  # the configuration's [mem] (docs/config.md); the keywords override it
        if capacity is None:
            capacity = mem.capacity if mem.capacity is not None else psutil.virtual_memory().total // 4
        self.capacity = capacity
        self.arena = Arena(ident.prefix, self.capacity, default_quota=mem.quota)
        # quotas live in configuration, not in shared memory: set them on every start
        for owner, limit in (quotas if quotas is not None else mem.quotas).items():
            self.arena.set_quota(owner, limit)
        self.signer = HandleSigner(settings.node, ident.key)
        self._known = self.signer.known_map()  # token -> parts of handles verified here
        self.prefix = ident.prefix
        self.boot_id = boot_id()
        self.hostname = socket.gethostname()

    def metadata(self) -> dict[str, str]:
        return {"shm_prefix": self.prefix, "capacity": str(self.capacity)}

    def endpoints(self) -> Sequence[Endpoint]:
        ep = functools.partial(self.node_endpoint, subjects.MEM)  # fabric.mem.<node>.<verb>
        return [
            self.cluster_endpoint(subjects.MEM, subjects.Mem.ALLOC, self.alloc, name="alloc-any"),
            ep(subjects.Mem.ALLOC, self.alloc),
            ep(subjects.Mem.FREE, self.free),
            ep(subjects.Mem.REALLOC, self.realloc),
            ep(subjects.Mem.WRITE, self.write, frames=True),
            ep(subjects.Mem.READ, self.read, frames=True),
            ep(subjects.Mem.READV, self.readv),
            ep(subjects.Mem.WRITEV, self.writev),
            ep(subjects.Mem.STAT, self.stat),
            ep(subjects.Mem.SHARE, self.share),
            ep(subjects.Mem.RENEW, self.renew),
            ep(subjects.Mem.ATTACH, self.attach),
            ep(subjects.Mem.INFO, self.info),
        ]

    async def on_start(self) -> None:
        self.background(self._reap_leases, name="lease-reaper")
        stats = self.arena.stats()
        self.log.info("arena attached", prefix=self.prefix, capacity=self.capacity,
                      segments=stats["segments"], blocks=stats["blocks"])

    async def on_stop(self) -> None:
        # the lease reaper has ended (the kit stops background tasks before on_stop);
        # close, not destroy: the segments outlive this process so a restart reattaches them
        self.arena.close()

    async def _reap_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for seg, off, gen in self.arena.expired(int(time.time() * 1000)):
                try:
                    freed = self.arena.free(seg, off, gen)
                    self.log.info("lease expired, block reclaimed", seg=seg, off=off, size=freed)
                except FabricError as exc:  # freed concurrently: nothing to reclaim
                    self.log.warning("lease reclaim failed", seg=seg, off=off, error=exc.message)

    # -- helpers -----------------------------------------------------------

    def _writable(self, token: str) -> HandleParts:
        h = self.signer.verify(token)
        if not h.writable:
            raise PermissionDenied("read-only handle: this operation needs a read-write handle")
        return h

    @staticmethod
    def _deadline(ttl_s: float) -> int:
        return int(time.time() * 1000 + ttl_s * 1000) if ttl_s > 0 else 0

    # -- endpoints -----------------------------------------------------------

    def alloc(self, req: Request) -> AllocReply:
        r: AllocRequest = req.decode(AllocRequest)
        deadline = self._deadline(r.ttl_s)
        # the quota account: with auth on, the authenticated user's, whatever the request names
        owner = req.caller if req.caller is not None else r.owner
        seg, off, gen = self.arena.alloc(r.size, owner, deadline)
        return AllocReply(handle=self.signer.mint(seg, off, gen), size=r.size, node=self.node,
                          lease_deadline_ms=deadline)

    def free(self, req: Request) -> FreeReply:
        h = self._writable(req.decode(HandleRequest).handle)
        return FreeReply(freed=self.arena.free(h.seg, h.off, h.gen))

    def realloc(self, req: Request) -> AllocReply:
        r: ReallocRequest = req.decode(ReallocRequest)
        h = self._writable(r.handle)
        seg, off, gen = self.arena.realloc(h.seg, h.off, h.gen, r.size)
        token = r.handle if (seg, off, gen) == (h.seg, h.off, h.gen) else self.signer.mint(seg, off, gen)
        info = self.arena.info(seg, off, gen)
        return AllocReply(handle=token, size=r.size, node=self.node, lease_deadline_ms=info["lease_deadline_ms"])

    def write(self, req: Request) -> WriteReply | Reply:
        if req.is_frame:
            return self._write_frame(req)
        r: WriteRequest = req.decode(WriteRequest)
        h = self._writable(r.handle)
        return WriteReply(written=self.arena.write(h.seg, h.off, h.gen, r.offset, r.data))

    def read(self, req: Request) -> ReadReply | Reply:
        if req.is_frame:
            return self._read_frame(req)
        r: ReadRequest = req.decode(ReadRequest)
        h = self.signer.verify(r.handle)
        length = -1 if r.length is None else r.length
        data = self.arena.read(h.seg, h.off, h.gen, r.offset, length)
        max_payload = self.connection.max_payload
        # JSON carries the bytes in base64 (4 characters per 3 bytes); 1 KiB covers the rest of the reply
        reply_size = (4 * -(-len(data) // 3) if req.codec is JSON else len(data)) + 1024
        if reply_size > max_payload:
            raise TooLarge(f"a {len(data)}-byte read makes a reply of about {reply_size} bytes, over the max "
                           f"payload ({max_payload}): use frames or read in chunks")
        return ReadReply(data=data)

    def readv(self, req: Request) -> ReadvReply:
        r: ReadvRequest = req.decode(ReadvRequest)
        out: list[ReadResult] = []
        for item in r.items:
            try:
                h = self.signer.verify(item.handle)
                length = -1 if item.length is None else item.length
                out.append(ReadResult(data=self.arena.read(h.seg, h.off, h.gen, item.offset, length)))
            except FabricError as exc:
                out.append(ReadResult(error=error_info(exc)))
        return ReadvReply(items=out)

    def writev(self, req: Request) -> WritevReply:
        r: WritevRequest = req.decode(WritevRequest)
        out: list[WriteResult] = []
        for item in r.items:
            try:
                h = self._writable(item.handle)
                out.append(WriteResult(written=self.arena.write(h.seg, h.off, h.gen, item.offset, item.data)))
            except FabricError as exc:
                out.append(WriteResult(error=error_info(exc)))
        return WritevReply(items=out)

    def stat(self, req: Request) -> StatReply:
        token = req.decode(HandleRequest).handle
        h = self.signer.verify(token)
        info = self.arena.info(h.seg, h.off, h.gen)
        return StatReply(handle=token, node=self.node, size=info["size"], capacity=info["capacity"],
                         owner=info["owner"], generation=info["generation"], writable=h.writable,
                         lease_deadline_ms=info["lease_deadline_ms"])

    def share(self, req: Request) -> ShareReply:
        h = self.signer.verify(req.decode(HandleRequest).handle)
        self.arena.size(h.seg, h.off, h.gen)  # the block must be live to be shared
        return ShareReply(handle=self.signer.mint(h.seg, h.off, h.gen, PERM_R))

    def renew(self, req: Request) -> RenewReply:
        r: RenewRequest = req.decode(RenewRequest)
        h = self._writable(r.handle)
        deadline = self._deadline(r.ttl_s)
        self.arena.set_lease(h.seg, h.off, h.gen, deadline)
        return RenewReply(lease_deadline_ms=deadline)

    def attach(self, req: Request) -> AttachReply:
        # Only a read-write handle maps its segment: a segment holds one owner's blocks
        # only, so a client sees through the mapping exactly what its handles allow.
        h = self._writable(req.decode(HandleRequest).handle)
        owner = self.arena.info(h.seg, h.off, h.gen)["owner"]
        for seg, path, size in self.arena.owner_segments(owner):
            if seg == h.seg:
                return AttachReply(node=self.node, seg=seg, path=path, size=size,
                                   boot_id=self.boot_id, hostname=self.hostname)
        raise BadRequest("segment not found for this handle's owner")  # pragma: no cover - arena invariant

    def info(self, req: Request) -> MemInfoReply:
        # the arena's typed dicts are plain dicts of the reply's fields
        stats = cast(dict[str, Any], self.arena.stats())
        return MemInfoReply(node=self.node, **stats, largest_block=MAX_BLOCK_SIZE)

    # -- frames (bulk bytes, single items and batches) ------------------------

    def _read_frame(self, req: Request) -> Reply:
        frame = wire.decode(req.data)
        if frame.kind != wire.KIND_READ:
            raise BadRequest("the read endpoint takes READ frames")
        return self._read_frame_fast(frame) or self._read_frame_checked(frame)

    def _read_frame_fast(self, frame: Any) -> Reply | None:
        """The common case, in two C calls: known handles, explicit lengths, no failures.

        Returns None, having sent nothing, as soon as anything is unusual (a handle
        not verified yet, a read to the end, a reply too large, any failing item);
        the checked path then does the work item by item and reports each failure
        precisely.
        """
        reserved = wire.read_reply_reserve(frame, self.connection.max_payload)
        if reserved is None:
            return None
        out, at = reserved
        try:
            # checks every item before copying any, then copies them back to back
            if self.arena.gather_reads(frame.items, self._known, out, at) is None:
                return None
        except FabricError:
            return None
        return Reply(out)

    def _read_frame_checked(self, frame: Any) -> Reply:
        items = frame.items
        single = len(items) == 1
        verify, size_of = self.signer.verify, self.arena.size  # hot loop: bind once
        reply_items: list[tuple[bytes, int, int, int]] = []  # the DATA frame's items
        sources: list[HandleParts | None] = []  # where each item's bytes come from
        total = 0
        for token, pos, length, _status in items:
            try:
                if pos > INT_MAX or INT_MAX < length != wire.TO_END:  # as in JSON, where the schema bounds them
                    raise BadRequest(f"offset {pos} or length {length} is larger than {INT_MAX}")
                h = verify(token)
                size = size_of(h.seg, h.off, h.gen)  # also proves the block is live
                if length == wire.TO_END:
                    length = size - pos if pos <= size else 0
                if pos > size or length > size - pos:
                    raise OutOfRange(f"read of {length} bytes at offset {pos} is outside the block's {size} bytes")
                reply_items.append((b"", pos, length, 0))
                sources.append(h)
                total += length
            except FabricError as exc:
                if single:
                    raise
                reply_items.append((b"", pos, 0, exc.code))
                sources.append(None)
        max_payload = self.connection.max_payload
        reply_size = wire.HEADER_SIZE + wire.ITEM_FIXED * len(items) + total  # the DATA frame's exact size
        if reply_size > max_payload:
            raise TooLarge(f"a reply of {reply_size} bytes ({total} read) would exceed the max payload "
                           f"({max_payload}): read in chunks")
        # zero=False: the live items' bytes are filled right below, the failed ones are empty;
        # views=False: the payload is the frame's last `total` bytes, items back to back
        out, _ = wire.encode_reserve(wire.KIND_DATA, reply_items, zero=False, views=False)
        self.arena.gather_into([(h.seg, h.off, h.gen, pos, n)
                                for h, (_, pos, n, _st) in zip(sources, reply_items, strict=True)
                                if h is not None], out, len(out) - total)
        return Reply(out)

    def _write_frame(self, req: Request) -> Reply:
        frame = wire.decode(req.data)
        if frame.kind != wire.KIND_WRITE:
            raise BadRequest("the write endpoint takes WRITE frames")
        acks: list[tuple[bytes, int, int, int]] = []
        single = len(frame.items) == 1
        for i, (token, pos, _length, _status) in enumerate(frame.items):
            try:
                if pos > INT_MAX:  # the arena's positions are int64: past that it would report a clamped value
                    raise BadRequest(f"offset {pos} is larger than {INT_MAX}")
                h = self._writable(token)
                written = self.arena.write(h.seg, h.off, h.gen, pos, frame.data(i))
                acks.append((b"", pos, written, 0))
            except FabricError as exc:
                if single:
                    raise
                acks.append((b"", pos, 0, exc.code))
        return Reply(wire.encode(wire.KIND_ACK, acks))
