"""The allocator's persistent identity: its shared-memory prefix and its handle key.

Both live in ``<state-dir>/allocator/<node>.json`` (mode 0600).  A restarted
allocator reads them back, so it reattaches the same shared-memory segments and
every handle it issued before the crash still verifies.

``python -m fabric.services.allocator.identity --release-memory STATE_DIR`` is the entry
point ``fabric down --purge`` runs (:func:`main`).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    prefix: str  # shared-memory name prefix of this node's arena
    key: bytes  # secret key of the handle MACs; never leaves this node


def load_or_create(state_dir: Path, node: str) -> Identity:
    path = state_dir / "allocator" / f"{node}.json"
    try:
        raw = json.loads(path.read_text())
        return Identity(prefix=raw["prefix"], key=bytes.fromhex(raw["key"]))
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity(prefix=f"fabric-{secrets.token_hex(6)}", key=secrets.token_bytes(32))
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"prefix": ident.prefix, "key": ident.key.hex(), "node": node}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return ident


def release_memory(state_dir: Path) -> list[str]:
    """Unlink the shared-memory segments of every allocator identity in *state_dir*.

    For ``fabric down --purge``: the allocator must be stopped.  Segments otherwise
    outlive the allocator on purpose, so a restart reattaches every block.  Returns
    the prefixes released.
    """
    from fabric_ext.arena import Arena

    released = []
    for path in sorted((state_dir / "allocator").glob("*.json")):
        try:
            prefix = json.loads(path.read_text())["prefix"]
        except (OSError, ValueError, KeyError):
            continue
        Arena(prefix, 1 << 44).destroy()
        path.unlink()  # the next allocator starts afresh, with a new prefix and key
        released.append(prefix)
    return released


def main(argv: list[str] | None = None) -> None:
    """``python -m fabric.services.allocator.identity --release-memory STATE_DIR``: what ``fabric down --purge`` runs.

    The allocator's public entry point for releasing its memory (fabric runs it as a
    process and imports nothing from the services); prints the prefixes released as a
    JSON list.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fabric.services.allocator.identity")
    parser.add_argument("--release-memory", metavar="STATE_DIR", type=Path, required=True,
                        help="unlink the shared memory of every allocator identity in STATE_DIR")
    args = parser.parse_args(argv)
    print(json.dumps(release_memory(args.release_memory)))


if __name__ == "__main__":
    main()
