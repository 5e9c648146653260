"""Fuzzing the Cython parts (hypothesis): the frame codec, the worker protocol codec, the ring.

Each takes bytes from outside: a frame from any NATS client, a worker's reply from a
process that may be buggy, a ring record from a process that may write garbage into the
shared segment.  Generated input -- random bytes, valid encodings mutated (bits flipped,
cut short, lengths patched), fed whole and in random chunks -- must either decode to
what was meant or raise the codec's documented error; never crash, never read past the
buffer.  tests/sanitize.sh runs this module under AddressSanitizer and UBSan, where an
out-of-bounds read is an abort, not luck.  Bounded: ``FUZZ_EXAMPLES`` examples a test.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.errors import InvalidFrame, TooLarge
from fabric_ext import ring, wire

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

handles = st.text(alphabet="v1:abcdef0123456789rw", min_size=0, max_size=40)
items = st.lists(st.tuples(handles, st.integers(0, 2**40), st.integers(0, 4096), st.integers(0, 255)),
                 max_size=6)


@st.composite
def mutated(draw: st.DrawFn, frame: bytes) -> bytes:
    """*frame* with some of: bytes flipped, a tail cut, a 4- or 8-byte field overwritten."""
    b = bytearray(frame)
    for _ in range(draw(st.integers(0, 4))):
        if not b:
            break
        op = draw(st.sampled_from(["flip", "cut", "u32", "u64", "append"]))
        i = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del b[i:]
        elif op == "u32" and i + 4 <= len(b):
            struct.pack_into("<I", b, i, draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, len(b), len(b) + 1])))
        elif op == "u64" and i + 8 <= len(b):
            struct.pack_into("<Q", b, i, draw(st.sampled_from([0, 2**63, 2**64 - 1, len(b) * 2])))
        else:
            b += draw(st.binary(max_size=16))
    return bytes(b)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([wire.KIND_READ, wire.KIND_WRITE, wire.KIND_DATA]))
    its = draw(items)
    payloads = [draw(st.binary(max_size=64)) for _ in its] if kind != wire.KIND_READ else None
    try:
        frame = wire.encode(kind, its, payloads)
    except (InvalidFrame, TooLarge, ValueError, OverflowError):
        frame = draw(st.binary(max_size=128))
    return draw(mutated(frame))


@fuzz
@given(data=st.one_of(st.binary(max_size=512), frames()))
def test_frame_decode_takes_anything(data: bytes) -> None:
    try:
        frame = wire.decode(data, max_items=64, max_payload=1 << 16)
    except (InvalidFrame, TooLarge):
        return
    # what decoded is consistent: every item and payload can be read
    for i in range(len(frame)):
        frame.data(i).tobytes() if frame.kind != wire.KIND_READ else None
    assert len(frame.items) == len(frame)


@fuzz
@given(data=st.one_of(st.binary(max_size=512), frames()), cuts=st.lists(st.integers(1, 64), max_size=8))
def test_frame_streaming_decoder_takes_anything_in_any_chunks(data: bytes, cuts: list[int]) -> None:
    dec = wire.FrameDecoder(max_items=64, max_payload=1 << 16)
    pos = 0
    try:
        for n in [*cuts, len(data)]:
            for frame in dec.feed(data[pos:pos + n]):
                assert len(frame.items) == len(frame)
            pos += n
    except (InvalidFrame, TooLarge):
        return
    assert dec.pending() >= 0


@st.composite
def v1_frames(draw: st.DrawFn) -> bytes:
    mid = draw(st.integers(0, 2**32 - 1))
    body = draw(st.binary(max_size=64))
    frame = draw(st.sampled_from([
        lambda: wire.v1_version(mid), lambda: wire.v1_core(mid, "core", body), lambda: wire.v1_job(mid, 7, body),
        lambda: wire.v1_ok(mid, body), lambda: wire.v1_error(mid, "boom"),
        lambda: wire.v1_job_result(mid, draw(st.integers(-(2**31), 2**31 - 1)), body)]))()
    return draw(mutated(frame))


V1_ERRORS = (wire.V1InvalidFrame, wire.V1TooLarge, InvalidFrame, TooLarge)


@fuzz
@given(data=st.one_of(st.binary(max_size=256), v1_frames()), cuts=st.lists(st.integers(1, 32), max_size=8))
def test_worker_protocol_decoder_takes_anything(data: bytes, cuts: list[int]) -> None:
    dec = wire.V1Decoder(max_payload=1 << 16)
    pos = 0
    try:
        for n in [*cuts, len(data)]:
            for frame in dec.feed(data[pos:pos + n]):
                payload = bytes(frame.payload)
                for parse in (wire.v1_parse_version, wire.v1_parse_core, wire.v1_parse_job,
                              wire.v1_parse_job_result, wire.v1_parse_error):
                    try:
                        parse(payload)
                    except V1_ERRORS:
                        pass
            pos += n
    except V1_ERRORS:
        return


@pytest.fixture
def ring_path(tmp_path: Path) -> str:
    return str(tmp_path / "fuzz.ring")


@fuzz
@given(records=st.lists(st.binary(max_size=300), min_size=1, max_size=12),
       garbage=st.lists(st.tuples(st.integers(0, (1 << 12) + 127), st.binary(min_size=1, max_size=8)), max_size=6))
def test_ring_survives_garbage_written_into_the_segment(tmp_path_factory: pytest.TempPathFactory,
                                                        records: list[bytes],
                                                        garbage: list[tuple[int, bytes]]) -> None:
    """Records pushed, then bytes of the segment overwritten (a buggy peer): the consumer gets records back or
    raises RingError (corrupt record skipped, implausible counters reported); it never crashes or hangs."""
    path = str(tmp_path_factory.mktemp("fuzzring") / "r")
    ring.create(path, 1 << 12, crc=True)
    try:
        with ring.Producer(path) as prod, ring.Consumer(path) as cons:
            for r in records:
                if not prod.try_push(r):
                    break
            with open(path, "r+b") as f:  # the segment's file: header, counters, records
                for offset, data in garbage:
                    f.seek(offset)
                    f.write(data)
            for _ in range(len(records) + 2):
                try:
                    got = cons.try_pop()
                except ring.RingError:
                    continue
                if got is None:
                    break
                assert isinstance(got, bytes)
    except ring.RingError:
        pass  # a header the garbage made invalid is refused, as it must be
    finally:
        ring.unlink(path)
