"""Tiny ONNX models built with onnx.helper, shared by the graph, ONNX-loader and profile tests."""
import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits=(), value_info=(), opset=OPSET, name="g", extra_opsets=()):
    g = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 8
    return m


def mlp(batch="batch", d_in=8, d_hidden=16, d_out=4, seed=0):
    """x[batch, d_in] -> MatMul+Add -> Relu -> MatMul+Add -> Relu -> y[batch, d_out]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((d_in, d_hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(d_hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((d_hidden, d_out)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(d_out).astype(np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="add1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu1"),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"], name="mm2"),
        helper.make_node("Add", ["h4", "b2"], ["h5"], name="add2"),
        helper.make_node("Relu", ["h5"], ["y"], name="relu2"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [batch, d_in])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [batch, d_out])], [w1, b1, w2, b2], name="mlp")


def convnet(seed=0):
    """x[1,3,16,16] -> Conv(8,3x3) -> Relu -> MaxPool -> Conv(4,3x3) -> GlobalAveragePool -> Flatten -> y[1,4]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "cw1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "cb1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3, "cw2"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "cb2")]
    nodes = [
        helper.make_node("Conv", ["x", "cw1", "cb1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "cw2", "cb2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits, name="convnet")


def if_model():
    """y = If(sum(x) > 0, then: x * k, else: x - k), where k is an outer-scope initializer both branches read."""
    k = numpy_helper.from_array(np.full(4, 2.0, np.float32), "k")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t_out"], name="then_mul")], "then", [],
                               [helper.make_tensor_value_info("t_out", T.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "k"], ["e_out"], name="else_sub")], "else", [],
                               [helper.make_tensor_value_info("e_out", T.FLOAT, [4])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [4])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [4])], [k, zero], name="ifnet")


def calibration_reader(input_name, shape, n=8, seed=0):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.data = iter([{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)])

        def get_next(self):
            return next(self.data, None)

    return Reader()


def qdq_convnet(tmp_path):
    """The convnet quantized to int8 QDQ with onnxruntime.quantization.quantize_static; returns its path."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = tmp_path / "conv_f32.onnx", tmp_path / "conv_qdq.onnx"
    onnx.save(convnet(), src)
    quantize_static(str(src), str(dst), calibration_reader("x", (1, 3, 16, 16)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    return dst


def ort_run(model, feeds):
    """Whole-model outputs from onnxruntime's CPU provider: the reference edgert's outputs are compared with.
    ``model`` is a path or an onnx.ModelProto."""
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort_session(src).run(None, feeds)


def ort_session(src):
    """An onnxruntime CPU session of ``src`` (a path or model bytes) with exact int8 products: on x86 without VNNI
    onnxruntime's default u8s8 kernels saturate int16 pair sums, and this entry switches them to exact u8u8 ones
    (a no-op elsewhere), so the reference is the arithmetic the operators define. In that mode onnxruntime 1.32
    fails on a per-axis int8 DequantizeLinear without a zero point, so those get an explicit one of zeros first
    (the same model: an absent zero point is zero)."""
    import onnxruntime as ort

    from edgert.delegates.onnxruntime import exact_int8_fails, explicit_zero_points

    model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src)
    so = ort.SessionOptions()
    if not exact_int8_fails(model):  # models onnxruntime fails on in that mode: its default kernels
        explicit_zero_points(model)
        so.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
