"""The scheduler service: durable tasks, placed by requirements, pulled by free nodes.

How the parts fit:

* :mod:`.lease` decides which scheduler is active; only the active one serves
  ``fabric.task.*`` (the kit's :meth:`~fabric.service.FabricService.serve_side`), the
  others stand by and take over when its lease lapses.
* A task arrives (``submit``, or ``map`` for many calls of one function), is checked
  (400 bad input, 422 when no registered node could ever run it, :mod:`.nodes`), and
  written to JetStream by :mod:`.store`: its body to stream FABRIC_TASK_BODIES, its
  :class:`~fabric.schema.tasks.TaskRecord` to KV bucket ``fabric_tasks``.  The reply
  waits until both are stored -- a map's tasks get their records later, their body
  holds them until then (:mod:`.maps`).
* It waits for its dependencies, then joins the :mod:`.queue` -- or goes straight to a
  node that is already asking for work.  Nodes pull (``fabric.task.pull``): a spawner
  asks for as many tasks as it has free slots and reports results on the same
  request; the scheduler gives each node only what fits its free resources.
* Every state change goes through :func:`.machine.move` (the legal transitions), is
  written by compare-and-swap, and is published on ``fabric.task.events``; a task's
  end is published on its ``notify`` subject once it is durable.
* Fault tolerance: a running task whose node stops listing it (its heartbeat, in
  every pull) for :data:`LOST_S` is run again; system failures (crash, timeout, node
  lost) use up ``retries``, then the task is ``dead``.  A new active scheduler
  rebuilds everything from the KV bucket and the body stream (the map bodies from the
  checkpoint on, for the tasks with no record yet).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig

from fabric.errors import BadRequest, Conflict, Infeasible, NotFound, TooLarge, Unavailable
from fabric.jetstream import JetStreamResource, KeyValueBucket, kv_snapshot, task_results_bucket, webhook_stream
from fabric.jetstream import Stream as StreamResource
from fabric.protocol.cores import pool_key
from fabric.protocol.headers import MAP_HEADER
from fabric.protocol.permissions import user_subject
from fabric.protocol.pytasks import decode_python_task, encode_python_task
from fabric.protocol.subjects import TASK, Task, cluster
from fabric.schema import CONTENT_TYPE_HEADER, JSON, MSGPACK, MSGPACK_CONTENT_TYPE
from fabric.schema.tasks import (
    CANCELLED,
    CORE,
    DEAD,
    EXEC,
    FAILED,
    OPENCL,
    PYTHON,
    QUEUED,
    RUNNING,
    SUBMITTED,
    SUCCEEDED,
    WAITING,
    Attempt,
    CallbackOutcome,
    CallbackReport,
    ExecSpec,
    ListRequest,
    MapBody,
    MapReply,
    MapRequest,
    PullReply,
    PullRequest,
    ReleaseReply,
    Resources,
    ResultChunk,
    ResultRequest,
    SubmitReply,
    SubmitRequest,
    TaskDone,
    TaskDoneBatch,
    TaskError,
    TaskEvent,
    TaskEventBatch,
    TaskListReply,
    TaskRecord,
    TaskRequest,
    TaskResult,
    TaskRun,
    TaskStatsReply,
    WaitRequest,
)
from fabric.service import Endpoint, FabricService, Reply, Request, ServiceSettings
from fabric.service_endpoint import with_user_forms
from fabric.service_identity import check_owner, check_reply_subject
from fabric.signing import file_message, map_message, python_message, require

from . import lease as lease_mod
from . import maps as maps_mod
from . import webhooks
from .admission import exec_spec_of, kind_of, payload_of, resources_of
from .machine import BodyGroup, all_durable, move, now_ms, resolve
from .machine import Task as LiveTask
from .nodes import Node, Nodes, unmet
from .queue import DEFAULT_RESOURCES, TaskQueue, needed_core
from .results import StoredResults
from .stats import TaskStats
from .store import BODY_STREAM, TASK_BUCKET, Publisher, RecordWriter, body_subject

__all__ = ["SchedulerService", "LOST_S"]

#: a running task its node has not listed for this long is lost (its node died or restarted)
LOST_S: Final = 3.0
#: finished tasks kept in memory (older ones are read back from the KV bucket)
FINISHED_KEPT: Final = 20_000
#: bytes kept free in a KV record or a notice for everything but the result
RECORD_MARGIN: Final = 64 << 10
#: a notice (TaskDoneBatch) is cut at about this size
NOTICE_BYTES: Final = 1 << 20
BODY_MAX_AGE_S: Final = 7 * 24 * 3600.0
#: a core task whose core no node lists waits this long for the nodes' next pulls, then is refused (422) --
#: unless a node has not pulled that recently (its cores unknown): then it queues for a node with its core
CORES_FRESH_S: Final = 2.5
#: state changes are published on fabric.task.events at most this often, in batches
EVENTS_EVERY_S: Final = 0.05
#: a task handed out from the queue is written ``running`` this long after (if it has not ended by then)
RUNNING_WRITE_DELAY_S: Final = 0.25
#: a new active scheduler publishes again the notices of tasks that ended this recently
RENOTIFY_S: Final = 30.0


class _Pull:
    """A node's pull held until work arrives (the long poll)."""

    __slots__ = ("node", "slots", "runs", "room", "future")

    def __init__(self, node: Node, slots: int, room: int) -> None:
        self.node = node
        self.slots = slots
        self.runs: list[TaskRun] = []
        #: bytes the reply may still carry
        self.room = room
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _mint_id() -> str:
    return "t" + secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")


class SchedulerService(FabricService):
    name = "scheduler"
    description = "fabric tasks: durable on JetStream, placed by requirements, pulled by free nodes, retried on failure"

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.lease = lease_mod.Lease(self.node, self.log, self._on_term, self._on_term_end)
        #: a term's start, end and re-reading are one at a time (the lease's callbacks and _resync)
        self._term = asyncio.Lock()
        self._resyncing: asyncio.Task[None] | None = None
        self.nodes = Nodes(self.log)
        self.ttl_s = settings.config.telemetry.node_ttl_s
        self.js: JetStreamContext | None = None
        #: large results, read and released for their owners (results.py)
        self.results = StoredResults()
        self.task_kv: Any = None
        self.state_kv: Any = None
        self.pub: Publisher | None = None
        self.writer: RecordWriter | None = None
        side = [self.cluster_endpoint(TASK, verb, handler) for verb, handler in (
            (Task.SUBMIT, self.submit), (Task.MAP, self.map), (Task.GET, self.get), (Task.WAIT, self.wait),
            (Task.CANCEL, self.cancel), (Task.LIST, self.list), (Task.RESULT, self.result),
            (Task.RELEASE, self.release), (Task.STATS, self.task_stats), (Task.CALLBACK, self.callback),
            (Task.PULL, self.pull))]
        # the nodes' pull (a result reported there is trusted), the gateways' webhook reports and the figures
        # (they count every user's tasks): no user reaches them
        side[-1].users = side[-2].users = side[-3].users = False
        self._side = with_user_forms(side)
        self._subs: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        """Forget every task (a term ends; the next active reads them back from JetStream)."""
        #: every unfinished task (finished ones move to ``finished``)
        self.live: dict[str, LiveTask] = {}
        self.finished: OrderedDict[str, LiveTask] = OrderedDict()
        self.keys: dict[str, str] = {}
        self.queue = TaskQueue()
        self._parked: list[_Pull] = []
        self._cancels: dict[str, list[str]] = {}
        self._watchers: dict[str, list[asyncio.Future[None]]] = {}
        self._notices: dict[tuple[str, str], list[TaskDone]] = {}
        self._events: list[TaskEvent] = []
        self._flush_scheduled = False
        self._events_scheduled = False
        self._feed_scheduled = False
        self._late: list[LiveTask] = []
        self._late_scheduled = False
        self.maps = maps_mod.MapBook()
        self.stats = TaskStats()  # a new term counts afresh (a counter reset, for Prometheus)

    # -- the kit's hooks ---------------------------------------------------------------

    def endpoints(self) -> Sequence[Endpoint]:
        return ()

    def side_endpoints(self) -> Sequence[Endpoint]:
        return self._side

    def metadata(self) -> dict[str, str]:
        return {"instance": self.lease.instance}

    def jetstream_resources(self) -> Sequence[JetStreamResource]:
        return [
            StreamResource(StreamConfig(
                name=BODY_STREAM, subjects=[body_subject("*")], storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS, max_age=BODY_MAX_AGE_S, duplicate_window=120.0,
                allow_direct=True, description="fabric task bodies (scheduler)")),
            KeyValueBucket(KeyValueConfig(bucket=TASK_BUCKET, history=1, storage=StorageType.FILE,
                                          description="fabric task records (scheduler)")),
            lease_mod.bucket(),
            maps_mod.state_bucket(),
            task_results_bucket(),
            webhook_stream(),  # the gateways' too: whichever starts first makes it
        ]

    async def on_jetstream(self, js: JetStreamContext | None) -> None:
        self.js = js
        self.results.js = js
        if js is None:
            self.log.error("the scheduler needs JetStream: tasks are not served until it is available")
            return
        self.task_kv = await js.key_value(TASK_BUCKET)
        self.state_kv = await js.key_value(maps_mod.STATE_BUCKET)
        self.lease.attach(await js.key_value(lease_mod.LEASE_BUCKET))
        await self.nodes.follow(js)

    async def on_serving(self) -> None:
        self.pub = Publisher(self.connection)
        await self.pub.open()
        self.writer = RecordWriter(self.pub, self.log, self._conflict, self.settings.config.tasks.retention_s,
                                   on_first_record=self.maps_recorded)
        self.background(self.pub.run, name="publisher")
        self.background(self._checkpoints, name="checkpoints")
        self.background(self.lease.run, name="lease")
        self.background(self._sweep, name="sweep")
        # ready (for fabric up) once serving tasks, or once another scheduler is known to serve them
        try:
            await asyncio.wait_for(self.lease.settled.wait(), lease_mod.LEASE_S * 4)
        except TimeoutError:
            self.log.warning("no scheduler lease settled yet: starting as a standby")

    async def on_stopping(self) -> None:
        if self.lease.active and self.writer is not None:
            await self._settle_maps()

    async def on_stop(self) -> None:
        if self._resyncing is not None:
            self._resyncing.cancel()
        await self.lease.release()
        await self._unserve()
        await self.nodes.stop()
        if self.pub is not None:
            await self.pub.close()

    # -- terms -------------------------------------------------------------------------

    async def _become_active(self) -> None:
        t0 = time.monotonic()
        self._reset()
        try:
            await self._recover()
        except Exception as exc:
            self.log.error("recovery failed: serving what was read", error=str(exc) or type(exc).__name__)
        self._subs = await self.serve_side(self._side)
        self._schedule_flush()
        self.log.info("serving tasks", recovered=len(self.live), queued=len(self.queue),
                      took_s=round(time.monotonic() - t0, 3))
        self._schedule_feed()

    async def _become_standby(self) -> None:
        await self._unserve()
        for pull in self._parked:
            pull.wake()
        self._reset()
        self.log.info("scheduler standing by")

    async def _unserve(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _recover(self) -> None:
        """Read every task back from the KV bucket; queue the unfinished ones (with their bodies)."""
        if self.task_kv is None or self.js is None:
            return
        from nats.js.kv import KV_DEL, KV_PURGE

        records: list[tuple[TaskRecord, int]] = []
        # every record, whatever nats-py's watcher says about where the initial values end (kv_snapshot)
        for entry in await kv_snapshot(self.task_kv):
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                continue
            try:
                records.append((MSGPACK.decode(entry.value, TaskRecord), entry.revision or 0))
            except Exception:
                self.log.warning("unreadable task record skipped", key=entry.key)
        bodies: dict[str, bytes] = {}
        recent = now_ms() - int(RENOTIFY_S * 1000)
        for rec, rev in records:
            task = LiveTask(rec)
            task.rev = rev
            task.durable = task.version
            task.body_durable = True
            if rec.key:
                self.keys[_key(rec.owner, rec.key)] = rec.id
            if task.done:
                self._keep_finished(task)
                if rec.notify and rec.finished_ms > recent:
                    # the last active one may have died between writing this end and publishing it:
                    # publish it again (a client ignores a notice for a future it no longer holds)
                    self._notices.setdefault((rec.notify, rec.notify_encoding), []).append(_done(rec))
                if rec.callback_url and rec.callback is None and rec.finished_ms > recent and self.pub is not None:
                    webhooks.publish(self.pub, rec, self.log)  # likewise; the stream keeps it once (its msg id)
                continue
            body = bodies.get(rec.body)
            if body is None:
                try:
                    msg = await self.js.get_last_msg(BODY_STREAM, body_subject(rec.body))
                    body = bodies[rec.body] = bytes(msg.data or b"")
                except Exception as exc:
                    self.log.error("task body lost: the task fails", task=rec.id, error=str(exc))
                    self.live[rec.id] = task
                    self._finish(task, FAILED, TaskError(code=500, kind="internal",
                                                         message="the task's body was lost from JetStream"))
                    continue
            self._split_body(task, body)
            self.live[rec.id] = task
        # dependencies and placement, once every task is known
        for task in list(self.live.values()):
            if task.state == WAITING:
                self._wait_for_deps(task)
                self._save(task)
            elif task.state == QUEUED:
                self.queue.push(task)
            elif task.state == RUNNING:
                att = task.attempt
                node = self.nodes.get(att.node if att else "")
                task.node = node.name
                task.gpus = node.take(task.rec.resources or DEFAULT_RESOURCES) or []
                node.running.add(task.id)
                task.assigned_at = task.seen_at = time.monotonic()  # its node has LOST_S to list it
        await self._recover_maps({rec.id for rec, _ in records})

    async def _recover_maps(self, known: set[str]) -> None:
        """Rebuild, from their bodies, the map tasks that have no record yet (maps.py)."""
        assert self.js is not None
        start = await maps_mod.read_checkpoint(self.state_kv) if self.state_kv is not None else 0
        info = await self.js.stream_info(BODY_STREAM)
        self.maps.last_seq = info.state.last_seq or 0
        oldest = now_ms() - int(self.settings.config.tasks.retention_s * 1000)
        rebuilt = left = bodies = 0
        loop = asyncio.get_running_loop()
        async for seq, body in maps_mod.read_map_bodies(self.js, start):
            bodies += 1
            if body is None:
                self.log.error("an unreadable map body was skipped", seq=seq)
                continue
            tasks = _map_tasks(body, body.prefix, body.created_ms, body.notify_encoding, body.owner, known)
            if not tasks:
                continue
            if body.created_ms < oldest:
                # its ended tasks' records may have expired: running them again would be wrong
                left += len(tasks)
                continue
            group = BodyGroup(tasks)
            for task in tasks:
                task.body_durable = True
            self.maps.stored(group, seq)
            for task in tasks:
                self._enter(task)
            loop.call_later(maps_mod.LAZY_S, self._record_map, group)
            rebuilt += len(tasks)
        self.log.info("map bodies read", since=start, bodies=bodies, rebuilt=rebuilt)
        if left:
            self.log.error("map tasks older than tasks.retention_s had no record: left unrun", tasks=left)

    def _split_body(self, task: LiveTask, body: bytes) -> None:
        """Keep what a task needs to run from its stored body."""
        if task.rec.kind == PYTHON:
            if task.rec.body_index >= 0:
                batch = MSGPACK.decode(body, MapRequest)
                task.fn, task.call = batch.fn, batch.calls[task.rec.body_index]
            else:
                parsed = decode_python_task(body)
                task.fn, task.call = bytes(parsed.fn), bytes(parsed.call)
        else:
            task.call = body

    # -- submitting ----------------------------------------------------------------------

    def _limit(self) -> int:
        return max(1024, self.connection.max_payload - RECORD_MARGIN)

    async def _check_feasible(self, res: Resources, core: str = "") -> None:
        if not self.nodes.live():  # a fabric that is starting: its nodes' first heartbeats are on their way
            await self.nodes.wait_for_any(self.ttl_s)
        live = self.nodes.live()
        if core and unmet(live, res, core) is not None and unmet(live, res) is None:
            # no node says it has the core, yet: one may have loaded it a moment ago (a node lists its
            # cores in each pull, at least every second) -- wait for the pulls before refusing
            deadline = time.monotonic() + CORES_FRESH_S
            while time.monotonic() < deadline and unmet(self.nodes.live(), res, core) is not None:
                await asyncio.sleep(0.05)
            live = self.nodes.live()
            if any(time.monotonic() - n.pulled_at > CORES_FRESH_S for n in live):
                # a node has not pulled lately (this scheduler just took over): which cores it has is not
                # known, so the task is judged by its resources and waits for a node with the core
                core = ""
        why = unmet(live, res, core)
        if why is None:
            return
        if not self.nodes.live():
            raise Unavailable("no node is registered (is a node's gpu-monitor running?): submit again when one is")
        raise Infeasible(why)

    async def _check_deps(self, deps: list[str], caller: str | None) -> None:
        for dep in deps:
            known = self.live.get(dep) or self.finished.get(dep)
            rec = known.rec if known is not None else await self._read(dep)
            if rec is None:
                raise NotFound(f"dependency {dep!r} is not a known task")
            check_owner(caller, rec.owner, f"dependency {dep}")  # its result would be this task's input

    def _existing(self, task_id: str, key: str, owner: str) -> LiveTask | None:
        """The task a submit names again (by id, or by its owner's idempotency key); 409 for another's id."""
        if key and _key(owner, key) in self.keys:
            task_id = self.keys[_key(owner, key)]
        task = self.live.get(task_id) or self.finished.get(task_id) if task_id else None
        if task is not None and task.rec.owner != owner:
            raise Conflict(f"task id {task_id!r} is taken by another user's task: choose another id")
        return task

    async def submit(self, req: Request) -> SubmitReply:
        msg: SubmitRequest = req.decode(SubmitRequest)
        owner = req.caller or ""
        check_reply_subject(req.caller, msg.notify or None, "notify")
        known = self._existing(msg.id, msg.key, owner)
        if known is not None:
            await self._durable(known)
            return SubmitReply(id=known.id, state=known.state, existing=True)
        kind = kind_of(msg)
        res = resources_of(msg)
        body: bytes
        fn: bytes | None = None
        call: bytes
        if kind == PYTHON:
            payload = payload_of(msg, kind)
            require(self.settings.config.sandbox, python_message(payload), msg.signature, "python task")
            parsed = decode_python_task(payload)
            if parsed.deps:
                raise BadRequest("a python task's frame carries no dependency results: list the ids in deps")
            body, fn, call = payload, bytes(parsed.fn), bytes(parsed.call)
        elif kind == EXEC:
            spec = exec_spec_of(msg)
            if spec.native is not None:  # refused here already, not only on the node that would run it
                require(self.settings.config.sandbox, file_message(spec.native.sha256), spec.native.signature,
                        f"native executable sha256 {spec.native.sha256}")
            body = call = MSGPACK.encode(spec)
        else:
            if kind == CORE and not msg.core:
                raise BadRequest("a core task names its compute core (core)")
            payload = payload_of(msg, kind)
            if not payload and kind == OPENCL:
                raise BadRequest("an opencl task's payload is its FCLJ job frame")
            body = call = payload
        if len(body) > self._limit():
            raise TooLarge(f"a task body of {len(body)} bytes exceeds the limit of {self._limit()}: pass large "
                           f"inputs by reference (write them to remote memory and pass the handle)")
        await self._check_feasible(res, pool_key(owner, msg.core) if kind == CORE else "")
        await self._check_deps(msg.deps, req.caller)
        known = self._existing(msg.id, msg.key, owner)  # a duplicate may have arrived while this one awaited
        if known is not None:
            await self._durable(known)
            return SubmitReply(id=known.id, state=known.state, existing=True)
        task_id = msg.id or _mint_id()
        rec = TaskRecord(id=task_id, kind=kind, state=SUBMITTED, priority=msg.priority,
                         resources=None if res == DEFAULT_RESOURCES else res, core=msg.core, retries=msg.retries,
                         retry_exceptions=msg.retry_exceptions, timeout_s=msg.timeout_s, key=msg.key,
                         callback_url=msg.callback_url, deps=list(msg.deps), notify=msg.notify, owner=owner,
                         notify_encoding="msgpack" if req.codec is MSGPACK else "json", body=task_id,
                         created_ms=now_ms())
        task = LiveTask(rec, fn, call)
        self._enter(task)
        assert self.writer is not None
        self.writer.save_body(task, task_id, body)
        await self._durable(task)
        return SubmitReply(id=task.id, state=task.state)

    async def map(self, req: Request) -> MapReply:
        msg: MapRequest = req.decode(MapRequest)
        owner = req.caller or ""
        require(self.settings.config.sandbox, map_message(msg.fn, msg.calls), msg.signature, "map")
        check_reply_subject(req.caller, msg.notify or None, "notify")
        res = msg.resources or Resources()
        prefix = msg.prefix or _mint_id()
        first = self.live.get(f"{prefix}-0") or self.finished.get(f"{prefix}-0")
        if first is not None:  # a repeated map: the same tasks
            if first.rec.owner != owner:
                raise Conflict(f"map prefix {prefix!r} is taken by another user's tasks: choose another prefix")
            return MapReply(prefix=prefix, count=len(msg.calls))
        created = now_ms()
        encoding = "msgpack" if req.codec is MSGPACK else "json"
        # the whole request: the body alone rebuilds its tasks until they have records (maps.py)
        body = MSGPACK.encode(MapBody(
            fn=msg.fn, calls=msg.calls, prefix=prefix, priority=msg.priority, resources=msg.resources,
            retries=msg.retries, retry_exceptions=msg.retry_exceptions, timeout_s=msg.timeout_s, deps=msg.deps,
            notify=msg.notify, created_ms=created, notify_encoding=encoding, owner=owner, signature=msg.signature))
        if len(body) > self._limit():
            raise TooLarge(f"a map batch of {len(body)} bytes exceeds the limit of {self._limit()}: "
                           f"send fewer calls per batch")
        await self._check_feasible(res)
        await self._check_deps(msg.deps, req.caller)
        tasks = _map_tasks(msg, prefix, created, encoding, owner)
        assert self.writer is not None
        group = BodyGroup(tasks)
        self.maps.sending_body(group)
        book = self.maps  # this term's: an ack that comes after the term ended is not the next one's
        self.writer.save_body(group, prefix, body, {MAP_HEADER: str(len(tasks))},
                              on_stored=lambda seq: self._map_stored(book, group, seq))
        for task in tasks:
            self._enter(task)
        await all_durable(tasks)
        return MapReply(prefix=prefix, count=len(tasks))

    # -- maps: recorded lazily (maps.py) ---------------------------------------------------

    def _map_stored(self, book: maps_mod.MapBook, group: BodyGroup, seq: int) -> None:
        if book is not self.maps:
            return
        book.stored(group, seq)
        if group.unwritten > 0:
            asyncio.get_running_loop().call_later(maps_mod.LAZY_S, self._record_map, group)

    def _record_map(self, group: BodyGroup) -> None:
        """Write a record for each task of *group* that has none yet (it has waited LAZY_S)."""
        assert self.writer is not None
        for task in group.tasks:
            if task.group is group and self.live.get(task.id) is task:
                self.writer.write(task)

    def maps_recorded(self, task: LiveTask) -> None:
        self.maps.recorded(task)

    async def _checkpoints(self) -> None:
        """Write the map-body checkpoint when it moved (at most every CHECKPOINT_EVERY_S)."""
        while True:
            await asyncio.sleep(maps_mod.CHECKPOINT_EVERY_S)
            await self._save_checkpoint()

    async def _save_checkpoint(self) -> None:
        if not self.lease.active or self.state_kv is None:
            return
        book = self.maps
        seq = book.checkpoint()
        if seq == book.saved:
            return
        try:
            await maps_mod.write_checkpoint(self.state_kv, seq, self.lease.instance)
        except Exception as exc:
            self.log.debug("map checkpoint not written", error=str(exc) or type(exc).__name__)
            return
        if book is self.maps:  # still the same term
            book.saved = seq

    async def _settle_maps(self, timeout_s: float = 2.0) -> None:
        """A clean stop: give every map task without a record one, then write the checkpoint."""
        for group in list(self.maps.unsettled.values()):
            self._record_map(group)
        deadline = time.monotonic() + timeout_s
        while self.maps.unsettled and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._save_checkpoint()

    def _enter(self, task: LiveTask) -> None:
        """A new task enters: it waits for its dependencies, or runs now, or queues."""
        self.live[task.id] = task
        if task.rec.key:
            self.keys[_key(task.rec.owner, task.rec.key)] = task.id
        self._event(task, "")
        if task.rec.deps:
            self._wait_for_deps(task)
            if task.state != SUBMITTED:
                self._save(task)
                return
        self._runnable(task)
        self._save(task)

    def _wait_for_deps(self, task: LiveTask) -> None:
        pending = 0
        for dep_id in task.rec.deps:
            dep = self.live.get(dep_id) or self.finished.get(dep_id)
            if dep is None:
                continue  # finished long ago: checked to exist at submit; its result is read at dispatch
            if dep.state == SUCCEEDED:
                continue
            if dep.done:
                self._finish(task, FAILED, _dep_error(dep))
                return
            pending += 1
            if dep.dependents is None:
                dep.dependents = []
            dep.dependents.append(task)
        task.pending_deps = pending
        if pending and task.state == SUBMITTED:
            self._move(task, WAITING)
        elif not pending and task.state == WAITING:
            self._runnable(task)

    def _runnable(self, task: LiveTask) -> None:
        """*task* may run: hand it to a node that is asking, or queue it."""
        if task.state == RUNNING:
            # a retry (lost, crashed, timed out, retry_exceptions) is queued first: handing it straight to a held
            # pull was running -> running, an IllegalTransition that killed the sweep or the pull that reported it
            self._move(task, QUEUED)
        for pull in self._parked:
            if len(pull.runs) < pull.slots and pull.node.record_at > 0 and \
                    pull.node.lacks(task.rec.resources or DEFAULT_RESOURCES, needed_core(task)) is None:  # see _take
                size = self._size(task)
                if (size <= pull.room or not pull.runs) and self._hold(task, pull.node) is not None:
                    pull.room -= size
                    pull.runs.append(self._start(task, pull.node))
                    pull.wake()
                    return
        if task.state != QUEUED:
            self._move(task, QUEUED)
        self.queue.push(task, front=bool(task.rec.attempts))

    # -- handing out work -----------------------------------------------------------------

    def _hold(self, task: LiveTask, node: Node) -> Any:
        gpus = node.take(task.rec.resources or DEFAULT_RESOURCES)
        if gpus is not None:
            task.gpus = gpus
        return gpus

    def _start(self, task: LiveTask, node: Node) -> TaskRun:
        # the attempt first: the "running" event carries its number (it said 0, or the previous attempt's)
        number = len(task.rec.attempts) + 1
        task.rec.attempts.append(Attempt(number=number, node=node.name, start_ms=now_ms()))
        self._move(task, RUNNING, node.name)
        task.node = node.name
        task.assigned_at = task.seen_at = time.monotonic()
        node.running.add(task.id)
        exec_spec = None
        dep_refs: dict[str, str] = {}
        if task.rec.kind == PYTHON:
            inline, dep_refs = self._dep_results(task)
            payload = encode_python_task(task.fn or b"", task.call or b"", inline)
        elif task.rec.kind == EXEC:
            payload = b""
            exec_spec = MSGPACK.decode(task.call or b"", ExecSpec)
        else:
            payload = task.call or b""
        return TaskRun(id=task.id, attempt=number, kind=task.rec.kind, payload=payload, core=task.rec.core,
                       exec=exec_spec, timeout_s=task.rec.timeout_s, gpus=[i for i, _, _ in task.gpus],
                       opencl_device=node.opencl_device(task.gpus), dep_refs=dep_refs,
                       cpus=(task.rec.resources or DEFAULT_RESOURCES).cpus, owner=task.rec.owner)

    def _dep_results(self, task: LiveTask) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
        """The results of *task*'s dependencies: inline ones, and the names of stored ones."""
        inline: list[tuple[str, bytes]] = []
        stored: dict[str, str] = {}
        for dep_id in task.rec.deps:
            dep = self.live.get(dep_id) or self.finished.get(dep_id)
            if dep is not None and dep.state == SUCCEEDED:
                if dep.rec.result_ref:
                    stored[dep_id] = dep.rec.result_ref
                else:
                    inline.append((dep_id, dep.rec.result))
        return inline, stored

    def _schedule_feed(self) -> None:
        if not self._feed_scheduled:
            self._feed_scheduled = True
            asyncio.get_running_loop().call_soon(self._feed)

    def _feed(self) -> None:
        """Give queued tasks to the nodes whose pulls are held."""
        self._feed_scheduled = False
        for pull in list(self._parked):
            room = pull.slots - len(pull.runs)
            if room <= 0 or not len(self.queue):
                continue
            runs, pull.room = self._take(pull.node, room, pull.room, first=not pull.runs)
            if runs:
                pull.runs.extend(runs)
                pull.wake()

    @staticmethod
    def _size(task: LiveTask) -> int:
        """About how many bytes *task* adds to a pull's reply."""
        return len(task.fn or b"") + len(task.call or b"") + 256 + (
            sum(len(d) for d in task.rec.deps) * 64 if task.rec.deps else 0)

    def _take(self, node: Node, slots: int, room: int, first: bool = True) -> tuple[list[TaskRun], int]:
        """Up to *slots* queued tasks for *node* whose bodies fit *room* bytes (one always, when *first*)."""
        if node.record_at <= 0:
            # it left the registry (its gpu-monitor stopped, or its heartbeats): its held pull may be an orphan
            # whose tasks would only be lost 3 s later (found by tests/test_tasks.py with nodes stopped cleanly)
            return [], room
        budget: list[Any] = [room, first]

        def hold(task: LiveTask, n: Node) -> Any:
            size = self._size(task)
            if size > budget[0] and not budget[1]:
                return None  # the reply is full: the rest wait for the next pull
            held = self._hold(task, n)
            if held is not None:
                budget[0] -= size
                budget[1] = False
            return held

        tasks = self.queue.take(node, slots, lambda t: t.state == QUEUED, hold)
        runs = [self._start(t, node) for t in tasks]
        if tasks:
            self._late.extend(tasks)
            if not self._late_scheduled:
                self._late_scheduled = True
                asyncio.get_running_loop().call_later(RUNNING_WRITE_DELAY_S, self._save_late)
        return runs, int(budget[0])

    def _save_late(self) -> None:
        """Write the ``running`` of tasks handed out a moment ago -- most short ones have ended and been
        written since, so their ``running`` never needs a write of its own (the attempt is in the end's)."""
        self._late_scheduled = False
        late, self._late = self._late, []
        for task in late:
            self._save(task)

    async def pull(self, req: Request) -> Reply:
        msg: PullRequest = req.decode(PullRequest)
        node = self.nodes.get(msg.node)
        node.pulled_at = time.monotonic()
        node.prefetch = msg.prefetch
        node.cores = frozenset(msg.cores)
        if msg.instance and msg.instance != node.instance:
            if node.instance:
                # the node's spawner restarted: what its last instance was running is gone with it
                # (run again now, not after LOST_S without a listing)
                for task in [t for t in self.live.values() if t.state == RUNNING and t.node == node.name]:
                    self._lost(task, f"node {node.name} restarted (its spawner is a new instance)")
            node.instance = msg.instance
        self._heartbeat(node, msg.running)
        recorded: list[str] = []
        if msg.results:
            await self._results(node, msg.results)
            recorded = [f"{r.id}/{r.attempt}" for r in msg.results]
        room = self._limit()
        runs, room = self._take(node, msg.slots, room) if msg.slots else ([], room)
        if not runs and not msg.results and msg.slots and msg.wait_ms and not self._cancels.get(node.name):
            pull = _Pull(node, msg.slots, room)
            self._parked.append(pull)
            try:
                await asyncio.wait_for(asyncio.shield(pull.future), msg.wait_ms / 1000)
            except TimeoutError:
                pass
            finally:
                if pull in self._parked:
                    self._parked.remove(pull)
            runs = pull.runs
        reply = PullReply(tasks=runs, recorded=recorded, cancel=self._cancels.pop(node.name, []))
        return Reply(MSGPACK.encode(reply), {CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE})

    def _heartbeat(self, node: Node, running: list[str]) -> None:
        now = time.monotonic()
        for entry in running:
            task = self.live.get(entry.partition("/")[0])
            if task is not None and task.node == node.name:
                task.seen_at = now

    # -- results ----------------------------------------------------------------------------

    async def _results(self, node: Node, results: list[TaskResult]) -> None:
        """Record *results*; return once every one of them is durable (one future for them all)."""
        recorded = [task for task in (self._result(node, r) for r in results) if task is not None]
        await all_durable(recorded)

    def _result(self, node: Node, r: TaskResult) -> LiveTask | None:
        """Apply one result; the task whose record must become durable, or None (stale or repeated)."""
        task = self.live.get(r.id)
        att = task.attempt if task is not None else None
        if task is None or task.state != RUNNING or att is None or att.number != r.attempt or att.node != node.name:
            return None  # stale or repeated: already recorded (or the attempt was abandoned)
        att.end_ms = r.end_ms or now_ms()
        if r.start_ms:  # when it really started on the node (a prefetched task waits there first)
            att.start_ms = r.start_ms
        att.worker = r.worker
        self._release(task)
        if r.outcome == "ok" and (r.exit_code == 0 or task.rec.kind == PYTHON):
            if r.output_ref:  # stored by the node as an object (too large for the record)
                att.outcome = SUCCEEDED
                task.rec.result = b""
                task.rec.result_ref = r.output_ref
                task.rec.result_size = r.output_size
                task.rec.exit_code = _exit_code(task, r)
                self._finish(task, SUCCEEDED)
            elif len(r.output) > self._limit():
                att.outcome = "error"
                self._finish(task, FAILED, TaskError(code=413, kind="too_large", message=(
                    f"the result of {len(r.output)} bytes exceeds the limit of {self._limit()}: "
                    f"return it through remote memory")))
            else:
                att.outcome = SUCCEEDED
                task.rec.result = r.output
                task.rec.result_size = len(r.output)
                task.rec.exit_code = _exit_code(task, r)
                self._finish(task, SUCCEEDED)
        elif r.outcome in ("ok", "error"):
            att.outcome = "error"
            err = r.error or TaskError(code=500, kind="job_failed", message=f"exit code {r.exit_code}")
            att.error = err.message
            task.rec.exit_code = _exit_code(task, r)
            if task.rec.retry_exceptions and task.rec.failures < task.rec.retries:
                task.rec.failures += 1
                self._runnable(task)
            else:
                task.rec.result = r.output if len(r.output) <= self._limit() else b""
                self._finish(task, FAILED, err)
        elif r.outcome == "refused":
            att.outcome = "refused"
            err = r.error or TaskError(code=422, kind="infeasible", message="the node could not run the task")
            att.error = err.message
            self._finish(task, FAILED, err)
        else:  # crashed, timeout: a system failure
            att.outcome = r.outcome
            att.error = r.error.message if r.error else r.outcome
            self._system_failure(task, r.outcome, att.error)
        self._save(task)
        return task

    def _release(self, task: LiveTask) -> None:
        """The resources a running task held on its node go back."""
        node = self.nodes.by_name.get(task.node)
        if node is not None:
            node.give_back(task.rec.resources or DEFAULT_RESOURCES, task.gpus)
            node.running.discard(task.id)
        task.gpus = []
        self._schedule_feed()

    def _system_failure(self, task: LiveTask, outcome: str, why: str) -> None:
        task.rec.failures += 1
        if task.rec.failures <= task.rec.retries:
            self.log.info("task retried", task=task.id, outcome=outcome, failures=task.rec.failures)
            self._runnable(task)
            return
        self._finish(task, DEAD, TaskError(code=500, kind="task_dead", message=(
            f"{task.rec.failures} attempts failed by {outcome} (retries={task.rec.retries}); last: {why}")))

    def _finish(self, task: LiveTask, state: str, error: TaskError | None = None) -> None:
        """*task* ends in *state*: record it, tell its dependents, notify once durable."""
        if error is not None:
            task.rec.error = error
        self._move(task, state)
        self._save(task)
        dependents, task.dependents = task.dependents, None
        for dep in dependents or ():
            if dep.done:
                continue
            if state == SUCCEEDED:
                dep.pending_deps -= 1
                if dep.pending_deps <= 0 and dep.state == WAITING:
                    self._runnable(dep)
                    self._save(dep)
            else:
                self._finish(dep, FAILED, _dep_error(task))
        task.when_durable(lambda: self._ended(task))

    def _ended(self, task: LiveTask) -> None:
        """A finished task is durable: tell whoever waits, and keep it among the finished."""
        self.stats.record(task.rec)
        if task.rec.callback_url and task.rec.callback is None and self.pub is not None:
            webhooks.publish(self.pub, task.rec, self.log)
        if task.rec.notify:
            self._notices.setdefault((task.rec.notify, task.rec.notify_encoding), []).append(_done(task.rec))
            self._schedule_flush()
        for fut in self._watchers.pop(task.id, ()):
            if not fut.done():
                fut.set_result(None)
        if self.live.get(task.id) is task:
            del self.live[task.id]
            self._keep_finished(task)

    def _keep_finished(self, task: LiveTask) -> None:
        task.fn = task.call = None
        self.finished[task.id] = task
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    # -- state changes, writes, events -------------------------------------------------------

    def _move(self, task: LiveTask, state: str, node: str = "") -> None:
        prev = move(task, state)
        self._event(task, prev, node)

    def _save(self, task: LiveTask) -> None:
        assert self.writer is not None
        if task.group is not None and task.rev == 0 and not task.writing and not task.rec.attempts and \
                task.state in _HELD_BY_BODY:
            # a map's task that has not run yet: its body holds it (maps.py); a record comes at its
            # first run or end, or when it has waited LAZY_S
            task.durable = task.version
            task.wake()
            return
        self.writer.save(task)

    def _event(self, task: LiveTask, prev: str, node: str = "") -> None:
        att = task.attempt
        self._events.append(TaskEvent(id=task.id, state=task.state, prev=prev, time_ms=task.rec.updated_ms or
                                      task.rec.created_ms, node=node or task.node,
                                      attempt=att.number if att else 0))
        self._schedule_events()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _schedule_events(self) -> None:
        if not self._events_scheduled:
            self._events_scheduled = True
            asyncio.get_running_loop().call_later(EVENTS_EVERY_S, self._flush_events)

    def _flush_events(self) -> None:
        """Publish the state changes of the last EVENTS_EVERY_S as one batch (a live feed, not a hot path)."""
        self._events_scheduled = False
        events, self._events = self._events, []
        if not events:
            return
        loop = asyncio.get_running_loop()
        loop.create_task(self._publish(cluster(TASK, Task.EVENTS), JSON.encode(TaskEventBatch(events=events))))
        # and each user's own, on its user form (the whole feed is the admins'): fabric.u.<owner>.task.events
        mine: dict[str, list[TaskEvent]] = {}
        for e in events:
            task = self.live.get(e.id) or self.finished.get(e.id)
            if task is not None and task.rec.owner:
                mine.setdefault(task.rec.owner, []).append(e)
        for owner, own in mine.items():
            loop.create_task(self._publish(user_subject(owner, cluster(TASK, Task.EVENTS)),
                                           JSON.encode(TaskEventBatch(events=own))))

    def _flush(self) -> None:
        """Publish the notices gathered during this loop iteration (a client waits for them)."""
        self._flush_scheduled = False
        notices, self._notices = self._notices, {}
        loop = asyncio.get_running_loop()
        for (subject, encoding), done in notices.items():
            msgpack = encoding == "msgpack"
            codec = MSGPACK if msgpack else JSON
            for chunk in _chunks(done):
                loop.create_task(self._publish(subject, codec.encode(TaskDoneBatch(done=chunk)),
                                               {CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE} if msgpack else None))

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            await self.connection.publish(subject, data, headers=headers)
        except Exception as exc:
            self.log.warning("publish failed", subject=subject, error=str(exc) or type(exc).__name__)

    def _conflict(self, task: LiveTask) -> None:
        """A compare-and-swap on *task* lost: another scheduler moved it; this one steps back from it.

        If this one is the active scheduler, the other was one whose term had ended (or a write it sent
        before it stood down landed late): once that one has surely stopped, every record is read again
        (:meth:`_resync`), so no task is left to nobody.
        """
        self.log.error("another scheduler wrote this task: this one leaves it", task=task.id)
        self.live.pop(task.id, None)
        self.maps.recorded(task)  # its map no longer waits for it here
        if task.node:
            self._release(task)
        if self.lease.active and (self._resyncing is None or self._resyncing.done()):
            self._resyncing = asyncio.get_running_loop().create_task(self._resync())

    async def _resync(self) -> None:
        await asyncio.sleep(lease_mod.LEASE_S)  # the other writer has stood down by now (lease.py)
        async with self._term:
            if not self.lease.active:
                return
            self.log.warning("reading every task record again: another scheduler wrote some during this term")
            await self._become_standby()
            await self._become_active()

    async def _on_term(self) -> None:
        async with self._term:
            await self._become_active()

    async def _on_term_end(self) -> None:
        async with self._term:
            await self._become_standby()

    async def _durable(self, task: LiveTask) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task.when_durable(lambda: resolve(fut))
        await fut

    # -- reading and cancelling ----------------------------------------------------------------

    async def _read(self, task_id: str) -> TaskRecord | None:
        if self.task_kv is None:
            return None
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.task_kv.get(task_id)
        except KeyNotFoundError:
            return None
        except Exception as exc:
            raise Unavailable(f"task records unreadable: {exc}") from None
        return MSGPACK.decode(entry.value, TaskRecord) if entry.value else None

    async def _record(self, task_id: str) -> TaskRecord:
        task = self.live.get(task_id) or self.finished.get(task_id)
        if task is not None:
            return task.rec
        rec = await self._read(task_id)
        if rec is None:
            raise NotFound(f"no task {task_id!r}")
        return rec

    async def _owned(self, req: Request, task_id: str) -> TaskRecord:
        """The record of *task_id*, if the caller may see it: its owner, or a trusted caller (403 otherwise)."""
        rec = await self._record(task_id)
        check_owner(req.caller, rec.owner, f"task {task_id}")
        return rec

    async def get(self, req: Request) -> TaskRecord:
        return await self._owned(req, req.decode(TaskRequest).id)

    async def wait(self, req: Request) -> TaskRecord:
        msg: WaitRequest = req.decode(WaitRequest)
        await self._owned(req, msg.id)  # 404 or 403 before waiting
        task = self.live.get(msg.id)
        if task is not None and not (task.done and task.durable >= task.version):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._watchers.setdefault(msg.id, []).append(fut)
            try:
                await asyncio.wait_for(fut, msg.timeout_s)
            except TimeoutError:
                pass
        return await self._record(msg.id)

    async def cancel(self, req: Request) -> TaskRecord:
        task_id = req.decode(TaskRequest).id
        await self._owned(req, task_id)  # 404 when unknown, 403 when another user's
        task = self.live.get(task_id)
        if task is None:
            rec = await self._record(task_id)
            raise Conflict(f"task {task_id} has already ended ({rec.state})")
        if task.done:
            raise Conflict(f"task {task_id} has already ended ({task.state})")
        if task.state == RUNNING:
            att = task.attempt
            if att is not None:
                att.outcome = CANCELLED
                att.end_ms = now_ms()
                self._cancels.setdefault(task.node, []).append(f"{task.id}/{att.number}")
                for pull in self._parked:
                    if pull.node.name == task.node:
                        pull.wake()
            self._release(task)
        self._finish(task, CANCELLED, TaskError(code=409, kind="cancelled", message="cancelled"))
        await self._durable(task)
        return task.rec

    async def result(self, req: Request) -> ResultChunk:
        """``fabric.task.result``: a piece of the caller's task's stored result."""
        msg: ResultRequest = req.decode(ResultRequest)
        rec = await self._owned(req, msg.id)
        if not rec.result_ref:
            raise NotFound(f"task {msg.id} has no stored result ({rec.state}; a small result is in its record)")
        data = await self.results.read(rec.result_ref)
        room = max(self.connection.max_payload - RESULT_HEADROOM, 1)
        n = room if msg.length == 0 else min(msg.length, room)
        return ResultChunk(data=data[msg.offset:msg.offset + n], size=len(data))

    def task_stats(self, req: Request) -> TaskStatsReply:
        """``fabric.task.stats``: what this scheduler holds and what ended since it became active."""
        return self.stats.reply(self.live.values(), self.lease.instance)

    async def callback(self, req: Request) -> TaskRecord:
        """``fabric.task.callback`` (gateways): keep how the task's webhook went on its record."""
        msg: CallbackReport = req.decode(CallbackReport)
        task = self.live.get(msg.id) or self.finished.get(msg.id)
        if task is None:
            raise NotFound(f"task {msg.id!r} is not held by the scheduler (ended too long ago, or unknown)")
        if not task.done:
            raise Conflict(f"task {msg.id} has not ended ({task.state}): its webhook cannot have been sent")
        task.rec.callback = CallbackOutcome(outcome=msg.outcome, attempts=msg.attempts, status=msg.status,
                                            error=msg.error, time_ms=now_ms())
        task.version += 1
        self._save(task)
        await self._durable(task)
        return task.rec

    async def release(self, req: Request) -> ReleaseReply:
        """``fabric.task.release``: delete the caller's task's stored result."""
        rec = await self._owned(req, req.decode(TaskRequest).id)
        return ReleaseReply(released=bool(rec.result_ref) and await self.results.release(rec.result_ref))

    async def list(self, req: Request) -> TaskListReply:
        msg: ListRequest = req.decode(ListRequest)
        pool = [t.rec for t in self.live.values()] + [t.rec for t in self.finished.values()]
        if req.caller is not None:  # a user lists their own tasks
            pool = [r for r in pool if r.owner == req.caller]
        if msg.state:
            pool = [r for r in pool if r.state == msg.state]
        pool.sort(key=lambda r: r.created_ms, reverse=True)
        return TaskListReply(tasks=pool[:msg.limit])

    # -- the sweep: lost tasks, gone nodes ---------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if not self.lease.active:
                continue
            try:
                self.nodes.expire(self.ttl_s)
            except Exception as exc:  # a bug must not end lost-task detection for good
                self.log.error("node expiry failed", error=repr(exc))
            now = time.monotonic()
            for task in [t for t in self.live.values() if t.state == RUNNING]:
                if now - max(task.seen_at, task.assigned_at) > LOST_S:
                    try:
                        self._lost(task, f"node {task.node} stopped reporting it for {LOST_S:g} s")
                    except Exception as exc:  # one task's bug is logged; the sweep goes on with the others
                        self.log.error("lost-task handling failed", task=task.id, exc_info=exc)

    def _lost(self, task: LiveTask, why: str) -> None:
        att = task.attempt
        if att is not None:
            att.outcome = "lost"
            att.end_ms = now_ms()
            att.error = why
        self._release(task)
        self._system_failure(task, "lost", why)
        self._save(task)


#: bytes of a reply's max payload kept for its headers and msgpack framing (a result piece fills the rest)
RESULT_HEADROOM: Final = 64 << 10

#: the states in which a map's task needs no record of its own yet (its body holds it)
_HELD_BY_BODY: Final = frozenset({SUBMITTED, QUEUED, WAITING})


def _key(owner: str, key: str) -> str:
    """An idempotency key is its owner's: alice's "x" and bob's "x" name different tasks."""
    return f"{owner}\x00{key}" if owner else key


def _map_tasks(msg: MapRequest, prefix: str, created: int, encoding: str, owner: str,
               skip: Any = frozenset()) -> list[LiveTask]:
    """The tasks of a map (those whose ids are not in *skip*), new: state submitted."""
    res = msg.resources or Resources()
    shared = None if res == DEFAULT_RESOURCES else res
    tasks = []
    for i, call in enumerate(msg.calls):
        task_id = f"{prefix}-{i}"
        if task_id in skip:
            continue
        rec = TaskRecord(id=task_id, kind=PYTHON, state=SUBMITTED, priority=msg.priority, resources=shared,
                         retries=msg.retries, retry_exceptions=msg.retry_exceptions, timeout_s=msg.timeout_s,
                         deps=list(msg.deps), notify=msg.notify, notify_encoding=encoding, body=prefix,
                         body_index=i, created_ms=created, owner=owner)
        tasks.append(LiveTask(rec, msg.fn, call))
    return tasks


def _exit_code(task: LiveTask, r: TaskResult) -> int | None:
    """A core job's or a process's exit code; None for the kinds that have none (docs/protocol.md TaskRecord)."""
    return r.exit_code if task.rec.kind in (CORE, EXEC) else None


def _done(rec: TaskRecord) -> TaskDone:
    return TaskDone(id=rec.id, state=rec.state, result=rec.result, result_ref=rec.result_ref,
                    exit_code=rec.exit_code, error=rec.error)


def _dep_error(dep: LiveTask) -> TaskError:
    return TaskError(code=500, kind="dependency_failed",
                     message=f"dependency {dep.id} ended {dep.state}" + (
                         f": {dep.rec.error.message}" if dep.rec.error else ""))


def _chunks(done: list[TaskDone]) -> list[list[TaskDone]]:
    out: list[list[TaskDone]] = []
    chunk: list[TaskDone] = []
    size = 0
    for d in done:
        n = len(d.result) + 256 + (len(d.error.traceback) + len(d.error.exc) if d.error else 0)
        if chunk and size + n > NOTICE_BYTES:
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(d)
        size += n
    if chunk:
        out.append(chunk)
    return out

