"""The one error tree of fabric, and its mapping to and from the wire.

Every failure a caller can see is a :class:`FabricError`.  On the wire an error
reply carries the ADR-32 headers ``Nats-Service-Error`` (readable text) and
``Nats-Service-Error-Code`` (an HTTP-like number), plus ``Fabric-Error`` (the
stable *kind* string below) so a client can raise the exact class::

    FabricError                      500  internal      raised when nothing more precise fits
    ├── BadRequest (a ValueError)    400  bad_request   the request is malformed or has wrong types
    │   ├── KernelBuildFailed        400  kernel_build_failed  an OpenCL kernel does not compile (carries the build log)
    │   ├── InvalidFrame             400  invalid_frame a binary frame is truncated or hostile
    │   └── OutOfRange               400  out_of_range  offset/length fall outside the block
    ├── Unauthenticated              401  unauthenticated  NATS refused the connection's credentials (client-side)
    ├── PermissionDenied             403  denied        not the caller's to do: a read-only handle, another user's task,
    │                                                   a subject its role may not publish to
    ├── NotFound                     404  not_found     the id or subject is unknown
    │   ├── UnknownHandle            404  unknown_handle  never issued here, forged, or unknown segment
    │   ├── StaleHandle              404  stale_handle  the block was freed (use after free)
    │   ├── UnknownProcess           404  unknown_process  no such process id on its spawner
    │   ├── ExecutableNotFound       404  executable_not_found  argv[0] or a native digest is not there
    │   ├── UnknownNode              404  unknown_node  no live node of that name in the registry
    │   └── UnknownDevice            404  unknown_device  no GPU or OpenCL device of that id
    ├── Conflict                     409  conflict      the state forbids it
    │   ├── DoubleFree               409  double_free   the block was already freed
    │   └── TaskCancelled            409  task_cancelled  the task was cancelled (a concurrent.futures.CancelledError)
    ├── TooLarge                     413  too_large     a size or frame exceeds a hard limit
    ├── Infeasible                   422  infeasible    well-formed but can never succeed here
    │   ├── NotEnforceable           422  not_enforceable  a requested limit/sandbox cannot be applied here
    │   ├── WrongArchitecture        422  wrong_architecture  a native executable is for another arch/OS
    │   └── CoreLoadFailed           422  core_load_failed  a compute core's .so or worker_init is unusable
    ├── QuotaExceeded                429  quota         the owner's quota would be exceeded
    │   └── RateLimited              429  rate_limited  too many requests from one token (the HTTP gateway)
    ├── InternalError                500  internal      a bug or an unexpected failure
    │   └── CorruptionDetected       500  corruption    a header, canary or segment is damaged
    ├── JobError                     500  job_error     a compute job did not produce a result
    │   ├── JobFailed                500  job_failed    the core returned a nonzero exit code
    │   ├── WorkerCrashed            500  worker_crashed  the worker died (signal, abort) running the job
    │   └── JobTimeout               500  job_timeout   the job ran past its core's time limit
    ├── TaskFailed                   500  task_failed   a task's function raised (or its process exited nonzero)
    ├── TaskDead                     500  task_dead     system failures (crash, node loss, timeout) used up its retries
    ├── Unavailable                  503  unavailable   no service answered in time
    │   └── DeviceUnavailable        503  device_unavailable  the device failed or vanished during the job
    └── OutOfMemory                  507  out_of_memory the node's capacity is exhausted

Classes are registered by kind in one registry that rejects duplicates, and each
numeric code has one default class (the first registered for it), used when a
reply carries a code but no kind (for example from a non-fabric service).

The root and the classes the extensions raise (``BadRequest``, ``InvalidFrame``,
``OutOfRange``, ``NotFound``, ``UnknownHandle``, ``StaleHandle``, ``Conflict``,
``DoubleFree``, ``TooLarge``, ``QuotaExceeded``, ``InternalError``,
``CorruptionDetected``, ``OutOfMemory``) are defined in :mod:`fabric_ext.errors`,
together with the registry, so ``fabric_ext`` depends on nothing in ``fabric``;
this module re-exports them unchanged and is where everyone else imports errors from.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import CancelledError as _CancelledError

# The root of the tree and the classes the extensions raise live in fabric_ext.errors, so that
# fabric_ext loads without this package; they are these very classes (not copies), so
# ``except fabric.errors.InvalidFrame`` catches what fabric_ext.wire raises.  The kind/code
# registry lives there too, with FabricError.__init_subclass__ that fills it.
from fabric_ext.errors import (
    _BY_CODE,
    _BY_KIND,
    BadRequest,
    Conflict,
    CorruptionDetected,
    DoubleFree,
    FabricError,
    InternalError,
    InvalidFrame,
    NotFound,
    OutOfMemory,
    OutOfRange,
    QuotaExceeded,
    StaleHandle,
    TooLarge,
    UnknownHandle,
)

from .protocol import headers as _headers

__all__ = [
    "FabricError",
    "NoResponders",
    "RequestTimedOut",
    "BadRequest",
    "InvalidFrame",
    "OutOfRange",
    "PermissionDenied",
    "Unauthenticated",
    "NotFound",
    "UnknownHandle",
    "StaleHandle",
    "Conflict",
    "DoubleFree",
    "TooLarge",
    "Infeasible",
    "QuotaExceeded",
    "RateLimited",
    "InternalError",
    "CorruptionDetected",
    "Unavailable",
    "OutOfMemory",
    "UnknownProcess",
    "ExecutableNotFound",
    "NotEnforceable",
    "WrongArchitecture",
    "UnknownNode",
    "UnknownDevice",
    "KernelBuildFailed",
    "DeviceUnavailable",
    "CoreLoadFailed",
    "JobError",
    "JobFailed",
    "WorkerCrashed",
    "JobTimeout",
    "TaskFailed",
    "TaskDead",
    "TaskCancelled",
    "error_from_wire",
    "error_headers",
    "ERROR_HEADER",
    "ERROR_CODE_HEADER",
    "ERROR_KIND_HEADER",
]

# the header names are the contract's, spelled once in fabric.protocol.headers
ERROR_HEADER = _headers.ERROR_HEADER
ERROR_CODE_HEADER = _headers.ERROR_CODE_HEADER
ERROR_KIND_HEADER = _headers.ERROR_KIND_HEADER


class RateLimited(QuotaExceeded):
    """Raised by the HTTP gateway when a token (or an address without one) sends faster than its rate."""

    kind = "rate_limited"


class PermissionDenied(FabricError):
    """Raised when the caller may not do this: a write with a read-only handle, another user's task or
    process, a subject the caller's role may not publish to (the message names it)."""

    code = 403
    kind = "denied"


class Unauthenticated(FabricError):
    """Raised when NATS refuses the connection: no credentials where they are required, or credentials it
    does not know (a removed user, another fabric's file).  Client-side: no service sends it."""

    code = 401
    kind = "unauthenticated"


class Infeasible(FabricError):
    """Raised when a request is well-formed but can never succeed on this fabric."""

    code = 422
    kind = "infeasible"


class Unavailable(FabricError):
    """Raised when no service answered in time (no responders, timeout, connection lost)."""

    code = 503
    kind = "unavailable"


class NoResponders(Unavailable):
    """Raised when nothing listens on the subject at all (NATS "no responders"): no service of that kind
    runs, or -- for ``fabric.task.*`` -- no scheduler is active yet (a failover). Never on the wire."""

    kind = "no_responders"


class RequestTimedOut(Unavailable):
    """Raised when a request got no reply in time: the service may have died holding it (a scheduler killed
    mid-request).  A request that is safe to repeat (every ``fabric.task.*`` one) is sent again. Never on the
    wire."""

    kind = "request_timed_out"


# -- compute cores (services/spawner/pools.py) --------------------------------


class CoreLoadFailed(Infeasible):
    """Raised when a core cannot load: missing API symbols, worker_init nonzero, not a library."""

    kind = "core_load_failed"


class JobError(FabricError):
    """Raised when a compute job produced no result; carries ``core`` (and ``job`` where known)."""

    code = 500
    kind = "job_error"


class JobFailed(JobError):
    """Raised when the core's worker_run_job returned nonzero; carries ``exit_code`` and ``output`` (bytes)."""

    kind = "job_failed"
    # set from the reply's fields by FabricError.__init__ (declared for type checkers)
    exit_code: int
    output: bytes


class WorkerCrashed(JobError):
    """Raised when the worker running the job died (segfault, abort, killed); the pool replaced it."""

    kind = "worker_crashed"


class JobTimeout(JobError):
    """Raised when the job ran past its core's ``time_limit``; its worker was killed and replaced."""

    kind = "job_timeout"


# -- durable tasks (the scheduler, fabric.client.tasks) ----------------------------


class TaskFailed(FabricError):
    """Raised by a task's future when the task failed and its own exception could not be raised instead.

    Carries ``task`` (the id), ``remote_type`` and ``remote_traceback`` (of a Python
    exception, "" otherwise), ``error_kind``/``error_code`` (the TaskError's), and for a
    process (kind ``exec``) ``exit_code`` and ``output`` (its stdout tail).
    """

    code = 500
    kind = "task_failed"
    # set from the TaskError's fields by FabricError.__init__ (declared for type checkers)
    task: str
    remote_type: str
    remote_traceback: str


class TaskDead(FabricError):
    """Raised by a task's future when system failures (crash, node loss, timeout) used up its retries."""

    code = 500
    kind = "task_dead"
    task: str


class TaskCancelled(Conflict, _CancelledError):
    """Raised by a task's future when the task was cancelled; also a ``concurrent.futures.CancelledError``."""

    kind = "task_cancelled"
    task: str


# -- remote processes (services/spawner) ---------------------------------------


class UnknownProcess(NotFound):
    """Raised when a process id names no process its spawner knows (never spawned, or forgotten)."""

    kind = "unknown_process"


class ExecutableNotFound(NotFound):
    """Raised when argv[0] is not an executable on the node, or a native digest is not stored there."""

    kind = "executable_not_found"


class NotEnforceable(Infeasible):
    """Raised when a strict spawn asks for a limit or sandbox option this node cannot apply."""

    kind = "not_enforceable"


class WrongArchitecture(Infeasible):
    """Raised when a native executable is built for another architecture or OS than the node's."""

    kind = "wrong_architecture"


# -- telemetry and OpenCL (services/gpu_monitor, the fabric.opencl core) -----------


class UnknownNode(NotFound):
    """Raised when a node name is not in the node registry (never seen, or its heartbeats stopped)."""

    kind = "unknown_node"


class UnknownDevice(NotFound):
    """Raised when a GPU or OpenCL device id names no device the fabric knows."""

    kind = "unknown_device"


class KernelBuildFailed(BadRequest):
    """Raised when an OpenCL kernel does not compile; ``build_log`` holds the compiler's output."""

    kind = "kernel_build_failed"


class DeviceUnavailable(Unavailable):
    """Raised when the device failed, or disappeared, while it ran the job."""

    kind = "device_unavailable"


# FabricError itself is the fallback for unknown kinds/codes.
_BY_KIND.setdefault("error", FabricError)
_BY_CODE[500] = InternalError


def error_from_wire(code: int | str | None, text: str, kind: str | None = None) -> FabricError:
    """Build the exception a reply's error headers describe."""
    cls = _BY_KIND.get(kind or "")
    if cls is None:
        try:
            num = int(code or 500)
        except (TypeError, ValueError):
            num = 500
        cls = _BY_CODE.get(num, FabricError)
    return cls(text)


def error_headers(exc: FabricError) -> dict[str, str]:
    """The reply headers that carry *exc* to any NATS client."""
    return {
        ERROR_HEADER: exc.message,
        ERROR_CODE_HEADER: str(exc.code),
        ERROR_KIND_HEADER: exc.kind,
    }


def registered_kinds() -> Mapping[str, type[FabricError]]:
    """Every registered kind and its class (read-only view, for docs and tests)."""
    return dict(_BY_KIND)
