"""The serial NPU protocol's tables and payloads (firmware_bridge/PROTOCOL.md §2-§6): message types, error codes,
dtypes, ops, the HELLO and STATS answers, and the graph blob. Pure data: no I/O (link.py sends these).

The constants must stay equal to firmware_bridge/core/fw.h; tests/test_bridge_framing.py checks that they do.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

import numpy as np

PROTOCOL_VERSION = 1

# message types
HELLO, LOAD_BEGIN, LOAD_CHUNK, LOAD_COMMIT, ALLOC, FREE, WRITE, INVOKE, READ, STATS, RESET, UNLOAD = range(1, 13)
NAK = 0x7F
MESSAGE_NAMES = {HELLO: "HELLO", LOAD_BEGIN: "LOAD_BEGIN", LOAD_CHUNK: "LOAD_CHUNK", LOAD_COMMIT: "LOAD_COMMIT",
                 ALLOC: "ALLOC", FREE: "FREE", WRITE: "WRITE", INVOKE: "INVOKE", READ: "READ", STATS: "STATS",
                 RESET: "RESET", UNLOAD: "UNLOAD", NAK: "NAK"}

# error codes
ERRORS = {0: "OK", 1: "ERR_VERSION", 2: "ERR_NO_SESSION", 3: "ERR_BAD_REQUEST", 4: "ERR_UNKNOWN_TYPE",
          5: "ERR_NOMEM", 6: "ERR_HANDLE", 7: "ERR_RANGE", 8: "ERR_HASH", 9: "ERR_GRAPH", 10: "ERR_UNSUPPORTED",
          11: "ERR_NO_GRAPH", 12: "ERR_SHAPE", 13: "ERR_STALE", 14: "ERR_COMPUTE"}
OK, ERR_VERSION, ERR_NO_SESSION = 0, 1, 2
ERR_NOMEM, ERR_HASH, ERR_NO_GRAPH, ERR_STALE = 5, 8, 11, 13
ERR_GRAPH, ERR_UNSUPPORTED, ERR_SHAPE = 9, 10, 12  # LOAD_COMMIT's refusals of a graph: sending it again cannot help

# dtypes: code -> numpy name (block formats by their GGUF names)
DTYPES = {1: "int8", 2: "uint8", 3: "int32", 4: "float32", 5: "int64", 8: "q4_0", 9: "q4_1", 10: "q8_0"}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}

# ops: code -> name (ONNX op names where the op is one)
OPS = {1: "MatMulInteger", 2: "QLinearMatMul", 3: "ConvInteger", 4: "QLinearConv", 5: "Add", 6: "Mul", 7: "Relu",
       8: "Copy", 9: "MatMulQBlock", 10: "Clip",
       # TFLite INT8 semantics (NHWC), PROTOCOL.md §6.1
       11: "FullyConnectedS8", 12: "Conv2DS8", 13: "DepthwiseConv2DS8", 14: "AddS8", 15: "AveragePool2DS8",
       16: "Concat"}
OP_CODES = {v: k for k, v in OPS.items()}
# ONNX ops the Copy op runs (same bytes, a new shape)
COPY_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")

# bytes of each chunked command's own fields before its data (u64 hash + u32 offset, u32 handle + u32 offset; a READ
# answer is all data): a frame of max_payload carries max_payload minus these of a graph or tensor
CHUNK_HEADER = {"LOAD_CHUNK": 12, "WRITE": 8, "READ": 0}
# the smallest max_payload a device may report: the STATS answer (56 bytes) fits in one frame and a LOAD_CHUNK
# carries at least 52 bytes of graph (a few bytes per frame would take millions of frames for a small model)
MIN_MAX_PAYLOAD = 64

STATS_FIELDS = ("boot_id", "frames_ok", "frames_bad", "duplicates", "stale", "invokes", "bytes_rx", "bytes_tx",
                "arena_bytes", "arena_used", "arena_high_water", "graphs", "tensors", "compute_us")
STATS_BYTES = 4 * len(STATS_FIELDS)


@dataclass(frozen=True)
class DeviceLimits:
    """What a device holds (HELLO, §3.1): per graph, tensors, nodes, and inputs and outputs (each); tensor handles
    and graphs in all. The defaults are the reference firmware's (§7), for a device whose HELLO names none."""

    max_tensors: int = 64
    max_nodes: int = 64
    max_io: int = 16
    max_handles: int = 48
    max_graphs: int = 8


LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceLimits))  # their order in HELLO: as declared


@dataclass(frozen=True)
class HelloInfo:
    """What a device says about itself in its HELLO answer."""

    protocol_version: int
    boot_id: int
    arena_bytes: int
    max_payload: int
    dtypes: tuple[str, ...]
    ops: tuple[str, ...]
    firmware_version: str
    limits: DeviceLimits = DeviceLimits()

    @classmethod
    def parse(cls, p: bytes) -> "HelloInfo":
        if len(p) < 22:
            raise ValueError(f"HELLO answer of {len(p)} bytes, expected at least 22")
        ver, _, boot, arena, maxp, mask, n_ops, n_fw = struct.unpack_from("<HHIIIIBB", p)
        if len(p) < 22 + n_ops + n_fw:
            raise ValueError("HELLO answer shorter than its op list and firmware version")
        if maxp < MIN_MAX_PAYLOAD:
            raise ValueError(f"max_payload of {maxp} bytes, expected at least {MIN_MAX_PAYLOAD}: a LOAD_CHUNK has a "
                             f"{CHUNK_HEADER['LOAD_CHUNK']}-byte header, a STATS answer is {STATS_BYTES} bytes")
        ops = tuple(OPS.get(c, f"op{c}") for c in p[22:22 + n_ops])
        fw = p[22 + n_ops:22 + n_ops + n_fw].decode("ascii", "replace")
        dts = tuple(name for code, name in DTYPES.items() if mask >> code & 1)
        at, limits = 22 + n_ops + n_fw, DeviceLimits()
        if len(p) > at:  # u8 count, u16 limits: ones this host does not know are skipped, missing ones defaulted
            if len(p) < at + 1 + 2 * p[at]:
                raise ValueError("HELLO answer shorter than its limits")
            limits = DeviceLimits(**dict(zip(LIMIT_FIELDS, struct.unpack_from(f"<{p[at]}H", p, at + 1))))
        return cls(ver, boot, arena, maxp, dts, ops, fw, limits)


def hello_request(version: int = PROTOCOL_VERSION, host_session: int = 0) -> bytes:
    """HELLO's payload: the host's protocol version and its host session (§2.5; 0: none, the device keeps what it
    holds)."""
    return struct.pack("<HHI", version, 0, host_session)


def parse_stats(p: bytes) -> dict:
    if len(p) < STATS_BYTES:
        raise ValueError(f"STATS answer of {len(p)} bytes, expected at least {STATS_BYTES}")
    vals = struct.unpack_from(f"<{len(STATS_FIELDS)}I", p)
    return dict(zip(STATS_FIELDS, vals))


def fnv1a64(data) -> int:
    """The graph hash (PROTOCOL.md §3.2): 64-bit FNV-1a of the blob."""
    a = np.frombuffer(bytes(data), dtype=np.uint8)
    h = 0xCBF29CE484222325
    prime = 0x100000001B3
    # pure Python per byte is slow for megabyte blobs: fold 8 lanes? FNV is inherently serial, so walk in chunks
    # with int arithmetic on a bytes object (fast enough: ~10 MB/s; graphs are hashed once per compile)
    for b in a.tobytes():
        h = ((h ^ b) * prime) & 0xFFFFFFFFFFFFFFFF
    return h


def tensor_nbytes(dtype: str, shape) -> int:
    shape = tuple(int(d) for d in shape)
    if dtype in BLOCK_BYTES:
        n, k = shape
        return n * (k // 32) * BLOCK_BYTES[dtype]
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass
class BlobTensor:
    dtype: str
    shape: tuple
    data: bytes | None = None  # constant data, or None for activations and graph inputs/outputs


@dataclass
class BlobNode:
    op: str
    inputs: list  # tensor ids, None for an absent optional input
    output: int
    attrs: list = field(default_factory=list)


_Q8 = ("int8", "uint8")


def requant_scales_ok(sa: BlobTensor, sb: BlobTensor, sy: BlobTensor) -> bool:
    """Whether every output channel's requantization scale ``s_a * s_b[c] / s_y`` of a QLinear node, in float32 in
    that order as the firmware computes it, is a positive finite float (graph.c: qlinear_scales_ok)."""
    f = [np.frombuffer(t.data, "<f4") for t in (sa, sb, sy)]
    with np.errstate(all="ignore"):
        v = (f[0][0] * f[1]) / f[2][0]
    return bool(((v > 0) & np.isfinite(v)).all())


def node_problem(op: str, ins: list, y: BlobTensor, attrs: list) -> str | None:
    """Why the reference firmware would refuse node ``op`` (its input tensors, None for an absent one; its output;
    its attributes) at LOAD_COMMIT, in the firmware's own words (graph.c: fw_graph_parse's per-tensor and per-node
    counts, check_node), or None. Covers the ops ONNX nodes become (1-8, 10, 16); the TFLite ops (11-15) are built
    by the host with their own checks (serial_npu.tflite_node)."""
    def numel(t):
        return int(np.prod(t.shape, dtype=np.int64))

    def param_ok(t, dt, ch):  # a constant of dtype dt: a scalar, or one per channel when ch > 0
        return t is not None and t.data is not None and t.dtype == dt and (
            numel(t) == 1 or (ch > 0 and numel(t) == ch and len(t.shape) == 1))

    def at(i):
        return ins[i] if i < len(ins) else None

    for t in (*ins, y):
        if t is not None and len(t.shape) > 4:
            return "graph blob: tensor rank > 4"
        if t is not None and (numel(t) > 1 << 30 or tensor_nbytes(t.dtype, t.shape) > 1 << 30):
            return "graph blob: tensor too large"
    if not 1 <= len(ins) <= 9 or len(attrs) > 12:
        return "graph blob: node input/output/attribute counts"
    a, b = ins[0], at(1)
    if a is None:
        return "node without its first input"
    if op in ("MatMulInteger", "QLinearMatMul"):
        q = op == "QLinearMatMul"
        b = at(3) if q else b
        if b is None or a.dtype not in _Q8 or b.dtype not in _Q8:
            return "matmul needs int8/uint8 A and B"
        if len(a.shape) < 2 or len(b.shape) != 2 or a.shape[-1] != b.shape[0]:
            return "matmul: A (..,M,K) B (K,N)"
        if b.shape[0] == 0:
            return "matmul: K is 0"
        n = b.shape[1]
        if tuple(y.shape) != (*a.shape[:-1], n):
            return "matmul: output shape"
        if q and (len(ins) != 8 or not (param_ok(at(1), "float32", 0) and param_ok(at(2), a.dtype, 0)
                                        and param_ok(at(4), "float32", n) and param_ok(at(5), b.dtype, n)
                                        and param_ok(at(6), "float32", 0) and y.dtype in _Q8
                                        and param_ok(at(7), y.dtype, 0))):
            return "QLinearMatMul: scales/zero points must be constants of the right dtype"
        if q and not requant_scales_ok(at(1), at(4), at(6)):
            return "QLinearMatMul: s_a * s_b / s_y must be a positive finite float32"
        if not q and (len(ins) > 4 or y.dtype != "int32" or not (at(2) is None or param_ok(at(2), a.dtype, 0))
                      or not (at(3) is None or param_ok(at(3), b.dtype, n))):
            return "MatMulInteger: int32 output, constant zero points"
    elif op in ("ConvInteger", "QLinearConv"):
        q = op == "QLinearConv"
        w = at(3) if q else b
        if w is None or a.dtype not in _Q8 or w.dtype not in _Q8:
            return "conv needs int8/uint8 x and w"
        if len(a.shape) != 4 or len(w.shape) != 4 or len(y.shape) != 4 or len(attrs) != 9:
            return "conv: 2-D (NCHW) only"
        grp, sh, sw, pt, pl, pb, pr, dh, dw = attrs
        if grp < 1 or min(sh, sw, dh, dw) < 1 or min(pt, pl, pb, pr) < 0 or max(sh, sw, dh, dw, pt, pl, pb, pr) > 255:
            return "conv: bad attributes"
        (nb, c, h, wd), (m, cg, kh, kw) = a.shape, w.shape
        if c % grp or m % grp or cg != c // grp or kh == 0 or kw == 0:
            return "conv: channels do not fit the group"
        eh, ew = h + pt + pb - dh * (kh - 1) - 1, wd + pl + pr - dw * (kw - 1) - 1
        if eh < 0 or ew < 0:
            return "conv: kernel larger than the padded input"
        if tuple(y.shape) != (nb, m, eh // sh + 1, ew // sw + 1):
            return "conv: output shape"
        if q and (not 8 <= len(ins) <= 9 or not (param_ok(at(1), "float32", 0) and param_ok(at(2), a.dtype, 0)
                                                 and param_ok(at(4), "float32", m) and param_ok(at(5), w.dtype, m)
                                                 and param_ok(at(6), "float32", 0) and y.dtype in _Q8
                                                 and param_ok(at(7), y.dtype, 0))):
            return "QLinearConv: scales/zero points must be constants of the right dtype"
        if q and not requant_scales_ok(at(1), at(4), at(6)):
            return "QLinearConv: s_x * s_w / s_y must be a positive finite float32"
        if q and at(8) is not None and (at(8).dtype != "int32" or numel(at(8)) != m or at(8).data is None):
            return "QLinearConv: bias must be a constant int32 (M)"
        if not q and (len(ins) > 4 or y.dtype != "int32" or not (at(2) is None or param_ok(at(2), a.dtype, 0))
                      or not (at(3) is None or param_ok(at(3), w.dtype, m))):
            return "ConvInteger: int32 output, constant zero points"
    elif op in ("Add", "Mul"):
        if b is None or len(ins) != 2 or not a.dtype == b.dtype == y.dtype or a.dtype not in ("int32", "int8"):
            return "Add/Mul: int32 (or int8) operands of one dtype"
        r = len(y.shape)
        pa, pb_ = ((1,) * (r - len(t.shape)) + tuple(t.shape) if len(t.shape) <= r else None for t in (a, b))
        if pa is None or pb_ is None or any(not (da in (d, 1) and db in (d, 1)) for da, db, d in zip(pa, pb_, y.shape)):
            return "Add/Mul: broadcast shape"
    elif op in ("Relu", "Clip"):
        if a.dtype not in ("int8", "int32", "uint8") or y.dtype != a.dtype or numel(y) != numel(a):
            return "Relu/Clip: int8/uint8/int32, same shape"
        if op == "Clip" and len(attrs) != 2:
            return "Clip: two attributes (min, max)"
    elif op == "Copy":
        if tensor_nbytes(y.dtype, y.shape) != tensor_nbytes(a.dtype, a.shape) or y.dtype != a.dtype:
            return "reshape: same bytes and dtype"
    elif op == "Concat":
        if len(attrs) != 1 or not 0 <= attrs[0] < len(y.shape):
            return "Concat: axis attribute"
        ax = attrs[0]
        for t in ins:
            if t is None or t.dtype != y.dtype or len(t.shape) != len(y.shape) or t.dtype in BLOCK_BYTES:
                return "Concat: inputs of the output's dtype and rank"
            if any(t.shape[d] != y.shape[d] for d in range(len(y.shape)) if d != ax):
                return "Concat: dims differ off the axis"
        if sum(t.shape[ax] for t in ins) != y.shape[ax]:
            return "Concat: output size along the axis"
    return None


def arena_round(nbytes: int) -> int:
    """What an allocation of ``nbytes`` takes of the reference firmware's arena (arena.c: 8-byte blocks, 8 for 0)."""
    return max((int(nbytes) + 7) & ~7, 8)


def activation_bytes(tensors: list[BlobTensor], nodes: list[BlobNode], inputs: list[int], outputs: list[int]) -> int:
    """The activation memory LOAD_COMMIT reserves for a graph (graph.c, fw_graph_parse): every tensor a node writes
    that is not a graph output, each rounded to 8 bytes, plus the largest q-block matmul's scratch (M·K/32 40-byte
    block_q8_s), as one arena block."""
    io = set(inputs) | set(outputs)
    act = sum((tensor_nbytes(tensors[nd.output].dtype, tensors[nd.output].shape) + 7) & ~7
              for nd in nodes if nd.output not in io)
    scratch = [tensors[nd.inputs[0]].shape[0] * (tensors[nd.inputs[0]].shape[1] // 32) * 40
               for nd in nodes if nd.op == "MatMulQBlock"]
    return arena_round(act + max(scratch, default=0))


def encode_graph(tensors: list[BlobTensor], nodes: list[BlobNode], inputs: list[int], outputs: list[int]) -> bytes:
    """The graph blob of PROTOCOL.md §6."""
    meta = bytearray(struct.pack("<IHHHH", 0x46524745, len(tensors), len(nodes), len(inputs), len(outputs)))
    size = len(meta)
    for t in tensors:
        size += 4 + 4 * len(t.shape) + (8 if t.data is not None else 0)
    for nd in nodes:
        size += 4 + 2 * len(nd.inputs) + 2 + 4 * len(nd.attrs)
    size += 2 * (len(inputs) + len(outputs))
    data_at = (size + 7) & ~7
    blobs = bytearray()
    for t in tensors:
        meta += struct.pack("<BBBB", DTYPE_CODES[t.dtype], len(t.shape), t.data is not None, 0)
        meta += struct.pack(f"<{len(t.shape)}I", *t.shape)
        if t.data is not None:
            want = tensor_nbytes(t.dtype, t.shape)
            if len(t.data) != want:
                raise ValueError(f"constant of {t.dtype}{tuple(t.shape)} holds {len(t.data)} bytes, expected {want}")
            meta += struct.pack("<II", len(t.data), data_at + len(blobs))
            blobs += t.data
            blobs += b"\x00" * (-len(blobs) % 8)
    for nd in nodes:
        meta += struct.pack("<BBBB", OP_CODES[nd.op], len(nd.inputs), 1, len(nd.attrs))
        meta += struct.pack(f"<{len(nd.inputs)}H", *[0xFFFF if i is None else i for i in nd.inputs])
        meta += struct.pack("<H", nd.output)
        meta += struct.pack(f"<{len(nd.attrs)}i", *nd.attrs)
    meta += struct.pack(f"<{len(inputs)}H", *inputs)
    meta += struct.pack(f"<{len(outputs)}H", *outputs)
    assert len(meta) == size
    meta += b"\x00" * (data_at - size)
    return bytes(meta + blobs)
