/* fc_s8/fc_s8.c — public entry points of the INT8 fully-connected kernels: pack once, run many; the variant follows
 * the selected ISA (avx512 with VNNI -> vpdpbusd, anything else -> the reference). Output channels split over the
 * thread pool in whole 16-channel tiles. */
#include <stdlib.h>
#include <string.h>

#include "../core.h"
#include "fc_s8.h"

#define FC_ALIGN 64

static int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

size_t et_fc_s8_packed_size(int64_t n, int64_t k) {
    if (n <= 0 || k <= 0) return 0;
    return (size_t)(round_up(n, 16) * round_up(k, 4) + round_up(n * 4, FC_ALIGN));
}

size_t et_fc_s8_scratch_size(int64_t m, int64_t k, int64_t n) {
    if (m <= 0 || k <= 0 || n <= 0) return 0;
    return (size_t)(round_up(m * round_up(k, 4), FC_ALIGN) + n * 4);
}

int et_fc_s8_pack(const int8_t *w, int64_t n, int64_t k, void *packed) {
    if (!w || !packed || n <= 0 || k <= 0) return et_error(ET_ERR_INVALID, "fc_s8_pack: need w, packed, n > 0, k > 0");
    if ((uintptr_t)packed % FC_ALIGN) return et_error(ET_ERR_INVALID, "fc_s8_pack: packed must be 64-byte aligned");
    const int64_t kp = round_up(k, 4), np = round_up(n, 16);
    int8_t *p = (int8_t *)packed;
    memset(p, 0, (size_t)(np * kp));
    int32_t *wsum = (int32_t *)(p + np * kp);
    for (int64_t j = 0; j < n; j++) {
        int32_t s = 0;
        for (int64_t kk = 0; kk < k; kk++) {
            p[(j / 16) * kp * 16 + (kk / 4) * 64 + (j % 16) * 4 + kk % 4] = w[j * k + kk];
            s += w[j * k + kk];
        }
        wsum[j] = s;
    }
    return ET_OK;
}

typedef struct {
    et_fc_s8_fn fn;
    const et_fc_s8_args *a;
} fc_task;

static void fc_run(void *ctx, int ith, int nth) {
    const fc_task *t = (const fc_task *)ctx;
    const int64_t tiles = (t->a->n + 15) / 16;
    const int64_t t0 = tiles * ith / nth, t1 = tiles * (ith + 1) / nth;
    int64_t j0 = t0 * 16, j1 = t1 * 16 < t->a->n ? t1 * 16 : t->a->n;
    if (j0 < j1) t->fn(t->a, j0, j1);
}

int et_fc_s8(const int8_t *x, int64_t m, int64_t k, const void *packed, int64_t n, const int32_t *bias,
             int32_t x_zp, const float *scale, int32_t y_zp, int32_t lo, int32_t hi, int8_t *y, void *scratch,
             int nthreads) {
    if (!x || !packed || !scale || !y || !scratch || m <= 0 || k <= 0 || n <= 0)
        return et_error(ET_ERR_INVALID, "fc_s8: need x, packed, scale, y, scratch and m, k, n > 0");
    if (x_zp < -128 || x_zp > 127 || y_zp < -128 || y_zp > 127 || lo < -128 || hi > 127 || lo > hi)
        return et_error(ET_ERR_INVALID, "fc_s8: zero points and clamp range must lie in int8 (x_zp %d, y_zp %d, "
                        "[%d, %d])", x_zp, y_zp, lo, hi);
    if ((uintptr_t)packed % FC_ALIGN || (uintptr_t)scratch % FC_ALIGN)
        return et_error(ET_ERR_INVALID, "fc_s8: packed weights and scratch must be 64-byte aligned");
    const int64_t kp = round_up(k, 4), np = round_up(n, 16);
    uint8_t *xu = (uint8_t *)scratch;
    int32_t *rowc = (int32_t *)(xu + round_up(m * kp, FC_ALIGN));
    for (int64_t i = 0; i < m; i++) {
        for (int64_t kk = 0; kk < k; kk++) xu[i * kp + kk] = (uint8_t)(x[i * k + kk] ^ 0x80);
        for (int64_t kk = k; kk < kp; kk++) xu[i * kp + kk] = 0;
    }
    const int32_t *wsum = (const int32_t *)((const int8_t *)packed + np * kp);
    for (int64_t j = 0; j < n; j++) rowc[j] = (bias ? bias[j] : 0) - (128 + x_zp) * wsum[j];
    et_fc_s8_args a = {xu, m, k, kp, n, (const int8_t *)packed, rowc, scale, y_zp, lo, hi, y};
    const char *isa = et_isa_current();
    static int vnni = -1;
    if (vnni < 0) vnni = strstr(et_cpu_features(), "avx512vnni") != NULL;
    fc_task t = {(!strcmp(isa, "avx512") && vnni) ? et_fc_s8_avx512vnni : et_fc_s8_ref, &a};
    const int64_t tiles = np / 16;
    int nth = nthreads > 0 ? nthreads : et_get_threads();
    if (nth > tiles) nth = (int)tiles;
    if (nth < 1) nth = 1;
    if ((double)m * (double)n * (double)k < 65536.0) nth = 1;  /* not worth waking the pool */
    return nth == 1 ? (fc_run(&t, 0, 1), ET_OK) : et_parallel(fc_run, &t, nth);
}
