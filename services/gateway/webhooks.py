"""Webhooks: a task's ``callback_url`` gets a signed POST when the task ends.

The scheduler stores a notice per ended task with a ``callback_url`` in stream
``FABRIC_WEBHOOKS`` (services/scheduler/webhooks.py); every gateway pulls from one shared
durable consumer (``webhooks``), so each notice goes to one gateway, and a notice whose
gateway died is delivered by another once its ack wait passes.  Delivery:

* ``POST <callback_url>`` with a JSON body (:func:`payload`): the task's id, state, kind,
  exit code, error, result size, times, and ``result_url`` (this gateway's
  ``/api/tasks/{id}/result``);
* headers ``X-Fabric-Event: task.ended``, ``X-Fabric-Delivery: <id>/<try>``,
  ``X-Fabric-Timestamp: <unix seconds>``, ``X-Fabric-Signature: sha256=<hex>``: the
  HMAC-SHA256, under the fabric's webhook secret, of ``<timestamp>.<body>`` (the receiver
  checks it and the timestamp's age, which stops replays; docs/gateway.md has the code);
* a 2xx answer is delivered; anything else (a refused connection, a timeout, a 5xx) is
  tried again after ``gateway.webhook_backoff_s``, doubled each time (at most 5 min), by
  the JetStream redelivery of the notice, up to ``gateway.webhook_attempts`` tries; the
  outcome -- delivered, or failed with the last status and error -- is kept on the task's
  record (``fabric.task.callback``: ``TaskRecord.callback``).

Each delivery runs on its own (at most :data:`IN_FLIGHT` at once): a slow or dead receiver
holds one slot for at most ``gateway.webhook_timeout_s``, never the scheduler, never the
other webhooks.  Redirects are not followed, and link-local addresses (cloud metadata
services) are refused.  The secret is the ``webhook.secret`` key of bucket
``fabric_gateway``: made by the first gateway that needs it, shown by
``fabric webhook-secret``, replaced by ``fabric webhook-secret --rotate``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from fabric.config.model import GatewayConfig
from fabric.errors import FabricError
from fabric.gateway_tokens import webhook_secret
from fabric.jetstream import Consumer
from fabric.protocol import subjects
from fabric.protocol.headers import (
    CONTENT_TYPE_HEADER,
    WEBHOOK_DELIVERY_HEADER,
    WEBHOOK_EVENT_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
)
from fabric.protocol.streams import WEBHOOK_CONSUMER, WEBHOOK_STREAM, WEBHOOK_SUBJECT_PREFIX
from fabric.protocol.subjects import Task
from fabric.schema import JSON
from fabric.schema.tasks import CallbackReport, TaskRecord, WebhookNotice

from .upstream import Upstream

__all__ = ["WebhookDeliverer", "consumer", "payload", "sign", "IN_FLIGHT"]

IN_FLIGHT: Final = 32
MAX_BACKOFF_S: Final = 300.0
#: how long a gateway may hold a notice before JetStream hands it to another (a try takes at most the timeout)
ACK_WAIT_S: Final = 60.0


def consumer(config: GatewayConfig) -> Consumer:
    return Consumer(WEBHOOK_STREAM, ConsumerConfig(
        durable_name=WEBHOOK_CONSUMER, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        ack_wait=max(ACK_WAIT_S, config.webhook_timeout_s + 30.0), max_deliver=-1, max_ack_pending=1024,
        filter_subject=f"{WEBHOOK_SUBJECT_PREFIX}.*", description="fabric gateways: webhooks to deliver"))


def payload(notice: WebhookNotice, gateway_url: str) -> bytes:
    """The POST body a receiver gets."""
    return json.dumps({
        "event": "task.ended", "id": notice.id, "state": notice.state, "kind": notice.kind,
        "exit_code": notice.exit_code,
        "error": None if notice.error is None else {"code": notice.error.code, "kind": notice.error.kind,
                                                     "message": notice.error.message},
        "result_size": notice.result_size, "attempts": notice.attempts, "created_ms": notice.created_ms,
        "finished_ms": notice.finished_ms, "result_url": f"{gateway_url}/api/tasks/{notice.id}/result",
    }, separators=(",", ":")).encode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``<timestamp>.<body>`` under *secret*."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def refused(url: str) -> str:
    """Why *url* is not called ("" when it may be)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http:// or https:// URL"
    try:
        addr = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return ""
    if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return f"{addr} is a link-local, multicast or unspecified address (cloud metadata services live there)"
    return ""


class WebhookDeliverer:
    """Pulls the notices, delivers each on its own task, reports how it went."""

    def __init__(self, js: Any, upstream: Upstream, config: GatewayConfig, gateway_url: Callable[[], str],
                 version: str, log: Any) -> None:
        self.js = js
        self.upstream = upstream
        self.config = config
        self.gateway_url = gateway_url
        self.log = log
        self.secret: bytes = b""
        self.delivered = 0
        self.failed = 0
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": f"fabric-gateway/{version}"})

    async def ensure_secret(self) -> None:
        """The fabric's webhook secret: made here if no gateway made it yet (fabric.gateway_tokens)."""
        self.secret = await webhook_secret(self.js)

    async def run(self) -> None:
        sub = await self.js.pull_subscribe_bind(WEBHOOK_CONSUMER, stream=WEBHOOK_STREAM)
        try:
            while True:
                await self._slots.acquire()  # take notices only when a slot is free
                self._slots.release()
                try:
                    msgs = await sub.fetch(batch=min(IN_FLIGHT, 16), timeout=5.0)
                except asyncio.TimeoutError:
                    continue
                except Exception as exc:  # noqa: BLE001 - not nats-py's TimeoutError alone
                    if type(exc).__name__ == "TimeoutError":
                        continue
                    raise
                for msg in msgs:
                    await self._slots.acquire()
                    task = asyncio.ensure_future(self._deliver(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._http.aclose()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _deliver(self, msg: Any) -> None:
        try:
            notice = JSON.decode(msg.data, WebhookNotice)
        except Exception:  # noqa: BLE001 - a notice no scheduler wrote: nothing can be done with it
            self.log.warning("webhook notice that does not decode: dropped", subject=msg.subject)
            await msg.term()
            return
        attempt = int(getattr(msg.metadata, "num_delivered", 1) or 1)
        why = refused(notice.callback_url)
        status, error = 0, why
        if not why:
            status, error = await self._post(notice, attempt)
            if 200 <= status < 300:
                self.delivered += 1
                await self._report(notice, "delivered", attempt, status, "")
                await msg.ack()
                return
        if why or attempt >= self.config.webhook_attempts:
            self.failed += 1
            self.log.warning("webhook failed", task=notice.id, url=notice.callback_url, attempts=attempt,
                             status=status, error=error)
            await self._report(notice, "failed", attempt, status, error)
            await msg.term()
            return
        delay = min(self.config.webhook_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        await msg.nak(delay=delay)

    async def _post(self, notice: WebhookNotice, attempt: int) -> tuple[int, str]:
        body = payload(notice, self.gateway_url())
        ts = str(int(time.time()))
        headers = {CONTENT_TYPE_HEADER: "application/json", WEBHOOK_EVENT_HEADER: "task.ended",
                   WEBHOOK_DELIVERY_HEADER: f"{notice.id}/{attempt}", WEBHOOK_TIMESTAMP_HEADER: ts,
                   WEBHOOK_SIGNATURE_HEADER: sign(self.secret, ts, body)}
        try:
            r = await self._http.post(notice.callback_url, content=body, headers=headers,
                                      timeout=self.config.webhook_timeout_s)
        except httpx.TimeoutException:
            return 0, f"no answer within {self.config.webhook_timeout_s:g} s"
        except httpx.HTTPError as exc:
            return 0, str(exc) or type(exc).__name__
        return r.status_code, "" if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"

    async def _report(self, notice: WebhookNotice, outcome: str, attempts: int, status: int, error: str) -> None:
        report = CallbackReport(id=notice.id, outcome=outcome, attempts=attempts, status=status, error=error[:1024])
        try:
            await self.upstream.trusted(subjects.cluster(subjects.TASK, Task.CALLBACK), report, TaskRecord)
        except FabricError as exc:  # the delivery stands; only its note on the record is missing
            self.log.warning("webhook outcome not recorded", task=notice.id, outcome=outcome, error=exc.message)
