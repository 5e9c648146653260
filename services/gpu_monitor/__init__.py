"""The gpu-monitor service: one per node, its hardware and live telemetry, and the node registry.

``host.py`` says what the node is and samples its CPUs, memory, disks and network
(psutil); ``nvml.py`` reads NVIDIA GPUs through NVML; ``opencl_probe.py`` lists
OpenCL platforms and devices; ``registry.py`` keeps every node's latest record in
a JetStream KV bucket with a TTL; ``devices.py`` gives the UDCS ``/api/devices``
shape; ``service.py`` publishes the heartbeats and answers ``fabric.nodes.*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .service import GpuMonitorService

__all__ = ["GpuMonitorService"]


def __getattr__(name: str) -> Any:
    if name == "GpuMonitorService":
        from .service import GpuMonitorService

        return GpuMonitorService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
