# C-level declarations of fabric_ext.wire (the binary frame codec).
#
# Other extensions may `cimport fabric_ext.wire` to reach a decoded Frame's
# fields and its payload views without going through Python attribute lookups.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    FRAME_HEADER_SIZE = 24        # bytes in the fixed frame header
    FRAME_ITEM_FIXED = 24         # bytes of an item before its handle
    FRAME_MAX_HANDLE = 255        # longest handle, in bytes
    FRAME_INLINE_STARTS = 4       # payload offsets kept inside the Frame (3 items) before mallocing


cdef struct FrameHeader:
    uint8_t kind                  # KIND_*
    uint16_t flags                # always 0 in version 1
    uint32_t item_count           # items in the table
    uint32_t items_length         # bytes of the item table
    uint64_t payload_length       # bytes of the payload section
    uint64_t total                # HEADER_SIZE + items_length + payload_length


# Validate a frame's 24-byte header at p (avail bytes readable) and fill h; raises
# InvalidFrame / TooLarge.  Shared with the data plane's socket loops (fabric_ext.dataplane),
# which size their buffers from it before reading the rest of a frame.
cdef int _check_header(const char* p, Py_ssize_t avail, uint64_t max_items, uint64_t max_payload,
                       FrameHeader* h) except -1


cdef class _FramePayload:
    # Lends the payload section of a decoded frame.  Kept apart from Frame so the
    # memoryview a Frame caches (which references its exporter) makes no cycle.
    cdef Py_buffer _pybuf                 # the source buffer, acquired in decode
    cdef bint _holds                      # _pybuf is acquired (released in __dealloc__)
    cdef const char* _p                   # first byte of the payload section, inside _pybuf
    cdef Py_ssize_t _n                    # bytes of the payload section


cdef class Frame:
    cdef readonly int kind                # KIND_* of this frame
    cdef readonly list items              # [(handle, offset, length, status)], in table order
    cdef _FramePayload _payload            # the payload's lender; None for READ and ACK
    cdef Py_ssize_t _nitems               # len(items)
    cdef uint64_t* _starts                # _nitems + 1 payload offsets (prefix sums); NULL when no payload
    cdef uint64_t _inline[FRAME_INLINE_STARTS]  # storage for _starts of small frames
    cdef object _base                     # memoryview of the payload, made on the first data() call

    cdef object payload_view(self, Py_ssize_t i)


cdef class FrameDecoder:
    cdef uint64_t _max_items              # limit on item_count (and, x280, on items_length)
    cdef uint64_t _max_payload            # limit on payload_length
    cdef unsigned char _hdr[FRAME_HEADER_SIZE]  # a header still arriving
    cdef Py_ssize_t _hdr_have             # bytes of _hdr received
    cdef object _partial                  # bytes object being filled with one frame, or None
    cdef char* _partial_p                 # its data pointer
    cdef Py_ssize_t _need                 # its total length
    cdef Py_ssize_t _have                 # bytes of it received
    cdef bint _failed                     # the stream was rejected: framing is lost

    cdef int _start_partial(self, const char* header, Py_ssize_t total) except -1
    cdef int _complete(self, list out) except -1


# -- Worker socket protocol version 1 (the spawner's controller <-> worker frames) --

cdef enum:
    V1_FRAME_HEADER_SIZE = 17     # type u8 | id u64 | payload_length u64


cdef class V1Frame:
    cdef readonly int kind                # message/response type byte
    cdef readonly object msg_id           # u64 id (a Python int)
    cdef readonly object payload          # read-only memoryview of the payload


cdef class V1Decoder:
    cdef uint64_t _max_payload            # limit on payload_length
    cdef unsigned char _hdr[V1_FRAME_HEADER_SIZE]  # a header still arriving
    cdef Py_ssize_t _hdr_have             # bytes of _hdr received
    cdef uint8_t _kind                    # type of the frame whose payload is being filled
    cdef uint64_t _msg_id                 # its id
    cdef object _partial                  # bytes object being filled with one payload, or None
    cdef char* _partial_p                 # its data pointer
    cdef Py_ssize_t _need                 # its length
    cdef Py_ssize_t _have                 # bytes of it received
    cdef bint _failed                     # the stream was rejected: framing is lost

    cdef int _start(self, const char* header, list out) except -1
