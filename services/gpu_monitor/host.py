"""What the node is (:func:`host_info`, once at start) and how it is now (:class:`LiveSampler`).

The gpu-monitor calls :func:`host_info` when it starts and :meth:`LiveSampler.sample`
at every heartbeat (once a second by default), so a sample must stay cheap: it reads
``/proc/stat``, ``/proc/meminfo`` (twice, psutil's memory and swap), ``/proc/net/dev``
and one ``statvfs`` per filesystem, and keeps the previous counters itself so that
rates are "since the previous sample" without a sleeping ``interval``.  A figure the
node cannot measure is -1, never a guess (see the schema's telemetry section).

>>> s = LiveSampler(["/"])
>>> cpu, mem, disks, net = s.sample()   # the first call primes the CPU and net rates
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import sysconfig
import time
from collections.abc import Sequence
from typing import Any

import psutil

from fabric import _version
from fabric.hostid import boot_id
from fabric.schema import CpuLive, DiskLive, HostInfo, MemoryLive, NetLive

__all__ = ["host_info", "LiveSampler"]

#: loopback traffic is the node talking to itself (NATS on 127.0.0.1, for one): not network load
_LOOPBACK = frozenset({"lo"})


def _cpu_model() -> str:
    """The first ``model name`` in /proc/cpuinfo (x86), else other arches' names, else platform's."""
    try:
        with open("/proc/cpuinfo") as fh:
            fields: dict[str, str] = {}
            for line in fh:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    # "model name" on x86 and most arm64 kernels; "Hardware"/"cpu model"/"cpu" on others
    for key in ("model name", "Hardware", "cpu model", "cpu"):
        if fields.get(key):
            return fields[key]
    return platform.processor()


def _python_tag() -> str:
    """``cpython-311-x86_64-linux-gnu``: what a native extension built here must match."""
    soabi = sysconfig.get_config_var("SOABI")
    return str(soabi) if soabi else f"{sys.implementation.cache_tag}-{platform.machine()}"


def host_info(node: str) -> HostInfo:
    """The node's identity and size, measured once when the monitor starts."""
    physical = psutil.cpu_count(logical=False)
    return HostInfo(
        hostname=socket.gethostname(),
        node=node,
        architecture=platform.machine(),
        os=platform.system().lower(),
        os_release=platform.release(),
        cpu_model=_cpu_model(),
        cpu_cores=psutil.cpu_count(logical=True) or -1,
        cpu_physical_cores=physical if physical else -1,
        ram_bytes=psutil.virtual_memory().total,
        python=_python_tag(),
        fabric_version=_version.__version__,
        host_id=boot_id(),
        boot_time_s=psutil.boot_time(),
    )


def _busy_percent(before: Any, after: Any) -> float:
    """psutil.cpu_percent's figure for one CPU: busy time over all time between two readings.

    *before* and *after* are ``psutil.cpu_times(percpu=True)`` entries: named tuples
    whose fields differ by platform (hence Any).
    """
    def split(t: Any) -> tuple[float, float]:
        total = float(sum(t))
        # guest time is already counted in user time (Linux), so it is not added twice
        total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total, total - idle

    total0, busy0 = split(before)
    total1, busy1 = split(after)
    if total1 <= total0:  # no tick elapsed (two calls within 10 ms), or a CPU came back online
        return 0.0
    return round(min(100.0, max(0.0, (busy1 - busy0) / (total1 - total0) * 100.0)), 1)


class LiveSampler:
    """Samples CPU, memory, the given filesystems and the network; rates since the previous call.

    Not thread-safe: one caller (the monitor's heartbeat loop) owns it.
    """

    def __init__(self, disk_paths: Sequence[str] = ("/",)) -> None:
        self.disk_paths = list(dict.fromkeys(os.fspath(p) for p in disk_paths))
        # our own previous per-CPU times (psutil.cpu_percent keeps one module-wide state that
        # any other caller in the process would reset); the first sample measures from here
        self._cpu_prev = psutil.cpu_times(percpu=True)
        self._net_prev: tuple[float, int, int] | None = None

    @staticmethod
    def _read_freq() -> float:
        try:
            freq = psutil.cpu_freq()
        except (OSError, NotImplementedError, RuntimeError):
            return -1.0
        return float(freq.current) if freq and freq.current > 0 else -1.0

    def sample(self) -> tuple[CpuLive, MemoryLive, list[DiskLive], NetLive]:
        return self._cpu(), self._memory(), self._disks(), self._net()

    def _cpu(self) -> CpuLive:
        now = psutil.cpu_times(percpu=True)
        per_core = [_busy_percent(a, b) for a, b in zip(self._cpu_prev, now, strict=False)]
        self._cpu_prev = now
        # logical CPUs all tick at the same rate, so the whole machine is their mean: one
        # read of /proc/stat instead of psutil keeping a second, separate state
        overall = round(sum(per_core) / len(per_core), 1) if per_core else -1.0
        try:
            load_1, load_5, load_15 = os.getloadavg()
        except OSError:
            load_1 = load_5 = load_15 = -1.0
        return CpuLive(percent=overall, per_core=per_core, load_1=load_1, load_5=load_5, load_15=load_15,
                       freq_mhz=self._read_freq())

    @staticmethod
    def _memory() -> MemoryLive:
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        return MemoryLive(total=vm.total, available=vm.available, used=vm.used, percent=vm.percent,
                          swap_total=sw.total, swap_used=sw.used, swap_percent=sw.percent)

    def _disks(self) -> list[DiskLive]:
        seen: set[int] = set()
        out: list[DiskLive] = []
        for path in self.disk_paths:
            try:
                dev = os.stat(path).st_dev
                if dev in seen:  # the state dir on the root filesystem: one entry, not two
                    continue
                usage = psutil.disk_usage(path)
            except OSError:
                # a path that is gone (an unmounted volume) reads as unknown, not as empty
                out.append(DiskLive(path=path, total=-1, used=-1, free=-1, percent=-1.0))
                continue
            seen.add(dev)
            out.append(DiskLive(path=path, total=usage.total, used=usage.used, free=usage.free,
                                percent=usage.percent))
        return out

    def _net(self) -> NetLive:
        now = time.monotonic()
        sent = recv = psent = precv = 0
        for name, c in psutil.net_io_counters(pernic=True, nowrap=True).items():
            if name in _LOOPBACK:
                continue
            sent += c.bytes_sent
            recv += c.bytes_recv
            psent += c.packets_sent
            precv += c.packets_recv
        sent_rate = recv_rate = 0.0
        if self._net_prev is not None:
            t0, sent0, recv0 = self._net_prev
            dt = now - t0
            if dt > 0:
                # an interface that disappears makes the sum go down: that is no negative rate
                sent_rate = max(0.0, (sent - sent0) / dt)
                recv_rate = max(0.0, (recv - recv0) / dt)
        self._net_prev = (now, sent, recv)
        return NetLive(bytes_sent=sent, bytes_recv=recv, packets_sent=psent, packets_recv=precv,
                       sent_per_s=sent_rate, recv_per_s=recv_rate)
