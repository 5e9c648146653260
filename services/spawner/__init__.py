"""The spawner service: remote processes (rspawn/rwait/rkill) and compute cores on one node.

``service.py`` holds the endpoints; ``procs.py`` runs, watches and ends processes;
``limits.py``, ``sandbox.py`` and ``cgroups.py`` decide and apply what a child is
limited to; ``blobs.py`` stores native executables by digest; ``orphans.py`` cleans
up after a crashed predecessor.  ``pools.py`` (compute cores, warm workers) plugs
its endpoints into the same service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .service import SpawnerService

__all__ = ["SpawnerService"]


def __getattr__(name: str) -> Any:
    # lazy: a warm worker (``python -m services.spawner.worker``) imports this package
    # too, and must not pay for nats, msgspec and the service kit at every start
    if name == "SpawnerService":
        from .service import SpawnerService

        return SpawnerService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
