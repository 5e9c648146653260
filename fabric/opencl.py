"""OpenCL kernels as fabric jobs: the frames and the device choice both sides share.

The built-in core ``fabric.opencl`` runs one kernel per job.  The client side is an
object each client owns (:class:`fabric.client.opencl.OpenCLRunner`, behind
``fc.opencl(source, kernel, global_size, args)``); the worker side is
``services/spawner/worker_opencl.py``.  Both use what is here: :class:`Out` (an output
buffer), the job, result and error frames (FCLJ/FCLR, docs/protocol.md "OpenCL kernels"
byte by byte), the layout constants of same-host staging files, and
:func:`choose_device`, which picks a device from the gpu-monitor's node records.

How the buffers travel:

* **same host** (the client's :func:`fabric.hostid.boot_id` is the node's ``host_id``):
  the inputs are copied into a *staging file* ``/dev/shm/fabric-stage-<pid>-<hex>`` that
  the client owns and reuses (its pages are faulted once); the job carries the file's
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

import math
import re
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from .errors import (
    BadRequest,
    DeviceUnavailable,
    FabricError,
    InvalidFrame,
    KernelBuildFailed,
    UnknownDevice,
    UnknownNode,
    registered_kinds,
)
from .gpupair import gpu_by_device
from .protocol.clframes import (
    INLINE_ALIGN,
    JOB_MAGIC,
    MAX_HEADER,
    PREFIX,
    RESULT_MAGIC,
    VERSION,
    check_inline,
    pack_frame,
    unpack_frame,
)
from .protocol.cores import OPENCL_CORE
from .protocol.env import STAGING_ENV

__all__ = [
    "Out",
    "KernelBuildFailed",
    "DeviceUnavailable",
    "OPENCL_CORE",
    "choose_device",
    "encode_job",
    "decode_job",
    "encode_result",
    "decode_result",
    "encode_error",
    "decode_error",
]


# the frame layout (JOB_MAGIC, RESULT_MAGIC, VERSION, PREFIX, INLINE_ALIGN, MAX_HEADER) is
# fabric.protocol.clframes'; re-exported here with the headers that travel inside it
__all__ += ["JOB_MAGIC", "RESULT_MAGIC", "VERSION", "PREFIX", "INLINE_ALIGN", "MAX_HEADER", "STAGING_ENV"]

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


def encode_job(header: JobHeader, inline: Sequence[tuple[int, Any]] = ()) -> bytearray:
    """A job frame: *header*, then each ``(offset, buffer)`` of *inline* at its data offset.

    The inline data ends with the furthest-reaching buffer (the reader refuses bytes after it).
    """
    hdr = _ENC.encode(header)
    size = max((off + memoryview(b).nbytes for off, b in inline), default=0)
    frame, start = pack_frame(JOB_MAGIC, hdr, size)
    for off, buf in inline:
        mv = memoryview(buf).cast("B")
        frame[start + off:start + off + len(mv)] = mv
    return frame


def decode_job(frame: Any) -> tuple[JobHeader, memoryview]:
    """The header and the inline data of a job frame; InvalidFrame for anything else.

    The inline data must hold the ``in`` buffers of an inline job, and nothing after
    them; a staged job (its buffers in the staging file) has none.
    """
    hdr, data = unpack_frame(frame, JOB_MAGIC)
    try:
        job = _JOB_DEC.decode(hdr)
    except msgspec.ValidationError as exc:
        raise InvalidFrame(f"OpenCL job header: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidFrame(f"OpenCL job header is not MessagePack: {exc}") from None
    inline = [] if job.staging is not None else [(a.offset, a.nbytes) for a in job.args if isinstance(a, InArg)]
    check_inline(data, inline, "OpenCL job frame")
    return job, data


def encode_result(header: ResultHeader, data_len: int) -> tuple[bytearray, int]:
    """A result frame with room for *data_len* inline bytes (up to the end of the last inline output)."""
    return pack_frame(RESULT_MAGIC, _ENC.encode(header), data_len)


def decode_result(frame: Any) -> tuple[ResultHeader, memoryview]:
    """The header and the inline data of a result frame: exactly the inline (not staged) outputs."""
    hdr, data = unpack_frame(frame, RESULT_MAGIC)
    try:
        result = _RESULT_DEC.decode(hdr)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidFrame(f"OpenCL result header: {exc}") from None
    check_inline(data, [(o.offset, o.nbytes) for o in result.outputs if not o.staged], "OpenCL result frame")
    return result, data


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
