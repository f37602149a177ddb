/* Attention of decode steps (one new token per sequence), for the CPU engine.
 *
 * For each sequence s of a step, one layer: its new key and value are written into its cache at its
 * position p, then every query head h attends over the cached positions [max(0, p - window + 1), p]
 * of its key/value head h / (heads / kv_heads):
 *     out[s][h] = sum_l softmax_l(scale * q[s][h] . k[l]) * v[l]
 * torch's scaled_dot_product_attention does the same a sequence at a time (one call each, plus the
 * slicing and copies around it: ~20 operators per sequence and layer); here the whole step is one call.
 *
 * The cache of a sequence is its KVCache tensor [layers][2][kv_heads][capacity][head_dim] (contiguous,
 * the model's dtype); q, k, v and out of the step are [n][heads or kv_heads][head_dim] in that dtype,
 * each output summed in float32 and rounded once to the dtype (to nearest even, as torch rounds its
 * own). head_dim is at most HA_MAX_HEAD_DIM (a head's sums live on the stack).
 *
 * Every (sequence, head) is computed by one thread in one fixed order, whatever the other sequences
 * of the step or the thread count: scores in float32 (the head_dim products in 8 lanes, the lanes
 * reduced in a fixed order, the tail one by one), then an online softmax over l in increasing order
 * (running maximum, sum and output rescaled when the maximum grows), then out = acc / sum. So a
 * sequence's activations come out bit-identical alone or beside others.
 *
 * Needs halfmm.h first (its target, OpenMP binding and widening). */
#ifndef BUTTERFLY_ATTENTION_H
#define BUTTERFLY_ATTENTION_H
#include <math.h>

#define HA_MAX_HEAD_DIM 1024

typedef struct {
    int n, heads, kv_heads, head_dim, dtype, layer, window; /* dtype: an HK_ code; window <= 0: none */
    float scale;
    const void *q, *k, *v;  /* [n][heads][head_dim], [n][kv_heads][head_dim] x 2 */
    const int64_t *caches;  /* address of each sequence's cache tensor */
    const int64_t *capacity;
    const int64_t *pos;     /* the position of each sequence's new token */
    void *out;              /* [n][heads][head_dim] */
} ha_job;

#if defined(__x86_64__) && defined(__GNUC__)

static size_t ha_elem(int dtype) { return dtype == HK_F32 ? 4 : 2; }

/* Sequence s's cache block (k or v) of kv head g in this layer: [capacity][head_dim]. */
static const char *ha_block(const ha_job *job, int s, int kv, int g) {
    size_t rows = (size_t)job->capacity[s] * (size_t)job->head_dim;
    size_t block = ((size_t)job->layer * 2 + (size_t)kv) * (size_t)job->kv_heads + (size_t)g;
    return (const char *)(uintptr_t)job->caches[s] + block * rows * ha_elem(job->dtype);
}

HK_TARGET static void ha_one(const ha_job *job, int s, int h) {
    const int hd = job->head_dim, hd8 = hd & ~7, dtype = job->dtype;
    const int g = h / (job->heads / job->kv_heads);
    const size_t qoff = ((size_t)s * job->heads + h) * hd;
    const char *keys = ha_block(job, s, 0, g), *vals = ha_block(job, s, 1, g);
    int64_t p = job->pos[s], from = job->window > 0 && p - job->window + 1 > 0 ? p - job->window + 1 : 0;
    float out[HA_MAX_HEAD_DIM];
    float m = -INFINITY, sum = 0.0f;
    for (int d = 0; d < hd; d++) out[d] = 0.0f;
    for (int64_t l = from; l <= p; l++) {
        const void *kl = keys + (size_t)l * hd * ha_elem(dtype), *vl = vals + (size_t)l * hd * ha_elem(dtype);
        __m256 a = _mm256_setzero_ps();
        for (int d = 0; d < hd8; d += 8)
            a = _mm256_fmadd_ps(hk_load8(job->q, qoff + d, dtype), hk_load8(kl, d, dtype), a);
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
        t = _mm_add_ss(t, _mm_movehdup_ps(t));
        float score = _mm_cvtss_f32(t);
        for (int d = hd8; d < hd; d++) score += hk_load1(job->q, qoff + d, dtype) * hk_load1(kl, d, dtype);
        score *= job->scale;
        if (score > m) {
            /* exp(-inf) = 0: the first position rescales nothing. */
            float shrink = expf(m - score);
            sum *= shrink;
            for (int d = 0; d < hd; d++) out[d] *= shrink;
            m = score;
        }
        float w = expf(score - m);
        sum += w;
        __m256 wv = _mm256_set1_ps(w);
        for (int d = 0; d < hd8; d += 8)
            _mm256_storeu_ps(out + d, _mm256_fmadd_ps(wv, hk_load8(vl, d, dtype), _mm256_loadu_ps(out + d)));
        for (int d = hd8; d < hd; d++) out[d] += w * hk_load1(vl, d, dtype);
    }
    for (int d = 0; d < hd; d++) hk_store1(job->out, qoff + d, out[d] / sum, dtype);
}

static void ha_part(const ha_job *job, int part, int parts) {
    int64_t total = (int64_t)job->n * job->heads;
    int64_t lo = total * part / parts, hi = total * (part + 1) / parts;
    for (int64_t i = lo; i < hi; i++) ha_one(job, (int)(i / job->heads), (int)(i % job->heads));
}

static void ha_team_part(void *p) { ha_part((const ha_job *)p, hk_omp_thread_num(), hk_omp_num_threads()); }

/* Writes each sequence's new key and value at its position, then computes out. */
static void ha_run(const ha_job *job, int threads) {
    size_t row = (size_t)job->head_dim * ha_elem(job->dtype);
    for (int s = 0; s < job->n; s++)
        for (int g = 0; g < job->kv_heads; g++) {
            size_t at = (size_t)job->pos[s] * row, src = ((size_t)s * job->kv_heads + g) * row;
            memcpy((char *)ha_block(job, s, 0, g) + at, (const char *)job->k + src, row);
            memcpy((char *)ha_block(job, s, 1, g) + at, (const char *)job->v + src, row);
        }
    if (threads > 1 && hk_gomp_parallel != NULL)
        hk_gomp_parallel(ha_team_part, (void *)job, (unsigned)threads, 0);
    else
        ha_part(job, 0, 1);
}
#else
static void ha_run(const ha_job *job, int threads) { (void)job; (void)threads; }
#endif
#endif
