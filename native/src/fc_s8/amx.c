/* fc_s8/amx.c — INT8 fully-connected on AMX-INT8 tiles (tdpbssd: s8 x s8 -> s32, 16 x 16 outputs x 64 k per
 * instruction), rowc_s as the starting value; the output step is avx512_store.h's, as avx512vnni.c's.
 *
 * The packed weights are already AMX B tiles: 16 consecutive 64-byte rows of one 16-channel tile are 64 k of 16
 * channels, in the 4-byte groups tdpbssd wants. The activation rows are copied once per call into a 64-byte aligned
 * panel, one 1 KB A tile per 64 k, zero-padded past k (in-place loads from an unaligned x split every row over two
 * cache lines: 25% slower on 32x512x512). Up to 16 rows: one A tile against 2 B tiles (32 channels) into one of two
 * pairs of accumulator tiles, alternating, each group stored one group late and requantized two groups late (a
 * tile store straight after the products, read back at once, drained the pipeline: ~2 us of 8.5 on 8x1024x1024).
 * 17-32 rows: 2 A x 2 B tiles into 4 accumulators, stored at the end of the block and requantized during the next
 * block's first k steps (pending_sums). At the k tail the B tile is loaded whole, reading into the next
 * channel tile or the plan's slack: those weights meet zero activations. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* syscall() under -std=c11 */
#endif
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")
#endif
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_store.h"
#include "fc_s8.h"

/* GCC's tile intrinsics are asm statements (and a builtin, for ldtilecfg) that do not tell the compiler they touch
 * memory: without a barrier it dropped the stores that fill the tile configuration, and could equally drop or move
 * the activation panel's stores or read a stored tile before the store. Every tile load/store of compiler-written
 * memory sits behind one. */
#define MEMORY_BARRIER() __asm__ __volatile__("" ::: "memory")

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static void configure(int rows0, int rows1) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    if (rows1 == 0) { /* tiles 0-3: C (rows0 x 16 int32, two sets of two), 4: A (rows0 x 64), 5, 6: B */
        for (int t = 0; t < 5; t++) cfg.rows[t] = (uint8_t)rows0;
    } else { /* 0,1: C of A0 (rows0), 2,3: C of A1 (rows1), 4: A0, 5: A1, 6,7: B */
        cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = (uint8_t)rows0;
        cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (uint8_t)rows1;
    }
    MEMORY_BARRIER();
    _tile_loadconfig(&cfg);
}

/* c: rows x 16 int32 (stride 16) + rowc_s -> y rows i.., channels j.. (nj of them) */
static void requant_block(const et_fc_s8_args *a, const int32_t *c, int rows, int64_t i, int64_t j, int64_t nj) {
    MEMORY_BARRIER(); /* after the tile store that wrote c */
    const __m512i rc = _mm512_loadu_si512(a->rowc_s + j);
    const __mmask16 mask = et_fc_s8_mask16(nj);
    for (int r = 0; r < rows; r++)
        et_fc_s8_store16(a, _mm512_add_epi32(_mm512_load_si512((const void *)(c + r * 16)), rc), i + r, j, mask);
    MEMORY_BARRIER(); /* before the next tile store into c */
}

/* the 32-channel group at j of [j, j1): its channel tiles (1 or 2), and the channels in its last tile */
static inline int group_tiles(int64_t j, int64_t j1, int64_t *nlast) {
    const int64_t left = j1 - j;
    *nlast = left > 16 ? (left < 32 ? left - 16 : 16) : left;
    return left > 16 ? 2 : 1;
}

/* the stored sums of the 32-channel group at j of [j, j1) (its 1 or 2 tiles 256 int32 apart at c), rows i.. */
static void requant_group(const et_fc_s8_args *a, const int32_t *c, int rows, int64_t i, int64_t j, int64_t j1) {
    int64_t nlast;
    const int nt = group_tiles(j, j1, &nlast);
    for (int t = 0; t < nt; t++) requant_block(a, c + 256 * t, rows, i, j + 16 * t, t == nt - 1 ? nlast : 16);
}

/* rows i..i+mr (mr <= 16) x channels [j0, j1), software-pipelined: 32-channel groups alternate between
 * accumulator tiles {0, 1} and {2, 3}, and a group's results are stored only after the next group's products
 * have been issued, so the tile stores do not drain the pipeline after every group */
static void rows1_pipelined(const et_fc_s8_args *a, const int8_t *panel, int64_t i, int mr, int64_t j0, int64_t j1,
                            int32_t *cbuf) {
    const int64_t k = a->k, kp = a->kp, kc = (k + 63) / 64 * 64, stride = kp * 16;
    /* ring of 2 stored groups: slot g % 2 holds the sums of the group at gj[slot] from its store (one group later)
     * to its requant (two groups later), so neither the stores nor the loads of a store wait on recent work; the
     * group's tiles follow from its channel (group_tiles) */
    int64_t gj[2] = {-1, -1}, nlast;
    int64_t pj = -1, pnt = 0; /* the group still in its tiles, and its tile count */
    int set = 0, slot = 0;
    for (int64_t j = j0; j < j1; j += 32, set ^= 1) {
        const int64_t nt = group_tiles(j, j1, &nlast);
        const int8_t *w0 = a->w + (j / 16) * stride;
        int32_t *cb = cbuf + 512 * slot;
        if (gj[slot] >= 0) requant_group(a, cb, mr, i, gj[slot], j1); /* before its slot is reused */
#define GROUP(C0, C1, P0, P1)                                                                                      \
        _tile_zero(C0);                                                                                            \
        _tile_zero(C1);                                                                                            \
        for (int64_t kk = 0; kk < kc; kk += 64) {                                                                  \
            _tile_loadd(4, panel + kk * mr, 64);                                                                   \
            const int8_t *wk = w0 + kk * 16;                                                                       \
            _tile_loadd(5, wk, 64);                                                                                \
            _tile_dpbssd(C0, 4, 5);                                                                                \
            if (nt > 1) {                                                                                          \
                _tile_loadd(6, wk + stride, 64);                                                                   \
                _tile_dpbssd(C1, 4, 6);                                                                            \
            }                                                                                                      \
        }                                                                                                          \
        if (pj >= 0) {                                                                                             \
            _tile_stored(P0, cb, 64);                                                                              \
            if (pnt > 1) _tile_stored(P1, cb + 256, 64);                                                           \
        }
        if (set == 0) {
            GROUP(0, 1, 2, 3)
        } else {
            GROUP(2, 3, 0, 1)
        }
#undef GROUP
        gj[slot] = pj, slot ^= 1;
        pj = j, pnt = nt;
    }
    if (pj < 0) return; /* no channels */
    int32_t *cb = cbuf + 512 * slot;
    if (gj[slot] >= 0) requant_group(a, cb, mr, i, gj[slot], j1);
    if (set == 1) {
        _tile_stored(0, cb, 64);
        if (pnt > 1) _tile_stored(1, cb + 256, 64);
    } else {
        _tile_stored(2, cb, 64);
        if (pnt > 1) _tile_stored(3, cb + 256, 64);
    }
    requant_group(a, cb, mr, i, pj, j1);
    slot ^= 1;
    if (gj[slot] >= 0) requant_group(a, cbuf + 512 * slot, mr, i, gj[slot], j1);
}

/* a 2 x 2 block's stored sums (cbuf: tiles C0, C2, C1, C3 at 256 int32 apart) not yet requantized: block2 leaves
 * them to the next block, which requantizes one tile after each of its first k steps, so the vector work runs while
 * the tile unit multiplies (requantizing at once, between the stores and the next block's loads, idled it ~10%) */
typedef struct {
    int64_t i, j, nlast; /* rows i.., channels j..; channels in the last channel tile */
    int mr1, tiles;      /* rows of the second row tile; stored tiles (0: nothing pending) */
} pending_sums;

/* pending tile t (< p->tiles) */
static void requant_pending(const et_fc_s8_args *a, const int32_t *cbuf, const pending_sums *p, int t) {
    const int second_row = t & 1, second_ch = t >> 1;
    requant_block(a, cbuf + 256 * t, second_row ? p->mr1 : 16, p->i + 16 * second_row, p->j + 16 * second_ch,
                  second_ch || p->tiles == 2 ? p->nlast : 16);
}

/* the pending tiles from t on */
static void flush_pending(const et_fc_s8_args *a, const int32_t *cbuf, pending_sums *p, int t) {
    for (; t < p->tiles; t++) requant_pending(a, cbuf, p, t);
    p->tiles = 0;
}

/* rows i..i+16+mr1 (1 <= mr1 <= 16) x the 32-channel group at j of [j, j1): requantizes the block *p left, then
 * stores its own sums into cbuf and leaves them in *p */
static void block2(const et_fc_s8_args *a, const int8_t *panel, int64_t i, int mr1, int64_t j, int64_t j1,
                   int32_t *cbuf, pending_sums *p) {
    int64_t nlast;
    const int nt = group_tiles(j, j1, &nlast);
    const int64_t k = a->k, kp = a->kp, kc = (k + 63) / 64 * 64, stride = kp * 16;
    const int8_t *w0 = a->w + (j / 16) * stride;
    _tile_zero(0);
    _tile_zero(2);
    if (nt > 1) {
        _tile_zero(1);
        _tile_zero(3);
    }
    int t = 0; /* the pending tile requantized next */
    for (int64_t kk = 0; kk < kc; kk += 64) {
        _tile_loadd(4, panel + kk * (16 + mr1), 64);
        _tile_loadd(5, panel + kk * (16 + mr1) + 16 * 64, 64);
        const int8_t *wk = w0 + kk * 16;
        _tile_loadd(6, wk, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(2, 5, 6);
        if (nt > 1) {
            _tile_loadd(7, wk + stride, 64);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(3, 5, 7);
        }
        if (t < p->tiles) requant_pending(a, cbuf, p, t++);
    }
    flush_pending(a, cbuf, p, t); /* k shorter than the pending tiles */
    _tile_stored(0, cbuf, 64);
    _tile_stored(2, cbuf + 256, 64);
    if (nt > 1) {
        _tile_stored(1, cbuf + 512, 64);
        _tile_stored(3, cbuf + 768, 64);
    }
    *p = (pending_sums){i, j, nlast, mr1, 2 * nt};
}

/* rows i..i+mr of x -> panel[chunk][row][64] (chunk stride mr * 64 bytes), zero-padded past k: every A tile is
 * whole aligned cache lines, wherever x sits and whatever k is */
static void pack_rows(const et_fc_s8_args *a, int64_t i, int mr, int8_t *panel) {
    const int64_t k = a->k, k64 = k / 64 * 64;
    for (int r = 0; r < mr; r++) {
        const int8_t *x = a->x + (i + r) * k;
        int8_t *dst = panel + r * 64;
        int64_t kk = 0;
        for (; kk < k64; kk += 64) _mm512_store_si512((void *)(dst + kk * mr), _mm512_loadu_si512((const void *)(x + kk)));
        if (kk < k) {
            const __mmask64 m = ((__mmask64)1 << (k - kk)) - 1; /* k - kk < 64 */
            _mm512_store_si512((void *)(dst + kk * mr), _mm512_maskz_loadu_epi8(m, x + kk));
        }
    }
}

#define PANEL_STACK_BYTES (32 * 1024)

/* rows [i, i + mr) (mr <= 32) of x, packed into panel, against channels [j0, j1) */
static void rows_upto32(const et_fc_s8_args *a, int8_t *panel, int64_t i, int mr, int64_t j0, int64_t j1,
                        int32_t *cbuf) {
    pack_rows(a, i, mr, panel);
    MEMORY_BARRIER();
    if (mr <= 16) {
        configure(mr, 0);
        rows1_pipelined(a, panel, i, mr, j0, j1, cbuf);
        return;
    }
    configure(16, mr - 16);
    pending_sums p = {0};
    for (int64_t j = j0; j < j1; j += 32) block2(a, panel, i, mr - 16, j, j1, cbuf, &p);
    flush_pending(a, cbuf, &p, 0);
}

/* Whole 32-row blocks share each 32-channel group of weights: the group's B tiles (32 channels x k) are read from
 * memory for the first block and from L2 for the others, so the weights stream once per call, not once per 32 rows.
 * The rows past the last whole block run after, as rows_upto32. */
void et_fc_s8_amx(const et_fc_s8_args *a, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t kc = (a->k + 63) / 64 * 64, full = (i1 - i0) / 32, tail = (i1 - i0) - 32 * full;
    const size_t panel_bytes = (size_t)(kc * 32 * (full > 1 ? full : 1)); /* every whole block, or one */
    _Alignas(64) int8_t on_stack[PANEL_STACK_BYTES];
    int8_t *panel = panel_bytes <= sizeof on_stack ? on_stack : aligned_alloc(64, (panel_bytes + 63) / 64 * 64);
    if (!panel) { /* no memory for the panel: the VNNI kernel needs none */
        et_fc_s8_avx512vnni(a, i0, i1, j0, j1);
        return;
    }
    _Alignas(64) int32_t cbuf[4 * 16 * 16];
    if (full) {
        for (int64_t b = 0; b < full; b++) pack_rows(a, i0 + 32 * b, 32, panel + b * kc * 32);
        MEMORY_BARRIER();
        configure(16, 16);
        pending_sums p = {0};
        for (int64_t j = j0; j < j1; j += 32)
            for (int64_t b = 0; b < full; b++) block2(a, panel + b * kc * 32, i0 + 32 * b, 16, j, j1, cbuf, &p);
        flush_pending(a, cbuf, &p, 0);
    }
    if (tail) rows_upto32(a, panel, i0 + 32 * full, (int)tail, j0, j1, cbuf);
    _tile_release();
    if (panel != on_stack) free(panel);
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
