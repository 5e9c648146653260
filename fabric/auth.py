"""The users of one fabric node: keys, credentials files, ``users.conf``, live reload.

``fabric up`` keeps, in ``<state>/auth`` (mode 0700, files 0600):

* ``admin.creds`` -- the operator's credentials (the CLI and a local client use them);
* ``services/<role>.creds`` -- one nkey user per service of this node;
* ``users.json`` -- the people: name, role, public key (never a seed: a user's seed
  exists only in the credentials file handed to them).

:meth:`AuthRealm.render` writes ``<state>/nats/users.conf`` from them and the role
table (:mod:`fabric.protocol.permissions`); nats.conf ``include``s it.  A change
(``fabric user add/rm``) rewrites it, has nats-server check the whole config
(``nats-server -t``) and sends the running server SIGHUP: a removed user's live
connections are closed at once, the others stay (:meth:`AuthRealm.reload`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .credentials import Credentials, CredentialsError, new_seed, public_key, read_credentials, write_credentials
from .protocol.permissions import (
    ADMIN,
    SERVICE_ROLES,
    USER_ROLES,
    UserEntry,
    permissions,
    render_users,
    service_user,
    valid_user_name,
)
from .state import StateDir

__all__ = ["AuthRealm", "UserRecord", "AuthError", "ADMIN_USER"]

#: the operator's user name (``fabric up`` creates it)
ADMIN_USER = "admin"


class AuthError(ValueError):
    """A users-table change that cannot be made (the message says why)."""


@dataclass(frozen=True)
class UserRecord:
    """A person's entry in ``users.json``."""

    name: str
    role: str
    nkey: str
    created: str


def _write_private(path: Path, text: str) -> None:
    """Replace *path* atomically with *text*, mode 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AuthRealm:
    """The auth files of one state directory (see the module docstring)."""

    def __init__(self, state: StateDir, node: str) -> None:
        self.state = state
        self.node = node
        self.dir = state.auth_dir
        self.users_file = self.dir / "users.json"
        self.users_conf = state.nats_dir / "users.conf"

    # -- credentials ------------------------------------------------------------------------

    def service_credentials(self, role: str) -> Path:
        return self.dir / "services" / f"{role}.creds"

    @property
    def admin_credentials(self) -> Path:
        return self.state.admin_credentials

    def ensure(self, url: str | None = None) -> None:
        """Create what is missing: the admin (a user too) and one user per service role of this node.

        Existing keys are kept, so a restarted fabric's credentials still work.
        """
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "services").mkdir(mode=0o700, exist_ok=True)
        if not self._readable(self.admin_credentials):
            seed = new_seed()
            write_credentials(self.admin_credentials, user=ADMIN_USER, role=ADMIN, seed=seed, url=url,
                              by="fabric up")
            self._put(UserRecord(ADMIN_USER, ADMIN, public_key(seed), _now()))
        for role in SERVICE_ROLES:
            path = self.service_credentials(role)
            if not self._readable(path):
                write_credentials(path, user=service_user(role, self.node), role=role, seed=new_seed(), by="fabric up")

    @staticmethod
    def _readable(path: Path) -> bool:
        try:
            read_credentials(path)
        except CredentialsError:
            return False
        return True

    # -- the users table --------------------------------------------------------------------

    def users(self) -> list[UserRecord]:
        """The people, by name."""
        try:
            raw = json.loads(self.users_file.read_text())
        except FileNotFoundError:
            return []
        return sorted((UserRecord(name=n, **fields) for n, fields in raw.get("users", {}).items()),
                      key=lambda u: u.name)

    def _save(self, users: list[UserRecord]) -> None:
        body = {"users": {u.name: {"role": u.role, "nkey": u.nkey, "created": u.created} for u in users}}
        _write_private(self.users_file, json.dumps(body, indent=2) + "\n")

    def _put(self, record: UserRecord) -> None:
        users = [u for u in self.users() if u.name != record.name]
        self._save([*users, record])

    def add_user(self, name: str, role: str, out: Path, *, url: str | None = None) -> Credentials:
        """Create user *name*, write its credentials to *out*; AuthError if the name is taken or invalid."""
        if not valid_user_name(name):
            raise AuthError(f"invalid user name {name!r}: letters, digits, '_' and '-' (at most 64), "
                            "not starting with '_'")
        if role not in USER_ROLES:
            raise AuthError(f"unknown role {role!r}: {' or '.join(USER_ROLES)}")
        if any(u.name == name for u in self.users()):
            raise AuthError(f"user {name!r} exists: `fabric user rm {name}` first to issue new credentials")
        seed = new_seed()
        write_credentials(out, user=name, role=role, seed=seed, url=url, by="fabric user add")
        self._put(UserRecord(name, role, public_key(seed), _now()))
        return read_credentials(out)

    def remove_user(self, name: str) -> UserRecord:
        """Remove user *name* from the table (its credentials stop working at the next reload)."""
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
        """Everyone the server lets in: this node's services, then the people."""
        for role in SERVICE_ROLES:
            creds = read_credentials(self.service_credentials(role))
            yield UserEntry(creds.user, role, creds.nkey, permissions(role, node=self.node))
        for u in self.users():
            yield UserEntry(u.name, u.role, u.nkey, permissions(u.role, user=u.name))

    def render(self) -> Path:
        """Write ``<state>/nats/users.conf`` (0600) and return its path."""
        _write_private(self.users_conf, render_users(self.entries()))
        return self.users_conf

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
