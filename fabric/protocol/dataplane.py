"""The data plane's handshake and error frames (FDP1, FDPE): the codec of :mod:`fabric_ext.dataplane`, found here.

The data plane carries remote memory's FBF1 frames (:mod:`.wire`) over a TCP connection
of its own, opened with a HELLO that carries a ticket and answered by a WELCOME or an
FDPE error frame (docs/protocol.md "Data plane").  The codec and the socket loops are C
and live in ``fabric_ext``; this module re-exports them unchanged, so
:mod:`fabric.protocol` stays the one place to find every frame codec.  Part of
:mod:`fabric.protocol`.
"""

from __future__ import annotations

from fabric_ext.dataplane import (
    ERROR_FIXED,
    ERROR_MAGIC,
    HELLO_FIXED,
    HELLO_MAGIC,
    MAX_KIND,
    MAX_MESSAGE,
    MAX_PARTS,
    MAX_TICKET,
    VERSION,
    WELCOME_SIZE,
    Broken,
    Channel,
    Refused,
    error_frame,
    error_frame_length,
    hello,
    hello_ticket_length,
    parse_error,
    parse_welcome,
    serve,
    welcome,
)

__all__ = [
    "ERROR_FIXED",
    "ERROR_MAGIC",
    "HELLO_FIXED",
    "HELLO_MAGIC",
    "MAX_KIND",
    "MAX_MESSAGE",
    "MAX_PARTS",
    "MAX_TICKET",
    "VERSION",
    "WELCOME_SIZE",
    "Broken",
    "Channel",
    "Refused",
    "error_frame",
    "error_frame_length",
    "hello",
    "hello_ticket_length",
    "parse_error",
    "parse_welcome",
    "serve",
    "welcome",
]
