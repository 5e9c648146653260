"""The NATS header names and content types of the public contract, spelled once.

docs/protocol.md "Errors", "Encodings", "Output stream" and "run" say what each carries.
The Cython frame codec spells :data:`FRAME_CONTENT_TYPE` again as ``fabric_ext.wire.CONTENT_TYPE``
(it imports nothing of fabric); tests/test_protocol_frames.py checks the two agree.
Part of :mod:`fabric.protocol` (stdlib only).
"""

from __future__ import annotations

from typing import Final

# -- errors (ADR-32, plus fabric's stable kind) ------------------------------------------
#: readable text of a failed request
ERROR_HEADER: Final = "Nats-Service-Error"
#: the HTTP-like error code of a failed request
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
#: the stable error kind (``invalid_frame``, ``stale_handle``, ...), so a client raises the exact class
ERROR_KIND_HEADER: Final = "Fabric-Error"

# -- encodings ---------------------------------------------------------------------------
CONTENT_TYPE_HEADER: Final = "Content-Type"
JSON_CONTENT_TYPE: Final = "application/json"
MSGPACK_CONTENT_TYPE: Final = "application/msgpack"
FRAME_CONTENT_TYPE: Final = "application/x-fabric-frame"

# -- requests and replies ----------------------------------------------------------------
#: an id a client may set on a request; the service logs it with the request
REQUEST_ID_HEADER: Final = "Fabric-Request-Id"
#: the core's exit code on a ``job_failed`` reply of ``run``
EXIT_CODE_HEADER: Final = "Fabric-Exit-Code"

# -- a process's output stream (``fabric.proc.<node>.out.<id>``) ------------------------
#: which stream a chunk is from: ``stdout``, ``stderr`` or ``exit``
STREAM_HEADER: Final = "Fabric-Stream"
#: the process id a chunk belongs to
PROC_HEADER: Final = "Fabric-Proc"
#: the chunk's sequence number
SEQ_HEADER: Final = "Fabric-Seq"
#: on a map's body in stream FABRIC_TASK_BODIES: how many tasks it holds (docs/protocol.md "Where tasks live")
MAP_HEADER: Final = "Fabric-Map"

#: on an HTTP response of the gateway's ``GET /api/tasks/{id}/result``: the task's state (docs/gateway.md)
TASK_STATE_HEADER: Final = "Fabric-Task-State"

#: on a webhook's POST (docs/gateway.md "Webhooks"): what happened, which try, when, and the HMAC-SHA256 signature
WEBHOOK_EVENT_HEADER: Final = "X-Fabric-Event"
WEBHOOK_DELIVERY_HEADER: Final = "X-Fabric-Delivery"
WEBHOOK_TIMESTAMP_HEADER: Final = "X-Fabric-Timestamp"
WEBHOOK_SIGNATURE_HEADER: Final = "X-Fabric-Signature"

#: every header name of the contract (tests/test_layering.py: no module outside fabric.protocol spells one)
ALL_HEADERS: Final = (ERROR_HEADER, ERROR_CODE_HEADER, ERROR_KIND_HEADER, CONTENT_TYPE_HEADER, REQUEST_ID_HEADER,
                      EXIT_CODE_HEADER, STREAM_HEADER, PROC_HEADER, SEQ_HEADER, MAP_HEADER, TASK_STATE_HEADER,
                      WEBHOOK_EVENT_HEADER, WEBHOOK_DELIVERY_HEADER, WEBHOOK_TIMESTAMP_HEADER, WEBHOOK_SIGNATURE_HEADER)
