"""The typed graph IR (``edgert.graph.ir``): what the ONNX loader produces and the partitioner, delegates and
sessions consume. Importing it does not import onnx; exporting a partition (``Graph.subgraph_model``) does."""
from .ir import (DTYPE_BITS, EXTERNAL_DATA_DIR, Graph, Node, QuantParams, Tensor, external_data_dir,
                 onnx_elem_type_to_dtype, onnx_types)

__all__ = ["DTYPE_BITS", "EXTERNAL_DATA_DIR", "Graph", "Node", "QuantParams", "Tensor", "external_data_dir",
           "onnx_elem_type_to_dtype", "onnx_types"]
