/*
 * Seqlock over one shared-memory section: a u64 sequence counter (8-byte aligned) followed by the
 * payload. One writer per section; any number of readers in any process.
 *
 * This header owns the memory ordering and the spin/timeout loop only. It must not check bounds or
 * alignment (board.pyx does that before calling, with the buffer exported so it cannot move) and
 * must not touch Python objects: everything here runs with the GIL released.
 *
 * Ordering (Boehm, "Can seqlocks get along with programming language memory models?", 2012):
 *   writer: seq = odd (relaxed); release fence; copy payload; seq = even (release store)
 *   reader: s0 = seq (acquire); copy payload; acquire fence; s1 = seq (relaxed); ok iff s0 == s1, even
 * The payload copy is a plain memcpy rather than per-word relaxed atomics, as in the Linux kernel's
 * seqcount: a racing copy may read garbage, but the reader then sees s0 != s1 and discards it.
 * On x86-64 every fence here compiles to a compiler barrier only; on ARM they emit dmb.
 */
#ifndef BUTTERFLY_SEQLOCK_H
#define BUTTERFLY_SEQLOCK_H

#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define BF_SEQ_SIZE 8
/* A writer copies a few hundred bytes, so a short spin usually outlasts it; past this many
 * failed attempts the writer is likely descheduled and we give it our CPU. */
#define BF_SPINS_BEFORE_YIELD 128

#if defined(__x86_64__) || defined(__i386__)
#define BF_CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define BF_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define BF_CPU_RELAX() __atomic_signal_fence(__ATOMIC_SEQ_CST)
#endif

static inline double bf_monotonic_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Publish `length` bytes from `payload` into `section` (counter at section[0..8), payload after).
 * memmove, not memcpy: a payload that is itself a view of the board must not be undefined. */
static inline void bf_seq_write(unsigned char *section, const unsigned char *payload, size_t length) {
    uint64_t *seq = (uint64_t *)(void *)section;
    uint64_t s = __atomic_load_n(seq, __ATOMIC_RELAXED);
    /* Already odd means the previous writer died mid-write: step by 2 so readers see a change. */
    uint64_t odd = (s & 1u) ? s + 2u : s + 1u;
    __atomic_store_n(seq, odd, __ATOMIC_RELAXED);
    /* Keeps the odd counter ordered before the payload stores below. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memmove(section + BF_SEQ_SIZE, payload, length);
    /* Release: a reader that sees the even value also sees the whole payload. */
    __atomic_store_n(seq, odd + 1u, __ATOMIC_RELEASE);
}

/* Copy a consistent payload into `out`. Returns 0, or -1 if none was seen within `timeout_s`
 * (at least one attempt is always made); `*last_seq` gets the last counter value read. */
static inline int bf_seq_read(const unsigned char *section, unsigned char *out, size_t length,
                              double timeout_s, uint64_t *last_seq) {
    const uint64_t *seq = (const uint64_t *)(const void *)section;
    double deadline = -1.0;
    unsigned long spins = 0;
    for (;;) {
        uint64_t s0 = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
        *last_seq = s0;
        if (!(s0 & 1u)) {
            memcpy(out, section + BF_SEQ_SIZE, length);
            /* Keeps the payload loads ordered before the re-check of the counter. */
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(seq, __ATOMIC_RELAXED) == s0) {
                return 0;
            }
        }
        /* The clock is only read once a first attempt failed: the common read never pays for it. */
        double now = bf_monotonic_s();
        if (deadline < 0.0) {
            deadline = now + timeout_s;
        }
        if (now >= deadline) {
            return -1;
        }
        if (++spins >= BF_SPINS_BEFORE_YIELD) {
            sched_yield();
        } else {
            BF_CPU_RELAX();
        }
    }
}

#endif /* BUTTERFLY_SEQLOCK_H */
