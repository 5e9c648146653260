"""The two wire encodings (JSON, MessagePack) with cached per-type decoders.

Part of :mod:`fabric.schema` (its docstring has the rules every message follows)."""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar, cast

import msgspec

from ..errors import BadRequest
from ..protocol.headers import CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE, MSGPACK_CONTENT_TYPE

# -- codecs ----------------------------------------------------------------

T = TypeVar("T")


class Codec:
    """One wire encoding (JSON or MessagePack) with cached per-type decoders."""

    __slots__ = ("name", "content_type", "_encoder", "_decoders", "_decoder_factory")

    def __init__(self, name: str, content_type: str, encoder: Any, decoder_factory: Any) -> None:
        self.name = name
        self.content_type = content_type
        self._encoder = encoder
        self._decoder_factory = decoder_factory
        self._decoders: dict[type, Any] = {}

    def encode(self, msg: Any) -> bytes:
        return cast(bytes, self._encoder.encode(msg))

    def decode(self, data: bytes, type_: type[T]) -> T:
        """Decode *data* as *type_*; malformed input raises :class:`BadRequest`."""
        dec = self._decoders.get(type_)
        if dec is None:
            dec = self._decoders[type_] = self._decoder_factory(type_)
        try:
            return cast(T, dec.decode(data))
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid {type_.__name__}: {self._explain(data, str(exc))}") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed {self.name}: {exc}") from None

    def _explain(self, data: bytes, text: str) -> str:
        """msgspec's ``Expected `int` <= 9223372036854775807 - at `$.size``` as ``size = 18446744073709551616: ...``.

        The offending value is shown as the client sent it (looked up in a schema-less
        decode of the body: this runs only for a rejected request), so a client sees
        which of its numbers was refused rather than only the bound.
        """
        m = _AT_PATH.match(text)
        if m is None:
            return text
        path = m["path"]
        field = path[1:] if path.startswith(".") else path or "the body"
        try:
            value = self._value_at(self.decode_any(data), path)
        except (LookupError, msgspec.MsgspecError):  # not found, or a number even a schema-less decode refuses
            return f"{field}: {m['what']}"
        return f"{field} = {_show(value)}: {m['what']}"

    def decode_any(self, data: bytes) -> Any:
        """The body as plain objects (no schema); DecodeError/ValidationError if malformed."""
        dec = self._decoders.get(Any)
        if dec is None:
            dec = self._decoders[Any] = self._decoder_factory(Any)
        return dec.decode(data)

    def _value_at(self, obj: Any, path: str) -> Any:
        """The value at a msgspec error path (``.items[3].offset``); LookupError if it cannot be found."""
        pos = 0
        while pos < len(path):
            step = _PATH_STEP.match(path, pos)
            if step is None:  # a dict key (msgspec writes ``[...]``) or anything unexpected
                raise LookupError(path)
            key, index = step.groups()
            try:
                obj = obj[key] if key is not None else obj[int(index)]
            except (KeyError, IndexError, TypeError) as exc:
                raise LookupError(path) from exc
            pos = step.end()
        return obj


#: msgspec's validation messages end with where the value was: `` - at `$.items[3].offset` ``
_AT_PATH: Final = re.compile(r"(?P<what>.*) - at `\$(?P<path>[^`]*)`", re.S)
_PATH_STEP: Final = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")


def _show(value: Any) -> str:
    """A rejected value for an error message: scalars in full (a huge number by its size), others by type."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if value.bit_length() <= 256 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return f"a {type(value).__name__}"


JSON: Final = Codec("JSON", JSON_CONTENT_TYPE, msgspec.json.Encoder(), msgspec.json.Decoder)
MSGPACK: Final = Codec("MessagePack", MSGPACK_CONTENT_TYPE, msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder)


def codec_for(headers: dict[str, str] | None) -> Codec:
    """The codec a request asked for through its ``Content-Type`` header."""
    if headers and headers.get(CONTENT_TYPE_HEADER) == MSGPACK_CONTENT_TYPE:
        return MSGPACK
    return JSON
