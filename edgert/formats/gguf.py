"""A validated, memory-mapped GGUF reader (versions 2 and 3, little-endian).

Every byte of the header is treated as hostile: counts and lengths are bounded by the bytes left in the file before
anything is allocated or looped over, every read is bounds-checked, and any violation raises
``edgert.ModelFormatError`` naming the field or tensor, what was expected and what was found. Tensor data is never
copied: ``tensor_bytes``/``tensor_array``/``qtensor`` return read-only views into the mapping.

This module knows the container only; what a llama needs from it lives in ``edgert.llm.spec``. It must not import
from the layers above it.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import EdgertError, ModelFormatError
from ..quant import FORMATS, QTensor
from . import model_file

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # an array may hold arrays; those may not hold arrays again
MAX_KEY_BYTES = 1 << 16
MAX_TENSOR_NAME_BYTES = 1 << 10  # ggml itself stops at 63; this only keeps hostile names from costing memory

# ggml type id -> (name, values per block, bytes per block). Ids missing here were removed from ggml (Q4_2, Q4_3,
# the repacked Q4_0_4_4 family...) or are newer than this table; files using them are refused at parse time because
# their sizes are unknown. Types we know but do not compute with parse fine and fail only when used.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
GGML_TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
COMPUTE_TYPES = tuple(name.upper() for name in FORMATS)  # the types edgert's kernels take: F32 F16 Q4_0 Q4_1 Q8_0

# GGUF metadata value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_VALUE_TYPE_NAMES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
                     "uint64", "int64", "float64")
# fixed-size scalar types: value type -> (struct format, numpy dtype)
_SCALARS = {
    _UINT8: ("<B", "<u1"), _INT8: ("<b", "<i1"), _UINT16: ("<H", "<u2"), _INT16: ("<h", "<i2"),
    _UINT32: ("<I", "<u4"), _INT32: ("<i", "<i4"), _FLOAT32: ("<f", "<f4"), _BOOL: ("<B", "<u1"),
    _UINT64: ("<Q", "<u8"), _INT64: ("<q", "<i8"), _FLOAT64: ("<d", "<f8"),
}
_STRUCTS = {t: struct.Struct(fmt) for t, (fmt, _) in _SCALARS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor_count, kv_count
# smallest encodings, used to bound counts by the bytes that are left before looping
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length + 1 byte, n_dims, one dim, type, offset
_MIN_ARRAY_ITEM_BYTES = {_STRING: 8, _ARRAY: 4 + 8}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``shape`` is in ggml order: shape[0] is the innermost (row length K)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads from the mapping; every failure names what was being read."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise ModelFormatError(
                f"truncated GGUF: {what} at byte {self.pos} needs {n} bytes but only {self.end - self.pos} remain "
                f"(file is {self.end} bytes); the file is cut short or corrupt — download it again"
            )

    def unpack(self, st: struct.Struct, what: str):
        self.need(st.size, what)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)

    def string(self, what: str, max_bytes: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if max_bytes is not None and n > max_bytes:
            raise ModelFormatError(f"{what} is {n} bytes long; expected at most {max_bytes}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start} of the string)") from None


def _type_name(vtype: int) -> str:
    return _VALUE_TYPE_NAMES[vtype] if 0 <= vtype < len(_VALUE_TYPE_NAMES) else f"unknown ({vtype})"


def _read_value(cur: _Cursor, vtype: int, what: str, depth: int = 0):
    if vtype in _STRUCTS:
        v = cur.unpack(_STRUCTS[vtype], what)
        if vtype == _BOOL:
            if v > 1:
                raise ModelFormatError(f"{what} is a bool stored as byte {v}; expected 0 or 1")
            return bool(v)
        return v
    if vtype == _STRING:
        return cur.string(what)
    if vtype == _ARRAY:
        return _read_array(cur, what, depth + 1)
    raise ModelFormatError(f"{what} has unknown value type {vtype}; expected 0..12 ({', '.join(_VALUE_TYPE_NAMES)})")


def _read_array(cur: _Cursor, what: str, depth: int):
    if depth > MAX_ARRAY_DEPTH:
        raise ModelFormatError(f"{what} nests arrays {depth} deep; expected at most {MAX_ARRAY_DEPTH}")
    etype = cur.u32(f"element type of {what}")
    count = cur.u64(f"length of {what}")
    if etype in _SCALARS:
        item = _STRUCTS[etype].size
    elif etype in _MIN_ARRAY_ITEM_BYTES:
        item = _MIN_ARRAY_ITEM_BYTES[etype]
    else:
        raise ModelFormatError(f"{what} has unknown element type {etype}; expected 0..12 ({', '.join(_VALUE_TYPE_NAMES)})")
    if count * item > cur.left:
        raise ModelFormatError(
            f"{what} claims {count} {_type_name(etype)} elements (at least {count * item} bytes) but only {cur.left} "
            f"bytes remain in the file"
        )
    if etype in _SCALARS:
        # one vectorised read; copied so the metadata does not pin the mapping open
        a = np.frombuffer(cur.buf, dtype=_SCALARS[etype][1], count=count, offset=cur.pos).copy()
        cur.pos += count * item
        if etype == _BOOL:
            if count and int(a.max()) > 1:
                raise ModelFormatError(f"{what} holds a bool stored as byte {int(a.max())}; expected 0 or 1")
            a = a.astype(bool)
        return a
    if etype == _ARRAY:
        return [_read_array(cur, f"{what}[{i}]", depth + 1) for i in range(count)]
    return _read_strings(cur, count, what)


def _read_strings(cur: _Cursor, count: int, what: str) -> list[str]:
    # the hot loop of a parse (a 49k-token vocabulary plus its merges): locals only, one bounds check per step
    buf, pos, end = cur.buf, cur.pos, cur.end
    unpack = _U64.unpack_from
    out: list[str] = []
    append = out.append
    i = 0
    try:
        for i in range(count):
            if pos + 8 > end:
                cur.pos = pos
                cur.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                cur.pos = pos
                cur.need(n, f"{what}[{i}]")
            append(buf[pos:pos + n].decode("utf-8"))
            pos += n
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{what}[{i}] is not valid UTF-8 ({exc.reason} at byte {exc.start} of the string)") from None
    cur.pos = pos
    return out


class GGUFFile:
    """An open GGUF file: metadata, tensor directory, and zero-copy access to tensor data. A context manager.

    ``metadata`` holds scalars as int/float/bool/str, string (and nested) arrays as lists, numeric arrays as numpy
    arrays. Views returned by the tensor accessors stay valid after ``close()``: the mapping is released when the
    last view is gone.
    """

    def __init__(self, path):
        self._mm: mmap.mmap | None = None
        self._data: np.ndarray | None = None
        self.path = model_file(path, "GGUF")  # checked before the open, which a FIFO would block
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _HEADER.size:
                    raise ModelFormatError(
                        f"{self.path}: truncated GGUF: {size} bytes, shorter than the {_HEADER.size}-byte header"
                    )
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise ModelFormatError(f"cannot open GGUF file {self.path}: {exc.strerror or exc}") from exc
        try:
            self._parse(size)
        except ModelFormatError as exc:
            self.close()
            raise ModelFormatError(f"{self.path}: {exc}") from None
        except BaseException:
            self.close()
            raise
        self._data = np.frombuffer(self._mm, dtype=np.uint8)
        self._data.flags.writeable = False

    # -- parsing -------------------------------------------------------------------------------------------------

    def _parse(self, size: int) -> None:
        mm = self._mm
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(mm, 0)
        if magic != GGUF_MAGIC:
            raise ModelFormatError(f"bad magic {magic!r}: expected {GGUF_MAGIC!r}; this is not a GGUF file")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                raise ModelFormatError(
                    f"big-endian GGUF (version {swapped}) is not supported: edgert reads little-endian files; "
                    f"convert the model on a little-endian machine"
                )
            if version == 1:
                raise ModelFormatError(
                    "GGUF version 1 is not supported (expected version 2 or 3); re-convert the model with a current converter"
                )
            raise ModelFormatError(f"unsupported GGUF version {version}: expected one of {SUPPORTED_VERSIONS}")
        self.version = version
        cur = _Cursor(mm, _HEADER.size, size)
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
            raise ModelFormatError(
                f"header claims {n_tensors} tensors and {n_kv} metadata entries, which cannot fit in the "
                f"{cur.left} bytes after the header"
            )

        metadata: dict[str, object] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
            if not key:
                raise ModelFormatError(f"metadata key #{i} is empty; expected a name such as 'general.architecture'")
            if key in metadata:
                raise ModelFormatError(f"duplicate metadata key {key!r} (entry #{i})")
            vtype = cur.u32(f"value type of metadata {key!r}")
            metadata[key] = _read_value(cur, vtype, f"metadata {key!r}")
        self.metadata = metadata
        self.alignment = self._alignment()

        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}", MAX_TENSOR_NAME_BYTES)
            if not name:
                raise ModelFormatError(f"tensor #{i} has an empty name")
            if name in names:
                raise ModelFormatError(f"duplicate tensor name {name!r} (tensor #{i})")
            names.add(name)
            n_dims = cur.u32(f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFormatError(f"tensor {name!r} has n_dims {n_dims}; expected 1..{MAX_DIMS}")
            cur.need(8 * n_dims, f"dims of tensor {name!r}")
            shape = struct.unpack_from(f"<{n_dims}Q", mm, cur.pos)
            cur.pos += 8 * n_dims
            type_id = cur.u32(f"type of tensor {name!r}")
            rel = cur.u64(f"offset of tensor {name!r}")
            infos.append((name, shape, type_id, rel))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors = self._check_tensors(infos, size)

    def _alignment(self) -> int:
        a = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(a, int) or isinstance(a, bool):
            raise ModelFormatError(f"general.alignment must be an integer, found {type(a).__name__} {a!r}")
        if a < 1 or a > MAX_ALIGNMENT or a & (a - 1):
            raise ModelFormatError(f"general.alignment must be a power of two in 1..{MAX_ALIGNMENT}, found {a}")
        return a

    def _check_tensors(self, infos, size: int) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        data_bytes = size - self.data_offset
        for name, shape, type_id, rel in infos:
            if type_id not in GGML_TYPES:
                raise ModelFormatError(
                    f"tensor {name!r} has unknown ggml type id {type_id} (removed from ggml or newer than edgert); "
                    f"known types: {', '.join(n for n, _, _ in GGML_TYPES.values())}"
                )
            type_name, block, type_size = GGML_TYPES[type_id]
            if 0 in shape:
                raise ModelFormatError(f"tensor {name!r} has a zero dimension in shape {list(shape)}; expected all >= 1")
            if shape[0] % block:
                raise ModelFormatError(
                    f"tensor {name!r} ({type_name}) has row length {shape[0]}; expected a multiple of its block size {block}"
                )
            nbytes = math.prod(shape) // block * type_size  # Python ints: cannot overflow, compared below
            if rel % self.alignment:
                raise ModelFormatError(
                    f"tensor {name!r} data offset {rel} is not a multiple of general.alignment {self.alignment}"
                )
            if rel + nbytes > data_bytes:
                raise ModelFormatError(
                    f"tensor {name!r} ({type_name} {list(shape)}, {nbytes} bytes at data offset {rel}) ends past the "
                    f"end of the file: the data section holds {max(data_bytes, 0)} bytes; the file is truncated or corrupt"
                )
            tensors[name] = TensorInfo(name, tuple(shape), type_id, type_name, self.data_offset + rel, nbytes)
        prev = None
        for t in sorted(tensors.values(), key=lambda t: t.offset):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise ModelFormatError(
                    f"tensor {t.name!r} (bytes {t.offset}..{t.offset + t.nbytes}) overlaps tensor {prev.name!r} "
                    f"(bytes {prev.offset}..{prev.offset + prev.nbytes})"
                )
            prev = t
        return tensors

    # -- access --------------------------------------------------------------------------------------------------

    def _info(self, name: str) -> TensorInfo:
        if self._data is None:
            raise EdgertError(f"{self.path} is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: no tensor named {name!r}") from None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 view into the mapping (no copy)."""
        t = self._info(name)
        return self._data[t.offset:t.offset + t.nbytes]

    def release(self, name: str) -> None:
        """Drop the pages of a tensor this process has read (a copy replaced them): they leave its resident memory
        and are read again from the file if touched. A no-op where the platform cannot do it."""
        t = self._info(name)
        page = mmap.PAGESIZE
        lo, hi = -(-t.offset // page) * page, (t.offset + t.nbytes) // page * page
        if self._mm is not None and hi > lo and hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def tensor_array(self, name: str) -> np.ndarray:
        """An F32/F16 tensor as a read-only float array; numpy shape is the ggml shape reversed. No copy."""
        t = self._info(name)
        if t.type_name not in ("F32", "F16"):
            raise ModelFormatError(
                f"tensor {name!r} is {t.type_name}; tensor_array reads F32 or F16 only (use qtensor() for block formats)"
            )
        dtype = "<f4" if t.type_name == "F32" else "<f2"
        return self.tensor_bytes(name).view(dtype).reshape(t.shape[::-1])

    def qtensor(self, name: str) -> QTensor:
        """A 2-D tensor in F32/F16/Q4_0/Q4_1/Q8_0 as a QTensor (rows, K) aliasing the mapping. F32/F16 data that the
        file's alignment leaves misaligned for its element size is copied, so C never reads a misaligned float."""
        t = self._info(name)
        if t.type_name not in COMPUTE_TYPES:
            raise ModelFormatError(
                f"unsupported type {t.type_name} for tensor {name!r} (supported: {', '.join(COMPUTE_TYPES)}); "
                f"re-quantize the model to one of those"
            )
        if len(t.shape) != 2:
            raise ModelFormatError(f"tensor {name!r} has shape {list(t.shape)}; a QTensor needs a 2-D tensor [K, rows]")
        raw = self.tensor_bytes(name)
        elem = {"F32": 4, "F16": 2}.get(t.type_name, 1)
        if t.offset % elem:
            raw = raw.copy()
        k, rows = t.shape
        return QTensor.from_raw(t.type_name.lower(), (rows, k), raw)

    # -- lifetime ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._data = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views handed out still use it; the mapping goes when the last of them does

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._data is None else f"{len(self.tensors)} tensors, {len(self.metadata)} keys"
        return f"GGUFFile({self.path!r}, v{getattr(self, 'version', '?')}, {state})"


def open_gguf(path) -> GGUFFile:
    """Open and validate a GGUF file; raises ModelNotFoundError for a path that is not a regular file and
    ModelFormatError for anything malformed, truncated or hostile."""
    return GGUFFile(path)
