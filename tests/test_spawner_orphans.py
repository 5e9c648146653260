"""No orphans, ever: descendants that leave the group, the session AND their environment.

The spawner is a child subreaper (PR_SET_CHILD_SUBREAPER): an orphaned descendant of
a spawned process is reparented to it -- here to the pytest process, where the
SpawnerService runs -- and its sweep kills and reaps it once its process has ended.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests._spawner import PY, gone, pid_alive

# the grandchild: double fork, setsid(), then exec `sleep 300` with an EMPTY environment
# (no FABRIC_SPAWNER marker to find it by); its pid goes to the spawned process's stdout
_DOUBLE_FORK = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        os.write(w, str(os.getpid()).encode())
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.execv("/usr/bin/env", ["env", "-i", "sleep", "300"])
    os._exit(0)
os.wait()
os.close(w)
print(os.read(r, 32).decode(), flush=True)
if {linger}:
    time.sleep(300)
"""


def _code(*, linger: bool) -> str:
    return _DOUBLE_FORK.format(linger=linger)


def _keep_env_code(linger: bool) -> str:
    # the same, but the grandchild keeps its environment (the marker names its process)
    return _DOUBLE_FORK.replace('["env", "-i", ', '["env", ').format(linger=linger)


def _zombies() -> list[int]:
    out = []
    for c in psutil.Process().children():
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                out.append(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


async def _reaped(pid: int, within: float) -> bool:
    """Gone and reaped: no longer a child of the test process, not even a zombie."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pid not in {c.pid for c in psutil.Process().children()} and not pid_alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def _first_line(proc) -> int:
    line = b""
    async for chunk in proc.stdout:
        line += chunk
        if b"\n" in line:
            break
    return int(line)


async def test_a_double_forked_setsid_grandchild_with_an_empty_environment_is_killed(fc):
    ex = await fc.rrun([PY, "-c", _code(linger=False)], timeout=10)
    assert ex.exit_code == 0, ex.stderr
    escaped = int(ex.stdout)
    assert await gone(escaped, within=5), "an env -i, setsid(), double-forked grandchild outlived its process"
    assert await _reaped(escaped, within=5), "the adopted orphan was left a zombie"
    assert escaped not in _zombies()


async def test_an_orphan_whose_process_still_runs_is_left_alone_until_it_ends(fc):
    proc = await fc.rspawn([PY, "-c", _keep_env_code(linger=True)])
    orphan = await _first_line(proc)
    # reparented to the spawner (the test process), marked with its still-running process
    deadline = time.monotonic() + 5
    while psutil.Process(orphan).ppid() != os.getpid() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert psutil.Process(orphan).ppid() == os.getpid(), "the orphan was not reparented to the subreaper"
    # its pid is printed before `env` and then `sleep` are exec'd: while an exec is in
    # flight its environ reads empty -- even a moment after its name is `sleep` (the kernel
    # names the new program before it lays out its environment) -- so read until it is there
    env = b""
    while (psutil.Process(orphan).name() != "sleep" or not env) and time.monotonic() < deadline + 5:
        await asyncio.sleep(0.02)
        env = Path(f"/proc/{orphan}/environ").read_bytes()
    assert f"FABRIC_PROC_ID={proc.id}".encode() in env.split(b"\0")
    await asyncio.sleep(3.0)  # several sweeps
    assert pid_alive(orphan), "an orphan of a process that still runs was killed"
    await proc.kill()
    await proc.wait(10)
    assert await gone(orphan, within=5), "the orphan outlived its process"
    assert await _reaped(orphan, within=5), "the adopted orphan was left a zombie"


async def test_an_unmarked_orphan_is_killed_even_while_its_process_runs(fc):
    proc = await fc.rspawn([PY, "-c", _code(linger=True)])
    orphan = await _first_line(proc)
    assert await gone(orphan, within=5), "an unmarked adopted orphan survived"
    assert await _reaped(orphan, within=5)
    await proc.kill()
    await proc.wait(10)


async def test_the_sweep_never_touches_the_test_process_own_children(fc):
    # the host's own children (same process group) and their exits are not the spawner's
    mine = subprocess.Popen(["sleep", "30"])
    try:
        ex = await fc.rrun([PY, "-c", _code(linger=False)], timeout=10)
        assert await gone(int(ex.stdout), within=5)
        await asyncio.sleep(2.5)  # a few more sweeps
        assert mine.poll() is None, "the sweep killed (or reaped) a child it did not adopt"
    finally:
        mine.kill()
        assert mine.wait(5) == -9  # its exit status was not stolen
    done = subprocess.run(["true"])  # a short-lived child's status is still its parent's
    assert done.returncode == 0
    assert not _zombies(), f"zombies under the test process: {_zombies()}"


# -- the spawner as its own process (python -m fabric.services.spawner): every other child is an orphan ---


async def test_a_spawner_process_adopts_and_kills_orphans_but_keeps_its_workers(nats_url, tmp_path):
    from fabric.client import AsyncFabricClient
    from tests._spawner import start_spawner_process, wait_ready

    node = f"adopt-{secrets.token_hex(3)}"
    sp = start_spawner_process(nats_url, node, tmp_path)
    try:
        async with AsyncFabricClient(nats_url, local=False, timeout=20) as client:
            await wait_ready(client, node)
            await client.load_python_core(min_workers=1, max_workers=1, node=node)
            me = psutil.Process(sp.pid)
            deadline = time.monotonic() + 10
            workers: list[int] = []
            while not workers and time.monotonic() < deadline:
                workers = [c.pid for c in me.children() if "fabric.services.spawner.worker" in " ".join(c.cmdline())]
                await asyncio.sleep(0.05)
            assert workers, "no warm worker started"
            # a marked orphan whose process still runs: adopted by the spawner process, left alone
            owner = await client.rspawn([PY, "-c", _keep_env_code(linger=True)], node=node)
            marked = await _first_line(owner)
            # an unmarked one (env -i): adopted and killed
            other = await client.rspawn([PY, "-c", _code(linger=True)], node=node)
            unmarked = await _first_line(other)
            deadline = time.monotonic() + 5
            while psutil.Process(marked).ppid() != sp.pid and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert psutil.Process(marked).ppid() == sp.pid, "the spawner process is not the subreaper"
            assert await gone(unmarked, within=5), "an unmarked orphan survived in a spawner process"
            await asyncio.sleep(2.5)  # a few sweeps
            assert pid_alive(marked), "an orphan of a process that still runs was killed"
            assert all(pid_alive(w) for w in workers), "the sweep killed a warm worker"
            await owner.kill()
            await other.kill()
            await owner.wait(10)
            await other.wait(10)
            assert await gone(marked, within=5), "the orphan outlived its process"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                zombies = [c.pid for c in me.children() if c.status() == psutil.STATUS_ZOMBIE]
                if not zombies:
                    break
                await asyncio.sleep(0.05)
            assert not zombies, f"zombies left under the spawner process: {zombies}"
            assert all(pid_alive(w) for w in workers)
    finally:
        if sp.poll() is None:
            sp.terminate()
        sp.wait(15)


@pytest.mark.unit
def test_a_process_caught_inside_execve_is_not_read_as_unmarked(tmp_path: Path) -> None:
    """/proc/<pid>/environ reads empty while an exec is in flight; the orphan sweep reads it again.

    Read once, a marked orphan caught mid-exec looked unmarked, and the sweep killed it
    although its process still ran.  Here one pid execs in a loop, its environment
    always set: a plain read sees it empty now and then, a settled read never does.
    """
    from fabric.services.spawner.orphans import _env_vars

    script = tmp_path / "exec-loop.sh"
    script.write_text(f"#!/bin/sh\nexec /usr/bin/env MARK=1 /bin/sh {script}\n")
    loop = subprocess.Popen(["/bin/sh", str(script)], env={"MARK": "1"})
    try:
        plain = [_env_vars(loop.pid) for _ in range(3000)]
        settled = [_env_vars(loop.pid, settle=0.05) for _ in range(300)]
    finally:
        loop.kill()
        loop.wait()
    assert any(env == {} for env in plain), "no read caught an exec in flight: the race this guards was not hit"
    assert all(env.get(b"MARK") == b"1" for env in settled)
