/* arena.c — see arena.h. */
#include "arena.h"
#include "fw.h"

static uint8_t arena[FW_ARENA_BYTES] __attribute__((aligned(16)));

typedef struct {
    uint32_t off, size; /* size 0: free slot */
} block;

static block blocks[FW_MAX_ALLOCS]; /* live blocks sorted by offset, first n_blocks used */
static uint32_t n_blocks, cap, used, high;

void arena_init(uint32_t limit) {
    cap = (limit == 0 || limit > FW_ARENA_BYTES) ? FW_ARENA_BYTES : limit;
    n_blocks = used = high = 0;
}

uint8_t *arena_alloc(uint32_t nbytes) {
    if (n_blocks >= FW_MAX_ALLOCS) return NULL;
    uint32_t size = (nbytes + 7u) & ~7u;
    if (size == 0) size = 8;
    if (size < nbytes) return NULL;
    uint32_t start = 0;
    for (uint32_t i = 0; i <= n_blocks; i++) {
        uint32_t end = i < n_blocks ? blocks[i].off : cap;
        if (end >= start && end - start >= size) {
            for (uint32_t j = n_blocks; j > i; j--) blocks[j] = blocks[j - 1];
            blocks[i].off = start;
            blocks[i].size = size;
            n_blocks++;
            used += size;
            if (used > high) high = used;
            return arena + start;
        }
        if (i < n_blocks) start = blocks[i].off + blocks[i].size;
    }
    return NULL;
}

void arena_free(const uint8_t *p) {
    if (p == NULL) return;
    uint32_t off = (uint32_t)(p - arena);
    for (uint32_t i = 0; i < n_blocks; i++) {
        if (blocks[i].off == off) {
            used -= blocks[i].size;
            for (uint32_t j = i; j + 1 < n_blocks; j++) blocks[j] = blocks[j + 1];
            n_blocks--;
            return;
        }
    }
}

uint32_t arena_capacity(void) { return cap; }
uint32_t arena_used(void) { return used; }
uint32_t arena_high_water(void) { return high; }
