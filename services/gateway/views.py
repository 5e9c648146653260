"""The gateway's own response types (everything else it returns is the NATS services' own Structs).

These are the shapes only HTTP has: the services of ``$SRV`` joined with their figures,
remote memory per node, the caller's identity, a memory write's count.  msgspec Structs
like the rest of the contract, so the OpenAPI document comes from them too.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from fabric.schema.memory import MemInfoReply

__all__ = ["EndpointView", "ServiceView", "ServicesReply", "MemoryReply", "WhoAmI", "Written", "Freed",
           "AllocBody", "services_view"]


class EndpointView(msgspec.Struct, kw_only=True):
    name: str
    subject: str
    num_requests: int = 0
    num_errors: int = 0
    #: mean time of one request's work, seconds
    average_processing_s: float = 0.0
    last_error: str = ""


class ServiceView(msgspec.Struct, kw_only=True):
    """One service instance, from its ``$SRV.INFO`` and ``$SRV.STATS``."""

    name: str
    id: str
    version: str
    node: str
    description: str = ""
    started: str = ""
    metadata: dict[str, str] = {}
    endpoints: list[EndpointView] = []


class ServicesReply(msgspec.Struct, kw_only=True):
    services: list[ServiceView]


class MemoryReply(msgspec.Struct, kw_only=True):
    """Each node's allocator figures; ``unreachable`` names the nodes whose allocator did not answer."""

    nodes: list[MemInfoReply]
    unreachable: list[str] = []


class WhoAmI(msgspec.Struct, kw_only=True):
    """Who the gateway takes the request for."""

    name: str
    user: str | None
    scopes: list[str]
    anonymous: bool
    node: str
    version: str


class TopologyNode(msgspec.Struct, kw_only=True):
    """A node: its services, its nats-server (when its gateway can read the server's monitoring endpoint)."""

    node: str
    hostname: str = ""
    nats_server: str = ""
    gateway_url: str = ""
    services: list[str] = []


class TopologyRoute(msgspec.Struct, kw_only=True):
    """A route between two nats-servers of the cluster (server names; each pair once)."""

    a: str
    b: str


class TopologyReply(msgspec.Struct, kw_only=True):
    cluster: str = ""
    nodes: list[TopologyNode]
    routes: list[TopologyRoute] = []


class Written(msgspec.Struct, kw_only=True):
    written: int


class Freed(msgspec.Struct, kw_only=True):
    freed: int


class AllocBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/mem``: a block of *size* bytes (zeroed), on *node* or any; leased for *ttl_s* when given."""

    size: Annotated[int, Meta(ge=0, le=1 << 45)]
    node: Annotated[str, Meta(max_length=64)] = ""
    ttl_s: Annotated[float, Meta(ge=0, le=365 * 24 * 3600)] = 0.0


def services_view(infos: list[dict[str, Any]], stats: list[dict[str, Any]]) -> list[ServiceView]:
    """Join ``$SRV.INFO`` and ``$SRV.STATS`` replies by instance id; sorted by name, then node."""
    by_id = {s.get("id"): s for s in stats}
    out: list[ServiceView] = []
    for info in infos:
        sid = str(info.get("id", ""))
        st = by_id.get(sid, {})
        figures = {e.get("name"): e for e in st.get("endpoints") or [] if isinstance(e, dict)}
        endpoints = []
        for ep in info.get("endpoints") or []:
            if not isinstance(ep, dict):
                continue
            f = figures.get(ep.get("name"), {})
            endpoints.append(EndpointView(
                name=str(ep.get("name", "")), subject=str(ep.get("subject", "")),
                num_requests=int(f.get("num_requests") or 0), num_errors=int(f.get("num_errors") or 0),
                average_processing_s=float(f.get("average_processing_time") or 0) / 1e9,
                last_error=str(f.get("last_error") or "")))
        meta = {str(k): str(v) for k, v in (info.get("metadata") or {}).items()}
        out.append(ServiceView(name=str(info.get("name", "")), id=sid, version=str(info.get("version", "")),
                               node=meta.get("node", ""), description=str(info.get("description") or ""),
                               started=str(st.get("started") or ""), metadata=meta, endpoints=endpoints))
    return sorted(out, key=lambda s: (s.name, s.node, s.id))
