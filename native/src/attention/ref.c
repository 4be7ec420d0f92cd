/* attention/ref.c — y_i[0:n] = sum_d a_i[d] * x[d][0:n] over fp16 rows x[d] (stride elements apart), for a group of
 * query heads i: attention scores against keys stored transposed (a column per position, so no horizontal sums),
 * and the weighted sums of values stored by position; and the softmax of a row of scores. The reference. */
#include <float.h>
#include <math.h>

#include "../core.h"

void et_gemv_t_f16_ref(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                       float *y, size_t ldy) {
    for (int64_t i = 0; i < h; i++)
        for (int64_t j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < k; d++) acc += a[(size_t)i * lda + d] * et_fp16_to_fp32(x[(size_t)d * stride + j]);
            y[(size_t)i * ldy + j] = acc;
        }
}

void et_softmax_ref(float *x, int64_t n) {
    float max = -FLT_MAX;
    for (int64_t j = 0; j < n; j++)
        if (x[j] > max) max = x[j];
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        x[j] = expf(x[j] - max);
        sum += x[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; j++) x[j] *= inv;
}
