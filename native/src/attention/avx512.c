/* attention/avx512.c — y = a^T x over fp16 rows (see ref.c): 32 positions in two accumulators, then 16, the tail
 * under a mask. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,f16c,fma")
#endif
#include <immintrin.h>

#include "../core.h"

ET_INLINE __m512 load16(const et_half *p, __mmask16 mk) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, p)); }

static void one_head(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        /* four chains (even and odd d) so the fma latency overlaps */
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        int64_t d = 0;
        for (; d + 2 <= k; d += 2) {
            const et_half *row = x + (size_t)d * stride + j;
            const __m512 a0 = _mm512_set1_ps(a[d]), a1 = _mm512_set1_ps(a[d + 1]);
            acc0 = _mm512_fmadd_ps(a0, load16(row, 0xFFFF), acc0);
            acc1 = _mm512_fmadd_ps(a0, load16(row + 16, 0xFFFF), acc1);
            acc2 = _mm512_fmadd_ps(a1, load16(row + stride, 0xFFFF), acc2);
            acc3 = _mm512_fmadd_ps(a1, load16(row + stride + 16, 0xFFFF), acc3);
        }
        if (d < k) {
            const et_half *row = x + (size_t)d * stride + j;
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(a[d]), load16(row, 0xFFFF), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(a[d]), load16(row + 16, 0xFFFF), acc1);
        }
        _mm512_storeu_ps(y + j, _mm512_add_ps(acc0, acc2));
        _mm512_storeu_ps(y + j + 16, _mm512_add_ps(acc1, acc3));
    }
    for (; j < n; j += 16) {
        const __mmask16 mk = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < k; d++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(a[d]), load16(x + (size_t)d * stride + j, mk), acc);
        _mm512_mask_storeu_ps(y + j, mk, acc);
    }
}

/* the heads one at a time (each converts the rows of x again) */
void et_gemv_t_f16_avx512(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                         float *y, size_t ldy) {
    for (int64_t i = 0; i < h; i++) one_head(n, k, a + (size_t)i * lda, x, stride, y + (size_t)i * ldy);
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
