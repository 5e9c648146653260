"""NVIDIA GPUs through NVML (``pynvml``, PyPI ``nvidia-ml-py``): one :class:`NvmlProbe` per monitor.

No library, no driver and no GPU are normal states of a node, not errors:
:meth:`NvmlProbe.sample` then answers ``NvmlState(available=False, reason=...)`` and
no GPUs, and never raises.  Each figure is read on its own, so a device that does
not support one (power on many laptop and older boards) still reports the rest; a
GPU that falls off the bus is left out of that sample and named in ``reason``.
Each GPU carries its PCI address (``pci_bus_id``), which ties it to its OpenCL
device (:mod:`fabric.gpupair`).

A process on a GPU is tied back to fabric through its environment: the spawner
sets ``FABRIC_PROC_ID`` in every process it starts (its children inherit it) and a
warm-pool worker carries ``FABRIC_CORE_ID``.

>>> probe = NvmlProbe()
>>> state, gpus = probe.sample("node-a")
>>> state.available or state.reason      # e.g. "NVML library not found (no NVIDIA driver installed)"
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

from fabric.gpupair import canonical_bus_id
from fabric.protocol.env import CORE_ID_ENV, PROC_ENV
from fabric.schema import Gpu, GpuProcess, NvmlState

__all__ = ["NvmlProbe", "fabric_id_of"]

T = TypeVar("T")

# the markers services/spawner sets on its processes and core workers (the contract's names)
_PROC_ENV = f"{PROC_ENV}=".encode()
_CORE_ENV = f"{CORE_ID_ENV}=".encode()

# NVML return codes (nvml.h; pynvml has the same constants, but it may be missing)
_UNINITIALIZED = 1
_NO_PERMISSION = 4
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_GPU_IS_LOST = 15
_RESET_REQUIRED = 16
_LIB_RM_VERSION_MISMATCH = 18
_GPU_NOT_FOUND = 28
_UNKNOWN = 999

#: the device is gone (or wedged): drop it from this sample, keep the others
_GPU_GONE = frozenset({_GPU_IS_LOST, _RESET_REQUIRED, _GPU_NOT_FOUND, _UNKNOWN})
#: NVML itself stopped answering: shut it down and initialise again at the next sample
_NVML_GONE = frozenset({_UNINITIALIZED, _DRIVER_NOT_LOADED})

_INIT_REASONS = {
    _LIBRARY_NOT_FOUND: "NVML library not found (no NVIDIA driver installed)",
    _DRIVER_NOT_LOADED: "NVIDIA driver not loaded (NVML: Driver Not Loaded)",
    _NO_PERMISSION: "no permission to use NVML",
    _LIB_RM_VERSION_MISMATCH: "NVML library and NVIDIA kernel driver versions differ (reload the driver or reboot)",
}

#: while NVML cannot start, how often to try again (a driver may be loaded later);
#: every second would dlopen-search the library paths at every heartbeat for nothing
RETRY_INIT_S = 30.0


class _GpuGone(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def fabric_id_of(pid: int) -> str:
    """The fabric process id (or ``core:<id>``) in *pid*'s environment; "" when none or unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read()
    except OSError:  # gone, or another user's process (reading environ needs ptrace rights)
        return ""
    core = ""
    for entry in env.split(b"\0"):
        if entry.startswith(_PROC_ENV):
            # a process the spawner started (or its descendant) is that process, even when
            # a warm worker started it: the finer grain wins
            return entry[len(_PROC_ENV):].decode(errors="replace")
        if entry.startswith(_CORE_ENV):
            core = "core:" + entry[len(_CORE_ENV):].decode(errors="replace")
    return core


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return ""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"  # 12040 -> "12.4"


def _bus_id(pci: Any) -> str:
    """``pciInfo.busId`` (``00000000:3B:00.0``) as fabric.gpupair writes it: what pairs this GPU with OpenCL."""
    return canonical_bus_id(_text(pci.busId))


def _system(read: Callable[[], str]) -> str:
    """A driver-wide text figure, or "" when NVML cannot say."""
    try:
        return read()
    except Exception:  # NVMLError, or an older library without the function
        return ""


class NvmlProbe:
    """Initialises NVML once and samples every GPU; safe to call from several threads."""

    def __init__(self, retry_init_s: float = RETRY_INIT_S) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None          # the pynvml module once nvmlInit succeeded
        self._state = NvmlState(available=False, reason="NVML not initialised yet")
        self._retry_init_s = retry_init_s
        self._next_init = 0.0           # monotonic time of the next init attempt

    # -- lifecycle ----------------------------------------------------------

    def _init(self) -> bool:
        """Start NVML; on failure remember why and when to try again."""
        self._next_init = time.monotonic() + self._retry_init_s
        try:
            import pynvml
        except ImportError:
            self._state = NvmlState(available=False, reason="pynvml (nvidia-ml-py) is not installed")
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._state = NvmlState(available=False,
                                    reason=_INIT_REASONS.get(exc.value, f"NVML initialisation failed: {exc}"))
            return False
        except OSError as exc:  # a library that loads but is not NVML (missing symbols, wrong arch)
            self._state = NvmlState(available=False, reason=f"NVML library unusable: {exc}")
            return False
        self._nvml = pynvml
        self._state = NvmlState(
            available=True,
            driver_version=_system(lambda: _text(pynvml.nvmlSystemGetDriverVersion())),
            nvml_version=_system(lambda: _text(pynvml.nvmlSystemGetNVMLVersion())),
            cuda_driver_version=_system(lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion())),
        )
        return True

    def close(self) -> None:
        """Shut NVML down (the library stays loaded); a later sample initialises it again."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass  # already gone with the driver: nothing left to release
        self._next_init = 0.0

    # -- sampling -----------------------------------------------------------

    def sample(self, node: str) -> tuple[NvmlState, list[Gpu]]:
        """NVML's state and every GPU that answered; never raises for a missing or failing GPU."""
        with self._lock:
            if self._nvml is None:
                if time.monotonic() < self._next_init or not self._init():
                    return self._state, []
            nvml = self._nvml
            try:
                count = nvml.nvmlDeviceGetCount()
            except nvml.NVMLError as exc:
                self._shutdown()  # NVML itself failed: initialise again at the next sample
                return NvmlState(available=False, reason=f"NVML stopped answering: {exc}"), []
            if count == 0:
                return self._with_reason("NVML found no NVIDIA GPU"), []
            gpus: list[Gpu] = []
            problems: list[str] = []
            for index in range(count):
                try:
                    gpus.append(self._gpu(nvml, node, index))
                except _GpuGone as gone:
                    problems.append(f"GPU {index} dropped: {gone}")
                    if gone.code in _NVML_GONE:
                        self._shutdown()
                        problems.append("NVML will be initialised again")
                        break
            return self._with_reason("; ".join(problems)), gpus

    def _with_reason(self, reason: str) -> NvmlState:
        s = self._state
        return NvmlState(available=s.available, reason=reason, driver_version=s.driver_version,
                         nvml_version=s.nvml_version, cuda_driver_version=s.cuda_driver_version)

    def _optional(self, read: Callable[[], T], default: T) -> T:
        """One figure: the device's answer, or *default* when it cannot say; a lost GPU propagates."""
        import pynvml

        try:
            return read()
        except pynvml.NVMLError as exc:
            if exc.value in _GPU_GONE or exc.value in _NVML_GONE:
                raise _GpuGone(exc.value, str(exc)) from None
            return default  # NotSupported, NoPermission, ...: this figure only
        except (pynvml.NVMLLibraryMismatchError, ArithmeticError, TypeError, ValueError, OSError):
            # a driver older than pynvml's versioned entry points, or an answer ctypes
            # cannot convert: this figure is unknown, the others still count
            return default

    def _gpu(self, nvml: Any, node: str, index: int) -> Gpu:
        opt = self._optional
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            raise _GpuGone(exc.value, str(exc)) from None
        gpu = Gpu(index=index, id=f"{node}:gpu:{index}",
                  uuid=opt(lambda: _text(nvml.nvmlDeviceGetUUID(h)), ""),
                  name=opt(lambda: _text(nvml.nvmlDeviceGetName(h)), ""),
                  pci_bus_id=opt(lambda: _bus_id(nvml.nvmlDeviceGetPciInfo(h)), ""))
        mem = opt(lambda: self._memory(nvml, h), None)
        if mem is not None:
            gpu.memory_total, gpu.memory_used, gpu.memory_free = int(mem.total), int(mem.used), int(mem.free)
        util = opt(lambda: nvml.nvmlDeviceGetUtilizationRates(h), None)
        if util is not None:
            gpu.utilization_gpu, gpu.utilization_memory = float(util.gpu), float(util.memory)
        gpu.temperature_c = float(opt(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU), -1))
        # NVML speaks milliwatts
        gpu.power_w = opt(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0, -1.0)
        gpu.power_limit_w = opt(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0, -1.0)
        gpu.clock_sm_mhz = int(opt(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM), -1))
        gpu.clock_memory_mhz = int(opt(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM), -1))
        cc = opt(lambda: nvml.nvmlDeviceGetCudaComputeCapability(h), None)
        if cc is not None:
            gpu.compute_capability = f"{cc[0]}.{cc[1]}"
        procs: list[GpuProcess] = []
        for kind, read in (("compute", nvml.nvmlDeviceGetComputeRunningProcesses),
                           ("graphics", nvml.nvmlDeviceGetGraphicsRunningProcesses)):
            found: list[Any] = opt(functools.partial(read, h), [])
            for p in found:
                used = p.usedGpuMemory
                procs.append(GpuProcess(pid=int(p.pid), used_memory=int(used) if used is not None else -1,
                                        kind=kind, name=_process_name(p.pid), fabric_id=fabric_id_of(p.pid)))
        gpu.processes = procs
        return gpu

    @staticmethod
    def _memory(nvml: Any, h: Any) -> Any:
        # v2 keeps the driver's reserved memory out of "used" (what a job can still get);
        # drivers older than 510 only have v1
        try:
            return nvml.nvmlDeviceGetMemoryInfo(h, version=nvml.nvmlMemory_v2)
        except nvml.NVMLError as exc:
            if exc.value in _GPU_GONE or exc.value in _NVML_GONE:
                raise
            return nvml.nvmlDeviceGetMemoryInfo(h)
