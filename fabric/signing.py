"""Signed code: ed25519 keys, what is signed, and the check the services make.

With ``sandbox.require_signed`` on, a node runs only code signed by one of
``sandbox.trusted_keys``: native executables (``SpawnRequest.native``) and compute core
libraries (``LoadCoreRequest.library``) by their file's SHA-256, Python tasks by their
payload (the pickled function and arguments: a pickle is code too), a map by its
function and every call.  A request without a valid signature is 403.

The messages signed (ed25519 over these bytes; the signature travels base64 in the
request's ``signature`` field; docs/protocol.md "Signed code"):

* a file (native executable, core library): ``b"fabric-file\\0" + sha256 hex`` of its bytes;
* a Python task: ``b"fabric-python\\0" + sha256 hex`` of its payload (the FPY1 frame);
* a map: ``b"fabric-map\\0" + sha256 hex`` of the function, then ``"." + sha256 hex`` of each call.

``fabric keys create`` makes a key pair (the private key 0600; the public key is what
``trusted_keys`` lists), ``fabric sign FILE`` prints a file's signature, and the Python
client signs what it sends when given a key (``FabricClient(signing_key=...)`` or
``$FABRIC_SIGNING_KEY``).  Keys are made with the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadRequest, PermissionDenied

if TYPE_CHECKING:
    from .config.model import SandboxConfig

__all__ = ["SIGNING_KEY_ENV", "create_keys", "load_key", "public_key_of", "sign", "verify", "file_message",
           "python_message", "map_message", "require", "SigningKey"]

#: the environment variable naming a client's private signing key
SIGNING_KEY_ENV = "FABRIC_SIGNING_KEY"


def file_message(digest_hex: str) -> bytes:
    return b"fabric-file\0" + digest_hex.encode()


def python_message(payload: bytes) -> bytes:
    return b"fabric-python\0" + hashlib.sha256(payload).hexdigest().encode()


def map_message(fn: bytes, calls: Iterable[bytes]) -> bytes:
    parts = [hashlib.sha256(fn).hexdigest(), *(hashlib.sha256(c).hexdigest() for c in calls)]
    return b"fabric-map\0" + ".".join(parts).encode()


class SigningKey:
    """A private ed25519 key: signs messages, names its public key."""

    def __init__(self, key: Any) -> None:
        self._key = key

    @property
    def public(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return base64.b64encode(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._key.sign(message)).decode()


def create_keys(directory: Path, name: str = "signing") -> tuple[Path, str]:
    """A new key pair: ``<name>.key`` (PEM, 0600) and ``<name>.pub`` (the public key, base64) in *directory*."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    path = directory / f"{name}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public = SigningKey(key).public
    (directory / f"{name}.pub").write_text(public + "\n")
    return path, public


def load_key(path: str | os.PathLike[str]) -> SigningKey:
    """The private key in *path*; BadRequest naming what is wrong."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).expanduser().read_bytes(), password=None)
    except OSError as exc:
        raise BadRequest(f"cannot read signing key {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise BadRequest(f"{path} is not a PEM private key (`fabric keys create` makes one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadRequest(f"{path} is not an ed25519 key")
    return SigningKey(key)


def public_key_of(path: str | os.PathLike[str]) -> str:
    return load_key(path).public


def sign(key: SigningKey, message: bytes) -> str:
    return key.sign(message)


def verify(trusted: Sequence[str], message: bytes, signature: str) -> bool:
    """Whether *signature* (base64) over *message* is by one of the *trusted* public keys (base64)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    for pub in trusted:
        try:
            Ed25519PublicKey.from_public_bytes(base64.b64decode(pub)).verify(sig, message)
            return True
        except (InvalidSignature, ValueError, binascii.Error):
            continue
    return False


def require(policy: SandboxConfig, message: bytes, signature: str, what: str) -> None:
    """403 unless *policy* (the node's ``sandbox`` section) requires no signature, or *signature* over *message*
    is by one of its trusted keys."""
    if not policy.require_signed:
        return
    trusted = policy.trusted_keys
    if not signature:
        raise PermissionDenied(f"{what} is not signed, and this node runs only signed code "
                               "(sandbox.require_signed; `fabric sign FILE`, or a client with a signing key)")
    if not verify(trusted, message, signature):
        raise PermissionDenied(f"{what}: the signature is not by a trusted key (sandbox.trusted_keys), "
                               "or does not match what was sent")
