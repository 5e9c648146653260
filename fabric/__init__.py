"""fabric: a Cython-accelerated resource fabric over NATS.

The public face: the clients, the remote-buffer, remote-process and compute-core
objects, the error tree and the message types.  Everything else (the service kit,
the supervisor, the CLI) is internal and may change.

>>> from fabric import FabricClient            # doctest: +SKIP
>>> with FabricClient("nats://127.0.0.1:4222") as fc:
...     buf = fc.rmalloc(1024)
...     fc.rwrite(buf, b"hello")
...     fc.rread(buf, 5)
b'hello'

The client classes and the message types are imported on first use (PEP 562): a
warm worker is ``python -m fabric.services.spawner.worker``, which runs this file
first, and must not pay for nats-py and msgspec at every start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BadRequest,
    Conflict,
    CoreLoadFailed,
    CorruptionDetected,
    DeviceUnavailable,
    DoubleFree,
    ExecutableNotFound,
    FabricError,
    Infeasible,
    InternalError,
    InvalidFrame,
    JobError,
    JobFailed,
    JobTimeout,
    KernelBuildFailed,
    NotEnforceable,
    NotFound,
    OutOfMemory,
    OutOfRange,
    PermissionDenied,
    QuotaExceeded,
    StaleHandle,
    TaskCancelled,
    TaskDead,
    TaskFailed,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnknownDevice,
    UnknownHandle,
    UnknownNode,
    UnknownProcess,
    WorkerCrashed,
    WrongArchitecture,
)

if TYPE_CHECKING:  # pragma: no cover
    from . import schema
    from .client import (
        AsyncCore,
        AsyncFabricClient,
        AsyncRemoteBuffer,
        AsyncRemoteProcess,
        Core,
        FabricClient,
        RemoteBuffer,
        RemoteProcess,
    )
    from .client.futures import TaskFuture, as_completed, wait
    from .client.resources import Resources
    from .schema import ExitInfo, Limits, Sandbox

_CLIENT_NAMES = frozenset({
    "FabricClient", "AsyncFabricClient", "RemoteBuffer", "AsyncRemoteBuffer",
    "RemoteProcess", "AsyncRemoteProcess", "Core", "AsyncCore",
})

_SCHEMA_NAMES = frozenset({"ExitInfo", "Limits", "Sandbox"})

#: the tasks' public helpers: name -> the module that defines it (loaded with the client)
_TASK_NAMES = {"TaskFuture": "futures", "as_completed": "futures", "wait": "futures", "Resources": "resources"}


def __getattr__(name: str) -> Any:
    if name == "Out":  # fabric.opencl imports numpy: only when asked for
        from .opencl import Out

        globals()["Out"] = Out
        return Out
    if name == "schema" or name in _SCHEMA_NAMES:
        import importlib

        schema = importlib.import_module(".schema", __name__)
        value = schema if name == "schema" else getattr(schema, name)
        globals()[name] = value
        return value
    if name in _TASK_NAMES:
        import importlib

        value = getattr(importlib.import_module(f".client.{_TASK_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _CLIENT_NAMES:
        from . import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    # clients and the objects they return
    "FabricClient",
    "AsyncFabricClient",
    "RemoteBuffer",
    "AsyncRemoteBuffer",
    "RemoteProcess",
    "AsyncRemoteProcess",
    "Core",
    "AsyncCore",
    "Out",
    # durable tasks
    "TaskFuture",
    "Resources",
    "as_completed",
    "wait",
    # messages
    "schema",
    "Limits",
    "Sandbox",
    "ExitInfo",
    # errors
    "FabricError",
    "BadRequest",
    "InvalidFrame",
    "OutOfRange",
    "PermissionDenied",
    "Unauthenticated",
    "NotFound",
    "UnknownHandle",
    "StaleHandle",
    "UnknownProcess",
    "ExecutableNotFound",
    "Conflict",
    "DoubleFree",
    "TooLarge",
    "Infeasible",
    "NotEnforceable",
    "WrongArchitecture",
    "CoreLoadFailed",
    "QuotaExceeded",
    "InternalError",
    "CorruptionDetected",
    "JobError",
    "JobFailed",
    "WorkerCrashed",
    "JobTimeout",
    "Unavailable",
    "OutOfMemory",
    "UnknownNode",
    "UnknownDevice",
    "KernelBuildFailed",
    "DeviceUnavailable",
    "TaskFailed",
    "TaskDead",
    "TaskCancelled",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | _CLIENT_NAMES | set(_TASK_NAMES) | {"Out"})
