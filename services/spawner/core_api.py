"""What the worker process, its cores and the pool that drives them agree on, beyond the wire contract.

The compute core API version, the error a core raises when it cannot load, and the
prefix of a worker's "output too large" answer.  The built-in core names are the
contract's (:mod:`fabric.protocol.cores`).  It sits below :mod:`.worker_core`,
:mod:`.worker_opencl`, :mod:`.worker` and :mod:`.pool_workers`, which all import it and
nothing of each other's that would close a cycle.  It imports nothing: a warm worker
loads it at every start.
"""

from __future__ import annotations

__all__ = ["API_VERSION", "CoreError", "OUTPUT_TOO_LARGE"]

#: the compute core API version a library's ``worker_init`` is called with
API_VERSION = 1
#: how the 0xFF answer to a job whose output does not fit a result ring record begins
#: (:mod:`.pool_workers` types it 413 too_large; a record limit is no protocol error)
OUTPUT_TOO_LARGE = "output too large: "


class CoreError(Exception):
    """Raised when a core cannot be loaded or initialised (the text goes into an 0xFF reply)."""
