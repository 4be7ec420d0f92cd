"""Quantized tensors: QTensor (GGUF block layouts), quantize, matmul, import of onnxruntime MatMulNBits weights, and
Int8Weights (int8 weights planned for the C core's int8 product: TFLite FULLY_CONNECTED, onnxruntime dynamic int8).

Every array is checked here (dtype, contiguity, shape, buffer size) before a pointer reaches the C core.
"""
from __future__ import annotations

import mmap
from numbers import Integral

import numpy as np

from . import native
from .errors import DTypeError, InvalidArgumentError, ShapeError, check_count
from .native import ffi, lib

BLOCK = 32  # values per block in every block format

# format name -> ggml/GGUF type id
FORMATS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}
FORMAT_BY_ID = {v: k for k, v in FORMATS.items()}
BLOCK_FORMATS = ("q4_0", "q4_1", "q8_0")
_ELEMENT = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16)}  # float formats' values, native byte order
_F32 = np.dtype(np.float32)  # compared by identity first: the per-call check of a run loop's x


def _fmt_id(fmt: str) -> int:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def row_bytes(fmt: str, k: int) -> int:
    """Bytes in one row of k values stored as fmt."""
    n = lib.et_row_size(_fmt_id(fmt), k)
    if n == 0:
        raise ShapeError(f"{fmt} rows need K to be a positive multiple of {BLOCK}, got K={k}")
    return n


def aligned_empty(nbytes: int, dtype=np.uint8) -> np.ndarray:
    """An uninitialised buffer of ``nbytes`` starting on a 64-byte boundary (whole output rows then leave the
    kernels as whole cache lines; the fc_s8 plan needs it)."""
    try:
        raw = np.empty(nbytes + 64, np.uint8)
    except (MemoryError, ValueError):
        raise InvalidArgumentError(f"cannot allocate {nbytes} bytes: the array asked for is too large") from None
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes].view(dtype)


class QTensor:
    """A 2-D weight matrix (N, K) in one of the GGUF formats. ``raw`` is a uint8 view (N, row_bytes) of the blocks,
    byte-for-byte the GGUF layout; it may alias a memory-mapped file or a caller's buffer (no copy is made)."""

    __slots__ = ("_fmt", "_shape", "_raw")

    def __init__(self, fmt: str, shape: tuple[int, int], raw: np.ndarray):
        # quantize() and from_raw() are the usual ways in; this one checks what the C core will rely on
        n, k = _shape2(shape)
        rb = row_bytes(fmt, k)
        self._fmt, self._shape = fmt, (n, k)
        self._raw = _blocks(raw, n * rb, f"{fmt} tensor of shape ({n}, {k}) ({n} rows x {rb})").reshape(n, rb)

    fmt = property(lambda self: self._fmt, doc="the format name (q4_0, q4_1, q8_0, f16, f32)")
    shape = property(lambda self: self._shape, doc="(N, K)")
    raw = property(lambda self: self._raw, doc="the blocks, a uint8 (N, row bytes) array (read-only attribute)")

    @property
    def type_id(self) -> int:
        return FORMATS[self.fmt]

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @classmethod
    def from_raw(cls, fmt: str, shape, raw) -> "QTensor":
        """Wrap existing blocks (numpy array, bytes, memoryview, mmap) without copying; the size must match."""
        _fmt_id(fmt)  # the format and the shape are judged before what raw is
        _shape2(shape)
        if isinstance(raw, np.ndarray):
            # bytes (uint8, int8), or f16/f32 values as the format holds them (native byte order); any other
            # array's bytes are not what the name says (big-endian floats read as garbage)
            if raw.dtype not in (np.uint8, np.int8) and not (fmt in _ELEMENT and raw.dtype == _ELEMENT[fmt]):
                also = f" or native {_ELEMENT[fmt]} values" if fmt in _ELEMENT else ""
                raise DTypeError(f"raw blocks must be a uint8 (or int8) array{also}, got a {raw.dtype} array")
            if not raw.flags.c_contiguous:
                raise InvalidArgumentError("raw blocks must be C-contiguous (got a strided view); pass a contiguous copy")
            buf = np.asarray(raw).reshape(-1).view(np.uint8)  # a subclass (np.matrix stays 2-D) as a plain view
        else:
            try:
                buf = np.frombuffer(raw, dtype=np.uint8)
            except (TypeError, ValueError, BufferError) as exc:
                raise DTypeError(f"raw must be a numpy array or a contiguous buffer, got {type(raw).__name__}") \
                    from exc
        return cls(fmt, shape, buf)  # checks the size

    def dequantize(self) -> np.ndarray:
        """The float32 (N, K) values the blocks encode."""
        n, k = self.shape
        out = aligned_empty(n * k * 4, np.float32).reshape(n, k)
        native.check(lib.et_dequantize(self.type_id, native.ptr(self.raw), native.ptr(out, "float *"), n, k))
        return out

    def __repr__(self) -> str:
        return f"QTensor(fmt={self.fmt!r}, shape={self.shape}, nbytes={self.nbytes})"


MAX_DIM = 1 << 40  # rows or columns: far beyond any model, and size arithmetic on it cannot overflow


def _shape2(shape) -> tuple[int, int]:
    """A weight shape (N, K): two ints in [1, MAX_DIM]."""
    try:
        n, k = shape
    except (TypeError, ValueError):
        raise ShapeError(f"shape must be (N, K), got {shape!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in (n, k)):
        raise ShapeError(f"shape must be two ints (N, K), got {shape!r}")
    if not (1 <= n <= MAX_DIM and 1 <= k <= MAX_DIM):
        raise ShapeError(f"shape must be positive and at most {MAX_DIM} each, got ({n}, {k})")
    return int(n), int(k)


def _blocks(raw, nbytes: int, what: str) -> np.ndarray:
    """raw, when it is a C-contiguous uint8 array (an np.memmap too) of exactly nbytes (the bytes the C core will
    read)."""
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or not raw.flags.c_contiguous:
        raise DTypeError(f"{what}: raw must be a C-contiguous uint8 numpy array, got "
                         f"{getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.nbytes != nbytes:
        raise ShapeError(f"{what} needs {nbytes} bytes, got {raw.nbytes}")
    return raw


class PackedQTensor:
    """A block-format QTensor repacked into the x16 layout (docs/formats.md): rows in tiles of 16, each tile's
    quants transposed so one 64-byte load holds 4 bytes of each of its 16 rows, the scales 16 to a vector. The
    values are the QTensor's: where the ISA reads the layout with its own kernels (``repack_pays``), ``matmul`` and
    ``BoundMatMul`` give the same bits as on the GGUF rows, faster; elsewhere the reference kernel's. ``raw`` is the
    uint8 tile bytes, ``nbytes`` about the QTensor's (rows rounded up to 16, each tile to 64 bytes); drop the QTensor
    to keep one copy."""

    __slots__ = ("_fmt", "_shape", "_raw")
    layout = "x16"

    def __init__(self, fmt: str, shape: tuple[int, int], raw: np.ndarray):
        # repack() is the way in; this one checks what the C core will rely on
        n, k = _shape2(shape)
        if fmt not in BLOCK_FORMATS or k % BLOCK:
            raise InvalidArgumentError(f"the x16 layout holds {', '.join(BLOCK_FORMATS)} rows of K % {BLOCK} == 0, "
                                       f"got {fmt!r} ({n}, {k})")
        size = int(lib.et_repack_size(FORMATS[fmt], n, k))
        self._fmt, self._shape, self._raw = fmt, (n, k), _blocks(raw, size, f"x16 {fmt} ({n}, {k})")

    fmt = property(lambda self: self._fmt, doc="the format name (q4_0, q4_1, q8_0)")
    shape = property(lambda self: self._shape, doc="(N, K)")
    raw = property(lambda self: self._raw, doc="the tile bytes, a uint8 array (read-only attribute)")

    @property
    def type_id(self) -> int:
        return FORMATS[self.fmt] | lib.ET_TYPE_X16

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def unpack(self) -> QTensor:
        """The GGUF blocks again, as a new QTensor."""
        n, k = self.shape
        raw = aligned_empty(n * row_bytes(self.fmt, k)).reshape(n, -1)
        native.check(lib.et_unrepack(FORMATS[self.fmt], native.ptr(self.raw), n, k, native.ptr(raw), raw.nbytes))
        return QTensor(self.fmt, (n, k), raw)

    def dequantize(self) -> np.ndarray:
        """The float32 (N, K) values the blocks encode."""
        return self.unpack().dequantize()

    def __repr__(self) -> str:
        return f"PackedQTensor(fmt={self.fmt!r}, shape={self.shape}, layout='x16', nbytes={self.nbytes})"


def repack_pays(fmt: str) -> bool:
    """Whether the ISA in use has its own kernels for the x16 layout of ``fmt``: then products on ``repack``'d
    weights are bit for bit those on the QTensor; elsewhere they run on the reference kernel (its results, slower)."""
    return fmt in BLOCK_FORMATS and bool(lib.et_repack_native(FORMATS[fmt]))


def repack_size(w: QTensor) -> int:
    """Bytes ``repack(w)`` takes: ``ceil(N/16)`` tiles of 16 rows, each a multiple of 64 bytes."""
    if not isinstance(w, QTensor):
        raise DTypeError(f"w must be an edgert.QTensor, got {type(w).__name__}")
    if w.fmt not in BLOCK_FORMATS:
        raise InvalidArgumentError(f"only block formats ({', '.join(BLOCK_FORMATS)}) repack, got {w.fmt}")
    return int(lib.et_repack_size(w.type_id, *w.shape))


def repack(w: QTensor, out: np.ndarray | None = None) -> PackedQTensor:
    """``w`` (q4_0, q4_1 or q8_0) in the x16 layout, in a new 64-byte aligned buffer about ``w.nbytes`` long, or
    in ``out[:repack_size(w)]`` (uint8, C-contiguous, writeable). A loader repacking many matrices does better with
    one arena for all of them (consecutive slices stay 64-byte aligned): one large allocation gets huge pages, which
    spares the streaming kernels a TLB miss every 4 KiB."""
    size = repack_size(w)
    n, k = w.shape
    if out is None:
        raw = aligned_empty(size)
    else:
        if (type(out) is not np.ndarray or out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous
                or not out.flags.writeable or out.nbytes < size):
            raise InvalidArgumentError(f"out must be a writeable C-contiguous 1-D uint8 array of at least {size} bytes, "
                                       f"got {getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
        raw = out[:size]
        if np.may_share_memory(raw, w.raw):
            raise InvalidArgumentError("out overlaps the weights being repacked: repack into a separate buffer")
    native.check(lib.et_repack(w.type_id, native.ptr(w.raw), n, k, native.ptr(raw), size))
    return PackedQTensor(w.fmt, (n, k), raw)


def _weight(w):
    if not isinstance(w, (QTensor, PackedQTensor)):
        raise DTypeError(f"w must be an edgert.QTensor (see edgert.quantize) or a PackedQTensor (edgert.repack), got "
                         f"{type(w).__name__}")
    return w


def quantize(w: np.ndarray, fmt: str) -> QTensor:
    """Quantize float32 weights (N, K) to fmt; bit-identical to ggml's reference quantizers. NaN/Inf are refused."""
    fid = _fmt_id(fmt)
    if not isinstance(w, np.ndarray):
        raise DTypeError(f"weights must be a numpy float32 array, got {type(w).__name__}")
    if w.dtype != np.float32:
        raise DTypeError(f"weights must be float32, got {w.dtype} (use w.astype(np.float32))")
    if w.ndim != 2:
        raise ShapeError(f"weights must be 2-D (N, K), got shape {w.shape}")
    n, k = w.shape
    if n < 1 or k < 1:
        raise ShapeError(f"weights must be non-empty, got shape {w.shape}")
    rb = row_bytes(fmt, k)
    try:
        w = np.ascontiguousarray(w)
    except MemoryError:  # a broadcast view of a huge shape
        raise InvalidArgumentError(f"weights of shape {w.shape} do not fit in memory as a contiguous array") from None
    raw = aligned_empty(n * rb).reshape(n, rb)
    native.check(lib.et_quantize(fid, native.ptr(w, "float *"), native.ptr(raw), n, k))
    return QTensor(fmt, (n, k), raw)


def matmul(x: np.ndarray, w: QTensor | PackedQTensor, threads: int | None = None, *, out: np.ndarray | None = None,
           scratch: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T for x float32 (M, K) C-contiguous and w a QTensor or PackedQTensor (N, K) -> float32 (M, N).
    A 1-D x of length K gives a 1-D result of length N. Block formats quantize x per block of 32 to 8 bits.

    ``out``: a float32 C-contiguous array of the result's shape to write into (returned), instead of a new one.
    ``scratch``: a uint8 C-contiguous array of at least ``matmul_scratch_size(w, m)`` bytes, reused instead of
    allocated. With both, a call allocates nothing (callers in a run loop keep them)."""
    _weight(w)
    if not isinstance(x, np.ndarray):
        raise DTypeError(f"x must be a numpy float32 array, got {type(x).__name__}"
                         f"{' (a numpy scalar: pass an array of shape (M, K))' if isinstance(x, np.generic) else ''}")
    if x.dtype != np.float32:
        raise DTypeError(f"x must be float32, got {x.dtype} (use x.astype(np.float32))")
    if x.ndim not in (1, 2):
        raise ShapeError(f"x must be (M, K) or (K,), got shape {x.shape}")
    if not x.flags.c_contiguous:  # checked before the 1-D reshape so the message shows the caller's array
        raise InvalidArgumentError(
            f"x must be C-contiguous (got strides {x.strides} for shape {x.shape}); use np.ascontiguousarray(x)"
        )
    squeeze = x.ndim == 1
    if squeeze:
        x = x.reshape(1, -1)
    m, k = x.shape
    n, wk = w.shape
    if k != wk:
        raise ShapeError(f"x has K={k} but w has shape ({n}, {wk}): K must match")
    if m < 1:
        raise ShapeError(f"x must have at least one row, got shape {x.shape}")
    nth = _threads(threads)
    if out is None:  # 64-byte aligned: full output rows leave the kernels as whole cache lines (streaming stores)
        y = aligned_empty(m * n * 4, np.float32).reshape(m, n)
    else:  # any alignment works: the kernels stream only to 64-byte aligned rows
        want = (n,) if squeeze else (m, n)
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != want \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise InvalidArgumentError(f"out must be a writeable C-contiguous float32 array of shape {want}, got "
                                       f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
        y = out.reshape(m, n)
        if np.may_share_memory(y, x) or np.may_share_memory(y, w.raw):
            raise InvalidArgumentError("out overlaps x or the weights: the product would read what it writes")
    ss = matmul_scratch_size(w, m)
    if scratch is None:
        scratch = aligned_empty(ss)
    elif (not isinstance(scratch, np.ndarray) or scratch.dtype != np.uint8 or not scratch.flags.c_contiguous
          or not scratch.flags.writeable or scratch.nbytes < ss):
        raise InvalidArgumentError(f"scratch must be a writeable C-contiguous uint8 array of at least {ss} bytes "
                                   f"(matmul_scratch_size), got {getattr(scratch, 'dtype', type(scratch).__name__)} "
                                   f"of {getattr(scratch, 'nbytes', '?')} bytes")
    elif any(np.may_share_memory(scratch, a) for a in (x, w.raw, y)):
        raise InvalidArgumentError("scratch overlaps x, the weights or the output")
    native.check(lib.et_matmul(native.ptr(x, "float *"), m, k, w.type_id, native.ptr(w.raw), n, native.ptr(y, "float *"),
                               native.ptr(scratch), ss, nth))
    if out is not None:
        return out
    return y[0] if squeeze else y


def _threads(threads) -> int:
    """A product's ``threads`` argument (None or an int in [1, native.MAX_THREADS]) as the C core's count (0: the
    pool's)."""
    return native.check_threads(threads) or 0


def _rows(m) -> int:
    if isinstance(m, bool) or not isinstance(m, Integral) or not 1 <= m <= MAX_DIM:  # numpy ints too, as threads
        raise ShapeError(f"m must be an int in [1, {MAX_DIM}], got {m!r}")
    return int(m)


def _out_ptr(out, m: int, n: int):
    """The C pointer of a caller's output buffer for a bound product, checked: float32 (m, n), C-contiguous,
    writeable."""
    if (type(out) is not np.ndarray or out.dtype != np.float32 or out.shape != (m, n) or not out.flags.c_contiguous
            or not out.flags.writeable):
        raise InvalidArgumentError(f"out must be a writeable C-contiguous float32 array of shape {(m, n)}")
    return native.ptr(out, "float *")


class BoundMatMul:
    """``y = x @ w.T`` for one weight and one row count, for a caller that runs the same product again and again
    (the host delegate's C-core steps): the output, the scratch and the weight's pointer are made once, so a call
    checks x and makes one C call.

    ``x``: float32 (m, kx) with ``kx <= K`` (the weight's K; block formats only when shorter: the missing columns
    count as zeros, which is exact) and unit column stride; rows may be further apart (a slice of a wider array).
    Returns the bound output (m, N), overwritten by the next call. Block formats quantize x: a NaN or Inf in it is
    NonFiniteError (an InvalidArgumentError) naming its first row, nothing written."""

    __slots__ = ("w", "m", "kx", "threads", "out", "_scratch", "_py", "_call", "_x", "_px", "_x_in_out")

    def __init__(self, w: QTensor | PackedQTensor, m: int, kx: int | None = None, threads: int | None = None):
        n, k = _weight(w).shape
        kx = k if kx is None else kx
        nth = _threads(threads)
        self.m = _rows(m)
        exact = w.fmt in ("f16", "f32")  # block formats take shorter rows (zero-padded, exact); float ones do not
        if isinstance(kx, bool) or not isinstance(kx, Integral) or not 1 <= kx <= k or (kx != k and exact):
            raise ShapeError(f"kx={kx!r} must be " + (f"K={k} ({w.fmt} weights)" if exact else
                                                      f"an int in [1, K={k}]"))
        kx = int(kx)
        self.w, self.kx, self.threads = w, kx, threads
        self.out = aligned_empty(m * n * 4, np.float32).reshape(m, n)
        ss = matmul_scratch_size(w, m)
        self._scratch = aligned_empty(ss)
        self._py = native.ptr(self.out, "float *")
        # what every call passes, gathered once: a run loop's call then touches this object and x only
        self._call = (lib.et_matmul_ex, m, kx, (m, kx), 4 * kx, w.type_id, native.ptr(w.raw), n, k,
                      native.ptr(self._scratch), ss, nth)
        self._x = self._px = None  # the last x and its pointer: a run loop passes the same buffer every call
        self._x_in_out = False  # whether that x shares memory with the bound output

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The product for ``x``, in the bound output, or in ``out`` (float32 C-contiguous (m, N)) when given."""
        fn, m, kx, shape, row, tid, pw, n, k, ps, ss, nth = self._call
        # dtype, shape and strides are checked every call: numpy lets them be reassigned in place (the data
        # pointer cannot be, so the pointer made for the same x object last time is still its data)
        if type(x) is not np.ndarray or (x.dtype is not _F32 and x.dtype != _F32) or x.shape != shape:
            raise self._bad_x(x)
        st = x.strides
        if st[1] != 4 or (m > 1 and (st[0] % 4 or st[0] < row)):
            raise self._bad_x(x)
        if x is self._x:
            px = self._px
        else:
            try:  # from_buffer needs a contiguous buffer: a strided x is passed by its first element's address
                px = ffi.from_buffer("float[]", x)
            except (BufferError, ValueError):
                px = ffi.cast("float *", x.ctypes.data)
            self._x, self._px, self._x_in_out = x, px, bool(np.may_share_memory(x, self.out))
        if out is None:
            py = self._py
            if self._x_in_out:  # e.g. b(b.out) when N == K: the kernels read x while they write the output
                raise InvalidArgumentError("x overlaps the bound output: the product would read what it writes "
                                           "(copy x, or pass out=)")
        else:
            py = _out_ptr(out, m, n)
            if np.may_share_memory(x, out):
                raise InvalidArgumentError("out overlaps x: the product would read what it writes")
        status = fn(px, m, kx, st[0] // 4 if m > 1 else kx, tid, pw, n, k, py, n, ps, ss, nth)
        if status:
            native.check(status)
        return self.out if out is None else out

    def _bad_x(self, x) -> ShapeError:
        return ShapeError(f"x must be float32 ({self.m}, {self.kx}) with unit column stride, got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')} "
                          f"strides {getattr(x, 'strides', '')}")


def matmul_scratch_size(w: QTensor, m: int) -> int:
    """Bytes of scratch ``matmul`` needs for ``m`` rows of activations against ``w`` (for its ``scratch=``)."""
    m = _rows(m)
    ss = int(lib.et_matmul_scratch_size(_weight(w).type_id, m, int(w.shape[1])))
    if ss == 0 and w.fmt in BLOCK_FORMATS:
        raise ShapeError(f"m={m} rows of K={w.shape[1]} need more scratch than an address space holds")
    return max(ss, 1)


def _fp16_holds(v: np.ndarray) -> bool:
    """Whether fp16 holds every value of v to its own rounding: zeros, and magnitudes in [2^-14, 65504]."""
    a = np.abs(v)
    return bool(((a == 0) | ((a >= 2.0 ** -14) & (a <= 65504))).all())


def from_matmul_nbits(b, scales, zero_points=None, *, k: int, n: int, block_size: int, bits: int = 4) -> QTensor:
    """Import onnxruntime ``MatMulNBits`` INT4 weights (inputs B, scales, zero_points; attributes K, N, block_size)
    into a host QTensor of shape (N, K).

    w[n, k] = (q - zp) * scale, q the 4-bit code (low nibble first), zp 8 when zero_points is absent.
    block_size >= 32: q4_0 without zero points (d = scale), q4_1 with them (d = scale, m = -zp * scale); exact up
    to the fp16 rounding of d and m. block_size 16 has two scales per 32-value block, which no GGUF block format
    holds, so it is imported as f16 (exact up to the fp16 rounding of each weight), as is a K that is not a multiple
    of 32 (the block formats need whole 32-value blocks). Where fp16 cannot hold them
    (d, m or the f16 weights beyond 65504, or nonzero ones below fp16's smallest normal, 2^-14, where its rounding
    loses digits or gives 0) the weights are imported as f32, exact. NaN or infinite scales or zero points are
    refused.
    """
    bits = check_count("MatMulNBits bits", bits, lo=1)
    block_size = check_count("MatMulNBits block_size", block_size, lo=1)
    k, n = check_count("MatMulNBits K", k, lo=1), check_count("MatMulNBits N", n, lo=1)
    if bits != 4:
        raise InvalidArgumentError(f"MatMulNBits import supports bits=4, got bits={bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise InvalidArgumentError(f"MatMulNBits block_size must be a power of two >= 16, got {block_size}")
    nblk = -(-k // block_size)
    blob = block_size // 2
    b = np.asarray(b)
    if b.dtype != np.uint8 or b.size != n * nblk * blob:
        raise ShapeError(f"B must be uint8 [N={n}, n_blocks={nblk}, {blob}], got {b.dtype} {b.shape}")
    scales = np.asarray(scales)
    if scales.dtype not in (np.float32, np.float16) or scales.size != n * nblk:
        raise ShapeError(f"scales must be float32/float16 with N*n_blocks={n * nblk} values, got {scales.dtype} {scales.shape}")
    scale = scales.astype(np.float32).reshape(n, nblk)
    if not np.isfinite(scale).all():
        raise InvalidArgumentError("MatMulNBits scales must be finite (a NaN or infinite scale has no weights)")
    packed = b.reshape(n, nblk * blob)
    q = np.empty((n, nblk * block_size), dtype=np.uint8)
    q[:, 0::2] = packed & 0x0F
    q[:, 1::2] = packed >> 4
    q = q[:, :k]
    if zero_points is None:
        zp = None
    else:
        zero_points = np.asarray(zero_points)
        if zero_points.dtype == np.uint8:
            per_row = -(-nblk // 2)
            if zero_points.size != n * per_row:
                raise ShapeError(f"packed uint8 zero_points must hold N*ceil(n_blocks/2)={n * per_row} bytes, got {zero_points.size}")
            zpp = zero_points.reshape(n, per_row)
            zp = np.empty((n, per_row * 2), dtype=np.float32)
            zp[:, 0::2] = zpp & 0x0F
            zp[:, 1::2] = zpp >> 4
            zp = zp[:, :nblk]
        elif zero_points.dtype in (np.float32, np.float16) and zero_points.size == n * nblk:
            zp = zero_points.astype(np.float32).reshape(n, nblk)
        else:
            raise ShapeError(f"zero_points must be packed uint8 or float with N*n_blocks values, got {zero_points.dtype} {zero_points.shape}")
        if not np.isfinite(zp).all():
            raise InvalidArgumentError("MatMulNBits zero_points must be finite")

    mz = None if zp is None else -zp * scale  # the q4_1 min of each MatMulNBits block
    # f16/f32 hold any K: block_size 16, K not a multiple of 32 (no whole host blocks), or scales fp16 cannot hold
    if block_size == 16 or k % BLOCK or not (_fp16_holds(scale) and (mz is None or _fp16_holds(mz))):
        zpv = 8.0 if zp is None else np.repeat(zp, block_size, axis=1)[:, :k]
        w = np.ascontiguousarray((q.astype(np.float32) - zpv) * np.repeat(scale, block_size, axis=1)[:, :k])
        return quantize(w, "f16" if _fp16_holds(w) else "f32")

    nb = k // BLOCK
    per = block_size // BLOCK  # host blocks per MatMulNBits block
    d = np.repeat(scale, per, axis=1)[:, :nb].astype(np.float16)
    qb = q.reshape(n, nb, BLOCK)
    qs = (qb[:, :, :16] | (qb[:, :, 16:] << 4)).astype(np.uint8)
    if zp is None:
        raw = np.empty((n, nb, 18), dtype=np.uint8)
        raw[:, :, 0:2] = d.reshape(n, nb, 1).view(np.uint8)
        raw[:, :, 2:] = qs
        return QTensor("q4_0", (n, k), raw.reshape(n, nb * 18))
    m = np.repeat(mz, per, axis=1)[:, :nb].astype(np.float16)
    raw = np.empty((n, nb, 20), dtype=np.uint8)
    raw[:, :, 0:2] = d.reshape(n, nb, 1).view(np.uint8)
    raw[:, :, 2:4] = m.reshape(n, nb, 1).view(np.uint8)
    raw[:, :, 4:] = qs
    return QTensor("q4_1", (n, k), raw.reshape(n, nb * 20))


# ---- int8 weights for the C core's int8 product (et_fc_s8) -----------------------------------------------------
_HUGE = 2 << 20                # transparent huge page size on x86-64 and most AArch64 kernels
HUGE_PAGE_MIN_BYTES = 1 << 20  # plans from this size on sit on huge pages (see _plan_buffer)


def _plan_buffer(nbytes: int) -> np.ndarray:
    """A 64-byte aligned buffer for an FC plan. From HUGE_PAGE_MIN_BYTES on: 2 MiB aligned anonymous memory advised
    to use transparent huge pages, so the weights are physically contiguous. On 4 KiB pages their placement in the
    (physically indexed) L2 changes from one allocation to the next: a 1 MiB layer that stays in a 2 MiB L2 ran
    7.0-8.3 us over eight allocations, and one TLB entry covers 2 MiB instead of 4 KiB."""
    if nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return aligned_empty(nbytes)
    size = -(-nbytes // _HUGE) * _HUGE
    mm = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP applies
    raw = np.frombuffer(mm, np.uint8)
    off = (-raw.ctypes.data) % _HUGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, off, size)
    except OSError:  # a kernel without transparent huge pages: ordinary pages, same contents
        pass
    return raw[off:off + nbytes]


def _exact_array(name: str, v, dtype, what: str) -> np.ndarray:
    """v as a flat contiguous array of dtype, refused when a value is not a number of that kind or changes on the
    way (an int out of range wraps, a fraction truncates: both would be silently different weights)."""
    try:
        a = np.asarray(v)
        if a.dtype.kind not in "biuf" or a.dtype == np.bool_:
            raise TypeError
        with np.errstate(invalid="ignore", over="ignore"):
            out = np.ascontiguousarray(a, dtype).reshape(-1)
            a64 = a.reshape(-1).astype(np.float64)
            # float32: rounding is fine, turning finite into inf or a nonzero value into 0 (1e-50) is not
            same = np.array_equal(out.astype(np.float64), a64, equal_nan=True) if dtype != np.float32 else \
                np.all((np.isfinite(out) == np.isfinite(a64)) & ((out == 0) == (a64 == 0)))
    except (TypeError, ValueError, OverflowError):
        raise DTypeError(f"{name} must be {what}, got {v!r}") from None
    if not same:
        raise InvalidArgumentError(f"{name} must be {what}: some values do not fit, got {v!r}")
    return out


class Int8Weights:
    """(N, K) int8 weights planned once for the C core's int8 product (``et_fc_s8_plan``: weights packed, the bias
    and the activation zero point folded per channel, scales and the clamp range stored). ``scale``: N floats (or
    one) >= 0 — for the int8-out product ``input_scale * w_scale / output_scale``, for the float-out dynamic product
    (:class:`BoundDynamicInt8`) ``w_scale``. Errors are ``edgert`` errors naming what is wrong."""

    def __init__(self, w: np.ndarray, bias: np.ndarray | None = None, x_zp: int = 0, scale=1.0, y_zp: int = 0,
                 lo: int = -128, hi: int = 127):
        w = np.asarray(w)
        if w.ndim != 2 or w.dtype != np.int8 or 0 in w.shape:
            raise DTypeError(f"weights must be non-empty 2-D int8, got {w.dtype} {w.shape}")
        self.shape = (int(w.shape[0]), int(w.shape[1]))
        n, k = self.shape
        x_zp, y_zp, lo, hi = (check_count(name, v, lo=-128, hi=127) for name, v in
                              (("x_zp", x_zp), ("y_zp", y_zp), ("lo", lo), ("hi", hi)))
        if lo > hi:
            raise InvalidArgumentError(f"zero points and clamp range must lie in int8 (x_zp {x_zp}, y_zp {y_zp}, "
                                       f"[{lo}, {hi}])")
        sc = _exact_array("scale", scale, np.float32, "real numbers")
        if sc.size not in (1, n):
            raise ShapeError(f"scale holds {sc.size} values, expected 1 or {n}")
        self.scale = np.ascontiguousarray(np.broadcast_to(sc, (n,)))
        if not (np.all(np.isfinite(self.scale)) and np.all(self.scale >= 0)):
            raise InvalidArgumentError("scales must be finite and >= 0")
        self.bias = None if bias is None else _exact_array("bias", bias, np.int32, "int32 integers")
        if self.bias is not None and self.bias.size != n:
            raise ShapeError(f"bias holds {self.bias.size} values, expected {n}")
        size = int(lib.et_fc_s8_plan_size(n, k))
        if size == 0:
            raise ShapeError(f"weights {n}x{k} too large for the C core")
        self.plan = _plan_buffer(size)
        wc = np.ascontiguousarray(w)
        native.check(lib.et_fc_s8_plan(native.ptr(wc, "const int8_t *"), n, k,
                                       native.ffi.NULL if self.bias is None
                                       else native.ptr(self.bias, "const int32_t *"),
                                       x_zp, native.ptr(self.scale, "const float *"), y_zp, lo, hi,
                                       native.ffi.cast("void *", self.plan.ctypes.data), size))
        # cast once: a cffi cast or ndarray.ctypes costs about a microsecond, a small product well under that
        self.p_plan = native.ffi.cast("const void *", self.plan.ctypes.data)


class BoundDynamicInt8:
    """onnxruntime's dynamic int8 product for one weight and one row count (``et_fc_s8_dyn``): ``x`` (m, K) float32
    is quantized per call exactly as ``DynamicQuantizeLinear`` does (the whole tensor to uint8, scale and zero point
    from its range), multiplied by the int8 weights in int32, and scaled by ``x_scale * w_scale`` — the arithmetic of
    ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul``. ``w``: :class:`Int8Weights` planned with the weights
    less their zero point and ``scale = w_scale``. A NaN or infinite activation has no quantized value: NonFiniteError,
    nothing written. Returns the bound output (m, N), overwritten by the next call, or ``out`` when given."""

    __slots__ = ("w", "m", "threads", "out", "_py", "_nth", "_scratch", "_ps", "_ss")

    def __init__(self, w: Int8Weights, m: int, threads: int | None = None):
        if not isinstance(w, Int8Weights):
            raise DTypeError(f"w must be edgert.quant.Int8Weights, got {type(w).__name__}")
        self._nth = _threads(threads)
        self.m = _rows(m)
        self.w, self.threads = w, threads
        self.out = aligned_empty(m * w.shape[0] * 4, np.float32).reshape(m, w.shape[0])
        self._py = native.ptr(self.out, "float *")
        self._ss = int(lib.et_fc_s8_dyn_scratch_size(w.p_plan, m))
        if self._ss == 0:
            raise ShapeError(f"m={m} rows of K={w.shape[1]} are too many for the C core")
        self._scratch = aligned_empty(self._ss)  # the activations' codes and per-call row constants, kept between calls
        self._ps = native.ptr(self._scratch)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        m, (n, k) = self.m, self.w.shape
        if type(x) is not np.ndarray or x.dtype != np.float32 or x.shape != (m, k) or not x.flags.c_contiguous:
            raise ShapeError(f"x must be C-contiguous float32 ({m}, {k}), got {getattr(x, 'dtype', type(x).__name__)}"
                             f" {getattr(x, 'shape', '')}")
        py = self._py
        if out is not None:
            py = _out_ptr(out, m, n)
        native.check(lib.et_fc_s8_dyn_ex(self.w.p_plan, native.ptr(x, "const float *"), m, py, self._ps, self._ss,
                                         self._nth))
        return self.out if out is None else out
