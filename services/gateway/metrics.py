"""``GET /metrics``: one Prometheus target for the whole fabric.

Each scrape asks the fabric afresh (nothing is cached between scrapes, so two gateways
give the same answer): ``$SRV.STATS`` of every service instance, every node's latest
telemetry record, the active scheduler's figures (``fabric.task.stats``), each node's
allocator and each node's gateway (its nats-server's figures).  Names follow
Prometheus conventions (``fabric_`` prefix, base units, ``_total`` counters, ``_ratio``
for 0..1); the families are listed in docs/gateway.md.  A part of the fabric that does
not answer leaves its families out of that scrape (``fabric_scrape_error`` says which)
rather than failing it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, Final

from litestar import Request, Response, get
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fabric.errors import FabricError
from fabric.protocol import subjects
from fabric.protocol.subjects import Mem, Nodes, Task
from fabric.schema import NodeListReply, NodeRecord
from fabric.schema.gateway import GatewayInfo
from fabric.schema.memory import MemInfoReply
from fabric.schema.tasks import TaskStatsReply

from .context import Gateway, gateway_of
from .problems import TOKEN_OR_LOOPBACK, problems

__all__ = ["ROUTES", "scrape"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"



class _Collected:
    """The metric families of one scrape, handed to prometheus_client's text writer."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _service_families(stats: list[dict[str, Any]]) -> list[Metric]:
    labels = ["service", "node", "endpoint"]
    reqs = CounterMetricFamily("fabric_service_requests", "Requests a service endpoint answered ($SRV.STATS)",
                               labels=labels)
    errs = CounterMetricFamily("fabric_service_errors", "Requests a service endpoint answered with an error",
                               labels=labels)
    busy = CounterMetricFamily("fabric_service_processing_seconds",
                               "Time a service endpoint spent working on requests", labels=labels)
    avg = GaugeMetricFamily("fabric_service_request_average_seconds",
                            "Mean time of one request's work at a service endpoint", labels=labels)
    for s in stats:
        name = str(s.get("name", ""))
        node = str((s.get("metadata") or {}).get("node", ""))
        for ep in s.get("endpoints") or []:
            if not isinstance(ep, dict):
                continue
            lv = [name, node, str(ep.get("name", ""))]
            reqs.add_metric(lv, float(ep.get("num_requests") or 0))
            errs.add_metric(lv, float(ep.get("num_errors") or 0))
            busy.add_metric(lv, float(ep.get("processing_time") or 0) / 1e9)
            avg.add_metric(lv, float(ep.get("average_processing_time") or 0) / 1e9)
    instances = GaugeMetricFamily("fabric_service_instances", "Service instances answering $SRV", labels=["service"])
    counts: dict[str, int] = {}
    for s in stats:
        counts[str(s.get("name", ""))] = counts.get(str(s.get("name", "")), 0) + 1
    for name, n in sorted(counts.items()):
        instances.add_metric([name], n)
    return [reqs, errs, busy, avg, instances]


def _node_families(records: list[NodeRecord]) -> list[Metric]:
    now = time.time()
    g = {name: GaugeMetricFamily(f"fabric_node_{name}", text, labels=["node"]) for name, text in (
        ("up", "1 for every node in the registry (a live gpu-monitor)"),
        ("cpu_ratio", "CPU busy, all logical CPUs, 0..1"),
        ("cpus", "Logical CPUs"),
        ("load1", "1-minute load average"),
        ("memory_total_bytes", "RAM"),
        ("memory_used_bytes", "RAM in use"),
        ("memory_available_bytes", "RAM available"),
        ("heartbeat_age_seconds", "Seconds since the node's last heartbeat"),
        ("network_receive_bytes_per_second", "Network bytes received per second"),
        ("network_transmit_bytes_per_second", "Network bytes sent per second"),
    )}
    gpu_labels = ["node", "gpu", "name"]
    gpu = {name: GaugeMetricFamily(f"fabric_gpu_{name}", text, labels=gpu_labels) for name, text in (
        ("utilization_ratio", "Share of time a kernel ran on the GPU, 0..1"),
        ("memory_used_bytes", "GPU memory in use"),
        ("memory_total_bytes", "GPU memory"),
        ("temperature_celsius", "GPU temperature"),
        ("power_watts", "GPU power draw"),
    )}
    for r in records:
        lv = [r.node]
        g["up"].add_metric(lv, 1)
        g["cpu_ratio"].add_metric(lv, r.cpu.percent / 100.0)
        g["cpus"].add_metric(lv, r.host.cpu_cores)
        g["load1"].add_metric(lv, r.cpu.load_1)
        g["memory_total_bytes"].add_metric(lv, r.memory.total)
        g["memory_used_bytes"].add_metric(lv, r.memory.used)
        g["memory_available_bytes"].add_metric(lv, r.memory.available)
        g["heartbeat_age_seconds"].add_metric(lv, max(0.0, now - r.time_ms / 1000.0))
        g["network_receive_bytes_per_second"].add_metric(lv, r.net.recv_per_s)
        g["network_transmit_bytes_per_second"].add_metric(lv, r.net.sent_per_s)
        for d in r.gpus:
            glv = [r.node, str(d.index), d.name]
            # -1 is "the driver does not say": left out, never exported as a value
            if d.utilization_gpu >= 0:
                gpu["utilization_ratio"].add_metric(glv, d.utilization_gpu / 100.0)
            if d.memory_used >= 0:
                gpu["memory_used_bytes"].add_metric(glv, d.memory_used)
            if d.memory_total >= 0:
                gpu["memory_total_bytes"].add_metric(glv, d.memory_total)
            if d.temperature_c >= 0:
                gpu["temperature_celsius"].add_metric(glv, d.temperature_c)
            if d.power_w >= 0:
                gpu["power_watts"].add_metric(glv, d.power_w)
    return [*g.values(), *gpu.values()]


def _task_families(stats: TaskStatsReply) -> list[Metric]:
    live = GaugeMetricFamily("fabric_tasks", "Unfinished tasks the active scheduler holds, by state", labels=["state"])
    for state, n in sorted(stats.live.items()):
        live.add_metric([state], n)
    depth = GaugeMetricFamily("fabric_task_queue_depth", "Tasks waiting to run (submitted, queued, waiting), "
                              "by priority", labels=["priority"])
    for prio, n in sorted(stats.waiting_by_priority.items(), key=lambda kv: int(kv[0])):
        depth.add_metric([prio], n)
    ended = CounterMetricFamily("fabric_tasks_ended", "Tasks that ended since the active scheduler took over, by "
                                "state", labels=["state"])
    for state, n in sorted(stats.ended.items()):
        ended.add_metric([state], n)
    latency = HistogramMetricFamily("fabric_task_latency_seconds", "Submit to end of the tasks that ended since the "
                                    "active scheduler took over")
    buckets = [(f"{b:g}", float(n)) for b, n in zip(stats.latency_bounds_s, stats.latency_counts, strict=True)]
    latency.add_metric([], buckets=[*buckets, ("+Inf", float(stats.latency_count))], sum_value=stats.latency_sum_s)
    return [live, depth, ended, latency]


#: fabric_nats_* families: (varz figure, metric name, help, counter?)
_NATS: Final = (
    ("connections", "connections", "Client connections open now", False),
    ("total_connections", "connections_opened", "Client connections opened since the server started", True),
    ("subscriptions", "subscriptions", "Subscriptions", False),
    ("slow_consumers", "slow_consumers", "Clients the server dropped for reading too slowly", True),
    ("in_msgs", "received_messages", "Messages received", True),
    ("out_msgs", "sent_messages", "Messages sent", True),
    ("in_bytes", "received_bytes", "Bytes received", True),
    ("out_bytes", "sent_bytes", "Bytes sent", True),
    ("mem", "resident_memory_bytes", "The server's resident memory", False),
    ("routes", "routes", "Routes to other servers of the cluster", False),
)


def _nats_families(gateways: list[GatewayInfo]) -> list[Metric]:
    out: list[Metric] = []
    for figure, name, text, counter in _NATS:
        fam: Metric = (CounterMetricFamily(f"fabric_nats_{name}", text, labels=["server", "node"]) if counter
                       else GaugeMetricFamily(f"fabric_nats_{name}", text, labels=["server", "node"]))
        for g in gateways:
            if figure in g.nats_figures:
                fam.add_metric([g.nats_server, g.node], g.nats_figures[figure])  # type: ignore[attr-defined]
        out.append(fam)
    cpu = GaugeMetricFamily("fabric_nats_cpu_ratio", "The server's CPU use, 0..1 of one CPU",
                            labels=["server", "node"])
    for g in gateways:
        if "cpu" in g.nats_figures:
            cpu.add_metric([g.nats_server, g.node], g.nats_figures["cpu"] / 100.0)
    return [*out, cpu]


def _mem_families(infos: list[MemInfoReply]) -> list[Metric]:
    g = {name: GaugeMetricFamily(f"fabric_mem_{name}", text, labels=["node"]) for name, text in (
        ("capacity_bytes", "The allocator's arena capacity"),
        ("in_use_bytes", "Bytes in live blocks"),
        ("mapped_bytes", "Bytes of shared memory mapped"),
        ("blocks", "Live blocks"),
        ("largest_free_bytes", "The largest free extent"),
        ("fragmentation_ratio", "1 - largest free extent / free bytes"),
    )}
    for m in infos:
        lv = [m.node]
        g["capacity_bytes"].add_metric(lv, m.capacity)
        g["in_use_bytes"].add_metric(lv, m.in_use)
        g["mapped_bytes"].add_metric(lv, m.mapped)
        g["blocks"].add_metric(lv, m.blocks)
        g["largest_free_bytes"].add_metric(lv, m.largest_free)
        g["fragmentation_ratio"].add_metric(lv, m.fragmentation)
    return list(g.values())


async def scrape(gw: Gateway) -> bytes:
    """The whole fabric in the Prometheus text format."""
    up = gw.upstream
    failed: list[str] = []

    async def part(name: str, coro: Any) -> Any:
        try:
            return await coro
        except (FabricError, asyncio.TimeoutError):
            failed.append(name)
            return None

    services_coro = up.services(window=0.25)
    nodes_coro = up.trusted(subjects.cluster(subjects.NODES, Nodes.LIST), {}, NodeListReply, timeout=2.0)
    tasks_coro = up.trusted(subjects.cluster(subjects.TASK, Task.STATS), {}, TaskStatsReply, timeout=5.0)
    svc, nodes, tasks = await asyncio.gather(part("services", services_coro), part("nodes", nodes_coro),
                                             part("tasks", tasks_coro))
    families: list[Metric] = []
    if svc is not None:
        families += _service_families(svc[1])
    if nodes is not None:
        families += _node_families(nodes.nodes)
        infos = await asyncio.gather(*(part(f"mem {r.node}", up.trusted(
            subjects.node_scoped(subjects.MEM, r.node, Mem.INFO), {}, MemInfoReply, timeout=2.0))
            for r in nodes.nodes))
        families += _mem_families([m for m in infos if m is not None])
        gateways = await asyncio.gather(*(part(f"gateway {r.node}", up.trusted(
            subjects.node_scoped(subjects.GATEWAY, r.node, subjects.Gateway.INFO), {}, GatewayInfo, timeout=2.0))
            for r in nodes.nodes))
        families += _nats_families([g for g in gateways if g is not None and g.nats_server])
    if tasks is not None:
        families += _task_families(tasks)
    sse = GaugeMetricFamily("fabric_gateway_event_streams", "Event-stream clients of this gateway", labels=["node"])
    sse.add_metric([gw.node], gw.events.clients)
    dropped = CounterMetricFamily("fabric_gateway_event_streams_dropped",
                                  "Event-stream clients this gateway dropped for reading too slowly", labels=["node"])
    dropped.add_metric([gw.node], gw.events.dropped)
    errors = GaugeMetricFamily("fabric_scrape_error", "1 for each part of the fabric this scrape could not read",
                               labels=["part"])
    for name in failed:
        errors.add_metric([name], 1)
    families += [sse, dropped, errors]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(families))
    return generate_latest(registry)


@get("/metrics", tags=["metrics"], media_type=CONTENT_TYPE, summary="The whole fabric in the Prometheus text format",
     responses=problems(401, 403, 429), security=TOKEN_OR_LOOPBACK)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw = gateway_of(request)
    gw.access.require(request, "read")
    return Response(content=await scrape(gw), media_type=CONTENT_TYPE)


ROUTES = [metrics]
