"""Session: run an ONNX model on a device profile — plan, compile each partition with its delegate, run with pinned
buffers, count what crosses each link. onnxruntime's InferenceSession shape: ``get_inputs``/``get_outputs``/``run``.

A tensor's trip in ``Session.run``: feed -> its host pool buffer -> partition 1 (delegate) -> counted copy into the
device-side staging buffer (``to_device``) -> partition 2 -> counted copy back (``to_host``) -> ... -> outputs.
Every tensor that crosses a partition boundary (and every graph input and output) lives in a buffer of a
``PinnedPool`` laid out once per binding of the model's dims (at creation, or at the first run for a model with
symbolic dims); the copies follow the plan's transfer list, so the bytes counted equal the plan's. The exception is
a graph output whose shape the data decides, made on the host and read by no other partition: when a value-sized op
(NonZero, ...) makes it, or once a run has changed its shape, the partition's runtime allocates it at each run
(``_Bound.allocated``). A tensor between
two partitions of one unit whose delegate keeps tensors resident (serial-npu) has no transfer: it stays on the device
(the delegate is told which of its partition's inputs and outputs those are) and no host buffer is copied for it.

``emulate=True`` runs device partitions on onnxruntime's CPU provider but keeps every staging buffer and copy, so
plans, outputs and bytes moved can be checked on a machine without the device. Without ``emulate``, a device whose
runtime is missing is a DeviceError (``fallback="forbid"``) or, with ``"allow"``, a warning and a plan for the host
unit alone (then nothing crosses a link; ``requested_plan`` keeps the device plan).

This module must not import the CLI or the server.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from . import delegates, native, profiles
from .buffers import CopyCounter, PinnedPool
from .errors import DeviceError, DTypeError, InvalidArgumentError, ShapeError, check_count, warn_caller
from .formats.onnx import load_onnx
from .formats.tflite import is_tflite_graph
from .graph.ir import Graph, onnx_types
from .plan import Plan, forbidden, plan as make_plan, refused_at_any_dims

_clock = time.perf_counter

HOST = "host"  # the side of every buffer in host memory
# bindings of the dims a Session keeps laid out, least recently used dropped first: inputs whose shapes alternate
# re-plan and recompile nothing (each re-binding cost 4-19 ms). A binding holds its compiled partitions and pools
LAYOUTS_KEPT = 8


@dataclass(frozen=True)
class IOInfo:
    """A graph input or output: ``shape`` with symbolic dims as strings (None when unknown), ``dtype`` a
    ``numpy.dtype`` (equal to its name too: ``dtype == np.float32`` and ``dtype == "float32"`` both hold; None when
    unknown). ``type`` is onnxruntime's spelling (``tensor(float)``)."""

    name: str
    shape: list
    dtype: np.dtype | None

    @property
    def type(self) -> str:
        names = {"float32": "float", "float64": "double", "bool": "bool"}
        d = None if self.dtype is None else str(self.dtype)
        return f"tensor({names.get(d or '', d or 'unknown')})"


def _np_dtype(name: str | None):
    try:
        return None if name is None else np.dtype(name)
    except TypeError:  # a type numpy has not (bfloat16, string...): its name
        return name


def _io_infos(graph: Graph, names) -> list[IOInfo]:
    """``IOInfo`` of each of ``graph``'s tensors ``names`` (its inputs, outputs or overridable initializers); a dim
    shape inference named itself (``unk__N``) is None, as onnxruntime lists it."""
    return [IOInfo(n, [None if isinstance(d, str) and d.startswith("unk__") else d
                       for d in graph.tensors[n].shape or []], _np_dtype(graph.tensors[n].dtype)) for n in names]


@dataclass
class _Copy:
    tensor: str
    direction: str
    src: np.ndarray
    dst: np.ndarray


_NO_COPIES = {"to_device": 0, "to_host": 0}  # Session._last of a run that moved nothing (shared, never mutated)


def _byte_view(buf: np.ndarray):
    """A writeable byte memoryview of a C-contiguous buffer, for the fast run path's input copies; None when there is
    none (the path then copies with np.copyto)."""
    try:
        return memoryview(buf).cast("B") if buf.flags.c_contiguous and buf.flags.writeable else None
    except TypeError:  # a zero-size buffer
        return None


_telemetry = None  # edgert.telemetry, imported at the first run (it is heavy; most sessions never record)


def _telemetry_on() -> bool:
    global _telemetry
    if _telemetry is None:
        from . import telemetry as _telemetry
    return _telemetry.enabled()


@dataclass
class _Bound:
    """Everything laid out for one binding of the model's dims."""

    dims: dict
    graph: Graph
    plan: Plan
    compiled: list
    pools: dict                     # side -> PinnedPool
    feeds: dict                     # graph input -> host buffer
    in_bufs: list                   # per partition: name -> buffer
    out_bufs: list
    before: list                    # copies of graph inputs to device sides, before any partition
    after: list                     # per partition: copies to run right after it
    results: dict                   # graph output -> host buffer
    input_shapes: dict
    probed: bool
    # one partition on the host, nothing to copy around it: ((input, buffer, shape, dtype), ...), the partition's
    # bound_run(), the graph outputs' buffers in graph order; None otherwise
    fast: tuple | None = None
    runlog: Any = None              # telemetry.RunLog of the runs on this binding (made at the first recorded run)
    on_device: bool = False         # a partition keeps tensors in a device's memory: kept alone, never beside others
    overrides: tuple = ()           # overridable initializers fed as inputs on this binding (graph.with_inputs)
    requested_plan: Any = None      # the plan asked for, and why it fell back to the host (Session's attributes)
    fell_back: str | None = None
    # graph output -> index of the partition whose runtime allocates it at each run (a data-dependent shape: no pool
    # buffer); results[output] is the last run's array
    allocated: dict = dataclasses.field(default_factory=dict)
    can_allocate: tuple = ()        # the graph outputs that could be (allocated once their shape has changed)


# ops whose output size is decided by their input values, whatever the shapes: NonZero's count of nonzeros, ...
VALUE_SIZED_OPS = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})
# ops that keep their input's element count: an output reached through them from a VALUE_SIZED op is sized by values
_SIZE_KEEPING_OPS = frozenset({"Cast", "Identity", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt",
                               "Not", "Floor", "Ceil", "Round", "Sign", "Transpose"})


def _value_sized(graph: Graph, name: str) -> bool:
    """Whether tensor ``name`` comes from a VALUE_SIZED op through ops that keep its element count."""
    node = graph.producer(name)
    for _ in range(16):
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type in VALUE_SIZED_OPS:
            return True
        if node.op_type not in _SIZE_KEEPING_OPS or not node.inputs:
            return False
        node = graph.producer(node.inputs[0])
    return False


def _load(src) -> Graph:
    """Load the model with every unnamed dynamic dim of its inputs named (``-1`` or ``?`` dims, which exporters
    write for "any size", become ``<input>_<axis>``) so that feeds can bind them one by one. A path is read only
    when it names a regular file (the loaders check)."""
    import onnx

    from .formats.tflite import is_tflite_bytes, is_tflite_path, load_tflite

    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if isinstance(src, memoryview):
        src = bytes(src)
    if is_tflite_path(src) or (isinstance(src, (bytes, bytearray)) and is_tflite_bytes(src[:8])):
        return load_tflite(src)  # static shapes: nothing to name
    if not isinstance(src, (str, bytes, bytearray, onnx.ModelProto)):
        raise InvalidArgumentError(f"model must be a path, the model's bytes or an onnx.ModelProto, got "
                                   f"{type(src).__name__}")
    return load_onnx(src, name_free_dims=True)


def _known(t) -> bool:
    shape = t.concrete_shape()
    return shape is not None and all(d >= 0 for d in shape) and t.dtype in np.sctypeDict


def _with_shapes(graph: Graph, learnt: Mapping[str, tuple], dtype_only: bool = False) -> Graph:
    """The graph with the shapes and dtypes in ``learnt`` (name -> (shape, numpy dtype), or the type of a value that
    is not a tensor) filled in (only the dtypes that are unknown, with ``dtype_only``)."""
    tensors = dict(graph.tensors)
    for name, learnt_as in learnt.items():
        t = tensors.get(name)
        if t is None:
            continue
        if isinstance(learnt_as, str):
            tensors[name] = dataclasses.replace(t, value_type=learnt_as)
            continue
        shape, dtype = learnt_as
        if dtype_only:
            if t.dtype is None:
                tensors[name] = dataclasses.replace(t, dtype=np.dtype(dtype).name)
        else:
            tensors[name] = dataclasses.replace(t, shape=tuple(int(d) for d in shape), dtype=np.dtype(dtype).name)
    return graph.replace(tensors=tensors)


def _as_feed(name: str, a, dtype: np.dtype) -> np.ndarray:
    """A non-array feed (a list, a scalar) as an array of the input's ``dtype``, refused when converting would
    change its values (floats into an integer input, integers out of the input's range, strings, objects)."""
    if dtype.kind not in "biuf":
        return np.asarray(a, dtype=dtype)
    raw = np.asarray(a)
    if raw.dtype.kind not in "biuf" or (dtype.kind in "biu" and raw.dtype.kind == "f"):
        raise DTypeError(f"input {name!r} must be {dtype}, got a {type(a).__name__} of {raw.dtype}")
    out = raw.astype(dtype)
    if dtype.kind in "biu" and not np.array_equal(out, raw):
        raise DTypeError(f"input {name!r} must be {dtype}: the {type(a).__name__} fed holds values out of its range")
    return out


def _checked_feed(name: str, a, dtype: np.dtype) -> np.ndarray:
    """The feed for input ``name`` as an array whose values the input's ``dtype`` holds as they are (the same type,
    perhaps in the other byte order); DTypeError otherwise."""
    if not isinstance(a, np.ndarray):
        a = _as_feed(name, a, dtype)
    if a.dtype != dtype and not np.can_cast(a.dtype, dtype, casting="equiv"):
        raise DTypeError(f"input {name!r} must be {dtype}, got {a.dtype}")
    return a


# the element types onnxruntime's Python API takes and returns as numpy arrays (its IOBinding binds the pool's buffers
# as they are): bfloat16, float8, int4/uint4 and float4 have no numpy type it converts (a feed was onnxruntime's bare
# "Numpy_type 256 can't be converted to MLDataType", a float8 output a DeviceError at the first run), complex none it
# converts either, and strings are Python objects, which a pool buffer (raw memory) cannot hold
ONNX_IO_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
                  "float32", "float64")


def check_io_dtypes(graph: Graph) -> None:
    """DTypeError for a graph input or output whose type a Session cannot feed or return: not a tensor (a sequence,
    map, optional), or of an element type numpy arrays in a pool cannot hold (dtypes not yet known are left to the
    shape probe)."""
    onnx_model = not is_tflite_graph(graph)
    for t in [*graph.inputs, *graph.outputs]:
        dtype = graph.tensors[t].dtype
        what = f"{'input' if t in graph.inputs else 'output'} {t!r}"
        value_type = graph.tensors[t].value_type
        if value_type is not None:
            raise DTypeError(f"{what} has type {value_type}, not a tensor: a Session feeds and returns numpy arrays "
                             "only. Keep the value inside the model (e.g. ConcatFromSequence or SequenceAt to a tensor "
                             "at its edge), or run this model with onnxruntime itself")
        if dtype == "string":
            raise DTypeError(f"{what} is a string tensor; a Session runs numeric tensors only")
        if onnx_model and dtype is not None and dtype not in ONNX_IO_DTYPES:
            raise DTypeError(f"{what} is {dtype}, a type a Session cannot feed or return as a numpy array (it takes "
                             f"{', '.join(ONNX_IO_DTYPES)}): add a Cast to one of them at the model's edge")


def _refuse_non_tensor_cuts(graph: Graph, p: Plan) -> None:
    """DTypeError when the plan passes a sequence (map, optional) between partitions: only tensors have buffers.
    The planner keeps the nodes that read or write one on the host, so this takes two host partitions around a
    device one."""
    for part in p.partitions:
        for t in graph.non_tensors([*part.inputs, *part.outputs]):
            raise DTypeError(f"value {t!r} has type {graph.tensors[t].value_type}, not a tensor, and the plan for "
                             f"{p.profile.name!r} passes it between partitions ({len(p.partitions)} in all): a Session "
                             "moves only tensors between partitions. Run it with max_partitions=1, or on the host")


def _side(plan: Plan, unit: str) -> str:
    return HOST if unit == plan.host_unit else unit


class Session:
    """Run ``model_path`` (a path or an onnx.ModelProto) on ``device`` (a profile name, path or DeviceProfile).

    ``fallback``: what to do with nodes or units the device cannot run ("allow": the host; "forbid": an error).
    ``emulate``: run device partitions functionally on the host, copies over the link kept and counted.
    ``dims``: bind symbolic dims now (else from the first run's feeds). ``threads``: host/onnxruntime threads
    (1 to ``edgert.native.MAX_THREADS``, 256; None: their defaults).
    ``output_views``: ``run`` returns the pool's output buffers themselves (valid until the next run, from any thread;
    no copy).
    ``core``: the host delegate's C core: "auto" (where it measures faster than onnxruntime), True (every
    quantized matmul it can take), False (off: every node on onnxruntime). ``telemetry``: record one
    event per run (when edgert telemetry is enabled)."""

    def __init__(self, model_path, device: Any = "host", fallback: str = "allow", emulate: bool = False, *,
                 dims: Mapping[str, int] | None = None, threads: int | None = None, output_views: bool = False,
                 core: bool | str = "auto", telemetry: bool = True, min_nodes_per_partition: int = 1,
                 max_partitions: int | None = None, lock_memory: bool = True,
                 device_options: Mapping[str, Any] | None = None):
        if fallback not in ("allow", "forbid"):
            raise InvalidArgumentError(f"fallback must be 'allow' or 'forbid', got {fallback!r}")
        if not isinstance(emulate, (bool, np.bool_)):
            raise InvalidArgumentError(f"emulate must be True or False, got {emulate!r}")
        if not (isinstance(device, (str, os.PathLike, profiles.DeviceProfile))):
            raise InvalidArgumentError(f"device must be a profile name, a .toml path or a DeviceProfile, got "
                                       f"{type(device).__name__}")
        threads = native.check_threads(threads)  # the C core's pool takes at most MAX_THREADS; onnxruntime an int32
        # checked here, not first at the plan (a model with symbolic dims plans at its first run)
        min_nodes_per_partition = check_count("min_nodes_per_partition", min_nodes_per_partition, lo=1)
        if max_partitions is not None:
            max_partitions = check_count("max_partitions", max_partitions, lo=1, note=" or None (no limit)")
        if not (core is True or core is False or core == "auto"):
            raise InvalidArgumentError(f"core must be 'auto', True or False, got {core!r}")
        if device_options is not None and not isinstance(device_options, Mapping):
            raise InvalidArgumentError(f"device_options must be a mapping (e.g. {{'url': ...}}), got "
                                       f"{type(device_options).__name__}")
        if dims is not None and not isinstance(dims, Mapping):
            raise InvalidArgumentError(f"dims must be a mapping of dim name -> size, got {type(dims).__name__}")
        for k, v in (dims or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgumentError(f"dims[{k!r}] must be an integer, got {v!r}")
        self.model_path = model_path if not hasattr(model_path, "__fspath__") else os.fspath(model_path)
        self.model_name = (os.path.basename(self.model_path) if isinstance(self.model_path, str)
                           else getattr(getattr(model_path, "graph", None), "name", "model"))
        self._graph0 = _load(self.model_path)
        check_io_dtypes(self._graph0)  # at creation, also when dims bind only at the first run
        self.profile = profiles.load(device) if isinstance(device, (str, os.PathLike)) else device
        # device_options (e.g. {"url": ...} for serial-npu) go to device delegates; a delegate with refine_unit
        # narrows its unit to what the device itself reports (serial-npu: HELLO) before anything is planned
        self.device_options = dict(device_options or {})
        profiles.check_device_options(self.profile, self.device_options)
        if not emulate:
            units = [getattr(delegates.get(u.delegate), "refine_unit", None) if delegates.is_registered(u.delegate)
                     else None for u in self.profile.units]
            if any(units):  # with the fallback: a device that does not answer is refused at creation under forbid
                refine_opts = {**self.device_options, "fallback": fallback}
                self.profile = dataclasses.replace(self.profile, units=[
                    f(u, refine_opts) if f else u for f, u in zip(units, self.profile.units)])
        self.device = self.profile.name
        self.fallback, self.emulate = fallback, bool(emulate)
        self.threads, self.output_views, self.core = threads, output_views, core
        self.telemetry, self.lock_memory = telemetry, lock_memory
        self._plan_kw = dict(min_nodes_per_partition=min_nodes_per_partition, max_partitions=max_partitions)
        self.counter = CopyCounter()
        self.requested_plan: Plan | None = None
        self.fell_back: str | None = None
        self._runs, self._busy_s, self._rebinds = 0, 0.0, 0
        # one run at a time: a run fills and reads the session's bound buffers (and a LiteRT interpreter is not
        # reentrant); runs from several threads were silently handed each other's outputs
        self._lock = threading.Lock()
        self._last = {"to_device": 0, "to_host": 0}
        self._bound: _Bound | None = None
        self._layouts: OrderedDict[tuple, _Bound] = OrderedDict()  # dims -> binding, most recently used last
        self._shape_varies: set[str] = set()  # data-shaped graph outputs seen to change: the runtime allocates them
        self._provisional: Plan | None = None
        dims = {str(k): int(v) for k, v in (dims or {}).items()}
        unknown_dims = sorted(set(dims) - self._graph0.symbolic_dims())
        if unknown_dims:
            raise InvalidArgumentError(f"dims names {', '.join(map(repr, unknown_dims))}, not a symbolic dim of the "
                                       f"model's inputs (those are {sorted(self._graph0.symbolic_dims())})")
        if not (self._graph0.symbolic_dims() - set(dims)):
            self._bound = self._keep(self._bind(dims, None))
        elif self.fallback == "forbid":
            # fail at creation, not at the first run. The plan waits for the dims (a unit that needs static shapes
            # refuses unbound ones), but a node no accelerator takes at any binding is refused now, and (on the
            # real device) every accelerator that could take a node once the dims are bound is checked
            g = self._graph0
            refused, reasons = refused_at_any_dims(g, self.profile)
            if refused:
                raise forbidden(self.profile, g, refused, reasons, sorted(g.symbolic_dims()))
            if not self.emulate:
                self._refuse_missing(self._missing_runtimes([
                    u for u in self.profile.units if u is not self.profile.host_unit and any(
                        ok or why.startswith("dynamic shape") for ok, why in (u.supports(n, g) for n in g.nodes))]))

    def _missing_runtimes(self, units) -> str:
        """What is missing to drive ``units`` on this machine, unit by unit ('' when nothing is)."""
        out = []
        for unit in units:
            if not delegates.is_registered(unit.delegate):
                why = f"edgert has no {unit.delegate!r} delegate to drive it"
            else:
                ok, why = delegates.get(unit.delegate).available(unit)
                if ok:
                    continue
            out.append(f"unit {unit.name!r} ({unit.kind}, delegate {unit.delegate}): {why}")
        return "; ".join(out)

    def _refuse_missing(self, what: str) -> None:
        if what:
            raise DeviceError(f"device {self.device!r} is not present on this machine: {what}. Run with "
                              "emulate=True to check its plan, outputs and bytes moved on the host, or "
                              "fallback='allow' to run everything on the host")

    # ---- onnxruntime-shaped API ---------------------------------------------------------------------------
    def get_inputs(self) -> list[IOInfo]:
        return _io_infos(self._graph0, self._graph0.inputs)

    def get_overridable_initializers(self) -> list[IOInfo]:
        """Initializers the model also lists as inputs (IR 4 on): a run may feed them, as onnxruntime's may."""
        return _io_infos(self._graph0, self._graph0.overridable)

    def get_outputs(self) -> list[IOInfo]:
        """The model's outputs as onnxruntime lists them: the shapes of the model (its declared dims, or inferred),
        not those of the last run's binding; a dim shape inference named itself (``unk__N``) is None."""
        return _io_infos(self._graph0, self._graph0.outputs)

    @property
    def plan(self) -> Plan:
        """The plan being run (after a dims binding), or a provisional plan over unbound dims before the first run of
        a model with symbolic dims (units that need static shapes refuse its dynamic nodes)."""
        if self._bound is not None:
            return self._bound.plan
        if self._provisional is None:
            self._provisional = make_plan(self._graph0, self.profile, fallback=self.fallback, **self._plan_kw)
        return self._provisional

    def stats(self) -> dict:
        b = self._bound
        pools = list(b.pools.values()) if b else []
        return {
            "runs": self._runs, "bytes_to_device": self.counter.bytes_to_device,
            "bytes_to_host": self.counter.bytes_to_host, "copies_to_device": self.counter.copies["to_device"],
            "copies_to_host": self.counter.copies["to_host"],
            "last_run": {"bytes_to_device": self._last["to_device"], "bytes_to_host": self._last["to_host"]},
            "busy_s": self._busy_s, "mean_s": self._busy_s / self._runs if self._runs else None,
            "rebinds": self._rebinds, "layouts": len(self._layouts), "device": self.device, "emulate": self.emulate,
            "fell_back": self.fell_back,
            "partitions": len(b.plan.partitions) if b else None,
            "pool_bytes": sum(p.nbytes for p in pools), "pool_allocations": sum(p.allocations for p in pools),
            "pool_locked": bool(pools) and all(p.locked for p in pools),
            "lock_error": "; ".join(p.lock_error for p in pools if p.lock_error) or None,
            **delegates.serial_npu.link_stats(b.compiled if b else []),
        }

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], run_options=None) -> list[np.ndarray]:
        """Outputs ``output_names`` (None or empty: all, in graph order, as onnxruntime) for ``feeds`` (input name ->
        array; an overridable initializer may be fed too). Runs from several threads are taken one at a time."""
        lock = self._lock
        lock.acquire()  # acquire/release: a `with` block cost twice as much (0.15 us of a 2 us model's run)
        try:
            t0 = _clock()
            try:
                # the steady state is a handful of dict lookups per input and output, here rather than in a call
                # of its own: the whole run path costs about what onnxruntime's and LiteRT's own add (benchmarks/
                # graph.py, tflite.py measure it)
                out = None
                b = self._bound
                if b is not None and b.fast is not None and output_names is None and type(feeds) is dict:
                    # one host partition: fill its buffers, run it. Anything unusual (a missing or extra feed, a
                    # non-array, a new shape or a wrong dtype) takes the general path, which says what is wrong
                    fast_in, fast_run, fast_out = b.fast
                    if len(feeds) == len(fast_in):
                        for name, buf, shape, dtype, raw in fast_in:
                            a = feeds.get(name)
                            if type(a) is not np.ndarray or a.dtype is not dtype or a.shape != shape:
                                break
                            try:  # a byte copy between memoryviews: a third of np.copyto's cost on small inputs
                                raw[:] = memoryview(a).cast("B")
                            except TypeError:  # a non-contiguous input (or no byte view of the buffer)
                                np.copyto(buf, a)
                        else:
                            try:
                                fast_run()
                            except DeviceError:
                                if not b.probed:
                                    raise
                                # shapes learnt by probing: a data-dependent one changed; the general path lays
                                # out again
                            else:
                                self._last = _NO_COPIES
                                out = list(fast_out) if self.output_views else [r.copy() for r in fast_out]
                if out is None:
                    out = self._run(output_names, feeds)
            except BaseException as exc:
                if self.telemetry and _telemetry_on():
                    self._record(_clock() - t0, f"{type(exc).__name__}: {exc}")
                raise
            dt = _clock() - t0
            self._runs += 1
            self._busy_s += dt
            if self.telemetry and _telemetry_on():
                self._record(dt, None)
        finally:
            lock.release()
        return out

    # ---- the run path -------------------------------------------------------------------------------------
    def _run(self, output_names, feeds) -> list[np.ndarray]:
        """The general run path: checks the feeds, lays the session out again for new shapes, runs the plan."""
        g = self._graph0
        if output_names is not None and (isinstance(output_names, (str, bytes))
                                         or not isinstance(output_names, Sequence)):
            raise InvalidArgumentError(f"output_names must be a list of output names or None, got {output_names!r}")
        names = list(output_names or g.outputs)  # [] is every output too, as onnxruntime has it
        for n in names:
            if n not in g.outputs:
                raise InvalidArgumentError(f"{n!r} is not an output of the model; its outputs are {g.outputs}")
        if not isinstance(feeds, dict) and not isinstance(feeds, Mapping):
            raise DTypeError(f"feeds must be a mapping of input name -> array, got {type(feeds).__name__}")
        overrides = tuple(sorted(n for n in feeds if n in g.overridable)) if g.overridable else ()
        b = self._bound
        stale = b is None or b.overrides != overrides
        for n in (*g.inputs, *overrides):
            a = feeds.get(n) if isinstance(feeds, dict) else (feeds[n] if n in feeds else None)
            if a is None:
                extra = [k for k in feeds if k not in g.inputs]  # a misspelt name: say which one
                raise InvalidArgumentError(f"missing feed for input {n!r}; the model's inputs are {g.inputs}"
                                           + (f" (the feeds also name {', '.join(map(repr, extra))}, not an input)"
                                              if extra else ""))
            if isinstance(a, np.ndarray):
                shape = a.shape
            elif isinstance(a, (str, bytes)):  # np.shape gives () and the error blamed the shape
                raise DTypeError(f"input {n!r} must be an array (or a list of numbers), got a {type(a).__name__}")
            else:
                try:
                    shape = np.shape(a)
                except ValueError as exc:  # a ragged nested list
                    raise ShapeError(f"input {n!r} is not a rectangular array: {exc}") from None
            if not stale and shape != b.input_shapes[n]:
                stale = True
        if len(feeds) > len(g.inputs) + len(overrides):
            extra = [n for n in feeds if n not in g.inputs and n not in overrides]
            raise InvalidArgumentError(f"feeds name {', '.join(map(repr, extra))}, not an input of the model; its "
                                       f"inputs are {g.inputs}" + (f" (and overridable initializers {g.overridable})"
                                                                   if g.overridable else ""))
        if stale:
            b = self._rebind(feeds, overrides)
        try:
            self._run_bound(b, feeds)
        except DeviceError:
            if not b.probed:
                raise
            b = self._rebind(feeds, overrides, force=True)  # a data-dependent shape changed: lay out again, once
            self._run_bound(b, feeds)
        if self.output_views:
            return [b.results[n] for n in names]
        return [b.results[n].copy() for n in names]

    def _run_bound(self, b: _Bound, feeds) -> None:
        for name, buf in b.feeds.items():
            a = _checked_feed(name, feeds[name], buf.dtype)
            if a.shape != buf.shape:  # copyto would broadcast a row over the buffer: a wrong answer, no error
                raise ShapeError(f"input {name!r} has shape {a.shape}, this binding laid out {buf.shape} (an "
                                 "edgert bug: please report it with the model)")
            np.copyto(buf, a, casting="equiv")  # "equiv": a big-endian feed is byte-swapped on the way in
        if b.fast is not None:
            b.fast[1]()  # one partition on the host: nothing crosses a link
            self._last = _NO_COPIES
            return
        c = self.counter
        start, start_copies = dict(c.bytes), dict(c.copies)
        try:
            for cp in b.before:
                c.copy(cp.dst, cp.src, cp.direction)
            for k, part in enumerate(b.compiled):
                part.run(b.in_bufs[k], b.out_bufs[k])
                for cp in b.after[k]:
                    c.copy(cp.dst, cp.src, cp.direction)
            for t, k in b.allocated.items():
                b.results[t] = b.out_bufs[k][t]
        except BaseException:
            # a run counts its copies only when it completes (as it counts in "runs"), so stats() stays runs x plan
            c.bytes.update(start)
            c.copies.update(start_copies)
            raise
        self._last = {d: c.bytes[d] - start[d] for d in start}

    # ---- binding: plan, compile, lay out buffers ----------------------------------------------------------
    def _rebind(self, feeds, overrides: tuple = (), force: bool = False) -> _Bound:
        """The binding for the feeds' dims and fed ``overrides`` (overridable initializers): a kept one, else a new
        one (``force``: new even if kept, for a probed binding whose data-dependent shapes changed)."""
        # kept by the input shapes, not the dims: a dim with no name (neither a value nor a param) is in no dims
        key = (tuple(sorted((n, tuple(np.shape(feeds[n]))) for n in (*self._graph0.inputs, *overrides))), overrides)
        b = None if force else self._layouts.get(key)
        if b is not None:
            self._layouts.move_to_end(key)
            self._bound, self.requested_plan, self.fell_back = b, b.requested_plan, b.fell_back
            return b
        g = self._graph0.with_inputs(overrides)  # a new binding from here on
        dims = g.dims_from_feeds({n: np.asarray(feeds[n]) if not hasattr(feeds[n], "shape") else feeds[n]
                                  for n in g.inputs})
        if self._bound is not None:
            self._rebinds += 1
            if force:  # a data-dependent shape changed: its outputs are allocated at each run from now on
                self._shape_varies.update(self._bound.can_allocate)
            if self._bound.on_device:  # its device memory goes to the new binding
                self._drop(self._key(self._bound))
        self._drop(key)  # force: the probed binding being replaced
        self._bound = self._keep(self._bind(dims, feeds, overrides))
        return self._bound

    @staticmethod
    def _key(b: _Bound) -> tuple:
        return tuple(sorted(b.input_shapes.items())), b.overrides

    def _keep(self, b: _Bound | None) -> _Bound | None:
        """Keep ``b`` among the session's bindings, dropping the least recently used beyond LAYOUTS_KEPT (all
        others when ``b`` keeps tensors on a device)."""
        if b is not None:
            self._layouts[self._key(b)] = b
            while len(self._layouts) > (1 if b.on_device else LAYOUTS_KEPT):
                self._drop(next(iter(self._layouts)))
        return b

    def _drop(self, key: tuple) -> None:
        """Close the binding kept for ``key`` (if any); a run after a failed re-binding then lays out again."""
        b = self._layouts.pop(key, None)
        if b is not None:
            if b is self._bound:
                self._bound = None
            self._close_layout(b)

    def _bind(self, dims: dict, feeds, overrides: tuple = ()) -> _Bound:
        bound_dims = self._graph0.bind(dims) if dims else None
        # partitions are exported from the model as written (symbolic dims kept, as onnxruntime runs the whole
        # model): baking bound dims in can make onnxruntime's inference reject branches that never run
        export = self._graph0.with_inputs(overrides)
        graph = export if bound_dims is None else bound_dims.with_inputs(overrides)
        check_io_dtypes(graph)
        unknown = [t for t, tt in graph.tensors.items()
                   if tt.initializer is None and tt.value_type is None and not _known(tt)]
        probed = False
        if unknown:
            # shapes inference could not tell (data-dependent, or lost in the loader): learn them by running the
            # whole model once on these feeds, so the plan's byte counts and the buffers agree
            if feeds is None:
                return None  # laid out at the first run, when the feeds say what the shapes are
            learnt = self._probe(graph, unknown, feeds)
            graph = _with_shapes(graph, learnt)
            export = _with_shapes(export, learnt, dtype_only=True)
            unknown = [t for t in unknown if graph.tensors[t].value_type is None]
            check_io_dtypes(graph)  # an output the probe found to be a sequence
            probed = True
        p = make_plan(graph, self.profile, fallback=self.fallback, **self._plan_kw)
        self.requested_plan, self.fell_back = p, None
        what = "" if self.emulate else self._missing_runtimes(
            [p.unit(u) for u in dict.fromkeys(q.unit for q in p.partitions) if u != p.host_unit])
        if what:
            if self.fallback == "forbid":
                self._refuse_missing(what)
            warn_caller(f"device {self.device!r} is not present on this machine ({what}); running every node on "
                        "the host (nothing crosses a link). Use emulate=True to emulate the device.")
            self.fell_back = what
            host_unit = p.unit(p.host_unit)
            host_only = dataclasses.replace(self.profile, units=[host_unit])
            p = make_plan(graph, host_only, fallback="allow", **self._plan_kw)
        p.dims = dict(dims)  # the graph planned is bound already: the plan records the binding, as plan(dims=) does
        _refuse_non_tensor_cuts(graph, p)

        compiled, on_device = [], False
        for part in p.partitions:
            unit = p.unit(part.unit)
            if part.unit == p.host_unit:
                members = set(part.nodes)
                d = delegates.get(unit.delegate)()
                opts = {"threads": self.threads, "core": self.core, "fallback": self.fallback,
                        "shapes": {t: graph.tensors[t].concrete_shape() for n in graph.nodes
                                   if n.name in members for t in (*n.inputs, *n.outputs) if t in graph.tensors}}
            elif self.emulate:
                d = delegates.get("litert" if is_tflite_graph(graph) else "onnxruntime")()
                unit = None  # the device's work, functionally, on onnxruntime's CPU provider
                opts = {"threads": self.threads, "emulate": True}
            else:
                d = delegates.get(unit.delegate)()
                opts = {"threads": self.threads, "fallback": self.fallback, **self.device_options}
                if getattr(d, "keeps_tensors_resident", False):
                    on_device = True
                    # tensors the plan moves over no link: they stay in the device's memory between partitions
                    back = {t.tensor for t in p.transfers_out_of(part.id)}
                    sent = {t.tensor for t in p.transfers_into(part.id) if t.direction == "to_device"}
                    opts["resident_outputs"] = [t for t in part.outputs if t not in back]
                    opts["resident_inputs"] = [t for t in part.inputs if t not in sent]
            # a delegate that translates nodes itself (serial-npu) gets the bound graph: it needs every shape, and
            # the model as written left a symbolic batch unknown to it (the partition ran on the host every time)
            compiled.append(d.compile(part, graph if getattr(d, "needs_static_shapes", False) else export, unit, opts))

        # where each tensor must be: (side, tensor)
        need: list[tuple[str, str]] = []

        def want(side, t):
            if (side, t) not in need:
                need.append((side, t))

        for t in graph.inputs:
            want(HOST, t)
        for part in p.partitions:
            s = _side(p, part.unit)
            for t in [*part.inputs, *part.outputs]:
                want(s, t)
        for t in graph.outputs:
            want(HOST, t)
        # a graph output that is a constant (an initializer) is produced by no node: its host buffer is filled once
        const_outputs = [t for t in graph.outputs if graph.tensors[t].initializer is not None]
        filled = {(HOST, t) for t in [*graph.inputs, *const_outputs]}
        producer = {}
        for part in p.partitions:
            for t in part.outputs:
                filled.add((_side(p, part.unit), t))
                producer[t] = part.id
        transfers = []
        for tr in p.transfers:
            src, dst = _side(p, tr.src), _side(p, tr.dst)
            want(src, tr.tensor)
            want(dst, tr.tensor)
            filled.add((dst, tr.tensor))
            sp = getattr(tr, "src_partition", producer.get(tr.tensor))
            transfers.append((tr, src, dst, sp))
        gaps = [f"{t!r} on {s}" for s, t in need if (s, t) not in filled]
        if gaps:
            raise DeviceError(f"plan for {self.device!r} leaves {', '.join(gaps)} without a producer or a transfer "
                              "(a partitioner bug); please report it with the model")

        # a graph output whose shape the data decides (probed: NonZero's count), made on the host and handed to no
        # other partition, can be allocated by the partition's runtime at each run, as onnxruntime returns it: a
        # pool buffer of the probed size failed every run whose count differed (a re-layout and two onnxruntime
        # error lines each time). It is from the start when an op whose output size is the data's makes it
        # (_value_sized), else once its shape has changed (_shape_varies): a probed shape that never does (an If's
        # branch output) keeps its pool buffer, bound once (the runtime's allocation cost silero_vad 8 us a run,
        # 11%). One crossing a link or read by another partition keeps its probed buffer
        moved = {tr.tensor for tr in p.transfers} | {t for part in p.partitions for t in part.inputs}
        data_shaped = set(unknown)
        can_allocate = {t: producer[t] for t in dict.fromkeys(graph.outputs) if t in data_shaped and t in producer
                        and t not in moved and _side(p, p.partitions[producer[t]].unit) == HOST
                        and getattr(compiled[producer[t]], "allocates_outputs", False)}
        allocated = {t: k for t, k in can_allocate.items() if t in self._shape_varies or _value_sized(graph, t)}

        spec = {t: (graph.tensors[t].concrete_shape(), np.dtype(graph.tensors[t].dtype)) for _, t in need}

        pools: dict[str, PinnedPool] = {}
        for side, t in need:
            if side == HOST and t in allocated:
                continue
            pool = pools.get(side)
            if pool is None:
                pool = pools[side] = PinnedPool("host" if side == HOST else f"staging:{side}", lock=self.lock_memory)
            pool.reserve(t, *spec[t])
        for pool in pools.values():
            pool.allocate()

        # a delegate that computes in its own tensor memory (LiteRT) lends it: those buffers replace the pool's
        views: dict = {}
        for part, c in zip(p.partitions, compiled):
            for t, a in (getattr(c, "tensor_views", lambda: {})() or {}).items():
                key = (_side(p, part.unit), t)
                if key in need and key not in views and a.shape == spec[t][0] and a.dtype == spec[t][1]:
                    views[key] = a

        def buf(side, t):
            if side == HOST and t in allocated:
                return None
            return views[(side, t)] if (side, t) in views else pools[side].view(t)

        for t in const_outputs:
            np.copyto(buf(HOST, t), np.asarray(graph.tensors[t].initializer).reshape(spec[t][0]), casting="unsafe")
        in_bufs = [{t: buf(_side(p, part.unit), t) for t in part.inputs} for part in p.partitions]
        out_bufs = [{t: buf(_side(p, part.unit), t) for t in part.outputs} for part in p.partitions]
        before, after = [], [[] for _ in p.partitions]
        for tr, src, dst, sp in transfers:
            cp = _Copy(tr.tensor, tr.direction, buf(src, tr.tensor), buf(dst, tr.tensor))
            (before if sp is None else after[sp]).append(cp)
        bound = _Bound(dims, graph, p, compiled, pools, {t: buf(HOST, t) for t in graph.inputs}, in_bufs,
                       out_bufs, before, after, {t: buf(HOST, t) for t in graph.outputs},
                       {t: spec[t][0] for t in graph.inputs}, probed, on_device=on_device, overrides=overrides,
                       requested_plan=self.requested_plan, fell_back=self.fell_back, allocated=allocated,
                       can_allocate=tuple(can_allocate))
        if len(compiled) == 1 and not before and not after[0]:
            run = compiled[0].bound_run(in_bufs[0], out_bufs[0])
            fast_out = [bound.results[t] for t in graph.outputs]
            if allocated:
                made = out_bufs[0]
                slots = [(k, t) for k, t in enumerate(graph.outputs) if t in allocated]
                results, bound_run = bound.results, run

                def run() -> None:
                    bound_run()
                    for k, t in slots:
                        fast_out[k] = results[t] = made[t]
            bound.fast = (tuple((t, bound.feeds[t], spec[t][0], spec[t][1], _byte_view(bound.feeds[t]))
                                for t in graph.inputs), run, fast_out)
        return bound

    def _probe(self, graph: Graph, names: list[str], feeds) -> dict:
        """Shapes and dtypes of ``names`` for these feeds, from one onnxruntime run of the whole model; the type
        (onnxruntime's spelling, ``seq(tensor(float))``) of one that is not a tensor."""
        import onnx

        model = graph.subgraph_model([n.name for n in graph.nodes], name=f"{graph.name}_probe")
        have = {o.name for o in model.graph.output}
        for n in names:
            if n in have:
                continue
            t = graph.tensors.get(n)
            if t is not None and t.dtype in onnx_types():
                model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx_types()[t.dtype], None))
            else:
                model.graph.output.append(onnx.ValueInfoProto(name=n))
        try:
            sess = delegates.onnxruntime.inference_session(model)
        except Exception as exc:  # onnxruntime's own exception types: the model as onnxruntime refuses it
            raise DeviceError(f"onnxruntime could not load the model to learn its shapes: {exc}") from exc
        # the values the run will copy into the pool: a big-endian feed byte-swapped (onnxruntime reads raw bytes, and
        # learnt a data-dependent shape from the unswapped ones), a list as the input's dtype
        probe_feeds = {}
        for n in graph.inputs:
            dtype = graph.tensors[n].dtype
            if dtype in np.sctypeDict:
                dtype = np.dtype(dtype)
                probe_feeds[n] = _checked_feed(n, feeds[n], dtype).astype(dtype, copy=False)
            else:
                probe_feeds[n] = np.asarray(feeds[n])
        try:
            res = sess.run(names, probe_feeds)
        except Exception as exc:
            raise DeviceError(f"onnxruntime failed running the model to learn its shapes: {exc}") from exc
        types = {o.name: o.type for o in sess.get_outputs()}
        return {n: (a.shape, a.dtype) if isinstance(a, np.ndarray) else types.get(n) or type(a).__name__
                for n, a in zip(names, res)}

    # ---- telemetry and teardown ---------------------------------------------------------------------------
    def _record(self, dt: float, err: str | None) -> None:
        """One telemetry event for a run: a tuple appended to the binding's RunLog, which fixed the rest once (a
        dict, a uuid, the cost model and a queue put per run cost ~40 us, 8x a small model's run)."""
        b = self._bound
        log = b.runlog if b is not None else None
        if log is None:
            dl = sorted({part.delegate for part in b.plan.partitions}) if b else []
            log = _telemetry.RunLog(
                {"source": "session", "endpoint": "run", "model": self.model_name, "device": self.device,
                 "delegates": ",".join(dl) + (" (emulated)" if self.emulate and len(dl) > 1 else "")},
                profile=self.profile)
            if b is not None:
                b.runlog = log
        log.add(dt, self._last["to_device"] + self._last["to_host"] if err is None else 0, err)

    @staticmethod
    def _close_layout(b: _Bound | None) -> None:
        if b is None:
            return
        for c in b.compiled:
            c.close()
        for pool in b.pools.values():
            pool.close()

    def close(self) -> None:
        """Release what the compiled partitions of every kept binding hold (runtime sessions, device tensors, serial
        links). The session stays usable: a later ``run`` lays it out and compiles it again."""
        with self._lock:  # not under a run in another thread
            while self._layouts:
                self._close_layout(self._layouts.popitem()[1])
            self._bound = None

    def __repr__(self) -> str:
        return (f"Session({self.model_name!r}, device={self.device!r}, emulate={self.emulate}, "
                f"partitions={len(self._bound.plan.partitions) if self._bound else '?'})")
