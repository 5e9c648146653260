"""The gateway's side of NATS: requests sent as the HTTP caller, and the fabric's state it reads.

A caller with a user sends in that user's form (``fabric.u.<user>.…``), so the services
apply the user's ownership and refusals as they would to the user's own client; an admin
token sends the plain form.  Replies' error headers become the same
:class:`~fabric.errors.FabricError` the Python client raises, which
:mod:`.problems` turns into problem+json.  Remote memory goes through the client's own
memory area over this connection (:meth:`fabric.client.transport.Transport.over_connection`),
so large values are split into NATS-sized requests exactly as the client splits them.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from fabric.client.memory import MemoryArea
from fabric.discovery import collect_replies
from fabric.errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ERROR_KIND_HEADER,
    FabricError,
    NoResponders,
    NotFound,
    RequestTimedOut,
    error_from_wire,
)
from fabric.protocol import subjects
from fabric.protocol.permissions import subject_for
from fabric.schema import JSON

from .access import Caller

__all__ = ["Upstream"]

T = TypeVar("T")


class _Memory(MemoryArea):
    """The client's memory area, on the gateway's connection (no local fast path: the bytes go over NATS)."""


class Upstream:
    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout

    async def request(self, caller: Caller, subject: str, data: bytes = b"{}", timeout: float | None = None,
                      headers: dict[str, str] | None = None) -> Any:
        """One request as *caller*; the reply message, or the typed error it carries."""
        return await self._send(subject_for(None if caller.admin else caller.user, subject), data, timeout, headers)

    async def call(self, caller: Caller, subject: str, msg: Any, reply_type: type[T],
                   timeout: float | None = None) -> T:
        reply = await self.request(caller, subject, JSON.encode(msg), timeout)
        return JSON.decode(reply.data, reply_type)

    async def trusted(self, subject: str, msg: Any, reply_type: type[T], timeout: float | None = None) -> T:
        """A request on the plain form, for the fabric-wide state every read scope shows (nodes, devices...)."""
        reply = await self._send(subject, JSON.encode(msg), timeout)
        return JSON.decode(reply.data, reply_type)

    async def _send(self, subject: str, data: bytes, timeout: float | None,
                    headers: dict[str, str] | None = None) -> Any:
        """Send on *subject* as it is: the reply, or the FabricError its headers (or its absence) mean."""
        try:
            msg = await self.nc.request(subject, data, timeout=timeout or self.timeout, headers=headers)
        except NoRespondersError:
            raise NoResponders(f"no service answers on {subject}") from None
        except NatsTimeout:
            raise RequestTimedOut(f"request on {subject} timed out after {timeout or self.timeout:g}s") from None
        hdrs = msg.headers
        if hdrs and ERROR_CODE_HEADER in hdrs:
            raise error_from_wire(hdrs[ERROR_CODE_HEADER], hdrs.get(ERROR_HEADER, ""), hdrs.get(ERROR_KIND_HEADER))
        return msg

    async def node_known(self, node: str) -> bool:
        """Whether *node* is a live node of the registry (True when the registry cannot say: no 404 on a guess)."""
        try:
            await self.trusted(subjects.cluster(subjects.NODES, subjects.Nodes.GET), {"node": node}, dict, timeout=2.0)
        except NotFound:
            return False
        except FabricError:
            return True
        return True

    def memory(self, caller: Caller) -> _Memory:
        mem = _Memory.over_connection(self.nc, user=None if caller.admin else caller.user,
                                      owner=caller.user or "", timeout=self.timeout)
        mem._init_memory(False)
        return mem

    async def services(self, window: float = 0.25) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every service instance's ``$SRV.INFO`` and ``$SRV.STATS`` (ADR-32), gathered for *window* s each."""
        infos, stats = await asyncio.gather(
            collect_replies(self.nc, [subjects.srv("INFO")], window=window),
            collect_replies(self.nc, [subjects.srv("STATS")], window=window))
        return ([r for r in infos if isinstance(r, dict)], [r for r in stats if isinstance(r, dict)])
