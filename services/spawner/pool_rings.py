"""The ring files of warm workers in /dev/shm: where they are named, and the sweep of a dead spawner's.

A ring worker's two rings are ``fabric-ring-core-<pid>-<token>-<core>-<seq>-{in,out}``
(:func:`ring_prefix` gives the part up to the token); the pid is the spawner's, so a
file whose pid is gone is garbage (its workers died with their parent, PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import glob
import os
import secrets
from typing import Any

__all__ = ["RING_GLOB", "ring_prefix", "sweep_rings"]

RING_GLOB = "/dev/shm/fabric-ring-core-*"


def ring_prefix() -> str:
    """A fresh prefix for the ring files of one manager of this process."""
    return RING_GLOB.replace("*", f"{os.getpid()}-{secrets.token_hex(3)}")


def sweep_rings(log: Any) -> list[str]:
    """Remove the ring files of spawners that died without cleaning up (SIGKILL, OOM).

    A ring file is ``fabric-ring-core-<pid>-...``; its workers died with their parent
    (PR_SET_PDEATHSIG), so a file whose pid is gone is garbage.
    """
    removed = []
    for path in glob.glob(RING_GLOB):
        try:
            pid = int(os.path.basename(path).split("-")[3])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
        except PermissionError:  # alive, someone else's
            pass
    if removed:
        log.info("removed ring files of a dead spawner", files=len(removed))
    return removed
