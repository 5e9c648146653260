"""Warm pools of compute cores, end to end: client -> NATS -> CoreManager -> worker processes.

Everything is real: a nats-server on a random port, the CoreManager inside a real
FabricService, worker processes (``python -m fabric.services.spawner.worker``) joined by
shared-memory rings, the example and test cores compiled with gcc, and the C worker
of examples/cores for external workers.  Crashes are real segfaults, aborts and
infinite loops.

Resource accounting in teardown: after every test, no worker process the host
started is left, and no ring file of its pools is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import pickle
import secrets
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fabric import (
    AsyncCore,
    AsyncFabricClient,
    BadRequest,
    CoreLoadFailed,
    FabricClient,
    JobFailed,
    JobTimeout,
    NotFound,
    WorkerCrashed,
)
from fabric.protocol.permissions import user_subject
from fabric.schema import decode_job_batch, decode_job_results, encode_job_batch, encode_job_results
from fabric.service import Endpoint, FabricService, ServiceSettings
from fabric.services.spawner.pools import CoreManager
from fabric_ext import wire
from tests._cores import EXAMPLES, TEST_CORES, build_core, build_worker, mandel_ref
from tests._nats import creds_for, trusted_config
from tests._wait import until_holds as _until


class CoreHost(FabricService):
    """The CoreManager inside a real service, as SpawnerService hosts it."""

    name = "pool-test"
    description = "compute-core pools under test"

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        # its reply link authenticates as the service does (the test realm's admin, on the secured servers)
        self.cores = CoreManager(self.node, self.log, settings.nats_url,
                                 seed=self.credentials.seed if self.credentials is not None else None)

    def endpoints(self) -> list[Endpoint]:
        return self.cores.endpoints()

    async def on_start(self) -> None:
        await self.cores.start(self.connection)

    async def on_stop(self) -> None:
        await self.cores.stop()


@pytest.fixture(scope="module")
def core_dir(build_dir: Path) -> Path:
    """conftest's build_dir under the name this module's tests use."""
    return build_dir


@pytest.fixture(scope="module")
def lib(core_dir: Path) -> Any:
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            src = TEST_CORES / f"{name}.c"
            if not src.exists():
                src = EXAMPLES / f"{name}.c"
            cache[name] = build_core(src, core_dir)
        return cache[name]

    return get


@pytest.fixture(scope="module")
async def host(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CoreHost]:
    node = f"pool-{secrets.token_hex(3)}"
    svc = CoreHost(ServiceSettings(credentials=creds_for(CoreHost),
                                   nats_url=nats_url, node=node, state_dir=tmp_path_factory.mktemp("state")))
    await svc.start()
    yield svc
    await svc.stop()
    assert not _ring_files(svc.cores), "rings left in /dev/shm after stop"


def _ring_files(manager: CoreManager) -> list[str]:
    return glob.glob(manager.ring_prefix + "*")


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if _is_worker(p)]


def _is_worker(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
        return "fabric.services.spawner.worker" in cmd
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


# differs from conftest's fc: the cores run in this module's CoreHost (not a spawner), and teardown
# checks that every core is unloaded and no worker or ring file is left
@pytest.fixture
async def fc(host: CoreHost, nats_url: str) -> AsyncIterator[AsyncFabricClient]:
    """A client; in teardown every core it loaded is unloaded and no worker or ring is left."""
    async with AsyncFabricClient(nats_url, local=False) as client:
        yield client
        for info in (await client.cores(host.node)).cores:
            await client.request(f"fabric.core.{host.node}.unload", f'{{"core":"{info.core}"}}'.encode())
    assert not host.cores.pools
    deadline = asyncio.get_running_loop().time() + 5
    while _workers() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert not _workers(), "worker processes left after unload"
    assert not _ring_files(host.cores), "ring files left in /dev/shm after unload"


async def load(fc: AsyncFabricClient, host: CoreHost, path: Path, **kw: Any) -> AsyncCore:
    return await fc.load_core(path.stem.rsplit("-", 1)[0], path, node=host.node, **kw)


# -- the frames -------------------------------------------------------------------

BATCHES = [[], [b""], [b"a"], [b"x" * 1000, b"", b"yz"], [bytes([i]) * i for i in range(130)]]


@pytest.mark.unit
@pytest.mark.parametrize("items", BATCHES)
def test_job_batch_round_trip(items: list[bytes]) -> None:
    assert [bytes(v) for v in decode_job_batch(encode_job_batch(items))] == items
    results = [(i - 3, 0 if i % 2 else 500, x) for i, x in enumerate(items)]
    assert [(a, b, bytes(c)) for a, b, c in decode_job_results(encode_job_results(results))] == results


@pytest.mark.unit
@pytest.mark.parametrize("frame", [
    b"", b"FJB1", b"FJB2\x00\x00\x00\x00", b"FJB1\x01\x00\x00\x00",
    b"FJB1\x01\x00\x00\x00" + struct.pack("<Q", 5) + b"abc",          # length past the end
    b"FJB1\x01\x00\x00\x00" + struct.pack("<Q", 2**64 - 1),           # hostile length
    b"FJB1\x00\x00\x00\x00extra",                                     # trailing bytes
    b"FJB1" + struct.pack("<I", 2**32 - 1),                           # count beyond the limit
])
def test_hostile_batch_frames_are_bad_requests(frame: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_job_batch(frame)


@pytest.mark.unit
def test_ring_files_of_a_dead_spawner_are_swept() -> None:
    import structlog

    from fabric.services.spawner.pools import sweep_rings

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"/dev/shm/fabric-ring-core-{dead.pid}-abcdef-c1-1-in"
    mine = f"/dev/shm/fabric-ring-core-{os.getpid()}-abcdef-c1-1-in"
    for path in (stale, mine):
        Path(path).write_bytes(b"")
    try:
        assert stale in sweep_rings(structlog.get_logger())
        assert not os.path.exists(stale) and os.path.exists(mine)
    finally:
        for path in (stale, mine):
            Path(path).unlink(missing_ok=True)


# -- cores through the client ---------------------------------------------------------


async def test_echo_run_and_empty_job(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("echo"), min_workers=1, max_workers=2)
    link = host.cores.link
    assert link is not None and link.up, "the reply link should be up on a plain nats:// server"
    before = link.published
    assert await core.run(b"hello") == b"hello"
    assert await core.run(b"") == b""
    big = os.urandom(1 << 20)
    assert await core.run(big) == big
    info = await core.stats()
    assert info.jobs_done == 3 and info.workers >= 1 and info.name == "echo"
    assert link.published == before + 3  # answered from the reader thread, not the loop


async def test_replies_go_through_the_loop_when_the_link_is_down(fc: AsyncFabricClient, host: CoreHost,
                                                                   lib: Any) -> None:
    core = await load(fc, host, lib("echo"))
    link = host.cores.link
    assert link is not None
    link.up = False  # as after a lost connection, before the watchdog reconnects it
    # and keep the watchdog from reconnecting it in the middle of this test (its tick comes every second)
    host.cores.lane._retry_link_at = time.monotonic() + 60
    try:
        before = link.published
        assert await core.run(b"via the loop") == b"via the loop"
        assert await core.run(b"") == b""
        assert link.published == before
    finally:
        link.up = True
        host.cores.lane._retry_link_at = 0.0


async def test_load_on_any_node(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    """``fabric.core.load`` (queue group): the reply names the node, and the core is reachable from it."""
    core = await fc.load_core("echo", lib("echo"))
    assert core.node == host.node  # the only spawner serving this module's NATS server now
    assert await core.run(b"anywhere") == b"anywhere"
    assert [c.core for c in (await fc.cores(host.node)).cores] == [core.id]


async def test_map_keeps_input_order(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("echo"), min_workers=2, max_workers=2)
    items = [str(i).encode() * (i % 7) for i in range(2000)]
    assert await core.map(items, batch_size=64, in_flight=4) == items
    assert await core.map([]) == []
    assert (await core.stats()).jobs_done == 2000


async def test_sha256_core(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("sha256"))
    msgs = [b"", b"abc", os.urandom(100_000)]
    batch = struct.pack("<I", len(msgs)) + b"".join(struct.pack("<I", len(x)) + x for x in msgs)
    assert await core.run(batch) == b"".join(hashlib.sha256(x).digest() for x in msgs)
    inputs = [struct.pack("<II", 1, len(x)) + x for x in msgs] + [struct.pack("<I", 0)]   # ... and the empty batch
    assert await core.map(inputs) == [hashlib.sha256(x).digest() for x in msgs] + [b""]
    with pytest.raises(JobFailed) as ei:  # a length past the end: the core says 1
        await core.run(struct.pack("<II", 1, 4) + b"abc")
    assert ei.value.exit_code == 1 and ei.value.output == b""


async def test_matmul_core(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("matmul"))
    n, k, m = 3, 4, 2
    a = [float(i) + 0.5 for i in range(n * k)]
    b = [float(i) - 1.25 for i in range(k * m)]
    out = await core.run(struct.pack(f"<3I{n * k}d{k * m}d", n, k, m, *a, *b))
    want = [sum(a[i * k + p] * b[p * m + j] for p in range(k)) for i in range(n) for j in range(m)]
    assert list(struct.unpack(f"<{n * m}d", out)) == want
    with pytest.raises(JobFailed) as ei:  # a truncated matrix: the core says 1
        await core.run(struct.pack("<3I", 2, 2, 2))
    assert ei.value.exit_code == 1


async def test_mandelbrot_core(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("mandelbrot"))
    x0, y0, dx, dy, w, h, max_iter = -2.0, -1.0, 0.25, 0.5, 12, 5, 40
    out = await core.run(struct.pack("<4d3I", x0, y0, dx, dy, w, h, max_iter))
    assert list(struct.unpack(f"<{w * h}I", out)) == mandel_ref(x0, y0, dx, dy, w, h, max_iter)


# -- failures --------------------------------------------------------------------------


async def test_nonzero_exit_is_job_failed_with_code_and_output(fc: AsyncFabricClient, host: CoreHost,
                                                                lib: Any) -> None:
    core = await load(fc, host, lib("nonzero"))
    with pytest.raises(JobFailed) as ei:
        await core.run(b"input")
    assert ei.value.exit_code == 7 and ei.value.output == b"failed:input"
    got = await core.map([b"a", b"b"], return_exceptions=True)
    assert [(type(e), e.exit_code, e.output) for e in got] == [(JobFailed, 7, b"failed:a"), (JobFailed, 7, b"failed:b")]
    info = await core.stats()
    assert info.jobs_failed == 3 and info.crashes == 0 and info.workers == 1  # no worker was harmed


@pytest.mark.parametrize("name", ["segfault", "abort"])
async def test_crash_fails_the_job_and_the_pool_recovers(fc: AsyncFabricClient, host: CoreHost, lib: Any,
                                                         name: str) -> None:
    crashing = await load(fc, host, lib(name), min_workers=1, max_workers=1)
    echo = await load(fc, host, lib("echo"), min_workers=1, max_workers=1)
    before = (await crashing.stats()).workers_started
    # the crash and another core's jobs at the same time: the others are untouched
    results = await asyncio.gather(crashing.run(b"boom"), *(echo.run(b"%d" % i) for i in range(20)),
                                   return_exceptions=True)
    assert isinstance(results[0], WorkerCrashed), results[0]
    assert ("SIGSEGV" if name == "segfault" else "SIGABRT") in results[0].message
    assert results[1:] == [b"%d" % i for i in range(20)]
    # jobs queued behind the crashing one get their own (typed) answer, none hangs
    again = await crashing.map([b"1", b"2", b"3"], return_exceptions=True)
    assert all(isinstance(e, WorkerCrashed) for e in again)
    await _until(lambda: crashing.stats(), lambda i: i.workers == 1)
    info = await crashing.stats()
    assert info.crashes == 4 and info.workers_started >= before + 4
    assert await echo.run(b"still here") == b"still here"


async def test_loop_past_time_limit_is_job_timeout(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("loop"), min_workers=1, max_workers=1, time_limit=0.3)
    echo = await load(fc, host, lib("echo"), min_workers=1, max_workers=1)
    t0 = asyncio.get_running_loop().time()
    stuck = asyncio.ensure_future(core.run(b"spin"))
    assert await echo.run(b"meanwhile") == b"meanwhile"  # the spawner keeps serving
    with pytest.raises(JobTimeout) as ei:
        await stuck
    assert asyncio.get_running_loop().time() - t0 < 5
    assert "time limit" in ei.value.message
    await _until(lambda: core.stats(), lambda i: i.workers == 1)
    assert (await core.stats()).timeouts == 1


async def test_library_without_symbols_fails_to_load(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    with pytest.raises(CoreLoadFailed) as ei:
        await load(fc, host, lib("missing_symbols"))
    assert "worker_run_job" in ei.value.message
    assert not host.cores.pools


async def test_failing_worker_init_fails_to_load(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    with pytest.raises(CoreLoadFailed) as ei:
        await load(fc, host, lib("fail_init"), min_workers=2)
    assert "42" in ei.value.message  # worker_init's return value, in the message


async def test_not_a_library_fails_to_load(fc: AsyncFabricClient, host: CoreHost) -> None:
    with pytest.raises(CoreLoadFailed):
        await fc.load_core("junk", b"\x7fELF but not really", node=host.node)


async def test_workers_that_cannot_start_fail_the_load(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    prefix = host.cores.ring_prefix
    host.cores.ring_prefix = "/nonexistent-dir/fabric-ring-core"  # ring.create fails: no worker can start
    try:
        with pytest.raises(CoreLoadFailed) as ei:
            await load(fc, host, lib("echo"), min_workers=2)
        assert "worker start failed" in ei.value.message
    finally:
        host.cores.ring_prefix = prefix
    assert not host.cores.pools
    assert await (await load(fc, host, lib("echo"))).run(b"ok") == b"ok"


async def test_bad_load_requests(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    with pytest.raises(BadRequest):
        await fc.load_core("empty", b"", node=host.node)
    with pytest.raises(BadRequest):
        await fc.load_core("x", lib("echo"), min_workers=3, max_workers=2, node=host.node)
    with pytest.raises(BadRequest):
        await fc.load_core("fabric.python", lib("echo"), node=host.node)


async def test_job_larger_than_a_ring_record_is_too_large(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    from fabric import TooLarge

    core = await load(fc, host, lib("echo"))
    with pytest.raises(TooLarge):
        await core.run(b"x" * (5 << 20))
    assert await core.run(b"small") == b"small"  # the pool is unharmed


async def test_unload_then_jobs_are_not_found(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("echo"), min_workers=2, max_workers=2)
    assert (await core.unload()).core == core.id
    with pytest.raises(NotFound):
        await core.run(b"x")
    with pytest.raises(NotFound):
        await core.stats()


async def test_idle_workers_retire_down_to_min(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    core = await load(fc, host, lib("echo"), min_workers=1, max_workers=3, idle=0.2)
    # enough concurrent jobs that the pool grows past one worker
    await core.map([b"x"] * 300, batch_size=10, in_flight=10)
    assert (await core.stats()).workers_started >= 2
    await _until(lambda: core.stats(), lambda i: i.workers == 1)


# -- pool lifetime: named, shared, reused ------------------------------------------------------


async def _workers_settle(n: int, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(_workers()) != n:
        assert asyncio.get_running_loop().time() < deadline, f"{len(_workers())} worker processes, expected {n}"
        await asyncio.sleep(0.05)


async def test_loading_twice_reuses_one_pool(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    first = await load(fc, host, lib("echo"), min_workers=2, max_workers=2)
    assert not first.reused and first.digest == hashlib.sha256(lib("echo").read_bytes()).hexdigest()
    await _until(lambda: first.stats(), lambda i: i.workers == 2)
    await _workers_settle(2)
    again = await load(fc, host, lib("echo"), min_workers=2, max_workers=2)
    anywhere = await fc.load_core("echo", lib("echo"), min_workers=2, max_workers=2)  # the any-node subject too
    assert again.reused and anywhere.reused and again.id == anywhere.id == first.id
    assert await again.run(b"shared") == b"shared"
    assert [c.core for c in (await fc.cores(host.node)).cores] == [first.id]
    assert (await first.stats()).workers_started == 2  # nothing was started for the second load
    await _workers_settle(2)
    py = await fc.load_python_core(node=host.node, max_workers=1)
    py2 = await fc.load_python_core(node=host.node, max_workers=1)
    assert py2.reused and py2.id == py.id and py.digest == "fabric.python"
    assert len((await fc.cores(host.node)).cores) == 2


async def test_concurrent_loads_of_one_name_start_one_pool(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    cores = await asyncio.gather(*(load(fc, host, lib("echo")) for _ in range(4)))
    assert len({c.id for c in cores}) == 1 and sorted(c.reused for c in cores) == [False, True, True, True]
    assert (await cores[0].stats()).workers_started == 1
    await _workers_settle(1)


async def test_same_name_other_library_or_settings_is_a_conflict(fc: AsyncFabricClient, host: CoreHost,
                                                                 lib: Any) -> None:
    from fabric import Conflict

    echo = await load(fc, host, lib("echo"), max_workers=2)
    digest = hashlib.sha256(lib("echo").read_bytes()).hexdigest()
    with pytest.raises(Conflict) as ei:
        await fc.load_core("echo", lib("nonzero"), max_workers=2, node=host.node)
    assert ei.value.code == 409
    assert digest in ei.value.message and echo.id in ei.value.message and "replace=True" in ei.value.message
    with pytest.raises(Conflict) as ei:
        await load(fc, host, lib("echo"), max_workers=3, time_limit=5)
    assert "max_workers 2 (asked 3)" in ei.value.message and "time_limit_s 60.0 (asked 5" in ei.value.message
    await fc.load_python_core(node=host.node, max_workers=1)
    with pytest.raises(Conflict) as ei:
        await fc.load_python_core(node=host.node)
    assert "max_workers 1 (asked 4)" in ei.value.message
    # nothing changed: one echo pool, as loaded, still serving
    infos = {c.name: c for c in (await fc.cores(host.node)).cores}
    assert infos["echo"].core == echo.id and infos["echo"].max_workers == 2 and infos["echo"].digest == digest
    assert await echo.run(b"untouched") == b"untouched"


async def test_replace_with_another_library(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    old = await load(fc, host, lib("echo"))
    new = await fc.load_core("echo", lib("nonzero"), node=host.node, replace=True)
    assert new.id != old.id and not new.reused
    assert new.digest == hashlib.sha256(lib("nonzero").read_bytes()).hexdigest()
    with pytest.raises(JobFailed):
        await new.run(b"x")  # the nonzero core answers now
    await _until(lambda: fc.cores(host.node), lambda r: [c.core for c in r.cores] == [new.id])  # idle: drained
    with pytest.raises(NotFound):
        await old.run(b"x")
    await _workers_settle(1)


async def test_a_failed_replace_keeps_the_old_pool(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    old = await load(fc, host, lib("echo"))
    with pytest.raises(CoreLoadFailed):
        await fc.load_core("echo", lib("missing_symbols"), node=host.node, replace=True)
    assert await old.run(b"still") == b"still"
    again = await load(fc, host, lib("echo"))
    assert again.reused and again.id == old.id


def _slow(value: str, seconds: float) -> str:
    import time

    time.sleep(seconds)
    return value


async def test_replace_drains_the_old_pool(fc: AsyncFabricClient, host: CoreHost) -> None:
    """The old pool finishes its running and queued jobs, takes no new ones, then its workers stop."""
    old = await fc.load_python_core(node=host.node, min_workers=1, max_workers=1)
    running = asyncio.ensure_future(old.call(_slow, "first", 1.0))
    queued = asyncio.ensure_future(old.call(_slow, "second", 0.1))
    await _until(lambda: old.stats(), lambda i: i.running + i.queued == 2)
    new = await fc.load_python_core(node=host.node, min_workers=1, max_workers=2, replace=True)
    assert new.id != old.id and not new.reused
    info = await old.stats()
    assert info.draining and info.replaced_by == new.id
    with pytest.raises(NotFound) as ei:
        await old.call(_square, 2)
    assert "replaced by " + new.id in ei.value.message
    assert await new.call(_square, 3) == 9  # the new pool serves meanwhile
    assert not running.done()
    assert await running == "first" and await queued == "second"
    await _until(lambda: fc.cores(host.node), lambda r: [c.core for c in r.cores] == [new.id])
    await _workers_settle(1)  # the old pool's worker stopped; the new pool's stays
    assert (await fc.load_python_core(node=host.node, min_workers=1, max_workers=2)).id == new.id


async def test_unload_then_load_makes_a_fresh_pool(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    first = await load(fc, host, lib("echo"))
    await first.unload()
    await _workers_settle(0)
    second = await load(fc, host, lib("echo"))
    assert second.id != first.id and not second.reused
    assert (await second.stats()).workers_started == 1
    async with second:
        assert await second.run(b"fresh") == b"fresh"
    assert not (await fc.cores(host.node)).cores  # the context manager unloaded it


async def test_pool_idle_past_unload_after_is_unloaded(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    kept = await load(fc, host, lib("segfault"))  # no unload_after: stays
    core = await load(fc, host, lib("echo"), unload_after=1.0)
    assert core.info.unload_after_s == 1.0
    for _ in range(4):  # jobs keep it alive
        assert await core.run(b"busy") == b"busy"
        await asyncio.sleep(0.2)
    assert core.id in [c.core for c in (await fc.cores(host.node)).cores]
    await _until(lambda: fc.cores(host.node), lambda r: [c.core for c in r.cores] == [kept.id])
    with pytest.raises(NotFound):
        await core.run(b"late")
    await _workers_settle(1)


# -- the built-in Python worker ------------------------------------------------------------


def _square(x: int) -> int:
    return x * x


def _fails(x: int) -> int:
    raise ValueError(f"bad value {x}")


async def test_python_core_calls_functions(fc: AsyncFabricClient, host: CoreHost) -> None:
    core = await fc.load_python_core(node=host.node, min_workers=1, max_workers=1)
    assert await core.call(_square, 12) == 144
    assert await core.call(lambda a, b=1: a + b, 2, b=40) == 42
    with pytest.raises(JobFailed) as ei:
        await core.call(_fails, 3)
    assert ei.value.remote_type == "ValueError" and "bad value 3" in ei.value.message
    assert "_fails" in ei.value.remote_traceback


def _square_or_abort(x: int) -> int:
    if x == 7:
        os.abort()  # takes its worker process down, mid-batch
    return x * x


async def test_a_crash_mid_batch_fails_only_its_job(fc: AsyncFabricClient, host: CoreHost) -> None:
    """Jobs queued on the crashing worker's ring go to another worker; only the crashing job fails."""
    import cloudpickle

    core = await fc.load_python_core(node=host.node, min_workers=2, max_workers=2)
    jobs = [cloudpickle.dumps((_square_or_abort, (i,), {})) for i in range(40)]
    got = await core.map(jobs, batch_size=40, return_exceptions=True)
    assert isinstance(got[7], WorkerCrashed) and "SIGABRT" in got[7].message
    assert [pickle.loads(v) for i, v in enumerate(got) if i != 7] == [i * i for i in range(40) if i != 7]
    await _until(lambda: core.stats(), lambda i: i.workers == 2)
    assert (await core.stats()).crashes == 1


# -- external workers ------------------------------------------------------------------------


async def test_external_c_worker_joins_the_pool(fc: AsyncFabricClient, host: CoreHost, lib: Any,
                                                core_dir: Path) -> None:
    worker = build_worker(core_dir)
    core = await load(fc, host, lib("echo"), min_workers=0, max_workers=1, idle=0.1, external=True)
    assert core.info.listen_unix.startswith("unix:") and core.info.listen_tcp.startswith("tcp:")
    await _until(lambda: core.stats(), lambda i: i.workers == 0)  # the loading worker retired
    procs = [subprocess.Popen([str(worker), core.info.listen_unix]),
             subprocess.Popen([str(worker), core.info.listen_tcp.removeprefix("tcp:")])]
    try:
        await _until(lambda: core.stats(), lambda i: i.external_workers == 2)
        items = [os.urandom(i) for i in range(200)]
        assert await core.map(items, batch_size=20) == items
        info = await core.stats()
        assert info.workers == 2 and info.external_workers == 2 and info.workers_started == 3
    finally:
        await core.unload()
        for p in procs:
            try:
                p.wait(timeout=5)  # the worker ends when the controller closes the connection
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                pytest.fail("the external worker did not exit when its pool closed")


@pytest.mark.parametrize("reply", [
    wire.v1_ok(1 << 62, b"\x00"),            # "version not accepted"
    wire.v1_error(1 << 62, "I speak v2"),     # an error answer
    b"GARBAGE!" * 8,                         # not protocol v1 at all
])
async def test_external_worker_speaking_another_protocol_is_refused(fc: AsyncFabricClient, host: CoreHost,
                                                                    lib: Any, reply: bytes) -> None:
    core = await load(fc, host, lib("echo"), external=True)
    path = core.info.listen_unix.removeprefix("unix:")
    reader, writer = await asyncio.open_unix_connection(path)
    first = wire.v1_parse(await reader.readexactly(wire.V1_HEADER_SIZE + 4))
    assert first.kind == wire.V1_MSG_VERSION and wire.v1_parse_version(first.payload) == 1
    writer.write(reply)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the controller closed the connection
    writer.close()
    await _until(lambda: core.stats(), lambda i: i.workers_refused == 1)
    assert await core.run(b"served") == b"served"


# -- outputs above what a reply can carry ---------------------------------------------------
#
# The module's nats-server has an 8 MiB max payload, as under `fabric up`; a ring record holds a
# little under 4 MiB.  A 9 MiB output is over both; a batch of three 3 MiB outputs fits the ring
# job by job but not one reply.  A second server at nats-server's own default (1 MiB) puts ring
# outputs over the payload, the case the reader thread's reply link must refuse.

MIB = 1 << 20


def _big_job(size: int, exit_code: int | None = None) -> bytes:
    """The input of tests/cores/big.c: an output of *size* bytes (byte i is i & 0xff)."""
    return struct.pack("<Q", size) + (b"" if exit_code is None else struct.pack("<i", exit_code))


def _big_out(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _big_bytes(size: int) -> bytes:
    return b"b" * size


async def _next_job_uses_the_link(core: AsyncCore, host: CoreHost) -> None:
    """The very next job on the pool is answered, and from the reply link (it survived)."""
    link = host.cores.link
    assert link is not None and link.up
    before = link.published
    assert await core.run(_big_job(1000), timeout=15) == _big_out(1000)
    assert link.up and link.published == before + 1


async def test_run_output_above_a_ring_record_is_too_large(fc: AsyncFabricClient, host: CoreHost,
                                                           lib: Any) -> None:
    from fabric import TooLarge

    core = await load(fc, host, lib("big"), min_workers=1, max_workers=1)
    for job in (_big_job(9 * MIB), _big_job(9 * MIB, exit_code=3)):
        with pytest.raises(TooLarge) as ei:
            await core.run(job, timeout=15)
        assert ei.value.code == 413 and "remote memory" in ei.value.message
        assert str(9 * MIB) in ei.value.message  # the output's size, so the caller knows by how much
        await _next_job_uses_the_link(core, host)
    info = await core.stats()
    assert info.crashes == 0 and info.workers == 1  # no worker was harmed


async def test_python_core_output_above_the_max_payload_is_too_large(fc: AsyncFabricClient,
                                                                     host: CoreHost) -> None:
    from fabric import TooLarge

    core = await fc.load_python_core(node=host.node, min_workers=1, max_workers=1)
    with pytest.raises(TooLarge) as ei:
        await asyncio.wait_for(core.call(_big_bytes, 9 * MIB), 15)
    assert "remote memory" in ei.value.message
    link = host.cores.link
    assert link is not None and link.up
    before = link.published
    assert await asyncio.wait_for(core.call(_big_bytes, 1000), 15) == b"b" * 1000
    assert link.up and link.published == before + 1


async def test_map_results_above_the_max_payload(fc: AsyncFabricClient, host: CoreHost, lib: Any) -> None:
    """Each result fits, the batch's FJR1 reply does not: the outputs that fit arrive, in input order
    while they fit; a job whose output does not fit what is left gets 413 in its slot."""
    from fabric import TooLarge

    core = await load(fc, host, lib("big"), min_workers=1, max_workers=2)
    sizes = [3 * MIB, 3 * MIB, 3 * MIB, 1000, 9 * MIB, 10]
    got = await core.map([_big_job(n) for n in sizes], batch_size=len(sizes), return_exceptions=True,
                         timeout=30)
    assert got[0] == _big_out(3 * MIB) and got[1] == _big_out(3 * MIB)
    assert isinstance(got[2], TooLarge) and "remote memory" in got[2].message
    assert got[3] == _big_out(1000)
    assert isinstance(got[4], TooLarge)  # over a ring record on its own
    assert got[5] == _big_out(10)
    with pytest.raises(TooLarge):  # without return_exceptions the first one raises
        await core.map([_big_job(3 * MIB)] * 3, batch_size=3, timeout=30)
    # the pool and the job lane go on: a batch, then a single job from the link
    assert await core.map([_big_job(n) for n in range(20)], timeout=15) == [_big_out(n) for n in range(20)]
    await _next_job_uses_the_link(core, host)


async def test_external_worker_output_above_the_max_payload_is_too_large(fc: AsyncFabricClient, host: CoreHost,
                                                                          lib: Any, core_dir: Path) -> None:
    """An external worker has no ring record limit: its 9 MiB output reaches the spawner and must
    not be published over the server's 8 MiB max payload (nor leave the client waiting)."""
    from fabric import TooLarge

    worker = build_worker(core_dir)
    core = await load(fc, host, lib("big"), min_workers=0, max_workers=1, idle=0.1, external=True)
    await _until(lambda: core.stats(), lambda i: i.workers == 0)  # the loading ring worker retired
    proc = subprocess.Popen([str(worker), core.info.listen_unix])
    try:
        await _until(lambda: core.stats(), lambda i: i.external_workers == 1)
        for job in (_big_job(9 * MIB), _big_job(9 * MIB, exit_code=5)):
            with pytest.raises(TooLarge) as ei:
                await core.run(job, timeout=15)
            assert str(9 * MIB) in ei.value.message and str(host.cores.nc.max_payload) in ei.value.message
            assert await core.run(_big_job(1000), timeout=15) == _big_out(1000)
        got = await core.map([_big_job(9 * MIB), _big_job(10)], return_exceptions=True, timeout=15)
        assert isinstance(got[0], TooLarge) and got[1] == _big_out(10)
        assert (await core.stats()).external_workers == 1  # the worker was not blamed
    finally:
        await core.unload()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.unit
def test_fit_results_keeps_what_fits_in_input_order() -> None:
    from fabric import TooLarge
    from fabric.services.spawner.pools import fit_results

    refused: list[tuple[int, int, int, bool]] = []

    def refuse(i: int, size: int, code: int, alone: bool) -> TooLarge:
        refused.append((i, size, code, alone))
        return TooLarge(f"job {i}")

    results = [(0, 0, b"a" * 40), (3, 0, b"b" * 40), (0, 500, b"worker_crashed\nboom"), (0, 0, b"c" * 200),
               (0, 0, b"d" * 10)]
    whole = encode_job_results(results)
    assert fit_results(results, len(whole), refuse) == whole and not refused
    limit = 8 + 16 * 5 + 40 + 40 + 19 + 40  # room for the first three and 40 bytes more
    got = decode_job_results(fit_results(results, limit, refuse) or b"")
    assert [(c, e, bytes(o)) for c, e, o in got] == [
        results[0], results[1], results[2], (0, 413, b"too_large\njob 3"), (0, 0, b"d" * 10)]
    assert refused == [(3, 200, 0, False)]
    assert fit_results(results, 8 + 16 * 5 + 10, refuse) is None  # not even the 413s fit


@pytest.fixture(scope="module")
async def small_host(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CoreHost]:
    """A spawner on a nats-server at its default max payload (1 MiB), below a ring record."""
    from tests._nats import start_nats

    server = start_nats(tmp_path_factory.mktemp("nats-1mib"), max_payload="1MB", jetstream=False)
    try:
        svc = CoreHost(ServiceSettings(credentials=creds_for(CoreHost),
                                       nats_url=server.url, node=f"pool-{secrets.token_hex(3)}",
                                       state_dir=tmp_path_factory.mktemp("state-1mib")))
        await svc.start()
        try:
            yield svc
        finally:
            await svc.stop()
    finally:
        server.stop()


async def test_reply_link_never_publishes_above_the_max_payload(small_host: CoreHost, lib: Any) -> None:
    """A ring output over the server's max payload: 413 at once, and the reply link stays up."""
    from fabric import TooLarge

    host = small_host
    link = host.cores.link
    assert link is not None and link.up
    async with AsyncFabricClient(host.settings.nats_url, local=False) as client:
        assert client.max_payload == MIB
        core = await client.load_core("big", lib("big"), node=host.node, min_workers=1, max_workers=1)
        try:
            with pytest.raises(TooLarge) as ei:
                await core.run(_big_job(2 * MIB), timeout=15)
            assert str(2 * MIB) in ei.value.message and str(MIB) in ei.value.message
            await _next_job_uses_the_link(core, host)
            assert link.max_payload == MIB  # read from the server's INFO
            # the largest output a reply carries goes through; one byte more does not
            limit = link.reply_limit
            assert limit == host.cores.reply_limit()
            assert await core.run(_big_job(limit), timeout=15) == _big_out(limit)
            with pytest.raises(TooLarge):
                await core.run(_big_job(limit + 1), timeout=15)
            await _next_job_uses_the_link(core, host)
            got = await core.map([_big_job(MIB // 3)] * 3, return_exceptions=True, timeout=15)
            assert got[0] == got[1] == _big_out(MIB // 3) and isinstance(got[2], TooLarge)
            await _next_job_uses_the_link(core, host)
            with pytest.raises(TooLarge) as ei:  # an input over the payload: the client says so itself
                await core.run(b"x" * (MIB + 1), timeout=15)
            assert str(MIB + 1) in ei.value.message and "max payload" in ei.value.message
        finally:
            await core.unload()


# -- the sync client ---------------------------------------------------------------------


async def test_sync_client_core(host: CoreHost, nats_url: str, lib: Any) -> None:
    def use_sync_client() -> None:  # in a thread: the service runs on this test's loop
        with FabricClient(nats_url, local=False) as client:
            with client.load_core("echo", lib("echo"), node=host.node) as core:
                assert core.run(b"sync") == b"sync"
                assert core.map(iter([b"a", b"b", b"c"])) == [b"a", b"b", b"c"]
            py = client.load_python_core(node=host.node)
            try:
                assert py.call(pickle.dumps, 1, protocol=2) == pickle.dumps(1, protocol=2)
            finally:
                py.unload()
            assert not client.cores(host.node).cores

    await asyncio.to_thread(use_sync_client)


async def test_spawner_service_serves_cores(nats_url: str, tmp_path: Path, lib: Any) -> None:
    """The real SpawnerService hosts the CoreManager: load any-node, run, map, stop cleans up."""
    from fabric.services.spawner import SpawnerService

    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                         nats_url=nats_url, node=f"spc-{secrets.token_hex(3)}", state_dir=tmp_path))
    await svc.start()
    try:
        async with AsyncFabricClient(nats_url, local=False) as client:
            core = await client.load_core("echo", lib("echo"), node=svc.node)
            assert core.node == svc.node
            assert await core.run(b"via spawner") == b"via spawner"
            assert await core.map([b"1", b"2"]) == [b"1", b"2"]
            # run and map ride the pools' own subscriptions, yet $SRV lists and counts them (the tests' client is a
            # client-role user: its jobs travel on the user forms, fabric.u.tester.core.<node>.run.<core>)
            assert client.nc is not None and client.user == "tester"
            missing = await client.nc.request(user_subject("tester", f"fabric.core.{svc.node}.run.no-such-core"),
                                              b"x", timeout=5)
            assert missing.headers and missing.headers.get("Nats-Service-Error-Code") == "404"
            srv_id = svc._micro.id  # type: ignore[union-attr]
            info = json.loads((await client.nc.request(f"$SRV.INFO.spawner.{srv_id}", b"", timeout=5)).data)
            subjects_by_name = {ep["name"]: ep["subject"] for ep in info["endpoints"]}
            assert subjects_by_name["core-run"] == f"fabric.core.{svc.node}.run.*"
            assert subjects_by_name["core-map"] == f"fabric.core.{svc.node}.map.*"
            assert subjects_by_name["core-run-user"] == f"fabric.u.*.core.{svc.node}.run.*"
            assert subjects_by_name["core-map-user"] == f"fabric.u.*.core.{svc.node}.map.*"
            stats = json.loads((await client.nc.request(f"$SRV.STATS.spawner.{srv_id}", b"", timeout=5)).data)
            by_name = {ep["name"]: ep for ep in stats["endpoints"]}
            assert by_name["core-run-user"]["num_requests"] == 2 and by_name["core-run-user"]["num_errors"] == 1
            assert "no-such-core" in by_name["core-run-user"]["last_error"]
            assert by_name["core-map-user"]["num_requests"] == 1 and by_name["core-map-user"]["num_errors"] == 0
            assert by_name["core-map-user"]["processing_time"] > 0
            assert by_name["core-run"]["num_requests"] == by_name["core-map"]["num_requests"] == 0
    finally:
        await svc.stop()  # unloads every pool
    assert not svc.cores.pools and not _ring_files(svc.cores)
    assert not _workers()
