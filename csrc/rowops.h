/* The small per-row operators of a decoder layer, for the CPU engine: RMS norm and rotary embedding.
 *
 * In torch each is a chain of eager operators (RMS norm: widen, square, mean, add, rsqrt, multiply,
 * round, scale; rotary: two slices, a negation, a concatenation, two products and a sum), each with its
 * dispatch and its allocation: ~75 and ~55 us for one token here, ~1.5 ms of a decode step. Here each
 * is one call on the caller's thread, 8 lanes at a time (a step's rows are few; for a prompt's it is
 * still several times faster than torch's chain on 2 threads).
 *
 * Both compute what the engine's torch code computes, with every rounding where torch rounds:
 * - rope: out = q * cos + rotate_half(q) * sin, each product and the sum rounded to the dtype (torch
 *   computes a half-precision operator in float32 and rounds its result to nearest even): the same
 *   bits as torch's operators.
 * - rms_norm: y = w * dtype(x * rsqrt(mean(x^2) + eps)), x widened to float32 as transformers'
 *   LlamaRMSNorm does. The mean's sum is taken in double in index order (torch sums float32 in its
 *   own vector order): the same result to within an ulp of float32 before the rounding to the dtype.
 * Each row is computed alone, in one order, so a row's bits do not depend on the rows beside it.
 *
 * Needs halfmm.h first (its target and widening). */
#ifndef BUTTERFLY_ROWOPS_H
#define BUTTERFLY_ROWOPS_H
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__)

/* f rounded to the dtype and back to float32: the value a half-precision tensor would hold. */
HK_TARGET static HK_INLINE float hr_round(float f, int dtype) {
    return dtype == HK_F32 ? f : hk_widen1(hk_half1(f, dtype == HK_F16), dtype == HK_F16);
}

/* bf16 rounding of 8 lanes, to nearest even, as the bits of float32 values (NaN lanes: garbage). */
HK_TARGET static HK_INLINE __m256i hr_bf16_bits8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
}

/* hr_round for 8 lanes. */
HK_TARGET static HK_INLINE __m256 hr_round8(__m256 v, int dtype) {
    if (dtype == HK_F32) return v;
    if (dtype == HK_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    __m256 r = _mm256_castsi256_ps(_mm256_and_si256(hr_bf16_bits8(v), _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)); /* a NaN stays a NaN */
}

/* hk_store1 for 8 lanes. */
HK_TARGET static HK_INLINE void hr_store8(void *p, size_t i, __m256 v, int dtype) {
    if (dtype == HK_F32) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    __m128i h;
    if (dtype == HK_F16) {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    } else {
        __m256i b = _mm256_srli_epi32(hr_bf16_bits8(v), 16);
        b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), h);
}

/* x, y [m][n], w [n], all of the dtype; y may be x. Per row: the squares' sum in double, in 4 + 4
 * lanes over t in steps of 8, the lanes added in one order, then t's tail one by one. */
HK_TARGET static void hr_rms_norm(const void *x, const void *w, void *y, int m, int n, int dtype, float eps) {
    const int n8 = n & ~7;
    for (int i = 0; i < m; i++) {
        const size_t row = (size_t)i * (size_t)n;
        __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
        for (int t = 0; t < n8; t += 8) {
            __m256 v = hk_load8(x, row + t, dtype);
            __m256 sq = _mm256_mul_ps(v, v);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
        }
        double l[4];
        _mm256_storeu_pd(l, _mm256_add_pd(lo, hi));
        double sum = (l[0] + l[1]) + (l[2] + l[3]);
        for (int t = n8; t < n; t++) {
            float v = hk_load1(x, row + t, dtype);
            sum += (double)(v * v);
        }
        const float r = 1.0f / sqrtf((float)sum / (float)n + eps);
        const __m256 rv = _mm256_set1_ps(r);
        /* Elementwise from here: the same operations in 8 lanes or one by one. */
        for (int t = 0; t < n8; t += 8) {
            __m256 normed = hr_round8(_mm256_mul_ps(hk_load8(x, row + t, dtype), rv), dtype);
            hr_store8(y, row + t, _mm256_mul_ps(hk_load8(w, (size_t)t, dtype), normed), dtype);
        }
        for (int t = n8; t < n; t++) {
            float normed = hr_round(hk_load1(x, row + t, dtype) * r, dtype);
            hk_store1(y, row + t, hk_load1(w, (size_t)t, dtype) * normed, dtype);
        }
    }
}

/* In place: q [rows][heads][d] (d even), cos and sin [rows][d], all of the dtype. Each pair (t,
 * t + d/2) is read, then both written: out[t] = a*cos[t] - b*sin[t], out[t + d/2] = b*cos[t + d/2] +
 * a*sin[t + d/2] for a = q[t], b = q[t + d/2], each product and sum rounded to the dtype (rotate_half
 * negates b exactly, and rounding to nearest is symmetric, so -(b*sin) is torch's (-b)*sin). */
HK_TARGET static void hr_rope(void *q, const void *cos, const void *sin, int rows, int heads, int d, int dtype) {
    const int half = d / 2, half8 = half & ~7;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < rows; i++) {
        const size_t trig = (size_t)i * (size_t)d;
        for (int h = 0; h < heads; h++) {
            const size_t at = ((size_t)i * (size_t)heads + (size_t)h) * (size_t)d;
            for (int t = 0; t < half8; t += 8) {
                __m256 a = hk_load8(q, at + t, dtype), b = hk_load8(q, at + half + t, dtype);
                __m256 a_cos = hr_round8(_mm256_mul_ps(a, hk_load8(cos, trig + t, dtype)), dtype);
                __m256 b_sin = hr_round8(_mm256_mul_ps(b, hk_load8(sin, trig + t, dtype)), dtype);
                __m256 b_cos = hr_round8(_mm256_mul_ps(b, hk_load8(cos, trig + half + t, dtype)), dtype);
                __m256 a_sin = hr_round8(_mm256_mul_ps(a, hk_load8(sin, trig + half + t, dtype)), dtype);
                hr_store8(q, at + t, _mm256_add_ps(a_cos, _mm256_xor_ps(b_sin, sign)), dtype);
                hr_store8(q, at + half + t, _mm256_add_ps(b_cos, a_sin), dtype);
            }
            for (int t = half8; t < half; t++) {
                float a = hk_load1(q, at + t, dtype), b = hk_load1(q, at + half + t, dtype);
                float a_cos = hr_round(a * hk_load1(cos, trig + t, dtype), dtype);
                float b_sin = hr_round(b * hk_load1(sin, trig + t, dtype), dtype);
                float b_cos = hr_round(b * hk_load1(cos, trig + half + t, dtype), dtype);
                float a_sin = hr_round(a * hk_load1(sin, trig + half + t, dtype), dtype);
                hk_store1(q, at + t, a_cos + -b_sin, dtype);
                hk_store1(q, at + half + t, b_cos + a_sin, dtype);
            }
        }
    }
}
#else
static void hr_rms_norm(const void *x, const void *w, void *y, int m, int n, int dtype, float eps) {
    (void)x, (void)w, (void)y, (void)m, (void)n, (void)dtype, (void)eps;
}
static void hr_rope(void *q, const void *cos, const void *sin, int rows, int heads, int d, int dtype) {
    (void)q, (void)cos, (void)sin, (void)rows, (void)heads, (void)d, (void)dtype;
}
#endif
#endif
