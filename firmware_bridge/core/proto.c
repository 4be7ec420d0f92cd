/* proto.c — the device side of PROTOCOL.md: session, sequence numbers and the one-entry response cache that makes
 * every command idempotent, content-addressed graph loading, tensor handles, INVOKE, STATS, RESET.
 *
 * One request is handled at a time, to completion, inside fw_rx(); the answer goes out before the next byte is read.
 * All state is static and cleared by fw_init() (power-on or reset).
 */
#include <string.h>

#include "arena.h"
#include "fw.h"
#include "graph.h"
#include "../hal/hal.h"

#ifndef FW_MAX_HANDLES
#define FW_MAX_HANDLES 48u
#endif
/* each handle, and each graph's blob and activations, is one arena block: the block table never runs out first */
_Static_assert(FW_MAX_ALLOCS >= FW_MAX_HANDLES + 2 * FW_MAX_GRAPHS, "FW_MAX_ALLOCS below handles + 2 x graphs");

typedef struct {
    uint64_t hash;
    uint8_t *blob, *act;
    uint32_t len, act_bytes;
    uint8_t state; /* 0 free, 1 loading, 2 ready */
    uint8_t used;  /* loaded, found or run in the current host session; a ready graph that is not is a cache of an
                    * earlier host's, dropped when room is needed (§2.5) */
} graph_slot;

typedef struct {
    uint8_t *p;
    uint32_t n;
} handle_slot;

static struct {
    uint32_t boot_id, arena_limit;
    uint32_t host;      /* the host session of the last HELLO that named one (0: none yet) */
    uint32_t reset_seq; /* the RESET that caused this boot: its retransmission is answered OK again (§4) */
    uint8_t reset_done, session, have_last;
    uint32_t last_seq;
    uint8_t last_type, last_flags, last_status;
    uint32_t last_len;
    uint8_t resp[FW_MAX_PAYLOAD]; /* the last response's payload: resent as is for a duplicate request */
    fw_decoder dec;
    graph_slot graphs[FW_MAX_GRAPHS];
    handle_slot handles[FW_MAX_HANDLES];
    uint32_t frames_ok, frames_bad, duplicates, stale, invokes, bytes_rx, bytes_tx, compute_us;
} S;

static fw_graph G; /* the graph being checked or run: re-read from its blob each time */

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static void wr16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void wr32(uint8_t *p, uint32_t v) { wr16(p, v); wr16(p + 2, v >> 16); }

static void sink(const uint8_t *p, size_t n) {
    S.bytes_tx += (uint32_t)n;
    hal_write(p, n);
}

void fw_init(uint32_t boot_id) {
    uint32_t limit = S.arena_limit;
    memset(&S, 0, sizeof S);
    S.boot_id = boot_id;
    S.arena_limit = limit;
    arena_init(limit);
}

void fw_set_arena_limit(uint32_t bytes) {
    S.arena_limit = bytes;
    arena_init(bytes);
}

static uint64_t fnv1a64(const uint8_t *p, uint32_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static graph_slot *find_graph(uint64_t hash) {
    for (uint32_t i = 0; i < FW_MAX_GRAPHS; i++)
        if (S.graphs[i].state && S.graphs[i].hash == hash) return &S.graphs[i];
    return NULL;
}

static void drop_graph(graph_slot *g) {
    arena_free(g->act);
    arena_free(g->blob);
    memset(g, 0, sizeof *g);
}

/* ready graphs no request of the current host session has named: another host's cache, dropped for room */
static int drop_unused_graphs(void) {
    int n = 0;
    for (uint32_t i = 0; i < FW_MAX_GRAPHS; i++)
        if (S.graphs[i].state == 2 && !S.graphs[i].used) drop_graph(&S.graphs[i]), n++;
    return n;
}

static uint8_t *alloc_room(uint32_t nbytes) {
    uint8_t *p = arena_alloc(nbytes);
    return p || !drop_unused_graphs() ? p : arena_alloc(nbytes);
}

/* a HELLO from another host session: the previous host's tensors and unfinished loads are orphans (it failed over,
 * crashed or reconnected, and holds their handles no more), freed here; its ready graphs stay as a cache */
static void new_host_session(uint32_t host) {
    for (uint32_t i = 0; i < FW_MAX_HANDLES; i++) arena_free(S.handles[i].p);
    memset(S.handles, 0, sizeof S.handles);
    for (uint32_t i = 0; i < FW_MAX_GRAPHS; i++) {
        if (S.graphs[i].state == 1) drop_graph(&S.graphs[i]);
        S.graphs[i].used = 0;
    }
    S.host = host;
}

static handle_slot *find_handle(uint32_t h) {
    return (h >= 1 && h <= FW_MAX_HANDLES && S.handles[h - 1].p) ? &S.handles[h - 1] : NULL;
}

/* ---- one request -> the response in S.resp / S.last_len, the status returned ---- */

#define ERR(code, text) do { const char *t_ = (text); size_t l_ = strlen(t_); memcpy(S.resp, t_, l_); S.last_len = (uint32_t)l_; return (code); } while (0)

static int hello(const uint8_t *p, uint32_t n) {
    static const uint8_t ops[] = {FW_OP_MATMUL_INTEGER, FW_OP_QLINEAR_MATMUL, FW_OP_CONV_INTEGER, FW_OP_QLINEAR_CONV,
                                  FW_OP_ADD, FW_OP_MUL, FW_OP_RELU, FW_OP_COPY, FW_OP_MATMUL_QBLOCK, FW_OP_CLIP,
                                  FW_OP_FC_S8, FW_OP_CONV2D_S8, FW_OP_DWCONV2D_S8, FW_OP_ADD_S8, FW_OP_AVGPOOL_S8,
                                  FW_OP_CONCAT};
    static const char fw[] = FW_VERSION_STRING;
    /* what this build holds (§3.1), so the host sizes graphs and keeps its tensors to it */
    static const uint16_t limits[] = {FW_MAX_TENSORS, FW_MAX_NODES, FW_MAX_IO, FW_MAX_HANDLES, FW_MAX_GRAPHS};
    uint8_t *r = S.resp;
    wr16(r, FW_PROTOCOL_VERSION);
    wr16(r + 2, 0);
    wr32(r + 4, S.boot_id);
    wr32(r + 8, arena_capacity());
    wr32(r + 12, FW_MAX_PAYLOAD);
    wr32(r + 16, 1u << FW_DT_INT8 | 1u << FW_DT_UINT8 | 1u << FW_DT_INT32 | 1u << FW_DT_Q4_0 | 1u << FW_DT_Q4_1 |
                     1u << FW_DT_Q8_0);
    r[20] = (uint8_t)sizeof ops;
    r[21] = (uint8_t)(sizeof fw - 1);
    memcpy(r + 22, ops, sizeof ops);
    memcpy(r + 22 + sizeof ops, fw, sizeof fw - 1);
    uint8_t *l = r + 22 + sizeof ops + sizeof fw - 1;
    l[0] = (uint8_t)(sizeof limits / sizeof limits[0]);
    for (uint32_t i = 0; i < l[0]; i++) wr16(l + 1 + 2 * i, limits[i]);
    S.last_len = (uint32_t)(l + 1 + sizeof limits - r);
    /* a payload too short to hold a version is malformed, not another version; another version may lay HELLO out
     * otherwise, so its length is checked only once the version is ours: u16 version, u16 0, [u32 host session] */
    if (n < 2) ERR(FW_ERR_BAD_REQUEST, "HELLO: u16 version, u16 0, u32 host session (may be left out)");
    if ((uint32_t)(p[0] | p[1] << 8) != FW_PROTOCOL_VERSION) return FW_ERR_VERSION;
    if (n != 4 && n != 8) ERR(FW_ERR_BAD_REQUEST, "HELLO: u16 version, u16 0, u32 host session (may be left out)");
    if (n == 8 && rd32(p + 4) != 0 && rd32(p + 4) != S.host) new_host_session(rd32(p + 4));
    S.session = 1;
    return FW_OK;
}

static int load_begin(const uint8_t *p, uint32_t n) {
    if (n != 12) ERR(FW_ERR_BAD_REQUEST, "LOAD_BEGIN: hash u64, length u32");
    uint64_t hash = rd64(p);
    uint32_t len = rd32(p + 8);
    graph_slot *g = find_graph(hash);
    S.last_len = 1;
    if (g && g->state == 2) { g->used = 1; S.resp[0] = 1; return FW_OK; }
    if (g) drop_graph(g);
    for (int pass = 0; pass < 2 && !g; pass++) {
        for (uint32_t i = 0; i < FW_MAX_GRAPHS && !g; i++)
            if (!S.graphs[i].state) g = &S.graphs[i];
        if (!g && !drop_unused_graphs()) break;
    }
    if (!g) ERR(FW_ERR_NOMEM, "no free graph slot: UNLOAD a graph first");
    if (len == 0 || len > arena_capacity()) ERR(FW_ERR_NOMEM, "graph larger than the arena");
    g->blob = alloc_room(len);
    if (!g->blob) ERR(FW_ERR_NOMEM, "graph does not fit in the free arena");
    g->hash = hash;
    g->len = len;
    g->state = 1;
    g->used = 1;
    S.resp[0] = 0;
    S.last_len = 1;
    return FW_OK;
}

static int load_chunk(const uint8_t *p, uint32_t n) {
    if (n < 12) ERR(FW_ERR_BAD_REQUEST, "LOAD_CHUNK: hash u64, offset u32, bytes");
    graph_slot *g = find_graph(rd64(p));
    uint32_t off = rd32(p + 8), len = n - 12;
    if (!g || g->state != 1) ERR(FW_ERR_NO_GRAPH, "LOAD_CHUNK: no load of this hash in progress");
    if (off > g->len || g->len - off < len) ERR(FW_ERR_RANGE, "LOAD_CHUNK: past the announced length");
    memcpy(g->blob + off, p + 12, len);
    return FW_OK;
}

static const char *graph_msg;

static int load_commit(const uint8_t *p, uint32_t n) {
    if (n != 8) ERR(FW_ERR_BAD_REQUEST, "LOAD_COMMIT: hash u64");
    graph_slot *g = find_graph(rd64(p));
    if (!g) ERR(FW_ERR_NO_GRAPH, "LOAD_COMMIT: no load of this hash");
    if (g->state == 2) { wr32(S.resp, g->act_bytes); S.last_len = 4; return FW_OK; }
    if (fnv1a64(g->blob, g->len) != g->hash) { drop_graph(g); ERR(FW_ERR_HASH, "LOAD_COMMIT: content does not match its hash"); }
    int rc = fw_graph_parse(&G, g->blob, g->len, &graph_msg);
    if (rc) { drop_graph(g); ERR(rc, graph_msg); }
    g->act_bytes = G.act_bytes;
    g->act = alloc_room(G.act_bytes ? G.act_bytes : 8);
    if (!g->act) { drop_graph(g); ERR(FW_ERR_NOMEM, "graph activations do not fit in the free arena"); }
    g->state = 2;
    wr32(S.resp, g->act_bytes);
    S.last_len = 4;
    return FW_OK;
}

static int unload(const uint8_t *p, uint32_t n) {
    if (n != 8) ERR(FW_ERR_BAD_REQUEST, "UNLOAD: hash u64");
    graph_slot *g = find_graph(rd64(p));
    if (g) drop_graph(g);
    return FW_OK;
}

static int alloc(const uint8_t *p, uint32_t n) {
    if (n != 4) ERR(FW_ERR_BAD_REQUEST, "ALLOC: nbytes u32");
    for (uint32_t i = 0; i < FW_MAX_HANDLES; i++) {
        if (S.handles[i].p) continue;
        uint32_t nb = rd32(p);
        S.handles[i].p = alloc_room(nb);
        if (!S.handles[i].p) ERR(FW_ERR_NOMEM, "ALLOC: does not fit in the free arena");
        S.handles[i].n = nb;
        wr32(S.resp, i + 1);
        S.last_len = 4;
        return FW_OK;
    }
    ERR(FW_ERR_NOMEM, "ALLOC: no free tensor handle");
}

static int free_(const uint8_t *p, uint32_t n) {
    if (n != 4) ERR(FW_ERR_BAD_REQUEST, "FREE: handle u32");
    handle_slot *h = find_handle(rd32(p));
    if (!h) ERR(FW_ERR_HANDLE, "FREE: unknown handle");
    arena_free(h->p);
    h->p = NULL;
    h->n = 0;
    return FW_OK;
}

static int write_(const uint8_t *p, uint32_t n) {
    if (n < 8) ERR(FW_ERR_BAD_REQUEST, "WRITE: handle u32, offset u32, bytes");
    handle_slot *h = find_handle(rd32(p));
    uint32_t off = rd32(p + 4), len = n - 8;
    if (!h) ERR(FW_ERR_HANDLE, "WRITE: unknown handle");
    if (off > h->n || h->n - off < len) ERR(FW_ERR_RANGE, "WRITE: past the end of the tensor");
    memcpy(h->p + off, p + 8, len);
    return FW_OK;
}

static int read_(const uint8_t *p, uint32_t n) {
    if (n != 12) ERR(FW_ERR_BAD_REQUEST, "READ: handle u32, offset u32, length u32");
    handle_slot *h = find_handle(rd32(p));
    uint32_t off = rd32(p + 4), len = rd32(p + 8);
    if (!h) ERR(FW_ERR_HANDLE, "READ: unknown handle");
    if (len > FW_MAX_PAYLOAD || off > h->n || h->n - off < len) ERR(FW_ERR_RANGE, "READ: past the end or the frame");
    memcpy(S.resp, h->p + off, len);
    S.last_len = len;
    return FW_OK;
}

static int invoke(const uint8_t *p, uint32_t n) {
    if (n < 12) ERR(FW_ERR_BAD_REQUEST, "INVOKE: hash u64, n_in u16, n_out u16, handles u32[]");
    graph_slot *gs = find_graph(rd64(p));
    uint32_t ni = (uint32_t)(p[8] | p[9] << 8), no = (uint32_t)(p[10] | p[11] << 8);
    if (!gs || gs->state != 2) ERR(FW_ERR_NO_GRAPH, "INVOKE: graph not loaded (LOAD it by hash first)");
    gs->used = 1;
    if (n != 12 + 4 * (ni + no)) ERR(FW_ERR_BAD_REQUEST, "INVOKE: handle count does not match the length");
    int rc = fw_graph_parse(&G, gs->blob, gs->len, &graph_msg);
    if (rc) ERR(rc, graph_msg);
    if (ni != G.n_inputs || no != G.n_outputs) ERR(FW_ERR_SHAPE, "INVOKE: input/output count differs from the graph's");
    for (uint32_t i = 0; i < ni + no; i++) {
        handle_slot *h = find_handle(rd32(p + 12 + 4 * i));
        fw_tensor *t = &G.t[i < ni ? G.inputs[i] : G.outputs[i - ni]];
        if (!h) ERR(FW_ERR_HANDLE, "INVOKE: unknown handle");
        if (h->n != t->nbytes) ERR(FW_ERR_SHAPE, "INVOKE: tensor size differs from the graph's");
        t->data = h->p;
    }
    uint32_t t0 = hal_clock_us();
    rc = fw_graph_run(&G, gs->act, &graph_msg);
    uint32_t dt = hal_clock_us() - t0;
    if (rc) ERR(rc, graph_msg);
    hal_compute_done(G.ops, dt);
    dt = hal_clock_us() - t0;
    S.invokes++;
    S.compute_us += dt;
    wr32(S.resp, dt);
    wr32(S.resp + 4, (uint32_t)G.ops);
    wr32(S.resp + 8, (uint32_t)(G.ops >> 32));
    S.last_len = 12;
    return FW_OK;
}

static int stats(void) {
    uint32_t graphs = 0, tensors = 0;
    for (uint32_t i = 0; i < FW_MAX_GRAPHS; i++) graphs += S.graphs[i].state == 2;
    for (uint32_t i = 0; i < FW_MAX_HANDLES; i++) tensors += S.handles[i].p != NULL;
    const uint32_t v[] = {S.boot_id, S.frames_ok, S.frames_bad, S.duplicates, S.stale, S.invokes, S.bytes_rx,
                          S.bytes_tx, arena_capacity(), arena_used(), arena_high_water(), graphs, tensors, S.compute_us};
    for (uint32_t i = 0; i < sizeof v / sizeof v[0]; i++) wr32(S.resp + 4 * i, v[i]);
    S.last_len = (uint32_t)sizeof v;
    return FW_OK;
}

/* an answer that is not cached (the cache keeps the last executed command's) */
static void send_error(uint8_t type, uint8_t status, uint32_t seq, const char *text) {
    fw_send_frame(sink, type, FW_FLAG_RESPONSE | FW_FLAG_ERROR, status, seq, (const uint8_t *)text, strlen(text));
}

static void handle_frame(const uint8_t *f, uint32_t len) {
    const uint8_t version = f[0], type = f[1], flags = f[2];
    const uint32_t seq = rd32(f + 4), n = len - FW_HEADER_BYTES - FW_CRC_BYTES;
    const uint8_t *p = f + FW_HEADER_BYTES;
    int status;
    if (flags & FW_FLAG_RESPONSE) return; /* our own echo on a loopback, or a confused peer */
    if (version != FW_PROTOCOL_VERSION && type != FW_MSG_HELLO) {
        send_error(type, FW_ERR_VERSION, seq, "protocol version differs: send HELLO");
        return;
    }
    if (type == FW_MSG_HELLO) {
        status = hello(p, n);
        S.have_last = 1; /* refused (ERR_VERSION) too: it sets the remembered seq (§4), so an older request is stale */
        goto send;
    }
    if (!S.session) {
        if (type == FW_MSG_RESET && S.reset_done && seq == S.reset_seq) { /* its answer was lost: done already */
            S.duplicates++;
            fw_send_frame(sink, type, FW_FLAG_RESPONSE, FW_OK, seq, NULL, 0);
            return;
        }
        send_error(type, FW_ERR_NO_SESSION, seq, "no session: send HELLO");
        return;
    }
    if (S.have_last && seq == S.last_seq) { /* a retransmission: answer again, never execute again */
        S.duplicates++;
        fw_send_frame(sink, S.last_type, S.last_flags, S.last_status, S.last_seq, S.resp, S.last_len);
        return;
    }
    if (S.have_last && (int32_t)(seq - S.last_seq) < 0) {
        S.stale++;
        send_error(type, FW_ERR_STALE, seq, "stale sequence number");
        return;
    }
    S.last_len = 0;
    switch (type) {
    case FW_MSG_LOAD_BEGIN: status = load_begin(p, n); break;
    case FW_MSG_LOAD_CHUNK: status = load_chunk(p, n); break;
    case FW_MSG_LOAD_COMMIT: status = load_commit(p, n); break;
    case FW_MSG_UNLOAD: status = unload(p, n); break;
    case FW_MSG_ALLOC: status = alloc(p, n); break;
    case FW_MSG_FREE: status = free_(p, n); break;
    case FW_MSG_WRITE: status = write_(p, n); break;
    case FW_MSG_READ: status = read_(p, n); break;
    case FW_MSG_INVOKE: status = invoke(p, n); break;
    case FW_MSG_STATS: status = stats(); break;
    case FW_MSG_RESET: {
        uint32_t boot = S.boot_id + 1;
        fw_send_frame(sink, type, FW_FLAG_RESPONSE, FW_OK, seq, NULL, 0);
        fw_init(boot); /* clears the response cache with everything else: the RESET's seq is kept on its own */
        S.reset_seq = seq;
        S.reset_done = 1;
        return;
    }
    default:
        status = FW_ERR_UNKNOWN_TYPE;
        memcpy(S.resp, "unknown message type", 20);
        S.last_len = 20;
        break;
    }
    S.have_last = 1;
send:
    S.last_seq = seq;
    S.last_type = type;
    S.last_flags = (uint8_t)(FW_FLAG_RESPONSE | (status ? FW_FLAG_ERROR : 0));
    S.last_status = (uint8_t)status;
    fw_send_frame(sink, type, S.last_flags, S.last_status, seq, S.resp, S.last_len);
}

void fw_rx(const uint8_t *bytes, size_t n) {
    for (size_t i = 0; i < n; i++) {
        S.bytes_rx++;
        int r = fw_decoder_feed(&S.dec, bytes[i]);
        if (r > 0) {
            S.frames_ok++;
            uint32_t len = (uint32_t)S.dec.len;
            fw_decoder_reset(&S.dec);
            handle_frame(S.dec.buf, len);
        } else if (r < 0) {
            S.frames_bad++;
            fw_send_frame(sink, FW_MSG_NAK, FW_FLAG_RESPONSE | FW_FLAG_ERROR, FW_ERR_BAD_REQUEST, S.last_seq, NULL, 0);
        }
    }
}
