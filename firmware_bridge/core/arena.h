/* arena.h — the firmware's only memory: one static array, carved into blocks by a first-fit allocator with a
 * fixed table of FW_MAX_ALLOCS entries. Blocks are 8-byte aligned. Usage and the high-water mark go into STATS. */
#ifndef FW_ARENA_H
#define FW_ARENA_H

#include <stdint.h>
#include <stddef.h>

void arena_init(uint32_t limit);           /* limit <= FW_ARENA_BYTES (0: all of it) */
uint8_t *arena_alloc(uint32_t nbytes);     /* NULL when it does not fit or the table is full */
void arena_free(const uint8_t *p);
uint32_t arena_capacity(void);
uint32_t arena_used(void);
uint32_t arena_high_water(void);

#endif
