/* fuzz_frame.c — fuzzes the firmware's frame decoder, protocol state machine and graph parser/kernels.
 *
 * Built with ASan + UBSan. Without libFuzzer (gcc), main() runs a bounded random + mutation loop for N seconds:
 * raw garbage, valid frames of every message type with random payloads, byte-mutated valid frames, and two valid graph
 * blobs (QLinearMatMul -> Relu -> QLinearConv; the TFLite INT8 ops CONV2D_S8 -> DWCONV2D_S8 -> AVGPOOL_S8 -> ADD_S8
 * -> CONCAT -> COPY -> FC_S8) mutated byte by byte, loaded through the protocol and invoked; first, graphs a kernel
 * would divide by zero on (REFUSED) must be refused by the parser. Every
 * answer the firmware writes must itself decode as a well-formed frame. With clang, LLVMFuzzerTestOneInput is the
 * libFuzzer entry (FW_LIBFUZZER).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../core/fw.h"
#include "../core/graph.h"
#include "../hal/hal.h"

static fw_decoder out_dec;
static unsigned long answers, broken_answers;

size_t hal_read(uint8_t *buf, size_t max, uint32_t timeout_ms) { return 0; }
void hal_write(const uint8_t *buf, size_t n) {
    for (size_t i = 0; i < n; i++) {
        int r = fw_decoder_feed(&out_dec, buf[i]);
        if (r > 0) answers++, fw_decoder_reset(&out_dec);
        if (r < 0) broken_answers++;
    }
}
uint32_t hal_clock_us(void) { return 0; }
void hal_compute_done(uint64_t ops, uint32_t elapsed_us) {}

static uint8_t frame[2 * FW_MAX_FRAME + 64];
static size_t frame_len;
static void to_frame(const uint8_t *p, size_t n) { memcpy(frame + frame_len, p, n); frame_len += n; }

static void send(uint8_t type, uint32_t seq, const uint8_t *payload, size_t n) {
    frame_len = 0;
    fw_send_frame(to_frame, type, 0, 0, seq, payload, n);
    fw_rx(frame, frame_len);
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)rng; }

/* ---- a valid blob: y = Relu(QLinearMatMul(x, w)) (2x8 @ 8x4, int8), then a 1x1 QLinearConv on it seen as NCHW ---- */
static uint8_t blob[2048];
static size_t blob_len;
static void put(const void *p, size_t n) { memcpy(blob + blob_len, p, n); blob_len += n; }
static void p8(uint32_t v) { uint8_t b = (uint8_t)v; put(&b, 1); }
static void p16(uint32_t v) { p8(v); p8(v >> 8); }
static void p32(uint32_t v) { p16(v); p16(v >> 16); }

static void build_blob(void) {
    /* tensors: 0 x(2,8) 1 xs 2 xzp 3 w(8,4) 4 ws 5 wzp 6 ys 7 yzp 8 mm(2,4) 9 relu(2,4) -> as (1,4,2,1) via copy 10,
     *          11 cw(4,4,1,1) 12 cws 13 cwzp 14 bias(4) 15 out(1,4,2,1) */
    static const struct { uint8_t dt, rank; uint32_t d[4]; uint32_t cbytes; } T[] = {
        {FW_DT_INT8, 2, {2, 8}, 0}, {FW_DT_FLOAT32, 0, {0}, 4}, {FW_DT_INT8, 0, {0}, 1}, {FW_DT_INT8, 2, {8, 4}, 32},
        {FW_DT_FLOAT32, 0, {0}, 4}, {FW_DT_INT8, 0, {0}, 1}, {FW_DT_FLOAT32, 0, {0}, 4}, {FW_DT_INT8, 0, {0}, 1},
        {FW_DT_INT8, 2, {2, 4}, 0}, {FW_DT_INT8, 2, {2, 4}, 0}, {FW_DT_INT8, 4, {1, 4, 2, 1}, 0},
        {FW_DT_INT8, 4, {4, 4, 1, 1}, 16}, {FW_DT_FLOAT32, 1, {4}, 16}, {FW_DT_INT8, 0, {0}, 1},
        {FW_DT_INT32, 1, {4}, 16}, {FW_DT_INT8, 4, {1, 4, 2, 1}, 0}};
    const int nt = sizeof T / sizeof T[0];
    size_t data_at[16];
    blob_len = 0;
    p32(0x46524745u); p16((uint32_t)nt); p16(4); p16(1); p16(1);
    size_t meta = 12;
    for (int i = 0; i < nt; i++) meta += 4 + 4u * T[i].rank + (T[i].cbytes ? 8 : 0);
    meta += (4 + 2 * 8 + 2 + 0) + (4 + 2 + 2) + (4 + 2 + 2) + (4 + 2 * 9 + 2 + 4 * 9) + 4;
    size_t data = (meta + 7) & ~(size_t)7;
    for (int i = 0; i < nt; i++) {
        p8(T[i].dt); p8(T[i].rank); p8(T[i].cbytes ? 1 : 0); p8(0);
        for (int d = 0; d < T[i].rank; d++) p32(T[i].d[d]);
        if (T[i].cbytes) { data_at[i] = data; p32(T[i].cbytes); p32((uint32_t)data); data = (data + T[i].cbytes + 7) & ~(size_t)7; }
    }
    p8(FW_OP_QLINEAR_MATMUL); p8(8); p8(1); p8(0); for (int k = 0; k < 8; k++) p16((uint32_t)k); p16(8);
    p8(FW_OP_RELU); p8(1); p8(1); p8(0); p16(8); p16(9);
    p8(FW_OP_COPY); p8(1); p8(1); p8(0); p16(9); p16(10);
    p8(FW_OP_QLINEAR_CONV); p8(9); p8(1); p8(9);
    const uint16_t cin[9] = {10, 6, 7, 11, 12, 13, 6, 7, 14};
    for (int k = 0; k < 9; k++) p16(cin[k]);
    p16(15);
    const int32_t attrs[9] = {1, 1, 1, 0, 0, 0, 0, 1, 1};
    for (int k = 0; k < 9; k++) p32((uint32_t)attrs[k]);
    p16(0); p16(15);
    while (blob_len < data) p8(0);
    float one = 0.05f, half = 0.02f, yscale = 0.1f;
    for (int i = 0; i < nt; i++) {
        if (!T[i].cbytes) continue;
        blob_len = data_at[i];
        for (uint32_t b = 0; b < T[i].cbytes; b++) p8(rnd());
        blob_len = data_at[i];
        if (T[i].dt == FW_DT_FLOAT32) for (uint32_t b = 0; b < T[i].cbytes / 4; b++) put(i == 6 ? &yscale : i == 1 ? &one : &half, 4);
        if (T[i].dt == FW_DT_INT32) for (uint32_t b = 0; b < 4; b++) p32(rnd() % 1000);
        blob_len = data;
    }
    blob_len = data;
}

/* ---- a second valid blob, the TFLite INT8 ops: x (1,2,2,4) -> CONV2D_S8 3x3 -> DWCONV2D_S8 3x3 (multiplier 2) ->
 * AVGPOOL_S8 2x2 -> ADD_S8 (+ x) -> CONCAT (with the depthwise output) -> COPY (1,32) -> FC_S8 -> y (1,8) ---- */
static uint8_t blob2[2048];
static size_t blob2_len;

typedef struct { uint8_t dt, rank; uint32_t d[4]; uint32_t cbytes; } tdesc;
typedef struct { uint8_t op, n_in; uint16_t in[4], out; uint8_t n_attr; int32_t attr[12]; } ndesc;

static void build_blob2(void) {
    static const tdesc T[] = {
        {FW_DT_INT8, 4, {1, 2, 2, 4}, 0},                                      /* 0 x */
        {FW_DT_INT8, 4, {2, 3, 3, 4}, 72}, {FW_DT_INT32, 1, {2}, 8}, {FW_DT_FLOAT32, 1, {2}, 8},
        {FW_DT_INT8, 4, {1, 2, 2, 2}, 0},                                      /* 4 conv */
        {FW_DT_INT8, 4, {1, 3, 3, 4}, 36}, {FW_DT_INT32, 1, {4}, 16}, {FW_DT_FLOAT32, 1, {4}, 16},
        {FW_DT_INT8, 4, {1, 2, 2, 4}, 0},                                      /* 8 depthwise */
        {FW_DT_INT8, 4, {1, 2, 2, 4}, 0}, {FW_DT_INT8, 4, {1, 2, 2, 4}, 0},   /* 9 pool, 10 add */
        {FW_DT_INT8, 4, {1, 2, 2, 8}, 0}, {FW_DT_INT8, 2, {1, 32}, 0},        /* 11 concat, 12 flat */
        {FW_DT_INT8, 2, {1, 512}, 512}, {FW_DT_INT32, 1, {8}, 32}, {FW_DT_FLOAT32, 1, {8}, 32},
        {FW_DT_INT8, 2, {1, 8}, 0}};                                           /* 16 y */
    static const ndesc N[] = {
        {FW_OP_CONV2D_S8, 4, {0, 1, 2, 3}, 4, 12, {1, 1, 1, 1, 1, 1, 1, 1, 0, 0, -128, 127}},
        {FW_OP_DWCONV2D_S8, 4, {4, 5, 6, 7}, 8, 12, {1, 1, 1, 1, 1, 1, 1, 1, 3, -2, -100, 120}},
        {FW_OP_AVGPOOL_S8, 1, {8}, 9, 10, {2, 2, 1, 1, 0, 0, 1, 1, -128, 127}},
        {FW_OP_ADD_S8, 2, {9, 0}, 10, 7, {1 << 19, 1 << 19, 3 << 18, 20, 1, -128, 127}},
        {FW_OP_CONCAT, 2, {10, 8}, 11, 1, {3}},
        {FW_OP_COPY, 1, {11}, 12, 0, {0}},
        {FW_OP_FC_S8, 4, {12, 13, 14, 15}, 16, 5, {8, 32, 0, -128, 127}}};
    const int nt = sizeof T / sizeof T[0], nn = sizeof N / sizeof N[0];
    size_t meta = 12, at[sizeof T / sizeof T[0]];
    for (int i = 0; i < nt; i++) meta += 4 + 4u * T[i].rank + (T[i].cbytes ? 8 : 0);
    for (int i = 0; i < nn; i++) meta += 4 + 2u * N[i].n_in + 2 + 4u * N[i].n_attr;
    meta += 4;
    size_t data = (meta + 7) & ~(size_t)7;
    blob_len = 0;
    p32(0x46524745u); p16((uint32_t)nt); p16((uint32_t)nn); p16(1); p16(1);
    for (int i = 0; i < nt; i++) {
        p8(T[i].dt); p8(T[i].rank); p8(T[i].cbytes ? 1 : 0); p8(0);
        for (int d = 0; d < T[i].rank; d++) p32(T[i].d[d]);
        if (T[i].cbytes) { at[i] = data; p32(T[i].cbytes); p32((uint32_t)data); data = (data + T[i].cbytes + 7) & ~(size_t)7; }
    }
    for (int i = 0; i < nn; i++) {
        p8(N[i].op); p8(N[i].n_in); p8(1); p8(N[i].n_attr);
        for (int k = 0; k < N[i].n_in; k++) p16(N[i].in[k]);
        p16(N[i].out);
        for (int k = 0; k < N[i].n_attr; k++) p32((uint32_t)N[i].attr[k]);
    }
    p16(0); p16(16);
    while (blob_len < data) p8(0);
    for (int i = 0; i < nt; i++) {
        if (!T[i].cbytes) continue;
        blob_len = at[i];
        for (uint32_t b = 0; b < T[i].cbytes; b++) {
            if (T[i].dt == FW_DT_FLOAT32 && b % 4 == 0) { float f = 0.001f + (float)(rnd() % 1000) * 1e-4f; put(&f, 4); }
            else if (T[i].dt == FW_DT_INT32 && b % 4 == 0) p32(rnd() % 20001 - 10000);
            else if (T[i].dt == FW_DT_INT8) p8(rnd());
        }
    }
    blob_len = data;
    memcpy(blob2, blob, blob_len);
    blob2_len = blob_len;
}

/* ---- graphs a kernel would divide by zero on, every other rule kept: the parser must refuse them (ERR_SHAPE at
 * LOAD_COMMIT, PROTOCOL.md §3.2). MatMulInteger and QLinearMatMul with K = 0 (A (2,0), B (0,3)); AVGPOOL_S8 of an
 * input with H = 0 padded to a (2,2) output, each window then holding no tap ---- */
typedef struct { uint8_t dt, rank, is_const; uint32_t d[4], nbytes; } zdesc;
typedef struct { uint8_t op, n_in, n_attr; int32_t attr[10]; } znode;
static const struct { zdesc t[9]; int nt; znode node; } REFUSED[] = {
    {{{FW_DT_INT8, 2, 0, {2, 0}, 0}, {FW_DT_INT8, 2, 1, {0, 3}, 0}, {FW_DT_INT32, 2, 0, {2, 3}, 0}}, 3,
     {FW_OP_MATMUL_INTEGER, 2, 0, {0}}},
    {{{FW_DT_INT8, 2, 0, {2, 0}, 0}, {FW_DT_FLOAT32, 0, 1, {0}, 4}, {FW_DT_INT8, 0, 1, {0}, 1},
      {FW_DT_INT8, 2, 1, {0, 3}, 0}, {FW_DT_FLOAT32, 0, 1, {0}, 4}, {FW_DT_INT8, 0, 1, {0}, 1},
      {FW_DT_FLOAT32, 0, 1, {0}, 4}, {FW_DT_INT8, 0, 1, {0}, 1}, {FW_DT_INT8, 2, 0, {2, 3}, 0}}, 9,
     {FW_OP_QLINEAR_MATMUL, 8, 0, {0}}},
    {{{FW_DT_INT8, 4, 0, {1, 0, 2, 1}, 0}, {FW_DT_INT8, 4, 0, {1, 2, 2, 1}, 0}}, 2,
     {FW_OP_AVGPOOL_S8, 1, 10, {3, 1, 1, 1, 2, 0, 2, 0, -128, 127}}},
};

/* REFUSED[i] as a blob: its tensors, one node reading the first n_in of them (input: tensor 0) writing the last */
static size_t build_refused(int i, uint8_t *dst) {
    const zdesc *T = REFUSED[i].t;
    const int nt = REFUSED[i].nt;
    const znode *nd = &REFUSED[i].node;
    size_t meta = 12 + 4 + 2u * nd->n_in + 2 + 4u * nd->n_attr + 4;
    for (int k = 0; k < nt; k++) meta += 4 + 4u * T[k].rank + (T[k].is_const ? 8 : 0);
    size_t data = (meta + 7) & ~(size_t)7;
    blob_len = 0;
    p32(0x46524745u); p16((uint32_t)nt); p16(1); p16(1); p16(1);
    for (int k = 0; k < nt; k++) {
        p8(T[k].dt); p8(T[k].rank); p8(T[k].is_const); p8(0);
        for (int d = 0; d < T[k].rank; d++) p32(T[k].d[d]);
        if (T[k].is_const) { p32(T[k].nbytes); p32((uint32_t)data); data = (data + T[k].nbytes + 7) & ~(size_t)7; }
    }
    p8(nd->op); p8(nd->n_in); p8(1); p8(nd->n_attr);
    for (int k = 0; k < nd->n_in; k++) p16((uint32_t)k);
    p16((uint32_t)nt - 1);
    for (int k = 0; k < nd->n_attr; k++) p32((uint32_t)nd->attr[k]);
    p16(0); p16((uint32_t)nt - 1);
    while (blob_len < data) p8(0); /* the constants: zeros */
    memcpy(dst, blob, blob_len);
    return blob_len;
}

static uint64_t fnv(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static uint32_t seq;

static void load_and_run(const uint8_t *b, size_t n) {
    uint8_t p[FW_MAX_PAYLOAD];
    uint64_t h = fnv(b, n);
    memcpy(p, &h, 8);
    uint32_t len = (uint32_t)n;
    memcpy(p + 8, &len, 4);
    send(FW_MSG_LOAD_BEGIN, ++seq, p, 12);
    for (size_t off = 0; off < n; off += 512) {
        size_t m = n - off < 512 ? n - off : 512;
        uint32_t o = (uint32_t)off;
        memcpy(p + 8, &o, 4);
        memcpy(p + 12, b + off, m);
        send(FW_MSG_LOAD_CHUNK, ++seq, p, 12 + m);
    }
    send(FW_MSG_LOAD_COMMIT, ++seq, p, 8);
    uint32_t sizes[2] = {16, 8}, handles[2] = {1, 2};
    for (int i = 0; i < 2; i++) send(FW_MSG_ALLOC, ++seq, (const uint8_t *)&sizes[i], 4);
    uint8_t w[8 + 16];
    memset(w, 0, 8);
    w[0] = 1;
    for (int i = 0; i < 16; i++) w[8 + i] = (uint8_t)rnd();
    send(FW_MSG_WRITE, ++seq, w, sizeof w);
    uint8_t inv[12 + 8];
    memcpy(inv, &h, 8);
    inv[8] = 1; inv[9] = 0; inv[10] = 1; inv[11] = 0;
    memcpy(inv + 12, handles, 8);
    send(FW_MSG_INVOKE, ++seq, inv, sizeof inv);
    uint32_t rd[3] = {2, 0, 8};
    send(FW_MSG_READ, ++seq, (const uint8_t *)rd, 12);
    for (int i = 0; i < 2; i++) send(FW_MSG_FREE, ++seq, (const uint8_t *)&handles[i], 4);
    send(FW_MSG_UNLOAD, ++seq, p, 8);
}

static void one_case(void) {
    uint8_t buf[3 * FW_MAX_FRAME];
    uint32_t kind = rnd() % 6;
    if (kind == 0) { /* garbage */
        size_t n = rnd() % sizeof buf;
        for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)(rnd() % 4 ? rnd() : 0);
        fw_rx(buf, n);
    } else if (kind == 1 || kind == 2) { /* a valid frame, random type and payload, maybe mutated */
        size_t n = rnd() % 64 == 0 ? rnd() % (FW_MAX_PAYLOAD + 64) : rnd() % 40;
        for (size_t i = 0; i < n && i < sizeof buf; i++) buf[i] = (uint8_t)rnd();
        frame_len = 0;
        fw_send_frame(to_frame, (uint8_t)(rnd() % 16), (uint8_t)(rnd() % 2 ? 0 : rnd()), 0, rnd() % 4 ? ++seq : rnd(),
                      buf, n > FW_MAX_PAYLOAD + 32 ? FW_MAX_PAYLOAD + 32 : n);
        if (kind == 2) for (int k = rnd() % 4; k >= 0; k--) frame[rnd() % frame_len] = (uint8_t)rnd();
        fw_rx(frame, frame_len);
    } else if (kind == 3) { /* a valid graph, end to end */
        if (rnd() % 2) load_and_run(blob, blob_len);
        else load_and_run(blob2, blob2_len);
    } else { /* a graph, mutated: exercises the parser's checks and, when they pass, the kernels under ASan */
        const int second = rnd() % 2;
        const uint8_t *src = second ? blob2 : blob;
        const size_t len = second ? blob2_len : blob_len;
        uint8_t m[sizeof blob2];
        memcpy(m, src, len);
        for (int k = rnd() % 4; k >= 0; k--) m[rnd() % len] = (uint8_t)(rnd() % 3 ? rnd() : rnd() % 8);
        load_and_run(m, len);
    }
    if (rnd() % 50 == 0) { /* a HELLO now and then, sometimes from another protocol version or host session */
        const uint32_t v = rnd() % 8 ? FW_PROTOCOL_VERSION : rnd() & 0xFFFF, host = rnd() % 3; /* 0: none */
        const uint8_t h[8] = {(uint8_t)v, (uint8_t)(v >> 8), 0, 0, (uint8_t)host, 0, 0, 0};
        send(FW_MSG_HELLO, ++seq, h, rnd() % 2 ? 8 : 4);
    }
}

#ifdef FW_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    if (!ready) { fw_init(1); build_blob2(); build_blob(); ready = 1; }
    fw_rx(data, size);
    return 0;
}
#else
int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 30;
    fw_init(1);
    for (int i = 0; i < (int)(sizeof REFUSED / sizeof REFUSED[0]); i++) { /* before the seeds: it writes blob */
        static fw_graph g;
        static uint8_t z[512];
        const char *msg = "";
        int rc = fw_graph_parse(&g, z, (uint32_t)build_refused(i, z), &msg);
        if (rc != FW_ERR_SHAPE) {
            fprintf(stderr, "fuzz: graph %d a kernel would divide by zero on: parse gave %d (%s), expected ERR_SHAPE\n",
                    i, rc, msg);
            return 1;
        }
    }
    build_blob2();
    build_blob();
    const uint8_t v[4] = {FW_PROTOCOL_VERSION & 0xFF, FW_PROTOCOL_VERSION >> 8, 0, 0};
    send(FW_MSG_HELLO, ++seq, v, sizeof v);
    load_and_run(blob, blob_len);
    load_and_run(blob2, blob2_len);
    { /* both valid blobs must parse and run as they are, or the mutations would only test the parser's refusals */
        static fw_graph g;
        static uint8_t copy[sizeof blob2], act[1 << 14];
        const uint8_t *srcs[2] = {blob, blob2};
        const size_t lens[2] = {blob_len, blob2_len};
        for (int i = 0; i < 2; i++) {
            const char *msg = "";
            memcpy(copy, srcs[i], lens[i]);
            int rc = fw_graph_parse(&g, copy, (uint32_t)lens[i], &msg);
            if (rc == 0 && g.act_bytes > sizeof act) rc = -1, msg = "activations too large for the check";
            if (rc == 0) {
                for (uint32_t k = 0; k < g.n_inputs; k++) g.t[g.inputs[k]].data = act;
                for (uint32_t k = 0; k < g.n_outputs; k++) g.t[g.outputs[k]].data = act + 256 * (k + 1);
                rc = fw_graph_run(&g, act + 1024, &msg);
            }
            if (rc) {
                fprintf(stderr, "fuzz: valid blob %d fails: %s\n", i + 1, msg);
                return 1;
            }
        }
    }
    unsigned long cases = 0;
    clock_t end = clock() + (clock_t)(seconds * CLOCKS_PER_SEC);
    while (clock() < end) {
        for (int i = 0; i < 100; i++, cases++) one_case();
        if (cases % 200000 == 0) fw_init((uint32_t)cases);
    }
    if (broken_answers) {
        fprintf(stderr, "fuzz: %lu answers did not decode\n", broken_answers);
        return 1;
    }
    printf("fuzz: %lu cases in %.0f s, %lu answers, all well-formed; no sanitizer report\n", cases, seconds, answers);
    return 0;
}
#endif
