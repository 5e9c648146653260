"""The checked reader every Python frame codec reads through: one set of rules for lengths and trailing bytes.

docs/protocol.md "Reading a frame" states the rules; this is their one Python spelling,
and ``fabric_ext.wire`` (FBF1, worker protocol v1) follows the same ones in C with its
own checked reads.  A :class:`Reader` is a window over a received buffer with a cursor;
every field goes through it, so a codec cannot read past the end or forget a check:

* a field that needs more bytes than are left is ``InvalidFrame("truncated <frame>:
  <field> needs N bytes at offset O, only M left")``;
* a count whose table cannot fit what is left is refused before anything is sized
  from it (:meth:`Reader.table`), as is a count above the frame's limit;
* a bad magic or version names what was found and what was expected;
* :meth:`Reader.end`: bytes left over after the last field are
  ``InvalidFrame("N trailing bytes after <frame>")``.

Views handed out point into the received buffer (no copy).  Part of :mod:`fabric.protocol`;
imports only the standard library and :mod:`fabric.errors`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from ..errors import InvalidFrame

__all__ = ["Reader", "as_bytes_view"]


def as_bytes_view(data: Any) -> memoryview:
    """*data* (any contiguous buffer) as a flat memoryview of bytes."""
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


class Reader:
    """A bounds-checked cursor over one frame; *what* names the frame in every error ("job batch frame")."""

    __slots__ = ("view", "pos", "what")

    def __init__(self, data: Any, what: str) -> None:
        self.view = as_bytes_view(data)
        self.pos = 0
        self.what = what

    def left(self) -> int:
        """Bytes not read yet."""
        return len(self.view) - self.pos

    def _need(self, n: int, field: str) -> None:
        if n > len(self.view) - self.pos:
            raise InvalidFrame(f"truncated {self.what}: {field} needs {n} bytes at offset {self.pos}, "
                               f"only {len(self.view) - self.pos} left")

    def take(self, n: int, field: str) -> memoryview:
        """The next *n* bytes, as a view into the frame."""
        self._need(n, field)
        start = self.pos
        self.pos = start + n
        return self.view[start:self.pos]

    def skip_to(self, offset: int, field: str) -> memoryview:
        """Advance to *offset* (for alignment padding); the skipped bytes, as a view."""
        return self.take(offset - self.pos, field)

    def unpack(self, fmt: struct.Struct, field: str) -> tuple[Any, ...]:
        """The fields of *fmt* (a little-endian ``struct.Struct``) at the cursor."""
        self._need(fmt.size, field)
        out = fmt.unpack_from(self.view, self.pos)
        self.pos += fmt.size
        return out

    def magic(self, expected: bytes, what: str = "") -> None:
        """The frame's magic must be *expected*."""
        got = bytes(self.take(len(expected), "magic"))
        if got != expected:
            raise InvalidFrame(f"{what or self.what}: magic {got!r} at offset {self.pos - len(expected)}, "
                               f"expected {expected!r}")

    def expect(self, field: str, got: int, expected: int, offset: int) -> None:
        """A fixed field read at *offset* (a version, flags, a reserved word) must be *expected*."""
        if got != expected:
            raise InvalidFrame(f"{self.what}: {field} {got} at offset {offset}, expected {expected}")

    def count(self, n: int, limit: int, field: str) -> int:
        """A count read from the frame: at most *limit* (a limit of the frame kind, docs/protocol.md)."""
        if n > limit:
            raise InvalidFrame(f"{self.what}: {field} {n} exceeds the limit of {limit}")
        return n

    def _fits(self, n: int, entry_size: int, field: str) -> int:
        size = n * entry_size
        if size > len(self.view) - self.pos:
            raise InvalidFrame(f"truncated {self.what}: {n} {field} of {entry_size} bytes need {size} bytes "
                               f"at offset {self.pos}, only {len(self.view) - self.pos} left")
        return size

    def table(self, n: int, entry: struct.Struct, field: str) -> list[tuple[Any, ...]]:
        """*n* entries of *entry* at the cursor; refused at once when *n* of them cannot fit what is left."""
        size = self._fits(n, entry.size, field)
        out = list(entry.iter_unpack(self.view[self.pos:self.pos + size]))
        self.pos += size
        return out

    def integers(self, n: int, code: str, field: str) -> tuple[int, ...]:
        """*n* little-endian integers of struct *code* (``"Q"``) at the cursor, checked as :meth:`table` is."""
        fmt = struct.Struct(f"<{n}{code}")
        self._fits(n, fmt.size // n if n else 0, field)
        out = fmt.unpack_from(self.view, self.pos)
        self.pos += fmt.size
        return out

    def payloads(self, lengths: Iterable[int], field: str) -> list[memoryview]:
        """One view per length, back to back at the cursor; the first that runs past the end names its index.

        The hot loop of a batch frame (one entry per job): the error message is built
        only when a length does not fit.
        """
        view, pos, size = self.view, self.pos, len(self.view)
        out: list[memoryview] = []
        append = out.append
        for length in lengths:
            end = pos + length
            if end > size:
                self.pos = pos
                self.take(length, f"{field} {len(out)}")  # raises, naming the item and its offset
            append(view[pos:end])
            pos = end
        self.pos = pos
        return out

    def end(self) -> None:
        """The frame must end here: left-over bytes are refused, never ignored."""
        if self.pos != len(self.view):
            raise InvalidFrame(f"{len(self.view) - self.pos} trailing bytes after {self.what} "
                               f"of {self.pos} bytes")
