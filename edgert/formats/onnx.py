"""ONNX -> edgert graph IR (``edgert.graph.ir.Graph``), validated.

Order of work: parse (``onnx.load``, external data *not* pulled into the protobuf), our own structural checks
(every node's domain and opset known, every input defined before use, no cycles, no duplicate outputs: these give
the precise messages), ``onnx.checker``, binding of any dims the caller fixed, then ``onnx.shape_inference``
(strict mode first; if that fails, the non-strict pass, recorded in ``Graph.warnings``) with the graph outputs'
declared shapes set aside, so that what the nodes compute wins over a stale declared shape as in onnxruntime (the
declared dims fill what inference cannot tell; a contradiction is noted in ``Graph.warnings``), then dead nodes are
dropped (``Graph.prune``: onnxruntime drops them too, and a partition must produce something). Every failure is an
``edgert.ModelFormatError`` naming the node, op, domain and opset; ops outside the domains edgert's delegates run,
and opsets newer than the installed ``onnx`` knows, raise ``edgert.UnsupportedOpError``.

Initializer data: protobuf owns the bytes of an embedded initializer, so ``numpy_helper.to_array`` copies it once
(there is no zero-copy view of a protobuf ``bytes`` field from Python). Initializers in external data files are
memory-mapped read-only instead and never copied (plain little-endian numeric types; exotic ones such as bfloat16
or int4 are read through onnx's own helper). ``Graph.bind`` reuses the arrays of the graph it binds.

Control-flow nodes (If, Loop, Scan) stay whole: one IR node whose bodies are converted into ``Node.subgraphs``.

This module must not import from the layers above it (plan, delegates, session).
"""
from __future__ import annotations

import functools
import heapq
import math
import mmap
import os
from typing import Mapping

import numpy as np

from ..errors import EdgertError, InvalidArgumentError, ModelFormatError, UnsupportedOpError
from ..graph.ir import (EXTERNAL_DATA_DIR, Graph, Node, QuantParams, Tensor, external_data_dir,
                        onnx_elem_type_to_dtype)
from . import model_file

# domains whose ops some edgert delegate can run: ONNX's own, and onnxruntime's contrib ops (QLinearAdd, ...)
ONNX_DOMAINS = ("", "ai.onnx.ml", "ai.onnx.preview.training", "ai.onnx.preview")
RUNTIME_DOMAINS = ("com.microsoft",)

# op -> ((tensor input/output position, scale position, zero-point position), ...) to attach QuantParams;
# a negative tensor position -k means output k-1
_QUANT_TRIPLES: dict[tuple[str, str], tuple[tuple[int, int, int], ...]] = {
    ("", "QuantizeLinear"): ((-1, 1, 2),),
    ("", "DequantizeLinear"): ((0, 1, 2),),
    ("", "QLinearConv"): ((0, 1, 2), (3, 4, 5), (-1, 6, 7)),
    ("", "QLinearMatMul"): ((0, 1, 2), (3, 4, 5), (-1, 6, 7)),
    ("com.microsoft", "QuantizeLinear"): ((-1, 1, 2),),
    ("com.microsoft", "DequantizeLinear"): ((0, 1, 2),),
    ("com.microsoft", "QLinearAdd"): ((0, 1, 2), (3, 4, 5), (-1, 6, 7)),
    ("com.microsoft", "QLinearMul"): ((0, 1, 2), (3, 4, 5), (-1, 6, 7)),
    ("com.microsoft", "QLinearSigmoid"): ((0, 1, 2), (-1, 3, 4)),
    ("com.microsoft", "QLinearLeakyRelu"): ((0, 1, 2), (-1, 3, 4)),
    ("com.microsoft", "QLinearAveragePool"): ((0, 1, 2), (-1, 3, 4)),
    ("com.microsoft", "QLinearGlobalAveragePool"): ((0, 1, 2), (-1, 3, 4)),
    ("com.microsoft", "QLinearSoftmax"): ((0, 1, 2), (-1, 3, 4)),
}


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@functools.lru_cache(maxsize=None)
def _max_opsets() -> dict[str, int]:
    from onnx import defs

    out: dict[str, int] = {}
    for s in defs.get_all_schemas_with_history():
        out[s.domain] = max(out.get(s.domain, 0), s.since_version)
    return out


def _where(node, opsets: Mapping[str, int], label: str | None = None) -> str:
    domain = _norm_domain(node.domain)
    return (f"node {label or node.name or '(unnamed)'!r} (op {node.op_type}, domain {domain or 'ai.onnx'}, "
            f"opset {opsets.get(domain, '?')})")


# ---- reading the file ---------------------------------------------------------------------------------------
def _parse(src, base_dir):
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(src, onnx.ModelProto):
        return src, base_dir, "(in-memory model)"
    if isinstance(src, (bytes, bytearray, memoryview)):
        what = f"({len(src)} bytes)"
        try:
            return onnx.load_model_from_string(bytes(src)), base_dir, what
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelFormatError(f"ONNX model {what} could not be parsed as an ONNX protobuf ({exc}); the bytes "
                                   "are truncated or not an ONNX model") from None
    if isinstance(src, (str, os.PathLike)):
        given = model_file(src, "ONNX")
        try:
            model = onnx.load(given, load_external_data=False)
        except (DecodeError, RuntimeError, ValueError, OSError) as exc:
            raise ModelFormatError(f"ONNX model {given!r} could not be parsed as an ONNX protobuf ({exc}); the "
                                   "file is truncated or not an ONNX model") from None
        return model, os.path.dirname(os.path.abspath(given)) if base_dir is None else base_dir, repr(given)
    raise InvalidArgumentError(f"load_onnx expects a path, bytes or an onnx.ModelProto, got {type(src).__name__}")


class _ExternalData:
    """Read-only memory maps of a model's external data files, one map per file, shared by its tensors."""

    def __init__(self, base_dir: str | None, what: str):
        self.base_dir, self.what, self.maps = base_dir, what, {}

    def array(self, t) -> np.ndarray:
        import onnx
        from onnx import external_data_helper, numpy_helper

        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or os.path.normpath(loc).split(os.sep)[0] == "..":
            raise ModelFormatError(f"ONNX model {self.what}: initializer {t.name!r} names external data location "
                                   f"{loc!r}; it must be a relative path inside the model's directory")
        if self.base_dir is None:
            raise ModelFormatError(f"ONNX model {self.what}: initializer {t.name!r} lives in external file {loc!r} "
                                   "but the model was not loaded from a path: load it from its file "
                                   "(edgert.Session(path), edgert.plan(path)), pass base_dir= (the model's directory) "
                                   "to load_onnx, or read the weights into the model first (onnx.load(path, "
                                   "load_external_data=True))")
        path = os.path.join(self.base_dir, loc)
        if not os.path.isfile(path):
            raise ModelFormatError(f"ONNX model {self.what}: initializer {t.name!r}: external data file {loc!r} not "
                                   f"found in {self.base_dir!r}")
        dtype = onnx_elem_type_to_dtype(t.data_type)
        try:
            npdt = np.dtype(dtype).newbyteorder("<") if dtype and dtype != "string" else None
        except TypeError:
            npdt = None
        if npdt is None or npdt.kind not in "biufc":
            tmp = onnx.TensorProto()
            tmp.CopyFrom(t)
            external_data_helper.load_external_data_for_tensor(tmp, self.base_dir)
            tmp.data_location = onnx.TensorProto.DEFAULT
            return numpy_helper.to_array(tmp)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelFormatError(f"ONNX model {self.what}: initializer {t.name!r}: external data offset/length "
                                   f"{info.get('offset')!r}/{info.get('length')!r} are not integers") from None
        count = math.prod(t.dims)
        nbytes = count * npdt.itemsize
        size = os.path.getsize(path)
        if offset < 0 or (length is not None and length != nbytes) or offset + nbytes > size:
            raise ModelFormatError(
                f"ONNX model {self.what}: initializer {t.name!r} ({dtype}{list(t.dims)}, {nbytes} bytes) does not fit "
                f"its external data: offset {offset}, length {length}, file {loc!r} holds {size} bytes")
        if count == 0:
            return np.zeros(tuple(t.dims), npdt)
        if path not in self.maps:
            with open(path, "rb") as f:
                self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self.maps[path], dtype=npdt, count=count, offset=offset).reshape(tuple(t.dims))


# ---- structural checks --------------------------------------------------------------------------------------
class _Scope:
    """The names visible in a (sub)graph: its own set, then the enclosing scopes' (looked up along the chain, never
    copied: a copy per control-flow body was quadratic, 8,000 If nodes took 24 s)."""

    __slots__ = ("own", "outer")

    def __init__(self, own: set[str], *outer):
        self.own, self.outer = own, outer

    def __contains__(self, name) -> bool:
        return name in self.own or any(name in o for o in self.outer)


def _check_graph(g, opsets: Mapping[str, int], functions: set[tuple[str, str]], what: str, outer,
                 path: str = "") -> bool:
    """Domains/opsets known, inputs defined before use (outer scope visible), no cycles, single assignment.

    A control-flow body may read an outer value whose producer comes later in the file (onnxruntime.quantization's
    topological sort ignores bodies' implicit inputs, and onnxruntime sorts them itself). That is accepted when
    moving the node after those producers breaks no cycle; returns True when some (sub)graph needs that reordering
    (``_sort_by_scope``). Explicit inputs must still come in file order."""
    import onnx

    graph_inputs = {i.name for i in g.input}
    own = graph_inputs | {i.name for i in g.initializer}
    defined = _Scope(own, outer)
    producers = {}
    reorder = reorder_here = False
    for idx, n in enumerate(g.node):
        if not all(isinstance(v, str) for v in (n.name, n.op_type, n.domain, *n.input, *n.output)):
            raise ModelFormatError(f"ONNX model {what}: {path}node #{idx} has a name, op type, domain or tensor name "
                                   "that is not valid UTF-8 text; the file is damaged")
        for o in n.output:
            if o:
                if o in producers or o in graph_inputs:
                    raise ModelFormatError(f"ONNX model {what}: {path}{_where(n, opsets)} writes tensor {o!r}, which "
                                           "is already a graph input or another node's output (ONNX values are "
                                           "assigned once)")
                producers[o] = idx
    max_opsets = _max_opsets()
    for idx, n in enumerate(g.node):
        dom = _norm_domain(n.domain)
        if (dom, n.op_type) not in functions:
            if dom not in opsets:
                raise ModelFormatError(f"ONNX model {what}: {path}{_where(n, opsets)} uses domain "
                                       f"{dom or 'ai.onnx'!r}, which the model's opset_import does not list "
                                       f"({sorted(k or 'ai.onnx' for k in opsets)})")
            if dom in ONNX_DOMAINS:
                if opsets[dom] > max_opsets.get(dom, 0):
                    raise UnsupportedOpError(
                        f"ONNX model {what}: {path}{_where(n, opsets)}: opset {opsets[dom]} of domain "
                        f"{dom or 'ai.onnx'} is newer than the installed onnx package knows (up to "
                        f"{max_opsets.get(dom, 0)}); re-export with an older opset or upgrade onnx")
                try:
                    onnx.defs.get_schema(n.op_type, opsets[dom], dom)
                except onnx.defs.SchemaError:
                    raise UnsupportedOpError(f"ONNX model {what}: {path}{_where(n, opsets)}: {n.op_type} is not an "
                                             f"operator of domain {dom or 'ai.onnx'} at opset {opsets[dom]}") from None
            elif dom not in RUNTIME_DOMAINS:
                raise UnsupportedOpError(
                    f"ONNX model {what}: {path}{_where(n, opsets)}: custom domain {dom!r} is not one edgert's "
                    f"delegates run (ai.onnx, ai.onnx.ml, {', '.join(RUNTIME_DOMAINS)}); replace the op or export "
                    "it as a model-local function")
        for i in n.input:
            if not i or i in defined:
                continue
            if i not in producers:
                raise ModelFormatError(f"ONNX model {what}: {path}{_where(n, opsets)} reads tensor {i!r}, which is "
                                       "not a graph input, an initializer or any node's output")
            cyc = _find_cycle(g, producers, idx)
            if cyc:
                raise ModelFormatError(f"ONNX model {what}: {path}the graph has a cycle: " + _names(g, cyc))
            raise ModelFormatError(f"ONNX model {what}: {path}{_where(n, opsets)} reads {i!r} before node "
                                   f"{g.node[producers[i]].name!r} (later in the file) produces it; ONNX requires "
                                   "nodes in topological order")
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for s in subs:
                # a body sees every value of the scopes around it; one produced later here makes a reorder
                visible = _Scope(set(), defined, producers)
                reorder |= _check_graph(s, opsets, functions, what, visible, f"{path}{_where(n, opsets)} body "
                                        f"{a.name!r}: ")
                if any(f in producers and f not in defined for f in _free_names(s)):
                    reorder_here = True
        own.update(o for o in n.output if o)
    if reorder_here:
        order = _scope_order(g, producers)
        if len(order) < len(g.node):
            stuck = [g.node[k].name or f"#{k}" for k in sorted(set(range(len(g.node))) - set(order))]
            raise ModelFormatError(f"ONNX model {what}: {path}the graph has a cycle through the outer-scope values "
                                   f"its control-flow bodies read, among nodes {stuck[:8]}")
    return reorder or reorder_here


def _bodies(n) -> list:
    import onnx

    return [b for a in n.attribute for b in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                                             list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])]


def _free_names(g) -> set[str]:
    """The values a (sub)graph reads from the scopes around it: its nodes' inputs, and its nested bodies' own free
    names, that it does not define itself."""
    own = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output if o}
    out = set()
    for n in g.node:
        out.update(i for i in n.input if i and i not in own)
        for b in _bodies(n):
            out.update(f for f in _free_names(b) if f not in own)
    return out


def _scope_order(g, producers: Mapping[str, int]) -> list[int]:
    """Node indices in a topological order over explicit and implicit (bodies' outer-scope) inputs, as close to file
    order as it allows; shorter than ``g.node`` when there is a cycle."""
    deps = []
    for idx, n in enumerate(g.node):
        reads = set(i for i in n.input if i)
        for b in _bodies(n):
            reads |= _free_names(b)
        deps.append({producers[r] for r in reads if r in producers and producers[r] != idx}
                    | ({idx} if any(producers.get(r) == idx for r in reads) else set()))
    users: dict[int, list[int]] = {}
    indeg = [len(d) for d in deps]
    for idx, d in enumerate(deps):
        for p in d:
            users.setdefault(p, []).append(idx)
    ready = [k for k in range(len(deps)) if indeg[k] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, ()):
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    return order


def _sort_by_scope(g) -> None:
    """Reorder ``g``'s nodes (and its bodies', in place) so every node follows the producers of the outer values its
    bodies read; ``_check_graph`` has ruled out cycles."""
    for n in g.node:
        for b in _bodies(n):
            _sort_by_scope(b)
    producers = {o: idx for idx, n in enumerate(g.node) for o in n.output if o}
    order = _scope_order(g, producers)
    if order != list(range(len(g.node))):
        nodes = [g.node[k] for k in order]
        copies = []
        for n in nodes:
            c = type(n)()
            c.CopyFrom(n)
            copies.append(c)
        del g.node[:]
        g.node.extend(copies)


def _find_cycle(g, producers: Mapping[str, int], start: int) -> list[int] | None:
    """A cycle through node ``start`` following inputs back to their producers, as node indices, or None.
    Linear in the graph: each node keeps the one it was reached from (a copied trail per node was quadratic, minutes
    for a hostile file's cycle through 10^5 nodes)."""
    parent: dict[int, int | None] = {start: None}
    stack = [start]
    while stack:
        idx = stack.pop()
        for i in g.node[idx].input:
            p = producers.get(i)
            if p is None:
                continue
            if p == start:
                path = [idx]  # idx ... start: the order values flow in
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path + [path[0]]
            if p not in parent:
                parent[p] = idx
                stack.append(p)
    return None


def _names(g, idx: list[int], limit: int = 12) -> str:
    """Node names joined by arrows, the middle elided when there are more than ``limit``."""
    shown = [repr(g.node[k].name or f"#{k}") for k in idx]
    if len(shown) > limit:
        shown = shown[:limit // 2] + [f"... ({len(shown) - limit} more) ..."] + shown[-(limit // 2):]
    return " -> ".join(shown)


# ---- binding ------------------------------------------------------------------------------------------------
_MAX_DIM = 2**63 - 1  # TensorShapeProto.Dimension.dim_value is an int64


def _bind_dims(model, dims: Mapping[str, int]) -> None:
    """Replace symbolic dims by sizes in the model's inputs, outputs and value_info (in place)."""
    for k, v in dims.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:  # 0: an empty batch, as onnxruntime
            raise InvalidArgumentError(f"dim {k!r} must be bound to an integer size (0 or more), got {v!r}")
        if v > _MAX_DIM:
            raise InvalidArgumentError(f"dim {k!r} must be bound to at most {_MAX_DIM} (an ONNX dim is an int64), "
                                       f"got {v!r}")
    g = model.graph
    # a caller binds the dims of the graph inputs (as a Session's feeds do); the others (an output's data-dependent
    # dim, shape inference's unk__N) follow from them
    inits = {t.name for t in g.initializer}
    bindable = {d.dim_param for vi in g.input if vi.name not in inits and vi.type.HasField("tensor_type")
                for d in vi.type.tensor_type.shape.dim if d.HasField("dim_param") and d.dim_param}
    unknown = set(dims) - bindable
    if unknown:
        raise InvalidArgumentError(f"cannot bind dim(s) {sorted(unknown)}: the model's symbolic dims are "
                                   f"{sorted(bindable) or 'none'} (those of its inputs)")
    for vi in [*g.input, *g.output, *g.value_info]:
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])  # a oneof: clears dim_param
    # intermediates are re-inferred from the bound inputs rather than trusted
    del g.value_info[:]


# ---- conversion ---------------------------------------------------------------------------------------------
def _shape_of(tp) -> tuple[str | None, tuple | None]:
    if not tp.HasField("tensor_type"):
        return None, None
    tt = tp.tensor_type
    dtype = onnx_elem_type_to_dtype(tt.elem_type) if tt.elem_type else None
    if not tt.HasField("shape"):
        return dtype, None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value) if d.dim_value >= 0 else None)  # exporters write -1 for "unknown"
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, tuple(dims)


def _elem_text(elem_type: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return "unknown"


def type_text(tp) -> str:
    """An ONNX TypeProto in onnxruntime's spelling: ``tensor(float)``, ``seq(tensor(int64))``,
    ``map(string,tensor(float))``, ``optional(tensor(float))``, ``sparse_tensor(float)``."""
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        return f"tensor({_elem_text(tp.tensor_type.elem_type)})"
    if which == "sequence_type":
        return f"seq({type_text(tp.sequence_type.elem_type)})"
    if which == "map_type":
        return f"map({_elem_text(tp.map_type.key_type)},{type_text(tp.map_type.value_type)})"
    if which == "optional_type":
        return f"optional({type_text(tp.optional_type.elem_type)})"
    if which == "sparse_tensor_type":
        return f"sparse_tensor({_elem_text(tp.sparse_tensor_type.elem_type)})"
    return which or "unknown"


def _attr_value(a):
    import onnx
    from onnx import helper, numpy_helper

    A = onnx.AttributeProto
    if a.type == A.TENSOR:
        return numpy_helper.to_array(a.t)
    if a.type == A.TENSORS:
        return [numpy_helper.to_array(t) for t in a.tensors]
    if a.type == A.STRING:
        return a.s.decode("utf-8", "replace")
    if a.type == A.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings]
    return helper.get_attribute_value(a)


class _Converter:
    def __init__(self, opsets, what, external: _ExternalData, reuse: Mapping[str, Tensor] | None):
        self.opsets, self.what, self.external, self.reuse = opsets, what, external, reuse or {}

    def initializer(self, t) -> np.ndarray:
        import onnx
        from onnx import numpy_helper

        old = self.reuse.get(t.name)
        if old is not None and old.initializer is not None:
            return old.initializer
        # numpy reads a negative dim as "infer this one": dims [-1, 4] would load as (n, 4) from whatever the data
        # holds. onnx.checker refuses them for embedded data, but never sees external initializers (see
        # _for_checker) and does not run with check=False.
        if any(d < 0 for d in t.dims):
            raise ModelFormatError(f"ONNX model {self.what}: initializer {t.name!r} has negative dimension(s) "
                                   f"{list(t.dims)}; the file is damaged")
        try:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                arr = self.external.array(t)
            else:
                arr = numpy_helper.to_array(t)
        except ModelFormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnx raises assorted types on bad tensor payloads
            raise ModelFormatError(f"ONNX model {self.what}: initializer {t.name!r} ({list(t.dims)}) could not be "
                                   f"read: {exc}") from None
        if arr.shape != tuple(int(d) for d in t.dims):
            raise ModelFormatError(f"ONNX model {self.what}: initializer {t.name!r} declares dims {list(t.dims)} but "
                                   f"its data reads as shape {list(arr.shape)}")
        if arr.flags.writeable:
            arr.flags.writeable = False
        return arr

    def graph(self, g, source) -> tuple[Graph, set[str]]:
        """Convert one (sub)graph; returns it and its free names (outer-scope values it reads)."""
        import onnx

        tensors: dict[str, Tensor] = {}

        def add(vi):
            dtype, shape = _shape_of(vi.type)
            kind = vi.type.WhichOneof("value")
            value_type = type_text(vi.type) if kind and kind != "tensor_type" else None
            old = tensors.get(vi.name)
            if old is None:
                tensors[vi.name] = Tensor(vi.name, dtype, shape, value_type=value_type)
            else:
                old.dtype = old.dtype or dtype
                old.shape = old.shape if old.shape is not None else shape
                old.value_type = old.value_type or value_type

        for vi in [*g.input, *g.output, *g.value_info]:
            add(vi)
        for t in g.initializer:
            arr = self.initializer(t)
            tensors[t.name] = Tensor(t.name, onnx_elem_type_to_dtype(t.data_type), tuple(int(d) for d in t.dims),
                                     initializer=arr)
        init_names = {t.name for t in g.initializer}
        defined = {i.name for i in g.input} | init_names
        free: set[str] = set()
        nodes: list[Node] = []
        names_used: set[str] = set()
        for idx, n in enumerate(g.node):
            label = n.name or f"{n.op_type}_{idx}"
            while label in names_used:
                label = f"{label}_{idx}"
            names_used.add(label)
            attrs, subgraphs, implicit = {}, {}, []
            for a in n.attribute:
                bodies = ([(a.name, a.g)] if a.type == onnx.AttributeProto.GRAPH else
                          [(f"{a.name}[{k}]", s) for k, s in enumerate(a.graphs)]
                          if a.type == onnx.AttributeProto.GRAPHS else [])
                if not bodies:
                    attrs[a.name] = _attr_value(a)
                for key, body in bodies:
                    sub, sub_free = self.graph(body, body)
                    subgraphs[key] = sub
                    for f in sorted(sub_free):
                        if f not in implicit:
                            implicit.append(f)
            node = Node(label, n.op_type, _norm_domain(n.domain), list(n.input), list(n.output), attrs, subgraphs,
                        idx, implicit)
            for i in node.all_inputs():
                if i not in defined:
                    free.add(i)
            for o in node.outputs:
                if o:
                    defined.add(o)
                    tensors.setdefault(o, Tensor(o, None, None))
            nodes.append(node)
        graph = Graph(g.name or "graph", nodes, tensors, [i.name for i in g.input if i.name not in init_names],
                      [o.name for o in g.output], dict(self.opsets), source)
        _attach_quant(graph)
        return graph, free


def _const_value(graph: Graph, name: str) -> np.ndarray | None:
    t = graph.tensors.get(name)
    if t is not None and t.initializer is not None:
        return t.initializer
    p = graph.producer(name)
    if p is not None and p.op_type == "Constant" and isinstance(p.attrs.get("value"), np.ndarray):
        return p.attrs["value"]
    return None


def _attach_quant(graph: Graph) -> None:
    """QuantParams on every tensor a Q/DQ/QLinear op gives constant scale (and zero-point) inputs."""
    for node in graph.nodes:
        triples = _QUANT_TRIPLES.get((node.domain, node.op_type))
        if triples is None and node.domain == "com.microsoft" and node.op_type == "QLinearConcat":
            triples = ((-1, 0, 1),) + tuple((k, k + 1, k + 2) for k in range(2, len(node.inputs) - 2, 3))
        for pos, s_pos, z_pos in triples or ():
            name = node.outputs[-pos - 1] if pos < 0 else node.inputs[pos] if pos < len(node.inputs) else ""
            if not name or name not in graph.tensors or s_pos >= len(node.inputs) or not node.inputs[s_pos]:
                continue
            scale = _const_value(graph, node.inputs[s_pos])
            if scale is None:
                continue  # dynamic quantization: parameters computed at run time
            zp = _const_value(graph, node.inputs[z_pos]) if z_pos < len(node.inputs) and node.inputs[z_pos] else None
            t = graph.tensors[name]
            if zp is None:
                zp = np.zeros(scale.shape, np.dtype(t.dtype) if t.dtype in ("int8", "uint8", "int16", "uint16")
                              else np.uint8)
            axis = None
            if scale.size > 1:
                if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    axis = int(node.attrs.get("axis", 1))
                elif node.op_type == "QLinearConv":
                    axis = 0 if pos == 3 else 1  # weights per output channel (M), activations per channel (C)
                else:
                    axis = -1  # QLinearMatMul's b: per column
                if axis < 0 and t.rank:
                    axis += t.rank
            t.quant = QuantParams(scale, zp, axis)


# ---- entry point --------------------------------------------------------------------------------------------
def load_onnx(src, dims: Mapping[str, int] | None = None, *, base_dir: str | None = None, check: bool = True,
              name_free_dims: bool = False, _initializers: Mapping[str, Tensor] | None = None) -> Graph:
    """Load an ONNX model into the graph IR.

    ``src``: a path (external data is read from the model's directory), the model's bytes, or an ``onnx.ModelProto``
    (pass ``base_dir`` if it refers to external data). ``dims`` binds symbolic dims (e.g. ``{"batch": 1}``) before
    shape inference. ``check=False`` skips ``onnx.checker`` (our own structural checks always run).
    ``name_free_dims``: every unnamed dynamic dim of the inputs (``-1`` or ``?``, which exporters write for "any
    size") becomes the symbolic dim ``<input>_<axis>``, so that a caller can bind them one by one.
    The caller's ModelProto is never modified. Raises ModelFormatError / UnsupportedOpError / ModelNotFoundError.
    """
    import onnx

    model, base_dir, what = _parse(src, base_dir)
    try:
        if name_free_dims:
            model = _name_free_dims(model, copy=model is src)
        return _load(model, dims, base_dir, what, check, _initializers, owned=model is not src)
    except (EdgertError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile file must never escape as a bare TypeError/KeyError
        raise ModelFormatError(f"ONNX model {what} is malformed: {type(exc).__name__}: {exc}") from exc


def _name_free_dims(model, copy: bool):
    """``model`` with each unnamed dynamic dim of its inputs named ``<input>_<axis>``; a copy when ``copy`` (the
    caller's model: it stays as it was, and what the graph keeps does not change with it)."""
    import onnx

    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        model = out
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if (d.HasField("dim_value") and d.dim_value < 0) or (d.HasField("dim_param") and d.dim_param in ("?", "")):
                d.dim_param = f"{vi.name}_{axis}"
    return model


def _load(model, dims, base_dir, what, check, _initializers, owned: bool) -> Graph:
    """``owned``: ``model`` is the loader's own (parsed here, or a copy), free to change."""
    import onnx

    if not model.HasField("graph") or model.ir_version < 3:
        raise ModelFormatError(f"ONNX model {what} has no graph or an invalid IR version ({model.ir_version}); the "
                               "file is not an ONNX model or is damaged")
    if not model.opset_import:
        raise ModelFormatError(f"ONNX model {what} imports no opset; an ONNX model must list opset_import")
    opsets: dict[str, int] = {}
    for o in model.opset_import:
        opsets[_norm_domain(o.domain)] = int(o.version)
    functions = {(_norm_domain(f.domain), f.name) for f in model.functions}

    def own(m):  # a model free to change: the loader's own, else a copy (the caller's is never changed)
        if owned:
            return m
        c = onnx.ModelProto()
        c.CopyFrom(m)
        return c

    if _check_graph(model.graph, opsets, functions, what, set()):
        model, owned = own(model), True
        _sort_by_scope(model.graph)
    if check:
        try:
            onnx.checker.check_model(_for_checker(model))
        except onnx.checker.ValidationError as exc:
            msg = str(exc).strip().splitlines()
            raise ModelFormatError(f"ONNX model {what} fails onnx.checker: {' '.join(msg)[:2000]}") from None
    warnings: list[str] = []
    if dims:
        model, owned = own(model), True
        _bind_dims(model, dims)
    declared = _declared_output_shapes(model)
    if declared:
        model, owned = own(model), True
        for o in model.graph.output:
            if o.name in declared:
                o.type.tensor_type.ClearField("shape")  # inferred from the nodes; merged back below
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        inferred, strict_error = None, str(exc).strip()
        if any(vi.type.tensor_type.HasField("shape") for vi in model.graph.value_info):
            # a stale value_info shape (a tool's leftover) fails strict inference, and the non-strict pass kept it:
            # a wrong size for a buffer, where onnxruntime computes the shape and runs
            unshaped = onnx.ModelProto()
            unshaped.CopyFrom(model)
            for vi in unshaped.graph.value_info:
                vi.type.tensor_type.ClearField("shape")
            try:
                inferred = onnx.shape_inference.infer_shapes(unshaped, check_type=True, strict_mode=True,
                                                             data_prop=True)
                warnings.append(f"the model's value_info shapes disagree with its nodes ({strict_error[:300]}); "
                                "they were ignored and the shapes inferred")
            except (onnx.shape_inference.InferenceError, RuntimeError):
                pass
    if inferred is None:
        warnings.append(f"strict shape inference failed ({strict_error[:500]}); used the non-strict pass")
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        except Exception as exc2:  # noqa: BLE001 - keep the model's own annotations
            warnings.append(f"shape inference failed ({str(exc2).strip()[:500]}); shapes are the model's own")
            inferred = model
    warnings.extend(_merge_declared_output_shapes(inferred, declared))
    conv = _Converter(opsets, what, _ExternalData(base_dir, what), _initializers)
    graph, free = conv.graph(inferred.graph, inferred)
    if free:  # _check_graph already rejects these; kept as a guard for the invariant
        raise ModelFormatError(f"ONNX model {what}: tensors {sorted(free)} are read but never defined")
    graph.warnings.extend(warnings)
    graph.base_dir = base_dir
    if model.ir_version >= 4:  # before IR 4 every initializer is listed as an input, and none is overridable
        inits = {t.name for t in model.graph.initializer}
        graph.overridable = [i.name for i in model.graph.input if i.name in inits]
    return graph.prune()


def _declared_output_shapes(model) -> dict:
    """Graph output -> a copy of the shape it declares (tensor outputs with a declared shape with any dim)."""
    out = {}
    for o in model.graph.output:
        if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape") and o.type.tensor_type.shape.dim:
            shape = type(o.type.tensor_type.shape)()
            shape.CopyFrom(o.type.tensor_type.shape)
            out[o.name] = shape
    return out


def _merge_declared_output_shapes(inferred, declared: Mapping) -> list[str]:
    """Give each graph output of ``inferred`` (inferred with its declared shape cleared) the shape the model computes,
    as onnxruntime does: it warns about a declared shape the nodes contradict (an export that kept an old shape) and
    returns what they compute. Where shape inference cannot tell a dim (none, or a name of its own, ``unk__N``) the
    declared one stays, as before. Returns a note per contradiction, for ``Graph.warnings``."""
    notes = []

    def text(shape):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in shape.dim]

    for o in inferred.graph.output:
        want = declared.get(o.name)
        if want is None:
            continue
        tt = o.type.tensor_type
        if not tt.HasField("shape"):  # nothing computed (an op onnx does not know, or inference failed)
            tt.shape.CopyFrom(want)
            continue
        got = tt.shape
        if len(got.dim) != len(want.dim):
            notes.append(f"output {o.name!r} declares shape {text(want)} but the model computes rank "
                         f"{len(got.dim)} ({text(got)}): the computed shape is used, as onnxruntime does")
            continue
        clash = False
        for g, w in zip(got.dim, want.dim):
            if g.HasField("dim_value"):
                clash |= w.HasField("dim_value") and g.dim_value != w.dim_value
            elif not g.dim_param or g.dim_param.startswith("unk__") or w.HasField("dim_param"):
                g.CopyFrom(w)  # a name the model declares is kept over inference's (onnxruntime reports it too)
        if clash:
            notes.append(f"output {o.name!r} declares shape {text(want)} but the model computes {text(got)}: the "
                         "computed shape is used, as onnxruntime does")
    return notes


def _for_checker(model):
    """The model as onnx.checker should see it. The checker wants external files next to a path; we check those
    ourselves when reading them, so each external initializer is declared as a graph input of the same type and shape
    instead (no data is read or copied). And it requires every graph output to declare a shape, which onnxruntime
    does not (shape inference gives it): an output without one is given an empty one here. A copy, when either
    applies."""
    import onnx
    from onnx import helper

    shapeless = [k for k, o in enumerate(model.graph.output)
                 if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if not (shapeless or external):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for k in shapeless:
        g.output[k].type.tensor_type.shape.SetInParent()
    if not external:
        return m
    keep = [t for t in g.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    moved = [t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inputs = {i.name for i in g.input}
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved
                   if t.name not in inputs)
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


def save_onnx(model, path) -> None:
    """Write a ModelProto (e.g. ``Graph.subgraph_model``'s) to ``path``; large models go to external data. Weights a
    ``subgraph_model`` export references in the original model's external data files are copied into the written
    model (or its own external file), so it does not depend on where the original lives."""
    import onnx
    from onnx import external_data_helper

    folder = external_data_dir(model)
    if folder is not None:
        own = onnx.ModelProto()
        own.CopyFrom(model)
        external_data_helper.load_external_data_for_model(own, folder)
        keep = [p for p in own.metadata_props if p.key != EXTERNAL_DATA_DIR]  # the folder no longer applies
        del own.metadata_props[:]
        own.metadata_props.extend(keep)
        model = own
    big = model.ByteSize() > (1 << 30)
    onnx.save_model(model, str(path), save_as_external_data=big,
                    location=os.path.basename(str(path)) + ".data" if big else None)


__all__ = ["load_onnx", "save_onnx"]
