/* hal_cortex_m.c — the HAL for a Cortex-M4 board: a polled UART, the cycle counter as the clock, a vector table and
 * a reset handler. This is the portability proof `make cortexm4` builds (no heap, no stdio); the register addresses
 * are a generic memory-mapped UART (set FW_UART_BASE and FW_CPU_HZ for a real board's).
 */
#include <stdint.h>
#include <string.h>

#include "../core/fw.h"
#include "hal.h"

#ifndef FW_UART_BASE
#define FW_UART_BASE 0x40011000u /* e.g. USART1 on an STM32F4 */
#endif
#ifndef FW_CPU_HZ
#define FW_CPU_HZ 168000000u
#endif

#define UART_SR (*(volatile uint32_t *)(FW_UART_BASE + 0x00))
#define UART_DR (*(volatile uint32_t *)(FW_UART_BASE + 0x04))
#define UART_RXNE (1u << 5)
#define UART_TXE (1u << 7)
#define DWT_CTRL (*(volatile uint32_t *)0xE0001000u)
#define DWT_CYCCNT (*(volatile uint32_t *)0xE0001004u)
#define DEMCR (*(volatile uint32_t *)0xE000EDFCu)

size_t hal_read(uint8_t *buf, size_t max, uint32_t timeout_ms) {
    size_t n = 0;
    uint32_t t0 = hal_clock_us();
    while (n < max) {
        if (UART_SR & UART_RXNE) {
            buf[n++] = (uint8_t)UART_DR;
        } else if (n > 0 || hal_clock_us() - t0 >= timeout_ms * 1000u) {
            break;
        }
    }
    return n;
}

void hal_write(const uint8_t *buf, size_t n) {
    for (size_t i = 0; i < n; i++) {
        while (!(UART_SR & UART_TXE)) {
        }
        UART_DR = buf[i];
    }
}

uint32_t hal_clock_us(void) { return DWT_CYCCNT / (FW_CPU_HZ / 1000000u); }

void hal_compute_done(uint64_t ops, uint32_t elapsed_us) {
    (void)ops;
    (void)elapsed_us;
}

int main(void) {
    DEMCR |= 1u << 24; /* enable the DWT cycle counter */
    DWT_CYCCNT = 0;
    DWT_CTRL |= 1u;
    fw_init(DWT_CYCCNT);
    uint8_t buf[64];
    for (;;) {
        size_t n = hal_read(buf, sizeof buf, 100);
        if (n) fw_rx(buf, n);
    }
}

/* ---- start-up: vector table, .data/.bss, then main (symbols from cortexm4.ld) ---- */
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

void Reset_Handler(void) {
    uint32_t *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata) *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;) *dst++ = 0;
    /* the FPU (CP10, CP11 full access): the requantization and the q-block kernels use single-precision floats */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    main();
    for (;;) {
    }
}

static void Default_Handler(void) {
    for (;;) {
    }
}

__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(&_estack), Reset_Handler, Default_Handler, Default_Handler, Default_Handler, Default_Handler,
    Default_Handler, 0, 0, 0, 0, Default_Handler, Default_Handler, 0, Default_Handler, Default_Handler,
};
