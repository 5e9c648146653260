"""fabric: a Cython-accelerated resource fabric over NATS.

The public face: the clients, the remote-buffer objects, the error tree and the
message types.  Everything else (the service kit, the supervisor, the CLI) is
internal and may change.

>>> from fabric import FabricClient            # doctest: +SKIP
>>> with FabricClient("nats://127.0.0.1:4222") as fc:
...     buf = fc.rmalloc(1024)
...     fc.rwrite(buf, b"hello")
...     fc.rread(buf, 5)
b'hello'
"""

from ._version import __version__
from .client import AsyncCore, AsyncFabricClient, AsyncRemoteBuffer, Core, FabricClient, RemoteBuffer
from .client import AsyncRemoteProcess, RemoteProcess
from .schema import ExitInfo, Limits, Sandbox
from .errors import (
    BadRequest,
    Conflict,
    CoreLoadFailed,
    CorruptionDetected,
    DoubleFree,
    FabricError,
    Infeasible,
    InternalError,
    InvalidFrame,
    JobError,
    JobFailed,
    JobTimeout,
    NotFound,
    OutOfMemory,
    OutOfRange,
    PermissionDenied,
    QuotaExceeded,
    StaleHandle,
    TooLarge,
    Unavailable,
    UnknownHandle,
    WorkerCrashed,
)
from .errors import ExecutableNotFound, NotEnforceable, UnknownProcess, WrongArchitecture
from . import schema

__all__ = [
    "RemoteProcess",
    "AsyncRemoteProcess",
    "Limits",
    "Sandbox",
    "ExitInfo",
    "UnknownProcess",
    "ExecutableNotFound",
    "NotEnforceable",
    "WrongArchitecture",
    "__version__",
    "FabricClient",
    "AsyncFabricClient",
    "RemoteBuffer",
    "AsyncRemoteBuffer",
    "schema",
    "FabricError",
    "BadRequest",
    "InvalidFrame",
    "OutOfRange",
    "PermissionDenied",
    "NotFound",
    "UnknownHandle",
    "StaleHandle",
    "Conflict",
    "DoubleFree",
    "TooLarge",
    "Infeasible",
    "QuotaExceeded",
    "InternalError",
    "CorruptionDetected",
    "Unavailable",
    "OutOfMemory",
    "Core",
    "AsyncCore",
    "CoreLoadFailed",
    "JobError",
    "JobFailed",
    "WorkerCrashed",
    "JobTimeout",
]
