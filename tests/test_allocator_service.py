"""The allocator through the real bus: a real nats-server, the real service, real clients.

Covers the three encodings (JSON, MessagePack, frames), every endpoint, batches,
chunking past the max payload, leases, capabilities (read-only, forged), the local
fast path, ``$SRV`` discovery, and a table of hostile inputs after which the service
still serves and nobody else's bytes changed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

import msgspec
import pytest

from fabric import (
    AsyncFabricClient,
    BadRequest,
    DoubleFree,
    InvalidFrame,
    NotFound,
    OutOfRange,
    PermissionDenied,
    StaleHandle,
    TooLarge,
    Unavailable,
    UnknownHandle,
)
from fabric.errors import OutOfMemory
from fabric_ext import wire
from tests._nats import connect, creds_for, realm

pytestmark = pytest.mark.usefixtures("mem_accounting")


async def raw(nats_url: str, subject: str, data: bytes, headers: dict[str, str] | None = None):
    nc = await connect(nats_url)
    try:
        return await nc.request(subject, data, headers=headers, timeout=5)
    finally:
        await nc.close()


def subj(allocator, verb: str) -> str:
    return f"fabric.mem.{allocator.node}.{verb}"


async def test_alloc_write_read_free_roundtrip(aclient, allocator):
    buf = await aclient.rmalloc(1024)
    assert len(buf) == 1024
    assert await aclient.rread(buf) == bytes(1024), "a new block reads as zeros"
    assert await aclient.rwrite(buf, b"hello", offset=0) == 5
    assert await aclient.rread(buf, 5) == b"hello"
    assert await aclient.rread(buf, 3, offset=1) == b"ell"
    await aclient.rwrite(buf, b"!", offset=1023)
    assert (await aclient.rread(buf, 1, offset=1023)) == b"!"
    assert await aclient.rfree(buf) == 1024


async def test_alloc_on_named_node_and_any_node(aclient, allocator):
    a = await aclient.rmalloc(10, node=allocator.node)
    b = await aclient.rmalloc(10)
    assert a.handle.split(":")[1] == allocator.node == b.handle.split(":")[1]
    await aclient.rfree(a)
    await aclient.rfree(b)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 127, 128, 129, 4096, 65536, 1 << 20])
async def test_boundary_sizes(aclient, allocator, size):
    buf = await aclient.rmalloc(size)
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    if size:
        await aclient.rwrite(buf, data)
    assert await aclient.rread(buf) == data
    with pytest.raises(OutOfRange):
        await aclient.rread(buf, 1, offset=size)
    with pytest.raises(OutOfRange):
        await aclient.rwrite(buf, b"x", offset=size)
    await aclient.rfree(buf)


async def test_double_free_and_use_after_free(aclient, allocator):
    buf = await aclient.rmalloc(64)
    await aclient.rfree(buf)
    with pytest.raises(DoubleFree) as exc:
        await aclient.rfree(buf)
    assert exc.value.code == 409
    with pytest.raises(StaleHandle):
        await aclient.rread(buf, 1)
    with pytest.raises(StaleHandle):
        await aclient.rwrite(buf, b"x")


async def test_handle_answers_as_documented(nats_url, allocator, aclient):
    """docs/protocol.md, Handles: the code for each way a handle can be wrong, on every verb that takes one."""
    buf = await aclient.rmalloc(8)
    other_node = buf.handle.replace(f":{allocator.node}:", ":some-other-node:", 1)
    cases = [
        ("x" * 256, 400, "bad_request"),           # over 255 characters
        ("", 400, "bad_request"),
        ("garbage", 404, "unknown_handle"),        # malformed
        ("v1:a:b", 404, "unknown_handle"),
        (buf.handle.replace(":1:", ":99999999999999999999999:", 1), 404, "unknown_handle"),  # a field out of range
        (other_node, 404, "unknown_handle"),       # another node's handle sent here
    ]
    try:
        for verb in ("stat", "read", "free", "share", "attach"):
            for handle, code, kind in cases:
                msg = await raw(nats_url, subj(allocator, verb), json.dumps({"handle": handle}).encode())
                assert msg.headers["Nats-Service-Error-Code"] == str(code), (verb, handle[:40], msg.headers)
                assert msg.headers["Fabric-Error"] == kind, (verb, handle[:40], msg.headers)
    finally:
        await aclient.rfree(buf)
    # every free after the first is 409, however many and whatever reuses the memory
    again = await aclient.rmalloc(8)
    for _ in range(3):
        msg = await raw(nats_url, subj(allocator, "free"), json.dumps({"handle": buf.handle}).encode())
        assert msg.headers["Nats-Service-Error-Code"] == "409" and msg.headers["Fabric-Error"] == "double_free"
    await aclient.rfree(again)


async def test_forged_and_widened_handles_are_unknown(aclient, allocator):
    buf = await aclient.rmalloc(32)
    parts = buf.handle.split(":")
    forged_gen = ":".join(parts[:4] + [str(int(parts[4]) + 1)] + parts[5:])
    bad_mac = buf.handle[:-1] + ("0" if buf.handle[-1] != "0" else "1")
    for token in (forged_gen, bad_mac, "v1:nosuch", "garbage"):
        with pytest.raises((UnknownHandle, Unavailable)):
            await aclient.rread(token, 1)
    ro = await aclient.rshare(buf)
    widened = ro.replace(":r:", ":rw:")
    with pytest.raises(UnknownHandle):
        await aclient.rwrite(widened, b"x")
    await aclient.rfree(buf)


async def test_read_only_share(aclient, allocator):
    buf = await aclient.rmalloc(8)
    await aclient.rwrite(buf, b"shared!!")
    ro = await aclient.rshare(buf)
    assert await aclient.rread(ro) == b"shared!!"
    for op in (aclient.rwrite(ro, b"no"), aclient.rfree(ro), aclient.rrealloc(ro, 4)):
        with pytest.raises(PermissionDenied) as exc:
            await op
        assert exc.value.code == 403
    st = await aclient.rstat(ro)
    assert (st.size, st.writable) == (8, False)
    await aclient.rfree(buf)


async def test_realloc_preserves_content(aclient, allocator):
    buf = await aclient.rmalloc(100)
    await aclient.rwrite(buf, b"a" * 100)
    await aclient.rrealloc(buf, 5000)
    assert len(buf) == 5000
    got = await aclient.rread(buf)
    assert got[:100] == b"a" * 100 and got[100:] == bytes(4900)
    await aclient.rrealloc(buf, 10)
    assert await aclient.rread(buf) == b"a" * 10
    await aclient.rfree(buf)


async def test_batches_through_frames(aclient, allocator):
    bufs = [await aclient.rmalloc(1024) for _ in range(50)]
    payloads = [bytes([i]) * 1024 for i in range(50)]
    written = await aclient.rwritev([(b, 0, p) for b, p in zip(bufs, payloads, strict=True)])
    assert written == [1024] * 50
    got = await aclient.rreadv([(b, 0, 1024) for b in bufs])
    assert got == payloads
    # one bad item does not spoil the others
    await aclient.rfree(bufs[3])
    got = await aclient.rreadv([(b, 0, 16) for b in bufs[:5]], return_exceptions=True)
    # a batch item carries only its code: 404 is the NotFound family
    assert isinstance(got[3], NotFound) and got[3].code == 404
    assert got[4] == payloads[4][:16]
    with pytest.raises(NotFound):
        await aclient.rreadv([(b, 0, 16) for b in bufs[:5]])
    for b in bufs[:3] + bufs[4:]:
        await aclient.rfree(b)


async def test_batch_reads_without_the_fast_path(aclient, allocator):
    """Handles this process never parsed, a generator, several nodes: the general path."""
    from fabric import handles

    bufs = [await aclient.rmalloc(64) for _ in range(3)]
    for i, b in enumerate(bufs):
        await aclient.rwrite(b, bytes([i]) * 64)
    handles._PARSED.clear()  # as in a process that got these handles from elsewhere
    got = await aclient.rreadv((b.handle, 0, None) for b in bufs)
    assert got == [bytes([i]) * 64 for i in range(3)]
    again = [(b, 8, 8) for b in bufs]
    assert wire.encode_reads(again, handles._PARSED, (type(bufs[0]),)) is not None  # the general path parsed them
    assert await aclient.rreadv(again) == [bytes([i]) * 8 for i in range(3)]
    node = handles.parse(bufs[0].handle).node
    ghost = bufs[0].handle.replace(f":{node}:", ":ghost-node:", 1)
    with pytest.raises(Unavailable):  # the batch splits by node; no allocator serves that one
        await aclient.rreadv([(bufs[1], 0, 8), (ghost, 0, 8)])
    for b in bufs:
        await aclient.rfree(b)


async def test_large_reads_travel_in_concurrent_chunks(nats_url, allocator):
    data = os.urandom(300_000)
    # NATS-sized chunks are the NATS path's (the data plane takes a value in pieces of its frame limit)
    async with AsyncFabricClient(nats_url, local=False, read_chunk_size=4096, data_plane=False) as fc:
        assert fc.read_chunk == 4096
        buf = await fc.rmalloc(len(data))
        await fc.rwrite(buf, data)
        # a client-role user's reads arrive on the user form (fabric.u.*.mem.<node>.read), an admin's on the plain
        reads = [ep for ep in allocator._endpoints if ep.name in ("read", "read-user")]
        before = sum(ep.num_requests for ep in reads)
        assert await fc.rread(buf) == data  # a few of the chunk requests in flight at a time
        assert sum(ep.num_requests for ep in reads) - before == -(-len(data) // 4096)  # 74: one per chunk
        assert await fc.rread(buf, 10_000, 5) == data[5:10_005]
        assert await fc.rread(buf.handle, 10_000, 4091) == data[4091:14_091]
        await fc.rfree(buf)
        with pytest.raises(NotFound):  # every chunk fails; the error is the block's, not a partial read
            await fc.rread(buf.handle, 10_000)
    for bad in (0, 4095, True, 1.5, "1"):
        with pytest.raises(BadRequest):
            AsyncFabricClient(nats_url, read_chunk_size=bad)


async def test_sync_client_writes_large_values_window_by_window(nats_url, allocator, monkeypatch):
    from fabric import FabricClient
    from fabric import client as client_module

    monkeypatch.setattr(client_module, "CHUNKS_IN_FLIGHT", 2)  # 20 MiB = 3 chunks = 2 windows
    size = 20 << 20
    data = bytes(range(256)) * (size // 256)

    def work() -> None:
        with FabricClient(nats_url, local=False) as fc:
            buf = fc.rmalloc(size)
            assert fc.rwrite(buf, data) == size
            assert fc.rread(buf) == data
            assert fc.rwrite(buf, b"xyz", offset=size - 3) == 3
            assert fc.rread(buf, 6, size - 6) == data[-6:-3] + b"xyz"
            fc.rfree(buf)

    await asyncio.to_thread(work)  # the sync client blocks: keep this loop (the allocator's) running


async def test_large_values_are_chunked(aclient, allocator):
    size = 20 << 20  # > 8 MiB max payload of the test server
    data = (bytes(range(256)) * (size // 256))
    buf = await aclient.rmalloc(size)
    assert await aclient.rwrite(buf, data) == size
    assert await aclient.rread(buf) == data
    assert await aclient.rread(buf.handle) == data  # size unknown to the client: stat + chunks
    await aclient.rfree(buf)


async def test_lease_expires_and_renew(aclient, allocator):
    short = await aclient.rmalloc(16, ttl=0.3, keepalive=False)
    kept = await aclient.rmalloc(16, ttl=0.3, keepalive=False)
    await aclient.renew(kept, 60)
    await asyncio.sleep(2.5)  # the reaper runs every second
    with pytest.raises(StaleHandle):
        await aclient.rread(short, 1)
    assert await aclient.rread(kept, 1) == b"\x00"
    await aclient.rfree(kept)


async def test_keepalive_renews_until_the_client_closes(nats_url, allocator, aclient):
    async with AsyncFabricClient(nats_url, local=False) as holder:
        buf = await holder.rmalloc(32, ttl=1.5)
        moved = await holder.rmalloc(32, ttl=1.5)
        await holder.rrealloc(moved, 1 << 20)  # a move: renewals follow the new handle
        await asyncio.sleep(4.0)  # well past the ttl: alive only because the holder renews
        assert await aclient.rread(buf.handle, 4) == bytes(4)
        assert await aclient.rread(moved.handle, 4) == bytes(4)
    # the holder is gone: nobody renews, the allocator reclaims both within ttl + ~1 s
    await asyncio.sleep(3.5)
    for handle in (buf.handle, moved.handle):
        with pytest.raises(StaleHandle):
            await aclient.rread(handle, 1)


async def test_keepalive_stops_after_free(nats_url, allocator):
    async with AsyncFabricClient(nats_url, local=False) as fc:
        buf = await fc.rmalloc(8, ttl=5)
        assert buf.handle in fc._leases
        await fc.rfree(buf)
        assert buf.handle not in fc._leases


async def test_json_from_any_language(nats_url, allocator):
    """What a client in another language does: plain JSON, base64 bytes."""
    r = json.loads((await raw(nats_url, "fabric.mem.alloc", b'{"size": 12}')).data)
    handle = r["handle"]
    assert r["size"] == 12 and r["node"] == allocator.node
    w = await raw(nats_url, subj(allocator, "write"),
                  json.dumps({"handle": handle, "data": base64.b64encode(b"hi there").decode()}).encode())
    assert json.loads(w.data) == {"written": 8}
    rd = await raw(nats_url, subj(allocator, "read"), json.dumps({"handle": handle, "length": 8}).encode())
    assert base64.b64decode(json.loads(rd.data)["data"]) == b"hi there"
    st = json.loads((await raw(nats_url, subj(allocator, "stat"), json.dumps({"handle": handle}).encode())).data)
    assert st["size"] == 12 and st["writable"] is True
    f = await raw(nats_url, subj(allocator, "free"), json.dumps({"handle": handle}).encode())
    assert json.loads(f.data) == {"freed": 12}


async def test_msgpack_in_msgpack_out(nats_url, allocator):
    hdr = {"Content-Type": "application/msgpack"}
    r = await raw(nats_url, "fabric.mem.alloc", msgspec.msgpack.encode({"size": 4}), hdr)
    assert r.headers["Content-Type"] == "application/msgpack"
    handle = msgspec.msgpack.decode(r.data)["handle"]
    await raw(nats_url, subj(allocator, "write"), msgspec.msgpack.encode({"handle": handle, "data": b"\x00\xffab"}),
              hdr)
    rd = msgspec.msgpack.decode((await raw(nats_url, subj(allocator, "read"),
                                           msgspec.msgpack.encode({"handle": handle}), hdr)).data)
    assert rd["data"] == b"\x00\xffab"  # raw bin, no base64
    err = await raw(nats_url, subj(allocator, "free"), msgspec.msgpack.encode({"handle": "v1:x"}), hdr)
    assert err.headers["Nats-Service-Error-Code"] == "404"
    assert msgspec.msgpack.decode(err.data)["error"]["kind"] == "unknown_handle"
    await raw(nats_url, subj(allocator, "free"), msgspec.msgpack.encode({"handle": handle}), hdr)


HOSTILE_JSON = [
    ("alloc", b"{not json", 400, "bad_request"),
    ("alloc", b"", 400, "bad_request"),
    ("alloc", b'{"size": "big"}', 400, "bad_request"),
    ("alloc", b'{"size": -1}', 400, "bad_request"),
    ("alloc", b'{"size": 1.5}', 400, "bad_request"),
    ("alloc", b'{"size": 18446744073709551616}', 400, "bad_request"),  # past every integer bound
    ("alloc", b'{"size": 18446744073709551615}', 400, "bad_request"),
    ("alloc", b'{"size": 9223372036854775807}', 413, "too_large"),  # an integer, but past the largest block
    ("alloc", b'{"size": 35184372088833}', 413, "too_large"),  # 32 TiB + 1
    ("alloc", b'{"size": 35184372088832}', None, None),  # 32 TiB exactly: 413 or 507, never allocates
    ("alloc", b'{"size": 8, "owner": "bad owner!"}', 400, "bad_request"),
    ("alloc", b'{"size": 8, "ttl_s": -3}', 400, "bad_request"),
    ("alloc", b"[1, 2, 3]", 400, "bad_request"),
    ("free", b'{"handle": 7}', 400, "bad_request"),
    ("free", b'{"handle": ""}', 400, "bad_request"),
    ("free", b'{"handle": "v1:n:0:0:0:rw:00000000000000000000000000000000"}', 404, "unknown_handle"),
    ("read", b'{"handle": "' + b"x" * 300 + b'"}', 400, "bad_request"),
    ("read", b'{"handle": "v1:a:b"}', 404, "unknown_handle"),
    ("write", b'{"handle": "v1:a:b", "data": "!!notbase64"}', 400, "bad_request"),
    ("readv", b'{"items": "no"}', 400, "bad_request"),
    ("realloc", b'{"handle": "h"}', 400, "bad_request"),
]


@pytest.mark.parametrize("verb,body,code,kind", HOSTILE_JSON)
async def test_hostile_json_gets_4xx_and_service_keeps_serving(nats_url, allocator, aclient, verb, body, code, kind):
    victim = await aclient.rmalloc(32)
    await aclient.rwrite(victim, b"v" * 32)
    subject = "fabric.mem.alloc" if verb == "alloc" else subj(allocator, verb)
    msg = await raw(nats_url, subject, body)
    got = int(msg.headers["Nats-Service-Error-Code"])
    if code is None:
        assert got in (413, 507)
    else:
        assert got == code, msg.headers
        assert msg.headers["Fabric-Error"] == kind
    assert msg.headers["Nats-Service-Error"]
    assert json.loads(msg.data)["error"]["code"] == got
    assert await aclient.rread(victim) == b"v" * 32, "another client's data changed"
    await aclient.rfree(victim)


def _hostile_frames(handle: str) -> list[tuple[str, bytes, int]]:
    good_read = wire.encode(wire.KIND_READ, [(handle, 0, 4, 0)])
    good_write = wire.encode(wire.KIND_WRITE, [(handle, 0, 4, 0)], [b"abcd"])
    return [
        ("read", b"", 400),
        ("read", good_read[:10], 400),
        ("read", good_read[:-1], 400),
        ("read", b"XXXX" + good_read[4:], 400),
        ("read", good_write, 400),  # wrong kind for the endpoint
        ("write", good_write[:-2], 400),
        ("write", good_write[:16] + (2**64 - 1).to_bytes(8, "little") + good_write[24:], 413),
        ("write", wire.encode(wire.KIND_WRITE, [(handle, 2**62, 4, 0)], [b"abcd"]), 400),
        ("read", wire.encode(wire.KIND_READ, [(handle, 0, 2**40, 0)]), 400),
        ("read", wire.encode(wire.KIND_READ, [("v1:zz", 0, 4, 0)]), 404),
    ]


async def test_hostile_frames(nats_url, allocator, aclient):
    victim = await aclient.rmalloc(4)
    await aclient.rwrite(victim, b"keep")
    hdr = {"Content-Type": wire.CONTENT_TYPE}
    for verb, body, code in _hostile_frames(victim.handle):
        msg = await raw(nats_url, subj(allocator, verb), body, hdr)
        assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == str(code), (verb, body[:32], msg.headers)
    assert await aclient.rread(victim) == b"keep"
    await aclient.rfree(victim)


async def test_out_of_memory_and_too_large_are_typed(aclient, allocator):
    with pytest.raises((OutOfMemory, TooLarge)) as exc:
        await aclient.rmalloc(allocator.capacity + 1)
    assert exc.value.code in (413, 507)
    with pytest.raises(BadRequest):
        await aclient.rmalloc(-5)


async def test_srv_discovery_and_stats(nats_url, allocator, aclient):
    buf = await aclient.rmalloc(8)
    await aclient.rread(buf, 8)
    await aclient.rfree(buf)
    nc = await connect(nats_url)
    try:
        ping = json.loads((await nc.request("$SRV.PING.allocator", b"", timeout=2)).data)
        assert ping["name"] == "allocator" and ping["metadata"]["node"]
        info = json.loads((await nc.request(f"$SRV.INFO.allocator.{ping['id']}", b"", timeout=2)).data)
        assert info["description"] and info["version"].count(".") == 2
        assert {e["subject"] for e in info["endpoints"]} >= {"fabric.mem.alloc", subj(allocator, "read")}
        stats = json.loads((await nc.request(f"$SRV.STATS.allocator.{ping['id']}", b"", timeout=2)).data)
        read = next(e for e in stats["endpoints"] if e["name"] == "read")
        assert read["num_requests"] >= 1 and read["processing_time"] > 0
    finally:
        await nc.close()


async def test_local_fast_path_skips_the_bus(nats_url, allocator):
    async with AsyncFabricClient(nats_url, local=True) as fc:
        buf = await fc.rmalloc(4096)
        await fc.rwrite(buf, b"local")  # first use attaches the segment

        def counts() -> list[int]:  # both forms of read and write: none of them may see the local path
            return [e.num_requests for e in allocator._endpoints if e.name.split("-")[0] in ("read", "write")]

        before = counts()
        for _ in range(20):
            await fc.rwrite(buf, b"LOCAL", offset=100)
            assert await fc.rread(buf, 5, offset=100) == b"LOCAL"
        assert counts() == before, "local path went through NATS"
        # the service sees what the local path wrote
        async with AsyncFabricClient(nats_url, local=False) as remote:
            assert await remote.rread(buf.handle, 5, offset=100) == b"LOCAL"
        await fc.rfree(buf)
        with pytest.raises(StaleHandle):
            await fc.rread(buf, 1)  # the mapping checks generations too


async def test_meminfo(aclient, allocator):
    before = (await aclient.meminfo(allocator.node)).owners.get("tester", {}).get("in_use", 0)
    buf = await aclient.rmalloc(1000, owner="alice")  # a user's blocks are the user's: the typed owner is ignored
    info = await aclient.meminfo(allocator.node)
    assert info.node == allocator.node and info.in_use >= 1000 and info.blocks >= 1
    assert info.owners["tester"]["in_use"] == before + 1000 and "alice" not in info.owners
    await aclient.rfree(buf)


async def test_unknown_node_is_unavailable(aclient, allocator):
    with pytest.raises(Unavailable):
        await aclient.rread("v1:nosuchnode:1:64:1:rw:" + "0" * 32, 1)


async def test_frames_only_where_the_endpoint_takes_them(nats_url, allocator, aclient):
    buf = await aclient.rmalloc(4)
    frame = wire.encode(wire.KIND_READ, [(buf.handle, 0, 4, 0)])
    try:
        for verb in ("stat", "free", "alloc", "readv", "info"):
            msg = await raw(nats_url, subj(allocator, verb), frame)
            assert msg.headers["Nats-Service-Error-Code"] == "400", (verb, msg.headers)
            assert "takes no binary frames" in msg.headers["Nats-Service-Error"], (verb, msg.headers)
        assert wire.decode((await raw(nats_url, subj(allocator, "read"), frame)).data).data(0) == bytes(4)
    finally:
        await aclient.rfree(buf)


async def test_a_reply_past_the_max_payload_reports_its_real_size(nats_url, allocator, aclient):
    max_payload = aclient.max_payload
    length = max_payload - wire.HEADER_SIZE - wire.ITEM_FIXED + 1  # the DATA frame: one byte too many
    buf = await aclient.rmalloc(length)
    try:
        msg = await raw(nats_url, subj(allocator, "read"), wire.encode(wire.KIND_READ, [(buf.handle, 0, length, 0)]))
        assert msg.headers["Nats-Service-Error-Code"] == "413", msg.headers
        text = msg.headers["Nats-Service-Error"]
        assert f"a reply of {max_payload + 1} bytes" in text and f"({max_payload})" in text, text
        one_less = wire.encode(wire.KIND_READ, [(buf.handle, 0, length - 1, 0)])
        assert len((await raw(nats_url, subj(allocator, "read"), one_less)).data) == max_payload
    finally:
        await aclient.rfree(buf)


async def test_info_reports_the_largest_block(aclient, allocator):
    from fabric_ext.arena import MAX_BLOCK_SIZE

    info = await aclient.meminfo(allocator.node)
    assert info.largest_block == MAX_BLOCK_SIZE == 32 << 40
    with pytest.raises(TooLarge) as exc:
        await aclient.rmalloc(info.largest_block + 1)
    assert str(info.largest_block) in exc.value.message


async def test_invalid_frame_error_class(aclient, allocator):
    with pytest.raises(InvalidFrame):
        await aclient.request(subj(allocator, "read"), b"FBF1", {"Content-Type": wire.CONTENT_TYPE})


async def test_owner_quota_through_the_bus(nats_url, tmp_path):
    from fabric.errors import QuotaExceeded
    from fabric.service import ServiceSettings
    from fabric.services.allocator import AllocatorService

    svc = AllocatorService(ServiceSettings(credentials=creds_for(AllocatorService),
                                           nats_url=nats_url, node="quota-node", state_dir=tmp_path),
                           capacity=16 << 20, quotas={"capped": 1000, "tester": 1000})
    await svc.start()
    try:
        # a user's quota account is the user, whatever owner the client names
        async with AsyncFabricClient(nats_url, local=False, owner="other") as user:
            held = await user.rmalloc(600, node="quota-node")
            with pytest.raises(QuotaExceeded, match="tester"):
                await user.rmalloc(600, node="quota-node")
            await user.rfree(held)
        # a trusted caller (the admin: plain subjects) names the owner it accounts to
        async with AsyncFabricClient(nats_url, local=False, owner="capped", credentials=realm().admin) as fc:
            a = await fc.rmalloc(600, node="quota-node")
            with pytest.raises(QuotaExceeded) as exc:
                await fc.rmalloc(600, node="quota-node")
            assert exc.value.code == 429 and "capped" in exc.value.message
            free_owner = await fc.rmalloc(600, node="quota-node", owner="other")  # other owners unaffected
            await fc.rfree(a)
            b = await fc.rmalloc(600, node="quota-node")  # room again after the free
            info = await fc.meminfo("quota-node")
            assert info.owners["capped"]["quota"] == 1000 and info.owners["capped"]["in_use"] == 600
            await fc.rfree(b)
            await fc.rfree(free_owner)
    finally:
        await svc.stop()
        from fabric_ext.arena import Arena

        Arena(svc.prefix, 1 << 30).destroy()


def test_quota_env_parsing(tmp_path):
    # FABRIC_MEM_QUOTAS is read by the configuration (fabric.config), which the kit hands the allocator
    from fabric.config import load_config

    def quotas(raw: str) -> dict[str, int]:
        loaded = load_config(environ={"FABRIC_MEM_QUOTAS": raw}, flags={"state_dir": ("--state-dir", str(tmp_path))})
        return loaded.config.mem.quotas

    assert quotas("alice=1024, bob=0") == {"alice": 1024, "bob": 0}
    with pytest.raises(ValueError, match="owner=bytes"):
        quotas("alice")
