"""The HTTP gateway's bearer tokens: made by ``fabric token create``, kept hashed in JetStream, read by every gateway.

A token is ``fbt_`` and 43 URL-safe characters (32 random bytes).  It is shown once, when
it is made; the fabric keeps only its SHA-256, in the KV bucket ``fabric_gateway`` under
``token.<name>`` (:class:`TokenRecord`: the hash, the scopes, the fabric user it acts
for), so every gateway on every node -- they keep no state of their own -- reads the same
table (:class:`TokenTable` watches the bucket) and a token removed with ``fabric token rm``
stops working everywhere within moments.

Scopes (services/gateway/access.py applies them): ``read`` (GET: nodes, devices, services,
metrics, events, the token user's tasks), ``submit`` (submit and cancel tasks, remote
memory), ``admin`` (act as the fabric's admin: every user's tasks, the plain subjects).
A token without ``admin`` acts for its ``user``: the gateway sends its requests in that
user's form (``fabric.u.<user>.…``), so the services apply that user's ownership, quotas
and refusals exactly as for the user's own NATS client.

Each machine's ``fabric up`` makes an operator token for its dashboard at the first start
(:func:`ensure_operator_token`), kept in ``<state>/auth/operator.token`` (mode 0600) and
printed as the dashboard's URL -- like Jupyter's ``?token=`` link.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import Any, Final

import msgspec

from .protocol.permissions import valid_user_name
from .protocol.streams import GATEWAY_BUCKET

__all__ = ["TOKEN_PREFIX", "SCOPES", "TokenRecord", "TokenError", "new_token", "token_hash", "check_name",
           "check_scopes", "bucket_config", "open_bucket", "create_token", "remove_token", "list_tokens",
           "TokenTable", "ensure_operator_token", "OPERATOR_TOKEN_FILE", "WEBHOOK_SECRET_KEY", "webhook_secret"]

TOKEN_PREFIX: Final = "fbt_"
SCOPES: Final = ("read", "submit", "admin")
#: the bucket's key holding the secret webhooks are signed with (hex text, used as the HMAC key's bytes)
WEBHOOK_SECRET_KEY: Final = "webhook.secret"
#: where ``fabric up`` keeps this machine's operator token (in the state directory's ``auth/``)
OPERATOR_TOKEN_FILE: Final = "operator.token"
_KEY_PREFIX: Final = "token."


class TokenError(ValueError):
    """A token that cannot be made or removed as asked (bad name or scope, a name taken, an unknown name)."""


class TokenRecord(msgspec.Struct, kw_only=True, frozen=True):
    """One token as the bucket keeps it: never the token itself."""

    name: str
    sha256: str
    scopes: list[str]
    #: the fabric user the token acts for ("" with the admin scope: the fabric's admin)
    user: str = ""
    created: str = ""
    by: str = ""

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


_record_decoder = msgspec.json.Decoder(TokenRecord)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    if not valid_user_name(name):
        raise TokenError(f"invalid token name {name!r}: 1 to 64 letters, digits, '_' and '-', not starting with '_'")
    return name


def check_scopes(scopes: list[str]) -> list[str]:
    out: list[str] = []
    for s in scopes:
        s = s.strip().lower()
        if s not in SCOPES:
            raise TokenError(f"unknown scope {s!r}: one of {', '.join(SCOPES)}")
        if s not in out:
            out.append(s)
    if not out:
        raise TokenError(f"a token needs at least one scope: {', '.join(SCOPES)}")
    return out


def bucket_config() -> Any:
    from nats.js.api import KeyValueConfig, StorageType

    return KeyValueConfig(bucket=GATEWAY_BUCKET, history=1, storage=StorageType.FILE,
                          description="fabric HTTP gateway: bearer tokens (sha256 only)")


async def open_bucket(js: Any) -> Any:
    """The token bucket, made when missing (by whichever of the CLI and a gateway comes first)."""
    import nats.js.errors

    try:
        return await js.key_value(GATEWAY_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    from .jetstream import KeyValueBucket

    await KeyValueBucket(bucket_config()).ensure(js)  # replicas: as fabric.jetstream decides for this node
    return await js.key_value(GATEWAY_BUCKET)


async def create_token(js: Any, name: str, scopes: list[str], user: str | None = None,
                       by: str = "") -> tuple[str, TokenRecord]:
    """Make token *name*; returns ``(token, record)``.  TokenError when the name is taken or invalid.

    *user* (default: the name) is the fabric user a token without the ``admin`` scope acts for.
    """
    import nats.js.errors

    check_name(name)
    scopes = check_scopes(scopes)
    if "admin" in scopes:
        user = ""
    else:
        user = name if user is None else user
        if not valid_user_name(user):
            raise TokenError(f"invalid user name {user!r}: letters, digits, '_' and '-', not starting with '_'")
    token = new_token()
    record = TokenRecord(name=name, sha256=token_hash(token), scopes=scopes, user=user,
                         created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), by=by)
    kv = await open_bucket(js)
    try:
        await kv.create(_KEY_PREFIX + name, msgspec.json.encode(record))
    except nats.js.errors.KeyWrongLastSequenceError:
        raise TokenError(f"a token named {name!r} exists: remove it first (`fabric token rm {name}`) "
                         "or choose another name") from None
    return token, record


async def remove_token(js: Any, name: str) -> TokenRecord:
    """Remove token *name* (every gateway refuses it moments later); TokenError when there is none."""
    check_name(name)
    kv = await open_bucket(js)
    record = await _get(kv, name)
    if record is None:
        raise TokenError(f"no token named {name!r} (`fabric token list` shows them)")
    await kv.delete(_KEY_PREFIX + name)
    return record


async def list_tokens(js: Any) -> list[TokenRecord]:
    import nats.js.errors

    kv = await open_bucket(js)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    out = []
    for key in keys:
        if key.startswith(_KEY_PREFIX):
            record = await _get(kv, key[len(_KEY_PREFIX):])
            if record is not None:
                out.append(record)
    return sorted(out, key=lambda r: r.name)


async def _get(kv: Any, name: str) -> TokenRecord | None:
    import nats.js.errors

    try:
        entry = await kv.get(_KEY_PREFIX + name)
    except nats.js.errors.KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        return _record_decoder.decode(entry.value)
    except msgspec.ValidationError:
        return None


class TokenTable:
    """Every token of the fabric, by hash, kept current by a watch on the bucket (a gateway's view)."""

    def __init__(self) -> None:
        self._by_hash: dict[str, TokenRecord] = {}
        self._by_key: dict[str, str] = {}
        #: whether the watch has read the bucket once (before that every token is unknown)
        self.loaded = False

    def lookup(self, token: str) -> TokenRecord | None:
        """The record of *token*, or None: a dict lookup by its SHA-256 (one hash per request), which leaks no
        timing about the token itself (an attacker cannot choose inputs whose hashes share a prefix)."""
        return self._by_hash.get(token_hash(token))

    def apply(self, key: str, value: bytes | None) -> None:
        old = self._by_key.pop(key, None)
        if old is not None:
            self._by_hash.pop(old, None)
        if not value or not key.startswith(_KEY_PREFIX):
            return
        try:
            record = _record_decoder.decode(value)
        except msgspec.ValidationError:
            return
        self._by_hash[record.sha256] = record
        self._by_key[key] = record.sha256

    def __len__(self) -> int:
        return len(self._by_hash)


async def webhook_secret(js: Any, *, rotate: bool = False) -> bytes:
    """The fabric's webhook secret: made by whoever asks first (a create: exactly one wins), or replaced."""
    import nats.js.errors

    kv = await open_bucket(js)
    if rotate:
        await kv.put(WEBHOOK_SECRET_KEY, secrets.token_hex(32).encode())
    else:
        try:
            await kv.create(WEBHOOK_SECRET_KEY, secrets.token_hex(32).encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
    entry = await kv.get(WEBHOOK_SECRET_KEY)
    return bytes(entry.value or b"")


async def ensure_operator_token(js: Any, state_auth_dir: Path, node: str) -> str:
    """This machine's operator token (scopes read, submit, admin): the one in ``auth/operator.token`` while the
    bucket still knows it, else a new one (named ``operator-<node>``) written there with mode 0600."""
    from .state import write_private

    path = state_auth_dir / OPERATOR_TOKEN_FILE
    name = f"operator-{node}"[:64]
    kv = await open_bucket(js)
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if token:
        record = await _get(kv, name)
        if record is not None and record.sha256 == token_hash(token):
            return token
        if record is not None:
            await kv.delete(_KEY_PREFIX + name)
    token, _ = await create_token(js, name, ["read", "submit", "admin"], by="fabric up")
    write_private(path, token + "\n")
    return token
