# C-level declarations of fabric_ext.ring (the SPSC shared-memory ring).
#
# The shared layout and the sleep protocol live in include/fabric_ring.h (docs/ring.md
# has the byte layout); ring.pyx implements Producer and Consumer on top of them.

from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "fabric_crc32c.h" nogil:
    uint32_t fab_crc32c(uint32_t crc, const void* buf, size_t n)


cdef extern from "fabric_ring.h" nogil:
    const uint64_t FAB_RING_MAGIC
    const uint32_t FAB_RING_VERSION
    const uint32_t FAB_RING_HEADER_SIZE
    const uint32_t FAB_RING_REC_HEADER
    const uint32_t FAB_RING_ALIGN
    const uint32_t FAB_RING_WRAP
    const uint32_t FAB_RING_CHECK_XOR
    const uint32_t FAB_RING_FLAG_CRC
    const uint32_t FAB_RING_KNOWN_FLAGS
    const uint32_t FAB_RING_CLOSED

    ctypedef struct fab_ring_header:
        uint64_t magic
        uint32_t version
        uint32_t flags
        uint64_t capacity
        uint64_t max_record
        uint64_t header_size
        uint64_t file_size
        uint64_t start
        uint32_t state
        uint64_t head
        uint32_t data_word
        uint64_t records_pushed
        uint64_t bytes_pushed
        uint64_t producer_waits
        uint64_t producer_wakes
        uint64_t tail
        uint32_t space_word
        uint64_t records_popped
        uint64_t bytes_popped
        uint64_t corrupt_skipped
        uint64_t bytes_lost
        uint64_t consumer_waits
        uint64_t consumer_wakes

    ctypedef struct fab_ring_record:
        uint32_t length
        uint32_t check
        uint32_t crc
        uint32_t pos

    enum:
        FAB_WAIT_READY
        FAB_WAIT_CLOSED
        FAB_WAIT_TIMEOUT
        FAB_WAIT_INTR

    uint64_t fab_ring_record_size(uint64_t length)
    int fab_ring_reached(const uint64_t* watch, uint64_t threshold)
    int fab_ring_closed(const fab_ring_header* h)
    int fab_ring_wait(fab_ring_header* h, const uint64_t* watch, uint64_t threshold,
                      uint32_t* word, int64_t spin_ns, int64_t deadline_ns, uint64_t* waits)
    int fab_ring_wake(uint32_t* word, uint64_t* wakes)
    void fab_ring_shutdown(fab_ring_header* h)


cdef class _RingEnd:
    cdef fab_ring_header* _h     # the mapped header (NULL once closed)
    cdef char* _data             # the data area: _h + header_size
    cdef size_t _map_size        # bytes mapped (the whole file)
    cdef uint64_t _cap           # capacity (a power of two)
    cdef uint64_t _mask          # capacity - 1
    cdef uint64_t _max_record    # largest payload accepted
    cdef bint _crc               # records carry a CRC32C of their payload
    cdef bint _busy              # a push/pop of this object is in progress (maybe without the GIL)
    cdef int64_t _spin_ns        # how long to spin before sleeping on the futex
    cdef readonly str path       # the ring file

    cdef _validate(self, fab_ring_header* h, uint64_t st_size)
    cdef int _check_open(self) except -1
    cdef int _enter(self) except -1
    cdef int _wait(self, const uint64_t* watch, uint64_t threshold, uint32_t* word,
                   uint64_t* waits, int64_t deadline_ns) except -1


cdef class Producer(_RingEnd):
    cdef uint64_t _head          # our copy of the published head
    cdef uint64_t _tail_seen     # the consumer's tail as last loaded (reloaded only when it looks full)

    cdef int _push(self, object head, object body, double timeout, bint block) except -1


cdef class Consumer(_RingEnd):
    cdef uint64_t _tail          # our copy of the published tail
    cdef uint64_t _head_seen     # the producer's head as last loaded (reloaded only when it looks empty)

    cdef object _pop(self, double timeout, bint block)
    cdef int _skip(self, uint64_t nbytes, uint64_t lost) except -1
