# cython: language_level=3
"""C declarations cimported by ``streamer.pyx``: pthreads, the vendored xxh3 and the shared state of one
stream. Declarations only (so cimporting it adds no runtime import); every rule about who may touch
which field lives beside the code in ``streamer.pyx``."""

from libc.stdint cimport int64_t, uint64_t
from posix.time cimport timespec
from posix.types cimport sigset_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_condattr_init(pthread_condattr_t *attr)
    int pthread_condattr_setclock(pthread_condattr_t *attr, int clock_id)
    int pthread_condattr_destroy(pthread_condattr_t *attr)
    int pthread_cond_init(pthread_cond_t *cond, const pthread_condattr_t *attr)
    int pthread_cond_destroy(pthread_cond_t *cond)
    int pthread_cond_signal(pthread_cond_t *cond)
    int pthread_cond_timedwait(pthread_cond_t *cond, pthread_mutex_t *mutex, const timespec *abstime)
    int pthread_sigmask(int how, const sigset_t *newset, sigset_t *oldset)


# The vendored xxHash (csrc/third_party/xxhash, BSD-2): xxhash.h is compiled into this extension (with
# XXH_IMPLEMENTATION), and on x86-64 so is xxh_x86dispatch.c (setup.py then defines BF_XXH_DISPATCH),
# which picks the AVX-512, AVX2 or SSE2 kernel at run time: AVX-512 hashes ~27 GB/s per core here
# against ~12 for the SSE2 baseline a portable build gets, and the hash was a third of the streamer's
# per-byte work with it. Every kernel computes the same XXH3-64. -fvisibility=hidden keeps these
# symbols out of the process's namespace (the xxhash package carries its own copy).
cdef extern from *:
    """
    #define XXH_STATIC_LINKING_ONLY
    #define XXH_IMPLEMENTATION
    #include "third_party/xxhash/xxhash.h"
    #if defined(BF_XXH_DISPATCH) && BF_XXH_DISPATCH
    #include "third_party/xxhash/xxh_x86dispatch.h"
    #define bf_xxh3_64 XXH3_64bits_dispatch
    #define bf_xxh3_update XXH3_64bits_update_dispatch
    #else
    #define bf_xxh3_64 XXH3_64bits
    #define bf_xxh3_update XXH3_64bits_update
    #endif
    """
    ctypedef uint64_t XXH64_hash_t
    ctypedef struct XXH3_state_t:
        pass
    XXH64_hash_t bf_xxh3_64(const void *data, size_t length) nogil
    int XXH3_64bits_reset(XXH3_state_t *state) nogil
    int bf_xxh3_update(XXH3_state_t *state, const void *data, size_t length) nogil
    XXH64_hash_t XXH3_64bits_digest(const XXH3_state_t *state) nogil
    void XXH3_INITSTATE(XXH3_state_t *state) nogil


# One chunk: where to read it from and to, and (written by the one thread that read it) what came of it.
ctypedef struct bf_chunk:
    int fd
    int64_t file_offset
    size_t arena_offset
    size_t length
    uint64_t expected
    int has_expected
    uint64_t digest
    int status
    int err
    size_t got


# One stream: the chunk table, the claim counter and the landing log. Fields below ``mu`` are guarded
# by it; ``chunks[i]``'s result fields belong to whichever thread claimed ``i`` until it logs ``i``
# as landed, and to the calling thread after that.
ctypedef struct bf_stream:
    unsigned char *arena
    bf_chunk *chunks
    size_t n_chunks
    size_t sub_bytes
    pthread_mutex_t mu
    pthread_cond_t landed_cv
    size_t next_claim
    size_t *landed
    size_t n_landed
    size_t n_events
    int stop
