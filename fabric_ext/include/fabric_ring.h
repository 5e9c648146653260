/* fabric_ring.h -- the shared-memory layout of fabric's SPSC ring and its sleep protocol.
 *
 * The file (see docs/ring.md for the full byte layout) is a 4096-byte header followed
 * by `capacity` bytes of data.  All integers are little-endian (native on the
 * platforms fabric runs on).  The header's fields sit on three 128-byte lines so the
 * producer's hot line (head) and the consumer's (tail) never share a cache line (128
 * also defeats the adjacent-line prefetcher).
 *
 * Sleep protocol (one futex word per direction, bit 0 = "a waiter is present", bits
 * 1..31 a wake sequence):
 *   waiter: w = fetch_or(word, 1) | 1; full fence; re-check its condition (and CLOSED);
 *           if still unmet, FUTEX_WAIT(word, w).  If the condition became true it clears
 *           the bit again with CAS(w -> w - 1).
 *   waker:  publish (release store of head/tail); full fence; if bit 0 of the word is
 *           set, CAS(w -> w + 1) (clears the bit and bumps the sequence) and FUTEX_WAKE.
 * The fences make this a Dekker pair: either the waker sees the bit, or the waiter sees
 * the published counter; and a wake between the waiter's fetch_or and its FUTEX_WAIT
 * changes the word, so the wait returns EAGAIN at once.  Without a waiter the waker
 * pays one fence and one load, never a system call.
 */
#ifndef FABRIC_RING_H
#define FABRIC_RING_H

#include <stddef.h>
#include <stdint.h>
#include <sched.h>

#include "fabric_atomic.h"
#include "fabric_futex.h"

#define FAB_RING_MAGIC 0x31474E4952424146ULL /* the bytes "FABRING1" read as little-endian u64 */
#define FAB_RING_VERSION 1u
#define FAB_RING_HEADER_SIZE 4096u
#define FAB_RING_REC_HEADER 16u
#define FAB_RING_ALIGN 16u
#define FAB_RING_WRAP 0xFFFFFFFFu       /* length of a wrap marker: continue at data offset 0 */
#define FAB_RING_CHECK_XOR 0x52C9E1A7u  /* check word = length ^ this */
#define FAB_RING_FLAG_CRC 1u
#define FAB_RING_KNOWN_FLAGS 1u
#define FAB_RING_CLOSED 1u              /* bit of `state` */
#define FAB_RING_PAUSE_NS 0             /* spin with only `pause` this long before yielding too (measured: 0 is best, see docs/ring.md) */

typedef struct {
    /* line 0 (0..127): written once by create(), except `state` */
    uint64_t magic;          /*   0 FAB_RING_MAGIC, stored last by create() */
    uint32_t version;        /*   8 FAB_RING_VERSION */
    uint32_t flags;          /*  12 FAB_RING_FLAG_CRC */
    uint64_t capacity;       /*  16 data bytes, a power of two */
    uint64_t max_record;     /*  24 largest payload, capacity / 4 */
    uint64_t header_size;    /*  32 offset of the data area, FAB_RING_HEADER_SIZE */
    uint64_t file_size;      /*  40 header_size + capacity */
    uint64_t start;          /*  48 the counters' initial value (test hook; 0 normally) */
    uint32_t state;          /*  56 FAB_RING_CLOSED once shut down */
    uint32_t pad0;           /*  60 */
    uint8_t pad1[64];        /*  64 */
    /* line 1 (128..255): written by the producer */
    uint64_t head;           /* 128 bytes ever written (monotonic, 64-bit) */
    uint32_t data_word;      /* 136 futex the consumer sleeps on (bit 0: consumer waiting) */
    uint32_t pad2;           /* 140 */
    uint64_t records_pushed; /* 144 */
    uint64_t bytes_pushed;   /* 152 payload bytes */
    uint64_t producer_waits; /* 160 times the producer slept on space_word */
    uint64_t producer_wakes; /* 168 FUTEX_WAKEs the producer issued on data_word */
    uint8_t pad3[80];        /* 176 */
    /* line 2 (256..383): written by the consumer */
    uint64_t tail;           /* 256 bytes ever consumed (monotonic, 64-bit) */
    uint32_t space_word;     /* 264 futex the producer sleeps on (bit 0: producer waiting) */
    uint32_t pad4;           /* 268 */
    uint64_t records_popped; /* 272 */
    uint64_t bytes_popped;   /* 280 payload bytes */
    uint64_t corrupt_skipped;/* 288 records (or runs of bytes) skipped as corrupt */
    uint64_t bytes_lost;     /* 296 data-area bytes skipped because of corruption */
    uint64_t consumer_waits; /* 304 times the consumer slept on data_word */
    uint64_t consumer_wakes; /* 312 FUTEX_WAKEs the consumer issued on space_word */
    uint8_t pad5[FAB_RING_HEADER_SIZE - 320];
} fab_ring_header;

_Static_assert(sizeof(fab_ring_header) == FAB_RING_HEADER_SIZE, "ring header size");
_Static_assert(offsetof(fab_ring_header, head) == 128, "head offset");
_Static_assert(offsetof(fab_ring_header, tail) == 256, "tail offset");
_Static_assert(offsetof(fab_ring_header, consumer_wakes) == 312, "consumer_wakes offset");

/* Record header, 16 bytes, at a 16-byte aligned data offset. */
typedef struct {
    uint32_t length;  /* payload bytes, or FAB_RING_WRAP */
    uint32_t check;   /* length ^ FAB_RING_CHECK_XOR */
    uint32_t crc;     /* CRC32C of the payload when FAB_RING_FLAG_CRC, else 0 */
    uint32_t pos;     /* low 32 bits of the counter at which this header starts */
} fab_ring_record;

_Static_assert(sizeof(fab_ring_record) == FAB_RING_REC_HEADER, "record header size");

static inline uint64_t fab_ring_record_size(uint64_t length)
{
    return (FAB_RING_REC_HEADER + length + FAB_RING_ALIGN - 1) & ~(uint64_t)(FAB_RING_ALIGN - 1);
}

enum { FAB_WAIT_READY = 0, FAB_WAIT_CLOSED = 1, FAB_WAIT_TIMEOUT = 2, FAB_WAIT_INTR = 3 };

/* Ready when the counter at `watch` has reached `threshold` (wrap-safe, 64-bit). */
static inline int fab_ring_reached(const uint64_t *watch, uint64_t threshold)
{
    return (int64_t)(fab_load_acquire_u64(watch) - threshold) >= 0;
}

static inline int fab_ring_closed(const fab_ring_header *h)
{
    return (fab_load_acquire_u32(&h->state) & FAB_RING_CLOSED) != 0;
}

/* Wait until *watch reaches threshold: spin with `pause` for spin_ns (yielding the CPU
 * every 16th check once FAB_RING_PAUSE_NS have passed), then sleep on the
 * futex `word` (protocol above).  deadline_ns is CLOCK_MONOTONIC (< 0: none).  Called
 * without the GIL.  Readiness wins over CLOSED, so a consumer drains what was pushed
 * before shutdown. */
static int fab_ring_wait(fab_ring_header *h, const uint64_t *watch, uint64_t threshold,
                         uint32_t *word, int64_t spin_ns, int64_t deadline_ns, uint64_t *waits)
{
    if (spin_ns > 0) {
        int64_t now = fab_now_ns();
        int64_t spin_end = now + spin_ns;
        if (deadline_ns >= 0 && deadline_ns < spin_end)
            spin_end = deadline_ns;
        int64_t pause_end = now + FAB_RING_PAUSE_NS < spin_end ? now + FAB_RING_PAUSE_NS : spin_end;
        for (unsigned i = 1;; i++) {
            if (fab_ring_reached(watch, threshold))
                return FAB_WAIT_READY;
            if (fab_ring_closed(h))
                return FAB_WAIT_CLOSED;
            if ((i & 15) == 0) {
                now = fab_now_ns();
                if (now >= spin_end)
                    break;
                /* Past the first few microseconds, give the CPU away between checks:
                 * when both ends share a core (2 cores, a busy neighbour) a pure spin
                 * would hold off the very peer it waits for. */
                if (now >= pause_end)
                    sched_yield();
            }
            fab_cpu_relax();
        }
    }
    for (;;) {
        uint32_t w = fab_fetch_or_u32(word, 1) | 1;
        fab_fence_seq_cst();
        int r = -1;
        if (fab_ring_reached(watch, threshold))
            r = FAB_WAIT_READY;
        else if (fab_ring_closed(h))
            r = FAB_WAIT_CLOSED;
        int64_t rel = -1;
        if (r < 0 && deadline_ns >= 0) {
            rel = deadline_ns - fab_now_ns();
            if (rel <= 0)
                r = FAB_WAIT_TIMEOUT;
        }
        if (r >= 0) {
            uint32_t expected = w;
            fab_cas_u32(word, &expected, w - 1);  /* withdraw; fails harmlessly if woken */
            return r;
        }
        fab_bump_u64(waits, 1);
        if (fab_futex_wait(word, w, rel) != 0 && errno == EINTR)
            return FAB_WAIT_INTR;
    }
}

/* After publishing: wake the other side if (and only if) it announced itself. */
static inline int fab_ring_wake(uint32_t *word, uint64_t *wakes)
{
    fab_fence_seq_cst();
    uint32_t w = fab_load_relaxed_u32(word);
    while (w & 1) {
        if (fab_cas_u32(word, &w, w + 1)) {
            fab_futex_wake(word, INT_MAX);
            fab_bump_u64(wakes, 1);
            return 1;
        }
    }
    return 0;
}

/* shutdown(): CLOSED, then change both words and wake everyone on them. */
static inline void fab_ring_shutdown(fab_ring_header *h)
{
    fab_fetch_or_u32(&h->state, FAB_RING_CLOSED);
    fab_fetch_add_u32(&h->data_word, 2);
    fab_fetch_add_u32(&h->space_word, 2);
    fab_futex_wake(&h->data_word, INT_MAX);
    fab_futex_wake(&h->space_word, INT_MAX);
}

#endif /* FABRIC_RING_H */
