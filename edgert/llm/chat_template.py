"""Chat prompts from a model's own Jinja chat template (GGUF ``tokenizer.chat_template``), rendered in Jinja's
immutable sandbox, and split so message content can never be tokenized as template markup.

A template comes from a downloaded file and is treated as hostile: it runs in ``ImmutableSandboxedEnvironment``;
any attempt to touch an unsafe attribute (``__class__``, ``__globals__``, ...) fails at once (the stock sandbox
would render it as an empty string), and every failure of the template becomes ``ModelFormatError``. Its work is
bounded as well as its reach: its size (MAX_TEMPLATE_CHARS, which bounds compiling it; it is compiled once), the
lines it runs (MAX_TEMPLATE_STEPS) and its wall-clock time (MAX_TEMPLATE_SECONDS, read at every template line and
every Python call, so a chain of filters is stopped too) are budgeted, and since a C call (str(), join, ==, a
format) runs without reading the clock, every value a template builds is bounded too, before it is built where the
result is a product of its operands: ``range`` to MAX_RANGE_ITEMS, the weight of strings and containers — their
length, everything they hold, shared references counted each time — to MAX_VALUE_ITEMS, integers to MAX_INT_BITS,
integer arguments of calls and filters (widths, counts) to MAX_VALUE_ITEMS; bytes are refused. ``raise_exception``
in a template means the *messages* break the template's rules (say, roles not alternating), so it raises
``InvalidArgumentError``.

``render_segments`` renders once with each message's content replaced by a unique sentinel of private-use code
points, then splits the output at the sentinels: the template's own text comes back flagged ``is_markup=True``
(tokenize with ``Tokenizer.encode_special``), message content flagged ``False`` (tokenize with ``encode``), so a
user typing "<|im_end|>" gets text, not a control token. Templates that rewrite content beyond trimming
whitespace cannot be split this way and are refused with ModelFormatError; one exception, for reasoning models'
templates that drop the ``<think>`` part of past answers: an assistant message may come out as one part of its
content, found only when exactly one stretch of the output fits (see render_segments).

Globals offered to templates, as in Hugging Face transformers: messages, add_generation_prompt, bos_token,
eos_token, raise_exception, strftime_now; filter tojson (non-ASCII kept). This module must not tokenize.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, MappingView, Sequence

from ..errors import EdgertError, InvalidArgumentError, ModelFormatError

ROLES = ("system", "user", "assistant", "tool")

# The de-facto default: what llama.cpp and transformers fall back to when a model ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_OUTPUT_CHARS = 1 << 22      # a prompt longer than this is a template bug or an attack
MAX_TEMPLATE_CHARS = 1 << 18    # real chat templates are under ~20 KB; compiling one costs time and memory by size
MAX_REPEAT_ITEMS = 1 << 20      # bound on 'x' * n / [..] * n inside a template
MAX_POWER_EXPONENT = 1024
# lines of template code one render may execute: a conversation of thousands of messages takes a few hundred
# thousand; nested loops over range() in a hostile template would otherwise run for hours producing nothing
MAX_TEMPLATE_STEPS = 2_000_000
# wall-clock budget of one render: a real template renders a long conversation in milliseconds; this catches work
# done inside filters and operators (a sort per step), which the step budget does not see
MAX_TEMPLATE_SECONDS = 10.0
# range() in a template: chat templates loop over the messages (more than any context holds) or a handful of items;
# jinja's own sandbox allows 100000, enough for one `range(100000)|sort` per step to take a tenth of a second
MAX_RANGE_ITEMS = 1 << 16
# the weight of any value a template builds: a string's length, a container's items and everything they hold, shared
# references counted each time (about the length of its str()); a prompt is at most that
MAX_VALUE_ITEMS = MAX_OUTPUT_CHARS
MAX_INT_BITS = 1 << 16              # bits in any integer a template computes

_ALLOWED_KEYS = frozenset({"role", "content"})
_OWN_TEMPLATE = "pass a template of your own (edgert.LLM(..., chat_template=TEXT), or --chat-template FILE)"


class _TemplateRaised(Exception):
    """raise_exception() called by the template."""


def _raise_exception(message="the chat template refused these messages"):
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(str(fmt))


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _refuse(message: str):
    from jinja2.exceptions import SecurityError

    raise SecurityError(message)


_SIZED = (str, list, tuple, dict, set, frozenset)
_BIG_NUMBER = re.compile(r"\d{8,}")  # in a format string: a width or precision of 10^7 or more


_Namespace: type = type("_NoNamespace", (), {})  # jinja2's Namespace once _environment() has run
_budget = threading.local()  # .deadline, .seconds: the wall-clock budget of the render running on this thread


def _check_clock() -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        _refuse(f"the template ran longer than {_budget.seconds:g} s")


def _weight(value, limit: int = MAX_VALUE_ITEMS) -> int:
    """About the length of ``str(value)``: a string's length, a number's digits, a container's items and all they
    hold, a reference counted each time it occurs (``[s] * 1000`` weighs 1000 ``s``). Counting stops past ``limit``.
    What one C call (str(), ==, join) walks is bounded by the weights of its operands, so bounding the weight of
    every value a template builds bounds them all. A namespace inside another value is refused: it can grow after
    the value was weighed."""
    n, stack, top, walked = 0, [value], True, 0
    while stack and n <= limit:
        v = stack.pop()
        if isinstance(v, str):
            n += len(v) + 2
        elif isinstance(v, int):
            n += v.bit_length() // 3 + 2
        elif isinstance(v, Mapping):
            n += 2 + 4 * len(v)
            stack.extend(itertools.chain.from_iterable(v.items()))
        elif isinstance(v, (list, tuple, set, frozenset, MappingView)):
            n += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, _Namespace):
            if not top:
                _refuse("a namespace inside a list, dict or namespace")
            n += 12
            stack.extend(object.__getattribute__(v, "_Namespace__attrs").values())
        elif isinstance(v, (bytes, bytearray)):
            _refuse("bytes are not for chat templates")  # they would need every str bound again
        else:  # None, bool, float, undefined, loop and range objects: short reprs
            n += 24
        top, walked = False, walked + 1
        if walked & 0xFFFF == 0:  # a walk of a few million items takes a second
            _check_clock()
    return n


def _bounded(value):
    """``value`` when it is within the bounds on what a template may build (MAX_VALUE_ITEMS, MAX_INT_BITS)."""
    if isinstance(value, str):  # the common case, without a walk
        if len(value) > MAX_VALUE_ITEMS:
            _refuse(f"a str of {len(value)} characters is larger than {MAX_VALUE_ITEMS}")
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            _refuse(f"an integer of {value.bit_length()} bits is larger than {MAX_INT_BITS}")
    elif not isinstance(value, (float, type(None))) and _weight(value) > MAX_VALUE_ITEMS:
        _refuse(f"a {type(value).__name__} holding more than {MAX_VALUE_ITEMS} items and characters")
    return value


def _check_product(what: str, size: int) -> None:
    if size > MAX_VALUE_ITEMS:
        _refuse(f"{what} would build about {size} characters, more than {MAX_VALUE_ITEMS}")


_NUMBERS = re.compile(r"\d+")


def _check_format(fmt: str, args, kwargs=None) -> None:
    """Before ``fmt % args`` or ``fmt.format(*args, **kwargs)``: its size is at most the format, its widths and
    precisions, and each field holding the largest argument (a tuple for % spends each argument once)."""
    kwargs = dict(args) if isinstance(args, Mapping) else kwargs or {}  # '%(name)s' % mapping
    args = () if isinstance(args, Mapping) else tuple(args)
    pad = sum(int(m) for m in _NUMBERS.findall(fmt))
    values = list(args) + list(kwargs.values())
    ints = sum(abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool))  # '%*s', '{:{}}' widths
    if not kwargs and "{" not in fmt:  # printf with a tuple
        fields = _weight(args)
    else:
        fields = (fmt.count("%") + fmt.count("{")) * max(map(_weight, values), default=0)
    _check_product("formatting", len(fmt) + pad + ints + fields)


def _check_ints(name: str, args, kwargs) -> None:
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_VALUE_ITEMS:
            _refuse(f"{name} got the integer argument {a}, larger than {MAX_VALUE_ITEMS}")


def _check_call(name: str, target, args, kwargs):
    """Before a call or filter runs: its integer arguments (widths, counts, padding) are at most MAX_VALUE_ITEMS, and
    a str method cannot build more than MAX_VALUE_ITEMS characters (see _check_str_op); returns the args to call
    with."""
    _check_ints(f"{name}()", args, kwargs)
    return _check_str_op(name, target, args, kwargs)


def _check_filter(name: str, value, args, kwargs):
    """The filters whose result can be a product of their operands' sizes, checked before they run; returns the
    value to filter."""
    if name == "join":  # value|join(sep): the str method's check, with the value materialized once
        (value,) = _check_str_op("join", str(args[0]) if args else str(kwargs.get("d", "")), (value,))
    elif name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        width = width if isinstance(width, int) else len(str(width))
        _check_product("indent", len(value) + (value.count("\n") + 2) * width)
    elif name == "wordwrap" and isinstance(value, str):
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        _check_product("wordwrap", len(value) * (1 + len(str(wrap if wrap is not None else "\n"))))
    elif name == "sum":  # sum(lists, start=[]) copies the sum so far at each item: quadratic, inside one C call
        start = args[1] if len(args) > 1 else kwargs.get("start", 0)
        if not isinstance(start, (int, float)):
            _refuse("sum() of anything but numbers")
    return value


def _check_str_op(name: str, target, args, kwargs=None):
    """Checks for the str methods (and the filters of one name) whose result can be a product of their operands'
    sizes; returns ``args``, with an iterable to join made a list (weighed once, joined once)."""
    if not isinstance(target, str):
        return args
    if name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple, str)) else list(args[0])
        _check_product("join()", _weight(items) + len(target) * len(items))
        return (items,) + tuple(args[1:])
    if name == "expandtabs":
        size = (args or list((kwargs or {}).values()) or [8])[0]
        if isinstance(size, int):
            _check_product("expandtabs()", len(target) + target.count("\t") * size)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        _check_product("translate()", len(target) * max(map(_weight, args[0].values()), default=1))
    elif name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        n = target.count(old) if old else len(target) + 1
        if len(args) >= 3 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        if len(target) + n * (len(new) - len(old)) > MAX_VALUE_ITEMS:
            _refuse(f"replace() would build more than {MAX_VALUE_ITEMS} characters")
    elif name in ("format", "format_map") and _BIG_NUMBER.search(target):
        _refuse(f"format string asks for a width or precision of {_BIG_NUMBER.search(target).group()}")
    elif name == "format":
        _check_format(target, args, kwargs)
    elif name == "format_map" and args and isinstance(args[0], Mapping):
        _check_format(target, (), args[0])
    return args


def _bounded_filter(name: str, f):
    """A filter that checks its arguments (not the value it filters) and bounds what it returns."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1  # (context|eval_ctx|environment, value, ...)

    @functools.wraps(f)  # keeps jinja_pass_arg
    def bounded(*args, **kwargs):
        if len(args) >= skip:
            value = _check_filter(name, args[skip - 1], args[skip:], kwargs)
            _check_call(name, value, args[skip:], kwargs)
            args = args[:skip - 1] + (value,) + args[skip:]
        return _bounded(f(*args, **kwargs))

    return bounded


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE_ITEMS:
        _refuse(f"range of {len(r)} items is larger than {MAX_RANGE_ITEMS}")
    return r


_env = None


def _environment():
    """One shared sandbox (Jinja environments are thread-safe once configured)."""
    global _env, _Namespace
    if _env is not None:
        return _env
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    _Namespace = Namespace  # for _weight, which runs on every value a render builds (no import there)

    class _BoundedCode(CodeGenerator):
        """`a ~ b` compiles to a call of the environment's bounded_concat instead of a plain join; list, tuple and
        dict displays (`[s, s, s]`) to a bounded() of what they build."""

        def visit_Concat(self, node, frame):
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def _bounded_display(self, visit, node, frame):
            self.write("environment.bounded(")
            visit(node, frame)
            self.write(")")

        def visit_List(self, node, frame):
            self._bounded_display(super().visit_List, node, frame)

        def visit_Dict(self, node, frame):
            self._bounded_display(super().visit_Dict, node, frame)

        def visit_Tuple(self, node, frame):
            if node.ctx == "load":  # not `for a, b in ...` targets
                self._bounded_display(super().visit_Tuple, node, frame)
            else:
                super().visit_Tuple(node, frame)

    class _BoundedNamespace(Namespace):
        """namespace(): what a template stores in one is weighed at every store (it is the one mutable value)."""

        def __setitem__(self, name, value):
            super().__setitem__(name, value)
            _bounded(self)

    class _StrictSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = _BoundedCode
        bounded = staticmethod(_bounded)

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

        def call(self, context, obj, /, *args, **kwargs):
            fn = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
            args = _check_call(getattr(fn, "__name__", "call"), getattr(fn, "__self__", None), args, kwargs)
            return _bounded(super().call(context, obj, *args, **kwargs))

        @staticmethod
        def bounded_concat(parts) -> str:
            n = sum(len(p) if isinstance(p, str) else _weight(p) for p in parts)  # before str() builds them
            if n > MAX_VALUE_ITEMS:
                raise SecurityError(f"a string of {n} characters is larger than {MAX_VALUE_ITEMS}")
            return _bounded("".join(map(str, parts)))

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > MAX_POWER_EXPONENT:
                    raise SecurityError(f"exponent {right} is larger than {MAX_POWER_EXPONENT}")
                if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                        left.bit_length() * right > MAX_INT_BITS:
                    raise SecurityError(f"a power of about {left.bit_length() * right} bits is larger than "
                                        f"{MAX_INT_BITS}")
                return left ** right
            if operator == "+":
                if isinstance(left, _SIZED) and isinstance(right, _SIZED) and \
                        len(left) + len(right) > MAX_VALUE_ITEMS:
                    raise SecurityError(f"concatenation of {len(left) + len(right)} items is larger than "
                                        f"{MAX_VALUE_ITEMS}")
                return _bounded(left + right)
            if operator == "%":
                if isinstance(left, str):  # printf-style: widths and precisions ("%*s": from the arguments) counted
                    _check_format(left, right if isinstance(right, (tuple, Mapping)) else (right,))
                return _bounded(left % right)
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and not isinstance(n, bool):
                    if len(seq) * n > MAX_REPEAT_ITEMS:
                        raise SecurityError(f"repetition producing {len(seq) * n} items is larger than "
                                            f"{MAX_REPEAT_ITEMS}")
                    _check_product("repetition", (len(seq) if isinstance(seq, str) else _weight(seq)) * n)
            return _bounded(left * right)

    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False)
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["range"] = _range
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs in one call; no chat template needs it
    env.filters.pop("pprint", None)  # its indentation is not bounded by what it prints; no chat template needs it
    env.globals["namespace"] = _BoundedNamespace
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    _env = env
    return env


def template_from_metadata(meta: Mapping[str, object]) -> str:
    """The model's chat template, or ChatML when the GGUF has none."""
    t = meta.get("tokenizer.chat_template")
    if t is None or (isinstance(t, str) and not t.strip()):
        return CHATML_TEMPLATE
    if not isinstance(t, str):
        raise ModelFormatError(f"GGUF tokenizer.chat_template must be a string, found {type(t).__name__}")
    return t  # its size is checked when it renders: a model with a huge template still generates and scores


def _check_size(source: str) -> None:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ModelFormatError(f"the chat template has {len(source)} characters, more than {MAX_TEMPLATE_CHARS}: "
                               f"broken or hostile — {_OWN_TEMPLATE}")


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """The compiled template (rendering a compiled template is thread-safe): compiled once, not at every turn."""
    return _environment().from_string(source)


def validate_messages(messages) -> list[dict[str, str]]:
    """Check a chat history: a list of {"role", "content"} dicts, role one of ROLES, content a str."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                                   f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                                       f"{type(m).__name__}")
        extra = set(m) - _ALLOWED_KEYS
        if extra:
            raise InvalidArgumentError(f"messages[{i}] has unsupported keys {sorted(map(str, extra))}; only 'role' "
                                       "and 'content' are accepted")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidArgumentError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


@functools.lru_cache(maxsize=1)
def _render_code_files() -> tuple[str, ...]:
    """Where the code a render runs lives: the compiled template, Jinja and MarkupSafe, this module."""
    import jinja2
    import markupsafe

    return ("<template>", os.path.dirname(jinja2.__file__), os.path.dirname(markupsafe.__file__), __file__)


@contextlib.contextmanager
def _step_budget(limit: int, seconds: float):
    """Count the lines of template code (Jinja compiles a template to Python whose frames have the file name
    ``<template>``) this thread executes, and raise SecurityError past ``limit`` lines or ``seconds`` of wall-clock
    time: the sandbox bounds what a template may touch and build, this bounds how long it may run. The clock is read
    at every template line and at every call of any Python function (a chain of filters runs in Jinja's Python code
    and calls back into it per item), and no single C call runs long because every value it works on is bounded.
    Renders nested in an active budget share it (render_segments renders twice on one budget). The previous tracer
    (a debugger, coverage) is put back afterwards."""
    if getattr(_budget, "deadline", None) is not None:
        yield
        return
    steps, expired = 0, False
    deadline = time.monotonic() + seconds

    def local(frame, event, arg):
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > limit:
                _refuse(f"the template ran more than {limit} steps")
            if time.monotonic() > deadline:
                _refuse(f"the template ran longer than {seconds:g} s")
        return local

    render_code = _render_code_files()

    def calls(frame, event, arg):
        nonlocal expired
        # raised from the render's own code only: a call the interpreter makes in between (a gc callback, a
        # finalizer) would swallow it ("Exception ignored in ...")
        if not expired and time.monotonic() > deadline and frame.f_code.co_filename.startswith(render_code):
            expired = True  # once: the error's own handling calls Python code; template lines go on raising
            _refuse(f"the template ran longer than {seconds:g} s")
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    _budget.deadline, _budget.seconds = deadline, seconds
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(previous)
        _budget.deadline = None


def _forbidden(e) -> ModelFormatError:
    return ModelFormatError(f"the chat template did something the sandbox forbids ({e}); the model file's template "
                            f"is broken or hostile — {_OWN_TEMPLATE}")


def _run(template: str | None, messages: list[dict], add_generation_prompt: bool, bos_token: str,
         eos_token: str) -> str:
    from jinja2.exceptions import SecurityError, TemplateError

    source = CHATML_TEMPLATE if template is None else template
    if not isinstance(source, str):
        raise InvalidArgumentError(f"template must be a str or None, got {type(source).__name__}")
    _check_size(source)
    try:
        tpl = _compile(source)
        parts, size = [], 0
        with _step_budget(MAX_TEMPLATE_STEPS, MAX_TEMPLATE_SECONDS):
            for piece in tpl.generate(messages=messages, add_generation_prompt=bool(add_generation_prompt),
                                      bos_token=bos_token, eos_token=eos_token):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise SecurityError(f"output is longer than {MAX_OUTPUT_CHARS} characters")
                parts.append(piece)
        return "".join(parts)
    except _TemplateRaised as e:
        raise InvalidArgumentError(f"the model's chat template rejected the messages: {e}") from None
    except SecurityError as e:
        raise _forbidden(e) from None
    except TemplateError as e:
        raise ModelFormatError(f"the chat template failed: {type(e).__name__}: {e}; if the model's is broken, "
                               f"{_OWN_TEMPLATE}") from None
    except EdgertError:
        raise
    except Exception as e:  # a template can make Python raise almost anything (TypeError, ZeroDivision, ...)
        raise ModelFormatError(f"the chat template failed: {type(e).__name__}: {e}") from None


def render(template: str | None, messages, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "") -> str:
    """The prompt as one string (``template`` None = ChatML). For tokenizing, prefer ``render_segments``."""
    return _run(template, validate_messages(messages), add_generation_prompt, bos_token, eos_token)


# code points the content sentinels are drawn from, in order: the private-use planes and area first (no case, no
# whitespace, in no real template), then the rest of Unicode (surrogates left out), so they run out only when the
# messages use almost every code point there is
_SENTINEL_POOL = ((0xF0000, 0x110000), (0xE000, 0xF900), (0x80, 0xD800), (0xF900, 0xF0000))


def _sentinel_alphabet(texts: Sequence[str], n: int) -> tuple[str, str, list[str]]:
    """Open/close marks and n index characters, all distinct and none occurring in ``texts``. The free code points
    need not be contiguous: content holding one private-use character in every block of n took the search for a
    free block past U+10FFFF (chr() raised, a 500 from the server)."""
    used = set().union(*texts)
    free = (ch for lo, hi in _SENTINEL_POOL for ch in map(chr, range(lo, hi)) if ch not in used)
    chars = list(itertools.islice(free, n + 2))
    if len(chars) < n + 2:
        raise InvalidArgumentError("the messages use so many distinct characters that edgert cannot mark their "
                                   "content safely")
    return chars[0], chars[1], chars[2:]


def _occurrences(text: str, sub: str, start: int, stop: int):
    """The indexes in start..stop where (non-empty) ``sub`` occurs in ``text``."""
    i = text.find(sub, start, stop + len(sub))
    while i != -1:
        yield i
        i = text.find(sub, i + 1, stop + len(sub))


def render_segments(template: str | None, messages, add_generation_prompt: bool = True, bos_token: str = "",
                    eos_token: str = "") -> list[tuple[str, bool]]:
    """The rendered prompt as ``(text, is_markup)`` pieces in order; joined they equal ``render(...)``.

    Markup (template text, including bos/eos strings) is to be tokenized with control tokens recognised; content
    (what the messages said) as plain text. Empty pieces are dropped and neighbours of one kind merged, so the kinds
    alternate.
    """
    from jinja2.exceptions import SecurityError

    msgs = validate_messages(messages)
    source = CHATML_TEMPLATE if template is None else template
    if not isinstance(source, str):
        raise InvalidArgumentError(f"template must be a str or None, got {type(source).__name__}")
    _check_size(source)  # before the sentinel search reads it
    contents = [m["content"] for m in msgs]
    opening, closing, index = _sentinel_alphabet(contents + [source, bos_token, eos_token], len(msgs))
    sentinels = [opening + i + closing for i in index]
    marked = [{"role": m["role"], "content": s} for m, s in zip(msgs, sentinels)]
    try:
        with _step_budget(MAX_TEMPLATE_STEPS, MAX_TEMPLATE_SECONDS):  # one budget for both renders
            with_marks = _run(source, marked, add_generation_prompt, bos_token, eos_token)
            real = _run(source, msgs, add_generation_prompt, bos_token, eos_token)
    except SecurityError as e:  # the clock, read as the second render starts
        raise _forbidden(e) from None

    pieces = re.split(f"({re.escape(opening)}.{re.escape(closing)})", with_marks, flags=re.S)
    markup = pieces[0::2]
    if any(opening in p or closing in p for p in markup):
        raise ModelFormatError("the chat template cuts or rewrites message content (a content marker came out "
                               f"broken), so edgert cannot keep content apart from markup; {_OWN_TEMPLATE}")
    by_mark = dict(zip(sentinels, msgs))
    # Each content slot in the real output is the content itself, or (templates love `| trim`) a stripped form;
    # find which, checking the markup that follows so content can't fake a boundary. An assistant message's content
    # may also be cut to a part of itself (reasoning models' templates drop the `<think>` part of past answers): the
    # slot is then the one stretch that is a substring of the content and is followed by the markup; should the
    # content's part hold that markup, two stretches qualify and the template is refused.
    segs: list[tuple[str, bool]] = []
    pos = 0
    for k, text in enumerate(markup):
        if not real.startswith(text, pos):
            raise ModelFormatError("the chat template's output changes with message content beyond the content "
                                   f"itself; edgert cannot split it safely — {_OWN_TEMPLATE}")
        if text:
            segs.append((text, True))
        pos += len(text)
        if k == len(markup) - 1:
            break
        message = by_mark.get(pieces[2 * k + 1])
        if message is None:  # marks the template built itself (a reversed or sliced sentinel), not ours
            raise ModelFormatError("the chat template rewrites message content; edgert cannot keep content apart "
                                   f"from markup — {_OWN_TEMPLATE}")
        content, nxt, last = message["content"], markup[k + 1], k + 1 == len(markup) - 1

        def followed(end):  # the markup that follows the slot is there (and ends the output after the last slot)
            return real.startswith(nxt, end) and (not last or end + len(nxt) == len(real))

        for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(cand)
            if real.startswith(cand, pos) and followed(end):
                break
        else:
            ends = []
            if message["role"] == "assistant" and (nxt or last):  # (no markup between two slots: any split fits)
                # where the slot may end: before the end's markup, or at an occurrence of the next markup, in order.
                # A stretch that is no part of the content makes every longer one none either (it is their
                # prefix): the search stops there, so it reads the output a bounded number of times (checking each
                # occurrence was quadratic: 38 s for a 2.6 M-character message full of the markup)
                for e in [len(real) - len(nxt)] if last else _occurrences(real, nxt, pos, pos + len(content)):
                    if e < pos or not followed(e):
                        continue
                    if real[pos:e] not in content:
                        break
                    ends.append(e)
                    if len(ends) == 2:
                        break
            if len(ends) != 1:  # (the slot that fails may follow the message that changed: no role named)
                raise ModelFormatError(
                    "the chat template rewrites message content (beyond trimming whitespace, or keeping one part of "
                    f"an assistant's); edgert cannot keep content apart from markup — {_OWN_TEMPLATE}")
            end = ends[0]
            cand = real[pos:end]
        if cand:
            segs.append((cand, False))
        pos = end
    if pos != len(real):
        raise ModelFormatError("the chat template's output changes with message content; cannot split it safely")
    merged: list[tuple[str, bool]] = []
    for text, is_markup in segs:  # neighbours of one kind tokenize as one piece, as the whole prompt would
        if merged and merged[-1][1] == is_markup:
            merged[-1] = (merged[-1][0] + text, is_markup)
        else:
            merged.append((text, is_markup))
    return merged
