"""Ports ``fabric up`` chooses once and keeps from start to start: the HTTP gateway's and the data plane's.

A port configured as 0 means "a free one": chosen here at the first start and kept in
``<state>/<name>.port``, so an address that people and firewalls know (a bookmarked
dashboard, a rule for the data plane) stays the same across restarts; a kept port that
another program took meanwhile is replaced by a new free one.  They are chosen here, in
``fabric up``, before any service starts, and never twice in one run: a service that bound
port 0 itself could be handed, by the kernel, a port ``fabric up`` had just promised to
another (how the gateway once found its port taken by the allocator's data plane).
"""

from __future__ import annotations

from .nats_server import PortInUse, check_port, free_port, promise, promised_elsewhere
from .state import StateDir

__all__ = ["keep_port"]


def keep_port(state: StateDir, name: str, host: str) -> int:
    """The port kept in ``<state>/<name>.port`` if it is still free on *host*, else a new free one (then kept)."""
    kept = state.path / f"{name}.port"
    try:
        port = int(kept.read_text().strip())
        if promised_elsewhere(host, port, name):
            raise PortInUse(host, port)
        check_port(host, port)
        promise(host, port, name)
    except (OSError, ValueError, PortInUse):
        port = free_port(host, name)
        state.path.mkdir(parents=True, exist_ok=True)
        kept.write_text(f"{port}\n")
    return port
