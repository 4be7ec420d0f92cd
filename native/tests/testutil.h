/* testutil.h — helpers shared by the C-level tests (testutil.c) and the test groups each file adds. */
#ifndef ET_TESTUTIL_H
#define ET_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "core.h"

extern int n_passed, n_failed;

/* counts a pass, or prints "FAIL: <message>" and counts a failure */
void check(int ok, const char *fmt, ...) ET_PRINTF(2, 3);

/* deterministic xorshift64* stream shared by every test group */
uint64_t rng_next(void);
float rng_uniform(void); /* [0, 1) */
float rng_normal(void);  /* roughly standard normal */

void *xmalloc(size_t n); /* exits with status 2 when out of memory */

/* test groups in other files */
void test_llama(void);  /* test_llama.c */
void test_fc_s8(void);  /* test_fc_s8.c */

#endif
