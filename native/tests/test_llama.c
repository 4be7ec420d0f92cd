/* test_llama.c — the llama decoder at C level: argument checks in et_llama_build / et_llama_forward, and a tiny
 * random model run whole, token by token and across the context limit, on every ISA variant. Its point is the
 * sanitizer build: every buffer the decoder touches is exercised at its edges (last position, last batch slot). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* token by token vs one batched pass: summation order only, but one flipped 8-bit activation rounding moves a
 * logit by a few quantization steps of the logits' magnitude */
#define BUDGET_STEP_VS_BATCH 1e-2

enum { DIM = 64, HID = 96, LAYERS = 2, HEADS = 4, KV_HEADS = 2, HEAD_DIM = 16, VOCAB = 50, CTX = 24, BATCH = 5 };
#define N_TENSORS (3 + 9 * LAYERS)

typedef struct {
    et_tensor t[N_TENSORS];
    void *bufs[N_TENSORS];
    int64_t rows[N_TENSORS], cols[N_TENSORS];
} tiny_model;

static void make_tensor(tiny_model *m, int i, int type, int64_t rows, int64_t cols, float scale, float bias) {
    float *f = xmalloc(sizeof(float) * (size_t)(rows * cols));
    for (int64_t j = 0; j < rows * cols; j++) f[j] = bias + scale * rng_normal();
    const size_t bytes = et_row_size(type, cols) * (size_t)rows;
    m->bufs[i] = xmalloc(bytes);
    check(et_quantize(type, f, m->bufs[i], rows, cols) == ET_OK, "quantize tensor %d", i);
    free(f);
    m->t[i] = (et_tensor){.data = m->bufs[i], .type = type, .nbytes = (int64_t)bytes};
    m->rows[i] = rows, m->cols[i] = cols;
}

static void make_model(tiny_model *m, int wtype) {
    const int q = HEADS * HEAD_DIM, kv = KV_HEADS * HEAD_DIM;
    make_tensor(m, 0, ET_TYPE_Q8_0, VOCAB, DIM, 0.5f, 0.0f);
    make_tensor(m, 1, ET_TYPE_F32, 1, DIM, 0.1f, 1.0f);
    make_tensor(m, 2, wtype, VOCAB, DIM, 0.2f, 0.0f);
    for (int l = 0; l < LAYERS; l++) {
        const int b = 3 + 9 * l;
        const float s = 1.0f / sqrtf((float)DIM);
        make_tensor(m, b + 0, ET_TYPE_F32, 1, DIM, 0.1f, 1.0f);
        make_tensor(m, b + 1, wtype, q, DIM, s, 0.0f);
        make_tensor(m, b + 2, wtype, kv, DIM, s, 0.0f);
        make_tensor(m, b + 3, wtype, kv, DIM, s, 0.0f);
        make_tensor(m, b + 4, wtype, DIM, q, s, 0.0f);
        make_tensor(m, b + 5, ET_TYPE_F32, 1, DIM, 0.1f, 1.0f);
        make_tensor(m, b + 6, wtype, HID, DIM, s, 0.0f);
        make_tensor(m, b + 7, wtype, HID, DIM, s, 0.0f);
        make_tensor(m, b + 8, wtype, DIM, HID, 1.0f / sqrtf((float)HID), 0.0f);
    }
}

/* every block-format matrix but the token embedding into the x16 layout (et_repack), as LlamaModel does */
static void repack_model(tiny_model *m) {
    for (int i = 1; i < N_TENSORS; i++) {
        const int type = m->t[i].type;
        if (type != ET_TYPE_Q4_0 && type != ET_TYPE_Q4_1 && type != ET_TYPE_Q8_0) continue;
        const int64_t rows = m->rows[i], cols = m->cols[i];
        const size_t size = et_repack_size(type, rows, cols);
        void *packed = xmalloc(size);
        check(et_repack(type, m->bufs[i], rows, cols, packed, size) == ET_OK, "repack tensor %d", i);
        free(m->bufs[i]);
        m->bufs[i] = packed;
        m->t[i] = (et_tensor){.data = packed, .type = type | ET_TYPE_X16, .nbytes = (int64_t)size};
    }
}

static void free_model(tiny_model *m) {
    for (int i = 0; i < N_TENSORS; i++) free(m->bufs[i]);
}

static et_llama_config tiny_config(void) {
    return (et_llama_config){.dim = DIM, .hidden_dim = HID, .n_layers = LAYERS, .n_heads = HEADS,
                             .n_kv_heads = KV_HEADS, .head_dim = HEAD_DIM, .vocab_size = VOCAB, .n_ctx = CTX,
                             .n_batch = BATCH, .rope_base = 10000.0f, .norm_eps = 1e-5f};
}

static void test_build_errors(tiny_model *m) {
    et_llama *model = (et_llama *)1;
    et_llama_config c = tiny_config();
    check(et_llama_build(&c, m->t, N_TENSORS - 1, &model) == ET_ERR_INVALID && model == NULL, "too few tensors");
    c.n_kv_heads = 3;
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "n_heads not a multiple of n_kv_heads");
    c = tiny_config();
    c.head_dim = 15;
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "odd head_dim");
    c = tiny_config();
    c.n_ctx = 0;
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "n_ctx 0");
    c = tiny_config();
    c.rope_base = NAN;
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "NaN rope base");
    c = tiny_config();
    et_tensor saved = m->t[4];
    m->t[4].nbytes -= 1;
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "tensor one byte short");
    m->t[4] = saved;
    saved = m->t[3];
    m->t[3].type = ET_TYPE_Q4_0; /* attn_norm must be f32 */
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "norm in a block format");
    m->t[3] = saved;
    saved = m->t[5];
    m->t[5].data = NULL;
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "tensor without data");
    m->t[5] = saved;
    check(et_llama_build(NULL, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "NULL config");
    /* x16 matrices: their repacked size, and never the token embedding (read a row at a time) */
    saved = m->t[0];
    const size_t esize = et_repack_size(ET_TYPE_Q8_0, VOCAB, DIM);
    void *packed = xmalloc(esize);
    et_repack(ET_TYPE_Q8_0, saved.data, VOCAB, DIM, packed, esize);
    m->t[0] = (et_tensor){.data = packed, .type = ET_TYPE_Q8_0_X16, .nbytes = (int64_t)esize};
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "token_embd in the x16 layout");
    m->t[0] = saved;
    saved = m->t[2];
    m->t[2] = (et_tensor){.data = packed, .type = ET_TYPE_Q8_0_X16, .nbytes = (int64_t)esize - 64};
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_ERR_INVALID, "x16 output a tile short");
    m->t[2] = (et_tensor){.data = packed, .type = ET_TYPE_Q8_0_X16, .nbytes = (int64_t)esize};
    check(et_llama_build(&c, m->t, N_TENSORS, &model) == ET_OK && model != NULL, "x16 output head of its size");
    et_llama_free(model);
    m->t[2] = saved;
    free(packed);
}

static float max_abs(const float *a, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fabsf(a[i]) > m ? fabsf(a[i]) : m;
    return m;
}

static void test_forward(tiny_model *m, const char *isa, int wtype) {
    et_llama_config c = tiny_config();
    et_llama *model = NULL;
    if (et_llama_build(&c, m->t, N_TENSORS, &model) != ET_OK) {
        check(0, "%s: build: %s", isa, et_last_error());
        return;
    }
    int32_t tokens[CTX];
    for (int i = 0; i < CTX; i++) tokens[i] = (int32_t)(rng_next() % VOCAB);
    float *all = xmalloc(sizeof(float) * CTX * VOCAB), *step = xmalloc(sizeof(float) * CTX * VOCAB);
    /* the whole context in one call (chunked by n_batch inside), every position's logits */
    check(et_llama_forward(model, tokens, CTX, 0, all, 1, 2) == ET_OK, "%s/%d: full-context forward", isa, wtype);
    for (int i = 0; i < CTX; i++)
        check(et_llama_forward(model, tokens + i, 1, i, step + (size_t)i * VOCAB, 0, 1) == ET_OK, "%s: step %d", isa, i);
    float worst = 0.0f;
    for (size_t i = 0; i < (size_t)CTX * VOCAB; i++) worst = fmaxf(worst, fabsf(all[i] - step[i]));
    const float scale = max_abs(all, (size_t)CTX * VOCAB);
    check(isfinite(scale) && scale > 0.0f && worst <= BUDGET_STEP_VS_BATCH * scale,
          "%s/%d: token by token differs from batched by %g (logit scale %g)", isa, wtype, worst, scale);

    /* the limits: one past the last position, ids outside the vocabulary, empty input */
    float last[VOCAB];
    check(et_llama_forward(model, tokens, 1, CTX, last, 0, 1) == ET_ERR_RANGE, "%s: position past n_ctx", isa);
    check(et_llama_forward(model, tokens, 2, CTX - 1, last, 0, 1) == ET_ERR_RANGE, "%s: run past n_ctx", isa);
    const int32_t bad[2] = {VOCAB, -1};
    check(et_llama_forward(model, bad, 1, 0, last, 0, 1) == ET_ERR_INVALID, "%s: token id = vocab", isa);
    check(et_llama_forward(model, bad + 1, 1, 0, last, 0, 1) == ET_ERR_INVALID, "%s: negative token id", isa);
    check(et_llama_forward(model, tokens, 0, 0, last, 0, 1) == ET_ERR_INVALID, "%s: no tokens", isa);
    check(et_llama_forward(model, tokens, 1, -1, last, 0, 1) == ET_ERR_INVALID, "%s: negative position", isa);
    check(et_llama_state_bytes(model) > 0, "%s: state bytes reported", isa);
    free(all);
    free(step);
    et_llama_free(model);
}

void test_llama(void) {
    const int types[] = {ET_TYPE_Q4_0, ET_TYPE_Q4_1, ET_TYPE_Q8_0, ET_TYPE_F16, ET_TYPE_F32};
    tiny_model m;
    make_model(&m, ET_TYPE_Q4_0);
    test_build_errors(&m);
    free_model(&m);
    et_llama_free(NULL); /* allowed, like free(NULL) */

    char isas[64];
    strncpy(isas, et_isa_available(), sizeof isas - 1);
    isas[sizeof isas - 1] = 0;
    for (char *save = NULL, *isa = strtok_r(isas, ",", &save); isa; isa = strtok_r(NULL, ",", &save)) {
        check(et_isa_select(isa) == ET_OK, "select %s", isa);
        for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
            make_model(&m, types[i]);
            test_forward(&m, isa, types[i]);
            free_model(&m);
        }
        for (size_t i = 0; i < 3; i++) { /* the block formats again, repacked */
            make_model(&m, types[i]);
            repack_model(&m);
            test_forward(&m, isa, types[i] | ET_TYPE_X16);
            free_model(&m);
        }
    }
    et_isa_select(NULL);
}
