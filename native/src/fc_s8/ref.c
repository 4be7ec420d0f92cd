/* fc_s8/ref.c — the INT8 fully-connected spec (plan layout and arithmetic in fc_s8.h): signed x against the packed
 * weights, rowc_s as the starting value, int32 sums that wrap (kept in uint32: no signed overflow). */
#include "fc_s8.h"

void et_fc_s8_ref(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t i = i0; i < i1; i++) {
        const int8_t *x = a->x + i * a->k;
        for (int64_t j = j0; j < j1; j++) {
            const int8_t *wb = a->w + (j / 16) * a->kp * 16 + (j % 16) * 4;
            uint32_t acc = (uint32_t)a->rowc_s[j];
            for (int64_t kk = 0; kk < a->k; kk++)
                acc += (uint32_t)((int32_t)x[kk] * (int32_t)wb[(kk / 4) * 64 + kk % 4]);
            a->y[i * a->n + j] = et_fc_s8_requant((int32_t)acc, a->scale[j], a->fmin, a->fmax, a->y_zp);
        }
    }
}
