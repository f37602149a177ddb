/* The small per-row operators of a decoder layer, for the CPU engine: RMS norm and rotary embedding.
 *
 * In torch each is a chain of eager operators (RMS norm: widen, square, mean, add, rsqrt, multiply,
 * round, scale; rotary: two slices, a negation, a concatenation, two products and a sum), each with its
 * dispatch and its allocation: ~75 and ~55 us for one token here, ~1.5 ms of a decode step. Here each
 * is one call on the caller's thread, in scalar code: 4x faster than torch's chain for one row, slower
 * from ~32 rows (the engine sends rope no more than 16; every RMS norm comes here, whose rows must all
 * be computed one way, and a prompt's norms cost little beside its matrix products).
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

enum { HR_F32 = 0, HR_BF16 = 1, HR_F16 = 2 };

#if defined(__x86_64__) && defined(__GNUC__)

HK_TARGET static HK_INLINE float hr_load(const void *p, size_t i, int dtype) {
    if (dtype == HR_F32) return ((const float *)p)[i];
    return hk_widen1(((const uint16_t *)p)[i], dtype == HR_F16);
}

/* Round to the dtype, to nearest even, as torch does (a NaN stays a NaN). */
HK_TARGET static HK_INLINE uint16_t hr_half(float f, int dtype) {
    if (dtype == HR_F16) return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* f rounded to the dtype and back to float32: the value a half-precision tensor would hold. */
HK_TARGET static HK_INLINE float hr_round(float f, int dtype) {
    return dtype == HR_F32 ? f : hk_widen1(hr_half(f, dtype), dtype == HR_F16);
}

HK_TARGET static HK_INLINE void hr_store(void *p, size_t i, float f, int dtype) {
    if (dtype == HR_F32)
        ((float *)p)[i] = f;
    else
        ((uint16_t *)p)[i] = hr_half(f, dtype);
}

/* x, y [m][n], w [n], all of the dtype; y may be x. */
HK_TARGET static void hr_rms_norm(const void *x, const void *w, void *y, int m, int n, int dtype, float eps) {
    for (int i = 0; i < m; i++) {
        size_t row = (size_t)i * (size_t)n;
        double sum = 0.0;
        for (int t = 0; t < n; t++) {
            float v = hr_load(x, row + t, dtype);
            sum += (double)(v * v);
        }
        float r = 1.0f / sqrtf((float)sum / (float)n + eps);
        for (int t = 0; t < n; t++) {
            float normed = hr_round(hr_load(x, row + t, dtype) * r, dtype);
            hr_store(y, row + t, hr_load(w, (size_t)t, dtype) * normed, dtype);
        }
    }
}

/* In place: q [rows][heads][d] (d even, <= HR_MAX_DIM), cos and sin [rows][d], all of the dtype. */
#define HR_MAX_DIM 1024
HK_TARGET static void hr_rope(void *q, const void *cos, const void *sin, int rows, int heads, int d, int dtype) {
    const int half = d / 2;
    float v[HR_MAX_DIM];
    for (int i = 0; i < rows; i++) {
        const size_t trig = (size_t)i * (size_t)d;
        for (int h = 0; h < heads; h++) {
            const size_t at = ((size_t)i * (size_t)heads + (size_t)h) * (size_t)d;
            for (int t = 0; t < d; t++) v[t] = hr_load(q, at + t, dtype);
            for (int t = 0; t < d; t++) {
                float rot = t < half ? -v[t + half] : v[t - half];
                float a = hr_round(v[t] * hr_load(cos, trig + t, dtype), dtype);
                float b = hr_round(rot * hr_load(sin, trig + t, dtype), dtype);
                hr_store(q, at + t, a + b, dtype);
            }
        }
    }
}
#else
static void hr_rms_norm(const void *x, const void *w, void *y, int m, int n, int dtype, float eps) {
    (void)x, (void)w, (void)y, (void)m, (void)n, (void)dtype, (void)eps;
}
#define HR_MAX_DIM 1024
static void hr_rope(void *q, const void *cos, const void *sin, int rows, int heads, int d, int dtype) {
    (void)q, (void)cos, (void)sin, (void)rows, (void)heads, (void)d, (void)dtype;
}
#endif
#endif
