"""The fabric's state over HTTP: UDCS's ``GET /api/devices``, nodes, services, remote memory per node, who am I.

Fabric-wide state is what the ``read`` scope shows (anonymous callers on loopback have
it by default): it is read on the plain subjects, since it belongs to no user.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, get
from litestar.params import FromPath

from fabric.errors import BadRequest, FabricError
from fabric.protocol import subjects
from fabric.protocol.subjects import Gateway, Mem, Nodes
from fabric.schema import DevicesReply, NodeListReply, NodeRecord, NodeRequest
from fabric.schema.gateway import GatewayInfo
from fabric.schema.memory import MemInfoReply

from .context import gateway_of
from .problems import TOKEN_OR_LOOPBACK, problems
from .views import MemoryReply, ServicesReply, TopologyNode, TopologyReply, TopologyRoute, WhoAmI, services_view

__all__ = ["ROUTES"]

_READ = problems(401, 403, 429, 503)


@get("/api/devices", tags=["fabric"], summary="Every node as a UDCS device (UDCS's GET /api/devices shape)",
     responses=_READ, security=TOKEN_OR_LOOPBACK)
async def devices(request: Request[Any, Any, Any]) -> DevicesReply:
    gw = gateway_of(request)
    gw.access.require(request, "read")
    return await gw.upstream.trusted(subjects.cluster(subjects.NODES, Nodes.DEVICES), {}, DevicesReply)


@get("/api/nodes", tags=["fabric"], summary="Every live node's latest telemetry record", responses=_READ,
     security=TOKEN_OR_LOOPBACK)
async def nodes(request: Request[Any, Any, Any]) -> NodeListReply:
    gw = gateway_of(request)
    gw.access.require(request, "read")
    return await gw.upstream.trusted(subjects.cluster(subjects.NODES, Nodes.LIST), {}, NodeListReply)


@get("/api/nodes/{node:str}", tags=["fabric"], summary="One node's latest telemetry record",
     responses=problems(400, 401, 403, 404, 429, 503), security=TOKEN_OR_LOOPBACK)
async def node(request: Request[Any, Any, Any], node: FromPath[str]) -> NodeRecord:
    gw = gateway_of(request)
    gw.access.require(request, "read")
    if not subjects.valid_node_name(node):
        raise BadRequest(f"invalid node name {node!r}: 1 to 64 letters, digits, '_' and '-'")
    return await gw.upstream.trusted(subjects.cluster(subjects.NODES, Nodes.GET), NodeRequest(node=node), NodeRecord)


@get("/api/services", tags=["fabric"], summary="Every service instance ($SRV.INFO) with its request figures "
     "($SRV.STATS)", responses=_READ, security=TOKEN_OR_LOOPBACK)
async def services(request: Request[Any, Any, Any]) -> ServicesReply:
    gw = gateway_of(request)
    gw.access.require(request, "read")
    infos, stats = await gw.upstream.services()
    return ServicesReply(services=services_view(infos, stats))


@get("/api/memory", tags=["memory"], summary="Each node's allocator: capacity, bytes in use, blocks, "
     "fragmentation", responses=_READ, security=TOKEN_OR_LOOPBACK)
async def memory(request: Request[Any, Any, Any]) -> MemoryReply:
    gw = gateway_of(request)
    gw.access.require(request, "read")
    listed = await gw.upstream.trusted(subjects.cluster(subjects.NODES, Nodes.LIST), {}, NodeListReply)
    names = sorted(r.node for r in listed.nodes)

    async def one(name: str) -> MemInfoReply | None:
        try:
            return await gw.upstream.trusted(subjects.node_scoped(subjects.MEM, name, Mem.INFO), {}, MemInfoReply,
                                             timeout=2.0)
        except FabricError:
            return None

    found = await asyncio.gather(*(one(n) for n in names))
    return MemoryReply(nodes=[m for m in found if m is not None],
                       unreachable=[n for n, m in zip(names, found, strict=True) if m is None])


@get("/api/topology", tags=["fabric"], summary="Nodes, the services on each, and the NATS cluster's routes",
     responses=_READ, security=TOKEN_OR_LOOPBACK)
async def topology(request: Request[Any, Any, Any]) -> TopologyReply:
    gw = gateway_of(request)
    gw.access.require(request, "read")
    (infos, _), listed = await asyncio.gather(
        gw.upstream.services(), gw.upstream.trusted(subjects.cluster(subjects.NODES, Nodes.LIST), {}, NodeListReply))
    records = {r.node: r for r in listed.nodes}
    by_node: dict[str, list[str]] = {}
    for i in infos:
        node_name = str((i.get("metadata") or {}).get("node", ""))
        by_node.setdefault(node_name, []).append(str(i.get("name", "")))
    names = sorted(set(records) | {n for n in by_node if n})

    async def gateway(name: str) -> GatewayInfo | None:
        try:
            return await gw.upstream.trusted(subjects.node_scoped(subjects.GATEWAY, name, Gateway.INFO), {},
                                             GatewayInfo, timeout=1.5)
        except FabricError:
            return None

    gateways = dict(zip(names, await asyncio.gather(*(gateway(n) for n in names)), strict=True))
    nodes_out = [TopologyNode(node=n, hostname=records[n].host.hostname if n in records else "",
                              nats_server=g.nats_server if (g := gateways[n]) is not None else "",
                              gateway_url=g.url if g is not None else "", services=sorted(by_node.get(n, [])))
                 for n in names]
    pairs = {tuple(sorted((g.nats_server, peer))) for g in gateways.values() if g is not None and g.nats_server
             for peer in g.routes}
    cluster = next((g.cluster for g in gateways.values() if g is not None and g.cluster), "")
    return TopologyReply(cluster=cluster, nodes=nodes_out, routes=[TopologyRoute(a=a, b=b) for a, b in sorted(pairs)])


@get("/api/whoami", tags=["access"], summary="Who the gateway takes this request for, and its scopes",
     responses=problems(401, 429), security=TOKEN_OR_LOOPBACK)
async def whoami(request: Request[Any, Any, Any]) -> WhoAmI:
    gw = gateway_of(request)
    caller = gw.access.caller(request)
    return WhoAmI(name=caller.name, user=caller.user, scopes=sorted(caller.scopes), anonymous=caller.anonymous,
                  node=gw.node, version=gw.version)


ROUTES = [devices, nodes, node, services, memory, topology, whoami]
