"""Limits, sandbox and native executables, checked from inside the child.

Every test asserts what the kernel did to the process (it failed to allocate, was
killed by SIGXCPU, sees another network namespace...), not only what the reply
says; and where this node cannot enforce something, that the spawn says so
(422 ``not_enforceable`` when strict, ``unenforced`` otherwise) instead of
claiming it.  Also: kill -9 of a spawner process, whose orphans the next spawner
on the same node and state directory kills; and the sync client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fabric import (
    AsyncFabricClient,
    BadRequest,
    ExecutableNotFound,
    FabricClient,
    Limits,
    NotEnforceable,
    Sandbox,
    WrongArchitecture,
)
from tests._nats import TRUSTED_ENV, connect, creds_for
from tests._spawner import start_spawner_process, wait_ready

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


async def run(fc: AsyncFabricClient, node: str, argv: list[str], **kw):
    proc = await fc.rspawn(argv, node=node, **kw)
    return proc, await proc.wait(30)


async def test_cpu_limit_kills_a_busy_loop(fc, spawner):
    proc, ex = await run(fc, spawner.node, [PY, "-c", "while True: pass"], limits=Limits(cpu_s=1, wall_s=20))
    assert "limits.cpu_s" in proc.enforced
    assert ex.reason == "cpu_limit" and ex.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert 0.5 <= ex.cpu_s < 5  # rusage's split of CPU time lags the clock RLIMIT_CPU counts


async def test_address_space_limit_makes_allocation_fail(fc, spawner):
    code = "try:\n    b = bytearray(800 << 20)\n    print('allocated')\nexcept MemoryError:\n    print('MemoryError')"
    _, ex = await run(fc, spawner.node, [PY, "-c", code], limits=Limits(address_space=400 << 20))
    assert ex.stdout.strip() == b"MemoryError"
    _, free = await run(fc, spawner.node, [PY, "-c", code])
    assert free.stdout.strip() == b"allocated", "without the limit the same allocation succeeds"


async def test_open_files_limit(fc, spawner):
    code = ("import os\nfds=[]\ntry:\n    while True: fds.append(os.open('/dev/null', os.O_RDONLY))\n"
            "except OSError as e:\n    print(len(fds), e.errno)")
    _, ex = await run(fc, spawner.node, [PY, "-c", code], limits=Limits(open_files=32))
    count, err = ex.stdout.split()
    assert int(count) < 32 and int(err) == 24  # EMFILE


async def test_file_size_limit_sends_sigxfsz(fc, spawner, tmp_path):
    target = tmp_path / "big"
    _, ex = await run(fc, spawner.node, ["/bin/sh", "-c", f"exec head -c 100000 /dev/zero > {target}"],
                      limits=Limits(file_size=4096))
    assert ex.signal == signal.SIGXFSZ and ex.reason == "signaled"
    assert target.stat().st_size <= 4096


async def test_processes_limit_is_never_claimed_when_root_ignores_it(fc, spawner):
    info = await fc.spawner_info(spawner.node)
    if "limits.processes" in info.not_enforceable:  # root with CAP_SYS_ADMIN/RESOURCE
        with pytest.raises(NotEnforceable, match="limits.processes"):
            await fc.rspawn(["true"], node=spawner.node, limits=Limits(processes=1))
        proc = await fc.rspawn(["true"], node=spawner.node, limits=Limits(processes=1, wall_s=5), strict=False)
        assert "limits.processes" in proc.unenforced and "limits.processes" not in proc.enforced
        assert "limits.wall_s" in proc.enforced
        await proc.wait(10)
    if "sandbox.user" in info.enforceable:
        # as an unprivileged user the kernel does apply it: a fork fails
        proc, ex = await run(fc, spawner.node, ["/bin/sh", "-c", "(true) && echo forked || echo nofork"],
                             limits=Limits(processes=1), sandbox=Sandbox(user="nobody"))
        assert "limits.processes" in proc.enforced and "sandbox.user" in proc.enforced
        assert b"forked" not in ex.stdout or b"nofork" in ex.stdout, (ex.stdout, ex.stderr)


async def test_cgroup_memory_limit_or_an_honest_refusal(fc, spawner):
    info = await fc.spawner_info(spawner.node)
    hog = "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
    if "limits.mem_bytes" not in info.enforceable:
        with pytest.raises(NotEnforceable, match="limits.mem_bytes"):
            await fc.rspawn([PY, "-c", hog], node=spawner.node, limits=Limits(mem_bytes=64 << 20))
        return
    proc, ex = await run(fc, spawner.node, [PY, "-c", hog], limits=Limits(mem_bytes=64 << 20))
    assert "limits.mem_bytes" in proc.enforced
    assert ex.signal == signal.SIGKILL and ex.reason == "memory_limit" and b"survived" not in ex.stdout
    assert not [p for p in spawner.cgroups.base.iterdir() if p.is_dir()], "the process's cgroup was not removed"


async def test_a_memory_cgroup_makes_max_rss_exact_below_the_spawners_peak(fc, spawner):
    info = await fc.spawner_info(spawner.node)
    if "limits.mem_bytes" not in info.enforceable:
        pytest.skip(f"no writable memory cgroup here: {info.not_enforceable.get('limits.mem_bytes')}")
    # 24 MiB, far below the spawner's own peak (this process): rusage alone could not tell it
    code = "b = b'x' * (24 << 20); print(len(b))"
    proc, ex = await run(fc, spawner.node, [PY, "-c", code], limits=Limits(mem_bytes=512 << 20))
    assert ex.exit_code == 0 and "limits.mem_bytes" in proc.enforced
    assert ex.max_rss_exact and 24 << 20 <= ex.max_rss < 128 << 20, ex


async def test_network_namespace_is_real(fc, spawner, nats_server):
    info = await fc.spawner_info(spawner.node)
    probe = (f"import os, socket\nprint(os.readlink('/proc/self/ns/net'))\n"
             f"s = socket.socket()\ns.settimeout(2)\n"
             f"try:\n    s.connect(('127.0.0.1', {nats_server.port}))\n    print('connected')\n"
             f"except OSError as e:\n    print('unreachable')")
    if "sandbox.network" not in info.enforceable:
        with pytest.raises(NotEnforceable, match="sandbox.network"):
            await fc.rspawn([PY, "-c", probe], node=spawner.node, sandbox=Sandbox(network=False))
        return
    proc, ex = await run(fc, spawner.node, [PY, "-c", probe], sandbox=Sandbox(network=False))
    ns, result = ex.stdout.decode().split()
    assert "sandbox.network" in proc.enforced
    assert ns != os.readlink("/proc/self/ns/net") and result == "unreachable"
    _, open_ex = await run(fc, spawner.node, [PY, "-c", probe])
    assert open_ex.stdout.decode().split() == [os.readlink("/proc/self/ns/net"), "connected"]


async def test_no_new_privs_is_set_in_the_child(fc, spawner):
    grep = ["/bin/sh", "-c", "grep NoNewPrivs /proc/self/status"]
    proc, ex = await run(fc, spawner.node, grep, sandbox=Sandbox(no_new_privs=True))
    assert "sandbox.no_new_privs" in proc.enforced and ex.stdout.split() == [b"NoNewPrivs:", b"1"]
    _, plain = await run(fc, spawner.node, grep)
    assert plain.stdout.split() == [b"NoNewPrivs:", b"0"]


async def test_user_switch(fc, spawner):
    info = await fc.spawner_info(spawner.node)
    if "sandbox.user" not in info.enforceable:
        with pytest.raises(NotEnforceable, match="sandbox.user"):
            await fc.rspawn(["id", "-u"], node=spawner.node, sandbox=Sandbox(user="nobody"))
        return
    import pwd

    proc, ex = await run(fc, spawner.node, ["/bin/sh", "-c", "id -u; id -G"], sandbox=Sandbox(user="nobody"))
    assert "sandbox.user" in proc.enforced
    nobody = pwd.getpwnam("nobody")
    uid, groups = ex.stdout.decode().splitlines()
    assert int(uid) == nobody.pw_uid and groups.split() == [str(nobody.pw_gid)]
    with pytest.raises(BadRequest, match="no user"):
        await fc.rspawn(["true"], node=spawner.node, sandbox=Sandbox(user="no-such-user-xyz"))


# -- native executables ---------------------------------------------------------------------------


def elf_bytes() -> bytes:
    return Path(os.path.realpath("/bin/true")).read_bytes()


async def raw_spawn(nats_url: str, node: str, body: dict) -> tuple[dict, dict]:
    nc = await connect(nats_url)
    try:
        msg = await nc.request(f"fabric.proc.{node}.spawn", json.dumps(body).encode(), timeout=10)
    finally:
        await nc.close()
    return json.loads(msg.data), dict(msg.headers or {})


async def test_native_executable_is_stored_once_and_reused_by_digest(fc, spawner, nats_url):
    data = elf_bytes() + secrets.token_bytes(16)  # trailing bytes: a digest no other test has stored
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(ExecutableNotFound):  # never sent: the node does not have it
        await raw_ok(nats_url, spawner.node, {"argv": ["t"], "native": {"sha256": digest}, "wait_s": 5})
    proc = await fc.rspawn(["my-true"], node=spawner.node, executable=data)
    assert (await proc.wait(10)).exit_code == 0
    stored = spawner.blobs.path(digest)
    assert stored.read_bytes() == data and os.access(stored, os.X_OK)
    mtime = stored.stat().st_mtime_ns
    reply = await raw_ok(nats_url, spawner.node, {"argv": ["t"], "native": {"sha256": digest, "architecture":
                                                                              "x86_64" if os.uname().machine ==
                                                                              "x86_64" else os.uname().machine},
                                                  "wait_s": 5})
    assert reply["exit"]["exit_code"] == 0, "spawn by digest alone runs the stored binary"
    assert stored.stat().st_mtime_ns == mtime


async def raw_ok(nats_url: str, node: str, body: dict) -> dict:
    from fabric.errors import error_from_wire

    reply, headers = await raw_spawn(nats_url, node, body)
    if "Nats-Service-Error-Code" in headers:
        raise error_from_wire(headers["Nats-Service-Error-Code"], headers.get("Nats-Service-Error", ""),
                              headers.get("Fabric-Error"))
    return reply


async def test_native_digest_mismatch_is_400(nats_url, spawner):
    import base64

    data = elf_bytes()
    body = {"argv": ["t"], "native": {"sha256": "0" * 64, "data": base64.b64encode(data).decode()}}
    with pytest.raises(BadRequest, match="sha256 mismatch"):
        await raw_ok(nats_url, spawner.node, body)


async def test_native_wrong_architecture_is_422(fc, spawner):
    other = "aarch64" if os.uname().machine != "aarch64" else "x86_64"
    with pytest.raises(WrongArchitecture, match=other):
        await fc.rspawn(["t"], node=spawner.node, executable=elf_bytes(), architecture=other)
    # a claim that matches the node but an ELF header that does not: the header wins
    patched = bytearray(elf_bytes())
    patched[18:20] = (183 if other == "aarch64" else 62).to_bytes(2, "little")
    with pytest.raises(WrongArchitecture, match="ELF header says"):
        await fc.rspawn(["t"], node=spawner.node, executable=bytes(patched))
    with pytest.raises(BadRequest, match="ELF"):
        await fc.rspawn(["t"], node=spawner.node, executable=b"#!/bin/sh\necho not elf\n")
    with pytest.raises(WrongArchitecture, match="windows"):
        await raw_ok(fc.url, spawner.node, {"argv": ["t"], "native": {"sha256": "a" * 64, "os": "windows"}})


# -- a spawner killed with -9 leaves no orphan behind the next one --------------------------------


async def test_kill_9_spawner_then_restart_kills_its_orphans(nats_url, tmp_path):
    node = f"crash-{secrets.token_hex(3)}"
    first = start_spawner_process(nats_url, node, tmp_path)
    second = None
    try:
        async with AsyncFabricClient(nats_url, local=False, timeout=10) as fc:
            await wait_ready(fc, node)
            fast = await fc.rspawn(["sleep", "300"], node=node)
            limited = await fc.rspawn(["sleep", "300"], node=node, limits=Limits(open_files=64))
            first.kill()
            first.wait(10)
            await asyncio.sleep(0.3)
            # the limits path sets PDEATHSIG: that one is gone already; the fast path's waits for the next start
            assert not psutil.pid_exists(limited.pid) or psutil.Process(limited.pid).status() == "zombie"
            assert psutil.pid_exists(fast.pid)
            second = start_spawner_process(nats_url, node, tmp_path)
            await wait_ready(fc, node)
            deadline = time.monotonic() + 5
            while psutil.pid_exists(fast.pid) and psutil.Process(fast.pid).status() != "zombie":
                assert time.monotonic() < deadline, "the orphan survived the next spawner's start"
                await asyncio.sleep(0.05)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(15)


# -- the sync client ------------------------------------------------------------------------------


async def test_sync_client_streams_lines_and_waits(nats_url, spawner):
    # the spawner serves on this test's loop: the blocking client runs in a thread
    await asyncio.to_thread(sync_client_body, nats_url, spawner.node)


def sync_client_body(nats_url: str, node: str) -> None:
    with FabricClient(nats_url, local=False) as fc:
        proc = fc.rspawn([PY, "-u", "-c", "for i in range(3): print('line', i)\nimport sys; sys.exit(7)"], node=node)
        assert list(proc.stdout) == [b"line 0\n", b"line 1\n", b"line 2\n"]
        ex = proc.wait(10)
        assert ex.exit_code == 7 and list(proc.stderr) == []
        assert fc.rrun(["echo", "x"], node=node).stdout == b"x\n"
        p2 = fc.rspawn(["sleep", "30"], node=node)
        with pytest.raises(TimeoutError):
            p2.wait(0.1)
        assert p2.kill() and fc.rwait(p2.id, 10).reason == "killed"


async def test_sandbox_combined_with_user_switch(fc, spawner):
    """Everything that needs root happens before the switch to the unprivileged user."""
    info = await fc.spawner_info(spawner.node)
    wanted = {"sandbox.user", "sandbox.network", "sandbox.no_new_privs", "limits.mem_bytes", "limits.open_files"}
    probe = ["/bin/sh", "-c", "id -u; readlink /proc/self/ns/net; grep NoNewPrivs /proc/self/status; ulimit -n; "
             "cat /proc/self/cgroup | grep memory || true"]
    kw = dict(limits=Limits(mem_bytes=256 << 20, open_files=64),
              sandbox=Sandbox(user="nobody", network=False, no_new_privs=True))
    if not wanted <= set(info.enforceable):
        with pytest.raises(NotEnforceable):
            await fc.rspawn(probe, node=spawner.node, **kw)
        return
    proc, ex = await run(fc, spawner.node, probe, **kw)
    assert wanted <= set(proc.enforced), proc.enforced
    lines = ex.stdout.decode().splitlines()
    import pwd

    assert int(lines[0]) == pwd.getpwnam("nobody").pw_uid
    assert lines[1] != os.readlink("/proc/self/ns/net")
    assert lines[2].split() == ["NoNewPrivs:", "1"] and lines[3] == "64"
    assert proc.id.split(":")[1] in lines[4], "the process is in its own memory cgroup"


async def test_out_of_descriptors_is_503_and_the_spawner_keeps_serving(nats_url, tmp_path):
    import resource

    from fabric import Unavailable

    node = f"fds-{secrets.token_hex(3)}"
    spawner = subprocess.Popen(
        [PY, "-m", "fabric.services.spawner", "--nats-url", nats_url, "--node", node, "--state-dir", str(tmp_path),
         "--credentials", str(creds_for("spawner"))],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **TRUSTED_ENV},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96)))
    try:
        async with AsyncFabricClient(nats_url, local=False, timeout=10) as fc:
            await wait_ready(fc, node)
            procs = []
            with pytest.raises(Unavailable, match="out of resources"):
                for _ in range(100):  # 3 descriptors each: the spawner runs out long before
                    procs.append(await fc.rspawn(["sleep", "60"], node=node, stream=False))
            assert len(procs) >= 5
            for p in procs:
                await p.kill()
            for p in procs:
                assert (await p.wait(10)).reason == "killed"
            ex = await fc.rrun(["echo", "still here"], node=node)  # descriptors back: it serves again
            assert ex.stdout == b"still here\n"
    finally:
        spawner.terminate()
        spawner.wait(15)
