/* fabric_mem.h -- memory primitives for fabric's Cython modules.
 *
 * - fab_wipe: zeroes memory in a way the compiler cannot remove as a "dead store"
 *   (a plain memset before free is exactly what optimisers delete).  glibc's
 *   explicit_bzero when available, else memset followed by a compiler barrier that
 *   makes the zeroed bytes observable.
 * - unaligned 64-bit load/store through memcpy: the arena's trailing canary sits right
 *   after the user's bytes, at any alignment; a cast-and-dereference would be UB.
 * - bit scans for the TLSF bitmaps (defined for zero, unlike the raw builtins).
 * - FABRIC_DEBUG_ENABLED: 1 in FABRIC_DEBUG builds, else 0, so Cython code can write
 *   `if FABRIC_DEBUG_ENABLED:` and the C compiler drops the branch in release builds.
 */
#ifndef FABRIC_MEM_H
#define FABRIC_MEM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef FABRIC_DEBUG
#define FABRIC_DEBUG_ENABLED 1
#else
#define FABRIC_DEBUG_ENABLED 0
#endif

static inline void fab_wipe(void *p, size_t n) {
#if defined(__GLIBC__) && defined(__USE_MISC) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 25))
    explicit_bzero(p, n);
#else
    memset(p, 0, n);
    __asm__ __volatile__("" : : "r"(p) : "memory");
#endif
}

static inline uint64_t fab_load_u64_unaligned(const void *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void fab_store_u64_unaligned(void *p, uint64_t v) { memcpy(p, &v, sizeof v); }

/* index of the highest set bit; -1 for 0 */
static inline int fab_fls64(uint64_t v) { return v ? 63 - __builtin_clzll(v) : -1; }
/* index of the lowest set bit; -1 for 0 */
static inline int fab_ffs64(uint64_t v) { return v ? __builtin_ctzll(v) : -1; }

/* 1 when n bytes at p are all zero (Arena.check() verifies the wipe with it).  Each
 * byte equal to its successor and the first one zero: memcmp does the scan, vectorised. */
static inline int fab_is_zero(const void *p, size_t n) {
    const unsigned char *c = (const unsigned char *)p;
    return n == 0 || (c[0] == 0 && memcmp(c, c + 1, n - 1) == 0);
}

/* set bits in n bytes (Arena.check() counts block-start bits) */
static inline uint64_t fab_popcount(const uint8_t *p, size_t n) {
    uint64_t total = 0, w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        total += (uint64_t)__builtin_popcountll(w);
    }
    for (; i < n; i++) total += (uint64_t)__builtin_popcount(p[i]);
    return total;
}

#endif /* FABRIC_MEM_H */
