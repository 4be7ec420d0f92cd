/* cpu.c — CPU feature detection and the dispatch table, chosen once. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "core.h"

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
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl");
    const int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    if (avx2) add_feature("avx2"), add_feature("fma");
    if (avx512) add_feature("avx512f"), add_feature("avx512bw"), add_feature("avx512vl");
    if (vnni) add_feature("avx512vnni");
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
