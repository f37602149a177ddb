/* Products of float32 activation rows with a bf16 or fp16 weight, for the CPU engine's decode steps.
 *
 * y[i][j] = sum_t x[i][t] * w[j][t] (+ b[j]): x float32 [m][k], w bf16/fp16 [n][k] (row-major, as a
 * Linear layer stores it), y float32 [m][n]. torch's own CPU kernel for half-precision weights works a
 * row at a time on CPUs without AVX-512 BF16 or AMX: 8 rows cost 8 times one. Here a tile of R
 * activation rows by J weight rows (R * J <= 8) is computed at once: each weight vector is widened in a
 * register and multiplied with the R rows, each activation vector with the J weight rows, so a batch
 * reads the weight once and the arithmetic, not the loads, sets the pace. A panel of 8 weight rows
 * stays in L1/L2 while every block of rows passes over it.
 *
 * Every y[i][j] is summed in one fixed order, whatever m, the tile it falls in, the rows beside it, the
 * output range or the thread that computes it: one 8-lane float32 accumulator over t in steps of 8,
 * its lanes reduced in a fixed order, then t's last elements one by one, then the bias. So a sequence's
 * activations come out bit-identical alone or beside others (the engine promises each request the
 * tokens it would get alone).
 *
 * x86-64 with AVX2, FMA and F16C only (hk_available() says); built for any x86-64 (the functions carry
 * their own target), elsewhere an empty stub: the engine then uses torch's kernel. */
#ifndef BUTTERFLY_HALFMM_H
#define BUTTERFLY_HALFMM_H
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The dtype codes every kernel here takes (the engine's _KERNEL_DTYPES). */
enum { HK_F32 = 0, HK_BF16 = 1, HK_F16 = 2 };

/* One call: x [m][k], w [n][k], b [n] or NULL, y [m][n]. x, b and y are each float32, bf16 or fp16
 * (x_dtype, b_dtype, y_dtype: HK_ codes); each output is rounded once to nearest even, as torch's .to()
 * rounds. The tiles read float32 rows: an x of half precision is first widened (exactly) into
 * ``scratch``, m * k floats of the caller's, once per call, before the team starts. */
typedef struct {
    const void *x;
    const uint16_t *w;
    const void *b;
    void *y;
    float *scratch;
    int m, k, n, fp16, x_dtype, b_dtype, y_dtype;
} hk_job;

/* The most products of one x that hk_run takes in one call (q, k and v; gate and up). */
#define HK_MAX_JOBS 4

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HK_TARGET __attribute__((target("avx2,fma,f16c")))
#define HK_INLINE __attribute__((always_inline)) inline

HK_TARGET static HK_INLINE __m256 hk_widen8(const uint16_t *p, int fp16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (fp16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

HK_TARGET static HK_INLINE float hk_widen1(uint16_t h, int fp16) {
    if (fp16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f rounded to bf16 (fp16: 0) or fp16 (1), to nearest even as torch rounds (a NaN stays a NaN). */
HK_TARGET static HK_INLINE uint16_t hk_half1(float f, int fp16) {
    if (fp16) return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Element i of p, a tensor of dtype code ``dtype``, as float32 (8 of them); f stored there, rounded. */
HK_TARGET static HK_INLINE float hk_load1(const void *p, size_t i, int dtype) {
    if (dtype == HK_F32) return ((const float *)p)[i];
    return hk_widen1(((const uint16_t *)p)[i], dtype == HK_F16);
}

HK_TARGET static HK_INLINE __m256 hk_load8(const void *p, size_t i, int dtype) {
    if (dtype == HK_F32) return _mm256_loadu_ps((const float *)p + i);
    return hk_widen8((const uint16_t *)p + i, dtype == HK_F16);
}

HK_TARGET static HK_INLINE void hk_store1(void *p, size_t i, float f, int dtype) {
    if (dtype == HK_F32)
        ((float *)p)[i] = f;
    else
        ((uint16_t *)p)[i] = hk_half1(f, dtype == HK_F16);
}

/* The one order every output is finished in: the lanes, then t's tail (k8 <= t < k), then the bias. */
HK_TARGET static HK_INLINE float hk_finish(__m256 v, const float *x, const uint16_t *w, int k8, int k,
                                           int fp16, float bias) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float r = _mm_cvtss_f32(s);
    for (int t = k8; t < k; t++) r += x[t] * hk_widen1(w[t], fp16);
    return r + bias;
}

/* A tile of few rows (J > 1 columns: 1 to 4 rows, a decode step of few sequences) waits on memory,
 * not on arithmetic: it asks for the same place in the weight rows of the next panel (8 rows on, where
 * the next tile of these rows reads; a prefetch past the weight's end does not fault). Measured on an
 * AVX2 EPYC, 2 threads, the serving bench's shapes: 1 row 1.2-1.4x faster. Tiles of 5-8 rows wait on
 * their loads and the FMAs, and a prefetch made them 3-7% slower, so they issue none. */
#define HK_PREFETCH_ROWS 8

/* Rows [i0, i0+R) by columns [j0, j0+J) of y. R and J are constants at every call (the function is
 * inlined into hk_tile_RxJ below), so the R*J accumulators live in registers. */
HK_TARGET static HK_INLINE void hk_tile(const hk_job *job, int i0, int j0, const int R, const int J) {
    const int k = job->k, k8 = k & ~7, fp16 = job->fp16;
    const float *x = (const float *)job->x + (size_t)i0 * k; /* float32 here: see hk_run */
    const uint16_t *w = job->w + (size_t)j0 * k;
    __m256 acc[8][8];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) acc[r][j] = _mm256_setzero_ps();
    for (int t = 0; t < k8; t += 8) {
        __m256 wv[8];
        if (J > 1 && (t & 31) == 0) /* once per 64-byte line of each weight row: see HK_PREFETCH_ROWS */
            for (int j = 0; j < J; j++)
                _mm_prefetch((const char *)(w + (size_t)(j + HK_PREFETCH_ROWS) * k + t), _MM_HINT_T0);
        for (int j = 0; j < J; j++) wv[j] = hk_widen8(w + (size_t)j * k + t, fp16);
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)r * k + t);
            for (int j = 0; j < J; j++) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) {
            float out = hk_finish(acc[r][j], x + (size_t)r * k, w + (size_t)j * k, k8, k, fp16,
                                  job->b ? hk_load1(job->b, (size_t)(j0 + j), job->b_dtype) : 0.0f);
            hk_store1(job->y, (size_t)(i0 + r) * job->n + j0 + j, out, job->y_dtype);
        }
}

typedef void (*hk_tile_fn)(const hk_job *, int, int);
#define HK_TILE(R, J) \
    HK_TARGET static void hk_tile_##R##x##J(const hk_job *job, int i0, int j0) { hk_tile(job, i0, j0, R, J); }
HK_TILE(1, 8) HK_TILE(2, 4) HK_TILE(3, 2) HK_TILE(4, 2) HK_TILE(5, 1) HK_TILE(6, 1) HK_TILE(7, 1)
HK_TILE(8, 1) HK_TILE(1, 1) HK_TILE(2, 1) HK_TILE(3, 1) HK_TILE(4, 1)

/* The tile shape for a block of R rows (the most columns with R * J <= 8; measured on an AVX2 EPYC,
 * 8 rows by 1 column beats 4 by 2 by 1.25x: one widening per weight vector, the loads in the FMAs), and
 * its one-column twin for the panel's last columns. */
static const hk_tile_fn hk_tiles[9] = {NULL, hk_tile_1x8, hk_tile_2x4, hk_tile_3x2, hk_tile_4x2,
                                      hk_tile_5x1, hk_tile_6x1, hk_tile_7x1, hk_tile_8x1};
static const hk_tile_fn hk_tiles1[9] = {NULL, hk_tile_1x1, hk_tile_2x1, hk_tile_3x1, hk_tile_4x1,
                                       hk_tile_5x1, hk_tile_6x1, hk_tile_7x1, hk_tile_8x1};
static const int hk_tile_cols[9] = {0, 8, 4, 2, 2, 1, 1, 1, 1};

/* Output columns [j0, j1) of y, a panel of 8 weight rows at a time. */
static void hk_matmul(const hk_job *job, int j0, int j1) {
    for (int p = j0; p < j1; p += 8) {
        int pend = p + 8 < j1 ? p + 8 : j1;
        for (int i = 0; i < job->m; i += 8) {
            int rows = job->m - i < 8 ? job->m - i : 8, cols = hk_tile_cols[rows], j = p;
            for (; j + cols <= pend; j += cols) hk_tiles[rows](job, i, j);
            for (; j < pend; j++) hk_tiles1[rows](job, i, j);
        }
    }
}

static int hk_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* Threads: torch's own OpenMP team. A pool of our own (or a second OpenMP runtime) would compete on
 * every core with torch's workers, which spin between operators: measured, a second pool made a
 * decode step slower, not faster. So the kernel borrows the libgomp that torch has loaded (found by
 * name, never loaded here: RTLD_NOLOAD) and runs its columns as one more of torch's parallel
 * regions. Without it (another OpenMP runtime, or torch not imported), it runs on the caller alone. */
typedef void (*hk_gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*hk_omp_int_fn)(void);
static hk_gomp_parallel_fn hk_gomp_parallel;
static hk_omp_int_fn hk_omp_thread_num, hk_omp_num_threads;

static int hk_bind_openmp(void) {
    void *h = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) return 0;
    hk_gomp_parallel = (hk_gomp_parallel_fn)dlsym(h, "GOMP_parallel");
    hk_omp_thread_num = (hk_omp_int_fn)dlsym(h, "omp_get_thread_num");
    hk_omp_num_threads = (hk_omp_int_fn)dlsym(h, "omp_get_num_threads");
    if (hk_gomp_parallel == NULL || hk_omp_thread_num == NULL || hk_omp_num_threads == NULL) {
        hk_gomp_parallel = NULL;
        return 0;
    }
    return 1;
}

/* Several products of one x (q, k and v; gate and up) run as one: their output columns, back to back,
 * split over the team, so one parallel region serves them all. No split changes a sum. */
typedef struct {
    hk_job jobs[HK_MAX_JOBS];
    int count;
} hk_batch;

static void hk_part(const hk_batch *batch, int part, int parts) {
    int64_t total = 0, base = 0;
    for (int i = 0; i < batch->count; i++) total += batch->jobs[i].n;
    const int64_t c0 = total * part / parts, c1 = total * (part + 1) / parts;
    for (int i = 0; i < batch->count; i++) {
        const int64_t n = batch->jobs[i].n, lo = c0 > base ? c0 - base : 0, hi = c1 < base + n ? c1 - base : n;
        if (lo < hi) hk_matmul(&batch->jobs[i], (int)lo, (int)hi);
        base += n;
    }
}

static void hk_team_part(void *p) { hk_part((const hk_batch *)p, hk_omp_thread_num(), hk_omp_num_threads()); }

/* x's m * k elements, widened into out (a bf16 or fp16 value is exactly a float32 one). */
HK_TARGET static void hk_widen_rows(const void *x, int dtype, float *out, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, hk_load8(x, i, dtype));
    for (; i < count; i++) out[i] = hk_load1(x, i, dtype);
}

/* jobs[0 .. count) (count <= HK_MAX_JOBS), all of one x, m and k (jobs[0]'s x, x_dtype and scratch). */
static void hk_run(const hk_job *jobs, int count, int threads) {
    hk_batch batch;
    batch.count = count;
    const void *x = jobs[0].x;
    if (jobs[0].x_dtype != HK_F32) {
        hk_widen_rows(x, jobs[0].x_dtype, jobs[0].scratch, (size_t)jobs[0].m * (size_t)jobs[0].k);
        x = jobs[0].scratch;
    }
    for (int i = 0; i < count; i++) {
        batch.jobs[i] = jobs[i];
        batch.jobs[i].x = x;
        batch.jobs[i].x_dtype = HK_F32;
    }
    if (threads > 1 && hk_gomp_parallel != NULL)
        hk_gomp_parallel(hk_team_part, (void *)&batch, (unsigned)threads, 0);
    else
        hk_part(&batch, 0, 1);
}
#else
static int hk_available(void) { return 0; }
static int hk_bind_openmp(void) { return 0; }
static void hk_run(const hk_job *jobs, int count, int threads) { (void)jobs, (void)count, (void)threads; }
#endif
#endif
