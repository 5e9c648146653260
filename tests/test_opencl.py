"""OpenCL kernels as jobs, end to end: run_opencl -> NATS -> SpawnerService pool -> fabric.opencl worker -> PoCL.

Everything is real: a nats-server on a random port (this module's own, so the node
registry holds only this module's node), the SpawnerService and the gpu-monitor of one
node, worker processes running the built-in core ``fabric.opencl`` on PoCL's CPU
device.  Bad input is sent for real and answered by the worker, which must run the
next good job; "a device that disappears mid-job" is the worker process killed with
SIGKILL during a long kernel (the device goes with its process on a CPU: the honest
fault to inject here), then the next job runs on the pool's fresh worker.

Resource accounting in teardown: no staging file of this process is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import fabric
from fabric import AsyncFabricClient, BadRequest, TooLarge, UnknownDevice, UnknownNode, WorkerCrashed
from fabric.client.opencl import close_staging, run_opencl
from fabric.opencl import (
    OPENCL_CORE,
    STAGE_DIR,
    DeviceUnavailable,
    InArg,
    JobHeader,
    KernelBuildFailed,
    NumberArg,
    Out,
    OutArg,
    Staging,
    choose_device,
    decode_error,
    decode_job,
    encode_job,
)
from fabric.schema import CpuLive, Gpu, HostInfo, NodeRecord, OpenCLDevice, OpenCLState
from fabric.service import ServiceSettings
from tests._nats import NatsServer, creds_for, start_nats, trusted_config

pytest.importorskip("pyopencl")

VADD = """
__kernel void vadd(__global const float *a, __global const float *b, __global float *c) {
    int i = get_global_id(0);
    c[i] = a[i] + b[i];
}"""
SAXPY2D = """
__kernel void saxpy(float k, __global const float *x, __global const float *y, __global float *out, int w) {
    int i = get_global_id(1) * w + get_global_id(0);
    out[i] = k * x[i] + y[i];
}"""
MATMUL = """
__kernel void matmul(__global const double *a, __global const double *b, __global double *c, int k, int m) {
    int row = get_global_id(0), col = get_global_id(1);
    double acc = 0.0;
    for (int j = 0; j < k; j++) acc += a[row * k + j] * b[j * m + col];
    c[row * m + col] = acc;
}"""
IMIX = """
__kernel void imix(__global const int *a, __global int *sq, __global int *neg, int add) {
    int i = get_global_id(0);
    sq[i] = a[i] * a[i] + add;
    neg[i] = -a[i];
}"""
SPIN = """
__kernel void spin(__global float *out, long n) {
    float acc = 0.0f;
    for (long j = 0; j < n; j++) acc = acc * 0.999f + sin(acc + (float)j);
    out[get_global_id(0)] = acc;
}"""


# -- fixtures ------------------------------------------------------------------------


# this module's own server, spawner and gpu-monitor (not conftest's): run_opencl places jobs by the node
# registry, whose TTL is set by whoever creates the bucket, and its fc waits until the node lists its device
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    s = start_nats(tmp_path_factory.mktemp("nats-opencl"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
async def spawner(server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    from fabric.services.spawner import SpawnerService

    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                         nats_url=server.url, node=f"cl-{secrets.token_hex(3)}",
                                         state_dir=tmp_path_factory.mktemp("cl-spawner")))
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture(scope="module")
async def monitor(server: NatsServer, spawner: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """The gpu-monitor of the spawner's node: run_opencl places jobs by its records."""
    from fabric.services.gpu_monitor.service import GpuMonitorService

    svc = GpuMonitorService(ServiceSettings(credentials=creds_for(GpuMonitorService),
                                            nats_url=server.url, node=spawner.node,
                                            state_dir=tmp_path_factory.mktemp("cl-monitor")),
                            interval_s=0.5, ttl_s=5.0)
    await svc.start()
    yield svc
    await svc.stop()


def _my_staging_files() -> list[str]:
    return glob.glob(os.path.join(STAGE_DIR, f"fabric-stage-{os.getpid()}-*"))


@pytest.fixture
async def fc(server: NatsServer, spawner: Any, monitor: Any) -> AsyncIterator[AsyncFabricClient]:
    async with AsyncFabricClient(server.url) as client:
        try:
            await _until_listed(client, spawner.node)
            yield client
        finally:
            close_staging(client)
    assert not _my_staging_files(), "staging files left in /dev/shm"


async def _until_listed(client: AsyncFabricClient, node: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            recs = await client.nodes()
            if any(r.node == node and r.opencl.devices for r in recs):
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "the gpu-monitor never listed the node's OpenCL device"
        await asyncio.sleep(0.1)


def _worker_pids(core_id: str) -> list[int]:
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            worker = "fabric.services.spawner.worker" in " ".join(p.cmdline())
            if worker and p.environ().get("FABRIC_CORE_ID") == core_id:
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return pids


def _core(client: AsyncFabricClient) -> Any:
    """The AsyncCore run_opencl loaded (it keeps them on the client)."""
    cores = client._opencl.cores  # type: ignore[union-attr]
    return next(c for c in cores.values() if c is not None)


# -- results checked against numpy ------------------------------------------------------


async def test_vadd_matches_numpy_and_runs_staged(fc: AsyncFabricClient, spawner: Any) -> None:
    n = 100_003  # not a multiple of anything friendly
    rng = np.random.default_rng(1)
    a, b = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    c, = await fc.opencl(VADD, "vadd", n, [a, b, fabric.Out(n, np.float32)])  # the public method
    np.testing.assert_array_equal(c, a + b)
    assert c.dtype == np.float32 and c.shape == (n,) and c.flags.writeable
    st = fc._opencl
    assert st.staging_ok[spawner.node] is True, "a same-host job should have used the staging file"
    assert len(_my_staging_files()) == 1
    # results stay valid after the next call (they are copies, not views of the staging file)
    c2, = await run_opencl(fc, VADD, "vadd", n, [b, b, Out(n, np.float32)])
    np.testing.assert_array_equal(c, a + b)
    np.testing.assert_array_equal(c2, b + b)
    core = _core(fc)
    assert core.name == OPENCL_CORE and core.node == spawner.node and core.digest == OPENCL_CORE


async def test_saxpy_2d_with_scalars(fc: AsyncFabricClient) -> None:
    h, w = 48, 64
    rng = np.random.default_rng(2)
    x, y = rng.random((h, w), dtype=np.float32), rng.random((h, w), dtype=np.float32)
    out, = await run_opencl(fc, SAXPY2D, "saxpy", (w, h), [np.float32(2.5), x, y, Out((h, w), "float32"),
                                                           np.int32(w)], local_size=(16, 4))
    np.testing.assert_allclose(out, 2.5 * x + y, rtol=1e-6)
    # a plain Python number is cast to the declared type (float k, int w)
    out2, = await run_opencl(fc, SAXPY2D, "saxpy", (w, h), [2.5, x, y, Out((h, w), "float32"), w])
    np.testing.assert_array_equal(out2, out)


async def test_matmul_float64_needs_check_sizes_off(fc: AsyncFabricClient) -> None:
    n, k, m = 12, 40, 9
    rng = np.random.default_rng(3)
    a, b = rng.random((n, k)), rng.random((k, m))
    args = [a, b, Out((n, m), np.float64), np.int32(k), np.int32(m)]
    c, = await run_opencl(fc, MATMUL, "matmul", (n, m), args, check_sizes=False)
    np.testing.assert_allclose(c, a @ b, rtol=1e-12)
    # with the default check, b (k*m = 360 elements) is still >= n*m = 108 work items: passes;
    # a kernel over more work items than a buffer has elements is refused
    with pytest.raises(BadRequest, match="check_sizes=False"):
        await run_opencl(fc, MATMUL, "matmul", (n, m), [a[:2], b, Out((n, m), np.float64), np.int32(k),
                                                        np.int32(m)])


async def test_int32_two_outputs_in_order(fc: AsyncFabricClient) -> None:
    a = np.arange(-500, 500, dtype=np.int32)
    sq, neg = await run_opencl(fc, IMIX, "imix", a.size, [a, Out(a.size, np.int32), Out(a.size, "int32"),
                                                          np.int32(7)])
    np.testing.assert_array_equal(sq, a * a + 7)
    np.testing.assert_array_equal(neg, -a)


async def test_inline_and_staged_results_are_equal(fc: AsyncFabricClient, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 65_536
    rng = np.random.default_rng(4)
    a, b = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    staged, = await run_opencl(fc, VADD, "vadd", n, [a, b, Out(n, np.float32)])
    monkeypatch.setenv("FABRIC_OPENCL_STAGING", "0")
    files = _my_staging_files()
    inline, = await run_opencl(fc, VADD, "vadd", n, [a, b, Out(n, np.float32)])
    assert _my_staging_files() == files  # no new staging file for an inline job
    np.testing.assert_array_equal(staged, inline)
    # big-endian input arrays are sent little-endian, the result is the same
    be, = await run_opencl(fc, VADD, "vadd", n, [a.astype(">f4"), b, Out(n, np.float32)])
    np.testing.assert_array_equal(be, staged)


async def test_local_false_client_travels_inline(server: NatsServer, spawner: Any, monitor: Any) -> None:
    async with AsyncFabricClient(server.url, local=False) as client:
        a = np.arange(1024, dtype=np.float32)
        c, = await run_opencl(client, VADD, "vadd", a.size, [a, a, Out(a.size, np.float32)])
        np.testing.assert_array_equal(c, 2 * a)
        assert client._opencl is not None and client._opencl.stager is None, "local=False must not make staging files"


# -- bad input: a clear code, and the same worker runs the next good job --------------------


async def _good(fc: AsyncFabricClient) -> None:
    a = np.ones(256, np.float32)
    c, = await run_opencl(fc, VADD, "vadd", 256, [a, a, Out(256, np.float32)])
    np.testing.assert_array_equal(c, 2 * a)


async def test_bad_inputs_have_codes_and_the_worker_keeps_serving(fc: AsyncFabricClient, spawner: Any) -> None:
    await _good(fc)
    pids = _worker_pids(_core(fc).id)
    assert len(pids) == 1
    a = np.ones(64, np.float32)
    node = spawner.node
    cases: list[tuple[type[Exception], int, str, dict[str, Any]]] = [
        (KernelBuildFailed, 400, "does not compile",
         dict(source="__kernel void vadd(__global float *a) { a[0] = nope; }", kernel="vadd", global_size=64,
              args=[Out(64)])),
        (BadRequest, 400, "no kernel 'vsub'", dict(kernel="vsub", global_size=64, args=[a, a, Out(64)])),
        (BadRequest, 400, "takes 3 arguments", dict(global_size=64, args=[a, a])),
        (BadRequest, 400, "pass an array of float32",
         dict(global_size=64, args=[a.astype(np.float64), a, Out(64)])),
        (BadRequest, 400, "pass an array of float32", dict(global_size=64, args=[a, a, Out(64, np.int32)])),
        (BadRequest, 400, "pass numpy.float32", dict(source=SAXPY2D, kernel="saxpy", global_size=(8, 8),
                                                     args=[np.float64(1), a, a, Out(64), np.int32(8)])),
        (BadRequest, 400, "does not divide", dict(global_size=64, local_size=7, args=[a, a, Out(64)])),
        (BadRequest, 400, "1 to 3 dimensions", dict(global_size=(4, 4, 2, 2), args=[a, a, Out(64)])),
        (BadRequest, 400, "64 elements for 128 work items", dict(global_size=128, args=[a, a, Out(128)])),
        (BadRequest, 400, "is a float\\* buffer", dict(global_size=64, args=[a, np.float32(1), Out(64)])),
        (UnknownDevice, 404, "no OpenCL device", dict(global_size=64, args=[a, a, Out(64)],
                                                      device=f"{node}:cl:7:0")),
        (UnknownNode, 404, "no node", dict(global_size=64, args=[a, a, Out(64)], device="no-such-node:cl:0:0")),
        (UnknownNode, 404, "no node", dict(global_size=64, args=[a, a, Out(64)], device="no-such-node")),
        (UnknownDevice, 404, "no OpenCL GPU", dict(global_size=64, args=[a, a, Out(64)], device="gpu")),
    ]
    for cls, code, text, kw in cases:
        kw.setdefault("source", VADD)
        kw.setdefault("kernel", "vadd")
        with pytest.raises(cls, match=text) as info:
            await run_opencl(fc, **kw)
        assert info.value.code == code, (text, info.value)
        if cls is KernelBuildFailed:
            assert "nope" in info.value.build_log and "undeclared" in info.value.build_log  # type: ignore[attr-defined]
            assert "tempfile" not in info.value.build_log  # type: ignore[attr-defined]
        await _good(fc)
    assert _worker_pids(_core(fc).id) == pids, "a bad job must not cost the worker its life"
    with pytest.raises(BadRequest, match="not a numpy array"):
        await run_opencl(fc, VADD, "vadd", 64, [a, [1.0] * 64, Out(64)])


async def test_inline_job_past_max_payload_is_too_large(fc: AsyncFabricClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_OPENCL_STAGING", "0")
    n = 1_500_000  # 12 MB of inputs against the 8 MiB max payload
    a = np.zeros(n, np.float32)
    with pytest.raises(TooLarge, match="same-host staging") as info:
        await run_opencl(fc, VADD, "vadd", n, [a, a, Out(n, np.float32)])
    assert info.value.code == 413
    monkeypatch.delenv("FABRIC_OPENCL_STAGING")
    c, = await run_opencl(fc, VADD, "vadd", n, [a + 1, a, Out(n, np.float32)])  # staged: no such limit
    assert c.shape == (n,) and float(c.sum()) == n


async def test_worker_refuses_foreign_staging_files(fc: AsyncFabricClient, tmp_path: Path) -> None:
    """Frames sent straight to the pool: a file that is not the client's is refused, flagged 'staging'."""
    await _good(fc)
    core = _core(fc)
    real = sorted(_my_staging_files())[0]
    stager = fc._opencl.stager  # type: ignore[union-attr]
    mine = next(f for f in stager.idle if f.path == real)
    linked = f"{STAGE_DIR}/fabric-stage-{os.getpid()}-{secrets.token_hex(16)}"
    symlink = f"{STAGE_DIR}/fabric-stage-{os.getpid()}-{secrets.token_hex(16)}"

    async def refused(name: str, nonce: bytes, text: str) -> None:
        header = JobHeader(source=VADD, kernel="vadd", global_size=[4], args=[OutArg("<f4", [4], 8192)],
                           staging=Staging(name=name, nonce=nonce, size=mine.capacity))
        with pytest.raises(Exception) as info:
            await core.run(encode_job(header))
        rec = decode_error(info.value.output)  # type: ignore[attr-defined]
        assert rec is not None and rec.code == 400 and rec.staging, (name, rec)
        assert text in rec.message, (text, rec.message)

    await refused(mine.name, bytes(16), "nonce")
    await refused(f"fabric-stage-1-{'0' * 32}", mine.nonce, "cannot be opened")
    await refused("../etc/passwd", mine.nonce, "not a fabric staging file")
    os.symlink(real, symlink)
    try:
        await refused(os.path.basename(symlink), mine.nonce, "cannot be opened")  # O_NOFOLLOW
    finally:
        os.unlink(symlink)
    os.link(real, linked)
    try:
        await refused(os.path.basename(linked), mine.nonce, "single-link")  # a hard link: st_nlink == 2
        await refused(mine.name, mine.nonce, "single-link")  # the client's own name, while linked twice
    finally:
        os.unlink(linked)
    await _good(fc)


async def test_hostile_frames_are_invalid_frame(fc: AsyncFabricClient) -> None:
    await _good(fc)
    core = _core(fc)
    good = encode_job(JobHeader(source=VADD, kernel="vadd", global_size=[4], args=[]))
    for frame in (b"", b"FCLJ", b"XXXX" + bytes(good[4:]), bytes(good[:4]) + b"\x09\x00" + bytes(good[6:]),
                  bytes(good[:8]) + (1 << 30).to_bytes(4, "little") + bytes(good[12:]), bytes(good[:16]) + b"\xc1"):
        with pytest.raises(Exception) as info:
            await core.run(frame)
        rec = decode_error(info.value.output)  # type: ignore[attr-defined]
        assert rec is not None and (rec.code, rec.kind) == (400, "invalid_frame"), (frame[:20], rec)
    await _good(fc)


# -- a device that disappears mid-job ---------------------------------------------------------


async def test_worker_killed_mid_kernel_then_a_fresh_worker_runs(fc: AsyncFabricClient) -> None:
    await _good(fc)
    core = _core(fc)
    old, = _worker_pids(core.id)
    out = Out(1, np.float32)
    job = asyncio.ensure_future(run_opencl(fc, SPIN, "spin", 1, [out, np.int64(1 << 40)], timeout=60))
    await asyncio.sleep(1.0)  # the kernel runs (its program built) by now
    assert not job.done()
    os.kill(old, signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        await asyncio.wait_for(job, 15)
    await _good(fc)
    new = _worker_pids(core.id)
    assert new and old not in new


@pytest.mark.unit
def test_runtime_failures_are_classified() -> None:
    """The OpenCL status codes a failing device returns map to 503 (and drop the device), misuse to 400/413."""
    import pyopencl as cl

    from fabric.services.spawner.worker_opencl import OpenCLCore

    core = OpenCLCore()
    try:
        def err(code: int) -> Any:
            return core._runtime_error(cl.RuntimeError(cl._cl._ErrorRecord("clEnqueueNDRangeKernel", code, "x")))

        header = JobHeader(source=VADD, kernel="vadd", global_size=[4], args=[])
        core._device(header)
        assert core._devices
        for code in (cl.status_code.DEVICE_NOT_AVAILABLE, cl.status_code.OUT_OF_RESOURCES,
                     cl.status_code.MEM_OBJECT_ALLOCATION_FAILURE, cl.status_code.INVALID_COMMAND_QUEUE):
            assert isinstance(err(code), DeviceUnavailable) and err(code).code == 503
        assert not core._devices, "a failed device's context must not be reused"
        assert type(err(cl.status_code.INVALID_WORK_GROUP_SIZE)) is BadRequest
        assert type(err(cl.status_code.INVALID_BUFFER_SIZE)) is TooLarge
    finally:
        core.close()


# -- staging files --------------------------------------------------------------------------


async def test_staging_files_are_cleaned_and_unmapped_by_the_worker(fc: AsyncFabricClient) -> None:
    a = np.ones(4096, np.float32)
    results = await asyncio.gather(*(run_opencl(fc, VADD, "vadd", a.size, [a * i, a, Out(a.size, np.float32)])
                                     for i in range(3)))
    for i, (c,) in enumerate(results):
        np.testing.assert_array_equal(c, a * i + a)
    made = _my_staging_files()
    assert 1 <= len(made) <= 3  # concurrent calls each got a file; idle ones are kept for reuse
    for path in made:
        assert os.stat(path).st_mode & 0o777 == 0o600
    worker, = _worker_pids(_core(fc).id)
    close_staging(fc)
    assert not _my_staging_files()
    await _good(fc)  # the next (staged) job makes a new file; the worker drops the unlinked ones
    maps = Path(f"/proc/{worker}/maps").read_text()
    assert not any(os.path.basename(p) in maps for p in made), "the worker still maps deleted staging files"


# -- no gpu-monitor: any spawner, the worker picks its device ----------------------------------


async def test_without_a_gpu_monitor_any_spawner_runs_it(tmp_path: Path) -> None:
    from fabric.services.spawner import SpawnerService

    server = start_nats(tmp_path / "nats")
    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                         nats_url=server.url, node=f"clf-{secrets.token_hex(3)}",
                                         state_dir=tmp_path / "state"))
    await svc.start()
    try:
        async with AsyncFabricClient(server.url) as client:
            try:
                a = np.arange(1000, dtype=np.float32)
                c, = await run_opencl(client, VADD, "vadd", a.size, [a, a, Out(a.size, np.float32)], device="cpu")
                np.testing.assert_array_equal(c, 2 * a)
                st = client._opencl
                assert st.records is None and st.staging_ok[svc.node] is True  # staging tried, and it worked
                c, = await run_opencl(client, VADD, "vadd", a.size, [a, a, Out(a.size, np.float32)])
                np.testing.assert_array_equal(c, 2 * a)
                with pytest.raises(UnknownDevice, match="no OpenCL device 0:3"):
                    await run_opencl(client, VADD, "vadd", a.size, [a, a, Out(a.size, np.float32)],
                                     device=f"{svc.node}:cl:0:3")
                with pytest.raises(UnknownNode):
                    await run_opencl(client, VADD, "vadd", a.size, [a, a, Out(a.size, np.float32)],
                                     device="gone-node:cl:0:0")
            finally:
                close_staging(client)
    finally:
        await svc.stop()
        server.stop()
    assert not _my_staging_files()


# -- the frames -------------------------------------------------------------------------------


@pytest.mark.unit
def test_job_frame_round_trip_and_layout() -> None:
    arr = np.arange(5, dtype=np.float32)
    header = JobHeader(source="k", kernel="f", global_size=[5], args=[InArg("<f4", [5], 0, 20), NumberArg(3)])
    frame = encode_job(header, [(0, arr)])
    assert bytes(frame[:4]) == b"FCLJ" and int.from_bytes(frame[4:6], "little") == 1
    hlen = int.from_bytes(frame[8:12], "little")
    start = (16 + hlen + 15) // 16 * 16
    assert len(frame) == start + 20 and bytes(frame[start:]) == arr.tobytes()
    got, data = decode_job(frame)
    assert got == header and bytes(data) == arr.tobytes()


# -- device choice (pure) ------------------------------------------------------------------


def _rec(node: str, host_id: str, devices: list[tuple[str, str, int]], gpus: list[tuple[int, float]] = (),
         cpu_percent: float = 0.0, status: str = "up") -> NodeRecord:
    """A node with OpenCL *devices* ``(type, vendor, global memory)`` and NVML *gpus* ``(free, util)``."""
    cl = [OpenCLDevice(id=f"{node}:cl:{0 if t == 'CPU' else 1}:{i}", platform_index=0 if t == "CPU" else 1,
                       device_index=i, platform="NVIDIA CUDA" if v == "NVIDIA" else "Portable Computing Language",
                       type=t, vendor=v, global_memory=mem, compute_units=4)
          for i, (t, v, mem) in enumerate(devices)]
    return NodeRecord(node=node, host=HostInfo(hostname=node, node=node, architecture="x86_64", os="linux",
                                               host_id=host_id),
                      gpus=[Gpu(index=i, id=f"{node}:gpu:{i}", memory_free=f, utilization_gpu=u)
                            for i, (f, u) in enumerate(gpus)],
                      opencl=OpenCLState(available=bool(cl), devices=cl), cpu=CpuLive(percent=cpu_percent),
                      status=status)


@pytest.mark.unit
def test_choose_device_prefers_the_gpu_with_most_free_memory() -> None:
    recs = [_rec("a", "h1", [("CPU", "pocl", 8 << 30)]),
            _rec("b", "h2", [("CPU", "pocl", 8 << 30), ("GPU", "NVIDIA", 16 << 30), ("GPU", "NVIDIA", 16 << 30)],
                 gpus=[(2 << 30, 10.0), (9 << 30, 50.0)]),
            _rec("c", "h3", [("GPU", "NVIDIA", 16 << 30)], gpus=[(9 << 30, 5.0)])]
    # b's second GPU and c's GPU have 9 GiB free: the lower utilisation wins
    assert choose_device(recs, None, "h1") == ("c", 1, 0)
    assert choose_device(recs, "gpu", "h1") == ("c", 1, 0)
    assert choose_device(recs, "b", "h1") == ("b", 1, 2)
    # a stale node is not chosen automatically
    recs[2] = _rec("c", "h3", [("GPU", "NVIDIA", 16 << 30)], gpus=[(9 << 30, 5.0)], status="stale")
    assert choose_device(recs, None, "h1") == ("b", 1, 2)


@pytest.mark.unit
def test_choose_device_cpu_fallback_prefers_the_local_host() -> None:
    recs = [_rec("far", "h2", [("CPU", "pocl", 8 << 30)], cpu_percent=1.0),
            _rec("here", "h1", [("CPU", "pocl", 8 << 30)], cpu_percent=90.0)]
    assert choose_device(recs, None, "h1") == ("here", 0, 0)
    assert choose_device(recs, "cpu", "h1") == ("here", 0, 0)
    assert choose_device(recs, None, "h9") == ("far", 0, 0)  # not local: the least busy
    with pytest.raises(UnknownDevice, match="no OpenCL GPU"):
        choose_device(recs, "gpu", "h1")


@pytest.mark.unit
def test_choose_device_explicit_ids_and_unknown_ones() -> None:
    recs = [_rec("a", "h1", [("CPU", "pocl", 8 << 30), ("GPU", "NVIDIA", 4 << 30)]),
            _rec("empty", "h2", [])]
    assert choose_device(recs, "a:cl:0:0", "h1") == ("a", 0, 0)
    assert choose_device(recs, "a:cl:1:1", "") == ("a", 1, 1)
    with pytest.raises(UnknownDevice, match="its devices: a:cl:0:0, a:cl:1:1"):
        choose_device(recs, "a:cl:1:5", "h1")
    with pytest.raises(UnknownNode):
        choose_device(recs, "zz:cl:0:0", "h1")
    with pytest.raises(UnknownNode):
        choose_device(recs, "zz", "h1")
    with pytest.raises(UnknownDevice, match="no OpenCL device"):
        choose_device(recs, "empty", "h1")
    with pytest.raises(UnknownDevice):
        choose_device([], None, "h1")


@pytest.mark.unit
def test_choose_device_places_by_the_gpu_paired_by_pci_bus_id() -> None:
    # NVML's GPU 0 (2 GiB free) is the second NVIDIA OpenCL device, GPU 1 (9 GiB free) the
    # first: the job goes to the first, the one whose free memory was read
    def rec(gpu_bus: list[str], gpus: list[Gpu] | None = None, cl_bus: tuple[str, str] = ("", "")) -> NodeRecord:
        devices = [OpenCLDevice(id=f"g:cl:0:{i}", platform_index=0, device_index=i, platform="NVIDIA CUDA",
                                type="GPU", vendor="NVIDIA Corporation", global_memory=16 << 30, pci_bus_id=b)
                   for i, b in enumerate(cl_bus)]
        if gpus is None:
            gpus = [Gpu(index=i, id=f"g:gpu:{i}", memory_free=f, utilization_gpu=10.0, pci_bus_id=b)
                    for i, (f, b) in enumerate(zip((2 << 30, 9 << 30), gpu_bus, strict=True))]
        return NodeRecord(node="g", host=HostInfo(hostname="g", node="g", architecture="x86_64", os="linux"),
                          gpus=gpus, opencl=OpenCLState(available=True, devices=devices))

    by_bus = rec(["0000:3b:00.0", "0000:1a:00.0"], cl_bus=("0000:1a:00.0", "0000:3b:00.0"))
    assert choose_device([by_bus], "gpu", "") == ("g", 0, 0)
    assert choose_device([by_bus], None, "") == ("g", 0, 0)
    assert choose_device([by_bus], "g", "") == ("g", 0, 0)
    # without bus ids on either side: by order, GPU 1 is the second device
    assert choose_device([rec(["", ""])], "gpu", "") == ("g", 0, 1)
    # a monitor that recorded its pairing is followed as recorded
    recorded = rec(["", ""])
    recorded.gpus[0].paired_by = recorded.gpus[1].paired_by = "pci_bus_id"
    recorded.gpus[0].opencl_ids, recorded.gpus[1].opencl_ids = ["g:cl:0:1"], ["g:cl:0:0"]
    recorded.opencl.devices[0].gpu_id, recorded.opencl.devices[1].gpu_id = "g:gpu:1", "g:gpu:0"
    assert choose_device([recorded], "gpu", "") == ("g", 0, 0)


@pytest.mark.unit
def test_out_validates_its_arguments() -> None:
    assert Out(3).shape == (3,) and Out((2, 3), "f8").nbytes == 48
    assert Out(4, ">i4").dtype == np.dtype("<i4")
    for bad in ((-1,), ("3",), (True,)):
        with pytest.raises(BadRequest):
            Out(bad)
    with pytest.raises(BadRequest, match="plain numeric"):
        Out(3, object)
