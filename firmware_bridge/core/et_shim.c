/* et_shim.c — what the C core's reference kernels need from the rest of the core, for the firmware build: an
 * et_error() without a message buffer or printf (the firmware reports its own error codes on the wire). */
#include "../../native/src/core.h"

int et_error(int status, const char *fmt, ...) {
    (void)fmt;
    return status;
}
