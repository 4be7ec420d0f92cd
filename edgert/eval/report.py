"""EvalReport (metrics, failures, both sides' speed and cost, the verdict line, JSON and the PNG) and the
``MODEL[@OPTIONS]`` side specs the evaluations share.

A side spec is a model path with optional options after the last ``@``: ``model.gguf@threads=1``,
``model.onnx@rpi5`` (a device profile), ``model.onnx@device=imx8mp,threads=2``. A bare word is a device.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .. import native
from ..errors import InvalidArgumentError, check_count


@dataclass
class Side:
    """One side of an evaluation: which model, on which device profile, with how many threads."""

    spec: str
    path: str
    device: str | None = None
    threads: int | None = None

    @property
    def label(self) -> str:
        opts = [o for o in (self.device, None if self.threads is None else f"threads={self.threads}") if o]
        return os.path.basename(self.path) + (f"@{','.join(opts)}" if opts else "")


def parse_side(spec, device: str | None = None, threads: int | None = None) -> Side:
    """``MODEL[@DEVICE][,threads=N]`` / ``MODEL@threads=N`` (or a Side, parsed already) -> Side; explicit
    ``device``/``threads`` win."""
    side = spec if isinstance(spec, Side) else _parse_spec(spec)
    return replace(side, device=side.device if device is None else device,
                   threads=side.threads if threads is None else threads)


def _parse_spec(spec) -> Side:
    s = os.fspath(spec)
    path, opts = s, ""
    if "@" in s:
        head, _, tail = s.rpartition("@")
        if tail and os.sep not in tail and not os.path.exists(s):
            path, opts = head, tail
    dev, th = None, None
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            dev = key
        elif key == "device":
            dev = value
        elif key == "threads":
            if not value.isdigit():
                raise InvalidArgumentError(f"{s}: threads must be a positive integer, got {value!r}")
            th = check_count(f"{s}: threads", int(value), lo=1, hi=native.MAX_THREADS)
        else:
            raise InvalidArgumentError(f"{s}: unknown option {key!r} after '@' (expected DEVICE, device=NAME or threads=N)")
    if not os.path.exists(path):
        raise InvalidArgumentError(f"model file not found: {path} (from {s!r}); give a path, optionally with "
                                   "@DEVICE or @threads=N")
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"{path} is a directory, not a model file (from {s!r})")
    return Side(s, path, dev, th)


# ---- cost ----------------------------------------------------------------------------------------------------
def cost_model(device: str | None):
    """(CostModel, profile name) for a device profile name; None -> the detected host's."""
    from .. import telemetry

    host = telemetry.host_cost_model()
    if device is None:
        return host, "host"
    from .. import profiles

    prof = profiles.load(device)
    return telemetry.profile_cost_model(prof, host), prof.name


def needs_emulation(device: str | None) -> bool:
    """Whether the device profile has a unit whose runtime is not on this machine (its partitions then run on this
    CPU, emulated)."""
    if not device:
        return False
    from .. import profiles

    return any(u.delegate != "host" and not profiles.runtime_status(u)[0] for u in profiles.load(device).units)


# noted whenever a side names a device profile: no evaluation runs on the profile's hardware
MEASURED_HERE = "latency is measured on this machine; energy and cost apply each side's profile power and price to it"


def per_units(cm, seconds_per_unit: float, units: float) -> dict[str, float]:
    """Energy (J, Wh) and cost (USD) of ``units`` items at ``seconds_per_unit`` busy seconds each."""
    busy = seconds_per_unit * units
    e = cm.energy_j(busy)
    return {"busy_s": busy, "energy_j": e, "energy_wh": e / 3600.0, "cost_usd": cm.cost_usd(busy)}


def ratio_phrase(ref: float, cand: float, what: str) -> str:
    """'2.1× cheaper per 1M tokens' / '1.3× costlier ...' from two positive amounts."""
    if not (ref > 0 and cand > 0) or not (math.isfinite(ref) and math.isfinite(cand)):
        return f"n/a {what}"
    r = ref / cand
    if abs(r - 1.0) < 0.005:
        return f"same {what}"
    return f"{r:.2f}× cheaper {what}" if r > 1 else f"{1 / r:.2f}× costlier {what}"


# ---- the report ----------------------------------------------------------------------------------------------
class Failure(str):
    """One crossed threshold: a message string (``kl_mean 0.31 > max 0.15``) that also carries ``metric``,
    ``value``, ``direction`` and ``limit``."""

    metric: str
    value: float
    direction: str
    limit: float

    def __new__(cls, metric: str, value: float, direction: str, limit: float, where: str = ""):
        op = ">" if direction == "max" else "<"
        msg = f"{metric} {_fmt(value)} {op} {direction} {_fmt(limit)}" + (f" ({where})" if where else "")
        self = super().__new__(cls, msg)
        self.metric, self.value, self.direction, self.limit = metric, value, direction, limit
        return self

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": _jsonable(self.value), "direction": self.direction,
                "limit": self.limit, "message": str(self)}


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _jsonable(v):
    """NaN and inf become strings in JSON (strict JSON has neither)."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


SCHEMA = "edgert.eval/1"


@dataclass
class EvalReport:
    """The result of ``edgert.evaluate``. ``metrics``: flat name -> number (the gated ones among them);
    ``failures``: the crossed thresholds (strings with ``.metric``); ``sides``: per side the speed, bytes moved,
    energy and cost; ``tensors``: per-tensor drift rows (graph: outputs and shared intermediates in topological
    order; LLM: weight tensors in the order the model computes with them); ``first_divergence``: the first tensor
    over a threshold."""

    kind: str  # "llm" or "graph"
    reference: Side
    candidate: Side
    metrics: dict[str, Any]
    thresholds: dict[str, float | None]
    failures: list[Failure]
    sides: dict[str, dict[str, Any]]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    first_divergence: str | None = None
    verdict: str = ""
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return _jsonable({
            "schema": SCHEMA, "kind": self.kind, "passed": self.passed, "verdict": self.verdict,
            "reference": {"spec": self.reference.spec, "path": self.reference.path, "device": self.reference.device,
                          "threads": self.reference.threads},
            "candidate": {"spec": self.candidate.spec, "path": self.candidate.path, "device": self.candidate.device,
                          "threads": self.candidate.threads},
            "metrics": self.metrics, "thresholds": self.thresholds,
            "failures": [f.to_dict() for f in self.failures], "first_divergence": self.first_divergence,
            "sides": self.sides, "tensors": self.tensors, "details": self.details, "notes": self.notes,
            "elapsed_s": self.elapsed_s,
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def plot(self, path) -> str:
        from .plot import plot_report

        return plot_report(self, path)

    def table(self) -> str:
        from .plot import format_table

        return format_table(self)

    def __repr__(self) -> str:
        return (f"EvalReport({self.kind}, {self.reference.label} vs {self.candidate.label}, "
                f"{'passed' if self.passed else 'FAILED: ' + '; '.join(self.failures)})")
