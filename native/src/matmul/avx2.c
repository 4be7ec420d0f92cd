/* matmul/avx2.c — AVX2 + FMA + F16C kernels on the GGUF block layout.
 * Tile: 4 weight rows against two activation rows (block formats; one for an odd last row and the float formats),
 * so each activation block load serves four weight rows and each weight block's unpacking and scale serve two
 * activation rows; the weight tile stays in L1 while every activation row streams past it. Row tails use 1-row
 * tiles. An output's float operations do not depend on the tile it falls in (batch invariance, see avx512.c).
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

/* --- per-block contributions, each added into one float accumulator ---
 * A term is split in two: the weight side (wside: the block's bytes as the dot takes them, and its scale, which
 * a 2-row step shares between its activation rows) and the product with one activation block (term). The float
 * operations of an output are the same whichever path runs it (batch invariance: see avx512.c). */

typedef struct {
    __m256i q; /* the bytes the dot takes: q4 nibbles; q8_0 |w| */
    __m256i s; /* q8_0: the signed weights, whose signs go onto the activations */
    float d, m; /* scale; q4_1 min */
} wside;

ET_INLINE wside wside_q4_0(const block_q4_0 *w) { return (wside){.q = unpack_nibbles(w->qs), .d = h2f(w->d)}; }
ET_INLINE wside wside_q4_1(const block_q4_1 *w) {
    return (wside){.q = unpack_nibbles(w->qs), .d = h2f(w->d), .m = h2f(w->m)};
}
ET_INLINE wside wside_q8_0(const block_q8_0 *w) {
    const __m256i wq = _mm256_loadu_si256((const __m256i *)w->qs);
    return (wside){.q = _mm256_sign_epi8(wq, wq), .s = wq, .d = h2f(w->d)};
}

/* lane 0 = v, the others 0 */
ET_INLINE __m256i lane0_epi32(int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }

ET_INLINE __m256 term_q4_0(__m256 acc, wside w, const block_q8_s *x, __m256i xq) {
    const __m256i p = _mm256_sub_epi32(dot_us8(w.q, xq), lane0_epi32(8 * x->sum)); /* the -8 offset, exactly */
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(w.d * x->d), acc);
}

ET_INLINE __m256 term_q4_1(__m256 acc, wside w, const block_q8_s *x, __m256i xq) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us8(w.q, xq)), _mm256_set1_ps(w.d * x->d), acc);
    /* the min term m*dx*sum(qx) rides in lane 0 */
    return _mm256_add_ps(acc, _mm256_castps128_ps256(_mm_set_ss(w.m * (x->d * (float)x->sum))));
}

ET_INLINE __m256 term_q8_0(__m256 acc, wside w, const block_q8_s *x, __m256i xq) {
    const __m256i p = dot_us8(w.q, _mm256_sign_epi8(xq, w.s)); /* |w| * (x * sign w) */
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(w.d * x->d), acc);
}

ET_INLINE __m256i load_xq(const block_q8_s *x) { return _mm256_loadu_si256((const __m256i *)x->qs); }

/* y rows i..i+C-1, columns j..j+3: 4 weight rows (wr) x C activation rows over all blocks, each block's weight
 * side unpacked once for the C rows; the first activation rows also prefetch the tile ET_PF_TILES ahead (pf_on) */
#define ET_STEP_4xC(wsd, term, C)                                                                              \
    do {                                                                                                      \
        const block_q8_s *xi[C];                                                                              \
        __m256 acc[4][C];                                                                                     \
        for (int c = 0; c < (C); c++) xi[c] = (const block_q8_s *)((const uint8_t *)x + (size_t)(i + c) * xs); \
        for (int r = 0; r < 4; r++)                                                                           \
            for (int c = 0; c < (C); c++) acc[r][c] = _mm256_setzero_ps();                                    \
        for (int64_t b = 0; b < nb; b++) {                                                                    \
            if (i == 0 && pf_on)                                                                              \
                for (size_t o = 0; o < slice; o += 64)                                                        \
                    _mm_prefetch((const char *)(pf + (size_t)b * slice + o), _MM_HINT_T0);                    \
            __m256i xq[C];                                                                                    \
            for (int c = 0; c < (C); c++) xq[c] = load_xq(&xi[c][b]);                                         \
            for (int r = 0; r < 4; r++) {                                                                     \
                const wside ws_ = wsd(&wr[r][b]);                                                             \
                for (int c = 0; c < (C); c++) acc[r][c] = term(acc[r][c], ws_, &xi[c][b], xq[c]);             \
            }                                                                                                 \
        }                                                                                                     \
        for (int c = 0; c < (C); c++)                                                                         \
            for (int r = 0; r < 4; r++) y[(size_t)(i + c) * ldy + j + r] = hsum_ps(acc[r][c]);                \
    } while (0)

#define ET_GEMM_BLOCKS(name, btype, wsd, term)                                                                 \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        const int64_t nb = k / ET_QK;                                                                         \
        int64_t j = 0;                                                                                        \
        for (; j + 4 <= n; j += 4) {                                                                          \
            const btype *wr[4];                                                                               \
            for (int r = 0; r < 4; r++) wr[r] = (const btype *)((const uint8_t *)w + (size_t)(j + r) * ws);   \
            /* the tile ET_PF_TILES ahead (contiguous rows), a slice per block: four interleaved short row \
             * streams are more than the hardware prefetcher follows */                                     \
            const uint8_t *pf = (const uint8_t *)wr[0] + ET_PF_TILES * 4 * ws;                                \
            const size_t slice = ((4 * ws + (size_t)nb - 1) / (size_t)nb + 63) & ~(size_t)63;                \
            const int pf_on = j + 4 * ET_PF_TILES + 4 <= n;                                                   \
            int64_t i = 0;                                                                                    \
            for (; i + 2 <= m; i += 2) ET_STEP_4xC(wsd, term, 2); /* two rows share each block's unpacking */ \
            for (; i < m; i++) ET_STEP_4xC(wsd, term, 1);                                                     \
        }                                                                                                     \
        for (; j < n; j++) {                                                                                  \
            const btype *w0 = (const btype *)((const uint8_t *)w + (size_t)j * ws);                           \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const block_q8_s *xi = (const block_q8_s *)((const uint8_t *)x + (size_t)i * xs);             \
                __m256 a0 = _mm256_setzero_ps();                                                              \
                for (int64_t b = 0; b < nb; b++) a0 = term(a0, wsd(&w0[b]), &xi[b], load_xq(&xi[b]));          \
                y[(size_t)i * ldy + j] = hsum_ps(a0);                                                         \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_BLOCKS(gemm_q4_0_avx2, block_q4_0, wside_q4_0, term_q4_0)
ET_GEMM_BLOCKS(gemm_q4_1_avx2, block_q4_1, wside_q4_1, term_q4_1)
ET_GEMM_BLOCKS(gemm_q8_0_avx2, block_q8_0, wside_q8_0, term_q8_0)

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
