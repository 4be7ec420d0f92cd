"""The ``host`` delegate: the edgert C core for quantized matrix products, onnxruntime's CPU provider for the rest.

At compile time the partition's nodes are scanned for three weight patterns the C core takes (weights imported once):

- ``MatMulNBits`` (com.microsoft, 4-bit, constant B/scales/zero points): B imported by
  ``edgert.from_matmul_nbits`` (q4_0 / q4_1, exact up to the fp16 rounding of each block's scale and min; f16 for
  block_size 16 or a K that is not a multiple of 32, f32 where fp16 cannot hold the scales).
- ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)`` (onnxruntime's dynamic int8
  quantization): with int8 weights (``W - w_zero_point`` within int8), one ``et_fc_s8_dyn`` call that does
  onnxruntime's arithmetic — the activations quantized per tensor to uint8 as DynamicQuantizeLinear does, int32 sums,
  one multiply by ``x_scale * w_scale`` — so the outputs equal onnxruntime's bit for bit (``DynamicInt8MatMul``).
  With uint8 weights the chain becomes one float matmul with ``(W - w_zero_point) * w_scale`` stored as q8_0: not
  bit-exact (activations per block of 32 to int8, the weight codes re-scaled per block), budget
  ``MATMUL_INTEGER_BUDGET`` (relative to the output's scale), checked in tests.
- ``DequantizeLinear(constant weight) -> MatMul``: the dequantized weight re-quantized to q8_0 (a lossy
  re-quantization, budget ``DEQUANT_MATMUL_BUDGET``); the activation side is whatever feeds the MatMul. Only int8 /
  uint8 weights with a per-tensor scale or one scale per output channel (axis 1, N): q8_0 blocks run along K, and
  scales that vary along K, or wider codes, do not fit one block scale.

The q8_0 paths pad K with zero columns up to a whole block (exact: zeros add nothing and leave each activation
block's scale unchanged), so any K works; MatMulNBits needs K a multiple of 32 (its blocks are imported as they are)
except at block_size 16 (imported as f16, which holds any K).
Everything else (and any of the above the C core cannot take: MatMulNBits with a ragged K or g_idx, weights that are
not constant, DequantizeLinear scales along K or codes wider than 8 bits) runs through onnxruntime's CPU provider: the partition is cut, in topological order, into C-core steps and
onnxruntime segments (each its own exported model). A partition without any of these patterns is one segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import DeviceError, ModelFormatError, NonFiniteError
from ..quant import (BLOCK, BoundDynamicInt8, BoundMatMul, Int8Weights, PackedQTensor, QTensor, from_matmul_nbits, quantize,
                     repack, repack_pays)
from ..timing import median_s
from .base import CompiledPartition, Delegate, cut_into_steps, faster_of, register
from .onnxruntime import CPU, OnnxruntimePartition, inference_session, session_options

# error budgets of the C-core paths, as a fraction of max |reference output| (tests and docs name these)
MATMUL_NBITS_BUDGET = 2e-2      # q8 activations x exact q4 weights
MATMUL_INTEGER_BUDGET = 3e-2    # uint8 weights: per-block int8 activations vs per-tensor uint8, q8_0 weights
DEQUANT_MATMUL_BUDGET = 3e-2    # q8_0 re-quantization of an int8 dequantized weight, q8 activations

CLAIMED_OPS = ("com.microsoft:MatMulNBits", "DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear", "MatMul")


@dataclass
class CoreMatMul:
    """One C-core step: ``out[..., N] = x[..., K] @ W.T (+ bias)``; W is (N, K) in ``weight`` (a QTensor, kept as
    its x16 PackedQTensor where that pays)."""

    kind: str            # "MatMulNBits" | "MatMulInteger" | "DequantizeLinear+MatMul"
    x: str
    out: str
    weight: QTensor | PackedQTensor
    bias: np.ndarray | None = None
    nodes: list[str] = field(default_factory=list)   # the graph nodes this step replaces
    threads: int | None = None
    k: int = 0           # the graph's K; weight.shape[1] is K rounded up to a block (zero columns: exact)
    _bound: BoundMatMul | None = None  # the product for the last row count (re-made only when M changes)
    timing: tuple | None = None  # (C core s, onnxruntime s) when measured at compile time

    def __post_init__(self):
        # where the ISA reads the x16 layout with its own kernels, the step keeps that copy instead (same bits)
        if isinstance(self.weight, QTensor) and repack_pays(self.weight.fmt):
            self.weight = repack(self.weight)

    def compute(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The step's output for ``x``: written into ``out`` (float32, C-contiguous, [..., N]) when given, else into
        the step's own buffer (valid until the next call). The steady state allocates nothing; a K short of whole
        blocks is zero-padded inside the C core (exact)."""
        n, kp = self.weight.shape
        k = self.k or kp
        if x.dtype != np.float32 or x.shape[-1] != k:
            raise DeviceError(f"{self.kind} {self.out!r}: expected float32 [..., {k}], got {x.dtype} {x.shape}")
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0:
            return np.zeros((*x.shape[:-1], n), np.float32)
        if not self._walkable(x2, m, k):  # rows the C core cannot walk
            x2 = np.ascontiguousarray(x2)
        b = self._bound
        if b is None or b.m != m:
            b = self._bound = self._product(m, k)
        y = b(x2, None if out is None else out.reshape(m, n))
        if self.bias is not None:
            np.add(y, self.bias, out=y)
        return y.reshape(*x.shape[:-1], n) if out is None else out


    def _walkable(self, x2: np.ndarray, m: int, k: int) -> bool:
        return x2.strides[1] == 4 and (m == 1 or x2.strides[0] >= 4 * k)

    def _product(self, m: int, k: int):
        return BoundMatMul(self.weight, m, k, self.threads)


@dataclass
class DynamicInt8MatMul(CoreMatMul):
    """The ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` chain as onnxruntime computes it: activations
    quantized per tensor to uint8 in the C core (``et_fc_s8_dyn``), int32 products with the int8 weights less their
    zero point, one float multiply by ``x_scale * w_scale``. ``weight`` is :class:`~edgert.quant.Int8Weights`."""

    def _walkable(self, x2: np.ndarray, m: int, k: int) -> bool:
        return x2.flags.c_contiguous

    def _product(self, m: int, k: int):
        return BoundDynamicInt8(self.weight, m, self.threads)


def _const(graph, name: str) -> np.ndarray | None:
    if not name:
        return None
    t = graph.tensors.get(name)
    return None if t is None or t.initializer is None else np.asarray(t.initializer)


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int | None) -> np.ndarray:
    """``(q - zp) * scale`` as float32: per tensor (``axis`` None: scale and zero point one value each) or per
    ``axis`` (scale and zero point each one value or ``q.shape[axis]`` values). The callers have checked the
    shapes (``_dequantize_linear_axis``, ``_check_b_zero_point``)."""
    q = q.astype(np.float32)
    scale = scale.astype(np.float32).reshape(-1)
    zp = np.zeros(1, np.float32) if zp is None else zp.astype(np.float32).reshape(-1)
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def _one_value(a: np.ndarray) -> bool:
    """A scalar or a 1-element vector: what onnxruntime takes as a per-tensor scale or zero point."""
    return a.ndim <= 1 and a.size == 1


def _dequantize_linear_axis(d, q: np.ndarray, sc: np.ndarray, zp: np.ndarray | None):
    """How the C core reads DequantizeLinear ``d`` of the constant 2-D weight ``q`` (K, N): ``None`` (per tensor) or
    1 (a per-axis scale along N, one per output channel); ``False`` to leave the node to onnxruntime (valid, but not a
    case the C core takes). ModelFormatError where the ONNX spec (and onnxruntime) refuse the node: an axis outside
    [-2, 2) with a per-axis scale, a per-axis scale that is not 1-D of the axis' length, a zero point of another shape
    than the scale or another dtype than the weight.

    What q8_0 can hold: it re-scales each block of 32 values along K of one output channel to its largest value, so
    every block must share one scale and hold 8-bit codes (less an 8-bit zero point). A per-axis scale along K (axis
    0) mixes scales inside a block, and 16- or 32-bit codes span more than 8 bits: both would round the block's small
    values to zero (1000x scales along K gave a relative error of 1.0), so they stay with onnxruntime."""
    where = f"DequantizeLinear node {d.name!r} (weight {d.inputs[0]!r})"
    if q.dtype not in (np.int8, np.uint8) or sc.dtype != np.float32:
        return False  # 4-, 16-, 32-bit codes, float8, float16 scales...: onnxruntime's
    if zp is not None and zp.dtype != q.dtype:
        raise ModelFormatError(f"{where}: its zero point is {zp.dtype}, the weight {q.dtype}; ONNX requires the "
                               "zero point to have the quantized weight's dtype")
    axis = int(d.attrs.get("axis", 1))
    if _one_value(sc):
        if zp is not None and not _one_value(zp):
            raise ModelFormatError(f"{where}: a per-tensor scale (shape {sc.shape}) with a zero point of shape "
                                   f"{zp.shape}; ONNX requires the zero point to have the scale's shape")
        # onnxruntime ignores the axis of a per-tensor scale; one outside [-2, 2) is still not valid ONNX
        return None if -q.ndim <= axis < q.ndim else False
    if not -q.ndim <= axis < q.ndim:
        raise ModelFormatError(f"{where}: axis {axis} is outside [-{q.ndim}, {q.ndim}) for its {q.ndim}-D weight "
                               f"{q.shape}")
    axis %= q.ndim
    if sc.ndim != 1 or sc.size != q.shape[axis]:
        raise ModelFormatError(f"{where}: a per-axis scale must be 1-D of length {q.shape[axis]} (axis {axis} of "
                               f"the weight {q.shape}), found shape {sc.shape}")
    if zp is not None and zp.shape != sc.shape:
        raise ModelFormatError(f"{where}: zero point of shape {zp.shape}, scale of shape {sc.shape}; ONNX requires "
                               "the same shape")
    return axis if axis == 1 else False  # scales along K: see above


def _weight_q8(w_kn: np.ndarray) -> QTensor:
    """A (K, N) float weight as a q8_0 QTensor (N, K rounded up to a block, zero columns appended)."""
    k, n = w_kn.shape
    kp = -(-k // BLOCK) * BLOCK
    wt = np.zeros((n, kp), np.float32)
    wt[:, :k] = w_kn.T
    return quantize(wt, "q8_0")


def _int8_weights(b: np.ndarray, w_scale: np.ndarray, b_zp: np.ndarray | None) -> Int8Weights | None:
    """MatMulInteger's (K, N) weight ``b`` less its zero point (per tensor or per column), as the C core's int8
    weights with scale ``w_scale`` (1 or N values); None when a difference leaves int8 (uint8 weights, mostly) or
    the scale is not finite and >= 0."""
    if b.dtype not in (np.int8, np.uint8):
        return None
    n = b.shape[1]
    zp = np.zeros(1, np.int32) if b_zp is None else np.asarray(b_zp).astype(np.int32).reshape(-1)
    sc = np.asarray(w_scale, np.float32).reshape(-1)
    if zp.size not in (1, n) or sc.size not in (1, n) or not np.all(np.isfinite(sc)) or np.any(sc < 0):
        return None
    d = b.astype(np.int32) - zp.reshape(1, -1)
    if d.min() < -128 or d.max() > 127:
        return None
    return Int8Weights(np.ascontiguousarray(d.T.astype(np.int8)), None, 0, sc)


def _check_b_zero_point(node, b: np.ndarray, bzp: np.ndarray) -> None:
    """MatMulInteger's zero point of its 2-D weight ``b``: ``b``'s dtype, and one value or one per column (shape
    (), (1,), (N,) or (1, N), as onnxruntime takes it); ModelFormatError otherwise."""
    n = b.shape[1]
    if bzp.dtype != b.dtype:
        raise ModelFormatError(f"MatMulInteger node {node.name!r}: its weight zero point is {bzp.dtype}, the weight "
                               f"{b.dtype}; ONNX requires the same dtype")
    if bzp.shape not in ((), (1,), (n,), (1, n)):
        raise ModelFormatError(f"MatMulInteger node {node.name!r}: its weight zero point must be one value or one "
                               f"per column of the weight {b.shape} (shape (), (1,), ({n},) or (1, {n})), found "
                               f"shape {bzp.shape}")


def _float_input(graph, name: str) -> bool:
    t = graph.tensors.get(name)
    return t is not None and t.dtype == "float32"


def find_core_matmuls(graph, nodes: list[str], threads: int | None = None) -> list[CoreMatMul]:
    """The C-core steps of a partition (``nodes`` in topological order), weights imported."""
    inside = set(nodes)
    steps: list[CoreMatMul] = []
    taken: set[str] = set()

    def only_consumers(tensor: str, allowed: set[str]) -> bool:
        cons = graph.consumers(tensor)
        return bool(cons) and all(c.name in allowed for c in cons) and tensor not in graph.outputs

    for name in nodes:
        node = graph.node(name)
        dom = node.domain if node.domain not in ("ai.onnx",) else ""
        if node.op_type == "MatMulNBits" and dom == "com.microsoft":
            ins = node.inputs + [""] * (6 - len(node.inputs))
            k, n = int(node.attrs.get("K", 0)), int(node.attrs.get("N", 0))
            bits, bs = int(node.attrs.get("bits", 4)), int(node.attrs.get("block_size", 0))
            b, sc = _const(graph, ins[1]), _const(graph, ins[2])
            zp = _const(graph, ins[3])
            bias = _const(graph, ins[5])
            if (bits != 4 or b is None or sc is None or (ins[3] and zp is None) or ins[4]
                    or (ins[5] and bias is None) or not _float_input(graph, ins[0])):
                continue
            if bias is not None and (bias.shape != (n,) or bias.dtype != np.float32):
                # onnxruntime refuses the model (bias shape must be [N], of input A's type): broadcasting it here
                # would answer what onnxruntime never runs
                raise ModelFormatError(f"MatMulNBits node {name!r}: its bias must be float32 of shape ({n},) (N), "
                                       f"found {bias.dtype} of shape {bias.shape}")
            try:
                qt = from_matmul_nbits(b, sc, zp, k=k, n=n, block_size=bs, bits=bits)
            except Exception:
                continue
            steps.append(CoreMatMul("MatMulNBits", ins[0], node.outputs[0], qt, bias, [name], threads))
        elif node.op_type == "MatMul" and dom == "":
            d = graph.producer(node.inputs[1])
            if d is None or d.op_type != "DequantizeLinear" or d.name not in inside:
                continue
            q = _const(graph, d.inputs[0])
            sc = _const(graph, d.inputs[1]) if len(d.inputs) > 1 else None
            zp = _const(graph, d.inputs[2]) if len(d.inputs) > 2 and d.inputs[2] else None
            if q is None or sc is None or q.ndim != 2 or not _float_input(graph, node.inputs[0]):
                continue
            if int(d.attrs.get("block_size", 0) or 0):
                continue  # blocked DequantizeLinear (opset 21): left to onnxruntime
            axis = _dequantize_linear_axis(d, q, sc, zp)
            if axis is False:
                continue
            w = _dequantize(q, sc, zp, axis)  # (K, N)
            claimed = [name]
            steps.append(CoreMatMul("DequantizeLinear+MatMul", node.inputs[0], node.outputs[0], _weight_q8(w), None,
                                    claimed, threads, k=w.shape[0]))
        elif node.op_type == "MatMulInteger" and dom == "":
            ins = node.inputs + [""] * (4 - len(node.inputs))
            dq = graph.producer(ins[0])
            if dq is None or dq.op_type != "DynamicQuantizeLinear" or dq.name not in inside:
                continue
            if ins[2] != dq.outputs[2] or not _float_input(graph, dq.inputs[0]):
                continue
            b = _const(graph, ins[1])
            bzp = _const(graph, ins[3]) if ins[3] else None
            if b is None or b.ndim != 2 or (ins[3] and bzp is None):
                continue
            if bzp is not None:
                _check_b_zero_point(node, b, bzp)
            cons = graph.consumers(node.outputs[0])
            if len(cons) != 1 or cons[0].op_type != "Cast" or int(cons[0].attrs.get("to", 0)) != 1:
                continue
            cast = cons[0]
            cons = graph.consumers(cast.outputs[0])
            if len(cons) != 1 or cons[0].op_type != "Mul" or cons[0].name not in inside:
                continue
            mul = cons[0]
            s = mul.inputs[1] if mul.inputs[0] == cast.outputs[0] else mul.inputs[0]
            smul = graph.producer(s)
            if smul is None or smul.op_type != "Mul" or smul.name not in inside or dq.outputs[1] not in smul.inputs:
                continue
            ws = _const(graph, smul.inputs[1] if smul.inputs[0] == dq.outputs[1] else smul.inputs[0])
            if ws is None or ws.size not in (1, b.shape[1]) or ws.ndim > 2 or (ws.ndim == 2 and ws.shape[0] != 1):
                continue  # not one scale per tensor or per column (a Mul would broadcast it otherwise)
            claimed = [name, cast.name, mul.name]
            if only_consumers(s, {mul.name}):
                claimed.append(smul.name)
            w8 = _int8_weights(b, ws, bzp)
            if w8 is not None:  # exact: onnxruntime's own arithmetic
                steps.append(DynamicInt8MatMul("MatMulInteger", dq.inputs[0], mul.outputs[0], w8, None, claimed,
                                               threads, k=b.shape[0]))
            else:  # weights less their zero point outside int8: the q8_0 float product (budgeted)
                w = _dequantize(b, ws.reshape(-1), None if bzp is None else bzp.reshape(-1), axis=1)
                steps.append(CoreMatMul("MatMulInteger", dq.inputs[0], mul.outputs[0], _weight_q8(w), None, claimed,
                                        threads, k=w.shape[0]))
        else:
            continue
        taken.update(steps[-1].nodes)

    # a DequantizeLinear / DynamicQuantizeLinear whose every output now feeds only claimed nodes is claimed too
    for name in nodes:
        node = graph.node(name)
        if name in taken or node.op_type not in ("DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        outs = [o for o in node.outputs if o]
        used = [o for o in outs if graph.consumers(o)]
        step_inputs = {s.x for s in steps}
        if used and all(only_consumers(o, taken) for o in used) and not any(o in graph.outputs for o in outs) \
                and not step_inputs.intersection(outs):
            owner = next(s for s in steps if any(c.name in s.nodes for o in used for c in graph.consumers(o)))
            owner.nodes.append(name)
            taken.add(name)
    return steps


def chain_nodes(graph, x: str, out: str) -> list[str]:
    """The nodes between tensor ``x`` and tensor ``out``: what onnxruntime would run for one C-core step."""
    seen, stack = set(), [graph.producer(out)]
    while stack:
        n = stack.pop()
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        for i in n.inputs:
            t = graph.tensors.get(i)
            if i and i != x and (t is None or t.initializer is None):
                stack.append(graph.producer(i))
    return [n.name for n in graph.nodes if n.name in seen]


def steps_that_pay(steps: list[CoreMatMul], graph, shapes: Mapping[str, tuple], sess_options) -> list[CoreMatMul]:
    """The steps the C core runs faster than onnxruntime runs the same nodes, timed once at compile time on a
    random input of the bound shape (a step whose input shape is not known yet is kept)."""
    keep = []
    for st in steps:
        shape = shapes.get(st.x)
        if shape is None:
            keep.append(st)
            continue
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        try:
            ref = _StepOnOnnxruntime(graph, st, sess_options)  # the same nodes on onnxruntime
            if ref.inputs != [st.x]:
                keep.append(st)
                continue
            t_ort = median_s(lambda: ref.session.run(None, {st.x: x}))
        except Exception:
            keep.append(st)
            continue
        st.timing = (median_s(lambda: st.compute(x)), t_ort)
        if st.timing[0] < st.timing[1]:
            keep.append(st)
    return keep


class _Segment:
    """An onnxruntime segment of a host partition, with the buffers of the tensors it hands to later steps."""

    def __init__(self, graph, nodes, sess_options, pid, idx):
        ins, outs, _ = graph.boundary(nodes)
        self.nodes = nodes
        model = graph.subgraph_model(nodes, name=f"{graph.name}_p{pid}_s{idx}")
        self.ort = OnnxruntimePartition(model, ins, outs, [CPU], None, sess_options)
        self.inputs, self.outputs = ins, outs


class _StepOnOnnxruntime:
    """A C-core step's own nodes (``chain_nodes``) as an onnxruntime model: what runs a call whose activations hold
    NaN or Inf, which the quantized paths have no code for (the C core reports them: ``NonFiniteError``), so that
    those outputs are onnxruntime's."""

    def __init__(self, graph, step: CoreMatMul, sess_options):
        model = graph.subgraph_model(chain_nodes(graph, step.x, step.out), name=f"{graph.name}_{step.out}_ort")
        self.session = inference_session(model, sess_options)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.out = step.out

    def compute(self, env: Mapping[str, np.ndarray], out: np.ndarray | None) -> np.ndarray:
        (y,) = self.session.run([self.out], {n: env[n] for n in self.inputs})
        if out is None:
            return y
        np.copyto(out, y.reshape(out.shape), casting="no")
        return out


class HostPartition(CompiledPartition):
    """A host partition: C-core steps and onnxruntime segments, run in topological order. Tensors passed between
    steps inside the partition live in buffers kept from the first run (re-made only if a shape changes). A C-core
    call on activations holding NaN or Inf runs that step's nodes on onnxruntime instead (``_StepOnOnnxruntime``,
    made on first need)."""

    def __init__(self, partition, graph, steps: list[CoreMatMul], sess_options):
        self.inputs, self.outputs = list(partition.inputs), list(partition.outputs)
        self.core = steps
        self._graph, self._so = graph, sess_options
        self._on_ort: dict[str, _StepOnOnnxruntime] = {}  # step output -> its nodes on onnxruntime
        anchor = {graph.producer(s.out).name: s for s in steps}  # where the step's output is made
        claimed = {n for s in steps for n in s.nodes}
        pid = getattr(partition, "id", 0)
        self.steps: list[Any] = cut_into_steps(partition.nodes, anchor, claimed,
                                               lambda nodes, i: _Segment(graph, nodes, sess_options, pid, i))
        self._internal: dict[str, np.ndarray] = {}
        self._out_set = set(self.outputs)
        # the whole partition is one onnxruntime model: run() hands the buffers straight to it
        self._whole = self.steps[0].ort if len(self.steps) == 1 and isinstance(self.steps[0], _Segment) else None

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if self._whole is not None:
            self._whole.run(inputs, outputs)
            return
        env = dict(inputs)
        env.update(self._internal)
        env.update(outputs)
        for step in self.steps:
            if isinstance(step, CoreMatMul):
                dst = outputs[step.out] if step.out in self._out_set else None  # straight into the session's buffer
                try:
                    y = step.compute(env[step.x], dst)
                except NonFiniteError:
                    y = self._step_on_ort(step).compute(env, dst)
                if dst is None:
                    env[step.out] = self._internal[step.out] = y
                continue
            outs = {}
            for o in step.outputs:
                buf = outputs.get(o) if o in self._out_set else self._internal.get(o)
                if buf is None:
                    outs = None
                    break
                outs[o] = buf
            if outs is not None:
                try:
                    step.ort.run(env, outs)
                    continue
                except DeviceError:
                    if all(o in self._out_set for o in step.outputs):
                        raise
            res = step.ort.run_alloc(env)  # first run, or an inner shape changed: learn the shapes
            for o, a in res.items():
                if o in self._out_set:
                    np.copyto(outputs[o], a, casting="no")
                else:
                    self._internal[o] = env[o] = a

    def _step_on_ort(self, step: CoreMatMul) -> _StepOnOnnxruntime:
        o = self._on_ort.get(step.out)
        if o is None:
            o = self._on_ort[step.out] = _StepOnOnnxruntime(self._graph, step, self._so)
        return o

    def bound_run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        if self._whole is not None:
            return self._whole.bound_run(inputs, outputs)
        return super().bound_run(inputs, outputs)

    @property
    def allocates_outputs(self) -> bool:  # one onnxruntime model: it allocates what it is handed as None
        return self._whole is not None

    def close(self) -> None:
        for s in self.steps:
            if isinstance(s, _Segment):
                s.ort.close()
        self._on_ort.clear()  # the non-finite fallbacks' onnxruntime sessions


class HostDelegate(Delegate):
    """``options``: ``threads`` (C core and onnxruntime intra-op threads); ``core``: ``"auto"`` (default: a step
    goes to the C core only where it runs faster than onnxruntime runs the same nodes, timed once here on the bound
    shapes in ``options["shapes"]``, and the steps are kept only if the whole partition then runs faster than as
    one onnxruntime model — ``base.faster_of``), True (every step the patterns find), False (none: every node on
    onnxruntime)."""

    @classmethod
    def available(cls, unit: Any = None) -> tuple[bool, str]:
        from .. import native

        return True, f"edgert C core ({native.info()['isa']})"

    def compile(self, partition, graph, unit: Any = None, options: Mapping[str, Any] | None = None):
        if getattr(graph.source, "format", None) == "tflite":  # C core + LiteRT segments (host_tflite.py)
            from .host_tflite import compile_host_tflite

            return compile_host_tflite(partition, graph, unit, options)
        options = dict(options or {})
        dopts = dict(getattr(unit, "delegate_options", None) or {})
        threads = options.get("threads") or dopts.get("threads")
        core = options.get("core", "auto")
        steps = find_core_matmuls(graph, list(partition.nodes), threads) if core else []
        if steps and core == "auto":
            timing_so = _no_spinning(session_options(None, threads))  # as the segments will run
            steps = steps_that_pay(steps, graph, options.get("shapes") or {}, timing_so)
        # between C-core steps, onnxruntime segments must not leave their intra-op threads spinning: on a small
        # machine they take the cores edgert's pool needs for the step that follows (measured on 2 cores: rec int8's
        # C-core steps 87 ms in all with spinning threads, 1.6 ms without). Without C-core steps, onnxruntime's own
        # defaults (a one-partition plan runs exactly as plain onnxruntime)
        so = _no_spinning(session_options(None, threads)) if steps else session_options(None, threads)
        compiled = HostPartition(partition, graph, steps, so)
        if not (steps and core == "auto"):
            return compiled
        specs = _bound_specs(graph, [*partition.inputs, *partition.outputs], options.get("shapes") or {})
        if specs is not None:
            # each kept step ran faster alone; the partition as a whole may not (the cuts cost onnxruntime its
            # fusions and a call per segment): keep the steps only if the whole partition is faster with them
            plain = HostPartition(partition, graph, [], session_options(None, threads))
            try:
                return faster_of(compiled, plain, specs)
            except Exception:  # a partition that cannot run on zeros: keep what the per-step timing chose
                plain.close()
        return compiled


def _bound_specs(graph, names, shapes: Mapping[str, tuple]) -> dict | None:
    """name -> (shape, dtype) for ``names`` with the session's bound shapes; None when one is unknown."""
    out = {}
    for n in names:
        t = graph.tensors.get(n)
        shape = shapes.get(n) or (None if t is None else t.concrete_shape())
        if t is None or t.dtype is None or shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
            return None
        out[n] = (tuple(shape), np.dtype(t.dtype))
    return out


def _no_spinning(so):
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


register("host", HostDelegate)
