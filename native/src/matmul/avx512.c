/* matmul/avx512.c — AVX-512 F/BW/VL kernels on the GGUF block layout; avx512vnni.c compiles this same source with
 * ET_VNNI 1, which turns every 4-byte dot product into one vpdpbusd.
 *
 * Batch invariance is the contract: y[i, j] is computed by the same float operations, in the same order, whatever
 * m, whichever rows share a tile, wherever the tile or its tail falls and however rows are split over threads, so
 * row i of an m-row product is bit for bit the 1-row product of x[i] (the LLM's logits must not depend on how a
 * prompt was batched or what the KV cache held). Integer block dots are exact in any order; the float stage is one
 * function, scale_block(): lanes are 16 weight rows, blocks are added in order,
 *     acc = fma((float)isum_b, dw_b * dx_b, acc)            (q4_1 then: acc = fma(mw_b, dx_b * sum_b, acc))
 * and every path below calls it. Each path transposes a tile of 16 weight rows so that lane r of a register holds
 * 4 bytes of row r; one vpdpbusd with the activation's 4 bytes broadcast then serves 16 rows.
 *   - GEMV (m < ET_PACK_MIN_M): each block of the tile is transposed in registers and used at once, then dropped.
 *     The tile reads 16 rows side by side: rows shorter than a page are copied a tile at a time into a stack
 *     buffer (double-buffered, the next tile in memory order during this one's blocks), so memory sees one stream.
 *   - packed (m >= ET_PACK_MIN_M): a tile of 16 rows x ET_SEG blocks is transposed into a stack buffer
 *     (sizeof(pk_block) * ET_SEG = 20 KiB), then every activation row streams past it; the transpose is paid once
 *     per weight tile and shared by all m rows. Segments of k accumulate through y (a float store and reload,
 *     exact). Nothing is kept between calls and QTensor.raw stays the GGUF layout.
 *   - with AMX-INT8 (avx512vnni build, Linux, checked at run time) groups of 16 activation rows hand 16 x 16 x 32
 *     block products to the tile unit (A = 16 activation rows' block, copied once per segment into one aligned
 *     512-byte tile, B = the packed weight block) and scale the int32 results with scale_block() in zmm; the tile
 *     state is requested once per process.
 *
 * vpdpbusd multiplies unsigned by signed bytes, so every weight goes in as u8 and its offset is removed exactly in
 * the int32 accumulator's starting value: q4 nibbles are already unsigned (q4_0 starts at -8*sum(qx)); q8_0 weights
 * are xor'ed with 0x80 (w + 128) and start at -128*sum(qx). The q4_1 min adds m*dx*sum(qx) per block in float.
 * The AMX path packs q8_0 and q4_0 weights signed instead (w, nibble - 8) for tdpbssd, whose dots need no offset:
 * one integer add less per output and block (q4_1 stays unsigned, tdpbsud); the rows of a group left to the zmm
 * kernel turn the signed tile back to unsigned bytes as they load it. Either way the block dot is the same integer.
 *
 * Tails are handled with masks rather than scalar loops: row tails use masked stores of a 16-row tile whose missing
 * rows repeat a valid one (lanes never mix, so a row's result does not depend on its neighbours), float k tails use
 * masked loads. The float-weight kernels (4 rows x 1 activation row, one accumulator per output, fixed reduction)
 * are invariant as they are: nothing in an output's arithmetic depends on m or on the row tile.
 */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(ET_VNNI)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8")
#endif
#define ET_KNAME(name) name##_avx512vnni
#if defined(__linux__)
#define ET_AMX 1 /* AMX-INT8 tiles for m >= 16, when the CPU has them and the kernel grants their state */
#endif
#else
#define ET_VNNI 0
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
#define ET_KNAME(name) name##_avx512
#endif
#ifndef ET_AMX
#define ET_AMX 0
#endif
#include <immintrin.h>

#include "../core.h"

#define ET_PACK_MIN_M 4 /* from this many activation rows on, a stored transposed tile pays for itself */
#define ET_TILE_N 16    /* weight rows per packed tile: one per zmm lane */
#ifndef ET_TILE_M
#define ET_TILE_M 8 /* activation rows whose float accumulators stay in registers */
#endif
#define ET_SEG 32       /* blocks per packed segment */
#define ET_PF_BYTES 16384 /* GEMV prefetch distance for short rows, at least one 16-row tile */
#define ET_CP_PF_BYTES 8192 /* GEMV tile copy: L2 prefetch distance ahead of the copy's loads */
#define ET_PF_BLOCKS 8    /* GEMV prefetch distance for rows of a page or more, in blocks */
#define ET_X16_PF_BYTES 32768 /* GEMV on x16 tiles: L2 prefetch distance in the tiles' one forward stream */
#define ET_GROUP_M 64   /* activation rows whose per-block terms are precomputed together (stack: 16 KiB, 88 with AMX) */

/* ---- 4-byte dot products: acc[l] += sum_{i<4} u[4l+i] * s[4l+i], u unsigned, s signed ---- */

/* u in [0, 15]: the int16 pair sums of maddubs cannot saturate */
ET_INLINE __m512i dot4_u4(__m512i acc, __m512i u, __m512i s) {
#if ET_VNNI
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

/* u in [0, 255]: without VNNI the pair sums (up to 2*255*127) would saturate int16, so split u into nibbles */
ET_INLINE __m512i dot4_u8(__m512i acc, __m512i u, __m512i s) {
#if ET_VNNI
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_maddubs_epi16(_mm512_and_si512(u, m4), s);
    const __m512i hi = _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(u, 4), m4), s);
    return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(lo, _mm512_set1_epi16(1)),
                                                  _mm512_madd_epi16(hi, _mm512_set1_epi16(16))));
#endif
}

ET_INLINE int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

enum { FMT_Q4_0, FMT_Q4_1, FMT_Q8_0 };

ET_INLINE int fmt_type(int fmt) { /* the et_type of a format */
    return fmt == FMT_Q4_0 ? ET_TYPE_Q4_0 : fmt == FMT_Q4_1 ? ET_TYPE_Q4_1 : ET_TYPE_Q8_0;
}

ET_INLINE size_t block_bytes(int fmt) {
    return fmt == FMT_Q4_0 ? sizeof(block_q4_0) : fmt == FMT_Q4_1 ? sizeof(block_q4_1) : sizeof(block_q8_0);
}

/* int32 start value of a block dot that removes the weight offset exactly: q4_0 nibbles are q + 8, q8_0 weights
 * go in as w + 128 */
ET_INLINE int32_t block_offset(int fmt, const block_q8_s *xb) {
    return fmt == FMT_Q4_0 ? -8 * xb->sum : fmt == FMT_Q8_0 ? -128 * xb->sum : 0;
}

/* The float stage, the one every path (GEMV, packed, AMX) runs, so that y[i, j] is the same bits whatever m:
 * lanes are weight rows, blocks are added in order, acc = fma((float)isum_b, dw_b * dx_b, acc), and for q4_1
 * acc = fma(mw_b, dx_b * sum_b, acc) after it. ms = dx_b * (float)sum_b, computed in float by the caller. */
ET_INLINE __m512 scale_block(int fmt, __m512 acc, __m512i isum, __m512 dw, __m512 mw, float dx, float ms) {
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
    if (fmt == FMT_Q4_1) acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(ms), acc);
    return acc;
}

/* ---- packed kernels: 16 weight rows x up to ET_TILE_M activation rows ---- */

/* one block of 16 rows: q[t] lane r holds unsigned bytes 4t..4t+3 of row r's block (element order) */
typedef struct {
    __m512i q[8];
    __m512 d; /* weight scale of each row */
    __m512 m; /* q4_1: weight min of each row */
} pk_block;

/* row r of a tile that holds nr valid rows: rows past nr repeat the last valid one (their results are never
 * stored). With nr the constant 16 this is base + r * ws, which the compiler keeps in addressing modes. */
ET_INLINE const uint8_t *tile_row(const uint8_t *base, size_t ws, int nr, int r) {
    return base + (size_t)(r < nr ? r : nr - 1) * ws;
}

/* 16 rows x 16 bytes at p + r * ws -> q[t] lane r = bytes 4t..4t+3 of row r: 8 two-source permutes */
ET_INLINE void transpose_16x16(const uint8_t *p, size_t ws, int nr, __m512i q[4]) {
    __m512i z[4]; /* z[i] lane 4s + t = dword t of row 4i + s */
    for (int i = 0; i < 4; i++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)tile_row(p, ws, nr, 4 * i)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)tile_row(p, ws, nr, 4 * i + 1)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)tile_row(p, ws, nr, 4 * i + 2)), 2);
        z[i] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)tile_row(p, ws, nr, 4 * i + 3)), 3);
    }
    /* lane 8u + r of lo (hi) = dword u (2 + u) of row r of the 8 rows in (z[2h], z[2h+1]) */
    const __m512i ilo = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i ihi = _mm512_set_epi32(31, 27, 23, 19, 15, 11, 7, 3, 30, 26, 22, 18, 14, 10, 6, 2);
    const __m512i lo0 = _mm512_permutex2var_epi32(z[0], ilo, z[1]), hi0 = _mm512_permutex2var_epi32(z[0], ihi, z[1]);
    const __m512i lo1 = _mm512_permutex2var_epi32(z[2], ilo, z[3]), hi1 = _mm512_permutex2var_epi32(z[2], ihi, z[3]);
    q[0] = _mm512_shuffle_i32x4(lo0, lo1, _MM_SHUFFLE(1, 0, 1, 0));
    q[1] = _mm512_shuffle_i32x4(lo0, lo1, _MM_SHUFFLE(3, 2, 3, 2));
    q[2] = _mm512_shuffle_i32x4(hi0, hi1, _MM_SHUFFLE(1, 0, 1, 0));
    q[3] = _mm512_shuffle_i32x4(hi0, hi1, _MM_SHUFFLE(3, 2, 3, 2));
}

/* byte offset of each of a tile's rows from the first, for the scale gather */
ET_INLINE __m512i tile_row_offsets(size_t ws, int nr) {
    const __m512i roff = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)ws));
    return _mm512_min_epi32(roff, _mm512_set1_epi32((int)ws * (nr - 1)));
}

/* block b of the 16 rows at w, ws bytes apart -> pk */
ET_INLINE void pack_block(int fmt, int sgn, const uint8_t *w, size_t ws, int nr, __m512i rofs, int64_t b,
                          pk_block *pk) {
    const uint8_t *blk = w + (size_t)b * block_bytes(fmt);
    const uint8_t *qs = blk + (fmt == FMT_Q4_1 ? 4 : 2);
    __m512i p[4];
    transpose_16x16(qs, ws, nr, p);
    if (fmt == FMT_Q8_0) {
        const __m512i flip = _mm512_set1_epi8(sgn ? 0 : (char)0x80);
        for (int t = 0; t < 4; t++) pk->q[t] = _mm512_xor_si512(p[t], flip);
        transpose_16x16(qs + 16, ws, nr, p);
        for (int t = 0; t < 4; t++) pk->q[t + 4] = _mm512_xor_si512(p[t], flip);
    } else {
        const __m512i m4 = _mm512_set1_epi8(0x0F), o = _mm512_set1_epi8(sgn ? 8 : 0);
        for (int t = 0; t < 4; t++) {
            pk->q[t] = _mm512_sub_epi8(_mm512_and_si512(p[t], m4), o);
            pk->q[t + 4] = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p[t], 4), m4), o);
        }
    }
    /* the 16 rows' scale (and q4_1 min) of a block: one gather of the block's first dword per row */
    const __m512i dm = _mm512_i32gather_epi32(rofs, blk, 1);
    pk->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    pk->m = fmt == FMT_Q4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16))) : _mm512_setzero_ps();
}

/* block b of an x16 tile of nb blocks (core.h) -> pk: the quants are already transposed and the scales 16 to a
 * vector, so this is loads, the nibble split and the fp16 conversion */
ET_INLINE void pack_block_x16(int fmt, int sgn, const uint8_t *tile, int64_t nb, int64_t b, pk_block *pk) {
    const uint8_t *q = tile + et_x16_quants_at(fmt_type(fmt), b), *sc = tile + et_x16_scales_at(fmt_type(fmt), nb, b);
    if (fmt == FMT_Q8_0) {
        const __m512i flip = _mm512_set1_epi8(sgn ? 0 : (char)0x80);
        for (int t = 0; t < 8; t++) pk->q[t] = _mm512_xor_si512(_mm512_loadu_si512(q + 64 * t), flip);
    } else {
        const __m512i m4 = _mm512_set1_epi8(0x0F), o = _mm512_set1_epi8(sgn ? 8 : 0);
        for (int t = 0; t < 4; t++) {
            const __m512i p = _mm512_loadu_si512(q + 64 * t);
            pk->q[t] = _mm512_sub_epi8(_mm512_and_si512(p, m4), o);
            pk->q[t + 4] = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p, 4), m4), o);
        }
    }
    pk->d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
    pk->m = fmt == FMT_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 32))) : _mm512_setzero_ps();
}

/* blocks [b0, b0+nbs) of 16 rows: GGUF rows ws bytes apart, or (x16) the tile at w */
ET_INLINE void pack_tile(int fmt, int sgn, int x16, const uint8_t *w, size_t ws, int nr, int64_t nb, int64_t b0,
                         int nbs, pk_block *pk) {
    if (x16) {
        for (int b = 0; b < nbs; b++) pack_block_x16(fmt, sgn, w, nb, b0 + b, &pk[b]);
        return;
    }
    const __m512i rofs = tile_row_offsets(ws, nr);
    for (int b = 0; b < nbs; b++) pack_block(fmt, sgn, w, ws, nr, rofs, b0 + b, &pk[b]);
}

/* the integer block dot of 16 packed rows with one activation block; off = block_offset() removes the weight offset */
ET_INLINE __m512i block_dot(int fmt, const __m512i q[8], const block_q8_s *xb, int32_t off) {
    __m512i s = _mm512_set1_epi32(off);
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) {
        const __m512i xv = _mm512_set1_epi32(load_i32(xb->qs + 4 * t));
        s = fmt == FMT_Q8_0 ? dot4_u8(s, q[t], xv) : dot4_u4(s, q[t], xv);
    }
    return s;
}

/* y row c (16 weight rows) = acc[c]. When one segment covers k (y is written once, never read back), full aligned
 * rows bypass the cache: rows of y are ldy floats apart, often a multiple of 4 KiB, so the lines a tile writes fall
 * into the same few cache sets, and a normal store would first read each line from memory. */
ET_INLINE void store_tile(int C, float *y, size_t ldy, __mmask16 rmask, int once, const __m512 *acc) {
    const int stream = once && rmask == 0xFFFF && ((uintptr_t)y & 63) == 0 && (ldy & 15) == 0;
    for (int c = 0; c < C; c++) {
        if (stream)
            _mm512_stream_ps(y + (size_t)c * ldy, acc[c]);
        else
            _mm512_mask_storeu_ps(y + (size_t)c * ldy, rmask, acc[c]);
    }
}

/* acc[c] += the packed segment against activation rows xc[c], blocks [b0, b0+nbs) */
ET_INLINE void packed_cols(int fmt, int sgn, int C, const pk_block *pk, int nbs, const block_q8_s *const *xc,
                           int64_t b0, const int32_t (*off)[ET_SEG], const float (*ms)[ET_SEG], __m512 *acc) {
    for (int b = 0; b < nbs; b++) {
        __m512i q[8];
        for (int t = 0; t < 8; t++) q[t] = _mm512_load_si512(&pk[b].q[t]);
        if (sgn) /* the tile was packed signed for AMX: back to the unsigned bytes vpdpbusd takes */
            for (int t = 0; t < 8; t++)
                q[t] = fmt == FMT_Q8_0 ? _mm512_xor_si512(q[t], _mm512_set1_epi8((char)0x80))
                                       : _mm512_add_epi8(q[t], _mm512_set1_epi8(8));
#pragma GCC unroll 16
        for (int c = 0; c < C; c++) {
            const block_q8_s *xb = xc[c] + b0 + b;
            acc[c] = scale_block(fmt, acc[c], block_dot(fmt, q, xb, off[c][b]), pk[b].d, pk[b].m, xb->d, ms[c][b]);
        }
    }
}

ET_INLINE void packed_tile_cols(int fmt, int sgn, int C, const pk_block *pk, int nbs, int64_t nb, const uint8_t *x,
                                size_t xs, int64_t i0, int64_t b0, float *y, size_t ldy, __mmask16 rmask,
                                const int32_t (*off)[ET_SEG], const float (*ms)[ET_SEG]) {
    const block_q8_s *xc[ET_TILE_M];
    __m512 acc[ET_TILE_M];
    for (int c = 0; c < C; c++) {
        xc[c] = (const block_q8_s *)(x + (size_t)(i0 + c) * xs);
        acc[c] = b0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rmask, y + (size_t)(i0 + c) * ldy);
    }
    packed_cols(fmt, sgn, C, pk, nbs, xc, b0, off, ms, acc);
    store_tile(C, y + (size_t)i0 * ldy, ldy, rmask, b0 == 0 && nbs == nb, acc);
}

#if ET_AMX
/* ---- AMX-INT8: the same packed tile, 16 activation rows x 16 weight rows per tile multiply ----
 * A = 16 activation rows x 32 s8 (copied out of the block_q8_s rows once per segment, so each is one aligned
 * 512-byte load), B = the packed weight block (pk_block.q is already the 8 x 64-byte "VNNI" layout the tile
 * multiply wants: row t, lane r = bytes 4t..4t+3 of weight row r; signed for tdpbssd, q4_1 unsigned for tdpbsud),
 * C = 16 x 16 int32 exact block dots, scaled in zmm as in packed_cols. */

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* a global, so the compiler cannot drop its stores: it does not see ldtilecfg read them */
static const amx_config amx_cfg = {
    .palette_id = 1,
    /* C: 16 activation rows x 16 int32 (tiles 0-3); A: 16 activation rows x 32 s8 (4, 6);
     * B: 8 groups of 4 bytes x 16 weight rows (5, 7) */
    .colsb = {64, 64, 64, 64, 32, 64, 32, 64},
    .rows = {16, 16, 16, 16, 16, 8, 16, 8},
};

/* GCC's tile load/store intrinsics are asm without a memory clobber: fence ordinary loads and stores around them */
#define ET_MEMORY_BARRIER() __asm__ __volatile__("" ::: "memory")

static void amx_begin(void) { _tile_loadconfig(&amx_cfg); }

/* the C tile cb of one block into acc: its dots are already exact (no weight offset: q8_0/q4_0 went in signed) */
ET_INLINE void amx_scale(int fmt, const int32_t *cb, const pk_block *pk, const float *dx, const float *ms,
                         __m512 *acc) {
#pragma GCC unroll 16
    for (int c = 0; c < 16; c++)
        acc[c] = scale_block(fmt, acc[c], _mm512_load_si512(cb + 16 * c), pk->d, pk->m, dx[c * ET_SEG], ms[c * ET_SEG]);
}

/* xa: the 16 activation rows' blocks [b0, b0+nbs) as A tiles, 16 x 32 bytes per block */
ET_INLINE void amx_tile_cols(int fmt, const pk_block *pk, int nbs, int64_t nb, const int8_t *xa, int64_t i0, int64_t b0,
                             float *y, size_t ldy, __mmask16 rmask, const float (*dx)[ET_SEG], const float (*ms)[ET_SEG]) {
    __m512 acc[16];
    _Alignas(64) int32_t cb[8][256]; /* ring of C tiles: each is scaled a step after its store, off the tile path */
    for (int c = 0; c < 16; c++)
        acc[c] = b0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rmask, y + (size_t)(i0 + c) * ldy);
    /* four blocks in flight: C tiles 0-3, (A, B) pairs 4/5 and 6/7 alternate */
#define ET_AMX_BLOCK(ct, at, bt, bb)                                                                             \
    do {                                                                                                      \
        _tile_zero(ct);                                                                                       \
        _tile_loadd(at, xa + (size_t)(bb) * 16 * ET_QK, ET_QK);                                                \
        _tile_loadd(bt, pk[bb].q, 64);                                                                        \
        if (fmt == FMT_Q4_1)                                                                                  \
            _tile_dpbsud(ct, at, bt);                                                                         \
        else                                                                                                  \
            _tile_dpbssd(ct, at, bt);                                                                         \
        _tile_stored(ct, cb[(bb) & 7], 64);                                                                   \
    } while (0)
    int b = 0;
    ET_MEMORY_BARRIER(); /* pk and x are written before the tile loads read them */
    for (; b < nbs; b += 4) {
        ET_AMX_BLOCK(0, 4, 5, b);
        if (b + 1 < nbs) ET_AMX_BLOCK(1, 6, 7, b + 1);
        if (b + 2 < nbs) ET_AMX_BLOCK(2, 4, 5, b + 2);
        if (b + 3 < nbs) ET_AMX_BLOCK(3, 6, 7, b + 3);
        ET_MEMORY_BARRIER(); /* cb is written by the tile stores above */
        if (b >= 4)
            for (int bb = b - 4; bb < b; bb++)
                amx_scale(fmt, cb[bb & 7], &pk[bb], &dx[0][bb], &ms[0][bb], acc);
    }
#undef ET_AMX_BLOCK
    for (int bb = b - 4; bb < nbs; bb++) amx_scale(fmt, cb[bb & 7], &pk[bb], &dx[0][bb], &ms[0][bb], acc);
    store_tile(16, y + (size_t)i0 * ldy, ldy, rmask, b0 == 0 && nbs == nb, acc);
}
#endif

/* ---- GEMV (m < ET_PACK_MIN_M): the packed kernel's arithmetic, each block of a 16-row tile packed in registers
 * and used at once, so nothing is stored and reloaded; weights stream from memory once ---- */

/* acc[c] += block b of the packed 16 rows against activation row xc[c] */
ET_INLINE void gemv_block(int fmt, int C, const pk_block *pk, const block_q8_s *const *xc, int64_t b, __m512 *acc) {
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) {
        const block_q8_s *xb = xc[c] + b;
        acc[c] = scale_block(fmt, acc[c], block_dot(fmt, pk->q, xb, block_offset(fmt, xb)), pk->d, pk->m, xb->d,
                             xb->d * (float)xb->sum);
    }
}

ET_INLINE void gemv_tile(int fmt, int C, int64_t nb, const uint8_t *w, size_t ws, int nr, const uint8_t *x, size_t xs,
                         float *y, size_t ldy, __mmask16 rmask) {
    const size_t bs = block_bytes(fmt);
    const __m512i rofs = tile_row_offsets(ws, nr);
    const block_q8_s *xc[ET_PACK_MIN_M];
    __m512 acc[ET_PACK_MIN_M];
    for (int c = 0; c < C; c++) xc[c] = (const block_q8_s *)(x + (size_t)c * xs), acc[c] = _mm512_setzero_ps();
    /* the tile reads 16 rows side by side. Rows of a page or more each are 16 clean streams the hardware prefetcher
     * follows; software prefetches a few blocks ahead in each row only move them on to L1. Shorter rows interleave
     * within pages, which the hardware does not follow: then the next tile's bytes (contiguous) are fetched to L2
     * in memory order, at least ET_PF_BYTES ahead, in step with this tile. */
    const size_t tile_bytes = 16 * ws;
    const int per_row = ws >= 4096;
    const uint8_t *pf = w + (tile_bytes > ET_PF_BYTES ? tile_bytes : ET_PF_BYTES);
    for (int64_t b = 0; b < nb; b++) {
        if (per_row)
            for (int r = (int)(b & 1) * 8; r < (int)(b & 1) * 8 + 8; r++)
                _mm_prefetch((const char *)(tile_row(w, ws, nr, r) + (size_t)(b + ET_PF_BLOCKS) * bs), _MM_HINT_T0);
        else
            for (size_t o = 0; o < 16 * bs; o += 64) _mm_prefetch((const char *)(pf + (size_t)b * 16 * bs + o), _MM_HINT_T1);
        pk_block pk;
        pack_block(fmt, 0, w, ws, nr, rofs, b, &pk);
        gemv_block(fmt, C, &pk, xc, b, acc);
    }
    store_tile(C, y, ldy, rmask, 0, acc); /* a GEMV's few output lines are read next: keep them in the cache */
}

/* gemv_tile on a full tile already copied to buf (the same bytes at the same offsets, so the same arithmetic), while
 * the next tile (nxt, tile_bytes, contiguous) is copied into nbuf in memory order, a slice per block, with L2
 * prefetches ET_CP_PF_BYTES ahead of the copy: memory sees one sequential stream instead of 16 interleaved rows of
 * short runs, and the tile's interleaved reads hit L1. */
ET_INLINE void gemv_tile_copy(int fmt, int C, int64_t nb, const uint8_t *buf, size_t ws, const uint8_t *x, size_t xs,
                              float *y, size_t ldy, const uint8_t *nxt, uint8_t *nbuf, size_t tile_bytes) {
    const __m512i rofs = tile_row_offsets(ws, 16);
    const block_q8_s *xc[ET_PACK_MIN_M];
    __m512 acc[ET_PACK_MIN_M];
    for (int c = 0; c < C; c++) xc[c] = (const block_q8_s *)(x + (size_t)c * xs), acc[c] = _mm512_setzero_ps();
    const size_t slice = ((tile_bytes + (size_t)nb - 1) / (size_t)nb + 63) & ~(size_t)63;
    size_t o = 0;
    for (int64_t b = 0; b < nb; b++) {
        if (nxt) {
            const size_t e = o + slice < tile_bytes ? o + slice : tile_bytes;
            for (; o + 64 <= e; o += 64) {
                _mm_prefetch((const char *)(nxt + o + ET_CP_PF_BYTES), _MM_HINT_T1);
                _mm512_store_si512(nbuf + o, _mm512_loadu_si512(nxt + o));
            }
            for (; o < e; o++) nbuf[o] = nxt[o];
        }
        pk_block pk;
        pack_block(fmt, 0, buf, ws, 16, rofs, b, &pk);
        gemv_block(fmt, C, &pk, xc, b, acc);
    }
    store_tile(C, y, ldy, 0xFFFF, 0, acc);
}

ET_INLINE void gemm_gemv(int fmt, int64_t k, const uint8_t *w, size_t ws, int64_t n, const uint8_t *x, size_t xs,
                         int64_t m, float *y, size_t ldy) {
    const int64_t nb = k / ET_QK;
    int64_t j = 0;
    const size_t tile_bytes = (size_t)ET_TILE_N * ws;
    /* rows shorter than a page: double-buffered tile copies (gemv_tile_copy); longer rows are 16 clean streams */
    if (ws < 4096 && n >= 2 * ET_TILE_N) {
        _Alignas(64) uint8_t bufs[2][ET_TILE_N * 4096]; /* 128 KiB of stack */
        memcpy(bufs[0], w, tile_bytes);
        int cur = 0; /* bufs[cur] holds the tile at j */
        for (; j + ET_TILE_N <= n; j += ET_TILE_N, cur ^= 1) {
            const uint8_t *nxt = j + 2 * ET_TILE_N <= n ? w + (size_t)(j + ET_TILE_N) * ws : NULL;
            switch (m) {
            case 1: gemv_tile_copy(fmt, 1, nb, bufs[cur], ws, x, xs, y + j, ldy, nxt, bufs[cur ^ 1], tile_bytes); break;
            case 2: gemv_tile_copy(fmt, 2, nb, bufs[cur], ws, x, xs, y + j, ldy, nxt, bufs[cur ^ 1], tile_bytes); break;
            default: gemv_tile_copy(fmt, 3, nb, bufs[cur], ws, x, xs, y + j, ldy, nxt, bufs[cur ^ 1], tile_bytes); break;
            }
        }
    }
    for (; j + ET_TILE_N <= n; j += ET_TILE_N) { /* nr the constant 16: row addresses fold into addressing modes */
        const uint8_t *wj = w + (size_t)j * ws;
        switch (m) { /* constant C so the accumulators stay in registers */
        case 1: gemv_tile(fmt, 1, nb, wj, ws, ET_TILE_N, x, xs, y + j, ldy, 0xFFFF); break;
        case 2: gemv_tile(fmt, 2, nb, wj, ws, ET_TILE_N, x, xs, y + j, ldy, 0xFFFF); break;
        default: gemv_tile(fmt, 3, nb, wj, ws, ET_TILE_N, x, xs, y + j, ldy, 0xFFFF); break;
        }
    }
    if (j < n) {
        const int nr = (int)(n - j);
        const __mmask16 rmask = (__mmask16)((1u << nr) - 1);
        for (int64_t i = 0; i < m; i++) /* the same per-row arithmetic, one activation row at a time */
            gemv_tile(fmt, 1, nb, w + (size_t)j * ws, ws, nr, x + (size_t)i * xs, xs, y + (size_t)i * ldy + j, ldy, rmask);
    }
}

/* x16 tiles are contiguous: the weights are one forward stream, prefetched ET_X16_PF_BYTES ahead; every tile runs
 * whole (missing rows are zeros) and stores its valid rows */
ET_INLINE void gemv_tile_x16(int fmt, int C, int64_t nb, const uint8_t *tile, const uint8_t *x, size_t xs, float *y,
                             size_t ldy, __mmask16 rmask) {
    const block_q8_s *xc[ET_PACK_MIN_M];
    __m512 acc[ET_PACK_MIN_M];
    for (int c = 0; c < C; c++) xc[c] = (const block_q8_s *)(x + (size_t)c * xs), acc[c] = _mm512_setzero_ps();
    /* the tiles are one forward stream: block b has used about b * (qb + sb) of it; fetch ET_X16_PF_BYTES ahead.
     * Near the end of a chunk this runs past it on purpose: a prefetch never faults, and where matrices sit one
     * after another (the LLM's arena) it warms the next one's start (stopping at the chunk end measured 95% -> 90%
     * of stream at 1 thread, no change at 2) */
    const size_t step = et_x16_block_bytes(fmt_type(fmt));
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *pf = tile + (size_t)b * step + ET_X16_PF_BYTES;
        for (size_t o = 0; o < step; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T1);
        pk_block pk;
        pack_block_x16(fmt, 0, tile, nb, b, &pk);
        gemv_block(fmt, C, &pk, xc, b, acc);
    }
    store_tile(C, y, ldy, rmask, 0, acc);
}

ET_INLINE void gemm_gemv_x16(int fmt, int64_t k, const uint8_t *w, size_t ws, int64_t n, const uint8_t *x, size_t xs,
                             int64_t m, float *y, size_t ldy) {
    const int64_t nb = k / ET_QK;
    for (int64_t j = 0; j < n; j += ET_TILE_N) {
        const __mmask16 rmask = n - j < ET_TILE_N ? (__mmask16)((1u << (n - j)) - 1) : 0xFFFF;
        const uint8_t *tile = w + (size_t)j * ws;
        switch (m) { /* constant C so the accumulators stay in registers */
        case 1: gemv_tile_x16(fmt, 1, nb, tile, x, xs, y + j, ldy, rmask); break;
        case 2: gemv_tile_x16(fmt, 2, nb, tile, x, xs, y + j, ldy, rmask); break;
        default: gemv_tile_x16(fmt, 3, nb, tile, x, xs, y + j, ldy, rmask); break;
        }
    }
}

ET_INLINE void gemm_packed(int fmt, int x16, int64_t k, const uint8_t *w, size_t ws, int64_t n, const uint8_t *x,
                           size_t xs, int64_t m, float *y, size_t ldy) {
    const int64_t nb = k / ET_QK;
    _Alignas(64) pk_block pk[ET_SEG];
#if ET_AMX
    const int amx = m >= 16 && et_cpu_amx_int8();
    if (amx) amx_begin();
#endif
    /* per (activation row, block) start values and q4_1 min terms, computed once per segment for a group of rows,
     * so the inner loops only broadcast them from memory */
    int32_t off[ET_GROUP_M][ET_SEG];
    float ms[ET_GROUP_M][ET_SEG];
#if ET_AMX
    float dx[ET_GROUP_M][ET_SEG];
    _Alignas(64) int8_t xa[ET_GROUP_M / 16][ET_SEG][16][ET_QK]; /* the group's activation blocks as A tiles */
    const int sgn = amx && fmt != FMT_Q4_1; /* tdpbssd takes q8_0/q4_0 weights signed: no offset to remove */
#else
    const int sgn = 0;
#endif
    for (int64_t ig = 0; ig < m; ig += ET_GROUP_M) {
        const int64_t ie = m - ig < ET_GROUP_M ? m : ig + ET_GROUP_M;
#if ET_AMX
        const int64_t amx_rows = amx ? (ie - ig) / 16 * 16 : 0; /* the group's rows the tile unit takes */
#endif
        for (int64_t b0 = 0; b0 < nb; b0 += ET_SEG) {
            const int nbs = nb - b0 < ET_SEG ? (int)(nb - b0) : ET_SEG;
            for (int64_t i = ig; i < ie; i++) {
                const block_q8_s *xb = (const block_q8_s *)(x + (size_t)i * xs) + b0;
                for (int b = 0; b < nbs; b++) {
                    off[i - ig][b] = block_offset(fmt, &xb[b]);
                    ms[i - ig][b] = xb[b].d * (float)xb[b].sum;
#if ET_AMX
                    dx[i - ig][b] = xb[b].d;
                    if (i - ig < amx_rows) memcpy(xa[(i - ig) / 16][b][(i - ig) % 16], xb[b].qs, ET_QK);
#endif
                }
            }
            for (int64_t j = 0; j < n; j += ET_TILE_N) {
                const int nr = n - j < ET_TILE_N ? (int)(n - j) : ET_TILE_N;
                const __mmask16 rmask = (__mmask16)((1u << nr) - 1);
                pack_tile(fmt, sgn, x16, w + (size_t)j * ws, ws, nr, nb, b0, nbs, pk);
                int64_t i = ig;
#define ET_TERMS off + (i - ig), (const float(*)[ET_SEG])ms + (i - ig)
#if ET_AMX
                for (; i < ig + amx_rows; i += 16)
                    amx_tile_cols(fmt, pk, nbs, nb, &xa[(i - ig) / 16][0][0][0], i, b0, y + j, ldy, rmask,
                                  (const float(*)[ET_SEG])dx + (i - ig), (const float(*)[ET_SEG])ms + (i - ig));
#endif
                for (; i + ET_TILE_M <= ie; i += ET_TILE_M)
                    packed_tile_cols(fmt, sgn, ET_TILE_M, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS);
                switch (ie - i) { /* constant C so the accumulators stay in registers */
                case 7: packed_tile_cols(fmt, sgn, 7, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS); break;
                case 6: packed_tile_cols(fmt, sgn, 6, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS); break;
                case 5: packed_tile_cols(fmt, sgn, 5, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS); break;
                case 4: packed_tile_cols(fmt, sgn, 4, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS); break;
                case 3: packed_tile_cols(fmt, sgn, 3, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS); break;
                case 2: packed_tile_cols(fmt, sgn, 2, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS); break;
                case 1: packed_tile_cols(fmt, sgn, 1, pk, nbs, nb, x, xs, i, b0, y + j, ldy, rmask, ET_TERMS); break;
                default: break;
                }
#undef ET_TERMS
            }
        }
    }
#if ET_AMX
    if (amx) _tile_release();
#endif
    _mm_sfence(); /* order the streaming stores before the pool's completion flag */
}

#define ET_GEMM_BLOCKS(name, fmt, x16)                                                                         \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        if (m >= ET_PACK_MIN_M)                                                                               \
            gemm_packed(fmt, x16, k, (const uint8_t *)w, ws, n, (const uint8_t *)x, xs, m, y, ldy);           \
        else if (x16)                                                                                         \
            gemm_gemv_x16(fmt, k, (const uint8_t *)w, ws, n, (const uint8_t *)x, xs, m, y, ldy);              \
        else                                                                                                  \
            gemm_gemv(fmt, k, (const uint8_t *)w, ws, n, (const uint8_t *)x, xs, m, y, ldy);                    \
    }

ET_GEMM_BLOCKS(ET_KNAME(gemm_q4_0), FMT_Q4_0, 0)
ET_GEMM_BLOCKS(ET_KNAME(gemm_q4_1), FMT_Q4_1, 0)
ET_GEMM_BLOCKS(ET_KNAME(gemm_q8_0), FMT_Q8_0, 0)
ET_GEMM_BLOCKS(ET_KNAME(gemm_q4_0_x16), FMT_Q4_0, 1)
ET_GEMM_BLOCKS(ET_KNAME(gemm_q4_1_x16), FMT_Q4_1, 1)
ET_GEMM_BLOCKS(ET_KNAME(gemm_q8_0_x16), FMT_Q8_0, 1)

/* ---- activations: et_quantize_row_q8_s with the same float operations, 32 lanes at a time ----
 * Sixteen blocks go together: their per-block maxima and sums come out of one transposing reduction (lane b = block
 * b), and their scales from one vector division, instead of two horizontal reductions and two scalar divisions per
 * block. max and integer sums are exact in any order and the divisions are the same IEEE operations, so the blocks
 * are bit for bit the reference's. */

ET_INLINE __m512 q8s_op(int add, __m512 a, __m512 b) { /* max_ps, or add_epi32 on float bits: exact in any order */
    return add ? _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)))
               : _mm512_max_ps(a, b);
}

/* v[i] lane l = a partial of block i (16 blocks) -> lane i = q8s_op over v[i]'s lanes */
ET_INLINE __m512 q8s_reduce16(int add, const __m512 v[16]) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++) /* each 128-bit chunk: blocks 2i, 2i+1 at even, odd lanes */
        w[i] = q8s_op(add, _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int j = 0; j < 4; j++) /* each 128-bit chunk: blocks 4j..4j+3 at lanes 0..3 */
        x[j] = q8s_op(add, _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                      _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 z01 = q8s_op(add, _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 z23 = q8s_op(add, _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return q8s_op(add, _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                  _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* one block's codes from its 32 values and 127/amax: round to nearest even, stored as int8; returns the codes'
 * int32 lanes summed pairwise (q0 + q1), which add up to the block's sum */
ET_INLINE __m512i q8s_codes(block_q8_s *yb, __m512 v0, __m512 v1, __m512 vid) {
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC; /* nearbyintf in the default rounding mode */
    const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, vid), rnd);
    const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, vid), rnd);
    _mm_storeu_si128((__m128i *)yb->qs, _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(yb->qs + 16), _mm512_cvtsepi32_epi8(q1));
    return _mm512_add_epi32(q0, q1);
}

static int ET_KNAME(quantize_row_q8_s)(const float *x, block_q8_s *y, int64_t k) {
    const __m512 fmax = _mm512_set1_ps(3.4028234663852886e38f);
    const int64_t nb = k / ET_QK;
    int64_t b = 0;
    for (; b + 16 <= nb; b += 16) {
        const float *xg = x + b * ET_QK;
        __m512 mx[16], sm[16];
        __mmask16 finite = 0xFFFF;
        for (int i = 0; i < 16; i++) {
            const __m512 a0 = _mm512_abs_ps(_mm512_loadu_ps(xg + i * ET_QK));
            const __m512 a1 = _mm512_abs_ps(_mm512_loadu_ps(xg + i * ET_QK + 16));
            /* NaN compares false, so it fails the finite test like Inf */
            finite &= _mm512_cmp_ps_mask(a0, fmax, _CMP_LE_OQ) & _mm512_cmp_ps_mask(a1, fmax, _CMP_LE_OQ);
            mx[i] = _mm512_max_ps(a0, a1);
        }
        if (finite != 0xFFFF) return -1;
        const __m512 amax = q8s_reduce16(0, mx);
        /* et_q8s_inverse, 16 blocks at once */
        const __m512 id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_set1_ps(0x1p-120f), _CMP_GE_OQ),
                                              _mm512_set1_ps(127.0f), amax);
        _Alignas(64) float ids[16], ds[16];
        _Alignas(64) int32_t sums[16];
        _mm512_store_ps(ids, id);
        _mm512_store_ps(ds, _mm512_div_ps(amax, _mm512_set1_ps(127.0f)));
        for (int i = 0; i < 16; i++)
            sm[i] = _mm512_castsi512_ps(q8s_codes(&y[b + i], _mm512_loadu_ps(xg + i * ET_QK),
                                                  _mm512_loadu_ps(xg + i * ET_QK + 16), _mm512_set1_ps(ids[i])));
        _mm512_store_ps((float *)sums, q8s_reduce16(1, sm));
        for (int i = 0; i < 16; i++) y[b + i].d = ds[i], y[b + i].sum = sums[i];
    }
    for (; b < nb; b++) { /* the last blocks, one at a time */
        const __m512 v0 = _mm512_loadu_ps(x + b * ET_QK), v1 = _mm512_loadu_ps(x + b * ET_QK + 16);
        const __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
        if ((_mm512_cmp_ps_mask(a0, fmax, _CMP_LE_OQ) & _mm512_cmp_ps_mask(a1, fmax, _CMP_LE_OQ)) != 0xFFFF) return -1;
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        const __m512i s = q8s_codes(&y[b], v0, v1, _mm512_set1_ps(et_q8s_inverse(amax)));
        y[b].d = amax / 127.0f;
        y[b].sum = _mm512_reduce_add_epi32(s);
    }
    return 0;
}

/* ---- float weights: 4 rows x 1 activation row, 16 lanes per step, masked k tail ---- */

ET_INLINE __m512 load_w_f32(const void *w, int64_t c, __mmask16 mk) {
    return _mm512_maskz_loadu_ps(mk, (const float *)w + c);
}
ET_INLINE __m512 load_w_f16(const void *w, int64_t c, __mmask16 mk) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, (const et_half *)w + c));
}

#define ET_GEMM_FLOAT(name, loadw)                                                                             \
    static void name(int64_t k, const void *w, size_t ws, int64_t n, const void *x, size_t xs, int64_t m,      \
                     float *y, size_t ldy) {                                                                  \
        const uint8_t *wb = (const uint8_t *)w;                                                               \
        const __mmask16 tail = (__mmask16)((1u << (k % 16)) - 1);                                             \
        int64_t j = 0;                                                                                        \
        for (; j + 4 <= n; j += 4) {                                                                          \
            const uint8_t *w0 = wb + (size_t)j * ws, *w1 = w0 + ws, *w2 = w1 + ws, *w3 = w2 + ws;             \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const float *xi = (const float *)((const uint8_t *)x + (size_t)i * xs);                       \
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                   \
                int64_t c = 0;                                                                                \
                for (; c + 16 <= k; c += 16) {                                                                \
                    const __m512 xv = _mm512_loadu_ps(xi + c);                                                \
                    a0 = _mm512_fmadd_ps(loadw(w0, c, 0xFFFF), xv, a0);                                       \
                    a1 = _mm512_fmadd_ps(loadw(w1, c, 0xFFFF), xv, a1);                                       \
                    a2 = _mm512_fmadd_ps(loadw(w2, c, 0xFFFF), xv, a2);                                       \
                    a3 = _mm512_fmadd_ps(loadw(w3, c, 0xFFFF), xv, a3);                                       \
                }                                                                                             \
                if (tail) {                                                                                   \
                    const __m512 xv = _mm512_maskz_loadu_ps(tail, xi + c);                                    \
                    a0 = _mm512_fmadd_ps(loadw(w0, c, tail), xv, a0);                                         \
                    a1 = _mm512_fmadd_ps(loadw(w1, c, tail), xv, a1);                                         \
                    a2 = _mm512_fmadd_ps(loadw(w2, c, tail), xv, a2);                                         \
                    a3 = _mm512_fmadd_ps(loadw(w3, c, tail), xv, a3);                                         \
                }                                                                                             \
                float *yi = y + (size_t)i * ldy + j;                                                          \
                yi[0] = _mm512_reduce_add_ps(a0), yi[1] = _mm512_reduce_add_ps(a1);                           \
                yi[2] = _mm512_reduce_add_ps(a2), yi[3] = _mm512_reduce_add_ps(a3);                           \
            }                                                                                                 \
        }                                                                                                     \
        for (; j < n; j++) {                                                                                  \
            const uint8_t *w0 = wb + (size_t)j * ws;                                                          \
            for (int64_t i = 0; i < m; i++) {                                                                 \
                const float *xi = (const float *)((const uint8_t *)x + (size_t)i * xs);                       \
                __m512 a0 = _mm512_setzero_ps();                                                              \
                int64_t c = 0;                                                                                \
                for (; c + 16 <= k; c += 16) a0 = _mm512_fmadd_ps(loadw(w0, c, 0xFFFF), _mm512_loadu_ps(xi + c), a0); \
                if (tail) a0 = _mm512_fmadd_ps(loadw(w0, c, tail), _mm512_maskz_loadu_ps(tail, xi + c), a0);  \
                y[(size_t)i * ldy + j] = _mm512_reduce_add_ps(a0);                                            \
            }                                                                                                 \
        }                                                                                                     \
    }

ET_GEMM_FLOAT(ET_KNAME(gemm_f32), load_w_f32)
ET_GEMM_FLOAT(ET_KNAME(gemm_f16), load_w_f16)

#if ET_VNNI
const et_kernels et_kernels_avx512vnni = {
    .name = "avx512vnni",
    .gemv_t_f16 = et_gemv_t_f16_avx512,
    .softmax = et_softmax_avx2,
    .quantize_row_q8_s = quantize_row_q8_s_avx512vnni,
    .gemm_q4_0 = gemm_q4_0_avx512vnni,
    .gemm_q4_1 = gemm_q4_1_avx512vnni,
    .gemm_q8_0 = gemm_q8_0_avx512vnni,
    .gemm_f16 = gemm_f16_avx512vnni,
    .gemm_f32 = gemm_f32_avx512vnni,
    .gemm_q4_0_x16 = gemm_q4_0_x16_avx512vnni,
    .gemm_q4_1_x16 = gemm_q4_1_x16_avx512vnni,
    .gemm_q8_0_x16 = gemm_q8_0_x16_avx512vnni,
};
#else
const et_kernels et_kernels_avx512 = {
    .name = "avx512",
    .gemv_t_f16 = et_gemv_t_f16_avx512,
    .softmax = et_softmax_avx2,
    .quantize_row_q8_s = quantize_row_q8_s_avx512,
    .gemm_q4_0 = gemm_q4_0_avx512,
    .gemm_q4_1 = gemm_q4_1_avx512,
    .gemm_q8_0 = gemm_q8_0_avx512,
    .gemm_f16 = gemm_f16_avx512,
    .gemm_f32 = gemm_f32_avx512,
    .gemm_q4_0_x16 = gemm_q4_0_x16_avx512,
    .gemm_q4_1_x16 = gemm_q4_1_x16_avx512,
    .gemm_q8_0_x16 = gemm_q8_0_x16_avx512,
};
#endif

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
