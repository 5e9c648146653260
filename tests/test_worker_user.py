"""A user's code in warm workers runs as ``sandbox.client_user``, never as the spawner's root (worker_user.py).

A one-node fabric in this process whose spawner runs as root (the suite does) with
``sandbox.client_user = "nobody"``: a client-role user's ``python`` tasks and the Python
core they load run in workers of their own, as ``nobody``, with ``no_new_privs``, and
cannot read the node's state directory; an admin's still run as the spawner.  The
interpreter ``nobody`` runs is ``sandbox.client_python``: here the system Python of the
same version (the suite's own lives under /root, which ``nobody`` cannot enter); one it
cannot run refuses the task with a message naming the setting.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fabric import AsyncFabricClient
from fabric.config import FabricConfig, SandboxConfig
from fabric.errors import TaskFailed
from fabric.services.spawner.worker_user import reachable
from tests._nats import NatsServer, realm
from tests._tasks import one_node_fabric

#: an interpreter of this Python version that any user can run (scripts/test.sh installs it where it can)
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running workers as another user needs a spawner that is root"),
    pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON} for the sandbox user"),
]


def _config(python: str) -> FabricConfig:
    return FabricConfig(sandbox=SandboxConfig(client_user="nobody", client_python=python))


@pytest.fixture
async def sandboxed(js_server: NatsServer, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    # sandbox.client_python left to its default: the suite's interpreter is out of nobody's reach (under /root
    # here), so the spawner picks the system's of the same version
    async with one_node_fabric(js_server.url, tmp_path, prefix="runas", config=_config(""), trusted=False):
        yield js_server.url, tmp_path


def whoami() -> tuple[int, str, str, str]:
    """uid, the NoNewPrivs line, what reading the spawner's state directory does, the interpreter (in the worker)."""
    import os
    import sys

    with open("/proc/self/status") as f:
        nnp = next(line.split()[1] for line in f if line.startswith("NoNewPrivs:"))
    try:
        secret = f"listed {len(os.listdir(os.environ['FABRIC_TEST_STATE']))}"
    except OSError as exc:
        secret = type(exc).__name__
    try:
        with open("/root/.profile", "rb"):
            secret += ",root-readable"
    except OSError as exc:
        secret += f",{type(exc).__name__}"
    return os.getuid(), nnp, secret, sys.executable


async def test_a_users_python_runs_as_the_client_user(sandboxed: tuple[str, Path]) -> None:
    url, state = sandboxed
    nobody = pwd.getpwnam("nobody").pw_uid
    os.environ["FABRIC_TEST_STATE"] = str(state)  # the workers inherit the spawner's environment
    try:
        async with AsyncFabricClient(url, credentials=realm().client) as alice, \
                AsyncFabricClient(url, credentials=realm().admin) as admin:
            uid, nnp, secret, python = await (await alice.submit(whoami))
            assert (uid, nnp) == (nobody, "1"), (uid, nnp)
            if not reachable(sys.executable, nobody, pwd.getpwnam("nobody").pw_gid):
                assert python == SYSTEM_PYTHON, python
            # neither the node's state directory (its keys) nor /root are the user's to read
            assert secret == "PermissionError,PermissionError", secret
            futs = await alice.map(abs, [-1, -2, -3])  # a map too: the user's lane, one task a worker
            assert [await f for f in futs] == [1, 2, 3]
            # an admin's task still runs as the spawner
            uid, _, _, python = await (await admin.submit(whoami))
            assert uid == 0 and python == sys.executable
            # the Python core the user loads: its workers are the user's, as nobody
            core = await alice.load_python_core(min_workers=1, max_workers=1)
            try:
                assert (await core.call(whoami))[0] == nobody
            finally:
                await core.unload()
    finally:
        os.environ.pop("FABRIC_TEST_STATE", None)


async def test_an_interpreter_the_user_cannot_run_refuses_the_task(js_server: NatsServer, tmp_path: Path) -> None:
    """The secure default where the interpreter is out of reach (under /root, say): refused, never run as root."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    python = hidden / "python"
    shutil.copy(SYSTEM_PYTHON, python)
    async with one_node_fabric(js_server.url, tmp_path, prefix="runas", config=_config(str(python)),
                               trusted=False):
        async with AsyncFabricClient(js_server.url, credentials=realm().client) as alice:
            fut = await alice.submit(os.getuid)
            with pytest.raises(TaskFailed) as failed:
                await fut
            message = str(failed.value)
            assert "sandbox.client_python" in message and "'nobody'" in message and str(python) in message, message


def test_reachable_reads_the_modes_of_the_path() -> None:
    import tempfile

    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="fabric-reachable-", dir="/tmp"))  # pytest's tmp_path is under a 0700 dir
    try:
        _check_reachable(top, nobody)
    finally:
        shutil.rmtree(top)


def _check_reachable(top: Path, nobody: pwd.struct_passwd) -> None:
    top.chmod(0o755)
    open_dir = top / "open"
    open_dir.mkdir(mode=0o755)
    exe = open_dir / "python"
    shutil.copy(SYSTEM_PYTHON, exe)
    exe.chmod(0o755)
    assert reachable(str(exe), nobody.pw_uid, nobody.pw_gid)
    exe.chmod(0o750)  # the group's, not nobody's
    assert not reachable(str(exe), nobody.pw_uid, nobody.pw_gid)
    exe.chmod(0o755)
    open_dir.chmod(0o700)  # a directory on the way nobody may not search
    assert not reachable(str(exe), nobody.pw_uid, nobody.pw_gid)
    assert not reachable(str(top / "absent"), nobody.pw_uid, nobody.pw_gid)


async def test_a_users_opencl_task_runs_in_a_pool_of_their_own_as_the_client_user(
        sandboxed: tuple[str, Path]) -> None:
    """An OpenCL kernel is the user's code too (an OpenCL CPU driver runs it in the worker): the user's own
    fabric.opencl pool, its workers as nobody."""
    pytest.importorskip("pyopencl")
    import numpy as np
    import psutil

    from fabric.opencl import InArg, JobHeader, OutArg, decode_result, encode_job
    from fabric.protocol.env import CORE_ID_ENV
    from fabric.protocol.subjects import Task, cluster
    from fabric.schema import JSON
    from fabric.schema.tasks import SubmitReply, SubmitRequest

    url, _ = sandboxed
    a = np.arange(4, dtype=np.float32)
    header = JobHeader(source="__kernel void vadd(__global const float *a, __global const float *b, "
                              "__global float *c) { int i = get_global_id(0); c[i] = a[i] + b[i]; }",
                       kernel="vadd", global_size=[4],
                       args=[InArg("<f4", [4], 0, 16), InArg("<f4", [4], 16, 16), OutArg("<f4", [4])])
    async with AsyncFabricClient(url, credentials=realm().client) as alice:
        body = SubmitRequest(kind="opencl", payload=bytes(encode_job(header, [(0, a), (16, a)])))
        msg = await alice.request(cluster("task", Task.SUBMIT), JSON.encode(body))  # sent as the user form
        task_id = JSON.decode(msg.data, SubmitReply).id
        for _ in range(600):
            record = await alice.task(task_id)
            if record.state not in ("queued", "running"):
                break
            await asyncio.sleep(0.1)
        assert record.state == "succeeded", record.error
        head, data = decode_result(record.result)
        out = head.outputs[0]
        assert np.frombuffer(bytes(data[out.offset:out.offset + out.nbytes]), np.float32).tolist() == [0, 2, 4, 6]
        node = record.attempts[-1].node
        [pool] = [c for c in (await alice.cores(node)).cores if c.name == "fabric.opencl"]  # the user's own
    uids = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(CORE_ID_ENV) == pool.core:
                uids.add(proc.uids().real)
        except psutil.Error:
            continue
    assert uids == {pwd.getpwnam("nobody").pw_uid}, uids


def test_a_dead_spawners_worker_home_is_swept() -> None:
    """A spawner killed with -9 leaves its workers' HOME behind: the next spawner's start removes it."""
    import tempfile

    from fabric.services.spawner.worker_user import HOME_PREFIX, sweep_homes

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone
    left = Path(tempfile.gettempdir()) / f"{HOME_PREFIX}{dead.pid}-x"
    mine = Path(tempfile.gettempdir()) / f"{HOME_PREFIX}{os.getpid()}-y"
    left.mkdir()
    mine.mkdir()
    try:
        assert str(left) in sweep_homes()
        assert not left.exists() and mine.exists()  # a live spawner's stays
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)
