"""The task runner: pulls the scheduler's tasks (``fabric.task.pull``) and runs them on this node.

A spawner runs one :class:`TaskRunner` as a background loop once its endpoints serve
(docs/protocol.md "Tasks": the pull).  The runner asks the active scheduler for as many
tasks as it can take (``slots``: free room not already offered by a pull still out,
where room is the task slots plus a small bounded prefetch), lists every attempt it
holds (``running``: the heartbeat), and hands back every result the scheduler has not
yet confirmed in ``recorded``.  It pulls again at once when it has room or a new
result, and at least once a second; with no scheduler (no responders) it retries after
100-200 ms and keeps its results.

Kinds of work (each attempt is an :class:`~.tasks_results.Attempt`; its result is made
by :mod:`.tasks_results`):

* ``python``: an FPY1 frame for the built-in Python core, on a warm pool of the
  runner's own (:meth:`~.pools.CoreManager.internal_pool`: ``fabric.python`` with
  ``max_workers`` = the slots, listed by ``fabric.core.<node>.list`` under an id that
  starts with ``t``, never found by name, so a client's ``fabric.python`` pool lives
  beside it).  The pool is started by the first python task; the runner hands it at most
  one job per worker (two while tasks are short), so a task never waits long on a ring
  behind another one, and the prefetched ones wait here.  While tasks take under a
  millisecond, several queued ones without a timeout go to a worker as one job (an
  FPYB frame, :data:`MAX_TASKS_PER_JOB` at most): a map of tiny calls pays for a ring
  round trip per batch, not per task.  If that worker dies, each task of the batch
  runs again alone (not counted against its retries), so a task that kills its worker
  is found and accounted by itself.  A task given GPUs runs on a pool of its GPU set instead,
  whose workers have ``CUDA_VISIBLE_DEVICES`` from their start, and a client-role user's
  task, on a spawner that runs as root, on a pool of that user's whose workers run as
  ``sandbox.client_user`` (:mod:`.tasks_lanes`).
* ``core``: one job for the node's live pool of that core name (none: refused, 404).
* ``opencl``: an FCLJ frame for the node's ``fabric.opencl`` pool (a user's own, as for
  ``python``, when their code must run as ``sandbox.client_user``), loaded on first use;
  with ``TaskRun.opencl_device`` its header is pinned to that device (:func:`.tasks_gpu.pin_opencl`).
* ``exec``: a process started as ``fabric.proc.spawn`` starts one (the spawner's
  :meth:`start_process`); its stdout tail is the output.  ``TaskRun.gpus`` become its
  ``CUDA_VISIBLE_DEVICES``.

``TaskRun.timeout_s`` is kept here: past it the worker running the task, or the
process, is killed and the result is ``timeout``.  A ``cancel`` in a reply kills the
attempt's worker or process and forgets it (the scheduler recorded the cancel itself).
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import time
from collections import deque
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from fabric.errors import (
    BadRequest,
    FabricError,
    InternalError,
    InvalidFrame,
    JobTimeout,
    NotFound,
    TooLarge,
    Unavailable,
    WorkerCrashed,
    error_from_wire,
)
from fabric.protocol import subjects
from fabric.protocol.cores import OPENCL_CORE, PYTHON_CORE, pool_key
from fabric.protocol.headers import CONTENT_TYPE_HEADER, ERROR_CODE_HEADER, ERROR_HEADER, ERROR_KIND_HEADER
from fabric.protocol.pytasks import (
    check_python_task,
    decode_batch_results,
    decode_python_task,
    encode_batch,
    encode_python_task,
)
from fabric.protocol.streams import RESULTS_BUCKET
from fabric.schema import MSGPACK, MSGPACK_CONTENT_TYPE, LoadCoreRequest, SpawnRequest
from fabric.schema.tasks import (
    CORE,
    EXEC,
    INLINE_RESULT_MAX,
    OPENCL,
    PYTHON,
    PullReply,
    PullRequest,
    TaskResult,
    TaskRun,
)

from .pool_types import TASK_POOL_SPINS, Job
from .pools import CoreManager, Pool
from .procs import ManagedProcess, ProcessTable
from .tasks_gpu import pin_opencl
from .tasks_lanes import PythonLanes
from .tasks_results import ERROR, REFUSED, Attempt, exit_result, job_result, task_error

__all__ = ["TaskRunner", "RunnerHost", "HEARTBEAT_S", "MAX_PULLS"]

#: the longest time between two pulls (the scheduler counts a task lost after a few seconds unlisted)
HEARTBEAT_S = 1.0
#: how long a pull with slots asks the scheduler to hold it while it has nothing to give
WAIT_MS = 1000
#: pulls out at once (one with slots, the others reporting results or beating)
MAX_PULLS = 4
#: seconds a pull waits for its reply beyond the scheduler's hold
PULL_TIMEOUT_S = 1.0
#: how much work, in seconds, a node may hold queued beyond its running tasks: the prefetch is
#: this window divided by how long its tasks take (1 ms tasks: 5 per slot; 1 s tasks: the floor)
PREFETCH_WINDOW_S = 0.02
#: the most tasks a node prefetches per slot, however short they are
MAX_PREFETCH_PER_SLOT = 256
#: tasks shorter than this are pipelined two per pool worker (the next is on the worker's ring)
PIPELINE_BELOW_S = 0.001
#: the most short tasks handed to one pool worker as one job (an FPYB frame)
MAX_TASKS_PER_JOB = 16
#: the most result bytes one pull carries (the rest go in the next one)
PULL_RESULT_BYTES = 512 << 10
_HEADERS = {CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE}


class RunnerHost(Protocol):
    """What the runner uses of the spawner hosting it."""

    node: str
    log: Any
    cores: CoreManager
    table: ProcessTable | None

    @property
    def connection(self) -> NATS: ...

    def start_process(self, r: SpawnRequest) -> tuple[ManagedProcess, Any]: ...

    def user_sandbox(self, caller: str, sandbox: Any) -> Any: ...


class TaskRunner:
    """The pull loop of one spawner and the attempts it holds (see the module docstring)."""

    def __init__(self, host: RunnerHost, *, slots: int | None = None, prefetch: int = 1) -> None:
        self.host = host
        #: tasks that may run at once (the python pool's max_workers)
        self.slots = max(1, slots if slots is not None else (os.cpu_count() or 1))
        #: tasks taken beyond the slots, so a worker that finishes finds the next one here: at least
        #: this many, more while tasks are short (see PREFETCH_WINDOW_S)
        self.prefetch = min(max(prefetch, 0), self.slots)
        #: how long a task takes here, smoothed (None until one has run)
        self.task_s: float | None = None
        #: JetStream, for large results (set by the spawner once it is there; None without it)
        self.js: Any = None
        self._timed_at = 0.0
        #: a new id per start: the scheduler learns that what the last instance ran is gone
        self.instance = ""
        self.running: dict[str, Attempt] = {}
        #: results the scheduler has not confirmed (``recorded``): sent until it does
        self.results: dict[str, TaskResult] = {}
        #: results carried by a pull that is out (not put in another until that one is answered)
        self._sending: set[str] = set()
        self.offered = 0  # slots offered by the pulls that are out
        self._held = 0  # long polls out (at most one)
        self._reporting = 0  # pulls out that carry results or beat (at most one)
        self._pulls_out = 0
        self.pulls = 0
        self.no_responders = 0
        self._fresh = False  # a result not yet sent in any pull
        self._last_pull = 0.0
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._python: Pool | None = None
        self._opening: asyncio.Task[None] | None = None
        self._python_queue: deque[Attempt] = deque()
        #: CPUs (at least 1 a task) of the python jobs handed to the shared pool, and how many ask for more than 1
        self._python_busy = 0.0
        self._python_big = 0
        self._job_ids = 0
        #: python tasks given GPUs: a pool per GPU set (made on first use)
        self._lanes = PythonLanes(host.cores, host.log, self.slots, self._submit, self._finish, self._lane_owner)

    @property
    def capacity(self) -> int:
        return self.slots + self.prefetch_now

    @property
    def prefetch_now(self) -> int:
        """The prefetch for tasks as long as the recent ones: about PREFETCH_WINDOW_S of work, bounded."""
        if self.task_s is None:
            return self.prefetch
        estimate = self.task_s
        if self.running:
            # a task running longer than the estimate is news the estimate has not heard yet: the
            # prefetch shrinks at once, so a long task does not sit on tasks queued behind it (which
            # more urgent ones submitted later would then have to wait for)
            started = [a.t0 for a in self.running.values() if a.t0]
            if started:
                estimate = max(estimate, time.perf_counter() - min(started))
        window = int(self.slots * PREFETCH_WINDOW_S / max(estimate, 1e-6))
        return max(self.prefetch, min(window, self.slots * MAX_PREFETCH_PER_SLOT))

    def _timed(self, a: Attempt) -> None:
        if a.t0:
            self._took(time.perf_counter() - a.t0)

    def _took(self, took: float) -> None:
        """A task took *took* seconds: the estimate follows it."""
        now = time.perf_counter()
        # after an idle second the next tasks may be another kind: start the estimate afresh
        stale = self.task_s is None or now - self._timed_at > 1.0
        self.task_s = took if stale or self.task_s is None else 0.8 * self.task_s + 0.2 * took
        self._timed_at = now

    # -- the pull loop ----------------------------------------------------------------

    async def run(self) -> None:
        """The background loop: pull whenever there is room or news, at least every HEARTBEAT_S."""
        self.instance = secrets.token_urlsafe(9)
        self.host.log.info("task runner started", slots=self.slots, prefetch=self.prefetch, instance=self.instance)
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = time.monotonic()
            if now >= self._retry_at:
                self._maybe_pull(now)
            due = max(self._retry_at, self._last_pull + HEARTBEAT_S) - now
            # one timer per turn, not wait_for (a task per turn): the loop turns once per result
            timer = loop.call_later(max(due, 0.005), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    def _maybe_pull(self, now: float) -> None:
        # One pull at a time is a long poll (slots, no results: the scheduler holds it until it has
        # work).  Results go out in pulls of their own, which the scheduler answers as soon as it has
        # recorded them -- a held pull must never keep a result waiting -- one such pull at a time:
        # results that end while it is out go together in the next (few large pulls under load, a
        # pull per result when tasks come one by one).
        if self._pulls_out >= MAX_PULLS:
            return
        # a task whose result the scheduler has not received yet still holds its place there
        unsent = len(self.results) - len(self._sending)
        prefetch = self.prefetch_now
        free = max(self.slots + prefetch - len(self.running) - unsent - self.offered, 0)
        if self._fresh and not self._reporting:
            self._spawn(self._pull(free, held=False, prefetch=prefetch), "pull")
        elif free and not self._held:
            self._spawn(self._pull(free, held=True, prefetch=prefetch), "pull")
        elif now - self._last_pull >= HEARTBEAT_S and not self._reporting:
            self._spawn(self._pull(0, held=False, prefetch=prefetch), "pull")

    async def _pull(self, slots: int, held: bool, prefetch: int) -> None:
        self.offered += slots
        self._held += held
        self._reporting += not held
        self._pulls_out += 1
        self._last_pull = time.monotonic()
        if not held:  # a long poll carries no results: a result that ended meanwhile still needs its own pull
            self._fresh = False
        results: list[TaskResult] = []
        size = 0
        for key, r in ([] if held else self.results.items()):
            if key in self._sending:
                continue  # a pull out now carries it: sent again only if that one does not get it recorded
            if results and size + len(r.output) > PULL_RESULT_BYTES:
                self._fresh = True  # the rest go in the next pull, at once
                break
            results.append(r)
            size += len(r.output)
        keys = [f"{r.id}/{r.attempt}" for r in results]
        self._sending.update(keys)
        req = PullRequest(node=self.host.node, slots=slots, wait_ms=WAIT_MS if held else 0,
                          running=list(self.running), results=results, instance=self.instance,
                          prefetch=prefetch,
                          cores=[name for name, pool in self.host.cores.by_name.items()
                                 if not (pool.closed or pool.draining or pool.broken)])
        self.pulls += 1
        try:
            msg = await self.host.connection.request(subjects.cluster(subjects.TASK, subjects.Task.PULL),
                                                     MSGPACK.encode(req), timeout=req.wait_ms / 1000 + PULL_TIMEOUT_S,
                                                     headers=_HEADERS)
            headers = msg.headers or {}
            if ERROR_HEADER in headers:
                raise error_from_wire(headers.get(ERROR_CODE_HEADER), headers[ERROR_HEADER],
                                      headers.get(ERROR_KIND_HEADER))
            reply = MSGPACK.decode(msg.data, PullReply)
        except NoRespondersError:  # no active scheduler (a failover): keep the results, ask again soon
            self.no_responders += 1
            self._failed(results)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.host.log.warning("task pull failed", error=str(exc))
            self._failed(results)
            return
        finally:
            self.offered -= slots
            self._held -= held
            self._reporting -= not held
            self._pulls_out -= 1
            self._sending.difference_update(keys)
            self._wake.set()
        self._apply(reply)
        if any(k in self.results for k in keys):
            self._fresh = True  # the scheduler did not record some of them: send them again

    def _failed(self, results: list[TaskResult]) -> None:
        self._retry_at = time.monotonic() + random.uniform(0.1, 0.2)
        if results:
            self._fresh = True

    def _apply(self, reply: PullReply) -> None:
        for key in reply.recorded:
            self.results.pop(key, None)
        for key in reply.cancel:
            self._cancel(key)
        for run in reply.tasks:
            self._start(run)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    # -- attempts -----------------------------------------------------------------------

    def _start(self, run: TaskRun) -> None:
        a = Attempt(run)
        if a.key in self.running or a.key in self.results:  # sent again: it runs or ran here already
            return
        self.running[a.key] = a
        try:
            if run.kind == PYTHON:
                check_python_task(run.payload)  # a malformed frame is refused here (its worker decodes the rest)
                if run.dep_refs:  # dependencies whose results are stored objects: fetched first
                    self._spawn(self._fetch_deps(a), "deps")
                    return
                self._queue_python(a)
            elif run.kind == CORE:
                pool = self.host.cores.by_name.get(pool_key(run.owner, run.core))  # the task owner's pool
                if pool is None:
                    raise NotFound(f"no core {run.core!r} is loaded on node {self.host.node}", core=run.core)
                self._submit(a, pool)
            elif run.kind == OPENCL:
                pin_opencl(run, self.host.node)  # on the device it was given, or refused
                self._spawn(self._run_opencl(a), "opencl")
            elif run.kind == EXEC:
                self._run_exec(a)
            else:
                raise BadRequest(f"task {run.id}: unknown kind {run.kind!r}")
        except FabricError as exc:  # the node cannot run it (a malformed frame is 400 invalid_frame)
            self._finish(a, a.result(REFUSED, error=task_error(exc)))

    def _arm(self, a: Attempt) -> None:
        a.start_ms = int(time.time() * 1000)
        a.t0 = time.perf_counter()
        if a.run.timeout_s > 0:
            a.timer = asyncio.get_running_loop().call_later(a.run.timeout_s, self._time_out, a)

    def _time_out(self, a: Attempt) -> None:
        a.timer = None
        a.timed_out = True
        if a.kill is not None:
            a.kill()

    def _finish(self, a: Attempt, result: TaskResult) -> None:
        if a.timer is not None:
            a.timer.cancel()
            a.timer = None
        if len(result.output) > INLINE_RESULT_MAX and not result.output_ref:
            # too large for a record: stored as an object first (the attempt stays listed meanwhile)
            self._spawn(self._store(a, result), "store")
            return
        if self.running.get(a.key) is a:
            del self.running[a.key]
        self.results[a.key] = result
        self._fresh = True
        self._wake.set()

    async def _fetch_deps(self, a: Attempt) -> None:
        """Add the stored results of a task's dependencies to its FPY1 frame, then queue it."""
        try:
            if self.js is None:
                raise Unavailable("this NATS has no JetStream to read them from")
            store = await self.js.object_store(RESULTS_BUCKET)
            frame = decode_python_task(a.run.payload)
            deps = [(k, bytes(v)) for k, v in frame.deps.items()]
            for task_id, name in a.run.dep_refs.items():
                deps.append((task_id, (await store.get(name)).data or b""))
            a.run.payload = encode_python_task(bytes(frame.fn), bytes(frame.call), deps)
        except Exception as exc:  # noqa: BLE001 - the node cannot run it: say why
            if not a.dropped:
                self._finish(a, a.result(REFUSED, error=task_error(
                    exc if isinstance(exc, FabricError) else Unavailable(
                        f"task {a.run.id}: a dependency's stored result is unreadable: {exc}"))))
            return
        if not a.dropped:
            self._queue_python(a)

    async def _store(self, a: Attempt, result: TaskResult) -> None:
        """Put a large output in the object store RESULTS_BUCKET; the result then names it."""
        name = f"{a.run.id}.{a.run.attempt}"
        size = len(result.output)
        try:
            if self.js is None:
                raise Unavailable("this NATS has no JetStream to store it in")
            store = await self.js.object_store(RESULTS_BUCKET)
            await store.put(name, result.output)
        except Exception as exc:  # noqa: BLE001 - the task fails with why, the node goes on
            self.host.log.warning("a task result could not be stored", task=a.run.id, error=str(exc))
            result = a.result(ERROR, exit_code=result.exit_code, error=task_error(TooLarge(
                f"task {a.run.id}: its output of {size} bytes is too large for its record and could not be "
                f"stored: {exc}")))
        else:
            result.output = b""
            result.output_ref = name
            result.output_size = size
        if not a.dropped:
            self._finish(a, result)

    def _cancel(self, key: str) -> None:
        a = self.running.pop(key, None)
        if a is None:
            return
        a.dropped = True
        if a.timer is not None:
            a.timer.cancel()
            a.timer = None
        if a in self._python_queue:
            self._python_queue.remove(a)
        elif self._lanes.drop(a):
            pass
        elif a.kill is not None:
            a.kill()
        self._wake.set()

    # -- pool jobs: python, core, opencl ---------------------------------------------------

    def _lane_owner(self, a: Attempt) -> str:
        """The user whose code *a* is, when it must run as sandbox.client_user ("" when it may run as the spawner)."""
        return a.run.owner if a.run.owner and self.host.cores.client_run_as is not None else ""

    def _queue_python(self, a: Attempt) -> None:
        # CUDA_VISIBLE_DEVICES holds from a worker's start: a pool of its GPU set; a user's code runs as
        # sandbox.client_user, in workers of that user's own (tasks_lanes.py)
        if a.run.gpus or self._lane_owner(a):
            self._lanes.queue(a)
            return
        self._python_queue.append(a)
        self._pump_python()

    def _pump_python(self) -> None:
        pool = self._python
        if pool is None or pool.closed or pool.broken:
            if self._python_queue and (self._opening is None or self._opening.done()):
                self._opening = asyncio.get_running_loop().create_task(self._open_python())
            return
        short = self.task_s is not None and self.task_s < PIPELINE_BELOW_S
        queue = self._python_queue
        while queue:
            weight = _cpu_weight(queue[0])
            # tasks run at once only while their CPUs fit the slots (a task asking for more runs alone);
            # short single-CPU tasks are pipelined two a worker unless a bigger task is in
            cap = pool.max_workers * (2 if short and weight == 1 and not self._python_big else 1)
            if self._python_busy and self._python_busy + weight > cap:
                break
            if short and len(queue) > 1 and _batchable(queue[0]) and _batchable(queue[1]):
                # the queue spread over the jobs that may run at once, at most MAX_TASKS_PER_JOB each
                size = min(MAX_TASKS_PER_JOB, -(-len(queue) // cap))
                batch = [queue.popleft()]
                while queue and len(batch) < size and _batchable(queue[0]):
                    batch.append(queue.popleft())
                self._python_busy += 1
                self._submit_batch(batch, pool)
                continue
            a = queue.popleft()
            self._python_busy += weight
            self._python_big += weight > 1
            self._submit(a, pool)

    async def _open_python(self) -> None:
        self._python = None
        try:
            self._python = await self.host.cores.internal_pool(PYTHON_CORE, min_workers=1, max_workers=self.slots,
                                                               spins=TASK_POOL_SPINS)
        except FabricError as exc:
            self.host.log.warning("task runner: the python pool did not start", error=exc.message)
            while self._python_queue:
                a = self._python_queue.popleft()
                self._finish(a, a.result(REFUSED, error=task_error(exc)))
            return
        self._pump_python()

    async def _run_opencl(self, a: Attempt) -> None:
        d = LoadCoreRequest(name=OPENCL_CORE)
        try:
            # the node's fabric.opencl pool; a user's own when their code must run as sandbox.client_user
            pool = await self.host.cores.internal_pool(OPENCL_CORE, min_workers=d.min_workers,
                                                       max_workers=d.max_workers, time_limit_s=d.time_limit_s,
                                                       shared=True, owner=self._lane_owner(a))
        except FabricError as exc:
            if not a.dropped:
                self._finish(a, a.result(REFUSED, error=task_error(exc)))
            return
        if not a.dropped:
            self._submit(a, pool)

    def _submit(self, a: Attempt, pool: Pool) -> None:
        self._job_ids += 1
        job = Job(self._job_ids, a.run.payload, lambda code, out, err: self._job_done(a, code, out, err))
        a.job, a.pool, a.worker = job, pool, pool.id
        a.kill = lambda: _stop_job(pool, job, a.run.timeout_s, self._job_done, a)
        self._arm(a)
        pool.submit(job)

    def _submit_batch(self, batch: list[Attempt], pool: Pool) -> None:
        self._job_ids += 1
        job = Job(self._job_ids, encode_batch([a.run.payload for a in batch]),
                  lambda code, out, err: self._batch_done(batch, code, out, err))

        def kill() -> None:  # a cancel of one of them: the others run again
            if job in pool.queue:  # not started: taken back
                pool.queue.remove(job)
                self._batch_done(batch, 0, b"", JobTimeout("a task of the batch was cancelled", core=pool.id))
                return
            for w in pool.workers:
                if job.id in w.outstanding:
                    w.time_out(0.0)  # the pool fails the job with JobTimeout and replaces the worker
                    return

        for a in batch:
            a.job, a.pool, a.worker, a.kill = job, pool, pool.id, kill
            self._arm(a)
        pool.submit(job)

    def _batch_done(self, batch: list[Attempt], code: int, out: Any, err: FabricError | None) -> None:
        """An FPYB job ended: each task's result from its FPYR entry -- or, if the worker died (or was
        killed for a cancel), each task not cancelled queued again to run alone."""
        self._python_busy = max(0.0, self._python_busy - 1.0)
        outputs = None
        if err is None and code == 0:
            try:
                outputs = decode_batch_results(out)
                if len(outputs) != len(batch):
                    raise InvalidFrame(f"{len(outputs)} outputs for a batch of {len(batch)}")
            except InvalidFrame as exc:
                err = InternalError(f"the Python worker's batch results are malformed: {exc.message}")
        if outputs is None and isinstance(err, (WorkerCrashed, JobTimeout)):
            for a in reversed(batch):
                if not a.dropped:
                    a.alone = a.alone or isinstance(err, WorkerCrashed)
                    a.start_ms, a.t0 = 0, 0.0
                    self._python_queue.appendleft(a)
        elif outputs is None:
            for a in batch:
                if not a.dropped:
                    self._finish(a, job_result(a, code, out, err))
        else:
            start_ms, spent = batch[0].start_ms, 0
            for a, o in zip(batch, outputs, strict=True):
                a.start_ms = start_ms + spent // 1000
                spent += o.micros
                self._took(o.micros / 1e6)
                if not a.dropped:
                    result = job_result(a, o.code, o.out, None)
                    result.end_ms = start_ms + spent // 1000
                    self._finish(a, result)
        self._pump_python()

    def _job_done(self, a: Attempt, code: int, out: Any, err: FabricError | None) -> None:
        self._timed(a)
        # the result (its end time) first: the next task, started just below, must not seem to overlap it
        result = None if a.dropped else job_result(a, code, out, err)
        if a.run.kind == PYTHON and (a.run.gpus or self._lane_owner(a)):
            self._lanes.done(a)
        elif a.run.kind == PYTHON:
            weight = _cpu_weight(a)
            self._python_busy = max(0.0, self._python_busy - weight)
            self._python_big -= weight > 1
            self._pump_python()
        if result is not None:
            self._finish(a, result)

    # -- processes: exec ----------------------------------------------------------------

    def _run_exec(self, a: Attempt) -> None:
        spec = a.run.exec
        if spec is None or not spec.argv:
            raise BadRequest(f"task {a.run.id}: an exec task needs exec.argv")
        env = dict(spec.env or {})
        if a.run.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in a.run.gpus)
        req = SpawnRequest(argv=spec.argv, env=env or None, cwd=spec.cwd, stdin=spec.stdin, limits=spec.limits,
                           sandbox=spec.sandbox, native=spec.native, announce=False, tail_bytes=INLINE_RESULT_MAX)
        if a.run.owner:  # a user's task: as a user's process, never as root
            req.sandbox = self.host.user_sandbox(a.run.owner, req.sandbox)
            req.owner = a.run.owner
        try:
            mp, _ = self.host.start_process(req)
        except FabricError:
            raise
        except Exception as exc:
            raise InternalError(f"task {a.run.id}: the process did not start: {exc}") from None
        table = self.host.table
        assert table is not None
        a.worker = mp.id

        def kill() -> None:
            table.signal(mp, signal.SIGKILL, "timeout" if a.timed_out else "killed")

        a.kill = kill
        self._arm(a)
        self._spawn(self._await_exit(a, mp), "exec")

    async def _await_exit(self, a: Attempt, mp: ManagedProcess) -> None:
        await mp.done.wait()
        if not a.dropped:
            self._finish(a, exit_result(a, mp.exit))

    # -- stopping ----------------------------------------------------------------------

    async def stop(self) -> None:
        """The spawner stops: stop every attempt (the scheduler sees a new instance next time), end the pulls."""
        for a in list(self.running.values()):
            self._cancel(a.key)
        tasks = list(self._inflight) + ([self._opening] if self._opening is not None else []) + self._lanes.openings()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _batchable(a: Attempt) -> bool:
    """May run in a batch with others: one CPU, no GPUs, no timeout (a batch is killed as one), not
    singled out by a batch whose worker died."""
    run = a.run
    return run.cpus <= 1 and not run.timeout_s and not run.gpus and not a.alone


def _cpu_weight(a: Attempt) -> float:
    """How much of the slots a task takes while it runs: its CPUs, at least one worker's worth."""
    return max(1.0, a.run.cpus)


def _stop_job(pool: Pool, job: Job, timeout_s: float, done: Any, a: Attempt) -> None:
    """Kill the worker running *job* (a per-job kill the pool does not have), or take it off the queue."""
    if job in pool.queue:
        pool.queue.remove(job)
        done(a, 0, b"", JobTimeout(f"the task waited past its timeout of {timeout_s:g}s", core=pool.id)
             if a.timed_out else None)
        return
    for w in pool.workers:
        if job.id in w.outstanding:
            # the pool then fails the job with JobTimeout and replaces the worker
            w.time_out(timeout_s)
            return

