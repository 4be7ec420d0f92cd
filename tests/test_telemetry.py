"""Telemetry: the SQLite event store (WAL, off-thread batched writes, on/off switches), the cost model, durations,
grouped report queries and their formats, and the events LLM.generate / edgert generate record."""
import csv
import io
import json
import sqlite3
import types
import threading
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from edgert import telemetry
from edgert.telemetry import CostModel
from llama_tiny import write_tiny_llama


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path))
    monkeypatch.delenv("EDGERT_TELEMETRY", raising=False)
    telemetry.set_enabled(None)
    yield
    telemetry.set_enabled(None)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tel") / "tiny.gguf"
    write_tiny_llama(path, fmt="q4_0", ctx=256)
    return path


def ev(**kw):
    base = {"source": "test", "model": "m", "prompt_tokens": 10, "completion_tokens": 5, "prefill_s": 0.1,
            "decode_s": 0.4, "latency_s": 0.5, "ttft_s": 0.12, "queue_wait_s": 0.0, "finish_reason": "stop"}
    base.update(kw)
    return base


def test_record_roundtrip_in_wal_mode(tmp_path):
    rid = telemetry.record(ev(request_id="r1", delegates=["host", "npu"]))
    assert rid == "r1"
    assert telemetry.flush()
    (row,) = telemetry.events()
    assert row["request_id"] == "r1" and row["delegates"] == "host,npu" and row["completion_tokens"] == 5
    assert row["device"] == telemetry.host_cost_model().device and row["ts"] == pytest.approx(time.time(), abs=60)
    con = sqlite3.connect(tmp_path / "telemetry.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_off_switches(monkeypatch):
    monkeypatch.setenv("EDGERT_TELEMETRY", "0")
    assert telemetry.record(ev()) is None
    monkeypatch.setenv("EDGERT_TELEMETRY", "1")
    telemetry.set_enabled(False)
    assert telemetry.record(ev()) is None
    telemetry.flush()
    assert telemetry.events() == []


def test_record_leaves_the_database_to_the_writer_thread_in_batches(monkeypatch):
    """record() only queues: every connection and insert happens on the telemetry thread, many rows per insert."""
    calls = []  # (thread name, what, rows)

    class Con:
        def __init__(self, con):
            self.con = con

        def executemany(self, sql, rows):
            rows = list(rows)
            calls.append((threading.current_thread().name, "insert", len(rows)))
            return self.con.executemany(sql, rows)

        def __enter__(self):
            return self.con.__enter__()

        def __exit__(self, *exc):
            return self.con.__exit__(*exc)

        def close(self):
            self.con.close()

    real = telemetry._connect

    def connect(path):
        calls.append((threading.current_thread().name, "connect", 0))
        return Con(real(path))

    monkeypatch.setattr(telemetry, "_connect", connect)
    monkeypatch.setattr(telemetry._writer, "cons", {})
    n = 5000
    for i in range(n):
        telemetry.record(ev(request_id=f"r{i}"))
    assert telemetry.flush(30)
    assert len(telemetry.events()) == n
    assert calls and {name for name, _, _ in calls} == {"edgert-telemetry"}
    inserts = [rows for _, what, rows in calls if what == "insert"]
    assert sum(inserts) == n and len(inserts) < n / 10, f"{len(inserts)} inserts for {n} events"


def test_run_log_rows_one_per_run_with_the_shared_columns_and_the_host_cost_model():
    log = telemetry.RunLog({"source": "session", "endpoint": "run", "model": "m.onnx", "delegates": "host"})
    for k in range(3):
        log.add(0.25 * (k + 1), 100 * k)
    log.add(0.5, 0, "ShapeError: input 'x' \"wrong\" — ünïcode")
    assert telemetry.flush()
    rows = telemetry.events()
    host = telemetry.host_cost_model()
    assert [r["request_id"] for r in rows] == [f"{log.params['prefix']}-{k}" for k in range(1, 5)]
    assert [r["latency_s"] for r in rows] == [0.25, 0.5, 0.75, 0.5] and [r["bytes_copied"] for r in rows][:3] == [
        0, 100, 200]
    assert all(r["model"] == "m.onnx" and r["device"] == host.device and r["prompt_tokens"] is None for r in rows)
    assert rows[1]["energy_j"] == pytest.approx(host.energy_j(0.5)) and rows[1]["ts"] == pytest.approx(time.time(),
                                                                                                       abs=60)
    assert [r["status"] for r in rows] == [200, 200, 200, 500]
    assert rows[3]["error"] == "ShapeError: input 'x' \"wrong\" — ünïcode"


def test_run_log_rows_built_in_python_equal_sqlite_json_ones(tmp_path, monkeypatch):
    """An SQLite without JSON (before 3.38, built without it) gets the same rows built in Python; a RunLog's failure
    no longer rolls back record()'s events of the same batch (they went with it)."""
    runs = [(0.25, 10, None), (0.5, 0, "DeviceError: x"), (1e-6, 3, None)]
    tables = []
    for json_ok in (True, False):
        monkeypatch.setenv("EDGERT_HOME", str(tmp_path / str(json_ok)))
        monkeypatch.setattr(telemetry, "_has_json", lambda ok=json_ok: ok)
        dev = types.SimpleNamespace(name="npu-x", power_w=2.0, price_usd_per_hour=1800.0)  # 2 J and $0.5 a second
        log = telemetry.RunLog({"source": "session", "endpoint": "run", "model": "m"}, profile=dev)
        log.params["prefix"] = "run-x"
        for lat, nbytes, err in runs:
            log.add(lat, nbytes, err)
        assert telemetry.flush()
        tables.append([{k: v for k, v in r.items() if k != "ts"} for r in telemetry.events()])
    assert tables[0] == tables[1] and [r["energy_j"] for r in tables[0]] == [0.5, 1.0, pytest.approx(2e-6)]

    def broken(con, runs):
        raise sqlite3.OperationalError("no such table: json_each")

    monkeypatch.setattr(telemetry.RunLog, "insert", broken)
    monkeypatch.setattr(telemetry._writer, "warned", True)
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path / "mixed"))
    telemetry.record(ev(request_id="kept"))
    telemetry.RunLog({"source": "session"}).add(0.1, 0)
    assert telemetry.flush()
    assert [r["request_id"] for r in telemetry.events()] == ["kept"]


def test_a_session_run_log_follows_edgert_home_and_a_full_queue_does_not_strand_runs(tmp_path, monkeypatch):
    log = telemetry.RunLog({"source": "session", "endpoint": "run"})
    for home in ("a", "b"):
        monkeypatch.setenv("EDGERT_HOME", str(tmp_path / home))
        log.add(0.1, 0)
    assert telemetry.flush()
    for home in ("a", "b"):  # both runs went to the first home's database
        monkeypatch.setenv("EDGERT_HOME", str(tmp_path / home))
        assert len(telemetry.events()) == 1
    # the wake-up of a run dropped by a full queue left `kicked` set: no run was written again until flush()
    monkeypatch.setattr(telemetry._writer, "put", lambda path, row: False)
    log.add(0.1, 0)
    assert telemetry._writer.kicked is False
    monkeypatch.undo()
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path / "b"))
    log.add(0.2, 0)  # kicks the writer, which drains both
    deadline = time.monotonic() + 5
    while len(telemetry.events()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(telemetry.events()) == 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_never_raises_on_unwritable_home(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EDGERT_HOME", str(blocker))
    assert telemetry.record(ev()) is not None  # queued; the writer fails, warns once and drops the batch
    assert telemetry.flush()
    assert telemetry.events() == []


def test_cost_model_formulas():
    c = CostModel(device="d", power_w=10.0, price_usd_per_hour=3.6, electricity_usd_per_kwh=0.36)
    assert c.energy_j(2.0) == 20.0
    # 2 s at $3.6/h = $0.002, plus 20 J = 20/3.6e6 kWh at $0.36 = $2e-6
    assert c.cost_usd(2.0) == pytest.approx(0.002 + 2e-6)
    telemetry.record(ev(energy_j=None, cost_usd=None))
    telemetry.flush()
    (row,) = telemetry.events()
    host = telemetry.host_cost_model()
    assert row["energy_j"] == pytest.approx(host.energy_j(0.5))
    assert row["cost_usd"] == pytest.approx(host.cost_usd(0.5))


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1w", 604800),
                                          ("30", 30), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert telemetry.parse_duration(text) == seconds


def test_parse_duration_rejects_garbage():
    with pytest.raises(ValueError, match="duration"):
        telemetry.parse_duration("yesterday")


def test_query_groups_since_and_figures():
    now = time.time()
    rows = [ev(request_id="a", model="x", device="pi5", delegates="host", latency_s=0.1, cost_usd=1e-6),
            ev(request_id="b", model="x", device="pi5", delegates="host,npu", latency_s=0.3, cost_usd=3e-6),
            ev(request_id="c", model="y", device="nuc", delegates="host", latency_s=0.9, error="boom", cost_usd=0.0),
            ev(request_id="old", model="x", ts=now - 7200, latency_s=50.0)]
    for r in rows:
        telemetry.record(r)
    telemetry.flush()
    (all_,) = telemetry.query(since="1h")
    assert all_["requests"] == 3 and all_["errors"] == 1 and all_["error_rate"] == pytest.approx(1 / 3)
    assert all_["latency_p50_s"] == pytest.approx(0.3)
    assert all_["latency_p95_s"] == pytest.approx(np.percentile([0.1, 0.3, 0.9], 95))
    assert all_["ttft_p50_s"] == pytest.approx(0.12)  # failed requests have no first token
    assert all_["tokens_per_s"] == pytest.approx(15 / 1.5)
    assert all_["cost_per_1m_tokens_usd"] == pytest.approx(4e-6 / 45 * 1e6)
    assert telemetry.query()[0]["requests"] == 4
    by_model = {r["model"]: r for r in telemetry.query(since=3600, by="model")}
    assert by_model["x"]["requests"] == 2 and by_model["y"]["requests"] == 1
    by_dev = {r["device"]: r["requests"] for r in telemetry.query(since="1h", by="device")}
    assert by_dev == {"pi5": 2, "nuc": 1}
    by_del = {r["delegate"]: r["requests"] for r in telemetry.query(since="1h", by="delegate")}
    assert by_del == {"host": 3, "npu": 1}
    with pytest.raises(ValueError):
        telemetry.query(by="colour")


def test_report_formats():
    telemetry.record(ev(model="x"))
    telemetry.flush()
    rows = telemetry.query(by="model")
    assert json.loads(telemetry.format_report(rows, "json"))[0]["model"] == "x"
    parsed = list(csv.DictReader(io.StringIO(telemetry.format_report(rows, "csv"))))
    assert parsed[0]["model"] == "x" and int(parsed[0]["requests"]) == 1
    # docs/serve.md: json and csv give the same fields by name (the csv had no errors column)
    assert set(parsed[0]) == set(json.loads(telemetry.format_report(rows, "json"))[0])
    table = telemetry.format_report(rows, "table")
    assert table.splitlines()[0].startswith("model") and "x" in table.splitlines()[1]
    with pytest.raises(ValueError):
        telemetry.format_report(rows, "xml")


def test_report_on_an_empty_home_is_zero():
    (row,) = telemetry.query()
    assert row["requests"] == 0 and row["latency_p50_s"] is None
    assert "requests" in telemetry.format_report([row])


def test_llm_generate_and_stream_record_one_event_each(tiny_path):
    from edgert.llm import LLM

    with LLM(str(tiny_path), n_ctx=128) as llm:
        res = llm.generate("the hat", max_tokens=6, temperature=0)
        it = llm.stream("the hat", max_tokens=50, temperature=0)
        next(it)
        it.close()  # stopped early: recorded as cancelled
        llm.chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    telemetry.flush()
    rows = telemetry.events()
    assert [r["source"] for r in rows] == ["llm"] * 3
    assert rows[0]["completion_tokens"] == len(res.tokens) and rows[0]["prompt_tokens"] == res.prompt_tokens
    assert rows[0]["finish_reason"] == res.finish_reason and rows[0]["model"] == str(tiny_path)
    assert rows[0]["prefill_s"] == pytest.approx(res.timings["prefill_s"])
    assert rows[1]["finish_reason"] == "cancelled"
    # a stream closed early records what it did (it recorded no prompt, 0 tokens and no timings before)
    assert rows[1]["prompt_tokens"] == res.prompt_tokens and rows[1]["completion_tokens"] >= 1
    assert rows[1]["ttft_s"] is not None and rows[1]["prefill_s"] is not None and rows[1]["decode_s"] is not None
    assert rows[1]["energy_j"] > 0


def test_llm_telemetry_off(tiny_path, monkeypatch):
    from edgert.llm import LLM

    monkeypatch.setenv("EDGERT_TELEMETRY", "0")
    with LLM(str(tiny_path), n_ctx=128) as llm:
        llm.generate("the", max_tokens=2, temperature=0)
    telemetry.flush()
    assert telemetry.events() == []


def test_cli_generate_records_unless_no_telemetry(tiny_path):
    from edgert.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["generate", str(tiny_path), "-p", "the", "-n", "3", "--temperature", "0", "--n-ctx", "64"]) == 0
        assert main(["generate", str(tiny_path), "-p", "the", "-n", "3", "--n-ctx", "64", "--no-telemetry"]) == 0
    telemetry.set_enabled(None)
    telemetry.flush()
    assert len(telemetry.events()) == 1
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", "--format", "csv", "--since", "1h"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert row["requests"] == "1"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["report", "--since", "soon"]) == 1


def test_failed_llm_calls_record_one_rejected_event_each_and_count_in_the_error_rate(tiny_path):
    """A refused LLM call (a prompt longer than n_ctx, an empty prompt, bad sampling arguments, chat([])) recorded
    nothing, so the report's error rate left them out. Each records one event now, in the shape of the server's
    rejected requests, and the report counts it."""
    import edgert
    from edgert.llm import LLM

    long_prompt = "the hat " * 40
    calls = [
        lambda m: m.generate(long_prompt, max_tokens=2),  # ContextLengthError: n_ctx is 32
        lambda m: m.generate(""),
        lambda m: m.generate("the", temperature=-1),
        lambda m: m.generate("the", max_token=3),
        lambda m: m.chat([]),
        lambda m: m.stream("the", top_p=2),
        lambda m: m.chat_stream([{"role": "user", "content": "hi"}], max_tokens=0),
    ]
    with LLM(str(tiny_path), n_ctx=32) as llm:
        llm.generate("the", max_tokens=2, temperature=0)
        for call in calls:
            with pytest.raises(edgert.InvalidArgumentError):
                call(llm)
        n_long = len(llm.tokenize(long_prompt, add_special=True))
        n_the = len(llm.tokenize("the", add_special=True))
        n_hi = len(llm.chat_tokens([{"role": "user", "content": "hi"}]))
    telemetry.flush()
    rows = telemetry.events()
    assert len(rows) == 1 + len(calls) and rows[0]["finish_reason"] != "rejected"
    for r in rows[1:]:
        assert (r["source"], r["model"], r["finish_reason"], r["status"], r["completion_tokens"]) == (
            "llm", str(tiny_path), "rejected", 400, 0)
        assert r["error"].split(":")[0] in ("InvalidArgumentError", "ContextLengthError") and r["latency_s"] >= 0
    assert rows[1]["error"].startswith("ContextLengthError: ") and rows[1]["prompt_tokens"] == n_long
    # the prompt's tokens when it was tokenized (the sampler's checks come after), else 0
    assert [r["prompt_tokens"] for r in rows[2:]] == [0, n_the, 0, 0, n_the, n_hi]
    (row,) = telemetry.query()
    assert row["requests"] == 8 and row["errors"] == 7 and row["error_rate"] == pytest.approx(7 / 8)


def test_a_failed_cli_generate_records_an_event_the_report_counts(tiny_path):
    from edgert.cli import main

    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["generate", str(tiny_path), "-p", "the", "-n", "2", "--n-ctx", "64"]) == 0
        assert main(["generate", str(tiny_path), "-p", "the " * 100, "--n-ctx", "64", "--json"]) == 1
        assert main(["generate", str(tiny_path), "-p", "the", "--temperature", "-1", "--n-ctx", "64"]) == 1
    telemetry.flush()
    assert [r["finish_reason"] for r in telemetry.events()][1:] == ["rejected", "rejected"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", "--format", "json"]) == 0
    (row,) = json.loads(out.getvalue())
    assert row["requests"] == 3 and row["errors"] == 2


def test_session_runs_do_not_dilute_tokens_per_s():
    """A Session run records busy time and no tokens: tokens/s is over the events that generate tokens."""
    for i in range(2):
        telemetry.record(ev(request_id=f"g{i}", completion_tokens=5, prefill_s=0.1, decode_s=0.4))
    telemetry.record({"source": "session", "endpoint": "run", "model": "m.onnx", "latency_s": 2.0, "decode_s": 2.0})
    telemetry.flush()
    (all_,) = telemetry.query()
    assert all_["requests"] == 3 and all_["completion_tokens"] == 10
    assert all_["tokens_per_s"] == pytest.approx(10 / 1.0)
    table = telemetry.format_report(telemetry.query())
    head, row = table.splitlines()
    assert head.split()[-3:] == ["cost", "$", "tokens"]
    assert row.split()[-1] == str(all_["prompt_tokens"] + all_["completion_tokens"])


@pytest.mark.parametrize("name, value", [("EDGERT_POWER_W", "nan"), ("EDGERT_POWER_W", "-5"),
                                         ("EDGERT_POWER_W", "inf"), ("EDGERT_PRICE_USD_PER_HOUR", "-0.1"),
                                         ("EDGERT_ELECTRICITY_USD_PER_KWH", "cheap")])
def test_a_bad_cost_override_is_refused(monkeypatch, name, value):
    """EDGERT_POWER_W=nan made every event's energy and cost NaN (a negative one, negative costs), and a value that
    was no number was dropped without a word."""
    from edgert.errors import InvalidArgumentError

    monkeypatch.setattr(telemetry, "_host_cost", None)
    monkeypatch.setattr(telemetry._writer, "warned_cost", False)
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgumentError, match=f"{name} must be a finite number >= 0, got '{value}'"):
        telemetry.host_cost_model()
    with pytest.warns(RuntimeWarning, match=name):  # recording still never raises: the event, without a cost
        assert telemetry.record(ev(request_id="r")) == "r"
    log = telemetry.RunLog({"source": "session", "endpoint": "run"})  # a Session's runs: the same (it raised)
    log.add(0.5, 10)
    telemetry.flush()
    rows = telemetry.events()
    assert [r["request_id"] for r in rows] == ["r", f"{log.params['prefix']}-1"]
    assert all(r["energy_j"] is None and r["cost_usd"] is None for r in rows) and rows[0]["completion_tokens"] == 5
    assert rows[1]["latency_s"] == 0.5 and rows[1]["bytes_copied"] == 10
    monkeypatch.setenv(name, "0")
    monkeypatch.setattr(telemetry, "_host_cost", None)
    assert telemetry.host_cost_model()  # 0 is a valid override


def test_a_damaged_database_is_an_edgert_error(tmp_path):
    from edgert.cli import main
    from edgert.errors import EdgertError

    (tmp_path / "telemetry.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(EdgertError, match="telemetry.db.*move it away"):
        telemetry.events()
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        assert main(["report"]) == 1
    assert err.getvalue().startswith("edgert: error: cannot read the telemetry database")


def test_session_runs_cost_what_other_requests_cost(monkeypatch, tmp_path):
    """Session.run events took power and price from the profile alone: on the host they ignored EDGERT_POWER_W,
    EDGERT_PRICE_USD_PER_HOUR and the electricity price that every LLM and server event honours, so one report
    added costs computed two ways. On the host profile a run now costs what the host cost model says; on another
    device, its profile's power and price plus this machine's electricity price."""
    import edgert
    from edgert.profiles import load
    from onnx_models import mlp

    monkeypatch.setattr(telemetry, "_host_cost", None)
    for k, v in (("EDGERT_POWER_W", "10"), ("EDGERT_PRICE_USD_PER_HOUR", "3600"),
                 ("EDGERT_ELECTRICITY_USD_PER_KWH", "1")):
        monkeypatch.setenv(k, v)
    x = {"x": np.ones((2, 8), np.float32)}
    for device in ("host", "rpi5"):
        s = edgert.Session(mlp(batch=2, d_in=8), device=device, emulate=device != "host")
        s.run(None, x)
        s.close()
    assert telemetry.flush()
    host, rpi = (r for r in telemetry.events() if r["source"] == "session")
    busy = host["latency_s"]
    assert host["energy_j"] == pytest.approx(10 * busy) and host["cost_usd"] == pytest.approx(busy + 10 * busy / 3.6e6)
    prof, busy = load("rpi5"), rpi["latency_s"]
    assert rpi["energy_j"] == pytest.approx(prof.power_w * busy)
    assert rpi["cost_usd"] == pytest.approx(prof.price_usd_per_hour * busy / 3600 + prof.power_w * busy / 3.6e6)
