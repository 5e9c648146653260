"""The nodes area: the node registry the gpu-monitor keeps (docs/protocol.md "Nodes").

What each node is (CPUs, memory, disks, network, GPUs, OpenCL devices), live, and a
node's GPUs sampled on demand.  The OpenCL component places jobs by these records.
"""

from __future__ import annotations

from ..protocol import subjects
from ..schema import JSON, DeviceRecord, DevicesReply, GpuListReply, NodeListReply, NodeRecord, NodeRequest
from .transport import Transport


class NodesArea(Transport):
    """Nodes and devices: ``nodes``, ``node``, ``devices`` and ``gpus`` of the async client."""

    async def nodes(self) -> list[NodeRecord]:
        """Every node in the registry, live: what it is, its CPUs, memory, disks, network, GPUs.

        A node whose heartbeats stopped has ``status == "stale"`` until its registry entry
        expires.  Raises :class:`Unavailable` when no gpu-monitor runs.
        """
        reply = await self.request(subjects.cluster(subjects.NODES, subjects.Nodes.LIST), b"{}")
        return JSON.decode(reply.data, NodeListReply).nodes

    async def node(self, node: str) -> NodeRecord:
        """One node's registry record; :class:`UnknownNode` (404) when it is not there."""
        return await self._call(subjects.cluster(subjects.NODES, subjects.Nodes.GET), NodeRequest(node=node),
                                NodeRecord)

    async def devices(self) -> list[DeviceRecord]:
        """Every node in the shape of UDCS's ``GET /api/devices`` (id, hostname, gpus, cpu_cores, ...)."""
        reply = await self.request(subjects.cluster(subjects.NODES, subjects.Nodes.DEVICES), b"{}")
        return JSON.decode(reply.data, DevicesReply).devices

    async def gpus(self, node: str) -> GpuListReply:
        """*node*'s GPUs sampled now: free memory, utilisation, and the fabric jobs holding each."""
        reply = await self.request(subjects.node_scoped(subjects.NODES, node, subjects.Nodes.GPUS), b"{}")
        return JSON.decode(reply.data, GpuListReply)
