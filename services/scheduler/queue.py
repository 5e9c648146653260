"""The queue of runnable tasks: by priority, then by arrival, grouped by what they need.

Tasks that need the same :class:`~fabric.schema.tasks.Resources` form a *class*; the
queue keeps one FIFO per (priority, class).  A node asking for work is given the
most urgent task it can run now, oldest first within a priority: only the heads of
the classes the node could ever run are looked at, so a queue full of GPU tasks
costs a CPU-only node nothing, and a pull costs O(classes), not O(tasks).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from fabric.protocol.cores import pool_key
from fabric.schema import MSGPACK
from fabric.schema.tasks import CORE, Resources

from .machine import Task
from .nodes import Node

__all__ = ["TaskQueue", "class_key", "needed_core"]

#: the Resources of a task that names none
DEFAULT_RESOURCES = Resources()


def needed_core(task: Task) -> str:
    """The pool a node must have loaded to run *task* ("" for every kind but ``core``): its core, of its owner."""
    return pool_key(task.rec.owner, task.rec.core) if task.rec.kind == CORE else ""


def class_key(res: Resources | None) -> bytes:
    """What identifies a class: the encoded Resources (b"" for the default)."""
    return b"" if res is None else MSGPACK.encode(res)


class _Class:
    __slots__ = ("key", "priority", "res", "core", "tasks")

    def __init__(self, key: bytes, priority: int, res: Resources, core: str) -> None:
        self.key = key
        self.priority = priority
        self.res = res
        #: a ``core`` task's compute core: only a node with that core loaded runs the class
        self.core = core
        #: (arrival number, task); cancelled tasks are skipped when they reach the head
        self.tasks: deque[tuple[int, Task]] = deque()


class TaskQueue:
    """Runnable tasks by priority and class; :meth:`take` hands a node what it can run."""

    def __init__(self) -> None:
        self._classes: dict[tuple[int, bytes, str], _Class] = {}
        self._by_priority: dict[int, list[_Class]] = {}
        self._arrival = itertools.count()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, task: Task, front: bool = False) -> None:
        """Queue *task* (a retried one goes to the front of its class)."""
        res = task.rec.resources
        core = needed_core(task)
        key = (task.rec.priority, class_key(res), core)
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = _Class(key[1], key[0], res or DEFAULT_RESOURCES, core)
            self._by_priority.setdefault(key[0], []).append(cls)
        if front:
            cls.tasks.appendleft((-1, task))
        else:
            cls.tasks.append((next(self._arrival), task))
        self.size += 1

    def take(self, node: Node, limit: int, runnable: Callable[[Task], bool],
             hold: Callable[[Task, Node], Any]) -> list[Task]:
        """Up to *limit* tasks for *node*, most urgent first; *hold* reserves each on the node.

        *runnable* says whether a queued entry is still meant to run (cancelled ones are
        dropped); *hold* returns None when the task does not fit the node now.
        """
        out: list[Task] = []
        for priority in sorted(self._by_priority, reverse=True):
            classes = [c for c in self._by_priority[priority] if node.lacks(c.res, c.core) is None]
            while classes and len(out) < limit:
                best: _Class | None = None
                for cls in classes:
                    while cls.tasks and not runnable(cls.tasks[0][1]):
                        cls.tasks.popleft()
                        self.size -= 1
                    if cls.tasks and (best is None or cls.tasks[0][0] < best.tasks[0][0]):
                        best = cls
                if best is None:
                    break
                task = best.tasks[0][1]
                if hold(task, node) is None:
                    classes.remove(best)  # its head does not fit now, nor would the rest of the class
                    continue
                best.tasks.popleft()
                self.size -= 1
                out.append(task)
            if len(out) >= limit:
                break
        self._prune()
        return out

    def _prune(self) -> None:
        for key, cls in list(self._classes.items()):
            if not cls.tasks:
                del self._classes[key]
                group = self._by_priority[cls.priority]
                group.remove(cls)
                if not group:
                    del self._by_priority[cls.priority]

    def tasks(self) -> list[Task]:
        return [t for cls in self._classes.values() for _, t in cls.tasks]
