/* core.h — internal to the C core: error reporting, fp16 conversion, the kernel trait table, the thread pool.
 * Nothing here is public; edgert.h is the interface.
 */
#ifndef ET_CORE_H
#define ET_CORE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "edgert.h"
#include "et_quant.h"

#if defined(__GNUC__)
#define ET_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define ET_INLINE static inline __attribute__((always_inline))
/* keeps a SIMD running sum a running sum (x86 vector registers): without it GCC reassociates a chain of adds into all
 * products first and a tree of adds, or keeps copies of the sums on the stack, in the kernels' inner loops */
#define ET_IN_REGISTER(v) __asm__("" : "+x"(v))
/* makes GCC treat pointer p as a new value: loads through it are not merged with earlier ones (which would keep their
 * results live in registers across the code between) */
#define ET_FRESH_POINTER(p) __asm__("" : "+r"(p))
#else
#define ET_PRINTF(a, b)
#define ET_INLINE static inline
#define ET_IN_REGISTER(v) ((void)0)
#define ET_FRESH_POINTER(p) ((void)0)
#endif

/* sets the calling thread's error message and returns status */
int et_error(int status, const char *fmt, ...) ET_PRINTF(2, 3);

/* ---- fp16: IEEE binary16, round to nearest even, as numpy's astype(float16) ---- */

ET_INLINE uint32_t et_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
ET_INLINE float et_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

ET_INLINE float et_fp16_to_fp32(et_half h) {
    /* exponent re-bias by scaling: exact for normals, subnormals, inf and nan */
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = et_f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = et_f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? et_f32_bits(denormalized) : et_f32_bits(normalized));
    return et_f32_from_bits(result);
}

ET_INLINE et_half et_fp32_to_fp16(float f) {
    /* rounding happens in the float add below: scale into the fp16 range so the hardware rounds to nearest even */
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = et_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = et_f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = et_f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (et_half)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* AMX-INT8 usable by this process (CPUID, OS tile state, Linux's tile data permission granted), detected once
 * with the other features (cpu.c; listed as "amx_int8" in et_cpu_features) */
int et_cpu_amx_int8(void);

/* AVX512DQ (listed as "avx512dq"): only fc_s8's AVX-512 DynamicQuantizeLinear codes pass needs it */
int et_cpu_avx512dq(void);

/* ---- kernel trait table: one per ISA, filled at start-up (cpu.c) ---- */

/* y[i*ldy + j] = dot(w row j, x row i) for j in [0, n), i in [0, m).
 * Block formats: w rows of nb blocks (w_stride bytes apart), x rows of nb block_q8_s (x_stride bytes apart).
 * F32/F16: w rows of k values, x float rows of k values. */
typedef void (*et_gemm_fn)(int64_t k, const void *w, size_t w_stride, int64_t n, const void *x, size_t x_stride,
                           int64_t m, float *y, size_t ldy);

/* x (k values) -> k/32 block_q8_s, bit for bit what et_quantize_row_q8_s writes; -1 on NaN or Inf */
typedef int (*et_quantize_row_fn)(const float *x, block_q8_s *y, int64_t k);

/* for each of h rows a_i = a + i * lda: y_i[0:n] = sum_d a_i[d] * x[d * stride + 0:n] for d < k, y_i = y + i * ldy,
 * x fp16 (src/attention/): the scores of a group of query heads against keys stored transposed (one position per
 * lane, no horizontal sums), and their weighted sums of values stored by position. The heads of a group share each
 * row of x as it is loaded and converted. */
typedef void (*et_gemv_t_f16_fn)(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x,
                                 size_t stride, float *y, size_t ldy);

void et_gemv_t_f16_ref(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                         float *y, size_t ldy);
#if defined(__x86_64__) || defined(_M_X64)
void et_gemv_t_f16_avx2(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                         float *y, size_t ldy);
void et_gemv_t_f16_avx512(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                         float *y, size_t ldy);
#endif
#if defined(__aarch64__)
void et_gemv_t_f16_neon(int64_t n, int64_t k, int64_t h, const float *a, size_t lda, const et_half *x, size_t stride,
                         float *y, size_t ldy);
#endif

/* x[0:n] = exp(x - max) / sum in place, n >= 1: the attention weights of one (token, head) (src/attention/). The
 * SIMD variants' exp is a polynomial within 2 ulp of expf; any NaN or +Inf in x makes every output NaN. */
typedef void (*et_softmax_fn)(float *x, int64_t n);

void et_softmax_ref(float *x, int64_t n);
#if defined(__x86_64__) || defined(_M_X64)
void et_softmax_avx2(float *x, int64_t n); /* the AVX-512 tables use it too */
#endif
#if defined(__aarch64__)
void et_softmax_neon(float *x, int64_t n);
#endif

typedef struct {
    const char *name;
    et_gemv_t_f16_fn gemv_t_f16;
    et_softmax_fn softmax;
    et_quantize_row_fn quantize_row_q8_s; /* NULL: the table uses et_quantize_row_q8_s */
    et_gemm_fn gemm_q4_0;
    et_gemm_fn gemm_q4_1;
    et_gemm_fn gemm_q8_0;
    et_gemm_fn gemm_f16;
    et_gemm_fn gemm_f32;
    /* the x16 layout (below): w points at a tile, w_stride = a tile's bytes / 16, rows in whole tiles from w */
    et_gemm_fn gemm_q4_0_x16;
    et_gemm_fn gemm_q4_1_x16;
    et_gemm_fn gemm_q8_0_x16;
} et_kernels;

/* ---- the x16 weight layout (et_repack, src/matmul/repack.c; docs/formats.md) ----
 * Rows in tiles of 16; the last tile's missing rows are zeros. A tile of nb blocks holds
 *   quants at 0, block b at b * et_x16_qbytes: 64-byte vectors, vector v dword r = bytes 4v..4v+3 of the qs of
 *     row r's block b (q4: 16 qs bytes, 4 vectors; q8_0: 32, 8 vectors), the layout a vpdpbusd or an AMX B tile
 *     takes with lanes = rows;
 *   scales at nb * et_x16_qbytes, block b at b * et_x16_sbytes: the 16 rows' fp16 d, then (q4_1) their fp16 m;
 * and is padded to a multiple of 64 bytes. */
ET_INLINE size_t et_x16_qbytes(int base) { return base == ET_TYPE_Q8_0 ? 512 : 256; }
ET_INLINE size_t et_x16_sbytes(int base) { return base == ET_TYPE_Q4_1 ? 64 : 32; }
ET_INLINE size_t et_x16_block_bytes(int base) { return et_x16_qbytes(base) + et_x16_sbytes(base); }
/* byte offsets in a tile of nb blocks: block b's quants, and its scales */
ET_INLINE size_t et_x16_quants_at(int base, int64_t b) { return (size_t)b * et_x16_qbytes(base); }
ET_INLINE size_t et_x16_scales_at(int base, int64_t nb, int64_t b) {
    return (size_t)nb * et_x16_qbytes(base) + (size_t)b * et_x16_sbytes(base);
}
ET_INLINE size_t et_x16_tile_bytes(int base, int64_t nb) { /* 0 when it would not fit a size_t */
    const size_t per = et_x16_block_bytes(base);
    if (nb < 0 || (uint64_t)nb > (SIZE_MAX - 63) / per) return 0;
    return ((size_t)nb * per + 63) & ~(size_t)63;
}
/* tiles of 16 for n >= 0 rows (no overflow near INT64_MAX) */
ET_INLINE int64_t et_x16_tiles(int64_t n) { return n / 16 + (n % 16 != 0); }
/* the GGUF type an x16 type repacks (ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0), or -1 */
ET_INLINE int et_x16_base(int type) {
    const int base = type & ~ET_TYPE_X16;
    return (type & ET_TYPE_X16) && (base == ET_TYPE_Q4_0 || base == ET_TYPE_Q4_1 || base == ET_TYPE_Q8_0) ? base : -1;
}
/* a GGUF block type (q4_0, q4_1, q8_0) or its x16 repacking: rows quantized per block of ET_QK */
ET_INLINE int et_is_block_type(int t) {
    return t == ET_TYPE_Q4_0 || t == ET_TYPE_Q4_1 || t == ET_TYPE_Q8_0 || et_x16_base(t) >= 0;
}
/* where a GGUF block of the base type keeps its quants, and how many bytes they are */
ET_INLINE size_t et_block_qs_at(int base) { return base == ET_TYPE_Q4_1 ? 4 : 2; }
ET_INLINE size_t et_block_qs_bytes(int base) { return base == ET_TYPE_Q8_0 ? ET_QK : ET_QK / 2; }
/* block b of row r (< 16) of an x16 tile of nb blocks -> the GGUF block it was packed from */
ET_INLINE void et_x16_get_block(int base, const uint8_t *tile, int64_t nb, int r, int64_t b, void *block) {
    uint8_t *blk = block;
    const size_t qs_at = et_block_qs_at(base), qs_bytes = et_block_qs_bytes(base);
    const uint8_t *q = tile + et_x16_quants_at(base, b), *s = tile + et_x16_scales_at(base, nb, b);
    memcpy(blk, s + 2 * r, 2);
    if (base == ET_TYPE_Q4_1) memcpy(blk + 2, s + 32 + 2 * r, 2);
    for (size_t v = 0; v < qs_bytes / 4; v++) memcpy(blk + qs_at + 4 * v, q + 64 * v + 4 * r, 4);
}

extern const et_kernels et_kernels_ref;

/* a table fills its three x16 entries together or not at all */
ET_INLINE int et_has_x16(const et_kernels *kt) { return kt->gemm_q4_0_x16 != NULL; }
#if defined(__x86_64__) || defined(_M_X64)
extern const et_kernels et_kernels_avx2;
extern const et_kernels et_kernels_avx512;
extern const et_kernels et_kernels_avx512vnni;
#endif
#if defined(__aarch64__)
extern const et_kernels et_kernels_neon;
extern const et_kernels et_kernels_neon_dotprod;
#endif

/* the table in use; set once by et_isa_select (or lazily on first use) */
const et_kernels *et_active_kernels(void);

/* ---- reference quantization (src/quant/ref.c), shared by every ISA ---- */

/* x (k values) -> k/32 activation blocks; the one activation quantizer, so every ISA sees the same blocks.
 * Returns -1 (and writes a partial row) when x holds NaN or Inf. */
int et_quantize_row_q8_s(const float *x, block_q8_s *y, int64_t k);

/* 127 / amax of an activation block, the factor its codes are x * id: 0 below 2^-120, where 127 / amax would
 * overflow (from ~3.7e-37) and an infinite or NaN product has no int8 code (C leaves the conversion undefined;
 * the ISAs disagreed, one in sign); such a block's codes are all 0 */
static inline float et_q8s_inverse(float amax) { return amax >= 0x1p-120f ? 127.0f / amax : 0.0f; }

/* ---- matmul on prepared activations (src/matmul/matmul.c), for callers inside the core ---- */

/* m rows of k floats -> m rows of k/32 block_q8_s (the active ISA's quantizer, rows split over threads);
 * returns -1, or the first row holding NaN or Inf */
int64_t et_quantize_rows_q8_s(const float *x, int64_t m, int64_t k, block_q8_s *y, int nthreads);
/* the same for rows of kx <= k floats, ldx floats apart, zero-padded to k: the blocks are exactly those of the
 * padded rows (an all-zero block quantizes to d = 0, sum = 0, qs = 0) */
int64_t et_quantize_rows_q8_s_ex(const float *x, int64_t m, int64_t kx, size_t ldx, int64_t k, block_q8_s *y,
                                 int nthreads);

/* y[i*ldy + j] = w row j . activation row i; xa holds block_q8_s rows (block formats, see et_quantize_row_q8_s)
 * or float rows (f32/f16), xs bytes apart. Arguments are trusted: callers inside the core validate them. */
int et_gemm_prepared(int wtype, const void *w, int64_t n, int64_t k, const void *xa, size_t xs, int64_t m, float *y,
                     size_t ldy, int nthreads);

/* ---- thread pool (src/threadpool.c) ---- */

/* runs fn(ctx, ith, nth) for ith in [0, nth) on the pool (the caller is thread 0); returns when all are done */
typedef void (*et_task_fn)(void *ctx, int ith, int nth);
int et_parallel(et_task_fn fn, void *ctx, int nth);

#endif /* ET_CORE_H */
