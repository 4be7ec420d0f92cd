/* matmul/neon_dotprod.c — the NEON kernels again, with SDOT (Armv8.2-A dot product) summing each block's int8
 * products. cpu.c picks this table over et_kernels_neon when the CPU reports HWCAP_ASIMDDP.
 */
#if defined(__aarch64__)
#define ET_DOTPROD 1
#include "neon.c"
#endif
