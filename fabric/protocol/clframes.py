"""FCLJ/FCLR: the layout of OpenCL job and result frames (docs/protocol.md "OpenCL jobs").

Little-endian.  Both frames are a 16-byte prefix ``magic | version u16 | flags u16 |
header length H u32 | reserved u32``, the H-byte MessagePack header, zero padding up to
D = 16 + H rounded up to 16, then the inline data.  This module owns that layout and
reads it by the shared rules of :mod:`.reader`; what the header says is
:mod:`fabric.opencl`'s (msgspec Structs the worker and the client share), which hands
back the extents of the inline buffers the header names so :func:`check_inline` can
hold the data to exactly them: a buffer running past the end, and bytes after the last
one (trailing bytes), are :class:`~fabric.errors.InvalidFrame`.
Part of :mod:`fabric.protocol` (stdlib and fabric.errors only).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Final

from ..errors import InvalidFrame
from .reader import Reader

__all__ = ["JOB_MAGIC", "RESULT_MAGIC", "VERSION", "PREFIX", "INLINE_ALIGN", "MAX_HEADER", "align",
           "pack_frame", "unpack_frame", "check_inline"]

JOB_MAGIC: Final = b"FCLJ"
RESULT_MAGIC: Final = b"FCLR"
VERSION: Final = 1
#: magic, version u16, flags u16, header length u32, reserved u32 (zero)
PREFIX: Final = struct.Struct("<4sHHII")
_FIELDS = struct.Struct("<HHII")
#: inline buffers start on this boundary (relative to the frame's start)
INLINE_ALIGN: Final = 16
#: a header larger than this is refused before decoding (sources are text, not data)
MAX_HEADER: Final = 16 << 20

_NAMES: Final = {JOB_MAGIC: "OpenCL job frame", RESULT_MAGIC: "OpenCL result frame"}


def align(n: int, to: int) -> int:
    """*n* rounded up to a multiple of *to*."""
    return (n + to - 1) // to * to


def pack_frame(magic: bytes, header: bytes, data_len: int) -> tuple[bytearray, int]:
    """A zeroed frame with *header* in place and room for *data_len* inline bytes; the data's offset D."""
    start = align(PREFIX.size + len(header), INLINE_ALIGN)
    out = bytearray(start + data_len)
    PREFIX.pack_into(out, 0, magic, VERSION, 0, len(header), 0)
    out[PREFIX.size:PREFIX.size + len(header)] = header
    return out, start


def unpack_frame(frame: Any, magic: bytes) -> tuple[memoryview, memoryview]:
    """The header bytes and the inline data of a frame of kind *magic*; InvalidFrame when it is not one."""
    r = Reader(frame, _NAMES.get(magic, "OpenCL frame"))
    r.magic(magic)
    version, flags, hlen, reserved = r.unpack(_FIELDS, "prefix")
    r.expect("version", version, VERSION, 4)
    r.expect("flags", flags, 0, 6)
    r.expect("reserved", reserved, 0, 12)
    r.count(hlen, MAX_HEADER, "header length")
    header = r.take(hlen, "header")
    pad = r.skip_to(align(PREFIX.size + hlen, INLINE_ALIGN), "padding before the inline data")
    if any(pad):
        raise InvalidFrame(f"{r.what}: non-zero padding at offset {PREFIX.size + hlen}")
    return header, r.take(r.left(), "inline data")


def check_inline(data: memoryview, extents: Iterable[tuple[int, int]], what: str) -> None:
    """The inline *data* must hold each ``(offset, nbytes)`` buffer and end with the last one.

    A buffer outside the data is refused (naming it), and so are bytes after the
    furthest-reaching buffer: a sender puts nothing after its last buffer.
    """
    end = 0
    for i, (offset, nbytes) in enumerate(extents):
        if offset < 0 or nbytes < 0 or offset + nbytes > len(data):
            raise InvalidFrame(f"{what}: inline buffer {i} at {offset}..{offset + nbytes} runs past the "
                               f"{len(data)} bytes of inline data")
        end = max(end, offset + nbytes)
    if end != len(data):
        raise InvalidFrame(f"{len(data) - end} trailing bytes after {what}'s inline data of {end} bytes")
