/* Products of float32 activation rows with a bf16 or fp16 weight, for the CPU engine's decode steps.
 *
 * y[i][j] = sum_t x[i][t] * w[j][t] (+ b[j]): x float32 [m][k], w bf16/fp16 [n][k] (row-major, as a
 * Linear layer stores it), y float32 [m][n]. torch's own CPU kernel for half-precision weights works a
 * row at a time on CPUs without AVX-512 BF16 or AMX: 8 rows cost 8 times one. Here each weight row is
 * widened once into a float32 buffer that stays in L1 and every activation row is multiplied with it,
 * so a batch reads the weight once.
 *
 * Every y[i][j] is summed in one fixed order, whatever m, the rows beside it, the output range or the
 * thread that computes it: four 8-lane float32 accumulators over t in steps of 32, t's tail by 8 into
 * the first, the accumulators added (0+1)+(2+3), the 8 lanes reduced in a fixed order, then t's last
 * elements one by one, then the bias. So a sequence's activations come out bit-identical alone or
 * beside others (the engine promises each request the tokens it would get alone).
 *
 * x86-64 with AVX2, FMA and F16C only (hk_available() says); built for any x86-64 (the functions carry
 * their own target), elsewhere an empty stub: the engine then uses torch's kernel. */
#ifndef BUTTERFLY_HALFMM_H
#define BUTTERFLY_HALFMM_H
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One call: x [m][k], w [n][k], b [n] or NULL, y [m][n]; failed is set by a part that could not
 * allocate its weight row. */
typedef struct {
    const float *x;
    const uint16_t *w;
    const float *b;
    float *y;
    int m, k, n, fp16;
    volatile int failed;
} hk_job;

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HK_TARGET __attribute__((target("avx2,fma,f16c")))

HK_TARGET static inline __m256 hk_widen8(const uint16_t *p, int fp16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (fp16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

HK_TARGET static inline float hk_widen1(uint16_t h, int fp16) {
    if (fp16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

HK_TARGET static inline float hk_finish(__m256 a0, __m256 a1, __m256 a2, __m256 a3, const float *x,
                                         const float *wrow, int k8, int k) {
    __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float r = _mm_cvtss_f32(s);
    for (int t = k8; t < k; t++) r += x[t] * wrow[t];
    return r;
}

/* Rows i and i+1 share each load of the weight row; the arithmetic per output is that of one row. */
HK_TARGET static void hk_two(const float *x0, const float *x1, const float *wrow, int k, float *y0,
                             float *y1) {
    int k32 = k & ~31, k8 = k & ~7;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    for (int t = 0; t < k32; t += 32) {
        __m256 w0 = _mm256_loadu_ps(wrow + t), w1 = _mm256_loadu_ps(wrow + t + 8);
        __m256 w2 = _mm256_loadu_ps(wrow + t + 16), w3 = _mm256_loadu_ps(wrow + t + 24);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t), w0, a0);
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + t), w0, c0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t + 8), w1, a1);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + t + 8), w1, c1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t + 16), w2, a2);
        c2 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + t + 16), w2, c2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t + 24), w3, a3);
        c3 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + t + 24), w3, c3);
    }
    for (int t = k32; t < k8; t += 8) {
        __m256 w0 = _mm256_loadu_ps(wrow + t);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t), w0, a0);
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + t), w0, c0);
    }
    *y0 = hk_finish(a0, a1, a2, a3, x0, wrow, k8, k);
    *y1 = hk_finish(c0, c1, c2, c3, x1, wrow, k8, k);
}

HK_TARGET static void hk_one(const float *x0, const float *wrow, int k, float *y0) {
    int k32 = k & ~31, k8 = k & ~7;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int t = 0; t < k32; t += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t), _mm256_loadu_ps(wrow + t), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t + 8), _mm256_loadu_ps(wrow + t + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t + 16), _mm256_loadu_ps(wrow + t + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t + 24), _mm256_loadu_ps(wrow + t + 24), a3);
    }
    for (int t = k32; t < k8; t += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + t), _mm256_loadu_ps(wrow + t), a0);
    *y0 = hk_finish(a0, a1, a2, a3, x0, wrow, k8, k);
}

/* Output columns [j0, j1) of y; wrow: scratch of k floats. */
HK_TARGET static void hk_matmul(const float *x, int m, int k, const uint16_t *w, const float *b,
                                float *y, int n, int fp16, float *wrow, int j0, int j1) {
    int k8 = k & ~7;
    for (int j = j0; j < j1; j++) {
        const uint16_t *wj = w + (size_t)j * k;
        for (int t = 0; t < k8; t += 8) _mm256_storeu_ps(wrow + t, hk_widen8(wj + t, fp16));
        for (int t = k8; t < k; t++) wrow[t] = hk_widen1(wj[t], fp16);
        float bias = b ? b[j] : 0.0f;
        int i = 0;
        for (; i + 1 < m; i += 2) {
            float y0, y1;
            hk_two(x + (size_t)i * k, x + (size_t)(i + 1) * k, wrow, k, &y0, &y1);
            y[(size_t)i * n + j] = y0 + bias;
            y[(size_t)(i + 1) * n + j] = y1 + bias;
        }
        if (i < m) {
            float y0;
            hk_one(x + (size_t)i * k, wrow, k, &y0);
            y[(size_t)i * n + j] = y0 + bias;
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

static void hk_part(hk_job *job, int part, int parts) {
    int j0 = (int)((int64_t)job->n * part / parts), j1 = (int)((int64_t)job->n * (part + 1) / parts);
    if (j0 == j1) return;
    float *wrow = (float *)malloc(sizeof(float) * (size_t)job->k);
    if (wrow == NULL) {
        job->failed = 1;
        return;
    }
    hk_matmul(job->x, job->m, job->k, job->w, job->b, job->y, job->n, job->fp16, wrow, j0, j1);
    free(wrow);
}

static void hk_team_part(void *p) { hk_part((hk_job *)p, hk_omp_thread_num(), hk_omp_num_threads()); }

/* 0, or -1 when a part could not allocate its k floats. */
static int hk_run(hk_job *job, int threads) {
    job->failed = 0;
    if (threads > 1 && hk_gomp_parallel != NULL)
        hk_gomp_parallel(hk_team_part, job, (unsigned)threads, 0);
    else
        hk_part(job, 0, 1);
    return job->failed ? -1 : 0;
}
#else
static int hk_available(void) { return 0; }
static int hk_bind_openmp(void) { return 0; }
static int hk_run(hk_job *job, int threads) { (void)job; (void)threads; return -1; }
#endif
#endif
