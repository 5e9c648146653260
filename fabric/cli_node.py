"""``fabric node rm NAME``: a node gone for good leaves the fabric.

A node that joined (``fabric up --join`` or ``--nats-url --token``) has keys in the users
table: its services', its operator's (an admin) and its join token's.  ``rm`` drops them
(:meth:`fabric.auth.AuthRealm.remove_node`), reloads this node's nats-server, hands the
removal to the cluster's shared table (every other server drops them too:
:mod:`fabric.users_sync`) and, when the node's nats-server was a JetStream peer, removes the
peer from the cluster's meta group (``$JS.API.SERVER.REMOVE`` in the system account), so the
quorum counts only the servers that remain.  The node must be stopped first: a node whose
server is still routed to the cluster is refused (``fabric down`` there).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from .auth import AuthError
from .cli_common import StateDirOption, connect_system, err, escape, fail, out, state_of
from .cli_users import apply_change, realm_of

__all__ = ["node_app"]

node_app = typer.Typer(help="Manage the nodes of this fabric: remove one gone for good.", no_args_is_help=True)


@node_app.command("rm")
def rm(
    name: Annotated[str, typer.Argument(help="The node to remove (its name, as `fabric status` shows it).")],
    state_dir: StateDirOption = None,
) -> None:
    """Remove a stopped node: its keys stop working everywhere, and its JetStream peer leaves the cluster."""
    from . import cluster

    state = state_of(state_dir)
    realm, running = realm_of(state)
    if name == realm.node:
        fail(f"{name!r} is this node: remove it from another node of the fabric")
    spec = cluster.load(state)
    if spec is not None and running is not None:
        routed = asyncio.run(_routed_servers(state, running))
        if f"fabric-{name}" in routed:
            fail(f"node {name!r} is still up: its nats-server is routed to this cluster",
                 f"stop it first (`fabric down` on {name}), then remove it")
    try:
        record = realm.remove_node(name)
    except AuthError as exc:
        fail(str(exc))
    said = apply_change(realm, running, [f"node.{name}", f"join.{name}"])
    out.print(f"node [bold]{escape(name)}[/] removed: its keys no longer let it in; {said}")
    if spec is not None and record.route and running is not None:
        answer = asyncio.run(_remove_peer(state, running, f"fabric-{name}"))
        if answer.get("success"):
            out.print(f"  its JetStream peer fabric-{escape(name)} left the cluster's meta group")
        else:
            err.print(f"[yellow]warning:[/] the JetStream peer fabric-{escape(name)} was not removed: "
                      f"{escape(json.dumps(answer.get('error') or answer))}")


async def _routed_servers(state: Any, running: Any) -> set[str]:
    from .cluster import cluster_view

    nc = await connect_system(state, running)
    try:
        view = await cluster_view(nc)
    finally:
        await nc.close()
    return set(view.routes) | {peer for peers in view.routes.values() for peer in peers}


async def _remove_peer(state: Any, running: Any, server: str, *, within: float = 20.0) -> dict[str, Any]:
    """``$JS.API.SERVER.REMOVE`` for *server*, asked again (on a new connection) while it cannot be answered: the
    server is applying the reload that dropped the node's keys, or the meta group elects a leader (the removed
    node may have been it)."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            nc = await connect_system(state, running)
            try:
                msg = await nc.request("$JS.API.SERVER.REMOVE", json.dumps({"peer": server}).encode(), timeout=5)
            finally:
                await nc.close()
            answer: dict[str, Any] = json.loads(msg.data)
        except Exception as exc:  # the connection closed by the reload, no meta leader to answer yet
            answer = {"error": str(exc) or type(exc).__name__}
        if answer.get("success") or time.monotonic() > deadline:
            return answer
        error = answer.get("error")
        if isinstance(error, dict) and error.get("err_code") not in (None, 10008):  # 10008: not available yet
            return answer
        await asyncio.sleep(0.5)
