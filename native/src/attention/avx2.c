/* attention/avx2.c — y = a^T x over fp16 rows (see ref.c): 64 columns in eight accumulators (a head of values),
 * then 32, 16 and 8 in two chains each (a tile of keys), then a scalar tail. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>

#include "../core.h"

ET_INLINE __m256 load8(const et_half *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* y[0:8C] over all k rows, C vectors of 8 columns; P = 2 runs even and odd rows in separate chains (summed at the
 * end) so that C * P >= 8 FMAs are in flight */
ET_INLINE void cols(int C, int P, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    __m256 acc[2][8];
    for (int p = 0; p < P; p++)
        for (int c = 0; c < C; c++) acc[p][c] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + P <= k; d += P)
        for (int p = 0; p < P; p++) {
            const __m256 ad = _mm256_set1_ps(a[d + p]);
            const et_half *row = x + (size_t)(d + p) * stride;
            for (int c = 0; c < C; c++) acc[p][c] = _mm256_fmadd_ps(ad, load8(row + 8 * c), acc[p][c]);
        }
    for (; d < k; d++)
        for (int c = 0; c < C; c++)
            acc[0][c] = _mm256_fmadd_ps(_mm256_set1_ps(a[d]), load8(x + (size_t)d * stride + 8 * c), acc[0][c]);
    for (int c = 0; c < C; c++) _mm256_storeu_ps(y + 8 * c, P == 2 ? _mm256_add_ps(acc[0][c], acc[1][c]) : acc[0][c]);
}

void et_gemv_t_f16_avx2(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) cols(8, 1, k, a, x + j, stride, y + j); /* a head of values: one pass */
    if (j + 32 <= n) cols(4, 2, k, a, x + j, stride, y + j), j += 32;  /* a tile of keys */
    if (j + 16 <= n) cols(2, 2, k, a, x + j, stride, y + j), j += 16;
    if (j + 8 <= n) cols(1, 2, k, a, x + j, stride, y + j), j += 8;
    for (; j < n; j++) {
        float acc = 0.0f;
        for (int64_t d = 0; d < k; d++) acc = fmaf(a[d], _cvtsh_ss(x[(size_t)d * stride + j]), acc);
        y[j] = acc;
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
