/* matmul/neon.c — AArch64 Advanced SIMD kernels on the GGUF block layout.
 *
 * neon_dotprod.c compiles this file a second time with ET_DOTPROD=1: the two variants differ only in how one
 * block's 32 int8 products become four int32 partial sums (SDOT, or widening multiplies and pairwise adds).
 * Tile: 4 weight rows against two activation rows, as avx2.c; row tails use 1-row tiles.
 */
#if defined(__aarch64__)

#include "../neon_target.h"

#include <arm_neon.h>

#include "../core.h"

/* exact, like et_fp16_to_fp32: FCVT is part of every AArch64 FPU */
ET_INLINE float h2f(et_half h) {
    __fp16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}

/* 4 int32 partial sums of a[i] * b[i] over 32 int8 pairs (a0/b0 elements 0..15, a1/b1 elements 16..31).
 * Without SDOT each int16 lane holds two products: |a| <= 128 and |b| <= 127 keep it below 32767. */
ET_INLINE int32x4_t dot_s8x32(int8x16_t a0, int8x16_t a1, int8x16_t b0, int8x16_t b1) {
#if ET_DOTPROD
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), a0, b0), a1, b1);
#else
    const int16x8_t p0 = vmlal_high_s8(vmull_s8(vget_low_s8(a0), vget_low_s8(b0)), a0, b0);
    const int16x8_t p1 = vmlal_high_s8(vmull_s8(vget_low_s8(a1), vget_low_s8(b1)), a1, b1);
    return vpadalq_s16(vpaddlq_s16(p0), p1);
#endif
}

/* 16 packed bytes -> nibbles in element order: *lo gets elements 0..15, *hi elements 16..31 */
ET_INLINE void unpack_nibbles(const uint8_t *qs, int8x16_t *lo, int8x16_t *hi) {
    const uint8x16_t b = vld1q_u8(qs);
    *lo = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0F)));
    *hi = vreinterpretq_s8_u8(vshrq_n_u8(b, 4));
}

/* --- per-block contributions, each added into one float accumulator ---
 * A term is split in two, as in avx2.c: the weight side (the block's int8 values and scale, which a 2-row step
 * shares between its activation rows) and the product with one activation block. The float operations of an
 * output are the same whichever path runs it (batch invariance). */

typedef struct {
    int8x16_t q0, q1; /* values 0..15, 16..31 as int8 */
    float d, m;       /* scale; q4_1 min */
} wside;

/* the -8 offset goes on the nibbles, so no lane carries a large partial sum that the offset would cancel later */
ET_INLINE wside wside_q4_0(const block_q4_0 *w) {
    wside s = {.d = h2f(w->d)};
    unpack_nibbles(w->qs, &s.q0, &s.q1);
    s.q0 = vsubq_s8(s.q0, vdupq_n_s8(8)), s.q1 = vsubq_s8(s.q1, vdupq_n_s8(8));
    return s;
}
ET_INLINE wside wside_q4_1(const block_q4_1 *w) {
    wside s = {.d = h2f(w->d), .m = h2f(w->m)};
    unpack_nibbles(w->qs, &s.q0, &s.q1);
    return s;
}
ET_INLINE wside wside_q8_0(const block_q8_0 *w) {
    return (wside){.q0 = vld1q_s8(w->qs), .q1 = vld1q_s8(w->qs + 16), .d = h2f(w->d)};
}

/* q4_0 and q8_0: the dot carries every term */
ET_INLINE float32x4_t term_dot(float32x4_t acc, wside w, const block_q8_s *x, int8x16_t x0, int8x16_t x1) {
    return vfmaq_n_f32(acc, vcvtq_f32_s32(dot_s8x32(w.q0, w.q1, x0, x1)), w.d * x->d);
}

ET_INLINE float32x4_t term_q4_1(float32x4_t acc, wside w, const block_q8_s *x, int8x16_t x0, int8x16_t x1) {
    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot_s8x32(w.q0, w.q1, x0, x1)), w.d * x->d);
    /* the min term m*dx*sum(qx) rides in lane 0 */
    return vaddq_f32(acc, vsetq_lane_f32(w.m * (x->d * (float)x->sum), vdupq_n_f32(0.0f), 0));
}

/* y rows i..i+C-1, columns j..j+3: 4 weight rows (wr) x C activation rows over all blocks, each weight block's side
 * made once for the C rows */
#define ET_STEP_4xC(wsd, term, C)                                                                              \
    do {                                                                                                      \
        const block_q8_s *xi[C];                                                                              \
        float32x4_t acc[4][C];                                                                                \
        for (int c = 0; c < (C); c++) xi[c] = (const block_q8_s *)((const uint8_t *)x + (size_t)(i + c) * xs); \
        for (int r = 0; r < 4; r++)                                                                           \
            for (int c = 0; c < (C); c++) acc[r][c] = vdupq_n_f32(0.0f);                                      \
        for (int64_t b = 0; b < nb; b++) {                                                                    \
            int8x16_t x0[C], x1[C];                                                                           \
            for (int c = 0; c < (C); c++) x0[c] = vld1q_s8(xi[c][b].qs), x1[c] = vld1q_s8(xi[c][b].qs + 16);  \
            for (int r = 0; r < 4; r++) {                                                                     \
                const wside ws_ = wsd(&wr[r][b]);                                                             \
                for (int c = 0; c < (C); c++) acc[r][c] = term(acc[r][c], ws_, &xi[c][b], x0[c], x1[c]);      \
            }                                                                                                 \
        }                                                                                                     \
        for (int c = 0; c < (C); c++)                                                                         \
            for (int r = 0; r < 4; r++) y[(size_t)(i + c) * ldy + j + r] = vaddvq_f32(acc[r][c]);             \
    } while (0)

#define ET_GEMM_BLOCKS(name, btype, wsd, term)                                                                 \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        const int64_t nb = k / ET_QK;                                                                         \
        int64_t j = 0;                                                                                        \
        for (; j + 4 <= n; j += 4) {                                                                          \
            const btype *wr[4];                                                                               \
            for (int r = 0; r < 4; r++) wr[r] = (const btype *)((const uint8_t *)w + (size_t)(j + r) * ws);   \
            int64_t i = 0;                                                                                    \
            for (; i + 2 <= m; i += 2) ET_STEP_4xC(wsd, term, 2); /* two rows share each block's side */      \
            for (; i < m; i++) ET_STEP_4xC(wsd, term, 1);                                                     \
        }                                                                                                     \
        for (; j < n; j++) {                                                                                  \
            const btype *w0 = (const btype *)((const uint8_t *)w + (size_t)j * ws);                           \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const block_q8_s *xi = (const block_q8_s *)((const uint8_t *)x + (size_t)i * xs);             \
                float32x4_t a0 = vdupq_n_f32(0.0f);                                                           \
                for (int64_t b = 0; b < nb; b++)                                                              \
                    a0 = term(a0, wsd(&w0[b]), &xi[b], vld1q_s8(xi[b].qs), vld1q_s8(xi[b].qs + 16));          \
                y[(size_t)i * ldy + j] = vaddvq_f32(a0);                                                      \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_BLOCKS(ET_NEON_NAME(gemm_q4_0), block_q4_0, wside_q4_0, term_dot)
ET_GEMM_BLOCKS(ET_NEON_NAME(gemm_q4_1), block_q4_1, wside_q4_1, term_q4_1)
ET_GEMM_BLOCKS(ET_NEON_NAME(gemm_q8_0), block_q8_0, wside_q8_0, term_dot)

/* --- float weights: 16 lanes per step, then 4, then the scalar tail --- */

ET_INLINE float32x4_t load_w_f32(const float *w) { return vld1q_f32(w); }
ET_INLINE float32x4_t load_w_f16(const et_half *w) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w))); }
ET_INLINE float scalar_w_f32(const float *w) { return *w; }
ET_INLINE float scalar_w_f16(const et_half *w) { return h2f(*w); }

#define ET_GEMM_FLOAT(name, wt, loadw, scalarw)                                                                \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            const wt *wj = (const wt *)((const uint8_t *)w + (size_t)j * ws);                                 \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const float *xi = (const float *)((const uint8_t *)x + (size_t)i * xs);                       \
                float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;                                \
                int64_t c = 0;                                                                                \
                for (; c + 16 <= k; c += 16) {                                                                \
                    a0 = vfmaq_f32(a0, loadw(wj + c), vld1q_f32(xi + c));                                     \
                    a1 = vfmaq_f32(a1, loadw(wj + c + 4), vld1q_f32(xi + c + 4));                             \
                    a2 = vfmaq_f32(a2, loadw(wj + c + 8), vld1q_f32(xi + c + 8));                             \
                    a3 = vfmaq_f32(a3, loadw(wj + c + 12), vld1q_f32(xi + c + 12));                           \
                }                                                                                             \
                for (; c + 4 <= k; c += 4) a0 = vfmaq_f32(a0, loadw(wj + c), vld1q_f32(xi + c));              \
                float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));                        \
                for (; c < k; c++) s += scalarw(wj + c) * xi[c];                                              \
                y[(size_t)i * ldy + j] = s;                                                                   \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_FLOAT(ET_NEON_NAME(gemm_f32), float, load_w_f32, scalar_w_f32)
ET_GEMM_FLOAT(ET_NEON_NAME(gemm_f16), et_half, load_w_f16, scalar_w_f16)

/* ---- activations: et_quantize_row_q8_s with the same float operations (max and integer sums are exact in any
 * order; one multiply and FCVTNS, round to nearest even, per value), 4 lanes at a time ---- */

static int ET_NEON_NAME(quantize_row_q8_s)(const float *x, block_q8_s *y, int64_t k) {
    const float32x4_t fmax = vdupq_n_f32(3.4028234663852886e38f);
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float *xb = x + b * ET_QK;
        float32x4_t v[8], m = vdupq_n_f32(0.0f);
        uint32x4_t finite = vdupq_n_u32(0xFFFFFFFFu);
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(xb + 4 * i);
            const float32x4_t a = vabsq_f32(v[i]);
            finite = vandq_u32(finite, vcleq_f32(a, fmax)); /* NaN compares false, so it fails like Inf */
            m = vmaxq_f32(m, a);
        }
        if (vminvq_u32(finite) != 0xFFFFFFFFu) return -1;
        const float amax = vmaxvq_f32(m);
        const float id = et_q8s_inverse(amax);
        int32x4_t s = vdupq_n_s32(0);
        int16x8_t h[4];
        for (int i = 0; i < 4; i++) {
            const int32x4_t q0 = vcvtnq_s32_f32(vmulq_n_f32(v[2 * i], id));
            const int32x4_t q1 = vcvtnq_s32_f32(vmulq_n_f32(v[2 * i + 1], id));
            s = vaddq_s32(s, vaddq_s32(q0, q1));
            h[i] = vcombine_s16(vmovn_s32(q0), vmovn_s32(q1)); /* codes are in [-127, 127]: narrowing is exact */
        }
        vst1q_s8(y[b].qs, vcombine_s8(vmovn_s16(h[0]), vmovn_s16(h[1])));
        vst1q_s8(y[b].qs + 16, vcombine_s8(vmovn_s16(h[2]), vmovn_s16(h[3])));
        y[b].d = amax / 127.0f;
        y[b].sum = vaddvq_s32(s);
    }
    return 0;
}

#if ET_DOTPROD
const et_kernels et_kernels_neon_dotprod = {
    .name = "neon",
    .gemv_t_f16 = et_gemv_t_f16_neon,
    .softmax = et_softmax_neon,
    .gemm_q4_0 = gemm_q4_0_neon_dotprod,
    .gemm_q4_1 = gemm_q4_1_neon_dotprod,
    .gemm_q8_0 = gemm_q8_0_neon_dotprod,
    .gemm_f16 = gemm_f16_neon_dotprod,
    .gemm_f32 = gemm_f32_neon_dotprod,
    .quantize_row_q8_s = quantize_row_q8_s_neon_dotprod,
};
ET_NEON_END
#else
const et_kernels et_kernels_neon = {
    .name = "neon",
    .gemv_t_f16 = et_gemv_t_f16_neon,
    .softmax = et_softmax_neon,
    .gemm_q4_0 = gemm_q4_0_neon,
    .gemm_q4_1 = gemm_q4_1_neon,
    .gemm_q8_0 = gemm_q8_0_neon,
    .gemm_f16 = gemm_f16_neon,
    .gemm_f32 = gemm_f32_neon,
    .quantize_row_q8_s = quantize_row_q8_s_neon,
};
#endif

#endif /* __aarch64__ */
