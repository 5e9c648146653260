"""The allocator's frame handling: READ and WRITE frames against the arena, for every path.

A frame (:mod:`fabric_ext.wire`, docs/protocol.md "The binary frame") arrives on NATS
(``fabric.mem.<node>.read`` / ``write``) or on the data plane (:mod:`.data_plane`); both
hand it here, so the bytes a client gets cannot depend on the path they took.  The only
difference is the largest reply each path may send (*max_reply*: the NATS max payload,
or the data plane's frame limit).
"""

from __future__ import annotations

from typing import Any

from fabric.errors import BadRequest, FabricError, OutOfRange, PermissionDenied, TooLarge
from fabric.handles import HandleParts, HandleSigner
from fabric.protocol import wire
from fabric.schema import INT_MAX
from fabric_ext.arena import Arena


class FrameHandler:
    """READ and WRITE frames served from *arena*, handles checked with *signer*."""

    def __init__(self, arena: Arena, signer: HandleSigner) -> None:
        self.arena = arena
        self.signer = signer
        self._known = signer.known_map()  # token -> parts of handles verified here

    def writable(self, token: str) -> HandleParts:
        h = self.signer.verify(token)
        if not h.writable:
            raise PermissionDenied("read-only handle: this operation needs a read-write handle")
        return h

    # -- READ -----------------------------------------------------------------

    def read(self, data: Any, max_reply: int) -> bytes | bytearray:
        """The DATA frame answering the READ frame *data*; a single item's failure raises."""
        frame = wire.decode(data)
        if frame.kind != wire.KIND_READ:
            raise BadRequest("the read endpoint takes READ frames")
        return self._read_fast(frame, max_reply) or self._read_checked(frame, max_reply)

    def _read_fast(self, frame: Any, max_reply: int) -> bytearray | None:
        """The common case, in two C calls: known handles, explicit lengths, no failures.

        Returns None, having sent nothing, as soon as anything is unusual (a handle
        not verified yet, a read to the end, a reply too large, any failing item);
        the checked path then does the work item by item and reports each failure
        precisely.
        """
        reserved = wire.read_reply_reserve(frame, max_reply)
        if reserved is None:
            return None
        out, at = reserved
        try:
            # checks every item before copying any, then copies them back to back
            if self.arena.gather_reads(frame.items, self._known, out, at) is None:
                return None
        except FabricError:
            return None
        return out

    def _read_checked(self, frame: Any, max_reply: int) -> bytearray:
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
        reply_size = wire.HEADER_SIZE + wire.ITEM_FIXED * len(items) + total  # the DATA frame's exact size
        if reply_size > max_reply:
            raise TooLarge(f"a reply of {reply_size} bytes ({total} read) would exceed the largest reply "
                           f"({max_reply}): read in chunks")
        # zero=False: the live items' bytes are filled right below, the failed ones are empty;
        # views=False: the payload is the frame's last `total` bytes, items back to back
        out, _ = wire.encode_reserve(wire.KIND_DATA, reply_items, zero=False, views=False)
        self.arena.gather_into([(h.seg, h.off, h.gen, pos, n)
                                for h, (_, pos, n, _st) in zip(sources, reply_items, strict=True)
                                if h is not None], out, len(out) - total)
        return out

    # -- WRITE ----------------------------------------------------------------

    def write(self, data: Any) -> bytes:
        """The ACK frame answering the WRITE frame *data*; a single item's failure raises."""
        frame = wire.decode(data)
        if frame.kind != wire.KIND_WRITE:
            raise BadRequest("the write endpoint takes WRITE frames")
        acks: list[tuple[bytes, int, int, int]] = []
        single = len(frame.items) == 1
        for i, (token, pos, _length, _status) in enumerate(frame.items):
            try:
                if pos > INT_MAX:  # the arena's positions are int64: past that it would report a clamped value
                    raise BadRequest(f"offset {pos} is larger than {INT_MAX}")
                h = self.writable(token)
                written = self.arena.write(h.seg, h.off, h.gen, pos, frame.data(i))
                acks.append((b"", pos, written, 0))
            except FabricError as exc:
                if single:
                    raise
                acks.append((b"", pos, 0, exc.code))
        return wire.encode(wire.KIND_ACK, acks)
