"""The allocator's messages (``fabric.mem.*``).

Part of :mod:`fabric.schema` (its docstring has the rules every message follows)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from .base import TTL, ErrorInfo, HandleStr, Message, OwnerStr, UInt

# -- memory (allocator) ----------------------------------------------------


class AllocRequest(Message):
    """``fabric.mem.alloc`` / ``fabric.mem.<node>.alloc``: allocate *size* bytes (zeroed)."""

    size: UInt
    owner: OwnerStr = ""
    ttl_s: TTL = 0.0


class AllocReply(Message):
    """A new (or moved) block: its handle, size and lease deadline (0 = no lease)."""

    handle: str
    size: int
    node: str
    lease_deadline_ms: int = 0


class HandleRequest(Message):
    """Requests that name one handle and nothing else: free, stat, share, attach."""

    handle: HandleStr


class FreeReply(Message):
    freed: int


class ReallocRequest(Message):
    handle: HandleStr
    size: UInt


class WriteRequest(Message):
    handle: HandleStr
    data: bytes
    offset: UInt = 0


class WriteReply(Message):
    written: int


class ReadRequest(Message):
    handle: HandleStr
    offset: UInt = 0
    #: bytes to read; ``None`` reads to the end of the block
    length: UInt | None = None


class ReadReply(Message):
    data: bytes


class ReadItem(Message):
    handle: HandleStr
    offset: UInt = 0
    length: UInt | None = None


class ReadvRequest(Message):
    items: Annotated[list[ReadItem], Meta(max_length=65536)]



class ReadResult(Message):
    data: bytes | None = None
    error: ErrorInfo | None = None


class ReadvReply(Message):
    items: list[ReadResult]


class WriteItem(Message):
    handle: HandleStr
    data: bytes
    offset: UInt = 0


class WritevRequest(Message):
    items: Annotated[list[WriteItem], Meta(max_length=65536)]


class WriteResult(Message):
    written: int = 0
    error: ErrorInfo | None = None


class WritevReply(Message):
    items: list[WriteResult]


class ShareReply(Message):
    """A read-only handle to the same block."""

    handle: str


class RenewRequest(Message):
    handle: HandleStr
    ttl_s: TTL


class RenewReply(Message):
    lease_deadline_ms: int


class StatReply(Message):
    handle: str
    node: str
    size: int
    capacity: int
    owner: str
    generation: int
    writable: bool
    lease_deadline_ms: int = 0


class AttachReply(Message):
    """Where a same-host client maps the block's segment for the local fast path."""

    node: str
    seg: int
    path: str
    size: int
    boot_id: str
    hostname: str


class TicketReply(Message):
    """``fabric.mem.<node>.ticket``: a one-use admission to the node's data plane (docs/protocol.md "Data plane").

    ``data_addr`` is ``host:port`` ("" when the node serves no data plane: use NATS);
    with ``tls`` the connection is TLS under the fabric's CA, the ticket inside it.
    """

    ticket: str
    expires_ms: int
    data_addr: str
    tls: bool = False
    max_frame: int = 0


class MemInfoReply(Message):
    """One node's arena statistics (``fabric.mem.info`` / ``fabric.mem.<node>.info``)."""

    node: str
    capacity: int
    mapped: int
    segments: int
    in_use: int
    peak_in_use: int
    blocks: int
    free_bytes: int
    largest_free: int
    fragmentation: float
    alloc_count: int
    free_count: int
    owners: dict[str, dict[str, int]] = {}
    #: the largest block one alloc/realloc may ask for (32 TiB); a larger size is 413 ``too_large``
    largest_block: int = 0
    #: the node's data plane, ``host:port`` ("": it serves none) and whether it speaks TLS there
    data_addr: str = ""
    data_tls: bool = False
