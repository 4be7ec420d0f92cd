/* matmul/ref.c — scalar reference kernels: the spec every SIMD variant is tested against.
 *
 * Block formats multiply integer quants block by block against block_q8_s activations:
 *   q4_0: dw*dx*(sum(qw*qx) - 8*sum(qx))       (qw unsigned nibbles)
 *   q4_1: dw*dx*sum(qw*qx) + mw*dx*sum(qx)
 *   q8_0: dw*dx*sum(qw*qx)
 */
#include "../core.h"

/* one block's term of a row's dot: the row's float sum adds these in block order */
static float term_q4_0(const block_q4_0 *w, const block_q8_s *x) {
    int32_t sumi = 0;
    for (int j = 0; j < ET_QK / 2; j++) {
        sumi += (w->qs[j] & 0x0F) * x->qs[j];
        sumi += (w->qs[j] >> 4) * x->qs[j + ET_QK / 2];
    }
    return (float)(sumi - 8 * x->sum) * (et_fp16_to_fp32(w->d) * x->d);
}

static float term_q4_1(const block_q4_1 *w, const block_q8_s *x) {
    int32_t sumi = 0;
    for (int j = 0; j < ET_QK / 2; j++) {
        sumi += (w->qs[j] & 0x0F) * x->qs[j];
        sumi += (w->qs[j] >> 4) * x->qs[j + ET_QK / 2];
    }
    return (float)sumi * (et_fp16_to_fp32(w->d) * x->d) + et_fp16_to_fp32(w->m) * (x->d * (float)x->sum);
}

static float term_q8_0(const block_q8_0 *w, const block_q8_s *x) {
    int32_t sumi = 0;
    for (int j = 0; j < ET_QK; j++) sumi += w->qs[j] * x->qs[j];
    return (float)sumi * (et_fp16_to_fp32(w->d) * x->d);
}

#define ET_DOT_BLOCKS(name, term, wtype)                                                                       \
    static float name(int64_t nb, const wtype *w, const block_q8_s *x) {                                      \
        float acc = 0.0f;                                                                                     \
        for (int64_t b = 0; b < nb; b++) acc += term(&w[b], &x[b]);                                            \
        return acc;                                                                                           \
    }

ET_DOT_BLOCKS(dot_q4_0_q8_s_ref, term_q4_0, block_q4_0)
ET_DOT_BLOCKS(dot_q4_1_q8_s_ref, term_q4_1, block_q4_1)
ET_DOT_BLOCKS(dot_q8_0_q8_s_ref, term_q8_0, block_q8_0)

static float dot_f16_f32_ref(int64_t k, const et_half *w, const float *x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; j++) acc += et_fp16_to_fp32(w[j]) * x[j];
    return acc;
}

static float dot_f32_f32_ref(int64_t k, const float *w, const float *x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; j++) acc += w[j] * x[j];
    return acc;
}

#define ET_GEMM_REF(name, dot, wtype, xtype, len)                                                              \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        for (int64_t i = 0; i < m; i++) {                                                                     \
            const xtype *xi = (const xtype *)((const uint8_t *)x + (size_t)i * xs);                            \
            for (int64_t j = 0; j < n; j++)                                                                   \
                y[(size_t)i * ldy + j] = dot(len, (const wtype *)((const uint8_t *)w + (size_t)j * ws), xi);   \
        }                                                                                                     \
    }

ET_GEMM_REF(gemm_q4_0_ref, dot_q4_0_q8_s_ref, block_q4_0, block_q8_s, k / ET_QK)
ET_GEMM_REF(gemm_q4_1_ref, dot_q4_1_q8_s_ref, block_q4_1, block_q8_s, k / ET_QK)
ET_GEMM_REF(gemm_q8_0_ref, dot_q8_0_q8_s_ref, block_q8_0, block_q8_s, k / ET_QK)
ET_GEMM_REF(gemm_f16_ref, dot_f16_f32_ref, et_half, float, k)
ET_GEMM_REF(gemm_f32_ref, dot_f32_f32_ref, float, float, k)

/* the x16 layout: row j is row j % 16 of tile j / 16 (tiles 16 * ws bytes apart); each block is read back into its
 * GGUF form and added by the same term, so the result is bit for bit the GGUF kernel's */
#define ET_GEMM_REF_X16(name, term, wtype, base)                                                               \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        const int64_t nb = k / ET_QK;                                                                         \
        for (int64_t i = 0; i < m; i++) {                                                                     \
            const block_q8_s *xi = (const block_q8_s *)((const uint8_t *)x + (size_t)i * xs);                  \
            for (int64_t j = 0; j < n; j++) {                                                                 \
                const uint8_t *tile = (const uint8_t *)w + (size_t)(j / 16) * 16 * ws;                        \
                float acc = 0.0f;                                                                             \
                for (int64_t b = 0; b < nb; b++) {                                                            \
                    wtype blk;                                                                                \
                    et_x16_get_block(base, tile, nb, (int)(j % 16), b, &blk);                                 \
                    acc += term(&blk, &xi[b]);                                                                \
                }                                                                                             \
                y[(size_t)i * ldy + j] = acc;                                                                 \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_REF_X16(gemm_q4_0_x16_ref, term_q4_0, block_q4_0, ET_TYPE_Q4_0)
ET_GEMM_REF_X16(gemm_q4_1_x16_ref, term_q4_1, block_q4_1, ET_TYPE_Q4_1)
ET_GEMM_REF_X16(gemm_q8_0_x16_ref, term_q8_0, block_q8_0, ET_TYPE_Q8_0)

const et_kernels et_kernels_ref = {
    .name = "ref",
    .gemv_t_f16 = et_gemv_t_f16_ref,
    .softmax = et_softmax_ref,
    .gemm_q4_0 = gemm_q4_0_ref,
    .gemm_q4_1 = gemm_q4_1_ref,
    .gemm_q8_0 = gemm_q8_0_ref,
    .gemm_f16 = gemm_f16_ref,
    .gemm_f32 = gemm_f32_ref,
    .gemm_q4_0_x16 = gemm_q4_0_x16_ref,
    .gemm_q4_1_x16 = gemm_q4_1_x16_ref,
    .gemm_q8_0_x16 = gemm_q8_0_x16_ref,
};
