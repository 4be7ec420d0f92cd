"""Device profiles: load and validate ``device_profiles/*.toml`` (shipped inside the package), detect the host, and
say whether each compute unit's runtime is present on this machine.

A profile describes a machine edgert may run a graph on: its compute units (the host CPU and any NPU/TPU), what
each runs (ops, dtypes, shape constraints), how fast (ops/s per dtype), the link between host and device, power
draw and price. The schema is written down in docs/profiles.md; ``load`` enforces it and any violation raises
``ProfileError`` naming the file, the field path (``units[1].link.bandwidth_bytes_s``) and the reason.

This module reads files and probes the machine (no model loading, no device I/O). It imports only the graph IR
and ``edgert.native`` (for the host's ISA and cores); it must not import from plan, delegates or session.
"""
from __future__ import annotations

import importlib.util
import functools
import math
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ProfileError
from .graph.ir import DTYPE_BITS, Graph, Node

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DELEGATES = ("host", "onnxruntime", "litert", "serial-npu", "rknn")  # edgert's own (rknn: a cost model, no driver)
UNIT_KINDS = ("cpu", "gpu", "npu", "tpu", "dsp")
LINK_KINDS = ("shared-memory", "pcie", "usb", "uart")
DTYPES = tuple(DTYPE_BITS) + ("string",)
CONTROL_FLOW = ("If", "Loop", "Scan")

# delegate -> (allowed delegate_options keys, required keys)
DELEGATE_OPTIONS: dict[str, tuple[set[str], set[str]]] = {
    "host": ({"threads"}, set()),
    "onnxruntime": ({"providers", "provider_options", "session_options"}, {"providers"}),
    "litert": ({"library", "options"}, {"library"}),
    "serial-npu": ({"url", "port", "baudrate", "timeout_s", "retries", "retry_after_s"}, set()),
    "rknn": ({"library", "target", "core_mask"}, {"target"}),
}


SESSION_OPTION_DELEGATES = ("serial-npu",)  # delegates whose partitions take Session(device_options=...) over the unit's


def check_device_options(profile, options: Mapping) -> None:
    """Refuse a Session's ``device_options`` key that no accelerator unit of ``profile`` takes (``DELEGATE_OPTIONS``
    of its delegate: what a profile's ``delegate_options`` may hold). A misspelt key (``timout_s``) was dropped
    without a word. A registered delegate's options are its own to check."""
    from .errors import InvalidArgumentError

    devices = {u.delegate for u in profile.units if u.link is not None}
    if not devices or any(d not in DELEGATE_OPTIONS for d in devices):
        return
    # only these delegates read a Session's device_options (over their unit's); the others read the profile alone
    known = set().union(*(DELEGATE_OPTIONS[d][0] for d in devices if d in SESSION_OPTION_DELEGATES))
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise InvalidArgumentError(
            f"device_options: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for device "
            f"{profile.name!r} ({', '.join(sorted(devices))}); known keys: {', '.join(sorted(known))}")


def _registry():
    """``edgert.delegates.base``, where delegates are registered, or None. That package is a layer above this one: the
    registry is read where it is when the package is loaded (nothing can have been registered before), never imported
    from here."""
    return sys.modules.get("edgert.delegates.base")


def known_delegates() -> tuple[str, ...]:
    """The names a unit's ``delegate`` may take: edgert's own (``DELEGATES``) and every registered one."""
    base = _registry()
    return DELEGATES + tuple(n for n in sorted(base.registered() if base else ()) if n not in DELEGATES)


# ---- the model ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """How data moves between host memory and a unit. ``zero_copy``: the unit reads host buffers in place."""

    kind: str
    zero_copy: bool
    bandwidth_bytes_s: float
    latency_s: float

    def transfer_s(self, nbytes: int) -> float:
        """Seconds to move ``nbytes`` one way: the fixed latency, plus the bytes over the bandwidth unless the
        link is zero-copy (then the device reads the host buffer where it is and only the latency is paid)."""
        if nbytes < 0:
            raise ProfileError(f"transfer_s: nbytes must be >= 0, got {nbytes}")
        return self.latency_s if self.zero_copy else self.latency_s + nbytes / self.bandwidth_bytes_s


@dataclass(frozen=True)
class OpConstraint:
    """What a unit accepts for one op. ``None`` fields fall back to the unit's own limits."""

    name: str
    dtypes: tuple[str, ...] | None = None
    max_rank: int | None = None
    max_dim: int | None = None
    static_shapes: bool | None = None
    formats: tuple[str, ...] | None = None  # model formats whose nodes of this op the unit takes (None: any)


@dataclass
class ComputeUnit:
    """One compute unit of a profile. ``ops`` maps a qualified op name (``Conv``; ``com.microsoft:QLinearAdd``
    for other domains; ``*`` = every op) to its constraints. ``dtypes`` may hold ``*`` (any dtype).
    ``throughput`` is ops/s per dtype (a multiply-accumulate counts as 2 ops, as datasheet TOPS do).
    ``memory_bytes``: system memory for a CPU, on-chip memory for an accelerator (0 = not published / none).
    ``link`` is None for units that work in host memory directly (delegate ``host``). ``node_check``: the delegate's
    own check of one node, ``(node, graph) -> why it cannot run it, or None``, which a delegate's ``refine_unit`` may
    put in (serial-npu: its translation's), so the plan refuses what the delegate's compile would; not in profiles."""

    name: str
    kind: str
    delegate: str
    delegate_options: dict[str, Any]
    dtypes: tuple[str, ...]
    ops: dict[str, OpConstraint]
    throughput: dict[str, float]
    memory_bytes: float
    link: Link | None = None
    max_rank: int | None = None
    max_dim: int | None = None
    static_shapes: bool = False
    cores: int | None = None
    isa: tuple[str, ...] = ()
    node_check: Callable[[Node, Graph], str | None] | None = field(default=None, compare=False, repr=False)

    def constraint(self, node: Node) -> OpConstraint | None:
        """The constraints this unit applies to ``node``'s op, or None if the op is not in its list."""
        return self.ops.get(node.qualified_op) or self.ops.get("*")

    def supports(self, node: Node, graph: Graph, bindings: Mapping[str, int] | None = None) -> tuple[bool, str]:
        """Whether this unit can run ``node`` of ``graph`` (symbolic dims looked up in ``bindings``), and why not:
        ``(True, "")`` or ``(False, "op Softmax not in the npu op list")``, ``"dtype float32 not supported
        (tensor h1)"``, ``"dynamic shape: tensor x has shape ('batch', 8)"``, ``"rank 5 > max_rank 4 (tensor t)"``.
        Quantization scale/zero-point inputs are not checked against ``dtypes`` (they are parameters, not data).
        A control-flow node (If/Loop/Scan) is supported only if every node of its bodies is; a body's reads of
        enclosing graphs' values are judged by those values (``Graph.in_scope``). Last, the delegate's
        ``node_check``, when the unit has one."""
        c = self.constraint(node)
        if c is None:
            return False, f"op {node.qualified_op} not in the {self.name} op list"
        if c.formats is not None:
            fmt = node_format(node)
            if fmt not in c.formats:
                return False, (f"op {node.qualified_op} from {fmt} not in the {self.name} op list (only from "
                               f"{', '.join(c.formats)})")
        dtypes = c.dtypes if c.dtypes is not None else self.dtypes
        max_rank = c.max_rank if c.max_rank is not None else self.max_rank
        max_dim = c.max_dim if c.max_dim is not None else self.max_dim
        static = c.static_shapes if c.static_shapes is not None else self.static_shapes
        for name, dtype in graph.node_dtypes(node).items():
            if "*" not in dtypes and dtype not in dtypes:
                what = "unknown dtype" if dtype is None else f"dtype {dtype} not supported"
                return False, f"{what} (tensor {name}; {self.name} runs {', '.join(dtypes)})"
            t = graph.tensors.get(name)
            if t is None or not (static or max_rank is not None or max_dim is not None):
                continue
            if t.shape is None:
                return False, f"unknown shape (tensor {name})"
            shape = t.concrete_shape(bindings)
            if static and shape is None:
                return False, f"dynamic shape: tensor {name} has shape {t.shape}"
            if max_rank is not None and len(t.shape) > max_rank:
                return False, f"rank {len(t.shape)} > max_rank {max_rank} (tensor {name})"
            if max_dim is not None and shape is not None and shape and max(shape) > max_dim:
                return False, f"dim {max(shape)} > max_dim {max_dim} (tensor {name})"
        for key, body in node.subgraphs.items():
            scoped = body.in_scope(graph)
            for inner in body.nodes:
                ok, why = self.supports(inner, scoped, bindings)
                if not ok:
                    return False, f"{node.op_type} body {key}: node {inner.name}: {why}"
        why = self.node_check(node, graph) if self.node_check is not None else None
        return (False, why) if why else (True, "")

    def ops_per_s(self, dtype: str) -> float | None:
        """Throughput for ``dtype`` (ops/s), or None if the profile gives none."""
        return self.throughput.get(dtype)


@dataclass
class DeviceProfile:
    """A validated device profile. ``price_usd_per_hour`` is derived: ``price.per_hour_usd``, or
    ``price.unit_usd / price.amortize_hours``. ``source`` is the TOML file it came from."""

    name: str
    description: str
    units: list[ComputeUnit]
    power_w: float
    idle_w: float
    price_usd_per_hour: float
    source: str
    host: dict[str, Any] = field(default_factory=dict)  # detected facts (host profile and attach = "host")

    def unit(self, name: str) -> ComputeUnit:
        for u in self.units:
            if u.name == name:
                return u
        raise ProfileError(f"device profile {self.name!r} has no unit {name!r} (units: "
                           f"{', '.join(u.name for u in self.units)})")

    @property
    def host_unit(self) -> ComputeUnit:
        """The unit that runs whatever no accelerator takes (the first unit driven by the ``host`` delegate)."""
        for u in self.units:
            if u.delegate == "host":
                return u
        return self.units[0]

    def cost_usd(self, seconds: float) -> float:
        """The price of occupying this machine for ``seconds``."""
        return self.price_usd_per_hour * seconds / 3600.0

    def energy_j(self, seconds: float, busy: bool = True) -> float:
        return (self.power_w if busy else self.idle_w) * seconds


# ---- validation ---------------------------------------------------------------------------------------------
class _Checker:
    """Walks a parsed TOML table, reading fields by path; every violation raises ProfileError(file, path, reason)."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, reason: str):
        raise ProfileError(f"device profile {self.source}: {path}: {reason}", file=self.source, field=path,
                           reason=reason)

    def keys(self, table: Mapping, path: str, allowed: set[str], required: set[str] = frozenset()) -> None:
        if not isinstance(table, Mapping):
            self.fail(path or "(top level)", f"expected a table, got {type(table).__name__}")
        for k in table:
            if k not in allowed:
                self.fail(f"{path}.{k}" if path else k, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required):
            if k not in table:
                self.fail(f"{path}.{k}" if path else k, "missing required field")

    def str(self, table, key, path, choices=None, required=True, pattern=None):
        p = f"{path}.{key}" if path else key
        if key not in table:
            if required:
                self.fail(p, "missing required field")
            return None
        v = table[key]
        if not isinstance(v, str) or not v:
            self.fail(p, f"expected a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            self.fail(p, f"{v!r} is not one of {', '.join(choices)}")
        if pattern is not None and not re.fullmatch(pattern, v):
            self.fail(p, f"{v!r} does not match {pattern}")
        return v

    def num(self, table, key, path, required=True, positive=True, integer=False, default=None, hi=None):
        p = f"{path}.{key}" if path else key
        if key not in table:
            if required:
                self.fail(p, "missing required field")
            return default
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            self.fail(p, f"expected {'an integer' if integer else 'a number'}, got {v!r}")
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an integer too large for a float (TOML integers are unbounded here)
            self.fail(p, f"too large, got {v!r}")
        if not finite:
            self.fail(p, f"must be finite, got {v!r}")
        if positive and v <= 0:
            self.fail(p, f"must be > 0, got {v!r}")
        if not positive and v < 0:
            self.fail(p, f"must be >= 0, got {v!r}")
        if hi is not None and v > hi:
            self.fail(p, f"must be <= {hi}, got {v!r}")
        return v

    def bool(self, table, key, path, default=False):
        if key not in table:
            return default
        v = table[key]
        if not isinstance(v, bool):
            self.fail(f"{path}.{key}", f"expected true or false, got {v!r}")
        return v

    def dtypes(self, v, path, allow_star=True) -> tuple[str, ...]:
        if not isinstance(v, list) or not v:
            self.fail(path, f"expected a non-empty list of dtype names, got {v!r}")
        for i, d in enumerate(v):
            if not (d in DTYPES or (allow_star and d == "*")):
                self.fail(f"{path}[{i}]", f"unknown dtype {d!r} (known: {', '.join(DTYPES)}{', *' if allow_star else ''})")
        return tuple(v)

    def op_name(self, v, path) -> str:
        if not isinstance(v, str) or not re.fullmatch(r"\*|([A-Za-z0-9_.]+:)?[A-Za-z][A-Za-z0-9_]*", v):
            self.fail(path, f"expected an op name like 'Conv' or 'com.microsoft:QLinearAdd', got {v!r}")
        if v != "*" and not _is_onnx_op(v):
            domain = v.partition(":")[0] if ":" in v else ""
            self.fail(path, f"{v!r} is not an operator of {'ONNX' if not domain else repr(domain)} (op types are "
                            "case-sensitive)")
        return v


@functools.lru_cache(maxsize=1)
def _known_domain_ops() -> dict[str, frozenset[str]]:
    """The op types of every domain onnxruntime registers (ai.onnx as '', com.microsoft...)."""
    try:
        from onnxruntime.capi import _pybind_state

        ops: dict[str, set[str]] = {}
        for schema in _pybind_state.get_all_operator_schema():
            ops.setdefault(schema.domain, set()).add(schema.name)
        return {d: frozenset(names) for d, names in ops.items()}
    except Exception:  # pragma: no cover - an onnxruntime build without the schema list: names unchecked
        return {}


def _is_onnx_op(name: str) -> bool:
    """Whether ``name`` ('Conv', 'com.microsoft:QLinearAdd') is an operator of its domain. A domain neither onnx nor
    onnxruntime knows (a vendor's custom ops) is taken as written."""
    domain, _, op = name.rpartition(":")
    try:
        import onnx.defs

        if onnx.defs.has(op, "" if domain == "ai.onnx" else domain):
            return True
    except ImportError:  # pragma: no cover - onnx is a dependency
        return True
    known = _known_domain_ops()
    return op in known[domain] if domain in known else domain not in ("", "ai.onnx", "ai.onnx.ml")


_TOP_KEYS = {"name", "description", "power", "price", "units", "attach", "detect"}
_UNIT_KEYS = {"name", "kind", "delegate", "delegate_options", "dtypes", "ops", "op", "throughput", "memory_bytes",
              "link", "max_rank", "max_dim", "static_shapes", "cores", "isa"}
_OP_KEYS = {"name", "dtypes", "max_rank", "max_dim", "static_shapes", "formats"}
_LINK_KEYS = {"kind", "zero_copy", "bandwidth_bytes_s", "latency_s"}
MODEL_FORMATS = ("onnx", "tflite")


def node_format(node: Node) -> str:
    """The model format a node was loaded from: ``tflite`` (the TFLite loader names each node's builtin) or
    ``onnx``."""
    return "tflite" if "tflite_op" in node.attrs else "onnx"


def _parse_unit(c: _Checker, u: Mapping, path: str) -> ComputeUnit:
    c.keys(u, path, _UNIT_KEYS, {"name", "kind", "delegate", "dtypes", "throughput", "memory_bytes"})
    name = c.str(u, "name", path, pattern=r"[a-z][a-z0-9_-]*")
    kind = c.str(u, "kind", path, choices=UNIT_KINDS)
    delegate = c.str(u, "delegate", path, choices=known_delegates())
    opts = u.get("delegate_options", {})
    if delegate in DELEGATE_OPTIONS:
        allowed, required = DELEGATE_OPTIONS[delegate]
        c.keys(opts, f"{path}.delegate_options", allowed, required)
    else:  # a registered delegate's options are its own to check (at compile)
        c.keys(opts, f"{path}.delegate_options", set(opts) if isinstance(opts, Mapping) else set())
    if delegate == "onnxruntime":
        prov = opts["providers"]
        if not isinstance(prov, list) or not prov or not all(isinstance(p, str) and p for p in prov):
            c.fail(f"{path}.delegate_options.providers", f"expected a non-empty list of provider names, got {prov!r}")
        if "provider_options" in opts and not isinstance(opts["provider_options"], Mapping):
            c.fail(f"{path}.delegate_options.provider_options", "expected a table")
    if delegate in ("litert", "rknn") and "library" in opts:
        c.str(opts, "library", f"{path}.delegate_options")
    if delegate == "serial-npu" and "baudrate" in opts:
        c.num(opts, "baudrate", f"{path}.delegate_options", integer=True)
    # the other options the schema gives a type (docs/profiles.md): wrong ones reached the delegates unchecked
    if delegate == "host":  # Session's threads= range: 5000 went to onnxruntime as is and hung Session creation
        from .native import MAX_THREADS

        c.num(opts, "threads", f"{path}.delegate_options", required=False, integer=True, hi=MAX_THREADS)
    for key in ("session_options", "options"):
        if key in opts and not isinstance(opts[key], Mapping):
            c.fail(f"{path}.delegate_options.{key}", f"expected a table, got {opts[key]!r}")
    if opts.get("session_options") and importlib.util.find_spec("onnxruntime") is not None:
        from .ort_options import session_options  # the check the delegate makes, at load
        from .errors import InvalidArgumentError

        try:
            session_options(opts["session_options"])
        except InvalidArgumentError as exc:
            c.fail(f"{path}.delegate_options.session_options", str(exc))
    if delegate == "serial-npu":  # the ranges are link_settings' (serial_npu), when the session is made
        for key in ("url", "port"):
            c.str(opts, key, f"{path}.delegate_options", required=False)
        c.num(opts, "timeout_s", f"{path}.delegate_options", required=False)
        c.num(opts, "retry_after_s", f"{path}.delegate_options", required=False, positive=False)
        c.num(opts, "retries", f"{path}.delegate_options", required=False, positive=False, integer=True)
    if delegate == "rknn":
        c.str(opts, "target", f"{path}.delegate_options")
    dtypes = c.dtypes(u["dtypes"], f"{path}.dtypes")
    ops: dict[str, OpConstraint] = {}
    op_list = u.get("ops", [])
    if not isinstance(op_list, list):
        c.fail(f"{path}.ops", f"expected a list of op names, got {op_list!r}")
    for i, o in enumerate(op_list):
        ops[c.op_name(o, f"{path}.ops[{i}]")] = OpConstraint(o)
    op_tables = u.get("op", [])
    if not isinstance(op_tables, list):
        c.fail(f"{path}.op", "expected an array of tables ([[units.op]])")
    for i, t in enumerate(op_tables):
        p = f"{path}.op[{i}]"
        c.keys(t, p, _OP_KEYS, {"name"})
        oname = c.op_name(t["name"], f"{p}.name")
        formats = t.get("formats")
        if formats is not None and (not isinstance(formats, list) or not formats
                                    or not all(f in MODEL_FORMATS for f in formats)):
            c.fail(f"{p}.formats", f"expected a non-empty list of model formats ({', '.join(MODEL_FORMATS)}), "
                                   f"got {formats!r}")
        ops[oname] = OpConstraint(
            oname, c.dtypes(t["dtypes"], f"{p}.dtypes") if "dtypes" in t else None,
            c.num(t, "max_rank", p, required=False, integer=True), c.num(t, "max_dim", p, required=False, integer=True),
            c.bool(t, "static_shapes", p, default=None), tuple(formats) if formats is not None else None)
    if not ops:
        c.fail(f"{path}.ops", "a unit must list at least one op (or '*')")
    tp = u["throughput"]
    c.keys(tp, f"{path}.throughput", set(DTYPES))
    if not tp:
        c.fail(f"{path}.throughput", "give ops/s for at least one dtype")
    throughput = {}
    for d in tp:
        if "*" not in dtypes and d not in dtypes:
            c.fail(f"{path}.throughput.{d}", f"dtype {d} is not in this unit's dtypes ({', '.join(dtypes)})")
        throughput[d] = float(c.num(tp, d, f"{path}.throughput"))
    memory = float(c.num(u, "memory_bytes", path, positive=False))
    link = None
    if "link" in u:
        lp = f"{path}.link"
        c.keys(u["link"], lp, _LINK_KEYS, {"kind", "bandwidth_bytes_s", "latency_s"})
        lk = u["link"]
        link = Link(c.str(lk, "kind", lp, choices=LINK_KINDS), c.bool(lk, "zero_copy", lp),
                    float(c.num(lk, "bandwidth_bytes_s", lp)), float(c.num(lk, "latency_s", lp, positive=False)))
    elif delegate != "host":
        c.fail(f"{path}.link", f"missing required field (a unit driven by {delegate!r} needs its host link)")
    isa = u.get("isa", [])
    if not isinstance(isa, list) or not all(isinstance(s, str) for s in isa):
        c.fail(f"{path}.isa", f"expected a list of strings, got {isa!r}")
    from .native import ISA_NAMES

    unknown = [s for s in isa if s not in ISA_NAMES]
    if unknown:
        c.fail(f"{path}.isa", f"unknown kernel variant {unknown[0]!r} (the C core's are {', '.join(ISA_NAMES)})")
    return ComputeUnit(name, kind, delegate, dict(opts), dtypes, ops, throughput, memory, link,
                       c.num(u, "max_rank", path, required=False, integer=True),
                       c.num(u, "max_dim", path, required=False, integer=True), c.bool(u, "static_shapes", path),
                       c.num(u, "cores", path, required=False, integer=True), tuple(isa))


def parse_profile(data: Mapping, source: str) -> DeviceProfile:
    """Validate a parsed TOML table and build the profile (no host detection: see ``load``)."""
    c = _Checker(source)
    c.keys(data, "", _TOP_KEYS, {"name", "description", "power", "price", "units"})
    name = c.str(data, "name", "", pattern=r"[a-z0-9][a-z0-9-]*")
    description = c.str(data, "description", "")
    if "attach" in data:
        c.str(data, "attach", "", choices=("host",))
    c.bool(data, "detect", "")
    power = data["power"]
    c.keys(power, "power", {"active_w", "idle_w"}, {"active_w", "idle_w"})
    active_w = float(c.num(power, "active_w", "power"))
    idle_w = float(c.num(power, "idle_w", "power", positive=False))
    if idle_w > active_w:
        c.fail("power.idle_w", f"idle draw {idle_w} W exceeds active draw {active_w} W")
    price = data["price"]
    c.keys(price, "price", {"per_hour_usd", "unit_usd", "amortize_hours"})
    if "per_hour_usd" in price:
        if "unit_usd" in price or "amortize_hours" in price:
            c.fail("price", "give either per_hour_usd or unit_usd + amortize_hours, not both")
        per_hour = float(c.num(price, "per_hour_usd", "price", positive=False))
    elif "unit_usd" in price or "amortize_hours" in price:
        per_hour = float(c.num(price, "unit_usd", "price")) / float(c.num(price, "amortize_hours", "price"))
    else:
        c.fail("price", "missing per_hour_usd, or unit_usd + amortize_hours")
    units_raw = data["units"]
    if not isinstance(units_raw, list) or not units_raw:
        c.fail("units", "expected at least one [[units]] table")
    units = [_parse_unit(c, u, f"units[{i}]") for i, u in enumerate(units_raw)]
    if data.get("attach") != "host" and not any(u.delegate == "host" for u in units):
        # else DeviceProfile.host_unit falls back to units[0]: an accelerator would be planned every node, listed
        # or not
        c.fail("units", "no unit is driven by the 'host' delegate: a profile needs one to run what its accelerators "
                        "cannot (or attach = \"host\" to put this machine's CPU in front)")
    seen = set()
    for i, u in enumerate(units):
        if u.name in seen:
            c.fail(f"units[{i}].name", f"duplicate unit name {u.name!r}")
        seen.add(u.name)
    return DeviceProfile(name, description, units, active_w, idle_w, per_hour, source)


# ---- files --------------------------------------------------------------------------------------------------
def profiles_dir():
    """The packaged profile directory (a Traversable; a real directory for normal installs)."""
    return resources.files("edgert") / "device_profiles"


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.name[:-5] for p in profiles_dir().iterdir() if p.name.endswith(".toml"))


def load(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A validated profile by shipped name (``"rk3588"``) or by path to a ``.toml`` file. ``"host"`` (and any
    profile with ``detect = true``) is filled with this machine's facts; a profile with ``attach = "host"`` gets the
    detected host CPU as its first unit. Raises ProfileError."""
    s = str(name_or_path)
    if s.endswith(".toml") or os.sep in s or isinstance(name_or_path, os.PathLike):
        path = Path(s)
        if not path.is_file():
            why = "a directory, not a .toml file" if path.is_dir() else "file not found"
            raise ProfileError(f"device profile {s}: {why}", file=s, field="", reason=why)
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"device profile {s}: cannot read it: {exc}", file=s, field="",
                               reason=str(exc)) from None
    else:
        entry = profiles_dir() / f"{s}.toml"
        if not entry.is_file():
            raise ProfileError(f"no device profile named {s!r} (shipped: {', '.join(list_profiles())}; or pass a "
                               ".toml path)", file="", field="name", reason="unknown profile")
        text, source = entry.read_text(encoding="utf-8"), f"{s}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"device profile {source}: not valid TOML: {exc}", file=source, field="",
                           reason=str(exc)) from None
    except RecursionError:  # arrays or tables nested deeper than the parser's recursion (a hostile file)
        raise ProfileError(f"device profile {source}: not valid TOML: nested too deeply", file=source, field="",
                           reason="nested too deeply") from None
    prof = parse_profile(data, source)
    if data.get("detect"):
        _fill_host(prof)
    if data.get("attach") == "host":
        host = detect_host()
        names = {u.name for u in prof.units}
        cpu = host.host_unit
        if cpu.name in names:
            raise ProfileError(f"device profile {source}: units: attach = 'host' adds a unit named {cpu.name!r}; "
                               "rename the profile's unit", file=source, field="units", reason="name clash")
        prof.units.insert(0, cpu)
        prof.host = host.host
    return prof


def load_all() -> dict[str, DeviceProfile]:
    return {n: load(n) for n in list_profiles()}


# ---- the host -----------------------------------------------------------------------------------------------
# float32 FLOP per cycle per core for the C core's ISA variants (2 FMA pipes x lanes x 2 ops; a conservative
# reading of the vendors' optimization manuals), and the int8 speed-up over float32 for the int8 dot products
_F32_FLOP_PER_CYCLE = {"ref": 4, "avx2": 32, "avx512": 64, "neon": 16}
_INT8_GAIN = {"avx512vnni": 4, "avx512": 2, "avx2": 2, "neon_dotprod": 4, "dotprod": 4, "neon": 2, "ref": 1}


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        for key in ("model name", "Model", "Hardware", "cpu model"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_hz() -> float | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3
    except (OSError, ValueError):
        pass
    try:
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(errors="replace"), re.M)
        return float(m.group(1)) * 1e6 if m else None
    except OSError:
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def host_facts() -> dict[str, Any]:
    """This machine: CPU model, architecture, ISA variants of the C core, physical cores, memory, clock."""
    from . import native

    info = native.info()
    return {"cpu": _cpu_model(), "machine": platform.machine(), "system": platform.system(), "isa": info["isa"],
            "isas": info["isas"], "features": info.get("features", []), "physical_cores": info["physical_cores"],
            "logical_cpus": os.cpu_count(), "memory_bytes": _memory_bytes(), "cpu_hz": _cpu_hz()}


def _fill_host(prof: DeviceProfile) -> None:
    facts = host_facts()
    prof.host = facts
    hz = facts["cpu_hz"] or 2.0e9  # no clock published by the OS: assume 2 GHz
    isa = facts["isa"]
    f32 = facts["physical_cores"] * hz * _F32_FLOP_PER_CYCLE.get(isa, 4)
    gain = max((_INT8_GAIN.get(f, 1) for f in [isa, *facts["features"]]), default=1)
    for u in prof.units:
        if u.delegate != "host":
            continue
        u.cores = facts["physical_cores"]
        u.isa = tuple(facts["isas"])
        if facts["memory_bytes"]:
            u.memory_bytes = float(facts["memory_bytes"])
        u.throughput = {**u.throughput, "float32": f32, "float16": f32, "int8": f32 * gain, "uint8": f32 * gain}
    prof.description = f"{prof.description}: {facts['cpu']} ({facts['physical_cores']} cores, {isa})"


def detect_host() -> DeviceProfile:
    """The ``host`` profile filled with this machine's cores, ISA variants, memory and an ops/s estimate
    (cores x clock x FLOP/cycle of the selected ISA; int8 scaled by the dot-product extensions present)."""
    return load("host")


# ---- what this machine can drive ----------------------------------------------------------------------------
def _find_library(lib: str) -> str | None:
    import ctypes.util

    if os.path.isabs(lib):
        return lib if os.path.exists(lib) else None
    stem = re.sub(r"^lib", "", lib.split(".so")[0].split(".dll")[0].split(".dylib")[0])
    found = ctypes.util.find_library(stem)
    if found:
        return found
    for d in ("/usr/lib", "/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"):
        if os.path.exists(os.path.join(d, lib)):
            return os.path.join(d, lib)
    return None


def litert_module() -> str | None:
    """The importable LiteRT/TFLite interpreter module, or None (import check only, nothing is loaded)."""
    for mod in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite"):
        try:
            if importlib.util.find_spec(mod.split(".")[0]) is None or not importlib.util.find_spec(mod):
                continue
            if mod.startswith("tflite_runtime"):  # 2.14 wheels fail beside NumPy 2 (_ARRAY_API): import to be sure
                importlib.import_module(mod).Interpreter  # noqa: B018
            return mod
        except Exception:
            continue
    return None


def litert_package() -> str | None:
    """'ai-edge-litert 2.3.0' / 'tflite-runtime 2.14.0': the package behind ``litert_module()``, or None."""
    mod = litert_module()
    if mod is None:
        return None
    pkg = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}.get(mod.split(".")[0], "tensorflow")
    try:
        from importlib.metadata import version

        return f"{pkg} {version(pkg)}"
    except Exception:
        return pkg


def onnxruntime_providers() -> tuple[str | None, list[str]]:
    """(onnxruntime version, available execution providers), or (None, []) when onnxruntime is absent."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    return ort.__version__, list(ort.get_available_providers())


def serial_ports() -> list[dict[str, str]] | None:
    """Serial ports present (device, description, hwid), or None when pyserial is not installed."""
    try:
        from serial.tools import list_ports
    except ImportError:
        return None
    return [{"device": p.device, "description": p.description, "hwid": p.hwid} for p in list_ports.comports()]


def runtime_status(unit: ComputeUnit) -> tuple[bool, str]:
    """Whether the runtime that drives ``unit`` is present on this machine (import/file checks only; no device
    is opened), and what is there or missing."""
    d, opts = unit.delegate, unit.delegate_options
    if d == "host":
        from . import native

        return True, f"edgert C core ({native.info()['isa']})"
    if d == "onnxruntime":
        version, have = onnxruntime_providers()
        if version is None:
            return False, "onnxruntime not installed"
        missing = [p for p in opts["providers"] if p not in have]
        if missing:
            return False, f"onnxruntime {version} lacks {', '.join(missing)}"
        return True, f"onnxruntime {version} with {', '.join(opts['providers'])}"
    if d == "litert":
        mod = litert_module()
        lib = _find_library(opts["library"])
        if mod is None:
            return False, ("no LiteRT/TFLite interpreter installed: pip install ai-edge-litert (tflite-runtime only "
                           "with NumPy 1.x)")
        if lib is None:
            return False, f"{mod} present; delegate library {opts['library']} not found"
        return True, f"{mod} with {lib}"
    if d == "rknn":
        if importlib.util.find_spec("rknnlite") is None:
            return False, "rknn-toolkit-lite2 (rknnlite) not installed; edgert has no rknn delegate yet"
        return True, "rknnlite present (edgert has no rknn delegate yet)"
    if d == "serial-npu":
        ports = serial_ports()
        if ports is None:
            return False, "pyserial not installed"
        want = opts.get("port")
        if want:
            return (any(p["device"] == want for p in ports), f"port {want}")
        return (bool(ports), f"{len(ports)} serial port(s) present" if ports else "no serial ports")
    base = _registry()
    if base is not None and d in base.registered():  # a delegate registered with edgert.delegates.register
        return base.get(d).available(unit)
    return False, f"unknown delegate {d}"  # pragma: no cover - validation rejects these


def devices_report() -> dict[str, Any]:
    """What ``edgert devices`` shows: this machine (CPU, ISA variants, cores, memory, onnxruntime and its
    execution providers, LiteRT availability, serial ports) and every shipped profile with, per unit, whether
    the runtime that drives it is present here. A profile that fails validation is listed with its error."""
    version, providers = onnxruntime_providers()
    machine = {**host_facts(), "onnxruntime": version, "onnxruntime_providers": providers,
               "litert": litert_module(), "litert_package": litert_package(), "serial_ports": serial_ports()}
    rows = []
    for name in list_profiles():
        try:
            prof = load(name)
        except ProfileError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        units = []
        for u in prof.units:
            ok, why = runtime_status(u)
            units.append({"name": u.name, "kind": u.kind, "delegate": u.delegate,
                          "delegate_options": u.delegate_options, "throughput": u.throughput,
                          "memory_bytes": u.memory_bytes, "link": None if u.link is None else u.link.__dict__,
                          "available": ok, "status": why})
        rows.append({"name": prof.name, "description": prof.description, "power_w": prof.power_w,
                     "idle_w": prof.idle_w, "price_usd_per_hour": prof.price_usd_per_hour, "units": units})
    return {"machine": machine, "profiles": rows}
