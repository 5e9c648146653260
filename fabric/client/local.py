"""The local fast path: the allocator's segments this client has mapped, by (node, segment).

When the allocator holding a block runs on this host (same boot id, same hostname),
the client maps that block's segment -- which holds only its owner's blocks -- and
reads and writes it directly, with no NATS hop.  The memory area asks here first;
the sync client serves a known-local block in the caller's thread.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

from ..errors import BadRequest, FabricError
from ..handles import HandleParts
from ..hostid import boot_id
from ..schema import AttachReply

if TYPE_CHECKING:
    from fabric_ext.arena import SegmentView


def _local_length(length: int | None) -> int:
    """The local fast path's length: -1 means "to the end", so a caller's -1 must not pass as that."""
    if length is None:
        return -1
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise BadRequest(f"length must be None or an int >= 0, got {length!r}")
    return length


class _LocalSegments:
    """The segments this client has mapped for the local fast path, by (node, seg)."""

    def __init__(self, enabled: bool) -> None:
        self.boot_id = boot_id()
        self.enabled = enabled and bool(self.boot_id)
        self.hostname = socket.gethostname()
        self.views: dict[tuple[str, int], SegmentView | None] = {}  # None = known not to be local
        self.lock = threading.Lock()

    def view(self, h: HandleParts) -> SegmentView | None:
        return self.views.get((h.node, h.seg)) if self.enabled and h.writable else None

    def known(self, h: HandleParts) -> bool:
        return (h.node, h.seg) in self.views

    def add(self, h: HandleParts, reply: AttachReply | None) -> None:
        view = None
        if reply is not None and reply.boot_id == self.boot_id and reply.hostname == self.hostname:
            from fabric_ext.arena import SegmentView

            try:
                view = SegmentView(reply.path)
                if view.seg_id != reply.seg:
                    view.close()
                    view = None
            except (OSError, FabricError):  # another mount namespace or container: stay remote
                view = None
        with self.lock:
            old = self.views.get((h.node, h.seg))
            if old is None:
                self.views[(h.node, h.seg)] = view
            elif view is not None:
                view.close()

    def close(self) -> None:
        with self.lock:
            for view in self.views.values():
                if view is not None:
                    view.close()
            self.views.clear()
