/* threadpool.c — one persistent pool of worker threads shared by every kernel.
 *
 * Workers are created once (and grown on demand), then wait for a job: they spin briefly on a generation counter,
 * because an LLM decode step dispatches hundreds of small matmuls per token and a condition-variable wake-up per
 * dispatch would cost more than the matmul, then yield, then sleep on a condition variable so an idle pool costs
 * nothing. One job at a time: concurrent callers queue on run_lock. Jobs must not nest.
 *
 * A job's nth shares are claimed from a counter by whoever arrives, the caller included, so the caller never waits
 * for a worker that has not started: on a machine with more runnable threads than cores (a server answering HTTP
 * beside the kernels, another process) a descheduled worker costs nothing, the caller runs its share. When the
 * caller has run out of shares it closes the job's entry gate and waits only for the workers that got in.
 *
 * Kernels keep tiles on the stack (the AVX-512 GEMM up to ~190 KiB). Workers are made with ET_WORKER_STACK; a caller
 * whose own stack has less than ET_CALLER_STACK left (a thread made small: musl's default is 128 KiB, Python's
 * threading.stack_size can set less) runs no share: the workers run them all, one-thread jobs included, and the
 * caller waits. Such a caller crashed in the kernel before.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* pthread_getattr_np */
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "core.h"

#define ET_MAX_THREADS 256
#define ET_CLOSED 0x80000000u
#define ET_CALLER_STACK (256u << 10) /* stack a caller must have left to run shares itself */
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
    atomic_int next_share; /* next unclaimed share of the current job */
    atomic_uint entry;     /* workers that entered the current job, | ET_CLOSED once the caller closed it */
    atomic_uint left;      /* workers that entered and are done */
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
        /* enter unless the caller already closed the job (it then ran every share itself) */
        unsigned e = atomic_load(&pool.entry);
        while (!(e & ET_CLOSED) && !atomic_compare_exchange_weak(&pool.entry, &e, e + 1)) {
        }
        if (e & ET_CLOSED) continue;
        /* the job entered may be newer than the one seen: mark that one seen, so it is not entered twice */
        seen = atomic_load(&pool.generation);
        for (;;) {
            const int share = atomic_fetch_add(&pool.next_share, 1);
            if (share >= pool.nth) break;
            pool.fn(pool.ctx, share, pool.nth);
        }
        atomic_fetch_add(&pool.left, 1);
    }
}

/* kernels keep tiles on the stack (the AVX-512 GEMM's 128 KiB double buffer, the AMX panels): workers get this
 * much whatever the C library's default (glibc 8 MiB, musl 128 KiB) */
#define ET_WORKER_STACK (2u << 20)

/* the lowest address of the calling thread's stack, looked up once per thread (NULL: unknown, or not Linux) */
static _Thread_local const char *stack_low;
static _Thread_local int stack_looked_up;

/* whether the calling thread has ET_CALLER_STACK of stack left below this frame (assumed when unknown) */
static int caller_has_stack(void) {
    if (!stack_looked_up) {
        stack_looked_up = 1;
#if defined(__linux__)
        pthread_attr_t attr;
        void *addr;
        size_t size;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            if (pthread_attr_getstack(&attr, &addr, &size) == 0) stack_low = (const char *)addr;
            pthread_attr_destroy(&attr);
        }
#endif
    }
    const char here = 0;
    return !stack_low || (uintptr_t)&here - (uintptr_t)stack_low >= ET_CALLER_STACK;
}

/* fork() copies only the calling thread: the child's pool has no workers, whatever the parent's counted, and a lock
 * or job a parent thread held mid-call is copied as it was. The child starts from an empty pool (workers are made
 * again on its first job): a child waiting on the parent's workers (a small-stack caller) or on run_lock that a
 * parent thread held at the fork hung. */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.run_lock, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.n_workers = 0;
    atomic_store(&pool.next_share, 0);
    atomic_store(&pool.entry, 0);
    atomic_store(&pool.left, 0);
    atomic_store(&pool.sleeping, 0);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* one step of a caller's wait on the workers: pause ET_SPIN_ITERS times, then yield the core */
static void wait_a_little(int *spins) {
    if ((*spins)++ < ET_SPIN_ITERS)
        ET_PAUSE();
    else
        sched_yield();
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_after_fork_in_child); }

static int grow(int n_workers) {
    if (pool.n_workers >= n_workers) return ET_OK;
    pthread_once(&atfork_once, register_atfork); /* before the first worker exists */
    pthread_attr_t attr;
    if (pthread_attr_init(&attr)) return et_error(ET_ERR_NOMEM, "could not set up worker thread attributes");
    pthread_attr_setstacksize(&attr, ET_WORKER_STACK);
    int st = ET_OK;
    while (pool.n_workers < n_workers) {
        pool.start_generation[pool.n_workers + 1] = atomic_load(&pool.generation);
        if (pthread_create(&pool.threads[pool.n_workers], &attr, worker_main, (void *)(intptr_t)(pool.n_workers + 1))) {
            st = et_error(ET_ERR_NOMEM, "could not start worker thread %d", pool.n_workers + 1);
            break;
        }
        pool.n_workers++;
    }
    pthread_attr_destroy(&attr);
    return st;
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
    const int here = caller_has_stack(); /* else the workers run every share (see the top) */
    if (nth == 1 && here) {
        fn(ctx, 0, 1);
        return ET_OK;
    }
    pthread_mutex_lock(&pool.run_lock);
    int st = grow(here ? nth - 1 : nth);
    if (st) {
        pthread_mutex_unlock(&pool.run_lock);
        return st;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nth = nth;
    atomic_store_explicit(&pool.next_share, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.left, 0, memory_order_relaxed);
    /* opens the gate, with release: a worker still on its way in from the last job (it saw that generation, then
     * stalled) can read this 0 before the generation below, and must then see fn/ctx/nth and the counters above, not
     * the last job's (relaxed let a weakly ordered CPU show it the old ctx, or wipe its left increment: a hang) */
    atomic_store_explicit(&pool.entry, 0, memory_order_release);
    /* wakes the workers: a release store, which makes the job above visible first. Not a locked instruction, so the
     * caller does not stall until the spinning workers give up the line (576x1536 q4_0 x16 at 2 threads, cached:
     * 6.24 -> 5.77 us a call). Without a fence here a worker going to sleep this instant can miss the job (the
     * sleeping count below may be read before the store is seen): it misses only this one, whose shares the caller
     * then claims itself, and the next job finds it counted and wakes it. A caller that runs no share waits for the
     * workers, so it keeps the fence. */
    atomic_store_explicit(&pool.generation, atomic_load_explicit(&pool.generation, memory_order_relaxed) + 1,
                          memory_order_release);
    if (!here) atomic_thread_fence(memory_order_seq_cst);
    int spins_claim = 0;
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    if (here) {
        for (;;) {
            const int share = atomic_fetch_add(&pool.next_share, 1);
            if (share >= nth) break;
            fn(ctx, share, nth);
        }
    } else { /* the workers claim them all */
        while (atomic_load(&pool.next_share) < nth) wait_a_little(&spins_claim);
    }
    /* no share left: close the gate, then wait for the workers inside (ctx lives on the caller's stack) */
    const unsigned entered = atomic_fetch_or(&pool.entry, ET_CLOSED) & ~ET_CLOSED;
    int spins_done = 0;
    while (atomic_load(&pool.left) < entered) wait_a_little(&spins_done);
    pthread_mutex_unlock(&pool.run_lock);
    return ET_OK;
}
