"""``GET /api/events``: the fabric live, as Server-Sent Events.

Events (``event:`` names; ``data:`` is JSON):

* ``node`` -- a node's heartbeat, the :class:`~fabric.schema.NodeRecord` its gpu-monitor
  published on ``fabric.telemetry.<node>`` (about one a second per node);
* ``tasks`` -- a batch of task state changes (:class:`~fabric.schema.tasks.TaskEventBatch`,
  from ``fabric.task.events``): a token's user gets its own tasks' (the user form of the
  feed), an admin token everyone's, an anonymous caller none;
* ``services`` -- services that came (``up``) or went (``down``) since the last such event,
  each ``{"name", "id", "node", "version"}``; the first one lists every service up
  (``"initial": true``);
* ``dropped`` -- the last event of a stream the client read too slowly (see below).

``?topics=node,tasks,services`` picks some (default: all).  Each client gets NATS
subscriptions of its own, feeding a bounded queue (``gateway.sse_queue`` events): a
client that stops reading fills it, and is then sent ``dropped`` and disconnected rather
than buffered without bound.  When a client goes away, its subscriptions go with it (the
stream's generator ends, and its ``finally`` unsubscribes).  A comment line every 15 s
keeps idle proxies from closing the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import structlog
from litestar import Request, get
from litestar.params import QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.aio.client import Client as NATS

from fabric.errors import BadRequest
from fabric.protocol import subjects
from fabric.protocol.permissions import user_subject
from fabric.protocol.subjects import Task

from .access import Caller
from .context import gateway_of
from .problems import TOKEN_OR_LOOPBACK, problems
from .upstream import Upstream

__all__ = ["EventHub", "ROUTES", "TOPICS"]

TOPICS: Final = ("node", "tasks", "services")
KEEPALIVE_S: Final = 15.0
#: how often the services are looked up for ``services`` events (s)
SERVICES_EVERY_S: Final = 2.0

log = structlog.get_logger(service="gateway")

_END: Final = object()


class _Client:
    """One event-stream client: its bounded queue, and whether it fell behind."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(size)
        self.dropped = False

    def put(self, item: Any) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # too slow: make room for the last word and end the stream (never buffer without bound)
            self.dropped = True
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    self.queue.get_nowait()
            self.queue.put_nowait(ServerSentEventMessage(event="dropped", data=json.dumps(
                {"reason": f"the client fell {self.queue.maxsize} events behind: reconnect"})))
            self.queue.put_nowait(_END)


class EventHub:
    """The gateway's event streams: who listens, and the shared watch on the services."""

    def __init__(self, nc: NATS, upstream: Upstream, queue_size: int) -> None:
        self.nc = nc
        self.upstream = upstream
        self.queue_size = queue_size
        self._service_clients: set[_Client] = set()
        self._services: dict[str, dict[str, str]] = {}
        self._wake = asyncio.Event()
        self._lookup = asyncio.Lock()
        self._looked_at = -1e9
        self.clients = 0
        self.dropped = 0

    async def watch_services(self) -> None:
        """Look the services up every SERVICES_EVERY_S while a client listens; tell each what changed."""
        while True:
            if not self._service_clients:
                self._wake.clear()
                await self._wake.wait()
            await self._refresh()
            await asyncio.sleep(SERVICES_EVERY_S)

    async def _refresh(self) -> None:
        """Look the services up once; tell every listening client what came and went."""
        async with self._lookup:
            if time.monotonic() - self._looked_at < 0.25:  # another caller just did
                return
            try:
                infos, _ = await self.upstream.services(window=0.5)
            except Exception as exc:  # NATS reconnecting: next round
                log.debug("services lookup failed", error=str(exc))
                return
            self._looked_at = time.monotonic()
            now = {str(i.get("id")): {"name": str(i.get("name", "")), "id": str(i.get("id", "")),
                                      "node": str((i.get("metadata") or {}).get("node", "")),
                                      "version": str(i.get("version", ""))} for i in infos}
            up = [v for k, v in now.items() if k not in self._services]
            down = [v for k, v in self._services.items() if k not in now]
            self._services = now
            if up or down:
                msg = ServerSentEventMessage(event="services", data=json.dumps({"up": up, "down": down}))
                for c in list(self._service_clients):
                    c.put(msg)

    async def stream(self, caller: Caller, topics: set[str]) -> AsyncIterator[ServerSentEventMessage]:
        client = _Client(self.queue_size)
        subs: list[Any] = []
        self.clients += 1

        def forward(event: str) -> Any:
            async def on_msg(msg: Any) -> None:
                client.put(ServerSentEventMessage(event=event, data=msg.data.decode("utf-8", "replace")))
            return on_msg

        try:
            if "node" in topics:
                subs.append(await self.nc.subscribe(subjects.telemetry("*"), cb=forward("node")))
            if "tasks" in topics and caller.sees_tasks:
                feed = subjects.cluster(subjects.TASK, Task.EVENTS)
                if not caller.admin:
                    assert caller.user is not None
                    feed = user_subject(caller.user, feed)
                subs.append(await self.nc.subscribe(feed, cb=forward("tasks")))
            if "services" in topics:
                if time.monotonic() - self._looked_at > 2 * SERVICES_EVERY_S:  # no recent view: look now
                    await self._refresh()
                client.put(ServerSentEventMessage(event="services", data=json.dumps(
                    {"up": list(self._services.values()), "down": [], "initial": True})))
                self._service_clients.add(client)
                self._wake.set()
            yield ServerSentEventMessage(data=None, comment=f"fabric events: {', '.join(sorted(topics))}")
            while True:
                try:
                    item = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ServerSentEventMessage(data=None, comment=f"keepalive {int(time.time())}")
                    continue
                if item is _END:
                    self.dropped += 1
                    return
                yield item
        finally:
            self._service_clients.discard(client)
            self.clients -= 1
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


@get("/api/events", tags=["events"], summary="Live events (Server-Sent Events): node telemetry, task state "
     "changes, services up and down", media_type="text/event-stream", responses=problems(400, 401, 403, 429),
     security=TOKEN_OR_LOOPBACK)
async def events(request: Request[Any, Any, Any],
                 topics: Annotated[str, QueryParameter(max_length=64)] = ",".join(TOPICS)) -> ServerSentEvent:
    gw = gateway_of(request)
    caller = gw.access.require(request, "read")
    wanted = {t.strip() for t in topics.split(",") if t.strip()}
    unknown = wanted - set(TOPICS)
    if unknown or not wanted:
        raise BadRequest(f"unknown topics {', '.join(sorted(unknown)) or '(none given)'}: "
                         f"some of {', '.join(TOPICS)}")
    return ServerSentEvent(gw.events.stream(caller, wanted), headers={"Cache-Control": "no-store",
                                                                      "X-Accel-Buffering": "no"})


ROUTES = [events]
