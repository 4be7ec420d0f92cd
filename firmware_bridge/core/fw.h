/* fw.h — the reference NPU firmware core: framing, protocol state machine, arena, int8/int4 ops.
 *
 * Portable C11: no heap (one static arena, FW_ARENA_BYTES, fixed at build time), no libc I/O, no threads. The
 * board supplies hal.h; its main loop calls fw_init() once and fw_rx() with every byte it receives. Responses go out
 * through hal_write() from inside fw_rx(). The wire format is firmware_bridge/PROTOCOL.md; the constants below are
 * its tables and must stay equal to edgert/bridge/protocol.py.
 */
#ifndef FW_H
#define FW_H

#include <stddef.h>
#include <stdint.h>

#define FW_PROTOCOL_VERSION 1u
#define FW_VERSION_STRING "edgert-npu-ref 0.1.0"

#ifndef FW_ARENA_BYTES
#define FW_ARENA_BYTES (1u << 20)
#endif
#ifndef FW_MAX_PAYLOAD
#define FW_MAX_PAYLOAD 4096u /* largest payload of one frame, either direction */
#endif
#ifndef FW_MAX_ALLOCS
#define FW_MAX_ALLOCS 64u    /* live arena blocks: tensors + graph blobs + graph activations */
#endif
#ifndef FW_MAX_GRAPHS
#define FW_MAX_GRAPHS 8u
#endif

#define FW_HEADER_BYTES 12u
#define FW_CRC_BYTES 4u
#define FW_MAX_FRAME (FW_HEADER_BYTES + FW_MAX_PAYLOAD + FW_CRC_BYTES)

/* message types (request and response share the type; responses set FW_FLAG_RESPONSE) */
enum {
    FW_MSG_HELLO = 0x01,
    FW_MSG_LOAD_BEGIN = 0x02,
    FW_MSG_LOAD_CHUNK = 0x03,
    FW_MSG_LOAD_COMMIT = 0x04,
    FW_MSG_ALLOC = 0x05,
    FW_MSG_FREE = 0x06,
    FW_MSG_WRITE = 0x07,
    FW_MSG_INVOKE = 0x08,
    FW_MSG_READ = 0x09,
    FW_MSG_STATS = 0x0A,
    FW_MSG_RESET = 0x0B,
    FW_MSG_UNLOAD = 0x0C,
    FW_MSG_NAK = 0x7F /* device -> host only: a frame arrived broken; resend what is outstanding */
};

enum { FW_FLAG_RESPONSE = 0x01, FW_FLAG_ERROR = 0x02, FW_FLAG_RETRANSMIT = 0x04 };

enum {
    FW_OK = 0,
    FW_ERR_VERSION = 1,
    FW_ERR_NO_SESSION = 2,
    FW_ERR_BAD_REQUEST = 3,
    FW_ERR_UNKNOWN_TYPE = 4,
    FW_ERR_NOMEM = 5,
    FW_ERR_HANDLE = 6,
    FW_ERR_RANGE = 7,
    FW_ERR_HASH = 8,
    FW_ERR_GRAPH = 9,
    FW_ERR_UNSUPPORTED = 10,
    FW_ERR_NO_GRAPH = 11,
    FW_ERR_SHAPE = 12,
    FW_ERR_STALE = 13,
    FW_ERR_COMPUTE = 14
};

/* tensor dtypes (graph blobs); FLOAT32 only for constant parameters (scales) and the q-block matmul's activations */
enum {
    FW_DT_INT8 = 1,
    FW_DT_UINT8 = 2,
    FW_DT_INT32 = 3,
    FW_DT_FLOAT32 = 4,
    FW_DT_INT64 = 5,
    FW_DT_Q4_0 = 8,
    FW_DT_Q4_1 = 9,
    FW_DT_Q8_0 = 10
};

/* ops */
enum {
    FW_OP_MATMUL_INTEGER = 1, /* A (..,M,K) i8/u8, B (K,N) i8/u8, a_zp, b_zp -> int32 */
    FW_OP_QLINEAR_MATMUL = 2, /* a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp -> i8/u8 */
    FW_OP_CONV_INTEGER = 3,   /* x (N,C,H,W), w (M,C/g,kh,kw), x_zp, w_zp -> int32 */
    FW_OP_QLINEAR_CONV = 4,   /* x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp, [bias int32] -> i8/u8 (group = C: depthwise) */
    FW_OP_ADD = 5,            /* int32 (or int8, wrapping) with numpy broadcasting */
    FW_OP_MUL = 6,
    FW_OP_RELU = 7,           /* int8 / int32 */
    FW_OP_COPY = 8,           /* Reshape/Flatten/Squeeze/Unsqueeze: same bytes, new shape */
    FW_OP_MATMUL_QBLOCK = 9,  /* x (M,K) float32, w (N,K) q4_0/q4_1/q8_0 blocks -> y (M,N) float32 (C core ref) */
    FW_OP_CLIP = 10,          /* int8 clip to [attr0, attr1] (ReLU6 on a quantized tensor) */
    /* TFLite INT8 semantics (NHWC activations, requantization parameters computed on the host) */
    FW_OP_FC_S8 = 11,         /* FULLY_CONNECTED: x, w packed (C core fc_s8 layout), [bias], scale -> int8 */
    FW_OP_CONV2D_S8 = 12,     /* CONV_2D: x (N,H,W,C), w (O,kh,kw,C), [bias], scale (O) -> int8 (N,OH,OW,O) */
    FW_OP_DWCONV2D_S8 = 13,   /* DEPTHWISE_CONV_2D: x (N,H,W,C), w (1,kh,kw,C*dm), [bias], scale -> int8 */
    FW_OP_ADD_S8 = 14,        /* ADD: XNNPACK's fixed-point qs8 add (bias, multipliers, shift) */
    FW_OP_AVGPOOL_S8 = 15,    /* AVERAGE_POOL_2D: NHWC, the mean of the taps inside the input, rounded half away */
    FW_OP_CONCAT = 16,        /* CONCATENATION / Concat: the inputs' bytes along one axis (any dtype) */
    FW_OP_COUNT
};

void fw_init(uint32_t boot_id);      /* power-on state: no session, no graphs, no tensors */
void fw_rx(const uint8_t *bytes, size_t n); /* feed received bytes; answers go out through hal_write */
void fw_set_arena_limit(uint32_t bytes);   /* use at most this much of the arena (0: all); clears it */

/* framing (framing.c), also used by the fuzz driver */
uint32_t fw_crc32(uint32_t crc, const uint8_t *p, size_t n); /* zlib's: fw_crc32(0, p, n) */

typedef struct {
    uint8_t buf[FW_MAX_FRAME];
    size_t len;     /* decoded bytes so far */
    uint8_t remain;  /* COBS: data bytes left in the current block; 0 = the next byte is a code byte */
    uint8_t pending; /* the block just finished implies a zero (written when another block follows) */
    uint8_t broken; /* overflow or a bad code seen: drop until the next delimiter */
} fw_decoder;

/* feed one byte; returns 1 when a whole frame decoded (buf/len hold header+payload+crc), -1 when a frame ended
 * broken (overflow, bad COBS, too short, bad CRC, length mismatch), 0 otherwise */
int fw_decoder_feed(fw_decoder *d, uint8_t byte);
void fw_decoder_reset(fw_decoder *d);

typedef void (*fw_sink)(const uint8_t *p, size_t n);
/* COBS-encodes header+payload+crc and the delimiter, streaming to sink (no whole-frame buffer) */
void fw_send_frame(fw_sink sink, uint8_t type, uint8_t flags, uint8_t status, uint32_t seq,
                   const uint8_t *payload, size_t n);

#endif /* FW_H */
