"""The errors the extensions raise: the root of fabric's error tree and the classes arena and wire need.

The extensions (``arena``, ``wire``) raise typed errors that callers catch as
``fabric.errors.X``.  ``except`` only matches real subclasses, so the classes the
extensions raise must *be* the classes of fabric's tree; they are defined here, in a
module the extensions own, so that importing ``fabric_ext`` loads nothing from the
``fabric`` package (the layering rule: ``fabric`` depends on ``fabric_ext``, never
the other way).  :mod:`fabric.errors` re-exports every class below under the same
name, adds the rest of the tree, and is the public home: code outside ``fabric_ext``
imports errors from there.

The kind/code registry lives with :class:`FabricError` because registration happens
as each subclass is defined (``__init_subclass__``); it is the one registry for the
whole tree, including the classes :mod:`fabric.errors` adds.  Each kind is
registered once; each numeric code's default class is the first one registered for it.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "FabricError",
    "BadRequest",
    "InvalidFrame",
    "OutOfRange",
    "NotFound",
    "UnknownHandle",
    "StaleHandle",
    "Conflict",
    "DoubleFree",
    "TooLarge",
    "QuotaExceeded",
    "InternalError",
    "CorruptionDetected",
    "OutOfMemory",
]

# kind -> class and code -> default class; fabric.errors reads them (error_from_wire)
_BY_KIND: dict[str, type[FabricError]] = {}
_BY_CODE: dict[int, type[FabricError]] = {}


class FabricError(Exception):
    """Base of every fabric error; raised when nothing more precise fits."""

    code: ClassVar[int] = 500
    kind: ClassVar[str] = "error"

    def __init__(self, message: str = "", **fields: Any) -> None:
        super().__init__(message or self.kind.replace("_", " "))
        self.message = message or self.kind.replace("_", " ")
        self.fields = fields
        for name, value in fields.items():
            setattr(self, name, value)

    def __init_subclass__(cls, register: bool = True, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not register:
            return
        if "kind" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must define its own kind")
        if cls.kind in _BY_KIND:
            raise TypeError(f"error kind {cls.kind!r} registered twice ({_BY_KIND[cls.kind].__name__}, {cls.__name__})")
        _BY_KIND[cls.kind] = cls
        _BY_CODE.setdefault(cls.code, cls)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.fields.items())
        return f"{type(self).__name__}({self.message!r}{extra})"

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self).kind, self.message, self.fields))


def _rebuild(kind: str, message: str, fields: dict[str, Any]) -> FabricError:
    return _BY_KIND.get(kind, FabricError)(message, **fields)


# The classes below are registered in the order fabric's tree lists them, each family
# head before its members, so every code's default class is its family head.


class BadRequest(FabricError, ValueError):
    """Raised when a request is malformed or has wrong types or values.

    Also a :class:`ValueError`, so code that validates arguments the Python way
    (``except ValueError``) catches fabric's bad-argument errors too.
    """

    code = 400
    kind = "bad_request"


class InvalidFrame(BadRequest):
    """Raised when a binary frame is truncated, has a bad magic/version, or hostile lengths."""

    kind = "invalid_frame"


class OutOfRange(BadRequest):
    """Raised when an offset/length pair falls outside the block's size."""

    kind = "out_of_range"


class NotFound(FabricError):
    """Raised when an id, node or subject is unknown."""

    code = 404
    kind = "not_found"


class UnknownHandle(NotFound):
    """Raised when a handle was never issued here, is forged, or names an unknown segment."""

    kind = "unknown_handle"


class StaleHandle(NotFound):
    """Raised when a handle's block has been freed (use after free)."""

    kind = "stale_handle"


class Conflict(FabricError):
    """Raised when the current state forbids the operation."""

    code = 409
    kind = "conflict"


class DoubleFree(Conflict):
    """Raised when a block is freed a second time."""

    kind = "double_free"


class TooLarge(FabricError):
    """Raised when a size, a count or a frame exceeds a hard limit."""

    code = 413
    kind = "too_large"


class QuotaExceeded(FabricError):
    """Raised when an owner's quota would be exceeded; carries ``owner``, ``limit``, ``requested``."""

    code = 429
    kind = "quota"


class InternalError(FabricError):
    """Raised when the service hit a bug or an unexpected failure."""

    code = 500
    kind = "internal"


class CorruptionDetected(InternalError):
    """Raised when a block header, canary or segment header is damaged."""

    kind = "corruption"


class OutOfMemory(FabricError):
    """Raised when the node's memory capacity is exhausted; carries ``requested``, ``available``."""

    code = 507
    kind = "out_of_memory"
