"""The gpu-monitor's probes against the real thing: /proc, a fake NVML driver, PoCL.

- host: :func:`host_info` and :class:`LiveSampler` figures checked against what the
  kernel itself says (/proc/meminfo, /proc/loadavg, /proc/net/dev, statvfs);
- NVML: the real pynvml and :class:`NvmlProbe` against tests/fakenvml (a C library
  named libnvidia-ml.so.1), one subprocess per behaviour since pynvml loads its
  library once per process;
- OpenCL: PoCL's CPU device through pyopencl, and a loader that genuinely finds no
  platform (a pyopencl tree whose bundled ICD directory is empty).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fabric import _version
from fabric.gpupair import bus_id, canonical_bus_id, gpu_by_device, pair
from fabric.schema import Gpu, OpenCLDevice
from fabric.services.gpu_monitor.host import LiveSampler, host_info
from fabric.services.gpu_monitor.nvml import fabric_id_of
from fabric.services.gpu_monitor.opencl_probe import probe as opencl_probe
from tests._fakenvml import build_fake_nvml

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024  # kB
    return out


def _net_dev() -> tuple[int, int, int, int]:
    """(bytes sent, bytes received, packets sent, packets received) of all interfaces but lo."""
    sent = recv = psent = precv = 0
    with open("/proc/net/dev") as fh:
        for line in list(fh)[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                continue
            f = [int(x) for x in rest.split()]
            recv += f[0]
            precv += f[1]
            sent += f[8]
            psent += f[9]
    return sent, recv, psent, precv


# -- host --------------------------------------------------------------------


def test_host_info_matches_the_kernel() -> None:
    info = host_info("n1")
    assert info.node == "n1"
    assert info.ram_bytes == _meminfo()["MemTotal"]
    assert info.cpu_cores == os.cpu_count()
    assert 1 <= info.cpu_physical_cores <= info.cpu_cores
    assert info.architecture == platform.machine()
    assert info.os == "linux"
    assert info.os_release == os.uname().release
    assert info.hostname == os.uname().nodename
    assert info.python == sysconfig.get_config_var("SOABI")
    assert info.python.startswith(sys.implementation.cache_tag)
    assert info.fabric_version == _version.__version__
    assert info.host_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with open("/proc/stat") as fh:
        btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    assert abs(info.boot_time_s - btime) <= 1
    with open("/proc/cpuinfo") as fh:
        models = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
    if models:
        assert info.cpu_model == models[0]


def test_cpu_is_measured_since_the_previous_sample() -> None:
    sampler = LiveSampler(["/"])
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this thread keeps one CPU busy between the two readings
        pass
    cpu, _, _, _ = sampler.sample()
    assert len(cpu.per_core) == os.cpu_count()
    assert all(0.0 <= p <= 100.0 for p in cpu.per_core)
    assert max(cpu.per_core) > 50.0, cpu.per_core
    assert cpu.percent == pytest.approx(sum(cpu.per_core) / len(cpu.per_core), abs=0.11)
    load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    # the kernel recomputes load every 5 s: the two readings may straddle one update
    for mine, kernel in zip((cpu.load_1, cpu.load_5, cpu.load_15), load, strict=True):
        assert mine == pytest.approx(kernel, abs=0.5)
    assert cpu.freq_mhz == -1.0 or cpu.freq_mhz > 0
    # a sample right after the previous one has no ticks to measure: 0, never a division by zero
    again, _, _, _ = sampler.sample()
    assert all(0.0 <= p <= 100.0 for p in again.per_core)


def test_memory_matches_meminfo() -> None:
    _, mem, _, _ = LiveSampler([]).sample()
    info = _meminfo()
    assert mem.total == info["MemTotal"]
    assert mem.available == pytest.approx(info["MemAvailable"], rel=0.05)
    assert 0 < mem.used < mem.total
    assert 0.0 < mem.percent < 100.0
    assert mem.swap_total == info["SwapTotal"]
    assert 0 <= mem.swap_used <= mem.swap_total


def test_disks_match_statvfs_and_share_one_entry_per_filesystem(tmp_path: Path) -> None:
    missing = str(tmp_path / "not-mounted")
    sampler = LiveSampler([str(tmp_path), str(tmp_path.parent), str(tmp_path), missing])
    _, _, disks, _ = sampler.sample()
    # tmp_path and its parent are on one filesystem: reported once, under the first path
    assert [d.path for d in disks] == [str(tmp_path), missing]
    st = os.statvfs(tmp_path)
    d = disks[0]
    assert d.total == st.f_blocks * st.f_frsize
    assert d.free == pytest.approx(st.f_bavail * st.f_frsize, abs=64 * MiB)
    assert d.used == pytest.approx((st.f_blocks - st.f_bfree) * st.f_frsize, abs=64 * MiB)
    assert 0.0 <= d.percent <= 100.0
    gone = disks[1]
    assert (gone.total, gone.used, gone.free, gone.percent) == (-1, -1, -1, -1.0)


def test_net_counters_match_proc_net_dev_without_loopback() -> None:
    sampler = LiveSampler([])
    before = _net_dev()
    _, _, _, first = sampler.sample()
    after = _net_dev()
    got = (first.bytes_sent, first.bytes_recv, first.packets_sent, first.packets_recv)
    for lo, mine, hi in zip(before, got, after, strict=True):
        assert lo <= mine <= hi
    assert (first.sent_per_s, first.recv_per_s) == (0.0, 0.0)  # nothing to compare with yet
    time.sleep(0.05)
    _, _, _, second = sampler.sample()
    assert second.bytes_sent >= first.bytes_sent and second.bytes_recv >= first.bytes_recv
    assert second.packets_sent >= first.packets_sent and second.packets_recv >= first.packets_recv
    assert second.sent_per_s >= 0.0 and second.recv_per_s >= 0.0
    # the rate is the counters' difference over (at least) the 50 ms between the samples
    assert second.recv_per_s <= (second.bytes_recv - first.bytes_recv) / 0.05 + 1e-6


# -- NVML through the fake driver ---------------------------------------------

_PROBE_SCRIPT = """
import json, sys, msgspec
from fabric.services.gpu_monitor.nvml import NvmlProbe
probe = NvmlProbe()
for i in range(int(sys.argv[1])):
    if sys.argv[2:] and i == int(sys.argv[2]):
        probe.close()  # the next sample must initialise NVML again
    state, gpus = probe.sample("n1")
    print(json.dumps({"state": msgspec.to_builtins(state), "gpus": msgspec.to_builtins(gpus)}), flush=True)
probe.close()
"""


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


def _run_probe(lib_dir: Path | None, env: dict[str, str], rounds: int = 1, close_before: int | None = None
               ) -> list[dict[str, Any]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML_")}
    full.pop("LD_LIBRARY_PATH", None)
    if lib_dir is not None:
        full["LD_LIBRARY_PATH"] = str(lib_dir)
    full["PYTHONPATH"] = str(ROOT)
    full.update(env)
    args = [sys.executable, "-c", _PROBE_SCRIPT, str(rounds)]
    if close_before is not None:
        args.append(str(close_before))
    out = subprocess.run(args, env=full, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _assert_full_gpu(g: dict[str, Any], index: int, pids: int = 0) -> None:
    assert g["index"] == index and g["id"] == f"n1:gpu:{index}"
    assert g["name"] == "Fake RTX 4090"
    assert g["uuid"] == f"GPU-fa4e0000-0000-4000-8000-{index:012d}"
    assert g["memory_total"] == 24 * GiB
    assert g["memory_used"] == GiB + pids * 256 * MiB
    assert g["memory_free"] == g["memory_total"] - g["memory_used"]
    assert (g["utilization_gpu"], g["utilization_memory"]) == (45.0, 30.0)
    assert g["temperature_c"] == 60.0 + index
    assert (g["clock_sm_mhz"], g["clock_memory_mhz"]) == (2520, 10501)
    assert g["compute_capability"] == "8.9"


def test_nvml_two_gpus_with_every_field(fake_nvml_dir: Path) -> None:
    [s] = _run_probe(fake_nvml_dir, {"FAKE_NVML_GPUS": "2"})
    assert s["state"] == {"available": True, "reason": "", "driver_version": "550.54.15",
                          "nvml_version": "12.550.54.15", "cuda_driver_version": "12.4"}
    assert len(s["gpus"]) == 2
    for i, g in enumerate(s["gpus"]):
        _assert_full_gpu(g, i)
        assert g["power_w"] == pytest.approx(123.4)
        assert g["power_limit_w"] == pytest.approx(450.0)
        assert g["processes"] == []


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # each child leads its own group (start_new_session)
        except ProcessLookupError:
            pass
        p.wait()


def _start(children: list[subprocess.Popen[str]], script: str, **env: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(["sh", "-c", script], env={**os.environ, **env}, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    children.append(p)
    return p


def test_nvml_processes_are_tied_to_fabric_ids(fake_nvml_dir: Path, children: list[subprocess.Popen[str]]) -> None:
    spawned = _start(children, "exec sleep 30", FABRIC_PROC_ID="n1:abc")
    # a descendant of a spawned process carries the id through its inherited environment
    parent = _start(children, "sleep 30 & echo $!; wait", FABRIC_PROC_ID="n1:def")
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    worker = _start(children, "exec sleep 30", FABRIC_CORE_ID="7")
    ended = subprocess.Popen(["true"])
    ended.wait()
    stranger = os.getpid()  # this test process: no fabric variable in its environment
    pids = [spawned.pid, grandchild, worker.pid, ended.pid, stranger]
    deadline = time.monotonic() + 5
    # sh's exec (and the background sleep) must have happened before their environ is read
    while time.monotonic() < deadline and not all(
            Path(f"/proc/{p}/comm").exists() and Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
            for p in (spawned.pid, grandchild, worker.pid)):
        time.sleep(0.01)

    [s] = _run_probe(fake_nvml_dir, {"FAKE_NVML_PIDS": ",".join(map(str, pids))})
    g = s["gpus"][0]
    _assert_full_gpu(g, 0, pids=len(pids))
    by_pid = {p["pid"]: p for p in g["processes"]}
    assert list(by_pid) == pids
    assert all(p["kind"] == "compute" and p["used_memory"] == 256 * MiB for p in by_pid.values())
    assert by_pid[spawned.pid]["fabric_id"] == "n1:abc"
    assert by_pid[grandchild]["fabric_id"] == "n1:def"
    assert by_pid[worker.pid]["fabric_id"] == "core:7"
    assert by_pid[stranger]["fabric_id"] == ""
    assert by_pid[ended.pid] == {"pid": ended.pid, "used_memory": 256 * MiB, "kind": "compute",
                                 "name": "", "fabric_id": ""}
    assert by_pid[spawned.pid]["name"] == "sleep"
    assert by_pid[stranger]["name"] == Path(f"/proc/{stranger}/comm").read_text().strip()


def test_fabric_id_prefers_the_process_id_to_the_core_id(children: list[subprocess.Popen[str]]) -> None:
    # a process a warm worker started through the spawner is that process, not the worker
    both = _start(children, "exec sleep 30", FABRIC_CORE_ID="3", FABRIC_PROC_ID="n1:xyz")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{both.pid}/comm").read_text().strip() != "sleep":
        time.sleep(0.01)
    assert fabric_id_of(both.pid) == "n1:xyz"
    assert fabric_id_of(1 << 30) == ""  # no such pid


def test_nvml_unsupported_power_keeps_the_other_figures(fake_nvml_dir: Path) -> None:
    [s] = _run_probe(fake_nvml_dir, {"FAKE_NVML_NO_POWER": "1"})
    assert s["state"]["available"] is True
    [g] = s["gpus"]
    assert (g["power_w"], g["power_limit_w"]) == (-1.0, -1.0)
    _assert_full_gpu(g, 0)


def test_nvml_driver_not_loaded_is_a_state_not_an_error(fake_nvml_dir: Path) -> None:
    samples = _run_probe(fake_nvml_dir, {"FAKE_NVML_INIT_ERROR": "9"}, rounds=2)
    for s in samples:
        assert s["gpus"] == []
        assert s["state"]["available"] is False
        assert "driver not loaded" in s["state"]["reason"].lower()


def test_nvml_lost_gpu_is_dropped_and_the_rest_keeps_reporting(fake_nvml_dir: Path) -> None:
    first, second, third = _run_probe(fake_nvml_dir, {"FAKE_NVML_GPUS": "2", "FAKE_NVML_LOST_AFTER": "1"}, rounds=3)
    assert [g["index"] for g in first["gpus"]] == [0, 1] and first["state"]["reason"] == ""
    for later in (second, third):
        assert later["state"]["available"] is True
        assert "GPU 0" in later["state"]["reason"] and "lost" in later["state"]["reason"]
        [g] = later["gpus"]
        _assert_full_gpu(g, 1)
        assert g["power_w"] == pytest.approx(123.4)


def test_nvml_close_then_sample_initialises_again(fake_nvml_dir: Path) -> None:
    samples = _run_probe(fake_nvml_dir, {"FAKE_NVML_GPUS": "1"}, rounds=3, close_before=1)
    assert [len(s["gpus"]) for s in samples] == [1, 1, 1]
    assert all(s["state"]["available"] for s in samples)


def _real_nvml_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_nvml_without_a_library_says_so() -> None:
    if _real_nvml_present():
        pytest.skip("this machine has a real libnvidia-ml.so.1 (tests/test_gpu_real.py covers it)")
    samples = _run_probe(None, {}, rounds=2)
    for s in samples:
        assert s["gpus"] == []
        assert s["state"]["available"] is False
        assert s["state"]["reason"] == "NVML library not found (no NVIDIA driver installed)"


# -- OpenCL ------------------------------------------------------------------


def test_opencl_finds_pocl_cpu_device() -> None:
    state = opencl_probe("n1")
    assert state.available, state.reason
    assert "Portable Computing Language" in state.platforms
    cpus = [d for d in state.devices if d.type == "CPU" and d.platform == "Portable Computing Language"]
    assert cpus, state.devices
    d = cpus[0]
    assert d.id == f"n1:cl:{d.platform_index}:{d.device_index}"
    assert state.platforms[d.platform_index] == d.platform
    assert 1 <= d.compute_units <= (os.cpu_count() or 1)
    assert 0 < d.global_memory <= _meminfo()["MemTotal"]
    assert d.local_memory > 0
    assert d.max_work_group_size >= 1
    assert d.max_clock_mhz >= 0
    assert d.version.startswith("OpenCL ") and d.driver_version and d.name
    assert len({x.id for x in state.devices}) == len(state.devices)


_OPENCL_SCRIPT = """
import json, msgspec
from fabric.services.gpu_monitor.opencl_probe import probe
print(json.dumps(msgspec.to_builtins(probe("n1"))))
"""


def _run_opencl(env: dict[str, str], pre: str = "") -> dict[str, Any]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    out = subprocess.run([sys.executable, "-c", pre + _OPENCL_SCRIPT], env=full, cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_opencl_without_any_platform(tmp_path: Path) -> None:
    # pyopencl's wheel bundles an ICD loader that also reads the directory it sits in, where
    # pocl-binary-distribution puts pocl.icd: no variable turns that off.  A pyopencl tree
    # of symlinks whose .libs holds only the loader (the loader finds its directory through
    # dladdr, which names the symlink's path) plus an empty vendors dir has no platform at all
    import pyopencl

    real = Path(pyopencl.__file__).parent
    fake = tmp_path / "site" / "pyopencl"
    (fake / ".libs").mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != ".libs":
            (fake / entry.name).symlink_to(entry)
    for lib in (real / ".libs").glob("libOpenCL*"):
        (fake / ".libs" / lib.name).symlink_to(lib)
    vendors = tmp_path / "vendors"
    vendors.mkdir()
    state = _run_opencl({"PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "OCL_ICD_VENDORS": str(vendors)},
                        pre=f"import pyopencl; assert pyopencl.__file__.startswith({str(fake)!r})\n")
    assert state["available"] is False
    assert "PLATFORM_NOT_FOUND_KHR" in state["reason"]
    assert state["devices"] == [] and state["platforms"] == []


def test_opencl_platform_without_devices() -> None:
    # PoCL's own switch: POCL_DEVICES lists the drivers it may use; "none" matches none of them
    state = _run_opencl({"POCL_DEVICES": "none"})
    assert state["available"] is False
    assert "no OpenCL device" in state["reason"]
    assert "Portable Computing Language" in state["platforms"]
    assert state["devices"] == []


def test_opencl_without_pyopencl() -> None:
    state = _run_opencl({}, pre="import sys; sys.modules['pyopencl'] = None\n")
    assert state == {"available": False, "reason": state["reason"], "platforms": [], "devices": []}
    assert "pyopencl is not installed" in state["reason"]


# -- PCI bus ids, and pairing OpenCL devices with NVML GPUs -------------------------


def test_nvml_reports_each_gpus_pci_bus_id(fake_nvml_dir: Path) -> None:
    # the driver writes "00000001:3B:00.0" (8-digit domain, upper case): fabric's form is "0001:3b:00.0"
    [s] = _run_probe(fake_nvml_dir, {"FAKE_NVML_GPUS": "3", "FAKE_NVML_BUS_IDS": "1:3B:00.0,-"})
    assert [(g["index"], g["pci_bus_id"]) for g in s["gpus"]] == [
        (0, "0001:3b:00.0"),
        (1, ""),               # NVML_ERROR_NOT_SUPPORTED for this GPU only: the rest still reports
        (2, "0000:a3:00.0"),   # the fake's default address for index 2
    ]
    _assert_full_gpu(s["gpus"][1], 1)
    assert s["state"]["reason"] == ""


def test_canonical_bus_ids() -> None:
    assert canonical_bus_id("00000000:3B:00.0") == "0000:3b:00.0"     # NVML's busId
    assert canonical_bus_id("0000:3B:00.0") == "0000:3b:00.0"         # NVML's busIdLegacy, lspci -D
    assert canonical_bus_id("3b:1f.7") == "0000:3b:1f.7"              # no domain: domain 0
    assert canonical_bus_id(" 10000:01:00.1\n") == "10000:01:00.1"    # a VMD domain past 16 bits
    for bad in ("", "3b:00", "0000:3b:20.0", "0000:3b:00.8", "zz:00.0", "0000:3b:00.0.0", "0000:123:00.0"):
        assert canonical_bus_id(bad) == "", bad
    assert bus_id(0, 0x3B, 3, 1) == "0000:3b:03.1"
    assert bus_id(0, 256, 0, 0) == "" and bus_id(0, 0, 32, 0) == "" and bus_id(-1, 0, 0, 0) == ""


def test_opencl_pci_bus_id_goes_to_the_driver_itself() -> None:
    # pyopencl refuses cl_khr_pci_bus_info's query without asking the driver: the probe calls
    # clGetDeviceInfo with the device's handle. PoCL's CPU device answers a standard query
    # there, refuses the PCI one, and so has no bus id
    import pyopencl as cl

    from fabric.services.gpu_monitor.opencl_probe import CL_DEVICE_PCI_BUS_INFO_KHR, device_info_raw

    with pytest.raises(cl.LogicError, match="INVALID_VALUE"):
        cl.get_platforms()[0].get_devices()[0].get_info(CL_DEVICE_PCI_BUS_INFO_KHR)
    state = opencl_probe("n1")
    pocl = [(plat, dev) for plat in cl.get_platforms() for dev in plat.get_devices()
            if plat.name.strip() == "Portable Computing Language"]
    assert pocl
    for _, dev in pocl:
        status, raw = device_info_raw(dev, 0x1001, 4)  # CL_DEVICE_VENDOR_ID, a cl_uint
        assert status == 0 and int.from_bytes(raw, "little") == dev.vendor_id
        assert device_info_raw(dev, CL_DEVICE_PCI_BUS_INFO_KHR, 16)[0] == -30  # CL_INVALID_VALUE
    assert all(d.pci_bus_id == "" for d in state.devices if d.platform == "Portable Computing Language")


class _NvidiaAttributes:
    """PoCL's real device (its handle answers the KHR query: INVALID_VALUE) with NVIDIA's attributes on top."""

    def __init__(self, dev: Any, extensions: str, bus: int, slot: int, domain: int | None) -> None:
        self.int_ptr = dev.int_ptr
        self.extensions = extensions
        self.pci_bus_id_nv = bus
        self.pci_slot_id_nv = slot
        self._domain = domain

    @property
    def pci_domain_id_nv(self) -> int:
        if self._domain is None:  # a driver older than the domain query
            import pyopencl as cl

            raise cl.LogicError("clGetDeviceInfo failed: INVALID_VALUE")
        return self._domain


def test_opencl_nvidia_attributes_give_the_bus_id() -> None:
    import pyopencl as cl

    from fabric.services.gpu_monitor.opencl_probe import _pci_bus_id

    dev = cl.get_platforms()[0].get_devices()[0]
    nv = "cl_khr_fp64 cl_nv_device_attribute_query"
    # the slot is device << 3 | function
    assert _pci_bus_id(_NvidiaAttributes(dev, nv, 0x3B, 3 << 3 | 1, 2)) == "0002:3b:03.1"
    assert _pci_bus_id(_NvidiaAttributes(dev, nv, 0x3B, 0, None)) == "0000:3b:00.0"
    # a device that claims cl_khr_pci_bus_info but refuses it falls back to NVIDIA's attributes
    assert _pci_bus_id(_NvidiaAttributes(dev, "cl_khr_pci_bus_info " + nv, 0x1A, 0, 0)) == "0000:1a:00.0"
    # without NVIDIA's extension the attributes are not asked for
    assert _pci_bus_id(_NvidiaAttributes(dev, "cl_khr_fp64", 0x1A, 0, 0)) == ""


def _gpu(index: int, bus: str = "", free: int = -1) -> Gpu:
    return Gpu(index=index, id=f"n1:gpu:{index}", pci_bus_id=bus, memory_free=free)


def _cl(p: int, d: int, kind: str = "GPU", platform: str = "NVIDIA CUDA", bus: str = "") -> OpenCLDevice:
    vendor = "NVIDIA Corporation" if "NVIDIA" in platform else platform
    return OpenCLDevice(id=f"n1:cl:{p}:{d}", platform_index=p, device_index=d, platform=platform, type=kind,
                        vendor=vendor, pci_bus_id=bus)


def _pairs(gpus: list[Gpu], devices: list[OpenCLDevice]) -> tuple[dict[str, tuple[list[str], str]], dict[str, str]]:
    got_gpus, got_devices = pair(gpus, devices)
    assert [g.id for g in got_gpus] == [g.id for g in gpus] and [d.id for d in got_devices] == [d.id for d in devices]
    assert all(g.paired_by == "" and g.opencl_ids == [] for g in gpus)  # the inputs are left alone
    return {g.id: (g.opencl_ids, g.paired_by) for g in got_gpus}, {d.id: d.gpu_id for d in got_devices}


def test_pairing_by_bus_id_whatever_the_orders() -> None:
    # NVML's order and the OpenCL platforms' order differ; an AMD GPU (its own bus id) and
    # PoCL's CPU sit on other platforms, listed first
    gpus = [_gpu(0, "0000:3b:00.0"), _gpu(1, "0000:1a:00.0"), _gpu(2, "0000:86:00.0")]
    devices = [_cl(0, 0, "CPU", "Portable Computing Language"),
               _cl(1, 0, "GPU", "AMD Accelerated Parallel Processing", "0000:c1:00.0"),
               _cl(2, 0, bus="0000:86:00.0"), _cl(2, 1, bus="0000:1a:00.0"), _cl(2, 2, bus="0000:3b:00.0")]
    by_gpu, by_device = _pairs(gpus, devices)
    assert by_gpu == {"n1:gpu:0": (["n1:cl:2:2"], "pci_bus_id"), "n1:gpu:1": (["n1:cl:2:1"], "pci_bus_id"),
                      "n1:gpu:2": (["n1:cl:2:0"], "pci_bus_id")}
    assert by_device == {"n1:cl:0:0": "", "n1:cl:1:0": "", "n1:cl:2:0": "n1:gpu:2", "n1:cl:2:1": "n1:gpu:1",
                         "n1:cl:2:2": "n1:gpu:0"}


def test_pairing_one_gpu_on_two_platforms_and_a_gpu_nvml_lost() -> None:
    # PoCL's CUDA driver and NVIDIA's platform both drive the GPU at 3b: both are it. NVML
    # dropped GPU 0 from this sample: GPU 1 keeps its own device
    gpus = [_gpu(1, "0000:3b:00.0")]
    devices = [_cl(0, 0, bus="0000:1a:00.0"), _cl(0, 1, bus="0000:3b:00.0"),
               _cl(1, 0, "GPU", "Portable Computing Language", "0000:3b:00.0")]
    by_gpu, by_device = _pairs(gpus, devices)
    assert by_gpu == {"n1:gpu:1": (["n1:cl:0:1", "n1:cl:1:0"], "pci_bus_id")}
    assert by_device == {"n1:cl:0:0": "", "n1:cl:0:1": "n1:gpu:1", "n1:cl:1:0": "n1:gpu:1"}


def test_pairing_by_order_only_when_neither_side_has_bus_ids() -> None:
    # no bus id anywhere: NVML's GPU i is the i-th GPU of the NVIDIA platforms (PoCL's CPU and
    # an Intel GPU are not NVIDIA's), and a GPU NVML dropped keeps the others in line
    devices = [_cl(0, 0, "CPU", "Portable Computing Language"), _cl(1, 0, "GPU", "Intel(R) OpenCL Graphics"),
               _cl(2, 0), _cl(2, 1)]
    by_gpu, by_device = _pairs([_gpu(0), _gpu(1)], devices)
    assert by_gpu == {"n1:gpu:0": (["n1:cl:2:0"], "order"), "n1:gpu:1": (["n1:cl:2:1"], "order")}
    assert by_device == {"n1:cl:0:0": "", "n1:cl:1:0": "", "n1:cl:2:0": "n1:gpu:0", "n1:cl:2:1": "n1:gpu:1"}
    by_gpu, by_device = _pairs([_gpu(1)], devices)
    assert by_gpu == {"n1:gpu:1": (["n1:cl:2:1"], "order")}
    # the two sides count different numbers of GPUs: every position would be a guess
    by_gpu, by_device = _pairs([_gpu(0), _gpu(1), _gpu(2)], devices)
    assert {how for _, how in by_gpu.values()} == {"none"} and set(by_device.values()) == {""}


def test_pairing_invents_nothing_when_one_side_has_bus_ids() -> None:
    devices = [_cl(0, 0), _cl(0, 1)]
    for gpus, devs in (([_gpu(0, "0000:3b:00.0"), _gpu(1, "0000:1a:00.0")], devices),  # OpenCL cannot say
                       ([_gpu(0), _gpu(1)], [_cl(0, 0, bus="0000:3b:00.0"), _cl(0, 1, bus="0000:1a:00.0")]),
                       ([_gpu(0, "0000:3b:00.0"), _gpu(1)], devices)):  # one NVML GPU cannot say either
        by_gpu, by_device = _pairs(gpus, devs)
        assert by_gpu == {"n1:gpu:0": ([], "none"), "n1:gpu:1": ([], "none")}
        assert set(by_device.values()) == {""}
    # a bus id no OpenCL device has (a GPU OpenCL does not drive) and one two NVML GPUs claim
    by_gpu, by_device = _pairs([_gpu(0, "0000:3b:00.0"), _gpu(1, "0000:3b:00.0"), _gpu(2, "0000:5e:00.0")],
                               [_cl(0, 0, bus="0000:3b:00.0")])
    assert {how for _, how in by_gpu.values()} == {"none"} and by_device == {"n1:cl:0:0": ""}


def test_gpu_by_device_reads_the_recorded_pairing_else_pairs() -> None:
    gpus = [_gpu(0, "0000:3b:00.0"), _gpu(1, "0000:1a:00.0")]
    devices = [_cl(0, 0, bus="0000:1a:00.0"), _cl(0, 1, bus="0000:3b:00.0")]
    assert {k: g.id for k, g in gpu_by_device(gpus, devices).items()} == {"n1:cl:0:0": "n1:gpu:1",
                                                                          "n1:cl:0:1": "n1:gpu:0"}
    # a monitor that paired recorded it: its answer stands (here one this client could not derive)
    recorded = [msgspec.structs.replace(gpus[0], paired_by="none"),
                msgspec.structs.replace(gpus[1], paired_by="pci_bus_id", opencl_ids=["n1:cl:0:1"])]
    devices = [_cl(0, 0), msgspec.structs.replace(_cl(0, 1), gpu_id="n1:gpu:1")]
    assert {k: g.id for k, g in gpu_by_device(recorded, devices).items()} == {"n1:cl:0:1": "n1:gpu:1"}


_PAIR_SCRIPT = """
import json, msgspec
from fabric.gpupair import pair_state
from fabric.services.gpu_monitor.nvml import NvmlProbe
from fabric.services.gpu_monitor.opencl_probe import probe
nvml = NvmlProbe()
state, gpus = nvml.sample("n1")
nvml.close()
gpus, opencl = pair_state(gpus, probe("n1"))
print(json.dumps({"gpus": msgspec.to_builtins(gpus), "opencl": msgspec.to_builtins(opencl)}))
"""


def test_pairing_the_real_probes(fake_nvml_dir: Path) -> None:
    # what the gpu-monitor pairs: the fake NVML's GPUs (bus ids) and this machine's real OpenCL
    # devices -- PoCL's CPU, no bus id -- so no GPU is paired, and none by a guessed order
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML_")}
    env.update(LD_LIBRARY_PATH=str(fake_nvml_dir), PYTHONPATH=str(ROOT), FAKE_NVML_GPUS="2",
               FAKE_NVML_BUS_IDS="0000:3B:00.0,0000:1A:00.0")
    out = subprocess.run([sys.executable, "-c", _PAIR_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [(g["pci_bus_id"], g["opencl_ids"], g["paired_by"]) for g in got["gpus"]] == [
        ("0000:3b:00.0", [], "none"), ("0000:1a:00.0", [], "none")]
    assert got["opencl"]["devices"] and all(d["gpu_id"] == "" and d["pci_bus_id"] == ""
                                            for d in got["opencl"]["devices"])
