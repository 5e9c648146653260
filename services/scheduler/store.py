"""Writing tasks to JetStream without waiting on each acknowledgement.

nats-py's ``js.publish`` awaits one ack per message; the scheduler writes two or three
messages per task, so it keeps many in flight instead: :class:`Publisher` publishes
with a reply subject under one inbox of its own, and one subscription matches each
ack to its callback.  An ack that does not come within :data:`ACK_TIMEOUT_S` (a
nats-server restart) fails its callback, and the writer tries again.

:class:`RecordWriter` keeps each task's KV entry in step with memory.  Every write is
a compare-and-swap (``Nats-Expected-Last-Subject-Sequence``: the revision the last
write returned, 0 for a new key), so two schedulers can never both move one task.
Writes are coalesced per task: while one is in flight, further changes wait and go
out together as the next one -- a task that is handed out and finishes within one
write's round trip is written as queued, then as succeeded, with its attempt (start
and end) recorded.  :meth:`~fabric.services.scheduler.machine.Task.when_durable`
runs what must wait for the KV (the submit reply, the result notice).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import Header

from fabric.protocol.streams import BODY_STREAM, TASK_BUCKET
from fabric.protocol.subjects import TASK, Task, cluster
from fabric.schema import MSGPACK

from . import machine

__all__ = ["Publisher", "RecordWriter", "BODY_STREAM", "TASK_BUCKET", "body_subject", "ACK_TIMEOUT_S"]

#: how long an ack may take before the write counts as failed and is tried again
ACK_TIMEOUT_S: Final = 5.0
#: JetStream's error code for "wrong last sequence" (a compare-and-swap that lost)
WRONG_LAST_SEQUENCE: Final = 10071
# JetStream's own headers, as nats-py names them
EXPECTED_LAST_SUBJECT_SEQUENCE: Final = Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value
MSG_ID: Final = Header.MSG_ID.value
#: a message's own time to live (ADR-43; the KV bucket's stream allows it), in seconds
MSG_TTL: Final = Header.MSG_TTL.value

_ACK = msgspec.json.Decoder(dict[str, Any])
class BodyHolder(Protocol):
    """What waits for a body to be stored: one task, or every task of a map."""

    body_durable: bool

    @property
    def id(self) -> str: ...

    def wake(self) -> None: ...


#: an ack's outcome: (sequence, None) when stored, (0, error dict) when not
AckCallback = Callable[[int, dict[str, Any] | None], None]


def body_subject(body: str) -> str:
    """Where a task's body is stored: ``fabric.task.body.<id or map prefix>``."""
    return f"{cluster(TASK, Task.BODY)}.{body}"


def kv_subject(task_id: str) -> str:
    return f"$KV.{TASK_BUCKET}.{task_id}"


class Publisher:
    """JetStream publishes with many acks in flight, each ack routed to its callback."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = ""
        self._seq = itertools.count(1)
        self._pending: dict[int, tuple[float, AckCallback]] = {}
        self._out: list[tuple[str, bytes, str, dict[str, str] | None]] = []
        self._wake = asyncio.Event()
        self._sub: Any = None

    async def open(self) -> None:
        self.prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self.prefix + ".*", cb=self._on_ack)

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        pending, self._pending = self._pending, {}
        for _, cb in pending.values():
            cb(0, {"code": 503, "description": "scheduler stopping"})

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def publish(self, subject: str, data: bytes, headers: dict[str, str] | None, cb: AckCallback) -> None:
        """Queue one publish; *cb* gets its ack (sent by :meth:`run`, at once when the loop is free)."""
        seq = next(self._seq)
        self._pending[seq] = (time.monotonic(), cb)
        self._out.append((subject, data, f"{self.prefix}.{seq}", headers))
        self._wake.set()

    async def run(self) -> None:
        """Send what :meth:`publish` queued, and fail acks that never come; runs until cancelled."""
        last_sweep = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                pass
            self._wake.clear()
            out, self._out = self._out, []
            if out and self.nc.is_connected:
                await self._send_all(out)
            else:  # nats-py buffers them while it reconnects (or says why it cannot)
                for subject, data, reply, headers in out:
                    try:
                        await self.nc.publish(subject, data, reply=reply, headers=headers)
                    except Exception as exc:  # connection closed or reconnecting buffer full: fail it, it is retried
                        self._fail(int(reply.rsplit(".", 1)[1]), str(exc) or type(exc).__name__)
            now = time.monotonic()
            if now - last_sweep > 0.5:
                last_sweep = now
                late = [seq for seq, (t, _) in self._pending.items() if now - t > ACK_TIMEOUT_S]
                for seq in late:
                    self._fail(seq, "no acknowledgement")

    async def _send_all(self, out: list[tuple[str, bytes, str, dict[str, str] | None]]) -> None:
        """Hand every queued publish to nats-py as one protocol buffer.

        ``nc.publish`` costs about 10 µs of Python a message (header checks, formatting, a
        flush check), and the scheduler sends two or three a task: here the PUB/HPUB lines
        are formatted together and handed over once.  Subjects are the scheduler's own
        (task ids match ``TaskIdStr``) and header values are numbers and ids, so nothing
        here needs nats-py's checks.  nats-py is pinned to 2.16.x, whose pending buffer and
        flusher this uses (as the service kit uses its ``$SRV`` handlers).
        """
        nc = self.nc
        parts: list[bytes] = []
        size = 0
        for subject, data, reply, headers in out:
            if headers:
                hdr = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
                parts.append(f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + len(data)}\r\n".encode())
                parts.append(hdr)
            else:
                parts.append(f"PUB {subject} {reply} {len(data)}\r\n".encode())
            parts.append(data)
            parts.append(b"\r\n")
            size += len(data)
        try:
            nc.stats["out_msgs"] += len(out)
            nc.stats["out_bytes"] += size
            await nc._send_command(b"".join(parts))
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except Exception as exc:  # the connection went away meanwhile: fail them, they are retried
            for _, _, reply, _ in out:
                self._fail(int(reply.rsplit(".", 1)[1]), str(exc) or type(exc).__name__)

    def _fail(self, seq: int, why: str) -> None:
        entry = self._pending.pop(seq, None)
        if entry is not None:
            entry[1](0, {"code": 503, "description": why})

    async def _on_ack(self, msg: Any) -> None:
        try:
            seq = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        entry = self._pending.pop(seq, None)
        if entry is None:
            return  # late, after it timed out: the write was tried again
        cb = entry[1]
        if not msg.data:
            # a status message: 503 no responders (no stream for the subject, JetStream down)
            status = (msg.headers or {}).get("Status", "503")
            cb(0, {"code": int(status) if status.isdigit() else 503, "description": "no stream answered"})
            return
        try:
            ack = _ACK.decode(msg.data)
        except msgspec.DecodeError:
            cb(0, {"code": 500, "description": "unreadable acknowledgement"})
            return
        err = ack.get("error")
        if err:
            cb(0, err)
        else:
            cb(int(ack.get("seq", 0)), None)


class RecordWriter:
    """Keeps each task's KV entry in step with memory: coalesced compare-and-swap writes."""

    def __init__(self, publisher: Publisher, log: Any, on_conflict: Callable[[machine.Task], None],
                 retention_s: float = 86400.0,
                 on_first_record: Callable[[machine.Task], None] | None = None) -> None:
        self.pub = publisher
        #: called when a task's first record is stored (a map's task leaves its body's care, :mod:`.maps`)
        self.on_first_record = on_first_record
        #: an ended task's record is written with this TTL (Nats-TTL): JetStream removes it after
        self.ended_ttl = {MSG_TTL: str(max(1, int(retention_s)))}
        self.log = log
        #: called when a compare-and-swap lost: someone else wrote the task (another scheduler)
        self.on_conflict = on_conflict
        self.writes = 0
        self.conflicts = 0

    def save(self, task: machine.Task) -> None:
        """Write *task*'s record unless a write is in flight (then the change rides on the next)."""
        if not task.writing and task.durable < task.version:
            self._write(task)

    def write(self, task: machine.Task) -> None:
        """Write *task*'s record now, even if memory holds nothing newer (unless a write is in flight)."""
        if not task.writing:
            self._write(task)

    def save_body(self, task: BodyHolder, body: str, data: bytes, headers: dict[str, str] | None = None,
                  on_stored: Callable[[int], None] | None = None) -> None:
        """Store a body message (deduplicated by its id); the waiters of the task (or of every task of a
        map: *task* stands for them all) wait for it too.  *on_stored* gets the body's stream sequence."""
        headers = {**(headers or {}), MSG_ID: body}

        def acked(seq: int, err: dict[str, Any] | None) -> None:
            if err is not None:
                self.log.warning("task body not stored, retrying", task=task.id, error=err.get("description"))
                asyncio.get_running_loop().call_later(0.1, self.pub.publish, body_subject(body), data, headers,
                                                      acked)
                return
            if on_stored is not None:
                on_stored(seq)
            task.body_durable = True
            task.wake()

        self.pub.publish(body_subject(body), data, headers, acked)

    def _write(self, task: machine.Task) -> None:
        task.writing = True
        version = task.version
        data = MSGPACK.encode(task.rec)
        self.writes += 1

        def acked(seq: int, err: dict[str, Any] | None) -> None:
            task.writing = False
            if err is None:
                first = task.rev == 0
                task.rev = seq
                if first and self.on_first_record is not None:
                    self.on_first_record(task)
                task.durable = version
                task.wake()
                self.save(task)  # changes made while this write was in flight
                return
            if err.get("err_code") == WRONG_LAST_SEQUENCE:
                self.conflicts += 1
                self.log.warning("task write lost a compare-and-swap", task=task.id, error=err.get("description"))
                self.on_conflict(task)
                return
            # transient (a restarting server, no ack): try again shortly
            asyncio.get_running_loop().call_later(0.1, self.save, task)

        headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(task.rev)}
        if task.done:
            headers.update(self.ended_ttl)
        self.pub.publish(kv_subject(task.id), data, headers, acked)
