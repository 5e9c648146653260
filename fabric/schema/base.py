"""What every message shares: the base Struct, the bounded types, the error body.

Part of :mod:`fabric.schema` (its docstring has the rules every message follows)."""

from __future__ import annotations

from typing import Annotated, Final

from msgspec import Meta, Struct

from ..errors import FabricError

#: The largest integer any request field takes: int64's maximum.  msgspec decodes
#: arbitrarily large integers, so every integer field of every request carries explicit
#: bounds (msgspec's bounds must themselves fit an int64); a value past them is 400
#: ``bad_request`` at decode, and whatever passes fits the C ``int64_t``/``long`` it may
#: land in (the arena's positions, setrlimit), where it would otherwise clamp or wrap.
INT_MAX: Final = 2**63 - 1
#: sizes, offsets, lengths and counts of bytes or things: 0 .. 2**63-1
UInt = Annotated[int, Meta(ge=0, le=INT_MAX)]
#: a handle token (see fabric.handles); at most 255 characters so it fits a frame item
HandleStr = Annotated[str, Meta(min_length=1, max_length=255)]
#: owner names are short labels used for quotas and per-owner segments
OwnerStr = Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9_.@-]*$")]
#: lease time-to-live in seconds; 0 means no lease
TTL = Annotated[float, Meta(ge=0, le=365 * 24 * 3600)]


class Message(Struct, kw_only=True, omit_defaults=False):
    """Base of every wire message."""


class ErrorInfo(Message):
    """An error inside a batch reply, or the body of an error reply."""

    code: int
    kind: str
    message: str


class ErrorReply(Message):
    """Body of an error reply (the ADR-32 headers carry the same code and text)."""

    error: ErrorInfo


def error_info(exc: FabricError) -> ErrorInfo:
    return ErrorInfo(code=exc.code, kind=exc.kind, message=exc.message)
