/* attention/avx2.c — y = a^T x over fp16 rows (see ref.c): 16 positions in two accumulators, then 8, then a scalar
 * tail. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>

#include "../core.h"

ET_INLINE __m256 load8(const et_half *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

void et_gemv_t_f16_avx2(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
        for (int64_t d = 0; d < k; d++) {
            const __m256 ad = _mm256_set1_ps(a[d]);
            const et_half *row = x + (size_t)d * stride + j;
            acc0 = _mm256_fmadd_ps(ad, load8(row), acc0);
            acc1 = _mm256_fmadd_ps(ad, load8(row + 8), acc1);
        }
        _mm256_storeu_ps(y + j, acc0);
        _mm256_storeu_ps(y + j + 8, acc1);
    }
    for (; j + 8 <= n; j += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < k; d++) acc = _mm256_fmadd_ps(_mm256_set1_ps(a[d]), load8(x + (size_t)d * stride + j), acc);
        _mm256_storeu_ps(y + j, acc);
    }
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
