"""Credentials files: who a connection is, in a file any NATS client can use.

A fabric credentials file (``alice.creds``, mode 0600) holds one nkey user: its name,
its role, its public key, the URL to reach the fabric, and the seed (the private key)
framed the way NATS ``.creds`` files frame it -- so nats.c reads the file as it is
(``natsOptions_SetNKeyFromSeed(opts, "<nkey line>", "alice.creds")``) and any other
client takes the ``SU…`` line for its nkey authenticator.  A fabric with TLS appends
its CA certificate after the seed.  docs/security.md shows the file and how the Node.js
and C clients use it.

:func:`find_credentials` is where the client, the CLI and the services look:
an explicit path, else ``$FABRIC_CREDENTIALS``, else the admin credentials ``fabric up``
wrote in the default state directory (:mod:`fabric.state`).  The key material comes
from the ``nkeys`` package (the one nats-py signs with).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .protocol.permissions import ADMIN, CLIENT, JOINER, SERVICE_ROLES, SYSTEM, USER_ROLES, inbox_prefix
from .state import StateDir, write_private

__all__ = ["Credentials", "CredentialsError", "CREDENTIALS_ENV", "refusal", "REFUSED_CREDENTIALS",
           "UNTRUSTED_CERTIFICATE", "new_seed", "public_key", "write_credentials",
           "read_credentials", "find_credentials"]

#: the environment variable naming a credentials file (client, CLI)
CREDENTIALS_ENV = "FABRIC_CREDENTIALS"

_SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
_SEED_END = "------END USER NKEY SEED------"
_CA_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_FIELD = re.compile(r"^([a-z_]+):\s*(.*?)\s*$")


#: why NATS refused a connection (:func:`refusal`)
REFUSED_CREDENTIALS = "credentials"
UNTRUSTED_CERTIFICATE = "certificate"


def refusal(text: str) -> str | None:
    """Why NATS refused a connection, read from nats-py's error text: no or unknown credentials
    (:data:`REFUSED_CREDENTIALS`), a TLS certificate the client does not trust
    (:data:`UNTRUSTED_CERTIFICATE`), or None when it was not a refusal (nothing answers...)."""
    low = text.lower()
    if "certificate verify failed" in low:
        return UNTRUSTED_CERTIFICATE
    if "authorization violation" in low or "authentication" in low:
        return REFUSED_CREDENTIALS
    return None


class CredentialsError(ValueError):
    """A credentials file that is missing, unreadable or malformed (the message says which and why)."""


@dataclass(frozen=True)
class Credentials:
    """One nkey user, as a credentials file holds it."""

    user: str
    role: str
    seed: str
    url: str | None = None
    #: the fabric's CA certificate (PEM) when it runs TLS
    ca_pem: str | None = None
    path: Path | None = None

    @property
    def nkey(self) -> str:
        """The public key (``U…``), what the server's users.conf lists."""
        return public_key(self.seed)

    @property
    def inbox_prefix(self) -> str:
        """Where this user's replies arrive (the only inbox its permissions let it read)."""
        return inbox_prefix(self.user)

    def tls_context(self) -> ssl.SSLContext | None:
        """A context that trusts the fabric's CA only, or None without TLS."""
        if not self.ca_pem:
            return None
        quiet_ssl_eof_notice()
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem)

    def connect_options(self, inbox_prefix: str | None = None) -> dict[str, Any]:
        """The keyword arguments of ``nats.connect`` that authenticate as this user.

        *inbox_prefix*: another inbox than the user's own (a service's is its node's:
        :func:`fabric.protocol.permissions.service_user`).
        """
        options: dict[str, Any] = {"nkeys_seed_str": self.seed, "inbox_prefix": inbox_prefix or self.inbox_prefix}
        ctx = self.tls_context()
        if ctx is not None:
            options["tls"] = ctx
        return options


class _SslEofNotice(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using ssl": nats-py's protocol
    returns True there, so every TLS connection that closes logs it (nats-io/nats.py#574); nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


_ssl_eof_filter = _SslEofNotice()


def quiet_ssl_eof_notice() -> None:
    """Install :class:`_SslEofNotice` on the ``asyncio`` logger (once; only that one message is dropped)."""
    log = logging.getLogger("asyncio")
    if _ssl_eof_filter not in log.filters:
        log.addFilter(_ssl_eof_filter)


def new_seed() -> str:
    """A fresh user seed (``SU…``, 58 characters) from the OS's random source."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


def public_key(seed: str) -> str:
    """The public key (``U…``) of user seed *seed*; CredentialsError if it is not one."""
    import nkeys

    try:
        kp = nkeys.from_seed(bytearray(seed.encode()))
        key = bytes(kp.public_key).decode()
        kp.wipe()
    except Exception as exc:
        raise CredentialsError(f"not an nkey user seed: {type(exc).__name__}") from None
    if not key.startswith("U"):
        raise CredentialsError("not an nkey *user* seed (it should start with SU)")
    return key


def write_credentials(path: Path, *, user: str, role: str, seed: str, url: str | None = None,
                      ca_pem: str | None = None, by: str = "fabric") -> Path:
    """Write a credentials file (mode 0600, replaced atomically) and return its path."""
    if role not in (*USER_ROLES, *SERVICE_ROLES, JOINER, SYSTEM):
        raise CredentialsError(f"unknown role {role!r}")
    nkey = public_key(seed)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        "# fabric credentials: keep this file secret (it is the key, not a pointer to one)",
        f"# written {stamp} by {by}",
        "# NATS clients: authenticate with the nkey seed below, use inbox prefix "
        f"{inbox_prefix(user)}{'' if role == ADMIN else ' and the subjects fabric.u.' + user + '.…'}",
        "# (docs/security.md; nats.c reads this file as it is with natsOptions_SetNKeyFromSeed)",
        f"user: {user}",
        f"role: {role}",
        f"nkey: {nkey}",
    ]
    if url:
        lines.append(f"url: {url}")
    lines += ["", _SEED_BEGIN, seed, _SEED_END, ""]
    if ca_pem:
        lines += ["# the fabric's CA certificate (TLS): trust only it", ca_pem.strip(), ""]
    write_private(path, "\n".join(lines))
    return path


def read_credentials(path: str | os.PathLike[str]) -> Credentials:
    """Read a credentials file; CredentialsError says what is wrong with it."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise CredentialsError(f"credentials file {p} does not exist") from None
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {p}: {exc.strerror or exc}") from None
    fields: dict[str, str] = {}
    seed = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == _SEED_BEGIN and i + 1 < len(lines):
            seed = lines[i + 1].strip()
        m = _FIELD.match(line)
        if m and not line.startswith("#"):
            fields.setdefault(m.group(1), m.group(2))
    if not seed:
        raise CredentialsError(f"{p} is not a fabric credentials file: no {_SEED_BEGIN} block")
    user = fields.get("user", "")
    role = fields.get("role", CLIENT)
    if not user:
        raise CredentialsError(f"{p} names no user (a 'user: NAME' line)")
    try:
        key = public_key(seed)
    except CredentialsError as exc:
        raise CredentialsError(f"{p}: {exc}") from None
    if fields.get("nkey") and fields["nkey"] != key:
        raise CredentialsError(f"{p}: its nkey line does not match its seed (an edited file?)")
    ca = _CA_BLOCK.search(text)
    return Credentials(user=user, role=role, seed=seed, url=fields.get("url") or None,
                       ca_pem=ca.group(0) + "\n" if ca else None, path=p)


def find_credentials(explicit: str | os.PathLike[str] | None = None, state: StateDir | None = None
                     ) -> Credentials | None:
    """The credentials to connect with: *explicit*, else ``$FABRIC_CREDENTIALS``, else a local fabric's admin's.

    None where there are none (a fabric without auth).  The last place is
    ``<state>/auth/admin.creds`` (*state*: the default state dir), which ``fabric up``
    writes; the first two raise CredentialsError when unusable.
    """
    if explicit:
        return read_credentials(explicit)
    env = os.environ.get(CREDENTIALS_ENV)
    if env:
        return read_credentials(env)
    from .state import default_state_dir  # looked up at each call: where the default state dir is may change

    path = (state if state is not None else StateDir(default_state_dir())).admin_credentials
    if path.is_file():
        try:
            return read_credentials(path)
        except CredentialsError:
            return None  # not ours to read (another OS user's fabric): connect without, and be told why
    return None
