"""Data plane tickets: one-use, short-lived admissions minted over NATS, checked on the data port.

A client that may reach this allocator over NATS (authenticated, in its user form when auth
is on) asks ``fabric.mem.<node>.ticket`` and gets a ticket naming it; the first bytes it
sends on the data port carry the ticket (docs/protocol.md "Data plane").  So the data port
admits exactly who NATS admits, with no second password store, and each connection is
bound to a user (for the per-user connection cap and the logs).  Handles stay the
capabilities for the bytes themselves: a ticket opens the door, the handle in each frame
still decides which block may be read or written.

The ticket is ``t1.<user>.<expires_ms>.<nonce>.<mac>``: the MAC is keyed BLAKE2b-128 over
the rest and the node, under a key derived from the allocator's handle key (never leaves
the node, survives restarts, no new secret to keep).  A ticket admits one connection,
once, before it expires: a used nonce is remembered until its expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict

from fabric.errors import Unauthenticated

TICKET_VERSION = "t1"
#: the user a ticket names for a request in the plain form (an admin or a fabric without auth)
TRUSTED_USER = "*"


class TicketBook:
    """Mints and admits the data plane tickets of one allocator (thread-safe)."""

    def __init__(self, node: str, handle_key: bytes, *, ttl_s: float = 60.0) -> None:
        self.node = node
        self.ttl_ms = int(ttl_s * 1000)
        # its own key, derived: a ticket MAC can never be replayed as a handle MAC or the other way
        self._key = hashlib.blake2b(b"fabric data plane tickets", key=handle_key, digest_size=32).digest()
        self._used: OrderedDict[str, int] = OrderedDict()  # nonce -> expiry, in expiry order
        self._lock = threading.Lock()

    def _mac(self, user: str, expires_ms: int, nonce: str) -> str:
        msg = f"{TICKET_VERSION}.{self.node}.{user}.{expires_ms}.{nonce}".encode()
        return hashlib.blake2b(msg, key=self._key, digest_size=16).hexdigest()

    def mint(self, user: str | None) -> tuple[str, int]:
        """A ticket for *user* (None: a trusted caller) and its expiry (ms since the epoch)."""
        who = user if user else TRUSTED_USER
        expires_ms = int(time.time() * 1000) + self.ttl_ms
        nonce = secrets.token_hex(12)
        return f"{TICKET_VERSION}.{who}.{expires_ms}.{nonce}.{self._mac(who, expires_ms, nonce)}", expires_ms

    def admit(self, ticket: str) -> str:
        """The user *ticket* names, consuming it; raises :class:`Unauthenticated` for any bad ticket."""
        parts = ticket.split(".")
        if len(parts) != 5 or parts[0] != TICKET_VERSION:
            raise Unauthenticated("malformed data plane ticket: ask fabric.mem.<node>.ticket for one")
        _, user, expires, nonce, mac = parts
        try:
            expires_ms = int(expires)
        except ValueError:
            raise Unauthenticated("malformed data plane ticket: ask fabric.mem.<node>.ticket for one") from None
        if not hmac.compare_digest(mac, self._mac(user, expires_ms, nonce)):
            raise Unauthenticated("data plane ticket not issued by this node (or altered)")
        now = int(time.time() * 1000)
        if expires_ms < now:
            raise Unauthenticated(f"data plane ticket expired {(now - expires_ms) / 1000:.1f} s ago: ask for another")
        with self._lock:
            while self._used:  # forget the nonces of expired tickets: they can no longer pass the check above
                oldest, exp = next(iter(self._used.items()))
                if exp >= now:
                    break
                del self._used[oldest]
            if nonce in self._used:
                raise Unauthenticated("data plane ticket already used: each admits one connection")
            self._used[nonce] = expires_ms
        return user
