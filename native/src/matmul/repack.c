/* matmul/repack.c — GGUF block rows -> the x16 layout (core.h, docs/formats.md), and back one block at a time
 * for the reference kernel. Repacking moves bytes only: every d, m and quant keeps its value, so a product on the
 * repacked weights is the product on the GGUF rows.
 */
#include "../core.h"

/* a GGUF type the x16 layout holds (not an x16 type itself) */
static int repackable(int type) { return type == ET_TYPE_Q4_0 || type == ET_TYPE_Q4_1 || type == ET_TYPE_Q8_0; }

size_t et_repack_size(int type, int64_t n, int64_t k) {
    if (!repackable(type) || n <= 0 || k <= 0 || k % ET_QK) return 0;
    const size_t tile = et_x16_tile_bytes(type, k / ET_QK), tiles = (size_t)et_x16_tiles(n);
    if (tile == 0 || tile > SIZE_MAX / tiles) return 0; /* more bytes than an address space holds */
    return tiles * tile;
}

/* the checks both directions share: a type and shape that repack, and both buffers */
static int check_args(const char *what, int type, int64_t n, int64_t k, const void *in, const void *out) {
    if (et_repack_size(type, n, k) == 0)
        return et_error(ET_ERR_INVALID, "et_%s: cannot take type %d of shape (%lld, %lld): q4_0, q4_1 or q8_0 rows of "
                        "k %% 32 == 0 values", what, type, (long long)n, (long long)k);
    if (!in || !out) return et_error(ET_ERR_INVALID, "et_%s got a NULL buffer", what);
    return ET_OK;
}

/* the GGUF block at blk -> block b of row r of an x16 tile of nb blocks (the inverse of et_x16_get_block) */
static void x16_put_block(int base, uint8_t *tile, int64_t nb, int r, int64_t b, const uint8_t *blk) {
    uint8_t *q = tile + et_x16_quants_at(base, b), *s = tile + et_x16_scales_at(base, nb, b);
    memcpy(s + 2 * r, blk, 2);
    if (base == ET_TYPE_Q4_1) memcpy(s + 32 + 2 * r, blk + 2, 2);
    for (size_t v = 0; v < et_block_qs_bytes(base) / 4; v++)
        memcpy(q + 64 * v + 4 * r, blk + et_block_qs_at(base) + 4 * v, 4);
}

typedef struct {
    int type;
    const uint8_t *w;
    uint8_t *out;
    int64_t n, nb;
} repack_job;

/* tiles [n_tiles * ith / nth, n_tiles * (ith + 1) / nth) */
static void repack_task(void *arg, int ith, int nth) {
    const repack_job *j = arg;
    const int type = j->type;
    const int64_t nb = j->nb, tiles = et_x16_tiles(j->n);
    const size_t bs = et_row_size(type, ET_QK), rs = (size_t)nb * bs, tile_bytes = et_x16_tile_bytes(type, nb);
    const size_t used = (size_t)nb * et_x16_block_bytes(type);
    for (int64_t t = tiles * ith / nth; t < tiles * (ith + 1) / nth; t++) {
        uint8_t *tile = j->out + (size_t)t * tile_bytes;
        const int rows = j->n - 16 * t < 16 ? (int)(j->n - 16 * t) : 16;
        if (rows < 16) memset(tile, 0, used); /* missing rows: zero quants and scales */
        memset(tile + used, 0, tile_bytes - used);
        for (int r = 0; r < rows; r++)
            for (int64_t b = 0; b < nb; b++)
                x16_put_block(type, tile, nb, r, b, j->w + (size_t)(16 * t + r) * rs + (size_t)b * bs);
    }
}

int et_repack(int type, const void *w, int64_t n, int64_t k, void *out, size_t out_size) {
    const int st = check_args("repack", type, n, k, w, out);
    if (st) return st;
    const size_t need = et_repack_size(type, n, k);
    if (out_size < need)
        return et_error(ET_ERR_INVALID, "repack output of %zu bytes is too small: need %zu", out_size, need);
    repack_job job = {type, w, out, n, k / ET_QK};
    /* a model's load repacks every matrix: the tiles are independent, so the pool shares them out */
    const int nth = need < (1u << 20) ? 1 : et_get_threads();
    if (et_parallel(repack_task, &job, nth) != ET_OK) repack_task(&job, 0, 1);
    return ET_OK;
}

int et_unrepack(int type, const void *packed, int64_t n, int64_t k, void *out, size_t out_size) {
    const int st = check_args("unrepack", type, n, k, packed, out);
    if (st) return st;
    const size_t rs = et_row_size(type, k), bs = et_row_size(type, ET_QK);
    if (out_size / rs < (size_t)n)
        return et_error(ET_ERR_INVALID, "unrepack output of %zu bytes is too small: need %zu", out_size,
                        (size_t)n * rs);
    const int64_t nb = k / ET_QK;
    const size_t tile_bytes = et_x16_tile_bytes(type, nb);
    for (int64_t j = 0; j < n; j++)
        for (int64_t b = 0; b < nb; b++)
            et_x16_get_block(type, (const uint8_t *)packed + (size_t)(j / 16) * tile_bytes, nb, (int)(j % 16), b,
                             (uint8_t *)out + (size_t)j * rs + (size_t)b * bs);
    return ET_OK;
}

int et_repack_native(int type) {
    const et_kernels *kt = et_active_kernels();
    return et_x16_base(type | ET_TYPE_X16) >= 0 && et_has_x16(kt) && kt != &et_kernels_ref;
}
