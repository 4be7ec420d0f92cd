"""Tiny TFLite models written with the schema's flatbuffer builders (``edgert.formats.tflite.build_tflite``), for the
TFLite tests and benchmarks: a float MLP, an INT8 per-channel FULLY_CONNECTED + ADD + RELU + SOFTMAX model, an INT8
CONV_2D + DEPTHWISE_CONV_2D + AVERAGE_POOL_2D model, RESHAPE/CONCATENATION plumbing, and the float MLP as ONNX too.

Quantization parameters are calibrated on the float network with a fixed seed, so activations use their int8 range
(an uncalibrated model saturates and hides arithmetic differences). ``int8_activations`` is the exception: it is
about where each op clamps, over ``ACTIVATION_SCALES``."""
from __future__ import annotations

import numpy as np

from edgert.formats.tflite import build_tflite

NONE, RELU = 0, 1
SAME, VALID = 0, 1


class ModelSpec:
    def __init__(self):
        self.tensors: list[dict] = []
        self.ops: list[dict] = []

    def tensor(self, name, dtype, shape, data=None, q=None, axis=0) -> int:
        t = {"name": name, "dtype": dtype, "shape": tuple(shape), "data": data}
        if q is not None:
            t.update(scale=np.atleast_1d(np.asarray(q[0], np.float32)),
                     zero_point=np.atleast_1d(np.asarray(q[1], np.int64)), quantized_dimension=axis)
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, op, inputs, outputs, options_type=None, **options):
        self.ops.append({"op": op, "inputs": list(inputs), "outputs": list(outputs), "options_type": options_type,
                         "options": options, "version": 1})

    def build(self, inputs, outputs) -> bytes:
        return build_tflite(self.tensors, self.ops, list(inputs), list(outputs))


def calib(a: np.ndarray) -> tuple[float, int]:
    """int8 affine (scale, zero point) covering [min(a, 0), max(a, 0)]."""
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    scale = max(hi - lo, 1e-6) / 255.0
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zp


def quant_weight(w: np.ndarray, per_channel: bool, axis: int = 0):
    """Symmetric int8 weights: per output channel (along ``axis``) or per tensor."""
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        s = np.maximum(np.abs(w).max(axis=red), 1e-8) / 127.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / s.reshape(shape)), -127, 127).astype(np.int8)
        return q, s.astype(np.float32)
    s = np.float32(max(np.abs(w).max(), 1e-8) / 127.0)
    return np.clip(np.round(w / s), -127, 127).astype(np.int8), np.array([s], np.float32)


def fq(a, s, zp):
    """Fake-quantize (the float network the int8 one approximates)."""
    return (np.clip(np.round(a / s) + zp, -128, 127) - zp) * s


# ---- float MLP ---------------------------------------------------------------------------------------------------
def float_mlp_weights(k=16, h=32, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((h, k)).astype(np.float32) * 0.3, rng.standard_normal(h).astype(np.float32) * 0.1,
            rng.standard_normal((n, h)).astype(np.float32) * 0.3, rng.standard_normal(n).astype(np.float32) * 0.1)


def float_mlp(k=16, h=32, n=8, batch=1, seed=0) -> bytes:
    """x[batch,k] -> FULLY_CONNECTED -> RELU -> FULLY_CONNECTED -> SOFTMAX (float32)."""
    w1, b1, w2, b2 = float_mlp_weights(k, h, n, seed)
    m = ModelSpec()
    x = m.tensor("x", "float32", (batch, k))
    tw1, tb1 = m.tensor("w1", "float32", w1.shape, w1), m.tensor("b1", "float32", b1.shape, b1)
    tw2, tb2 = m.tensor("w2", "float32", w2.shape, w2), m.tensor("b2", "float32", b2.shape, b2)
    h1, r1 = m.tensor("h1", "float32", (batch, h)), m.tensor("r1", "float32", (batch, h))
    h2, y = m.tensor("h2", "float32", (batch, n)), m.tensor("y", "float32", (batch, n))
    m.op("FULLY_CONNECTED", [x, tw1, tb1], [h1], "FullyConnectedOptions", FusedActivationFunction=NONE)
    m.op("RELU", [h1], [r1])
    m.op("FULLY_CONNECTED", [r1, tw2, tb2], [h2], "FullyConnectedOptions", FusedActivationFunction=NONE)
    m.op("SOFTMAX", [h2], [y], "SoftmaxOptions", Beta=1.0)
    return m.build([x], [y])


def float_mlp_onnx(k=16, h=32, n=8, batch=1, seed=0):
    """The same network as ONNX: Gemm(transB) -> Relu -> Gemm(transB) -> Softmax."""
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = float_mlp_weights(k, h, n, seed)
    inits = [numpy_helper.from_array(a, nm) for a, nm in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], "fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"], "relu"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], "fc2", transB=1),
             helper.make_node("Softmax", ["h2"], ["y"], "softmax", axis=-1)]
    g = helper.make_graph(nodes, "float_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ---- INT8 FULLY_CONNECTED + ADD + RELU + SOFTMAX -----------------------------------------------------------------
def int8_fc(k=64, h=48, n=10, batch=4, seed=1, float_io=True, a_rows=None) -> bytes:
    """x -> QUANTIZE -> {FC_a (per-channel), FC_b (per-channel)} -> ADD -> RELU -> FC_c (per-tensor) -> SOFTMAX ->
    DEQUANTIZE. ``float_io=False`` drops the QUANTIZE/DEQUANTIZE edges (int8 in, int8 out). ``a_rows``: the rows
    the file declares for FC_a's output (default ``batch``; another value is a file whose shapes disagree with its
    ops: LiteRT computes ``batch`` rows)."""
    rng = np.random.default_rng(seed)
    calx = rng.uniform(-1, 1, (256, k)).astype(np.float32)
    wa, wb = rng.standard_normal((h, k)) * 0.2, rng.standard_normal((h, k)) * 0.2
    wc = rng.standard_normal((n, h)) * 0.3
    ba, bb, bc = rng.standard_normal(h) * 0.1, rng.standard_normal(h) * 0.1, rng.standard_normal(n) * 0.1
    sx, zx = calib(calx)
    x8 = fq(calx, sx, zx)
    qa, swa = quant_weight(wa, True)
    qb, swb = quant_weight(wb, True)
    qc, swc = quant_weight(wc, False)
    fa = x8 @ (qa * swa[:, None]).T + ba
    fb = x8 @ (qb * swb[:, None]).T + bb
    sa, za = calib(fa)
    sb, zb = calib(fb)
    fadd = fq(fa, sa, za) + fq(fb, sb, zb)
    sadd, zadd = calib(fadd)
    frelu = np.maximum(fq(fadd, sadd, zadd), 0)
    fc = frelu @ (qc * swc[0]).T + bc
    sc, zc = calib(fc)

    m = ModelSpec()
    xf = m.tensor("x", "float32", (batch, k)) if float_io else None
    xq = m.tensor("x_q", "int8", (batch, k), q=(sx, zx))
    twa = m.tensor("wa", "int8", qa.shape, qa, q=(swa, np.zeros(h, np.int64)))
    tba = m.tensor("ba", "int32", (h,), np.round(ba / (sx * swa)).astype(np.int32), q=(sx * swa, np.zeros(h)))
    twb = m.tensor("wb", "int8", qb.shape, qb, q=(swb, np.zeros(h, np.int64)))
    tbb = m.tensor("bb", "int32", (h,), np.round(bb / (sx * swb)).astype(np.int32), q=(sx * swb, np.zeros(h)))
    ta = m.tensor("a", "int8", (batch if a_rows is None else a_rows, h), q=(sa, za))
    tb = m.tensor("b", "int8", (batch, h), q=(sb, zb))
    tadd = m.tensor("sum", "int8", (batch, h), q=(sadd, zadd))
    trelu = m.tensor("relu", "int8", (batch, h), q=(sadd, zadd))
    twc = m.tensor("wc", "int8", qc.shape, qc, q=(swc, [0]))
    tbc = m.tensor("bc", "int32", (n,), np.round(bc / (sadd * swc[0])).astype(np.int32), q=(sadd * swc, [0]))
    tc = m.tensor("logits", "int8", (batch, n), q=(sc, zc))
    tp = m.tensor("probs_q", "int8", (batch, n), q=(1.0 / 256, -128))
    yf = m.tensor("probs", "float32", (batch, n)) if float_io else None
    if float_io:
        m.op("QUANTIZE", [xf], [xq])
    m.op("FULLY_CONNECTED", [xq, twa, tba], [ta], "FullyConnectedOptions", FusedActivationFunction=NONE)
    m.op("FULLY_CONNECTED", [xq, twb, tbb], [tb], "FullyConnectedOptions", FusedActivationFunction=NONE)
    m.op("ADD", [ta, tb], [tadd], "AddOptions", FusedActivationFunction=NONE)
    m.op("RELU", [tadd], [trelu])
    m.op("FULLY_CONNECTED", [trelu, twc, tbc], [tc], "FullyConnectedOptions", FusedActivationFunction=NONE)
    m.op("SOFTMAX", [tc], [tp], "SoftmaxOptions", Beta=1.0)
    if float_io:
        m.op("DEQUANTIZE", [tp], [yf])
        return m.build([xf], [yf])
    return m.build([xq], [tp])


def int8_fc_single(k=256, n=256, batch=1, per_channel=True, seed=2) -> tuple[bytes, dict]:
    """One INT8 FULLY_CONNECTED (int8 in, int8 out) and its parameters, for kernel tests and the benchmark."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * 0.1
    b = rng.standard_normal(n) * 0.1
    sx, zx = 1.0 / 127, -3
    q, sw = quant_weight(w, per_channel)
    fy = rng.uniform(-1, 1, (64, k)) @ (q * sw.reshape(-1, 1)).T + b
    sy, zy = calib(fy)
    bias = np.round(b / (sx * (sw if per_channel else sw[0]))).astype(np.int32)
    m = ModelSpec()
    tx = m.tensor("x", "int8", (batch, k), q=(sx, zx))
    tw = m.tensor("w", "int8", (n, k), q, q=(sw, np.zeros(sw.size, np.int64)))
    tb = m.tensor("bias", "int32", (n,), bias, q=(sx * sw, np.zeros(sw.size)))
    ty = m.tensor("y", "int8", (batch, n), q=(sy, zy))
    m.op("FULLY_CONNECTED", [tx, tw, tb], [ty], "FullyConnectedOptions", FusedActivationFunction=NONE)
    return m.build([tx], [ty]), {"w": q, "w_scale": sw, "bias": bias, "x": (sx, zx), "y": (sy, zy)}


# ---- INT8 CONV_2D + DEPTHWISE_CONV_2D + AVERAGE_POOL_2D ----------------------------------------------------------
def int8_conv(hw=8, cin=3, cout=8, batch=1, seed=3, pool_stride_h=2) -> bytes:
    """x[batch,hw,hw,cin] -> QUANTIZE -> CONV_2D 3x3 SAME relu (per-channel) -> DEPTHWISE_CONV_2D 3x3 SAME
    (per-channel) -> AVERAGE_POOL_2D 2x2/2 -> DEQUANTIZE. ``pool_stride_h``: the pool's vertical stride (another
    than 2 is a file whose declared shapes disagree with its ops: they stay those of stride 2)."""
    rng = np.random.default_rng(seed)
    wc = rng.standard_normal((cout, 3, 3, cin)) * 0.3
    bc = rng.standard_normal(cout) * 0.1
    wd = rng.standard_normal((1, 3, 3, cout)) * 0.3
    bd = rng.standard_normal(cout) * 0.1
    sx, zx = 2.0 / 255, 0
    qc, swc = quant_weight(wc, True, 0)
    qd, swd = quant_weight(wd, True, 3)
    # calibrate by a float pass (numpy, NHWC, SAME padding)
    x = fq(rng.uniform(-1, 1, (16, hw, hw, cin)), sx, zx)

    def conv(a, w):  # a NHWC, w OHWI
        p = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros(a.shape[:3] + (w.shape[0],))
        for i in range(3):
            for j in range(3):
                out += p[:, i:i + a.shape[1], j:j + a.shape[2], :] @ w[:, i, j, :].T
        return out

    def dw(a, w):  # w 1HWC
        p = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros(a.shape)
        for i in range(3):
            for j in range(3):
                out += p[:, i:i + a.shape[1], j:j + a.shape[2], :] * w[0, i, j, :]
        return out

    f1 = np.maximum(conv(x, qc * swc[:, None, None, None]) + bc, 0)
    s1, z1 = calib(f1)
    f2 = dw(fq(f1, s1, z1), qd * swd) + bd
    s2, z2 = calib(f2)
    m = ModelSpec()
    xf = m.tensor("image", "float32", (batch, hw, hw, cin))
    xq = m.tensor("image_q", "int8", (batch, hw, hw, cin), q=(sx, zx))
    twc = m.tensor("conv_w", "int8", qc.shape, qc, q=(swc, np.zeros(cout, np.int64)), axis=0)
    tbc = m.tensor("conv_b", "int32", (cout,), np.round(bc / (sx * swc)).astype(np.int32), q=(sx * swc, np.zeros(cout)))
    t1 = m.tensor("conv", "int8", (batch, hw, hw, cout), q=(s1, z1))
    twd = m.tensor("dw_w", "int8", qd.shape, qd, q=(swd, np.zeros(cout, np.int64)), axis=3)
    tbd = m.tensor("dw_b", "int32", (cout,), np.round(bd / (s1 * swd)).astype(np.int32), q=(s1 * swd, np.zeros(cout)))
    t2 = m.tensor("dw", "int8", (batch, hw, hw, cout), q=(s2, z2))
    t3 = m.tensor("pool", "int8", (batch, hw // 2, hw // 2, cout), q=(s2, z2))
    yf = m.tensor("features", "float32", (batch, hw // 2, hw // 2, cout))
    m.op("QUANTIZE", [xf], [xq])
    m.op("CONV_2D", [xq, twc, tbc], [t1], "Conv2DOptions", Padding=SAME, StrideW=1, StrideH=1,
         FusedActivationFunction=RELU, DilationWFactor=1, DilationHFactor=1)
    m.op("DEPTHWISE_CONV_2D", [t1, twd, tbd], [t2], "DepthwiseConv2DOptions", Padding=SAME, StrideW=1, StrideH=1,
         DepthMultiplier=1, FusedActivationFunction=NONE, DilationWFactor=1, DilationHFactor=1)
    m.op("AVERAGE_POOL_2D", [t2], [t3], "Pool2DOptions", Padding=VALID, StrideW=2, StrideH=pool_stride_h,
         FilterWidth=2, FilterHeight=2, FusedActivationFunction=NONE)
    m.op("DEQUANTIZE", [t3], [yf])
    return m.build([xf], [yf])


# ---- RESHAPE / CONCATENATION plumbing ----------------------------------------------------------------------------
def int8_plumbing(seed=4) -> bytes:
    """a[1,4,4,2], b[1,8] (float) -> QUANTIZE each -> RESHAPE a to [1,32] -> CONCATENATION [1,40] -> FC (per-channel)
    -> DEQUANTIZE."""
    rng = np.random.default_rng(seed)
    s, z = 2.0 / 255, 0
    w = rng.standard_normal((6, 40)) * 0.2
    bias = rng.standard_normal(6) * 0.1
    qw, sw = quant_weight(w, True)
    fy = fq(rng.uniform(-1, 1, (64, 40)), s, z) @ (qw * sw[:, None]).T + bias
    sy, zy = calib(fy)
    m = ModelSpec()
    af = m.tensor("a", "float32", (1, 4, 4, 2))
    bf = m.tensor("b", "float32", (1, 8))
    aq = m.tensor("a_q", "int8", (1, 4, 4, 2), q=(s, z))
    bq = m.tensor("b_q", "int8", (1, 8), q=(s, z))
    shape = m.tensor("shape", "int32", (2,), np.array([1, 32], np.int32))
    ar = m.tensor("a_flat", "int8", (1, 32), q=(s, z))
    cat = m.tensor("cat", "int8", (1, 40), q=(s, z))
    tw = m.tensor("w", "int8", qw.shape, qw, q=(sw, np.zeros(6, np.int64)))
    tb = m.tensor("bias", "int32", (6,), np.round(bias / (s * sw)).astype(np.int32), q=(s * sw, np.zeros(6)))
    yq = m.tensor("y_q", "int8", (1, 6), q=(sy, zy))
    yf = m.tensor("y", "float32", (1, 6))
    m.op("QUANTIZE", [af], [aq])
    m.op("QUANTIZE", [bf], [bq])
    m.op("RESHAPE", [aq, shape], [ar], "ReshapeOptions", NewShape=np.array([1, 32], np.int32))
    m.op("CONCATENATION", [ar, bq], [cat], "ConcatenationOptions", Axis=1, FusedActivationFunction=NONE)
    m.op("FULLY_CONNECTED", [cat, tw, tb], [yq], "FullyConnectedOptions", FusedActivationFunction=NONE)
    m.op("DEQUANTIZE", [yq], [yf])
    return m.build([af, bf], [yf])


# ---- fused and standalone ReLU-family activations ----------------------------------------------------------------
RELU_FAMILY = {"RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}  # TFLite's ActivationFunctionType codes
# (output scale, zero point) for int8_activations: LiteRT quantizes the bounds 6 and +-1 per kernel (XNNPACK:
# lrintf(v / s + zp) in float32; TFLite's own: zp + std::round(v / s)), and these put the quotient on or next to a tie
_F32 = np.float32
ACTIVATION_SCALES = [
    (0.8, 0),                          # 6 / s = 7.5 in float32: 8 either way (7 from a float64 quotient)
    (0.48, 0),                         # 6 / s = 12.5 in float32 (12.500000279 in float64): XNNPACK 12, TFLite 13
    (0.4, 0),                          # -1 / s = -2.5 in float32: XNNPACK -2, TFLite -3
    (float(_F32(6 / 6.5)), 3),         # 6 / s = 6.5 in float32
    (float(_F32(1 / 7.5)), -2),        # +-1 / s = +-7.5 in float32
    (float(_F32(6 / 7.4999995)), 100),  # 6 / s = 7.4999995: + zp rounds to 107.5 in float32, so XNNPACK 108
    (float(_F32(1 / 3.4999998)), -100),  # -1 / s + zp rounds to -103.5, 1 / s + zp to -96.5 in float32
] + [(float(_F32(s)), int(z)) for s, z in zip(np.random.default_rng(8).uniform(0.03, 1.0, 6),
                                              np.random.default_rng(9).integers(-30, 30, 6))]


def int8_activations(scale: float, zp: int, seed: int = 5) -> bytes:
    """FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, ADD and AVERAGE_POOL_2D, each with RELU, RELU_N1_TO_1 and RELU6
    fused, and standalone RELU6 and RELU_N1_TO_1: 17 int8 outputs of scale ``scale`` and zero point ``zp`` (the pool
    and the standalone activations read an input of that quantization, as TFLite wants). Every other op's
    pre-activations reach well past the clamp bounds, so the outputs show where each op clamps."""
    rng = np.random.default_rng(seed)
    spread = 6 + 20 * scale  # float standard deviation of the pre-activations: past 6 and +-1 often, not always
    sx = 0.5  # x: int8 codes of std ~74, so x * w sums to std ~ sqrt(K) * 37 * 73 * s_w

    def weights(shape, k):
        q = rng.integers(-127, 128, shape).astype(np.int8)
        return q, np.array([spread / (np.sqrt(k) * 37 * 73)], np.float32)

    m = ModelSpec()
    y_q = (scale, zp)
    outs = []
    xfc = m.tensor("x_fc", "int8", (4, 16), q=(sx, 0))
    qw, sw = weights((8, 16), 16)
    tw = m.tensor("fc_w", "int8", qw.shape, qw, q=(sw, [0]))
    tb = m.tensor("fc_b", "int32", (8,), rng.integers(-200, 200, 8).astype(np.int32), q=(sx * sw, [0]))
    xc = m.tensor("x_conv", "int8", (1, 6, 6, 2), q=(sx, -3))
    qc, swc = weights((4, 3, 3, 2), 18)
    twc = m.tensor("conv_w", "int8", qc.shape, qc, q=(swc, [0]))
    tbc = m.tensor("conv_b", "int32", (4,), rng.integers(-200, 200, 4).astype(np.int32), q=(sx * swc, [0]))
    xd = m.tensor("x_dw", "int8", (1, 6, 6, 3), q=(sx, 4))
    qd, swd = weights((1, 3, 3, 3), 9)
    twd = m.tensor("dw_w", "int8", qd.shape, qd, q=(swd, [0]), axis=3)
    tbd = m.tensor("dw_b", "int32", (3,), rng.integers(-200, 200, 3).astype(np.int32), q=(sx * swd, [0]))
    xa = m.tensor("x_add_a", "int8", (2, 16), q=(spread / 74, 7))
    xb = m.tensor("x_add_b", "int8", (2, 16), q=(spread / 90, -11))
    xp = m.tensor("x_pool", "int8", (1, 5, 5, 3), q=y_q)
    for act, code in RELU_FAMILY.items():
        a = act.lower()
        outs.append(m.tensor(f"fc_{a}", "int8", (4, 8), q=y_q))
        m.op("FULLY_CONNECTED", [xfc, tw, tb], [outs[-1]], "FullyConnectedOptions", FusedActivationFunction=code)
        outs.append(m.tensor(f"conv_{a}", "int8", (1, 6, 6, 4), q=y_q))
        m.op("CONV_2D", [xc, twc, tbc], [outs[-1]], "Conv2DOptions", Padding=SAME, StrideW=1, StrideH=1,
             FusedActivationFunction=code, DilationWFactor=1, DilationHFactor=1)
        outs.append(m.tensor(f"dw_{a}", "int8", (1, 6, 6, 3), q=y_q))
        m.op("DEPTHWISE_CONV_2D", [xd, twd, tbd], [outs[-1]], "DepthwiseConv2DOptions", Padding=SAME, StrideW=1,
             StrideH=1, DepthMultiplier=1, FusedActivationFunction=code, DilationWFactor=1, DilationHFactor=1)
        outs.append(m.tensor(f"add_{a}", "int8", (2, 16), q=y_q))
        m.op("ADD", [xa, xb], [outs[-1]], "AddOptions", FusedActivationFunction=code)
        outs.append(m.tensor(f"pool_{a}", "int8", (1, 4, 5, 3), q=y_q))
        m.op("AVERAGE_POOL_2D", [xp], [outs[-1]], "Pool2DOptions", Padding=VALID, StrideW=1, StrideH=1,
             FilterWidth=1, FilterHeight=2, FusedActivationFunction=code)
    xr = m.tensor("x_relu", "int8", (2, 32), q=y_q)
    for act in ("RELU6", "RELU_N1_TO_1"):
        outs.append(m.tensor(act.lower(), "int8", (2, 32), q=y_q))
        m.op(act, [xr], [outs[-1]])
    return m.build([xfc, xc, xd, xa, xb, xp, xr], outs)


def int8_fc_activation(m: int, k: int, n: int, scale: float, zp: int, act: int, seed: int = 6) -> bytes:
    """One INT8 FULLY_CONNECTED ``x[m, k] -> y[m, n]`` (per-channel weights, bias) with fused activation ``act`` and an
    output of scale ``scale`` and zero point ``zp``; pre-activations spread as in ``int8_activations``."""
    rng = np.random.default_rng(seed)
    sx, spread = 0.5, 6 + 20 * scale
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    sw = (spread / (np.sqrt(k) * 37 * 73) * rng.uniform(0.5, 1.5, n)).astype(np.float32)
    mm = ModelSpec()
    tx = mm.tensor("x", "int8", (m, k), q=(sx, -1))
    tw = mm.tensor("w", "int8", (n, k), q, q=(sw, np.zeros(n, np.int64)))
    tb = mm.tensor("bias", "int32", (n,), rng.integers(-2000, 2000, n).astype(np.int32), q=(sx * sw, np.zeros(n)))
    ty = mm.tensor("y", "int8", (m, n), q=(scale, zp))
    mm.op("FULLY_CONNECTED", [tx, tw, tb], [ty], "FullyConnectedOptions", FusedActivationFunction=act)
    return mm.build([tx], [ty])


def clamping_feeds(graph, seed=0) -> dict:
    """Random int8 feeds for every input of a loaded Graph, two in five elements -128 and two in five 127, so that
    pooled and unscaled values reach every clamp bound too."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in graph.inputs:
        t = graph.tensors[n]
        pick = rng.integers(0, 5, t.shape)
        out[n] = np.where(pick < 2, -128, np.where(pick < 4, 127, rng.integers(-128, 128, t.shape))).astype(t.dtype)
    return out


def feeds_for(interp_or_graph, seed=0) -> dict:
    """Random feeds in [-1, 1] for every input of a loaded Graph."""
    rng = np.random.default_rng(seed)
    g = interp_or_graph
    out = {}
    for n in g.inputs:
        t = g.tensors[n]
        if t.dtype == "float32":
            out[n] = rng.uniform(-1, 1, t.shape).astype(np.float32)
        else:
            out[n] = rng.integers(-128, 128, t.shape).astype(t.dtype)
    return out


def litert_reference(data: bytes, feeds: dict, names: list[str], op_resolver: str = "AUTO") -> list[np.ndarray]:
    """Whole-model outputs from plain LiteRT (XNNPACK by default; ``BUILTIN_REF`` for the reference kernels)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=data, experimental_op_resolver_type=getattr(OpResolverType, op_resolver))
    it.allocate_tensors()
    for d, (n, a) in zip(it.get_input_details(), feeds.items()):
        it.set_tensor(d["index"], a)
    it.invoke()
    return [it.get_tensor(d["index"]) for d in it.get_output_details()]


# ---- options tables of another op ---------------------------------------------------------------------------------
FOREIGN_OPTIONS = ("fc_conv2d", "fc_add", "add_fc", "fc_then_add")


def foreign_options(kind: str, seed: int = 7) -> bytes:
    """INT8 ops whose ``builtin_options_type`` names another op's table, with a fused activation in it: LiteRT reads
    its own table as null and runs the op without one. ``fc_conv2d`` / ``fc_add``: a FULLY_CONNECTED with
    Conv2DOptions / AddOptions (RELU); ``add_fc``: an ADD with FullyConnectedOptions (RELU6); ``fc_then_add``: an FC
    with AddOptions (RELU) feeding such an ADD (the C core's FC beside an exported LiteRT segment)."""
    rng = np.random.default_rng(seed)
    m = ModelSpec()
    x = m.tensor("x", "int8", (4, 16), q=(0.05, -3))
    ins, last = [x], x
    if kind != "add_fc":
        w = m.tensor("w", "int8", (16, 16), rng.integers(-127, 128, (16, 16)).astype(np.int8),
                     q=(rng.uniform(0.001, 0.003, 16).astype(np.float32), np.zeros(16, np.int64)))
        last = m.tensor("fc", "int8", (4, 16), q=(0.04, 5))
        conv = dict(Padding=SAME, StrideW=1, StrideH=1, DilationWFactor=1, DilationHFactor=1)
        m.op("FULLY_CONNECTED", [x, w, -1], [last], "Conv2DOptions" if kind == "fc_conv2d" else "AddOptions",
             FusedActivationFunction=RELU, **(conv if kind == "fc_conv2d" else {}))
    if kind in ("add_fc", "fc_then_add"):
        b = m.tensor("b", "int8", (4, 16), q=(0.05, 0))
        y = m.tensor("y", "int8", (4, 16), q=(0.02, 0))
        m.op("ADD", [last, b], [y], "FullyConnectedOptions", FusedActivationFunction=3)
        ins, last = [x, b], y
    return m.build(ins, [last])


# ---- INT8 FULLY_CONNECTED quantization XNNPACK may or may not take -------------------------------------------------
def int8_fc_quant(n=16, k=64, m=8, sw=None, xs=0.05, ys=0.04, bias="matched", bias_axis=0, x_axis=0, y_axis=0,
                  version=1, seed=8) -> bytes:
    """One INT8 FULLY_CONNECTED ``x[m, k] -> y[m, n]`` with per-channel weight scales ``sw`` (default: uniform in
    [0.001, 0.003)) and a bias: ``"matched"`` (scales s_x * s_w), None (absent), ``"unquantized"`` (no quantization
    parameters) or a (scales, zero points) pair; ``x_axis`` / ``y_axis`` / ``bias_axis`` the quantized_dimension
    written for x / y / the bias, ``version`` the operator version."""
    rng = np.random.default_rng(seed)
    sw = rng.uniform(0.001, 0.003, n).astype(np.float32) if sw is None else np.asarray(sw, np.float32)
    mm = ModelSpec()
    tx = mm.tensor("x", "int8", (m, k), q=(xs, -3), axis=x_axis)
    tw = mm.tensor("w", "int8", (n, k), rng.integers(-127, 128, (n, k)).astype(np.int8),
                   q=(sw, np.zeros(sw.size, np.int64)))
    ins = [tx, tw]
    if bias is None:
        ins.append(-1)
    else:
        bq = {"matched": (np.float32(xs) * sw, np.zeros(sw.size)), "unquantized": None}.get(bias) \
            if isinstance(bias, str) else bias
        ins.append(mm.tensor("b", "int32", (n,), rng.integers(-500, 500, n).astype(np.int32), q=bq, axis=bias_axis))
    ty = mm.tensor("y", "int8", (m, n), q=(ys, 5), axis=y_axis)
    mm.op("FULLY_CONNECTED", ins, [ty], "FullyConnectedOptions", FusedActivationFunction=NONE)
    mm.ops[-1]["version"] = version
    return mm.build([tx], [ty])


def xnnpack_verdict(data: bytes) -> str:
    """What plain LiteRT does with a one-op model: ``"took"`` (its XNNPACK delegate runs the op), ``"declined"``
    (TFLite's own kernel runs it) or ``"refused"`` (the model does not allocate)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    try:
        it.allocate_tensors()
    except RuntimeError:
        return "refused"
    return "took" if "DELEGATE" in [d["op_name"] for d in it._get_ops_details()] else "declined"


# ---- variable tensors -----------------------------------------------------------------------------------------------
def with_variables(seed=9) -> bytes:
    """x (int8, 4x16) -> FULLY_CONNECTED -> CONCATENATION with ``v`` (an int8 variable tensor, zero point 7, no buffer)
    -> y (8x8); and f (float32) + ``fv`` (a float variable) -> z. No op updates either variable: LiteRT resets them
    to their zero point / 0 and they stay there."""
    rng = np.random.default_rng(seed)
    q = (0.04, 7)
    m = ModelSpec()
    x = m.tensor("x", "int8", (4, 16), q=(0.05, -3))
    w = m.tensor("w", "int8", (8, 16), rng.integers(-127, 128, (8, 16)).astype(np.int8),
                 q=(np.full(8, 0.002, np.float32), np.zeros(8, np.int64)))
    fc = m.tensor("fc", "int8", (4, 8), q=q)
    v = m.tensor("v", "int8", (4, 8), q=q)
    y = m.tensor("y", "int8", (8, 8), q=q)
    f = m.tensor("f", "float32", (2, 3))
    fv = m.tensor("fv", "float32", (2, 3))
    z = m.tensor("z", "float32", (2, 3))
    for t in (v, fv):
        m.tensors[t]["is_variable"] = True
    m.op("FULLY_CONNECTED", [x, w, -1], [fc], "FullyConnectedOptions")
    m.op("CONCATENATION", [fc, v], [y], "ConcatenationOptions", Axis=0)
    m.op("ADD", [f, fv], [z], "AddOptions")
    return m.build([x, f], [y, z])
