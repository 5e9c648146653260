"""ADR-32 discovery: the ``$SRV`` requests the supervisor's readiness check and ``fabric status`` send.

:func:`collect_replies` gathers every answer to ``$SRV.PING|INFO|STATS`` for a short
window (any number of service instances may answer one request); :func:`probe_services`
pings until each service the supervisor started answers from its node.  It imports
nothing from the rest of fabric, so the supervisor and the CLI both build on it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from .protocol.subjects import srv

__all__ = ["collect_replies", "probe_services", "PING_INTERVAL_S"]

PING_INTERVAL_S = 0.025


async def collect_replies(nc: Any, subjects: list[str], *, window: float,
                          done: Callable[[list[Any]], bool] | None = None) -> list[Any]:
    """Publish an empty request to each subject and gather every JSON reply for *window* s.

    One reply inbox takes all the answers (any number of service instances may
    answer); it returns early once *done* says so.
    """
    replies: list[Any] = []
    finished = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            return
        if done is not None and done(replies):
            finished.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        for subject in subjects:
            await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        try:
            await asyncio.wait_for(finished.wait(), window)
        except asyncio.TimeoutError:
            pass
    finally:
        await sub.unsubscribe()
    return replies


async def probe_services(nc: Any, node: str, expected: Callable[[], dict[str, int | None]], *,
                         timeout: float) -> list[str]:
    """Ping ``$SRV.PING.<name>`` until each expected service answers from *node*.

    *expected* gives the current pid of each service (it changes when one is
    restarted); a reply whose metadata names another pid is an older or foreign
    instance and does not count.  Returns the names still missing at *timeout*.
    """
    found: set[str] = set()
    deadline = time.monotonic() + timeout

    def check(reply: Any) -> None:
        if not isinstance(reply, dict):
            return
        name = reply.get("name")
        meta = reply.get("metadata") or {}
        pids = expected()
        if name not in pids or meta.get("node") != node:
            return
        pid = meta.get("pid")
        if pid is not None and str(pid) != str(pids[name]):
            return
        found.add(name)

    inbox = nc.new_inbox()
    arrived = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        try:
            check(json.loads(msg.data))
        except ValueError:
            return
        arrived.set()

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        while True:
            missing = [n for n in expected() if n not in found]
            if not missing:
                return []
            now = time.monotonic()
            if now >= deadline:
                return missing
            for name in missing:
                await nc.publish(srv("PING", name), b"", reply=inbox)
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), min(PING_INTERVAL_S, deadline - now))
            except asyncio.TimeoutError:
                pass
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            pass
