"""The allocator's data plane: remote memory's bytes point to point over TCP (docs/protocol.md "Data plane").

NATS keeps control (alloc, free, stat, the ticket that admits a connection); the bytes of
reads and writes may come here instead, in the same FBF1 frames, answered by the same
:class:`~.frames.FrameHandler` as on NATS.  Going around the broker saves two TCP hops and
the copies of both NATS clients: what makes a remote read cheaper than Redis's GET.

Threads, not the service's event loop: the acceptor thread admits connections (a ticket
from :class:`~.tickets.TicketBook` in the HELLO), and each admitted connection gets a
thread that runs :func:`fabric_ext.dataplane.serve` -- a C loop that waits, receives and
sends with the GIL released and takes it only to run the frame through the arena.  The
arena's calls hold the GIL throughout, so they are atomic against the NATS endpoints that
run on the loop thread.  With TLS (``mem.data_tls_cert``, set by ``fabric up --tls``) the
connection is wrapped, and a Python loop of the same shape serves it.

Limits, so a slow or hostile peer costs at most its own connection: a handshake deadline,
``data_connections_per_user`` and ``data_max_connections``, ``data_max_frame``, an idle
timeout between frames and a deadline per frame (``data_idle_s``, ``data_frame_s``).  A
header that fails the codec's checks gets an FDPE error frame and the connection is
closed; the allocator and every other connection go on.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fabric.config.model import MemConfig
from fabric.errors import FabricError, InvalidFrame, RateLimited, TooLarge, Unavailable
from fabric.protocol import dataplane, wire

from .frames import FrameHandler
from .tickets import TRUSTED_USER, TicketBook

# a connection ended with an error frame is drained this long before it closes: closing with the peer's
# bytes unread would make the kernel answer with a reset, which can destroy the error frame in flight
_LINGER_S = 0.5
_LINGER_BYTES = 1 << 20


@dataclass(frozen=True)
class DataPlaneLimits:
    max_frame: int = 64 << 20
    per_user: int = 16
    max_connections: int = 256
    idle_s: float = 60.0
    frame_s: float = 10.0
    handshake_s: float = 5.0  # from accept to a complete HELLO (TLS handshake included)

    @classmethod
    def from_config(cls, mem: MemConfig) -> DataPlaneLimits:
        return cls(max_frame=mem.data_max_frame, per_user=mem.data_connections_per_user,
                   max_connections=mem.data_max_connections, idle_s=mem.data_idle_s, frame_s=mem.data_frame_s)


def _recv_into(sock: socket.socket, view: memoryview, got: int, deadline: float) -> bool:
    """Fill *view* from *got* on, all of it by *deadline* (monotonic): a deadline for the whole, not per read
    (a peer sending a byte at a time must not hold the connection longer).  False: the peer closed first."""
    n = len(view)
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(left)
        k = sock.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def _recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    if not _recv_into(sock, memoryview(buf), 0, deadline):
        raise ConnectionResetError("the peer closed the connection")
    return bytes(buf)


class DataPlaneServer:
    """One allocator's data port: listens, admits by ticket, serves frames (see the module docstring)."""

    def __init__(self, frames: FrameHandler, tickets: TicketBook, log: Any, *, host: str, port: int = 0,
                 limits: DataPlaneLimits | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.frames = frames
        self.tickets = tickets
        self.log = log
        self.host = host
        self.port = port
        self.limits = limits or DataPlaneLimits()
        self.tls = tls
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._by_user: dict[str, int] = {}
        self._stopping = False
        # figures for info and the tests: admitted, refused, frames served, why connections ended
        self.admitted = 0
        self.refused = 0
        self.frames_served = 0
        self.ended: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._acceptor = threading.Thread(target=self._accept_loop, name="data-plane-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``host:port`` as clients should dial it (an unspecified bind address: this host's outward one)."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            from fabric.nats_server import outward_address

            host = outward_address()
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every connection (a request in flight finishes its send first), join the threads."""
        self._stopping = True
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        with self._lock:
            conns = list(self._conns.items())
        for conn, _thread in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the C loop's poll wakes with the hang-up
            except OSError:
                pass
        for _conn, thread in conns:
            thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"connections": len(self._conns), "by_user": dict(self._by_user), "admitted": self.admitted,
                    "refused": self.refused, "frames": self.frames_served, "ended": dict(self.ended)}

    # -- connections -------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping:
            try:
                conn, peer = listener.accept()
            except OSError:
                if self._stopping:
                    return
                continue  # e.g. EMFILE, ECONNABORTED: the listener itself is fine
            with self._lock:
                full = len(self._conns) >= self.limits.max_connections
                if not full:
                    thread = threading.Thread(target=self._connection, args=(conn, peer), daemon=True,
                                              name=f"data-plane-{peer[0]}:{peer[1]}")
                    self._conns[conn] = thread
            if full:
                if self.tls is not None:  # an error frame would have to follow a TLS handshake: no thread for that
                    self.refused += 1
                    conn.close()
                else:
                    self._refuse(conn, Unavailable(f"the data plane holds {self.limits.max_connections} connections, "
                                                   "its limit (mem.data_max_connections): use NATS or retry"))
                continue
            thread.start()

    def _refuse(self, conn: socket.socket, exc: FabricError) -> None:
        self.refused += 1
        try:
            conn.settimeout(1.0)
            conn.sendall(dataplane.error_frame(exc.code, exc.kind, exc.message))
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _linger(sock: socket.socket) -> None:
        """After an error frame: say we are done sending, read what the peer still sends (a little), then close."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(_LINGER_S)
            drained = 0
            while drained < _LINGER_BYTES:
                got = sock.recv(65536)
                if not got:
                    break
                drained += len(got)
        except (OSError, ValueError):
            pass

    def _connection(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        user: str | None = None
        reason = "refused"
        sock: socket.socket = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + self.limits.handshake_s  # from accept to the whole HELLO
            conn.settimeout(self.limits.handshake_s)
            if self.tls is not None:
                # each of the TLS handshake's few reads within the limit; the HELLO after it within what is left
                sock = self.tls.wrap_socket(conn, server_side=True)
            ticket_len = dataplane.hello_ticket_length(_recv_exactly(sock, dataplane.HELLO_FIXED, deadline))
            ticket = _recv_exactly(sock, ticket_len, deadline).decode("ascii", "replace")
            who = self.tickets.admit(ticket)
            if who == TRUSTED_USER:  # no user to count by (an admin, a fabric without auth): count by address
                who = f"{TRUSTED_USER}@{peer[0]}"
            with self._lock:
                held = self._by_user.get(who, 0)
                if held >= self.limits.per_user:
                    raise RateLimited(f"user {who!r} holds {held} data plane connections to this node, its limit "
                                      "(mem.data_connections_per_user)")
                self._by_user[who] = held + 1
                self.admitted += 1
            user = who
            sock.sendall(dataplane.welcome(self.limits.max_frame, int(self.limits.idle_s * 1000)))
            if self.tls is None:
                reason = dataplane.serve(conn.fileno(), self._handle, max_frame=self.limits.max_frame,
                                         idle_ms=int(self.limits.idle_s * 1000),
                                         frame_ms=int(self.limits.frame_s * 1000))
            else:
                reason = self._serve_tls(sock)
        except FabricError as exc:  # a refused handshake: say why, then close
            self.refused += 1
            self.log.info("data plane connection refused", peer=peer[0], kind=exc.kind, reason=exc.message)
            try:
                sock.sendall(dataplane.error_frame(exc.code, exc.kind, exc.message))
                self._linger(sock)
            except OSError:
                pass
        except (OSError, ssl.SSLError, UnicodeError) as exc:
            reason = f"error: {exc}"
        except Exception:  # a bug: this connection ends, the allocator goes on
            reason = "internal"
            self.log.exception("data plane connection failed", peer=peer[0])
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                if user is not None:
                    left = self._by_user.get(user, 1) - 1
                    if left > 0:
                        self._by_user[user] = left
                    else:
                        self._by_user.pop(user, None)
                key = reason.split(":", 1)[0]
                self.ended[key] = self.ended.get(key, 0) + 1
            if reason in ("invalid", "handler"):  # it ended with an error frame: let the frame arrive
                self._linger(sock)
            try:
                sock.close()
            except OSError:
                pass
            if sock is not conn:
                conn.close()

    def _handle(self, frame: memoryview) -> tuple[Sequence[Any], bool]:
        """One frame (header already checked): its reply parts and whether the connection goes on."""
        self.frames_served += 1
        try:
            kind = frame[5]
            if kind == wire.KIND_READ:
                return (self.frames.read(frame, self.limits.max_frame),), True
            if kind == wire.KIND_WRITE:
                return (self.frames.write(frame),), True
            raise InvalidFrame(f"the data plane takes READ and WRITE frames, not kind {kind}")
        except InvalidFrame as exc:  # the bytes cannot be trusted: say why and close
            return (dataplane.error_frame(exc.code, exc.kind, exc.message),), False
        except FabricError as exc:  # the request failed (a stale handle, out of range): the connection goes on
            return (dataplane.error_frame(exc.code, exc.kind, exc.message),), True
        except Exception as exc:  # a bug: report it as the NATS path would, and close this connection
            self.log.exception("data plane frame failed")
            return (dataplane.error_frame(500, "internal", f"internal error: {type(exc).__name__}"),), False

    def _serve_tls(self, sock: socket.socket) -> str:
        """:func:`fabric_ext.dataplane.serve` over TLS, in Python (ssl does its own I/O; it releases the GIL).

        The same rules: idle between frames, one deadline for a whole frame and its reply
        once its first byte arrived, an FDPE and the end for a header that fails its checks.
        """
        limits = self.limits
        header = bytearray(wire.HEADER_SIZE)
        hview = memoryview(header)
        while True:
            sock.settimeout(limits.idle_s)
            try:
                got = sock.recv_into(hview, wire.HEADER_SIZE)
            except TimeoutError:
                return "idle"
            if got == 0:
                return "closed"
            deadline = time.monotonic() + limits.frame_s
            try:
                if not _recv_into(sock, hview, got, deadline):
                    return "closed"
                try:
                    total = wire.frame_length(header, max_payload=limits.max_frame)
                    if total > limits.max_frame:
                        raise TooLarge(f"frame of {total} bytes, this data plane's limit is {limits.max_frame}")
                except FabricError as exc:
                    sock.sendall(dataplane.error_frame(exc.code, exc.kind, exc.message))
                    return "invalid"
                buf = bytearray(total)
                buf[:wire.HEADER_SIZE] = header
                if not _recv_into(sock, memoryview(buf), wire.HEADER_SIZE, deadline):
                    return "closed"
                parts, keep = self._handle(memoryview(buf))
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                for part in parts:
                    sock.sendall(part)
            except TimeoutError:
                return "timeout"
            if not keep:
                return "handler"
