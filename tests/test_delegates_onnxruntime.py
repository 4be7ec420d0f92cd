"""The onnxruntime delegate's IOBinding: outputs written into the caller's buffers, and an output handed as None
(a data-dependent shape) allocated by onnxruntime at each run, through failed runs and buffer changes."""
import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from edgert.delegates.onnxruntime import CPU, OnnxruntimePartition
from edgert.errors import DeviceError

from onnx_models import ort_run


def _model():
    """x[6], i[1] -> nz = NonZero(x > 0) (a data-dependent length), g = Gather(x, i) (fails for an index out of
    range), r = Relu(x); outputs nz, g, r in that order."""
    nodes = [h.make_node("Greater", ["x", "zero"], ["m"]), h.make_node("NonZero", ["m"], ["nz"]),
             h.make_node("Gather", ["x", "i"], ["g"]), h.make_node("Relu", ["x"], ["r"])]
    V = h.make_tensor_value_info
    g = h.make_graph(nodes, "g", [V("x", T.FLOAT, [6]), V("i", T.INT64, [1])],
                     [V("nz", T.INT64, [1, None]), V("g", T.FLOAT, [1]), V("r", T.FLOAT, [6])],
                     [h.make_tensor("zero", T.FLOAT, [], [0.0])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("bound", [False, True])
def test_an_output_handed_as_none_is_allocated_at_each_run(bound):
    model = _model()
    part = OnnxruntimePartition(model, ["x", "i"], ["nz", "g", "r"], [CPU])
    assert part.allocates_outputs
    x, i = np.zeros(6, np.float32), np.zeros(1, np.int64)
    g, r = np.zeros(1, np.float32), np.zeros(6, np.float32)
    outs = {"nz": None, "g": g, "r": r}
    run = part.bound_run({"x": x, "i": i}, outs) if bound else (lambda: part.run({"x": x, "i": i}, outs))
    seen = []
    for vals, idx in (([1, -1, 2, -2, 3, 4], 0), ([1] * 6, 5), ([-1] * 6, 7), ([-1, 1, -1, 1, -1, 1], 2)):
        x[:] = vals
        i[:] = idx
        if idx >= 6:
            with pytest.raises(DeviceError, match="Gather"):
                run()
            continue
        run()
        want = ort_run(model, {"x": x, "i": i})
        for name, w in zip(("nz", "g", "r"), want):
            np.testing.assert_array_equal(outs[name], w)
        assert outs["g"] is g and outs["r"] is r  # the caller's buffers stay
        seen.append((outs["nz"], want[0]))
    for a, w in seen:  # each run's array is its own
        np.testing.assert_array_equal(a, w)
    # a buffer where onnxruntime allocated, then None again: each as handed
    x[:] = [1, 1, -1, -1, 1, 1]
    i[:] = 1
    nz = np.zeros((1, 4), np.int64)
    part.run({"x": x, "i": i}, {"nz": nz, "g": g, "r": r})
    np.testing.assert_array_equal(nz, [[0, 1, 4, 5]])
    outs = {"nz": None, "g": g, "r": r}
    x[:] = [1, -1, -1, -1, -1, 1]
    part.run({"x": x, "i": i}, outs)
    np.testing.assert_array_equal(outs["nz"], [[0, 5]])
    np.testing.assert_array_equal(nz, [[0, 1, 4, 5]])  # no longer bound: left as it was


def test_int8_products_are_exact_on_every_cpu():
    """A MatMulInteger whose u8 x s8 pairs (255 * 127 twice = 64770) overflow int16: onnxruntime's default kernels on
    x86 without VNNI saturate them; the sessions edgert makes use its exact products, so the delegate's output is
    the int64 product numpy computes."""
    import edgert

    rng = np.random.default_rng(3)
    w = rng.integers(100, 128, (64, 24)).astype(np.int8)
    w[:, ::3] *= -1
    V = h.make_tensor_value_info
    g = h.make_graph([h.make_node("MatMulInteger", ["x", "w"], ["y"])], "mmi", [V("x", T.UINT8, [3, 64])],
                     [V("y", T.INT32, [3, 24])], [h.make_tensor("w", T.INT8, [64, 24], w.tobytes(), raw=True)])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    x = rng.integers(200, 256, (3, 64)).astype(np.uint8)
    x[1] = 255
    want = x.astype(np.int64) @ w.astype(np.int64)
    got = edgert.Session(model, "host", core=False).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scale_shape", [(24,), (2, 24)])
def test_per_axis_int8_dequantize_without_zero_point_runs(scale_shape):
    """onnxruntime's exact int8 mode rewrites int8 weights to uint8 and fails on a per-axis (or blocked)
    DequantizeLinear without a zero point; edgert gives such a node an explicit zero point of zeros."""
    import edgert

    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, (64, 24)).astype(np.int8)
    s = rng.uniform(0.01, 0.05, scale_shape).astype(np.float32)
    attrs = {"axis": 1} if len(scale_shape) == 1 else {"axis": 0, "block_size": 32}
    V = h.make_tensor_value_info
    g = h.make_graph([h.make_node("DequantizeLinear", ["q", "s"], ["w"], **attrs), h.make_node("MatMul", ["x", "w"], ["y"])],
                     "dq", [V("x", T.FLOAT, [2, 64])], [V("y", T.FLOAT, [2, 24])],
                     [h.make_tensor("q", T.INT8, [64, 24], q.tobytes(), raw=True),
                      h.make_tensor("s", T.FLOAT, list(scale_shape), s.ravel().tolist())])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    x = rng.standard_normal((2, 64)).astype(np.float32)
    wf = q.astype(np.float64) * (s.astype(np.float64) if len(scale_shape) == 1 else np.repeat(s, 32, axis=0))
    got = edgert.Session(model, "host", core=False).run(None, {"x": x})[0]
    want = x.astype(np.float64) @ wf
    # onnxruntime fuses the pair into an int8 product of dynamically quantized activations: 8-bit rounding error
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    assert len(model.graph.node[0].input) == 2  # the caller's model is not changed


def _dq_models():
    """(name, model, weights as float64) for the DequantizeLinear forms onnxruntime 1.32 fails on in its exact int8
    mode: one int8 initializer read by two DequantizeLinear nodes, a Constant node's scale, a DequantizeLinear inside
    an If branch; each y = x @ w (+ x @ w again for the shared one)."""
    rng = np.random.default_rng(6)
    q = rng.integers(-127, 128, (64, 24)).astype(np.int8)
    s = rng.uniform(0.01, 0.05, 24).astype(np.float32)
    w = q.astype(np.float64) * s.astype(np.float64)
    V = h.make_tensor_value_info
    qt = h.make_tensor("q", T.INT8, [64, 24], q.tobytes(), raw=True)
    st = h.make_tensor("s", T.FLOAT, [24], s.tolist())
    io = ([V("x", T.FLOAT, [2, 64])], [V("y", T.FLOAT, [2, 24])])
    shared = h.make_graph([h.make_node("DequantizeLinear", ["q", "s"], ["w1"], axis=1),
                           h.make_node("DequantizeLinear", ["q", "s"], ["w2"], axis=1),
                           h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("MatMul", ["x", "w2"], ["b"]),
                           h.make_node("Add", ["a", "b"], ["y"])], "shared", *io, [qt, st])
    const = h.make_graph([h.make_node("Constant", [], ["sc"], value=st),
                          h.make_node("DequantizeLinear", ["q", "sc"], ["w"], axis=1),
                          h.make_node("MatMul", ["x", "w"], ["y"])], "const", *io, [qt])
    branch = h.make_graph([h.make_node("DequantizeLinear", ["q", "s"], ["wb"], axis=1)], "then", [],
                          [V("wb", T.FLOAT, [64, 24])])
    cond = h.make_graph([h.make_node("If", ["c"], ["w"], then_branch=branch, else_branch=branch),
                         h.make_node("MatMul", ["x", "w"], ["y"])], "cond", *io,
                        [qt, st, h.make_tensor("c", T.BOOL, [], [True])])
    out = []
    for name, g, want_w in (("shared", shared, 2 * w), ("const", const, w), ("if", cond, w)):
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
        m.ir_version = 10
        out.append((name, m, want_w))
    return out


@pytest.mark.parametrize("case", ["shared", "const", "if"])
def test_models_onnxruntime_fails_on_in_exact_mode_run_with_its_default_kernels(case):
    import edgert
    from edgert.delegates.onnxruntime import exact_int8_fails

    name, model, w = next(c for c in _dq_models() if c[0] == case)
    assert exact_int8_fails(model)
    x = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
    want = x.astype(np.float64) @ w
    for core in (False, "auto"):
        got = edgert.Session(model, "host", core=core).run(None, {"x": x})[0]
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()  # int8 activations where onnxruntime fuses
