"""A task's webhook, the scheduler's part: when a task with a ``callback_url`` ends, store a notice for a gateway.

The scheduler never calls the URL itself: a slow or dead receiver must never slow it.  It
stores a :class:`~fabric.schema.tasks.WebhookNotice` in stream ``FABRIC_WEBHOOKS``
(subject ``fabric.webhook.<id>``, work queue, deduplicated by the task id, so a notice
published again by a scheduler that took over is kept once) through the same
asynchronous publisher as the records; the gateways share a durable consumer of that
stream and deliver each notice once, retrying with backoff (services/gateway/webhooks.py).
How it went comes back on ``fabric.task.callback`` and is kept on the record
(``TaskRecord.callback``).
"""

from __future__ import annotations

from typing import Any

from fabric.protocol.streams import WEBHOOK_SUBJECT_PREFIX
from fabric.schema import JSON
from fabric.schema.tasks import TaskRecord, WebhookNotice

from .store import MSG_ID

__all__ = ["notice_of", "publish"]



def notice_of(rec: TaskRecord) -> WebhookNotice:
    return WebhookNotice(id=rec.id, state=rec.state, kind=rec.kind, owner=rec.owner, callback_url=rec.callback_url,
                         created_ms=rec.created_ms, finished_ms=rec.finished_ms, exit_code=rec.exit_code,
                         error=rec.error, result_size=rec.result_size or len(rec.result),
                         attempts=len(rec.attempts))


def publish(pub: Any, rec: TaskRecord, log: Any) -> None:
    """Store *rec*'s webhook notice (retried until JetStream has it; a failure is logged, never raised)."""
    import asyncio

    data = JSON.encode(notice_of(rec))
    subject = f"{WEBHOOK_SUBJECT_PREFIX}.{rec.id}"
    headers = {MSG_ID: f"webhook-{rec.id}"}
    tries = [0]

    def acked(seq: int, err: dict[str, Any] | None) -> None:
        if err is None:
            return
        tries[0] += 1
        if tries[0] > 50:
            log.error("webhook notice not stored: given up", task=rec.id, error=err.get("description"))
            return
        asyncio.get_running_loop().call_later(min(0.1 * tries[0], 2.0), pub.publish, subject, data, headers, acked)

    pub.publish(subject, data, headers, acked)
