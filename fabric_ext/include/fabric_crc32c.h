/* fabric_crc32c.h -- CRC32C (Castagnoli, reflected polynomial 0x82F63B78) for the ring.
 *
 * fab_crc32c(crc, p, n) continues a CRC: pass 0 to start, and the previous result to
 * extend it over the next piece, so a record written from two parts (push_parts) gets
 * the same checksum as the concatenation.  Pre- and post-inversion are done inside, as
 * in zlib's crc32(), so fab_crc32c(0, "123456789", 9) == 0xE3069283 (RFC 3720 B.4).
 *
 * On x86-64 CPUs with SSE4.2 the crc32 instruction is used (8 bytes a step), chosen
 * once at run time; elsewhere a byte-wise table (built on first use) computes the
 * same value.
 */
#ifndef FABRIC_CRC32C_H
#define FABRIC_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FAB_CRC32C_POLY 0x82F63B78u

static uint32_t fab_crc32c_table[256];
static int fab_crc32c_table_ready = 0;

static void fab_crc32c_init_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ FAB_CRC32C_POLY : c >> 1;
        fab_crc32c_table[i] = c;
    }
    /* Benign race: two threads may both build the identical table. */
    __atomic_store_n(&fab_crc32c_table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t fab_crc32c_sw(uint32_t crc, const void *buf, size_t n)
{
    const uint8_t *p = (const uint8_t *)buf;
    if (!__atomic_load_n(&fab_crc32c_table_ready, __ATOMIC_ACQUIRE))
        fab_crc32c_init_table();
    crc = ~crc;
    while (n--)
        crc = fab_crc32c_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
__attribute__((target("sse4.2")))
static uint32_t fab_crc32c_hw(uint32_t crc, const void *buf, size_t n)
{
    const uint8_t *p = (const uint8_t *)buf;
    uint64_t c = ~crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);  /* unaligned-safe */
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = _mm_crc32_u8(c32, *p++);
    return ~c32;
}

static int fab_crc32c_hw_state = -1;  /* -1 unknown, 0 no, 1 yes */

static inline int fab_crc32c_has_hw(void)
{
    int s = __atomic_load_n(&fab_crc32c_hw_state, __ATOMIC_RELAXED);
    if (s < 0) {
        __builtin_cpu_init();
        s = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        __atomic_store_n(&fab_crc32c_hw_state, s, __ATOMIC_RELAXED);
    }
    return s;
}

static inline uint32_t fab_crc32c(uint32_t crc, const void *buf, size_t n)
{
    return fab_crc32c_has_hw() ? fab_crc32c_hw(crc, buf, n) : fab_crc32c_sw(crc, buf, n);
}
#else
static inline uint32_t fab_crc32c(uint32_t crc, const void *buf, size_t n) { return fab_crc32c_sw(crc, buf, n); }
#endif

#endif /* FABRIC_CRC32C_H */
