"""One attempt of a scheduler task on this node, and the :class:`TaskResult` each way of ending makes.

Part of the task runner (:mod:`.tasks`, which pulls the tasks and reports the
results): this module knows nothing of NATS or of the pull loop.  An :class:`Attempt`
is what the runner holds from the moment a :class:`TaskRun` arrives until its result
exists (or the scheduler cancels it); the functions below turn what a pool job or a
process left into the result the scheduler reads (docs/protocol.md "Tasks", kinds of
work and outcomes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fabric.errors import (
    CoreLoadFailed,
    FabricError,
    InvalidFrame,
    JobTimeout,
    NotFound,
    Unavailable,
    WorkerCrashed,
)
from fabric.protocol.pytasks import decode_python_error
from fabric.schema import ExitInfo
from fabric.schema.tasks import PYTHON, TaskError, TaskResult, TaskRun

__all__ = ["Attempt", "OK", "ERROR", "CRASHED", "TIMEOUT", "REFUSED", "task_error", "job_result", "exit_result",
           "now_ms"]

# TaskResult.outcome values
OK = "ok"
ERROR = "error"
CRASHED = "crashed"
TIMEOUT = "timeout"
REFUSED = "refused"

#: pool errors that mean the job never ran: the node cannot run the task (outcome "refused")
_NOT_RUN = (NotFound, CoreLoadFailed, Unavailable)


def now_ms() -> int:
    return int(time.time() * 1000)


class Attempt:
    """One ``TaskRun`` this node holds: queued for a worker, running, or being stopped."""

    __slots__ = ("run", "key", "start_ms", "t0", "worker", "kill", "timer", "timed_out", "dropped", "job", "pool",
                 "alone")

    def __init__(self, run: TaskRun) -> None:
        self.run = run
        #: ``"<id>/<attempt>"``: how the pull names it (running, recorded, cancel)
        self.key = f"{run.id}/{run.attempt}"
        self.start_ms = 0
        #: when it started (perf_counter), for the runner's estimate of how long tasks take
        self.t0 = 0.0
        #: the pool (core id) or process (``<node>:<local>``) that runs it
        self.worker = ""
        #: stops it where it runs (None until it runs somewhere)
        self.kill: Callable[[], None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: ran past TaskRun.timeout_s: it was killed, its end is a "timeout"
        self.timed_out = False
        #: cancelled by the scheduler: however it ends, nothing is reported
        self.dropped = False
        #: the pool job and its pool (python, core, opencl)
        self.job: Any = None
        self.pool: Any = None
        #: runs in a job of its own: its batch's worker died, and it may be why
        self.alone = False

    def result(self, outcome: str, *, output: bytes = b"", exit_code: int = 0,
               error: TaskError | None = None) -> TaskResult:
        return TaskResult(id=self.run.id, attempt=self.run.attempt, outcome=outcome, exit_code=exit_code,
                          output=output, error=error, worker=self.worker, start_ms=self.start_ms or now_ms(),
                          end_ms=now_ms())


def task_error(exc: FabricError) -> TaskError:
    return TaskError(code=exc.code, kind=exc.kind, message=exc.message)


def _timeout_error(a: Attempt) -> TaskError:
    return TaskError(code=JobTimeout.code, kind=JobTimeout.kind,
                     message=f"task {a.run.id} ran past its timeout of {a.run.timeout_s:g}s; it was killed")


def job_result(a: Attempt, code: int, out: Any, err: FabricError | None) -> TaskResult:
    """What a pool job's ``(exit_code, output, error)`` means for a python, core or opencl task."""
    if err is not None:
        if isinstance(err, JobTimeout) or a.timed_out:
            return a.result(TIMEOUT, error=_timeout_error(a) if a.timed_out else task_error(err))
        if isinstance(err, WorkerCrashed):
            return a.result(CRASHED, error=task_error(err))
        if isinstance(err, _NOT_RUN):
            return a.result(REFUSED, error=task_error(err))
        return a.result(ERROR, error=task_error(err))
    out = bytes(out)
    if code == 0:
        return a.result(OK, output=out)
    if a.run.kind == PYTHON and code == 1:
        try:
            e = decode_python_error(out)
        except InvalidFrame as exc:
            return a.result(ERROR, exit_code=code, error=TaskError(
                code=500, kind="task_error", message=f"the Python worker's error frame is malformed: {exc.message}"))
        return a.result(ERROR, exit_code=code, error=TaskError(
            code=500, kind="task_error", message=e.message, type=e.type, traceback=e.traceback, exc=e.exc))
    core = a.run.core or a.run.kind
    return a.result(ERROR, exit_code=code, output=out, error=TaskError(
        code=500, kind="job_failed", message=f"core {core!r} returned exit code {code}"))


def exit_result(a: Attempt, ex: ExitInfo | None) -> TaskResult:
    """What an ``exec`` task's process exit means: ok with exit code 0, else error (or timeout)."""
    if a.timed_out:
        return a.result(TIMEOUT, error=_timeout_error(a), output=ex.stdout if ex is not None else b"")
    if ex is None:  # pragma: no cover - the table always records an exit before setting done
        return a.result(CRASHED, error=TaskError(code=500, kind="internal", message="the process left no exit"))
    if ex.exit_code == 0:
        return a.result(OK, output=ex.stdout)
    code = ex.exit_code if ex.exit_code is not None else -(ex.signal or 0)
    how = f"exited with code {ex.exit_code}" if ex.exit_code is not None else f"was ended by signal {ex.signal}"
    tail = ex.stderr[-2048:].decode("utf-8", "replace").strip()
    return a.result(ERROR, exit_code=code, output=ex.stdout, error=TaskError(
        code=500, kind="job_failed", message=f"the process {how} ({ex.reason})" + (f": {tail}" if tail else "")))
