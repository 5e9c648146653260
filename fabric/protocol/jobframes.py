"""FJB1/FJR1: the job batch frames of ``fabric.core.<node>.map.<core>`` (docs/protocol.md "map").

Little-endian.  A batch request is ``"FJB1" | count u32 | count x length u64 | the job
inputs back to back``; its reply is ``"FJR1" | count u32 | count x (exit_code i32,
error u32, length u64) | the outputs back to back``.  ``error`` 0 means the job ran and
``exit_code`` is the core's; otherwise it is the fabric error code and the item's bytes
are ``kind`` UTF-8, a newline, then the message.  Both directions are read by the same
rules (:mod:`.reader`): a count above :data:`MAX_JOB_BATCH` or whose table cannot fit,
a length running past the end and trailing bytes are all :class:`~fabric.errors.InvalidFrame`.
The client encodes batches and decodes results; the spawner's job lane the reverse.
Part of :mod:`fabric.protocol` (stdlib and fabric.errors only).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from ..errors import BadRequest
from .reader import Reader, as_bytes_view

__all__ = ["JOB_BATCH_MAGIC", "JOB_RESULTS_MAGIC", "MAX_JOB_BATCH", "encode_job_batch", "decode_job_batch",
           "encode_job_results", "decode_job_results", "results_frame_size"]

JOB_BATCH_MAGIC: Final = b"FJB1"
JOB_RESULTS_MAGIC: Final = b"FJR1"
#: the most jobs one batch frame may carry (either direction)
MAX_JOB_BATCH: Final = 65536

_COUNT = struct.Struct("<I")
_RESULT = struct.Struct("<iIQ")
#: magic and count, the fixed head of both frames
_HEAD = len(JOB_BATCH_MAGIC) + _COUNT.size


def results_frame_size(count: int, outputs: int = 0) -> int:
    """Bytes of a results frame of *count* jobs whose outputs sum to *outputs* bytes."""
    return _HEAD + count * _RESULT.size + outputs


def encode_job_batch(items: list[Any]) -> bytes:
    """One batch request frame for *items* (bytes-like job inputs)."""
    n = len(items)
    if n > MAX_JOB_BATCH:
        raise BadRequest(f"a job batch holds at most {MAX_JOB_BATCH} jobs, got {n}")
    table = struct.pack(f"<4sI{n}Q", JOB_BATCH_MAGIC, n, *[as_bytes_view(x).nbytes for x in items])
    return b"".join([table, *items])


def decode_job_batch(data: Any) -> list[memoryview]:
    """The job inputs of a batch request, as views into *data* (no copy); InvalidFrame if malformed."""
    r = Reader(data, "job batch frame")
    r.magic(JOB_BATCH_MAGIC)
    n = r.count(r.unpack(_COUNT, "count")[0], MAX_JOB_BATCH, "count")
    out = r.payloads(r.integers(n, "Q", "lengths"), "job")
    r.end()
    return out


def encode_job_results(results: list[tuple[int, int, Any]]) -> bytes:
    """One batch reply frame from ``(exit_code, error, output)`` triples."""
    n = len(results)
    if n > MAX_JOB_BATCH:
        raise BadRequest(f"a job results frame holds at most {MAX_JOB_BATCH} results, got {n}")
    flat: list[int] = []
    for code, err, out in results:
        flat += (code, err, as_bytes_view(out).nbytes)
    return b"".join([struct.pack(f"<4sI{'iIQ' * n}", JOB_RESULTS_MAGIC, n, *flat), *[r[2] for r in results]])


def decode_job_results(data: Any) -> list[tuple[int, int, memoryview]]:
    """``(exit_code, error, output view)`` per job of a batch reply; InvalidFrame if malformed."""
    r = Reader(data, "job results frame")
    r.magic(JOB_RESULTS_MAGIC)
    n = r.count(r.unpack(_COUNT, "count")[0], MAX_JOB_BATCH, "count")
    entries = r.table(n, _RESULT, "results")
    outs = r.payloads([length for _, _, length in entries], "output")
    r.end()
    return [(code, err, out) for (code, err, _), out in zip(entries, outs, strict=True)]
