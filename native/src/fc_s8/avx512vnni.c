/* fc_s8/avx512vnni.c — INT8 fully-connected with vpdpbusd (u8 x s8 -> s32): x + 128 (x ^ 0x80, made as each 4-byte
 * group is broadcast) against the packed weights, rowc_u as the starting value. 16 output channels per zmm.
 * One row: 4 tiles (64 channels) with 8 independent chains, so the weight stream runs at the cache's rate; 4 rows:
 * 4 rows x 4 tiles, 16 accumulators, each weight load serving 4 rows. The output step is avx512_store.h's. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#endif
#include <immintrin.h>
#include <string.h>

#include "avx512_store.h"
#include "fc_s8.h"

static inline __m512i bcast_u8(const int8_t *x) { /* 4 bytes of x at x, + 128 each */
    int32_t v;
    memcpy(&v, x, 4);
    return _mm512_set1_epi32(v ^ (int32_t)0x80808080u);
}

static inline __m512i bcast_u8_tail(const int8_t *x, int64_t len) { /* len < 4 bytes, the rest 0 (+128: w is 0) */
    int32_t v = 0;
    memcpy(&v, x, (size_t)len);
    return _mm512_set1_epi32(v ^ (int32_t)0x80808080u);
}

static inline __m512i wload(const int8_t *p) { return _mm512_load_si512((const void *)p); }

/* one row, 64 channels: 8 chains (two k-quads in flight per tile) */
static void row1_x4(const et_fc_s8_args *a, int64_t i, int64_t j) {
    const int64_t kp = a->kp, k = a->k, k4 = k & ~(int64_t)3;
    const int8_t *w0 = a->w + (j / 16) * kp * 16, *w1 = w0 + kp * 16, *w2 = w1 + kp * 16, *w3 = w2 + kp * 16;
    const int8_t *x = a->x + i * k;
    __m512i s0 = _mm512_loadu_si512(a->rowc_u + j), s1 = _mm512_loadu_si512(a->rowc_u + j + 16);
    __m512i s2 = _mm512_loadu_si512(a->rowc_u + j + 32), s3 = _mm512_loadu_si512(a->rowc_u + j + 48);
    __m512i t0 = _mm512_setzero_si512(), t1 = t0, t2 = t0, t3 = t0;
    int64_t kk = 0;
    for (; kk + 8 <= k4; kk += 8) {
        const __m512i b0 = bcast_u8(x + kk), b1 = bcast_u8(x + kk + 4);
        s0 = _mm512_dpbusd_epi32(s0, b0, wload(w0 + kk * 16));
        s1 = _mm512_dpbusd_epi32(s1, b0, wload(w1 + kk * 16));
        s2 = _mm512_dpbusd_epi32(s2, b0, wload(w2 + kk * 16));
        s3 = _mm512_dpbusd_epi32(s3, b0, wload(w3 + kk * 16));
        t0 = _mm512_dpbusd_epi32(t0, b1, wload(w0 + kk * 16 + 64));
        t1 = _mm512_dpbusd_epi32(t1, b1, wload(w1 + kk * 16 + 64));
        t2 = _mm512_dpbusd_epi32(t2, b1, wload(w2 + kk * 16 + 64));
        t3 = _mm512_dpbusd_epi32(t3, b1, wload(w3 + kk * 16 + 64));
    }
    for (; kk < kp; kk += 4) {
        const __m512i b0 = kk < k4 ? bcast_u8(x + kk) : bcast_u8_tail(x + kk, k - kk);
        s0 = _mm512_dpbusd_epi32(s0, b0, wload(w0 + kk * 16));
        s1 = _mm512_dpbusd_epi32(s1, b0, wload(w1 + kk * 16));
        s2 = _mm512_dpbusd_epi32(s2, b0, wload(w2 + kk * 16));
        s3 = _mm512_dpbusd_epi32(s3, b0, wload(w3 + kk * 16));
    }
    et_fc_s8_store16(a, _mm512_add_epi32(s0, t0), i, j, 0xFFFF);
    et_fc_s8_store16(a, _mm512_add_epi32(s1, t1), i, j + 16, 0xFFFF);
    et_fc_s8_store16(a, _mm512_add_epi32(s2, t2), i, j + 32, 0xFFFF);
    et_fc_s8_store16(a, _mm512_add_epi32(s3, t3), i, j + 48, 0xFFFF);
}

/* one row, one tile of nj <= 16 channels: 2 chains */
static void row1_x1(const et_fc_s8_args *a, int64_t i, int64_t j, int64_t nj) {
    const int64_t kp = a->kp, k = a->k, k4 = k & ~(int64_t)3;
    const int8_t *wb = a->w + (j / 16) * kp * 16, *x = a->x + i * k;
    __m512i s0 = _mm512_loadu_si512(a->rowc_u + j), s1 = _mm512_setzero_si512();
    int64_t kk = 0;
    for (; kk + 8 <= k4; kk += 8) {
        s0 = _mm512_dpbusd_epi32(s0, bcast_u8(x + kk), wload(wb + kk * 16));
        s1 = _mm512_dpbusd_epi32(s1, bcast_u8(x + kk + 4), wload(wb + kk * 16 + 64));
    }
    for (; kk < kp; kk += 4)
        s0 = _mm512_dpbusd_epi32(s0, kk < k4 ? bcast_u8(x + kk) : bcast_u8_tail(x + kk, k - kk), wload(wb + kk * 16));
    et_fc_s8_store16(a, _mm512_add_epi32(s0, s1), i, j, et_fc_s8_mask16(nj));
}

/* four rows x four tiles (64 channels): 16 accumulators */
static void row4_x4(const et_fc_s8_args *a, int64_t i, int64_t j) {
    const int64_t kp = a->kp, k = a->k, k4 = k & ~(int64_t)3;
    const int8_t *w0 = a->w + (j / 16) * kp * 16, *w1 = w0 + kp * 16, *w2 = w1 + kp * 16, *w3 = w2 + kp * 16;
    const int8_t *x0 = a->x + i * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
    const __m512i c0 = _mm512_loadu_si512(a->rowc_u + j), c1 = _mm512_loadu_si512(a->rowc_u + j + 16);
    const __m512i c2 = _mm512_loadu_si512(a->rowc_u + j + 32), c3 = _mm512_loadu_si512(a->rowc_u + j + 48);
    __m512i s00 = c0, s01 = c1, s02 = c2, s03 = c3, s10 = c0, s11 = c1, s12 = c2, s13 = c3;
    __m512i s20 = c0, s21 = c1, s22 = c2, s23 = c3, s30 = c0, s31 = c1, s32 = c2, s33 = c3;
#define STEP(BCAST)                                                                                                \
    {                                                                                                              \
        const __m512i v0 = wload(w0 + kk * 16), v1 = wload(w1 + kk * 16), v2 = wload(w2 + kk * 16),                 \
                      v3 = wload(w3 + kk * 16);                                                                    \
        __m512i b;                                                                                                 \
        ROW(0, x0, BCAST) ROW(1, x1, BCAST) ROW(2, x2, BCAST) ROW(3, x3, BCAST)                                    \
    }
#define ROW(r, xr, BCAST)                                                                                          \
    b = BCAST(xr);                                                                                                 \
    s##r##0 = _mm512_dpbusd_epi32(s##r##0, b, v0), s##r##1 = _mm512_dpbusd_epi32(s##r##1, b, v1);                   \
    s##r##2 = _mm512_dpbusd_epi32(s##r##2, b, v2), s##r##3 = _mm512_dpbusd_epi32(s##r##3, b, v3);
#define FULL(xr) bcast_u8(xr + kk)
#define TAIL(xr) bcast_u8_tail(xr + kk, k - kk)
    int64_t kk = 0;
    for (; kk < k4; kk += 4) STEP(FULL)
    if (kk < kp) STEP(TAIL)
#undef STEP
#undef ROW
#undef FULL
#undef TAIL
    et_fc_s8_store16(a, s00, i, j, 0xFFFF), et_fc_s8_store16(a, s01, i, j + 16, 0xFFFF);
    et_fc_s8_store16(a, s02, i, j + 32, 0xFFFF), et_fc_s8_store16(a, s03, i, j + 48, 0xFFFF);
    et_fc_s8_store16(a, s10, i + 1, j, 0xFFFF), et_fc_s8_store16(a, s11, i + 1, j + 16, 0xFFFF);
    et_fc_s8_store16(a, s12, i + 1, j + 32, 0xFFFF), et_fc_s8_store16(a, s13, i + 1, j + 48, 0xFFFF);
    et_fc_s8_store16(a, s20, i + 2, j, 0xFFFF), et_fc_s8_store16(a, s21, i + 2, j + 16, 0xFFFF);
    et_fc_s8_store16(a, s22, i + 2, j + 32, 0xFFFF), et_fc_s8_store16(a, s23, i + 2, j + 48, 0xFFFF);
    et_fc_s8_store16(a, s30, i + 3, j, 0xFFFF), et_fc_s8_store16(a, s31, i + 3, j + 16, 0xFFFF);
    et_fc_s8_store16(a, s32, i + 3, j + 32, 0xFFFF), et_fc_s8_store16(a, s33, i + 3, j + 48, 0xFFFF);
}

/* four rows x one tile of nj <= 16 channels */
static void row4_x1(const et_fc_s8_args *a, int64_t i, int64_t j, int64_t nj) {
    const int64_t kp = a->kp, k = a->k, k4 = k & ~(int64_t)3;
    const int8_t *wb = a->w + (j / 16) * kp * 16;
    const int8_t *x0 = a->x + i * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
    const __m512i c = _mm512_loadu_si512(a->rowc_u + j);
    __m512i s0 = c, s1 = c, s2 = c, s3 = c;
    for (int64_t kk = 0; kk < kp; kk += 4) {
        const __m512i w = wload(wb + kk * 16);
        if (kk < k4) {
            s0 = _mm512_dpbusd_epi32(s0, bcast_u8(x0 + kk), w), s1 = _mm512_dpbusd_epi32(s1, bcast_u8(x1 + kk), w);
            s2 = _mm512_dpbusd_epi32(s2, bcast_u8(x2 + kk), w), s3 = _mm512_dpbusd_epi32(s3, bcast_u8(x3 + kk), w);
        } else {
            const int64_t r = k - kk;
            s0 = _mm512_dpbusd_epi32(s0, bcast_u8_tail(x0 + kk, r), w);
            s1 = _mm512_dpbusd_epi32(s1, bcast_u8_tail(x1 + kk, r), w);
            s2 = _mm512_dpbusd_epi32(s2, bcast_u8_tail(x2 + kk, r), w);
            s3 = _mm512_dpbusd_epi32(s3, bcast_u8_tail(x3 + kk, r), w);
        }
    }
    const __mmask16 mask = et_fc_s8_mask16(nj);
    et_fc_s8_store16(a, s0, i, j, mask), et_fc_s8_store16(a, s1, i + 1, j, mask);
    et_fc_s8_store16(a, s2, i + 2, j, mask), et_fc_s8_store16(a, s3, i + 3, j, mask);
}

void et_fc_s8_avx512vnni(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4) {
        int64_t j = j0;
        for (; j + 64 <= j1; j += 64) row4_x4(a, i, j);
        for (; j < j1; j += 16) row4_x1(a, i, j, j1 - j);
    }
    for (; i < i1; i++) {
        int64_t j = j0;
        for (; j + 64 <= j1; j += 64) row1_x4(a, i, j);
        for (; j < j1; j += 16) row1_x1(a, i, j, j1 - j);
    }
}

/* ---- DynamicQuantizeLinear passes, 16 lanes, tails masked: the range as avx2.c's; the codes with a constant tie
 * band and saturating packs (the reference's bytes, as avx2.c's) ---- */

static int range_avx512(const float *x, int64_t count, float *mn, float *mx) {
    __m512 mn0 = _mm512_set1_ps(*mn), mx0 = _mm512_set1_ps(*mx), mn1 = mn0, mx1 = mx0;
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 32 <= count; i += 32) { /* two chains: min/max latency, not the loads, bound one */
        const __m512 v = _mm512_loadu_ps(x + i), u = _mm512_loadu_ps(x + i + 16);
        bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);
        bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(u, u), _mm512_setzero_ps(), _CMP_NEQ_UQ);
        mn0 = _mm512_min_ps(mn0, v), mx0 = _mm512_max_ps(mx0, v);
        mn1 = _mm512_min_ps(mn1, u), mx1 = _mm512_max_ps(mx1, u);
    }
    for (; i < count; i += 16) {
        const __mmask16 k = count - i >= 16 ? 0xFFFF : (__mmask16)((1u << (count - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
        bad |= _mm512_mask_cmp_ps_mask(k, _mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);
        mn0 = _mm512_mask_min_ps(mn0, k, mn0, v), mx0 = _mm512_mask_max_ps(mx0, k, mx0, v);
    }
    if (bad) return -1;
    *mn = _mm512_reduce_min_ps(_mm512_min_ps(mn0, mn1));
    *mx = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
    return 0;
}

/* the codes pass alone also needs AVX512DQ (vreduceps): picked only where the CPU has it (et_cpu_avx512dq) */
#define ET_CODES_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

/* |t| capped at 256, rounded to int32: past 256 the caller's saturation gives the code either way */
ET_CODES_TARGET static inline __m512i cap_cvt16(__m512 t) {
    const __m512 cap = _mm512_set1_ps(256.0f);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t, _mm512_sub_ps(_mm512_setzero_ps(), cap)), cap));
}

/* clamp(rint(x / scale), -zp, 255 - zp) + zp - 128 of 16 values, before the clamp: t = x * fl(1/scale), divided only
 * in lanes within 2^-12 of a half-integer, then cap_cvt16. |t - x/scale| <= |t| * 2^-22.9 (see quotient() in
 * avx2.c), so where |t| <= 256 the band 2^-12 holds every lane whose rounding could differ; where |t| > 256 both
 * round past 255 and the caller's saturation (at most 255 from any zero point) gives the same code */
ET_CODES_TARGET static inline __m512i code16(__m512 xv, __m512 inv, __m512 s16) {
    __m512 t = _mm512_mul_ps(xv, inv);
    const __m512 frac = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* t - rint(t) */
    const __mmask16 near =
        _mm512_cmp_ps_mask(_mm512_abs_ps(frac), _mm512_set1_ps(0.5f - 0x1p-12f - 0x1p-29f), _CMP_GE_OQ);
    if (near) t = _mm512_mask_div_ps(t, near, xv, s16);
    return cap_cvt16(t);
}

/* 64 values a step: codes as int32 in [-256, 256], packed with signed saturation to int16, the zero point added
 * there (|sum| < 2^15), packed again with saturation to int8: that saturation is the clamp to [-zp, 255 - zp], and
 * one permute puts the 4 vectors' bytes, interleaved per 128-bit lane by the packs, back in order */
ET_CODES_TARGET static void codes_avx512(const float *x, int64_t count, float scale, int32_t zp, int8_t *q) {
    const __m512 s16 = _mm512_set1_ps(scale);
    float inv1;
    const int fast = et_fc_s8_reciprocal(scale, &inv1);
    const __m512 inv = _mm512_set1_ps(inv1); /* not fast: unused, every lane divides */
    const __m512i off16 = _mm512_set1_epi16((int16_t)(zp - 128)), off = _mm512_set1_epi32(zp - 128);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    int64_t i = 0;
    if (fast)
        for (; i + 64 <= count; i += 64) {
            const __m512i a = code16(_mm512_loadu_ps(x + i), inv, s16);
            const __m512i b = code16(_mm512_loadu_ps(x + i + 16), inv, s16);
            const __m512i c = code16(_mm512_loadu_ps(x + i + 32), inv, s16);
            const __m512i d = code16(_mm512_loadu_ps(x + i + 48), inv, s16);
            const __m512i ab = _mm512_add_epi16(_mm512_packs_epi32(a, b), off16);
            const __m512i cd = _mm512_add_epi16(_mm512_packs_epi32(c, d), off16);
            _mm512_storeu_si512((void *)(q + i), _mm512_permutexvar_epi32(order, _mm512_packs_epi16(ab, cd)));
        }
    for (; i < count; i += 16) {
        const __mmask16 k = count - i >= 16 ? 0xFFFF : (__mmask16)((1u << (count - i)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(k, x + i);
        const __m512i v = fast ? code16(xv, inv, s16) : cap_cvt16(_mm512_div_ps(xv, s16));
        _mm512_mask_cvtsepi32_storeu_epi8(q + i, k, _mm512_add_epi32(v, off)); /* saturating: the clamp */
    }
}

const et_fc_s8_quantizer et_fc_s8_quantizer_avx512 = {range_avx512, codes_avx512};

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
