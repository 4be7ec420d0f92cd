"""Request validation for the OpenAI-compatible endpoints, and the OpenAI error body.

Every check raises APIError(status, message, param, code); app.py turns it into
``{"error": {"message", "type", "param", "code"}}``. Fields are sorted into three kinds (README, "Serving"):
honoured (mapped to sampling), ignored (accepted and dropped: they do not change greedy output or have no meaning
here), and rejected (a value we cannot honour: 400 rather than a silently different answer). Unknown fields are
ignored, as the OpenAI API does for forward compatibility.

This module must not touch the model: it only checks shapes and types of JSON values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidArgumentError, check_text

MAX_STOP = 4

# fields accepted and dropped that must still have their JSON type (docs/serve.md): (name, types, in words); the
# penalties are numbers in [-2, 2] (_reject). Any other unknown field is dropped unchecked.
IGNORED_TYPES = (("user", (str,), "a string"), ("metadata", (dict,), "an object"), ("store", (bool,), "a boolean"),
                 ("service_tier", (str,), "a string"), ("parallel_tool_calls", (bool,), "a boolean"),
                 ("top_logprobs", (int,), "an integer"))


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_overloaded", 504: "timeout_error"}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


@dataclass
class GenerationRequest:
    kind: str  # "chat" or "completion"
    model: str | None
    messages: list | None
    prompt: str | list | None  # text, or token ids
    stream: bool
    include_usage: bool
    sampling: dict  # keyword arguments for LLM._iterate, max_tokens not yet capped
    max_tokens: int | None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, lo: float, hi: float, default, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    # an int is compared as an int: math.isfinite / float() of a 400-digit JSON integer raise OverflowError
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(f"{name} must be a number, got {v!r}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _int(body: dict, name: str, lo: int, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"{name} must be an integer, got {v!r}", name, "invalid_type")
    if v < lo:
        raise bad(f"{name} must be >= {lo}, got {v}", name)
    return v


def _stop(body: dict):
    v = body.get("stop")
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > MAX_STOP:
            raise bad(f"stop takes at most {MAX_STOP} strings, got {len(v)}", "stop")
        return v
    raise bad(f"stop must be a string or a list of strings, got {v!r}", "stop", "invalid_type")


def _text(s: str, param: str) -> str:
    """``s`` if it is encodable text. JSON's \\u escapes can spell a lone UTF-16 surrogate (``"\\ud800"``), which
    is a Python str but no Unicode text: the tokenizer cannot take it (errors.check_text)."""
    try:
        return check_text(param, s)
    except InvalidArgumentError as exc:
        raise bad(str(exc), param) from None


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return _text(content, f"messages[{i}].content")
    if isinstance(content, list):  # content parts: only text parts can be honoured
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] != "text":
                raise bad(f"messages[{i}].content[{j}] is a {part['type']!r} part: only text parts are supported",
                          f"messages[{i}].content", "unsupported_value")
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                          f"messages[{i}].content")
            parts.append(part["text"])
        return _text("".join(parts), f"messages[{i}].content")
    raise bad(f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}",
              f"messages[{i}].content", "invalid_type")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list):
        raise bad(f"messages must be a list, got {type(msgs).__name__}", "messages", "invalid_type")
    if not msgs:
        raise bad("messages must hold at least one message", "messages", "empty_array")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, got {type(m).__name__}", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role == "developer":  # the OpenAI API's newer name for system
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role must be system, user or assistant, got {role!r}", f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            raise bad(f"messages[{i}].content is required", f"messages[{i}].content", "missing_required_parameter")
        out.append({"role": role, "content": _content_text(content, i)})
    return out


def _prompt(body: dict):
    p = body.get("prompt")
    if p is None:
        raise bad("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise bad("prompt is empty", "prompt", "empty_prompt")
        return _text(p, "prompt")
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1:
        raise bad("only one prompt per request is supported (n=1, no batches)", "prompt", "unsupported_value")
    raise bad("prompt must be a non-empty string or a non-empty list of token ids", "prompt", "invalid_type")


def _unsupported(body: dict, name: str, asks, typed, what: str) -> None:
    """A field we cannot honour: 400 unsupported_value when it ``asks`` for something (a value of its type), 400
    invalid_type when it is not ``typed`` (null, and the value that asks for nothing, pass)."""
    v = body.get(name)
    if v is None:
        return
    if not typed(v):
        raise bad(f"{name} must be {what}, got {v!r}", name, "invalid_type")
    if asks(v):
        raise bad(f"{name} is not supported", name, "unsupported_value")


def _reject(body: dict) -> None:
    for name in ("n", "best_of"):
        v = body.get(name)
        if v is not None and not _is_int(v):  # true == 1 and 1.0 == 1 in Python: neither is the integer 1 in JSON
            raise bad(f"{name} must be an integer, got {v!r}", name, "invalid_type")
        if v is not None and v != 1:
            raise bad(f"only {name}=1 is supported", name, "unsupported_value")
    # `v is not False`, not `v not in (None, False)`: 0 == 0.0 == False in Python, and a completion's logprobs: 0
    # asks for the chosen tokens' logprobs
    _unsupported(body, "logprobs", lambda v: v is not False, lambda v: isinstance(v, bool) or _is_int(v),
                 "true (chat) or an integer (completions)")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias", "unsupported_value")
    if body.get("tools") or body.get("functions"):
        raise bad("tools and function calling are not supported", "tools", "unsupported_value")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad("tool_choice is not supported", "tool_choice", "unsupported_value")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_value")
    _unsupported(body, "echo", lambda v: v is not False, lambda v: isinstance(v, bool), "a boolean")
    _unsupported(body, "suffix", lambda v: v != "", lambda v: isinstance(v, str), "a string")
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, -2.0, 2.0, None)  # ignored, but a wrong type is still an error
    for name, types, what in IGNORED_TYPES:
        v = body.get(name)
        if v is not None and (not isinstance(v, types) or (bool not in types and isinstance(v, bool))):
            raise bad(f"{name} must be {what}, got {v!r}", name, "invalid_type")


def parse_generation(body, kind: str) -> GenerationRequest:
    """Validate a /v1/chat/completions (kind "chat") or /v1/completions (kind "completion") body."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {model!r}", "model", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, got {stream!r}", "stream", "invalid_type")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    include_usage = (so or {}).get("include_usage", False)
    if include_usage is None:
        include_usage = False
    if not isinstance(include_usage, bool):
        raise bad(f"stream_options.include_usage must be a boolean, got {include_usage!r}", "stream_options",
                  "invalid_type")
    _reject(body)
    messages = _messages(body) if kind == "chat" else None
    prompt = _prompt(body) if kind == "completion" else None
    max_tokens = _int(body, "max_completion_tokens", 1) if kind == "chat" else None
    max_tokens = _int(body, "max_tokens", 1, max_tokens)
    seed = _int(body, "seed", -(2 ** 63))
    sampling = {
        # OpenAI defaults (temperature 1, top_p 1); top_k, min_p and repeat_penalty are llama.cpp-style extensions
        "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0),
        "top_k": _int(body, "top_k", 0, 0),
        "min_p": _number(body, "min_p", 0.0, 1.0, 0.0),
        "repeat_penalty": _number(body, "repeat_penalty", 0.0, 10.0, 1.0, lo_open=True),
        "seed": None if seed is None else seed & 0xFFFFFFFFFFFFFFFF,
        "stop": _stop(body),
    }
    return GenerationRequest(kind=kind, model=model, messages=messages, prompt=prompt, stream=stream,
                             include_usage=include_usage, sampling=sampling, max_tokens=max_tokens)


def parse_tokenize(body) -> tuple[str, bool, bool]:
    """content, add_special (BOS/EOS as the model adds them, default false) and parse_special (control-token
    spellings become control tokens, default true, as /v1/completions tokenizes a prompt): llama.cpp's fields."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    content = body.get("content")
    if not isinstance(content, str):
        raise bad(f"content must be a string, got {type(content).__name__}", "content", "invalid_type")
    _text(content, "content")
    flags = []
    for name, default in (("add_special", False), ("parse_special", True)):
        v = body.get(name, default)
        if not isinstance(v, bool):
            raise bad(f"{name} must be a boolean", name, "invalid_type")
        flags.append(v)
    return content, *flags


def parse_detokenize(body, vocab_size: int) -> list[int]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise bad("tokens must be a list of integers", "tokens", "invalid_type")
    for t in tokens:
        if not 0 <= t < vocab_size:
            raise bad(f"token id {t} is outside the vocabulary [0, {vocab_size})", "tokens")
    return tokens
