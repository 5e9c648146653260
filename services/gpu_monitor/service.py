"""The gpu-monitor's endpoints and heartbeat (one gpu-monitor per node).

Every ``telemetry.interval_s`` of the configuration (docs/config.md, default 1 s) the monitor
samples its node (:mod:`.host`, :mod:`.nvml`; OpenCL devices are probed once at
start, :mod:`.opencl_probe`), publishes the :class:`NodeRecord` as JSON on
``fabric.telemetry.<node>`` and stores it in the registry (:mod:`.registry`).

Subjects (docs/protocol.md, "Nodes and telemetry"):

* ``fabric.nodes.list`` / ``get`` / ``devices`` -- any monitor answers (queue
  group), from its view of the registry;
* ``fabric.nodes.<node>.info`` -- that node's latest record, from its own monitor;
* ``fabric.nodes.<node>.gpus`` -- that node's GPUs sampled at the request, with
  the fabric processes and pool workers holding each (what a scheduler places by).

Sampling runs on one worker thread: NVML calls block for milliseconds on a real
driver, and the event loop must keep answering meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Sequence

from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError

from fabric.config import TelemetryConfig, check_section
from fabric.errors import BadRequest
from fabric.gpupair import pair_state
from fabric.jetstream import JetStreamResource
from fabric.protocol import subjects
from fabric.schema import (
    JSON,
    DevicesReply,
    GpuListReply,
    NodeListReply,
    NodeRecord,
    NodeRequest,
)
from fabric.service import Endpoint, FabricService, Request, ServiceSettings

from . import opencl_probe
from .devices import device_record
from .host import LiveSampler, host_info
from .nvml import NvmlProbe
from .registry import NodeRegistry, telemetry_subject
from .registry import bucket as registry_bucket

__all__ = ["GpuMonitorService"]


class GpuMonitorService(FabricService):
    name = "gpu-monitor"
    description = "fabric node telemetry: CPUs, memory, disks, network, NVIDIA GPUs (NVML), OpenCL devices"

    def __init__(self, settings: ServiceSettings, *, interval_s: float | None = None,
                 ttl_s: float | None = None) -> None:
        super().__init__(settings)
        telemetry = settings.config.telemetry  # the configuration's [telemetry] (docs/config.md)
        if interval_s is not None or ttl_s is not None:
            # keyword overrides (tests): the same bounds and rules as the configuration; the
            # constructor checks ttl >= 2 * interval (one late heartbeat must not drop a live node)
            telemetry = TelemetryConfig(
                interval_s=interval_s if interval_s is not None else telemetry.interval_s,
                node_ttl_s=ttl_s if ttl_s is not None else telemetry.node_ttl_s)
            check_section(telemetry)
        self.interval_s = telemetry.interval_s
        self.ttl_s = telemetry.node_ttl_s
        self.host = host_info(self.node)
        self.live = LiveSampler(_disk_paths(settings))
        self.nvml = NvmlProbe()
        self.opencl = opencl_probe.probe(self.node)
        self.registry: NodeRegistry | None = None
        self.seq = 0
        self.latest: NodeRecord | None = None
        self.heartbeats_failed = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gpu-monitor-sample")

    def metadata(self) -> dict[str, str]:
        return {"interval_s": f"{self.interval_s:g}", "nvml": "yes" if self.nvml_available() else "no",
                "opencl_devices": str(len(self.opencl.devices))}

    def nvml_available(self) -> bool:
        return self.latest is not None and self.latest.nvml.available

    def endpoints(self) -> Sequence[Endpoint]:
        return [
            self.cluster_endpoint(subjects.NODES, subjects.Nodes.LIST, self.list),
            self.cluster_endpoint(subjects.NODES, subjects.Nodes.GET, self.get),
            self.cluster_endpoint(subjects.NODES, subjects.Nodes.DEVICES, self.devices),
            self.node_endpoint(subjects.NODES, subjects.Nodes.INFO, self.info),
            self.node_endpoint(subjects.NODES, subjects.Nodes.GPUS, self.gpus),
        ]

    # -- lifecycle -------------------------------------------------------------------

    def jetstream_resources(self) -> Sequence[JetStreamResource]:
        return [registry_bucket(self.ttl_s)]

    async def on_jetstream(self, js: JetStreamContext | None) -> None:
        # the kit (re)created the bucket: at start (before on_start), and after every reconnect
        if self.registry is None:
            self.registry = NodeRegistry(self.connection, self.node, self.ttl_s, self.log)
        await self.registry.attach(js)
        if self.registry.ttl_s != self.ttl_s:  # the bucket existed with another TTL
            self.ttl_s = self.registry.ttl_s
            if self.ttl_s < 2 * self.interval_s:
                self.interval_s = self.ttl_s / 2
                self.log.warning("heartbeat interval shortened to fit the registry's TTL", interval_s=self.interval_s)
        if self.latest is not None:
            # put this node back at once rather than at the next beat (the bucket may be new and empty)
            with contextlib.suppress(Exception):
                await self.registry.put(JSON.encode(self.latest))

    async def on_start(self) -> None:
        # the first sample now, so metadata() and the info endpoint have it from the start
        self.latest = await asyncio.get_running_loop().run_in_executor(self._pool, self.sample)

    async def on_serving(self) -> None:
        assert self.registry is not None
        # listed once its endpoints answer, and before the service says it is up
        await self._heartbeat()
        self.background(self._heartbeats, name="heartbeats")
        self.log.info("gpu-monitor ready", interval_s=self.interval_s, ttl_s=self.ttl_s,
                      registry=self.registry.backend, gpus=len(self.latest.gpus) if self.latest else 0,
                      nvml=self.latest.nvml.reason or "available" if self.latest else "",
                      opencl=self.opencl.reason or f"{len(self.opencl.devices)} device(s)")

    async def on_stop(self) -> None:
        # the heartbeats have ended (the kit stops background tasks before on_stop)
        if self.registry is not None:
            await self.registry.stop()
        self._pool.shutdown(wait=True)
        self.nvml.close()

    # -- heartbeats --------------------------------------------------------------------

    def sample(self) -> NodeRecord:
        """Sample the node now (runs on the sampling thread)."""
        cpu, memory, disks, net = self.live.sample()
        nvml_state, gpus = self.nvml.sample(self.node)
        gpus, opencl = pair_state(gpus, self.opencl)  # which OpenCL device is which GPU (by PCI bus id)
        self.seq += 1
        return NodeRecord(node=self.node, host=self.host, seq=self.seq, time_ms=int(time.time() * 1000),
                          interval_s=self.interval_s, cpu=cpu, memory=memory, disks=disks, net=net, gpus=gpus,
                          nvml=nvml_state, opencl=opencl, labels=dict(self.settings.config.tasks.labels),
                          resources=dict(self.settings.config.tasks.resources))

    async def _heartbeat(self) -> None:
        assert self.registry is not None
        record = await asyncio.get_running_loop().run_in_executor(self._pool, self.sample)
        self.latest = record
        data = JSON.encode(record)
        await self.connection.publish(telemetry_subject(self.node), data)
        await self.registry.put(data)

    async def _heartbeats(self) -> None:
        # a fixed schedule: a slow sample delays one beat, not every later one
        next_at = time.monotonic() + self.interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + self.interval_s, time.monotonic())
            try:
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS reconnecting, a probe bug: log, keep beating
                self.heartbeats_failed += 1
                self.log.warning("heartbeat failed", error=str(exc) or type(exc).__name__,
                                 failed=self.heartbeats_failed)
                if isinstance(exc, NoStreamResponseError | NotFoundError):
                    # the bucket is gone (deleted, or a server that came back without it)
                    self.jetstream_lost()

    # -- endpoints ---------------------------------------------------------------------

    def _registry(self) -> NodeRegistry:
        assert self.registry is not None, "gpu-monitor not started"
        return self.registry

    def list(self, req: Request) -> NodeListReply:
        return NodeListReply(nodes=self._registry().records())

    def get(self, req: Request) -> NodeRecord:
        body: NodeRequest = req.decode(NodeRequest)
        if not subjects.valid_node_name(body.node):
            raise BadRequest(f"invalid node name {body.node!r}: 1 to 64 letters, digits, '_' and '-'")
        return self._registry().get(body.node)

    def devices(self, req: Request) -> DevicesReply:
        return DevicesReply(devices=[device_record(r) for r in self._registry().records()])

    def info(self, req: Request) -> NodeRecord:
        assert self.latest is not None
        return self.latest

    async def gpus(self, req: Request) -> GpuListReply:
        state, gpus = await asyncio.get_running_loop().run_in_executor(self._pool, self.nvml.sample, self.node)
        gpus, _ = pair_state(gpus, self.opencl)
        return GpuListReply(node=self.node, gpus=gpus, nvml=state)


def _disk_paths(settings: ServiceSettings) -> list[str]:
    """The filesystems worth watching: the root and the one holding fabric's state."""
    paths = ["/"]
    state = str(settings.state_dir)
    if os.path.isdir(state):
        paths.append(state)
    return paths
