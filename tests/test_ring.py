"""Tests of fabric_ext.ring: the SPSC shared-memory ring (Producer / Consumer).

Real shared memory throughout: corruption is injected by writing the ring file under
/dev/shm through its own mapping, a second process is a real child.  Every test gets
its own ring path; teardown unlinks it.  The layout offsets used here are the ones
docs/ring.md documents, so these tests also check the document.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric_ext import ring
from fabric_ext.ring import (
    ALIGN,
    HEADER_SIZE,
    MAX_CAPACITY,
    MIN_CAPACITY,
    RECORD_HEADER_SIZE,
    Consumer,
    Producer,
    RingClosed,
    RingCorrupt,
    RingError,
    RingHeaderInvalid,
    crc32c,
)

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

ROOT = Path(__file__).resolve().parents[1]

# -- boundary tables (docs/ring.md offsets) --------------------------------------------

CAP = 1 << 18  # max_record = 2**16
PAYLOAD_SIZES = [0, 1, 15, 16, 17, 2**7 - 1, 2**7, 2**7 + 1, 4096, 2**16 - 1, 2**16]
BAD_CAPACITIES = [0, 1, 2**7 - 1, 2**7, 512, 1000, 3 << 10, 2**16 + 1, 2**31, 2**32, 2**64, -(2**10)]
START_COUNTERS = [2**32 - 4096, 2**32 - 16, 2**64 - 8192]  # counters that cross 2**32 / 2**64
# RFC 3720 B.4 CRC32C test vectors, plus the usual check value.
CRC_VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
    (b"", 0),
]

OFF_MAGIC, OFF_VERSION, OFF_FLAGS, OFF_CAPACITY, OFF_MAX_RECORD = 0, 8, 12, 16, 24
OFF_FILE_SIZE, OFF_STATE, OFF_HEAD, OFF_TAIL = 40, 56, 128, 256
WRAP = 0xFFFFFFFF
CHECK_XOR = 0x52C9E1A7


def record_size(n: int) -> int:
    return (RECORD_HEADER_SIZE + n + ALIGN - 1) // ALIGN * ALIGN


@pytest.fixture
def path() -> Iterator[str]:
    p = f"/dev/shm/fabric-ring-test-{secrets.token_hex(6)}"
    yield p
    ring.unlink(p)


def open_pair(path: str, capacity: int = CAP, **kw: object) -> tuple[Producer, Consumer]:
    ring.create(path, capacity, **kw)  # type: ignore[arg-type]
    return Producer(path), Consumer(path)


def assert_drained(p: Producer, c: Consumer) -> None:
    """Resource accounting: everything pushed was popped (or counted as lost)."""
    st = c.stats()
    assert st["used"] == 0 and st["corrupt_skipped"] == 0
    assert st["records_pushed"] == st["records_popped"] and st["bytes_pushed"] == st["bytes_popped"]
    assert p.pushed == st["records_pushed"] and c.popped == st["records_popped"]


class Mapped:
    """The ring file mapped by the test itself, to read and damage fields for real."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size)

    def u32(self, off: int, v: int | None = None) -> int:
        if v is not None:
            struct.pack_into("<I", self.mm, off, v)
        return struct.unpack_from("<I", self.mm, off)[0]

    def u64(self, off: int, v: int | None = None) -> int:
        if v is not None:
            struct.pack_into("<Q", self.mm, off, v)
        return struct.unpack_from("<Q", self.mm, off)[0]

    def record_at(self, counter: int, capacity: int) -> int:
        """File offset of the record header at ring position *counter*."""
        return HEADER_SIZE + (counter & (capacity - 1))

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


# -- create / open -------------------------------------------------------------------


@pytest.mark.parametrize("capacity", BAD_CAPACITIES)
def test_create_rejects_bad_capacity(path: str, capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ring.create(path, capacity)
    assert not os.path.exists(path)


def test_create_rejects_non_int_and_existing(path: str) -> None:
    with pytest.raises(TypeError):
        ring.create(path, "4096")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_counter"):
        ring.create(path, 4096, start_counter=3)
    ring.create(path, MIN_CAPACITY)
    with pytest.raises(FileExistsError):
        ring.create(path, MIN_CAPACITY)


@pytest.mark.parametrize("capacity", [MIN_CAPACITY, 1 << 16, MAX_CAPACITY >> 8])
def test_create_layout(path: str, capacity: int) -> None:
    ring.create(path, capacity, crc=True)
    assert os.path.getsize(path) == HEADER_SIZE + capacity
    m = Mapped(path)
    try:
        assert m.mm[0:8] == b"FABRING1"
        assert m.u32(OFF_VERSION) == 1 and m.u32(OFF_FLAGS) == 1
        assert m.u64(OFF_CAPACITY) == capacity and m.u64(OFF_MAX_RECORD) == capacity // 4
        assert m.u64(OFF_FILE_SIZE) == HEADER_SIZE + capacity
    finally:
        m.close()
    with Producer(path) as p:
        assert (p.capacity, p.max_record, p.crc) == (capacity, capacity // 4, True)


def _damage(path: str, off: int, fmt: str, value: int) -> None:
    m = Mapped(path)
    struct.pack_into(fmt, m.mm, off, value)
    m.close()


HEADER_DAMAGE = [
    ("magic", OFF_MAGIC, "<Q", 0x1234, "bad magic"),
    ("version", OFF_VERSION, "<I", 2, "version"),
    ("flags", OFF_FLAGS, "<I", 0x80, "flags"),
    ("capacity_not_pow2", OFF_CAPACITY, "<Q", 3000, "capacity"),
    ("capacity_too_large", OFF_CAPACITY, "<Q", 1 << 40, "capacity"),
    ("max_record", OFF_MAX_RECORD, "<Q", 1 << 20, "max_record"),
    ("file_size", OFF_FILE_SIZE, "<Q", 12345, "file_size"),
]


@pytest.mark.parametrize("what,off,fmt,value,msg", HEADER_DAMAGE, ids=[d[0] for d in HEADER_DAMAGE])
@pytest.mark.parametrize("end", [Producer, Consumer])
def test_open_validates_header(path: str, end: type, what: str, off: int, fmt: str, value: int, msg: str) -> None:
    ring.create(path, 1 << 12)
    _damage(path, off, fmt, value)
    with pytest.raises(RingHeaderInvalid, match=msg):
        end(path)


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 4095, HEADER_SIZE + 8192])
def test_open_rejects_wrong_file_size(path: str, size: int) -> None:
    ring.create(path, 1 << 12)
    os.truncate(path, size)
    with pytest.raises(RingHeaderInvalid, match="truncated|bytes"):
        Consumer(path)
    assert issubclass(RingHeaderInvalid, ValueError)


def test_open_missing_file(path: str) -> None:
    with pytest.raises(FileNotFoundError):
        Producer(path)


# -- push / pop ----------------------------------------------------------------------


@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("n", PAYLOAD_SIZES)
def test_roundtrip_sizes(path: str, n: int, crc: bool) -> None:
    p, c = open_pair(path, crc=crc)
    data = os.urandom(n)
    p.push(data)
    p.push_parts(data[: n // 3], memoryview(data)[n // 3 :])
    p.push_parts(b"", bytearray(data))
    assert c.pop() == data and c.pop() == data and c.try_pop() == data
    assert c.try_pop() is None
    st = c.stats()
    assert st["bytes_pushed"] == st["bytes_popped"] == 3 * n
    assert_drained(p, c)


def test_max_record_enforced(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    assert p.max_record == 1024
    p.push(b"x" * 1024)
    for bad in (lambda: p.push(b"x" * 1025), lambda: p.try_push(b"x" * 1025),
                lambda: p.push_parts(b"x" * 1000, b"y" * 25)):
        with pytest.raises(ValueError, match="max_record=1024"):
            bad()
    assert c.pop() == b"x" * 1024 and c.try_pop() is None
    assert_drained(p, c)


def test_bad_arguments(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    with pytest.raises(ValueError, match="timeout"):
        c.pop(timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        p.push(b"x", timeout=float("nan"))
    with pytest.raises(TypeError):
        p.push("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spin_us"):
        Consumer(path, spin_us=-1)
    with pytest.raises(BufferError):
        p.push(memoryview(b"abcdef")[::2])  # not contiguous


def test_empty_and_timeout(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    assert c.try_pop() is None
    with pytest.raises(TimeoutError):
        c.pop(timeout=0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="empty"):
        c.pop(timeout=0.05)
    assert time.monotonic() - t0 >= 0.05


def test_full_then_space(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    rec = b"r" * 100  # 128 bytes with header and padding
    n = 0
    while p.try_push(rec):
        n += 1
    assert n == (1 << 12) // record_size(100)
    assert c.stats()["used"] == n * record_size(100)
    with pytest.raises(TimeoutError, match="full"):
        p.push(rec, timeout=0.02)
    assert c.pop() == rec
    assert p.try_push(rec)
    for _ in range(n):
        assert c.pop() == rec
    assert_drained(p, c)


def test_exact_fit(path: str) -> None:
    """Records that fill the ring to the last byte, and end exactly at its end (no wrap marker)."""
    cap = 1 << 12
    p, c = open_pair(path, cap)
    payload = cap // 4 - RECORD_HEADER_SIZE  # record size == capacity / 4
    for lap in range(3):
        for i in range(4):
            p.push(bytes([lap * 4 + i]) * payload, timeout=1)
        assert c.stats()["used"] == cap
        assert not p.try_push(b"")  # not even an empty record fits
        for i in range(4):
            assert c.pop() == bytes([lap * 4 + i]) * payload
    m = Mapped(path)
    assert m.u64(OFF_HEAD) == 3 * cap  # no wrap markers were needed
    m.close()
    assert_drained(p, c)


def test_wrap_around_keeps_records_contiguous(path: str) -> None:
    cap = 1 << 12
    p, c = open_pair(path, cap, crc=True)
    sizes = [700, 1, 333, 1024, 17, 900, 0, 511] * 40
    payload_total = 0
    for i, n in enumerate(sizes):
        data = bytes([i & 0xFF]) * n
        p.push(data, timeout=1)
        payload_total += record_size(n)
        assert c.pop() == data
    m = Mapped(path)
    head = m.u64(OFF_HEAD)
    m.close()
    assert head > payload_total  # wrap markers skipped the ends of the data area
    assert c.stats()["used"] == 0
    assert_drained(p, c)


@pytest.mark.parametrize("start", START_COUNTERS)
def test_counters_cross_2_32_and_2_64(path: str, start: int) -> None:
    p, c = open_pair(path, 1 << 12, start_counter=start)
    expected = []
    got = []
    for i in range(300):
        data = i.to_bytes(4, "little") * (i % 40)
        expected.append(data)
        while not p.try_push(data):
            got.append(c.pop())
    while (r := c.try_pop()) is not None:
        got.append(r)
    assert got == expected
    m = Mapped(path)
    head = m.u64(OFF_HEAD)
    m.close()
    assert (head - start) % 2**64 > 0 and (head < start or start < 2**32 < head)  # crossed
    assert_drained(p, c)


# -- corruption ----------------------------------------------------------------------

CORRUPTIONS = ["length", "check", "pos", "length_huge", "crc", "wrap_check", "wrap_misplaced"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_record_skipped_without_wedging(path: str, kind: str) -> None:
    cap = 1 << 12
    p, c = open_pair(path, cap, crc=True)
    m = Mapped(path)
    try:
        if kind.startswith("wrap"):
            # Fill to 3072 + 896 so the next 256-byte record needs a wrap marker at 3968.
            for _ in range(3):
                p.push(b"f" * (1024 - RECORD_HEADER_SIZE))
                c.pop()
            p.push(b"g" * (896 - RECORD_HEADER_SIZE))
            c.pop()
            pos = m.u64(OFF_HEAD)
            p.push(b"A" * 240)
            off = m.record_at(pos, cap)
            assert m.u32(off) == WRAP  # the producer wrote a wrap marker there
            if kind == "wrap_check":
                m.u32(off + 4, 0)
            else:  # a valid-looking wrap marker at offset 0 of the data area
                m.u32(HEADER_SIZE, WRAP)
                m.u32(HEADER_SIZE + 4, WRAP ^ CHECK_XOR)
                m.u32(HEADER_SIZE + 12, (pos + (cap - (pos & (cap - 1)))) & 0xFFFFFFFF)
            p.push(b"B" * 10)
        else:
            pos = m.u64(OFF_HEAD)
            p.push(b"A" * 100)
            p.push(b"B" * 10)
            off = m.record_at(pos, cap)
            if kind == "length":
                m.u32(off, 50)  # check word no longer matches
            elif kind == "check":
                m.u32(off + 4, m.u32(off + 4) ^ 1)
            elif kind == "pos":
                m.u32(off + 12, m.u32(off + 12) + 16)
            elif kind == "length_huge":  # consistent check word, impossible length
                m.u32(off, 1 << 30)
                m.u32(off + 4, (1 << 30) ^ CHECK_XOR)
            elif kind == "crc":
                m.mm[off + RECORD_HEADER_SIZE + 5] ^= 0xFF
        with pytest.raises(RingCorrupt):
            c.pop(timeout=1)
        st = c.stats()
        assert st["corrupt_skipped"] == 1 and st["bytes_lost"] > 0
        if kind == "crc":
            assert st["bytes_lost"] == record_size(100)
            assert c.pop(timeout=1) == b"B" * 10  # only the damaged record was lost
        else:
            assert st["used"] == 0  # skipped to the producer's head
        # Not wedged: the ring keeps working, in both directions of the wrap.
        for i in range(50):
            data = bytes([i]) * (i * 37 % 1000)
            p.push(data, timeout=1)
            assert c.pop(timeout=1) == data
        assert c.try_pop() is None and c.stats()["corrupt_skipped"] == 1
    finally:
        m.close()


def test_corrupt_head_is_reported_and_repaired(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    m = Mapped(path)
    try:
        p.push(b"one")
        for bad in (1 << 40, 8, 2**64 - 16):  # too far, off a record boundary, behind tail
            m.u64(OFF_HEAD, (m.u64(OFF_TAIL) + bad) % 2**64)
            with pytest.raises(RingCorrupt, match="implausible head"):
                c.pop(timeout=1)
        p.push(b"two")  # the producer republishes its own head
        assert c.pop() == b"one" and c.pop() == b"two"
    finally:
        m.close()


# -- waiting, shutdown, threads ------------------------------------------------------


def test_shutdown_wakes_blocked_pop_in_another_thread(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    errors: list[BaseException] = []

    def consumer() -> None:
        try:
            c.pop()
        except BaseException as e:  # noqa: BLE001 -- handed to the test thread
            errors.append(e)

    t = threading.Thread(target=consumer)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # really blocked (asleep, GIL released: we are running)
    with pytest.raises(RingError, match="concurrent"):
        c.try_pop()
    with pytest.raises(RingError, match="in progress"):
        c.close()
    p.shutdown()
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RingClosed) and isinstance(errors[0], EOFError)
    with pytest.raises(RingClosed):
        p.push(b"late")
    assert c.closed and p.closed


def test_shutdown_wakes_blocked_push_and_drains(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    while p.try_push(b"x" * 200):
        pass
    n = c.stats()["records_pushed"]
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            p.push(b"y" * 200)  # does not fit: blocks
        except BaseException as e:  # noqa: BLE001 -- handed to the test thread
            errors.append(e)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    c.shutdown()  # from the consumer side
    t.join(5)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], RingClosed)
    # what was pushed before the shutdown is still delivered, then RingClosed
    for _ in range(n):
        assert c.pop(timeout=1) == b"x" * 200
    with pytest.raises(RingClosed):
        c.pop(timeout=1)
    with pytest.raises(RingClosed):
        c.try_pop()
    assert_drained(p, c)


def test_push_wakes_sleeping_pop(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    c_slow = Consumer(path, spin_us=0)
    c.close()
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(c_slow.pop(timeout=10)))
    t.start()
    time.sleep(0.1)
    p.push(b"wake up")
    t.join(5)
    assert got == [b"wake up"]
    st = c_slow.stats()
    assert st["consumer_waits"] >= 1 and st["producer_wakes"] >= 1


def test_closed_end_refuses_use(path: str) -> None:
    p, c = open_pair(path, 1 << 12)
    with pytest.raises(RingError, match="already open"):
        p.__init__(path)  # type: ignore[misc]
    p.close()
    p.close()  # idempotent
    with pytest.raises(RingError, match="closed"):
        p.push(b"x")
    with pytest.raises(RingError, match="closed"):
        p.stats()
    c.close()
    with pytest.raises(RingError, match="closed"):
        c.pop()


@pytest.mark.parametrize("data,expected", CRC_VECTORS)
def test_crc32c_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    mid = len(data) // 2
    assert crc32c(data[mid:], crc32c(data[:mid])) == expected  # continuation, as push_parts


IDLE_CONSUMER = textwrap.dedent("""
    import sys, time
    from fabric_ext.ring import Consumer
    c = Consumer(sys.argv[1])
    t0, c0 = time.monotonic(), time.process_time()
    try:
        c.pop(timeout=1.0)
    except TimeoutError:
        pass
    print(time.monotonic() - t0, time.process_time() - c0, c.stats()["consumer_waits"])
""")


def test_idle_consumer_does_not_burn_a_core(path: str) -> None:
    ring.create(path, 1 << 12)
    out = subprocess.run([sys.executable, "-c", IDLE_CONSUMER, path], capture_output=True, text=True,
                         cwd=ROOT, timeout=30, check=True)
    wall, cpu, waits = out.stdout.split()
    assert float(wall) >= 1.0
    assert float(cpu) < 0.05 * float(wall), f"consumer used {cpu} s CPU in {wall} s blocked in pop"
    assert int(waits) >= 1


ECHO_CHILD = textwrap.dedent("""
    import sys
    from fabric_ext.ring import Consumer, Producer, RingClosed
    inbox, outbox = Consumer(sys.argv[1]), Producer(sys.argv[2])
    while True:
        try:
            rec = inbox.pop(timeout=20)
        except RingClosed:
            break
        outbox.push(rec[::-1])
    outbox.shutdown()
""")


def test_two_processes_echo(path: str) -> None:
    back = path + "-back"
    try:
        p, c = open_pair(path, 1 << 12, crc=True)
        ring.create(back, 1 << 12, crc=True)
        rc = Consumer(back)
        child = subprocess.Popen([sys.executable, "-c", ECHO_CHILD, path, back], cwd=ROOT)
        try:
            for i in range(2000):
                data = os.urandom(i % 700)
                p.push(data, timeout=10)
                assert rc.pop(timeout=10) == data[::-1]
            p.shutdown()
            with pytest.raises(RingClosed):
                rc.pop(timeout=10)
            assert child.wait(10) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert_drained(p, c)
    finally:
        ring.unlink(back)


# -- a compatible peer in C, written from docs/ring.md alone -------------------------------

C_PEER = r"""
/* ring_peer produce|consume PATH N: a producer or consumer of records i = "rec<i>" * (i % 40),
 * following docs/ring.md (not fabric's headers). Exit 0 when all N went through intact. */
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define U32(o) ((uint32_t *)(base + (o)))
#define U64(o) ((uint64_t *)(base + (o)))
static uint8_t *base;
static uint64_t cap, maxrec;
static int crc_on;

static uint32_t crc32c(const uint8_t *p, size_t n) {
    uint32_t c = ~0u;
    while (n--) { c ^= *p++; for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & -(c & 1)); }
    return ~c;
}
static void wake(uint32_t off) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t w = __atomic_load_n(U32(off), __ATOMIC_RELAXED);
    while (w & 1)
        if (__atomic_compare_exchange_n(U32(off), &w, w + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            syscall(SYS_futex, U32(off), FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
            return;
        }
}
/* wait until the counter at `ctr` reaches `thr`, sleeping on futex `word` (no spin) */
static int wait_for(uint32_t ctr, uint64_t thr, uint32_t word) {
    for (;;) {
        if ((int64_t)(__atomic_load_n(U64(ctr), __ATOMIC_ACQUIRE) - thr) >= 0) return 0;
        uint32_t w = __atomic_fetch_or(U32(word), 1, __ATOMIC_SEQ_CST) | 1;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if ((int64_t)(__atomic_load_n(U64(ctr), __ATOMIC_ACQUIRE) - thr) >= 0) return 0;
        if (__atomic_load_n(U32(56), __ATOMIC_ACQUIRE) & 1) return -1;
        syscall(SYS_futex, U32(word), FUTEX_WAIT, w, NULL, NULL, 0);
    }
}
static size_t make(uint64_t i, uint8_t *buf) {
    size_t n = 0;
    for (uint64_t k = 0; k < i % 40; k++) n += (size_t)sprintf((char *)buf + n, "rec%llu", (unsigned long long)i);
    return n;
}
int main(int argc, char **argv) {
    int fd = open(argv[2], O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) return 2;
    base = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (memcmp(base, "FABRING1", 8) || *U32(8) != 1 || *U64(32) != 4096) return 3;
    cap = *U64(16); maxrec = *U64(24); crc_on = *U32(12) & 1;
    if ((uint64_t)st.st_size != 4096 + cap || *U64(40) != 4096 + cap) return 3;
    uint8_t *data = base + 4096, buf[8192], got[8192];
    uint64_t n = strtoull(argv[3], NULL, 10);
    if (!strcmp(argv[1], "produce")) {
        uint64_t head = *U64(128);
        for (uint64_t i = 0; i < n; i++) {
            uint32_t len = (uint32_t)make(i, buf);
            uint64_t size = (16 + len + 15) & ~15ull, left = cap - (head & (cap - 1));
            uint64_t need = size <= left ? size : left + size;
            if (wait_for(256, head + need - cap, 264)) return 4;
            if (size > left) {
                uint32_t *m = (uint32_t *)(data + (head & (cap - 1)));
                m[0] = 0xFFFFFFFFu; m[1] = 0xFFFFFFFFu ^ 0x52C9E1A7u; m[2] = 0; m[3] = (uint32_t)head;
                head += left;
            }
            uint32_t *r = (uint32_t *)(data + (head & (cap - 1)));
            memcpy(r + 4, buf, len);
            r[0] = len; r[1] = len ^ 0x52C9E1A7u; r[2] = crc_on ? crc32c(buf, len) : 0; r[3] = (uint32_t)head;
            head += size;
            __atomic_store_n(U64(128), head, __ATOMIC_RELEASE);
            wake(136);
        }
        return 0;
    }
    uint64_t tail = *U64(256);
    for (uint64_t i = 0; i < n;) {
        if (wait_for(128, tail + 1, 136)) return 5;
        uint32_t *r = (uint32_t *)(data + (tail & (cap - 1)));
        if (r[1] != (r[0] ^ 0x52C9E1A7u) || r[3] != (uint32_t)tail) return 6;
        if (r[0] == 0xFFFFFFFFu) { tail += cap - (tail & (cap - 1)); goto publish; }
        if (r[0] > maxrec) return 6;
        memcpy(got, r + 4, r[0]);
        if (crc_on && crc32c(got, r[0]) != r[2]) return 7;
        if (r[0] != make(i, buf) || memcmp(got, buf, r[0])) return 8;
        tail += (16 + r[0] + 15) & ~15ull;
        i++;
    publish:
        __atomic_store_n(U64(256), tail, __ATOMIC_RELEASE);
        wake(264);
    }
    return 0;
}
"""


def c_record(i: int) -> bytes:
    return f"rec{i}".encode() * (i % 40)


@pytest.fixture(scope="module")
def c_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ring_peer")
    (d / "ring_peer.c").write_text(C_PEER)
    subprocess.run(["gcc", "-std=gnu11", "-O2", "-Wall", "-o", str(d / "ring_peer"), str(d / "ring_peer.c")],
                   check=True, capture_output=True, timeout=60)
    return d / "ring_peer"


@pytest.mark.parametrize("crc", [False, True])
def test_c_producer_from_the_docs(path: str, c_peer: Path, crc: bool) -> None:
    n = 20_000
    ring.create(path, 1 << 12, crc=crc, start_counter=2**32 - 2048)  # small ring: wraps, waits, crossing
    c = Consumer(path, spin_us=0)
    child = subprocess.Popen([str(c_peer), "produce", path, str(n)])
    try:
        for i in range(n):
            assert c.pop(timeout=10) == c_record(i)
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    st = c.stats()
    assert st["records_popped"] == n and st["corrupt_skipped"] == 0 and st["used"] == 0


@pytest.mark.parametrize("crc", [False, True])
def test_c_consumer_from_the_docs(path: str, c_peer: Path, crc: bool) -> None:
    n = 20_000
    ring.create(path, 1 << 12, crc=crc, start_counter=2**64 - 2048)
    p = Producer(path, spin_us=0)
    child = subprocess.Popen([str(c_peer), "consume", path, str(n)])
    try:
        for i in range(n):
            data = c_record(i)
            p.push_parts(data[:3], data[3:], timeout=10)
        assert child.wait(10) == 0, "the C consumer found a record it could not read (see its exit code)"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert p.stats()["used"] == 0 and p.pushed == n
