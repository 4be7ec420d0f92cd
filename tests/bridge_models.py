"""Tiny int8 ONNX models for the serial NPU tests and benchmark, built in code (QOperator form: QLinearConv,
depthwise QLinearConv, Relu, Reshape, QLinearMatMul, MatMulInteger + Add)."""
from __future__ import annotations

import numpy as np


def _checked_model(nodes, name: str, inits, x, y):
    """onnx_models' opset-17 model of ``nodes`` with one input ``x`` and one output ``y`` (each (name, elem type,
    shape)), passed through onnx's checker."""
    import onnx
    from onnx import helper

    from onnx_models import _model

    model = _model(nodes, [helper.make_tensor_value_info(*x)], [helper.make_tensor_value_info(*y)], inits, name=name)
    onnx.checker.check_model(model)
    return model


def serial_npu_profile(free_link: bool = False):
    """The serial-npu profile with a host so slow (1e3 ops/s) that the copy-aware search keeps the device islands;
    ``free_link``: the link costs nothing too, so every node the device can run goes to it (the real UART and host
    would keep tiny test models on the host)."""
    import dataclasses

    import edgert.profiles

    prof = edgert.profiles.load("serial-npu")
    units = []
    for u in prof.units:
        if u.delegate == "host":
            u = dataclasses.replace(u, throughput={d: 1e3 for d in u.throughput})
        elif free_link and u.link is not None:
            u = dataclasses.replace(u, link=dataclasses.replace(u.link, latency_s=0.0, bandwidth_bytes_s=1e18))
        units.append(u)
    return dataclasses.replace(prof, units=units)


def int8_cnn(seed: int = 0, c: int = 3, hw: int = 8, classes: int = 10, uint8_input: bool = False):
    """x int8/uint8 (1, c, hw, hw) -> QLinearConv 3x3 (8 ch) -> depthwise QLinearConv 3x3 s2 -> Relu -> Reshape ->
    QLinearMatMul -> y int8 (1, classes)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    xdt = np.uint8 if uint8_input else np.int8
    xtp = TensorProto.UINT8 if uint8_input else TensorProto.INT8
    h2 = (hw + 1) // 2
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(128 if uint8_input else 3, xdt), "xzp"),
        numpy_helper.from_array(rng.integers(-60, 60, (8, c, 3, 3)).astype(np.int8), "w1"),
        numpy_helper.from_array((rng.random(8) * 0.02 + 0.005).astype(np.float32), "w1s"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w1zp"),
        numpy_helper.from_array(np.array(0.11, np.float32), "y1s"),
        numpy_helper.from_array(np.array(-2, np.int8), "y1zp"),
        numpy_helper.from_array(rng.integers(-500, 500, 8).astype(np.int32), "b1"),
        numpy_helper.from_array(rng.integers(-60, 60, (8, 1, 3, 3)).astype(np.int8), "w2"),
        numpy_helper.from_array(np.array(0.013, np.float32), "w2s"),
        numpy_helper.from_array(np.array(0, np.int8), "w2zp"),
        numpy_helper.from_array(np.array(0.07, np.float32), "y2s"),
        numpy_helper.from_array(np.array(1, np.int8), "y2zp"),
        numpy_helper.from_array(np.array([1, 8 * h2 * h2], np.int64), "shape"),
        numpy_helper.from_array(rng.integers(-60, 60, (8 * h2 * h2, classes)).astype(np.int8), "w3"),
        numpy_helper.from_array(np.array(0.009, np.float32), "w3s"),
        numpy_helper.from_array(np.array(0, np.int8), "w3zp"),
        numpy_helper.from_array(np.array(0.2, np.float32), "y3s"),
        numpy_helper.from_array(np.array(0, np.int8), "y3zp"),
    ]
    nodes = [
        helper.make_node("QLinearConv", ["x", "xs", "xzp", "w1", "w1s", "w1zp", "y1s", "y1zp", "b1"], ["c1"],
                         pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("QLinearConv", ["c1", "y1s", "y1zp", "w2", "w2s", "w2zp", "y2s", "y2zp"], ["c2"],
                         pads=[1, 1, 1, 1], strides=[2, 2], group=8, name="dw2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Reshape", ["r2", "shape"], ["f"], name="flat"),
        helper.make_node("QLinearMatMul", ["f", "y2s", "y2zp", "w3", "w3s", "w3zp", "y3s", "y3zp"], ["y"], name="fc"),
    ]
    return _checked_model(nodes, "int8_cnn", inits, ("x", xtp, [1, c, hw, hw]), ("y", TensorProto.INT8, [1, classes]))


def int8_mlp(seed: int = 0, k: int = 64, n: int = 32, m: int = 4):
    """x int8 (m, k) -> MatMulInteger (int32) -> Add bias (int32) -> Relu -> y int32 (m, n)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(5, np.int8), "xzp"),
             numpy_helper.from_array(rng.integers(-20000, 20000, n).astype(np.int32), "b")]
    nodes = [helper.make_node("MatMulInteger", ["x", "w", "xzp"], ["acc"], name="mm"),
             helper.make_node("Add", ["acc", "b"], ["z"], name="bias"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]
    return _checked_model(nodes, "int8_mlp", inits, ("x", TensorProto.INT8, [m, k]), ("y", TensorProto.INT32, [m, n]))


def int8_split(seed: int = 0, k: int = 64, n: int = 32, m: int = 4):
    """Two device partitions with a direct device -> device edge: x int8 (m, k) -> MatMulInteger -> acc (int32) ->
    Relu -> r; a host-only Neg on a side branch reads acc; y = Add(r, Neg(acc)) int32 (m, n). The Add cannot join
    the first partition (it waits for the host's Neg, which waits for acc), so r goes from one device partition to
    the next and is read by nothing else."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(5, np.int8), "xzp")]
    nodes = [helper.make_node("MatMulInteger", ["x", "w", "xzp"], ["acc"], name="mm"),
             helper.make_node("Relu", ["acc"], ["r"], name="relu"),
             helper.make_node("Neg", ["acc"], ["h"], name="neg"),
             helper.make_node("Add", ["r", "h"], ["y"], name="add")]
    return _checked_model(nodes, "int8_split", inits, ("x", TensorProto.INT8, [m, k]), ("y", TensorProto.INT32, [m, n]))


def int8_conv_chain(layers: int = 12, seed: int = 0):
    """x int8 (1, 4, 8, 8) -> ``layers`` 3x3 QLinearConvs (4 -> 4 channels, pads 1) -> y int8 (1, 4, 8, 8): six
    tensors a layer, so 12 layers are one device partition of ~75 tensors, more than the firmware takes per graph."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s0"),
             numpy_helper.from_array(np.array(0, np.int8), "z0")]
    nodes, prev = [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.integers(-20, 20, (4, 4, 3, 3)).astype(np.int8), f"w{i}"),
                  numpy_helper.from_array(np.array(0.01, np.float32), f"ws{i}"),
                  numpy_helper.from_array(np.array(0, np.int8), f"wz{i}"),
                  numpy_helper.from_array(np.array(0.05, np.float32), f"s{i + 1}"),
                  numpy_helper.from_array(np.array(i % 3 - 1, np.int8), f"z{i + 1}")]
        out = "y" if i == layers - 1 else f"c{i}"
        nodes.append(helper.make_node("QLinearConv", [prev, f"s{i}", f"z{i}", f"w{i}", f"ws{i}", f"wz{i}", f"s{i + 1}",
                                                      f"z{i + 1}"], [out], pads=[1, 1, 1, 1], name=f"conv{i}"))
        prev = out
    return _checked_model(nodes, f"int8_conv_chain{layers}", inits, ("x", TensorProto.INT8, [1, 4, 8, 8]),
                          ("y", TensorProto.INT8, [1, 4, 8, 8]))


def int32_add_chain(n: int = 70, residual: bool = False):
    """x int32 (4,) -> ``n`` Adds of one constant -> y: more nodes than the firmware takes per graph (64).
    ``residual``: the last Add adds x instead (x is read by the first node and the last)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Add", ["x" if i == 0 else f"t{i - 1}", "x" if residual and i == n - 1 else "c"],
                              ["y" if i == n - 1 else f"t{i}"], name=f"add{i}") for i in range(n)]
    return _checked_model(nodes, f"int32_add_chain{n}", [numpy_helper.from_array(np.arange(1, 5, dtype=np.int32), "c")],
                          ("x", TensorProto.INT32, [4]), ("y", TensorProto.INT32, [4]))


def int32_relu_neg_islands(k: int = 25):
    """x int32 (8,) -> k x (Relu -> Neg) -> y: k device partitions (Relu) between host ops (Neg), two device tensors
    each, more than the firmware's 48 handles at k = 25."""
    from onnx import TensorProto, helper

    nodes, prev = [], "x"
    for i in range(k):
        nodes += [helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Neg", [f"r{i}"], ["y" if i == k - 1 else f"n{i}"], name=f"neg{i}")]
        prev = f"n{i}"
    return _checked_model(nodes, f"int32_relu_neg{k}", [], ("x", TensorProto.INT32, [8]), ("y", TensorProto.INT32, [8]))
