"""Per-process memory cgroups, where this node has a writable memory controller.

The spawner gives a process with ``limits.mem_bytes`` its own cgroup under
``<own cgroup>/fabric-spawner-<key>/<local id>``.  Both hierarchies are detected for
real at start-up, by creating a probe group and finding its memory limit file:

* cgroup v2 (unified): ``memory.max``; the controller must be enabled in the
  parent's ``cgroup.subtree_control`` (the spawner enables it in its own sub-tree);
* cgroup v1: the ``memory`` hierarchy's ``memory.limit_in_bytes`` (plus
  ``memory.memsw.limit_in_bytes`` when swap accounting exists, so swap is no escape).

The child joins its group itself before exec (it writes its pid to
``cgroup.procs``), so nothing it forks is ever outside the group.  A group also
lists every descendant, whatever process group or session it moved to, so a kill
reaches those too.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupRoot", "ProcCgroup", "detect"]


@dataclass
class ProcCgroup:
    """One process's group: its directory and which files mean what."""

    path: Path
    version: int

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        """SIGKILL every member (repeated: a member may fork while we read the list)."""
        for _ in range(8):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer acted inside this group."""
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / events).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
            # v1: the limit was hit (older kernels count no oom_kill)
            return self.version == 1 and int((self.path / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    def peak(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    def remove(self) -> None:
        self.kill_all()
        try:
            self.path.rmdir()
        except OSError:  # a member still exiting: the next sweep removes it
            pass


class CgroupRoot:
    """The spawner's own sub-tree in a writable memory hierarchy."""

    def __init__(self, base: Path, version: int) -> None:
        self.base = base
        self.version = version

    def create(self, name: str, mem_bytes: int) -> ProcCgroup:
        path = self.base / name
        self.base.mkdir(exist_ok=True)  # removed by an operator (or a stopped twin): make it again
        path.mkdir(exist_ok=True)
        group = ProcCgroup(path, self.version)
        if self.version == 2:
            (path / "memory.max").write_text(str(mem_bytes))
            swap = path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(mem_bytes))
            memsw = path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(mem_bytes))
        return group

    def sweep(self) -> None:
        """Remove leftover groups (a previous incarnation's, or ones that were busy)."""
        try:
            children = [p for p in self.base.iterdir() if p.is_dir()]
        except OSError:
            return
        for path in children:
            ProcCgroup(path, self.version).remove()

    def close(self) -> None:
        """Remove every group and the spawner's own directory (the next start makes a new one)."""
        self.sweep()
        try:
            self.base.rmdir()
        except OSError:  # a member still exiting: the next start's sweep removes it
            pass

    def __str__(self) -> str:
        return f"v{self.version}:{self.base}"


def _own_path(controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy of *controller* (None: the v2 one)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return "/"


def _mounts() -> list[tuple[str, str, list[str]]]:
    out: list[tuple[str, str, list[str]]] = []
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[1], parts[2], parts[3].split(",")))
    except OSError:
        pass
    return out


def _candidate_bases(mount: str, own: str) -> list[Path]:
    # our own group first (a container's view), then the hierarchy's root
    bases = [Path(mount + own.rstrip("/")), Path(mount)] if own not in ("", "/") else [Path(mount)]
    return [b for b in bases if b.is_dir()]


def _probe(base: Path, key: str, version: int) -> CgroupRoot | None:
    root = base / f"fabric-spawner-{key}"
    try:
        root.mkdir(exist_ok=True)
        if version == 2:
            # a v2 controller works in a child only when its parent delegates it
            (root / "cgroup.subtree_control").write_text("+memory")
        probe = root / "probe"
        probe.mkdir(exist_ok=True)
        limit = probe / ("memory.max" if version == 2 else "memory.limit_in_bytes")
        ok = limit.exists() and os.access(limit, os.W_OK) and os.access(probe / "cgroup.procs", os.W_OK)
        probe.rmdir()
    except OSError:
        ok = False
    if not ok:
        try:
            root.rmdir()
        except OSError:
            pass
        return None
    return CgroupRoot(root, version)


def detect(key: str) -> tuple[CgroupRoot | None, str]:
    """Find a writable memory controller: (root, description) or (None, reason)."""
    mounts = _mounts()
    for mount, fstype, _opts in mounts:
        if fstype == "cgroup2":
            for base in _candidate_bases(mount, _own_path(None)):
                root = _probe(base, key, 2)
                if root is not None:
                    return root, str(root)
    for mount, fstype, opts in mounts:
        if fstype == "cgroup" and "memory" in opts:
            for base in _candidate_bases(mount, _own_path("memory")):
                root = _probe(base, key, 1)
                if root is not None:
                    return root, str(root)
    return None, "no writable cgroup memory controller (v1 or v2) on this node"
