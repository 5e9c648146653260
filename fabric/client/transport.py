"""The client's transport: connecting to NATS, one request with its typed error, URL discovery.

Identity: with credentials (``credentials=``, ``$FABRIC_CREDENTIALS``, or the admin
credentials of the fabric running here: :func:`fabric.credentials.find_credentials`)
the client authenticates as their user; a user of role ``client`` sends every request
in its user form ``fabric.u.<user>.…`` and reads replies in ``_INBOX.<user>``, the only
subjects NATS lets it use (:mod:`fabric.protocol.permissions`), so the services know
who asks.  A request the server refuses for permissions raises
:class:`~fabric.errors.PermissionDenied` naming the subject, at once rather than at
the timeout; a refused connection raises :class:`~fabric.errors.Unauthenticated`.

Every area of the client (memory, processes, cores, nodes, OpenCL) sends its requests
through :class:`Transport`: :meth:`Transport.request` maps NATS failures and error
replies (docs/protocol.md "Errors") onto :mod:`fabric.errors`, :meth:`Transport._call`
adds the JSON encoding of one message and the decoding of its typed reply.  The areas
are mixins over this base; :class:`fabric.client.AsyncFabricClient` composes them.
Nothing here imports an area: dependencies run transport <- areas <- client.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import getpass
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ParamSpec, TypeVar, cast

import nats
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from ..config.model import DEFAULT_NATS_URL
from ..credentials import UNTRUSTED_CERTIFICATE, Credentials, CredentialsError, find_credentials, refusal
from ..errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ERROR_KIND_HEADER,
    BadRequest,
    FabricError,
    NoResponders,
    PermissionDenied,
    RequestTimedOut,
    Unauthenticated,
    Unavailable,
    error_from_wire,
)
from ..protocol import subjects
from ..protocol.permissions import ADMIN, subject_for
from ..schema import JSON

T = TypeVar("T")
R = TypeVar("R")
TR = TypeVar("TR", bound="Transport")
P = ParamSpec("P")
# room left in a message for the frame header, the item table and NATS headers
FRAME_OVERHEAD = 4096
# reads above this travel as concurrent chunks (see fabric.client's docstring)
DEFAULT_READ_CHUNK_SIZE = 128 * 1024
# chunk requests of one value in flight at a time: enough to keep every stage of the
# path busy, few enough that a 1 GiB value does not queue 4096 requests at once
CHUNKS_IN_FLIGHT = 8

log = logging.getLogger("fabric.client")
# the cancel message of a request the server refused for permissions (Transport._on_error)
_DENIED = "fabric: permissions violation"


# nats-py prints a traceback for every connection error unless given callbacks: a
# library must not write to the user's stderr, so these go to logging instead.
async def _log_nats_error(exc: Exception) -> None:
    log.debug("nats error: %r", exc)


async def _log_reconnect() -> None:
    log.info("reconnected to NATS")


def _arguments_checked(fn: Callable[P, R]) -> Callable[P, R]:
    """Bad numbers in a memory call raise :class:`BadRequest` (400), like a bad request anywhere.

    The codec and the local fast path check offsets, lengths and item shapes and raise
    ``ValueError`` / ``OverflowError`` with a precise message; the caller gets that
    message as a typed fabric error.  :class:`BadRequest` is itself a ``ValueError``,
    so ``except ValueError`` keeps working.
    """
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def checked_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return await fn(*args, **kwargs)
            except FabricError:
                raise
            except (ValueError, OverflowError) as exc:
                raise BadRequest(str(exc)) from None
        return cast(Callable[P, R], checked_async)

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FabricError:
            raise
        except (ValueError, OverflowError) as exc:
            raise BadRequest(str(exc)) from None
    return checked


def default_url(credentials: Credentials | None = None) -> str:
    """Where a client connects when given no URL.

    ``$FABRIC_NATS_URL`` first; else the URL in the *credentials* file; else the NATS
    of the fabric that ``fabric up`` runs in the default state directory on this
    machine (whatever port it got); else ``nats://127.0.0.1:4222``.  (The variable is
    the configuration's ``nats.url``, docs/config.md; a client reads only that one.)
    """
    from ..config.keys import env_name

    env = os.environ.get(env_name("nats.url"))
    if env:
        return env
    if credentials is not None and credentials.url:
        return credentials.url
    try:
        from ..state import StateDir, default_state_dir

        state = StateDir(default_state_dir()).running()
    except Exception:  # noqa: BLE001 - an unreadable state dir just means "not running here"
        state = None
    return state.nats_url if state is not None and state.nats_url else DEFAULT_NATS_URL


def _default_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers): fall back to the uid
        user = str(os.getuid())
    host = subjects.sanitize_node_name(socket.gethostname())
    return f"{user}@{host}"[:64]


async def _in_flight(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = CHUNKS_IN_FLIGHT) -> list[T]:
    """Await every call, at most *limit* in flight; results in order.

    *calls* is consumed lazily and the first error stops it: a read whose length is
    absurd for its block fails on its first chunks instead of planning them all.
    """
    results: list[T] = []
    pending: collections.deque[asyncio.Future[T]] = collections.deque()
    try:
        for call in calls:
            pending.append(asyncio.ensure_future(call()))
            if len(pending) >= limit:
                results.append(await pending.popleft())
        while pending:
            results.append(await pending.popleft())
    finally:
        for fut in pending:  # an error (or a cancel): the rest are not wanted
            fut.cancel()
    return results


class Transport:
    """One NATS connection and the request plumbing every area of the client uses."""

    def __init__(self, url: str | None, *, owner: str | None, timeout: float, name: str,
                 read_chunk_size: int, credentials: str | os.PathLike[str] | None = None,
                 signing_key: str | os.PathLike[str] | None = None) -> None:
        if isinstance(read_chunk_size, bool) or not isinstance(read_chunk_size, int) or read_chunk_size < 4096:
            raise BadRequest(f"read_chunk_size must be an int of at least 4096 bytes, got {read_chunk_size!r}")
        try:
            #: who the client is on NATS (None: no credentials, a fabric without auth)
            self.credentials: Credentials | None = find_credentials(credentials)
        except CredentialsError as exc:
            raise Unauthenticated(str(exc)) from None
        #: the user whose user form every request takes (None: the plain form, an admin's or without auth)
        self.user: str | None = (self.credentials.user if self.credentials is not None
                                 and self.credentials.role != ADMIN else None)
        self.url = url or default_url(self.credentials)
        from ..signing import SIGNING_KEY_ENV, SigningKey, load_key

        key_path = signing_key or os.environ.get(SIGNING_KEY_ENV) or None
        #: the key this client signs its code with (fabric.signing), or None
        self.signing_key: SigningKey | None = load_key(key_path) if key_path else None
        self._init_requests(owner if owner is not None else _default_owner(), timeout, name, read_chunk_size)

    def _init_requests(self, owner: str, timeout: float, name: str, read_chunk_size: int,
                       nc: NATS | None = None) -> None:
        """What every client holds to send requests, whoever made its connection (:meth:`over_connection`)."""
        self.owner = owner
        self.timeout = timeout
        self.name = name
        self.read_chunk_size = read_chunk_size
        self.nc: NATS | None = nc
        # with credentials: the requests in flight, by task, so a permissions violation fails them at once
        self._in_flight: dict[asyncio.Task[Any], str] = {}
        self._denied: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._refused: str | None = None
        self._connecting: asyncio.Future[NATS] | None = None
        self._closing = False  # close() under way: the disconnect that follows is no news

    @classmethod
    def over_connection(cls: type[TR], nc: NATS, *, user: str | None, owner: str, timeout: float,
                        read_chunk_size: int = DEFAULT_READ_CHUNK_SIZE) -> TR:
        """A client over a connection someone else owns and closes, acting for *user* (None: the plain form).

        For a trusted proxy -- the HTTP gateway -- that checked its caller itself and sends
        that caller's requests on its own connection: no credentials of its own, no local
        fast path, nothing started (an area's ``_init_*`` is the caller's to call).
        """
        self = cls.__new__(cls)
        self.credentials = None
        self.user = user
        self.url = ""
        self.signing_key = None
        self._init_requests(owner, timeout, "fabric-gateway", read_chunk_size, nc)
        return self

    def _sign(self, message: bytes) -> str:
        """*message* signed with the client's signing key (base64), "" without one."""
        return self.signing_key.sign(message) if self.signing_key is not None else ""

    def _subject(self, subject: str) -> str:
        """The subject this client sends a request for *subject* on: its user form, with a user."""
        return subject_for(self.user, subject)

    async def _on_error(self, exc: Exception) -> None:
        """nats-py's error callback: permissions violations fail their requests; refusals end the connect."""
        text = str(exc)
        if "permissions violation" in text:
            # nats-py lower-cases the server's message: 'nats: permissions violation for publish to "x"'
            subject = text.rpartition(" to ")[2].strip().strip('"')
            kind = "subscribe to" if "subscription" in text else "publish to"
            who = f"user {self.credentials.user!r}" if self.credentials is not None else "this connection"
            self._denied[subject] = f"permission denied: {who} may not {kind} {subject!r} (docs/security.md)"
            while len(self._denied) > 64:
                self._denied.popitem(last=False)
            log.warning("%s", self._denied[subject])
            for task, sent in list(self._in_flight.items()):
                if sent.lower() == subject:
                    task.cancel(msg=_DENIED)
            return
        if refusal(text) is not None:
            self._refused = text
            if self.nc is None and self._connecting is not None and not self._connecting.done():
                self._connecting.cancel()
        await _log_nats_error(exc)

    async def _connect(self) -> None:
        if self.nc is None:
            # Once connected the client reconnects forever (a restarted nats-server must
            # not kill long-lived clients), but nats-py applies the same setting to the
            # first connect, which would then wait forever for a server that is not
            # there: bound the first connect by the client's timeout.
            auth = self.credentials.connect_options() if self.credentials is not None else {}
            # a refusal (no or unknown credentials) is final: the connect ends at once (see _on_error)
            self._connecting = asyncio.ensure_future(
                nats.connect(self.url, name=self.name, connect_timeout=min(self.timeout, 2.0),
                             max_reconnect_attempts=-1, allow_reconnect=True,
                             reconnect_time_wait=0.25, error_cb=self._on_error,
                             disconnected_cb=self._disconnected, reconnected_cb=self._reconnected, **auth))
            try:
                self.nc = await asyncio.wait_for(self._connecting, timeout=self.timeout)
            except asyncio.CancelledError:
                if self._refused is None:
                    raise
                raise self._unauthenticated() from None
            except asyncio.TimeoutError:
                if self._refused is not None:
                    raise self._unauthenticated() from None
                raise Unavailable(
                    f"cannot connect to NATS at {self.url} within {self.timeout:g}s: nothing answers there. "
                    "Start fabric with `fabric up`, or pass the URL of a running one "
                    "(FabricClient(url) or $FABRIC_NATS_URL)") from None
            except Exception as exc:
                if self._refused is not None or refusal(str(exc)) is not None:
                    raise self._unauthenticated() from None
                raise Unavailable(f"cannot connect to NATS at {self.url}: {exc}") from None

    def _unauthenticated(self) -> Unauthenticated:
        if self._refused is not None and refusal(self._refused) == UNTRUSTED_CERTIFICATE:
            return Unauthenticated(
                f"NATS at {self.url} runs TLS with a certificate this client does not trust: connect with "
                "credentials issued by that fabric (`fabric user add`), which carry its CA")
        if self.credentials is None:
            return Unauthenticated(
                f"NATS at {self.url} requires credentials: pass FabricClient(credentials='NAME.creds') or set "
                "$FABRIC_CREDENTIALS (`fabric user add NAME` issues them; on a fabric machine the admin's are "
                "found by themselves)")
        where = f" ({self.credentials.path})" if self.credentials.path else ""
        return Unauthenticated(
            f"NATS at {self.url} refused the credentials of user {self.credentials.user!r}{where}: "
            "the user was removed or expired, or the file belongs to another fabric")

    async def _reconnected(self) -> None:
        await _log_reconnect()
        self._after_reconnect()

    def _after_reconnect(self) -> None:
        """Runs in the loop once NATS reconnected (subscriptions are back): an area catches up here."""

    async def _disconnected(self) -> None:
        """nats-py's disconnect callback: news when the connection was lost, nothing when this client closes it."""
        if not self._closing:
            log.info("disconnected from NATS; reconnecting")

    async def _disconnect(self) -> None:
        if self.nc is not None:
            self._closing = True
            nc, self.nc = self.nc, None
            try:
                await nc.drain()
            except Exception:
                await nc.close()

    @property
    def max_payload(self) -> int:
        assert self.nc is not None, "client is not connected"
        return self.nc.max_payload

    @property
    def write_chunk(self) -> int:
        """The most bytes one write request carries: what fits the max payload."""
        return self.max_payload - FRAME_OVERHEAD

    @property
    def read_chunk(self) -> int:
        """The most bytes one read request asks for: ``read_chunk_size``, within the max payload."""
        return min(self.read_chunk_size, self.max_payload - FRAME_OVERHEAD)

    async def request(self, subject: str, data: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> Any:
        """Send one request; return the reply message or raise the typed error it carries."""
        if self.nc is None:
            raise Unavailable("client is not connected: use 'async with' or call connect()")
        subject = subject_for(self.user, subject)
        task = asyncio.current_task() if self.credentials is not None else None
        if task is not None:
            self._in_flight[task] = subject
        try:
            msg = await self.nc.request(subject, data, timeout=timeout or self.timeout, headers=headers)
        except NoRespondersError:
            raise NoResponders(f"no service answers on {subject}") from None
        except NatsTimeout:
            denied = self._denied.get(subject.lower())
            if denied is not None:
                raise PermissionDenied(denied) from None
            raise RequestTimedOut(f"request on {subject} timed out after {timeout or self.timeout}s") from None
        except asyncio.CancelledError as exc:
            denied = self._denied.get(subject.lower())
            if task is None or denied is None or _DENIED not in exc.args:
                raise
            if hasattr(task, "uncancel"):  # 3.11+: the task is not being cancelled any more
                task.uncancel()
            raise PermissionDenied(denied) from None
        finally:
            if task is not None:
                self._in_flight.pop(task, None)
        hdrs = msg.headers
        if hdrs and ERROR_CODE_HEADER in hdrs:
            raise error_from_wire(hdrs[ERROR_CODE_HEADER], hdrs.get(ERROR_HEADER, ""), hdrs.get(ERROR_KIND_HEADER))
        return msg

    async def _call(self, subject: str, msg: Any, reply_type: type[T], timeout: float | None = None) -> T:
        reply = await self.request(subject, JSON.encode(msg), timeout=timeout)
        return JSON.decode(reply.data, reply_type)

    @staticmethod
    def _mem(node: str, verb: str) -> str:
        return subjects.node_scoped(subjects.MEM, node, verb)
