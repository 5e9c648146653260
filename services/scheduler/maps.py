"""Map tasks are recorded lazily: a map's body is its tasks' durable submit.

``fc.map`` sends thousands of calls at once, and most of them start and end within a
second.  Writing a KV record for each as it is queued, and again as it ends, was the
largest cost per task (a compare-and-swap, its ack, the record's encoding).  So a map's
tasks get no record when they are queued: the map's body message (stream
``FABRIC_TASK_BODIES``, :class:`~fabric.schema.tasks.MapBody`, header ``Fabric-Map``)
holds them -- the map is answered once the body is stored -- and a task gets its first
record at its first change after that (handed out and written ``running``, or ended),
or, if it is still waiting :data:`LAZY_S` after its body was stored, a record of what
it is then.  A short task is therefore written once, at its end.

A new active scheduler must find the tasks that have no record yet.  The
**checkpoint** -- key ``maps`` of KV bucket ``fabric_scheduler_state`` -- is a sequence
of the body stream below which every map's tasks have records; the active scheduler
advances it as its maps settle (:class:`MapBook`), at most every
:data:`CHECKPOINT_EVERY_S`.  Recovery reads the records, then the map bodies from the
checkpoint on (:func:`read_map_bodies`), and rebuilds each task of them that has no
record.  With no checkpoint (a store from before this scheme) every body is read.

A body older than ``tasks.retention_s`` is not rebuilt from: its ended tasks' records
may have expired since, and rebuilding would run them again.  That happens only when a
scheduler died within :data:`LAZY_S` of a map and none was active again for the whole
retention; the scheduler logs how many tasks it left.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from nats.js.api import KeyValueConfig, StorageType

from fabric.jetstream import KeyValueBucket
from fabric.protocol.headers import MAP_HEADER
from fabric.protocol.streams import STATE_BUCKET
from fabric.schema import MSGPACK
from fabric.schema.tasks import MapBody

from .machine import BodyGroup
from .machine import Task as LiveTask
from .store import BODY_STREAM, body_subject

__all__ = ["MapBook", "LAZY_S", "CHECKPOINT_EVERY_S", "STATE_BUCKET", "CHECKPOINT_KEY",
           "state_bucket", "read_checkpoint", "write_checkpoint", "read_map_bodies"]

#: a map task still without a record this long after its body was stored gets one
LAZY_S: Final = 2.0
#: the checkpoint is written at most this often (when it moved)
CHECKPOINT_EVERY_S: Final = 0.5

CHECKPOINT_KEY: Final = "maps"


def state_bucket() -> KeyValueBucket:
    """The scheduler's own bookkeeping (file storage: it must outlive a nats-server restart)."""
    return KeyValueBucket(KeyValueConfig(bucket=STATE_BUCKET, history=1, storage=StorageType.FILE,
                                         description="fabric scheduler state: the map-body checkpoint"))


class MapBook:
    """The maps whose tasks do not all have records yet, and the checkpoint they allow."""

    def __init__(self) -> None:
        #: stored bodies (by sequence) with tasks that have no record yet
        self.unsettled: dict[int, BodyGroup] = {}
        #: bodies sent but not yet stored, each with the least sequence it can get
        self.sending: dict[int, int] = {}
        #: the highest body sequence stored so far
        self.last_seq = 0
        #: the checkpoint last written (-1: none this term)
        self.saved = -1

    def sending_body(self, group: BodyGroup) -> None:
        """*group*'s body is being sent: it will be stored after every body stored so far."""
        self.sending[id(group)] = self.last_seq + 1

    def stored(self, group: BodyGroup, seq: int) -> None:
        """*group*'s body is stored at *seq* (a retried one may get an earlier sequence: JetStream
        deduplicates it -- which is why the checkpoint waits for bodies being sent)."""
        self.sending.pop(id(group), None)
        group.seq = seq
        self.last_seq = max(self.last_seq, seq)
        if group.unwritten > 0:
            self.unsettled[seq] = group

    def recorded(self, task: LiveTask) -> None:
        """*task*'s first record is stored: its map's body no longer needs to hold it."""
        group, task.group = task.group, None
        if group is None:
            return
        group.unwritten -= 1
        if group.unwritten <= 0 and group.seq:
            self.unsettled.pop(group.seq, None)

    def checkpoint(self) -> int:
        """The least body sequence recovery must read from."""
        return min([*self.unsettled, *self.sending.values(), self.last_seq + 1])


async def read_checkpoint(kv: Any) -> int:
    """The stored checkpoint (0 when there is none: read every body)."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(CHECKPOINT_KEY)
    except KeyNotFoundError:
        return 0
    try:
        return max(0, int(json.loads(entry.value or b"{}").get("seq", 0)))
    except (ValueError, TypeError, AttributeError):
        return 0


async def write_checkpoint(kv: Any, seq: int, instance: str) -> None:
    await kv.put(CHECKPOINT_KEY, json.dumps({"seq": seq, "instance": instance}).encode())


async def read_map_bodies(js: Any, start: int) -> AsyncIterator[tuple[int, MapBody | None]]:
    """Every map body in the stream from sequence *start* on: ``(seq, body)``, body None when unreadable."""
    from nats.js.errors import NotFoundError

    seq = max(start, 1)
    while True:
        try:
            msg = await js.get_msg(BODY_STREAM, seq=seq, subject=body_subject("*"), next=True, direct=True)
        except NotFoundError:
            return
        seq = (msg.seq or seq) + 1
        if not msg.headers or MAP_HEADER not in msg.headers:
            continue  # a single task's body: its record was written before it was answered
        try:
            yield msg.seq or seq - 1, MSGPACK.decode(msg.data or b"", MapBody)
        except msgspec.DecodeError:
            yield msg.seq or seq - 1, None
