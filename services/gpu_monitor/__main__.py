"""``python -m fabric.services.gpu_monitor --nats-url URL --node NODE --state-dir DIR``.

``$FABRIC_TELEMETRY_INTERVAL_S`` (default 1) sets the heartbeat interval and
``$FABRIC_NODE_TTL_S`` (default 5) the registry's TTL.
"""

from fabric.service import main

from .service import GpuMonitorService

if __name__ == "__main__":
    main(GpuMonitorService)
