"""``python -m fabric.services.gpu_monitor --nats-url URL --node NODE --state-dir DIR``.

``telemetry.interval_s`` (``$FABRIC_TELEMETRY_INTERVAL_S``, default 1) sets the heartbeat interval and
``telemetry.node_ttl_s`` (``$FABRIC_TELEMETRY_NODE_TTL_S``, default 5) the registry's TTL (docs/config.md).
"""

from fabric.service import main

from .service import GpuMonitorService

if __name__ == "__main__":
    main(GpuMonitorService)
