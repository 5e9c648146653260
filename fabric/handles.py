"""Memory handles: unforgeable capabilities naming one block on one node.

A handle is the text token ``v1:<node>:<seg>:<off>:<gen>:<perm>:<mac>``:

* ``node``  -- the node whose allocator holds the block (a subject token);
* ``seg``, ``off``, ``gen`` -- segment id, data offset and generation in that node's arena;
* ``perm``  -- ``rw`` (read/write/free/realloc/share) or ``r`` (read and stat only);
* ``mac``   -- 32 hex digits: keyed BLAKE2b-128 over the other fields under the
  allocator's secret, which never leaves the node.

Holding a handle is the permission to use it; changing any field (to widen ``r`` to
``rw`` or to point at another block) breaks the MAC, and the allocator answers 404
``unknown_handle`` exactly as for a handle it never issued.  Clients parse handles to
route requests and to use the local fast path, but only the allocator can mint them.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NamedTuple

from .errors import UnknownHandle

VERSION = "v1"
PERM_RW = "rw"
PERM_R = "r"
MAX_HANDLE_LEN = 255


class HandleParts(NamedTuple):
    """The fields of a handle token (the MAC is checked by the allocator only)."""

    node: str
    seg: int
    off: int
    gen: int
    perm: str
    mac: str

    @property
    def writable(self) -> bool:
        return self.perm == PERM_RW


def parse(token: str) -> HandleParts:
    """Split a handle token; raises :class:`UnknownHandle` when it is not well-formed."""
    if not isinstance(token, str) or len(token) > MAX_HANDLE_LEN:
        raise UnknownHandle("handle must be a string of at most 255 characters")
    parts = token.split(":")
    if len(parts) != 7 or parts[0] != VERSION:
        raise UnknownHandle(f"malformed handle {token[:80]!r}")
    _, node, seg, off, gen, perm, mac = parts
    if perm not in (PERM_RW, PERM_R) or len(mac) != 32 or not node:
        raise UnknownHandle(f"malformed handle {token[:80]!r}")
    try:
        return HandleParts(node, int(seg), int(off), int(gen), perm, mac)
    except ValueError:
        raise UnknownHandle(f"malformed handle {token[:80]!r}") from None


_PARSED: dict[str, HandleParts] = {}
_CACHE_MAX = 65536


def parse_cached(token: str) -> HandleParts:
    """:func:`parse` with a bounded memo: hot paths see the same few handles again and again."""
    h = _PARSED.get(token)
    if h is None:
        h = parse(token)
        if len(_PARSED) >= _CACHE_MAX:
            _PARSED.clear()  # crude but bounded; refilling costs one parse per handle
        _PARSED[token] = h
    return h


class HandleSigner:
    """Mints and verifies handles with one node's secret key (allocator side only)."""

    __slots__ = ("_key", "node", "_verified")

    def __init__(self, node: str, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("handle key must be at least 16 bytes")
        self.node = node
        self._key = key
        # token -> parts of handles whose MAC already checked out: a token is immutable
        # and the key never changes, so the answer cannot change either
        self._verified: dict[str, HandleParts] = {}

    def _mac(self, seg: int, off: int, gen: int, perm: str) -> str:
        msg = f"{VERSION}:{self.node}:{seg}:{off}:{gen}:{perm}".encode()
        return hashlib.blake2b(msg, key=self._key, digest_size=16).hexdigest()

    def mint(self, seg: int, off: int, gen: int, perm: str = PERM_RW) -> str:
        return f"{VERSION}:{self.node}:{seg}:{off}:{gen}:{perm}:{self._mac(seg, off, gen, perm)}"

    def known_map(self) -> dict[str, HandleParts]:
        """Handles that already verified here, token -> parts (read it, never write it).

        For C loops that skip the MAC work of handles seen before; the memo is cleared
        in place, never replaced, so a reference taken once stays valid.
        """
        return self._verified

    def verify(self, token: str) -> HandleParts:
        """Parse *token* and check its MAC and node; raises :class:`UnknownHandle`."""
        h = self._verified.get(token)
        if h is not None:
            return h
        h = parse(token)
        if h.node != self.node:
            raise UnknownHandle(f"handle belongs to node {h.node!r}, this is {self.node!r}")
        if not hmac.compare_digest(h.mac, self._mac(h.seg, h.off, h.gen, h.perm)):
            raise UnknownHandle("unknown or forged handle")
        if len(self._verified) >= _CACHE_MAX:
            self._verified.clear()
        self._verified[token] = h
        return h
