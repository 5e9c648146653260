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
import re
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
    #: ``host:port`` of the joining node's route listener: it runs its own nats-server, a route peer
    #: (``fabric up --join``); "" when its services use the fabric's NATS (``fabric up --nats-url``)
    route: str = ""
    #: with TLS and a route: a certificate signing request (PEM) for the joining node's server
    csr: str = ""


class ClusterGrant(msgspec.Struct):
    """What a node joining with its own nats-server needs to route into the cluster."""

    #: the cluster's name and its route password (fabric.cluster)
    name: str
    password: str
    #: the shared users table (fabric.auth.AuthRealm.shared): every node, user and join key
    table: dict[str, Any]
    #: the joining node's server certificate (PEM), signed by the fabric's CA, when it asked with a CSR
    cert: str = ""


class JoinReply(msgspec.Struct):
    node: str
    #: False when the node had joined before with these very keys (a restart)
    new: bool
    #: the fabric's CA certificate (PEM) when it runs TLS: the joining node checks it against the fingerprint
    #: its token pins, then trusts only it
    ca: str = ""
    #: for a node that runs its own nats-server: the cluster it joins
    cluster: ClusterGrant | None = None


class AuthKeeper:
    """The supervisor's keeper of its node's users (auth on, embedded NATS): it answers ``fabric.join.request``
    and drops the users whose TTL ended (``fabric user add --ttl``), reloading nats-server after each change."""

    def __init__(self, realm: AuthRealm, binary: str, config: Any, nats_pid: Any, log: Any,
                 ca_pem: str | None = None, supervisor: Any = None) -> None:
        self.realm = realm
        self.ca_pem = ca_pem or ""
        self.binary = binary
        self.config = config
        #: a callable: the server's pid now (the supervisor restarts it)
        self.nats_pid = nats_pid
        self.log = log
        #: the fabric.supervisor.Supervisor it serves (clustering); None in tests of the users alone
        self.supervisor = supervisor
        self._lock = asyncio.Lock()
        self._sub: Any = None
        self._nc: Any = None
        self._sync: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, nc: Any) -> None:
        """Answer joins on *nc* (an admin's connection), from now on; in a cluster, follow the shared users."""
        self._nc = nc
        sup = self.supervisor
        if sup is None or sup.can_sign():
            # one answer per join, whichever node's supervisor gives it; with TLS only a node holding the CA's
            # key (the first node) can sign a joining server's certificate, so only it answers
            self._sub = await nc.subscribe(JOIN_REQUEST, queue="fabric-join", cb=self._on_request)
            await nc.flush()
        if self.supervisor is not None and self.supervisor.cluster is not None:
            self.follow_users()

    def follow_users(self) -> None:
        """Keep this node's users the cluster's (fabric.users_sync)."""
        from .users_sync import UsersSync

        if self._sync is None and self._nc is not None:
            self._sync = UsersSync(self.realm, self._reload_locked, self.log)
            self._sync.start(self._nc)

    async def _reload_locked(self) -> None:
        pid = self.nats_pid()
        if pid is None:
            return
        async with self._lock:
            await asyncio.to_thread(self.realm.reload, self.binary, self.config, pid)

    async def push(self, keys: list[str]) -> None:
        """Write the table entries *keys* into the cluster's bucket (a change made here); logged on failure."""
        if self.supervisor is None or self.supervisor.cluster is None or self._nc is None:
            return
        from .users_sync import push

        try:
            await push(self._nc.jetstream(timeout=5), self.realm, keys, self.log)
        except Exception as exc:
            self.log("error", "users: the change did not reach the cluster's table", keys=keys,
                     error=str(exc) or type(exc).__name__)

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
        if self._sync is not None:
            await self._sync.stop()
        for task in list(self._tasks):
            task.cancel()
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
                await self.push([f"user.{name}" for name in gone])
        except Exception as exc:
            self.log("error", "user expiry failed", error=str(exc) or type(exc).__name__)

    async def tend_replicas(self) -> None:
        """In a cluster of three nodes or more: raise the streams still at 1 replica to 3 (fabric.cluster)."""
        if self.supervisor is None or self.supervisor.cluster is None or self._nc is None:
            return
        if sum(1 for r in self.realm.nodes() if r.route) < 3:
            return
        from .cluster import raise_replicas

        try:
            raised = await raise_replicas(self._nc.jetstream(timeout=5), self.log)
        except Exception as exc:  # no quorum now: the next tick tries again
            self.log("debug", "replicas: not now", error=str(exc) or type(exc).__name__)
            return
        if raised:
            self.log("info", "streams now replicated on 3 servers", streams=raised)

    async def _on_request(self, msg: Any) -> None:
        forming = None
        try:
            req = JSON.decode(msg.data, JoinRequest)
            async with self._lock:  # one users.json change and reload at a time
                new, grant, forming = await asyncio.to_thread(self._grant, req)
            body, headers = JSON.encode(JoinReply(node=req.node, new=new, ca=self.ca_pem, cluster=grant)), None
            self.log("info", "node joined" if new else "node joined again", node=req.node,
                     route=req.route or None)
        except FabricError as exc:
            body, headers = b"", error_headers(exc)
            self.log("warning", "join refused", error=exc.message)
        except Exception as exc:  # a bug: refuse, keep serving
            body, headers = b"", error_headers(FabricError(f"join failed: {type(exc).__name__}: {exc}"))
            self.log("error", "join failed", error=str(exc))
        if msg.reply:
            await self._nc.publish(msg.reply, body, headers=headers)
            await self._nc.flush()
        if headers is None:
            keys = [f"node.{req.node}"] + ([f"node.{self.realm.node}"] if forming is not None else [])
            if forming is not None:
                # the first machine with its own nats-server: this node's server restarts clustered; the
                # bucket is then made from this node's table, which has the new node already
                task = asyncio.create_task(self._form(forming))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await self.push(keys)

    async def _form(self, spec: Any) -> None:
        assert self.supervisor is not None
        await self.supervisor.become_clustered(spec)
        self.follow_users()

    def _grant(self, req: JoinRequest) -> tuple[bool, ClusterGrant | None, Any]:
        """Let the node in: (whether it is new, what it needs to route in, the cluster this node forms now)."""
        sup = self.supervisor
        forming = None
        if req.route and sup is None:
            raise BadRequest("this fabric's nodes cannot route to each other (its NATS is not fabric's own)")
        if req.route and not _valid_route(req.route):
            raise BadRequest(f"invalid route address {req.route[:100]!r}: expected HOST:PORT")
        try:
            new = self.realm.add_node(req.node, req.services, req.admin, route=req.route)
        except AuthConflict as exc:
            raise Conflict(str(exc)) from None
        except AuthError as exc:
            raise BadRequest(str(exc)) from None
        grant = None
        if req.route:
            from . import cluster

            spec = sup.cluster
            if spec is None:  # the first machine with its own server: this node starts the cluster
                spec = forming = cluster.new_spec(sup.route_port(), sup.config.node, tls=sup.config.tls)
                self.realm.add_self(sup.route_address(spec.port))
            try:
                cert = sup.sign_csr(req.node, req.csr) if req.csr else ""
            except ValueError as exc:
                raise BadRequest(f"csr: {exc}") from None
            grant = ClusterGrant(name=spec.name, password=spec.password, table=self.realm.shared(), cert=cert)
        pid = self.nats_pid()
        if forming is None and (new or req.route):
            if pid is None:
                raise Unavailable("the fabric's nats-server is restarting: join again in a moment")
            if req.route and sup is not None and sup.cluster is not None:
                sup.write_nats_config()  # the new node among this server's routes (reloadable)
            self.realm.reload(self.binary, self.config, pid)
        return new, grant, forming


_ROUTE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})")


def _valid_route(route: str) -> bool:
    m = _ROUTE.fullmatch(route)
    return m is not None and 0 < int(m.group(1)) < 65536


async def request_join(url: str, token: str, realm: AuthRealm, *, timeout: float = 10.0, route: str = "",
                       csr: str = "") -> JoinReply:
    """Ask the fabric at *url* to let this node (*realm*'s, whose keys must exist) in, with *token*.

    *route*: this node's route address (it runs its own nats-server: ``fabric up --join``);
    *csr*: with TLS, the request its server's certificate is signed from.

    Raises Unauthenticated for a token the fabric does not know, Unavailable when it does
    not answer, the refusal's error (BadRequest, Conflict) otherwise.
    """
    import ssl

    import nats

    from .credentials import REFUSED_CREDENTIALS, UNTRUSTED_CERTIFICATE, quiet_ssl_eof_notice, read_credentials, refusal

    quiet_ssl_eof_notice()
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
        body = JSON.encode(JoinRequest(realm.node, keys, admin, route=route, csr=csr))
        msg = await nc.request(JOIN_REQUEST, body, timeout=timeout)
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
    if route and reply.cluster is None:
        raise Unavailable(f"the fabric at {url} let this node in but sent no cluster settings: it runs an older "
                          "fabric; join with --nats-url instead")
    return reply
