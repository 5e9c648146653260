"""The gpu-monitor's probes on a real NVIDIA GPU; skipped (with the reason) where there is none.

tests/test_gpu_probes.py drives the same code through a fake NVML library; this file
is what proves the real driver says what the fake says.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from services.gpu_monitor.nvml import NvmlProbe
from services.gpu_monitor.opencl_probe import probe as opencl_probe


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
    for i, g in enumerate(gpus):
        assert g.id == f"n1:gpu:{g.index}"
        assert g.name, g
        assert g.uuid.startswith(("GPU-", "MIG-")), g.uuid
        assert g.memory_total > 0
        assert 0 <= g.memory_used <= g.memory_total
        assert g.compute_capability.count(".") == 1
        assert all(p.pid > 0 for p in g.processes)


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
