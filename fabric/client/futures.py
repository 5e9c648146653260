"""The sync face of task futures, and what works over many: ``as_completed``, ``wait``, a progress bar.

:class:`TaskFuture` is what :meth:`FabricClient.submit` returns: a thread-safe view of
the :class:`~fabric.client.tasks.AsyncTaskFuture` the async client resolves in its loop
thread, with the ``concurrent.futures.Future`` methods (``result``, ``exception``,
``done``, ``cancel``, ``add_done_callback``...).  :func:`as_completed` and :func:`wait`
take futures of either face (never call them in the client's loop thread: they block);
:class:`TaskProgress` draws a Rich progress bar that advances as futures end.  Exported
as ``fabric.TaskFuture``, ``fabric.as_completed`` and ``fabric.wait``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import BadRequest
from ..schema.tasks import CANCELLED, SUCCEEDED
from .tasks import AsyncTaskFuture, TaskRef

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from .sync import FabricClient

__all__ = ["TaskFuture", "TaskProgress", "as_completed", "wait", "DoneAndNotDone", "FIRST_COMPLETED",
           "FIRST_EXCEPTION", "ALL_COMPLETED"]


class TaskFuture(TaskRef):
    """The future result of one task, for the sync :class:`~fabric.client.FabricClient`.

    ``fut.result(timeout=10)`` blocks until the task ends and returns its value or raises
    its exception (as :class:`~fabric.client.tasks.AsyncTaskFuture` says); ``state`` is
    ``"pending"`` or the task's end.  Thread-safe; callbacks run in the client's loop thread
    (or at once in the caller's thread when the task has ended).
    """

    __slots__ = ("client", "aio")

    def __init__(self, client: FabricClient | None, aio: AsyncTaskFuture) -> None:
        self.client = client
        self.aio = aio

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def kind(self) -> str:
        return self.aio.kind

    @property
    def state(self) -> str:
        """``"pending"``, or how the task ended: ``succeeded``, ``failed``, ``dead``, ``cancelled``."""
        return self.aio.state

    def _async_future(self) -> AsyncTaskFuture:
        return self.aio

    def __repr__(self) -> str:
        return f"TaskFuture(id={self.id!r}, kind={self.kind!r}, state={self.state!r})"

    def done(self) -> bool:
        return self.aio.done()

    def cancelled(self) -> bool:
        return self.aio.cancelled()

    def running(self) -> bool:
        """False, as ``concurrent.futures`` means it: the client does not know whether a node runs it now
        (``fc.task(id).state`` does)."""
        return False

    def _block(self, timeout: float | None) -> None:
        if self.aio.done():
            return
        thread = self.client._thread if self.client is not None else None
        if thread is not None and threading.current_thread() is thread:
            raise RuntimeError("TaskFuture.result() in the client's own loop thread (a done callback?) would "
                               "wait forever: use add_done_callback, or ask from another thread")
        if not self.aio._wait_blocking(timeout):
            raise TimeoutError(f"task {self.id} has not ended after {timeout:g}s")

    def result(self, timeout: float | None = None) -> Any:
        """The task's value once it ends; its exception if it did not succeed; TimeoutError after *timeout* s."""
        self._block(timeout)
        if self.aio._exc is not None:
            raise self.aio._exc
        return self.aio._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the task's end raises (None if it succeeded), once it ends."""
        self._block(timeout)
        return self.aio._exc

    def cancel(self) -> bool:
        """Ask the scheduler to cancel the task: True if it did, False if the task had ended already."""
        if self.aio.done():
            return False
        if self.client is None:
            return False
        return self.client._run(self.aio.cancel())

    def release(self) -> bool:
        """Delete the stored copy of a large result now (this future keeps its value); True if there was one.

        A result too large for the task's record lives in the object store
        ``fabric_task_results`` until released -- here, when the future is garbage-collected,
        or after 24 hours.  Release it once no other client will read it (``fc.task(id)``).
        """
        if self.client is None or not self.aio._ref:
            return False
        return bool(self.client._run(self.aio.release()))

    def add_done_callback(self, fn: Callable[[TaskFuture], Any]) -> None:
        """Run ``fn(self)`` once the task has ended: now (in this thread) if it has, else in the loop thread."""
        self.aio._on_done(lambda: fn(self))

    def __eq__(self, other: object) -> bool:  # two faces of one future made by two calls are the same future
        return isinstance(other, TaskFuture) and other.aio is self.aio

    def __hash__(self) -> int:
        return hash(self.aio)


def _face_done_callback(f: Any, fn: Callable[[Any], Any]) -> None:
    if not isinstance(f, TaskRef):
        raise TypeError(f"expected task futures, got {type(f).__name__}")
    f._async_future()._on_done(lambda: fn(f))


def _failed(f: Any) -> bool:
    """The future ended by raising (cancelled ones do not count, as in ``concurrent.futures``)."""
    aio = f._async_future()
    return aio.state not in (SUCCEEDED, CANCELLED) and aio.done()


def as_completed(futures: Iterable[Any], timeout: float | None = None) -> Iterator[Any]:
    """Yield each of *futures* as it ends (those ended already first, in the order given).

    Past *timeout* seconds (from this call) it raises TimeoutError.  Duplicates are
    yielded once.  The futures are watched from this call on (not from the first ``next``),
    so the order is the order in which they end.  Blocks the calling thread: not for the
    client's loop thread (async code uses ``asyncio.as_completed``, which takes
    :class:`AsyncTaskFuture` as awaitables).
    """
    fs = list(dict.fromkeys(futures))
    deadline = None if timeout is None else time.monotonic() + timeout
    ended: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for f in fs:
        _face_done_callback(f, ended.put)
    return _as_they_end(ended, len(fs), deadline, timeout)


def _as_they_end(ended: queue.SimpleQueue[Any], count: int, deadline: float | None,
                 timeout: float | None) -> Iterator[Any]:
    for yielded in range(count):
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            yield ended.get(timeout=left)
        except queue.Empty:
            raise TimeoutError(f"{count - yielded} of {count} futures have not ended after {timeout:g}s") from None


class DoneAndNotDone(NamedTuple):
    done: set[Any]
    not_done: set[Any]


def wait(futures: Iterable[Any], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
    """Wait for *futures* as ``concurrent.futures.wait`` does; ``(done, not_done)``.

    *return_when* is ``FIRST_COMPLETED``, ``FIRST_EXCEPTION`` (the first that did not
    succeed, cancelled ones aside; else all) or ``ALL_COMPLETED``; past *timeout* seconds it
    returns what has ended so far.
    """
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise BadRequest(f"return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED, "
                         f"got {return_when!r}")
    fs = set(futures)
    cond = threading.Condition()
    ended: set[Any] = set()

    def enough() -> bool:
        if return_when == FIRST_COMPLETED:
            return bool(ended) or not fs
        if return_when == FIRST_EXCEPTION and any(_failed(f) for f in ended):
            return True
        return len(ended) == len(fs)

    def one_ended(f: Any) -> None:
        with cond:
            ended.add(f)
            cond.notify_all()

    for f in fs:
        _face_done_callback(f, one_ended)
    with cond:
        cond.wait_for(enough, timeout)
        done = set(ended)
    return DoneAndNotDone(done, fs - done)


class TaskProgress:
    """A Rich progress bar over task futures: ``with TaskProgress(fs) as bar:`` (or ``fc.progress(fs)``).

    The bar advances as each future ends (from the loop thread: Rich's progress is
    thread-safe); ``completed`` counts the ended futures, ``failed`` those that did not
    succeed.  Leaving the block stops the bar (it does not wait for the futures).
    """

    def __init__(self, futures: Iterable[Any], *, description: str = "tasks", console: Console | None = None,
                 transient: bool = False) -> None:
        self.futures = list(dict.fromkeys(futures))
        self.description = description
        self.completed = 0
        self.failed = 0
        self._console = console
        self._transient = transient
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> TaskProgress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                  console=self._console, transient=self._transient)
        self._task = self._progress.add_task(self.description, total=len(self.futures), failed=0)
        self._progress.start()
        for f in self.futures:
            _face_done_callback(f, self._one_ended)
        return self

    def _one_ended(self, f: Any) -> None:
        with self._lock:
            self.completed += 1
            aio = f._async_future()
            if aio.state != SUCCEEDED:
                self.failed += 1
            progress, task, failed = self._progress, self._task, self.failed
        if progress is not None and task is not None:
            progress.update(task, advance=1, failed=failed)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()

