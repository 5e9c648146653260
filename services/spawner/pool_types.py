"""What a pool, its workers and the job lane hand each other: jobs, worker specs, settings.

This module sits below :mod:`.pool_workers`, :mod:`.pool`, :mod:`.job_lane` and
:mod:`.pools` (the manager) and imports none of them.  :class:`PoolEnv` is the
settings of the warm pools, taken from the configuration's ``[pool]`` (the spawner
service hands them to its manager; defaults otherwise) and handed down to every worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from fabric.errors import FabricError

if TYPE_CHECKING:
    from fabric.config import PoolConfig

__all__ = ["Job", "JobDone", "WorkerSpec", "PoolEnv", "OUTPUT_HINT", "TASK_POOL_SPINS"]

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
    """What a new worker is told: the core's id (for logs), name and library bytes, and what its
    environment adds (the task runner's pools pinned to GPUs: CUDA_VISIBLE_DEVICES from the start)."""

    core: str
    name: str
    library: bytes
    env: tuple[tuple[str, str], ...] = ()


#: the caps on the spins (µs) of the task runner's pools -- reader thread, worker (:meth:`PoolEnv.capped`): the
#: node's defaults suit ``Core.call``'s back-to-back jobs; a task pool's jobs come in batches over NATS, and a
#: longer spin only takes CPU from the processes the next batch comes through (measured: a no-op map's worker
#: CPU per task halved)
TASK_POOL_SPINS: Final = (50.0, 100.0)


@dataclass(frozen=True)
class PoolEnv:
    """The settings of the warm pools: the configuration's ``[pool]`` (docs/config.md, :meth:`from_config`)."""

    #: how long a reader thread spins for the next result before it sleeps (see docs/benchmarks.md)
    reader_spin_us: float = 250.0
    #: how long a ring worker spins on its job ring before it sleeps: a sleeping worker
    #: took about 50 µs to wake for the next job here, a spinning one about 10 µs; an idle
    #: worker spins once for this long, yielding the core, then sleeps on its futex
    worker_spin_us: float = 1000.0

    def capped(self, reader_spin_us: float, worker_spin_us: float) -> PoolEnv:
        """These settings with each spin at most the given one (the task runner's own pools)."""
        return PoolEnv(reader_spin_us=min(self.reader_spin_us, reader_spin_us),
                       worker_spin_us=min(self.worker_spin_us, worker_spin_us))

    @classmethod
    def from_config(cls, pool: PoolConfig) -> PoolEnv:
        """``pool.reader_spin_us`` and ``pool.worker_spin_us`` of the service's configuration."""
        return cls(reader_spin_us=pool.reader_spin_us, worker_spin_us=pool.worker_spin_us)
