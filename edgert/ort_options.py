"""onnxruntime, imported on demand, and the SessionOptions a device profile may set: a layer below the profiles
(which check a profile's ``session_options`` with ``session_options`` when it loads) and the delegates (which
make their sessions with it)."""
from __future__ import annotations

from typing import Any, Mapping

from .errors import DeviceError, InvalidArgumentError


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a test dependency; the host C core still works without it
        raise DeviceError("onnxruntime is not installed; install it (pip install onnxruntime) to run ONNX "
                          "partitions") from None
    return onnxruntime


# onnxruntime's int8 matrix products on x86 without VNNI (AVX2, AVX-512F) multiply u8 by s8 with vpmaddubsw, whose
# int16 pair sums saturate: a few outputs of a QLinearConv / MatMulInteger come out wrong (measured: 14% off on one
# output of a 120x6625 MatMulInteger, and a two-class classifier's scores swapped). This entry makes it use exact
# u8u8 products instead (it changes nothing on other CPUs). Every session edgert makes sets it
# (delegates.onnxruntime.inference_session), so a partition gives the same numbers as the whole model and as edgert's
# own C core whatever the CPU, except on models where onnxruntime fails in that mode (exact_int8_fails there).
EXACT_INT8_ENTRY = ("session.x64quantprecision", "1")

# SessionOptions a device profile may not set: they make onnxruntime write files (a profile describes a device)
FILE_WRITING_SESSION_OPTIONS = ("optimized_model_filepath", "enable_profiling", "profile_file_prefix")


def session_options(opts: Mapping[str, Any] | None = None, threads: int | None = None):
    """An onnxruntime SessionOptions from a profile's ``session_options`` table (attribute name -> value). The
    exact int8 products (EXACT_INT8_ENTRY) are added per model by delegates.onnxruntime.inference_session.
    InvalidArgumentError naming the key for an attribute SessionOptions lacks, one that writes files, a value of the
    wrong type, or a thread count outside [0, MAX_THREADS] (profiles.load checks the same through this)."""
    from .native import MAX_THREADS

    ort = onnxruntime_module()
    so = ort.SessionOptions()
    for k, v in dict(opts or {}).items():
        where = f"(the profile's delegate_options.session_options.{k})"
        if k == "graph_optimization_level" and isinstance(v, str):
            if not hasattr(ort.GraphOptimizationLevel, v):
                raise InvalidArgumentError(f"graph_optimization_level {v!r} is not one of "
                                           f"{', '.join(ort.GraphOptimizationLevel.__members__)} {where}")
            v = getattr(ort.GraphOptimizationLevel, v)
        if k.startswith("_") or not hasattr(so, k) or callable(getattr(so, k)):
            raise InvalidArgumentError(f"onnxruntime SessionOptions has no setting {k!r} {where}")
        if k in FILE_WRITING_SESSION_OPTIONS:
            raise InvalidArgumentError(f"{k} makes onnxruntime write files; a device profile may not set it {where}")
        if k.endswith("_num_threads") and not (isinstance(v, int) and 0 <= v <= MAX_THREADS):
            raise InvalidArgumentError(f"{k} must be an int in [0, {MAX_THREADS}], got {v!r} {where}")
        try:
            setattr(so, k, v)
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidArgumentError(f"{k}={v!r} is not accepted by onnxruntime: {exc} {where}") from None
    if threads:
        so.intra_op_num_threads = int(threads)
    return so
