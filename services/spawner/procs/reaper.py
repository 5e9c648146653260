"""Ending a process whole: signals to its whole tree, reaping the leader, and the exit it reports.

When the leader exits, is killed, times out, or the spawner stops, the whole process
group gets SIGKILL -- while the leader is still an unreaped zombie, so its pid (the
group id) cannot have been reused -- plus every descendant psutil saw outside the
group and every member of the process's cgroup when it has one.  Only then is the
leader reaped (``wait4`` on its own pid: nobody else's children are ever reaped) and,
once both pipes reach EOF, the exit made (:func:`exit_info`) and its waiters woken.
The table (:mod:`.table`) calls these in that order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil

from fabric.schema import ExitInfo

from .model import ManagedProcess

__all__ = ["signal_tree", "reap", "exit_info", "wake_waiters", "wait"]


def signal_tree(mp: ManagedProcess, sig: int, reason: str | None = "killed") -> bool:
    """Send *sig* to the process's whole group (and strays); False if it already ended."""
    if not mp.running or mp.reaped:
        return False
    if reason is not None and mp.kill_reason is None:
        mp.kill_reason = reason
    strays: list[int] = []
    try:
        # descendants that moved to another group or session still belong to the process
        strays = [c.pid for c in psutil.Process(mp.pid).children(recursive=True)]
    except psutil.Error:
        pass
    try:
        os.killpg(mp.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in strays:
        try:
            if os.getpgid(pid) != mp.pid:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    if sig == signal.SIGKILL and mp.cgroup is not None:
        mp.cgroup.kill_all()
    return True


def reap(mp: ManagedProcess) -> None:
    """The leader exited (its pidfd is readable): kill what is left of the process, then reap the leader."""
    # The leader is a zombie now, not yet reaped: its pid -- the group id -- cannot
    # be reused, so killing the group reaches exactly what is left of the process.
    try:
        os.killpg(mp.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if mp.cgroup is not None:
        mp.cgroup.kill_all()
    try:
        _, status, rusage = os.wait4(mp.pid, 0)
    except ChildProcessError:  # reaped by someone else: report what we can
        status, rusage = 0, None
    os.close(mp.pidfd)
    mp.pidfd = -1
    mp.reaped = True
    mp.status_raw, mp.rusage = status, rusage
    if mp.wall_timer is not None:
        mp.wall_timer.cancel()
        mp.wall_timer = None


def exit_info(mp: ManagedProcess, max_rss: int, max_rss_exact: bool) -> ExitInfo:
    """The exit of a reaped process whose pipes are closed: code or signal, why, usage, tails."""
    code = os.waitstatus_to_exitcode(mp.status_raw)
    exit_code, sig = (code, None) if code >= 0 else (None, -code)
    ru = mp.rusage
    cpu_s = (ru.ru_utime + ru.ru_stime) if ru is not None else 0.0
    if sig is None:
        reason = "exited"
    elif mp.kill_reason is not None:
        reason = mp.kill_reason
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and mp.plan.cpu_s is not None
                                   and cpu_s >= mp.plan.cpu_s * 0.8):  # rusage lags the rlimit's clock
        reason = "cpu_limit"
    elif mp.cgroup is not None and mp.cgroup.oom_killed():
        reason = "memory_limit"
    else:
        reason = "signaled"
    if mp.cgroup is not None:
        mp.cgroup.remove()
    return ExitInfo(
        id=mp.id, exit_code=exit_code, signal=sig, reason=reason, cpu_s=round(cpu_s, 6), max_rss=max_rss,
        max_rss_exact=max_rss_exact,
        duration_s=round(time.monotonic() - mp.t0, 6), stdout=bytes(mp.stdout.buf), stderr=bytes(mp.stderr.buf),
        stdout_total=mp.stdout.total, stderr_total=mp.stderr.total,
    )


def wake_waiters(mp: ManagedProcess) -> None:
    """The exit is known: resolve every wait request, then set ``done``."""
    for fut in mp.waiters:
        if not fut.done():
            fut.set_result(None)
    mp.waiters.clear()
    mp.done.set()


async def wait(mp: ManagedProcess, timeout: float) -> ExitInfo | None:
    """The exit, waiting up to *timeout* seconds for it (None if still running then)."""
    if mp.exit is None and timeout > 0:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        mp.waiters.append(fut)
        # a timer and a future, not wait_for(): no extra task on the spawn-and-wait path
        timer = loop.call_later(timeout, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if fut in mp.waiters:
                mp.waiters.remove(fut)
    return mp.exit


def _resolve(fut: asyncio.Future[None]) -> None:
    """Wake a waiter (a timer's callback): a no-op once something else resolved it."""
    if not fut.done():
        fut.set_result(None)
