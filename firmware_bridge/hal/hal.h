/* hal.h — the three things the firmware core needs from a board: read bytes, write bytes, a clock.
 * (plus one optional hook an emulator uses to model a slower device). No other platform call is made by core/. */
#ifndef FW_HAL_H
#define FW_HAL_H

#include <stdint.h>
#include <stddef.h>

/* up to max bytes received from the link; waits at most timeout_ms for the first; returns the count (0: none) */
size_t hal_read(uint8_t *buf, size_t max, uint32_t timeout_ms);
/* sends n bytes (blocking until they are queued on the link) */
void hal_write(const uint8_t *buf, size_t n);
/* a free-running microsecond clock (wraps) */
uint32_t hal_clock_us(void);
/* called after each INVOKE with the work it did (2 ops per multiply-accumulate) and the time it took; an emulator
 * sleeps to model a slower device, a real board does nothing */
void hal_compute_done(uint64_t ops, uint32_t elapsed_us);

#endif /* FW_HAL_H */
