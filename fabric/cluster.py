"""The NATS cluster of a fabric: the route settings every node's nats-server shares.

A fabric starts as one node whose nats-server runs JetStream standalone: a single
server with a ``cluster`` block has no JetStream at all (a clustered meta group needs
at least two peers: nats-server ``bootstrapRaftNode``), so the first node cannot start
clustered.  When the first machine joins with ``fabric up --join URL --token T``, the
node that answers the join (:class:`fabric.join.AuthKeeper`) makes the cluster's
settings -- its name and the route password -- and keeps them in
``<state>/auth/cluster.json`` (0600); every node that joins gets them in the join reply
and keeps its own copy.  From then on each node's nats.conf has a ``cluster`` block
(:func:`fabric.nats_server.write_config`): it listens for routes on its route port,
admits only the route user with the cluster password (mutual TLS under the fabric CA
too with ``--tls``), and names every other known node as a route, so a node restarted
alone finds the others.  Clients may connect to any node: each server tells them of the
others, and they fail over.

The first node moves from standalone to clustered JetStream once (:mod:`fabric.cluster_migrate`):
a standalone store is not adopted by a clustered server (nats-server#5467: it deletes the
streams as orphans), so the store is set aside, the server restarts clustered, and every
file-backed stream is copied across.

Replicas: the services create streams with 3 replicas in a cluster and fall back to 1
when fewer than 3 JetStream servers are up (:mod:`fabric.jetstream`); every supervisor
raises streams left at 1 to 3 once three are (:func:`raise_replicas`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .state import StateDir, write_private

__all__ = ["ClusterSpec", "load", "save", "new_spec", "route_url", "ROUTE_USER", "REPLICAS",
           "raise_replicas", "cluster_view", "ClusterView"]

#: the one user the ``cluster.authorization`` block admits (nats-server takes one user/password there)
ROUTE_USER = "route"
#: replicas of every stream and bucket once three JetStream servers are up
REPLICAS = 3
#: environment variable telling a service its node is clustered (the kit creates streams with replicas then)
CLUSTERED_ENV = "FABRIC_CLUSTERED"


@dataclass
class ClusterSpec:
    """What a node's ``cluster`` block says; the same for every node but *port* and *routes*."""

    name: str
    password: str
    #: this node's route port (fixed once chosen: the other nodes name it)
    port: int
    #: whether the cluster runs TLS (its routes too): a restarted node must keep it on
    tls: bool = False
    #: this node's name in the cluster: its keys are that node's (a restart without --node keeps it)
    node: str = ""


def _path(state: StateDir) -> Path:
    return state.auth_dir / "cluster.json"


def load(state: StateDir) -> ClusterSpec | None:
    """This node's cluster settings; None for a node that is not clustered."""
    try:
        raw = json.loads(_path(state).read_text())
    except FileNotFoundError:
        return None
    return ClusterSpec(name=str(raw["name"]), password=str(raw["password"]), port=int(raw["port"]),
                       tls=bool(raw.get("tls", False)), node=str(raw.get("node", "")))


def save(state: StateDir, spec: ClusterSpec) -> None:
    state.auth_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(_path(state), json.dumps(asdict(spec), indent=2) + "\n")


def new_spec(port: int, node: str, *, tls: bool = False) -> ClusterSpec:
    """A new cluster: a random name (two fabrics never route into each other by accident) and password."""
    return ClusterSpec(name=f"fabric-{secrets.token_hex(4)}", password=secrets.token_urlsafe(24), port=port, tls=tls,
                       node=node)


def route_url(spec: ClusterSpec, address: str) -> str:
    """The URL that solicits a route to *address* (``host:port``), with the cluster's credentials."""
    return f"nats-route://{ROUTE_USER}:{spec.password}@{address}"


# -- replicas ---------------------------------------------------------------------------------


async def raise_replicas(js: Any, log: Any) -> list[str]:
    """Raise every stream below :data:`REPLICAS` to it; the names raised.

    A stream that cannot be placed on three servers now (error 10005, fewer than three up)
    stays as it is until the next call.
    """
    import nats.js.errors

    raised: list[str] = []
    for info in await js.streams_info():
        cfg = info.config
        if (cfg.num_replicas or 1) >= REPLICAS:
            continue
        cfg.num_replicas = REPLICAS
        try:
            await js.update_stream(cfg)
        except nats.js.errors.APIError as exc:
            log("debug", "replicas not raised yet", stream=cfg.name, error=str(exc))
            continue
        raised.append(str(cfg.name))
    return raised


# -- what `fabric status` shows -----------------------------------------------------------------


@dataclass
class ClusterView:
    """The NATS cluster as the servers report it (``$SYS.REQ.SERVER.PING.*``)."""

    name: str = ""
    #: server name -> the server names it has routes to
    routes: dict[str, list[str]] = field(default_factory=dict)
    #: the JetStream meta leader's server name ("" while there is none)
    meta_leader: str = ""
    #: JetStream servers the meta group counts
    meta_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def cluster_view(nc: Any, *, wait: float = 0.5) -> ClusterView:
    """Ask every server for its routes and JetStream state over *nc* (a system-account connection)."""
    import asyncio

    view = ClusterView()
    for kind in ("ROUTEZ", "JSZ"):
        inbox = nc.new_inbox()
        replies: list[Any] = []

        async def collect(msg: Any, into: list[Any] = replies) -> None:
            try:
                into.append(json.loads(msg.data))
            except ValueError:
                pass

        sub = await nc.subscribe(inbox, cb=collect)
        await nc.publish(f"$SYS.REQ.SERVER.PING.{kind}", b"{}", reply=inbox)
        await asyncio.sleep(wait)
        await sub.unsubscribe()
        for reply in replies:
            server = reply.get("server", {})
            data = reply.get("data", {})
            name = str(server.get("name", ""))
            view.name = view.name or str(server.get("cluster", ""))
            if kind == "ROUTEZ":
                view.routes[name] = sorted({str(r.get("remote_name") or r.get("remote_id", ""))
                                            for r in data.get("routes") or []})
            else:
                meta = data.get("meta_cluster") or {}
                view.meta_leader = view.meta_leader or str(meta.get("leader", ""))
                view.meta_size = max(view.meta_size, int(meta.get("cluster_size", 0) or 0))
    return view

