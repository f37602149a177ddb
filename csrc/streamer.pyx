# cython: language_level=3, boundscheck=False, wraparound=False
"""Native streaming engine: reads a table of chunks from file descriptors straight into a writable
buffer (the arena) on C threads, xxh3-hashing each chunk while it is still in cache.

This module owns the C threads, their locking, the GIL handling and the last line of bounds checks
(every chunk must lie inside the exported arena). Its behaviour is exactly that of the plain twin
``_run_python`` in ``butterfly/weights/streamer.py``, which plans the chunks, validates jobs, turns the
failure tuple returned here into exceptions, and which the same tests run against.

It must not open or close file descriptors, hold a buffer or a thread beyond one call (every thread is
joined before the arena's export is released, whatever happens), or call Python from a C thread.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_IsContiguous, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EINTR, ETIMEDOUT, errno
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.mman cimport madvise
from posix.signal cimport sigfillset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport sigset_t
from posix.unistd cimport pread, sysconf, _SC_PAGESIZE

from streamer_decls cimport (
    XXH3_64bits_digest,
    XXH3_64bits_reset,
    XXH3_INITSTATE,
    XXH3_state_t,
    bf_chunk,
    bf_xxh3_64,
    bf_xxh3_update,
    bf_stream,
    pthread_cond_destroy,
    pthread_cond_init,
    pthread_cond_signal,
    pthread_cond_timedwait,
    pthread_condattr_destroy,
    pthread_condattr_init,
    pthread_condattr_setclock,
    pthread_condattr_t,
    pthread_create,
    pthread_join,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
    pthread_sigmask,
    pthread_t,
)

import operator


cdef extern from "<signal.h>" nogil:
    enum:
        SIG_BLOCK
        SIG_SETMASK

cdef extern from *:
    """
    /* MADV_POPULATE_WRITE is Linux >= 5.14; older headers lack it and older kernels answer EINVAL,
     * and either way we fall back to touching one byte per page. */
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    /* Reads and writes back the same byte: faults the page in writable without changing it. The
     * volatile accesses keep the compiler from dropping the store as a no-op. */
    static inline void bf_touch(unsigned char *p) {
        volatile unsigned char *v = (volatile unsigned char *)p;
        *v = *v;
    }
    """
    int MADV_POPULATE_WRITE
    void bf_touch(unsigned char *p) nogil


# Chunk status; the Python twin uses the same meanings under names (see _run_python).
cdef enum:
    ST_PENDING = 0
    ST_OK = 1
    ST_MISMATCH = 2
    ST_SHORT = 3
    ST_ERRNO = 4

# A single pread() on Linux returns at most 0x7ffff000 bytes; staying far below keeps every piece
# one syscall and (at the default) inside a core's L2, where xxh3 reads it back.
MAX_SUB_BYTES = 1 << 30


cdef void _read_chunk(unsigned char *arena, bf_chunk *c, size_t sub_bytes) noexcept nogil:
    """Read chunk ``c`` into the arena in pieces of ``sub_bytes``, feeding each piece to xxh3 right after
    it lands (still in L2), and set its status. Touches only ``c`` and ``c``'s arena range."""
    cdef XXH3_state_t state
    cdef unsigned char *dst
    cdef size_t got = 0
    cdef size_t piece
    cdef size_t piece_got
    cdef ssize_t r
    XXH3_INITSTATE(&state)
    XXH3_64bits_reset(&state)
    # In bounds: run() checked arena_offset + length <= the arena's exported length before any thread
    # started, and the export pins the mapping until every thread is joined.
    dst = arena + c.arena_offset
    while got < c.length:
        piece = c.length - got
        if piece > sub_bytes:
            piece = sub_bytes
        piece_got = 0
        while piece_got < piece:
            # In bounds: got + piece_got + (piece - piece_got) = got + piece <= c.length.
            r = pread(c.fd, dst + got + piece_got, piece - piece_got,
                      <int64_t>(c.file_offset + <int64_t>(got + piece_got)))
            if r < 0:
                if errno == EINTR:
                    continue
                c.err = errno
                c.got = got + piece_got
                c.status = ST_ERRNO
                return
            if r == 0:
                c.got = got + piece_got
                c.status = ST_SHORT
                return
            piece_got += <size_t>r
        bf_xxh3_update(&state, dst + got, piece)
        got += piece
    c.got = got
    c.digest = XXH3_64bits_digest(&state)
    if c.has_expected and c.digest != c.expected:
        c.status = ST_MISMATCH
    else:
        c.status = ST_OK


cdef void *_worker(void *arg) noexcept nogil:
    """A reader thread: claims the next unclaimed chunk until none is left or the stream is stopped."""
    cdef bf_stream *s = <bf_stream *>arg
    cdef size_t i
    cdef bf_chunk *c
    while True:
        pthread_mutex_lock(&s.mu)
        if s.stop or s.next_claim >= s.n_chunks:
            pthread_mutex_unlock(&s.mu)
            return NULL
        i = s.next_claim
        s.next_claim += 1
        pthread_mutex_unlock(&s.mu)
        # In bounds: i < n_chunks, checked under the lock that hands out each index exactly once.
        c = &s.chunks[i]
        _read_chunk(s.arena, c, s.sub_bytes)
        pthread_mutex_lock(&s.mu)
        # In bounds: each of the n_chunks indices is logged once, so n_landed < n_chunks here.
        s.landed[s.n_landed] = i
        s.n_landed += 1
        if c.status == ST_SHORT or c.status == ST_ERRNO:
            # A broken source: no point reading further; chunks already claimed still land.
            s.stop = 1
        if c.status != ST_OK or s.n_landed == s.n_chunks:
            # Wake the caller only for what it must act on now; progress it collects on its timer.
            s.n_events += 1
            pthread_cond_signal(&s.landed_cv)
        pthread_mutex_unlock(&s.mu)


cdef size_t _wait_landed(bf_stream *s, size_t seen, size_t events_seen, double interval_s,
                         size_t *events) noexcept nogil:
    """Wait until an event (a failed chunk, the last chunk) or ``interval_s``; return how many chunks
    have landed. The landing log below the returned count is never rewritten, so the caller may read
    it without the lock."""
    cdef timespec deadline
    cdef double whole
    cdef size_t n
    clock_gettime(CLOCK_MONOTONIC, &deadline)
    whole = <double><long>interval_s
    deadline.tv_sec += <long>whole
    deadline.tv_nsec += <long>((interval_s - whole) * 1e9)
    if deadline.tv_nsec >= 1000000000:
        deadline.tv_sec += 1
        deadline.tv_nsec -= 1000000000
    pthread_mutex_lock(&s.mu)
    while s.n_events == events_seen and s.n_landed < s.n_chunks:
        if pthread_cond_timedwait(&s.landed_cv, &s.mu, &deadline) == ETIMEDOUT:
            break
    n = s.n_landed
    events[0] = s.n_events
    pthread_mutex_unlock(&s.mu)
    return n


cdef tuple _io_failure(bf_chunk *c, size_t i):
    if c.status == ST_SHORT:
        return ("short", i, c.got, 0)
    return ("errno", i, c.err, c.got)


cdef int _export(object obj, Py_buffer *view) except -1:
    """Export ``obj`` writable and contiguous. While exported an mmap cannot be closed nor a bytearray
    resized, so ``view.buf`` stays valid for the C threads until PyBuffer_Release."""
    PyObject_GetBuffer(obj, view, PyBUF_WRITABLE)
    if not PyBuffer_IsContiguous(view, b'C'):
        PyBuffer_Release(view)
        raise ValueError("arena must be a C-contiguous writable buffer")
    return 0


cdef int _fill_table(bf_chunk *table, list chunks, Py_ssize_t arena_len) except -1:
    cdef Py_ssize_t k
    cdef bf_chunk *c
    for k in range(len(chunks)):
        fd, file_offset, arena_offset, length, expected = chunks[k]
        fd = operator.index(fd)
        file_offset = operator.index(file_offset)
        arena_offset = operator.index(arena_offset)
        length = operator.index(length)
        # Python ints here, so no overflow can hide a chunk outside the arena.
        if fd < 0 or file_offset < 0 or arena_offset < 0 or length <= 0 or arena_offset + length > arena_len:
            raise ValueError(
                f"chunk {k} (fd {fd}, file offset {file_offset}, arena [{arena_offset}, "
                f"{arena_offset} + {length})) is invalid for an arena of {arena_len} bytes"
            )
        # In bounds: k < len(chunks), the number of entries the caller allocated.
        c = &table[k]
        c.fd = fd
        c.file_offset = file_offset
        c.arena_offset = arena_offset
        c.length = length
        if expected is None:
            c.has_expected = 0
        else:
            c.has_expected = 1
            c.expected = <uint64_t>operator.index(expected)
    return 0


def run(arena, list chunks, Py_ssize_t concurrency, Py_ssize_t sub_bytes, on_landed, cancelled,
        before_retry, double interval_s):
    """Read ``chunks`` (a list of ``(fd, file_offset, arena_offset, length, expected or None)``) into
    ``arena`` on ``concurrency`` C threads; the contract is ``_run_python``'s in
    butterfly/weights/streamer.py, and the two are interchangeable.

    ``on_landed(batch, nbytes)`` gets ``(chunk, xxh3, retried)`` for chunks that landed intact;
    ``cancelled()`` is polled and ``before_retry(chunk)`` called before a mismatched chunk is re-read,
    all on this thread. Returns None when every chunk landed, else a failure tuple
    ``(kind, chunk, a, b)``: ("cancelled", -1, 0, 0), ("mismatch", i, first_xxh3, retry_xxh3),
    ("short", i, bytes_read, 0) or ("errno", i, errno, bytes_read).
    """
    cdef Py_buffer view
    cdef bf_stream s
    cdef pthread_t *threads = NULL
    cdef pthread_condattr_t cattr
    cdef sigset_t all_signals
    cdef sigset_t old_signals
    cdef Py_ssize_t n = len(chunks)
    cdef Py_ssize_t n_threads
    cdef Py_ssize_t started = 0
    cdef Py_ssize_t k
    cdef size_t seen = 0
    cdef size_t now_landed
    cdef size_t events_seen = 0
    cdef size_t i
    cdef bf_chunk *c
    cdef int rc = 0
    cdef uint64_t first
    cdef bint mu_ready = False
    cdef bint cv_ready = False

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    if sub_bytes < 1 or sub_bytes > MAX_SUB_BYTES:
        raise ValueError(f"sub_bytes must be in [1, {MAX_SUB_BYTES}], not {sub_bytes}")
    if not (interval_s > 0.0 and interval_s <= 3600.0):
        raise ValueError(f"interval_s must be in (0, 3600], not {interval_s}")
    if n == 0:
        return None
    n_threads = concurrency if concurrency < n else n

    _export(arena, &view)
    memset(&s, 0, sizeof(s))
    try:
        s.chunks = <bf_chunk *>calloc(n, sizeof(bf_chunk))
        s.landed = <size_t *>calloc(n, sizeof(size_t))
        threads = <pthread_t *>calloc(n_threads, sizeof(pthread_t))
        if s.chunks == NULL or s.landed == NULL or threads == NULL:
            raise MemoryError()
        _fill_table(s.chunks, chunks, view.len)
        s.arena = <unsigned char *>view.buf
        s.n_chunks = n
        s.sub_bytes = sub_bytes
        if pthread_mutex_init(&s.mu, NULL) != 0:
            raise OSError("pthread_mutex_init failed")
        mu_ready = True
        # A monotonic clock for the timed wait: a wall-clock step must not stall progress reports.
        pthread_condattr_init(&cattr)
        pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC)
        rc = pthread_cond_init(&s.landed_cv, &cattr)
        pthread_condattr_destroy(&cattr)
        if rc != 0:
            raise OSError(rc, "pthread_cond_init failed")
        cv_ready = True

        # Reader threads block every signal: signals must reach a Python thread, which acts on them,
        # and a reader's pread is then never interrupted.
        sigfillset(&all_signals)
        pthread_sigmask(SIG_BLOCK, &all_signals, &old_signals)
        for k in range(n_threads):
            # In bounds: k < n_threads, the length of ``threads``.
            rc = pthread_create(&threads[k], NULL, _worker, &s)
            if rc != 0:
                break
            started += 1
        pthread_sigmask(SIG_SETMASK, &old_signals, NULL)
        if rc != 0:
            raise OSError(rc, f"cannot start reader thread {started + 1} of {n_threads}")

        while seen < <size_t>n:
            # nogil: the readers and other Python threads run while this one waits.
            with nogil:
                now_landed = _wait_landed(&s, seen, events_seen, interval_s, &events_seen)
            batch = []
            nbytes = 0
            failure = None
            while seen < now_landed:
                # In bounds: seen < now_landed <= n, and log entries below now_landed are final.
                i = s.landed[seen]
                seen += 1
                c = &s.chunks[i]
                if c.status == ST_OK:
                    batch.append((i, c.digest, False))
                    nbytes += c.length
                    continue
                if c.status != ST_MISMATCH:
                    failure = _io_failure(c, i)
                    break
                # Chunk i has landed, so no reader touches it or its arena range again: this thread
                # may re-read it while the readers carry on with other chunks.
                first = c.digest
                if before_retry is not None:
                    before_retry(i)
                c.status = ST_PENDING
                # nogil: a re-read is as slow as any read. In bounds: _fill_table checked chunk i's range
                # against the arena, whose export is held until the finally below.
                with nogil:
                    _read_chunk(s.arena, c, s.sub_bytes)
                if c.status == ST_OK:
                    batch.append((i, c.digest, True))
                    nbytes += c.length
                elif c.status == ST_MISMATCH:
                    failure = ("mismatch", i, first, c.digest)
                    break
                else:
                    failure = _io_failure(c, i)
                    break
            if batch:
                on_landed(batch, nbytes)
            if failure is not None:
                return failure
            if seen < <size_t>n and cancelled is not None and cancelled():
                return ("cancelled", -1, 0, 0)
        return None
    finally:
        if mu_ready:
            # nogil: joining waits for the reads in flight (at most one chunk per thread), and a reader
            # never needs the GIL, so holding it here could not deadlock but would stall other threads.
            with nogil:
                pthread_mutex_lock(&s.mu)
                s.stop = 1
                pthread_mutex_unlock(&s.mu)
                # In bounds: k < started <= n_threads, the length of ``threads``.
                for k in range(started):
                    pthread_join(threads[k], NULL)
        if cv_ready:
            pthread_cond_destroy(&s.landed_cv)
        if mu_ready:
            pthread_mutex_destroy(&s.mu)
        free(threads)
        free(s.landed)
        free(s.chunks)
        # Only now, with every reader joined, may the arena's export go.
        PyBuffer_Release(&view)


def xxh3_64(data):
    """XXH3-64 (seed 0) of a contiguous buffer with the vendored xxhash.h: must equal
    ``xxhash.xxh3_64_intdigest`` (a test checks), since the manifest's digests come from that."""
    cdef Py_buffer view
    cdef uint64_t h
    PyObject_GetBuffer(data, &view, 0)
    try:
        # nogil: hashing a big buffer must not stall other threads. In bounds: view.len bytes from
        # view.buf, pinned by the export until the release below.
        with nogil:
            h = bf_xxh3_64(view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return h


def prefault(buf):
    """Fault every page of the writable buffer ``buf`` in, writable, without changing its bytes.
    Returns how: "populate_write" (one madvise, Linux >= 5.14) or "touch" (a write per page).

    First-touch page faults cost several times the copy itself; taking them here, before the readers
    run, keeps them out of the load. Do not call it while another thread writes to ``buf``: the touch
    fallback writes each page's first byte back to itself."""
    cdef Py_buffer view
    cdef uintptr_t start
    cdef uintptr_t end
    cdef uintptr_t aligned
    cdef size_t page = <size_t>sysconf(_SC_PAGESIZE)
    cdef size_t off
    cdef unsigned char *p
    cdef int rc = -1
    _export(buf, &view)
    try:
        if view.len == 0:
            return "populate_write"
        p = <unsigned char *>view.buf
        start = <uintptr_t>p
        end = start + <uintptr_t>view.len
        # madvise wants a page-aligned start; the pages it covers all hold part of the buffer.
        aligned = start - start % page
        # nogil: populating gigabytes takes a while.
        with nogil:
            rc = madvise(<void *>aligned, end - aligned, MADV_POPULATE_WRITE)
            if rc != 0:
                off = 0
                while off < <size_t>view.len:
                    # In bounds: off < view.len. Each page's first byte inside the buffer.
                    bf_touch(p + off)
                    off = off + page - (<uintptr_t>(p + off)) % page
        return "populate_write" if rc == 0 else "touch"
    finally:
        PyBuffer_Release(&view)
