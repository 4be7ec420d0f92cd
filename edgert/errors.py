"""edgert's error types. Every failure a user can cause raises one of these, with a message that says what was
expected, what was found, and what to do. Built-in bases (ValueError, TypeError, ...) are mixed in where they fit so
ordinary ``except ValueError`` code keeps working."""


class EdgertError(Exception):
    """Base of every edgert error."""


class NativeBuildError(EdgertError, ImportError):
    """The compiled C core is missing or does not match this edgert."""


class InvalidArgumentError(EdgertError, ValueError):
    """A value the caller passed is out of range or inconsistent."""


class ShapeError(InvalidArgumentError):
    """Array shapes do not fit together (or do not fit the block size)."""


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
