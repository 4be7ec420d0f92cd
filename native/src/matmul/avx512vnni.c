/* matmul/avx512vnni.c — the AVX-512 kernels with AVX512-VNNI: the same source as avx512.c, compiled with ET_VNNI so
 * each 4-byte u8 x s8 dot product is one vpdpbusd. Both tables exist in every x86-64 build; cpu.c picks one. */
#define ET_VNNI 1
#include "avx512.c"
