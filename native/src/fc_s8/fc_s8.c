/* fc_s8/fc_s8.c — public entry points of the INT8 fully-connected kernels: plan once (weights packed, the per-channel
 * corrections folded into the bias, scales and clamp range stored), run many. The kernel follows the selected ISA:
 * avx512 with VNNI -> AMX-INT8 for 2+ rows when the CPU has it, else vpdpbusd; avx512 without VNNI and avx2 -> the
 * AVX2 kernel; neon -> SDOT or widening multiplies; ref -> the scalar reference. Work splits over the thread pool in
 * whole 16-channel tiles (rows when there are fewer tiles than threads, or for AMX on small weights), only above
 * ET_FC_S8_MT_MACS. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../core.h"
#include "fc_s8.h"

#define FC_ALIGN 64
/* below this many multiply-adds a call stays on the calling thread: waking the pool costs a few microseconds */
#define ET_FC_S8_MT_MACS (1 << 20)
/* AMX pays from this many rows on (one row: the VNNI kernel streams the weights as fast) */
#define ET_FC_S8_AMX_MIN_ROWS 2
/* The AMX kernel copies the rows it takes into an aligned panel, so over channels every thread copies every row.
 * Weights up to this size stay in each core's L2 after the first call: there, with 32+ rows per thread, the rows are
 * split instead (each thread copies only its own; 64x1536x576 at 2 threads: -10%). Larger weights stream from L3
 * or memory, and every thread reading all of them costs more (64x4096x4096: +25%). */
#define ET_FC_S8_AMX_ROWS_WEIGHTS (1 << 20)

static int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

static int64_t w_offset(int64_t np) { return round_up((int64_t)sizeof(et_fc_s8_header) + np * 16, FC_ALIGN); }

size_t et_fc_s8_plan_size(int64_t n, int64_t k) {
    if (n <= 0 || k <= 0 || n > ((int64_t)1 << 40) / (k + 4) || k > ((int64_t)1 << 31)) return 0;
    const int64_t np = round_up(n, 16), kp = round_up(k, 4);
    return (size_t)(w_offset(np) + np * kp + ET_FC_S8_SLACK);
}

int et_fc_s8_plan(const int8_t *w, int64_t n, int64_t k, const int32_t *bias, int32_t x_zp, const float *scale,
                  int32_t y_zp, int32_t lo, int32_t hi, void *plan, size_t plan_size) {
    if (!w || !scale || !plan || n <= 0 || k <= 0)
        return et_error(ET_ERR_INVALID, "fc_s8_plan: need w, scale, plan and n, k > 0 (n %lld, k %lld)", (long long)n,
                        (long long)k);
    const size_t need = et_fc_s8_plan_size(n, k);
    if (!need) return et_error(ET_ERR_INVALID, "fc_s8_plan: n %lld x k %lld is too large", (long long)n, (long long)k);
    if (plan_size < need)
        return et_error(ET_ERR_INVALID, "fc_s8_plan: plan holds %zu bytes, (n %lld, k %lld) needs %zu", plan_size,
                        (long long)n, (long long)k, need);
    if ((uintptr_t)plan % FC_ALIGN) return et_error(ET_ERR_INVALID, "fc_s8_plan: plan must be 64-byte aligned");
    if (x_zp < -128 || x_zp > 127 || y_zp < -128 || y_zp > 127 || lo < -128 || hi > 127 || lo > hi)
        return et_error(ET_ERR_INVALID, "fc_s8_plan: zero points and clamp range must lie in int8 (x_zp %d, y_zp %d, "
                        "[%d, %d])", x_zp, y_zp, lo, hi);
    for (int64_t j = 0; j < n; j++)
        if (!(scale[j] >= 0.0f) || !isfinite(scale[j]))
            return et_error(ET_ERR_INVALID, "fc_s8_plan: scale[%lld] = %g, expected a finite value >= 0", (long long)j,
                            (double)scale[j]);
    const int64_t np = round_up(n, 16), kp = round_up(k, 4);
    uint8_t *base = (uint8_t *)plan;
    memset(base, 0, need);
    et_fc_s8_header *h = (et_fc_s8_header *)plan;
    *h = (et_fc_s8_header){ET_FC_S8_MAGIC, x_zp, y_zp, lo, hi, 0, n, k, kp, np, w_offset(np)};
    for (int64_t i = 0; i < n * k && !h->w_m128; i++) h->w_m128 = w[i] == -128;
    int32_t *rowc_s = (int32_t *)(base + sizeof *h), *rowc_u = rowc_s + np;
    float *sc = (float *)(rowc_u + np);
    int32_t *wsum = (int32_t *)(sc + np);
    int8_t *p = (int8_t *)(base + h->w_off);
    for (int64_t j = 0; j < n; j++) {
        uint32_t s = 0;
        int8_t *tile = p + (j / 16) * kp * 16 + (j % 16) * 4;
        for (int64_t kk = 0; kk < k; kk++) {
            const int8_t v = w[j * k + kk];
            tile[(kk / 4) * 64 + kk % 4] = v;
            s += (uint32_t)(int32_t)v;
        }
        /* wrapping int32 arithmetic, written in uint32 */
        const uint32_t rs = (uint32_t)(bias ? bias[j] : 0) - (uint32_t)x_zp * s;
        rowc_s[j] = (int32_t)rs;
        rowc_u[j] = (int32_t)(rs - 128u * s);
        sc[j] = scale[j];
        wsum[j] = (int32_t)s;
    }
    return ET_OK;
}

/* ---- variants ---- */

static et_fc_s8_variant variants[6];
static int n_variants;
static pthread_once_t variants_once = PTHREAD_ONCE_INIT;

static void variants_init(void) {
    n_variants = 0;
    variants[n_variants++] = (et_fc_s8_variant){"ref", et_fc_s8_ref, 1};
#if defined(__x86_64__) || defined(_M_X64)
    const char *f = et_cpu_features(); /* detected once, in cpu.c */
    variants[n_variants++] = (et_fc_s8_variant){"avx2", et_fc_s8_avx2, strstr(f, "avx2") != NULL};
    variants[n_variants++] = (et_fc_s8_variant){"avx512vnni", et_fc_s8_avx512vnni, strstr(f, "avx512vnni") != NULL};
    variants[n_variants++] = (et_fc_s8_variant){"amx", et_fc_s8_amx, et_cpu_amx_int8()};
#elif defined(__aarch64__)
    variants[n_variants++] = (et_fc_s8_variant){"neon", et_fc_s8_neon, 1};
    variants[n_variants++] =
        (et_fc_s8_variant){"neon_dotprod", et_fc_s8_neon_dotprod, strstr(et_cpu_features(), "asimddp") != NULL};
#endif
}

const et_fc_s8_variant *et_fc_s8_variants(int *count) {
    pthread_once(&variants_once, variants_init);
    if (count) *count = n_variants;
    return variants;
}

/* the kernel for the active ISA and m rows */
static et_fc_s8_fn pick(int64_t m) {
    const et_kernels *kt = et_active_kernels();
    et_fc_s8_variants(NULL);
#if defined(__x86_64__) || defined(_M_X64)
    if (kt == &et_kernels_avx512vnni)
        return m >= ET_FC_S8_AMX_MIN_ROWS && variants[3].available ? et_fc_s8_amx : et_fc_s8_avx512vnni;
    if (kt == &et_kernels_avx512 || kt == &et_kernels_avx2) return et_fc_s8_avx2;
#elif defined(__aarch64__)
    if (kt == &et_kernels_neon_dotprod) return et_fc_s8_neon_dotprod;
    if (kt == &et_kernels_neon) return et_fc_s8_neon;
#else
    (void)kt;
#endif
    (void)m;
    return et_fc_s8_ref;
}

typedef struct {
    et_fc_s8_fn fn;
    const et_fc_s8_args *a;
    int by_rows;
} fc_task;

static void fc_run(void *ctx, int ith, int nth) {
    const fc_task *t = (const fc_task *)ctx;
    const et_fc_s8_args *a = t->a;
    if (t->by_rows) {
        const int64_t i0 = a->m * ith / nth, i1 = a->m * (ith + 1) / nth;
        if (i0 < i1) t->fn(a, i0, i1, 0, a->n);
        return;
    }
    const int64_t tiles = (a->n + 15) / 16;
    const int64_t t0 = tiles * ith / nth, t1 = tiles * (ith + 1) / nth;
    const int64_t j0 = t0 * 16, j1 = t1 * 16 < a->n ? t1 * 16 : a->n;
    if (j0 < j1) t->fn(a, 0, a->m, j0, j1);
}

/* args a over the pool: whole 16-channel tiles per thread (rows when there are fewer tiles than threads) */
static int run_args(const et_fc_s8_header *h, const et_fc_s8_args *a, int nthreads, et_fc_s8_fn fn) {
    const int64_t m = a->m;
    fc_task t = {fn ? fn : pick(m), a, 0};
    const int64_t tiles = h->np / 16;
    int nth = nthreads > 0 ? nthreads : et_get_threads();
    if ((double)m * (double)h->n * (double)h->k < (double)ET_FC_S8_MT_MACS) nth = 1;
    if (nth > 1 && tiles < nth) t.by_rows = 1; /* few channels: split the rows */
#if defined(__x86_64__) || defined(_M_X64)
    if (nth > 1 && t.fn == et_fc_s8_amx && m >= 32 * (int64_t)nth && h->np * h->kp <= ET_FC_S8_AMX_ROWS_WEIGHTS)
        t.by_rows = 1;
#endif
    if (nth > (t.by_rows ? m : tiles)) nth = (int)(t.by_rows ? m : tiles);
    return et_parallel(fc_run, &t, nth < 1 ? 1 : nth); /* 1: runs here, unless this thread's stack is small */
}

static const et_fc_s8_header *checked_plan(const void *plan, const char *what) {
    const et_fc_s8_header *h = (const et_fc_s8_header *)plan;
    if ((uintptr_t)plan % FC_ALIGN || h->magic != ET_FC_S8_MAGIC) {
        et_error(ET_ERR_INVALID, "%s: plan is not a 64-byte aligned buffer written by et_fc_s8_plan", what);
        return NULL;
    }
    return h;
}

int et_fc_s8_run_with(const void *plan, const int8_t *x, int64_t m, int8_t *y, int nthreads, et_fc_s8_fn fn) {
    if (!plan || !x || !y || m <= 0)
        return et_error(ET_ERR_INVALID, "fc_s8_run: need plan, x, y and m > 0 (m %lld)", (long long)m);
    const et_fc_s8_header *h = checked_plan(plan, "fc_s8_run");
    if (!h) return ET_ERR_INVALID;
    const uint8_t *base = (const uint8_t *)plan;
    const int32_t *rowc_s = (const int32_t *)(base + sizeof *h);
    et_fc_s8_args a = {x, m, h->k, h->kp, h->n, (const int8_t *)(base + h->w_off), rowc_s, rowc_s + h->np,
                       (const float *)(rowc_s + 2 * h->np), (float)(h->lo - h->y_zp), (float)(h->hi - h->y_zp),
                       h->y_zp, y, NULL, h->w_m128};
    return run_args(h, &a, nthreads, fn);
}

int et_fc_s8_run(const void *plan, const int8_t *x, int64_t m, int8_t *y, int nthreads) {
    return et_fc_s8_run_with(plan, x, m, y, nthreads, NULL);
}

/* the DynamicQuantizeLinear passes for the active ISA */
static const et_fc_s8_quantizer *quantizer(void) {
#if defined(__x86_64__) || defined(_M_X64)
    const et_kernels *kt = et_active_kernels();
    if (kt == &et_kernels_avx512vnni && et_cpu_avx512dq()) return &et_fc_s8_quantizer_avx512;
    if (kt == &et_kernels_avx512vnni || kt == &et_kernels_avx512 || kt == &et_kernels_avx2)
        return &et_fc_s8_quantizer_avx2;
#endif
    return &et_fc_s8_quantizer_ref;
}

/* from this many activations on, both quantization passes run on the pool (below it waking the pool costs more) */
#define ET_FC_S8_DYNQ_MT (1 << 14)
#define DYNQ_MAX_SLICES 64

typedef struct {
    const et_fc_s8_quantizer *qz;
    const float *x;
    int64_t count;
    int8_t *q;
    int codes; /* 0: the range pass, 1: the codes pass */
    float scale;
    int32_t zp;
    float mn[DYNQ_MAX_SLICES], mx[DYNQ_MAX_SLICES];
    int bad[DYNQ_MAX_SLICES];
} dynq_task;

static void dynq_run(void *ctx, int ith, int nth) {
    dynq_task *t = (dynq_task *)ctx;
    const int64_t i0 = t->count * ith / nth / 64 * 64; /* whole 64-value chunks; the last slice takes the rest */
    const int64_t i1 = ith + 1 == nth ? t->count : t->count * (ith + 1) / nth / 64 * 64;
    if (t->codes) {
        if (i0 < i1) t->qz->codes(t->x + i0, i1 - i0, t->scale, t->zp, t->q + i0);
        return;
    }
    t->mn[ith] = t->mx[ith] = 0.0f;
    t->bad[ith] = i0 < i1 ? t->qz->range(t->x + i0, i1 - i0, &t->mn[ith], &t->mx[ith]) : 0;
}

/* DynamicQuantizeLinear of x[count] into q, on up to nthreads threads (slices of x: min and max combine exactly,
 * each code depends on its own value); -1 for a NaN or an infinity */
static int quantize_dyn(const float *x, int64_t count, int8_t *q, float *scale, int32_t *zp, int nthreads) {
    dynq_task t;
    t.qz = quantizer(), t.x = x, t.count = count, t.q = q, t.codes = 0;
    int nth = nthreads > 0 ? nthreads : et_get_threads();
    if (count < ET_FC_S8_DYNQ_MT) nth = 1;
    if (nth > DYNQ_MAX_SLICES) nth = DYNQ_MAX_SLICES;
    if (nth <= 1) return et_fc_s8_quantize_dyn(t.qz, x, count, q, scale, zp);
    int st = et_parallel(dynq_run, &t, nth);
    if (st != ET_OK) return st;
    float mn = 0.0f, mx = 0.0f;
    for (int i = 0; i < nth; i++) {
        if (t.bad[i]) return -1;
        mn = t.mn[i] < mn ? t.mn[i] : mn, mx = t.mx[i] > mx ? t.mx[i] : mx;
    }
    et_fc_s8_dyn_params(mn, mx, scale, zp);
    t.scale = *scale, t.zp = *zp, t.codes = 1;
    return et_parallel(dynq_run, &t, nth);
}

size_t et_fc_s8_dyn_scratch_size(const void *plan, int64_t m) {
    const et_fc_s8_header *h = (const et_fc_s8_header *)plan;
    if (!plan || (uintptr_t)plan % FC_ALIGN || h->magic != ET_FC_S8_MAGIC || m <= 0 || m > INT64_MAX / h->k / 4)
        return 0;
    return (size_t)(round_up(m * h->k, FC_ALIGN) + h->np * 12);
}

/* et_fc_s8_dyn on caller scratch (NULL: allocated for the call) with a given kernel (NULL: the ISA's) */
static int dyn_run(const void *plan, const float *x, int64_t m, float *y, void *scratch, size_t scratch_size,
                   int nthreads, et_fc_s8_fn fn) {
    if (!plan || !x || !y || m <= 0)
        return et_error(ET_ERR_INVALID, "fc_s8_dyn: need plan, x, y and m > 0 (m %lld)", (long long)m);
    const et_fc_s8_header *h = checked_plan(plan, "fc_s8_dyn");
    if (!h) return ET_ERR_INVALID;
    const size_t need = et_fc_s8_dyn_scratch_size(plan, m);
    if (!need) return et_error(ET_ERR_INVALID, "fc_s8_dyn: m %lld x k %lld is too large", (long long)m, (long long)h->k);
    if (scratch && (scratch_size < need || (uintptr_t)scratch % FC_ALIGN))
        return et_error(ET_ERR_INVALID, "fc_s8_dyn: scratch of %zu bytes (64-byte aligned) needed, got %zu", need,
                        scratch_size);
    const int64_t np = h->np, count = m * h->k;
    /* the int8 codes of x, then per-call row constants and scales (np each); a scratch of the caller's avoids an
     * allocation per call (a freed 100 KiB block is handed back to the OS and faulted in again next call) */
    uint8_t *buf = scratch ? (uint8_t *)scratch : (uint8_t *)aligned_alloc(FC_ALIGN, round_up((int64_t)need, FC_ALIGN));
    if (!buf) return et_error(ET_ERR_NOMEM, "fc_s8_dyn: out of memory for %lld activations", (long long)count);
    int8_t *q = (int8_t *)buf;
    int32_t *rs = (int32_t *)(buf + round_up(count, FC_ALIGN)), *ru = rs + np;
    float *sc = (float *)(ru + np);
    float x_scale;
    int32_t x_zp;
    const int qs = quantize_dyn(x, count, q, &x_scale, &x_zp, nthreads);
    if (qs) {
        if (!scratch) free(buf);
        /* a NaN or an infinity has no quantized value; y stays as it was, for the caller to compute elsewhere */
        return qs == -1 ? et_error(ET_ERR_NONFINITE, "fc_s8_dyn: activations must be finite: x holds NaN or Inf") : qs;
    }
    const uint8_t *base = (const uint8_t *)plan;
    const int32_t *prs = (const int32_t *)(base + sizeof *h);
    const float *psc = (const float *)(prs + 2 * np);
    const int32_t *wsum = (const int32_t *)(psc + np);
    /* the codes are u8 - 128, so x - x_zp = q - (x_zp - 128): re-fold that zero point in place of the plan's */
    const uint32_t dz = (uint32_t)(x_zp - 128) - (uint32_t)h->x_zp;
    for (int64_t j = 0; j < np; j++) {
        const uint32_t r = (uint32_t)prs[j] - dz * (uint32_t)wsum[j]; /* wrapping int32 arithmetic */
        rs[j] = (int32_t)r;
        ru[j] = (int32_t)(r - 128u * (uint32_t)wsum[j]);
        sc[j] = x_scale * psc[j];
    }
    et_fc_s8_args a = {(const int8_t *)q, m, h->k, h->kp, h->n, (const int8_t *)(base + h->w_off), rs, ru, sc,
                       0.0f, 0.0f, 0, NULL, y, h->w_m128};
    const int st = run_args(h, &a, nthreads, fn);
    if (!scratch) free(buf);
    return st;
}

int et_fc_s8_dyn_with(const void *plan, const float *x, int64_t m, float *y, int nthreads, et_fc_s8_fn fn) {
    return dyn_run(plan, x, m, y, NULL, 0, nthreads, fn);
}

int et_fc_s8_dyn(const void *plan, const float *x, int64_t m, float *y, int nthreads) {
    return dyn_run(plan, x, m, y, NULL, 0, nthreads, NULL);
}

int et_fc_s8_dyn_ex(const void *plan, const float *x, int64_t m, float *y, void *scratch, size_t scratch_size,
                    int nthreads) {
    if (!scratch) return et_error(ET_ERR_INVALID, "fc_s8_dyn_ex: need scratch (et_fc_s8_dyn_scratch_size bytes)");
    return dyn_run(plan, x, m, y, scratch, scratch_size, nthreads, NULL);
}
