"""What a pool, its workers and the job lane hand each other: jobs, worker specs, settings.

This module sits below :mod:`.pool_workers`, :mod:`.pool`, :mod:`.job_lane` and
:mod:`.pools` (the manager) and imports none of them.  :class:`PoolEnv` is the
environment the warm pools read, parsed once when a manager is made (not at import
time), and handed down to every worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fabric.errors import FabricError

__all__ = ["Job", "JobDone", "WorkerSpec", "PoolEnv", "OUTPUT_HINT"]

#: what a 413 for a job's output too large to carry back tells the caller to do instead
OUTPUT_HINT = ("write large outputs to remote memory (alloc and write a block, return its handle) "
               "or split the job")

#: called once per job with ``(exit_code, output, error)``
JobDone = Callable[[int, Any, "FabricError | None"], None]


class Job:
    """One job: its input bytes and what to call with ``(exit_code, output, error)``.

    ``reply`` is the NATS reply subject of a single ``run`` job when the reader thread
    may answer it directly (see :mod:`.pool_reply`); ``replied`` says it did.
    """

    __slots__ = ("id", "data", "done", "reply", "replied")

    def __init__(self, job_id: int, data: Any, done: JobDone, reply: bytes | None = None) -> None:
        self.id = job_id
        self.data = data
        self.done = done
        self.reply = reply
        self.replied = False


@dataclass(frozen=True)
class WorkerSpec:
    """What a new worker is told: the core's id (for logs), name and library bytes."""

    core: str
    name: str
    library: bytes


@dataclass(frozen=True)
class PoolEnv:
    """The settings of the warm pools that come from the environment (see :meth:`from_environ`)."""

    #: how long a reader thread spins for the next result before it sleeps (see docs/benchmarks.md)
    reader_spin_us: float = 250.0
    #: how long a ring worker spins on its job ring before it sleeps: a sleeping worker
    #: took about 50 µs to wake for the next job here, a spinning one about 10 µs; an idle
    #: worker spins once for this long, yielding the core, then sleeps on its futex
    worker_spin_us: float = 1000.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> PoolEnv:
        """``FABRIC_POOL_READER_SPIN_US`` and ``FABRIC_WORKER_SPIN_US``, else the defaults."""
        env = os.environ if environ is None else environ
        return cls(reader_spin_us=float(env.get("FABRIC_POOL_READER_SPIN_US", "250")),
                   worker_spin_us=float(env.get("FABRIC_WORKER_SPIN_US", "1000")))
