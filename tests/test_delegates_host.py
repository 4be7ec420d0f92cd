"""The host delegate's C-core paths against onnxruntime on the same models, within the named budgets:
MatMulNBits (int4 blocks), DynamicQuantizeLinear -> MatMulInteger chains (onnxruntime's dynamic int8), and
DequantizeLinear(weight) -> MatMul (QDQ int8), with K on and off the 32-value block; core=False is exact."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import edgert
from edgert.delegates.host import (DEQUANT_MATMUL_BUDGET, MATMUL_INTEGER_BUDGET, MATMUL_NBITS_BUDGET,
                                   find_core_matmuls)
from edgert.formats.onnx import load_onnx

from onnx_models import calibration_reader, mlp, ort_run


pytestmark = pytest.mark.usefixtures("no_telemetry")


def within(y, ref, budget):
    err = float(np.abs(y - ref).max())
    scale = float(np.abs(ref).max())
    assert err <= budget * scale, f"max error {err:.3g} > {budget} x max|ref| {scale:.3g}"


def core_kinds(s):
    return [st.kind for c in s._bound.compiled for st in getattr(c, "core", [])]


def nbits_model(m=3, k=64, n=48, block=32, zero_points=True, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    nblk = -(-k // block)  # the last block padded when block does not divide K
    b = rng.integers(0, 256, (n, nblk, block // 2), dtype=np.uint8)
    scales = (rng.random(n * nblk).astype(np.float32) * 0.05 + 0.01)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    ins = ["A", "B", "S"]
    if zero_points:
        zp = rng.integers(0, 256, (n * ((nblk + 1) // 2),), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zp, "Z"))
        ins.append("Z")
    if bias:
        ins += [""] * (5 - len(ins))
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
        ins.append("bias")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            name="mmnb")
    g = helper.make_graph([node, helper.make_node("Relu", ["Y"], ["out"], name="relu")], "nbits",
                          [helper.make_tensor_value_info("A", T.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("out", T.FLOAT, [m, n])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kw", [dict(), dict(zero_points=False), dict(block=64, k=128), dict(bias=True, m=1),
                                dict(block=16, k=48), dict(block=16, k=80, zero_points=False),
                                dict(block=32, k=80), dict(block=64, k=40, zero_points=False)])  # f16: K % 32
def test_matmul_nbits_on_the_c_core(tmp_path, kw):
    path = tmp_path / "nbits.onnx"
    onnx.save(nbits_model(**kw), path)
    m, k = kw.get("m", 3), kw.get("k", 64)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    s = edgert.Session(str(path), core=True)
    within(s.run(None, {"A": x})[0], ort_run(path, {"A": x})[0], MATMUL_NBITS_BUDGET)
    assert core_kinds(s) == ["MatMulNBits"]
    assert_weights_repacked_when_it_pays(s)


def assert_weights_repacked_when_it_pays(s):
    """block-format C-core steps keep their weights in the x16 layout exactly where the ISA reads it natively"""
    steps = [st for c in s._bound.compiled for st in c.core]
    assert steps
    for st in steps:
        assert isinstance(st.weight, edgert.PackedQTensor) == edgert.repack_pays(st.weight.fmt), st.weight


def dynamic_int8(tmp_path, d_in, d_hidden, d_out, weight_type="QInt8"):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "f32.onnx", tmp_path / "int8.onnx"
    onnx.save(mlp(d_in=d_in, d_hidden=d_hidden, d_out=d_out), src)
    quantize_dynamic(str(src), str(dst), weight_type=getattr(QuantType, weight_type))
    return dst


@pytest.mark.parametrize("dims", [(64, 96, 32), (40, 120, 7), (120, 40, 6625)])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_matmul_integer_chain_on_the_c_core_equals_onnxruntime(tmp_path, dims, batch):
    """int8 weights: the C core quantizes the activations as DynamicQuantizeLinear does and sums in int32, so the
    outputs are onnxruntime's, bit for bit."""
    from edgert.delegates.host import DynamicInt8MatMul

    path = dynamic_int8(tmp_path, *dims)
    s = edgert.Session(str(path), core=True)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((batch, dims[0])).astype(np.float32) * (1 + 10 * seed)
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], ort_run(path, {"x": x})[0])
    assert core_kinds(s) == ["MatMulInteger", "MatMulInteger"]
    assert all(isinstance(st, DynamicInt8MatMul) for c in s._bound.compiled for st in c.core)
    claimed = {n for c in s._bound.compiled for st in c.core for n in st.nodes}
    ops = {n.op_type for n in s.plan.graph.nodes if n.name in claimed}
    assert {"MatMulInteger", "DynamicQuantizeLinear", "Cast", "Mul"} <= ops
    exact = edgert.Session(str(path), core=False)
    np.testing.assert_array_equal(exact.run(None, {"x": x})[0], ort_run(path, {"x": x})[0])
    assert core_kinds(exact) == []


@pytest.mark.parametrize("dims", [(64, 96, 32), (40, 120, 7)])  # K on whole blocks, and ragged K (zero-padded)
def test_matmul_integer_chain_with_uint8_weights_is_the_budgeted_q8_product(tmp_path, dims):
    """uint8 weights less their zero point leave int8: the chain becomes the q8_0 float product, within budget."""
    from edgert.delegates.host import DynamicInt8MatMul

    path = dynamic_int8(tmp_path, *dims, weight_type="QUInt8")
    x = np.random.default_rng(2).standard_normal((5, dims[0])).astype(np.float32)
    s = edgert.Session(str(path), core=True)
    y = s.run(None, {"x": x})[0]
    assert core_kinds(s) == ["MatMulInteger", "MatMulInteger"]
    assert not any(isinstance(st, DynamicInt8MatMul) for c in s._bound.compiled for st in c.core)
    within(y, ort_run(path, {"x": x})[0], MATMUL_INTEGER_BUDGET)
    assert_weights_repacked_when_it_pays(s)


def test_dequantize_matmul_on_the_c_core(tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = tmp_path / "f32.onnx", tmp_path / "qdq.onnx"
    onnx.save(mlp(batch=4, d_in=64, d_hidden=48, d_out=16), src)
    quantize_static(str(src), str(dst), calibration_reader("x", (4, 64)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    s = edgert.Session(str(dst), core=True)
    within(s.run(None, {"x": x})[0], ort_run(dst, {"x": x})[0], DEQUANT_MATMUL_BUDGET)
    assert core_kinds(s) == ["DequantizeLinear+MatMul", "DequantizeLinear+MatMul"]
    assert_weights_repacked_when_it_pays(s)


def qdq_model(tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = tmp_path / "f32.onnx", tmp_path / "qdq.onnx"
    onnx.save(mlp(d_in=64, d_hidden=48, d_out=16), src)
    quantize_static(str(src), str(dst), calibration_reader("x", (4, 64)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    return dst


def dynamic_int8_matmul(tmp_path, k, n):
    """x [batch, K] @ W [K, N] quantized by onnxruntime's quantize_dynamic (int8): the chain's output is the model's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = numpy_helper.from_array((np.random.default_rng(1).standard_normal((k, n)) * 0.05).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                          [helper.make_tensor_value_info("x", T.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["batch", n])], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src, dst = tmp_path / "mm.onnx", tmp_path / "mm.int8.onnx"
    onnx.save(m, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def assert_same_non_finite(y, ref):
    """NaN, +inf and -inf in the same places as onnxruntime's."""
    for kind in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(kind(y), kind(ref), err_msg=kind.__name__)


# each C-core path on a model with a dynamic batch: (model, input name, K, kind, budget; 0: exact)
NON_FINITE_CASES = {
    "MatMulNBits": (lambda p: nbits_model(m="batch", k=256, n=128, block=32), "A", 256, "MatMulNBits",
                    MATMUL_NBITS_BUDGET),
    "MatMulInteger int8": (lambda p: dynamic_int8_matmul(p, 1536, 576), "x", 1536, "MatMulInteger", 0),
    "MatMulInteger uint8": (lambda p: dynamic_int8(p, 256, 96, 32, "QUInt8"), "x", 256, "MatMulInteger",
                            MATMUL_INTEGER_BUDGET),
    "DequantizeLinear+MatMul": (lambda p: dq_matmul_model(PER_COLUMN, batch="batch"), "x", 64,
                                "DequantizeLinear+MatMul", DEQUANT_MATMUL_BUDGET),  # float activations
    "QDQ": (qdq_model, "x", 64, "DequantizeLinear+MatMul", DEQUANT_MATMUL_BUDGET),  # activations QDQ'd first
}


@pytest.mark.parametrize("case", list(NON_FINITE_CASES))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations_give_onnxruntimes_outputs(tmp_path, case, bad):
    """NaN or Inf in a C-core step's activations: the C core reports them and the step runs its nodes on
    onnxruntime, so the outputs are onnxruntime's (same NaN and Inf places) with or without the C core; a finite
    run after it is the C core's again."""
    make, name, k, kind, budget = NON_FINITE_CASES[case]
    model = make(tmp_path)
    path = model if not isinstance(model, onnx.ModelProto) else tmp_path / "m.onnx"
    if isinstance(model, onnx.ModelProto):
        onnx.save(model, path)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, k)).astype(np.float32)
    bad_x = x.copy()
    bad_x[2, 5] = bad
    ref = ort_run(path, {name: bad_x})[0]
    for core in (True, False):
        s = edgert.Session(str(path), core=core)
        y = s.run(None, {name: bad_x})[0]
        assert set(core_kinds(s)) == ({kind} if core else set())
        assert_same_non_finite(y, ref)
        fin = np.isfinite(ref)  # none with an Inf in a per-tensor quantized input: its scale is Inf
        if budget and core and fin.any():
            within(y[fin], ref[fin], budget)
        else:
            np.testing.assert_array_equal(y[fin], ref[fin])
        good = s.run(None, {name: x})[0]
        want = ort_run(path, {name: x})[0]
        if budget and core:
            within(good, want, budget)
        else:
            np.testing.assert_array_equal(good, want)


def test_non_constant_weights_stay_on_onnxruntime(tmp_path):
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("a", T.FLOAT, [2, 32]),
                           helper.make_tensor_value_info("b", T.FLOAT, [32, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph = load_onnx(m)
    assert find_core_matmuls(graph, [n.name for n in graph.nodes]) == []


def test_steady_state_with_c_core_steps_allocates_nothing_and_segments_do_not_spin(tmp_path):
    import tracemalloc

    path = dynamic_int8(tmp_path, 256, 512, 256)
    x = np.random.default_rng(4).standard_normal((64, 256)).astype(np.float32)
    s = edgert.Session(str(path), core=True, output_views=True)
    ref = s.run(None, {"x": x})[0].copy()
    s.run(None, {"x": x})
    assert core_kinds(s) == ["MatMulInteger", "MatMulInteger"]
    part = s._bound.compiled[0]
    segments = [st for st in part.steps if hasattr(st, "ort")]
    assert segments, "the Relu between the two matmuls runs on onnxruntime"
    for seg in segments:  # spinning intra-op threads would take the cores the C core's pool needs next
        opts = seg.ort.session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    smallest = 64 * 256 * 4  # the smallest tensor a step hands on (64 KiB)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(10):
        (y,) = s.run(None, {"x": x})
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak - before < smallest // 4, (peak - before, smallest)
    assert after - before < smallest // 4
    np.testing.assert_array_equal(y, ref)


def test_one_partition_without_c_core_keeps_onnxruntime_defaults(tmp_path):
    path = dynamic_int8(tmp_path, 64, 96, 32)
    s = edgert.Session(str(path), core=False)
    s.run(None, {"x": np.zeros((2, 64), np.float32)})
    opts = s._bound.compiled[0].steps[0].ort.session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # nothing set: onnxruntime's default
        opts.get_session_config_entry("session.intra_op.allow_spinning")


def test_faster_of_keeps_the_faster_compilation_and_closes_the_other(monkeypatch):
    import time

    from edgert.delegates.base import CompiledPartition, faster_of

    # a clock that moves only when a fake runs, so the block sizes do not depend on how busy the machine is (with
    # real sleeps, a 20 us hiccup while the fast one was sized gave it one run per block)
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    class Fake(CompiledPartition):
        def __init__(self, delay):
            self.inputs, self.outputs, self.delay, self.closed, self.runs = ["x"], ["y"], delay, False, 0

        def run(self, inputs, outputs):
            assert inputs["x"].shape == (2, 3) and outputs["y"].dtype == np.int8 and not inputs["x"].any()
            self.runs += 1
            clock[0] += self.delay

        def close(self):
            self.closed = True

    specs = {"x": ((2, 3), np.dtype(np.float32)), "y": ((2, 3), np.dtype(np.int8))}
    slow, fast = Fake(0.004), Fake(1e-6)
    assert faster_of(slow, fast, specs, runs=5) is fast and slow.closed and not fast.closed
    # two untimed runs each (warm-up, block size), then 5 blocks: one timed run per block for the slow one (4 ms is
    # enough for the clock, and a one-call block has no untimed start), for the 1 us one ~200 untimed
    # (AUTO_TIMING_WARM_S) and ~500 timed (blocks of at least AUTO_TIMING_BLOCK_S)
    assert slow.runs == 2 + 5 and fast.runs > 2 + 5 * 600
    slow, fast = Fake(0.004), Fake(1e-6)
    assert faster_of(fast, slow, specs, runs=5) is fast and slow.closed and not fast.closed

    class Disturbed(Fake):
        """1 us a run, but its first run after the other variant's pays 1 ms (threads the other left spinning on a
        small machine): a session running only this one never pays it. Blocks that timed that run picked the 5 us
        variant."""

        def run(self, inputs, outputs):
            super().run(inputs, outputs)
            if last[0] is not self:
                clock[0] += 1e-3
            last[0] = self

    class Steady(Fake):
        def run(self, inputs, outputs):
            super().run(inputs, outputs)
            last[0] = self

    last = [None]
    disturbed, steady = Disturbed(1e-6), Steady(5e-6)
    assert faster_of(steady, disturbed, specs, runs=5) is disturbed


def test_auto_keeps_c_core_steps_only_if_the_whole_partition_is_faster(tmp_path, monkeypatch):
    """core='auto': the steps that pay alone are kept only if the partition with them beats the partition as one
    onnxruntime model (the comparison itself is timing: here it is forced both ways)."""
    import edgert.delegates.host as H

    path = dynamic_int8(tmp_path, 64, 48, 32)
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    monkeypatch.setattr(H, "steps_that_pay", lambda steps, *a: steps)  # every step pays alone
    picked = []

    def pick(i):
        def faster_of(first, second, specs, runs=15):
            picked.append((len(first.core), len(second.core)))
            (second if i == 0 else first).close()
            return (first, second)[i]
        return faster_of

    for i, want in ((0, ["MatMulInteger", "MatMulInteger"]), (1, [])):
        monkeypatch.setattr(H, "faster_of", pick(i))
        s = edgert.Session(str(path), core="auto")
        y = s.run(None, {"x": x})[0]  # binds (the batch dim is dynamic), compiles, runs
        assert core_kinds(s) == want
        assert picked[-1] == (2, 0)
        np.testing.assert_array_equal(y, ort_run(path, {"x": x})[0])  # int8 weights: exact either way


def dq_matmul_model(scale, zp=None, axis=None, k=64, n=48, seed=4, q=None, batch=2):
    """x (batch, K) @ DequantizeLinear(int8 weight (K, N) or ``q``, scale, zero point) at opset 21."""
    if q is None:
        q = np.random.default_rng(seed).integers(-100, 100, (k, n)).astype(np.int8)
    k, n = q.shape
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.asarray(scale, np.float32), "s")]
    ins = ["q", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(np.asarray(zp), "zp"))
        ins.append("zp")
    dq = helper.make_node("DequantizeLinear", ins, ["w"], name="dq", **({} if axis is None else {"axis": axis}))
    g = helper.make_graph([dq, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "dq_mm",
                          [helper.make_tensor_value_info("x", T.FLOAT, [batch, k])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [batch, n])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


PER_COLUMN = np.linspace(0.01, 0.05, 48)


@pytest.mark.parametrize("kw, match", [
    # were run with axis % 2 (the scales on a wrong axis); onnxruntime refuses them
    (dict(scale=PER_COLUMN, axis=2), "axis 2 is outside \\[-2, 2\\) for its 2-D weight \\(64, 48\\)"),
    (dict(scale=PER_COLUMN, axis=3), "axis 3 is outside"), (dict(scale=PER_COLUMN, axis=-3), "axis -3 is outside"),
    # a (1, N) scale was taken per column; a scale or zero point of another length was ValueError at Session()
    (dict(scale=PER_COLUMN.reshape(1, -1), axis=1), "a per-axis scale must be 1-D of length 48 \\(axis 1 of the "
                                                    "weight \\(64, 48\\)\\), found shape \\(1, 48\\)"),
    (dict(scale=np.full(3, 0.01), axis=1), "a per-axis scale must be 1-D of length 48 .* found shape \\(3,\\)"),
    (dict(scale=PER_COLUMN, zp=np.zeros(3, np.int8), axis=1),
     "zero point of shape \\(3,\\), scale of shape \\(48,\\)"),
    (dict(scale=0.01, zp=np.zeros(2, np.int8)), "a per-tensor scale \\(shape \\(\\)\\) with a zero point of shape"),
    # a uint8 zero point with int8 weights was taken
    (dict(scale=0.01, zp=np.array(3, np.uint8)), "its zero point is uint8, the weight int8"),
])
def test_dequantize_linear_onnx_refuses_is_a_format_error(kw, match):
    for core in (True, "auto"):
        with pytest.raises(edgert.ModelFormatError, match=f"DequantizeLinear node 'dq' \\(weight 'q'\\): {match}"):
            edgert.Session(dq_matmul_model(**kw), core=core)


@pytest.mark.parametrize("kw, taken", [
    (dict(scale=PER_COLUMN, axis=1), True), (dict(scale=PER_COLUMN, axis=-1), True),
    # scales along K (axis 0) were taken: a q8_0 block runs along K and holds one scale (see the test below)
    (dict(scale=np.linspace(0.01, 0.05, 64), axis=0), False), (dict(scale=np.linspace(0.01, 0.05, 64), axis=-2), False),
    (dict(scale=np.linspace(0.01, 0.05, 64), zp=np.arange(64).astype(np.int8), axis=0), False),
    (dict(scale=PER_COLUMN, zp=(np.arange(48) - 24).astype(np.int8), axis=1), True),
    (dict(scale=0.02, zp=np.array(200, np.uint8), q=np.arange(64 * 48).reshape(64, 48).astype(np.uint8)), True),
    (dict(scale=[0.02], zp=np.array([3], np.int8)), True),
    (dict(scale=0.02, axis=5), False),  # per tensor: onnxruntime ignores the axis; not valid ONNX, not taken
])
def test_dequantize_linear_axes_the_c_core_takes(kw, taken):
    model = dq_matmul_model(**kw)
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    s = edgert.Session(model, core=True)
    y, ref = s.run(None, {"x": x})[0], ort_run(model, {"x": x})[0]
    assert core_kinds(s) == (["DequantizeLinear+MatMul"] if taken else [])
    within(y, ref, DEQUANT_MATMUL_BUDGET if taken else 0.0)


K_ROWS = np.arange(256)


@pytest.mark.parametrize("kw", [
    # per-K scales 1000x apart: q8_0 re-scaled each block of 32 along K to its large-scale rows, the small-scale rows
    # became 0 (relative error 1.0 with core=True and core="auto")
    dict(scale=np.where(K_ROWS % 2 == 0, 1e-1, 1e-4).astype(np.float32), axis=0),
    dict(scale=np.where(K_ROWS % 2 == 0, 1e-1, 1e-4).astype(np.float32), axis=-2),
    # 16- and 32-bit codes under one scale: a block's small codes are below its largest code / 254 (were rounded to 0)
    dict(scale=1e-4, q=np.repeat(np.where(K_ROWS % 2 == 0, 30000, 1)[:, None], 64, 1).astype(np.int16)),
    dict(scale=1e-6, q=np.repeat(np.where(K_ROWS % 2 == 0, 1 << 28, 3)[:, None], 64, 1).astype(np.int32)),
])
def test_dequantize_linear_scales_along_k_or_wide_codes_stay_with_onnxruntime(kw):
    rng = np.random.default_rng(0)
    q = kw.pop("q", None)
    if q is None:
        q = rng.integers(-127, 128, (256, 64)).astype(np.int8)
    model = dq_matmul_model(q=q, **kw)
    # x is 0 on the large rows: the product comes only from the small ones
    x = (np.where(K_ROWS % 2 == 0, 0.0, 1.0) * rng.standard_normal((2, 256))).astype(np.float32)
    ref = ort_run(model, {"x": x})[0]
    for core in (True, "auto"):
        s = edgert.Session(model, core=core)
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], ref)
        assert core_kinds(s) == []


@pytest.mark.parametrize("bias", [np.ones(1, np.float32), np.ones(3, np.float32), np.ones((2, 48), np.float32),
                                  np.ones(48, np.float16)])
def test_matmul_nbits_bias_onnxruntime_refuses_is_a_format_error(bias):
    # (1,) and (2, N) were broadcast silently with core=True, (3,) was ValueError at run; onnxruntime refuses all
    model = nbits_model(bias=True)
    for t in model.graph.initializer:
        if t.name == "bias":
            t.CopyFrom(numpy_helper.from_array(bias, "bias"))
    a = np.ones((3, 64), np.float32)
    with pytest.raises(edgert.DeviceError, match="onnxruntime could not load the model to learn its shapes"):
        edgert.Session(model, core=True).run(None, {"A": a})  # Y's shape unknown: probed (was onnxruntime's Fail)
    model.graph.value_info.append(helper.make_tensor_value_info("Y", T.FLOAT, [3, 48]))  # known: bound at creation
    for core in (True, "auto"):
        with pytest.raises(edgert.ModelFormatError, match=f"MatMulNBits node 'mmnb': its bias must be float32 of "
                                                          f"shape \\(48,\\) \\(N\\), found {bias.dtype} of shape"):
            edgert.Session(model, core=core).run(None, {"A": a})


def matmul_integer_chain(b, bzp, ws=0.02, k=64):
    """DynamicQuantizeLinear(x) -> MatMulInteger(x_q, B, x_zp, B_zp) -> Cast -> Mul(x_scale * ws)."""
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.asarray(ws, np.float32), "ws"),
             numpy_helper.from_array(bzp, "bzp")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"], name="dql"),
             helper.make_node("MatMulInteger", ["xq", "B", "xzp", "bzp"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT, name="cast"),
             helper.make_node("Mul", ["xs", "ws"], ["sc"], name="smul"),
             helper.make_node("Mul", ["accf", "sc"], ["y"], name="mul")]
    g = helper.make_graph(nodes, "mmi", [helper.make_tensor_value_info("x", T.FLOAT, [2, k])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, b.shape[1]])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_matmul_integer_weight_zero_point_is_checked():
    rng = np.random.default_rng(6)
    b = rng.integers(0, 256, (64, 16)).astype(np.uint8)
    # a zero point of 3 values was ValueError (a broadcast in the q8_0 import); an int8 one with uint8 weights taken
    for bzp, match in ((np.zeros(3, np.uint8), "its weight zero point must be one value or one per column .* "
                                               "found shape \\(3,\\)"),
                       (np.zeros(16, np.int8), "its weight zero point is int8, the weight uint8")):
        with pytest.raises(edgert.ModelFormatError, match=f"MatMulInteger node 'mmi': {match}"):
            edgert.Session(matmul_integer_chain(b, bzp), core=True)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    model = matmul_integer_chain(b, np.full((1, 16), 128, np.uint8))  # (1, N): one per column, as onnxruntime reads it
    s = edgert.Session(model, core=True)
    within(s.run(None, {"x": x})[0], ort_run(model, {"x": x})[0], MATMUL_INTEGER_BUDGET)
    assert core_kinds(s) == ["MatMulInteger"]
