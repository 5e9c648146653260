"""Polling helpers for tests that wait on a real server or process: one loop, two shapes.

``until(check, within)`` polls an async *check* until it returns something truthy and
returns that (or the last falsy value once *within* seconds pass), for ``assert await
until(...)``; ``until_back`` is the same for a server that is restarting, where an
exception only means "not yet".  ``until_holds(get, ok, within)`` polls *get* until
``ok(value)`` and fails the test naming the last value otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T]], within: float = 15.0, step: float = 0.05, *,
                retry_errors: bool = False) -> T | None:
    """The first truthy result of ``await check()`` within *within* seconds, else the last result."""
    deadline = time.monotonic() + within
    value: T | None = None
    while True:
        try:
            value = await check()
        except Exception:
            if not retry_errors:
                raise
            value = None  # the server is still coming back
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


async def until_back(check: Callable[[], Awaitable[T]], within: float = 15.0, step: float = 0.1) -> T | None:
    """:func:`until` for a server that is coming back: errors from *check* are retried until *within* passes."""
    return await until(check, within, step, retry_errors=True)


async def until_holds(get: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float = 10.0,
                      step: float = 0.05) -> None:
    """Polls ``await get()`` until ``ok(value)``; fails with the last value after *within* seconds."""
    deadline = time.monotonic() + within
    value = await get()
    while not ok(value):
        assert time.monotonic() < deadline, f"condition never held; last {value}"
        await asyncio.sleep(step)
        value = await get()
