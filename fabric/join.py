"""Joining a fabric with auth on: ``fabric up --nats-url URL --token T`` on another machine.

The token (``fabric join-token`` on a machine of the fabric: ``fabric1.<nkey seed>``) is
an identity that may do one thing: publish on ``fabric.join.request``
(:data:`fabric.protocol.subjects.JOIN_REQUEST`).  The joining machine makes its own keys
-- one per service, one for its operator -- and sends only their public halves with its
node name (:class:`JoinRequest`); the supervisor of the fabric that issued the token
(its :class:`AuthKeeper`) adds them to its users, has nats-server check and reload the
configuration, and answers (:class:`JoinReply`).  The joining machine then starts its
services with their keys.  No secret crosses the wire but the signature of a nonce.

A request that cannot be granted is answered with the ADR-32 error headers: 400 for a
malformed one, 409 for a node name another machine (other keys) or the fabric's own
node holds.  Joining again with the same keys (a restarted node) is granted again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from .auth import AuthConflict, AuthError, AuthRealm, parse_token
from .errors import BadRequest, Conflict, FabricError, Unauthenticated, Unavailable, error_from_wire, error_headers
from .protocol.headers import ERROR_CODE_HEADER, ERROR_HEADER, ERROR_KIND_HEADER
from .protocol.permissions import JOINER_USER, SERVICE_ROLES, inbox_prefix
from .protocol.subjects import JOIN_REQUEST
from .schema import JSON

__all__ = ["JoinRequest", "JoinReply", "AuthKeeper", "request_join"]


class JoinRequest(msgspec.Struct, forbid_unknown_fields=False):
    """What a joining node asks for: its name, and the public keys it will use."""

    node: str
    #: service role -> the public nkey its service authenticates with
    services: dict[str, str]
    #: the public nkey of the joining machine's operator (its supervisor's probe, its CLI)
    admin: str


class JoinReply(msgspec.Struct):
    node: str
    #: False when the node had joined before with these very keys (a restart)
    new: bool
    #: the fabric's CA certificate (PEM) when it runs TLS: the joining node checks it against the fingerprint
    #: its token pins, then trusts only it
    ca: str = ""


class AuthKeeper:
    """The supervisor's keeper of its node's users (auth on, embedded NATS): it answers ``fabric.join.request``
    and drops the users whose TTL ended (``fabric user add --ttl``), reloading nats-server after each change."""

    def __init__(self, realm: AuthRealm, binary: str, config: Any, nats_pid: Any, log: Any,
                 ca_pem: str | None = None) -> None:
        self.realm = realm
        self.ca_pem = ca_pem or ""
        self.binary = binary
        self.config = config
        #: a callable: the server's pid now (the supervisor restarts it)
        self.nats_pid = nats_pid
        self.log = log
        self._lock = asyncio.Lock()
        self._sub: Any = None
        self._nc: Any = None

    async def start(self, nc: Any) -> None:
        """Answer joins on *nc* (an admin's connection), from now on."""
        self._nc = nc
        self._sub = await nc.subscribe(JOIN_REQUEST, cb=self._on_request)
        await nc.flush()

    async def serve(self, url: str, name: str, options: dict[str, Any]) -> None:
        """Connect to *url* (*options*: the admin's credentials) and :meth:`start`; logged, not raised, on failure:
        the fabric works without it, joins are refused until a restart."""
        import nats

        async def on_error(exc: Exception) -> None:  # nats-py would print a traceback otherwise
            self.log("debug", "nats error", error=f"{type(exc).__name__}: {exc}")

        try:
            nc = await nats.connect(url, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                                    reconnect_time_wait=0.25, error_cb=on_error, **options)
            await self.start(nc)
        except Exception as exc:
            self.log("error", "cannot answer join requests", error=str(exc) or type(exc).__name__)

    async def close(self) -> None:
        if self._nc is not None:
            try:
                await self._nc.close()
            except Exception:  # closing: nothing left to do with it
                pass

    async def expire_users(self) -> None:
        """Drop the users whose TTL ended and reload the server; logged, not raised (the next call tries again)."""
        pid = self.nats_pid()
        if pid is None:
            return
        try:
            async with self._lock:
                gone = await asyncio.to_thread(self.realm.expire)
                if gone:
                    await asyncio.to_thread(self.realm.reload, self.binary, self.config, pid)
            if gone:
                self.log("info", "users expired", users=gone)
        except Exception as exc:
            self.log("error", "user expiry failed", error=str(exc) or type(exc).__name__)

    async def _on_request(self, msg: Any) -> None:
        try:
            req = JSON.decode(msg.data, JoinRequest)
            async with self._lock:  # one users.json change and reload at a time
                new = await asyncio.to_thread(self._grant, req)
            body, headers = JSON.encode(JoinReply(node=req.node, new=new, ca=self.ca_pem)), None
            self.log("info", "node joined" if new else "node joined again", node=req.node)
        except FabricError as exc:
            body, headers = b"", error_headers(exc)
            self.log("warning", "join refused", error=exc.message)
        except Exception as exc:  # a bug: refuse, keep serving
            body, headers = b"", error_headers(FabricError(f"join failed: {type(exc).__name__}: {exc}"))
            self.log("error", "join failed", error=str(exc))
        if msg.reply:
            await self._nc.publish(msg.reply, body, headers=headers)

    def _grant(self, req: JoinRequest) -> bool:
        try:
            new = self.realm.add_node(req.node, req.services, req.admin)
        except AuthConflict as exc:
            raise Conflict(str(exc)) from None
        except AuthError as exc:
            raise BadRequest(str(exc)) from None
        if new:
            pid = self.nats_pid()
            if pid is None:
                raise Unavailable("the fabric's nats-server is restarting: join again in a moment")
            self.realm.reload(self.binary, self.config, pid)
        return new


async def request_join(url: str, token: str, realm: AuthRealm, *, timeout: float = 10.0) -> JoinReply:
    """Ask the fabric at *url* to let this node (*realm*'s, whose keys must exist) in, with *token*.

    Raises Unauthenticated for a token the fabric does not know, Unavailable when it does
    not answer, the refusal's error (BadRequest, Conflict) otherwise.
    """
    import ssl

    import nats

    from .credentials import REFUSED_CREDENTIALS, UNTRUSTED_CERTIFICATE, read_credentials, refusal

    try:
        seed, fingerprint = parse_token(token)
    except AuthError as exc:
        raise BadRequest(str(exc)) from None
    tls: dict[str, Any] = {}
    if fingerprint:
        # the CA is not known yet: encrypted but unverified for this one exchange, which carries only public
        # keys and the nonce's signature; the CA it answers with must then match the token's fingerprint
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls = {"tls": ctx}
    keys = {role: read_credentials(realm.service_credentials(role)).nkey for role in SERVICE_ROLES}
    admin = read_credentials(realm.admin_credentials).nkey
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    try:
        nc = await nats.connect(url, nkeys_seed_str=seed, inbox_prefix=inbox_prefix(JOINER_USER),
                                connect_timeout=min(timeout, 5.0), allow_reconnect=False, max_reconnect_attempts=0,
                                error_cb=on_error, name=f"fabric-join@{realm.node}", **tls)
    except Exception as exc:
        why = refusal(" ".join([str(exc), *errors]))
        if why == UNTRUSTED_CERTIFICATE:
            raise Unauthenticated(f"the fabric at {url} runs TLS and this token pins no CA: get its current token "
                                  "with `fabric join-token` there") from None
        if why == REFUSED_CREDENTIALS:
            raise Unauthenticated(f"the fabric at {url} does not know this join token: get the current one with "
                                  "`fabric join-token` there (a rotated token replaces the old)") from None
        raise Unavailable(f"cannot reach the fabric at {url}: {exc or type(exc).__name__}") from None
    try:
        msg = await nc.request(JOIN_REQUEST, JSON.encode(JoinRequest(realm.node, keys, admin)), timeout=timeout)
    except Exception as exc:
        raise Unavailable(f"the fabric at {url} did not answer the join request ({type(exc).__name__}): is it "
                          "started with auth on, and is its supervisor running?") from None
    finally:
        await nc.close()
    hdrs = msg.headers or {}
    if ERROR_CODE_HEADER in hdrs:
        raise error_from_wire(hdrs[ERROR_CODE_HEADER], hdrs.get(ERROR_HEADER, ""), hdrs.get(ERROR_KIND_HEADER))
    reply = JSON.decode(msg.data, JoinReply)
    if fingerprint:
        from .pki import ca_fingerprint

        if not reply.ca or ca_fingerprint(reply.ca) != fingerprint:
            raise Unauthenticated(f"the fabric at {url} answered with a CA the join token does not pin: not the "
                                  "fabric that issued it (or a machine in between)")
    realm.ensure(ca_pem=reply.ca or None)  # the node's services and CLI trust that CA from now on
    return reply
