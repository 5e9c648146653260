"""GPU pinning for the task runner's ``python`` and ``opencl`` tasks (docs/protocol.md "Tasks").

The scheduler gives a task GPUs (``TaskRun.gpus``: device indices on this node) and, with
them, the OpenCL device id of the first one (``TaskRun.opencl_device``).  :mod:`.tasks`
hands such tasks here:

* ``python``: CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process, so setting it per job
  in a warm worker is not reliable.  Each distinct GPU set gets a Python pool of its own
  (:class:`GpuPythonPools`) whose workers have ``CUDA_VISIBLE_DEVICES=<indices>`` from
  their start: made on first use, unloaded after :data:`UNLOAD_AFTER_S` without a job,
  at most :data:`MAX_GPU_POOLS` at once (an idle one is retired to make room for another
  set; with none idle the task waits for one).  Tasks without GPUs keep the runner's
  shared pool.
* ``opencl``: :func:`pin_opencl` rewrites the FCLJ job header's explicit
  ``platform``/``device`` to the given device, so the node's ``fabric.opencl`` worker runs
  it there or fails it (404 ``unknown_device``); it never runs elsewhere.  A device of
  another node, a header asking for another device, or GPUs with no OpenCL device paired
  to them are refused.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fabric.errors import BadRequest, FabricError, UnknownDevice
from fabric.protocol.cores import PYTHON_CORE
from fabric.schema.tasks import TaskRun

from .pool_types import TASK_POOL_SPINS
from .pools import CoreManager, Pool
from .tasks_results import REFUSED, Attempt, task_error

__all__ = ["GpuPythonPools", "pin_opencl", "MAX_GPU_POOLS", "UNLOAD_AFTER_S"]

#: the most pinned Python pools a node keeps at once (each holds warm workers)
MAX_GPU_POOLS = 4
#: a pinned pool with no job for this long is unloaded (the next task of its set starts it again)
UNLOAD_AFTER_S = 30.0

_CUDA = "CUDA_VISIBLE_DEVICES"


def cuda_visible(gpus: list[int]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value for device indices *gpus*: ``"1,3"``."""
    return ",".join(str(g) for g in gpus)


class _Lane:
    """The pinned pool of one GPU set and the tasks waiting for it."""

    def __init__(self, gpus: tuple[int, ...]) -> None:
        self.gpus = gpus
        self.pool: Pool | None = None
        self.opening: asyncio.Task[None] | None = None
        self.queue: deque[Attempt] = deque()
        self.busy = 0

    def live(self, cores: CoreManager) -> bool:
        # retired by the watchdog (idle) or broken: a new pool is opened for the next task
        p = self.pool
        return p is not None and not p.closed and not p.broken and cores.pools.get(p.id) is p


class GpuPythonPools:
    """One internal Python pool per distinct GPU set (see the module docstring)."""

    def __init__(self, cores: CoreManager, log: Any, slots: int, submit: Callable[[Attempt, Pool], None],
                 finish: Callable[[Attempt, Any], None]) -> None:
        self.cores = cores
        self.log = log
        self.slots = slots
        self._submit = submit
        self._finish = finish
        self.lanes: dict[tuple[int, ...], _Lane] = {}

    def queue(self, a: Attempt) -> None:
        """Run python task *a* (it has ``gpus``) on the pool of its GPU set."""
        key = tuple(a.run.gpus)
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
        lane = self.lanes.get(tuple(a.run.gpus))
        if lane is not None:
            lane.busy -= 1
        self.pump_all()

    def drop(self, a: Attempt) -> bool:
        """Take cancelled *a* off its lane's queue; False when it is not queued (it runs)."""
        lane = self.lanes.get(tuple(a.run.gpus))
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
        """Whether another pinned pool may start: under MAX_GPU_POOLS, or after retiring an idle one."""
        held = [x for x in self.lanes.values() if x is not lane and (
            x.live(self.cores) or (x.opening is not None and not x.opening.done()))]
        if len(held) < MAX_GPU_POOLS:
            return True
        for x in held:
            if x.pool is not None and x.live(self.cores) and not x.busy and not x.queue:
                self.cores._retire(x.pool, "another GPU set needs room")
                x.pool = None
                del self.lanes[x.gpus]
                return True
        return False  # every pinned pool is busy: the task waits for one to finish (done() pumps again)

    async def _open(self, lane: _Lane) -> None:
        lane.pool = None
        visible = cuda_visible(list(lane.gpus))
        try:
            lane.pool = await self.cores.internal_pool(PYTHON_CORE, min_workers=1, max_workers=self.slots,
                                                       env={_CUDA: visible}, unload_after_s=UNLOAD_AFTER_S,
                                                       spins=TASK_POOL_SPINS)
        except FabricError as exc:
            self.log.warning("task runner: a GPU-pinned python pool did not start", gpus=visible,
                             error=exc.message)
            while lane.queue:
                a = lane.queue.popleft()
                self._finish(a, a.result(REFUSED, error=task_error(exc)))
            return
        self.log.info("task runner: python pool pinned to GPUs", core=lane.pool.id, gpus=visible)
        lane.pool.last_active = time.monotonic()
        self._pump(lane)

    def openings(self) -> list[asyncio.Task[None]]:
        return [x.opening for x in self.lanes.values() if x.opening is not None]


def pin_opencl(run: TaskRun, node: str) -> None:
    """Make the FCLJ job of opencl task *run* name its device ``run.opencl_device`` (in place).

    Raises (the task is refused) when it cannot be pinned safely: GPUs given with no OpenCL
    device, a device id of another node or not of the form ``<node>:cl:<p>:<d>``, or a job
    header that names another device explicitly.
    """
    from fabric.opencl import decode_job, encode_job

    device = run.opencl_device
    if not device:
        if run.gpus:
            raise UnknownDevice(f"task {run.id}: it was given GPUs {run.gpus} on node {node}, but none of them has "
                                f"an OpenCL device paired to it: it is not run on another device",
                                device=cuda_visible(run.gpus))
        return
    owner, sep, rest = device.rpartition(":cl:")
    p, _, d = rest.partition(":")
    if not sep or not p.isdigit() or not d.isdigit():
        raise BadRequest(f"task {run.id}: opencl_device {device!r} is not '<node>:cl:<platform>:<device>'")
    if owner != node:
        raise UnknownDevice(f"task {run.id}: OpenCL device {device!r} is not on node {node}", device=device)
    header, data = decode_job(run.payload)  # InvalidFrame: refused as malformed
    platform, index = int(p), int(d)
    if (header.platform >= 0 or header.device >= 0) and (header.platform, header.device) != (platform, index):
        raise BadRequest(f"task {run.id}: its job asks for OpenCL device {header.platform}:{header.device}, "
                         f"but it was given {device!r}: it is not run on another device than it was given")
    header.platform, header.device = platform, index
    # the inline data travels as it was: offsets in the header are relative to its start
    run.payload = bytes(encode_job(header, [(0, data)] if len(data) else []))
