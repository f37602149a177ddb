# cython: language_level=3, boundscheck=False, wraparound=False
"""Native products of float32 rows with a bf16/fp16 weight (csrc/halfmm.h), for the CPU engine.

``butterfly.engine.model`` owns the tensors, checks their shapes, dtypes and contiguity, and passes
their addresses; this module only runs the kernel on them without the GIL, on torch's OpenMP team
when ``bind_threads`` found it. Its plain twin is torch's own kernel (``F.linear``): the engine's tests
run on both.

Must not: keep a pointer past a call, or allocate anything.
"""

from libc.stdint cimport uint16_t, uintptr_t


cdef extern from "halfmm.h" nogil:
    ctypedef struct hk_job:
        const float *x
        const uint16_t *w
        const float *b
        float *y
        int m, k, n, fp16
    int hk_available()
    int hk_bind_openmp()
    void hk_run(const hk_job *job, int threads)


def available():
    """True when this CPU has AVX2, FMA and F16C (the kernel's instructions)."""
    return bool(hk_available())


def bind_threads():
    """Borrow torch's OpenMP team (call after importing torch); False: the kernel runs on the caller
    alone."""
    return bool(hk_bind_openmp())


def matmul(uintptr_t x, int m, int k, uintptr_t w, uintptr_t b, uintptr_t y, int n, bint fp16, int threads):
    """y = x @ w.T (+ b), float32 out; addresses of contiguous tensors of the shapes given (b: 0 for
    none), the output columns split over ``threads`` of torch's team. See csrc/halfmm.h for the order
    of the sums, which no split changes."""
    if m < 1 or k < 1 or n < 1 or threads < 1:
        raise ValueError(f"bad shape: m={m} k={k} n={n} threads={threads}")
    cdef hk_job job
    job.x = <const float *>x
    job.w = <const uint16_t *>w
    job.b = <const float *>b
    job.y = <float *>y
    job.m = m
    job.k = k
    job.n = n
    job.fp16 = fp16
    with nogil:
        hk_run(&job, threads)
