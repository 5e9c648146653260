"""Every request and reply of the public contract, as msgspec Structs.

This is the one schema module: services and clients import their messages from
here, and docs/protocol.md documents exactly these fields.  Rules:

* JSON is the default encoding; a request with header ``Content-Type:
  application/msgpack`` is MessagePack, and the reply uses the request's encoding.
  Bulk bytes on the hot path travel in the binary frame of ``fabric_ext.wire``
  (``Content-Type: application/x-fabric-frame``); in JSON, ``bytes`` fields are
  base64 strings (msgspec's standard), in MessagePack they are raw ``bin``.
* New fields are appended with defaults, so old peers keep working
  (msgspec's schema-evolution rules); unknown fields are ignored.
* Encoders and decoders are created once, here, and reused.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Final, TypeVar

import msgspec
from msgspec import Meta, Struct

from .errors import BadRequest, FabricError

__all__ = [
    "AllocRequest",
    "AllocReply",
    "HandleRequest",
    "FreeReply",
    "ReallocRequest",
    "WriteRequest",
    "WriteReply",
    "ReadRequest",
    "ReadReply",
    "ReadItem",
    "ReadvRequest",
    "ReadResult",
    "ReadvReply",
    "WriteItem",
    "WritevRequest",
    "WriteResult",
    "WritevReply",
    "ShareReply",
    "RenewRequest",
    "RenewReply",
    "StatReply",
    "AttachReply",
    "MemInfoReply",
    "ErrorInfo",
    "ErrorReply",
    "LoadCoreRequest",
    "CoreInfo",
    "CoreRequest",
    "CoreListReply",
    "encode_job_batch",
    "decode_job_batch",
    "encode_job_results",
    "decode_job_results",
    "Codec",
    "JSON",
    "MSGPACK",
    "CONTENT_TYPE_HEADER",
    "MSGPACK_CONTENT_TYPE",
    "FRAME_CONTENT_TYPE",
]

CONTENT_TYPE_HEADER: Final = "Content-Type"
MSGPACK_CONTENT_TYPE: Final = "application/msgpack"
FRAME_CONTENT_TYPE: Final = "application/x-fabric-frame"

#: sizes, offsets and lengths are unsigned 64-bit on the wire
U64 = Annotated[int, Meta(ge=0)]  # msgspec rejects values past 2**64-1 itself
#: a handle token (see fabric.handles); at most 255 characters so it fits a frame item
HandleStr = Annotated[str, Meta(min_length=1, max_length=255)]
#: owner names are short labels used for quotas and per-owner segments
OwnerStr = Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9_.@-]*$")]
#: lease time-to-live in seconds; 0 means no lease
TTL = Annotated[float, Meta(ge=0, le=365 * 24 * 3600)]


class Message(Struct, kw_only=True, omit_defaults=False):
    """Base of every wire message."""


# -- memory (allocator) ----------------------------------------------------


class AllocRequest(Message):
    """``fabric.mem.alloc`` / ``fabric.mem.<node>.alloc``: allocate *size* bytes (zeroed)."""

    size: U64
    owner: OwnerStr = ""
    ttl_s: TTL = 0.0


class AllocReply(Message):
    """A new (or moved) block: its handle, size and lease deadline (0 = no lease)."""

    handle: str
    size: int
    node: str
    lease_deadline_ms: int = 0


class HandleRequest(Message):
    """Requests that name one handle and nothing else: free, stat, share, attach."""

    handle: HandleStr


class FreeReply(Message):
    freed: int


class ReallocRequest(Message):
    handle: HandleStr
    size: U64


class WriteRequest(Message):
    handle: HandleStr
    data: bytes
    offset: U64 = 0


class WriteReply(Message):
    written: int


class ReadRequest(Message):
    handle: HandleStr
    offset: U64 = 0
    #: bytes to read; ``None`` reads to the end of the block
    length: U64 | None = None


class ReadReply(Message):
    data: bytes


class ReadItem(Message):
    handle: HandleStr
    offset: U64 = 0
    length: U64 | None = None


class ReadvRequest(Message):
    items: Annotated[list[ReadItem], Meta(max_length=65536)]


class ErrorInfo(Message):
    """An error inside a batch reply, or the body of an error reply."""

    code: int
    kind: str
    message: str


class ReadResult(Message):
    data: bytes | None = None
    error: ErrorInfo | None = None


class ReadvReply(Message):
    items: list[ReadResult]


class WriteItem(Message):
    handle: HandleStr
    data: bytes
    offset: U64 = 0


class WritevRequest(Message):
    items: Annotated[list[WriteItem], Meta(max_length=65536)]


class WriteResult(Message):
    written: int = 0
    error: ErrorInfo | None = None


class WritevReply(Message):
    items: list[WriteResult]


class ShareReply(Message):
    """A read-only handle to the same block."""

    handle: str


class RenewRequest(Message):
    handle: HandleStr
    ttl_s: TTL


class RenewReply(Message):
    lease_deadline_ms: int


class StatReply(Message):
    handle: str
    node: str
    size: int
    capacity: int
    owner: str
    generation: int
    writable: bool
    lease_deadline_ms: int = 0


class AttachReply(Message):
    """Where a same-host client maps the block's segment for the local fast path."""

    node: str
    seg: int
    path: str
    size: int
    boot_id: str
    hostname: str


class MemInfoReply(Message):
    """One node's arena statistics (``fabric.mem.info`` / ``fabric.mem.<node>.info``)."""

    node: str
    capacity: int
    mapped: int
    segments: int
    in_use: int
    peak_in_use: int
    blocks: int
    free_bytes: int
    largest_free: int
    fragmentation: float
    alloc_count: int
    free_count: int
    owners: dict[str, dict[str, int]] = {}


class ErrorReply(Message):
    """Body of an error reply (the ADR-32 headers carry the same code and text)."""

    error: ErrorInfo


def error_info(exc: FabricError) -> ErrorInfo:
    return ErrorInfo(code=exc.code, kind=exc.kind, message=exc.message)


# -- compute cores (spawner: services/spawner/pools.py) ------------------------

#: a core id: one subject token, minted by the spawner that loaded the core
CoreId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
#: a core's name (also sent to its workers in the v1 "new compute core" message)
CoreName = Annotated[str, Meta(min_length=1, max_length=255)]


class LoadCoreRequest(Message):
    """``fabric.core.load`` / ``fabric.core.<node>.load``: start a warm pool for a core.

    ``library`` is the ``.so`` file's bytes (raw ``bin`` in MessagePack, base64 in
    JSON); empty with ``name == "fabric.python"`` selects the built-in Python worker.
    """

    name: CoreName
    library: bytes = b""
    min_workers: Annotated[int, Meta(ge=0, le=256)] = 1
    max_workers: Annotated[int, Meta(ge=1, le=256)] = 4
    #: seconds one job may run before its worker is killed (JobTimeout); 0 = no limit
    time_limit_s: Annotated[float, Meta(ge=0, le=7 * 24 * 3600)] = 60.0
    #: an idle worker above min_workers retires after this many seconds
    idle_s: Annotated[float, Meta(ge=0, le=24 * 3600)] = 30.0
    #: also listen for external v1 workers (unix socket, and TCP on ``listen_host``)
    external: bool = False
    listen_host: str = "127.0.0.1"


class CoreInfo(Message):
    """One loaded core and its pool (reply of load and stats, items of list)."""

    core: str
    node: str
    name: str
    min_workers: int
    max_workers: int
    time_limit_s: float
    workers: int = 0
    idle: int = 0
    external_workers: int = 0
    queued: int = 0
    running: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    crashes: int = 0
    timeouts: int = 0
    workers_started: int = 0
    workers_refused: int = 0
    #: where external v1 workers connect (``unix:/path`` and ``tcp:HOST:PORT``), when asked for
    listen_unix: str = ""
    listen_tcp: str = ""


class CoreRequest(Message):
    """``fabric.core.<node>.stats`` / ``unload``: one core by id."""

    core: CoreId


class CoreListReply(Message):
    """``fabric.core.<node>.list``: every core loaded on the node."""

    node: str
    cores: list[CoreInfo] = []


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


def encode_job_batch(items: "list[Any]") -> bytes:
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


def encode_job_results(results: "list[tuple[int, int, Any]]") -> bytes:
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


# -- codecs ----------------------------------------------------------------

T = TypeVar("T")


class Codec:
    """One wire encoding (JSON or MessagePack) with cached per-type decoders."""

    __slots__ = ("name", "content_type", "_encoder", "_decoders", "_decoder_factory")

    def __init__(self, name: str, content_type: str, encoder: Any, decoder_factory: Any) -> None:
        self.name = name
        self.content_type = content_type
        self._encoder = encoder
        self._decoder_factory = decoder_factory
        self._decoders: dict[type, Any] = {}

    def encode(self, msg: Any) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, data: bytes, type_: type[T]) -> T:
        """Decode *data* as *type_*; malformed input raises :class:`BadRequest`."""
        dec = self._decoders.get(type_)
        if dec is None:
            dec = self._decoders[type_] = self._decoder_factory(type_)
        try:
            return dec.decode(data)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid {type_.__name__}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed {self.name}: {exc}") from None


JSON: Final = Codec("JSON", "application/json", msgspec.json.Encoder(), msgspec.json.Decoder)
MSGPACK: Final = Codec("MessagePack", MSGPACK_CONTENT_TYPE, msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder)


def codec_for(headers: dict[str, str] | None) -> Codec:
    """The codec a request asked for through its ``Content-Type`` header."""
    if headers and headers.get(CONTENT_TYPE_HEADER) == MSGPACK_CONTENT_TYPE:
        return MSGPACK
    return JSON
