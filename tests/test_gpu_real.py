"""The gpu-monitor's probes on a real NVIDIA GPU; skipped (with the reason) where there is none.

tests/test_gpu_probes.py drives the same code through a fake NVML library; this file
is what proves the real driver says what the fake says, and that an OpenCL job placed
with ``device="gpu"`` runs on the GPU with its worker in NVML's process list.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from fabric.gpupair import canonical_bus_id, pair
from fabric.services.gpu_monitor.nvml import NvmlProbe
from fabric.services.gpu_monitor.opencl_probe import probe as opencl_probe
from tests._nats import creds_for, trusted_config


def _real_nvml_error() -> str:
    """"" when the real libnvidia-ml.so.1 loads, else why not."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as exc:
        return str(exc)
    return ""


_why_not = _real_nvml_error()
pytestmark = pytest.mark.skipif(bool(_why_not), reason=f"no NVIDIA driver here: {_why_not}")


def test_nvml_finds_the_gpus() -> None:
    probe = NvmlProbe()
    try:
        state, gpus = probe.sample("n1")
    finally:
        probe.close()
    assert state.available, state.reason
    assert state.driver_version
    assert len(gpus) >= 1, state.reason
    for g in gpus:
        assert g.id == f"n1:gpu:{g.index}"
        assert g.name, g
        assert g.uuid.startswith(("GPU-", "MIG-")), g.uuid
        assert g.memory_total > 0
        assert 0 <= g.memory_used <= g.memory_total
        assert g.compute_capability.count(".") == 1
        assert all(p.pid > 0 for p in g.processes)
        assert canonical_bus_id(g.pci_bus_id) == g.pci_bus_id != "", g.pci_bus_id


def _nvidia_icd() -> bool:
    vendors = Path("/etc/OpenCL/vendors")
    return vendors.is_dir() and any("nvidia" in f.read_text().lower() for f in vendors.glob("*.icd"))


def test_opencl_lists_the_nvidia_gpu() -> None:
    if not _nvidia_icd():
        pytest.skip("no NVIDIA OpenCL ICD in /etc/OpenCL/vendors")
    state = opencl_probe("n1")
    assert state.available, state.reason
    gpus = [d for d in state.devices if d.type == "GPU" and "NVIDIA" in (d.vendor + d.platform).upper()]
    assert gpus, state.devices
    assert all(d.global_memory > 0 and d.compute_units > 0 for d in gpus)


def test_nvidia_opencl_gpus_pair_with_nvml_by_pci_bus_id() -> None:
    """The NVIDIA OpenCL platform's GPUs sit where NVML says its GPUs sit: each pairs by bus id."""
    if not _nvidia_icd():
        pytest.skip("no NVIDIA OpenCL ICD in /etc/OpenCL/vendors")
    probe = NvmlProbe()
    try:
        _, gpus = probe.sample("n1")
    finally:
        probe.close()
    paired, devices = pair(gpus, opencl_probe("n1").devices)
    nvidia = [d for d in devices if d.type == "GPU" and "NVIDIA" in (d.vendor + d.platform).upper()]
    assert nvidia
    by_id = {g.id: g for g in paired}
    for d in nvidia:
        # OpenCL may see fewer GPUs than NVML (CUDA_VISIBLE_DEVICES), never more: each has its NVML GPU
        assert d.pci_bus_id and d.gpu_id, d
        g = by_id[d.gpu_id]
        assert g.pci_bus_id == d.pci_bus_id and g.paired_by == "pci_bus_id" and d.id in g.opencl_ids
        # the same board: OpenCL's global memory is (nearly) NVML's total
        assert abs(d.global_memory - g.memory_total) <= 0.1 * g.memory_total, (d, g)


async def test_an_opencl_job_runs_on_the_gpu_and_nvml_sees_its_worker(tmp_path: Path) -> None:
    """The whole path on real hardware: gpu-monitor records, fc.opencl(device="gpu"), NVML's process list."""
    if not _nvidia_icd():
        pytest.skip("no NVIDIA OpenCL ICD in /etc/OpenCL/vendors")
    import asyncio
    import secrets
    import time

    import numpy as np

    from fabric import AsyncFabricClient, Out
    from fabric.service import ServiceSettings
    from fabric.services.gpu_monitor.service import GpuMonitorService
    from fabric.services.spawner import SpawnerService
    from tests._nats import start_nats

    server = start_nats(tmp_path / "nats")
    node = f"gpu-{secrets.token_hex(3)}"
    spawner = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                             nats_url=server.url, node=node, state_dir=tmp_path / "sp"))
    monitor = GpuMonitorService(ServiceSettings(credentials=creds_for(GpuMonitorService),
                                                nats_url=server.url, node=node, state_dir=tmp_path / "mon"),
                                interval_s=0.5, ttl_s=5.0)
    await spawner.start()
    await monitor.start()
    try:
        async with AsyncFabricClient(server.url) as fc:
            deadline = time.monotonic() + 15
            while not any(r.gpus for r in await fc.nodes()):
                assert time.monotonic() < deadline, "the gpu-monitor never listed a GPU"
                await asyncio.sleep(0.2)
            vadd = """__kernel void vadd(__global const float *a, __global const float *b, __global float *c) {
                int i = get_global_id(0); c[i] = a[i] + b[i]; }"""
            a = np.random.default_rng(3).random(1 << 20, dtype=np.float32)
            c, = await fc.opencl(vadd, "vadd", a.size, [a, a, Out(a.size, np.float32)], device="gpu")
            np.testing.assert_array_equal(c, a + a)
            # the worker that ran it holds a context on the GPU: NVML lists it, tied to its pool
            core_ids = {f"core:{c.id}" for c in fc._opencl.cores.values() if c is not None}  # type: ignore[union-attr]
            deadline = time.monotonic() + 10
            while True:
                procs = [p for g in (await fc.gpus(node)).gpus for p in g.processes]
                if {p.fabric_id for p in procs} & core_ids:
                    break
                if procs and not any(Path(f"/proc/{p.pid}").exists() for p in procs):
                    pytest.skip(f"NVML lists pids of another PID namespace (a container): {[p.pid for p in procs]}")
                held = {p.fabric_id for p in procs}
                assert time.monotonic() < deadline, f"NVML never listed the OpenCL worker: {held} vs {core_ids}"
                await asyncio.sleep(0.5)
    finally:
        await monitor.stop()
        await spawner.stop()
        server.stop()
