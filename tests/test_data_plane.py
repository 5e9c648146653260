"""The allocator's data plane, end to end: tickets, limits, hostile peers, fallback, failure, TLS.

Against real components: the session's nats-server (auth on) and allocator, and allocators
of their own where a test needs to break one.  Every memory test that uses the ``aclient``
fixture runs over the data plane and over NATS (tests/conftest.py); this file is about what
is particular to the data plane.  Across a real interface (a veth pair between network
namespaces): tests/test_data_plane_netns.py.  The C loops alone: tests/test_dataplane_ext.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric import AsyncFabricClient, FabricClient
from fabric.config import FabricConfig
from fabric.config.model import MemConfig
from fabric.credentials import read_credentials
from fabric.errors import RequestTimedOut, StaleHandle, Unavailable
from fabric.handles import HandleSigner
from fabric.protocol import dataplane, wire
from fabric.schema import JSON, TicketReply
from fabric.service import ServiceSettings
from fabric.services.allocator import AllocatorService
from fabric.services.allocator.data_plane import DataPlaneLimits, DataPlaneServer
from fabric.services.allocator.frames import FrameHandler
from fabric.services.allocator.tickets import TicketBook
from fabric_ext.arena import Arena
from tests._allocator import start_allocator, wait_ready
from tests._nats import connect, creds_for, realm

KIB = 1024


def dial(addr: str, timeout: float = 5.0) -> socket.socket:
    host, _, port = addr.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionResetError(f"closed after {len(out)} of {n} bytes")
        out += got
    return out


def answer(sock: socket.socket) -> tuple[str, Any]:
    """The server's next frame: ("welcome", (max_frame, idle_ms)), ("error", (code, kind, message)), ("frame", b)."""
    head = recv_exactly(sock, 12)
    if head[:4] == dataplane.ERROR_MAGIC:
        head += recv_exactly(sock, dataplane.error_frame_length(head) - 12)
        return "error", dataplane.parse_error(head)[:3]
    if head[:4] == dataplane.HELLO_MAGIC:
        return "welcome", dataplane.parse_welcome(head + recv_exactly(sock, 4))
    head += recv_exactly(sock, 12)
    return "frame", head + recv_exactly(sock, wire.frame_length(head) - 24)


def closed(sock: socket.socket) -> bool:
    try:
        sock.settimeout(3)
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def ticket(nats_url: str, node: str, creds: Path | None = None) -> TicketReply:
    """A ticket asked for as *creds*' user (its user form), or as the admin (the plain form)."""
    import nats

    if creds is None:
        nc = await connect(nats_url)
    else:
        nc = await nats.connect(nats_url, **read_credentials(creds).connect_options())
    try:
        user = read_credentials(creds).user if creds is not None else None
        subject = f"fabric.u.{user}.mem.{node}.ticket" if user else f"fabric.mem.{node}.ticket"
        reply = await nc.request(subject, b"{}", timeout=5)
        return JSON.decode(reply.data, TicketReply)
    finally:
        await nc.close()


# -- through the session's allocator ---------------------------------------------------------


async def test_the_allocator_advertises_its_data_plane(nats_url, allocator):
    dp = allocator.data_plane
    assert dp is not None and dp.address == f"127.0.0.1:{dp.port}"
    t = await ticket(nats_url, allocator.node, realm().client)
    assert (t.data_addr, t.tls, t.max_frame) == (dp.address, False, 64 << 20)
    assert t.ticket.startswith("t1.tester.") and t.expires_ms > time.time() * 1000
    nc = await connect(nats_url)
    try:
        info = json.loads((await nc.request(f"fabric.mem.{allocator.node}.info", b"{}", timeout=5)).data)
        assert (info["data_addr"], info["data_tls"]) == (dp.address, False)
    finally:
        await nc.close()
    # a plain (trusted) caller's ticket names no user
    assert (await ticket(nats_url, allocator.node)).ticket.startswith("t1.*.")


async def test_srv_info_metadata_names_the_data_plane(nats_url, allocator):
    nc = await connect(nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.INFO.allocator", b"", reply=inbox)
        seen = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                break
            seen.append(json.loads(msg.data)["metadata"])
        mine = [m for m in seen if m.get("data_addr") == allocator.data_plane.address]
        assert mine and mine[0]["data_tls"] == "false"
    finally:
        await nc.close()


async def test_the_sync_client_moves_the_bytes_over_the_data_plane(nats_url, allocator):
    # the sync client blocks: it runs in a thread while this loop serves the in-process allocator
    def body() -> None:
        dp = allocator.data_plane
        reads = [ep for ep in allocator._endpoints if ep.name.split("-")[0] in ("read", "write")]
        with FabricClient(nats_url, local=False) as fc:
            buf = fc.rmalloc(3 << 20)
            before_frames, before_nats = dp.frames_served, sum(ep.num_requests for ep in reads)
            data = os.urandom(3 << 20)
            assert fc.rwrite(buf, data) == len(data)
            assert fc.rread(buf) == data
            assert fc.rread(buf, 10, 5) == data[5:15]
            assert fc.rreadv([(buf, 0, 4), (buf, 100, 3)]) == [data[:4], data[100:103]]
            assert fc.rwritev([(buf, 0, b"ab"), (buf, 10, b"cd")]) == [2, 2]
            buf[20:22] = b"ef"
            assert buf[0:2] + buf[10:12] + buf[20:22] == b"abcdef"
            assert dp.frames_served - before_frames >= 8
            assert sum(ep.num_requests for ep in reads) == before_nats, "bytes went through NATS"
            # the connection is this user's while it is open
            assert dp.stats()["by_user"].get("tester", 0) >= 1
            fc.rfree(buf)
            with pytest.raises(StaleHandle):  # a request-level failure comes back typed, the connection goes on
                fc.rread(buf, 4)
            small = fc.rmalloc(4)
            assert fc.rread(small) == bytes(4)
            fc.rfree(small)

    await asyncio.to_thread(body)


async def test_values_larger_than_a_frame_go_in_pieces(nats_url, allocator, monkeypatch):
    # the sync client blocks: it runs in a thread while this loop serves the in-process allocator
    def body() -> None:
        from fabric.client import dataplane as client_dp

        monkeypatch.setattr(client_dp, "FRAME_ROOM", (64 << 20) - (1 << 20))  # pieces of 1 MiB instead of ~64 MiB
        data = os.urandom((5 << 20) + 7)
        with FabricClient(nats_url, local=False) as fc:
            buf = fc.rmalloc(len(data))
            before = allocator.data_plane.frames_served
            assert fc.rwrite(buf, data) == len(data)
            assert fc.rread(buf) == data
            assert allocator.data_plane.frames_served - before == 12  # 6 pieces each way
            fc.rfree(buf)

    await asyncio.to_thread(body)


async def test_a_forked_child_never_uses_the_parents_connections(nats_url, allocator):
    # two processes on one TCP stream would read each other's replies: the child's pool starts empty and closed
    def body() -> None:
        with FabricClient(nats_url, local=False) as fc:
            buf = fc.rmalloc(KIB)
            fc.rwrite(buf, b"p" * KIB)
            assert fc._dp is not None and fc._dp._idle.get(allocator.node)
            pid = os.fork()
            if pid == 0:  # the child: looks, and leaves without running any cleanup of the parent's objects
                ok = fc._dp._closed and not fc._dp._idle
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "the child kept the parent's data plane connections"
            for i in range(20):  # the parent's connection is intact and in step
                fc.rwrite(buf, bytes([i]) * KIB)
                assert fc.rread(buf) == bytes([i]) * KIB
            assert fc._dp._idle.get(allocator.node)
            fc.rfree(buf)

    await asyncio.to_thread(body)


async def test_the_async_client_pipelines_on_one_connection(nats_url, allocator):
    import asyncio

    dp = allocator.data_plane
    async with AsyncFabricClient(nats_url, local=False, credentials=realm().client) as fc:
        bufs = [await fc.rmalloc(KIB) for _ in range(20)]
        before = dp.stats()["admitted"]
        await asyncio.gather(*(fc.rwrite(b, bytes([i]) * KIB) for i, b in enumerate(bufs)))
        got = await asyncio.gather(*(fc.rread(b) for b in bufs))
        assert got == [bytes([i]) * KIB for i in range(20)]
        assert dp.stats()["admitted"] - before == 1, "one connection per node"
        for b in bufs:
            await fc.rfree(b)


async def test_the_local_fast_path_keeps_precedence(nats_url, allocator):
    # the sync client blocks: it runs in a thread while this loop serves the in-process allocator
    def body() -> None:
        dp = allocator.data_plane
        with FabricClient(nats_url) as fc:  # same host: the shared-memory path
            buf = fc.rmalloc(KIB)
            fc.rwrite(buf, b"x" * KIB)
            before = dp.frames_served
            for i in range(5):
                fc.rwrite(buf, bytes([i]) * KIB, 0)
                assert fc.rread(buf, KIB) == bytes([i]) * KIB
            assert dp.frames_served == before
            fc.rfree(buf)

    await asyncio.to_thread(body)


async def test_the_data_plane_can_be_turned_off(nats_url, allocator, monkeypatch):
    # the sync client blocks: it runs in a thread while this loop serves the in-process allocator
    def body() -> None:
        dp = allocator.data_plane
        def by_variable() -> FabricClient:
            monkeypatch.setenv("FABRIC_MEM_DATA_PLANE", "0")
            return FabricClient(nats_url, local=False)

        for make in (lambda: FabricClient(nats_url, local=False, data_plane=False), by_variable):
            with make() as fc:
                buf = fc.rmalloc(KIB)
                before = dp.frames_served
                fc.rwrite(buf, b"z" * KIB)
                assert fc.rread(buf) == b"z" * KIB
                assert dp.frames_served == before
                fc.rfree(buf)
        monkeypatch.setenv("FABRIC_MEM_DATA_PLANE", "0")
        with FabricClient(nats_url, local=False, data_plane=True) as fc:  # the argument wins over the variable
            buf = fc.rmalloc(KIB)
            before = dp.frames_served
            assert fc.rread(buf) == bytes(KIB)
            assert dp.frames_served == before + 1
            fc.rfree(buf)

    await asyncio.to_thread(body)


# -- admission -------------------------------------------------------------------------------


async def test_a_connection_needs_a_valid_unused_ticket(nats_url, allocator):
    dp = allocator.data_plane
    good = (await ticket(nats_url, allocator.node, realm().client)).ticket
    mac = good.rsplit(".", 1)[1]
    forged = good.replace(".tester.", ".admin.")  # another user, same MAC
    altered = good[:-len(mac)] + ("0" if mac[0] != "0" else "1") + mac[1:]
    other_node = TicketBook("elsewhere", secrets.token_bytes(32)).mint("tester")[0]
    expired_book = TicketBook(allocator.node, b"k" * 32, ttl_s=0.001)
    for bad, why in ((forged, "not issued"), (altered, "not issued"), (other_node, "not issued"),
                     ("t1.x", "malformed"), ("nonsense", "malformed"), (expired_book.mint("x")[0], "not issued")):
        with dial(dp.address) as sock:
            sock.sendall(dataplane.hello(bad))
            kind, (code, err, message) = answer(sock)
            assert (kind, code, err) == ("error", 401, "unauthenticated") and why in message, message
            assert closed(sock)
    with dial(dp.address) as sock:  # the real one works, once
        sock.sendall(dataplane.hello(good))
        assert answer(sock) == ("welcome", (64 << 20, 60_000))
    with dial(dp.address) as sock:
        sock.sendall(dataplane.hello(good))
        kind, (code, err, message) = answer(sock)
        assert (code, err) == (401, "unauthenticated") and "already used" in message
    # an expired ticket of this node (the book shares nothing with the allocator's but the clock: mint one there)
    book = allocator.tickets
    saved = book.ttl_ms
    book.ttl_ms = -1000
    try:
        stale = book.mint("tester")[0]
    finally:
        book.ttl_ms = saved
    with dial(dp.address) as sock:
        sock.sendall(dataplane.hello(stale))
        kind, (code, err, message) = answer(sock)
        assert (code, err) == (401, "unauthenticated") and "expired" in message


async def test_garbage_instead_of_a_hello_is_refused(nats_url, allocator):
    dp = allocator.data_plane
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"FBF1" + bytes(40), b"FDP1\x09\x00\x05\x00hello",
                 b"\x16\x03\x01\x02\x00" + bytes(100)):  # HTTP, a frame without HELLO, version 9, a TLS hello
        with dial(dp.address) as sock:
            sock.sendall(junk)
            kind, (code, err, _m) = answer(sock)
            assert (kind, code, err) == ("error", 400, "invalid_frame")
            assert closed(sock)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(
    st.binary(min_size=1, max_size=400),
    st.builds(lambda n, tail: b"FBF1\x01" + bytes([n % 6]) + tail, st.integers(0, 255), st.binary(max_size=200)),
))
def test_hostile_bytes_after_the_hello_end_only_that_connection(nats_url, allocator, junk):
    dp = allocator.data_plane
    tickets = allocator.tickets
    with dial(dp.address, timeout=15) as sock:
        sock.sendall(dataplane.hello(tickets.mint("fuzzer")[0]))
        assert answer(sock)[0] == "welcome"
        try:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # error frames, or replies to frames that happened to be valid
                pass
        except OSError as exc:  # it closed with our bytes unread: TCP says so with a reset
            assert exc.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE), exc
    # every other path still works: a fresh connection, and NATS
    with dial(dp.address) as sock:
        sock.sendall(dataplane.hello(tickets.mint("fuzzer")[0]))
        assert answer(sock)[0] == "welcome"
        sock.sendall(wire.encode(wire.KIND_READ, [("v1:zz", 0, 1, 0)]))
        kind, (code, err, _m) = answer(sock)
        assert (kind, code, err) == ("error", 404, "unknown_handle")


async def test_after_the_fuzz_the_allocator_still_serves(nats_url, allocator):
    # the sync client blocks: it runs in a thread while this loop serves the in-process allocator
    def body() -> None:
        with FabricClient(nats_url, local=False) as fc:
            buf = fc.rmalloc(16)
            fc.rwrite(buf, b"still alive, ok!")
            assert fc.rread(buf) == b"still alive, ok!"
            fc.rfree(buf)
        with FabricClient(nats_url, local=False, data_plane=False) as fc:
            assert fc.meminfo(allocator.node).node == allocator.node
        allocator.arena.check()

    await asyncio.to_thread(body)


# -- limits, with a server of the test's own --------------------------------------------------


@contextlib.contextmanager
def limited_server(tls: ssl.SSLContext | None = None) -> Iterator[DataPlaneServer]:
    """A data plane of the test's own over a small arena, with small limits (1 MiB frames, 2 per user, 4 in all,
    half a second idle, per frame and per handshake)."""
    arena = Arena(f"fabric-dptest-{secrets.token_hex(4)}", 64 << 20)
    key = secrets.token_bytes(32)
    signer = HandleSigner("dpnode", key)
    server = DataPlaneServer(FrameHandler(arena, signer), TicketBook("dpnode", key), logging.getLogger("dp-test"),
                             host="127.0.0.1", tls=tls,
                             limits=DataPlaneLimits(max_frame=1 << 20, per_user=2, max_connections=4, idle_s=0.5,
                                                    frame_s=0.5, handshake_s=0.5))
    server.start()
    server.arena, server.signer = arena, signer  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        arena.destroy()


@pytest.fixture
def small_server() -> Iterator[DataPlaneServer]:
    with limited_server() as server:
        yield server


def test_a_hello_sent_a_byte_at_a_time_is_cut_off_at_the_handshake_deadline(small_server):
    hello = dataplane.hello(small_server.tickets.mint("slow")[0])
    with dial(small_server.address) as sock:
        t0 = time.monotonic()
        try:
            for byte in hello:  # each byte well inside the limit, the whole far past it
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed(sock)
        assert time.monotonic() - t0 < 2.0
    assert small_server.stats()["admitted"] == 0


def test_over_tls_the_same_deadlines_hold(tmp_path):
    from fabric.pki import Pki

    pki = Pki(tmp_path / "pki")
    pki.ensure("dpnode", ["127.0.0.1"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.cert), str(pki.key))
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    with limited_server(tls=server_ctx) as server:
        def admitted(user: str) -> ssl.SSLSocket:
            sock = client_ctx.wrap_socket(dial(server.address), server_hostname="127.0.0.1")
            sock.sendall(dataplane.hello(server.tickets.mint(user)[0]))
            assert answer(sock)[0] == "welcome"
            return sock

        with admitted("a") as sock:  # a frame that trickles in: cut at the frame deadline, not per read
            sock.sendall(wire.encode_head(wire.KIND_WRITE, [("h", 0, 4096, 0)]))
            t0 = time.monotonic()
            try:
                for _ in range(30):
                    sock.sendall(b"x")
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
            assert time.monotonic() - t0 < 2.5
        with admitted("b") as sock:  # a frame over the limit: 413, as on the plain port
            sock.sendall(wire.encode_head(wire.KIND_WRITE, [("h", 0, 2 << 20, 0)]))
            assert answer(sock)[1][:2] == (413, "too_large")
        wait_for(lambda: server.stats()["connections"] == 0)
        assert server.stats()["ended"].get("timeout", 0) >= 1 and server.stats()["ended"].get("invalid", 0) >= 1


def test_a_loopback_data_plane_is_dialled_only_from_its_own_host():
    from fabric.client.dataplane import NodeRoutes

    assert NodeRoutes("nats://127.0.0.1:4222").reachable("n", "127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert NodeRoutes("nats://localhost:4222").reachable("n", "[::1]:5000") == ("::1", 5000)
    remote = NodeRoutes("nats://10.1.2.3:4222")
    assert remote.reachable("n", "127.0.0.1:5000") is None and not remote.usable("n")
    assert remote.reachable("m", "10.1.2.3:5000") == ("10.1.2.3", 5000)
    assert remote.reachable("k", "nonsense") is None


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def admit(server: DataPlaneServer, user: str) -> tuple[socket.socket, tuple[str, Any]]:
    sock = dial(server.address)
    sock.sendall(dataplane.hello(server.tickets.mint(user)[0]))
    return sock, answer(sock)


def test_connections_are_capped_per_user_and_in_all(small_server):
    a1, r1 = admit(small_server, "alice")
    a2, r2 = admit(small_server, "alice")
    assert r1[0] == r2[0] == "welcome"
    a3, r3 = admit(small_server, "alice")
    assert r3[0] == "error" and r3[1][:2] == (429, "rate_limited") and "alice" in r3[1][2]
    assert closed(a3)
    a3.close()
    wait_for(lambda: small_server.stats()["connections"] == 2)
    b1, rb = admit(small_server, "bob")  # another user is not held back by alice
    assert rb[0] == "welcome"
    c1, rc = admit(small_server, "carol")
    assert rc[0] == "welcome"
    d1 = dial(small_server.address)  # the fifth connection: over max_connections, refused at accept
    kind, (code, err, _m) = answer(d1)
    assert (kind, code, err) == ("error", 503, "unavailable")
    a1.close()  # alice leaves one: she may come back
    wait_for(lambda: small_server.stats()["by_user"].get("alice") == 1)
    a4, r4 = admit(small_server, "alice")
    assert r4[0] == "welcome"
    for s in (a2, a4, b1, c1, d1):
        s.close()


def test_plain_form_connections_count_per_address(small_server):
    # a `*` ticket (an admin's, or anyone's without auth) names no user: the cap applies per client address
    socks = [admit(small_server, None)[0] for _ in range(2)]  # type: ignore[arg-type]
    third, r = admit(small_server, None)  # type: ignore[arg-type]
    assert r[0] == "error" and r[1][:2] == (429, "rate_limited") and "*@127.0.0.1" in r[1][2]
    assert small_server.stats()["by_user"] == {"*@127.0.0.1": 2}
    for s in (*socks, third):
        s.close()


def test_silent_and_slow_peers_are_cut_off(small_server):
    quiet = dial(small_server.address)  # never says HELLO
    t0 = time.monotonic()
    assert closed(quiet) and time.monotonic() - t0 < 2.5
    idle, r = admit(small_server, "dave")  # admitted, then idle
    assert r[0] == "welcome" and closed(idle)
    slow, r = admit(small_server, "erin")  # a frame that stops half way
    slow.sendall(wire.encode_head(wire.KIND_WRITE, [("h", 0, 4096, 0)]) + b"x" * 100)
    assert closed(slow)
    wait_for(lambda: small_server.stats()["connections"] == 0)
    ended = small_server.stats()["ended"]
    assert ended.get("idle", 0) >= 1 and ended.get("timeout", 0) >= 1 and small_server.stats()["connections"] == 0
    for s in (quiet, idle, slow):
        s.close()


def test_a_frame_over_the_limit_is_refused_unread(small_server):
    sock, r = admit(small_server, "frank")
    sock.sendall(wire.encode_head(wire.KIND_WRITE, [("h", 0, 2 << 20, 0)]))  # 2 MiB announced, 1 MiB allowed
    kind, (code, err, _m) = answer(sock)
    assert (kind, code, err) == ("error", 413, "too_large") and closed(sock)
    sock.close()


def test_reads_and_writes_check_each_handle(small_server):
    arena, signer = small_server.arena, small_server.signer  # type: ignore[attr-defined]
    seg, off, gen = arena.alloc(64, "frank")
    rw, ro = signer.mint(seg, off, gen), signer.mint(seg, off, gen, "r")
    sock, r = admit(small_server, "frank")
    sock.sendall(wire.encode(wire.KIND_WRITE, [(rw, 0, 5, 0)], [b"hello"]))
    kind, frame = answer(sock)
    assert kind == "frame" and wire.decode(frame).items[0][2] == 5
    sock.sendall(wire.encode(wire.KIND_WRITE, [(ro, 0, 5, 0)], [b"HELLO"]))  # a read-only handle may not write
    assert answer(sock)[1][:2] == (403, "denied")
    sock.sendall(wire.encode(wire.KIND_READ, [(ro, 0, 5, 0), (ro, 60, 10, 0)]))  # batch: per-item status
    kind, frame = answer(sock)
    payloads, statuses = wire.decode_payloads(frame)
    assert payloads[0] == b"hello" and statuses == [0, 400]
    sock.sendall(wire.encode(wire.KIND_READ, [(ro, 0, 1 << 20, 0)]))  # out of the block's range
    assert answer(sock)[1][:2] == (400, "out_of_range")
    sock.sendall(wire.encode(wire.KIND_DATA, [(b"", 0, 1, 0)], [b"x"]))  # not a request kind: refused, closed
    assert answer(sock)[1][:2] == (400, "invalid_frame") and closed(sock)
    sock.close()
    arena.free(seg, off, gen)


# -- failure ----------------------------------------------------------------------------------


@pytest.fixture
def lone_allocator(nats_url, tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """An allocator process of the test's own (to stop, kill or freeze)."""
    node = f"dp-{secrets.token_hex(3)}"
    log = tmp_path / "allocator.log"
    proc = start_allocator(nats_url, node, tmp_path, log)
    try:
        yield proc, node, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(15)
        prefix = json.loads((tmp_path / "allocator" / f"{node}.json").read_text())["prefix"]
        Arena(prefix, 1 << 30).destroy()


def test_an_unreachable_data_plane_falls_back_to_nats_and_says_so_once(nats_url, allocator, caplog, tmp_path):
    # an allocator whose ticket names a port nobody listens on
    node = f"dp-{secrets.token_hex(3)}"
    svc = AllocatorService(ServiceSettings(credentials=creds_for(AllocatorService), nats_url=nats_url, node=node,
                                           state_dir=tmp_path), capacity=16 << 20)
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(svc.start(), loop).result(10)
    try:
        svc.data_plane.stop()  # the port closes; the ticket endpoint still names it
        caplog.set_level(logging.WARNING, logger="fabric.client")
        with FabricClient(nats_url, local=False) as fc:
            buf = fc.rmalloc(KIB, node=node)
            for i in range(20):
                fc.rwrite(buf, bytes([i]) * KIB)
                assert fc.rread(buf) == bytes([i]) * KIB
            fc.rfree(buf)
        said = [r for r in caplog.records if "data plane of node" in r.getMessage()]
        assert len(said) == 1 and node in said[0].getMessage() and "using NATS" in said[0].getMessage()
    finally:
        asyncio.run_coroutine_threadsafe(svc.stop(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        Arena(svc.prefix, svc.capacity).destroy()


def test_a_node_that_dies_mid_request_gives_503_within_the_timeout(nats_url, lone_allocator):
    proc, node, log = lone_allocator
    with FabricClient(nats_url, local=False, timeout=3.0) as fc:
        wait_ready(fc, node, proc, log)
        size = 256 << 20
        buf = fc.rmalloc(size, node=node)
        fc.rread(buf, 16)  # the connection is open
        assert fc._dp is not None and fc._dp._idle.get(node), "the first read did not go over the data plane"
        errors: list[BaseException] = []
        done = threading.Event()

        def reader() -> None:
            try:
                for _ in range(50):
                    fc.rread(buf, size)
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                errors.append(exc)
            done.set()

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.3)  # 256 MiB reads in flight
        proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert done.wait(10), "the read hung"
        assert time.monotonic() - t0 < 3.0 + 1.0
        assert errors and isinstance(errors[0], Unavailable), errors


def test_a_frozen_node_times_out_instead_of_hanging(nats_url, lone_allocator):
    proc, node, log = lone_allocator
    with FabricClient(nats_url, local=False) as warm:  # a fresh process answers its first requests slowly
        wait_ready(warm, node, proc, log)
        buf = warm.rmalloc(KIB, node=node)
        assert warm.rread(buf, 4) == bytes(4)
    with FabricClient(nats_url, local=False, timeout=1.0) as fc:
        assert fc.rread(buf, 4) == bytes(4)
        assert fc._dp is not None and fc._dp._idle.get(node), "the first read did not go over the data plane"
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RequestTimedOut, match="did not answer"):
            fc.rread(buf, 4)
        assert 0.9 < time.monotonic() - t0 < 2.5
        proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while True:  # it comes back: the broken connection is replaced by a new one
            try:
                assert fc.rread(buf, 4) == bytes(4)
                break
            except Unavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)


# -- TLS ------------------------------------------------------------------------------------


def test_the_data_plane_speaks_tls_under_the_fabrics_ca(nats_url, tmp_path):
    from fabric.pki import Pki

    pki = Pki(tmp_path / "pki")
    pki.ensure("tlsnode", ["127.0.0.1"])
    node = f"dptls-{secrets.token_hex(3)}"
    config = msgspec.structs.replace(FabricConfig(), mem=MemConfig(data_tls_cert=str(pki.cert),
                                                                    data_tls_key=str(pki.key)))
    svc = AllocatorService(ServiceSettings(credentials=creds_for(AllocatorService), nats_url=nats_url, node=node,
                                           state_dir=tmp_path, config=config), capacity=16 << 20)
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(svc.start(), loop).result(10)
    try:
        dp = svc.data_plane
        assert dp is not None and dp.tls is not None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        with FabricClient(nats_url, local=False) as fc:
            fc._aio._tls_ctx = ctx  # the CA a TLS fabric's credentials carry (this test NATS is plain)
            buf = fc.rmalloc(2 << 20, node=node)
            data = os.urandom(2 << 20)
            before = dp.frames_served
            assert fc.rwrite(buf, data) == len(data)
            assert fc.rread(buf) == data
            assert fc.rreadv([(buf, 1, 2)]) == [data[1:3]]
            assert dp.frames_served - before == 3
            fc.rfree(buf)
        with dial(dp.address) as sock:  # the plain protocol on a TLS port: nothing admitted
            sock.sendall(dataplane.hello(svc.tickets.mint("x")[0]))
            with pytest.raises((ConnectionResetError, AssertionError, ValueError)):
                assert answer(sock)[0] == "welcome"
        with dial(dp.address) as raw:  # a TLS client that does not trust the CA: refused in the handshake
            with pytest.raises(ssl.SSLError):
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        asyncio.run_coroutine_threadsafe(svc.stop(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        Arena(svc.prefix, svc.capacity).destroy()


def test_a_tls_fabric_without_a_certificate_serves_no_data_plane(tmp_path):
    # the allocator reads NATS's scheme: a tls:// bus and no certificate means the bytes stay on NATS
    svc = AllocatorService(ServiceSettings(nats_url="tls://127.0.0.1:1", node="tlsless", state_dir=tmp_path),
                           capacity=1 << 20)
    try:
        assert svc.settings.config.mem.data_plane and not svc.settings.config.mem.data_tls_cert
        assert svc._make_data_plane() is None
    finally:
        svc.arena.destroy()
    plain = AllocatorService(ServiceSettings(nats_url="nats://127.0.0.1:1", node="plain", state_dir=tmp_path),
                             capacity=1 << 20)
    try:
        made = plain._make_data_plane()
        assert made is not None and made.tls is None and made.host == "127.0.0.1"
    finally:
        plain.arena.destroy()
    off = msgspec.structs.replace(FabricConfig(), mem=MemConfig(data_plane=False))
    turned_off = AllocatorService(ServiceSettings(nats_url="nats://127.0.0.1:1", node="off", state_dir=tmp_path,
                                                  config=off), capacity=1 << 20)
    try:
        assert turned_off._make_data_plane() is None  # mem.data_plane = false: no port at all
    finally:
        turned_off.arena.destroy()


# -- under fabric up -----------------------------------------------------------------------------


def test_fabric_up_keeps_the_data_port_and_a_user_gets_the_data_plane(tmp_path):
    from fabric.credentials import read_credentials as creds_of
    from tests._cli import fabric, read_state

    state = tmp_path / "state"
    try:
        up = fabric("up", state, "-d", "--nats-port", "0")
        assert up.returncode == 0, up.stdout + up.stderr
        port = int((state / "data.port").read_text())
        assert port != int((state / "gateway.port").read_text())  # never the port promised to the gateway
        made = fabric("user add", state, "dora", "--out", str(tmp_path / "dora.creds"))
        assert made.returncode == 0, made.stdout + made.stderr
        url = read_state(state)["nats_url"]
        with FabricClient(url, credentials=tmp_path / "dora.creds", local=False) as fc:
            node = read_state(state)["node"]
            assert fc.meminfo(node).data_addr == f"127.0.0.1:{port}"
            buf = fc.rmalloc(100_000)
            data = os.urandom(100_000)
            fc.rwrite(buf, data)
            assert fc.rread(buf) == data
            conns = fc._dp._idle[node] if fc._dp is not None else []
            assert conns and conns[0].addr == f"127.0.0.1:{port}", "not over the data plane"
            ticket = fc._ticket(node)
            assert ticket.ticket.startswith("t1.dora."), "the ticket names the user NATS admitted"
            fc.rfree(buf)
        assert creds_of(tmp_path / "dora.creds").user == "dora"
        down = fabric("down", state)
        assert down.returncode == 0, down.stdout + down.stderr
        up = fabric("up", state, "-d", "--nats-port", "0")  # the same port again
        assert up.returncode == 0, up.stdout + up.stderr
        assert int((state / "data.port").read_text()) == port
        with FabricClient(read_state(state)["nats_url"], credentials=tmp_path / "dora.creds", local=False) as fc:
            assert fc.meminfo(read_state(state)["node"]).data_addr == f"127.0.0.1:{port}"
    finally:
        fabric("down", state, "--purge")


def test_kept_ports_are_never_promised_twice(tmp_path):
    from fabric.kept_ports import keep_port
    from fabric.nats_server import free_port, promised_elsewhere
    from fabric.state import StateDir

    state = StateDir(tmp_path / "s")
    gateway = keep_port(state, "gateway", "127.0.0.1")
    (tmp_path / "s" / "data.port").write_text(f"{gateway}\n")  # a kept file that names another's port
    data = keep_port(state, "data", "127.0.0.1")
    assert data != gateway and (tmp_path / "s" / "data.port").read_text().strip() == str(data)
    assert keep_port(state, "gateway", "127.0.0.1") == gateway  # the same purpose gets its own port again
    assert promised_elsewhere("127.0.0.1", gateway, "data") and not promised_elsewhere("127.0.0.1", gateway, "gateway")
    assert free_port("127.0.0.1") not in (gateway, data)
    assert free_port("127.0.0.1", avoid={gateway}) != gateway
