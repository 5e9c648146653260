"""FabricClient (sync) and AsyncFabricClient: remote memory as simple as malloc.

::

    from fabric import FabricClient
    with FabricClient("nats://127.0.0.1:4222") as fc:
        buf = fc.rmalloc(1024)
        fc.rwrite(buf, b"hello", offset=0)
        assert fc.rread(buf, 5) == b"hello"
        fc.rfree(buf)

How requests travel:

* control requests (alloc, free, realloc, stat, share, renew) are JSON on the
  subjects of docs/protocol.md;
* reads and writes use the binary frame of :mod:`fabric_ext.wire`; values larger
  than the server's max payload are split into chunks transparently, sent a few
  at a time concurrently;
* reads of more than ``read_chunk_size`` bytes (128 KiB by default) are split
  the same way even when they would fit one message: the allocator answers chunk
  after chunk, so nats-server and this client work on one chunk while it copies
  the next, instead of each waiting for a whole megabyte (a 1 MiB read took about
  two thirds of the time on the 2-core VM of docs/benchmarks.md).  Writes gain
  nothing from this -- the client sends its bytes in one burst either way -- and
  are split only past the max payload;
* the **local fast path**: when the allocator holding a block runs on this host
  (same boot id), the client maps that block's segment -- which holds only its
  owner's blocks -- and reads and writes it directly, with no NATS hop.  Turn it
  off with ``local=False``.

The sync client runs an event loop in a background thread; the local fast path
is served in the calling thread, without a hop to that loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import getpass
import hashlib
import inspect
import logging
import os
import platform
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

import nats
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from fabric_ext import wire

if TYPE_CHECKING:
    from fabric_ext.arena import SegmentView

from . import subjects
from .errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ERROR_KIND_HEADER,
    BadRequest,
    ExecutableNotFound,
    FabricError,
    InternalError,
    JobFailed,
    TooLarge,
    Unavailable,
    error_from_wire,
)
from .handles import _PARSED, HandleParts
from .handles import parse_cached as parse
from .hostid import boot_id
from .leases import LeaseKeeper
from .schema import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    MSGPACK_CONTENT_TYPE,
    AllocReply,
    AllocRequest,
    AttachReply,
    CoreInfo,
    CoreListReply,
    CoreRequest,
    DeviceRecord,
    DevicesReply,
    ExitInfo,
    FreeReply,
    GpuListReply,
    HandleRequest,
    KillReply,
    KillRequest,
    Limits,
    LoadCoreRequest,
    MemInfoReply,
    NativeExec,
    NodeListReply,
    NodeRecord,
    NodeRequest,
    ProcListReply,
    ProcListRequest,
    ProcRequest,
    ProcStatus,
    ReallocRequest,
    RenewReply,
    RenewRequest,
    Sandbox,
    ShareReply,
    SpawnerInfoReply,
    SpawnReply,
    SpawnRequest,
    StatReply,
    StdinReply,
    StdinRequest,
    WaitRequest,
    decode_job_results,
    encode_job_batch,
)

__all__ = ["AsyncFabricClient", "FabricClient", "RemoteBuffer", "AsyncRemoteBuffer", "AsyncCore", "Core"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
# room left in a message for the frame header, the item table and NATS headers
FRAME_OVERHEAD = 4096
# reads above this travel as concurrent chunks (see the module docstring)
DEFAULT_READ_CHUNK_SIZE = 128 * 1024
# chunk requests of one value in flight at a time: enough to keep every stage of the
# path busy, few enough that a 1 GiB value does not queue 4096 requests at once
CHUNKS_IN_FLIGHT = 8


log = logging.getLogger("fabric.client")


# nats-py prints a traceback for every connection error unless given callbacks: a
# library must not write to the user's stderr, so these go to logging instead.
async def _log_nats_error(exc: Exception) -> None:
    log.debug("nats error: %r", exc)


async def _log_disconnect() -> None:
    log.info("disconnected from NATS; reconnecting")


async def _log_reconnect() -> None:
    log.info("reconnected to NATS")


def _arguments_checked(fn: Callable[P, R]) -> Callable[P, R]:
    """Bad numbers in a memory call raise :class:`BadRequest` (400), like a bad request anywhere.

    The codec and the local fast path check offsets, lengths and item shapes and raise
    ``ValueError`` / ``OverflowError`` with a precise message; the caller gets that
    message as a typed fabric error.  :class:`BadRequest` is itself a ``ValueError``,
    so ``except ValueError`` keeps working.
    """
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def checked_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return await fn(*args, **kwargs)
            except FabricError:
                raise
            except (ValueError, OverflowError) as exc:
                raise BadRequest(str(exc)) from None
        return cast(Callable[P, R], checked_async)

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FabricError:
            raise
        except (ValueError, OverflowError) as exc:
            raise BadRequest(str(exc)) from None
    return checked


#: the URL of last resort: a NATS on this machine's default port
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def default_url() -> str:
    """Where a client connects when given no URL.

    ``$FABRIC_NATS_URL`` first; else the NATS of the fabric that ``fabric up`` runs
    in the default state directory on this machine (whatever port it got); else
    ``nats://127.0.0.1:4222``.
    """
    env = os.environ.get("FABRIC_NATS_URL")
    if env:
        return env
    try:
        from .state import StateDir, default_state_dir

        state = StateDir(default_state_dir()).running()
    except Exception:  # noqa: BLE001 - an unreadable state dir just means "not running here"
        state = None
    return state.nats_url if state is not None and state.nats_url else DEFAULT_NATS_URL


def _default_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers): fall back to the uid
        user = str(os.getuid())
    host = subjects.sanitize_node_name(socket.gethostname())
    return f"{user}@{host}"[:64]


async def _in_flight(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = CHUNKS_IN_FLIGHT) -> list[T]:
    """Await every call, at most *limit* in flight; results in order.

    *calls* is consumed lazily and the first error stops it: a read whose length is
    absurd for its block fails on its first chunks instead of planning them all.
    """
    results: list[T] = []
    pending: collections.deque[asyncio.Future[T]] = collections.deque()
    try:
        for call in calls:
            pending.append(asyncio.ensure_future(call()))
            if len(pending) >= limit:
                results.append(await pending.popleft())
        while pending:
            results.append(await pending.popleft())
    finally:
        for fut in pending:  # an error (or a cancel): the rest are not wanted
            fut.cancel()
    return results


def _local_length(length: int | None) -> int:
    """The local fast path's length: -1 means "to the end", so a caller's -1 must not pass as that."""
    if length is None:
        return -1
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise BadRequest(f"length must be None or an int >= 0, got {length!r}")
    return length


def _token(handle: str | RemoteBuffer | AsyncRemoteBuffer) -> str:
    return handle.handle if isinstance(handle, (RemoteBuffer, AsyncRemoteBuffer)) else handle


class _LocalSegments:
    """The segments this client has mapped for the local fast path, by (node, seg)."""

    def __init__(self, enabled: bool) -> None:
        self.boot_id = boot_id()
        self.enabled = enabled and bool(self.boot_id)
        self.hostname = socket.gethostname()
        self.views: dict[tuple[str, int], SegmentView | None] = {}  # None = known not to be local
        self.lock = threading.Lock()

    def view(self, h: HandleParts) -> SegmentView | None:
        return self.views.get((h.node, h.seg)) if self.enabled and h.writable else None

    def known(self, h: HandleParts) -> bool:
        return (h.node, h.seg) in self.views

    def add(self, h: HandleParts, reply: AttachReply | None) -> None:
        view = None
        if reply is not None and reply.boot_id == self.boot_id and reply.hostname == self.hostname:
            from fabric_ext.arena import SegmentView

            try:
                view = SegmentView(reply.path)
                if view.seg_id != reply.seg:
                    view.close()
                    view = None
            except (OSError, FabricError):  # another mount namespace or container: stay remote
                view = None
        with self.lock:
            old = self.views.get((h.node, h.seg))
            if old is None:
                self.views[(h.node, h.seg)] = view
            elif view is not None:
                view.close()

    def close(self) -> None:
        with self.lock:
            for view in self.views.values():
                if view is not None:
                    view.close()
            self.views.clear()


class AsyncFabricClient:
    """The asyncio client.  ``async with AsyncFabricClient(url) as fc: buf = await fc.rmalloc(1024)``.

    *url* defaults to ``$FABRIC_NATS_URL``, then the fabric ``fabric up`` runs here
    (its default state directory), then ``nats://127.0.0.1:4222`` (:func:`default_url`);
    connecting gives up after *timeout* seconds with :class:`Unavailable`; *owner*
    (the quota account of the blocks it allocates) to the user name; *timeout* is
    per request, in seconds; ``local=False`` turns the local fast path off;
    reads of more than *read_chunk_size* bytes travel as concurrent chunks.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        owner: str | None = None,
        timeout: float = 10.0,
        local: bool = True,
        name: str = "fabric-client",
        read_chunk_size: int = DEFAULT_READ_CHUNK_SIZE,
    ) -> None:
        if isinstance(read_chunk_size, bool) or not isinstance(read_chunk_size, int) or read_chunk_size < 4096:
            raise BadRequest(f"read_chunk_size must be an int of at least 4096 bytes, got {read_chunk_size!r}")
        self.url = url or default_url()
        self.owner = owner if owner is not None else _default_owner()
        self.timeout = timeout
        self.name = name
        self.read_chunk_size = read_chunk_size
        self.nc: NATS | None = None
        self._local = _LocalSegments(local)
        self._leases: LeaseKeeper | None = None  # made on first use, on the running loop

    # -- lifecycle -----------------------------------------------------------

    async def connect(self) -> AsyncFabricClient:
        if self.nc is None:
            # Once connected the client reconnects forever (a restarted nats-server must
            # not kill long-lived clients), but nats-py applies the same setting to the
            # first connect, which would then wait forever for a server that is not
            # there: bound the first connect by the client's timeout.
            try:
                self.nc = await asyncio.wait_for(
                    nats.connect(self.url, name=self.name, connect_timeout=min(self.timeout, 2.0),
                                 max_reconnect_attempts=-1, allow_reconnect=True,
                                 reconnect_time_wait=0.25, error_cb=_log_nats_error,
                                 disconnected_cb=_log_disconnect, reconnected_cb=_log_reconnect),
                    timeout=self.timeout)
            except asyncio.TimeoutError:
                raise Unavailable(
                    f"cannot connect to NATS at {self.url} within {self.timeout:g}s: nothing answers there. "
                    "Start fabric with `fabric up`, or pass the URL of a running one "
                    "(FabricClient(url) or $FABRIC_NATS_URL)") from None
            except Exception as exc:
                raise Unavailable(f"cannot connect to NATS at {self.url}: {exc}") from None
        return self

    async def close(self) -> None:
        if self._leases is not None:
            await self._leases.close()  # renewals stop: leased blocks lapse after their ttl
        self._local.close()
        opencl = sys.modules.get("fabric.opencl")  # only if this process ran OpenCL jobs (it imports numpy)
        if opencl is not None:
            opencl.close_staging(self)  # this client's staging files in /dev/shm go now, not at exit
        if self.nc is not None:
            nc, self.nc = self.nc, None
            try:
                await nc.drain()
            except Exception:
                await nc.close()

    async def __aenter__(self) -> AsyncFabricClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def max_payload(self) -> int:
        assert self.nc is not None, "client is not connected"
        return self.nc.max_payload

    @property
    def write_chunk(self) -> int:
        """The most bytes one write request carries: what fits the max payload."""
        return self.max_payload - FRAME_OVERHEAD

    @property
    def read_chunk(self) -> int:
        """The most bytes one read request asks for: ``read_chunk_size``, within the max payload."""
        return min(self.read_chunk_size, self.max_payload - FRAME_OVERHEAD)

    # -- transport -----------------------------------------------------------

    async def request(self, subject: str, data: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> Any:
        """Send one request; return the reply message or raise the typed error it carries."""
        if self.nc is None:
            raise Unavailable("client is not connected: use 'async with' or call connect()")
        try:
            msg = await self.nc.request(subject, data, timeout=timeout or self.timeout, headers=headers)
        except NoRespondersError:
            raise Unavailable(f"no service answers on {subject}") from None
        except NatsTimeout:
            raise Unavailable(f"request on {subject} timed out after {timeout or self.timeout}s") from None
        hdrs = msg.headers
        if hdrs and ERROR_CODE_HEADER in hdrs:
            raise error_from_wire(hdrs[ERROR_CODE_HEADER], hdrs.get(ERROR_HEADER, ""), hdrs.get(ERROR_KIND_HEADER))
        return msg

    async def _call(self, subject: str, msg: Any, reply_type: type[T], timeout: float | None = None) -> T:
        reply = await self.request(subject, JSON.encode(msg), timeout=timeout)
        return JSON.decode(reply.data, reply_type)

    @staticmethod
    def _mem(node: str, verb: str) -> str:
        return subjects.node_scoped("mem", node, verb)

    # -- memory ----------------------------------------------------------------

    async def rmalloc(self, size: int, *, ttl: float | None = None, node: str | None = None,
                      owner: str | None = None, keepalive: bool = True) -> AsyncRemoteBuffer:
        """Allocate *size* zeroed bytes on *node* (default: any allocator); returns a buffer.

        With *ttl* (seconds) the block is leased: the allocator frees it *ttl* seconds
        after the last renewal.  This client renews it every ``ttl / 3`` while it is
        open (``keepalive=False`` leaves renewing to you, see :meth:`renew`), so the
        memory comes back by itself when the client closes or its process dies.
        """
        subject = self._mem(node, "alloc") if node else subjects.cluster("mem", "alloc")
        req = AllocRequest(size=_check_size(size), owner=self.owner if owner is None else owner, ttl_s=ttl or 0.0)
        r = await self._call(subject, req, AllocReply)
        if ttl and keepalive:
            self._lease_keeper().add(r.handle, ttl)
        return AsyncRemoteBuffer(self, r.handle, r.size)

    def _lease_keeper(self) -> LeaseKeeper:
        if self._leases is None:
            self._leases = LeaseKeeper(self.renew)
        return self._leases

    async def rfree(self, handle: str | AsyncRemoteBuffer) -> int:
        """Free the block; returns its size.  A second free raises DoubleFree."""
        token = _token(handle)
        h = parse(token)
        r = await self._call(self._mem(h.node, "free"), HandleRequest(handle=token), FreeReply)
        if self._leases is not None:
            self._leases.discard(token)
        return r.freed

    async def rrealloc(self, handle: str | AsyncRemoteBuffer, size: int) -> AsyncRemoteBuffer:
        """Resize the block (in place when possible); returns the buffer, whose handle may change."""
        token = _token(handle)
        h = parse(token)
        r = await self._call(self._mem(h.node, "realloc"), ReallocRequest(handle=token, size=_check_size(size)),
                             AllocReply)
        if self._leases is not None and r.handle != token:
            self._leases.replace(token, r.handle)
        if isinstance(handle, AsyncRemoteBuffer):
            handle.handle, handle.size = r.handle, r.size
            return handle
        return AsyncRemoteBuffer(self, r.handle, r.size)

    async def rstat(self, handle: str | AsyncRemoteBuffer) -> StatReply:
        token = _token(handle)
        return await self._call(self._mem(parse(token).node, "stat"), HandleRequest(handle=token), StatReply)

    async def rshare(self, handle: str | AsyncRemoteBuffer) -> str:
        """A read-only handle to the same block, safe to give to another program."""
        token = _token(handle)
        r = await self._call(self._mem(parse(token).node, "share"), HandleRequest(handle=token), ShareReply)
        return r.handle

    async def renew(self, handle: str | AsyncRemoteBuffer, ttl: float) -> int:
        """Extend the block's lease by *ttl* seconds from now; returns the new deadline (ms)."""
        token = _token(handle)
        r = await self._call(self._mem(parse(token).node, "renew"), RenewRequest(handle=token, ttl_s=ttl), RenewReply)
        return r.lease_deadline_ms

    async def meminfo(self, node: str) -> MemInfoReply:
        reply = await self.request(self._mem(node, "info"), b"{}")
        return JSON.decode(reply.data, MemInfoReply)

    @_arguments_checked
    async def rwrite(self, handle: str | AsyncRemoteBuffer, data: Any, offset: int = 0) -> int:
        """Write *data* (any bytes-like object) at *offset*; returns the bytes written."""
        token = _token(handle)
        h = parse(token)
        view = await self._local_view(h, token)
        if view is not None:
            return view.write(h.off, h.gen, offset, data)
        mv = memoryview(data).cast("B")
        chunk = self.write_chunk
        if len(mv) <= chunk:
            return cast(int, await self._write_frame(h.node, [(token, offset, mv)]))
        return sum(await _in_flight([
            functools.partial(self._write_frame, h.node, [(token, offset + i, mv[i:i + chunk])])
            for i in range(0, len(mv), chunk)]))

    @_arguments_checked
    async def rread(self, handle: str | AsyncRemoteBuffer, length: int | None = None, offset: int = 0) -> bytes:
        """Read *length* bytes at *offset* (``None``: to the end of the block)."""
        token = _token(handle)
        h = parse(token)
        view = await self._local_view(h, token)
        if view is not None:
            return view.read(h.off, h.gen, offset, _local_length(length))
        if length is None and isinstance(handle, AsyncRemoteBuffer):
            length = max(handle.size - offset, 0)
        chunk = self.read_chunk
        if length is not None and length > chunk:
            return await self._read_chunked(h.node, token, offset, length, chunk)
        try:
            return await self._read_one(h.node, token, offset, wire.TO_END if length is None else length)
        except TooLarge:
            if length is not None:
                raise
            size = (await self.rstat(token)).size
            return await self._read_chunked(h.node, token, offset, max(size - offset, 0), chunk)

    @_arguments_checked
    async def rreadv(self, items: Iterable[tuple[Any, int, int | None]], *,
                     return_exceptions: bool = False) -> list[bytes | FabricError]:
        """Read many ``(handle, offset, length)`` items in one request per node, results in order."""
        if type(items) is not list and type(items) is not tuple:
            items = list(items)
        # the common case (handles seen before, all on one node) is planned and encoded in C
        fast = wire.encode_reads(items, _PARSED, _BUFFER_TYPES)
        if fast is not None:
            node, frame = fast
            return await self._read_reply(node, frame, raise_failed=not return_exceptions)
        results = await self._rreadv_general(items)
        if not return_exceptions:
            for value in results:  # the first failed item in item order, whatever its node
                if isinstance(value, FabricError):
                    raise value
        return results

    async def _rreadv_general(self, items: Sequence[tuple[Any, int, int | None]]) -> list[Any]:
        plan: list[tuple[str, int, int, int]] = []
        by_node: dict[str, list[int]] = {}
        for hd, off, n in items:
            token = _token(hd)
            node = parse(token).node
            by_node.setdefault(node, []).append(len(plan))
            plan.append((token, off, wire.TO_END if n is None else n, 0))
        results: list[Any] = [None] * len(plan)

        async def one_node(node: str, idx: list[int]) -> None:
            got = await self._read_frame(node, [plan[i] for i in idx], raise_failed=False)
            for i, value in zip(idx, got, strict=True):
                results[i] = value

        await asyncio.gather(*(one_node(n, idx) for n, idx in by_node.items()))
        return results

    @_arguments_checked
    async def rwritev(self, items: Iterable[tuple[Any, int, Any]], *,
                      return_exceptions: bool = False) -> list[int | FabricError]:
        """Write many ``(handle, offset, data)`` items in one request per node; returns bytes written each."""
        plan = [(_token(hd), off, memoryview(data).cast("B")) for hd, off, data in items]
        by_node: dict[str, list[int]] = {}
        for i, (token, _o, _d) in enumerate(plan):
            by_node.setdefault(parse(token).node, []).append(i)
        results: list[Any] = [None] * len(plan)

        async def one_node(node: str, idx: list[int]) -> None:
            got = await self._write_frame(node, [plan[i] for i in idx], batch=True)
            for i, value in zip(idx, got, strict=True):
                results[i] = value

        await asyncio.gather(*(one_node(n, idx) for n, idx in by_node.items()))
        if not return_exceptions:
            for value in results:
                if isinstance(value, FabricError):
                    raise value
        return results

    # -- frames ----------------------------------------------------------------

    async def _read_frame(self, node: str, items: Sequence[tuple[str, int, int, int]], *,
                          raise_failed: bool = True) -> list[Any]:
        """Items are ``(handle, offset, length, 0)``; see :meth:`_read_reply`."""
        return await self._read_reply(node, wire.encode(wire.KIND_READ, items), raise_failed=raise_failed)

    async def _read_one(self, node: str, token: str, offset: int, length: int) -> bytes:
        return cast(bytes, (await self._read_frame(node, [(token, offset, length, 0)]))[0])

    async def _read_reply(self, node: str, frame: bytes, *, raise_failed: bool = True) -> list[Any]:
        """Send a READ frame; the bytes of each item.

        A failed batch item raises its error (the first in item order), or with
        ``raise_failed=False`` stands in the list in place of its bytes.  A single
        item never gets a per-item status: it fails as an error reply.
        """
        # no Content-Type header: the frame's magic says what it is, and a header-less
        # request is a plain PUB, cheaper for nats-py and the server alike
        reply = await self.request(self._mem(node, "read"), frame)
        payloads, statuses = wire.decode_payloads(reply.data)
        out: list[Any] = payloads  # failed items are replaced by their errors below
        if statuses is not None:
            for i, status in enumerate(statuses):
                if status:
                    err = error_from_wire(status, f"batch item {i} failed with {status}")
                    if raise_failed:
                        raise err
                    out[i] = err
        return out

    async def _write_frame(self, node: str, items: Sequence[tuple[str, int, memoryview]], batch: bool = False) -> Any:
        frame = wire.encode(wire.KIND_WRITE, [(t, o, len(d), 0) for t, o, d in items], [d for _t, _o, d in items])
        return await self._send_write_frame(node, frame, batch)

    async def _send_write_frames(self, node: str, frames: Sequence[bytes]) -> list[int]:
        return cast("list[int]", await asyncio.gather(*(self._send_write_frame(node, f) for f in frames)))

    async def _send_write_frame(self, node: str, frame: bytes, batch: bool = False) -> Any:
        reply = await self.request(self._mem(node, "write"), frame)  # header-less, as for reads
        got = wire.decode(reply.data)
        out = [error_from_wire(st, f"batch item {i} failed") if st else n
               for i, (_h, _o, n, st) in enumerate(got.items)]
        if batch:
            return out
        if isinstance(out[0], FabricError):
            raise out[0]
        return out[0]

    async def _read_chunked(self, node: str, token: str, offset: int, length: int, chunk: int) -> bytes:
        return b"".join(await _in_flight(
            functools.partial(self._read_one, node, token, offset + i, min(chunk, length - i))
            for i in range(0, length, chunk)))

    # -- local fast path --------------------------------------------------------

    async def _local_view(self, h: HandleParts, token: str) -> SegmentView | None:
        local = self._local
        if not local.enabled or not h.writable:
            return None
        if not local.known(h):
            try:
                reply = await self._call(self._mem(h.node, "attach"), HandleRequest(handle=token), AttachReply)
            except FabricError:
                reply = None  # e.g. a stale handle: let the real operation report it
                if not local.known(h):
                    return None
            local.add(h, reply)
        return local.view(h)

    # -- compute cores -------------------------------------------------------------

    async def load_core(self, name: str, library: str | os.PathLike[str] | bytes | memoryview, *,
                        min_workers: int = 1, max_workers: int = 4, time_limit: float = 60.0, idle: float = 30.0,
                        node: str | None = None, external: bool = False, replace: bool = False,
                        unload_after: float | None = None) -> AsyncCore:
        """Load a compute core (a ``.so`` path or its bytes) into a warm pool; returns an :class:`AsyncCore`.

        *node* picks the spawner (default: any); *time_limit* (seconds, 0 = none) bounds one
        job; workers above *min_workers* retire after *idle* seconds; ``external=True`` also
        opens sockets where external v1 workers may join (``core.info.listen_unix`` / ``listen_tcp``).
        A library without the API symbols, or whose ``worker_init`` fails, raises CoreLoadFailed.

        Pools are named and shared: a node keeps one live pool per *name*.  Loading a name
        that is live there with the same library (sha256) and the same settings returns that
        pool (``core.reused`` is true; nothing starts); another library, or other settings,
        raises Conflict (409) naming the live pool, unless ``replace=True``: then a new pool
        starts and the old one drains (it takes no new jobs, finishes its queued and running
        ones, then its workers stop).  **A pool outlives this client**: it lives until
        :meth:`AsyncCore.unload` (``async with core:`` / ``with core:`` unload on exit, for
        everyone using that pool), until the spawner stops, or, with *unload_after* seconds,
        until it has had no job for that long (default: never).
        """
        if isinstance(library, (str, os.PathLike)):
            with open(library, "rb") as fh:
                library = fh.read()
        req = LoadCoreRequest(name=name, library=bytes(library), min_workers=min_workers, max_workers=max_workers,
                              time_limit_s=time_limit, idle_s=idle, external=external, replace=replace,
                              unload_after_s=unload_after or 0.0)
        subject = subjects.node_scoped("core", node, "load") if node else subjects.cluster("core", "load")
        reply = await self.request(subject, MSGPACK.encode(req), {CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE},
                                   timeout=max(self.timeout, 60.0))
        return AsyncCore(self, MSGPACK.decode(reply.data, CoreInfo))

    async def load_python_core(self, *, min_workers: int = 1, max_workers: int = 4, time_limit: float = 60.0,
                               idle: float = 30.0, node: str | None = None, replace: bool = False,
                               unload_after: float | None = None) -> AsyncCore:
        """A pool of the built-in Python worker: run functions with :meth:`AsyncCore.call`.

        The pool ``fabric.python`` of a node is shared and outlives this client, as in
        :meth:`load_core`: a second load with the same settings reuses it.
        """
        return await self.load_core(PYTHON_CORE, b"", min_workers=min_workers, max_workers=max_workers,
                                    time_limit=time_limit, idle=idle, node=node, replace=replace,
                                    unload_after=unload_after)

    async def cores(self, node: str) -> CoreListReply:
        """Every core loaded on *node*, with its pool's statistics."""
        reply = await self.request(subjects.node_scoped("core", node, "list"), b"{}")
        return JSON.decode(reply.data, CoreListReply)

    # -- remote processes (spawner) -------------------------------------------------

    async def rspawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                     stdin: bytes | None = None, limits: Limits | None = None, sandbox: Sandbox | None = None,
                     node: str | None = None, stdin_open: bool = False, strict: bool = True,
                     clear_env: bool = False, tail_bytes: int = 64 << 10, executable: bytes | None = None,
                     architecture: str | None = None, stream: bool = True) -> AsyncRemoteProcess:
        """Start *argv* on *node* (default: any spawner); returns at once with an :class:`AsyncRemoteProcess`.

        Its ``stdout``/``stderr`` iterate lines from the first byte (the client subscribes
        before the spawn, ``stream=False`` skips that), ``wait()`` returns the exit.
        *executable* sends a native (ELF) binary run as argv[0]: stored once per node by
        its sha256, later spawns send only the digest.  ``strict=False`` runs even when a
        limit cannot be enforced (``proc.unenforced`` says which).

        >>> proc = await fc.rspawn(["echo", "hi"])       # doctest: +SKIP
        >>> (await proc.wait()).stdout
        b'hi\\n'
        """
        req = _spawn_request(argv, env=env, cwd=cwd, stdin=stdin, limits=limits, sandbox=sandbox,
                             stdin_open=stdin_open, strict=strict, clear_env=clear_env, tail_bytes=tail_bytes,
                             owner=self.owner, executable=executable, architecture=architecture)
        out = _ProcOutput()
        sub = None
        if stream:
            if self.nc is None:
                raise Unavailable("client is not connected: use 'async with' or call connect()")
            req.stream_to = self.nc.new_inbox()
            sub = await self.nc.subscribe(req.stream_to, cb=out.on_message)
        out.sub = sub  # set before the spawn: the exit may arrive before its reply
        out.streamed = stream
        try:
            reply = await self._spawn_call(node, req)
        except BaseException:
            if out.sub is not None:
                await out.sub.unsubscribe()
            raise
        return AsyncRemoteProcess(self, reply, out)

    async def _spawn_call(self, node: str | None, req: SpawnRequest, timeout: float | None = None) -> SpawnReply:
        subject = subjects.node_scoped("proc", node, "spawn") if node else subjects.cluster("proc", "spawn")
        native = req.native
        if native is not None and native.data is not None and self.nc is not None \
                and len(native.data) * 4 // 3 + FRAME_OVERHEAD > self.nc.max_payload:
            raise TooLarge(f"a {len(native.data)}-byte executable does not fit one request (base64 in JSON) under "
                           f"the server's max payload of {self.nc.max_payload} bytes")
        if native is not None and native.data is not None:
            # by digest first: the node may have it already, then nothing is resent
            data, native.data = native.data, None
            try:
                return await self._call(subject, req, SpawnReply, timeout)
            except ExecutableNotFound:
                native.data = data
        return await self._call(subject, req, SpawnReply, timeout)

    async def rrun(self, argv: Sequence[str], *, timeout: float = 60.0, node: str | None = None,
                   announce: bool = False, **options: Any) -> ExitInfo:
        """Run *argv* to its end in ONE round trip (the spawn waits up to *timeout* s for the exit).

        Returns the exit (with the output tails); raises ``TimeoutError`` -- after killing
        the process -- when it is still running after *timeout*.  The output is not
        published on the process's subject unless ``announce=True`` (the reply carries
        it).  *options* are rspawn's.
        """
        req = _spawn_request(argv, owner=self.owner, **options)
        req.wait_s = timeout
        req.announce = announce
        reply = await self._spawn_call(node, req, timeout + self.timeout)
        if reply.exit is None:
            await self.rkill(reply.id)
            raise TimeoutError(f"process {reply.id} still running after {timeout}s: killed")
        return reply.exit

    async def rwait(self, proc: str | AsyncRemoteProcess, timeout: float | None = None) -> ExitInfo:
        """Wait for the process to end; ``TimeoutError`` if it still runs after *timeout* seconds."""
        proc_id = _proc_id(proc)
        subject = subjects.node_scoped("proc", _proc_node(proc_id), "wait")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = 60.0 if deadline is None else max(0.0, deadline - loop.time())
            step = min(left, 60.0)
            st = await self._call(subject, WaitRequest(id=proc_id, timeout_s=step), ProcStatus, step + self.timeout)
            if st.exit is not None:
                return st.exit
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"process {proc_id} still running after {timeout}s")

    async def rkill(self, proc: str | AsyncRemoteProcess, signal: int | str = "SIGKILL") -> bool:
        """Send *signal* to the process's whole group; False when it had already ended."""
        proc_id = _proc_id(proc)
        if isinstance(signal, bool) or not isinstance(signal, (int, str)):
            raise BadRequest(f"signal must be a number or a name like 'SIGTERM', got {type(signal).__name__}")
        r = await self._call(subjects.node_scoped("proc", _proc_node(proc_id), "kill"),
                             KillRequest(id=proc_id, signal=signal), KillReply)
        return r.delivered

    async def rwrite_stdin(self, proc: str | AsyncRemoteProcess, data: bytes, *, eof: bool = False) -> int:
        """Write to the stdin of a process spawned with ``stdin_open=True``; ``eof`` closes it."""
        proc_id = _proc_id(proc)
        r = await self._call(subjects.node_scoped("proc", _proc_node(proc_id), "stdin"),
                             StdinRequest(id=proc_id, data=bytes(data), eof=eof), StdinReply)
        return r.written

    async def rstatus(self, proc: str | AsyncRemoteProcess) -> ProcStatus:
        """State, live CPU %, RSS and member count of the process (its whole group)."""
        proc_id = _proc_id(proc)
        return await self._call(subjects.node_scoped("proc", _proc_node(proc_id), "status"),
                                ProcRequest(id=proc_id), ProcStatus)

    async def rlist(self, node: str, *, finished: bool = False) -> list[ProcStatus]:
        r = await self._call(subjects.node_scoped("proc", node, "list"), ProcListRequest(finished=finished),
                             ProcListReply)
        return r.processes

    async def spawner_info(self, node: str) -> SpawnerInfoReply:
        return await self._call(subjects.node_scoped("proc", node, "info"), ProcListRequest(), SpawnerInfoReply)

    # -- nodes and devices (gpu-monitor) ------------------------------------------

    async def nodes(self) -> list[NodeRecord]:
        """Every node in the registry, live: what it is, its CPUs, memory, disks, network, GPUs.

        A node whose heartbeats stopped has ``status == "stale"`` until its registry entry
        expires.  Raises :class:`Unavailable` when no gpu-monitor runs.
        """
        reply = await self.request(subjects.cluster("nodes", "list"), b"{}")
        return JSON.decode(reply.data, NodeListReply).nodes

    async def node(self, node: str) -> NodeRecord:
        """One node's registry record; :class:`UnknownNode` (404) when it is not there."""
        return await self._call(subjects.cluster("nodes", "get"), NodeRequest(node=node), NodeRecord)

    async def devices(self) -> list[DeviceRecord]:
        """Every node in the shape of UDCS's ``GET /api/devices`` (id, hostname, gpus, cpu_cores, ...)."""
        reply = await self.request(subjects.cluster("nodes", "devices"), b"{}")
        return JSON.decode(reply.data, DevicesReply).devices

    async def gpus(self, node: str) -> GpuListReply:
        """*node*'s GPUs sampled now: free memory, utilisation, and the fabric jobs holding each."""
        reply = await self.request(subjects.node_scoped("nodes", node, "gpus"), b"{}")
        return JSON.decode(reply.data, GpuListReply)

    # -- OpenCL kernels as jobs ------------------------------------------------------

    async def opencl(self, source: str, kernel: str, global_size: int | Sequence[int], args: Sequence[Any], *,
                     local_size: int | Sequence[int] | None = None, device: str | None = None,
                     check_sizes: bool = True, timeout: float | None = None) -> list[Any]:
        """Run an OpenCL *kernel* from *source* on the best device the fabric has; the outputs, in order.

        Each of *args*, in the kernel's parameter order, is a numpy array (an input buffer),
        :class:`fabric.Out` ``(shape, dtype)`` (an output buffer) or a numpy scalar.
        *device*: an OpenCL device id from :meth:`nodes` (``"<node>:cl:<p>:<d>"``), a node
        name, ``"gpu"`` or ``"cpu"``; by default a GPU where there is one, else a CPU.
        ``check_sizes`` refuses a buffer smaller than the number of work items (turn it off
        for kernels whose buffers are not one element per work item, such as a matmul).
        A kernel that does not compile raises :class:`KernelBuildFailed` (400) with its ``build_log``.

        >>> out, = await fc.opencl(VADD, "vadd", n, [a, b, Out(n, "float32")])   # doctest: +SKIP
        """
        from .opencl import run_opencl  # numpy and the frame codec load on first use

        return await run_opencl(self, source, kernel, global_size, args, local_size=local_size, device=device,
                                check_sizes=check_sizes, timeout=timeout)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise BadRequest(f"size must be an int, got {type(size).__name__}")
    if size < 0:
        raise BadRequest(f"size must not be negative, got {size}")
    return size


class AsyncRemoteBuffer:
    """A remote block for the async client: ``async with`` frees it."""

    def __init__(self, client: AsyncFabricClient, handle: str, size: int) -> None:
        self.client = client
        self.handle = handle
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __str__(self) -> str:
        return self.handle

    def __repr__(self) -> str:
        return f"AsyncRemoteBuffer(size={self.size}, handle={self.handle!r})"

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


class FabricClient:
    """The synchronous client: the async client on a private event loop in a background thread.

    ``with FabricClient(url) as fc: buf = fc.rmalloc(1024)``.  Local fast-path reads and
    writes run in the calling thread.  Thread-safe.
    """

    def __init__(self, url: str | None = None, *, owner: str | None = None, timeout: float = 10.0,
                 local: bool = True, name: str = "fabric-client",
                 read_chunk_size: int = DEFAULT_READ_CHUNK_SIZE) -> None:
        self._aio = AsyncFabricClient(url, owner=owner, timeout=timeout, local=local, name=name,
                                      read_chunk_size=read_chunk_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._aio.url

    @property
    def aio(self) -> AsyncFabricClient:
        """The underlying async client (runs on this client's loop)."""
        return self._aio

    def connect(self) -> FabricClient:
        if self._loop is None:
            loop: asyncio.AbstractEventLoop
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:  # pragma: no cover
                loop = asyncio.new_event_loop()
            self._loop = loop
            self._thread = threading.Thread(target=loop.run_forever, name="fabric-client-loop", daemon=True)
            self._thread.start()
            try:
                self._run(self._aio.connect())
            except BaseException:
                self._stop_loop()
                raise
        return self

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._run(self._aio.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            loop.close()

    def __enter__(self) -> FabricClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            raise Unavailable("client is not connected: use 'with FabricClient(...)' or call connect()")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _wrap(self, abuf: AsyncRemoteBuffer) -> RemoteBuffer:
        return RemoteBuffer(self, abuf.handle, abuf.size)

    # -- memory ----------------------------------------------------------------

    def rmalloc(self, size: int, *, ttl: float | None = None, node: str | None = None,
                owner: str | None = None, keepalive: bool = True) -> RemoteBuffer:
        """Allocate *size* zeroed bytes; returns a :class:`RemoteBuffer` (usable wherever a handle is).

        *ttl* leases the block, renewed by this client while it is open (see
        :meth:`AsyncFabricClient.rmalloc`).
        """
        return self._wrap(self._run(self._aio.rmalloc(size, ttl=ttl, node=node, owner=owner,
                                                      keepalive=keepalive)))

    def rfree(self, handle: str | RemoteBuffer) -> int:
        return self._run(self._aio.rfree(_token(handle)))

    def rrealloc(self, handle: str | RemoteBuffer, size: int) -> RemoteBuffer:
        abuf = self._run(self._aio.rrealloc(_token(handle), size))
        if isinstance(handle, RemoteBuffer):
            handle.handle, handle.size = abuf.handle, abuf.size
            return handle
        return self._wrap(abuf)

    def rstat(self, handle: str | RemoteBuffer) -> StatReply:
        return self._run(self._aio.rstat(_token(handle)))

    def rshare(self, handle: str | RemoteBuffer) -> str:
        return self._run(self._aio.rshare(_token(handle)))

    def renew(self, handle: str | RemoteBuffer, ttl: float) -> int:
        return self._run(self._aio.renew(_token(handle), ttl))

    def meminfo(self, node: str) -> MemInfoReply:
        return self._run(self._aio.meminfo(node))

    @_arguments_checked
    def rwrite(self, handle: str | RemoteBuffer, data: Any, offset: int = 0) -> int:
        token = _token(handle)
        h = parse(token)
        aio = self._aio
        view = aio._local.view(h)
        if view is not None:  # local fast path, in this thread
            return view.write(h.off, h.gen, offset, data)
        mv = memoryview(data).cast("B")
        if aio._local.enabled and h.writable and not aio._local.known(h):
            return self._run(aio.rwrite(token, mv, offset))  # first use: attach (or learn it is remote)
        # Build the frames here, in the caller's thread: a big buffer allocated in the
        # loop thread comes from that thread's malloc arena, which glibc shrinks with
        # madvise after each free, so every large write would fault its pages in anew
        # (about 2 ms per MiB on this VM, measured by bench/mem.py's 1 MiB write).
        chunk, size = aio.write_chunk, len(mv)
        if size <= chunk:
            frame = wire.encode(wire.KIND_WRITE, [(token, offset, size, 0)], [mv])
            return cast(int, self._run(aio._send_write_frame(h.node, frame)))
        written = 0
        window = chunk * CHUNKS_IN_FLIGHT  # a window of chunks at a time bounds the memory held
        for start in range(0, size, window):
            frames = [wire.encode(wire.KIND_WRITE, [(token, offset + i, min(chunk, size - i), 0)], [mv[i:i + chunk]])
                      for i in range(start, min(start + window, size), chunk)]
            written += sum(self._run(aio._send_write_frames(h.node, frames)))
        return written

    @_arguments_checked
    def rread(self, handle: str | RemoteBuffer, length: int | None = None, offset: int = 0) -> bytes:
        token = _token(handle)
        h = parse(token)
        view = self._aio._local.view(h)
        if view is not None:  # local fast path, in this thread
            return view.read(h.off, h.gen, offset, _local_length(length))
        if length is None and isinstance(handle, RemoteBuffer):
            length = max(handle.size - offset, 0)
        return self._run(self._aio.rread(token, length, offset))

    @_arguments_checked
    def rreadv(self, items: Iterable[tuple[Any, int, int | None]], *,
               return_exceptions: bool = False) -> list[bytes | FabricError]:
        plan = [(_token(hd), o, n) for hd, o, n in items]
        return self._run(self._aio.rreadv(plan, return_exceptions=return_exceptions))

    @_arguments_checked
    def rwritev(self, items: Iterable[tuple[Any, int, Any]], *,
                return_exceptions: bool = False) -> list[int | FabricError]:
        plan = [(_token(hd), o, d) for hd, o, d in items]
        return self._run(self._aio.rwritev(plan, return_exceptions=return_exceptions))

    def request(self, subject: str, data: bytes = b"", headers: dict[str, str] | None = None,
                timeout: float | None = None) -> Any:
        return self._run(self._aio.request(subject, data, headers, timeout))

    # -- compute cores -------------------------------------------------------------

    def load_core(self, name: str, library: str | os.PathLike[str] | bytes | memoryview, *, min_workers: int = 1,
                  max_workers: int = 4, time_limit: float = 60.0, idle: float = 30.0, node: str | None = None,
                  external: bool = False, replace: bool = False, unload_after: float | None = None) -> Core:
        """Load a compute core into a warm pool (see :meth:`AsyncFabricClient.load_core`).

        The pool is shared by name and outlives this client: it lives until ``core.unload()``
        (``with client.load_core(...) as core:`` unloads on exit), the spawner stops, or
        *unload_after* seconds without a job.  Loading it again with the same library and
        settings reuses it (``core.reused``); otherwise Conflict, unless ``replace=True``.
        """
        return Core(self, self._run(self._aio.load_core(
            name, library, min_workers=min_workers, max_workers=max_workers, time_limit=time_limit, idle=idle,
            node=node, external=external, replace=replace, unload_after=unload_after)))

    def load_python_core(self, *, min_workers: int = 1, max_workers: int = 4, time_limit: float = 60.0,
                         idle: float = 30.0, node: str | None = None, replace: bool = False,
                         unload_after: float | None = None) -> Core:
        """A pool of the built-in Python worker: ``core.call(fn, *args)`` (shared, see :meth:`load_core`)."""
        return self.load_core(PYTHON_CORE, b"", min_workers=min_workers, max_workers=max_workers,
                              time_limit=time_limit, idle=idle, node=node, replace=replace,
                              unload_after=unload_after)

    def cores(self, node: str) -> CoreListReply:
        return self._run(self._aio.cores(node))

    # -- remote processes (spawner) -------------------------------------------------

    def rspawn(self, argv: Sequence[str], **options: Any) -> RemoteProcess:
        """Start *argv* remotely; see :meth:`AsyncFabricClient.rspawn` for the options.

        ::

            proc = fc.rspawn(["sh", "-c", "echo hi; exit 3"], limits=Limits(wall_s=10))
            for line in proc.stdout:
                print(line)
            assert proc.wait().exit_code == 3
        """
        return RemoteProcess(self, self._run(self._aio.rspawn(argv, **options)))

    def rrun(self, argv: Sequence[str], *, timeout: float = 60.0, node: str | None = None,
             announce: bool = False, **options: Any) -> ExitInfo:
        """Run *argv* to its end in one round trip; see :meth:`AsyncFabricClient.rrun`."""
        return self._run(self._aio.rrun(argv, timeout=timeout, node=node, announce=announce, **options))

    def rwait(self, proc: str | RemoteProcess, timeout: float | None = None) -> ExitInfo:
        return self._run(self._aio.rwait(_proc_id(proc), timeout))

    def rkill(self, proc: str | RemoteProcess, signal: int | str = "SIGKILL") -> bool:
        return self._run(self._aio.rkill(_proc_id(proc), signal))

    def rwrite_stdin(self, proc: str | RemoteProcess, data: bytes, *, eof: bool = False) -> int:
        return self._run(self._aio.rwrite_stdin(_proc_id(proc), data, eof=eof))

    def rstatus(self, proc: str | RemoteProcess) -> ProcStatus:
        return self._run(self._aio.rstatus(_proc_id(proc)))

    def rlist(self, node: str, *, finished: bool = False) -> list[ProcStatus]:
        return self._run(self._aio.rlist(node, finished=finished))

    def spawner_info(self, node: str) -> SpawnerInfoReply:
        return self._run(self._aio.spawner_info(node))

    # -- nodes and devices (gpu-monitor) ------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        """Every node in the registry, live; see :meth:`AsyncFabricClient.nodes`."""
        return self._run(self._aio.nodes())

    def node(self, node: str) -> NodeRecord:
        return self._run(self._aio.node(node))

    def devices(self) -> list[DeviceRecord]:
        """Every node in the UDCS ``GET /api/devices`` shape."""
        return self._run(self._aio.devices())

    def gpus(self, node: str) -> GpuListReply:
        return self._run(self._aio.gpus(node))

    def opencl(self, source: str, kernel: str, global_size: int | Sequence[int], args: Sequence[Any],
               **options: Any) -> list[Any]:
        """Run an OpenCL kernel as a fabric job; see :meth:`AsyncFabricClient.opencl`."""
        return self._run(self._aio.opencl(source, kernel, global_size, args, **options))


class RemoteBuffer:
    """A remote block: ``len()``, slicing reads and writes, and ``with`` frees it.

    ::

        with fc.rmalloc(16) as buf:
            buf[0:5] = b"hello"
            assert buf[0:5] == b"hello" and len(buf) == 16
    """

    def __init__(self, client: FabricClient, handle: str, size: int) -> None:
        self.client = client
        self.handle = handle
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __str__(self) -> str:
        return self.handle

    def __repr__(self) -> str:
        return f"RemoteBuffer(size={self.size}, handle={self.handle!r})"

    def _span(self, key: slice) -> tuple[int, int]:
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise BadRequest("RemoteBuffer slices must have step 1")
        return start, max(stop - start, 0)

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytes: ...

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            start, n = self._span(key)
            return self.client.rread(self, n, start) if n else b""
        index = key + self.size if key < 0 else key
        if not 0 <= index < self.size:
            raise IndexError("RemoteBuffer index out of range")
        return self.client.rread(self, 1, index)[0]

    def __setitem__(self, key: int | slice, value: Any) -> None:
        if isinstance(key, slice):
            start, n = self._span(key)
            data = memoryview(value).cast("B")
            if len(data) != n:
                raise BadRequest(f"slice assignment needs exactly {n} bytes, got {len(data)}")
            if n:
                self.client.rwrite(self, data, start)
            return
        index = key + self.size if key < 0 else key
        if not 0 <= index < self.size:
            raise IndexError("RemoteBuffer index out of range")
        self.client.rwrite(self, bytes([value]), index)

    def read(self, length: int | None = None, offset: int = 0) -> bytes:
        return self.client.rread(self, length, offset)

    def write(self, data: Any, offset: int = 0) -> int:
        return self.client.rwrite(self, data, offset)

    def free(self) -> int:
        return self.client.rfree(self)

    def __enter__(self) -> RemoteBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


# -- remote processes ------------------------------------------------------------------


def _proc_id(proc: Any) -> str:
    proc_id = proc.id if isinstance(proc, (AsyncRemoteProcess, RemoteProcess)) else proc
    if not isinstance(proc_id, str) or proc_id.count(":") != 1:
        raise BadRequest(f"not a process id (expected '<node>:<local>'): {proc_id!r}")
    return proc_id


def _proc_node(proc_id: str) -> str:
    return proc_id.partition(":")[0]


def _spawn_request(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   stdin: bytes | None = None, limits: Limits | None = None, sandbox: Sandbox | None = None,
                   stdin_open: bool = False, strict: bool = True, clear_env: bool = False,
                   tail_bytes: int = 64 << 10, owner: str = "", executable: bytes | None = None,
                   architecture: str | None = None) -> SpawnRequest:
    """Check what a caller passed (typed errors before anything travels) and build the request."""
    if isinstance(argv, (str, bytes)) or not isinstance(argv, (list, tuple)):
        raise BadRequest(f"argv must be a list of strings, got {type(argv).__name__}")
    if not argv:
        raise BadRequest("argv must not be empty")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise BadRequest(f"argv[{i}] must be a str, got {type(arg).__name__}")
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in env.items())):
        raise BadRequest("env must be a dict of str to str")
    if limits is not None and not isinstance(limits, Limits):
        raise BadRequest(f"limits must be a fabric.Limits, got {type(limits).__name__}")
    if sandbox is not None and not isinstance(sandbox, Sandbox):
        raise BadRequest(f"sandbox must be a fabric.Sandbox, got {type(sandbox).__name__}")
    native = None
    if executable is not None:
        data = bytes(executable)
        native = NativeExec(sha256=hashlib.sha256(data).hexdigest(),
                            architecture=architecture or platform.machine(), data=data)
    req = SpawnRequest(argv=list(argv), env=env, cwd=cwd, stdin=None if stdin is None else bytes(stdin),
                       stdin_open=stdin_open, limits=limits, sandbox=sandbox, strict=strict, clear_env=clear_env,
                       tail_bytes=tail_bytes, owner=owner, native=native)
    # the same validation the spawner applies (negative limits, wrong types), raised here as BadRequest
    JSON.decode(JSON.encode(req), SpawnRequest)
    return req


class _ProcOutput:
    """What the spawner streamed to this client's inbox: the chunks of each stream, then the exit.

    Filled on the client's loop; read from it (async iterators) or from any thread
    (the sync client's iterators wait on the condition).
    """

    def __init__(self) -> None:
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.exit: ExitInfo | None = None
        self.cond = threading.Condition()
        self.changed = asyncio.Event()
        self.sub: Any = None
        self.streamed = True

    def check_streamed(self) -> None:
        if not self.streamed:
            raise BadRequest("this process was spawned with stream=False: it has no output stream here "
                             "(wait() returns the tails)")

    async def on_message(self, msg: Any) -> None:
        stream = (msg.headers or {}).get("Fabric-Stream", "")
        with self.cond:
            if stream in self.chunks:
                self.chunks[stream].append(msg.data)
            elif stream == "exit":
                self.exit = JSON.decode(msg.data, ExitInfo)
            self.cond.notify_all()
        old, self.changed = self.changed, asyncio.Event()
        old.set()
        if stream == "exit" and self.sub is not None:
            sub, self.sub = self.sub, None
            await sub.unsubscribe()

    def take(self, stream: str, index: int) -> tuple[list[bytes], bool]:
        """Chunks from *index* on, and whether the stream is complete (the exit arrived)."""
        with self.cond:
            return self.chunks[stream][index:], self.exit is not None


def _split_lines(pending: bytes, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    data = pending + b"".join(chunks)
    lines = data.split(b"\n")
    rest = lines.pop()
    return [line + b"\n" for line in lines], rest


class AsyncRemoteProcess:
    """A process started by :meth:`AsyncFabricClient.rspawn`.

    ``id`` (``<node>:<local>``) reaches it from anywhere; ``async for line in proc.stdout``
    yields its output lines (bytes, with their ``\\n``) from the very first one;
    ``await proc.wait()`` returns the :class:`~fabric.schema.ExitInfo`.
    """

    def __init__(self, client: AsyncFabricClient, reply: SpawnReply, out: _ProcOutput) -> None:
        self.client = client
        self.id = reply.id
        self.node = reply.node
        self.pid = reply.pid
        self.subject = reply.subject
        self.enforced = reply.enforced
        self.unenforced = reply.unenforced
        self._out = out

    def __repr__(self) -> str:
        return f"AsyncRemoteProcess(id={self.id!r}, pid={self.pid})"

    @property
    def stdout(self) -> AsyncIterator[bytes]:
        return self._lines("stdout")

    @property
    def stderr(self) -> AsyncIterator[bytes]:
        return self._lines("stderr")

    async def _lines(self, stream: str) -> AsyncIterator[bytes]:
        out, index, pending = self._out, 0, b""
        out.check_streamed()
        while True:
            changed = out.changed
            chunks, complete = out.take(stream, index)
            index += len(chunks)
            lines, pending = _split_lines(pending, chunks)
            for line in lines:
                yield line
            if complete and not chunks:
                if pending:
                    yield pending
                return
            if not chunks:
                await changed.wait()

    async def wait(self, timeout: float | None = None) -> ExitInfo:
        """The exit (``exit_code``, ``signal``, ``cpu_s``, ``max_rss`` and ``max_rss_exact``, ``duration_s``, tails)."""
        if self._out.exit is not None:
            return self._out.exit
        return await self.client.rwait(self.id, timeout)

    async def kill(self, signal: int | str = "SIGKILL") -> bool:
        return await self.client.rkill(self.id, signal)

    async def write_stdin(self, data: bytes, *, eof: bool = False) -> int:
        return await self.client.rwrite_stdin(self.id, data, eof=eof)

    async def status(self) -> ProcStatus:
        return await self.client.rstatus(self.id)


class RemoteProcess:
    """A process started by :meth:`FabricClient.rspawn` (see :class:`AsyncRemoteProcess`).

    ``for line in proc.stdout`` blocks for each next line and ends at the process's end.
    """

    def __init__(self, client: FabricClient, aproc: AsyncRemoteProcess) -> None:
        self.client = client
        self.aio = aproc
        self.id, self.node, self.pid, self.subject = aproc.id, aproc.node, aproc.pid, aproc.subject
        self.enforced, self.unenforced = aproc.enforced, aproc.unenforced

    def __repr__(self) -> str:
        return f"RemoteProcess(id={self.id!r}, pid={self.pid})"

    @property
    def stdout(self) -> Iterator[bytes]:
        return self._lines("stdout")

    @property
    def stderr(self) -> Iterator[bytes]:
        return self._lines("stderr")

    def _lines(self, stream: str) -> Iterator[bytes]:
        out, index, pending = self.aio._out, 0, b""
        out.check_streamed()
        while True:
            with out.cond:
                chunks, complete = out.chunks[stream][index:], out.exit is not None
                if not chunks and not complete:
                    out.cond.wait(1.0)
                    continue
            index += len(chunks)
            lines, pending = _split_lines(pending, chunks)
            yield from lines
            if complete and not chunks:
                if pending:
                    yield pending
                return

    def wait(self, timeout: float | None = None) -> ExitInfo:
        if self.aio._out.exit is not None:
            return self.aio._out.exit
        return self.client.rwait(self.id, timeout)

    def kill(self, signal: int | str = "SIGKILL") -> bool:
        return self.client.rkill(self.id, signal)

    def write_stdin(self, data: bytes, *, eof: bool = False) -> int:
        return self.client.rwrite_stdin(self.id, data, eof=eof)

    def status(self) -> ProcStatus:
        return self.client.rstatus(self.id)


# what rreadv's C fast path accepts in place of a token (it reads their .handle)
_BUFFER_TYPES = (RemoteBuffer, AsyncRemoteBuffer)


# -- compute cores -------------------------------------------------------------------

#: the built-in Python worker's core name
PYTHON_CORE = "fabric.python"
#: the header of a job_failed reply that carries the core's exit code
EXIT_CODE_HEADER = "Fabric-Exit-Code"
#: jobs per map request, and map requests in flight at a time
MAP_BATCH = 128
MAP_IN_FLIGHT = 6


def _job_error(code: int, err: int, out: memoryview, core: AsyncCore, index: int | None = None) -> FabricError:
    if err:
        kind, _, text = bytes(out).decode("utf-8", "replace").partition("\n")
        return error_from_wire(err, text, kind)
    return JobFailed(f"core {core.name!r} returned exit code {code}", exit_code=code, output=bytes(out),
                     core=core.id, index=index)


class AsyncCore:
    """A compute core loaded in a warm pool on one node: ``await core.run(data)``.

    ::

        core = await fc.load_core("sha256", "build/sha256.so", max_workers=2)
        digest = await core.run(b"hello")
        digests = await core.map([b"a", b"b", b"c"])      # in input order
        await core.unload()

    The pool is named and shared on its node, and it outlives the client: it lives until
    :meth:`unload` (``async with core:`` unloads on exit, for every user of the pool), until
    the spawner stops, or until it has had no job for the load's ``unload_after`` seconds.
    ``reused`` says the load found the pool live and returned it; ``digest`` identifies its
    library (sha256 hex, or ``fabric.python``).
    """

    def __init__(self, client: AsyncFabricClient, info: CoreInfo) -> None:
        self.client = client
        self.info = info
        self.id = info.core
        self.node = info.node
        self.name = info.name
        self._run_subject = subjects.node_scoped("core", info.node, "run") + "." + info.core
        self._map_subject = subjects.node_scoped("core", info.node, "map") + "." + info.core

    def __repr__(self) -> str:
        return f"AsyncCore(name={self.name!r}, core={self.id!r}, node={self.node!r})"

    @property
    def reused(self) -> bool:
        """The load returned a pool that was already live (loaded before, by anyone)."""
        return self.info.reused

    @property
    def digest(self) -> str:
        return self.info.digest

    async def __aenter__(self) -> AsyncCore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unload()

    def _job_timeout(self, jobs: int = 1) -> float:
        limit = self.info.time_limit_s or 3600.0
        waves = -(-jobs // max(self.info.max_workers, 1))
        return max(self.client.timeout, (limit + 1.0) * waves + 5.0)

    async def _send(self, subject: str, data: Any, timeout: float) -> Any:
        nc = self.client.nc
        if nc is None:
            raise Unavailable("client is not connected: use 'async with' or call connect()")
        try:
            return await nc.request(subject, data, timeout=timeout)
        except NoRespondersError:
            raise Unavailable(f"no spawner answers on {subject} (node {self.node} down?)") from None
        except NatsTimeout:
            raise Unavailable(f"job request on {subject} timed out after {timeout:g}s") from None
        except MaxPayloadError:
            raise TooLarge(f"a job request of {len(data)} bytes is above the NATS server's max payload of "
                           f"{nc.max_payload} bytes: pass large inputs in remote memory (a handle), or split "
                           f"the batch") from None

    async def run(self, data: Any, *, timeout: float | None = None) -> bytes:
        """Run one job; its output bytes.  Nonzero exit raises JobFailed (``exit_code``, ``output``);
        a crash WorkerCrashed; past the time limit JobTimeout; an input or output too large for
        one NATS message (or one ring record) TooLarge, at once."""
        msg = await self._send(self._run_subject, data, timeout or self._job_timeout())
        hdrs = msg.headers
        if hdrs and ERROR_CODE_HEADER in hdrs:
            exc = error_from_wire(hdrs[ERROR_CODE_HEADER], hdrs.get(ERROR_HEADER, ""), hdrs.get(ERROR_KIND_HEADER))
            if isinstance(exc, JobFailed) and EXIT_CODE_HEADER in hdrs:
                exc = JobFailed(exc.message, exit_code=int(hdrs[EXIT_CODE_HEADER]), output=msg.data, core=self.id)
            raise exc
        return cast(bytes, msg.data)

    async def map(self, items: Iterable[Any], *, batch_size: int = MAP_BATCH, in_flight: int = MAP_IN_FLIGHT,
                  return_exceptions: bool = False, timeout: float | None = None) -> list[Any]:
        """Run one job per item; outputs in input order.  Batches of *batch_size* jobs travel
        as one request each, *in_flight* requests at a time.  The first failed job (in input
        order) raises, or with ``return_exceptions=True`` stands in the list in its place.  A batch
        reply carries the outputs that fit the server's max payload; a job whose output does not
        fit what is left gets TooLarge in its place (a smaller *batch_size* avoids that)."""
        jobs = items if isinstance(items, list) else list(items)
        if batch_size < 1 or in_flight < 1:
            raise BadRequest("batch_size and in_flight must be at least 1")
        results: list[Any] = [None] * len(jobs)
        per_batch = timeout or self._job_timeout(batch_size * in_flight)

        async def one(start: int) -> None:
            chunk = jobs[start:start + batch_size]
            msg = await self._send(self._map_subject, encode_job_batch(chunk), per_batch)
            hdrs = msg.headers
            if hdrs and ERROR_CODE_HEADER in hdrs:
                raise error_from_wire(hdrs[ERROR_CODE_HEADER], hdrs.get(ERROR_HEADER, ""), hdrs.get(ERROR_KIND_HEADER))
            got = decode_job_results(msg.data)
            if len(got) != len(chunk):
                raise InternalError(f"map reply carries {len(got)} results for {len(chunk)} jobs")
            for i, (code, err, out) in enumerate(got, start):
                results[i] = bytes(out) if not (code or err) else _job_error(code, err, out, self, i)

        await _in_flight([functools.partial(one, s) for s in range(0, len(jobs), batch_size)], in_flight)
        if not return_exceptions:
            for value in results:
                if isinstance(value, FabricError):
                    raise value
        return results

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the built-in Python worker; its result.

        An exception in *fn* raises JobFailed with ``remote_type``, ``remote_message`` and
        ``remote_traceback``.
        """
        import pickle

        import cloudpickle

        try:
            out = await self.run(cloudpickle.dumps((fn, args, kwargs)))
        except JobFailed as exc:
            if getattr(exc, "exit_code", None) != 1 or not getattr(exc, "output", b""):
                raise
            try:
                type_name, message, tb = pickle.loads(exc.output)
            except Exception:
                raise exc from None
            raise JobFailed(f"{type_name}: {message}", exit_code=1, core=self.id, remote_type=type_name,
                            remote_message=message, remote_traceback=tb) from None
        return cast(T, pickle.loads(out))  # noqa: S301 - the result of our own function, from our own worker

    async def stats(self) -> CoreInfo:
        """The pool's statistics now (workers, queue, jobs done, crashes...)."""
        reply = await self.client.request(subjects.node_scoped("core", self.node, "stats"),
                                          JSON.encode(CoreRequest(core=self.id)))
        self.info = JSON.decode(reply.data, CoreInfo)
        return self.info

    async def unload(self) -> CoreInfo:
        """Unload the pool now, for everyone using it: queued jobs fail, its workers stop, later
        jobs raise NotFound.  Unloading a pool that a ``replace`` left draining stops it at once."""
        reply = await self.client.request(subjects.node_scoped("core", self.node, "unload"),
                                          JSON.encode(CoreRequest(core=self.id)))
        return JSON.decode(reply.data, CoreInfo)


class Core:
    """The synchronous face of :class:`AsyncCore`: ``core.run(b"...")``, ``core.map(items)``, ``core.call(fn)``.

    The pool outlives the client (see :meth:`FabricClient.load_core`); ``with`` unloads it on exit.
    """

    def __init__(self, client: FabricClient, aio: AsyncCore) -> None:
        self.client = client
        self.aio = aio

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def node(self) -> str:
        return self.aio.node

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def info(self) -> CoreInfo:
        return self.aio.info

    @property
    def reused(self) -> bool:
        return self.aio.reused

    @property
    def digest(self) -> str:
        return self.aio.digest

    def __repr__(self) -> str:
        return f"Core(name={self.name!r}, core={self.id!r}, node={self.node!r})"

    def run(self, data: Any, *, timeout: float | None = None) -> bytes:
        return self.client._run(self.aio.run(data, timeout=timeout))

    def map(self, items: Iterable[Any], *, batch_size: int = MAP_BATCH, in_flight: int = MAP_IN_FLIGHT,
            return_exceptions: bool = False, timeout: float | None = None) -> list[Any]:
        return self.client._run(self.aio.map(list(items), batch_size=batch_size, in_flight=in_flight,
                                             return_exceptions=return_exceptions, timeout=timeout))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.client._run(self.aio.call(fn, *args, **kwargs))

    def stats(self) -> CoreInfo:
        return self.client._run(self.aio.stats())

    def unload(self) -> CoreInfo:
        return self.client._run(self.aio.unload())

    def __enter__(self) -> Core:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()
