"""Helpers for the spawner tests: pid checks, the teardown accounting, a spawner as its own process,
the processes a fabric under a state directory started (``processes_using``, for the CLI tests).

The fixtures that use them are in conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from tests._nats import TRUSTED_ENV, creds_for

if TYPE_CHECKING:
    from fabric import AsyncFabricClient
    from fabric.services.spawner import SpawnerService

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


def processes_using(state_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names *state_dir* (what a fabric there started)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(state_dir) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each points at."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return out


async def no_fds_leaked(before: dict[int, str], within: float = 5.0) -> None:
    """Asserts that the descriptor count falls back to *before* within *within* seconds.

    The spawner's sweeper scans /proc in a worker thread a moment after a process
    ends (that is how a setsid() descendant is found), opening one /proc file after
    another; a scan still running when the test ends is not a leak (CI once counted
    its descriptor: 23 against 22).  A descriptor that stays open past *within* is.
    """
    deadline = time.monotonic() + within
    while True:
        now = open_fds()
        if len(now) <= len(before):
            return
        if time.monotonic() >= deadline:
            extra = {fd: target for fd, target in now.items() if before.get(fd) != target}
            raise AssertionError(f"the spawner leaked file descriptors: {len(before)} before, {len(now)} after; "
                                 f"new or changed: {extra}")
        await asyncio.sleep(0.02)


async def all_ended(spawner: SpawnerService) -> None:
    """Asserts that every process of *spawner* ends within 5 s."""
    table = spawner.table
    assert table is not None
    deadline = time.monotonic() + 5
    while table.live and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not table.live, f"processes still running after the test: {list(table.live)}"


def start_spawner_process(nats_url: str, node: str, state: Path) -> subprocess.Popen[bytes]:
    """``python -m fabric.services.spawner`` as a child of the test (its output discarded); see wait_ready."""
    return subprocess.Popen([PY, "-m", "fabric.services.spawner", "--nats-url", nats_url, "--node", node,
                             "--credentials", str(creds_for("spawner")),
                             "--state-dir", str(state)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **TRUSTED_ENV})


async def wait_ready(fc: AsyncFabricClient, node: str, timeout_s: float = 20.0) -> None:
    """Waits (*timeout_s* at most) until the spawner of *node* answers its info request.

    A started ``python -m fabric.services.spawner`` takes a moment to subscribe (bench/ uses this too).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await fc.spawner_info(node)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
