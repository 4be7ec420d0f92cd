/* edgert.h — the one public header of the edgert C core.
 *
 * Every function returns an int status (ET_OK or an et_status); on failure et_last_error() holds a message that
 * says what was expected and what was found. The caller owns every buffer: the core never allocates memory the
 * caller has to free, and never keeps a pointer past the call that received it. Callers validate shapes and sizes
 * before calling; the core checks them again and refuses what it cannot handle.
 *
 * The block between the cdef markers is read by native/build_ffi.py as the cffi declaration: keep it free of
 * preprocessor directives.
 */
#ifndef EDGERT_H
#define EDGERT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
typedef enum {
    ET_OK = 0,
    ET_ERR_INVALID = 1,     /* bad argument: shape, size, type, value */
    ET_ERR_NOMEM = 2,       /* an allocation the core owns failed (thread pool, model state) */
    ET_ERR_UNSUPPORTED = 3, /* valid request this build or CPU cannot serve */
    ET_ERR_RANGE = 4,       /* a position or index outside what was allocated (e.g. past the KV cache) */
    ET_ERR_NONFINITE = 5    /* activations a quantized product needs finite hold NaN or Inf; nothing was written,
                             * so the caller can run that call elsewhere (edgert's host delegate: on onnxruntime) */
} et_status;

/* ggml type ids, so a GGUF tensor type maps to itself */
typedef enum {
    ET_TYPE_F32 = 0,
    ET_TYPE_F16 = 1,
    ET_TYPE_Q4_0 = 2,
    ET_TYPE_Q4_1 = 3,
    ET_TYPE_Q8_0 = 8,
    /* the same blocks repacked by et_repack into tiles of 16 rows (ET_TYPE_X16 | the GGUF type) */
    ET_TYPE_X16 = 0x100,
    ET_TYPE_Q4_0_X16 = 0x102,
    ET_TYPE_Q4_1_X16 = 0x103,
    ET_TYPE_Q8_0_X16 = 0x108
} et_type;

const char *et_last_error(void);
const char *et_version(void);

/* CPU variants: "ref", "avx2", "avx512", "neon". et_isa_select(NULL or "auto") picks the best this CPU runs. */
int et_isa_select(const char *name);
const char *et_isa_current(void);
const char *et_isa_available(void);  /* comma-separated names this CPU can run, best last */
const char *et_cpu_features(void);   /* comma-separated CPU features the dispatcher looked at */

/* persistent thread pool shared by all kernels; n >= 1 */
int et_set_threads(int n);
int et_get_threads(void);

/* bytes of one row of k values of type t; 0 when k is not a whole number of blocks or t is unknown. x16 types: a
 * 16-row tile's bytes / 16 */
size_t et_row_size(int type, int64_t k);

/* (n, k) float32 <-> (n, row_size) blocks; quantize refuses NaN/Inf and names the first one */
int et_quantize(int type, const float *x, void *y, int64_t n, int64_t k);
int et_dequantize(int type, const void *x, float *y, int64_t n, int64_t k);

/* y (m, n) = x (m, k) @ w (n, k)^T; x, y float32 row-major contiguous, w rows of type wtype.
 * scratch holds the on-the-fly quantized activations: et_matmul_scratch_size() bytes. Block weight types quantize x,
 * so a NaN or Inf in x is ET_ERR_NONFINITE naming its first row (y not written); float types compute with it.
 * nthreads <= 0 uses the pool's size. */
size_t et_matmul_scratch_size(int wtype, int64_t m, int64_t k);
int et_matmul(const float *x, int64_t m, int64_t k, int wtype, const void *w, int64_t n, float *y, void *scratch,
              size_t scratch_size, int nthreads);

/* et_matmul on strided and short rows: x row i at x + i*ldx holds kx <= k floats, the columns kx..k-1 count as zeros
 * (exact for every weight type: zeros add nothing, and a zero-padded activation block keeps its scale); y row i at
 * y + i*ldy (ldy >= n). Float weight types (F32, F16) need kx == k. Same scratch as et_matmul(m, k). */
int et_matmul_ex(const float *x, int64_t m, int64_t kx, size_t ldx, int wtype, const void *w, int64_t n, int64_t k,
                 float *y, size_t ldy, void *scratch, size_t scratch_size, int nthreads);

/* Weight repacking: (n, k) rows of Q4_0, Q4_1 or Q8_0 -> the x16 layout (docs/formats.md): tiles of 16 rows, each
 * tile's quants transposed so one 64-byte load holds 4 bytes of each of the 16 rows, its scales 16 to a vector.
 * Same values, same arithmetic: a product on the repacked weights (type | ET_TYPE_X16, passed to et_matmul and
 * et_matmul_ex with the same n and k) is bit for bit the product on the GGUF rows where et_repack_native(type) is 1
 * (the active ISA has its own x16 kernels, which stream the tiles without shuffles or gathers: repacking pays);
 * elsewhere the reference kernel runs the layout, and the result is the reference kernel's GGUF product.
 * et_repack_size() bytes: rows rounded up to 16, each tile to 64 bytes; 0 for a type or shape that cannot be
 * repacked. */
size_t et_repack_size(int type, int64_t n, int64_t k);
int et_repack(int type, const void *w, int64_t n, int64_t k, void *out, size_t out_size);
/* the inverse: the x16 bytes of (n, k) rows of type (the GGUF type) -> the GGUF rows (n * et_row_size bytes) */
int et_unrepack(int type, const void *packed, int64_t n, int64_t k, void *out, size_t out_size);
int et_repack_native(int type);

/* ---- llama-family decoder (src/llm/llama.c) ---- */

typedef struct {
    int32_t dim;        /* model width */
    int32_t hidden_dim; /* feed-forward width */
    int32_t n_layers;
    int32_t n_heads;    /* query heads */
    int32_t n_kv_heads; /* key/value heads (grouped-query attention when < n_heads) */
    int32_t head_dim;
    int32_t vocab_size;
    int32_t n_ctx;      /* KV cache positions */
    int32_t n_batch;    /* most tokens one forward pass runs at once; longer inputs are split */
    float rope_base;
    float norm_eps;
} et_llama_config;

typedef struct {
    const void *data;
    int32_t type;   /* et_type */
    int64_t nbytes; /* must equal what the role's shape implies */
} et_tensor;

typedef struct et_llama et_llama;

/* tensors: 3 + 9 * n_layers, in role order: token_embd (vocab, dim), output_norm (dim), output (vocab, dim), then
 * per layer attn_norm (dim), attn_q (n_heads*head_dim, dim), attn_k (n_kv_heads*head_dim, dim), attn_v (same),
 * attn_output (dim, n_heads*head_dim), ffn_norm (dim), ffn_gate (hidden, dim), ffn_up (hidden, dim),
 * ffn_down (dim, hidden); shapes (rows, row length). Every matrix but token_embd may be an x16 type (et_repack:
 * nbytes the repacked size). Weights stay where they are (e.g. a memory-mapped file) and must outlive the model.
 * The model owns its run state and KV cache: et_llama_free releases them. */
int et_llama_build(const et_llama_config *cfg, const et_tensor *tensors, int32_t n_tensors, et_llama **out);
void et_llama_free(et_llama *model);
/* bytes of run state + KV cache the model allocated */
size_t et_llama_state_bytes(const et_llama *model);
/* runs tokens at positions pos .. pos+n-1 (their KV entries are written; later positions become stale) and writes
 * logits: (n, vocab) when logits_all, else the last position's (vocab). pos + n > n_ctx -> ET_ERR_RANGE. */
int et_llama_forward(et_llama *model, const int32_t *tokens, int32_t n, int32_t pos, float *logits,
                     int32_t logits_all, int32_t nthreads);

/* INT8 fully connected (TFLite FULLY_CONNECTED arithmetic, per-tensor or per-channel weights): a plan holds w (n, k)
 * int8 packed for the kernels with bias, x_zp, scale, y_zp and [lo, hi] folded in, written once by et_fc_s8_plan
 * into et_fc_s8_plan_size(n, k) bytes (64-byte aligned; 0: n x k too large). Then et_fc_s8_run writes y (m, n) int8
 * from x (m, k) int8, both row-major contiguous:
 *   y[i][j] = rint(clamp(float(sum_k (x[i][k] - x_zp) w[j][k] + bias[j]) * scale[j], lo - y_zp, hi - y_zp)) + y_zp
 * with int32 accumulation (round half to even: XNNPACK's fp32 requantization). bias may be NULL; scale holds n finite
 * floats >= 0 (input_scale * w_scale[j] / output_scale); x_zp, y_zp, lo <= hi within int8. Every ISA variant gives
 * the same bytes. The plan must outlive the runs; the caller guarantees x holds m * k and y m * n bytes.
 * nthreads <= 0: the core's thread count (small problems run on the calling thread). */
size_t et_fc_s8_plan_size(int64_t n, int64_t k);
int et_fc_s8_plan(const int8_t *w, int64_t n, int64_t k, const int32_t *bias, int32_t x_zp, const float *scale,
                  int32_t y_zp, int32_t lo, int32_t hi, void *plan, size_t plan_size);
int et_fc_s8_run(const void *plan, const int8_t *x, int64_t m, int8_t *y, int nthreads);
/* onnxruntime's dynamic int8 product (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)) on
 * a plan from et_fc_s8_plan (w: the weights less their zero point, as int8; its bias and scale[j] = w_scale[j]
 * used; x_zp, y_zp, lo, hi ignored): x (m, k) float is quantized per call as onnxruntime's DynamicQuantizeLinear
 * does (the whole m x k tensor to uint8 xq with x_scale and xq_zp, round half to even), then y (m, n) float:
 *   y[i][j] = float(bias[j] + sum_k (xq[i][k] - xq_zp) w[j][k]) * (x_scale * scale[j])
 * with int32 accumulation, the float product formed as onnxruntime forms it. x holding a NaN or an infinity has no
 * quantized value: ET_ERR_NONFINITE, y not written. Returns ET_ERR_NOMEM when the m x k scratch cannot be
 * allocated. */
int et_fc_s8_dyn(const void *plan, const float *x, int64_t m, float *y, int nthreads);
/* the same on the caller's scratch (64-byte aligned, at least et_fc_s8_dyn_scratch_size(plan, m) bytes; 0 for a
 * bad plan or m): a run loop keeps one and the call allocates nothing */
size_t et_fc_s8_dyn_scratch_size(const void *plan, int64_t m);
int et_fc_s8_dyn_ex(const void *plan, const float *x, int64_t m, float *y, void *scratch, size_t scratch_size,
                    int nthreads);

/* streaming read of n bytes over nthreads threads (a bandwidth probe); returns a checksum in *out */
int et_stream_read(const void *buf, size_t n, int nthreads, uint64_t *out);
/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* EDGERT_H */
