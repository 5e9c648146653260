"""Warm pools of compute-core workers: the spawner's ``fabric.core.*`` endpoints.

A *core* is a ``.so`` that exports the compute core API v1 (``worker_init``,
``worker_run_job``, ``worker_free_outdata``), or a built-in core with an empty
library: the Python worker (``fabric.python``) or OpenCL kernels
(``fabric.opencl``).  Loading one starts a :class:`Pool` of warm worker processes
(``python -m fabric.services.spawner.worker``), each joined to
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

Where the parts live, imports running down this list: this module holds the manager
(:class:`CoreManager`: the control endpoints, loads and unloads, the watchdog);
:mod:`.job_lane` the ``run``/``map`` path from NATS to a pool and back, with
:mod:`.pool_reply` the reply link its reader threads answer on; :mod:`.pool` one pool;
:mod:`.pool_workers` its workers, which report through :class:`~.pool_workers.PoolEvents`;
:mod:`.pool_types` the jobs, worker specs and environment settings they share;
:mod:`.pool_rings` the ring files; :mod:`.worker` the worker process.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from nats.aio.client import Client as NATS

from fabric.config import SandboxConfig
from fabric.errors import BadRequest, Conflict, CoreLoadFailed, NotFound, PermissionDenied
from fabric.protocol import subjects
from fabric.protocol.cores import BUILTIN_CORES, OPENCL_CORE, PYTHON_CORE, pool_key
from fabric.schema import CoreInfo, CoreListReply, CoreRequest, LoadCoreRequest
from fabric.service import Endpoint, Request, cluster_endpoint, node_endpoint
from fabric.service_tasks import BackgroundTasks
from fabric.signing import file_message, require

from .job_lane import JobLane, fit_results
from .pool import Pool, library_digest
from .pool_reply import ReplyLink
from .pool_rings import RING_GLOB, ring_prefix, sweep_rings
from .pool_types import Job, PoolEnv
from .worker_user import RunAs

__all__ = ["CoreManager", "Pool", "Job", "PoolEnv", "PYTHON_CORE", "OPENCL_CORE",
           "library_digest", "fit_results", "sweep_rings", "RING_GLOB"]

#: how often the watchdog looks for jobs past their time limit and idle workers
TICK_S = 0.05


class CoreManager:
    """Every pool of this spawner, and the ``fabric.core.*`` endpoints that reach them.

    Control requests (load, list, stats, unload) are endpoints of the hosting service.
    Jobs (``run``, ``map``) come on the :class:`~.job_lane.JobLane`.  The manager is
    the :class:`~.pool.PoolHost` of its pools: they read its log, ring prefix, reply
    link, environment settings and child-pid set.
    """

    def __init__(self, node: str, log: Any, nats_url: str, env: PoolEnv | None = None,
                 tasks: BackgroundTasks | None = None, seed: str | None = None) -> None:
        self.node = node
        self.log = log
        self.nats_url = nats_url
        #: the pools' settings: the configuration's [pool] from the service, the defaults without
        self.env = env if env is not None else PoolEnv()
        self.pools: dict[str, Pool] = {}
        #: the live pool of each core name (not the draining ones): what a load reuses
        self.by_name: dict[str, Pool] = {}
        #: pids of the ring workers this manager started and has not reaped yet (the spawner's
        #: sweep for adopted orphans must never touch them: see worker_pids)
        self.children: set[int] = set()
        self._closing: set[asyncio.Task[Any]] = set()
        #: where the watchdog runs: the hosting service's background tasks, or the manager's own
        self.tasks = tasks if tasks is not None else BackgroundTasks(log)
        self._ticker: asyncio.Task[None] | None = None
        self.ring_prefix = ring_prefix()
        self.lane = JobLane(node, log, nats_url, self._pool, seed=seed)
        #: the node's sandbox section: whether a core library must be signed, and by whom (fabric.signing)
        self.signing = SandboxConfig()
        #: the OS user a client's pools run as (sandbox.client_user: worker_user.py); None: as the spawner
        self.client_run_as: RunAs | None = None

    @property
    def link(self) -> ReplyLink | None:
        """The job lane's reply link (None before start and after stop)."""
        return self.lane.link

    @property
    def nc(self) -> NATS | None:
        """The connection the job lane subscribes on: the hosting service's (None before start and after stop)."""
        return self.lane.nc

    def reply_limit(self) -> int:
        """The largest output (or ``map`` results frame) a reply on the job lane may carry."""
        return self.lane.reply_limit()

    def endpoints(self) -> list[Endpoint]:
        def ep(verb: str, handler: Any) -> Endpoint:  # fabric.core.<node>.<verb>, named core-<verb>
            return node_endpoint(subjects.CORE, self.node, verb, handler, name=f"core-{verb}")

        return [
            cluster_endpoint(subjects.CORE, subjects.Core.LOAD, self.load, name="core-load-any"),
            ep(subjects.Core.LOAD, self.load),
            ep(subjects.Core.LIST, self.list),
            ep(subjects.Core.STATS, self.stats),
            ep(subjects.Core.UNLOAD, self.unload),
        ]

    def side_endpoints(self) -> list[Endpoint]:
        """``run`` and ``map``: served on the job lane below, listed and counted in ``$SRV``."""
        return self.lane.endpoints()

    async def start(self, nc: NATS) -> None:
        """Open the job lane on *nc* (the hosting service's connection) and the reply link
        (before any worker starts), start the watchdog."""
        sweep_rings(self.log)
        await self.lane.open(nc)
        self._ticker = self.tasks.start(self._tick, name="core-watchdog")

    async def stop(self) -> None:
        await self.lane.unsubscribe()
        if self._ticker is not None:
            # ended already when the hosting service's kit stopped its background tasks first
            await self.tasks.cancel(self._ticker)
            self._ticker = None
        pools, self.pools = list(self.pools.values()), {}
        self.by_name.clear()
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*set(self._closing), return_exceptions=True)
        await self.lane.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            await self.lane.tend_link(now)
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

    def worker_pids(self) -> set[int]:
        """The pids of the warm workers this manager started and has not reaped yet."""
        return set(self.children)

    def _forget(self, pool: Pool) -> None:
        if self.pools.get(pool.id) is pool:
            del self.pools[pool.id]
        if self.by_name.get(pool.key) is pool:
            del self.by_name[pool.key]

    def _retire(self, pool: Pool, why: str) -> None:
        """Unload *pool* in the background (drained, or idle past ``unload_after_s``)."""
        self._forget(pool)
        self.log.info("core unloaded", core=pool.id, name=pool.name, why=why)
        task = asyncio.get_running_loop().create_task(pool.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _pool(self, core_id: str, caller: str | None = None) -> Pool:
        """Pool *core_id*, if *caller* may use it: its owner, or a trusted caller (403 otherwise)."""
        pool = self.pools.get(core_id)
        if pool is None:
            raise NotFound(f"no core {core_id!r} on node {self.node}", core=core_id)
        if caller is not None and pool.owner != caller:
            raise PermissionDenied(f"core {core_id} ({pool.name!r}) belongs to another user: {caller!r} may use "
                                   "only the cores it loaded")
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
        if body.library:
            require(self.signing, file_message(digest), body.signature,
                    f"core {body.name!r} (library sha256 {digest})")
        elif body.name == PYTHON_CORE and self.signing.require_signed and req.caller is not None:
            # its jobs are unsigned pickles, and a pool is shared by name: with signing on, a user's Python
            # runs only as tasks, each signed
            raise PermissionDenied(f"this node runs only signed code (sandbox.require_signed): core {PYTHON_CORE!r} "
                                   "takes unsigned Python; submit signed tasks instead")
        owner = req.caller or ""
        key = pool_key(owner, body.name)  # a user's pools are the user's: another user's load is another pool
        while True:
            live = self.by_name.get(key)
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
        old = self.by_name.get(key)  # replace=True: drained once the new pool is up
        core_id = f"c{secrets.token_hex(6)}"
        pool = Pool(self, core_id, body, owner=owner)
        if req.caller is not None:  # a user's code: as sandbox.client_user, never as the spawner's root
            pool.run_as = self.client_run_as
        self.pools[core_id] = pool
        self.by_name[key] = pool
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
            if old is not None and self.pools.get(old.id) is old and key not in self.by_name:
                self.by_name[key] = old  # the replacement failed: the old pool stays
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

    async def internal_pool(self, name: str, *, min_workers: int = 1, max_workers: int = 4,
                            time_limit_s: float = 0.0, shared: bool = False, env: dict[str, str] | None = None,
                            unload_after_s: float = 0.0, spins: tuple[float, float] | None = None,
                            owner: str = "") -> Pool:
        """A pool of the built-in core *name* for the spawner's own use (the task runner).

        ``shared``: the node's pool of that name (listed under it, reused by a load with the
        same settings, one load of it at a time); otherwise a pool of its own, listed by
        ``list`` with its id but never found by name, so a client's load of the same
        core is not refused for other settings.  ``env``: added to each worker's environment
        from its start (a pool pinned to GPUs); ``unload_after_s``: retired after that long
        without a job; ``spins``: caps on its reader and worker spins in µs (a pool fed by
        the task runner gets its jobs in batches, over NATS: a long spin only takes CPU from
        the processes the next batch comes through); ``owner``: a user whose tasks it runs --
        theirs alone, its workers running as ``sandbox.client_user`` (:attr:`client_run_as`).
        CoreLoadFailed when its first worker does not start.
        """
        key = pool_key(owner, name)
        if shared:
            live = self.by_name.get(key)
            if live is not None:
                await live.ready.wait()
                if self.by_name.get(key) is live and not live.broken:
                    return live
        pool = Pool(self, f"t{secrets.token_hex(6)}", LoadCoreRequest(
            name=name, min_workers=min_workers, max_workers=max_workers, time_limit_s=time_limit_s,
            unload_after_s=unload_after_s), owner=owner)
        if owner:
            pool.run_as = self.client_run_as
        pool.worker_env = dict(env or {})
        if spins is not None:
            pool.pool_env = self.env.capped(*spins)
        self.pools[pool.id] = pool
        if shared:
            self.by_name[key] = pool
        try:
            first = pool.start_worker()
            for _ in range(pool.min_workers - 1):
                pool.start_worker()
            if await first is None:
                raise CoreLoadFailed(pool.last_error, core=pool.id, name=name)
        except BaseException:
            self._forget(pool)
            pool.ready.set()
            await pool.close()
            raise
        pool.loaded = True
        pool.last_active = time.monotonic()
        pool.ready.set()
        self.log.info("core loaded", core=pool.id, name=name, internal=not shared, max_workers=max_workers)
        return pool

    def list(self, req: Request) -> CoreListReply:
        return CoreListReply(node=self.node, cores=[p.info(self.node) for p in self.pools.values()
                                                    if req.caller is None or p.owner == req.caller])

    def stats(self, req: Request) -> CoreInfo:
        return self._pool(req.decode(CoreRequest).core, req.caller).info(self.node)

    async def unload(self, req: Request) -> CoreInfo:
        core_id = req.decode(CoreRequest).core
        pool = self._pool(core_id, req.caller)
        self._forget(pool)
        info = pool.info(self.node)
        await pool.close()
        self.log.info("core unloaded", core=core_id, name=pool.name)
        return info
