/* Little-endian loads and stores for fabric's wire formats.
 *
 * Every multi-byte integer on fabric's wire is little-endian.  Fields are read
 * through memcpy, so a field at any byte offset is read safely on any CPU (no
 * misaligned pointer casts); on little-endian hosts the compiler turns each of
 * these into one plain load or store, on big-endian hosts into load + bswap.
 *
 * Cython code declares these in an `cdef extern from "fabric_endian.h"` block
 * and never spells byte order itself (py-pgproto's hton.h pattern).
 */
#ifndef FABRIC_ENDIAN_H
#define FABRIC_ENDIAN_H

#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#  define FABRIC_BIG_ENDIAN 1
#  define fabric_bswap16(x) __builtin_bswap16(x)
#  define fabric_bswap32(x) __builtin_bswap32(x)
#  define fabric_bswap64(x) __builtin_bswap64(x)
#else
/* GCC/Clang on little-endian hosts, and MSVC (every Windows target is little-endian). */
#  define FABRIC_BIG_ENDIAN 0
#  define fabric_bswap16(x) (x)
#  define fabric_bswap32(x) (x)
#  define fabric_bswap64(x) (x)
#endif

/* Debug-only invariant checks; compiled away unless built with FABRIC_DEBUG=1.
 * Not assert(): Python's own CFLAGS carry -DNDEBUG, which would silence it. */
#ifdef FABRIC_DEBUG
#  include <stdio.h>
#  include <stdlib.h>
#  define FABRIC_ASSERT(cond)                                                        \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: FABRIC_ASSERT(%s) failed\n", __FILE__, __LINE__, #cond); \
            abort();                                                                 \
        }                                                                            \
    } while (0)
#else
#  define FABRIC_ASSERT(cond) ((void)0)
#endif

static inline uint8_t fabric_load_u8(const void *p)
{
    uint8_t v;
    memcpy(&v, p, 1);
    return v;
}

static inline uint16_t fabric_load_le16(const void *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return (uint16_t)fabric_bswap16(v);
}

static inline uint32_t fabric_load_le32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return (uint32_t)fabric_bswap32(v);
}

static inline uint64_t fabric_load_le64(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return (uint64_t)fabric_bswap64(v);
}

static inline void fabric_store_u8(void *p, uint8_t v)
{
    memcpy(p, &v, 1);
}

static inline void fabric_store_le16(void *p, uint16_t v)
{
    v = (uint16_t)fabric_bswap16(v);
    memcpy(p, &v, sizeof v);
}

static inline void fabric_store_le32(void *p, uint32_t v)
{
    v = (uint32_t)fabric_bswap32(v);
    memcpy(p, &v, sizeof v);
}

static inline void fabric_store_le64(void *p, uint64_t v)
{
    v = (uint64_t)fabric_bswap64(v);
    memcpy(p, &v, sizeof v);
}

#endif /* FABRIC_ENDIAN_H */
