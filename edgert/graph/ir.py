"""The typed graph IR every layer above the loaders works on: tensors (dtype, shape, quantization, initializer data),
nodes (op type, attributes, control-flow bodies) and graphs (nodes in topological order plus the ONNX model they came
from, kept so that any subset of nodes can be exported as a standalone model for a delegate).

Conventions the partitioner, delegates and sessions rely on:

- ``Tensor.dtype`` is a numpy dtype name ("float32", "int8", ...), or a name numpy lacks ("bfloat16", "int4",
  "float8e4m3fn", "string"), or ``None`` when shape inference could not tell.
- ``Tensor.shape`` is a tuple of dims: ``int`` (known), ``str`` (a symbolic dim such as "batch", bound later by
  ``Graph.bind``) or ``None`` (unknown, e.g. data-dependent). ``shape is None`` means even the rank is unknown.
- ``Tensor.value_type`` is set for a value that is not a tensor (an ONNX sequence, map, optional or sparse tensor),
  in onnxruntime's spelling (``"seq(tensor(float))"``); its ``dtype`` and ``shape`` are then None. Such a value has
  no buffer: it must stay inside one partition.
- ``Node.inputs`` keeps ONNX positions: ``""`` marks an absent optional input.
- ``Node.implicit_inputs`` lists the outer-scope tensors a control-flow node's bodies read (If/Loop/Scan are kept
  whole: they are one node, their bodies live in ``Node.subgraphs``). Cutting the graph must treat them as inputs.
- Initializer arrays are read-only; never write into them.

This module must not import from the layers above it (plan, delegates, session).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from ..errors import InvalidArgumentError, ShapeError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# bits per element of every dtype name the IR uses (string: variable size, so unknown)
DTYPE_BITS = {
    "bool": 8, "int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32, "uint32": 32,
    "int64": 64, "uint64": 64, "float16": 16, "bfloat16": 16, "float32": 32, "float64": 64,
    "complex64": 64, "complex128": 128, "float8e4m3fn": 8, "float8e4m3fnuz": 8, "float8e5m2": 8,
    "float8e5m2fnuz": 8, "float4e2m1": 4, "float8e8m0": 8,
}

# input positions that carry quantization parameters (scale / zero point) rather than data, per (domain, op)
QUANT_PARAM_INPUTS: dict[tuple[str, str], frozenset[int]] = {
    ("", "QuantizeLinear"): frozenset({1, 2}),
    ("", "DequantizeLinear"): frozenset({1, 2}),
    ("", "QLinearConv"): frozenset({1, 2, 4, 5, 6, 7}),
    ("", "QLinearMatMul"): frozenset({1, 2, 4, 5, 6, 7}),
    ("", "MatMulInteger"): frozenset({2, 3}),
    ("", "ConvInteger"): frozenset({2, 3}),
    ("com.microsoft", "QuantizeLinear"): frozenset({1, 2}),
    ("com.microsoft", "DequantizeLinear"): frozenset({1, 2}),
    ("com.microsoft", "QLinearAdd"): frozenset({1, 2, 4, 5, 6, 7}),
    ("com.microsoft", "QLinearMul"): frozenset({1, 2, 4, 5, 6, 7}),
    ("com.microsoft", "QLinearSigmoid"): frozenset({1, 2, 3, 4}),
    ("com.microsoft", "QLinearLeakyRelu"): frozenset({1, 2, 3, 4}),
    ("com.microsoft", "QLinearAveragePool"): frozenset({1, 2, 3, 4}),
    ("com.microsoft", "QLinearGlobalAveragePool"): frozenset({1, 2, 3, 4}),
    ("com.microsoft", "QLinearSoftmax"): frozenset({1, 2, 3, 4}),
}


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization: ``real = (q - zero_point) * scale``. ``axis`` is None for per-tensor parameters, else the
    axis of the quantized tensor along which ``scale``/``zero_point`` vary (per-channel)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None


@dataclass
class Tensor:
    """A value in the graph: a graph input, an initializer (``initializer`` holds its read-only array), or a node
    output. ``quant`` is set for tensors a Q/DQ/QLinear op gives constant scale/zero-point parameters."""

    name: str
    dtype: str | None
    shape: tuple | None
    quant: QuantParams | None = None
    initializer: np.ndarray | None = None
    value_type: str | None = None  # a non-tensor value: "seq(tensor(float))", "map(int64,tensor(float))", ...

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def is_static(self) -> bool:
        """True when every dim is a known integer."""
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def concrete_shape(self, bindings: Mapping[str, int] | None = None) -> tuple[int, ...] | None:
        """The shape with symbolic dims looked up in ``bindings``; None if any dim stays unknown."""
        if self.shape is None:
            return None
        out = []
        for d in self.shape:
            if isinstance(d, str):
                d = (bindings or {}).get(d)
            if not isinstance(d, int):
                return None
            out.append(d)
        return tuple(out)

    def nbytes(self, bindings: Mapping[str, int] | None = None) -> int | None:
        """Bytes of the tensor's data (sub-byte types rounded up), or None if its dtype or any dim is unknown."""
        if self.initializer is not None and self.dtype not in DTYPE_BITS:
            return int(self.initializer.nbytes)
        bits = DTYPE_BITS.get(self.dtype or "")
        shape = self.concrete_shape(bindings)
        if bits is None or shape is None:
            return None
        return (math.prod(shape) * bits + 7) // 8


@dataclass
class Node:
    """One op. ``index`` is the node's position in its graph's ONNX ``node`` list (``Graph.source``), which
    ``Graph.subgraph_model`` uses to copy it exactly. ``attrs`` holds plain Python values (ints, floats, str,
    lists, numpy arrays for tensor attributes); graph-valued attributes live in ``subgraphs`` instead (a GRAPHS
    attribute ``body`` becomes ``body[0]``, ``body[1]``...)."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    subgraphs: dict[str, "Graph"] = field(default_factory=dict)
    index: int = 0
    implicit_inputs: list[str] = field(default_factory=list)

    @property
    def qualified_op(self) -> str:
        """``Conv`` for the default ONNX domain, ``com.microsoft:QLinearAdd`` for any other."""
        d = _norm_domain(self.domain)
        return self.op_type if not d else f"{d}:{self.op_type}"

    def data_inputs(self) -> list[str]:
        """Present inputs that carry data (absent optionals and quantization scale/zero-point inputs left out)."""
        skip = QUANT_PARAM_INPUTS.get((_norm_domain(self.domain), self.op_type), frozenset())
        if self.op_type == "QLinearConcat" and _norm_domain(self.domain) == "com.microsoft":
            skip = frozenset({0, 1} | {i for i in range(2, len(self.inputs)) if (i - 2) % 3})
        if "param_inputs" in self.attrs:  # a loader's list (TFLite: a quantized op's int32 bias, shape/axis args)
            skip = skip | frozenset(self.attrs["param_inputs"])
        return [n for i, n in enumerate(self.inputs) if n and i not in skip]

    def all_inputs(self) -> list[str]:
        """Every present input, explicit then implicit (outer-scope reads of control-flow bodies)."""
        seen, out = set(), []
        for n in [*self.inputs, *self.implicit_inputs]:
            if n and n not in seen:
                seen.add(n)
                out.append(n)
        return out


@dataclass
class Graph:
    """A graph: ``nodes`` in topological order, ``tensors`` by name (every input, initializer and node output),
    ``inputs`` (graph inputs that are not initializers), ``outputs``, ``opsets`` (domain -> version; the default
    domain is ``""``). ``source`` is the ``onnx.ModelProto`` for a top-level graph (its external data may not be
    loaded: initializer arrays are in ``tensors``), or the ``onnx.GraphProto`` of a control-flow body.
    ``warnings`` lists what the loader had to relax (e.g. shape inference fell back from strict mode); ``pruned``
    names the nodes ``prune`` dropped (dead code); ``overridable`` the initializers the model also lists as graph
    inputs (IR version 4 on), which a caller may feed instead (``with_inputs``)."""

    name: str
    nodes: list[Node]
    tensors: dict[str, Tensor]
    inputs: list[str]
    outputs: list[str]
    opsets: dict[str, int]
    source: Any = None
    warnings: list[str] = field(default_factory=list)
    base_dir: str | None = None
    pruned: list[str] = field(default_factory=list)
    overridable: list[str] = field(default_factory=list)
    _producers: dict[str, Node] | None = field(default=None, repr=False, compare=False)
    _consumers: dict[str, list[Node]] | None = field(default=None, repr=False, compare=False)

    # ---- lookups -------------------------------------------------------------------------------------------
    def _index(self) -> None:
        prod: dict[str, Node] = {}
        cons: dict[str, list[Node]] = {}
        for node in self.nodes:
            for o in node.outputs:
                if o:
                    prod[o] = node
            for i in node.all_inputs():
                cons.setdefault(i, []).append(node)
        self._producers, self._consumers = prod, cons

    def producer(self, name: str) -> Node | None:
        """The node whose output ``name`` is, or None for graph inputs, initializers and outer-scope values."""
        if self._producers is None:
            self._index()
        return self._producers.get(name)

    def consumers(self, name: str) -> list[Node]:
        """Nodes reading ``name``, in topological order, including control-flow nodes whose bodies read it."""
        if self._consumers is None:
            self._index()
        return list(self._consumers.get(name, []))

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InvalidArgumentError(f"graph {self.name!r} has no node named {name!r}")

    def node_dtypes(self, node: Node, data_only: bool = True) -> dict[str, str | None]:
        """Tensor name -> dtype for the node's inputs and outputs (absent optionals skipped). With ``data_only``
        the scale/zero-point inputs of quantization ops are left out: an int8 NPU that runs QLinearConv does not
        need float32 support for its scales."""
        names = node.data_inputs() if data_only else [n for n in node.inputs if n]
        out = {}
        for n in [*names, *(o for o in node.outputs if o)]:
            t = self.tensors.get(n)
            out[n] = t.dtype if t is not None else None
        return out

    def initializers(self) -> dict[str, Tensor]:
        return {k: t for k, t in self.tensors.items() if t.initializer is not None}

    def non_tensors(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that are sequences, maps, optionals or sparse tensors (``Tensor.value_type``)."""
        return [n for n in names if n in self.tensors and self.tensors[n].value_type is not None]

    def symbolic_dims(self) -> set[str]:
        """Names of the symbolic dims on the graph's inputs (what ``bind`` needs)."""
        return {d for n in self.inputs for d in (self.tensors[n].shape or ()) if isinstance(d, str)}

    def dims_from_feeds(self, feeds: Mapping[str, Any]) -> dict[str, int]:
        """Symbolic dim -> size read off the arrays a first run is fed (checked against every fixed dim and
        between inputs sharing a symbol). Raises ShapeError on a rank or size mismatch."""
        dims: dict[str, int] = {}
        for name in self.inputs:
            if name not in feeds:
                continue
            t = self.tensors[name]
            shape = tuple(np.shape(feeds[name]))
            if t.shape is None:
                continue
            if len(shape) != len(t.shape):
                raise ShapeError(f"input {name!r}: expected rank {len(t.shape)} {t.shape}, got shape {shape}")
            for want, got in zip(t.shape, shape):
                if isinstance(want, int) and want != got:
                    raise ShapeError(f"input {name!r}: expected shape {t.shape}, got {shape}")
                if isinstance(want, str):
                    if dims.setdefault(want, got) != got:
                        raise ShapeError(f"input {name!r}: dim {want!r} is {got} here but {dims[want]} in another "
                                         "input; inputs sharing a symbolic dim must agree")
        return dims

    # ---- transformations ---------------------------------------------------------------------------------
    def bind(self, dims: Mapping[str, int]) -> "Graph":
        """A new graph with the symbolic dims in ``dims`` fixed and every shape re-inferred (the original is
        unchanged). Unknown dim names or negative sizes raise InvalidArgumentError (0, an empty batch, binds)."""
        if not hasattr(self.source, "graph"):
            raise InvalidArgumentError("bind works on a top-level graph (one loaded from a model), not on a "
                                       "control-flow body")
        from ..formats.onnx import load_onnx  # the loader owns ONNX -> IR; import here to keep the layering one-way

        return load_onnx(self.source, dims=dict(dims), base_dir=self.base_dir, _initializers=self.initializers())

    def with_inputs(self, names: Iterable[str]) -> "Graph":
        """The graph with the overridable initializers ``names`` made graph inputs (their values fed at run time, as
        onnxruntime takes them): no longer constants, so nothing folds or imports them."""
        names = [n for n in names if n not in self.inputs]
        bad = [n for n in names if n not in self.overridable]
        if bad:
            raise InvalidArgumentError(f"graph {self.name!r}: {bad} are not overridable initializers (those are "
                                       f"{self.overridable})")
        if not names:
            return self
        tensors = dict(self.tensors)
        for n in names:
            tensors[n] = replace(tensors[n], initializer=None)
        return self.replace(inputs=[*self.inputs, *names], tensors=tensors)

    def prune(self) -> "Graph":
        """The graph without its dead nodes, those none of whose outputs a graph output depends on (an unused
        Constant, a branch nothing reads), as onnxruntime drops them: kept, such a node would make a partition with
        no outputs. ``self`` when there are none; else a new graph whose ``pruned`` names them."""
        needed, live = set(self.outputs), set()
        for n in reversed(self.nodes):
            if any(o in needed for o in n.outputs if o):
                live.add(n.name)
                needed.update(n.all_inputs())
        if len(live) == len(self.nodes):
            return self
        dead = [n for n in self.nodes if n.name not in live]
        gone = {o for n in dead for o in n.outputs}
        return self.replace(nodes=[n for n in self.nodes if n.name in live],
                            tensors={k: t for k, t in self.tensors.items() if k not in gone},
                            pruned=[*self.pruned, *(n.name for n in dead)])

    def boundary(self, node_names: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
        """For a subset of this graph's nodes: (inputs, outputs, initializers) of the cut. ``inputs`` are the
        non-initializer tensors the subset reads but does not produce (graph inputs, or other nodes' outputs);
        ``outputs`` are the tensors it produces that a node outside the subset reads or that are graph outputs;
        ``initializers`` are the initializers it reads. Each list is in first-use order."""
        wanted = set(node_names)
        known = {n.name for n in self.nodes}
        missing = wanted - known
        if missing:
            raise InvalidArgumentError(f"graph {self.name!r} has no node(s) named {sorted(missing)}")
        subset = [n for n in self.nodes if n.name in wanted]
        produced = {o for n in subset for o in n.outputs if o}
        inputs, inits, seen = [], [], set()
        for n in subset:
            for i in n.all_inputs():
                if i in produced or i in seen:
                    continue
                seen.add(i)
                t = self.tensors.get(i)
                (inits if t is not None and t.initializer is not None else inputs).append(i)
        graph_outputs = set(self.outputs)
        outputs = []
        for n in subset:
            for o in n.outputs:
                if o and (o in graph_outputs or any(c.name not in wanted for c in self.consumers(o))):
                    outputs.append(o)
        return inputs, outputs, inits

    def subgraph_model(self, node_names: Iterable[str], name: str | None = None) -> "onnx.ModelProto":
        """A valid standalone ONNX model of a subset of this graph's nodes: the cut's boundary tensors become its
        inputs and outputs (typed from this graph's inferred shapes, symbolic dims kept), the initializers it reads
        are embedded (copied: a protobuf owns its bytes) or, where the model keeps them in external data files,
        referenced there as the model does (file, offset, length: nothing is read or copied; ``base_dir``, the
        directory they are relative to, is recorded in the model's metadata under ``EXTERNAL_DATA_DIR``), nodes are
        copied exactly (control-flow bodies included), and the opsets, IR version and model-local functions are
        kept. This is what the onnxruntime delegate runs (``delegates.onnxruntime.inference_session`` reads the
        external files in place). A boundary tensor with an unknown dtype raises InvalidArgumentError (bind the
        dims first)."""
        import onnx
        from onnx import helper, numpy_helper

        if not hasattr(self.source, "graph"):
            raise InvalidArgumentError("subgraph_model works on a top-level graph (one loaded from a model)")
        wanted = set(node_names)
        inputs, outputs, inits = self.boundary(wanted)
        src: onnx.ModelProto = self.source

        def value_info(tname: str) -> onnx.ValueInfoProto:
            t = self.tensors.get(tname)
            if t is None or t.dtype not in onnx_types():
                raise InvalidArgumentError(
                    f"cannot cut graph {self.name!r} at tensor {tname!r}: its element type is unknown (shape "
                    "inference could not infer it); bind the dynamic dims or cut elsewhere")
            shape = None if t.shape is None else list(t.shape)  # None dims stay unknown, str dims symbolic
            return helper.make_tensor_value_info(tname, onnx_types()[t.dtype], shape)

        src_inits = {i.name: i for i in src.graph.initializer}
        init_protos = []
        for iname in inits:
            proto = src_inits.get(iname)
            if proto is None:
                proto = numpy_helper.from_array(np.ascontiguousarray(self.tensors[iname].initializer), iname)
            init_protos.append(proto)
        external = any(p.data_location == onnx.TensorProto.EXTERNAL for p in init_protos)
        nodes = []
        for n in self.nodes:
            if n.name in wanted:
                proto = src.graph.node[n.index]
                if proto.name != n.name:  # unnamed: onnxruntime's messages then name the node as edgert's do
                    proto = type(proto)()
                    proto.CopyFrom(src.graph.node[n.index])
                    proto.name = n.name
                nodes.append(proto)
        # keep value_info for the inner tensors so the exported model carries the same inferred types
        inner = {o for n in nodes for o in n.output} - set(outputs)
        vis = [value_info(t) for t in inner if t and self.tensors.get(t) is not None
               and self.tensors[t].dtype in onnx_types()]
        graph = helper.make_graph(nodes, name or f"{self.name}_part", [value_info(i) for i in inputs],
                                  [value_info(o) for o in outputs], initializer=init_protos, value_info=vis)
        model = helper.make_model(graph, opset_imports=list(src.opset_import), ir_version=src.ir_version,
                                  functions=list(src.functions))
        if external:
            model.metadata_props.add(key=EXTERNAL_DATA_DIR, value=self.base_dir)
        return model

    def replace(self, **changes) -> "Graph":
        return replace(self, _producers=None, _consumers=None, **changes)

    def in_scope(self, outer: "Graph") -> "Graph":
        """This control-flow body with the values it reads from enclosing graphs findable in ``tensors``: ``outer``'s
        tensors (its own enclosing ones too, when ``outer`` is itself a body seen this way) under the body's, which
        shadow them as ONNX scoping does. For looking up dtypes and shapes; the nodes are the body's."""
        return self.replace(tensors={**outer.tensors, **self.tensors})


# the metadata key under which Graph.subgraph_model records the directory its external data references are relative to
EXTERNAL_DATA_DIR = "edgert.external_data_dir"


def external_data_dir(model) -> str | None:
    """The directory a ``Graph.subgraph_model`` export's external data references are relative to (None: it has
    none)."""
    return next((p.value for p in model.metadata_props if p.key == EXTERNAL_DATA_DIR), None)


@functools.lru_cache(maxsize=None)
def onnx_types() -> dict[str, int]:
    """dtype name -> onnx.TensorProto element type (built on first use so importing the IR does not import onnx)."""
    from onnx import TensorProto as T

    names = {
        "float32": "FLOAT", "uint8": "UINT8", "int8": "INT8", "uint16": "UINT16", "int16": "INT16", "int32": "INT32",
        "int64": "INT64", "string": "STRING", "bool": "BOOL", "float16": "FLOAT16", "float64": "DOUBLE",
        "uint32": "UINT32", "uint64": "UINT64", "complex64": "COMPLEX64", "complex128": "COMPLEX128",
        "bfloat16": "BFLOAT16", "float8e4m3fn": "FLOAT8E4M3FN", "float8e4m3fnuz": "FLOAT8E4M3FNUZ",
        "float8e5m2": "FLOAT8E5M2", "float8e5m2fnuz": "FLOAT8E5M2FNUZ", "uint4": "UINT4", "int4": "INT4",
        "float4e2m1": "FLOAT4E2M1", "float8e8m0": "FLOAT8E8M0",
    }
    return {k: getattr(T, v) for k, v in names.items() if hasattr(T, v)}


def onnx_elem_type_to_dtype(elem_type: int) -> str | None:
    """onnx.TensorProto element type -> the IR's dtype name (None for UNDEFINED or a type this IR does not know)."""
    for k, v in onnx_types().items():
        if v == elem_type:
            return k
    return None
