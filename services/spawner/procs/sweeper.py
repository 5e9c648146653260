"""No orphans: the sweeps that kill what escaped a finished process, and adopted orphans.

A descendant that left the group (``setsid()``) is found a moment after its process
ends by the marker in its environment (:func:`~..orphans.strays`).  One that also
cleared its environment is found as a child: the spawner is a child subreaper
(``PR_SET_CHILD_SUBREAPER``, set when the table starts), so every orphaned descendant
of its processes is reparented to the spawner, not to init.  Off the spawn path --
:data:`SWEEP_S` after processes finish, and every :data:`ADOPT_S` -- the sweep lists
the spawner's direct children (``/proc/self/task/*/children``) that are neither
processes of a table nor warm-pool workers: adopted orphans.  One whose environment
names a process that still runs (``FABRIC_SPAWNER`` and ``FABRIC_PROC_ID`` of a live
entry) is left alone until that process ends; every other one gets SIGKILL (with its
group, when it leads one) and is reaped with ``waitpid`` on its own pid -- never
``waitpid(-1)``, which would steal the exits the pidfds report -- as are adopted
zombies.  A spawner embedded in another program (the tests run it inside pytest)
leaves the children in its host's own process group alone (it cannot tell them from
the host's own, and no spawned process starts in that group), and those marked by a
spawner not of this process (:attr:`~.model.TableSettings.any_group` is set by
``python -m fabric.services.spawner``, where every other child descends from the spawner's
processes).
"""

from __future__ import annotations

import asyncio
import weakref

from ..orphans import adopted, become_subreaper, children, release_subreaper, strays
from .model import PROC_ENV, ManagedProcess, TableSettings

__all__ = ["OrphanSweeper", "SWEEP_S", "ADOPT_S"]

#: seconds after processes finish before the scan for descendants that escaped their group
SWEEP_S = 0.5
#: seconds between looks for adopted orphans (the spawner is a child subreaper) when nothing finishes
ADOPT_S = 1.0

#: the sweepers of every started table of this process: none of their processes is ever an adopted orphan
_SWEEPERS: weakref.WeakSet[OrphanSweeper] = weakref.WeakSet()


class OrphanSweeper:
    """The sweeps of one table: strays of its finished processes, and the process's adopted orphans."""

    def __init__(self, marker: str, live: dict[str, ManagedProcess], settings: TableSettings) -> None:
        self.marker = marker
        #: the table's running processes (and their ids: what adopted orphans may belong to)
        self.live = live
        self.settings = settings
        #: ids finished since the last stray sweep
        self._to_sweep: set[str] = set()
        self._due = asyncio.Event()
        self._subreaper = False

    def start(self) -> None:
        """Become the subreaper and join the sweepers; the table then runs :meth:`loop`."""
        # orphaned descendants of our processes come to us, not to init (see the module docstring)
        self._subreaper = become_subreaper()
        _SWEEPERS.add(self)

    def finished(self, proc_id: str) -> None:
        """A process ended: sweep for its strays soon."""
        self._to_sweep.add(proc_id)
        self._due.set()

    async def loop(self) -> None:
        """:data:`SWEEP_S` after processes finish, else every :data:`ADOPT_S`: kill what escaped."""
        loop = asyncio.get_running_loop()
        while True:
            if await self._wait_due(ADOPT_S):
                await asyncio.sleep(SWEEP_S)  # batches the exits of a busy moment into one scan
            self._due.clear()
            ids, self._to_sweep = self._to_sweep, set()
            killed: list[int] = []
            if ids:
                try:
                    killed = await loop.run_in_executor(None, strays, self.marker, ids, PROC_ENV)
                except Exception:  # /proc unreadable: nothing more this sweep can do
                    pass
            if self._subreaper:
                # who is ours is decided here, on the loop, where spawns happen: a process
                # started a moment later is never taken for an orphan
                candidates, owners, markers = self._adoption_snapshot()
                if candidates:
                    try:
                        gone, _ = await loop.run_in_executor(None, adopted, candidates, owners, markers,
                                                             PROC_ENV, self.settings.any_group)
                        killed += [pid for pid in gone if pid not in killed]
                    except Exception:
                        pass
            if killed and self.settings.on_strays is not None:
                self.settings.on_strays(killed)

    async def _wait_due(self, timeout: float) -> bool:
        """Whether a sweep became due within *timeout* seconds.

        Not ``asyncio.wait_for(event.wait(), ...)``: before Python 3.12 it swallows a
        cancellation that arrives as the event is set -- and processes end (setting it)
        exactly while the table stops this loop, which then never ends.
        """
        waiter = asyncio.ensure_future(self._due.wait())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()
        return bool(done)

    def _adoption_snapshot(self) -> tuple[list[int], set[tuple[bytes, bytes]], set[bytes]]:
        """(our children no table nor pool started, (marker, id) of every live process, our markers)."""
        kids = children()
        if not kids:
            return [], set(), set()
        owners: set[tuple[bytes, bytes]] = set()
        markers = {self.marker.encode()}
        for sweeper in list(_SWEEPERS):
            marker = sweeper.marker.encode()
            markers.add(marker)
            for mp in sweeper.live.values():
                if not mp.reaped:
                    kids.discard(mp.pid)
                owners.add((marker, mp.id.encode()))
        for sweeper in list(_SWEEPERS):
            own = sweeper.settings.own_children
            if kids and own is not None:
                kids -= own()
        return sorted(kids), owners, markers

    def stop(self, finished_ids: set[str]) -> None:
        """The table stopped (and its :meth:`loop`): one last sweep, then stop being a subreaper."""
        ids = self._to_sweep | finished_ids
        if ids:
            strays(self.marker, ids, PROC_ENV)
        _SWEEPERS.discard(self)
        if self._subreaper:
            candidates, owners, markers = self._adoption_snapshot()
            if candidates:
                adopted(candidates, owners, markers, PROC_ENV, self.settings.any_group, patience=1.0)
            release_subreaper()
            self._subreaper = False
