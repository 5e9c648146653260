"""The SPSC shared-memory ring: one producer process, one consumer process, one file.

The spawner's warm-worker pool uses one ring each way per worker (jobs in, results
out) instead of a pipe or socket: a record costs one memcpy in, one out, and no system
call unless the other side is asleep.  A ring is a file under /dev/shm (``create``),
which any process holding the path opens as a :class:`Producer` or a :class:`Consumer`::

    create("/dev/shm/fabric-ring-demo", 1 << 16, crc=True)
    p = Producer("/dev/shm/fabric-ring-demo")
    c = Consumer("/dev/shm/fabric-ring-demo")
    p.push(b"hello")
    p.push_parts(b"header:", b"payload")    # one record, no concatenation
    assert c.pop() == b"hello" and c.pop() == b"header:payload"
    p.close(); c.close(); unlink("/dev/shm/fabric-ring-demo")

How it works (byte layout in docs/ring.md, C layout in include/fabric_ring.h):

* A 4096-byte header (magic, version, flags, capacity, sizes; validated on every open)
  holds the 64-bit monotonic counters ``head`` (bytes written, producer's line) and
  ``tail`` (bytes consumed, consumer's line) on separate 128-byte lines.  The producer
  publishes ``head`` with a release store after writing a record; the consumer reads it
  with an acquire load, and publishes ``tail`` the same way after copying the record out.
* Records are contiguous in the data area: a 16-byte header (length, check word =
  length ^ constant, CRC32C or 0, low 32 bits of the record's position) then the
  payload, padded to 16 bytes.  A record that would cross the end is preceded by a wrap
  marker (length 0xFFFFFFFF) and starts again at offset 0, so a payload is always one
  contiguous span.  A payload is at most ``max_record`` = capacity / 4 bytes.
* A record that fails validation raises :class:`RingCorrupt` and is skipped, so the
  next pop continues: a bad CRC skips that record; a bad header (check word, position,
  length, wrap marker) cannot be trusted for its length, so the consumer skips to the
  producer's published head, counting the bytes lost.
* Waiting: spin with ``pause`` (and ``sched_yield`` every 16th check, so a peer sharing
  the core can run) for ``spin_us`` (default :data:`DEFAULT_SPIN_US`), then
  sleep on a shared futex word whose bit 0 says "a waiter is present", so the other side
  makes the FUTEX_WAKE system call only when someone sleeps.  The GIL is released while
  waiting.  :meth:`shutdown` (either side, any process or thread) sets CLOSED in the
  header and wakes both sides.

One Producer and one Consumer per ring at a time: the ring is single-producer,
single-consumer, and each object refuses concurrent use from two threads.
"""

import operator
import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix cimport unistd
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat

cdef extern from "fabric_atomic.h" nogil:
    uint32_t fab_load_acquire_u32(const uint32_t* p)
    uint64_t fab_load_acquire_u64(const uint64_t* p)
    void fab_store_release_u64(uint64_t* p, uint64_t v)

cdef extern from "fabric_futex.h" nogil:
    int64_t fab_now_ns()
    uint64_t fab_load_relaxed_u64(const uint64_t* p)
    void fab_bump_u64(uint64_t* p, uint64_t v)

__all__ = [
    "RingError", "RingCorrupt", "RingClosed", "RingHeaderInvalid",
    "create", "unlink", "crc32c", "Producer", "Consumer",
    "MAGIC", "VERSION", "HEADER_SIZE", "RECORD_HEADER_SIZE", "ALIGN",
    "MIN_CAPACITY", "MAX_CAPACITY", "DEFAULT_SPIN_US",
]

MAGIC = FAB_RING_MAGIC                #: the header's first 8 bytes, b"FABRING1"
VERSION = FAB_RING_VERSION            #: layout version this module reads and writes
HEADER_SIZE = FAB_RING_HEADER_SIZE    #: bytes before the data area
RECORD_HEADER_SIZE = FAB_RING_REC_HEADER
ALIGN = FAB_RING_ALIGN                #: records start at multiples of this
MIN_CAPACITY = 1 << 10
MAX_CAPACITY = 1 << 30
DEFAULT_SPIN_US = 50.0                #: spin this long before sleeping (covers a round trip)


class RingError(Exception):
    """Base of the ring's errors."""


class RingCorrupt(RingError):
    """Raised by pop when a record failed validation and was skipped; the next pop continues."""


class RingClosed(RingError, EOFError):
    """Raised when the ring was shut down (pop: and is drained)."""


class RingHeaderInvalid(RingError, ValueError):
    """Raised on open when the file's header has a bad magic, version, capacity or size."""


def crc32c(data, uint32_t crc=0):
    """CRC32C (Castagnoli) of *data*, continuing from *crc* (0 to start), as records carry it."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return fab_crc32c(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


cdef uint64_t _check_capacity(object capacity) except 0:
    cap = operator.index(capacity)
    if cap < MIN_CAPACITY or cap > MAX_CAPACITY or cap & (cap - 1):
        raise ValueError(
            f"capacity must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY}, got {cap}")
    return cap


def create(path, capacity, *, bint crc=False, start_counter=0):
    """Create a new ring file at *path* (it must not exist) with *capacity* data bytes.

    *capacity* is a power of two in [MIN_CAPACITY, MAX_CAPACITY]; the largest record is
    capacity / 4.  ``crc=True`` makes every record carry a CRC32C the consumer checks.
    *start_counter* (a multiple of ALIGN; a test hook) starts head and tail there instead
    of 0, e.g. just below 2**32 to test counters crossing it.
    """
    cdef uint64_t cap = _check_capacity(capacity)
    start = operator.index(start_counter)
    if start < 0 or start >= 2**64 or start % FAB_RING_ALIGN:
        raise ValueError(f"start_counter must be a multiple of {FAB_RING_ALIGN} in [0, 2**64), got {start}")
    cdef uint64_t size = cap + FAB_RING_HEADER_SIZE
    path = os.fspath(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    cdef void* p = MAP_FAILED
    try:
        # Reserve the pages now: a sparse /dev/shm file that cannot grow later would
        # SIGBUS a writer instead of failing here with ENOSPC.
        os.posix_fallocate(fd, 0, size)
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(f"mmap of {path} failed")
        h = <fab_ring_header*>p
        h.version = FAB_RING_VERSION
        h.flags = FAB_RING_FLAG_CRC if crc else 0
        h.capacity = cap
        h.max_record = cap // 4
        h.header_size = FAB_RING_HEADER_SIZE
        h.file_size = size
        h.start = start
        h.head = start
        h.tail = start
        # The magic last: an opener racing with us sees either no magic or a whole header.
        fab_store_release_u64(&h.magic, FAB_RING_MAGIC)
    except BaseException:
        os.close(fd)
        fd = -1
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    finally:
        if p != MAP_FAILED:
            munmap(p, size)
        if fd >= 0:
            os.close(fd)


def unlink(path):
    """Remove the ring file (mappings stay valid until closed); a missing file is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


cdef class _RingEnd:
    """What Producer and Consumer share: the validated mapping, waiting, shutdown, stats."""

    def __cinit__(self):
        self._h = NULL

    def __init__(self, path, *, spin_us=DEFAULT_SPIN_US):
        cdef struct_stat st
        cdef void* p
        cdef fab_ring_header* h
        if self._h != NULL:
            raise RingError(f"{self.path}: already open")
        if not spin_us >= 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        self._spin_ns = <int64_t>(spin_us * 1000.0)
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if fstat(fd, &st) != 0:
                raise OSError(f"fstat of {self.path} failed")
            if <uint64_t>st.st_size < FAB_RING_HEADER_SIZE:
                raise RingHeaderInvalid(
                    f"{self.path}: truncated: {st.st_size} bytes, less than the {FAB_RING_HEADER_SIZE}-byte header")
            p = mmap(NULL, <size_t>st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if p == MAP_FAILED:
                raise OSError(f"mmap of {self.path} failed")
        finally:
            os.close(fd)
        h = <fab_ring_header*>p
        try:
            self._validate(h, <uint64_t>st.st_size)
        except BaseException:
            munmap(p, <size_t>st.st_size)
            raise
        self._h = h
        self._map_size = <size_t>st.st_size
        self._data = <char*>p + FAB_RING_HEADER_SIZE
        self._cap = h.capacity
        self._mask = h.capacity - 1
        self._max_record = h.max_record
        self._crc = (h.flags & FAB_RING_FLAG_CRC) != 0
        self._busy = False

    cdef _validate(self, fab_ring_header* h, uint64_t st_size):
        where = self.path
        if fab_load_acquire_u64(&h.magic) != FAB_RING_MAGIC:
            raise RingHeaderInvalid(f"{where}: bad magic {h.magic:#018x} (not a fabric ring)")
        if h.version != FAB_RING_VERSION:
            raise RingHeaderInvalid(f"{where}: unsupported version {h.version} (this build reads {FAB_RING_VERSION})")
        if h.flags & ~FAB_RING_KNOWN_FLAGS:
            raise RingHeaderInvalid(f"{where}: unknown flags {h.flags:#x}")
        if h.header_size != FAB_RING_HEADER_SIZE:
            raise RingHeaderInvalid(f"{where}: header_size {h.header_size} != {FAB_RING_HEADER_SIZE}")
        cap = h.capacity
        if cap < MIN_CAPACITY or cap > MAX_CAPACITY or cap & (cap - 1):
            raise RingHeaderInvalid(f"{where}: capacity {cap} is not a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}]")
        if h.max_record != cap // 4:
            raise RingHeaderInvalid(f"{where}: max_record {h.max_record} != capacity / 4")
        if h.file_size != cap + FAB_RING_HEADER_SIZE:
            raise RingHeaderInvalid(f"{where}: file_size {h.file_size} != header + capacity ({cap + FAB_RING_HEADER_SIZE})")
        if st_size != h.file_size:
            raise RingHeaderInvalid(f"{where}: the file has {st_size} bytes, the header says {h.file_size} (truncated?)")

    cdef int _check_open(self) except -1:
        if self._h == NULL:
            raise RingError(f"{self.path}: this ring end is closed")
        return 0

    cdef int _enter(self) except -1:
        self._check_open()
        if self._busy:
            raise RingError(f"{self.path}: concurrent use of one ring end from two threads (SPSC)")
        self._busy = True
        return 0

    cdef int _wait(self, const uint64_t* watch, uint64_t threshold, uint32_t* word,
                   uint64_t* waits, int64_t deadline_ns) except -1:
        """Block (GIL released) until *watch* reaches *threshold*; returns an FAB_WAIT_* code."""
        cdef int r
        cdef int64_t spin = self._spin_ns
        while True:
            with nogil:
                r = fab_ring_wait(self._h, watch, threshold, word, spin, deadline_ns, waits)
            if r != FAB_WAIT_INTR:
                return r
            PyErr_CheckSignals()  # raises if a signal handler did (e.g. KeyboardInterrupt)
            spin = 0

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def max_record(self) -> int:
        return self._max_record

    @property
    def crc(self) -> bool:
        return self._crc

    @property
    def closed(self) -> bool:
        """True once either side called shutdown()."""
        self._check_open()
        return fab_ring_closed(self._h) != 0

    def shutdown(self):
        """Set CLOSED in the header and wake both sides (safe from any thread or process)."""
        self._check_open()
        fab_ring_shutdown(self._h)

    def close(self):
        """Unmap the ring (the file stays; see unlink).  Idempotent."""
        if self._h == NULL:
            return
        if self._busy:
            raise RingError(f"{self.path}: close() while a push/pop is in progress; shutdown() it first")
        munmap(<void*>self._h, self._map_size)
        self._h = NULL
        self._data = NULL

    def stats(self):
        """The ring's shared counters (both ends see the same figures)."""
        self._check_open()
        h = self._h
        head = fab_load_acquire_u64(&h.head)
        tail = fab_load_acquire_u64(&h.tail)
        return {
            "capacity": self._cap,
            "used": (head - tail) & 0xFFFFFFFFFFFFFFFF,
            "records_pushed": fab_load_relaxed_u64(&h.records_pushed),
            "bytes_pushed": fab_load_relaxed_u64(&h.bytes_pushed),
            "records_popped": fab_load_relaxed_u64(&h.records_popped),
            "bytes_popped": fab_load_relaxed_u64(&h.bytes_popped),
            "corrupt_skipped": fab_load_relaxed_u64(&h.corrupt_skipped),
            "bytes_lost": fab_load_relaxed_u64(&h.bytes_lost),
            "producer_waits": fab_load_relaxed_u64(&h.producer_waits),
            "consumer_waits": fab_load_relaxed_u64(&h.consumer_waits),
            "producer_wakes": fab_load_relaxed_u64(&h.producer_wakes),
            "consumer_wakes": fab_load_relaxed_u64(&h.consumer_wakes),
            "closed": fab_ring_closed(h) != 0,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self._h != NULL:
            munmap(<void*>self._h, self._map_size)
            self._h = NULL


cdef inline int64_t _deadline(double timeout) except? -2:
    if timeout < 0:
        return -1
    return fab_now_ns() + <int64_t>(timeout * 1e9)


cdef double _timeout_arg(object timeout) except? -2.0:
    if timeout is None:
        return -1.0
    cdef double t = timeout
    if not t >= 0:  # also rejects NaN
        raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
    return t


cdef class Producer(_RingEnd):
    """The writing end of a ring.  ``Producer(path, *, spin_us=DEFAULT_SPIN_US)``."""

    def __init__(self, path, *, spin_us=DEFAULT_SPIN_US):
        _RingEnd.__init__(self, path, spin_us=spin_us)
        self._head = fab_load_acquire_u64(&self._h.head)
        self._tail_seen = fab_load_acquire_u64(&self._h.tail)

    @property
    def pushed(self) -> int:
        """Records pushed into this ring (by any producer over its life)."""
        self._check_open()
        return fab_load_relaxed_u64(&self._h.records_pushed)

    def push(self, data, timeout=None):
        """Append one record; blocks while the ring is full (GIL released).

        Raises ValueError if it exceeds max_record, TimeoutError after *timeout*
        seconds, RingClosed once the ring is shut down.
        """
        self._push(data, None, _timeout_arg(timeout), True)

    def try_push(self, data):
        """Append one record if it fits now; returns False when the ring is full."""
        return self._push(data, None, 0.0, False) == 1

    def push_parts(self, head, body, timeout=None):
        """Append ONE record made of *head* followed by *body*, copied straight into the ring."""
        self._push(head, body, _timeout_arg(timeout), True)

    cdef int _push(self, object head, object body, double timeout, bint block) except -1:
        cdef Py_buffer a
        cdef Py_buffer b
        cdef bint have_b = False
        cdef fab_ring_header* h
        cdef fab_ring_record* rec
        cdef uint64_t n, size, off, contig, need
        cdef uint32_t crc = 0
        cdef int r
        cdef int64_t deadline
        PyObject_GetBuffer(head, &a, PyBUF_SIMPLE)
        try:
            if body is not None:
                PyObject_GetBuffer(body, &b, PyBUF_SIMPLE)
                have_b = True
            n = <uint64_t>a.len + (<uint64_t>b.len if have_b else 0)
            self._check_open()
            if n > self._max_record:
                raise ValueError(
                    f"record of {n} bytes exceeds max_record={self._max_record} "
                    f"(capacity {self._cap} / 4) of {self.path}")
            self._enter()
            try:
                h = self._h
                size = fab_ring_record_size(n)
                deadline = -2  # computed when we first have to wait (no clock read on the fast path)
                while True:
                    if fab_ring_closed(h):
                        raise RingClosed(f"{self.path}: the ring is shut down")
                    off = self._head & self._mask
                    contig = self._cap - off
                    need = size if size <= contig else contig + size
                    # The cached tail only lags the real one, so "fits" is never wrong;
                    # reloading only when it looks full keeps the consumer's cache line
                    # out of the common path.
                    if self._head + need - self._tail_seen <= self._cap:
                        break
                    self._tail_seen = fab_load_acquire_u64(&h.tail)
                    if self._head + need - self._tail_seen <= self._cap:
                        break
                    if not block:
                        return 0
                    if deadline == -2:
                        deadline = _deadline(timeout)
                    r = self._wait(&h.tail, self._head + need - self._cap, &h.space_word,
                                   &h.producer_waits, deadline)
                    if r == FAB_WAIT_TIMEOUT:
                        raise TimeoutError(f"{self.path}: ring full for {timeout} s")
                if size > contig:
                    rec = <fab_ring_record*>(self._data + off)
                    rec.length = FAB_RING_WRAP
                    rec.check = FAB_RING_WRAP ^ FAB_RING_CHECK_XOR
                    rec.crc = 0
                    rec.pos = <uint32_t>self._head
                    self._head += contig
                    off = 0
                rec = <fab_ring_record*>(self._data + off)
                memcpy(<char*>(rec + 1), a.buf, <size_t>a.len)
                if have_b:
                    memcpy(<char*>(rec + 1) + a.len, b.buf, <size_t>b.len)
                if self._crc:
                    crc = fab_crc32c(0, <char*>(rec + 1), <size_t>n)
                rec.length = <uint32_t>n
                rec.check = <uint32_t>n ^ FAB_RING_CHECK_XOR
                rec.crc = crc
                rec.pos = <uint32_t>self._head
                self._head += size
                fab_bump_u64(&h.records_pushed, 1)
                fab_bump_u64(&h.bytes_pushed, n)
                fab_store_release_u64(&h.head, self._head)
                fab_ring_wake(&h.data_word, &h.producer_wakes)
                return 1
            finally:
                self._busy = False
        finally:
            if have_b:
                PyBuffer_Release(&b)
            PyBuffer_Release(&a)


cdef class Consumer(_RingEnd):
    """The reading end of a ring.  ``Consumer(path, *, spin_us=DEFAULT_SPIN_US)``."""

    def __init__(self, path, *, spin_us=DEFAULT_SPIN_US):
        _RingEnd.__init__(self, path, spin_us=spin_us)
        self._tail = fab_load_acquire_u64(&self._h.tail)
        self._head_seen = self._tail

    @property
    def popped(self) -> int:
        """Records popped from this ring (by any consumer over its life)."""
        self._check_open()
        return fab_load_relaxed_u64(&self._h.records_popped)

    def pop(self, timeout=None):
        """Take the next record as bytes; blocks while the ring is empty (GIL released).

        Raises TimeoutError after *timeout* seconds, RingClosed once the ring is shut
        down and drained, RingCorrupt when a record failed validation (it was skipped;
        call pop again).
        """
        return self._pop(_timeout_arg(timeout), True)

    def try_pop(self):
        """The next record, or None if the ring is empty now (RingClosed once shut down and drained)."""
        return self._pop(0.0, False)

    cdef int _skip(self, uint64_t nbytes, uint64_t lost) except -1:
        """Advance tail by nbytes (publishing it); *lost* > 0 counts a corrupt skip."""
        h = self._h
        self._tail += nbytes
        if lost:
            fab_bump_u64(&h.corrupt_skipped, 1)
            fab_bump_u64(&h.bytes_lost, lost)
        fab_store_release_u64(&h.tail, self._tail)
        fab_ring_wake(&h.space_word, &h.consumer_wakes)
        return 0

    cdef object _pop(self, double timeout, bint block):
        cdef fab_ring_header* h
        cdef fab_ring_record* rec
        cdef uint64_t head, avail, off, size, pos
        cdef uint32_t length, crc
        cdef int r
        cdef int64_t deadline
        self._enter()
        try:
            h = self._h
            deadline = -2  # computed when we first have to wait
            while True:
                # As in the producer: the cached head lags, so records below it are
                # published; reload only when we caught up with it.
                pos = self._tail
                head = self._head_seen
                if head == pos:
                    head = self._head_seen = fab_load_acquire_u64(&h.head)
                if head == pos:
                    if block:
                        if deadline == -2:
                            deadline = _deadline(timeout)
                        r = self._wait(&h.head, pos + 1, &h.data_word, &h.consumer_waits, deadline)
                        if r == FAB_WAIT_TIMEOUT:
                            raise TimeoutError(f"{self.path}: ring empty for {timeout} s")
                        if r != FAB_WAIT_CLOSED:
                            continue
                    elif not fab_ring_closed(h):
                        return None
                    # Closed: pushes published before the shutdown are still delivered.
                    if fab_load_acquire_u64(&h.head) == pos:
                        raise RingClosed(f"{self.path}: the ring is shut down and drained")
                    continue
                avail = head - pos
                if avail > self._cap or head & (FAB_RING_ALIGN - 1):
                    # The published head itself is implausible (too far, or not on a record
                    # boundary): nothing safe to skip to.  The producer's next publish
                    # overwrites it; forget the cached value.
                    self._head_seen = pos
                    raise RingCorrupt(
                        f"{self.path}: implausible head {head}: {avail} bytes past tail {pos} (capacity {self._cap})")
                off = pos & self._mask
                rec = <fab_ring_record*>(self._data + off)
                length = rec.length
                if rec.check != (length ^ FAB_RING_CHECK_XOR) or rec.pos != <uint32_t>pos:
                    self._skip(avail, avail)
                    raise RingCorrupt(
                        f"{self.path}: bad record header at {pos} (length {length:#x}, check {rec.check:#x}, "
                        f"pos {rec.pos:#x}); skipped {avail} bytes to the producer's head")
                if length == FAB_RING_WRAP:
                    size = self._cap - off
                    if off == 0 or size > avail:
                        self._skip(avail, avail)
                        raise RingCorrupt(
                            f"{self.path}: misplaced wrap marker at {pos}; skipped {avail} bytes to the producer's head")
                    self._skip(size, 0)
                    continue
                size = fab_ring_record_size(length)
                if length > self._max_record or size > avail or off + size > self._cap:
                    self._skip(avail, avail)
                    raise RingCorrupt(
                        f"{self.path}: record length {length} at {pos} does not fit (max_record "
                        f"{self._max_record}, {avail} bytes published); skipped {avail} bytes to the producer's head")
                crc = rec.crc
                out = PyBytes_FromStringAndSize(<char*>(rec + 1), length)
                # Checked on our copy, so what we return is exactly what was checked.
                if self._crc and fab_crc32c(0, PyBytes_AS_STRING(out), length) != crc:
                    self._skip(size, size)
                    raise RingCorrupt(f"{self.path}: CRC32C mismatch in the {length}-byte record at {pos}; skipped it")
                fab_bump_u64(&h.records_popped, 1)
                fab_bump_u64(&h.bytes_popped, length)
                self._skip(size, 0)
                return out
        finally:
            self._busy = False
