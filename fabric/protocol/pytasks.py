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

Inside a node (never on NATS), the task runner may hand a pool worker several short
tasks as one job, and get their outputs back as one -- so a ``fc.map`` of tiny calls
pays for a ring round trip per batch, not per task::

    "FPYB" | count u32 | count x (frame_len u32 | one FPY1 frame)
    "FPYR" | count u32 | count x (code u8 | 3 zero bytes | micros u32 | out_len u32 | out)

``code`` and ``out`` are each task's own (0 and a pickle, or 1 and an FPYE frame);
``micros`` is how long it ran.

Part of :mod:`fabric.protocol` (stdlib and fabric.errors only).
"""

from __future__ import annotations

import struct
from typing import Any, Final, NamedTuple

from ..errors import InvalidFrame
from .reader import Reader, as_bytes_view

__all__ = ["PY_TASK_MAGIC", "PY_ERROR_MAGIC", "PY_BATCH_MAGIC", "PY_RESULTS_MAGIC", "TASK_PERSISTENT_TAG", "MAX_DEPS",
           "MAX_BATCH", "PythonTask", "PythonError", "BatchOutput", "encode_python_task", "decode_python_task",
           "encode_python_error", "decode_python_error", "encode_batch", "decode_batch", "encode_batch_results",
           "decode_batch_results", "check_python_task"]

PY_TASK_MAGIC: Final = b"FPY1"
PY_ERROR_MAGIC: Final = b"FPYE"
PY_BATCH_MAGIC: Final = b"FPYB"
PY_RESULTS_MAGIC: Final = b"FPYR"
#: the most tasks in one FPYB frame
MAX_BATCH: Final = 4096
#: the first element of the persistent id that stands for another task's result
TASK_PERSISTENT_TAG: Final = "fabric.task"
#: the most dependencies one task may have (SubmitRequest.deps)
MAX_DEPS: Final = 4096

_HEAD = struct.Struct("<II")
_DEP = struct.Struct("<HQ")
_ERR = struct.Struct("<IIII")
_U32 = struct.Struct("<I")
_OUT = struct.Struct("<B3xII")


class PythonTask(NamedTuple):
    """A decoded FPY1 frame: views into the received buffer."""

    fn: memoryview
    deps: dict[str, memoryview]
    call: memoryview


class BatchOutput(NamedTuple):
    """One task's output in an FPYR frame."""

    code: int
    micros: int
    out: memoryview


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


def encode_batch(frames: list[Any]) -> bytes:
    """One FPYB frame of FPY1 frames."""
    parts: list[Any] = [PY_BATCH_MAGIC, _U32.pack(len(frames))]
    for frame in frames:
        parts += [_U32.pack(as_bytes_view(frame).nbytes), frame]
    return b"".join(parts)


def decode_batch(data: Any) -> list[memoryview]:
    """The FPY1 frames of an FPYB frame (InvalidFrame if malformed)."""
    r = Reader(data, "python batch frame")
    r.magic(PY_BATCH_MAGIC)
    (count,) = r.unpack(_U32, "count")
    r.count(count, MAX_BATCH, "count")
    frames = []
    for i in range(count):
        (n,) = r.unpack(_U32, f"frame {i} length")
        frames.append(r.take(n, f"frame {i}"))
    r.end()
    return frames


def encode_batch_results(outputs: list[tuple[int, int, Any]]) -> bytes:
    """One FPYR frame of ``(code, micros, out)``."""
    parts: list[Any] = [PY_RESULTS_MAGIC, _U32.pack(len(outputs))]
    for code, micros, out in outputs:
        parts += [_OUT.pack(code, min(max(micros, 0), 0xFFFFFFFF), as_bytes_view(out).nbytes), out]
    return b"".join(parts)


def decode_batch_results(data: Any) -> list[BatchOutput]:
    """The outputs of an FPYR frame (InvalidFrame if malformed).

    Read with ``unpack_from`` rather than a :class:`Reader` (the same checks, spelled out):
    a node reads one of these per batch of tasks, on its busiest path.
    """
    r = Reader(data, "python batch results frame")
    r.magic(PY_RESULTS_MAGIC)
    (count,) = r.unpack(_U32, "count")
    r.count(count, MAX_BATCH, "count")
    view, pos, end = r.view, r.pos, len(r.view)
    unpack, head = _OUT.unpack_from, _OUT.size
    outputs = []
    for i in range(count):
        if end - pos < head:
            raise InvalidFrame(f"truncated python batch results frame: output {i} header needs {head} bytes at "
                               f"offset {pos}, only {end - pos} left")
        code, micros, n = unpack(view, pos)
        pos += head
        if end - pos < n:
            raise InvalidFrame(f"truncated python batch results frame: output {i} needs {n} bytes at offset {pos}, "
                               f"only {end - pos} left")
        outputs.append(BatchOutput(code, micros, view[pos:pos + n]))
        pos += n
    if pos != end:
        raise InvalidFrame(f"{end - pos} trailing bytes after python batch results frame")
    return outputs


def check_python_task(data: Any) -> None:
    """The cheap part of :func:`decode_python_task`: the magic, and a header whose function fits the frame
    (InvalidFrame if not).  A node checks each task it receives with this; its worker decodes the rest."""
    view = as_bytes_view(data)
    if len(view) < 12 or bytes(view[:4]) != PY_TASK_MAGIC:
        raise InvalidFrame(f"python task frame: expected magic {PY_TASK_MAGIC!r} and a header, got "
                           f"{bytes(view[:4])!r} in {len(view)} bytes")
    fn_len, ndeps = _HEAD.unpack_from(view, 4)
    if fn_len > len(view) - 12 or ndeps > MAX_DEPS:
        raise InvalidFrame(f"python task frame: fn_len {fn_len} / ndeps {ndeps} do not fit {len(view)} bytes")
