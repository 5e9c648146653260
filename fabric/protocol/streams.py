"""The JetStream names of the contract: every stream, KV bucket and object store fabric keeps.

Spelled once here so that the services that own them, the client that reads some of
them, and the permission table (:mod:`fabric.protocol.permissions`, which must grant each
role exactly the JetStream API subjects of the resources it uses) agree.  docs/state.md
says what each one holds.  Part of :mod:`fabric.protocol` (stdlib only).
"""

from __future__ import annotations

from typing import Final

#: stream of task bodies (subjects ``fabric.task.body.<id>``), written by the scheduler
BODY_STREAM: Final = "FABRIC_TASK_BODIES"
#: KV of task records (key: the task id), written by the active scheduler with compare-and-swap
TASK_BUCKET: Final = "fabric_tasks"
#: KV holding the scheduler lease (memory): which instance is active
LEASE_BUCKET: Final = "fabric_scheduler"
#: the lease's key: whoever holds it is the active scheduler (a clustering node holds it while it copies)
LEASE_KEY: Final = "active"
#: KV of the active scheduler's own state (the map checkpoint)
STATE_BUCKET: Final = "fabric_scheduler_state"
#: KV of node records (memory; key: the node name), one written by each node's gpu-monitor
REGISTRY_BUCKET: Final = "fabric_nodes"
#: object store of task results too large for a message (24 h TTL)
RESULTS_BUCKET: Final = "fabric_task_results"
#: stream of webhooks to deliver (subjects ``fabric.webhook.<task id>``, work queue): the scheduler stores one
#: WebhookNotice per ended task that has a callback_url, a gateway delivers it and acknowledges it
WEBHOOK_STREAM: Final = "FABRIC_WEBHOOKS"
WEBHOOK_SUBJECT_PREFIX: Final = "fabric.webhook"
#: the gateways' durable pull consumer of WEBHOOK_STREAM (shared: each webhook goes to one gateway)
WEBHOOK_CONSUMER: Final = "webhooks"
#: KV of the HTTP gateway's bearer tokens (key ``token.<name>``: the token's sha256, user, scopes), written by
#: ``fabric token create/rm`` and read by every gateway
GATEWAY_BUCKET: Final = "fabric_gateway"


def kv_stream(bucket: str) -> str:
    """The stream behind KV bucket *bucket* (``KV_<bucket>``): what JetStream API subjects name."""
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    """The stream behind object store *bucket* (``OBJ_<bucket>``)."""
    return f"OBJ_{bucket}"
