"""The client's task area (issue 14): futures, their errors, as_completed/wait/progress, and the wire.

Two halves.  Unit tests (no server): ``fabric.Resources`` and its sizes; a call's arguments
pickled with futures as persistent ids and read back from the FPY1 frame; the future's
state machine and its callbacks; how each end of a task (TaskDone) becomes a value or an
exception; ``as_completed``, ``wait`` and the progress bar over futures resolved by hand.

Then the client against a scheduler played by this module (:class:`PlayedScheduler`) on a
real nats-server: it answers ``fabric.task.submit``/``map``/``get``/``cancel``/``wait`` as
docs/protocol.md's task section says, runs each python task's FPY1 frame here (dependency
results substituted for their persistent ids) and publishes TaskDoneBatch messages on the
request's ``notify`` subject, at once or when the test releases them (to fix the order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import pickle
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import cloudpickle
import msgspec
import pytest
from rich.console import Console

import fabric
from fabric import AsyncFabricClient, FabricClient, Resources, TaskFuture, as_completed, wait
from fabric.client.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, TaskProgress
from fabric.client.resources import parse_size
from fabric.client.tasks import AsyncTaskFuture, ExecResult, pickle_call
from fabric.errors import (
    BadRequest,
    Infeasible,
    TaskCancelled,
    TaskDead,
    TaskFailed,
    error_headers,
)
from fabric.protocol import subjects
from fabric.protocol.permissions import user_subject
from fabric.protocol.pytasks import TASK_PERSISTENT_TAG, decode_python_task, encode_python_task
from fabric.schema import CONTENT_TYPE_HEADER, MSGPACK, MSGPACK_CONTENT_TYPE
from fabric.schema.tasks import (
    MapReply,
    MapRequest,
    SubmitReply,
    SubmitRequest,
    TaskDone,
    TaskDoneBatch,
    TaskError,
    TaskRecord,
    TaskRequest,
    WaitRequest,
)
from tests._nats import connect


def square(x: int) -> int:
    return x * x


def boom(x: int) -> int:
    raise ValueError(f"bad {x}")


class Unpicklable(Exception):
    """An exception whose pickle cannot be loaded here (its class is gone when the test reads it)."""


Unpicklable_ = Unpicklable


def _unpickled_call(call: Any, deps: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a call pickled by the client, each ``("fabric.task", id)`` replaced by ``deps[id]``."""
    class Loader(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            tag, task_id = pid
            assert tag == TASK_PERSISTENT_TAG
            return deps[task_id]

    args, kwargs = Loader(io.BytesIO(bytes(call))).load()
    return args, kwargs


def _done(state: str, **fields: Any) -> TaskDone:
    return TaskDone(id="t1", state=state, **fields)


# -- unit: Resources ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_resources_take_sizes_as_ints_or_strings() -> None:
    res = Resources(cpus=2, mem="4GiB", gpus=0.5, gpu_mem="20GiB", arch="x86_64", labels={"zone": "a"},
                    custom={"licence": 1})
    assert (res.cpus, res.mem, res.gpus, res.gpu_mem) == (2.0, 4 << 30, 0.5, 20 << 30)
    assert (res.arch, res.labels, res.custom) == ("x86_64", {"zone": "a"}, {"licence": 1.0})
    assert isinstance(res, fabric.schema.tasks.Resources)
    assert [parse_size(s) for s in ("512MB", "512MiB", "1.5G", "100", "2 kib", "1KB", 7)] == [
        512_000_000, 512 << 20, 3 << 29, 100, 2048, 1000, 7]


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["4 XB", "-1", "GiB", "", "1e3", True, -5, 1 << 63, 2.5])
def test_a_size_that_is_not_one_is_a_bad_request(bad: Any) -> None:
    with pytest.raises(BadRequest):
        parse_size(bad)


@pytest.mark.unit
def test_resources_out_of_bounds_are_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="cpus"):
        Resources(cpus=-1)
    with pytest.raises(BadRequest, match="gpus"):
        Resources(gpus=2000)


# -- unit: pickling a call, futures as dependencies ----------------------------------------------------------------


@pytest.mark.unit
def test_futures_in_the_arguments_pickle_as_persistent_ids_and_are_the_deps() -> None:
    a, b = AsyncTaskFuture(None, "dep-a"), AsyncTaskFuture(None, "dep-b")
    sync_b = TaskFuture(None, b)  # the sync face of b: the same dependency
    call, deps = pickle_call(([a, sync_b, 3], {"k": a}), {"scale": sync_b})
    assert list(deps) == ["dep-a", "dep-b"]  # in the order met, once each

    frame = encode_python_task(cloudpickle.dumps(sum), call)
    decoded = decode_python_task(frame)
    assert pickle.loads(decoded.fn) is sum and decoded.deps == {}  # the scheduler adds the results, not the client
    args, kwargs = _unpickled_call(decoded.call, {"dep-a": 10, "dep-b": 20})
    assert args == ([10, 20, 3], {"k": 10}) and kwargs == {"scale": 20}


@pytest.mark.unit
def test_a_future_does_not_pickle_outside_a_task() -> None:
    with pytest.raises(TypeError, match="only inside the arguments of a task"):
        pickle.dumps(AsyncTaskFuture(None, "x"))


# -- unit: the future's state machine ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_future_ends_once_and_runs_each_callback_once() -> None:
    afut = AsyncTaskFuture(None, "t1")
    fut = TaskFuture(None, afut)
    seen: list[tuple[str, Any]] = []
    fut.add_done_callback(lambda f: seen.append(("sync", f)))
    afut.add_done_callback(lambda f: seen.append(("async", f)))
    afut.add_done_callback(lambda f: 1 / 0)  # a failing callback stops none of the others
    afut.add_done_callback(lambda f: seen.append(("after", f)))
    assert fut.state == "pending" and not fut.done() and not fut.cancelled()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0)

    afut._finish(_done("succeeded", result=pickle.dumps(49)))
    afut._finish(_done("failed", error=TaskError(code=500, kind="task_error", message="late")))  # ignored
    assert fut.result() == 49 and fut.exception() is None and fut.state == "succeeded" and fut.done()
    assert seen == [("sync", fut), ("async", afut), ("after", afut)]
    fut.add_done_callback(lambda f: seen.append(("now", f)))  # already done: runs at once, here
    assert seen[-1] == ("now", fut)


@pytest.mark.unit
def test_result_in_another_thread_wakes_when_the_future_ends() -> None:
    afut = AsyncTaskFuture(None, "t1")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(TaskFuture(None, afut).result(timeout=60)))
    waiter.start()
    afut._finish(_done("succeeded", result=pickle.dumps("hello")))
    waiter.join(60)
    assert got == ["hello"]


@pytest.mark.unit
async def test_an_async_future_is_awaitable_and_times_out() -> None:
    afut = AsyncTaskFuture(None, "t1")
    with pytest.raises(TimeoutError):
        await afut.result(timeout=0.01)
    asyncio.get_running_loop().call_soon(afut._finish, _done("succeeded", result=pickle.dumps([1, 2])))
    assert await afut == [1, 2]
    assert await afut.exception() is None


# -- unit: how a task's end becomes a value or an exception ------------------------------------------------------


def _ended(done: TaskDone, kind: str = "python") -> TaskFuture:
    afut = AsyncTaskFuture(None, done.id, kind)
    afut._finish(done)
    return TaskFuture(None, afut)


@pytest.mark.unit
def test_values_by_kind() -> None:
    assert _ended(_done("succeeded", result=pickle.dumps({"a": 1}))).result() == {"a": 1}
    assert _ended(_done("succeeded", result=b"\x00raw"), "core").result() == b"\x00raw"
    assert _ended(_done("succeeded", result=b"\x00raw"), "opencl").result() == b"\x00raw"
    assert _ended(_done("succeeded", result=b"abc\n", exit_code=0), "exec").result() == ExecResult(0, b"abc\n")


@pytest.mark.unit
def test_a_failed_python_task_raises_its_own_exception_with_the_remote_traceback() -> None:
    try:
        boom(3)
    except ValueError as exc:
        tb, pickled = traceback.format_exc(), pickle.dumps(exc)
    fut = _ended(_done("failed", error=TaskError(code=500, kind="task_error", message="bad 3", type="ValueError",
                                                 traceback=tb, exc=pickled)))
    with pytest.raises(ValueError, match="bad 3") as info:
        fut.result()
    assert info.value.__notes__ == ["remote traceback:\n" + tb]
    assert fut.state == "failed" and isinstance(fut.exception(), ValueError)


@pytest.mark.unit
def test_a_failure_whose_exception_does_not_unpickle_is_task_failed() -> None:
    pickled = pickle.dumps(Unpicklable("gone"))
    del globals()["Unpicklable"]  # the class is not importable here now, as on a client without the task's module
    try:
        fut = _ended(_done("failed", error=TaskError(code=500, kind="task_error", message="gone",
                                                     type="Unpicklable", traceback="Traceback...", exc=pickled)))
    finally:
        globals()["Unpicklable"] = Unpicklable_
    exc = fut.exception()
    assert isinstance(exc, TaskFailed) and exc.code == 500 and exc.kind == "task_failed"
    assert (exc.task, exc.remote_type, exc.remote_traceback) == ("t1", "Unpicklable", "Traceback...")
    assert str(exc) == "Unpicklable: gone"


@pytest.mark.unit
def test_ends_other_than_success() -> None:
    proc = _ended(_done("failed", exit_code=3, result=b"out tail",
                        error=TaskError(code=500, kind="task_error", message="exit code 3")), "exec")
    exc = proc.exception()
    assert isinstance(exc, TaskFailed) and (exc.exit_code, exc.output) == (3, b"out tail")

    dead = _ended(_done("dead", error=TaskError(code=500, kind="worker_crashed", message="SIGSEGV")))
    with pytest.raises(TaskDead, match="SIGSEGV"):
        dead.result()

    cancelled = _ended(_done("cancelled"))
    assert cancelled.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.result()
    assert isinstance(cancelled.exception(), TaskCancelled) and TaskCancelled.code == 409

    unknown_value = _ended(_done("succeeded", result=b"not a pickle"))
    with pytest.raises(pickle.UnpicklingError):
        unknown_value.result()


# -- unit: many futures --------------------------------------------------------------------------------------------


def _pending(n: int) -> list[TaskFuture]:
    return [TaskFuture(None, AsyncTaskFuture(None, f"t{i}")) for i in range(n)]


def _succeed(f: TaskFuture, value: Any) -> None:
    f.aio._finish(TaskDone(id=f.id, state="succeeded", result=pickle.dumps(value)))


def _fail(f: TaskFuture) -> None:
    f.aio._finish(TaskDone(id=f.id, state="failed", error=TaskError(code=500, kind="task_error", message="x")))


@pytest.mark.unit
def test_as_completed_yields_in_the_order_futures_end() -> None:
    fs = _pending(5)
    _succeed(fs[3], 3)  # ended before the call: first
    it = as_completed(fs + [fs[0]], timeout=60)  # a duplicate is yielded once
    ender = threading.Thread(target=lambda: [_succeed(fs[i], i) for i in (4, 0, 2, 1)])
    ender.start()
    assert list(it) == [fs[3], fs[4], fs[0], fs[2], fs[1]]
    ender.join()


@pytest.mark.unit
def test_as_completed_times_out_with_futures_left() -> None:
    fs = _pending(3)
    _succeed(fs[1], 1)
    it = as_completed(fs, timeout=0)
    assert next(it) is fs[1]
    with pytest.raises(TimeoutError, match="2 of 3"):
        next(it)


@pytest.mark.unit
def test_wait_returns_when_asked() -> None:
    fs = _pending(4)
    done, not_done = wait(fs, timeout=0)
    assert done == set() and not_done == set(fs)
    _succeed(fs[0], 0)
    assert wait(fs, return_when=FIRST_COMPLETED) == ({fs[0]}, set(fs[1:]))
    assert wait(fs, timeout=0, return_when=FIRST_EXCEPTION) == ({fs[0]}, set(fs[1:]))  # no failure yet
    _fail(fs[2])
    assert wait(fs, return_when=FIRST_EXCEPTION) == ({fs[0], fs[2]}, {fs[1], fs[3]})
    ender = threading.Thread(target=lambda: (_succeed(fs[1], 1), _succeed(fs[3], 3)))
    ender.start()
    assert wait(fs, return_when=ALL_COMPLETED) == (set(fs), set())
    ender.join()
    with pytest.raises(BadRequest):
        wait(fs, return_when="SOMETIME")


@pytest.mark.unit
def test_the_progress_bar_counts_ended_and_failed_futures() -> None:
    fs = _pending(4)
    _succeed(fs[0], 0)
    out = io.StringIO()
    with TaskProgress(fs, description="squares", console=Console(file=out, width=100)) as bar:
        assert (bar.completed, bar.failed) == (1, 0)
        _fail(fs[1])
        _succeed(fs[2], 2)
        _succeed(fs[3], 3)
        assert (bar.completed, bar.failed) == (4, 1)
    assert "squares" in out.getvalue() and "4/4" in out.getvalue()


# -- the client against a scheduler played here, on a real nats-server ---------------------------------------------


class PlayedScheduler:
    """The scheduler's side of ``fabric.task.*``, played in a thread of its own with its own loop.

    Python tasks run here, at once.  With ``hold`` set, their TaskDone messages wait until
    :meth:`release` publishes them in the order given.  A submit asking for GPUs is refused
    (422 infeasible), one naming an unknown dependency too (404); a second submit with a
    known key returns the first task (``existing``).  Requests are served one at a time, in
    the order they arrive (one subscription); while ``map_gate`` is closed a map is
    answered (and its tasks exist) only once it opens, the requests after it served meanwhile.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="played-scheduler", daemon=True)
        self.records: dict[str, TaskRecord] = {}
        self.values: dict[str, Any] = {}
        self.requests: list[Any] = []
        self.keys: dict[str, str] = {}
        self.hold = False
        self.held: dict[str, tuple[str, TaskDone]] = {}  # id -> (notify, done)
        self.cond = threading.Condition()
        self.nc: Any = None
        self.lose = False  # notices are lost (never published), as while a client is disconnected
        self.map_gate = asyncio.Event()
        self.map_gate.set()

    def __enter__(self) -> PlayedScheduler:
        self.thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        # as the admin, which may take any subject: the tests' clients send the user form (fabric.u.tester.task.*)
        self.nc = await connect(self.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        verbs = {subjects.Task.SUBMIT: self._submit, subjects.Task.MAP: self._map, subjects.Task.GET: self._get,
                 subjects.Task.CANCEL: self._cancel, subjects.Task.WAIT: self._wait,
                 subjects.Task.RESULT: self._result, subjects.Task.RELEASE: self._release}

        async def serve(msg: Any) -> None:
            await verbs[msg.subject.rsplit(".", 1)[1]](msg)

        await self.nc.subscribe(subjects.cluster(subjects.TASK, "*"), cb=serve)
        await self.nc.subscribe(user_subject("*", subjects.cluster(subjects.TASK, "*")), cb=serve)

    # -- helpers for the tests

    def close_map_gate(self) -> None:
        self.loop.call_soon_threadsafe(self.map_gate.clear)

    def open_map_gate(self) -> None:
        self.loop.call_soon_threadsafe(self.map_gate.set)

    def wait_held(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.held) >= count, 60), (len(self.held), count)

    def release(self, ids: list[str]) -> None:
        """Publish the held TaskDones of *ids*, one message each, in this order."""
        async def publish() -> None:
            for task_id in ids:
                notify, done = self.held.pop(task_id)
                await self.nc.publish(notify, MSGPACK.encode(TaskDoneBatch(done=[done])))
            await self.nc.flush()
        self._call(publish())

    # -- the endpoints

    async def _reply(self, msg: Any, body: Any) -> None:
        await self.nc.publish(msg.reply, MSGPACK.encode(body), headers={CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE})

    async def _error(self, msg: Any, exc: fabric.FabricError) -> None:
        await self.nc.publish(msg.reply, b"", headers=error_headers(exc))

    async def _submit(self, msg: Any) -> None:
        assert msg.headers[CONTENT_TYPE_HEADER] == MSGPACK_CONTENT_TYPE
        req = MSGPACK.decode(msg.data, SubmitRequest)
        self.requests.append(req)
        if req.resources is not None and req.resources.gpus > 0:
            await self._error(msg, Infeasible(f"no node has {req.resources.gpus:g} GPUs"))
            return
        unknown = [d for d in req.deps if d not in self.records]
        if unknown:
            await self._error(msg, fabric.NotFound(f"unknown dependencies {unknown}"))
            return
        if req.key and req.key in self.keys:
            first = self.records[self.keys[req.key]]
            await self._reply(msg, SubmitReply(id=first.id, state=first.state, existing=True))
            return
        if req.key:
            self.keys[req.key] = req.id
        self.records[req.id] = TaskRecord(id=req.id, kind=req.kind, state="queued", deps=req.deps, key=req.key)
        await self._reply(msg, SubmitReply(id=req.id, state="queued"))
        if req.kind == "python":
            task = decode_python_task(req.payload)
            await self._run(req.id, bytes(task.fn), task.call, req.deps, req.notify)

    async def _map(self, msg: Any) -> None:
        req = MSGPACK.decode(msg.data, MapRequest)
        self.requests.append(req)
        if self.map_gate.is_set():
            await self._map_accepted(msg, req)
        else:
            self.gated = asyncio.ensure_future(self._gated_map(msg, req))

    async def _gated_map(self, msg: Any, req: MapRequest) -> None:
        await self.map_gate.wait()
        await self._map_accepted(msg, req)

    async def _map_accepted(self, msg: Any, req: MapRequest) -> None:
        await self._reply(msg, MapReply(prefix=req.prefix, count=len(req.calls)))
        for i, call in enumerate(req.calls):
            task_id = f"{req.prefix}-{i}"
            self.records[task_id] = TaskRecord(id=task_id, kind="python", state="queued", deps=req.deps)
            await self._run(task_id, req.fn, call, req.deps, req.notify)

    async def _run(self, task_id: str, fn: bytes, call: Any, deps: list[str], notify: str) -> None:
        args, kwargs = _unpickled_call(call, {d: self.values[d] for d in deps})
        try:
            value = pickle.loads(fn)(*args, **kwargs)
        except Exception as exc:
            error = TaskError(code=500, kind="task_error", message=str(exc), type=type(exc).__name__,
                              traceback=traceback.format_exc(), exc=pickle.dumps(exc))
            done = TaskDone(id=task_id, state="failed", error=error)
            self.records[task_id] = msgspec.structs.replace(self.records[task_id], state="failed", error=error)
        else:
            self.values[task_id] = value
            result = pickle.dumps(value)
            big = isinstance(value, bytes) and len(value) > 1000  # stored, as a node stores a large result
            if big:
                await self._store(f"ref-{task_id}", result)
            done = TaskDone(id=task_id, state="succeeded", result=b"" if big else result,
                            result_ref=f"ref-{task_id}" if big else "")
            self.records[task_id] = msgspec.structs.replace(
                self.records[task_id], state="succeeded", result=b"" if big else result,
                result_ref=f"ref-{task_id}" if big else "", result_size=len(result))
        if self.lose:
            return
        if self.hold:
            with self.cond:
                self.held[task_id] = (notify, done)
                self.cond.notify_all()
        else:
            await self.nc.publish(notify, MSGPACK.encode(TaskDoneBatch(done=[done])))

    async def _store(self, name: str, data: bytes) -> None:
        """Put *data* in the results object store, as the node that ran a task does with a large result."""
        from nats.js.errors import BucketNotFoundError

        from fabric.protocol.streams import RESULTS_BUCKET

        js = self.nc.jetstream()
        try:
            store = await js.object_store(RESULTS_BUCKET)
        except BucketNotFoundError:
            store = await js.create_object_store(RESULTS_BUCKET)
        await store.put(name, data)

    async def _result(self, msg: Any) -> None:
        """A stored result's bytes, as the scheduler serves them (the client has no JetStream rights)."""
        from fabric.schema.tasks import ResultChunk, ResultRequest
        from fabric.services.scheduler.results import StoredResults

        req = MSGPACK.decode(msg.data, ResultRequest)
        rec = self.records.get(req.id)
        if rec is None or not rec.result_ref:
            await self._error(msg, fabric.NotFound(f"no stored result of {req.id}"))
            return
        stored = StoredResults()
        stored.js = self.nc.jetstream()
        try:
            data = await stored.read(rec.result_ref)
        except fabric.FabricError as exc:
            await self._error(msg, exc)
            return
        await self._reply(msg, ResultChunk(data=data[req.offset:], size=len(data)))

    async def _release(self, msg: Any) -> None:
        from fabric.schema.tasks import ReleaseReply
        from fabric.services.scheduler.results import StoredResults

        req = MSGPACK.decode(msg.data, TaskRequest)
        rec = self.records.get(req.id)
        stored = StoredResults()
        stored.js = self.nc.jetstream()
        released = rec is not None and bool(rec.result_ref) and await stored.release(rec.result_ref)
        await self._reply(msg, ReleaseReply(released=released))

    async def _get(self, msg: Any) -> None:
        req = MSGPACK.decode(msg.data, TaskRequest)
        if req.id not in self.records:
            await self._error(msg, fabric.NotFound(f"no task {req.id}"))
            return
        await self._reply(msg, self.records[req.id])

    async def _wait(self, msg: Any) -> None:
        req = MSGPACK.decode(msg.data, WaitRequest)
        await self._reply(msg, self.records[req.id])

    async def _cancel(self, msg: Any) -> None:
        req = MSGPACK.decode(msg.data, TaskRequest)
        if req.id not in self.held:
            await self._error(msg, fabric.Conflict(f"task {req.id} has ended"))
            return
        notify, _ = self.held.pop(req.id)
        self.records[req.id] = msgspec.structs.replace(self.records[req.id], state="cancelled")
        await self._reply(msg, self.records[req.id])
        # as the scheduler does: the end is notified too (the client has resolved the future already)
        await self.nc.publish(notify, MSGPACK.encode(TaskDoneBatch(done=[TaskDone(id=req.id, state="cancelled")])))


@pytest.fixture
def played(nats_url: str) -> Iterator[PlayedScheduler]:
    with PlayedScheduler(nats_url) as scheduler:
        yield scheduler


@pytest.fixture
def client(nats_url: str) -> Iterator[FabricClient]:
    with FabricClient(nats_url, timeout=10) as fc:
        yield fc


def test_submit_and_result(played: PlayedScheduler, client: FabricClient) -> None:
    f = client.submit(square, 7)
    assert isinstance(f, TaskFuture) and f.result(timeout=30) == 49 and f.state == "succeeded"
    g = client.submit(pow, 2, exp=10)  # keywords reach the function
    assert g.result(timeout=30) == 1024
    first, second = played.requests
    assert first.kind == "python" and first.id == f.id and second.id == g.id and first.id != second.id
    assert first.notify == second.notify and first.notify.startswith("_INBOX.") and first.notify.endswith(".tasks")
    assert (first.priority, first.retries, first.timeout_s, first.deps) == (5, 3, 0.0, [])
    assert client.task(f.id).state == "succeeded"


def test_options_travel_and_a_refused_submit_raises_from_result(played: PlayedScheduler,
                                                                 client: FabricClient) -> None:
    ok = client.submit(square, 3, resources=Resources(cpus=2, mem="1GiB"), priority=8, retries=1,
                       retry_exceptions=True, timeout=600)
    with pytest.raises(Infeasible, match="0.5 GPUs"):  # a task naming resources: refused at submit already
        client.submit(square, 4, resources=Resources(gpus=0.5, gpu_mem="20GiB"))
    assert ok.result(timeout=30) == 9
    req = played.requests[0]
    assert (req.priority, req.retries, req.retry_exceptions, req.timeout_s) == (8, 1, True, 600.0)
    assert req.resources is not None and (req.resources.cpus, req.resources.mem) == (2.0, 1 << 30)


def test_an_exception_in_the_task_is_raised_with_its_remote_traceback(played: PlayedScheduler,
                                                                      client: FabricClient) -> None:
    f = client.submit(boom, 5)
    with pytest.raises(ValueError, match="bad 5") as info:
        f.result(timeout=30)
    assert "remote traceback:" in info.value.__notes__[0] and "in boom" in info.value.__notes__[0]


def test_map_batches_and_as_completed_follows_the_order_tasks_end(played: PlayedScheduler,
                                                                  client: FabricClient) -> None:
    played.hold = True
    fs = client.map(square, range(150), batch_size=64)
    played.wait_held(150)
    assert all(isinstance(r, MapRequest) for r in played.requests)
    assert sorted(len(r.calls) for r in played.requests) == [22, 64, 64]
    assert [f.id for f in fs] == [f"{r.prefix}-{i}" for r in played.requests for i in range(len(r.calls))]
    order = [f.id for f in reversed(fs[::2])] + [f.id for f in fs[1::2]]
    bar_out = io.StringIO()
    with client.progress(fs, console=Console(file=bar_out, width=100)) as bar:
        ended = as_completed(fs, timeout=60)
        played.release(order)
        got = list(ended)
    assert [f.id for f in got] == order
    assert [f.result() for f in fs] == [i * i for i in range(150)]
    assert (bar.completed, bar.failed) == (150, 0)
    assert client.gather(fs[:4]) == [0, 1, 4, 9]


def test_map_batches_stay_under_what_the_scheduler_takes(played: PlayedScheduler, client: FabricClient) -> None:
    """A batch is cut before its body passes the server's max payload less 64 KiB (the scheduler's 413)."""
    # two such calls fit one NATS message, not what the scheduler takes: they travel apart
    size = (client.aio.max_payload - (40 << 10)) // 2
    fs = client.map(len, [bytes(size)] * 2)
    assert [f.result(timeout=60) for f in fs] == [size] * 2
    assert [len(r.calls) for r in played.requests] == [1, 1]
    small = client.map(len, [b"x"] * 3)
    assert [f.result(timeout=60) for f in small] == [1] * 3 and len(played.requests[-1].calls) == 3
    too_big = client.submit(len, bytes(client.aio.max_payload + 1))
    with pytest.raises(fabric.TooLarge, match="max payload"):
        too_big.result(timeout=60)


def test_futures_in_the_arguments_are_dependencies(played: PlayedScheduler, client: FabricClient) -> None:
    played.close_map_gate()
    fs = client.map(square, range(5))
    total = client.submit(sum, fs[:3])
    # a request after the submit: a submit sent before the map's tasks exist would be served
    # (and refused, 404) before this one; the client holds it until the map is answered
    with pytest.raises(fabric.NotFound):
        client.task("barrier")
    played.open_map_gate()
    scaled = client.submit(lambda xs, k: [x * k for x in xs], fs[3:], k=fs[1])
    assert total.result(timeout=30) == 0 + 1 + 4
    assert scaled.result(timeout=30) == [9, 16]
    deps = {r.id: r.deps for r in played.requests if isinstance(r, SubmitRequest)}
    assert deps == {total.id: [f.id for f in fs[:3]], scaled.id: [fs[3].id, fs[4].id, fs[1].id]}


def test_cancel(played: PlayedScheduler, client: FabricClient) -> None:
    played.hold = True
    f, g = client.submit(square, 2), client.submit(square, 3)
    played.wait_held(2)
    assert f.cancel() is True
    assert f.cancelled() and f.state == "cancelled"
    with pytest.raises(TaskCancelled):
        f.result(timeout=30)
    played.release([g.id])
    assert g.result(timeout=30) == 9
    assert g.cancel() is False  # ended: nothing to cancel
    assert client.cancel(g.id) is False  # by id: the scheduler says 409


def test_a_key_returns_the_existing_task_and_a_large_result_is_fetched(played: PlayedScheduler,
                                                                       client: FabricClient) -> None:
    played.hold = True
    first = client.submit(square, 6, key="exp-42")
    again = client.submit(square, 99, key="exp-42")  # while the first is pending, in this very client
    played.wait_held(1)
    assert again.result(timeout=30) == 36 and again.id == first.id  # followed with fabric.task.wait
    assert not first.done()  # its notice is still to come, and still its own
    played.release([first.id])
    assert first.result(timeout=30) == 36
    played.hold = False
    big = client.submit(bytes, 5000)  # a TaskDone naming a stored result: read through the scheduler
    assert big.result(timeout=30) == bytes(5000)
    assert big.release() is True and big.release() is False  # deleted once; the future keeps its value
    assert big.result(timeout=1) == bytes(5000)


def test_pending_futures_fail_when_the_client_closes(played: PlayedScheduler, nats_url: str) -> None:
    played.hold = True
    with FabricClient(nats_url) as fc:
        f = fc.submit(square, 2)
        played.wait_held(1)
    with pytest.raises(fabric.Unavailable, match="closed"):
        f.result(timeout=30)


def test_a_client_closed_and_connected_again_subscribes_again(played: PlayedScheduler, nats_url: str) -> None:
    fc = FabricClient(nats_url)
    with fc:
        assert fc.submit(square, 2).result(timeout=30) == 4
    with fc:  # a new connection, a new loop: the notify subject of the first is gone with it
        assert fc.submit(square, 3).result(timeout=30) == 9
    assert played.requests[0].notify != played.requests[1].notify


def test_a_notice_lost_while_disconnected_is_caught_up_after_the_reconnect(tmp_path: Any) -> None:
    from tests._nats import start_nats

    server = start_nats(tmp_path / "nats", jetstream=False)
    try:
        with PlayedScheduler(server.url) as played, FabricClient(server.url) as fc:
            played.lose = True
            f = fc.submit(square, 12)
            assert fc.task(f.id).state == "succeeded"  # served after the submit: its notice is lost
            server.stop()
            server = start_nats(tmp_path / "nats", jetstream=False, port=server.port)  # the same port: a restart
            assert f.result(timeout=60) == 144
    finally:
        server.stop()


async def test_the_async_client(played: PlayedScheduler, nats_url: str) -> None:
    async with AsyncFabricClient(nats_url) as fc:
        f = await fc.submit(square, 9)
        assert isinstance(f, AsyncTaskFuture) and await f == 81
        fs = await fc.map(square, range(10), batch_size=3)
        assert sorted([await x for x in asyncio.as_completed(fs)]) == [i * i for i in range(10)]
        assert await fc.gather(fs) == [i * i for i in range(10)]
        bad = await fc.submit(boom, 1)
        assert await fc.gather([bad, f], return_exceptions=True) == [await bad.exception(), 81]
        assert (await fc.task(f.id)).state == "succeeded"
        seen: list[AsyncTaskFuture] = []
        loop_thread = threading.current_thread()
        g = await fc.submit(square, 4)
        threads: list[threading.Thread] = []
        g.add_done_callback(lambda x: (seen.append(x), threads.append(threading.current_thread())))
        assert await g == 16 and seen == [g] and threads == [loop_thread]


# -- the client against the real scheduler, spawner and gpu-monitor ------------------------------------------------


@pytest.fixture
async def scheduled(js_server: Any, tmp_path: Any) -> Any:
    """A one-node fabric with the real scheduler (its node registered by a gpu-monitor, run by a spawner)."""
    from tests._tasks import one_node_fabric

    async with one_node_fabric(js_server.url, tmp_path):
        yield js_server.url


async def test_the_client_against_the_real_scheduler(scheduled: str) -> None:
    async with AsyncFabricClient(scheduled) as fc:
        f = await fc.submit(square, 7)
        assert await f.result(timeout=60) == 49
        fs = await fc.map(square, range(40), batch_size=16)
        assert sorted([await x for x in asyncio.as_completed(fs)]) == sorted(i * i for i in range(40))
        assert await (await fc.submit(sum, fs[:10])).result(timeout=60) == sum(i * i for i in range(10))
        with pytest.raises(ValueError, match="bad 2") as info:
            await (await fc.submit(boom, 2)).result(timeout=60)
        assert "remote traceback:" in info.value.__notes__[0]
        with pytest.raises(Infeasible):  # at the submit, not the result
            await fc.submit(square, 1, resources=Resources(gpus=64))
        assert await (await fc.submit_exec(["sh", "-c", "echo hi"])).result(timeout=60) == ExecResult(0, b"hi\n")
        failed = await fc.submit_exec(["sh", "-c", "echo no; exit 3"])
        with pytest.raises(TaskFailed) as exit_info:
            await failed.result(timeout=60)
        assert (exit_info.value.exit_code, exit_info.value.output) == (3, b"no\n")
        first, again = await fc.submit(square, 5, key="k-1"), await fc.submit(square, 6, key="k-1")
        assert await fc.gather([first, again]) == [25, 25] and first.id == again.id
        assert (await fc.task(first.id)).state == "succeeded"
        import time

        sleeper = await fc.submit(time.sleep, 60)
        assert await sleeper.cancel() is True and sleeper.cancelled()
        assert (await fc.task(sleeper.id)).state == "cancelled"
        with pytest.raises(TaskCancelled):
            await sleeper.result(timeout=60)


@pytest.mark.unit
def test_a_minted_task_id_never_reads_as_a_command_line_option() -> None:
    """``fabric task <id>`` and ``fabric cancel <id>`` take the id as an argument: one starting with "-" was taken
    for an option (seen in CI: ``No such option: -9Wril...``)."""
    from fabric.client.tasks import new_task_id

    ids = [new_task_id() for _ in range(2000)]
    assert all(i[0].isalpha() for i in ids), [i for i in ids if not i[0].isalpha()][:3]
    assert all(len(i) <= 64 and all(c.isalnum() or c in "_-" for c in i) for i in ids)
    assert len(set(ids)) == len(ids)
