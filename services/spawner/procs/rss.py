"""Peak memory of a spawned process: samples while it runs, and the one number its exit reports.

``wait4``'s ``ru_maxrss`` is not the child's alone: at ``execve`` Linux folds the
high-water RSS of the mm being left -- the spawner's, shared through ``CLONE_VM`` (a
fork's copy would be as large) -- into the child's ``maxrss``.  So ``ru_maxrss`` is the
child's own peak only when it is above the spawner's ``VmHWM`` at the exec (the
"inherited floor"; a ``VmHWM`` read after the exec is an upper bound of it, since a
high-water mark only grows).  Then, or when the process had a memory cgroup (its peak
counts the tree alone), ``max_rss`` is exact.  Otherwise the child's peak is below the
floor and rusage cannot tell it: ``max_rss`` is the largest sample taken while it ran
(the child's ``VmHWM`` just after exec -- at least the stack its argv and environment
were copied to -- then every :data:`RSS_SAMPLE_S` and at each status/list look), a lower
bound, and ``max_rss_exact`` is false.  Never the spawner's own memory.  (Both reads of
the spawner's peak are the kernel's per-CPU RSS counters, which may drift apart by
:data:`FLOOR_SLACK`: a peak counts as above the floor only beyond that margin.)
"""

from __future__ import annotations

import asyncio
import os
import time

from .model import ManagedProcess

__all__ = ["PeakRss", "vm_hwm", "exec_stack_bytes", "RSS_SAMPLE_S", "FLOOR_SLACK"]

#: seconds between samples of the live processes' peak RSS (``VmHWM``)
RSS_SAMPLE_S = 1.0
#: how far two reads of one mm's RSS may drift apart by the kernel's per-CPU counters
#: alone (file, anon, shmem; each CPU holds back up to a batch of max(32, 2*CPUs) pages,
#: at the exec's read and at ours): rusage counts as the child's own only above this margin
FLOOR_SLACK = 2 * 3 * (os.cpu_count() or 1) * max(32, 2 * (os.cpu_count() or 1)) * os.sysconf("SC_PAGE_SIZE")


def _proc_kb(path: str, key: bytes) -> int:
    """The ``key: N kB`` line of a /proc file, in bytes; 0 when absent or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        data = os.read(fd, 8192)
    except OSError:
        return 0
    finally:
        os.close(fd)
    i = data.find(key)
    if i < 0:
        return 0
    try:
        return int(data[i + len(key):data.index(b"kB", i)]) * 1024
    except ValueError:
        return 0


def vm_hwm(pid: int | str) -> int:
    """``VmHWM`` of *pid* (or ``"self"``) in bytes: the peak RSS of its current mm; 0 when gone (or a zombie).

    The kernel's RSS counters are per-CPU and read approximately: a tiny process may read 0.
    """
    return _proc_kb(f"/proc/{pid}/status", b"VmHWM:")


def exec_stack_bytes(argv: list[str], env_bytes: int, env_count: int) -> int:
    """Bytes of resident stack every exec'd process has had: argv and envp copied there, page-rounded.

    A lower bound of any process's peak RSS that needs no sample (it may end before one).
    """
    n = sum(len(a) + 1 for a in argv) + env_bytes + 8 * (len(argv) + env_count + 2)
    return (n + 4095) // 4096 * 4096


class PeakRss:
    """The inherited floor (the spawner's own ``VmHWM``), the sampler, and each exit's peak."""

    def __init__(self) -> None:
        #: the spawner's own VmHWM (bytes) and when it was read (monotonic): the inherited floor
        self._floor = 0
        self._floor_at = 0.0

    @staticmethod
    async def sample_loop(live: dict[str, ManagedProcess]) -> None:
        """Every :data:`RSS_SAMPLE_S`: each live leader's VmHWM (its pid is ours until we reap it)."""
        while True:
            await asyncio.sleep(RSS_SAMPLE_S)
            for mp in list(live.values()):
                if not mp.reaped:
                    mp.rss_sample = max(mp.rss_sample, vm_hwm(mp.pid))

    def peak(self, mp: ManagedProcess) -> tuple[int, bool]:
        """(max_rss, exact) of a reaped process: never the spawner's memory (see the module docstring)."""
        exact = 0
        ru = mp.rusage
        ru_rss = ru.ru_maxrss * 1024 if ru is not None else 0
        if ru_rss > self._floor + FLOOR_SLACK and self._floor_at < mp.t0:
            # the cached floor may predate the exec (the spawner grew since): read it again
            self._floor, self._floor_at = vm_hwm("self"), time.monotonic()
        # above the inherited floor: the child's own (or its largest reaped child's)
        if ru_rss > self._floor + FLOOR_SLACK:
            exact = ru_rss
        if mp.cgroup is not None:  # the tree's own charge, exact whatever the floor
            exact = max(exact, mp.cgroup.peak())
        if exact >= mp.rss_sample and exact > 0:
            return exact, True
        return mp.rss_sample, False
