"""The cores area: compute cores in warm pools (docs/protocol.md "Compute cores").

``load_core`` loads a shared library (or the built-in Python worker) into a named pool
on one node and returns an :class:`AsyncCore`; its ``run`` sends one job, ``map`` sends
batches (the FJB1 frame of :mod:`fabric.schema`) a few at a time, ``call`` runs a
pickled function on the Python worker.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from ..errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ERROR_KIND_HEADER,
    BadRequest,
    FabricError,
    InternalError,
    JobFailed,
    TooLarge,
    Unavailable,
    error_from_wire,
)
from ..protocol import subjects
from ..protocol.cores import PYTHON_CORE
from ..protocol.headers import EXIT_CODE_HEADER
from ..schema import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    MSGPACK_CONTENT_TYPE,
    CoreInfo,
    CoreListReply,
    CoreRequest,
    LoadCoreRequest,
    decode_job_results,
    encode_job_batch,
)
from ..signing import file_message
from .transport import Transport, _in_flight

if TYPE_CHECKING:
    from .aio import AsyncFabricClient

T = TypeVar("T")

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
        # the job lane's hot path sends on these directly (no Transport.request): spelled once, in the client's form
        self._run_subject = client._subject(
            subjects.node_scoped(subjects.CORE, info.node, subjects.Core.RUN) + "." + info.core)
        self._map_subject = client._subject(
            subjects.node_scoped(subjects.CORE, info.node, subjects.Core.MAP) + "." + info.core)

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
        reply = await self.client.request(subjects.node_scoped(subjects.CORE, self.node, subjects.Core.STATS),
                                          JSON.encode(CoreRequest(core=self.id)))
        self.info = JSON.decode(reply.data, CoreInfo)
        return self.info

    async def unload(self) -> CoreInfo:
        """Unload the pool now, for everyone using it: queued jobs fail, its workers stop, later
        jobs raise NotFound.  Unloading a pool that a ``replace`` left draining stops it at once."""
        reply = await self.client.request(subjects.node_scoped(subjects.CORE, self.node, subjects.Core.UNLOAD),
                                          JSON.encode(CoreRequest(core=self.id)))
        return JSON.decode(reply.data, CoreInfo)


class CoresArea(Transport):
    """Compute cores (the spawner's warm pools): ``load_core`` and friends of the async client."""

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
        library = bytes(library)
        req = LoadCoreRequest(name=name, library=library, min_workers=min_workers, max_workers=max_workers,
                              time_limit_s=time_limit, idle_s=idle, external=external, replace=replace,
                              unload_after_s=unload_after or 0.0,
                              signature=self._sign(file_message(hashlib.sha256(library).hexdigest()))
                              if library else "")
        subject = (subjects.node_scoped(subjects.CORE, node, subjects.Core.LOAD) if node
                   else subjects.cluster(subjects.CORE, subjects.Core.LOAD))
        reply = await self.request(subject, MSGPACK.encode(req), {CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE},
                                   timeout=max(self.timeout, 60.0))
        return AsyncCore(cast("AsyncFabricClient", self), MSGPACK.decode(reply.data, CoreInfo))

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
        reply = await self.request(subjects.node_scoped(subjects.CORE, node, subjects.Core.LIST), b"{}")
        return JSON.decode(reply.data, CoreListReply)
