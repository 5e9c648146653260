"""Type stubs for fabric_ext.wire, the binary frame codec (see wire.pyx and docs/protocol.md)."""

from typing import Final, Iterable, final

from typing_extensions import Buffer

MAGIC: Final[bytes]
VERSION: Final[int]
HEADER_SIZE: Final[int]
ITEM_FIXED: Final[int]
KIND_WRITE: Final[int]
KIND_READ: Final[int]
KIND_DATA: Final[int]
KIND_ACK: Final[int]
CONTENT_TYPE: Final[str]
TO_END: Final[int]
DEFAULT_MAX_ITEMS: Final[int]
DEFAULT_MAX_PAYLOAD: Final[int]

Item = tuple[str | bytes, int, int, int]

@final
class Frame:
    """A decoded frame; ``data(i)`` views point into the decoded buffer."""

    @property
    def kind(self) -> int: ...
    @property
    def items(self) -> list[tuple[str, int, int, int]]: ...
    def data(self, i: int) -> memoryview: ...
    def payloads(self) -> list[bytes]: ...
    def __len__(self) -> int: ...

def decode(buf: Buffer, *, max_items: int = 65536, max_payload: int = 67108864) -> Frame: ...
def decode_payloads(buf: Buffer, *, max_items: int = 65536,
                    max_payload: int = 67108864) -> tuple[list[bytes], list[int] | None]: ...
def encode(kind: int, items: Iterable[Item], payloads: Iterable[Buffer] | None = None) -> bytes: ...
def encode_reserve(kind: int, items: Iterable[Item], *, zero: bool = True,
                   views: bool = True) -> tuple[bytearray, list[memoryview]]: ...
def encode_reads(items: list[tuple[object, int, int | None]] | tuple[tuple[object, int, int | None], ...],
                 parsed: dict[str, tuple[object, ...]],
                 buffer_types: tuple[type, ...]) -> tuple[str, bytes] | None: ...
def read_reply_reserve(request: Frame, max_payload: int) -> tuple[bytearray, int] | None: ...
def frame_length(header: Buffer, *, max_items: int = 65536, max_payload: int = 67108864) -> int: ...
@final
class FrameDecoder:
    """Resumable: feed chunks of any size, get whole frames."""

    def __init__(self, *, max_items: int = 65536, max_payload: int = 67108864) -> None: ...
    def feed(self, data: Buffer) -> list[Frame]: ...
    def pending(self) -> int: ...
