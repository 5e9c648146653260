"""Which boot of which host this process runs on, for the local fast path.

The allocator reports its host's boot id; a client uses the local fast path only
when its own matches (same machine, same boot), so it never maps a stale or
foreign ``/dev/shm`` file.
"""

from __future__ import annotations

import functools


@functools.cache
def boot_id() -> str:
    """``/proc/sys/kernel/random/boot_id``, or ``""`` where there is none (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""
