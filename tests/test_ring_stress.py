"""Two-process stress of fabric_ext.ring: a million checksummed records through a real child.

Each record carries its sequence number and a checksum of its payload (zlib.crc32,
independent of the ring's own CRC32C); the receiving side checks that every record
arrives once, in order, intact.  A second run uses the smallest ring and no spinning,
so nearly every record goes through the futex sleep/wake path on one side or the other.
"""

from __future__ import annotations

import secrets
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric_ext import ring
from fabric_ext.ring import MIN_CAPACITY, Consumer, Producer, RingClosed

ROOT = Path(__file__).resolve().parents[1]

# Shared by both sides: record i = <seq u64><crc32 u32> + PAYLOAD[i % 251 : i % 251 + i % MOD]
CODEC = textwrap.dedent("""
    import struct, zlib
    HEAD = struct.Struct("<QI")
    PAYLOAD = bytes((i * 131 + 7) & 0xFF for i in range(4096))
    def payload(i, mod):
        s = i % 251
        return PAYLOAD[s : s + i % mod]
""")

PRODUCER_CHILD = CODEC + textwrap.dedent("""
    import sys
    from fabric_ext.ring import Producer
    p = Producer(sys.argv[1], spin_us=float(sys.argv[4]))
    n, mod = int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        body = payload(i, mod)
        p.push_parts(HEAD.pack(i, zlib.crc32(body)), body, timeout=30)
    p.shutdown()
""")

CONSUMER_CHILD = CODEC + textwrap.dedent("""
    import sys
    from fabric_ext.ring import Consumer, RingClosed
    c = Consumer(sys.argv[1], spin_us=float(sys.argv[4]))
    n, mod = int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        rec = c.pop(timeout=30)
        seq, crc = HEAD.unpack_from(rec)
        body = rec[HEAD.size:]
        if seq != i or zlib.crc32(body) != crc or body != payload(i, mod):
            sys.exit(f"record {i}: got seq {seq}, {len(body)} bytes, crc ok={zlib.crc32(body) == crc}")
    try:
        c.pop(timeout=30)
        sys.exit("a record after the last one")
    except RingClosed:
        pass
    print(c.stats())
""")

ns: dict = {}
exec(CODEC, ns)  # the same record codec in this process
HEAD: struct.Struct = ns["HEAD"]
payload = ns["payload"]


@pytest.fixture
def path() -> Iterator[str]:
    p = f"/dev/shm/fabric-ring-stress-{secrets.token_hex(6)}"
    yield p
    ring.unlink(p)


def test_million_records_child_producer(path: str) -> None:
    n, mod = 1_000_000, 200
    ring.create(path, 1 << 16, crc=True)
    c = Consumer(path)
    child = subprocess.Popen([sys.executable, "-c", PRODUCER_CHILD, path, str(n), str(mod), "50"], cwd=ROOT)
    try:
        t0 = time.monotonic()
        for i in range(n):
            rec = c.pop(timeout=30)
            seq, crc = HEAD.unpack_from(rec)
            body = rec[HEAD.size:]
            assert seq == i, f"record {i} arrived as {seq}"
            assert zlib.crc32(body) == crc and body == payload(i, mod), f"record {i} damaged"
        with pytest.raises(RingClosed):
            c.pop(timeout=30)
        elapsed = time.monotonic() - t0
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    st = c.stats()
    assert st["records_pushed"] == st["records_popped"] == n
    assert st["corrupt_skipped"] == 0 and st["used"] == 0
    print(f"1M records in {elapsed:.1f} s; {st}")


def test_small_ring_no_spin_child_consumer(path: str) -> None:
    """Parent produces into a 1 KiB ring, nobody spins: the futex path under load."""
    n, mod = 200_000, MIN_CAPACITY // 4 - HEAD.size + 1
    ring.create(path, MIN_CAPACITY, crc=True)
    p = Producer(path, spin_us=0)
    child = subprocess.Popen([sys.executable, "-c", CONSUMER_CHILD, path, str(n), str(mod), "0"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        for i in range(n):
            body = payload(i, mod)
            p.push_parts(HEAD.pack(i, zlib.crc32(body)), body, timeout=30)
        p.shutdown()
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0, out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    st = p.stats()
    assert st["records_pushed"] == st["records_popped"] == n
    assert st["corrupt_skipped"] == 0 and st["used"] == 0
    assert st["producer_waits"] + st["consumer_waits"] > 0  # the sleep path really ran
    print(st)
