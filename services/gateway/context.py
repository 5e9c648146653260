"""What every route reaches: the gateway's door, its NATS side and its configuration (``app.state.gateway``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar import Request

from fabric.config.model import GatewayConfig

from .access import Access
from .nats_monitor import NatsMonitor
from .upstream import Upstream

if TYPE_CHECKING:  # pragma: no cover
    from .events import EventHub

__all__ = ["Gateway", "gateway_of"]


@dataclass
class Gateway:
    node: str
    version: str
    config: GatewayConfig
    access: Access
    upstream: Upstream
    events: EventHub
    monitor: NatsMonitor


def gateway_of(request: Request[Any, Any, Any]) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw
