"""kill -9 of the allocator process: every block, byte and handle survives the restart.

The allocator runs as its own OS process (``python -m fabric.services.allocator``), exactly
as ``fabric up`` starts it; the test kills it with SIGKILL mid-life and starts a new
one on the same state directory.
"""

from __future__ import annotations

import json
import os
import secrets
import signal

import pytest

from fabric import DoubleFree, FabricClient, StaleHandle
from tests._allocator import start_allocator, wait_ready


@pytest.mark.slow
def test_kill_9_keeps_every_handle(nats_url, tmp_path):
    node = f"crash-{secrets.token_hex(3)}"
    log = tmp_path / "allocator.log"
    proc = start_allocator(nats_url, node, tmp_path, log)
    prefix = None
    try:
        with FabricClient(nats_url, local=False) as fc:
            wait_ready(fc, node, proc, log)
            prefix = json.loads((tmp_path / "allocator" / f"{node}.json").read_text())["prefix"]
            blocks = {}
            for size in [1, 100, 4096, 70000, 1 << 20]:
                buf = fc.rmalloc(size, node=node)
                data = os.urandom(size)
                fc.rwrite(buf, data)
                blocks[buf.handle] = (buf, data)
            freed = fc.rmalloc(10, node=node)
            fc.rfree(freed)
            ro = fc.rshare(next(iter(blocks.values()))[0])

            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = start_allocator(nats_url, node, tmp_path, log)
            wait_ready(fc, node, proc, log)

            for handle, (_buf, data) in blocks.items():
                assert fc.rread(handle) == data, "bytes changed across the restart"
            assert fc.rread(ro) == next(iter(blocks.values()))[1], "read-only handle no longer valid"
            with pytest.raises(DoubleFree):
                fc.rfree(freed)
            info = fc.meminfo(node)
            assert info.blocks == len(blocks)
            for buf, _ in blocks.values():
                fc.rfree(buf)
            with pytest.raises(StaleHandle):
                fc.rread(ro)
            assert fc.meminfo(node).blocks == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
        if prefix:
            from fabric_ext.arena import Arena

            Arena(prefix, 1 << 30).destroy()


def test_sigterm_drains_and_keeps_segments(nats_url, tmp_path):
    node = f"term-{secrets.token_hex(3)}"
    log = tmp_path / "allocator.log"
    proc = start_allocator(nats_url, node, tmp_path, log)
    prefix = None
    try:
        with FabricClient(nats_url, local=False) as fc:
            wait_ready(fc, node, proc, log)
            prefix = json.loads((tmp_path / "allocator" / f"{node}.json").read_text())["prefix"]
            buf = fc.rmalloc(16, node=node)
            fc.rwrite(buf, b"0123456789abcdef")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()[-2000:]
            assert "service stopped" in log.read_text()
            proc = start_allocator(nats_url, node, tmp_path, log)
            wait_ready(fc, node, proc, log)
            assert fc.rread(buf) == b"0123456789abcdef"
            fc.rfree(buf)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            from fabric_ext.arena import Arena

            Arena(prefix, 1 << 30).destroy()
