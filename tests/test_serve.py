"""The OpenAI-compatible server, live on 127.0.0.1 with an ephemeral port, over a tiny random llama: the official
openai client (chat, streaming, completions, models), 32 concurrent streams against solo greedy runs, the bounded
queue's 503, client disconnects, timeouts, a table of malformed requests, the API key, and telemetry + report."""
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from edgert import telemetry
from edgert.llm import LLM
from cli_run import NEUTRAL_CWD, edgert_cmd, python_argv
from edgert.serve import create_app
from llama_tiny import write_tiny_llama

LONG = 1500  # tokens: a few seconds of the tiny model, long enough to act on while it runs
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny.gguf"
    write_tiny_llama(path, fmt="q4_0", ctx=2048, dim=128, hidden=256, n_layers=4)
    with LLM(str(path), n_ctx=2048, threads=1) as model:
        yield model


@pytest.fixture()
def paced_llm(llm, monkeypatch):
    """The tiny model paced at 2 ms a step, so a LONG answer lasts seconds on any machine (tests that act while a
    generation runs must not race a fast CPU)."""
    forward = llm.model.forward

    def paced(*args, **kwargs):
        time.sleep(0.002)
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", paced)
    return llm


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path))
    monkeypatch.delenv("EDGERT_API_KEY", raising=False)
    monkeypatch.delenv("EDGERT_TELEMETRY", raising=False)


@contextlib.contextmanager
def live(llm, **kw):
    """Runs create_app(llm, **kw) under uvicorn in a thread; yields the base URL."""
    app = create_app(llm, model_id="tiny", **kw)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not srv.started:
        assert th.is_alive() and time.monotonic() - t0 < DEADLINE_S, "the server did not start"
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(DEADLINE_S)
        assert not th.is_alive(), "the server did not stop"


def wait_for(cond, what: str, timeout: float = DEADLINE_S):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def solo_chat(llm, content: str, max_tokens: int) -> str:
    llm.reset()  # alone: nothing of another prompt in the KV cache
    return llm.chat([{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0).text


# ---- the official client ----

def test_openai_client_chat_stream_completions_models(llm):
    from openai import OpenAI

    want_chat = solo_chat(llm, "the hat", 12)
    llm.reset()
    want_cmpl = llm.generate("the hat", max_tokens=12, temperature=0).text
    with live(llm) as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)
        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"]

        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the hat"}],
                                           max_tokens=12, temperature=0)
        assert r.object == "chat.completion" and r.model == "tiny"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want_chat
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(llm.chat_tokens([{"role": "user", "content": "the hat"}]))
        assert r.usage.completion_tokens <= 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the hat"}], max_tokens=12, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want_chat
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

        c = client.completions.create(model="tiny", prompt="the hat", max_tokens=12, temperature=0)
        assert c.object == "text_completion" and c.choices[0].text == want_cmpl
        assert c.usage.completion_tokens <= 12
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(
            model="tiny", prompt="the hat", max_tokens=12, temperature=0, stream=True) if ch.choices)
        assert streamed == want_cmpl

        seeded = [client.completions.create(model="tiny", prompt="the", max_tokens=16, temperature=1.0, seed=7)
                  .choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1]
        stop = want_cmpl[2:4]
        if len(want_cmpl) >= 4 and stop:
            cut = client.completions.create(model="tiny", prompt="the hat", max_tokens=12, temperature=0, stop=[stop])
            assert cut.choices[0].text == want_cmpl[:want_cmpl.index(stop)]
            assert cut.choices[0].finish_reason == "stop"


def test_tokenize_detokenize(llm):
    with live(llm) as base:
        r = httpx.post(base + "/tokenize", json={"content": "the hat"}, timeout=5)
        assert r.status_code == 200 and r.json()["tokens"] == llm.tokenize("the hat")
        r = httpx.post(base + "/detokenize", json={"tokens": llm.tokenize("the hat")}, timeout=5)
        assert r.status_code == 200 and r.json() == {"content": "the hat"}
        h = httpx.get(base + "/health", timeout=5).json()
        assert h["model_loaded"] is True and h["queue_depth"] == 0 and h["status"] == "ok"
        assert httpx.get(base + "/v1/models", timeout=5).status_code == 200
        assert httpx.post(base + "/tokenize", json={}, timeout=5).status_code == 400
        # successful requests were never counted in edgert_requests_total, only failures (the wrapper's except)
        for route, status, n in (("/tokenize", 200, 1), ("/detokenize", 200, 1), ("/v1/models", 200, 1),
                                 ("/tokenize", 400, 1)):
            assert metric(base, f'edgert_requests_total{{endpoint="{route}",status="{status}"}}') == n, route


def test_completion_prompts_parse_control_tokens_like_llama_cpp(llm):
    """/v1/completions tokenized "<|im_start|>" as the plain text "<", "|", "im"...: a hand-written ChatML prompt
    never reached the model as ChatML. It now parses control-token spellings, as llama.cpp's server does, and
    /tokenize does the same by default (parse_special, llama.cpp's field)."""
    prompt = "<|im_start|>user\nthe hat<|im_end|>\n<|im_start|>assistant\n"
    special = llm.tokenizer.encode_special(prompt, add_special=True)
    plain = llm.tokenize(prompt, add_special=True)
    im_start = llm.tokenizer.tokens.index("<|im_start|>")
    assert special.count(im_start) == 2 and im_start not in plain
    with live(llm) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        r = client.post(CMPL, json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(special)
        assert client.post("/tokenize", json={"content": prompt}).json()["tokens"] == \
            llm.tokenizer.encode_special(prompt)
        assert client.post("/tokenize", json={"content": prompt, "parse_special": False}).json()["tokens"] == \
            llm.tokenize(prompt)
        r = client.post("/tokenize", json={"content": prompt, "parse_special": "yes"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "parse_special"


def test_top_p_0_and_min_p_1_answer_as_greedy(llm):
    """OpenAI clients send top_p 0 (refused before): llama.cpp keeps the most probable token, as min_p 1 does, so at
    temperature 1 the answer is greedy's for every seed."""
    llm.reset()
    want = llm.generate("the hat", max_tokens=8, temperature=0).text
    with live(llm) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        for seed, cut in itertools.product((1, 2, 3), ({"top_p": 0}, {"min_p": 1})):
            r = client.post(CMPL, json={"prompt": "the hat", "max_tokens": 8, "temperature": 1, "seed": seed, **cut})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want, (seed, cut)


# ---- scheduling ----

def test_32_concurrent_streams_equal_solo_greedy_runs(llm):
    prompts = [f"client {i}: the hat {'t' * (i % 5)}" for i in range(32)]
    want = [solo_chat(llm, p, 16) for p in prompts]

    async def one(client, p):
        text, finish = [], None
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 16,
                "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])["choices"][0]
                text.append(ch["delta"].get("content") or "")
                finish = ch["finish_reason"] or finish
        return "".join(text), finish

    async def run(base):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=DEADLINE_S * 2, limits=limits) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    with live(llm, max_queue=32) as base:
        got = asyncio.run(run(base))
        assert metric(base, "edgert_queue_depth") == 0
    assert all(f in ("stop", "length") for _, f in got)
    mismatches = [i for i, ((text, _), w) in enumerate(zip(got, want)) if text != w]
    assert not mismatches, f"streams differ from solo runs for prompts {mismatches}"


def _start_long_stream(base, out: dict, max_tokens=LONG):
    """Streams a long greedy completion on a thread; out['pieces'] counts chunks, out['error'] is the code of an
    error event, out['stop'] ends it early."""
    def run():
        with httpx.stream("POST", base + "/v1/completions", timeout=DEADLINE_S,
                          json={"prompt": "the hat", "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:  # a stream that failed once it had begun ends with an error event
                        out["error"] = event["error"]["code"]
                        continue
                    out["pieces"] = out.get("pieces", 0) + 1
                    out["finish"] = event["choices"][0]["finish_reason"] or out.get("finish")
                if out.get("stop"):
                    return  # leaving the with-block closes the connection mid-stream
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_full_queue_answers_503_and_health_answers_during_generation(paced_llm):
    llm = paced_llm
    with live(llm, max_queue=1) as base:
        a = {}
        ta = _start_long_stream(base, a)
        wait_for(lambda: a.get("pieces", 0) > 2, "the first stream to run")
        t0 = time.monotonic()
        h = httpx.get(base + "/health", timeout=5).json()
        assert time.monotonic() - t0 < 1.0 and h["running"] == 1  # the event loop is free while the model runs
        b = {}
        tb = _start_long_stream(base, b, max_tokens=4)
        wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["queue_depth"] == 1, "the second to queue")
        r = httpx.post(base + "/v1/completions", json={"prompt": "the", "max_tokens": 4}, timeout=5)
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        assert metric(base, "edgert_queue_depth") == 1
        a["stop"] = True
        ta.join(DEADLINE_S)
        tb.join(DEADLINE_S)
        assert b["status"] == 200 and b["finish"] in ("stop", "length")
        assert httpx.get(base + "/health", timeout=5).json()["queue_depth"] == 0


def test_client_disconnect_stops_generation(paced_llm):
    llm = paced_llm
    with live(llm) as base:
        a = {}
        ta = _start_long_stream(base, a)
        wait_for(lambda: a.get("pieces", 0) >= 3, "the stream to start")
        a["stop"] = True
        ta.join(DEADLINE_S)
        t_close = time.monotonic()
        wait_for(lambda: metric(base, 'edgert_generations_total{finish_reason="cancelled"}') == 1,
                 "the generation to be cancelled", timeout=5)
        assert time.monotonic() - t_close < 2.0
        assert httpx.get(base + "/health", timeout=5).json()["running"] == 0
        generated = metric(base, "edgert_completion_tokens_total")
        assert 0 < generated < LONG / 2
    telemetry.flush()
    rows = [r for r in telemetry.events() if r["source"] == "server"]
    assert len(rows) == 1 and rows[0]["finish_reason"] == "cancelled" and rows[0]["status"] == 499
    assert rows[0]["completion_tokens"] == generated


def _raw_request(base: str, path: str, body: dict) -> socket.socket:
    """Sends a request on a socket of its own and returns the socket (closing it is a client that goes away)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_client_gone_while_queued_frees_its_slot_at_once(paced_llm):
    """A queued client that disconnected kept its queue slot until the worker reached its job (after the running
    generation): two gone clients with --max-queue 2 made every new request a 503."""
    llm = paced_llm
    with live(llm, max_queue=2) as base:
        a = {}
        ta = _start_long_stream(base, a)
        wait_for(lambda: a.get("pieces", 0) > 2, "the first stream to run")
        gone = [_raw_request(base, CMPL, {"prompt": "the", "max_tokens": LONG, "stream": stream})
                for stream in (True, False)]
        wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["queue_depth"] == 2, "two to queue")
        for sock in gone:
            sock.close()
        wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["queue_depth"] == 0, "the slots to free",
                 timeout=5)
        assert metric(base, 'edgert_generations_total{finish_reason="cancelled"}') == 2
        assert httpx.get(base + "/health", timeout=5).json()["running"] == 1  # the first still runs
        b = {}
        tb = _start_long_stream(base, b, max_tokens=4)  # waits behind the first: not a 503
        wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["queue_depth"] == 1, "the new one to queue")
        a["stop"] = True
        ta.join(DEADLINE_S)
        tb.join(DEADLINE_S)
        assert b["status"] == 200 and b["finish"] in ("stop", "length")
    telemetry.flush()
    rows = [r for r in telemetry.events() if r["source"] == "server" and r["status"] == 499]
    assert len(rows) == 3 and sum(r["prefill_s"] is None for r in rows) == 2  # two never ran


def test_queue_admits_max_queue_besides_the_job_about_to_run():
    """The job the worker had yet to take counted as waiting: a burst of max_queue + 1 requests on an idle server
    got a 503 (8 in 30 bursts of 3 with --max-queue 2)."""
    from edgert.serve import QueueFullError, Scheduler, ShuttingDownError

    sched = Scheduler(llm=None, max_queue=2)  # never started: the first job stays "about to run"
    ended = []

    async def main():
        jobs = [sched.submit([1], {}, 30.0, on_done=lambda job, out: ended.append(out.finish_reason))
                for _ in range(3)]
        with pytest.raises(QueueFullError, match="3 requests are already waiting"):
            sched.submit([1], {}, 30.0)
        jobs[1].cancel()  # a queued job leaves at once and frees its slot
        assert sched.queue_depth == 2 and ended == ["cancelled"]
        sched.submit([1], {}, 30.0, on_done=lambda job, out: ended.append(out.finish_reason))
        sched.close()  # queued jobs end now, with the shutdown's reason
        with pytest.raises(ShuttingDownError):
            sched.submit([1], {}, 30.0)

    asyncio.run(main())
    assert ended == ["cancelled"] + ["shutdown"] * 3 and sched.queue_depth == 0


def test_a_queue_timeout_is_recorded_as_the_503_it_answers(llm, monkeypatch):
    """A request whose timeout passed while it waited answered 503 but was counted and recorded as status 200 with
    no error; a stream got an empty answer with finish_reason "length"."""
    forward = llm.model.forward

    def slow(*args, **kwargs):  # the first request's one step holds the worker past the others' deadlines
        time.sleep(1.0)
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", slow)
    with live(llm, request_timeout_s=0.3) as base:
        res = {}

        def go(key, stream):
            res[key] = httpx.post(base + CMPL, json={"prompt": "the", "max_tokens": 5, "stream": stream},
                                  timeout=DEADLINE_S)

        first = threading.Thread(target=go, args=("first", False))
        first.start()
        time.sleep(0.1)
        late = [threading.Thread(target=go, args=(k, k == "stream")) for k in ("plain", "stream")]
        for th in late:
            th.start()
        for th in (first, *late):
            th.join(DEADLINE_S)
        assert res["first"].status_code == 200
        assert res["plain"].status_code == 503 and res["plain"].json()["error"]["code"] == "timeout"
        events = [json.loads(ln[6:]) for ln in res["stream"].text.splitlines() if ln.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout"
        assert metric(base, 'edgert_requests_total{endpoint="/v1/completions",status="503"}') == 2
        assert metric(base, 'edgert_errors_total{endpoint="/v1/completions",code="timeout"}') == 2
    telemetry.flush()
    rows = {r["request_id"]: r for r in telemetry.events()}
    row = rows[res["plain"].headers["x-request-id"]]
    assert row["status"] == 503 and row["finish_reason"] == "timeout" and row["error"].startswith("timeout: ")
    assert rows[res["stream"].headers["x-request-id"]]["status"] == 503


def test_health_answers_while_a_big_request_is_prepared(llm):
    """Validation, template rendering and tokenizing ran on the event loop: an 8 MB /tokenize or /v1/completions
    body, or 130,000 empty chat messages, froze /health and /metrics for 6-20 s. They run in a thread now (and
    the tokenizer releases the GIL while it works)."""
    text = "the hat " * 400_000
    with live(llm) as base:
        res = {}

        def big():
            t0 = time.monotonic()
            r = httpx.post(base + "/tokenize", json={"content": text}, timeout=DEADLINE_S * 2)
            res["status"], res["took"] = r.status_code, time.monotonic() - t0

        th = threading.Thread(target=big)
        th.start()
        worst, last = 0.0, time.monotonic()
        while th.is_alive():
            assert httpx.get(base + "/health", timeout=DEADLINE_S).status_code == 200
            # the gap between answers, not one request's latency: this client shares the server's process, so a
            # handler holding the GIL stalls it before it can start its clock
            worst, last = max(worst, time.monotonic() - last), time.monotonic()
            time.sleep(0.02)
        th.join()
        assert res["status"] == 200
        # before: no /health answered for (nearly) the whole tokenization
        assert worst < min(1.0, res["took"] / 3), (worst, res["took"])
        for body in ({"prompt": "x" * 4_000_000}, {"messages": [{"role": "user", "content": ""}] * 100_000}):
            t0 = time.monotonic()  # refused before tokenizing or rendering: n_ctx bounds characters and messages
            r = httpx.post(base + (CMPL if "prompt" in body else CHAT), json=body, timeout=DEADLINE_S)
            assert r.json()["error"]["code"] == "context_length_exceeded" and time.monotonic() - t0 < 2.0


SERVE_PACED = """
import sys, time
from edgert.llm import model
forward = model.LlamaModel.forward
def paced(self, *args, **kwargs):  # 5 ms a step: a long answer lasts seconds on any machine
    time.sleep(0.005)
    return forward(self, *args, **kwargs)
model.LlamaModel.forward = paced
from edgert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_stops_the_server_within_its_shutdown_timeout(llm, tmp_path):
    """uvicorn waited for every connection to close before the app's shutdown cancelled anything: SIGTERM during a
    long generation with two queued behind it took their whole run (55 s with SmolLM2), and a client stalled
    mid-body held the process forever. Now queued jobs end at once, the running one after the token in flight,
    each answering 503 server_shutting_down, open connections get --shutdown-timeout, and telemetry is written."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, EDGERT_HOME=str(tmp_path))
    # in an empty directory (cli_run): `python -c` from the checkout's root imported the unbuilt source tree in CI
    proc = subprocess.Popen(python_argv("-c", SERVE_PACED, "serve", str(llm.path), "--port", str(port), "--threads",
                                        "1", "--shutdown-timeout", "2", "--log-level", "warning"),
                            env=env, cwd=NEUTRAL_CWD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and _answers(base + "/health"), "the server to start")
        a, b, plain = {}, {}, {}
        ta = _start_long_stream(base, a)
        wait_for(lambda: a.get("pieces", 0) > 2, "the first stream to run")
        tb = _start_long_stream(base, b)
        tc = threading.Thread(target=lambda: plain.update(r=httpx.post(
            base + CMPL, json={"prompt": "the", "max_tokens": LONG}, timeout=DEADLINE_S)))
        tc.start()
        wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["queue_depth"] == 2, "two to queue")
        stalled = socket.create_connection(("127.0.0.1", port))  # a client that never sends the rest of its body
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE_S)
        took = time.monotonic() - t0
        stalled.close()
        for th in (ta, tb, tc):
            th.join(DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 2 + 3, took  # the stalled client's 2 s, and slack for a loaded machine
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read().decode()[-2000:]
    assert a["status"] == b["status"] == 200 and a["error"] == b["error"] == "server_shutting_down"
    assert plain["r"].status_code == 503
    assert plain["r"].json()["error"]["code"] == "server_shutting_down"
    rows = telemetry.events()
    assert sorted(r["finish_reason"] for r in rows) == ["shutdown"] * 3
    assert all(r["status"] == 503 and r["error"].startswith("server_shutting_down") for r in rows)
    assert sorted(r["completion_tokens"] > 0 for r in rows) == [False, False, True]  # the running one's tokens


SERVE_SLOW_PREFILL = """
import sys, time
from edgert.llm import model
forward = model.LlamaModel.forward
def slow(self, tokens, *args, **kwargs):  # a prefill step that outlasts the shutdown timeout (a big model, slow box)
    if len(tokens) > 1:
        time.sleep(6)
    return forward(self, tokens, *args, **kwargs)
model.LlamaModel.forward = slow
from edgert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_sigterm_while_a_prefill_outlasts_the_shutdown_timeout(llm, tmp_path, stream):
    """uvicorn cancels the handlers still open when --shutdown-timeout has passed: the CancelledError escaped
    Server.collect, so the client got a plain-text 500 (a stream, a cut connection), a traceback was logged, and the
    generation, still in its prefill when the process exited, was never recorded. Now the client gets 503
    server_shutting_down (a stream, that error as its last event) and the event is recorded as the shutdown."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, EDGERT_HOME=str(tmp_path))
    proc = subprocess.Popen(python_argv("-c", SERVE_SLOW_PREFILL, "serve", str(llm.path), "--port", str(port),
                                        "--threads", "1", "--shutdown-timeout", "0.5", "--log-level", "warning"),
                            env=env, cwd=NEUTRAL_CWD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    out = {}
    try:
        wait_for(lambda: proc.poll() is None and _answers(base + "/health"), "the server to start")
        if stream:
            th = _start_long_stream(base, out, max_tokens=4)
        else:
            th = threading.Thread(target=lambda: out.update(r=httpx.post(
                base + CMPL, json={"prompt": "the hat", "max_tokens": 4}, timeout=DEADLINE_S)), daemon=True)
            th.start()
        wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["running"] == 1, "the prefill to start")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE_S)
        took = time.monotonic() - t0
        th.join(DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert proc.returncode in (0, -signal.SIGTERM), stderr[-2000:]
    assert took < 5, took  # the two 0.5 s waits, not the 6 s prefill step
    assert "Traceback" not in stderr and "Exception in ASGI application" not in stderr, stderr[-2000:]
    if stream:
        assert out["status"] == 200 and out["error"] == "server_shutting_down"
    else:
        assert out["r"].status_code == 503, out["r"].text
        assert out["r"].json()["error"]["code"] == "server_shutting_down"
    rows = telemetry.events()
    assert [(r["finish_reason"], r["status"], r["error"].split(":")[0]) for r in rows] == [
        ("shutdown", 503, "server_shutting_down")]


def test_request_timeout_cuts_generation(paced_llm):
    llm = paced_llm
    with live(llm, request_timeout_s=0.3) as base:
        r = httpx.post(base + "/v1/completions", json={"prompt": "the hat", "max_tokens": LONG, "temperature": 0},
                       timeout=DEADLINE_S)
        assert r.status_code == 200
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert 0 < body["usage"]["completion_tokens"] < LONG
    telemetry.flush()
    assert [r["finish_reason"] for r in telemetry.events() if r["source"] == "server"] == ["timeout"]


def test_request_timeout_stops_a_long_prefill(llm, monkeypatch):
    """The worker asked whether to stop only after the first sampled token: --timeout 1 on a 2000-word prompt
    waited 3.8 s for the whole prefill. The prefill now stops between chunks, and the answer is the one a timeout
    during decode gives: 200 with finish_reason "length", recorded as "timeout"."""
    forward = llm.model.forward

    def paced(tokens, *args, **kwargs):  # 2 ms a token: the prompt's prefill lasts 3 s on any machine
        time.sleep(0.002 * len(tokens))
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", paced)
    llm.reset()
    with live(llm, request_timeout_s=0.3) as base:
        t0 = time.monotonic()
        r = httpx.post(base + CMPL, json={"prompt": [66] * LONG, "max_tokens": 8, "temperature": 0},
                       timeout=DEADLINE_S)
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"] == ""
        assert body["usage"]["completion_tokens"] == 0
        assert took < 1.5, took  # 0.3 s, one chunk in flight (64 tokens, 0.13 s) and slack for a loaded machine
    telemetry.flush()
    rows = [r for r in telemetry.events() if r["source"] == "server"]
    assert [(r["finish_reason"], r["status"], r["error"]) for r in rows] == [("timeout", 200, None)]


def test_out_of_range_server_settings_are_refused_before_serving(llm, capsys):
    """A negative --max-tokens-cap or a --timeout <= 0 used to start a server that failed (500) or timed out every
    request; --max-queue -1 and --port 70000 ended `edgert serve` in a traceback."""
    from edgert import InvalidArgumentError
    from edgert.cli import main

    for kw in ({"max_tokens_cap": -5}, {"max_tokens_cap": 0}, {"request_timeout_s": 0}, {"request_timeout_s": -1},
               {"request_timeout_s": float("nan")}, {"max_queue": -1}, {"max_queue": 1.5},
               {"shutdown_timeout_s": -1}, {"shutdown_timeout_s": float("inf")}):
        with pytest.raises(InvalidArgumentError):
            create_app(llm, **kw)
    for args in (["--port", "70000"], ["--max-queue", "-1"], ["--max-tokens-cap", "-5"], ["--timeout", "0"],
                 ["--shutdown-timeout", "nan"]):
        capsys.readouterr()
        assert main(["serve", str(llm.path), "--n-ctx", "64", *args]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("edgert: error: ") and "Traceback" not in "\n".join(err), err


def test_serve_that_cannot_listen_says_so_in_one_line_before_loading_the_model(llm, tmp_path):
    """On a port in use (or a --host that does not resolve) serve loaded the model, then exited 3 with uvicorn's
    'ERROR: [Errno 98] address already in use'. It binds first now: exit 1 and one edgert error line."""
    env = {"EDGERT_HOME": str(tmp_path)}
    with socket.socket() as held:  # the port another server holds
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # the second model does not exist: the listen error comes first, so the model was never loaded
        for model in (str(llm.path), str(tmp_path / "missing.gguf")):
            r = edgert_cmd("serve", model, "--port", str(port), env=env, timeout=60)
            assert r.returncode == 1, r.stderr
            assert r.stderr.splitlines() == [f"edgert: error: cannot listen on 127.0.0.1:{port}: "
                                             "Address already in use"], r.stderr
    r = edgert_cmd("serve", str(llm.path), "--host", "no-such-host.invalid", "--port", "0", env=env, timeout=60)
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("edgert: error: cannot listen on no-such-host.invalid:0: "), line


def test_a_bad_cost_override_stops_serve_before_it_starts(tmp_path, capsys, monkeypatch):
    """EDGERT_POWER_W=nan (or negative) gave every event a NaN (negative) energy and cost; `edgert serve` now
    refuses it before loading the model (the model named here does not exist), naming the variable."""
    from edgert.cli import main

    monkeypatch.setattr(telemetry, "_host_cost", None)
    monkeypatch.setenv("EDGERT_POWER_W", "nan")
    assert main(["serve", str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "edgert: error: EDGERT_POWER_W must be a finite number >= 0, got 'nan': fix or unset it"


def test_usage_never_exceeds_n_ctx(llm):
    """usage.total_tokens reached n_ctx + 1 when a generation filled the context."""
    with LLM(str(llm.path), n_ctx=16, threads=1) as small:
        assert create_app(small).state.server.model_id == small.model_id == llm.path.stem
        with live(small) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
            totals = [client.post(CMPL, json={"prompt": [5] * n, "max_tokens": 100, "seed": seed, "top_k": 0})
                      .json()["usage"]["total_tokens"] for n in (13, 14, 15) for seed in range(3)]
    assert max(totals) == small.n_ctx, totals


def test_max_tokens_cap(llm):
    with live(llm, max_tokens_cap=5) as base:
        r = httpx.post(base + "/v1/completions", json={"prompt": "the hat", "max_tokens": 50, "temperature": 0},
                       timeout=DEADLINE_S).json()
        assert r["usage"]["completion_tokens"] <= 5


# ---- bad input ----

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD = [
    ("malformed json", "POST", CHAT, b'{"messages": [', 400, "invalid_json"),
    ("empty body", "POST", CHAT, b"", 400, "invalid_json"),
    ("body is a list", "POST", CHAT, [1, 2], 400, "invalid_type"),
    ("no messages", "POST", CHAT, {"model": "tiny"}, 400, "missing_required_parameter"),
    ("empty messages", "POST", CHAT, {"messages": []}, 400, "empty_array"),
    ("messages not a list", "POST", CHAT, {"messages": "hi"}, 400, "invalid_type"),
    ("message not an object", "POST", CHAT, {"messages": ["hi"]}, 400, "invalid_type"),
    ("bad role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ("content is a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    ("image content part", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported_value"),
    ("text part without text", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "invalid_value"),
    ("user a number", "POST", CHAT, {"messages": MSG, "user": 5}, 400, "invalid_type"),
    ("store a string", "POST", CHAT, {"messages": MSG, "store": "yes"}, 400, "invalid_type"),
    ("top_logprobs true", "POST", CHAT, {"messages": MSG, "top_logprobs": True}, 400, "invalid_type"),
    ("temperature a string", "POST", CHAT, {"messages": MSG, "temperature": "hot"}, 400, "invalid_type"),
    ("temperature too high", "POST", CHAT, {"messages": MSG, "temperature": 3}, 400, "invalid_value"),
    ("top_p negative", "POST", CHAT, {"messages": MSG, "top_p": -0.1}, 400, "invalid_value"),
    ("min_p above 1", "POST", CHAT, {"messages": MSG, "min_p": 1.1}, 400, "invalid_value"),
    ("max_tokens zero", "POST", CHAT, {"messages": MSG, "max_tokens": 0}, 400, "invalid_value"),
    ("max_tokens a string", "POST", CHAT, {"messages": MSG, "max_tokens": "5"}, 400, "invalid_type"),
    ("max_tokens a float", "POST", CHAT, {"messages": MSG, "max_tokens": 5.5}, 400, "invalid_type"),
    ("seed a string", "POST", CHAT, {"messages": MSG, "seed": "x"}, 400, "invalid_type"),
    ("n=2", "POST", CHAT, {"messages": MSG, "n": 2}, 400, "unsupported_value"),
    ("n true", "POST", CHAT, {"messages": MSG, "n": True}, 400, "invalid_type"),
    ("n a float", "POST", CHAT, {"messages": MSG, "n": 1.0}, 400, "invalid_type"),
    ("best_of true", "POST", CMPL, {"prompt": "the", "best_of": True}, 400, "invalid_type"),  # was taken as 1
    ("best_of 2", "POST", CMPL, {"prompt": "the", "best_of": 2}, 400, "unsupported_value"),
    ("include_usage a string", "POST", CHAT, {"messages": MSG, "stream": True, "stream_options": {"include_usage": "no"}},
     400, "invalid_type"),
    ("stream a string", "POST", CHAT, {"messages": MSG, "stream": "yes"}, 400, "invalid_type"),
    ("five stop strings", "POST", CHAT, {"messages": MSG, "stop": list("abcde")}, 400, "invalid_value"),
    ("stop a number", "POST", CHAT, {"messages": MSG, "stop": 3}, 400, "invalid_type"),
    ("logprobs", "POST", CHAT, {"messages": MSG, "logprobs": True}, 400, "unsupported_value"),
    ("tools", "POST", CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "unsupported_value"),
    ("json mode", "POST", CHAT, {"messages": MSG, "response_format": {"type": "json_object"}}, 400,
     "unsupported_value"),
    ("unknown model", "POST", CHAT, {"model": "gpt-4o", "messages": MSG}, 404, "model_not_found"),
    ("model a number", "POST", CHAT, {"model": 4, "messages": MSG}, 400, "invalid_type"),
    ("prompt longer than the context", "POST", CHAT, {"messages": [{"role": "user", "content": "x" * 5000}]}, 400,
     "context_length_exceeded"),
    # 4.2 M characters reached the template sandbox's size limit, which blamed the model's template (invalid_value)
    ("message of millions of characters", "POST", CHAT, {"messages": [{"role": "user", "content": "a" * 4_200_000}]},
     400, "context_length_exceeded"),
    # one private-use code point in every block of 1000 code points, 1000 messages: the chat template's sentinel
    # search ran past U+10FFFF (500 internal_error)
    ("private-use code points in every sentinel block", "POST", CHAT,
     {"messages": [{"role": "user", "content": "".join(map(chr, range(0xF0000, 0x110000, 1000)))}]
      + [{"role": "user", "content": "hi"}] * 999}, 400, "context_length_exceeded"),
    ("more messages than n_ctx", "POST", CHAT, {"messages": [{"role": "user", "content": ""}] * 250_000}, 400,
     "context_length_exceeded"),
    ("completion prompt of millions of characters", "POST", CMPL, {"prompt": "a" * 4_200_000}, 400,
     "context_length_exceeded"),
    ("completion without prompt", "POST", CMPL, {"max_tokens": 3}, 400, "missing_required_parameter"),
    ("empty prompt", "POST", CMPL, {"prompt": ""}, 400, "empty_prompt"),
    ("prompt a dict", "POST", CMPL, {"prompt": {"a": 1}}, 400, "invalid_type"),
    ("two prompts", "POST", CMPL, {"prompt": ["a", "b"]}, 400, "unsupported_value"),
    ("token id out of vocabulary", "POST", CMPL, {"prompt": [1, 99999]}, 400, "invalid_value"),
    ("long completion prompt", "POST", CMPL, {"prompt": "x" * 5000}, 400, "context_length_exceeded"),
    ("echo", "POST", CMPL, {"prompt": "the", "echo": True}, 400, "unsupported_value"),
    # 0 == 0.0 == False in Python: these passed as "not asked" (and a completion's logprobs: 0 asks for them)
    ("completion logprobs 0", "POST", CMPL, {"prompt": "the", "logprobs": 0}, 400, "unsupported_value"),
    ("logprobs 0.0", "POST", CHAT, {"messages": MSG, "logprobs": 0.0}, 400, "invalid_type"),
    ("echo 0", "POST", CMPL, {"prompt": "the", "echo": 0}, 400, "invalid_type"),
    ("suffix a number", "POST", CMPL, {"prompt": "the", "suffix": 5}, 400, "invalid_type"),
    ("suffix", "POST", CMPL, {"prompt": "the", "suffix": "end"}, 400, "unsupported_value"),
    ("tokenize without content", "POST", "/tokenize", {"text": "x"}, 400, "invalid_type"),
    ("detokenize strings", "POST", "/detokenize", {"tokens": ["a"]}, 400, "invalid_type"),
    ("detokenize out of vocabulary", "POST", "/detokenize", {"tokens": [-1]}, 400, "invalid_value"),
    ("JSON nested deeper than the stack", "POST", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("temperature a 400-digit integer", "POST", CHAT, {"messages": MSG, "temperature": 10 ** 400}, 400,
     "invalid_value"),
    ("presence_penalty a 400-digit integer", "POST", CHAT, {"messages": MSG, "presence_penalty": -10 ** 400}, 400,
     "invalid_value"),
    ("lone surrogate in content", "POST", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400,
     "invalid_value"),
    ("lone surrogate in a content part", "POST", CHAT,
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', 400, "invalid_value"),
    ("lone surrogate in prompt", "POST", CMPL, b'{"prompt": "\\ud83d the"}', 400, "invalid_value"),
    ("lone surrogate to tokenize", "POST", "/tokenize", b'{"content": "\\ud800"}', 400, "invalid_value"),
    ("GET on a POST route", "GET", CHAT, None, 405, "method_not_allowed"),
    ("unknown route", "GET", "/v1/nothing", None, 404, "not_found"),
    ("unknown model card", "GET", "/v1/models/gpt-4o", None, 404, "model_not_found"),
]


def test_malformed_requests_get_openai_style_4xx(llm):
    with live(llm) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        failures = []
        for name, method, path, body, status, code in BAD:
            if isinstance(body, bytes):
                r = client.request(method, path, content=body, headers={"content-type": "application/json"})
            else:
                r = client.request(method, path, json=body) if body is not None else client.request(method, path)
            try:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]
                assert (r.status_code, err["code"]) == (status, code)
            except (AssertionError, ValueError, KeyError):
                failures.append((name, r.status_code, r.text[:200]))
        assert not failures, failures
        r = client.get(CHAT)  # a 405 names the methods the route takes
        assert r.status_code == 405 and r.headers.get("allow") == "POST", dict(r.headers)
        ok = client.post(CHAT, json={"messages": MSG, "max_tokens": 2})
        assert ok.status_code == 200  # the server is alive and serving after all of them
        assert client.get("/health").json()["queue_depth"] == 0
        assert metric(base, 'edgert_errors_total{endpoint="/v1/chat/completions",code="invalid_json"}') == 3
        assert metric(base, 'edgert_requests_total{endpoint="/v1/chat/completions",status="500"}') == 0


def test_chunked_body_is_cut_at_the_limit_not_buffered_whole(llm):
    """A body sent without Content-Length (chunked) is refused once it passes MAX_BODY_BYTES, without reading the
    rest: a client must not make the server hold an unbounded body in memory."""
    from starlette.requests import Request

    from edgert.serve import app as app_mod
    from edgert.serve.schemas import APIError

    server = create_app(llm, model_id="tiny").state.server
    chunk = b" " * (1 << 20)
    received = 0

    async def receive():
        nonlocal received
        received += 1
        return {"type": "http.request", "body": chunk, "more_body": received < 64}

    request = Request({"type": "http", "method": "POST", "path": CHAT, "headers": []}, receive)
    with pytest.raises(APIError) as ei:
        asyncio.run(server.json_body(request))
    assert ei.value.status == 413 and ei.value.code == "body_too_large"
    assert received <= app_mod.MAX_BODY_BYTES // len(chunk) + 1

    # a client gone mid-body is answered as a client error, not raised as ClientDisconnect (which the server
    # logged as an 'Exception in ASGI application' traceback, once per such client)
    messages = iter([{"type": "http.request", "body": b'{"prompt": ', "more_body": True}, {"type": "http.disconnect"}])

    async def gone():
        return next(messages)

    request = Request({"type": "http", "method": "POST", "path": CMPL, "headers": []}, gone)
    with pytest.raises(APIError) as ei:
        asyncio.run(server.json_body(request))
    assert ei.value.status == 499 and ei.value.code == "client_disconnected"


def test_api_key_enforced(llm):
    from openai import AuthenticationError, OpenAI

    with live(llm, api_key="sekrit") as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        body = {"messages": MSG, "max_tokens": 2}
        r = client.post(CHAT, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = client.post(CHAT, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        assert client.post("/tokenize", json={"content": "x"}).status_code == 401
        assert client.post(CHAT, json=body, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert client.get("/health").status_code == 200  # probes stay open
        good = OpenAI(base_url=base + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()


def test_metrics_label_the_route_not_the_clients_path(llm):
    """The endpoint label was the request's decoded path: a quote in it broke the Prometheus text (a strict scraper
    rejects the page) and every distinct path made a new series."""
    with live(llm) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        for tail in ('a%22%7D%20999%20%23', "b", "c%20d"):
            assert client.get("/v1/models/" + tail).status_code == 404
        text = client.get("/metrics").text
    series = [ln for ln in text.splitlines() if ln.startswith("edgert_requests_total{")]
    assert 'edgert_requests_total{endpoint="/v1/models/{model}",status="404"} 3' in series, series
    assert not any('999' in ln or '"/v1/models/a' in ln for ln in text.splitlines())
    for ln in text.splitlines():  # every sample line: name{labels} value, the labels' quotes balanced
        if ln and not ln.startswith("#"):
            name_labels, value = ln.rsplit(" ", 1)
            float(value)
            assert name_labels.count('"') % 2 == 0 and " " not in name_labels.split("{", 1)[0], ln


# ---- telemetry and report ----

def test_telemetry_rows_match_requests_and_report(llm, tmp_path):
    from edgert.cli import main

    made = []
    with live(llm) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        for i in range(3):
            r = client.post(CHAT, json={"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 3 + i})
            made.append((r.json()["id"], 200, r.json()["usage"]))
        r = client.post(CMPL, json={"prompt": "the", "max_tokens": 4})
        made.append((r.headers["x-request-id"], 200, r.json()["usage"]))
        r = client.post(CHAT, json={"messages": []})
        assert r.status_code == 400
        rejected = [r.headers["x-request-id"]]  # error responses carry it too (docs said every response did)
        # a prompt refused once tokenized records its tokens (0 before), as a queue_full rejection does
        r = client.post(CMPL, json={"prompt": [1] * llm.n_ctx})
        assert r.json()["error"]["code"] == "context_length_exceeded"
        rejected.append(r.headers["x-request-id"])
        with client.stream("POST", CMPL, json={"prompt": "the", "max_tokens": 5, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: {")]
            assert s.headers["x-request-id"] == json.loads(lines[0][6:])["id"]  # and streams
        sid = json.loads(lines[0][6:])["id"]
    assert telemetry.flush()
    rows = [r for r in telemetry.events() if r["source"] == "server"]
    assert len(rows) == 7
    by_id = {r["request_id"]: r for r in rows}
    for rid, status, usage in made:
        row = by_id[rid]
        assert row["status"] == status and row["error"] is None
        assert row["prompt_tokens"] == usage["prompt_tokens"]
        assert row["completion_tokens"] == usage["completion_tokens"]
        assert row["model"] == "tiny" and row["prefill_s"] > 0 and row["ttft_s"] > 0
        assert row["latency_s"] >= row["ttft_s"] >= row["queue_wait_s"] >= 0
    assert by_id[sid]["completion_tokens"] <= 5 and by_id[sid]["endpoint"] == CMPL
    bad = [by_id[rid] for rid in rejected]
    assert all(r["status"] == 400 and r["error"] and r["finish_reason"] == "rejected" for r in bad)
    assert [r["prompt_tokens"] for r in bad] == [0, llm.n_ctx] and bad[1]["completion_tokens"] == 0

    rep = telemetry.query()[0]
    assert rep["requests"] == 7 and rep["error_rate"] == pytest.approx(2 / 7)
    assert rep["latency_p50_s"] == pytest.approx(np.percentile([r["latency_s"] for r in rows], 50))
    assert rep["latency_p95_s"] == pytest.approx(np.percentile([r["latency_s"] for r in rows], 95))
    ok = [r for r in rows if not r["error"]]
    assert rep["ttft_p50_s"] == pytest.approx(np.percentile([r["ttft_s"] for r in ok], 50))
    busy = sum(r["prefill_s"] + r["decode_s"] for r in ok)
    assert rep["tokens_per_s"] == pytest.approx(sum(r["completion_tokens"] for r in rows) / busy)
    cost = telemetry.host_cost_model()
    assert rep["energy_j"] == pytest.approx(cost.power_w * busy)
    total_tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert rep["prompt_tokens"] + rep["completion_tokens"] == total_tokens
    assert rep["cost_per_1m_tokens_usd"] == pytest.approx(cost.cost_usd(busy) / total_tokens * 1e6)

    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["report", "--format", "json", "--by", "model"]) == 0
    (cli_row,) = json.loads(buf.getvalue())
    assert cli_row["model"] == "tiny" and cli_row["requests"] == 7
    assert cli_row["latency_p95_s"] == pytest.approx(rep["latency_p95_s"])


def test_server_telemetry_off(llm, monkeypatch):
    monkeypatch.setenv("EDGERT_TELEMETRY", "0")
    with live(llm) as base:
        assert httpx.post(base + CMPL, json={"prompt": "the", "max_tokens": 2}, timeout=DEADLINE_S).status_code == 200
    telemetry.flush()
    assert telemetry.events() == []


def test_a_finished_job_frees_the_worker_before_its_answer_goes_out(llm):
    """The worker sent the answer and ran the bookkeeping before it marked itself free: with --max-queue 0 a client
    sending its next request the moment it had the answer could get 503 from an idle server (1 in ~1100)."""
    import asyncio

    from edgert.serve.scheduler import Scheduler

    sched = Scheduler(llm, max_queue=0)
    seen = []

    async def main():
        sched.start()
        try:
            for _ in range(3):
                job = sched.submit(llm.tokenize("the cat"), {"max_tokens": 1, "temperature": 0}, 30.0,
                                   on_done=lambda job, outcome: seen.append(sched.running))
                async for _ in job.pieces():
                    pass
                assert sched.running is None  # free once the answer is out
        finally:
            await asyncio.get_running_loop().run_in_executor(None, sched.stop)

    asyncio.run(main())
    assert seen == [None, None, None]


def test_a_request_after_close_gets_503_and_one_app_serves_two_lifespans(llm):
    """After SIGTERM (the scheduler closed, its idle worker gone), a request whose body finished arriving restarted
    the worker thread: RuntimeError "threads can only be started once", a 500 without a request id. It gets 503
    server_shutting_down now. And an app's second lifespan (a test client entered twice) failed at startup the same
    way; it serves again."""
    from starlette.testclient import TestClient

    app = create_app(llm, model_id="tiny", telemetry=False)
    body = {"messages": MSG, "max_tokens": 2, "temperature": 0}
    with TestClient(app) as client:
        assert client.post(CHAT, json=body).status_code == 200
        sched = app.state.server.scheduler
        sched.close()  # run_server's first step on SIGTERM
        sched._thread.join(DEADLINE_S)
        r = client.post(CHAT, json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert r.headers["x-request-id"].startswith("chatcmpl-") and r.headers["retry-after"]
    for _ in range(2):
        with TestClient(app) as client:
            r = client.post(CHAT, json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == solo_chat(llm, "hi", 2)


def test_metrics_count_an_answer_before_the_client_has_it(llm):
    """The worker answered first and counted after: /metrics read the moment a response arrived missed it (14 of
    30 in a row)."""
    from starlette.testclient import TestClient

    with TestClient(create_app(llm, model_id="tiny")) as client:  # in process: the answer arrives soonest
        series = 'edgert_requests_total{endpoint="/v1/completions",status="200"} '
        for i in range(1, 31):
            r = client.post(CMPL, json={"prompt": "the", "max_tokens": 1, "temperature": 0})
            assert r.status_code == 200
            assert series + str(i) in client.get("/metrics").text.splitlines(), i  # the same connection: at once


def test_routing_errors_are_counted_and_a_completion_routes_405_has_a_request_id(llm):
    """404s and 405s are answered by routing, before the endpoints that count requests: they were in no
    edgert_requests_total series, and a GET on a completion endpoint had no x-request-id."""
    with live(llm) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        r = client.get(CHAT)
        assert r.status_code == 405 and "POST" in r.headers["allow"]
        assert r.headers["x-request-id"].startswith("chatcmpl-")
        assert client.get(CMPL).headers["x-request-id"].startswith("cmpl-")
        assert client.get("/v1/nope").status_code == 404 and client.get("/nope/x").status_code == 404
        assert client.post("/health").status_code == 405
        text = client.get("/metrics").text
    series = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
              if ln.startswith("edgert_requests_total{")}
    assert series == {'edgert_requests_total{endpoint="/v1/chat/completions",status="405"}': 1,
                      'edgert_requests_total{endpoint="/v1/completions",status="405"}': 1,
                      'edgert_requests_total{endpoint="other",status="404"}': 2}, series


def test_a_client_gone_mid_body_is_no_server_error_in_the_report(llm):
    """A client that hung up mid-body was recorded with an error (the report's error rate grew with each), while
    one gone mid-generation is not: both are 499s the server did nothing wrong in."""
    with live(llm) as base:
        host, port = base.rsplit("/", 1)[1].split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(f"POST {CMPL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100\r\n\r\n{\"prompt\": ".encode())
                time.sleep(0.05)
        wait_for(lambda: metric(base, 'edgert_requests_total{endpoint="/v1/completions",status="499"}') == 3,
                 "three 499s")
    telemetry.flush()
    rows = [r for r in telemetry.events() if r["source"] == "server"]
    assert len(rows) == 3 and all(r["status"] == 499 and r["error"] is None for r in rows), rows


def test_a_body_that_stalls_is_answered_408(llm, monkeypatch):
    """A client that sent its headers and part of its body held the connection and its request for ever (50 such
    clients stayed open indefinitely); the body now has BODY_TIMEOUT_S to arrive."""
    from edgert.serve import app as app_mod

    monkeypatch.setattr(app_mod, "BODY_TIMEOUT_S", 0.5)
    with live(llm) as base:
        host, port = base.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
            s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100\r\n\r\n{\"messages\": ".encode())
            t0 = time.monotonic()
            head = s.recv(65536).decode()
            waited = time.monotonic() - t0
            while "body_timeout" not in head:  # the head and the body may come in two reads
                more = s.recv(65536).decode()
                if not more:
                    break
                head += more
        assert head.startswith("HTTP/1.1 408 ") and "body_timeout" in head and "x-request-id: chatcmpl-" in head
        assert 0.4 < waited < DEADLINE_S / 2
        assert metric(base, 'edgert_requests_total{endpoint="/v1/chat/completions",status="408"}') == 1


def test_a_known_models_file_served_by_path_answers_to_the_models_name(tmp_path):
    """`edgert serve ~/.cache/edgert/models/SmolLM2-135M-Instruct.Q4_1.gguf` answered 404 to model
    'smollm2-135m', the name the README's client example uses (its id is the file's stem)."""
    from starlette.testclient import TestClient

    from edgert.llm.store import KNOWN_MODELS

    km = KNOWN_MODELS["smollm2-135m"]
    path = tmp_path / km.filename  # a tiny model under the known file's name
    write_tiny_llama(path, fmt="q4_0", ctx=64)
    with LLM(str(path), n_ctx=64, threads=1) as model:
        with TestClient(create_app(model, telemetry=False)) as client:
            for name, status in (("smollm2-135m", 200), (path.stem, 200), ("gpt-4o", 404)):
                r = client.post(CHAT, json={"model": name, "messages": MSG, "max_tokens": 1})
                assert r.status_code == status, (name, r.text)
            assert client.get("/v1/models/smollm2-135m").status_code == 200
