/* stream.c — a streaming-read loop, the yardstick for memory-bound kernels (benchmarks report % of it). */
#include "core.h"

typedef struct {
    const uint64_t *p;
    size_t n; /* uint64 words */
    uint64_t sums[256];
} stream_job;

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

/* 64-bit scalar loads top out below what a core can pull from DRAM (about 2/3 of it on AVX-512 machines), which
 * would flatter every kernel measured against this loop; full-width vector loads keep the probe memory-bound. */
__attribute__((target("avx512f"))) static uint64_t sum_avx512(const uint64_t *p, size_t lo, size_t hi) {
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        a = _mm512_add_epi64(a, _mm512_loadu_si512(p + i));
        b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 8));
        c = _mm512_add_epi64(c, _mm512_loadu_si512(p + i + 16));
        d = _mm512_xor_si512(d, _mm512_loadu_si512(p + i + 24));
    }
    uint64_t s = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
    for (; i < hi; i++) s += p[i];
    return s;
}

__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *p, size_t lo, size_t hi) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(p + i)));
        b = _mm256_xor_si256(b, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        c = _mm256_add_epi64(c, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        d = _mm256_xor_si256(d, _mm256_loadu_si256((const __m256i *)(p + i + 12)));
    }
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
    uint64_t s = t[0] + t[1] + t[2] + t[3];
    for (; i < hi; i++) s += p[i];
    return s;
}
#endif

static void stream_task(void *arg, int ith, int nth) {
    stream_job *job = arg;
    const size_t per = (job->n / (size_t)nth) & ~(size_t)7;
    const size_t lo = per * (size_t)ith;
    const size_t hi = ith == nth - 1 ? job->n : lo + per;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        job->sums[ith] = sum_avx512(job->p, lo, hi);
        return;
    }
    if (__builtin_cpu_supports("avx2")) {
        job->sums[ith] = sum_avx2(job->p, lo, hi);
        return;
    }
#endif
    uint64_t a = 0, b = 0, c = 0, d = 0;
    size_t i = lo;
    for (; i + 4 <= hi; i += 4) {
        a += job->p[i];
        b ^= job->p[i + 1];
        c += job->p[i + 2];
        d ^= job->p[i + 3];
    }
    for (; i < hi; i++) a += job->p[i];
    job->sums[ith] = a + b + c + d;
}

int et_stream_read(const void *buf, size_t n, int nthreads, uint64_t *out) {
    if (!buf || !out) return et_error(ET_ERR_INVALID, "stream_read got a NULL buffer");
    int nth = nthreads > 0 ? nthreads : et_get_threads();
    if (nth > 256) nth = 256;
    stream_job job = {.p = buf, .n = n / 8};
    int st = et_parallel(stream_task, &job, nth);
    uint64_t s = 0;
    for (int i = 0; i < nth; i++) s += job.sums[i];
    *out = s;
    return st;
}
