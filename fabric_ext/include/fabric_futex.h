/* fabric_futex.h -- the waiting primitives of the SPSC ring (fabric_ext.ring).
 *
 * Futexes here are SHARED (no FUTEX_PRIVATE_FLAG): the word lives in a MAP_SHARED
 * /dev/shm mapping and the waker is usually another process.  Besides futex wait and
 * wake this header holds the few atomics the ring's sleep protocol needs beyond
 * fabric_atomic.h (a full fence, fetch-or, compare-exchange, relaxed counters), the
 * spin hint and a monotonic clock, so Cython code never spells a memory order.
 */
#ifndef FABRIC_FUTEX_H
#define FABRIC_FUTEX_H

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

/* Sleep while *word == expected, at most timeout_ns (< 0: no limit).  Returns 0 when
 * woken (or spuriously), else -1 with errno EAGAIN (the word changed before we slept),
 * ETIMEDOUT or EINTR (a signal arrived; the caller checks for it). */
static inline int fab_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000LL);
        ts.tv_nsec = (long)(timeout_ns % 1000000000LL);
        tp = &ts;
    }
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, tp, NULL, 0);
}

/* Wake up to n sleepers on word; returns how many were woken (or -1). */
static inline int fab_futex_wake(uint32_t *word, int n)
{
    return (int)syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
}

static inline void fab_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline int64_t fab_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The Dekker step of the sleep protocol: a store, then a load of another location,
 * must not be reordered (store-load), which acquire/release alone does not forbid. */
static inline void fab_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint32_t fab_fetch_or_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t fab_fetch_add_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int fab_cas_u32(uint32_t *p, uint32_t *expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint32_t fab_load_relaxed_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint64_t fab_load_relaxed_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
/* A counter with one writer (its side of the ring), read by anyone: no RMW needed. */
static inline void fab_bump_u64(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

#endif /* FABRIC_FUTEX_H */
