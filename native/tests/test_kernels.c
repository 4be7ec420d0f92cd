/* test_kernels.c — C-level tests of the core: every ISA variant this CPU runs against the reference kernels, the
 * reference against a double-precision dot, quantizer round trips, fp16 conversion, and the error returns; the
 * groups in test_llama.c (the decoder) and test_fc_s8.c (the INT8 fully-connected kernels) run from main too.
 *
 * Built and run by native/Makefile (host, sanitizers, AArch64 under qemu). Prints one line per failure and ends
 * with exactly "N passed, M failed"; exits non-zero on any failure. It must not depend on Python or on files.
 *
 *   test_kernels [--expect-isa LIST] [--expect-features LIST]
 *     fail unless et_isa_available() / et_cpu_features() equal LIST (the Makefile uses it to prove that a qemu CPU
 *     model really exercised the variant it was meant to).
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <time.h>

#include "core.h"
#include "testutil.h"

/* Error budgets, relative to the output's magnitude: the sum of |terms| that ref.c's formula adds for it (for f32
 * and f16 sum_k |w_k * x_k|; block formats see term_magnitude), the quantity float rounding scales with. Integer
 * block sums are exact everywhere, so the variants differ from the reference only in float summation order and
 * fused multiply-adds: a few ulps of the magnitude. A wrong block, nibble or tail element of a K = 4128 row costs
 * ~1/K = 2.4e-4 of it, far above either budget. */
#define BUDGET_ISA_VS_REF 1e-5    /* any ISA variant vs the scalar reference kernel */
#define BUDGET_REF_VS_DOUBLE 1e-5 /* reference kernel vs a double dot of dequantized weights and activations */
#define BUDGET_GEMV_T 1e-5        /* every variant of gemv_t_f16 (reference included) vs a double sum of its terms */
/* softmax vs double: each output relative, a few ulp of exp, plus the float sum of n terms (n * 2^-24 at worst),
 * plus the rounding of t = x - max (exp's condition number is |t|); or absolutely below FLT_MIN (the SIMD exp gives 0
 * where expf gives subnormals) */
#define BUDGET_SOFTMAX_REL(n, t) (4e-7 + 6e-8 * ((double)(n) + fabs(t)))
#define BUDGET_SOFTMAX_ABS 2e-38

/* quantizer round trips: |x - dequant(quant(x))| <= STEP * |d| + FP16_SLACK * block amax (fp16-rounded scales) */
#define ROUNDTRIP_STEP_Q4_0 1.0    /* q4_0 maps the far end of the range to q = 15, a whole step short */
#define ROUNDTRIP_STEP_Q4_1 0.5
#define ROUNDTRIP_STEP_Q8_0 0.5
#define ROUNDTRIP_FP16_SLACK 0x1p-8 /* scale (and min) rounded to fp16, times up to 16 steps */
#define ROUNDTRIP_F16_REL 0x1p-11   /* half an ulp of fp16, relative (or half the smallest subnormal) */

static const char *type_name(int t) {
    switch (t) {
    case ET_TYPE_F32: return "f32";
    case ET_TYPE_F16: return "f16";
    case ET_TYPE_Q4_0: return "q4_0";
    case ET_TYPE_Q4_1: return "q4_1";
    case ET_TYPE_Q8_0: return "q8_0";
    default: return "?";
    }
}

static int is_block(int t) { return t == ET_TYPE_Q4_0 || t == ET_TYPE_Q4_1 || t == ET_TYPE_Q8_0; }

static size_t block_qs_offset(int t) { return t == ET_TYPE_Q4_1 ? 4 : 2; }
static size_t block_bytes(int t) {
    return t == ET_TYPE_Q4_0 ? sizeof(block_q4_0) : t == ET_TYPE_Q4_1 ? sizeof(block_q4_1) : sizeof(block_q8_0);
}

/* n weight rows of type t: quantized from floats with a different scale per row (row 1 all zero), and for block
 * formats every third row's quants replaced by random bytes so every nibble and int8 value (incl. -128) occurs */
static void *make_weights(int t, int64_t n, int64_t k) {
    const size_t rs = et_row_size(t, k);
    float *wf = xmalloc((size_t)(n * k) * sizeof(float));
    static const float row_scale[] = {1.0f, 0.0f, 0.02f, 30.0f, 1e-3f};
    for (int64_t j = 0; j < n; j++) {
        const float s = row_scale[j % 5];
        for (int64_t c = 0; c < k; c++) wf[j * k + c] = s * rng_normal() + (j % 7 == 6 ? 0.5f * s : 0.0f);
    }
    uint8_t *w = xmalloc((size_t)n * rs);
    if (et_quantize(t, wf, w, n, k) != ET_OK) {
        fprintf(stderr, "test_kernels: et_quantize failed: %s\n", et_last_error());
        exit(2);
    }
    if (is_block(t)) {
        for (int64_t j = 2; j < n; j += 3) {
            for (int64_t b = 0; b < k / ET_QK; b++) {
                uint8_t *blk = w + (size_t)j * rs + (size_t)b * block_bytes(t);
                for (size_t q = block_qs_offset(t); q < block_bytes(t); q++) blk[q] = (uint8_t)rng_next();
            }
        }
    }
    free(wf);
    return w;
}

/* m activation rows: row 2 all zero, row 4 with one large outlier, the rest at varied scales */
static float *make_activations(int64_t m, int64_t k) {
    float *x = xmalloc((size_t)(m * k) * sizeof(float));
    for (int64_t i = 0; i < m; i++) {
        const float s = i == 2 ? 0.0f : (i % 3 == 1 ? 5.0f : 1.0f);
        for (int64_t c = 0; c < k; c++) x[i * k + c] = s * rng_normal();
        if (i == 4) x[i * k + (k - 1) / 2] = 1e4f;
    }
    return x;
}

/* ---- the reference against double precision ---- */

typedef struct {
    int64_t m, n, k;
    int type;
    void *w;
    float *x;
    double *scale; /* (m, n): magnitude of each output, see term_magnitude */
} problem;

/* sum of |terms| that ref.c's formula for one output adds up: for block formats the integer dot of unsigned
 * nibbles and the -8 offset (q4_0) or the min term (q4_1) are separate terms, and they can be far larger than
 * the dequantized |w * x| when they cancel (a weight near 0) */
static double term_magnitude(int type, const uint8_t *wrow, const block_q8_s *xq, const float *wd, const double *xd,
                             int64_t k) {
    double mag = 0.0;
    if (!is_block(type)) {
        for (int64_t c = 0; c < k; c++) mag += fabs((double)wd[c] * xd[c]);
        return mag;
    }
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const uint8_t *blk = wrow + (size_t)b * block_bytes(type);
        et_half dh, mh;
        memcpy(&dh, blk, 2);
        memcpy(&mh, blk + 2, 2);
        const double dwdx = fabs((double)et_fp16_to_fp32(dh) * xq[b].d);
        const uint8_t *qs = blk + block_qs_offset(type);
        double isum = 0.0;
        for (int c = 0; c < ET_QK; c++) {
            const int qw = type == ET_TYPE_Q8_0 ? (int8_t)qs[c] : c < ET_QK / 2 ? qs[c] & 0x0F : qs[c - ET_QK / 2] >> 4;
            isum += fabs((double)qw * xq[b].qs[c]);
        }
        if (type == ET_TYPE_Q4_0) isum += 8.0 * fabs((double)xq[b].sum);
        mag += dwdx * isum;
        if (type == ET_TYPE_Q4_1) mag += fabs((double)et_fp16_to_fp32(mh) * xq[b].d * xq[b].sum);
    }
    return mag;
}

/* checks the reference kernel's output against a double dot of the dequantized weights and the activations
 * exactly as the block kernels see them (quantized to block_q8_s, then d * q); fills p->scale */
static void check_ref_vs_double(const problem *p, const float *yref) {
    const int64_t m = p->m, n = p->n, k = p->k, nb = k / ET_QK;
    const size_t rs = et_row_size(p->type, k);
    float *wd = xmalloc((size_t)(n * k) * sizeof(float));
    et_dequantize(p->type, p->w, wd, n, k);
    double *xd = xmalloc((size_t)k * sizeof(double));
    block_q8_s *xq = xmalloc((size_t)(nb ? nb : 1) * sizeof(block_q8_s));
    double worst = 0.0;
    int64_t bad = -1;
    for (int64_t i = 0; i < m; i++) {
        if (is_block(p->type)) {
            et_quantize_row_q8_s(p->x + i * k, xq, k);
            for (int64_t c = 0; c < k; c++) xd[c] = (double)xq[c / ET_QK].d * (double)xq[c / ET_QK].qs[c % ET_QK];
        } else {
            for (int64_t c = 0; c < k; c++) xd[c] = p->x[i * k + c];
        }
        for (int64_t j = 0; j < n; j++) {
            double dot = 0.0;
            for (int64_t c = 0; c < k; c++) dot += (double)wd[j * k + c] * xd[c];
            const double mag =
                term_magnitude(p->type, (const uint8_t *)p->w + (size_t)j * rs, xq, wd + j * k, xd, k);
            p->scale[i * n + j] = mag;
            const double err = fabs((double)yref[i * n + j] - dot);
            const double rel = mag > 0.0 ? err / mag : (err > 0.0 ? INFINITY : 0.0);
            if (!(rel <= worst)) worst = rel, bad = i * n + j;
        }
    }
    check(worst <= BUDGET_REF_VS_DOUBLE, "ref vs double: %s m=%lld n=%lld k=%lld: error %.3g of the magnitude at y[%lld] "
          "(budget %.1g)", type_name(p->type), (long long)m, (long long)n, (long long)k, worst, (long long)bad,
          BUDGET_REF_VS_DOUBLE);
    free(wd), free(xd), free(xq);
}

/* ---- every ISA against the reference ---- */

#define CANARY 16 /* floats past the end of every output, which no kernel may touch */

static float *alloc_output(size_t n) {
    float *y = xmalloc((n + CANARY) * sizeof(float));
    for (size_t i = 0; i < n + CANARY; i++) y[i] = NAN; /* an output a kernel forgets stays NaN and fails */
    for (size_t i = n; i < n + CANARY; i++) y[i] = -1234.5f;
    return y;
}

static int canary_intact(const float *y, size_t n) {
    for (size_t i = n; i < n + CANARY; i++)
        if (y[i] != -1234.5f) return 0;
    return 1;
}

static int run_matmul(const problem *p, float *y, int nthreads) {
    const size_t ss = et_matmul_scratch_size(p->type, p->m, p->k);
    void *scratch = ss ? xmalloc(ss) : NULL;
    const int st = et_matmul(p->x, p->m, p->k, p->type, p->w, p->n, y, scratch, ss, nthreads);
    if (st != ET_OK) printf("  et_matmul: %s\n", et_last_error());
    free(scratch);
    return st;
}

static double worst_rel(const float *y, const float *yref, const double *scale, int64_t count, int64_t *at) {
    double worst = 0.0;
    *at = -1;
    for (int64_t i = 0; i < count; i++) {
        const double err = fabs((double)y[i] - (double)yref[i]);
        const double rel = scale[i] > 0.0 ? err / scale[i] : (err > 0.0 ? INFINITY : 0.0);
        if (!(rel <= worst)) worst = rel, *at = i; /* NaN counts as the worst */
    }
    return worst;
}

/* names of the variants this CPU runs, from et_isa_available() */
static int isa_list(char names[][16], int cap) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", et_isa_available());
    int n = 0;
    for (char *tok = strtok(buf, ","); tok && n < cap; tok = strtok(NULL, ",")) snprintf(names[n++], 16, "%s", tok);
    return n;
}

static void sweep_shape(int type, int64_t m, int64_t n, int64_t k, char isas[][16], int n_isas) {
    problem p = {.m = m, .n = n, .k = k, .type = type};
    p.w = make_weights(type, n, k);
    p.x = make_activations(m, k);
    p.scale = xmalloc((size_t)(m * n) * sizeof(double));
    const size_t count = (size_t)(m * n);

    float *yref = alloc_output(count);
    et_isa_select("ref");
    check(run_matmul(&p, yref, 1) == ET_OK && canary_intact(yref, count), "ref %s m=%lld n=%lld k=%lld ran",
          type_name(type), (long long)m, (long long)n, (long long)k);
    check_ref_vs_double(&p, yref);

    float *y1 = alloc_output(count), *y2 = alloc_output(count);
    for (int v = 0; v < n_isas; v++) {
        check(et_isa_select(isas[v]) == ET_OK && strcmp(et_isa_current(), isas[v]) == 0, "select %s", isas[v]);
        for (int nth = 1; nth <= 2; nth++) {
            float *y = nth == 1 ? y1 : y2;
            for (size_t i = 0; i < count; i++) y[i] = NAN;
            const int st = run_matmul(&p, y, nth);
            int64_t at;
            const double worst = worst_rel(y, yref, p.scale, (int64_t)count, &at);
            check(st == ET_OK && worst <= BUDGET_ISA_VS_REF && canary_intact(y, count),
                  "%s vs ref: %s m=%lld n=%lld k=%lld threads=%d: status %d, error %.3g of the magnitude at y[%lld] "
                  "= %g (ref %g, budget %.1g)%s", isas[v], type_name(type), (long long)m, (long long)n, (long long)k,
                  nth, st, worst, (long long)at, at >= 0 ? y[at] : 0.0, at >= 0 ? yref[at] : 0.0, BUDGET_ISA_VS_REF,
                  canary_intact(y, count) ? "" : ", wrote past the output");
        }
        check(memcmp(y1, y2, count * sizeof(float)) == 0, "%s: %s m=%lld n=%lld k=%lld: 2 threads differ from 1",
              isas[v], type_name(type), (long long)m, (long long)n, (long long)k);
    }
    free(y1), free(y2), free(yref), free(p.w), free(p.x), free(p.scale);
}

static void test_matmul_sweep(void) {
    static const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0, ET_TYPE_F16, ET_TYPE_F32};
    static const int64_t ks[] = {32, 64, 96, 4128};
    static const int64_t ks_float[] = {1, 5, 17, 31, 4131}; /* float kernels take any k: exercise their tails */
    static const int64_t ns[] = {1, 3, 12, 17, 33, 64}; /* 12: a 16-row tile whose second group is half full */
    static const int64_t ms[] = {1, 2, 7, 64};
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const int n_before = n_failed;
        for (size_t ik = 0; ik < 4 + (is_block(types[t]) ? 0 : 5); ik++) {
            const int64_t k = ik < 4 ? ks[ik] : ks_float[ik - 4];
            for (size_t in = 0; in < sizeof ns / sizeof *ns; in++)
                for (size_t im = 0; im < sizeof ms / sizeof *ms; im++) sweep_shape(types[t], ms[im], ns[in], k, isas, n_isas);
        }
        /* tall products: a GEMM splits into more chunks than threads only past ET_GEMM_MIN_ROWS rows per chunk, so
         * the chunks the pool's threads claim as they come free need n in the thousands */
        sweep_shape(types[t], 17, 3100, 64, isas, n_isas);
        sweep_shape(types[t], 5, 1553, 96, isas, n_isas);
        printf("matmul sweep %-4s over %s: %s\n", type_name(types[t]), et_isa_available(),
               n_failed == n_before ? "ok" : "FAILED");
    }
}

/* batch invariance: row i of an M-row product is bit for bit the 1-row product of x[i], whatever M, the row tile or
 * kernel path M selects, the output tile tails and the thread split; the LLM relies on it (a prompt's logits must
 * not depend on how it was batched or what the KV cache held) */
static void test_batch_invariance(void) {
    static const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0, ET_TYPE_F16, ET_TYPE_F32};
    static const int64_t ms[] = {2, 5, 16, 17, 64};
    static const int64_t ns[] = {33, 75};
    static const int64_t ks[] = {32, 96, 4128};          /* one block, a few, more than one packed segment */
    static const int64_t ks_float[] = {17, 96, 4131}; /* float kernels: vector tails too */
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const int type = types[t], n_before = n_failed;
        for (size_t ik = 0; ik < 3; ik++) {
            const int64_t k = is_block(type) ? ks[ik] : ks_float[ik];
            for (size_t in = 0; in < sizeof ns / sizeof *ns; in++) {
                const int64_t n = ns[in], m_max = ms[sizeof ms / sizeof *ms - 1];
                problem p = {.m = m_max, .n = n, .k = k, .type = type};
                p.w = make_weights(type, n, k);
                p.x = make_activations(m_max, k);
                float *y = alloc_output((size_t)(m_max * n)), *y1 = alloc_output((size_t)n);
                for (int v = 0; v < n_isas; v++) {
                    et_isa_select(isas[v]);
                    for (size_t im = 0; im < sizeof ms / sizeof *ms; im++) {
                        const int64_t m = ms[im];
                        for (int nth = 1; nth <= 2; nth++) {
                            problem pm = p;
                            pm.m = m;
                            int ok = run_matmul(&pm, y, nth) == ET_OK;
                            int64_t bad_row = -1;
                            for (int64_t i = 0; i < m && ok; i++) {
                                problem p1 = p;
                                p1.m = 1, p1.x = p.x + i * k;
                                ok = run_matmul(&p1, y1, nth) == ET_OK;
                                if (ok && memcmp(y + i * n, y1, (size_t)n * sizeof(float)) != 0) ok = 0, bad_row = i;
                            }
                            check(ok, "%s batch invariance %s m=%lld n=%lld k=%lld threads=%d: row %lld differs from "
                                  "its 1-row product", isas[v], type_name(type), (long long)m, (long long)n, (long long)k,
                                  nth, (long long)bad_row);
                        }
                    }
                }
                free(y), free(y1), free(p.w), free(p.x);
            }
        }
        printf("batch invariance %-4s over %s: %s\n", type_name(type), et_isa_available(),
               n_failed == n_before ? "ok" : "FAILED");
    }
}

/* the kernel contract itself, called through the trait table: padded weight rows, activation rows and output rows
 * (ldy > n) */
static void test_strided_kernels(void) {
    static const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0, ET_TYPE_F16, ET_TYPE_F32};
    const int64_t m = 7, n = 17, k = 96, ldy = n + 5;
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const int type = types[t];
        const size_t rs = et_row_size(type, k), ws = rs + 8;
        uint8_t *wc = make_weights(type, n, k);
        uint8_t *w = xmalloc((size_t)n * ws);
        memset(w, 0x5A, (size_t)n * ws);
        for (int64_t j = 0; j < n; j++) memcpy(w + (size_t)j * ws, wc + (size_t)j * rs, rs);
        float *x = make_activations(m, k);
        const size_t xrow = is_block(type) ? (size_t)(k / ET_QK) * sizeof(block_q8_s) : (size_t)k * sizeof(float);
        const size_t xs = xrow + sizeof(block_q8_s);
        uint8_t *xa = xmalloc((size_t)m * xs);
        memset(xa, 0x5A, (size_t)m * xs);
        for (int64_t i = 0; i < m; i++) {
            if (is_block(type)) et_quantize_row_q8_s(x + i * k, (block_q8_s *)(xa + (size_t)i * xs), k);
            else memcpy(xa + (size_t)i * xs, x + i * k, xrow);
        }
        problem p = {.m = m, .n = n, .k = k, .type = type, .w = wc, .x = x};
        p.scale = xmalloc((size_t)(m * n) * sizeof(double));
        float *ydense = alloc_output((size_t)(m * n));
        et_isa_select("ref");
        run_matmul(&p, ydense, 1);
        check_ref_vs_double(&p, ydense); /* fills p.scale */
        for (int v = 0; v < n_isas; v++) {
            et_isa_select(isas[v]);
            float *y = alloc_output((size_t)(m * ldy));
            for (size_t i = 0; i < (size_t)(m * ldy); i++) y[i] = -7.0f;
            const et_kernels *kt = et_active_kernels();
            const et_gemm_fn fn = type == ET_TYPE_Q4_0   ? kt->gemm_q4_0
                                  : type == ET_TYPE_Q4_1 ? kt->gemm_q4_1
                                  : type == ET_TYPE_Q8_0 ? kt->gemm_q8_0
                                  : type == ET_TYPE_F16  ? kt->gemm_f16
                                                         : kt->gemm_f32;
            fn(k, w, ws, n, xa, xs, m, y, (size_t)ldy);
            const int st = ET_OK;
            float *yd = xmalloc((size_t)(m * n) * sizeof(float));
            int pad_ok = canary_intact(y, (size_t)(m * ldy));
            for (int64_t i = 0; i < m; i++) {
                memcpy(yd + i * n, y + i * ldy, (size_t)n * sizeof(float));
                for (int64_t j = n; j < ldy; j++) pad_ok &= y[i * ldy + j] == -7.0f;
            }
            int64_t at;
            const double worst = worst_rel(yd, ydense, p.scale, m * n, &at);
            check(st == ET_OK && pad_ok && worst <= BUDGET_ISA_VS_REF,
                  "%s strided %s (ws=%zu xs=%zu ldy=%lld): status %d, error %.3g at %lld%s", isas[v], type_name(type), ws,
                  xs, (long long)ldy, st, worst, (long long)at, pad_ok ? "" : ", wrote outside its output rows");
            free(y), free(yd);
        }
        free(wc), free(w), free(x), free(xa), free(p.scale), free(ydense);
    }
}

/* ---- quantizers ---- */

static void test_quant_roundtrip(void) {
    static const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0, ET_TYPE_F16, ET_TYPE_F32};
    const int64_t n = 6, k = 4128;
    float *x = xmalloc((size_t)(n * k) * sizeof(float)), *y = xmalloc((size_t)(n * k) * sizeof(float));
    static const float row_scale[] = {1.0f, 1e-3f, 100.0f, 0.0f, 1.0f, 7.0f};
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < k; c++) x[j * k + c] = row_scale[j] * rng_normal() + (j == 4 ? 3.0f : 0.0f);
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const int type = types[t];
        uint8_t *q = xmalloc((size_t)n * et_row_size(type, k));
        const int st = et_quantize(type, x, q, n, k) | et_dequantize(type, q, y, n, k);
        double worst = 0.0; /* error / allowed */
        for (int64_t j = 0; j < n; j++) {
            for (int64_t b = 0; b < k / ET_QK; b++) {
                const float *xb = x + j * k + b * ET_QK, *yb = y + j * k + b * ET_QK;
                float amax = 0.0f, lo = xb[0], hi = xb[0];
                for (int c = 0; c < ET_QK; c++) {
                    amax = fmaxf(amax, fabsf(xb[c]));
                    lo = fminf(lo, xb[c]), hi = fmaxf(hi, xb[c]);
                }
                for (int c = 0; c < ET_QK; c++) {
                    double allowed;
                    switch (type) {
                    case ET_TYPE_Q4_0: allowed = ROUNDTRIP_STEP_Q4_0 * amax / 8 + ROUNDTRIP_FP16_SLACK * amax; break;
                    case ET_TYPE_Q4_1: allowed = ROUNDTRIP_STEP_Q4_1 * (hi - lo) / 15 + ROUNDTRIP_FP16_SLACK * amax; break;
                    case ET_TYPE_Q8_0: allowed = ROUNDTRIP_STEP_Q8_0 * amax / 127 + ROUNDTRIP_FP16_SLACK * amax; break;
                    case ET_TYPE_F16: allowed = fmax(ROUNDTRIP_F16_REL * fabsf(xb[c]), 0x1p-25); break;
                    default: allowed = 0.0;
                    }
                    const double err = fabs((double)xb[c] - (double)yb[c]);
                    const double r = allowed > 0 ? err / allowed : (err > 0 ? INFINITY : 0.0);
                    if (!(r <= worst)) worst = r;
                }
            }
        }
        check(st == ET_OK && worst <= 1.0, "%s round trip: status %d, worst error %.3g of its budget", type_name(type), st,
              worst);
        free(q);
    }
    free(x), free(y);
}

/* the activation quantizer: |q| <= 127, the block's largest magnitude maps to +-127, sum is exact, error <= d/2 */
static void test_quantize_q8_s(void) {
    const int64_t k = 256;
    float x[256];
    block_q8_s b[256 / ET_QK];
    for (int64_t c = 0; c < k; c++) x[c] = (c / ET_QK == 3 ? 0.0f : (float)(c / ET_QK + 1)) * rng_normal();
    x[70] = -50.0f;
    int ok = et_quantize_row_q8_s(x, b, k) == 0;
    for (int64_t i = 0; i < k / ET_QK && ok; i++) {
        int32_t sum = 0, qmax = 0;
        for (int c = 0; c < ET_QK; c++) {
            const int q = b[i].qs[c];
            sum += q;
            qmax = abs(q) > qmax ? abs(q) : qmax;
            ok &= q >= -127 && q <= 127;
            ok &= fabs((double)x[i * ET_QK + c] - (double)b[i].d * q) <= 0.5 * b[i].d * (1 + 1e-6) + 1e-30;
        }
        ok &= sum == b[i].sum && (i == 3 ? b[i].d == 0.0f && qmax == 0 : qmax == 127);
    }
    check(ok, "et_quantize_row_q8_s: quant range, scale, exact sum, error <= d/2");
    x[100] = NAN;
    check(et_quantize_row_q8_s(x, b, k) == -1, "et_quantize_row_q8_s refuses NaN");
    x[100] = -INFINITY;
    check(et_quantize_row_q8_s(x, b, k) == -1, "et_quantize_row_q8_s refuses -Inf");
}

/* every ISA's activation quantizer writes the reference's bytes: rows of 1..40 blocks (the AVX-512 one takes 16
 * blocks at a time, then single blocks), block scales from 1e-38 to 1e30, zero blocks, ties (x * id exactly
 * halfway: round half to even), and NaN/Inf in a group's first, middle and last block and in the tail */
static void test_quantize_q8_s_isas(void) {
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    enum { NB = 40, K = NB * ET_QK };
    static const float scales[] = {1.0f, 0.0f, 1e-38f, 0x1p-121f, 0x1p-120f, 3e-5f, 1e30f, 127.0f, 1.0f, 250.0f};
    float *x = xmalloc(K * sizeof(float));
    block_q8_s *want = xmalloc(NB * sizeof(block_q8_s)), *got = xmalloc(NB * sizeof(block_q8_s));
    for (int64_t c = 0; c < K; c++) {
        const int64_t blk = c / ET_QK;
        const float sc = scales[blk % (sizeof scales / sizeof *scales)];
        /* blocks 7 and 27: amax 127 (id = 1), halves on either side of zero: every code is a tie */
        x[c] = blk == 7 || blk == 27 ? (c % ET_QK == 0 ? 127.0f : (float)((c % 9) - 4) + 0.5f) : sc * rng_normal();
    }
    for (int v = 0; v < n_isas; v++) {
        check(et_isa_select(isas[v]) == ET_OK, "select %s", isas[v]);
        for (int64_t nb = 1; nb <= NB; nb++) {
            const int64_t k = nb * ET_QK;
            memset(want, 0xA5, NB * sizeof(block_q8_s)), memset(got, 0x5A, NB * sizeof(block_q8_s));
            const int64_t st = et_quantize_rows_q8_s(x, 1, k, got, 1);
            check(et_quantize_row_q8_s(x, want, k) == 0 && st == -1 &&
                      memcmp(got, want, (size_t)nb * sizeof(block_q8_s)) == 0,
                  "%s activation quantizer, %lld blocks: the reference's bytes", isas[v], (long long)nb);
            /* past the row: untouched */
            check(nb == NB || ((const uint8_t *)got)[nb * sizeof(block_q8_s)] == 0x5A, "%s quantizer stays in its row",
                  isas[v]);
        }
        static const int64_t bad_at[] = {0, 16 * ET_QK + 7, 31 * ET_QK + 31, 32 * ET_QK + 5, K - 1};
        for (size_t i = 0; i < sizeof bad_at / sizeof *bad_at; i++) {
            const float keep = x[bad_at[i]];
            x[bad_at[i]] = i % 2 ? INFINITY : NAN;
            check(et_quantize_rows_q8_s(x, 1, K, got, 1) == 0, "%s quantizer refuses %s at %lld", isas[v],
                  i % 2 ? "Inf" : "NaN", (long long)bad_at[i]);
            x[bad_at[i]] = keep;
        }
    }
    et_isa_select(NULL);
    free(x), free(want), free(got);
}

/* ---- fp16 ---- */

static double half_value(et_half h) { /* straight from the IEEE binary16 definition */
    const int s = h >> 15, e = (h >> 10) & 0x1F, mant = h & 0x3FF;
    const double v = e == 0 ? ldexp(mant, -24) : e == 31 ? (mant ? NAN : INFINITY) : ldexp(1024 + mant, e - 25);
    return s ? -v : v;
}

static int is_half_nan(et_half h) { return (h & 0x7C00) == 0x7C00 && (h & 0x03FF) != 0; }

static void test_fp16(void) {
    int bad_value = 0, bad_trip = 0, first = -1;
    for (uint32_t u = 0; u < 65536; u++) {
        const et_half h = (et_half)u;
        const float f = et_fp16_to_fp32(h);
        const double want = half_value(h);
        if (isnan(want) ? !isnan(f) : ((double)f != want || !!signbit(f) != (h >> 15))) bad_value++, first = (int)u;
        const et_half back = et_fp32_to_fp16(f);
        if (is_half_nan(h) ? !(is_half_nan(back) && (back & 0x8000) == (h & 0x8000)) : back != h)
            bad_trip++, first = (int)u;
    }
    check(bad_value == 0, "fp16->fp32 disagrees with the binary16 definition for %d halves (e.g. 0x%04x)", bad_value,
          first);
    check(bad_trip == 0, "fp16->fp32->fp16 does not round-trip for %d halves (e.g. 0x%04x)", bad_trip, first);

    static const struct {
        float f;
        et_half h;
        const char *why;
    } cases[] = {
        {0.0f, 0x0000, "zero"},
        {-0.0f, 0x8000, "negative zero keeps its sign"},
        {1.0f, 0x3C00, "one"},
        {-2.0f, 0xC000, "minus two"},
        {0.1f, 0x2E66, "0.1 rounds to nearest"},
        {3.14159265f, 0x4248, "pi"},
        {65504.0f, 0x7BFF, "largest half"},
        {65519.99f, 0x7BFF, "just below the overflow tie"},
        {65520.0f, 0x7C00, "overflow tie rounds to even = inf"},
        {1e10f, 0x7C00, "overflow to inf"},
        {-1e10f, 0xFC00, "overflow to -inf"},
        {INFINITY, 0x7C00, "inf"},
        {-INFINITY, 0xFC00, "-inf"},
        {1.0f + 0x1p-11f, 0x3C00, "tie rounds to even (down)"},
        {1.0f + 3 * 0x1p-11f, 0x3C02, "tie rounds to even (up)"},
        {1.0f + 0x1p-11f + 0x1p-23f, 0x3C01, "just above a tie rounds up"},
        {0x1p-14f, 0x0400, "smallest normal"},
        {0x1p-14f - 0x1p-24f, 0x03FF, "largest subnormal"},
        {0x1p-24f, 0x0001, "smallest subnormal"},
        {-0x1p-24f, 0x8001, "smallest negative subnormal"},
        {0x1p-25f, 0x0000, "half the smallest subnormal: tie to even = 0"},
        {0x1.8p-25f, 0x0001, "above that tie rounds up"},
        {3 * 0x1p-25f, 0x0002, "subnormal tie rounds to even (up)"},
        {5 * 0x1p-25f, 0x0002, "subnormal tie rounds to even (down)"},
        {0x1p-26f, 0x0000, "underflow to zero"},
        {-1e-30f, 0x8000, "underflow to negative zero"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const et_half got = et_fp32_to_fp16(cases[i].f);
        check(got == cases[i].h, "fp32->fp16(%a) = 0x%04x, expected 0x%04x (%s)", (double)cases[i].f, got, cases[i].h,
              cases[i].why);
    }
    check(is_half_nan(et_fp32_to_fp16(NAN)), "fp32->fp16(NaN) is a NaN");
    check(is_half_nan(et_fp32_to_fp16(-NAN)) && (et_fp32_to_fp16(-NAN) & 0x8000), "fp32->fp16(-NaN) is a negative NaN");

#if defined(__FLT16_MAX__)
    /* the compiler's own conversion (hardware or libgcc), over random float bit patterns */
    int bad = 0;
    uint32_t first_bits = 0;
    for (int i = 0; i < 1 << 20; i++) {
        const uint32_t bits = (uint32_t)rng_next();
        const float f = et_f32_from_bits(bits);
        if (isnan(f)) continue;
        const _Float16 hv = (_Float16)f;
        et_half want;
        memcpy(&want, &hv, 2);
        if (et_fp32_to_fp16(f) != want) bad++, first_bits = bits;
    }
    check(bad == 0, "fp32->fp16 disagrees with the compiler's _Float16 for %d floats (e.g. bits 0x%08x)", bad,
          first_bits);
#endif
}

/* ---- error returns ---- */

/* gemv_t_f16 (attention: scores over key tiles, n = 32 columns; values by position, n = head_dim; for a group of h
 * query heads) in every variant against a double sum, over widths around each ISA's column blocks (8, 16, 32, 64),
 * row counts with odd tails, and group sizes around AVX2's blocks of four heads. x holds exactly the bytes a call
 * may read and a the rows it may read (ASan catches a read past them); y has a guard past each head's n values. */
static void test_gemv_t_f16(void) {
    static const int64_t ns[] = {1, 3, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 48, 63, 64, 65, 80, 96, 128, 131};
    static const int64_t ks[] = {1, 2, 3, 31, 64, 257};
    static const int64_t hs[] = {1, 2, 3, 4, 5, 9};
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
            for (size_t hi = 0; hi < sizeof hs / sizeof hs[0]; hi++) {
                const int64_t n = ns[ni], k = ks[ki], h = hs[hi];
                const size_t pad = (size_t)(ni + hi) % 2 * 5, stride = (size_t)n + pad, lda = (size_t)k + pad;
                const size_t ldy = (size_t)n + 4, count = (size_t)(k - 1) * stride + (size_t)n;
                et_half *x = xmalloc(count * sizeof(et_half));
                float *a = xmalloc(((size_t)(h - 1) * lda + (size_t)k) * sizeof(float));
                float *y = xmalloc((size_t)h * ldy * sizeof(float));
                double *ref = xmalloc((size_t)(h * n) * sizeof(double)), *mag = xmalloc((size_t)(h * n) * sizeof(double));
                for (size_t i = 0; i < count; i++) x[i] = et_fp32_to_fp16(rng_normal());
                for (size_t i = 0; i < (size_t)(h - 1) * lda + (size_t)k; i++) a[i] = rng_normal();
                for (int64_t i = 0; i < h; i++)
                    for (int64_t j = 0; j < n; j++) {
                        double r = 0.0, mg = 0.0;
                        for (int64_t d = 0; d < k; d++) {
                            const double t = (double)a[(size_t)i * lda + d] * half_value(x[(size_t)d * stride + j]);
                            r += t, mg += fabs(t);
                        }
                        ref[i * n + j] = r, mag[i * n + j] = mg;
                    }
                for (int v = 0; v < n_isas; v++) {
                    const int sel = et_isa_select(isas[v]);
                    for (size_t i = 0; i < (size_t)h * ldy; i++) y[i] = -7.0f;
                    et_active_kernels()->gemv_t_f16(n, k, h, a, lda, x, stride, y, ldy);
                    double worst = 0.0;
                    int64_t at = 0, guard = 1;
                    for (int64_t i = 0; i < h; i++) {
                        for (int64_t j = 0; j < n; j++) {
                            const double m = mag[i * n + j];
                            const double rel = fabs(y[(size_t)i * ldy + j] - ref[i * n + j]) / (m > 0.0 ? m : 1.0);
                            if (!(rel <= worst)) worst = rel, at = i * n + j;
                        }
                        for (size_t j = (size_t)n; j < ldy; j++) guard &= y[(size_t)i * ldy + j] == -7.0f;
                    }
                    check(sel == ET_OK && worst <= BUDGET_GEMV_T && guard,
                          "gemv_t_f16 %s n=%lld k=%lld h=%lld stride=%zu: error %.3g of the magnitude at head %lld "
                          "y[%lld] = %g (double %g, budget %.1g)%s", isas[v], (long long)n, (long long)k,
                          (long long)h, stride, worst, (long long)(at / n), (long long)(at % n),
                          y[(size_t)(at / n) * ldy + (size_t)(at % n)], ref[at], BUDGET_GEMV_T,
                          guard ? "" : ", wrote past a head's n values");
                }
                free(x), free(a), free(y), free(ref), free(mag);
            }
    et_isa_select(NULL);
}

/* softmax in every variant against double exp, over lengths around each ISA's vector (4, 8) and spreads from equal
 * scores to ones whose exp underflows; NaN or +Inf anywhere makes every output NaN (as the reference does), -Inf
 * gives 0. x holds exactly n floats (ASan catches an access past them). */
static void test_softmax(void) {
    static const int64_t ns[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1000, 2049};
    static const float spreads[] = {0.0f, 1.0f, 10.0f, 60.0f, 200.0f};
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        for (size_t si = 0; si < sizeof spreads / sizeof spreads[0]; si++) {
            const int64_t n = ns[ni];
            float *in = xmalloc((size_t)n * sizeof(float)), *x = xmalloc((size_t)n * sizeof(float));
            double *ref = xmalloc((size_t)n * sizeof(double));
            double max = -INFINITY, sum = 0.0;
            for (int64_t j = 0; j < n; j++) in[j] = spreads[si] * rng_normal() + 3.0f, max = fmax(max, in[j]);
            for (int64_t j = 0; j < n; j++) sum += ref[j] = exp((double)in[j] - max);
            for (int64_t j = 0; j < n; j++) ref[j] /= sum;
            for (int v = 0; v < n_isas; v++) {
                const int sel = et_isa_select(isas[v]);
                memcpy(x, in, (size_t)n * sizeof(float));
                et_active_kernels()->softmax(x, n);
                int64_t bad = -1;
                for (int64_t j = 0; j < n && bad < 0; j++)
                    if (!(fabs(x[j] - ref[j]) <= BUDGET_SOFTMAX_REL(n, in[j] - max) * ref[j] + BUDGET_SOFTMAX_ABS)) bad = j;
                check(sel == ET_OK && bad < 0, "softmax %s n=%lld spread %g: x[%lld] = %.9g, double %.9g", isas[v],
                      (long long)n, spreads[si], (long long)bad, bad >= 0 ? x[bad] : 0.0, bad >= 0 ? ref[bad] : 0.0);
                for (int special = 0; special < 3; special++) {
                    memcpy(x, in, (size_t)n * sizeof(float));
                    const int64_t at = (n * (special + 1)) / 4 % n;
                    x[at] = special == 0 ? NAN : special == 1 ? INFINITY : -INFINITY;
                    et_active_kernels()->softmax(x, n);
                    int ok = 1;
                    for (int64_t j = 0; j < n; j++)
                        ok &= special < 2 ? isnan(x[j]) : j == at ? x[j] == 0.0f || n == 1 : isfinite(x[j]);
                    check(ok, "softmax %s n=%lld: %s at %lld", isas[v], (long long)n,
                          special == 0 ? "NaN makes every output NaN" : special == 1 ? "+Inf makes every output NaN"
                                                                      : "-Inf gives 0", (long long)at);
                }
            }
            free(in), free(x), free(ref);
        }
    et_isa_select(NULL);
}

static void expect_status(int got, int want, const char *what) {
    check(got == want && (want == ET_OK || et_last_error()[0]), "%s: status %d, expected %d (message: '%s')", what, got,
          want, et_last_error());
}

static void test_errors(void) {
    const int64_t m = 2, n = 4, k = 64;
    float x[2 * 64], y[2 * 4], wf[4 * 64];
    for (int i = 0; i < 2 * 64; i++) x[i] = rng_normal();
    for (int i = 0; i < 4 * 64; i++) wf[i] = rng_normal();
    block_q8_0 w[4 * 2];
    et_quantize(ET_TYPE_Q8_0, wf, w, n, k);
    const size_t ss = et_matmul_scratch_size(ET_TYPE_Q8_0, m, k);
    uint8_t *scratch = xmalloc(ss);

    et_isa_select(NULL);
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, w, n, y, scratch, ss, 1), ET_OK, "valid matmul");
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, w, n, y, scratch, ss, 0), ET_OK, "valid matmul, pool's threads");
    expect_status(et_matmul(x, m, 48, ET_TYPE_Q8_0, w, n, y, scratch, ss, 1), ET_ERR_INVALID, "k not a multiple of 32");
    expect_status(et_matmul(x, m, 48, ET_TYPE_Q4_0, w, n, y, scratch, ss, 1), ET_ERR_INVALID, "q4_0 k=48");
    expect_status(et_matmul(x, 0, k, ET_TYPE_Q8_0, w, n, y, scratch, ss, 1), ET_ERR_INVALID, "m = 0");
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, w, -1, y, scratch, ss, 1), ET_ERR_INVALID, "n < 0");
    expect_status(et_matmul(x, m, 0, ET_TYPE_F32, wf, n, y, NULL, 0, 1), ET_ERR_INVALID, "k = 0");
    expect_status(et_matmul(NULL, m, k, ET_TYPE_Q8_0, w, n, y, scratch, ss, 1), ET_ERR_INVALID, "NULL activations");
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, NULL, n, y, scratch, ss, 1), ET_ERR_INVALID, "NULL weights");
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, w, n, NULL, scratch, ss, 1), ET_ERR_INVALID, "NULL output");
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, w, n, y, NULL, ss, 1), ET_ERR_INVALID, "NULL scratch");
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, w, n, y, scratch, ss - 1, 1), ET_ERR_INVALID, "scratch one byte short");
    expect_status(et_matmul(x, m, k, 7, w, n, y, scratch, ss, 1), ET_ERR_INVALID, "unknown weight type");
    expect_status(et_matmul(x, m, k, ET_TYPE_F32, wf, n, y, NULL, 0, 1), ET_OK, "f32 needs no scratch");
    x[70] = NAN;
    expect_status(et_matmul(x, m, k, ET_TYPE_Q8_0, w, n, y, scratch, ss, 1), ET_ERR_NONFINITE, "NaN activation");
    x[70] = INFINITY;
    expect_status(et_matmul(x, m, k, ET_TYPE_Q4_1, w, n, y, scratch, ss, 1), ET_ERR_NONFINITE, "Inf activation");
    x[70] = 0.0f;

    check(et_matmul_scratch_size(ET_TYPE_Q4_0, 3, 64) == 3 * 2 * sizeof(block_q8_s), "scratch size q4_0 (3, 64)");
    check(et_matmul_scratch_size(ET_TYPE_Q4_0, 3, 33) == 0, "scratch size is 0 for k=33");
    check(et_matmul_scratch_size(ET_TYPE_F32, 3, 64) == 0, "float weights need no scratch");
    check(et_row_size(ET_TYPE_Q4_0, 64) == 36 && et_row_size(ET_TYPE_Q4_1, 64) == 40 &&
              et_row_size(ET_TYPE_Q8_0, 64) == 68 && et_row_size(ET_TYPE_F16, 3) == 6 && et_row_size(ET_TYPE_F32, 3) == 12,
          "row sizes");
    check(et_row_size(ET_TYPE_Q8_0, 33) == 0 && et_row_size(ET_TYPE_F32, 0) == 0 && et_row_size(99, 32) == 0,
          "row size 0 for k=33, k=0, unknown type");

    uint8_t q[4 * 68];
    expect_status(et_quantize(ET_TYPE_Q4_0, wf, q, 1, 33), ET_ERR_INVALID, "quantize q4_0 k=33");
    expect_status(et_quantize(99, wf, q, 1, 32), ET_ERR_INVALID, "quantize unknown type");
    expect_status(et_dequantize(99, q, wf, 1, 32), ET_ERR_INVALID, "dequantize unknown type");
    wf[40] = NAN;
    expect_status(et_quantize(ET_TYPE_Q8_0, wf, q, n, k), ET_ERR_INVALID, "quantize NaN weights");
    wf[40] = INFINITY;
    expect_status(et_quantize(ET_TYPE_F16, wf, q, n, k), ET_ERR_INVALID, "quantize Inf weights");

    expect_status(et_isa_select("no-such-isa"), ET_ERR_INVALID, "select an unknown ISA");
#if defined(__aarch64__)
    expect_status(et_isa_select("avx2"), ET_ERR_UNSUPPORTED, "select an ISA this CPU cannot run");
#else
    expect_status(et_isa_select("neon"), ET_ERR_UNSUPPORTED, "select an ISA this CPU cannot run");
#endif
    expect_status(et_isa_select("auto"), ET_OK, "select auto");
    expect_status(et_set_threads(0), ET_ERR_INVALID, "0 threads");
    expect_status(et_set_threads(100000), ET_ERR_INVALID, "too many threads");
    free(scratch);
}

/* et_matmul_ex: rows of kx <= k floats, ldx apart, equal bit for bit the dense product of the zero-padded rows;
 * what lies between kx and ldx (NaN here) is never read, and nothing outside y's n columns of each row is written */
static void test_matmul_ex(void) {
    static const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0};
    static const int64_t ms[] = {1, 5, 20};
    static const int64_t kxs[][2] = {{1, 32}, {31, 32}, {33, 64}, {95, 96}, {96, 96}, {40, 128}, {120, 128}};
    const int64_t n = 37, ldy = n + 4;
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const int type = types[t], n_before = n_failed;
        for (size_t ik = 0; ik < sizeof kxs / sizeof *kxs; ik++) {
            const int64_t kx = kxs[ik][0], k = kxs[ik][1], ldx = kx + 3, m_max = ms[2];
            uint8_t *w = make_weights(type, n, k);
            float *dense = make_activations(m_max, k);
            float *x = xmalloc((size_t)(m_max * ldx) * sizeof(float));
            for (int64_t i = 0; i < m_max; i++) {
                for (int64_t c = 0; c < ldx; c++) x[i * ldx + c] = c < kx ? dense[i * k + c] : NAN;
                for (int64_t c = kx; c < k; c++) dense[i * k + c] = 0.0f;
            }
            const size_t ss = et_matmul_scratch_size(type, m_max, k);
            void *scratch = xmalloc(ss);
            float *yd = alloc_output((size_t)(m_max * n)), *y = alloc_output((size_t)(m_max * ldy));
            for (int v = 0; v < n_isas; v++) {
                et_isa_select(isas[v]);
                for (size_t im = 0; im < sizeof ms / sizeof *ms; im++) {
                    const int64_t m = ms[im];
                    for (int64_t i = 0; i < m * ldy; i++) y[i] = -7.0f;
                    int ok = et_matmul(dense, m, k, type, w, n, yd, scratch, ss, 2) == ET_OK &&
                             et_matmul_ex(x, m, kx, (size_t)ldx, type, w, n, k, y, (size_t)ldy, scratch, ss, 2) == ET_OK;
                    for (int64_t i = 0; i < m && ok; i++) {
                        ok = memcmp(y + i * ldy, yd + i * n, (size_t)n * sizeof(float)) == 0;
                        for (int64_t j = n; j < ldy; j++) ok &= y[i * ldy + j] == -7.0f;
                    }
                    ok &= canary_intact(y, (size_t)(m_max * ldy));
                    check(ok, "%s matmul_ex %s m=%lld kx=%lld k=%lld ldx=%lld ldy=%lld: differs from the zero-padded "
                          "product or wrote outside its rows (%s)", isas[v], type_name(type), (long long)m, (long long)kx,
                          (long long)k, (long long)ldx, (long long)ldy, et_last_error());
                }
            }
            free(w), free(dense), free(x), free(scratch), free(yd), free(y);
        }
        printf("matmul_ex (short, strided rows) %-4s over %s: %s\n", type_name(type), et_isa_available(),
               n_failed == n_before ? "ok" : "FAILED");
    }
    { /* more threads asked for than the pool runs (256): every output row is still written */
        const int64_t n = 8192, k = 64;
        const size_t rs = et_row_size(ET_TYPE_Q8_0, k), ss = et_matmul_scratch_size(ET_TYPE_Q8_0, 1, k);
        uint8_t *w = make_weights(ET_TYPE_Q8_0, n, k);
        float *x1 = make_activations(1, k), *y1 = alloc_output((size_t)n), *yr = alloc_output((size_t)n);
        void *sc = xmalloc(ss);
        const int st = et_matmul(x1, 1, k, ET_TYPE_Q8_0, w, n, y1, sc, ss, 1000);
        et_matmul(x1, 1, k, ET_TYPE_Q8_0, w, n, yr, sc, ss, 1);
        check(st == ET_OK && !memcmp(y1, yr, (size_t)n * sizeof(float)) && canary_intact(y1, (size_t)n),
              "matmul with nthreads = 1000 writes every row (%zu-byte rows)", rs);
        free(w), free(x1), free(y1), free(yr), free(sc);
    }
    /* arguments it refuses */
    float x[64] = {0}, y[64], wf[64] = {0};
    uint8_t w[64] = {0}, scratch[256];
    expect_status(et_matmul_ex(x, 1, 33, 33, ET_TYPE_Q8_0, w, 1, 32, y, 1, scratch, sizeof scratch, 1), ET_ERR_INVALID,
                  "kx > k");
    expect_status(et_matmul_ex(x, 1, 0, 1, ET_TYPE_Q8_0, w, 1, 32, y, 1, scratch, sizeof scratch, 1), ET_ERR_INVALID,
                  "kx = 0");
    expect_status(et_matmul_ex(x, 1, 20, 19, ET_TYPE_Q8_0, w, 1, 32, y, 1, scratch, sizeof scratch, 1), ET_ERR_INVALID,
                  "ldx < kx");
    expect_status(et_matmul_ex(x, 1, 20, 20, ET_TYPE_Q8_0, w, 2, 32, y, 1, scratch, sizeof scratch, 1), ET_ERR_INVALID,
                  "ldy < n");
    expect_status(et_matmul_ex(x, 1, 20, 20, ET_TYPE_F32, wf, 1, 32, y, 1, NULL, 0, 1), ET_ERR_INVALID,
                  "float weights with kx < k");
}

/* ---- the x16 layout: repacked weights give the GGUF rows' products bit for bit on every ISA ---- */

static int x16_type(int t) { return t | ET_TYPE_X16; }

static int run_matmul_w(const problem *p, int wtype, const void *w, float *y, int nthreads) {
    problem q = *p;
    q.w = (void *)w;
    q.type = wtype;
    return run_matmul(&q, y, nthreads);
}

static void test_x16(void) {
    static const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0};
    static const int64_t ks[] = {32, 96, 4128};
    static const int64_t ns[] = {1, 3, 12, 16, 17, 33, 64, 100}; /* 1-7 tiles: pairs, a partial tile alone or paired */
    static const int64_t ms[] = {1, 2, 3, 5, 16, 17};
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const int type = types[t], n_before = n_failed;
        for (size_t ik = 0; ik < sizeof ks / sizeof *ks; ik++)
            for (size_t in = 0; in < sizeof ns / sizeof *ns; in++) {
                const int64_t k = ks[ik], n = ns[in], nb = k / ET_QK, m_max = 17;
                const size_t rs = et_row_size(type, k), size = et_repack_size(type, n, k);
                const size_t tile_bytes = 16 * et_row_size(x16_type(type), k);
                check(size == (size_t)((n + 15) / 16) * tile_bytes && tile_bytes % 64 == 0 &&
                          tile_bytes >= (size_t)nb * (et_x16_qbytes(type) + et_x16_sbytes(type)),
                      "x16 %s n=%lld k=%lld: size %zu, tile %zu", type_name(type), (long long)n, (long long)k, size,
                      tile_bytes);
                problem p = {.m = m_max, .n = n, .k = k, .type = type};
                p.w = make_weights(type, n, k);
                p.x = make_activations(m_max, k);
                uint8_t *wx = xmalloc(size + 64);
                memset(wx, 0xA5, size + 64);
                check(et_repack(type, p.w, n, k, wx, size) == ET_OK, "repack %s", type_name(type));
                /* every block reads back; the missing rows of the last tile and each tile's padding are zeros */
                int same = 1, zero = 1, untouched = 1;
                uint8_t blk[64];
                for (int64_t j = 0; j < (n + 15) / 16 * 16; j++)
                    for (int64_t b = 0; b < nb; b++) {
                        et_x16_get_block(type, wx + (size_t)(j / 16) * tile_bytes, nb, (int)(j % 16), b, blk);
                        if (j < n) same &= !memcmp(blk, (uint8_t *)p.w + (size_t)j * rs + (size_t)b * block_bytes(type),
                                                   block_bytes(type));
                        else for (size_t c = 0; c < block_bytes(type); c++) zero &= blk[c] == 0;
                    }
                for (int64_t tl = 0; tl < (n + 15) / 16; tl++)
                    for (size_t c = (size_t)nb * (et_x16_qbytes(type) + et_x16_sbytes(type)); c < tile_bytes; c++)
                        zero &= wx[(size_t)tl * tile_bytes + c] == 0;
                for (size_t c = size; c < size + 64; c++) untouched &= wx[c] == 0xA5;
                uint8_t *back = xmalloc((size_t)n * rs);
                same &= et_unrepack(type, wx, n, k, back, (size_t)n * rs) == ET_OK && !memcmp(back, p.w, (size_t)n * rs);
                expect_status(et_unrepack(type, wx, n, k, back, (size_t)n * rs - 1), ET_ERR_INVALID,
                              "unrepack into too small an output");
                free(back);
                check(same && zero && untouched, "x16 %s n=%lld k=%lld: blocks read back %d, padding zero %d, "
                      "nothing written past the size %d", type_name(type), (long long)n, (long long)k, same, zero,
                      untouched);
                for (int v = 0; v < n_isas; v++) {
                    et_isa_select(isas[v]);
                    for (size_t im = 0; im < sizeof ms / sizeof *ms; im++)
                        for (int nth = 1; nth <= 2; nth++) {
                            problem pm = p;
                            pm.m = ms[im];
                            const size_t count = (size_t)(pm.m * n);
                            float *y = alloc_output(count), *yx = alloc_output(count);
                            /* a table without its own x16 kernels runs the layout on the reference's */
                            const int native = et_repack_native(type);
                            int ok = run_matmul_w(&pm, x16_type(type), wx, yx, nth) == ET_OK;
                            if (!native) et_isa_select("ref");
                            ok &= run_matmul(&pm, y, nth) == ET_OK;
                            et_isa_select(isas[v]);
                            check(ok && !memcmp(y, yx, count * sizeof(float)) && canary_intact(yx, count),
                                  "%s x16 %s m=%lld n=%lld k=%lld threads=%d: differs from the GGUF rows' product "
                                  "(%s kernel)%s", isas[v], type_name(type), (long long)pm.m, (long long)n, (long long)k,
                                  nth, native ? isas[v] : "ref", canary_intact(yx, count) ? "" : " (wrote past the output)");
                            free(y), free(yx);
                        }
                }
                free(wx), free(p.w), free(p.x);
            }
        printf("x16 repack %-4s over %s: %s\n", type_name(type), et_isa_available(), n_failed == n_before ? "ok" : "FAILED");
    }
    { /* above 1 MiB the tiles are shared out over the pool: the same bytes */
        const int64_t n = 301, k = 4096;
        const size_t rs = et_row_size(ET_TYPE_Q8_0, k), size = et_repack_size(ET_TYPE_Q8_0, n, k);
        uint8_t *w = make_weights(ET_TYPE_Q8_0, n, k), *wx = xmalloc(size), *back = xmalloc((size_t)n * rs);
        check(size > (1u << 20) && et_repack(ET_TYPE_Q8_0, w, n, k, wx, size) == ET_OK &&
                  et_unrepack(ET_TYPE_Q8_0, wx, n, k, back, (size_t)n * rs) == ET_OK && !memcmp(back, w, (size_t)n * rs),
              "x16 repack of %zu bytes on the pool reads back", size);
        free(w), free(wx), free(back);
    }
    /* what et_repack refuses; sizes it cannot give */
    uint8_t w[64] = {0}, out[1024];
    expect_status(et_repack(ET_TYPE_F16, w, 1, 32, out, sizeof out), ET_ERR_INVALID, "repack f16");
    expect_status(et_repack(ET_TYPE_Q4_0_X16, w, 1, 32, out, sizeof out), ET_ERR_INVALID, "repack an x16 type");
    expect_status(et_repack(ET_TYPE_Q4_0, w, 1, 48, out, sizeof out), ET_ERR_INVALID, "repack k % 32");
    expect_status(et_repack(ET_TYPE_Q4_0, w, 0, 32, out, sizeof out), ET_ERR_INVALID, "repack n = 0");
    expect_status(et_repack(ET_TYPE_Q4_0, w, 1, 32, out, et_repack_size(ET_TYPE_Q4_0, 1, 32) - 1), ET_ERR_INVALID,
                  "repack into too small an output");
    expect_status(et_repack(ET_TYPE_Q4_0, NULL, 1, 32, out, sizeof out), ET_ERR_INVALID, "repack NULL weights");
    check(et_repack_size(ET_TYPE_Q8_0, INT64_MAX / 2, 1 << 20) == 0, "et_repack_size overflow gives 0");
    check(et_repack_size(ET_TYPE_Q8_0, INT64_MAX, 32) == 0, "et_repack_size of INT64_MAX rows gives 0 (no UB)");
    check(et_repack_size(ET_TYPE_Q4_0, 1, 2049638230412172416LL) == 0 &&
              et_row_size(ET_TYPE_Q4_0_X16, 2049638230412172416LL) == 0,
          "a tile too large for size_t gives 0 (not a wrapped size)");
    check(et_row_size(ET_TYPE_Q4_0_X16, 48) == 0 && et_row_size(ET_TYPE_X16, 32) == 0 && et_row_size(0x1FF, 32) == 0,
          "et_row_size refuses bad x16 types and k");
    et_isa_select("ref");
    check(et_repack_native(ET_TYPE_Q4_0) == 0, "the reference table does not count as a native x16 kernel");
#if defined(__x86_64__)
    if (et_isa_select("avx512") == ET_OK)
        check(et_repack_native(ET_TYPE_Q4_0) && et_repack_native(ET_TYPE_Q4_1_X16) && et_repack_native(ET_TYPE_Q8_0) &&
                  !et_repack_native(ET_TYPE_F16),
              "avx512 runs the x16 layout on its own kernels");
#endif
    et_isa_select(NULL);
}

/* et_matmul from a thread made with a small stack (musl's default is 128 KiB): the AVX-512 kernels' frames (up to
 * ~190 KiB) overflowed it; the pool's workers now run every share of such a caller. Same bytes as on this thread. */
typedef struct {
    const problem *p;
    float *y;
    int nth, st;
} small_stack_job;

static void *small_stack_run(void *arg) {
    small_stack_job *j = (small_stack_job *)arg;
    j->st = run_matmul(j->p, j->y, j->nth);
    return NULL;
}

/* the pool's wake-up: jobs that arrive while the workers spin, yield or sleep (idle gaps of 0 to ~3 ms around the
 * spin-then-sleep switch, where a worker going to sleep can miss one job) each run every share exactly once, from a
 * normal caller and from one that runs no share (which waits for the workers: a missed wake-up would hang it) */
typedef struct {
    atomic_int runs[4];
} wake_job;

static void wake_task(void *arg, int ith, int nth) {
    (void)nth;
    atomic_fetch_add(&((wake_job *)arg)->runs[ith], 1);
}

/* rounds jobs, after idle gaps of 0 .. 2.7 ms (gaps: 1) or back to back (gaps: 0, workers still on their way in
 * from the last job when the next is published) */
static int wake_rounds(int rounds, int gaps) {
    int bad = 0;
    for (int r = 0; r < rounds; r++) {
        const struct timespec gap = {0, (long)(r % 7) * 450000L}; /* 0 .. 2.7 ms */
        if (gaps) nanosleep(&gap, NULL);
        wake_job j;
        for (int i = 0; i < 4; i++) atomic_init(&j.runs[i], 0);
        const int nth = 2 + r % 3;
        bad += et_parallel(wake_task, &j, nth) != ET_OK;
        for (int i = 0; i < nth; i++) bad += atomic_load(&j.runs[i]) != 1;
    }
    return bad;
}

static void *wake_rounds_thread(void *arg) {
    *(int *)arg = wake_rounds(150, 1);
    return NULL;
}

static int pool_only; /* --pool: only the tests that run work on the thread pool (the ThreadSanitizer build) */

static void test_pool_wake_up(void) {
    check(et_set_threads(4) == ET_OK, "pool of 4");
    check(wake_rounds(300, 1) == 0, "thread pool: 300 jobs after idle gaps of 0-2.7 ms, every share run once");
    const int burst = pool_only ? 30000 : 3000; /* the ThreadSanitizer build: more chances to catch a worker mid-way */
    check(wake_rounds(burst, 0) == 0, "thread pool: %d jobs back to back, every share run once", burst);
    pthread_t th;
    pthread_attr_t attr;
    int bad = -1;
    int made = pthread_attr_init(&attr) == 0 && pthread_attr_setstacksize(&attr, 160u << 10) == 0 &&
               pthread_create(&th, &attr, wake_rounds_thread, &bad) == 0;
    if (made) pthread_join(th, NULL);
    pthread_attr_destroy(&attr);
    check(made && bad == 0, "thread pool: 150 jobs from a 160 KiB caller (it runs no share) after idle gaps");
    check(et_set_threads(2) == ET_OK, "pool back to 2");
}

static void test_small_stack_caller(void) {
    static const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0, ET_TYPE_F16};
    char isas[8][16];
    const int n_isas = isa_list(isas, 8);
    for (int v = 0; v < n_isas; v++) {
        et_isa_select(isas[v]);
        for (size_t t = 0; t < sizeof types / sizeof *types; t++)
            for (int64_t m = 1; m <= 64; m += 63)
                for (int nth = 1; nth <= 2; nth++) {
                    problem p = {.m = m, .n = 40, .k = 256, .type = types[t]};
                    p.w = make_weights(p.type, p.n, p.k);
                    p.x = make_activations(m, p.k);
                    float *y = alloc_output((size_t)(m * p.n)), *ys = alloc_output((size_t)(m * p.n));
                    small_stack_job j = {&p, ys, nth, -1};
                    pthread_attr_t attr;
                    pthread_t th;
                    int made = pthread_attr_init(&attr) == 0 && pthread_attr_setstacksize(&attr, 160u << 10) == 0 &&
                               pthread_create(&th, &attr, small_stack_run, &j) == 0;
                    if (made) pthread_join(th, NULL);
                    pthread_attr_destroy(&attr);
                    check(made && j.st == ET_OK && run_matmul(&p, y, nth) == ET_OK &&
                              memcmp(y, ys, (size_t)(m * p.n) * sizeof(float)) == 0,
                          "%s %s m=%lld threads=%d from a 160 KiB thread: same bytes as from the main thread",
                          isas[v], type_name(p.type), (long long)m, nth);
                    free(y), free(ys), free(p.w), free(p.x);
                }
    }
    et_isa_select(NULL);
}

int main(int argc, char **argv) {
    const char *expect_isa = NULL, *expect_features = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--expect-isa") && i + 1 < argc) expect_isa = argv[++i];
        else if (!strcmp(argv[i], "--expect-features") && i + 1 < argc) expect_features = argv[++i];
        else if (!strcmp(argv[i], "--pool")) pool_only = 1;
        else {
            fprintf(stderr, "usage: %s [--expect-isa LIST] [--expect-features LIST] [--pool]\n", argv[0]);
            return 2;
        }
    }
    printf("edgert %s: ISA variants %s; CPU features %s\n", et_version(), et_isa_available(), et_cpu_features());
    if (expect_isa)
        check(!strcmp(et_isa_available(), expect_isa), "ISA variants are '%s', expected '%s'", et_isa_available(),
              expect_isa);
    if (expect_features)
        check(!strcmp(et_cpu_features(), expect_features), "CPU features are '%s', expected '%s'", et_cpu_features(),
              expect_features);

#if defined(__aarch64__)
    /* both NEON tables answer to "neon": make sure the one cpu.c picked matches the CPU's dot-product support */
    const int dotprod = strstr(et_cpu_features(), "asimddp") != NULL;
    check(et_isa_select("neon") == ET_OK && et_active_kernels() == (dotprod ? &et_kernels_neon_dotprod : &et_kernels_neon),
          "\"neon\" selects the %s table", dotprod ? "SDOT" : "plain NEON");
#endif
    check(et_set_threads(2) == ET_OK && et_get_threads() == 2, "thread pool of 2");
    if (pool_only) {
        test_small_stack_caller();
        test_pool_wake_up();
        et_set_threads(1);
        printf("%d passed, %d failed\n", n_passed, n_failed);
        return n_failed ? 1 : 0;
    }
    test_fp16();
    test_quantize_q8_s();
    test_quantize_q8_s_isas();
    test_quant_roundtrip();
    test_errors();
    test_strided_kernels();
    test_gemv_t_f16();
    test_softmax();
    test_matmul_ex();
    test_matmul_sweep();
    test_batch_invariance();
    test_x16();
    test_small_stack_caller();
    test_pool_wake_up();
    test_llama();
    test_fc_s8();
    et_set_threads(1);

    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
