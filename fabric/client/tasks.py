"""The tasks area: durable tasks on the scheduler (``fabric.task.*``), and the futures of their results.

``await fc.submit(fn, *args)`` sends one Python call as a task and returns an
:class:`AsyncTaskFuture` at once; ``map`` sends many calls of one function in batches
(``MapRequest``); ``submit_core`` / ``submit_exec`` send a compute-core job or a process.
How it travels (the shared design of issue 14, fabric/schema/tasks.py):

* the client mints every task id itself (:func:`new_task_id`; a map's ids are
  ``<prefix>-<i>``), so a future exists before the scheduler answers; the submit itself
  is sent in the background, a bounded number in flight (:data:`SUBMITS_IN_FLIGHT`), and a
  refused submit (400, 404, 413, 422, 503...) becomes the future's exception;
* every request names one ``notify`` subject of the client's own (``<inbox>.tasks``, one
  subscription per client), where the scheduler publishes :class:`TaskDoneBatch` messages
  as tasks end; each :class:`TaskDone` resolves its future (:meth:`AsyncTaskFuture._finish`);
* a future passed in the arguments of a python task is a dependency: it is pickled as the
  persistent id ``("fabric.task", <id>)`` (:class:`_TaskPickler`) and listed in ``deps``;
  the scheduler puts the dependency's result in its place when the task runs.

Futures hold no server state: dropping one costs nothing (a large result stored by the
scheduler is not released by the client: see :meth:`AsyncTaskFuture._finish`).  The sync
:class:`~fabric.client.futures.TaskFuture` is a thread-safe face of the same state
(:mod:`fabric.client.futures`, with ``as_completed``, ``wait`` and ``progress``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import pickle
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import cloudpickle
from nats.errors import MaxPayloadError

from ..errors import (
    FabricError,
    NoResponders,
    NotFound,
    RequestTimedOut,
    TaskCancelled,
    TaskDead,
    TaskFailed,
    TooLarge,
    Unavailable,
)
from ..protocol import subjects
from ..protocol.pytasks import TASK_PERSISTENT_TAG, encode_python_task
from ..schema import CONTENT_TYPE_HEADER, JSON, MSGPACK, MSGPACK_CONTENT_TYPE
from ..schema.processes import Limits, Sandbox
from ..schema.tasks import (
    CANCELLED,
    CORE,
    DEAD,
    EXEC,
    FAILED,
    PYTHON,
    SUCCEEDED,
    TERMINAL,
    ExecSpec,
    MapReply,
    MapRequest,
    ReleaseReply,
    Resources,
    ResultChunk,
    ResultRequest,
    SubmitReply,
    SubmitRequest,
    TaskDone,
    TaskDoneBatch,
    TaskRecord,
    TaskRequest,
    WaitRequest,
)
from ..signing import map_message, python_message
from .transport import FRAME_OVERHEAD, Transport

if TYPE_CHECKING:
    from rich.console import Console

    from .futures import TaskProgress

log = logging.getLogger("fabric.client")

#: the client-side state of a future whose task has not ended (the task's states are fabric.schema.tasks')
PENDING: Final = "pending"
#: submits sent and not yet answered, at most (``submit`` waits for a slot: back pressure)
SUBMITS_IN_FLIGHT: Final = 256
#: calls per ``MapRequest``, and map requests in flight at a time, by default
MAP_BATCH_SIZE: Final = 1024
MAP_IN_FLIGHT: Final = 4
#: the scheduler refuses a body above the server's max payload less this (413): a map batch stays under it
BODY_HEADROOM: Final = 64 << 10
#: ``fabric.task.get`` requests in flight at a time when catching up after a reconnect
CATCH_UP_IN_FLIGHT: Final = 64
#: and how many times each asks while no scheduler answers (0.2 s apart)
CATCH_UP_TRIES: Final = 50
#: how long a task request (but ``wait``) waits for its reply before it is sent again: a scheduler killed while
#: holding it never answers, and the standby that takes over (about 2 s) answers the same request (ids are the
#: client's, so a repeat is the same task)
ATTEMPT_S: Final = 5.0
#: how long one ``fabric.task.wait`` request asks the scheduler to hold (the protocol's most is 300)
_FOLLOW_WAIT_S: Final = 30.0

# one lock for the state of every future: critical sections are a few assignments
_LOCK = threading.Lock()


def new_task_id() -> str:
    """A fresh task id: ``t`` and 22 random url-safe characters (``[A-Za-z0-9_-]``, 128 bits).

    It starts with a letter, so it never reads as an option on a command line (``fabric task <id>``).
    """
    return "t" + secrets.token_urlsafe(16)


def new_map_prefix() -> str:
    """A fresh ``MapRequest.prefix``: 22 random characters of ``[A-Za-z0-9_]`` (task ``i`` is ``<prefix>-<i>``)."""
    return secrets.token_urlsafe(16).replace("-", "_")


@dataclass(frozen=True)
class ExecResult:
    """The value of a succeeded ``exec`` task: the process's ``exit_code`` (0) and ``output`` (its stdout tail).

    A process that exits nonzero fails its task instead: its future raises
    :class:`~fabric.errors.TaskFailed` carrying ``exit_code`` and ``output``.
    """

    exit_code: int
    output: bytes


class TaskRef:
    """What both faces of a future share: the task's ``id`` (pickled as a dependency in a task's arguments)."""

    __slots__ = ()

    @property
    def id(self) -> str:
        raise NotImplementedError

    def _async_future(self) -> AsyncTaskFuture:
        raise NotImplementedError

    def __reduce__(self) -> Any:
        # only _TaskPickler may pickle a future (as a dependency); anywhere else it would be a
        # handle that means nothing in another process
        raise TypeError(f"a {type(self).__name__} pickles only inside the arguments of a task (as a dependency)")


class _TaskPickler(cloudpickle.CloudPickler):  # type: ignore[misc]  # cloudpickle has no stubs
    """cloudpickle that writes each future as the persistent id ``("fabric.task", <id>)`` and lists the ids."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.deps: dict[str, TaskRef] = {}  # by id, in the order met

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, TaskRef):
            task_id = obj.id
            self.deps.setdefault(task_id, obj)
            return (TASK_PERSISTENT_TAG, task_id)
        return None


def pickle_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, dict[str, TaskRef]]:
    """``(args, kwargs)`` pickled for an FPY1 frame, and the futures found in them by id (the deps)."""
    buf = io.BytesIO()
    pickler = _TaskPickler(buf)
    pickler.dump((args, kwargs))
    return buf.getvalue(), pickler.deps


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
    else:  # Python 3.10: what add_note does
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def done_exception(done: TaskDone, kind: str) -> BaseException:
    """The exception a task's end other than ``succeeded`` raises from its future.

    ``failed`` with a pickled exception (a python task) raises that exception, with the
    remote traceback added as a note; ``failed`` otherwise :class:`TaskFailed` (``remote_type``,
    ``remote_traceback``, ``exit_code`` and ``output`` for a process); ``dead``
    :class:`TaskDead`; ``cancelled`` :class:`TaskCancelled`.
    """
    err = done.error
    if done.state == FAILED:
        if err is not None and err.exc and kind == PYTHON:
            try:
                exc = pickle.loads(err.exc)  # noqa: S301 - the exception our own task raised
            except Exception as unpickle:  # noqa: BLE001 - a class this process cannot import: TaskFailed below
                log.debug("task %s: its exception does not unpickle here: %r", done.id, unpickle)
            else:
                if isinstance(exc, BaseException):
                    if err.traceback:
                        _add_note(exc, "remote traceback:\n" + err.traceback)
                    return exc
        fields: dict[str, Any] = {"task": done.id}
        if err is not None:
            fields.update(remote_type=err.type, remote_traceback=err.traceback, error_kind=err.kind,
                          error_code=err.code)
        if done.exit_code is not None:
            fields.update(exit_code=done.exit_code, output=done.result)
        message = err.message if err is not None and err.message else f"task {done.id} failed"
        if err is not None and err.type and not message.startswith(err.type):
            message = f"{err.type}: {message}"
        return TaskFailed(message, **fields)
    if done.state == DEAD:
        why = f": {err.message}" if err is not None and err.message else ""
        return TaskDead(f"task {done.id} is dead: system failures used up its retries{why}", task=done.id)
    if done.state == CANCELLED:
        return TaskCancelled(f"task {done.id} was cancelled", task=done.id)
    return FabricError(f"task {done.id} ended in an unknown state {done.state!r}", task=done.id)


def done_value(done: TaskDone, kind: str) -> Any:
    """The value of a succeeded task: the unpickled result (python), the output bytes (core, opencl),
    an :class:`ExecResult` (exec)."""
    if kind == PYTHON:
        return pickle.loads(done.result)  # noqa: S301 - the pickled value our own task returned
    if kind == EXEC:
        return ExecResult(done.exit_code or 0, done.result)
    return done.result


def _record_done(rec: TaskRecord) -> TaskDone:
    return TaskDone(id=rec.id, state=rec.state, result=rec.result, result_ref=rec.result_ref,
                    exit_code=rec.exit_code, error=rec.error)


class AsyncTaskFuture(TaskRef):
    """The future result of one task: ``value = await fut`` (or ``await fut.result(timeout)``).

    ``state`` is ``"pending"`` until the task ends, then its end: ``succeeded``, ``failed``,
    ``dead`` or ``cancelled`` (``failed`` too when the submit was refused).  Awaiting a
    future that did not succeed raises (see :func:`done_exception`).  The future is
    resolved in the client's loop thread; :meth:`add_done_callback` runs there.
    """

    __slots__ = ("_id", "kind", "_client", "_state", "_value", "_exc", "_callbacks", "_event", "_waiters",
                 "_sent", "_ref", "_refused", "__weakref__")

    def __init__(self, client: TasksArea | None, task_id: str, kind: str = PYTHON) -> None:
        self._id = task_id
        self.kind = kind
        self._client = client
        self._state: str = PENDING
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._event: threading.Event | None = None  # made by the first blocking waiter
        self._waiters: list[asyncio.Future[None]] = []
        #: set once the scheduler answered the submit (or refused it): dependents wait for it
        self._sent: asyncio.Event | None = None
        #: the stored object holding a large result (released with the future, or by its TTL)
        self._ref = ""
        #: why the scheduler refused the submit (400, 404, 413, 422, 503), if it did
        self._refused: BaseException | None = None

    @property
    def id(self) -> str:
        """The task's id (``fc.task(id)``, ``fabric task get``)."""
        return self._id

    @property
    def state(self) -> str:
        """``"pending"``, or how the task ended: ``succeeded``, ``failed``, ``dead``, ``cancelled``."""
        return self._state

    def _async_future(self) -> AsyncTaskFuture:
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self._id!r}, kind={self.kind!r}, state={self._state!r})"

    def done(self) -> bool:
        """The task has ended (whatever the outcome)."""
        return self._state != PENDING

    def cancelled(self) -> bool:
        return self._state == CANCELLED

    def add_done_callback(self, fn: Callable[[AsyncTaskFuture], Any]) -> None:
        """Run ``fn(self)`` once the task has ended: now if it has, else in the client's loop thread."""
        self._on_done(lambda: fn(self))

    def _on_done(self, call: Callable[[], Any]) -> None:
        with _LOCK:
            if self._state == PENDING:
                self._callbacks.append(call)
                return
        _run_callback(call)

    async def result(self, timeout: float | None = None) -> Any:
        """The task's value once it ends; its exception if it did not succeed; TimeoutError after *timeout* s."""
        await self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._value

    async def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the task's end raises (None if it succeeded), once it ends."""
        await self._wait(timeout)
        return self._exc

    def __await__(self) -> Any:
        return self.result().__await__()

    async def cancel(self) -> bool:
        """Ask the scheduler to cancel the task: True if it did (the future is then cancelled),
        False if the task had ended already."""
        if self._client is None:
            raise Unavailable("this future belongs to no client")
        return await self._client.cancel(self)

    async def release(self) -> bool:
        """Delete the stored copy of a large result now (this future keeps its value); True if there was one.

        A result too large for the task's record lives in the object store
        ``fabric_task_results`` until released -- here, when the future is garbage-collected,
        or after 24 hours.  Release it once no other client will read it (``fc.task(id)``).
        """
        ref, self._ref = self._ref, ""
        if not ref or self._client is None:
            return False
        return await self._client._release_result(self.id)

    async def _wait(self, timeout: float | None) -> None:
        if self._state != PENDING:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with _LOCK:
            if self._state != PENDING:
                return
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"task {self._id} has not ended after {timeout:g}s") from None

    def _wait_blocking(self, timeout: float | None) -> bool:
        """Block this thread until the task ends (or *timeout* s); whether it has."""
        with _LOCK:
            if self._state != PENDING:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    # -- resolution (the client's loop thread; tests may call it from theirs) ------------

    def _resolve(self, state: str, value: Any = None, exc: BaseException | None = None) -> bool:
        """End the future (once: a second end is ignored); whether this call ended it."""
        with _LOCK:
            if self._state != PENDING:
                return False
            self._value, self._exc = value, exc
            self._state = state  # last: a reader that sees the state sees the value
            callbacks, self._callbacks = self._callbacks, []
            waiters, self._waiters = self._waiters, []
            event = self._event
        if event is not None:
            event.set()
        for waiter in waiters:
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)
        for call in callbacks:
            _run_callback(call)
        return True

    def _fail(self, exc: BaseException) -> bool:
        return self._resolve(FAILED, exc=exc)

    def _finish(self, done: TaskDone) -> None:
        """Resolve from the scheduler's TaskDone: the value or exception of its end.

        A result too large for the record inline (``result_ref``) is fetched with
        ``fabric.task.get`` first: the record's ``result`` is used.  (A result the
        scheduler keeps only in its object store cannot be fetched by this client yet: that
        ends the future with a FabricError naming the reference; the client never releases
        stored results.)
        """
        if done.state not in TERMINAL:
            return
        if done.state == SUCCEEDED and done.result_ref and not done.result and self._client is not None:
            self._client._spawn(self._client._fetch_result(self, done.result_ref))
            return
        if done.state != SUCCEEDED:
            self._fail_or_cancel(done)
            return
        try:
            value = done_value(done, self.kind)
        except Exception as exc:  # noqa: BLE001 - a value this process cannot unpickle is the caller's error
            self._resolve(FAILED, exc=exc)
            return
        self._resolve(SUCCEEDED, value)

    def _fail_or_cancel(self, done: TaskDone) -> None:
        self._resolve(done.state, exc=done_exception(done, self.kind))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _run_callback(call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception:  # a callback's error must not stop the others (as concurrent.futures does)
        log.exception("a task future's done callback raised")


def _futures(futures: Iterable[Any]) -> list[AsyncTaskFuture]:
    out = []
    for f in futures:
        if not isinstance(f, TaskRef):
            raise TypeError(f"expected task futures, got {type(f).__name__}")
        out.append(f._async_future())
    return out


class TasksArea(Transport):
    """Durable tasks (the scheduler): ``submit``, ``map``, ``submit_core``, ``submit_exec`` and their futures."""

    def _init_tasks(self) -> None:
        # pending futures by id; a future leaves when it ends (futures hold no server state)
        self._task_futures: dict[str, AsyncTaskFuture] = {}
        self._notify_subject: str | None = None
        self._notify_lock: asyncio.Lock | None = None
        self._submit_slots: asyncio.Semaphore | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def _close_tasks(self) -> None:
        """At close: the background sends stop and every pending future fails with Unavailable."""
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        pending, self._task_futures = self._task_futures, {}
        for fut in pending.values():
            fut._fail(Unavailable(f"the client closed before task {fut.id} ended"))
        # a reconnected sync client runs a new loop: asyncio's lock and semaphore bind to theirs
        self._notify_subject, self._notify_lock, self._submit_slots = None, None, None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- the notify subscription ----------------------------------------------------

    async def _task_notify(self) -> str:
        """This client's notify subject (``<inbox>.tasks``), subscribed on first use."""
        if self._notify_subject is not None:
            return self._notify_subject
        if self._notify_lock is None:
            self._notify_lock = asyncio.Lock()
        async with self._notify_lock:
            if self._notify_subject is None:
                if self.nc is None:
                    raise Unavailable("client is not connected: use 'async with' or call connect()")
                self._tasks_loop = asyncio.get_running_loop()  # where a finalizer hands releases to
                subject = self.nc.new_inbox() + ".tasks"
                await self.nc.subscribe(subject, cb=self._on_task_done)
                self._notify_subject = subject
        return self._notify_subject

    async def _on_task_done(self, msg: Any) -> None:
        data = msg.data
        try:
            codec = JSON if data[:1] == b"{" else MSGPACK  # msgpack for our msgpack submits; JSON accepted too
            batch = codec.decode(data, TaskDoneBatch)
        except FabricError as exc:
            log.warning("a malformed TaskDoneBatch on %s: %s", msg.subject, exc)
            return
        for done in batch.done:
            if done.state not in TERMINAL:
                continue
            fut = self._task_futures.pop(done.id, None)
            if fut is not None:
                fut._finish(done)

    def _after_reconnect(self) -> None:
        super()._after_reconnect()
        if self._task_futures:
            self._spawn(self._catch_up())

    async def _catch_up(self) -> None:
        """After a reconnect: the notices published while this client was away are lost; a record
        that has ended (``fabric.task.get``) resolves its future instead, a few requests at a time."""
        answered = [f for f in self._task_futures.values() if f._sent is not None and f._sent.is_set()]
        slots = asyncio.Semaphore(CATCH_UP_IN_FLIGHT)

        async def one(fut: AsyncTaskFuture) -> None:
            async with slots:
                for _ in range(CATCH_UP_TRIES):
                    if fut.done():
                        return
                    try:
                        rec = await self.task(fut.id)
                        break
                    except Unavailable:  # the scheduler is not back yet (or fails over): ask again soon
                        await asyncio.sleep(0.2)
                    except Exception as exc:  # noqa: BLE001 - this future keeps waiting for its notice
                        log.debug("catching up task %s: %r", fut.id, exc)
                        return
                else:
                    return
                if rec.state in TERMINAL and not fut.done():
                    self._forget(fut)
                    fut._finish(_record_done(rec))

        await asyncio.gather(*(one(f) for f in answered))

    # -- requests ---------------------------------------------------------------------

    async def _task_request(self, verb: str, msg: Any, reply_type: type[Any] | None,
                            timeout: float | None = None) -> Any:
        """One msgpack request to ``fabric.task.<verb>``; its decoded reply (None when *reply_type* is None)."""
        data = MSGPACK.encode(msg)
        total = timeout or self.timeout
        deadline = time.monotonic() + total
        # a scheduler that dies holding the request never answers it: ask again after ATTEMPT_S (a wait is a
        # long poll with its own hold, so it keeps the whole timeout)
        attempt_s = total if verb == subjects.Task.WAIT else min(total, ATTEMPT_S)
        pause = 0.05
        try:
            while True:
                try:
                    left = deadline - time.monotonic()
                    reply = await self.request(subjects.cluster(subjects.TASK, verb), data,
                                               {CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE},
                                               timeout=max(min(attempt_s, left), 0.001))
                    break
                except NoResponders:
                    # no scheduler is active: one is starting, or a standby takes over within about two
                    # seconds; every task request is safe to repeat (the client chose the ids)
                    if time.monotonic() + pause > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.25)
                except RequestTimedOut:
                    if time.monotonic() >= deadline - 0.001:
                        raise
        except MaxPayloadError:
            assert self.nc is not None
            raise TooLarge(f"a task request of {len(data)} bytes is above the NATS server's max payload of "
                           f"{self.nc.max_payload} bytes: pass large inputs in remote memory (a handle)") from None
        if reply_type is None:
            return None
        return MSGPACK.decode(reply.data, reply_type)

    def _slots(self) -> asyncio.Semaphore:
        if self._submit_slots is None:
            self._submit_slots = asyncio.Semaphore(SUBMITS_IN_FLIGHT)
        return self._submit_slots

    def _register(self, fut: AsyncTaskFuture) -> None:
        fut._sent = asyncio.Event()
        self._task_futures[fut.id] = fut

    def _forget(self, fut: AsyncTaskFuture) -> None:
        """*fut* no longer waits for a notice (another future of the same task may)."""
        if self._task_futures.get(fut.id) is fut:
            del self._task_futures[fut.id]

    async def _send_submit(self, req: SubmitRequest, fut: AsyncTaskFuture, deps: list[AsyncTaskFuture]) -> None:
        slots = self._slots()
        try:
            # a dependency's submit goes first: the scheduler must know the id this task waits for
            for dep in deps:
                if dep._sent is not None:
                    await dep._sent.wait()
            reply: SubmitReply = await self._task_request(subjects.Task.SUBMIT, req, SubmitReply)
        except Exception as exc:  # noqa: BLE001 - a refused submit is the future's exception
            self._forget(fut)
            fut._refused = exc
            fut._fail(exc)
            return
        finally:
            slots.release()
            if fut._sent is not None:
                fut._sent.set()
        if reply.existing or reply.id != fut.id:
            # the key (or id) named a task that exists: it notifies whoever submitted it first (maybe
            # another future of this client, which keeps its notice): this one follows it with wait
            self._forget(fut)
            fut._id = reply.id
            self._spawn(self._follow(fut))

    async def _follow(self, fut: AsyncTaskFuture) -> None:
        """Resolve *fut* from ``fabric.task.wait`` (for a task that does not notify this client)."""
        while not fut.done():
            try:
                rec: TaskRecord = await self._task_request(subjects.Task.WAIT, WaitRequest(id=fut.id,
                                                           timeout_s=_FOLLOW_WAIT_S), TaskRecord,
                                                           timeout=_FOLLOW_WAIT_S + self.timeout)
            except Unavailable:  # a scheduler failover or a slow answer: ask again
                await asyncio.sleep(0.2)
                continue
            except Exception as exc:  # noqa: BLE001 - the task is gone (404) or the request is refused
                fut._fail(exc)
                return
            if rec.state in TERMINAL:
                fut._finish(_record_done(rec))

    async def _fetch_result(self, fut: AsyncTaskFuture, ref: str = "") -> None:
        """A succeeded task whose result is not inline in its TaskDone: the stored object *ref* (from the
        record when the notice did not name one)."""
        try:
            if not ref:
                rec = await self.task(fut.id)
                if not rec.result_ref:
                    fut._finish(TaskDone(id=rec.id, state=rec.state, result=rec.result, exit_code=rec.exit_code,
                                         error=rec.error))
                    return
                ref = rec.result_ref
            data = await self._read_result(fut.id)
        except Exception as exc:  # noqa: BLE001 - the future carries it
            fut._fail(exc)
            return
        fut._ref = ref
        weakref.finalize(fut, self._release_later, fut.id)
        fut._finish(TaskDone(id=fut.id, state=SUCCEEDED, result=data))

    async def _read_result(self, task_id: str) -> bytes:
        """A stored (large) result, read through the scheduler in pieces that fit a reply (``fabric.task.result``:
        a client has no JetStream rights of its own, docs/security.md)."""
        first: ResultChunk = await self._task_request(subjects.Task.RESULT, ResultRequest(id=task_id), ResultChunk)
        if len(first.data) >= first.size:
            return first.data
        out = bytearray(first.size)
        out[:len(first.data)] = first.data
        got = len(first.data)
        while got < first.size:
            piece: ResultChunk = await self._task_request(subjects.Task.RESULT,
                                                          ResultRequest(id=task_id, offset=got), ResultChunk)
            if not piece.data:
                raise NotFound(f"the stored result of task {task_id} changed while it was read")
            out[got:got + len(piece.data)] = piece.data
            got += len(piece.data)
        return bytes(out)

    async def _release_result(self, task_id: str) -> bool:
        """Delete task *task_id*'s stored result, through the scheduler (``fabric.task.release``)."""
        if self.nc is None or self.nc.is_closed:
            return False
        try:
            reply: ReleaseReply = await self._task_request(subjects.Task.RELEASE, TaskRequest(id=task_id),
                                                           ReleaseReply)
        except Exception:  # noqa: BLE001 - gone already, or no scheduler now: the 24 h TTL releases it
            return False
        return reply.released

    def _release_later(self, task_id: str) -> None:
        """A future holding a stored result was garbage-collected: delete the object (best effort)."""
        loop = getattr(self, "_tasks_loop", None)
        if loop is not None and loop.is_running() and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: self._spawn(self._release_result(task_id)))
            except RuntimeError:  # the loop closed meanwhile: the TTL releases it
                pass

    async def _submit_request(self, req: SubmitRequest, kind: str, deps: Sequence[AsyncTaskFuture] = (),
                              fut: AsyncTaskFuture | None = None) -> AsyncTaskFuture:
        req.notify = await self._task_notify()
        if fut is None:
            fut = AsyncTaskFuture(self, req.id, kind)
        await self._slots().acquire()  # back pressure: at most SUBMITS_IN_FLIGHT unanswered submits
        self._register(fut)
        self._spawn(self._send_submit(req, fut, list(deps)))
        if req.resources is not None and fut._sent is not None:
            # a task that names resources may be one no node could ever run: the scheduler says so
            # (422) within a round trip, and the submit raises it here rather than from result()
            await fut._sent.wait()
            if fut._refused is not None:
                raise fut._refused
        return fut

    @staticmethod
    def _options(resources: Resources | None, priority: int, retries: int, retry_exceptions: bool,
                 timeout: float | None) -> dict[str, Any]:
        return {"resources": resources, "priority": priority, "retries": retries,
                "retry_exceptions": retry_exceptions, "timeout_s": float(timeout or 0.0)}

    async def submit(self, fn: Callable[..., Any], /, *args: Any, resources: Resources | None = None,
                     priority: int = 5, retries: int = 3, retry_exceptions: bool = False,
                     timeout: float | None = None, key: str = "", **kwargs: Any) -> AsyncTaskFuture:
        """Run ``fn(*args, **kwargs)`` as a durable task on the fabric; its future, at once.

        *resources* (``fabric.Resources(cpus=2, mem="4GiB", gpus=0.5)``) picks a node that has
        them; *priority* 1..10 (10 first); *retries* system failures (crash, node loss,
        timeout) are retried, also the function's own exceptions with ``retry_exceptions``;
        *timeout* bounds one attempt (seconds); a second submit with the same *key* returns
        the same task.  A future (of this client) anywhere in the arguments is a dependency:
        the task runs after it succeeded, with its value in its place, and fails if it did not.
        These option names are taken: pass a function keyword of the same name with
        ``functools.partial``.  A refused submit (bad input 400, too large 413, infeasible
        resources 422, no scheduler 503) raises from the future's result -- and, when the task
        names *resources*, from this call already: it waits for the scheduler's answer, so a
        task no node could ever run raises :class:`~fabric.errors.Infeasible` at once.
        """
        req, deps = self._python_request(fn, args, kwargs, resources, priority, retries, retry_exceptions, timeout,
                                         key)
        return await self._submit_request(req, PYTHON, deps)

    def _python_request(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                        resources: Resources | None, priority: int, retries: int, retry_exceptions: bool,
                        timeout: float | None, key: str) -> tuple[SubmitRequest, list[AsyncTaskFuture]]:
        """The submit request of a python call and the futures it depends on (no loop needed: any thread)."""
        call, deps = pickle_call(args, kwargs)
        payload = encode_python_task(cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL), call)
        req = SubmitRequest(kind=PYTHON, id=new_task_id(), payload=payload, key=key, deps=list(deps),
                            signature=self._sign(python_message(payload)),
                            **self._options(resources, priority, retries, retry_exceptions, timeout))
        return req, [ref._async_future() for ref in deps.values()]

    def _launch(self, req: SubmitRequest, fut: AsyncTaskFuture, deps: list[AsyncTaskFuture]) -> None:
        """Submit *req* for *fut*, a future made in another thread (the sync client's submit): runs in the loop."""
        async def go() -> None:
            try:
                req.notify = await self._task_notify()
                await self._slots().acquire()
                self._register(fut)
            except Exception as exc:  # noqa: BLE001 - not connected, closed: the future carries it
                fut._fail(exc)
                return
            # sent from this very task, not one more: a request the caller makes after this submit
            # (fc.task(id)) reaches the scheduler after it, as it would have from the async client
            await self._send_submit(req, fut, deps)

        self._spawn(go())

    async def submit_core(self, core: str, data: Any, *, resources: Resources | None = None, priority: int = 5,
                          retries: int = 3, timeout: float | None = None, key: str = "") -> AsyncTaskFuture:
        """One job of the compute core named *core* as a task (kind ``core``): its future, whose value is
        the job's output bytes.  The task runs on a node where a pool of that name is live."""
        req = SubmitRequest(kind=CORE, id=new_task_id(), core=core, payload=bytes(data), key=key,
                            **self._options(resources, priority, retries, False, timeout))
        return await self._submit_request(req, CORE)

    async def submit_exec(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                          stdin: bytes | None = None, limits: Limits | None = None, sandbox: Sandbox | None = None,
                          resources: Resources | None = None, priority: int = 5, retries: int = 3,
                          timeout: float | None = None, key: str = "") -> AsyncTaskFuture:
        """Run a process as a task (kind ``exec``, as ``rspawn`` takes it): its future.

        The value is an :class:`ExecResult` (``exit_code`` 0, ``output`` = the stdout tail);
        a nonzero exit raises :class:`~fabric.errors.TaskFailed` with ``exit_code`` and ``output``.
        """
        spec = ExecSpec(argv=list(argv), env=env, cwd=cwd, stdin=stdin, limits=limits, sandbox=sandbox)
        req = SubmitRequest(kind=EXEC, id=new_task_id(), exec=spec, key=key,
                            **self._options(resources, priority, retries, False, timeout))
        return await self._submit_request(req, EXEC)

    async def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], resources: Resources | None = None,
                  priority: int = 5, retries: int = 3, retry_exceptions: bool = False, timeout: float | None = None,
                  batch_size: int = MAP_BATCH_SIZE, in_flight: int = MAP_IN_FLIGHT) -> list[AsyncTaskFuture]:
        """``fn(*items)`` for each tuple of items of *iterables* (as the builtin ``map``), one task each;
        their futures, in order.

        The function is pickled once; the calls travel *batch_size* to a ``MapRequest`` (fewer
        when the body would pass what the scheduler takes: the server's max payload less 64 KiB;
        a single call above that is refused, 413), *in_flight* requests at a time; this
        returns once the last batch is sent (not answered).  A refused batch fails its futures
        with the error.  Options as in :meth:`submit`.
        """
        if batch_size < 1 or in_flight < 1:
            from ..errors import BadRequest

            raise BadRequest("batch_size and in_flight must be at least 1")
        fn_bytes = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
        notify = await self._task_notify()
        options = self._options(resources, priority, retries, retry_exceptions, timeout)
        budget = self.max_payload - BODY_HEADROOM - FRAME_OVERHEAD - len(fn_bytes)
        slots = asyncio.Semaphore(in_flight)
        futures: list[AsyncTaskFuture] = []
        batch: list[bytes] = []
        batch_deps: dict[str, AsyncTaskFuture] = {}
        size = 0

        async def flush() -> None:
            nonlocal batch, batch_deps, size
            prefix = new_map_prefix()
            futs = [AsyncTaskFuture(self, f"{prefix}-{i}", PYTHON) for i in range(len(batch))]
            req = MapRequest(fn=fn_bytes, calls=batch, prefix=prefix, deps=list(batch_deps), notify=notify,
                             signature=self._sign(map_message(fn_bytes, batch)),
                             **options)
            deps = list(batch_deps.values())
            batch, batch_deps, size = [], {}, 0
            await slots.acquire()
            for f in futs:
                self._register(f)
            futures.extend(futs)
            self._spawn(self._send_map(req, futs, deps, slots))

        for items in zip(*iterables, strict=False):  # as the builtin map: the shortest ends it
            call, deps = pickle_call(items, {})
            for task_id, ref in deps.items():
                batch_deps.setdefault(task_id, ref._async_future())
            if batch and (len(batch) >= batch_size or size + len(call) + 16 > budget):
                await flush()
            batch.append(call)
            size += len(call) + 16  # msgpack bin header and list slot, generously
        if batch:
            await flush()
        return futures

    async def _send_map(self, req: MapRequest, futs: list[AsyncTaskFuture], deps: list[AsyncTaskFuture],
                        slots: asyncio.Semaphore) -> None:
        try:
            for dep in deps:
                if dep._sent is not None:
                    await dep._sent.wait()
            reply: MapReply = await self._task_request(subjects.Task.MAP, req, MapReply)
            if reply.prefix != req.prefix or reply.count != len(futs):
                raise FabricError(f"the scheduler answered a map of {len(futs)} calls with prefix {req.prefix!r} "
                                  f"by {reply.count} tasks with prefix {reply.prefix!r}")
        except Exception as exc:  # noqa: BLE001 - a refused batch is its futures' exception
            for f in futs:
                self._forget(f)
                f._fail(exc)
        finally:
            slots.release()
            for f in futs:
                if f._sent is not None:
                    f._sent.set()

    # -- one task by id ---------------------------------------------------------------

    async def task(self, task_id: str) -> TaskRecord:
        """The scheduler's record of a task (``fabric.task.get``): state, attempts, result, error."""
        rec: TaskRecord = await self._task_request(subjects.Task.GET, TaskRequest(id=task_id), TaskRecord)
        return rec

    async def cancel(self, task: AsyncTaskFuture | str) -> bool:
        """Cancel a task (a future or an id): True if the scheduler cancelled it (its future is then
        cancelled), False if it had ended already (409)."""
        from ..errors import Conflict

        fut = task._async_future() if isinstance(task, TaskRef) else self._task_futures.get(task)
        if fut is not None:
            if fut.done():
                return False
            if fut._sent is not None:
                await fut._sent.wait()  # the scheduler must know the task first
            if fut.done():  # its submit was refused, or it ended meanwhile
                return False
        task_id = fut.id if fut is not None else str(task)
        try:
            await self._task_request(subjects.Task.CANCEL, TaskRequest(id=task_id), None)
        except Conflict:
            return False
        if fut is not None:
            self._forget(fut)
            fut._resolve(CANCELLED, exc=TaskCancelled(f"task {task_id} was cancelled", task=task_id))
        return True

    async def gather(self, futures: Iterable[AsyncTaskFuture], *, return_exceptions: bool = False) -> list[Any]:
        """The values of *futures*, in order, once all ended; the first exception (in order) raises,
        or with ``return_exceptions=True`` stands in the list in its place."""
        futs = _futures(futures)
        out: list[Any] = []
        for f in futs:
            await f._wait(None)
        for f in futs:
            if f._exc is not None and not return_exceptions:
                raise f._exc
            out.append(f._exc if f._exc is not None else f._value)
        return out

    def progress(self, futures: Iterable[AsyncTaskFuture], *, description: str = "tasks",
                 console: Console | None = None, transient: bool = False) -> TaskProgress:
        """A Rich progress bar over *futures*: ``with fc.progress(fs) as bar: ...`` (``bar.completed``,
        ``bar.failed``).  A plain context manager in both clients: it never waits on the loop."""
        from .futures import TaskProgress

        return TaskProgress(futures, description=description, console=console, transient=transient)

