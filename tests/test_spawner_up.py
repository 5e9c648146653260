"""The spawner under ``fabric up``: reached through the cluster subject, and ``fabric down`` ends its processes.

Started exactly as a user does (``fabric up -d`` on free ports, a state directory of
its own); a process with a grandchild is running when ``fabric down`` stops the
fabric, and neither may survive.  Also: kill -9 of the spawner under the
supervisor, which restarts it; the restarted spawner kills what the dead one left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fabric import FabricClient, Limits
from tests._nats import env_for_fabric, env_with_repo
from tests._spawner import pid_alive

PY = sys.executable
GRANDCHILD = ("import os, time\nif os.fork() == 0:\n    time.sleep(300)\n    os._exit(0)\n"
              "print(os.getpid(), flush=True)\ntime.sleep(300)")


def fabric(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabric.cli", *args], capture_output=True, text=True,
                          env=env_for_fabric(env_with_repo()), timeout=timeout)


def wait_gone(pids: list[int], within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [p for p in pids if pid_alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


def family(pid: int) -> list[int]:
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_fabric_up_runs_the_spawner_and_down_leaves_no_process(tmp_path: Path) -> None:
    out = fabric("up", "-d", "--nats-port", "0", "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((tmp_path / "state.json").read_text())
    stopped = False
    try:
        with FabricClient(state["nats_url"], local=False, credentials=state["credentials"]) as fc:
            ex = fc.rrun(["echo", "from fabric up"])  # the cluster subject: any spawner
            assert ex.stdout == b"from fabric up\n"
            # kill -9 of the spawner: the supervisor restarts it, the new one kills the orphan
            before = fc.rspawn(["sleep", "300"])
            old = state["services"]["spawner"]["pid"]
            psutil.Process(old).kill()
            deadline = time.monotonic() + 30
            while True:
                try:
                    new = json.loads((tmp_path / "state.json").read_text())["services"]["spawner"]["pid"]
                    if new not in (None, old):
                        fc.spawner_info(state["node"])
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, "the spawner was not restarted"
                time.sleep(0.1)
            assert wait_gone([before.pid]) == [], "the dead spawner's process outlived the restart"
            proc = fc.rspawn([PY, "-c", GRANDCHILD], limits=Limits(wall_s=600), node=state["node"])
            first = next(iter(proc.stdout))
            assert int(first) == proc.pid
            pids = family(proc.pid)
            assert len(pids) == 2, f"expected the process and its grandchild, got {pids}"
        down = fabric("down", "--purge", "--state-dir", str(tmp_path))
        stopped = True
        assert down.returncode == 0, down.stdout + down.stderr
        assert wait_gone(pids) == [], "fabric down left spawned processes running"
    finally:
        if not stopped:
            fabric("down", "--purge", "--state-dir", str(tmp_path))
