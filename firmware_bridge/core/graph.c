/* graph.c — parse/check a graph blob and run it: the int8/int4 op set of PROTOCOL.md "Ops".
 *
 * Every check a kernel relies on (counts, dtypes, shapes, byte sizes, attribute ranges) is made in the parser, so
 * the kernels below index without checking. Requantization follows onnxruntime's MlasRequantizeOutput bit for bit:
 * float(acc) * (s_in * s_w / s_out), clamped to the output range less the zero point, rounded half to even through
 * the 1.5 * 2^23 magic number, plus the zero point. The q-block matmul is the C core's reference kernel itself
 * (native/src/matmul/ref.c, native/src/quant/ref.c are compiled into the firmware, not copied).
 *
 * The TFLite-semantics INT8 ops (codes 11-16) follow LiteRT's default CPU path (XNNPACK): FULLY_CONNECTED is the
 * C core's own reference kernel et_fc_s8_ref (native/src/fc_s8/ref.c, compiled in) on weights, row constants and
 * scales the host laid out as the C core's plan holds them; CONV_2D / DEPTHWISE_CONV_2D accumulate int32 (padding
 * taps contribute nothing) and requantize in fp32 with the host's per-channel scale (s_in * s_w[c] / s_out,
 * float32), clamped, rounded half to even (the requantization above, which XNNPACK's fp32 one equals); ADD is XNNPACK's
 * fixed-point qs8 add with the multipliers, bias and shift the host derived; AVERAGE_POOL_2D is TFLite's integer
 * mean over the taps inside the input, rounded half away from zero (XNNPACK does not take int8 average pooling).
 */
#include <float.h>
#include <string.h>

#include "graph.h"
#include "fw.h"
#include "../../native/src/core.h"
#include "../../native/src/fc_s8/fc_s8.h"

#define FAIL(code, text) do { *msg = (text); return (code); } while (0)

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t dtype_size(uint8_t dt) {
    switch (dt) {
    case FW_DT_INT8: case FW_DT_UINT8: return 1;
    case FW_DT_INT32: case FW_DT_FLOAT32: return 4;
    case FW_DT_INT64: return 8;
    default: return 0;
    }
}

static uint32_t block_bytes(uint8_t dt) {
    return dt == FW_DT_Q4_0 ? 18u : dt == FW_DT_Q4_1 ? 20u : dt == FW_DT_Q8_0 ? 34u : 0u;
}

static uint64_t numel(const fw_tensor *t) {
    uint64_t n = 1;
    for (int i = 0; i < t->rank; i++) n *= t->dims[i];
    return n;
}

/* ---- parsing ---- */

typedef struct {
    const uint8_t *p, *end;
    int bad;
} reader;

static const uint8_t *take(reader *r, uint32_t n) {
    if (r->bad || (uint32_t)(r->end - r->p) < n) { r->bad = 1; return NULL; }
    const uint8_t *q = r->p;
    r->p += n;
    return q;
}
static uint32_t u8(reader *r) { const uint8_t *q = take(r, 1); return q ? q[0] : 0; }
static uint32_t u16(reader *r) { const uint8_t *q = take(r, 2); return q ? rd16(q) : 0; }
static uint32_t u32(reader *r) { const uint8_t *q = take(r, 4); return q ? rd32(q) : 0; }

static int is_q8(uint8_t dt) { return dt == FW_DT_INT8 || dt == FW_DT_UINT8; }

static const fw_tensor *in_t(const fw_graph *g, const fw_node *n, int i) {
    return (i < n->n_in && n->in[i] != 0xFFFF) ? &g->t[n->in[i]] : NULL;
}

/* a scalar (or per-channel of length ch, when ch > 0) constant of dtype dt */
static int param_ok(const fw_tensor *t, uint8_t dt, uint32_t ch) {
    if (t == NULL || !t->is_const || t->dtype != dt) return 0;
    uint64_t n = numel(t);
    return n == 1 || (ch > 0 && n == ch && t->rank == 1);
}
static int opt_param_ok(const fw_tensor *t, uint8_t dt, uint32_t ch) { return t == NULL || param_ok(t, dt, ch); }

static float f32_at(const fw_tensor *t, uint32_t i) {
    float v;
    memcpy(&v, t->data + 4u * (numel(t) == 1 ? 0 : i), 4);
    return v;
}
/* QLinearMatMul / QLinearConv (params checked by param_ok): every output channel's requantization scale
 * s_a * s_b[c] / s_y, in float32 as the kernels compute it, is a positive finite float. Anything else (a zero,
 * negative, NaN or overflowing scale) has no meaning the kernels could share with onnxruntime's. */
static int qlinear_scales_ok(const fw_tensor *sa, const fw_tensor *sb, const fw_tensor *sy, uint32_t ch) {
    for (uint32_t c = 0; c < ch; c++) {
        float v = f32_at(sa, 0) * f32_at(sb, c) / f32_at(sy, 0);
        if (!(v > 0.0f && v <= FLT_MAX)) return 0;
    }
    return 1;
}
static int32_t zp_at(const fw_tensor *t, uint32_t i) {
    if (t == NULL) return 0;
    uint32_t k = numel(t) == 1 ? 0 : i;
    return t->dtype == FW_DT_INT8 ? (int32_t)(int8_t)t->data[k] : (int32_t)t->data[k];
}
static int32_t q_at(const uint8_t *p, uint8_t dt, size_t i) {
    return dt == FW_DT_INT8 ? (int32_t)(int8_t)p[i] : (int32_t)p[i];
}

static int32_t i32_at(const fw_tensor *t, uint32_t i) {
    int32_t v;
    memcpy(&v, t->data + 4u * i, 4);
    return v;
}
static int in_i8(int32_t v) { return v >= -128 && v <= 127; }
static uint32_t round_up_u32(uint32_t v, uint32_t a) { return (v + a - 1) / a * a; }

/* requantization scales of the TFLite ops: one float32 per output channel, finite, in (0, 256) (XNNPACK's range) */
static int scales_ok(const fw_tensor *s, uint32_t ch) {
    if (s == NULL || !s->is_const || s->dtype != FW_DT_FLOAT32 || numel(s) != ch || s->rank != 1) return 0;
    for (uint32_t i = 0; i < ch; i++) {
        float v = f32_at(s, i);
        if (!(v > 0.0f && v < 256.0f)) return 0;
    }
    return 1;
}
static int bias_ok(const fw_tensor *b, uint32_t ch) {
    return b == NULL || (b->is_const && b->dtype == FW_DT_INT32 && numel(b) == ch && b->rank == 1);
}

/* the TFLite ops' NHWC output size along one spatial axis (pads, strides and dilations checked by the caller) */
static int64_t out_dim(uint32_t in, int32_t pa, int32_t pb, uint32_t k, int32_t s, int32_t d) {
    int64_t e = (int64_t)in + pa + pb - (int64_t)d * (k - 1) - 1;
    return e < 0 ? -1 : e / s + 1;
}

/* whether a and b broadcast (numpy rules, right-aligned) to exactly y's shape */
static int broadcasts_to(const fw_tensor *a, const fw_tensor *b, const fw_tensor *y) {
    const int r = y->rank;
    if (a->rank > r || b->rank > r) return 0;
    for (int i = 0; i < r; i++) {
        uint32_t da = i >= r - a->rank ? a->dims[i - (r - a->rank)] : 1;
        uint32_t db = i >= r - b->rank ? b->dims[i - (r - b->rank)] : 1;
        if (!((da == y->dims[i] || da == 1) && (db == y->dims[i] || db == 1))) return 0;
    }
    return 1;
}

static int check_fc_s8(fw_graph *g, fw_node *n, const char **msg) {
    const fw_tensor *x = in_t(g, n, 0), *w = in_t(g, n, 1), *rowc = in_t(g, n, 2), *sc = in_t(g, n, 3);
    const fw_tensor *y = &g->t[n->out[0]];
    if (n->n_in != 4 || n->n_attr != 5 || w == NULL) FAIL(FW_ERR_GRAPH, "FC_S8: x, w, rowc, scale; 5 attributes");
    if (x->dtype != FW_DT_INT8 || y->dtype != FW_DT_INT8 || w->dtype != FW_DT_INT8 || !w->is_const || w->rank != 2)
        FAIL(FW_ERR_UNSUPPORTED, "FC_S8: int8 x and y, constant packed int8 weights");
    const int32_t nn = n->attr[0], k = n->attr[1], yzp = n->attr[2], lo = n->attr[3], hi = n->attr[4];
    if (nn < 1 || k < 1 || nn > (1 << 20) || k > (1 << 20) || !in_i8(yzp) || !in_i8(lo) || !in_i8(hi) || lo > hi)
        FAIL(FW_ERR_GRAPH, "FC_S8: bad attributes");
    const uint32_t N = (uint32_t)nn, K = (uint32_t)k;
    const uint64_t m = numel(x) / K;
    if (numel(x) % K || numel(y) != m * N) FAIL(FW_ERR_SHAPE, "FC_S8: x (M*K elements), y (M*N elements)");
    /* the C core's packed layout (native/src/fc_s8/fc_s8.h): N rounded up to 16 channels, K to 4 */
    if (w->dims[0] != round_up_u32(N, 16) / 16 || w->dims[1] != round_up_u32(K, 4) * 16)
        FAIL(FW_ERR_SHAPE, "FC_S8: packed weights must be (ceil(N/16), 16 * ceil(K/4))");
    if (rowc == NULL || !rowc->is_const || rowc->dtype != FW_DT_INT32 || rowc->rank != 1 || numel(rowc) != N ||
        !scales_ok(sc, N))
        FAIL(FW_ERR_GRAPH, "FC_S8: rowc int32 (N), scale float32 (N) in (0, 256)");
    g->ops += 2 * m * N * K;
    return 0;
}

static int check_conv_s8(fw_graph *g, fw_node *n, const char **msg) {
    const int dw = n->op == FW_OP_DWCONV2D_S8;
    const fw_tensor *x = in_t(g, n, 0), *w = in_t(g, n, 1), *bias = in_t(g, n, 2), *sc = in_t(g, n, 3);
    const fw_tensor *y = &g->t[n->out[0]];
    if (n->n_in != 4 || n->n_attr != 12 || w == NULL) FAIL(FW_ERR_GRAPH, "CONV2D_S8: x, w, [bias], scale; 12 attributes");
    if (x->dtype != FW_DT_INT8 || y->dtype != FW_DT_INT8 || w->dtype != FW_DT_INT8 || !w->is_const)
        FAIL(FW_ERR_UNSUPPORTED, "CONV2D_S8: int8 x and y, constant int8 filter");
    if (x->rank != 4 || w->rank != 4 || y->rank != 4) FAIL(FW_ERR_SHAPE, "CONV2D_S8: NHWC x and y, 4-D filter");
    const int32_t sh = n->attr[0], sw = n->attr[1], pt = n->attr[2], pl = n->attr[3], pb = n->attr[4], pr = n->attr[5],
                  dh = n->attr[6], dwi = n->attr[7], xzp = n->attr[8], yzp = n->attr[9], lo = n->attr[10], hi = n->attr[11];
    if (sh < 1 || sw < 1 || dh < 1 || dwi < 1 || sh > 255 || sw > 255 || dh > 255 || dwi > 255 || pt < 0 || pl < 0 ||
        pb < 0 || pr < 0 || pt > 255 || pl > 255 || pb > 255 || pr > 255 || !in_i8(xzp) || !in_i8(yzp) || !in_i8(lo) ||
        !in_i8(hi) || lo > hi)
        FAIL(FW_ERR_GRAPH, "CONV2D_S8: bad attributes");
    const uint32_t C = x->dims[3], kh = w->dims[1], kw = w->dims[2];
    const uint32_t O = dw ? w->dims[3] : w->dims[0];
    if (kh == 0 || kw == 0 || C == 0 || O == 0) FAIL(FW_ERR_SHAPE, "CONV2D_S8: empty filter or channels");
    if (dw ? (w->dims[0] != 1 || O % C) : w->dims[3] != C)
        FAIL(FW_ERR_SHAPE, "CONV2D_S8: filter (O,kh,kw,C); depthwise (1,kh,kw,C*multiplier)");
    int64_t oh = out_dim(x->dims[1], pt, pb, kh, sh, dh), ow = out_dim(x->dims[2], pl, pr, kw, sw, dwi);
    if (oh < 0 || ow < 0) FAIL(FW_ERR_SHAPE, "CONV2D_S8: kernel larger than the padded input");
    if (y->dims[0] != x->dims[0] || y->dims[1] != (uint64_t)oh || y->dims[2] != (uint64_t)ow || y->dims[3] != O)
        FAIL(FW_ERR_SHAPE, "CONV2D_S8: output shape");
    if (!bias_ok(bias, O) || !scales_ok(sc, O)) FAIL(FW_ERR_GRAPH, "CONV2D_S8: bias int32 (O), scale float32 (O) in (0, 256)");
    g->ops += 2 * numel(y) * (uint64_t)kh * kw * (dw ? 1u : C);
    return 0;
}

static int check_node(fw_graph *g, fw_node *n, const char **msg) {
    const fw_tensor *y = &g->t[n->out[0]];
    const fw_tensor *a = in_t(g, n, 0), *b = in_t(g, n, 1);
    if (a == NULL) FAIL(FW_ERR_GRAPH, "node without its first input");
    switch (n->op) {
    case FW_OP_MATMUL_INTEGER:
    case FW_OP_QLINEAR_MATMUL: {
        int q = n->op == FW_OP_QLINEAR_MATMUL;
        if (q) b = in_t(g, n, 3);
        if (b == NULL || !is_q8(a->dtype) || !is_q8(b->dtype)) FAIL(FW_ERR_UNSUPPORTED, "matmul needs int8/uint8 A and B");
        if (a->rank < 2 || b->rank != 2 || a->dims[a->rank - 1] != b->dims[0]) FAIL(FW_ERR_SHAPE, "matmul: A (..,M,K) B (K,N)");
        if (b->dims[0] == 0) FAIL(FW_ERR_SHAPE, "matmul: K is 0");
        uint32_t nn = b->dims[1];
        if (y->rank != a->rank || y->dims[y->rank - 1] != nn) FAIL(FW_ERR_SHAPE, "matmul: output shape");
        for (int i = 0; i + 1 < a->rank; i++)
            if (y->dims[i] != a->dims[i]) FAIL(FW_ERR_SHAPE, "matmul: output shape");
        if (q) {
            if (n->n_in != 8 || !param_ok(in_t(g, n, 1), FW_DT_FLOAT32, 0) || !param_ok(in_t(g, n, 2), a->dtype, 0) ||
                !param_ok(in_t(g, n, 4), FW_DT_FLOAT32, nn) || !param_ok(in_t(g, n, 5), b->dtype, nn) ||
                !param_ok(in_t(g, n, 6), FW_DT_FLOAT32, 0) || !is_q8(y->dtype) || !param_ok(in_t(g, n, 7), y->dtype, 0))
                FAIL(FW_ERR_GRAPH, "QLinearMatMul: scales/zero points must be constants of the right dtype");
            if (!qlinear_scales_ok(in_t(g, n, 1), in_t(g, n, 4), in_t(g, n, 6), nn))
                FAIL(FW_ERR_GRAPH, "QLinearMatMul: s_a * s_b / s_y must be a positive finite float32");
        } else {
            if (n->n_in > 4 || y->dtype != FW_DT_INT32 || !opt_param_ok(in_t(g, n, 2), a->dtype, 0) ||
                !opt_param_ok(in_t(g, n, 3), b->dtype, nn))
                FAIL(FW_ERR_GRAPH, "MatMulInteger: int32 output, constant zero points");
        }
        uint64_t macs = numel(y) * a->dims[a->rank - 1];
        g->ops += 2 * macs;
        return 0;
    }
    case FW_OP_CONV_INTEGER:
    case FW_OP_QLINEAR_CONV: {
        int q = n->op == FW_OP_QLINEAR_CONV;
        const fw_tensor *w = q ? in_t(g, n, 3) : b;
        if (w == NULL || !is_q8(a->dtype) || !is_q8(w->dtype)) FAIL(FW_ERR_UNSUPPORTED, "conv needs int8/uint8 x and w");
        if (a->rank != 4 || w->rank != 4 || y->rank != 4 || n->n_attr != 9) FAIL(FW_ERR_SHAPE, "conv: 2-D (NCHW) only");
        int32_t grp = n->attr[0], sh = n->attr[1], sw = n->attr[2], pt = n->attr[3], pl = n->attr[4], pb = n->attr[5],
                pr = n->attr[6], dh = n->attr[7], dw = n->attr[8];
        if (grp < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || pt < 0 || pl < 0 || pb < 0 || pr < 0 || pt > 255 ||
            pl > 255 || pb > 255 || pr > 255 || sh > 255 || sw > 255 || dh > 255 || dw > 255)
            FAIL(FW_ERR_GRAPH, "conv: bad attributes");
        uint32_t N = a->dims[0], C = a->dims[1], H = a->dims[2], W = a->dims[3];
        uint32_t M = w->dims[0], kh = w->dims[2], kw = w->dims[3];
        if (C % (uint32_t)grp || M % (uint32_t)grp || w->dims[1] != C / (uint32_t)grp || kh == 0 || kw == 0)
            FAIL(FW_ERR_SHAPE, "conv: channels do not fit the group");
        int64_t eh = (int64_t)H + pt + pb - (int64_t)dh * (kh - 1) - 1, ew = (int64_t)W + pl + pr - (int64_t)dw * (kw - 1) - 1;
        if (eh < 0 || ew < 0) FAIL(FW_ERR_SHAPE, "conv: kernel larger than the padded input");
        if (y->dims[0] != N || y->dims[1] != M || y->dims[2] != (uint32_t)(eh / sh + 1) || y->dims[3] != (uint32_t)(ew / sw + 1))
            FAIL(FW_ERR_SHAPE, "conv: output shape");
        if (q) {
            if (n->n_in < 8 || n->n_in > 9 || !param_ok(in_t(g, n, 1), FW_DT_FLOAT32, 0) ||
                !param_ok(in_t(g, n, 2), a->dtype, 0) || !param_ok(in_t(g, n, 4), FW_DT_FLOAT32, M) ||
                !param_ok(in_t(g, n, 5), w->dtype, M) || !param_ok(in_t(g, n, 6), FW_DT_FLOAT32, 0) || !is_q8(y->dtype) ||
                !param_ok(in_t(g, n, 7), y->dtype, 0))
                FAIL(FW_ERR_GRAPH, "QLinearConv: scales/zero points must be constants of the right dtype");
            if (!qlinear_scales_ok(in_t(g, n, 1), in_t(g, n, 4), in_t(g, n, 6), M))
                FAIL(FW_ERR_GRAPH, "QLinearConv: s_x * s_w / s_y must be a positive finite float32");
            const fw_tensor *bias = in_t(g, n, 8);
            if (bias && (bias->dtype != FW_DT_INT32 || numel(bias) != M || !bias->is_const))
                FAIL(FW_ERR_GRAPH, "QLinearConv: bias must be a constant int32 (M)");
        } else {
            if (n->n_in > 4 || y->dtype != FW_DT_INT32 || !opt_param_ok(in_t(g, n, 2), a->dtype, 0) ||
                !opt_param_ok(in_t(g, n, 3), w->dtype, M))
                FAIL(FW_ERR_GRAPH, "ConvInteger: int32 output, constant zero points");
        }
        g->ops += 2 * numel(y) * (uint64_t)(C / (uint32_t)grp) * kh * kw;
        return 0;
    }
    case FW_OP_ADD:
    case FW_OP_MUL: {
        if (b == NULL || n->n_in != 2 || a->dtype != b->dtype || a->dtype != y->dtype ||
            !(a->dtype == FW_DT_INT32 || a->dtype == FW_DT_INT8))
            FAIL(FW_ERR_UNSUPPORTED, "Add/Mul: int32 (or int8) operands of one dtype");
        if (!broadcasts_to(a, b, y)) FAIL(FW_ERR_SHAPE, "Add/Mul: broadcast shape");
        g->ops += numel(y);
        return 0;
    }
    case FW_OP_RELU:
    case FW_OP_CLIP:
        if (!(a->dtype == FW_DT_INT8 || a->dtype == FW_DT_INT32 || a->dtype == FW_DT_UINT8) || y->dtype != a->dtype ||
            numel(y) != numel(a))
            FAIL(FW_ERR_UNSUPPORTED, "Relu/Clip: int8/uint8/int32, same shape");
        if (n->op == FW_OP_CLIP && n->n_attr != 2) FAIL(FW_ERR_GRAPH, "Clip: two attributes (min, max)");
        g->ops += numel(y);
        return 0;
    case FW_OP_COPY:
        if (y->nbytes != a->nbytes || y->dtype != a->dtype) FAIL(FW_ERR_SHAPE, "reshape: same bytes and dtype");
        return 0;
    case FW_OP_FC_S8:
        return check_fc_s8(g, n, msg);
    case FW_OP_CONV2D_S8:
    case FW_OP_DWCONV2D_S8:
        return check_conv_s8(g, n, msg);
    case FW_OP_ADD_S8: {
        if (b == NULL || n->n_in != 2 || n->n_attr != 7 || a->dtype != FW_DT_INT8 || b->dtype != FW_DT_INT8 ||
            y->dtype != FW_DT_INT8)
            FAIL(FW_ERR_UNSUPPORTED, "ADD_S8: two int8 operands, int8 output; 7 attributes");
        if (n->attr[3] < 0 || n->attr[3] > 31 || !in_i8(n->attr[4]) || !in_i8(n->attr[5]) || !in_i8(n->attr[6]) ||
            n->attr[5] > n->attr[6])
            FAIL(FW_ERR_GRAPH, "ADD_S8: bad attributes");
        if (!broadcasts_to(a, b, y)) FAIL(FW_ERR_SHAPE, "ADD_S8: broadcast shape");
        g->ops += numel(y);
        return 0;
    }
    case FW_OP_AVGPOOL_S8: {
        if (n->n_in != 1 || n->n_attr != 10 || a->dtype != FW_DT_INT8 || y->dtype != FW_DT_INT8)
            FAIL(FW_ERR_UNSUPPORTED, "AVGPOOL_S8: int8 in and out; 10 attributes");
        if (a->rank != 4 || y->rank != 4) FAIL(FW_ERR_SHAPE, "AVGPOOL_S8: NHWC");
        /* with H or W 0 a window holds no tap of the input (cnt 0, the kernel's divisor) however it is padded */
        if (a->dims[1] == 0 || a->dims[2] == 0) FAIL(FW_ERR_SHAPE, "AVGPOOL_S8: input H or W is 0");
        const int32_t *at = n->attr;
        if (at[0] < 1 || at[1] < 1 || at[0] > 255 || at[1] > 255 || at[2] < 1 || at[3] < 1 || at[2] > 255 ||
            at[3] > 255 || at[4] < 0 || at[5] < 0 || at[6] < 0 || at[7] < 0 || at[4] >= at[0] || at[6] >= at[0] ||
            at[5] >= at[1] || at[7] >= at[1] || !in_i8(at[8]) || !in_i8(at[9]) || at[8] > at[9])
            FAIL(FW_ERR_GRAPH, "AVGPOOL_S8: bad attributes (every pad smaller than the window)");
        int64_t oh = out_dim(a->dims[1], at[4], at[6], (uint32_t)at[0], at[2], 1);
        int64_t ow = out_dim(a->dims[2], at[5], at[7], (uint32_t)at[1], at[3], 1);
        if (oh < 1 || ow < 1 || y->dims[0] != a->dims[0] || y->dims[1] != (uint64_t)oh || y->dims[2] != (uint64_t)ow ||
            y->dims[3] != a->dims[3])
            FAIL(FW_ERR_SHAPE, "AVGPOOL_S8: output shape");
        g->ops += numel(y) * (uint64_t)at[0] * at[1];
        return 0;
    }
    case FW_OP_CONCAT: {
        if (n->n_attr != 1 || n->attr[0] < 0 || n->attr[0] >= y->rank) FAIL(FW_ERR_GRAPH, "Concat: axis attribute");
        const int ax = n->attr[0];
        uint64_t sum = 0;
        for (int k = 0; k < n->n_in; k++) {
            const fw_tensor *t = in_t(g, n, k);
            if (t == NULL || t->dtype != y->dtype || t->rank != y->rank || dtype_size(t->dtype) == 0)
                FAIL(FW_ERR_SHAPE, "Concat: inputs of the output's dtype and rank");
            for (int d = 0; d < y->rank; d++)
                if (d != ax && t->dims[d] != y->dims[d]) FAIL(FW_ERR_SHAPE, "Concat: dims differ off the axis");
            sum += t->dims[ax];
        }
        if (sum != y->dims[ax]) FAIL(FW_ERR_SHAPE, "Concat: output size along the axis");
        return 0;
    }
    case FW_OP_MATMUL_QBLOCK: {
        if (b == NULL || a->dtype != FW_DT_FLOAT32 || y->dtype != FW_DT_FLOAT32 || block_bytes(b->dtype) == 0)
            FAIL(FW_ERR_UNSUPPORTED, "q-block matmul: float32 x, q4_0/q4_1/q8_0 weights");
        if (a->rank != 2 || b->rank != 2 || y->rank != 2 || a->dims[1] != b->dims[1] || a->dims[1] % ET_QK ||
            y->dims[0] != a->dims[0] || y->dims[1] != b->dims[0])
            FAIL(FW_ERR_SHAPE, "q-block matmul: x (M,K), w (N,K), y (M,N), K a multiple of 32");
        uint64_t s = (uint64_t)a->dims[0] * (a->dims[1] / ET_QK) * sizeof(block_q8_s);
        if (s > 0x40000000u) FAIL(FW_ERR_NOMEM, "q-block matmul: scratch too large");
        if (s > g->scratch_bytes) g->scratch_bytes = (uint32_t)s;
        g->ops += 2 * numel(y) * a->dims[1];
        return 0;
    }
    default:
        FAIL(FW_ERR_UNSUPPORTED, "unknown op");
    }
}

int fw_graph_parse(fw_graph *g, uint8_t *blob, uint32_t len, const char **msg) {
    reader r = {blob, blob + len, 0};
    memset(g, 0, sizeof *g);
    if (u32(&r) != 0x46524745u) FAIL(FW_ERR_GRAPH, "graph blob: bad magic (expected EGRF)");
    g->n_tensors = (uint16_t)u16(&r);
    g->n_nodes = (uint16_t)u16(&r);
    g->n_inputs = (uint16_t)u16(&r);
    g->n_outputs = (uint16_t)u16(&r);
    if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
    if (g->n_tensors > FW_MAX_TENSORS || g->n_nodes > FW_MAX_NODES || g->n_inputs > FW_MAX_IO ||
        g->n_outputs > FW_MAX_IO || g->n_outputs == 0)
        FAIL(FW_ERR_GRAPH, "graph blob: too many tensors/nodes/io for this firmware");
    for (uint32_t i = 0; i < g->n_tensors; i++) {
        fw_tensor *t = &g->t[i];
        t->dtype = (uint8_t)u8(&r);
        t->rank = (uint8_t)u8(&r);
        t->is_const = (uint8_t)u8(&r);
        (void)u8(&r);
        /* truncation first: the reader gives 0 past the end, which reads as a wrong field (dtype 0: unknown) */
        if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
        if (t->rank > FW_MAX_RANK || t->is_const > 1) FAIL(FW_ERR_GRAPH, "graph blob: tensor rank > 4");
        uint64_t n = 1;
        for (int d = 0; d < t->rank; d++) {
            t->dims[d] = u32(&r);
            n *= t->dims[d];
            if (n > 0x40000000u) FAIL(FW_ERR_GRAPH, "graph blob: tensor too large");
        }
        if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
        uint64_t nb;
        if (block_bytes(t->dtype)) {
            if (t->rank != 2 || t->dims[1] % ET_QK) FAIL(FW_ERR_GRAPH, "graph blob: block tensor must be (N, K%32==0)");
            nb = (uint64_t)t->dims[0] * (t->dims[1] / ET_QK) * block_bytes(t->dtype);
        } else {
            if (dtype_size(t->dtype) == 0) FAIL(FW_ERR_UNSUPPORTED, "graph blob: unknown dtype");
            nb = n * dtype_size(t->dtype);
        }
        if (nb > 0x40000000u) FAIL(FW_ERR_GRAPH, "graph blob: tensor too large");
        t->nbytes = (uint32_t)nb;
        if (t->is_const) {
            uint32_t nbytes = u32(&r), off = u32(&r);
            if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
            if (nbytes != t->nbytes || off % 8 || off > len || len - off < nbytes)
                FAIL(FW_ERR_GRAPH, "graph blob: constant data out of the blob or misaligned");
            t->data = blob + off;
        } else if (t->dtype == FW_DT_FLOAT32 || t->dtype == FW_DT_INT64) {
            /* float only for the q-block matmul's activations (checked per node) */
        }
    }
    for (uint32_t i = 0; i < g->n_nodes; i++) {
        fw_node *n = &g->node[i];
        n->op = (uint8_t)u8(&r);
        n->n_in = (uint8_t)u8(&r);
        n->n_out = (uint8_t)u8(&r);
        n->n_attr = (uint8_t)u8(&r);
        if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
        if (n->n_in == 0 || n->n_in > FW_MAX_NODE_IN || n->n_out != 1 || n->n_attr > FW_MAX_ATTR)
            FAIL(FW_ERR_GRAPH, "graph blob: node input/output/attribute counts");
        for (int k = 0; k < n->n_in; k++) {
            n->in[k] = (uint16_t)u16(&r);
            if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
            if (n->in[k] != 0xFFFF && n->in[k] >= g->n_tensors) FAIL(FW_ERR_GRAPH, "graph blob: node input id");
        }
        n->out[0] = (uint16_t)u16(&r);
        if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
        if (n->out[0] >= g->n_tensors || g->t[n->out[0]].is_const) FAIL(FW_ERR_GRAPH, "graph blob: node output id");
        for (int k = 0; k < n->n_attr; k++) n->attr[k] = (int32_t)u32(&r);
        if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
    }
    for (uint32_t i = 0; i < g->n_inputs; i++) g->inputs[i] = (uint16_t)u16(&r);
    for (uint32_t i = 0; i < g->n_outputs; i++) g->outputs[i] = (uint16_t)u16(&r);
    if (r.bad) FAIL(FW_ERR_GRAPH, "graph blob: truncated");
    /* io tensors: in range, not constant, not both; every other non-const tensor is an activation */
    uint8_t role[FW_MAX_TENSORS] = {0}; /* 1 input, 2 output, 3 produced */
    for (uint32_t i = 0; i < g->n_inputs; i++) {
        if (g->inputs[i] >= g->n_tensors || g->t[g->inputs[i]].is_const || role[g->inputs[i]])
            FAIL(FW_ERR_GRAPH, "graph blob: bad input id");
        role[g->inputs[i]] = 1;
    }
    for (uint32_t i = 0; i < g->n_outputs; i++) {
        if (g->outputs[i] >= g->n_tensors || g->t[g->outputs[i]].is_const || role[g->outputs[i]])
            FAIL(FW_ERR_GRAPH, "graph blob: bad output id");
        role[g->outputs[i]] = 2;
    }
    /* nodes in execution order: every input defined before use, every output written once */
    uint8_t ready[FW_MAX_TENSORS] = {0};
    for (uint32_t i = 0; i < g->n_tensors; i++) ready[i] = g->t[i].is_const || role[i] == 1;
    uint64_t act = 0;
    for (uint32_t i = 0; i < g->n_nodes; i++) {
        fw_node *n = &g->node[i];
        for (int k = 0; k < n->n_in; k++)
            if (n->in[k] != 0xFFFF && !ready[n->in[k]]) FAIL(FW_ERR_GRAPH, "graph blob: node reads a tensor before it is written");
        if (ready[n->out[0]]) FAIL(FW_ERR_GRAPH, "graph blob: tensor written twice");
        ready[n->out[0]] = 1;
        int rc = check_node(g, n, msg);
        if (rc) return rc;
        if (role[n->out[0]] == 0) act += (g->t[n->out[0]].nbytes + 7u) & ~7u;
    }
    for (uint32_t i = 0; i < g->n_outputs; i++)
        if (!ready[g->outputs[i]]) FAIL(FW_ERR_GRAPH, "graph blob: an output no node writes");
    act += g->scratch_bytes;
    if (act > 0x40000000u) FAIL(FW_ERR_NOMEM, "graph activations too large");
    g->act_bytes = (uint32_t)act;
    return 0;
}

/* ---- kernels ---- */

static int8_t clamp_i8(int32_t v) { return (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); }

/* onnxruntime's MlasRequantizeOutput, scalar form */
static int32_t requant(int32_t acc, float scale, int32_t zp, int32_t qmin, int32_t qmax) {
    float v = (float)acc * scale;
    float lo = (float)(qmin - zp), hi = (float)(qmax - zp);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    uint32_t bits;
    float m = v + 12582912.0f; /* 1.5 * 2^23: rounds half to even in the current (nearest) mode */
    memcpy(&bits, &m, 4);
    return (int32_t)bits - 0x4B400000 + zp;
}

static void store_q(uint8_t *p, uint8_t dt, size_t i, int32_t v) {
    if (dt == FW_DT_INT8) p[i] = (uint8_t)(int8_t)v;
    else p[i] = (uint8_t)v;
}

static void run_matmul(const fw_graph *g, const fw_node *n) {
    int q = n->op == FW_OP_QLINEAR_MATMUL;
    const fw_tensor *a = in_t(g, n, 0), *b = in_t(g, n, q ? 3 : 1), *y = &g->t[n->out[0]];
    const fw_tensor *azp = in_t(g, n, 2), *bzp = in_t(g, n, q ? 5 : 3);
    uint32_t K = b->dims[0], N = b->dims[1];
    uint64_t M = numel(a) / K;
    int32_t za = zp_at(azp, 0), qmin = y->dtype == FW_DT_INT8 ? -128 : 0, qmax = y->dtype == FW_DT_INT8 ? 127 : 255;
    for (uint64_t i = 0; i < M; i++) {
        for (uint32_t j = 0; j < N; j++) {
            int32_t zb = zp_at(bzp, j);
            uint32_t acc = 0; /* int32 sums wrap, as onnxruntime's */
            for (uint32_t k = 0; k < K; k++)
                acc += (uint32_t)(q_at(a->data, a->dtype, i * K + k) - za) * (q_at(b->data, b->dtype, (size_t)k * N + j) - zb);
            if (q) {
                const fw_tensor *as = in_t(g, n, 1), *bs = in_t(g, n, 4), *ys = in_t(g, n, 6);
                float scale = f32_at(as, 0) * f32_at(bs, j) / f32_at(ys, 0);
                store_q(y->data, y->dtype, i * N + j, requant((int32_t)acc, scale, zp_at(in_t(g, n, 7), 0), qmin, qmax));
            } else {
                memcpy(y->data + 4 * (i * N + j), &acc, 4);
            }
        }
    }
}

static void run_conv(const fw_graph *g, const fw_node *n) {
    int q = n->op == FW_OP_QLINEAR_CONV;
    const fw_tensor *x = in_t(g, n, 0), *w = in_t(g, n, q ? 3 : 1), *y = &g->t[n->out[0]];
    const fw_tensor *xzp = in_t(g, n, 2), *wzp = in_t(g, n, q ? 5 : 3), *bias = q ? in_t(g, n, 8) : NULL;
    const int32_t grp = n->attr[0], sh = n->attr[1], sw = n->attr[2], pt = n->attr[3], pl = n->attr[4],
                  dh = n->attr[7], dw = n->attr[8];
    const int32_t N = (int32_t)x->dims[0], C = (int32_t)x->dims[1], H = (int32_t)x->dims[2], W = (int32_t)x->dims[3];
    const int32_t M = (int32_t)w->dims[0], kh = (int32_t)w->dims[2], kw = (int32_t)w->dims[3];
    const int32_t OH = (int32_t)y->dims[2], OW = (int32_t)y->dims[3], cg = C / grp, mg = M / grp;
    const int32_t zx = zp_at(xzp, 0);
    const int32_t qmin = y->dtype == FW_DT_INT8 ? -128 : 0, qmax = y->dtype == FW_DT_INT8 ? 127 : 255;
    for (int32_t b = 0; b < N; b++)
        for (int32_t m = 0; m < M; m++) {
            const int32_t gi = m / mg, zw = zp_at(wzp, (uint32_t)m);
            int32_t b0 = 0;
            if (bias) memcpy(&b0, bias->data + 4 * m, 4);
            float scale = q ? f32_at(in_t(g, n, 1), 0) * f32_at(in_t(g, n, 4), (uint32_t)m) / f32_at(in_t(g, n, 6), 0) : 0;
            for (int32_t oh = 0; oh < OH; oh++)
                for (int32_t ow = 0; ow < OW; ow++) {
                    uint32_t acc = (uint32_t)b0; /* int32 sums wrap, as onnxruntime's */
                    for (int32_t c = 0; c < cg; c++) {
                        const size_t xc = ((size_t)b * C + (size_t)(gi * cg + c)) * H * W;
                        const size_t wc = ((size_t)m * cg + c) * kh * kw;
                        for (int32_t i = 0; i < kh; i++) {
                            const int32_t ih = oh * sh - pt + i * dh;
                            if (ih < 0 || ih >= H) continue;
                            for (int32_t j = 0; j < kw; j++) {
                                const int32_t iw = ow * sw - pl + j * dw;
                                if (iw < 0 || iw >= W) continue;
                                acc += (uint32_t)((q_at(x->data, x->dtype, xc + (size_t)ih * W + iw) - zx) *
                                                  (q_at(w->data, w->dtype, wc + (size_t)i * kw + j) - zw));
                            }
                        }
                    }
                    const size_t o = (((size_t)b * M + m) * OH + oh) * OW + ow;
                    if (q) store_q(y->data, y->dtype, o, requant((int32_t)acc, scale, zp_at(in_t(g, n, 7), 0), qmin, qmax));
                    else memcpy(y->data + 4 * o, &acc, 4);
                }
        }
}

/* numpy broadcasting of a and b to y (ranks <= FW_MAX_RANK, right-aligned): y's dims padded to FW_MAX_RANK with
 * leading 1s in yd, and the element strides of a and b along each of them (0 where the operand repeats) */
static void broadcast_strides(const fw_tensor *y, const fw_tensor *a, const fw_tensor *b, uint32_t yd[FW_MAX_RANK],
                              uint64_t sa[FW_MAX_RANK], uint64_t sb[FW_MAX_RANK]) {
    const int r = y->rank;
    uint64_t ma = 1, mb = 1;
    for (int i = FW_MAX_RANK - 1, k = r - 1; i >= 0; i--, k--) {
        yd[i] = 1, sa[i] = sb[i] = 0;
        if (k < 0) continue;
        yd[i] = y->dims[k];
        int ka = k - (r - a->rank), kb = k - (r - b->rank);
        uint32_t da = ka >= 0 ? a->dims[ka] : 1, db = kb >= 0 ? b->dims[kb] : 1;
        sa[i] = da == 1 ? 0 : ma;
        sb[i] = db == 1 ? 0 : mb;
        ma *= da;
        mb *= db;
    }
}

/* one output element of a broadcasting binary op: y[o] from a[ia] and b[ib] (element indices) */
typedef void (*binary_elem_fn)(const fw_node *n, const fw_tensor *a, size_t ia, const fw_tensor *b, size_t ib,
                               const fw_tensor *y, size_t o);

/* every output element of a broadcasting binary op, in order (rank <= 4, numpy broadcasting: broadcast_strides) */
static void run_broadcast(const fw_graph *g, const fw_node *n, binary_elem_fn elem) {
    const fw_tensor *a = in_t(g, n, 0), *b = in_t(g, n, 1), *y = &g->t[n->out[0]];
    uint32_t yd[FW_MAX_RANK];
    uint64_t sa[FW_MAX_RANK], sb[FW_MAX_RANK];
    broadcast_strides(y, a, b, yd, sa, sb);
    size_t o = 0;
    for (uint32_t i0 = 0; i0 < yd[0]; i0++)
        for (uint32_t i1 = 0; i1 < yd[1]; i1++)
            for (uint32_t i2 = 0; i2 < yd[2]; i2++)
                for (uint32_t i3 = 0; i3 < yd[3]; i3++, o++)
                    elem(n, a, i0 * sa[0] + i1 * sa[1] + i2 * sa[2] + i3 * sa[3], b,
                         i0 * sb[0] + i1 * sb[1] + i2 * sb[2] + i3 * sb[3], y, o);
}

/* ONNX Add / Mul on int32 (wrapping, as onnxruntime's) or int8/uint8 (wrapping bytes) */
static void add_mul_elem(const fw_node *n, const fw_tensor *a, size_t ia, const fw_tensor *b, size_t ib,
                         const fw_tensor *y, size_t o) {
    if (dtype_size(y->dtype) == 4) {
        int32_t va, vb, vy;
        memcpy(&va, a->data + 4 * ia, 4);
        memcpy(&vb, b->data + 4 * ib, 4);
        vy = n->op == FW_OP_ADD ? (int32_t)((uint32_t)va + (uint32_t)vb) : (int32_t)((uint32_t)va * (uint32_t)vb);
        memcpy(y->data + 4 * o, &vy, 4);
    } else {
        int8_t va = (int8_t)a->data[ia], vb = (int8_t)b->data[ib];
        y->data[o] = (uint8_t)(n->op == FW_OP_ADD ? (uint8_t)(va + vb) : (uint8_t)(va * vb));
    }
}

/* Relu, Clip: min(max(v, lo), hi), in that order as ONNX's Clip, so lo > hi gives hi everywhere */
static void run_unary(const fw_graph *g, const fw_node *n) {
    const fw_tensor *a = in_t(g, n, 0), *y = &g->t[n->out[0]];
    const uint64_t cnt = numel(y);
    int32_t lo = n->op == FW_OP_CLIP ? n->attr[0] : 0, hi = n->op == FW_OP_CLIP ? n->attr[1] : 0x7FFFFFFF;
    for (uint64_t i = 0; i < cnt; i++) {
        if (a->dtype == FW_DT_INT32) {
            int32_t v;
            memcpy(&v, a->data + 4 * i, 4);
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
            memcpy(y->data + 4 * i, &v, 4);
        } else {
            int32_t v = q_at(a->data, a->dtype, i);
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
            y->data[i] = a->dtype == FW_DT_INT8 ? (uint8_t)clamp_i8(v) : (uint8_t)v;
        }
    }
}

static int run_qblock(const fw_graph *g, const fw_node *n, uint8_t *scratch) {
    const fw_tensor *x = in_t(g, n, 0), *w = in_t(g, n, 1), *y = &g->t[n->out[0]];
    const int64_t M = x->dims[0], K = x->dims[1], N = w->dims[0];
    block_q8_s *xq = (block_q8_s *)scratch;
    for (int64_t i = 0; i < M; i++)
        if (et_quantize_row_q8_s((const float *)x->data + i * K, xq + i * (K / ET_QK), K) != 0) return FW_ERR_COMPUTE;
    et_gemm_fn fn = w->dtype == FW_DT_Q4_0 ? et_kernels_ref.gemm_q4_0
                    : w->dtype == FW_DT_Q4_1 ? et_kernels_ref.gemm_q4_1 : et_kernels_ref.gemm_q8_0;
    fn(K, w->data, (size_t)(K / ET_QK) * block_bytes(w->dtype), N, xq, (size_t)(K / ET_QK) * sizeof(block_q8_s), M,
       (float *)y->data, (size_t)N);
    return 0;
}

/* FULLY_CONNECTED: the C core's reference kernel itself, on the host's packed weights, row constants
 * (rowc_s = bias - x_zp * wsum) and scales */
static void run_fc_s8(const fw_graph *g, const fw_node *n) {
    const fw_tensor *x = in_t(g, n, 0), *w = in_t(g, n, 1), *rowc = in_t(g, n, 2), *sc = in_t(g, n, 3);
    const fw_tensor *y = &g->t[n->out[0]];
    const int64_t N = n->attr[0], K = n->attr[1], m = (int64_t)(numel(x) / (uint64_t)K);
    et_fc_s8_args a = {.x = (const int8_t *)x->data, .m = m, .k = K, .kp = round_up_u32((uint32_t)K, 4), .n = N,
                       .w = (const int8_t *)w->data, .rowc_s = (const int32_t *)rowc->data, .rowc_u = NULL,
                       .scale = (const float *)sc->data, .fmin = (float)(n->attr[3] - n->attr[2]),
                       .fmax = (float)(n->attr[4] - n->attr[2]), .y_zp = n->attr[2], .y = (int8_t *)y->data};
    et_fc_s8_ref(&a, 0, m, 0, N);
}

/* CONV_2D / DEPTHWISE_CONV_2D, NHWC: int32 sums of (x - x_zp) * w over the taps inside the input (+ bias), then
 * float(acc) * scale[o] clamped to [lo - y_zp, hi - y_zp], rounded half to even, + y_zp: XNNPACK's fp32 requant */
static void run_conv_s8(const fw_graph *g, const fw_node *n) {
    const int dw = n->op == FW_OP_DWCONV2D_S8;
    const fw_tensor *x = in_t(g, n, 0), *w = in_t(g, n, 1), *bias = in_t(g, n, 2), *sc = in_t(g, n, 3);
    const fw_tensor *y = &g->t[n->out[0]];
    const int32_t sh = n->attr[0], sw = n->attr[1], pt = n->attr[2], pl = n->attr[3], dh = n->attr[6], dwi = n->attr[7];
    const int32_t xzp = n->attr[8], yzp = n->attr[9], lo = n->attr[10], hi = n->attr[11];
    const int32_t N = (int32_t)x->dims[0], H = (int32_t)x->dims[1], W = (int32_t)x->dims[2], C = (int32_t)x->dims[3];
    const int32_t kh = (int32_t)w->dims[1], kw = (int32_t)w->dims[2], O = (int32_t)y->dims[3];
    const int32_t OH = (int32_t)y->dims[1], OW = (int32_t)y->dims[2], dm = dw ? O / C : 1;
    const int8_t *xs = (const int8_t *)x->data, *ws = (const int8_t *)w->data;
    int8_t *ys = (int8_t *)y->data;
    for (int32_t b = 0; b < N; b++)
        for (int32_t oh = 0; oh < OH; oh++)
            for (int32_t ow = 0; ow < OW; ow++)
                for (int32_t o = 0; o < O; o++) {
                    uint32_t acc = bias ? (uint32_t)i32_at(bias, (uint32_t)o) : 0u; /* int32 sums wrap */
                    for (int32_t i = 0; i < kh; i++) {
                        const int32_t ih = oh * sh - pt + i * dh;
                        if (ih < 0 || ih >= H) continue;
                        for (int32_t j = 0; j < kw; j++) {
                            const int32_t iw = ow * sw - pl + j * dwi;
                            if (iw < 0 || iw >= W) continue;
                            const int8_t *xp = xs + (((size_t)b * H + ih) * W + iw) * C;
                            if (dw) {
                                acc += (uint32_t)(((int32_t)xp[o / dm] - xzp) * ws[((size_t)i * kw + j) * O + o]);
                            } else {
                                const int8_t *wp = ws + (((size_t)o * kh + i) * kw + j) * C;
                                for (int32_t c = 0; c < C; c++) acc += (uint32_t)(((int32_t)xp[c] - xzp) * wp[c]);
                            }
                        }
                    }
                    ys[(((size_t)b * OH + oh) * OW + ow) * O + o] = (int8_t)requant((int32_t)acc, f32_at(sc, (uint32_t)o),
                                                                                    yzp, lo, hi);
                }
}

/* ADD: XNNPACK's qs8 add, acc = bias + a * a_mult + b * b_mult (the zero points and the rounding are in bias),
 * an arithmetic shift right, clamped, + y_zp */
static void add_s8_elem(const fw_node *n, const fw_tensor *a, size_t ia, const fw_tensor *b, size_t ib,
                        const fw_tensor *y, size_t o) {
    const uint32_t bias = (uint32_t)n->attr[0], am = (uint32_t)n->attr[1], bm = (uint32_t)n->attr[2];
    const int32_t shift = n->attr[3], yzp = n->attr[4], lo = n->attr[5] - yzp, hi = n->attr[6] - yzp;
    const int32_t va = (int8_t)a->data[ia], vb = (int8_t)b->data[ib];
    const int32_t acc = (int32_t)(bias + (uint32_t)va * am + (uint32_t)vb * bm);
    int32_t v = acc >= 0 ? acc >> shift : ~(~acc >> shift); /* floor, as an arithmetic shift */
    v = v < lo ? lo : v > hi ? hi : v;
    y->data[o] = (uint8_t)(int8_t)(v + yzp);
}

/* AVERAGE_POOL_2D: TFLite's integer kernel; taps outside the input are left out of the sum and the count */
static void run_avgpool_s8(const fw_graph *g, const fw_node *n) {
    const fw_tensor *x = in_t(g, n, 0), *y = &g->t[n->out[0]];
    const int32_t kh = n->attr[0], kw = n->attr[1], sh = n->attr[2], sw = n->attr[3], pt = n->attr[4], pl = n->attr[5];
    const int32_t lo = n->attr[8], hi = n->attr[9];
    const int32_t N = (int32_t)x->dims[0], H = (int32_t)x->dims[1], W = (int32_t)x->dims[2], C = (int32_t)x->dims[3];
    const int32_t OH = (int32_t)y->dims[1], OW = (int32_t)y->dims[2];
    const int8_t *xs = (const int8_t *)x->data;
    int8_t *ys = (int8_t *)y->data;
    for (int32_t b = 0; b < N; b++)
        for (int32_t oh = 0; oh < OH; oh++)
            for (int32_t ow = 0; ow < OW; ow++) {
                const int32_t h0 = oh * sh - pt, w0 = ow * sw - pl;
                const int32_t hs = h0 < 0 ? 0 : h0, he = h0 + kh > H ? H : h0 + kh;
                const int32_t ws = w0 < 0 ? 0 : w0, we = w0 + kw > W ? W : w0 + kw;
                const int32_t cnt = (he - hs) * (we - ws); /* >= 1: H, W >= 1, every pad smaller than the window */
                for (int32_t c = 0; c < C; c++) {
                    int32_t acc = 0;
                    for (int32_t i = hs; i < he; i++)
                        for (int32_t j = ws; j < we; j++) acc += xs[(((size_t)b * H + i) * W + j) * C + c];
                    int32_t v = acc > 0 ? (acc + cnt / 2) / cnt : (acc - cnt / 2) / cnt;
                    ys[(((size_t)b * OH + oh) * OW + ow) * C + c] = (int8_t)(v < lo ? lo : v > hi ? hi : v);
                }
            }
}

static void run_concat(const fw_graph *g, const fw_node *n) {
    const fw_tensor *y = &g->t[n->out[0]];
    const int ax = n->attr[0];
    uint64_t outer = 1, inner = dtype_size(y->dtype);
    for (int d = 0; d < ax; d++) outer *= y->dims[d];
    for (int d = ax + 1; d < y->rank; d++) inner *= y->dims[d];
    uint8_t *dst = y->data;
    for (uint64_t o = 0; o < outer; o++)
        for (int k = 0; k < n->n_in; k++) {
            const fw_tensor *t = in_t(g, n, k);
            const size_t len = (size_t)(t->dims[ax] * inner);
            memmove(dst, t->data + o * len, len);
            dst += len;
        }
}

int fw_graph_run(fw_graph *g, uint8_t *act, const char **msg) {
    uint32_t off = 0;
    for (uint32_t i = 0; i < g->n_nodes; i++) {
        fw_tensor *t = &g->t[g->node[i].out[0]];
        if (t->data == NULL) {
            t->data = act + off;
            off += (t->nbytes + 7u) & ~7u;
        }
    }
    uint8_t *scratch = act + off;
    for (uint32_t i = 0; i < g->n_nodes; i++) {
        const fw_node *n = &g->node[i];
        switch (n->op) {
        case FW_OP_MATMUL_INTEGER: case FW_OP_QLINEAR_MATMUL: run_matmul(g, n); break;
        case FW_OP_CONV_INTEGER: case FW_OP_QLINEAR_CONV: run_conv(g, n); break;
        case FW_OP_ADD: case FW_OP_MUL: run_broadcast(g, n, add_mul_elem); break;
        case FW_OP_RELU: case FW_OP_CLIP: run_unary(g, n); break;
        case FW_OP_COPY: memmove(g->t[n->out[0]].data, in_t(g, n, 0)->data, g->t[n->out[0]].nbytes); break;
        case FW_OP_MATMUL_QBLOCK:
            if (run_qblock(g, n, scratch)) FAIL(FW_ERR_COMPUTE, "q-block matmul: input holds NaN or Inf");
            break;
        case FW_OP_FC_S8: run_fc_s8(g, n); break;
        case FW_OP_CONV2D_S8: case FW_OP_DWCONV2D_S8: run_conv_s8(g, n); break;
        case FW_OP_ADD_S8: run_broadcast(g, n, add_s8_elem); break;
        case FW_OP_AVGPOOL_S8: run_avgpool_s8(g, n); break;
        case FW_OP_CONCAT: run_concat(g, n); break;
        default: FAIL(FW_ERR_UNSUPPORTED, "unknown op");
        }
    }
    return 0;
}
