"""Which scheduler is active: a lease in a KV bucket, renewed by compare-and-swap.

Any number of schedulers may run; the one holding the key ``active`` of the bucket
``fabric_scheduler`` is active, the others stand by.  The bucket's ``max_age`` is the
lease's length (:data:`LEASE_S`): the holder renews it every :data:`RENEW_S` with a
compare-and-swap on the revision it wrote last, so a renewal that loses (someone
else took it) ends its term at once.  A standby polls every :data:`POLL_S`; when the
key is gone -- the holder stopped cleanly and deleted it, or died and the key
expired -- it creates it (``create`` fails for all but one).  A crashed active is
therefore replaced within about ``LEASE_S + POLL_S``.

The holder keeps its term by its own clock too: a renewal that has not come back
within :data:`TERM_FRACTION` of a lease after the last one was sent ends the term at
once, before the key can expire and a standby take it (a JetStream whose stream leader
died holds requests for seconds).  A term is still not a guarantee by itself (a paused
holder may not know it lost): the compare-and-swap on every task record is what keeps
two schedulers from both moving a task, and an active scheduler that loses one reads
every record again (service.py ``_conflict``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from nats.js.api import KeyValueConfig, StorageType

from fabric.jetstream import KeyValueBucket
from fabric.protocol.streams import LEASE_BUCKET, LEASE_KEY

__all__ = ["Lease", "bucket", "LEASE_BUCKET", "LEASE_S", "RENEW_S", "POLL_S"]


LEASE_S: Final = 1.5
RENEW_S: Final = 0.3
POLL_S: Final = 0.2
#: the holder ends its term this far into a lease it could not renew (before the key can expire: see run)
TERM_FRACTION: Final = 0.8


def bucket() -> KeyValueBucket:
    """The lease's bucket (memory: after a nats-server restart the schedulers simply elect again)."""
    return KeyValueBucket(KeyValueConfig(bucket=LEASE_BUCKET, history=1, ttl=LEASE_S, storage=StorageType.MEMORY,
                                         description="fabric scheduler lease: which scheduler is active"))


class Lease:
    """Take the lease when it is free, keep it while alive, call back when a term starts or ends."""

    def __init__(self, node: str, log: Any, on_active: Callable[[], Awaitable[None]],
                 on_standby: Callable[[], Awaitable[None]]) -> None:
        self.instance = secrets.token_hex(6)
        self.value = json.dumps({"instance": self.instance, "node": node, "pid": os.getpid()}).encode()
        self.log = log
        self.on_active = on_active
        self.on_standby = on_standby
        self.kv: Any = None
        self.active = False
        self._rev = 0
        self._renewed = 0.0
        self._changed = asyncio.Event()
        #: set once this scheduler knows where it stands: active (and serving), or another holds the lease
        self.settled = asyncio.Event()

    def attach(self, kv: Any) -> None:
        """Use *kv* (the bucket, reopened after each reconnect)."""
        self.kv = kv
        self._changed.set()

    async def run(self) -> None:
        """Hold or wait for the lease until cancelled."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        while True:
            if self.kv is None:
                await self._sleep(POLL_S)
                continue
            try:
                if self.active:
                    # the term is the holder's own to keep: a renewal that has not come back before the lease
                    # would lapse ends it here, while the request is still out -- the key expires LEASE_S after
                    # the server wrote it, never before this deadline, so a standby takes over only once this
                    # one has stopped (a JetStream that lost its stream leader holds a request for seconds)
                    sent = time.monotonic()
                    deadline = self._renewed + LEASE_S * TERM_FRACTION - sent
                    try:
                        self._rev = await asyncio.wait_for(self.kv.update(LEASE_KEY, self.value, last=self._rev),
                                                           max(deadline, 0.0))
                    except asyncio.TimeoutError:
                        self.log.warning("scheduler lease not renewed before it would lapse: standing by")
                        await self._end()
                        continue
                    self._renewed = sent
                    await self._sleep(RENEW_S)
                    continue
                try:
                    await self.kv.get(LEASE_KEY)
                    self.settled.set()
                except KeyNotFoundError:
                    sent = time.monotonic()
                    self._rev = await self.kv.create(LEASE_KEY, self.value)
                    self._renewed = sent  # the server wrote it after this: the term ends no later than its key
                    await self._start()
                    continue
                await self._sleep(POLL_S)
            except asyncio.CancelledError:
                raise
            except KeyWrongLastSequenceError:
                if self.active:
                    self.log.warning("scheduler lease lost to another scheduler")
                    await self._end()
            except Exception as exc:
                text = str(exc) or type(exc).__name__
                if self.active and "wrong last sequence" in text:
                    self.log.warning("scheduler lease lost to another scheduler")
                    await self._end()
                elif "key exists" in text or "wrong last sequence" in text:
                    pass  # another standby created it first
                else:
                    self.log.debug("scheduler lease", error=text)
                    if self.active and time.monotonic() - self._renewed > LEASE_S:
                        # not renewed for a whole lease: another scheduler may hold it by now
                        self.log.warning("scheduler lease not renewed in time: standing by", error=text)
                        await self._end()
                await self._sleep(POLL_S)

    async def _start(self) -> None:
        self.active = True
        self.log.info("scheduler active", instance=self.instance)
        try:
            await self.on_active()
        finally:
            self.settled.set()

    async def _end(self) -> None:
        self.active = False
        await self.on_standby()

    async def release(self) -> None:
        """End the term at once (a clean stop): delete the key, so a standby takes over without waiting."""
        if self.active and self.kv is not None:
            self.active = False
            try:
                await self.kv.delete(LEASE_KEY, last=self._rev)
            except Exception:
                pass

    async def _sleep(self, seconds: float) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), seconds)
        except TimeoutError:
            pass
