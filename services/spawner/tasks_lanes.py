"""The task runner's Python pools of their own: one per lane, a user and a GPU set.

The runner's ``python`` tasks share one warm pool (:mod:`.tasks`), except those that
need a pool of their own, one per *lane*:

* a task given GPUs: CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process, so each
  distinct GPU set gets workers with ``CUDA_VISIBLE_DEVICES=<indices>`` from their start
  (:func:`.tasks_gpu.cuda_visible`);
* a client-role user's task on a spawner that runs as root: their code runs in workers
  of their own, as ``sandbox.client_user`` (:mod:`.worker_user`), never in the shared
  pool's workers (which run as the spawner) and never in another user's.

A lane's pool is made on first use, unloaded after :data:`UNLOAD_AFTER_S` without a job;
at most :data:`MAX_LANES` are held at once (an idle one is retired to make room for
another lane; with none idle the task waits for one).  A lane's tasks go one a worker,
never batched.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fabric.errors import FabricError
from fabric.protocol.cores import PYTHON_CORE

from .pool_types import TASK_POOL_SPINS
from .pools import CoreManager, Pool
from .tasks_gpu import cuda_visible
from .tasks_results import REFUSED, Attempt, task_error

__all__ = ["PythonLanes", "MAX_LANES", "UNLOAD_AFTER_S"]

#: the most lane pools a node keeps at once (each holds warm workers)
MAX_LANES = 4
#: a lane's pool with no job for this long is unloaded (the next task of its lane starts it again)
UNLOAD_AFTER_S = 30.0

_CUDA = "CUDA_VISIBLE_DEVICES"


class _Lane:
    """The pool of one lane -- a user (or none) and a GPU set (or none) -- and the tasks waiting for it."""

    def __init__(self, key: tuple[str, tuple[int, ...]]) -> None:
        self.key = key
        self.owner, self.gpus = key
        self.pool: Pool | None = None
        self.opening: asyncio.Task[None] | None = None
        self.queue: deque[Attempt] = deque()
        self.busy = 0

    def live(self, cores: CoreManager) -> bool:
        # retired by the watchdog (idle) or broken: a new pool is opened for the next task
        p = self.pool
        return p is not None and not p.closed and not p.broken and cores.pools.get(p.id) is p


class PythonLanes:
    """One internal Python pool per lane (see the module docstring)."""

    def __init__(self, cores: CoreManager, log: Any, slots: int, submit: Callable[[Attempt, Pool], None],
                 finish: Callable[[Attempt, Any], None], owner_of: Callable[[Attempt], str]) -> None:
        self.cores = cores
        self.log = log
        self.slots = slots
        self._submit = submit
        self._finish = finish
        #: the user whose lane a task takes ("" for none: the task runs as the spawner)
        self.owner_of = owner_of
        self.lanes: dict[tuple[str, tuple[int, ...]], _Lane] = {}

    def key(self, a: Attempt) -> tuple[str, tuple[int, ...]]:
        return self.owner_of(a), tuple(a.run.gpus)

    def queue(self, a: Attempt) -> None:
        """Run python task *a* (GPUs given, or a user's to run as sandbox.client_user) on the pool of its lane."""
        key = self.key(a)
        for k, x in list(self.lanes.items()):  # forget the sets whose pools were unloaded idle
            if k != key and not x.queue and not x.busy and not x.live(self.cores) and (
                    x.opening is None or x.opening.done()):
                del self.lanes[k]
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = _Lane(key)
        lane.queue.append(a)
        self._pump(lane)

    def done(self, a: Attempt) -> None:
        """A job of *a* ended (its pool has room again)."""
        lane = self.lanes.get(self.key(a))
        if lane is not None:
            lane.busy -= 1
        self.pump_all()

    def drop(self, a: Attempt) -> bool:
        """Take cancelled *a* off its lane's queue; False when it is not queued (it runs)."""
        lane = self.lanes.get(self.key(a))
        if lane is not None and a in lane.queue:
            lane.queue.remove(a)
            return True
        return False

    def pump_all(self) -> None:
        for lane in list(self.lanes.values()):
            if lane.queue:
                self._pump(lane)

    def _pump(self, lane: _Lane) -> None:
        if not lane.live(self.cores):
            if lane.queue and (lane.opening is None or lane.opening.done()) and self._room_for(lane):
                lane.opening = asyncio.get_running_loop().create_task(self._open(lane))
            return
        pool = lane.pool
        assert pool is not None
        while lane.queue and lane.busy < pool.max_workers:
            a = lane.queue.popleft()
            lane.busy += 1
            self._submit(a, pool)

    def _room_for(self, lane: _Lane) -> bool:
        """Whether another lane's pool may start: under MAX_LANES, or after retiring an idle one."""
        held = [x for x in self.lanes.values() if x is not lane and (
            x.live(self.cores) or (x.opening is not None and not x.opening.done()))]
        if len(held) < MAX_LANES:
            return True
        for x in held:
            if x.pool is not None and x.live(self.cores) and not x.busy and not x.queue:
                self.cores._retire(x.pool, "another lane needs room")
                x.pool = None
                del self.lanes[x.key]
                return True
        return False  # every lane's pool is busy: the task waits for one to finish (done() pumps again)

    async def _open(self, lane: _Lane) -> None:
        lane.pool = None
        env = {_CUDA: cuda_visible(list(lane.gpus))} if lane.gpus else {}
        try:
            lane.pool = await self.cores.internal_pool(PYTHON_CORE, min_workers=1, max_workers=self.slots,
                                                       env=env, unload_after_s=UNLOAD_AFTER_S,
                                                       spins=TASK_POOL_SPINS, owner=lane.owner)
        except FabricError as exc:
            self.log.warning("task runner: a python pool of its own did not start", owner=lane.owner or None,
                             gpus=env.get(_CUDA), error=exc.message)
            while lane.queue:
                a = lane.queue.popleft()
                self._finish(a, a.result(REFUSED, error=task_error(exc)))
            return
        self.log.info("task runner: python pool of its own", core=lane.pool.id, owner=lane.owner or None,
                      gpus=env.get(_CUDA), user=lane.pool.run_as.user if lane.pool.run_as else None)
        lane.pool.last_active = time.monotonic()
        self._pump(lane)

    def openings(self) -> list[asyncio.Task[None]]:
        return [x.opening for x in self.lanes.values() if x.opening is not None]
