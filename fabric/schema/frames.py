"""The job batch frames FJB1/FJR1 of ``fabric.core.<node>.map.<core>``.

Part of :mod:`fabric.schema` (its docstring has the rules every message follows)."""

from __future__ import annotations

import struct
from typing import Any, Final

from ..errors import BadRequest

# -- the job batch frames (fabric.core.<node>.map.<core>) ---------------------
#
# Little-endian.  A batch request is ``"FJB1" | count u32 | count x length u64 |
# the job inputs back to back``; its reply is ``"FJR1" | count u32 | count x
# (exit_code i32, error u32, length u64) | the outputs back to back``.  ``error`` 0
# means the job ran and ``exit_code`` is the core's; otherwise it is the fabric
# error code and the item's bytes are ``kind`` UTF-8, a newline, then the message.

JOB_BATCH_MAGIC: Final = b"FJB1"
JOB_RESULTS_MAGIC: Final = b"FJR1"
#: the most jobs one batch frame may carry
MAX_JOB_BATCH: Final = 65536
_STRUCT_HEAD = struct.Struct("<4sI")


def encode_job_batch(items: list[Any]) -> bytes:
    """One batch request frame for *items* (bytes-like job inputs)."""
    n = len(items)
    if n > MAX_JOB_BATCH:
        raise BadRequest(f"a job batch holds at most {MAX_JOB_BATCH} jobs, got {n}")
    table = struct.pack(f"<4sI{n}Q", JOB_BATCH_MAGIC, n, *[len(memoryview(x).cast("B")) for x in items])
    return b"".join([table, *items])


def decode_job_batch(data: Any) -> list[memoryview]:
    """The job inputs of a batch request, as views into *data* (no copy); BadRequest if malformed."""
    mv = memoryview(data).cast("B")
    if len(mv) < 8:
        raise BadRequest("job batch frame: truncated header")
    magic, n = _STRUCT_HEAD.unpack_from(mv)
    if magic != JOB_BATCH_MAGIC:
        raise BadRequest(f"job batch frame: bad magic {bytes(magic)!r}")
    if n > MAX_JOB_BATCH:
        raise BadRequest(f"job batch frame: {n} jobs exceeds {MAX_JOB_BATCH}")
    pos = 8 + 8 * n
    if len(mv) < pos:
        raise BadRequest("job batch frame: truncated length table")
    out: list[memoryview] = []
    for length in struct.unpack_from(f"<{n}Q", mv, 8):
        end = pos + length
        if end > len(mv):
            raise BadRequest("job batch frame: a job's length runs past the frame")
        out.append(mv[pos:end])
        pos = end
    if pos != len(mv):
        raise BadRequest(f"job batch frame: {len(mv) - pos} trailing bytes")
    return out


def encode_job_results(results: list[tuple[int, int, Any]]) -> bytes:
    """One batch reply frame from ``(exit_code, error, output)`` triples."""
    n = len(results)
    flat: list[int] = []
    for code, err, out in results:
        flat += (code, err, len(out))
    return b"".join([struct.pack(f"<4sI{'iIQ' * n}", JOB_RESULTS_MAGIC, n, *flat), *[r[2] for r in results]])


def decode_job_results(data: Any) -> list[tuple[int, int, memoryview]]:
    """``(exit_code, error, output view)`` per job of a batch reply; BadRequest if malformed."""
    mv = memoryview(data).cast("B")
    if len(mv) < 8:
        raise BadRequest("job results frame: truncated header")
    magic, n = _STRUCT_HEAD.unpack_from(mv)
    if magic != JOB_RESULTS_MAGIC or n > MAX_JOB_BATCH:
        raise BadRequest("job results frame: bad magic or count")
    pos = 8 + 16 * n
    if len(mv) < pos:
        raise BadRequest("job results frame: truncated table")
    out: list[tuple[int, int, memoryview]] = []
    for code, err, length in struct.iter_unpack("<iIQ", mv[8:pos]):
        end = pos + length
        if end > len(mv):
            raise BadRequest("job results frame: an output runs past the frame")
        out.append((code, err, mv[pos:end]))
        pos = end
    return out
