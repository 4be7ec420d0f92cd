/* attention/neon.c — y = a^T x over fp16 rows (see ref.c): 32 columns in eight accumulators (half a head of values,
 * or a tile of keys), then 8 in two, then 4, then a scalar tail. */
#if defined(__aarch64__)
#include <arm_neon.h>

#include "../core.h"

ET_INLINE float32x4_t load4(const et_half *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

void et_gemv_t_f16_neon(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
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
#endif
