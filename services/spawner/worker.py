"""The warm worker process: ``python -m fabric.services.spawner.worker``.

A worker runs one compute core and serves one controller (a spawner pool)
with "Worker socket protocol version 1" (seed; ``fabric_ext.wire`` v1 codec;
docs/protocol.md).  The controller sends a version exchange, then a "new
compute core" message, then jobs; the worker answers each message with the
same id, in order.  Two transports carry the same frames:

* ``--connect unix:/path`` or ``--connect tcp:HOST:PORT`` (or ``HOST:PORT``):
  a byte stream to a controller's listening socket.  The worker exits at EOF.
* ``--ring-in PATH --ring-out PATH``: two SPSC shared-memory rings
  (``fabric_ext.ring``), one v1 frame per record.  The worker exits when
  ring-in is shut down, and when its parent dies (``PR_SET_PDEATHSIG``).

Replies: a job answers 0x01 with ``(i32 exit code, output blob)`` whatever the
exit code (a nonzero one is the core's failure, which the pool types); 0xFF is
for protocol-level failures only: a bad frame, a job before any core, a core
that does not load, lacks a symbol or fails ``worker_init``, and, on rings, an
output whose result does not fit one record: that 0xFF's message starts with
:data:`OUTPUT_TOO_LARGE`, which the pool answers 413 ``too_large``.  A core that
crashes takes this process with it; the pool sees EOF / the exit and replaces
the worker.

The job loop is kept short on purpose: parse the frame (C), call the core
through ctypes on the job data where it lies in the received frame (no copy),
reply with the output viewed where the core left it (``push_parts`` /
``sendmsg`` copy it once into the ring or the socket), free it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fabric.protocol import wire

from .core_api import OUTPUT_TOO_LARGE, CoreError
from .worker_core import CCore, PythonCore, load_core

if TYPE_CHECKING:  # pragma: no cover - pyopencl loads only when the OpenCL core does
    from .worker_opencl import OpenCLCore

_JOB_DATA = 33                    # a job frame's data starts after header 17 + job id 8 + length 8
_V1_KNOWN = frozenset((wire.V1_MSG_VERSION, wire.V1_MSG_CORE, wire.V1_MSG_JOB, wire.V1_ERROR))
_HEADER = struct.Struct("<BQQ")
_PR_SET_PDEATHSIG = 1
_RESULT_HEAD = 29                 # a job result frame's header 17 + exit code 4 + output length 8

Send = Callable[[bytes, Any], None]


class Worker:
    """The protocol state of one worker: version agreed or not, the loaded core.

    :meth:`handle` takes one whole frame (``bytes`` or ``bytearray`` that the
    worker owns: a job's core may write into its data, as the core API allows)
    and answers through *send(head, body)*.  It returns False when the
    connection must end (a refused version).
    """

    def __init__(self, send: Send, *, max_payload: int = wire.V1_DEFAULT_MAX_PAYLOAD,
                 max_reply: int = 0) -> None:
        self.send = send
        self.max_payload = max_payload
        #: the largest frame *send* can carry (a ring record); 0 for no limit (a stream)
        self.max_reply = max_reply
        self.core: CCore | PythonCore | OpenCLCore | None = None
        self.versioned = False

    def error(self, msg_id: int, message: str) -> None:
        self.send(wire.v1_error(msg_id, message), b"")

    def handle(self, frame: bytes | bytearray) -> bool:
        try:
            f = wire.v1_parse(frame, max_payload=self.max_payload)
        except ValueError as exc:
            msg_id = int.from_bytes(frame[1:9], "little") if len(frame) >= 9 else 0
            self.error(msg_id, f"malformed v1 frame: {exc}")
            return True
        kind = f.kind
        if kind == wire.V1_MSG_JOB:
            self._job(f, frame)
            return True
        if kind == wire.V1_MSG_VERSION:
            return self._version(f)
        if kind == wire.V1_MSG_CORE:
            self._core(f)
            return True
        self.error(f.msg_id, f"unexpected message type 0x{kind:02x} from the controller")
        return True

    def _version(self, f: wire.V1Frame) -> bool:
        try:
            version = wire.v1_parse_version(f.payload)
        except ValueError as exc:
            self.error(f.msg_id, f"malformed version exchange: {exc}")
            return True
        if version != wire.V1_VERSION:
            self.send(wire.v1_ok(f.msg_id, b"\x00"), b"")
            return False
        self.versioned = True
        self.send(wire.v1_ok(f.msg_id, b"\x01"), b"")
        return True

    def _core(self, f: wire.V1Frame) -> None:
        if not self.versioned:
            self.error(f.msg_id, "the version exchange must come first")
            return
        try:
            name, library = wire.v1_parse_core(f.payload)
        except ValueError as exc:
            self.error(f.msg_id, f"malformed core message: {exc}")
            return
        # a failed load leaves no core: jobs meant for the new one must not run on the old
        old, self.core = self.core, None
        if old is not None:
            old.close()
        try:
            self.core = load_core(name, library)
        except CoreError as exc:
            self.error(f.msg_id, str(exc))
            return
        except ImportError as exc:
            self.error(f.msg_id, f"core {name!r}: {exc}")
            return
        self.send(wire.v1_ok(f.msg_id), b"")

    def _job(self, f: wire.V1Frame, frame: bytes | bytearray) -> None:
        core = self.core
        if core is None:
            self.error(f.msg_id, "no compute core loaded" if self.versioned
                       else "the version exchange must come first")
            return
        try:
            _, data = wire.v1_parse_job(f.payload)
        except ValueError as exc:
            self.error(f.msg_id, f"malformed job message: {exc}")
            return
        if type(core) is CCore:
            # v1_parse_job proved the data is the frame's tail, from byte 33 on
            rc = core.run_ptr(_address(frame) + _JOB_DATA, len(data))
            try:
                out = core.output_view()
            except CoreError as exc:
                core.free_output()
                self.error(f.msg_id, str(exc))
                return
            try:
                self._result(f.msg_id, rc, out)
            finally:
                core.free_output()
        else:
            rc, result = core.run(data)
            self._result(f.msg_id, rc, result)

    def _result(self, msg_id: int, rc: int, out: Any) -> None:
        size = len(out)
        if self.max_reply and _RESULT_HEAD + size > self.max_reply:
            self.error(msg_id, f"{OUTPUT_TOO_LARGE}the job's output of {size} bytes (exit code {rc}) cannot be sent "
                               f"on the result ring, whose records hold {self.max_reply} bytes")
            return
        self.send(wire.v1_job_result_header(msg_id, rc, size), out)

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
            self.core = None


def _slow_address(frame: bytes | bytearray) -> int:
    if type(frame) is bytes:
        # c_char_p points at the bytes object's own buffer (no copy)
        return ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p).value or 0
    return ctypes.addressof(ctypes.c_char.from_buffer(frame))


# Where a bytes object's data starts, relative to id(): CPython's PyBytesObject keeps
# it inline after the header (basicsize counts its trailing NUL).  ctypes.cast says the
# same in 0.7 us instead of 0.05 us per job; the layout is checked once, here, and the
# slow path is used on an interpreter where it does not hold.
_BYTES_DATA = bytes.__basicsize__ - 1
_probe = b"fabric worker address probe"
if _slow_address(_probe) != id(_probe) + _BYTES_DATA:  # pragma: no cover - not CPython
    _BYTES_DATA = -1
del _probe


def _address(frame: bytes | bytearray) -> int:
    """The address of the first byte of *frame*, a bytes or bytearray this worker owns."""
    if _BYTES_DATA >= 0 and type(frame) is bytes:
        return id(frame) + _BYTES_DATA
    return _slow_address(frame)


# -- the socket transport --------------------------------------------------------

def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill *view* from *sock*; False at EOF before the first byte, EOFError after it."""
    got = 0
    need = len(view)
    while got < need:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise EOFError(f"the controller closed the stream {got} bytes into a {need}-byte read")
        got += n
    return True


def connect(target: str) -> socket.socket:
    """A connected stream socket for ``unix:/path``, ``tcp:HOST:PORT`` or ``HOST:PORT``."""
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target[5:])
        return sock
    if target.startswith("tcp:"):
        target = target[4:]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--connect wants unix:/path, tcp:HOST:PORT or HOST:PORT, not {target!r}")
    sock = socket.create_connection((host.strip("[]"), int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve_socket(sock: socket.socket, *, max_payload: int = wire.V1_DEFAULT_MAX_PAYLOAD) -> int:
    """Serve one controller over a connected stream until EOF; the exit status."""

    def send(head: bytes, body: Any) -> None:
        if not len(body):
            sock.sendall(head)
            return
        sent = sock.sendmsg([head, body])
        if sent < len(head):
            sock.sendall(memoryview(head)[sent:])
            sent = len(head)
        if sent - len(head) < len(body):
            sock.sendall(memoryview(body)[sent - len(head):])

    worker = Worker(send, max_payload=max_payload)
    header = bytearray(wire.V1_HEADER_SIZE)
    hview = memoryview(header)
    try:
        while True:
            if not _recv_exact(sock, hview):
                return 0
            kind, msg_id, length = _HEADER.unpack_from(header)
            if kind not in _V1_KNOWN or length > max_payload:
                # the stream's framing cannot be trusted past this header
                why = (f"unknown v1 message type 0x{kind:02x}" if kind not in _V1_KNOWN
                       else f"v1 payload of {length} bytes, the limit is {max_payload}")
                worker.error(msg_id, f"malformed v1 frame: {why}; closing the connection")
                return 1
            frame = bytearray(wire.V1_HEADER_SIZE + length)
            frame[:wire.V1_HEADER_SIZE] = header
            if length and not _recv_exact(sock, memoryview(frame)[wire.V1_HEADER_SIZE:]):
                raise EOFError("the controller closed the stream inside a frame")
            if not worker.handle(frame):
                return 0
    except (EOFError, ConnectionError) as exc:
        print(f"fabric worker: {exc}", file=sys.stderr)
        return 0
    finally:
        worker.close()
        sock.close()


# -- the ring transport ----------------------------------------------------------

def serve_rings(path_in: str, path_out: str, *, max_payload: int = wire.V1_DEFAULT_MAX_PAYLOAD,
                spin_us: float | None = None) -> int:
    """Serve the controller on a pair of rings until ring-in is shut down; the exit status.

    *spin_us* is how long the job ring spins for the next job before it sleeps on its
    futex (None: the ring's default).  A warm pool passes a longer spin: waking a
    sleeping worker costs tens of microseconds on a loaded 2-core machine, while one
    still spinning picks the job up in a few (see docs/benchmarks.md).
    """
    from fabric_ext import ring

    cons = ring.Consumer(path_in) if spin_us is None else ring.Consumer(path_in, spin_us=spin_us)
    prod = ring.Producer(path_out)
    worker = Worker(prod.push_parts, max_payload=max_payload, max_reply=prod.max_record)
    pop = cons.pop
    handle = worker.handle
    try:
        while True:
            try:
                frame = pop()
            except ring.RingClosed:
                return 0
            except ring.RingCorrupt as exc:
                # the record is gone and so is its id: the controller times that job out
                print(f"fabric worker: skipped a corrupt record: {exc}", file=sys.stderr)
                continue
            try:
                if not handle(frame):
                    return 0
            except (ValueError, OverflowError) as exc:
                # a reply that does not fit the result ring: say so in a small one
                msg_id = int.from_bytes(frame[1:9], "little") if len(frame) >= 9 else 0
                worker.error(msg_id, f"the reply cannot be sent on the result ring: {exc}")
    finally:
        worker.close()
        try:
            prod.shutdown()         # wake the controller's reader: nothing more will come
        except Exception:  # noqa: BLE001 - ending anyway
            pass
        prod.close()
        cons.close()


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent exits (a blocked pop() must not outlive it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() == 1:         # the parent died before prctl: nobody is left to serve
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabric.services.spawner.worker",
                                     description="A fabric warm worker (worker protocol v1).")
    parser.add_argument("--connect", help="unix:/path, tcp:HOST:PORT or HOST:PORT of the controller")
    parser.add_argument("--ring-in", help="ring of messages from the controller")
    parser.add_argument("--ring-out", help="ring of responses to the controller")
    parser.add_argument("--max-payload", type=int, default=wire.V1_DEFAULT_MAX_PAYLOAD,
                        help="largest message payload accepted, in bytes")
    parser.add_argument("--spin-us", type=float, default=None,
                        help="ring transport: microseconds to spin for the next job before sleeping")
    args = parser.parse_args(argv)
    if args.spin_us is not None and not (0 <= args.spin_us <= 1_000_000):
        parser.error("--spin-us must be between 0 and 1000000")
    if args.connect and not (args.ring_in or args.ring_out):
        return serve_socket(connect(args.connect), max_payload=args.max_payload)
    if args.ring_in and args.ring_out and not args.connect:
        _die_with_parent()
        return serve_rings(args.ring_in, args.ring_out, max_payload=args.max_payload, spin_us=args.spin_us)
    parser.error("give either --connect, or both --ring-in and --ring-out")
    return 2


if __name__ == "__main__":
    sys.exit(main())
