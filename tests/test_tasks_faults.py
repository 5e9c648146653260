"""The task layer under faults (issue 14, part 7): workers that die, attempts past their timeout, and SIGKILL of
the active scheduler, of a spawner and of nats-server; a fabric stopped and started again.

Everything is real: a JetStream nats-server with file storage, the scheduler, spawners and gpu-monitors.  The
worker faults use one in-process fabric for the module.  The kill -9 tests run the service they kill as a process of
its own (``python -m fabric.services.<name>``, tests/_tasks.py :class:`Procs`, which stops only the PIDs it
started) on a nats-server of the test's own.  What each test checks is read from the task records (their
attempts and outcomes), never from timings: every task acknowledged ends once, as it should.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cloudpickle
import nats
import pytest

from fabric import AsyncFabricClient
from fabric.errors import TaskDead
from fabric.protocol.pytasks import encode_python_task
from tests._nats import NatsServer, connect, start_nats
from tests._tasks import Node, Procs, ask, ended, start_node, start_scheduler


def square(x: int) -> int:
    return x * x


def nap(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def nap_square(x: int) -> int:
    time.sleep(0.3)
    return x * x


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_once(marker: str) -> str:
    """Kills its worker the first time (no marker yet), returns on the next attempt."""
    if not os.path.exists(marker):
        Path(marker).write_text("tried")
        os._exit(3)
    return "second time lucky"


def python_body(fn: Any, *args: Any, **extra: Any) -> dict[str, Any]:
    """A submit of kind python as raw JSON (the FPY1 frame in base64), as any client may send it."""
    import base64

    frame = encode_python_task(cloudpickle.dumps(fn), pickle.dumps((args, {})))
    return {"kind": "python", "payload": base64.b64encode(frame).decode(), **extra}


async def _until_running(nc: Any, task_id: str, within: float = 30.0) -> None:
    """Return once task *task_id* is running (a node has it)."""
    deadline = time.monotonic() + within
    while (await ask(nc, "get", {"id": task_id})).body["state"] != "running":
        assert time.monotonic() < deadline, f"task {task_id} never ran"
        await asyncio.sleep(0.05)


async def _wait_nodes(scheduler: Any, *names: str, logs: Any = str) -> None:
    deadline = time.monotonic() + 30
    while not set(names) <= {n.name for n in scheduler.nodes.live()}:
        assert time.monotonic() < deadline, f"nodes {names} never registered\n{logs()}"
        await asyncio.sleep(0.05)


async def _submit_until_acknowledged(nc: Any, body: dict[str, Any], within: float = 60.0,
                                     logs: Any = str) -> dict[str, Any]:
    """Submit *body* (it names its id) until a scheduler answers: the same id is the same task."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        try:
            answer = last = await ask(nc, "submit", body, timeout=5)
            if answer.code == 0:
                return dict(answer.body)
            assert answer.code == 503, answer  # no scheduler now (a failover): the only refusal allowed
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as exc:
            last = exc
        assert time.monotonic() < deadline, f"submit of {body.get('id')} never acknowledged: {last}\n{logs()}"
        await asyncio.sleep(0.1)


# -- worker faults, on an in-process fabric ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def fab(js_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    state = tmp_path_factory.mktemp("faults")
    sched = await start_scheduler(js_server.url, state)
    node: Node | None = None
    try:
        node = await start_node(js_server.url, state, name="f1", slots=2)
        await _wait_nodes(sched, "f1")
        yield js_server.url
    finally:
        if node is not None:
            await node.stop()
        await sched.stop()


async def test_a_task_that_kills_its_worker_every_time_ends_dead(fab: str) -> None:
    async with AsyncFabricClient(fab, local=False) as fc:
        f = await fc.submit(die, retries=2)
        with pytest.raises(TaskDead):
            await f.result(timeout=60)
        rec = await fc.task(f.id)
        assert rec.state == "dead" and rec.failures == 3 and rec.error is not None, rec
        assert [a.outcome for a in rec.attempts] == ["crashed"] * 3 and [a.number for a in rec.attempts] == [1, 2, 3]
        # the pool replaced its dead workers: it runs a normal task
        assert await (await fc.submit(square, 12)).result(timeout=60) == 144


async def test_a_task_that_crashes_only_once_succeeds_on_the_retry(fab: str, tmp_path: Path) -> None:
    async with AsyncFabricClient(fab, local=False) as fc:
        f = await fc.submit(die_once, str(tmp_path / "marker"))
        assert await f.result(timeout=60) == "second time lucky"
        rec = await fc.task(f.id)
        assert [a.outcome for a in rec.attempts] == ["crashed", "succeeded"] and rec.failures == 1, rec


async def test_an_attempt_past_its_timeout_is_retried_then_dead(fab: str) -> None:
    async with AsyncFabricClient(fab, local=False) as fc:
        f = await fc.submit(nap, 60, timeout=0.5, retries=1)
        with pytest.raises(TaskDead):
            await f.result(timeout=60)
        rec = await fc.task(f.id)
        assert rec.state == "dead" and [a.outcome for a in rec.attempts] == ["timeout", "timeout"], rec
        assert all(a.end_ms - a.start_ms < 30_000 for a in rec.attempts)  # killed, not slept out
        assert await (await fc.submit(square, 3)).result(timeout=60) == 9


# -- kill -9 of a service process, on a server of the test's own -------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Any:
    server = start_nats(tmp_path / "nats")
    holder = {"server": server}
    yield holder
    holder["server"].stop()


@pytest.fixture
def procs(own_server: dict[str, NatsServer], tmp_path: Path) -> Any:
    p = Procs(own_server["server"].url, tmp_path / "procs")
    yield p
    p.stop_all()


async def _active_scheduler_pid(nc: Any, procs: Procs) -> int:
    js = nc.jetstream()
    deadline = time.monotonic() + 30
    while True:
        try:
            kv = await js.key_value("fabric_scheduler")
            entry = await kv.get("active")
            if entry.value:
                return int(json.loads(entry.value)["pid"])
        except Exception:
            pass
        assert time.monotonic() < deadline, f"no scheduler became active\n{procs.logs()}"
        await asyncio.sleep(0.1)


async def test_kill_9_of_the_active_scheduler_under_load_loses_no_task(own_server: dict[str, NatsServer],
                                                                     procs: Procs, tmp_path: Path) -> None:
    url = own_server["server"].url
    schedulers = {p.pid: p for p in (procs.start("scheduler", "s1"), procs.start("scheduler", "s2"))}
    node = await start_node(url, tmp_path, name="w1", slots=2)
    nc = await connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        active = await _active_scheduler_pid(nc, procs)
        assert active in schedulers, (active, list(schedulers))
        ids = [f"load-{i}" for i in range(120)]
        acknowledged: list[str] = []
        killed = False
        for i, task_id in enumerate(ids):
            await _submit_until_acknowledged(nc, python_body(nap, 0.01, i, id=task_id), logs=procs.logs)
            acknowledged.append(task_id)
            if i == 40 and not killed:
                procs.kill9(schedulers[active])  # tasks queued, running and ended: the standby takes over
                killed = True
        assert killed and acknowledged == ids
        for i, task_id in enumerate(ids):
            rec = await ended(nc, task_id, within=90)
            assert rec.state == "succeeded" and pickle.loads(rec.result) == i, rec
            assert [a.outcome for a in rec.attempts].count("succeeded") == 1, rec
            assert rec.attempts[-1].outcome == "succeeded", rec
    finally:
        await nc.close()
        await node.stop()


async def _registered(nc: Any, node: str, within: float = 30.0) -> None:
    """Return once *node* is in the node registry (KV ``fabric_nodes``)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await (await nc.jetstream().key_value("fabric_nodes")).get(node)
            return
        except Exception:
            assert time.monotonic() < deadline, f"node {node} never registered"
            await asyncio.sleep(0.1)


def map_body(fn: Any, args: list[Any], prefix: str, **extra: Any) -> dict[str, Any]:
    """A map of kind python as raw JSON (each call pickled, base64), as any client may send it."""
    import base64

    return {"fn": base64.b64encode(cloudpickle.dumps(fn)).decode(), "prefix": prefix,
            "calls": [base64.b64encode(pickle.dumps(((a,), {}))).decode() for a in args], **extra}


async def _records_of(nc: Any, ids: list[str]) -> dict[str, Any]:
    """The KV records (decoded) that exist for *ids*, read from the bucket itself."""
    from nats.js.errors import KeyNotFoundError

    from fabric.schema import MSGPACK
    from fabric.schema.tasks import TaskRecord

    kv = await nc.jetstream().key_value("fabric_tasks")
    out: dict[str, Any] = {}
    for task_id in ids:
        try:
            entry = await kv.get(task_id)
        except KeyNotFoundError:
            continue
        out[task_id] = MSGPACK.decode(entry.value, TaskRecord)
    return out


async def test_kill_9_of_the_active_scheduler_right_after_a_map_rebuilds_its_tasks_from_the_body(
        own_server: dict[str, NatsServer], procs: Procs, tmp_path: Path) -> None:
    """A map's queued tasks have no KV record yet (services/scheduler/maps.py): only their body holds them.  The
    standby that takes over reads the bodies from the checkpoint on and runs each such task once."""
    url = own_server["server"].url
    schedulers = {p.pid: p for p in (procs.start("scheduler", "m1"), procs.start("scheduler", "m2"))}
    nc = await connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    node: Node | None = None
    try:
        active = await _active_scheduler_pid(nc, procs)
        procs.start("gpu_monitor", "m9")  # a registered node without a spawner: nothing pulls, so
        await _registered(nc, "m9")
        # every task stays queued.  An earlier map waits past LAZY_S, so its tasks have records (and the
        # checkpoint moves past its body); the next one's tasks have none when the scheduler dies
        early = [f"early-{i}" for i in range(5)]
        answer = await ask(nc, "map", map_body(square, list(range(5)), "early"))
        assert answer.code == 0, answer
        deadline = time.monotonic() + 30
        while len(await _records_of(nc, early)) < len(early):
            assert time.monotonic() < deadline, procs.logs()
            await asyncio.sleep(0.2)
        ids = [f"late-{i}" for i in range(40)]
        answer = await ask(nc, "map", map_body(square, list(range(40)), "late", priority=7, retries=1))
        assert answer.code == 0 and answer.body["count"] == 40, answer
        procs.kill9(schedulers[active])
        unrecorded = set(ids) - set(await _records_of(nc, ids))
        assert unrecorded, "every task of the map had a record when its scheduler died: nothing to rebuild"
        node = await start_node(url, tmp_path, name="m3", slots=2)
        for i, task_id in enumerate(early + ids):
            rec = await ended(nc, task_id, within=90)
            assert rec.state == "succeeded" and pickle.loads(rec.result) == (i % 5 if i < 5 else i - 5) ** 2, rec
            assert [a.outcome for a in rec.attempts] == ["succeeded"], rec  # each ran once
        late = await _records_of(nc, ids)
        assert all(r.priority == 7 and r.retries == 1 and r.body == "late" and r.body_index == i
                   for i, r in enumerate(late[t] for t in ids)), late  # rebuilt as submitted
        standby = next(p for pid, p in schedulers.items() if pid != active)
        log = procs.log(str(standby.args[6]), "scheduler")
        reads = [json.loads(line) for line in log.splitlines() if '"map bodies read"' in line]
        assert [r["rebuilt"] for r in reads] == [len(unrecorded)], log  # the ones without a record, from the body
    finally:
        await nc.close()
        if node is not None:
            await node.stop()


async def test_a_map_task_that_waits_gets_its_record_within_the_lazy_window(own_server: dict[str, NatsServer],
                                                                           procs: Procs, tmp_path: Path) -> None:
    """Queued map tasks are written once they have waited LAZY_S; the checkpoint then moves past their body."""
    from fabric.services.scheduler import maps as maps_mod

    url = own_server["server"].url
    sched = await start_scheduler(url, tmp_path)
    procs.start("gpu_monitor", "w9")  # registered, but no spawner pulls: the tasks wait
    nc = await connect(url)
    try:
        await _wait_nodes(sched, "w9", logs=procs.logs)
        ids = [f"wait-{i}" for i in range(10)]
        answer = await ask(nc, "map", map_body(square, list(range(10)), "wait"))
        assert answer.code == 0, answer
        deadline = time.monotonic() + maps_mod.LAZY_S + 20
        while len(found := await _records_of(nc, ids)) < len(ids):
            assert time.monotonic() < deadline, f"records of {sorted(found)} only"
            await asyncio.sleep(0.2)
        assert {r.state for r in found.values()} == {"queued"}, found
        kv = await nc.jetstream().key_value(maps_mod.STATE_BUCKET)
        info = await nc.jetstream().stream_info("FABRIC_TASK_BODIES")
        deadline = time.monotonic() + 10
        while await maps_mod.read_checkpoint(kv) <= info.state.last_seq:
            assert time.monotonic() < deadline, "the checkpoint never moved past the settled map's body"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
        await sched.stop()


async def test_kill_9_of_a_spawner_running_a_long_task_runs_it_again(own_server: dict[str, NatsServer],
                                                                     procs: Procs, tmp_path: Path) -> None:
    url = own_server["server"].url
    sched = await start_scheduler(url, tmp_path)
    spawner, _monitor = procs.start_node("k1")
    other: Node | None = None
    nc = await connect(url)
    try:
        await _wait_nodes(sched, "k1", logs=procs.logs)
        answer = await _submit_until_acknowledged(nc, python_body(nap, 2.0, "slept", id="long-1"))
        assert answer["id"] == "long-1"
        await _until_running(nc, "long-1")
        procs.kill9(spawner)
        other = await start_node(url, tmp_path, name="k2", slots=1)
        rec = await ended(nc, "long-1", within=60)
        assert rec.state == "succeeded" and pickle.loads(rec.result) == "slept", rec
        first, last = rec.attempts[0], rec.attempts[-1]
        assert first.node == "k1" and first.outcome == "lost" and rec.failures >= 1, rec
        assert last.outcome == "succeeded" and last.node == "k2", rec
    finally:
        await nc.close()
        if other is not None:
            await other.stop()
        await sched.stop()


async def test_a_restarted_spawner_gets_its_lost_task_back_at_once(own_server: dict[str, NatsServer],
                                                                  procs: Procs, tmp_path: Path) -> None:
    """kill -9 of a node's spawner, then a new one on the same node: the new instance's first pull tells the
    scheduler that what the old one ran is gone, and the task runs again there (not after the lost-task wait)."""
    url = own_server["server"].url
    sched = await start_scheduler(url, tmp_path)
    spawner, _monitor = procs.start_node("r1")
    nc = await connect(url)
    try:
        await _wait_nodes(sched, "r1", logs=procs.logs)
        answer = await _submit_until_acknowledged(nc, python_body(nap, 1.0, "again", id="restart-1"))
        assert answer["id"] == "restart-1"
        await _until_running(nc, "restart-1")
        procs.kill9(spawner)
        procs.start("spawner", "r1")
        rec = await ended(nc, "restart-1", within=60)
        assert rec.state == "succeeded" and pickle.loads(rec.result) == "again", rec
        first, last = rec.attempts[0], rec.attempts[-1]
        assert first.outcome == "lost" and "restarted" in first.error, rec  # told by the new instance
        assert last.outcome == "succeeded" and last.node == "r1", rec
    finally:
        await nc.close()
        await sched.stop()


async def test_kill_9_of_nats_server_with_queued_tasks(own_server: dict[str, NatsServer], tmp_path: Path) -> None:
    server = own_server["server"]
    sched = await start_scheduler(server.url, tmp_path)
    node = await start_node(server.url, tmp_path, name="q1", slots=1, prefetch=0)
    nc = await connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        await _wait_nodes(sched, "q1")
        ids = [f"q-{i}" for i in range(8)]
        for i, task_id in enumerate(ids):
            await _submit_until_acknowledged(nc, python_body(nap, 0.3, i, id=task_id))
        assert (await ask(nc, "get", {"id": ids[-1]})).body["state"] == "queued"  # one slot: they wait
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        own_server["server"] = start_nats(server.workdir, port=server.port)  # the same store, the same port
        for i, task_id in enumerate(ids):
            rec = await ended(nc, task_id, within=90)
            assert rec.state == "succeeded" and pickle.loads(rec.result) == i, rec
    finally:
        await nc.close()
        await node.stop()
        await sched.stop()


async def test_a_fabric_stopped_and_started_again_resumes_its_queued_tasks(own_server: dict[str, NatsServer],
                                                                          tmp_path: Path) -> None:
    url = own_server["server"].url
    sched = await start_scheduler(url, tmp_path, name="sched")
    node = await start_node(url, tmp_path, name="d1", slots=1, prefetch=0)
    nc = await connect(url)
    try:
        await _wait_nodes(sched, "d1")
        ids = [f"d-{i}" for i in range(6)]
        for i, task_id in enumerate(ids):
            await _submit_until_acknowledged(nc, python_body(nap, 0.5, i, id=task_id))
        await node.stop()  # fabric down: the node first (its running task is lost), then the scheduler
        await sched.stop()
        assert (await ask(nc, "get", {"id": ids[-1]})).code == 503  # nothing serves tasks now
        sched = await start_scheduler(url, tmp_path, name="sched")  # fabric up: the same store
        node = await start_node(url, tmp_path, name="d1", slots=1, prefetch=0)
        for i, task_id in enumerate(ids):
            rec = await ended(nc, task_id, within=60)
            assert rec.state == "succeeded" and pickle.loads(rec.result) == i, rec
        attempts = [len((await ask(nc, "get", {"id": t})).body["attempts"]) for t in ids]
        assert attempts[-1] == 1, attempts  # the last one waited in the queue through the restart
    finally:
        await nc.close()
        await node.stop()
        await sched.stop()


async def test_a_clean_stop_records_every_map_task_and_a_restart_resumes_them(own_server: dict[str, NatsServer],
                                                                             tmp_path: Path) -> None:
    """fabric down with a map's tasks queued (no records yet): the stopping scheduler writes them first."""
    url = own_server["server"].url
    sched = await start_scheduler(url, tmp_path, name="sched")
    node = await start_node(url, tmp_path, name="c1", slots=1, prefetch=0)
    nc = await connect(url)
    try:
        await _wait_nodes(sched, "c1")
        ids = [f"c-{i}" for i in range(6)]
        answer = await ask(nc, "map", map_body(nap_square, list(range(6)), "c"))
        assert answer.code == 0, answer
        await node.stop()
        await sched.stop()  # well within LAZY_S of the map: the stop itself gives the waiting ones records
        found = await _records_of(nc, ids)
        assert sorted(found) == ids, sorted(found)
        sched = await start_scheduler(url, tmp_path, name="sched")
        node = await start_node(url, tmp_path, name="c1", slots=1, prefetch=0)
        for i, task_id in enumerate(ids):
            rec = await ended(nc, task_id, within=60)
            assert rec.state == "succeeded" and pickle.loads(rec.result) == i * i, rec
    finally:
        await nc.close()
        await node.stop()
        await sched.stop()


async def test_a_submit_held_by_a_scheduler_that_dies_is_sent_again_to_the_next(own_server: dict[str, NatsServer],
                                                                               procs: Procs, tmp_path: Path) -> None:
    """The active scheduler takes the submit and dies before answering: the client asks again after
    ATTEMPT_S (not after its whole timeout), the standby now active answers, the task runs once."""
    from fabric.client.tasks import ATTEMPT_S

    url = own_server["server"].url
    schedulers = {p.pid: p for p in (procs.start("scheduler", "h1"), procs.start("scheduler", "h2"))}
    node = await start_node(url, tmp_path, name="h3", slots=1)
    nc = await connect(url)
    try:
        active = await _active_scheduler_pid(nc, procs)
        async with AsyncFabricClient(url, local=False, timeout=60) as fc:
            assert await (await fc.submit(square, 2)).result(timeout=60) == 4
            os.kill(active, signal.SIGSTOP)  # it still holds its subscription: the next submit goes to it
            t0 = time.monotonic()
            f = await fc.submit(square, 9)  # answered in the background
            await asyncio.sleep(0.5)
            assert not f.done()
            while await _active_scheduler_pid(nc, procs) == active:  # the standby takes the lapsed lease
                await asyncio.sleep(0.1)
            procs.kill9(schedulers[active])
            assert await f.result(timeout=60) == 81
            assert time.monotonic() - t0 < ATTEMPT_S + 20, "the held submit waited out the whole timeout"
            rec = await fc.task(f.id)
            assert [a.outcome for a in rec.attempts] == ["succeeded"], rec
    finally:
        await nc.close()
        await node.stop()
