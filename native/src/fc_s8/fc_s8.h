/* fc_s8/fc_s8.h — internal: the INT8 fully-connected kernels (TFLite FULLY_CONNECTED arithmetic), one per ISA.
 *
 * A plan (et_fc_s8_plan, 64-byte aligned, caller-owned) holds everything that does not depend on the activations,
 * computed once:
 *   header      et_fc_s8_header (64 bytes)
 *   rowc_s[np]  bias[j] - x_zp * wsum[j]           the correction for kernels that multiply signed x by w
 *   rowc_u[np]  rowc_s[j] - 128 * wsum[j]          the same for kernels that multiply u8 (x + 128) by w (vpdpbusd)
 *   scale[np]   float, input_scale * w_scale[j] / output_scale
 *   wsum[np]    int32, sum_k w[j][k] (et_fc_s8_dyn re-folds the activation zero point it finds per call)
 *   w           np/16 tiles of kp * 16 bytes: byte (j/16)*kp*16 + (kk/4)*64 + (j%16)*4 + kk%4 = w[j][kk], zeros in the
 *               padding (np = n rounded up to 16, kp = k rounded up to 4). One 64-byte row holds 4 consecutive k of
 *               16 channels: a zmm operand of vpdpbusd, and 16 of them (64 k) one AMX B tile.
 *   slack       ET_FC_S8_SLACK bytes, so a full AMX B tile loaded at the k tail never leaves the plan
 * wsum[j] = sum_k w[j][k]. All int32 arithmetic wraps (mod 2^32), so the two corrections give bit-identical sums:
 *   acc[i][j] = rowc_s[j] + sum_k x[i][k] w[j][k] = rowc_u[j] + sum_k (x[i][k] + 128) w[j][k]   (mod 2^32)
 *   y[i][j]   = rint(clamp((float)acc * scale[j], lo - y_zp, hi - y_zp)) + y_zp               (round half to even)
 * The requantization is XNNPACK's fp32 one (clamp in float, then round), which LiteRT's default CPU path runs.
 * Clamping before rounding equals clamping after (the bounds are integers) and keeps every SIMD float->int
 * conversion in range, so every variant equals the reference bit for bit for any finite scale.
 * Float output (args.yf non-NULL, et_fc_s8_dyn): yf[i][j] = (float)acc * scale[j], nothing clamped or rounded
 * (the float multiply every variant does first), y unused. */
#ifndef ET_FC_S8_H
#define ET_FC_S8_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define ET_FC_S8_MAGIC 0x38734366u /* "fCs8" */
#define ET_FC_S8_SLACK 1024

typedef struct {
    uint32_t magic;
    int32_t x_zp, y_zp, lo, hi;
    int32_t w_m128; /* 1: some weight is -128, which the AVX2 vpmaddubsw kernel cannot take */
    int64_t n, k, kp, np;
    int64_t w_off; /* byte offset of the packed weights from the plan's start */
} et_fc_s8_header;

typedef struct {
    const int8_t *x; /* (m, k) row-major */
    int64_t m, k, kp, n;
    const int8_t *w; /* packed */
    const int32_t *rowc_s, *rowc_u;
    const float *scale;
    float fmin, fmax; /* lo - y_zp, hi - y_zp */
    int32_t y_zp;
    int8_t *y;  /* (m, n) row-major */
    float *yf;  /* non-NULL: float output (m, n) row-major instead of y */
    int w_m128; /* the header's: some weight is -128 */
} et_fc_s8_args;

/* rows [i0, i1) x output channels [j0, j1); j0 is a multiple of 16, j1 too unless it is n */
typedef void (*et_fc_s8_fn)(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1);

typedef struct {
    const char *name;
    et_fc_s8_fn fn;
    int available; /* this CPU (and OS) runs it */
} et_fc_s8_variant;

/* every variant compiled into this build, the reference first; *count set */
const et_fc_s8_variant *et_fc_s8_variants(int *count);

/* et_fc_s8_run with a given kernel (tests); fn NULL: the one the active ISA picks */
int et_fc_s8_run_with(const void *plan, const int8_t *x, int64_t m, int8_t *y, int nthreads, et_fc_s8_fn fn);
/* et_fc_s8_dyn with a given kernel (tests); the activations are quantized by the active ISA's passes */
int et_fc_s8_dyn_with(const void *plan, const float *x, int64_t m, float *y, int nthreads, et_fc_s8_fn fn);

void et_fc_s8_ref(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
#if defined(__x86_64__) || defined(_M_X64)
void et_fc_s8_avx2(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
void et_fc_s8_avx512vnni(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
void et_fc_s8_amx(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
#endif
#if defined(__aarch64__)
void et_fc_s8_neon(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
void et_fc_s8_neon_dotprod(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
#endif

/* onnxruntime's DynamicQuantizeLinear of x[count] (finite values), as int8 codes: q[i] = u8[i] - 128 where
 * u8[i] = clamp(rint(x[i] / scale), -zp, 255 - zp) + zp (true division, round half to even), the range
 * [min(0, min x), max(0, max x)], scale = (max - min) / 255 (1 when max == min), zp = rint(clamp(0 - min / scale,
 * 0, 255)). In two passes an ISA provides, each of which can run on slices of x:
 *   range: *mn = min(*mn, min x), *mx = max(*mx, max x); returns -1 when x holds a NaN or an infinity, else 0;
 *   codes: q from x with the scale and zero point found (et_fc_s8_dyn_params).
 * The AVX2 and AVX-512 passes give the reference's bytes. */
typedef struct {
    int (*range)(const float *x, int64_t count, float *mn, float *mx);
    void (*codes)(const float *x, int64_t count, float scale, int32_t zp, int8_t *q);
} et_fc_s8_quantizer;

extern const et_fc_s8_quantizer et_fc_s8_quantizer_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const et_fc_s8_quantizer et_fc_s8_quantizer_avx2;
extern const et_fc_s8_quantizer et_fc_s8_quantizer_avx512; /* avx512vnni.c: F/BW/VL, and DQ for the codes */
#endif

/* the codes passes' reciprocal: *inv = 1 / scale; 0 when x * inv cannot stand in for x / scale (inv not finite or
 * so large that the tie band of the SIMD passes no longer bounds the error): then every value is divided */
static inline int et_fc_s8_reciprocal(float scale, float *inv) {
    *inv = 1.0f / scale;
    return *inv - *inv == 0.0f && *inv < 0x1p100f;
}

/* both passes over the whole of x on the calling thread: 0, or -1 (q untouched) for a NaN or an infinity */
int et_fc_s8_quantize_dyn(const et_fc_s8_quantizer *qz, const float *x, int64_t count, int8_t *q, float *scale,
                          int32_t *zp);

/* the scale and zero point of onnxruntime's DynamicQuantizeLinear for the range [mn, mx] (mn <= 0 <= mx); a range
 * so narrow that (mx - mn) / 255 underflows to 0 is taken as empty (scale 1), like mx == mn, so no pass divides
 * by zero */
static inline void et_fc_s8_dyn_params(float mn, float mx, float *scale, int32_t *zp) {
    const float d = (mx - mn) / 255.0f;
    const float s = mx == mn || d == 0.0f ? 1.0f : d;
    float z = 0.0f - mn / s;
    z = z < 0.0f ? 0.0f : (z > 255.0f ? 255.0f : z);
    *scale = s;
    *zp = (int32_t)rintf(z);
}

/* the scalar requantization every variant reproduces */
static inline int8_t et_fc_s8_requant(int32_t acc, float scale, float fmin, float fmax, int32_t zp) {
    float f = (float)acc * scale;
    f = f < fmin ? fmin : f; /* NaN cannot occur: acc and scale are finite, inf clamps */
    f = f > fmax ? fmax : f;
    return (int8_t)(lrintf(f) + zp);
}

#endif
