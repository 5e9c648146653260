"""``fabric keys create`` and ``fabric sign FILE``: the keys and signatures of signed code (fabric.signing).

A node with ``sandbox.require_signed`` runs only code signed by a key in its
``sandbox.trusted_keys``.  ``keys create`` makes a key pair and prints the public key to
list there; ``sign`` prints the signature of a file (a native executable or a core
library) for a request's ``signature`` field.  The Python client signs by itself when
given the private key (``FabricClient(signing_key=...)`` or ``$FABRIC_SIGNING_KEY``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import err, escape, fail, out
from .signing import SIGNING_KEY_ENV

__all__ = ["keys_app", "sign"]

keys_app = typer.Typer(help="Keys for signed code (sandbox.require_signed).", no_args_is_help=True)


@keys_app.command("create")
def create(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write NAME.key and NAME.pub.")] = Path("."),
    name: Annotated[str, typer.Option("--name", help="The files' name.")] = "signing",
) -> None:
    """Make an ed25519 key pair: NAME.key (private, 0600) and NAME.pub; print the public key."""
    from .signing import create_keys

    try:
        key, public = create_keys(out_dir.absolute(), name)
    except FileExistsError:
        fail(f"{out_dir / (name + '.key')} exists", "pass --name or --out, or remove it")
    err.print(f"private key {escape(str(key))} (0600): FabricClient(signing_key=...) or $FABRIC_SIGNING_KEY")
    err.print("trust it on a node: sandbox.trusted_keys = [\"<the line below>\"], sandbox.require_signed = true")
    out.print(public)


def sign(
    file: Annotated[Path, typer.Argument(help="The file to sign (a native executable, a core library).")],
    key: Annotated[Path | None, typer.Option("--key", envvar=SIGNING_KEY_ENV, show_default=False,
                                             help="The private key (default: $FABRIC_SIGNING_KEY).")] = None,
) -> None:
    """Print FILE's signature (base64): the request's ``signature`` field for it."""
    from .errors import BadRequest
    from .signing import file_message, load_key

    if key is None:
        fail("no key: pass --key or set $FABRIC_SIGNING_KEY", "`fabric keys create` makes one")
    try:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        signature = load_key(key).sign(file_message(digest))
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    except BadRequest as exc:
        fail(exc.message)
    err.print(f"sha256 {digest}")
    out.print(signature)
