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
also take the binary frame of :mod:`fabric_ext.wire` (single items and batches),
served by :mod:`.frames`; the same frames also come over the data plane
(:mod:`.data_plane`, admitted by a ``ticket`` from :mod:`.tickets`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import psutil

from fabric.errors import BadRequest, FabricError, TooLarge
from fabric.handles import PERM_R, HandleParts, HandleSigner
from fabric.hostid import boot_id
from fabric.protocol import subjects
from fabric.schema import (
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
    TicketReply,
    WriteReply,
    WriteRequest,
    WriteResult,
    WritevReply,
    WritevRequest,
    error_info,
)
from fabric.service import Endpoint, FabricService, Reply, Request, ServiceSettings
from fabric_ext.arena import MAX_BLOCK_SIZE, Arena

from .data_plane import DataPlaneLimits, DataPlaneServer
from .frames import FrameHandler
from .identity import load_or_create
from .tickets import TicketBook

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
        self.frames = FrameHandler(self.arena, self.signer)
        self.tickets = TicketBook(settings.node, ident.key, ttl_s=mem.data_ticket_s)
        self.data_plane: DataPlaneServer | None = None
        self.prefix = ident.prefix
        self.boot_id = boot_id()
        self.hostname = socket.gethostname()

    def metadata(self) -> dict[str, str]:
        meta = {"shm_prefix": self.prefix, "capacity": str(self.capacity)}
        if self.data_plane is not None:
            meta["data_addr"] = self.data_plane.address
            meta["data_tls"] = "true" if self.data_plane.tls is not None else "false"
        return meta

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
            ep(subjects.Mem.TICKET, self.ticket),
        ]

    async def on_start(self) -> None:
        self.background(self._reap_leases, name="lease-reaper")
        self.data_plane = self._make_data_plane()
        if self.data_plane is not None:
            self.data_plane.start()
            self.log.info("data plane listening", addr=self.data_plane.address,
                          tls=self.data_plane.tls is not None)
        stats = self.arena.stats()
        self.log.info("arena attached", prefix=self.prefix, capacity=self.capacity,
                      segments=stats["segments"], blocks=stats["blocks"])

    async def on_stop(self) -> None:
        if self.data_plane is not None:  # its threads use the arena: they end before it closes
            await asyncio.to_thread(self.data_plane.stop)
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
        return self.frames.writable(token)

    def _make_data_plane(self) -> DataPlaneServer | None:
        """The data plane ``[mem]`` asks for (not started), or None: turned off, or TLS without a certificate."""
        mem = self.settings.config.mem
        if not mem.data_plane:
            return None
        if self._bus_is_tls() and not mem.data_tls_cert:
            # a fabric that encrypts its bus must not send its bytes in the clear beside it
            self.log.warning("data plane off: NATS is TLS here and mem.data_tls_cert is not set (clients use NATS)")
            return None
        return DataPlaneServer(self.frames, self.tickets, self.log, host=mem.data_host or "127.0.0.1",
                               port=mem.data_port, limits=DataPlaneLimits.from_config(mem),
                               tls=self._data_tls(mem.data_tls_cert, mem.data_tls_key))

    def _bus_is_tls(self) -> bool:
        """NATS is TLS here: a ``tls://`` URL, or credentials that carry the fabric's CA (how fabric's own say so)."""
        if self.settings.nats_url.startswith(("tls://", "wss://")):
            return True
        if self.settings.credentials is None:
            return False
        from fabric.credentials import read_credentials

        return bool(read_credentials(self.settings.credentials).ca_pem)

    @staticmethod
    def _data_tls(cert: str, key: str) -> ssl.SSLContext | None:
        if not cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key or None)
        return ctx

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
        dp = self.data_plane
        return MemInfoReply(node=self.node, **stats, largest_block=MAX_BLOCK_SIZE,
                            data_addr=dp.address if dp is not None else "",
                            data_tls=dp is not None and dp.tls is not None)

    def ticket(self, req: Request) -> TicketReply:
        """A one-use admission to the data plane for the caller ("" address: this node serves none)."""
        dp = self.data_plane
        if dp is None:
            return TicketReply(ticket="", expires_ms=0, data_addr="")
        ticket, expires_ms = self.tickets.mint(req.caller)
        return TicketReply(ticket=ticket, expires_ms=expires_ms, data_addr=dp.address, tls=dp.tls is not None,
                           max_frame=dp.limits.max_frame)

    # -- frames (bulk bytes, single items and batches): services/allocator/frames.py ----

    def _read_frame(self, req: Request) -> Reply:
        return Reply(self.frames.read(req.data, self.connection.max_payload))

    def _write_frame(self, req: Request) -> Reply:
        return Reply(self.frames.write(req.data))
