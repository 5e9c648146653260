"""The spawner's task runner (services/spawner/tasks.py) and the Python core's FPY1 frames.

Everything but the scheduler is real: a nats-server on a random port, a SpawnerService
in this process with its warm Python pool and process table.  The scheduler does not
exist yet, so each test plays it (:class:`Scheduler`): it subscribes to
``fabric.task.pull`` itself, answers the runner's PullRequests (msgpack) with the
TaskRuns it chooses, holds a pull with nothing to give up to its ``wait_ms`` as the
real one will, and keeps every request and result it saw.

The first tests are units of PythonCore (no server): they run FPY1 frames as a warm
worker would.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

from fabric.errors import InvalidFrame
from fabric.protocol import subjects
from fabric.protocol.pytasks import (
    TASK_PERSISTENT_TAG,
    check_python_task,
    decode_batch_results,
    decode_python_error,
    encode_batch,
    encode_batch_results,
    encode_python_task,
)
from fabric.schema import JSON, MSGPACK, CoreRequest
from fabric.schema.tasks import ExecSpec, PullReply, PullRequest, TaskResult, TaskRun
from fabric.service import Request, ServiceSettings
from fabric.services.spawner import SpawnerService
from fabric.services.spawner.tasks import MAX_PREFETCH_PER_SLOT, MAX_TASKS_PER_JOB
from fabric.services.spawner.worker_core import PythonCore
from tests._cores import TEST_CORES, build_core
from tests._nats import creds_for, realm, trusted_config
from tests._wait import until

# -- building frames as a client would ---------------------------------------------------


class Ref:
    """Stands for another task's result in a call (the client's future)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id


class _CallPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return (TASK_PERSISTENT_TAG, obj.task_id) if isinstance(obj, Ref) else None


def call_bytes(*args: Any, **kwargs: Any) -> bytes:
    import io

    buf = io.BytesIO()
    _CallPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((args, kwargs))
    return buf.getvalue()


def frame(fn: Callable[..., Any] | bytes, *args: Any, deps: dict[str, Any] | None = None, **kwargs: Any) -> bytes:
    fn_bytes = fn if isinstance(fn, bytes) else cloudpickle.dumps(fn)
    return encode_python_task(fn_bytes, call_bytes(*args, **kwargs),
                              [(k, pickle.dumps(v)) for k, v in (deps or {}).items()])


class Odd(Exception):
    """An exception a worker cannot pickle back (its __init__ takes two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


# -- PythonCore: units -------------------------------------------------------------------


@pytest.mark.unit
def test_python_core_runs_an_fpy1_frame() -> None:
    core = PythonCore()
    code, out = core.run(frame(lambda x, y=1: x * 10 + y, 4, y=2))
    assert (code, pickle.loads(out)) == (0, 42)


@pytest.mark.unit
def test_python_core_substitutes_dependencies() -> None:
    core = PythonCore()
    code, out = core.run(frame(lambda a, b, c: (a, b, c), Ref("t1"), [Ref("t2"), Ref("t1")], c=Ref("t2"),
                               deps={"t1": {"v": 1}, "t2": "two"}))
    assert code == 0
    a, b, c = pickle.loads(out)
    assert (a, b, c) == ({"v": 1}, ["two", {"v": 1}], "two")


@pytest.mark.unit
def test_python_core_error_is_an_fpye_frame() -> None:
    def boom(x: int) -> None:
        raise ValueError(f"bad {x}")

    code, out = PythonCore().run(frame(boom, 7))
    assert code == 1
    e = decode_python_error(out)
    assert (e.type, e.message) == ("ValueError", "bad 7")
    assert "in boom" in e.traceback and e.traceback.endswith("ValueError: bad 7\n")
    exc = pickle.loads(e.exc)
    assert isinstance(exc, ValueError) and exc.args == ("bad 7",)


@pytest.mark.unit
def test_python_core_error_that_does_not_pickle_has_no_exc() -> None:
    def odd() -> None:
        raise Odd(1, 2)

    code, out = PythonCore().run(frame(odd))
    e = decode_python_error(out)
    assert (code, e.type, e.message, e.exc) == (1, "Odd", "1-2", b"")


@pytest.mark.unit
def test_python_core_missing_dependency_and_bad_frame_are_errors() -> None:
    core = PythonCore()
    code, out = core.run(frame(lambda a: a, Ref("nope")))
    assert code == 1 and "nope" in decode_python_error(out).message
    code, out = core.run(b"FPY1\x01")
    assert code == 1 and decode_python_error(out).type == "InvalidFrame"


@pytest.mark.unit
def test_python_core_unpickles_a_function_once() -> None:
    core = PythonCore()

    def count(_state: dict[str, int] = {"n": 0}) -> int:  # noqa: B006 - the state the cache keeps
        _state["n"] += 1
        return _state["n"]

    fn = cloudpickle.dumps(count)
    assert [pickle.loads(core.run(frame(fn))[1]) for _ in range(3)] == [1, 2, 3]
    for i in range(70):  # more functions than the cache keeps: the oldest goes
        core.run(frame(lambda i=i: i))
    assert len(core.fns) == 64 and fn not in core.fns
    assert pickle.loads(core.run(frame(fn))[1]) == 1


@pytest.mark.unit
def test_python_core_still_runs_the_plain_job_format() -> None:
    code, out = PythonCore().run(cloudpickle.dumps((lambda a, b: a + b, (1, 2), {})))
    assert (code, pickle.loads(out)) == (0, 3)
    code, out = PythonCore().run(cloudpickle.dumps((lambda: 1 / 0, (), {})))
    assert code == 1 and pickle.loads(out)[0] == "ZeroDivisionError"


@pytest.mark.unit
def test_python_core_runs_a_batch_each_task_on_its_own() -> None:
    def boom() -> None:
        raise KeyError("k")

    code, out = PythonCore().run(encode_batch([frame(lambda: 1), frame(boom), frame(lambda x: x * 3, 5)]))
    assert code == 0
    outs = decode_batch_results(out)
    assert [o.code for o in outs] == [0, 1, 0]
    assert pickle.loads(outs[0].out) == 1 and pickle.loads(outs[2].out) == 15
    assert decode_python_error(outs[1].out).type == "KeyError"
    assert all(o.micros >= 0 for o in outs)
    code, out = PythonCore().run(b"FPYB\x05\x00\x00\x00")  # five frames announced, none there
    assert code == 1 and decode_python_error(out).type == "InvalidFrame"


@pytest.mark.unit
def test_the_batch_and_header_checks_refuse_malformed_frames() -> None:
    good = frame(lambda: 1)
    check_python_task(good)
    for bad in (b"", b"FPY1", b"FPYX" + good[4:], good[:4] + (len(good)).to_bytes(4, "little") + good[8:],
                good[:8] + (5000).to_bytes(4, "little") + good[12:]):
        with pytest.raises(InvalidFrame):
            check_python_task(bad)
    results = encode_batch_results([(0, 12, b"abc"), (1, 0, b"")])
    assert [(o.code, o.micros, bytes(o.out)) for o in decode_batch_results(results)] == [(0, 12, b"abc"), (1, 0, b"")]
    for bad in (results[:-1], results + b"x", results[:4] + (9).to_bytes(4, "little") + results[8:], results[:9]):
        with pytest.raises(InvalidFrame):
            decode_batch_results(bad)


# -- the runner, with a test scheduler ------------------------------------------------------


class Scheduler:
    """Plays the active scheduler for one node: hands out what the test queues, records results."""

    def __init__(self, node: str, capacity: int) -> None:
        self.node = node
        self.capacity = capacity
        self.queue: list[TaskRun] = []
        self.cancel: list[str] = []
        self.requests: list[PullRequest] = []
        #: every result received, in order (resends included)
        self.received: list[TaskResult] = []
        self.results: dict[str, TaskResult] = {}
        self.record = True
        #: tasks handed out and not yet reported, and the slots of the pulls being answered
        self.held: set[str] = set()
        self.offered = 0
        self.violations: list[str] = []
        self.prefetch_seen = 0
        self.last_prefetch = 0
        self.max_held = 0
        self._changed = asyncio.Event()
        self.sub: Any = None

    def add(self, *runs: TaskRun) -> None:
        self.queue.extend(runs)
        self._changed.set()

    async def on_msg(self, msg: Any) -> None:
        """Each pull in a task of its own: a held pull must not block the next (nats-py runs callbacks in turn)."""
        task = asyncio.get_running_loop().create_task(self.on_pull(msg))
        _detached.add(task)
        task.add_done_callback(_detached.discard)

    async def on_pull(self, msg: Any) -> None:
        req = MSGPACK.decode(msg.data, PullRequest)
        if req.node != self.node:
            return
        self.requests.append(req)
        for r in req.results:
            key = f"{r.id}/{r.attempt}"
            self.received.append(r)
            self.results.setdefault(key, r)
            self.held.discard(key)
        # the runner's room is its slots plus the prefetch it reports, which grows while tasks are short
        # (bounded: PREFETCH_WINDOW_S of work, at most MAX_PREFETCH_PER_SLOT a slot)
        if req.prefetch > SLOTS * MAX_PREFETCH_PER_SLOT:
            self.violations.append(f"prefetch {req.prefetch} above its bound")
        self.prefetch_seen = max(self.prefetch_seen, req.prefetch)
        self.last_prefetch = req.prefetch
        if len(self.held) + self.offered + req.slots > max(self.capacity, SLOTS + self.prefetch_seen):
            self.violations.append(f"held {sorted(self.held)} + offered {self.offered} + slots {req.slots}")
        self.offered += req.slots
        try:
            if req.slots and not self.queue and not self.cancel and not req.results:
                self._changed.clear()
                try:  # hold the pull while there is nothing to give, as the scheduler does
                    await asyncio.wait_for(self._changed.wait(), req.wait_ms / 1000)
                except asyncio.TimeoutError:
                    pass
            tasks, self.queue = self.queue[:req.slots], self.queue[req.slots:]
            cancel, self.cancel = self.cancel, []
            self.held.difference_update(cancel)  # a cancelled attempt no longer counts against the node
            for t in tasks:
                self.held.add(f"{t.id}/{t.attempt}")
            self.max_held = max(self.max_held, len(self.held))
            recorded = [f"{r.id}/{r.attempt}" for r in req.results] if self.record else []
        finally:
            self.offered -= req.slots
        await msg.respond(MSGPACK.encode(PullReply(tasks=tasks, recorded=recorded, cancel=cancel)))

    async def result(self, task_id: str, within: float = 20.0) -> TaskResult:
        got = await until(lambda: _ready(self.results.get(f"{task_id}/1")), within)
        assert got is not None, f"no result for {task_id} within {within}s; requests: {len(self.requests)}"
        return got


_detached: set[asyncio.Task[None]] = set()


async def _ready(v: Any) -> Any:
    return v


def py(fn: Callable[..., Any] | bytes, *args: Any, timeout_s: float = 0.0, deps: dict[str, Any] | None = None,
       **kwargs: Any) -> TaskRun:
    return TaskRun(id=f"t{secrets.token_hex(4)}", attempt=1, kind="python",
                   payload=frame(fn, *args, deps=deps, **kwargs), timeout_s=timeout_s)


SLOTS = 1
PREFETCH = 1


@pytest.fixture(scope="module")
async def node(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SpawnerService]:
    """A spawner of this module's own: one task slot and one prefetched task (the counts the tests check)."""
    state: Path = tmp_path_factory.mktemp("runner-state")
    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                         nats_url=nats_url, node=f"tr-{secrets.token_hex(3)}", state_dir=state),
                         task_slots=SLOTS, task_prefetch=PREFETCH)
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def sched(nc: Any, node: SpawnerService) -> AsyncIterator[Scheduler]:
    s = Scheduler(node.node, SLOTS + PREFETCH)
    s.sub = await nc.subscribe(subjects.cluster(subjects.TASK, subjects.Task.PULL),
                               cb=s.on_msg)
    await nc.flush()
    yield s
    if s.sub is not None:
        await s.sub.unsubscribe()
    # answer the pulls still held, so the runner's offered slots come back before the next test
    s._changed.set()
    if _detached:
        await asyncio.gather(*list(_detached))
    # nothing of a test may still run on the node when the next one starts
    assert await until(lambda: _ready(not node.runner.running), 20), f"still running: {list(node.runner.running)}"
    assert not s.violations, s.violations


def _sleep(s: float) -> Callable[[], int]:
    def f() -> int:
        import time

        time.sleep(s)
        return os.getpid()

    return f


async def test_a_python_task_round_trips(sched: Scheduler) -> None:
    t = py(lambda a, b=0: {"sum": a + b}, 40, b=2)
    sched.add(t)
    r = await sched.result(t.id)
    assert (r.outcome, r.exit_code, pickle.loads(r.output)) == ("ok", 0, {"sum": 42})
    assert r.start_ms <= r.end_ms and r.worker


async def test_an_exception_comes_back_as_a_task_error(sched: Scheduler) -> None:
    def boom() -> None:
        raise KeyError("missing")

    t = py(boom)
    sched.add(t)
    r = await sched.result(t.id)
    assert r.outcome == "error" and r.error is not None
    assert (r.error.code, r.error.kind, r.error.type) == (500, "task_error", "KeyError")
    assert "'missing'" in r.error.message and "in boom" in r.error.traceback
    assert isinstance(pickle.loads(r.error.exc), KeyError)


async def test_dependencies_are_substituted(sched: Scheduler) -> None:
    t = py(lambda xs, k=None: sum(xs) + k, [Ref("a"), Ref("b")], k=Ref("a"), deps={"a": 1, "b": 10})
    sched.add(t)
    r = await sched.result(t.id)
    assert (r.outcome, pickle.loads(r.output)) == ("ok", 12)


async def test_a_map_reuses_its_function_in_the_worker(sched: Scheduler) -> None:
    def count(x: int, _state: dict[str, int] = {"n": 0}) -> tuple[int, int]:  # noqa: B006
        _state["n"] += 1
        return os.getpid(), _state["n"]

    fn = cloudpickle.dumps(count)
    runs = [py(fn, i) for i in range(4)]
    sched.add(*runs)
    outs = [pickle.loads((await sched.result(t.id)).output) for t in runs]
    # one worker (one slot): the function was unpickled once, so its state carried from task to task
    assert len({pid for pid, _ in outs}) == 1
    assert [n for _, n in outs] == sorted(n for _, n in outs) and outs[-1][1] - outs[0][1] == 3


async def test_slots_are_never_exceeded(sched: Scheduler) -> None:
    runs = [py(_sleep(0.2)) for _ in range(6)]
    sched.add(*runs)
    for t in runs:
        assert (await sched.result(t.id)).outcome == "ok"
    assert not sched.violations, sched.violations
    # the prefetched tasks were taken, never more than the runner said it had room for
    assert SLOTS < sched.max_held <= SLOTS + max(PREFETCH, sched.prefetch_seen)
    # and for tasks this long the prefetch is back at its floor: about PREFETCH_WINDOW_S of work
    assert sched.last_prefetch == PREFETCH


async def test_the_heartbeat_lists_a_running_task(sched: Scheduler) -> None:
    t = py(_sleep(1.5))
    sched.add(t)
    key = f"{t.id}/1"
    assert await until(lambda: _ready(any(key in r.running for r in sched.requests[-3:])), 10)
    await sched.result(t.id)
    n = len(sched.requests)
    assert await until(lambda: _ready(len(sched.requests) > n + 1), 5)
    assert key not in sched.requests[-1].running


async def test_a_crash_is_reported_and_the_pool_keeps_serving(sched: Scheduler) -> None:
    t1, t2 = py(lambda: os._exit(3)), py(lambda: os.kill(os.getpid(), signal.SIGKILL))
    sched.add(t1, t2)
    for t in (t1, t2):
        r = await sched.result(t.id)
        assert r.outcome == "crashed" and r.error is not None and r.error.kind == "worker_crashed", r
    t3 = py(lambda: "alive")
    sched.add(t3)
    assert pickle.loads((await sched.result(t3.id)).output) == "alive"


async def test_a_task_past_its_timeout_is_killed(sched: Scheduler, node: SpawnerService) -> None:
    t = py(_sleep(60), timeout_s=0.5)
    sched.add(t)
    r = await sched.result(t.id)
    assert r.outcome == "timeout" and r.error is not None and "timeout of 0.5s" in r.error.message
    t2 = py(lambda: 5)
    sched.add(t2)
    assert pickle.loads((await sched.result(t2.id)).output) == 5


async def test_an_exec_task_reports_exit_code_and_stdout(sched: Scheduler) -> None:
    ok = TaskRun(id="e-ok", attempt=1, kind="exec", gpus=[1, 3],
                 exec=ExecSpec(argv=["sh", "-c", "echo hello; echo $CUDA_VISIBLE_DEVICES"]))
    bad = TaskRun(id="e-bad", attempt=1, kind="exec",
                  exec=ExecSpec(argv=["sh", "-c", "echo out; echo err >&2; exit 3"]))
    slow = TaskRun(id="e-slow", attempt=1, kind="exec", exec=ExecSpec(argv=["sleep", "60"]), timeout_s=0.5)
    sched.add(ok, bad, slow)
    r = await sched.result("e-ok")
    assert (r.outcome, r.exit_code, r.output) == ("ok", 0, b"hello\n1,3\n")
    r = await sched.result("e-bad")
    assert (r.outcome, r.exit_code, r.output) == ("error", 3, b"out\n")
    assert r.error is not None and "code 3" in r.error.message and "err" in r.error.message
    r = await sched.result("e-slow")
    assert r.outcome == "timeout"


async def test_what_the_node_cannot_run_is_refused(sched: Scheduler) -> None:
    runs = [TaskRun(id="no-core", attempt=1, kind="core", core="no.such.core", payload=b"x"),
            TaskRun(id="bad-frame", attempt=1, kind="python", payload=b"FPY1\x00"),
            TaskRun(id="no-binary", attempt=1, kind="exec", exec=ExecSpec(argv=["/no/such/binary"])),
            TaskRun(id="odd-kind", attempt=1, kind="fortran")]
    sched.add(*runs)
    codes = {t.id: (await sched.result(t.id)) for t in runs}
    assert {k: (r.outcome, r.error.code if r.error else 0) for k, r in codes.items()} == {
        "no-core": ("refused", 404), "bad-frame": ("refused", 400), "no-binary": ("refused", 404),
        "odd-kind": ("refused", 400)}
    assert codes["bad-frame"].error is not None and codes["bad-frame"].error.kind == "invalid_frame"


async def test_a_core_task_runs_on_the_nodes_pool_of_that_name(sched: Scheduler, nats_url: str, node: SpawnerService,
                                                               build_dir: Path) -> None:
    from fabric import AsyncFabricClient

    name = f"echo-{secrets.token_hex(3)}"
    async with AsyncFabricClient(nats_url, local=False) as fc:
        core = await fc.load_core(name, build_core(TEST_CORES / "echo.c", build_dir), node=node.node)
        bad = await fc.load_core(f"{name}-nz", build_core(TEST_CORES / "nonzero.c", build_dir), node=node.node)
        try:
            # core tasks of the user who loaded the pools (a user's pools are the user's)
            sched.add(TaskRun(id="c-echo", attempt=1, kind="core", core=name, payload=b"echo me", owner="tester"),
                      TaskRun(id="c-nz", attempt=1, kind="core", core=f"{name}-nz", payload=b"x", owner="tester"))
            r = await sched.result("c-echo")
            assert (r.outcome, r.output, r.worker) == ("ok", b"echo me", core.id)
            r = await sched.result("c-nz")
            assert r.outcome == "error" and r.exit_code != 0 and r.error is not None
        finally:
            await core.unload()
            await bad.unload()


async def test_an_opencl_task_loads_the_nodes_opencl_pool(sched: Scheduler, node: SpawnerService) -> None:
    pytest.importorskip("pyopencl")
    from fabric.opencl import InArg, JobHeader, OutArg, decode_result, encode_job

    a = np.arange(4, dtype=np.float32)
    header = JobHeader(source=VADD, kernel="vadd", global_size=[4],
                       args=[InArg("<f4", [4], 0, 16), InArg("<f4", [4], 16, 16), OutArg("<f4", [4])])
    sched.add(TaskRun(id="cl-vadd", attempt=1, kind="opencl", payload=bytes(encode_job(header, [(0, a), (16, a)]))))
    r = await sched.result("cl-vadd", within=60)
    if r.outcome == "refused":  # no usable OpenCL platform here: the refusal must say why
        assert r.error is not None and r.error.kind == "core_load_failed", r
        pytest.skip(f"no OpenCL here: {r.error.message}")
    assert r.outcome == "ok", r
    head, data = decode_result(r.output)
    out = head.outputs[0]
    assert np.frombuffer(bytes(data[out.offset:out.offset + out.nbytes]), np.float32).tolist() == [0, 2, 4, 6]
    pool = node.cores.by_name.get("fabric.opencl")
    assert pool is not None and r.worker == pool.id
    await node.cores.unload(Request("unload", None, JSON.encode(CoreRequest(core=pool.id))))


VADD = """
__kernel void vadd(__global const float *a, __global const float *b, __global float *c) {
    int i = get_global_id(0);
    c[i] = a[i] + b[i];
}"""


async def test_results_are_resent_until_recorded(sched: Scheduler) -> None:
    sched.record = False
    t = py(lambda: "again")
    sched.add(t)
    await sched.result(t.id)
    assert await until(lambda: _ready(sum(r.id == t.id for r in sched.received) >= 3), 10)
    sched.record = True
    n = len(sched.requests)
    assert await until(lambda: _ready(len(sched.requests) > n + 2), 10)
    assert all(r.id != t.id for req in sched.requests[n + 1:] for r in req.results)


async def test_no_responders_keeps_the_result_for_later(sched: Scheduler, nc: Any, node: SpawnerService) -> None:
    t = py(_sleep(1.0))
    sched.add(t)
    key = f"{t.id}/1"
    assert await until(lambda: _ready(any(key in r.running for r in sched.requests)), 10)
    await sched.sub.unsubscribe()  # the scheduler goes away while the task runs
    sched.sub = None
    before = node.runner.no_responders
    assert await until(lambda: _ready(key in node.runner.results), 10)
    assert await until(lambda: _ready(node.runner.no_responders > before + 2), 10)
    assert key not in sched.results
    sched.sub = await nc.subscribe(subjects.cluster(subjects.TASK, subjects.Task.PULL),
                                   cb=sched.on_msg)
    r = await sched.result(t.id)
    assert r.outcome == "ok"
    assert await until(lambda: _ready(key not in node.runner.results), 10)


async def test_a_cancelled_task_is_stopped_and_forgotten(sched: Scheduler, node: SpawnerService) -> None:
    t = py(_sleep(60))
    e = TaskRun(id="e-cancel", attempt=1, kind="exec", exec=ExecSpec(argv=["sleep", "60"]))
    sched.add(t, e)
    keys = {f"{t.id}/1", "e-cancel/1"}
    assert await until(lambda: _ready(keys <= set(node.runner.running)), 10)
    table = node.table
    assert table is not None
    proc = next(mp for mp in table.live.values() if mp.argv == ["sleep", "60"])
    sched.cancel = sorted(keys)
    sched.add()
    assert await until(lambda: _ready(not keys & set(node.runner.running)), 10)
    assert await until(lambda: _ready(not proc.running), 10)
    t2 = py(lambda: "next")
    sched.add(t2)
    assert pickle.loads((await sched.result(t2.id)).output) == "next"
    assert t.id not in {r.id for r in sched.received} and "e-cancel" not in {r.id for r in sched.received}


async def test_the_runner_pool_is_listed_beside_a_clients_python_pool(sched: Scheduler, nats_url: str,
                                                                      node: SpawnerService) -> None:
    from fabric import AsyncFabricClient

    t = py(lambda: 1)
    sched.add(t)
    await sched.result(t.id)
    async with AsyncFabricClient(nats_url, local=False) as fc, \
            AsyncFabricClient(nats_url, local=False, credentials=realm().admin) as admin:
        core = await fc.load_core("fabric.python", b"", node=node.node, max_workers=2)
        assert not core.info.reused
        assert await core.call(lambda: 7) == 7
        # the node's pools as its operator sees them: the user's, and the runner's own beside it
        listed = {c.core: c for c in (await admin.cores(node.node)).cores}
        assert core.id in listed
        ours = [c for c in listed.values() if c.name == "fabric.python" and c.core != core.id]
        assert len(ours) == 1 and ours[0].core.startswith("t") and ours[0].max_workers == SLOTS
        # a user sees only the pools it loaded
        assert [c.core for c in (await fc.cores(node.node)).cores] == [core.id]
        await core.unload()
    t2 = py(lambda: 2)
    sched.add(t2)
    assert pickle.loads((await sched.result(t2.id)).output) == 2


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("the spawner runs on Linux", allow_module_level=True)


# -- GPU pinning (issue 14): the scheduler's TaskRun.gpus / opencl_device hold for python and opencl ----------


def _cuda_env() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _pinned_pools(node: SpawnerService) -> list[Any]:
    return [p for p in node.cores.pools.values() if "CUDA_VISIBLE_DEVICES" in p.worker_env]


async def _unload_pinned(node: SpawnerService) -> None:
    for p in _pinned_pools(node):
        await node.cores.unload(Request("unload", None, JSON.encode(CoreRequest(core=p.id))))


async def test_a_python_task_with_gpus_sees_only_them(sched: Scheduler, node: SpawnerService) -> None:
    pinned = py(_cuda_env)
    pinned.gpus = [1, 3]
    plain = py(_cuda_env)
    sched.add(pinned, plain)
    try:
        r = await sched.result(pinned.id)
        assert (r.outcome, pickle.loads(r.output)) == ("ok", "1,3"), r
        # a task without GPUs keeps the shared pool and the spawner's own environment
        r = await sched.result(plain.id)
        assert (r.outcome, pickle.loads(r.output)) == ("ok", os.environ.get("CUDA_VISIBLE_DEVICES")), r
        pools = _pinned_pools(node)
        assert [p.worker_env for p in pools] == [{"CUDA_VISIBLE_DEVICES": "1,3"}]
        assert sched.results[f"{pinned.id}/1"].worker == pools[0].id != sched.results[f"{plain.id}/1"].worker
        # the same set again: the same pool, warm
        again = py(_cuda_env)
        again.gpus = [1, 3]
        sched.add(again)
        r = await sched.result(again.id)
        assert (pickle.loads(r.output), r.worker) == ("1,3", pools[0].id)
    finally:
        await _unload_pinned(node)


async def test_gpu_sets_keep_only_a_few_pinned_pools(sched: Scheduler, node: SpawnerService) -> None:
    from fabric.services.spawner.tasks_lanes import MAX_LANES

    try:
        for i in range(MAX_LANES + 1):
            t = py(_cuda_env)
            t.gpus = [i]
            sched.add(t)
            r = await sched.result(t.id)
            assert (r.outcome, pickle.loads(r.output)) == ("ok", str(i)), r
            assert len(_pinned_pools(node)) <= MAX_LANES
        # the idle pool of an older set made room for the newest one
        assert {"CUDA_VISIBLE_DEVICES": str(MAX_LANES)} in [p.worker_env for p in _pinned_pools(node)]
    finally:
        await _unload_pinned(node)


def _vadd_job(**device: Any) -> bytes:
    from fabric.opencl import InArg, JobHeader, OutArg, encode_job

    a = np.arange(4, dtype=np.float32)
    header = JobHeader(source=VADD, kernel="vadd", global_size=[4], **device,
                       args=[InArg("<f4", [4], 0, 16), InArg("<f4", [4], 16, 16), OutArg("<f4", [4])])
    return bytes(encode_job(header, [(0, a), (16, a)]))


async def test_an_opencl_task_runs_on_the_device_it_was_given(sched: Scheduler, node: SpawnerService) -> None:
    pytest.importorskip("pyopencl")
    from fabric.opencl import decode_error, decode_result

    sched.add(TaskRun(id="cl-pin", attempt=1, kind="opencl", gpus=[0], opencl_device=f"{node.node}:cl:0:0",
                      payload=_vadd_job()))
    r = await sched.result("cl-pin", within=60)
    if r.outcome == "refused" and r.error is not None and r.error.kind == "core_load_failed":
        pytest.skip(f"no OpenCL here: {r.error.message}")
    assert r.outcome == "ok", r
    head, data = decode_result(r.output)
    assert (head.device.platform, head.device.device) == (0, 0)
    out = head.outputs[0]
    assert np.frombuffer(bytes(data[out.offset:out.offset + out.nbytes]), np.float32).tolist() == [0, 2, 4, 6]
    # a device this node lacks: the job fails there, it does not run on another device
    sched.add(TaskRun(id="cl-absent", attempt=1, kind="opencl", gpus=[0], opencl_device=f"{node.node}:cl:0:97",
                      payload=_vadd_job()))
    r = await sched.result("cl-absent", within=60)
    assert r.outcome == "error", r
    rec = decode_error(r.output)
    assert rec is not None and rec.kind == "unknown_device" and "0:97" in rec.message, r
    pool = node.cores.by_name.get("fabric.opencl")
    assert pool is not None
    await node.cores.unload(Request("unload", None, JSON.encode(CoreRequest(core=pool.id))))


async def test_an_opencl_task_that_cannot_be_pinned_is_refused(sched: Scheduler, node: SpawnerService) -> None:
    runs = {
        # GPUs given, but none has an OpenCL device paired: not run on whatever device the job prefers
        "cl-unpaired": (TaskRun(id="cl-unpaired", attempt=1, kind="opencl", gpus=[2], payload=_vadd_job()),
                        "unknown_device", "none of them has an OpenCL device"),
        "cl-elsewhere": (TaskRun(id="cl-elsewhere", attempt=1, kind="opencl", gpus=[0],
                                 opencl_device="another-node:cl:0:0", payload=_vadd_job()),
                         "unknown_device", f"is not on node {node.node}"),
        "cl-conflict": (TaskRun(id="cl-conflict", attempt=1, kind="opencl", gpus=[0],
                                opencl_device=f"{node.node}:cl:0:1", payload=_vadd_job(platform=0, device=0)),
                        "bad_request", "asks for OpenCL device 0:0"),
        "cl-badid": (TaskRun(id="cl-badid", attempt=1, kind="opencl", gpus=[0], opencl_device="gpu",
                             payload=_vadd_job()), "bad_request", "<node>:cl:<platform>:<device>"),
    }
    sched.add(*(run for run, _, _ in runs.values()))
    for task_id, (_, kind, words) in runs.items():
        r = await sched.result(task_id)
        assert r.outcome == "refused" and r.error is not None, r
        assert r.error.kind == kind and words in r.error.message, r


async def _warm_short(sched: Scheduler) -> None:
    """Run tiny tasks until the runner's estimate says tasks are short (then it batches them)."""
    runs = [py(lambda: 0) for _ in range(20)]
    sched.add(*runs)
    for t in runs:
        await sched.result(t.id)


async def test_tiny_tasks_go_to_a_worker_several_a_job(sched: Scheduler, node: SpawnerService) -> None:
    await _warm_short(sched)
    runner = node.runner
    jobs_before = runner._job_ids
    runs = [py(lambda i=i: i * i) for i in range(200)]
    sched.add(*runs)
    for i, t in enumerate(runs):
        r = await sched.result(t.id)
        assert r.outcome == "ok" and pickle.loads(r.output) == i * i, r
        assert r.start_ms <= r.end_ms, r
    jobs = runner._job_ids - jobs_before
    assert 200 / MAX_TASKS_PER_JOB <= jobs < 200, jobs  # batched, and never more than MAX_TASKS_PER_JOB a job
    assert not sched.violations, sched.violations


async def test_a_task_that_kills_its_batchs_worker_is_found_alone(sched: Scheduler, node: SpawnerService) -> None:
    """The batch's worker dies: each of its tasks runs again alone, so only the killer reports a crash."""
    await _warm_short(sched)
    runs = [py(lambda i=i: i) for i in range(30)]
    killer = py(lambda: os._exit(7))
    runs.insert(10, killer)
    sched.add(*runs)
    for t in runs:
        r = await sched.result(t.id)
        if t is killer:
            assert r.outcome == "crashed" and r.error is not None and r.error.kind == "worker_crashed", r
        else:
            assert r.outcome == "ok", r
    crashed = [r for r in sched.received if r.outcome == "crashed"]
    assert [r.id for r in crashed] == [killer.id], crashed  # reported once, by itself
