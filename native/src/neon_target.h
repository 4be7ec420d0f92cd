/* neon_target.h — the prelude both NEON kernel files share: each is compiled twice, plain and (from its
 * *_dotprod.c, which defines ET_DOTPROD 1 and includes it) with the Armv8.2-A dot product enabled for its
 * functions. ET_NEON_NAME(base) names the variant; ET_NEON_END closes the clang target region at the file's end. */
#ifndef ET_DOTPROD
#define ET_DOTPROD 0
#endif

#if ET_DOTPROD
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#define ET_NEON_END _Pragma("clang attribute pop")
#else
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif
#define ET_NEON_NAME(base) base##_neon_dotprod
#else
#define ET_NEON_NAME(base) base##_neon
#endif

#ifndef ET_NEON_END
#define ET_NEON_END
#endif
