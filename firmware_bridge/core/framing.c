/* framing.c — COBS framing with a CRC-32 trailer (PROTOCOL.md "Framing").
 *
 * The decoder works a byte at a time into one frame-sized buffer; anything that does not decode to a well-formed
 * frame is dropped at the next 0x00, which is the only place a frame can end, so the receiver is back in step after
 * at most one delimiter whatever came before. The encoder streams through a 255-byte block, never the whole frame.
 */
#include <string.h>

#include "fw.h"

static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
    crc_ready = 1;
}

uint32_t fw_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    if (!crc_ready) crc_init();
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void fw_decoder_reset(fw_decoder *d) {
    d->len = 0;
    d->remain = 0;
    d->pending = 0;
    d->broken = 0;
}

static int frame_end(fw_decoder *d) {
    int ok = !d->broken && d->remain == 0 && d->len >= FW_HEADER_BYTES + FW_CRC_BYTES;
    if (ok) {
        size_t body = d->len - FW_CRC_BYTES;
        ok = rd32(d->buf + 8) == body - FW_HEADER_BYTES && fw_crc32(0, d->buf, body) == rd32(d->buf + body);
    }
    size_t len = d->len;
    int empty = len == 0 && !d->broken && d->remain == 0 && !d->pending;
    fw_decoder_reset(d);
    if (ok) d->len = len; /* the caller reads buf/len before feeding again */
    return ok ? 1 : (empty ? 0 : -1);
}

int fw_decoder_feed(fw_decoder *d, uint8_t byte) {
    if (byte == 0) return frame_end(d);
    if (d->broken) return 0;
    if (d->remain == 0) { /* a code byte */
        if (d->pending) {
            if (d->len >= sizeof d->buf) { d->broken = 1; return 0; }
            d->buf[d->len++] = 0;
        }
        d->remain = (uint8_t)(byte - 1);
        d->pending = byte != 0xFF;
        return 0;
    }
    if (d->len >= sizeof d->buf) { d->broken = 1; return 0; }
    d->buf[d->len++] = byte;
    d->remain--;
    return 0;
}

/* ---- streaming encoder ---- */

typedef struct {
    fw_sink sink;
    uint8_t block[255]; /* block[0] is the code byte */
    uint8_t n;          /* data bytes in block */
} cobs_out;

static void cobs_flush(cobs_out *o) {
    o->block[0] = (uint8_t)(o->n + 1);
    o->sink(o->block, (size_t)o->n + 1);
    o->n = 0;
}

static void cobs_put(cobs_out *o, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (p[i] == 0) {
            cobs_flush(o);
        } else {
            o->block[1 + o->n++] = p[i];
            if (o->n == 254) {
                o->block[0] = 0xFF;
                o->sink(o->block, 255);
                o->n = 0;
            }
        }
    }
}

void fw_send_frame(fw_sink sink, uint8_t type, uint8_t flags, uint8_t status, uint32_t seq, const uint8_t *payload,
                   size_t n) {
    uint8_t h[FW_HEADER_BYTES] = {FW_PROTOCOL_VERSION, type, flags, status,
                                  (uint8_t)seq, (uint8_t)(seq >> 8), (uint8_t)(seq >> 16), (uint8_t)(seq >> 24),
                                  (uint8_t)n, (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
    uint32_t crc = fw_crc32(fw_crc32(0, h, sizeof h), payload, n);
    uint8_t c[4] = {(uint8_t)crc, (uint8_t)(crc >> 8), (uint8_t)(crc >> 16), (uint8_t)(crc >> 24)};
    cobs_out o;
    o.sink = sink;
    o.n = 0;
    cobs_put(&o, h, sizeof h);
    if (n) cobs_put(&o, payload, n);
    cobs_put(&o, c, sizeof c);
    cobs_flush(&o); /* the final block: its implied zero is dropped by the decoder */
    /* two delimiters (the second an ignored empty frame): a noisy line that loses one still ends the frame, so the
     * host does not wait out its timeout for it */
    static const uint8_t delim[2] = {0, 0};
    sink(delim, 2);
}
