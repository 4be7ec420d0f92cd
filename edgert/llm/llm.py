"""LLM: the user-facing language model — resolve a model name, load it, tokenize, template, sample, stream.

The per-token loop lives here and costs one C call per generated token (the whole forward step runs in C). The
KV cache is reused across calls: a prompt that starts with the tokens already in the cache (the previous turns of
a chat) only prefills what is new.

Context limit policy: a prompt that does not fit n_ctx (leaving room for one generated token) is refused with
ContextLengthError; a generation that fills the context stops with finish_reason "length" (prompt + completion
tokens never exceed n_ctx).
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ContextLengthError, EdgertError, InvalidArgumentError
from .. import native, telemetry
from . import chat_template, store
from .chat_template import template_from_metadata
from .model import DEFAULT_N_BATCH, LlamaModel
from .sampler import Sampler
from .tokenizer import StreamDecoder, Tokenizer

DEFAULT_MODEL = store.ModelName("smollm2-135m")  # by name only: never a file or directory of that name in the cwd
DEFAULT_N_CTX = 2048
REPEAT_WINDOW = 64  # tokens of history the repetition penalty looks at (llama.cpp's default)
# the most prompt tokens one prefill step runs when a caller can stop the generation (should_stop): about 70 ms of
# SmolLM2 on 2 cores between checks; a split prefill gives the same logits, bit for bit, as one pass
STOPPABLE_PREFILL_CHUNK = 64


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS, end of turn or a stop string) or "length" (max_tokens or the context is full)
    timings: dict = field(default_factory=dict)
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        return {
            "text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "timings": self.timings,
        }


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgumentError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stop if s]


class _StopScanner:
    """Emits text as it arrives except the tail that could still become a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = 0  # longest suffix of pending that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class LLM:
    """A local language model. ``model`` is a known name (pulled into the cache on first use) or a .gguf path.
    ``chat_template``: a Jinja chat template (text) to use instead of the file's."""

    def __init__(self, model: str = DEFAULT_MODEL, n_ctx: int = DEFAULT_N_CTX, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, progress: bool = True, chat_template: str | None = None):
        threads = native.check_threads(threads)
        if chat_template is not None and not isinstance(chat_template, str):
            raise InvalidArgumentError(f"chat_template must be a str (the template's text) or None, got "
                                       f"{type(chat_template).__name__}")
        if chat_template is not None and not chat_template.strip():  # it would render every chat to nothing
            raise InvalidArgumentError("chat_template is empty: give a template's text, or None for the model's")
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 2:
            raise InvalidArgumentError(f"n_ctx must be an int >= 2, got {n_ctx!r}")
        t0 = time.perf_counter()
        self.path = store.resolve(model, pull_missing=True, progress=progress)
        self.name = str(model)  # a plain str (also for a store.ModelName)
        # the name the server gives the model: a known name as given, a file by its stem (LLM calls record
        # ``name``, the model as the caller gave it)
        self.model_id = self.name if not self.name.endswith(".gguf") else Path(self.name).stem
        self.threads = threads
        self.model = LlamaModel(self.path, n_ctx=n_ctx, n_batch=n_batch, clamp_ctx=True)
        if self.model.n_ctx < n_ctx and n_ctx != DEFAULT_N_CTX:
            warnings.warn(f"n_ctx={n_ctx} exceeds the model's context length; using {self.model.n_ctx}")
        n_ctx = self.model.n_ctx
        meta = self.model.gguf.metadata
        self.tokenizer = Tokenizer.from_gguf_metadata(meta)
        # the file's template, ChatML when it has none (or "")
        self.template = template_from_metadata(meta) if chat_template is None else chat_template
        self.n_ctx = n_ctx
        self._kv: list[int] = []  # tokens whose keys/values are in the cache, by position
        # one KV cache: calls that use it take this lock for each step (generate/chat for their whole run, so calls
        # from several threads take turns), and each claims the cache with a new epoch; a stream whose epoch is
        # no longer the cache's was interrupted by another call and stops with an error (it went on silently from
        # the other call's cache, giving wrong text)
        self._lock = threading.RLock()
        self._epoch = 0
        # set by close() before it waits for the lock: a generation in progress (generate and chat hold the lock for
        # their whole run) sees it at its next step and ends with an error, so close() waits for one step, not a run
        self._closed = False
        self._longest: int | None = None  # _longest_token()
        self.load_s = time.perf_counter() - t0

    # ---- text ----

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_tokens(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of messages rendered with the model's chat template (ChatML when it has none). Markup becomes
        control tokens; message content never does."""
        messages = chat_template.validate_messages(messages)
        if not messages:  # chat answered the template's default prompt
            raise InvalidArgumentError("messages is empty: give at least one {'role', 'content'} message")
        tok = self.tokenizer
        # every template renders a message to at least one token (its role header or separator), and one more is
        # needed for the answer: refused before rendering, which 100,000 empty messages made take seconds
        if len(messages) >= self.n_ctx:
            raise ContextLengthError(f"{len(messages)} messages cannot fit n_ctx={self.n_ctx} tokens (each takes at "
                                     "least one): send fewer or load the model with a larger n_ctx")
        # (a 4 MB message reached the template sandbox's size limit, which blamed the model file's template)
        self.check_text_fits(sum(len(m["content"]) for m in messages), "the messages hold")
        segments = chat_template.render_segments(
            self.template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=_piece_text(tok, tok.bos_id), eos_token=_piece_text(tok, tok.eos_id),
        )
        ids: list[int] = []
        for text, is_markup in segments:
            ids += tok.encode_special(text) if is_markup else tok.encode(text)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        if not ids:  # a template that renders nothing for these messages: nothing to answer (no step would run)
            raise InvalidArgumentError("the chat template rendered these messages to no tokens: nothing to answer")
        return ids

    def check_text_fits(self, chars: int, what: str = "the text holds") -> None:
        """ContextLengthError when ``chars`` characters cannot fit n_ctx tokens even at the longest token's length
        each: said before tokenizing or rendering, which megabytes of text make take seconds."""
        if chars > self.n_ctx * self._longest_token():
            raise ContextLengthError(f"{what} {chars} characters, more than n_ctx={self.n_ctx} tokens can hold: "
                                     "shorten the text or load the model with a larger n_ctx")

    def _longest_token(self) -> int:
        """The most characters one token's text holds (a bound on how much text n tokens can cover)."""
        if self._longest is None:  # on first use: a pass over the vocabulary, not at load
            self._longest = max(1, max((len(t) for t in self.tokenizer.tokens), default=1))
        return self._longest

    # ---- numerics ----

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits (len(ids), vocab), float32: row i predicts the token after ids[i]. ``ids``: a list
        of token ids (ints in [0, vocab)) or a 1-D integer array."""
        arr = self.model.token_ids(ids, "ids")
        if not arr.size:
            raise InvalidArgumentError("logits needs at least one token id")
        if arr.size > self.n_ctx:
            raise ContextLengthError(f"{arr.size} tokens do not fit n_ctx={self.n_ctx}")
        with self._lock:
            self._epoch += 1
            self._kv = []
            out = self.model.forward(arr, 0, logits_all=True, threads=self.threads)
            self._kv = arr.tolist()
        return out

    # ---- generation ----

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop=None, **unknown) -> GenerationResult:
        # a misspelt argument (in ``unknown``): the InvalidArgumentError chat and stream give, not a TypeError
        sampling = dict(unknown, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop)
        with self._lock:  # the whole run: generations from several threads take turns
            return _drain(self._start(lambda: self._prompt_ids(prompt), (), sampling))

    def stream(self, prompt: str, *args, **kwargs) -> Iterator[str]:
        """Yields text pieces as they are decoded (the full result is then in ``last_result``); sampling arguments
        as ``generate``'s, by position or name."""
        return self._stream(self._start(lambda: self._prompt_ids(prompt), args, kwargs))

    def chat(self, messages, *args, **kwargs) -> GenerationResult:
        with self._lock:
            return _drain(self._start(lambda: self.chat_tokens(messages), args, kwargs))

    def chat_stream(self, messages, *args, **kwargs) -> Iterator[str]:
        return self._stream(self._start(lambda: self.chat_tokens(messages), args, kwargs))

    def _start(self, prompt_ids, args: tuple, kwargs: dict):
        """``_iterate`` for a public call: the prompt's ids from ``prompt_ids()``, the sampling arguments from
        ``args`` and ``kwargs``. A call refused before it generates (an unknown or out-of-range argument, an empty
        prompt or messages, a prompt that does not fit n_ctx) records one telemetry event, as the server does for a
        request it rejects: finish reason "rejected", the error, status 400 (500 for an error not of edgert's), 0
        completion tokens and the prompt's tokens when it was tokenized. A call that started records its own
        (``_recorded``)."""
        t0, ids = time.perf_counter(), None
        try:
            sampling = _sampling(kwargs, args)
            ids = prompt_ids()
            return self._iterate(ids, **sampling)
        except Exception as exc:
            if telemetry.enabled():
                telemetry.record({"source": "llm", "model": self.name, "prompt_tokens": len(ids) if ids else 0,
                                  "completion_tokens": 0, "latency_s": time.perf_counter() - t0,
                                  "finish_reason": "rejected", "status": 400 if isinstance(exc, EdgertError) else 500,
                                  "error": exc})  # recorded as "Type: message"
            raise

    def _stream(self, it):
        self.last_result = None
        while True:
            try:
                piece = next(it)
            except StopIteration as done:
                self.last_result = done.value
                return
            if piece:
                yield piece

    def _prompt_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt, add_special=True)
        if not ids:
            raise InvalidArgumentError("prompt is empty: give at least one token of text")
        return ids

    def _iterate(self, prompt_ids: list[int], max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop=None, record: bool = True, should_stop=None):
        """record=False: the caller (the server) records its own telemetry event for this generation.
        should_stop: called between the prompt's prefill chunks and after every token; a non-empty string it returns
        (e.g. "cancelled", "timeout") ends the generation there, with that string as the finish reason and a complete
        result (tokens, text, timings; no tokens when it came during the prefill)."""
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be a positive int, got {max_tokens!r}")
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed)
        scanner = _StopScanner(_stop_list(stop))
        n_prompt = len(prompt_ids)
        if n_prompt >= self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens but n_ctx is {self.n_ctx}: shorten it or load the model with a "
                f"larger n_ctx (at most {self.model.config.context_length})"
            )
        if record and telemetry.enabled():
            partial: list = []
            return self._recorded(self._loop(prompt_ids, max_tokens, sampler, scanner, should_stop, partial), partial)
        return self._loop(prompt_ids, max_tokens, sampler, scanner, should_stop)

    def _recorded(self, it, partial: list):
        """Passes the generation through and queues one telemetry event when it ends, is closed early (with what it
        had done: the loop leaves its partial result in ``partial``) or fails."""
        result, finish, error, t0 = None, None, None, time.perf_counter()
        try:
            result = yield from it
            return result
        except GeneratorExit:
            finish = "cancelled"
            result = partial[0] if partial else None
            raise
        except BaseException as exc:
            finish, error = "error", exc
            raise
        finally:
            telemetry.record_generation(result, model=self.name, finish_reason=finish, error=error, t_start=t0)

    def _loop(self, prompt_ids, max_tokens, sampler, scanner, should_stop=None, partial: list | None = None):
        t0 = time.perf_counter()
        tok = self.tokenizer
        n_prompt = len(prompt_ids)
        common = 0
        with self._lock:
            self._check_open(running=False)
            self._epoch += 1
            epoch = self._epoch
            limit = min(len(self._kv), n_prompt - 1)  # always run at least one prompt token to get logits
            while common < limit and self._kv[common] == prompt_ids[common]:
                common += 1
            self._kv = self._kv[:common]
            # the prompt in chunks of at most n_batch tokens (the C core splits a longer call the same way), with
            # close() and should_stop checked between them: a long prompt's prefill takes seconds, and a timeout,
            # a client gone or a shutdown must not wait for all of it
            step = self.model.n_batch
            if should_stop is not None:
                step = min(step, STOPPABLE_PREFILL_CHUNK)
            stopped = None
            for start in range(common, n_prompt, step):
                if start > common:
                    self._check_open()
                    stopped = should_stop() if should_stop is not None else None
                    if stopped:
                        break
                chunk = prompt_ids[start:start + step]
                logits = self.model.forward(chunk, start, threads=self.threads)
                self._kv += chunk
            n_prefilled = len(self._kv) - common
        t_prefill = time.perf_counter()

        decoder = StreamDecoder(tok)
        out: list[int] = []
        text = []
        finish = "length"
        ttft = None
        history = list(prompt_ids[-REPEAT_WINDOW:])
        t_decode0 = t_prefill
        n_decode = 0

        def result(finish_reason):
            t_end = time.perf_counter()
            prefill_s = t_prefill - t0
            decode_s = t_end - t_decode0
            return GenerationResult(
                text="".join(text), tokens=list(out), finish_reason=finish_reason, prompt_tokens=n_prompt,
                timings={
                    "load_s": self.load_s,
                    "ttft_s": ttft if ttft is not None else prefill_s,
                    "prefill_tokens": n_prefilled,
                    "prefill_s": prefill_s,
                    "prefill_tok_s": n_prefilled / prefill_s if prefill_s > 0 else 0.0,
                    "decode_tokens": n_decode,
                    "decode_s": decode_s,
                    "decode_tok_s": n_decode / decode_s if decode_s > 0 and n_decode else 0.0,
                    "total_s": t_end - t0,
                },
            )

        if stopped:
            return result(stopped)
        try:
            while True:
                token = sampler.sample(logits, history)
                if ttft is None:
                    ttft = time.perf_counter() - t0
                    t_decode0 = time.perf_counter()
                if token in tok.stop_ids:
                    finish = "stop"
                    break
                out.append(token)
                history = (history + [token])[-REPEAT_WINDOW:]
                piece = scanner.push(decoder.push(token))
                if piece:
                    text.append(piece)
                    yield piece
                if scanner.hit:
                    finish = "stop"
                    break
                # the cache holds all but the token just sampled: prompt + completion never exceeds n_ctx
                if len(out) >= max_tokens or len(self._kv) + 1 >= self.n_ctx:
                    break
                reason = should_stop() if should_stop is not None else None
                if reason:
                    finish = reason
                    break
                with self._lock:
                    self._check_open()
                    if self._epoch != epoch:
                        raise InvalidArgumentError(
                            "this generation was interrupted: another call on the same LLM (a generation, a stream, "
                            "logits or reset) used its KV cache since; finish or close a stream before the next call, "
                            "or give each concurrent stream an LLM of its own")
                    logits = self.model.forward([token], len(self._kv), threads=self.threads)
                    self._kv.append(token)
                n_decode += 1
            if not scanner.hit:
                tail = scanner.push(decoder.flush())
                tail += "" if scanner.hit else scanner.flush()
                if tail:
                    text.append(tail)
                    yield tail
        except GeneratorExit:  # the stream was closed: what it did goes to telemetry (_recorded)
            if partial is not None:
                partial.append(result("cancelled"))
            raise
        return result(finish)

    def reset(self) -> None:
        """Forget the cached context (the next call prefills its whole prompt; a stream still open ends)."""
        with self._lock:
            self._epoch += 1
            self._kv = []

    def _check_open(self, running: bool = True) -> None:
        """Under the lock, before each step of a generation (``running``: not its first): the error close() leaves
        it with (a stream closed from its own loop, or a generation another thread closed the LLM under), before any
        C call on the freed model."""
        if self._closed:
            raise InvalidArgumentError(f"the model is closed ({self.path}): " + (
                "LLM.close() was called while this generation ran; " if running else "") + "load it again to use it")

    def close(self, timeout: float | None = None) -> bool:
        """Free the model. A call in progress on another thread (generate, chat, a stream, logits) first finishes
        the step it is in (a chunk of the prompt's prefill or one token): close() waits for it, at most ``timeout``
        seconds when given; the generation then ends with InvalidArgumentError ("the model is closed"), as every
        later call does. Safe from inside a stream's loop. False when the timeout passed first: the model stays
        mapped (the process is ending, say) and the generation still ends at its next step."""
        self._closed = True
        # never while a C call runs on the model: it reads the weights close() unmaps
        if not self._lock.acquire(timeout=-1 if timeout is None else max(float(timeout), 0.0)):
            return False
        try:
            self.reset()  # a stream still open ends
            self.model.close()
        finally:
            self._lock.release()
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, n_ctx={self.n_ctx}, path={str(self.path)!r})"


_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop")


def _sampling(kwargs: dict, args: tuple = ()) -> dict:
    """The sampling arguments of a call: ``args`` positional in generate's order (_SAMPLING), then ``kwargs``."""
    if len(args) > len(_SAMPLING):
        raise InvalidArgumentError(f"at most {len(_SAMPLING)} positional sampling arguments ({', '.join(_SAMPLING)}), "
                                   f"got {len(args)}")
    twice = set(_SAMPLING[:len(args)]) & set(kwargs)
    if twice:
        raise InvalidArgumentError(f"argument(s) {sorted(twice)} given both by position and by name")
    unknown = set(kwargs) - set(_SAMPLING)
    if unknown:
        raise InvalidArgumentError(f"unknown argument(s) {sorted(unknown)}; expected some of {list(_SAMPLING)}")
    return {**dict(zip(_SAMPLING, args)), **kwargs}


def _drain(it) -> GenerationResult:
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


def _piece_text(tok: Tokenizer, token_id) -> str:
    if token_id is None:
        return ""
    return tok.token_to_piece(token_id).decode("utf-8", "replace")
