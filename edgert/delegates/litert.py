"""The ``litert`` delegate: partitions of a TFLite graph run in a LiteRT interpreter (XNNPACK on the CPU), or, where
the unit's profile names an external delegate library (``libedgetpu.so.1``, ``libvx_delegate.so``) and it is
present, through ``load_delegate(library, options)``.

The interpreter comes from ``ai-edge-litert`` (LiteRT, built for NumPy 2); ``tflite-runtime`` is used only where it
imports cleanly (its 2.14 wheels fail beside NumPy 2 with ``_ARRAY_API not found``). A partition is exported as a
standalone ``.tflite`` (``formats.tflite.subgraph_tflite``; the whole graph is the original file's bytes).

Buffers: ``tensor_views()`` hands the session numpy views of the interpreter's own input and output tensor memory
(``interpreter.tensor(i)()``), which the session binds in place of its pool buffers, so a run copies only what the
plan says. Holding such views makes ``Interpreter.invoke``'s safety check refuse to run, so the bound interpreter is
invoked through its wrapper object (the views stay valid: tensors are never re-allocated after compile).
This module must not import the session.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import numpy as np

from ..errors import DeviceError, ModelFormatError
from .base import CompiledPartition, Delegate, register

PACKAGES = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))
_CACHE: dict[str, Any] = {}


def interpreter_module() -> tuple[Any, str]:
    """(the interpreter module, its package name): ai-edge-litert first, tflite-runtime only if it imports cleanly.
    DeviceError naming the package to install when neither does."""
    if "mod" in _CACHE:
        return _CACHE["mod"]
    errors = []
    for mod, pkg in PACKAGES:
        try:
            m = importlib.import_module(mod)
            m.Interpreter  # noqa: B018 - a half-imported tflite_runtime lacks it
        except Exception as exc:  # ImportError, or tflite-runtime 2.14 beside NumPy 2 (AttributeError/_ARRAY_API)
            errors.append(f"{pkg}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        _CACHE["mod"] = (m, pkg)
        return m, pkg
    raise DeviceError("no LiteRT interpreter: install ai-edge-litert (pip install ai-edge-litert, or "
                      "'edgert[tflite]'); tflite-runtime works only with NumPy 1.x (" + "; ".join(errors) + ")")


def runtime_description() -> str | None:
    """'ai-edge-litert 2.3.0' (what ``edgert devices`` shows), or None when no interpreter imports."""
    try:
        _, pkg = interpreter_module()
    except DeviceError:
        return None
    try:
        from importlib.metadata import version

        return f"{pkg} {version(pkg)}"
    except Exception:  # pragma: no cover
        return pkg


def load_external_delegate(library: str, options: Mapping[str, Any] | None = None):
    """``load_delegate(library, options)``; DeviceError naming the library when it cannot be loaded."""
    import ctypes

    mod, pkg = interpreter_module()
    try:
        # a library without the external-delegate entry points made LiteRT raise AttributeError (a traceback) and
        # then its half-made Delegate's __del__ raised again ("Exception ignored"): look for them first
        if not hasattr(ctypes.CDLL(library), "tflite_plugin_create_delegate"):
            raise ValueError("it is no TFLite external delegate (no tflite_plugin_create_delegate symbol)")
        return mod.load_delegate(library, {str(k): str(v) for k, v in dict(options or {}).items()})
    except (ValueError, OSError, RuntimeError, AttributeError) as exc:
        raise DeviceError(f"{pkg} could not load delegate library {library!r}: {exc}") from None


class LiteRTPartition(CompiledPartition):
    """One interpreter for one exported partition; inputs/outputs bound by position to the subgraph's."""

    def __init__(self, data: bytes, inputs: list[str], outputs: list[str], threads: int | None = None,
                 delegates: list | None = None, what: str = "partition"):
        mod, pkg = interpreter_module()
        self.inputs, self.outputs = list(inputs), list(outputs)
        self._data = data  # the interpreter reads the model from this buffer for its whole life
        try:
            self.interpreter = mod.Interpreter(model_content=data, num_threads=threads or None,
                                               experimental_delegates=delegates or None)
            declared = [tuple(int(d) for d in o["shape"]) for o in self.interpreter.get_output_details()]
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if delegates:  # an external delegate (Edge TPU, VX...) may be what failed
                raise DeviceError(f"{pkg} could not prepare {what}: {exc}") from None
            # LiteRT's own CPU path refuses only the model: a buffer its flatbuffer verifier rejects (a field edgert
            # never reads), or parameters its kernels refuse when they prepare (zero points, scales, shapes)
            raise ModelFormatError(f"the TFLite model is invalid: {pkg} refuses {what}: {exc}") from None
        ins, outs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(ins) != len(self.inputs) or len(outs) != len(self.outputs):
            raise DeviceError(f"{what}: the interpreter has {len(ins)} inputs / {len(outs)} outputs, the plan "
                              f"{len(self.inputs)} / {len(self.outputs)}")
        self.what = what
        # allocate_tensors computes each op's output shape from its inputs and parameters: where that is not the
        # shape the file declares (which the plan and its buffers follow), the answer would be broadcast or cut
        for name, want, d in zip(self.outputs, declared, outs):
            self._check_shape(name, want, d["shape"])
        self._in_idx = [d["index"] for d in ins]
        self._out_idx = [d["index"] for d in outs]
        # views of the interpreter's memory; a rank-0 tensor has none (tensor(i)() gives a numpy scalar, a copy):
        # those go through set_tensor / get_tensor
        self._views, self._scalars = {}, {}
        for n, i in [*zip(self.inputs, self._in_idx), *zip(self.outputs, self._out_idx)]:
            v = self.interpreter.tensor(i)()
            if isinstance(v, np.ndarray):
                self._views[n] = v
            else:
                self._scalars[n] = i
        self._seen: dict[str, tuple] = {}  # boundary tensor -> (last buffer seen for it, is it the view)
        wrapped = getattr(self.interpreter, "_interpreter", None)
        self._invoke = getattr(wrapped, "Invoke", None) or self.interpreter.invoke

    def _check_shape(self, name: str, planned, computed) -> None:
        planned, computed = tuple(int(d) for d in planned), tuple(int(d) for d in computed)
        if planned != computed:
            raise ModelFormatError(
                f"{self.what}: output {name!r}: the model declares shape {planned}, LiteRT computes {computed} from "
                "its inputs and op parameters; the file's shapes disagree with its ops (a damaged or mis-converted "
                "model)")

    def tensor_views(self) -> dict[str, np.ndarray]:
        """Boundary tensor -> a numpy view of the interpreter's own memory for it."""
        return dict(self._views)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        views = self._views
        if self._scalars:
            self._run_with_scalars(inputs, outputs)
            return
        for name in self.inputs:
            a, v = inputs[name], views[name]
            if a.shape != v.shape:
                raise DeviceError(f"{self.what}: input {name!r} has shape {a.shape}, the interpreter {v.shape}")
            if not self._is_view(name, a, v):
                np.copyto(v, a, casting="no")
        try:
            self._invoke()
        except RuntimeError as exc:
            raise DeviceError(f"LiteRT failed running {self.what}: {exc}") from None
        for name in self.outputs:
            o, v = outputs[name], views[name]
            if not self._is_view(name, o, v):
                if o.shape != v.shape:  # never broadcast into (or fail on) the planned buffer
                    self._check_shape(name, o.shape, v.shape)
                np.copyto(o, v, casting="no")

    def _run_with_scalars(self, inputs, outputs) -> None:
        """run() where some boundary tensor is rank 0: every tensor copied in and out through the interpreter's
        set_tensor / get_tensor."""
        it = self.interpreter
        try:
            for name, i in zip(self.inputs, self._in_idx):
                it.set_tensor(i, inputs[name])
            self._invoke()
        except (ValueError, RuntimeError) as exc:
            raise DeviceError(f"LiteRT failed running {self.what}: {exc}") from None
        for name, i in zip(self.outputs, self._out_idx):
            o, v = outputs[name], it.get_tensor(i)
            if o.shape != v.shape:
                self._check_shape(name, o.shape, v.shape)
            np.copyto(o, v, casting="no")

    def bound_run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        views = self._views
        if self._scalars:
            return super().bound_run(inputs, outputs)
        bufs = [(n, inputs[n]) for n in self.inputs] + [(n, outputs[n]) for n in self.outputs]
        if not all(self._is_view(n, a, views[n]) for n, a in bufs):
            return super().bound_run(inputs, outputs)
        invoke, what = self._invoke, self.what

        def run() -> None:  # every buffer is the interpreter's own memory: a run is the invoke
            try:
                invoke()
            except RuntimeError as exc:
                raise DeviceError(f"LiteRT failed running {what}: {exc}") from None
        return run

    def _is_view(self, name: str, a: np.ndarray, v: np.ndarray) -> bool:
        """Whether ``a`` is the interpreter's own memory for ``name``. The answer is remembered for the last buffer
        object seen per tensor (a session hands the same buffers every run, and an array's data pointer is fixed
        for its life): reading an address through ``.ctypes`` costs about a microsecond, a run of a small model
        only tens."""
        seen = self._seen.get(name)
        if seen is not None and seen[0] is a:
            return seen[1]
        same = a.ctypes.data == v.ctypes.data and a.dtype == v.dtype and a.strides == v.strides
        self._seen[name] = (a, same)
        return same

    def close(self) -> None:
        self._views, self._seen = {}, {}
        self.interpreter = None


class LiteRTDelegate(Delegate):
    """Runs TFLite partitions. Unit ``delegate_options``: ``library`` (external delegate) and ``options`` (its
    options table). Compile ``options``: ``threads``, ``emulate`` (the CPU interpreter, no external delegate)."""

    @classmethod
    def available(cls, unit: Any = None) -> tuple[bool, str]:
        try:
            _, pkg = interpreter_module()
        except DeviceError as exc:
            return False, str(exc)
        lib = (getattr(unit, "delegate_options", None) or {}).get("library")
        if not lib:
            return True, f"{runtime_description()} (XNNPACK on the CPU)"
        from ..profiles import _find_library

        if _find_library(lib) is None:  # load_delegate on a missing file only fails (noisily)
            return False, f"{runtime_description()} present; delegate library {lib} not found"
        try:
            d = load_external_delegate(lib, (unit.delegate_options or {}).get("options"))
        except DeviceError as exc:
            return False, str(exc)
        del d
        return True, f"{runtime_description()} with {lib}"

    def compile(self, partition, graph, unit: Any = None, options: Mapping[str, Any] | None = None):
        from ..formats.tflite import is_tflite_graph, subgraph_tflite

        options = dict(options or {})
        if not is_tflite_graph(graph):
            raise DeviceError("the litert delegate runs TFLite graphs; convert the ONNX model to .tflite for this "
                              "device, or run with emulate=True")
        dopts = dict(getattr(unit, "delegate_options", None) or {})
        delegates = []
        if dopts.get("library") and not options.get("emulate"):
            delegates.append(load_external_delegate(dopts["library"], dopts.get("options")))
        pid = getattr(partition, "id", 0)
        data, ins, outs = subgraph_tflite(graph, partition.nodes, name=f"{graph.name}_p{pid}")
        return LiteRTPartition(data, ins, outs, options.get("threads"), delegates, f"partition {pid} of "
                               f"{graph.name!r}")


register("litert", LiteRTDelegate)
