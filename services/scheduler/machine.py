"""A task in the scheduler's memory, and the one function that moves it between states.

Every state change goes through :func:`move`, which refuses a transition that
:data:`fabric.schema.tasks.TRANSITIONS` does not list: an illegal move is a bug in the
scheduler, raised as :class:`IllegalTransition` (never written, never published).

The record (:class:`~fabric.schema.tasks.TaskRecord`) is what the KV bucket keeps;
:class:`Task` adds what only the active scheduler needs: the body to hand out, the
KV revision its next compare-and-swap expects, the write in flight, the node and
devices it holds while running, who waits for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fabric.schema.tasks import RUNNING, TERMINAL, TRANSITIONS, Attempt, TaskRecord

__all__ = ["Task", "IllegalTransition", "move", "now_ms", "resolve", "all_durable", "BodyGroup"]


class IllegalTransition(RuntimeError):
    """A move that the state table forbids: a scheduler bug."""


def now_ms() -> int:
    return int(time.time() * 1000)


class Task:
    """One task the active scheduler knows: its record plus the live state around it."""

    __slots__ = ("rec", "fn", "call", "rev", "version", "durable", "writing", "waiters", "node", "gpus",
                 "assigned_at", "seen_at", "pending_deps", "dependents", "body_durable", "group")

    def __init__(self, rec: TaskRecord, fn: bytes | None = None, call: bytes | None = None) -> None:
        self.rec = rec
        #: the python body, split (a map's tasks share ``fn``); for other kinds ``call`` is the body
        self.fn = fn
        self.call = call
        #: the KV revision the next compare-and-swap expects (0: the key does not exist yet)
        self.rev = 0
        #: changes made in memory, and how many of them the KV holds
        self.version = 1
        self.durable = 0
        self.writing = False
        self.body_durable = False
        #: callbacks waiting for a version to be durable: (version, fn)
        self.waiters: list[tuple[int, Callable[[], None]]] | None = None
        #: while running: the node, its GPU shares, when it was handed out and last listed by the node
        self.node = ""
        self.gpus: list[tuple[int, float, int]] = []
        self.assigned_at = 0.0
        self.seen_at = 0.0
        #: dependencies not yet succeeded, and the tasks waiting for this one
        self.pending_deps = 0
        self.dependents: list[Task] | None = None
        #: the map whose body holds this task while it has no KV record yet (None once it has one)
        self.group: BodyGroup | None = None

    @property
    def id(self) -> str:
        return self.rec.id

    @property
    def state(self) -> str:
        return self.rec.state

    @property
    def done(self) -> bool:
        return self.rec.state in TERMINAL

    @property
    def attempt(self) -> Attempt | None:
        return self.rec.attempts[-1] if self.rec.attempts else None

    def when_durable(self, fn: Callable[[], None]) -> None:
        """Call *fn* once the KV holds every change made so far (at once if it does)."""
        if self.durable >= self.version and self.body_durable:
            fn()
            return
        if self.waiters is None:
            self.waiters = []
        self.waiters.append((self.version, fn))

    def wake(self) -> None:
        """Run the waiters whose version the KV now holds."""
        if not self.waiters or not self.body_durable:
            return
        ready = [fn for v, fn in self.waiters if v <= self.durable]
        self.waiters = [(v, fn) for v, fn in self.waiters if v > self.durable] or None
        for fn in ready:
            fn()


def move(task: Task, state: str) -> str:
    """Move *task* to *state* (IllegalTransition if the table forbids it); the state it left."""
    prev = task.rec.state
    if state not in TRANSITIONS.get(prev, ()):
        raise IllegalTransition(f"task {task.id}: {prev} -> {state} is not a legal transition")
    task.rec.state = state
    task.rec.updated_ms = now_ms()
    task.version += 1
    if state in TERMINAL:
        task.rec.finished_ms = task.rec.updated_ms
    if prev == RUNNING and state != RUNNING:
        task.node = ""
    return prev


def resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def all_durable(tasks: list[Task]) -> None:
    """Wait until every one of *tasks* is durable (one future, not one per task)."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(tasks)

    def one() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            resolve(fut)

    for task in tasks:
        task.when_durable(one)
    if tasks:
        await fut


class BodyGroup:
    """Stands for every task of a map while their shared body is being stored, and until
    each of them has a KV record of its own (:mod:`.maps`)."""

    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = tasks
        self.id = tasks[0].rec.body if tasks else ""
        #: the body's sequence in the stream (0 until it is stored)
        self.seq = 0
        #: tasks whose first KV record is not written yet
        self.unwritten = len(tasks)
        for task in tasks:
            task.body_durable = False
            task.group = self

    @property
    def body_durable(self) -> bool:
        return all(t.body_durable for t in self.tasks)

    @body_durable.setter
    def body_durable(self, value: bool) -> None:
        for task in self.tasks:
            task.body_durable = value

    def wake(self) -> None:
        for task in self.tasks:
            task.wake()
