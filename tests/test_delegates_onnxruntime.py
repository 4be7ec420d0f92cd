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
