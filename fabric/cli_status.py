"""``fabric status``: who answers ``$SRV.PING|INFO|STATS`` on the NATS, and the nodes when a gpu-monitor runs.

One row per service instance (requests, errors and latency over all its
endpoints), a line with the services up on each node, or with ``--endpoints`` a
row per endpoint; ``--json`` prints the same as one document.  The replies are
gathered by :func:`fabric.discovery.collect_replies` (every instance answers) and
read through ``nats.micro``'s typed ``ServicePing``, ``ServiceInfo`` and
``EndpointStats``, with the fields other ADR-32 implementations may leave out
filled in; ``started`` is read as RFC 3339 here, since ``ServiceStats.from_dict``
takes only nats-py's own millisecond form (Go and Rust services send nanoseconds).
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer
from rich.table import Table

from .cli_common import (
    NatsUrlOption,
    ServicesOption,
    StateDirOption,
    connect,
    connect_system,
    console,
    err,
    escape,
    find_nats_url,
    parse_services,
    state_of,
)
from .cli_nodes import NoMonitor, add_columns, fetch_nodes, nodes_table
from .schema import NodeRecord
from .state import FabricState

if TYPE_CHECKING:  # nats is imported when a command talks to NATS: `fabric up` starts without it
    from nats.micro.service import EndpointStats, ServiceInfo, ServicePing

__all__ = ["status"]

def status(
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
    services: ServicesOption = None,
    node: Annotated[str | None, typer.Option("--node", show_default=False,
                                                help="Node the expected services must run on.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    endpoints: Annotated[bool, typer.Option("--endpoints",
                                            help="One row per endpoint of each service instance.")] = False,
    wait: Annotated[float, typer.Option("--wait", min=0.05, help="Seconds to collect replies.")] = 0.5,
) -> None:
    """Show every service on the NATS ($SRV.PING, INFO, STATS); exit 1 if one is missing.

    One row per service instance (requests, errors and latency over all its endpoints)
    and a line with the services up on each node; --endpoints shows every endpoint.
    """
    state = state_of(state_dir)
    url, running = find_nats_url(nats_url, state)
    if services is not None:
        expected = list(parse_services(services))
    elif running is not None and running.nats_url == url:
        expected = list(running.services)
    else:
        expected = []
    expected_node = node or (running.node if running is not None and running.nats_url == url else None)

    found = asyncio.run(_discover(url, wait))
    rows = sorted(found.values(), key=lambda s: (s["name"], s["node"] or "", s["id"]))
    missing = [
        name for name in expected
        if not any(s["name"] == name and (expected_node is None or s["node"] == expected_node) for s in rows)
    ]
    # the nodes, live, when a gpu-monitor runs (its registry holds every node's record)
    nodes = asyncio.run(_nodes_or_none(url)) if any(s["name"] == "gpu-monitor" for s in rows) else None
    # the NATS cluster, for a node whose own nats-server is in one (its system-account credentials)
    cluster = _cluster_or_none(state, running, url, wait)
    if as_json:
        doc = {
            "nats_url": url,
            "state_dir": str(state.path),
            "node": expected_node,
            "supervisor_pid": running.supervisor_pid if running is not None else None,
            "phase": running.phase if running is not None else None,
            # the admin credentials file with auth on (what the CLI and a local client use), else null
            "credentials": (running.credentials or None) if running is not None else None,
            # this node's HTTP gateway (dashboard, REST API, /metrics), else null; every gateway's is in its
            # service's metadata ("url")
            "gateway": (running.gateway_url or None) if running is not None else None,
            "expected": expected,
            "missing": missing,
            "ok": not missing,
            "services": [_public(s) for s in rows],
            "nodes": [msgspec.to_builtins(r) for r in nodes] if nodes is not None else None,
            # {name, routes: {server: [servers it routes to]}, meta_leader, meta_size}; null when not clustered
            "cluster": cluster.to_json() if cluster is not None else None,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        if endpoints:
            _print_status_table(url, rows, running)
        else:
            _print_instances_table(url, rows, running)
            per_node = _expected_per_node(rows, services, expected, expected_node)
            if per_node:
                console().print(_summary(rows, per_node))
        if nodes is not None:
            console().print(nodes_table(nodes, f"nodes ({len(nodes)})"))
        if cluster is not None:
            _print_cluster(cluster)
        for name in missing:
            where = f" on node {expected_node}" if expected_node else ""
            err.print(f"[bold red]missing:[/] {name}{where} did not answer $SRV.PING")
    raise typer.Exit(1 if missing else 0)


def _cluster_or_none(state: Any, running: FabricState | None, url: str, wait: float) -> Any:
    """The NATS cluster this node's server is in, as its servers report it; None when it is in none."""
    from . import cluster
    from .auth import AuthRealm

    if running is None or running.nats_url != url or not running.embedded_nats or cluster.load(state) is None:
        return None
    if not AuthRealm(state, running.node).system_credentials.is_file():
        return None

    async def ask() -> Any:
        nc = await connect_system(state, running)
        try:
            return await cluster.cluster_view(nc, wait=wait)
        finally:
            await nc.close()

    try:
        return asyncio.run(ask())
    except Exception as exc:
        err.print(f"[yellow]warning:[/] the NATS cluster did not answer: {exc or type(exc).__name__}")
        return None


def _print_cluster(view: Any) -> None:
    from rich.table import Table

    table = Table("server", "routes to", "JetStream", title=f"NATS cluster {view.name}",
                  caption=f"{len(view.routes)} servers, JetStream meta group of {view.meta_size}")
    for server in sorted(view.routes):
        table.add_row(server, ", ".join(view.routes[server]) or "-",
                      "meta leader" if server == view.meta_leader else "")
    console().print(table)
    if not view.meta_leader:
        console().print("[bold yellow]no JetStream meta leader[/]: fewer than half of the cluster's JetStream servers "
                        "are up (docs/security.md, \"Clusters\")")


async def _nodes_or_none(url: str) -> list[NodeRecord] | None:
    nc = await connect(url)
    try:
        return await fetch_nodes(nc)
    except NoMonitor:
        return None
    finally:
        await nc.close()


async def _discover(url: str, window: float) -> dict[str, dict[str, Any]]:
    """Every service instance that answers $SRV.PING, INFO and STATS, by id."""
    from .discovery import collect_replies
    from .protocol.subjects import srv

    nc = await connect(url)
    try:
        pings, infos, stats = await asyncio.gather(
            collect_replies(nc, [srv("PING")], window=window),
            collect_replies(nc, [srv("INFO")], window=window),
            collect_replies(nc, [srv("STATS")], window=window),
        )
    finally:
        await nc.close()
    found: dict[str, dict[str, Any]] = {}

    def entry(reply: Any) -> dict[str, Any] | None:
        ident = _identity(reply)
        if ident is None:
            return None
        meta = ident.metadata
        return found.setdefault(ident.id, {
            "name": ident.name, "id": ident.id, "version": ident.version,
            "node": meta.get("node"), "pid": _int(meta.get("pid")), "metadata": meta,
            "description": None, "started": None, "uptime_s": None, "endpoints": [],
        })

    for reply in pings:
        entry(reply)
    for reply in infos:
        if (e := entry(reply)) is not None and (info := _info(reply)) is not None:
            e["description"] = info.description
            if not e["endpoints"]:
                e["endpoints"] = [{"name": ep.name, "subject": ep.subject} for ep in info.endpoints]
    now = datetime.now(timezone.utc)
    for reply in stats:
        if (e := entry(reply)) is None:
            continue
        # ServiceStats.from_dict reads only nats-py's own millisecond form of `started`;
        # other ADR-32 services (Go, Rust) send nanoseconds: read as RFC 3339 here
        started = _parse_time(reply.get("started"))
        e["started"] = reply.get("started")
        e["uptime_s"] = round((now - started).total_seconds(), 3) if started else None
        e["endpoints"] = [
            {
                "name": ep.name,
                "subject": ep.subject,
                "num_requests": ep.num_requests,
                "num_errors": ep.num_errors,
                "average_processing_time_ns": ep.average_processing_time,
                "processing_time_ns": ep.processing_time,  # for the instance's average (not in --json)
                "last_error": ep.last_error or "",
            }
            for ep in _endpoint_stats(reply)
        ]
    return found


def _identity(reply: Any) -> ServicePing | None:
    """The ADR-32 identity (id, name, version, metadata) every $SRV reply carries; None for anything else."""
    from nats.micro.service import ServicePing

    if not isinstance(reply, dict) or not isinstance(reply.get("id"), str):
        return None
    try:
        return ServicePing.from_dict({**reply, "metadata": reply.get("metadata") or {}})
    except KeyError:  # no name or version: not an ADR-32 service
        return None


def _info(reply: dict[str, Any]) -> ServiceInfo | None:
    """An INFO reply, with the keys other implementations may leave out (or send as null) filled in."""
    from nats.micro.service import ServiceInfo

    try:
        return ServiceInfo.from_dict({
            **reply,
            "metadata": reply.get("metadata") or {},
            "endpoints": [{"name": None, "subject": None, "queue_group": "", **ep, "metadata": ep.get("metadata") or {}}
                          for ep in reply.get("endpoints") or []],
        })
    except (KeyError, TypeError, AttributeError):
        return None


#: the STATS endpoint fields an implementation may leave out, and what they count as then
_ENDPOINT_STATS_DEFAULTS: dict[str, Any] = {
    "name": None, "subject": None, "queue_group": "", "num_requests": 0, "num_errors": 0, "last_error": "",
    "processing_time": None,  # None: the instance's average is weighted by the endpoints' averages instead
    "average_processing_time": 0, "data": None,
}


def _endpoint_stats(reply: dict[str, Any]) -> list[EndpointStats]:
    from nats.micro.service import EndpointStats

    return [EndpointStats.from_dict({**_ENDPOINT_STATS_DEFAULTS, **ep}) for ep in reply.get("endpoints") or []]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _parse_time(raw: Any) -> datetime | None:
    """ADR-32 ``started``: RFC 3339 in UTC, with up to nanoseconds (Go) or milliseconds."""
    if not isinstance(raw, str) or "T" not in raw:
        return None
    text = raw.strip().replace("Z", "+00:00")
    date, _, rest = text.partition("T")
    clock, sign, offset = rest, "", ""
    for s in ("+", "-"):
        if s in rest:
            clock, offset = rest.split(s, 1)
            sign = s
            break
    if "." in clock:
        whole, frac = clock.split(".", 1)
        clock = f"{whole}.{frac[:6].ljust(6, '0')}"
    try:
        parsed = datetime.fromisoformat(f"{date}T{clock}{sign}{offset}" if sign else f"{date}T{clock}")
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _public(svc: dict[str, Any]) -> dict[str, Any]:
    """A service instance as ``fabric status --json`` shows it."""
    return {**svc, "endpoints": [{k: v for k, v in ep.items() if k != "processing_time_ns"}
                                 for ep in svc["endpoints"]]}


def _status_title(url: str, running: FabricState | None) -> str:
    title = f"fabric services on {url}"
    if running is not None:
        title += f" (supervisor pid {running.supervisor_pid}, {running.phase})"
    return title


def _instance_totals(svc: dict[str, Any]) -> tuple[int, int, float | None] | None:
    """Requests, errors and average latency (ns) over every endpoint; None without a STATS reply."""
    eps = [ep for ep in svc["endpoints"] if "num_requests" in ep]
    if not eps:
        return None
    requests = sum(int(ep["num_requests"] or 0) for ep in eps)
    errors = sum(int(ep["num_errors"] or 0) for ep in eps)
    # total processing time / total requests (the endpoints' averages weighted by their requests
    # where a service reports no total)
    total_ns = sum(ep["processing_time_ns"] if isinstance(ep.get("processing_time_ns"), int)
                   else int(ep["num_requests"] or 0) * (ep["average_processing_time_ns"] or 0) for ep in eps)
    return requests, errors, (total_ns / requests if requests else None)


def _print_instances_table(url: str, rows: list[dict[str, Any]], running: FabricState | None) -> None:
    """One row per service instance: what a fabric of many nodes can show on one screen."""
    table = Table(title=_status_title(url, running), title_justify="left")
    add_columns(table, [("service", "left"), ("node", "left"), ("version", "left"), ("uptime", "right"),
                        ("requests", "right"), ("errors", "right"), ("avg latency", "right")])
    for svc in rows:
        totals = _instance_totals(svc)
        requests, errors, avg = totals if totals is not None else ("?", "?", None)
        table.add_row(svc["name"], svc["node"] or "?", svc["version"] or "?", _duration(svc["uptime_s"]),
                      str(requests), str(errors), _latency(avg))
    if not rows:
        table.caption = "no service answered"
    console().print(table)


def _expected_per_node(rows: list[dict[str, Any]], services: str | None, expected: list[str],
                       expected_node: str | None) -> dict[str, list[str]]:
    """The services each node should run: --services, else those ``fabric up`` runs (this node's own list)."""
    from .supervisor import SERVICES

    default = list(parse_services(services)) if services is not None else list(SERVICES)
    per_node = {s["node"]: default for s in rows if s["node"]}
    if expected_node is not None:
        per_node[expected_node] = expected or default
    return per_node


def _summary(rows: list[dict[str, Any]], per_node: dict[str, list[str]]) -> str:
    """One line: the services up out of those expected, per node (the incomplete ones in red)."""
    parts = []
    up_total = want_total = 0
    for node in sorted(per_node):
        want = per_node[node]
        here = {s["name"] for s in rows if s["node"] == node}
        missing = [name for name in want if name not in here]
        up = len(want) - len(missing)
        up_total += up
        want_total += len(want)
        if missing:
            parts.append(f"[bold red]{escape(node)} {up}/{len(want)}[/] (missing {escape(', '.join(missing))})")
        else:
            parts.append(f"[green]{escape(node)} {up}/{len(want)}[/]")
    count = f"{len(per_node)} node{'s' if len(per_node) != 1 else ''}"
    return f"services up: {up_total}/{want_total} on {count}: " + ", ".join(parts)


def _print_status_table(url: str, rows: list[dict[str, Any]], running: FabricState | None) -> None:
    """``--endpoints``: one row per endpoint of each service instance."""
    table = Table(title=_status_title(url, running), title_justify="left")
    add_columns(table, [("service", "left"), ("node", "left"), ("version", "left"), ("id", "left"),
                        ("uptime", "right"), ("endpoint", "left"), ("requests", "right"),
                        ("errors", "right"), ("avg latency", "right")])
    for svc in rows:
        first = [svc["name"], svc["node"] or "?", svc["version"] or "?", svc["id"], _duration(svc["uptime_s"])]
        endpoints = svc["endpoints"] or [{}]
        for i, ep in enumerate(endpoints):
            head = first if i == 0 else ["", "", "", "", ""]
            table.add_row(
                *head,
                ep.get("name") or "",
                str(ep.get("num_requests", "")),
                str(ep.get("num_errors", "")),
                _latency(ep.get("average_processing_time_ns")),
                end_section=i == len(endpoints) - 1,
            )
    if not rows:
        table.caption = "no service answered"
    console().print(table)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _latency(ns: Any) -> str:
    if not isinstance(ns, (int, float)) or ns <= 0:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.2f} ms"
    return f"{ns / 1_000_000_000:.2f} s"
