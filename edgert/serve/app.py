"""The OpenAI-compatible HTTP server: a Starlette app over one loaded LLM.

``create_app(llm, ...)`` returns an ASGI app; ``run_server`` runs it under uvicorn with a bounded shutdown (``edgert
serve`` does). Handlers read the body on the event loop and validate, render and tokenize in a thread (a request of
megabytes takes seconds of that), hand generations to the Scheduler's worker thread, and stream pieces back as
server-sent events in the OpenAI chunk format. Health and metrics never wait for the model or for another request's
preparation. Every completion request that passes authentication records one telemetry event when it ends (from the
worker thread for generations, so a client that disconnected is still counted with the tokens it cost).

This module must not run model code or tokenize on the event loop, and must not decide sampling semantics
(schemas.py does).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import telemetry as telemetry_mod
from ..llm.store import KNOWN_MODELS
from ..errors import ContextLengthError, EdgertError, InvalidArgumentError
from .schemas import APIError, GenerationRequest, _is_int, bad, parse_detokenize, parse_generation, parse_tokenize
from .scheduler import Job, JobOutcome, QueueFullError, Scheduler, ShuttingDownError

DEFAULT_MAX_QUEUE = 64
_FLOAT_MAX = sys.float_info.max
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 8 << 20
BODY_TIMEOUT_S = 30.0  # from the headers to the body's last byte
RETRY_AFTER_S = 1
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Prometheus counters, gauges and histograms, updated from the loop and the worker thread under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.bytes_copied = 0
        self.finished: dict[str, int] = {}
        self.latency = Histogram()
        self.ttft = Histogram()
        self.queue_wait = Histogram()

    def request(self, endpoint: str, status: int, error_code: str | None = None) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            if status >= 400:
                key = (endpoint, error_code or str(status))
                self.errors[key] = self.errors.get(key, 0) + 1

    def generation(self, prompt_tokens, completion_tokens, latency_s, ttft_s, queue_wait_s, finish, bytes_copied):
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.bytes_copied += bytes_copied
            self.finished[finish] = self.finished.get(finish, 0) + 1
            self.latency.observe(latency_s)
            self.queue_wait.observe(queue_wait_s)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)

    @staticmethod
    def _label(v) -> str:
        """A Prometheus label value, escaped as the text format says (backslash, double quote, line feed)."""
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    def render(self, scheduler: Scheduler, model_id: str) -> str:
        q = self._label
        with self.lock:
            L = ["# HELP edgert_model_loaded 1 while a model is loaded and served.", "# TYPE edgert_model_loaded gauge",
                 f'edgert_model_loaded{{model="{q(model_id)}"}} 1',
                 "# HELP edgert_queue_depth Requests waiting for the model.", "# TYPE edgert_queue_depth gauge",
                 f"edgert_queue_depth {scheduler.queue_depth}",
                 "# HELP edgert_requests_running Generations running now (0 or 1).",
                 "# TYPE edgert_requests_running gauge", f"edgert_requests_running {int(scheduler.running is not None)}",
                 "# HELP edgert_requests_total HTTP requests by endpoint and status.", "# TYPE edgert_requests_total counter"]
            L += [f'edgert_requests_total{{endpoint="{q(e)}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
            L += ["# HELP edgert_errors_total Requests answered with an error, by endpoint and error code.",
                  "# TYPE edgert_errors_total counter"]
            L += [f'edgert_errors_total{{endpoint="{q(e)}",code="{q(c)}"}} {n}' for (e, c), n in sorted(self.errors.items())]
            L += ["# HELP edgert_generations_total Generations by finish reason (stop, length, cancelled, timeout, error, shutdown).",
                  "# TYPE edgert_generations_total counter"]
            L += [f'edgert_generations_total{{finish_reason="{f}"}} {n}' for f, n in sorted(self.finished.items())]
            L += ["# HELP edgert_prompt_tokens_total Prompt tokens of finished generations.",
                  "# TYPE edgert_prompt_tokens_total counter", f"edgert_prompt_tokens_total {self.prompt_tokens}",
                  "# HELP edgert_completion_tokens_total Tokens generated (cancelled generations included).",
                  "# TYPE edgert_completion_tokens_total counter",
                  f"edgert_completion_tokens_total {self.completion_tokens}",
                  "# HELP edgert_bytes_copied_total Bytes copied between host and device buffers.",
                  "# TYPE edgert_bytes_copied_total counter", f"edgert_bytes_copied_total {self.bytes_copied}"]
            for name, h, what in (("edgert_request_duration_seconds", self.latency, "Arrival to last token."),
                                  ("edgert_time_to_first_token_seconds", self.ttft, "Arrival to first token."),
                                  ("edgert_queue_wait_seconds", self.queue_wait, "Time waiting for the model.")):
                L += [f"# HELP {name} {what}", f"# TYPE {name} histogram"] + h.lines(name)
        return "\n".join(L) + "\n"


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: retry on another instance or once it is back", None,
                    "server_shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})


RID_PREFIX = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl"}  # request ids: OpenAI's prefixes


def _recorded_error(err: APIError | None) -> str | None:
    """The telemetry error of an answer: none for a success, nor for a client that went away (499: no error of
    the server's, whether it left mid-body or mid-generation)."""
    return None if err is None or err.status == 499 else f"{err.code}: {err.message}"


def _with_request_id(headers: dict, rid: str | None) -> dict:
    """``headers`` plus, when there is one, the generation request's id as ``x-request-id`` (last): every answer to a
    generation request carries it, its errors and streams too."""
    return {**headers, "x-request-id": rid} if rid else dict(headers)


def _error_response(err: APIError, rid: str | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=_with_request_id(err.headers, rid))


async def _watch_disconnect(receive, job: Job) -> None:
    """Cancels the job when the client goes away (the body is already read, so the next message is the disconnect)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            job.cancel()
            return


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that watches for the client's disconnect itself (whatever the ASGI server's spec version)
    and cancels the generation behind it, at once rather than at the next write."""

    def __init__(self, content, job: Job, rid: str):
        super().__init__(content, media_type="text/event-stream", headers=_with_request_id(SSE_HEADERS, rid))
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(_watch_disconnect(receive, self.job))
        try:
            await self.stream_response(send)
        except OSError:  # the client went away mid-write
            self.job.cancel()
        except asyncio.CancelledError:  # the shutdown timeout passed while a write waited for a client not reading:
            self.job.cancel("shutdown")  # end it there (uvicorn closes the connection), no traceback
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op when the job has ended


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Server:
    def __init__(self, llm, api_key, max_queue, request_timeout_s, telemetry, max_tokens_cap, model_id,
                 shutdown_timeout_s):
        self.llm = llm
        self.api_key = api_key
        self.request_timeout_s = float(request_timeout_s)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self.telemetry = telemetry
        self.max_tokens_cap = int(max_tokens_cap or llm.n_ctx)
        path = Path(str(getattr(llm, "path", llm.name)))
        self.model_id = model_id or llm.model_id
        self.model_aliases = {self.model_id, str(llm.name), path.name, path.stem, str(path)}
        # a known model's file served by its path answers to the model's name too (the README's client uses it)
        self.model_aliases |= {km.name for km in KNOWN_MODELS.values() if km.filename == path.name}
        try:
            self.created = int(path.stat().st_mtime)
        except OSError:
            self.created = int(time.time())
        self.scheduler = Scheduler(llm, max_queue=max_queue)
        self.metrics = Metrics()
        self.fingerprint = "edgert-" + uuid.uuid5(uuid.NAMESPACE_URL, str(path)).hex[:8]

    # ---- plumbing ----

    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "missing_api_key")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")

    async def json_body(self, request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", None, "body_too_large")
        # read chunk by chunk and stop at the limit: a chunked body (no Content-Length) must not be buffered whole
        chunks = []

        async def read():
            n = 0
            async with contextlib.aclosing(request.stream()) as stream:
                async for chunk in stream:
                    n += len(chunk)
                    if n > MAX_BODY_BYTES:
                        raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", None, "body_too_large")
                    chunks.append(chunk)

        try:  # a client that stalls mid-body held its connection (and its request) open for ever
            await asyncio.wait_for(read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s", None, "body_timeout") from None
        except ClientDisconnect:  # gone mid-body: nobody to answer, and no server error (traceback) to log
            raise APIError(499, "the client disconnected before sending the whole body", None,
                           "client_disconnected") from None
        raw = b"".join(chunks)
        if not raw.strip():
            raise bad("the request body is empty: send a JSON object", None, "invalid_json")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
        except RecursionError:  # arrays/objects nested deeper than the interpreter's stack
            raise bad("the request body is not valid JSON: nested too deeply", None, "invalid_json") from None

    def record(self, **event) -> None:
        if self.telemetry and telemetry_mod.enabled():
            telemetry_mod.record({"source": "server", "model": self.model_id, **event})

    def stop(self) -> None:
        """The app's last step (lifespan shutdown): stop the worker (waiting up to shutdown_timeout_s), then write
        the telemetry still queued (up to flush's 5 s: the process may end by the signal that stopped it, and atexit
        handlers do not run then)."""
        self.scheduler.stop(timeout=self.shutdown_timeout_s)
        if self.telemetry:
            telemetry_mod.flush()

    # ---- endpoints ----

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "model_loaded": True,
                             "queue_depth": self.scheduler.queue_depth, "max_queue": self.scheduler.max_queue,
                             "running": int(self.scheduler.running is not None), "n_ctx": self.llm.n_ctx})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(self.scheduler, self.model_id),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgert",
                "n_ctx": self.llm.n_ctx}

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_key(request)
        if request.path_params["model"] not in self.model_aliases:
            raise APIError(404, f"model {request.path_params['model']!r} is not served here", "model",
                           "model_not_found")
        return JSONResponse(self.model_card())

    async def tokenize(self, request: Request) -> Response:
        self.check_key(request)
        content, add_special, parse_special = parse_tokenize(await self.json_body(request))
        tok = self.llm.tokenizer
        encode = tok.encode_special if parse_special else tok.encode
        return await asyncio.to_thread(lambda: JSONResponse({"tokens": encode(content, add_special=add_special)}))

    async def detokenize(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.json_body(request)
        vocab = self.llm.model.vocab_size
        return await asyncio.to_thread(
            lambda: JSONResponse({"content": self.llm.detokenize(parse_detokenize(body, vocab))}))

    async def chat_completions(self, request: Request) -> Response:
        return await self.complete(request, "chat", "/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, "completion", "/v1/completions")

    def prepare(self, body, kind: str) -> tuple[GenerationRequest, list[int]]:
        """The request and its prompt's token ids, not yet checked against n_ctx (run in a thread: rendering and
        tokenizing a long prompt take seconds)."""
        req = parse_generation(body, kind)
        if req.model is not None and req.model not in self.model_aliases:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {self.model_id!r}",
                           "model", "model_not_found")
        param = "messages" if kind == "chat" else "prompt"
        try:
            if kind == "chat":
                ids = self.llm.chat_tokens(req.messages)
            elif isinstance(req.prompt, list):
                vocab = self.llm.model.vocab_size
                if not all(0 <= t < vocab for t in req.prompt):
                    raise bad(f"prompt token ids must be in [0, {vocab})", "prompt")
                ids = list(req.prompt)
            else:
                self.llm.check_text_fits(len(req.prompt), "the prompt holds")
                # control-token spellings become control tokens, as in llama.cpp's server (docs/serve.md)
                ids = self.llm.tokenizer.encode_special(req.prompt, add_special=True)
        except ContextLengthError as exc:  # far too long for the context, found before rendering or tokenizing
            raise bad(str(exc), param, "context_length_exceeded") from None
        except EdgertError as exc:  # e.g. a chat template that refuses the message order
            raise bad(str(exc), param) from None
        if not ids:
            raise bad("the prompt is empty: give at least one token of text", param, "empty_prompt")
        return req, ids

    async def complete(self, request: Request, kind: str, endpoint: str) -> Response:
        t_arrival = time.monotonic()
        rid = telemetry_mod.new_request_id(RID_PREFIX[endpoint])
        try:
            self.check_key(request)
        except APIError as err:  # not recorded: unauthenticated requests are nobody's cost
            err.headers = _with_request_id(err.headers, rid)  # the endpoint's wrapper answers (and counts) it
            raise
        n_prompt = 0
        try:
            body = await self.json_body(request)
            req, ids = await asyncio.to_thread(self.prepare, body, kind)
            n_prompt = len(ids)
            if n_prompt >= self.llm.n_ctx:
                raise bad(f"the prompt has {n_prompt} tokens but this model's context holds {self.llm.n_ctx} (one "
                          "more token is needed to answer): shorten the prompt",
                          "messages" if kind == "chat" else "prompt", "context_length_exceeded")
            max_tokens = min(req.max_tokens or self.max_tokens_cap, self.max_tokens_cap)
            sampling = dict(req.sampling, max_tokens=max_tokens)
            try:
                self.scheduler.start()
                job = self.scheduler.submit(
                    ids, sampling, self.request_timeout_s, submitted=t_arrival,
                    on_done=lambda job, outcome: self.finish(rid, endpoint, job, outcome, t_arrival))
            except ShuttingDownError:
                raise _shutting_down() from None
            except QueueFullError as exc:
                raise APIError(503, f"the server is busy: {exc}; retry after {RETRY_AFTER_S}s", None, "queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except APIError as err:
            # prompt tokens as counted (0 when the prompt was never tokenized); the report leaves out the tokens of
            # requests that never ran
            self.metrics.request(endpoint, err.status, err.code)
            # a client gone mid-body (499) made no error of the server's, as one gone mid-generation (finish)
            self.record(request_id=rid, endpoint=endpoint, prompt_tokens=n_prompt, completion_tokens=0,
                        latency_s=time.monotonic() - t_arrival, finish_reason="rejected", status=err.status,
                        error=_recorded_error(err))
            return _error_response(err, rid)
        created = int(time.time())
        if req.stream:
            return _SSEResponse(self.sse(rid, created, req, job), job, rid)
        return await self.collect(request, rid, created, req, job)

    @staticmethod
    def outcome_error(out: JobOutcome) -> APIError | None:
        """The error an ended generation answers with (None: it answers with its text): one mapping for the
        response, the stream's last event, metrics and telemetry."""
        if out.error is not None:
            return APIError(500, f"the generation failed: {out.error}", None, "generation_failed")
        if out.finish_reason == "shutdown":
            return _shutting_down()
        if out.finish_reason == "timeout" and out.result is None:
            return APIError(503, "the request timed out waiting for the model", None, "timeout",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        if out.finish_reason == "cancelled":
            return APIError(499, "the client disconnected", None, "cancelled")
        return None

    def finish(self, rid, endpoint, job, out, t_arrival) -> None:
        """Metrics and telemetry for one ended generation (called on the worker thread, or on the event loop for a
        job cancelled while it waited)."""
        res = out.result
        t = getattr(res, "timings", None) or {}
        n_out = len(getattr(res, "tokens", None) or [])
        n_prompt = len(job.prompt_ids)
        latency = time.monotonic() - t_arrival
        err = self.outcome_error(out)
        status = 200 if err is None else err.status
        copied = int(t.get("bytes_copied", 0))
        self.metrics.request(endpoint, status, None if err is None else err.code)
        self.metrics.generation(n_prompt if res is not None else 0, n_out, latency, out.ttft_s, out.queue_wait_s,
                                out.finish_reason, copied)
        if out.error is not None:
            error = f"{type(out.error).__name__}: {out.error}"
        else:  # a client that went away (499) made no error of the server's
            error = _recorded_error(err)
        self.record(request_id=rid, endpoint=endpoint, prompt_tokens=n_prompt, completion_tokens=n_out,
                    queue_wait_s=out.queue_wait_s, ttft_s=out.ttft_s, prefill_s=t.get("prefill_s"),
                    decode_s=t.get("decode_s"), latency_s=latency, bytes_copied=copied,
                    finish_reason=out.finish_reason, status=status, error=error)

    @staticmethod
    def api_finish(reason: str) -> str:
        # a timeout cuts the answer like a max_tokens cap; telemetry keeps the real reason
        return "length" if reason == "timeout" else reason

    def usage(self, job: Job) -> dict:
        res = job.outcome.result if job.outcome else None
        n_out = len(getattr(res, "tokens", None) or [])
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_out,
                "total_tokens": len(job.prompt_ids) + n_out}

    async def collect(self, request: Request, rid, created, req: GenerationRequest, job: Job) -> Response:
        watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
        try:
            text = [piece async for piece in job.pieces()]
        except asyncio.CancelledError:
            # uvicorn cancels the handlers still open once the shutdown timeout has passed (the generation is in a
            # model step longer than that): answer as a shutdown, not with uvicorn's plain-text 500; the job ends,
            # and is recorded, on the worker or in Scheduler.stop
            job.cancel("shutdown")
            return _error_response(_shutting_down(), rid)
        finally:
            watcher.cancel()
            if job.outcome is None:  # this handler was cancelled (server shutdown): stop the generation
                job.cancel()
        out = job.outcome
        err = self.outcome_error(out)
        if err is not None:
            return _error_response(err, rid)
        finish = self.api_finish(out.finish_reason)
        content = "".join(text)
        if req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                             "system_fingerprint": self.fingerprint, "choices": [choice], "usage": self.usage(job)},
                            headers=_with_request_id({}, rid))

    async def sse(self, rid, created, req: GenerationRequest, job: Job):
        chat = req.kind == "chat"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model_id, "system_fingerprint": self.fingerprint}

        def chunk(piece=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice]})

        if chat:
            yield chunk(role=True)
        try:
            async for piece in job.pieces():
                yield chunk(piece)
        except asyncio.CancelledError:  # the shutdown timeout passed (see collect): the stream's last event says so
            job.cancel("shutdown")
            yield _sse(_shutting_down().body())
            yield "data: [DONE]\n\n"
            return
        err = self.outcome_error(job.outcome)
        if err is not None:
            yield _sse(err.body())
        else:
            yield chunk(finish=self.api_finish(job.outcome.finish_reason))
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": self.usage(job)})
        yield "data: [DONE]\n\n"


def check_settings(max_queue, request_timeout_s, max_tokens_cap,
                   shutdown_timeout_s=DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """InvalidArgumentError for a server setting out of range: it would start a server that fails every request (a
    negative cap reaches the generator as max_tokens, a timeout <= 0 expires every request on arrival) or never
    stops. ``edgert serve`` calls it before loading the model."""
    if not _is_int(max_queue) or max_queue < 0:
        raise InvalidArgumentError(f"max_queue must be an int >= 0, got {max_queue!r}")
    if max_tokens_cap is not None and (not _is_int(max_tokens_cap) or max_tokens_cap < 1):
        raise InvalidArgumentError(f"max_tokens_cap must be an int >= 1 or None, got {max_tokens_cap!r}")
    if (isinstance(request_timeout_s, bool) or not isinstance(request_timeout_s, (int, float))
            or not 0 < request_timeout_s < _FLOAT_MAX):  # an int beyond any float would overflow the deadline sum
        raise InvalidArgumentError(f"request_timeout_s must be a finite number of seconds > 0, got "
                                   f"{request_timeout_s!r}")
    if (isinstance(shutdown_timeout_s, bool) or not isinstance(shutdown_timeout_s, (int, float))
            or not 0 <= shutdown_timeout_s < _FLOAT_MAX):
        raise InvalidArgumentError(f"shutdown_timeout_s must be a finite number of seconds >= 0, got "
                                   f"{shutdown_timeout_s!r}")


def create_app(llm, *, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, telemetry: bool = True,
               max_tokens_cap: int | None = None, model_id: str | None = None,
               shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> Starlette:
    """The ASGI app serving ``llm`` (an edgert.llm.LLM). api_key: required as a Bearer token on /v1/* and
    /tokenize, /detokenize when set (EDGERT_API_KEY is read when None). max_queue: requests that may wait while one
    runs; more get 503. request_timeout_s: arrival to last token, queue wait included. max_tokens_cap: the most
    tokens one request may generate (default n_ctx); larger max_tokens are lowered to it. model_id: the name the
    API and telemetry give the model (default ``llm.model_id``). shutdown_timeout_s: how long ``run_server`` lets
    open responses finish once their generations are stopped, and the worker and telemetry writer take to stop."""
    if api_key is None:
        api_key = os.environ.get("EDGERT_API_KEY") or None
    check_settings(max_queue, request_timeout_s, max_tokens_cap, shutdown_timeout_s)
    server = Server(llm, api_key, max_queue, request_timeout_s, telemetry, max_tokens_cap, model_id,
                    shutdown_timeout_s)

    def endpoint(fn, route: str, counted: bool = True):
        """counted=False: the handler counts its own answers in edgert_requests_total (generations, when they end)."""
        async def wrapped(request: Request) -> Response:
            try:
                response = await fn(request)
            except APIError as err:
                # the route, not the request's path: a path is the client's to choose (a label with a quote broke
                # the Prometheus text, and every distinct path made a series of its own)
                server.metrics.request(route, err.status, err.code)
                return _error_response(err)
            if counted:
                server.metrics.request(route, response.status_code)
            return response
        return wrapped

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """404 (no route) and 405 (a route's other method), answered by routing before any endpoint: counted here,
        under the route (unknown paths together, as "other"); a completion endpoint's answer gets its request id."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code,
                       headers=dict(exc.headers or {}))  # a 405's Allow (RFC 9110 requires it)
        path = request.url.path
        route = next((r for r in api_labels if path == r or r.endswith("}") and path.startswith(r.split("{")[0])),
                     None if path in ("/health", "/metrics") else "other")
        if route is not None:
            server.metrics.request(route, err.status, err.code)
        return _error_response(err, telemetry_mod.new_request_id(RID_PREFIX[route]) if route in RID_PREFIX else None)

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.scheduler.reopen()
        yield
        await asyncio.to_thread(server.stop)

    api_labels: list[str] = []  # the API routes' endpoint labels (/health and /metrics are not counted)

    def api(path: str, fn, method: str, counted: bool = True) -> Route:  # counted under its path pattern
        api_labels.append(path.replace(":path}", "}"))
        return Route(path, endpoint(fn, api_labels[-1], counted), methods=[method])

    routes = [
        api("/v1/chat/completions", server.chat_completions, "POST", counted=False),
        api("/v1/completions", server.completions, "POST", counted=False),
        api("/v1/models", server.models, "GET"),
        api("/v1/models/{model:path}", server.model, "GET"),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        api("/tokenize", server.tokenize, "POST"),
        api("/detokenize", server.detokenize, "POST"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app


def listen(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as asyncio's create_server makes them: SO_REUSEADDR,
    IPv6 ones v6-only), bound and listening now: ``edgert serve`` calls it before loading the model, so a port in
    use or a host that does not resolve is said at once, and hands the sockets to ``run_server`` (no window for
    another process to take the port). EdgertError "cannot listen on HOST:PORT: <reason>" when it cannot."""
    def refuse(reason) -> EdgertError:
        return EdgertError(f"cannot listen on {host}:{port}: {reason}")

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise refuse(exc.strerror or exc) from None
    except (UnicodeError, ValueError) as exc:  # e.g. a label over 63 characters, a NUL in the name
        raise refuse(exc) from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):  # getaddrinfo may list an address twice
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise refuse(exc.strerror or exc) from None
    return socks


def run_server(app: Starlette, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
               sockets: list[socket.socket] | None = None) -> None:
    """Serve ``app`` (create_app's) under uvicorn until SIGINT or SIGTERM, then stop within a bounded time: new
    connections are refused, queued generations end at once and the running one after the token or prefill chunk in
    flight (each answering 503 server_shutting_down, or that error as a stream's last event), open responses get the
    app's shutdown_timeout_s to finish before their connections are closed, then the worker stops and telemetry is
    written. (uvicorn alone waited for every connection to close before the app could cancel anything: a long
    generation and its queue, or a client stalled mid-body, held the process for as long as they liked.)
    ``sockets``: listening sockets from ``listen`` (made here from host and port when None); closed at the end."""
    import uvicorn

    server = app.state.server

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            server.scheduler.close()  # before uvicorn waits for open responses: theirs end as their jobs do
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=server.shutdown_timeout_s)
    sockets = listen(host, port) if sockets is None else sockets
    try:
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises the SIGINT it caught again once it is done
            Uvicorn(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
