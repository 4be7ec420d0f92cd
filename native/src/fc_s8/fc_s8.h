/* fc_s8/fc_s8.h — internal: the INT8 fully-connected kernels (TFLite FULLY_CONNECTED arithmetic), one per ISA.
 *
 * Packed weights (et_fc_s8_pack): n rounded up to 16 output channels, k rounded up to 4, laid out so that one 64-byte
 * row holds 4 consecutive k of 16 channels: byte (j/16)*kp*16 + (kk/4)*64 + (j%16)*4 + kk%4 = w[j][kk] (zeros in the
 * padding), followed (64-byte aligned) by n int32 row sums of w. Activations are fed as u8 (x ^ 0x80 = x + 128) so
 * that the AVX-512 VNNI kernel can use vpdpbusd (u8 x s8 -> s32); the row sums take the 128 back out:
 *   acc[i][j] = sum_k (x[i][k] + 128) w[j][k] - (128 + x_zp) wsum[j] + bias[j]     (exact int32)
 *   y[i][j]   = clamp(rint((float)acc * scale[j]) + y_zp, lo, hi)                (round half to even)
 * The requantization is XNNPACK's fp32 one, which LiteRT's default CPU path runs and its reference kernels agree
 * with on the tested shapes. */
#ifndef ET_FC_S8_H
#define ET_FC_S8_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint8_t *xu;      /* (m, kp) activations + 128 */
    int64_t m, k, kp, n;
    const int8_t *w;        /* packed */
    const int32_t *rowc;    /* n: bias[j] - (128 + x_zp) * wsum[j] */
    const float *scale;     /* n */
    int32_t y_zp, lo, hi;
    int8_t *y;              /* (m, n) */
} et_fc_s8_args;

/* rows [j0, j1) of output channels (multiples of 16 except the last) for every activation row */
typedef void (*et_fc_s8_fn)(const et_fc_s8_args *a, int64_t j0, int64_t j1);

void et_fc_s8_ref(const et_fc_s8_args *a, int64_t j0, int64_t j1);
void et_fc_s8_avx512vnni(const et_fc_s8_args *a, int64_t j0, int64_t j1);

static inline int32_t et_fc_s8_requant(int32_t acc, float scale, int32_t zp, int32_t lo,
                                                           int32_t hi) {
    float f = (float)acc * scale;
    long v = lrintf(f) + zp;
    return (int32_t)(v < lo ? lo : v > hi ? hi : v);
}

#endif
