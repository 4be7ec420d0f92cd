"""Producing candidates: re-quantize a GGUF model with edgert's own quantizers, or quantize an ONNX model with
``onnxruntime.quantization``.

GGUF: every metadata key/value (tokenizer, chat template, hyper-parameters) is copied with its GGUF type, and
``general.file_type`` is set to the target's llama.cpp file type. Each tensor is dequantized from its stored
format (F32/F16/Q4_0/Q4_1/Q8_0) and, if it is a 2-D weight matrix whose rows are a whole number of 32-value
blocks, re-quantized with ``edgert.quantize`` (bit-identical to ggml's reference quantizers); norms and other 1-D
tensors stay F32. ``token_embd.weight`` follows the target unless ``keep_embeddings``, which keeps its stored
format. The file is written with ``gguf.GGUFWriter``, so llama.cpp loads it as it loads its own.

ONNX: ``int8-dynamic`` (weights int8, activations quantized at run time), ``int8-static`` (QDQ, activations
calibrated on sample inputs from a directory of .npy/.npz files), ``int4`` (MatMul weights to MatMulNBits,
block 32). The written model takes the output's name only once onnxruntime loads it.

This module sits beside the formats layer: it reads with ``edgert.formats.gguf`` and must not import the LLM stack,
the session or the CLI.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import numpy as np

from .errors import DTypeError, EdgertError, InvalidArgumentError, ModelFormatError, ShapeError
from .formats import array_file, model_file
from .formats.gguf import open_gguf
from .quant import BLOCK, FORMATS, quantize

class QuantizedModelError(ModelFormatError):
    """onnxruntime.quantization wrote a model onnxruntime cannot load (a float16 model in an int8 mode, for one):
    it is not kept."""


GGUF_TARGETS = ("q8_0", "q4_0", "q4_1")
ONNX_TARGETS = ("int8-dynamic", "int8-static", "int4")
# llama.cpp's llama_ftype for a model whose weights are mostly this type
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.alignment")  # the writer writes these itself

Progress = Callable[[int, int, str], None]


def _requantizable(name: str, shape: tuple[int, ...]) -> bool:
    """2-D weight matrices with whole 32-value blocks per row (ggml shape[0] is the row length)."""
    return len(shape) == 2 and shape[0] % BLOCK == 0 and name.endswith(".weight") and "norm" not in name


def quantize_gguf(src, dst, fmt: str, *, keep_embeddings: bool = False, progress: Progress | None = None) -> dict:
    """Write ``dst``: ``src`` with its weight matrices re-quantized to ``fmt`` (q8_0, q4_0, q4_1). Returns a
    summary: tensors re-quantized/kept, bytes before and after."""
    import gguf

    if fmt not in GGUF_TARGETS:
        raise InvalidArgumentError(f"GGUF target must be one of {', '.join(GGUF_TARGETS)}, got {fmt!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    if _same_file(src, dst):
        raise InvalidArgumentError(f"output {dst} is the input file: write the re-quantized model elsewhere")
    g = open_gguf(src)  # first: it names a missing or non-regular (ModelNotFoundError), truncated or non-GGUF file
    with contextlib.ExitStack() as stack:  # on leaving: the writer closed, dst in place (or no dst), g closed
        stack.callback(g.close)
        check_output_path(dst)
        try:
            reader = gguf.GGUFReader(src)  # the typed view of the metadata (edgert's reader keeps values, not types)
        except Exception as exc:  # gguf raises assorted types (ValueError, struct errors) for what it cannot read
            raise ModelFormatError(f"{src}: gguf cannot read its metadata ({type(exc).__name__}: {exc})") from None
        arch = g.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{src}: general.architecture is missing; not a model GGUF")
        out = stack.enter_context(_written_whole(dst))  # dst appears only once the file is complete
        writer = gguf.GGUFWriter(out, arch)
        stack.callback(writer.close)
        alignment = g.metadata.get("general.alignment")
        if isinstance(alignment, int) and alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            writer.add_custom_alignment(alignment)
        for key, field in reader.fields.items():
            if key.startswith(_SKIP_KEYS) or key == "general.file_type":
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
            if sub == gguf.GGUFValueType.ARRAY:
                raise ModelFormatError(f"{src}: metadata {key!r} is an array of arrays, which GGUFWriter cannot copy")
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(FILE_TYPES[fmt])

        summary = {"requantized": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0, "tensors": []}
        names = list(g.tensors)
        for i, name in enumerate(names):
            info = g.tensors[name]
            summary["bytes_in"] += info.nbytes
            target = fmt
            if name == "token_embd.weight" and keep_embeddings:
                target = None
            if not _requantizable(name, info.shape):
                target = None
            if target is None:
                data = np.array(g.tensor_bytes(name))  # as stored, byte for byte
                if info.type_name in ("F32", "F16"):
                    data = data.view("<f4" if info.type_name == "F32" else "<f2").reshape(info.shape[::-1])
                    writer.add_tensor(name, data)
                else:
                    raw_dtype = gguf.GGMLQuantizationType(info.type_id)
                    writer.add_tensor(name, data.reshape(info.shape[::-1][:-1] + (-1,)), raw_dtype=raw_dtype)
                summary["kept"] += 1
                nbytes = info.nbytes
            else:
                w = _dequantize(g, name)
                q = quantize(w, target)
                writer.add_tensor(name, q.raw, raw_dtype=gguf.GGMLQuantizationType(FORMATS[target]))
                summary["requantized"] += 1
                nbytes = q.nbytes
            summary["bytes_out"] += nbytes
            summary["tensors"].append({"name": name, "from": info.type_name,
                                       "to": (target or info.type_name.lower()).upper()})
            if progress:
                progress(i + 1, len(names), name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()

    return summary


@contextlib.contextmanager
def _written_whole(dst: str):
    """A temporary path beside ``dst`` to write to; renamed to ``dst`` when the block ends normally, removed when it
    raises, so a failed or interrupted write (a full disk, Ctrl-C) never leaves a partial model under ``dst``."""
    tmp = f"{dst}.partial-{os.getpid()}"
    try:
        yield tmp
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):  # a full disk, a vanished directory: one line, not a traceback
            raise EdgertError(f"output {dst}: writing failed ({exc})") from None
        raise
    try:
        os.replace(tmp, dst)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise EdgertError(f"output {dst}: cannot be written ({exc})") from None


def _same_file(src: str, dst: str) -> bool:
    """Whether writing ``dst`` would overwrite ``src`` (the same path, or a symlink or hard link to it)."""
    if os.path.abspath(src) == os.path.abspath(dst):
        return True
    try:
        return os.path.samefile(src, dst)
    except OSError:  # either does not exist (yet)
        return False


def check_output_path(dst, what: str = "output", inputs=()) -> None:
    """Refuse a file to be written whose directory does not exist, which is a directory, or which is one of the
    command's ``inputs`` (paths; None skipped), before the work that produces it. ``what`` names it in the message
    (``output``, ``--json``)."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"{what} {dst}: directory {parent} does not exist")
    if os.path.isdir(dst):
        raise InvalidArgumentError(f"{what} {dst} is a directory; give a file name")
    for src in inputs:
        if src is not None and _same_file(os.fspath(src), os.fspath(dst)):
            raise InvalidArgumentError(f"{what} {dst} is the input {src}: writing it would destroy it; give "
                                       "another file name")


def _dequantize(g, name: str) -> np.ndarray:
    info = g.tensors[name]
    if info.type_name not in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0"):
        raise ModelFormatError(f"tensor {name!r} is {info.type_name}; edgert re-quantizes from F32, F16, Q4_0, "
                               "Q4_1 or Q8_0")
    return np.ascontiguousarray(g.qtensor(name).dequantize(), dtype=np.float32)


# ---- ONNX -------------------------------------------------------------------------------------------------------
def read_samples(directory, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """Samples from a directory: each ``*.npz`` is one sample (keys = input names); each ``*.npy`` is one sample
    of a single-input model; each sub-directory holding ``<input>.npy`` files is one sample. Sorted by name."""
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise InvalidArgumentError(f"inputs directory not found: {d}")

    def load(path):
        data = array_file(path)
        if path.endswith(".npz") != isinstance(data, dict):
            raise InvalidArgumentError(f"{path}: holds {'an .npz archive' if isinstance(data, dict) else 'one array'}"
                                       f", not what its {path[-4:]} name says")
        return data

    out = []
    for entry in sorted(os.listdir(d)):
        p = os.path.join(d, entry)
        if entry.endswith(".npz"):
            out.append(load(p))
        elif entry.endswith(".npy"):
            if len(input_names) != 1:
                raise InvalidArgumentError(
                    f"{p}: a bare .npy file is one sample of a single-input model, but this model has inputs "
                    f"{input_names}; use .npz files (one array per input name) or one sub-directory per sample")
            out.append({input_names[0]: load(p)})
        elif os.path.isdir(p):
            files = {f[:-4]: os.path.join(p, f) for f in os.listdir(p) if f.endswith(".npy")}
            if files:
                out.append({k: load(v) for k, v in files.items()})
    if not out:
        raise InvalidArgumentError(f"no samples in {d}: expected .npz files, .npy files or sub-directories of .npy")
    for i, s in enumerate(out):
        missing = [n for n in input_names if n not in s]
        if missing:
            raise InvalidArgumentError(f"sample #{i} in {d} lacks input(s) {missing}; it has {sorted(s)}")
    return out


def _check_samples(model, names: list[str], samples: list[dict], where) -> None:
    """Each sample's arrays have the dtype and the fixed dims of the model's inputs (onnxruntime's calibration run
    would otherwise fail deep inside quantize_static with its own exception)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    types = {i.name: i.type.tensor_type for i in model.graph.input if i.type.HasField("tensor_type")}
    for k, sample in enumerate(samples):
        for n in names:
            tt, a = types.get(n), np.asarray(sample[n])
            if tt is None:
                continue
            if tt.elem_type:
                want = np.dtype(tensor_dtype_to_np_dtype(tt.elem_type))
                if a.dtype != want:
                    raise DTypeError(f"sample #{k} in {where}: input {n!r} is {a.dtype}, the model takes {want}")
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
                if a.ndim != len(dims) or any(w is not None and w != g for w, g in zip(dims, a.shape)):
                    shown = tuple(d if d is not None else "?" for d in dims)
                    raise ShapeError(f"sample #{k} in {where}: input {n!r} has shape {a.shape}, the model takes "
                                     f"{shown}")


def quantize_onnx(src, dst, mode: str, *, calibration=None, block_size: int = 32) -> dict:
    """Write ``dst``: ``src`` quantized with onnxruntime.quantization in ``mode`` (int8-dynamic, int8-static with
    ``calibration`` a directory of samples, int4). Returns ``mode``, ``bytes_in``, ``bytes_out`` and
    ``quantized_ops``: the op types the written model has and ``src`` had not (none: nothing was quantized, e.g.
    int4 on a model without MatMul)."""
    import onnx

    if mode not in ONNX_TARGETS:
        raise InvalidArgumentError(f"ONNX target must be one of {', '.join(ONNX_TARGETS)}, got {mode!r}")
    src, dst = model_file(src, "ONNX"), os.fspath(dst)
    if _same_file(src, dst):
        raise InvalidArgumentError(f"output {dst} is the input file: write the quantized model elsewhere")
    check_output_path(dst)
    if mode == "int8-static" and calibration is None:
        raise InvalidArgumentError("int8-static needs --calibration DIR: sample inputs (.npz/.npy) to calibrate "
                                   "activation ranges on")
    if mode != "int8-static" and calibration is not None:  # it was silently ignored
        raise InvalidArgumentError(f"calibration samples are for int8-static; {mode} takes none")
    try:
        model = onnx.load(src, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelFormatError(f"ONNX model {src!r} could not be parsed ({type(exc).__name__}: {exc})") from None
    from onnxruntime import quantization as q

    with _written_whole(dst) as out:  # dst appears only once the model is complete, and loads
        _quantize_onnx_to(q, src, model, out, mode, calibration, block_size)
        _check_loads(out, model, mode)
        written = onnx.load(out, load_external_data=False)
    ops = {n.op_type for n in written.graph.node} - {n.op_type for n in model.graph.node}
    return {"mode": mode, "bytes_in": os.path.getsize(src), "bytes_out": os.path.getsize(dst),
            "quantized_ops": sorted(ops)}


def _float16_values(model) -> bool:
    """Whether the model's inputs or initializers hold float16."""
    from onnx import TensorProto

    return (any(i.type.tensor_type.elem_type == TensorProto.FLOAT16 for i in model.graph.input)
            or any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer))


def _check_loads(path: str, model, mode: str) -> None:
    """QuantizedModelError unless onnxruntime loads the model just written at ``path`` (``model``: the input, as
    parsed). onnxruntime.quantization writes some it refuses itself: on a float16 model the int8 modes put float16
    into DynamicQuantizeLinear / QuantizeLinear (INVALID_GRAPH), and reported success."""
    import re

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # checking, not running
    so.log_severity_level = 3
    try:
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, NotImplemented...
        why = re.sub(r"Load model from \S+ failed:\s*", "", " ".join(str(exc).split()))
        hint = "; the input model holds float16 values, which onnxruntime's int8 quantizers do not take: convert it " \
               "to float32 first" if mode != "int4" and _float16_values(model) else ""
        raise QuantizedModelError(f"onnxruntime.quantization wrote an {mode} model that onnxruntime cannot load "
                                  f"({why}){hint}; nothing was written") from None


def _quantize_onnx_to(q, src: str, model, dst: str, mode: str, calibration, block_size: int) -> None:
    """``model``: ``src`` as parsed (external data not loaded)."""
    if mode == "int8-dynamic":
        q.quantize_dynamic(src, dst, weight_type=q.QuantType.QInt8)
    elif mode == "int8-static":
        inits = {i.name for i in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in inits]
        samples = read_samples(calibration, names)
        _check_samples(model, names, samples, calibration)

        class _Reader(q.CalibrationDataReader):
            def __init__(self):
                self._it = iter(samples)

            def get_next(self):
                return next(self._it, None)

        q.quantize_static(src, dst, _Reader(), quant_format=q.QuantFormat.QDQ,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8, per_channel=True)
    else:
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as exc:
            raise InvalidArgumentError(f"int4 quantization needs onnxruntime's MatMulNBitsQuantizer ({exc}); "
                                       "pip install onnx-ir, or a newer onnxruntime") from None
        import onnx

        model = onnx.load(src)  # with its external data: the quantizer reads every weight
        quant = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True)
        quant.process()
        quant.model.save_model_to_file(dst, use_external_data_format=False)


def detect_kind(path) -> str:
    p = os.fspath(path).lower()
    if p.endswith(".gguf"):
        return "gguf"
    if p.endswith(".onnx"):
        return "onnx"
    raise InvalidArgumentError(f"{path}: expected a .gguf or .onnx model")
