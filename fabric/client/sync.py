"""FabricClient and the sync RemoteBuffer, RemoteProcess and Core: the async ones on a private loop.

The sync client runs an :class:`~fabric.client.AsyncFabricClient` on an event loop in a
background thread.  Its methods are generated from the async ones
(:func:`~fabric.client.twin.sync_method`: same signature with the sync types, same
docstring); only what really differs is written here: the lifecycle of the loop, the
memory calls that work in the caller's thread (the local fast path, the data plane, and
frames built where the data is), the buffer's slicing, a process's blocking line iterators.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from ..errors import BadRequest, FabricError, TooLarge, Unavailable
from ..handles import _PARSED, HandleParts
from ..handles import parse_cached as parse
from ..protocol import wire
from ..schema import CoreInfo, ExitInfo, TicketReply
from ..schema.tasks import PYTHON, Resources
from .aio import AsyncFabricClient
from .buffers import _BUFFER_TYPES, AsyncRemoteBuffer, BufferRef, _token
from .cores import AsyncCore
from .dataplane import NATS
from .dataplane_sync import SyncDataPlane
from .futures import TaskFuture, TaskProgress
from .local import _local_length
from .processes import AsyncRemoteProcess, ProcessRef, _split_lines
from .tasks import AsyncTaskFuture
from .transport import CHUNKS_IN_FLIGHT, DEFAULT_READ_CHUNK_SIZE, _arguments_checked
from .twin import sync_method

if TYPE_CHECKING:
    from rich.console import Console

    from fabric_ext.arena import SegmentView

T = TypeVar("T")


def _to_async(value: Any) -> Any:
    """A sync twin as the async call takes it: a buffer by its handle, a process by its id."""
    if isinstance(value, RemoteBuffer):
        return value.handle
    if isinstance(value, RemoteProcess):
        return value.id
    return value


def _buffer(client: FabricClient, abuf: AsyncRemoteBuffer) -> RemoteBuffer:
    return RemoteBuffer(client, abuf.handle, abuf.size)


def _process(client: FabricClient, aproc: AsyncRemoteProcess) -> RemoteProcess:
    return RemoteProcess(client, aproc)


def _core(client: FabricClient, acore: AsyncCore) -> Core:
    return Core(client, acore)


def _task_future(client: FabricClient, afut: AsyncTaskFuture) -> TaskFuture:
    return TaskFuture(client, afut)


def _task_futures(client: FabricClient, afuts: list[AsyncTaskFuture]) -> list[TaskFuture]:
    return [TaskFuture(client, f) for f in afuts]


_A = AsyncFabricClient


class FabricClient:
    """The synchronous client: the async client on a private event loop in a background thread.

    ``with FabricClient(url) as fc: buf = fc.rmalloc(1024)``.  Reads and writes run in the
    calling thread, over the local fast path (same host) or the node's data plane (blocking
    sockets, pooled per node); only what neither serves goes through the loop.  Thread-safe.
    """

    def __init__(self, url: str | None = None, *, owner: str | None = None, timeout: float = 10.0,
                 local: bool = True, name: str = "fabric-client",
                 read_chunk_size: int = DEFAULT_READ_CHUNK_SIZE,
                 credentials: str | os.PathLike[str] | None = None,
                 signing_key: str | os.PathLike[str] | None = None,
                 data_plane: bool | None = None) -> None:
        self._aio = aio = AsyncFabricClient(url, owner=owner, timeout=timeout, local=local, name=name,
                                            read_chunk_size=read_chunk_size, credentials=credentials,
                                            signing_key=signing_key, data_plane=data_plane)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # the data plane in the caller's thread: blocking sockets, pooled per node (fabric.client.dataplane)
        self._dp = SyncDataPlane(aio._dp_routes, timeout, aio._tls_context) if aio._dp_enabled else None

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
        if self._dp is not None:
            self._dp.close()
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

    def _ticket(self, node: str) -> TicketReply:
        """A data plane ticket for *node*, asked for over NATS (on the loop: a new connection's only hop)."""
        return self._run(self._aio._data_ticket(node))

    def _view(self, h: HandleParts, token: str) -> SegmentView | None:
        """The local fast path's segment of *h*, attaching it on first use (or learning it is remote)."""
        aio = self._aio
        view = aio._known_local_view(h)
        if view is None and aio._needs_attach(h):
            view = self._run(aio._local_view(h, token))
        return view

    # -- memory: generated, but for the calls that work in the caller's thread ----

    rmalloc = sync_method(_A.rmalloc, _buffer, convert=_to_async)
    rfree = sync_method(_A.rfree, convert=_to_async)
    rstat = sync_method(_A.rstat, convert=_to_async)
    rshare = sync_method(_A.rshare, convert=_to_async)
    renew = sync_method(_A.renew, convert=_to_async)
    meminfo = sync_method(_A.meminfo)
    request = sync_method(_A.request)

    def rrealloc(self, handle: str | RemoteBuffer, size: int) -> RemoteBuffer:
        """Resize the block (in place when possible); returns the buffer, whose handle may change."""
        abuf = self._run(self._aio.rrealloc(_token(handle), size))
        if isinstance(handle, RemoteBuffer):  # the caller's buffer follows the block
            handle.handle, handle.size = abuf.handle, abuf.size
            return handle
        return _buffer(self, abuf)

    @_arguments_checked
    def rwrite(self, handle: str | RemoteBuffer, data: Any, offset: int = 0) -> int:
        """Write *data* (any bytes-like object) at *offset*; returns the bytes written."""
        token = _token(handle)
        h = parse(token)
        view = self._view(h, token)
        if view is not None:  # local fast path, in this thread
            return view.write(h.off, h.gen, offset, data)
        mv = memoryview(data).cast("B")
        if self._dp is not None:  # the data plane, in this thread
            done = self._dp.call(h.node, self._ticket, lambda c: c.write_all(token, offset, mv))
            if done is not NATS:
                return cast(int, done)
        aio = self._aio
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
        """Read *length* bytes at *offset* (``None``: to the end of the block)."""
        token = _token(handle)
        h = parse(token)
        view = self._view(h, token)
        if view is not None:  # local fast path, in this thread
            return view.read(h.off, h.gen, offset, _local_length(length))
        if length is None and isinstance(handle, RemoteBuffer):
            length = max(handle.size - offset, 0)
        if self._dp is not None:  # the data plane, in this thread
            if length is None:
                try:
                    got = self._dp.call(h.node, self._ticket, lambda c: c.read(token, offset, wire.TO_END))
                except TooLarge:  # more than one reply carries: its size, then in pieces
                    length = max(self.rstat(token).size - offset, 0)
                    got = NATS
            if length is not None:
                n = length
                got = self._dp.call(h.node, self._ticket, lambda c: c.read_all(token, offset, n))
            if got is not NATS:
                return cast(bytes, got)
        return self._run(self._aio.rread(token, length, offset))

    @_arguments_checked
    def rreadv(self, items: Iterable[tuple[Any, int, int | None]], *,
               return_exceptions: bool = False) -> list[bytes | FabricError]:
        """Read many ``(handle, offset, length)`` items in one request per node, results in order."""
        # planned here: the items may be a generator
        plan: list[tuple[Any, int, int | None]] = [(_token(hd), o, n) for hd, o, n in items]
        if self._dp is not None:
            # the common case (handles seen before, one node), planned and encoded in C, sent from this thread
            fast = wire.encode_reads(plan, _PARSED, _BUFFER_TYPES)
            if fast is not None:
                node, frame = fast
                got = self._dp.call(node, self._ticket, lambda c: c.request((frame,)))
                if got is not NATS:
                    return self._aio._payloads(got, not return_exceptions)
        return self._run(self._aio.rreadv(plan, return_exceptions=return_exceptions))

    @_arguments_checked
    def rwritev(self, items: Iterable[tuple[Any, int, Any]], *,
                return_exceptions: bool = False) -> list[int | FabricError]:
        """Write many ``(handle, offset, data)`` items in one request per node; returns bytes written each."""
        plan = [(_token(hd), o, d) for hd, o, d in items]
        if self._dp is not None and plan:
            nodes = {parse(t).node for t, _o, _d in plan}
            if len(nodes) == 1:  # one node: one frame from this thread
                batch = [(t, o, memoryview(d).cast("B")) for t, o, d in plan]
                got = self._dp.call(nodes.pop(), self._ticket, lambda c: c.write_batch(batch))
                if got is not NATS:
                    results = self._aio._acks(got, True)
                    if not return_exceptions:
                        for value in results:
                            if isinstance(value, FabricError):
                                raise value
                    return cast("list[int | FabricError]", results)
        return self._run(self._aio.rwritev(plan, return_exceptions=return_exceptions))

    # -- compute cores, processes, nodes, OpenCL: generated ---------------------------

    load_core = sync_method(_A.load_core, _core)
    load_python_core = sync_method(_A.load_python_core, _core)
    cores = sync_method(_A.cores)
    rspawn = sync_method(_A.rspawn, _process, convert=_to_async)
    rrun = sync_method(_A.rrun, convert=_to_async)
    rwait = sync_method(_A.rwait, convert=_to_async)
    rkill = sync_method(_A.rkill, convert=_to_async)
    rwrite_stdin = sync_method(_A.rwrite_stdin, convert=_to_async)
    rstatus = sync_method(_A.rstatus, convert=_to_async)
    rlist = sync_method(_A.rlist)
    spawner_info = sync_method(_A.spawner_info)
    nodes = sync_method(_A.nodes)
    node = sync_method(_A.node)
    devices = sync_method(_A.devices)
    gpus = sync_method(_A.gpus)
    opencl = sync_method(_A.opencl)

    # -- durable tasks: generated; a TaskFuture is the thread-safe face of the async one --------

    def submit(self, fn: Callable[..., Any], /, *args: Any, resources: Resources | None = None, priority: int = 5,
               retries: int = 3, retry_exceptions: bool = False, timeout: float | None = None, key: str = "",
               **kwargs: Any) -> TaskFuture:
        # Pickled here, in the caller's thread, and handed to the loop without waiting for it: a
        # submit costs the caller no round trip to the loop thread (the result is what it waits for).
        if self._loop is None:
            raise Unavailable("client is not connected: use 'with FabricClient(...)' or call connect()")
        if self._aio._notify_subject is None or resources is not None:
            # the first submit subscribes to the notices, and one naming resources waits for the scheduler's
            # answer (it raises Infeasible at once when no node could ever run it): both go through the loop
            return TaskFuture(self, self._run(self._aio.submit(
                fn, *args, resources=resources, priority=priority, retries=retries,
                retry_exceptions=retry_exceptions, timeout=timeout, key=key, **kwargs)))
        req, deps = self._aio._python_request(fn, args, kwargs, resources, priority, retries, retry_exceptions,
                                              timeout, key)
        afut = AsyncTaskFuture(self._aio, req.id, PYTHON)
        self._loop.call_soon_threadsafe(self._aio._launch, req, afut, deps)
        return TaskFuture(self, afut)

    submit.__doc__ = _A.submit.__doc__
    submit_core = sync_method(_A.submit_core, _task_future)
    submit_exec = sync_method(_A.submit_exec, _task_future)
    map = sync_method(_A.map, _task_futures)
    task = sync_method(_A.task)
    cancel = sync_method(_A.cancel)
    gather = sync_method(_A.gather)

    def progress(self, futures: Iterable[TaskFuture], *, description: str = "tasks",
                 console: Console | None = None, transient: bool = False) -> TaskProgress:
        """A Rich progress bar over *futures*: ``with fc.progress(fs) as bar: ...`` (``bar.completed``,
        ``bar.failed``).  A plain context manager in both clients: it never waits on the loop."""
        return TaskProgress(futures, description=description, console=console, transient=transient)


class RemoteBuffer(BufferRef):
    """A remote block: ``len()``, slicing reads and writes, and ``with`` frees it.

    ::

        with fc.rmalloc(16) as buf:
            buf[0:5] = b"hello"
            assert buf[0:5] == b"hello" and len(buf) == 16
    """

    def __init__(self, client: FabricClient, handle: str, size: int) -> None:
        super().__init__(handle, size)
        self.client = client

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

    # through the sync client, not the async buffer: the local fast path runs in this thread
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


class RemoteProcess(ProcessRef):
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

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.client._run(coro)

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
        """The exit (``exit_code``, ``signal``, ``cpu_s``, ``max_rss`` and ``max_rss_exact``, ``duration_s``, tails)."""
        if self.aio._out.exit is not None:  # streamed already: answered here, even after the client closed
            return self.aio._out.exit
        return self.client.rwait(self.id, timeout)

    kill = sync_method(AsyncRemoteProcess.kill)
    write_stdin = sync_method(AsyncRemoteProcess.write_stdin)
    status = sync_method(AsyncRemoteProcess.status)


class Core:
    """The synchronous face of :class:`AsyncCore`: ``core.run(b"...")``, ``core.map(items)``, ``core.call(fn)``.

    The pool outlives the client (see :meth:`FabricClient.load_core`); ``with`` unloads it on exit.
    """

    def __init__(self, client: FabricClient, aio: AsyncCore) -> None:
        self.client = client
        self.aio = aio

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.client._run(coro)

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
        """The load returned a pool that was already live (loaded before, by anyone)."""
        return self.aio.reused

    @property
    def digest(self) -> str:
        return self.aio.digest

    def __repr__(self) -> str:
        return f"Core(name={self.name!r}, core={self.id!r}, node={self.node!r})"

    run = sync_method(AsyncCore.run)
    map = sync_method(AsyncCore.map)
    call = sync_method(AsyncCore.call)
    stats = sync_method(AsyncCore.stats)
    unload = sync_method(AsyncCore.unload)

    def __enter__(self) -> Core:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()
