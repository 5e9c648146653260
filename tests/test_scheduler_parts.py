"""The scheduler's pure parts, without a server: the state table, the queue, node accounting.

The service itself, on a real nats-server with real spawners, is tests/test_tasks.py.
"""

from __future__ import annotations

import itertools

import pytest

from fabric.schema import HostInfo, NodeRecord
from fabric.schema.nodes import Gpu
from fabric.schema.tasks import (
    CANCELLED,
    DEAD,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    SUBMITTED,
    SUCCEEDED,
    TERMINAL,
    TRANSITIONS,
    WAITING,
    Resources,
    TaskRecord,
)
from fabric.services.scheduler.machine import BodyGroup, IllegalTransition, Task, move
from fabric.services.scheduler.maps import MapBook
from fabric.services.scheduler.nodes import Node, unmet
from fabric.services.scheduler.queue import TaskQueue

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`


def task(task_id: str = "t1", state: str = SUBMITTED, priority: int = 5, res: Resources | None = None) -> Task:
    return Task(TaskRecord(id=task_id, kind="python", state=state, priority=priority, resources=res))


def node(name: str = "n1", cpus: int = 4, ram: int = 8 << 30, gpus: list[int] | None = None,
         labels: dict[str, str] | None = None, custom: dict[str, float] | None = None) -> Node:
    n = Node(name)
    n.update(NodeRecord(node=name, host=HostInfo(hostname=name, node=name, architecture="x86_64", os="linux",
                                                  cpu_cores=cpus, ram_bytes=ram),
                        gpus=[Gpu(index=i, id=f"{name}:gpu:{i}", memory_total=m) for i, m in enumerate(gpus or [])],
                        labels=labels or {}, resources=custom or {}))
    return n


# -- the state table --------------------------------------------------------------------


def test_every_state_has_a_row_and_final_states_lead_nowhere() -> None:
    assert set(TRANSITIONS) == set(STATES)
    assert all(TRANSITIONS[s] == frozenset() for s in TERMINAL)
    assert all(to in STATES for targets in TRANSITIONS.values() for to in targets)
    # the only way back is a retry: running -> queued
    assert QUEUED in TRANSITIONS[RUNNING] and SUBMITTED not in set().union(*TRANSITIONS.values())


@pytest.mark.parametrize(("prev", "to"), list(itertools.product(STATES, STATES)))
def test_move_allows_exactly_the_table(prev: str, to: str) -> None:
    t = task(state=prev)
    if to in TRANSITIONS[prev]:
        assert move(t, to) == prev
        assert t.state == to and t.version == 2
        assert (t.rec.finished_ms > 0) == (to in TERMINAL)
    else:
        with pytest.raises(IllegalTransition, match=f"{prev} -> {to}"):
            move(t, to)
        assert t.state == prev and t.version == 1  # nothing changed


def test_a_task_ends_once() -> None:
    t = task()
    for state in (QUEUED, RUNNING, QUEUED, RUNNING, SUCCEEDED):
        move(t, state)
    for state in (SUCCEEDED, FAILED, CANCELLED, DEAD, RUNNING, QUEUED, WAITING):
        with pytest.raises(IllegalTransition):
            move(t, state)


def test_when_durable_waits_for_the_record_and_the_body() -> None:
    t = task()
    calls: list[str] = []
    t.when_durable(lambda: calls.append("first"))
    t.durable = t.version
    t.wake()
    assert calls == []  # the body is not stored yet
    t.body_durable = True
    t.wake()
    assert calls == ["first"]
    move(t, QUEUED)
    t.when_durable(lambda: calls.append("second"))
    assert calls == ["first"]
    t.durable = t.version
    t.wake()
    assert calls == ["first", "second"]


# -- the queue --------------------------------------------------------------------------------


def _hold(t: Task, n: Node) -> object:
    return n.take(t.rec.resources or Resources())


def test_the_queue_hands_out_by_priority_then_age() -> None:
    q = TaskQueue()
    order = [("a", 5), ("b", 9), ("c", 5), ("d", 1), ("e", 9)]
    for tid, prio in order:
        q.push(task(tid, QUEUED, prio))
    got = q.take(node(cpus=64), 10, lambda t: True, _hold)
    assert [t.id for t in got] == ["b", "e", "a", "c", "d"]
    assert len(q) == 0


def test_a_retry_goes_to_the_front_of_its_class() -> None:
    q = TaskQueue()
    q.push(task("a", QUEUED))
    q.push(task("b", QUEUED))
    q.push(task("retry", QUEUED), front=True)
    assert [t.id for t in q.take(node(cpus=64), 3, lambda t: True, _hold)] == ["retry", "a", "b"]


def test_a_node_gets_only_what_it_can_run_and_what_fits_now() -> None:
    q = TaskQueue()
    gpu = Resources(gpus=1)
    q.push(task("gpu", QUEUED, 9, gpu))          # the most urgent, but the CPU node can never run it
    for i in range(5):
        q.push(task(f"cpu{i}", QUEUED, 5, Resources(cpus=2)))
    cpu_node = node("cpu", cpus=4)
    got = q.take(cpu_node, 10, lambda t: True, _hold)
    assert [t.id for t in got] == ["cpu0", "cpu1"]  # 2 + 2 CPUs: full
    assert cpu_node.used_cpus == 4 and len(q) == 4
    gpu_node = node("gpu", cpus=8, gpus=[16 << 30])
    assert [t.id for t in q.take(gpu_node, 1, lambda t: True, _hold)] == ["gpu"]


def test_cancelled_entries_are_skipped() -> None:
    q = TaskQueue()
    a, b = task("a", QUEUED), task("b", QUEUED)
    q.push(a)
    q.push(b)
    move(a, CANCELLED)
    assert [t.id for t in q.take(node(), 5, lambda t: t.state == QUEUED, _hold)] == ["b"]
    assert len(q) == 0


# -- nodes --------------------------------------------------------------------------------------


def test_fractional_gpus_share_a_device_and_whole_ones_do_not() -> None:
    n = node(gpus=[24 << 30, 24 << 30])
    half = Resources(cpus=0, gpus=0.5, gpu_mem=10 << 30)
    first, second, third = n.take(half), n.take(half), n.take(half)
    assert first == [(0, 0.5, 10 << 30)] and second == [(0, 0.5, 10 << 30)]  # both halves on device 0
    assert third == [(1, 0.5, 10 << 30)]
    assert n.take(Resources(cpus=0, gpus=1)) is None  # no whole device left
    n.give_back(half, first)
    n.give_back(half, second)
    assert n.take(Resources(cpus=0, gpus=1)) == [(0, 1.0, 0)]


def test_gpu_memory_is_accounted_per_device() -> None:
    n = node(gpus=[16 << 30])
    assert n.take(Resources(cpus=0, gpus=0.25, gpu_mem=12 << 30)) is not None
    assert n.take(Resources(cpus=0, gpus=0.25, gpu_mem=8 << 30)) is None  # share left, memory not
    assert n.take(Resources(cpus=0, gpus=0.25, gpu_mem=4 << 30)) is not None


def test_custom_resources_and_labels() -> None:
    n = node(labels={"zone": "a"}, custom={"licence": 2})
    lic = Resources(cpus=0, custom={"licence": 1})
    assert n.lacks(Resources(labels={"zone": "b"})) == "label zone=b"
    assert n.lacks(Resources(custom={"licence": 3})) is not None
    assert n.take(lic) is not None and n.take(lic) is not None and n.take(lic) is None


def test_unmet_names_what_no_node_has() -> None:
    nodes = [node("a", cpus=2), node("b", cpus=4, gpus=[8 << 30])]
    assert unmet(nodes, Resources(cpus=4)) is None
    msg = unmet(nodes, Resources(gpus=64))
    assert msg is not None and "gpus=64" in msg and "node a has 0" in msg and "node b has 1" in msg
    assert "arch=arm64 (node a is x86_64)" in (unmet(nodes, Resources(arch="arm64")) or "")
    assert unmet(nodes, Resources(arch="amd64")) is None  # an alias of x86_64
    assert unmet([], Resources()) == "no node is registered"


# -- maps recorded lazily: the checkpoint (services/scheduler/maps.py) ------------------------------------------------


def _group(n: int) -> BodyGroup:
    return BodyGroup([Task(TaskRecord(id=f"m-{i}", kind="python", state="submitted", body="m", body_index=i))
                      for i in range(n)])


def test_the_checkpoint_never_passes_a_map_with_a_task_unrecorded() -> None:
    book = MapBook()
    assert book.checkpoint() == 1  # nothing stored: read from the first body
    a, b = _group(2), _group(1)
    book.sending_body(a)
    assert book.checkpoint() == 1
    book.stored(a, 5)  # stored at 5 (single tasks' bodies took 1..4)
    book.sending_body(b)
    assert book.checkpoint() == 5
    book.stored(b, 6)
    book.recorded(b.tasks[0])  # b settles: a still holds the checkpoint
    assert book.checkpoint() == 5 and 6 not in book.unsettled
    book.recorded(a.tasks[0])
    assert book.checkpoint() == 5
    book.recorded(a.tasks[1])
    assert book.checkpoint() == 7 and not book.unsettled  # everything recorded: past the last body
    assert all(t.group is None for t in a.tasks + b.tasks)


def test_a_body_being_sent_holds_the_checkpoint_at_what_it_can_be_stored_as() -> None:
    """A retried body may be stored under an earlier sequence (deduplicated): the checkpoint waits for it."""
    book = MapBook()
    a, b = _group(1), _group(1)
    book.sending_body(a)  # could be stored at 1 or later
    book.sending_body(b)
    book.stored(b, 3)
    book.recorded(b.tasks[0])
    assert book.checkpoint() == 1  # a is still being sent
    book.recorded(a.tasks[0])  # its task ended before its body's ack came
    book.stored(a, 2)
    assert book.checkpoint() == 4 and not book.unsettled


def test_a_map_task_recorded_before_its_body_is_stored_does_not_hold_the_checkpoint() -> None:
    book = MapBook()
    g = _group(1)
    book.sending_body(g)
    book.recorded(g.tasks[0])
    book.stored(g, 9)
    assert not book.unsettled and book.checkpoint() == 10
