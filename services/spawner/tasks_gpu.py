"""GPU pinning for the task runner's ``python`` and ``opencl`` tasks (docs/protocol.md "Tasks").

The scheduler gives a task GPUs (``TaskRun.gpus``: device indices on this node) and, with
them, the OpenCL device id of the first one (``TaskRun.opencl_device``).  :mod:`.tasks`
hands such tasks here:

* ``python``: CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process, so setting it per job
  in a warm worker is not reliable.  Each distinct GPU set gets a Python pool of its own
  whose workers have ``CUDA_VISIBLE_DEVICES=<indices>`` from their start
  (:class:`~.tasks_lanes.PythonLanes`, :func:`cuda_visible`).  Tasks without GPUs keep the
  runner's shared pool.
* ``opencl``: :func:`pin_opencl` rewrites the FCLJ job header's explicit
  ``platform``/``device`` to the given device, so the node's ``fabric.opencl`` worker runs
  it there or fails it (404 ``unknown_device``); it never runs elsewhere.  A device of
  another node, a header asking for another device, or GPUs with no OpenCL device paired
  to them are refused.
"""

from __future__ import annotations

from fabric.errors import BadRequest, UnknownDevice
from fabric.schema.tasks import TaskRun

__all__ = ["pin_opencl", "cuda_visible"]



def cuda_visible(gpus: list[int]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value for device indices *gpus*: ``"1,3"``."""
    return ",".join(str(g) for g in gpus)


def pin_opencl(run: TaskRun, node: str) -> None:
    """Make the FCLJ job of opencl task *run* name its device ``run.opencl_device`` (in place).

    Raises (the task is refused) when it cannot be pinned safely: GPUs given with no OpenCL
    device, a device id of another node or not of the form ``<node>:cl:<p>:<d>``, or a job
    header that names another device explicitly.
    """
    from fabric.opencl import decode_job, encode_job

    device = run.opencl_device
    if not device:
        if run.gpus:
            raise UnknownDevice(f"task {run.id}: it was given GPUs {run.gpus} on node {node}, but none of them has "
                                f"an OpenCL device paired to it: it is not run on another device",
                                device=cuda_visible(run.gpus))
        return
    owner, sep, rest = device.rpartition(":cl:")
    p, _, d = rest.partition(":")
    if not sep or not p.isdigit() or not d.isdigit():
        raise BadRequest(f"task {run.id}: opencl_device {device!r} is not '<node>:cl:<platform>:<device>'")
    if owner != node:
        raise UnknownDevice(f"task {run.id}: OpenCL device {device!r} is not on node {node}", device=device)
    header, data = decode_job(run.payload)  # InvalidFrame: refused as malformed
    platform, index = int(p), int(d)
    if (header.platform >= 0 or header.device >= 0) and (header.platform, header.device) != (platform, index):
        raise BadRequest(f"task {run.id}: its job asks for OpenCL device {header.platform}:{header.device}, "
                         f"but it was given {device!r}: it is not run on another device than it was given")
    header.platform, header.device = platform, index
    # the inline data travels as it was: offsets in the header are relative to its start
    run.payload = bytes(encode_job(header, [(0, data)] if len(data) else []))
