/* attention/ref.c — y[0:n] = sum_d a[d] * x[d][0:n] over fp16 rows x[d] (stride elements apart): attention scores
 * against keys stored transposed (a column per position, so no horizontal sums), and the weighted sum of values
 * stored by position. The reference. */
#include "../core.h"

void et_gemv_t_f16_ref(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    for (int64_t j = 0; j < n; j++) {
        float acc = 0.0f;
        for (int64_t d = 0; d < k; d++) acc += a[d] * et_fp16_to_fp32(x[(size_t)d * stride + j]);
        y[j] = acc;
    }
}
