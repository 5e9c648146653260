"""The users of one fabric node: keys, credentials files, ``users.conf``, live reload.

``fabric up`` keeps, in ``<state>/auth`` (mode 0700, files 0600):

* ``admin.creds`` -- the operator's credentials (the CLI and a local client use them);
* ``services/<role>.creds`` -- one nkey user per service of this node;
* ``users.json`` -- the people: name, role, public key (never a seed: a user's seed
  exists only in the credentials file handed to them); and the nodes that joined with
  a join token: each one's service keys and its operator's (public keys too);
* ``join.creds`` -- the identity inside the join token (``fabric join-token``), which
  may only ask to join.

:meth:`AuthRealm.render` writes ``<state>/nats/users.conf`` from them and the role
table (:mod:`fabric.protocol.permissions`); nats.conf ``include``s it.  A change
(``fabric user add/rm``) rewrites it, has nats-server check the whole config
(``nats-server -t``) and sends the running server SIGHUP: a removed user's live
connections are closed at once, the others stay (:meth:`AuthRealm.reload`).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .credentials import Credentials, CredentialsError, new_seed, public_key, read_credentials, write_credentials
from .protocol.permissions import (
    ADMIN,
    JOINER,
    JOINER_USER,
    SERVICE_ROLES,
    SYSTEM,
    SYSTEM_USER,
    USER_ROLES,
    UserEntry,
    permissions,
    render_users,
    service_user,
    valid_user_name,
)
from .state import StateDir, write_private

__all__ = ["AuthRealm", "UserRecord", "NodeRecord", "AuthError", "AuthConflict", "ADMIN_USER", "TOKEN_PREFIX",
           "make_token", "parse_token", "token_seed"]

#: the operator's user name (``fabric up`` creates it)
ADMIN_USER = "admin"


class AuthError(ValueError):
    """A users-table change that cannot be made (the message says why)."""


class AuthConflict(AuthError):
    """... because the name is held: another machine's node, this node's own name, an existing user."""


@dataclass(frozen=True)
class UserRecord:
    """A person's entry in ``users.json``."""

    name: str
    role: str
    nkey: str
    created: str
    #: when the user stops being let in (ISO 8601 UTC), "" for never
    expires: str = ""

    def expired(self, now: datetime | None = None) -> bool:
        if not self.expires:
            return False
        return datetime.strptime(self.expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) <= (
            now or datetime.now(timezone.utc))


@dataclass(frozen=True)
class NodeRecord:
    """A node that joined with a join token: its services' public keys and its operator's."""

    node: str
    services: dict[str, str]
    admin: str
    joined: str
    #: ``host:port`` of its nats-server's route listener ("" for a node whose services joined another's NATS)
    route: str = ""


#: how a join token starts (the version of its format): ``fabric1.<nkey seed>[.<CA sha256>]``
TOKEN_PREFIX = "fabric1."


def make_token(seed: str, ca_pem: str | None = None) -> str:
    if ca_pem:
        from .pki import ca_fingerprint

        return f"{TOKEN_PREFIX}{seed}.{ca_fingerprint(ca_pem)}"
    return TOKEN_PREFIX + seed


def parse_token(token: str) -> tuple[str, str]:
    """(joiner seed, CA fingerprint or "") of *token*; AuthError if it is not a join token."""
    body = token.strip()[len(TOKEN_PREFIX):] if token.strip().startswith(TOKEN_PREFIX) else ""
    seed, _, fingerprint = body.partition(".")
    try:
        public_key(seed)
        if fingerprint and (len(fingerprint) != 64 or int(fingerprint, 16) < 0):
            raise ValueError(fingerprint)
    except (CredentialsError, ValueError):
        raise AuthError("not a fabric join token (it starts with fabric1.): copy it again from "
                        "`fabric join-token` on a machine of the fabric") from None
    return seed, fingerprint


def token_seed(token: str) -> str:
    """The joiner seed inside *token*; AuthError if it is not a join token."""
    return parse_token(token)[0]


class AuthRealm:
    """The auth files of one state directory (see the module docstring).

    Every change of ``users.json`` reads, changes and writes it under an exclusive lock
    (``auth/users.lock``): ``fabric user add`` in one shell, ``rm`` in another and a node
    joining through the supervisor never lose each other's change.
    """

    def __init__(self, state: StateDir, node: str) -> None:
        self.state = state
        self.node = node
        self.dir = state.auth_dir
        self.users_file = self.dir / "users.json"
        self.users_conf = state.nats_dir / "users.conf"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- credentials ------------------------------------------------------------------------

    def service_credentials(self, role: str) -> Path:
        return self.dir / "services" / f"{role}.creds"

    @property
    def admin_credentials(self) -> Path:
        return self.state.admin_credentials

    @property
    def system_credentials(self) -> Path:
        """The supervisor's and ``fabric status``'s way into the system account (the servers' own reports)."""
        return self.dir / "system.creds"

    def ensure(self, url: str | None = None, ca_pem: str | None = None) -> None:
        """Create what is missing: the admin (a user too) and one user per service role of this node.

        Existing keys are kept, so a restarted fabric's credentials still work; *ca_pem* (TLS)
        goes into every one of these files, or out of them without TLS.
        """
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "services").mkdir(mode=0o700, exist_ok=True)
        if not self._readable(self.admin_credentials):
            write_credentials(self.admin_credentials, user=ADMIN_USER, role=ADMIN, seed=new_seed(), url=url,
                              ca_pem=ca_pem, by="fabric up")
        admin = read_credentials(self.admin_credentials).nkey
        with self._locked():  # the admin is always in the table (a users.json lost or edited must not lock it out)
            if not any(u.name == ADMIN_USER and u.nkey == admin for u in self.users()):
                self._put(UserRecord(ADMIN_USER, ADMIN, admin, _now()))
        if not self._readable(self.system_credentials):
            write_credentials(self.system_credentials, user=SYSTEM_USER, role=SYSTEM, seed=new_seed(),
                              ca_pem=ca_pem, by="fabric up")
        self.join_token()  # made at the first start: `fabric up` prints the join command with it
        for role in SERVICE_ROLES:
            path = self.service_credentials(role)
            if not self._readable(path):
                write_credentials(path, user=service_user(role, self.node), role=role, seed=new_seed(),
                                  ca_pem=ca_pem, by="fabric up")
        for path in (self.admin_credentials, self.system_credentials, *map(self.service_credentials, SERVICE_ROLES)):
            creds = read_credentials(path)
            if (creds.ca_pem or None) != (ca_pem or None):  # TLS turned on or off, or a new CA: same keys
                write_credentials(path, user=creds.user, role=creds.role, seed=creds.seed, url=creds.url,
                                  ca_pem=ca_pem, by="fabric up")

    @staticmethod
    def _readable(path: Path) -> bool:
        try:
            read_credentials(path)
        except CredentialsError:
            return False
        return True

    # -- the users table --------------------------------------------------------------------

    def _raw(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.users_file.read_text())
        except FileNotFoundError:
            return {}
        return raw if isinstance(raw, dict) else {}

    def users(self) -> list[UserRecord]:
        """The people, by name."""
        return sorted((UserRecord(name=n, **fields) for n, fields in self._raw().get("users", {}).items()),
                      key=lambda u: u.name)

    def nodes(self) -> list[NodeRecord]:
        """The nodes that joined with a join token, by name."""
        return sorted((NodeRecord(node=n, **fields) for n, fields in self._raw().get("nodes", {}).items()),
                      key=lambda r: r.node)

    def _save(self, users: list[UserRecord], nodes: list[NodeRecord] | None = None) -> None:
        body = {"users": {u.name: {"role": u.role, "nkey": u.nkey, "created": u.created,
                                   **({"expires": u.expires} if u.expires else {})} for u in users},
                "nodes": {r.node: {"services": r.services, "admin": r.admin, "joined": r.joined,
                                   **({"route": r.route} if r.route else {})}
                          for r in (self.nodes() if nodes is None else nodes)}}
        join = self._raw().get("join")
        if join:
            body["join"] = join
        write_private(self.users_file, json.dumps(body, indent=2) + "\n")

    def add_node(self, node: str, services: dict[str, str], admin: str, route: str = "") -> bool:
        """Let node *node* in with these public keys; False if it had joined with the very same ones.

        AuthError for an invalid request, or a name another machine (other keys) or this node holds.
        """
        from .protocol.subjects import valid_node_name

        if not valid_node_name(node):
            raise AuthError(f"invalid node name {node!r}: use 1 to 64 letters, digits, '_' and '-'")
        if set(services) != set(SERVICE_ROLES):
            raise AuthError(f"a joining node names a key for each service role: {', '.join(SERVICE_ROLES)}")
        for key in (*services.values(), admin):
            if not (isinstance(key, str) and len(key) == 56 and key.startswith("U")):
                raise AuthError(f"not an nkey user public key: {key!r}")
        if node == self.node:
            raise AuthConflict(f"node name {node!r} is this node's: start the other machine with another --node")
        with self._locked():
            return self._add_node(node, services, admin, route)

    def add_self(self, route: str) -> None:
        """Put this node in the nodes table too, with its route address: a cluster's table names every node."""
        services = {role: read_credentials(self.service_credentials(role)).nkey for role in SERVICE_ROLES}
        admin = read_credentials(self.admin_credentials).nkey
        with self._locked():
            known = {r.node: r for r in self.nodes()}
            old = known.get(self.node)
            known[self.node] = NodeRecord(self.node, services, admin, old.joined if old else _now(), route)
            self._save(self.users(), list(known.values()))

    def _add_node(self, node: str, services: dict[str, str], admin: str, route: str = "") -> bool:
        known = {r.node: r for r in self.nodes()}
        old = known.get(node)
        if old is not None:
            if old.services == services and old.admin == admin:
                if old.route == route:
                    return False
                known[node] = NodeRecord(node, old.services, old.admin, old.joined, route)  # now with its own NATS
                self._save(self.users(), list(known.values()))
                return False
            raise AuthConflict(f"node {node!r} already joined from another machine (other keys): start this one "
                            "with another --node")
        known[node] = NodeRecord(node, dict(services), admin, _now(), route)
        self._save(self.users(), list(known.values()))
        return True

    def remove_node(self, node: str) -> NodeRecord:
        """Drop node *node* from the table: its services' and operator's keys stop working at the next reload."""
        if node == self.node:
            raise AuthError(f"{node!r} is this node: remove it from another node of the fabric")
        with self._locked():
            raw = self._raw()
            nodes = dict(raw.get("nodes") or {})
            if node not in nodes:
                names = ", ".join(sorted(nodes)) or "none"
                raise AuthError(f"no node {node!r} joined this fabric (its nodes: {names})")
            gone = NodeRecord(node=node, **nodes.pop(node))
            raw["nodes"] = nodes
            joins = dict(raw.get("join") or {})
            joins.pop(node, None)  # its join token too
            raw["join"] = joins
            write_private(self.users_file, json.dumps(raw, indent=2) + "\n")
            return gone

    # -- the join token ---------------------------------------------------------------------

    @property
    def join_credentials(self) -> Path:
        return self.dir / "join.creds"

    def join_token(self, *, rotate: bool = False, ca_pem: str | None = None) -> str:
        """The join token of this fabric (made on first use); *rotate*: a new one, the old one stops working.

        With TLS (*ca_pem*) the token pins the CA's fingerprint: the joining machine trusts the CA
        the fabric answers with only if it is that one.
        """
        if rotate or not self._readable(self.join_credentials):
            write_credentials(self.join_credentials, user=JOINER_USER, role=JOINER, seed=new_seed(),
                              by="fabric join-token")
        creds = read_credentials(self.join_credentials)
        with self._locked():  # in the shared table: every server of a cluster admits this node's token
            raw = self._raw()
            joins = dict(raw.get("join") or {})
            if joins.get(self.node) != creds.nkey:
                joins[self.node] = creds.nkey
                raw["join"] = joins
                write_private(self.users_file, json.dumps(raw, indent=2) + "\n")
        return make_token(creds.seed, ca_pem)

    def _put(self, record: UserRecord) -> None:
        users = [u for u in self.users() if u.name != record.name]
        self._save([*users, record])

    def add_user(self, name: str, role: str, out: Path, *, url: str | None = None,
                 ca_pem: str | None = None, ttl_s: float | None = None) -> Credentials:
        """Create user *name*, write its credentials to *out*; AuthError if the name is taken or invalid.

        *ttl_s*: the user is let in for that long (the supervisor drops it at the end: :meth:`expire`).
        """
        if not valid_user_name(name):
            raise AuthError(f"invalid user name {name!r}: letters, digits, '_' and '-' (at most 64), "
                            "not starting with '_'")
        if role not in USER_ROLES:
            raise AuthError(f"unknown role {role!r}: {' or '.join(USER_ROLES)}")
        with self._locked():
            return self._add_user(name, role, out, url=url, ca_pem=ca_pem, ttl_s=ttl_s)

    def _add_user(self, name: str, role: str, out: Path, *, url: str | None, ca_pem: str | None,
                  ttl_s: float | None) -> Credentials:
        if any(u.name == name for u in self.users()):
            raise AuthConflict(f"user {name!r} exists: `fabric user rm {name}` first to issue new credentials")
        expires = ""
        if ttl_s is not None:
            if ttl_s <= 0:
                raise AuthError("--ttl must be positive")
            expires = (datetime.now(timezone.utc) + timedelta(seconds=ttl_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
        seed = new_seed()
        write_credentials(out, user=name, role=role, seed=seed, url=url, ca_pem=ca_pem, by="fabric user add")
        self._put(UserRecord(name, role, public_key(seed), _now(), expires))
        return read_credentials(out)

    def expire(self) -> list[str]:
        """Drop the users whose time is up from the table; their names (the caller reloads the server)."""
        with self._locked():
            return self._expire()

    def _expire(self) -> list[str]:
        users = self.users()
        gone = [u.name for u in users if u.expired()]
        if gone:
            self._save([u for u in users if u.name not in gone])
        return gone

    def remove_user(self, name: str) -> UserRecord:
        """Remove user *name* from the table (its credentials stop working at the next reload)."""
        with self._locked():
            return self._remove_user(name)

    def _remove_user(self, name: str) -> UserRecord:
        users = self.users()
        gone = [u for u in users if u.name == name]
        if not gone:
            raise AuthError(f"no user {name!r} (`fabric user list` shows them)")
        if name == ADMIN_USER:
            raise AuthError("the admin user cannot be removed: it is how this node's operator reaches it")
        self._save([u for u in users if u.name != name])
        return gone[0]

    # -- users.conf -------------------------------------------------------------------------

    def entries(self) -> Iterator[UserEntry]:
        """Everyone the server lets in: this node's services, the joined nodes', the people, the join token.

        Each key once (nats-server refuses a config naming one twice), the first entry winning: this node's own
        files come first, so a table that names this node under another name cannot take its keys' roles.
        """
        seen: set[str] = set()
        for entry in self._entries():
            if entry.nkey not in seen:
                seen.add(entry.nkey)
                yield entry

    def _entries(self) -> Iterator[UserEntry]:
        for role in SERVICE_ROLES:
            creds = read_credentials(self.service_credentials(role))
            yield UserEntry(creds.user, role, creds.nkey, permissions(role, node=self.node))
        for r in self.nodes():
            if r.node == self.node:  # this node itself, in a cluster's shared table: its files are the truth
                continue
            for role, key in sorted(r.services.items()):
                yield UserEntry(service_user(role, r.node), role, key, permissions(role, node=r.node))
            # the joined machine's supervisor and CLI (its readiness probe, `fabric status` there)
            yield UserEntry(f"admin of node {r.node}", ADMIN, r.admin, None)
        for u in self.users():
            if not u.expired():  # an expired user is not let in, even before the table drops it
                yield UserEntry(u.name, u.role, u.nkey, permissions(u.role, user=u.name))
        joins = dict(self._raw().get("join") or {})
        if self._readable(self.join_credentials):
            joins[self.node] = read_credentials(self.join_credentials).nkey
        for node, key in sorted(joins.items()):
            if isinstance(key, str):
                yield UserEntry(f"the join token of {node}", JOINER, key, permissions(JOINER))

    def render(self) -> Path:
        """Write ``<state>/nats/users.conf`` (0600) and return its path."""
        system = [read_credentials(self.system_credentials).nkey] if self._readable(self.system_credentials) else []
        write_private(self.users_conf, render_users(self.entries(), system=system))
        return self.users_conf

    # -- the cluster's shared table (fabric.users_sync) ---------------------------------------

    def shared(self) -> dict[str, Any]:
        """What every node of a cluster shares: the people (but this node's admin), the nodes, the join keys."""
        raw = self._raw()
        users = {k: v for k, v in (raw.get("users") or {}).items() if k != ADMIN_USER}
        return {"users": users, "nodes": dict(raw.get("nodes") or {}), "join": dict(raw.get("join") or {})}

    def adopt(self, table: dict[str, Any]) -> bool:
        """Make the shared part of the table *table* (this node's admin stays); whether anything changed."""
        with self._locked():
            raw = self._raw()
            mine = (raw.get("users") or {}).get(ADMIN_USER)
            users = {k: v for k, v in (table.get("users") or {}).items() if k != ADMIN_USER}
            if mine is not None:
                users[ADMIN_USER] = mine
            new = {"users": users, "nodes": dict(table.get("nodes") or {}), "join": dict(table.get("join") or {})}
            old = {"users": raw.get("users") or {}, "nodes": raw.get("nodes") or {}, "join": raw.get("join") or {}}
            if new == old:
                return False
            write_private(self.users_file, json.dumps(new, indent=2) + "\n")
            return True

    def reload(self, binary: str, config: Path, pid: int) -> None:
        """Render, have nats-server check the config, then SIGHUP server *pid*; AuthError if the check fails.

        A config the check refuses is never signalled: the server keeps the users it has.
        """
        self.render()
        check = subprocess.run([binary, "-t", "-c", str(config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise AuthError(f"nats-server refused the new users: {(check.stderr or check.stdout).strip()}")
        os.kill(pid, signal.SIGHUP)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
