"""OpenCL kernels as fabric jobs: the client side of the built-in core ``fabric.opencl``.

``fc.opencl(source, kernel, global_size, args)`` (``AsyncFabricClient.opencl`` calls
:func:`run_opencl`) picks a device (:func:`choose_device`, from the gpu-monitor's node
records), loads the built-in core ``fabric.opencl`` on that device's node (once per node;
loading is idempotent on the spawner), sends one *job frame* and turns the *result
frame* back into numpy arrays.  The worker side is ``services/spawner/worker_opencl.py``;
both use the codec here, and docs/protocol.md ("OpenCL kernels") describes it byte by byte.

How the buffers travel:

* **same host** (the client's :func:`fabric.hostid.boot_id` is the node's ``host_id``):
  the inputs are copied into a *staging file* ``/dev/shm/fabric-stage-<pid>-<hex>`` that
  this client owns and reuses (its pages are faulted once); the job carries the file's
  name, a random nonce written at its start and the offsets; the worker maps the file,
  runs the kernel on it in place and writes the outputs into it; the client copies them out.
* **otherwise**, or when the worker refuses the staging file (another ``/dev/shm``), the
  buffers travel inline in the frame, within the NATS max payload (:class:`TooLarge`
  beyond it).  ``$FABRIC_OPENCL_STAGING=0`` or ``AsyncFabricClient(local=False)`` forces it.

Failures come back as an error record and are raised as the typed errors of
:mod:`fabric.errors`: :class:`KernelBuildFailed` (with ``build_log``), :class:`BadRequest`,
:class:`UnknownDevice`, :class:`TooLarge`, :class:`DeviceUnavailable`.
"""

from __future__ import annotations

import atexit
import glob
import math
import mmap
import os
import re
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import numpy as np

from .errors import (
    BadRequest,
    DeviceUnavailable,
    FabricError,
    InvalidFrame,
    JobFailed,
    KernelBuildFailed,
    NotFound,
    TooLarge,
    Unavailable,
    UnknownDevice,
    UnknownNode,
    registered_kinds,
)
from .gpupair import gpu_by_device
from .hostid import boot_id

__all__ = [
    "Out",
    "KernelBuildFailed",
    "DeviceUnavailable",
    "OPENCL_CORE",
    "run_opencl",
    "choose_device",
    "close_staging",
    "encode_job",
    "decode_job",
    "encode_result",
    "decode_result",
    "encode_error",
    "decode_error",
]

#: the built-in core's name (services/spawner/worker_core.py has the same constant)
OPENCL_CORE = "fabric.opencl"

JOB_MAGIC = b"FCLJ"
RESULT_MAGIC = b"FCLR"
VERSION = 1
#: magic, version u16, flags u16, header length u32, reserved u32 (zero)
PREFIX = struct.Struct("<4sHHII")
#: inline buffers start on this boundary (relative to the frame's start)
INLINE_ALIGN = 16
#: a header larger than this is refused before decoding (sources are text, not data)
MAX_HEADER = 16 << 20

#: staging files: where, what their names look like, their header, their regions' alignment
STAGE_DIR = "/dev/shm"
STAGE_PREFIX = "fabric-stage-"
STAGE_NAME = re.compile(r"^fabric-stage-[0-9]{1,10}-[0-9a-f]{32}$")
STAGE_NONCE = 16
STAGE_HEADER = 4096          # the nonce, then nothing: regions start on their own pages
STAGE_ALIGN = 4096           # page-aligned regions: zero-copy USE_HOST_PTR buffers on every driver
STAGE_MIN = 1 << 20
STAGE_MAX = 4 << 30
#: idle staging files a client keeps (more are made while calls overlap, then closed)
STAGE_KEEP = 4

#: how the node's pool of the core is loaded (every client must load it the same way:
#: another setting would be 409 Conflict on the spawner)
LOAD_SETTINGS: dict[str, Any] = {"min_workers": 1, "max_workers": 1, "time_limit": 60.0, "idle": 30.0}
#: node records are re-read from the gpu-monitor at most this often
NODES_TTL_S = 2.0
#: the environment switch that turns same-host staging off (``0``)
STAGING_ENV = "FABRIC_OPENCL_STAGING"
#: copies into and out of a staging file larger than this run on two threads (numpy
#: releases the GIL while it copies; one thread does not reach the memory bandwidth)
PARALLEL_COPY_MIN = 1 << 20


# -- what the user passes ---------------------------------------------------------


class Out:
    """An output buffer of *shape* and *dtype*: ``Out(n, "float32")``, ``Out((64, 64), np.float64)``.

    The kernel writes it; :func:`run_opencl` returns it as a numpy array, in argument order.
    """

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: int | Sequence[int], dtype: Any = np.float32) -> None:
        dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in dims):
            raise BadRequest(f"Out shape must be non-negative ints, got {shape!r}")
        self.shape: tuple[int, ...] = tuple(int(d) for d in dims)
        self.dtype: np.dtype[Any] = _plain_dtype(np.dtype(dtype), "Out")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"Out({self.shape!r}, {self.dtype.name!r})"


def _plain_dtype(dt: np.dtype[Any], what: str) -> np.dtype[Any]:
    """*dt* in little-endian order; BadRequest for object, structured and other non-numeric types."""
    if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None:
        raise BadRequest(f"{what}: dtype {dt} is not a plain numeric type")
    return dt.newbyteorder("<") if dt.byteorder == ">" else dt


# -- the frames -------------------------------------------------------------------


class InArg(msgspec.Struct, tag="in", tag_field="kind", omit_defaults=True):
    """An input buffer: *nbytes* at *offset* (of the inline data, or of the staging file)."""

    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


class OutArg(msgspec.Struct, tag="out", tag_field="kind", omit_defaults=True):
    """An output buffer; *offset* in the staging file, or -1: inline in the result."""

    dtype: str
    shape: list[int]
    offset: int = -1


class ScalarArg(msgspec.Struct, tag="scalar", tag_field="kind"):
    """A scalar of a numpy dtype: its little-endian bytes."""

    dtype: str
    value: bytes


class NumberArg(msgspec.Struct, tag="number", tag_field="kind"):
    """A plain number: the worker casts it to the type the kernel declares."""

    value: int | float


Arg = InArg | OutArg | ScalarArg | NumberArg


class Staging(msgspec.Struct):
    """Where the buffers of a same-host job are: a file in /dev/shm, its nonce, its size."""

    name: str
    nonce: bytes
    size: int


class JobHeader(msgspec.Struct, omit_defaults=True):
    """The MessagePack header of a job frame (docs/protocol.md "OpenCL kernels")."""

    source: str
    kernel: str
    global_size: list[int]
    args: list[Arg]
    local_size: list[int] | None = None
    #: an explicit device (both >= 0), else the preference below
    platform: int = -1
    device: int = -1
    #: "gpu" (a GPU, else any), "cpu" (a CPU only), "" (a GPU, else a CPU, else anything)
    prefer: str = ""
    check_sizes: bool = True
    options: str = ""
    staging: Staging | None = None


class DeviceInfo(msgspec.Struct):
    """The device that ran a job."""

    platform: int
    device: int
    name: str = ""
    type: str = ""


class OutInfo(msgspec.Struct):
    """One output of a result: inline at *offset* of the result's data, or in the staging file."""

    dtype: str
    shape: list[int]
    offset: int
    nbytes: int
    staged: bool = False


class ResultHeader(msgspec.Struct):
    device: DeviceInfo
    outputs: list[OutInfo]
    kernel_ns: int = 0


class ErrorRecord(msgspec.Struct, omit_defaults=True):
    """A failed job's output (its exit code is *code*)."""

    code: int
    kind: str
    message: str
    build_log: str = ""
    #: the failure is about the staging file: the client may send the job again inline
    staging: bool = False


_ENC = msgspec.msgpack.Encoder()
_JOB_DEC = msgspec.msgpack.Decoder(JobHeader)
_RESULT_DEC = msgspec.msgpack.Decoder(ResultHeader)
_ERROR_DEC = msgspec.msgpack.Decoder(ErrorRecord)


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _frame(magic: bytes, header: bytes, data_len: int) -> tuple[bytearray, int]:
    """A frame with *header* in place and room for *data_len* bytes; the data's offset."""
    start = _align(PREFIX.size + len(header), INLINE_ALIGN)
    out = bytearray(start + data_len)
    PREFIX.pack_into(out, 0, magic, VERSION, 0, len(header), 0)
    out[PREFIX.size:PREFIX.size + len(header)] = header
    return out, start


def _parse(frame: Any, magic: bytes) -> tuple[memoryview, memoryview]:
    """The header bytes and the data of a frame; InvalidFrame when it is not one."""
    view = memoryview(frame).cast("B")
    if len(view) < PREFIX.size:
        raise InvalidFrame(f"OpenCL frame of {len(view)} bytes is shorter than its {PREFIX.size}-byte prefix")
    got, version, _flags, hlen, _reserved = PREFIX.unpack_from(view)
    if got != magic:
        raise InvalidFrame(f"OpenCL frame: magic {bytes(got)!r}, expected {magic!r}")
    if version != VERSION:
        raise InvalidFrame(f"OpenCL frame version {version}; this side speaks {VERSION}")
    if hlen > MAX_HEADER or PREFIX.size + hlen > len(view):
        raise InvalidFrame(f"OpenCL frame: header of {hlen} bytes does not fit the {len(view)}-byte frame")
    start = _align(PREFIX.size + hlen, INLINE_ALIGN)
    return view[PREFIX.size:PREFIX.size + hlen], view[min(start, len(view)):]


def encode_job(header: JobHeader, inline: Sequence[tuple[int, Any]] = ()) -> bytearray:
    """A job frame: *header*, then each ``(offset, buffer)`` of *inline* at its data offset."""
    hdr = _ENC.encode(header)
    size = max((off + memoryview(b).nbytes for off, b in inline), default=0)
    frame, start = _frame(JOB_MAGIC, hdr, size)
    for off, buf in inline:
        mv = memoryview(buf).cast("B")
        frame[start + off:start + off + len(mv)] = mv
    return frame


def decode_job(frame: Any) -> tuple[JobHeader, memoryview]:
    """The header and the inline data of a job frame; InvalidFrame for anything else."""
    hdr, data = _parse(frame, JOB_MAGIC)
    try:
        return _JOB_DEC.decode(hdr), data
    except msgspec.ValidationError as exc:
        raise InvalidFrame(f"OpenCL job header: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidFrame(f"OpenCL job header is not MessagePack: {exc}") from None


def encode_result(header: ResultHeader, data_len: int) -> tuple[bytearray, int]:
    """A result frame with room for *data_len* inline bytes, and where they start."""
    return _frame(RESULT_MAGIC, _ENC.encode(header), data_len)


def decode_result(frame: Any) -> tuple[ResultHeader, memoryview]:
    hdr, data = _parse(frame, RESULT_MAGIC)
    try:
        return _RESULT_DEC.decode(hdr), data
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidFrame(f"OpenCL result header: {exc}") from None


def encode_error(err: FabricError, *, build_log: str = "", staging: bool = False) -> tuple[int, bytes]:
    """``(exit code, error record)`` for a failed job: the exit code is the error's HTTP-like code."""
    return err.code, _ENC.encode(ErrorRecord(code=err.code, kind=err.kind, message=err.message,
                                             build_log=build_log, staging=staging))


def decode_error(data: Any) -> ErrorRecord | None:
    """The error record of a failed job, or None when *data* is not one."""
    try:
        return _ERROR_DEC.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def raise_record(rec: ErrorRecord, node: str) -> None:
    """Raise the typed error an error record describes (``build_log`` on KernelBuildFailed)."""
    cls = registered_kinds().get(rec.kind, FabricError)
    fields: dict[str, Any] = {"node": node}
    if rec.build_log or rec.kind == "kernel_build_failed":
        fields["build_log"] = rec.build_log
    raise cls(rec.message, **fields)


# -- device choice -------------------------------------------------------------------


def _is_gpu(dev: Any) -> bool:
    return "GPU" in dev.type.upper().split()


def _is_cpu(dev: Any) -> bool:
    return "CPU" in dev.type.upper().split()


def _gpu_score(rec: Any, dev: Any, local_host_id: str) -> tuple[float, float, int, str]:
    """Lower is better: most free memory, lowest utilisation, the client's host, then the id."""
    free, util = float(dev.global_memory), 0.0
    # the NVML GPU this device is, paired as the monitor pairs them (by PCI bus id; see
    # fabric.gpupair): its free memory and utilisation are this device's, not a neighbour's
    g = gpu_by_device(rec.gpus, rec.opencl.devices).get(dev.id)
    if g is not None:
        if g.memory_free >= 0:
            free = float(g.memory_free)
        if g.utilization_gpu >= 0:
            util = g.utilization_gpu
    local = 0 if local_host_id and rec.host.host_id == local_host_id else 1
    return (-free, util, local, dev.id)


def _cpu_score(rec: Any, dev: Any, local_host_id: str) -> tuple[int, float, int, str]:
    """Lower is better: the client's own host, the least busy CPU, the most compute units."""
    local = 0 if local_host_id and rec.host.host_id == local_host_id else 1
    return (local, rec.cpu.percent, -dev.compute_units, dev.id)


def _best(candidates: list[tuple[Any, Any]], local_host_id: str, kind: str = "") -> tuple[Any, Any] | None:
    gpus = [(r, d) for r, d in candidates if _is_gpu(d)]
    cpus = [(r, d) for r, d in candidates if _is_cpu(d)]
    if kind != "cpu" and gpus:
        return min(gpus, key=lambda rd: _gpu_score(rd[0], rd[1], local_host_id))
    if kind == "gpu":
        return None
    if cpus:
        return min(cpus, key=lambda rd: _cpu_score(rd[0], rd[1], local_host_id))
    if kind == "" and candidates:  # accelerators and custom devices: the last resort
        return min(candidates, key=lambda rd: rd[1].id)
    return None


def choose_device(records: Sequence[Any], device: str | None, local_host_id: str) -> tuple[str, int, int]:
    """``(node, platform_index, device_index)`` of the device a job should run on.

    *device* is an OpenCL device id ``"<node>:cl:<p>:<d>"``, ``"gpu"``, ``"cpu"``, a node
    name, or None: the best device the fabric has -- a GPU (most free memory, lowest
    utilisation, read from the NVML GPU :func:`fabric.gpupair.gpu_by_device` pairs it
    with) where there is one, else a CPU device (the client's own host first, then
    the least busy).  Raises UnknownNode (a node not in *records*) or UnknownDevice.
    """
    by_node = {r.node: r for r in records}
    if device is not None and ":cl:" in device:
        node, _, rest = device.rpartition(":cl:")
        rec = by_node.get(node)
        if rec is None:
            raise UnknownNode(f"OpenCL device {device!r}: no node {node!r} in the registry", node=node)
        for d in rec.opencl.devices:
            if d.id == device:
                return node, d.platform_index, d.device_index
        known = ", ".join(d.id for d in rec.opencl.devices) or "none"
        raise UnknownDevice(f"no OpenCL device {device!r} on node {node!r} (its devices: {known})", device=device)
    if device in ("gpu", "cpu"):
        live = [r for r in records if r.status != "stale"]
        best = _best([(r, d) for r in live for d in r.opencl.devices], local_host_id, device)
        if best is None:
            raise UnknownDevice(f"no OpenCL {device.upper()} device on any live node", device=device)
        return best[0].node, best[1].platform_index, best[1].device_index
    if device is not None:
        rec = by_node.get(device)
        if rec is None:
            raise UnknownNode(f"no node {device!r} in the registry (a device is '<node>:cl:<p>:<d>', "
                              f"'gpu', 'cpu' or a node name)", node=device)
        best = _best([(rec, d) for d in rec.opencl.devices], local_host_id)
        if best is None:
            why = rec.opencl.reason or "it reports none"
            raise UnknownDevice(f"node {device!r} has no OpenCL device ({why})", device=device)
        return rec.node, best[1].platform_index, best[1].device_index
    live = [r for r in records if r.status != "stale"]
    best = _best([(r, d) for r in live for d in r.opencl.devices], local_host_id)
    if best is None:
        raise UnknownDevice("no live node of the fabric reports an OpenCL device")
    return best[0].node, best[1].platform_index, best[1].device_index


# -- same-host staging ---------------------------------------------------------------

_ALL_STAGERS: weakref.WeakSet[_Stager] = weakref.WeakSet()
_ALL_LOCK = threading.Lock()


#: what a closed staging file's ``bytes`` points at instead of its mapping
_NO_BYTES = np.empty(0, dtype=np.uint8)


class StagingFile:
    """A file in /dev/shm this process made, mapped, with a random nonce at its start."""

    def __init__(self, capacity: int) -> None:
        self.name = f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        self.path = os.path.join(STAGE_DIR, self.name)
        self.capacity = capacity
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # reserve the pages now: a full /dev/shm fails here, not as SIGBUS in a write later
            os.posix_fallocate(fd, 0, capacity)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(fd, capacity, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self.fd = fd
        self.nonce = secrets.token_bytes(STAGE_NONCE)
        self.mm[:STAGE_NONCE] = self.nonce
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)

    def view(self, offset: int, shape: Sequence[int], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        n = math.prod(shape) * dtype.itemsize
        return self.bytes[offset:offset + n].view(dtype).reshape(shape)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.bytes = _NO_BYTES  # drop the view of the mapping, so it can close
        try:
            self.mm.close()
        except BufferError:  # a view is still alive: the mapping goes with it
            pass
        os.close(self.fd)
        self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Stager:
    """A client's staging files: one per call in flight, a few kept idle for the next calls."""

    def __init__(self) -> None:
        self.idle: list[StagingFile] = []
        self.busy: set[StagingFile] = set()
        with _ALL_LOCK:
            _ALL_STAGERS.add(self)

    def acquire(self, size: int) -> StagingFile:
        fits = [f for f in self.idle if f.capacity >= size]
        if fits:
            f = min(fits, key=lambda f: f.capacity)
            self.idle.remove(f)
        else:
            if size > STAGE_MAX:
                raise TooLarge(f"the job's buffers ({size} bytes) exceed the staging limit of {STAGE_MAX} bytes")
            if not self.idle and not self.busy:
                _sweep_dead()
            f = StagingFile(max(STAGE_MIN, 1 << (size - 1).bit_length()))
            if len(self.idle) >= STAGE_KEEP:  # keep the biggest few
                self.idle.sort(key=lambda f: f.capacity)
                self.idle.pop(0).close()
        self.busy.add(f)
        return f

    def release(self, f: StagingFile, *, reusable: bool = True) -> None:
        """Give *f* back; ``reusable=False`` (the job may still be writing into it) closes it."""
        self.busy.discard(f)
        if reusable and f.fd >= 0:
            self.idle.append(f)
        else:
            f.close()

    def close(self) -> None:
        for f in [*self.idle, *self.busy]:
            f.close()
        self.idle.clear()
        self.busy.clear()


def _sweep_dead() -> None:
    """Remove the staging files of this user's processes that died without cleaning up."""
    uid = os.getuid()
    for path in glob.glob(os.path.join(STAGE_DIR, STAGE_PREFIX + "*")):
        name = os.path.basename(path)
        if not STAGE_NAME.match(name):
            continue
        pid = int(name.split("-")[2])
        try:
            if os.lstat(path).st_uid != uid:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except OSError:  # alive but not ours to signal, or the file went away
            pass


def close_staging(client: Any | None = None) -> None:
    """Unlink the staging files of *client* (``AsyncFabricClient.close`` calls it), or of every client."""
    if client is not None:
        st = getattr(client, "_opencl_stager", None)
        if st is not None:
            st.close()
        return
    with _ALL_LOCK:
        stagers = list(_ALL_STAGERS)
    for st in stagers:
        st.close()


atexit.register(close_staging)


# -- the call ------------------------------------------------------------------------


class _ClientState:
    """What run_opencl keeps on a client: loaded cores per node, node records, staging verdicts."""

    def __init__(self) -> None:
        self.cores: dict[str | None, Any] = {}
        self.records: list[Any] | None = None
        self.records_at = -math.inf
        self.staging_ok: dict[str, bool] = {}


def _state(client: Any) -> _ClientState:
    st = getattr(client, "_opencl_state", None)
    if st is None:
        st = _ClientState()
        client._opencl_state = st
    return st


def _stager(client: Any) -> _Stager:
    st = getattr(client, "_opencl_stager", None)
    if st is None:
        st = _Stager()
        client._opencl_stager = st
    return st


def _sizes(value: Any, what: str) -> list[int]:
    dims = [value] if isinstance(value, (int, np.integer)) else list(value)
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in dims):
        raise BadRequest(f"{what} must be an int or a sequence of ints, got {value!r}")
    return [int(d) for d in dims]


def _normalize_args(args: Sequence[Any]) -> list[Any]:
    """Each argument as an ndarray (input, little-endian), an Out, a numpy scalar or a number."""
    out: list[Any] = []
    for i, a in enumerate(args):
        if isinstance(a, Out):
            out.append(a)
        elif isinstance(a, np.ndarray):
            dt = _plain_dtype(a.dtype, f"argument {i}")
            out.append(a.astype(dt) if dt != a.dtype else a)
        elif isinstance(a, np.generic):
            dt = _plain_dtype(a.dtype, f"argument {i}")
            out.append(np.array(a, dtype=dt)[()])
        elif isinstance(a, (bool, int, float)):
            out.append(a)
        else:
            raise BadRequest(f"argument {i}: {type(a).__name__} is not a numpy array, fabric.Out or a scalar")
    return out


def _build(source: str, kernel: str, gsize: list[int], lsize: list[int] | None, sel: dict[str, Any],
           check_sizes: bool, args: list[Any], stage: StagingFile | None) -> tuple[bytearray, list[Any]]:
    """The job frame (inputs staged into *stage* or inline) and the output specs in order."""
    specs: list[Arg] = []
    inline: list[tuple[int, Any]] = []
    copies: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
    outs: list[Any] = []
    pos = STAGE_HEADER if stage is not None else 0
    align = STAGE_ALIGN if stage is not None else INLINE_ALIGN
    for a in args:
        if isinstance(a, np.ndarray):
            off = pos
            pos = _align(pos + max(a.nbytes, 1), align)
            if stage is not None:
                copies.append((stage.view(off, a.shape, a.dtype), a))
            else:
                inline.append((off, np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
            specs.append(InArg(dtype=a.dtype.str, shape=list(a.shape), offset=off, nbytes=a.nbytes))
        elif isinstance(a, Out):
            off = -1
            if stage is not None:
                off = pos
                pos = _align(pos + max(a.nbytes, 1), align)
            specs.append(OutArg(dtype=a.dtype.str, shape=list(a.shape), offset=off))
            outs.append(a)
        elif isinstance(a, np.generic):
            specs.append(ScalarArg(dtype=a.dtype.str, value=a.tobytes()))
        else:
            specs.append(NumberArg(value=a))
    _copy(copies)
    staging = Staging(name=stage.name, nonce=stage.nonce, size=stage.capacity) if stage is not None else None
    header = JobHeader(source=source, kernel=kernel, global_size=gsize, local_size=lsize, args=specs,
                       check_sizes=check_sizes, staging=staging, **sel)
    return encode_job(header, inline), outs


def _staged_size(args: list[Any]) -> int:
    pos = STAGE_HEADER
    for a in args:
        if isinstance(a, (np.ndarray, Out)):
            pos = _align(pos + max(a.nbytes, 1), STAGE_ALIGN)
    return pos


async def _records(client: Any, st: _ClientState) -> list[Any] | None:
    """The node records (cached for NODES_TTL_S), or None when no gpu-monitor answers."""
    now = time.monotonic()
    if now - st.records_at < NODES_TTL_S:
        return st.records
    nodes = getattr(client, "nodes", None)
    records = None
    if nodes is not None:
        try:
            records = list(await nodes())
        except Unavailable:
            records = None
    st.records, st.records_at = records, now
    return records


async def _core(client: Any, st: _ClientState, node: str | None) -> Any:
    core = st.cores.get(node)
    if core is None:
        try:
            core = await client.load_core(OPENCL_CORE, b"", node=node, **LOAD_SETTINGS)
        except Unavailable:
            if node is None:
                raise Unavailable("no spawner answers: start fabric with `fabric up`") from None
            raise UnknownNode(f"no spawner answers for node {node!r}", node=node) from None
        st.cores[node] = core
        st.cores[core.node] = core
    return core


def _staging_wanted(client: Any) -> bool:
    if os.environ.get(STAGING_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    local = getattr(client, "_local", None)
    return bool(getattr(local, "enabled", True))


async def run_opencl(client: Any, source: str, kernel: str, global_size: int | Sequence[int],
                     args: Sequence[Any], *, local_size: int | Sequence[int] | None = None,
                     device: str | None = None, check_sizes: bool = True,
                     timeout: float | None = None) -> list[np.ndarray[Any, Any]]:
    """Run *kernel* of *source* over *global_size* work items; the output buffers, in order.

    *args* follow the kernel's parameters: a numpy array (input buffer), :class:`Out`
    (output buffer) or a numpy scalar (a plain int/float is cast to the declared type).
    *device*: see :func:`choose_device`.  ``check_sizes`` refuses buffers with fewer
    elements than work items; turn it off for kernels that are not one element per
    work item (a matmul over ``(n, m)`` reading rows of ``k``).

    >>> c, = await run_opencl(fc, VADD, "vadd", n, [a, b, Out(n, np.float32)])  # doctest: +SKIP
    """
    if not isinstance(source, str) or not isinstance(kernel, str) or not kernel:
        raise BadRequest("source and kernel must be strings (the kernel's name non-empty)")
    gsize = _sizes(global_size, "global_size")
    lsize = None if local_size is None else _sizes(local_size, "local_size")
    norm = _normalize_args(args)
    st = _state(client)
    records = await _records(client, st)
    here = boot_id()
    same_host: bool | None = None
    sel: dict[str, Any] = {}
    if records is not None:
        node, p, d = choose_device(records, device, here)
        sel = {"platform": p, "device": d}
        rec = next(r for r in records if r.node == node)
        same_host = bool(here) and rec.host.host_id == here
        target: str | None = node
    elif device is not None and ":cl:" in device:
        # no gpu-monitor: trust the id's shape, the worker checks the indices
        target, _, rest = device.rpartition(":cl:")
        try:
            p, d = (int(x) for x in rest.split(":"))
        except ValueError:
            raise UnknownDevice(f"{device!r} is not an OpenCL device id '<node>:cl:<p>:<d>'") from None
        sel = {"platform": p, "device": d}
    elif device in ("gpu", "cpu"):
        target, sel = None, {"prefer": device}
    else:
        target, sel = device, {"prefer": ""}
    core = await _core(client, st, target)
    node = core.node
    stage_ok = st.staging_ok.get(node, same_host is not False)
    for attempt in range(3):
        stage = None
        if stage_ok and _staging_wanted(client):
            try:
                stage = _stager(client).acquire(_staged_size(norm))
            except OSError:
                stage = None  # /dev/shm is full or absent: inline
        answered = False  # the worker is done with the staging file (a reply or an error record came)
        try:
            frame, outs = _build(source, kernel, gsize, lsize, sel, check_sizes, norm, stage)
            if stage is None:
                _check_inline(client, frame, outs)
            try:
                data = await core.run(frame, timeout=timeout)
            except JobFailed as exc:
                rec = decode_error(getattr(exc, "output", b"") or b"")
                if rec is None:
                    raise
                answered = True
                if rec.staging and stage is not None:
                    st.staging_ok[node] = stage_ok = False  # another /dev/shm: inline from now on
                    continue
                raise_record(rec, node)
            except NotFound:
                answered = True  # the spawner refused it: no worker saw the job
                if attempt:
                    raise
                # the pool is gone (unloaded, the spawner restarted): load it again
                st.cores = {k: v for k, v in st.cores.items() if v is not core}
                core = await _core(client, st, target)
                continue
            answered = True
            if stage is not None:
                st.staging_ok[node] = True
            return _outputs(data, outs, stage)
        finally:
            if stage is not None:
                # a job that did not answer (timeout, cancel, crash) may still write into the file
                _stager(client).release(stage, reusable=answered)
    raise Unavailable("the OpenCL job could not be placed")  # pragma: no cover - the loop returns or raises


def _check_inline(client: Any, frame: bytearray, outs: list[Out]) -> None:
    """TooLarge when an inline job or its result would not fit the NATS max payload."""
    limit = getattr(client, "max_payload", 0) if getattr(client, "nc", None) is not None else 0
    result_size = sum(_align(o.nbytes, INLINE_ALIGN) for o in outs) + 4096
    if limit and max(len(frame), result_size) > limit:
        raise TooLarge(
            f"the OpenCL job's buffers travel inline ({len(frame)} bytes in, about {result_size} out) and "
            f"exceed the NATS max payload of {limit} bytes: run the client on the node's host "
            f"(same-host staging has no such limit), or split the work into smaller jobs")


def _outputs(data: Any, outs: list[Out], stage: StagingFile | None) -> list[np.ndarray[Any, Any]]:
    header, inline = decode_result(data)
    if len(header.outputs) != len(outs):
        raise InvalidFrame(f"OpenCL result: {len(header.outputs)} outputs for {len(outs)} Out arguments")
    result = []
    copies = []
    for o, spec in zip(header.outputs, outs, strict=True):  # lengths checked above
        dt = spec.dtype
        if o.staged:
            if stage is None:
                raise InvalidFrame("OpenCL result: a staged output for an inline job")
            if o.offset < STAGE_HEADER or o.offset + spec.nbytes > stage.capacity:
                raise InvalidFrame("OpenCL result: a staged output lies outside the staging file")
            arr = np.empty(spec.shape, dt)
            copies.append((arr, stage.view(o.offset, spec.shape, dt)))
        else:
            if o.offset < 0 or o.offset + spec.nbytes > len(inline):
                raise InvalidFrame("OpenCL result: an inline output lies outside the frame")
            count = math.prod(spec.shape)
            arr = np.frombuffer(inline, dtype=dt, count=count, offset=o.offset).reshape(spec.shape).copy()
        result.append(arr)
    _copy(copies)
    return result


_copier: ThreadPoolExecutor | None = None


def _copy(pairs: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]) -> None:
    """``dst[...] = src`` for each pair; big ones split in halves, one half on a helper thread."""
    global _copier
    total = sum(dst.nbytes for dst, _ in pairs)
    if total < PARALLEL_COPY_MIN:
        for dst, src in pairs:
            np.copyto(dst, src)
        return
    mine: list[tuple[Any, Any]] = []
    theirs: list[tuple[Any, Any]] = []
    for dst, src in pairs:
        if dst.ndim and dst.shape[0] >= 2:
            h = dst.shape[0] // 2
            mine.append((dst[:h], src[:h]))
            theirs.append((dst[h:], src[h:]))
        else:
            mine.append((dst, src))
    if _copier is None:
        _copier = ThreadPoolExecutor(1, thread_name_prefix="fabric-opencl-copy")
    done = _copier.submit(_copy_all, theirs)
    try:
        _copy_all(mine)
    finally:
        done.result()


def _copy_all(pairs: list[tuple[Any, Any]]) -> None:
    for dst, src in pairs:
        np.copyto(dst, src)
