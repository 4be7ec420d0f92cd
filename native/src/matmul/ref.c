/* matmul/ref.c — scalar reference kernels: the spec every SIMD variant is tested against.
 *
 * Block formats multiply integer quants block by block against block_q8_s activations:
 *   q4_0: dw*dx*(sum(qw*qx) - 8*sum(qx))       (qw unsigned nibbles)
 *   q4_1: dw*dx*sum(qw*qx) + mw*dx*sum(qx)
 *   q8_0: dw*dx*sum(qw*qx)
 */
#include "../core.h"

static float dot_q4_0_q8_s_ref(int64_t nb, const block_q4_0 *w, const block_q8_s *x) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t sumi = 0;
        for (int j = 0; j < ET_QK / 2; j++) {
            sumi += (w[b].qs[j] & 0x0F) * x[b].qs[j];
            sumi += (w[b].qs[j] >> 4) * x[b].qs[j + ET_QK / 2];
        }
        acc += (float)(sumi - 8 * x[b].sum) * (et_fp16_to_fp32(w[b].d) * x[b].d);
    }
    return acc;
}

static float dot_q4_1_q8_s_ref(int64_t nb, const block_q4_1 *w, const block_q8_s *x) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t sumi = 0;
        for (int j = 0; j < ET_QK / 2; j++) {
            sumi += (w[b].qs[j] & 0x0F) * x[b].qs[j];
            sumi += (w[b].qs[j] >> 4) * x[b].qs[j + ET_QK / 2];
        }
        acc += (float)sumi * (et_fp16_to_fp32(w[b].d) * x[b].d) + et_fp16_to_fp32(w[b].m) * (x[b].d * (float)x[b].sum);
    }
    return acc;
}

static float dot_q8_0_q8_s_ref(int64_t nb, const block_q8_0 *w, const block_q8_s *x) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t sumi = 0;
        for (int j = 0; j < ET_QK; j++) sumi += w[b].qs[j] * x[b].qs[j];
        acc += (float)sumi * (et_fp16_to_fp32(w[b].d) * x[b].d);
    }
    return acc;
}

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

const et_kernels et_kernels_ref = {
    .name = "ref",
    .gemv_t_f16 = et_gemv_t_f16_ref,
    .gemm_q4_0 = gemm_q4_0_ref,
    .gemm_q4_1 = gemm_q4_1_ref,
    .gemm_q8_0 = gemm_q8_0_ref,
    .gemm_f16 = gemm_f16_ref,
    .gemm_f32 = gemm_f32_ref,
};
