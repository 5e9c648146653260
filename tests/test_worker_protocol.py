"""The worker protocol v1 codec (fabric_ext.wire v1_*): golden bytes, hostile input, streaming.

The golden vectors are written out by hand from the seed spec ("Worker socket
protocol version 1": type u8, id u64, payload length u64, payload; strings and
blobs are u64 length + bytes; all little-endian), independently of the encoder,
so a layout change fails here first.
"""

from __future__ import annotations

import tracemalloc

import pytest

from fabric.errors import InvalidFrame, TooLarge
from fabric_ext import wire  # the built extension: a missing build fails here, it does not skip

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

U64 = 2**64 - 1


def h(text: str) -> bytes:
    """Hex with spaces, newlines and '#' comments, to bytes."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


# -- golden vectors ------------------------------------------------------------

VERSION_MSG = h("""
    01                          # type 0x01 version exchange
    07 00 00 00 00 00 00 00     # id 7
    04 00 00 00 00 00 00 00     # payload length 4
    01 00 00 00                 # version 1 (u32)
""")
VERSION_OK = h("""
    01                          # response 0x01
    07 00 00 00 00 00 00 00     # id 7
    01 00 00 00 00 00 00 00     # payload length 1
    01                          # accepted
""")
VERSION_NO = h("""
    01  07 00 00 00 00 00 00 00  01 00 00 00 00 00 00 00  00   # not accepted
""")
CORE_MSG = h("""
    02                          # type 0x02 new compute core
    08 00 00 00 00 00 00 00     # id 8
    16 00 00 00 00 00 00 00     # payload length 22 = 8 + 3 + 8 + 3
    03 00 00 00 00 00 00 00     # name: string of 3 bytes
    61 62 63                    # "abc"
    03 00 00 00 00 00 00 00     # library: blob of 3 bytes
    7f 45 4c                    # "\\x7fEL"
""")
CORE_OK = h("""
    01  08 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00      # 0x01, id 8, empty
""")
JOB_MSG = h("""
    03                          # type 0x03 new job
    ff ff ff ff ff ff ff ff     # id 2^64-1
    15 00 00 00 00 00 00 00     # payload length 21 = 8 + 8 + 5
    2a 00 00 00 00 00 00 00     # job id 42
    05 00 00 00 00 00 00 00     # data: blob of 5 bytes
    68 65 6c 6c 6f              # "hello"
""")
JOB_RESULT = h("""
    01                          # response 0x01
    ff ff ff ff ff ff ff ff     # id 2^64-1
    0e 00 00 00 00 00 00 00     # payload length 14 = 4 + 8 + 2
    fd ff ff ff                 # exit code -3 (i32)
    02 00 00 00 00 00 00 00     # output: blob of 2 bytes
    6f 6b                       # "ok"
""")
ERROR_RESP = h("""
    ff                          # response 0xff error
    09 00 00 00 00 00 00 00     # id 9
    04 00 00 00 00 00 00 00     # payload length 4
    62 61 64 21                 # "bad!"
""")

GOLDEN = {
    "version": (VERSION_MSG, lambda: wire.v1_version(7, 1), 0x01, 7),
    "version_ok": (VERSION_OK, lambda: wire.v1_ok(7, b"\x01"), 0x01, 7),
    "version_no": (VERSION_NO, lambda: wire.v1_ok(7, b"\x00"), 0x01, 7),
    "core": (CORE_MSG, lambda: wire.v1_core(8, "abc", b"\x7fEL"), 0x02, 8),
    "core_ok": (CORE_OK, lambda: wire.v1_ok(8), 0x01, 8),
    "job": (JOB_MSG, lambda: wire.v1_job(U64, 42, b"hello"), 0x03, U64),
    "job_result": (JOB_RESULT, lambda: wire.v1_job_result(U64, -3, b"ok"), 0x01, U64),
    "error": (ERROR_RESP, lambda: wire.v1_error(9, "bad!"), 0xFF, 9),
}


def test_constants() -> None:
    assert (wire.V1_VERSION, wire.V1_HEADER_SIZE) == (1, 17)
    assert (wire.V1_MSG_VERSION, wire.V1_MSG_CORE, wire.V1_MSG_JOB) == (1, 2, 3)
    assert (wire.V1_OK, wire.V1_ERROR) == (1, 0xFF)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_encode_and_parse(name: str) -> None:
    golden, make, kind, msg_id = GOLDEN[name]
    assert make() == golden
    f = wire.v1_parse(golden)
    assert (f.kind, f.msg_id) == (kind, msg_id)
    assert bytes(f.payload) == golden[17:]
    assert f.payload.readonly
    assert wire.v1_frame(kind, msg_id, golden[17:]) == golden


def test_golden_payloads() -> None:
    assert wire.v1_parse_version(wire.v1_parse(VERSION_MSG).payload) == 1
    assert wire.v1_parse_version_reply(wire.v1_parse(VERSION_OK).payload) is True
    assert wire.v1_parse_version_reply(wire.v1_parse(VERSION_NO).payload) is False
    name, lib = wire.v1_parse_core(wire.v1_parse(CORE_MSG).payload)
    assert (name, bytes(lib)) == ("abc", b"\x7fEL")
    job_id, data = wire.v1_parse_job(wire.v1_parse(JOB_MSG).payload)
    assert (job_id, bytes(data)) == (42, b"hello")
    code, out = wire.v1_parse_job_result(wire.v1_parse(JOB_RESULT).payload)
    assert (code, bytes(out)) == (-3, b"ok")
    assert wire.v1_parse_error(wire.v1_parse(ERROR_RESP).payload) == "bad!"


def test_split_headers_match_whole_frames() -> None:
    # the push_parts / sendmsg halves: header + body is byte for byte the whole frame
    assert wire.v1_job_header(U64, 42, 5) + b"hello" == JOB_MSG
    assert len(wire.v1_job_header(1, 2, 3)) == 33
    assert wire.v1_job_result_header(U64, -3, 2) + b"ok" == JOB_RESULT
    assert len(wire.v1_job_result_header(1, 0, 0)) == 29


def test_payload_views_are_zero_copy() -> None:
    buf = bytearray(JOB_MSG)
    f = wire.v1_parse(buf)
    _, data = wire.v1_parse_job(f.payload)
    buf[-1] = ord("!")                   # the view sees the buffer it was parsed from
    assert bytes(data) == b"hell!"


# -- boundaries ----------------------------------------------------------------

IDS = [0, 1, 2**7 - 1, 2**7 + 1, 2**16, 2**32, U64]
SIZES = [0, 1, 2, 127, 129, 4096, 65536]


@pytest.mark.parametrize("msg_id", IDS)
def test_ids_round_trip(msg_id: int) -> None:
    for frame in (wire.v1_version(msg_id), wire.v1_ok(msg_id), wire.v1_error(msg_id, "e"),
                  wire.v1_job(msg_id, msg_id, b"x"), wire.v1_job_result(msg_id, 0, b"")):
        assert wire.v1_parse(frame).msg_id == msg_id
    job_id, _ = wire.v1_parse_job(wire.v1_parse(wire.v1_job(1, msg_id, b"")).payload)
    assert job_id == msg_id


@pytest.mark.parametrize("size", SIZES)
def test_blob_sizes_round_trip(size: int) -> None:
    blob = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    _, data = wire.v1_parse_job(wire.v1_parse(wire.v1_job(1, 2, blob)).payload)
    assert bytes(data) == blob
    name, lib = wire.v1_parse_core(wire.v1_parse(wire.v1_core(1, "é" * 3, blob)).payload)
    assert (name, bytes(lib)) == ("ééé", blob)
    code, out = wire.v1_parse_job_result(wire.v1_parse(wire.v1_job_result(1, 2**31 - 1, blob)).payload)
    assert (code, bytes(out)) == (2**31 - 1, blob)


@pytest.mark.parametrize("code", [0, 1, -1, 2**31 - 1, -(2**31)])
def test_exit_codes(code: int) -> None:
    got, _ = wire.v1_parse_job_result(wire.v1_parse(wire.v1_job_result(1, code, b"")).payload)
    assert got == code


def test_errors_are_typed_and_value_errors() -> None:
    # the agreed contract: the fabric error (code 400 / 413) and a ValueError at once
    with pytest.raises(wire.V1InvalidFrame) as bad:
        wire.v1_parse(b"\x01")
    assert isinstance(bad.value, InvalidFrame) and isinstance(bad.value, ValueError)
    assert bad.value.code == 400
    with pytest.raises(wire.V1TooLarge) as big:
        wire.v1_parse(wire.v1_ok(1, b"xx"), max_payload=1)
    assert isinstance(big.value, TooLarge) and isinstance(big.value, ValueError)
    assert big.value.code == 413


def test_encoder_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidFrame, match="unknown v1 message type"):
        wire.v1_frame(0x04, 1)
    with pytest.raises(InvalidFrame):
        wire.v1_frame(0, 1)
    with pytest.raises(InvalidFrame):
        wire.v1_frame(256, 1)
    with pytest.raises(OverflowError):
        wire.v1_frame(1, -1)
    with pytest.raises(OverflowError):
        wire.v1_frame(1, 2**64)
    with pytest.raises(OverflowError):
        wire.v1_job_result(1, 2**31, b"")
    with pytest.raises(TypeError):
        wire.v1_core(1, b"not-a-str", b"")  # type: ignore[arg-type]


# -- hostile input -------------------------------------------------------------

ALL_GOLDEN = [GOLDEN[n][0] for n in sorted(GOLDEN)]


@pytest.mark.parametrize("frame", ALL_GOLDEN, ids=sorted(GOLDEN))
def test_every_truncation_is_rejected(frame: bytes) -> None:
    for cut in range(len(frame)):
        with pytest.raises(InvalidFrame, match="truncated"):
            wire.v1_parse(frame[:cut])


@pytest.mark.parametrize("frame", ALL_GOLDEN, ids=sorted(GOLDEN))
def test_trailing_bytes_are_rejected(frame: bytes) -> None:
    with pytest.raises(InvalidFrame, match="1 trailing bytes"):
        wire.v1_parse(frame + b"\x00")


@pytest.mark.parametrize("kind", [0x00, 0x04, 0x10, 0x7F, 0x80, 0xFE])
def test_unknown_types_are_rejected(kind: int) -> None:
    with pytest.raises(InvalidFrame, match="unknown v1 message type"):
        wire.v1_parse(bytes([kind]) + VERSION_MSG[1:])
    with pytest.raises(InvalidFrame, match="unknown v1 message type"):
        wire.V1Decoder().feed(bytes([kind]) + VERSION_MSG[1:])


def test_length_beyond_maximum_is_rejected_before_allocating() -> None:
    hostile = bytes([3]) + (1).to_bytes(8, "little") + (2**63).to_bytes(8, "little")
    with pytest.raises(TooLarge):
        wire.v1_parse(hostile)
    with pytest.raises(TooLarge):
        wire.v1_parse(wire.v1_job(1, 2, b"x" * 100), max_payload=99)
    assert wire.v1_parse(wire.v1_job(1, 2, b"x" * 100), max_payload=116).kind == 3
    # the stream decoder sees only a 17-byte header announcing 2^64-1 bytes: it must
    # refuse it without reserving anything (a 16 EiB, or even a 1 GiB, bytes would show)
    for length in (U64, wire.V1_DEFAULT_MAX_PAYLOAD + 1):
        d = wire.V1Decoder()
        tracemalloc.start()
        try:
            with pytest.raises(TooLarge):
                d.feed(bytes([3]) + (1).to_bytes(8, "little") + length.to_bytes(8, "little"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20
    d = wire.V1Decoder(max_payload=10)
    with pytest.raises(TooLarge):
        d.feed(wire.v1_job(1, 2, b"")[:17])            # announces 16 > 10, rejected at the header
    with pytest.raises(InvalidFrame, match="already rejected"):
        d.feed(b"")


@pytest.mark.parametrize("payload, parse", [
    (b"\x01\x00\x00", wire.v1_parse_version),
    (b"\x01\x00\x00\x00\x00", wire.v1_parse_version),
    (b"", wire.v1_parse_version_reply),
    (b"\x01\x01", wire.v1_parse_version_reply),
    (b"\x02", wire.v1_parse_version_reply),
    (b"", wire.v1_parse_job),
    ((1).to_bytes(8, "little"), wire.v1_parse_job),
    ((1).to_bytes(8, "little") + (6).to_bytes(8, "little") + b"hello", wire.v1_parse_job),
    ((1).to_bytes(8, "little") + (4).to_bytes(8, "little") + b"hello", wire.v1_parse_job),
    ((1).to_bytes(8, "little") + U64.to_bytes(8, "little") + b"hello", wire.v1_parse_job),
    (b"\x00\x00\x00", wire.v1_parse_job_result),
    (b"\x00" * 4 + (3).to_bytes(8, "little") + b"ok", wire.v1_parse_job_result),
    (b"\x00" * 4 + (1).to_bytes(8, "little") + b"ok", wire.v1_parse_job_result),
    ((4).to_bytes(8, "little") + b"abc", wire.v1_parse_core),
    ((3).to_bytes(8, "little") + b"abc", wire.v1_parse_core),
    ((3).to_bytes(8, "little") + b"abc" + (2**63).to_bytes(8, "little"), wire.v1_parse_core),
    ((3).to_bytes(8, "little") + b"abc" + (0).to_bytes(8, "little") + b"x", wire.v1_parse_core),
    ((2).to_bytes(8, "little") + b"\xff\xfe" + (0).to_bytes(8, "little"), wire.v1_parse_core),
])
def test_bad_payloads_are_rejected(payload: bytes, parse) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(wire.V1InvalidFrame):
        parse(payload)


def test_every_truncated_payload_is_rejected() -> None:
    cases = [
        (CORE_MSG, wire.v1_parse_core),
        (JOB_MSG, wire.v1_parse_job),
        (JOB_RESULT, wire.v1_parse_job_result),
        (VERSION_MSG, wire.v1_parse_version),
        (VERSION_OK, wire.v1_parse_version_reply),
    ]
    for frame, parse in cases:
        payload = frame[17:]
        parse(payload)
        for cut in range(len(payload)):
            with pytest.raises(wire.V1InvalidFrame):
                parse(payload[:cut])


# -- resumable decoding --------------------------------------------------------

STREAM = b"".join(ALL_GOLDEN) + wire.v1_job(5, 6, bytes(range(256)) * 40)


def _expected() -> list[tuple[int, int, bytes]]:
    out = []
    for g in ALL_GOLDEN:
        f = wire.v1_parse(g)
        out.append((f.kind, f.msg_id, bytes(f.payload)))
    out.append((3, 5, wire.v1_job(5, 6, bytes(range(256)) * 40)[17:]))
    return out


def _frames(fs: list) -> list[tuple[int, int, bytes]]:  # type: ignore[type-arg]
    return [(f.kind, f.msg_id, bytes(f.payload)) for f in fs]


def test_decoder_byte_by_byte() -> None:
    d = wire.V1Decoder()
    got = []
    for i in range(len(STREAM)):
        got += d.feed(STREAM[i:i + 1])
    assert _frames(got) == _expected()
    assert d.pending() == 0


@pytest.mark.parametrize("chunk", [2, 3, 16, 17, 18, 33, 1000, len(STREAM)])
def test_decoder_chunks(chunk: int) -> None:
    for kind in (bytes, bytearray, memoryview):
        d = wire.V1Decoder()
        got = []
        for i in range(0, len(STREAM), chunk):
            got += d.feed(kind(STREAM[i:i + chunk]))
        assert _frames(got) == _expected()


def test_decoder_views_survive_a_reused_buffer() -> None:
    # a socket reader recv_into()s the same bytearray again and again: frames it
    # already returned must not change when the buffer is overwritten
    d = wire.V1Decoder()
    buf = bytearray(JOB_MSG)
    (f,) = d.feed(buf)
    buf[:] = b"\x00" * len(buf)
    assert bytes(wire.v1_parse_job(f.payload)[1]) == b"hello"


def test_decoder_pending_and_partial_then_error() -> None:
    d = wire.V1Decoder()
    assert d.feed(JOB_MSG[:20]) == []
    assert d.pending() == 20
    (f,) = d.feed(JOB_MSG[20:] + JOB_MSG[:5])
    assert f.msg_id == U64
    assert d.pending() == 5
    (g,) = d.feed(b"\x00" * 12)            # the rest of that header: id 0xffffffff, empty payload
    assert (g.kind, g.msg_id, bytes(g.payload)) == (3, 2**32 - 1, b"")
    with pytest.raises(InvalidFrame, match="unknown v1 message type 0x09"):
        d.feed(b"\x09")                    # an unknown type is refused on its first byte
    with pytest.raises(InvalidFrame, match="already rejected"):
        d.feed(VERSION_MSG)
