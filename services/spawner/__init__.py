"""The spawner service: remote processes (rspawn/rwait/rkill) and compute cores on one node.

``service.py`` holds the endpoints; ``procs.py`` runs, watches and ends processes;
``limits.py``, ``sandbox.py`` and ``cgroups.py`` decide and apply what a child is
limited to; ``blobs.py`` stores native executables by digest; ``orphans.py`` cleans
up after a crashed predecessor.  ``pools.py`` (compute cores, warm workers) plugs
its endpoints into the same service.
"""

from .service import SpawnerService

__all__ = ["SpawnerService"]
