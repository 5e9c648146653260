"""How a service connects to NATS: the connect options every service-side connection uses.

The kit's connection of every service (the spawner's job lane subscribes on it too)
connects through :func:`connect` (or spread :func:`connect_options` into
``nats.connect``), so service connections behave alike: a name the server lists
(``<service>@<node>``), reconnecting forever
(a restarted nats-server must not end a service), every ``reconnect_wait_s``, and the
connection's errors, disconnects and reconnects logged through the service's
structlog logger (nats-py would otherwise print tracebacks to stderr).

The client library (:mod:`fabric.client.transport`) keeps its own options on purpose:
it bounds the first connect by the caller's timeout and logs through stdlib
``logging``, since a library must not write to its host's output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS

__all__ = ["connect", "connect_options", "close", "RECONNECT_WAIT_S"]

#: seconds between reconnect attempts: short, since a service is useless while disconnected
RECONNECT_WAIT_S = 0.25


def connect_options(name: str, log: Any, on_reconnect: Callable[[], None] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``nats.connect`` for a service connection called *name*.

    *log* is a structlog logger; *on_reconnect* runs after each reconnect, once it is logged.
    """

    async def error_cb(exc: Exception) -> None:
        log.warning("nats error", connection=name, error=str(exc))

    async def disconnected_cb() -> None:
        log.warning("disconnected from NATS", connection=name)

    async def reconnected_cb() -> None:
        log.info("reconnected to NATS", connection=name)
        if on_reconnect is not None:
            on_reconnect()

    return {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
    }


async def connect(url: str, name: str, log: Any, on_reconnect: Callable[[], None] | None = None,
                  auth: dict[str, Any] | None = None) -> NATS:
    """Connect to *url* with :func:`connect_options`, plus *auth* (a credentials file's options)."""
    return await nats.connect(url, **connect_options(name, log, on_reconnect), **(auth or {}))


async def close(nc: NATS) -> None:
    """Send what is still buffered, then close; just close where draining fails (closed, reconnecting)."""
    if nc.is_closed:
        return
    try:
        await nc.drain()
    except Exception:  # already closed or reconnecting: nothing left to flush
        await nc.close()
