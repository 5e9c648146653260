"""Warm pools of compute-core workers: the spawner's ``fabric.core.*`` endpoints.

A *core* is a ``.so`` that exports the compute core API v1 (``worker_init``,
``worker_run_job``, ``worker_free_outdata``), or a built-in core with an empty
library: the Python worker (``fabric.python``) or OpenCL kernels
(``fabric.opencl``).  Loading one starts a :class:`Pool` of warm worker processes
(``python -m services.spawner.worker``), each joined to
this controller by two shared-memory rings of :mod:`fabric_ext.ring` that carry
protocol v1 frames (:mod:`fabric_ext.wire`): jobs one way, results the other.
External workers that speak protocol v1 over a socket (``examples/cores/worker.c``)
may join a pool too, through a per-core listening socket.

How a job travels::

    NATS request ──> run handler ──> Pool.submit ──> idle worker: push_parts(header, data) on its ring
                                                                            │  (worker process runs the job)
    NATS reply  <── future  <── call_soon_threadsafe <── reader thread: Consumer.pop() (GIL released)

* one reader thread per ring worker blocks in ``Consumer.pop()`` and hands every
  result it finds (a blocking pop, then whatever ``try_pop`` drains) to the event
  loop in one ``call_soon_threadsafe``;
* a job goes to an idle worker first; when none is idle the pool starts another
  (up to ``max_workers``), and once at the maximum it queues a few jobs per worker
  on the ring (``PIPELINE``) so a busy worker never sleeps between small jobs;
* a worker's death (segfault, abort, SIGKILL) is seen through a pidfd on the loop;
  its results already in the ring are drained first, then its running job fails
  with :class:`~fabric.errors.WorkerCrashed` (or :class:`~fabric.errors.JobTimeout`
  when the watchdog killed it for running past the core's time limit), the jobs
  queued behind it go back to the pool, and a replacement starts;
* a core whose library cannot load (missing symbols, ``worker_init`` nonzero, a
  worker speaking another protocol version) fails the load with
  :class:`~fabric.errors.CoreLoadFailed`; a pool whose replacement workers keep
  failing to start marks itself broken rather than spinning.

Subjects (docs/protocol.md, "Compute cores"): ``fabric.core.load`` (any spawner),
``fabric.core.<node>.{load,list,stats,unload}`` (JSON/MessagePack), and
``fabric.core.<node>.run.<core>`` (raw job bytes in, raw output out) and
``fabric.core.<node>.map.<core>`` (the job batch frames of :mod:`fabric.schema`).

Reply size: no reply goes out above what the server takes (its ``max_payload``, less
:data:`~.pool_reply.REPLY_HEADROOM` for headers: :meth:`CoreManager.reply_limit`).  A
``run`` whose output is bigger is answered 413 ``too_large`` at once; a ``map`` keeps the
outputs that fit, in input order, and puts 413 in the slots of the jobs whose output does
not (see :func:`fit_results`).  Publishing it anyway would have the server refuse it (and
drop the reply link with it) and leave the client waiting out its timeout.

Lifetime: one live pool per core name on a node.  Loading a name again with the same
library (its sha256, or ``fabric.python`` for the built-in worker) and the same settings
returns that pool (``reused``); other settings or another library are 409 Conflict
unless the load asks to ``replace``: the new pool starts, then the old one *drains*
(takes no new jobs, finishes the queued and running ones, then its workers stop).  A
pool lives until it is unloaded, the spawner stops, or, with ``unload_after_s``, it
has had no job for that long.
"""

from __future__ import annotations

import asyncio
import functools
import glob
import hashlib
import itertools
import os
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError

from fabric import subjects
from fabric.errors import (
    BadRequest,
    Conflict,
    CoreLoadFailed,
    FabricError,
    InternalError,
    JobError,
    JobFailed,
    JobTimeout,
    NotFound,
    TooLarge,
    Unavailable,
    error_headers,
)
from fabric.schema import (
    CoreInfo,
    CoreListReply,
    CoreRequest,
    LoadCoreRequest,
    decode_job_batch,
    encode_job_results,
)
from fabric.service import Endpoint, Request
from fabric.subjects import QUEUE_GROUP

from .pool_reply import REPLY_HEADROOM, ReplyLink, reply_limit
from .pool_workers import CHILD_PIDS, OUTPUT_HINT, RingWorker, SocketWorker, Worker, WorkerSpec
from .worker_core import BUILTIN_CORES, OPENCL_CORE, PYTHON_CORE

__all__ = ["CoreManager", "Pool", "Job", "PYTHON_CORE", "OPENCL_CORE", "EXIT_CODE_HEADER", "library_digest"]

#: the reply header that carries a failed job's exit code (with the job_failed error headers)
EXIT_CODE_HEADER = "Fabric-Exit-Code"
#: jobs queued on one busy worker's ring once the pool is at max_workers
PIPELINE = 4
#: a worker must finish the version exchange and load its core within this many seconds
START_TIMEOUT_S = 30.0
#: consecutive failed worker starts after which a pool stops replacing workers
MAX_START_FAILURES = 3
#: jobs one pool may hold waiting for a worker; past it a job is refused (503 unavailable)
MAX_QUEUED = 1 << 20
#: the load settings a live pool must match to be reused (Pool attributes named as in LoadCoreRequest)
_SETTINGS = ("min_workers", "max_workers", "time_limit_s", "idle_s", "unload_after_s", "external")
#: how often the watchdog looks for jobs past their time limit and idle workers
TICK_S = 0.05


def library_digest(library: bytes, name: str = PYTHON_CORE) -> str:
    """What identifies a core's code: the sha256 (hex) of the library, the built-in core's name for none."""
    return hashlib.sha256(library).hexdigest() if library else name


class Job:
    """One job: its input bytes and what to call with ``(exit_code, output, error)``.

    ``reply`` is the NATS reply subject of a single ``run`` job when the reader thread
    may answer it directly (see :mod:`.pool_reply`); ``replied`` says it did.
    """

    __slots__ = ("id", "data", "done", "reply", "replied")

    def __init__(self, job_id: int, data: Any, done: Callable[[int, Any, FabricError | None], None],
                 reply: bytes | None = None) -> None:
        self.id = job_id
        self.data = data
        self.done = done
        self.reply = reply
        self.replied = False


class Pool:
    """The warm workers of one loaded core, its job queue and its statistics."""

    def __init__(self, manager: CoreManager, core_id: str, req: LoadCoreRequest) -> None:
        self.manager = manager
        self.id = core_id
        self.name = req.name
        self.library = bytes(req.library)
        self.digest = library_digest(self.library, req.name)
        self.min_workers = req.min_workers
        self.max_workers = req.max_workers  # >= min_workers and >= 1: load() and the schema checked
        self.time_limit_s = req.time_limit_s
        self.idle_s = req.idle_s
        self.unload_after_s = req.unload_after_s
        self.external = req.external
        self.listen_host = req.listen_host
        self.ready = asyncio.Event()  # set when the load finished, whether it worked or not
        self.draining = False  # replaced: no new jobs; closes once the queued and running ones are done
        self.replaced_by = ""
        self.last_active = time.monotonic()  # the load, or the end of the latest job
        self.workers: list[Worker] = []
        self.loaded = False  # the first worker loaded the library: later start failures retry
        self.last_error = ""
        self.queue: deque[Job] = deque()
        self.closed = False
        self.broken: str = ""  # why replacements stopped, once they keep failing
        self.start_failures = 0
        self.listen_unix = ""
        self.listen_tcp = ""
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_path = ""
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        # statistics (CoreInfo)
        self.jobs_done = 0
        self.jobs_failed = 0
        self.crashes = 0
        self.timeouts = 0
        self.workers_started = 0
        self.workers_refused = 0

    # -- jobs -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.closed:
            job.done(0, b"", self._unloaded())
            return
        if self.draining:
            job.done(0, b"", NotFound(f"core {self.id} was replaced by {self.replaced_by} and takes no new jobs",
                                      core=self.id, replaced_by=self.replaced_by))
            return
        if self.broken:
            job.done(0, b"", CoreLoadFailed(self.broken, core=self.id))
            return
        if len(self.queue) >= MAX_QUEUED:
            job.done(0, b"", Unavailable(f"core {self.id}: {MAX_QUEUED} jobs already wait for a worker", core=self.id))
            return
        self.queue.append(job)
        self.pump()

    def pump(self) -> None:
        """Hand queued jobs to workers: idle ones first, then start more, then pipeline."""
        queue = self.queue
        if not queue:
            return
        ready = [w for w in self.workers if w.ready]
        for w in ready:
            if not w.outstanding:
                self._send(w, queue.popleft())
                if not queue:
                    return
        if len(self.workers) < self.max_workers:
            if not self.broken and not self.closed:
                for _ in range(min(self.max_workers - len(self.workers), len(queue) - self.starting())):
                    self.start_worker()
            return  # fresh workers are on their way: keep the jobs for them rather than queue behind busy ones
        # at max_workers: queue a few jobs on each busy worker's ring, so none sleeps between small jobs
        depth = 1
        while queue and depth < PIPELINE:
            depth += 1
            for w in ready:
                if len(w.outstanding) < depth and w.accepts(len(queue[0].data)):
                    self._send(w, queue.popleft())
                    if not queue:
                        return

    def _send(self, w: Worker, job: Job) -> None:
        try:
            w.send_job(job)
        except FabricError as exc:
            job.done(0, b"", exc)
        except Exception as exc:  # the ring or socket failed under us: the worker is done for
            w.fail(f"sending a job failed: {exc}")
            self.queue.appendleft(job)

    def _unloaded(self) -> NotFound:
        return NotFound(f"core {self.id} was unloaded", core=self.id)

    def _fail_queued(self, exc: FabricError) -> None:
        """Fail every job still waiting for a worker with *exc*."""
        queue = self.queue
        while queue:
            queue.popleft().done(0, b"", exc)

    def finished(self, w: Worker, job: Job, exit_code: int, out: Any, err: FabricError | None) -> None:
        if err is not None or exit_code != 0:
            self.jobs_failed += 1
        else:
            self.jobs_done += 1
        self.last_active = time.monotonic()
        job.done(exit_code, out, err)

    def output_refused(self, exit_code: int) -> None:
        """A finished job's output was too large for its reply: the caller got 413, count it failed."""
        if exit_code == 0:
            self.jobs_done -= 1
            self.jobs_failed += 1

    # -- workers ----------------------------------------------------------------

    def spec(self) -> WorkerSpec:
        return WorkerSpec(core=self.id, name=self.name, library=self.library)

    def start_worker(self) -> asyncio.Task[Worker | None]:
        w = RingWorker(self.manager, self, next(self._seq))
        self.workers.append(w)
        self.workers_started += 1
        task = asyncio.get_running_loop().create_task(self._start_worker(w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def starting(self) -> int:
        return sum(1 for w in self.workers if not w.was_ready)

    async def _start_worker(self, w: Worker) -> Worker | None:
        try:
            await w.start(self.spec(), START_TIMEOUT_S)
        except FabricError as exc:
            err = exc
        except Exception as exc:  # e.g. /dev/shm full, fork failed
            err = InternalError(f"worker start failed: {exc}")
        else:
            self.start_failures = 0
            self.pump()
            return w
        self._start_failed(err)
        await w.stop(kill_after=1.0)
        if self.loaded and not self.broken and not self.closed and (
                self.queue or len(self.workers) < self.min_workers):
            self.start_worker()
        return None

    def _start_failed(self, exc: FabricError) -> None:
        self.start_failures += 1
        self.last_error = exc.message
        self.manager.log.warning("worker failed to start", core=self.id, name=self.name, error=exc.message)
        if self.start_failures >= MAX_START_FAILURES and not self.broken:
            self.broken = f"core {self.name!r}: {MAX_START_FAILURES} workers in a row failed to start: {exc.message}"
            self._fail_queued(CoreLoadFailed(self.broken, core=self.id))

    def worker_gone(self, w: Worker, reason: JobError | None, lost: list[Job]) -> None:
        """A worker ended: fail its running job (if it crashed), requeue the rest, replace it."""
        if w in self.workers:
            self.workers.remove(w)
        if lost:
            head, rest = lost[0], lost[1:]
            if reason is not None:
                if isinstance(reason, JobTimeout):
                    self.timeouts += 1
                else:
                    self.crashes += 1
                self.finished(w, head, 0, b"", reason)
            else:
                rest = lost
            for job in reversed(rest):
                self.queue.appendleft(job)
        elif reason is not None and w.was_ready:
            self.crashes += 1
        if not w.was_ready:  # a failed start: _start_worker decides about another
            self.pump()
            return
        if self.closed:
            self._fail_queued(self._unloaded())
            return
        need = max(self.min_workers - len(self.workers), 0) if not self.draining else 0
        if self.queue and not need and len(self.workers) < self.max_workers:
            need = 1
        if not self.broken:
            for _ in range(need):
                self.start_worker()
        self.pump()

    def tick(self, now: float) -> None:
        """Watchdog: kill workers whose job ran past the time limit; retire idle extras."""
        limit = self.time_limit_s
        for w in list(self.workers):
            if limit and w.outstanding and now - w.head_started > limit:
                w.time_out(limit)
        extra = len(self.workers) - self.min_workers
        if extra > 0 and not self.queue:
            for w in list(self.workers):
                if extra <= 0:
                    break
                if w.ready and not w.outstanding and not w.external and now - w.idle_since > self.idle_s:
                    w.retire()
                    extra -= 1

    def busy(self) -> bool:
        """Jobs wait or run here."""
        return bool(self.queue) or any(w.outstanding for w in self.workers)

    def differences(self, req: LoadCoreRequest) -> list[str]:
        """The settings of *req* that differ from this pool's, as ``field live (asked X)``."""
        fields = _SETTINGS + ("listen_host",) if req.external else _SETTINGS
        return [f"{k} {getattr(self, k)!r} (asked {getattr(req, k)!r})"
                for k in fields if getattr(self, k) != getattr(req, k)]

    # -- external workers ---------------------------------------------------------

    async def listen(self, host: str) -> None:
        """Accept external v1 workers on a unix socket and on TCP *host*:ephemeral port."""
        self._unix_path = os.path.join(tempfile.gettempdir(), f"fabric-core-{os.getpid()}-{self.id}.sock")
        srv = await asyncio.start_unix_server(self._accept, self._unix_path)
        self._servers.append(srv)
        self.listen_unix = f"unix:{self._unix_path}"
        tcp = await asyncio.start_server(self._accept, host, 0)
        self._servers.append(tcp)
        port = tcp.sockets[0].getsockname()[1]
        self.listen_tcp = f"tcp:{host}:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closed:
            writer.close()
            return
        w = SocketWorker(self.manager, self, next(self._seq), reader, writer)
        self.workers.append(w)
        self.workers_started += 1
        try:
            await w.start(self.spec(), START_TIMEOUT_S)
        except FabricError as exc:
            self.workers_refused += 1
            self.manager.log.warning("external worker refused", core=self.id, error=exc.message,
                                     peer=str(writer.get_extra_info("peername")))
            await w.stop(kill_after=0)
            return
        self.pump()

    # -- lifecycle --------------------------------------------------------------

    async def close(self) -> None:
        """Unload: refuse new jobs, fail queued ones, stop every worker, remove sockets."""
        self.closed = True
        for srv in self._servers:
            srv.close()
        self._fail_queued(self._unloaded())
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop(kill_after=2.0) for w in list(self.workers)), return_exceptions=True)
        self.workers.clear()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except FileNotFoundError:
                pass

    def info(self, node: str) -> CoreInfo:
        running = sum(len(w.outstanding) for w in self.workers)
        return CoreInfo(
            core=self.id, node=node, name=self.name, min_workers=self.min_workers,
            max_workers=self.max_workers, time_limit_s=self.time_limit_s,
            workers=sum(1 for w in self.workers if w.ready),
            idle=sum(1 for w in self.workers if w.ready and not w.outstanding),
            external_workers=sum(1 for w in self.workers if w.external and w.ready),
            queued=len(self.queue), running=running, jobs_done=self.jobs_done, jobs_failed=self.jobs_failed,
            crashes=self.crashes, timeouts=self.timeouts, workers_started=self.workers_started,
            workers_refused=self.workers_refused, listen_unix=self.listen_unix, listen_tcp=self.listen_tcp,
            digest=self.digest, idle_s=self.idle_s, unload_after_s=self.unload_after_s, draining=self.draining,
            replaced_by=self.replaced_by,
        )


class CoreManager:
    """Every pool of this spawner, and the ``fabric.core.*`` endpoints that reach them.

    Control requests (load, list, stats, unload) are endpoints of the hosting service.
    Jobs (``run``, ``map``) come on the *job lane*: the manager's own NATS connection,
    subscribed in the same queue group, whose callbacks hand a job to its pool without
    a task per request; a successful ``run`` is answered straight from the reader
    thread (:class:`~.pool_reply.ReplyLink`), everything else from the loop.
    """

    def __init__(self, node: str, log: Any, nats_url: str) -> None:
        self.node = node
        self.log = log
        self.nats_url = nats_url
        self.pools: dict[str, Pool] = {}
        #: the live pool of each core name (not the draining ones): what a load reuses
        self.by_name: dict[str, Pool] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        self.link: ReplyLink | None = None
        self.nc: NATS | None = None
        self._subs: list[Any] = []
        self._job_ids = itertools.count(1)
        self._ticker: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[Any]] = set()
        self.ring_prefix = RING_GLOB.replace("*", f"{os.getpid()}-{secrets.token_hex(3)}")
        # served on the job lane (start()), counted here, listed in $SRV (side_endpoints)
        self._run_ep = Endpoint("core-run", subjects.node_scoped("core", node, "run") + ".*", self._on_run)
        self._map_ep = Endpoint("core-map", subjects.node_scoped("core", node, "map") + ".*", self._on_map)

    def endpoints(self) -> list[Endpoint]:
        node = self.node

        def ep(verb: str, handler: Any) -> Endpoint:
            return Endpoint(f"core-{verb}", subjects.node_scoped("core", node, verb), handler)

        return [
            Endpoint("core-load-any", subjects.cluster("core", "load"), self.load),
            ep("load", self.load),
            ep("list", self.list),
            ep("stats", self.stats),
            ep("unload", self.unload),
        ]

    def side_endpoints(self) -> list[Endpoint]:
        """``run`` and ``map``: served on the job lane below, listed and counted in ``$SRV``."""
        return [self._run_ep, self._map_ep]

    async def start(self) -> None:
        """Open the job lane and the reply link (before any worker starts), start the watchdog."""
        sweep_rings(self.log)
        self.nc = await nats.connect(self.nats_url, name=f"spawner-jobs@{self.node}", max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.25, error_cb=self._on_nats_error)
        # the reader threads hold on to this link for good; the watchdog reconnects it
        self.link = ReplyLink(self.nats_url, f"spawner-replies@{self.node}", self.log)
        await asyncio.get_running_loop().run_in_executor(None, self.link.connect)
        for verb, cb in (("run", self._on_run), ("map", self._on_map)):
            self._subs.append(await self.nc.subscribe(subjects.node_scoped("core", self.node, verb) + ".*",
                                                      queue=QUEUE_GROUP, cb=cb, pending_msgs_limit=1 << 20,
                                                      pending_bytes_limit=1 << 30))
        await self.nc.flush()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is already gone
                pass
        self._subs.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        pools, self.pools = list(self.pools.values()), {}
        self.by_name.clear()
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*set(self._closing), return_exceptions=True)
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=5)
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.nc is not None:
            nc, self.nc = self.nc, None
            try:
                await nc.drain()
            except Exception:
                await nc.close()

    def reply_limit(self) -> int:
        """The largest output (or ``map`` results frame) a reply on the job lane may carry."""
        return reply_limit(self.nc.max_payload) if self.nc is not None else 0

    def too_large(self, pool: Pool, size: int, exit_code: int = 0, what: str = "the job's output") -> TooLarge:
        """The 413 for an output of *size* bytes that no reply can carry."""
        mp = self.nc.max_payload if self.nc is not None else 0
        code = f" (exit code {exit_code})" if exit_code else ""
        return TooLarge(f"core {pool.name!r}: {what} of {size} bytes{code} is more than a reply carries: "
                        f"{reply_limit(mp)} bytes (the NATS server's max payload of {mp} less {REPLY_HEADROOM} "
                        f"for headers); {OUTPUT_HINT}", core=pool.id, size=size, max_payload=mp)

    async def _on_nats_error(self, exc: Exception) -> None:
        self.log.warning("job lane nats error", error=str(exc))

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        retry_link_at = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            link = self.link
            if link is not None and link.usable and not link.up and now >= retry_link_at:
                retry_link_at = now + 2.0  # the server restarted: replies go through the loop meanwhile
                await loop.run_in_executor(None, link.connect)
            for pool in list(self.pools.values()):
                try:
                    pool.tick(now)
                    if pool.draining:
                        if not pool.busy():
                            self._retire(pool, "drained")
                    elif (pool.unload_after_s and pool.loaded and not pool.busy()
                          and now - pool.last_active > pool.unload_after_s):
                        self._retire(pool, "idle")
                except Exception:
                    self.log.exception("pool watchdog failed", core=pool.id)

    @staticmethod
    def worker_pids() -> set[int]:
        """The pids of the warm workers this process started and has not reaped yet."""
        return set(CHILD_PIDS)

    def _forget(self, pool: Pool) -> None:
        if self.pools.get(pool.id) is pool:
            del self.pools[pool.id]
        if self.by_name.get(pool.name) is pool:
            del self.by_name[pool.name]

    def _retire(self, pool: Pool, why: str) -> None:
        """Unload *pool* in the background (drained, or idle past ``unload_after_s``)."""
        self._forget(pool)
        self.log.info("core unloaded", core=pool.id, name=pool.name, why=why)
        task = asyncio.get_running_loop().create_task(pool.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _pool(self, core_id: str) -> Pool:
        pool = self.pools.get(core_id)
        if pool is None:
            raise NotFound(f"no core {core_id!r} on node {self.node}", core=core_id)
        return pool

    # -- control endpoints --------------------------------------------------------

    async def load(self, req: Request) -> CoreInfo:
        body: LoadCoreRequest = req.decode(LoadCoreRequest)
        if not body.library and body.name not in BUILTIN_CORES:
            raise BadRequest(f"core {body.name!r}: library is empty (only the built-in cores "
                             f"{', '.join(map(repr, BUILTIN_CORES))} need none)")
        if body.library and body.name in BUILTIN_CORES:
            raise BadRequest(f"core name {body.name!r} is reserved for a built-in core")
        if body.min_workers > body.max_workers:
            raise BadRequest(f"min_workers ({body.min_workers}) exceeds max_workers ({body.max_workers})")
        digest = library_digest(body.library, body.name)
        while True:
            live = self.by_name.get(body.name)
            if live is None:
                break
            if not live.ready.is_set():  # another load of this name is starting it: wait for its outcome
                await live.ready.wait()
                continue
            if live.broken:  # its workers keep failing to start: a load starts afresh
                self._retire(live, "broken")
                continue
            if body.replace:
                break
            if live.digest != digest:
                raise Conflict(f"core {body.name!r} is loaded on node {self.node} as {live.id} with another "
                               f"library (sha256 {live.digest}; this one is {digest}): unload it first, "
                               f"or load with replace=True", core=live.id, digest=live.digest)
            diff = live.differences(body)
            if diff:
                raise Conflict(f"core {body.name!r} is loaded on node {self.node} as {live.id} with other "
                               f"settings: {', '.join(diff)}; load it with its settings, unload it first, "
                               f"or load with replace=True", core=live.id, digest=live.digest)
            live.last_active = time.monotonic()
            info = live.info(self.node)
            info.reused = True
            return info
        old = self.by_name.get(body.name)  # replace=True: drained once the new pool is up
        core_id = f"c{secrets.token_hex(6)}"
        pool = Pool(self, core_id, body)
        self.pools[core_id] = pool
        self.by_name[body.name] = pool
        try:
            # the first worker proves the library loads; the others start beside it
            first = pool.start_worker()
            for _ in range(pool.min_workers - 1):
                pool.start_worker()
            w = await first
            if w is None:
                # the failure message of the one worker that tried
                raise CoreLoadFailed(pool.last_error, core=core_id, name=body.name)
            pool.loaded = True
            if body.external:
                await pool.listen(body.listen_host)
        except BaseException:
            self._forget(pool)
            if old is not None and self.pools.get(old.id) is old and body.name not in self.by_name:
                self.by_name[body.name] = old  # the replacement failed: the old pool stays
            pool.ready.set()
            await pool.close()
            raise
        pool.last_active = time.monotonic()
        pool.ready.set()
        if old is not None and self.pools.get(old.id) is old:
            old.draining = True
            old.replaced_by = core_id
            self.log.info("core draining", core=old.id, name=old.name, replaced_by=core_id)
        self.log.info("core loaded", core=core_id, name=body.name, digest=pool.digest,
                      min_workers=pool.min_workers, max_workers=pool.max_workers)
        return pool.info(self.node)

    def list(self, req: Request) -> CoreListReply:
        return CoreListReply(node=self.node, cores=[p.info(self.node) for p in self.pools.values()])

    def stats(self, req: Request) -> CoreInfo:
        return self._pool(req.decode(CoreRequest).core).info(self.node)

    async def unload(self, req: Request) -> CoreInfo:
        core_id = req.decode(CoreRequest).core
        pool = self._pool(core_id)
        self._forget(pool)
        info = pool.info(self.node)
        await pool.close()
        self.log.info("core unloaded", core=core_id, name=pool.name)
        return info

    # -- jobs (the job lane) ---------------------------------------------------------

    def _send(self, subject: str, data: Any, headers: dict[str, str] | None = None) -> None:
        """Publish a reply from the loop (errors, batches, anything the reader thread did not send)."""
        if self.nc is None or not subject:
            return
        task = asyncio.get_running_loop().create_task(self._publish(subject, data, headers))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _publish(self, subject: str, data: Any, headers: dict[str, str] | None) -> None:
        nc = self.nc
        if nc is None:  # closed since the send was scheduled
            return
        try:
            try:
                await nc.publish(subject, data, headers=headers)
            except MaxPayloadError:
                # the callers check sizes (reply_limit); should one slip through, the client still
                # gets an answer rather than waiting out its timeout
                mp = nc.max_payload
                exc = TooLarge(f"a reply of {len(data)} bytes is above the NATS server's max payload of {mp} "
                               f"bytes; {OUTPUT_HINT}")
                await nc.publish(subject, b"", headers=error_headers(exc))
        except Exception as exc:  # connection lost: the client times out
            self.log.warning("job reply not sent", error=str(exc))

    def _send_error(self, subject: str, exc: FabricError) -> None:
        self._send(subject, b"", error_headers(exc))

    async def _on_run(self, msg: Any) -> None:
        """``fabric.core.<node>.run.<core>``: the body is the job's input; the reply its output."""
        t0 = time.perf_counter_ns()
        reply = msg.reply
        try:
            pool = self._pool(msg.subject.rpartition(".")[2])
        except FabricError as exc:
            self._run_ep.record(t0, exc.message)
            self._send_error(reply, exc)
            return
        link = self.link
        direct = reply.encode() if reply and link is not None and link.up else None
        job = Job(next(self._job_ids), msg.data, _noop, direct)
        job.done = functools.partial(self._run_done, job, reply, pool, t0)
        pool.submit(job)

    def _run_done(self, job: Job, reply: str, pool: Pool, t0: int, code: int, out: Any,
                  err: FabricError | None) -> None:
        self._run_ep.record(t0, err.message if err is not None else
                            f"exit code {code}" if code != 0 else None)
        if job.replied:
            return
        if err is None and len(out) > self.reply_limit():
            pool.output_refused(code)
            err = self.too_large(pool, len(out), code)
        if err is not None:
            self._send_error(reply, err)
        elif code != 0:
            headers = error_headers(JobFailed(f"core {pool.name!r} returned exit code {code}", exit_code=code))
            headers[EXIT_CODE_HEADER] = str(code)
            self._send(reply, out, headers)
        else:
            self._send(reply, out)

    async def _on_map(self, msg: Any) -> None:
        """``fabric.core.<node>.map.<core>``: a job batch frame in, a job results frame out."""
        t0 = time.perf_counter_ns()
        reply = msg.reply
        try:
            pool = self._pool(msg.subject.rpartition(".")[2])
            items = decode_job_batch(msg.data)
        except FabricError as exc:
            self._map_ep.record(t0, exc.message)
            self._send_error(reply, exc)
            return
        n = len(items)
        results: list[tuple[int, int, Any]] = [(0, 0, b"")] * n
        if not n:
            self._map_ep.record(t0)
            self._send(reply, encode_job_results(results))
            return
        left = [n]
        map_ep = self._map_ep

        def send(subject: str, data: bytes | None) -> None:
            if data is None:  # even the 413s of the jobs that do not fit do not fit (a huge batch)
                exc = TooLarge(f"core {pool.name!r}: the results of this batch of {n} jobs do not fit one "
                               f"reply of {self.reply_limit()} bytes; send smaller batches", core=pool.id)
                map_ep.record(t0, exc.message)
                self._send_error(subject, exc)
                return
            map_ep.record(t0)  # a batch is one request; its jobs' failures travel in the frame
            self._send(subject, data)

        def refuse(i: int, size: int, code: int, alone: bool) -> TooLarge:
            pool.output_refused(code)
            if alone:
                return self.too_large(pool, size, code, f"the output of job {i} of the batch")
            return TooLarge(f"core {pool.name!r}: the output of job {i} of the batch, {size} bytes, does not fit "
                            f"in what the outputs before it left of the reply's {self.reply_limit()} bytes; run it "
                            f"alone or in a smaller batch, or {OUTPUT_HINT}", core=pool.id, size=size)

        def collector(i: int) -> Callable[[int, Any, FabricError | None], None]:
            def done(code: int, out: Any, err: FabricError | None) -> None:
                if err is not None:
                    results[i] = (0, err.code, f"{err.kind}\n{err.message}".encode())
                else:
                    results[i] = (code, 0, out)
                left[0] -= 1
                if not left[0]:
                    send(reply, fit_results(results, self.reply_limit(), refuse))

            return done

        ids = self._job_ids
        for i, data in enumerate(items):
            pool.submit(Job(next(ids), data, collector(i)))


def fit_results(results: list[tuple[int, int, Any]], limit: int,
                refuse: Callable[[int, int, int, bool], FabricError]) -> bytes | None:
    """The job results frame of *results*, at most *limit* bytes; None when that cannot be done.

    When the whole frame does not fit, the outputs are kept in input order while they fit
    what is left; a job whose output does not gets the error ``refuse(index, size,
    exit_code, alone)`` in its slot (*alone*: it would not fit even by itself).  The
    errors of jobs that failed stay as they are.
    """
    frame = encode_job_results(results)
    if len(frame) <= limit:
        return frame
    left = limit - 8 - 16 * len(results)
    fitted: list[tuple[int, int, Any]] = []
    for i, (code, err, out) in enumerate(results):
        size = len(out)
        if size <= left or err:  # a failed job's kind and message are short: they stay
            fitted.append((code, err, out))
            left -= size
            continue
        exc = refuse(i, size, code, size > limit - 24)
        text = f"{exc.kind}\n{exc.message}".encode()
        fitted.append((0, exc.code, text))
        left -= len(text)
    frame = encode_job_results(fitted)
    return frame if len(frame) <= limit else None


RING_GLOB = "/dev/shm/fabric-ring-core-*"


def sweep_rings(log: Any) -> list[str]:
    """Remove the ring files of spawners that died without cleaning up (SIGKILL, OOM).

    A ring file is ``fabric-ring-core-<pid>-...``; its workers died with their parent
    (PR_SET_PDEATHSIG), so a file whose pid is gone is garbage.
    """
    removed = []
    for path in glob.glob(RING_GLOB):
        try:
            pid = int(os.path.basename(path).split("-")[3])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
        except PermissionError:  # alive, someone else's
            pass
    if removed:
        log.info("removed ring files of a dead spawner", files=len(removed))
    return removed


def _noop(code: int, out: Any, err: FabricError | None) -> None:
    """A placeholder ``done`` until the real one is bound."""
