"""The gpu-monitor service end to end: heartbeats, the KV registry and its TTL, the endpoints.

A module-scoped nats-server with JetStream of its own: the registry bucket's TTL is
set by whoever creates it, so these tests must not share it with other modules.
Monitors run in-process (fast, inspectable) and as real ``python -m
fabric.services.gpu_monitor`` processes where a test kills one or gives it the fake
``libnvidia-ml.so.1`` (tests/fakenvml) through ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fabric import AsyncFabricClient
from fabric.errors import BadRequest, UnknownNode
from fabric.schema import JSON, NodeRecord
from fabric.service import ServiceSettings
from fabric.services.gpu_monitor.registry import BUCKET
from fabric.services.gpu_monitor.service import GpuMonitorService
from fabric.services.spawner import SpawnerService
from tests._nats import NatsServer, creds_for, start_nats, trusted_config
from tests._wait import until as _until

INTERVAL = 0.2
TTL = 1.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
async def monitor(js_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GpuMonitorService]:
    state = tmp_path_factory.mktemp("gm-state")
    svc = GpuMonitorService(ServiceSettings(credentials=creds_for(GpuMonitorService),
                                            nats_url=js_server.url, node=f"gm-{secrets.token_hex(3)}",
                                            state_dir=state), interval_s=INTERVAL, ttl_s=TTL)
    await svc.start()
    yield svc
    await svc.stop()


# differs from conftest's fc: a client of this module's own js_server and monitor (no spawner to account for)
@pytest.fixture
async def fc(js_server: NatsServer, monitor: GpuMonitorService) -> AsyncIterator[AsyncFabricClient]:
    async with AsyncFabricClient(js_server.url, local=False) as client:
        yield client


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _monitor_process(url: str, node: str, state: Path, **env: str) -> subprocess.Popen[bytes]:
    full = dict(os.environ)
    full.update({"FABRIC_TELEMETRY_INTERVAL_S": str(INTERVAL), "FABRIC_TELEMETRY_NODE_TTL_S": str(TTL),
                 "PYTHONPATH": str(REPO)})
    full.update(env)
    return subprocess.Popen([sys.executable, "-m", "fabric.services.gpu_monitor", "--nats-url", url, "--node", node,
                             "--credentials", str(creds_for("gpu-monitor")),
                             "--state-dir", str(state)], env=full, stdout=subprocess.DEVNULL,
                            stderr=open(state / "monitor.log", "wb"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the registry and the cluster-wide endpoints ---------------------------------------------


async def test_node_lists_itself_with_host_figures(fc: AsyncFabricClient, monitor: GpuMonitorService) -> None:
    nodes = await fc.nodes()
    mine = [n for n in nodes if n.node == monitor.node]
    assert len(mine) == 1
    rec = mine[0]
    assert rec.status == "up" and rec.age_s < TTL
    assert rec.host.cpu_cores == os.cpu_count()
    assert rec.host.ram_bytes == _meminfo_total()
    assert rec.host.architecture == os.uname().machine
    assert rec.host.os == "linux"
    assert rec.memory.total == _meminfo_total()
    assert len(rec.cpu.per_core) == os.cpu_count()
    assert rec.interval_s == INTERVAL
    # no NVIDIA driver on this machine: a normal state, with its reason
    assert rec.nvml.available is False and rec.nvml.reason
    assert rec.gpus == []
    # PoCL's CPU device is there (pocl-binary-distribution is a dependency)
    assert rec.opencl.available, rec.opencl.reason
    assert any(d.type == "CPU" and d.id.startswith(f"{monitor.node}:cl:") for d in rec.opencl.devices)
    one = await fc.node(monitor.node)
    assert one.node == monitor.node and one.host == rec.host


async def test_heartbeats_are_published_with_rising_seq(fc: AsyncFabricClient, monitor: GpuMonitorService) -> None:
    assert fc.nc is not None
    got: list[NodeRecord] = []
    sub = await fc.nc.subscribe(f"fabric.telemetry.{monitor.node}")
    try:
        while len(got) < 3:
            msg = await sub.next_msg(timeout=5 * INTERVAL + 2)
            got.append(JSON.decode(msg.data, NodeRecord))
    finally:
        await sub.unsubscribe()
    seqs = [r.seq for r in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert all(r.node == monitor.node for r in got)
    assert got[-1].time_ms >= got[0].time_ms


async def test_the_record_is_in_the_kv_bucket(fc: AsyncFabricClient, monitor: GpuMonitorService) -> None:
    assert fc.nc is not None
    kv = await fc.nc.jetstream().key_value(BUCKET)
    entry = await kv.get(monitor.node)
    rec = JSON.decode(entry.value, NodeRecord)
    assert rec.node == monitor.node and rec.host.hostname
    status = await kv.status()
    assert status.ttl == pytest.approx(TTL)


async def test_devices_in_the_udcs_shape(fc: AsyncFabricClient, monitor: GpuMonitorService) -> None:
    assert fc.nc is not None
    msg = await fc.request("fabric.nodes.devices", b"", timeout=5)  # from any client (its user form): JSON
    doc = json.loads(msg.data)
    mine = [d for d in doc["devices"] if d["id"] == monitor.node]
    assert len(mine) == 1
    d = mine[0]
    for key in ("id", "hostname", "architecture", "os", "gpus", "cpu_cores", "ram_gb", "status"):
        assert key in d
    assert d["cpu_cores"] == os.cpu_count()
    assert d["ram_gb"] == round(_meminfo_total() / (1 << 30), 1)
    assert d["status"] in ("available", "busy")
    assert d["gpus"] == []
    typed = await fc.devices()
    assert any(t.id == monitor.node for t in typed)


async def test_node_scoped_info_and_gpus(fc: AsyncFabricClient, monitor: GpuMonitorService) -> None:
    assert fc.nc is not None
    msg = await fc.request(f"fabric.nodes.{monitor.node}.info", b"", timeout=5)
    rec = JSON.decode(msg.data, NodeRecord)
    assert rec.node == monitor.node and rec.seq >= 1
    gpus = await fc.gpus(monitor.node)
    assert gpus.node == monitor.node and gpus.gpus == [] and not gpus.nvml.available and gpus.nvml.reason


async def test_bad_input_gets_typed_errors_and_the_service_keeps_serving(fc: AsyncFabricClient,
                                                                           monitor: GpuMonitorService) -> None:
    with pytest.raises(UnknownNode) as info:
        await fc.node("no-such-node")
    assert info.value.code == 404 and "no-such-node" in info.value.message
    with pytest.raises(BadRequest):
        await fc.request("fabric.nodes.get", b'{"node": 5}')
    with pytest.raises(BadRequest):
        await fc.request("fabric.nodes.get", b"{not json")
    with pytest.raises(BadRequest):
        await fc.request("fabric.nodes.get", b'{"node": "a.b"}')
    with pytest.raises(BadRequest):
        await fc.request("fabric.nodes.get", b'{"node": ""}')
    assert (await fc.node(monitor.node)).node == monitor.node


@pytest.mark.unit
def test_bad_settings_are_refused(tmp_path: Path) -> None:
    settings = ServiceSettings(nats_url="nats://127.0.0.1:1", node="x", state_dir=tmp_path)
    with pytest.raises(ValueError, match="twice the heartbeat interval"):
        GpuMonitorService(settings, interval_s=1.0, ttl_s=1.5)
    with pytest.raises(ValueError, match="interval"):
        GpuMonitorService(settings, interval_s=0.0, ttl_s=5)


# -- nodes come and go ------------------------------------------------------------------------


async def test_a_killed_node_turns_stale_then_leaves_the_registry(fc: AsyncFabricClient, js_server: NatsServer,
                                                                  monitor: GpuMonitorService,
                                                                  tmp_path: Path) -> None:
    node = f"gm-dead-{secrets.token_hex(2)}"
    proc = _monitor_process(js_server.url, node, tmp_path)
    try:
        async def listed() -> bool:
            return any(n.node == node and n.status == "up" for n in await fc.nodes())

        assert await _until(listed, 30), (tmp_path / "monitor.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # no clean stop: only the TTL can remove it
        proc.wait()
        killed = time.monotonic()

        async def state() -> str:
            found = [n for n in await fc.nodes() if n.node == node]
            return found[0].status if found else "gone"

        seen: list[str] = []

        async def observed_gone() -> bool:
            s = await state()
            if not seen or seen[-1] != s:
                seen.append(s)
            return s == "gone"

        assert await _until(observed_gone, TTL + 5, step=0.02)
        gone_after = time.monotonic() - killed
        assert seen[0] == "up" and "stale" in seen, seen  # flagged before it left
        assert gone_after < TTL + 2.0, gone_after
        # JetStream expired the entry itself: the bucket no longer holds it
        assert fc.nc is not None
        kv = await fc.nc.jetstream().key_value(BUCKET)
        from nats.js.errors import KeyNotFoundError

        async def expired() -> bool:
            try:
                await kv.get(node)
                return False
            except KeyNotFoundError:
                return True

        assert await _until(expired, TTL + 5)
    finally:
        _stop(proc)


async def test_a_clean_stop_leaves_the_registry_at_once(fc: AsyncFabricClient, js_server: NatsServer,
                                                       tmp_path: Path) -> None:
    node = f"gm-clean-{secrets.token_hex(2)}"
    svc = GpuMonitorService(ServiceSettings(credentials=creds_for(GpuMonitorService),
                                            nats_url=js_server.url, node=node, state_dir=tmp_path),
                            interval_s=INTERVAL, ttl_s=TTL)
    await svc.start()
    try:
        assert (await fc.node(node)).node == node
    finally:
        await svc.stop()

    async def gone() -> bool:
        return all(n.node != node for n in await fc.nodes())

    assert await _until(gone, 0.5, step=0.01)  # well before the TTL


async def test_without_jetstream_the_registry_follows_heartbeats(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "nats", jetstream=False)
    node = f"gm-nojs-{secrets.token_hex(2)}"
    svc = GpuMonitorService(ServiceSettings(credentials=creds_for(GpuMonitorService),
                                            nats_url=server.url, node=node, state_dir=tmp_path),
                            interval_s=INTERVAL, ttl_s=TTL)
    try:
        await svc.start()
        assert svc.registry is not None and svc.registry.backend == "heartbeats"
        async with AsyncFabricClient(server.url, local=False) as client:
            async def listed() -> bool:
                return any(n.node == node for n in await client.nodes())

            assert await _until(listed, 5)
        await svc.stop()
    finally:
        server.stop()


# -- GPUs: NVML through the fake libnvidia-ml, and who holds each GPU ---------------------------


async def test_fake_gpus_show_their_fabric_processes(js_server: NatsServer, monitor: GpuMonitorService,
                                                     tmp_path: Path) -> None:
    from tests._fakenvml import build_fake_nvml

    libdir = build_fake_nvml(tmp_path / "fakenvml")
    spawner = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                             nats_url=js_server.url, node=f"gm-gpu-{secrets.token_hex(2)}",
                                             state_dir=tmp_path / "spawner"))
    await spawner.start()
    node = spawner.node  # the monitor of the spawner's node
    mon = None
    try:
        async with AsyncFabricClient(js_server.url, local=False) as client:
            proc = await client.rspawn(["sleep", "30"], node=node)
            mon = _monitor_process(js_server.url, node, tmp_path, LD_LIBRARY_PATH=str(libdir),
                                   FAKE_NVML_GPUS="2", FAKE_NVML_PIDS=f"{proc.pid},{os.getpid()}",
                                   FAKE_NVML_BUS_IDS="0000:3B:00.0,0000:1A:00.0")

            async def two_gpus() -> bool:
                try:
                    return len((await client.node(node)).gpus) == 2
                except UnknownNode:
                    return False

            assert await _until(two_gpus, 30), (tmp_path / "monitor.log").read_text()[-3000:]
            reply = await client.gpus(node)
            assert reply.nvml.available and reply.nvml.driver_version
            g0, g1 = reply.gpus
            assert (g0.index, g1.index) == (0, 1) and g0.id == f"{node}:gpu:0"
            assert g0.memory_total == 24 << 30 and g0.memory_free == g0.memory_total - g0.memory_used
            assert g0.compute_capability == "8.9" and g0.utilization_gpu == 45
            # each GPU's PCI address, as fabric writes it: what pairs it with its OpenCL device
            assert (g0.pci_bus_id, g1.pci_bus_id) == ("0000:3b:00.0", "0000:1a:00.0")
            record = await client.node(node)
            assert [g.pci_bus_id for g in record.gpus] == ["0000:3b:00.0", "0000:1a:00.0"]
            # this machine's OpenCL is PoCL's CPU: no bus id, so no GPU is paired with it
            assert record.opencl.devices and all(d.pci_bus_id == "" and d.gpu_id == ""
                                                 for d in record.opencl.devices)
            # and the monitor says so: bus ids on NVML's side only pair nothing, by order neither
            assert [(g.opencl_ids, g.paired_by) for g in record.gpus] == [([], "none"), ([], "none")]
            assert [g.paired_by for g in (await client.gpus(node)).gpus] == ["none", "none"]
            holders = {p.pid: p for p in g0.processes}
            assert holders[proc.pid].fabric_id == proc.id  # the spawner's process, by its fabric id
            assert holders[proc.pid].name == "sleep"
            assert holders[os.getpid()].fabric_id == ""  # not fabric's
            devices = [d for d in await client.devices() if d.id == node]
            assert [g.name for g in devices[0].gpus] == [g0.name, g1.name]
            assert devices[0].gpus[0].memory_gb == 24.0 and devices[0].gpus[0].compute_capability == "8.9"
            await proc.kill()
            await proc.wait()
    finally:
        if mon is not None:
            _stop(mon)
        await spawner.stop()
