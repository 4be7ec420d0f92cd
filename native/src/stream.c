/* stream.c — a streaming-read loop, the yardstick for memory-bound kernels (benchmarks report % of it). */
#include "core.h"

typedef struct {
    const uint64_t *p;
    size_t n; /* uint64 words */
    uint64_t sums[256];
} stream_job;

static void stream_task(void *arg, int ith, int nth) {
    stream_job *job = arg;
    const size_t per = (job->n / (size_t)nth) & ~(size_t)7;
    const size_t lo = per * (size_t)ith;
    const size_t hi = ith == nth - 1 ? job->n : lo + per;
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
