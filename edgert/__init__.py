"""edgert — a portable edge-inference runtime: quantized C kernels on the host, models partitioned over NPUs.

Public face: quantize, matmul, BoundMatMul, QTensor, repack / PackedQTensor, from_matmul_nbits, ``edgert.native.info()`` and the error types (imported
with the package); LLM, plan / Plan, Session, evaluate / EvalReport (imported on first use, so ``import edgert``
stays light).
"""
from . import native
from .errors import (
    ContextLengthError,
    DeviceError,
    DTypeError,
    EdgertError,
    InvalidArgumentError,
    LinkError,
    ModelFormatError,
    ModelNotFoundError,
    NativeBuildError,
    NonFiniteError,
    ProfileError,
    ShapeError,
    UnsupportedOpError,
)
from .quant import FORMATS, BoundMatMul, PackedQTensor, QTensor, from_matmul_nbits, matmul, quantize, repack, repack_pays

__version__ = "0.1.0"


def __getattr__(name):
    # the LLM stack pulls in tokenizers and jinja2: import it on first use, not with the kernels
    if name in ("LLM", "GenerationResult"):
        from . import llm

        return getattr(llm, name)
    if name in ("plan", "Plan"):  # the partitioner; the module itself is callable: edgert.plan(model, device=...)
        import importlib

        module = importlib.import_module(".plan", __name__)
        return module if name == "plan" else module.Plan
    if name in ("evaluate", "EvalReport"):  # edgert.eval: model comparison, imported on first use
        from . import eval as _eval

        return getattr(_eval, name)
    if name == "Session":  # onnx and the delegates: imported on first use
        from .session import Session

        return Session
    raise AttributeError(f"module 'edgert' has no attribute {name!r}")


__all__ = [
    "ContextLengthError", "DeviceError", "DTypeError", "GenerationResult", "LLM", "EdgertError", "FORMATS", "InvalidArgumentError", "LinkError", "ModelFormatError",
    "ModelNotFoundError", "NativeBuildError", "NonFiniteError", "ProfileError", "BoundMatMul", "PackedQTensor", "QTensor", "ShapeError", "UnsupportedOpError", "from_matmul_nbits", "matmul", "native",
    "quantize", "repack", "repack_pays", "Session", "evaluate", "EvalReport", "plan", "Plan",
]
