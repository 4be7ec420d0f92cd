/* attention/neon.c — y = a^T x over fp16 rows (see ref.c): 8 positions in two accumulators, then 4, then a scalar
 * tail. */
#if defined(__aarch64__)
#include <arm_neon.h>

#include "../core.h"

ET_INLINE float32x4_t load4(const et_half *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

void et_gemv_t_f16_neon(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    int64_t j = 0;
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
