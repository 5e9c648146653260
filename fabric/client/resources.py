"""What a task needs, written as people write it: ``Resources(cpus=2, mem="4GiB", gpus=0.5)``.

:func:`Resources` builds the wire message :class:`fabric.schema.tasks.Resources` (sizes in
bytes) from sizes given as ints (bytes) or strings (``"4GiB"``, ``"512MB"``, ``"1.5G"``).
Used by the tasks area (:mod:`fabric.client.tasks`); exported as ``fabric.Resources``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from ..errors import BadRequest
from ..schema.tasks import Resources as ResourcesMessage

__all__ = ["Resources", "parse_size"]

#: decimal units are powers of 1000 (as disks count); binary ones, and the bare letters K/M/G/T
#: (as ``ulimit``, Java and the fabric CLI write them), powers of 1024
_UNITS: Final = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
    "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40, "pi": 1 << 50,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50,
}
_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_MAX: Final = (1 << 63) - 1


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512MB"``, ``"1.5G"`` or ``"100"``.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/... (and ``Ki``, ``K``,
    ``M``, ``G``, ``T``) powers of 1024; case does not matter.  A fraction of a byte rounds
    down.  Anything else, a negative size, or one past 2^63-1 raises :class:`BadRequest`.
    """
    if isinstance(value, bool):
        raise BadRequest(f"{what} must be a size in bytes or a string such as '4GiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        unit = _UNITS.get(m.group(2).lower()) if m else None
        if m is None or unit is None:
            raise BadRequest(f"{what} {value!r} is not a size: write bytes as an int, or a number and a unit "
                             "such as '512MB', '4GiB' or '1.5G'")
        number = m.group(1)
        # whole numbers stay exact ints (no float rounding of '9223372036854775807')
        size = int(number) * unit if "." not in number else int(float(number) * unit)
    else:
        raise BadRequest(f"{what} must be a size in bytes or a string such as '4GiB', got {type(value).__name__}")
    if not 0 <= size <= _MAX:
        raise BadRequest(f"{what} {value!r} is outside 0 .. 2^63-1 bytes")
    return size


def Resources(  # noqa: N802 - reads as the class it builds
    cpus: float = 1.0,
    mem: int | str = 0,
    gpus: float = 0.0,
    gpu_mem: int | str = 0,
    *,
    arch: str = "",
    os: str = "",
    node: str = "",
    labels: Mapping[str, str] | None = None,
    custom: Mapping[str, float] | None = None,
) -> ResourcesMessage:
    """What a task needs from its node, as :class:`fabric.schema.tasks.Resources` (sizes in bytes).

    ``cpus`` and ``gpus`` may be fractions (``gpus=0.5`` shares a GPU); ``mem`` and
    ``gpu_mem`` (per GPU) are bytes or strings such as ``"4GiB"`` (:func:`parse_size`);
    ``arch``, ``os``, ``node`` and ``labels`` select nodes; ``custom`` names resources a
    node declared at ``fabric up --resources``.  A value out of its field's bounds raises
    :class:`BadRequest`.

    >>> Resources(cpus=2, mem="4GiB", gpus=0.5, gpu_mem="20GiB").mem
    4294967296
    """
    import msgspec

    fields = {"cpus": cpus, "mem": parse_size(mem, "mem"), "gpus": gpus, "gpu_mem": parse_size(gpu_mem, "gpu_mem"),
              "arch": arch, "os": os, "node": node, "labels": dict(labels or {}), "custom": dict(custom or {})}
    try:
        # through the validating converter: the constructor alone checks no bounds
        return msgspec.convert(fields, ResourcesMessage)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid Resources: {exc}") from None
