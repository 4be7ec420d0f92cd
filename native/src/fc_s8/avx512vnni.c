/* fc_s8/avx512vnni.c — INT8 fully-connected with vpdpbusd: 16 output channels per zmm, 4 activation rows share
 * each weight load; requantization in fp32 (cvtps rounds half to even, as lrintf). Scalar tail: the spec. */
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>
#include <string.h>

#include "fc_s8.h"

static inline void store16(const et_fc_s8_args *a, __m512i acc, int64_t i, int64_t j, __mmask16 mask) {
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_maskz_loadu_ps(mask, a->scale + j));
    __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(f), _mm512_set1_epi32(a->y_zp));
    v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(a->lo)), _mm512_set1_epi32(a->hi));
    _mm_mask_storeu_epi8(a->y + i * a->n + j, mask, _mm512_cvtepi32_epi8(v));
}

/* one activation row against 64 channels (4 tiles): 8 independent vpdpbusd chains hide its latency */
static void row_x4tiles(const et_fc_s8_args *a, int64_t i, int64_t j) {
    const int64_t kp = a->kp;
    const int8_t *w0 = a->w + (j / 16) * kp * 16, *w1 = w0 + kp * 16, *w2 = w1 + kp * 16, *w3 = w2 + kp * 16;
    const uint8_t *x = a->xu + i * kp;
    __m512i s0 = _mm512_loadu_si512(a->rowc + j), s1 = _mm512_loadu_si512(a->rowc + j + 16);
    __m512i s2 = _mm512_loadu_si512(a->rowc + j + 32), s3 = _mm512_loadu_si512(a->rowc + j + 48);
    __m512i t0 = _mm512_setzero_si512(), t1 = t0, t2 = t0, t3 = t0;
    int64_t kk = 0;
    for (; kk + 8 <= kp; kk += 8) {
        int32_t v0, v1;
        memcpy(&v0, x + kk, 4), memcpy(&v1, x + kk + 4, 4);
        const __m512i b0 = _mm512_set1_epi32(v0), b1 = _mm512_set1_epi32(v1);
        s0 = _mm512_dpbusd_epi32(s0, b0, _mm512_load_si512((const void *)(w0 + kk * 16)));
        s1 = _mm512_dpbusd_epi32(s1, b0, _mm512_load_si512((const void *)(w1 + kk * 16)));
        s2 = _mm512_dpbusd_epi32(s2, b0, _mm512_load_si512((const void *)(w2 + kk * 16)));
        s3 = _mm512_dpbusd_epi32(s3, b0, _mm512_load_si512((const void *)(w3 + kk * 16)));
        t0 = _mm512_dpbusd_epi32(t0, b1, _mm512_load_si512((const void *)(w0 + kk * 16 + 64)));
        t1 = _mm512_dpbusd_epi32(t1, b1, _mm512_load_si512((const void *)(w1 + kk * 16 + 64)));
        t2 = _mm512_dpbusd_epi32(t2, b1, _mm512_load_si512((const void *)(w2 + kk * 16 + 64)));
        t3 = _mm512_dpbusd_epi32(t3, b1, _mm512_load_si512((const void *)(w3 + kk * 16 + 64)));
    }
    for (; kk < kp; kk += 4) {
        int32_t v0;
        memcpy(&v0, x + kk, 4);
        const __m512i b0 = _mm512_set1_epi32(v0);
        s0 = _mm512_dpbusd_epi32(s0, b0, _mm512_load_si512((const void *)(w0 + kk * 16)));
        s1 = _mm512_dpbusd_epi32(s1, b0, _mm512_load_si512((const void *)(w1 + kk * 16)));
        s2 = _mm512_dpbusd_epi32(s2, b0, _mm512_load_si512((const void *)(w2 + kk * 16)));
        s3 = _mm512_dpbusd_epi32(s3, b0, _mm512_load_si512((const void *)(w3 + kk * 16)));
    }
    store16(a, _mm512_add_epi32(s0, t0), i, j, 0xFFFF), store16(a, _mm512_add_epi32(s1, t1), i, j + 16, 0xFFFF);
    store16(a, _mm512_add_epi32(s2, t2), i, j + 32, 0xFFFF), store16(a, _mm512_add_epi32(s3, t3), i, j + 48, 0xFFFF);
}

void et_fc_s8_avx512vnni(const et_fc_s8_args *a, int64_t j0, int64_t j1) {
    const int64_t kp = a->kp;
    if (a->m < 4) {  /* few rows (decode-like): 64 channels per pass */
        for (; j0 + 64 <= j1; j0 += 64)
            for (int64_t i = 0; i < a->m; i++) row_x4tiles(a, i, j0);
    }
    for (int64_t j = j0; j < j1; j += 16) {
        const int64_t nj = j1 - j < 16 ? j1 - j : 16;
        const __mmask16 mask = (__mmask16)((1u << nj) - 1u);
        const int8_t *wb = a->w + (j / 16) * kp * 16;
        const __m512i c = _mm512_maskz_loadu_epi32(mask, a->rowc + j);
        int64_t i = 0;
        for (; i + 4 <= a->m; i += 4) {
            const uint8_t *x0 = a->xu + i * kp, *x1 = x0 + kp, *x2 = x1 + kp, *x3 = x2 + kp;
            __m512i s0 = c, s1 = c, s2 = c, s3 = c;
            for (int64_t kk = 0; kk < kp; kk += 4) {
                const __m512i w = _mm512_load_si512((const void *)(wb + kk * 16));
                int32_t v0, v1, v2, v3;
                memcpy(&v0, x0 + kk, 4), memcpy(&v1, x1 + kk, 4), memcpy(&v2, x2 + kk, 4), memcpy(&v3, x3 + kk, 4);
                s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(v0), w);
                s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(v1), w);
                s2 = _mm512_dpbusd_epi32(s2, _mm512_set1_epi32(v2), w);
                s3 = _mm512_dpbusd_epi32(s3, _mm512_set1_epi32(v3), w);
            }
            store16(a, s0, i, j, mask), store16(a, s1, i + 1, j, mask);
            store16(a, s2, i + 2, j, mask), store16(a, s3, i + 3, j, mask);
        }
        for (; i < a->m; i++) {
            const uint8_t *x0 = a->xu + i * kp;
            __m512i s0 = c, s1 = _mm512_setzero_si512();
            int64_t kk = 0;
            for (; kk + 8 <= kp; kk += 8) {  /* two chains: vpdpbusd latency */
                int32_t v0, v1;
                memcpy(&v0, x0 + kk, 4), memcpy(&v1, x0 + kk + 4, 4);
                s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(v0), _mm512_load_si512((const void *)(wb + kk * 16)));
                s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(v1),
                                         _mm512_load_si512((const void *)(wb + (kk + 4) * 16)));
            }
            for (; kk < kp; kk += 4) {
                int32_t v0;
                memcpy(&v0, x0 + kk, 4);
                s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(v0), _mm512_load_si512((const void *)(wb + kk * 16)));
            }
            store16(a, _mm512_add_epi32(s0, s1), i, j, mask);
        }
    }
}
#else
#include "fc_s8.h"
void et_fc_s8_avx512vnni(const et_fc_s8_args *a, int64_t j0, int64_t j1) { et_fc_s8_ref(a, j0, j1); }
#endif
