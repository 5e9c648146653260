"""Cross-language: a Node.js program written from docs/protocol.md spawns processes and reads their output.

The program (tests/node/spawn_client.mjs) uses only ``@nats-io/transport-node`` and
JSON: it streams a process's output to its own subject, waits, runs one in a
single round trip, kills one, checks the typed errors, and reads the whole output and
exit of `echo hi` -- over before the spawn reply arrives -- 20 times each through
``stream_to`` and through the node's output wildcard subscribed before spawning.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from tests._nats import realm

NODE_DIR = Path(__file__).resolve().parent / "node"


def _client_env() -> dict[str, str]:
    """The Node.js client's environment: $FABRIC_CREDENTIALS names the tests' admin, since
    it also reads the node's output wildcard fabric.proc.<node>.out.>, which only admins may
    subscribe to (docs/security.md); tests/node/fabric_auth.mjs applies the credentials."""
    env = dict(os.environ)
    env["FABRIC_CREDENTIALS"] = str(realm().admin)
    return env


async def test_node_js_client_spawns_and_streams(nats_url, spawner):
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@nats-io" / "transport-node").exists():
        pytest.fail("Node.js client not installed: scripts/test.sh runs `npm ci` in tests/node")
    # the spawner serves on this loop: run node without blocking it
    proc = await asyncio.create_subprocess_exec(node, str(NODE_DIR / "spawn_client.mjs"), nats_url, spawner.node,
                                                cwd=NODE_DIR, env=_client_env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["ok"] is True and seen["node"] == spawner.node
    assert seen["stdout"] == "hello from a remote process\n" and seen["run"] == "piped in"
    assert seen["missing"]["kind"] == "executable_not_found" and seen["negative"]["code"] == 400
    # output over before the spawn reply (echo), read the two ways protocol.md calls safe: all of it, every time
    assert seen["immediate"] == {"stream_to": 20, "wildcard": 20}
    assert not spawner.table.live, "the Node.js client's processes all ended"
