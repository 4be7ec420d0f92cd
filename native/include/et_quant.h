/* et_quant.h — quantized block layouts.
 *
 * Weight blocks are byte-for-byte the GGUF/ggml layouts (32 values per block, little-endian fp16 scales), so a
 * GGUF tensor's bytes are used as they are. block_q8_s is edgert's own activation block: activations are
 * quantized on the fly, never stored in a file, so it keeps a float scale and the exact integer sum of its
 * quants, which turns the Q4_0 offset and the Q4_1 min into one multiply per block.
 */
#ifndef ET_QUANT_H
#define ET_QUANT_H

#include <stdint.h>

#define ET_QK 32 /* values per block, every block format */

typedef uint16_t et_half; /* IEEE binary16 bits */

/* w = d * (q - 8), q in [0, 15]; qs[j] holds q[j] in its low nibble and q[j + 16] in its high nibble */
typedef struct {
    et_half d;
    uint8_t qs[ET_QK / 2];
} block_q4_0;

/* w = d * q + m, q in [0, 15]; nibble order as q4_0 */
typedef struct {
    et_half d;
    et_half m;
    uint8_t qs[ET_QK / 2];
} block_q4_1;

/* w = d * q, q in [-127, 127] */
typedef struct {
    et_half d;
    int8_t qs[ET_QK];
} block_q8_0;

/* ggml's activation block for q4_1 (s = d * sum(qs)); declared for completeness of the GGUF type set */
typedef struct {
    et_half d;
    et_half s;
    int8_t qs[ET_QK];
} block_q8_1;

/* edgert activation block: x ~= d * q, q in [-127, 127], sum = sum(q) exactly */
typedef struct {
    float d;
    int32_t sum;
    int8_t qs[ET_QK];
} block_q8_s;

#if defined(__cplusplus)
#define ET_STATIC_ASSERT static_assert
#else
#define ET_STATIC_ASSERT _Static_assert
#endif
ET_STATIC_ASSERT(sizeof(block_q4_0) == 18, "block_q4_0 must be 18 bytes (GGUF)");
ET_STATIC_ASSERT(sizeof(block_q4_1) == 20, "block_q4_1 must be 20 bytes (GGUF)");
ET_STATIC_ASSERT(sizeof(block_q8_0) == 34, "block_q8_0 must be 34 bytes (GGUF)");
ET_STATIC_ASSERT(sizeof(block_q8_1) == 36, "block_q8_1 must be 36 bytes (GGUF)");
ET_STATIC_ASSERT(sizeof(block_q8_s) == 40, "block_q8_s must be 40 bytes");

#endif /* ET_QUANT_H */
