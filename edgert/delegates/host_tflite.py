"""The host delegate's TFLite path: the edgert C core for INT8 ``FULLY_CONNECTED`` (per-tensor and per-channel
weights), LiteRT's CPU interpreter (XNNPACK) for everything else.

The C core's ``et_fc_s8`` does TFLite's integer arithmetic: int32 accumulation of ``(x - x_zp) * w`` plus the int32
bias, requantized in fp32 (``rint(clamp(acc * input_scale * w_scale[j] / output_scale)) + y_zp``, clamped to the
fused activation's range as XNNPACK quantizes it, ``_act_range``) — XNNPACK's requantization, which LiteRT runs by
default. Every C variant (reference, AVX2, AVX-512 VNNI, AMX-INT8, NEON, NEON SDOT) writes the same bytes. Budget:
``FC_INT8_LSB_BUDGET`` = 0 int8 steps against LiteRT, fused activations included. (TFLite's own FULLY_CONNECTED
kernels, which LiteRT runs only with XNNPACK off, requantize in fixed point and round clamp bounds half away from
zero: a step off here and there.) Weights, bias and zero-point corrections are planned once at compile.

A partition is cut, in topological order, into C-core steps and LiteRT segments (each exported as its own .tflite);
a partition without a qualifying FULLY_CONNECTED is one LiteRT interpreter whose tensor memory the session binds.
This module must not import the session.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from ..errors import DeviceError, EdgertError
from ..formats.tflite import F32_TINY, is_tflite_graph
from ..quant import Int8Weights
from .base import CompiledPartition, cut_into_steps, faster_of
from .litert import LiteRTPartition

FC_INT8_LSB_BUDGET = 0   # int8 steps between the C core and LiteRT (XNNPACK) on an INT8 FULLY_CONNECTED output
_ACT_NONE, _ACT_RELU, _ACT_RELU_N1_TO_1, _ACT_RELU6 = 0, 1, 2, 3


class Int8FullyConnected:
    """One C-core step: ``y[m, n] = requant(x[m, k] @ w[n, k].T + bias)``, int8 in and out.

    Everything but the activations is planned once (``et_fc_s8_plan``: packed weights, bias and zero-point
    corrections folded per channel, scales, clamp range). ``compute_into`` checks a pair of buffers once and keeps
    their data pointers: calling it again with the same two arrays (the partition's own buffers, run after run)
    costs one attribute test and the C call."""

    kind = "FULLY_CONNECTED"

    def __init__(self, node: str, x: str, out: str, w: np.ndarray, bias: np.ndarray | None, x_zp: int,
                 scale: np.ndarray, y_zp: int, lo: int, hi: int, threads: int | None = None):
        from ..native import ffi, lib

        self.nodes, self.x, self.out = [node], x, out
        self.x_zp, self.y_zp, self.lo, self.hi = int(x_zp), int(y_zp), int(lo), int(hi)
        try:
            self.weights = Int8Weights(w, bias, self.x_zp, scale, self.y_zp, self.lo, self.hi)
        except EdgertError as exc:
            raise DeviceError(f"FULLY_CONNECTED {out!r}: {exc}") from None
        self.n, self.k = self.weights.shape
        self.threads = int(threads or 0)
        # pointers cast once: a cffi cast or ndarray.ctypes costs about a microsecond, the kernel well under that on
        # small shapes
        self._p_plan = self.weights.p_plan
        self._run = lib.et_fc_s8_run
        self._bx = self._by = None  # the buffer pair last checked, their pointers and row count
        self._px = self._py = ffi.NULL
        self._m = 0

    def compute_into(self, x: np.ndarray, y: np.ndarray) -> None:
        if x is self._bx and y is self._by:
            st = self._run(self._p_plan, self._px, self._m, self._py, self.threads)
            if st:
                from ..native import check
                check(st)
            return
        self._bind_and_run(x, y)

    def _bind_and_run(self, x: np.ndarray, y: np.ndarray) -> None:
        from ..native import check, ffi

        if (not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.dtype != np.int8 or x.ndim < 1
                or x.shape[-1] != self.k or y.dtype != np.int8 or y.size != x.size // self.k * self.n):
            raise DeviceError(f"FULLY_CONNECTED {self.out!r}: expected int8 [..., {self.k}] -> [..., {self.n}], got "
                              f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')} -> "
                              f"{getattr(y, 'dtype', type(y))} {getattr(y, 'shape', '')}")
        if not y.flags.c_contiguous or not y.flags.writeable:
            raise DeviceError(f"FULLY_CONNECTED {self.out!r}: output buffer must be contiguous and writeable")
        m = x.size // self.k
        if m == 0:
            return
        keep = x.flags.c_contiguous  # a copied input cannot be remembered: the next call may bring new data
        if not keep:
            x = np.ascontiguousarray(x)
        px, py = ffi.cast("const int8_t *", x.ctypes.data), ffi.cast("int8_t *", y.ctypes.data)
        st = self._run(self._p_plan, px, m, py, self.threads)
        if st:
            check(st)
        if keep:
            self._bx, self._by, self._px, self._py, self._m = x, y, px, py, m


# LiteRT quantizes an activation's float bounds to int8 one of two ways, by the kernel that runs the op. XNNPACK, which
# takes these ops by default, computes lrintf(v / s + zp) in float32 (xnn_qs8_quantize: the zero point added before
# rounding, ties to even); TFLite's own kernels (AVERAGE_POOL_2D and the standalone RELU family: XNNPACK takes neither
# in int8) compute zp + (int32_t)std::round(v / s), the quotient in float32, ties away from zero.
XNNPACK_ACTIVATION_OPS = frozenset({"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD"})
_ACT_BOUNDS = {_ACT_NONE: (None, None), _ACT_RELU: (0.0, None), _ACT_RELU_N1_TO_1: (-1.0, 1.0), _ACT_RELU6: (0.0, 6.0)}
_BUILTIN_ROUNDED_MAX = 2.0 ** 31 - 256  # past it TFLite's int32 cast (or zp + it) is undefined behaviour


def _bound_xnnpack(v: float, s: np.float32, zp: int) -> int:
    with np.errstate(over="ignore"):  # 6 / a scale near FLT_MIN is inf, which the clamp takes to 127 as in C
        f = np.float32(np.float32(v) / s) + np.float32(zp)
    return int(np.rint(np.clip(f, np.float32(-128), np.float32(127))))


def _bound_builtin(v: float, s: np.float32, zp: int) -> int | None:
    with np.errstate(over="ignore"):
        q = float(np.float32(v) / s)
    r = math.floor(abs(q) + 0.5)  # std::round of a float32: |q| + 0.5 is exact in float64
    if r > _BUILTIN_ROUNDED_MAX:
        return None
    return int(np.clip(zp + math.copysign(r, q), -128, 127))


def _act_range(act: int, s: float, zp: int, tflite_op: str) -> tuple[int, int] | None:
    """LiteRT's int8 clamp [lo, hi] for fused activation ``act`` (a standalone RELU, RELU6, RELU_N1_TO_1: its code) on
    an output of scale ``s`` and zero point ``zp``, as the kernel LiteRT runs ``tflite_op`` with computes it. None for
    another activation, or for a bound TFLite's own kernels leave undefined (an output scale below about 3e-9)."""
    if act not in _ACT_BOUNDS:
        return None
    quantize = _bound_xnnpack if tflite_op in XNNPACK_ACTIVATION_OPS else _bound_builtin
    (vlo, vhi), s32 = _ACT_BOUNDS[act], np.float32(s)
    lo = -128 if vlo is None else quantize(vlo, s32, zp)
    hi = 127 if vhi is None else quantize(vhi, s32, zp)
    return None if lo is None or hi is None else (lo, hi)


# XNNPACK's requantization scale of an int8 FULLY_CONNECTED, CONV_2D or DEPTHWISE_CONV_2D is s_x * s_w[c] / s_y in
# float32, that order. From 256 up XNNPACK cannot create the op and LiteRT refuses the model ("failed to create
# XNNPACK runtime"); every smaller one, an underflow to 0 included, runs on XNNPACK (ai-edge-litert 2.3.0).
XNNPACK_REQUANT_MAX = np.float32(256.0)


def xnnpack_requant_scales(xs, ws, ys, channels: int) -> np.ndarray | None:
    """The per-channel requantization scales XNNPACK computes (``s_x * s_w[c] / s_y`` in float32, that order), or
    None when one lies outside [0, ``XNNPACK_REQUANT_MAX``). The C core and the serial NPU take such an op only with
    these scales."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        sc = (np.float32(np.asarray(xs, np.float32).reshape(-1)[0]) *
              np.broadcast_to(np.asarray(ws, np.float32).reshape(-1), (channels,))
              / np.float32(np.asarray(ys, np.float32).reshape(-1)[0])).astype(np.float32)
    return np.ascontiguousarray(sc) if np.all(sc >= 0) and np.all(sc < XNNPACK_REQUANT_MAX) else None


def _positive_normal(s) -> bool:
    s = np.asarray(s, np.float32).reshape(-1)
    return bool(s.size) and bool(np.all(np.isfinite(s)) and np.all(s >= F32_TINY))


def xnnpack_quantization(graph, x, w, b, y) -> bool:
    """True if LiteRT's XNNPACK delegate takes the quantization of an int8 FULLY_CONNECTED / CONV_2D /
    DEPTHWISE_CONV_2D with these tensors (xnnpack_delegate.cc, measured on ai-edge-litert 2.3.0): x and y one scale
    each with quantized_dimension 0; every weight scale a positive normal float32 (a pruned channel of scale 0 or a
    denormal one leaves the op to TFLite's own kernel, or has the model refused); an int32 bias (``b``, or None) with
    quantization parameters: quantized_dimension 0, one or N positive normal scales, zero points 0 (the bias scale
    itself is not used). Otherwise LiteRT runs the op with TFLite's own kernels (other rounding) or refuses it."""
    src = graph.source
    if any(v.quant is None for v in (x, w, y)) or (b is not None and b.quant is None):
        return False
    if (np.asarray(x.quant.scale).size != 1 or np.asarray(y.quant.scale).size != 1
            or not _positive_normal(w.quant.scale)):
        return False
    if b is not None and (not _positive_normal(b.quant.scale) or np.any(np.asarray(b.quant.zero_point) != 0)
                          or np.asarray(b.quant.scale).size not in (1, int(np.prod(b.shape or (1,))))):
        return False
    return all(src.tensor(v.name)["quant"]["quantized_dimension"] == 0 for v in (x, y, *([b] if b is not None else [])))


def int8_fc_params(graph, node) -> dict | None:
    """The arguments of the C core's INT8 FULLY_CONNECTED for ``node`` (``w``, ``bias``, ``x_zp``, ``scale`` =
    s_in * s_w[j] / s_out in float32 in that order, ``y_zp``, ``lo``, ``hi``) if LiteRT's XNNPACK delegate takes the
    op (``xnnpack_quantization``; requantization scales below 256, ``xnnpack_requant_scales``; no activation or a
    ReLU-family one; not operator version 8, sparse weights) and the core does too (constant 2-D int8 weights with
    zero points 0, per tensor or per row; an optional constant int32 bias; the default weights format; x a run-time
    tensor whose last dim is K; the output shape TFLite gives), else None. The rest stays with LiteRT, which runs it
    with TFLite's own kernels (other rounding) or refuses the model. The host step and the serial NPU's
    FullyConnectedS8 both start here."""
    if node.attrs.get("tflite_op") != "FULLY_CONNECTED" or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    opts = node.attrs.get("tflite_options", {})
    if int(opts.get("WeightsFormat", 0)) != 0 or int(opts.get("AsymmetricQuantizeInputs", 0)):
        return None
    if not is_tflite_graph(graph) or graph.source.operators[node.index]["version"] == 8:
        return None
    t = graph.tensors
    x, w, y = t.get(node.inputs[0]), t.get(node.inputs[1]), t.get(node.outputs[0])
    b = t.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if x is None or w is None or y is None or x.dtype != "int8" or w.dtype != "int8" or y.dtype != "int8":
        return None
    if w.initializer is None or w.initializer.ndim != 2 or x.initializer is not None:
        return None  # a constant x: LiteRT's (the steps read activations from the run's buffers)
    if b is not None and (b.initializer is None or b.dtype != "int32" or b.initializer.size != w.initializer.shape[0]):
        return None
    if not xnnpack_quantization(graph, x, w, b, y):
        return None
    n, k = w.initializer.shape
    xs, ws, ys = (np.asarray(q.quant.scale, np.float32).reshape(-1) for q in (x, w, y))
    if ws.size not in (1, n) or np.any(np.asarray(w.quant.zero_point) != 0):
        return None
    if ws.size > 1 and w.quant.axis not in (0, None):
        return None
    xshape, yshape = x.concrete_shape(), y.concrete_shape()
    if xshape is None or yshape is None or not xshape or xshape[-1] * 0 != 0:
        return None
    # rows of k (LiteRT also takes x of another last dim and regroups it: left to LiteRT), and the output shape
    # TFLite gives them, so a damaged shape reaches LiteRT's check rather than a reshaped answer
    m = int(np.prod(xshape)) // k if xshape[-1] == k else -1
    want = tuple(xshape[:-1]) + (n,) if int(opts.get("KeepNumDims", 0)) else (m, n)
    if m < 0 or tuple(yshape) != want:
        return None
    yzp = int(np.asarray(y.quant.zero_point).reshape(-1)[0])
    rng = _act_range(int(node.attrs.get("fused_activation", 0)), float(ys[0]), yzp, "FULLY_CONNECTED")
    if rng is None:
        return None
    scale = xnnpack_requant_scales(xs, ws, ys, n)
    if scale is None:
        return None
    return {"w": w.initializer, "bias": None if b is None else b.initializer,
            "x_zp": int(np.asarray(x.quant.zero_point).reshape(-1)[0]), "scale": scale, "y_zp": yzp,
            "lo": rng[0], "hi": rng[1]}


def int8_fc_step(graph, node, threads: int | None = None) -> Int8FullyConnected | None:
    """The C-core step for ``node`` if it is an INT8 FULLY_CONNECTED the core takes (``int8_fc_params``), else
    None."""
    p = int8_fc_params(graph, node)
    if p is None:
        return None
    return Int8FullyConnected(node.name, node.inputs[0], node.outputs[0], threads=threads, **p)


class _Segment:
    def __init__(self, graph, nodes, threads, pid, idx):
        from ..formats.tflite import subgraph_tflite

        data, ins, outs = subgraph_tflite(graph, nodes, name=f"{graph.name}_p{pid}_s{idx}")
        self.lrt = LiteRTPartition(data, ins, outs, threads, None, f"segment {idx} of partition {pid}")
        self.inputs, self.outputs = ins, outs


class HostTFLitePartition(CompiledPartition):
    """C-core steps and LiteRT segments in topological order; tensors between them live in buffers made at compile
    (TFLite shapes are static)."""

    def __init__(self, partition, graph, steps: list[Int8FullyConnected], threads):
        self.inputs, self.outputs = list(partition.inputs), list(partition.outputs)
        self.core = steps
        at = {s.nodes[0]: s for s in steps}  # a C-core step replaces exactly its one node
        pid = getattr(partition, "id", 0)
        self.steps: list[Any] = cut_into_steps(partition.nodes, at, set(at),
                                               lambda nodes, i: _Segment(graph, nodes, threads, pid, i))
        out_set = set(self.outputs)
        self._internal: dict[str, np.ndarray] = {}
        for s in self.steps:
            for o in ([s.out] if isinstance(s, Int8FullyConnected) else s.outputs):
                if o not in out_set:
                    t = graph.tensors[o]
                    self._internal[o] = np.zeros(t.concrete_shape(), np.dtype(t.dtype))

    def tensor_views(self) -> dict[str, np.ndarray]:
        if len(self.steps) == 1 and isinstance(self.steps[0], _Segment):
            return self.steps[0].lrt.tensor_views()
        return {}

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if len(self.steps) == 1 and isinstance(self.steps[0], _Segment):
            self.steps[0].lrt.run(inputs, outputs)
            return
        env = {**inputs, **self._internal, **outputs}
        for s in self.steps:
            if isinstance(s, Int8FullyConnected):
                s.compute_into(env[s.x], env[s.out])
            else:
                s.lrt.run(env, env)

    def bound_run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        if len(self.steps) == 1 and isinstance(self.steps[0], _Segment):
            return self.steps[0].lrt.bound_run(inputs, outputs)
        return super().bound_run(inputs, outputs)

    def close(self) -> None:
        for s in self.steps:
            if isinstance(s, _Segment):
                s.lrt.close()


def compile_host_tflite(partition, graph, unit: Any = None, options: Mapping[str, Any] | None = None):
    """The host delegate's compile for a TFLite graph (``options``: ``threads``; ``core``: ``"auto"`` (default:
    the partition runs with its C-core steps only if that measured faster than LiteRT alone at compile time — a
    small FULLY_CONNECTED costs more in the cut around it than the C core saves), ``True`` (always), ``False``)."""
    options = dict(options or {})
    dopts = dict(getattr(unit, "delegate_options", None) or {})
    threads = options.get("threads") or dopts.get("threads")
    core = options.get("core", "auto")
    steps = []
    if core:
        for name in partition.nodes:
            s = int8_fc_step(graph, graph.node(name), threads)
            if s is not None:
                steps.append(s)
    with_core = HostTFLitePartition(partition, graph, steps, threads)
    if core != "auto" or not steps:
        return with_core
    specs = {n: (graph.tensors[n].concrete_shape(), np.dtype(graph.tensors[n].dtype))  # TFLite shapes are static
             for n in [*partition.inputs, *partition.outputs]}
    return faster_of(with_core, HostTFLitePartition(partition, graph, [], threads), specs)
