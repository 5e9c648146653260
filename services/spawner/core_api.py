"""What the worker process, its cores and the pool that drives them agree on.

The names of the built-in cores, the error a core raises when it cannot load, and
the prefix of a worker's "output too large" answer.  It sits below
:mod:`.worker_core`, :mod:`.worker_opencl`, :mod:`.worker` and :mod:`.pool_workers`,
which all import it and nothing of each other's that would close a cycle.  It
imports nothing: a warm worker loads it at every start.
"""

from __future__ import annotations

__all__ = ["API_VERSION", "PYTHON_CORE", "OPENCL_CORE", "BUILTIN_CORES", "CoreError", "OUTPUT_TOO_LARGE"]

#: the compute core API version a library's ``worker_init`` is called with
API_VERSION = 1
# fabric.subjects names them too; spelled again here so a worker imports nothing of fabric
# (tests/test_layering.py checks the two agree)
PYTHON_CORE = "fabric.python"
OPENCL_CORE = "fabric.opencl"
#: the core names that need no library (and whose names no library may take)
BUILTIN_CORES = (PYTHON_CORE, OPENCL_CORE)
#: how the 0xFF answer to a job whose output does not fit a result ring record begins
#: (:mod:`.pool_workers` types it 413 too_large; a record limit is no protocol error)
OUTPUT_TOO_LARGE = "output too large: "


class CoreError(Exception):
    """Raised when a core cannot be loaded or initialised (the text goes into an 0xFF reply)."""
