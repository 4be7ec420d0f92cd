/* matmul/avx2.c — AVX2 + FMA + F16C kernels on the GGUF block layout.
 * Tile: 4 weight rows against one activation row, so each activation block load serves four rows; the weight
 * tile stays in L1 while every activation row streams past it. Row tails use 1-row tiles.
 */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>

#include "../core.h"

#define ET_PF_TILES 2 /* GEMV prefetch distance, in 4-row tiles */

ET_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ET_INLINE float h2f(et_half h) { return _cvtsh_ss(h); }

/* 16 packed bytes -> 32 nibbles in element order: low nibbles are elements 0..15, high nibbles 16..31 */
ET_INLINE __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
}

/* 8 int32 partial sums of u8 x s8 products (|pair| <= 2*255*127 would saturate int16: callers keep u <= 128) */
ET_INLINE __m256i dot_us8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* --- per-block contributions, each added into one float accumulator --- */

ET_INLINE __m256 blk_q4_0(__m256 acc, const block_q4_0 *w, const block_q8_s *x, __m256i xq) {
    __m256i p = dot_us8(unpack_nibbles(w->qs), xq);
    p = _mm256_sub_epi32(p, _mm256_castsi128_si256(_mm_cvtsi32_si128(8 * x->sum))); /* the -8 offset, exactly */
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(w->d) * x->d), acc);
}

ET_INLINE __m256 blk_q4_1(__m256 acc, const block_q4_1 *w, const block_q8_s *x, __m256i xq) {
    const __m256i p = dot_us8(unpack_nibbles(w->qs), xq);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(w->d) * x->d), acc);
    /* the min term m*dx*sum(qx) rides in lane 0 */
    return _mm256_add_ps(acc, _mm256_castps128_ps256(_mm_set_ss(h2f(w->m) * (x->d * (float)x->sum))));
}

ET_INLINE __m256 blk_q8_0(__m256 acc, const block_q8_0 *w, const block_q8_s *x, __m256i xq) {
    const __m256i wq = _mm256_loadu_si256((const __m256i *)w->qs);
    const __m256i p = dot_us8(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq)); /* |w| * (x * sign w) */
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(w->d) * x->d), acc);
}

#define ET_GEMM_BLOCKS(name, btype, blk)                                                                       \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        const int64_t nb = k / ET_QK;                                                                         \
        int64_t j = 0;                                                                                        \
        for (; j + 4 <= n; j += 4) {                                                                          \
            const btype *w0 = (const btype *)((const uint8_t *)w + (size_t)j * ws);                           \
            const btype *w1 = (const btype *)((const uint8_t *)w0 + ws);                                      \
            const btype *w2 = (const btype *)((const uint8_t *)w1 + ws);                                      \
            const btype *w3 = (const btype *)((const uint8_t *)w2 + ws);                                      \
            /* the tile ET_PF_TILES ahead (contiguous rows), a slice per block: four interleaved short row \
             * streams are more than the hardware prefetcher follows */                                     \
            const uint8_t *pf = (const uint8_t *)w0 + ET_PF_TILES * 4 * ws;                                   \
            const size_t slice = ((4 * ws + (size_t)nb - 1) / (size_t)nb + 63) & ~(size_t)63;                \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const block_q8_s *xi = (const block_q8_s *)((const uint8_t *)x + (size_t)i * xs);             \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                   \
                for (int64_t b = 0; b < nb; b++) {                                                            \
                    if (i == 0 && j + 4 * ET_PF_TILES + 4 <= n)                                                       \
                        for (size_t o = 0; o < slice; o += 64)                                                \
                            _mm_prefetch((const char *)(pf + (size_t)b * slice + o), _MM_HINT_T0);            \
                    const __m256i xq = _mm256_loadu_si256((const __m256i *)xi[b].qs);                        \
                    a0 = blk(a0, &w0[b], &xi[b], xq);                                                         \
                    a1 = blk(a1, &w1[b], &xi[b], xq);                                                         \
                    a2 = blk(a2, &w2[b], &xi[b], xq);                                                         \
                    a3 = blk(a3, &w3[b], &xi[b], xq);                                                         \
                }                                                                                             \
                float *yi = y + (size_t)i * ldy + j;                                                          \
                yi[0] = hsum_ps(a0), yi[1] = hsum_ps(a1), yi[2] = hsum_ps(a2), yi[3] = hsum_ps(a3);           \
            }                                                                                                 \
        }                                                                                                     \
        for (; j < n; j++) {                                                                                  \
            const btype *w0 = (const btype *)((const uint8_t *)w + (size_t)j * ws);                           \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const block_q8_s *xi = (const block_q8_s *)((const uint8_t *)x + (size_t)i * xs);             \
                __m256 a0 = _mm256_setzero_ps();                                                              \
                for (int64_t b = 0; b < nb; b++)                                                              \
                    a0 = blk(a0, &w0[b], &xi[b], _mm256_loadu_si256((const __m256i *)xi[b].qs));             \
                y[(size_t)i * ldy + j] = hsum_ps(a0);                                                         \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_BLOCKS(gemm_q4_0_avx2, block_q4_0, blk_q4_0)
ET_GEMM_BLOCKS(gemm_q4_1_avx2, block_q4_1, blk_q4_1)
ET_GEMM_BLOCKS(gemm_q8_0_avx2, block_q8_0, blk_q8_0)

/* --- float weights: 8 lanes per step, scalar tail --- */

ET_INLINE __m256 load_w_f32(const float *w) { return _mm256_loadu_ps(w); }
ET_INLINE __m256 load_w_f16(const et_half *w) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)); }
ET_INLINE float scalar_w_f32(const float *w) { return *w; }
ET_INLINE float scalar_w_f16(const et_half *w) { return h2f(*w); }

#define ET_GEMM_FLOAT(name, wt, loadw, scalarw)                                                                \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            const wt *wj = (const wt *)((const uint8_t *)w + (size_t)j * ws);                                 \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const float *xi = (const float *)((const uint8_t *)x + (size_t)i * xs);                       \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                                     \
                int64_t c = 0;                                                                                \
                for (; c + 16 <= k; c += 16) {                                                                \
                    a0 = _mm256_fmadd_ps(loadw(wj + c), _mm256_loadu_ps(xi + c), a0);                         \
                    a1 = _mm256_fmadd_ps(loadw(wj + c + 8), _mm256_loadu_ps(xi + c + 8), a1);                 \
                }                                                                                             \
                for (; c + 8 <= k; c += 8) a0 = _mm256_fmadd_ps(loadw(wj + c), _mm256_loadu_ps(xi + c), a0);  \
                float s = hsum_ps(_mm256_add_ps(a0, a1));                                                     \
                for (; c < k; c++) s += scalarw(wj + c) * xi[c];                                              \
                y[(size_t)i * ldy + j] = s;                                                                   \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_FLOAT(gemm_f32_avx2, float, load_w_f32, scalar_w_f32)
ET_GEMM_FLOAT(gemm_f16_avx2, et_half, load_w_f16, scalar_w_f16)

/* ---- activations: et_quantize_row_q8_s with the same float operations (max and integer sums are exact in any
 * order; one multiply and a round to nearest even per value), 8 lanes at a time ---- */

ET_INLINE float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static int quantize_row_q8_s_avx2(const float *x, block_q8_s *y, int64_t k) {
    const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(3.4028234663852886e38f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the packs' 128-bit lane interleave */
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float *xb = x + b * ET_QK;
        __m256 v[4], m = _mm256_setzero_ps();
        int finite = 0xFF;
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            const __m256 a = _mm256_andnot_ps(sign, v[i]);
            /* NaN compares false, so it fails the finite test like Inf */
            finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, fmax, _CMP_LE_OQ));
            m = _mm256_max_ps(m, a);
        }
        if (finite != 0xFF) return -1;
        const float amax = hmax_ps(m);
        const __m256 id = _mm256_set1_ps(et_q8s_inverse(amax));
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        /* codes are in [-127, 127]: the saturating packs are plain narrowings */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y[b].qs, _mm256_permutevar8x32_epi32(p, order));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
        y[b].d = amax / 127.0f;
        y[b].sum = _mm_cvtsi128_si32(t);
    }
    return 0;
}

const et_kernels et_kernels_avx2 = {
    .name = "avx2",
    .gemv_t_f16 = et_gemv_t_f16_avx2,
    .gemm_q4_0 = gemm_q4_0_avx2,
    .gemm_q4_1 = gemm_q4_1_avx2,
    .gemm_q8_0 = gemm_q8_0_avx2,
    .gemm_f16 = gemm_f16_avx2,
    .gemm_f32 = gemm_f32_avx2,
    .quantize_row_q8_s = quantize_row_q8_s_avx2,
};

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
