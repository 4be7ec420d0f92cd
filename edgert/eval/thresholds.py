"""Gate thresholds: the documented defaults, a TOML file, and ``NAME=VALUE`` overrides.

Each threshold names a metric of the report and a direction: ``max`` (the metric must not exceed it) or ``min``
(it must not fall below it). Language-model and graph evaluations have their own tables because the same word
means different things there (``top1_pct`` over tokens vs over classifier rows). A threshold set to ``"off"``
(or None) is not checked.

TOML layout (any section optional; top-level keys apply to whichever kind is being evaluated)::

    [llm]
    kl_mean = 0.1
    ppl_delta_pct = 5.0

    [graph]
    sqnr_db = 20.0
    max_abs = "off"

This module reads files and dicts only; it must not load models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InvalidArgumentError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

KINDS = ("llm", "graph")
KIND_WORDS = {"llm": "language-model", "graph": "graph"}  # each kind as messages name it


@dataclass(frozen=True)
class Threshold:
    metric: str
    direction: str  # "max": metric <= value passes; "min": metric >= value passes
    default: float | None
    doc: str

    def crossed(self, value: float, limit: float) -> bool:
        if value is None or value != value:  # NaN never passes a gate
            return True
        return value > limit if self.direction == "max" else value < limit


# Defaults: a 4-bit re-quantization of a small model passes them; a broken kernel or a scrambled layer does not.
LLM_THRESHOLDS = {t.metric: t for t in (
    Threshold("ppl_delta_pct", "max", 10.0, "candidate perplexity above the reference's, in percent"),
    Threshold("kl_mean", "max", 0.15, "mean KL(P_ref || P_cand) per token, nats"),
    Threshold("kl_p99", "max", 1.5, "99th percentile of the per-token KL, nats"),
    Threshold("top1_pct", "min", 80.0, "positions where both sides' top token agrees, percent"),
    Threshold("rms_dp_pct", "max", 12.0, "RMS of the probability change of the reference's top token, percent"),
    Threshold("greedy_match_mean", "min", None, "mean greedy-continuation match length, tokens (off by default)"),
)}

GRAPH_THRESHOLDS = {t.metric: t for t in (
    Threshold("cosine", "min", 0.99, "cosine similarity of each output (and intermediate) with the reference"),
    Threshold("sqnr_db", "min", 20.0, "signal-to-quantization-noise ratio of each tensor, dB"),
    Threshold("rel_l2", "max", 0.1, "||cand - ref|| / ||ref|| of each tensor"),
    Threshold("max_abs", "max", None, "largest absolute difference of each tensor (scale-dependent: off by default)"),
    Threshold("top1_pct", "min", 90.0, "rows of classifier-shaped outputs whose argmax agrees, percent"),
    Threshold("mismatch_pct", "max", 10.0, "elements of integer and bool outputs (compared exactly) that differ, "
                                           "percent (an ArgMax class id is top-1: 10 as top1_pct's 90)"),
)}

TABLES = {"llm": LLM_THRESHOLDS, "graph": GRAPH_THRESHOLDS}


def defaults(kind: str) -> dict[str, float | None]:
    return {m: t.default for m, t in _table(kind).items()}


def _table(kind: str) -> dict[str, Threshold]:
    if kind not in TABLES:
        raise InvalidArgumentError(f"threshold kind must be one of {KINDS}, got {kind!r}")
    return TABLES[kind]


def _value(metric: str, v) -> float | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("off", "none", "")):
        return None
    if isinstance(v, bool):
        raise InvalidArgumentError(f"threshold {metric!r} must be a number or 'off', got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(f"threshold {metric!r} must be a number or 'off', got {v!r}") from None
    if x != x:  # NaN: every comparison with it is False, so the gate would never fire
        raise InvalidArgumentError(f"threshold {metric!r} is NaN; give a number or 'off'")
    return x


def load_toml(path: str | os.PathLike) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read thresholds file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"thresholds file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"thresholds file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                   "expected TOML") from None


def parse_overrides(items) -> dict[str, str]:
    """``["kl_mean=0.2", "max_abs=off"]`` -> dict."""
    out = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise InvalidArgumentError(f"--threshold expects NAME=VALUE (e.g. kl_mean=0.2), got {item!r}")
        out[name.strip()] = value.strip()
    return out


def _section(src: dict, kind: str, where: str) -> dict:
    """The ``[kind]`` table of a thresholds source, {} when it has none; anything but a table is refused."""
    section = src.get(kind)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise InvalidArgumentError(f"{where}: [{kind}] must be a table of NAME = VALUE, got {section!r}")
    return section


def merge(path, items, kind: str) -> dict:
    """One source for ``resolve``: the TOML file ``path`` (None: no file) with the ``NAME=VALUE`` overrides ``items``
    (``--threshold``) for a ``kind`` evaluation on top. An override goes into the ``kind`` section, so it beats the
    file's value there; one that only the other kind's table has is refused (it was silently ignored), and a name no
    table has goes to the top level, where ``resolve`` refuses it. Values are checked by ``resolve``."""
    table = _table(kind)
    src = dict(load_toml(path)) if path else {}
    overrides = parse_overrides(items)
    other = [k for k in overrides if k not in table and any(k in t for t in TABLES.values())]
    if other:
        raise InvalidArgumentError(f"--threshold {other[0]} is a {KIND_WORDS['graph' if kind == 'llm' else 'llm']} "
                                   f"threshold; a {KIND_WORDS[kind]} evaluation takes {', '.join(table)}")
    sections = {k: _section(src, k, f"thresholds file {path}") for k in KINDS}  # both checked: one file serves both
    src[kind] = {**sections[kind], **{k: v for k, v in overrides.items() if k in table}}
    src.update({k: v for k, v in overrides.items() if k not in table})
    return src


def resolve(kind: str, *sources) -> dict[str, float | None]:
    """The thresholds for ``kind``: the defaults, updated by each source in turn. A source is None, a TOML path, or
    a dict (flat ``{metric: value}`` or with ``llm``/``graph`` sections). Unknown metric names are errors, and so
    is a flat dict's metric of the other kind (a file's top-level one is skipped: one file serves both)."""
    table = _table(kind)
    out = defaults(kind)
    for src in sources:
        if src is None:
            continue
        where, from_file = "thresholds", isinstance(src, (str, os.PathLike))
        if from_file:
            where = f"thresholds file {src}"
            src = load_toml(src)
        if not isinstance(src, dict):
            raise InvalidArgumentError(f"thresholds must be a dict or a TOML path, got {type(src).__name__}")
        flat = {k: v for k, v in src.items() if k not in KINDS}
        section = _section(src, kind, where)
        # a file, or a dict with sections, may serve both kinds: a top-level key of the other kind's is skipped; a
        # flat dict is this evaluation's own thresholds, where such a key is a mistake (it would never be checked)
        shared = from_file or any(k in src for k in KINDS)
        for k, v in {**flat, **section}.items():
            if k not in table:
                other = [o for o in KINDS if o != kind and k in TABLES[o]]
                if other and k in flat and shared:
                    continue  # a top-level key meant for the other kind
                if other:
                    raise InvalidArgumentError(
                        f"{k!r} is a {KIND_WORDS[other[0]]} threshold; a {KIND_WORDS[kind]} evaluation takes "
                        f"{', '.join(table)}")
                raise InvalidArgumentError(
                    f"unknown {kind} threshold {k!r}; known: {', '.join(table)}")
            out[k] = _value(k, v)
    return out


def check(kind: str, metrics: dict, limits: dict) -> list[tuple[str, float, str, float]]:
    """The crossed thresholds as (metric, value, direction, limit), in table order. A metric the report lacks
    (e.g. top1_pct for a model with no classifier output) is skipped."""
    table = _table(kind)
    out = []
    for m, t in table.items():
        limit = limits.get(m)
        if limit is None or m not in metrics:
            continue
        if t.crossed(metrics[m], limit):
            out.append((m, metrics[m], t.direction, limit))
    return out


def describe(kind: str) -> str:
    """The defaults as text, for --help and docs."""
    rows = []
    for m, t in _table(kind).items():
        d = "off" if t.default is None else f"{t.direction} {t.default:g}"
        rows.append(f"{m} ({d}): {t.doc}")
    return "; ".join(rows)
