"""Where ``fabric up`` has this node's HTTP gateway listen: the configured port, or one kept from start to start.

``gateway.http_port = 0`` (the default) means "a free port": chosen at the first start
and kept in ``<state>/gateway.port`` (:mod:`fabric.kept_ports`), so the dashboard's address -- bookmarked, in a
Prometheus scrape config -- stays the same across restarts; a kept port that another
program took meanwhile is replaced by a new free one (and said so in the banner's URL).
The chosen port reaches the gateway process as ``$FABRIC_GATEWAY_HTTP_PORT``.
"""

from __future__ import annotations

import os

from .config import env_name
from .kept_ports import keep_port
from .nats_server import PortInUse, check_port
from .state import StateDir

__all__ = ["resolve", "GatewayPortInUse", "PORT_FILE"]

PORT_FILE = "gateway.port"


class GatewayPortInUse(RuntimeError):
    pass


def resolve(state: StateDir, host: str, port: int) -> str:
    """The gateway's URL; sets ``$FABRIC_GATEWAY_HTTP_HOST/PORT`` for the services ``fabric up`` starts."""
    if port == 0:
        port = keep_port(state, PORT_FILE.removesuffix(".port"), host)
    else:
        try:
            check_port(host, port)
        except PortInUse:
            raise GatewayPortInUse(f"the gateway's port {port} on {host} is already in use") from None
    os.environ[env_name("gateway.http_host")] = host
    os.environ[env_name("gateway.http_port")] = str(port)
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        from .nats_server import outward_address

        shown = outward_address()
    return f"http://{shown}:{port}"
