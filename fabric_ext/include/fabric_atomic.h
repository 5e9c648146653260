/* fabric_atomic.h -- acquire/release primitives shared by fabric's Cython modules.
 *
 * The arena's block headers and segment header live in shared memory that a client
 * process reads concurrently (fabric_ext.arena.SegmentView).  The allocator publishes
 * header fields with release stores; readers use acquire loads, and a seqlock-style
 * reader puts an acquire fence between its data copy and the re-check of the header.
 * Cython code calls these functions and never spells a memory order itself.
 *
 * Every pointer passed here is naturally aligned (headers are 16-byte aligned in a
 * page-aligned mapping), which the __atomic builtins require.
 */
#ifndef FABRIC_ATOMIC_H
#define FABRIC_ATOMIC_H

#include <stdint.h>

static inline uint8_t fab_load_acquire_u8(const uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint16_t fab_load_acquire_u16(const uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t fab_load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t fab_load_acquire_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline void fab_store_release_u8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fab_store_release_u16(uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fab_store_release_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fab_store_release_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Writer: order a header store (e.g. state = FREE) before the plain stores that follow
 * (the wipe).  Reader: order the data copy before the header re-check. */
static inline void fab_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline void fab_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }

#endif /* FABRIC_ATOMIC_H */
