"""TFLite (``.tflite`` flatbuffer) -> edgert graph IR, validated; and the way back (a subset of a graph, or a model
spec written in a test, serialized as a standalone ``.tflite``).

Reading uses the flatbuffer schema classes of the ``tflite`` package (generated from LiteRT's ``schema.fbs``); no
hand-written parser. Those classes trust the file, and Python's flatbuffers runtime has no verifier, so every table
and vector is checked here before it is read (``_Reader``): table and vtable positions inside the file, vtable and
table sizes, vector lengths times element size inside the file, buffer offsets/sizes inside the file, tensor and
opcode indices in range, shapes sane, data sizes equal to shape x dtype. Every failure is a
``edgert.ModelFormatError`` naming what is wrong; nothing reaches numpy or LiteRT unchecked.

Buffers are used in place: a file is memory-mapped read-only and initializer arrays are ``np.frombuffer`` views of
the map (bytes given in memory are viewed the same way).

The IR names ops by their ONNX equivalents (``FULLY_CONNECTED`` -> ``Gemm``, ``CONV_2D``/``DEPTHWISE_CONV_2D`` ->
``Conv``, ``AVERAGE_POOL_2D`` -> ``AveragePool``, ``QUANTIZE`` -> ``QuantizeLinear``, ...), so that device profiles
(which list ONNX op names), the partitioner's cost model and its capability checks apply unchanged; the TFLite
builtin name is kept in ``Node.attrs["tflite_op"]``, the node name is ``<builtin>_<index>`` in lower case, and an op
with no ONNX equivalent keeps its builtin name in the ``tflite`` domain (only a ``*`` unit takes it). Tensor layouts
stay TFLite's (NHWC activations, OHWI filters, (N, K) fully-connected weights).

Only the first subgraph is the graph; control-flow ops that call other subgraphs (WHILE, IF, CALL_ONCE) are rejected
with ``ModelFormatError``. This module must not import from the layers above it (plan, delegates, session).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError
from ..graph.ir import Graph, Node, QuantParams, Tensor
from . import model_file

# schema.fbs TensorType -> IR dtype name
TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
                8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 15: "uint32", 16: "uint16",
                17: "int4"}
DTYPE_TO_TYPE = {v: k for k, v in TENSOR_TYPES.items()}

# TFLite builtin -> the ONNX op the profiles list for it
ONNX_EQUIVALENT = {
    "ADD": "Add", "SUB": "Sub", "MUL": "Mul", "DIV": "Div", "FULLY_CONNECTED": "Gemm", "BATCH_MATMUL": "MatMul",
    "CONV_2D": "Conv", "DEPTHWISE_CONV_2D": "Conv", "TRANSPOSE_CONV": "ConvTranspose",
    "AVERAGE_POOL_2D": "AveragePool", "MAX_POOL_2D": "MaxPool", "RELU": "Relu", "RELU6": "Clip",
    "RELU_N1_TO_1": "Clip", "LEAKY_RELU": "LeakyRelu", "LOGISTIC": "Sigmoid", "TANH": "Tanh", "HARD_SWISH": "HardSwish",
    "SOFTMAX": "Softmax", "RESHAPE": "Reshape", "SQUEEZE": "Squeeze", "CONCATENATION": "Concat", "SPLIT": "Split",
    "TRANSPOSE": "Transpose", "PAD": "Pad", "SLICE": "Slice", "STRIDED_SLICE": "Slice", "MEAN": "ReduceMean",
    "SUM": "ReduceSum", "MAXIMUM": "Max", "MINIMUM": "Min", "QUANTIZE": "QuantizeLinear",
    "DEQUANTIZE": "DequantizeLinear", "RESIZE_BILINEAR": "Resize", "RESIZE_NEAREST_NEIGHBOR": "Resize",
    "SPACE_TO_DEPTH": "SpaceToDepth", "GATHER": "Gather", "EXP": "Exp", "CAST": "Cast",
}
CONTROL_FLOW = ("WHILE", "IF", "CALL_ONCE", "CALL")
MAX_RANK = 8
MAX_ELEMENTS = 2**32  # no tensor of an edge model comes near; larger is a hostile shape

# inputs an operator edgert maps (ONNX_EQUIVALENT) may leave absent (index -1): the optional bias of the
# convolutions and FULLY_CONNECTED, RESHAPE's shape tensor. Any other absent input or output of those ops is refused
# here: LiteRT's kernels read such a tensor without checking and crash. Other ops (the recurrent ones leave many
# inputs absent, custom ops are opaque) are left to LiteRT.
OPTIONAL_INPUTS = {"FULLY_CONNECTED": (2,), "CONV_2D": (2,), "DEPTHWISE_CONV_2D": (2,), "TRANSPOSE_CONV": (3,),
                   "RESHAPE": (1,)}
# the options table LiteRT's kernel reads for each op whose options edgert interprets too (its
# op->builtin_options_as_XOptions()): a table of another type reads as null there, so the kernel keeps its
# zero-initialised parameters (no activation, stride 0, axis 0...). Such a table is dropped at load and edgert reads
# those same zeros (the exported segment then carries no table: LiteRT's null again). Other ops keep their table as
# read; LiteRT applies its own rule to it in the exported segment.
OPTIONS_TYPE = {"FULLY_CONNECTED": "FullyConnectedOptions", "CONV_2D": "Conv2DOptions",
                "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions", "TRANSPOSE_CONV": "TransposeConvOptions",
                "AVERAGE_POOL_2D": "Pool2DOptions", "MAX_POOL_2D": "Pool2DOptions", "L2_POOL_2D": "Pool2DOptions",
                "ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions", "DIV": "DivOptions",
                "CONCATENATION": "ConcatenationOptions", "SOFTMAX": "SoftmaxOptions", "RESHAPE": "ReshapeOptions",
                "SPLIT": "SplitOptions", "SPLIT_V": "SplitVOptions", "UNPACK": "UnpackOptions",
                "GATHER": "GatherOptions"}
# ops whose first input is a parameter, not data: SPLIT's axis, TRANSPOSE_CONV's output shape, FILL's dims
PARAM_FIRST = ("SPLIT", "TRANSPOSE_CONV", "FILL")
# the builtins that update a variable input in place (TFLite's recurrent kernels keep their state that way)
STATEFUL_OPS = ("LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM", "SVDF", "RNN",
                "UNIDIRECTIONAL_SEQUENCE_RNN", "BIDIRECTIONAL_SEQUENCE_RNN")
# ops whose output count an option fixes (LiteRT trusts the option): op -> options field
OUTPUT_COUNT = {"SPLIT": "NumSplits", "SPLIT_V": "NumSplits", "UNPACK": "Num"}
# ops whose output has their first input's shape: LiteRT recomputes every shape from the inputs at allocation, so a
# file whose input shape was damaged (a byte flip made one dim 16 million) had LiteRT allocate gigabytes before any
# check could compare; for these ops the two declared shapes are compared here
SAME_SHAPE = ("QUANTIZE", "DEQUANTIZE", "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LEAKY_RELU", "LOGISTIC",
              "TANH", "HARD_SWISH", "ELU", "GELU", "ABS", "NEG", "EXP", "LOG", "SQRT", "RSQRT", "SQUARE",
              "SIN", "COS", "FLOOR", "CEIL", "ROUND", "SIGN", "LOGICAL_NOT", "SOFTMAX", "LOG_SOFTMAX", "CAST",
              "L2_NORMALIZATION", "LOCAL_RESPONSE_NORMALIZATION")
# the zero-point range of each quantized integer type
ZP_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest positive normal float32

_ITEMSIZE = {"float32": 4, "float16": 2, "int32": 4, "uint8": 1, "int64": 8, "bool": 1, "int16": 2, "complex64": 8,
             "int8": 1, "float64": 8, "complex128": 16, "uint64": 8, "uint32": 4, "uint16": 2}


def _schema():
    try:
        import tflite
    except ImportError:
        raise ModelFormatError("reading .tflite files needs the flatbuffer schema package: pip install tflite "
                               "(or pip install 'edgert[tflite]')") from None
    return tflite


def builtin_names() -> dict[int, str]:
    t = _schema()
    return {v: k for k, v in vars(t.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def options_names() -> dict[int, str]:
    t = _schema()
    return {v: k for k, v in vars(t.BuiltinOptions).items() if not k.startswith("_") and isinstance(v, int)}


def is_tflite_bytes(head: bytes) -> bool:
    return len(head) >= 8 and bytes(head[4:8]) == b"TFL3"


def is_tflite_path(path) -> bool:
    """True for a ``.tflite`` path, or a file whose flatbuffer identifier is ``TFL3``."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = os.fspath(path)
    if not isinstance(p, str):
        return False
    if p.lower().endswith(".tflite"):
        return True
    if not os.path.isfile(p):  # a FIFO would block the open, a device never ends
        return False
    try:
        with open(p, "rb") as f:
            return is_tflite_bytes(f.read(8))
    except OSError:
        return False


# ---- bounds-checked access to the flatbuffer ------------------------------------------------------------------
class _Reader:
    """Checks every table and vector of the flatbuffer against the file before the schema classes read it."""

    def __init__(self, buf, what: str):
        self.buf, self.n, self.what = buf, len(buf), what

    def fail(self, msg: str):
        raise ModelFormatError(f"TFLite model {self.what}: {msg}; the file is truncated, corrupt or not a TFLite "
                               "model")

    def u32(self, pos: int, where: str) -> int:
        if pos < 0 or pos + 4 > self.n:
            self.fail(f"{where}: offset {pos} outside the file ({self.n} bytes)")
        return struct.unpack_from("<I", self.buf, pos)[0]

    def table(self, obj, where: str):
        """``obj`` (a schema class instance) after checking its table and vtable lie inside the file."""
        pos = obj._tab.Pos
        if pos < 0 or pos + 4 > self.n:
            self.fail(f"{where}: table at offset {pos} outside the file ({self.n} bytes)")
        vt = pos - struct.unpack_from("<i", self.buf, pos)[0]
        if vt < 0 or vt + 4 > self.n:
            self.fail(f"{where}: vtable at offset {vt} outside the file")
        vlen, tlen = struct.unpack_from("<HH", self.buf, vt)
        if vlen < 4 or vlen % 2 or vt + vlen > self.n or tlen < 4 or pos + tlen > self.n:
            self.fail(f"{where}: vtable ({vlen} bytes) or table ({tlen} bytes) runs past the end of the file")
        for k in range(4, vlen, 2):
            fo = struct.unpack_from("<H", self.buf, vt + k)[0]
            if fo and fo >= tlen:
                self.fail(f"{where}: field {(k - 4) // 2} at offset {fo} lies outside its {tlen}-byte table")
        return obj

    def vector(self, obj, slot: int, elem: int, where: str) -> tuple[int, int]:
        """(start, count) of the vector in field ``slot`` (vtable offset) of ``obj``; (0, 0) when absent."""
        o = obj._tab.Offset(slot)
        if not o:
            return 0, 0
        p = obj._tab.Pos + o
        start = p + self.u32(p, where)
        count = self.u32(start, where)
        start += 4
        if start + count * elem > self.n:
            self.fail(f"{where}: vector of {count} x {elem} bytes at offset {start} runs past the end of the file "
                      f"({self.n} bytes)")
        return start, count

    def array(self, obj, slot: int, dtype: str, where: str) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        start, count = self.vector(obj, slot, dt.itemsize, where)
        return np.frombuffer(self.buf, dt, count, start) if count else np.zeros(0, dt)

    def string(self, obj, slot: int, where: str) -> str:
        start, count = self.vector(obj, slot, 1, where)
        try:
            return bytes(self.buf[start:start + count]).decode("utf-8") if count else ""
        except UnicodeDecodeError:
            self.fail(f"{where}: string is not UTF-8")

    def tables(self, obj, slot: int, getter, where: str) -> list:
        _, count = self.vector(obj, slot, 4, where)
        return [self.table(getter(i), f"{where}[{i}]") for i in range(count)]


@dataclass
class TFLiteModel:
    """A parsed ``.tflite``: the bytes (a read-only mmap of the file, or the caller's bytes) and, per tensor and
    operator of the main subgraph, what the exporter needs to write a subset back. ``tensor_names[i]`` is the IR
    name of tensor ``i`` (TFLite names need not be unique). ``format`` lets layers above dispatch without importing
    this module."""

    data: Any
    what: str
    path: str | None
    version: int
    description: str
    tensors: list[dict]
    operators: list[dict]
    inputs: list[int]
    outputs: list[int]
    tensor_names: list[str]
    node_names: list[str]
    format: str = "tflite"
    _by_name: dict | None = field(default=None, repr=False)

    def content(self) -> bytes:
        return bytes(self.data)

    def tensor(self, name: str) -> dict:
        """The parsed tensor an IR tensor name stands for (what the IR leaves out: a per-tensor quantization's
        quantized_dimension, ``is_variable``...)."""
        if self._by_name is None:
            self._by_name = {n: i for i, n in enumerate(self.tensor_names)}
        return self.tensors[self._by_name[name]]


def _open(src) -> tuple[Any, str, str | None, bool]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return (bytes(src) if not isinstance(src, bytes) else src), f"({len(src)} bytes)", None, False
    if isinstance(src, (str, os.PathLike)):
        path = model_file(src, "TFLite")
        with open(path, "rb") as f:  # the map keeps its own descriptor: the file closes here, not at collection
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFormatError(f"TFLite model {path!r} is empty (0 bytes)")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m, repr(path), path, True
    raise InvalidArgumentError(f"load_tflite expects a path or bytes, got {type(src).__name__}")


def _options(r: _Reader, op, kind: int, opt_names: dict[int, str], where: str) -> tuple[str | None, dict]:
    """The builtin options of ``op`` as (class name, {field: value}) — every scalar and vector field the schema
    class has, read generically (the same dict the builder writes back)."""
    if not kind:
        return None, {}
    tfl = _schema()
    cls_name = opt_names.get(kind)
    if cls_name is None:
        r.fail(f"{where}: builtin_options_type {kind} unknown to this schema")
    tab = op.BuiltinOptions()
    if tab is None:
        return cls_name, {}
    obj = getattr(tfl, cls_name)()
    obj.Init(tab.Bytes, tab.Pos)
    r.table(obj, f"{where} options")
    fields = {}
    prefix = f"{cls_name}Add"
    for fn in dir(tfl):
        if not fn.startswith(prefix):
            continue
        name = fn[len(prefix):]
        if hasattr(obj, f"{name}AsNumpy") and hasattr(obj, f"{name}Length"):
            slot = _field_slot(getattr(obj, f"{name}Length"))
            fields[name] = np.array(r.array(obj, slot, _vector_dtype(obj, name), f"{where} {name}"))
        elif hasattr(obj, name):
            try:
                v = getattr(obj, name)()
            except TypeError:
                continue  # a nested table: not used by the ops edgert reads
            if isinstance(v, (int, float, bool)):
                fields[name] = v
    return cls_name, fields


def _field_slot(length_method) -> int:
    """The vtable offset a generated ``XLength`` method reads (parsed from its code: ``self._tab.Offset(N)``)."""
    consts = [c for c in length_method.__code__.co_consts if isinstance(c, int) and c >= 4]
    return consts[0]


def _vector_dtype(obj, name: str) -> str:
    """The element type a generated ``XAsNumpy`` method reads (``number_types.Int32Flags`` -> int32)."""
    for n in getattr(obj, f"{name}AsNumpy").__code__.co_names:
        if n in _FLAG_DTYPES:
            return _FLAG_DTYPES[n]
    return "int32"


_FLAG_DTYPES = {"Int8Flags": "int8", "Uint8Flags": "uint8", "Int16Flags": "int16", "Uint16Flags": "uint16",
                "Int32Flags": "int32", "Uint32Flags": "uint32", "Int64Flags": "int64", "Uint64Flags": "uint64",
                "Float32Flags": "float32", "Float64Flags": "float64", "BoolFlags": "bool"}


def parse_tflite(src) -> TFLiteModel:
    """Read and validate the flatbuffer (see the module docstring); the IR is built by ``load_tflite``."""
    tfl = _schema()
    buf, what, path, mapped = _open(src)
    try:
        r = _Reader(buf, what)
        if r.n < 8:
            r.fail(f"only {r.n} bytes (a flatbuffer needs at least 8)")
        if not is_tflite_bytes(buf[:8]):
            r.fail(f"file identifier is {bytes(buf[4:8])!r}, expected b'TFL3'")
        try:
            return _parse(tfl, r, buf, what, path)
        except ModelFormatError:
            raise
        except (struct.error, IndexError, ValueError, TypeError, OverflowError, AttributeError, UnicodeDecodeError,
                MemoryError) as exc:
            raise ModelFormatError(f"TFLite model {what}: malformed flatbuffer ({type(exc).__name__}: {exc}); the "
                                   "file is truncated, corrupt or not a TFLite model") from None
    except BaseException:
        _close_quietly(buf, mapped)  # a file that failed to parse is not kept mapped until the garbage collector runs
        raise


def _close_quietly(buf, mapped) -> None:
    if not mapped:
        return
    try:
        buf.close()
    except BufferError:  # a view made before the failure is still alive (in the traceback): the GC closes it
        pass


def _parse(tfl, r: _Reader, buf, what, path) -> TFLiteModel:
    root = r.u32(0, "root offset")
    model = r.table(tfl.Model.GetRootAs(buf, 0), "model")
    if model._tab.Pos != root:  # pragma: no cover - GetRootAs reads the same offset
        r.fail("root table offset mismatch")
    version = model.Version()
    if version != 3:
        r.fail(f"schema version {version}, expected 3")
    names = builtin_names()
    opt_names = options_names()
    opcodes = []
    for i, oc in enumerate(r.tables(model, 6, model.OperatorCodes, "operator_codes")):
        code = max(int(oc.DeprecatedBuiltinCode()), int(oc.BuiltinCode()))
        if code == 32:  # CUSTOM
            opcodes.append(("CUSTOM", r.string(oc, 6, f"operator_codes[{i}].custom_code") or "?", oc.Version()))
        elif code not in names:
            r.fail(f"operator_codes[{i}]: builtin code {code} unknown to this schema")
        else:
            opcodes.append((names[code], "", oc.Version()))
    bufs = r.tables(model, 12, model.Buffers, "buffers")
    subgraphs = r.tables(model, 8, model.Subgraphs, "subgraphs")
    if not subgraphs:
        r.fail("no subgraphs")
    sg = subgraphs[0]
    tensors = []
    for i, t in enumerate(r.tables(sg, 4, sg.Tensors, "subgraphs[0].tensors")):
        where = f"tensor {i}"
        name = r.string(t, 10, f"{where} name")
        where = f"tensor {i} ({name!r})"
        ttype = int(t.Type())
        dtype = TENSOR_TYPES.get(ttype)
        if dtype is None:
            r.fail(f"{where}: tensor type {ttype} unknown")
        shape = r.array(t, 4, "int32", f"{where} shape")
        sig = r.array(t, 18, "int32", f"{where} shape_signature")
        if len(shape) > MAX_RANK or (shape < 0).any():
            r.fail(f"{where}: shape {shape.tolist()} (rank at most {MAX_RANK}, dims >= 0)")
        if int(np.prod(shape.astype(np.float64))) > MAX_ELEMENTS:
            r.fail(f"{where}: shape {shape.tolist()} holds more than {MAX_ELEMENTS} elements")
        if len(sig) and (len(sig) != len(shape) or (sig < -1).any()):
            r.fail(f"{where}: shape_signature {sig.tolist()} does not match shape {shape.tolist()}")
        bidx = int(t.Buffer())
        if bidx >= len(bufs):
            r.fail(f"{where}: buffer index {bidx} out of range ({len(bufs)} buffers)")
        data = None
        if bidx > 0:
            b = bufs[bidx]
            start, count = r.vector(b, 4, 1, f"{where} buffer {bidx}")
            off, size = int(b.Offset()), int(b.Size())
            if not count and off > 1:
                if off + size > r.n:
                    r.fail(f"{where}: buffer {bidx} offset {off} + size {size} outside the file ({r.n} bytes)")
                start, count = off, size
            if count:
                if dtype not in _ITEMSIZE:
                    r.fail(f"{where}: constant data of type {dtype} is not supported")
                want = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
                if count != want:
                    r.fail(f"{where}: buffer {bidx} holds {count} bytes, shape {shape.tolist()} x {dtype} needs "
                           f"{want}")
                data = np.frombuffer(buf, np.dtype(dtype).newbyteorder("<"), want // _ITEMSIZE[dtype], start)
                data = data.reshape(tuple(int(d) for d in shape))
        quant = None
        q = t.Quantization()
        if q is not None:
            r.table(q, f"{where} quantization")
            scale = r.array(q, 8, "float32", f"{where} scale")
            zp = r.array(q, 10, "int64", f"{where} zero_point")
            if len(scale):
                if len(zp) != len(scale):  # LiteRT refuses none either
                    r.fail(f"{where}: {len(scale)} scales but {len(zp)} zero points")
                if not np.isfinite(scale).all():
                    r.fail(f"{where}: quantization scales are not finite")
                lo_hi = ZP_RANGE.get(dtype)
                off = (zp < lo_hi[0]) | (zp > lo_hi[1]) if lo_hi and len(zp) else None
                if off is not None and off.any():
                    r.fail(f"{where}: zero points {zp[off][:4].tolist()} outside {dtype}'s range [{lo_hi[0]}, "
                           f"{lo_hi[1]}]")
                # an activation's scale divides at run time (LiteRT crashed on 0, negative and subnormal ones);
                # constant weights keep whatever finite scales LiteRT runs them with
                tiny = scale < F32_TINY
                if lo_hi and data is None and tiny.any():
                    r.fail(f"{where}: activation scale {scale[tiny][0]:g} is not a positive normal float32")
                qd = int(q.QuantizedDimension())
                if len(shape) and not 0 <= qd < len(shape):  # LiteRT's check, per-tensor parameters too
                    r.fail(f"{where}: quantized_dimension {qd} outside the {len(shape)} dims of shape "
                           f"{shape.tolist()}")
                if len(scale) > 1 and not (0 <= qd < len(shape) and shape[qd] == len(scale)):
                    r.fail(f"{where}: {len(scale)} per-channel scales along dim {qd} of shape {shape.tolist()}")
                quant = {"scale": np.array(scale), "zero_point": np.array(zp), "axis": qd if len(scale) > 1 else None,
                         "quantized_dimension": qd}
        if t.IsVariable() and data is not None:
            r.fail(f"{where}: a variable tensor with a buffer (LiteRT refuses it: its initial value is zero)")
        tensors.append({"name": name, "dtype": dtype, "shape": tuple(int(d) for d in shape),
                        "signature": tuple(int(d) for d in sig) if len(sig) else None, "data": data,
                        "quant": quant, "is_variable": bool(t.IsVariable())})
    nt = len(tensors)

    def indices(obj, slot, where, allow_absent=False) -> list[int]:
        idx = [int(v) for v in r.array(obj, slot, "int32", where)]
        for v in idx:
            if not (0 <= v < nt or (allow_absent and v == -1)):
                r.fail(f"{where}: tensor index {v} out of range ({nt} tensors)")
        return idx

    inputs = indices(sg, 6, "subgraphs[0].inputs")
    outputs = indices(sg, 8, "subgraphs[0].outputs")
    operators = []
    for k, op in enumerate(r.tables(sg, 10, sg.Operators, "subgraphs[0].operators")):
        oi = int(op.OpcodeIndex())
        if oi >= len(opcodes):
            r.fail(f"operator {k}: opcode index {oi} out of range ({len(opcodes)} operator codes)")
        name, custom, ver = opcodes[oi]
        where = f"operator {k} ({name})"
        if name in CONTROL_FLOW:
            raise ModelFormatError(f"TFLite model {what}: {where} calls other subgraphs; edgert reads single-"
                                   "subgraph models (convert with control flow lowered or inlined)")
        ins = indices(op, 6, f"{where} inputs", allow_absent=True)
        outs = indices(op, 8, f"{where} outputs", allow_absent=True)
        if name in ONNX_EQUIVALENT:
            absent = [j for j, v in enumerate(ins) if v == -1 and j not in OPTIONAL_INPUTS.get(name, ())]
            if absent or -1 in outs:
                r.fail(f"{where}: {'input' if absent else 'output'} {absent[0] if absent else outs.index(-1)} is "
                       f"absent (tensor index -1), which {name} requires")
        opt_cls, opts = _options(r, op, int(op.BuiltinOptionsType()), opt_names, where)
        if opt_cls is not None and OPTIONS_TYPE.get(name, opt_cls) != opt_cls:
            opt_cls, opts = None, {}
        # no table of the op's own: LiteRT's count is 0 (SPLIT segfaulted on it)
        if name in OUTPUT_COUNT and opts.get(OUTPUT_COUNT[name], 0) != len(outs):
            r.fail(f"{where}: {OUTPUT_COUNT[name]} is {opts.get(OUTPUT_COUNT[name], 0)}"
                   f"{'' if opts else f' (no {OPTIONS_TYPE[name]} table)'} but the operator has {len(outs)} outputs")
        cstart, ccount = r.vector(op, 14, 1, f"{where} custom_options")
        operators.append({"op": name, "custom": custom, "version": ver, "inputs": ins, "outputs": outs,
                          "options_type": opt_cls, "options": opts,
                          "custom_options": bytes(buf[cstart:cstart + ccount]) if ccount else None})
    _variables_as_constants(tensors, operators, inputs, what)
    for k, op in enumerate(operators):
        if op["op"] == "GATHER":
            _gather_indices_in_range(r, k, op, tensors)
        if op["op"] in SAME_SHAPE and op["inputs"] and op["outputs"]:
            i, o = op["inputs"][0], op["outputs"][0]
            # concrete shapes only: a rank-0 (unknown) or dynamic (-1 in the signature) one may be a placeholder
            dynamic = i < 0 or o < 0 or any(not tensors[t]["shape"] or -1 in (tensors[t]["signature"] or ())
                                            for t in (i, o))
            if not dynamic and tensors[i]["shape"] != tensors[o]["shape"]:
                r.fail(f"operator {k} ({op['op']}) keeps its input's shape, but tensor {i} ({tensors[i]['name']!r}) "
                       f"is {list(tensors[i]['shape'])} and tensor {o} ({tensors[o]['name']!r}) "
                       f"{list(tensors[o]['shape'])}")
    # every operator input must be a graph input, a constant or an earlier operator's output (topological order)
    defined = set(inputs) | {i for i, t in enumerate(tensors) if t["data"] is not None or t["is_variable"]}
    for k, op in enumerate(operators):
        for i in op["inputs"]:
            if i >= 0 and i not in defined:
                r.fail(f"operator {k} ({op['op']}) reads tensor {i} ({tensors[i]['name']!r}) before any operator "
                       "writes it (not a graph input or a constant)")
        for o in op["outputs"]:
            # a graph input too: an operator overwriting it would make the operators that read it earlier depend
            # on a later one (the IR, like ONNX, assigns each tensor once)
            if o >= 0 and (o in defined or tensors[o]["data"] is not None):
                what = ("a graph input" if o in inputs else "a constant" if tensors[o]["data"] is not None else
                        "already defined")
                r.fail(f"operator {k} ({op['op']}) writes tensor {o} ({tensors[o]['name']!r}), which is {what}")
            defined.add(o)
    for o in outputs:
        if o not in defined:
            r.fail(f"graph output tensor {o} ({tensors[o]['name']!r}) is never written")
    seen: dict[str, int] = {}
    tnames = []
    for i, t in enumerate(tensors):
        n = t["name"] or f"tensor_{i}"
        while n in seen:  # the suffixed name may be another tensor's own name ('x', 'x#2', 'x' -> 'x#2' twice)
            n = f"{n}#{i}"
        seen[n] = i
        tnames.append(n)
    nnames = [f"{op['op'].lower() if op['op'] != 'CUSTOM' else 'custom_' + op['custom']}_{k}"
              for k, op in enumerate(operators)]
    desc = r.string(model, 10, "description")
    return TFLiteModel(buf, what, path, version, desc, tensors, operators, inputs, outputs, tnames, nnames)


def _gather_indices_in_range(r: _Reader, k: int, op: dict, tensors: list[dict]) -> None:
    """LiteRT's GATHER refuses, at its first run, an index outside [0, params.shape[axis]) (negative ones too;
    batch_dims does not change the axis gathered): with constant indices and a static axis that is a malformed file,
    said at load."""
    if len(op["inputs"]) < 2 or min(op["inputs"][:2]) < 0:
        return
    p, i = tensors[op["inputs"][0]], tensors[op["inputs"][1]]
    idx, shape, axis = i["data"], p["shape"], int(op["options"].get("Axis", 0))
    if idx is None or idx.dtype.kind not in "iu" or not shape:
        return
    axis += len(shape) if axis < 0 else 0
    if not 0 <= axis < len(shape) or (p["signature"] and p["signature"][axis] == -1):
        return  # an axis LiteRT refuses when it prepares the op, or a dynamic one
    bad = (idx < 0) | (idx >= shape[axis])
    if bad.any():
        at = tuple(int(v) for v in np.argwhere(bad)[0])
        r.fail(f"operator {k} (GATHER): index {int(idx[at])} at {list(at)} of tensor {op['inputs'][1]} "
               f"({i['name']!r}) lies outside [0, {shape[axis]}), axis {axis} of tensor {op['inputs'][0]} "
               f"({p['name']!r}, shape {list(shape)})")


def _variables_as_constants(tensors: list[dict], operators: list[dict], inputs: list[int], what: str) -> None:
    """A variable tensor (``is_variable``, no buffer) holds state only the ops in ``STATEFUL_OPS`` update, in place,
    run after run; edgert does not keep state between runs, so a model with such an op reading a variable is
    refused. Any other variable keeps the value LiteRT resets it to (``ResetVariableTensor``: the zero point of an
    int8 tensor with one, else zero bytes): it becomes that constant, and is exported as one."""
    for k, op in enumerate(operators):
        if op["op"] in STATEFUL_OPS or op["op"] == "CUSTOM":
            for i in op["inputs"]:
                if i >= 0 and tensors[i]["is_variable"]:
                    name = op["op"] if op["op"] != "CUSTOM" else f"custom op {op['custom']!r}"
                    raise ModelFormatError(
                        f"TFLite model {what}: operator {k} ({name}) updates variable tensor {i} "
                        f"({tensors[i]['name']!r}) in place, run after run; edgert runs stateless models (export the "
                        "model with its state as explicit inputs and outputs)")
    for i, t in enumerate(tensors):
        if t["is_variable"] and i not in inputs:
            q = t["quant"]
            zp = int(q["zero_point"][0]) if t["dtype"] == "int8" and q is not None and len(q["zero_point"]) == 1 else 0
            t["data"] = np.full(t["shape"], zp, np.dtype(t["dtype"]))
            t["data"].flags.writeable = False
            t["is_variable"] = False


def _node_attrs(op: dict, tensors: list[dict]) -> dict:
    o = dict(op["options"])
    attrs: dict[str, Any] = {"tflite_op": op["op"], "tflite_options": o}
    if op["op"] == "CUSTOM":
        attrs["custom_code"] = op["custom"]
    # constant int32/int64 inputs after the data are parameters of the op, not data an accelerator must carry:
    # the int32 bias of a quantized FULLY_CONNECTED / CONV_2D (folded into the int8 op), RESHAPE's shape, axes, pads;
    # for the ops whose first input is such a parameter (PARAM_FIRST) that one too
    first = 0 if op["op"] in PARAM_FIRST else 1
    params = [k for k, i in enumerate(op["inputs"]) if k >= first and i >= 0 and tensors[i]["data"] is not None
              and tensors[i]["dtype"] in ("int32", "int64")]
    if params:
        attrs["param_inputs"] = params
    # a table, when present, holds every field (the schema's defaults filled in); without one (or with another op's,
    # dropped at parse) LiteRT's kernel keeps zero-initialised parameters, hence the zeros here
    if "FusedActivationFunction" in o:
        attrs["fused_activation"] = int(o["FusedActivationFunction"])
    if op["op"] in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        attrs["kernel_shape"] = [int(o.get("FilterHeight", 0)), int(o.get("FilterWidth", 0))]
        attrs["strides"] = [int(o.get("StrideH", 0)), int(o.get("StrideW", 0))]
    if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        attrs["strides"] = [int(o.get("StrideH", 0)), int(o.get("StrideW", 0))]
        attrs["dilations"] = [int(o.get("DilationHFactor", 0)), int(o.get("DilationWFactor", 0))]
        if op["op"] == "DEPTHWISE_CONV_2D":
            ins = op["inputs"]
            x = tensors[ins[0]]["shape"] if ins and ins[0] >= 0 else ()
            attrs["group"] = int(x[-1]) if x else 1
    if op["op"] == "CONCATENATION":
        attrs["axis"] = int(o.get("Axis", 0))
    if op["op"] == "SOFTMAX":
        attrs["beta"] = float(o.get("Beta", 0.0))
    return attrs


def load_tflite(src, dims=None) -> Graph:
    """A ``.tflite`` (path, bytes, or a ``TFLiteModel``) as an IR ``Graph`` whose ``source`` is the parsed
    ``TFLiteModel``. TFLite files carry concrete shapes (the interpreter runs them as written); ``dims`` is accepted
    for symmetry with ``load_onnx`` and must be empty."""
    if dims:
        raise InvalidArgumentError(f"TFLite models have static shapes; dims {dict(dims)} cannot be bound (resize "
                                   "the model's inputs when converting it)")
    m = src if isinstance(src, TFLiteModel) else parse_tflite(src)
    tensors: dict[str, Tensor] = {}
    for i, t in enumerate(m.tensors):
        q = t["quant"]
        qp = None if q is None else QuantParams(q["scale"], q["zero_point"], q["axis"])
        tensors[m.tensor_names[i]] = Tensor(m.tensor_names[i], t["dtype"], t["shape"], qp, t["data"])
    nodes = []
    for k, op in enumerate(m.operators):
        onnx_op = ONNX_EQUIVALENT.get(op["op"])
        nodes.append(Node(m.node_names[k], onnx_op or op["op"], "" if onnx_op else "tflite",
                          [m.tensor_names[i] if i >= 0 else "" for i in op["inputs"]],
                          [m.tensor_names[o] if o >= 0 else "" for o in op["outputs"]],
                          _node_attrs(op, m.tensors), index=k))
    name = Path(m.path).stem if m.path else "tflite_model"
    return Graph(name, nodes, tensors, [m.tensor_names[i] for i in m.inputs], [m.tensor_names[o] for o in m.outputs],
                 {"tflite": m.version}, source=m)


def is_tflite_graph(graph) -> bool:
    return getattr(getattr(graph, "source", None), "format", None) == "tflite"


# ---- writing ----------------------------------------------------------------------------------------------------
def build_tflite(tensors: list[dict], operators: list[dict], inputs: list[int], outputs: list[int],
                 description: str = "edgert") -> bytes:
    """Serialize a one-subgraph model with the schema's builder functions.

    ``tensors``: dicts with ``name``, ``dtype`` (IR name), ``shape``, optional ``data`` (ndarray, becomes a
    buffer), ``scale``/``zero_point``/``quantized_dimension`` (quantization), ``signature``, ``is_variable``.
    ``operators``: dicts with ``op`` (builtin name, or ``CUSTOM`` with ``custom``), ``inputs``/``outputs``
    (tensor indices, -1 absent), ``options_type`` (e.g. ``"FullyConnectedOptions"``) and ``options``
    (``{"FusedActivationFunction": 1, "NewShape": np.array(...)}``: the schema's field names), ``custom_options``
    (bytes), ``version``."""
    import flatbuffers

    tfl = _schema()
    codes = {v: k for k, v in builtin_names().items()}
    opt_kinds = {v: k for k, v in options_names().items()}
    b = flatbuffers.Builder(1024 + sum(int(t["data"].nbytes) for t in tensors if t.get("data") is not None))

    def ivec(start_fn, vals, kind="int32"):
        arr = np.asarray(vals, dtype=kind).reshape(-1)
        return b.CreateNumpyVector(arr)

    def raw_bytes(data: bytes, align: int = 16):
        b.StartVector(1, len(data), align)
        b.head = b.head - len(data)
        b.Bytes[b.head:b.head + len(data)] = data
        b.vectorNumElems = len(data)
        return b.EndVector()

    # buffers: 0 is the empty sentinel
    buf_offsets = []
    tfl.BufferStart(b)
    buf_offsets.append(tfl.BufferEnd(b))
    tensor_buf = []
    for t in tensors:
        d = t.get("data")
        if d is None:
            tensor_buf.append(0)
            continue
        arr = np.ascontiguousarray(d, dtype=np.dtype(t["dtype"]).newbyteorder("<"))
        vec = raw_bytes(arr.tobytes())
        tfl.BufferStart(b)
        tfl.BufferAddData(b, vec)
        buf_offsets.append(tfl.BufferEnd(b))
        tensor_buf.append(len(buf_offsets) - 1)

    t_offsets = []
    for i, t in enumerate(tensors):
        name = b.CreateString(t.get("name") or f"t{i}")
        shape = ivec(None, t["shape"])
        sig = ivec(None, t["signature"]) if t.get("signature") is not None else None
        q = None
        if t.get("scale") is not None:
            sc = b.CreateNumpyVector(np.asarray(t["scale"], np.float32).reshape(-1))
            zp = b.CreateNumpyVector(np.asarray(t.get("zero_point", 0), np.int64).reshape(-1))
            tfl.QuantizationParametersStart(b)
            tfl.QuantizationParametersAddScale(b, sc)
            tfl.QuantizationParametersAddZeroPoint(b, zp)
            tfl.QuantizationParametersAddQuantizedDimension(b, int(t.get("quantized_dimension", 0)))
            q = tfl.QuantizationParametersEnd(b)
        tfl.TensorStart(b)
        tfl.TensorAddShape(b, shape)
        tfl.TensorAddType(b, DTYPE_TO_TYPE[t["dtype"]])
        tfl.TensorAddBuffer(b, tensor_buf[i])
        tfl.TensorAddName(b, name)
        if q is not None:
            tfl.TensorAddQuantization(b, q)
        if t.get("is_variable"):
            tfl.TensorAddIsVariable(b, True)
        if sig is not None:
            tfl.TensorAddShapeSignature(b, sig)
        t_offsets.append(tfl.TensorEnd(b))

    opcode_keys: list[tuple[str, str, int]] = []
    op_offsets = []
    for op in operators:
        key = (op["op"], op.get("custom", "") or "", int(op.get("version", 1) or 1))
        if key not in opcode_keys:
            opcode_keys.append(key)
        ins = ivec(None, op["inputs"])
        outs = ivec(None, op["outputs"])
        opt = None
        cls = op.get("options_type")
        if cls:
            vals = {}
            for k, v in (op.get("options") or {}).items():
                if isinstance(v, np.ndarray):
                    vals[k] = b.CreateNumpyVector(np.ascontiguousarray(v).reshape(-1))
                else:
                    vals[k] = v
            getattr(tfl, f"{cls}Start")(b)
            for k, v in vals.items():
                getattr(tfl, f"{cls}Add{k}")(b, v)
            opt = getattr(tfl, f"{cls}End")(b)
        copt = raw_bytes(op["custom_options"], 1) if op.get("custom_options") else None
        tfl.OperatorStart(b)
        tfl.OperatorAddOpcodeIndex(b, opcode_keys.index(key))
        tfl.OperatorAddInputs(b, ins)
        tfl.OperatorAddOutputs(b, outs)
        if cls:
            tfl.OperatorAddBuiltinOptionsType(b, opt_kinds[cls])
            tfl.OperatorAddBuiltinOptions(b, opt)
        if copt is not None:
            tfl.OperatorAddCustomOptions(b, copt)
        op_offsets.append(tfl.OperatorEnd(b))

    oc_offsets = []
    for name, custom, ver in opcode_keys:
        cs = b.CreateString(custom) if name == "CUSTOM" else None
        code = codes[name]
        tfl.OperatorCodeStart(b)
        tfl.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tfl.OperatorCodeAddBuiltinCode(b, code)
        tfl.OperatorCodeAddVersion(b, ver)
        if cs is not None:
            tfl.OperatorCodeAddCustomCode(b, cs)
        oc_offsets.append(tfl.OperatorCodeEnd(b))

    def table_vec(start_fn, offs):
        start_fn(b, len(offs))
        for o in reversed(offs):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    tv = table_vec(tfl.SubGraphStartTensorsVector, t_offsets)
    ov = table_vec(tfl.SubGraphStartOperatorsVector, op_offsets)
    iv, outv = ivec(None, inputs), ivec(None, outputs)
    sname = b.CreateString("main")
    tfl.SubGraphStart(b)
    tfl.SubGraphAddTensors(b, tv)
    tfl.SubGraphAddInputs(b, iv)
    tfl.SubGraphAddOutputs(b, outv)
    tfl.SubGraphAddOperators(b, ov)
    tfl.SubGraphAddName(b, sname)
    sg = tfl.SubGraphEnd(b)
    sgv = table_vec(tfl.ModelStartSubgraphsVector, [sg])
    ocv = table_vec(tfl.ModelStartOperatorCodesVector, oc_offsets)
    bv = table_vec(tfl.ModelStartBuffersVector, buf_offsets)
    desc = b.CreateString(description)
    tfl.ModelStart(b)
    tfl.ModelAddVersion(b, 3)
    tfl.ModelAddOperatorCodes(b, ocv)
    tfl.ModelAddSubgraphs(b, sgv)
    tfl.ModelAddDescription(b, desc)
    tfl.ModelAddBuffers(b, bv)
    b.Finish(tfl.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def subgraph_tflite(graph: Graph, node_names, name: str | None = None) -> tuple[bytes, list[str], list[str]]:
    """A standalone ``.tflite`` of a subset of a TFLite graph's nodes: the cut's boundary tensors become its inputs
    and outputs (in ``Graph.boundary`` order, returned with the bytes), the constants it reads are copied into its
    own buffers, operators and their options are written back as they were. The whole graph (every node) is the
    original file's bytes, unchanged."""
    m = graph.source
    if not is_tflite_graph(graph):
        raise InvalidArgumentError("subgraph_tflite works on a graph loaded from a .tflite file")
    wanted = set(node_names)
    ins, outs, _ = graph.boundary(wanted)
    if len(wanted) == len(graph.nodes) and ins == list(graph.inputs) and outs == list(graph.outputs):
        return m.content(), ins, outs
    index = {n: i for i, n in enumerate(m.tensor_names)}
    ops = [m.operators[n.index] for n in graph.nodes if n.name in wanted]
    used: list[int] = []
    for i in [index[t] for t in ins] + [i for op in ops for i in [*op["inputs"], *op["outputs"]] if i >= 0]:
        if i not in used:
            used.append(i)
    remap = {old: new for new, old in enumerate(used)}
    tensors = []
    for old in used:
        t = m.tensors[old]
        d = {"name": m.tensor_names[old], "dtype": t["dtype"], "shape": t["shape"], "data": t["data"],
             "signature": t["signature"], "is_variable": t["is_variable"]}
        if t["quant"] is not None:
            d.update(scale=t["quant"]["scale"], zero_point=t["quant"]["zero_point"],
                     quantized_dimension=t["quant"]["quantized_dimension"])
        tensors.append(d)
    new_ops = [{**op, "inputs": [remap[i] if i >= 0 else -1 for i in op["inputs"]],
                "outputs": [remap[o] if o >= 0 else -1 for o in op["outputs"]]} for op in ops]
    data = build_tflite(tensors, new_ops, [remap[index[t]] for t in ins], [remap[index[t]] for t in outs],
                        description=name or f"{graph.name}_part")
    return data, ins, outs
