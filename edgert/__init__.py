"""edgert — a portable edge-inference runtime: quantized C kernels on the host, models partitioned over NPUs.

Public face: quantize, matmul, QTensor, the error types, and ``edgert.native.info()``.
"""
from . import native
from .errors import (
    DeviceError,
    DTypeError,
    EdgertError,
    InvalidArgumentError,
    LinkError,
    ModelFormatError,
    NativeBuildError,
    ShapeError,
    UnsupportedOpError,
)
from .quant import FORMATS, QTensor, from_matmul_nbits, matmul, quantize

__version__ = "0.1.0"

__all__ = [
    "DeviceError", "DTypeError", "EdgertError", "FORMATS", "InvalidArgumentError", "LinkError", "ModelFormatError",
    "NativeBuildError", "QTensor", "ShapeError", "UnsupportedOpError", "from_matmul_nbits", "matmul", "native",
    "quantize",
]
