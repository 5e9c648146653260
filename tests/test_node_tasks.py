"""Cross-language: a Node.js program written from docs/protocol.md's "Tasks" section submits and follows a task.

The program (tests/node/tasks_client.mjs) uses only ``@nats-io/transport-node`` and JSON
against the real scheduler, spawner and gpu-monitor (in-process, as tests/test_task_client.py
runs them) on a JetStream nats-server: it submits a ``NATIVE_EXEC`` task in UDCS's body shape
(type, priority, requirements, args, callback_url), waits for it and decodes its base64
output, checks the record's fields and the states it saw on ``fabric.task.events``
against the doc's transition table, lists tasks, and checks the documented errors (an
unknown type and a priority of 11: 400; ``gpu_required`` on a GPU-less node: 422; ``get``
of an unknown id: 404) by their headers and JSON bodies.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests._nats import realm

NODE_DIR = Path(__file__).resolve().parent / "node"


def _client_env() -> dict[str, str]:
    """The Node.js client's environment: $FABRIC_CREDENTIALS names the tests' admin, since
    it also watches fabric.task.events, which only admins may subscribe to (docs/security.md);
    tests/node/fabric_auth.mjs applies the credentials."""
    env = dict(os.environ)
    env["FABRIC_CREDENTIALS"] = str(realm().admin)
    return env


@pytest.fixture
async def one_node(js_server: Any, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A one-node fabric with the real scheduler (its node registered by a gpu-monitor, run by a spawner)."""
    from tests._tasks import one_node_fabric

    async with one_node_fabric(js_server.url, tmp_path, prefix="nodetasks") as node:
        yield js_server.url, node


async def test_node_js_client_submits_an_exec_task_in_udcs_shape(one_node: tuple[str, str]) -> None:
    url, node_name = one_node
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@nats-io" / "transport-node").exists():
        pytest.fail("Node.js client not installed: scripts/test.sh runs `npm ci` in tests/node")
    # the services serve on this loop: run node without blocking it
    proc = await asyncio.create_subprocess_exec(node, str(NODE_DIR / "tasks_client.mjs"), url, node_name,
                                                cwd=NODE_DIR, env=_client_env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode() + out.decode()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["ok"] is True and seen["node"] == node_name
    assert seen["result"] == "hello from sh\n" and seen["mem"] == int(0.001 * (1 << 30)) and seen["listed"] >= 2
    events = seen["events"]
    assert events[0] == ">submitted" and events[-1].endswith(">succeeded")
    assert any(e.endswith(">running") for e in events)
    errors = seen["errors"]
    assert (errors["bad_type"]["code"], errors["priority"]["code"]) == (400, 400)
    assert errors["get_unknown"] == {**errors["get_unknown"], "code": 404, "kind": "not_found"}
    # the test machines have no NVIDIA GPU: gpu_required is infeasible there
    assert seen["gpu_less"] is True and errors["gpu"]["code"] == 422 and errors["gpu"]["kind"] == "infeasible"
