"""How a pool starts a ring worker: ``python -m services.spawner.pool_launch --ring-in A --ring-out B``.

It runs the worker of :mod:`services.spawner.worker` unchanged, except that the
worker's job ring spins for :data:`JOB_RING_SPIN_US` before it sleeps on its futex
(the ring's default is 50 µs).  Why: on the 2-core machine of docs/benchmarks.md
a sleeping worker took about 50 µs to wake for the next job -- most of a warm
job's cost in the spawner -- while one still spinning took it in about 10 µs
(submit to reply, measured in-process).  A worker that gets a job at least every
millisecond never sleeps; an idle one spins once for a millisecond, yielding the
core while it does (the ring's spin calls ``sched_yield``), and then sleeps.

This is a launcher rather than an option of the worker because the worker has no
such option yet; once ``services.spawner.worker`` takes one, the pool passes it
and this module goes.
"""

from __future__ import annotations

import os
import sys

#: how long a worker's job ring spins before it sleeps (``FABRIC_WORKER_SPIN_US`` overrides)
JOB_RING_SPIN_US = float(os.environ.get("FABRIC_WORKER_SPIN_US", "1000"))


def main(argv: list[str] | None = None) -> int:
    from fabric_ext import ring

    consumer = ring.Consumer

    def job_ring(path: str, *, spin_us: float = JOB_RING_SPIN_US) -> object:
        return consumer(path, spin_us=max(spin_us, JOB_RING_SPIN_US))

    # the worker opens its one Consumer (the job ring) through the module attribute
    ring.Consumer = job_ring  # type: ignore[misc]
    from services.spawner.worker import main as worker_main

    return worker_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
