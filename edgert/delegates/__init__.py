"""Delegates: backends that run partitions of a graph (base.py has the interface and the registry).

Shipped: ``host`` (the edgert C core for quantized matmuls, onnxruntime's CPU provider for the rest) and
``onnxruntime`` (any execution provider a profile names). Each registers itself on import.
"""
from .base import CompiledPartition, Delegate, get, is_registered, register, registered
from . import onnxruntime as _onnxruntime  # noqa: F401  (registers "onnxruntime")
from . import host as _host  # noqa: F401  (registers "host")
from . import litert as _litert  # noqa: F401  (registers "litert"; LiteRT itself is imported on first use)
from . import serial_npu as _serial_npu  # noqa: F401  (registers "serial-npu"; pyserial is imported on first use)

__all__ = ["CompiledPartition", "Delegate", "get", "is_registered", "register", "registered"]
