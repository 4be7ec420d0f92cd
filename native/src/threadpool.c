/* threadpool.c — one persistent pool of worker threads shared by every kernel.
 *
 * Workers are created once (and grown on demand), then wait for a job: they spin briefly on a generation counter,
 * because an LLM decode step dispatches hundreds of small matmuls per token and a condition-variable wake-up per
 * dispatch would cost more than the matmul, and then sleep on a condition variable so an idle pool costs nothing.
 * The caller runs share 0 itself. One job at a time: concurrent callers queue on run_lock. Jobs must not nest.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "core.h"

#define ET_MAX_THREADS 256
#define ET_SPIN_ITERS 2000   /* pause instructions before a waiting thread starts yielding its core */
#define ET_YIELD_ITERS 2000  /* sched_yield calls before a worker sleeps (about a millisecond when idle) */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ET_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define ET_PAUSE() __asm__ __volatile__("yield")
#else
#define ET_PAUSE() ((void)0)
#endif

typedef struct {
    pthread_mutex_t run_lock; /* one job at a time */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    pthread_t threads[ET_MAX_THREADS];
    int n_workers;      /* threads besides the caller */
    int n_threads;      /* size requested by et_set_threads */
    atomic_uint generation;
    atomic_int pending; /* workers that have not finished the current job */
    atomic_int sleeping;
    atomic_int stop;
    et_task_fn fn;
    void *ctx;
    int nth;
    unsigned start_generation[ET_MAX_THREADS + 1]; /* per worker: the generation before its first job */
} et_pool;

static et_pool pool = {
    .run_lock = PTHREAD_MUTEX_INITIALIZER,
    .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .n_threads = 1,
};

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg; /* 1..n_workers; the caller is 0 */
    /* not a fresh load: et_parallel may already have published the job this worker was created for */
    unsigned seen = pool.start_generation[id];
    for (;;) {
        /* spin, then yield (so an oversubscribed machine runs the thread we wait for), then sleep */
        int spins = 0;
        while (atomic_load(&pool.generation) == seen && spins < ET_SPIN_ITERS + ET_YIELD_ITERS) {
            if (spins++ < ET_SPIN_ITERS)
                ET_PAUSE();
            else
                sched_yield();
        }
        if (atomic_load(&pool.generation) == seen) {
            pthread_mutex_lock(&pool.sleep_lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.sleep_lock);
        }
        seen = atomic_load(&pool.generation);
        if (atomic_load(&pool.stop)) return NULL;
        if (id < pool.nth) pool.fn(pool.ctx, id, pool.nth);
        atomic_fetch_sub(&pool.pending, 1);
    }
}

static int grow(int n_workers) {
    while (pool.n_workers < n_workers) {
        pool.start_generation[pool.n_workers + 1] = atomic_load(&pool.generation);
        if (pthread_create(&pool.threads[pool.n_workers], NULL, worker_main, (void *)(intptr_t)(pool.n_workers + 1)))
            return et_error(ET_ERR_NOMEM, "could not start worker thread %d", pool.n_workers + 1);
        pool.n_workers++;
    }
    return ET_OK;
}

int et_set_threads(int n) {
    if (n < 1 || n > ET_MAX_THREADS)
        return et_error(ET_ERR_INVALID, "thread count must be in [1, %d], got %d", ET_MAX_THREADS, n);
    pthread_mutex_lock(&pool.run_lock);
    int st = grow(n - 1);
    if (st == ET_OK) pool.n_threads = n;
    pthread_mutex_unlock(&pool.run_lock);
    return st;
}

int et_get_threads(void) { return pool.n_threads; }

int et_parallel(et_task_fn fn, void *ctx, int nth) {
    if (nth <= 0) nth = pool.n_threads;
    if (nth > ET_MAX_THREADS) nth = ET_MAX_THREADS;
    if (nth == 1) {
        fn(ctx, 0, 1);
        return ET_OK;
    }
    pthread_mutex_lock(&pool.run_lock);
    int st = grow(nth - 1);
    if (st) {
        pthread_mutex_unlock(&pool.run_lock);
        return st;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nth = nth;
    atomic_store(&pool.pending, pool.n_workers);
    atomic_fetch_add(&pool.generation, 1); /* publishes fn/ctx/nth (seq_cst) */
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    fn(ctx, 0, nth);
    for (int spins = 0; atomic_load(&pool.pending) > 0; spins++) {
        if (spins < ET_SPIN_ITERS)
            ET_PAUSE();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&pool.run_lock);
    return ET_OK;
}
