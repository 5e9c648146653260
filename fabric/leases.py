"""Lease keep-alive: a client renews the leases of its blocks for as long as it lives.

A block allocated with ``ttl=`` is freed by its allocator ``ttl`` seconds after the
last renewal.  The client renews each such block every ``ttl / 3`` seconds (so two
renewals may be lost before the block is), from one background task; when the
client closes or its process dies, renewals stop and the allocator reclaims the
memory within ``ttl`` plus about a second.  This is what makes a lease useful: the
memory of a client that went away comes back without anyone freeing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .errors import FabricError, NotFound, PermissionDenied

log = logging.getLogger("fabric.client")

#: after a failed renewal (allocator restarting, bus down), retry this much sooner
RETRY_FRACTION = 0.1


class LeaseKeeper:
    """Renews registered handles until :meth:`close`; one asyncio task per client."""

    def __init__(self, renew: Callable[[str, float], Awaitable[int]]) -> None:
        self._renew = renew
        self._ttl: dict[str, float] = {}
        self._due: dict[str, float] = {}  # monotonic time of each handle's next renewal
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._ttl)

    def __contains__(self, token: object) -> bool:
        return token in self._ttl

    def add(self, token: str, ttl: float) -> None:
        self._ttl[token] = ttl
        self._due[token] = time.monotonic() + ttl / 3
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fabric-lease-keeper")
        self._wake.set()

    def discard(self, token: str) -> None:
        self._ttl.pop(token, None)
        self._due.pop(token, None)

    def replace(self, old: str, new: str) -> None:
        """A realloc moved the block: keep renewing it under its new handle."""
        ttl = self._ttl.pop(old, None)
        self._due.pop(old, None)
        if ttl is not None and new:
            self.add(new, ttl)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while self._ttl:
            now = time.monotonic()
            due = [t for t, at in self._due.items() if at <= now]
            if due:
                await asyncio.gather(*(self._renew_one(t) for t in due))
            if not self._due:
                break
            delay = max(0.0, min(self._due.values()) - time.monotonic())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _renew_one(self, token: str) -> None:
        ttl = self._ttl.get(token)
        if ttl is None:
            return
        try:
            await self._renew(token, ttl)
        except (NotFound, PermissionDenied) as exc:  # freed, expired or not ours: stop renewing
            log.info("lease of %s not renewed: %s", token[:40], exc.message)
            self.discard(token)
            return
        except FabricError as exc:  # unavailable for now: try again soon, well inside the ttl
            log.warning("lease renewal failed, retrying: %s", exc.message)
            if token in self._due:
                self._due[token] = time.monotonic() + ttl * RETRY_FRACTION
            return
        if token in self._due:
            self._due[token] = time.monotonic() + ttl / 3
