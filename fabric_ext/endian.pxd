# C-level declarations of fabric_ext/include/fabric_endian.h: little-endian loads and stores that make no
# alignment assumption, and FABRIC_ASSERT (a check in FABRIC_DEBUG builds, nothing otherwise).
#
# Declarations only (no module behind them): the codecs `cimport fabric_ext.endian` instead of each
# repeating the extern block.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "fabric_endian.h":
    uint8_t fabric_load_u8(const void* p) nogil
    uint16_t fabric_load_le16(const void* p) nogil
    uint32_t fabric_load_le32(const void* p) nogil
    uint64_t fabric_load_le64(const void* p) nogil
    void fabric_store_u8(void* p, uint8_t v) nogil
    void fabric_store_le16(void* p, uint16_t v) nogil
    void fabric_store_le32(void* p, uint32_t v) nogil
    void fabric_store_le64(void* p, uint64_t v) nogil
    void FABRIC_ASSERT(bint cond) nogil
