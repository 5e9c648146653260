"""The nodes a task may go to: what each has (from the registry) and what running tasks hold.

The registry is the gpu-monitors' KV bucket ``fabric_nodes`` (one NodeRecord per
node, expiring with its heartbeats); :class:`Nodes` follows it with a KV watch.  A
node's capacity is what its record says -- logical CPUs, RAM, each GPU's memory,
architecture, OS, labels, custom resources -- and :class:`Node` accounts what the
tasks running there hold, so a node is never given more than it has.  GPUs are
shared by fraction: a task asking ``gpus=0.5`` takes half of one device (and its
``gpu_mem``), one asking ``gpus=2`` takes two whole devices.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Final

from fabric.protocol.streams import REGISTRY_BUCKET
from fabric.schema import JSON, NodeRecord
from fabric.schema.tasks import Resources

__all__ = ["Node", "Nodes", "unmet", "REGISTRY_BUCKET"]


_ARCH_ALIASES: Final = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
_EPS: Final = 1e-9


def _arch(name: str) -> str:
    name = name.lower()
    return _ARCH_ALIASES.get(name, name)


class Node:
    """One node's capacity and what the tasks running on it hold."""

    __slots__ = ("name", "cpus", "mem", "arch", "os", "labels", "custom", "gpu_mem", "gpu_opencl", "used_cpus",
                 "used_mem", "gpu_share", "gpu_mem_used", "used_custom", "running", "record_at", "pulled_at",
                 "prefetch", "instance", "cores")

    def __init__(self, name: str) -> None:
        self.name = name
        self.cpus = 0.0
        self.mem = 0
        self.arch = ""
        self.os = ""
        self.labels: dict[str, str] = {}
        self.custom: dict[str, float] = {}
        self.gpu_mem: list[int] = []
        #: each GPU's OpenCL device ids (Gpu.opencl_ids): a task given GPUs runs its OpenCL job on the first's
        self.gpu_opencl: list[list[str]] = []
        self.used_cpus = 0.0
        self.used_mem = 0
        self.gpu_share: list[float] = []
        self.gpu_mem_used: list[int] = []
        self.used_custom: dict[str, float] = {}
        #: ids of the tasks running here
        self.running: set[str] = set()
        self.record_at = 0.0
        self.pulled_at = 0.0
        #: tasks the node queues itself beyond its CPUs (it says so in each pull)
        self.prefetch = 0
        #: the task runner's instance id (a new one when the node's spawner restarted)
        self.instance = ""
        #: the compute cores loaded on the node (its last pull says), for ``core`` tasks
        self.cores: frozenset[str] = frozenset()

    def update(self, rec: NodeRecord) -> None:
        self.cpus = float(rec.host.cpu_cores or 1)
        self.mem = rec.host.ram_bytes
        self.arch = _arch(rec.host.architecture)
        self.os = rec.host.os.lower()
        self.labels = dict(rec.labels)
        self.custom = dict(rec.resources)
        self.gpu_mem = [max(g.memory_total, 0) for g in rec.gpus]
        self.gpu_opencl = [list(g.opencl_ids) for g in rec.gpus]
        while len(self.gpu_share) < len(self.gpu_mem):
            self.gpu_share.append(0.0)
            self.gpu_mem_used.append(0)
        self.record_at = time.monotonic()

    # -- what it can ever run -------------------------------------------------------

    def lacks(self, res: Resources, core: str = "") -> str | None:
        """The first requirement this node can never meet, or None when it could run the task (a ``core``
        task: also needs its compute core loaded here, as the node's last pull said)."""
        if res.node and res.node != self.name:
            return f"node={res.node}"
        if core and core not in self.cores:
            owner, _, name = core.rpartition("\x00")  # pool_key: a user's pools are the user's
            return f"core {name!r} (not loaded on node {self.name}{' by ' + owner if owner else ''})"
        if res.cpus > self.cpus + _EPS:
            return f"cpus={res.cpus:g} (node {self.name} has {self.cpus:g})"
        if res.mem > self.mem:
            return f"mem={res.mem} bytes (node {self.name} has {self.mem})"
        if res.arch and _arch(res.arch) != self.arch:
            return f"arch={res.arch} (node {self.name} is {self.arch})"
        if res.os and res.os.lower() != self.os:
            return f"os={res.os} (node {self.name} runs {self.os})"
        for key, value in res.labels.items():
            if self.labels.get(key) != value:
                return f"label {key}={value}"
        for key, amount in res.custom.items():
            if self.custom.get(key, 0.0) + _EPS < amount:
                return f"resource {key}={amount:g} (node {self.name} has {self.custom.get(key, 0.0):g})"
        if res.gpus > 0:
            whole = math.ceil(res.gpus - _EPS) if res.gpus >= 1 else 1
            fitting = sum(1 for m in self.gpu_mem if m >= res.gpu_mem)
            if fitting < whole:
                return (f"gpus={res.gpus:g}" + (f" with gpu_mem={res.gpu_mem}" if res.gpu_mem else "")
                        + f" (node {self.name} has {fitting} such GPU{'s' if fitting != 1 else ''})")
        return None

    # -- what it can run now -----------------------------------------------------------

    def _gpu_pick(self, res: Resources) -> list[tuple[int, float, int]] | None:
        if res.gpus <= 0:
            return []
        if res.gpus < 1:
            for i, total in enumerate(self.gpu_mem):
                if self.gpu_share[i] + res.gpus <= 1 + _EPS and total - self.gpu_mem_used[i] >= res.gpu_mem:
                    return [(i, res.gpus, res.gpu_mem)]
            return None
        want = math.ceil(res.gpus - _EPS)
        free = [i for i, total in enumerate(self.gpu_mem)
                if self.gpu_share[i] <= _EPS and total - self.gpu_mem_used[i] >= res.gpu_mem]
        if len(free) < want:
            return None
        return [(i, 1.0, res.gpu_mem) for i in free[:want]]

    def take(self, res: Resources) -> list[tuple[int, float, int]] | None:
        """Hold *res* here if it fits now: the GPU shares taken ([] without GPUs), or None if it does not fit."""
        # CPUs: the node's own plus what it prefetches (it never runs more than its slots at once);
        # memory, GPUs and custom resources: never beyond what it has
        if self.used_cpus + res.cpus > self.cpus + self.prefetch + _EPS or self.used_mem + res.mem > self.mem:
            return None
        for key, amount in res.custom.items():
            if self.used_custom.get(key, 0.0) + amount > self.custom.get(key, 0.0) + _EPS:
                return None
        gpus = self._gpu_pick(res)
        if gpus is None:
            return None
        self.used_cpus += res.cpus
        self.used_mem += res.mem
        for key, amount in res.custom.items():
            self.used_custom[key] = self.used_custom.get(key, 0.0) + amount
        for i, share, mem in gpus:
            self.gpu_share[i] += share
            self.gpu_mem_used[i] += mem
        return gpus

    def opencl_device(self, gpus: list[tuple[int, float, int]]) -> str:
        """The OpenCL device id of the first of *gpus* (taken here), "" when it has none paired."""
        if gpus and gpus[0][0] < len(self.gpu_opencl) and self.gpu_opencl[gpus[0][0]]:
            return self.gpu_opencl[gpus[0][0]][0]
        return ""

    def give_back(self, res: Resources, gpus: list[tuple[int, float, int]]) -> None:
        self.used_cpus = max(0.0, self.used_cpus - res.cpus)
        self.used_mem = max(0, self.used_mem - res.mem)
        for key, amount in res.custom.items():
            self.used_custom[key] = max(0.0, self.used_custom.get(key, 0.0) - amount)
        for i, share, mem in gpus:
            if i < len(self.gpu_share):
                self.gpu_share[i] = max(0.0, self.gpu_share[i] - share)
                self.gpu_mem_used[i] = max(0, self.gpu_mem_used[i] - mem)


def unmet(nodes: list[Node], res: Resources, core: str = "") -> str | None:
    """None when some node could run a task needing *res* (and *core*); else what no node has, for the 422."""
    reasons = []
    for node in nodes:
        why = node.lacks(res, core)
        if why is None:
            return None
        reasons.append(why)
    if not nodes:
        return "no node is registered"
    return "no node can ever run this task: " + "; ".join(reasons[:4]) + (
        f"; and {len(reasons) - 4} more nodes" if len(reasons) > 4 else "")


class Nodes:
    """Every registered node, followed through the registry bucket's KV watch."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.by_name: dict[str, Node] = {}
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None
        #: called with a node's name when it leaves the registry (its heartbeats stopped)
        self.on_gone: Any = None
        #: set whenever a node's record arrives (a submit with no node yet waits on it a little)
        self.arrived = asyncio.Event()

    def get(self, name: str) -> Node:
        node = self.by_name.get(name)
        if node is None:
            node = self.by_name[name] = Node(name)
        return node

    async def wait_for_any(self, timeout_s: float) -> None:
        """Return once some node is registered, or after *timeout_s* (a fabric that is just starting)."""
        while not self.live():
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout_s)
            except TimeoutError:
                return

    def live(self) -> list[Node]:
        return [n for n in self.by_name.values() if n.record_at > 0]

    async def follow(self, js: Any) -> None:
        """Follow the registry through *js*; retried until the bucket exists (a gpu-monitor creates it)."""
        await self.stop()
        self._task = asyncio.get_running_loop().create_task(self._run(js))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await watcher.stop()
            except Exception:
                pass

    async def _run(self, js: Any) -> None:
        from nats.js.kv import KV_DEL, KV_PURGE

        while True:
            try:
                kv = await js.key_value(REGISTRY_BUCKET)
                self._watcher = await kv.watchall()
                async for entry in self._watcher:
                    if entry is None:
                        continue
                    if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                        self._gone(entry.key)
                        continue
                    try:
                        rec = JSON.decode(entry.value, NodeRecord)
                    except Exception:
                        continue
                    self.get(rec.node).update(rec)
                    self.arrived.set()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.debug("node registry not readable yet", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)

    def _gone(self, name: str) -> None:
        node = self.by_name.get(name)
        if node is not None:
            node.record_at = 0.0
            if self.on_gone is not None:
                self.on_gone(name)

    def expire(self, ttl_s: float) -> None:
        """Drop nodes whose last record is older than *ttl_s* (expiry makes no watch event)."""
        now = time.monotonic()
        for name, node in list(self.by_name.items()):
            if node.record_at and now - node.record_at > ttl_s:
                self._gone(name)
