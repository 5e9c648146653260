"""One warm pool: the workers of one loaded core, its job queue, its watchdog and its statistics.

A job goes to an idle worker first; when none is idle the pool starts another (up to
``max_workers``), and once at the maximum it queues a few jobs per worker on the ring
(:data:`PIPELINE`) so a busy worker never sleeps between small jobs.  A worker reports
to its pool through :class:`~.pool_workers.PoolEvents`, which :class:`Pool` implements;
the pool reads what it needs of the manager through :class:`PoolHost` (the manager
implements it), so imports run manager -> pool -> workers, never back.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import tempfile
import time
from collections import deque
from typing import Any, Protocol

from fabric.errors import (
    CoreLoadFailed,
    FabricError,
    InternalError,
    JobError,
    JobTimeout,
    NotFound,
    Unavailable,
)
from fabric.protocol.cores import PYTHON_CORE, pool_key
from fabric.schema import CoreInfo, LoadCoreRequest

from .pool_reply import ReplyLink
from .pool_types import Job, PoolEnv, WorkerSpec
from .pool_workers import RingWorker, SocketWorker, Worker
from .worker_user import RunAs

__all__ = ["Pool", "PoolHost", "library_digest", "PIPELINE", "START_TIMEOUT_S", "MAX_START_FAILURES", "MAX_QUEUED"]

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


class PoolHost(Protocol):
    """What a pool reads of the manager that hosts it (read when used: a test may change them)."""

    log: Any
    #: where new ring workers put their ring files
    ring_prefix: str
    #: the pools' environment settings
    env: PoolEnv
    #: the pids of the ring workers not reaped yet
    children: set[int]

    @property
    def link(self) -> ReplyLink | None:
        """The reply link reader threads answer ``run`` jobs on (None before the job lane starts)."""


def library_digest(library: bytes, name: str = PYTHON_CORE) -> str:
    """What identifies a core's code: the sha256 (hex) of the library, the built-in core's name for none."""
    return hashlib.sha256(library).hexdigest() if library else name



class Pool:
    """The warm workers of one loaded core, its job queue and its statistics."""

    def __init__(self, host: PoolHost, core_id: str, req: LoadCoreRequest, owner: str = "") -> None:
        self.host = host
        self.id = core_id
        #: the user who loaded it ("" for a trusted caller): only they (and trusted callers) use it
        self.owner = owner
        #: its name in the manager's by_name (fabric.protocol.cores.pool_key)
        self.key = pool_key(owner, req.name)
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
        #: what each new worker's environment adds, and its spins if not the node's (set by
        #: CoreManager.internal_pool)
        self.worker_env: dict[str, str] = {}
        self.pool_env: PoolEnv | None = None
        #: the OS user its workers run as: a client's pools run as sandbox.client_user (worker_user.py)
        self.run_as: RunAs | None = None
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

    # -- what the workers report (PoolEvents) ---------------------------------------

    def finished(self, job: Job, exit_code: int, out: Any, err: FabricError | None) -> None:
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
        return WorkerSpec(core=self.id, name=self.name, library=self.library, env=tuple(self.worker_env.items()))

    def start_worker(self) -> asyncio.Task[Worker | None]:
        host = self.host
        w = RingWorker(self, self.spec(), next(self._seq), ring_prefix=host.ring_prefix, link=host.link,
                       env=self.pool_env or host.env, children=host.children, run_as=self.run_as)
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
            await w.start(START_TIMEOUT_S)
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
        self.host.log.warning("worker failed to start", core=self.id, name=self.name, error=exc.message)
        if self.start_failures >= MAX_START_FAILURES and not self.broken:
            self.broken = f"core {self.name!r}: {MAX_START_FAILURES} workers in a row failed to start: {exc.message}"
            self._fail_queued(CoreLoadFailed(self.broken, core=self.id))

    def worker_failed(self, worker: Worker, why: str) -> None:
        self.host.log.warning("worker failed", core=self.id, worker=worker.seq, error=why)

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
                self.finished(head, 0, b"", reason)
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
        w = SocketWorker(self, self.spec(), next(self._seq), reader, writer)
        self.workers.append(w)
        self.workers_started += 1
        try:
            await w.start(START_TIMEOUT_S)
        except FabricError as exc:
            self.workers_refused += 1
            self.host.log.warning("external worker refused", core=self.id, error=exc.message,
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
        # a job its worker's reader thread has already answered counts as done, though the loop has not yet
        # heard of it: a caller who got the reply and then asks sees it counted (found by tests/test_pools.py)
        replied = sum(1 for w in self.workers for job in list(w.outstanding.values()) if job.replied)
        running = sum(len(w.outstanding) for w in self.workers) - replied
        return CoreInfo(
            core=self.id, node=node, name=self.name, min_workers=self.min_workers,
            max_workers=self.max_workers, time_limit_s=self.time_limit_s,
            workers=sum(1 for w in self.workers if w.ready),
            idle=sum(1 for w in self.workers if w.ready and not w.outstanding),
            external_workers=sum(1 for w in self.workers if w.external and w.ready),
            queued=len(self.queue), running=running, jobs_done=self.jobs_done + replied, jobs_failed=self.jobs_failed,
            crashes=self.crashes, timeouts=self.timeouts, workers_started=self.workers_started,
            workers_refused=self.workers_refused, listen_unix=self.listen_unix, listen_tcp=self.listen_tcp,
            digest=self.digest, idle_s=self.idle_s, unload_after_s=self.unload_after_s, draining=self.draining,
            replaced_by=self.replaced_by,
        )
