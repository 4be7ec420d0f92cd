/* fc_s8/ref.c — the INT8 fully-connected spec (plan layout and arithmetic in fc_s8.h): signed x against the packed
 * weights, rowc_s as the starting value, int32 sums that wrap (kept in uint32: no signed overflow). */
#include <math.h>

#include "fc_s8.h"

void et_fc_s8_ref(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t i = i0; i < i1; i++) {
        const int8_t *x = a->x + i * a->k;
        for (int64_t j = j0; j < j1; j++) {
            const int8_t *wb = a->w + (j / 16) * a->kp * 16 + (j % 16) * 4;
            uint32_t acc = (uint32_t)a->rowc_s[j];
            for (int64_t kk = 0; kk < a->k; kk++)
                acc += (uint32_t)((int32_t)x[kk] * (int32_t)wb[(kk / 4) * 64 + kk % 4]);
            if (a->yf)
                a->yf[i * a->n + j] = (float)(int32_t)acc * a->scale[j];
            else
                a->y[i * a->n + j] = et_fc_s8_requant((int32_t)acc, a->scale[j], a->fmin, a->fmax, a->y_zp);
        }
    }
}

static int range_ref(const float *x, int64_t count, float *mn, float *mx) {
    float lo = *mn, hi = *mx;
    for (int64_t i = 0; i < count; i++) {
        const float v = x[i];
        if (!(v - v == 0.0f)) return -1; /* NaN or an infinity */
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    *mn = lo, *mx = hi;
    return 0;
}

static void codes_ref(const float *x, int64_t count, float scale, int32_t zp, int8_t *q) {
    const float lo = (float)-zp, hi = (float)(255 - zp);
    for (int64_t i = 0; i < count; i++) {
        float v = x[i] / scale;
        v = v < lo ? lo : (v > hi ? hi : v);
        q[i] = (int8_t)((int32_t)rintf(v) + zp - 128);
    }
}

const et_fc_s8_quantizer et_fc_s8_quantizer_ref = {range_ref, codes_ref};

int et_fc_s8_quantize_dyn(const et_fc_s8_quantizer *qz, const float *x, int64_t count, int8_t *q, float *scale,
                          int32_t *zp) {
    float mn = 0.0f, mx = 0.0f;
    if (qz->range(x, count, &mn, &mx)) return -1;
    et_fc_s8_dyn_params(mn, mx, scale, zp);
    qz->codes(x, count, *scale, *zp, q);
    return 0;
}
