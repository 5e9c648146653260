"""End to end under ``fabric up``: a Node.js client, and kill -9 of the allocator.

One detached fabric (embedded nats-server + allocator, started exactly as a user
does) serves the module; ``fabric down`` in teardown must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fabric import BadRequest, DoubleFree, FabricClient, StaleHandle
from fabric.handles import parse
from tests._nats import env_for_fabric, env_with_repo

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "tests" / "node"


def fabric(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabric.cli", *args], capture_output=True, text=True,
                          env=env_for_fabric(env_with_repo()), timeout=timeout)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state_dir = tmp_path_factory.mktemp("fabric-up")
    out = fabric("up", "-d", "--nats-port", "0", "--state-dir", str(state_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((state_dir / "state.json").read_text())
    state["state_dir"] = str(state_dir)
    yield state
    prefix = json.loads((state_dir / "allocator" / f"{state['node']}.json").read_text())["prefix"]
    down = fabric("down", "--purge", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert prefix in down.stdout
    left = [p.name for p in Path("/dev/shm").glob(f"{prefix}.*")]
    assert left == [], f"down --purge left shared memory behind: {left}"


def test_node_js_client_speaks_the_json_protocol(up):
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@nats-io" / "transport-node").exists():
        pytest.fail("Node.js client not installed: scripts/test.sh runs `npm ci` in tests/node")
    # as the fabric's admin (tests/node/fabric_auth.mjs reads $FABRIC_CREDENTIALS): not the test realm's client
    env = {**os.environ, "FABRIC_CREDENTIALS": up["credentials"]}
    out = subprocess.run([node, str(NODE_DIR / "mem_client.mjs"), up["nats_url"]], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["ok"] is True and seen["node"] == up["node"]
    assert seen["read"] == "hello from node.js"
    assert seen["double_free"]["code"] == 409 and seen["double_free"]["kind"] == "double_free"
    assert seen["bad_request"]["code"] == 400


def allocator_pid(state_dir: str) -> int | None:
    st = json.loads((Path(state_dir) / "state.json").read_text())
    return st["services"]["allocator"]["pid"]


def test_kill_9_allocator_under_fabric_up_keeps_every_handle(up):
    url = up["nats_url"]
    with FabricClient(url, local=False, credentials=up["credentials"]) as fc:
        blocks = []
        for size in (0, 1, 1000, 65536, 3 << 20):
            buf = fc.rmalloc(size)
            data = os.urandom(size)
            if size:
                fc.rwrite(buf, data)
            blocks.append((buf, data))
        ro = fc.rshare(blocks[2][0])

        old = allocator_pid(up["state_dir"])
        assert old and psutil.pid_exists(old)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            new = allocator_pid(up["state_dir"])
            if new and new != old:
                try:
                    fc.meminfo(up["node"])
                    break
                except Exception:
                    pass
            assert time.monotonic() < deadline, "allocator was not restarted"
            time.sleep(0.05)

        for buf, data in blocks:
            assert fc.rread(buf) == data
        assert fc.rread(ro) == blocks[2][1]
        for buf, _ in blocks:
            fc.rfree(buf)
    log = (Path(up["state_dir"]) / "logs" / "supervisor.log").read_text()
    assert "restart" in log


def test_sync_client_remote_buffer(up):
    with FabricClient(up["nats_url"], local=False, credentials=up["credentials"]) as fc:
        with fc.rmalloc(16) as buf:
            assert len(buf) == 16 and str(buf) == buf.handle
            buf[0:5] = b"hello"
            buf[-1] = 0x21
            assert buf[0:5] == b"hello" and buf[15] == 0x21 and buf[-1] == 0x21
            assert buf[:] == b"hello" + bytes(10) + b"!"
            assert buf[3:3] == b""
            with pytest.raises(IndexError):
                buf[16]
            with pytest.raises(BadRequest):
                buf[0:4] = b"too long"
            with pytest.raises(BadRequest):
                buf[0:4:2]
            handle = buf.handle
        # leaving the with-block freed it
        with pytest.raises(DoubleFree):
            fc.rfree(handle)
        grown = fc.rrealloc(fc.rmalloc(4), 4096)
        assert len(grown) == 4096 and fc.rread(grown) == bytes(4096)
        grown.free()


def test_sync_client_local_fast_path(up):
    with FabricClient(up["nats_url"], credentials=up["credentials"]) as fc:
        buf = fc.rmalloc(1 << 16)
        fc.rwrite(buf, b"first")  # attaches the segment
        parts = parse(buf.handle)
        assert fc.aio._local.view(parts) is not None, "local fast path not taken on the allocator's host"
        fc.rwrite(buf, b"x" * 1000, offset=500)
        assert fc.rread(buf, 1000, offset=500) == b"x" * 1000
        with FabricClient(up["nats_url"], local=False, credentials=up["credentials"]) as remote:
            assert remote.rread(buf.handle, 5) == b"first"
        ro = fc.rshare(buf)
        assert fc.rread(ro, 5) == b"first"  # read-only handles use the bus
        fc.rfree(buf)
        with pytest.raises(StaleHandle):
            fc.rread(buf, 1)


def test_example_script_runs(up):
    env = env_with_repo()
    env["FABRIC_NATS_URL"] = up["nats_url"]
    env["FABRIC_CREDENTIALS"] = up["credentials"]  # auth is on: the fabric's admin (a user's file works the same)
    out = subprocess.run([sys.executable, str(REPO / "examples" / "remote_memory.py")], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "through the read-only handle: b'hello world'" in out.stdout
    assert "use after free -> 404 stale_handle" in out.stdout
    assert "double free -> 409 double_free" in out.stdout


def test_client_without_url_finds_the_fabric_running_here(up, monkeypatch):
    """FabricClient() with no URL reaches the fabric that `fabric up` runs in the default state dir, as its admin."""
    import fabric.state
    from fabric.client import default_url

    monkeypatch.delenv("FABRIC_NATS_URL", raising=False)
    monkeypatch.delenv("FABRIC_CREDENTIALS", raising=False)  # the admin's, found in the state dir
    monkeypatch.setattr(fabric.state, "default_state_dir", lambda: Path(up["state_dir"]))
    assert default_url() == up["nats_url"]
    with FabricClient() as fc:
        buf = fc.rmalloc(16)
        fc.rwrite(buf, b"found")
        assert fc.rread(buf, 5) == b"found"
        fc.rfree(buf)
