"""FPY1/FPYE: the frames of a ``python`` task (docs/protocol.md "Python tasks").

A python task's payload, as the built-in Python core runs it, is one FPY1 frame
(little-endian)::

    "FPY1" | fn_len u32 | ndeps u32 | fn (fn_len bytes)
           | ndeps x (id_len u16 | value_len u64 | id | value)
           | call (the rest)

``fn`` is ``cloudpickle.dumps(fn)`` (a worker keeps the last functions it unpickled,
keyed by these bytes, so ``fc.map`` pays for one unpickle per worker, not per task);
``call`` is the pickled ``(args, kwargs)``, in which a future of another task is the
persistent id ``("fabric.task", <id>)``; each dependency entry is that task's pickled
result, substituted when ``call`` is unpickled.

The worker's output is ``pickle.dumps(result)`` with exit code 0, or, when the call
raised, exit code 1 and one FPYE frame -- never a pickle, so the spawner reads it
without unpickling what user code produced::

    "FPYE" | type_len u32 | message_len u32 | traceback_len u32 | exc_len u32
           | type | message | traceback (UTF-8) | exc (the pickled exception, or empty)

Part of :mod:`fabric.protocol` (stdlib and fabric.errors only).
"""

from __future__ import annotations

import struct
from typing import Any, Final, NamedTuple

from .reader import Reader, as_bytes_view

__all__ = ["PY_TASK_MAGIC", "PY_ERROR_MAGIC", "TASK_PERSISTENT_TAG", "MAX_DEPS", "PythonTask", "PythonError",
           "encode_python_task", "decode_python_task", "encode_python_error", "decode_python_error"]

PY_TASK_MAGIC: Final = b"FPY1"
PY_ERROR_MAGIC: Final = b"FPYE"
#: the first element of the persistent id that stands for another task's result
TASK_PERSISTENT_TAG: Final = "fabric.task"
#: the most dependencies one task may have (SubmitRequest.deps)
MAX_DEPS: Final = 4096

_HEAD = struct.Struct("<II")
_DEP = struct.Struct("<HQ")
_ERR = struct.Struct("<IIII")


class PythonTask(NamedTuple):
    """A decoded FPY1 frame: views into the received buffer."""

    fn: memoryview
    deps: dict[str, memoryview]
    call: memoryview


class PythonError(NamedTuple):
    """A decoded FPYE frame."""

    type: str
    message: str
    traceback: str
    exc: bytes


def encode_python_task(fn: Any, call: Any, deps: list[tuple[str, Any]] | None = None) -> bytes:
    """One FPY1 frame: the pickled function, the pickled ``(args, kwargs)``, the dependencies' pickled results."""
    deps = deps or []
    parts: list[Any] = [PY_TASK_MAGIC, _HEAD.pack(as_bytes_view(fn).nbytes, len(deps)), fn]
    for task_id, value in deps:
        tid = task_id.encode()
        parts += [_DEP.pack(len(tid), as_bytes_view(value).nbytes), tid, value]
    parts.append(call)
    return b"".join(parts)


def decode_python_task(data: Any) -> PythonTask:
    """The parts of an FPY1 frame (InvalidFrame if malformed)."""
    r = Reader(data, "python task frame")
    r.magic(PY_TASK_MAGIC)
    fn_len, ndeps = r.unpack(_HEAD, "header")
    r.count(ndeps, MAX_DEPS, "ndeps")
    fn = r.take(fn_len, "fn")
    deps: dict[str, memoryview] = {}
    for i in range(ndeps):
        id_len, value_len = r.unpack(_DEP, f"dependency {i}")
        task_id = bytes(r.take(id_len, f"dependency {i} id")).decode("utf-8", "replace")
        deps[task_id] = r.take(value_len, f"dependency {i} value")
    return PythonTask(fn, deps, r.take(r.left(), "call"))


def encode_python_error(type_name: str, message: str, traceback: str, exc: bytes = b"") -> bytes:
    """One FPYE frame: what a call raised."""
    t, m, tb = (s.encode("utf-8", "replace") for s in (type_name, message, traceback))
    return b"".join([PY_ERROR_MAGIC, _ERR.pack(len(t), len(m), len(tb), len(exc)), t, m, tb, exc])


def decode_python_error(data: Any) -> PythonError:
    """The parts of an FPYE frame (InvalidFrame if malformed)."""
    r = Reader(data, "python error frame")
    r.magic(PY_ERROR_MAGIC)
    lens = r.unpack(_ERR, "header")
    t, m, tb = (bytes(r.take(n, f)).decode("utf-8", "replace") for n, f in zip(lens[:3], ("type", "message",
                                                                                       "traceback"), strict=True))
    exc = bytes(r.take(lens[3], "exc"))
    r.end()
    return PythonError(t, m, tb, exc)
