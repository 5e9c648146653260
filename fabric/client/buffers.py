"""Remote buffers: what ``rmalloc`` returns, and how a call turns a buffer or a token into a token.

:class:`BufferRef` is the part both twins share (the handle, the size); the async
:class:`AsyncRemoteBuffer` lives here, the sync :class:`fabric.client.RemoteBuffer`
in :mod:`fabric.client.sync`.  The memory area accepts either wherever it takes a handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BadRequest

if TYPE_CHECKING:
    from .aio import AsyncFabricClient


class BufferRef:
    """A block's handle and size: the common base of the sync and async remote buffers."""

    def __init__(self, handle: str, size: int) -> None:
        self.handle = handle
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __str__(self) -> str:
        return self.handle

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, handle={self.handle!r})"


class AsyncRemoteBuffer(BufferRef):
    """A remote block for the async client: ``async with`` frees it."""

    def __init__(self, client: AsyncFabricClient, handle: str, size: int) -> None:
        super().__init__(handle, size)
        self.client = client

    async def read(self, length: int | None = None, offset: int = 0) -> bytes:
        return await self.client.rread(self, length, offset)

    async def write(self, data: Any, offset: int = 0) -> int:
        return await self.client.rwrite(self, data, offset)

    async def free(self) -> int:
        return await self.client.rfree(self)

    async def __aenter__(self) -> AsyncRemoteBuffer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.free()


# what rreadv's C fast path accepts in place of a token (it reads their .handle)
_BUFFER_TYPES = (BufferRef,)


def _token(handle: str | BufferRef) -> str:
    return handle.handle if isinstance(handle, BufferRef) else handle


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise BadRequest(f"size must be an int, got {type(size).__name__}")
    if size < 0:
        raise BadRequest(f"size must not be negative, got {size}")
    return size
