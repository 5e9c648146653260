"""The shared-memory arena behind fabric's remote memory (rmalloc / rread / rwrite / rfree).

The allocator service owns one :class:`Arena` per node.  Every byte a client allocates,
and every byte of allocator metadata, lives in POSIX shared-memory files::

    /dev/shm/<prefix>.root   arena-wide: magic, version, next segment id, counters
    /dev/shm/<prefix>.<id>   one segment: SegHeader | block-start bitmap | ever bitmap | heap

so a killed allocator loses nothing: a new ``Arena(prefix, ...)`` maps every segment
again, validates its header and rebuilds the free lists and statistics from a walk of
the block headers (the headers are the truth; free-list links are derived).

The heap of a segment is tiled by blocks; each has a hidden 64-byte header (magic,
state, size, capacity, generation, physical predecessor, lease) and 16-byte aligned
data followed by an 8-byte canary.  Free blocks sit in TLSF lists (two-level
segregated fit: O(1) alloc and free) and are coalesced with free neighbours at once.

A handle is ``(seg, off, gen)``: the segment id, the offset of the block's data in
the segment, and the generation the block got from its segment's counter when it was
allocated.  Whether a handle is live, stale (freed) or never issued is decided from
metadata alone -- the block-start bitmap, the header and the segment's ``next_gen`` --
never by reading freed user memory, so double free and use after free are caught
deterministically.

Each segment belongs to one owner; an owner's segments grow by doubling from
``min_segment`` to ``max_segment``; all segments together never map more than
``capacity`` bytes.  Quotas cap an owner's bytes in use.

:class:`SegmentView` maps one segment from another process (the client's local fast
path) and reads or writes a live block without a round trip, validating the handle
before the copy and again after it (seqlock style) so a concurrent free is reported
as :class:`~fabric.errors.StaleHandle` rather than returning wrong bytes.

Example::

    with Arena("demo", 64 << 20) as arena:
        seg, off, gen = arena.alloc(11, owner="alice")
        arena.write(seg, off, gen, 0, b"hello world")
        assert arena.read(seg, off, gen) == b"hello world"
        arena.free(seg, off, gen)

The Arena is not thread-safe beyond the GIL: its methods never release it.
"""

import os
import re

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong, PyLong_Check
from libc.errno cimport EINTR, errno
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix cimport fcntl as cfcntl
from posix cimport unistd
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.types cimport off_t

from fabric_ext.errors import (
    BadRequest,
    Conflict,
    CorruptionDetected,
    DoubleFree,
    InternalError,
    OutOfMemory,
    OutOfRange,
    QuotaExceeded,
    StaleHandle,
    TooLarge,
    UnknownHandle,
)

cdef extern from "<fcntl.h>" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)

cdef extern from "<errno.h>" nogil:
    enum: EOPNOTSUPP
    enum: EWOULDBLOCK

cdef extern from "<sys/file.h>" nogil:
    int flock(int fd, int operation)
    enum: LOCK_EX
    enum: LOCK_NB
    enum: LOCK_UN


__all__ = ["Arena", "SegmentView", "MAX_BLOCK_SIZE", "SHM_DIR"]

SHM_DIR = "/dev/shm"

cdef uint64_t _MAX_BLOCK_SIZE = 1ULL << 45     # requests above this are TooLarge
cdef uint64_t _MAX_SEGMENT_SIZE = 1ULL << 46   # TLSF classes cover capacities below this
cdef uint64_t _MIN_SEGMENT_SIZE = 1ULL << 15
cdef uint64_t _PAGE = 4096
cdef uint64_t _SEG_MAGIC = 0x0001474553424146ULL    # b"FABSEG\x01\x00"
cdef uint64_t _ROOT_MAGIC = 0x01544F4F52424146ULL   # b"FABROOT\x01"
cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFFULL

MAX_BLOCK_SIZE = _MAX_BLOCK_SIZE

_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,200}\Z")

# What a failed probe means for the caller, and which error it raises.
cdef enum Probe:
    P_LIVE = 0
    P_UNKNOWN = 1        # never issued here (or forged)
    P_STALE = 2          # issued, but the block is no longer live
    P_BAD_MAGIC = 3      # a block-start bit points at a header without the magic
    P_BAD_STATE = 4      # header state is neither FREE nor USED
    P_BAD_GEOMETRY = 5   # capacity/size of a live block point outside the heap
    P_BAD_CANARY = 6     # the trailing canary of a live block was overwritten

cdef enum Mode:
    M_ACCESS = 0         # read / write / size / info / set_lease: stale -> StaleHandle
    M_FREE = 1           # free: stale -> DoubleFree


# --------------------------------------------------------------------------------------
# Geometry and bit helpers (pure C, no Python objects)
# --------------------------------------------------------------------------------------

cdef inline uint64_t _align16(uint64_t n) noexcept nogil:
    return (n + 15) & ~<uint64_t>15


cdef inline uint64_t _cap_for(uint64_t size) noexcept nogil:
    # size <= _MAX_BLOCK_SIZE was checked by the caller, so this cannot wrap
    cdef uint64_t c = _align16(size + CANARY_SIZE)
    return c if c >= MIN_CAPACITY else MIN_CAPACITY


cdef inline uint64_t _canary(uint64_t gen, uint64_t hoff) noexcept nogil:
    # per block and per generation, so a stale copy of another block's canary does not pass
    return (gen * 0x9E3779B97F4A7C15ULL) ^ (hoff << 1) ^ 0xCA9A7EC0FFEE5AFEULL


cdef inline BlockHeader* _blk(const SegMap* m, uint64_t hoff) noexcept nogil:
    return <BlockHeader*>(m.base + hoff)


cdef inline uint64_t _hoff(const SegMap* m, const BlockHeader* h) noexcept nogil:
    return <uint64_t>(<const char*>h - m.base)


cdef inline uint64_t _granule(const SegMap* m, uint64_t hoff) noexcept nogil:
    return (hoff - m.heap_off) >> 4


cdef inline bint _bit(const uint8_t* bm, uint64_t g) noexcept nogil:
    return (fab_load_acquire_u8(&bm[g >> 3]) >> (g & 7)) & 1


cdef inline void _set_bit(uint8_t* bm, uint64_t g) noexcept nogil:
    fab_store_release_u8(&bm[g >> 3], bm[g >> 3] | <uint8_t>(1 << (g & 7)))


cdef inline void _clear_bit(uint8_t* bm, uint64_t g) noexcept nogil:
    fab_store_release_u8(&bm[g >> 3], bm[g >> 3] & <uint8_t>~(1 << (g & 7)))


cdef int _layout(uint64_t total, uint64_t* starts_off, uint64_t* ever_off, uint64_t* bm_size,
                 uint64_t* heap_off, uint64_t* heap_size) noexcept nogil:
    """Where the bitmaps and the heap go in a segment of *total* bytes; -1 if too small."""
    cdef uint64_t avail, bm, hoff
    if total < SEG_HEADER_SIZE + BLOCK_HEADER + MIN_CAPACITY:
        return -1
    avail = total - SEG_HEADER_SIZE
    bm = _align16((avail + 127) // 128)        # 1 bit per 16-byte granule
    hoff = SEG_HEADER_SIZE + 2 * bm
    if hoff + BLOCK_HEADER + MIN_CAPACITY > total:
        return -1
    starts_off[0] = SEG_HEADER_SIZE
    ever_off[0] = SEG_HEADER_SIZE + bm
    bm_size[0] = bm
    heap_off[0] = hoff
    heap_size[0] = (total - hoff) & ~<uint64_t>15
    return 0


cdef uint64_t _usable(uint64_t total) noexcept nogil:
    """The largest block size a fresh segment of *total* bytes can hold (0 if none)."""
    cdef uint64_t a, b, c, hoff, hsize
    if _layout(total, &a, &b, &c, &hoff, &hsize) < 0 or hsize < BLOCK_HEADER + MIN_CAPACITY:
        return 0
    return hsize - BLOCK_HEADER - CANARY_SIZE


cdef uint64_t _segment_size_for(uint64_t span) noexcept nogil:
    """The smallest page multiple whose heap holds one block of *span* bytes."""
    cdef uint64_t a, b, c, hoff, hsize
    cdef uint64_t total = (SEG_HEADER_SIZE + span + span // 60 + 64 + _PAGE - 1) & ~(_PAGE - 1)
    while True:
        if _layout(total, &a, &b, &c, &hoff, &hsize) == 0 and hsize >= span:
            return total
        total += _PAGE


cdef inline void _mapping(uint64_t cap, int* fl, int* sl) noexcept nogil:
    # TLSF: capacities below 256 get exact 16-byte lists in class 0; above, class f
    # covers [2**f, 2**(f+1)) split into SL_COUNT equal lists.
    cdef int f
    if cap < (1 << FL_SHIFT):
        fl[0] = 0
        sl[0] = <int>(cap >> 4)
    else:
        f = fab_fls64(cap)
        sl[0] = <int>((cap >> (f - SL_LOG2)) ^ SL_COUNT)
        fl[0] = f - (FL_SHIFT - 1)


cdef inline uint64_t _find_free(SegMap* m, uint64_t cap) noexcept nogil:
    """Head of the first non-empty list whose blocks all hold *cap* bytes; 0 if none."""
    cdef SegHeader* hdr = m.hdr
    cdef int fl, sl
    cdef uint32_t sl_map
    cdef uint64_t fl_map
    if cap >= (1 << FL_SHIFT):
        cap += (1ULL << (fab_fls64(cap) - SL_LOG2)) - 1   # round up to the next list
    _mapping(cap, &fl, &sl)
    if fl >= FL_COUNT:
        return 0
    sl_map = hdr.sl_bitmap[fl] & (<uint32_t>0xFFFFFFFF << sl)
    if not sl_map:
        fl_map = hdr.fl_bitmap & (~<uint64_t>0 << (fl + 1))
        if not fl_map:
            return 0
        fl = fab_ffs64(fl_map)
        sl_map = hdr.sl_bitmap[fl]
    sl = fab_ffs64(sl_map)
    return hdr.heads[fl * SL_COUNT + sl]


cdef inline uint64_t _find_in_own_list(SegMap* m, uint64_t cap) noexcept nogil:
    """Fallback of _find_free: a block of *cap*'s own list that is large enough.

    The rounded-up search skips the list *cap* maps to, where blocks may be larger or
    smaller; a fresh segment sized for one block has exactly such a block.  The scan is
    bounded, so allocation stays O(1).
    """
    cdef int fl, sl, i
    cdef uint64_t x
    _mapping(cap, &fl, &sl)
    if fl >= FL_COUNT:
        return 0
    x = m.hdr.heads[fl * SL_COUNT + sl]
    for i in range(16):
        if x == 0 or _blk(m, x).capacity >= cap:
            return x
        x = _blk(m, x).free_next
    return 0


cdef inline void _insert_free(SegMap* m, uint64_t hoff) noexcept nogil:
    cdef BlockHeader* h = _blk(m, hoff)
    cdef SegHeader* hdr = m.hdr
    cdef int fl, sl
    _mapping(h.capacity, &fl, &sl)
    cdef uint64_t head = hdr.heads[fl * SL_COUNT + sl]
    h.free_next = head
    h.lease_deadline_ms = 0            # FREE: previous block in the list
    if head:
        _blk(m, head).lease_deadline_ms = hoff
    hdr.heads[fl * SL_COUNT + sl] = hoff
    hdr.sl_bitmap[fl] |= (1u << sl)
    hdr.fl_bitmap |= (1ULL << fl)
    hdr.free_bytes += h.capacity
    hdr.free_blocks += 1


cdef inline void _remove_free(SegMap* m, uint64_t hoff) noexcept nogil:
    cdef BlockHeader* h = _blk(m, hoff)
    cdef SegHeader* hdr = m.hdr
    cdef int fl, sl
    cdef uint64_t prev = h.lease_deadline_ms, nxt = h.free_next
    _mapping(h.capacity, &fl, &sl)
    if nxt:
        _blk(m, nxt).lease_deadline_ms = prev
    if prev:
        _blk(m, prev).free_next = nxt
    if hdr.heads[fl * SL_COUNT + sl] == hoff:
        hdr.heads[fl * SL_COUNT + sl] = nxt
        if nxt == 0:
            hdr.sl_bitmap[fl] &= ~(1u << sl)
            if hdr.sl_bitmap[fl] == 0:
                hdr.fl_bitmap &= ~(1ULL << fl)
    h.free_next = 0
    h.lease_deadline_ms = 0
    hdr.free_bytes -= h.capacity
    hdr.free_blocks -= 1


cdef inline void _replace_free(SegMap* m, uint64_t new, int idx, uint64_t prev, uint64_t nxt) noexcept nogil:
    """Put *new* where a listed block with links (prev, nxt) in list *idx* was.

    Splitting a big free block, or merging into one, usually leaves the result in the
    same list: taking over the old position skips a remove and an insert.
    """
    cdef BlockHeader* h = _blk(m, new)
    h.lease_deadline_ms = prev
    h.free_next = nxt
    if prev:
        _blk(m, prev).free_next = new
    else:
        m.hdr.heads[idx] = new
    if nxt:
        _blk(m, nxt).lease_deadline_ms = new


cdef inline bint _same_list(uint64_t a, uint64_t b, int* idx) noexcept nogil:
    cdef int fa, sa, fb, sb
    _mapping(a, &fa, &sa)
    _mapping(b, &fb, &sb)
    idx[0] = fa * SL_COUNT + sa
    return fa == fb and sa == sb


cdef inline void _split(SegMap* m, uint64_t hoff, uint64_t cap) noexcept nogil:
    """Carve the bytes of block *hoff* past *cap* into a new FREE block (not yet listed).

    The carved bytes are zero (free capacity and a USED block's tail past its canary
    are kept zeroed), so the new header lands on zeros.  Every step leaves a valid
    physical walk: the old block's capacity shrinks last.
    """
    cdef BlockHeader* h = _blk(m, hoff)
    cdef uint64_t rem = h.capacity - cap
    cdef uint64_t r = hoff + BLOCK_HEADER + cap, n
    cdef BlockHeader* rh = _blk(m, r)
    rh.owner_id = h.owner_id
    rh.capacity = rem - BLOCK_HEADER
    rh.prev_phys = hoff
    rh.state = BLOCK_FREE
    fab_store_release_u32(&rh.magic, BLOCK_MAGIC)
    n = r + BLOCK_HEADER + rh.capacity
    if n < m.heap_end:
        _blk(m, n).prev_phys = r
    _set_bit(m.ever, _granule(m, r))
    _set_bit(m.starts, _granule(m, r))
    h.capacity = cap


cdef inline bint _worth_split(uint64_t have, uint64_t cap) noexcept nogil:
    return have - cap >= BLOCK_HEADER + MIN_SPLIT_CAPACITY


cdef inline void _absorb_next(SegMap* m, uint64_t hoff, uint64_t n) noexcept nogil:
    """Merge FREE block *n* (already unlisted) into its physical predecessor *hoff*."""
    cdef BlockHeader* h = _blk(m, hoff)
    cdef BlockHeader* nh = _blk(m, n)
    cdef uint64_t nn = n + BLOCK_HEADER + nh.capacity
    h.capacity += BLOCK_HEADER + nh.capacity
    if nn < m.heap_end:
        _blk(m, nn).prev_phys = hoff
    _clear_bit(m.starts, _granule(m, n))
    fab_fence_release()                 # a reader that sees the wiped header sees the bit cleared
    memset(nh, 0, BLOCK_HEADER)         # the absorbed header becomes (zeroed) capacity


cdef inline bint _is_free(SegMap* m, uint64_t hoff) noexcept nogil:
    cdef BlockHeader* h = _blk(m, hoff)
    return h.magic == BLOCK_MAGIC and h.state == BLOCK_FREE


cdef uint64_t _merge_and_list(SegMap* m, uint64_t hoff) noexcept nogil:
    """Coalesce FREE block *hoff* with free neighbours, list the result, return its offset."""
    cdef BlockHeader* h = _blk(m, hoff)
    cdef BlockHeader* nb
    cdef uint64_t n = hoff + BLOCK_HEADER + h.capacity, p = h.prev_phys, prev, nxt, cap = h.capacity
    cdef bint next_free = n < m.heap_end and _is_free(m, n)
    cdef bint prev_free = hoff != m.heap_off and m.heap_off <= p < hoff and not (p & 15) and _is_free(m, p) \
        and p + BLOCK_HEADER + _blk(m, p).capacity == hoff
    cdef int idx
    if next_free and not prev_free:
        nb = _blk(m, n)
        if _same_list(nb.capacity, cap + BLOCK_HEADER + nb.capacity, &idx):
            prev = nb.lease_deadline_ms
            nxt = nb.free_next
            _absorb_next(m, hoff, n)
            _replace_free(m, hoff, idx, prev, nxt)
            m.hdr.free_bytes += BLOCK_HEADER + cap
            return hoff
    elif prev_free and not next_free:
        if _same_list(_blk(m, p).capacity, _blk(m, p).capacity + BLOCK_HEADER + cap, &idx):
            _absorb_next(m, p, hoff)      # p keeps its place in the list
            m.hdr.free_bytes += BLOCK_HEADER + cap
            return p
    if next_free:
        _remove_free(m, n)
        _absorb_next(m, hoff, n)
    if prev_free:
        _remove_free(m, p)
        _absorb_next(m, p, hoff)
        hoff = p
    _insert_free(m, hoff)
    return hoff


cdef int _probe(const SegMap* m, uint64_t off, uint64_t gen, BlockHeader** out) noexcept nogil:
    """Classify handle (off, gen) of this segment from metadata alone (acquire loads)."""
    cdef uint64_t hoff, g, size, cap, next_gen
    cdef BlockHeader* h
    cdef uint16_t state
    if m.base == NULL or (off & 15) or off < m.heap_off + BLOCK_HEADER or off >= m.heap_end:
        return P_UNKNOWN
    hoff = off - BLOCK_HEADER
    g = _granule(m, hoff)
    next_gen = fab_load_acquire_u64(&m.hdr.next_gen)
    if not _bit(m.starts, g):
        # no header there now; one that was there once and a generation that was issued
        # means the block was freed and absorbed by a neighbour
        if _bit(m.ever, g) and 0 < gen < next_gen:
            return P_STALE
        return P_UNKNOWN
    h = _blk(m, hoff)
    if fab_load_acquire_u32(&h.magic) != BLOCK_MAGIC:
        return P_BAD_MAGIC
    state = fab_load_acquire_u16(&h.state)
    if state == BLOCK_USED:
        if fab_load_acquire_u64(&h.generation) == gen:
            size = fab_load_acquire_u64(&h.size)
            cap = h.capacity
            # a damaged header must not steer a copy outside the heap
            if (cap & 15) or cap > m.heap_end - off or size > cap - CANARY_SIZE or cap < MIN_CAPACITY:
                return P_BAD_GEOMETRY
            if fab_load_u64_unaligned(m.base + off + size) != _canary(gen, hoff):
                return P_BAD_CANARY
            out[0] = h
            return P_LIVE
    elif state != BLOCK_FREE:
        return P_BAD_STATE
    return P_STALE if 0 < gen < next_gen else P_UNKNOWN


cdef int _raise_probe(int code, uint64_t seg_id, uint64_t off, uint64_t gen, int mode) except -1:
    where = f"block {seg_id}:{off} generation {gen}"
    if code == P_UNKNOWN:
        raise UnknownHandle(f"{where} was never issued by this arena", segment=seg_id, offset=off, generation=gen)
    if code == P_STALE:
        if mode == M_FREE:
            raise DoubleFree(f"{where} was already freed", segment=seg_id, offset=off, generation=gen)
        raise StaleHandle(f"{where} was freed (use after free)", segment=seg_id, offset=off, generation=gen)
    detail = {
        P_BAD_MAGIC: "block header magic damaged",
        P_BAD_STATE: "block header state damaged",
        P_BAD_GEOMETRY: "block header size/capacity damaged",
        P_BAD_CANARY: "trailing canary overwritten (write past the end of the block)",
    }.get(code, f"probe code {code}")
    raise CorruptionDetected(f"{where}: {detail}", segment=seg_id, offset=off, detail=detail)


# --------------------------------------------------------------------------------------
# Argument conversion: every hostile integer becomes a FabricError, never a wrap
# --------------------------------------------------------------------------------------

# PyLong_AsLongLongAndOverflow reports overflow in a flag instead of raising, so the
# success path sets up no exception handling (these run several times per call).

cdef inline uint64_t _big_u64(object v) except? 0xFFFFFFFFFFFFFFFF:
    """v >= 2**63: a uint64 if it fits, else OverflowError."""
    return PyLong_AsUnsignedLongLong(v)


cdef inline uint64_t _handle_part(object v) except? 0xFFFFFFFFFFFFFFFF:
    cdef int ovf
    cdef long long x
    if not PyLong_Check(v):
        raise BadRequest(f"handle parts are integers, got {type(v).__name__}")
    x = PyLong_AsLongLongAndOverflow(v, &ovf)
    if ovf == 0 and x >= 0:
        return <uint64_t>x
    if ovf > 0:
        try:
            return _big_u64(v)
        except OverflowError:
            pass
    raise UnknownHandle(f"handle part {v} is outside 0..2**64-1")


cdef inline uint64_t _size_arg(object v, str what) except? 0xFFFFFFFFFFFFFFFF:
    cdef int ovf
    cdef long long x
    if not PyLong_Check(v):
        raise BadRequest(f"{what} must be an integer, got {type(v).__name__}")
    x = PyLong_AsLongLongAndOverflow(v, &ovf)
    if ovf == 0 and 0 <= x <= <long long>_MAX_BLOCK_SIZE:
        return <uint64_t>x
    if ovf < 0 or (ovf == 0 and x < 0):
        raise BadRequest(f"{what} must not be negative, got {v}")
    raise TooLarge(f"{what} {v} exceeds the largest block ({_MAX_BLOCK_SIZE} bytes)",
                   requested=v, limit=_MAX_BLOCK_SIZE)


cdef inline uint64_t _u64_arg(object v, str what) except? 0xFFFFFFFFFFFFFFFF:
    cdef int ovf
    cdef long long x
    if not PyLong_Check(v):
        raise BadRequest(f"{what} must be an integer, got {type(v).__name__}")
    x = PyLong_AsLongLongAndOverflow(v, &ovf)
    if ovf == 0 and x >= 0:
        return <uint64_t>x
    if ovf > 0:
        try:
            return _big_u64(v)
        except OverflowError:
            pass
    raise BadRequest(f"{what} must be in 0..2**64-1, got {v}")


cdef inline int64_t _i64(object v) except? -9223372036854775807:
    """A position or length; values beyond int64 clamp to ones _range rejects."""
    cdef int ovf
    cdef long long x
    if not PyLong_Check(v):
        raise BadRequest(f"positions and lengths must be integers, got {type(v).__name__}")
    x = PyLong_AsLongLongAndOverflow(v, &ovf)
    if ovf == 0:
        return x
    return INT64_MAX if ovf > 0 else INT64_MIN


cdef inline int _range(uint64_t size, int64_t ps, int64_t ln, uint64_t* p, uint64_t* n) except -1:
    """Check [ps, ps+ln) against a block of *size* bytes; ln -1 = to the end."""
    if ps < 0 or <uint64_t>ps > size:
        raise OutOfRange(f"pos {ps} outside the block's {size} bytes", size=size, pos=ps, length=ln)
    if ln == -1:
        ln = <int64_t>(size - <uint64_t>ps)
    elif ln < 0 or <uint64_t>ln > size - <uint64_t>ps:
        raise OutOfRange(f"[{ps}, {ps}+{ln}) outside the block's {size} bytes", size=size, pos=ps, length=ln)
    p[0] = <uint64_t>ps
    n[0] = <uint64_t>ln
    return 0


cdef uint32_t _fnv1a(bytes data):
    cdef uint32_t h = 2166136261u
    cdef const unsigned char* c = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t i
    for i in range(len(data)):
        h = (h ^ c[i]) * 16777619u
    return h


# --------------------------------------------------------------------------------------
# Mapping segment files
# --------------------------------------------------------------------------------------

cdef int _map_fd(int fd, uint64_t size, SegMap* m) except -1:
    cdef void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if p == MAP_FAILED:
        raise OSError(errno, os.strerror(errno))
    m.base = <char*>p
    m.size = size
    m.hdr = <SegHeader*>p
    return 0


cdef void _unmap(SegMap* m) noexcept nogil:
    if m.base != NULL:
        munmap(m.base, m.size)
    m.base = NULL
    m.hdr = NULL
    m.starts = NULL
    m.ever = NULL
    m.size = 0
    m.heap_off = 0
    m.heap_end = 0


cdef str _header_problem(SegMap* m):
    """None when the segment header is consistent with its file; else what is wrong.

    On success fills the validated layout into *m*: later code uses those copies, so a
    header damaged after attach cannot steer accesses outside the mapping.
    """
    cdef SegHeader* hdr = m.hdr
    cdef uint64_t so, eo, bm, ho, hs
    if hdr.version != ARENA_VERSION:
        return f"version {hdr.version}, expected {ARENA_VERSION}"
    if hdr.header_size != SEG_HEADER_SIZE:
        return f"header size {hdr.header_size}, expected {SEG_HEADER_SIZE}"
    if hdr.total_size != m.size:
        return f"header says {hdr.total_size} bytes, the file has {m.size}"
    if _layout(m.size, &so, &eo, &bm, &ho, &hs) < 0:
        return "segment too small"
    if (hdr.starts_off, hdr.ever_off, hdr.bitmap_size, hdr.heap_off, hdr.heap_size) != (so, eo, bm, ho, hs):
        return "layout fields do not match the segment size"
    if hdr.next_gen == 0:
        return "next_gen is 0"
    m.starts = <uint8_t*>(m.base + so)
    m.ever = <uint8_t*>(m.base + eo)
    m.heap_off = ho
    m.heap_end = ho + hs
    return None


cdef int _open_file(bytes path, int flags, int* fd_out) except -1:
    cdef int fd
    while True:
        fd = cfcntl.open(path, flags | cfcntl.O_CLOEXEC, 0o600)
        if fd >= 0 or errno != EINTR:
            break
    if fd < 0:
        e = errno
        raise OSError(e, os.strerror(e), os.fsdecode(path))
    fd_out[0] = fd
    return 0


cdef uint64_t _file_size(int fd) except? 0xFFFFFFFFFFFFFFFF:
    cdef struct_stat st
    if fstat(fd, &st) != 0:
        raise OSError(errno, os.strerror(errno))
    return <uint64_t>st.st_size


# --------------------------------------------------------------------------------------
# Arena
# --------------------------------------------------------------------------------------

cdef class _Owner:
    """Book-keeping of one owner (in process memory; rebuilt from segments on attach)."""

    def __cinit__(self):
        self.segments = []


cdef class _Segment:
    """One mapped segment of the arena."""

    def __dealloc__(self):
        _unmap(&self.m)


cdef _Owner _new_owner(str name, uint64_t limit, bint explicit):
    cdef bytes raw = name.encode("utf-8")
    if len(raw) > OWNER_NAME_MAX or b"\0" in raw:
        raise BadRequest(f"owner names are at most {OWNER_NAME_MAX} utf-8 bytes without NUL, got {name!r}")
    cdef _Owner ow = _Owner.__new__(_Owner)
    ow.name = name
    ow.name_utf8 = raw
    ow.hash = _fnv1a(raw)
    ow.limit = limit
    ow.explicit_quota = explicit
    return ow


cdef class Arena:
    """A shared-memory arena of blocks addressed by ``(seg, off, gen)`` handles.

    ``Arena(prefix, capacity)`` attaches every existing ``/dev/shm/<prefix>.*`` segment
    (so a restarted allocator finds every block and byte) or starts empty.  One process
    at a time may own a prefix (an ``flock`` on the root file; a second owner gets
    :class:`~fabric.errors.Conflict`); a killed owner's lock goes with it.
    """

    def __cinit__(self):
        self._root_fd = -1
        self._root = NULL
        self._segs = []
        self._owners = {}

    def __init__(self, prefix, capacity, *, min_segment=1 << 20, max_segment=1 << 30, default_quota=0):
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise BadRequest(f"prefix must match [A-Za-z0-9._-]{{1,200}}, got {prefix!r}")
        if self._root != NULL:
            raise BadRequest("Arena.__init__ called twice")
        self._capacity = _u64_arg(capacity, "capacity")
        self._min_segment = _u64_arg(min_segment, "min_segment")
        self._max_segment = _u64_arg(max_segment, "max_segment")
        self._default_quota = _u64_arg(default_quota, "default_quota")
        if self._min_segment < _MIN_SEGMENT_SIZE or self._min_segment > _MAX_SEGMENT_SIZE:
            raise BadRequest(f"min_segment must be in [{_MIN_SEGMENT_SIZE}, {_MAX_SEGMENT_SIZE}]")
        if self._max_segment < self._min_segment or self._max_segment > _MAX_SEGMENT_SIZE:
            raise BadRequest(f"max_segment must be in [min_segment, {_MAX_SEGMENT_SIZE}]")
        self._min_segment = (self._min_segment + _PAGE - 1) & ~(_PAGE - 1)
        self._max_segment = (self._max_segment + _PAGE - 1) & ~(_PAGE - 1)
        self._prefix = prefix
        try:
            self._open_root()
            self._attach_all()
        except BaseException:
            self.close()
            raise

    # -- attach --------------------------------------------------------------------

    cdef int _open_root(self) except -1:
        cdef bytes path = os.fsencode(f"{SHM_DIR}/{self._prefix}.root")
        cdef int fd
        cdef bint fresh = True
        cdef uint64_t size
        cdef void* p
        try:
            _open_file(path, cfcntl.O_RDWR | cfcntl.O_CREAT | cfcntl.O_EXCL, &fd)
        except FileExistsError:
            _open_file(path, cfcntl.O_RDWR, &fd)
            fresh = False
        self._root_fd = fd
        if flock(fd, LOCK_EX | LOCK_NB) != 0:
            e = errno
            if e == EWOULDBLOCK:
                raise Conflict(f"arena {self._prefix!r} is in use by another Arena (process or object)",
                               prefix=self._prefix)
            raise OSError(e, os.strerror(e))
        size = _file_size(fd)
        if size == 0:                      # created here, or a creator died before ftruncate
            fresh = True
            if unistd.ftruncate(fd, ROOT_FILE_SIZE) != 0:
                raise OSError(errno, os.strerror(errno))
        elif size != ROOT_FILE_SIZE:
            raise CorruptionDetected(f"root file of {self._prefix!r} has {size} bytes", segment=0, offset=0,
                                     detail="root size")
        p = mmap(NULL, ROOT_FILE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, os.strerror(errno))
        self._root = <RootHeader*>p
        if self._root.magic == 0 and self._root.version == 0:
            fresh = True
        if fresh:
            memset(p, 0, ROOT_FILE_SIZE)
            self._root.version = ARENA_VERSION
            self._root.header_size = ROOT_FILE_SIZE
            self._root.next_seg_id = 1
            fab_store_release_u64(&self._root.magic, _ROOT_MAGIC)
        elif self._root.magic != _ROOT_MAGIC or self._root.version != ARENA_VERSION:
            raise CorruptionDetected(f"root file of {self._prefix!r} has a bad magic or version", segment=0,
                                     offset=0, detail="root magic")
        return 0

    cdef int _attach_all(self) except -1:
        pat = re.compile(re.escape(self._prefix) + r"\.([0-9]{1,19})\Z")
        ids = sorted(int(m.group(1)) for m in map(pat.match, os.listdir(SHM_DIR)) if m)
        for sid in ids:
            self._attach(sid)
        if ids and self._root.next_seg_id <= max(ids):
            self._root.next_seg_id = max(ids) + 1   # a crash between creating a file and counting it
        return 0

    cdef int _attach(self, uint64_t sid) except -1:
        cdef int fd
        cdef uint64_t size
        cdef _Segment s = _Segment.__new__(_Segment)
        path = f"{SHM_DIR}/{self._prefix}.{sid}"
        try:
            _open_file(os.fsencode(path), cfcntl.O_RDWR, &fd)
        except FileNotFoundError:       # destroyed under us by another process
            return 0
        try:
            size = _file_size(fd)
            if size >= SEG_HEADER_SIZE:
                _map_fd(fd, size, &s.m)
        finally:
            unistd.close(fd)
        if s.m.base == NULL or s.m.hdr.magic == 0:
            # the creator died before the header was complete (its magic is written last)
            _unmap(&s.m)
            os.unlink(path)
            return 0
        s.seg_id = sid
        s.path = path
        if s.m.hdr.magic != _SEG_MAGIC:
            raise CorruptionDetected(f"segment {path}: bad magic", segment=sid, offset=0, detail="segment magic")
        problem = _header_problem(&s.m)
        if problem is None and s.m.hdr.seg_id != sid:
            problem = f"header names segment {s.m.hdr.seg_id}"
        if problem is not None:
            raise CorruptionDetected(f"segment {path}: {problem}", segment=sid, offset=0, detail=problem)
        raw = bytes(s.m.hdr.owner[:OWNER_NAME_MAX]).rstrip(b"\0")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptionDetected(f"segment {path}: owner name is not utf-8", segment=sid, offset=0,
                                     detail="owner name") from None
        ow = self._owners.get(name)
        if ow is None:
            ow = _new_owner(name, self._default_quota, False)
            self._owners[name] = ow
        if (<_Owner>ow).hash != s.m.hdr.owner_hash:
            raise CorruptionDetected(f"segment {path}: owner hash mismatch", segment=sid, offset=0,
                                     detail="owner hash")
        s.owner = <_Owner>ow
        self._add_segment(s)
        self._rebuild(s)
        return 0

    cdef int _add_segment(self, _Segment s) except -1:
        while <uint64_t>len(self._segs) <= s.seg_id:
            self._segs.append(None)
        self._segs[s.seg_id] = s
        s.owner.segments.append(s)
        if s.m.size > s.owner.largest_segment:
            s.owner.largest_segment = s.m.size
        self._mapped += s.m.size
        return 0

    cdef int _rebuild(self, _Segment s) except -1:
        """Re-derive bitmaps, free lists and counters of *s* from its block headers.

        Repairs what a crash mid-operation can leave: neighbouring free blocks not yet
        merged, stale prev_phys links and bitmap bits, unlisted free blocks and, when the
        segment was marked dirty, free capacity not yet wiped.
        """
        cdef SegMap* m = &s.m
        cdef SegHeader* hdr = m.hdr
        cdef uint64_t off = m.heap_off, prev = 0, cap
        cdef BlockHeader* h
        cdef bint dirty = hdr.dirty != 0
        cdef _Owner ow = s.owner
        memset(m.starts, 0, hdr.bitmap_size)
        hdr.fl_bitmap = 0
        memset(hdr.sl_bitmap, 0, sizeof(hdr.sl_bitmap))
        memset(hdr.heads, 0, sizeof(hdr.heads))
        hdr.in_use = hdr.blocks = hdr.free_bytes = hdr.free_blocks = 0
        s.leased = 0
        # pass 1: validate the walk, merge adjacent free blocks, fix links and bitmaps
        while off < m.heap_end:
            h = _blk(m, off)
            cap = h.capacity
            if h.magic != BLOCK_MAGIC or (h.state != BLOCK_FREE and h.state != BLOCK_USED) \
                    or (cap & 15) or cap < MIN_CAPACITY or cap > m.heap_end - off - BLOCK_HEADER:
                raise CorruptionDetected(f"segment {s.path}: damaged block header at {off}", segment=s.seg_id,
                                         offset=off + BLOCK_HEADER, detail="block header")
            if h.state == BLOCK_USED and (h.size > cap - CANARY_SIZE or h.generation == 0
                                          or h.generation >= hdr.next_gen):
                raise CorruptionDetected(f"segment {s.path}: damaged block header at {off}", segment=s.seg_id,
                                         offset=off + BLOCK_HEADER, detail="block size/generation")
            if h.state == BLOCK_FREE and prev and _blk(m, prev).state == BLOCK_FREE:
                _absorb_next(m, prev, off)     # clears the bit (not set yet) and wipes the header
                off = prev + BLOCK_HEADER + _blk(m, prev).capacity
                continue
            h.prev_phys = prev
            _set_bit(m.starts, _granule(m, off))
            _set_bit(m.ever, _granule(m, off))
            prev = off
            off += BLOCK_HEADER + cap
        # pass 2: lists and counters
        off = m.heap_off
        while off < m.heap_end:
            h = _blk(m, off)
            cap = h.capacity
            if h.state == BLOCK_FREE:
                if dirty:
                    fab_wipe(m.base + off + BLOCK_HEADER, cap)
                h.size = 0
                _insert_free(m, off)
            else:
                h.free_next = 0
                hdr.in_use += h.size
                hdr.blocks += 1
                if h.lease_deadline_ms:
                    s.leased += 1
            off += BLOCK_HEADER + cap
        hdr.dirty = 0
        ow.in_use += hdr.in_use
        ow.blocks += hdr.blocks
        self._in_use += hdr.in_use
        self._blocks += hdr.blocks
        if self._in_use > self._root.peak_in_use:
            self._root.peak_in_use = self._in_use
        return 0

    # -- lookups -------------------------------------------------------------------

    cdef inline _Owner _owner(self, object owner):
        # the service passes the same str object (often "") again and again
        if owner is self._last_key:
            return self._last_owner
        return self._owner_slow(owner)

    cdef _Owner _owner_slow(self, object owner):
        if not isinstance(owner, str):
            raise BadRequest(f"owner must be a str, got {type(owner).__name__}")
        ow = self._owners.get(owner)
        if ow is None:
            ow = _new_owner(owner, self._default_quota, False)
            self._owners[owner] = ow
        self._last_key = owner
        self._last_owner = <_Owner>ow
        return <_Owner>ow

    cdef _Segment _segment(self, object seg, uint64_t gen, int mode):
        cdef uint64_t sid = _handle_part(seg)
        cdef object s
        if sid < <uint64_t>PyList_GET_SIZE(self._segs):
            s = self._segs[<Py_ssize_t>sid]
            if s is not None:
                return <_Segment>s
        if self._root == NULL:
            raise BadRequest("the arena is closed")
        # a segment id that was issued but whose (empty) segment was released: every
        # block in it was freed, so an issued-looking generation is stale
        _raise_probe(P_STALE if (0 < sid < self._root.next_seg_id and gen != 0) else P_UNKNOWN,
                     sid, 0, gen, mode)

    cdef BlockHeader* _live(self, _Segment s, uint64_t off, uint64_t gen, int mode) except NULL:
        cdef BlockHeader* h = NULL
        cdef int code = _probe(&s.m, off, gen, &h)
        if code != P_LIVE:
            _raise_probe(code, s.seg_id, off, gen, mode)
        return h

    # -- allocation ----------------------------------------------------------------

    cdef uint64_t _take(self, _Segment s, uint64_t cap) except? 0:
        """Unlist a free block of at least *cap* bytes in *s*, split off the rest; 0 if none."""
        cdef SegMap* m = &s.m
        cdef uint64_t off = _find_free(m, cap), prev, nxt
        cdef BlockHeader* h
        cdef int idx
        if off == 0:
            off = _find_in_own_list(m, cap)
            if off == 0:
                return 0
        if off < m.heap_off or off >= m.heap_end or (off & 15) or not _is_free(m, off):
            raise CorruptionDetected(f"segment {s.seg_id}: free list points at a damaged block {off}",
                                     segment=s.seg_id, offset=off + BLOCK_HEADER, detail="free list")
        m.hdr.dirty = 1
        h = _blk(m, off)
        if not _worth_split(h.capacity, cap):
            _remove_free(m, off)
        elif _same_list(h.capacity, h.capacity - cap - BLOCK_HEADER, &idx):
            prev = h.lease_deadline_ms
            nxt = h.free_next
            h.lease_deadline_ms = 0
            h.free_next = 0
            _split(m, off, cap)
            _replace_free(m, off + BLOCK_HEADER + cap, idx, prev, nxt)
            m.hdr.free_bytes -= BLOCK_HEADER + cap
        else:
            _remove_free(m, off)
            _split(m, off, cap)
            _insert_free(m, off + BLOCK_HEADER + cap)
        return off

    cdef _Segment _alloc_block(self, _Owner ow, uint64_t size, uint64_t lease, uint64_t* hoff):
        cdef uint64_t cap = _cap_for(size), off = 0, gen
        cdef _Segment s = None
        cdef SegHeader* hdr
        cdef BlockHeader* h
        cdef Py_ssize_t i, n = PyList_GET_SIZE(ow.segments)
        for i in range(n):
            s = <_Segment>ow.segments[i]
            off = self._take(s, cap)
            if off:
                break
        if off == 0:
            s = self._grow(ow, cap + BLOCK_HEADER, size)
            off = self._take(s, cap)
            if off == 0:
                raise InternalError("a fresh segment could not hold the block it was made for")
        hdr = s.m.hdr
        h = _blk(&s.m, off)
        # the generation is persisted before any header carries it, so every generation
        # in a header is < next_gen even after a crash
        gen = hdr.next_gen
        fab_store_release_u64(&hdr.next_gen, gen + 1)
        h.size = size
        h.generation = gen
        h.lease_deadline_ms = lease
        h.free_next = 0
        h.flags = 0
        h.owner_id = ow.hash
        fab_store_u64_unaligned(s.m.base + off + BLOCK_HEADER + size, _canary(gen, off))
        fab_store_release_u16(&h.state, BLOCK_USED)   # publishes the fields above to readers
        hdr.in_use += size
        hdr.blocks += 1
        hdr.dirty = 0
        ow.in_use += size
        ow.blocks += 1
        self._in_use += size
        self._blocks += 1
        if self._in_use > self._root.peak_in_use:
            self._root.peak_in_use = self._in_use
        if lease:
            s.leased += 1
        if FABRIC_DEBUG_ENABLED:
            self._check_segment(s, False)
        hoff[0] = off
        return s

    cdef int _free_block(self, _Segment s, BlockHeader* h) except -1:
        """Free live block *h* (validated by the caller): wipe, coalesce, list."""
        cdef SegMap* m = &s.m
        cdef uint64_t off = _hoff(m, h), size = h.size, cap = h.capacity
        cdef uint64_t n = off + BLOCK_HEADER + cap
        cdef _Owner ow = s.owner
        if n < m.heap_end and _blk(m, n).magic != BLOCK_MAGIC:
            raise CorruptionDetected(f"segment {s.seg_id}: header after block {off + BLOCK_HEADER} damaged",
                                     segment=s.seg_id, offset=n + BLOCK_HEADER, detail="block header magic")
        m.hdr.dirty = 1
        if h.lease_deadline_ms:
            s.leased -= 1
        fab_store_release_u16(&h.state, BLOCK_FREE)
        fab_fence_release()        # a reader that sees wiped bytes also sees the state change
        fab_wipe(m.base + off + BLOCK_HEADER, cap)
        h.size = 0
        _merge_and_list(m, off)
        m.hdr.in_use -= size
        m.hdr.blocks -= 1
        m.hdr.dirty = 0
        ow.in_use -= size
        ow.blocks -= 1
        self._in_use -= size
        self._blocks -= 1
        if FABRIC_DEBUG_ENABLED:
            self._check_segment(s, False)
        return 0

    cdef _Segment _grow(self, _Owner ow, uint64_t span, uint64_t size):
        cdef uint64_t need = _segment_size_for(span), want, avail
        want = self._min_segment if not ow.segments else min(self._max_segment, 2 * ow.largest_segment)
        if want < need:
            want = need                     # a block bigger than max_segment gets its own segment
        avail = self._capacity - self._mapped if self._capacity > self._mapped else 0
        if want > avail:
            self._release_empty()
            avail = self._capacity - self._mapped if self._capacity > self._mapped else 0
            if need > avail:
                raise OutOfMemory(
                    f"cannot allocate {size} bytes: {self._mapped} of {self._capacity} bytes are mapped",
                    requested=size, available=self._available(ow, avail))
            want = max(need, avail & ~(_PAGE - 1))
        return self._create_segment(ow, want)

    cdef uint64_t _available(self, _Owner ow, uint64_t avail):
        cdef uint64_t best = _usable(avail & ~(_PAGE - 1)), lf
        for s in ow.segments:
            lf = _largest_free(&(<_Segment>s).m)
            if lf >= CANARY_SIZE and lf - CANARY_SIZE > best:
                best = lf - CANARY_SIZE
        return best

    cdef _Segment _create_segment(self, _Owner ow, uint64_t size):
        cdef int fd = -1, rc
        cdef uint64_t sid
        cdef _Segment s = _Segment.__new__(_Segment)
        cdef SegHeader* hdr
        cdef BlockHeader* h
        cdef uint64_t so, eo, bm, ho, hs
        if _layout(size, &so, &eo, &bm, &ho, &hs) < 0:
            raise InternalError(f"segment size {size} too small")
        while True:
            # the id is counted before the file exists: ids are never reused, even after a crash
            sid = self._root.next_seg_id
            self._root.next_seg_id = sid + 1
            path = f"{SHM_DIR}/{self._prefix}.{sid}"
            try:
                _open_file(os.fsencode(path), cfcntl.O_RDWR | cfcntl.O_CREAT | cfcntl.O_EXCL, &fd)
                break
            except FileExistsError:     # a stray file: skip its id
                continue
        try:
            if unistd.ftruncate(fd, <off_t>size) != 0:
                raise OSError(errno, os.strerror(errno))
            # reserve the pages now: a full tmpfs must fail here, not SIGBUS on first touch
            rc = posix_fallocate(fd, 0, <off_t>size)
            while rc == EINTR:
                rc = posix_fallocate(fd, 0, <off_t>size)
            if rc != 0 and rc != EOPNOTSUPP:      # the file system cannot reserve: stay lazy
                raise OutOfMemory(f"cannot reserve a {size}-byte segment in {SHM_DIR}: {os.strerror(rc)}",
                                  requested=size, available=0)
            _map_fd(fd, size, &s.m)
        except BaseException:
            unistd.close(fd)
            os.unlink(path)
            raise
        unistd.close(fd)
        hdr = s.m.hdr
        hdr.version = ARENA_VERSION
        hdr.header_size = SEG_HEADER_SIZE
        hdr.total_size = size
        hdr.seg_id = sid
        hdr.next_gen = 1
        hdr.starts_off = so
        hdr.ever_off = eo
        hdr.bitmap_size = bm
        hdr.heap_off = ho
        hdr.heap_size = hs
        hdr.owner_hash = ow.hash
        memcpy(hdr.owner, PyBytes_AS_STRING(ow.name_utf8), len(ow.name_utf8))
        _header_problem(&s.m)            # fills the validated layout
        h = _blk(&s.m, ho)
        h.capacity = hs - BLOCK_HEADER
        h.owner_id = ow.hash
        h.state = BLOCK_FREE
        h.magic = BLOCK_MAGIC
        _set_bit(s.m.starts, 0)
        _set_bit(s.m.ever, 0)
        _insert_free(&s.m, ho)
        fab_store_release_u64(&hdr.magic, _SEG_MAGIC)   # last: a file without it is incomplete
        s.seg_id = sid
        s.path = path
        s.owner = ow
        self._add_segment(s)
        return s

    cdef void _release_segment(self, _Segment s):
        # a SegmentView elsewhere keeps its own mapping; it sees every block FREE
        cdef _Owner ow = s.owner
        self._segs[s.seg_id] = None
        ow.segments.remove(s)
        ow.largest_segment = max([(<_Segment>x).m.size for x in ow.segments], default=0)
        self._mapped -= s.m.size
        _unmap(&s.m)
        try:
            os.unlink(s.path)
        except FileNotFoundError:
            pass

    cdef int _release_empty(self) except -1:
        """Give back every segment without live blocks (done only under memory pressure)."""
        for s in list(self._segs):
            if s is not None and (<_Segment>s).m.hdr.blocks == 0:
                self._release_segment(<_Segment>s)
        return 0

    # -- public API ----------------------------------------------------------------

    @property
    def prefix(self):
        """The shm file name prefix."""
        return self._prefix

    @property
    def capacity(self):
        """The most bytes all segments together may map."""
        return self._capacity

    def set_quota(self, owner, limit):
        """Cap *owner*'s bytes in use (sum of requested sizes); 0 = unlimited."""
        cdef uint64_t lim = _u64_arg(limit, "limit")
        cdef _Owner ow = self._owner(owner)
        ow.limit = lim
        ow.explicit_quota = True

    def alloc(self, size, owner="", lease_deadline_ms=0):
        """Allocate a zeroed block of *size* bytes for *owner*; returns ``(seg, off, gen)``."""
        cdef uint64_t n = _size_arg(size, "size")
        cdef uint64_t lease = _u64_arg(lease_deadline_ms, "lease_deadline_ms")
        cdef _Owner ow = self._owner(owner)
        cdef uint64_t hoff
        if self._root == NULL:
            raise BadRequest("the arena is closed")
        if ow.limit and ow.in_use + n > ow.limit:
            raise QuotaExceeded(f"owner {ow.name!r} would exceed its quota: {ow.in_use} + {n} > {ow.limit} bytes",
                                owner=ow.name, limit=ow.limit, requested=n)
        cdef _Segment s = self._alloc_block(ow, n, lease, &hoff)
        self._root.alloc_count += 1
        return (s.seg_id, hoff + BLOCK_HEADER, _blk(&s.m, hoff).generation)

    def free(self, seg, off, gen):
        """Free a live block; returns its size.  DoubleFree if it was already freed."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        cdef _Segment s = self._segment(seg, g, M_FREE)
        cdef BlockHeader* h = self._live(s, o, g, M_FREE)
        cdef uint64_t size = h.size
        self._free_block(s, h)
        self._root.free_count += 1
        return size

    def realloc(self, seg, off, gen, new_size):
        """Resize a block, in place when possible (same handle), else by moving it.

        The first ``min(old, new)`` bytes are kept; a grown tail reads as zeros.
        """
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        cdef _Segment s = self._segment(seg, g, M_ACCESS)
        cdef BlockHeader* h = self._live(s, o, g, M_ACCESS)
        cdef uint64_t new = _size_arg(new_size, "new_size")
        cdef uint64_t old = h.size, cap = h.capacity, need = _cap_for(new), hoff = o - BLOCK_HEADER
        cdef uint64_t n, hoff2
        cdef SegMap* m = &s.m
        cdef _Owner ow = s.owner
        cdef _Segment s2
        cdef BlockHeader* h2
        if new == old:
            return (s.seg_id, o, g)
        if new > old and ow.limit and ow.in_use - old + new > ow.limit:
            raise QuotaExceeded(f"owner {ow.name!r} would exceed its quota: {ow.in_use} - {old} + {new} > "
                                f"{ow.limit} bytes", owner=ow.name, limit=ow.limit, requested=new)
        n = hoff + BLOCK_HEADER + cap
        if need > cap and n < m.heap_end and _is_free(m, n) and cap + BLOCK_HEADER + _blk(m, n).capacity >= need:
            # grow into the free successor
            m.hdr.dirty = 1
            _remove_free(m, n)
            _absorb_next(m, hoff, n)
            cap = h.capacity
        if need <= cap:
            m.hdr.dirty = 1
            if new < old:
                fab_wipe(m.base + o + new, old - new + CANARY_SIZE)   # old tail and canary
            else:
                memset(m.base + o + old, 0, CANARY_SIZE)              # old canary; beyond it is zero
            fab_store_u64_unaligned(m.base + o + new, _canary(g, hoff))
            fab_store_release_u64(&h.size, new)
            if _worth_split(cap, need):
                _split(m, hoff, need)
                _merge_and_list(m, hoff + BLOCK_HEADER + need)
            m.hdr.in_use = m.hdr.in_use - old + new
            m.hdr.dirty = 0
            ow.in_use = ow.in_use - old + new
            self._in_use = self._in_use - old + new
            if self._in_use > self._root.peak_in_use:
                self._root.peak_in_use = self._in_use
            if FABRIC_DEBUG_ENABLED:
                self._check_segment(s, False)
            return (s.seg_id, o, g)
        # move: the old block stays intact until the new one exists
        s2 = self._alloc_block(ow, new, h.lease_deadline_ms, &hoff2)
        h = _blk(&s.m, hoff)      # s's header pointer is stable, re-read for clarity
        h2 = _blk(&s2.m, hoff2)
        memcpy(s2.m.base + hoff2 + BLOCK_HEADER, s.m.base + o, min(old, new))
        result = (s2.seg_id, hoff2 + BLOCK_HEADER, h2.generation)
        self._free_block(s, h)
        return result

    def read(self, seg, off, gen, pos=0, length=-1):
        """Return ``length`` bytes of the block from ``pos`` (-1 = to the end of its size)."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen), p, n
        cdef _Segment s = self._segment(seg, g, M_ACCESS)
        cdef BlockHeader* h = self._live(s, o, g, M_ACCESS)
        _range(h.size, _i64(pos), _i64(length), &p, &n)
        return PyBytes_FromStringAndSize(s.m.base + o + p, <Py_ssize_t>n)

    def read_into(self, seg, off, gen, pos, out):
        """Copy ``len(out)`` bytes of the block from ``pos`` into the writable buffer *out*."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen), p, n
        cdef _Segment s = self._segment(seg, g, M_ACCESS)
        cdef BlockHeader* h = self._live(s, o, g, M_ACCESS)
        cdef Py_buffer buf
        try:
            PyObject_GetBuffer(out, &buf, PyBUF_WRITABLE)
        except (TypeError, BufferError) as exc:
            raise BadRequest(f"out must be a writable contiguous buffer: {exc}") from None
        try:
            _range(h.size, _i64(pos), buf.len, &p, &n)
            memcpy(buf.buf, s.m.base + o + p, n)
        finally:
            PyBuffer_Release(&buf)
        return n

    def gather_into(self, list specs, out, at):
        """Copy several block ranges back to back into *out*, starting at ``at``.

        *specs* is a list of ``(seg, off, gen, pos, length)``.  Every item is checked
        (live handle, range inside its block, room in *out*) before anything is
        copied, so a failure copies nothing and raises that item's error.  The
        allocator's batch reads: one call instead of one per item.  Returns the bytes
        copied.
        """
        return self._gather(specs, None, out, at)

    def gather_reads(self, list items, dict known, out, at):
        """:meth:`gather_into` for a READ frame's items, resolved through *known*.

        *items* are ``(token, pos, length, status)`` tuples (``wire.Frame.items``);
        *known* maps tokens already verified to their parts ``(node, seg, off, gen,
        ...)``.  Returns the bytes copied, or ``None`` having copied nothing when a
        token is not in *known* (the caller verifies it the slow way).  A dead block
        or a range outside its block raises that item's error, as gather_into does.
        """
        return self._gather(items, known, out, at)

    cdef object _gather(self, list rows, dict known, out, object at):
        cdef Py_ssize_t i, count = PyList_GET_SIZE(rows)
        cdef int64_t start = _i64(at)
        cdef uint64_t o, g, p, n, total = 0
        cdef _Segment s
        cdef BlockHeader* h
        cdef Py_buffer buf
        cdef object row, seg, pos, length
        cdef PyObject* parts
        cdef char* dst
        try:
            PyObject_GetBuffer(out, &buf, PyBUF_WRITABLE)
        except (TypeError, BufferError) as exc:
            raise BadRequest(f"out must be a writable contiguous buffer: {exc}") from None
        # (source pointer, length) per item, filled by the checking pass
        cdef const char** srcs = NULL
        cdef uint64_t* lens = NULL
        try:
            if start < 0 or start > buf.len:
                raise OutOfRange(f"start {start} outside the output buffer's {buf.len} bytes")
            srcs = <const char**>PyMem_Malloc(max(count, 1) * sizeof(char*))
            lens = <uint64_t*>PyMem_Malloc(max(count, 1) * sizeof(uint64_t))
            if srcs == NULL or lens == NULL:
                raise MemoryError()
            for i in range(count):
                row = <object>PyList_GET_ITEM(rows, i)
                if known is None:
                    if type(row) is not tuple or len(row) != 5:
                        raise BadRequest("gather_into specs are (seg, off, gen, pos, length) tuples")
                    seg = <object>PyTuple_GET_ITEM(row, 0)
                    o = _handle_part(<object>PyTuple_GET_ITEM(row, 1))
                    g = _handle_part(<object>PyTuple_GET_ITEM(row, 2))
                    pos = <object>PyTuple_GET_ITEM(row, 3)
                    length = <object>PyTuple_GET_ITEM(row, 4)
                else:
                    if type(row) is not tuple or len(row) != 4:
                        raise BadRequest("gather_reads items are (token, pos, length, status) tuples")
                    parts = PyDict_GetItem(known, <object>PyTuple_GET_ITEM(row, 0))
                    if parts == NULL:
                        return None
                    if not PyTuple_Check(<object>parts) or PyTuple_GET_SIZE(<object>parts) < 4:
                        raise BadRequest("known maps tokens to (node, seg, off, gen, ...) tuples")
                    # parts is a NamedTuple: the C accessors, not its Python-level __getitem__
                    seg = <object>PyTuple_GET_ITEM(<object>parts, 1)
                    o = _handle_part(<object>PyTuple_GET_ITEM(<object>parts, 2))
                    g = _handle_part(<object>PyTuple_GET_ITEM(<object>parts, 3))
                    pos = <object>PyTuple_GET_ITEM(row, 1)
                    length = <object>PyTuple_GET_ITEM(row, 2)
                s = self._segment(seg, g, M_ACCESS)
                h = self._live(s, o, g, M_ACCESS)
                _range(h.size, _i64(pos), _i64(length), &p, &n)
                if n > <uint64_t>(buf.len - start) - total:
                    raise OutOfRange(f"item {i} does not fit the output buffer's {buf.len} bytes")
                srcs[i] = s.m.base + o + p
                lens[i] = n
                total += n
            dst = <char*>buf.buf + start
            for i in range(count):
                memcpy(dst, srcs[i], lens[i])
                dst += lens[i]
        finally:
            PyMem_Free(srcs)
            PyMem_Free(lens)
            PyBuffer_Release(&buf)
        return total

    def write(self, seg, off, gen, pos, data):
        """Copy the bytes of *data* into the block at ``pos``; returns the count."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen), p, n
        cdef _Segment s = self._segment(seg, g, M_ACCESS)
        cdef BlockHeader* h = self._live(s, o, g, M_ACCESS)
        cdef Py_buffer buf
        try:
            PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        except (TypeError, BufferError) as exc:
            raise BadRequest(f"data must be a contiguous bytes-like object: {exc}") from None
        try:
            _range(h.size, _i64(pos), buf.len, &p, &n)
            memcpy(s.m.base + o + p, buf.buf, n)
        finally:
            PyBuffer_Release(&buf)
        return n

    def size(self, seg, off, gen):
        """The requested size of a live block."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        cdef _Segment s = self._segment(seg, g, M_ACCESS)
        return self._live(s, o, g, M_ACCESS).size

    def info(self, seg, off, gen):
        """``{size, capacity, owner, generation, lease_deadline_ms}`` of a live block."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        cdef _Segment s = self._segment(seg, g, M_ACCESS)
        cdef BlockHeader* h = self._live(s, o, g, M_ACCESS)
        return {"size": h.size, "capacity": h.capacity - CANARY_SIZE, "owner": s.owner.name,
                "generation": h.generation, "lease_deadline_ms": h.lease_deadline_ms}

    def set_lease(self, seg, off, gen, deadline_ms):
        """Set (or with 0 clear) the block's lease deadline, in ms since the epoch."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        cdef uint64_t d = _u64_arg(deadline_ms, "deadline_ms")
        cdef _Segment s = self._segment(seg, g, M_ACCESS)
        cdef BlockHeader* h = self._live(s, o, g, M_ACCESS)
        if h.lease_deadline_ms and not d:
            s.leased -= 1
        elif d and not h.lease_deadline_ms:
            s.leased += 1
        h.lease_deadline_ms = d

    def expired(self, now_ms):
        """Handles of live blocks whose lease deadline is in ``(0, now_ms]``."""
        cdef uint64_t now = _u64_arg(now_ms, "now_ms"), off
        cdef BlockHeader* h
        cdef _Segment s
        out = []
        for x in self._segs:
            if x is None or (<_Segment>x).leased == 0:
                continue
            s = <_Segment>x
            off = s.m.heap_off
            while off < s.m.heap_end:
                h = _blk(&s.m, off)
                if h.state == BLOCK_USED and 0 < h.lease_deadline_ms <= now:
                    out.append((s.seg_id, off + BLOCK_HEADER, h.generation))
                off += BLOCK_HEADER + h.capacity
        return out

    def owner_segments(self, owner):
        """``[(seg_id, path, size)]`` of *owner*'s segments, for clients on this host."""
        ow = self._owners.get(owner) if isinstance(owner, str) else None
        if ow is None:
            return []
        return [((<_Segment>s).seg_id, (<_Segment>s).path, (<_Segment>s).m.size) for s in (<_Owner>ow).segments]

    def stats(self):
        """Arena-wide figures; ``fragmentation`` is ``1 - largest_free / free_bytes``."""
        cdef uint64_t free_bytes = 0, largest = 0, lf
        for x in self._segs:
            if x is None:
                continue
            free_bytes += (<_Segment>x).m.hdr.free_bytes
            lf = _largest_free(&(<_Segment>x).m)
            if lf > largest:
                largest = lf
        owners = {}
        for name, ow in self._owners.items():
            owners[name] = {"in_use": (<_Owner>ow).in_use, "blocks": (<_Owner>ow).blocks,
                            "quota": (<_Owner>ow).limit, "segments": len((<_Owner>ow).segments)}
        root = self._root
        return {
            "capacity": self._capacity,
            "mapped": self._mapped,
            "segments": sum(1 for x in self._segs if x is not None),
            "in_use": self._in_use,
            "peak_in_use": root.peak_in_use if root != NULL else 0,
            "blocks": self._blocks,
            "free_bytes": free_bytes,
            "largest_free": largest,
            "fragmentation": (1.0 - <double>largest / <double>free_bytes) if free_bytes else 0.0,
            "alloc_count": root.alloc_count if root != NULL else 0,
            "free_count": root.free_count if root != NULL else 0,
            "owners": owners,
        }

    def check(self):
        """Walk every segment (headers, canaries, bitmaps, free lists, counters).

        Raises CorruptionDetected at the first inconsistency; returns the live block count.
        """
        cdef uint64_t blocks = 0, in_use = 0
        for x in self._segs:
            if x is not None:
                self._check_segment(<_Segment>x, True)
                blocks += (<_Segment>x).m.hdr.blocks
                in_use += (<_Segment>x).m.hdr.in_use
        if blocks != self._blocks or in_use != self._in_use:
            raise CorruptionDetected(f"arena counters ({self._blocks} blocks, {self._in_use} bytes) disagree with "
                                     f"its segments ({blocks}, {in_use})", segment=0, offset=0, detail="counters")
        return blocks

    cdef int _check_segment(self, _Segment s, bint deep) except -1:
        cdef SegMap* m = &s.m
        cdef SegHeader* hdr = m.hdr
        cdef uint64_t off = m.heap_off, prev = 0, cap, nblocks = 0, used = 0, in_use = 0
        cdef uint64_t nfree = 0, free_bytes = 0, listed = 0, x, bits = 0
        cdef BlockHeader* h
        cdef bint prev_free = False
        cdef int fl, sl, f2, s2
        cdef uint64_t sid = s.seg_id
        if hdr.magic != _SEG_MAGIC or _header_problem(m) is not None:
            raise CorruptionDetected(f"segment {sid}: header damaged", segment=sid, offset=0, detail="segment header")
        while off < m.heap_end:
            h = _blk(m, off)
            cap = h.capacity
            if not _bit(m.starts, _granule(m, off)):
                bad(sid, off + BLOCK_HEADER, "block start missing from the bitmap")
            if h.magic != BLOCK_MAGIC:
                bad(sid, off + BLOCK_HEADER, "block header magic damaged")
            if h.state != BLOCK_FREE and h.state != BLOCK_USED:
                bad(sid, off + BLOCK_HEADER, "block header state damaged")
            if (cap & 15) or cap < MIN_CAPACITY or cap > m.heap_end - off - BLOCK_HEADER:
                bad(sid, off + BLOCK_HEADER, "block capacity damaged")
            if h.prev_phys != prev:
                bad(sid, off + BLOCK_HEADER, "prev_phys link wrong")
            if h.state == BLOCK_USED:
                if h.size > cap - CANARY_SIZE or h.generation == 0 or h.generation >= hdr.next_gen:
                    bad(sid, off + BLOCK_HEADER, "block size/generation damaged")
                if fab_load_u64_unaligned(m.base + off + BLOCK_HEADER + h.size) != _canary(h.generation, off):
                    bad(sid, off + BLOCK_HEADER, "trailing canary overwritten (write past the end of the block)")
                if h.owner_id != hdr.owner_hash:
                    bad(sid, off + BLOCK_HEADER, "block owner does not match its segment")
                if FABRIC_DEBUG_ENABLED and deep and not fab_is_zero(
                        m.base + off + BLOCK_HEADER + h.size + CANARY_SIZE, cap - h.size - CANARY_SIZE):
                    bad(sid, off + BLOCK_HEADER, "bytes past the canary are not zero")
                used += 1
                in_use += h.size
                prev_free = False
            else:
                if prev_free:
                    bad(sid, off + BLOCK_HEADER, "two neighbouring free blocks (missed coalescing)")
                if (FABRIC_DEBUG_ENABLED or deep) and not fab_is_zero(m.base + off + BLOCK_HEADER, cap):
                    bad(sid, off + BLOCK_HEADER, "free block not wiped")
                nfree += 1
                free_bytes += cap
                prev_free = True
            nblocks += 1
            prev = off
            off += BLOCK_HEADER + cap
        if off != m.heap_end:
            bad(sid, off, "blocks do not tile the heap")
        bits = fab_popcount(m.starts, hdr.bitmap_size)
        if bits != nblocks:
            bad(sid, 0, f"block-start bitmap has {bits} bits for {nblocks} blocks")
        # free lists: every entry is a listed FREE block of the right class, links agree
        for fl in range(FL_COUNT):
            for sl in range(SL_COUNT):
                x = hdr.heads[fl * SL_COUNT + sl]
                if (x != 0) != bool((hdr.sl_bitmap[fl] >> sl) & 1):
                    bad(sid, 0, f"TLSF bitmap disagrees with list ({fl}, {sl})")
                prev = 0
                while x:
                    if x < m.heap_off or x >= m.heap_end or (x & 15) or not _bit(m.starts, _granule(m, x)):
                        bad(sid, x, "free list points outside the blocks")
                    h = _blk(m, x)
                    if h.magic != BLOCK_MAGIC or h.state != BLOCK_FREE:
                        bad(sid, x + BLOCK_HEADER, "free list holds a block that is not free")
                    _mapping(h.capacity, &f2, &s2)
                    if f2 != fl or s2 != sl:
                        bad(sid, x + BLOCK_HEADER, "free block in the wrong list")
                    if h.lease_deadline_ms != prev:
                        bad(sid, x + BLOCK_HEADER, "free list back link wrong")
                    listed += 1
                    if listed > nfree:
                        bad(sid, x + BLOCK_HEADER, "free lists hold more blocks than the heap (cycle?)")
                    prev = x
                    x = h.free_next
            if bool(hdr.sl_bitmap[fl]) != bool((hdr.fl_bitmap >> fl) & 1):
                bad(sid, 0, f"TLSF first-level bitmap disagrees at class {fl}")
        if listed != nfree:
            bad(sid, 0, f"{nfree} free blocks but {listed} listed")
        if (hdr.blocks, hdr.in_use, hdr.free_blocks, hdr.free_bytes) != (used, in_use, nfree, free_bytes):
            bad(sid, 0, "segment counters disagree with its blocks")
        return 0

    def close(self):
        """Unmap everything and give up the prefix; the files stay for a later Arena."""
        for x in self._segs:
            if x is not None:
                _unmap(&(<_Segment>x).m)
        self._segs = []
        self._owners = {}
        self._last_key = None
        self._last_owner = None
        self._mapped = self._in_use = self._blocks = 0
        if self._root != NULL:
            munmap(self._root, ROOT_FILE_SIZE)
            self._root = NULL
        if self._root_fd >= 0:
            unistd.close(self._root_fd)     # releases the flock
            self._root_fd = -1

    def destroy(self):
        """Unmap and unlink every file of this prefix."""
        prefix = self._prefix
        self.close()
        if prefix is None:
            return
        pat = re.compile(re.escape(prefix) + r"\.(root|[0-9]{1,19})\Z")
        for name in os.listdir(SHM_DIR):
            if pat.match(name):
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                except FileNotFoundError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self._root != NULL:
            munmap(self._root, ROOT_FILE_SIZE)
        if self._root_fd >= 0:
            unistd.close(self._root_fd)

    def __repr__(self):
        return f"<Arena {self._prefix!r} {self._blocks} blocks, {self._mapped}/{self._capacity} bytes mapped>"


cdef int bad(uint64_t sid, uint64_t at, str detail) except -1:
    raise CorruptionDetected(f"segment {sid}: {detail} (block at offset {at})", segment=sid, offset=at,
                             detail=detail)


cdef uint64_t _largest_free(SegMap* m) noexcept nogil:
    """Capacity of the largest free block of a segment (scans only the top list)."""
    cdef SegHeader* hdr = m.hdr
    cdef int fl, sl
    cdef uint64_t x, best = 0
    if m.base == NULL or hdr.fl_bitmap == 0:
        return 0
    fl = fab_fls64(hdr.fl_bitmap)
    sl = fab_fls64(hdr.sl_bitmap[fl])
    x = hdr.heads[fl * SL_COUNT + sl]
    while x:
        if _blk(m, x).capacity > best:
            best = _blk(m, x).capacity
        x = _blk(m, x).free_next
    return best


# --------------------------------------------------------------------------------------
# SegmentView
# --------------------------------------------------------------------------------------

cdef inline int _unchanged(BlockHeader* h, uint64_t gen, uint64_t size) noexcept nogil:
    """After a copy: 1 when the block is still the same live block of the same size,
    0 when it was resized (retry), -1 when it was freed or reused."""
    fab_fence_acquire()        # the copy's loads happen before these
    if fab_load_acquire_u32(&h.magic) != BLOCK_MAGIC or fab_load_acquire_u16(&h.state) != BLOCK_USED \
            or fab_load_acquire_u64(&h.generation) != gen:
        return -1
    return 1 if fab_load_acquire_u64(&h.size) == size else 0


cdef class SegmentView:
    """One arena segment mapped by another process (the client's local fast path).

    It validates each handle exactly like the Arena, copies, then re-checks the block
    header after an acquire fence: a block freed or reused during the copy raises
    StaleHandle instead of returning wrong bytes.  It never changes metadata.

    Example::

        view = SegmentView(path)            # from Arena.owner_segments() / the attach reply
        data = view.read(off, gen)
    """

    def __init__(self, path):
        cdef int fd
        cdef uint64_t size
        if self.m.base != NULL:
            raise BadRequest("SegmentView.__init__ called twice")
        p = os.fspath(path)
        _open_file(os.fsencode(p), cfcntl.O_RDWR, &fd)
        try:
            size = _file_size(fd)
            if size < SEG_HEADER_SIZE:
                raise BadRequest(f"{p} is not a fabric segment ({size} bytes)")
            _map_fd(fd, size, &self.m)
        finally:
            unistd.close(fd)
        if fab_load_acquire_u64(&self.m.hdr.magic) != _SEG_MAGIC:
            _unmap(&self.m)
            raise BadRequest(f"{p} is not a fabric segment (bad magic)")
        problem = _header_problem(&self.m)
        if problem is not None:
            sid = self.m.hdr.seg_id
            _unmap(&self.m)
            raise CorruptionDetected(f"segment {p}: {problem}", segment=sid, offset=0, detail=problem)
        self.seg_id = self.m.hdr.seg_id
        self.path = p

    cdef BlockHeader* _live(self, uint64_t off, uint64_t gen) except NULL:
        cdef BlockHeader* h = NULL
        cdef int code
        if self.m.base == NULL:
            raise BadRequest("the segment view is closed")
        code = _probe(&self.m, off, gen, &h)
        if code == P_BAD_MAGIC or code == P_BAD_CANARY or code == P_BAD_GEOMETRY:
            # the allocator may have absorbed or resized this block while we looked:
            # only a second, stable reading counts as corruption
            fab_fence_acquire()
            code = _probe(&self.m, off, gen, &h)
        if code != P_LIVE:
            _raise_probe(code, self.seg_id, off, gen, M_ACCESS)
        return h

    def read(self, off, gen, pos=0, length=-1):
        """Like ``Arena.read`` for a block of this segment."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen), p, n, size
        cdef int64_t ps = _i64(pos), ln = _i64(length)
        cdef BlockHeader* h
        cdef int attempt, r
        for attempt in range(8):
            h = self._live(o, g)
            size = fab_load_acquire_u64(&h.size)
            _range(size, ps, ln, &p, &n)
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
            memcpy(PyBytes_AS_STRING(out), self.m.base + o + p, n)
            r = _unchanged(h, g, size)
            if r > 0:
                return out
            if r < 0:
                break
        _raise_probe(P_STALE, self.seg_id, o, g, M_ACCESS)

    cdef uint64_t _copy(self, uint64_t o, uint64_t g, int64_t ps, char* buf, Py_ssize_t length,
                        bint into_block) except? 0xFFFFFFFFFFFFFFFF:
        """Copy *length* bytes between *buf* and the block at ``ps``, seqlock style.

        The handle is validated before the copy and the header re-checked after it;
        a block freed or reused meanwhile raises StaleHandle.  Returns the count.
        """
        cdef uint64_t p, n = 0, size
        cdef BlockHeader* h
        cdef int attempt, r = -1
        for attempt in range(8):
            h = self._live(o, g)
            size = fab_load_acquire_u64(&h.size)
            _range(size, ps, length, &p, &n)
            if into_block:
                memcpy(self.m.base + o + p, buf, n)
            else:
                memcpy(buf, self.m.base + o + p, n)
            r = _unchanged(h, g, size)
            if r != 0:
                break
        if r <= 0:
            _raise_probe(P_STALE, self.seg_id, o, g, M_ACCESS)
        return n

    def read_into(self, off, gen, pos, out):
        """Like ``Arena.read_into`` for a block of this segment."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        cdef int64_t ps = _i64(pos)
        cdef Py_buffer buf
        try:
            PyObject_GetBuffer(out, &buf, PyBUF_WRITABLE)
        except (TypeError, BufferError) as exc:
            raise BadRequest(f"out must be a writable contiguous buffer: {exc}") from None
        try:
            return self._copy(o, g, ps, <char*>buf.buf, buf.len, False)
        finally:
            PyBuffer_Release(&buf)

    def write(self, off, gen, pos, data):
        """Like ``Arena.write`` for a block of this segment.

        A write racing a free of the same block is the caller's bug; it is reported
        (StaleHandle) but the bytes may already have landed in the freed block.
        """
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        cdef int64_t ps = _i64(pos)
        cdef Py_buffer buf
        try:
            PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        except (TypeError, BufferError) as exc:
            raise BadRequest(f"data must be a contiguous bytes-like object: {exc}") from None
        try:
            return self._copy(o, g, ps, <char*>buf.buf, buf.len, True)
        finally:
            PyBuffer_Release(&buf)

    def size(self, off, gen):
        """The requested size of a live block of this segment."""
        cdef uint64_t o = _handle_part(off), g = _handle_part(gen)
        return fab_load_acquire_u64(&self._live(o, g).size)

    def close(self):
        """Unmap the segment (the file stays)."""
        _unmap(&self.m)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        _unmap(&self.m)

    def __repr__(self):
        return f"<SegmentView {self.path!r} seg {self.seg_id}>"


# The on-shm structures must have the sizes the layout is built on.
assert sizeof(BlockHeader) == BLOCK_HEADER, sizeof(BlockHeader)
assert sizeof(SegHeader) <= SEG_HEADER_SIZE, sizeof(SegHeader)
assert sizeof(RootHeader) <= ROOT_FILE_SIZE
assert FL_COUNT * SL_COUNT == 640
