/* attention/avx2.c — y = a^T x over fp16 rows (see ref.c). One head: 64 columns in eight accumulators (a head of
 * values), then 32, 16 and 8 in two chains each (a tile of keys), then a scalar tail. A group of heads: up to four at
 * a time sharing each converted row, 16 then 8 columns. And the softmax of a row of scores. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <float.h>
#include <immintrin.h>
#include <math.h>

#include "../core.h"

ET_INLINE __m256 load8(const et_half *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* the cache lines ET_ATT_PF bytes past a row's C vectors: keys and values are read as one forward stream, but in 4 KB
 * runs (a key tile; 32 positions of values) at whose page boundary the hardware prefetcher stops */
#define ET_ATT_PF 4096
ET_INLINE void prefetch_ahead(const et_half *row, int C) {
    for (int l = 0; l < (C + 3) / 4; l++) _mm_prefetch((const char *)row + ET_ATT_PF + 64 * l, _MM_HINT_T0);
}

/* y[0:8C] over all k rows, C vectors of 8 columns; P = 2 runs even and odd rows in separate chains (summed at the
 * end): C * P independent FMA chains (8 for a head of values, C = 8, and for a tile of keys, C = 4) */
ET_INLINE void cols(int C, int P, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    __m256 acc[2][8];
    for (int p = 0; p < P; p++)
        for (int c = 0; c < C; c++) acc[p][c] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + P <= k; d += P)
        for (int p = 0; p < P; p++) {
            const __m256 ad = _mm256_set1_ps(a[d + p]);
            const et_half *row = x + (size_t)(d + p) * stride;
            prefetch_ahead(row, C);
            for (int c = 0; c < C; c++) acc[p][c] = _mm256_fmadd_ps(ad, load8(row + 8 * c), acc[p][c]);
        }
    for (; d < k; d++)
        for (int c = 0; c < C; c++)
            acc[0][c] = _mm256_fmadd_ps(_mm256_set1_ps(a[d]), load8(x + (size_t)d * stride + 8 * c), acc[0][c]);
    for (int c = 0; c < C; c++) _mm256_storeu_ps(y + 8 * c, P == 2 ? _mm256_add_ps(acc[0][c], acc[1][c]) : acc[0][c]);
}

/* one column past the vector blocks: sum_d a[d] * x[d * stride] */
ET_INLINE float col_dot(int64_t k, const float *a, const et_half *x, size_t stride) {
    float acc = 0.0f;
    for (int64_t d = 0; d < k; d++) acc = fmaf(a[d], _cvtsh_ss(x[(size_t)d * stride]), acc);
    return acc;
}

static void one_head(int64_t n, int64_t k, const float *a, const et_half *x, size_t stride, float *y) {
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) cols(8, 1, k, a, x + j, stride, y + j); /* a head of values: one pass */
    if (j + 32 <= n) cols(4, 2, k, a, x + j, stride, y + j), j += 32;  /* a tile of keys */
    if (j + 16 <= n) cols(2, 2, k, a, x + j, stride, y + j), j += 16;
    if (j + 8 <= n) cols(1, 2, k, a, x + j, stride, y + j), j += 8;
    for (; j < n; j++) y[j] = col_dot(k, a, x + j, stride);
}

/* y_i[0:8C] for H heads (H <= 4, C <= 2) over all k rows: each row's C vectors are loaded and converted once and
 * used by every head (one chain per head and vector) */
ET_INLINE void heads_cols(int H, int C, int64_t k, const float *a, size_t lda, const et_half *x, size_t stride,
                          float *y, size_t ldy) {
    __m256 acc[4][2];
    for (int i = 0; i < H; i++)
        for (int c = 0; c < C; c++) acc[i][c] = _mm256_setzero_ps();
    for (int64_t d = 0; d < k; d++) {
        const et_half *row = x + (size_t)d * stride;
        prefetch_ahead(row, C);
        __m256 xv[2];
        for (int c = 0; c < C; c++) xv[c] = load8(row + 8 * c);
        for (int i = 0; i < H; i++) {
            const __m256 ad = _mm256_set1_ps(a[(size_t)i * lda + d]);
            for (int c = 0; c < C; c++) acc[i][c] = _mm256_fmadd_ps(ad, xv[c], acc[i][c]);
        }
    }
    for (int i = 0; i < H; i++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(y + (size_t)i * ldy + 8 * c, acc[i][c]);
}

/* heads_cols with H (2..4) made a constant, so the accumulators stay in registers */
ET_INLINE void heads_block(int H, int C, int64_t k, const float *a, size_t lda, const et_half *x, size_t stride,
                           float *y, size_t ldy) {
    switch (H) {
    case 2: heads_cols(2, C, k, a, lda, x, stride, y, ldy); break;
    case 3: heads_cols(3, C, k, a, lda, x, stride, y, ldy); break;
    default: heads_cols(4, C, k, a, lda, x, stride, y, ldy); break;
    }
}

/* one head: the single-head blocks above; a group: up to four heads at a time, 16 then 8 columns per pass over the
 * rows. SmolLM2-135M's shape (3 heads a group, head_dim 64), one token's attention over 30 layers with K and V cold:
 * 1100 positions 4.1-4.4 ms one head at a time without the prefetch, 3.7-4.0 ms grouped; 2000 positions 6.3-7.2 ms,
 * 5.8-6.1 ms. The rest is the cache's bytes (25 MB at 1100 positions) */
void et_gemv_t_f16_avx2(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                        float *y, size_t ldy) {
    for (int64_t i0 = 0; i0 < h; i0 += 4) {
        const int H = h - i0 < 4 ? (int)(h - i0) : 4;
        const float *ai = a + (size_t)i0 * lda;
        float *yi = y + (size_t)i0 * ldy;
        if (H == 1) {
            one_head(n, k, ai, x, stride, yi);
            continue;
        }
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) heads_block(H, 2, k, ai, lda, x + j, stride, yi + j, ldy);
        if (j + 8 <= n) heads_block(H, 1, k, ai, lda, x + j, stride, yi + j, ldy), j += 8;
        for (; j < n; j++)
            for (int i = 0; i < H; i++) yi[(size_t)i * ldy + j] = col_dot(k, ai + (size_t)i * lda, x + j, stride);
    }
}

/* exp(t) for t <= 0 (Cephes' expf: t = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n); below
 * ln(FLT_MIN) it is 0 (expf gives subnormals there), NaN stays NaN */
ET_INLINE __m256 exp_nonpos(__m256 t) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 below = _mm256_cmp_ps(t, lo, _CMP_LT_OQ);
    t = _mm256_max_ps(lo, t); /* NaN stays (the second operand is returned) */
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), t);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(below, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* the last n % 8 values, padded with -Inf (no effect on the max, exp 0) */
ET_INLINE __m256 load_tail(const float *x, int64_t rem) {
    float buf[8];
    for (int i = 0; i < 8; i++) buf[i] = i < rem ? x[i] : -INFINITY;
    return _mm256_loadu_ps(buf);
}

void et_softmax_avx2(float *x, int64_t n) {
    const int64_t n8 = n & ~(int64_t)7, rem = n - n8;
    __m256 m = _mm256_set1_ps(-FLT_MAX);
    for (int64_t j = 0; j < n8; j += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + j), m); /* NaN is skipped, as in ref */
    if (rem) m = _mm256_max_ps(load_tail(x + n8, rem), m);
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
        const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
        _mm256_storeu_ps(x + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float tail[8];
    if (rem) {
        const __m256 e = exp_nonpos(_mm256_sub_ps(load_tail(x + n8, rem), m));
        _mm256_storeu_ps(tail, e);
        sum = _mm256_add_ps(sum, e);
    }
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(sum, sum, 1));
    sum = _mm256_add_ps(sum, _mm256_shuffle_ps(sum, sum, 0x4E));
    sum = _mm256_add_ps(sum, _mm256_shuffle_ps(sum, sum, 0xB1));
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
    for (int64_t j = 0; j < n8; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
    for (int64_t i = 0; i < rem; i++) x[n8 + i] = tail[i] * _mm256_cvtss_f32(inv);
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
