/* quant/ref.c — quantize and dequantize rows; this file is the spec of every block format.
 *
 * Weight quantizers reproduce ggml's reference quantizers (and so the gguf package's) bit for bit: the same
 * float32 operations in the same order, no fused multiply-add (the build passes -ffp-contract=off).
 */
#include <math.h>
#include <stdint.h>

#include "../core.h"

/* numpy's float32 -> uint8/int8 cast as it behaves on x86-64 (cvttss2si, then the low byte): NaN, Inf and values
 * outside int32 become 0. Scales that underflow make 1/d infinite, and the gguf quantizers feed such values through
 * that cast, so matching them bit for bit means casting the same way (and never hitting C's undefined cast). */
static inline int32_t np_cast_i32(float v) {
    return (v >= -2147483648.0f && v < 2147483648.0f) ? (int32_t)v : INT32_MIN;
}
static inline uint8_t np_u8_clip15(float v) { /* trunc(v).astype(uint8).clip(0, 15) */
    const uint8_t u = (uint8_t)(np_cast_i32(v) & 0xFF);
    return u < 15 ? u : 15;
}

static void quantize_row_q4_0(const float *x, block_q4_0 *y, int64_t k) {
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float *xb = x + b * ET_QK;
        /* max: the value of largest magnitude, first one wins (so an all-zero block starting with -0.0 keeps it) */
        float amax = fabsf(xb[0]), max = xb[0];
        for (int j = 1; j < ET_QK; j++) {
            if (amax < fabsf(xb[j])) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = et_fp32_to_fp16(d);
        for (int j = 0; j < ET_QK / 2; j++) {
            const uint8_t q0 = np_u8_clip15(xb[j] * id + 8.5f);
            const uint8_t q1 = np_u8_clip15(xb[j + ET_QK / 2] * id + 8.5f);
            y[b].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quantize_row_q4_1(const float *x, block_q4_1 *y, int64_t k) {
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float *xb = x + b * ET_QK;
        float min = xb[0], max = xb[0];
        for (int j = 1; j < ET_QK; j++) {
            if (xb[j] < min) min = xb[j];
            if (xb[j] > max) max = xb[j];
        }
        const float d = (max - min) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = et_fp32_to_fp16(d);
        y[b].m = et_fp32_to_fp16(min);
        for (int j = 0; j < ET_QK / 2; j++) {
            const uint8_t q0 = np_u8_clip15((xb[j] - min) * id + 0.5f);
            const uint8_t q1 = np_u8_clip15((xb[j + ET_QK / 2] - min) * id + 0.5f);
            y[b].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t k) {
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float *xb = x + b * ET_QK;
        float amax = 0.0f;
        for (int j = 0; j < ET_QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = et_fp32_to_fp16(d);
        for (int j = 0; j < ET_QK; j++) y[b].qs[j] = (int8_t)(np_cast_i32(roundf(xb[j] * id)) & 0xFF);
    }
}

int et_quantize_row_q8_s(const float *x, block_q8_s *y, int64_t k) {
    /* round half to even (nearbyintf) so SIMD conversions, which round the same way, would agree */
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float *xb = x + b * ET_QK;
        float amax = 0.0f;
        for (int j = 0; j < ET_QK; j++) {
            const float a = fabsf(xb[j]);
            if (!(a <= 3.4028234663852886e38f)) return -1; /* NaN or Inf: float->int would be undefined */
            amax = a > amax ? a : amax;
        }
        const float id = et_q8s_inverse(amax);
        int32_t sum = 0;
        for (int j = 0; j < ET_QK; j++) {
            const int8_t q = (int8_t)nearbyintf(xb[j] * id);
            y[b].qs[j] = q;
            sum += q;
        }
        y[b].d = amax / 127.0f;
        y[b].sum = sum;
    }
    return 0;
}

static void dequantize_row_q4_0(const block_q4_0 *x, float *y, int64_t k) {
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float d = et_fp16_to_fp32(x[b].d);
        for (int j = 0; j < ET_QK / 2; j++) {
            y[b * ET_QK + j] = d * (float)((x[b].qs[j] & 0x0F) - 8);
            y[b * ET_QK + j + ET_QK / 2] = d * (float)((x[b].qs[j] >> 4) - 8);
        }
    }
}

static void dequantize_row_q4_1(const block_q4_1 *x, float *y, int64_t k) {
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float d = et_fp16_to_fp32(x[b].d);
        const float m = et_fp16_to_fp32(x[b].m);
        for (int j = 0; j < ET_QK / 2; j++) {
            y[b * ET_QK + j] = d * (float)(x[b].qs[j] & 0x0F) + m;
            y[b * ET_QK + j + ET_QK / 2] = d * (float)(x[b].qs[j] >> 4) + m;
        }
    }
}

static void dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t k) {
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float d = et_fp16_to_fp32(x[b].d);
        for (int j = 0; j < ET_QK; j++) y[b * ET_QK + j] = (float)x[b].qs[j] * d;
    }
}

size_t et_row_size(int type, int64_t k) {
    if (k <= 0) return 0;
    switch (type) {
    case ET_TYPE_F32: return (uint64_t)k > SIZE_MAX / 4 ? 0 : (size_t)k * 4; /* 0: more than an address space */
    case ET_TYPE_F16: return (uint64_t)k > SIZE_MAX / 2 ? 0 : (size_t)k * 2;
    case ET_TYPE_Q4_0: return k % ET_QK ? 0 : (size_t)(k / ET_QK) * sizeof(block_q4_0);
    case ET_TYPE_Q4_1: return k % ET_QK ? 0 : (size_t)(k / ET_QK) * sizeof(block_q4_1);
    case ET_TYPE_Q8_0: return k % ET_QK ? 0 : (size_t)(k / ET_QK) * sizeof(block_q8_0);
    default: /* x16 types: a tile's bytes per row, so rows r0 = 16t start tile t at r0 * row size */
        return et_x16_base(type) < 0 || k % ET_QK ? 0 : et_x16_tile_bytes(et_x16_base(type), k / ET_QK) / 16;
    }
}

static int check_shape(int type, int64_t n, int64_t k) {
    if (type != ET_TYPE_F32 && type != ET_TYPE_F16 && type != ET_TYPE_Q4_0 && type != ET_TYPE_Q4_1 &&
        type != ET_TYPE_Q8_0)
        return et_error(ET_ERR_INVALID, "unknown tensor type %d (expected f32=0, f16=1, q4_0=2, q4_1=3, q8_0=8)",
                        type);
    if (n < 0 || k <= 0) return et_error(ET_ERR_INVALID, "shape (%lld, %lld) must be positive", (long long)n, (long long)k);
    if (et_row_size(type, k) == 0)
        return et_error(ET_ERR_INVALID, "k=%lld is not a multiple of the block size %d", (long long)k, ET_QK);
    return ET_OK;
}

int et_quantize(int type, const float *x, void *y, int64_t n, int64_t k) {
    int st = check_shape(type, n, k);
    if (st) return st;
    for (int64_t i = 0; i < n * k; i++) {
        if (!isfinite(x[i]))
            return et_error(ET_ERR_INVALID, "weights must be finite: found %g at row %lld, column %lld", (double)x[i],
                            (long long)(i / k), (long long)(i % k));
    }
    const size_t rs = et_row_size(type, k);
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * k;
        void *yr = (uint8_t *)y + (size_t)r * rs;
        switch (type) {
        case ET_TYPE_F32: memcpy(yr, xr, rs); break;
        case ET_TYPE_F16:
            for (int64_t j = 0; j < k; j++) ((et_half *)yr)[j] = et_fp32_to_fp16(xr[j]);
            break;
        case ET_TYPE_Q4_0: quantize_row_q4_0(xr, yr, k); break;
        case ET_TYPE_Q4_1: quantize_row_q4_1(xr, yr, k); break;
        case ET_TYPE_Q8_0: quantize_row_q8_0(xr, yr, k); break;
        }
    }
    return ET_OK;
}

int et_dequantize(int type, const void *x, float *y, int64_t n, int64_t k) {
    int st = check_shape(type, n, k);
    if (st) return st;
    const size_t rs = et_row_size(type, k);
    for (int64_t r = 0; r < n; r++) {
        const void *xr = (const uint8_t *)x + (size_t)r * rs;
        float *yr = y + r * k;
        switch (type) {
        case ET_TYPE_F32: memcpy(yr, xr, rs); break;
        case ET_TYPE_F16:
            for (int64_t j = 0; j < k; j++) yr[j] = et_fp16_to_fp32(((const et_half *)xr)[j]);
            break;
        case ET_TYPE_Q4_0: dequantize_row_q4_0(xr, yr, k); break;
        case ET_TYPE_Q4_1: dequantize_row_q4_1(xr, yr, k); break;
        case ET_TYPE_Q8_0: dequantize_row_q8_0(xr, yr, k); break;
        }
    }
    return ET_OK;
}
