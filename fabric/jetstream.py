"""The JetStream resources a service uses, kept in existence by the service kit.

A service declares what it needs -- streams, KV buckets, durable consumers -- as
:class:`Stream`, :class:`KeyValueBucket` and :class:`Consumer` values from
:meth:`FabricService.jetstream_resources <fabric.service.FabricService.jetstream_resources>`.
The kit's :class:`JetStreamKeeper` creates whichever are missing when the service
connects, again after every reconnect, and whenever the service reports that one
went missing (:meth:`FabricService.jetstream_lost`), then hands the service a ready
JetStream context through ``on_jetstream``.

Why every reconnect: a restarted nats-server keeps file-backed streams but loses
memory-backed ones (the node registry), and a failed-over cluster may come back
without a resource a client saw a moment ago.  A service that created its
resources once at start would be left half-working for good -- every put answered
"no response from stream".  Creation is idempotent: a resource that exists is left
as it is (another node may have created it first, perhaps with other limits; the
service reads what it got), and a race between two creators is not an error.

A NATS without JetStream is a legitimate deployment (``fabric up --nats-url`` to a
plain server): the keeper then reports ``None`` and the service runs its fallback,
and it looks again after the next reconnect.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig, ObjectStoreConfig, StreamConfig

from .cluster import CLUSTERED_ENV, REPLICAS

__all__ = [
    "JetStreamResource",
    "Stream",
    "KeyValueBucket",
    "ObjectStoreBucket",
    "task_results_bucket",
    "Consumer",
    "JetStreamKeeper",
    "JetStreamAbsent",
    "ALREADY_IN_USE",
]

#: JetStream's API error for "stream name already in use with a different configuration"
ALREADY_IN_USE = 10058
#: ... and for "consumer already exists" with another configuration
CONSUMER_EXISTS = 10148
#: ... and for "jetstream not enabled for account" (the server has it, this account does not)
NOT_ENABLED_FOR_ACCOUNT = 10039

#: ... for "no suitable peers for placement" (fewer servers up than replicas asked for)
NO_SUITABLE_PEERS = 10005
#: ... for "replicas > 1 not supported in non-clustered mode"
REPLICAS_NOT_SUPPORTED = 10074

API_TIMEOUT_S = 5.0
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0
#: how long JetStream that was there must stay unanswered before the service is told it is gone
ABSENT_CONFIRM_S = 10.0


class JetStreamAbsent(Exception):
    """Raised when the server answers no JetStream API request: JetStream is not enabled for this account."""


class JetStreamResource(Protocol):
    """Something in JetStream a service needs; :meth:`ensure` makes it exist."""

    @property
    def label(self) -> str:
        """What it is, for logs: ``"kv fabric_nodes"``."""
        ...

    async def ensure(self, js: JetStreamContext) -> bool:
        """Create it if it is missing; True when this call created it."""
        ...


@dataclass(frozen=True)
class Stream:
    """A stream, created with *config* when missing."""

    config: StreamConfig

    @property
    def label(self) -> str:
        return f"stream {self.config.name}"

    async def ensure(self, js: JetStreamContext) -> bool:
        name = self.config.name
        assert name is not None
        return await _create_if_missing(
            lambda: js.stream_info(name),
            lambda: _replicated(lambda r: js.add_stream(replace(self.config, num_replicas=r))),
            nats.js.errors.NotFoundError, ALREADY_IN_USE)


@dataclass(frozen=True)
class KeyValueBucket:
    """A KV bucket, created with *config* when missing."""

    config: KeyValueConfig

    @property
    def label(self) -> str:
        return f"kv {self.config.bucket}"

    async def ensure(self, js: JetStreamContext) -> bool:
        return await _create_if_missing(
            lambda: js.key_value(self.config.bucket),
            lambda: _replicated(lambda r: js.create_key_value(replace(self.config, replicas=r))),
            nats.js.errors.BucketNotFoundError, ALREADY_IN_USE)


@dataclass(frozen=True)
class ObjectStoreBucket:
    """An object store bucket, created with *config* when missing."""

    config: ObjectStoreConfig

    @property
    def label(self) -> str:
        return f"object store {self.config.bucket}"

    async def ensure(self, js: JetStreamContext) -> bool:
        bucket = self.config.bucket
        assert bucket is not None
        return await _create_if_missing(
            lambda: js.object_store(bucket),
            lambda: _replicated(lambda r: js.create_object_store(bucket, replace(self.config, replicas=r))),
            nats.js.errors.BucketNotFoundError, ALREADY_IN_USE)


@dataclass(frozen=True)
class Consumer:
    """A durable consumer of *stream*, created with *config* when missing (list its stream first)."""

    stream: str
    config: ConsumerConfig

    @property
    def label(self) -> str:
        return f"consumer {self.stream}/{self.config.durable_name}"

    async def ensure(self, js: JetStreamContext) -> bool:
        name = self.config.durable_name or self.config.name
        if not name:
            raise ValueError("a kept consumer must be durable (durable_name)")
        return await _create_if_missing(lambda: js.consumer_info(self.stream, name),
                                        lambda: js.add_consumer(self.stream, self.config),
                                        nats.js.errors.NotFoundError, CONSUMER_EXISTS)


async def _replicated(create: Callable[[int], Awaitable[object]]) -> object:
    """Create with 3 replicas on a clustered node (fabric.cluster), with 1 where they cannot be placed yet.

    Fewer than three JetStream servers up: the cluster refuses 3 (10005, "no suitable
    peers"); the supervisors raise such streams to 3 once three are up
    (:func:`fabric.cluster.raise_replicas`).  Two replicas are never used: a quorum of two
    out of two stops at either loss, which is worse than one.
    """
    if not os.environ.get(CLUSTERED_ENV):
        return await create(1)
    try:
        return await create(REPLICAS)
    except nats.js.errors.APIError as exc:
        if exc.err_code not in (NO_SUITABLE_PEERS, REPLICAS_NOT_SUPPORTED):
            raise
    return await create(1)


async def _create_if_missing(lookup: Callable[[], Awaitable[object]], create: Callable[[], Awaitable[object]],
                             missing: type[Exception], exists_code: int) -> bool:
    """Look the resource up; create it when *lookup* raises *missing*.  True when this call created it.

    A creation refused with *exists_code* means another node created it between our
    two requests (perhaps with other limits): not an error, and not ours.
    """
    try:
        await lookup()
        return False
    except missing:
        pass
    try:
        await create()
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != exists_code:
            raise
        return False
    return True


#: what the keeper calls with a ready context, or None where there is no JetStream
ReadyCallback = Callable[[JetStreamContext | None], Awaitable[None]]


class JetStreamKeeper:
    """Makes a service's JetStream resources exist, at start and after every reconnect.

    :meth:`establish` runs one round now (the service's start awaits it);
    :meth:`run` is the background loop (the kit runs it as one of the service's
    background tasks); :meth:`trigger` asks it for another round (a reconnect, a
    resource reported lost).  Rounds never overlap: a trigger during a round runs
    one more round after it.  Transient failures (JetStream still electing a
    leader after a restart, a timeout, the connection dropping again) are retried
    with a backoff of 0.1 s doubling to 2 s until a round succeeds.
    """

    def __init__(self, nc: NATS, resources: Sequence[JetStreamResource], on_ready: ReadyCallback,
                 log: Any) -> None:
        self.nc = nc
        self.resources = tuple(resources)
        self.on_ready = on_ready
        self.log = log
        #: True once a round succeeded, False when JetStream was found absent, None before
        self.available: bool | None = None
        #: completed rounds (tests and logs read it)
        self.rounds = 0
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()

    async def establish(self, budget_s: float = 5.0) -> bool | None:
        """One round now, retrying transient failures for up to *budget_s*.

        Returns :attr:`available`.  A round still failing after *budget_s*
        reports ``None`` to the service (it runs without JetStream meanwhile)
        and leaves the retrying to :meth:`run`.
        """
        done = await self._round(deadline=asyncio.get_running_loop().time() + budget_s)
        if not done:
            await self._report(None)
            self._wanted.set()
        return self.available

    def trigger(self) -> None:
        """Ask for another round soon (a reconnect, a resource reported missing)."""
        self._wanted.set()

    # -- rounds -------------------------------------------------------------------

    async def run(self) -> None:
        """Run a round whenever one is asked for, until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self._round(deadline=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a callback must not end the keeping
                self.log.error("jetstream resources: round failed", exc_info=exc)

    async def _round(self, deadline: float | None) -> bool:
        """Ensure every resource, retrying transient failures; False when *deadline* passed first."""
        loop = asyncio.get_running_loop()
        delay = RETRY_INITIAL_S
        absent_since = loop.time()
        async with self._lock:
            while True:
                try:
                    js = self.nc.jetstream(timeout=API_TIMEOUT_S)
                    created = await self._ensure_all(js)
                    if created:
                        self.log.info("jetstream resources created", created=created)
                    # inside the retry: the service reopening its handles can meet the same transient errors
                    await self._report(js, available=True)
                    return True
                except JetStreamAbsent:
                    if self.available and loop.time() < absent_since + ABSENT_CONFIRM_S:
                        # it was here a moment ago: a server still starting, not a plain NATS
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX_S)
                        continue
                    if self.available is not False:
                        self.log.warning("no JetStream on this NATS: running without it",
                                         resources=[r.label for r in self.resources])
                    await self._report(None, available=False)
                    return True
                except (asyncio.TimeoutError, nats.errors.Error, OSError) as exc:
                    if isinstance(exc, nats.js.errors.APIError) and not _transient(exc):
                        # a config the server refuses: retrying cannot help; say so loudly
                        self.log.error("jetstream resources refused", error=str(exc))
                        await self._report(None, available=False)
                        return True
                    if deadline is not None and loop.time() + delay > deadline:
                        self.log.warning("jetstream resources not ready yet; retrying in the background",
                                         error=str(exc) or type(exc).__name__)
                        return False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)

    async def _ensure_all(self, js: JetStreamContext) -> list[str]:
        if self.nc.is_closed:
            raise nats.errors.ConnectionClosedError
        try:
            await js.account_info()
        except nats.errors.NoRespondersError:
            raise JetStreamAbsent from None
        except nats.js.errors.ServiceUnavailableError as exc:
            # nats-py turns "no responders" on $JS.API into a 503 without a code;
            # JetStream itself answers 503 with one (e.g. no meta leader yet: transient)
            if exc.code is None or exc.err_code == NOT_ENABLED_FOR_ACCOUNT:
                raise JetStreamAbsent from None
            raise
        created = []
        for resource in self.resources:
            if await resource.ensure(js):
                created.append(resource.label)
        return created

    async def _report(self, js: JetStreamContext | None, available: bool | None = None) -> None:
        if available is not None:
            self.available = available
        self.rounds += 1
        await self.on_ready(js)


def _transient(exc: nats.js.errors.APIError) -> bool:
    """503 (no meta leader yet, JetStream starting), 5xx, or a timeout-ish answer: worth retrying."""
    return isinstance(exc, nats.js.errors.ServiceUnavailableError) or (exc.code or 0) >= 500


def task_results_bucket() -> ObjectStoreBucket:
    """The object store of large task results (fabric.schema.tasks.RESULTS_BUCKET).

    The spawners write a result above ``INLINE_RESULT_MAX`` there (the node that ran the
    task), the scheduler records its name, a client reads it; it expires after
    ``RESULTS_TTL_S`` unless released sooner.  File storage: a result outlives restarts
    like the record that names it.  Declared by the spawner and the scheduler alike.
    """
    from nats.js.api import StorageType

    from .protocol.streams import RESULTS_BUCKET
    from .schema.tasks import RESULTS_TTL_S

    return ObjectStoreBucket(ObjectStoreConfig(bucket=RESULTS_BUCKET, ttl=RESULTS_TTL_S, storage=StorageType.FILE,
                                               description="fabric task results too large for their record"))


def webhook_stream() -> Stream:
    """Stream FABRIC_WEBHOOKS: the scheduler stores a notice per ended task with a callback_url, the gateways
    deliver them (services/scheduler/webhooks.py, services/gateway/webhooks.py); both keep it in existence."""
    from nats.js.api import RetentionPolicy, StorageType

    from .protocol.streams import WEBHOOK_STREAM, WEBHOOK_SUBJECT_PREFIX

    return Stream(StreamConfig(
        name=WEBHOOK_STREAM, subjects=[f"{WEBHOOK_SUBJECT_PREFIX}.*"], storage=StorageType.FILE,
        retention=RetentionPolicy.WORK_QUEUE, max_age=WEBHOOK_MAX_AGE_S, duplicate_window=120.0,
        description="fabric webhooks to deliver (scheduler -> gateways)"))


#: how long an undelivered webhook notice is kept (no gateway ran all that time: it is dropped)
WEBHOOK_MAX_AGE_S = 7 * 24 * 3600.0


async def kv_snapshot(kv: Any, *, timeout: float = 30.0) -> list[Any]:
    """Every key's latest entry in the KV bucket *kv* (deletes and purges included), as it holds them now.

    nats-py's watcher ends its initial values with a ``None`` marker, but can put that marker
    *before* them: when its consumer-info round trip returns after the server has already sent
    every value (pending 0) but before its callback has handled one (delivered 0), it concludes
    the bucket is empty.  A reader that stops at the marker then sees nothing -- a scheduler
    taking over would recover no task.  Here the end is the entry the consumer delivered with
    nothing left pending (``delta == 0``); the marker counts only once the bucket reports no value.
    Raises ``TimeoutError`` when the values do not all arrive within *timeout* seconds.
    """
    if (await kv.status()).values == 0:
        return []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    watcher = await kv.watchall()
    out: list[Any] = []
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"the bucket's values did not all arrive within {timeout:g} s ({len(out)} did)")
            try:
                entry = await watcher.updates(timeout=min(left, 1.0))
            except nats.errors.TimeoutError:
                entry = None
            if entry is None:  # the marker (perhaps early), or a quiet second: empty by now?
                if not out and (await kv.status()).values == 0:
                    return out
                continue
            out.append(entry)
            if entry.delta == 0:
                return out
    finally:
        try:
            await watcher.stop()
        except Exception:  # noqa: BLE001 - the watcher's consumer goes with its inactivity threshold anyway
            pass
