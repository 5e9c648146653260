"""The binary frame codec (fabric_ext.wire): golden bytes, round trips, hostile input, streaming.

The golden vectors below are written out byte by byte, independently of the
encoder, so a change to the layout fails here first.  The READ/DATA pair is
the worked example in docs/protocol.md ("The binary frame").
"""

from __future__ import annotations

import gc
import mmap
import random
import struct
import tracemalloc

import pytest

from fabric.errors import InvalidFrame, TooLarge
from fabric_ext import wire  # the built extension: a missing build fails here, it does not skip

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

U64 = 2**64 - 1
U32 = 2**32 - 1


def h(text: str) -> bytes:
    """Hex with spaces, newlines and '#' comments, to bytes."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


# -- golden vectors ------------------------------------------------------------
# name: (frame bytes, kind, items as decoded, payload of each item)

GOLDEN = {
    # READ request: one item, handle "n1:blk7" (7 bytes + 1 pad), offset 16, length 5
    "read": (h("""
        46 42 46 31  01  02  00 00        # "FBF1", version 1, kind 2 READ, flags 0
        01 00 00 00                       # item_count 1
        20 00 00 00                       # items_length 32
        00 00 00 00 00 00 00 00           # payload_length 0
        07 00  00 00  00 00 00 00         # handle_len 7, status 0, reserved
        10 00 00 00 00 00 00 00           # offset 16
        05 00 00 00 00 00 00 00           # length 5
        6e 31 3a 62 6c 6b 37 00           # "n1:blk7" + 1 pad byte
    """), wire.KIND_READ, [("n1:blk7", 16, 5, 0)], [b""]),
    # DATA reply to it: one item, no handle, the 5 bytes "hello"
    "data": (h("""
        46 42 46 31  01  03  00 00        # "FBF1", version 1, kind 3 DATA, flags 0
        01 00 00 00                       # item_count 1
        18 00 00 00                       # items_length 24
        05 00 00 00 00 00 00 00           # payload_length 5
        00 00  00 00  00 00 00 00         # handle_len 0, status 0, reserved
        10 00 00 00 00 00 00 00           # offset 16
        05 00 00 00 00 00 00 00           # length 5
        68 65 6c 6c 6f                    # payload "hello"
    """), wire.KIND_DATA, [("", 16, 5, 0)], [b"hello"]),
    "write": (h("""
        46 42 46 31  01  01  00 00        # WRITE
        01 00 00 00  20 00 00 00          # 1 item, items_length 32
        03 00 00 00 00 00 00 00           # payload_length 3
        01 00  00 00  00 00 00 00         # handle_len 1, status 0
        00 00 00 00 00 00 00 00           # offset 0
        03 00 00 00 00 00 00 00           # length 3
        77 00 00 00 00 00 00 00           # "w" + 7 pad bytes
        61 62 63                          # "abc"
    """), wire.KIND_WRITE, [("w", 0, 3, 0)], [b"abc"]),
    "ack": (h("""
        46 42 46 31  01  04  00 00        # ACK
        01 00 00 00  18 00 00 00          # 1 item, items_length 24
        00 00 00 00 00 00 00 00           # payload_length 0
        00 00  00 00  00 00 00 00         # handle_len 0, status 0
        00 00 00 00 00 00 00 00           # offset 0
        03 00 00 00 00 00 00 00           # length 3 (bytes written)
    """), wire.KIND_ACK, [("", 0, 3, 0)], [b""]),
    # a batch of 3: handles of 0, 1 and 9 bytes (pads 0, 7, 7), the second failed with 404
    "data_batch": (h("""
        46 42 46 31  01  03  00 00        # DATA
        03 00 00 00  60 00 00 00          # 3 items, items_length 96
        05 00 00 00 00 00 00 00           # payload_length 5
        00 00  00 00  00 00 00 00         # item 0: handle_len 0, status 0
        00 00 00 00 00 00 00 00           #   offset 0
        02 00 00 00 00 00 00 00           #   length 2
        01 00  94 01  00 00 00 00         # item 1: handle_len 1, status 404
        08 00 00 00 00 00 00 00           #   offset 8
        00 00 00 00 00 00 00 00           #   length 0
        61 00 00 00 00 00 00 00           #   "a" + 7 pad
        09 00  00 00  00 00 00 00         # item 2: handle_len 9, status 0
        00 10 00 00 00 00 00 00           #   offset 4096
        03 00 00 00 00 00 00 00           #   length 3
        61 62 63 64 65 66 67 68 69 00 00 00 00 00 00 00  # "abcdefghi" + 7 pad
        68 69  78 79 7a                   # payload: "hi", "", "xyz"
    """), wire.KIND_DATA, [("", 0, 2, 0), ("a", 8, 0, 404), ("abcdefghi", 4096, 3, 0)], [b"hi", b"", b"xyz"]),
    # a READ "to the end of the block": length 2^64-1
    "read_to_end": (h("""
        46 42 46 31  01  02  00 00        # READ
        01 00 00 00  20 00 00 00          # 1 item, items_length 32
        00 00 00 00 00 00 00 00           # payload_length 0
        01 00  00 00  00 00 00 00         # handle_len 1
        07 00 00 00 00 00 00 00           # offset 7
        ff ff ff ff ff ff ff ff           # length TO_END
        68 00 00 00 00 00 00 00           # "h" + 7 pad
    """), wire.KIND_READ, [("h", 7, U64, 0)], [b""]),
}


def _payloads(kind: int, payloads: list[bytes]) -> list[bytes] | None:
    return payloads if kind in (wire.KIND_WRITE, wire.KIND_DATA) else None


def test_constants():
    assert wire.MAGIC == b"FBF1" and wire.VERSION == 1 and wire.HEADER_SIZE == 24
    assert (wire.KIND_WRITE, wire.KIND_READ, wire.KIND_DATA, wire.KIND_ACK) == (1, 2, 3, 4)
    assert wire.CONTENT_TYPE == "application/x-fabric-frame"
    assert wire.TO_END == U64


@pytest.mark.parametrize("name", GOLDEN)
def test_encode_matches_golden(name):
    frame, kind, items, payloads = GOLDEN[name]
    assert wire.encode(kind, items, _payloads(kind, payloads)) == frame
    # bytes handles encode the same as str handles
    assert wire.encode(kind, [(hd.encode(), o, n, s) for hd, o, n, s in items], _payloads(kind, payloads)) == frame


@pytest.mark.parametrize("name", GOLDEN)
def test_decode_golden(name):
    frame, kind, items, payloads = GOLDEN[name]
    f = wire.decode(frame)
    assert f.kind == kind
    assert f.items == items
    assert len(f) == len(items)
    assert [bytes(f.data(i)) for i in range(len(f))] == payloads
    assert all(type(it[0]) is str for it in f.items)
    assert wire.frame_length(frame) == len(frame) == wire.frame_length(frame[:24])


@pytest.mark.parametrize("name", GOLDEN)
def test_encode_reserve_matches_golden(name):
    frame, kind, items, payloads = GOLDEN[name]
    out, slots = wire.encode_reserve(kind, items)
    assert type(out) is bytearray and len(slots) == len(items)
    for slot, data in zip(slots, payloads, strict=True):
        assert not slot.readonly and len(slot) == len(data)
        slot[:] = data
    assert bytes(out) == frame


def test_encode_reserve_zeroes_unfilled_slots():
    out, slots = wire.encode_reserve(wire.KIND_DATA, [(b"", 0, 4096, 0)])
    assert bytes(slots[0]) == bytes(4096)
    out, slots = wire.encode_reserve(wire.KIND_DATA, [(b"", 0, 16, 0)], zero=False)
    slots[0][:] = b"x" * 16
    assert wire.decode(out).data(0) == b"x" * 16


# -- round trips ---------------------------------------------------------------

BOUNDARY_U64 = [0, 1, 2**7 - 1, 2**7, 2**7 + 1, 2**16, 2**32 - 1, 2**32, 2**63, U64 - 1, U64]
BOUNDARY_U16 = [0, 1, 2**7 - 1, 2**7 + 1, 404, 2**16 - 1]
HANDLE_LENGTHS = [1, 7, 8, 9, 15, 16, 17, 254, 255]


@pytest.mark.parametrize("offset", BOUNDARY_U64)
@pytest.mark.parametrize("kind", [wire.KIND_READ, wire.KIND_ACK])
def test_round_trip_offsets(kind, offset):
    # keep offset + length within 64 bits (READ's TO_END length is exempt)
    items = [("x" * 9, offset, 0, 0), ("y", 0, U64 - offset, 0)]
    if kind == wire.KIND_READ:
        items.append(("z", offset, U64, 0))
    f = wire.decode(wire.encode(kind, items))
    assert f.items == items


@pytest.mark.parametrize("status", BOUNDARY_U16)
def test_round_trip_status(status):
    items = [("", 1, 0, status), ("", 2, 3, 0)]
    f = wire.decode(wire.encode(wire.KIND_DATA, items, [b"", b"abc"]))
    assert f.items == items and bytes(f.data(1)) == b"abc" and bytes(f.data(0)) == b""


@pytest.mark.parametrize("hlen", HANDLE_LENGTHS)
def test_round_trip_handle_lengths(hlen):
    handle = "".join(chr(33 + i % 90) for i in range(hlen))
    payloads = [bytes(range(256)) * 3, b"", b"z"]
    items = [(handle, 0, len(payloads[0]), 0), (handle[::-1], 2**40, 0, 0), ("q", U64 - 1, 1, 0)]
    frame = wire.encode(wire.KIND_WRITE, items, payloads)
    assert len(frame) == 24 + (24 + (hlen + 7) // 8 * 8) * 2 + 32 + sum(map(len, payloads))
    f = wire.decode(frame)
    assert f.items == items
    assert [bytes(f.data(i)) for i in range(3)] == payloads
    assert bytes(f.data(-1)) == b"z"


def test_round_trip_many_items_and_empty_frame():
    n = 5000
    items = [(f"h{i}", i, i % 7, 0) for i in range(n)]
    payloads = [bytes([i % 251]) * (i % 7) for i in range(n)]
    f = wire.decode(wire.encode(wire.KIND_WRITE, items, payloads))
    assert f.items == items
    assert all(bytes(f.data(i)) == payloads[i] for i in range(0, n, 97))
    empty = wire.decode(wire.encode(wire.KIND_ACK, []))
    assert empty.kind == wire.KIND_ACK and empty.items == [] and len(empty) == 0


def test_encode_accepts_any_sequence_and_buffer():
    items = ((hd, o, n, s) for hd, o, n, s in [("a", 0, 3, 0), ("b", 3, 2, 0)])
    frame = wire.encode(wire.KIND_WRITE, items, iter([bytearray(b"abc"), memoryview(b"xyz")[1:]]))
    f = wire.decode(memoryview(bytearray(frame)))
    assert [bytes(f.data(i)) for i in range(2)] == [b"abc", b"yz"]


def test_data_index_and_read_ack_views():
    f = wire.decode(GOLDEN["read"][0])
    assert bytes(f.data(0)) == b"" and bytes(f.data(-1)) == b""
    for i in (1, -2, 2**40):
        with pytest.raises(IndexError):
            f.data(i)
    with pytest.raises(TypeError):
        wire.Frame()
    assert "READ" in repr(f)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_payloads_equals_every_data_view(name):
    f = wire.decode(GOLDEN[name][0])
    got = f.payloads()
    assert got == [bytes(f.data(i)) for i in range(len(f))]
    assert all(type(b) is bytes for b in got)


# -- zero copy -----------------------------------------------------------------


def test_decode_views_point_into_the_buffer():
    frame = bytearray(GOLDEN["data_batch"][0])
    f = wire.decode(frame)
    v0, v2 = f.data(0), f.data(2)
    assert v0.readonly and v2.readonly
    frame[-5:] = b"HIXYZ"  # write through the source: the views see it
    assert bytes(v0) == b"HI" and bytes(v2) == b"XYZ" and bytes(f.data(2)) == b"XYZ"
    # the source is pinned while the frame or a view lives, released as soon as they go (no cycle)
    with pytest.raises(BufferError):
        frame.extend(b"!")
    del f
    with pytest.raises(BufferError):
        frame.extend(b"!")
    gc.disable()
    try:
        del v0, v2
        frame.extend(b"!")
    finally:
        gc.enable()


def test_decode_from_mmap_is_zero_copy():
    frame = GOLDEN["write"][0]
    with mmap.mmap(-1, len(frame)) as m:
        m[:] = frame
        f = wire.decode(m)
        view = f.data(0)
        m[-3:] = b"XYZ"
        assert bytes(view) == b"XYZ"
        del f, view


def test_decode_of_a_large_frame_does_not_copy_the_payload():
    payload = bytes(32 << 20)
    frame = wire.encode(wire.KIND_WRITE, [("h", 0, len(payload), 0)], [payload])
    del payload
    tracemalloc.start()
    try:
        f = wire.decode(frame)
        view = f.data(0)
        assert len(view) == 32 << 20
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10


def test_decode_error_paths_release_the_buffer():
    # every rejected frame must let go of its source (a bytearray resizes only without exports)
    for _name, frame, _exc, kw in HOSTILE:
        buf = bytearray(frame)
        with pytest.raises((InvalidFrame, TooLarge)):
            wire.decode(buf, **kw)
        buf.extend(b"!")  # raises BufferError if an export leaked
    buf = bytearray(GOLDEN["read"][0])
    wire.decode(buf)
    buf.extend(b"!")  # READ frames lend nothing and hold nothing


# -- hostile input -------------------------------------------------------------


def _patch(frame: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(frame)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


READ, DATA, WRITE, ACK, BATCH = (GOLDEN[k][0] for k in ("read", "data", "write", "ack", "data_batch"))
ITEM0 = 24  # offset of the first item in the frame

# (name, frame, expected exception, decode kwargs)
HOSTILE = [
    ("empty", b"", InvalidFrame, {}),
    ("short header", READ[:23], InvalidFrame, {}),
    ("bad magic", b"FBF2" + READ[4:], InvalidFrame, {}),
    ("lowercase magic", b"fbf1" + READ[4:], InvalidFrame, {}),
    ("version 0", _patch(READ, 4, "<B", 0), InvalidFrame, {}),
    ("version 2", _patch(READ, 4, "<B", 2), InvalidFrame, {}),
    ("version 255", _patch(READ, 4, "<B", 255), InvalidFrame, {}),
    ("kind 0", _patch(READ, 5, "<B", 0), InvalidFrame, {}),
    ("kind 5", _patch(READ, 5, "<B", 5), InvalidFrame, {}),
    ("kind 255", _patch(READ, 5, "<B", 255), InvalidFrame, {}),
    ("flags 1", _patch(READ, 6, "<H", 1), InvalidFrame, {}),
    ("flags 0x8000", _patch(READ, 6, "<H", 0x8000), InvalidFrame, {}),
    ("item_count 2^32-1, tiny buffer", _patch(READ, 8, "<I", U32), TooLarge, {}),
    ("item_count 2^32-1, no item limit", _patch(READ, 8, "<I", U32), InvalidFrame, {"max_items": U64}),
    ("item_count above max_items", _patch(READ, 8, "<I", 2), TooLarge, {"max_items": 1}),
    ("item_count 0 with a table", _patch(READ, 8, "<I", 0), InvalidFrame, {}),
    ("item_count 2, one item", _patch(READ, 8, "<I", 2), InvalidFrame, {}),
    ("items_length 2^32-1", _patch(READ, 12, "<I", U32), TooLarge, {}),
    ("items_length 2^32-8, no limit", _patch(READ, 12, "<I", U32 - 7), InvalidFrame, {"max_items": U64}),
    ("items_length not a multiple of 8", _patch(READ, 12, "<I", 33), InvalidFrame, {}),
    ("items_length too short", _patch(READ, 12, "<I", 16), InvalidFrame, {}),
    ("items_length past the frame", _patch(READ, 12, "<I", 40), InvalidFrame, {}),
    ("items_length short of the items", _patch(DATA + bytes(8), 12, "<I", 32), InvalidFrame, {}),
    ("payload_length 2^64-1", _patch(DATA, 16, "<Q", U64), TooLarge, {}),
    ("payload_length 2^64-1, no limit", _patch(DATA, 16, "<Q", U64), TooLarge, {"max_payload": U64}),
    ("payload_length 2^64-25, no limit", _patch(DATA, 16, "<Q", U64 - 24 - 24), InvalidFrame, {"max_payload": U64}),
    ("payload above max_payload", DATA, TooLarge, {"max_payload": 4}),
    ("payload_length past the frame", _patch(DATA, 16, "<Q", 6), InvalidFrame, {}),
    ("READ with a payload", _patch(READ + b"x", 16, "<Q", 1), InvalidFrame, {}),
    ("ACK with a payload", _patch(ACK + b"x", 16, "<Q", 1), InvalidFrame, {}),
    ("handle_len 256", _patch(READ, ITEM0, "<H", 256), InvalidFrame, {}),
    ("handle_len 65535", _patch(READ, ITEM0, "<H", 65535), InvalidFrame, {}),
    ("handle_len past the table", _patch(READ, ITEM0, "<H", 9), InvalidFrame, {}),
    ("handle_len short of the table", _patch(BATCH, 80, "<H", 8), InvalidFrame, {}),
    ("READ item without handle", _patch(_patch(READ[:-8], ITEM0, "<H", 0), 12, "<I", 24), InvalidFrame, {}),
    ("WRITE item without handle", _patch(WRITE, ITEM0, "<H", 0), InvalidFrame, {}),
    ("reserved not zero", _patch(READ, ITEM0 + 4, "<I", 1), InvalidFrame, {}),
    ("reserved high bit", _patch(READ, ITEM0 + 7, "<B", 0x80), InvalidFrame, {}),
    ("non-zero padding", READ[:-1] + b"\x01", InvalidFrame, {}),
    ("non-zero padding, batch", _patch(BATCH, 79, "<B", 0x20), InvalidFrame, {}),
    ("non-ASCII handle", READ[:-8] + b"n1:blk\xb7\0", InvalidFrame, {}),
    ("lengths sum above payload_length", _patch(DATA, ITEM0 + 16, "<Q", 6), InvalidFrame, {}),
    ("lengths sum below payload_length", _patch(DATA, ITEM0 + 16, "<Q", 4), InvalidFrame, {}),
    ("length 2^64-1 in DATA", _patch(DATA, ITEM0 + 16, "<Q", U64), InvalidFrame, {}),
    ("batch lengths wrap", _patch(_patch(BATCH, 24 + 16, "<Q", U64 - 1), 80 + 16, "<Q", 8),
     InvalidFrame, {}),
    ("DATA error item with data", _patch(DATA, ITEM0 + 2, "<H", 404), InvalidFrame, {}),
    ("offset + length wraps", _patch(DATA, ITEM0 + 8, "<Q", U64 - 2), InvalidFrame, {}),
    ("READ offset + length wraps", _patch(READ, ITEM0 + 16, "<Q", U64 - 1), InvalidFrame, {}),
    ("trailing byte", READ + b"\0", InvalidFrame, {}),
    ("two frames", READ + READ, InvalidFrame, {}),
]


@pytest.mark.parametrize("name, frame, exc, kw", HOSTILE, ids=[x[0] for x in HOSTILE])
def test_hostile_frames_are_rejected(name, frame, exc, kw):
    with pytest.raises(exc) as info:
        wire.decode(frame, **kw)
    assert type(info.value) is exc  # TooLarge is not an InvalidFrame, and the other way round
    assert info.value.code == (413 if exc is TooLarge else 400)


@pytest.mark.parametrize("name", GOLDEN)
def test_truncated_at_every_byte_is_rejected(name):
    frame = GOLDEN[name][0]
    for cut in range(len(frame)):
        with pytest.raises(InvalidFrame):
            wire.decode(frame[:cut])
        with pytest.raises(InvalidFrame):
            wire.decode(memoryview(frame)[:cut])


@pytest.mark.parametrize("name", ["read", "data_batch"])
def test_every_single_bit_flip_is_handled(name):
    # not every flip is invalid (an offset may change), but none may crash or be misread silently
    frame = GOLDEN[name][0]
    for i in range(len(frame)):
        for bit in range(8):
            b = bytearray(frame)
            b[i] ^= 1 << bit
            try:
                f = wire.decode(bytes(b))
            except (InvalidFrame, TooLarge):
                continue
            assert wire.encode(f.kind, f.items, _payloads(f.kind, [f.data(k) for k in range(len(f))])) == bytes(b)


# (frame, decode kwargs, whether its header alone is already invalid)
FAIL_FAST = [
    (_patch(READ, 8, "<I", U32), {}, True),
    (_patch(READ, 8, "<I", U32), {"max_items": U64}, True),
    (_patch(_patch(READ, 8, "<I", U32), 12, "<I", U32 - 7), {"max_items": U64, "max_payload": U64}, True),
    (_patch(DATA, 16, "<Q", U64), {"max_payload": U64}, True),
    (_patch(DATA, 16, "<Q", 2**40), {"max_payload": U64}, False),
]


@pytest.mark.parametrize("frame, kw, header_invalid", FAIL_FAST)
def test_hostile_counts_fail_fast_without_allocating(frame, kw, header_invalid):
    decoder = wire.FrameDecoder(**kw)
    tracemalloc.start()
    try:
        # 200 rounds: a decoder that walked a hostile count (up to 2**32 items) instead of
        # refusing it would run for minutes and hit the suite's timeout; no clock is read
        # here (speed is bench/'s business, a timed assertion is flaky on a shared machine)
        for _ in range(200):
            with pytest.raises((InvalidFrame, TooLarge)):
                wire.decode(frame, **kw)
            with pytest.raises((InvalidFrame, TooLarge)):
                wire.decode(frame[:24], **kw)
        if header_invalid:
            # the streaming decoder judges the header before sizing any buffer from it
            with pytest.raises((InvalidFrame, TooLarge)):
                decoder.feed(frame[:24])
            with pytest.raises((InvalidFrame, TooLarge)):
                wire.frame_length(frame[:24], **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, peak


def test_limits_are_inclusive():
    frame = GOLDEN["data_batch"][0]
    assert len(wire.decode(frame, max_items=3, max_payload=5)) == 3
    with pytest.raises(TooLarge):
        wire.decode(frame, max_items=2)
    with pytest.raises(TooLarge):
        wire.decode(frame, max_payload=4)
    assert wire.frame_length(frame, max_items=3, max_payload=5) == len(frame)
    with pytest.raises(TooLarge):
        wire.frame_length(frame, max_payload=4)


def test_frame_length_validates_the_header():
    with pytest.raises(InvalidFrame):
        wire.frame_length(READ[:23])
    with pytest.raises(InvalidFrame):
        wire.frame_length(b"XXXX" + READ[4:24])
    with pytest.raises(TooLarge):
        wire.frame_length(_patch(DATA, 16, "<Q", U64)[:24])


# -- encoder arguments ---------------------------------------------------------

# (name, encode args, exception, whether encode_reserve(kind, items) raises it too)
BAD_ENCODE = [
    ("unknown kind", (0, [("h", 0, 0, 0)], None), ValueError, True),
    ("kind 5", (5, [], None), ValueError, True),
    ("item not a 4-tuple", (wire.KIND_READ, [("h", 0, 0)], None), ValueError, True),
    ("handle int", (wire.KIND_READ, [(7, 0, 0, 0)], None), TypeError, True),
    ("handle non-ASCII", (wire.KIND_READ, [("h\u00e9", 0, 0, 0)], None), ValueError, True),
    ("handle bytes non-ASCII", (wire.KIND_READ, [(b"h\xe9", 0, 0, 0)], None), ValueError, True),
    ("handle 256", (wire.KIND_READ, [("h" * 256, 0, 0, 0)], None), ValueError, True),
    ("READ empty handle", (wire.KIND_READ, [("", 0, 0, 0)], None), ValueError, True),
    ("WRITE empty handle", (wire.KIND_WRITE, [("", 0, 0, 0)], None), ValueError, True),
    ("negative offset", (wire.KIND_READ, [("h", -1, 0, 0)], None), ValueError, True),
    ("offset 2^64", (wire.KIND_READ, [("h", 2**64, 0, 0)], None), ValueError, True),
    ("float length", (wire.KIND_READ, [("h", 0, 1.0, 0)], None), ValueError, True),
    ("status 2^16", (wire.KIND_ACK, [("", 0, 0, 2**16)], None), ValueError, True),
    ("negative status", (wire.KIND_ACK, [("", 0, 0, -1)], None), ValueError, True),
    ("offset + length wraps", (wire.KIND_ACK, [("", 2, U64 - 1, 0)], None), ValueError, True),
    ("DATA error with data", (wire.KIND_DATA, [("", 0, 1, 404)], [b"x"]), ValueError, True),
    ("payload sum overflows", (wire.KIND_WRITE, [("h", 0, U64, 0), ("h", 0, 1, 0)], None), TooLarge, True),
    ("WRITE without payloads", (wire.KIND_WRITE, [("h", 0, 1, 0)], None), ValueError, False),
    ("payload count", (wire.KIND_WRITE, [("h", 0, 1, 0)], [b"x", b"y"]), ValueError, False),
    ("payload length", (wire.KIND_WRITE, [("h", 0, 2, 0)], [b"x"]), ValueError, False),
    ("payload not a buffer", (wire.KIND_WRITE, [("h", 0, 1, 0)], ["x"]), TypeError, False),
    ("READ with payloads", (wire.KIND_READ, [("h", 0, 1, 0)], [b"x"]), ValueError, False),
]


@pytest.mark.parametrize("name, args, exc, reserve_too", BAD_ENCODE, ids=[x[0] for x in BAD_ENCODE])
def test_encode_rejects_bad_arguments(name, args, exc, reserve_too):
    with pytest.raises(exc):
        wire.encode(*args)
    if reserve_too:
        with pytest.raises(exc):
            wire.encode_reserve(args[0], args[1])


def test_encode_survives_a_list_changed_by_index():
    items: list = []

    class Sneaky:
        def __index__(self) -> int:
            items.clear()
            return 1

    items.extend([("h" * 200, Sneaky(), 0, 0), ("g" * 200, 0, 0, 0)])
    with pytest.raises(RuntimeError):
        wire.encode(wire.KIND_READ, items)


def test_empty_payloads_may_be_omitted():
    assert wire.encode(wire.KIND_DATA, [("", 0, 0, 404)]) == wire.encode(wire.KIND_DATA, [("", 0, 0, 404)], [b""])


# -- streaming -----------------------------------------------------------------

STREAM = [GOLDEN[k][0] for k in ("read", "data", "write", "ack", "data_batch", "read_to_end")]
STREAM.append(wire.encode(wire.KIND_WRITE, [("big", 0, 100_000, 0)], [bytes(range(256)) * 390 + bytes(160)]))
STREAM.append(wire.encode(wire.KIND_ACK, []))
STREAM_BYTES = b"".join(STREAM)


def _check_frames(frames: list) -> None:
    assert len(frames) == len(STREAM)
    for f, raw in zip(frames, STREAM, strict=True):
        ref = wire.decode(raw)
        assert f.kind == ref.kind and f.items == ref.items
        assert [bytes(f.data(i)) for i in range(len(f))] == [bytes(ref.data(i)) for i in range(len(ref))]


def test_decoder_byte_by_byte():
    dec = wire.FrameDecoder()
    frames = []
    for i in range(len(STREAM_BYTES)):
        frames += dec.feed(STREAM_BYTES[i:i + 1])
        assert dec.pending() == (i + 1) - sum(map(len, STREAM[: len(frames)]))
    _check_frames(frames)
    assert dec.pending() == 0


@pytest.mark.parametrize("seed", range(20))
def test_decoder_random_chunks(seed):
    rng = random.Random(seed)
    dec = wire.FrameDecoder()
    frames, pos = [], 0
    while pos < len(STREAM_BYTES):
        n = rng.choice([1, 2, 7, 23, 24, 25, 100, 4096, 50_000, 200_000])
        chunk = STREAM_BYTES[pos:pos + n]
        # mutable chunks are copied (the caller may reuse them); bytes are decoded in place
        frames += dec.feed(bytearray(chunk) if rng.random() < 0.3 else chunk)
        pos += n
    _check_frames(frames)
    assert dec.pending() == 0


def test_decoder_several_frames_in_one_chunk_and_empty_feeds():
    dec = wire.FrameDecoder()
    assert dec.feed(b"") == [] and dec.pending() == 0
    _check_frames(dec.feed(STREAM_BYTES))
    assert dec.feed(memoryview(b"")) == []
    # a whole stream with a partial frame at the end
    frames = dec.feed(STREAM_BYTES + READ[:30])
    assert len(frames) == len(STREAM) and dec.pending() == 30
    assert [f.items for f in dec.feed(READ[30:])] == [GOLDEN["read"][2]]


def test_decoder_copies_mutable_chunks():
    dec = wire.FrameDecoder()
    buf = bytearray(GOLDEN["write"][0])
    (f,) = dec.feed(buf)
    buf[-3:] = b"XYZ"
    buf.extend(b"!")  # not pinned: the frame has its own copy
    assert bytes(f.data(0)) == b"abc"


@pytest.mark.parametrize("name, frame, exc", [
    ("bad magic", b"XBF1" + READ[4:], InvalidFrame),
    ("flags", _patch(READ, 6, "<H", 4), InvalidFrame),
    ("payload 1 GiB", _patch(DATA, 16, "<Q", 1 << 30), TooLarge),
    ("payload 2^64-1", _patch(DATA, 16, "<Q", U64), TooLarge),
    ("item_count 2^32-1", _patch(READ, 8, "<I", U32), TooLarge),
])
def test_decoder_rejects_hostile_header_before_the_rest(name, frame, exc):
    dec = wire.FrameDecoder()
    for i in range(23):
        assert dec.feed(frame[i:i + 1]) == []
    assert dec.pending() == 23
    tracemalloc.start()
    try:
        with pytest.raises(exc):
            dec.feed(frame[23:24])  # the 24th byte: the header is judged now
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10
    # the stream's framing is lost: the decoder stays failed
    with pytest.raises(InvalidFrame):
        dec.feed(frame[24:])
    # in one chunk, with a valid frame before it: rejected too
    with pytest.raises(exc):
        wire.FrameDecoder().feed(READ + frame[:24])


def test_decoder_rejects_a_bad_body_when_it_completes():
    dec = wire.FrameDecoder()
    bad = READ[:-1] + b"\x01"  # non-zero padding
    assert dec.feed(bad[:-1]) == []
    with pytest.raises(InvalidFrame):
        dec.feed(bad[-1:])
    assert dec.pending() == 0


def test_decoder_limits():
    frame = GOLDEN["data_batch"][0]
    with pytest.raises(TooLarge):
        wire.FrameDecoder(max_items=2).feed(frame)
    with pytest.raises(TooLarge):
        wire.FrameDecoder(max_payload=4).feed(frame[:24])
    assert len(wire.FrameDecoder(max_items=3, max_payload=5).feed(frame)) == 1


# -- the allocator's and the client's hot paths --------------------------------


def test_allocator_read_path():
    token = "v1:node-a:3:4160:17:rw:" + "0" * 32
    req = wire.encode(wire.KIND_READ, [(token, 10, 1024, 0)])
    frame = wire.decode(req)
    assert frame.kind == wire.KIND_READ and frame.items == [(token, 10, 1024, 0)]
    out, slots = wire.encode_reserve(wire.KIND_DATA, [(b"", 10, 1024, 0)])
    slots[0][:] = bytes(range(256)) * 4  # what arena.read_into does
    reply = wire.decode(bytes(out))
    assert reply.items == [("", 10, 1024, 0)] and bytes(reply.data(0)) == bytes(range(256)) * 4


def test_encode_reserve_without_views_puts_the_payload_last():
    items = [(b"", 0, 3, 0), (b"", 0, 0, 404), (b"", 0, 2, 0)]
    out, slots = wire.encode_reserve(wire.KIND_DATA, items, views=False)
    assert slots == []
    out[len(out) - 5:] = b"abcde"
    f = wire.decode(bytes(out))
    assert f.payloads() == [b"abc", b"", b"de"]
    with_views, _ = wire.encode_reserve(wire.KIND_DATA, items)
    assert len(with_views) == len(out)


# -- the batch-read hot path: encode_reads, read_reply_reserve, decode_payloads --

TOKENS = [f"v1:node-a:1:{64 * i}:{i}:rw:" + f"{i:032x}" for i in range(1, 8)]
PARSED = {t: ("node-a", 1, 64 * i, i, "rw", f"{i:032x}") for i, t in enumerate(TOKENS, 1)}


class _Buf:
    def __init__(self, handle: str) -> None:
        self.handle = handle


def test_encode_reads_matches_encode():
    items = [(TOKENS[0], 0, 16), (_Buf(TOKENS[1]), 8, None), (TOKENS[2], 2**40, 0)]
    node, frame = wire.encode_reads(items, PARSED, (_Buf,))
    assert node == "node-a"
    assert frame == wire.encode(wire.KIND_READ, [(TOKENS[0], 0, 16, 0), (TOKENS[1], 8, U64, 0),
                                                 (TOKENS[2], 2**40, 0, 0)])
    many = [(t, i, i + 1) for i, t in enumerate(TOKENS)]  # more items than planned on the stack
    assert wire.encode_reads(tuple(many), PARSED, ())[1] == wire.encode(
        wire.KIND_READ, [(t, o, n, 0) for t, o, n in many])


@pytest.mark.parametrize("items, parsed", [
    ([], PARSED),                                                   # nothing to read
    ([(TOKENS[0], 0, 1, 0)], PARSED),                               # not a 3-tuple
    ([[TOKENS[0], 0, 1]], PARSED),                                  # a list, not a tuple
    ([(TOKENS[0], 0, 1), ("v1:node-a:9:9:9:rw:" + "9" * 32, 0, 1)], PARSED),  # a token never parsed
    ([(TOKENS[0], 0, 1), (TOKENS[1], 0, 1)], {**PARSED, TOKENS[1]: ("node-b", 1, 2, 3, "rw", "")}),  # two nodes
    ([(object(), 0, 1)], PARSED),                                   # neither a token nor a buffer
    ([(_Buf(b"bytes"), 0, 1)], PARSED),                             # a buffer whose handle is not a str
    ([(TOKENS[0], 0, 1)], {TOKENS[0]: "not a tuple"}),
], ids=["empty", "4-tuple", "list item", "unparsed", "two nodes", "object", "bytes handle", "bad parts"])
def test_encode_reads_leaves_the_unusual_to_the_caller(items, parsed):
    assert wire.encode_reads(items, parsed, (_Buf,)) is None
    assert wire.encode_reads(iter([(TOKENS[0], 0, 1)]), PARSED, ()) is None  # not a list or tuple


@pytest.mark.parametrize("item, exc", [
    ((TOKENS[0], -1, 1), ValueError),
    ((TOKENS[0], 0, 2**64), ValueError),
    ((TOKENS[0], 0, 1.5), ValueError),
    ((TOKENS[0], 2**63, 2**63), ValueError),  # offset + length overflow 64 bits
])
def test_encode_reads_rejects_bad_numbers(item, exc):
    with pytest.raises(exc):
        wire.encode_reads([item], PARSED, ())


def test_encode_reads_rejects_a_handle_too_long():
    long = "v1:node-a:" + "x" * 300
    with pytest.raises(ValueError, match="limit is 255"):
        wire.encode_reads([(long, 0, 1)], {long: ("node-a",)}, ())


def test_read_reply_reserve_builds_the_data_frame():
    req = wire.decode(wire.encode(wire.KIND_READ, [(TOKENS[0], 4, 3, 0), (TOKENS[1], 0, 0, 0), (TOKENS[2], 9, 2, 0)]))
    out, at = wire.read_reply_reserve(req, 1 << 20)
    assert isinstance(out, bytearray) and at == wire.HEADER_SIZE + 3 * wire.ITEM_FIXED and len(out) == at + 5
    out[at:] = b"abcde"
    reply = wire.decode(bytes(out))
    assert reply.kind == wire.KIND_DATA
    assert reply.items == [("", 4, 3, 0), ("", 0, 0, 0), ("", 9, 2, 0)]
    assert reply.payloads() == [b"abc", b"", b"de"]
    # exactly max_payload fits, one byte less does not
    assert wire.read_reply_reserve(req, len(out)) is not None
    assert wire.read_reply_reserve(req, len(out) - 1) is None


def test_read_reply_reserve_declines_what_it_cannot_size():
    to_end = wire.decode(wire.encode(wire.KIND_READ, [(TOKENS[0], 0, 1, 0), (TOKENS[1], 0, U64, 0)]))
    assert wire.read_reply_reserve(to_end, 1 << 20) is None
    huge = wire.decode(wire.encode(wire.KIND_READ, [(TOKENS[0], 0, 2**63, 0), (TOKENS[1], 0, 2**63, 0)]))
    assert wire.read_reply_reserve(huge, 1 << 20) is None
    assert wire.read_reply_reserve(huge, U64) is None  # the sum would wrap 64 bits: never allocated
    assert wire.read_reply_reserve(wire.decode(wire.encode(wire.KIND_READ, [])), 1 << 20) is None
    assert wire.read_reply_reserve(wire.decode(GOLDEN["data"][0]), 1 << 20) is None  # not a READ


def test_decode_payloads_matches_decode():
    for name in ("data", "data_batch"):
        frame, _kind, items, payloads = GOLDEN[name]
        got, statuses = wire.decode_payloads(frame)
        assert got == payloads
        expected = [st for _h, _o, _n, st in items]
        assert statuses == (expected if any(expected) else None)
    empty = wire.encode(wire.KIND_DATA, [])
    assert wire.decode_payloads(empty) == ([], None)


@pytest.mark.parametrize("name", ["read", "write", "ack"])
def test_decode_payloads_takes_only_data(name):
    with pytest.raises(InvalidFrame, match="expected a DATA frame"):
        wire.decode_payloads(GOLDEN[name][0])


@pytest.mark.parametrize("name, frame, exc, kw", HOSTILE, ids=[x[0] for x in HOSTILE])
def test_decode_payloads_rejects_hostile_frames(name, frame, exc, kw):
    with pytest.raises((exc, InvalidFrame)) as info:
        wire.decode_payloads(frame, **kw)
    # the same verdict as decode(), or "not a DATA frame" for a well-formed other kind
    assert type(info.value) is exc or "expected a DATA frame" in str(info.value)


@pytest.mark.parametrize("name", ["data", "data_batch"])
def test_decode_payloads_truncated_at_every_byte(name):
    frame = GOLDEN[name][0]
    for cut in range(len(frame)):
        with pytest.raises((InvalidFrame, TooLarge)):
            wire.decode_payloads(frame[:cut])


def test_wire_imports_first_in_a_fresh_interpreter():
    """Each extension imports on its own in a fresh interpreter (it once imported fabric.errors, whose
    package imported the client, which uses wire: a cycle; now fabric_ext imports nothing from fabric)."""
    import subprocess
    import sys

    for mod in ("wire", "arena"):
        out = subprocess.run([sys.executable, "-c", f"from fabric_ext import {mod}; print({mod}.__name__)"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"fabric_ext.{mod}", out.stderr
