/* fc_s8/avx2.c — INT8 fully-connected with AVX2 (no dot-product instruction), rowc_s as the starting value. Two
 * kernels, both exact:
 *   - weights in [-127, 127] (what TFLite's int8 weight quantization writes): vpmaddubsw(|x|, sign(w, x)) gives
 *     pairs of x * w in int16 without saturating (|x| <= 128, |w| <= 127: a pair is at most 2 * 128 * 127 = 32512),
 *     vpmaddwd with ones widens them to int32. Half a packed 64-byte row is 8 channels x 4 k, so each lane is one
 *     channel's sum. A 16-channel tile (kp * 16 bytes, in L1) serves up to four activation rows at a time, and every
 *     row before the tile moves on: each weight byte is read from memory once per call. A single row (decode)
 *     takes four tiles at a time instead: four weight streams in flight.
 *   - a weight of -128 (its sign cannot be moved onto x): weights and activations widened to int16, vpmaddwd sums
 *     pairs of products exactly; a 16-byte quarter of a packed row is 4 channels x 4 k, so each of the 4 channels
 *     gets two partial sums, added pairwise at the end. Two rows share each widened weight vector. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>
#include <string.h>

#include "../core.h"
#include "fc_s8.h"

/* 4 int8 of x as 4 int16, repeated in each 64-bit lane; the tail form zero-pads past len < 4 */
static inline __m256i xpat(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(v)));
}

static inline __m256i xpat_tail(const int8_t *x, int64_t len) {
    int32_t v = 0;
    memcpy(&v, x, (size_t)len);
    return _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(v)));
}

/* 8 int32 = 4 channels x 2 partials, twice -> 8 channel sums in order */
static inline __m256i fold(__m256i p, __m256i q) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(p, q), 0xD8);
}

static void store16(const et_fc_s8_args *a, __m256i lo8, __m256i hi8, int64_t i, int64_t j, int64_t nj) {
    const __m256 fmin = _mm256_set1_ps(a->fmin), fmax = _mm256_set1_ps(a->fmax);
    const __m256i zp = _mm256_set1_epi32(a->y_zp);
    lo8 = _mm256_add_epi32(lo8, _mm256_loadu_si256((const __m256i *)(a->rowc_s + j)));
    hi8 = _mm256_add_epi32(hi8, _mm256_loadu_si256((const __m256i *)(a->rowc_s + j + 8)));
    __m256 f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(lo8), _mm256_loadu_ps(a->scale + j));
    __m256 f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(hi8), _mm256_loadu_ps(a->scale + j + 8));
    if (a->yf) { /* float output */
        float *df = a->yf + i * a->n + j;
        if (nj >= 16) {
            _mm256_storeu_ps(df, f0), _mm256_storeu_ps(df + 8, f1);
        } else {
            float tmp[16];
            _mm256_storeu_ps(tmp, f0), _mm256_storeu_ps(tmp + 8, f1);
            memcpy(df, tmp, (size_t)nj * sizeof(float));
        }
        return;
    }
    f0 = _mm256_min_ps(_mm256_max_ps(f0, fmin), fmax);
    f1 = _mm256_min_ps(_mm256_max_ps(f1, fmin), fmax);
    const __m256i v0 = _mm256_add_epi32(_mm256_cvtps_epi32(f0), zp), v1 = _mm256_add_epi32(_mm256_cvtps_epi32(f1), zp);
    const __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi32(v0, v1), 0xD8); /* 16 int16 in channel order */
    const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    int8_t *dst = a->y + i * a->n + j;
    if (nj >= 16) {
        _mm_storeu_si128((__m128i *)dst, b);
    } else {
        int8_t tmp[16];
        _mm_storeu_si128((__m128i *)tmp, b);
        memcpy(dst, tmp, (size_t)nj);
    }
}

/* rows i (and i + 1 when two) against one tile of nj <= 16 channels */
static void tile(const et_fc_s8_args *a, int64_t i, int two, int64_t j, int64_t nj) {
    const int64_t k = a->k, kp = a->kp;
    const int8_t *wb = a->w + (j / 16) * kp * 16, *x0 = a->x + i * k, *x1 = two ? x0 + k : x0;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0; /* row i, channel quads 0-3 */
    __m256i r0 = s0, r1 = s0, r2 = s0, r3 = s0;                       /* row i + 1 */
    for (int64_t kk = 0; kk < kp; kk += 4) {
        const int8_t *p = wb + kk * 16;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)p));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(p + 16)));
        const __m256i w2 = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(p + 32)));
        const __m256i w3 = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(p + 48)));
        const __m256i b0 = kk + 4 <= k ? xpat(x0 + kk) : xpat_tail(x0 + kk, k - kk);
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(w0, b0)), s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(w1, b0));
        s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(w2, b0)), s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(w3, b0));
        if (two) {
            const __m256i b1 = kk + 4 <= k ? xpat(x1 + kk) : xpat_tail(x1 + kk, k - kk);
            r0 = _mm256_add_epi32(r0, _mm256_madd_epi16(w0, b1)), r1 = _mm256_add_epi32(r1, _mm256_madd_epi16(w1, b1));
            r2 = _mm256_add_epi32(r2, _mm256_madd_epi16(w2, b1)), r3 = _mm256_add_epi32(r3, _mm256_madd_epi16(w3, b1));
        }
    }
    store16(a, fold(s0, s1), fold(s2, s3), i, j, nj);
    if (two) store16(a, fold(r0, r1), fold(r2, r3), i + 1, j, nj);
}

/* 4 int8 of x repeated in each dword */
static inline __m256i xat(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

/* 4 int8 of x (len of them, the rest zero) repeated in each dword */
static inline __m256i xquad(const int8_t *x, int64_t len) {
    int32_t v = 0;
    memcpy(&v, x, (size_t)len);
    return _mm256_set1_epi32(v);
}

/* acc0 (channels 0-7) and acc1 (8-15) += 4 k of one row against the 16 channels at p (64 bytes): x4 the row's bytes
 * broadcast, ax their absolute values; `ones` (16-bit) from the caller */
#define ET_SIGN_DOT(acc0, acc1, p, x4, ax)                                                                         \
    do {                                                                                                          \
        const __m256i w0_ = _mm256_load_si256((const __m256i *)(p));                                              \
        const __m256i w1_ = _mm256_load_si256((const __m256i *)(p) + 1);                                          \
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0_, x4)), ones)); \
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1_, x4)), ones)); \
        ET_IN_REGISTER(acc0);                                                                                     \
        ET_IN_REGISTER(acc1);                                                                                     \
    } while (0)

/* rows i..i+R-1 (R <= 4) against one tile of nj <= 16 channels whose weights are all in [-127, 127] */
static inline __attribute__((always_inline)) void tile_sign(const et_fc_s8_args *a, int64_t i, const int R, int64_t j,
                                                            int64_t nj) {
    const int64_t k = a->k, kf = k / 4 * 4;
    const int8_t *wb = a->w + (j / 16) * a->kp * 16, *x0 = a->x + i * k;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, t0 = s0, t1 = s0, u0 = s0, u1 = s0, v0 = s0, v1 = s0;
#define ET_ROWS_STEP(p, X4) /* the weight loads of p are one per step: the compiler shares them over the rows */    \
    do {                                                                                                          \
        __m256i x4 = X4(0), ax = _mm256_abs_epi8(x4);                                                             \
        ET_SIGN_DOT(s0, s1, p, x4, ax);                                                                           \
        if (R > 1) { x4 = X4(1), ax = _mm256_abs_epi8(x4); ET_SIGN_DOT(t0, t1, p, x4, ax); }                      \
        if (R > 2) { x4 = X4(2), ax = _mm256_abs_epi8(x4); ET_SIGN_DOT(u0, u1, p, x4, ax); }                      \
        if (R > 3) { x4 = X4(3), ax = _mm256_abs_epi8(x4); ET_SIGN_DOT(v0, v1, p, x4, ax); }                      \
    } while (0)
#define ET_X_AT(r) xat(x0 + (r) * k + kk)
#define ET_X_TAIL(r) xquad(x0 + (r) * k + kf, k - kf)
    for (int64_t kk = 0; kk < kf; kk += 4) ET_ROWS_STEP(wb + kk * 16, ET_X_AT);
    if (kf < k) /* the last 1-3 k: the packed weights past k are zeros, x is read only up to k */
        ET_ROWS_STEP(wb + kf * 16, ET_X_TAIL);
#undef ET_X_TAIL
#undef ET_X_AT
#undef ET_ROWS_STEP
    store16(a, s0, s1, i, j, nj);
    if (R > 1) store16(a, t0, t1, i + 1, j, nj);
    if (R > 2) store16(a, u0, u1, i + 2, j, nj);
    if (R > 3) store16(a, v0, v1, i + 3, j, nj);
}

/* one row against four full tiles from channel j (weights in [-127, 127]): four weight streams keep the loads going
 * while the multiply ports work, where one stream left them waiting (an interleaved A/B at 1x1024x1024 ..
 * 1x2048x2048, 1 thread: 15-20% faster, about a plain read's speed); the broadcast and |x| serve all four */
static void row_tiles4(const et_fc_s8_args *a, int64_t i, int64_t j) {
    const int64_t k = a->k, kf = k / 4 * 4, ts = a->kp * 16; /* ts: bytes per tile */
    const int8_t *wb = a->w + (j / 16) * ts, *x = a->x + i * k;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, t0 = s0, t1 = s0, u0 = s0, u1 = s0, v0 = s0, v1 = s0;
#define ET_ROW4_STEP(p, x4)                                                                                       \
    do {                                                                                                          \
        const __m256i ax = _mm256_abs_epi8(x4);                                                                   \
        ET_SIGN_DOT(s0, s1, p, x4, ax);                                                                           \
        ET_SIGN_DOT(t0, t1, p + ts, x4, ax);                                                                      \
        ET_SIGN_DOT(u0, u1, p + 2 * ts, x4, ax);                                                                  \
        ET_SIGN_DOT(v0, v1, p + 3 * ts, x4, ax);                                                                  \
    } while (0)
    for (int64_t kk = 0; kk < kf; kk += 4) ET_ROW4_STEP(wb + kk * 16, xat(x + kk));
    if (kf < k) /* the last 1-3 k: the packed weights past k are zeros, x is read only up to k */
        ET_ROW4_STEP(wb + kf * 16, xquad(x + kf, k - kf));
#undef ET_ROW4_STEP
    store16(a, s0, s1, i, j, 16), store16(a, t0, t1, i, j + 16, 16);
    store16(a, u0, u1, i, j + 32, 16), store16(a, v0, v1, i, j + 48, 16);
}

void et_fc_s8_avx2(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    if (a->w_m128) { /* channel tiles outer here too: each stays in L1 while the rows go past */
        for (int64_t j = j0; j < j1; j += 16)
            for (int64_t i = i0; i < i1; i += 2) tile(a, i, i + 1 < i1, j, j1 - j < 16 ? j1 - j : 16);
        return;
    }
    int64_t j = j0;
    if (i1 - i0 == 1) /* one row (decode) */
        for (; j + 64 <= j1; j += 64) row_tiles4(a, i0, j);
    for (; j < j1; j += 16) {
        const int64_t nj = j1 - j < 16 ? j1 - j : 16;
        int64_t i = i0;
        for (; i + 4 <= i1; i += 4) tile_sign(a, i, 4, j, nj);
        switch (i1 - i) { /* constant R so the accumulators stay in registers */
        case 3: tile_sign(a, i, 3, j, nj); break;
        case 2: tile_sign(a, i, 2, j, nj); break;
        case 1: tile_sign(a, i, 1, j, nj); break;
        default: break;
        }
    }
}

/* the DynamicQuantizeLinear passes with AVX2 (the reference's bytes: true division, clamp, then vcvtps2dq rounds
 * half to even under the default MXCSR) */
static int range_avx2(const float *x, int64_t count, float *mn, float *mx) {
    __m256 mn8 = _mm256_set1_ps(*mn), mx8 = _mm256_set1_ps(*mx), bad = _mm256_setzero_ps();
    __m256 mn8b = mn8, mx8b = mx8, badb = bad; /* two chains: min/max latency, not the loads, bound one */
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        const __m256 v = _mm256_loadu_ps(x + i), u = _mm256_loadu_ps(x + i + 8);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
        badb = _mm256_or_ps(badb, _mm256_cmp_ps(_mm256_sub_ps(u, u), _mm256_setzero_ps(), _CMP_NEQ_UQ));
        mn8 = _mm256_min_ps(mn8, v), mx8 = _mm256_max_ps(mx8, v);
        mn8b = _mm256_min_ps(mn8b, u), mx8b = _mm256_max_ps(mx8b, u);
    }
    for (; i + 8 <= count; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
        mn8 = _mm256_min_ps(mn8, v), mx8 = _mm256_max_ps(mx8, v);
    }
    bad = _mm256_or_ps(bad, badb), mn8 = _mm256_min_ps(mn8, mn8b), mx8 = _mm256_max_ps(mx8, mx8b);
    if (_mm256_movemask_ps(bad)) return -1;
    float lanes_mn[8], lanes_mx[8], lo = *mn, hi = *mx;
    _mm256_storeu_ps(lanes_mn, mn8), _mm256_storeu_ps(lanes_mx, mx8);
    for (int l = 0; l < 8; l++) lo = lanes_mn[l] < lo ? lanes_mn[l] : lo, hi = lanes_mx[l] > hi ? lanes_mx[l] : hi;
    for (; i < count; i++) {
        const float v = x[i];
        if (!(v - v == 0.0f)) return -1;
        lo = v < lo ? v : lo, hi = v > hi ? v : hi;
    }
    *mn = lo, *mx = hi;
    return 0;
}

/* lanes where t = x * fl(1/scale) may round differently from the correctly rounded x / scale: |t - x/scale| <=
 * |t| * 2^-22.9 (two roundings of 2^-24 each, plus the quotient's own), so outside a band of |t| * 2^-20 around a
 * half-integer both round to the same integer; inside it (rare: a tie, or data made of ties) the lane is divided */
static inline __m256 quotient(__m256 xv, __m256 inv, __m256 s8) {
    const __m256 t = _mm256_mul_ps(xv, inv);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 d = _mm256_andnot_ps(sign, _mm256_sub_ps(t, _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT |
                                                                                   _MM_FROUND_NO_EXC)));
    const __m256 band = _mm256_add_ps(_mm256_mul_ps(_mm256_andnot_ps(sign, t), _mm256_set1_ps(0x1p-20f)),
                                      _mm256_set1_ps(0x1p-30f));
    const __m256 near = _mm256_cmp_ps(_mm256_sub_ps(_mm256_set1_ps(0.5f), d), band, _CMP_LE_OQ);
    return _mm256_movemask_ps(near) ? _mm256_blendv_ps(t, _mm256_div_ps(xv, s8), near) : t;
}

static void codes_avx2(const float *x, int64_t count, float scale, int32_t zp, int8_t *q) {
    const __m256 s8 = _mm256_set1_ps(scale), lo = _mm256_set1_ps((float)-zp), hi = _mm256_set1_ps((float)(255 - zp));
    const __m256i off = _mm256_set1_epi32(zp - 128);
    float inv1;
    const int fast = et_fc_s8_reciprocal(scale, &inv1);
    const __m256 inv = _mm256_set1_ps(inv1);
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        const __m256 f0 = fast ? quotient(x0, inv, s8) : _mm256_div_ps(x0, s8);
        const __m256 f1 = fast ? quotient(x1, inv, s8) : _mm256_div_ps(x1, s8);
        const __m256 a0 = _mm256_min_ps(_mm256_max_ps(f0, lo), hi);
        const __m256 a1 = _mm256_min_ps(_mm256_max_ps(f1, lo), hi);
        const __m256i v0 = _mm256_add_epi32(_mm256_cvtps_epi32(a0), off);
        const __m256i v1 = _mm256_add_epi32(_mm256_cvtps_epi32(a1), off);
        const __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi32(v0, v1), 0xD8); /* 16 int16 in order */
        _mm_storeu_si128((__m128i *)(q + i),
                         _mm_packs_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    }
    const float flo = (float)-zp, fhi = (float)(255 - zp);
    for (; i < count; i++) {
        float v = x[i] / scale;
        v = v < flo ? flo : (v > fhi ? fhi : v);
        q[i] = (int8_t)(_mm_cvtss_si32(_mm_set_ss(v)) + zp - 128);
    }
}

const et_fc_s8_quantizer et_fc_s8_quantizer_avx2 = {range_avx2, codes_avx2};

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
