# C-level declarations of fabric_ext.arena (the shared-memory arena allocator).
#
# The on-disk (on-/dev/shm) layout is declared here so other extensions and tools can
# cimport it; arena.pyx implements the allocator.  All offsets stored in shared memory
# are relative to the start of their segment, never pointers, so any process may map
# the segment at any address.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "fabric_atomic.h" nogil:
    uint8_t fab_load_acquire_u8(const uint8_t* p)
    uint16_t fab_load_acquire_u16(const uint16_t* p)
    uint32_t fab_load_acquire_u32(const uint32_t* p)
    uint64_t fab_load_acquire_u64(const uint64_t* p)
    void fab_store_release_u8(uint8_t* p, uint8_t v)
    void fab_store_release_u16(uint16_t* p, uint16_t v)
    void fab_store_release_u32(uint32_t* p, uint32_t v)
    void fab_store_release_u64(uint64_t* p, uint64_t v)
    void fab_fence_release()
    void fab_fence_acquire()


cdef extern from "fabric_mem.h" nogil:
    const int FABRIC_DEBUG_ENABLED       # 1 in FABRIC_DEBUG builds: extra consistency checks
    void fab_wipe(void* p, size_t n)     # zeroing the optimiser cannot remove
    uint64_t fab_load_u64_unaligned(const void* p)
    void fab_store_u64_unaligned(void* p, uint64_t v)
    int fab_fls64(uint64_t v)
    int fab_ffs64(uint64_t v)
    int fab_is_zero(const void* p, size_t n)
    uint64_t fab_popcount(const uint8_t* p, size_t n)


cdef enum:
    ARENA_VERSION = 1
    ROOT_FILE_SIZE = 4096         # bytes of <prefix>.root
    SEG_HEADER_SIZE = 8192        # bytes reserved for SegHeader at the start of a segment
    BLOCK_HEADER = 64             # hidden header before every block's data
    GRANULE = 16                  # alignment of headers, data and capacities
    CANARY_SIZE = 8               # trailing canary right after the requested bytes
    MIN_CAPACITY = 16             # smallest block capacity (holds the canary of a 0-byte block)
    MIN_SPLIT_CAPACITY = 32       # a split must leave a free block of at least this capacity
    OWNER_NAME_MAX = 64           # bytes of the owner name (utf-8, NUL padded)
    SL_LOG2 = 4                   # TLSF: log2 of second-level lists per first-level class
    SL_COUNT = 16                 # TLSF: second-level lists per first-level class
    FL_SHIFT = 8                  # TLSF: capacities below 1 << FL_SHIFT share first-level class 0
    FL_COUNT = 40                 # TLSF: first-level classes (capacities < 2**46)
    BLOCK_FREE = 0xF4EE           # BlockHeader.state of a free block
    BLOCK_USED = 0x05ED           # BlockHeader.state of an allocated block
    BLOCK_MAGIC = 0xFAB10C4B      # BlockHeader.magic


cdef struct RootHeader:
    uint64_t magic                # b"FABROOT\x01" little-endian
    uint32_t version              # ARENA_VERSION
    uint32_t header_size          # ROOT_FILE_SIZE
    uint64_t next_seg_id          # the id the next new segment gets (ids start at 1, never reused)
    uint64_t alloc_count          # successful alloc() calls, ever
    uint64_t free_count           # successful free() calls, ever
    uint64_t peak_in_use          # highest sum of requested sizes seen
    uint64_t reserved[10]         # zero; room for later fields


cdef struct SegHeader:
    uint64_t magic                # b"FABSEG\x01\x00" little-endian; written last on creation
    uint32_t version              # ARENA_VERSION
    uint32_t header_size          # SEG_HEADER_SIZE
    uint64_t total_size           # bytes of the segment file (never changes)
    uint64_t seg_id               # the <id> of the file name <prefix>.<id>
    uint64_t next_gen             # generation the next allocation takes (starts at 1)
    uint64_t heap_off             # offset of the first block header
    uint64_t heap_size            # bytes of the heap (blocks tile it exactly)
    uint64_t starts_off           # offset of the block-start bitmap (1 bit per granule of heap)
    uint64_t ever_off             # offset of the ever-a-block-start bitmap (bits are never cleared)
    uint64_t bitmap_size          # bytes of each bitmap
    uint32_t owner_hash           # FNV-1a of the owner name; copied into each block header
    uint32_t dirty                # non-zero while an operation is in flight (crash => repair on attach)
    uint64_t in_use               # sum of requested sizes of live blocks (derived, rebuilt on attach)
    uint64_t blocks               # live blocks (derived)
    uint64_t free_bytes           # sum of capacities of free blocks (derived)
    uint64_t free_blocks          # free blocks (derived)
    uint64_t reserved[8]          # zero; room for later fields
    char owner[OWNER_NAME_MAX]    # owner name, utf-8, NUL padded ("" = anonymous)
    uint64_t fl_bitmap            # TLSF: bit f set when some list of class f is non-empty
    uint32_t sl_bitmap[FL_COUNT]  # TLSF: bit s of [f] set when list (f, s) is non-empty
    uint64_t heads[640]           # TLSF: FL_COUNT * SL_COUNT list heads (header offsets, 0 = empty)


cdef struct BlockHeader:
    uint32_t magic                # BLOCK_MAGIC
    uint16_t state                # BLOCK_FREE or BLOCK_USED
    uint16_t flags                # 0 (reserved)
    uint32_t owner_id             # owner hash of the segment
    uint32_t reserved             # 0
    uint64_t size                 # USED: requested bytes; FREE: 0
    uint64_t capacity             # usable bytes up to the next header (multiple of GRANULE)
    uint64_t generation           # USED: the live handle's generation; FREE: the last one's
    uint64_t prev_phys            # header offset of the physical predecessor (0 = first block)
    uint64_t lease_deadline_ms    # USED: lease deadline (0 = none); FREE: previous block in its list
    uint64_t free_next            # FREE: next block in its TLSF list (0 = end); USED: 0


cdef struct SegMap:
    char* base                    # start of the mapping (NULL when unmapped)
    uint64_t size                 # bytes mapped (= file size = header total_size)
    SegHeader* hdr                # the segment header at base
    uint8_t* starts               # block-start bitmap
    uint8_t* ever                 # ever-a-block-start bitmap
    uint64_t heap_off             # first header offset (validated copy; the header may be damaged)
    uint64_t heap_end             # one past the last heap byte (validated copy)


cdef class _Owner:
    cdef str name                 # owner name ("" = anonymous)
    cdef bytes name_utf8          # the name as stored in segment headers
    cdef uint32_t hash            # FNV-1a of name_utf8
    cdef uint64_t limit           # quota on in_use in bytes, 0 = unlimited
    cdef bint explicit_quota      # limit came from set_quota (else from default_quota)
    cdef uint64_t in_use          # sum of requested sizes of the owner's live blocks
    cdef uint64_t blocks          # the owner's live blocks
    cdef uint64_t largest_segment # bytes of the owner's largest segment (growth doubles it)
    cdef list segments            # the owner's _Segment objects, oldest first


cdef class _Segment:
    cdef SegMap m                 # the mapping and its validated layout
    cdef uint64_t seg_id          # id in the file name
    cdef str path                 # /dev/shm/<prefix>.<id>
    cdef _Owner owner             # the one owner of every block in this segment
    cdef uint64_t leased          # live blocks with a lease (expired() skips segments without)


cdef class Arena:
    cdef str _prefix              # shm file name prefix
    cdef uint64_t _capacity       # most bytes all segments together may map
    cdef uint64_t _min_segment    # size of an owner's first segment
    cdef uint64_t _max_segment    # growth stops doubling at this size
    cdef uint64_t _default_quota  # quota of owners without set_quota (0 = unlimited)
    cdef uint64_t _mapped         # bytes of all mapped segments
    cdef uint64_t _in_use         # sum of requested sizes of live blocks
    cdef uint64_t _blocks         # live blocks
    cdef list _segs               # _Segment by seg_id (None where unknown or released)
    cdef dict _owners             # owner name -> _Owner
    cdef object _last_key         # the owner str object of the last lookup (identity cache)
    cdef _Owner _last_owner       # its _Owner
    cdef int _root_fd             # open and flock()ed while this Arena owns the prefix; -1 when closed
    cdef RootHeader* _root        # the mapped root file; NULL when closed

    cdef _Owner _owner(self, object owner)
    cdef _Owner _owner_slow(self, object owner)
    cdef _Segment _segment(self, object seg, uint64_t gen, int mode)
    cdef BlockHeader* _live(self, _Segment s, uint64_t off, uint64_t gen, int mode) except NULL
    cdef object _gather(self, list rows, dict known, out, object at)
    cdef _Segment _alloc_block(self, _Owner ow, uint64_t size, uint64_t lease, uint64_t* hoff)
    cdef uint64_t _take(self, _Segment s, uint64_t cap) except? 0
    cdef int _free_block(self, _Segment s, BlockHeader* h) except -1
    cdef _Segment _grow(self, _Owner ow, uint64_t span, uint64_t size)
    cdef uint64_t _available(self, _Owner ow, uint64_t avail)
    cdef _Segment _create_segment(self, _Owner ow, uint64_t size)
    cdef void _release_segment(self, _Segment s)
    cdef int _release_empty(self) except -1
    cdef int _check_segment(self, _Segment s, bint deep) except -1
    cdef int _rebuild(self, _Segment s) except -1
    cdef int _open_root(self) except -1
    cdef int _attach_all(self) except -1
    cdef int _attach(self, uint64_t sid) except -1
    cdef int _add_segment(self, _Segment s) except -1


cdef class SegmentView:
    cdef SegMap m                 # the mapping and its validated layout
    cdef readonly uint64_t seg_id # id of the segment, from its header
    cdef readonly str path        # the file this view maps

    cdef BlockHeader* _live(self, uint64_t off, uint64_t gen) except NULL
    cdef uint64_t _copy(self, uint64_t o, uint64_t g, int64_t ps, char* buf, Py_ssize_t length,
                        bint into_block) except? 0xFFFFFFFFFFFFFFFF
