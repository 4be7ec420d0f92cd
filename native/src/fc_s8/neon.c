/* fc_s8/neon.c — INT8 fully-connected with AArch64 Advanced SIMD, signed x against the packed weights, rowc_s as the
 * starting value. A 16-byte quarter of a packed 64-byte row is 4 channels x 4 k. With SDOT (neon_dotprod.c compiles
 * this file again with ET_DOTPROD=1) one instruction sums each channel's 4 products; without it, widening
 * multiplies (s8 x s8 -> s16, at most 2^14 in magnitude) and pairwise widening adds into s32, exact. Requantization:
 * fcvtns rounds half to even, as lrintf. */
#if defined(__aarch64__)

#include "../neon_target.h"

#include <arm_neon.h>
#include <string.h>

#include "fc_s8.h"

static inline int32_t xquad(const int8_t *x, int64_t len) { /* 4 bytes of x, zero-padded past len */
    int32_t v = 0;
    if (len >= 4) memcpy(&v, x, 4);
    else memcpy(&v, x, (size_t)len);
    return v;
}

static inline float32x4_t float4(const et_fc_s8_args *a, int32x4_t acc, int64_t j);

static inline int32x4_t requant4(const et_fc_s8_args *a, int32x4_t acc, int64_t j) {
    float32x4_t f = float4(a, acc, j);
    f = vminq_f32(vmaxq_f32(f, vdupq_n_f32(a->fmin)), vdupq_n_f32(a->fmax));
    return vaddq_s32(vcvtnq_s32_f32(f), vdupq_n_s32(a->y_zp));
}

static inline float32x4_t float4(const et_fc_s8_args *a, int32x4_t acc, int64_t j) {
    return vmulq_f32(vcvtq_f32_s32(vaddq_s32(acc, vld1q_s32(a->rowc_s + j))), vld1q_f32(a->scale + j));
}

static void store16(const et_fc_s8_args *a, int32x4_t c0, int32x4_t c1, int32x4_t c2, int32x4_t c3, int64_t i,
                    int64_t j, int64_t nj) {
    if (a->yf) { /* float output */
        float tmp[16], *df = a->yf + i * a->n + j, *dst = nj >= 16 ? df : tmp;
        vst1q_f32(dst, float4(a, c0, j)), vst1q_f32(dst + 4, float4(a, c1, j + 4));
        vst1q_f32(dst + 8, float4(a, c2, j + 8)), vst1q_f32(dst + 12, float4(a, c3, j + 12));
        if (nj < 16) memcpy(df, tmp, (size_t)nj * sizeof(float));
        return;
    }
    const int16x8_t h0 = vcombine_s16(vqmovn_s32(requant4(a, c0, j)), vqmovn_s32(requant4(a, c1, j + 4)));
    const int16x8_t h1 = vcombine_s16(vqmovn_s32(requant4(a, c2, j + 8)), vqmovn_s32(requant4(a, c3, j + 12)));
    const int8x16_t b = vcombine_s8(vqmovn_s16(h0), vqmovn_s16(h1));
    int8_t *dst = a->y + i * a->n + j;
    if (nj >= 16) {
        vst1q_s8(dst, b);
    } else {
        int8_t tmp[16];
        vst1q_s8(tmp, b);
        memcpy(dst, tmp, (size_t)nj);
    }
}

/* one row against one tile of nj <= 16 channels */
static void tile(const et_fc_s8_args *a, int64_t i, int64_t j, int64_t nj) {
    const int64_t k = a->k, kp = a->kp;
    const int8_t *wb = a->w + (j / 16) * kp * 16, *x = a->x + i * k;
#if ET_DOTPROD
    int32x4_t c0 = vdupq_n_s32(0), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t kk = 0; kk < kp; kk += 4) {
        const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(xquad(x + kk, k - kk)));
        const int8_t *p = wb + kk * 16;
        c0 = vdotq_s32(c0, vld1q_s8(p), xv), c1 = vdotq_s32(c1, vld1q_s8(p + 16), xv);
        c2 = vdotq_s32(c2, vld1q_s8(p + 32), xv), c3 = vdotq_s32(c3, vld1q_s8(p + 48), xv);
    }
#else
    int32x4_t p0 = vdupq_n_s32(0), p1 = p0, p2 = p0, p3 = p0, p4 = p0, p5 = p0, p6 = p0, p7 = p0;
    for (int64_t kk = 0; kk < kp; kk += 4) {
        const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(xquad(x + kk, k - kk)));
        const int8x8_t xl = vget_low_s8(xv);
        const int8_t *p = wb + kk * 16;
        const int8x16_t w0 = vld1q_s8(p), w1 = vld1q_s8(p + 16), w2 = vld1q_s8(p + 32), w3 = vld1q_s8(p + 48);
        p0 = vpadalq_s16(p0, vmull_s8(vget_low_s8(w0), xl)), p1 = vpadalq_s16(p1, vmull_high_s8(w0, xv));
        p2 = vpadalq_s16(p2, vmull_s8(vget_low_s8(w1), xl)), p3 = vpadalq_s16(p3, vmull_high_s8(w1, xv));
        p4 = vpadalq_s16(p4, vmull_s8(vget_low_s8(w2), xl)), p5 = vpadalq_s16(p5, vmull_high_s8(w2, xv));
        p6 = vpadalq_s16(p6, vmull_s8(vget_low_s8(w3), xl)), p7 = vpadalq_s16(p7, vmull_high_s8(w3, xv));
    }
    /* each pN holds two channels x two partial sums: pairwise adds give 4 channels in order */
    const int32x4_t c0 = vpaddq_s32(p0, p1), c1 = vpaddq_s32(p2, p3), c2 = vpaddq_s32(p4, p5), c3 = vpaddq_s32(p6, p7);
#endif
    store16(a, c0, c1, c2, c3, i, j, nj);
}

void ET_NEON_NAME(et_fc_s8)(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t i = i0; i < i1; i++)
        for (int64_t j = j0; j < j1; j += 16) tile(a, i, j, j1 - j < 16 ? j1 - j : 16);
}

ET_NEON_END
#endif
