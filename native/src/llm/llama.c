/* llm/llama.c — the llama-family forward pass over a KV cache, in the shape of llama2.c's run.c.
 *
 * Config (hyper-parameters), Weights (pointers into the caller's memory, e.g. a memory-mapped GGUF) and RunState
 * (activations + KV cache, allocated once by et_llama_build) are separate. The forward pass never allocates.
 * Projections go through the kernel table (GEMM for a batch of tokens, GEMV for one); attention runs per
 * (token, kv head) on the thread pool, the query heads of the group together, over an fp16 KV cache: keys transposed
 * within tiles of 32 positions, so the scores take one position per lane with no horizontal sums, and values by
 * position, so their weighted sum reads one contiguous run; both through gemv_t_f16.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "../core.h"

typedef struct {
    et_tensor token_embd;  /* (vocab, dim) */
    et_tensor output_norm; /* (dim) f32 */
    et_tensor output;      /* (vocab, dim) */
    et_tensor *layers;     /* n_layers * ET_LAYER_ROLES */
} Weights;

enum { ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN, ET_LAYER_ROLES };

typedef struct {
    float *x;          /* (n_batch, dim) residual stream */
    float *xb;         /* (n_batch, max(dim, q_dim)) normed input / attention output */
    float *xb2;        /* (n_batch, dim) projection output */
    float *q;          /* (n_batch, q_dim) */
    float *k;          /* (n_batch, kv_dim) */
    float *v;          /* (n_batch, kv_dim) */
    float *hb;         /* (n_batch, hidden_dim) */
    float *hb2;        /* (n_batch, hidden_dim) */
    float *att;        /* (n_heads * n_batch, n_ctx) attention scores, one row per (token, head) task */
    float *rope;       /* (n_batch, head_dim) cos, sin pairs for the batch's positions */
    float *inv_freq;   /* (head_dim / 2) */
    block_q8_s *xq;    /* (n_batch, max_k / 32) quantized activations */
    et_half *key_cache;   /* (layer, kv_head, n_ctx / ET_KT, head_dim, ET_KT): keys transposed within tiles of
                             ET_KT positions, so a tile's scores read one contiguous 4 KB run, one position per lane */
    et_half *value_cache; /* (layer, kv_head, n_ctx, head_dim): by position, so out = att @ V reads one contiguous
                             run of len * head_dim values, head_dim columns at a time (gemv_t_f16) */
    size_t bytes;
} RunState;

struct et_llama {
    et_llama_config cfg;
    Weights w;
    RunState s;
    int q_dim, kv_dim, max_k;
    int ctx_tiles; /* n_ctx rounded up to whole key tiles, in tiles */
};

/* projections may be repacked (et_repack: x16 types); the token embedding is read a row at a time, so not it */
static int is_matrix_type(int t) { return et_is_block_type(t) || t == ET_TYPE_F16 || t == ET_TYPE_F32; }

static const char *role_name(int i) {
    static const char *names[] = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                  "ffn_norm",  "ffn_gate", "ffn_up", "ffn_down"};
    return names[i];
}

/* what a tensor may be: a norm vector (f32), a matrix (any matrix type), the token embedding (no x16: rows are
 * looked up one at a time) */
enum { T_MATRIX, T_NORM, T_EMBD };

static int check_tensor(const et_tensor *t, const char *what, int layer, int64_t rows, int64_t cols, int kind) {
    if (!t->data) return et_error(ET_ERR_INVALID, "tensor %s (layer %d) has no data", what, layer);
    const int norm = kind == T_NORM, embd = kind == T_EMBD;
    if (norm ? t->type != ET_TYPE_F32 : !is_matrix_type(t->type) || (embd && et_x16_base(t->type) >= 0))
        return et_error(ET_ERR_INVALID, "tensor %s (layer %d) has type %d: expected %s", what, layer, t->type,
                        norm ? "f32" : embd ? "one of f32, f16, q4_0, q4_1, q8_0" : "one of f32, f16, q4_0, q4_1, q8_0 "
                        "or their x16 repacking");
    const size_t rs = et_row_size(t->type, cols);
    if (rs == 0)
        return et_error(ET_ERR_INVALID, "tensor %s (layer %d): rows of %lld values do not fit type %d", what, layer,
                        (long long)cols, t->type);
    const int64_t stored = et_x16_base(t->type) >= 0 ? et_x16_tiles(rows) * 16 : rows; /* x16: whole tiles */
    if ((int64_t)(rs * (size_t)stored) != t->nbytes)
        return et_error(ET_ERR_INVALID, "tensor %s (layer %d) holds %lld bytes: shape (%lld, %lld) needs %zu", what,
                        layer, (long long)t->nbytes, (long long)rows, (long long)cols, rs * (size_t)stored);
    return ET_OK;
}

#define ET_KT 32 /* positions per key tile */

static int check_config(const et_llama_config *c) {
    const int32_t v[] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                         c->vocab_size, c->n_ctx, c->n_batch};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (v[i] <= 0 || v[i] > (1 << 24)) return et_error(ET_ERR_INVALID, "llama config field %zu = %d out of range", i, v[i]);
    if (c->n_heads % c->n_kv_heads)
        return et_error(ET_ERR_INVALID, "n_heads=%d must be a multiple of n_kv_heads=%d", c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2) return et_error(ET_ERR_INVALID, "head_dim=%d must be even (RoPE rotates pairs)", c->head_dim);
    if (!(c->rope_base > 0.0f) || !(c->norm_eps > 0.0f) || !isfinite(c->rope_base) || !isfinite(c->norm_eps))
        return et_error(ET_ERR_INVALID, "rope_base and norm_eps must be positive and finite");
    return ET_OK;
}

void et_llama_free(et_llama *m) {
    if (!m) return;
    RunState *s = &m->s;
    void *bufs[] = {s->x,   s->xb,   s->xb2,      s->q,  s->k,         s->v,          s->hb,
                    s->hb2, s->att,  s->rope,     s->inv_freq, s->xq, s->key_cache, s->value_cache};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(m->w.layers);
    free(m);
}

static void *alloc(et_llama *m, size_t n, size_t size, int *failed) {
    void *p = calloc(n, size);
    if (!p) *failed = 1;
    m->s.bytes += n * size;
    return p;
}

int et_llama_build(const et_llama_config *cfg, const et_tensor *t, int32_t n_tensors, et_llama **out) {
    if (!cfg || !t || !out) return et_error(ET_ERR_INVALID, "et_llama_build got a NULL argument");
    *out = NULL;
    int st = check_config(cfg);
    if (st) return st;
    if (n_tensors != 3 + ET_LAYER_ROLES * cfg->n_layers)
        return et_error(ET_ERR_INVALID, "expected %d tensors for %d layers, got %d", 3 + ET_LAYER_ROLES * cfg->n_layers,
                        cfg->n_layers, n_tensors);
    const int64_t dim = cfg->dim, hid = cfg->hidden_dim, q_dim = (int64_t)cfg->n_heads * cfg->head_dim,
                  kv_dim = (int64_t)cfg->n_kv_heads * cfg->head_dim, vocab = cfg->vocab_size;
    if ((st = check_tensor(&t[0], "token_embd", -1, vocab, dim, T_EMBD))) return st;
    if ((st = check_tensor(&t[1], "output_norm", -1, 1, dim, T_NORM))) return st;
    if ((st = check_tensor(&t[2], "output", -1, vocab, dim, T_MATRIX))) return st;
    for (int l = 0; l < cfg->n_layers; l++) {
        const et_tensor *lt = t + 3 + ET_LAYER_ROLES * l;
        const int64_t shapes[ET_LAYER_ROLES][2] = {{1, dim},   {q_dim, dim}, {kv_dim, dim}, {kv_dim, dim}, {dim, q_dim},
                                                   {1, dim},   {hid, dim},   {hid, dim},    {dim, hid}};
        for (int r = 0; r < ET_LAYER_ROLES; r++) {
            const int kind = r == ATTN_NORM || r == FFN_NORM ? T_NORM : T_MATRIX;
            if ((st = check_tensor(&lt[r], role_name(r), l, shapes[r][0], shapes[r][1], kind))) return st;
        }
    }

    et_llama *m = calloc(1, sizeof *m);
    if (!m) return et_error(ET_ERR_NOMEM, "out of memory building the model");
    m->cfg = *cfg;
    m->q_dim = (int)q_dim;
    m->kv_dim = (int)kv_dim;
    m->max_k = (int)(dim > q_dim ? dim : q_dim);
    if (hid > m->max_k) m->max_k = (int)hid;
    m->w.token_embd = t[0];
    m->w.output_norm = t[1];
    m->w.output = t[2];
    m->w.layers = malloc(sizeof(et_tensor) * ET_LAYER_ROLES * (size_t)cfg->n_layers);
    int failed = m->w.layers == NULL;
    if (!failed) memcpy(m->w.layers, t + 3, sizeof(et_tensor) * ET_LAYER_ROLES * (size_t)cfg->n_layers);

    const size_t B = (size_t)cfg->n_batch, L = (size_t)cfg->n_layers, T = (size_t)cfg->n_ctx;
    RunState *s = &m->s;
    s->x = alloc(m, B * dim, sizeof(float), &failed);
    s->xb = alloc(m, B * (size_t)m->max_k, sizeof(float), &failed);
    s->xb2 = alloc(m, B * dim, sizeof(float), &failed);
    s->q = alloc(m, B * q_dim, sizeof(float), &failed);
    s->k = alloc(m, B * kv_dim, sizeof(float), &failed);
    s->v = alloc(m, B * kv_dim, sizeof(float), &failed);
    s->hb = alloc(m, B * hid, sizeof(float), &failed);
    s->hb2 = alloc(m, B * hid, sizeof(float), &failed);
    s->att = alloc(m, (size_t)cfg->n_heads * B * T, sizeof(float), &failed);
    s->rope = alloc(m, B * (size_t)cfg->head_dim, sizeof(float), &failed);
    s->inv_freq = alloc(m, (size_t)cfg->head_dim / 2, sizeof(float), &failed);
    s->xq = alloc(m, B * (size_t)(m->max_k / ET_QK + 1), sizeof(block_q8_s), &failed);
    m->ctx_tiles = (cfg->n_ctx + ET_KT - 1) / ET_KT;
    s->key_cache = alloc(m, L * (size_t)m->ctx_tiles * ET_KT * kv_dim, sizeof(et_half), &failed);
    s->value_cache = alloc(m, L * kv_dim * T, sizeof(et_half), &failed);
    if (failed) {
        const size_t bytes = s->bytes;
        et_llama_free(m);
        return et_error(ET_ERR_NOMEM, "could not allocate %zu bytes of run state and KV cache (n_ctx=%d, n_batch=%d)",
                        bytes, cfg->n_ctx, cfg->n_batch);
    }
    for (int i = 0; i < cfg->head_dim / 2; i++)
        s->inv_freq[i] = (float)pow((double)cfg->rope_base, -2.0 * i / (double)cfg->head_dim);
    *out = m;
    return ET_OK;
}

size_t et_llama_state_bytes(const et_llama *m) { return m ? m->s.bytes : 0; }

/* ---- building blocks ---- */

static void rmsnorm(float *o, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int j = 0; j < n; j++) o[j] = w[j] * (scale * x[j]);
}

/* y (m, n) = x (m, k) @ w^T. Block formats need x quantized into s->xq; *xq_ready says it already is (several
 * projections of the same input share one quantization) */
static int matmul(et_llama *mo, const et_tensor *w, int64_t n, int64_t k, const float *x, int64_t m, float *y,
                  int *xq_ready, int nth) {
    if (!et_is_block_type(w->type))
        return et_gemm_prepared(w->type, w->data, n, k, x, (size_t)k * sizeof(float), m, y, (size_t)n, nth);
    const size_t xs = (size_t)(k / ET_QK) * sizeof(block_q8_s);
    if (!*xq_ready) {
        if (et_quantize_rows_q8_s(x, m, k, mo->s.xq, nth) >= 0)
            return et_error(ET_ERR_INVALID, "activations became NaN or Inf (the weights may be corrupt)");
        *xq_ready = 1;
    }
    return et_gemm_prepared(w->type, w->data, n, k, mo->s.xq, xs, m, y, (size_t)n, nth);
}

/* rotate each (even, odd) pair of a head by position * inv_freq: the GGUF llama (normal, non-NeoX) RoPE */
static void rope(float *v, int n_heads, int hd, const float *cs) {
    for (int h = 0; h < n_heads; h++) {
        float *p = v + h * hd;
        for (int i = 0; i < hd / 2; i++) {
            const float c = cs[2 * i], s = cs[2 * i + 1];
            const float a = p[2 * i], b = p[2 * i + 1];
            p[2 * i] = a * c - b * s;
            p[2 * i + 1] = a * s + b * c;
        }
    }
}

typedef struct {
    et_llama *m;
    int layer, n, pos;
    atomic_int next; /* next (token, kv head) task */
} attn_job;

/* one task per (token, kv head): the group of query heads that share it read its keys and values once, together */
static void attention_task(void *arg, int ith, int nth) {
    (void)ith;
    (void)nth;
    attn_job *job = arg;
    et_llama *m = job->m;
    const et_llama_config *c = &m->cfg;
    const et_kernels *kt = et_active_kernels();
    const int hd = c->head_dim, group = c->n_heads / c->n_kv_heads, kv_dim = m->kv_dim;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t T = (size_t)c->n_ctx;
    const size_t TT = (size_t)m->ctx_tiles * ET_KT; /* cache positions, whole tiles */
    const et_half *kc = m->s.key_cache + (size_t)job->layer * kv_dim * TT;
    const et_half *vc = m->s.value_cache + (size_t)job->layer * kv_dim * T;
    for (;;) {
        const int task = atomic_fetch_add(&job->next, 1);
        if (task >= job->n * c->n_kv_heads) break;
        const int t = task / c->n_kv_heads, g = task % c->n_kv_heads, h0 = g * group;
        const int len = job->pos + t + 1; /* causal: positions 0 .. pos+t */
        /* the group's queries (heads h0.., hd apart), scaled in place: this layer reads them nowhere else */
        float *q = m->s.q + (size_t)t * m->q_dim + (size_t)h0 * hd;
        for (int d = 0; d < group * hd; d++) q[d] *= scale;
        float *att = m->s.att + ((size_t)t * c->n_heads + (size_t)h0) * T; /* one row of T per head */
        /* scores = q . K[0:len, g] / sqrt(hd), one position per lane over the transposed keys */
        const et_half *kg = kc + (size_t)g * hd * TT;
        for (int p0 = 0; p0 < len; p0 += ET_KT)
            kt->gemv_t_f16(len - p0 < ET_KT ? len - p0 : ET_KT, hd, group, q, (size_t)hd, kg + (size_t)p0 * hd, ET_KT,
                           att + p0, T);
        for (int i = 0; i < group; i++) kt->softmax(att + (size_t)i * T, len);
        /* out = att[0:len] @ V[0:len, g], V stored by position: len rows of hd */
        float *out = m->s.xb + (size_t)t * m->q_dim + (size_t)h0 * hd;
        kt->gemv_t_f16(hd, len, group, att, T, vc + (size_t)g * T * hd, (size_t)hd, out, (size_t)hd);
    }
}

/* one chunk of at most n_batch tokens */
static int forward_chunk(et_llama *m, const int32_t *tokens, int n, int pos, float *logits, int logits_all, int nth) {
    const et_llama_config *c = &m->cfg;
    RunState *s = &m->s;
    const int dim = c->dim, hid = c->hidden_dim, hd = c->head_dim, q_dim = m->q_dim, kv_dim = m->kv_dim;
    const size_t T = (size_t)c->n_ctx;
    int st;

    /* token embedding: one dequantized row per token */
    const size_t erow = et_row_size(m->w.token_embd.type, dim);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
            return et_error(ET_ERR_INVALID, "token id %d at index %d is outside the vocabulary [0, %d)", tokens[t], t,
                            c->vocab_size);
        et_dequantize(m->w.token_embd.type, (const uint8_t *)m->w.token_embd.data + (size_t)tokens[t] * erow,
                      s->x + (size_t)t * dim, 1, dim);
    }
    /* RoPE angles for this chunk's positions */
    for (int t = 0; t < n; t++)
        for (int i = 0; i < hd / 2; i++) {
            const float a = (float)(pos + t) * s->inv_freq[i];
            s->rope[(size_t)t * hd + 2 * i] = cosf(a);
            s->rope[(size_t)t * hd + 2 * i + 1] = sinf(a);
        }

    for (int l = 0; l < c->n_layers; l++) {
        const et_tensor *w = m->w.layers + (size_t)ET_LAYER_ROLES * l;
        et_half *kc = s->key_cache + (size_t)l * kv_dim * m->ctx_tiles * ET_KT;
        et_half *vc = s->value_cache + (size_t)l * kv_dim * T;

        /* attention: xb = rmsnorm(x); q, k, v = xb @ Wq, Wk, Wv */
        for (int t = 0; t < n; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, w[ATTN_NORM].data, dim, c->norm_eps);
        int ready = 0;
        if ((st = matmul(m, &w[ATTN_Q], q_dim, dim, s->xb, n, s->q, &ready, nth))) return st;
        if ((st = matmul(m, &w[ATTN_K], kv_dim, dim, s->xb, n, s->k, &ready, nth))) return st;
        if ((st = matmul(m, &w[ATTN_V], kv_dim, dim, s->xb, n, s->v, &ready, nth))) return st;

        /* RoPE on q and k, then k (transposed in tiles) and v (by position) into the fp16 cache */
        for (int t = 0; t < n; t++) {
            const float *cs = s->rope + (size_t)t * hd;
            rope(s->q + (size_t)t * q_dim, c->n_heads, hd, cs);
            rope(s->k + (size_t)t * kv_dim, c->n_kv_heads, hd, cs);
            const size_t p = (size_t)pos + t;
            for (int j = 0; j < kv_dim; j++) {
                const size_t g = (size_t)j / hd, d = (size_t)j % hd;
                kc[(g * m->ctx_tiles + p / ET_KT) * hd * ET_KT + d * ET_KT + p % ET_KT] =
                    et_fp32_to_fp16(s->k[(size_t)t * kv_dim + j]);
                vc[(g * T + p) * hd + d] = et_fp32_to_fp16(s->v[(size_t)t * kv_dim + j]);
            }
        }

        /* multi-head attention over positions 0 .. pos+t, heads sharing kv heads in groups */
        attn_job job = {.m = m, .layer = l, .n = n, .pos = pos};
        atomic_init(&job.next, 0);
        const double attn_macs = 2.0 * n * c->n_heads * (pos + n) * hd;
        if ((st = et_parallel(attention_task, &job, attn_macs < 32768.0 ? 1 : nth))) return st;

        /* x += xb @ Wo */
        ready = 0;
        if ((st = matmul(m, &w[ATTN_OUT], dim, q_dim, s->xb, n, s->xb2, &ready, nth))) return st;
        for (size_t i = 0; i < (size_t)n * dim; i++) s->x[i] += s->xb2[i];

        /* SwiGLU feed-forward: x += (silu(xb @ Wgate) * (xb @ Wup)) @ Wdown, xb = rmsnorm(x) */
        for (int t = 0; t < n; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, w[FFN_NORM].data, dim, c->norm_eps);
        ready = 0;
        if ((st = matmul(m, &w[FFN_GATE], hid, dim, s->xb, n, s->hb, &ready, nth))) return st;
        if ((st = matmul(m, &w[FFN_UP], hid, dim, s->xb, n, s->hb2, &ready, nth))) return st;
        for (size_t i = 0; i < (size_t)n * hid; i++) {
            const float g = s->hb[i];
            s->hb[i] = g / (1.0f + expf(-g)) * s->hb2[i];
        }
        ready = 0;
        if ((st = matmul(m, &w[FFN_DOWN], dim, hid, s->hb, n, s->xb2, &ready, nth))) return st;
        for (size_t i = 0; i < (size_t)n * dim; i++) s->x[i] += s->xb2[i];
    }

    /* final norm and the output head: every position's logits, or the last one's (none for a leading chunk) */
    if (!logits) return ET_OK;
    int ready = 0;
    const int first = logits_all ? 0 : n - 1;
    for (int t = first; t < n; t++)
        rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, m->w.output_norm.data, dim, c->norm_eps);
    return matmul(m, &m->w.output, c->vocab_size, dim, s->xb + (size_t)first * dim, n - first, logits, &ready, nth);
}

int et_llama_forward(et_llama *m, const int32_t *tokens, int32_t n, int32_t pos, float *logits, int32_t logits_all,
                     int32_t nthreads) {
    if (!m || !tokens || !logits) return et_error(ET_ERR_INVALID, "et_llama_forward got a NULL argument");
    if (n <= 0 || pos < 0) return et_error(ET_ERR_INVALID, "need n >= 1 tokens and pos >= 0, got n=%d pos=%d", n, pos);
    if ((int64_t)pos + n > m->cfg.n_ctx)
        return et_error(ET_ERR_RANGE, "context full: positions %d..%d do not fit the KV cache of n_ctx=%d", pos,
                        pos + n - 1, m->cfg.n_ctx);
    for (int32_t done = 0; done < n;) {
        const int32_t chunk = n - done < m->cfg.n_batch ? n - done : m->cfg.n_batch;
        const int last = done + chunk == n;
        float *out = logits_all ? logits + (size_t)done * m->cfg.vocab_size : logits;
        /* intermediate chunks of a last-only call still need their KV entries, not their logits */
        int st;
        if (logits_all || last)
            st = forward_chunk(m, tokens + done, chunk, pos + done, out, logits_all, nthreads);
        else
            st = forward_chunk(m, tokens + done, chunk, pos + done, NULL, 0, nthreads);
        if (st) return st;
        done += chunk;
    }
    return ET_OK;
}
