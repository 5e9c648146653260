"""``fabric token create|rm|list``: the HTTP gateway's bearer tokens.

A token is shown once, when it is made; the fabric keeps its SHA-256 only
(:mod:`fabric.gateway_tokens`), in JetStream, so every gateway of the fabric knows it
at once and forgets it as soon as it is removed.  The commands talk to the running
fabric as its admin (``--state-dir``), or as whoever ``$FABRIC_CREDENTIALS`` names.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from .cli_common import NatsUrlOption, StateDirOption, connect, err, escape, fail, find_nats_url, out, state_of

__all__ = ["tokens_app", "webhook_secret"]

tokens_app = typer.Typer(help="Manage the HTTP gateway's bearer tokens: create, remove, list.", no_args_is_help=True)


async def _with_js(url: str, state: Any, work: Any) -> Any:
    from nats.js.errors import APIError

    nc = await connect(url, state)
    try:
        return await work(nc.nc.jetstream(timeout=5.0))
    except APIError as exc:
        fail(f"JetStream refused: {exc.description or exc}",
             "token commands need the fabric admin's credentials (run them on a machine of the fabric)")
    finally:
        await nc.close()


@tokens_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The token's name (letters, digits, '_' and '-').")],
    scope: Annotated[str, typer.Option("--scope", help="Comma-separated: read (GET), submit (tasks, memory), "
                                                       "admin (act as the fabric's admin).")] = "read,submit",
    user: Annotated[str | None, typer.Option(
        "--user", help="The fabric user a non-admin token acts for (default: the token's name): its tasks and "
                       "memory are that user's.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print {name, token, scopes, user} as JSON.")] = False,
    nats_url: NatsUrlOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Make a bearer token for the HTTP gateway; it is printed once and never again."""
    from .gateway_tokens import TokenError, create_token

    state = state_of(state_dir)
    url, _ = find_nats_url(nats_url, state)
    scopes = [s for s in scope.split(",") if s.strip()]
    try:
        token, record = asyncio.run(_with_js(url, state, lambda js: create_token(js, name, scopes, user,
                                                                                 by="fabric token create")))
    except TokenError as exc:
        fail(str(exc))
    if json_out:
        out.print_json(json.dumps({"name": record.name, "token": token, "scopes": record.scopes,
                                   "user": record.user or None}))
        return
    who = "the fabric's admin" if not record.user else f"user {record.user}"
    err.print(f"token [bold]{escape(record.name)}[/] ({', '.join(record.scopes)}; acts as {escape(who)}). "
              "Shown once: keep it now.")
    out.print(token, highlight=False, soft_wrap=True)
    err.print("use it as: curl -H 'Authorization: Bearer TOKEN' http://GATEWAY/api/…")


@tokens_app.command("rm")
def remove(
    name: Annotated[str, typer.Argument(help="The token to remove.")],
    nats_url: NatsUrlOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Remove a token: every gateway refuses it from now on."""
    from .gateway_tokens import TokenError, remove_token

    state = state_of(state_dir)
    url, _ = find_nats_url(nats_url, state)
    try:
        record = asyncio.run(_with_js(url, state, lambda js: remove_token(js, name)))
    except TokenError as exc:
        fail(str(exc))
    err.print(f"removed token [bold]{escape(record.name)}[/]")


@tokens_app.command("list")
def list_(
    json_out: Annotated[bool, typer.Option("--json", help="Print the tokens as JSON.")] = False,
    nats_url: NatsUrlOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """The tokens: names, scopes, users, when made (never the tokens themselves)."""
    from .gateway_tokens import list_tokens

    state = state_of(state_dir)
    url, _ = find_nats_url(nats_url, state)
    records = asyncio.run(_with_js(url, state, list_tokens))
    if json_out:
        out.print_json(json.dumps([{"name": r.name, "scopes": r.scopes, "user": r.user or None,
                                    "created": r.created, "by": r.by} for r in records]))
        return
    if not records:
        err.print("no tokens (`fabric token create NAME` makes one)")
        return
    for r in records:
        who = "admin" if not r.user else r.user
        out.print(f"{escape(r.name):24} {','.join(r.scopes):20} {escape(who):16} {r.created}", highlight=False)


def webhook_secret(
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace the secret: receivers must take the new one.")]
    = False,
    nats_url: NatsUrlOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """The secret the gateways sign webhooks with (HMAC-SHA256; docs/gateway.md "Webhooks")."""
    from .gateway_tokens import webhook_secret as secret_of
    from .protocol.streams import GATEWAY_BUCKET

    async def work(js: Any) -> str:
        return (await secret_of(js, rotate=rotate)).decode()

    state = state_of(state_dir)
    url, _ = find_nats_url(nats_url, state)
    secret = asyncio.run(_with_js(url, state, work))
    if rotate:
        err.print(f"webhook secret replaced (bucket {GATEWAY_BUCKET}); every gateway signs with it from now on")
    out.print(secret, highlight=False)
