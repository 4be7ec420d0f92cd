/* matmul/matmul.c — et_matmul: checks, activation quantization, and work splitting over the thread pool.
 * The arithmetic lives in the per-ISA kernel tables; this file is ISA-independent.
 */
#include <stdatomic.h>
#include <string.h>

#include "../core.h"

#define ET_MIN_PARALLEL_MACS 32768.0 /* below this a thread-pool dispatch costs more than it saves */
#define ET_GEMM_MIN_ROWS 768 /* weight rows per GEMM chunk before a thread takes more than one (measured, M=64) */
#define ET_ROW_TILE 16 /* chunks of weight rows are multiples of this: every kernel's row tile divides it, and an
                        * x16 chunk starts on a tile */

typedef struct {
    et_gemm_fn fn;
    int64_t k, n, m;
    const uint8_t *w;
    size_t ws;
    const void *x;
    size_t xs;
    float *y;
    size_t ldy;
    int64_t chunk;
    int nth;           /* shares planned: share i runs chunk i */
    atomic_llong next; /* next unclaimed weight row past the first nth chunks */
} matmul_job;

static void matmul_rows(const matmul_job *job, int64_t r0) {
    const int64_t rows = job->n - r0 < job->chunk ? job->n - r0 : job->chunk;
    job->fn(job->k, job->w + (size_t)r0 * job->ws, job->ws, rows, job->x, job->xs, job->m, job->y + r0, job->ldy);
}

static void matmul_task(void *arg, int ith, int nth) {
    matmul_job *job = arg;
    /* share ith runs chunk ith (no shared counter to bounce between cores for a GEMV's one chunk per thread), and
     * ith + nth, ... when the pool ran fewer shares than planned; chunks past the planned count are claimed by
     * whoever is free */
    for (int64_t c = ith; c < job->nth && c * job->chunk < job->n; c += nth) matmul_rows(job, c * job->chunk);
    while ((int64_t)job->nth * job->chunk < job->n) { /* more chunks than shares */
        const int64_t r0 = atomic_fetch_add(&job->next, job->chunk);
        if (r0 >= job->n) break;
        matmul_rows(job, r0);
    }
}

typedef struct {
    et_quantize_row_fn fn;
    const float *x;
    int64_t m, kx, k;
    size_t ldx;
    uint8_t *y;
    size_t ys;
    atomic_llong bad; /* first row holding NaN or Inf; m when none */
} quantize_job;

/* one row: whole blocks straight from x, a partial last block through a zero-padded copy, zero blocks after it */
static int quantize_row_padded(const quantize_job *job, const float *x, block_q8_s *y) {
    const int64_t full = job->kx / ET_QK * ET_QK;
    if (full && job->fn(x, y, full)) return -1;
    int64_t b = full / ET_QK;
    if (full < job->kx) {
        float tail[ET_QK] = {0};
        memcpy(tail, x + full, (size_t)(job->kx - full) * sizeof(float));
        if (job->fn(tail, y + b, ET_QK)) return -1;
        b++;
    }
    if (b < job->k / ET_QK) memset(y + b, 0, (size_t)(job->k / ET_QK - b) * sizeof(block_q8_s));
    return 0;
}

static void quantize_task(void *arg, int ith, int nth) {
    quantize_job *job = arg;
    const int64_t lo = job->m * ith / nth, hi = job->m * (ith + 1) / nth;
    for (int64_t i = lo; i < hi; i++) {
        const float *xi = job->x + (size_t)i * job->ldx;
        block_q8_s *yi = (block_q8_s *)(job->y + (size_t)i * job->ys);
        if (job->kx == job->k ? job->fn(xi, yi, job->k) : quantize_row_padded(job, xi, yi)) {
            long long seen = atomic_load(&job->bad);
            while (i < seen && !atomic_compare_exchange_weak(&job->bad, &seen, i)) {
            }
            return;
        }
    }
}

int64_t et_quantize_rows_q8_s_ex(const float *x, int64_t m, int64_t kx, size_t ldx, int64_t k, block_q8_s *y,
                                 int nthreads) {
    const et_kernels *kt = et_active_kernels();
    quantize_job qj = {.fn = kt->quantize_row_q8_s ? kt->quantize_row_q8_s : et_quantize_row_q8_s,
                       .x = x, .m = m, .kx = kx, .k = k, .ldx = ldx, .y = (uint8_t *)y,
                       .ys = (size_t)(k / ET_QK) * sizeof(block_q8_s)};
    atomic_init(&qj.bad, m);
    /* a GEMM's activations are worth a dispatch of their own: quantizing 64 rows alone costs a third of it */
    int qth = nthreads > 0 ? nthreads : et_get_threads();
    if (qth > m) qth = (int)m;
    if ((double)m * (double)k < ET_MIN_PARALLEL_MACS) qth = 1;
    if (et_parallel(quantize_task, &qj, qth) != ET_OK) quantize_task(&qj, 0, 1); /* no threads: do it here */
    const long long bad = atomic_load(&qj.bad);
    return bad < m ? bad : -1;
}

int64_t et_quantize_rows_q8_s(const float *x, int64_t m, int64_t k, block_q8_s *y, int nthreads) {
    return et_quantize_rows_q8_s_ex(x, m, k, (size_t)k, k, y, nthreads);
}

size_t et_matmul_scratch_size(int wtype, int64_t m, int64_t k) {
    if (!et_is_block_type(wtype) || m <= 0 || k <= 0 || k % ET_QK) return 0;
    const size_t row = (size_t)(k / ET_QK) * sizeof(block_q8_s);
    return (size_t)m > SIZE_MAX / row ? 0 : (size_t)m * row; /* 0 for a block type: more than an address space */
}

static et_gemm_fn pick(const et_kernels *kt, int t) {
    /* a table without its own x16 kernels runs the layout on the reference's (et_repack_native says so) */
    const et_kernels *kx = et_has_x16(kt) ? kt : &et_kernels_ref;
    switch (t) {
    case ET_TYPE_Q4_0: return kt->gemm_q4_0;
    case ET_TYPE_Q4_1: return kt->gemm_q4_1;
    case ET_TYPE_Q8_0: return kt->gemm_q8_0;
    case ET_TYPE_F16: return kt->gemm_f16;
    case ET_TYPE_F32: return kt->gemm_f32;
    case ET_TYPE_Q4_0_X16: return kx->gemm_q4_0_x16;
    case ET_TYPE_Q4_1_X16: return kx->gemm_q4_1_x16;
    case ET_TYPE_Q8_0_X16: return kx->gemm_q8_0_x16;
    default: return NULL;
    }
}

int et_matmul_ex(const float *x, int64_t m, int64_t kx, size_t ldx, int wtype, const void *w, int64_t n, int64_t k,
                 float *y, size_t ldy, void *scratch, size_t scratch_size, int nthreads) {
    if (m <= 0 || n <= 0 || k <= 0)
        return et_error(ET_ERR_INVALID, "matmul shape m=%lld n=%lld k=%lld must be positive", (long long)m,
                        (long long)n, (long long)k);
    if (kx <= 0 || kx > k || ldx < (size_t)kx || ldy < (size_t)n)
        return et_error(ET_ERR_INVALID, "matmul rows: kx=%lld must be in [1, k=%lld], ldx=%zu >= kx, ldy=%zu >= n=%lld",
                        (long long)kx, (long long)k, ldx, ldy, (long long)n);
    if (!x || !w || !y) return et_error(ET_ERR_INVALID, "matmul got a NULL buffer");
    const size_t ws = et_row_size(wtype, k);
    if (ws == 0)
        return et_error(ET_ERR_INVALID, "weight type %d cannot hold rows of k=%lld (block formats need k %% 32 == 0)",
                        wtype, (long long)k);
    const et_kernels *kt = et_active_kernels();
    et_gemm_fn fn = pick(kt, wtype);
    if (!fn) return et_error(ET_ERR_UNSUPPORTED, "no %s kernel for weight type %d", kt->name, wtype);

    const void *xa = x;
    size_t xs = ldx * sizeof(float);
    if (et_is_block_type(wtype)) {
        const size_t need = et_matmul_scratch_size(wtype, m, k);
        if (need == 0)
            return et_error(ET_ERR_INVALID, "matmul of m=%lld rows of k=%lld: the scratch exceeds the address space",
                            (long long)m, (long long)k);
        if (!scratch || scratch_size < need)
            return et_error(ET_ERR_INVALID, "matmul scratch of %zu bytes is too small: need %zu", scratch_size, need);
        xs = (size_t)(k / ET_QK) * sizeof(block_q8_s);
        const int64_t bad = et_quantize_rows_q8_s_ex(x, m, kx, ldx, k, scratch, nthreads);
        if (bad >= 0)
            return et_error(ET_ERR_NONFINITE, "activations must be finite: row %lld holds NaN or Inf", (long long)bad);
        xa = scratch;
    } else if (kx != k) {
        return et_error(ET_ERR_INVALID, "float weights (type %d) need whole rows: kx=%lld != k=%lld", wtype,
                        (long long)kx, (long long)k);
    }

    return et_gemm_prepared(wtype, w, n, k, xa, xs, m, y, ldy, nthreads);
}

int et_matmul(const float *x, int64_t m, int64_t k, int wtype, const void *w, int64_t n, float *y, void *scratch,
              size_t scratch_size, int nthreads) {
    /* a non-positive k or n fails et_matmul_ex's first check, before any stride derived from it is used */
    return et_matmul_ex(x, m, k, (size_t)k, wtype, w, n, k, y, (size_t)n, scratch, scratch_size, nthreads);
}

int et_gemm_prepared(int wtype, const void *w, int64_t n, int64_t k, const void *xa, size_t xs, int64_t m, float *y,
                     size_t ldy, int nthreads) {
    const et_kernels *kt = et_active_kernels();
    et_gemm_fn fn = pick(kt, wtype);
    const size_t ws = et_row_size(wtype, k);
    if (!fn || ws == 0) return et_error(ET_ERR_INVALID, "no kernel for weight type %d with k=%lld", wtype, (long long)k);
    int nth = nthreads > 0 ? nthreads : et_get_threads();
    /* up to four chunks per thread so a slow core does not hold the others back; rows in whole tiles. A GEMM chunk
     * first sets up its activation rows' per-block terms (the AMX path copies their blocks too), a cost that does
     * not shrink with the chunk: chunks keep ET_GEMM_MIN_ROWS weight rows or more (at 576 rows, eight chunks had
     * made the setup half of the work). A GEMV streams its weights from memory and each chunk starts its stream
     * cold: one contiguous range per thread. */
    int64_t per_thread = m == 1 ? 1 : n / nth / ET_GEMM_MIN_ROWS;
    if (per_thread < 1) per_thread = 1;
    if (per_thread > 4) per_thread = 4;
    int64_t chunk = (n + (int64_t)nth * per_thread - 1) / ((int64_t)nth * per_thread);
    chunk = (chunk + ET_ROW_TILE - 1) / ET_ROW_TILE * ET_ROW_TILE;
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    if (nth > n_chunks) nth = (int)n_chunks;
    if ((double)n * (double)k * (double)m < ET_MIN_PARALLEL_MACS) nth = 1;

    matmul_job job = {.fn = fn, .k = k, .n = n, .m = m, .w = w, .ws = ws, .x = xa, .xs = xs, .y = y, .ldy = ldy,
                      .chunk = chunk, .nth = nth};
    atomic_init(&job.next, (int64_t)nth * chunk);
    return et_parallel(matmul_task, &job, nth);
}
