"""The names of the built-in compute cores (docs/protocol.md "Compute cores", "Worker protocol v1").

A core named ``fabric.python`` or ``fabric.opencl`` with an empty library is served by
the Python worker itself; no library core may take either name.  The client, the
spawner's pools and the warm worker all import these; the worker loads this module at
every start, so it imports nothing.  Part of :mod:`fabric.protocol`.
"""

from __future__ import annotations

from typing import Final

#: the Python worker's built-in core: a job is ``cloudpickle.dumps((fn, args, kwargs))``
PYTHON_CORE: Final = "fabric.python"
#: the OpenCL core: a job is an FCLJ frame (:mod:`.clframes`)
OPENCL_CORE: Final = "fabric.opencl"
#: the core names that need no library (and whose names no library may take)
BUILTIN_CORES: Final = (PYTHON_CORE, OPENCL_CORE)


def pool_key(owner: str, name: str) -> str:
    """What names a warm pool on its node: the core's name, and its owner's when a user loaded it.

    With auth on, a user's pools are the user's (another user's load of the same name is
    another pool); a trusted caller's (``owner`` "") are named as before.  The spawner
    reports its pools by these keys and the scheduler matches a ``core`` task with the
    key of its owner.  A NUL separates them: neither a user name nor a core name takes one.
    """
    return f"{owner}\x00{name}" if owner else name
