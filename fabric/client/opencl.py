"""OpenCL kernels as fabric jobs: the client's side, an object each client owns.

``fc.opencl(source, kernel, global_size, args)`` asks the client's :class:`OpenCLRunner`
(made on first use, closed with the client): it picks a device
(:func:`fabric.opencl.choose_device`, from the gpu-monitor's node records, cached for
``NODES_TTL_S``), loads the built-in core ``fabric.opencl`` on that device's node (once
per node; loading is idempotent on the spawner), sends one job frame and turns the
result frame back into numpy arrays.  Buffers travel through a same-host staging file
(:mod:`fabric.client.staging`) when the client runs on the node's host, else inline in
the frame, within the NATS max payload.  The frames and the device choice are
:mod:`fabric.opencl`, which the worker shares; this module and numpy load only when a
client runs its first kernel.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadRequest, InvalidFrame, JobFailed, NotFound, TooLarge, Unavailable, UnknownDevice, UnknownNode
from ..hostid import boot_id
from ..opencl import (
    INLINE_ALIGN,
    LOAD_SETTINGS,
    NODES_TTL_S,
    STAGE_ALIGN,
    STAGE_HEADER,
    Arg,
    InArg,
    JobHeader,
    NumberArg,
    Out,
    OutArg,
    ScalarArg,
    Staging,
    _plain_dtype,
    choose_device,
    decode_error,
    decode_result,
    encode_job,
    raise_record,
)
from ..protocol.clframes import align as _align
from ..protocol.cores import OPENCL_CORE
from ..protocol.env import STAGING_ENV
from .staging import StagingFile, _copy, _Stager, close_all_staging

if TYPE_CHECKING:
    from ..schema import NodeRecord
    from .aio import AsyncFabricClient
    from .cores import AsyncCore

__all__ = ["OpenCLRunner", "run_opencl", "close_staging"]


class OpenCLRunner:
    """What a client keeps for its OpenCL jobs: loaded cores per node, node records, staging verdicts, files."""

    def __init__(self, client: AsyncFabricClient) -> None:
        self.client = client
        self.cores: dict[str | None, AsyncCore] = {}
        self.records: list[NodeRecord] | None = None
        self.records_at = -math.inf
        self.staging_ok: dict[str, bool] = {}
        self.stager: _Stager | None = None  # made by the first staged job

    def close(self) -> None:
        """Unlink this client's staging files (the next staged job makes a new one)."""
        if self.stager is not None:
            self.stager.close()

    def _stager(self) -> _Stager:
        if self.stager is None:
            self.stager = _Stager()
        return self.stager

    async def _records(self) -> list[NodeRecord] | None:
        """The node records (cached for NODES_TTL_S), or None when no gpu-monitor answers."""
        now = time.monotonic()
        if now - self.records_at < NODES_TTL_S:
            return self.records
        records: list[NodeRecord] | None
        try:
            records = list(await self.client.nodes())
        except Unavailable:
            records = None
        self.records, self.records_at = records, now
        return records

    async def _core(self, node: str | None) -> AsyncCore:
        core = self.cores.get(node)
        if core is None:
            try:
                core = await self.client.load_core(OPENCL_CORE, b"", node=node, **LOAD_SETTINGS)
            except Unavailable:
                if node is None:
                    raise Unavailable("no spawner answers: start fabric with `fabric up`") from None
                raise UnknownNode(f"no spawner answers for node {node!r}", node=node) from None
            self.cores[node] = core
            self.cores[core.node] = core
        return core

    def _staging_wanted(self) -> bool:
        if os.environ.get(STAGING_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            return False
        return self.client._local.enabled

    def _check_inline(self, frame: bytearray, outs: list[Out]) -> None:
        """TooLarge when an inline job or its result would not fit the NATS max payload."""
        limit = self.client.max_payload if self.client.nc is not None else 0
        result_size = sum(_align(o.nbytes, INLINE_ALIGN) for o in outs) + 4096
        if limit and max(len(frame), result_size) > limit:
            raise TooLarge(
                f"the OpenCL job's buffers travel inline ({len(frame)} bytes in, about {result_size} out) and "
                f"exceed the NATS max payload of {limit} bytes: run the client on the node's host "
                f"(same-host staging has no such limit), or split the work into smaller jobs")

    async def run(self, source: str, kernel: str, global_size: int | Sequence[int], args: Sequence[Any], *,
                  local_size: int | Sequence[int] | None = None, device: str | None = None,
                  check_sizes: bool = True, timeout: float | None = None) -> list[np.ndarray[Any, Any]]:
        """Run *kernel* of *source* over *global_size* work items; the output buffers, in order.

        *args* follow the kernel's parameters: a numpy array (input buffer), :class:`Out`
        (output buffer) or a numpy scalar (a plain int/float is cast to the declared type).
        *device*: see :func:`~fabric.opencl.choose_device`.  ``check_sizes`` refuses buffers
        with fewer elements than work items; turn it off for kernels that are not one element
        per work item (a matmul over ``(n, m)`` reading rows of ``k``).
        """
        if not isinstance(source, str) or not isinstance(kernel, str) or not kernel:
            raise BadRequest("source and kernel must be strings (the kernel's name non-empty)")
        gsize = _sizes(global_size, "global_size")
        lsize = None if local_size is None else _sizes(local_size, "local_size")
        norm = _normalize_args(args)
        records = await self._records()
        here = boot_id()
        same_host: bool | None = None
        sel: dict[str, Any] = {}
        if records is not None:
            node, p, d = choose_device(records, device, here)
            sel = {"platform": p, "device": d}
            chosen = next(r for r in records if r.node == node)
            same_host = bool(here) and chosen.host.host_id == here
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
        core = await self._core(target)
        node = core.node
        stage_ok = self.staging_ok.get(node, same_host is not False)
        for attempt in range(3):
            stage = None
            if stage_ok and self._staging_wanted():
                try:
                    stage = self._stager().acquire(_staged_size(norm))
                except OSError:
                    stage = None  # /dev/shm is full or absent: inline
            answered = False  # the worker is done with the staging file (a reply or an error record came)
            try:
                frame, outs = _build(source, kernel, gsize, lsize, sel, check_sizes, norm, stage)
                if stage is None:
                    self._check_inline(frame, outs)
                try:
                    data = await core.run(frame, timeout=timeout)
                except JobFailed as exc:
                    rec = decode_error(getattr(exc, "output", b"") or b"")
                    if rec is None:
                        raise
                    answered = True
                    if rec.staging and stage is not None:
                        self.staging_ok[node] = stage_ok = False  # another /dev/shm: inline from now on
                        continue
                    raise_record(rec, node)
                except NotFound:
                    answered = True  # the spawner refused it: no worker saw the job
                    if attempt:
                        raise
                    # the pool is gone (unloaded, the spawner restarted): load it again
                    self.cores = {k: v for k, v in self.cores.items() if v is not core}
                    core = await self._core(target)
                    continue
                answered = True
                if stage is not None:
                    self.staging_ok[node] = True
                return _outputs(data, outs, stage)
            finally:
                if stage is not None:
                    # a job that did not answer (timeout, cancel, crash) may still write into the file
                    self._stager().release(stage, reusable=answered)
        raise Unavailable("the OpenCL job could not be placed")  # pragma: no cover - the loop returns or raises


async def run_opencl(client: AsyncFabricClient, source: str, kernel: str, global_size: int | Sequence[int],
                     args: Sequence[Any], *, local_size: int | Sequence[int] | None = None,
                     device: str | None = None, check_sizes: bool = True,
                     timeout: float | None = None) -> list[np.ndarray[Any, Any]]:
    """``client.opencl(...)``: run a kernel with *client*'s own :class:`OpenCLRunner`.

    >>> c, = await run_opencl(fc, VADD, "vadd", n, [a, b, Out(n, np.float32)])  # doctest: +SKIP
    """
    return await client._opencl_runner().run(source, kernel, global_size, args, local_size=local_size,
                                             device=device, check_sizes=check_sizes, timeout=timeout)


def close_staging(client: AsyncFabricClient | None = None) -> None:
    """Unlink the staging files of *client* (its ``close()`` does), or of every client of this process."""
    if client is None:
        close_all_staging()
    elif client._opencl is not None:
        client._opencl.close()


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
