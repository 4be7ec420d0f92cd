/* core.c — error messages and version. One message per thread, overwritten by the next failure. */
#include <stdarg.h>
#include <stdio.h>

#include "core.h"

#define ET_VERSION "0.1.0"

static _Thread_local char et_errbuf[512];

int et_error(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(et_errbuf, sizeof et_errbuf, fmt, ap);
    va_end(ap);
    return status;
}

const char *et_last_error(void) { return et_errbuf; }

const char *et_version(void) { return ET_VERSION; }
