/* test_fc_s8.c — C-level tests of the INT8 fully-connected kernels (src/fc_s8/):
 *   - the reference (et_fc_s8_ref through et_fc_s8_run_with) equals a straightforward int64 computation from the
 *     unpacked weights (round, then clamp: the other order from the kernels'), and is within one step of the same
 *     requantization done in double;
 *   - every variant this CPU runs (et_fc_s8_variants: AVX2, AVX-512 VNNI, AMX / NEON, NEON SDOT) writes the
 *     reference's bytes, on 1 and 2 threads, and nothing past y;
 *   - et_fc_s8_run under every selectable ISA (the dispatcher's pick) writes them too;
 *   - the error returns.
 * Shapes cover k not a multiple of 4, 64 or the vector width, n = 1 and n not a multiple of 16, m = 1 and m across
 * the 4-row, 16-row and 32-row blocks; per-tensor and per-channel scales, zero points and clamp bounds at the int8
 * extremes, bias NULL, scale 0 and scales that saturate, and int32 sums that wrap. */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS under -std=c11 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fc_s8/fc_s8.h"
#include "testutil.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#define FC_CANARY 64 /* bytes past y that no kernel may touch */

typedef struct {
    int64_t m, n, k;
    int8_t *x, *w;
    int32_t *bias; /* NULL or n */
    float *scale;  /* n */
    int32_t x_zp, y_zp, lo, hi;
    void *plan;
} fc_problem;

static int8_t rand_s8(int extreme_pct) {
    const uint64_t r = rng_next();
    if ((int)(r % 100) < extreme_pct) return (r >> 8) & 1 ? 127 : -128;
    return (int8_t)(r >> 16);
}

/* weights in [-127, 127] (TFLite's int8 weights; AVX2's vpmaddubsw kernel) or with -128 in them (its widening
 * kernel): fc_case picks one at random per case, so every sweep runs both */
static int fc_symmetric_w;

static void fc_make(fc_problem *p, int64_t m, int64_t n, int64_t k, int per_channel, int with_bias, int32_t x_zp,
                    int32_t y_zp, int32_t lo, int32_t hi, int extreme_pct) {
    p->m = m, p->n = n, p->k = k, p->x_zp = x_zp, p->y_zp = y_zp, p->lo = lo, p->hi = hi;
    p->x = xmalloc((size_t)(m * k)); /* exactly m * k bytes: a kernel reading past x trips ASan */
    p->w = xmalloc((size_t)(n * k));
    for (int64_t i = 0; i < m * k; i++) p->x[i] = rand_s8(extreme_pct);
    for (int64_t i = 0; i < n * k; i++) p->w[i] = rand_s8(extreme_pct);
    if (n > 2) /* one channel of all -128 weights, one of all zeros */
        for (int64_t c = 0; c < k; c++) p->w[1 * k + c] = -128, p->w[2 * k + c] = 0;
    if (fc_symmetric_w)
        for (int64_t i = 0; i < n * k; i++) p->w[i] = p->w[i] == -128 ? -127 : p->w[i];
    p->bias = NULL;
    if (with_bias) {
        p->bias = xmalloc((size_t)n * sizeof(int32_t));
        for (int64_t j = 0; j < n; j++) p->bias[j] = (int32_t)(rng_next() % 200001) - 100000;
        if (n > 3) p->bias[3] = 1 << 28;
    }
    /* output scale so that acc * scale spreads over a few hundred steps: most outputs in range, some clamped */
    const double typical = 60.0 * sqrt((double)k) * 75.0 + 1.0;
    p->scale = xmalloc((size_t)n * sizeof(float));
    const float s0 = (float)(300.0 / typical);
    for (int64_t j = 0; j < n; j++) p->scale[j] = per_channel ? s0 * (0.25f + 2.0f * rng_uniform()) : s0;
    if (per_channel && n > 4) p->scale[4] = 0.0f;
    if (per_channel && n > 5) p->scale[5] = 1e30f; /* every output of channel 5 saturates (or is 0) */
    const size_t ps = et_fc_s8_plan_size(n, k);
    p->plan = aligned_alloc(64, (ps + 63) / 64 * 64);
    if (!p->plan) exit(2);
    const int st = et_fc_s8_plan(p->w, n, k, p->bias, x_zp, p->scale, y_zp, lo, hi, p->plan, ps);
    if (st != ET_OK) {
        fprintf(stderr, "test_fc_s8: et_fc_s8_plan failed: %s\n", et_last_error());
        exit(2);
    }
}

static void fc_free(fc_problem *p) { free(p->x), free(p->w), free(p->bias), free(p->scale), free(p->plan); }

/* the spec, straight from TFLite's formula on the unpacked weights: int64 sum, wrapped to int32 as the kernels'
 * int32 accumulators do, fp32 product, round half to even, add the zero point, then clamp */
static int8_t spec_output(const fc_problem *p, int64_t i, int64_t j, int64_t *acc_out) {
    int64_t acc = p->bias ? p->bias[j] : 0;
    for (int64_t c = 0; c < p->k; c++) acc += (int64_t)(p->x[i * p->k + c] - p->x_zp) * p->w[j * p->k + c];
    *acc_out = acc;
    const int32_t acc32 = (int32_t)(uint32_t)(uint64_t)acc;
    const float f = (float)acc32 * p->scale[j];
    double r = nearbyint((double)f) + p->y_zp; /* f is exact in double; default rounding: half to even */
    if (r < p->lo) r = p->lo;
    if (r > p->hi) r = p->hi;
    return (int8_t)r;
}

static int8_t *alloc_y(size_t count) {
    int8_t *y = xmalloc(count + FC_CANARY);
    memset(y, 0x5A, count + FC_CANARY);
    return y;
}

static int canary_ok(const int8_t *y, size_t count) {
    for (size_t i = count; i < count + FC_CANARY; i++)
        if (y[i] != 0x5A) return 0;
    return 1;
}

static int run_fn(const fc_problem *p, int8_t *y, int nth, et_fc_s8_fn fn) {
    const int st = et_fc_s8_run_with(p->plan, p->x, p->m, y, nth, fn);
    if (st != ET_OK) printf("  et_fc_s8_run: %s\n", et_last_error());
    return st;
}

static void fc_case(int64_t m, int64_t n, int64_t k, int per_channel, int with_bias, int32_t x_zp, int32_t y_zp,
                    int32_t lo, int32_t hi, int extreme_pct) {
    fc_problem p;
    const int symmetric = (int)(rng_next() & 1); /* not in step with any sweep's period */
    fc_symmetric_w = symmetric;
    fc_make(&p, m, n, k, per_channel, with_bias, x_zp, y_zp, lo, hi, extreme_pct);
    fc_symmetric_w = 0;
    char what[192];
    snprintf(what, sizeof what, "m=%lld n=%lld k=%lld %s%s x_zp=%d y_zp=%d [%d,%d] w %s", (long long)m, (long long)n,
             (long long)k, per_channel ? "per-channel" : "per-tensor", with_bias ? "" : " no-bias", x_zp, y_zp, lo, hi,
             symmetric ? "in [-127, 127]" : "with -128");
    const size_t count = (size_t)(m * n);

    int8_t *yref = alloc_y(count);
    check(run_fn(&p, yref, 1, et_fc_s8_ref) == ET_OK && canary_ok(yref, count), "fc ref %s ran", what);
    int64_t bad = -1, bad_double = -1, acc;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            const int8_t want = spec_output(&p, i, j, &acc);
            if (yref[i * n + j] != want && bad < 0) bad = i * n + j;
            if (acc >= INT32_MIN && acc <= INT32_MAX) { /* no wrap: the double requantization is within one step */
                double r = nearbyint((double)acc * (double)p.scale[j]) + p.y_zp;
                r = r < lo ? lo : r > hi ? hi : r;
                if (fabs(r - yref[i * n + j]) > 1.0 && bad_double < 0) bad_double = i * n + j;
            }
        }
    check(bad < 0, "fc ref vs spec %s: first difference at y[%lld] = %d (spec %d)", what, (long long)bad,
          bad >= 0 ? yref[bad] : 0, bad >= 0 ? spec_output(&p, bad / n, bad % n, &acc) : 0);
    check(bad_double < 0, "fc ref vs double requantization %s: more than one step apart at y[%lld]", what,
          (long long)bad_double);

    int nv;
    const et_fc_s8_variant *v = et_fc_s8_variants(&nv);
    int8_t *y = alloc_y(count), *y2 = alloc_y(count);
    for (int q = 1; q < nv; q++) {
        if (!v[q].available) continue;
        const int st1 = run_fn(&p, y, 1, v[q].fn), st2 = run_fn(&p, y2, 2, v[q].fn);
        int64_t first = -1;
        for (size_t t = 0; t < count && first < 0; t++)
            if (y[t] != yref[t]) first = (int64_t)t;
        check(st1 == ET_OK && first < 0 && canary_ok(y, count), "fc %s vs ref %s: status %d, first difference at "
              "y[%lld] = %d (ref %d)%s", v[q].name, what, st1, (long long)first, first >= 0 ? y[first] : 0,
              first >= 0 ? yref[first] : 0, canary_ok(y, count) ? "" : ", wrote past y");
        check(st2 == ET_OK && memcmp(y2, yref, count) == 0 && canary_ok(y2, count), "fc %s vs ref %s, 2 threads",
              v[q].name, what);
        memset(y, 0x5A, count + FC_CANARY), memset(y2, 0x5A, count + FC_CANARY);
    }
    free(y), free(y2), free(yref);
    fc_free(&p);
}

/* et_fc_s8_run under each selectable ISA: the dispatcher's pick (incl. AMX for 2+ rows) equals the reference */
static void fc_dispatch(void) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", et_isa_available());
    static const int64_t ms[] = {1, 2, 5, 33};
    fc_problem p;
    fc_make(&p, 33, 70, 131, 1, 1, -3, 5, -128, 127, 5);
    int8_t *yref = alloc_y((size_t)(33 * 70)), *y = alloc_y((size_t)(33 * 70));
    run_fn(&p, yref, 1, et_fc_s8_ref);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        et_isa_select(tok);
        for (size_t im = 0; im < sizeof ms / sizeof *ms; im++) {
            memset(y, 0x5A, (size_t)(33 * 70) + FC_CANARY);
            const int st = et_fc_s8_run(p.plan, p.x, ms[im], y, 0);
            check(st == ET_OK && memcmp(y, yref, (size_t)(ms[im] * 70)) == 0 && canary_ok(y, (size_t)(ms[im] * 70)),
                  "fc et_fc_s8_run under ISA %s, m=%lld: status %d, output differs from the reference", tok,
                  (long long)ms[im], st);
        }
    }
    et_isa_select(NULL);
    free(y), free(yref);
    fc_free(&p);
}

/* the plan's slack: a kernel may load whole tiles past the packed weights (AMX loads a full 1 KiB B tile at the k
 * tail), which ASan cannot see (tile loads are inline asm). Here the plan ends right before an inaccessible page, so
 * a read past its slack faults; k = 1 makes the tail tile read the furthest. */
static void fc_slack_guard(void) {
#if defined(__linux__)
    const long page = sysconf(_SC_PAGESIZE);
    const int64_t shapes[][3] = {{17, 33, 1}, {16, 16, 1}, {3, 40, 5}, {20, 100, 65}};
    int nv;
    const et_fc_s8_variant *v = et_fc_s8_variants(&nv);
    for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
        const int64_t m = shapes[c][0], n = shapes[c][1], k = shapes[c][2];
        const size_t ps = et_fc_s8_plan_size(n, k), span = (ps + 63) / 64 * 64;
        const size_t len = (span + (size_t)page - 1) / (size_t)page * (size_t)page + (size_t)page;
        uint8_t *region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (region == MAP_FAILED) continue;
        mprotect(region + len - (size_t)page, (size_t)page, PROT_NONE);
        void *plan = region + len - (size_t)page - span; /* 64-byte aligned, ends within 63 bytes of the guard */
        int8_t *w = xmalloc((size_t)(n * k)), *x = xmalloc((size_t)(m * k)), *y = xmalloc((size_t)(m * n));
        float *scale = xmalloc((size_t)n * sizeof(float)), *yf = xmalloc((size_t)(m * n) * sizeof(float));
        float *xf = xmalloc((size_t)(m * k) * sizeof(float));
        for (int64_t i = 0; i < n * k; i++) w[i] = rand_s8(5);
        for (int64_t i = 0; i < m * k; i++) x[i] = rand_s8(5), xf[i] = (float)x[i] * 0.1f;
        for (int64_t j = 0; j < n; j++) scale[j] = 0.01f;
        int ok = et_fc_s8_plan(w, n, k, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_OK;
        for (int q = 0; q < nv; q++) /* a read past the slack ends the test binary here with SIGSEGV */
            if (v[q].available) ok &= et_fc_s8_run_with(plan, x, m, y, 1, v[q].fn) == ET_OK &&
                                      et_fc_s8_dyn_with(plan, xf, m, yf, 1, v[q].fn) == ET_OK;
        check(ok, "fc plan against a guard page (m=%lld n=%lld k=%lld): every variant ran", (long long)m,
              (long long)n, (long long)k);
        free(w), free(x), free(y), free(scale), free(yf), free(xf);
        munmap(region, len);
    }
#endif
}

static void fc_errors(void) {
    int8_t w[4 * 8] = {0}, x[8] = {0}, y[4];
    float scale[4] = {0.1f, 0.1f, 0.1f, 0.1f};
    const size_t ps = et_fc_s8_plan_size(4, 8);
    uint8_t *plan = aligned_alloc(64, (ps + 63) / 64 * 64 + 64);
    check(ps > 0 && et_fc_s8_plan_size(0, 8) == 0 && et_fc_s8_plan_size(4, 0) == 0 &&
              et_fc_s8_plan_size(1, (int64_t)1 << 40) == 0, "fc plan sizes");
#define PLAN(...) et_fc_s8_plan(__VA_ARGS__)
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_OK, "fc valid plan");
    check(et_fc_s8_run(plan, x, 1, y, 1) == ET_OK, "fc valid run");
    check(PLAN(w, 4, 8, NULL, 128, scale, 0, -128, 127, plan, ps) == ET_ERR_INVALID, "fc x_zp 128 refused");
    check(PLAN(w, 4, 8, NULL, 0, scale, -129, -128, 127, plan, ps) == ET_ERR_INVALID, "fc y_zp -129 refused");
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, 5, 4, plan, ps) == ET_ERR_INVALID, "fc lo > hi refused");
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, -129, 127, plan, ps) == ET_ERR_INVALID, "fc lo -129 refused");
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, -128, 127, plan, ps - 1) == ET_ERR_INVALID, "fc plan one byte short");
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, -128, 127, plan + 1, ps) == ET_ERR_INVALID, "fc misaligned plan refused");
    check(PLAN(NULL, 4, 8, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_ERR_INVALID, "fc NULL weights refused");
    check(PLAN(w, 0, 8, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_ERR_INVALID, "fc n = 0 refused");
    scale[2] = NAN;
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_ERR_INVALID, "fc NaN scale refused");
    scale[2] = INFINITY;
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_ERR_INVALID, "fc Inf scale refused");
    scale[2] = -0.5f;
    check(PLAN(w, 4, 8, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_ERR_INVALID, "fc negative scale refused");
    scale[2] = 0.1f;
#undef PLAN
    memset(plan, 0, ps);
    check(et_fc_s8_run(plan, x, 1, y, 1) == ET_ERR_INVALID, "fc run refuses a buffer that is not a plan");
    check(et_fc_s8_run(NULL, x, 1, y, 1) == ET_ERR_INVALID, "fc run refuses a NULL plan");
    check(et_fc_s8_plan(w, 4, 8, NULL, 0, scale, 0, -128, 127, plan, ps) == ET_OK &&
              et_fc_s8_run(plan, x, 0, y, 1) == ET_ERR_INVALID && et_fc_s8_run(plan, NULL, 1, y, 1) == ET_ERR_INVALID &&
              et_fc_s8_run(plan, x, 1, NULL, 1) == ET_ERR_INVALID,
          "fc run refuses m = 0, NULL x, NULL y");
    free(plan);
}

/* ---- et_fc_s8_dyn: onnxruntime's dynamic int8 product, float out ---------------------------------------------- */

/* DynamicQuantizeLinear written from the ONNX/onnxruntime formula in double where that is exact: the range, the
 * float scale, the zero point, then each code from the float quotient */
static void spec_quantize(const float *x, int64_t count, uint8_t *u8, float *scale, int32_t *zp) {
    float mn = 0.0f, mx = 0.0f;
    for (int64_t i = 0; i < count; i++) mn = fminf(mn, x[i]), mx = fmaxf(mx, x[i]);
    const float s = mx == mn ? 1.0f : (float)(mx - mn) / 255.0f;
    float z0 = 0.0f - mn / s;
    const double z = nearbyint(z0 < 0 ? 0 : z0 > 255 ? 255 : z0);
    for (int64_t i = 0; i < count; i++) {
        double v = nearbyint((double)(x[i] / s)) + z;
        u8[i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
    }
    *scale = s, *zp = (int32_t)z;
}

static void dyn_case(int64_t m, int64_t n, int64_t k, int per_channel, int with_bias, int32_t plan_x_zp, int kind) {
    char what[128];
    snprintf(what, sizeof what, "m=%lld n=%lld k=%lld %s%s kind %d", (long long)m, (long long)n, (long long)k,
             per_channel ? "per-channel" : "per-tensor", with_bias ? " bias" : "", kind);
    float *x = xmalloc((size_t)(m * k) * sizeof(float)), *ws = xmalloc((size_t)n * sizeof(float));
    int8_t *w = xmalloc((size_t)(n * k));
    int32_t *bias = with_bias ? xmalloc((size_t)n * sizeof(int32_t)) : NULL;
    const float spread = kind == 3 ? 1e-3f : 4.0f;
    for (int64_t i = 0; i < m * k; i++) {
        x[i] = spread * (2.0f * rng_uniform() - 1.0f);
        if (kind == 1) x[i] = fabsf(x[i]);       /* all >= 0: zero point 0 */
        if (kind == 2) x[i] = -fabsf(x[i]);      /* all <= 0: zero point 255 */
        if (kind == 4) x[i] = 0.0f;              /* max == min: scale 1 */
    }
    if (kind == 5) { /* quotients exactly half-way between two codes: round half to even decides */
        const float s = 8.0f / 255.0f;
        x[0] = -4.0f, x[m * k - 1] = 4.0f;
        for (int64_t i = 1; i + 1 < m * k; i++) { /* half-way, or one float step either side of it */
            x[i] = ((float)((int)(rng_next() % 200) - 100) + 0.5f) * s;
            if (i % 3) x[i] = nextafterf(x[i], i % 3 == 1 ? INFINITY : -INFINITY);
        }
    }
    for (int64_t i = 0; i < n * k; i++) w[i] = rand_s8(3);
    for (int64_t j = 0; j < n; j++) ws[j] = per_channel ? 0.01f * (0.5f + rng_uniform()) : 0.0123f;
    for (int64_t j = 0; bias && j < n; j++) bias[j] = (int32_t)(rng_next() % 2001) - 1000;
    const size_t ps = et_fc_s8_plan_size(n, k);
    void *plan = aligned_alloc(64, (ps + 63) / 64 * 64);
    if (!plan) exit(2);
    check(et_fc_s8_plan(w, n, k, bias, plan_x_zp, ws, 9, -100, 100, plan, ps) == ET_OK, "dyn plan %s", what);

    uint8_t *u8 = xmalloc((size_t)(m * k));
    float xs;
    int32_t xzp;
    spec_quantize(x, m * k, u8, &xs, &xzp);
    const size_t count = (size_t)(m * n);
    float *want = xmalloc(count * sizeof(float)), *y = xmalloc((count + 16) * sizeof(float));
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            int64_t acc = bias ? bias[j] : 0;
            for (int64_t c = 0; c < k; c++) acc += (int64_t)(u8[i * k + c] - xzp) * w[j * k + c];
            want[i * n + j] = (float)acc * (xs * ws[j]);
        }
    int nv;
    const et_fc_s8_variant *v = et_fc_s8_variants(&nv);
    for (int q = 0; q < nv; q++) {
        if (!v[q].available) continue;
        for (int nth = 2; nth >= 1; nth--) { /* 2 first: the scratch a 1-thread call freed could hold right codes */
            for (size_t t = 0; t < count + 16; t++) y[t] = -7.5f;
            const int st = et_fc_s8_dyn_with(plan, x, m, y, nth, v[q].fn);
            int64_t first = -1;
            for (size_t t = 0; t < count && first < 0; t++)
                if (memcmp(&y[t], &want[t], sizeof(float))) first = (int64_t)t;
            int canary = 1;
            for (size_t t = count; t < count + 16; t++) canary &= y[t] == -7.5f;
            check(st == ET_OK && first < 0 && canary, "fc dyn %s vs spec %s, %d thread(s): status %d, first "
                  "difference at y[%lld] = %.9g (spec %.9g)%s", v[q].name, what, nth, st, (long long)first,
                  first >= 0 ? y[first] : 0.0, first >= 0 ? want[first] : 0.0, canary ? "" : ", wrote past y");
        }
    }
    { /* on the caller's scratch, through the dispatcher's pick */
        const size_t ss = et_fc_s8_dyn_scratch_size(plan, m);
        void *scratch = aligned_alloc(64, (ss + 63) / 64 * 64);
        memset(scratch, 0x5A, ss); /* stale bytes must not matter */
        const int st = et_fc_s8_dyn_ex(plan, x, m, y, scratch, ss, 2);
        check(st == ET_OK && memcmp(y, want, count * sizeof(float)) == 0, "fc dyn_ex vs spec %s", what);
        check(et_fc_s8_dyn_ex(plan, x, m, y, scratch, ss - 1, 1) == ET_ERR_INVALID &&
                  et_fc_s8_dyn_ex(plan, x, m, y, (char *)scratch + 1, ss, 1) == ET_ERR_INVALID &&
                  et_fc_s8_dyn_ex(plan, x, m, y, NULL, ss, 1) == ET_ERR_INVALID &&
                  et_fc_s8_dyn_scratch_size(plan, 0) == 0 && et_fc_s8_dyn_scratch_size(NULL, m) == 0,
              "fc dyn_ex refuses a short, misaligned or missing scratch %s", what);
        free(scratch);
    }
    free(x), free(ws), free(w), free(bias), free(plan), free(u8), free(want), free(y);
}

static void dyn_tests(void) {
    static const int64_t ks[] = {1, 3, 5, 64, 67, 120, 257};
    static const int64_t ns[] = {1, 2, 16, 17, 120, 129};
    static const int64_t ms[] = {1, 2, 3, 17, 40};
    int c = 0;
    for (size_t ik = 0; ik < sizeof ks / sizeof *ks; ik++)
        for (size_t in = 0; in < sizeof ns / sizeof *ns; in++, c++)
            dyn_case(ms[c % 5], ns[in], ks[ik], c & 1, (c / 2) & 1, (c % 3) * 50 - 50, c % 6);
    dyn_case(40, 360, 120, 0, 0, 0, 0); /* above the threading threshold */
    dyn_case(1, 2, 200, 1, 1, 0, 5);
    /* above the quantizer's threading threshold (16384 activations): slices of x, min and max combined */
    dyn_case(64, 40, 300, 1, 1, 0, 5);
    dyn_case(57, 33, 301, 0, 0, 0, 1);
    dyn_case(50, 17, 400, 1, 0, 0, 2);

    /* the SIMD quantizer writes the scalar one's bytes, also on half-way quotients and every tail length; in turn
     * on the range [-3, 3], on it times 1e-32 (a scale below 2^-100: every value divided, no reciprocal) and on its
     * magnitudes (zero point 0, codes at the saturation's edge) */
    int variant = 0;
    for (int64_t count = 1; count < 400; count += count < 80 ? 7 : 29, variant = (variant + 1) % 3) {
        float *x = xmalloc((size_t)count * sizeof(float));
        const float s = 6.0f / 255.0f;
        for (int64_t i = 0; i < count; i++) { /* the range [-3, 3] (scale 6/255), half-way quotients and their
                                                  neighbours */
            x[i] = ((float)((int)(rng_next() % 180) - 90) + 0.5f) * s;
            if (i % 3) x[i] = nextafterf(x[i], i % 3 == 1 ? INFINITY : -INFINITY);
        }
        x[0] = -3.0f;
        if (count > 1) x[count - 1] = 3.0f;
        for (int64_t i = 0; i < count; i++) x[i] = variant == 1 ? x[i] * 1e-32f : variant == 2 ? fabsf(x[i]) : x[i];
        int8_t *q0 = xmalloc((size_t)count), *q1 = xmalloc((size_t)count);
        float s0 = 0;
        int32_t z0 = 0;
        const int st0 = et_fc_s8_quantize_dyn(&et_fc_s8_quantizer_ref, x, count, q0, &s0, &z0);
        check(st0 == 0, "fc dyn reference quantizer, %lld values", (long long)count);
#if defined(__x86_64__) || defined(_M_X64)
        float s1 = 0;
        int32_t z1 = 0;
        const struct { const char *name; const et_fc_s8_quantizer *qz; int runs; } simd[] = {
            {"AVX2", &et_fc_s8_quantizer_avx2, __builtin_cpu_supports("avx2")},
            {"AVX-512", &et_fc_s8_quantizer_avx512, strstr(et_cpu_features(), "avx512vnni") && et_cpu_avx512dq()},
        };
        for (size_t v = 0; v < sizeof simd / sizeof *simd; v++) {
            if (!simd[v].runs) continue;
            memset(q1, 0x55, (size_t)count);
            const int st1 = et_fc_s8_quantize_dyn(simd[v].qz, x, count, q1, &s1, &z1);
            check(st1 == 0 && s0 == s1 && z0 == z1 && memcmp(q0, q1, (size_t)count) == 0,
                  "fc dyn quantizer: %s vs scalar, %lld values (variant %d)", simd[v].name, (long long)count, variant);
        }
#endif
        x[count / 2] = NAN;
        check(et_fc_s8_quantize_dyn(&et_fc_s8_quantizer_ref, x, count, q0, &s0, &z0) == -1,
              "fc dyn quantizer refuses NaN (%lld)", (long long)count);
#if defined(__x86_64__) || defined(_M_X64)
        for (size_t v = 0; v < sizeof simd / sizeof *simd; v++)
            if (simd[v].runs)
                check(et_fc_s8_quantize_dyn(simd[v].qz, x, count, q1, &s1, &z1) == -1,
                      "fc dyn %s quantizer refuses NaN (%lld)", simd[v].name, (long long)count);
        x[count / 2] = INFINITY;
        for (size_t v = 0; v < sizeof simd / sizeof *simd; v++)
            if (simd[v].runs)
                check(et_fc_s8_quantize_dyn(simd[v].qz, x, count, q1, &s1, &z1) == -1,
                      "fc dyn %s quantizer refuses inf (%lld)", simd[v].name, (long long)count);
#endif
        x[count / 2] = -INFINITY;
        check(et_fc_s8_quantize_dyn(&et_fc_s8_quantizer_ref, x, count, q0, &s0, &z0) == -1,
              "fc dyn quantizer refuses -inf");
        free(x), free(q0), free(q1);
    }

    { /* a range so narrow that (max - min) / 255 underflows: scale 1 in every pass, the same bytes */
        float x[40];
        for (int i = 0; i < 40; i++) x[i] = i % 4 == 0 ? 0x1p-149f : i % 4 == 3 ? 0x1p-148f : i % 2 ? -0.0f : 0.0f;
        int8_t q0[40];
        float s0 = 0;
        int32_t z0 = 0;
        check(et_fc_s8_quantize_dyn(&et_fc_s8_quantizer_ref, x, 40, q0, &s0, &z0) == 0 && s0 == 1.0f && z0 == 0,
              "fc dyn: an underflowing scale is taken as 1 (scale %g, zero point %d)", (double)s0, (int)z0);
#if defined(__x86_64__) || defined(_M_X64)
        int8_t q1[40];
        float s1 = 0;
        int32_t z1 = 0;
        const et_fc_s8_quantizer *qs[2] = {&et_fc_s8_quantizer_avx2, &et_fc_s8_quantizer_avx512};
        const int runs[2] = {__builtin_cpu_supports("avx2"),
                             strstr(et_cpu_features(), "avx512vnni") && et_cpu_avx512dq()};
        for (int v = 0; v < 2; v++)
            if (runs[v])
                check(et_fc_s8_quantize_dyn(qs[v], x, 40, q1, &s1, &z1) == 0 && s1 == s0 && z1 == z0 &&
                          !memcmp(q0, q1, 40), "fc dyn: underflowing scale, SIMD pass %d gives the reference's bytes", v);
#endif
    }

    /* a NaN in x: ET_ERR_NONFINITE, the output untouched; bad arguments refused */
    {
        const int64_t m = 3, n = 5, k = 9;
        int8_t w[45];
        float ws[5], x[27], y[15];
        for (int i = 0; i < 45; i++) w[i] = (int8_t)(i * 7);
        for (int i = 0; i < 5; i++) ws[i] = 0.5f;
        for (int i = 0; i < 27; i++) x[i] = (float)i;
        x[13] = NAN;
        const size_t ps = et_fc_s8_plan_size(n, k);
        void *plan = aligned_alloc(64, (ps + 63) / 64 * 64);
        et_fc_s8_plan(w, n, k, NULL, 0, ws, 0, -128, 127, plan, ps);
        for (int i = 0; i < 15; i++) y[i] = 7.0f;
        int kept = et_fc_s8_dyn(plan, x, m, y, 1) == ET_ERR_NONFINITE && strstr(et_last_error(), "finite");
        for (int i = 0; i < 15; i++) kept &= y[i] == 7.0f;
        check(kept, "fc dyn: a NaN activation is ET_ERR_NONFINITE and the output is left as it was");
        { /* the same where the quantizer runs in slices: an infinity in the last one */
            const int64_t bm = 64, bk = 300;
            float *bx = xmalloc((size_t)(bm * bk) * sizeof(float)), *by = xmalloc((size_t)(bm * n) * sizeof(float));
            int8_t *bw = xmalloc((size_t)(n * bk));
            for (int64_t i = 0; i < bm * bk; i++) bx[i] = (float)(i % 7) - 3.0f;
            for (int64_t i = 0; i < n * bk; i++) bw[i] = (int8_t)(i % 5);
            bx[bm * bk - 1] = INFINITY;
            const size_t bps = et_fc_s8_plan_size(n, bk);
            void *bplan = aligned_alloc(64, (bps + 63) / 64 * 64);
            et_fc_s8_plan(bw, n, bk, NULL, 0, ws, 0, -128, 127, bplan, bps);
            for (int64_t i = 0; i < bm * n; i++) by[i] = 7.0f;
            int bkept = et_fc_s8_dyn(bplan, bx, bm, by, 2) == ET_ERR_NONFINITE;
            for (int64_t i = 0; i < bm * n; i++) bkept &= by[i] == 7.0f;
            check(bkept, "fc dyn: an infinity in the last slice is ET_ERR_NONFINITE, output untouched (2 threads)");
            free(bx), free(by), free(bw), free(bplan);
        }
        check(et_fc_s8_dyn(plan, x, 0, y, 1) == ET_ERR_INVALID && et_fc_s8_dyn(plan, NULL, m, y, 1) == ET_ERR_INVALID &&
              et_fc_s8_dyn(plan, x, m, NULL, 1) == ET_ERR_INVALID && et_fc_s8_dyn(NULL, x, m, y, 1) == ET_ERR_INVALID &&
              et_fc_s8_dyn((char *)plan + 64, x, m, y, 1) == ET_ERR_INVALID,
              "fc dyn refuses m = 0, NULL pointers and a buffer that is not a plan");
        free(plan);
    }
}

void test_fc_s8(void) {
    const int before = n_failed;
    int nv;
    const et_fc_s8_variant *v = et_fc_s8_variants(&nv);
    char names[128] = "";
    for (int q = 0; q < nv; q++)
        if (v[q].available) strncat(names, q ? "," : "", sizeof names - strlen(names) - 1),
                            strncat(names, v[q].name, sizeof names - strlen(names) - 1);

    /* shape sweep: k around 4, 8 (one row step), 64 (one AMX chunk) and the vector widths; n around 16 and 64;
     * m around the 4-, 16- and 32-row blocks */
    static const int64_t ks[] = {1, 3, 4, 5, 8, 63, 64, 65, 67, 130, 257};
    static const int64_t ns[] = {1, 7, 16, 17, 48, 64, 65, 100};
    static const int64_t ms[] = {1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 40};
    for (size_t ik = 0; ik < sizeof ks / sizeof *ks; ik++)
        for (size_t in = 0; in < sizeof ns / sizeof *ns; in++) {
            const int64_t m = ms[(ik * 5 + in * 3) % (sizeof ms / sizeof *ms)]; /* a spread of m per (k, n) */
            fc_case(m, ns[in], ks[ik], (int)((ik + in) & 1), 1, -3, 7, -128, 127, 3);
        }
    for (size_t im = 0; im < sizeof ms / sizeof *ms; im++) fc_case(ms[im], 65, 67, 1, 1, 10, -4, -128, 127, 3);

    /* parameters at their extremes */
    fc_case(3, 33, 100, 1, 0, 0, 0, -128, 127, 0);        /* bias NULL */
    fc_case(5, 40, 96, 0, 0, -128, -128, -128, 127, 50);   /* x_zp, y_zp at -128, half the values at the extremes */
    fc_case(5, 40, 96, 1, 1, 127, 127, -128, 127, 50);     /* x_zp, y_zp at 127 */
    fc_case(17, 20, 77, 1, 1, 127, -128, -128, -128, 100); /* lo == hi == -128; every input at an extreme */
    fc_case(4, 18, 64, 0, 1, -128, 0, 0, 127, 10);         /* ReLU */
    fc_case(9, 31, 200, 1, 1, 5, -2, -7, 9, 10);           /* a narrow range */
    fc_case(2, 3, 5, 1, 1, 0, 0, 127, 127, 0);             /* lo == hi == 127 */

    /* above the threading threshold (ET_FC_S8_MT_MACS), so "2 threads" really splits: by channel tiles, and by rows
     * when there are fewer tiles than threads */
    fc_case(40, 100, 300, 1, 1, -7, 3, -128, 127, 3);
    fc_case(35, 10, 3001, 0, 1, 4, -6, -128, 127, 3);
    fc_case(81, 100, 300, 1, 0, -7, 3, -128, 127, 3); /* AMX, small weights, 32+ rows a thread: rows, with tails */

    /* int32 sums that wrap: (x - x_zp) * w = (-128 - 127) * -128 = 32640 per k, 70000 k -> 2.3e9 */
    {
        fc_problem p;
        const int64_t m = 2, n = 17, k = 70000;
        fc_make(&p, m, n, k, 1, 1, 127, 0, -128, 127, 0);
        for (int64_t i = 0; i < m * k; i++) p.x[i] = -128;
        for (int64_t i = 0; i < n * k; i++) p.w[i] = (i / k) % 2 ? -128 : (int8_t)(rng_next() >> 7);
        for (int64_t j = 0; j < n; j++) p.scale[j] = 1e-7f;
        et_fc_s8_plan(p.w, n, k, p.bias, p.x_zp, p.scale, p.y_zp, p.lo, p.hi, p.plan, et_fc_s8_plan_size(n, k));
        int8_t *yref = alloc_y((size_t)(m * n)), *y = alloc_y((size_t)(m * n));
        run_fn(&p, yref, 1, et_fc_s8_ref);
        int64_t acc;
        int ok = 1, wrapped = 0;
        for (int64_t t = 0; t < m * n; t++) {
            ok &= yref[t] == spec_output(&p, t / n, t % n, &acc);
            wrapped |= acc > INT32_MAX;
        }
        check(ok && wrapped, "fc ref vs spec with wrapping int32 sums (wrapped: %d)", wrapped);
        for (int q = 1; q < nv; q++) {
            if (!v[q].available) continue;
            check(run_fn(&p, y, 1, v[q].fn) == ET_OK && memcmp(y, yref, (size_t)(m * n)) == 0, "fc %s vs ref with "
                  "wrapping int32 sums", v[q].name);
        }
        free(y), free(yref);
        fc_free(&p);
    }

    /* random shapes and parameters */
    for (int r = 0; r < 40; r++) {
        const int64_t m = 1 + (int64_t)(rng_next() % 40), n = 1 + (int64_t)(rng_next() % 90),
                      k = 1 + (int64_t)(rng_next() % 300);
        const int32_t x_zp = (int32_t)(rng_next() % 256) - 128, y_zp = (int32_t)(rng_next() % 256) - 128;
        int32_t lo = (int32_t)(rng_next() % 256) - 128, hi = (int32_t)(rng_next() % 256) - 128;
        if (lo > hi) {
            const int32_t t = lo;
            lo = hi, hi = t;
        }
        if (r % 3 == 0) lo = -128, hi = 127;
        fc_case(m, n, k, (int)(rng_next() & 1), (int)(rng_next() % 4 != 0), x_zp, y_zp, lo, hi, (int)(rng_next() % 30));
    }

    fc_dispatch();
    fc_errors();
    fc_slack_guard();
    dyn_tests();
    printf("fc_s8 over %s: %s\n", names, n_failed == before ? "ok" : "FAILED");
}
