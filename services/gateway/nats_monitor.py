"""This node's nats-server, as its monitoring endpoint reports it (``/varz``, ``/routez``).

``fabric up`` runs the embedded server with its monitoring endpoint on loopback and tells
the gateway where (``gateway.nats_monitor_url``).  The gateway reads it for two things:
the server's own figures in ``/metrics`` (connections, messages and bytes in and out,
slow consumers, routes) and the routes in the topology.  A gateway with no such endpoint
(a services-only node, or one started by hand) simply reports neither.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["NatsMonitor"]


class NatsMonitor:
    def __init__(self, url: str, timeout: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=timeout) if url else None

    @property
    def available(self) -> bool:
        return self._client is not None

    async def get(self, path: str) -> dict[str, Any] | None:
        """One monitoring document (``varz``, ``routez``...), or None when there is none or it does not answer."""
        if self._client is None:
            return None
        try:
            r = await self._client.get(f"{self.url}/{path}")
            doc = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
