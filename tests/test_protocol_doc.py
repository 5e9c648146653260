"""What docs/protocol.md tells a client without fabric's library, done exactly as written there.

* the node registry read with one plain request to the JetStream API
  (``$JS.API.STREAM.MSG.GET.KV_fabric_nodes`` with ``last_by_subj``): no KV library;
* the gpu-monitor's ``$SRV`` metadata (``interval_s``, ``nvml``, ``opencl_devices``).

A module-scoped nats-server of its own: the registry bucket's TTL is set by whoever
creates it, so this must not share one with other modules.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator

import nats
import pytest

from fabric.schema import JSON, NodeRecord
from fabric.service import ServiceSettings
from fabric.services.gpu_monitor.service import GpuMonitorService
from tests._nats import NatsServer, connect, creds_for, trusted_config

INTERVAL = 0.2


# differs from conftest's nc: it connects to this module's own js_server, not the shared one
@pytest.fixture
async def nc(js_server: NatsServer) -> AsyncIterator[nats.NATS]:
    conn = await connect(js_server.url)
    yield conn
    await conn.close()


async def msg_get(nc: nats.NATS, node: str) -> dict:
    """The documented request, byte for byte."""
    reply = await nc.request("$JS.API.STREAM.MSG.GET.KV_fabric_nodes",
                             json.dumps({"last_by_subj": f"$KV.fabric_nodes.{node}"}).encode(), timeout=5)
    return json.loads(reply.data)


async def test_registry_without_a_kv_library(js_server, nc, tmp_path):
    node = f"doc-{secrets.token_hex(3)}"
    svc = GpuMonitorService(ServiceSettings(credentials=creds_for(GpuMonitorService),
                                            nats_url=js_server.url, node=node, state_dir=tmp_path),
                            interval_s=INTERVAL, ttl_s=2.0)
    await svc.start()
    try:
        got: dict = {}
        for _ in range(100):  # the first heartbeat is stored a moment after start
            got = await msg_get(nc, node)
            if "message" in got:
                break
            await asyncio.sleep(0.05)
        assert got.get("type") == "io.nats.jetstream.api.v1.stream_msg_get_response", got
        msg = got["message"]
        assert msg["subject"] == f"$KV.fabric_nodes.{node}" and msg["seq"] >= 1 and msg["time"]
        record = JSON.decode(base64.b64decode(msg["data"]), NodeRecord)
        assert record.node == node and record.host.node == node and record.interval_s == INTERVAL

        missing = await msg_get(nc, f"nobody-{secrets.token_hex(3)}")
        assert missing["error"]["code"] == 404 and missing["error"]["err_code"] == 10037, missing

        ping = json.loads((await nc.request("$SRV.PING.gpu-monitor", b"", timeout=2)).data)
        info = json.loads((await nc.request(f"$SRV.INFO.gpu-monitor.{ping['id']}", b"", timeout=2)).data)
        meta = info["metadata"]
        assert meta["node"] == node and meta["interval_s"] == "0.2" and meta["nvml"] in ("yes", "no")
        assert int(meta["opencl_devices"]) == len(record.opencl.devices)
    finally:
        await svc.stop()
    # a clean stop leaves a delete marker: no data, KV-Operation DEL (or PURGE) in hdrs
    gone = await msg_get(nc, node)
    msg = gone["message"]
    assert not msg.get("data"), gone
    assert b"KV-Operation: DEL" in base64.b64decode(msg["hdrs"]) or \
        b"KV-Operation: PURGE" in base64.b64decode(msg["hdrs"]), gone


async def test_the_services_serve_exactly_the_verbs_the_contract_names_and_the_doc_lists(js_server, nc, tmp_path):
    """fabric.protocol.subjects' verbs = what the services list in ``$SRV.INFO`` = the subjects protocol.md spells.

    The client asks for requests only by those constants, so a verb the client could
    send and no service serves, or one a service serves that the doc does not tell a
    client in another language about, fails here.
    """
    from pathlib import Path

    from fabric.protocol import subjects
    from fabric.services.allocator import AllocatorService
    from fabric.services.gateway import GatewayService
    from fabric.services.scheduler import SchedulerService
    from fabric.services.spawner import SpawnerService

    node = f"verbs-{secrets.token_hex(3)}"
    services = [AllocatorService(ServiceSettings(credentials=creds_for(AllocatorService),
                                                 nats_url=js_server.url, node=node, state_dir=tmp_path / "a"),
                                 capacity=16 << 20),
                SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                               nats_url=js_server.url, node=node, state_dir=tmp_path / "s")),
                GpuMonitorService(ServiceSettings(credentials=creds_for(GpuMonitorService),
                                                  nats_url=js_server.url, node=node, state_dir=tmp_path / "g")),
                SchedulerService(ServiceSettings(credentials=creds_for(SchedulerService),
                                                 nats_url=js_server.url, node=node, state_dir=tmp_path / "t")),
                GatewayService(ServiceSettings(credentials=creds_for(GatewayService),
                                               nats_url=js_server.url, node=node, state_dir=tmp_path / "w"))]
    for svc in services:
        await svc.start()
    try:
        served: dict[str, set[str]] = {}
        doc_subjects: set[str] = set()
        plain: set[str] = set()
        user_forms: set[str] = set()
        for name in ("allocator", "spawner", "gpu-monitor", "scheduler", "gateway"):
            ping = json.loads((await nc.request(f"$SRV.PING.{name}", b"", timeout=5)).data)
            info = json.loads((await nc.request(f"$SRV.INFO.{name}.{ping['id']}", b"", timeout=5)).data)
            for ep in info["endpoints"]:
                tokens = ep["subject"].split(".")
                assert tokens[0] == subjects.PREFIX, ep
                if tokens[1] == "u":  # the user form: any user (fabric.u.*.<area>...), protocol.md "Connecting"
                    assert tokens[2] == "*", ep
                    user_forms.add(".".join([tokens[0], *tokens[3:]]))
                    continue
                plain.add(ep["subject"])
                area = tokens[1]
                scoped = tokens[2] == node
                verb = tokens[3] if scoped else tokens[2]
                served.setdefault(area, set()).add(verb)
                doc_subjects.add(f"fabric.{area}.<node>.{verb}" if scoped else f"fabric.{area}.{verb}")
    finally:
        for svc in reversed(services):
            await svc.stop()
        # the allocator keeps its arena for a restart; this test is done with it
        from fabric_ext.arena import Arena

        allocator = services[0]
        assert isinstance(allocator, AllocatorService)
        Arena(allocator.prefix, allocator.capacity).destroy()
    assert served == {area: set(verbs) for area, verbs in subjects.REQUEST_VERBS.items()}
    # every endpoint has its user form, but the nodes' pull and the gateways' webhook reports (trusted callers)
    assert user_forms == plain - {"fabric.task.pull", "fabric.task.callback", "fabric.task.stats"}
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    assert len(doc_subjects) >= 30 and sorted(s for s in doc_subjects if s not in doc) == []
