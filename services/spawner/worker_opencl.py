"""The built-in core ``fabric.opencl`` as a warm worker runs it: one OpenCL kernel per job.

``worker_core.load_core("fabric.opencl", b"")`` makes an :class:`OpenCLCore` (pyopencl is
imported then, never at a worker's start).  A job is the job frame of :mod:`fabric.opencl`
(docs/protocol.md, "OpenCL kernels"); :meth:`OpenCLCore.run` answers ``(0, result frame)``
or ``(code, error record)`` with the HTTP-like code of the failure as the exit code:

* 400 ``kernel_build_failed`` (the build log in the record), ``bad_request`` (argument
  count, a dtype the kernel does not declare, a local size that does not divide the
  global size, more than 3 dimensions, a buffer smaller than the work items), ``invalid_frame``;
* 404 ``unknown_device`` (no such platform/device index, no device of the preferred type);
* 413 ``too_large`` (a buffer beyond the device's allocation limit);
* 503 ``device_unavailable`` (the OpenCL runtime failed during the job: the device's
  context and programs are dropped, the next job makes new ones).

The worker keeps serving after every one of them.  What it keeps between jobs: a
context and queue per device, built programs per (device, sha256 of source and
options), kernels and their argument info per program, and the mappings of the
clients' staging files (dropped once a client unlinks its file).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import re
import stat
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from fabric.errors import BadRequest, FabricError, InternalError, TooLarge, UnknownDevice
from fabric.opencl import (
    INLINE_ALIGN,
    STAGE_DIR,
    STAGE_HEADER,
    STAGE_NAME,
    STAGE_NONCE,
    DeviceInfo,
    DeviceUnavailable,
    InArg,
    JobHeader,
    KernelBuildFailed,
    NumberArg,
    OutArg,
    OutInfo,
    ResultHeader,
    ScalarArg,
    decode_job,
    encode_error,
    encode_result,
)
from fabric.protocol.cores import OPENCL_CORE

from .core_api import CoreError

#: the OpenCL C scalar types and their numpy dtypes (little-endian)
CL_TYPES: dict[str, np.dtype[Any]] = {
    "char": np.dtype("i1"), "uchar": np.dtype("u1"), "short": np.dtype("<i2"), "ushort": np.dtype("<u2"),
    "int": np.dtype("<i4"), "uint": np.dtype("<u4"), "long": np.dtype("<i8"), "ulong": np.dtype("<u8"),
    "half": np.dtype("<f2"), "float": np.dtype("<f4"), "double": np.dtype("<f8"),
    "unsigned char": np.dtype("u1"), "unsigned short": np.dtype("<u2"), "unsigned int": np.dtype("<u4"),
    "unsigned long": np.dtype("<u8"), "bool": np.dtype("u1"),
}
#: pointee types that take a buffer of any dtype (bytes, untyped memory)
ANY_POINTEE = frozenset(("char", "uchar", "unsigned char", "void"))
_VECTOR = re.compile(r"^([a-z ]+?)(2|3|4|8|16)$")
#: programs kept built per worker (least recently used go first)
MAX_PROGRAMS = 64
#: staging files kept mapped per worker
MAX_MAPPINGS = 8
MAX_DIMS = 3
#: the OpenCL value of the __local address qualifier (the spec's 0x119C)
CL_KERNEL_ARG_ADDRESS_LOCAL = 0x119C


#: what a closed staging file's ``bytes`` points at instead of its mapping
_NO_BYTES = np.empty(0, dtype=np.uint8)


class Refused(Exception):
    """A job the worker refuses: *error* goes into the error record."""

    def __init__(self, error: FabricError, *, build_log: str = "", staging: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.build_log = build_log
        self.staging = staging


class _Device:
    """A device's context and queue, and the programs built for it."""

    def __init__(self, cl: Any, platform: int, index: int, dev: Any) -> None:
        self.platform = platform
        self.index = index
        self.dev = dev
        self.ctx = cl.Context([dev])
        self.queue = cl.CommandQueue(self.ctx, dev)
        self.info = DeviceInfo(platform=platform, device=index, name=dev.name.strip(),
                               type=cl.device_type.to_string(dev.type))
        self.max_alloc = int(dev.max_mem_alloc_size)
        self.max_group = int(dev.max_work_group_size)


class _Program:
    """A built program and the kernels taken from it so far, by name."""

    __slots__ = ("program", "kernels")

    def __init__(self, program: Any) -> None:
        self.program = program
        self.kernels: dict[str, _Kernel] = {}


class _Kernel:
    """A kernel and what its parameters declare: ``(address qualifier, type name)`` or None each."""

    def __init__(self, cl: Any, program: Any, name: str) -> None:
        self.kernel = cl.Kernel(program, name)
        self.nargs = int(self.kernel.num_args)
        self.params: list[tuple[int, str, str] | None] = []
        info = cl.kernel_arg_info
        for i in range(self.nargs):
            try:
                self.params.append((int(self.kernel.get_arg_info(i, info.ADDRESS_QUALIFIER)),
                                    str(self.kernel.get_arg_info(i, info.TYPE_NAME)).strip(),
                                    str(self.kernel.get_arg_info(i, info.NAME))))
            except cl.Error:  # the driver keeps no argument info: unchecked
                self.params.append(None)


class _Mapping:
    """A client's staging file, opened and mapped read-write."""

    def __init__(self, name: str) -> None:
        path = os.path.join(STAGE_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise Refused(BadRequest(f"staging file {name!r} cannot be opened here: {exc.strerror}"),
                          staging=True) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size < STAGE_HEADER:
                raise Refused(BadRequest(f"staging file {name!r} is not a single-link regular file of at "
                                         f"least {STAGE_HEADER} bytes"), staging=True)
            self.mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.name = name
        self.size = st.st_size
        self.ino = st.st_ino
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)

    def alive(self) -> bool:
        """Still the client's single-link file of the same size (it unlinks it at close)."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return st.st_nlink == 1 and st.st_size == self.size

    def close(self) -> None:
        self.bytes = _NO_BYTES  # drop the view of the mapping, so it can close
        try:
            self.mm.close()
        except BufferError:  # an OpenCL buffer still holds a view: the mapping goes with it
            pass
        os.close(self.fd)


class OpenCLCore:
    """The ``fabric.opencl`` core: ``run(job frame) -> (exit code, result frame or error record)``."""

    name = OPENCL_CORE

    def __init__(self) -> None:
        try:
            import pyopencl as cl
        except ImportError as exc:
            raise CoreError(f"core {OPENCL_CORE!r}: pyopencl is not installed here ({exc})") from None
        self.cl = cl
        self._platforms: list[list[Any]] | None = None
        self._devices: dict[tuple[int, int], _Device] = {}
        self._programs: OrderedDict[tuple[int, int, bytes], _Program] = OrderedDict()
        self._maps: dict[str, _Mapping] = {}

    # -- the job ------------------------------------------------------------------

    def run(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes | bytearray]:
        cl = self.cl
        try:
            return 0, self._run(data)
        except Refused as r:
            return encode_error(r.error, build_log=r.build_log, staging=r.staging)
        except FabricError as exc:
            return encode_error(exc)
        except cl.Error as exc:
            return encode_error(self._runtime_error(exc))
        except MemoryError:
            return encode_error(TooLarge("the worker ran out of host memory for this job's buffers"))
        except Exception as exc:  # a bug here must not end the worker: the job fails, the next one runs
            return encode_error(InternalError(f"OpenCL core: {type(exc).__name__}: {exc}"))

    def _run(self, data: Any) -> bytearray:
        cl = self.cl
        job, inline = decode_job(data)
        gsize, lsize = _check_sizes(job)
        # the staging file first: a client whose file this node cannot use resends the job inline
        stage = self._stage(job) if job.staging is not None else None
        dev = self._device(job)
        k = self._kernel(dev, job)
        if len(job.args) != k.nargs:
            raise BadRequest(f"kernel {job.kernel!r} takes {k.nargs} arguments, the job has {len(job.args)}")
        items = math.prod(gsize)
        mf = cl.mem_flags
        bufs: list[Any] = []
        outs: list[tuple[OutArg, Any, Any]] = []  # (spec, buffer, staged view or None)
        kernel = k.kernel
        try:
            for i, a in enumerate(job.args):
                p = k.params[i]
                if isinstance(a, (InArg, OutArg)):
                    dt = _dtype(a.dtype, i)
                    nbytes = math.prod(a.shape) * dt.itemsize
                    _check_buffer(p, i, dt, a.shape, items if job.check_sizes else 0)
                    if nbytes > dev.max_alloc:
                        raise TooLarge(f"argument {i}: {nbytes} bytes exceed the device's largest buffer "
                                       f"({dev.max_alloc} bytes)")
                    size = max(nbytes, 1)
                    if isinstance(a, InArg):
                        if a.nbytes != nbytes:
                            raise BadRequest(f"argument {i}: {a.nbytes} bytes for shape {a.shape} of {dt}")
                        if stage is not None:
                            view = _region(stage, a.offset, size, i)
                            buf = cl.Buffer(dev.ctx, mf.READ_ONLY | mf.USE_HOST_PTR, hostbuf=view)
                        else:
                            if a.offset < 0 or a.offset + nbytes > len(inline):
                                raise BadRequest(f"argument {i}: inline bytes {a.offset}..{a.offset + nbytes} "
                                                 f"lie outside the job's {len(inline)} bytes")
                            host = inline[a.offset:a.offset + nbytes] if nbytes else b"\0"
                            buf = cl.Buffer(dev.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=host)
                    else:
                        if stage is not None:
                            view = _region(stage, a.offset, size, i)
                            buf = cl.Buffer(dev.ctx, mf.WRITE_ONLY | mf.USE_HOST_PTR, hostbuf=view)
                            outs.append((a, buf, view))
                        else:
                            buf = cl.Buffer(dev.ctx, mf.WRITE_ONLY, size)
                            outs.append((a, buf, None))
                    bufs.append(buf)
                    kernel.set_arg(i, buf)
                else:
                    kernel.set_arg(i, _scalar(p, i, a))
            t0 = time.perf_counter_ns()
            cl.enqueue_nd_range_kernel(dev.queue, kernel, gsize, lsize)
            if stage is not None:
                # map and unmap: the spec's way to have the device's results in the host memory
                # (zero-copy on a CPU device, a copy back on a GPU)
                for _spec, buf, view in outs:
                    mapped, _ = cl.enqueue_map_buffer(dev.queue, buf, cl.map_flags.READ, 0, (view.nbytes,),
                                                      np.uint8)
                    mapped.base.release(dev.queue)
                dev.queue.finish()
                kernel_ns = time.perf_counter_ns() - t0
                infos = [OutInfo(dtype=s.dtype, shape=s.shape, offset=s.offset, nbytes=v.nbytes, staged=True)
                         for s, _, v in outs]
                frame, _ = encode_result(ResultHeader(device=dev.info, outputs=infos, kernel_ns=kernel_ns), 0)
                return frame
            infos, pos = [], 0
            for spec, _buf, _ in outs:
                n = math.prod(spec.shape) * _dtype(spec.dtype, 0).itemsize
                infos.append(OutInfo(dtype=spec.dtype, shape=spec.shape, offset=pos, nbytes=n))
                pos += -(-n // INLINE_ALIGN) * INLINE_ALIGN
            dev.queue.finish()
            kernel_ns = time.perf_counter_ns() - t0
            # the inline data ends with the last output: a reader refuses bytes after it
            end = max((info.offset + info.nbytes for info in infos), default=0)
            frame, start = encode_result(ResultHeader(device=dev.info, outputs=infos, kernel_ns=kernel_ns), end)
            dest = np.frombuffer(frame, dtype=np.uint8)
            for (_spec, buf, _), info in zip(outs, infos, strict=True):
                if info.nbytes:
                    cl.enqueue_copy(dev.queue, dest[start + info.offset:start + info.offset + info.nbytes], buf,
                                    is_blocking=False)
            dev.queue.finish()
            return frame
        finally:
            for buf in bufs:
                try:
                    buf.release()
                except cl.Error:
                    pass

    # -- devices, programs, kernels ---------------------------------------------------

    def _all(self) -> list[list[Any]]:
        if self._platforms is None:
            cl = self.cl
            try:
                platforms = cl.get_platforms()
            except cl.Error:  # no ICD / no platform at all
                platforms = []
            found = []
            for p in platforms:
                try:
                    found.append(list(p.get_devices()))
                except cl.Error:  # a platform without devices
                    found.append([])
            self._platforms = found
        return self._platforms

    def _device(self, job: JobHeader) -> _Device:
        cl = self.cl
        found = self._all()
        if job.platform >= 0 or job.device >= 0:
            if not (0 <= job.platform < len(found) and 0 <= job.device < len(found[job.platform])):
                raise UnknownDevice(f"no OpenCL device {job.platform}:{job.device} on this node "
                                    f"({sum(map(len, found))} devices on {len(found)} platforms)",
                                    device=f"{job.platform}:{job.device}")
            key = (job.platform, job.device)
        else:
            if job.prefer not in ("", "gpu", "cpu"):
                raise BadRequest(f"device preference {job.prefer!r}: 'gpu', 'cpu' or none")
            every = [(p, d, dev) for p, devs in enumerate(found) for d, dev in enumerate(devs)]
            gpus = [x for x in every if x[2].type & cl.device_type.GPU]
            cpus = [x for x in every if x[2].type & cl.device_type.CPU]
            if job.prefer == "cpu":
                pick = cpus
            elif job.prefer == "gpu":
                pick = gpus or every
            else:
                pick = gpus or cpus or every
            if not pick:
                raise UnknownDevice(f"no OpenCL {job.prefer.upper() or 'device'} on this node", device=job.prefer)
            p, d, _ = max(pick, key=lambda x: int(x[2].global_mem_size)) if pick is gpus else pick[0]
            key = (p, d)
        dev = self._devices.get(key)
        if dev is None:
            dev = self._devices[key] = _Device(cl, key[0], key[1], found[key[0]][key[1]])
        return dev

    def _kernel(self, dev: _Device, job: JobHeader) -> _Kernel:
        cl = self.cl
        digest = hashlib.sha256(job.source.encode() + b"\0" + job.options.encode()).digest()
        pkey = (dev.platform, dev.index, digest)
        entry = self._programs.get(pkey)
        if entry is None:
            program = cl._cl._Program(dev.ctx, job.source)
            options = ("-cl-kernel-arg-info " + job.options).strip().encode()
            try:
                program.build(options, [dev.dev])
            except cl.Error as exc:
                try:
                    log = str(program.get_build_info(dev.dev, cl.program_build_info.LOG))
                except cl.Error:
                    log = str(exc)
                log = _clean_log(log)
                first = next((ln for ln in log.splitlines() if "error" in ln), log.strip()[:200])
                raise Refused(KernelBuildFailed(f"kernel source does not compile on {dev.info.name}: {first}",
                                                build_log=log), build_log=log) from None
            entry = _Program(program)
            self._programs[pkey] = entry
            while len(self._programs) > MAX_PROGRAMS:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(pkey)
        k = entry.kernels.get(job.kernel)
        if k is None:
            try:
                k = entry.kernels[job.kernel] = _Kernel(cl, entry.program, job.kernel)
            except cl.Error:
                try:
                    names = entry.program.get_info(cl.program_info.KERNEL_NAMES)
                except cl.Error:
                    names = "?"
                raise BadRequest(f"no kernel {job.kernel!r} in the source (it has: {names or 'none'})") from None
        return k

    def _runtime_error(self, exc: Any) -> FabricError:
        """The typed error for an OpenCL failure during a job; a device failure drops its context."""
        cl = self.cl
        code = getattr(exc, "code", 0)
        s = cl.status_code
        what = str(exc).strip()
        if code in (s.INVALID_WORK_GROUP_SIZE, s.INVALID_WORK_ITEM_SIZE, s.INVALID_GLOBAL_WORK_SIZE,
                    s.INVALID_ARG_SIZE, s.INVALID_ARG_VALUE, s.INVALID_KERNEL_ARGS, s.INVALID_VALUE,
                    s.INVALID_GLOBAL_OFFSET, s.INVALID_HOST_PTR):
            return BadRequest(f"OpenCL refused the job: {what}")
        if code == s.INVALID_BUFFER_SIZE:
            return TooLarge(f"OpenCL refused a buffer: {what}")
        # anything else is the device or its runtime failing: start afresh on the next job
        self._devices.clear()
        self._programs.clear()
        self._platforms = None
        return DeviceUnavailable(f"the OpenCL device failed during the job: {what}")

    # -- staging files ---------------------------------------------------------------

    def _stage(self, job: JobHeader) -> _Mapping:
        st = job.staging
        assert st is not None
        if not STAGE_NAME.match(st.name):
            raise Refused(BadRequest(f"staging file name {st.name!r} is not a fabric staging file"), staging=True)
        m = self._maps.get(st.name)
        if m is not None and not m.alive():
            m.close()
            del self._maps[st.name]
            m = None
        if m is None:
            m = _Mapping(st.name)
            self._maps[st.name] = m
        # the client's files come and go: drop the mappings of the ones it unlinked
        for name, other in list(self._maps.items()):
            if other is not m and (not other.alive() or len(self._maps) > MAX_MAPPINGS):
                other.close()
                del self._maps[name]
        if len(st.nonce) != STAGE_NONCE or m.mm[:STAGE_NONCE] != st.nonce:
            raise Refused(BadRequest(f"staging file {st.name!r}: the nonce does not match"), staging=True)
        if st.size > m.size:
            raise Refused(BadRequest(f"staging file {st.name!r} has {m.size} bytes, the job says {st.size}"),
                          staging=True)
        return m

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        self._programs.clear()
        self._devices.clear()


# -- checks -----------------------------------------------------------------------------


def _check_sizes(job: JobHeader) -> tuple[list[int], list[int] | None]:
    g = job.global_size
    if not 1 <= len(g) <= MAX_DIMS:
        raise BadRequest(f"global size {g}: 1 to {MAX_DIMS} dimensions")
    if any(x < 1 for x in g):
        raise BadRequest(f"global size {g}: every dimension must be at least 1")
    loc = job.local_size
    if loc is not None:
        if len(loc) != len(g):
            raise BadRequest(f"local size {loc} has {len(loc)} dimensions, the global size {g} has {len(g)}")
        if any(x < 1 for x in loc) or any(gx % lx for gx, lx in zip(g, loc, strict=True)):
            raise BadRequest(f"local size {loc} does not divide the global size {g}")
    return g, loc


def _dtype(text: str, i: int) -> np.dtype[Any]:
    try:
        dt = np.dtype(text)
    except TypeError:
        raise BadRequest(f"argument {i}: {text!r} is not a numpy dtype") from None
    if dt.kind not in "biufc" or dt.byteorder == ">" or dt.fields is not None:
        raise BadRequest(f"argument {i}: dtype {text!r} is not a little-endian numeric type")
    return dt


def _pointee(type_name: str) -> tuple[str, int]:
    """``"float4*"`` -> ``("float", 4)``; qualifiers dropped."""
    base = type_name.replace("*", "").replace("const", "").replace("volatile", "").replace("restrict", "")
    base = " ".join(base.split())
    m = _VECTOR.match(base)
    return (m.group(1).strip(), int(m.group(2))) if m else (base, 1)


def _check_buffer(p: tuple[int, str, str] | None, i: int, dt: np.dtype[Any], shape: list[int], items: int) -> None:
    """The kernel's parameter *p* takes a buffer of *dt*, with at least *items* elements (0: unchecked)."""
    elements = math.prod(shape)
    lanes = 1
    if p is not None:
        qual, type_name, name = p
        if "*" not in type_name:
            raise BadRequest(f"argument {i} ({name}) is a {type_name} scalar, the job passes a buffer")
        if qual == CL_KERNEL_ARG_ADDRESS_LOCAL:
            raise BadRequest(f"argument {i} ({name}) is __local memory, which jobs cannot pass")
        base, lanes = _pointee(type_name)
        want = CL_TYPES.get(base)
        if base in ANY_POINTEE or want is None:  # bytes, void, or a struct/typedef: any dtype
            lanes = 1
        elif want != dt:
            raise BadRequest(f"argument {i} ({name}) is {type_name}, the array is {dt.name} ({dt.str}): "
                             f"pass an array of {want.name}")
    if items and elements // lanes < items:
        raise BadRequest(f"argument {i}: {elements} elements for {items} work items; set check_sizes=False "
                         f"for kernels whose buffers are not one element per work item")


def _scalar(p: tuple[int, str, str] | None, i: int, a: ScalarArg | NumberArg) -> Any:
    if p is not None and "*" in p[1]:
        raise BadRequest(f"argument {i} ({p[2]}) is a {p[1]} buffer, the job passes a scalar")
    want = CL_TYPES.get(_pointee(p[1])[0]) if p is not None and _pointee(p[1])[1] == 1 else None
    if isinstance(a, NumberArg):
        if want is None:
            raise BadRequest(f"argument {i}: a plain number needs the kernel's argument info; pass a numpy scalar")
        try:
            with np.errstate(all="raise"):
                value = np.array(a.value).astype(want, casting="same_kind" if want.kind == "f" else "unsafe")
        except (FloatingPointError, OverflowError, TypeError) as exc:
            raise BadRequest(f"argument {i}: {a.value!r} does not fit {want.name}: {exc}") from None
        if want.kind in "iu" and value != a.value:
            raise BadRequest(f"argument {i} ({p[2] if p else ''}) is {want.name}; {a.value!r} does not fit it")
        return value[()]
    dt = _dtype(a.dtype, i)
    if len(a.value) != dt.itemsize:
        raise BadRequest(f"argument {i}: {len(a.value)} value bytes for a {dt.name}")
    if want is not None and want != dt:
        raise BadRequest(f"argument {i} ({p[2] if p else ''}) is {p[1] if p else ''}, the scalar is {dt.name}: "
                         f"pass numpy.{want.name}(...)")
    return np.frombuffer(a.value, dtype=dt)[0]


def _region(m: _Mapping, offset: int, size: int, i: int) -> Any:
    if offset < STAGE_HEADER or offset + size > m.size:
        raise Refused(BadRequest(f"argument {i}: staging bytes {offset}..{offset + size} lie outside "
                                 f"{STAGE_HEADER}..{m.size}"))
    return m.bytes[offset:offset + size]


_TEMPFILE = re.compile(r"\S*tempfile_\w+\.cl")


def _clean_log(log: str) -> str:
    """The build log without the compiler's temporary file paths."""
    return _TEMPFILE.sub("<source>", log).strip()
