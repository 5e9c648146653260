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
spawner sweeps for them a moment after processes finish.  (A descendant that also
clears its environment is out of reach, unless the process had a cgroup.)
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

__all__ = ["MARKER_ENV", "spawner_key", "marker", "reap", "strays"]

MARKER_ENV = "FABRIC_SPAWNER"


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
    prefix = f"{MARKER_ENV}={key}:".encode()
    mine = marker(key).encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        for var in env.split(b"\0"):
            if var.startswith(prefix):
                owner = var[len(MARKER_ENV) + 1:].decode(errors="replace")
                if owner == mine.decode():
                    break
                _, spid, ticks = (owner.split(":") + ["", ""])[:3]
                if spid.isdigit() and _alive(int(spid), ticks):
                    break  # its spawner still runs (another instance): not ours to touch
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
                break
    return found


def _env_vars(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
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
