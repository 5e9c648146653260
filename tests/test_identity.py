"""Identity reaches the services: with auth on, what a user creates is theirs, and only theirs to act on.

Two client-role users of the session's secured servers -- ``tester`` (the tests' default
client) and ``other`` -- and the admin (plain subjects, trusted).  The services are real
and in this process; the server enforces the permissions, the services the ownership
(fabric/service_identity.py).
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import AsyncIterator
from pathlib import Path

import cloudpickle
import pytest

from fabric import AsyncFabricClient, Conflict, PermissionDenied
from fabric.credentials import read_credentials
from fabric.errors import NoResponders, NotFound
from fabric.protocol.permissions import user_subject
from fabric.protocol.subjects import Proc, Task, cluster, node_scoped
from fabric.schema import JSON
from tests._nats import NatsServer, connect, realm
from tests._tasks import one_node_fabric


@pytest.fixture
async def other(nats_url: str) -> AsyncIterator[AsyncFabricClient]:
    async with AsyncFabricClient(nats_url, local=False, credentials=realm().other) as client:
        yield client


async def test_processes_are_their_owners(fc: AsyncFabricClient, other: AsyncFabricClient, spawner: object,
                                          nats_url: str) -> None:
    assert fc.user == "tester" and other.user == "other"
    proc = await fc.rspawn(["sleep", "30"])  # the request's owner is the client's default (user@host): not kept
    try:
        st = await fc.rstatus(proc)
        assert st.owner == "tester"
        for call in (other.rstatus(proc.id), other.rkill(proc.id), other.rwrite_stdin(proc.id, b"x"),
                     other.rwait(proc.id, timeout=0.1)):
            with pytest.raises(PermissionDenied, match=f"process {proc.id} belongs to another user"):
                await call
        node = spawner.node  # type: ignore[attr-defined]
        assert proc.id in [p.id for p in await fc.rlist(node)]
        assert proc.id not in [p.id for p in await other.rlist(node)]
        # the admin (plain subjects) acts on anything
        nc = await connect(nats_url)
        try:
            msg = await nc.request(node_scoped("proc", node, Proc.STATUS), json.dumps({"id": proc.id}).encode(),
                                   timeout=5)
            assert json.loads(msg.data)["owner"] == "tester"
        finally:
            await nc.close()
    finally:
        assert await fc.rkill(proc)
        await fc.rwait(proc)


async def test_stream_to_only_into_the_callers_inbox(fc: AsyncFabricClient, spawner: object) -> None:
    node = spawner.node  # type: ignore[attr-defined]
    for target in ("_INBOX.other.steal", "fabric.task.pull", "_INBOX.testerx.y"):
        with pytest.raises(PermissionDenied, match="not in the caller's inbox"):
            await fc.request(node_scoped("proc", node, Proc.SPAWN),
                             json.dumps({"argv": ["true"], "stream_to": target}).encode())
    # its own inbox is fine (the client's streams live there)
    ex = await fc.rrun(["echo", "mine"], node=node)
    assert ex.stdout == b"mine\n"


async def test_memory_quota_account_is_the_caller(aclient: AsyncFabricClient, allocator: object) -> None:
    buf = await aclient.rmalloc(64, owner="not-me")
    try:
        assert (await aclient.rstat(buf)).owner == "tester"
    finally:
        await aclient.rfree(buf)


@pytest.fixture(scope="module")
async def tasks_fabric(js_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with one_node_fabric(js_server.url, tmp_path_factory.mktemp("identity"), prefix="ident"):
        yield js_server.url


async def test_tasks_are_their_owners(tasks_fabric: str, tmp_path: Path) -> None:
    url = tasks_fabric
    async with AsyncFabricClient(url, credentials=realm().client) as alice, \
            AsyncFabricClient(url, credentials=realm().other) as bob:
        fut = await alice.submit(sum, [1, 2, 3], key="k1")
        assert await fut == 6
        rec = await alice.task(fut.id)
        assert rec.owner == "tester"
        for verb in (Task.GET, Task.CANCEL, Task.WAIT):
            with pytest.raises(PermissionDenied, match=f"task {fut.id} belongs to another user"):
                await bob.request(cluster("task", verb), json.dumps({"id": fut.id}).encode())
        with pytest.raises(NotFound):  # an unknown id stays 404 (not 403): nothing to hide
            await bob.request(cluster("task", Task.GET), json.dumps({"id": "no-such-task"}).encode())
        ids = lambda reply: [t["id"] for t in json.loads(reply.data)["tasks"]]  # noqa: E731
        assert fut.id in ids(await alice.request(cluster("task", Task.LIST), b"{}"))
        assert fut.id not in ids(await bob.request(cluster("task", Task.LIST), b"{}"))
        # idempotency keys are per user: bob's "k1" is a new task of bob's
        bobs = await bob.submit(max, [4, 5], key="k1")
        assert bobs.id != fut.id and await bobs == 5
        # an explicit id another user's task holds is refused, not handed over
        with pytest.raises(Conflict, match="taken by another user"):
            await bob.request(cluster("task", Task.SUBMIT), json.dumps(
                {"id": fut.id, "kind": "exec", "exec": {"argv": ["true"]}}).encode())
        # a dependency is an input: bob cannot name alice's task
        with pytest.raises(PermissionDenied, match=f"dependency {fut.id}"):
            await bob.request(cluster("task", Task.SUBMIT), json.dumps(
                {"kind": "exec", "exec": {"argv": ["true"]}, "deps": [fut.id]}).encode())
        # notices only into the caller's inbox
        with pytest.raises(PermissionDenied, match="notify"):
            await bob.request(cluster("task", Task.SUBMIT), json.dumps(
                {"kind": "exec", "exec": {"argv": ["true"]}, "notify": "_INBOX.tester.x"}).encode())
    # the admin sees everyone's
    admin = read_credentials(realm().admin)
    async with AsyncFabricClient(url, credentials=admin.path) as root:
        assert root.user is None
        listed = json.loads((await root.request(cluster("task", Task.LIST), b'{"limit": 1000}')).data)["tasks"]
        assert {fut.id, bobs.id} <= {t["id"] for t in listed}
        assert (await root.task(fut.id)).owner == "tester"


async def test_a_map_is_its_owners(tasks_fabric: str) -> None:
    async with AsyncFabricClient(tasks_fabric, credentials=realm().client) as alice, \
            AsyncFabricClient(tasks_fabric, credentials=realm().other) as bob:
        futs = await alice.map(abs, [-1, -2, -3])
        assert [await f for f in futs] == [1, 2, 3]
        assert [(await alice.task(f.id)).owner for f in futs] == ["tester"] * 3
        with pytest.raises(PermissionDenied):
            await bob.task(futs[0].id)
        prefix = futs[0].id.rsplit("-", 1)[0]
        body = {"fn": base64.b64encode(cloudpickle.dumps(abs)).decode(),
                "calls": [base64.b64encode(pickle.dumps(((1,), {}))).decode()], "prefix": prefix}
        with pytest.raises(Conflict, match="taken by another user"):
            await bob.request(cluster("task", Task.MAP), json.dumps(body).encode())


async def test_a_users_processes_do_not_run_as_root(nats_url: str, tmp_path: Path) -> None:
    """With the default sandbox.client_user, a spawner running as root runs a user's processes as ``nobody``,
    without setuid gains, and refuses a user's sandbox.user of its own; an admin's run as the spawner."""
    import os
    import pwd
    import secrets

    from fabric.schema import Sandbox
    from fabric.service import ServiceSettings
    from fabric.services.spawner import SpawnerService
    from tests._nats import creds_for

    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), nats_url=nats_url,
                                         node=f"uid-{secrets.token_hex(3)}", state_dir=tmp_path))
    await svc.start()
    try:
        async with AsyncFabricClient(nats_url, local=False, credentials=realm().client) as user, \
                AsyncFabricClient(nats_url, local=False, credentials=realm().admin) as admin:
            mine = await user.rrun(["/bin/sh", "-c", "id -u; grep NoNewPrivs /proc/self/status"], node=svc.node)
            uid, nnp = mine.stdout.decode().split("\n")[:2]
            root = await admin.rrun(["id", "-u"], node=svc.node)
            if os.geteuid() == 0:
                assert int(uid) == pwd.getpwnam("nobody").pw_uid and nnp.split() == ["NoNewPrivs:", "1"]
                assert root.stdout == b"0\n"
                with pytest.raises(PermissionDenied, match="runs processes only as 'nobody'"):
                    await user.rspawn(["true"], node=svc.node, sandbox=Sandbox(user="root"))
            else:  # a spawner that is not root runs everyone's processes as itself: none as root
                assert int(uid) == os.geteuid() and root.stdout == f"{os.geteuid()}\n".encode()
    finally:
        await svc.stop()


async def test_a_users_cores_are_its_own(fc: AsyncFabricClient, other: AsyncFabricClient, spawner: object,
                                         build_dir: Path) -> None:
    """A warm pool belongs to whoever loaded it: another user's load of the same name is another pool, and it may
    neither run jobs on, nor read, nor unload, nor replace the first."""
    from tests._cores import TEST_CORES, build_core

    node = spawner.node  # type: ignore[attr-defined]
    so = build_core(TEST_CORES / "echo.c", build_dir)
    mine = await fc.load_core("echo-owned", so, node=node)
    try:
        theirs = await other.load_core("echo-owned", so, node=node)  # not reused: another user's pool
        try:
            assert theirs.id != mine.id and not theirs.info.reused
            assert await theirs.run(b"x") == b"x"
            run = user_subject("other", f"fabric.core.{node}.run.{mine.id}")
            reply = await other.nc.request(run, b"stolen", timeout=5)  # type: ignore[union-attr]
            assert reply.headers and reply.headers["Nats-Service-Error-Code"] == "403"
            for call in (other.request(f"fabric.core.{node}.stats", json.dumps({"core": mine.id}).encode()),
                         other.request(f"fabric.core.{node}.unload", json.dumps({"core": mine.id}).encode())):
                with pytest.raises(PermissionDenied, match="belongs to another user"):
                    await call
            assert [c.core for c in (await other.cores(node)).cores] == [theirs.id]
            assert await mine.run(b"still mine") == b"still mine"
        finally:
            await theirs.unload()
    finally:
        await mine.unload()


async def test_a_user_follows_its_own_task_events(tasks_fabric: str) -> None:
    """The whole events feed is the admins'; a user gets its own tasks' events on fabric.u.<user>.task.events."""
    import asyncio

    from fabric.schema.tasks import TaskEventBatch

    async with AsyncFabricClient(tasks_fabric, credentials=realm().client) as alice, \
            AsyncFabricClient(tasks_fabric, credentials=realm().other) as bob:
        seen: list[str] = []

        async def on_events(msg: object) -> None:
            seen.extend(e.id for e in JSON.decode(msg.data, TaskEventBatch).events)  # type: ignore[attr-defined]

        assert alice.nc is not None
        await alice.nc.subscribe(user_subject("tester", cluster("task", Task.EVENTS)), cb=on_events)
        await alice.nc.flush()
        mine = await alice.submit(abs, -4)
        theirs = await bob.submit(abs, -5)
        assert await mine == 4 and await theirs == 5
        for _ in range(100):
            if mine.id in seen:
                break
            await asyncio.sleep(0.05)
        assert mine.id in seen and theirs.id not in seen


async def test_a_permission_violation_is_a_clear_error(fc: AsyncFabricClient, nats_url: str) -> None:
    """A subject the user's role may not publish to: PermissionDenied naming the user and the subject (nats-server
    refuses the publish and tells the connection), and the connection goes on serving."""
    with pytest.raises(PermissionDenied) as info:
        await fc.request("$KV.fabric_tasks.someone-elses", b"forged", timeout=30)
    assert "user 'tester' may not publish to '$kv.fabric_tasks.someone-elses'" in info.value.message
    assert info.value.code == 403
    assert fc.nc is not None and fc.nc.is_connected
    with pytest.raises(NoResponders, match="no service answers"):  # the same connection, a legal subject
        await fc.request("fabric.nodes.nosuchnode.info", b"{}", timeout=5)
