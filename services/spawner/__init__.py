"""The spawner service: remote processes (rspawn/rwait/rkill) and compute cores on one node.

``service.py`` holds the endpoints; the ``procs`` package runs, watches and ends
processes (one module per job: launch, output, reaper, sweeper, rss, joined by
``procs/table.py``); ``limits.py``, ``sandbox.py`` and ``cgroups.py`` decide and apply
what a child is limited to; ``blobs.py`` stores native executables by digest;
``orphans.py`` cleans up after a crashed predecessor.  Compute cores plug their
endpoints into the same service; imports run one way down this chain:
``pools.py`` (the manager) -> ``job_lane.py`` (run/map over NATS, with
``pool_reply.py``) -> ``pool.py`` (one pool) -> ``pool_workers.py`` (its workers,
reporting through the ``PoolEvents`` protocol) -> ``pool_types.py`` / ``pool_rings.py``.
The warm worker process is ``worker.py`` -> ``worker_core.py`` -> ``worker_opencl.py``,
all on ``core_api.py``, which the pool side shares; the names both sides spell (core
names, headers, marker variables) and the frame codecs are ``fabric.protocol``'s.  tests/test_layering.py
fails on any import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .service import SpawnerService

__all__ = ["SpawnerService"]


def __getattr__(name: str) -> Any:
    # lazy: a warm worker (``python -m fabric.services.spawner.worker``) imports this package
    # too, and must not pay for nats, msgspec and the service kit at every start
    if name == "SpawnerService":
        from .service import SpawnerService

        return SpawnerService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
