"""The HTTP gateway's one NATS message: where it listens (``fabric.gateway.info`` / ``fabric.gateway.<node>.info``).

Everything else the gateway serves is HTTP (docs/gateway.md); this reply lets a program
that speaks NATS find a gateway's address without reading ``$SRV`` metadata.
"""

from __future__ import annotations

from .base import Message

__all__ = ["GatewayInfo"]


class GatewayInfo(Message):
    """One gateway: its node, URL, and what an anonymous caller may do there."""

    node: str
    url: str
    version: str
    #: whether it listens on loopback only (beyond loopback every HTTP request needs a token)
    loopback_only: bool
    #: the scopes of a request without a token (none beyond loopback)
    anonymous_scopes: list[str]
    #: event-stream (SSE) clients connected now
    event_streams: int = 0
    #: tokens it knows (from the fabric_gateway bucket), and whether it has read the bucket
    tokens: int = 0
    tokens_loaded: bool = False
    #: this node's nats-server (its server_name) and the servers it has routes to ("" and [] when the gateway
    #: cannot read its server's monitoring endpoint); every gateway's together are the cluster's topology
    nats_server: str = ""
    cluster: str = ""
    routes: list[str] = []
    #: that server's own figures from its /varz (connections, in_msgs, out_msgs, in_bytes, out_bytes,
    #: slow_consumers, subscriptions, mem, cpu, routes); empty without its monitoring endpoint
    nats_figures: dict[str, float] = {}
