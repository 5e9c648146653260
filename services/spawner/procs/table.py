"""The process table of one spawner: what the endpoints call, composed of the parts that do the work.

:class:`ProcessTable` takes its configuration at construction (:class:`~.model.TableSettings`)
and joins the parts, each of which imports only :mod:`.model` (and :mod:`.rss`):
:mod:`.launch` starts a process, :mod:`.output` reads its pipes and publishes, and
writes its stdin, :mod:`.reaper` ends it whole and makes its exit, :mod:`.sweeper`
kills what escapes, :mod:`.rss` measures its peak memory.  The exit arrives through a
pidfd registered with the event loop, the output through non-blocking pipes, all
with ``loop.add_reader``: no thread, no SIGCHLD handler, no child watcher.
"""

from __future__ import annotations

import asyncio
import collections
import signal

import msgspec
import psutil
import structlog

from fabric.errors import UnknownProcess
from fabric.schema import JSON, ExitInfo, ProcStatus, SpawnRequest
from fabric.service_tasks import BackgroundTasks

from ..cgroups import CgroupRoot
from ..limits import Plan
from . import reaper
from .launch import Launcher, abandon, spawn_error
from .model import PIPE_DRAIN_S, ManagedProcess, Publish, TableSettings
from .output import OutputPump
from .rss import PeakRss, vm_hwm
from .sweeper import OrphanSweeper

__all__ = ["ProcessTable", "KEEP_FINISHED", "STOP_GRACE_S"]

#: finished processes kept for wait/info
KEEP_FINISHED = 4096
#: SIGTERM grace before SIGKILL when the spawner stops
STOP_GRACE_S = 1.0


class ProcessTable:
    """Every process of one spawner: spawn, signal, stdin, list, wait, stop all."""

    def __init__(self, node: str, publish: Publish, *, marker: str, cgroups: CgroupRoot | None,
                 settings: TableSettings | None = None) -> None:
        self.node = node
        self.marker = marker
        self.cgroups = cgroups
        self.settings = settings if settings is not None else TableSettings()
        self.live: dict[str, ManagedProcess] = {}
        self.finished: collections.OrderedDict[str, ManagedProcess] = collections.OrderedDict()
        self.spawned = 0
        self._launcher = Launcher(node, marker, cgroups)
        self._output = OutputPump(publish, self.live, self._finish)
        self._sweeper = OrphanSweeper(marker, self.live, self.settings)
        self._rss = PeakRss()
        # the table's own: its loops must outlive the service's (stop() drains output through them)
        self._tasks = BackgroundTasks(structlog.get_logger(component="process-table", node=node))

    def start(self) -> None:
        self._sweeper.start()
        self._tasks.start(self._sweeper.loop, name="orphan-sweeper")
        self._tasks.start(self._output.publish_loop, name="output-publisher")
        self._tasks.start(lambda: self._rss.sample_loop(self.live), name="rss-sampler")

    # -- lookup ---------------------------------------------------------------------

    def get(self, proc_id: str) -> ManagedProcess:
        node, _, local = proc_id.partition(":")
        if node != self.node:
            raise UnknownProcess(f"process {proc_id} does not belong to node {self.node}", id=proc_id)
        mp = self.live.get(local) or self.finished.get(local)
        if mp is None:
            raise UnknownProcess(f"no process {proc_id} on node {self.node} (never spawned here, or forgotten)",
                                 id=proc_id)
        return mp

    # -- spawning --------------------------------------------------------------------

    def spawn(self, req: SpawnRequest, plan: Plan, executable: str | None = None) -> ManagedProcess:
        """Start *req* under *plan*; *executable* overrides the lookup of argv[0] (native blobs)."""
        started = self._launcher.start(req, plan, executable)
        mp = started.mp
        try:
            self._watch(mp, started.out_r, started.err_r, started.in_w)
        except OSError as exc:  # no pidfd: it cannot be watched, so it must not run
            abandon(mp, started.out_r, started.err_r, started.in_w)
            raise spawn_error(req, exc) from None
        self.spawned += 1
        self.live[mp.local] = mp
        if req.stdin:
            self.write_stdin(mp, req.stdin, eof=not req.stdin_open)
        elif req.stdin is not None and not req.stdin_open:
            self._output.close_stdin(mp)
        return mp

    def _watch(self, mp: ManagedProcess, out_r: int, err_r: int, in_w: int) -> None:
        loop = asyncio.get_running_loop()
        self._output.attach(mp, out_r, err_r, in_w)
        loop.add_reader(mp.pidfd, self._on_exit, mp)
        self._output.read(mp)
        if mp.plan.wall_s is not None:
            mp.wall_timer = loop.call_later(mp.plan.wall_s, self._on_wall_timeout, mp)

    def write_stdin(self, mp: ManagedProcess, data: bytes, *, eof: bool = False) -> int:
        return self._output.write_stdin(mp, data, eof=eof)

    # -- ending ---------------------------------------------------------------------

    def signal(self, mp: ManagedProcess, sig: int, reason: str | None = "killed") -> bool:
        """Send *sig* to the process's whole group (and strays); False if it already ended."""
        return reaper.signal_tree(mp, sig, reason)

    def _on_wall_timeout(self, mp: ManagedProcess) -> None:
        mp.wall_timer = None
        reaper.signal_tree(mp, signal.SIGKILL, "timeout")

    def _on_exit(self, mp: ManagedProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(mp.pidfd)
        reaper.reap(mp)
        if mp.stdin_fd >= 0:
            self._output.close_stdin(mp)
        if mp.out_fd < 0 and mp.err_fd < 0:
            self._finish(mp)
        else:
            # a descendant outside the group may hold the pipes: read what is there, then stop
            mp.drain_timer = loop.call_later(PIPE_DRAIN_S, self._give_up_pipes, mp)

    def _give_up_pipes(self, mp: ManagedProcess) -> None:
        mp.drain_timer = None
        for stream in ("stdout", "stderr"):
            self._output.close_stream(mp, stream)
        if mp.exit is None:
            self._finish(mp)

    def _finish(self, mp: ManagedProcess) -> None:
        if mp.exit is not None:
            return
        if mp.drain_timer is not None:
            mp.drain_timer.cancel()
            mp.drain_timer = None
        max_rss, max_rss_exact = self._rss.peak(mp)
        mp.exit = reaper.exit_info(mp, max_rss, max_rss_exact)
        mp.members.clear()
        self.live.pop(mp.local, None)
        self.finished[mp.local] = mp
        while len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)
        if mp.announce or mp.stream_to:
            self._output.queue_exit(mp, JSON.encode(self.fit(mp.exit)))
        # waiters first (a one-round-trip spawn's reply is on the critical path), the
        # stream's exit message right after: it joins the reply in the same socket write
        reaper.wake_waiters(mp)
        self._output.wake_soon()
        self._sweeper.finished(mp.id)

    def fit(self, ex: ExitInfo | None) -> ExitInfo | None:
        """*ex* with its tails cut (keeping their ends) to what one message can carry."""
        limit = self.settings.max_tail_in_message
        if ex is None or (len(ex.stdout) <= limit and len(ex.stderr) <= limit):
            return ex
        return msgspec.structs.replace(ex, stdout=ex.stdout[-limit:] if limit else b"",
                                       stderr=ex.stderr[-limit:] if limit else b"")

    async def wait(self, mp: ManagedProcess, timeout: float) -> ExitInfo | None:
        """The exit, waiting up to *timeout* seconds for it (None if still running then)."""
        return await reaper.wait(mp, timeout)

    # -- looking --------------------------------------------------------------------

    def status(self, mp: ManagedProcess, *, tails: bool = True) -> ProcStatus:
        """State, live CPU/RSS of the group; the exit with its tails (cut to fit), or without (lists)."""
        ex = self.fit(mp.exit) if tails else (
            msgspec.structs.replace(mp.exit, stdout=b"", stderr=b"") if mp.exit is not None else None)
        st = ProcStatus(id=mp.id, node=self.node, pid=mp.pid, argv=mp.argv, owner=mp.owner,
                        state="running" if mp.running else "exited", started_at=mp.started_at,
                        enforced=list(mp.plan.enforced), exit=ex)
        if not mp.running:
            return st
        try:
            leader = mp.members.get(mp.pid) or psutil.Process(mp.pid)
            procs = [leader] + leader.children(recursive=True)
        except psutil.Error:
            return st
        cpu, rss, seen = 0.0, 0, {}
        peak = vm_hwm(mp.pid) if not mp.reaped else 0  # the leader's pid is ours until reaped
        for p in procs:
            p = mp.members.get(p.pid, p)
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    member_rss = p.memory_info().rss
                    rss += member_rss
                    peak = max(peak, member_rss)  # a descendant's current RSS: a lower bound of its peak
                    if p.pid == mp.pid:
                        st.status = p.status()
            except psutil.Error:
                continue
            seen[p.pid] = p
        mp.members = seen
        mp.rss_sample = max(mp.rss_sample, peak)
        st.cpu_percent, st.rss, st.members = round(cpu, 1), rss, len(seen)
        return st

    # -- stopping -------------------------------------------------------------------

    async def stop(self) -> None:
        """The spawner stops: SIGTERM every group, SIGKILL what is left, publish every exit."""
        live = list(self.live.values())
        for mp in live:
            self.signal(mp, signal.SIGTERM, "spawner_stopped")
        if live:
            await asyncio.wait([asyncio.ensure_future(mp.done.wait()) for mp in live], timeout=STOP_GRACE_S)
        for mp in list(self.live.values()):
            self.signal(mp, signal.SIGKILL, "spawner_stopped")
        if self.live:
            await asyncio.wait([asyncio.ensure_future(mp.done.wait()) for mp in self.live.values()],
                               timeout=PIPE_DRAIN_S + 1.0)
        await self._output.drain()
        await self._tasks.stop()
        # the last chance: nothing may outlive the spawner
        self._sweeper.stop({mp.id for mp in self.finished.values()})
        if self.cgroups is not None:
            self.cgroups.close()
