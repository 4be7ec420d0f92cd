"""Telemetry: one event per inference request in a local SQLite database, the cost model, and report queries.

Events go to ``$EDGERT_HOME/telemetry.db`` (``~/.cache/edgert/telemetry.db`` when EDGERT_HOME is unset), in WAL
mode so ``edgert report`` can read while a server writes. ``record(event)`` only puts the event on an in-memory
queue; one background thread batches queued events into a single transaction, so the request path pays a dict copy
and a queue put. A source of many small requests (``Session.run``, microseconds each) records through a ``RunLog``
instead: a tuple appended per run, the rows made by the writer thread. A full queue (the disk stalled) drops events
and counts them in ``dropped()``; recording never raises into the caller. ``EDGERT_TELEMETRY=0`` or
``set_enabled(False)`` (the CLI's ``--no-telemetry``) turns it off.

Cost: energy = power_w x busy seconds; cost = price_usd_per_hour x busy seconds / 3600 + energy (kWh) x
electricity_usd_per_kwh. Busy seconds are prefill + decode time (not time spent waiting in a queue). The power and
price come from the host's device profile when ``edgert.profiles`` can detect one, else from DEFAULT_POWER_W and
DEFAULT_PRICE_USD_PER_HOUR; EDGERT_POWER_W, EDGERT_PRICE_USD_PER_HOUR and EDGERT_ELECTRICITY_USD_PER_KWH override
(a finite number >= 0 each, else InvalidArgumentError: a NaN or negative power made every cost NaN or negative).

This module must not import the LLM stack or the server: they import it.
"""
from __future__ import annotations

import atexit
import collections
import csv
import functools
import io
import json
import math
import os
import platform
import queue
import re
import sqlite3
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgertError, InvalidArgumentError

SCHEMA_VERSION = 1
DEFAULT_POWER_W = 15.0  # an edge host's active draw when no device profile says otherwise
DEFAULT_PRICE_USD_PER_HOUR = 0.0  # owned hardware with no amortisation data: cost is energy only
DEFAULT_ELECTRICITY_USD_PER_KWH = 0.0
MAX_PENDING = 100_000  # events held in memory before new ones are dropped
BATCH_MAX = 512  # events per transaction
BATCH_WAIT_S = 0.05  # how long the writer waits for more events before committing a batch

COLUMNS = (
    ("request_id", "TEXT"), ("ts", "REAL"), ("source", "TEXT"), ("endpoint", "TEXT"), ("model", "TEXT"),
    ("device", "TEXT"), ("delegates", "TEXT"), ("prompt_tokens", "INTEGER"), ("completion_tokens", "INTEGER"),
    ("queue_wait_s", "REAL"), ("ttft_s", "REAL"), ("prefill_s", "REAL"), ("decode_s", "REAL"), ("latency_s", "REAL"),
    ("bytes_copied", "INTEGER"), ("finish_reason", "TEXT"), ("error", "TEXT"), ("status", "INTEGER"),
    ("energy_j", "REAL"), ("cost_usd", "REAL"),
)
_NAMES = tuple(name for name, _ in COLUMNS)
_SCHEMA = ("CREATE TABLE IF NOT EXISTS events (" + ", ".join(f"{n} {t}" for n, t in COLUMNS) + ")",
           "CREATE INDEX IF NOT EXISTS events_ts ON events (ts)")
_INSERT = f"INSERT OR REPLACE INTO events ({', '.join(_NAMES)}) VALUES ({', '.join('?' * len(_NAMES))})"

_enabled_override: bool | None = None


def set_enabled(on: bool | None) -> None:
    """Force telemetry on or off for this process (None: follow EDGERT_TELEMETRY again)."""
    global _enabled_override
    _enabled_override = on


def enabled() -> bool:
    if _enabled_override is not None:
        return _enabled_override
    return os.environ.get("EDGERT_TELEMETRY", "1").strip().lower() not in ("0", "false", "no", "off")


def db_path() -> Path:
    env = os.environ.get("EDGERT_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "edgert"
    return home / "telemetry.db"


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ---- cost model ----

@dataclass(frozen=True)
class CostModel:
    device: str = "host"
    power_w: float = DEFAULT_POWER_W
    price_usd_per_hour: float = DEFAULT_PRICE_USD_PER_HOUR
    electricity_usd_per_kwh: float = DEFAULT_ELECTRICITY_USD_PER_KWH

    def energy_j(self, busy_s: float) -> float:
        return self.power_w * max(busy_s, 0.0)

    def cost_usd(self, busy_s: float) -> float:
        busy_s = max(busy_s, 0.0)
        return (self.price_usd_per_hour * busy_s / 3600.0
                + self.energy_j(busy_s) / 3.6e6 * self.electricity_usd_per_kwh)


_host_cost: CostModel | None = None


def _env_cost(name: str) -> float | None:
    """An EDGERT_* cost override: None when unset, else a finite number >= 0 (InvalidArgumentError otherwise)."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v < math.inf:
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {text!r}: fix or unset it")
    return v


def _machine() -> str:
    """The device name of a host with no profile (and of events recorded without a cost model)."""
    return platform.machine() or "host"


def host_cost_model() -> CostModel:
    """The host's cost model: its device profile if edgert.profiles can detect one, else the defaults; env overrides
    (checked first, so a bad one fails before the profile search)."""
    global _host_cost
    if _host_cost is not None:
        return _host_cost
    power_env, price_env, kwh_env = map(_env_cost, ("EDGERT_POWER_W", "EDGERT_PRICE_USD_PER_HOUR",
                                                    "EDGERT_ELECTRICITY_USD_PER_KWH"))
    device, power, price = _machine(), DEFAULT_POWER_W, DEFAULT_PRICE_USD_PER_HOUR
    try:
        from . import profiles  # written alongside; optional until it lands

        prof = profiles.detect_host()
        if isinstance(prof, str):
            prof = profiles.load(prof)
        if prof is not None:
            device = str(getattr(prof, "name", device))
            power = float(getattr(prof, "power_w", None) or power)
            price = float(getattr(prof, "price_usd_per_hour", None) or price)
    except Exception:  # no profiles module, or no profile for this host: documented defaults
        pass
    _host_cost = CostModel(device=device, power_w=power if power_env is None else power_env,
                           price_usd_per_hour=price if price_env is None else price_env,
                           electricity_usd_per_kwh=DEFAULT_ELECTRICITY_USD_PER_KWH if kwh_env is None else kwh_env)
    return _host_cost


def profile_cost_model(profile, host: CostModel) -> CostModel:
    """The cost model of work on device ``profile``: this machine's (``host``, overrides included) when the profile
    is the host's own, else the profile's power and price with this machine's electricity price."""
    if profile is None or profile.name in ("host", host.device) or getattr(profile, "power_w", None) is None:
        return host
    return CostModel(device=profile.name, power_w=profile.power_w, price_usd_per_hour=profile.price_usd_per_hour,
                     electricity_usd_per_kwh=host.electricity_usd_per_kwh)


# ---- recording ----

def _cost_model_or_warn() -> CostModel | None:
    """host_cost_model(), or None with one warning when an override is bad (EDGERT_POWER_W=nan...): recording never
    raises, so the events go without energy and cost."""
    try:
        return host_cost_model()
    except InvalidArgumentError as exc:
        if not _writer.warned_cost:
            _writer.warned_cost = True
            warnings.warn(f"edgert telemetry: {exc}; events are recorded without energy and cost", RuntimeWarning)
        return None


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version < SCHEMA_VERSION:
        for stmt in _SCHEMA:
            con.execute(stmt)
        con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        con.commit()
    return con


class _Writer:
    """The one background thread that owns the write connections (one per database path). Queue items are
    ``(path, row)``, or ``(None, None)``: a wake-up to drain ``runs``, the ``RunLog`` runs, which are appended
    without a lock or a queue put (one wake-up is queued per batch of them: ``kicked``)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self.lock = threading.Condition()
        self.enqueued = 0
        self.done = 0
        self.dropped = 0
        self.thread: threading.Thread | None = None
        self.cons: dict[Path, sqlite3.Connection] = {}
        self.warned = False
        self.warned_cost = False
        # (RunLog, database path, run) triples, appended and popped atomically; every batch drains them
        self.runs: collections.deque = collections.deque()
        self.kicked = False  # a wake-up for ``runs`` is queued and not yet taken

    def add_run(self, log: "RunLog", path: Path, run: tuple) -> None:
        if len(self.runs) >= MAX_PENDING:
            self.dropped += 1
            return
        self.runs.append((log, path, run))
        if not self.kicked:  # a race queues a second wake-up at worst; the writer clears this before it drains
            self.kicked = True
            if not self.put(None, None):  # a full queue: its next batch drains the runs, and the next run kicks
                self.kicked = False

    def put(self, path: Path | None, row: tuple | None) -> bool:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="edgert-telemetry", daemon=True)
                self.thread.start()
            try:
                self.q.put_nowait((path, row))
            except queue.Full:
                self.dropped += 1
                return False
            self.enqueued += 1
            return True

    def _run(self) -> None:
        while True:
            batch = [self.q.get()]
            deadline = time.monotonic() + BATCH_WAIT_S
            while len(batch) < BATCH_MAX:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            by_path: dict[Path, tuple[list, dict]] = {}  # path -> (rows, {RunLog: runs})
            for path, row in batch:
                if path is not None:
                    by_path.setdefault(path, ([], {}))[0].append(row)
            self.kicked = False  # before draining: a run appended from here on queues a wake-up of its own
            last = acc = None
            while self.runs:
                log, path, run = self.runs.popleft()
                if (log, path) != last:  # runs come in long stretches of one log and one database
                    last, acc = (log, path), by_path.setdefault(path, ([], {}))[1].setdefault(log, [])
                acc.append(run)
            for path, (rows, runs) in by_path.items():
                try:
                    con = self.cons.get(path)
                    if con is None:
                        if len(self.cons) > 8:  # tests switch EDGERT_HOME often: do not hoard connections
                            for old in self.cons.values():
                                old.close()
                            self.cons.clear()
                        con = self.cons[path] = _connect(path)
                    if rows:
                        with con:
                            con.executemany(_INSERT, rows)
                    for log, rs in runs.items():  # apart: a failure here must not take the rows with it
                        with con:
                            log.insert(con, rs)
                except Exception as exc:  # a broken disk must not break inference: warn once, drop the batch
                    self.cons.pop(path, None)
                    if not self.warned:
                        self.warned = True
                        warnings.warn(f"edgert telemetry: could not write {path}: {exc}", RuntimeWarning)
            with self.lock:
                self.done += len(batch)
                self.lock.notify_all()

    def flush(self, timeout: float) -> bool:
        if self.runs:
            self.put(None, None)  # the runs appended so far are drained before this wake-up counts as done
        with self.lock:
            target = self.enqueued
            return self.lock.wait_for(lambda: self.done >= target, timeout=timeout)


_writer = _Writer()


def record(event: dict) -> str | None:
    """Queue one event (keys: the COLUMNS names; missing ones are filled in). Returns its request id, or None when
    telemetry is off. Never raises."""
    if not enabled():
        return None
    try:
        ev = dict(event)
        ev.setdefault("request_id", new_request_id())
        ev.setdefault("ts", time.time())
        cost = _cost_model_or_warn()
        ev.setdefault("device", cost.device if cost else _machine())
        ev.setdefault("delegates", "host")
        if isinstance(ev.get("delegates"), (list, tuple)):
            ev["delegates"] = ",".join(ev["delegates"])
        busy = float(ev.get("prefill_s") or 0.0) + float(ev.get("decode_s") or 0.0)
        if ev.get("energy_j") is None and cost:
            ev["energy_j"] = cost.energy_j(busy)
        if ev.get("cost_usd") is None and cost:
            ev["cost_usd"] = cost.cost_usd(busy)
        if ev.get("error") is not None and not isinstance(ev["error"], str):
            ev["error"] = f"{type(ev['error']).__name__}: {ev['error']}"
        _writer.put(db_path(), tuple(ev.get(name) for name in _NAMES))
        return ev["request_id"]
    except Exception:
        return None


# a RunLog's columns that vary per run -> their value from json_each's ``value`` = [ts_ns, latency_ns, bytes, error]
_RUN_COLUMNS = {
    "request_id": ":prefix || '-' || (:n0 + key)", "ts": "json_extract(value, '$[0]') / 1e9",
    "latency_s": "json_extract(value, '$[1]') / 1e9", "decode_s": "json_extract(value, '$[1]') / 1e9",
    "bytes_copied": "json_extract(value, '$[2]')", "error": "json_extract(value, '$[3]')",
    "status": "CASE WHEN json_extract(value, '$[3]') IS NULL THEN 200 ELSE 500 END",
    "energy_j": ":joules_per_s * json_extract(value, '$[1]') / 1e9",
    "cost_usd": ":usd_per_s * json_extract(value, '$[1]') / 1e9",
}
_INSERT_RUNS = (f"INSERT INTO events ({', '.join(_NAMES)}) SELECT "
                + ", ".join(_RUN_COLUMNS.get(name, f":{name}") for name in _NAMES) + " FROM json_each(:runs)")


class RunLog:
    """The events of one source of many small requests (a Session's runs), one row per run at the cost of a tuple
    append on the request path. The columns every run shares (``event``: source, endpoint, model, device,
    delegates), the database path and the cost rates are fixed here once; the writer thread inserts a batch of runs
    as one JSON text that SQLite expands into rows (``json_each``), so it holds the GIL for a ``json.dumps`` of
    integers, not for a Python row per run (which cost the caller's thread 8 us a run in GIL hand-offs). Request ids
    are ``<run-id>-<n>``. Energy and price per busy second come from ``profile_cost_model(profile)`` (the host's
    cost model when ``profile`` is None or the host's own; both models are linear in busy time)."""

    __slots__ = ("home", "path", "params", "n")
    CHUNK = 4096  # runs per INSERT: bounds the GIL-held json.dumps (~0.4 us a run) a caller may wait behind

    def __init__(self, event: dict, profile=None):
        cost = _cost_model_or_warn()
        if cost is not None:  # the events of every source cost the same way (docs/serve.md)
            cost = profile_cost_model(profile, cost)
        self.home, self.path = os.environ.get("EDGERT_HOME"), db_path()
        self.params = {name: None for name in _NAMES if name not in _RUN_COLUMNS}
        self.params.update(device=cost.device if cost else _machine(), delegates="host", queue_wait_s=0.0)
        self.params.update((k, v) for k, v in event.items() if k in self.params)
        self.params.update(prefix=new_request_id("run"),
                           joules_per_s=cost.energy_j(1.0) if cost else None,
                           usd_per_s=cost.cost_usd(1.0) if cost else None)
        self.n = 0  # runs inserted so far (the writer thread's alone)

    def add(self, latency_s: float, bytes_copied: int, error: str | None = None) -> None:
        """One run that took ``latency_s`` (busy time) and moved ``bytes_copied``; ``error``: why it failed."""
        home = os.environ.get("EDGERT_HOME")
        if home != self.home:  # the database follows EDGERT_HOME, as record()'s events do
            self.home, self.path = home, db_path()
        _writer.add_run(self, self.path, (time.time_ns(), int(latency_s * 1e9), bytes_copied, error))

    def insert(self, con: sqlite3.Connection, runs: list) -> None:
        for k in range(0, len(runs), self.CHUNK):
            chunk = runs[k:k + self.CHUNK]
            if _has_json():
                con.execute(_INSERT_RUNS, {**self.params, "n0": self.n + 1, "runs": json.dumps(chunk)})
            else:
                con.executemany(_INSERT, self.rows(chunk))
            self.n += len(chunk)

    def rows(self, runs: list) -> list[tuple]:
        """The rows of ``runs`` built in Python, as _INSERT_RUNS builds them in SQLite (for an SQLite without
        JSON; tests check that both agree)."""
        p, out = self.params, []
        for i, (ts, lat, nbytes, error) in enumerate(runs):
            s = lat / 1e9
            v = dict(p, request_id=f"{p['prefix']}-{self.n + 1 + i}", ts=ts / 1e9, latency_s=s, decode_s=s,
                     bytes_copied=nbytes, error=error, status=200 if error is None else 500,
                     energy_j=None if p["joules_per_s"] is None else p["joules_per_s"] * s,
                     cost_usd=None if p["usd_per_s"] is None else p["usd_per_s"] * s)
            out.append(tuple(v[name] for name in _NAMES))
        return out


@functools.lru_cache(maxsize=1)
def _has_json() -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38; a build option before)."""
    con = sqlite3.connect(":memory:")
    try:
        con.execute("SELECT json_extract('[1]', '$[0]'), (SELECT count(*) FROM json_each('[1]'))").fetchone()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def record_generation(result, *, model: str, source: str = "llm", endpoint: str | None = None,
                      finish_reason: str | None = None, error=None, t_start: float | None = None,
                      extra: dict | None = None) -> str | None:
    """One event from an edgert.llm GenerationResult (or None when the generation failed before one existed)."""
    if not enabled():
        return None
    t = getattr(result, "timings", None) or {}
    ev = {
        "source": source, "endpoint": endpoint, "model": model,
        "prompt_tokens": getattr(result, "prompt_tokens", None),
        "completion_tokens": len(result.tokens) if result is not None else 0,
        "ttft_s": t.get("ttft_s"), "prefill_s": t.get("prefill_s"), "decode_s": t.get("decode_s"),
        "latency_s": t.get("total_s", (time.perf_counter() - t_start) if t_start is not None else None),
        "bytes_copied": int(t.get("bytes_copied", 0)), "queue_wait_s": 0.0,
        "finish_reason": finish_reason or getattr(result, "finish_reason", None) or ("error" if error else None),
        "error": error,
    }
    ev.update(extra or {})
    return record(ev)


def flush(timeout: float = 5.0) -> bool:
    """Wait until every event recorded so far is committed (True) or timeout passes (False)."""
    return _writer.flush(timeout)


def dropped() -> int:
    return _writer.dropped


atexit.register(lambda: flush(2.0))


# ---- reading ----

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_UNIT_S = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
GROUPS = ("model", "device", "delegate")


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '7d', '1w' or bare seconds -> seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise InvalidArgumentError(f"duration {text!r} is not understood: use a number with s, m, h, d or w (e.g. 30m, 24h)")
    return float(m.group(1)) * _UNIT_S[m.group(2).lower() if m.group(2) else None]


def events(since: float | None = None, path: Path | None = None) -> list[dict]:
    """Raw events (oldest first) recorded in the last ``since`` seconds (all when None)."""
    path = path or db_path()
    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise EdgertError(f"cannot open the telemetry database {path}: {exc}") from None
    try:
        con.row_factory = sqlite3.Row
        if since is None:
            rows = con.execute("SELECT * FROM events ORDER BY ts").fetchall()
        else:
            rows = con.execute("SELECT * FROM events WHERE ts >= ? ORDER BY ts", (time.time() - since,)).fetchall()
        return [dict(r) for r in rows]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a database without the events table yet
            return []
        raise EdgertError(f"cannot read the telemetry database {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
        raise EdgertError(f"cannot read the telemetry database {path}: {exc}; move it away to start a new one") \
            from None
    finally:
        con.close()


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None for no values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def summarize(rows: list[dict]) -> dict:
    """The report's figures for one group of events: over every event (its rows sum and rank to them), but time to
    first token, over the requests without an error (a rejected one has none)."""
    n = len(rows)
    errors = sum(1 for r in rows if r.get("error"))
    completion = sum(r.get("completion_tokens") or 0 for r in rows)
    prompt = sum(r.get("prompt_tokens") or 0 for r in rows)
    # tokens/s over the events that generate tokens: a Session run (source "session") has busy time and no tokens
    token_busy = sum((r.get("prefill_s") or 0.0) + (r.get("decode_s") or 0.0) for r in rows
                     if r.get("completion_tokens") is not None)
    cost = sum(r.get("cost_usd") or 0.0 for r in rows)
    energy = sum(r.get("energy_j") or 0.0 for r in rows)
    lat = [r.get("latency_s") for r in rows]
    ttft = [r.get("ttft_s") for r in rows if not r.get("error")]
    total_tokens = prompt + completion
    return {
        "requests": n, "errors": errors, "error_rate": errors / n if n else 0.0,
        "prompt_tokens": prompt, "completion_tokens": completion,
        "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "tokens_per_s": completion / token_busy if token_busy > 0 else 0.0,
        "energy_j": energy, "cost_usd": cost,
        "cost_per_1m_tokens_usd": cost / total_tokens * 1e6 if total_tokens else 0.0,
    }


def query(since: float | str | None = None, by: str | None = None, path: Path | None = None) -> list[dict]:
    """Report rows: one per group (``by`` = model, device or delegate) or one overall row, each with summarize()'s
    figures and the group key. An event run over several delegates counts once in each of their groups."""
    if isinstance(since, str):
        since = parse_duration(since)
    if by is not None and by not in GROUPS:
        raise InvalidArgumentError(f"by must be one of {GROUPS}, got {by!r}")
    rows = events(since, path)
    if by is None:
        return [{"group": "all", **summarize(rows)}]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        keys = (r.get("delegates") or "").split(",") if by == "delegate" else [r.get(by)]
        for k in keys:
            groups.setdefault(str(k) if k else "-", []).append(r)
    return [{by: k, **summarize(v)} for k, v in sorted(groups.items())]


REPORT_FIELDS = ("requests", "errors", "error_rate", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s",
                 "tokens_per_s", "cost_per_1m_tokens_usd", "energy_j", "cost_usd", "prompt_tokens", "completion_tokens")


def format_report(rows: list[dict], fmt: str = "table") -> str:
    key = next(iter(rows[0])) if rows else "group"
    fields = (key,) + REPORT_FIELDS
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise InvalidArgumentError(f"format must be table, json or csv, got {fmt!r}")

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    head = (f"{key:<24} {'requests':>8} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} {'ttft50':>7} {'ttft95':>7} "
            f"{'tok/s':>8} {'$/1M tok':>10} {'energy J':>9} {'cost $':>10} {'tokens':>9}")
    lines = [head]
    for r in rows:
        lines.append(f"{str(r[key])[:24]:<24} {r['requests']:>8} {r['error_rate'] * 100:>6.1f}% "
                     f"{ms(r['latency_p50_s']):>8} {ms(r['latency_p95_s']):>8} {ms(r['ttft_p50_s']):>7} "
                     f"{ms(r['ttft_p95_s']):>7} {r['tokens_per_s']:>8.1f} {r['cost_per_1m_tokens_usd']:>10.4f} "
                     f"{r['energy_j']:>9.1f} {r['cost_usd']:>10.4f} "
                     f"{r['prompt_tokens'] + r['completion_tokens']:>9}")
    return "\n".join(lines)
