/* fc_s8/neon_dotprod.c — the NEON INT8 fully-connected kernel again, with SDOT (Armv8.2-A dot product): fc_s8.c
 * picks it when the active table is et_kernels_neon_dotprod. */
#if defined(__aarch64__)
#define ET_DOTPROD 1
#include "neon.c"
#endif
