/* cpu.c — CPU feature detection and the dispatch table, chosen once. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* syscall(), for the AMX permission request */
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "core.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#endif

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

typedef struct {
    const char *name;         /* what users select */
    const et_kernels *kernels;
    int available;
} et_variant;

static et_variant variants[4];
static int n_variants;
static char available_names[64];
static char feature_names[128];
static _Atomic(const et_kernels *) active;
static pthread_once_t detect_once = PTHREAD_ONCE_INIT;
static const char *active_name = "ref";
static int amx_int8;
static int avx512dq;

/* AMX-TILE and AMX-INT8 in CPUID, the tile state enabled by the OS (XCR0), and this process granted it: Linux hands
 * out the 8 KiB tile data state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA) */
static int detect_amx_int8(void) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0; /* AMX-TILE, AMX-INT8 */
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* OSXSAVE */
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return 0; /* XTILECFG, XTILEDATA enabled by the OS */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

static void add_feature(const char *name) {
    if (feature_names[0]) strncat(feature_names, ",", sizeof feature_names - strlen(feature_names) - 1);
    strncat(feature_names, name, sizeof feature_names - strlen(feature_names) - 1);
}

static void detect_once_fn(void) {
    n_variants = 0;
    feature_names[0] = 0;
    variants[n_variants++] = (et_variant){"ref", &et_kernels_ref, 1};
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    /* the AVX2 sources are compiled for avx2,fma,f16c (fp16 scales and KV cache): a CPU, or a VM's CPU model, with
     * AVX2 but without F16C must not get them */
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl");
    const int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    avx512dq = avx512 && __builtin_cpu_supports("avx512dq"); /* fc_s8's AVX-512 activation codes only */
    if (avx2) add_feature("avx2"), add_feature("fma"), add_feature("f16c");
    if (avx512) add_feature("avx512f"), add_feature("avx512bw"), add_feature("avx512vl");
    if (avx512dq) add_feature("avx512dq");
    if (vnni) add_feature("avx512vnni");
    amx_int8 = vnni && detect_amx_int8();
    if (amx_int8) add_feature("amx_int8");
    variants[n_variants++] = (et_variant){"avx2", &et_kernels_avx2, avx2};
    variants[n_variants++] = (et_variant){"avx512", vnni ? &et_kernels_avx512vnni : &et_kernels_avx512, avx512};
#elif defined(__aarch64__)
    int dotprod = 0;
#if defined(__linux__)
    dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
    dotprod = 1;
#endif
    add_feature("asimd");
    if (dotprod) add_feature("asimddp");
    variants[n_variants++] = (et_variant){"neon", dotprod ? &et_kernels_neon_dotprod : &et_kernels_neon, 1};
#endif
    available_names[0] = 0;
    for (int i = 0; i < n_variants; i++) {
        if (!variants[i].available) continue;
        if (available_names[0]) strcat(available_names, ",");
        strcat(available_names, variants[i].name);
    }
}

static void detect(void) { pthread_once(&detect_once, detect_once_fn); }

int et_isa_select(const char *name) {
    detect();
    const int want_best = name == NULL || name[0] == 0 || strcmp(name, "auto") == 0;
    int pick = -1;
    for (int i = 0; i < n_variants; i++) {
        if (!variants[i].available) continue;
        if (want_best || strcmp(name, variants[i].name) == 0) pick = i;
    }
    if (pick < 0) {
        int known = !strcmp(name, "ref") || !strcmp(name, "avx2") || !strcmp(name, "avx512") || !strcmp(name, "neon");
        if (known)
            return et_error(ET_ERR_UNSUPPORTED, "ISA '%s' cannot run on this CPU (it can run: %s)", name,
                            available_names);
        return et_error(ET_ERR_INVALID, "unknown ISA '%s' (expected one of ref, avx2, avx512, neon)", name);
    }
    active_name = variants[pick].name;
    atomic_store(&active, variants[pick].kernels);
    return ET_OK;
}

const et_kernels *et_active_kernels(void) {
    const et_kernels *k = atomic_load(&active);
    if (k) return k;
    et_isa_select(NULL);
    return atomic_load(&active);
}

const char *et_isa_current(void) {
    et_active_kernels();
    return active_name;
}

const char *et_isa_available(void) {
    detect();
    return available_names;
}

const char *et_cpu_features(void) {
    detect();
    return feature_names;
}

int et_cpu_amx_int8(void) {
    detect();
    return amx_int8;
}

int et_cpu_avx512dq(void) {
    detect();
    return avx512dq;
}
