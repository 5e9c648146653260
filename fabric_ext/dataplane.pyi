"""Type stub of fabric_ext.dataplane: the data plane's socket loops (see dataplane.pyx, docs/protocol.md)."""

import socket
from collections.abc import Callable, Sequence
from typing import Final, final

from typing_extensions import Buffer

from fabric_ext.errors import FabricError

HELLO_MAGIC: Final[bytes]
ERROR_MAGIC: Final[bytes]
VERSION: Final[int]
HELLO_FIXED: Final[int]
WELCOME_SIZE: Final[int]
ERROR_FIXED: Final[int]
MAX_TICKET: Final[int]
MAX_KIND: Final[int]
MAX_MESSAGE: Final[int]
MAX_PARTS: Final[int]

class Refused(FabricError):
    """The peer answered with an FDPE error frame."""

    def __init__(self, code: int, kind: str, message: str) -> None: ...

class Broken(FabricError):
    """The connection failed under a request; ``sent``: something of the request left this end."""

    reason: str
    sent: bool
    def __init__(self, message: str, reason: str, sent: bool) -> None: ...

def hello(ticket: str | bytes) -> bytes: ...
def hello_ticket_length(header: Buffer) -> int: ...
def welcome(max_frame: int, idle_ms: int) -> bytes: ...
def parse_welcome(data: Buffer) -> tuple[int, int]: ...
def error_frame(code: int, kind: str, message: str) -> bytes: ...
def error_frame_length(header: Buffer) -> int: ...
def parse_error(data: Buffer) -> tuple[int, str, str, int]: ...
def serve(fd: int, handler: Callable[[memoryview], tuple[Sequence[Buffer], bool]], *, max_frame: int,
          idle_ms: int, frame_ms: int, max_items: int = 65536) -> str: ...
@final
class Channel:
    """The client's end of one admitted connection (blocking; one request at a time)."""

    def __init__(self, sock: socket.socket, timeout_s: float, max_frame: int) -> None: ...
    @property
    def max_frame(self) -> int: ...
    def request(self, parts: Sequence[Buffer]) -> bytearray: ...
    def write(self, head: Buffer, data: Buffer) -> int: ...
    def read(self, frame: Buffer) -> bytes: ...
