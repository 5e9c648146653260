"""Where a task's record lives and how long: written to the KV bucket, its end kept ``tasks.retention_s``.

Real services in-process (spawner, gpu-monitor, scheduler) on a JetStream nats-server of the
module's own; requests are plain NATS JSON, as any client sends them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fabric.config import FabricConfig, TasksConfig
from tests._nats import connect

RETENTION_S = 2.0


@pytest.fixture
async def short_memory(js_server: Any, tmp_path: Path) -> AsyncIterator[tuple[Any, str]]:
    """A one-node fabric whose scheduler keeps an ended task's record RETENTION_S seconds."""

    from tests._tasks import one_node_fabric

    config = FabricConfig(tasks=TasksConfig(retention_s=RETENTION_S))
    async with one_node_fabric(js_server.url, tmp_path, prefix="records", config=config) as node:
        nc = await connect(js_server.url)
        try:
            yield nc, node
        finally:
            await nc.close()


async def _req(nc: Any, verb: str, body: dict[str, Any], timeout: float = 30) -> tuple[int, dict[str, Any]]:
    msg = await nc.request(f"fabric.task.{verb}", json.dumps(body).encode(), timeout=timeout)
    code = int((msg.headers or {}).get("Nats-Service-Error-Code", "0"))
    return code, json.loads(msg.data)


async def test_an_ended_task_is_in_the_kv_bucket_until_its_retention_passes(short_memory: tuple[Any, str]) -> None:
    nc, node = short_memory
    code, reply = await _req(nc, "submit", {"kind": "exec", "exec": {"argv": ["true"]}})
    assert code == 0, reply
    task_id = reply["id"]
    code, rec = await _req(nc, "wait", {"id": task_id, "timeout_s": 20})
    assert code == 0 and rec["state"] == "succeeded", rec
    # the record is the KV entry itself, read without the scheduler: its last message carries the TTL
    raw = await nc.jetstream().get_last_msg("KV_fabric_tasks", f"$KV.fabric_tasks.{task_id}")
    assert raw.data and (raw.headers or {}).get("Nats-TTL") == str(int(RETENTION_S))
    kv = await nc.jetstream().key_value("fabric_tasks")
    # JetStream removes it once its TTL has passed; the scheduler then answers 404 (after its memory lets go)
    from nats.js.errors import KeyNotFoundError

    deadline = time.monotonic() + 30
    while True:
        try:
            await kv.get(task_id)
        except KeyNotFoundError:
            break
        assert time.monotonic() < deadline, "the ended task's record outlived its TTL by far"
        await asyncio.sleep(0.25)


async def test_a_task_that_has_not_ended_carries_no_ttl(short_memory: tuple[Any, str]) -> None:
    nc, node = short_memory
    code, reply = await _req(nc, "submit", {"kind": "exec", "exec": {"argv": ["sleep", "3"]}})
    assert code == 0, reply
    raw = await nc.jetstream().get_last_msg("KV_fabric_tasks", f"$KV.fabric_tasks.{reply['id']}")
    assert raw.data and not (raw.headers or {}).get("Nats-TTL")
    code, rec = await _req(nc, "wait", {"id": reply["id"], "timeout_s": 20})
    assert code == 0 and rec["state"] == "succeeded", rec
