"""The node registry: every node's latest :class:`NodeRecord`, in a JetStream KV bucket with a TTL.

Each gpu-monitor puts its node's record under the key ``<node>`` of the bucket
``fabric_nodes`` at every heartbeat, and deletes it when it stops cleanly.  The
bucket's ``max_age`` (its TTL) removes the entry of a node whose monitor died:
JetStream expires the last heartbeat ``ttl_s`` after it was stored.  Expiry makes
no watch event, so readers also drop entries older than the TTL themselves, and
mark an entry ``stale`` once it is older than three of its node's intervals --
so a dead node is flagged within ``3 x interval`` and gone within ``ttl_s``.

Every monitor keeps a view of the whole bucket, fed by a KV watcher, so the
cluster-wide ``fabric.nodes.list``/``get``/``devices`` endpoints answer from
memory.  Where the NATS has no JetStream (``fabric up --nats-url`` to a plain
server), the view is fed by the heartbeats on ``fabric.telemetry.*`` instead,
with the same age rules; :attr:`NodeRegistry.backend` says which.

The bucket is declared to the service kit (:func:`bucket`), which recreates it
whenever the connection comes back -- a restarted nats-server has lost it, since
it is memory-backed -- and then the service calls :meth:`NodeRegistry.attach`
to follow the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from typing import Any

from nats.js.api import KeyValueConfig, StorageType

from fabric.errors import UnknownNode
from fabric.jetstream import KeyValueBucket
from fabric.protocol.streams import REGISTRY_BUCKET
from fabric.protocol.subjects import telemetry
from fabric.schema import JSON, NodeRecord

__all__ = ["NodeRegistry", "bucket", "BUCKET", "DEFAULT_TTL_S", "STALE_INTERVALS", "telemetry_subject"]

BUCKET = REGISTRY_BUCKET
#: how long a node's last heartbeat stays in the registry (the bucket's max_age)
DEFAULT_TTL_S = 5.0
#: a record older than this many of its node's intervals is "stale"
STALE_INTERVALS = 3.0


def bucket(ttl_s: float) -> KeyValueBucket:
    """The registry's bucket, as the gpu-monitor declares it to the service kit.

    Memory storage on purpose: the registry is live state that the next round of
    heartbeats rebuilds within one interval, so a restarted nats-server needs
    nothing from disk -- only the bucket itself, which the kit recreates.
    """
    return KeyValueBucket(KeyValueConfig(
        bucket=BUCKET, history=1, ttl=ttl_s, storage=StorageType.MEMORY,
        description="fabric node registry: each node's latest telemetry (gpu-monitor)"))


def telemetry_subject(node: str) -> str:
    """Where a node's heartbeats are published."""
    return telemetry(node)


class _Entry:
    __slots__ = ("record", "stored_at")

    def __init__(self, record: NodeRecord, stored_at: float) -> None:
        self.record = record
        self.stored_at = stored_at  # Unix time the registry stored it (server time for KV)


class NodeRegistry:
    """Writes this node's record, and keeps a live view of every node's."""

    def __init__(self, nc: Any, node: str, ttl_s: float = DEFAULT_TTL_S, log: Any = None) -> None:
        self.nc = nc
        self.node = node
        self.ttl_s = ttl_s
        self.log = log
        self.kv: Any = None
        self.backend = "none"
        self._view: dict[str, _Entry] = {}
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    # -- lifecycle -------------------------------------------------------------------

    async def attach(self, js: Any) -> None:
        """Follow the bucket through *js* (a JetStream context), or the heartbeats when *js* is None.

        Called by the service each time the kit has (re)ensured the bucket: after
        a nats-server restart the old KV handle and watcher point at a bucket that
        was recreated empty, so both are opened anew.  The view is kept: entries
        that no heartbeat renews age out by the TTL as usual.
        """
        await self._detach()
        if js is None:
            self.kv = None
            if self.backend != "heartbeats" and self.log is not None:
                self.log.warning("no JetStream KV: the node registry follows heartbeats only")
            self.backend = "heartbeats"
            self._sub = await self.nc.subscribe(telemetry("*"), cb=self._on_heartbeat)
            return
        self.kv = await js.key_value(BUCKET)
        status = await self.kv.status()
        ttl = status.ttl or 0.0
        if ttl and abs(ttl - self.ttl_s) > 1e-3:
            if self.log is not None:
                self.log.warning("the node registry bucket has another TTL; using it", bucket_ttl_s=ttl,
                                 asked_ttl_s=self.ttl_s)
            self.ttl_s = float(ttl)
        self.backend = "kv"
        self._watcher = await self.kv.watchall()
        self._task = asyncio.get_running_loop().create_task(self._follow(self._watcher))

    async def stop(self) -> None:
        """Leave the registry (this node's entry is deleted) and stop following it."""
        if self.kv is not None:
            try:
                await self.kv.delete(self.node)
            except Exception:
                pass  # NATS gone: the TTL removes the entry instead
        await self._detach()

    async def _detach(self) -> None:
        task, watcher, sub = self._task, self._watcher, self._sub
        self._task = self._watcher = self._sub = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if watcher is not None:
            with contextlib.suppress(Exception):  # its consumer may be gone with the old server
                await watcher.stop()
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- writing ---------------------------------------------------------------------

    async def put(self, data: bytes) -> None:
        """Store this node's encoded record (a heartbeat)."""
        if self.kv is not None:
            await self.kv.put(self.node, data)

    # -- the view ----------------------------------------------------------------------

    async def _follow(self, watcher: Any) -> None:
        from nats.js.kv import KV_DEL, KV_PURGE

        while True:
            try:
                async for entry in watcher:
                    if entry is None:  # end of the initial values
                        continue
                    if entry.operation in (KV_DEL, KV_PURGE):
                        self._view.pop(entry.key, None)
                        continue
                    self._store(entry.key, entry.value, _unix(entry.created))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad value, or the watcher broke: log and go on
                if self.log is not None:
                    self.log.warning("node registry watcher", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _on_heartbeat(self, msg: Any) -> None:
        node = msg.subject.rsplit(".", 1)[-1]
        self._store(node, msg.data, time.time())

    def _store(self, key: str, data: bytes | None, stored_at: float | None) -> None:
        if not data:
            return
        try:
            record = JSON.decode(data, NodeRecord)
        except Exception:
            return  # not a NodeRecord: someone wrote garbage into the bucket; ignore it
        if record.node != key:
            return
        self._view[key] = _Entry(record, stored_at if stored_at is not None else time.time())

    def records(self) -> list[NodeRecord]:
        """Every node still in the registry, with ``status`` and ``age_s`` set, sorted by name."""
        now = time.time()
        out: list[NodeRecord] = []
        for key in sorted(self._view):
            entry = self._view[key]
            age = max(0.0, now - entry.stored_at)
            if age > self.ttl_s:
                del self._view[key]  # JetStream has expired it (or will within its sweep)
                continue
            out.append(_with_age(entry.record, age))
        return out

    def get(self, node: str) -> NodeRecord:
        for record in self.records():
            if record.node == node:
                return record
        raise UnknownNode(f"no node {node!r} in the registry (known: {', '.join(self.known()) or 'none'}); "
                          f"a node leaves it {self.ttl_s:g}s after its last heartbeat", node=node)

    def known(self) -> list[str]:
        return sorted(self._view)


def _with_age(record: NodeRecord, age: float) -> NodeRecord:
    import msgspec

    stale = age > STALE_INTERVALS * max(record.interval_s, 0.05)
    return msgspec.structs.replace(record, age_s=round(age, 3), status="stale" if stale else "up")


def _unix(created: Any) -> float | None:
    if isinstance(created, dt.datetime):
        if created.tzinfo is None:
            created = created.replace(tzinfo=dt.timezone.utc)
        return float(created.timestamp())
    return None
