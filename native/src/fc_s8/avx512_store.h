/* fc_s8/avx512_store.h — the AVX-512 output step of the fc_s8 kernels (avx512vnni.c, amx.c): 16 channels' int32
 * sums times their scales, stored as float, or clamped, rounded and offset as et_fc_s8_requant spells out (cvtps
 * rounds half to even, as lrintf). Included after the including file's AVX-512 target pragma. */
#ifndef ET_FC_S8_AVX512_STORE_H
#define ET_FC_S8_AVX512_STORE_H

#include <immintrin.h>

#include "fc_s8.h"

/* the lanes of the first nj (>= 1) of 16 channels */
static inline __mmask16 et_fc_s8_mask16(int64_t nj) {
    return nj >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nj) - 1u);
}

/* row i, channels j.. (the lanes in mask) of the output, from their int32 sums acc */
static inline void et_fc_s8_store16(const et_fc_s8_args *a, __m512i acc, int64_t i, int64_t j, __mmask16 mask) {
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(a->scale + j)); /* scale holds np floats */
    if (a->yf) { /* float output */
        _mm512_mask_storeu_ps(a->yf + i * a->n + j, mask, f);
        return;
    }
    f = _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(a->fmin)), _mm512_set1_ps(a->fmax));
    const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(f), _mm512_set1_epi32(a->y_zp));
    _mm_mask_storeu_epi8(a->y + i * a->n + j, mask, _mm512_cvtepi32_epi8(v));
}

#endif
