"""The service kit every fabric service is built on.

A service subclasses :class:`FabricService`, names itself (``name``, SemVer
``version``, ``description``), and lists its endpoints; the kit does the rest:

* registers an ADR-32 service through ``nats.micro`` (so ``$SRV.PING|INFO|STATS``
  discover it), with ``node`` in its metadata;
* decodes each request in the encoding it asked for (JSON by default, MessagePack
  with ``Content-Type: application/msgpack``, the binary frame for bulk endpoints)
  and encodes the reply the same way;
* runs every request of a coroutine handler as its own task under a concurrency
  bound -- nats-py would otherwise run one handler at a time per endpoint -- and a
  plain-function handler (CPU work that never awaits, like the allocator's) inline,
  where a task could add no concurrency; keeps per-endpoint timings of the real
  work, which ``$SRV.STATS`` reports;
* turns :class:`~fabric.errors.FabricError` into the ``Nats-Service-Error`` /
  ``Nats-Service-Error-Code`` headers (plus ``Fabric-Error`` with the kind), and
  anything else into a logged 500;
* keeps the JetStream resources the service declares (streams, KV buckets,
  durable consumers: :meth:`FabricService.jetstream_resources`) in existence:
  created when missing at start, after every reconnect and whenever the service
  reports one lost, then handed over through :meth:`FabricService.on_jetstream`
  (:mod:`fabric.jetstream` says why and how);
* connects with the service-side options of :mod:`fabric.service_nats` (reconnect
  forever, connection events logged);
* spells node-scoped and cluster-wide endpoints (:meth:`FabricService.node_endpoint`,
  :meth:`FabricService.cluster_endpoint`, from :mod:`fabric.service_endpoint`);
* runs the service's loops (:meth:`FabricService.background`, :mod:`fabric.service_tasks`);
* drains gracefully on SIGTERM: stop taking requests, finish those in flight, cancel
  and await the background tasks, call ``on_stop``, then drain the connection.

Where the parts live: :mod:`fabric.service_endpoint` (requests, replies, endpoints),
:mod:`fabric.service_micro` (the ``nats.micro`` adapter, and why nats-py is pinned),
:mod:`fabric.service_nats` (connect options), :mod:`fabric.service_tasks` (background
tasks); this module joins them and imports them, never the other way round.

Run one with :func:`main`, which reads the configuration once (:mod:`fabric.config`:
defaults < ``--config FILE`` or ``<state-dir>/fabric.toml`` < ``FABRIC_*`` environment
< the flags ``--nats-url --node --state-dir``), hands it to the service in
:class:`ServiceSettings` and uses uvloop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.micro.request import Request as MicroRequest
from nats.micro.service import ServiceConfig

from ._version import __version__
from .config import DEFAULT_NATS_URL, ConfigError, FabricConfig, Loaded, default_node, load_config
from .credentials import Credentials, CredentialsError, read_credentials
from .errors import BadRequest, FabricError, InternalError, error_headers
from .jetstream import JetStreamKeeper, JetStreamResource
from .logs import configure_logging
from .protocol.permissions import inbox_prefix, service_user
from .protocol.subjects import valid_node_name
from .schema import CONTENT_TYPE_HEADER, FRAME_CONTENT_TYPE, MSGPACK, MSGPACK_CONTENT_TYPE, ErrorReply, error_info
from .service_endpoint import (
    FRAME_MAGIC,
    Endpoint,
    Handler,
    Reply,
    Request,
    cluster_endpoint,
    node_endpoint,
    with_user_forms,
)
from .service_micro import MicroService
from .service_nats import close as close_connection
from .service_nats import connect
from .service_tasks import BackgroundTasks, LoopFunction
from .state import default_state_dir

__all__ = ["FabricService", "Request", "Reply", "Endpoint", "ServiceSettings", "main", "node_endpoint",
           "cluster_endpoint", "default_state_dir"]


@dataclass(frozen=True)
class ServiceSettings:
    """What every service needs to start; validated at construction."""

    nats_url: str
    node: str
    state_dir: Path
    max_concurrency: int = 512
    drain_timeout_s: float = 10.0
    #: the effective configuration (:mod:`fabric.config`): each service reads its section
    #: from here (``config.mem``, ``config.telemetry``...), never from the environment
    config: FabricConfig = field(default_factory=FabricConfig)
    #: the credentials file the service authenticates with (its role's, from ``fabric up``); None: no auth
    credentials: Path | None = None

    def __post_init__(self) -> None:
        if not valid_node_name(self.node):
            raise ValueError(f"invalid node name {self.node!r}: use letters, digits, '_' and '-' (at most 64)")
        if not self.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError(f"invalid NATS URL {self.nats_url!r}")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")


class FabricService:
    """Base class of every fabric service (see the module docstring)."""

    name: ClassVar[str]
    version: ClassVar[str] = __version__
    description: ClassVar[str]

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.node = settings.node
        self.log = structlog.get_logger(service=self.name, node=self.node)
        #: who the service is on NATS (CredentialsError here if the file is unusable), or None without auth
        self.credentials: Credentials | None = (
            read_credentials(settings.credentials) if settings.credentials is not None else None)
        self.nc: NATS | None = None
        self._micro: MicroService | None = None
        self._endpoints: list[Endpoint] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._stopping = asyncio.Event()
        self.jetstream: JetStreamKeeper | None = None
        #: the service's loops (:meth:`background`): cancelled and awaited by :meth:`stop`
        self.tasks = BackgroundTasks(self.log)

    @property
    def connection(self) -> NATS:
        """The service's NATS connection; RuntimeError before :meth:`start`."""
        if self.nc is None:
            raise RuntimeError(f"{self.name}: not started (no NATS connection yet)")
        return self.nc

    # -- what the kit offers subclasses -------------------------------------------

    def node_endpoint(self, area: str, verb: str, handler: Handler, *, name: str | None = None,
                      frames: bool = False) -> Endpoint:
        """The endpoint ``fabric.<area>.<this node>.<verb>``, named *name* (by default *verb*)."""
        return node_endpoint(area, self.node, verb, handler, name=name, frames=frames)

    @staticmethod
    def cluster_endpoint(area: str, verb: str, handler: Handler, *, name: str | None = None) -> Endpoint:
        """The endpoint ``fabric.<area>.<verb>`` any instance answers (queue group), named *name* (default *verb*)."""
        return cluster_endpoint(area, verb, handler, name=name)

    def nats_auth(self) -> dict[str, Any]:
        """The ``nats.connect`` options that authenticate as this service (none without credentials).

        Its inbox is its node's (``_INBOX._<service>.<node>``): the only one its permissions let it read.
        """
        if self.credentials is None:
            return {}
        return self.credentials.connect_options(inbox_prefix(service_user(self.name, self.node)))

    def background(self, fn: LoopFunction, *, name: str) -> asyncio.Task[None]:
        """Run ``fn()`` beside the endpoints until it returns or the service stops (:mod:`fabric.service_tasks`).

        An exception that ends it is logged.  :meth:`stop` cancels and awaits it after
        the requests in flight finished and before :meth:`on_stop`, so ``on_stop`` may
        close whatever the loop uses.
        """
        return self.tasks.start(fn, name=f"{self.name}:{name}")

    async def serve_side(self, endpoints: Sequence[Endpoint]) -> list[Any]:
        """Serve *endpoints* from now on, on subscriptions of the service's own; their subscriptions.

        For endpoints a service answers only some of the time -- the scheduler's, which
        only the instance holding the lease serves -- so they cannot be registered once
        at start.  Requests go through the same dispatch as the kit's endpoints
        (encodings, errors in headers, the concurrency bound, the counters); list the
        same :class:`Endpoint` values in :meth:`side_endpoints` so ``$SRV.INFO/STATS``
        show them, with their user forms (:func:`~fabric.service_endpoint.with_user_forms`:
        the kit serves exactly what it is given).  Unsubscribe the returned subscriptions
        to stop serving.
        """
        subs = []
        for ep in endpoints:
            dispatch = self._dispatcher(ep)

            async def on_msg(msg: Any, dispatch: Callable[[Any], Awaitable[None]] = dispatch) -> None:
                await dispatch(_SideRequest(self.connection, msg))

            subs.append(await self.connection.subscribe(ep.subject, queue=ep.queue_group, cb=on_msg))
        await self.connection.flush()
        return subs

    # -- what subclasses provide ----------------------------------------------

    def endpoints(self) -> Sequence[Endpoint]:
        raise NotImplementedError

    def side_endpoints(self) -> Sequence[Endpoint]:
        """Endpoints the service serves on its own subscriptions, for ``$SRV.INFO/STATS`` only.

        The service keeps their counters itself (:meth:`Endpoint.record`); their
        handlers are never called by the kit.
        """
        return ()

    def metadata(self) -> dict[str, str]:
        return {}

    def jetstream_resources(self) -> Sequence[JetStreamResource]:
        """The streams, KV buckets and durable consumers this service needs (created when missing).

        The kit ensures them after connecting, after every reconnect, and after
        :meth:`jetstream_lost`; each time it then calls :meth:`on_jetstream`.
        """
        return ()

    async def on_jetstream(self, js: JetStreamContext | None) -> None:
        """Called with a JetStream context once the resources exist, or None where NATS has no JetStream.

        The first call comes before :meth:`on_start`; later ones after each
        reconnect.  Reopen here whatever holds server-side state (KV handles,
        watchers, consumer subscriptions): after a server restart the old ones
        point at resources that were recreated empty.
        """

    def jetstream_lost(self) -> None:
        """Report that a JetStream resource went missing (e.g. "no response from stream"): ensure them again."""
        if self.jetstream is not None:
            self.jetstream.trigger()

    async def on_start(self) -> None:
        """Called after connecting (and after the first :meth:`on_jetstream`), before the endpoints subscribe."""

    async def on_serving(self) -> None:
        """Called once the endpoints subscribe, before the service answers ``$SRV.PING`` (announce it here)."""

    async def on_stopping(self) -> None:
        """Called after in-flight requests finished, while the background tasks still run: last work that
        needs them (the scheduler writes what only memory holds through its publisher loop)."""

    async def on_stop(self) -> None:
        """Called after in-flight requests finished and the background tasks ended, before the connection drains."""

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        # after a reconnect the server may be a restarted one that lost memory-backed streams: ensure them again
        self.nc = await connect(self.settings.nats_url, f"{self.name}@{self.node}", self.log,
                                on_reconnect=self.jetstream_lost, auth=self.nats_auth())
        resources = self.jetstream_resources()
        if resources:
            self.jetstream = JetStreamKeeper(self.nc, resources, self.on_jetstream, self.log)
            await self.jetstream.establish()
            self.background(self.jetstream.run, name="jetstream-keeper")
        await self.on_start()
        meta = {"node": self.node, "fabric_version": __version__, "pid": str(os.getpid())}
        meta.update(self.metadata())
        micro = MicroService(
            self.nc,
            ServiceConfig(name=self.name, version=self.version, description=self.description, metadata=meta),
        )
        micro.kit_endpoints = self._endpoints
        micro.side_endpoints = tuple(self.side_endpoints())
        # endpoints first, $SRV verbs last: a service that answers PING serves every subject it lists;
        # each in its plain form and, where users reach it, its user form (fabric.u.*.…)
        for ep in with_user_forms(self.endpoints()):
            self._endpoints.append(ep)
            await micro.add_endpoint(
                name=ep.name, subject=ep.subject, queue_group=ep.queue_group, handler=self._dispatcher(ep)
            )
        await self.nc.flush()
        self._micro = micro
        await self.on_serving()
        await micro.start()
        self.log.info("service started", version=self.version, endpoints=len(self._endpoints),
                      url=self.settings.nats_url)

    async def stop(self) -> None:
        """Graceful stop: unsubscribe, wait for in-flight requests, end the background tasks, drain the connection."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._micro is not None:
            await self._bounded(self._micro.stop(), "unsubscribing the endpoints")
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
        try:
            await self.on_stopping()
        except Exception as exc:  # the stop goes on: what follows releases what others wait for
            self.log.error("on_stopping failed", error=str(exc) or type(exc).__name__)
        # after the requests (one may wait on what a loop does), before on_stop (which closes what loops use)
        await self._bounded(self.tasks.stop(), "ending the background tasks")
        await self.on_stop()
        if self.nc is not None:
            await self._bounded(close_connection(self.nc), "draining the connection")
        self.log.info("service stopped")

    async def _bounded(self, step: Awaitable[None], what: str) -> None:
        """One step of :meth:`stop`, given at most ``drain_timeout_s``: a stop must end.  A step past it is
        logged (which one hung is what to look into) and the stop goes on."""
        task = asyncio.ensure_future(step)
        # asyncio.wait, not wait_for: wait_for waits for the step to take its cancellation, which a stuck
        # step (a loop that swallows it, a subscription drain that never empties) may never do
        done, _ = await asyncio.wait({task}, timeout=self.settings.drain_timeout_s)
        if task in done:
            task.result()
            return
        task.cancel()
        self.log.error("stop: a step took too long; going on", step=what, timeout_s=self.settings.drain_timeout_s)

    async def __aenter__(self) -> FabricService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Start, then run until SIGTERM/SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BaseException:
            # a start that failed half-way (a port taken, a bad configuration found late) still releases what it
            # made -- the connection, the loops -- so the process exits with the error instead of hanging on them
            self.log.error("start failed: stopping", exc_info=True)
            with contextlib.suppress(Exception):
                await self.stop()
            raise
        try:
            await stop.wait()
            self.log.info("signal received, draining")
        finally:
            await self.stop()

    # -- request dispatch -------------------------------------------------------

    def _dispatcher(self, ep: Endpoint) -> Callable[[Any], Awaitable[None]]:
        if ep.inline:
            async def dispatch_inline(req: MicroRequest) -> None:
                # A plain-function handler never awaits, so a task would buy no
                # concurrency (one thread) and cost a loop iteration per request.
                await self._serve(ep, req)

            return dispatch_inline

        async def dispatch(req: MicroRequest) -> None:
            # nats-py calls this one message at a time per subscription: hand the
            # request to its own task and return, so a slow request never blocks
            # the next.  The semaphore bounds the work in flight (backpressure).
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(ep, req))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

        return dispatch

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, ep: Endpoint, msg: MicroRequest) -> None:
        t0 = time.perf_counter_ns()
        ep.in_flight += 1
        request = Request(msg.subject, msg.headers, msg.data)
        try:
            self._admit(ep, request)
            result = ep.handler(request)
            if not ep.inline:
                result = await result
            body, headers = self._encode_result(request, result)
        except Exception as exc:
            body, headers = self._failure(ep, request, exc)
        finally:
            ep.in_flight -= 1
        ep.num_requests += 1
        ep.processing_ns += time.perf_counter_ns() - t0
        await self._reply(msg, body, headers)

    @staticmethod
    def _admit(ep: Endpoint, request: Request) -> None:
        """BadRequest for what no handler of *ep* can take: an unknown Content-Type, or a frame it takes not."""
        if request.refusal is not None:
            raise BadRequest(request.refusal)
        if request.is_frame and not ep.frames:
            raise BadRequest(f"{ep.subject} takes no binary frames: send JSON or MessagePack "
                             f"(a body starting with {FRAME_MAGIC.decode()} or Content-Type {FRAME_CONTENT_TYPE} "
                             f"is a frame)")

    @staticmethod
    def _encode_result(request: Request, result: Any) -> tuple[Any, dict[str, str] | None]:
        if isinstance(result, Reply):
            return result.data, result.headers
        if result is None:
            return b"", None
        if request.codec is MSGPACK:
            return request.codec.encode(result), {CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE}
        return request.codec.encode(result), None

    def _failure(self, ep: Endpoint, request: Request, exc: Exception) -> tuple[bytes, dict[str, str]]:
        ep.num_errors += 1
        if isinstance(exc, FabricError):
            ep.last_error = f"{exc.code} {exc.kind}: {exc.message}"
            self.log.info("request failed", subject=request.subject, code=exc.code, kind=exc.kind,
                          error=exc.message, request_id=request.request_id)
            return self._error_reply(request, exc)
        # a bug: answer 500, keep serving, log the traceback
        err = InternalError(f"internal error: {type(exc).__name__}: {exc}")
        ep.last_error = err.message
        self.log.error("request crashed", subject=request.subject, request_id=request.request_id,
                       exc_info=exc)
        return self._error_reply(request, err)

    async def _reply(self, msg: MicroRequest, body: Any, headers: dict[str, str] | None) -> None:
        try:
            await msg.respond(body, headers=headers)
        except ValueError:  # no reply subject: a publish, not a request; nothing to answer
            pass
        except Exception as exc:  # connection lost mid-reply: the client times out and retries
            self.log.warning("reply not sent", subject=msg.subject, error=str(exc))

    @staticmethod
    def _error_reply(request: Request, exc: FabricError) -> tuple[bytes, dict[str, str]]:
        headers = error_headers(exc)
        if request.is_frame:
            return b"", headers
        if request.codec is MSGPACK:
            headers[CONTENT_TYPE_HEADER] = MSGPACK_CONTENT_TYPE
        return request.codec.encode(ErrorReply(error=error_info(exc))), headers


class _SideRequest:
    """A plain NATS message as the kit's dispatch takes a ``nats.micro`` request (for :meth:`serve_side`)."""

    __slots__ = ("nc", "msg", "subject", "headers", "data")

    def __init__(self, nc: NATS, msg: Any) -> None:
        self.nc = nc
        self.msg = msg
        self.subject = msg.subject
        self.headers = msg.headers
        self.data = msg.data

    async def respond(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        if not self.msg.reply:
            raise ValueError("no reply subject")
        await self.nc.publish(self.msg.reply, data, headers=headers)


def parse_settings(argv: Sequence[str] | None, service_name: str,
                   environ: Mapping[str, str] | None = None) -> tuple[ServiceSettings, Loaded]:
    """The service's settings from its flags over its configuration (:mod:`fabric.config`); ConfigError if invalid.

    ``--config FILE`` names the configuration file (``fabric up --config`` passes it on);
    without it ``<state-dir>/fabric.toml`` is read when it exists.  The flags win over
    the file and the environment.
    """
    parser = argparse.ArgumentParser(prog=f"python -m fabric.services.{service_name.replace('-', '_')}")
    parser.add_argument("--nats-url", help=f"NATS to connect to (default: nats.url, else {DEFAULT_NATS_URL})")
    parser.add_argument("--node", help="node name (default: node, else the host's short name, sanitized)")
    parser.add_argument("--state-dir", help="state directory (default: state_dir, else the per-user state dir)")
    parser.add_argument("--config", type=Path, help="configuration file (default: <state-dir>/fabric.toml)")
    parser.add_argument("--credentials", help="credentials file to authenticate with (default: nats.credentials)")
    args = parser.parse_args(argv)
    loaded = load_config(config_file=args.config, environ=environ, flags={
        "nats.url": ("--nats-url", args.nats_url),
        "nats.credentials": ("--credentials", args.credentials),
        "node": ("--node", args.node),
        "state_dir": ("--state-dir", args.state_dir),
    })
    cfg = loaded.config
    try:
        settings = ServiceSettings(nats_url=cfg.nats.url or DEFAULT_NATS_URL,
                                   node=cfg.node or default_node(),
                                   state_dir=Path(cfg.state_dir) if cfg.state_dir else default_state_dir(),
                                   config=cfg,
                                   credentials=Path(cfg.nats.credentials) if cfg.nats.credentials else None)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
    return settings, loaded


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


#: the cyclic collector's first threshold in a service (CPython's default is 700), and its variable
GC_GEN0_THRESHOLD: Final = 20_000
GC_GEN0_ENV: Final = "FABRIC_GC_GEN0"


def tune_gc(gen0: int = GC_GEN0_THRESHOLD) -> bool:
    """Collect cycles less often, and never walk what was loaded at start.

    A service allocates a few container objects per message and keeps many alive for
    a while (the scheduler holds every queued task).  At CPython's default a young
    collection runs every 700 allocations and pushes the live ones towards the old
    generation, whose full collections then walk everything -- measured on the
    scheduler, that was about a fifth of its CPU per task (perf: gc_collect_main,
    visit_decref, visit_reachable).  ``gc.freeze()`` moves the objects made at import
    into a generation the collector never scans; 20,000 keeps young collections rare
    while still bounding cyclic garbage.  Only the service processes do this (a library
    must not retune its host's collector); ``FABRIC_GC_GEN0=0`` leaves the defaults.
    Returns whether it applied.
    """
    env = os.environ.get(GC_GEN0_ENV)
    if env is not None:
        try:
            gen0 = int(env)
        except ValueError:
            return False
    if gen0 <= 0:
        return False
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
    return True


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Keep message-sized buffers on the heap instead of mapping and unmapping them.

    A service receives and sends buffers of up to the max payload (8 MiB) all the
    time.  With glibc's defaults each such buffer is either mmap'd and unmapped, or
    trimmed back to the kernel after it is freed, so every message faults its pages in
    again -- about 2 ms per MiB on a VM, measured on fabric's 1 MiB write.  Raising
    both thresholds keeps that memory in the process for reuse.  Only the service
    processes do this (a library must not retune its host's malloc); environment
    settings (``MALLOC_MMAP_THRESHOLD_``...) win.  Returns whether it applied.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        import ctypes
        import ctypes.util

        if not (ctypes.util.find_library("c") or "").startswith("libc.so"):
            return False
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the defaults
        return False


def main(service_cls: type[FabricService], argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m fabric.services.<name>``.

    An invalid configuration ends the start here, every problem on stderr (the
    service's log under ``fabric up``, whose failure report shows its tail), exit 2.
    """
    try:
        settings, loaded = parse_settings(argv, service_cls.name)
    except ConfigError as exc:
        print(f"{service_cls.name}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    configure_logging(settings.config.log_level)
    log = structlog.get_logger(service=service_cls.name, node=settings.node)
    for warning in loaded.warnings:
        log.warning("configuration: " + warning)
    if loaded.file is not None:
        log.info("configuration read", file=str(loaded.file))
    tune_malloc()
    tune_gc()

    if settings.credentials is not None:
        try:
            read_credentials(settings.credentials)  # a bad file ends the start here, said on stderr
        except CredentialsError as exc:
            print(f"{service_cls.name}: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    async def run() -> None:
        await service_cls(settings).serve_forever()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(run())
    else:
        uvloop.run(run())
