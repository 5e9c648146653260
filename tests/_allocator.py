"""An allocator as its own OS process, as ``fabric up`` starts it: for tests that kill, freeze or restart one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fabric import FabricClient
from tests._nats import creds_for, env_with_repo


def start_allocator(url: str, node: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.services.allocator", "--nats-url", url, "--node", node,
         "--credentials", str(creds_for("allocator")),
         "--state-dir", str(state)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env_with_repo(),
    )
    return proc


def wait_ready(fc: FabricClient, node: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            fc.meminfo(node)
            return
        except Exception:
            time.sleep(0.05)
    raise AssertionError("allocator did not come up: " + log.read_text()[-3000:])
