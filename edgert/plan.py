"""The partitioner: which compute unit of a device runs each node of a graph, and what crosses the link.

``plan(model, device=...)`` works in four steps (docs/partitioning.md has the reasoning):

1. capability — every node goes to the first accelerator unit of the profile that can run it (op, dtypes, static
   shapes, memory), else to the host unit; the reason for each refusal is kept. With ``fallback="forbid"`` a node
   no accelerator can run is an error, raised here, before anything runs.
2. islands — maximal connected groups of nodes on the same unit whose contraction leaves the graph acyclic.
3. copy-aware — a device island whose transfers over the link cost more than the compute it saves goes back to the
   host; a host island between device islands moves onto the device when that is allowed and cheaper; then
   ``min_nodes_per_partition`` and ``max_partitions`` are enforced (the latter first joins independent islands of
   one unit, which no path links). When one unit runs every node, its independent islands are joined too.
4. the ``Plan``: partitions in execution order, every transfer (tensor, bytes, direction), estimates per inference.

The cost model (``node_ops``, ``Plan.estimates``) is deliberately simple: compute = ops / throughput of the unit for
the node's compute dtype, a transfer = link latency + bytes / bandwidth (latency only on a zero-copy link),
partitions run one after another. It ranks placements; it does not promise wall-clock times.

This module must not import from the layers above it (delegates, session, cli, serve) and never runs a model.
"""
from __future__ import annotations

import heapq
import html
import json
import math
import operator
import re
import sys
import types
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from .errors import InvalidArgumentError, UnsupportedOpError
from .graph.ir import DTYPE_BITS, Graph, Node

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
FALLBACKS = ("allow", "forbid")

# ops that only relabel a buffer (no arithmetic worth counting)
_FREE_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Size", "Constant",
                       "ConstantOfShape"})
# ops whose cost per output element is more than one operation (transcendentals, normalisations)
_OPS_PER_ELEMENT = {"Softmax": 5.0, "LogSoftmax": 5.0, "Sigmoid": 4.0, "Tanh": 4.0, "Erf": 4.0, "Gelu": 8.0,
                    "Exp": 4.0, "Log": 4.0, "LayerNormalization": 8.0, "InstanceNormalization": 8.0,
                    "BatchNormalization": 2.0, "HardSwish": 3.0, "QLinearSigmoid": 4.0, "QLinearSoftmax": 5.0}
_MATMUL_OPS = frozenset({"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul"})
_CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1, "NhwcConv": 1}  # op -> weight input
_INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QLinearAdd",
                          "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
                          "QLinearGlobalAveragePool", "QLinearSoftmax", "QLinearConcat"})
DEFAULT_THROUGHPUT = 1e9  # ops/s assumed for a unit whose profile gives no figure at all
# delegates that keep tensors resident on their device between partitions (a tensor produced by one partition of
# such a unit and read by a later partition of the same unit crosses no link). delegates.base.register keeps this in
# step with each delegate class's ``keeps_tensors_resident`` flag; seeded here so a plan made without importing the
# delegates is the same plan.
RESIDENT_DELEGATES: set[str] = {"serial-npu"}
# what a node costs such a device beyond its tensors, for planning (the exact count is the delegate's, at compile):
# its share of its graph blob's tables (a header, a record per tensor and per node; weights padded as packed)
RESIDENT_NODE_BYTES = 128


def _arena_bytes(nbytes: int) -> int:
    """An allocation of ``nbytes`` in a device arena of 8-byte blocks (the reference firmware's arena.c)."""
    return max((int(nbytes) + 7) & ~7, 8)


_EPS = 1e-12


# ---- results --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    """A maximal group of nodes run by one delegate on one unit. ``nodes`` are in the graph's topological order;
    ``inputs`` are the non-initializer tensors it reads from outside (graph inputs or other partitions' outputs),
    ``outputs`` the tensors it produces that another partition reads or that are graph outputs, ``initializers``
    the weights it needs resident (uploaded once, not per inference). ``ops`` and ``compute_s`` are estimates."""

    id: int
    unit: str
    delegate: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    initializers: list[str] = field(default_factory=list)
    ops: float = 0.0
    compute_s: float = 0.0

    def to_dict(self) -> dict:
        return {"id": self.id, "unit": self.unit, "delegate": self.delegate, "nodes": list(self.nodes),
                "inputs": list(self.inputs), "outputs": list(self.outputs), "initializers": list(self.initializers),
                "ops": self.ops, "compute_s": self.compute_s}


@dataclass(frozen=True)
class Transfer:
    """One copy over a unit's link per inference. ``direction`` is ``"to_device"`` (host memory -> ``dst`` unit) or
    ``"to_host"`` (``src`` unit -> host memory); ``src``/``dst`` are unit names. ``src_partition`` is the producing
    partition's id (None for a graph input), ``dst_partition`` the consuming partition's id (None when the tensor
    is copied back only to be a graph output or to feed the host). ``seconds`` is the link's cost estimate."""

    tensor: str
    nbytes: int
    src: str
    dst: str
    direction: str
    link: Any
    src_partition: int | None = None
    dst_partition: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "nbytes": self.nbytes, "src": self.src, "dst": self.dst,
                "direction": self.direction, "link": _link_kind(self.link), "src_partition": self.src_partition,
                "dst_partition": self.dst_partition, "seconds": self.seconds}


@dataclass
class Plan:
    """Where each node runs and what crosses a link, for one graph on one device profile.

    ``partitions`` in execution order; ``transfers`` in execution order; ``assignment`` node -> unit name;
    ``reasons`` node -> why it is not on an accelerator (every such node has one); ``estimates`` per inference:
    ``latency_s``, ``compute_s``, ``transfer_s``, ``bytes_to_device``, ``bytes_to_host``, ``energy_j``,
    ``cost_usd``. ``assumed`` lists what the estimates had to guess (unbound dims counted as 1, unknown dtypes)."""

    graph: Graph
    profile: Any
    partitions: list[Partition]
    transfers: list[Transfer]
    assignment: dict[str, str]
    reasons: dict[str, str]
    estimates: dict[str, float]
    fallback: str = "allow"
    dims: dict[str, int] = field(default_factory=dict)
    assumed: list[str] = field(default_factory=list)

    # ---- lookups used by sessions ------------------------------------------------------------------------
    def unit(self, name: str):
        """The profile's ComputeUnit called ``name`` (its delegate options, link, ...)."""
        for u in self.profile.units:
            if u.name == name:
                return u
        raise InvalidArgumentError(f"device {self.profile.name!r} has no unit {name!r}; its units are "
                                   f"{[u.name for u in self.profile.units]}")

    def partition_of(self, node_name: str) -> Partition:
        for p in self.partitions:
            if node_name in p.nodes:
                return p
        raise InvalidArgumentError(f"node {node_name!r} is in no partition of this plan")

    def transfers_into(self, partition_id: int) -> list[Transfer]:
        return [t for t in self.transfers if t.dst_partition == partition_id]

    def transfers_out_of(self, partition_id: int) -> list[Transfer]:
        return [t for t in self.transfers if t.src_partition == partition_id and t.direction == "to_host"]

    @property
    def host_unit(self) -> str:
        return _host_unit(self.profile).name

    # ---- renderings ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "model": self.graph.name, "device": self.profile.name, "fallback": self.fallback, "dims": self.dims,
            "partitions": [p.to_dict() for p in self.partitions],
            "transfers": [t.to_dict() for t in self.transfers],
            "assignment": dict(self.assignment), "reasons": dict(self.reasons),
            "estimates": dict(self.estimates), "assumed": list(self.assumed), "pruned": list(self.graph.pruned),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table(self) -> str:
        """The placement table, the copy points and the estimates, as plain text for a terminal."""
        g, lines = self.graph, []
        part_of = {n: p.id for p in self.partitions for n in p.nodes}
        lines.append(f"plan: {g.name!r} on {self.profile.name!r} ({len(g.nodes)} nodes, {len(self.partitions)} "
                     f"partitions, fallback={self.fallback})")
        if g.pruned:
            lines.append(f"dropped {len(g.pruned)} node(s) no graph output depends on: {_names(g.pruned, 8)}")
        lines.append("")
        lines.append("partitions")
        lines.append(_columns(["#", "unit", "delegate", "nodes", "ops", "compute", "inputs", "outputs"],
                              [[str(p.id), p.unit, p.delegate, str(len(p.nodes)), _si(p.ops), _secs(p.compute_s),
                                _names(p.inputs), _names(p.outputs)] for p in self.partitions]))
        lines.append("")
        lines.append("placement")
        rows = []
        for n in g.nodes:
            rows.append([n.name, n.qualified_op, self.assignment[n.name], str(part_of[n.name]),
                         self.reasons.get(n.name, "")])
        lines.append(_columns(["node", "op", "unit", "part", "why not on an accelerator"], rows))
        lines.append("")
        lines.append("copy points")
        if self.transfers:
            unit_of = {q.id: q.unit for q in self.partitions}
            lines.append(_columns(["tensor", "bytes", "direction", "from", "to", "link", "time"],
                                  [[t.tensor, str(t.nbytes), t.direction, _endpoint(t.src, t.src_partition, unit_of),
                                    _endpoint(t.dst, t.dst_partition, unit_of), _link_kind(t.link), _secs(t.seconds)]
                                   for t in self.transfers]))
        else:
            lines.append("  none (the whole graph runs on one unit without a link)")
        lines.append("")
        lines.append("estimates per inference")
        e = self.estimates
        est = [["latency", _secs(e["latency_s"])], ["compute", _secs(e["compute_s"])],
               ["transfers", _secs(e["transfer_s"])], ["bytes to device", str(e["bytes_to_device"])],
               ["bytes to host", str(e["bytes_to_host"])],
               ["energy", "n/a" if e["energy_j"] is None else f"{e['energy_j']:.4g} J"],
               ["cost", "n/a" if e["cost_usd"] is None else f"${e['cost_usd']:.3g}"]]
        lines.append(_columns(["", ""], est, header=False))
        if self.assumed:
            lines.append("")
            lines.append("assumed: " + "; ".join(self.assumed))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dot(self) -> str:
        """Graphviz source: one cluster per partition, coloured by delegate; transfers drawn red and labelled with
        their bytes; graph inputs and outputs as plain ellipses."""
        colours = _delegate_colours(self.partitions)
        out = [f"digraph {_dot_id(self.graph.name or 'graph')} {{", "  rankdir=TB;",
               '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
               '  edge [fontname="Helvetica", fontsize=9];']
        for p in self.partitions:
            out.append(f"  subgraph cluster_p{p.id} {{")
            out.append(f'    label={_dot_str(f"#{p.id} {p.unit} ({p.delegate})")}; style="rounded,dashed"; '
                       f'color="{colours[p.delegate]}";')
            for n in p.nodes:
                node = self.graph.node(n)
                label = _dot_str(n + "\\n" + node.qualified_op)
                out.append(f'    {_dot_id("n:" + n)} [label={label}, '
                           f'fillcolor="{colours[p.delegate]}"];')
            out.append("  }")
        for name in self.graph.inputs:
            out.append(f'  {_dot_id("t:" + name)} [label={_dot_str(name)}, shape=ellipse, style=solid];')
        for name in self.graph.outputs:
            out.append(f'  {_dot_id("o:" + name)} [label={_dot_str(name)}, shape=ellipse, style=solid];')
        crossing = {(t.tensor, t.dst_partition) for t in self.transfers if t.direction == "to_device"}
        back = {t.tensor for t in self.transfers if t.direction == "to_host"}
        part_of = {n: p.id for p in self.partitions for n in p.nodes}
        for a, b, tensor in _edges(self.graph):
            src = _dot_id("n:" + a) if a is not None else _dot_id("t:" + tensor)
            dst = _dot_id("n:" + b) if b is not None else _dot_id("o:" + tensor)
            copied = ((b is not None and (tensor, part_of[b]) in crossing)
                      or (a is not None and tensor in back and (b is None or part_of[b] != part_of[a])))
            if copied:
                nbytes = next(t.nbytes for t in self.transfers if t.tensor == tensor)
                out.append(f'  {src} -> {dst} [label={_dot_str(f"{tensor} ({_bytes(nbytes)})")}, color=red, '
                           'fontcolor=red, penwidth=2];')
            else:
                out.append(f"  {src} -> {dst} [label={_dot_str(tensor)}];")
        out.append("}")
        return "\n".join(out) + "\n"

    def to_svg(self, path=None) -> str:
        """An SVG drawing of the partitioned graph (nodes coloured by delegate, transfers in red with their bytes),
        laid out here without Graphviz. Written to ``path`` when given; returned either way."""
        svg = _svg(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(svg)
        return svg


# ---- the cost model -------------------------------------------------------------------------------------------
def _dims_of(graph: Graph, name: str, dims: Mapping[str, int], assumed: set | None) -> tuple[int, ...]:
    """The tensor's shape with bound dims filled in and anything else counted as 1 (noted in ``assumed``)."""
    t = graph.tensors.get(name)
    if t is None or t.shape is None:
        if assumed is not None:
            assumed.add(f"rank of {name!r} unknown: counted as a scalar")
        return ()
    out = []
    for d in t.shape:
        if isinstance(d, str):
            v = dims.get(d)
            if v is None and assumed is not None:
                assumed.add(f"dim {d!r} unbound: counted as 1")
            out.append(1 if v is None else int(v))
        elif isinstance(d, int):
            out.append(d)
        else:
            if assumed is not None:
                assumed.add(f"an unknown dim of {name!r}: counted as 1")
            out.append(1)
    return tuple(out)


def tensor_nbytes(graph: Graph, name: str, dims: Mapping[str, int] | None = None, assumed: set | None = None) -> int:
    """Bytes of a tensor's data: elements x dtype size, with dims bound from ``dims``. Unknown dims count as 1 and an
    unknown dtype as 4 bytes; both are recorded in ``assumed`` so a plan can say its numbers are a floor."""
    dims = dims or {}
    t = graph.tensors.get(name)
    if t is not None:
        exact = t.nbytes(dims)
        if exact is not None:
            return int(exact)
    bits = DTYPE_BITS.get((t.dtype if t is not None else None) or "")
    if bits is None:
        bits = 32
        if assumed is not None:
            assumed.add(f"dtype of {name!r} unknown: counted as 4 bytes")
    return (math.prod(_dims_of(graph, name, dims, assumed)) * bits + 7) // 8


def node_ops(node: Node, graph: Graph, dims: Mapping[str, int] | None = None, assumed: set | None = None) -> float:
    """Arithmetic operations one run of ``node`` does (a multiply-add counts 2). MatMul-like ops: 2*M*K*N over the
    batch; convolutions: 2 * output elements * (input channels per group * kernel size); control flow: the costlier
    branch of an If, the body times the trip count (when constant) of a Loop, the body once per step of a Scan
    (estimated as one); ops that only relabel buffers: 0; everything else: output elements (times a small factor for
    transcendentals). Unknown dims count as 1."""
    dims = dims or {}
    op = node.op_type

    def shape(i: int, outputs: bool = False) -> tuple[int, ...]:
        names = node.outputs if outputs else node.inputs
        return _dims_of(graph, names[i], dims, assumed) if i < len(names) and names[i] else ()

    out_elems = max([math.prod(_dims_of(graph, o, dims, assumed)) for o in node.outputs if o] or [0])
    if op in CONTROL_FLOW_OPS:
        scoped = [body.in_scope(graph) for body in node.subgraphs.values()]  # bodies read outer values too
        bodies = [sum(node_ops(n, body, dims, assumed) for n in body.nodes) for body in scoped]
        if op == "If":
            return float(max(bodies or [0.0]))
        trips = 1.0
        if op == "Loop" and node.inputs and node.inputs[0]:
            t = graph.tensors.get(node.inputs[0])
            if t is not None and t.initializer is not None and t.initializer.size == 1:
                trips = float(max(int(t.initializer.reshape(-1)[0]), 0))
        return trips * float(sum(bodies))
    if op in _FREE_OPS:
        return 0.0
    if op in _MATMUL_OPS:
        a = shape(0)
        k = a[-1] if a else 1
        return 2.0 * out_elems * k
    if op == "Gemm":
        a = shape(0)
        k = (a[0] if node.attrs.get("transA", 0) else a[-1]) if len(a) == 2 else 1
        return 2.0 * out_elems * k
    if op == "MatMulNBits":
        return 2.0 * out_elems * int(node.attrs.get("K", 1))
    if op in _CONV_OPS:
        w = shape(_CONV_OPS[op])
        if node.attrs.get("tflite_op") == "DEPTHWISE_CONV_2D" and len(w) == 4:
            return 2.0 * out_elems * w[1] * w[2]  # filter (1, kh, kw, C * multiplier): one input channel an output
        return 2.0 * out_elems * (math.prod(w[1:]) if len(w) > 1 else 1)  # ONNX (O, I/group, kh, kw); TFLite OHWI
    if op == "ConvTranspose":
        w = shape(1)
        if node.attrs.get("tflite_op") == "TRANSPOSE_CONV":  # (output shape, w (O, kh, kw, I), x)
            return 2.0 * math.prod(shape(2)) * (math.prod(w[:3]) if len(w) == 4 else 1)
        return 2.0 * math.prod(shape(0)) * (math.prod(w[1:]) if len(w) > 1 else 1)
    if op in ("MaxPool", "AveragePool", "QLinearAveragePool", "LpPool"):
        return float(out_elems * math.prod(node.attrs.get("kernel_shape", [1])))
    if op.startswith("Reduce") or op in ("GlobalAveragePool", "GlobalMaxPool", "QLinearGlobalAveragePool",
                                         "ArgMax", "ArgMin"):
        return float(max(math.prod(shape(0)), out_elems))
    return float(out_elems) * _OPS_PER_ELEMENT.get(op, 1.0)


def compute_dtype(node: Node, graph: Graph) -> str:
    """The dtype a node's arithmetic runs in, for picking a throughput figure: the integer input of integer ops,
    ``int4`` for MatMulNBits, the quantized type behind a DequantizeLinear feeding a float op (a QDQ model's MatMul
    runs in int8 on an accelerator), else the first data input's dtype (or the first output's)."""
    if node.op_type == "MatMulNBits":
        return "int4"
    data = node.data_inputs()
    if node.op_type in _INTEGER_OPS or node.op_type in ("QuantizeLinear",):
        names = data or node.inputs
    else:
        names = data
    for name in names:
        p = graph.producer(name)
        if p is not None and p.op_type == "DequantizeLinear" and p.inputs:
            t = graph.tensors.get(p.inputs[0])
            if t is not None and t.dtype:
                return t.dtype
        t = graph.tensors.get(name)
        if t is not None and t.dtype:
            return t.dtype
    for name in node.outputs:
        t = graph.tensors.get(name)
        if t is not None and t.dtype:
            return t.dtype
    return "float32"


def unit_throughput(unit, dtype: str) -> float:
    """Ops/s of ``unit`` for ``dtype``: the profile's figure, else the closest family member (int4/uint8 -> int8,
    bfloat16 -> float16 -> float32), else the unit's slowest figure, else DEFAULT_THROUGHPUT."""
    figures = dict(getattr(unit, "throughput", None) or {})
    if not figures:
        return DEFAULT_THROUGHPUT
    family = {"int4": ["int8", "uint8"], "uint4": ["uint8", "int8"], "uint8": ["int8"], "int8": ["uint8"],
              "int16": ["int8"], "bfloat16": ["float16", "float32"], "float16": ["bfloat16", "float32"],
              "float64": ["float32"]}
    for name in [dtype, *family.get(dtype, []), "float32"]:
        if figures.get(name):
            return float(figures[name])
    return float(min(v for v in figures.values() if v) or DEFAULT_THROUGHPUT)


def link_seconds(link, nbytes: int) -> float:
    """Seconds to move ``nbytes`` over ``link`` (0 without a link)."""
    if link is None:
        return 0.0
    if hasattr(link, "transfer_s"):
        return float(link.transfer_s(nbytes))
    lat = float(getattr(link, "latency_s", 0.0) or 0.0)
    if getattr(link, "zero_copy", False):
        return lat
    bw = getattr(link, "bandwidth_bytes_s", None)
    return lat + (nbytes / float(bw) if bw else 0.0)


# ---- profile access -------------------------------------------------------------------------------------------
def _host_unit(profile):
    """The unit that runs whatever no accelerator takes: the profile's ``host_unit`` (the first unit driven by the
    ``host`` delegate), else the first unit without a link."""
    unit = getattr(profile, "host_unit", None)
    if unit is not None:
        return unit
    for u in profile.units:
        if getattr(u, "link", None) is None:
            return u
    raise InvalidArgumentError(f"device profile {profile.name!r} has no host unit (a unit without a link); every "
                               "profile needs one to run what the accelerators cannot")


def _resolve_profile(device):
    if isinstance(device, str) or hasattr(device, "__fspath__"):
        from . import profiles

        return profiles.load(device)
    if device is None:
        from . import profiles

        return profiles.load("host")
    if not hasattr(device, "units"):
        raise InvalidArgumentError(f"device must be a profile name, a path to a profile TOML or a DeviceProfile; "
                                   f"got {type(device).__name__}")
    return device


def _resolve_graph(model, dims: Mapping[str, int] | None) -> Graph:
    if isinstance(model, Graph):
        graph = model
        if dims and hasattr(graph.source, "graph"):
            graph = graph.bind(dims)
        return graph
    from .formats.onnx import load_onnx
    from .formats.tflite import is_tflite_bytes, is_tflite_path, load_tflite

    if hasattr(model, "__fspath__"):
        model = str(model)
    if is_tflite_path(model) or (isinstance(model, (bytes, bytearray)) and is_tflite_bytes(model[:8])):
        return load_tflite(model, dims=dict(dims) if dims else None)
    # free dims named as a Session names them (``<input>_<axis>``), so the dims one binds the other binds too
    return load_onnx(model, dims=dict(dims) if dims else None, name_free_dims=True)


# ---- step 1: capability ---------------------------------------------------------------------------------------
def _unit_check(unit, node: Node, view: Graph, dims: Mapping[str, int]) -> tuple[bool, str]:
    """Can ``unit`` run ``node``? The unit's own check (op, dtypes, rank, static shapes with ``dims`` bound), asked
    on the quantized view of the graph (``quantized_view``) so that a QDQ model's int8 core is seen as int8. A node
    that reads or writes a sequence (map, optional) stays on the host: only tensors cross between partitions."""
    other = view.non_tensors(t for t in (*node.all_inputs(), *node.outputs) if t)
    if other:
        return False, f"{unit.name}: value {other[0]} has type {view.tensors[other[0]].value_type}: host only"
    ok, reason = unit.supports(node, view, dims)
    if not ok:
        return False, f"{unit.name}: {reason}" if reason else f"{unit.name} cannot run {node.qualified_op}"
    return True, ""


def quantized_view(graph: Graph) -> Graph:
    """The graph as an int8 accelerator sees a QDQ model: a float tensor between a DequantizeLinear and an op that
    is wrapped in Q/DQ (every float data input comes from a DequantizeLinear, every output goes only into
    QuantizeLinear nodes) carries the quantized dtype, and so does the wrapped op's output. Tensors at the edges
    (a QuantizeLinear fed by a float graph input, a DequantizeLinear producing a graph output or feeding a float
    op) keep their float dtype, so those Q/DQ nodes stay where float runs. Only dtypes change; used for capability
    checks, never for execution."""
    outputs = set(graph.outputs)

    def float_dtype(name: str) -> bool:
        t = graph.tensors.get(name)
        return t is not None and t.dtype in ("float32", "float16", "bfloat16", "float64")

    wrapped: set[str] = set()
    relabel: dict[str, str] = {}
    for node in graph.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.subgraphs:
            continue
        ins, folded = {}, []
        ok = True
        for x in node.data_inputs():
            if not float_dtype(x):
                continue
            p = graph.producer(x)
            src = graph.tensors.get(p.inputs[0]) if p is not None and p.op_type == "DequantizeLinear" else None
            if src is None or not src.dtype:
                ok = False
                break
            if src.initializer is not None:
                folded.append(x)  # a weight or an int32 bias: part of the int8 op itself (int32 accumulation)
            else:
                ins[x] = src.dtype
        act = next(iter(ins.values()), None)
        for x in folded:
            ins[x] = act or graph.tensors[graph.producer(x).inputs[0]].dtype
        outs = {}
        for o in node.outputs:
            if not o or not float_dtype(o):
                continue
            cons = graph.consumers(o)
            if o in outputs or not cons or any(c.op_type != "QuantizeLinear" for c in cons):
                ok = False
                break
            q = graph.tensors.get(cons[0].outputs[0])
            if q is None or not q.dtype:
                ok = False
                break
            outs[o] = q.dtype
        if ok and (ins or outs):
            wrapped.add(node.name)
            relabel.update(ins)
            relabel.update(outs)
    # a DQ output read by anything that is not wrapped (or returned to the caller) is real float data
    for x in list(relabel):
        p = graph.producer(x)
        if p is not None and p.op_type == "DequantizeLinear":
            if x in outputs or any(c.name not in wrapped for c in graph.consumers(x)):
                relabel.pop(x)
    if not relabel:
        return graph
    tensors = dict(graph.tensors)
    for x, dtype in relabel.items():
        tensors[x] = replace(tensors[x], dtype=dtype)
    return graph.replace(tensors=tensors)


def _node_weight_bytes(node: Node, graph: Graph) -> int:
    total = 0
    for name in node.all_inputs():
        t = graph.tensors.get(name)
        if t is not None and t.initializer is not None:
            total += int(t.initializer.nbytes)
    return total


def assign_by_capability(graph: Graph, profile, dims: Mapping[str, int] | None = None, checks: dict | None = None):
    """Step 1. Returns (assignment: node -> unit name, capable: node -> set of accelerator unit names that can run
    it, reasons: node -> why no accelerator runs it). Accelerators are tried in the profile's order; memory is a
    per-unit budget for resident weights (and, on a unit whose delegate keeps tensors resident, every tensor its
    nodes read and make), filled in graph order (a node that would overflow it goes elsewhere)."""
    dims = dict(dims or {})
    host = _host_unit(profile)
    accels = [u for u in profile.units if u is not host]
    used = {u.name: 0 for u in accels}
    held = {u.name: set() for u in accels}  # tensors counted in ``used`` of a unit that keeps them resident
    view = quantized_view(graph)
    assignment: dict[str, str] = {}
    capable: dict[str, set[str]] = {}
    reasons: dict[str, str] = {}
    for node in graph.nodes:
        refusals = []
        capable[node.name] = set()
        chosen = None
        for u in accels:
            ok, why = _unit_check(u, node, view, dims)
            if checks is not None:  # each accelerator's (ok, why) for the node, for the caller to read
                checks.setdefault(node.name, []).append((ok, why))
            if not ok:
                refusals.append(why)
                continue
            mem = getattr(u, "memory_bytes", None) or None  # 0: not published, so no limit to plan with
            resident = getattr(u, "delegate", None) in RESIDENT_DELEGATES
            need = _node_weight_bytes(node, graph)
            acts = {n: tensor_nbytes(graph, n, dims) for n in [*node.data_inputs(), *node.outputs]
                    if n and graph.tensors.get(n) is not None and graph.tensors[n].initializer is None}
            if resident:  # an arena's blocks: 8-byte units, and the node's records in its graph's blob
                need = _arena_bytes(need) + RESIDENT_NODE_BYTES
                acts = {n: _arena_bytes(b) for n, b in acts.items()}
            io = sum(acts.values())
            # a unit that keeps tensors resident (the serial NPU's arena) holds every tensor its graphs read and
            # make, with their weights, at once: they count against its memory like weights (each once)
            new = sum(b for n, b in acts.items() if n not in held[u.name]) if resident else 0
            if mem is not None and (need + io > mem or used[u.name] + need + new > mem):
                kept = f" ({_bytes(new)} of them more tensors for the device to hold)" if new else ""
                refusals.append(f"{u.name} memory: node needs {_bytes(need)} of weights + {_bytes(io)} of "
                                f"activations{kept}, {_bytes(max(mem - used[u.name], 0))} of {_bytes(mem)} left")
                continue
            capable[node.name].add(u.name)
            if chosen is None:
                chosen = u
                used[u.name] += need + new
                if new:
                    held[u.name].update(acts)
        if chosen is None:
            assignment[node.name] = host.name
            reasons[node.name] = "; ".join(refusals) if refusals else (
                f"device {profile.name!r} has no accelerator unit: everything runs on {host.name}")
        else:
            assignment[node.name] = chosen.name
    # constant nodes (a weight's DequantizeLinear, a Constant) are evaluated once when a partition is prepared:
    # they follow their consumers rather than being judged alone (an int8 engine never sees the float weight)
    outputs = set(graph.outputs)
    for node in reversed(graph.nodes):
        if not is_constant_node(node, graph) or any(o in outputs for o in node.outputs):
            continue
        readers = {assignment[c.name] for o in node.outputs if o for c in graph.consumers(o)}
        if len(readers) != 1:
            continue
        unit = readers.pop()
        assignment[node.name] = unit
        capable[node.name] = {u.name for u in accels}
        if unit == host.name:
            reasons[node.name] = f"constant node: prepared with its consumers on {host.name}"
        else:
            reasons.pop(node.name, None)
    return assignment, capable, reasons


def is_constant_node(node: Node, graph: Graph) -> bool:
    """True for a node that reads only initializers (or nothing): its value is fixed before any inference."""
    if node.subgraphs:
        return False
    for x in node.all_inputs():
        t = graph.tensors.get(x)
        if t is None or t.initializer is None:
            return False
    return True


# ---- step 2: islands ------------------------------------------------------------------------------------------
class _Topology:
    """Node-index adjacency of a graph (edges through data, including control-flow nodes' implicit inputs)."""

    def __init__(self, graph: Graph):
        self.names = [n.name for n in graph.nodes]
        self.index = {n: i for i, n in enumerate(self.names)}
        producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}
        self.preds: list[set[int]] = []
        for i, n in enumerate(graph.nodes):
            self.preds.append({producer[x] for x in n.all_inputs() if x in producer and producer[x] != i})


def find_islands(topo: _Topology, units: Sequence[str], join_independent: bool = False) -> list[list[int]]:
    """Step 2. Group node indices into maximal connected same-unit islands such that contracting every island to a
    single vertex leaves the graph acyclic; returns islands in execution order, each in topological order.

    Nodes are visited in topological order; a node joins (and so merges) the islands of its same-unit producers,
    except those whose merge would close a cycle in the island graph (checked by reachability).
    ``join_independent``: then also merge islands of one unit that no path joins, either way, through the island
    graph (independent branches: ``_join_independent``)."""
    n = len(units)
    group_of = [-1] * n
    members: dict[int, list[int]] = {}
    gunit: dict[int, str] = {}
    succ: dict[int, set[int]] = {}
    next_id = 0

    def closes_cycle(merge: set[int], pred_groups: set[int]) -> bool:
        # after merging, a path leaving the merged island must never come back to it (or reach a producer island
        # of the new node, which will point into it). Edges between the merged islands themselves are fine; an edge
        # from outside back into any of them is the cycle, so it is tested before the merged islands are skipped.
        targets = merge | pred_groups
        stack = [s for g in merge for s in succ[g] if s not in merge]
        seen = set(stack)
        while stack:
            g = stack.pop()
            if g in targets:
                return True
            for s in succ[g]:
                if s in targets:
                    return True
                if s not in seen:
                    seen.add(s)
                    stack.append(s)
        return False

    for v in range(n):
        u = units[v]
        pred_groups = {group_of[p] for p in topo.preds[v]}
        cands = sorted((g for g in pred_groups if gunit[g] == u), key=lambda g: (-len(members[g]), g))
        chosen: list[int] = []
        for g in cands:
            trial = set(chosen) | {g}
            if not closes_cycle(trial, pred_groups - trial):
                chosen.append(g)
        if chosen:
            target = min(chosen)
            for g in chosen:
                if g != target:
                    _merge_island(g, target, members, gunit, succ)
            for m in members[target]:
                group_of[m] = target
        else:
            target = next_id
            next_id += 1
            members[target], gunit[target], succ[target] = [], u, set()
        members[target].append(v)
        group_of[v] = target
        for p in topo.preds[v]:
            if group_of[p] != target:
                succ[group_of[p]].add(target)

    if join_independent:
        _join_independent(members, gunit, succ)

    # execution order: a topological order of the island graph, earliest first node first among the ready ones
    indeg = {g: 0 for g in members}
    for g, ss in succ.items():
        for s in ss:
            indeg[s] += 1
    ready = [(min(members[g]), g) for g, d in indeg.items() if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, g = heapq.heappop(ready)
        order.append(g)
        for s in succ[g]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(ready, (min(members[s]), s))
    if len(order) != len(members):  # pragma: no cover - the merge rule above guarantees this never happens
        raise AssertionError("partitioner produced a cyclic island graph")
    return [sorted(members[g]) for g in order]


def _merge_island(g: int, into: int, members: dict[int, list[int]], gunit: dict[int, str],
                  succ: dict[int, set[int]]) -> None:
    """Contract island ``g`` into island ``into`` (in place): its nodes and its edges either way become ``into``'s,
    an edge between the two is dropped (no island is its own successor)."""
    members[into].extend(members.pop(g))
    succ[into] |= succ.pop(g)
    gunit.pop(g)
    for other in succ.values():
        if g in other:
            other.discard(g)
            other.add(into)
    succ[into].discard(into)


def _join_independent(members: dict[int, list[int]], gunit: dict[int, str], succ: dict[int, set[int]]) -> None:
    """Merge (in place) islands of one unit between which the island graph has no path either way: contracting two
    such islands cannot close a cycle, and it costs nothing (same compute; a device tensor both read is copied once).
    Islands are taken in order of their first node and each joins the first earlier one of its unit it is
    independent of. A merge adds paths between other islands (two merges each valid alone can together close a
    cycle), so the reachability is updated after each one; merges only add paths, so one pass finds them all."""
    indeg = {g: 0 for g in members}
    for ss in succ.values():
        for t in ss:
            indeg[t] += 1
    topo = [g for g, d in indeg.items() if d == 0]
    for g in topo:  # Kahn's order of the island graph (appended to while walked)
        for t in succ[g]:
            indeg[t] -= 1
            if indeg[t] == 0:
                topo.append(t)
    reach: dict[int, set[int]] = {}  # island -> the islands a path from it reaches
    for g in reversed(topo):
        r = set(succ[g])
        for t in succ[g]:
            r |= reach[t]
        reach[g] = r
    order = sorted(members, key=lambda g: min(members[g]))
    kept: list[int] = []
    for g in order:
        h = next((h for h in kept if gunit[h] == gunit[g] and g not in reach[h] and h not in reach[g]), None)
        if h is None:
            kept.append(g)
            continue
        _merge_island(g, h, members, gunit, succ)
        merged = reach[h] | reach.pop(g)
        reach[h] = merged
        for r in reach.values():
            if g in r or h in r:
                r.discard(g)
                r.add(h)
                r |= merged


# ---- step 3: copy-aware costing -------------------------------------------------------------------------------
class CostModel:
    """Everything the copy-aware search evaluates repeatedly, precomputed once: per-node time on each unit, tensor
    sizes, producers and consumers by node index."""

    def __init__(self, graph: Graph, profile, dims: Mapping[str, int]):
        self.graph, self.profile, self.dims = graph, profile, dict(dims)
        self.topo = _Topology(graph)
        self.join_independent = False  # islands as find_islands forms them; max_partitions, or one unit, turn it on
        self.host = _host_unit(profile)
        self.units = {u.name: u for u in profile.units}
        # units whose delegate keeps tensors resident between its partitions (read once: transfers() asks per flow)
        self.resident_units = {n for n, u in self.units.items()
                               if n != self.host.name and getattr(u, "delegate", None) in RESIDENT_DELEGATES}
        self.assumed: set[str] = set()
        # a constant node runs once when its partition is prepared, not per inference
        self.ops = [0.0 if is_constant_node(n, graph) else node_ops(n, graph, self.dims, self.assumed)
                    for n in graph.nodes]
        self.dtype = [compute_dtype(n, graph) for n in graph.nodes]
        self.time = [{u.name: self.ops[i] / unit_throughput(u, self.dtype[i]) for u in profile.units}
                     for i in range(len(graph.nodes))]
        producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}
        # every non-initializer tensor read by some node or listed as a graph output: (producer or None, readers)
        self.flows: list[tuple[str, int | None, list[int]]] = []
        readers: dict[str, list[int]] = {}
        for i, n in enumerate(graph.nodes):
            for x in n.all_inputs():
                t = graph.tensors.get(x)
                if t is not None and t.initializer is not None:
                    continue
                if x not in producer and x not in graph.inputs:
                    continue  # an outer-scope value of a body graph: nothing to move here
                readers.setdefault(x, []).append(i)
        names = list(dict.fromkeys([*graph.inputs, *(o for n in graph.nodes for o in n.outputs if o)]))
        for x in names:
            if x in readers or x in graph.outputs:
                self.flows.append((x, producer.get(x), readers.get(x, [])))
        self.nbytes = {x: tensor_nbytes(graph, x, self.dims, self.assumed) for x, _, _ in self.flows}
        self.graph_outputs = set(graph.outputs)

    def is_host(self, unit: str) -> bool:
        return unit == self.host.name

    def transfers(self, islands: list[list[int]], units: Sequence[str]) -> list[Transfer]:
        """Every copy a run of these islands makes: a tensor produced on a device goes to the host once if anything
        outside its island (or the caller) needs it; each device island reading a tensor it does not produce gets
        its own copy. Tensors between two islands of one unit go through the host too (the conservative model:
        what a session that returns every partition's outputs does) — except on a unit whose delegate keeps tensors
        resident (``RESIDENT_DELEGATES``): a tensor between two islands of such a unit stays on the device (no
        ``to_device`` for a same-unit reader; a ``to_host`` only if a reader elsewhere or the caller needs it)."""
        island_of = {}
        for k, isl in enumerate(islands):
            for v in isl:
                island_of[v] = k
        out: list[tuple[tuple, Transfer]] = []  # (execution-order key, transfer)
        for seq, (x, prod, readers) in enumerate(self.flows):
            src_isl = island_of[prod] if prod is not None else None
            src_unit = units[prod] if prod is not None else self.host.name
            nbytes = self.nbytes[x]
            reader_isls = sorted({island_of[r] for r in readers} - {src_isl})
            resident = src_isl is not None and src_unit in self.resident_units
            if resident:  # same-unit readers take the device's copy: only the others count
                reader_isls = [k for k in reader_isls if units[islands[k][0]] != src_unit]
            if src_isl is not None and not self.is_host(src_unit) and (reader_isls or x in self.graph_outputs):
                link = self.units[src_unit].link
                host_reader = next((k for k in reader_isls if self.is_host(units[islands[k][0]])), None)
                out.append(((src_isl, 1, seq), Transfer(x, nbytes, src_unit, self.host.name, "to_host", link,
                                                        src_isl, host_reader, link_seconds(link, nbytes))))
            for k in reader_isls:
                dst_unit = units[islands[k][0]]
                if self.is_host(dst_unit):
                    continue
                link = self.units[dst_unit].link
                out.append(((k, 0, seq), Transfer(x, nbytes, self.host.name, dst_unit, "to_device", link, src_isl, k,
                                                  link_seconds(link, nbytes))))
        out.sort(key=lambda kv: kv[0])
        return [t for _, t in out]

    def evaluate(self, units: Sequence[str]):
        islands = find_islands(self.topo, units, self.join_independent)
        compute = [sum(self.time[v][units[v]] for v in isl) for isl in islands]
        transfers = self.transfers(islands, units)
        total = sum(compute) + sum(t.seconds for t in transfers)
        return total, islands, compute, transfers


def _move(units: list[str], island: Iterable[int], unit: str) -> list[str]:
    trial = list(units)
    for v in island:
        trial[v] = unit
    return trial


def copy_aware(model: CostModel, units: list[str], capable: Sequence[set[str]], reasons: dict[str, str],
               locked: bool = False, max_rounds: int = 100) -> list[str]:
    """Step 3a. Local search on the plan's estimated latency. The moves: a device island back to the host, or a
    host island onto a device unit that can run all of it (which merges it with its same-unit neighbours). Each
    round scores every move against the current plan, applies the best, then applies the others in order of
    their score as long as each still lowers the estimate (checked again against the plan as it now is), so a
    round settles many independent islands at once. Rounds repeat until no move helps; the all-host plan is
    compared last. With ``locked`` (fallback forbid) nothing moves. Demoted nodes get their reason."""
    if locked:
        return units
    names, host = model.topo.names, model.host.name

    def better(cost: float, than: float) -> bool:
        return cost < than - max(_EPS, than * 1e-9)

    best, islands, compute, transfers = model.evaluate(units)
    for _ in range(max_rounds):
        moves = []
        for k, isl in enumerate(islands):
            u = units[isl[0]]
            if not model.is_host(u):
                moves.append((tuple(isl), host))
            else:
                for cand in sorted(_neighbour_units(model, islands, units, k)):
                    if all(cand in capable[v] for v in isl):
                        moves.append((tuple(isl), cand))
        scored = []
        for nodes, target in moves:
            cost = model.evaluate(_move(units, nodes, target))[0]
            if better(cost, best):
                scored.append((cost, nodes, target))
        if not scored:
            break
        scored.sort()
        applied = 0
        for _cost, nodes, target in scored:
            if any(units[v] == target for v in nodes):
                continue  # an earlier move of this round already changed these nodes
            trial = _move(units, nodes, target)
            cost, t_islands, t_compute, t_transfers = model.evaluate(trial)
            if applied and not better(cost, best):
                continue
            if model.is_host(target):
                _note_demotion(model, nodes, units, islands, compute, transfers, reasons)
            else:
                for v in nodes:
                    reasons.pop(names[v], None)
            units, best, islands, compute, transfers = trial, cost, t_islands, t_compute, t_transfers
            applied += 1
    all_host = [host] * len(units)
    cost = model.evaluate(all_host)[0]
    if better(cost, best):
        for v, u in enumerate(units):
            if not model.is_host(u):
                reasons[names[v]] = (f"copy-aware: the whole graph on {host} ({_secs(cost)}) beats any split "
                                     f"({_secs(best)})")
        units = all_host
    return units


def _note_demotion(model: CostModel, nodes, units, islands, compute, transfers, reasons) -> None:
    """Why an island left its device: its compute there plus the transfers it causes, against the host's time."""
    host = model.host.name
    k = next(i for i, isl in enumerate(islands) if nodes[0] in isl)
    unit = units[nodes[0]]
    moved = sum(t.seconds for t in transfers if k in (t.src_partition, t.dst_partition))
    on_host = sum(model.time[v][host] for v in nodes)
    link = _link_kind(model.units[unit].link)
    for v in nodes:
        reasons[model.topo.names[v]] = (f"copy-aware: its island of {len(nodes)} node(s) would take "
                                        f"{_secs(compute[k])} on {unit} plus {_secs(moved)} of {link} transfers, "
                                        f"vs {_secs(on_host)} on {host}")


def _neighbour_units(model: CostModel, islands, units, k) -> set[str]:
    """Units of the device islands that feed island ``k`` or read from it."""
    members = set(islands[k])
    out = set()
    for v in members:
        for p in model.topo.preds[v]:
            if p not in members and not model.is_host(units[p]):
                out.add(units[p])
    for w, preds in enumerate(model.topo.preds):
        if w not in members and preds & members and not model.is_host(units[w]):
            out.add(units[w])
    return out


def enforce_min_nodes(model: CostModel, units: list[str], min_nodes: int, reasons: dict[str, str],
                      locked: bool) -> list[str]:
    """Step 3b. Device islands with fewer than ``min_nodes`` nodes go to the host (repeated: a demotion can split
    nothing, but it can merge host islands, so one pass is enough; kept as a loop for clarity)."""
    if min_nodes <= 1:
        return units
    host = model.host.name
    islands = find_islands(model.topo, units)
    small = [isl for isl in islands if not model.is_host(units[isl[0]]) and len(isl) < min_nodes]
    if small and locked:
        names = [[model.topo.names[v] for v in isl] for isl in small]
        raise InvalidArgumentError(
            f"fallback='forbid' keeps every node on the accelerator, but the island(s) {names} have fewer than "
            f"min_nodes_per_partition={min_nodes} nodes; lower min_nodes_per_partition or use fallback='allow'")
    for isl in small:
        for v in isl:
            reasons[model.topo.names[v]] = (f"min_nodes_per_partition: its island on {units[v]} has {len(isl)} "
                                            f"node(s), fewer than {min_nodes}")
        units = _move(units, isl, host)
    return units


def enforce_max_partitions(model: CostModel, units: list[str], capable, max_partitions: int | None,
                           reasons: dict[str, str], locked: bool) -> list[str]:
    """Step 3c. While there are more than ``max_partitions`` islands, first merge the islands of each unit that no
    path joins (independent branches: free, and allowed with fallback forbid), then apply the move that removes at
    least one island for the smallest increase in estimated latency: a device island to the host, or a host island
    onto a neighbouring unit that can run all of it. Demoting every device island always reaches one partition."""
    if max_partitions is None:
        return units
    if max_partitions < 1:
        raise InvalidArgumentError(f"max_partitions must be at least 1, got {max_partitions}")
    host = model.host.name
    cost, islands, _, _ = model.evaluate(units)
    if len(islands) > max_partitions:
        model.join_independent = True  # from here on (and in the plan made from this model)
        cost, islands, _, _ = model.evaluate(units)
    while len(islands) > max_partitions:
        moves = []  # (latency added per partition removed, nodes, target)
        for k, isl in enumerate(islands):
            u = units[isl[0]]
            if model.is_host(u):
                targets = [c for c in sorted(_neighbour_units(model, islands, units, k))
                           if all(c in capable[v] for v in isl)]
            else:
                targets = [] if locked else [host]
            for t in targets:
                c2, isl2, _, _ = model.evaluate(_move(units, isl, t))
                if len(isl2) < len(islands):
                    moves.append(((c2 - cost) / (len(islands) - len(isl2)), tuple(isl), t))
        if not moves:
            raise InvalidArgumentError(
                f"cannot reach max_partitions={max_partitions}: {len(islands)} partitions remain and no allowed move "
                "removes one" + (" (fallback='forbid' keeps every node on its accelerator)" if locked else ""))
        moves.sort()
        # apply the least valuable moves in order (each re-checked on the plan as it now is) until the count fits
        for delta, nodes, t in moves:
            if len(islands) <= max_partitions:
                break
            if any(units[v] == t for v in nodes):
                continue
            c2, isl2, _, _ = model.evaluate(_move(units, nodes, t))
            if len(isl2) >= len(islands):
                continue
            for v in nodes:
                if model.is_host(t):
                    reasons[model.topo.names[v]] = (
                        f"max_partitions={max_partitions}: moving its island of {len(nodes)} node(s) from "
                        f"{units[v]} to the host was among the cheapest ways to drop a partition "
                        f"(+{_secs(max(c2 - cost, 0.0))})")
                else:
                    reasons.pop(model.topo.names[v], None)
            units = _move(units, nodes, t)
            cost, islands = c2, isl2
    return units


def forbidden(profile, graph: Graph, refused: list[Node], reasons: Mapping[str, str], unbound=()):
    """fallback='forbid''s error: every node of ``refused`` with its reason (``unbound``: symbolic dims not bound)."""
    lines = "; ".join(f"{n.name} ({n.qualified_op}): {reasons[n.name]}" for n in refused)
    return UnsupportedOpError(
        f"fallback='forbid': device {profile.name!r} cannot run {len(refused)} of {len(graph.nodes)} nodes "
        f"on its accelerator(s): {lines}. Use fallback='allow' to run them on {_host_unit(profile).name}, or pick a "
        "device that supports them" + (
            f". The model's symbolic dims {', '.join(map(repr, unbound))} are unbound here; a unit that "
            f"needs static shapes takes them once bound: dims={{{unbound[0]!r}: N, ...}} (plan(), Session()) "
            f"or --dim {unbound[0]}=N" if unbound else ""))


def refused_at_any_dims(graph: Graph, profile) -> tuple[list[Node], dict[str, str]]:
    """The nodes of ``graph`` (symbolic dims unbound) that no accelerator of ``profile`` takes whatever the dims are
    bound to (op, dtype, rank, value type: not a unit that needs static shapes, nor a memory budget a binding
    changes), and why: what fallback='forbid' can refuse before the dims are known."""
    checks: dict[str, list] = {}
    assignment, _, reasons = assign_by_capability(graph, profile, {}, checks)
    host = _host_unit(profile)

    def never(node) -> bool:  # every accelerator refuses it, none for its unbound shapes (a memory refusal: all pass)
        return all(not ok and not why.split(": ", 1)[-1].startswith("dynamic shape") for ok, why in checks[node.name])

    refused = [n for n in graph.nodes if n.name in checks and assignment[n.name] == host.name
               and not reasons[n.name].startswith("constant node") and never(n)]
    return refused, reasons


# ---- the entry point ------------------------------------------------------------------------------------------
def plan(model, device="host", fallback: str = "allow", min_nodes_per_partition: int = 1,
         max_partitions: int | None = None, dims: Mapping[str, int] | None = None) -> Plan:
    """Partition ``model`` (a path, an ``onnx.ModelProto`` or a ``Graph``) for ``device`` (a profile name, a path to a
    profile TOML, or a ``DeviceProfile``).

    ``fallback="allow"`` runs what no accelerator can on the host; ``"forbid"`` raises ``UnsupportedOpError`` naming
    every such node (op and reason). ``min_nodes_per_partition``: smaller device islands go to the host.
    ``max_partitions``: at most this many partitions in all. ``dims`` binds symbolic dims (``{"batch": 1}``); nodes
    with unbound dynamic shapes stay off units that need static shapes."""
    if fallback not in FALLBACKS:
        raise InvalidArgumentError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if (not isinstance(min_nodes_per_partition, int) or isinstance(min_nodes_per_partition, bool)
            or min_nodes_per_partition < 1):
        raise InvalidArgumentError(f"min_nodes_per_partition must be an integer >= 1, got {min_nodes_per_partition!r}")
    if max_partitions is not None and (not isinstance(max_partitions, int) or isinstance(max_partitions, bool)
                                       or max_partitions < 1):
        raise InvalidArgumentError(f"max_partitions must be an integer >= 1 or None, got {max_partitions!r}")
    if dims is not None and not isinstance(dims, Mapping):
        raise InvalidArgumentError(f"dims must be a mapping of dim name -> size, got {type(dims).__name__}")
    checked = {}
    for k, v in (dims or {}).items():
        try:  # operator.index: int(2.7) would be 2, and a 0-d float array has __index__ too
            checked[str(k)] = operator.index(v) if not isinstance(v, bool) else None
        except TypeError:
            checked[str(k)] = None
        if checked[str(k)] is None:
            raise InvalidArgumentError(f"dim {k!r} must be an integer size, got {v!r}")
    dims = checked
    for k, v in dims.items():
        if v < 0:
            raise InvalidArgumentError(f"dim {k!r} must be a size (0 or more), got {v}")
    profile = _resolve_profile(device)
    graph = _resolve_graph(model, dims)
    host = _host_unit(profile)

    assignment, capable, reasons = assign_by_capability(graph, profile, dims)
    locked = fallback == "forbid"
    if locked and any(u is not host for u in profile.units):
        refused = [n for n in graph.nodes if assignment[n.name] == host.name
                   and not reasons[n.name].startswith("constant node")]
        if refused:
            raise forbidden(profile, graph, refused, reasons, sorted(graph.symbolic_dims() - set(dims)))

    model_cost = CostModel(graph, profile, dims)
    names = model_cost.topo.names
    units = [assignment[n] for n in names]
    cap = [capable[n] for n in names]
    units = copy_aware(model_cost, units, cap, reasons, locked=locked)
    units = enforce_min_nodes(model_cost, units, min_nodes_per_partition, reasons, locked)
    units = enforce_max_partitions(model_cost, units, cap, max_partitions, reasons, locked)
    if len(set(units)) == 1:
        # one unit runs everything: its islands are branches no path links (from different graph inputs), and one
        # partition of them all moves nothing more (on the host nothing at all) and saves a delegate call per branch
        model_cost.join_independent = True

    total, islands, compute, transfers = model_cost.evaluate(units)
    partitions = []
    for k, isl in enumerate(islands):
        node_names = [names[v] for v in isl]
        ins, outs, inits = graph.boundary(node_names)
        unit = model_cost.units[units[isl[0]]]
        partitions.append(Partition(k, unit.name, getattr(unit, "delegate", "host"), node_names, ins, outs, inits,
                                    float(sum(model_cost.ops[v] for v in isl)), compute[k]))
    assignment = {names[v]: units[v] for v in range(len(names))}
    reasons = {n: reasons[n] for n in names if model_cost.is_host(assignment[n]) and n in reasons}
    for n in names:  # every node off the accelerators says why, even when the search moved it without a note
        if model_cost.is_host(assignment[n]) and n not in reasons:
            reasons[n] = "copy-aware: cheaper on the host"
    compute_s = float(sum(compute))
    transfer_s = float(sum(t.seconds for t in transfers))
    latency = compute_s + transfer_s
    power = getattr(profile, "power_w", None)
    price = getattr(profile, "price_usd_per_hour", None)
    estimates = {
        "latency_s": latency, "compute_s": compute_s, "transfer_s": transfer_s,
        "bytes_to_device": int(sum(t.nbytes for t in transfers if t.direction == "to_device")),
        "bytes_to_host": int(sum(t.nbytes for t in transfers if t.direction == "to_host")),
        "energy_j": None if power is None else float(power) * latency,
        "cost_usd": None if price is None else float(price) * latency / 3600.0,
    }
    return Plan(graph, profile, partitions, transfers, assignment, reasons, estimates, fallback, dims,
                sorted(model_cost.assumed))


# ---- text and drawing helpers ---------------------------------------------------------------------------------
def _link_kind(link) -> str | None:
    if link is None:
        return None
    return str(getattr(link, "kind", link))


def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _secs(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _bytes(n: float) -> str:
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{int(n)} B"


def _names(xs: Sequence[str], limit: int = 3) -> str:
    if not xs:
        return "-"
    shown = ", ".join(xs[:limit])
    return shown + (f" +{len(xs) - limit}" if len(xs) > limit else "")


def _endpoint(unit: str, partition: int | None, unit_of: Mapping[int, str]) -> str:
    """A copy point's end: its partition, named with the unit that runs it (a to_device copy of a tensor an
    accelerator partition made starts from host memory, but the tensor is that partition's), else the unit."""
    return unit if partition is None else f"{unit_of[partition]}#{partition}"


def _columns(titles: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> str:
    table = ([list(titles)] if header else []) + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(titles))]
    out = []
    for r in table:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out)


_PALETTE = ["#d9d9d9", "#8dd3c7", "#fdb462", "#bebada", "#80b1d3", "#b3de69", "#fccde5", "#ffffb3"]


def _delegate_colours(partitions: Sequence[Partition]) -> dict[str, str]:
    """host grey; every other delegate its own colour, in order of first appearance."""
    out: dict[str, str] = {}
    for p in partitions:
        if p.delegate not in out:
            out[p.delegate] = _PALETTE[0] if p.delegate == "host" else _PALETTE[1 + (len(out) % (len(_PALETTE) - 1))]
    return out


def _dot_id(s: str) -> str:
    return json.dumps(s)


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n") + '"'


def _edges(graph: Graph):
    """(producer node or None for a graph input, consumer node or None for a graph output, tensor) for every
    non-initializer data edge."""
    producer = {o: n.name for n in graph.nodes for o in n.outputs if o}
    for n in graph.nodes:
        for x in n.all_inputs():
            if x in producer:
                yield producer[x], n.name, x
            elif x in graph.inputs:
                yield None, n.name, x
    for x in graph.outputs:
        if x in producer:
            yield producer[x], None, x


_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")  # not XML 1.0 characters


def _svg(p: Plan) -> str:
    """A layered drawing: each node on the row of its longest path from the inputs, rows centred."""
    g = p.graph
    colours = _delegate_colours(p.partitions)
    part_of = {n: q for q in p.partitions for n in q.nodes}
    level: dict[str, int] = {}
    producer = {o: n.name for n in g.nodes for o in n.outputs if o}
    for x in g.inputs:
        level["t:" + x] = 0
    for n in g.nodes:
        lv = 0
        for x in n.all_inputs():
            if x in producer:
                lv = max(lv, level["n:" + producer[x]] + 1)
            elif x in g.inputs:
                lv = max(lv, 1)
        level["n:" + n.name] = lv
    for x in g.outputs:
        level["o:" + x] = (level.get("n:" + producer[x], 0) + 1) if x in producer else 1
    rows: dict[int, list[str]] = {}
    for key, lv in level.items():
        rows.setdefault(lv, []).append(key)
    box_w, box_h, gap_x, gap_y, margin = 170, 40, 30, 50, 30
    width = max(len(r) for r in rows.values()) * (box_w + gap_x) + 2 * margin + 220
    height = (max(rows) + 1) * (box_h + gap_y) + 2 * margin + 40
    pos = {}
    for lv, keys in rows.items():
        row_w = len(keys) * (box_w + gap_x) - gap_x
        x0 = (width - 220 - row_w) / 2
        for i, key in enumerate(keys):
            pos[key] = (x0 + i * (box_w + gap_x), margin + 40 + lv * (box_h + gap_y))
    def esc(text) -> str:  # XML 1.0 has no character for C0 controls but tab/newline/CR: a name with one broke the file
        return html.escape(_XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker>'
           '<marker id="arrow-red" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#d62728"/></marker></defs>',
           f'<text x="{margin}" y="{margin}" font-size="14" font-weight="bold">{esc(g.name or "graph")} on '
           f'{esc(p.profile.name)}: {len(p.partitions)} partitions, {len(p.transfers)} transfers, '
           f'{esc(_secs(p.estimates["latency_s"]))} estimated</text>']
    crossing = {(t.tensor, t.dst_partition): t for t in p.transfers if t.direction == "to_device"}
    back = {t.tensor: t for t in p.transfers if t.direction == "to_host"}
    for a, b, tensor in _edges(g):
        ka = "n:" + a if a is not None else "t:" + tensor
        kb = "n:" + b if b is not None else "o:" + tensor
        (xa, ya), (xb, yb) = pos[ka], pos[kb]
        t = None
        if b is not None and (tensor, part_of[b].id) in crossing:
            t = crossing[(tensor, part_of[b].id)]
        elif a is not None and tensor in back and (b is None or part_of[b].id != part_of[a].id):
            t = back[tensor]
        x1, y1, x2, y2 = xa + box_w / 2, ya + box_h, xb + box_w / 2, yb
        if t is not None:
            out.append(f'<line class="transfer" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                       'stroke="#d62728" stroke-width="2.5" stroke-dasharray="6 3" marker-end="url(#arrow-red)"/>')
            out.append(f'<text x="{(x1 + x2) / 2 + 4:.1f}" y="{(y1 + y2) / 2:.1f}" fill="#d62728">'
                       f'{esc(tensor)} {esc(_bytes(t.nbytes))} {esc(t.direction)}</text>')
        else:
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#555" '
                       'stroke-width="1" marker-end="url(#arrow)"/>')
    for key, (x, y) in pos.items():
        kind, name = key[0], key[2:]
        if kind == "n":
            q = part_of[name]
            node = g.node(name)
            out.append(f'<g class="node" data-partition="{q.id}" data-delegate="{esc(q.delegate)}">'
                       f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="6" '
                       f'fill="{colours[q.delegate]}" stroke="#333"/>'
                       f'<text x="{x + box_w / 2:.1f}" y="{y + 16:.1f}" text-anchor="middle">{esc(name[:26])}</text>'
                       f'<text x="{x + box_w / 2:.1f}" y="{y + 31:.1f}" text-anchor="middle" fill="#333">'
                       f'{esc(node.qualified_op[:22])} · #{q.id}</text></g>')
        else:
            out.append(f'<ellipse cx="{x + box_w / 2:.1f}" cy="{y + box_h / 2:.1f}" rx="{box_w / 2 - 10}" '
                       f'ry="{box_h / 2 - 4}" fill="white" stroke="#333"/><text x="{x + box_w / 2:.1f}" '
                       f'y="{y + box_h / 2 + 4:.1f}" text-anchor="middle">{esc(name[:26])}</text>')
    lx, ly = width - 200, margin + 40
    out.append(f'<text x="{lx}" y="{ly - 8}" font-weight="bold">delegates</text>')
    for i, (delegate, colour) in enumerate(colours.items()):
        out.append(f'<rect x="{lx}" y="{ly + i * 22}" width="16" height="16" fill="{colour}" stroke="#333"/>'
                   f'<text x="{lx + 22}" y="{ly + i * 22 + 12}">{esc(delegate)}</text>')
    yl = ly + len(colours) * 22 + 8
    out.append(f'<line x1="{lx}" y1="{yl + 8}" x2="{lx + 16}" y2="{yl + 8}" stroke="#d62728" stroke-width="2.5" '
               f'stroke-dasharray="6 3"/><text x="{lx + 22}" y="{yl + 12}">transfer over a link</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


class _PlanModule(types.ModuleType):
    """``edgert.plan`` is this module and also the function: ``edgert.plan(model, device=...)`` works whichever way
    the module was imported first (``import edgert.plan`` binds the package attribute to the module)."""

    def __call__(self, *args, **kwargs) -> Plan:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _PlanModule


__all__ = ["CONTROL_FLOW_OPS", "CostModel", "RESIDENT_DELEGATES", "Partition", "Plan", "Transfer", "assign_by_capability", "compute_dtype",
           "copy_aware", "enforce_max_partitions", "enforce_min_nodes", "find_islands", "is_constant_node",
           "link_seconds", "node_ops", "plan", "quantized_view", "tensor_nbytes", "unit_throughput"]
