"""The ``serial-npu`` delegate: device partitions run on an NPU behind a serial link (firmware_bridge/, the emulator
``edgert npu-sim``), with failover to the host.

- Compile translates a partition's nodes into a graph blob (PROTOCOL.md §6). Weights are constants in the blob; the
  blob is loaded by its hash, so it crosses the link once per device power-on (``bytes_graph``), not per run. A
  partition over the device's limits per graph (HELLO: tensors, nodes, inputs, outputs) becomes several graphs of
  consecutive nodes (``translate_pieces``), run in order with the tensors between them left on the device; a node
  that fits no graph alone is an ``UnsupportedOpError`` naming the limit.
- ONNX nodes map to the QOperator ops (``ONNX_TO_DEVICE``, bit-identical to onnxruntime's CPU kernels). Nodes of a
  ``.tflite`` model (``Node.attrs["tflite_op"]``) map to the TFLite INT8 ops (``TFLITE_TO_DEVICE``, PROTOCOL.md
  §6.1): FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, ADD, AVERAGE_POOL_2D; RELU/RELU6/RELU_N1_TO_1 as Clip, RESHAPE
  and SQUEEZE as Copy, CONCATENATION as Concat. Every requantization parameter is computed here, once, as the host's
  C core computes it (FULLY_CONNECTED: weights in the C core's packed layout, ``bias - x_zp * wsum``, the float32
  ``s_x * s_w / s_y`` scales, the fused activation's clamp; ADD: XNNPACK's multipliers and shift), so the device's
  outputs equal LiteRT's (XNNPACK) bit for bit: no op here has an error budget. What the device cannot run that
  exactly (a RELU or CONCATENATION that requantizes, a scale outside XNNPACK's range, float tensors, ...) raises
  ``UnsupportedOpError``. So does a node the firmware would refuse at LOAD_COMMIT (``protocol.node_problem``,
  graph.c's check_node in Python, e.g. a MatMulInteger with a batched B), or one over the device's limits alone.
  The planner asks the same, node by node (``translation_problem``, the unit's ``node_check`` from refine_unit):
  such a node is on the host in the plan, the rest of its partition on the device, and ``fallback="forbid"``
  names every one. What only a whole partition shows still sends that partition to the host at compile (with
  ``fallback="forbid"`` the error propagates). Should the device still refuse a graph at LOAD_COMMIT
  (ERR_GRAPH/ERR_SHAPE/ERR_UNSUPPORTED), that run fails over once and the partition stays on the host: the blob
  is not sent again.
- Partitions on the same device URL share one connection and one set of device tensors, one per tensor name.
  A partition input whose bytes equal what the device already holds under that name (the output of an earlier
  device partition, unchanged) is not sent again: only boundary tensors cross the link. The device's handles are
  few (HELLO's max_handles): past them, or when ALLOC finds no room, the least recently used tensors a run can send
  again are freed (``DeviceState.tensor``). The state lives while a partition on the URL does: one dropped without
  close() gives its reference back when it is collected, so a later Session gets a fresh state with its own
  options, not a dead Session's back-off. Each partition counts the link traffic of its own runs, so a Session's
  ``stats()`` are its own, not the device's totals (``DeviceState.stats``).
- Tensors resident between partitions (``keeps_tensors_resident``): a tensor one partition produces and only later
  partitions of the same unit read has no transfer in the plan; the session names them (``resident_outputs``,
  ``resident_inputs``). The producer does not read it back; the consumer binds the producer's device tensor as its
  input. Such a tensor is keyed by the session's buffer for it, so two sessions on one device never mix theirs up.
  If its device copy is lost (a reset, a failover), the host recomputes it by re-running the producing partition
  on the host (its own resident inputs first), so a failover never reads a stale host buffer.
- Failover: when the device stops answering, resets, or answers an error mid-run, the partition runs on the host
  instead — onnxruntime's CPU provider for an ONNX model, LiteRT (the host TFLite path, ``core=False``) for a
  TFLite one: the arithmetic the device reproduces, so the same result — the event is logged and
  counted in ``failovers``, and the device is left alone for ``retry_after_s`` (default 1 s, doubling while it
  keeps failing, at most 30 s); the next run after that tries the device again. A request that got no answer (a
  noisy line, a stalled device) keeps the connection and its host session (no new HELLO, graphs and tensors kept,
  the line's measured error rate too), unless it was an ALLOC, FREE or UNLOAD, after which the host no longer knows
  what the device holds; any other failure (a port error, a reset, an error answer) closes the connection, and the
  next run re-handshakes and reloads by hash. A device of another
  protocol version is no fault to ride out (PROTOCOL.md §2.2): ``ProtocolVersionError`` names both versions, raised
  when the Session is made (refine_unit's HELLO) or by the run that first reaches such a device.
- Device memory: every connection is a host session (PROTOCOL.md §2.5). A failover that closes the connection
  forgets its device tensors without freeing them (the device may not be answering); the next connection's HELLO,
  or another process's, makes the device free them, so failovers and dead processes leak nothing. A clean close of
  the last partition on a device frees its tensors at once. Graphs stay loaded as a cache by hash (the device drops an
  earlier session's when it needs the room); when a load finds no room (ERR_NOMEM), the graphs this process loaded
  that no live partition runs, or else this connection's least recently used, are unloaded and the load is tried
  again.
- ``refine_unit`` narrows a profile unit to what the device says in HELLO (ops and dtypes; memory = its arena), so the
  partitioner assigns only what the device reports it can run, and keeps its limits in the unit's
  ``delegate_options["device_limits"]`` for compile (without a HELLO: the reference firmware's); its ``node_check``
  is the translation's per-node check with those limits.

Options (profile ``delegate_options`` or Session ``device_options``): ``url`` (or ``port``), ``baudrate``,
``timeout_s``, ``retries``, ``retry_after_s``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import threading
import time
import weakref
from typing import Any, Mapping

import numpy as np

from ..bridge.device import ProtocolVersionError
from ..bridge.link import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, DeviceStatusError, LineQuality, NoAnswerError
from ..bridge.protocol import ERR_GRAPH, ERR_NOMEM, ERR_SHAPE, ERR_UNSUPPORTED
from ..errors import DeviceError, EdgertError, LinkError, UnsupportedOpError, check_count, check_number, warn_caller
from ..formats.tflite import ONNX_EQUIVALENT as TFLITE_ONNX_EQUIVALENT
from .base import CompiledPartition, Delegate, register

log = logging.getLogger("edgert.serial_npu")

# ONNX ops -> device op (PROTOCOL.md §6)
ONNX_TO_DEVICE = {"MatMulInteger": "MatMulInteger", "QLinearMatMul": "QLinearMatMul", "ConvInteger": "ConvInteger",
                  "QLinearConv": "QLinearConv", "Add": "Add", "Mul": "Mul", "Relu": "Relu", "Clip": "Clip",
                  "Reshape": "Copy", "Flatten": "Copy", "Squeeze": "Copy", "Unsqueeze": "Copy", "Concat": "Concat"}
# TFLite builtins -> device op (PROTOCOL.md §6.1: TFLite INT8 semantics, NHWC)
TFLITE_TO_DEVICE = {"FULLY_CONNECTED": "FullyConnectedS8", "CONV_2D": "Conv2DS8",
                    "DEPTHWISE_CONV_2D": "DepthwiseConv2DS8", "ADD": "AddS8", "AVERAGE_POOL_2D": "AveragePool2DS8",
                    "RELU": "Clip", "RELU6": "Clip", "RELU_N1_TO_1": "Clip", "RESHAPE": "Copy", "SQUEEZE": "Copy",
                    "CONCATENATION": "Concat"}
# a profile op (the IR's ONNX name) -> the device ops that run it, from either model format: refine_unit keeps the
# op when the device reports any of them
PROFILE_OP_DEVICE_OPS: dict[str, set[str]] = {}
for _k, _v in ONNX_TO_DEVICE.items():
    PROFILE_OP_DEVICE_OPS.setdefault(_k, set()).add(_v)
for _k, _v in TFLITE_TO_DEVICE.items():
    PROFILE_OP_DEVICE_OPS.setdefault(TFLITE_ONNX_EQUIVALENT[_k], set()).add(_v)


def _options(unit, options) -> dict:
    o = dict(getattr(unit, "delegate_options", None) or {})
    o.update({k: v for k, v in dict(options or {}).items() if v is not None})
    if "url" not in o and o.get("port"):
        o["url"] = o["port"]
    return o


# ---- one shared state per device URL --------------------------------------------------------------------------

def link_settings(o: Mapping[str, Any]) -> tuple[dict, float]:
    """The link arguments (baudrate, timeout, retries) and the failover back-off of device options ``o``, checked:
    timeout_s=inf waited for ever on a stalled device, a NaN back-off never retried it, a string was a bare
    ValueError at the first run."""
    link = {
        "baudrate": check_count("device option baudrate", o.get("baudrate", 921600), lo=1, hi=100_000_000),
        "timeout": check_number("device option timeout_s", o.get("timeout_s", DEFAULT_TIMEOUT_S), 0.0, 3600.0,
                                lo_open=True),
        "retries": check_count("device option retries", o.get("retries", DEFAULT_RETRIES), lo=0, hi=10_000),
    }
    return link, check_number("device option retry_after_s", o.get("retry_after_s", 1.0), 0.0, 86400.0)


class DeviceState:
    """A device as the partitions of a process share it: the connection, its tensors by name, failover state."""

    def __init__(self, url: str, opts: Mapping[str, Any]):
        self.url = url
        self.opts = dict(opts)
        self.link_args, self.retry_after_s = link_settings(self.opts)
        self.lock = threading.RLock()
        self.device = None
        self.generation = -1
        # name -> (handle, nbytes), valid for self.generation; least recently used first (``tensor``)
        self.tensors: dict[str, tuple[int, int]] = {}
        self.digests: dict[str, bytes] = {}            # name -> digest of the bytes the device holds
        self.graphs: dict[int, None] = {}              # hashes loaded in this generation, least recently used first
        self.failovers = 0
        self.down_until = 0.0
        self.backoff = self.retry_after_s
        self.refs = 0
        # resident tensors whose value is only on the device (the host buffer is stale): key -> (a weak reference to
        # the producing partition, its inputs, its outputs, tensor name), to recompute it on the host if the device
        # copy is lost. Weak: the device's state must not keep a dropped Session's partitions alive
        self.on_device_only: dict[str, tuple] = {}
        self.last_error: str | None = None
        self.closed_links: dict = {}                   # counters of links closed after a failure
        # the line's measured error rate, kept across connections and states (planning's HELLO measured it too):
        # the first graph load's chunks are sized for it
        self.line = _LINES.setdefault(url, LineQuality())

    def connect(self):
        from ..bridge import SerialNpuDevice

        if self.device is None:
            self.device = SerialNpuDevice(self.url, **self.link_args, line=self.line)
        info = self.device.ensure_session()
        if self.device.generation != self.generation:
            self.generation = self.device.generation
            self.tensors.clear()
            self.digests.clear()
            self.graphs.clear()
        return info

    def free_tensors(self) -> None:
        """On a clean close: free this process's device tensors now, not at the next host session's HELLO (another
        client may not come for a long time). Graphs stay: they are a cache by content hash (a later session finds
        them loaded), evicted when the device runs out of graph slots (``load_graph``). Best effort, and only on a
        device that is answering: a failing one is left to the next HELLO."""
        dev = self.device
        if dev is None or self.generation != dev.generation or time.monotonic() < self.down_until:
            return
        try:
            for handle, _ in self.tensors.values():
                dev.free(handle)
        except EdgertError as exc:
            log.info("serial-npu %s: freeing device tensors failed (%s); a device reset clears them", self.url, exc)
        self.tensors.clear()
        self.digests.clear()

    def load_graph(self, blob: bytes, graph_hash: int, pinned=()) -> None:
        """Make a graph resident, making room (``_make_room``) while the device has none (ERR_NOMEM: graph slots or
        arena) and something is left to free."""
        while True:
            try:
                self.device.load_graph(blob, graph_hash)
                break
            except DeviceStatusError as exc:
                if exc.status != ERR_NOMEM or not self._make_room(graph_hash, pinned):
                    raise
        self.graphs[graph_hash] = None
        _LOADED.setdefault(self.url, set()).add(graph_hash)

    def _make_room(self, keep: int, pinned) -> bool:
        """Make room for graph ``keep``, cheapest first: unload the graphs this process loaded that no live partition
        runs; else, when the device's graph slots are full, the least recently used graph of this connection (a
        later run loads it again); else (its arena is full) free the tensors a run can send again (not ``pinned``),
        and only when there are none, unload that graph. False when nothing was left to free."""
        idle = [h for h in _LOADED.get(self.url, ()) if not _GRAPH_USERS.get((self.url, h)) and h != keep]
        freed = 0
        if not idle and self.device.stats()["graphs"] < self.device.info.limits.max_graphs:
            freed = self._evict(pinned, len(self.tensors))
        victims = idle or ([] if freed else [h for h in self.graphs if h != keep][:1])
        for h in victims:
            self.device.unload_graph(h)
            _LOADED[self.url].discard(h)
            self.graphs.pop(h, None)
        log.info("serial-npu %s: device out of room; unloaded %d graph(s), freed %d tensor(s)", self.url,
                 len(victims), freed)
        return bool(victims or freed)

    def tensor(self, key: str, nbytes: int, pinned) -> int:
        """The handle of device tensor ``key`` (``nbytes``), allocated when missing or of another size. Handles are
        few (HELLO's max_handles: 16 on a Cortex-M4): when this connection holds that many, or ALLOC finds no room,
        the least recently used tensors a run can send again (not ``pinned``, not resident) are freed first."""
        h = self.tensors.pop(key, None)
        if h is not None and h[1] == nbytes:
            self.tensors[key] = h  # most recently used last
            return h[0]
        if h is not None:
            self.digests.pop(key, None)
            self.device.free(h[0])
        while len(self.tensors) >= self.device.info.limits.max_handles and self._evict(pinned, 1):
            pass
        try:
            handle = self.device.alloc(nbytes)
        except DeviceStatusError as exc:
            if exc.status != ERR_NOMEM or not self._evict(pinned, len(self.tensors)):
                raise
            handle = self.device.alloc(nbytes)
        self.tensors[key] = (handle, nbytes)
        return handle

    def _evict(self, pinned, n: int) -> int:
        """Free up to ``n`` device tensors, least recently used first, of those a later run can send again."""
        victims = [k for k in self.tensors if k not in pinned and k not in self.on_device_only][:n]
        for k in victims:
            self.device.free(self.tensors.pop(k)[0])
            self.digests.pop(k, None)
        return len(victims)

    def drop_connection(self) -> None:
        """After a failure: close the port (a fresh open next time, if the device comes back). The device tensors are
        forgotten, not freed: the next connection is a new host session, whose HELLO frees them on the device."""
        if self.device is not None:
            for k, v in self.device.link_stats().items():
                self.closed_links[k] = self.closed_links.get(k, 0) + v
            self.device.close()
            self.device = None
        self.generation = -1
        self.tensors.clear()
        self.digests.clear()
        self.graphs.clear()

    def link_totals(self) -> dict:
        """The link's counters summed over every connection this state opened (closed ones too): they only grow, so
        the difference over a run is that run's traffic."""
        d = dict(self.closed_links)
        if self.device is not None:
            for k, v in self.device.link_stats().items():
                d[k] = d.get(k, 0) + v
        return d

    def stats(self) -> dict:
        """The whole device's, over every partition of the process on it (a Session's own: ``link_stats``)."""
        return _link_summary(self.link_totals(), self.failovers)


def _link_summary(d: Mapping[str, int], failovers: int) -> dict:
    """Link counters ``d`` (``SerialNpuDevice.link_stats``' keys) as stats report them."""
    return {"bytes_over_link": d.get("bytes_tx", 0) + d.get("bytes_rx", 0),
            "retransmits": d.get("retransmits", 0), "resyncs": d.get("resyncs", 0), "failovers": failovers,
            "bytes_graph": d.get("bytes_graph", 0), "bytes_tensors_to_device": d.get("bytes_tensors_to_device", 0),
            "bytes_tensors_to_host": d.get("bytes_tensors_to_host", 0), "device_resets": d.get("device_resets", 0),
            "timeouts": d.get("timeouts", 0), "naks": d.get("naks", 0)}


_STATES: dict[str, DeviceState] = {}
_LINES: dict[str, LineQuality] = {}           # device URL -> its line's measured error rate, for the process's life
_STATES_LOCK = threading.Lock()
_LOADED: dict[str, set[int]] = {}             # device URL -> hashes of graphs this process loaded there
_GRAPH_USERS: dict[tuple[str, int], int] = {}  # (device URL, graph hash) -> live partitions running it


def _graph_users(url: str, graph_hash: int, delta: int) -> None:
    with _STATES_LOCK:
        n = _GRAPH_USERS.get((url, graph_hash), 0) + delta
        if n > 0:
            _GRAPH_USERS[(url, graph_hash)] = n
        else:
            _GRAPH_USERS.pop((url, graph_hash), None)


def device_state(url: str, opts: Mapping[str, Any] | None = None, ref: bool = False) -> DeviceState:
    """The process's one state for the device at ``url``. Every Session's options are checked, not only the first
    one's. Sessions of a process share the device's connection, so a later Session cannot change its link settings
    while another is alive: it keeps them, with a RuntimeWarning saying so (they were ignored without a word). A
    Session dropped without close() holds none: its partitions' references go when they are collected
    (``_collected``), so the next Session gets a fresh state with its own options. ``ref``: the caller takes a
    reference (a partition's, given back by ``_release``)."""
    _reap()
    with _STATES_LOCK:
        st = _STATES.get(url)
        if st is None:
            st = _STATES[url] = DeviceState(url, opts or {})  # checks them
        elif link_settings(opts or {}) != (st.link_args, st.retry_after_s):
            warn_caller(f"serial-npu {url}: this process already has the device open with baudrate="
                        f"{st.link_args['baudrate']}, timeout_s={st.link_args['timeout']}, retries="
                        f"{st.link_args['retries']}, retry_after_s={st.retry_after_s}; this Session shares that "
                        f"connection and keeps those settings (close the other Sessions first to change them)")
        if ref:  # taken under the lock: no other thread's release can drop the state before the caller holds it
            st.refs += 1
        return st


def _release(st: DeviceState, ref: int = 1) -> None:
    """Give back ``ref`` references (0: none, e.g. refine_unit's look, which took none) and, when none is left,
    close the device's connection and forget the state. Checked under the lock: a partition another thread is
    making meanwhile keeps the state (refine_unit's own check, outside the lock, dropped it under that partition)."""
    with _STATES_LOCK:
        st.refs -= ref
        if st.refs <= 0:
            with st.lock:
                st.free_tensors()
                st.drop_connection()
            if _STATES.get(st.url) is st:  # not a newer state of the same URL
                del _STATES[st.url]


def _drop_partition(st: DeviceState, hashes) -> None:
    """What a partition holds of its device's state, given back (``close``, or after it was collected): its graphs'
    users, the entries of resident tensors it produced, its reference."""
    for h in hashes:
        _graph_users(st.url, h, -1)
    with st.lock:
        for k in [k for k, e in st.on_device_only.items() if e[0]() is None]:
            del st.on_device_only[k]
    _release(st)


# partitions collected without close(): (state, graph hashes) to give back. The finalizer only appends here, as it
# may run in the middle of any code (a garbage collection pass, maybe while this thread holds _STATES_LOCK or
# iterates a state's dicts); the release is done at the next device_state() or partition run (``_reap``)
_COLLECTED: list[tuple[DeviceState, tuple[int, ...]]] = []


def _collected(st: DeviceState, hashes: tuple[int, ...]) -> None:
    _COLLECTED.append((st, hashes))


def _reap() -> None:
    """Release what partitions collected without close() held (``_collected``)."""
    while _COLLECTED:
        try:
            st, hashes = _COLLECTED.pop()
        except IndexError:  # another thread took the last one
            return
        _drop_partition(st, hashes)


# ---- ONNX nodes -> graph blob ----------------------------------------------------------------------------------

def _qparams(graph, name: str, what: str, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero point int64) of an int8 tensor; per-tensor unless ``channels`` allows that many."""
    t = graph.tensors[name]
    if t.dtype != "int8" or t.quant is None:
        raise UnsupportedOpError(f"serial-npu: {what} {name!r} is {t.dtype}{'' if t.quant else ' without quantization'}"
                                 " (the device runs INT8 TFLite ops)")
    s = np.asarray(t.quant.scale, np.float32).reshape(-1)
    z = np.asarray(t.quant.zero_point, np.int64).reshape(-1)
    if s.size not in (1, channels or 1) or z.size not in (1, s.size):
        raise UnsupportedOpError(f"serial-npu: {what} {name!r}: per-channel quantization is not supported here")
    return s, z


def _same_q(graph, a: str, b: str) -> bool:
    qa, qb = graph.tensors[a].quant, graph.tensors[b].quant
    return (qa is not None and qb is not None and np.array_equal(np.asarray(qa.scale, np.float32),
                                                                  np.asarray(qb.scale, np.float32))
            and np.array_equal(np.asarray(qa.zero_point), np.asarray(qb.zero_point)))


def _act(n, graph, out: str, code: int | None = None) -> tuple[int, int]:
    """The int8 clamp range of a fused (or standalone) activation, as the kernel LiteRT runs the op with computes it."""
    from .host_tflite import _act_range

    s, z = _qparams(graph, out, "output")
    act = int(n.attrs.get("fused_activation", 0)) if code is None else code
    rng = _act_range(act, float(s[0]), int(z[0]), n.attrs["tflite_op"])
    if rng is None:
        raise UnsupportedOpError(f"serial-npu: {n.name!r}: activation {act} on output scale {s[0]:g} is not supported "
                                 "(ReLU-family activations, with bounds LiteRT defines)")
    return rng


def _requant_scales(xs, ws, ys, channels: int) -> np.ndarray:
    """XNNPACK's requantization scales (``host_tflite.xnnpack_requant_scales``: s_in * s_w[c] / s_out in float32, that
    order), one per output channel, checked by ``_scale_range``."""
    from .host_tflite import xnnpack_requant_scales

    sc = xnnpack_requant_scales(xs, ws, ys, channels)
    if sc is None:
        raise UnsupportedOpError("serial-npu: requantization scale of 256 or more (XNNPACK cannot create the op; "
                                 "LiteRT refuses the model)")
    return _scale_range(sc)


def _scale_range(sc: np.ndarray) -> np.ndarray:
    """``sc`` (scales XNNPACK takes) if every one is positive too, as the device wants (graph.c ``scales_ok``: (0,
    256)); s_in * s_w underflowing float32 to 0 is XNNPACK's but not the device's."""
    if not np.all(sc > 0):
        raise UnsupportedOpError("serial-npu: a requantization scale of 0 (s_in * s_w underflows float32): the device "
                                 "takes (0, 256)")
    return sc


def _reshape_target(n, graph, opts: dict) -> tuple[int, ...] | None:
    """The output shape LiteRT's RESHAPE computes: from the shape input when that is a 1-D int32 tensor (None when
    not a constant), else from ReshapeOptions.new_shape (``[0]``, or no options table: a scalar); one -1 takes the
    rest of the input's elements."""
    t = graph.tensors
    sh = t.get(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else None
    if sh is not None and sh.dtype == "int32" and len(sh.shape or ()) == 1:
        if sh.initializer is None:
            return None
        new = [int(v) for v in np.asarray(sh.initializer).reshape(-1)]
    else:
        new = [int(v) for v in np.asarray(opts.get("NewShape", [])).reshape(-1)]
        new = [] if new == [0] else new
    size, known = t[n.inputs[0]].concrete_shape(), int(np.prod([d for d in new if d != -1]))
    if new.count(-1) == 1 and size is not None and known > 0 and int(np.prod(size)) % known == 0:
        new[new.index(-1)] = int(np.prod(size)) // known
    return tuple(new)


def pack_fc_weights(w: np.ndarray) -> np.ndarray:
    """(N, K) int8 weights in the C core's packed layout (native/src/fc_s8/fc_s8.h): N rounded up to 16 channels,
    K to 4; byte (j/16)*kp*16 + (kk/4)*64 + (j%16)*4 + kk%4 = w[j][kk], zeros in the padding. Shape (np/16, kp*16)."""
    n, k = w.shape
    np_, kp = -(-n // 16) * 16, -(-k // 4) * 4
    p = np.zeros((np_, kp), np.int8)
    p[:n, :k] = w
    return np.ascontiguousarray(p.reshape(np_ // 16, 16, kp // 4, 4).transpose(0, 2, 1, 3)).reshape(np_ // 16, kp * 16)


def _same_padding(opts: dict, what: str) -> bool:
    """TFLite's Padding option: SAME (0, the schema's default) -> True, VALID (1) -> False; any other value, or no
    options table (LiteRT's kTfLitePaddingUnknown), is refused."""
    p = opts.get("Padding")
    if p not in (0, 1):
        raise UnsupportedOpError(f"serial-npu: {what!r}: padding {p!r} is neither SAME (0) nor VALID (1)")
    return p == 0


def _positive(what: str, **params) -> None:
    """LiteRT refuses a stride, dilation or window below 1 (its zero-initialised parameters when the op has no
    options table of its own)."""
    bad = {k: v for k, v in params.items() if min(v) < 1}
    if bad:
        raise UnsupportedOpError(f"serial-npu: {what!r}: {bad} below 1 (LiteRT refuses the op)")


def _pads(in_size: int, k: int, s: int, d: int, same: bool, out_size: int, what: str) -> tuple[int, int]:
    """TFLite's explicit padding (before, after) for SAME / VALID, checked against the model's output size."""
    ek = (k - 1) * d + 1
    out = -(-in_size // s) if same else (in_size - ek) // s + 1
    total = max((out - 1) * s + ek - in_size, 0) if same else 0
    if out != out_size:
        raise UnsupportedOpError(f"serial-npu: {what}: output size {out_size} != {out} from the padding")
    return total // 2, total - total // 2


def tflite_node(n, graph) -> tuple[str, list, list[int]]:
    """(device op, inputs: tensor names or constant arrays made here, attributes) for a TFLite builtin node, with
    every requantization parameter computed here (PROTOCOL.md §6.1); UnsupportedOpError for what the device does
    not run exactly as LiteRT does."""
    tf = n.attrs["tflite_op"]
    opts = n.attrs.get("tflite_options", {}) or {}
    t = graph.tensors
    if tf not in TFLITE_TO_DEVICE or not n.outputs or not n.inputs or not n.inputs[0]:
        raise UnsupportedOpError(f"serial-npu: TFLite {tf} (node {n.name!r}) is not a device op")
    op = TFLITE_TO_DEVICE[tf]
    x, y = n.inputs[0], n.outputs[0]
    if tf in ("RESHAPE", "SQUEEZE"):
        if t[x].dtype != t[y].dtype:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: reshape changes the dtype")
        if tf == "RESHAPE" and _reshape_target(n, graph, opts) != t[y].concrete_shape():
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: the shape LiteRT's RESHAPE computes is not the "
                                     f"output's {t[y].shape} (or not a constant)")
        return op, [x], []
    if tf == "CONCATENATION":
        ins = [i for i in n.inputs if i]
        if int(n.attrs.get("fused_activation", 0)) != 0 or any(not _same_q(graph, i, y) for i in ins):
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: concatenation that requantizes or clamps")
        if len(ins) > 9:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: more than 9 inputs")
        rank = len(t[y].shape)
        axis = int(n.attrs.get("axis", 0))
        return op, ins, [axis + rank if axis < 0 else axis]
    if tf in ("RELU", "RELU6", "RELU_N1_TO_1"):
        _qparams(graph, x, "input")
        if not _same_q(graph, x, y):
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: {tf} with different input and output quantization")
        from .host_tflite import _ACT_RELU, _ACT_RELU6, _ACT_RELU_N1_TO_1

        lo, hi = _act(n, graph, y, {"RELU": _ACT_RELU, "RELU_N1_TO_1": _ACT_RELU_N1_TO_1, "RELU6": _ACT_RELU6}[tf])
        return op, [x], [lo, hi]
    ys, yz = _qparams(graph, y, "output")
    if tf == "FULLY_CONNECTED":
        from .host_tflite import int8_fc_params

        p = int8_fc_params(graph, n)  # the host C core's own eligibility and requantization parameters
        if p is None:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: not an INT8 FULLY_CONNECTED the C core's kernel takes "
                                     "(int8 in and out, constant symmetric int8 (N, K) weights per tensor or per row, "
                                     "constant int32 bias, a ReLU-family activation, the default weights format, "
                                     "quantization XNNPACK takes: host_tflite.int8_fc_params)")
        wi = np.asarray(p["w"], np.int8)
        nn, k = (int(d) for d in wi.shape)
        _scale_range(p["scale"])
        bias = np.zeros(nn, np.int64) if p["bias"] is None else np.asarray(p["bias"], np.int64).reshape(-1)
        # rowc_s = bias - x_zp * wsum, int32 wrapping: the C core plan's per-channel starting value
        rowc = ((bias - p["x_zp"] * wi.astype(np.int64).sum(axis=1) + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)
        return op, [x, pack_fc_weights(wi), rowc, p["scale"]], [nn, k, p["y_zp"], p["lo"], p["hi"]]
    if tf in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        dw = tf == "DEPTHWISE_CONV_2D"
        w, b = t[n.inputs[1]], (t[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] else None)
        xn, yn = t[x].concrete_shape(), t[y].concrete_shape()
        if w.initializer is None or w.initializer.ndim != 4 or w.dtype != "int8" or xn is None or yn is None \
                or len(xn) != 4 or len(yn) != 4:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: NHWC int8 input and a constant 4-D int8 filter")
        wi = np.asarray(w.initializer, np.int8)
        o = int(wi.shape[3] if dw else wi.shape[0])
        if (dw and (wi.shape[0] != 1 or o % xn[3])) or (not dw and wi.shape[3] != xn[3]) or yn[3] != o:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: filter {wi.shape} does not fit input {xn}")
        if dw and int(opts.get("DepthMultiplier", o // xn[3]) or o // xn[3]) != o // xn[3]:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: depth multiplier does not match the filter")
        xs, xz = _qparams(graph, x, "input")
        ws, wz = _qparams(graph, n.inputs[1], "filter", o)
        if np.any(wz != 0) or (ws.size > 1 and w.quant.axis not in ((3,) if dw else (0,))):
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: filter must be symmetric, per tensor or per output "
                                     "channel")
        if b is None or b.initializer is None or b.dtype != "int32" or b.initializer.size != o:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: bias must be a constant int32 (O) (without one LiteRT "
                                     "refuses the int8 op)")
        from .host_tflite import xnnpack_quantization

        if not xnnpack_quantization(graph, t[x], w, b, t[y]):
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: quantization XNNPACK does not take (LiteRT runs "
                                     "TFLite's own kernel, or refuses the model): see host_tflite.xnnpack_quantization")
        (sh, sw), (dh, dwi) = n.attrs["strides"], n.attrs["dilations"]
        _positive(n.name, strides=(sh, sw), dilations=(dh, dwi))
        same = _same_padding(opts, n.name)
        pt, pb = _pads(xn[1], wi.shape[1], sh, dh, same, yn[1], n.name)
        pl, pr = _pads(xn[2], wi.shape[2], sw, dwi, same, yn[2], n.name)
        lo, hi = _act(n, graph, y)
        bias = (np.zeros(o, np.int32) if b is None else np.asarray(b.initializer, np.int32).reshape(-1))
        return op, [x, n.inputs[1], bias, _requant_scales(xs, ws, ys, o)], \
            [sh, sw, pt, pl, pb, pr, dh, dwi, int(xz[0]), int(yz[0]), lo, hi]
    if tf == "ADD":
        if len(n.inputs) != 2 or not n.inputs[1]:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: ADD of two tensors")
        (sa, za), (sb, zb) = _qparams(graph, x, "input"), _qparams(graph, n.inputs[1], "input")
        bias, am, bm, shift = qs8_add_params(sa[0], int(za[0]), sb[0], int(zb[0]), ys[0])
        lo, hi = _act(n, graph, y)
        return op, [x, n.inputs[1]], [bias, am, bm, shift, int(yz[0]), lo, hi]
    if tf == "AVERAGE_POOL_2D":
        xn, yn = t[x].concrete_shape(), t[y].concrete_shape()
        if xn is None or yn is None or len(xn) != 4 or len(yn) != 4 or not _same_q(graph, x, y):
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: NHWC int8 with equal input and output quantization")
        if 0 in xn[1:3]:  # graph.c: no tap inside the input, a count of 0 to divide by
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: the device refuses it: AVGPOOL_S8: input H or W is 0")
        _qparams(graph, x, "input")
        (kh, kw), (sh, sw) = n.attrs["kernel_shape"], n.attrs["strides"]
        _positive(n.name, kernel_shape=(kh, kw), strides=(sh, sw))
        same = _same_padding(opts, n.name)
        pt, pb = _pads(xn[1], kh, sh, 1, same, yn[1], n.name)
        pl, pr = _pads(xn[2], kw, sw, 1, same, yn[2], n.name)
        lo, hi = _act(n, graph, y)
        return op, [x], [kh, kw, sh, sw, pt, pl, pb, pr, lo, hi]
    raise UnsupportedOpError(f"serial-npu: TFLite {tf} (node {n.name!r}) is not a device op")


def qs8_add_params(sa: float, za: int, sb: float, zb: int, so: float) -> tuple[int, int, int, int]:
    """XNNPACK's qs8 add parameters (bias, a_multiplier, b_multiplier, shift) from the operands' and the output's
    scales and zero points: a/out and b/out in float32, 21-bit multipliers of the larger one's exponent, the zero
    points and the rounding folded into bias. The device then computes
    ``(bias + a * a_multiplier + b * b_multiplier) >> shift`` (arithmetic), clamped, plus the output zero point."""
    f = np.float32
    a_os, b_os = f(f(sa) / f(so)), f(f(sb) / f(so))
    for v in (a_os, b_os):
        if not (f(2.0 ** -10) <= abs(v) < f(256.0)):
            raise UnsupportedOpError("serial-npu: ADD with an input/output scale ratio outside [2^-10, 256) "
                                     "(LiteRT runs it with another kernel)")
    mx = max(abs(a_os), abs(b_os))
    shift = 20 - (int(np.array(mx, f).view(np.uint32)) >> 23) + 127

    def mult(v):
        bits = np.array(abs(v), f).view(np.uint32) + np.uint32(shift << 23)
        m = int(np.rint(bits.view(f)))
        return -m if np.signbit(v) else m

    am, bm = mult(a_os), mult(b_os)
    bias = (1 << (shift - 1)) - am * za - bm * zb
    return int(bias), am, bm, int(shift)


def onnx_node(n, graph, shape_of, const) -> tuple[str, list, list[int]]:
    """(device op, input names ("" for an absent optional input), attributes) for an ONNX node the device runs
    (``ONNX_TO_DEVICE``); ``shape_of``/``const``: the translation's static-shape and constant lookups."""
    op = ONNX_TO_DEVICE[n.qualified_op]
    attrs: list[int] = []
    ins = list(n.inputs)
    if op in ("QLinearConv", "ConvInteger"):
        if n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: auto_pad is not supported (explicit pads only)")
        w = graph.tensors[ins[3 if op == "QLinearConv" else 1]]
        if w.shape is None or len(w.shape) != 4:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: 2-D convolutions only")
        pads = list(n.attrs.get("pads", [0, 0, 0, 0]))
        st = list(n.attrs.get("strides", [1, 1]))
        dl = list(n.attrs.get("dilations", [1, 1]))
        attrs = [int(n.attrs.get("group", 1)), st[0], st[1], pads[0], pads[1], pads[2], pads[3], dl[0], dl[1]]
    elif op == "Clip":
        t = graph.tensors[ins[0]]
        lo, hi = {"int8": (-128, 127), "uint8": (0, 255)}.get(t.dtype, (-2 ** 31, 2 ** 31 - 1))
        if len(ins) > 1 and ins[1]:
            lo = int(const(ins[1]))
        if len(ins) > 2 and ins[2]:
            hi = int(const(ins[2]))
        attrs, ins = [lo, hi], ins[:1]
    elif op == "Copy":
        ins = ins[:1]
    elif op == "Concat":
        rank = len(shape_of(n.outputs[0]))
        axis = int(n.attrs.get("axis", 0))
        attrs = [axis + rank if axis < 0 else axis]
    return op, ins, attrs


def _lower(partition, graph):
    """``partition`` as the parts of one graph blob: (blob tensors, blob nodes, their node names, input ids, output
    ids, ids by tensor name); UnsupportedOpError for what the device cannot run."""
    from ..bridge.protocol import BlobNode, BlobTensor, node_problem

    nodes = {n.name: n for n in graph.nodes}
    tensors: list = []
    ids: dict[str, int] = {}

    def shape_of(name):
        t = graph.tensors[name]
        s = t.concrete_shape()
        if s is None:
            raise UnsupportedOpError(f"serial-npu: tensor {name!r} has no static shape {t.shape}")
        return s

    def tid(name, const_ok=True):
        if name in ids:
            return ids[name]
        t = graph.tensors[name]
        if t.initializer is not None:
            if not const_ok:
                raise UnsupportedOpError(f"serial-npu: {name!r} must not be a constant here")
            a = np.asarray(t.initializer)
            if a.dtype.name not in ("int8", "uint8", "int32", "float32"):
                raise UnsupportedOpError(f"serial-npu: constant {name!r} of dtype {a.dtype}")
            ids[name] = cid(a)
            return ids[name]
        if t.dtype not in ("int8", "uint8", "int32"):
            raise UnsupportedOpError(f"serial-npu: tensor {name!r} of dtype {t.dtype} (int8/uint8/int32 only)")
        tensors.append(BlobTensor(t.dtype, shape_of(name)))
        ids[name] = len(tensors) - 1
        return ids[name]

    def const(name):
        t = graph.tensors.get(name)
        if not name or t is None or t.initializer is None:
            raise UnsupportedOpError(f"serial-npu: {name!r} must be a constant")
        return np.asarray(t.initializer)

    def cid(a: np.ndarray) -> int:  # a constant the translation made (packed weights, per-channel scales)
        a = np.ascontiguousarray(a)
        tensors.append(BlobTensor(a.dtype.name, tuple(a.shape), a.tobytes()))
        return len(tensors) - 1

    for name in partition.inputs:
        tid(name, const_ok=False)
    bnodes = []
    for nn in partition.nodes:
        n = nodes[nn]
        if "tflite_op" in n.attrs:  # a TFLite builtin: TFLite INT8 semantics (PROTOCOL.md §6.1)
            op, ins, attrs = tflite_node(n, graph)
        elif n.qualified_op not in ONNX_TO_DEVICE:
            raise UnsupportedOpError(f"serial-npu: op {n.qualified_op} (node {n.name!r}) is not a device op")
        else:
            op, ins, attrs = onnx_node(n, graph, shape_of, const)
        for x in ins:  # names, or constants the translation made (packed weights, per-channel scales)
            if isinstance(x, str) and x and x not in ids and graph.tensors[x].initializer is None:
                raise UnsupportedOpError(f"serial-npu: {n.name!r} reads {x!r} before it is produced")
        in_ids = [cid(x) if isinstance(x, np.ndarray) else tid(x) if x else None for x in ins]
        out = n.outputs[0]
        if len(n.outputs) != 1 or out in ids:
            raise UnsupportedOpError(f"serial-npu: {n.name!r}: one output, written once")
        bnodes.append(BlobNode(op, in_ids, tid(out, const_ok=False), attrs))
        # the firmware's own rules (graph.c check_node): what it would refuse at LOAD_COMMIT stays on the host
        why = node_problem(op, [None if i is None else tensors[i] for i in in_ids], tensors[ids[out]], attrs)
        if why:
            raise UnsupportedOpError(f"serial-npu: node {n.name!r} ({n.qualified_op}): the device refuses it: {why}")
    for o in partition.outputs:
        if o not in ids:
            raise UnsupportedOpError(f"serial-npu: partition output {o!r} is not produced by its nodes")
    return (tensors, bnodes, list(partition.nodes), [ids[i] for i in partition.inputs],
            [ids[o] for o in partition.outputs], ids)


def translate_pieces(partition, graph, limits,
                     arena: float | None = None) -> list[tuple[bytes, list[str], list[str]]]:
    """The partition as device graphs (``encode_graph`` blobs with their input and output names) that each fit the
    device's ``limits`` (HELLO's ``DeviceLimits``: tensors, nodes, inputs, outputs per graph; handles): one when
    the partition fits, else runs of consecutive nodes, each taking nodes while it fits. The device runs them in
    order, the tensors between them staying in its memory, so the link carries what one graph would. A node that
    fits no graph alone is an UnsupportedOpError naming the limit; so is a partition whose graphs and tensors need
    more than the device's ``arena`` bytes (``_arena_need``): its every run would fail over with ERR_NOMEM."""
    from ..bridge.protocol import encode_graph

    tensors, bnodes, names, ins, outs, ids = _lower(partition, graph)
    over = _over_limits(limits, len(tensors), len(bnodes), len(ins), len(outs), len(ins) + len(outs))
    if not over:
        blob = encode_graph(tensors, bnodes, ins, outs)
        _check_arena(partition, arena, [(blob, tensors, bnodes, ins, outs, partition.inputs, partition.outputs)])
        return [(blob, list(partition.inputs), list(partition.outputs))]
    name_of = {i: n for n, i in ids.items()}
    pieces, parts = [], []
    for lo, hi, p_in, p_out in _split(tensors, bnodes, names, outs, limits):
        remap, sub = {}, []

        def rid(i):
            if i not in remap:
                remap[i] = len(sub)
                sub.append(tensors[i])
            return remap[i]

        for i in p_in:
            rid(i)
        nodes = [dataclasses.replace(nd, inputs=[None if i is None else rid(i) for i in nd.inputs],
                                     output=rid(nd.output)) for nd in bnodes[lo:hi]]
        sub_in, sub_out = [remap[i] for i in p_in], [remap[o] for o in p_out]
        pieces.append((encode_graph(sub, nodes, sub_in, sub_out), [name_of[i] for i in p_in],
                       [name_of[o] for o in p_out]))
        parts.append((pieces[-1][0], sub, nodes, sub_in, sub_out, pieces[-1][1], pieces[-1][2]))
    _check_arena(partition, arena, parts)
    log.info("serial-npu: partition %s (%s) is %d graphs on the device", getattr(partition, "id", "?"),
             ", ".join(f"{what} {n} > {cap}" for what, n, cap in over), len(pieces))
    return pieces


def arena_need(graphs) -> tuple[int, int, int]:
    """(blobs, activations, inputs and outputs): the bytes of the reference firmware's arena the device graphs
    ``graphs`` ((blob, tensors, nodes, input ids, output ids, input names, output names) each) take together, all
    on the device at once while their partition runs: each graph's blob (LOAD_BEGIN) and activations (LOAD_COMMIT),
    and one tensor per input and output name (ALLOC; a tensor between two graphs once), each block rounded as
    arena.c rounds it."""
    from ..bridge.protocol import activation_bytes, arena_round, tensor_nbytes

    io = {}
    for _, tensors, _, ins, outs, in_names, out_names in graphs:
        for i, name in zip((*ins, *outs), (*in_names, *out_names)):
            io[name] = arena_round(tensor_nbytes(tensors[i].dtype, tensors[i].shape))
    return (sum(arena_round(len(g[0])) for g in graphs), sum(activation_bytes(*g[1:5]) for g in graphs),
            sum(io.values()))


def _check_arena(partition, arena: float | None, graphs) -> None:
    """UnsupportedOpError when ``graphs`` (``arena_need``'s) need more than the device's ``arena`` bytes."""
    if not arena:
        return
    blobs, act, io = arena_need(graphs)
    if blobs + act + io > arena:
        raise UnsupportedOpError(
            f"serial-npu: partition {getattr(partition, 'id', '?')} needs {blobs + act + io} bytes of the device's "
            f"arena (graph blobs {blobs}, activations {act}, inputs and outputs {io}), more than its {int(arena)}")


@dataclasses.dataclass(frozen=True)
class _OneNode:
    """A partition of one node, as translate_pieces takes a plan's."""

    id: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def translation_problem(node, graph, limits=None) -> str | None:
    """Why the translation refuses ``node`` of ``graph`` (``translate_pieces`` of the node alone, with the device's
    ``limits``: HELLO's, else the reference firmware's), in its words, or None. refine_unit puts it in the unit as its
    ``node_check``, so the plan keeps such a node on the host and the rest of its partition on the device, as the
    compile then finds (it sent the whole partition to the host), and fallback='forbid' names every such node."""
    from ..bridge.protocol import DeviceLimits

    ins = tuple(dict.fromkeys(x for x in node.inputs if x and graph.tensors[x].initializer is None))
    try:
        translate_pieces(_OneNode(node.name, (node.name,), ins, tuple(o for o in node.outputs if o)), graph,
                         limits or DeviceLimits())
    except UnsupportedOpError as exc:
        return str(exc)
    return None


def _over_limits(limits, tensors: int, nodes: int, inputs: int, outputs: int, handles: int) -> list[tuple]:
    """(what, count, cap) of each of the device's ``limits`` (HELLO's ``DeviceLimits``) a graph of these counts
    exceeds, in the order messages name them: the one table of which count each limit caps."""
    return [(what, n, cap) for what, n, cap in (
        ("tensors", tensors, limits.max_tensors), ("nodes", nodes, limits.max_nodes),
        ("inputs", inputs, limits.max_io), ("outputs", outputs, limits.max_io),
        ("tensor handles", handles, limits.max_handles)) if n > cap]


def _split(tensors, nodes, names, outputs, limits) -> list[tuple[int, int, list[int], list[int]]]:
    """Consecutive runs ``nodes[lo:hi]`` that each fit ``limits`` as a graph: (lo, hi, input ids, output ids). A
    run's inputs are what it reads and does not make (not constants), its outputs what it makes and the partition
    outputs or a later run reads; the handles it needs are those plus the tensors earlier runs keep for later ones."""
    last = {i: k for k, nd in enumerate(nodes) for i in nd.inputs if i is not None}
    keep, const = set(outputs), {i for i, t in enumerate(tensors) if t.data is not None}
    first = {}  # the node from which each tensor is on the device: made there, or read (a partition input)
    for k, nd in enumerate(nodes):
        for i in (*nd.inputs, nd.output):
            if i is not None and i not in const:
                first.setdefault(i, k)

    def fit(lo, hi):
        made = [nd.output for nd in nodes[lo:hi]]
        used, ins = set(made), []
        for i in (i for nd in nodes[lo:hi] for i in nd.inputs if i is not None):
            if i not in used and i not in const:
                ins.append(i)
            used.add(i)
        outs = [o for o in made if o in keep or last.get(o, -1) >= hi]
        held = {i for i, f in first.items() if f < lo and last.get(i, -1) >= hi} | set(ins) | set(outs)
        over = [f"{what} ({n} > {cap})"
                for what, n, cap in _over_limits(limits, len(used), hi - lo, len(ins), len(outs), len(held))]
        return ins, outs, over

    runs, lo = [], 0
    while lo < len(nodes):
        hi = lo + 1
        ins, outs, over = fit(lo, hi)
        if over:
            raise UnsupportedOpError(f"serial-npu: node {names[lo]!r} needs more than the device's limits per graph "
                                     f"allow: {', '.join(over)}")
        while hi < len(nodes):
            i2, o2, over = fit(lo, hi + 1)
            if over:
                break
            hi, ins, outs = hi + 1, i2, o2
        runs.append((lo, hi, ins, outs))
        lo = hi
    return runs


# ---- the compiled partition ------------------------------------------------------------------------------------

def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"), digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class DeviceGraph:
    """One graph a partition runs on the device (``translate_pieces``): its blob, hash and tensors by name."""

    blob: bytes
    hash: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class SerialNpuPartition(CompiledPartition):
    def __init__(self, state: DeviceState, pieces, inputs, outputs, fallback_factory, resident_inputs=(),
                 resident_outputs=(), between=None):
        """``pieces``: ``translate_pieces``' (blob, inputs, outputs), run in order; None or [] when the device cannot
        run the partition (it runs on the host). ``between``: name -> bytes of the tensors one piece leaves on the
        device for a later one (no session buffer holds them)."""
        from ..bridge.protocol import fnv1a64

        self.state = state
        self.resident_inputs, self.resident_outputs = set(resident_inputs), set(resident_outputs)
        self.graphs = [DeviceGraph(b, fnv1a64(b), tuple(i), tuple(o)) for b, i, o in pieces or ()]
        # per graph: the names a later graph of the partition reads (what a run keeps on the device past that graph)
        self._read_later = [set()] * len(self.graphs)
        for j in range(len(self.graphs) - 2, -1, -1):
            self._read_later[j] = self._read_later[j + 1] | set(self.graphs[j + 1].inputs)
        # the first (nearly always the only) graph; None: the partition runs on the host
        self.blob = self.graphs[0].blob if self.graphs else None
        self.between = dict(between or {})  # ``state`` comes with this partition's reference (device_state(ref=True))
        for g in self.graphs:
            _graph_users(state.url, g.hash, +1)
        # a Session dropped without close(): its reference and graph users are given back when it is collected
        self._finalizer = weakref.finalize(self, _collected, state, tuple(g.hash for g in self.graphs))
        self.inputs, self.outputs = list(inputs), list(outputs)
        self._fallback_factory = fallback_factory
        self._fallback = None
        self.runs_on_device = 0
        self.runs_on_host = 0
        self.failovers = 0
        self._link: dict[str, int] = {}  # the link counters of this partition's runs (DeviceState.link_totals' keys)
        self.refused: str | None = None  # the device refused a graph at LOAD_COMMIT: the host runs it from then on
        self.last_timing = {"link_s": 0.0, "device_s": 0.0, "host_s": 0.0}

    def link_stats(self) -> dict:
        """This partition's share of its device's link: what its own runs sent and received (handshakes, graph
        loads, tensors), retransmitted and resynchronised, and its failovers. Two Sessions on one device each count
        their own; the HELLO a Session makes when it plans (``refine_unit``) is no partition's."""
        return _link_summary(self._link, self.failovers)

    @staticmethod
    def _key(name: str, buf: np.ndarray) -> str:
        """The device tensor of a resident tensor: its name and the session buffer producer and consumer share."""
        return f"{name}@{id(buf):x}"

    def _device_key(self, name: str, inputs, outputs, made) -> str:
        """The device tensor of ``name`` in this run: an earlier graph's output (``made``), a resident tensor (keyed by
        its session buffer), or the name."""
        if name in made:
            return made[name]
        if name in self.resident_inputs and name in inputs:
            return self._key(name, inputs[name])
        if name in self.resident_outputs and name in outputs:
            return self._key(name, outputs[name])
        return name

    def _materialize(self, key: str) -> None:
        """Fill the host buffer of a resident tensor whose device copy is lost: re-run its producer on the host."""
        entry = self.state.on_device_only.get(key)
        producer = entry[0]() if entry is not None else None
        if producer is not None:  # else it is gone, and the Session whose buffer this is with it
            producer._run_host(entry[1], entry[2])

    def _run_host(self, inputs, outputs) -> None:
        st = self.state
        for name in self.resident_inputs:
            self._materialize(self._key(name, inputs[name]))
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        self._fallback.run(inputs, outputs)
        for o in self.resident_outputs:
            k = self._key(o, outputs[o])
            st.on_device_only.pop(k, None)
            st.digests.pop(k, None)

    def _run_device(self, inputs, outputs) -> None:
        st = self.state
        st.connect()
        dev = st.device
        t0, load_s, device_s = time.perf_counter(), 0.0, 0.0
        made: dict[str, str] = {}  # name -> device tensor key of what an earlier graph of this run left there
        held: dict[str, str] = {}  # name -> device tensor key of what this run has put on the device so far
        for g, later in zip(self.graphs, self._read_later):
            keys = {n: self._device_key(n, inputs, outputs, made) for n in (*g.inputs, *g.outputs)}
            held.update(keys)
            # kept from eviction: this graph's tensors and what a later graph reads (an output or an input sent
            # earlier), not every tensor of the run: a split partition has more of those than the device has handles
            pinned = {*keys.values(), *(held[n] for n in later if n in held)}
            if g.hash in st.graphs:
                st.graphs[g.hash] = st.graphs.pop(g.hash)  # most recently used last
            else:
                t1 = time.perf_counter()
                try:
                    st.load_graph(g.blob, g.hash, pinned)
                except DeviceStatusError as exc:
                    if exc.status in (ERR_GRAPH, ERR_UNSUPPORTED, ERR_SHAPE):
                        self.refused = str(exc)  # what node_problem does not foresee: no use sending it again
                    raise
                load_s += time.perf_counter() - t1
            in_h = []
            for name in g.inputs:
                key = keys[name]
                if name in made:  # an earlier graph's output: bound in place
                    in_h.append(st.tensors[key][0])
                    continue
                a = inputs[name]
                if name in self.resident_inputs and key in st.on_device_only:
                    h = st.tensors.get(key)
                    if h is not None and h[1] == a.nbytes:  # the producer's device tensor: bound in place
                        in_h.append(h[0])
                        continue
                    self._materialize(key)  # lost with a reset: recomputed on the host, then sent below
                h = st.tensor(key, a.nbytes, pinned)
                d = _digest(a)
                if st.digests.get(key) != d:  # not already on the device (an earlier device partition's output)
                    st.digests.pop(key, None)
                    dev.write(h, a)
                    st.digests[key] = d
                in_h.append(h)
            out_h = [st.tensor(keys[o], outputs[o].nbytes if o in outputs else self.between[o], pinned)
                     for o in g.outputs]
            for o in g.outputs:
                st.digests.pop(keys[o], None)
                st.on_device_only.pop(keys[o], None)
            device_s += dev.invoke(g.hash, in_h, out_h)[0]
            for o, h in zip(g.outputs, out_h):
                made[o] = keys[o]
                if o not in outputs:  # between two graphs of this partition: stays on the device
                    continue
                if o in self.resident_outputs:  # stays on the device for a later partition: not read back
                    st.on_device_only[keys[o]] = (weakref.ref(self), inputs, outputs, o)
                    continue
                dev.read(h, outputs[o])
                st.digests[o] = _digest(outputs[o])
        total = time.perf_counter() - t0 - load_s
        self.last_timing = {"link_s": max(total - device_s, 0.0), "device_s": device_s, "host_s": 0.0}

    def run(self, inputs, outputs) -> None:
        st = self.state
        _reap()
        with st.lock:
            if self.graphs and self.refused is None and time.monotonic() >= st.down_until:
                before = st.link_totals()
                try:
                    self._run_device(inputs, outputs)
                    self.runs_on_device += 1
                    st.backoff = st.retry_after_s
                    return
                except ProtocolVersionError:  # not a fault to ride out: the host and the device cannot talk
                    st.drop_connection()
                    raise
                except LinkError as exc:
                    st.failovers += 1
                    self.failovers += 1
                    # logged as text: a record holding the exception would hold, through its traceback, this
                    # partition (a handler that keeps records kept a dropped Session's partitions alive)
                    st.last_error = str(exc)
                    if self.refused is not None:  # the device is well: this partition is not for it
                        log.error("serial-npu %s: %s; this partition runs on the host from now on", st.url,
                                  st.last_error)
                    else:
                        st.down_until = time.monotonic() + st.backoff
                        log.warning("serial-npu %s: %s; this run completes on the host, the device is tried again "
                                    "in %.1f s", st.url, st.last_error, st.backoff)
                        st.backoff = min(st.backoff * 2, 30.0)
                        # a request the device did not answer in time (a noisy line, a stalled device) leaves the
                        # port and the session usable: kept, so the next run needs no new HELLO, unless the host
                        # lost track of a handle or graph (an ALLOC, FREE or UNLOAD without answer: a new host
                        # session frees them). Everything else (a port error, a reset, an error answer) reconnects
                        if not isinstance(exc, NoAnswerError) or st.device is None or st.device.lost_track:
                            st.drop_connection()
                finally:  # the link only carried this run's traffic meanwhile: st.lock is held
                    after = st.link_totals()
                    for k, v in after.items():
                        self._link[k] = self._link.get(k, 0) + v - before.get(k, 0)
            t0 = time.perf_counter()
            self._run_host(inputs, outputs)
            self.runs_on_host += 1
            self.last_timing = {"link_s": 0.0, "device_s": 0.0, "host_s": time.perf_counter() - t0}

    def close(self) -> None:
        st = self.state
        if st is not None:
            with st.lock:
                for k in [k for k, e in st.on_device_only.items() if e[0]() is self]:
                    del st.on_device_only[k]
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
        if st is not None:
            if self._finalizer.detach() is not None:  # once: by close(), or after the collection
                _drop_partition(st, tuple(g.hash for g in self.graphs))
            self.state = None


class SerialNpuDelegate(Delegate):
    """Runs partitions on a serial NPU; see the module docstring."""

    keeps_tensors_resident = True
    needs_static_shapes = True  # compile gets the graph with the session's dims bound (translate_pieces)

    @classmethod
    def available(cls, unit: Any = None) -> tuple[bool, str]:
        try:
            import serial  # noqa: F401
        except ImportError:
            return False, "pyserial is not installed (pip install pyserial)"
        return True, ""

    @classmethod
    def refine_unit(cls, unit, options: Mapping[str, Any] | None = None):
        """``unit`` narrowed to the ops and dtypes the device reports in HELLO (profile ∩ device), its memory to the
        device's arena. Unchanged when no URL is configured or the device does not answer (runs then fail over), except
        under ``fallback="forbid"`` (in ``options``): a device that does not answer is then a DeviceError."""
        from ..bridge.protocol import DeviceLimits

        opts = _options(unit, options)
        url = opts.get("url")
        if not url:
            return unit
        # what compile's translation refuses, asked node by node when planning (the reference firmware's limits
        # until HELLO says the device's)
        unit = dataclasses.replace(unit, node_check=functools.partial(translation_problem, limits=DeviceLimits()))
        st = device_state(url, opts)
        try:
            with st.lock:
                info = st.connect()
        except ProtocolVersionError:  # PROTOCOL §2.2: raise, naming both versions, and stop (no host plan)
            st.drop_connection()
            raise
        except LinkError as exc:
            st.drop_connection()
            if opts.get("fallback") == "forbid":  # its partitions would all run on the host
                raise DeviceError(f"serial-npu {url}: the device does not answer ({exc}); fallback='forbid' runs "
                                  "none of its partitions on the host. Check the port and that the device (or "
                                  "`edgert npu-sim`) is running, or use fallback='allow'") from None
            log.warning("serial-npu %s: no HELLO (%s); planning with the profile's op list", url, exc)
            return unit
        finally:
            _release(st, ref=0)  # no partition holds it yet: planning's connection is closed
        dev_ops = set(info.ops)
        ops = {k: v for k, v in unit.ops.items() if PROFILE_OP_DEVICE_OPS.get(k, set()) & dev_ops}
        dtypes = tuple(d for d in unit.dtypes if d in info.dtypes or d in ("int64",))
        mem = min(float(unit.memory_bytes or info.arena_bytes), float(info.arena_bytes))
        # the device's limits ride in the unit to compile (translate_pieces)
        return dataclasses.replace(unit, ops=ops, dtypes=dtypes, memory_bytes=mem,
                                   delegate_options={**(unit.delegate_options or {}), "device_limits": info.limits},
                                   node_check=functools.partial(translation_problem, limits=info.limits))

    def compile(self, partition, graph, unit: Any = None, options: Mapping[str, Any] | None = None):
        from ..bridge.protocol import DeviceLimits, tensor_nbytes
        from ..formats.tflite import is_tflite_graph
        from .onnxruntime import CPU, OnnxruntimePartition, session_options

        opts = _options(unit, options)
        threads = opts.get("threads")

        def host_partition():
            if is_tflite_graph(graph):  # LiteRT's CPU path: the arithmetic the device reproduces
                from .host_tflite import compile_host_tflite

                return compile_host_tflite(partition, graph, None, {"threads": threads, "core": False})
            model = graph.subgraph_model(partition.nodes, name=f"{graph.name}_p{getattr(partition, 'id', 0)}_host")
            return OnnxruntimePartition(model, partition.inputs, partition.outputs, [CPU], None,
                                        session_options(None, threads))

        url = opts.get("url")
        if not url:
            raise DeviceError("serial-npu: no device URL: pass device_options={'url': ...} to Session (CLI: "
                              "--device-url), or set delegate_options.port in the profile; `edgert npu-sim` "
                              "prints an emulator's")
        # HELLO's, when refine_unit got an answer; else the reference firmware's (a smaller device then refuses a
        # graph at its first load and the partition runs on the host)
        limits = (getattr(unit, "delegate_options", None) or {}).get("device_limits") or DeviceLimits()
        try:
            pieces = translate_pieces(partition, graph, limits, getattr(unit, "memory_bytes", None))
        except UnsupportedOpError as exc:
            if opts.get("fallback") == "forbid":
                raise
            # the profile's op list cannot say everything (a RELU that requantizes, a float bias, ...): what the
            # device cannot run exactly stays on the host, the partition's tensors kept as the plan laid them out
            log.warning("%s; partition %s runs on the host", exc, getattr(partition, "id", "?"))
            pieces = []
        st = device_state(url, opts, ref=True)  # the partition's reference
        between = {n: tensor_nbytes(graph.tensors[n].dtype, graph.tensors[n].concrete_shape())
                   for _, _, outs in pieces for n in outs if n not in partition.outputs}
        return SerialNpuPartition(st, pieces, partition.inputs, partition.outputs, host_partition,
                                  opts.get("resident_inputs", ()), opts.get("resident_outputs", ()), between)


def link_stats(compiled) -> dict:
    """``bytes_over_link``, ``retransmits``, ``resyncs``, ``failovers`` summed over the serial-NPU partitions of
    ``compiled`` (a session's compiled partitions), each counting its own runs (``SerialNpuPartition.link_stats``):
    a Session reports its own traffic, not that of every Session on the same device."""
    out = {"bytes_over_link": 0, "retransmits": 0, "resyncs": 0, "failovers": 0}
    for c in compiled or []:
        f = getattr(c, "link_stats", None)
        if f is None:
            continue
        d = f()
        for k in out:
            out[k] += d.get(k, 0)
    return out


register("serial-npu", SerialNpuDelegate)
