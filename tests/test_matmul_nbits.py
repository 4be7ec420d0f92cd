"""from_matmul_nbits against onnxruntime running the same com.microsoft MatMulNBits node (bits=4).

ORT's effective weights are read by feeding the identity (y = I @ W^T), so imported.dequantize() is compared with
exactly what ORT multiplies; edgert.matmul is compared with ORT's own x @ W^T.
"""
import functools

import numpy as np
import pytest

import edgert

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FP16_UNIT_ROUNDOFF = 2.0**-11
# d and m are stored as fp16: d = fp16(scale) moves each weight by <= 2^-11 |scale| |q - 8|, m = fp16(-zp*scale)
# by <= 2^-11 |zp * scale|; block_size 16 stores each weight as fp16 (<= 2^-11 |w|). |q|, |zp| <= 15, so every
# import path stays within 2^-11 * |scale| * (15 + 15) of ORT's weight
IMPORT_MAX_ERR_PER_SCALE = FP16_UNIT_ROUNDOFF * 30
# edgert quantizes activations to int8 per block of 32 (each moves by <= amax/254); ORT multiplies float x.
# That dominates; the float32 accumulation of both sides is far below it and covered by the slack.
ACT_Q8_MAX_ERR_PER_AMAX = 0.5 / 127
FP32_SLACK_RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def nbits_case(k, n, block_size, with_zp, fp16_scales=False, seed=0):
    rng = np.random.default_rng([k, n, block_size, with_zp, fp16_scales, seed])
    nblk = -(-k // block_size)
    b = rng.integers(0, 256, (n, nblk, block_size // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.5, n * nblk).astype(np.float32) * rng.choice([-1, 1], n * nblk)
    if fp16_scales:
        scales = scales.astype(np.float16).astype(np.float32)
    zp = rng.integers(0, 256, n * -(-nblk // 2), dtype=np.uint8) if with_zp else None
    return b, scales.astype(np.float32), zp


@functools.lru_cache(maxsize=None)
def ort_session(k, n, block_size, with_zp, fp16_scales=False):
    b, scales, zp = nbits_case(k, n, block_size, with_zp, fp16_scales)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size
    )
    graph = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_run(k, n, block_size, with_zp, x, fp16_scales=False):
    return ort_session(k, n, block_size, with_zp, fp16_scales).run(None, {"A": x})[0]


def ort_weights(k, n, block_size, with_zp, fp16_scales=False) -> np.ndarray:
    """The (N, K) weights ORT multiplies, read with the identity."""
    return ort_run(k, n, block_size, with_zp, np.eye(k, dtype=np.float32), fp16_scales).T


def imported(k, n, block_size, with_zp, fp16_scales=False) -> edgert.QTensor:
    b, scales, zp = nbits_case(k, n, block_size, with_zp, fp16_scales)
    return edgert.from_matmul_nbits(b, scales, zp, k=k, n=n, block_size=block_size)


def per_weight_scale(k, n, block_size, with_zp, fp16_scales=False) -> np.ndarray:
    _, scales, _ = nbits_case(k, n, block_size, with_zp, fp16_scales)
    return np.repeat(np.abs(scales).reshape(n, -1), block_size, axis=1)[:, :k].astype(np.float64)


# (K, block_size): K a multiple of block_size, and K a multiple of 32 but not of block_size (last block padded)
CASES = [
    (64, 16), (96, 16), (48, 16),  # block_size 16 imports as f16, which holds any K
    (64, 32), (160, 32),
    (128, 64), (96, 64), (160, 64),
    (256, 128), (160, 128), (96, 128),
    (48, 32), (80, 32), (40, 64),  # K not a multiple of 32: no whole host blocks, imported as f16 (was refused)
]
N = 7  # not a multiple of any kernel row tile; odd block counts (K=160, bs=32/64; K=96, bs=128) pad the zero points


@pytest.mark.parametrize("with_zp", [False, True], ids=["no_zp", "zp"])
@pytest.mark.parametrize("k, block_size", CASES)
def test_dequantize_matches_ort_weights(k, block_size, with_zp):
    w = imported(k, N, block_size, with_zp)
    assert w.shape == (N, k)
    expected_fmt = "f16" if block_size == 16 or k % 32 else ("q4_1" if with_zp else "q4_0")
    assert w.fmt == expected_fmt
    got = w.dequantize().astype(np.float64)
    want = ort_weights(k, N, block_size, with_zp).astype(np.float64)
    budget = IMPORT_MAX_ERR_PER_SCALE * per_weight_scale(k, N, block_size, with_zp)
    err = np.abs(got - want)
    assert np.all(err <= budget), f"max error {err.max():.3g}, budget at that weight {budget.flat[err.argmax()]:.3g}"
    # the budget is fp16 rounding, not a blanket tolerance: most weights are reproduced far more closely
    assert np.median(err / budget) < 0.5


@pytest.mark.parametrize("k, block_size", [(64, 32), (160, 64), (96, 128)])
def test_fp16_exact_scales_without_zero_points_import_exactly(k, block_size):
    """q4_0 import is exact when the scales are fp16 values: ORT's (q - 8) * scale is then exactly d * (q - 8)."""
    got = imported(k, N, block_size, False, True).dequantize()
    np.testing.assert_array_equal(got, ort_weights(k, N, block_size, False, True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_zp", [False, True], ids=["no_zp", "zp"])
@pytest.mark.parametrize("k, block_size", CASES)
def test_matmul_matches_ort(k, block_size, with_zp, threads, isa):
    m = 5
    x = np.random.default_rng([k, block_size, m]).standard_normal((m, k)).astype(np.float32)
    y = edgert.matmul(x, imported(k, N, block_size, with_zp), threads=threads)
    want = ort_run(k, N, block_size, with_zp, x).astype(np.float64)
    w_abs = np.abs(ort_weights(k, N, block_size, with_zp)).astype(np.float64)
    scale = per_weight_scale(k, N, block_size, with_zp)
    x_abs = np.abs(x).astype(np.float64)
    budget = x_abs @ (IMPORT_MAX_ERR_PER_SCALE * scale).T + FP32_SLACK_RTOL * (x_abs @ w_abs.T)
    if block_size != 16 and k % 32 == 0:  # block formats quantize x; f16 weights multiply float x
        amax = np.repeat(np.abs(x.reshape(m, k // 32, 32)).max(axis=-1), 32, axis=1).astype(np.float64)
        budget += ACT_Q8_MAX_ERR_PER_AMAX * (amax @ (w_abs + IMPORT_MAX_ERR_PER_SCALE * scale).T)
    err = np.abs(y - want)
    assert np.all(err <= budget), f"{isa}: max error {err.max():.3g} vs budget {budget.flat[err.argmax()]:.3g}"


def test_float_zero_points_match_packed():
    k, bs = 96, 32
    b, scales, zp = nbits_case(k, N, bs, True)
    nblk = k // bs
    unpacked = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(N, -1)[:, :nblk].astype(np.float32)
    a = edgert.from_matmul_nbits(b, scales, zp, k=k, n=N, block_size=bs)
    f = edgert.from_matmul_nbits(b, scales, unpacked, k=k, n=N, block_size=bs)
    np.testing.assert_array_equal(a.raw, f.raw)


def test_b_may_be_flat_or_3d():
    b, scales, zp = nbits_case(64, N, 32, True)
    a = edgert.from_matmul_nbits(b, scales, zp, k=64, n=N, block_size=32)
    flat = edgert.from_matmul_nbits(b.reshape(-1), scales.reshape(N, -1), zp, k=64, n=N, block_size=32)
    np.testing.assert_array_equal(a.raw, flat.raw)


# --- bad input ------------------------------------------------------------------------------------------------

def test_rejects_bits_other_than_4():
    b, scales, _ = nbits_case(64, N, 32, False)
    with pytest.raises(edgert.InvalidArgumentError, match="bits=8"):
        edgert.from_matmul_nbits(b, scales, k=64, n=N, block_size=32, bits=8)


@pytest.mark.parametrize("block_size", [8, 24, 48])
def test_rejects_bad_block_size(block_size):
    with pytest.raises(edgert.InvalidArgumentError, match=str(block_size)):
        edgert.from_matmul_nbits(np.zeros(64, np.uint8), np.ones(8, np.float32), k=64, n=1, block_size=block_size)


@pytest.mark.parametrize("arg, value", [("k", 64.0), ("n", None), ("block_size", "32"), ("bits", 4.0),
                                        ("k", True), ("n", 0)])
def test_rejects_non_integer_attributes(arg, value):
    b, scales, _ = nbits_case(64, N, 32, False)
    kwargs = dict(k=64, n=N, block_size=32, bits=4)
    kwargs[arg] = value
    with pytest.raises(edgert.InvalidArgumentError, match=f"(?i)MatMulNBits {arg} must be an int"):
        edgert.from_matmul_nbits(b, scales, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["scales", "zero_points"])
def test_rejects_non_finite_scales_and_zero_points(bad, where):
    b, scales, _ = nbits_case(64, N, 32, False)
    scales = scales.copy()
    zp = np.full(scales.size, 8.0, np.float32)
    (scales if where == "scales" else zp)[3] = bad
    with pytest.raises(edgert.InvalidArgumentError, match=where):
        edgert.from_matmul_nbits(b, scales, zp, k=64, n=N, block_size=32)


def _ort_nbits(b, scales, zp, k, n, block_size):
    """a MatMulNBits session on the given arrays, and the (N, K) weights it multiplies"""
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    names = ["A", "B", "scales"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zero_points"))
        names.append("zero_points")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block_size)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T


@pytest.mark.parametrize("scale", [1e5, 3e4, 1e-8, 2e-6], ids=["1e5", "3e4_zp_overflows", "1e-8", "2e-6"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_scales_fp16_cannot_hold_import_as_f32(scale, block_size):
    """fp16 would make these weights inf, 0 or a few digits: they come in as f32 and match onnxruntime's"""
    k, n = 128, 5
    rng = np.random.default_rng([block_size, int(round(-np.log10(scale))) + 10])
    nblk = k // block_size
    b = rng.integers(0, 256, (n, nblk, block_size // 2), dtype=np.uint8)
    scales = (scale * rng.uniform(0.5, 1.5, n * nblk) * rng.choice([-1, 1], n * nblk)).astype(np.float32)
    zp = rng.integers(0, 256, n * -(-nblk // 2), dtype=np.uint8)
    w = edgert.from_matmul_nbits(b, scales, zp, k=k, n=n, block_size=block_size)
    sess, want = _ort_nbits(b, scales, zp, k, n, block_size)
    assert w.fmt == "f32"
    np.testing.assert_allclose(w.dequantize(), want, rtol=2e-7, atol=0)
    x = rng.standard_normal((3, k)).astype(np.float32)
    err = np.abs(edgert.matmul(x, w).astype(np.float64) - sess.run(None, {"A": x})[0])
    assert np.all(err <= FP32_SLACK_RTOL * (np.abs(x).astype(np.float64) @ np.abs(want).T.astype(np.float64)))


def test_rejects_wrong_sizes():
    b, scales, zp = nbits_case(96, N, 32, True)
    with pytest.raises(edgert.ShapeError, match="B must be uint8"):
        edgert.from_matmul_nbits(b[:, :2], scales, k=96, n=N, block_size=32)
    with pytest.raises(edgert.ShapeError, match="B must be uint8"):
        edgert.from_matmul_nbits(b.astype(np.int8), scales, k=96, n=N, block_size=32)
    with pytest.raises(edgert.ShapeError, match="scales"):
        edgert.from_matmul_nbits(b, scales[:-1], k=96, n=N, block_size=32)
    with pytest.raises(edgert.ShapeError, match="zero_points"):
        edgert.from_matmul_nbits(b, scales, zp[:-1], k=96, n=N, block_size=32)
