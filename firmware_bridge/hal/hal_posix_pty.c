/* hal_posix_pty.c — the firmware as a native process on a pseudo-terminal: the emulator behind `edgert npu-sim`.
 *
 * Prints the pty's device path on stdout ("npu-sim: /dev/pts/N"), then serves the firmware on it until killed or
 * until stdin closes (so it dies with the process that started it). Models the device: --baud paces both
 * directions at 10 bits per byte, --ops-per-s stretches each INVOKE to that compute speed, --arena caps the arena.
 * Injects faults on the line, per byte in both directions: --drop, --corrupt (one flipped bit), --duplicate; per
 * response: --stall-ms; once: --reset-after N (the device resets when the Nth frame ends, before handling it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "../core/fw.h"
#include "hal.h"

static struct {
    int fd;
    double baud, ops_per_s, drop, corrupt, duplicate;
    uint32_t stall_ms;
    long reset_after, frames;
    uint64_t rng;
    double tx_free, rx_free; /* seconds (monotonic) when the line is next free */
    int at_frame_start;
    uint8_t prev_rx; /* the last byte received */
    uint32_t boot_id;
} H = {.fd = -1, .reset_after = -1, .rng = 0x9E3779B97F4A7C15ull, .at_frame_start = 1};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_until(double t) {
    double d = t - now_s();
    if (d <= 0) return;
    struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
    nanosleep(&ts, NULL);
}

static double rnd(void) { /* xorshift64*, [0, 1) */
    H.rng ^= H.rng >> 12;
    H.rng ^= H.rng << 25;
    H.rng ^= H.rng >> 27;
    return (double)((H.rng * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

/* the line's faults on n bytes: out gets the bytes that arrive (at most 2n) */
static size_t line_faults(const uint8_t *in, size_t n, uint8_t *out) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = in[i];
        if (H.drop > 0 && rnd() < H.drop) continue;
        if (H.corrupt > 0 && rnd() < H.corrupt) b ^= (uint8_t)(1u << (int)(rnd() * 8));
        out[k++] = b;
        if (H.duplicate > 0 && rnd() < H.duplicate) out[k++] = b;
    }
    return k;
}

/* the line is busy until *free_at; n more bytes take n * 10 / baud. A line idle for a while starts from now; a short
 * lag (a sleep that overshot) is kept, not dropped: COBS writes a zero-rich frame a byte or two at a time, and
 * dropping each call's overshoot sent such frames at half the baud rate */
static void pace(double *free_at, size_t n) {
    if (H.baud <= 0) return;
    double t = now_s();
    if (*free_at < t - 0.002) *free_at = t;
    *free_at += (double)n * 10.0 / H.baud;
    sleep_until(*free_at);
}

size_t hal_read(uint8_t *buf, size_t max, uint32_t timeout_ms) {
    struct pollfd p[2] = {{H.fd, POLLIN, 0}, {0, POLLIN, 0}};
    int r = poll(p, 2, (int)timeout_ms);
    if (r <= 0) return 0;
    if (p[1].revents & (POLLIN | POLLHUP)) {
        char c;
        if (read(0, &c, 1) <= 0) exit(0); /* the parent went away */
    }
    if (!(p[0].revents & POLLIN)) return 0;
    ssize_t n = read(H.fd, buf, max);
    if (n <= 0) return 0;
    pace(&H.rx_free, (size_t)n);
    return (size_t)n;
}

void hal_write(const uint8_t *buf, size_t n) {
    uint8_t tmp[512];
    while (n > 0) {
        size_t m = n > 256 ? 256 : n;
        if (H.at_frame_start && H.stall_ms) sleep_until(now_s() + H.stall_ms * 1e-3);
        H.at_frame_start = buf[m - 1] == 0;
        size_t k = line_faults(buf, m, tmp);
        pace(&H.tx_free, m);
        for (size_t off = 0; off < k;) {
            ssize_t w = write(H.fd, tmp + off, k - off);
            if (w < 0) {
                if (errno == EAGAIN || errno == EINTR) { struct pollfd p = {H.fd, POLLOUT, 0}; poll(&p, 1, 100); continue; }
                return;
            }
            off += (size_t)w;
        }
        buf += m;
        n -= m;
    }
}

uint32_t hal_clock_us(void) { return (uint32_t)(uint64_t)(now_s() * 1e6); }

void hal_compute_done(uint64_t ops, uint32_t elapsed_us) {
    if (H.ops_per_s > 0) sleep_until(now_s() + (double)ops / H.ops_per_s - elapsed_us * 1e-6);
}

static void usage(void) {
    fprintf(stderr, "usage: npu-sim [--baud N] [--ops-per-s X] [--arena BYTES] [--drop P] [--corrupt P] "
                    "[--duplicate P] [--stall-ms MS] [--reset-after N] [--seed S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    uint32_t arena = 0;
    H.boot_id = (uint32_t)getpid() * 2654435761u ^ (uint32_t)time(NULL);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "--baud")) H.baud = atof(v);
        else if (!strcmp(a, "--ops-per-s")) H.ops_per_s = atof(v);
        else if (!strcmp(a, "--arena")) arena = (uint32_t)strtoul(v, NULL, 0);
        else if (!strcmp(a, "--drop")) H.drop = atof(v);
        else if (!strcmp(a, "--corrupt")) H.corrupt = atof(v);
        else if (!strcmp(a, "--duplicate")) H.duplicate = atof(v);
        else if (!strcmp(a, "--stall-ms")) H.stall_ms = (uint32_t)atoi(v);
        else if (!strcmp(a, "--reset-after")) H.reset_after = atol(v);
        else if (!strcmp(a, "--seed")) H.rng = strtoull(v, NULL, 0) * 2 + 1;
        else usage();
        i++;
    }
    if (arena > FW_ARENA_BYTES) {
        fprintf(stderr, "npu-sim: --arena %u is larger than this build's %u bytes\n", arena, (unsigned)FW_ARENA_BYTES);
        return 2;
    }
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    if (m < 0 || grantpt(m) || unlockpt(m)) { perror("npu-sim: posix_openpt"); return 1; }
    const char *name = ptsname(m);
    /* hold the slave open (raw) so the master never sees a hang-up between clients, and no echo before the first */
    int s = open(name, O_RDWR | O_NOCTTY);
    struct termios t;
    if (s < 0 || tcgetattr(s, &t)) { perror("npu-sim: pty slave"); return 1; }
    cfmakeraw(&t);
    tcsetattr(s, TCSANOW, &t);
    H.fd = m;
    fw_set_arena_limit(arena);
    fw_init(H.boot_id);
    printf("npu-sim: %s\n", name);
    fflush(stdout);
    uint8_t in[256], got[512];
    for (;;) {
        size_t n = hal_read(in, sizeof in, 1000);
        if (n == 0) continue;
        size_t k = line_faults(in, n, got);
        for (size_t i = 0; i < k; i++) {
            int ends = got[i] == 0 && H.prev_rx != 0; /* a frame ends (an empty one, 0x00 0x00, is none) */
            H.prev_rx = got[i];
            if (ends && H.reset_after >= 0 && ++H.frames == H.reset_after) {
                H.reset_after = -1;
                fw_init(++H.boot_id); /* power cycle mid-command: the frame in flight is lost */
                continue;
            }
            fw_rx(&got[i], 1);
        }
    }
}
