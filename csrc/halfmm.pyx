# cython: language_level=3, boundscheck=False, wraparound=False
"""The CPU engine's native kernels: products of rows with a bf16/fp16 weight (csrc/halfmm.h),
the attention of decode steps (csrc/attention.h), RMS norm and rotary embedding (csrc/rowops.h).

``butterfly.engine.model`` owns the tensors, checks their shapes, dtypes and contiguity, and passes
their addresses; this module only runs the kernels on them without the GIL, on torch's OpenMP team
when ``bind_threads`` found it. Their plain twins are torch's own operators (``F.linear``,
``F.scaled_dot_product_attention``, the norm's and rotary's operator chains): the engine's tests run
on both.

Must not: keep a pointer past a call, or allocate anything.
"""

from libc.stdint cimport int64_t, uint16_t, uintptr_t


cdef extern from "halfmm.h" nogil:
    ctypedef struct hk_job:
        const void *x
        const uint16_t *w
        const void *b
        void *y
        float *scratch
        int m, k, n, fp16, x_dtype, b_dtype, y_dtype
    enum: HK_MAX_JOBS
    int hk_available()
    int hk_bind_openmp()
    void hk_run(const hk_job *jobs, int count, int threads)


cdef extern from "rowops.h" nogil:
    void hr_rms_norm(const void *x, const void *w, void *y, int m, int n, int dtype, float eps)
    void hr_rope(void *q, const void *cos, const void *sin, int rows, int heads, int d, int dtype)


cdef extern from "attention.h" nogil:
    int HA_MAX_HEAD_DIM
    ctypedef struct ha_job:
        int n, heads, kv_heads, head_dim, dtype, layer, window
        float scale
        const void *q
        const void *k
        const void *v
        const int64_t *caches
        const int64_t *capacity
        const int64_t *pos
        void *out
    void ha_run(const ha_job *job, int threads)


def _runs_here(what):
    if not hk_available():
        raise RuntimeError(f"this CPU lacks AVX2, FMA or F16C: the {what} cannot run here")


MAX_HEAD_DIM = HA_MAX_HEAD_DIM
"""The widest head ``decode_attention`` computes."""


def available():
    """True when this CPU has AVX2, FMA and F16C (the kernel's instructions)."""
    return bool(hk_available())


def bind_threads():
    """Borrow torch's OpenMP team (call after importing torch); False: the kernel runs on the caller
    alone."""
    return bool(hk_bind_openmp())


def matmul(
    uintptr_t x, int m, int k, uintptr_t w, uintptr_t b, uintptr_t y, int n, bint fp16, int threads,
    int y_dtype=0, int x_dtype=0, int b_dtype=0, uintptr_t scratch=0,
):
    """y = x @ w.T (+ b); addresses of contiguous tensors of the shapes given (w bf16, or fp16 with
    ``fp16``; b: 0 for none; x, b and y of dtype codes ``x_dtype``, ``b_dtype`` and ``y_dtype``: 0
    float32, 1 bf16, 2 fp16), the output columns split over ``threads`` of torch's team. An x of half
    precision is widened first into ``scratch``, m * k float32 of the caller's. See csrc/halfmm.h for
    the order of the sums, which no split changes."""
    matmuls(x, m, k, x_dtype, scratch, threads, ((w, b, b_dtype, y, y_dtype, n, fp16),))


def matmuls(uintptr_t x, int m, int k, int x_dtype, uintptr_t scratch, int threads, products):
    """``matmul`` of one x by up to four weights in one parallel region (their output columns split
    over the team together): ``products`` holds (w, b, b_dtype, y, y_dtype, n, fp16) for each."""
    cdef hk_job jobs[HK_MAX_JOBS]
    cdef int count = len(products), i = 0
    if not 1 <= count <= HK_MAX_JOBS:
        raise ValueError(f"bad count: {count} products (1 to {HK_MAX_JOBS})")
    if m < 1 or k < 1 or threads < 1 or not 0 <= x_dtype <= 2 or (x_dtype and not scratch):
        raise ValueError(f"bad input: m={m} k={k} threads={threads} x_dtype={x_dtype} scratch={scratch:#x}")
    for w, b, b_dtype, y, y_dtype, n, fp16 in products:
        if n < 1 or not (0 <= b_dtype <= 2 and 0 <= y_dtype <= 2):
            raise ValueError(f"bad product {i}: n={n} b_dtype={b_dtype} y_dtype={y_dtype}")
        jobs[i].x = <const void *><uintptr_t>x
        jobs[i].w = <const uint16_t *><uintptr_t>w
        jobs[i].b = <const void *><uintptr_t>b
        jobs[i].y = <void *><uintptr_t>y
        jobs[i].scratch = <float *>scratch
        jobs[i].m = m
        jobs[i].k = k
        jobs[i].n = n
        jobs[i].fp16 = fp16
        jobs[i].x_dtype = x_dtype
        jobs[i].b_dtype = b_dtype
        jobs[i].y_dtype = y_dtype
        i += 1
    _runs_here("half-precision kernel")
    with nogil:
        hk_run(jobs, count, threads)


def decode_attention(
    uintptr_t q, uintptr_t k, uintptr_t v, int n, int heads, int kv_heads, int head_dim, int dtype,
    uintptr_t caches, uintptr_t capacity, uintptr_t pos, int layer, int window, float scale,
    uintptr_t out, int threads,
):
    """One layer's attention for ``n`` sequences of one new token each: writes each one's key and
    value into its cache at ``pos[i]``, then ``out`` ([n][heads][head_dim] of the dtype; head_dim at
    most ``MAX_HEAD_DIM``). ``caches``, ``capacity`` and ``pos``: addresses of int64 arrays of n (each
    cache tensor's address, its capacity, the new token's position); dtype 0 float32, 1 bf16, 2 fp16;
    window <= 0: none. See csrc/attention.h for the order of the sums."""
    if (
        n < 1 or heads < 1 or kv_heads < 1 or not 1 <= head_dim <= HA_MAX_HEAD_DIM or heads % kv_heads
        or not 0 <= dtype <= 2
    ):
        raise ValueError(f"bad shape: n={n} heads={heads} kv_heads={kv_heads} head_dim={head_dim} dtype={dtype}")
    _runs_here("attention kernel")
    cdef ha_job job
    job.n = n
    job.heads = heads
    job.kv_heads = kv_heads
    job.head_dim = head_dim
    job.dtype = dtype
    job.layer = layer
    job.window = window
    job.scale = scale
    job.q = <const void *>q
    job.k = <const void *>k
    job.v = <const void *>v
    job.caches = <const int64_t *>caches
    job.capacity = <const int64_t *>capacity
    job.pos = <const int64_t *>pos
    job.out = <void *>out
    with nogil:
        ha_run(&job, threads)


def _dtype_ok(int dtype):
    if not 0 <= dtype <= 2:
        raise ValueError(f"bad dtype {dtype} (0 float32, 1 bf16, 2 fp16)")
    _runs_here("row kernels")


def rms_norm(uintptr_t x, uintptr_t w, uintptr_t y, int m, int n, int dtype, float eps):
    """y = w * dtype(x * rsqrt(mean(x^2) + eps)) a row at a time: x and y [m][n] (y may be x), w [n],
    contiguous, all of ``dtype`` (0 float32, 1 bf16, 2 fp16). See csrc/rowops.h."""
    if m < 1 or n < 1:
        raise ValueError(f"bad shape: m={m} n={n}")
    _dtype_ok(dtype)
    with nogil:
        hr_rms_norm(<const void *>x, <const void *>w, <void *>y, m, n, dtype, eps)


def rope(uintptr_t q, uintptr_t cos, uintptr_t sin, int rows, int heads, int d, int dtype):
    """In place: q = q * cos + rotate_half(q) * sin, q [rows][heads][d], cos and sin [rows][d],
    contiguous, all of ``dtype``. See csrc/rowops.h."""
    if rows < 1 or heads < 1 or d < 2 or d % 2:
        raise ValueError(f"bad shape: rows={rows} heads={heads} d={d} (d even)")
    _dtype_ok(dtype)
    with nogil:
        hr_rope(<void *>q, <const void *>cos, <const void *>sin, rows, heads, d, dtype)
