/* testutil.c — the pass/fail counter, deterministic random data and allocation shared by the C-level tests. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "testutil.h"

int n_passed, n_failed;

void check(int ok, const char *fmt, ...) {
    if (ok) {
        n_passed++;
        return;
    }
    n_failed++;
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

/* ---- deterministic data ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15u;

uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Du;
}

float rng_uniform(void) { return (float)(rng_next() >> 40) * 0x1p-24f; } /* [0, 1) */

float rng_normal(void) { /* Irwin-Hall, good enough for test data */
    float s = 0.0f;
    for (int i = 0; i < 4; i++) s += rng_uniform();
    return (s - 2.0f) * 1.7320508f;
}

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "test_kernels: out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

