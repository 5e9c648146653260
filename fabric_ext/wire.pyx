# cython: language_level=3
"""The binary frame: bulk bytes for the allocator's ``read``/``write`` endpoints.

A frame carries one or many memory items (a handle, an offset, a length, a
status) and, for WRITE and DATA, their bytes, raw and concatenated: no base64,
no per-item framing, and at most one copy on the hot path.  The layout is
documented byte by byte in ``docs/protocol.md`` (section "The binary frame");
every integer is little-endian::

    header (24 bytes)  magic "FBF1" | version 1 | kind | flags 0 | item_count u32
                       | items_length u32 | payload_length u64
    item table         item_count x (handle_len u16 | status u16 | reserved u32
                       | offset u64 | length u64 | handle, zero-padded to 8)
    payload            the items' bytes, in item order, no padding

Decoding is zero-copy: the payload views a :class:`Frame` hands out point into
the buffer it was decoded from.  Everything a peer sent is validated before
anything is allocated for it, and every field read is bounds-checked: a
truncated, corrupt or hostile frame raises :class:`fabric.errors.InvalidFrame`,
a frame above the caller's limits :class:`fabric.errors.TooLarge` (both defined in
:mod:`fabric_ext.errors`, so this codec loads without the ``fabric`` package).

>>> from fabric_ext import wire
>>> req = wire.encode(wire.KIND_WRITE, [("h1", 0, 5, 0)], [b"hello"])
>>> f = wire.decode(req)
>>> f.kind == wire.KIND_WRITE, f.items, bytes(f.data(0))
(True, [('h1', 0, 5, 0)], b'hello')

On a byte stream, :class:`FrameDecoder` reassembles frames from chunks of any
size and rejects a hostile header as soon as its 24 bytes have arrived.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from libc.stdint cimport UINT32_MAX, UINT64_MAX, int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from fabric_ext.errors import InvalidFrame, TooLarge

from fabric_ext.endian cimport (
    FABRIC_ASSERT,
    fabric_load_le16,
    fabric_load_le32,
    fabric_load_le64,
    fabric_load_u8,
    fabric_store_le16,
    fabric_store_le32,
    fabric_store_le64,
    fabric_store_u8,
)

cdef extern from *:
    """
    /* Move an acquired Py_buffer: dst now owns it; releasing src is a no-op. */
    static inline void fabric_wire_move_buffer(Py_buffer *dst, Py_buffer *src)
    {
        *dst = *src;
        src->obj = NULL;
    }
    """
    void _move_buffer "fabric_wire_move_buffer" (Py_buffer* dst, Py_buffer* src) noexcept nogil

cdef extern from "Python.h":
    bint PyUnicode_Check(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    bint PyBytes_Check(object o)
    bint PyTuple_CheckExact(object o)
    bint PyTuple_Check(object o)
    bint PyList_CheckExact(object o)
    bint PyLong_Check(object o)
    object PyNumber_Index(object o)
    const Py_ssize_t PY_SSIZE_T_MAX


MAGIC = b"FBF1"
VERSION = 1
HEADER_SIZE = FRAME_HEADER_SIZE
ITEM_FIXED = FRAME_ITEM_FIXED           # bytes of an item before its (padded) handle
KIND_WRITE = 1
KIND_READ = 2
KIND_DATA = 3
KIND_ACK = 4
CONTENT_TYPE = "application/x-fabric-frame"
TO_END = 0xFFFFFFFFFFFFFFFF            # a READ item's length meaning "to the end of the block"
cdef object _TO_END_OBJ = TO_END
cdef object _ZERO = 0
DEFAULT_MAX_ITEMS = 65536
DEFAULT_MAX_PAYLOAD = 64 << 20

cdef const char* _MAGIC = b"FBF1"
cdef enum:
    _VERSION = 1
    _KIND_WRITE = 1
    _KIND_READ = 2
    _KIND_DATA = 3
    _KIND_ACK = 4
    _ITEM_MAX = FRAME_ITEM_FIXED + FRAME_MAX_HANDLE + 1   # 280: the longest item (handle padded to 256)
    _INLINE_ITEMS = 4                                      # items encode() plans on the stack

cdef char _EMPTY[1]                    # the "payload" of READ and ACK frames


cdef inline bint _has_payload(int kind) noexcept nogil:
    return kind == _KIND_WRITE or kind == _KIND_DATA


cdef inline uint64_t _pad8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef str _kind_name(int kind):
    return {1: "WRITE", 2: "READ", 3: "DATA", 4: "ACK"}.get(kind, str(kind))


# -- checked reads (py-pgproto frb_read style) ---------------------------------
#
# A _Reader is a window [buf, buf+len) with a cursor.  Every field is read through
# _take(), which raises InvalidFrame (V1InvalidFrame for a worker-protocol v1
# window) instead of reading past the window.

cdef struct _Reader:
    const char* buf          # first byte of the window
    Py_ssize_t len           # bytes in the window
    Py_ssize_t pos           # next byte to read
    Py_ssize_t base          # offset of buf within the frame, for messages
    const char* what         # what the window holds, for messages
    bint v1                  # a worker-protocol v1 window: a short read is V1InvalidFrame


cdef int _short_read(_Reader* r, Py_ssize_t n) except -1:
    msg = (f"{(<bytes>r.what).decode()} needs {n} more bytes at offset {r.base + r.pos}, "
           f"only {r.len - r.pos} left")
    if r.v1:
        raise V1InvalidFrame(f"truncated v1 frame: {msg}")
    raise InvalidFrame(f"truncated frame: {msg}")


cdef inline const char* _take(_Reader* r, Py_ssize_t n) except NULL:
    cdef const char* p
    if n > r.len - r.pos:
        _short_read(r, n)
        return NULL
    p = r.buf + r.pos
    r.pos += n
    FABRIC_ASSERT(r.pos <= r.len)
    return p


cdef inline int _read_u8(_Reader* r, uint8_t* out) except -1:
    out[0] = fabric_load_u8(_take(r, 1))
    return 0


cdef inline int _read_u16(_Reader* r, uint16_t* out) except -1:
    out[0] = fabric_load_le16(_take(r, 2))
    return 0


cdef inline int _read_u32(_Reader* r, uint32_t* out) except -1:
    out[0] = fabric_load_le32(_take(r, 4))
    return 0


cdef inline int _read_u64(_Reader* r, uint64_t* out) except -1:
    out[0] = fabric_load_le64(_take(r, 8))
    return 0


cdef struct _Entry:          # one item of the table, as read
    uint16_t hlen
    uint16_t status
    uint32_t reserved
    uint64_t offset
    uint64_t length


cdef inline int _read_entry(_Reader* r, _Entry* e) except -1:
    """The fixed 24 bytes of an item; the (padded) handle that follows is the caller's."""
    _read_u16(r, &e.hlen)
    _read_u16(r, &e.status)
    _read_u32(r, &e.reserved)
    _read_u64(r, &e.offset)
    _read_u64(r, &e.length)
    return 0


cdef inline void _table_reader(_Reader* r, const char* table, uint32_t items_length) noexcept:
    r.buf = table
    r.len = items_length
    r.pos = 0
    r.base = FRAME_HEADER_SIZE
    r.what = b"the item table"
    r.v1 = False


# -- validation ----------------------------------------------------------------

cdef inline uint64_t _clamp_items(uint64_t max_items) noexcept nogil:
    # item_count is a u32: a larger limit means "no limit" and must not overflow x280
    return max_items if max_items < UINT32_MAX else UINT32_MAX


cdef int _check_header(const char* p, Py_ssize_t avail, uint64_t max_items, uint64_t max_payload,
                       FrameHeader* h) except -1:
    """Validate the 24-byte header at p (avail bytes readable) and fill h.

    Only the header is looked at: the streaming decoder calls this as soon as
    24 bytes have arrived, before it buffers (or allocates for) the rest.
    """
    cdef _Reader r
    cdef uint8_t version
    cdef uint64_t max_table
    if avail < FRAME_HEADER_SIZE:
        raise InvalidFrame(f"truncated frame: {avail} bytes, the header alone is {FRAME_HEADER_SIZE}")
    r.buf = p
    r.len = FRAME_HEADER_SIZE
    r.pos = 0
    r.base = 0
    r.what = b"the header"
    r.v1 = False
    if memcmp(_take(&r, 4), _MAGIC, 4) != 0:
        raise InvalidFrame(f"bad frame magic {(<bytes>p[:4])!r}, expected {MAGIC!r}")
    _read_u8(&r, &version)
    if version != _VERSION:
        raise InvalidFrame(f"unsupported frame version {version} (this codec speaks {_VERSION})")
    _read_u8(&r, &h.kind)
    if h.kind < _KIND_WRITE or h.kind > _KIND_ACK:
        raise InvalidFrame(f"unknown frame kind {h.kind}")
    _read_u16(&r, &h.flags)
    if h.flags != 0:
        raise InvalidFrame(f"unknown frame flags 0x{h.flags:04x} (version 1 defines none)")
    _read_u32(&r, &h.item_count)
    _read_u32(&r, &h.items_length)
    _read_u64(&r, &h.payload_length)

    max_items = _clamp_items(max_items)
    if h.item_count > max_items:
        raise TooLarge(f"frame has {h.item_count} items, the limit is {max_items}")
    max_table = max_items * _ITEM_MAX
    if h.items_length > max_table:
        raise TooLarge(f"frame item table is {h.items_length} bytes, the limit is {max_table}")
    if h.payload_length > max_payload:
        raise TooLarge(f"frame payload is {h.payload_length} bytes, the limit is {max_payload}")
    if h.payload_length > UINT64_MAX - FRAME_HEADER_SIZE - h.items_length:
        raise TooLarge(f"frame length overflows 64 bits (payload_length {h.payload_length})")

    # what the header alone says about the table and payload
    if h.items_length % 8 != 0:
        raise InvalidFrame(f"items_length {h.items_length} is not a multiple of 8")
    if <uint64_t>h.item_count * FRAME_ITEM_FIXED > h.items_length:
        raise InvalidFrame(f"{h.item_count} items cannot fit in an item table of {h.items_length} bytes")
    if h.items_length > <uint64_t>h.item_count * _ITEM_MAX:
        raise InvalidFrame(f"item table of {h.items_length} bytes is longer than {h.item_count} items can be")
    if not _has_payload(h.kind) and h.payload_length != 0:
        raise InvalidFrame(f"{_kind_name(h.kind)} frames carry no payload, payload_length is {h.payload_length}")
    h.total = FRAME_HEADER_SIZE + <uint64_t>h.items_length + h.payload_length
    return 0


cdef int _check_items(const FrameHeader* h, const char* table) except -1:
    """Pass 1 over the item table: validate every item, allocate nothing."""
    cdef _Reader r
    cdef uint32_t i
    cdef uint16_t hlen, status
    cdef uint32_t reserved
    cdef uint64_t offset, length, padded, total = 0
    cdef const char* hp
    cdef uint64_t k
    cdef unsigned char acc
    cdef bint needs_handle = h.kind == _KIND_WRITE or h.kind == _KIND_READ
    cdef bint payload = _has_payload(h.kind)
    cdef _Entry e
    _table_reader(&r, table, h.items_length)
    for i in range(h.item_count):
        _read_entry(&r, &e)
        hlen, status, reserved, offset, length = e.hlen, e.status, e.reserved, e.offset, e.length
        if hlen > FRAME_MAX_HANDLE:
            raise InvalidFrame(f"item {i}: handle_len {hlen} exceeds {FRAME_MAX_HANDLE}")
        if hlen == 0 and needs_handle:
            raise InvalidFrame(f"item {i}: {_kind_name(h.kind)} items need a handle (handle_len is 0)")
        if reserved != 0:
            raise InvalidFrame(f"item {i}: reserved field is 0x{reserved:08x}, must be 0")
        padded = _pad8(hlen)
        hp = _take(&r, <Py_ssize_t>padded)
        acc = 0
        for k in range(hlen):
            acc |= <unsigned char>hp[k]
        if acc & 0x80:
            raise InvalidFrame(f"item {i}: handle is not ASCII")
        acc = 0
        for k in range(hlen, padded):
            acc |= <unsigned char>hp[k]
        if acc != 0:
            raise InvalidFrame(f"item {i}: non-zero padding after the handle")
        if payload:
            if h.kind == _KIND_DATA and status != 0 and length != 0:
                raise InvalidFrame(f"item {i}: a DATA item with status {status} must have length 0, not {length}")
            # payload_length <= max_payload, so checking each length against what is
            # left keeps the running sum from wrapping
            if length > h.payload_length - total:
                raise InvalidFrame(
                    f"item {i}: length {length} runs past the payload "
                    f"({h.payload_length - total} of {h.payload_length} bytes left)"
                )
            total += length
        if length > UINT64_MAX - offset and not (h.kind == _KIND_READ and length == UINT64_MAX):
            raise InvalidFrame(f"item {i}: offset {offset} + length {length} overflows 64 bits")
    if r.pos != r.len:
        raise InvalidFrame(f"item table has {r.len - r.pos} bytes after its {h.item_count} items")
    if payload and total != h.payload_length:
        raise InvalidFrame(f"item lengths sum to {total}, payload_length is {h.payload_length}")
    return 0


cdef int _build(Frame f, const FrameHeader* h, const char* table) except -1:
    """Pass 2 over a validated table: the items list and the payload offsets."""
    cdef _Reader r
    cdef Py_ssize_t i, n = h.item_count
    cdef uint64_t start = 0
    cdef const char* hp
    cdef list items = PyList_New(n)
    cdef object handle, item
    cdef _Entry e
    _table_reader(&r, table, h.items_length)
    if _has_payload(h.kind):
        if n + 1 <= FRAME_INLINE_STARTS:
            f._starts = f._inline
        else:
            f._starts = <uint64_t*>PyMem_Malloc((n + 1) * sizeof(uint64_t))
            if f._starts == NULL:
                raise MemoryError()
        f._starts[0] = 0
    for i in range(n):
        _read_entry(&r, &e)
        hp = _take(&r, <Py_ssize_t>_pad8(e.hlen))
        handle = PyUnicode_New(e.hlen, 127)
        if e.hlen:
            memcpy(PyUnicode_DATA(handle), hp, e.hlen)
        item = (handle, e.offset, e.length, e.status)
        Py_INCREF(item)
        PyList_SET_ITEM(items, i, item)
        if f._starts != NULL:
            start += e.length
            f._starts[i + 1] = start
    f.items = items
    f._nitems = n
    return 0


cdef int _check_whole(const char* p, Py_ssize_t length, uint64_t max_items, uint64_t max_payload,
                      FrameHeader* h) except -1:
    """Validate a buffer that must hold exactly one frame: header, length, item table."""
    _check_header(p, length, max_items, max_payload, h)
    if h.total != <uint64_t>length:
        if h.total > <uint64_t>length:
            raise InvalidFrame(f"truncated frame: {length} bytes, its header declares {h.total}")
        raise InvalidFrame(f"{<uint64_t>length - h.total} trailing bytes after a frame of {h.total}")
    _check_items(h, p + FRAME_HEADER_SIZE)
    return 0


cdef Frame _decode_obj(object obj, Py_ssize_t start, Py_ssize_t length, uint64_t max_items, uint64_t max_payload):
    """Decode the frame at obj[start:start+length] (length < 0: to the end), zero-copy."""
    cdef FrameHeader h
    cdef const char* p
    cdef Py_buffer pb
    cdef _FramePayload src
    cdef Frame f
    PyObject_GetBuffer(obj, &pb, PyBUF_SIMPLE)
    try:
        FABRIC_ASSERT(start <= pb.len)
        if length < 0:
            length = pb.len - start
        p = <const char*>pb.buf + start
        _check_whole(p, length, max_items, max_payload, &h)
        f = Frame.__new__(Frame)
        f.kind = h.kind
        _build(f, &h, p + FRAME_HEADER_SIZE)
        if _has_payload(h.kind):
            # hand the acquired buffer over to the lender, which releases it when
            # the frame and the last of its views are gone
            src = _FramePayload.__new__(_FramePayload)
            _move_buffer(&src._pybuf, &pb)
            src._holds = True
            src._p = p + FRAME_HEADER_SIZE + h.items_length
            src._n = <Py_ssize_t>h.payload_length
            f._payload = src
    finally:
        PyBuffer_Release(&pb)          # a no-op once handed over
    return f


@cython.final
@cython.freelist(8)
@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class _FramePayload:
    """The payload section of a decoded frame, lent read-only (internal)."""

    def __cinit__(self):
        self._holds = False
        self._p = _EMPTY
        self._n = 0

    def __init__(self, *args, **kwargs):
        raise TypeError("_FramePayload objects are made by decode()")

    def __dealloc__(self):
        if self._holds:
            self._holds = False
            PyBuffer_Release(&self._pybuf)

    def __getbuffer__(self, Py_buffer* view, int flags):
        # read-only whatever the source was: a view is for reading what the peer sent
        PyBuffer_FillInfo(view, self, <void*>self._p, self._n, 1, flags)


@cython.final
@cython.freelist(8)
@cython.auto_pickle(False)
cdef class Frame:
    """A decoded frame: its kind, its items and zero-copy views of their bytes.

    ``items`` is a list of ``(handle, offset, length, status)`` tuples in table
    order (``handle`` a ``str``).  ``data(i)`` is a read-only ``memoryview`` of
    item *i*'s bytes inside the buffer the frame was decoded from; that buffer
    stays pinned (a ``bytearray`` cannot be resized) while the frame or any of
    its views is alive.
    """

    def __cinit__(self):
        self._starts = NULL
        self._nitems = 0
        self.items = None
        self._payload = None

    def __init__(self, *args, **kwargs):
        raise TypeError("Frame objects are made by decode() and FrameDecoder.feed()")

    def __dealloc__(self):
        if self._starts != NULL and self._starts != self._inline:
            PyMem_Free(self._starts)
        self._starts = NULL

    def __len__(self):
        return self._nitems

    def __repr__(self):
        cdef Py_ssize_t n = 0 if self._payload is None else self._payload._n
        return f"<Frame {_kind_name(self.kind)} items={self._nitems} payload={n}>"

    def data(self, Py_ssize_t i):
        """Item *i*'s bytes, as a read-only memoryview into the decoded buffer (empty for READ/ACK)."""
        if i < 0:
            i += self._nitems
        if i < 0 or i >= self._nitems:
            raise IndexError(f"frame item {i} out of range ({self._nitems} items)")
        return self.payload_view(i)

    def payloads(self):
        """Every item's bytes as a list of ``bytes`` (one copy each), in item order.

        One call instead of a ``data(i)`` view and a ``bytes()`` copy per item.
        Empty ``bytes`` for READ/ACK items.  (A client that only wants a DATA
        reply's bytes can skip the Frame: :func:`decode_payloads`.)
        """
        cdef Py_ssize_t i
        cdef list out = PyList_New(self._nitems)
        cdef object b
        for i in range(self._nitems):
            if self._starts == NULL:
                b = b""
            else:
                b = PyBytes_FromStringAndSize(self._payload._p + self._starts[i],
                                              <Py_ssize_t>(self._starts[i + 1] - self._starts[i]))
            Py_INCREF(b)
            PyList_SET_ITEM(out, i, b)
        return out

    cdef object payload_view(self, Py_ssize_t i):
        if self._starts != NULL and self._nitems == 1:
            # the one item is the whole payload: a fresh view, no slicing (the client's hot path)
            return PyMemoryView_FromObject(self._payload)
        if self._base is None:
            self._base = PyMemoryView_FromObject(_NO_PAYLOAD if self._payload is None else self._payload)
        if self._starts == NULL:
            return self._base[0:0]
        return self._base[<Py_ssize_t>self._starts[i]:<Py_ssize_t>self._starts[i + 1]]


cdef _FramePayload _NO_PAYLOAD = _FramePayload.__new__(_FramePayload)


def decode(buf, *, uint64_t max_items=DEFAULT_MAX_ITEMS, uint64_t max_payload=DEFAULT_MAX_PAYLOAD):
    """Decode one whole frame from *buf* (any contiguous buffer), without copying its payload.

    *buf* must hold exactly one frame.  Raises :class:`~fabric.errors.InvalidFrame`
    for a truncated, corrupt or hostile frame and :class:`~fabric.errors.TooLarge`
    when it declares more than *max_items* items or *max_payload* payload bytes;
    both before anything is allocated for the frame's contents.
    """
    return _decode_obj(buf, 0, -1, max_items, max_payload)


def decode_payloads(buf, *, uint64_t max_items=DEFAULT_MAX_ITEMS, uint64_t max_payload=DEFAULT_MAX_PAYLOAD):
    """Decode a DATA frame straight to its items' bytes: ``(payloads, statuses)``.

    ``payloads[i]`` is item *i*'s bytes (one copy each); ``statuses`` is ``None``
    when every item succeeded, else the list of every item's status (0 for the
    ones that did).  The client's read replies: no :class:`Frame` and no tuple per
    item.  Validates exactly as :func:`decode` does; any other kind of frame is
    :class:`~fabric.errors.InvalidFrame`.
    """
    cdef FrameHeader h
    cdef Py_buffer pb
    cdef _Reader r
    cdef const char* p
    cdef const char* pay
    cdef Py_ssize_t i, n = 0
    cdef _Entry e
    cdef list out
    cdef object b, statuses = None
    PyObject_GetBuffer(buf, &pb, PyBUF_SIMPLE)
    try:
        p = <const char*>pb.buf
        _check_whole(p, pb.len, max_items, max_payload, &h)
        if h.kind != _KIND_DATA:
            raise InvalidFrame(f"expected a DATA frame, got {_kind_name(h.kind)}")
        n = h.item_count
        _table_reader(&r, p + FRAME_HEADER_SIZE, h.items_length)
        pay = p + FRAME_HEADER_SIZE + h.items_length
        out = PyList_New(n)
        for i in range(n):
            _read_entry(&r, &e)
            _take(&r, <Py_ssize_t>_pad8(e.hlen))
            # _check_items proved the lengths sum to the payload section's size
            b = PyBytes_FromStringAndSize(pay, <Py_ssize_t>e.length)
            pay += e.length
            Py_INCREF(b)
            PyList_SET_ITEM(out, i, b)
            if e.status:
                if statuses is None:
                    statuses = [0] * n
                statuses[i] = e.status
    finally:
        PyBuffer_Release(&pb)
    return out, statuses


def frame_length(header, *, uint64_t max_items=DEFAULT_MAX_ITEMS, uint64_t max_payload=DEFAULT_MAX_PAYLOAD):
    """The total length of the frame whose header starts *header* (at least 24 bytes).

    The header is validated as :func:`decode` would (magic, version, kind, flags,
    limits, consistency of the three length fields), so a reader can size its
    buffer from the result without trusting the peer.
    """
    cdef Py_buffer pb
    cdef FrameHeader h
    PyObject_GetBuffer(header, &pb, PyBUF_SIMPLE)
    try:
        _check_header(<const char*>pb.buf, pb.len, max_items, max_payload, &h)
    finally:
        PyBuffer_Release(&pb)
    return h.total


# -- encoding ------------------------------------------------------------------

cdef struct _Item:
    PyObject* ref            # the handle object (str or bytes), a new reference
    const char* handle       # its ASCII bytes
    Py_ssize_t hlen
    uint16_t status
    uint64_t offset
    uint64_t length


cdef struct _Plan:
    int kind
    Py_ssize_t count
    Py_ssize_t nref          # items whose ref is held
    uint64_t items_length
    uint64_t payload_length
    uint64_t total
    _Item* items
    _Item small[_INLINE_ITEMS]


cdef inline uint64_t _u64(object v, Py_ssize_t i, str what) except? 0xFFFFFFFFFFFFFFFF:
    try:
        if not PyLong_Check(v):
            v = PyNumber_Index(v)      # ints and int-likes (numpy integers); never floats
        return v
    except (OverflowError, TypeError):
        raise ValueError(f"item {i}: {what} must be an int in [0, 2**64), got {v!r}") from None


cdef inline object _seq_item(object seq, Py_ssize_t i, Py_ssize_t n):
    """seq[i] of a list or tuple of n elements, a new reference; a list that changed size raises."""
    if PyTuple_CheckExact(seq):
        return <object>PyTuple_GET_ITEM(seq, i)
    if PyList_GET_SIZE(seq) != n:
        raise RuntimeError("the sequence changed size during encoding")
    return <object>PyList_GET_ITEM(seq, i)


cdef inline object _as_seq(object seq):
    return seq if PyList_CheckExact(seq) or PyTuple_CheckExact(seq) else tuple(seq)


cdef int _plan_item(_Plan* plan, Py_ssize_t i, object item) except -1:
    cdef object handle, offset, length, status
    if PyTuple_CheckExact(item) and PyTuple_GET_SIZE(item) == 4:
        return _plan_fields(plan, i, <object>PyTuple_GET_ITEM(item, 0), <object>PyTuple_GET_ITEM(item, 1),
                            <object>PyTuple_GET_ITEM(item, 2), <object>PyTuple_GET_ITEM(item, 3))
    try:
        handle, offset, length, status = item
    except (TypeError, ValueError):
        raise ValueError(f"item {i}: expected (handle, offset, length, status), got {item!r}") from None
    return _plan_fields(plan, i, handle, offset, length, status)


cdef int _plan_fields(_Plan* plan, Py_ssize_t i, object handle, object offset, object length,
                      object status) except -1:
    cdef _Item* it = &plan.items[i]
    cdef uint64_t st
    cdef Py_ssize_t k
    cdef unsigned char acc = 0
    if PyUnicode_Check(handle):
        if not PyUnicode_IS_COMPACT_ASCII(handle):
            try:
                handle = (<str>handle).encode("ascii")
            except UnicodeEncodeError:
                raise ValueError(f"item {i}: handle {handle!r} is not ASCII") from None
    if PyUnicode_Check(handle):
        it.handle = <const char*>PyUnicode_DATA(handle)
        it.hlen = PyUnicode_GET_LENGTH(handle)
    elif PyBytes_Check(handle):
        it.handle = PyBytes_AS_STRING(handle)
        it.hlen = PyBytes_GET_SIZE(handle)
        for k in range(it.hlen):
            acc |= <unsigned char>it.handle[k]
        if acc & 0x80:
            raise ValueError(f"item {i}: handle {handle!r} is not ASCII")
    else:
        raise TypeError(f"item {i}: handle must be str or bytes, not {type(handle).__name__}")
    # keep the handle alive (and its bytes where they are) until the frame is written
    Py_INCREF(handle)
    it.ref = <PyObject*>handle
    plan.nref += 1

    if it.hlen > FRAME_MAX_HANDLE:
        raise ValueError(f"item {i}: handle is {it.hlen} bytes, the limit is {FRAME_MAX_HANDLE}")
    if it.hlen == 0 and (plan.kind == _KIND_WRITE or plan.kind == _KIND_READ):
        raise ValueError(f"item {i}: {_kind_name(plan.kind)} items need a handle")
    it.offset = _u64(offset, i, "offset")
    it.length = _u64(length, i, "length")
    st = _u64(status, i, "status")
    if st > 0xFFFF:
        raise ValueError(f"item {i}: status {st} does not fit 16 bits")
    it.status = <uint16_t>st
    if it.length > UINT64_MAX - it.offset and not (plan.kind == _KIND_READ and it.length == UINT64_MAX):
        raise ValueError(f"item {i}: offset {it.offset} + length {it.length} overflows 64 bits")
    if _has_payload(plan.kind):
        if plan.kind == _KIND_DATA and it.status != 0 and it.length != 0:
            raise ValueError(f"item {i}: a DATA item with status {it.status} must have length 0")
        if it.length > UINT64_MAX - plan.payload_length:
            raise TooLarge(f"payload overflows 64 bits at item {i}")
        plan.payload_length += it.length
    plan.items_length += FRAME_ITEM_FIXED + _pad8(<uint64_t>it.hlen)
    return 0


cdef inline void _plan_clear(_Plan* plan, int kind) noexcept:
    """An empty plan: safe to _plan_release from here on."""
    plan.kind = kind
    plan.count = 0
    plan.nref = 0
    plan.items_length = 0
    plan.payload_length = 0
    plan.items = plan.small


cdef int _plan_items(_Plan* plan, Py_ssize_t n) except -1:
    """Room for n items: inline for a few, else on the heap (freed by _plan_release)."""
    if n > _INLINE_ITEMS:
        plan.items = <_Item*>PyMem_Malloc(n * sizeof(_Item))
        if plan.items == NULL:
            raise MemoryError()
    plan.count = n
    return 0


cdef int _plan_frame(_Plan* plan, int kind, object items) except -1:
    """Validate the items (a list or tuple) and size the frame; the caller must _plan_release(plan)."""
    cdef Py_ssize_t i, n = len(items)
    cdef object item
    _plan_clear(plan, kind)
    if kind < _KIND_WRITE or kind > _KIND_ACK:
        raise ValueError(f"unknown frame kind {kind}")
    if <uint64_t>n > UINT32_MAX:
        raise TooLarge(f"{n} items do not fit a frame (at most 2**32-1)")
    _plan_items(plan, n)
    for i in range(n):
        # _plan_item may run Python code (__index__), which may change a list under us
        item = _seq_item(items, i, n)
        _plan_item(plan, i, item)
    if plan.items_length > UINT32_MAX:
        raise TooLarge(f"item table of {plan.items_length} bytes does not fit a frame")
    if plan.payload_length > <uint64_t>PY_SSIZE_T_MAX - FRAME_HEADER_SIZE - plan.items_length:
        raise TooLarge(f"frame of {plan.payload_length} payload bytes is too large to build")
    plan.total = FRAME_HEADER_SIZE + plan.items_length + plan.payload_length
    return 0


cdef void _plan_release(_Plan* plan) noexcept:
    cdef Py_ssize_t i
    for i in range(plan.nref):
        Py_XDECREF(plan.items[i].ref)
    plan.nref = 0
    if plan.items != plan.small:
        PyMem_Free(plan.items)
    plan.items = NULL


cdef void _write_frame(const _Plan* plan, char* out) noexcept:
    """Write the header and the item table; the payload section is the caller's."""
    cdef Py_ssize_t i
    cdef const _Item* it
    cdef char* w = out + FRAME_HEADER_SIZE
    cdef uint64_t padded
    memcpy(out, _MAGIC, 4)
    fabric_store_u8(out + 4, _VERSION)
    fabric_store_u8(out + 5, <uint8_t>plan.kind)
    fabric_store_le16(out + 6, 0)
    fabric_store_le32(out + 8, <uint32_t>plan.count)
    fabric_store_le32(out + 12, <uint32_t>plan.items_length)
    fabric_store_le64(out + 16, plan.payload_length)
    for i in range(plan.count):
        it = &plan.items[i]
        padded = _pad8(<uint64_t>it.hlen)
        fabric_store_le16(w, <uint16_t>it.hlen)
        fabric_store_le16(w + 2, it.status)
        fabric_store_le32(w + 4, 0)
        fabric_store_le64(w + 8, it.offset)
        fabric_store_le64(w + 16, it.length)
        w += FRAME_ITEM_FIXED
        if it.hlen:
            memcpy(w, it.handle, it.hlen)
        if padded != <uint64_t>it.hlen:
            memset(w + it.hlen, 0, padded - it.hlen)
        w += padded
    FABRIC_ASSERT(w == out + FRAME_HEADER_SIZE + plan.items_length)


def encode(int kind, items, payloads=None):
    """Build a frame: *items* are ``(handle, offset, length, status)``; returns ``bytes``.

    For WRITE and DATA, ``payloads[i]`` (any contiguous buffer) must hold exactly
    ``items[i][2]`` bytes; each is copied once, straight into the frame.  Payloads
    may be omitted when every length is 0.  READ and ACK frames take no payloads.
    Handles are ASCII ``str`` or ``bytes`` of at most 255 bytes (may be empty
    only in DATA and ACK replies).  Invalid arguments raise ``ValueError``/``TypeError``.
    """
    cdef _Plan plan
    cdef object titems = _as_seq(items)
    cdef object tpay = None
    cdef Py_ssize_t npay = 0
    cdef Py_ssize_t i
    cdef Py_buffer pb
    cdef char* w
    cdef bytes out
    cdef object pay
    try:
        _plan_frame(&plan, kind, titems)
        if payloads is not None:
            tpay = _as_seq(payloads)
            npay = len(tpay)
        if _has_payload(kind):
            if tpay is None:
                if plan.payload_length != 0:
                    raise ValueError(f"{_kind_name(kind)} frames need payloads (one per item)")
            elif npay != plan.count:
                raise ValueError(f"{npay} payloads for {plan.count} items")
        elif tpay is not None and npay != 0:
            raise ValueError(f"{_kind_name(kind)} frames carry no payload")
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>plan.total)
        w = PyBytes_AS_STRING(out)
        _write_frame(&plan, w)
        if tpay is not None and _has_payload(kind):
            w += FRAME_HEADER_SIZE + plan.items_length
            for i in range(plan.count):
                pay = _seq_item(tpay, i, npay)
                PyObject_GetBuffer(pay, &pb, PyBUF_SIMPLE)
                if <uint64_t>pb.len != plan.items[i].length:
                    PyBuffer_Release(&pb)
                    raise ValueError(f"payload {i} has {pb.len} bytes, its item says {plan.items[i].length}")
                memcpy(w, pb.buf, pb.len)
                PyBuffer_Release(&pb)
                w += plan.items[i].length
    finally:
        _plan_release(&plan)
    return out


def encode_head(int kind, items):
    """The header and item table of a frame, without its payload section; returns ``bytes``.

    ``encode_head(kind, items) + b"".join(payloads) == encode(kind, items, payloads)``:
    for a sender that writes each payload straight from where it lies (the data
    plane's scatter-gather send), so the bytes are never copied into a frame.
    """
    cdef _Plan plan
    cdef bytes out
    try:
        _plan_frame(&plan, kind, _as_seq(items))
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(FRAME_HEADER_SIZE + plan.items_length))
        _write_frame(&plan, PyBytes_AS_STRING(out))
    finally:
        _plan_release(&plan)
    return out


def encode_reserve(int kind, items, *, bint zero=True, bint views=True):
    """Allocate a whole frame once; return it with one writable view per item's payload slot.

    The caller fills ``slots[i]`` (``items[i][2]`` bytes) in place, for example
    with ``arena.read_into(..., slots[i])``: the only copy on the hot path.  With
    ``zero=True`` (the default) the payload section starts zeroed, so a slot left
    unfilled cannot leak stale heap bytes to the peer; pass ``zero=False`` only
    when every slot is certain to be filled.  For READ and ACK every slot is empty.

    With ``views=False`` no views are made (``slots`` is empty): the payload
    section is the frame's last ``sum(lengths)`` bytes, items back to back, and the
    caller fills it by offset (``arena.gather_into``), saving an object per item.
    """
    cdef _Plan plan
    cdef object titems = _as_seq(items)
    cdef Py_ssize_t i, start
    cdef char* w
    cdef bytearray out
    cdef list slots
    cdef object base
    try:
        _plan_frame(&plan, kind, titems)
        out = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>plan.total)
        w = PyByteArray_AS_STRING(out)
        _write_frame(&plan, w)
        if zero and plan.payload_length:
            memset(w + FRAME_HEADER_SIZE + plan.items_length, 0, plan.payload_length)
        slots = []
        if not views:
            return out, slots
        base = PyMemoryView_FromObject(out)
        start = <Py_ssize_t>(FRAME_HEADER_SIZE + plan.items_length)
        for i in range(plan.count):
            if _has_payload(kind):
                slots.append(base[start:start + <Py_ssize_t>plan.items[i].length])
                start += <Py_ssize_t>plan.items[i].length
            else:
                slots.append(base[start:start])
    finally:
        _plan_release(&plan)
    return out, slots


# -- the batch-read hot path ---------------------------------------------------
#
# A 100-item batch read spent more time in Python loops (one tuple, one dict probe
# and one list append per item, on both ends) than in the codec.  encode_reads (the
# client's request) and read_reply_reserve (the allocator's reply, filled by
# Arena.gather_reads) do the per-item work of the common case in C and leave
# everything unusual to the callers' checked paths, which report each failure
# precisely; decode_payloads, above, reads the reply.


def encode_reads(items, dict parsed, tuple buffer_types):
    """The client's batch read, encoded in one call: ``(node, READ frame)``, or ``None``.

    *items* (a list or tuple) are ``(handle, offset, length)`` with ``length``
    ``None`` for "to the end"; a handle is a token ``str`` or an instance of one of
    *buffer_types* (whose ``.handle`` is the token).  *parsed* maps tokens already
    parsed to their parts, whose first field is the node.  Returns ``None``, having
    built nothing, when the batch is not the common case -- no items, an item of
    another shape, a token not in *parsed*, or items on more than one node -- so
    the caller's general path (which validates and reports) takes over.  Invalid
    offsets or lengths raise ``ValueError`` as :func:`encode` does.
    """
    cdef Py_ssize_t i, n
    cdef object seq, item, hd, token, length, node = None, part_node
    cdef PyObject* parts
    cdef _Plan plan
    cdef bytes out
    if not (PyList_CheckExact(items) or PyTuple_CheckExact(items)):
        return None
    seq = items
    n = len(seq)
    if n == 0 or <uint64_t>n > UINT32_MAX:
        return None
    _plan_clear(&plan, _KIND_READ)
    try:
        _plan_items(&plan, n)
        for i in range(n):
            item = _seq_item(seq, i, n)
            if not PyTuple_CheckExact(item) or PyTuple_GET_SIZE(item) != 3:
                return None
            hd = <object>PyTuple_GET_ITEM(item, 0)
            if PyUnicode_CheckExact(hd):
                token = hd
            elif isinstance(hd, buffer_types):
                token = hd.handle
                if not PyUnicode_CheckExact(token):
                    return None
            else:
                return None
            parts = PyDict_GetItem(parsed, token)
            if parts == NULL or not PyTuple_Check(<object>parts) or PyTuple_GET_SIZE(<object>parts) < 1:
                return None
            # parts is a NamedTuple: the C accessor, not its Python-level __getitem__
            part_node = <object>PyTuple_GET_ITEM(<object>parts, 0)
            if node is None:
                node = part_node
            elif part_node is not node and part_node != node:
                return None
            length = <object>PyTuple_GET_ITEM(item, 2)
            # no (token, offset, length, status) tuple per item: each one is a GC allocation
            _plan_fields(&plan, i, token, <object>PyTuple_GET_ITEM(item, 1),
                         _TO_END_OBJ if length is None else length, _ZERO)
        if plan.items_length > UINT32_MAX:
            raise TooLarge(f"item table of {plan.items_length} bytes does not fit a frame")
        plan.total = FRAME_HEADER_SIZE + plan.items_length
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>plan.total)
        _write_frame(&plan, PyBytes_AS_STRING(out))
    finally:
        _plan_release(&plan)
    return node, out


def read_reply_reserve(Frame request, uint64_t max_payload):
    """The allocator's reply to a READ frame, allocated once: ``(frame, payload_start)``, or ``None``.

    The reply is a DATA frame with one item per request item (empty handle, the
    request's offset and length, status 0) and its payload section left for the
    caller to fill with every item's bytes back to back (``Arena.gather_reads``).
    Returns ``None`` when an item reads "to the end" (its length is not known
    here) or when the reply would exceed *max_payload* bytes.
    """
    cdef Py_ssize_t i, n = request._nitems
    cdef object item
    cdef _Item* it
    cdef _Plan plan
    cdef bytearray out
    cdef uint64_t budget       # payload bytes that fit beside the header and the item table
    if request.kind != _KIND_READ or n == 0:
        return None
    if max_payload > <uint64_t>PY_SSIZE_T_MAX:
        max_payload = <uint64_t>PY_SSIZE_T_MAX
    if max_payload < FRAME_HEADER_SIZE or <uint64_t>n * FRAME_ITEM_FIXED > max_payload - FRAME_HEADER_SIZE:
        return None
    budget = max_payload - FRAME_HEADER_SIZE - <uint64_t>n * FRAME_ITEM_FIXED
    _plan_clear(&plan, _KIND_DATA)
    plan.items_length = <uint64_t>n * FRAME_ITEM_FIXED
    try:
        _plan_items(&plan, n)
        for i in range(n):
            item = <object>PyList_GET_ITEM(request.items, i)
            it = &plan.items[i]
            it.ref = NULL
            it.handle = _EMPTY
            it.hlen = 0
            it.status = 0
            it.offset = <object>PyTuple_GET_ITEM(item, 1)
            it.length = <object>PyTuple_GET_ITEM(item, 2)
            if it.length == UINT64_MAX or it.length > budget - plan.payload_length:
                return None  # "to the end", or too large (tested so that no sum can wrap)
            plan.payload_length += it.length
        plan.total = FRAME_HEADER_SIZE + plan.items_length + plan.payload_length
        out = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>plan.total)
        _write_frame(&plan, PyByteArray_AS_STRING(out))
    finally:
        _plan_release(&plan)
    return out, <Py_ssize_t>(FRAME_HEADER_SIZE + plan.items_length)


# -- streaming -----------------------------------------------------------------

@cython.final
@cython.auto_pickle(False)
cdef class FrameDecoder:
    """Reassemble frames from a byte stream fed in chunks of any size.

    ``feed(chunk)`` returns the frames the chunk completed (possibly none,
    possibly several).  A frame that arrives whole inside a ``bytes`` chunk is
    decoded in place (its views point into that chunk); a frame split across
    chunks, or one inside a mutable chunk, is copied once into a buffer of its
    own.  A hostile header is rejected as soon as its 24 bytes arrive, before
    anything is buffered for the rest.  After an error the stream's framing is
    lost and every later ``feed`` raises: start a new decoder (and connection).

    >>> dec = FrameDecoder()
    >>> frame = encode(KIND_READ, [("h", 0, 10, 0)])
    >>> dec.feed(frame[:7]), dec.pending()
    ([], 7)
    >>> [f.items for f in dec.feed(frame[7:])]
    [[('h', 0, 10, 0)]]
    """

    def __cinit__(self):
        self._hdr_have = 0
        self._partial = None
        self._partial_p = NULL
        self._need = 0
        self._have = 0
        self._failed = False

    def __init__(self, *, uint64_t max_items=DEFAULT_MAX_ITEMS, uint64_t max_payload=DEFAULT_MAX_PAYLOAD):
        self._max_items = max_items
        self._max_payload = max_payload

    def pending(self):
        """Bytes buffered of a frame that has not arrived whole yet."""
        return self._hdr_have + self._have

    cdef int _start_partial(self, const char* header, Py_ssize_t total) except -1:
        # total comes from a validated header: bounded by the decoder's limits
        self._partial = PyBytes_FromStringAndSize(NULL, total)
        self._partial_p = PyBytes_AS_STRING(self._partial)
        self._need = total
        memcpy(self._partial_p, header, FRAME_HEADER_SIZE)
        self._have = FRAME_HEADER_SIZE
        return 0

    cdef int _complete(self, list out) except -1:
        cdef object whole = self._partial
        self._partial = None
        self._partial_p = NULL
        self._need = 0
        self._have = 0
        out.append(_decode_obj(whole, 0, -1, self._max_items, self._max_payload))
        return 0

    def feed(self, data):
        """Add *data* to the stream; return the frames it completed, in order."""
        cdef Py_buffer pb
        cdef const char* p
        cdef Py_ssize_t n, pos = 0, k
        cdef FrameHeader h
        cdef list out = []
        cdef bint in_place = PyBytes_CheckExact(data)
        if self._failed:
            raise InvalidFrame("this FrameDecoder already rejected its stream; its framing is lost")
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        try:
            p = <const char*>pb.buf
            n = pb.len
            while pos < n:
                if self._partial is not None:
                    # filling a frame whose header has been validated
                    k = min(self._need - self._have, n - pos)
                    memcpy(self._partial_p + self._have, p + pos, k)
                    self._have += k
                    pos += k
                    if self._have == self._need:
                        self._complete(out)
                elif self._hdr_have > 0 or n - pos < FRAME_HEADER_SIZE:
                    # a header split across chunks: gather its 24 bytes first
                    k = min(FRAME_HEADER_SIZE - self._hdr_have, n - pos)
                    memcpy(self._hdr + self._hdr_have, p + pos, k)
                    self._hdr_have += k
                    pos += k
                    if self._hdr_have == FRAME_HEADER_SIZE:
                        _check_header(<const char*>self._hdr, FRAME_HEADER_SIZE,
                                      self._max_items, self._max_payload, &h)
                        self._hdr_have = 0
                        if h.total > <uint64_t>PY_SSIZE_T_MAX:
                            raise TooLarge(f"frame of {h.total} bytes cannot be buffered")
                        self._start_partial(<const char*>self._hdr, <Py_ssize_t>h.total)
                        if self._have == self._need:
                            self._complete(out)
                else:
                    # at a frame boundary with a whole header in this chunk
                    _check_header(p + pos, n - pos, self._max_items, self._max_payload, &h)
                    if h.total <= <uint64_t>(n - pos):
                        k = <Py_ssize_t>h.total
                        if in_place:
                            out.append(_decode_obj(data, pos, k, self._max_items, self._max_payload))
                        else:
                            out.append(_decode_obj(PyBytes_FromStringAndSize(p + pos, k), 0, -1,
                                                   self._max_items, self._max_payload))
                        pos += k
                    else:
                        if h.total > <uint64_t>PY_SSIZE_T_MAX:
                            raise TooLarge(f"frame of {h.total} bytes cannot be buffered")
                        self._start_partial(p + pos, <Py_ssize_t>h.total)
                        pos += FRAME_HEADER_SIZE
        except BaseException:
            self._failed = True
            self._partial = None
            self._partial_p = NULL
            self._hdr_have = self._need = self._have = 0
            raise
        finally:
            PyBuffer_Release(&pb)
        return out


# ==============================================================================
# Worker socket protocol version 1
# ==============================================================================
#
# The controller <-> warm worker protocol of the spawner (seed "Worker socket
# protocol version 1"; docs/protocol.md, section "Worker protocol v1").  Every
# integer is little-endian; a message and a response have the same 17-byte
# header::
#
#     type u8 | id u64 | payload_length u64 | payload
#
# A payload's own fields (a version, a string and a blob, a job id and a blob, an
# exit code and a blob) are parsed apart from the header by the v1_parse_*
# functions, each through the same checked reads as the FBF1 codec: a length
# prefix is compared with what is left before anything is sliced, and the
# header's payload_length with the caller's maximum before anything is
# allocated.  Strings and blobs are ``u64 length | bytes``.

V1_VERSION = 1
V1_HEADER_SIZE = 17
V1_MSG_VERSION = 0x01
V1_MSG_CORE = 0x02
V1_MSG_JOB = 0x03
V1_OK = 0x01
V1_ERROR = 0xFF
V1_DEFAULT_MAX_PAYLOAD = 1 << 30        # a compute core .so or a job's data, whichever is larger


class V1InvalidFrame(InvalidFrame, ValueError, register=False):
    """Raised when a v1 frame or payload is truncated, has an unknown type or trailing bytes.

    An :class:`~fabric.errors.InvalidFrame` (code 400) that is also a ``ValueError``,
    so a worker or controller loop can catch either.
    """


class V1TooLarge(TooLarge, ValueError, register=False):
    """Raised when a v1 header declares a payload above the caller's maximum (code 413; a ValueError)."""

cdef enum:
    _V1_HEADER = V1_FRAME_HEADER_SIZE
    _V1_KIND_VERSION = 0x01             # also V1_OK: message and response types share the byte
    _V1_KIND_CORE = 0x02
    _V1_KIND_JOB = 0x03
    _V1_KIND_ERROR = 0xFF
    _V1_JOB_HEADER = 33                 # header + job id u64 + blob length u64
    _V1_RESULT_HEADER = 29              # header + exit code i32 + blob length u64


cdef inline bint _v1_known_kind(uint64_t kind) noexcept nogil:
    return (kind >= _V1_KIND_VERSION and kind <= _V1_KIND_JOB) or kind == _V1_KIND_ERROR


cdef str _v1_kind_name(uint64_t kind):
    return {1: "VERSION/OK", 2: "CORE", 3: "JOB", 0xFF: "ERROR"}.get(kind, f"0x{kind:02x}")


cdef int _v1_check_kind_byte(uint8_t kind) except -1:
    if not _v1_known_kind(kind):
        raise V1InvalidFrame(f"unknown v1 message type 0x{kind:02x} (known: 0x01, 0x02, 0x03, 0xff)")
    return 0


cdef int _v1_check_kind(object kind) except -1:
    if not (0 <= kind <= 0xFF) or not _v1_known_kind(<uint64_t>kind):
        raise V1InvalidFrame(f"unknown v1 message type {kind!r} (known: 0x01, 0x02, 0x03, 0xff)")
    return 0


cdef inline void _v1_store_header(char* p, uint8_t kind, uint64_t msg_id, uint64_t length) noexcept nogil:
    fabric_store_u8(p, kind)
    fabric_store_le64(p + 1, msg_id)
    fabric_store_le64(p + 9, length)


cdef int _v1_read_header(const char* p, Py_ssize_t avail, uint64_t max_payload,
                         uint8_t* kind, uint64_t* msg_id, uint64_t* length) except -1:
    """Validate the 17-byte header at p: a known type, payload_length within max_payload."""
    cdef _Reader r
    r.buf = p
    r.len = avail if avail < _V1_HEADER else _V1_HEADER
    r.pos = 0
    r.base = 0
    r.what = b"the v1 header"
    r.v1 = True
    _read_u8(&r, kind)
    _v1_check_kind_byte(kind[0])
    _read_u64(&r, msg_id)
    _read_u64(&r, length)
    if length[0] > max_payload:
        raise V1TooLarge(f"v1 payload of {length[0]} bytes, the limit is {max_payload}")
    if length[0] > <uint64_t>(PY_SSIZE_T_MAX - _V1_HEADER):
        raise V1TooLarge(f"v1 payload of {length[0]} bytes cannot be buffered")
    return 0


cdef bytes _v1_alloc(uint8_t kind, uint64_t msg_id, Py_ssize_t payload_length, char** out):
    """A new frame of header + payload_length bytes, header filled; *out = its first byte."""
    cdef bytes b = PyBytes_FromStringAndSize(NULL, _V1_HEADER + payload_length)
    out[0] = PyBytes_AS_STRING(b)
    _v1_store_header(out[0], kind, msg_id, <uint64_t>payload_length)
    return b


@cython.final
@cython.freelist(8)
@cython.auto_pickle(False)
cdef class V1Frame:
    """One v1 message or response: its type, its id and a read-only view of its payload.

    The payload view points into the buffer the frame was parsed from (no copy).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("V1Frame objects are made by v1_parse() and V1Decoder.feed()")

    def __repr__(self):
        return f"<V1Frame {_v1_kind_name(self.kind)} id={self.msg_id} payload={len(self.payload)}>"


cdef V1Frame _v1_make(int kind, uint64_t msg_id, object payload):
    cdef V1Frame f = V1Frame.__new__(V1Frame)
    f.kind = kind
    f.msg_id = msg_id
    f.payload = payload
    return f


cdef object _ro_view(object obj):
    """A read-only, flat byte memoryview of obj."""
    cdef object m = PyMemoryView_FromObject(obj)
    if m.ndim != 1 or m.format != "B" or m.itemsize != 1:
        m = m.cast("B")
    if not m.readonly:
        m = m.toreadonly()
    return m


def v1_frame(kind, msg_id, payload=b""):
    """One v1 frame: ``type u8 | id u64 | payload_length u64 | payload`` (one copy of *payload*).

    >>> v1_frame(V1_MSG_VERSION, 7, b"\\x01\\x00\\x00\\x00").hex()
    '010700000000000000040000000000000001000000'
    """
    cdef Py_buffer pb
    cdef char* p
    cdef bytes out
    cdef uint64_t mid = msg_id
    _v1_check_kind(kind)
    PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
    try:
        out = _v1_alloc(<uint8_t>kind, mid, pb.len, &p)
        if pb.len:
            memcpy(p + _V1_HEADER, pb.buf, pb.len)
    finally:
        PyBuffer_Release(&pb)
    return out


def v1_version(msg_id, uint32_t version=1):
    """Message 0x01, version exchange: the controller's protocol version (u32)."""
    cdef char* p
    cdef bytes out = _v1_alloc(_V1_KIND_VERSION, <uint64_t>msg_id, 4, &p)
    fabric_store_le32(p + _V1_HEADER, version)
    return out


def v1_core(msg_id, str name, library):
    """Message 0x02, new compute core: ``name`` (string) then the ``.so`` file (blob)."""
    cdef bytes n = name.encode("utf-8")
    cdef Py_buffer pb
    cdef char* p
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(n)
    cdef bytes out
    cdef uint64_t mid = msg_id
    PyObject_GetBuffer(library, &pb, PyBUF_SIMPLE)
    try:
        out = _v1_alloc(_V1_KIND_CORE, mid, 16 + nl + pb.len, &p)
        p += _V1_HEADER
        fabric_store_le64(p, <uint64_t>nl)
        memcpy(p + 8, PyBytes_AS_STRING(n), nl)
        fabric_store_le64(p + 8 + nl, <uint64_t>pb.len)
        if pb.len:
            memcpy(p + 16 + nl, pb.buf, pb.len)
    finally:
        PyBuffer_Release(&pb)
    return out


def v1_job_header(msg_id, job_id, size):
    """The 33 bytes of a job message before its data (for ``Producer.push_parts``)."""
    cdef char* p
    cdef uint64_t sz = size
    cdef uint64_t mid = msg_id
    cdef uint64_t jid = job_id
    if sz > UINT64_MAX - 16:
        raise V1TooLarge(f"job data of {sz} bytes overflows the payload length")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _V1_JOB_HEADER)
    p = PyBytes_AS_STRING(out)
    _v1_store_header(p, _V1_KIND_JOB, mid, 16 + sz)
    fabric_store_le64(p + _V1_HEADER, jid)
    fabric_store_le64(p + _V1_HEADER + 8, sz)
    return out


def v1_job(msg_id, job_id, data):
    """Message 0x03, new job: the job id (u64) then its input data (blob)."""
    cdef Py_buffer pb
    cdef char* p
    cdef bytes out
    cdef uint64_t mid = msg_id
    cdef uint64_t jid = job_id
    PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
    try:
        out = _v1_alloc(_V1_KIND_JOB, mid, 16 + pb.len, &p)
        fabric_store_le64(p + _V1_HEADER, jid)
        fabric_store_le64(p + _V1_HEADER + 8, <uint64_t>pb.len)
        if pb.len:
            memcpy(p + _V1_JOB_HEADER, pb.buf, pb.len)
    finally:
        PyBuffer_Release(&pb)
    return out


def v1_ok(msg_id, payload=b""):
    """Response 0x01 with *payload* (empty for a loaded core; one byte for a version reply)."""
    return v1_frame(_V1_KIND_VERSION, msg_id, payload)


def v1_error(msg_id, str message):
    """Response 0xFF: the whole payload is the UTF-8 error message."""
    return v1_frame(_V1_KIND_ERROR, msg_id, message.encode("utf-8"))


def v1_job_result_header(msg_id, int exit_code, size):
    """The 29 bytes of a job's response before its output (for ``push_parts``/``sendmsg``)."""
    cdef char* p
    cdef uint64_t sz = size
    cdef uint64_t mid = msg_id
    if sz > UINT64_MAX - 12:
        raise V1TooLarge(f"job output of {sz} bytes overflows the payload length")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _V1_RESULT_HEADER)
    p = PyBytes_AS_STRING(out)
    _v1_store_header(p, _V1_KIND_VERSION, mid, 12 + sz)
    fabric_store_le32(p + _V1_HEADER, <uint32_t>exit_code)
    fabric_store_le64(p + _V1_HEADER + 4, sz)
    return out


def v1_job_result(msg_id, int exit_code, out):
    """Response 0x01 to a job: the core's exit code (i32) then its output data (blob)."""
    cdef Py_buffer pb
    cdef char* p
    cdef bytes res
    cdef uint64_t mid = msg_id
    PyObject_GetBuffer(out, &pb, PyBUF_SIMPLE)
    try:
        res = _v1_alloc(_V1_KIND_VERSION, mid, 12 + pb.len, &p)
        fabric_store_le32(p + _V1_HEADER, <uint32_t>exit_code)
        fabric_store_le64(p + _V1_HEADER + 4, <uint64_t>pb.len)
        if pb.len:
            memcpy(p + _V1_RESULT_HEADER, pb.buf, pb.len)
    finally:
        PyBuffer_Release(&pb)
    return res


def v1_parse(frame, *, uint64_t max_payload=V1_DEFAULT_MAX_PAYLOAD):
    """Parse exactly one whole v1 frame from *frame* (any contiguous buffer), zero-copy.

    Raises :class:`~fabric.errors.InvalidFrame` for a truncated frame, an unknown
    type or trailing bytes, and :class:`~fabric.errors.TooLarge` when the header
    declares more than *max_payload* payload bytes.
    """
    cdef Py_buffer pb
    cdef uint8_t kind
    cdef uint64_t mid, length
    PyObject_GetBuffer(frame, &pb, PyBUF_SIMPLE)
    try:
        if pb.len < _V1_HEADER:
            raise V1InvalidFrame(f"truncated v1 frame: {pb.len} bytes, the header alone is {_V1_HEADER}")
        _v1_read_header(<const char*>pb.buf, pb.len, max_payload, &kind, &mid, &length)
        if length != <uint64_t>(pb.len - _V1_HEADER):
            if length > <uint64_t>(pb.len - _V1_HEADER):
                raise V1InvalidFrame(f"truncated v1 frame: {pb.len} bytes, its header declares {_V1_HEADER + length}")
            raise V1InvalidFrame(f"{<uint64_t>pb.len - _V1_HEADER - length} trailing bytes after a v1 frame "
                               f"of {_V1_HEADER + length}")
    finally:
        PyBuffer_Release(&pb)
    return _v1_make(kind, mid, _ro_view(frame)[_V1_HEADER:])


@cython.final
@cython.auto_pickle(False)
cdef class V1Decoder:
    """Resumable v1 parser for a byte stream: feed chunks of any size, get whole frames.

    A header's type is judged on its first byte and its length as soon as its
    17 bytes have arrived, before any buffer is allocated for the payload.  After an error the
    stream's framing is lost and every later ``feed`` raises.
    """

    def __init__(self, *, uint64_t max_payload=V1_DEFAULT_MAX_PAYLOAD):
        self._max_payload = max_payload
        self._hdr_have = 0
        self._partial = None
        self._partial_p = NULL
        self._need = self._have = 0
        self._failed = False

    def pending(self):
        """Bytes received of a frame not yet complete."""
        return self._hdr_have if self._partial is None else _V1_HEADER + self._have

    cdef int _start(self, const char* header, list out) except -1:
        cdef uint64_t length
        _v1_read_header(header, _V1_HEADER, self._max_payload, &self._kind, &self._msg_id, &length)
        if length == 0:
            out.append(_v1_make(self._kind, self._msg_id, _ro_view(b"")))
            return 0
        self._partial = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
        self._partial_p = PyBytes_AS_STRING(self._partial)
        self._need = <Py_ssize_t>length
        self._have = 0
        return 0

    def feed(self, data):
        """Append *data* to the stream; return the frames it completed (maybe none)."""
        cdef Py_buffer pb
        cdef const char* p
        cdef Py_ssize_t n, pos = 0, k
        cdef uint8_t kind
        cdef uint64_t mid, length
        cdef list out = []
        cdef bint in_place = PyBytes_CheckExact(data)
        cdef object view = None
        if self._failed:
            raise V1InvalidFrame("this V1Decoder already rejected its stream; its framing is lost")
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        try:
            p = <const char*>pb.buf
            n = pb.len
            while pos < n:
                if self._partial is not None:
                    k = min(self._need - self._have, n - pos)
                    memcpy(self._partial_p + self._have, p + pos, k)
                    self._have += k
                    pos += k
                    if self._have == self._need:
                        out.append(_v1_make(self._kind, self._msg_id, _ro_view(self._partial)))
                        self._partial = None
                        self._partial_p = NULL
                        self._need = self._have = 0
                elif self._hdr_have > 0 or n - pos < _V1_HEADER:
                    k = min(_V1_HEADER - self._hdr_have, n - pos)
                    memcpy(self._hdr + self._hdr_have, p + pos, k)
                    self._hdr_have += k
                    pos += k
                    # judged on its first byte: no need to wait for the rest of the header
                    _v1_check_kind_byte(self._hdr[0])
                    if self._hdr_have == _V1_HEADER:
                        self._hdr_have = 0
                        self._start(<const char*>self._hdr, out)
                else:
                    _v1_read_header(p + pos, n - pos, self._max_payload, &kind, &mid, &length)
                    if in_place and length <= <uint64_t>(n - pos - _V1_HEADER):
                        # the whole frame is in this (immutable) chunk: view it in place
                        if view is None:
                            view = _ro_view(data)
                        k = pos + _V1_HEADER
                        out.append(_v1_make(kind, mid, view[k:k + <Py_ssize_t>length]))
                        pos = k + <Py_ssize_t>length
                    else:
                        self._start(p + pos, out)
                        pos += _V1_HEADER
        except BaseException:
            self._failed = True
            self._partial = None
            self._partial_p = NULL
            self._hdr_have = self._need = self._have = 0
            raise
        finally:
            PyBuffer_Release(&pb)
        return out


# -- payload readers -------------------------------------------------------------

cdef int _v1_reader(_Reader* r, Py_buffer* pb, const char* what) except -1:
    r.buf = <const char*>pb.buf
    r.len = pb.len
    r.pos = 0
    r.base = _V1_HEADER
    r.what = what
    r.v1 = True
    return 0


cdef int _v1_end(_Reader* r) except -1:
    if r.pos != r.len:
        raise V1InvalidFrame(f"{r.len - r.pos} trailing bytes after {(<bytes>r.what).decode()}")
    return 0


cdef Py_ssize_t _v1_read_blob(_Reader* r, const char* field) except -1:
    """Read a u64 length and skip that many bytes; return the blob's start offset."""
    cdef uint64_t n
    cdef Py_ssize_t start
    _read_u64(r, &n)
    if n > <uint64_t>(r.len - r.pos):
        raise V1InvalidFrame(f"truncated v1 payload: {(<bytes>field).decode()} of {n} bytes at offset "
                           f"{r.base + r.pos}, only {r.len - r.pos} left")
    start = r.pos
    _take(r, <Py_ssize_t>n)
    return start


def v1_parse_version(payload):
    """The version (u32) of a version-exchange message's payload."""
    cdef Py_buffer pb
    cdef _Reader r
    cdef uint32_t v
    PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
    try:
        _v1_reader(&r, &pb, b"a version exchange")
        _read_u32(&r, &v)
        _v1_end(&r)
    finally:
        PyBuffer_Release(&pb)
    return v


def v1_parse_version_reply(payload):
    """True when a version-exchange reply accepts the version (1 byte: 1 yes, 0 no)."""
    cdef Py_buffer pb
    cdef _Reader r
    cdef uint8_t v
    PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
    try:
        _v1_reader(&r, &pb, b"a version reply")
        _read_u8(&r, &v)
        _v1_end(&r)
    finally:
        PyBuffer_Release(&pb)
    if v > 1:
        raise V1InvalidFrame(f"version reply byte is {v}, must be 0 or 1")
    return v == 1


def v1_parse_core(payload):
    """``(name, library)`` of a new-compute-core message; *library* views *payload*."""
    cdef Py_buffer pb
    cdef _Reader r
    cdef Py_ssize_t ns, ls, ne
    cdef str name
    PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
    try:
        _v1_reader(&r, &pb, b"a core message")
        ns = _v1_read_blob(&r, b"the core name")
        ne = r.pos
        ls = _v1_read_blob(&r, b"the library")
        _v1_end(&r)
        try:
            name = (<const char*>pb.buf)[ns:ne].decode("utf-8")
        except UnicodeDecodeError as e:
            raise V1InvalidFrame(f"core name is not valid UTF-8: {e}") from None
    finally:
        PyBuffer_Release(&pb)
    return name, _ro_view(payload)[ls:]


def v1_parse_job(payload):
    """``(job_id, data)`` of a new-job message; *data* views *payload*."""
    cdef Py_buffer pb
    cdef _Reader r
    cdef uint64_t jid
    cdef Py_ssize_t ds
    PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
    try:
        _v1_reader(&r, &pb, b"a job message")
        _read_u64(&r, &jid)
        ds = _v1_read_blob(&r, b"the job data")
        _v1_end(&r)
    finally:
        PyBuffer_Release(&pb)
    return jid, _ro_view(payload)[ds:]


def v1_parse_job_result(payload):
    """``(exit_code, output)`` of a job's 0x01 response; *output* views *payload*."""
    cdef Py_buffer pb
    cdef _Reader r
    cdef uint32_t code
    cdef Py_ssize_t os_
    PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
    try:
        _v1_reader(&r, &pb, b"a job result")
        _read_u32(&r, &code)
        os_ = _v1_read_blob(&r, b"the job output")
        _v1_end(&r)
    finally:
        PyBuffer_Release(&pb)
    return <int32_t>code, _ro_view(payload)[os_:]


def v1_parse_error(payload):
    """The message of an 0xFF error response (UTF-8; invalid bytes are replaced)."""
    return bytes(payload).decode("utf-8", "replace")
