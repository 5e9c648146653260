"""Tests of fabric_ext.arena: the shared-memory arena allocator and SegmentView.

Real shared memory throughout: damage is injected by writing the segment file under
/dev/shm directly, crashes by SIGKILLing a real child process.  Every test gets its own
prefix; teardown checks the arena (full walk) and that every block allocated was freed.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import secrets
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fabric.errors import (
    BadRequest,
    Conflict,
    CorruptionDetected,
    DoubleFree,
    OutOfMemory,
    OutOfRange,
    QuotaExceeded,
    StaleHandle,
    TooLarge,
    UnknownHandle,
)
from fabric_ext.arena import MAX_BLOCK_SIZE, SHM_DIR, Arena, SegmentView

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

ROOT = Path(__file__).resolve().parents[1]

# -- boundary tables -------------------------------------------------------------------

SIZES = [0, 1, 15, 16, 17, 2**7 - 1, 2**7, 2**7 + 1, 4096, 2**16, 3 << 20]
HOSTILE_SIZES = [
    (-1, BadRequest),
    (-(2**64), BadRequest),
    (2**63, TooLarge),
    (2**64 - 1, TooLarge),
    (2**64, TooLarge),
    (MAX_BLOCK_SIZE + 1, TooLarge),
    ("16", BadRequest),
    (16.0, BadRequest),
    (None, BadRequest),
]
# (pos, length) against a 100-byte block
BAD_RANGES = [(101, -1), (0, 101), (100, 1), (99, 2), (-1, 1), (0, -2), (2**63, 1), (1, 2**64 - 1), (-(2**64), 0)]
GOOD_RANGES = [(0, -1), (0, 100), (100, 0), (100, -1), (99, 1), (0, 0), (50, 50)]

# block header field offsets, relative to the block's data offset (see arena.pxd)
H_MAGIC, H_STATE, H_SIZE, H_CAPACITY, H_GEN = -64, -62, -48, -40, -32

SMALL = dict(min_segment=1 << 16, max_segment=1 << 20)


def _unique_prefix() -> str:
    return f"fabric-test-{os.getpid()}-{secrets.token_hex(4)}"


def _files(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix + "."))


def assert_clean(a: Arena) -> None:
    """The arena passes a full check and holds no blocks: allocated == freed."""
    a.check()
    st = a.stats()
    assert st["blocks"] == 0, f"test leaked {st['blocks']} blocks"
    assert st["in_use"] == 0
    assert st["alloc_count"] == st["free_count"], "blocks allocated != blocks freed"


@pytest.fixture
def prefix():
    p = _unique_prefix()
    yield p
    for name in _files(p):
        os.unlink(os.path.join(SHM_DIR, name))


@pytest.fixture
def arena(prefix):
    a = Arena(prefix, 64 << 20, **SMALL)
    yield a
    try:
        assert_clean(a)
    finally:
        a.destroy()
    assert _files(prefix) == []


class Shm:
    """Direct access to a segment file, for injecting damage and verifying wipes."""

    def __init__(self, prefix: str, seg: int) -> None:
        with open(f"{SHM_DIR}/{prefix}.{seg}", "r+b") as f:
            self.map = mmap.mmap(f.fileno(), 0)

    def u32(self, at: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<I", self.map, at, value)
        return struct.unpack_from("<I", self.map, at)[0]

    def u16(self, at: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<H", self.map, at, value)
        return struct.unpack_from("<H", self.map, at)[0]

    def u64(self, at: int) -> int:
        return struct.unpack_from("<Q", self.map, at)[0]

    def close(self) -> None:
        self.map.close()


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))  # never 0: a wipe shows


# -- sizes, alignment, round trips -----------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_alloc_round_trip_at_edges(arena, size):
    seg, off, gen = arena.alloc(size)
    assert off % 16 == 0
    assert gen >= 1
    assert arena.size(seg, off, gen) == size
    assert arena.read(seg, off, gen) == bytes(size), "a new block must read as zeros"
    data = pattern(size)
    assert arena.write(seg, off, gen, 0, data) == size
    assert arena.read(seg, off, gen) == data
    if size:
        assert arena.write(seg, off, gen, size - 1, b"\xee") == 1  # last byte
        assert arena.read(seg, off, gen, size - 1, 1) == b"\xee"
        assert arena.read(seg, off, gen, 0, size - 1) == data[:size - 1]
    assert arena.read(seg, off, gen, size, -1) == b""
    assert arena.read(seg, off, gen, size, 0) == b""
    info = arena.info(seg, off, gen)
    assert info["size"] == size and info["generation"] == gen and info["owner"] == ""
    assert info["capacity"] >= size and (info["capacity"] + 8) % 16 == 0
    assert arena.free(seg, off, gen) == size


def test_every_offset_is_16_aligned_and_blocks_do_not_overlap(arena):
    handles = [arena.alloc(n) for n in list(range(0, 300, 7)) + SIZES]
    spans = sorted((s, o, o + arena.size(s, o, g)) for s, o, g in handles)
    assert all(o % 16 == 0 for _, o, _ in handles)
    for (s1, _, e1), (s2, b2, _) in zip(spans, spans[1:], strict=False):
        assert s1 != s2 or e1 + 8 <= b2 - 64, "blocks (with canary and header) overlap"
    for i, h in enumerate(handles):
        arena.write(*h, 0, pattern(arena.size(*h), i))
    for i, h in enumerate(handles):
        assert arena.read(*h) == pattern(arena.size(*h), i), "a write leaked into a neighbour"
        arena.free(*h)


@pytest.mark.parametrize("size, exc", HOSTILE_SIZES)
def test_hostile_sizes(arena, size, exc):
    with pytest.raises(exc):
        arena.alloc(size)
    h = arena.alloc(8)
    with pytest.raises(exc):
        arena.realloc(*h, size)
    assert arena.size(*h) == 8
    arena.free(*h)


@pytest.mark.parametrize("pos, length", BAD_RANGES)
def test_out_of_range(arena, pos, length):
    h = arena.alloc(100)
    with pytest.raises(OutOfRange):
        arena.read(*h, pos, length)
    if length >= 0:
        with pytest.raises((OutOfRange, OverflowError, MemoryError)) as ei:
            arena.write(*h, pos, b"x" * min(length, 1000))
        if length <= 1000:
            assert ei.type is OutOfRange
    arena.free(*h)


@pytest.mark.parametrize("pos, length", GOOD_RANGES)
def test_in_range(arena, pos, length):
    h = arena.alloc(100)
    data = pattern(100)
    arena.write(*h, 0, data)
    want = data[pos:] if length == -1 else data[pos:pos + length]
    assert arena.read(*h, pos, length) == want
    out = bytearray(len(want))
    assert arena.read_into(*h, pos, out) == len(want)
    assert out == want
    arena.free(*h)


def test_write_past_end_and_read_into_past_end(arena):
    h = arena.alloc(16)
    with pytest.raises(OutOfRange):
        arena.write(*h, 1, b"x" * 16)
    with pytest.raises(OutOfRange):
        arena.read_into(*h, 8, bytearray(9))
    assert arena.read(*h) == bytes(16), "a rejected write must not have written anything"
    arena.free(*h)


def test_buffers_of_every_kind(arena):
    h = arena.alloc(32)
    arena.write(*h, 0, memoryview(b"abcdefgh" * 4)[8:16])
    arena.write(*h, 8, bytearray(b"12345678"))
    buf = bytearray(40)
    assert arena.read_into(*h, 0, memoryview(buf)[4:20]) == 16
    assert bytes(buf[4:20]) == b"abcdefgh12345678"
    with pytest.raises(BadRequest):
        arena.write(*h, 0, "text is not bytes")
    with pytest.raises(BadRequest):
        arena.read_into(*h, 0, b"read-only")
    with pytest.raises(BadRequest):
        arena.read(*h, "0")
    arena.free(*h)


# -- handle validation -----------------------------------------------------------------


def test_double_free(arena):
    h = arena.alloc(64)
    assert arena.free(*h) == 64
    with pytest.raises(DoubleFree) as ei:
        arena.free(*h)
    assert ei.value.code == 409


def test_double_free_after_the_block_was_coalesced_away(arena):
    a = arena.alloc(64)
    b = arena.alloc(64)
    c = arena.alloc(64)
    arena.free(*b)
    arena.free(*a)          # b's header is absorbed into a: its bitmap bit is gone
    with pytest.raises(DoubleFree):
        arena.free(*b)
    with pytest.raises(StaleHandle):
        arena.read(*b)
    arena.free(*c)
    with pytest.raises(DoubleFree):
        arena.free(*a)


def test_double_free_after_reuse_does_not_free_the_new_block(arena):
    old = arena.alloc(64)
    arena.free(*old)
    new = arena.alloc(64)
    assert new[:2] == old[:2], "TLSF should hand the same block back"
    assert new[2] != old[2], "a reused block must get a new generation"
    with pytest.raises(DoubleFree):
        arena.free(*old)
    arena.write(*new, 0, b"still mine")
    assert arena.read(*new, 0, 10) == b"still mine"
    arena.free(*new)


@pytest.mark.parametrize("op", ["read", "write", "size", "info", "realloc", "set_lease", "read_into"])
def test_use_after_free_is_stale(arena, op):
    h = arena.alloc(32)
    arena.free(*h)
    calls = {
        "read": lambda: arena.read(*h),
        "write": lambda: arena.write(*h, 0, b"x"),
        "size": lambda: arena.size(*h),
        "info": lambda: arena.info(*h),
        "realloc": lambda: arena.realloc(*h, 64),
        "set_lease": lambda: arena.set_lease(*h, 5),
        "read_into": lambda: arena.read_into(*h, 0, bytearray(1)),
    }
    with pytest.raises(StaleHandle):
        calls[op]()
    h2 = arena.alloc(32)      # the same memory, reused
    with pytest.raises(StaleHandle):
        calls[op]()
    arena.free(*h2)


FORGED = [
    ("gen 0", lambda s, o, g: (s, o, 0)),
    ("gen never issued", lambda s, o, g: (s, o, g + 1)),
    ("gen 2**64-1", lambda s, o, g: (s, o, 2**64 - 1)),
    ("gen 2**64", lambda s, o, g: (s, o, 2**64)),
    ("gen -1", lambda s, o, g: (s, o, -1)),
    ("off misaligned", lambda s, o, g: (s, o + 8, g)),
    ("off inside the block", lambda s, o, g: (s, o + 16, g)),
    ("off 0", lambda s, o, g: (s, 0, g)),
    ("off in the header area", lambda s, o, g: (s, 64, g)),
    ("off past the segment", lambda s, o, g: (s, 1 << 40, g)),
    ("off 2**64-1", lambda s, o, g: (s, 2**64 - 1, g)),
    ("seg unknown", lambda s, o, g: (s + 1000, o, g)),
    ("seg 0", lambda s, o, g: (0, o, g)),
    ("seg -1", lambda s, o, g: (-1, o, g)),
    ("seg 2**64", lambda s, o, g: (2**64, o, g)),
]


@pytest.mark.parametrize("name, forge", FORGED, ids=[f[0] for f in FORGED])
def test_forged_handles_are_unknown(arena, name, forge):
    h = arena.alloc(48)
    bad = forge(*h)
    for op in (lambda: arena.read(*bad), lambda: arena.size(*bad), lambda: arena.free(*bad),
               lambda: arena.write(*bad, 0, b"x"), lambda: arena.realloc(*bad, 8)):
        with pytest.raises(UnknownHandle) as ei:
            op()
        assert ei.value.code == 404
    assert arena.size(*h) == 48, "a forged handle must not touch the real block"
    arena.free(*h)


def test_handle_parts_must_be_ints(arena):
    h = arena.alloc(8)
    with pytest.raises(BadRequest):
        arena.read(h[0], str(h[1]), h[2])
    with pytest.raises(BadRequest):
        arena.free(float(h[0]), h[1], h[2])
    arena.free(*h)


# -- damage detection ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 4095])
def test_overflow_into_canary_is_detected(arena, prefix, size):
    seg, off, gen = h = arena.alloc(size)
    arena.write(*h, 0, pattern(size))
    shm = Shm(prefix, seg)
    good = shm.map[off + size]
    shm.map[off + size] = good ^ 0x40          # one byte past the end: a classic overflow
    try:
        for op in (lambda: arena.read(*h), lambda: arena.free(*h), lambda: arena.realloc(*h, size + 100),
                   lambda: arena.check(), lambda: arena.write(*h, 0, b"")):
            with pytest.raises(CorruptionDetected) as ei:
                op()
            assert ei.value.code == 500
        with pytest.raises(CorruptionDetected) as ei:
            arena.free(*h)
        assert ei.value.segment == seg and ei.value.offset == off and "canary" in ei.value.detail
    finally:
        shm.map[off + size] = good
        shm.close()
    assert arena.free(*h) == size


@pytest.mark.parametrize("field, at, width", [("magic", H_MAGIC, 4), ("state", H_STATE, 2)])
def test_corrupt_header_is_detected(arena, prefix, field, at, width):
    h = arena.alloc(200)
    neighbour = arena.alloc(200)
    seg, off, _ = h
    shm = Shm(prefix, seg)
    rw = shm.u32 if width == 4 else shm.u16
    good = rw(off + at)
    rw(off + at, good ^ 0x1010)
    try:
        for op in (lambda: arena.read(*h), lambda: arena.write(*h, 0, b"x"), lambda: arena.free(*h),
                   lambda: arena.check()):
            with pytest.raises(CorruptionDetected) as ei:
                op()
            assert ei.value.segment == seg
    finally:
        rw(off + at, good)
        shm.close()
    arena.free(*h)
    arena.free(*neighbour)


def test_damage_of_the_next_header_stops_a_free_before_it_changes_anything(arena, prefix):
    a = arena.alloc(100)
    b = arena.alloc(100)
    shm = Shm(prefix, a[0])
    good = shm.u32(b[1] + H_MAGIC)
    shm.u32(b[1] + H_MAGIC, 0)
    try:
        with pytest.raises(CorruptionDetected):
            arena.free(*a)
        assert shm.u16(a[1] + H_STATE) != 0xF4EE, "the block must still be allocated"
    finally:
        shm.u32(b[1] + H_MAGIC, good)
        shm.close()
    arena.free(*a)
    arena.free(*b)


def test_check_detects_a_damaged_free_block(arena, prefix):
    a = arena.alloc(100)
    b = arena.alloc(100)
    c = arena.alloc(100)
    arena.free(*b)
    shm = Shm(prefix, b[0])
    shm.map[b[1] + 5] = 0x55        # a write into freed memory (use after free through a raw pointer)
    try:
        with pytest.raises(CorruptionDetected, match="not wiped"):
            arena.check()
    finally:
        shm.map[b[1] + 5] = 0
        shm.close()
    arena.free(*a)
    arena.free(*c)


def test_wipe_covers_the_whole_capacity(arena, prefix):
    h = arena.alloc(1000)
    seg, off, _ = h
    cap = arena.info(*h)["capacity"] + 8       # data area including the canary
    arena.write(*h, 0, b"\xab" * 1000)
    neighbour = arena.alloc(16)                # keeps the block from merging away entirely
    arena.free(*h)
    shm = Shm(prefix, seg)
    try:
        assert shm.map[off:off + cap] == bytes(cap), "freed bytes must be wiped (whole capacity)"
    finally:
        shm.close()
    again = arena.alloc(1000)
    assert arena.read(*again) == bytes(1000)
    arena.free(*again)
    arena.free(*neighbour)


# -- quotas and capacity ---------------------------------------------------------------


def test_quota(arena):
    arena.set_quota("bob", 1000)
    a = arena.alloc(600, "bob")
    with pytest.raises(QuotaExceeded) as ei:
        arena.alloc(401, "bob")
    e = ei.value
    assert (e.owner, e.limit, e.requested, e.code) == ("bob", 1000, 401, 429)
    b = arena.alloc(400, "bob")               # exactly at the limit
    alice = arena.alloc(10_000, "alice")      # other owners are not affected
    with pytest.raises(QuotaExceeded):
        arena.realloc(*a, 601)
    assert arena.stats()["owners"]["bob"] == {"in_use": 1000, "blocks": 2, "quota": 1000, "segments": 1}
    arena.free(*b)
    a = arena.realloc(*a, 1000)
    arena.set_quota("bob", 0)                 # unlimited
    c = arena.alloc(5000, "bob")
    for h in (a, c, alice):
        arena.free(*h)


def test_default_quota(prefix):
    with Arena(prefix, 16 << 20, default_quota=100, **SMALL) as a:
        x = a.alloc(100, "x")
        y = a.alloc(1, "y")
        with pytest.raises(QuotaExceeded) as ei:
            a.alloc(100, "y")
        assert (ei.value.owner, ei.value.limit, ei.value.requested) == ("y", 100, 100)
        a.set_quota("y", 0)
        z = a.alloc(100, "y")
        for h in (x, y, z):
            a.free(*h)
        assert_clean(a)
        a.destroy()


def test_out_of_memory(prefix):
    with Arena(prefix, 256 << 10, min_segment=1 << 16, max_segment=1 << 17) as a:
        with pytest.raises(OutOfMemory) as ei:
            a.alloc(300 << 10)
        assert ei.value.requested == 300 << 10 and ei.value.available < 300 << 10 and ei.value.code == 507
        handles = []
        with pytest.raises(OutOfMemory) as ei:
            for _ in range(1000):
                handles.append(a.alloc(8000))
        e = ei.value
        assert e.requested == 8000 and 0 <= e.available < 8000
        st = a.stats()
        assert st["mapped"] <= 256 << 10
        assert len(handles) >= 25, "most of the capacity must be usable"
        for h in handles:
            a.free(*h)
        assert_clean(a)
        # capacity freed by one owner is usable by another once empty segments are released
        h = a.alloc(200 << 10, "other")
        a.free(*h)
        assert_clean(a)


def test_segments_grow_by_doubling_and_big_blocks_get_their_own(arena):
    hs = [arena.alloc(30_000) for _ in range(12)]
    sizes = [size for _, _, size in arena.owner_segments("")]
    assert sizes[0] == 1 << 16
    assert sizes[:3] == [1 << 16, 1 << 17, 1 << 18]
    assert max(sizes) <= 1 << 20
    big = arena.alloc(3 << 20)                 # more than max_segment
    seg_of_big = [s for s in arena.owner_segments("") if s[0] == big[0]]
    assert seg_of_big and seg_of_big[0][2] > 3 << 20
    for h in hs + [big]:
        arena.free(*h)


def test_owners_never_share_segments(arena):
    a = [arena.alloc(100, "alice") for _ in range(5)]
    b = [arena.alloc(100, "bob") for _ in range(5)]
    segs_a = {s for s, _, _ in a}
    segs_b = {s for s, _, _ in b}
    assert segs_a.isdisjoint(segs_b)
    assert {s for s, _, _ in arena.owner_segments("alice")} == segs_a
    for sid, path, size in arena.owner_segments("bob"):
        assert os.path.getsize(path) == size and path == f"{SHM_DIR}/{arena.prefix}.{sid}"
    assert arena.info(*a[0])["owner"] == "alice"
    assert arena.owner_segments("nobody") == []
    with pytest.raises(BadRequest):
        arena.alloc(1, "x" * 65)
    with pytest.raises(BadRequest):
        arena.alloc(1, 42)
    for h in a + b:
        arena.free(*h)


# -- realloc, coalescing, fragmentation ------------------------------------------------


def test_realloc_in_place(arena):
    h = arena.alloc(100)
    neighbour = arena.alloc(0)  # so that growth beyond the capacity would have to move
    data = pattern(100)
    arena.write(*h, 0, data)
    shrunk = arena.realloc(*h, 40)
    assert shrunk == h
    assert arena.read(*shrunk) == data[:40]
    grown = arena.realloc(*shrunk, 100)       # within the old capacity
    assert grown == h
    assert arena.read(*grown) == data[:40] + bytes(60), "a grown tail must read as zeros"
    assert arena.realloc(*grown, 100) == h
    tiny = arena.realloc(*grown, 0)
    assert tiny == h and arena.read(*tiny) == b""
    arena.free(*tiny)
    arena.free(*neighbour)


def test_realloc_grows_into_a_free_neighbour(arena):
    a = arena.alloc(100, lease_deadline_ms=1)
    b = arena.alloc(100, lease_deadline_ms=1)
    c = arena.alloc(100, lease_deadline_ms=1)
    arena.write(*a, 0, pattern(100))
    arena.free(*b)
    grown = arena.realloc(*a, 250)
    assert grown == a, "the free neighbour should be absorbed in place"
    assert arena.read(*grown) == pattern(100) + bytes(150)
    arena.free(*grown)
    arena.free(*c)


def test_realloc_moves_when_it_must(arena):
    a = arena.alloc(100)
    blocker = arena.alloc(100)
    data = pattern(100, 3)
    arena.write(*a, 0, data)
    moved = arena.realloc(*a, 5000)
    assert moved != a
    assert arena.read(*moved) == data + bytes(4900)
    with pytest.raises(StaleHandle):
        arena.read(*a)
    with pytest.raises(DoubleFree):
        arena.free(*a)
    shrunk = arena.realloc(*moved, 10)
    assert arena.read(*shrunk) == data[:10]
    arena.free(*shrunk)
    arena.free(*blocker)


def test_realloc_move_keeps_the_lease(arena):
    a = arena.alloc(10, lease_deadline_ms=500)
    blocker = arena.alloc(10)
    moved = arena.realloc(*a, 10_000)
    assert arena.expired(1000) == [moved]
    for h in (moved, blocker):
        arena.free(*h)


def test_coalescing_makes_room_for_a_big_block(arena):
    handles = []
    while not handles or handles[-1][0] == handles[0][0]:
        handles.append(arena.alloc(1000))
    last = handles.pop()                        # spilled into a second segment
    seg = handles[0][0]
    for h in handles[::2] + handles[1::2]:      # free out of order: every merge path
        arena.free(*h)
    before = len(arena.owner_segments(""))
    heap = sum(1000 + 8 + 64 for _ in handles)
    big = arena.alloc(heap - 200)
    assert big[0] == seg, "the merged free space must hold the big block in the same segment"
    assert len(arena.owner_segments("")) == before
    arena.free(*big)
    arena.free(*last)


def test_fragmentation_and_largest_free(arena):
    hs = [arena.alloc(1000) for _ in range(40)]
    for h in hs[::2]:
        arena.free(*h)
    st = arena.stats()
    assert 0 < st["fragmentation"] < 1
    assert st["largest_free"] < st["free_bytes"]
    assert st["fragmentation"] == pytest.approx(1 - st["largest_free"] / st["free_bytes"])
    for h in hs[1::2]:
        arena.free(*h)
    st = arena.stats()
    assert st["fragmentation"] == 0 or st["segments"] > 1
    assert st["blocks"] == 0


def test_stats_counters(arena):
    hs = [arena.alloc(n, "o") for n in (10, 20, 30)]
    st = arena.stats()
    assert (st["in_use"], st["blocks"], st["alloc_count"], st["free_count"]) == (60, 3, 3, 0)
    assert st["owners"]["o"]["in_use"] == 60
    arena.free(*hs[0])
    st = arena.stats()
    assert (st["in_use"], st["peak_in_use"], st["free_count"]) == (50, 60, 1)
    assert st["mapped"] == sum(size for _, _, size in arena.owner_segments("o"))
    assert st["capacity"] == 64 << 20
    for h in hs[1:]:
        arena.free(*h)


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_against_a_model(arena, seed):
    import random

    rng = random.Random(seed)
    model: dict[tuple[int, int, int], bytes] = {}
    dead: list[tuple[int, int, int]] = []
    for step in range(3000):
        r = rng.random()
        if r < 0.45 or not model:
            size = rng.choice([0, 1, 15, 16, 17, 100, 255, 256, 257, 1000, 4000, 20000, 70000])
            h = arena.alloc(size, rng.choice(["", "a", "b"]))
            assert h[1] % 16 == 0 and arena.read(*h) == bytes(size)
            data = rng.randbytes(size)
            arena.write(*h, 0, data)
            model[h] = data
        elif r < 0.8:
            h = rng.choice(list(model))
            assert arena.read(*h) == model[h]
            assert arena.free(*h) == len(model.pop(h))
            dead.append(h)
        else:
            h = rng.choice(list(model))
            new_size = rng.choice([0, 8, 64, 500, 3000, 30000])
            h2 = arena.realloc(*h, new_size)
            old = model.pop(h)
            model[h2] = old[:new_size] + bytes(max(0, new_size - len(old)))
            assert arena.read(*h2) == model[h2]
            if h2 != h:
                dead.append(h)
        if step % 500 == 0:
            assert arena.check() == len(model)
            for h in rng.sample(dead, min(5, len(dead))):
                if h not in model:
                    with pytest.raises((StaleHandle, DoubleFree)):
                        arena.free(*h)
    assert arena.check() == len(model)
    for h, data in model.items():
        assert arena.read(*h) == data
        arena.free(*h)


# -- leases ----------------------------------------------------------------------------


def test_lease_expiry(arena):
    a = arena.alloc(10, lease_deadline_ms=1000)
    b = arena.alloc(10, lease_deadline_ms=2000)
    c = arena.alloc(10)
    assert arena.expired(999) == []
    assert arena.expired(1500) == [a]
    assert sorted(arena.expired(2000)) == sorted([a, b])
    arena.set_lease(*b, 0)
    arena.set_lease(*c, 1200)
    assert sorted(arena.expired(5000)) == sorted([a, c])
    assert arena.info(*c)["lease_deadline_ms"] == 1200
    arena.free(*a)
    assert arena.expired(5000) == [c]
    for h in (b, c):
        arena.free(*h)
    assert arena.expired(2**64 - 1) == []


# -- lifecycle, reattach, crashes ------------------------------------------------------


def test_prefix_validation_and_single_owner(prefix):
    for bad in ("", "a/b", "../x", "x" * 201, "sp ace", 5):
        with pytest.raises(BadRequest):
            Arena(bad, 1 << 20)
    with pytest.raises(BadRequest):
        Arena(prefix, 1 << 20, min_segment=100)
    with pytest.raises(BadRequest):
        Arena(prefix, 1 << 20, min_segment=1 << 20, max_segment=1 << 16)
    with pytest.raises(BadRequest):
        Arena(prefix, -1)
    a = Arena(prefix, 1 << 20, **SMALL)
    with pytest.raises(Conflict):
        Arena(prefix, 1 << 20)
    a.close()
    with pytest.raises(BadRequest):
        a.alloc(1)
    with pytest.raises(BadRequest):
        a.read(1, 1024, 1)
    Arena(prefix, 1 << 20).destroy()
    assert _files(prefix) == []


def test_reattach_after_close_keeps_every_byte(prefix):
    a = Arena(prefix, 64 << 20, **SMALL)
    blocks = {}
    for i, size in enumerate(SIZES * 2):
        h = a.alloc(size, f"owner{i % 3}", lease_deadline_ms=1 if i % 2 else 0)
        a.write(*h, 0, pattern(size, i))
        blocks[h] = pattern(size, i)
    gone = a.alloc(77)
    a.free(*gone)
    a.set_quota("owner1", 1 << 30)
    before = a.stats()
    a.close()

    b = Arena(prefix, 64 << 20, **SMALL)
    try:
        after = b.stats()
        for key in ("mapped", "segments", "in_use", "blocks", "free_bytes", "largest_free", "peak_in_use",
                    "alloc_count", "free_count"):
            assert after[key] == before[key], key
        assert b.check() == len(blocks)
        for h, data in blocks.items():
            assert b.read(*h) == data
        assert len(b.expired(10)) == len(SIZES)
        with pytest.raises(DoubleFree):
            b.free(*gone)
        fresh = b.alloc(77)
        assert fresh[0] == gone[0] and fresh[2] > gone[2], "generations continue, never reused"
        b.free(*fresh)
        for h in blocks:
            b.free(*h)
        assert_clean(b)
    finally:
        b.destroy()


CHILD_ALLOCATOR = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from fabric_ext.arena import Arena
    a = Arena({prefix!r}, 64 << 20, min_segment=1 << 16, max_segment=1 << 20)
    out = []
    for i, size in enumerate({sizes!r}):
        h = a.alloc(size, "child" if i % 2 else "")
        a.write(*h, 0, bytes((j * 7 + i) % 251 + 1 for j in range(size)))
        out.append([list(h), i, size])
    freed = a.alloc(99)
    a.free(*freed)
    print(json.dumps({{"blocks": out, "freed": list(freed)}}), flush=True)
    import time
    time.sleep(60)
""")


def test_reattach_after_sigkill_keeps_every_byte(prefix):
    script = CHILD_ALLOCATOR.format(root=str(ROOT), prefix=prefix, sizes=SIZES)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, "child allocator died"
        report = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    a = Arena(prefix, 64 << 20, **SMALL)
    try:
        assert a.check() == len(SIZES)
        for h, i, size in report["blocks"]:
            assert a.read(*h) == pattern(size, i), "bytes changed across the crash"
        with pytest.raises(DoubleFree):
            a.free(*report["freed"])
        for h, _, _ in report["blocks"]:
            a.free(*h)
        assert_clean(a)
    finally:
        a.destroy()


CHILD_CHURN = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, {root!r})
    from fabric_ext.arena import Arena
    a = Arena({prefix!r}, 8 << 20, min_segment=1 << 16, max_segment=1 << 18)
    rng = random.Random({seed})
    live = []
    print("ready", flush=True)
    while True:
        r = rng.random()
        if r < 0.5 or not live:
            try:
                live.append(a.alloc(rng.choice([0, 1, 100, 1000, 5000, 40000]), rng.choice(["", "x"]),
                                    lease_deadline_ms=1))
            except Exception:
                pass
        elif r < 0.8:
            a.free(*live.pop(rng.randrange(len(live))))
        else:
            i = rng.randrange(len(live))
            live[i] = a.realloc(*live[i], rng.choice([0, 10, 300, 3000, 20000]))
""")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_mid_operation_leaves_a_consistent_arena(prefix, seed):
    script = CHILD_CHURN.format(root=str(ROOT), prefix=prefix, seed=seed)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.2 + 0.1 * seed)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    a = Arena(prefix, 8 << 20, min_segment=1 << 16, max_segment=1 << 18)
    try:
        live = a.check()
        handles = a.expired(1)        # every block of the child has lease 1
        assert len(handles) == live
        for h in handles:
            a.read(*h)
            a.free(*h)
        assert a.check() == 0
        h = a.alloc(1000)             # still usable
        assert a.read(*h) == bytes(1000)
        a.free(*h)
    finally:
        a.destroy()


def test_incomplete_segment_file_is_dropped_and_garbage_is_reported(prefix):
    with open(f"{SHM_DIR}/{prefix}.5", "wb") as f:
        f.truncate(1 << 16)               # a creator died before writing the header
    a = Arena(prefix, 1 << 20, **SMALL)
    assert not os.path.exists(f"{SHM_DIR}/{prefix}.5")
    h = a.alloc(10)
    assert h[0] > 5, "segment ids are never reused"
    a.free(*h)
    a.close()
    with open(f"{SHM_DIR}/{prefix}.9", "wb") as f:
        f.write(b"NOTFABRIC" * 8000)
    with pytest.raises(CorruptionDetected) as ei:
        Arena(prefix, 1 << 20, **SMALL)
    assert ei.value.segment == 9
    os.unlink(f"{SHM_DIR}/{prefix}.9")
    Arena(prefix, 1 << 20).destroy()


def test_damaged_block_header_is_reported_on_attach(prefix):
    a = Arena(prefix, 1 << 20, **SMALL)
    h = a.alloc(10)
    a.close()
    shm = Shm(prefix, h[0])
    shm.u32(h[1] + H_MAGIC, 0xDEAD)
    try:
        with pytest.raises(CorruptionDetected):
            Arena(prefix, 1 << 20, **SMALL)
    finally:
        shm.u32(h[1] + H_MAGIC, 0xFAB10C4B)
        shm.close()
    with Arena(prefix, 1 << 20, **SMALL) as b:
        b.free(*h)
        assert_clean(b)
    Arena(prefix, 1 << 20).destroy()


def test_destroy_removes_only_this_prefix(prefix):
    other = _unique_prefix()
    a = Arena(prefix, 1 << 20, **SMALL)
    b = Arena(other, 1 << 20, **SMALL)
    a.alloc(1)
    b.alloc(1)
    a.destroy()
    assert _files(prefix) == []
    assert len(_files(other)) == 2
    b.destroy()
    assert _files(other) == []


# -- SegmentView -----------------------------------------------------------------------


def test_segment_view_in_process(arena, prefix):
    h = arena.alloc(64)
    seg, off, gen = h
    arena.write(*h, 0, pattern(64))
    (sid, path, size), = arena.owner_segments("")
    with SegmentView(path) as v:
        assert v.seg_id == seg and v.path == path
        assert v.size(off, gen) == 64
        assert v.read(off, gen) == pattern(64)
        assert v.read(off, gen, 60) == pattern(64)[60:]
        out = bytearray(4)
        assert v.read_into(off, gen, 2, out) == 4 and out == pattern(64)[2:6]
        assert v.write(off, gen, 0, b"VIEW") == 4
        assert arena.read(*h, 0, 4) == b"VIEW"
        with pytest.raises(OutOfRange):
            v.read(off, gen, 0, 65)
        with pytest.raises(OutOfRange):
            v.write(off, gen, 62, b"xyz")
        with pytest.raises(UnknownHandle):
            v.read(off, gen + 1)
        with pytest.raises(UnknownHandle):
            v.read(off + 16, gen)
        arena.free(*h)
        with pytest.raises(StaleHandle):
            v.read(off, gen)
        with pytest.raises(StaleHandle):
            v.write(off, gen, 0, b"x")
        h2 = arena.alloc(64)
        assert h2[:2] == h[:2]
        with pytest.raises(StaleHandle):
            v.read(off, gen)
        assert v.read(h2[1], h2[2]) == bytes(64)
        arena.free(*h2)
    with pytest.raises(BadRequest):
        v.read(off, gen)


def test_segment_view_rejects_bad_files(prefix):
    path = f"{SHM_DIR}/{prefix}.junk"
    with open(path, "wb") as f:
        f.write(b"x" * 100)
    with pytest.raises(BadRequest):
        SegmentView(path)
    with open(path, "wb") as f:
        f.write(b"y" * 20000)
    with pytest.raises(BadRequest):
        SegmentView(path)
    os.unlink(path)
    with pytest.raises(OSError):
        SegmentView(path)


def test_segment_view_detects_a_damaged_segment_header(arena, prefix):
    h = arena.alloc(10)
    path = arena.owner_segments("")[0][1]
    shm = Shm(prefix, h[0])
    good = shm.u64(16)                         # total_size
    struct.pack_into("<Q", shm.map, 16, good + 4096)
    try:
        with pytest.raises(CorruptionDetected):
            SegmentView(path)
        with pytest.raises(CorruptionDetected):
            arena.check()
    finally:
        struct.pack_into("<Q", shm.map, 16, good)
        shm.close()
    arena.free(*h)


CHILD_VIEW = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from fabric.errors import StaleHandle
    from fabric_ext.arena import SegmentView
    job = json.loads(sys.argv[1])
    v = SegmentView(job["path"])
    off, gen = job["off"], job["gen"]
    try:
        data = v.read(off, gen)
        v.write(off, gen, 0, b"from the child")
        print(json.dumps({{"data": data.hex(), "size": v.size(off, gen)}}))
    except StaleHandle:
        print(json.dumps({{"stale": True}}))
""")


def _view_child(path: str, off: int, gen: int) -> dict:
    script = CHILD_VIEW.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script, json.dumps({"path": path, "off": off, "gen": gen})],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_segment_view_from_another_process(arena):
    h = arena.alloc(100, "client")
    seg, off, gen = h
    arena.write(*h, 0, pattern(100, 9))
    (sid, path, _), = arena.owner_segments("client")
    got = _view_child(path, off, gen)
    assert bytes.fromhex(got["data"]) == pattern(100, 9) and got["size"] == 100
    assert arena.read(*h, 0, 14) == b"from the child"
    arena.free(*h)
    assert _view_child(path, off, gen) == {"stale": True}


def _race_reader(path: str, conn) -> None:
    # forked: keeps reading the latest handle it was sent; acks the first good read of
    # each so the parent frees the block while this loop is (likely) mid-copy
    v = SegmentView(path)
    ok = stale = wrong = 0
    handle = None
    acked = True
    i = 0
    while True:
        if handle is None or (i % 8 == 0 and conn.poll()):
            msg = conn.recv()
            if msg is None:
                break
            handle, acked = msg, False
        i += 1
        off, gen, size = handle
        try:
            data = v.read(off, gen)
        except StaleHandle:
            stale += 1
            continue
        if data == bytes([gen % 251 + 1]) * size:
            ok += 1
        else:
            wrong += 1
        if not acked:
            conn.send("ack")
            acked = True
    conn.send((ok, stale, wrong))


def test_segment_view_never_returns_bytes_of_a_freed_or_reused_block(arena):
    first = arena.alloc(4000)
    (sid, path, _), = arena.owner_segments("")
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_race_reader, args=(path, child))
    proc.start()
    try:
        arena.free(*first)
        deadline = time.monotonic() + 1.5
        rounds = 0
        while time.monotonic() < deadline:
            h = arena.alloc(4000)       # mostly the same memory again, with a new generation
            arena.write(*h, 0, bytes([h[2] % 251 + 1]) * 4000)
            parent.send((h[1], h[2], 4000))
            assert parent.poll(10) and parent.recv() == "ack"
            for _ in range(rounds % 13):
                arena.size(*h)          # vary where in the reader's copy the free lands
            arena.free(*h)
            rounds += 1
        parent.send(None)
        ok, stale, wrong = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert wrong == 0, f"{wrong} reads returned bytes of a freed or reused block"
    assert ok >= rounds and stale > 0 and rounds > 10, (ok, stale, rounds)


def _three_blocks(arena) -> list[tuple[int, int, int, bytes]]:
    """Blocks holding b"alpha", b"be" and b"gamma!": (seg, off, gen, text) each."""
    blocks = []
    for text in (b"alpha", b"be", b"gamma!"):
        seg, off, gen = arena.alloc(len(text))
        arena.write(seg, off, gen, 0, text)
        blocks.append((seg, off, gen, text))
    return blocks


def test_gather_into_copies_back_to_back_and_all_or_nothing(arena):
    blocks = _three_blocks(arena)
    specs = [(s, o, g, 0, len(t)) for s, o, g, t in blocks]
    out = bytearray(b"#" * 16)
    assert arena.gather_into(specs, out, 2) == 13
    assert out == b"##alphabegamma!#"
    assert arena.gather_into([(blocks[2][0], blocks[2][1], blocks[2][2], 1, 3)], out, 0) == 3
    assert out[:3] == b"amm"
    assert arena.gather_into([], out, 16) == 0
    before = bytes(out)
    s, o, g, _ = blocks[1]
    arena.free(s, o, g)
    with pytest.raises(StaleHandle):  # a bad item anywhere: nothing is copied
        arena.gather_into([specs[0], specs[1]], out, 0)
    with pytest.raises(OutOfRange):
        arena.gather_into([specs[0], specs[2]], out, 6)  # 11 bytes from 6 do not fit 16
    with pytest.raises(OutOfRange):
        arena.gather_into([(blocks[0][0], blocks[0][1], blocks[0][2], 3, 3)], out, 0)  # past the block
    with pytest.raises(OutOfRange):
        arena.gather_into([specs[0]], out, -1)
    with pytest.raises(BadRequest):
        arena.gather_into([(1, 2, 3)], out, 0)
    with pytest.raises(BadRequest):
        arena.gather_into([specs[0]], b"read-only buffer", 0)
    assert bytes(out) == before, "a failed gather copied something"
    for s, o, g, _ in (blocks[0], blocks[2]):
        arena.free(s, o, g)


def test_gather_reads_resolves_tokens_through_the_known_map(arena):
    blocks = _three_blocks(arena)
    # known maps a token to parts shaped like fabric.handles.HandleParts: (node, seg, off, gen, ...)
    known = {f"t{i}": ("node", s, o, g, "rw", "mac") for i, (s, o, g, _t) in enumerate(blocks)}
    items = [("t0", 0, 5, 0), ("t1", 1, 1, 0), ("t2", 2, 4, 0)]
    out = bytearray(b"#" * 12)
    assert arena.gather_reads(items, known, out, 2) == 10
    assert out == b"##alphaemma!"
    before = bytes(out)
    # a token not in the map: None, nothing copied (the caller verifies it the slow way)
    assert arena.gather_reads([items[0], ("t9", 0, 1, 0)], known, out, 0) is None
    s, o, g, _ = blocks[1]
    arena.free(s, o, g)
    with pytest.raises(StaleHandle):
        arena.gather_reads(items, known, out, 0)
    with pytest.raises(OutOfRange):
        arena.gather_reads([("t0", 3, 3, 0)], known, out, 0)  # past the block
    with pytest.raises(OutOfRange):
        arena.gather_reads([("t0", 0, 2**64 - 1, 0)], known, out, 0)  # "to the end" is the caller's to size
    with pytest.raises(OutOfRange):
        arena.gather_reads([("t0", 0, 5, 0), ("t2", 0, 6, 0)], known, out, 2)  # does not fit
    with pytest.raises(BadRequest):
        arena.gather_reads([("t0", 0, 5)], known, out, 0)
    with pytest.raises(BadRequest):
        arena.gather_reads([("t0", 0, 5, 0)], {"t0": "not parts"}, out, 0)
    assert bytes(out) == before, "a failed gather copied something"
    for s, o, g, _ in (blocks[0], blocks[2]):
        arena.free(s, o, g)
