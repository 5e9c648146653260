"""fabric_ext.dataplane on its own: the server loop and the client channel over real loopback sockets.

No NATS and no allocator here: a handler built on the FBF1 codec stands for the
allocator's frame code, so these tests reach every branch of the C loops (deadlines,
hostile headers, resets, signals) and run under AddressSanitizer too
(tests/sanitize.sh).  The allocator's data plane as a whole is tests/test_data_plane.py.
"""

from __future__ import annotations

import errno
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.errors import InvalidFrame, TooLarge
from fabric.protocol import dataplane, wire
from fabric.protocol.dataplane import Broken, Channel, Refused

MAX_FRAME = 16 << 20


def echo_handler(frame: memoryview) -> tuple[Sequence[Any], bool]:
    """READ -> a DATA frame of b"r" * length per item; WRITE -> an ACK of each item's length (the bytes checked)."""
    f = wire.decode(frame)
    if f.kind == wire.KIND_READ:
        if f.items[0][0] == "fail":
            return (dataplane.error_frame(404, "stale_handle", "block freed"),), True
        payloads = [b"r" * n for _h, _o, n, _s in f.items]
        return (wire.encode(wire.KIND_DATA, [(b"", o, n, 0) for _h, o, n, _s in f.items], payloads),), True
    acks = []
    for i, (_h, o, n, _s) in enumerate(f.items):
        data = bytes(f.data(i))
        assert data == bytes([i % 256]) * n, "the server got other bytes than were sent"
        acks.append((b"", o, n, 0))
    # the reply in two parts: the scatter-gather send
    out = wire.encode(wire.KIND_ACK, acks)
    return (out[:10], out[10:]), True


class Server:
    """One connection served by dataplane.serve in a thread; ``reason`` is what serve returned."""

    def __init__(self, handler: Callable[[memoryview], tuple[Sequence[Any], bool]] = echo_handler, *,
                 idle_ms: int = 5000, frame_ms: int = 2000, max_frame: int = MAX_FRAME) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.kw = {"max_frame": max_frame, "idle_ms": idle_ms, "frame_ms": frame_ms}
        self.handler = handler
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        try:
            self.reason = dataplane.serve(conn.fileno(), self.handler, **self.kw)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            conn.close()
            self.done.set()

    def wait(self, timeout: float = 5.0) -> str | None:
        assert self.done.wait(timeout), "serve() did not return"
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.reason

    def close(self) -> None:
        self.listener.close()


@contextmanager
def served(**kw: Any) -> Iterator[tuple[Server, socket.socket]]:
    server = Server(**kw)
    sock = socket.create_connection(server.addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield server, sock
    finally:
        sock.close()
        server.wait()
        server.close()


def read_frame(handle: str, offset: int, length: int) -> bytes:
    return wire.encode(wire.KIND_READ, [(handle, offset, length, 0)])


def test_reads_and_writes_round_trip_and_the_connection_goes_on() -> None:
    with served() as (server, sock):
        ch = Channel(sock, 5.0, MAX_FRAME)
        assert ch.max_frame == MAX_FRAME
        assert ch.read(read_frame("h", 0, 5)) == b"rrrrr"
        assert ch.read(read_frame("h", 0, 0)) == b""
        big = ch.read(read_frame("h", 0, 8 << 20))  # many recv calls straight into the result
        assert len(big) == 8 << 20 and big == b"r" * (8 << 20)
        reply = ch.request((wire.encode(wire.KIND_READ, [("a", 0, 3, 0), ("b", 1, 2, 0)]),))
        assert wire.decode_payloads(reply) == ([b"rrr", b"rr"], None)
        # a write of many items, each payload its own buffer: one sendmsg of 1 + 40 parts
        items = [(f"h{i}", i, 1000 + i, 0) for i in range(40)]
        parts = [wire.encode_head(wire.KIND_WRITE, items)] + [bytes([i]) * (1000 + i) for i in range(40)]
        ack = wire.decode(ch.request(parts))
        assert [n for _h, _o, n, _s in ack.items] == [1000 + i for i in range(40)]
        assert wire.encode_head(wire.KIND_WRITE, items) + b"".join(parts[1:]) == wire.encode(
            wire.KIND_WRITE, items, parts[1:])
        # a single write: head and bytes scatter-gather, the ACK read in C
        assert ch.write(wire.encode_head(wire.KIND_WRITE, [("h", 7, 3000, 0)]), bytes(3000)) == 3000
        with pytest.raises(ValueError, match="1 to 64 buffers"):
            ch.request([b"x"] * 65)
        sock.shutdown(socket.SHUT_WR)  # the peer leaves between frames
        assert server.wait() == "closed"


def test_a_refused_request_raises_and_the_connection_goes_on() -> None:
    with served() as (server, sock):
        ch = Channel(sock, 5.0, MAX_FRAME)
        with pytest.raises(Refused) as err:
            ch.read(read_frame("fail", 0, 5))
        assert (err.value.code, err.value.kind, err.value.message) == (404, "stale_handle", "block freed")
        with pytest.raises(Refused):
            ch.request((read_frame("fail", 0, 5),))
        assert ch.read(read_frame("h", 0, 3)) == b"rrr"  # still in step


@pytest.mark.parametrize(("bad", "kind"), [
    (b"XXXX" + bytes(20), "invalid_frame"),  # not FBF1
    (b"FBF1\x02" + bytes(19), "invalid_frame"),  # version 2
    (b"FBF1\x01\x09" + bytes(18), "invalid_frame"),  # kind 9
    (b"FBF1\x01\x01\x00\x00" + struct.pack("<IIQ", 1, 32, 1 << 30), "too_large"),  # payload over max_frame
    (b"FBF1\x01\x01\x00\x00" + struct.pack("<IIQ", 1 << 20, 0, 0), "too_large"),  # items over the limit
])
def test_a_hostile_header_gets_an_error_frame_and_the_connection_ends(bad: bytes, kind: str) -> None:
    with served() as (server, sock):
        sock.sendall(bad)
        head = sock.recv(dataplane.ERROR_FIXED, socket.MSG_WAITALL)
        rest = sock.recv(dataplane.error_frame_length(head) - len(head), socket.MSG_WAITALL)
        code, got_kind, message, _ = dataplane.parse_error(head + rest)
        assert got_kind == kind and code in (400, 413) and message
        assert sock.recv(1) == b""  # then the server closed
        assert server.wait() == "invalid"


def test_a_frame_larger_than_the_servers_limit_is_refused_before_it_is_read() -> None:
    with served(max_frame=1 << 16) as (server, sock):
        head = wire.encode_head(wire.KIND_WRITE, [("h", 0, 1 << 17, 0)])
        sock.sendall(head)  # only the header: the server must not wait for (or buffer) the megabytes
        ch = Channel(sock, 5.0, 1 << 16)
        with pytest.raises(Refused) as err:
            ch.request((b"",))  # (nothing more to send: reads the reply to the header above)
        assert err.value.kind == "too_large"
        assert server.wait() == "invalid"


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    with served(idle_ms=200) as (server, sock):
        t0 = time.monotonic()
        assert server.wait() == "idle"
        assert 0.15 < time.monotonic() - t0 < 3
        assert sock.recv(1) == b""


def test_a_frame_that_stalls_half_way_ends_at_the_frame_deadline() -> None:
    # slowloris: a header that announces a megabyte, then nothing
    with served(frame_ms=300) as (server, sock):
        sock.sendall(wire.encode_head(wire.KIND_WRITE, [("h", 0, 1 << 20, 0)]) + b"x" * 1000)
        t0 = time.monotonic()
        assert server.wait() == "timeout"
        assert 0.25 < time.monotonic() - t0 < 3


def test_a_header_that_stalls_half_way_ends_at_the_frame_deadline() -> None:
    with served(frame_ms=300) as (server, sock):
        sock.sendall(b"FBF1\x01")
        assert server.wait() == "timeout"


def test_a_reply_nobody_reads_ends_at_the_frame_deadline() -> None:
    # a client that asks for 64 MiB and never reads: the send blocks, then times out; the thread is free again
    with served(frame_ms=300, max_frame=96 << 20) as (server, sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(read_frame("h", 0, 64 << 20))
        assert server.wait() == "timeout"


def test_the_handler_may_end_the_connection() -> None:
    def once(frame: memoryview) -> tuple[Sequence[Any], bool]:
        return (dataplane.error_frame(400, "invalid_frame", "no more"),), False

    with served(handler=once) as (server, sock):
        ch = Channel(sock, 5.0, MAX_FRAME)
        with pytest.raises(Refused):
            ch.read(read_frame("h", 0, 1))
        assert server.wait() == "handler"
        with pytest.raises(Broken) as err:
            ch.read(read_frame("h", 0, 1))
        assert err.value.sent in (True, False) and err.value.reason


def test_a_handler_exception_propagates_out_of_serve() -> None:
    def broken(frame: memoryview) -> tuple[Sequence[Any], bool]:
        raise RuntimeError("bug")

    with served(handler=broken) as (server, sock):
        sock.sendall(read_frame("h", 0, 1))
        with pytest.raises(RuntimeError, match="bug"):
            server.wait()


def test_a_silent_server_times_the_channel_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        sock = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        ch = Channel(sock, 0.3, MAX_FRAME)
        t0 = time.monotonic()
        with pytest.raises(Broken) as err:
            ch.read(read_frame("h", 0, 1))
        assert err.value.reason == "timeout" and err.value.sent
        assert 0.25 < time.monotonic() - t0 < 3
        conn.close()
        sock.close()
    finally:
        listener.close()


def test_a_server_that_dies_mid_reply_breaks_the_request() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        sock = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        ch = Channel(sock, 5.0, MAX_FRAME)
        reply = wire.encode(wire.KIND_DATA, [(b"", 0, 1000, 0)], [b"z" * 1000])

        def answer_half() -> None:
            conn.recv(4096)
            conn.sendall(reply[:500])
            conn.close()

        t = threading.Thread(target=answer_half)
        t.start()
        with pytest.raises(Broken) as err:
            ch.read(read_frame("h", 0, 1000))
        assert err.value.reason == "closed"
        t.join()
        sock.close()
    finally:
        listener.close()


def test_a_malformed_reply_is_invalid_not_a_crash() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        for reply in (b"FDPE" + struct.pack("<HHI", 500, 200, 1) + b"x" * 201,  # kind longer than allowed
                      b"FBF1\x01\x03\x00\x00" + struct.pack("<IIQ", 2, 48, 0) + bytes(48),  # two items to a single read
                      b"FBF1\x01\x04\x00\x00" + struct.pack("<IIQ", 1, 24, 0) + bytes(24)):  # ACK for a read
            sock = socket.create_connection(listener.getsockname())
            conn, _ = listener.accept()
            conn.sendall(reply)
            with pytest.raises((InvalidFrame, TooLarge)):
                Channel(sock, 2.0, MAX_FRAME).read(read_frame("h", 0, 1))
            conn.close()
            sock.close()
        sock = socket.create_connection(listener.getsockname())  # a DATA frame answering a write
        conn, _ = listener.accept()
        conn.sendall(wire.encode(wire.KIND_DATA, [(b"", 0, 1, 0)], [b"x"]))
        with pytest.raises(InvalidFrame, match="ACK"):
            Channel(sock, 2.0, MAX_FRAME).write(wire.encode_head(wire.KIND_WRITE, [("h", 0, 1, 0)]), b"x")
        conn.close()
        sock.close()
    finally:
        listener.close()


def test_a_signal_interrupts_a_blocked_channel() -> None:
    # Ctrl-C during a remote read must not wait for the timeout: the loop runs Python's handlers on EINTR
    class Interrupted(Exception):
        pass

    def on_alarm(signum: int, frame: Any) -> None:
        raise Interrupted()

    listener = socket.create_server(("127.0.0.1", 0))
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        sock = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            Channel(sock, 10.0, MAX_FRAME).read(read_frame("h", 0, 1))
        assert time.monotonic() - t0 < 3
        conn.close()
        sock.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        listener.close()


def test_handshake_frames_round_trip() -> None:
    h = dataplane.hello("t1.alice.123.abc.def")
    assert dataplane.hello_ticket_length(h[:dataplane.HELLO_FIXED]) == len("t1.alice.123.abc.def")
    assert dataplane.parse_welcome(dataplane.welcome(1 << 26, 60_000)) == (1 << 26, 60_000)
    with pytest.raises(Refused) as err:
        dataplane.parse_welcome(dataplane.error_frame(401, "unauthenticated", "ticket expired"))
    assert (err.value.code, err.value.kind) == (401, "unauthenticated")
    long = dataplane.error_frame(500, "k" * 100, "m" * 10_000)  # cut to the limits, never over them
    code, kind, message, n = dataplane.parse_error(long)
    assert (len(kind), len(message), n) == (dataplane.MAX_KIND, dataplane.MAX_MESSAGE, len(long))
    for bad in (b"", b"FDP1", b"FDP2\x01\x00\x01\x00", b"FDP1\x02\x00\x01\x00", b"FDP1\x01\x01\x01\x00",
                b"FDP1\x01\x00\x00\x00", b"FDP1\x01\x00\x01\x04"):
        with pytest.raises(InvalidFrame):
            dataplane.hello_ticket_length(bad)
    with pytest.raises(ValueError):
        dataplane.hello("")
    with pytest.raises(InvalidFrame):
        dataplane.parse_welcome(b"FDP1" + bytes(11))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    # a valid frame with bytes flipped: passes the magic, fails later, or passes and reaches the handler
    st.tuples(st.integers(0, 200), st.integers(0, 255)).map(
        lambda p: bytearray(wire.encode(wire.KIND_WRITE, [("hh", 3, 5, 0)], [b"\x00" * 5]))[:p[0]] + bytes([p[1]])
        + bytearray(wire.encode(wire.KIND_WRITE, [("hh", 3, 5, 0)], [b"\x00" * 5]))[p[0] + 1:]),
))
def test_hostile_bytes_never_crash_the_loop(data: bytes) -> None:
    def tolerant(frame: memoryview) -> tuple[Sequence[Any], bool]:
        try:
            f = wire.decode(frame)
        except InvalidFrame as exc:
            return (dataplane.error_frame(exc.code, exc.kind, exc.message),), False
        return (wire.encode(wire.KIND_ACK, [(b"", o, 0, 0) for _h, o, _n, _s in f.items]),), True

    with served(handler=tolerant, frame_ms=200) as (server, sock):
        try:
            sock.sendall(bytes(data))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # whatever it answers, until it closes
                pass
        except OSError as exc:  # it closed with our bytes unread: TCP says so with a reset
            assert exc.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE), exc
        assert server.wait() in ("closed", "invalid", "handler")
