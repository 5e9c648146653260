"""The data plane's handshake and error frames (HELLO, WELCOME, FDPE): the golden bytes of docs/protocol.md.

The vectors below are the worked example of protocol.md "Data plane (remote memory over
TCP)", written out byte by byte; the codec (:mod:`fabric_ext.dataplane`, re-exported by
:mod:`fabric.protocol.dataplane`) must produce exactly them and read them back, and the
doc must still show them, so a client written in another language from the doc alone
speaks what the allocator speaks.  Then the malformed variants every reader refuses.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from fabric.errors import InvalidFrame
from fabric.protocol import dataplane as reexported
from fabric_ext import dataplane  # the built extension: a missing build fails here, it does not skip

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

# -- golden vectors (protocol.md "Worked example: a handshake and an error") ------------------

#: an example ticket, short for the page: real ones are t1.<user>.<expires_ms>.<24 hex>.<32 hex>
TICKET = "t1.alice.1700000060000.nonce.mac"

HELLO = bytes([
    0x46, 0x44, 0x50, 0x31,  # magic "FDP1"
    0x01,                    # version 1
    0x00,                    # flags 0
    0x20, 0x00,              # ticket_len 32
]) + b"t1.alice.1700000060000.nonce.mac"

WELCOME = bytes([
    0x46, 0x44, 0x50, 0x31,  # magic "FDP1"
    0x01,                    # version 1
    0x00,                    # status 0
    0x00, 0x00,              # reserved 0
    0x00, 0x00, 0x00, 0x04,  # max_frame 67,108,864 (64 MiB)
    0x60, 0xEA, 0x00, 0x00,  # idle_ms 60,000
])

ERROR = bytes([
    0x46, 0x44, 0x50, 0x45,  # magic "FDPE"
    0x94, 0x01,              # code 404
    0x0C, 0x00,              # kind_len 12
    0x0B, 0x00, 0x00, 0x00,  # message_len 11
]) + b"stale_handle" + b"block freed"

#: the one-line hex strings protocol.md prints
HEX = {
    "hello": "464450310100200074312e616c6963652e313730303030303036303030302e6e6f6e63652e6d6163",
    "welcome": "46445031010000000000000460ea0000",
    "error": "4644504594010c000b0000007374616c655f68616e646c65626c6f636b206672656564",
}


def test_the_vectors_are_what_the_hex_says() -> None:
    assert (HELLO.hex(), WELCOME.hex(), ERROR.hex()) == (HEX["hello"], HEX["welcome"], HEX["error"])
    assert (len(HELLO), len(WELCOME), len(ERROR)) == (40, 16, 35)


def test_hello_encodes_to_the_golden_bytes() -> None:
    assert dataplane.hello(TICKET) == HELLO
    assert dataplane.hello(TICKET.encode("ascii")) == HELLO  # bytes or str, the same frame


def test_hello_reads_back() -> None:
    assert dataplane.hello_ticket_length(HELLO[:dataplane.HELLO_FIXED]) == len(TICKET) == 32
    assert dataplane.hello_ticket_length(HELLO) == 32  # only the fixed part is read
    n = dataplane.hello_ticket_length(HELLO)
    assert HELLO[dataplane.HELLO_FIXED:dataplane.HELLO_FIXED + n].decode("ascii") == TICKET


def test_welcome_encodes_and_reads_back() -> None:
    assert dataplane.welcome(67108864, 60000) == WELCOME
    assert dataplane.parse_welcome(WELCOME) == (64 << 20, 60_000)


def test_error_frame_encodes_and_reads_back() -> None:
    assert dataplane.error_frame(404, "stale_handle", "block freed") == ERROR
    assert dataplane.error_frame_length(ERROR[:dataplane.ERROR_FIXED]) == 35
    assert dataplane.parse_error(ERROR) == (404, "stale_handle", "block freed", 35)
    # what follows the frame on the stream is not part of it
    assert dataplane.parse_error(ERROR + b"FBF1...") == (404, "stale_handle", "block freed", 35)


def test_a_welcome_reader_that_gets_an_error_frame_raises_refused() -> None:
    with pytest.raises(dataplane.Refused) as exc:
        dataplane.parse_welcome(ERROR)
    assert (exc.value.code, exc.value.kind, str(exc.value)) == (404, "stale_handle", "block freed")


def test_the_constants_are_the_documented_ones() -> None:
    assert (dataplane.HELLO_MAGIC, dataplane.ERROR_MAGIC, dataplane.VERSION) == (b"FDP1", b"FDPE", 1)
    assert (dataplane.HELLO_FIXED, dataplane.WELCOME_SIZE, dataplane.ERROR_FIXED) == (8, 16, 12)
    assert (dataplane.MAX_TICKET, dataplane.MAX_KIND, dataplane.MAX_MESSAGE) == (1024, 64, 4096)
    # fabric.protocol is the one place to find every frame codec: the same functions
    assert reexported.hello is dataplane.hello and reexported.parse_welcome is dataplane.parse_welcome


def test_the_doc_shows_these_vectors() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = doc.split("## Data plane (remote memory over TCP)", 1)[1].split("\n## ", 1)[0]
    for name, hexstr in HEX.items():
        assert hexstr in section.replace("\n", ""), name
    assert f"`{TICKET}`" in section


# -- malformed HELLOs ---------------------------------------------------------------------------


def _hello(magic: bytes = b"FDP1", version: int = 1, flags: int = 0, ticket_len: int = 32) -> bytes:
    return magic + struct.pack("<BBH", version, flags, ticket_len)


@pytest.mark.parametrize("header, why", [
    (_hello(magic=b"FDP2"), "bad HELLO magic"),
    (_hello(magic=b"FBF1"), "bad HELLO magic"),  # a frame before the handshake
    (_hello(version=2), "unsupported data plane version 2"),
    (_hello(version=0), "unsupported data plane version 0"),
    (_hello(flags=1), "unknown HELLO flags 0x01"),
    (_hello(flags=0x80), "unknown HELLO flags 0x80"),
    (_hello(ticket_len=0), "HELLO ticket length 0"),
    (_hello(ticket_len=1025), "HELLO ticket length 1025"),
    (_hello(ticket_len=0xFFFF), "HELLO ticket length 65535"),
    (HELLO[:7], "truncated HELLO"),
    (b"", "truncated HELLO"),
])
def test_a_malformed_hello_is_invalid_frame(header: bytes, why: str) -> None:
    with pytest.raises(InvalidFrame, match=why):
        dataplane.hello_ticket_length(header)


def test_ticket_lengths_at_the_bounds() -> None:
    assert dataplane.hello_ticket_length(_hello(ticket_len=1)) == 1
    assert dataplane.hello_ticket_length(_hello(ticket_len=1024)) == 1024
    assert dataplane.hello("x" * 1024)[6:8] == b"\x00\x04"
    for bad in ("", "x" * 1025):
        with pytest.raises(ValueError, match="a ticket is 1 to 1024 bytes"):
            dataplane.hello(bad)
    with pytest.raises(UnicodeEncodeError):
        dataplane.hello("t1.älice")  # a ticket is ASCII


# -- malformed WELCOMEs -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"FDP2" + WELCOME[4:],                      # bad magic
    WELCOME[:4] + b"\x02" + WELCOME[5:],        # version 2
    WELCOME[:5] + b"\x01" + WELCOME[6:],        # status not 0
    WELCOME[:6] + b"\x01\x00" + WELCOME[8:],    # reserved not 0
    WELCOME[:15],                               # truncated
    WELCOME + b"\x00",                          # trailing byte
    b"",
])
def test_a_malformed_welcome_is_invalid_frame(data: bytes) -> None:
    with pytest.raises(InvalidFrame):
        dataplane.parse_welcome(data)


# -- malformed error frames ---------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"FDPX" + ERROR[4:],                                    # bad magic
    ERROR[:6] + struct.pack("<H", 65) + ERROR[8:],          # kind_len over 64
    ERROR[:8] + struct.pack("<I", 4097) + ERROR[12:],       # message_len over 4096
    ERROR[:11],                                             # fixed part truncated
    ERROR[:34],                                             # message truncated
    ERROR[:12],                                             # kind and message missing
])
def test_a_malformed_error_frame_is_invalid_frame(data: bytes) -> None:
    with pytest.raises(InvalidFrame):
        dataplane.parse_error(data)


def test_error_frame_length_checks_the_limits_before_sizing() -> None:
    assert dataplane.error_frame_length(b"FDPE" + struct.pack("<HHI", 500, 64, 4096)) == 12 + 64 + 4096
    for kind_len, message_len in ((65, 0), (0, 4097), (0xFFFF, 0xFFFFFFFF)):
        with pytest.raises(InvalidFrame):
            dataplane.error_frame_length(b"FDPE" + struct.pack("<HHI", 400, kind_len, message_len))
    with pytest.raises(InvalidFrame):
        dataplane.error_frame_length(HELLO[:12])  # not an error frame


def test_error_frame_cuts_kind_and_message_to_their_limits() -> None:
    frame = dataplane.error_frame(500, "k" * 100, "m" * 5000)
    code, kind, message, n = dataplane.parse_error(frame)
    assert (code, kind, message, n) == (500, "k" * 64, "m" * 4096, 12 + 64 + 4096)
    assert dataplane.parse_error(dataplane.error_frame(70000, "internal", "x"))[0] == 500  # a code past u16
