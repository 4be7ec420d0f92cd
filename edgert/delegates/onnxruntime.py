"""The ``onnxruntime`` delegate: each partition exported as a standalone ONNX model (``Graph.subgraph_model``) and
run by an onnxruntime InferenceSession with the execution providers the profile names, through IOBinding so that
inputs are read from, and outputs written into, edgert's pinned buffers (no onnxruntime-owned output arrays).

A provider the profile names but this onnxruntime lacks: with ``fallback="allow"`` it is dropped with a warning (the
CPU provider stays last, as onnxruntime itself does); with ``"forbid"`` it is a DeviceError. ``emulate`` runs the
partition on the CPU provider alone. Also used by the host delegate for the nodes the C core does not take.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..errors import DeviceError, ModelFormatError, warn_caller
from ..graph.ir import external_data_dir
from ..ort_options import onnxruntime_module as _ort
from ..ort_options import EXACT_INT8_ENTRY, session_options
from .base import CompiledPartition, Delegate, register

CPU = "CPUExecutionProvider"


def resolve_providers(wanted: list[str], fallback: str = "allow", emulate: bool = False,
                      provider_options: Mapping[str, Any] | None = None) -> tuple[list[str], list[dict]]:
    """The providers to create a session with, and their options: ``wanted`` minus what this onnxruntime lacks
    (warned about, or a DeviceError with ``fallback="forbid"``), CPU last. ``emulate``: the CPU provider alone."""
    ort = _ort()
    if emulate:
        return [CPU], [{}]
    have = set(ort.get_available_providers())
    missing = [p for p in wanted if p not in have]
    if missing:
        msg = (f"onnxruntime {ort.__version__} lacks {', '.join(missing)} (available: {', '.join(sorted(have))})")
        if fallback == "forbid":
            raise DeviceError(msg + "; install the onnxruntime build that ships it, or use emulate=True / "
                              "fallback='allow'")
        warn_caller(msg + "; running on what is available")
    providers = [p for p in wanted if p in have]
    if CPU not in providers:
        providers.append(CPU)
    popts = dict(provider_options or {})
    return providers, [dict(popts) if p != CPU and popts else {} for p in providers]


def _config_entry(sess_options, key: str) -> str | None:
    """A SessionOptions config entry, None when not set (or no options)"""
    if sess_options is None:
        return None
    try:
        return sess_options.get_session_config_entry(key)
    except Exception:  # onnxruntime raises for a key not set
        return None


def inference_session(model, sess_options=None, providers=(CPU,), provider_options=None):
    """An InferenceSession of ``model``: a ModelProto (a ``Graph.subgraph_model`` export), its bytes or a path. A
    ModelProto runs with exact int8 products (ort_options.EXACT_INT8_ENTRY, set on ``sess_options``), with explicit
    zero points where onnxruntime needs them (added in place: hand a copy to keep yours), unless onnxruntime fails
    on it in that mode (exact_int8_fails): then with its default int8 kernels.
    Initializers the export references in the original model's external data files are read from there in place, as
    onnxruntime reads the whole model's (it maps them): embedding them cost a copy per partition, 1361 MB of RSS
    against plain onnxruntime's 578 MB for a 256 MB weight, and a model over protobuf's 2 GB could not run."""
    ort = _ort()
    if hasattr(model, "SerializeToString"):
        sess_options = sess_options or ort.SessionOptions()
        exact = _config_entry(sess_options, EXACT_INT8_ENTRY[0])
        if exact_int8_fails(model):
            if exact == "1":  # options shared with an earlier segment (onnxruntime warns on this overwrite)
                exact = "0"
                sess_options.add_session_config_entry(EXACT_INT8_ENTRY[0], exact)
        elif exact is None:  # a segment after one that set "0" keeps the default kernels: no second overwrite
            exact = EXACT_INT8_ENTRY[1]
            sess_options.add_session_config_entry(EXACT_INT8_ENTRY[0], exact)
        if exact == "1":
            explicit_zero_points(model)
        folder = external_data_dir(model)
        if folder is not None:
            key = "session.model_external_initializers_file_folder_path"
            if _config_entry(sess_options, key) != folder:  # segments share options: set once (it warns on overwrites)
                sess_options.add_session_config_entry(key, folder)
        model = model.SerializeToString()
    return ort.InferenceSession(model, sess_options, providers=list(providers), provider_options=provider_options)


def _subgraphs(node):
    import onnx

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def exact_int8_fails(model) -> bool:
    """Whether onnxruntime 1.32 fails on ``model`` in its exact int8 mode (ort_options.EXACT_INT8_ENTRY), which
    rewrites int8 weights to uint8: an int8 initializer that two or more DequantizeLinear nodes read ("Attempt to
    replace the existing tensor" at load); a DequantizeLinear with a Constant node's output for its input or scale,
    an int8 initializer with a scale that is not one, or one inside a subgraph (If, Loop, Scan), when its scales
    are per-axis and it has no zero point (refused at run time; checked without looking at the scales). Such a
    model runs with onnxruntime's default int8 kernels."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for g in _subgraphs(node):
            stack = [g]
            while stack:
                sub = stack.pop()
                for n in sub.node:
                    if n.op_type == "DequantizeLinear":
                        return True
                    stack.extend(_subgraphs(n))
        if node.op_type != "DequantizeLinear" or not node.input:
            continue
        if any(i in constants for i in node.input[:2]):
            return True
        x = inits.get(node.input[0])
        if x is not None and x.data_type == onnx.TensorProto.INT8:
            if len(node.input) < 2 or node.input[1] not in inits:  # explicit_zero_points cannot see its scale
                return True
            readers[x.name] = readers.get(x.name, 0) + 1
    return any(count > 1 for count in readers.values())


def explicit_zero_points(model) -> None:
    """Give every DequantizeLinear of a constant int8 tensor with per-axis or blocked scales and no zero point an
    explicit zero point of zeros (what an absent one means), in place. Exact int8 products (ort_options.EXACT_INT8_ENTRY)
    make onnxruntime rewrite int8 weights to uint8 with a zero point of 128, and for such a node it writes that zero
    point as a scalar, which the per-axis kernel then refuses at run time (onnxruntime 1.32)."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    taken = set(inits) | {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        x, scale = inits.get(node.input[0]), inits.get(node.input[1])
        if x is None or scale is None or x.data_type != onnx.TensorProto.INT8 or len(scale.dims) == 0:
            continue
        if len(node.input) > 2 and node.input[2]:
            continue
        name, i = f"{node.input[0]}__edgert_zero_point", 0
        while name in taken:  # a name of its own: nothing else defines it, no other node's shape
            i += 1
            name = f"{node.input[0]}__edgert_zero_point_{i}"
        taken.add(name)
        model.graph.initializer.append(onnx.helper.make_tensor(
            name, onnx.TensorProto.INT8, list(scale.dims), np.zeros(int(np.prod(scale.dims)), np.int8).tobytes(),
            raw=True))
        del node.input[2:]  # an empty name stands for no zero point too
        node.input.append(name)


class OnnxruntimePartition(CompiledPartition):
    """An InferenceSession for one exported partition, run through IOBinding. The binding is kept between runs and
    a buffer is rebound only when the caller hands a different one (pointer, shape or dtype), so the steady-state
    run is one ``run_with_iobinding`` call. An output handed as None (a data-dependent shape) is bound to the CPU
    device before each run, onnxruntime allocates it, and the array (a view of onnxruntime's value, which it keeps
    alive) is stored in the caller's ``outputs``: a pre-bound buffer of the wrong size failed the run. Handed again
    holding that array, the output is still onnxruntime's to allocate."""

    allocates_outputs = True

    def __init__(self, model, inputs: list[str], outputs: list[str], providers: list[str],
                 provider_options: list[dict] | None = None, sess_options=None):
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.providers = list(providers)
        try:
            self.session = inference_session(model, sess_options, self.providers, provider_options)
        except DeviceError:
            raise
        except Exception as exc:
            if type(exc).__name__ in ("InvalidGraph", "InvalidProtobuf") or any(
                    m in str(exc) for m in ("ShapeInferenceError", "TypeInferenceError", "Type Error:")):
                # the graph itself breaks the ONNX spec (an axis out of range, types or shapes that cannot meet)
                raise ModelFormatError(f"the model is not valid ONNX: onnxruntime refused it: {exc}") from exc
            raise DeviceError(f"onnxruntime could not load the partition ({', '.join(self.providers)}): {exc}") from exc
        self._bound: dict[str, tuple] = {}
        self._same: dict[str, np.ndarray | None] = {}  # name -> the array object bound (identity fast path)
        self._alloc: dict[str, int] = {}  # output onnxruntime allocates -> its index among the binding's outputs
        self._made: dict[str, np.ndarray] = {}  # its array from the last run (stored in the caller's outputs)
        self._new_binding()

    def _new_binding(self) -> None:
        self._binding = self.session.io_binding()
        # the pybind objects under the wrappers, looked up once: the wrapper's run adds ~10 us of checks per run
        # (measured on a 0.1 ms model)
        self._run_raw = getattr(self.session, "_sess", None)
        self._iob_raw = getattr(self._binding, "_iobinding", None)
        if self._run_raw is None or self._iob_raw is None:
            self._run_raw = self._iob_raw = None
        else:
            self._cpu = _ort().OrtDevice.make("cpu", 0)._get_c_device()

    def _bind_alloc(self, name: str) -> None:
        """Bind ``name`` to the CPU device with no buffer: the next run allocates it."""
        if self._iob_raw is not None:
            self._iob_raw.bind_output(name, self._cpu)
        else:
            self._binding.bind_output(name, "cpu")

    def _key(self, a: np.ndarray) -> tuple:
        return (a.ctypes.data, a.shape, a.dtype.str)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray | None]) -> None:
        self._bind_buffers(inputs, outputs)
        self._run_bound(outputs)

    def bound_run(self, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray | None]):
        self._bind_buffers(inputs, outputs)
        if any(self._same.get(n) is not inputs[n] for n in self.inputs):
            return super().bound_run(inputs, outputs)  # a buffer onnxruntime cannot read in place: copied each run

        def run() -> None:  # the buffers stay bound: a run is one run_with_iobinding
            if not self._same:  # a failed run dropped the binding: bind again
                self._bind_buffers(inputs, outputs)
            self._run_bound(outputs)
        return run

    def _bind_buffers(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        b = self._binding
        same = self._same
        for name in self.inputs:
            a = inputs[name]
            if same.get(name) is a:  # the very buffer bound last run (the session's pool): nothing to do
                continue
            key = self._key(a)
            if self._bound.get(name) != key:
                if not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                    key = None  # a temporary: bind again next time
                b.bind_cpu_input(name, a)
                self._bound[name] = key
            same[name] = a if key is not None else None
        for k, name in enumerate(self.outputs):
            a = outputs[name]
            if a is None or a is self._made.get(name):  # the dict handed again holds the last run's array
                if name not in self._alloc:
                    # bound here in the outputs' order, so its index in get_outputs() is k (a later bind of the same
                    # name keeps its place); bound again before each run, which leaves the last value there
                    self._bind_alloc(name)
                    self._alloc[name] = k
                    self._bound.pop("\0" + name, None)
                    same.pop("\0" + name, None)
                continue
            self._alloc.pop(name, None)
            if same.get("\0" + name) is a:
                continue
            key = self._key(a)
            if self._bound.get("\0" + name) != key:
                b.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
                self._bound["\0" + name] = key
            same["\0" + name] = a

    def _run_bound(self, outputs: dict) -> None:
        alloc = self._alloc
        try:
            for name in alloc:
                self._bind_alloc(name)
            if self._run_raw is not None:
                self._run_raw.run_with_iobinding(self._iob_raw, None)
            else:
                self.session.run_with_iobinding(self._binding)
        except Exception as exc:
            self._bound.clear()  # the binding may be half-updated
            self._same.clear()
            alloc.clear()
            self._new_binding()
            raise DeviceError(f"onnxruntime failed running a partition ({', '.join(self.providers)}): {exc}") from exc
        if alloc:
            values = (self._iob_raw if self._iob_raw is not None else self._binding).get_outputs()
            for name, k in alloc.items():
                outputs[name] = self._made[name] = values[k].numpy()

    def run_alloc(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with onnxruntime allocating the outputs (used once per shape to learn output shapes)."""
        try:
            res = self.session.run(self.outputs, {n: inputs[n] for n in self.inputs})
        except Exception as exc:
            raise DeviceError(f"onnxruntime failed running a partition ({', '.join(self.providers)}): {exc}") from exc
        return dict(zip(self.outputs, res))

    def close(self) -> None:
        self._binding = self._run_raw = self._iob_raw = None
        self.session = None


class OnnxruntimeDelegate(Delegate):
    """Runs a partition with the execution providers in ``unit.delegate_options["providers"]`` (the CPU provider
    when the unit names none, as the host unit does). ``options``: ``fallback``, ``emulate``, ``threads``."""

    @classmethod
    def available(cls, unit: Any = None) -> tuple[bool, str]:
        try:
            ort = _ort()
        except DeviceError as exc:
            return False, str(exc)
        wanted = list(((getattr(unit, "delegate_options", None) or {}).get("providers")) or [CPU])
        have = ort.get_available_providers()
        missing = [p for p in wanted if p not in have]
        if missing:
            return False, f"onnxruntime {ort.__version__} lacks {', '.join(missing)}"
        return True, f"onnxruntime {ort.__version__} with {', '.join(wanted)}"

    def compile(self, partition, graph, unit: Any = None, options: Mapping[str, Any] | None = None):
        options = dict(options or {})
        dopts = dict(getattr(unit, "delegate_options", None) or {})
        providers, popts = resolve_providers(list(dopts.get("providers") or [CPU]), options.get("fallback", "allow"),
                                             bool(options.get("emulate")), dopts.get("provider_options"))
        so = session_options(dopts.get("session_options"), options.get("threads") or dopts.get("threads"))
        model = graph.subgraph_model(partition.nodes, name=f"{graph.name}_p{getattr(partition, 'id', 0)}")
        return OnnxruntimePartition(model, partition.inputs, partition.outputs, providers, popts, so)


register("onnxruntime", OnnxruntimeDelegate)
