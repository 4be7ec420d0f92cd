/* attention/neon.c — y = a^T x over fp16 rows (see ref.c): 32 columns in eight accumulators (half a head of values,
 * or a tile of keys), then 8 in two, then 4, then a scalar tail; and the softmax of a row of scores. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <float.h>
#include <math.h>

#include "../core.h"

ET_INLINE float32x4_t load4(const et_half *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

static void one_head(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        float32x4_t acc[8];
        for (int c = 0; c < 8; c++) acc[c] = vdupq_n_f32(0.0f);
        for (int64_t d = 0; d < k; d++) {
            const et_half *row = x + (size_t)d * stride + j;
            for (int c = 0; c < 4; c++) {
                const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(row + 8 * c));
                acc[2 * c] = vfmaq_n_f32(acc[2 * c], vcvt_f32_f16(vget_low_f16(h)), a[d]);
                acc[2 * c + 1] = vfmaq_n_f32(acc[2 * c + 1], vcvt_high_f32_f16(h), a[d]);
            }
        }
        for (int c = 0; c < 8; c++) vst1q_f32(y + j + 4 * c, acc[c]);
    }
    for (; j + 8 <= n; j += 8) {
        float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0;
        for (int64_t d = 0; d < k; d++) {
            const et_half *row = x + (size_t)d * stride + j;
            acc0 = vfmaq_n_f32(acc0, load4(row), a[d]);
            acc1 = vfmaq_n_f32(acc1, load4(row + 4), a[d]);
        }
        vst1q_f32(y + j, acc0);
        vst1q_f32(y + j + 4, acc1);
    }
    for (; j + 4 <= n; j += 4) {
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int64_t d = 0; d < k; d++) acc = vfmaq_n_f32(acc, load4(x + (size_t)d * stride + j), a[d]);
        vst1q_f32(y + j, acc);
    }
    for (; j < n; j++) {
        float acc = 0.0f;
        for (int64_t d = 0; d < k; d++) acc = fmaf(a[d], et_fp16_to_fp32(x[(size_t)d * stride + j]), acc);
        y[j] = acc;
    }
}

/* the heads one at a time (each converts the rows of x again) */
void et_gemv_t_f16_neon(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                         float *y, size_t ldy) {
    for (int64_t i = 0; i < h; i++) one_head(n, k, a + (size_t)i * lda, x, stride, y + (size_t)i * ldy);
}

/* exp(t) for t <= 0, as attention/avx2.c's exp_nonpos (same polynomial and the same 0 below ln(FLT_MIN)) */
ET_INLINE float32x4_t exp_nonpos(float32x4_t t) {
    const float32x4_t lo = vdupq_n_f32(-87.33654f);
    const uint32x4_t below = vcltq_f32(t, lo); /* false for NaN */
    t = vmaxq_f32(t, lo);                       /* NaN stays */
    const float32x4_t fx = vrndnq_f32(vmulq_n_f32(t, 1.44269504088896341f));
    float32x4_t r = vfmsq_n_f32(t, fx, 0.693359375f);
    r = vfmsq_n_f32(r, fx, -2.12194440e-4f);
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, r);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, r);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, r);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, r);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, r);
    y = vaddq_f32(vfmaq_f32(r, y, vmulq_f32(r, r)), vdupq_n_f32(1.0f));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    const float32x4_t v = vmulq_f32(y, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v), below));
}

/* the last n % 4 values, padded with -Inf (no effect on the max, exp 0) */
ET_INLINE float32x4_t load_tail(const float *x, int64_t rem) {
    float buf[4];
    for (int i = 0; i < 4; i++) buf[i] = i < rem ? x[i] : -INFINITY;
    return vld1q_f32(buf);
}

void et_softmax_neon(float *x, int64_t n) {
    const int64_t n4 = n & ~(int64_t)3, rem = n - n4;
    /* vmaxnm skips NaN as ref.c's comparison does */
    float32x4_t m = vdupq_n_f32(-FLT_MAX);
    for (int64_t j = 0; j < n4; j += 4) m = vmaxnmq_f32(m, vld1q_f32(x + j));
    if (rem) m = vmaxnmq_f32(m, load_tail(x + n4, rem));
    const float32x4_t mv = vdupq_n_f32(vmaxnmvq_f32(m));
    float32x4_t sum = vdupq_n_f32(0.0f);
    for (int64_t j = 0; j < n4; j += 4) {
        const float32x4_t e = exp_nonpos(vsubq_f32(vld1q_f32(x + j), mv));
        vst1q_f32(x + j, e);
        sum = vaddq_f32(sum, e);
    }
    float tail[4];
    if (rem) {
        const float32x4_t e = exp_nonpos(vsubq_f32(load_tail(x + n4, rem), mv));
        vst1q_f32(tail, e);
        sum = vaddq_f32(sum, e);
    }
    const float inv = 1.0f / vaddvq_f32(sum);
    for (int64_t j = 0; j < n4; j += 4) vst1q_f32(x + j, vmulq_n_f32(vld1q_f32(x + j), inv));
    for (int64_t i = 0; i < rem; i++) x[n4 + i] = tail[i] * inv;
}
#endif
