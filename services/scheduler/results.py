"""Large task results, served to their owners: ``fabric.task.result`` and ``fabric.task.release``.

A result above 64 KiB is not in the task record: the node that produced it stores it in
the object store ``fabric_task_results`` (``<id>.<attempt>``, 24 h TTL).  Clients have no
JetStream rights (docs/security.md: the object store cannot be split per user), so the
scheduler reads it for them, after checking the caller owns the task, and hands it out
in pieces that fit a reply; a release deletes it.  A result is usually read once, in
consecutive pieces: the last few read are kept in memory (bounded) so each piece does
not read the whole object again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from fabric.errors import NotFound, Unavailable
from fabric.protocol.streams import RESULTS_BUCKET

__all__ = ["StoredResults", "CACHE_BYTES"]

#: the most bytes of results kept in memory between the pieces of their reads
CACHE_BYTES: Final = 256 << 20


class StoredResults:
    """Reads and deletes stored results through the scheduler's JetStream context."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.js: Any = None
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._limit = cache_bytes

    async def read(self, ref: str) -> bytes:
        """The whole result *ref*; NotFound once it is gone (released, or past its TTL)."""
        data = self._cache.get(ref)
        if data is not None:
            self._cache.move_to_end(ref)
            return data
        store = await self._store()
        try:
            data = (await store.get(ref)).data or b""
        except Exception as exc:
            raise NotFound(f"the stored result {ref!r} is gone (released, or older than its 24 h TTL): "
                           f"{type(exc).__name__}") from None
        self._cache[ref] = data
        self._cached += len(data)
        while self._cached > self._limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)
        return data

    async def release(self, ref: str) -> bool:
        """Delete *ref*; False when it was gone already."""
        old = self._cache.pop(ref, None)
        if old is not None:
            self._cached -= len(old)
        store = await self._store()
        try:
            await store.delete(ref)
        except Exception:  # already deleted (by its owner's other client), or expired
            return False
        return True

    async def _store(self) -> Any:
        if self.js is None:
            raise Unavailable("the scheduler has no JetStream connection right now: ask again")
        try:
            return await self.js.object_store(RESULTS_BUCKET)
        except Exception as exc:
            raise Unavailable(f"the results store is unavailable: {type(exc).__name__}: {exc}") from None
