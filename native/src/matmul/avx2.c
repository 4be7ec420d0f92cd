/* matmul/avx2.c — AVX2 + FMA + F16C kernels on the GGUF block layout and the x16 layout (block formats: below), the
 * float formats (one weight row x one activation row, a fixed reduction: batch invariant as they are), and the
 * activation quantizer.
 */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
#include <string.h>

#include "../core.h"

ET_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ET_INLINE float h2f(et_half h) { return _cvtsh_ss(h); }

/* --- block formats: lanes are 8 weight rows ---
 * Batch invariance as in avx512.c: y[i, j] comes from the same float operations whatever m, whichever rows share a
 * tile and however rows are split over threads, so an m-row product is row by row the 1-row product. Integer block
 * dots are exact in any order; the float stage is scale_block(), which every path calls: blocks in order,
 *     acc = fma((float)isum_b, dw_b * dx_b, acc)            (q4_1 then: acc = fma(mw_b, dx_b * sum_b, acc))
 * Each path first brings a block of 8 weight rows into lanes (pk8: q[t] lane r = bytes 4t..4t+3 of row r's block in
 * element order), then broadcasts the activation's 4 bytes t against it:
 *   - q4: vpmaddubsw (unsigned nibble x signed code) pairs add up in int16 over the whole block (16 products of at
 *     most 15 * 127 = 30480, no saturation), one vpmaddwd widens them; q4_0 then removes its +8 as -8 * sum(qx).
 *   - q8_0: vpmaddubsw(|w|, sign(x, w)) per 4 bytes (a pair is at most 2 * 127 * 127), widened at once.
 * The GGUF rows are transposed 8 x 16 bytes at a time (inserts and dword/qword unpacks) and their scales loaded;
 * the x16 layout (core.h) already holds 16 rows that way, 8 per 32-byte half, so the same kernels read it with
 * plain loads and give the GGUF rows' results bit for bit.
 *   - GEMV (m < ET_PACK_MIN_M): each block is brought into lanes and used at once; one x16 activation row walks two
 *     tiles at once, one from each half of the rows (gemv_pair_x16: two weight streams).
 *   - packed (m >= ET_PACK_MIN_M): 16 rows (two groups of 8) x ET_SEG blocks are brought into lanes once into a stack
 *     buffer, and every activation row streams past them, ET_TM rows at a time (block_dots: each weight vector
 *     loaded once per step, each activation broadcast used by both groups); segments of k accumulate through y (a
 *     float store and reload: exact). */

#define ET_PACK_MIN_M 4     /* from this many activation rows on, a stored tile pays for itself */
#define ET_SEG 16           /* blocks per packed segment (of 16 rows) */
#define ET_SEG_MAX 20       /* a last stretch of up to this many blocks is one segment (k = 576: 18, not 16 + 2) */
#define ET_TM 4             /* activation rows per pass over a packed segment (their accumulators stay in registers) */
#define ET_PF_PASSES 4      /* a packed segment's last passes, which fetch the next segment's weights */
#define ET_PF_BYTES 16384   /* GEMV prefetch distance in the weights' forward stream */
_Static_assert(ET_PACK_MIN_M - 1 <= ET_TM, "GEMV rows use the packed path's ET_TM-row arrays (add_blocks)");

enum { FMT_Q4_0, FMT_Q4_1, FMT_Q8_0 };

ET_INLINE int fmt_type(int fmt) { return fmt == FMT_Q4_0 ? ET_TYPE_Q4_0 : fmt == FMT_Q4_1 ? ET_TYPE_Q4_1 : ET_TYPE_Q8_0; }

ET_INLINE size_t block_bytes(int fmt) {
    return fmt == FMT_Q4_0 ? sizeof(block_q4_0) : fmt == FMT_Q4_1 ? sizeof(block_q4_1) : sizeof(block_q8_0);
}

ET_INLINE int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* one block of 8 weight rows in lanes: q4 unsigned nibbles (q[0..3] low: elements 4t.., q[4..7] high: 16 + 4t..);
 * q8_0 |w| in q and w in s */
typedef struct {
    __m256i q[8];
    __m256i s[8];
    __m256 d; /* each row's scale */
    __m256 m; /* q4_1: each row's min */
} pk8;

/* the float stage (see above); ms = dx * (float)sum(qx), computed in float by the caller */
ET_INLINE __m256 scale_block(int fmt, __m256 acc, __m256i isum, __m256 dw, __m256 mw, float dx, float ms) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc);
    if (fmt == FMT_Q4_1) acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(ms), acc);
    return acc;
}

/* the exact integer block dots of H groups of 8 rows (pk[0..H-1]) with C activation blocks xb[c] (q4_0: minus
 * 8 * sum(qx)) -> isum[h * ET_TM + c]. Each weight vector is loaded once and each activation's 4 bytes broadcast once
 * per step, then multiplied against the other side's H or C vectors, so loads per product fall as H and C grow; q4
 * keeps one int16 running sum per pair (C * H short chains interleave). */
ET_INLINE void block_dots(int fmt, int H, int C, const pk8 *pk, const block_q8_s *const *xb, __m256i *isum) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s[2][ET_TM];
    for (int h = 0; h < H; h++)
        for (int c = 0; c < C; c++) s[h][c] = _mm256_setzero_si256();
    for (int t = 0; t < 8; t++) {
        __m256i q[2];
        for (int h = 0; h < H; h++) q[h] = pk[h].q[t];
        for (int c = 0; c < C; c++) {
            const __m256i xv = _mm256_set1_epi32(load_i32(xb[c]->qs + 4 * t));
            for (int h = 0; h < H; h++) {
                if (fmt == FMT_Q8_0)
                    s[h][c] = _mm256_add_epi32(
                        s[h][c], _mm256_madd_epi16(_mm256_maddubs_epi16(q[h], _mm256_sign_epi8(xv, pk[h].s[t])), ones));
                else
                    s[h][c] = _mm256_add_epi16(s[h][c], _mm256_maddubs_epi16(q[h], xv));
                ET_IN_REGISTER(s[h][c]);
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int c = 0; c < C; c++) {
            __m256i v = fmt == FMT_Q8_0 ? s[h][c] : _mm256_madd_epi16(s[h][c], ones);
            if (fmt == FMT_Q4_0) v = _mm256_sub_epi32(v, _mm256_set1_epi32(8 * xb[c]->sum));
            isum[h * ET_TM + c] = v;
        }
}

/* q4: 4 vectors of packed bytes -> low and high nibbles; q8_0: |w| beside w */
ET_INLINE void split_quants(int fmt, const __m256i *p, pk8 *pk) {
    if (fmt == FMT_Q8_0) {
        for (int t = 0; t < 8; t++) pk->s[t] = p[t], pk->q[t] = _mm256_abs_epi8(p[t]);
        return;
    }
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < 4; t++) {
        pk->q[t] = _mm256_and_si256(p[t], m4);
        pk->q[t + 4] = _mm256_and_si256(_mm256_srli_epi16(p[t], 4), m4);
    }
}

/* row r of a tile holding nr valid rows: rows past nr repeat the last valid one (their results are never stored) */
ET_INLINE const uint8_t *tile_row(const uint8_t *base, size_t ws, int nr, int r) {
    return base + (size_t)(r < nr ? r : nr - 1) * ws;
}

/* 8 rows x 16 bytes at p + r * ws -> q[t] lane r = bytes 4t..4t+3 of row r */
ET_INLINE void transpose_8x16(const uint8_t *p, size_t ws, int nr, __m256i q[4]) {
    __m256i a[4]; /* a[i]: row i in the low half, row i + 4 in the high half */
    for (int i = 0; i < 4; i++)
        a[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)tile_row(p, ws, nr, i))),
                                       _mm_loadu_si128((const __m128i *)tile_row(p, ws, nr, i + 4)), 1);
    const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
    q[0] = _mm256_unpacklo_epi64(t0, t2), q[1] = _mm256_unpackhi_epi64(t0, t2);
    q[2] = _mm256_unpacklo_epi64(t1, t3), q[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* lanes of 8 dwords -> their low (hi = 0) or high (hi = 1) 16 bits as fp16 -> float */
ET_INLINE __m256 halves_to_ps(__m256i v, int hi) {
    v = hi ? _mm256_srli_epi32(v, 16) : _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
    return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

/* block b of the 8 GGUF rows at w, ws bytes apart -> pk */
ET_INLINE void pack_rows(int fmt, const uint8_t *w, size_t ws, int nr, int64_t b, pk8 *pk) {
    const uint8_t *blk = w + (size_t)b * block_bytes(fmt);
    const uint8_t *qs = blk + (fmt == FMT_Q4_1 ? 4 : 2);
    __m256i p[8];
    transpose_8x16(qs, ws, nr, p);
    if (fmt == FMT_Q8_0) transpose_8x16(qs + 16, ws, nr, p + 4);
    split_quants(fmt, p, pk);
    /* each row's first dword: d, and (q4_1) m; eight loads (a vpgatherdd made the Zen 3 GEMVs 5-18% slower) */
    const __m256i dm = _mm256_setr_epi32(load_i32(tile_row(blk, ws, nr, 0)), load_i32(tile_row(blk, ws, nr, 1)),
                                         load_i32(tile_row(blk, ws, nr, 2)), load_i32(tile_row(blk, ws, nr, 3)),
                                         load_i32(tile_row(blk, ws, nr, 4)), load_i32(tile_row(blk, ws, nr, 5)),
                                         load_i32(tile_row(blk, ws, nr, 6)), load_i32(tile_row(blk, ws, nr, 7)));
    pk->d = halves_to_ps(dm, 0);
    pk->m = fmt == FMT_Q4_1 ? halves_to_ps(dm, 1) : _mm256_setzero_ps();
}

/* block b of half h (rows 8h..8h+7) of an x16 tile of nb blocks -> pk: plain loads */
ET_INLINE void pack_x16(int fmt, const uint8_t *tile, int64_t nb, int64_t b, int h, pk8 *pk) {
    const uint8_t *q = tile + et_x16_quants_at(fmt_type(fmt), b) + 32 * h;
    const uint8_t *sc = tile + et_x16_scales_at(fmt_type(fmt), nb, b) + 16 * h;
    __m256i p[8];
    for (int t = 0; t < (fmt == FMT_Q8_0 ? 8 : 4); t++) p[t] = _mm256_loadu_si256((const __m256i *)(q + 64 * t));
    split_quants(fmt, p, pk);
    pk->d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
    pk->m = fmt == FMT_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 32))) : _mm256_setzero_ps();
}

/* lanes below nr */
ET_INLINE __m256i row_mask(int nr) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

ET_INLINE void store_rows(float *y, int nr, __m256 v) {
    if (nr == 8)
        _mm256_storeu_ps(y, v);
    else
        _mm256_maskstore_ps(y, row_mask(nr), v);
}

ET_INLINE __m256 load_rows(const float *y, int nr) {
    return nr == 8 ? _mm256_loadu_ps(y) : _mm256_maskload_ps(y, row_mask(nr));
}

/* acc[h][c] += one block of the H groups pk[h] against activation block xc[c] + b: the exact integer dots, then
 * the float stage; every path but the x16 GEMV's single row goes through here */
ET_INLINE void add_blocks(int fmt, int H, int C, const pk8 *pk, const block_q8_s *const *xc, int64_t b,
                          __m256 acc[][ET_TM]) {
    const block_q8_s *xb[ET_TM];
    __m256i isum[2 * ET_TM];
    for (int c = 0; c < C; c++) xb[c] = xc[c] + b;
    block_dots(fmt, H, C, pk, xb, isum);
    for (int h = 0; h < H; h++)
        for (int c = 0; c < C; c++)
            acc[h][c] = scale_block(fmt, acc[h][c], isum[h * ET_TM + c], pk[h].d, pk[h].m, xb[c]->d,
                                    xb[c]->d * (float)xb[c]->sum);
}

/* GEMV on 8 GGUF rows (nr valid) and C activation rows. The tile reads 8 rows side by side; rows of a page or more
 * are clean streams the hardware prefetcher follows, shorter ones interleave within pages: then the next tiles'
 * bytes (contiguous) are fetched ET_PF_BYTES ahead, a slice per block. */
ET_INLINE void gemv_tile(int fmt, int C, int64_t nb, const uint8_t *w, size_t ws, int nr, const uint8_t *x, size_t xs,
                         float *y, size_t ldy) {
    const block_q8_s *xc[ET_TM];
    __m256 acc[1][ET_TM];
    for (int c = 0; c < C; c++) xc[c] = (const block_q8_s *)(x + (size_t)c * xs), acc[0][c] = _mm256_setzero_ps();
    const size_t slice = 8 * block_bytes(fmt);
    const uint8_t *pf = w + (8 * ws > ET_PF_BYTES ? 8 * ws : ET_PF_BYTES);
    const int short_rows = ws < 4096;
    for (int64_t b = 0; b < nb; b++) {
        if (short_rows)
            for (size_t o = 0; o < slice; o += 64) _mm_prefetch((const char *)(pf + (size_t)b * slice + o), _MM_HINT_T0);
        pk8 pk;
        pack_rows(fmt, w, ws, nr, b, &pk);
        add_blocks(fmt, 1, C, &pk, xc, b, acc);
    }
    for (int c = 0; c < C; c++) store_rows(y + (size_t)c * ldy, nr, acc[0][c]);
}

/* block_dot of both halves of an x16 tile's block (quants at q) with one activation block, in the order that keeps
 * few registers live: each 64-byte vector's two halves are split and multiplied at once. The same integers. */
ET_INLINE void x16_block_dots(int fmt, const uint8_t *q, const block_q8_s *xb, __m256i isum[2]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    if (fmt == FMT_Q8_0) {
        for (int t = 0; t < 8; t++) {
            const __m256i xv = _mm256_set1_epi32(load_i32(xb->qs + 4 * t));
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + 64 * t));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 64 * t + 32));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(xv, w0)), ones));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(xv, w1)), ones));
            ET_IN_REGISTER(s0);
            ET_IN_REGISTER(s1);
        }
        isum[0] = s0, isum[1] = s1;
        return;
    }
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < 4; t++) { /* int16 sums: at most 16 * 15 * 127 in magnitude, in any order */
        const __m256i xl = _mm256_set1_epi32(load_i32(xb->qs + 4 * t));
        const __m256i xh = _mm256_set1_epi32(load_i32(xb->qs + 16 + 4 * t));
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + 64 * t));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 64 * t + 32));
        s0 = _mm256_add_epi16(s0, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w0, m4), xl),
                                                   _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w0, 4), m4), xh)));
        s1 = _mm256_add_epi16(s1, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w1, m4), xl),
                                                   _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w1, 4), m4), xh)));
        ET_IN_REGISTER(s0);
        ET_IN_REGISTER(s1);
    }
    isum[0] = _mm256_madd_epi16(s0, ones), isum[1] = _mm256_madd_epi16(s1, ones);
    if (fmt == FMT_Q4_0) {
        const __m256i off = _mm256_set1_epi32(8 * xb->sum);
        isum[0] = _mm256_sub_epi32(isum[0], off), isum[1] = _mm256_sub_epi32(isum[1], off);
    }
}

/* an x16 tile's two running sums: rows 0-7 and 8-15 */
typedef struct {
    __m256 lo, hi;
} acc16;

/* acc += block b of an x16 tile of nb blocks against activation block xb */
ET_INLINE acc16 x16_block_step(int fmt, const uint8_t *tile, int64_t nb, int64_t b, const block_q8_s *xb, acc16 acc) {
    const uint8_t *sc = tile + et_x16_scales_at(fmt_type(fmt), nb, b);
    const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
    const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 16)));
    const __m256 m0 = fmt == FMT_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 32))) : d0;
    const __m256 m1 = fmt == FMT_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 48))) : d1;
    __m256i isum[2];
    x16_block_dots(fmt, tile + et_x16_quants_at(fmt_type(fmt), b), xb, isum);
    const float ms = xb->d * (float)xb->sum;
    acc.lo = scale_block(fmt, acc.lo, isum[0], d0, m0, xb->d, ms);
    acc.hi = scale_block(fmt, acc.hi, isum[1], d1, m1, xb->d, ms);
    return acc;
}

/* the next tiles' bytes of an x16 stream at block b (a tile's blocks are step bytes apart on average) */
ET_INLINE void x16_prefetch(const uint8_t *tile, int64_t b, size_t step) {
    const uint8_t *pf = tile + (size_t)b * step + ET_PF_BYTES;
    for (size_t o = 0; o < step; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
}

/* GEMV of one activation row on two x16 tiles of a chunk at once, ta from its first half and tb from its second:
 * two weight streams, so twice the lines in flight (measured 1.1-1.3x from DRAM at one thread). Each tile's rows
 * get the same float operations as gemv_tile_x16's. */
ET_INLINE void gemv_pair_x16(int fmt, int64_t nb, const uint8_t *ta, const uint8_t *tb, int nrb, const uint8_t *x,
                             float *ya, float *yb) {
    acc16 a = {_mm256_setzero_ps(), _mm256_setzero_ps()}, c = a;
    const size_t step = et_x16_block_bytes(fmt_type(fmt));
    for (int64_t b = 0; b < nb; b++) {
        x16_prefetch(ta, b, step);
        x16_prefetch(tb, b, step);
        const block_q8_s *xb = (const block_q8_s *)x + b;
        a = x16_block_step(fmt, ta, nb, b, xb, a);
        /* GCC would otherwise keep the block's activation broadcasts from the first tile in registers for the
         * second, and spill the sums */
        ET_FRESH_POINTER(xb);
        c = x16_block_step(fmt, tb, nb, b, xb, c);
    }
    _mm256_storeu_ps(ya, a.lo);
    _mm256_storeu_ps(ya + 8, a.hi);
    store_rows(yb, nrb < 8 ? nrb : 8, c.lo);
    if (nrb > 8) store_rows(yb + 8, nrb - 8, c.hi);
}

/* GEMV on an x16 tile (16 rows, nr valid): both halves of each block at once, so each of the tile's lines is read
 * once; the tiles are one forward stream, fetched ET_PF_BYTES ahead */
ET_INLINE void gemv_tile_x16(int fmt, int C, int64_t nb, const uint8_t *tile, int nr, const uint8_t *x, size_t xs,
                             float *y, size_t ldy) {
    const block_q8_s *xc[ET_TM];
    __m256 acc[2][ET_TM];
    for (int c = 0; c < C; c++) {
        xc[c] = (const block_q8_s *)(x + (size_t)c * xs);
        acc[0][c] = acc[1][c] = _mm256_setzero_ps();
    }
    const size_t step = et_x16_block_bytes(fmt_type(fmt));
    for (int64_t b = 0; b < nb; b++) {
        x16_prefetch(tile, b, step);
        if (C > 1 && fmt != FMT_Q8_0) {
            /* q4 with more than one row: the block's nibbles are split once and shared (add_blocks); measured
             * 1.3-1.6x at m = 2, 3 (q8_0 has nothing to split: its per-row order stays, faster at m = 3) */
            pk8 pk[2];
            for (int h = 0; h < 2; h++) pack_x16(fmt, tile, nb, b, h, &pk[h]);
            add_blocks(fmt, 2, C, pk, xc, b, acc);
            continue;
        }
        for (int c = 0; c < C; c++) {
            const acc16 r = x16_block_step(fmt, tile, nb, b, xc[c] + b, (acc16){acc[0][c], acc[1][c]});
            acc[0][c] = r.lo, acc[1][c] = r.hi;
        }
    }
    for (int c = 0; c < C; c++) {
        store_rows(y + (size_t)c * ldy, nr < 8 ? nr : 8, acc[0][c]);
        if (nr > 8) store_rows(y + (size_t)c * ldy + 8, nr - 8, acc[1][c]);
    }
}

/* rows j.. of the weights for C activation rows, GEMV style: an x16 tile (16 rows), or 8 GGUF rows; nr valid */
ET_INLINE void gemv_rows(int fmt, int x16, int C, int64_t nb, const uint8_t *w, size_t ws, int64_t j, int nr,
                         const uint8_t *x, size_t xs, float *y, size_t ldy) {
    if (x16)
        gemv_tile_x16(fmt, C, nb, w + (size_t)j * ws, nr, x, xs, y + j, ldy);
    else
        gemv_tile(fmt, C, nb, w + (size_t)j * ws, ws, nr, x, xs, y + j, ldy);
}

ET_INLINE void gemm_gemv(int fmt, int x16, int64_t k, const uint8_t *w, size_t ws, int64_t n, const uint8_t *x,
                         size_t xs, int64_t m, float *y, size_t ldy) {
    const int64_t nb = k / ET_QK, rows = x16 ? 16 : 8; /* x16: j is a multiple of 16, tiles 16 * ws bytes apart */
    int64_t j = 0;
    if (x16 && m == 1) { /* tile t with tile t + half: two streams; an odd count's last tile goes alone */
        const int64_t half = et_x16_tiles(n) / 2;
        for (int64_t t = 0; t < half; t++) {
            const int64_t jb = (t + half) * 16;
            gemv_pair_x16(fmt, nb, w + (size_t)t * 16 * ws, w + (size_t)jb * ws, n - jb < 16 ? (int)(n - jb) : 16, x,
                          y + t * 16, y + jb);
        }
        j = 2 * half * 16;
    }
    for (; j < n; j += rows) {
        const int nr = n - j < rows ? (int)(n - j) : (int)rows;
        switch (m) { /* constant C so the accumulators stay in registers */
        case 1: gemv_rows(fmt, x16, 1, nb, w, ws, j, nr, x, xs, y, ldy); break;
        case 2: gemv_rows(fmt, x16, 2, nb, w, ws, j, nr, x, xs, y, ldy); break;
        default: gemv_rows(fmt, x16, 3, nb, w, ws, j, nr, x, xs, y, ldy); break;
        }
    }
}

/* y rows i0..i0+C-1, weight rows j.. (the segment's columns: nrh[h] valid in group h) += the packed segment
 * (pk[b * H + h]: block b0 + b of rows j + 8h..), blocks [b0, b0 + nbs) */
ET_INLINE void packed_rows(int fmt, int H, int C, const pk8 *pk, int nbs, const uint8_t *x, size_t xs, int64_t i0,
                           int64_t b0, float *y, size_t ldy, const int *nrh) {
    const block_q8_s *xc[ET_TM];
    __m256 acc[2][ET_TM];
    for (int c = 0; c < C; c++) {
        xc[c] = (const block_q8_s *)(x + (size_t)(i0 + c) * xs) + b0;
        for (int h = 0; h < H; h++)
            acc[h][c] = b0 == 0 ? _mm256_setzero_ps() : load_rows(y + (size_t)(i0 + c) * ldy + 8 * h, nrh[h]);
    }
    for (int b = 0; b < nbs; b++) add_blocks(fmt, H, C, pk + (size_t)b * H, xc, b, acc);
    for (int c = 0; c < C; c++)
        for (int h = 0; h < H; h++) store_rows(y + (size_t)(i0 + c) * ldy + 8 * h, nrh[h], acc[h][c]);
}

/* the next packed segment's weights, fetched while this segment's last ET_PF_PASSES passes run. Without it the
 * packing's loads come as a burst after a long stretch of compute, which the hardware prefetcher has not run ahead
 * of, and wait on memory. Measured at one thread (Zen 3) on 49152x576 and 4096x4096, matrices larger than L2:
 * 1.04-1.19x at M = 64, 1.08-1.45x at M = 16 (the GGUF rows, 16 streams, gain the most); an L2-held matrix
 * 0.97-0.99x at M = 64, 0.82-0.95x at M = 7-16 (the loop's own cost). Up to 16 ranges: an x16 tile's quants and
 * scales, or the blocks of each of 16 GGUF rows. */
typedef struct {
    const uint8_t *at[16], *end[16]; /* at: the next line to fetch (64-byte aligned) */
    int n, r;                        /* ranges, and the one at hand */
    int64_t lines;                   /* in all ranges */
} seg_fetch;

ET_INLINE void seg_fetch_add(seg_fetch *f, const uint8_t *p, size_t len) {
    f->at[f->n] = (const uint8_t *)((uintptr_t)p & ~(uintptr_t)63);
    f->end[f->n] = p + len;
    f->lines += (int64_t)((f->end[f->n] - f->at[f->n] + 63) / 64);
    f->n++;
}

/* fetches up to `lines` more lines of f. T1 measured alike with T0 on Zen 3; where the levels differ, it keeps the
 * lines out of the L1 the current segment is using */
ET_INLINE void seg_fetch_lines(seg_fetch *f, int64_t lines) {
    int r = f->r;
    if (r >= f->n) return;
    const uint8_t *at = f->at[r];
    for (; lines > 0; lines--) {
        _mm_prefetch((const char *)at, _MM_HINT_T1);
        if ((at += 64) >= f->end[r]) {
            if (++r == f->n) break;
            at = f->at[r];
        }
    }
    f->r = r;
    if (r < f->n) f->at[r] = at;
}

/* every activation row past one packed segment (H groups of 8 rows), ET_TM rows at a time. The last ET_PF_PASSES
 * passes fetch a share each of f's lines; in a first segment (b0 = 0: y not read yet) each pass fetches the next
 * one's output lines, whose stores would otherwise wait on memory (rows of a large n are far apart: 1.02-1.05x). */
ET_INLINE void packed_segment(int fmt, int H, const pk8 *pk, int nbs, const uint8_t *x, size_t xs, int64_t m,
                              int64_t b0, float *y, size_t ldy, const int *nrh, seg_fetch *f) {
    const int64_t passes = (m + ET_TM - 1) / ET_TM, pf = passes < ET_PF_PASSES ? passes : ET_PF_PASSES;
    const int64_t per = (f->lines + pf - 1) / pf;
    int64_t i = 0;
    for (; i + ET_TM <= m; i += ET_TM) {
        if (i / ET_TM >= passes - pf) seg_fetch_lines(f, per);
        for (int64_t r = i + ET_TM; b0 == 0 && r < i + 2 * ET_TM && r < m; r++) {
            const char *o = (const char *)(y + (size_t)r * ldy); /* 16 floats: one line, or two */
            _mm_prefetch(o, _MM_HINT_T0);
            if ((uintptr_t)o & 63) _mm_prefetch(o + 63, _MM_HINT_T0);
        }
        packed_rows(fmt, H, ET_TM, pk, nbs, x, xs, i, b0, y, ldy, nrh);
    }
    seg_fetch_lines(f, per);
    switch (m - i) { /* constant C so the accumulators stay in registers */
    case 3: packed_rows(fmt, H, 3, pk, nbs, x, xs, i, b0, y, ldy, nrh); break;
    case 2: packed_rows(fmt, H, 2, pk, nbs, x, xs, i, b0, y, ldy, nrh); break;
    case 1: packed_rows(fmt, H, 1, pk, nbs, x, xs, i, b0, y, ldy, nrh); break;
    default: break;
    }
}

/* blocks per segment from block b0 of nb: ET_SEG, or the last ET_SEG_MAX or fewer in one piece */
ET_INLINE int64_t seg_blocks(int64_t nb, int64_t b0) { return nb - b0 <= ET_SEG_MAX ? nb - b0 : ET_SEG; }

/* the weights of the segment after blocks [.., b_end) of rows j.. (16 of them): this tile's next blocks, or the next
 * tile's first; none past n */
ET_INLINE seg_fetch next_segment(int fmt, int x16, const uint8_t *w, size_t ws, int64_t n, int64_t nb, int64_t j,
                                 int64_t b_end) {
    seg_fetch f = {.n = 0, .r = 0, .lines = 0};
    const int64_t jn = b_end < nb ? j : j + 16, bn = b_end < nb ? b_end : 0, nbn = seg_blocks(nb, bn);
    if (jn >= n) return f;
    const uint8_t *tn = w + (size_t)jn * ws; /* x16: a tile of 16 * ws bytes */
    const int base = fmt_type(fmt);
    if (x16) {
        seg_fetch_add(&f, tn + et_x16_quants_at(base, bn), (size_t)nbn * et_x16_qbytes(base));
        seg_fetch_add(&f, tn + et_x16_scales_at(base, nb, bn), (size_t)nbn * et_x16_sbytes(base));
    } else {
        for (int64_t r = jn; r < n && r < jn + 16; r++)
            seg_fetch_add(&f, tn + (size_t)(r - jn) * ws + (size_t)bn * block_bytes(fmt),
                          (size_t)nbn * block_bytes(fmt));
    }
    return f;
}

/* 16 weight rows (two groups of 8: H = 2; the last tile of n <= 8 rows: H = 1) x one segment at a time */
ET_INLINE void gemm_packed(int fmt, int x16, int64_t k, const uint8_t *w, size_t ws, int64_t n, const uint8_t *x,
                           size_t xs, int64_t m, float *y, size_t ldy) {
    const int64_t nb = k / ET_QK;
    _Alignas(32) pk8 pk[2 * ET_SEG_MAX]; /* 22.5 KiB */
    for (int64_t j = 0; j < n; j += 16) {
        const int nr = n - j < 16 ? (int)(n - j) : 16, H = nr > 8 ? 2 : 1;
        const int nrh[2] = {nr < 8 ? nr : 8, nr - 8}; /* valid rows in each group of 8 */
        const uint8_t *tile = w + (size_t)j * ws; /* x16: j / 16 tiles of 16 * ws bytes */
        for (int64_t b0 = 0, nbs; b0 < nb; b0 += nbs) {
            nbs = seg_blocks(nb, b0);
            for (int b = 0; b < nbs; b++)
                for (int h = 0; h < H; h++) {
                    if (x16)
                        pack_x16(fmt, tile, nb, b0 + b, h, &pk[b * H + h]);
                    else
                        pack_rows(fmt, tile + (size_t)(8 * h) * ws, ws, nrh[h], b0 + b, &pk[b * H + h]);
                }
            /* not for x16 at m <= ET_TM (one pass): its tiles are one forward stream the hardware follows when the
             * compute between is short (measured 0.92-1.10x at m = 4, where the GGUF rows still gained 1.3-1.9x) */
            seg_fetch f = {.n = 0, .r = 0, .lines = 0};
            if (!x16 || m > ET_TM) f = next_segment(fmt, x16, w, ws, n, nb, j, b0 + nbs);
            if (H == 2)
                packed_segment(fmt, 2, pk, nbs, x, xs, m, b0, y + j, ldy, nrh, &f);
            else
                packed_segment(fmt, 1, pk, nbs, x, xs, m, b0, y + j, ldy, nrh, &f);
        }
    }
}

#define ET_GEMM_BLOCKS(name, fmt, x16)                                                                         \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        if (m <= 0 || n <= 0) return;                                                                         \
        if (m >= ET_PACK_MIN_M)                                                                               \
            gemm_packed(fmt, x16, k, (const uint8_t *)w, ws, n, (const uint8_t *)x, xs, m, y, ldy);           \
        else                                                                                                  \
            gemm_gemv(fmt, x16, k, (const uint8_t *)w, ws, n, (const uint8_t *)x, xs, m, y, ldy);             \
    }

ET_GEMM_BLOCKS(gemm_q4_0_avx2, FMT_Q4_0, 0)
ET_GEMM_BLOCKS(gemm_q4_1_avx2, FMT_Q4_1, 0)
ET_GEMM_BLOCKS(gemm_q8_0_avx2, FMT_Q8_0, 0)
ET_GEMM_BLOCKS(gemm_q4_0_x16_avx2, FMT_Q4_0, 1)
ET_GEMM_BLOCKS(gemm_q4_1_x16_avx2, FMT_Q4_1, 1)
ET_GEMM_BLOCKS(gemm_q8_0_x16_avx2, FMT_Q8_0, 1)

/* --- float weights: 8 lanes per step, scalar tail --- */

ET_INLINE __m256 load_w_f32(const float *w) { return _mm256_loadu_ps(w); }
ET_INLINE __m256 load_w_f16(const et_half *w) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)); }
ET_INLINE float scalar_w_f32(const float *w) { return *w; }
ET_INLINE float scalar_w_f16(const et_half *w) { return h2f(*w); }

#define ET_GEMM_FLOAT(name, wt, loadw, scalarw)                                                                \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            const wt *wj = (const wt *)((const uint8_t *)w + (size_t)j * ws);                                 \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const float *xi = (const float *)((const uint8_t *)x + (size_t)i * xs);                       \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                                     \
                int64_t c = 0;                                                                                \
                for (; c + 16 <= k; c += 16) {                                                                \
                    a0 = _mm256_fmadd_ps(loadw(wj + c), _mm256_loadu_ps(xi + c), a0);                         \
                    a1 = _mm256_fmadd_ps(loadw(wj + c + 8), _mm256_loadu_ps(xi + c + 8), a1);                 \
                }                                                                                             \
                for (; c + 8 <= k; c += 8) a0 = _mm256_fmadd_ps(loadw(wj + c), _mm256_loadu_ps(xi + c), a0);  \
                float s = hsum_ps(_mm256_add_ps(a0, a1));                                                     \
                for (; c < k; c++) s += scalarw(wj + c) * xi[c];                                              \
                y[(size_t)i * ldy + j] = s;                                                                   \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_FLOAT(gemm_f32_avx2, float, load_w_f32, scalar_w_f32)
ET_GEMM_FLOAT(gemm_f16_avx2, et_half, load_w_f16, scalar_w_f16)

/* ---- activations: et_quantize_row_q8_s with the same float operations (max and integer sums are exact in any
 * order; one multiply and a round to nearest even per value), 8 lanes at a time ---- */

ET_INLINE float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static int quantize_row_q8_s_avx2(const float *x, block_q8_s *y, int64_t k) {
    const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(3.4028234663852886e38f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the packs' 128-bit lane interleave */
    for (int64_t b = 0; b < k / ET_QK; b++) {
        const float *xb = x + b * ET_QK;
        __m256 v[4], m = _mm256_setzero_ps();
        int finite = 0xFF;
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            const __m256 a = _mm256_andnot_ps(sign, v[i]);
            /* NaN compares false, so it fails the finite test like Inf */
            finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, fmax, _CMP_LE_OQ));
            m = _mm256_max_ps(m, a);
        }
        if (finite != 0xFF) return -1;
        const float amax = hmax_ps(m);
        const __m256 id = _mm256_set1_ps(et_q8s_inverse(amax));
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        /* codes are in [-127, 127]: the saturating packs are plain narrowings */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y[b].qs, _mm256_permutevar8x32_epi32(p, order));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
        y[b].d = amax / 127.0f;
        y[b].sum = _mm_cvtsi128_si32(t);
    }
    return 0;
}

const et_kernels et_kernels_avx2 = {
    .name = "avx2",
    .gemv_t_f16 = et_gemv_t_f16_avx2,
    .softmax = et_softmax_avx2,
    .gemm_q4_0 = gemm_q4_0_avx2,
    .gemm_q4_1 = gemm_q4_1_avx2,
    .gemm_q8_0 = gemm_q8_0_avx2,
    .gemm_f16 = gemm_f16_avx2,
    .gemm_f32 = gemm_f32_avx2,
    .gemm_q4_0_x16 = gemm_q4_0_x16_avx2,
    .gemm_q4_1_x16 = gemm_q4_1_x16_avx2,
    .gemm_q8_0_x16 = gemm_q8_0_x16_avx2,
    .quantize_row_q8_s = quantize_row_q8_s_avx2,
};

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
