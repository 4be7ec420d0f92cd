/* fc_s8/ref.c — the INT8 fully-connected spec (layout and arithmetic in fc_s8.h). */
#include <math.h>

#include "fc_s8.h"

void et_fc_s8_ref(const et_fc_s8_args *a, int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < a->m; i++) {
        const uint8_t *x = a->xu + i * a->kp;
        for (int64_t j = j0; j < j1; j++) {
            const int8_t *wb = a->w + (j / 16) * a->kp * 16 + (j % 16) * 4;
            int32_t acc = a->rowc[j];
            for (int64_t kk = 0; kk < a->kp; kk += 4)
                for (int t = 0; t < 4; t++) acc += (int32_t)x[kk + t] * (int32_t)wb[kk * 16 + t];
            a->y[i * a->n + j] = (int8_t)et_fc_s8_requant(acc, a->scale[j], a->y_zp, a->lo, a->hi);
        }
    }
}
