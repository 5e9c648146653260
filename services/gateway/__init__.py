"""The HTTP gateway: fabric over HTTP, a live web dashboard and one Prometheus target, on one port.

``service.py`` is the ADR-32 service (it keeps no state of its own: run one per node, or
several) and runs the ASGI server (uvicorn) in its own event loop; ``app.py`` builds the
Litestar application from the route modules -- ``routes_tasks.py`` (UDCS's
``POST /api/submit`` and the task routes), ``routes_mem.py`` (remote memory with raw
bytes), ``routes_fabric.py`` (nodes, devices, services, memory per node),
``events.py`` (Server-Sent Events), ``metrics.py`` (``/metrics``), ``dashboard.py``
(the pages and their assets); ``access.py`` says who a request is (bearer tokens,
:mod:`fabric.gateway_tokens`) and what it may do; ``upstream.py`` sends the requests on
NATS as that caller; ``problems.py`` turns every failure into RFC 9457 problem+json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .service import GatewayService

__all__ = ["GatewayService"]


def __getattr__(name: str) -> Any:
    if name == "GatewayService":
        from .service import GatewayService

        return GatewayService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
