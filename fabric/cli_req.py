"""``fabric req``: one request, its reply printed (a stand-in for ``nats req`` that knows fabric).

It sends JSON or, with ``--msgpack``, the same data as MessagePack (the
content-type header says which), prints a MessagePack reply as JSON, and turns
fabric's error headers (docs/protocol.md "Errors") into one line on stderr and
exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

import typer

from .cli_common import NatsUrlOption, StateDirOption, connect, err, escape, fail, find_nats_url, state_of

__all__ = ["req"]


def req(
    subject: Annotated[str, typer.Argument(help="Subject to send the request to.")],
    data: Annotated[str, typer.Argument(help="Request body ('-' reads stdin).")] = "",
    header: Annotated[list[str] | None, typer.Option("--header", "-H", show_default=False,
                                                        help="Header K:V (repeatable).")] = None,
    msgpack: Annotated[bool, typer.Option("--msgpack",
                                          help="Send JSON DATA as MessagePack; decode the reply.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds to wait for the reply.")] = 5.0,
    show_headers: Annotated[bool, typer.Option("--show-headers", help="Print the reply's headers on stderr.")] = False,
    nats_url: NatsUrlOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Send one request and print the reply (a stand-in for `nats req`)."""
    import msgspec

    from .errors import ERROR_CODE_HEADER, ERROR_HEADER, ERROR_KIND_HEADER
    from .schema import CONTENT_TYPE_HEADER, MSGPACK_CONTENT_TYPE

    url, _ = find_nats_url(nats_url, state_of(state_dir))
    body = sys.stdin.buffer.read() if data == "-" else data.encode()
    headers: dict[str, str] = {}
    for item in header or []:
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            fail(f"bad --header {item!r}", "use --header KEY:VALUE")
        headers[key.strip()] = value.strip()
    if msgpack:
        try:
            body = msgspec.msgpack.encode(msgspec.json.decode(body)) if body.strip() else msgspec.msgpack.encode({})
        except msgspec.DecodeError as exc:
            fail(f"--msgpack needs JSON data: {exc}")
        headers[CONTENT_TYPE_HEADER] = MSGPACK_CONTENT_TYPE

    async def send() -> Any:
        import nats.errors

        nc = await connect(url)
        try:
            return await nc.request(subject, body, timeout=timeout, headers=headers or None)
        except nats.errors.NoRespondersError:
            fail(f"no responders on {subject}: no service listens on that subject",
                 "check the subject, and `fabric status` for the services that run")
        except nats.errors.TimeoutError:
            fail(f"no reply on {subject} within {timeout:g} s")
        finally:
            await nc.close()

    msg = asyncio.run(send())
    reply_headers = msg.headers or {}
    if show_headers:
        for key, value in reply_headers.items():
            err.print(f"{escape(key)}: {escape(value)}")
    code = reply_headers.get(ERROR_CODE_HEADER)
    kind = reply_headers.get(ERROR_KIND_HEADER)
    if code or kind:
        text = reply_headers.get(ERROR_HEADER) or kind or ""
        sys.stderr.write(f"error {code or kind}: {text}\n")
        raise typer.Exit(1)
    _print_body(msg.data, msgpack or reply_headers.get(CONTENT_TYPE_HEADER) == MSGPACK_CONTENT_TYPE)


def _print_body(data: bytes, is_msgpack: bool) -> None:
    import msgspec

    if is_msgpack:
        try:
            obj = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            pass
        else:
            # bytes become base64 strings: the reply is shown, not round-tripped
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n")
            return
    try:
        obj = json.loads(data)
    except ValueError:
        sys.stdout.buffer.write(data)
        if data and not data.endswith(b"\n") and sys.stdout.isatty():
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
        return
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
