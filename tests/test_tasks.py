"""The task layer end to end (issue 14): a real JetStream nats-server, the real scheduler, spawners, gpu-monitors.

One fabric per module, in this process: a scheduler and three nodes -- ``main`` (the
machine's defaults), ``lab`` (labels ``zone=blue``, custom resource ``licence=1``, two
slots) and ``prio`` (one slot, no prefetch: the priority test's node).  The work
stealing test adds two nodes of its own.  Tasks are submitted through the Python
client (``FabricClient`` in a thread, ``AsyncFabricClient`` on the loop), or as raw
JSON over NATS as a client in another language sends them (docs/protocol.md "Tasks").
What happened is read back from the records (``fabric.task.get``/``wait``/``list``:
attempts with node, worker, start and end) and the events feed, never from timings.
"""

from __future__ import annotations

import asyncio
import base64
import platform
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fabric import AsyncFabricClient, FabricClient, Resources, as_completed
from fabric.errors import NotFound, TaskFailed
from fabric.protocol.cores import pool_key
from fabric.schema import JSON
from fabric.schema.tasks import TERMINAL, TRANSITIONS, TaskEventBatch, TaskRecord
from tests._nats import NatsServer, connect
from tests._tasks import Node, ask, ended, start_node, start_scheduler


def square(x: int) -> int:
    return x * x


def boom(x: int) -> int:
    raise ValueError(f"bad {x}")


def nap(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


class Fabric:
    def __init__(self, url: str, scheduler: Any, nodes: dict[str, Node]) -> None:
        self.url = url
        self.scheduler = scheduler
        self.nodes = nodes


@pytest.fixture(scope="module")
async def fab(js_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fabric]:
    state = tmp_path_factory.mktemp("tasks")
    sched = await start_scheduler(js_server.url, state)
    nodes: dict[str, Node] = {}
    try:
        nodes["main"] = await start_node(js_server.url, state, name="main")
        nodes["lab"] = await start_node(js_server.url, state, name="lab", slots=2, labels={"zone": "blue"},
                                        resources={"licence": 1})
        # every node registered with the scheduler before the first submit
        deadline = time.monotonic() + 30
        while {n.name for n in sched.nodes.live()} < set(nodes):
            assert time.monotonic() < deadline, "nodes never registered"
            await asyncio.sleep(0.05)
        yield Fabric(js_server.url, sched, nodes)
    finally:
        for node in nodes.values():
            await node.stop()
        await sched.stop()


@pytest.fixture
async def raw(fab: Fabric) -> AsyncIterator[Any]:
    conn = await connect(fab.url)
    yield conn
    await conn.close()


@pytest.fixture
async def afc(fab: Fabric) -> AsyncIterator[AsyncFabricClient]:
    async with AsyncFabricClient(fab.url, local=False) as client:
        yield client


def _overlaps(attempts: list[tuple[int, int]]) -> int:
    """The most intervals (start_ms, end_ms) that hold one instant (touching ends do not overlap)."""
    marks = sorted([(s, 1) for s, _ in attempts] + [(e, -1) for _, e in attempts], key=lambda m: (m[0], m[1]))
    most = cur = 0
    for _, step in marks:
        cur += step
        most = max(most, cur)
    return most


# -- the python client ---------------------------------------------------------------------------------------------


def _sync_session(url: str) -> dict[str, Any]:
    """Runs in a thread: the blocking client, as a script uses it."""
    out: dict[str, Any] = {}
    with FabricClient(url, local=False, timeout=30) as fc:
        f = fc.submit(square, 7)
        out["value"] = f.result(timeout=60)
        out["rec"] = fc.task(f.id)
        try:
            fc.submit(boom, 5).result(timeout=60)
        except ValueError as exc:
            out["exc"] = exc
        fs = fc.map(square, range(2000))
        seen = [g.id for g in as_completed(fs, timeout=120)]
        out["ids"] = (seen, [g.id for g in fs])
        out["values"] = [g.result() for g in fs]
    return out


async def test_submit_result_exception_and_a_map_of_2000_through_the_blocking_client(fab: Fabric) -> None:
    out = await asyncio.to_thread(_sync_session, fab.url)
    assert out["value"] == 49
    rec: TaskRecord = out["rec"]
    assert rec.state == "succeeded" and rec.kind == "python" and len(rec.attempts) == 1
    assert rec.exit_code is None  # a python task has none (docs/protocol.md, TaskRecord)
    att = rec.attempts[0]
    assert att.outcome == "succeeded" and att.node in fab.nodes and att.worker
    assert 0 < att.start_ms <= att.end_ms and rec.finished_ms >= att.end_ms
    exc = out["exc"]
    assert isinstance(exc, ValueError) and str(exc) == "bad 5"  # its own type, from the worker
    assert exc.__notes__[0].startswith("remote traceback:") and "in boom" in exc.__notes__[0]
    seen, ids = out["ids"]
    assert len(seen) == 2000 and sorted(seen) == sorted(ids)  # each yielded once
    assert out["values"] == [i * i for i in range(2000)]


async def test_futures_as_dependencies(afc: AsyncFabricClient) -> None:
    a, b = await afc.submit(square, 3), await afc.submit(square, 4)
    total = await afc.submit(lambda xs, k: sum(xs) * k, [a, b], k=a)
    assert await total.result(timeout=60) == (9 + 16) * 9
    assert (await afc.task(total.id)).deps == [a.id, b.id]

    bad = await afc.submit(boom, 1)
    after = await afc.submit(square, bad)
    with pytest.raises(TaskFailed):
        await after.result(timeout=60)
    rec = await afc.task(after.id)
    assert rec.state == "failed" and rec.error is not None and rec.error.kind == "dependency_failed"
    assert bad.id in rec.error.message and rec.attempts == []  # never ran


async def test_priority_order_on_a_busy_node(fab: Fabric, afc: AsyncFabricClient, tmp_path: Path) -> None:
    """A node with one slot and no prefetch is busy; low, high and middle priority tasks queue: high ones run first.

    The node is new (no task ran on it yet): a node that has just run short tasks prefetches up to 64 a slot
    (services/spawner/tasks.py ``prefetch_now``), so it would take the low ones while still busy.
    """
    prio = await start_node(fab.url, tmp_path, name="prio", slots=1, prefetch=0)
    try:
        await _priority_order(fab, afc)
    finally:
        await prio.stop()


async def _priority_order(fab: Fabric, afc: AsyncFabricClient) -> None:
    await _registered(fab, "prio")
    here = Resources(node="prio")
    blocker = await afc.submit(nap, 1.5, resources=here)

    async def running() -> bool:
        try:
            return (await afc.task(blocker.id)).state == "running"
        except NotFound:  # the future exists before the submit is answered
            return False

    deadline = time.monotonic() + 30
    while not await running():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # the node's one slot is taken and it prefetches nothing: these all wait in the scheduler's queue
    low = [await afc.submit(square, i, resources=here, priority=1) for i in range(4)]
    high = [await afc.submit(square, i, resources=here, priority=10) for i in range(4)]
    mid = [await afc.submit(square, i, resources=here, priority=5) for i in range(4)]
    await afc.gather([blocker, *low, *high, *mid])
    starts, ends = {}, {}
    for group, futs in (("low", low), ("high", high), ("mid", mid)):
        recs = [await afc.task(f.id) for f in futs]
        assert all(r.attempts[0].node == "prio" for r in recs)
        starts[group] = [r.attempts[0].start_ms for r in recs]
        ends[group] = [r.attempts[0].end_ms for r in recs]
    blocked_until = (await afc.task(blocker.id)).attempts[0].end_ms
    assert min(starts["high"]) >= blocked_until  # they did wait for the slot
    # handed out (start_ms: when the scheduler gave it to the node) and run (end_ms) in priority order
    for times in (starts, ends):
        assert max(times["high"]) <= min(times["mid"]) and max(times["mid"]) <= min(times["low"]), (starts, ends)


async def test_events_show_every_state_change_in_order(fab: Fabric, afc: AsyncFabricClient, raw: Any) -> None:
    events: list[Any] = []

    async def on_batch(msg: Any) -> None:
        events.extend(JSON.decode(msg.data, TaskEventBatch).events)

    sub = await raw.subscribe("fabric.task.events", cb=on_batch)
    await raw.flush()
    try:
        ok = await afc.submit(square, 2)
        bad = await afc.submit(boom, 2)
        dep = await afc.submit(square, bad)
        await afc.gather([ok, bad, dep], return_exceptions=True)
        deadline = time.monotonic() + 15
        while not {e.id for e in events if e.state in TERMINAL} >= {ok.id, bad.id, dep.id}:
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()
    for task_id, last in ((ok.id, "succeeded"), (bad.id, "failed"), (dep.id, "failed")):
        mine = [e for e in events if e.id == task_id]
        assert mine[0].prev == "" and mine[0].state == "submitted", mine
        for before, now in zip(mine, mine[1:], strict=False):
            assert now.prev == before.state and now.state in TRANSITIONS[before.state], mine
        assert mine[-1].state == last
        if task_id != dep.id:
            ran = [e for e in mine if e.state == "running"]
            assert len(ran) == 1 and ran[0].node in fab.nodes and ran[0].attempt == 1
    assert [e.state for e in events if e.id == dep.id] == ["submitted", "waiting", "failed"] or \
        [e.state for e in events if e.id == dep.id] == ["submitted", "failed"]


async def test_wait_get_and_list_over_nats(afc: AsyncFabricClient, raw: Any) -> None:
    slow = await afc.submit(nap, 0.5, "late")
    early = await ask(raw, "wait", {"id": slow.id, "timeout_s": 0})  # answered as it is now
    while early.code == 404:  # the client's future exists before its submit is answered
        early = await ask(raw, "wait", {"id": slow.id, "timeout_s": 0})
    assert early.code == 0 and early.body["state"] not in TERMINAL
    done = await ask(raw, "wait", {"id": slow.id, "timeout_s": 60})
    assert done.body["state"] == "succeeded" and done.body["id"] == slow.id
    got = await ask(raw, "get", {"id": slow.id})
    assert got.body == done.body
    listed = await ask(raw, "list", {"state": "succeeded", "limit": 10_000})
    assert slow.id in [t["id"] for t in listed.body["tasks"]]
    assert all(t["state"] == "succeeded" for t in listed.body["tasks"])
    newest = await ask(raw, "list", {"limit": 1})
    assert len(newest.body["tasks"]) == 1
    created = [t["created_ms"] for t in listed.body["tasks"]]
    assert created == sorted(created, reverse=True)


# -- placement ------------------------------------------------------------------------------------------------------


async def test_placement_by_node_labels_and_custom_resources(fab: Fabric, afc: AsyncFabricClient) -> None:
    by_node = [await afc.submit(square, i, resources=Resources(node="main")) for i in range(6)]
    by_label = [await afc.submit(square, i, resources=Resources(labels={"zone": "blue"})) for i in range(6)]
    # licence=1 on lab, whose 2 slots could run two at once: the resource is held strictly
    licensed = [await afc.submit(nap, 0.2, i, resources=Resources(custom={"licence": 1})) for i in range(4)]
    await afc.gather([*by_node, *by_label, *licensed])
    assert {(await afc.task(f.id)).attempts[0].node for f in by_node} == {"main"}
    assert {(await afc.task(f.id)).attempts[0].node for f in by_label} == {"lab"}
    recs = [await afc.task(f.id) for f in licensed]
    assert {r.attempts[0].node for r in recs} == {"lab"}
    assert _overlaps([(r.attempts[0].start_ms, r.attempts[0].end_ms) for r in recs]) == 1


async def test_infeasible_is_422_at_once_naming_what_is_missing(raw: Any, afc: AsyncFabricClient) -> None:
    for resources, named in (({"gpus": 64}, "gpus=64"), ({"labels": {"zone": "red"}}, "zone=red"),
                             ({"custom": {"licence": 2}}, "licence=2"), ({"node": "nowhere"}, "node=nowhere")):
        answer = await ask(raw, "submit", {"kind": "exec", "exec": {"argv": ["true"]}, "resources": resources})
        assert answer.code == 422 and named in answer.error, (resources, answer)
    from fabric.errors import Infeasible

    with pytest.raises(Infeasible, match="gpus=64"):  # raised by the submit itself
        await afc.submit(square, 1, resources=Resources(gpus=64))


async def test_cpus_are_accounted_per_node(fab: Fabric, afc: AsyncFabricClient, tmp_path: Path) -> None:
    """Tasks asking for all of a node's CPUs, on two new nodes of two slots each: a node holds no more of them
    at once than its CPUs plus its prefetch (1: the floor, for tasks this long) allow -- one -- though its slots
    could run two."""
    nodes = [await start_node(fab.url, tmp_path, name=name, slots=2, labels={"pool": "cpu"}) for name in ("c1", "c2")]
    try:
        await _registered(fab, "c1", "c2")
        cpus = {name: fab.scheduler.nodes.by_name[name].cpus for name in ("c1", "c2")}
        want = min(cpus.values())
        assert want >= 2, cpus  # this machine's logical CPUs, as the gpu-monitor reports them
        futs = [await afc.submit(nap, 0.2, i, resources=Resources(cpus=want, labels={"pool": "cpu"}))
                for i in range(10)]
        assert await afc.gather(futs) == list(range(10))
        per_node: dict[str, list[tuple[int, int]]] = {}
        for f in futs:
            att = (await afc.task(f.id)).attempts[0]
            per_node.setdefault(att.node, []).append((att.start_ms, att.end_ms))
        # start_ms: started on the node; end_ms: ended there.  At once: within (CPUs + prefetch) / want
        for name, spans in per_node.items():
            assert _overlaps(spans) <= int((cpus[name] + 1) // want), (name, spans)
        assert set(per_node) == {"c1", "c2"}  # the work did spread over both
    finally:
        for node in nodes:
            await node.stop()


async def _registered(fab: Fabric, *names: str) -> None:
    deadline = time.monotonic() + 30
    while not set(names) <= {n.name for n in fab.scheduler.nodes.live()}:
        assert time.monotonic() < deadline, f"nodes {names} never registered"
        await asyncio.sleep(0.05)


async def test_work_stealing_the_fast_node_does_most(fab: Fabric, tmp_path: Path, afc: AsyncFabricClient) -> None:
    """Two nodes take the same tasks: one runs four at a time, the other one; the fast one pulls most of them."""
    fast = await start_node(fab.url, tmp_path, name="fast", slots=4, labels={"pool": "ws"})
    slow = await start_node(fab.url, tmp_path, name="slow", slots=1, labels={"pool": "ws"})
    try:
        await _registered(fab, "fast", "slow")
        futs = [await afc.submit(nap, 0.1, i, resources=Resources(labels={"pool": "ws"})) for i in range(40)]
        assert await afc.gather(futs) == list(range(40))
        counts = {"fast": 0, "slow": 0}
        for f in futs:
            counts[(await afc.task(f.id)).attempts[0].node] += 1
        assert counts["fast"] >= 2 * counts["slow"], counts
    finally:
        await fast.stop()
        await slow.stop()


async def test_a_node_stopped_cleanly_is_given_no_more_tasks(fab: Fabric, tmp_path: Path,
                                                            afc: AsyncFabricClient) -> None:
    """Its gpu-monitor leaves the registry first; its spawner's last long poll may still be held by the scheduler,
    and a task handed to it would be lost (a second attempt, 3 s later)."""
    here = Resources(labels={"pool": "g"})
    stay = await start_node(fab.url, tmp_path, name="stay", slots=1, labels={"pool": "g"})
    gone = await start_node(fab.url, tmp_path, name="gone", slots=1, labels={"pool": "g"})
    try:
        await _registered(fab, "stay", "gone")
        assert await (await afc.submit(square, 2, resources=Resources(node="gone"))).result(timeout=60) == 4
        await gone.stop()  # the node is idle: its runner had a pull held at the scheduler
        # one at a time: "stay" pulls again after each, behind the pull "gone" left held
        for i in range(4):
            f = await afc.submit(square, i, resources=here)
            assert await f.result(timeout=60) == i * i
            rec = await afc.task(f.id)
            assert [a.node for a in rec.attempts] == ["stay"], rec
    finally:
        await stay.stop()


# -- UDCS and idempotency over plain NATS ----------------------------------------------------------------------------


async def test_a_udcs_body_over_plain_nats(raw: Any) -> None:
    arch = platform.machine()
    body = {"type": "NATIVE_EXEC", "args": ["echo", "hi"], "priority": 7,
            "requirements": {"min_memory_gb": 0.001, "architecture": arch}}
    answer = await ask(raw, "submit", body)
    assert answer.code == 0 and answer.body["existing"] is False, answer
    task_id = answer.body["id"]
    done = await ask(raw, "wait", {"id": task_id, "timeout_s": 60})
    rec = done.body
    assert rec["state"] == "succeeded" and rec["kind"] == "exec" and rec["exit_code"] == 0, rec
    assert base64.b64decode(rec["result"]) == b"hi\n"
    assert rec["priority"] == 7 and rec["resources"]["arch"] == arch
    assert rec["resources"]["mem"] == int(0.001 * (1 << 30))


async def test_the_same_key_or_id_is_the_same_task(raw: Any) -> None:
    key = f"exp-{time.time_ns()}"
    first = await ask(raw, "submit", {"kind": "exec", "exec": {"argv": ["echo", "one"]}, "key": key})
    again = await ask(raw, "submit", {"kind": "exec", "exec": {"argv": ["echo", "two"]}, "key": key})
    assert first.code == 0 and again.code == 0, (first, again)
    assert again.body["id"] == first.body["id"] and again.body["existing"] is True and not first.body["existing"]
    task_id = f"mine-{time.time_ns()}"
    one = await ask(raw, "submit", {"kind": "exec", "id": task_id, "exec": {"argv": ["echo", "one"]}})
    two = await ask(raw, "submit", {"kind": "exec", "id": task_id, "exec": {"argv": ["echo", "two"]}})
    assert one.body == {"id": task_id, "state": one.body["state"], "existing": False}
    assert two.body["id"] == task_id and two.body["existing"] is True
    for tid in (first.body["id"], task_id):
        rec = await ended(raw, tid)
        assert rec.state == "succeeded" and rec.result == b"one\n" and len(rec.attempts) == 1


# -- bad input ---------------------------------------------------------------------------------------------------------


async def test_bad_input_is_refused_and_the_scheduler_still_serves(raw: Any, afc: AsyncFabricClient,
                                                                   tmp_path: Path) -> None:
    exec_ = {"argv": ["true"]}
    cases: list[tuple[Any, int]] = [
        ({"kind": "rust", "exec": exec_}, 400),
        ({"type": "QUANTUM", "args": ["true"]}, 400),
        ({"kind": "python", "type": "NATIVE_EXEC", "args": ["true"]}, 400),
        ({"kind": "exec", "exec": exec_, "priority": 0}, 400),
        ({"kind": "exec", "exec": exec_, "priority": 11}, 400),
        ({"kind": "exec", "exec": exec_, "resources": {"cpus": -1}}, 400),
        ({"kind": "exec", "exec": exec_, "priority": "high"}, 400),
        ({"kind": "exec", "exec": "true"}, 400),
        ({"kind": "exec", "exec": exec_, "retries": "many"}, 400),
        ({"kind": "exec", "exec": exec_, "resources": {"labels": ["a"]}}, 400),
        ({"kind": "exec"}, 400),
        ({"kind": "core", "payload": ""}, 400),
        ({"kind": "python", "payload": base64.b64encode(b"hello, not a frame").decode()}, 400),
        ({"kind": "exec", "exec": exec_, "deps": ["no-such-task"]}, 404),
        (b"{not json", 400),
        (b"", 400),
    ]
    for body, code in cases:
        answer = await ask(raw, "submit", body)
        assert answer.code == code, (body, answer)
    for verb in ("get", "cancel", "wait"):
        answer = await ask(raw, verb, {"id": "no-such-task"})
        assert answer.code == 404, (verb, answer)
    assert (await ask(raw, "get", {"id": "a/b"})).code == 400
    assert (await ask(raw, "map", {"fn": "", "calls": []})).code == 400

    finished = await ask(raw, "submit", {"kind": "exec", "exec": {"argv": ["true"]}})
    await ended(raw, finished.body["id"])
    assert (await ask(raw, "cancel", {"id": finished.body["id"]})).code == 409

    # a function the worker cannot unpickle: its module exists only in this process
    (tmp_path / "only_here_mod.py").write_text(textwrap.dedent("""
        def triple(x):
            return 3 * x
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here_mod  # type: ignore[import-not-found]

        f = await afc.submit(only_here_mod.triple, 2)
        with pytest.raises((TaskFailed, ModuleNotFoundError)) as info:
            await f.result(timeout=60)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here_mod", None)
    assert "only_here_mod" in str(info.value)
    rec = await afc.task(f.id)
    assert rec.state == "failed" and len(rec.attempts) == 1 and rec.attempts[0].outcome == "error", rec
    assert rec.error is not None and "only_here_mod" in rec.error.message

    assert await (await afc.submit(square, 11)).result(timeout=60) == 121
    answer = await ask(raw, "submit", {"kind": "exec", "exec": {"argv": ["echo", "still"]}})
    assert (await ended(raw, answer.body["id"])).result == b"still\n"



async def test_a_node_runs_big_tasks_one_at_a_time_even_with_a_deep_prefetch(fab: Fabric, afc: AsyncFabricClient,
                                                                             tmp_path: Path) -> None:
    """A node that has just run many short tasks prefetches deeply, so the scheduler may hand it several tasks that
    each ask for all its CPUs; the node then runs them one at a time (their CPUs must fit its slots), not side by
    side in its two workers."""
    node = await start_node(fab.url, tmp_path, name="deep", slots=2, labels={"pool": "deep"})
    try:
        await _registered(fab, "deep")
        cpus = fab.scheduler.nodes.by_name["deep"].cpus
        here = Resources(labels={"pool": "deep"})
        warm = await afc.map(square, range(300), resources=here)  # short tasks: the prefetch grows
        assert await afc.gather(warm) == [i * i for i in range(300)]
        big = Resources(cpus=cpus, labels={"pool": "deep"})
        futs = [await afc.submit(nap, 0.3, i, resources=big) for i in range(4)]
        assert await afc.gather(futs) == list(range(4))
        spans = [((a := (await afc.task(f.id)).attempts[-1]).start_ms, a.end_ms) for f in futs]
        assert _overlaps(spans) == 1, spans  # start_ms: when it started on the node
    finally:
        await node.stop()


async def test_a_core_task_goes_only_where_its_core_is_loaded(fab: Fabric, afc: AsyncFabricClient,
                                                              tmp_path: Path, raw: Any) -> None:
    """Two new nodes, the echo core loaded on one: every ``core`` task runs there (a node's pulls say which cores
    it has); a core no node has loaded is 422 at submit, naming it."""
    from fabric.errors import Infeasible
    from tests._cores import TEST_CORES, build_core

    lib = build_core(TEST_CORES / "echo.c", tmp_path / "lib")
    nodes = [await start_node(fab.url, tmp_path, name=name, labels={"pool": "cores"}) for name in ("ca", "cb")]
    try:
        await _registered(fab, "ca", "cb")
        core = await afc.load_core("echo", str(lib), node="ca")
        try:
            deadline = time.monotonic() + 10  # the next pulls of both nodes say what they have
            while pool_key("tester", "echo") not in fab.scheduler.nodes.by_name["ca"].cores:  # the user's pool
                assert time.monotonic() < deadline, "node ca never reported its core"
                await asyncio.sleep(0.05)
            here = Resources(labels={"pool": "cores"})
            futs = [await afc.submit_core("echo", f"job {i}".encode(), resources=here) for i in range(12)]
            assert await afc.gather(futs) == [f"job {i}".encode() for i in range(12)]
            assert {(await afc.task(f.id)).attempts[-1].node for f in futs} == {"ca"}
            with pytest.raises(Infeasible, match="core 'no-such-core'"):
                await afc.submit_core("no-such-core", b"x", resources=here)
        finally:
            await core.unload()
    finally:
        for node in nodes:
            await node.stop()
