"""edgert's error types. Every failure a user can cause raises one of these, with a message that says what was
expected, what was found, and what to do. Built-in bases (ValueError, TypeError, ...) are mixed in where they fit so
ordinary ``except ValueError`` code keeps working. The argument checks every API shares live here too."""
import math
import os
import sys
import warnings
from numbers import Integral, Real

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class EdgertError(Exception):
    """Base of every edgert error."""


class NativeBuildError(EdgertError, ImportError):
    """The compiled C core is missing or does not match this edgert."""


class InvalidArgumentError(EdgertError, ValueError):
    """A value the caller passed is out of range or inconsistent."""


class ShapeError(InvalidArgumentError):
    """Array shapes do not fit together (or do not fit the block size)."""


class NonFiniteError(InvalidArgumentError):
    """Activations a quantized C-core product needs finite hold NaN or Inf (it quantizes them, and a NaN or an
    infinity has no code): nothing was computed. ``edgert.matmul`` and the bound products raise it; the host
    delegate catches it and runs that step on onnxruntime."""


class DTypeError(EdgertError, TypeError):
    """An array or object has the wrong type."""


class ModelFormatError(EdgertError, ValueError):
    """A model file (GGUF, ONNX, TFLite) is malformed, truncated, hostile, or uses what edgert does not support."""


class UnsupportedOpError(EdgertError):
    """A graph op (or op/dtype combination) no available delegate can run."""


class DeviceError(EdgertError):
    """A device, delegate or CPU variant is unavailable or failed."""


class LinkError(EdgertError):
    """The host<->device link failed (timeouts, broken frames, protocol mismatch)."""


class ModelNotFoundError(EdgertError, FileNotFoundError):
    """A model name or path matches no file, no known model and nothing in the model cache."""


class ContextLengthError(InvalidArgumentError):
    """The input does not fit the model's context (n_ctx)."""


class ProfileError(InvalidArgumentError):
    """A device profile (device_profiles/*.toml) is missing, malformed, or breaks the schema. ``file``, ``field``
    (a path such as ``units[1].link.bandwidth_bytes_s``) and ``reason`` are kept as attributes."""

    def __init__(self, message: str, *, file: str = "", field: str = "", reason: str = ""):
        super().__init__(message)
        self.file, self.field, self.reason = file, field, reason


def check_number(name: str, v, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """``v`` as a float, when it is a finite real number (not a bool) in the range; InvalidArgumentError naming the
    argument and the range otherwise."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise InvalidArgumentError(f"{name} must be a number, got {v!r}")
    x = float(v)
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise InvalidArgumentError(f"{name} must be in {rng}, got {v!r}")
    return x


def check_text(name: str, v) -> str:
    """``v`` when it is a str of Unicode text. A lone surrogate (U+D800..U+DFFF, which a JSON \\u escape or a
    surrogateescape'd file name can put in a Python str) cannot be encoded, so no tokenizer can take it."""
    if not isinstance(v, str):
        raise InvalidArgumentError(f"{name} must be a str, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"{name} holds a lone surrogate code point (U+{ord(v[exc.start]):04X} at "
                                   f"character {exc.start}); give valid Unicode text") from None
    return v


def check_count(name: str, v, lo: int = 0, note: str = "", hi: int | None = None) -> int:
    """``v`` as an int, when it is an integer (not a bool) >= lo (and <= hi, when given); InvalidArgumentError
    otherwise (``note`` is added to the message, e.g. what 0 means)."""
    if isinstance(v, bool) or not isinstance(v, Integral) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidArgumentError(f"{name} must be an int {rng}{note}, got {v!r}")
    return int(v)


def warn_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside edgert: the user's line that reached it, however many
    edgert calls lie between (a fixed stacklevel is wrong for one of two paths: a Session binds at creation or at
    its first run)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
