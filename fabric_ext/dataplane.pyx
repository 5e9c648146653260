# cython: freethreading_compatible = False
"""The data plane's socket loops: remote memory's bytes over one TCP connection, both ends.

Remote memory's control (alloc, free, stat...) stays on NATS; its bulk bytes may go point
to point instead (docs/protocol.md "Data plane"): a client connects to the allocator's data
port, says HELLO with a ticket it got over NATS, and then sends the same FBF1 frames it
would send on ``fabric.mem.<node>.read`` / ``write`` and reads the same replies, or an
FDPE error frame.  This module is the byte-moving part of both ends:

* :func:`serve` runs one connection on the allocator: it waits (GIL released) for a
  frame's header, validates it with the wire codec's own header check before sizing
  anything from it, receives the rest into a buffer kept across requests, hands the
  frame to the allocator's handler (the same frame code as the NATS path) and sends
  the reply parts with one ``sendmsg`` (scatter-gather).  Every system call runs
  without the GIL; every wait has a deadline (idle between frames, per frame once
  its header started), so a slow or silent peer costs one blocked thread at most
  until its deadline, never the allocator.
* :class:`Channel` is the client's end of one connection: blocking I/O in the
  caller's thread, requests sent scatter-gather (a write's bytes go from the caller's
  buffer to the socket, never copied into a frame), a single read's bytes received
  straight into the ``bytes`` object returned.

The handshake frames (HELLO, WELCOME) and the error frame (FDPE) are built and read
here too, so both ends and the tests share one spelling of them.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from fabric_ext.wire cimport FRAME_HEADER_SIZE, FrameHeader, _check_header

from fabric_ext.errors import FabricError, InvalidFrame, TooLarge

from fabric_ext.endian cimport (
    fabric_load_le16,
    fabric_load_le32,
    fabric_load_le64,
    fabric_store_le16,
    fabric_store_le32,
    fabric_store_u8,
)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<string.h>" nogil:
    void* memset(void* s, int c, size_t n)


# -- the handshake and error frames (docs/protocol.md "Data plane") --------------------

cdef enum:
    _VERSION = 1
    # HELLO: magic, version u8, flags u8, ticket_len u16, then the ticket (ASCII)
    _HELLO_FIXED = 8
    # WELCOME: magic, version u8, status u8 (0), reserved u16 (0), max_frame u32, idle_ms u32
    _WELCOME_SIZE = 16
    # FDPE: magic, code u16, kind_len u16, message_len u32, then kind (ASCII) and message (UTF-8)
    _ERROR_FIXED = 12
    _MAX_TICKET = 1024
    _MAX_KIND = 64
    _MAX_MESSAGE = 4096

#: HELLO and WELCOME start with these four bytes; an error frame with ERROR_MAGIC
HELLO_MAGIC = b"FDP1"
ERROR_MAGIC = b"FDPE"
VERSION = _VERSION
HELLO_FIXED = _HELLO_FIXED
WELCOME_SIZE = _WELCOME_SIZE
ERROR_FIXED = _ERROR_FIXED
MAX_TICKET = _MAX_TICKET
MAX_KIND = _MAX_KIND
MAX_MESSAGE = _MAX_MESSAGE

cdef const char* _HELLO = b"FDP1"
cdef const char* _ERROR = b"FDPE"
cdef const char* _FRAME = b"FBF1"

# what a wait or a transfer ended with (the loops' C-level results)
cdef enum:
    R_OK = 0
    R_TIMEOUT = 1
    R_CLOSED = 2        # the peer closed (EOF) before the bytes were all there
    R_ERROR = 3         # a socket error (errno in the caller's copy)
    R_SIGNAL = 4        # interrupted: the caller checks Python's signal handlers

# a kept request buffer: large enough for the frames that matter, released past this after use
cdef Py_ssize_t _INITIAL_BUFFER = 64 * 1024
cdef Py_ssize_t _KEEP_BUFFER = 4 * 1024 * 1024 + 64 * 1024
cdef int _MAX_PARTS = 64
#: the most buffers one send takes (a Channel request, a reply of the handler)
MAX_PARTS = _MAX_PARTS


class Refused(FabricError, register=False):
    """The peer answered with an FDPE error frame: ``code``, ``kind`` and ``message`` say why.

    The client turns it into the error class of ``kind`` (``fabric.errors.error_from_wire``).
    """

    def __init__(self, code, kind, message):
        super().__init__(message)
        self.code = code
        self.kind = kind


class Broken(FabricError, register=False):
    """The connection failed under a request (reset, closed, timed out): ``reason`` says which.

    ``sent`` is false when nothing of the request left this end (safe to retry elsewhere).
    """

    code = 503
    kind = "unavailable"

    def __init__(self, message, reason, sent):
        super().__init__(message)
        self.reason = reason
        self.sent = sent


def hello(ticket):
    """The HELLO frame that opens a connection: ``FDP1``, version, flags, ticket length, ticket."""
    cdef bytes t = ticket.encode("ascii") if isinstance(ticket, str) else bytes(ticket)
    if not 0 < len(t) <= _MAX_TICKET:
        raise ValueError(f"a ticket is 1 to {_MAX_TICKET} bytes, got {len(t)}")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _HELLO_FIXED + len(t))
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, _HELLO, 4)
    fabric_store_u8(p + 4, _VERSION)
    fabric_store_u8(p + 5, 0)
    fabric_store_le16(p + 6, <uint16_t>len(t))
    memcpy(p + _HELLO_FIXED, PyBytes_AS_STRING(t), len(t))
    return out


def hello_ticket_length(header):
    """The ticket length a HELLO's first 8 bytes announce; raises InvalidFrame on anything else."""
    cdef const unsigned char[:] h = header
    if h.shape[0] < _HELLO_FIXED:
        raise InvalidFrame(f"truncated HELLO: {h.shape[0]} bytes, its fixed part is {_HELLO_FIXED}")
    if memcmp(&h[0], _HELLO, 4) != 0:
        raise InvalidFrame(f"bad HELLO magic {bytes(h[:4])!r}, expected {HELLO_MAGIC!r}")
    if h[4] != _VERSION:
        raise InvalidFrame(f"unsupported data plane version {h[4]} (this end speaks {_VERSION})")
    if h[5] != 0:
        raise InvalidFrame(f"unknown HELLO flags 0x{h[5]:02x} (version 1 defines none)")
    cdef uint16_t n = fabric_load_le16(&h[6])
    if n == 0 or n > _MAX_TICKET:
        raise InvalidFrame(f"HELLO ticket length {n}: it must be 1 to {_MAX_TICKET}")
    return n


def welcome(uint32_t max_frame, uint32_t idle_ms):
    """The WELCOME frame: the connection is admitted; the largest frame and the idle timeout it has."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _WELCOME_SIZE)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, _HELLO, 4)
    fabric_store_u8(p + 4, _VERSION)
    fabric_store_u8(p + 5, 0)
    fabric_store_le16(p + 6, 0)
    fabric_store_le32(p + 8, max_frame)
    fabric_store_le32(p + 12, idle_ms)
    return out


def parse_welcome(data):
    """``(max_frame, idle_ms)`` of a WELCOME; an FDPE raises :class:`Refused`, anything else InvalidFrame."""
    cdef const unsigned char[:] h = data
    if h.shape[0] >= _ERROR_FIXED and memcmp(&h[0], _ERROR, 4) == 0:
        code, kind, message, _ = parse_error(data)
        raise Refused(code, kind, message)
    if h.shape[0] != _WELCOME_SIZE or memcmp(&h[0], _HELLO, 4) != 0:
        raise InvalidFrame(f"expected a {_WELCOME_SIZE}-byte WELCOME, got {bytes(h[:16])!r}")
    if h[4] != _VERSION or h[5] != 0 or fabric_load_le16(&h[6]) != 0:
        raise InvalidFrame(f"unsupported WELCOME (version {h[4]}, status {h[5]})")
    return fabric_load_le32(&h[8]), fabric_load_le32(&h[12])


def error_frame(int code, str kind, str message):
    """An FDPE frame: ``code`` (the error code), ``kind`` (the ``Fabric-Error`` kind), ``message``."""
    cdef bytes k = kind.encode("ascii")[:_MAX_KIND]
    cdef bytes m = message.encode("utf-8", "replace")[:_MAX_MESSAGE]
    if not 0 <= code <= 0xFFFF:
        code = 500
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _ERROR_FIXED + len(k) + len(m))
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, _ERROR, 4)
    fabric_store_le16(p + 4, <uint16_t>code)
    fabric_store_le16(p + 6, <uint16_t>len(k))
    fabric_store_le32(p + 8, <uint32_t>len(m))
    memcpy(p + _ERROR_FIXED, PyBytes_AS_STRING(k), len(k))
    memcpy(p + _ERROR_FIXED + len(k), PyBytes_AS_STRING(m), len(m))
    return out


def error_frame_length(header):
    """The whole length of the FDPE whose first 12 bytes are *header* (limits checked)."""
    cdef const unsigned char[:] h = header
    if h.shape[0] < _ERROR_FIXED or memcmp(&h[0], _ERROR, 4) != 0:
        raise InvalidFrame(f"expected an FDPE error frame, got {bytes(h[:4])!r}")
    cdef uint16_t klen = fabric_load_le16(&h[6])
    cdef uint32_t mlen = fabric_load_le32(&h[8])
    if klen > _MAX_KIND or mlen > _MAX_MESSAGE:
        raise InvalidFrame(f"FDPE kind of {klen} or message of {mlen} bytes is over its limit")
    return _ERROR_FIXED + klen + mlen


def parse_error(data):
    """``(code, kind, message, length)`` of the FDPE at the start of *data*."""
    cdef Py_ssize_t n = error_frame_length(data)
    cdef const unsigned char[:] h = data
    if h.shape[0] < n:
        raise InvalidFrame(f"truncated FDPE: {h.shape[0]} of {n} bytes")
    cdef uint16_t klen = fabric_load_le16(&h[6])
    kind = bytes(h[_ERROR_FIXED:_ERROR_FIXED + klen]).decode("ascii", "replace")
    message = bytes(h[_ERROR_FIXED + klen:n]).decode("utf-8", "replace")
    return fabric_load_le16(&h[4]), kind, message, n


# -- the C loops ------------------------------------------------------------------------

cdef inline int64_t _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef int _wait(int fd, short events, int64_t deadline_ms, int* err) noexcept nogil:
    """Wait until *fd* is ready for *events* or the deadline passes (-1: no deadline)."""
    cdef pollfd p
    cdef int rc, left
    while True:
        if deadline_ms < 0:
            left = -1
        else:
            left = <int>(deadline_ms - _now_ms())
            if left < 0:
                return R_TIMEOUT
        p.fd = fd
        p.events = events
        p.revents = 0
        rc = poll(&p, 1, left)
        if rc > 0:
            return R_OK  # ready, hung up or failed: the next recv or send says which
        if rc == 0:
            return R_TIMEOUT
        if errno == EINTR:
            err[0] = EINTR
            return R_SIGNAL
        err[0] = errno
        return R_ERROR


cdef inline int _after_failure(int fd, short events, int64_t deadline_ms, int* err) noexcept nogil:
    """After a recv or sendmsg that failed: R_OK to try again (it would have blocked, and now *fd* is
    ready for *events*), else why to stop (R_SIGNAL for EINTR: the caller runs Python's handlers)."""
    if errno == EAGAIN:  # (EWOULDBLOCK is EAGAIN on Linux)
        return _wait(fd, events, deadline_ms, err)
    err[0] = errno
    return R_SIGNAL if errno == EINTR else R_ERROR


cdef int _recv_exact(int fd, char* p, size_t n, int64_t deadline_ms, size_t* got, int* err) noexcept nogil:
    """Receive exactly *n* bytes into *p*; *got* counts what arrived (also on failure)."""
    cdef ssize_t r
    cdef int rc
    while got[0] < n:
        r = recv(fd, p + got[0], n - got[0], MSG_DONTWAIT)
        if r > 0:
            got[0] += <size_t>r
            continue
        if r == 0:
            return R_CLOSED
        rc = _after_failure(fd, POLLIN, deadline_ms, err)
        if rc != R_OK:
            return rc
    return R_OK


cdef int _send_all(int fd, iovec* iov, int count, int64_t deadline_ms, size_t* sent, int* err) noexcept nogil:
    """Send every byte of the *count* iovecs (advanced in place); *sent* counts what left."""
    cdef msghdr m
    cdef ssize_t r
    cdef size_t k
    cdef int rc
    memset(&m, 0, sizeof(msghdr))
    while count > 0:
        if iov[0].iov_len == 0:
            iov += 1
            count -= 1
            continue
        m.msg_iov = iov
        m.msg_iovlen = <size_t>count
        r = sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL)
        if r >= 0:
            sent[0] += <size_t>r
            k = <size_t>r
            while count > 0 and k >= iov[0].iov_len:
                k -= iov[0].iov_len
                iov += 1
                count -= 1
            if count > 0:
                iov[0].iov_base = <char*>iov[0].iov_base + k
                iov[0].iov_len -= k
            continue
        rc = _after_failure(fd, POLLOUT, deadline_ms, err)
        if rc != R_OK:
            return rc
    return R_OK


cdef str _reason(int rc, int err):
    if rc == R_TIMEOUT:
        return "timeout"
    if rc == R_CLOSED:
        return "closed"
    import os
    return f"error: {os.strerror(err)}"


cdef class _Parts:
    """The buffers of one send, acquired for its duration (released by release() or on dealloc)."""

    cdef Py_buffer* bufs
    cdef iovec* iov
    cdef int count
    cdef size_t total

    def __cinit__(self):
        self.bufs = NULL
        self.iov = NULL
        self.count = 0
        self.total = 0

    cdef int acquire(self, object parts) except -1:
        cdef Py_ssize_t n = len(parts)
        cdef int i
        if n < 1 or n > _MAX_PARTS:
            raise ValueError(f"a send takes 1 to {_MAX_PARTS} buffers, got {n}")
        self.bufs = <Py_buffer*>PyMem_Malloc(n * sizeof(Py_buffer))
        self.iov = <iovec*>PyMem_Malloc(n * sizeof(iovec))
        if self.bufs == NULL or self.iov == NULL:
            raise MemoryError()
        for i in range(n):
            PyObject_GetBuffer(parts[i], &self.bufs[i], PyBUF_SIMPLE)
            self.count += 1
            self.iov[i].iov_base = self.bufs[i].buf
            self.iov[i].iov_len = <size_t>self.bufs[i].len
            self.total += <size_t>self.bufs[i].len
        return 0

    cdef void release(self) noexcept:
        cdef int i
        for i in range(self.count):
            PyBuffer_Release(&self.bufs[i])
        self.count = 0
        PyMem_Free(self.bufs)
        PyMem_Free(self.iov)
        self.bufs = NULL
        self.iov = NULL

    def __dealloc__(self):
        self.release()


cdef int _send_parts(int fd, object parts, int64_t deadline_ms, size_t* sent, int* err) except -1:
    """Send *parts* (a list or tuple of buffers) with the GIL released; returns an R_ code."""
    cdef _Parts p = _Parts()
    cdef int rc
    p.acquire(parts)
    try:
        while True:
            with nogil:
                rc = _send_all(fd, p.iov, p.count, deadline_ms, sent, err)
            if rc != R_SIGNAL:
                return rc
            PyErr_CheckSignals()
    finally:
        p.release()


cdef int _recv_into(int fd, char* p, size_t n, int64_t deadline_ms, size_t* got, int* err) except -1:
    """:func:`_recv_exact` with the GIL released, Python's signal handlers run on EINTR."""
    cdef int rc
    while True:
        with nogil:
            rc = _recv_exact(fd, p, n, deadline_ms, got, err)
        if rc != R_SIGNAL:
            return rc
        PyErr_CheckSignals()


cdef int _send_error(int fd, object exc, int64_t deadline_ms) except -1:
    cdef size_t sent = 0
    cdef int err = 0
    code = getattr(exc, "code", 500)
    kind = getattr(exc, "kind", "internal")
    message = getattr(exc, "message", str(exc))
    _send_parts(fd, (error_frame(code if isinstance(code, int) else 500, str(kind), str(message)),),
                deadline_ms, &sent, &err)
    return 0


@cython.boundscheck(False)
def serve(int fd, handler, *, uint64_t max_frame, int idle_ms, int frame_ms, uint64_t max_items=65536):
    """Serve the frames of one admitted connection until it ends; returns why it ended.

    ``handler(frame)`` gets each whole FBF1 frame (a memoryview valid during the call)
    and returns ``(parts, keep)``: the buffers of its reply, sent with one
    ``sendmsg``, and whether to go on with the connection.  A header that fails the
    codec's check gets an FDPE error frame and ends the connection (the stream cannot
    be resynchronised).  Between frames the connection may be idle *idle_ms*; once a
    frame's first bytes arrived, the whole frame must arrive, and its reply leave,
    within *frame_ms*.  Returns ``"closed"`` (the peer left between frames),
    ``"idle"``, ``"timeout"``, ``"invalid"``, ``"handler"`` (it said stop) or
    ``"error: ..."``.
    """
    cdef char hdr[FRAME_HEADER_SIZE]
    cdef FrameHeader h
    cdef bytearray buf = PyByteArray_FromStringAndSize(NULL, _INITIAL_BUFFER)
    cdef size_t got, sent
    cdef int rc, err = 0
    cdef int64_t deadline
    cdef object view, parts, keep
    while True:
        # between frames: wait for the next one, at most idle_ms
        while True:
            with nogil:
                rc = _wait(fd, POLLIN, _now_ms() + idle_ms, &err)
            if rc != R_SIGNAL:
                break
            PyErr_CheckSignals()
        if rc == R_TIMEOUT:
            return "idle"
        if rc != R_OK:
            return _reason(rc, err)
        deadline = _now_ms() + frame_ms
        got = 0
        rc = _recv_into(fd, hdr, FRAME_HEADER_SIZE, deadline, &got, &err)
        if rc == R_CLOSED and got == 0:
            return "closed"
        if rc != R_OK:
            return _reason(rc, err)
        try:
            _check_header(hdr, FRAME_HEADER_SIZE, max_items, max_frame, &h)
            if h.total > max_frame:
                raise TooLarge(f"frame of {h.total} bytes, this data plane's limit is {max_frame}")
        except FabricError as exc:
            _send_error(fd, exc, deadline)
            return "invalid"
        if <Py_ssize_t>h.total > PyByteArray_GET_SIZE(buf):
            buf = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>h.total)
        memcpy(PyByteArray_AS_STRING(buf), hdr, FRAME_HEADER_SIZE)
        got = FRAME_HEADER_SIZE
        rc = _recv_into(fd, PyByteArray_AS_STRING(buf), <size_t>h.total, deadline, &got, &err)
        if rc != R_OK:
            return _reason(rc, err)
        view = memoryview(buf)[:h.total]
        parts, keep = handler(view)
        view.release()
        sent = 0
        rc = _send_parts(fd, parts, deadline, &sent, &err)
        parts = None
        if rc != R_OK:
            return _reason(rc, err)
        if not keep:
            return "handler"
        if PyByteArray_GET_SIZE(buf) > _KEEP_BUFFER:
            buf = PyByteArray_FromStringAndSize(NULL, _INITIAL_BUFFER)


@cython.final
cdef class Channel:
    """The client's end of one admitted data plane connection (blocking, in the caller's thread).

    *sock* is the connected socket (kept open by the caller, which owns it);
    *timeout_s* bounds each request, send and reply together; *max_frame* is the
    server's (from its WELCOME).  Not thread-safe: one request at a time.
    """

    cdef int fd
    cdef int timeout_ms
    cdef uint64_t _max_frame
    cdef object sock
    cdef char hdr[FRAME_HEADER_SIZE]

    def __init__(self, sock, double timeout_s, uint64_t max_frame):
        self.sock = sock
        self.fd = sock.fileno()
        self.timeout_ms = <int>(timeout_s * 1000) if timeout_s > 0 else 1
        self._max_frame = max_frame

    @property
    def max_frame(self):
        return self._max_frame

    cdef int _send(self, object parts, int64_t deadline) except -1:
        cdef size_t sent = 0
        cdef int err = 0
        cdef int rc = _send_parts(self.fd, parts, deadline, &sent, &err)
        if rc != R_OK:
            raise Broken(f"data plane send failed ({_reason(rc, err)})", _reason(rc, err), sent > 0)
        return 0

    cdef int _recv(self, char* p, size_t n, int64_t deadline, size_t* got) except -1:
        cdef int err = 0
        cdef int rc = _recv_into(self.fd, p, n, deadline, got, &err)
        if rc != R_OK:
            raise Broken(f"data plane reply failed ({_reason(rc, err)})", _reason(rc, err), True)
        return 0

    cdef int _head(self, int64_t deadline) except -1:
        """Receive a reply's first bytes into hdr: an FBF1 header (returns 0) or an FDPE (raises Refused)."""
        cdef size_t got = 0
        cdef bytearray err
        self._recv(self.hdr, _ERROR_FIXED, deadline, &got)
        if memcmp(self.hdr, _ERROR, 4) == 0:
            n = error_frame_length((<char*>self.hdr)[:_ERROR_FIXED])
            err = PyByteArray_FromStringAndSize(NULL, n)
            memcpy(PyByteArray_AS_STRING(err), self.hdr, _ERROR_FIXED)
            self._recv(PyByteArray_AS_STRING(err), <size_t>n, deadline, &got)
            code, kind, message, _ = parse_error(err)
            raise Refused(code, kind, message)
        self._recv(self.hdr, FRAME_HEADER_SIZE, deadline, &got)
        return 0

    cdef int _single(self, object parts, int kind, str what, int64_t deadline, FrameHeader* h,
                     char* item) except -1:
        """Send a one-item request; receive its reply's header (checked: *kind*, one item, no handle) and item."""
        cdef size_t got = 0
        self._send(parts, deadline)
        self._head(deadline)
        _check_header(self.hdr, FRAME_HEADER_SIZE, 1, self._max_frame, h)
        if h.kind != kind or h.item_count != 1 or h.items_length != 24:
            raise InvalidFrame(f"a single {what}'s reply is a one-item {'DATA' if kind == 3 else 'ACK'} frame "
                               f"(kind {h.kind}, {h.item_count} items, table of {h.items_length} bytes)")
        self._recv(item, 24, deadline, &got)
        if fabric_load_le16(item) != 0 or fabric_load_le32(item + 4) != 0:
            raise InvalidFrame(f"malformed item in a single {what}'s reply")
        return 0

    def request(self, parts):
        """Send one request frame (its buffers, in order); returns the whole FBF1 reply frame.

        An FDPE reply raises :class:`Refused`; a failed or timed-out connection
        :class:`Broken` (the connection is then unusable: close it).
        """
        cdef int64_t deadline = _now_ms() + self.timeout_ms
        cdef FrameHeader h
        cdef size_t got = FRAME_HEADER_SIZE
        cdef bytearray out
        self._send(parts, deadline)
        self._head(deadline)
        _check_header(self.hdr, FRAME_HEADER_SIZE, 65536, self._max_frame, &h)
        out = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>h.total)
        memcpy(PyByteArray_AS_STRING(out), self.hdr, FRAME_HEADER_SIZE)
        self._recv(PyByteArray_AS_STRING(out), <size_t>h.total, deadline, &got)
        return out

    def write(self, head, data):
        """Send a single-item WRITE, its *head* (``wire.encode_head``) then *data*, in one ``sendmsg``;
        returns the bytes written, read from the one-item ACK reply.  A failed item raises :class:`Refused`.
        """
        cdef int64_t deadline = _now_ms() + self.timeout_ms
        cdef FrameHeader h
        cdef char item[24]
        cdef uint16_t status
        self._single((head, data), 4, "write", deadline, &h, item)
        status = fabric_load_le16(item + 2)
        if status != 0:
            raise Refused(status, "", f"write failed with {status}")
        return fabric_load_le64(item + 16)

    def read(self, frame):
        """Send a single-item READ *frame*; returns the item's bytes, received straight into them.

        The reply must be a one-item DATA frame with an empty handle; a failed item's
        status raises :class:`Refused` with that code (kind ``""``: the caller maps it).
        """
        cdef int64_t deadline = _now_ms() + self.timeout_ms
        cdef FrameHeader h
        cdef char item[24]
        cdef size_t got = 0
        cdef uint16_t status
        cdef uint64_t length
        cdef bytes out
        self._single((frame,), 3, "read", deadline, &h, item)
        status = fabric_load_le16(item + 2)
        length = fabric_load_le64(item + 16)
        if length != h.payload_length:
            raise InvalidFrame("malformed DATA item in a single read's reply")
        if status != 0:
            if length != 0:
                raise InvalidFrame(f"a DATA item with status {status} must have length 0")
            raise Refused(status, "", f"read failed with {status}")
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
        got = 0
        self._recv(PyBytes_AS_STRING(out), <size_t>length, deadline, &got)
        return out
