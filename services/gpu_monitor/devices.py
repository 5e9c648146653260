"""A node record in the shape of UDCS's ``GET /api/devices`` (``fabric.nodes.devices``).

UDCS's dashboard and clients expect ``{"devices": [{id, hostname, architecture, os,
gpus: [{name, memory_gb, compute_capability, utilization}], cpu_cores, ram_gb,
status}]}``.  fabric fills it from the registry: ``id`` is the node name, sizes are
GiB rounded to 0.1, ``status`` is ``available``, ``busy`` (CPU above
:data:`BUSY_CPU_PERCENT`) or ``offline`` (the node's heartbeats stopped).  A GPU
also carries its fabric id and free memory, and every OpenCL device is listed.
"""

from __future__ import annotations

from fabric.schema import DeviceGpu, DeviceRecord, NodeRecord

__all__ = ["device_record", "BUSY_CPU_PERCENT"]

BUSY_CPU_PERCENT = 90.0
_GIB = 1 << 30


def _gib(n: int) -> float:
    return round(n / _GIB, 1) if n >= 0 else -1.0


def device_record(record: NodeRecord) -> DeviceRecord:
    """*record* as a UDCS device."""
    host = record.host
    if record.status == "stale":
        status = "offline"
    elif record.cpu.percent > BUSY_CPU_PERCENT:
        status = "busy"
    else:
        status = "available"
    gpus = [
        DeviceGpu(name=g.name, memory_gb=_gib(g.memory_total), compute_capability=g.compute_capability,
                  utilization=g.utilization_gpu, id=g.id, memory_free_gb=_gib(g.memory_free))
        for g in record.gpus
    ]
    return DeviceRecord(id=record.node, hostname=host.hostname, architecture=host.architecture, os=host.os,
                        gpus=gpus, cpu_cores=host.cpu_cores, ram_gb=_gib(host.ram_bytes), status=status,
                        opencl=list(record.opencl.devices))
