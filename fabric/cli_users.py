"""``fabric user add|rm|list``: the people who may use this fabric, changed without a restart.

The table and the files are :class:`fabric.auth.AuthRealm`'s (``<state>/auth``).  A change
rewrites ``users.conf``; when the fabric runs, its nats-server checks the whole config
(``nats-server -t``) and reloads it (SIGHUP): an added user can connect at once, a removed
user's connections close at once, nobody else notices.  Without a running fabric the
change takes effect at the next ``fabric up``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .auth import AuthError, AuthRealm
from .cli_common import StateDirOption, console, err, escape, fail, out, state_of
from .state import FabricState, StateDir

__all__ = ["users_app", "join_token", "realm_of", "apply_change"]

users_app = typer.Typer(help="Manage who may use this fabric (auth on): add, remove and list users.",
                        no_args_is_help=True)


def realm_of(state: StateDir) -> tuple[AuthRealm, FabricState | None]:
    from .config import default_node

    running = state.running()
    if not state.auth_dir.is_dir():
        fail(f"no auth in {state.path}: the fabric there was never started with auth on",
             "`fabric up` (auth is on by default) creates it")
    last = running or state.read()
    return AuthRealm(state, last.node if last is not None else default_node()), running


def _duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` (or plain seconds) in seconds; fails clearly otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
    except ValueError:
        fail(f"--ttl {text!r} is not a duration", "use 90s, 30m, 12h or 7d")
    if value <= 0:
        fail(f"--ttl {text!r} must be positive")
    return value


def _ca(state: StateDir, running: FabricState | None) -> str | None:
    """The fabric's CA certificate when it runs TLS: credentials and tokens carry (a fingerprint of) it."""
    last = running or state.read()
    ca = state.path / "pki" / "ca.pem"
    return ca.read_text() if last is not None and last.tls and ca.is_file() else None


def apply_change(realm: AuthRealm, running: FabricState | None, keys: list[str] | None = None) -> str:
    """Reload the running fabric's nats-server, and hand the change (table entries *keys*) to the rest of its
    cluster; say what happened."""
    if running is None or running.nats is None or running.nats.pid is None or not running.credentials:
        realm.render()
        return "the fabric is not running: the change applies at the next `fabric up`"
    from . import cluster

    if keys and cluster.load(realm.state) is not None:
        import asyncio

        try:
            asyncio.run(_share(realm, running, keys))
        except Exception as exc:
            fail(f"the change is made on this node but did not reach the cluster's other nodes: {exc}",
                 "their JetStream needs a quorum (most nodes up): run the command again once they are")
    binary = running.nats.command[0] if running.nats.command else "nats-server"
    try:
        realm.reload(binary, realm.state.nats_dir / "nats.conf", running.nats.pid)
    except AuthError as exc:
        fail(str(exc), "the running server keeps its users; fix users.json, then run the command again")
    except OSError as exc:
        fail(f"cannot reload nats-server (pid {running.nats.pid}): {exc.strerror or exc}")
    return f"nats-server (pid {running.nats.pid}) reloaded: in effect now"


async def _share(realm: AuthRealm, running: FabricState, keys: list[str]) -> None:
    """Write the entries *keys* into the cluster's users bucket (fabric.users_sync): every node applies them."""
    import nats

    from .credentials import read_credentials
    from .users_sync import push

    nc = await nats.connect(running.nats_url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0,
                            name="fabric-user", **read_credentials(running.credentials).connect_options())
    try:
        await push(nc.jetstream(timeout=5), realm, keys, lambda *a, **k: None)
    finally:
        await nc.close()


@users_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The user's name: letters, digits, '_' and '-'.")],
    role: Annotated[str, typer.Option("--role", help="client (its own things only) or admin (everything).")
                    ] = "client",
    out_path: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                                  help="Where to write the credentials (default: ./NAME.creds).")
                        ] = None,
    ttl: Annotated[str | None, typer.Option("--ttl", show_default=False,
                                            help="Let the user in for this long only: 90s, 30m, 12h, 7d.")] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Create a user and write their credentials file (hand it over like a private key)."""
    state = state_of(state_dir)
    realm, running = realm_of(state)
    target = (out_path or Path(f"{name}.creds")).absolute()
    if target.exists():
        fail(f"{target} exists", "pass --out PATH, or remove the file")
    from .nats_server import is_loopback

    # the URL the user reaches the fabric at: another machine's when it listens beyond loopback
    url = None if running is None else running.nats_url if is_loopback(running.host or "") else running.join_url
    try:
        creds = realm.add_user(name, role, target, url=url, ca_pem=_ca(state, running),
                               ttl_s=_duration(ttl) if ttl is not None else None)
    except AuthError as exc:
        fail(str(exc))
    said = apply_change(realm, running, [f"user.{name}"])
    out.print(f"user [bold]{escape(name)}[/] ({role}) added; credentials in {escape(str(target))} (mode 0600)")
    out.print(f"  {said}")
    out.print(f"  use       FabricClient(credentials={str(target)!r})  or  FABRIC_CREDENTIALS={escape(str(target))}")
    if creds.role != "admin":
        out.print(f"  subjects  fabric.u.{name}.… (docs/protocol.md, \"Connecting\")")


@users_app.command("rm")
def rm(
    name: Annotated[str, typer.Argument(help="The user to remove.")],
    state_dir: StateDirOption = None,
) -> None:
    """Remove a user: their connections close now, their credentials stop working."""
    state = state_of(state_dir)
    realm, running = realm_of(state)
    try:
        realm.remove_user(name)
    except AuthError as exc:
        fail(str(exc))
    out.print(f"user [bold]{escape(name)}[/] removed; {apply_change(realm, running, [f'user.{name}'])}")


@users_app.command("list")
def list_users(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    state_dir: StateDirOption = None,
) -> None:
    """The users of this fabric: name, role, public key, when added."""
    from rich.table import Table

    state = state_of(state_dir)
    realm, _ = realm_of(state)
    users = realm.users()
    if as_json:
        out.print_json(json.dumps([{"name": u.name, "role": u.role, "nkey": u.nkey, "created": u.created,
                                    "expires": u.expires or None} for u in users]))
        return
    table = Table("user", "role", "nkey", "added", "expires")
    for u in users:
        table.add_row(u.name, u.role, u.nkey, u.created, (u.expires + (" (expired)" if u.expired() else ""))
                      if u.expires else "never")
    console().print(table)


def join_token(
    rotate: Annotated[bool, typer.Option("--rotate", help="Make a new token; the old one stops working.")] = False,
    state_dir: StateDirOption = None,
) -> None:
    """Print the token another machine joins this fabric with: fabric up --join URL --token TOKEN.

    Whoever holds it can add a node (its services, and its operator as an admin): hand it
    only to machines you run, and --rotate it when one should no longer join.
    """
    state = state_of(state_dir)
    realm, running = realm_of(state)
    fresh = rotate or not realm.join_credentials.is_file()
    token = realm.join_token(rotate=rotate, ca_pem=_ca(state, running))
    if fresh:
        said = apply_change(realm, running, [f"join.{realm.node}"])
        err.print(f"a new join token; {said}")
    url = running.join_url if running is not None else "nats://THIS-MACHINE:PORT"
    err.print(f"on the other machine: fabric up --join {url} --token TOKEN  (its own nats-server, routed to this "
              f"one; --nats-url {url} instead: its services on this NATS)")
    out.print(token)
