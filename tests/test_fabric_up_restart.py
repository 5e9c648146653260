"""kill -9 of the embedded nats-server under ``fabric up``: everything comes back within 15 s.

The supervisor restarts nats-server on the same port and store.  What must hold
afterwards, as a user sees it: memory allocated before the crash is readable through
the bus, a process spawns, and the node is back in the registry -- which lives in a
memory-backed KV bucket the crash destroyed, so the gpu-monitor (through the
service kit) must have recreated it and be writing to it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric import FabricClient
from tests._nats import env_for_fabric, env_with_repo

RECOVERY_S = 15.0
NODE_TTL_S = 5.0  # the registry's default TTL: a node whose entries stopped is gone after it


def fabric(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabric.cli", *args], capture_output=True, text=True,
                          env=env_for_fabric(env_with_repo()), timeout=timeout)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[dict[str, Any]]:
    state_dir = tmp_path / "state"
    out = fabric("up", "-d", "--nats-port", "0", "--state-dir", str(state_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((state_dir / "state.json").read_text())
    state["state_dir"] = state_dir
    yield state
    down = fabric("down", "--purge", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stdout + down.stderr


def eventually(what: str, check: Callable[[], Any], deadline: float, logs: Path) -> Any:
    """Retry *check* until it returns a truthy value or *deadline* (monotonic) passes."""
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the bus is still coming back: requests time out or find no responder
            last = exc
        time.sleep(0.2)
    tails = {p.name: p.read_text()[-1500:] for p in sorted(logs.glob("*.log"))}
    pytest.fail(f"{what}: not within {RECOVERY_S:g}s of the kill (last error: {last!r}); logs: {tails}")


def registry_entry(nats_url: str, node: str, credentials: str) -> dict[str, Any] | None:
    """The node's record straight from the KV bucket's stream, as a client without a KV library reads it."""
    import asyncio

    import nats

    from fabric.credentials import read_credentials

    async def read() -> dict[str, Any] | None:
        nc = await nats.connect(nats_url, allow_reconnect=False, **read_credentials(credentials).connect_options())
        try:
            req = json.dumps({"last_by_subj": f"$KV.fabric_nodes.{node}"}).encode()
            msg = await nc.request("$JS.API.STREAM.MSG.GET.KV_fabric_nodes", req, timeout=2)
            reply = json.loads(msg.data)
            return None if "error" in reply else reply["message"]
        finally:
            await nc.close()

    return asyncio.run(read())


def test_kill_9_of_nats_server_under_fabric_up_recovers_everything(up: dict[str, Any]) -> None:
    url, node, logs = up["nats_url"], up["node"], Path(up["logs_dir"])
    nats_pid = up["nats"]["pid"]
    with FabricClient(url, local=False, timeout=2.0, credentials=up["credentials"]) as fc:
        buf = fc.rmalloc(4096)
        data = os.urandom(4096)
        fc.rwrite(buf, data)
        assert [n.node for n in fc.nodes()] == [node]

        os.kill(nats_pid, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + RECOVERY_S

        # the supervisor starts a new nats-server (same port, same store)
        def new_nats_pid() -> int | None:
            st = json.loads((up["state_dir"] / "state.json").read_text())
            pid = st["nats"]["pid"]
            return pid if pid and pid != nats_pid else None

        eventually("nats-server restarted", new_nats_pid, deadline, logs)
        assert eventually("memory readable through the bus", lambda: fc.rread(buf, 4096) == data, deadline, logs)
        ex = eventually("a process spawns", lambda: fc.rrun(["sh", "-c", "echo back"], timeout=5), deadline, logs)
        assert ex.exit_code == 0 and ex.stdout == b"back\n"

        # the registry bucket was memory-backed and died with the server: the node must be written to a
        # recreated bucket again.  Wait past the TTL, so an entry only a dead watcher remembers has expired.
        time.sleep(max(0.0, killed + NODE_TTL_S + 0.5 - time.monotonic()))
        entry = eventually("the node's entry in a recreated fabric_nodes bucket",
                           lambda: registry_entry(url, node, up["credentials"]), deadline, logs)
        assert entry["subject"] == f"$KV.fabric_nodes.{node}"

        def listed() -> bool:
            return [(n.node, n.status) for n in fc.nodes()] == [(node, "up")]

        eventually("the node back in fc.nodes()", listed, deadline, logs)
        fc.rfree(buf)
    assert time.monotonic() - killed < RECOVERY_S
    gm_log = (logs / "gpu-monitor.log").read_text()
    # created at the first start, and again after the crash (not a lucky survivor)
    assert gm_log.count("jetstream resources created") >= 2, gm_log[-3000:]
