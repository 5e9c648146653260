"""Background tasks of a service: started through the kit, cancelled and awaited when it stops.

A service's loops (the allocator's lease reaper, the gpu-monitor's heartbeats, the
spawner's pool watchdog) run beside its request handlers.  Started with
:meth:`FabricService.background <fabric.service.FabricService.background>` (or a
:class:`BackgroundTasks` of their own, for a part that has its own start and stop),
each one:

* runs as a named asyncio task;
* logs an exception that ends it (instead of asyncio's "Task exception was never
  retrieved" at exit, long after the loop silently stopped);
* is cancelled and awaited by :meth:`BackgroundTasks.stop`: nothing of it runs after
  the service stopped, so ``on_stop`` may close what the loop uses.

The kit stops its tasks after the requests in flight finished (a request may wait on
something a loop does) and before ``on_stop`` (which closes what the loops use).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["BackgroundTasks", "LoopFunction"]

#: what a background task runs: a coroutine function taking no arguments
LoopFunction = Callable[[], Coroutine[Any, Any, None]]


class BackgroundTasks:
    """The background tasks of one owner (a service, or a part of one with its own lifecycle)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """How many of the tasks are still running."""
        return len(self._tasks)

    def start(self, fn: LoopFunction, *, name: str) -> asyncio.Task[None]:
        """Run ``fn()`` as a task named *name* until it returns or :meth:`stop`; returns the task."""
        task = asyncio.get_running_loop().create_task(self._run(fn, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, fn: LoopFunction, name: str) -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a loop: say so now, not at interpreter exit
            self.log.error("background task failed", task=name, exc_info=exc)

    @staticmethod
    async def cancel(task: asyncio.Task[None]) -> None:
        """Cancel *task* (one of these) and wait until it ended; a no-op for one that ended already."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def stop(self) -> None:
        """Cancel every task and wait until all ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # _run logs what a task raised; what is left here is each one's CancelledError
            await asyncio.gather(*tasks, return_exceptions=True)
