"""No orphans after a spawner crash: its processes carry a marker, the next start kills them.

Every process the spawner starts gets ``FABRIC_SPAWNER=<key>:<pid>:<start ticks>``
in its environment, where *key* names this spawner's node and state directory and
the rest names the spawner process itself.  A clean stop kills every process group
it started; a ``kill -9`` of the spawner cannot, so on start-up :func:`reap` looks
for processes marked with this key by a spawner process that no longer exists,
and kills their process groups.  Another spawner on the same host (other node or
state directory, or one still alive) is never touched.

The same marker finds, while the spawner runs, descendants that escaped their
process group with ``setsid()`` before their process ended (:func:`strays`): the
spawner sweeps for them a moment after processes finish.

A descendant that also clears its environment carries no marker, but it cannot
reach init either: the spawner is a child subreaper (``PR_SET_CHILD_SUBREAPER``,
:func:`become_subreaper`), so every orphaned descendant of its processes -- double
fork, ``setsid()``, ``env -i`` or not -- is reparented to the spawner itself.
:func:`adopted` looks at the spawner's direct children that it did not start (not
a process of its table, not a warm-pool worker): a marked one whose process still
runs is left alone until that process ends; any other is killed and reaped
(``waitpid`` on its own pid, never ``-1``: the spawner's own children are reaped
through their pidfds).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from fabric.protocol.env import MARKER_ENV  # marks a process as this spawner's

from .sandbox import prctl

__all__ = ["MARKER_ENV", "spawner_key", "marker", "reap", "strays", "become_subreaper", "release_subreaper",
           "children", "adopted"]



def spawner_key(node: str, state_dir: Path) -> str:
    digest = hashlib.sha256(f"{node}\0{Path(state_dir).resolve()}".encode()).hexdigest()[:16]
    return digest


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def marker(key: str) -> str:
    pid = os.getpid()
    return f"{key}:{pid}:{_start_ticks(pid)}"


def _alive(pid: int, ticks: str) -> bool:
    return bool(ticks) and _start_ticks(pid) == ticks


def reap(key: str) -> list[int]:
    """Kill the process groups a dead spawner with *key* left behind; returns the pids found."""
    prefix = f"{key}:".encode()
    mine = marker(key).encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        owner = _env_vars(int(entry.name)).get(MARKER_ENV.encode(), b"")
        if not owner.startswith(prefix) or owner == mine:
            continue
        _, spid, ticks = (owner.decode(errors="replace").split(":") + ["", ""])[:3]
        if spid.isdigit() and _alive(int(spid), ticks):
            continue  # its spawner still runs (another instance): not ours to touch
        pid = int(entry.name)
        found.append(pid)
        try:
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():  # never our own group
                os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def _env_vars(pid: int, settle: float = 0.0) -> dict[bytes, bytes]:
    """*pid*'s environment; with *settle*, an empty one is read again for up to that many seconds.

    /proc/<pid>/environ reads empty while the process is inside execve (its new memory
    is mapped before its arguments and environment are), so a marked process caught
    mid-exec looks unmarked.  A truly empty environment (``env -i``) stays empty.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return {}
        if raw or time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    out: dict[bytes, bytes] = {}
    for var in raw.split(b"\0"):
        name, sep, value = var.partition(b"=")
        if sep:
            out[name] = value
    return out


def strays(marker_value: str, finished_ids: set[str], proc_env: str) -> list[int]:
    """Kill what is left of *finished_ids*: processes that escaped their group (``setsid``).

    A process's group dies with it, but a descendant that moved to another session
    and whose parent already exited cannot be found through the group.  It still
    carries the spawner's marker and its process id in its environment, so a scan of
    /proc finds it; it is killed with its own group.  Runs in a worker thread (it
    reads every process's environment); only ids that had finished before the scan
    began are considered, so a process started meanwhile is never touched.
    """
    want_marker = marker_value.encode()
    killed: list[int] = []
    own_group = os.getpgrp()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        env = _env_vars(int(entry.name))
        if env.get(MARKER_ENV.encode()) != want_marker:
            continue
        proc_id = env.get(proc_env.encode(), b"").decode(errors="replace")
        if proc_id not in finished_ids:
            continue
        pid = int(entry.name)
        try:
            pgid = os.getpgid(pid)
            if pgid == pid and pgid != own_group:
                os.killpg(pgid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


# -- adopted orphans (PR_SET_CHILD_SUBREAPER) ----------------------------------------------

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
_sub_lock = threading.Lock()
_sub_users = 0
_sub_before = 0


def _get_subreaper() -> int:
    out = ctypes.c_int(0)
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(out))
    return out.value


def become_subreaper() -> bool:
    """Make this process a child subreaper (counted: several spawners may share a process)."""
    global _sub_users, _sub_before
    with _sub_lock:
        try:
            if _sub_users == 0:
                _sub_before = _get_subreaper()
                prctl(PR_SET_CHILD_SUBREAPER, 1)
        except (OSError, AttributeError):
            return False
        _sub_users += 1
        return True


def release_subreaper() -> None:
    """The last user gone: the flag goes back to what it was before the first."""
    global _sub_users
    with _sub_lock:
        if _sub_users == 0:
            return
        _sub_users -= 1
        if _sub_users == 0 and not _sub_before:
            try:
                prctl(PR_SET_CHILD_SUBREAPER, 0)
            except OSError:
                pass


def children() -> set[int]:
    """This process's direct children (every thread's: a child belongs to the thread that forked it)."""
    out: set[int] = set()
    me = os.getpid()
    if os.path.exists(f"/proc/self/task/{me}/children"):
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children", "rb") as f:
                    out.update(int(p) for p in f.read().split())
            except OSError:  # the thread ended meanwhile: its children went to another thread
                pass
        return out
    # no CONFIG_PROC_CHILDREN: psutil finds them by every process's parent
    return {p.pid for p in psutil.Process(me).children()}


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw.rsplit(b")", 1)[1].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _reap(pid: int, patience: float) -> bool:
    """waitpid on exactly *pid* (never -1), polling up to *patience* seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True  # not (or no longer) ours to reap
        if done:
            return True
        if time.monotonic() >= deadline:
            return False  # still dying: a zombie the next look reaps
        time.sleep(0.005)


def adopted(candidates: list[int], owners_alive: set[tuple[bytes, bytes]], markers: set[bytes], proc_env: str,
            any_group: bool, patience: float = 0.1) -> tuple[list[int], list[int]]:
    """Kill and reap the adopted orphans among *candidates*; returns (killed, reaped zombies).

    *candidates* are direct children of this process that, when the caller looked on
    its event loop, were neither processes it started nor warm-pool workers: they
    came to it as a subreaper.  Each is our child until we reap it, so its pid cannot
    be reused meanwhile.  One whose environment names a live process (the marker and
    ``FABRIC_PROC_ID`` of *owners_alive*) is left alone.  Unless *any_group* (the
    spawner is its own process, so every child it did not start descends from its
    processes), the spawner is embedded in a bigger program (the tests) whose own
    children it must not take for orphans: a child in this process's own process
    group (where no spawned process starts) is not touched, nor one marked by a
    spawner that is not one of this process's (*markers*): an orphan of another
    spawner the host started, which that spawner's successor deals with.
    """
    me = os.getpid()
    own_group = os.getpgrp()
    killed: list[int] = []
    reaped: list[int] = []
    for pid in candidates:
        st = _stat(pid)
        if st is None or st[1] != me:
            continue
        state, _, pgrp = st
        if not any_group and pgrp == own_group:
            continue
        if state in ("Z", "X"):
            if _reap(pid, 0):
                reaped.append(pid)
            continue
        # about to kill it: an empty read may be an exec in flight, not an unmarked process
        env = _env_vars(pid, settle=0.05)
        owner = (env.get(MARKER_ENV.encode(), b""), env.get(proc_env.encode(), b""))
        if owner in owners_alive:
            continue  # its process still runs: it goes when that process ends
        if not any_group and owner[0] and owner[0] not in markers:
            continue  # another spawner's, not one of ours: not ours to touch
        try:
            if pgrp == pid and pgrp != own_group:
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        killed.append(pid)
        _reap(pid, patience)
    return killed, reaped
