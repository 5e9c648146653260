"""One set of rules for every frame codec of fabric.protocol (docs/protocol.md "Reading a frame").

Each codec -- FJB1/FJR1 (job batches), FCLJ/FCLR (OpenCL jobs), and the Cython FBF1 and
worker protocol v1 it re-exports -- refuses the same things with InvalidFrame: any
truncation (cut at every offset), a length running past the end, a count that cannot
fit or exceeds its limit, a bad magic/version, and trailing bytes.  Round trips and
the documented golden vectors check that good frames still pass.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fabric.errors import InvalidFrame
from fabric.protocol import clframes, headers, jobframes
from fabric.protocol import wire as pwire
from fabric.protocol.reader import Reader
from fabric_ext import wire

pytestmark = pytest.mark.unit


def _refuses_every_cut_and_any_tail(decode: Callable[[Any], Any], frame: bytes) -> None:
    """*frame* decodes; every proper prefix of it and it plus one byte are InvalidFrame."""
    decode(frame)
    for cut in range(len(frame)):
        with pytest.raises(InvalidFrame):
            decode(frame[:cut])
    with pytest.raises(InvalidFrame, match="trailing bytes"):
        decode(frame + b"\0")
    with pytest.raises(InvalidFrame, match="trailing bytes"):
        decode(frame + b"junk")


# -- the shared reader -----------------------------------------------------------------------


def test_the_reader_names_the_field_and_offset_of_a_short_read() -> None:
    r = Reader(b"FJB1\x01\x00", "test frame")
    r.magic(b"FJB1")
    with pytest.raises(InvalidFrame, match=r"^truncated test frame: count needs 4 bytes at offset 4, only 2 left$"):
        r.unpack(struct.Struct("<I"), "count")
    assert r.pos == 4  # a failed read moves nothing


def test_the_reader_refuses_a_table_that_cannot_fit_before_reading_it() -> None:
    r = Reader(b"\0" * 20, "test frame")
    with pytest.raises(InvalidFrame, match=r"1000000 lengths of 8 bytes need 8000000 bytes at offset 0, only 20 left"):
        r.table(1_000_000, struct.Struct("<Q"), "lengths")


def test_the_reader_refuses_trailing_bytes_and_bad_magic() -> None:
    r = Reader(b"ABCDxyz", "test frame")
    with pytest.raises(InvalidFrame, match=r"magic b'ABCD' at offset 0, expected b'FJB1'"):
        r.magic(b"FJB1")
    r = Reader(b"ABCDxyz", "test frame")
    r.take(4, "magic")
    with pytest.raises(InvalidFrame, match=r"^3 trailing bytes after test frame of 4 bytes$"):
        r.end()


# -- FJB1 / FJR1 ---------------------------------------------------------------------------------

BATCHES = [[], [b""], [b"a"], [b"x" * 100, b"", b"yz"], [bytes([i]) * i for i in range(40)]]


@pytest.mark.parametrize("items", BATCHES)
def test_job_frames_round_trip_and_refuse_every_cut_and_tail(items: list[bytes]) -> None:
    batch = jobframes.encode_job_batch(items)
    assert [bytes(v) for v in jobframes.decode_job_batch(batch)] == items
    _refuses_every_cut_and_any_tail(jobframes.decode_job_batch, batch)
    results = [(i - 3, 0 if i % 2 else 500, x) for i, x in enumerate(items)]
    reply = jobframes.encode_job_results(results)
    assert [(a, b, bytes(c)) for a, b, c in jobframes.decode_job_results(reply)] == results
    _refuses_every_cut_and_any_tail(jobframes.decode_job_results, reply)
    assert len(reply) == jobframes.results_frame_size(len(items), sum(map(len, items)))


def test_job_frames_match_the_documented_worked_example() -> None:
    request = bytes.fromhex("464a4231 02000000 0200000000000000 0000000000000000 6162".replace(" ", ""))
    reply = bytes.fromhex(("464a5231 02000000 00000000 00000000 0200000000000000"
                           " 00000000 00000000 0000000000000000 6162").replace(" ", ""))
    assert jobframes.encode_job_batch([b"ab", b""]) == request
    assert jobframes.encode_job_results([(0, 0, b"ab"), (0, 0, b"")]) == reply
    assert [bytes(v) for v in jobframes.decode_job_batch(request)] == [b"ab", b""]


@pytest.mark.parametrize(("decode", "frame", "why"), [
    (jobframes.decode_job_batch, b"FJB2\0\0\0\0", "magic b'FJB2' at offset 0"),
    (jobframes.decode_job_results, b"FJB1\0\0\0\0", "magic b'FJB1' at offset 0, expected b'FJR1'"),
    (jobframes.decode_job_batch, b"FJB1" + struct.pack("<I", 65537), "count 65537 exceeds the limit of 65536"),
    (jobframes.decode_job_results, b"FJR1" + struct.pack("<I", 2**32 - 1), "exceeds the limit of 65536"),
    (jobframes.decode_job_batch, b"FJB1" + struct.pack("<I", 65536), "65536 lengths of 8 bytes need 524288"),
    (jobframes.decode_job_results, b"FJR1" + struct.pack("<I", 3) + bytes(16), "3 results of 16 bytes"),
    (jobframes.decode_job_batch, b"FJB1\1\0\0\0" + struct.pack("<Q", 5) + b"abc",
     "job 0 needs 5 bytes at offset 16, only 3 left"),
    (jobframes.decode_job_batch, b"FJB1\1\0\0\0" + struct.pack("<Q", 2**64 - 1), "job 0 needs 18446744073709551615"),
    (jobframes.decode_job_results, b"FJR1\1\0\0\0" + struct.pack("<iIQ", 0, 0, 2**63) + b"x",
     "output 0 needs 9223372036854775808 bytes at offset 24, only 1 left"),
    (jobframes.decode_job_batch, b"FJB1\0\0\0\0extra", "5 trailing bytes after job batch frame of 8 bytes"),
    (jobframes.decode_job_results, jobframes.encode_job_results([(0, 0, b"ok")]) + b"!",
     "1 trailing bytes after job results frame of 26 bytes"),
])
def test_hostile_job_frames_are_invalid_frames(decode: Callable[[Any], Any], frame: bytes, why: str) -> None:
    with pytest.raises(InvalidFrame, match=why.replace("(", r"\(").replace(")", r"\)")):
        decode(frame)


def test_a_job_batch_takes_any_buffer() -> None:
    arr = np.arange(3, dtype=np.float64)
    frame = jobframes.encode_job_batch([arr, memoryview(b"ab"), bytearray(b"c")])
    got = jobframes.decode_job_batch(memoryview(frame))
    assert [bytes(v) for v in got] == [arr.tobytes(), b"ab", b"c"]


# -- FCLJ / FCLR -----------------------------------------------------------------------------------


def _job(inline: bool = True) -> bytearray:
    from fabric.opencl import Arg, InArg, JobHeader, NumberArg, OutArg, Staging, encode_job

    a, b = np.arange(5, dtype=np.float32), np.arange(3, dtype=np.int32)
    args: list[Arg] = [InArg("<f4", [5], 0, 20), InArg("<i4", [3], 32, 12), OutArg("<f4", [5]), NumberArg(2)]
    if not inline:
        return encode_job(JobHeader(source="k", kernel="f", global_size=[5], args=args,
                                    staging=Staging(name="fabric-stage-1-" + "0" * 32, nonce=bytes(16), size=1 << 20)))
    return encode_job(JobHeader(source="k", kernel="f", global_size=[5], args=args), [(0, a), (32, b)])


def _result() -> bytearray:
    from fabric.opencl import DeviceInfo, OutInfo, ResultHeader, encode_result

    outs = [OutInfo("<f4", [5], 0, 20), OutInfo("<f4", [2], 0, 8, staged=True), OutInfo("<i8", [1], 32, 8)]
    frame, start = encode_result(ResultHeader(device=DeviceInfo(0, 0), outputs=outs), 40)
    frame[start:start + 20] = np.arange(5, dtype=np.float32).tobytes()
    return frame


def test_opencl_frames_round_trip_and_refuse_every_cut_and_tail() -> None:
    from fabric.opencl import InArg, decode_job, decode_result

    for job in (_job(), _job(inline=False)):
        _refuses_every_cut_and_any_tail(decode_job, bytes(job))
    header, data = decode_job(_job())
    assert len(data) == 44 and bytes(data[:20]) == np.arange(5, dtype=np.float32).tobytes()
    assert [a.nbytes for a in header.args if isinstance(a, InArg)] == [20, 12]
    assert len(decode_job(_job(inline=False))[1]) == 0
    _refuses_every_cut_and_any_tail(decode_result, bytes(_result()))
    header_r, data_r = decode_result(_result())
    assert len(data_r) == 40 and [o.staged for o in header_r.outputs] == [False, True, False]


def test_opencl_frames_refuse_what_the_layout_forbids() -> None:
    from fabric.opencl import InArg, JobHeader, decode_job, encode_job

    good = bytes(_job())
    hlen = int.from_bytes(good[8:12], "little")
    cases = {
        "magic b'FCLR' at offset 0, expected b'FCLJ'": b"FCLR" + good[4:],
        "version 2 at offset 4, expected 1": good[:4] + b"\2\0" + good[6:],
        "flags 1 at offset 6, expected 0": good[:6] + b"\1\0" + good[8:],
        "reserved 7 at offset 12, expected 0": good[:12] + b"\7\0\0\0" + good[16:],
        "header length 16777217 exceeds the limit of 16777216": good[:8] + struct.pack("<I", (16 << 20) + 1)
        + good[12:],
        f"non-zero padding at offset {16 + hlen}": good[:16 + hlen] + b"\1" + good[17 + hlen:],
    }
    for why, frame in cases.items():
        with pytest.raises(InvalidFrame, match=why.replace("(", r"\(")):
            decode_job(frame)
    # an input the header places past the inline data, and inline data a staged job must not have
    past = encode_job(JobHeader(source="k", kernel="f", global_size=[1], args=[InArg("<f4", [4], 8, 16)]),
                      [(0, bytes(16))])
    with pytest.raises(InvalidFrame, match=r"inline buffer 0 at 8\.\.24 runs past the 16 bytes of inline data"):
        decode_job(past)
    with pytest.raises(InvalidFrame, match="16 trailing bytes after OpenCL job frame's inline data of 0 bytes"):
        decode_job(bytes(_job(inline=False)) + bytes(16))


def test_the_opencl_layout_is_the_documented_one() -> None:
    frame, start = clframes.pack_frame(clframes.JOB_MAGIC, b"\x80", 3)  # an empty MessagePack map, 3 data bytes
    assert bytes(frame) == b"FCLJ\1\0\0\0\1\0\0\0\0\0\0\0\x80" + bytes(15) + bytes(3) and start == 32
    header, data = clframes.unpack_frame(frame, clframes.JOB_MAGIC)
    assert bytes(header) == b"\x80" and len(data) == 3
    clframes.check_inline(data, [(0, 1), (1, 2)], "frame")
    with pytest.raises(InvalidFrame, match="1 trailing bytes"):
        clframes.check_inline(data, [(0, 2)], "frame")


# -- FBF1 and worker protocol v1 (fabric_ext.wire, re-exported) -------------------------------------


def test_the_cython_codecs_are_found_in_the_protocol_package_and_follow_the_rules() -> None:
    assert pwire.decode is wire.decode and pwire.v1_parse is wire.v1_parse and pwire.MAGIC == b"FBF1"
    assert headers.FRAME_CONTENT_TYPE == wire.CONTENT_TYPE  # spelled twice: fabric_ext imports nothing of fabric
    data = pwire.encode(pwire.KIND_WRITE, [("n1:blk7", 16, 5, 0)], [b"hello"])
    _refuses_every_cut_and_any_tail(pwire.decode, data)
    _refuses_every_cut_and_any_tail(pwire.v1_parse, pwire.v1_job(7, 42, b"hello"))
