"""Bad numbers in memory calls are typed 400s (BadRequest), on every path, and nothing is lost.

The codec and the local fast path check offsets, lengths and item shapes; the client
turns their ValueError/OverflowError into BadRequest, which is still a ValueError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from fabric import AsyncFabricClient, BadRequest, FabricClient

#: (name, call with a buffer) -- each must be refused before anything is sent
BAD_ASYNC: list[tuple[str, Callable[[Any, Any], Any]]] = [
    ("rread negative offset", lambda fc, b: fc.rread(b, 10, -1)),
    ("rread negative length", lambda fc, b: fc.rread(b, -1)),
    ("rread length past 2**64", lambda fc, b: fc.rread(b, 1 << 64)),
    ("rwrite negative offset", lambda fc, b: fc.rwrite(b, b"x", -1)),
    ("rreadv negative offset", lambda fc, b: fc.rreadv([(b, -1, 10)])),
    ("rreadv a 2-tuple", lambda fc, b: fc.rreadv([(b, 1)])),
    ("rreadv length past 2**64", lambda fc, b: fc.rreadv([(b, 0, 1 << 70)])),
    ("rwritev negative offset", lambda fc, b: fc.rwritev([(b, -1, b"x")])),
]


@pytest.mark.parametrize("name, call", BAD_ASYNC, ids=[n for n, _ in BAD_ASYNC])
async def test_async_client(aclient: AsyncFabricClient, mem_accounting: object, name: str, call: Any) -> None:
    buf = await aclient.rmalloc(64)
    try:
        await aclient.rwrite(buf, b"kept")
        with pytest.raises(BadRequest) as info:
            await call(aclient, buf)
        assert info.value.code == 400 and isinstance(info.value, ValueError)
        assert await aclient.rread(buf, 4) == b"kept"  # nothing lost, the client still works
    finally:
        await aclient.rfree(buf)


@pytest.mark.parametrize("local", [False, True], ids=["remote", "local fast path"])
async def test_sync_client(nats_url: str, mem_accounting: object, local: bool) -> None:
    def work() -> None:
        with FabricClient(nats_url, local=local) as fc:
            buf = fc.rmalloc(64)
            try:
                fc.rwrite(buf, b"kept")
                for name, call in BAD_ASYNC:
                    with pytest.raises(BadRequest, match=".") as info:
                        call(fc, buf)
                    assert isinstance(info.value, ValueError), name
                assert fc.rread(buf, 4) == b"kept"
            finally:
                fc.rfree(buf)

    await asyncio.to_thread(work)  # the sync client blocks: keep this loop (the allocator's) running
