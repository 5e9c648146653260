"""What a service answers: its endpoints, the requests they get and the replies they give.

Part of the service kit (:mod:`fabric.service`): a service lists :class:`Endpoint` values
-- an ADR-32 name, a subject, a handler -- and the kit turns each NATS message into a
:class:`Request` (the encoding it asked for: JSON, MessagePack or a binary frame) and
the handler's result (a Struct, a :class:`Reply`, or None) into the reply.
:func:`node_endpoint` and :func:`cluster_endpoint` spell the subjects of the public
contract (:mod:`fabric.protocol.subjects`), so no service writes them by hand.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.micro.service import EndpointStats

from .protocol.headers import REQUEST_ID_HEADER
from .protocol.permissions import caller_of, user_subject
from .protocol.subjects import QUEUE_GROUP, cluster, node_scoped
from .protocol.wire import MAGIC as FRAME_MAGIC  # a body that starts with it is a frame
from .schema import CONTENT_TYPE_HEADER, FRAME_CONTENT_TYPE, JSON, MSGPACK, MSGPACK_CONTENT_TYPE, Codec

__all__ = ["Request", "Reply", "Endpoint", "Handler", "node_endpoint", "cluster_endpoint", "with_user_forms",
           "REQUEST_ID_HEADER", "FRAME_MAGIC", "ACCEPTED_CONTENT_TYPES"]




#: the request encodings every endpoint takes, by ``Content-Type`` (frames only where an endpoint says so)
ACCEPTED_CONTENT_TYPES = (JSON.content_type, MSGPACK_CONTENT_TYPE, FRAME_CONTENT_TYPE)


class Request:
    """One incoming request: its subject, headers, raw data and the codec it asked for.

    ``caller`` is the user who sent it, read from the user form of the subject
    (``fabric.u.<user>.…``), which with auth on NATS lets only that user publish; None
    for the plain form, which with auth on only admins (and services) may publish:
    a trusted caller, acting for nobody in particular (:mod:`fabric.protocol.permissions`).
    ``refusal`` is why the kit answers 400 without calling the handler (a
    ``Content-Type`` it does not know), or None.
    """

    __slots__ = ("subject", "headers", "data", "codec", "is_frame", "request_id", "refusal", "caller")

    def __init__(self, subject: str, headers: dict[str, str] | None, data: bytes) -> None:
        self.subject = subject
        self.caller = caller_of(subject)
        self.headers = headers
        self.data = data
        ctype = headers.get(CONTENT_TYPE_HEADER) if headers else None
        # the media type alone: "application/json; charset=utf-8" is JSON
        media = ctype.partition(";")[0].strip().lower() if ctype else None
        # a frame announces itself by its magic; the header is optional
        self.is_frame = media == FRAME_CONTENT_TYPE or (not media and data[:4] == FRAME_MAGIC)
        self.codec: Codec = MSGPACK if media == MSGPACK_CONTENT_TYPE else JSON
        self.request_id = headers.get(REQUEST_ID_HEADER, "") if headers else ""
        self.refusal: str | None = None
        if media and media not in ACCEPTED_CONTENT_TYPES:
            # decoding it as JSON anyway would answer a misleading "malformed JSON", or worse succeed
            self.refusal = (f"unsupported Content-Type {ctype!r}: send {', '.join(ACCEPTED_CONTENT_TYPES[:2])}, "
                            f"or {FRAME_CONTENT_TYPE} where the endpoint takes frames")

    def decode(self, type_: type[Any]) -> Any:
        """Decode the body as *type_* in the request's encoding (BadRequest if malformed)."""
        return self.codec.decode(self.data, type_)


@dataclass
class Reply:
    """A reply that is not a plain Struct: raw bytes (a frame) and optional headers."""

    data: bytes | bytearray | memoryview
    headers: dict[str, str] | None = None


#: an endpoint handler: a coroutine function (runs as its own task), or a plain
#: function for work that never awaits (runs inline, see FabricService._dispatcher)
Handler = Callable[[Request], Any]


@dataclass
class Endpoint:
    """One endpoint: an ADR-32 name, its subject, and the coroutine that answers it."""

    name: str
    subject: str
    handler: Handler
    queue_group: str = QUEUE_GROUP
    #: whether the handler takes binary frames; the kit answers 400 to a frame sent to one that does not
    frames: bool = False
    #: whether users reach it too, on its user form (:func:`with_user_forms`); False for what only
    #: services and admins may ask (the nodes' ``fabric.task.pull``)
    users: bool = True
    # per-endpoint statistics of the real work (not just the dispatch)
    num_requests: int = 0
    num_errors: int = 0
    processing_ns: int = 0
    last_error: str = ""
    in_flight: int = field(default=0)
    #: plain-function handlers run inline (see FabricService._dispatcher); coroutines get a task
    inline: bool = field(init=False)

    def __post_init__(self) -> None:
        self.inline = not inspect.iscoroutinefunction(self.handler)

    def record(self, started_ns: int, error: str | None = None) -> None:
        """Count one request that began at *started_ns* (``time.perf_counter_ns``)."""
        self.num_requests += 1
        self.processing_ns += time.perf_counter_ns() - started_ns
        if error is not None:
            self.num_errors += 1
            self.last_error = error

    def stats(self) -> EndpointStats:
        avg = self.processing_ns // self.num_requests if self.num_requests else 0
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group,
            num_requests=self.num_requests,
            num_errors=self.num_errors,
            processing_time=self.processing_ns,
            average_processing_time=avg,
            last_error=self.last_error,
            data={"in_flight": self.in_flight},
        )


def with_user_forms(endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """*endpoints*, each followed by its user form where users reach it.

    The user form of ``fabric.mem.alloc`` is ``fabric.u.*.mem.alloc``, named
    ``alloc-user``: the same handler, on its own subscription and counters, so
    ``$SRV.STATS`` tells the two apart.
    """
    out: list[Endpoint] = []
    for ep in endpoints:
        out.append(ep)
        if ep.users and ep.subject.startswith("fabric."):  # the contract's subjects; a test's own have none
            out.append(Endpoint(f"{ep.name}-user", user_subject("*", ep.subject), ep.handler,
                                queue_group=ep.queue_group, frames=ep.frames, users=False))
    return out


def node_endpoint(area: str, node: str, verb: str, handler: Handler, *, name: str | None = None,
                  frames: bool = False, wildcard: bool = False) -> Endpoint:
    """``fabric.<area>.<node>.<verb>``: answered by the service on *node*; named *name*, by default *verb*.

    *wildcard* adds one more token, any one (``fabric.core.<node>.run.<core>``).
    """
    subject = node_scoped(area, node, verb) + (".*" if wildcard else "")
    return Endpoint(name if name is not None else verb, subject, handler, frames=frames)


def cluster_endpoint(area: str, verb: str, handler: Handler, *, name: str | None = None) -> Endpoint:
    """``fabric.<area>.<verb>``: answered by any instance (queue group); named *name*, by default *verb*."""
    return Endpoint(name if name is not None else verb, cluster(area, verb), handler)
