"""Remote processes through the real bus: a real nats-server, the real spawner, real clients.

Covers spawn/wait/kill/stdin/status/list/info, output streaming (complete from the
first byte), the one-round-trip run, process groups (a grandchild dies with its
process on exit, kill, wall timeout and spawner stop), typed errors for hostile
input after which the spawner still serves, and that the spawner leaves no
process and no pipe behind (checked in teardown).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import signal
from pathlib import Path

import pytest

from fabric import (
    AsyncFabricClient,
    BadRequest,
    Conflict,
    ExecutableNotFound,
    Limits,
    PermissionDenied,
    UnknownProcess,
)
from fabric.service import ServiceSettings
from fabric.services.spawner import SpawnerService
from tests._nats import connect, creds_for, trusted_config
from tests._spawner import PY, gone, pid_alive


async def raw(nats_url: str, subject: str, data: bytes):
    nc = await connect(nats_url)
    try:
        return await nc.request(subject, data, timeout=5)
    finally:
        await nc.close()


async def test_spawn_wait_exit_code_and_output(fc, spawner):
    proc = await fc.rspawn(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert proc.id.startswith(f"{spawner.node}:") and proc.pid > 0
    ex = await proc.wait(timeout=10)
    assert ex.exit_code == 3 and ex.signal is None and ex.reason == "exited"
    assert ex.stdout == b"out\n" and ex.stderr == b"err\n"
    assert ex.duration_s > 0 and ex.cpu_s >= 0 and ex.max_rss > 0


async def test_output_iterators_are_complete_even_when_read_late(fc):
    proc = await fc.rspawn([PY, "-c", "import sys\nfor i in range(200): print(i)\nsys.stderr.write('e1\\ne2')"])
    await proc.wait(timeout=10)  # everything was produced before we iterate
    lines = [line async for line in proc.stdout]
    assert lines == [f"{i}\n".encode() for i in range(200)]
    assert [line async for line in proc.stderr] == [b"e1\n", b"e2"]


async def test_output_streams_while_the_process_runs(fc):
    proc = await fc.rspawn([PY, "-u", "-c", "import sys,time\nprint('first')\nsys.stdin.readline()\nprint('second')"],
                           stdin_open=True)
    it = proc.stdout.__aiter__()
    assert await asyncio.wait_for(it.__anext__(), 10) == b"first\n", "output must arrive while it runs"
    assert (await proc.status()).state == "running"
    await proc.write_stdin(b"go\n", eof=True)
    assert await asyncio.wait_for(it.__anext__(), 10) == b"second\n"
    assert (await proc.wait(10)).exit_code == 0


async def test_stdin_data_is_delivered_and_closed(fc):
    data = os.urandom(300_000)  # bigger than a pipe buffer: written as the process reads
    ex = await fc.rrun([PY, "-c", "import sys,hashlib\nprint(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"],
                       stdin=data, timeout=20)
    import hashlib

    assert ex.stdout.decode().strip() == hashlib.sha256(data).hexdigest()


async def test_rrun_is_one_round_trip_and_returns_the_exit(fc):
    ex = await fc.rrun(["/bin/true"], timeout=10)
    assert ex.exit_code == 0 and ex.reason == "exited"
    with pytest.raises(TimeoutError):
        await fc.rrun(["sleep", "30"], timeout=0.2)


async def test_env_cwd_and_proc_id(fc, tmp_path):
    proc = await fc.rspawn(["sh", "-c", 'echo "$GREETING $FABRIC_PROC_ID"; pwd'], env={"GREETING": "hi"},
                           cwd=str(tmp_path))
    ex = await proc.wait(10)
    first, second = ex.stdout.decode().splitlines()
    assert first == f"hi {proc.id}" and Path(second).resolve() == tmp_path.resolve()


async def test_tail_is_bounded_but_totals_count_everything(fc):
    ex = await fc.rrun([PY, "-c", "import sys; sys.stdout.write('a'*100000 + 'END')"], tail_bytes=1000,
                       timeout=20)
    assert len(ex.stdout) == 1000 and ex.stdout.endswith(b"END") and ex.stdout_total == 100003


GRANDCHILD = """
import os, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(300)
    os._exit(0)
print(pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


async def _grandchild(proc) -> int:
    it = proc.stdout.__aiter__()
    return int(await asyncio.wait_for(it.__anext__(), 10))


async def test_exit_takes_the_whole_group_with_it(fc):
    proc = await fc.rspawn([PY, "-c", GRANDCHILD, "0.2"])
    grandchild = await _grandchild(proc)
    ex = await proc.wait(10)
    assert ex.exit_code == 0
    assert await gone(grandchild), "the grandchild outlived its process"


async def test_kill_takes_the_whole_group(fc):
    proc = await fc.rspawn([PY, "-c", GRANDCHILD, "300"])
    grandchild = await _grandchild(proc)
    assert await proc.kill() is True
    ex = await proc.wait(10)
    assert ex.signal == signal.SIGKILL and ex.reason == "killed"
    assert await gone(grandchild) and not pid_alive(proc.pid)
    assert await proc.kill() is False, "killing an ended process delivers nothing"


async def test_kill_with_a_signal_name(fc):
    proc = await fc.rspawn(["sleep", "30"])
    assert await fc.rkill(proc.id, "TERM")
    ex = await proc.wait(10)
    assert ex.signal == signal.SIGTERM and ex.reason == "killed"


async def test_wall_timeout_kills_the_group(fc):
    proc = await fc.rspawn([PY, "-c", GRANDCHILD, "300"], limits=Limits(wall_s=0.5))
    assert "limits.wall_s" in proc.enforced
    grandchild = await _grandchild(proc)
    ex = await proc.wait(10)
    assert ex.reason == "timeout" and ex.signal == signal.SIGKILL and 0.4 < ex.duration_s < 5
    assert await gone(grandchild)


async def test_wait_timeout_raises_and_process_keeps_running(fc):
    proc = await fc.rspawn(["sleep", "30"])
    with pytest.raises(TimeoutError):
        await proc.wait(timeout=0.1)
    assert (await proc.status()).state == "running"
    await proc.kill()
    await proc.wait(10)


async def test_status_and_list_report_live_cpu_and_rss(fc, spawner):
    proc = await fc.rspawn([PY, "-c", "import time\nt=time.time()\nwhile time.time()-t<30: pass"])
    await asyncio.sleep(0.3)
    await proc.status()  # the first look starts the CPU measurement
    await asyncio.sleep(0.5)
    st = await proc.status()
    assert st.state == "running" and st.rss > 1_000_000 and st.cpu_percent > 10 and st.members == 1
    listed = await fc.rlist(spawner.node)
    assert proc.id in [p.id for p in listed]
    await proc.kill()
    await proc.wait(10)
    assert proc.id not in [p.id for p in await fc.rlist(spawner.node)]
    assert proc.id in [p.id for p in await fc.rlist(spawner.node, finished=True)]


async def test_info_says_what_is_enforceable(fc, spawner):
    info = await fc.spawner_info(spawner.node)
    assert info.node == spawner.node and info.spawned >= 1 and info.os == "linux"
    assert "limits.cpu_s" in info.enforceable and "limits.wall_s" in info.enforceable
    assert set(info.enforceable).isdisjoint(info.not_enforceable)


# -- errors: typed, and the spawner keeps serving -----------------------------------------------


async def test_missing_executable_is_404(fc):
    with pytest.raises(ExecutableNotFound, match="no-such-program"):
        await fc.rspawn(["no-such-program-xyz"])
    with pytest.raises(ExecutableNotFound):
        await fc.rspawn(["/nonexistent/prog"])


async def test_not_executable_is_403(fc, tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("hello")
    with pytest.raises(PermissionDenied):
        await fc.rspawn([str(f)])


@pytest.mark.parametrize("argv", ["echo hi", [], [1, 2], ["echo", None], b"echo"])
async def test_wrong_argv_types_are_400_in_the_client(fc, argv):
    with pytest.raises(BadRequest):
        await fc.rspawn(argv)  # type: ignore[arg-type]


@pytest.mark.parametrize("limits", [Limits(cpu_s=-1), Limits(address_space=-5), Limits(wall_s=-1.0),
                                    Limits(open_files="many")])  # type: ignore[arg-type]
async def test_negative_or_mistyped_limits_are_400(fc, limits):
    with pytest.raises(BadRequest, match="limits"):
        await fc.rspawn(["true"], limits=limits)


HOSTILE = [
    (b"not json", 400),
    (b'{"argv": "echo hi"}', 400),
    (b'{"argv": []}', 400),
    (b'{"argv": [1]}', 400),
    (b'{"argv": ["true"], "limits": {"cpu_s": -1}}', 400),
    (b'{"argv": ["true"], "limits": {"open_files": 1.5}}', 400),
    (b'{"argv": ["true"], "limits": {"file_size": 18446744073709551616}}', 400),
    (b'{"argv": ["true"], "wait_s": -1}', 400),
    (b'{"argv": ["true"], "tail_bytes": 1099511627776}', 400),
    (b'{"argv": ["tr\\u0000ue"]}', 400),
    (b'{"argv": ["echo", "a\\u0000b"]}', 400),
    (b'{"argv": ["true"], "env": {"A": "x\\u0000y"}}', 400),
    (b'{"argv": ["/tmp"]}', 403),
    (b'{"argv": ["true"], "env": {"A=B": "x"}}', 400),
    (b'{"argv": ["true"], "cwd": "/nonexistent-dir"}', 400),
    (b'{"argv": ["true"], "stream_to": "fabric.>"}', 400),
    (b'{"argv": ["no-such-program-xyz"]}', 404),
]


@pytest.mark.parametrize("body,code", HOSTILE)
async def test_hostile_spawn_requests_get_typed_errors(nats_url, spawner, fc, body, code):
    msg = await raw(nats_url, f"fabric.proc.{spawner.node}.spawn", body)
    assert msg.headers["Nats-Service-Error-Code"] == str(code), msg.headers
    assert json.loads(msg.data)["error"]["code"] == code
    ex = await fc.rrun(["/bin/true"], timeout=10)  # still serving
    assert ex.exit_code == 0


async def test_unknown_and_malformed_ids(fc, spawner):
    with pytest.raises(UnknownProcess):
        await fc.rwait(f"{spawner.node}:nope-1", timeout=0)
    with pytest.raises(UnknownProcess):
        await fc.rkill(f"{spawner.node}:nope-1")
    with pytest.raises(BadRequest):
        await fc.rwait("no-colon-here")
    with pytest.raises(BadRequest):
        await fc.rkill(f"{spawner.node}:x", signal="SIGNOPE")


async def test_stdin_write_without_open_stdin_is_409(fc):
    proc = await fc.rspawn(["sleep", "30"])
    with pytest.raises(Conflict):
        await proc.write_stdin(b"x")
    await proc.kill()
    await proc.wait(10)


async def test_cluster_subject_spawns_anywhere(nats_url, spawner, fc):
    msg = await raw(nats_url, "fabric.proc.spawn", b'{"argv": ["echo", "any"], "wait_s": 10}')
    reply = json.loads(msg.data)
    assert reply["node"] == spawner.node and reply["exit"]["exit_code"] == 0
    import base64

    assert base64.b64decode(reply["exit"]["stdout"]) == b"any\n"


async def test_per_process_subject_streams_to_others(nats_url, fc):
    proc = await fc.rspawn(["sh", "-c", "read x; echo got $x"], stdin_open=True)
    nc = await connect(nats_url)
    got: list[tuple[str, bytes]] = []
    done = asyncio.Event()

    async def cb(msg):
        got.append((msg.headers["Fabric-Stream"], msg.data))
        if msg.headers["Fabric-Stream"] == "exit":
            done.set()

    await nc.subscribe(proc.subject, cb=cb)
    await nc.flush()
    await proc.write_stdin(b"it\n", eof=True)
    await asyncio.wait_for(done.wait(), 10)
    await nc.close()
    assert got[0] == ("stdout", b"got it\n") and got[-1][0] == "exit"
    assert json.loads(got[-1][1])["exit_code"] == 0


async def test_spawner_stop_kills_every_group(nats_url, tmp_path):
    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                         nats_url=nats_url, node=f"stop-{secrets.token_hex(3)}", state_dir=tmp_path))
    await svc.start()
    try:
        async with AsyncFabricClient(nats_url, local=False) as client:
            proc = await client.rspawn([PY, "-c", GRANDCHILD, "300"], node=svc.node)
            grandchild = await _grandchild(proc)
            ignoring = await client.rspawn([PY, "-c", "import signal,time\nsignal.signal(signal.SIGTERM, "
                                                      "signal.SIG_IGN)\nprint('x', flush=True)\ntime.sleep(300)"],
                                           node=svc.node)
            await ignoring.stdout.__aiter__().__anext__()
            await svc.stop()
            for pid in (proc.pid, grandchild, ignoring.pid):
                assert await gone(pid), f"pid {pid} outlived the spawner"
            ex = await asyncio.wait_for(proc.wait(), 5)  # the exit was published before the drain
            assert ex.reason == "spawner_stopped"
    finally:
        await svc.stop()


async def test_children_get_default_sigpipe(fc):
    # Python ignores SIGPIPE and ignored signals survive exec: the spawner must restore it
    ex = await fc.rrun(["sh", "-c", "yes | head -n 1"], timeout=10)
    assert ex.exit_code == 0 and ex.stdout == b"y\n" and ex.stderr == b""


async def test_children_inherit_only_stdio(fc, spawner):
    # the spawner holds its NATS socket, pipes and pidfds of running processes, and
    # here even a descriptor someone made inheritable: none of it reaches a child
    leaky = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leaky, True)
    running = await fc.rspawn(["sleep", "30"], stdin_open=True)
    listing = """
import os
fds = []
for fd in range(3, 4096):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
print(fds)
"""
    try:
        for limits in (None, Limits(open_files=4096)):  # with and without child-side setup
            ex = await fc.rrun([PY, "-c", listing], timeout=20, limits=limits)
            assert ex.exit_code == 0, ex.stderr
            assert ex.stdout == b"[]\n"
    finally:
        os.close(leaky)
        await running.kill()
        await running.wait()


async def test_tails_are_cut_to_fit_one_message(fc, spawner, monkeypatch):
    # a small message budget stands in for a server with a small max payload
    monkeypatch.setattr(spawner.table, "settings",
                        dataclasses.replace(spawner.table.settings, max_tail_in_message=1000))
    proc = await fc.rspawn([PY, "-c", "import sys; sys.stdout.write('x'*5000 + 'END')"], tail_bytes=1 << 20)
    ex = await proc.wait(10)
    assert len(ex.stdout) == 1000 and ex.stdout.endswith(b"END") and ex.stdout_total == 5003
    assert b"".join([line async for line in proc.stdout]) == b"x" * 5000 + b"END", "the stream has every byte"
    (listed,) = [p for p in await fc.rlist(spawner.node, finished=True) if p.id == proc.id]
    assert listed.exit.stdout == b"" and listed.exit.stdout_total == 5003


async def test_no_stream_means_a_clear_error_not_a_hang(fc):
    proc = await fc.rspawn(["echo", "quiet"], stream=False)
    assert (await proc.wait(10)).stdout == b"quiet\n"
    with pytest.raises(BadRequest, match="stream=False"):
        async for _ in proc.stdout:
            pass


async def test_a_descendant_that_escaped_with_setsid_does_not_outlive_its_process(fc):
    # the grandchild leaves the group (a new session) before its parent exits
    code = ("import os, sys, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n"
            "    os.write(w, str(os.getpid()).encode())\n    time.sleep(300)\n    os._exit(0)\n"
            "print(os.read(r, 32).decode())")
    ex = await fc.rrun([PY, "-c", code], timeout=10)
    escaped = int(ex.stdout)
    assert ex.exit_code == 0 and os.getsid(escaped) == escaped, "the grandchild is in a session of its own"
    assert await gone(escaped, within=10), "a setsid() descendant survived its process"


# -- max_rss: the child's own peak, never the spawner's ------------------------------


async def test_max_rss_of_a_small_program_is_not_the_spawners(fc, spawner):
    # the spawner runs in this process: its peak is what exec folds into the child's rusage
    from fabric.services.spawner.procs import vm_hwm

    for argv in (["true"], ["sh", "-c", "exit 0"]):
        ex = await (await fc.rspawn(argv)).wait(timeout=10)
        floor = vm_hwm("self")
        assert ex.exit_code == 0
        assert not ex.max_rss_exact, "rusage's peak of a small child is the spawner's: it cannot be exact"
        assert 0 < ex.max_rss < 16 << 20 and ex.max_rss < floor, (ex.max_rss, floor)


async def test_max_rss_of_a_large_allocation_is_exact(fc, spawner):
    from fabric.services.spawner.procs import vm_hwm

    size = max(120 << 20, vm_hwm("self") + (32 << 20))  # above the spawner's peak, whatever it is
    ex = await (await fc.rspawn([PY, "-c", f"b = b'x' * {size}; print(len(b))"])).wait(timeout=30)
    assert ex.exit_code == 0 and ex.stdout == f"{size}\n".encode()
    assert ex.max_rss_exact and size <= ex.max_rss < size + (64 << 20), (ex.max_rss, size)


async def test_max_rss_below_the_floor_is_sampled_while_it_runs(fc, spawner):
    # 24 MiB held for 1.5 s: the periodic sample sees it even when rusage cannot tell it apart
    code = "import time; b = b'x' * (24 << 20); time.sleep(1.5); print(len(b))"
    ex = await (await fc.rspawn([PY, "-c", code])).wait(timeout=30)
    assert ex.exit_code == 0 and ex.max_rss >= 24 << 20, ex
    assert ex.max_rss < (24 << 20) + (64 << 20) or ex.max_rss_exact, ex
