"""edgert.formats.tflite: .tflite -> IR (ops, dtypes, per-tensor / per-channel quantization, buffers in place from the
mmapped file), the exporter (a subset of nodes as a standalone .tflite), and hostile files (truncations, bad offsets,
byte flips) raising ModelFormatError and nothing else."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tflite_models as tm
from edgert import ModelFormatError
from edgert.errors import ModelNotFoundError
from edgert.formats.tflite import load_tflite, parse_tflite, subgraph_tflite

import tflite  # noqa: F401


@pytest.fixture(scope="module")
def fc_bytes():
    return tm.int8_fc()


def test_float_mlp_ir():
    g = load_tflite(tm.float_mlp())
    assert [n.op_type for n in g.nodes] == ["Gemm", "Relu", "Gemm", "Softmax"]
    assert [n.attrs["tflite_op"] for n in g.nodes] == ["FULLY_CONNECTED", "RELU", "FULLY_CONNECTED", "SOFTMAX"]
    assert g.inputs == ["x"] and g.outputs == ["y"]
    assert g.tensors["w1"].dtype == "float32" and g.tensors["w1"].shape == (32, 16)
    w1, *_ = tm.float_mlp_weights()
    np.testing.assert_array_equal(g.tensors["w1"].initializer, w1)
    assert g.tensors["h1"].initializer is None and g.tensors["h1"].shape == (1, 32)


def test_int8_quantization_parameters(fc_bytes):
    g = load_tflite(fc_bytes)
    wa, wc = g.tensors["wa"], g.tensors["wc"]
    assert wa.dtype == "int8" and wa.quant.axis == 0 and wa.quant.scale.shape == (48,)
    assert wc.quant.axis is None and wc.quant.scale.shape == (1,)
    assert g.tensors["ba"].dtype == "int32"
    assert g.tensors["probs_q"].quant.zero_point.tolist() == [-128]
    conv = load_tflite(tm.int8_conv())
    assert conv.tensors["dw_w"].quant.axis == 3
    assert conv.node("depthwise_conv_2d_2").attrs["group"] == 8


def test_buffers_are_views_of_the_mapped_file(tmp_path, fc_bytes):
    p = tmp_path / "m.tflite"
    p.write_bytes(fc_bytes)
    g = load_tflite(p)
    w = g.tensors["wa"].initializer
    assert not w.flags.writeable and not w.flags.owndata
    base = w
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    import mmap

    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_tflite(tmp_path / "nope.tflite")


def test_export_subset_runs_like_the_whole(fc_bytes):
    g = load_tflite(fc_bytes)
    feeds = tm.feeds_for(g)
    ref = tm.litert_reference(fc_bytes, feeds, g.outputs)[0]
    first = ["quantize_0", "fully_connected_1", "fully_connected_2", "add_3"]
    rest = [n.name for n in g.nodes if n.name not in first]
    d1, i1, o1 = subgraph_tflite(g, first)
    d2, i2, o2 = subgraph_tflite(g, rest)
    assert i1 == ["x"] and o1 == ["sum"] and i2 == ["sum"] and o2 == ["probs"]
    g1, g2 = load_tflite(d1), load_tflite(d2)  # exported parts parse back
    assert len(g1.nodes) == 4 and len(g2.nodes) == 4
    (mid,) = tm.litert_reference(d1, feeds, o1)
    (out,) = tm.litert_reference(d2, {"sum": mid}, o2)
    np.testing.assert_array_equal(out, ref)
    whole, _, _ = subgraph_tflite(g, [n.name for n in g.nodes])
    assert whole == fc_bytes


# ---- hostile files -----------------------------------------------------------------------------------------------
def _load_or_format_error(data: bytes):
    try:
        load_tflite(data)
    except ModelFormatError:
        pass


def test_not_tflite():
    for data in (b"", b"1234", b"\x00" * 7, b"12345678", b"\x10\x00\x00\x00ONNX" + b"\x00" * 64):
        with pytest.raises(ModelFormatError):
            load_tflite(data)


def test_every_truncation_is_a_format_error(fc_bytes):
    for n in list(range(0, 64)) + list(range(64, len(fc_bytes) - 1, 37)):
        with pytest.raises(ModelFormatError):
            load_tflite(fc_bytes[:n])


def test_root_offset_outside(fc_bytes):
    bad = struct.pack("<I", len(fc_bytes) + 100) + fc_bytes[4:]
    with pytest.raises(ModelFormatError, match="outside the file"):
        load_tflite(bad)


def test_bad_buffer_index(fc_bytes):
    m = parse_tflite(fc_bytes)
    tensors = []
    for i, t in enumerate(m.tensors):
        tensors.append({"name": m.tensor_names[i], "dtype": t["dtype"], "shape": t["shape"], "data": t["data"]})
    good = tm.ModelSpec()
    good.tensors = tensors
    good.ops = m.operators
    data = bytearray(good.build(m.inputs, m.outputs))
    g = load_tflite(bytes(data))
    assert len(g.nodes) == 8
    # a weight tensor whose shape disagrees with its buffer size
    tensors[2] = {**tensors[2], "shape": (48, 65)}
    with pytest.raises(ModelFormatError, match="holds .* bytes"):
        load_tflite(good.build(m.inputs, m.outputs))


def test_operator_reading_a_missing_tensor():
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 4))
    y = m.tensor("y", "float32", (1, 4))
    m.op("RELU", [x], [y])
    m.ops[0]["inputs"] = [7]
    with pytest.raises(ModelFormatError, match="out of range"):
        load_tflite(m.build([x], [y]))
    m.ops[0]["inputs"] = [y]
    with pytest.raises(ModelFormatError, match="before any operator"):
        load_tflite(m.build([x], [y]))


def test_operator_writing_a_graph_input_or_constant():
    """An operator overwriting a graph input was accepted: the IR then had an earlier node reading what a later one
    writes, and the planner failed on it with KeyError."""
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 4))
    y = m.tensor("y", "float32", (1, 4))
    m.op("RELU", [x], [y])
    m.op("RELU", [y], [x])
    with pytest.raises(ModelFormatError, match="operator 1 \\(RELU\\) writes tensor 0 \\('x'\\), which is a graph input"):
        load_tflite(m.build([x], [y]))
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 4))
    c = m.tensor("c", "float32", (1, 4), data=np.ones((1, 4), np.float32))
    m.op("RELU", [x], [c])
    with pytest.raises(ModelFormatError, match="which is a constant"):
        load_tflite(m.build([x], [c]))


def _qdq(zp=0, scale=2 / 255, dtype="int8"):
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 8))
    q = m.tensor("x_q", dtype, (1, 8), q=(scale, zp))
    y = m.tensor("y", "float32", (1, 8))
    m.op("QUANTIZE", [x], [q])
    m.op("DEQUANTIZE", [q], [y])
    return m.build([x], [y])


@pytest.mark.parametrize("zp, dtype", [(255, "int8"), (-129, "int8"), (2**32 - 1, "int8"), (-1, "uint8"),
                                       (256, "uint8"), (40000, "int16")])
def test_zero_point_outside_its_type_is_refused(zp, dtype):
    """LiteRT segfaulted preparing such a model (a byte flip in a zero point was enough)."""
    with pytest.raises(ModelFormatError, match=f"zero points \\[{zp}\\] outside {dtype}'s range"):
        load_tflite(_qdq(zp=zp, dtype=dtype))
    load_tflite(_qdq(zp=127 if dtype == "int8" else 0, dtype=dtype))  # the bounds themselves are fine


@pytest.mark.parametrize("zp, axis, refusal", [
    (np.zeros(0, np.int64), 0, "1 scales but 0 zero points"),
    (0, 2, "quantized_dimension 2 outside the 2 dims of shape \\[1, 8\\]"),
    (0, -1, "quantized_dimension -1 outside"),
])
def test_quantization_litert_refuses_is_refused_at_load(zp, axis, refusal):
    """LiteRT refuses a tensor with scales but no zero points, or a quantized_dimension outside its dims (one scale
    or many), when it builds the interpreter; edgert accepted both, so a model whose only op ran on the C core got
    an answer."""
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 8))
    q = m.tensor("x_q", "int8", (1, 8), q=(0.02, zp), axis=axis)
    m.op("QUANTIZE", [x], [q])
    data = m.build([x], [q])
    with pytest.raises(ValueError, match="zero_point|quantized_dimension"):
        tm.litert_reference(data, {"x": np.zeros((1, 8), np.float32)}, ["x_q"])
    with pytest.raises(ModelFormatError, match=refusal):
        load_tflite(data)


@pytest.mark.parametrize("scale", [0.0, -0.5, -1.7e38, 4.6e-41])
def test_activation_scale_must_be_a_positive_normal_float(scale):
    """A zero, negative or subnormal activation scale segfaulted LiteRT; constant weights keep theirs."""
    with pytest.raises(ModelFormatError, match="activation scale .* is not a positive normal float32"):
        load_tflite(_qdq(scale=scale))


def test_a_shape_keeping_op_with_two_shapes_is_refused_before_litert():
    """A byte flip made an input dim 16 million: LiteRT recomputed every shape from it and allocated ~15 GB over
    34 s before edgert's output check refused the file. Ops that keep their input's shape are compared here."""
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 16711688, 8, 3))
    q = m.tensor("x_q", "int8", (1, 8, 8, 3), q=(0.01, 0))
    m.op("QUANTIZE", [x], [q])
    with pytest.raises(ModelFormatError, match=r"operator 0 \(QUANTIZE\) keeps its input's shape, but tensor 0 "
                                               r"\('x'\) is \[1, 16711688, 8, 3\] and tensor 1 \('x_q'\) "
                                               r"\[1, 8, 8, 3\]"):
        load_tflite(m.build([x], [q]))


def test_absent_inputs_only_where_the_op_allows_them():
    """Index -1 (absent) was accepted for any input: ADD [x, -1] and FULLY_CONNECTED [x, -1, -1] segfaulted LiteRT.
    The bias of FULLY_CONNECTED / CONV_2D may be absent."""
    def model(op, ins, options_type=None, **opts):
        m = tm.ModelSpec()
        x = m.tensor("x", "float32", (1, 4))
        w = m.tensor("w", "float32", (4, 4), data=np.eye(4, dtype=np.float32))
        y = m.tensor("y", "float32", (1, 4))
        m.op(op, [{"x": x, "w": w, "-": -1}[i] for i in ins], [y], options_type, **opts)
        return m.build([x], [y])

    with pytest.raises(ModelFormatError, match="operator 0 \\(ADD\\): input 1 is absent \\(tensor index -1\\), "
                                               "which ADD requires"):
        load_tflite(model("ADD", "x-"))
    with pytest.raises(ModelFormatError, match="input 1 is absent"):
        load_tflite(model("FULLY_CONNECTED", "x--", "FullyConnectedOptions"))
    g = load_tflite(model("FULLY_CONNECTED", "xw-", "FullyConnectedOptions"))  # no bias: valid
    assert g.nodes[0].attrs["tflite_op"] == "FULLY_CONNECTED"


@pytest.mark.parametrize("num_splits", [0, 2])
def test_split_outputs_must_match_num_splits(num_splits):
    """SPLIT with NumSplits 0 (or 2) and one output segfaulted LiteRT."""
    m = tm.ModelSpec()
    axis = m.tensor("axis", "int32", (), data=np.array(1, np.int32))
    x = m.tensor("x", "float32", (1, 4))
    o = m.tensor("o", "float32", (1, 4))
    m.op("SPLIT", [axis, x], [o], "SplitOptions", NumSplits=num_splits)
    with pytest.raises(ModelFormatError, match=f"SPLIT\\): NumSplits is {num_splits} but the operator has 1 outputs"):
        load_tflite(m.build([x], [o]))


@pytest.mark.parametrize("options", [(None, {}), ("SplitVOptions", {"NumSplits": 1})])
def test_split_without_its_own_options_table_is_refused(options):
    """Without a SplitOptions table (none, or another op's: LiteRT reads its own as null) LiteRT's num_splits is 0
    and it segfaulted; the split was accepted (a missing count read as the number of outputs)."""
    m = tm.ModelSpec()
    axis = m.tensor("axis", "int32", (), data=np.array(1, np.int32))
    x = m.tensor("x", "float32", (1, 4))
    o = m.tensor("o", "float32", (1, 4))
    m.op("SPLIT", [axis, x], [o], options[0], **options[1])
    with pytest.raises(ModelFormatError, match="NumSplits is 0 \\(no SplitOptions table\\) but the operator has 1 "
                                               "outputs"):
        load_tflite(m.build([x], [o]))


def test_an_options_table_of_another_op_reads_as_litert_defaults():
    """LiteRT's kernels read their own options type (``builtin_options_as_FullyConnectedOptions()`` is null for an
    AddOptions table) and keep zero-initialised parameters; edgert read the fused RELU of an AddOptions on a
    FULLY_CONNECTED (and RELU6 of a FullyConnectedOptions on an ADD) and its C core and serial NPU applied them.
    Such a table is dropped at load and not exported (LiteRT's null again); ops edgert does not interpret keep
    theirs as read, for LiteRT to judge."""
    g = load_tflite(tm.foreign_options("fc_then_add"))
    for n in g.nodes:
        assert n.attrs["tflite_options"] == {} and "fused_activation" not in n.attrs, n.name
    data, _, _ = subgraph_tflite(g, ["add_1"])
    assert [op["options_type"] for op in parse_tflite(data).operators] == [None]
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (2, 4))
    ax = m.tensor("axes", "int32", (1,), data=np.array([1], np.int32))
    y = m.tensor("y", "float32", (2,))
    m.op("MEAN", [x, ax], [y], "AddOptions", FusedActivationFunction=1)
    op = parse_tflite(m.build([x], [y])).operators[0]
    assert (op["options_type"], op["options"]) == ("AddOptions", {"FusedActivationFunction": 1, "PotScaleInt16": True})


def test_tensor_names_are_made_unique_even_when_a_suffix_collides():
    """TFLite names need not be unique; a repeated one got '#<index>' appended, which could be another tensor's own
    name: tensors 'x', 'x#2', 'x' became 'x', 'x#2', 'x#2', one IR tensor for two, and the partition exporter
    failed with KeyError."""
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 4))
    a = m.tensor("x#2", "float32", (1, 4))
    b = m.tensor("x", "float32", (1, 4))
    m.op("RELU", [x], [a])
    m.op("LOGISTIC", [a], [b])
    g = load_tflite(m.build([x], [b]))
    names = g.source.tensor_names
    assert len(set(names)) == 3 and names[:2] == ["x", "x#2"]
    assert [(n.inputs, n.outputs) for n in g.nodes] == [(["x"], ["x#2"]), (["x#2"], [names[2]])]
    assert g.outputs == [names[2]]


def test_bad_opcode_index():
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (1, 4))
    y = m.tensor("y", "float32", (1, 4))
    m.op("RELU", [x], [y])
    data = bytearray(m.build([x], [y]))
    g = parse_tflite(bytes(data))
    assert g.operators[0]["op"] == "RELU"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_byte_flips_never_crash(data):
    base = tm.int8_plumbing()
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    _load_or_format_error(bytes(buf))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 2**32 - 1))
def test_offset_words_overwritten(pos, value):
    buf = bytearray(tm.int8_plumbing())
    pos = pos % (len(buf) - 4) & ~3
    buf[pos:pos + 4] = struct.pack("<I", value)
    _load_or_format_error(bytes(buf))


def test_a_file_that_fails_to_parse_is_closed_at_once(tmp_path):
    """The memory map and file of a .tflite path that fails validation are closed before the error propagates, not
    left to the garbage collector while the traceback keeps them (a server loading many bad files would run out of
    descriptors)."""
    import os

    fds = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    data = tm.int8_fc(k=16, h=16, n=4, batch=1)
    for cut in (6, len(data) // 2):
        p = tmp_path / f"bad{cut}.tflite"
        p.write_bytes(data[:cut])
        before = len(os.listdir(fds))
        with pytest.raises(ModelFormatError) as exc:
            load_tflite(str(p))
        assert exc.value is not None and len(os.listdir(fds)) == before, f"cut at {cut}: the file is still open"


def test_a_parsed_file_keeps_only_its_map(tmp_path):
    """The file object of a parsed .tflite stayed open for the model's life and was closed by the garbage collector
    with a ResourceWarning; the memory map holds its own descriptor, so the file is closed at once."""
    import gc
    import sys
    import warnings

    p = tmp_path / "m.tflite"
    p.write_bytes(tm.int8_fc(k=16, h=16, n=4, batch=1))
    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = unraisable.append  # a warning raised in a destructor lands here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            g = load_tflite(str(p))
            assert g.nodes and g.tensors[g.inputs[0]].shape
            del g
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable, [str(u.exc_value) for u in unraisable]


@pytest.mark.parametrize("idx, axis, batch_dims, idtype", [
    ([0, 7], 1, 0, "int32"), ([0, 3], 1, 0, "int64"), ([0, -1], 1, 0, "int32"), ([0, 3], -1, 0, "int32"),
    ([[0, 3], [1, 0]], 1, 1, "int32"), ([2], 0, 0, "int32"),                       # LiteRT refuses these at invoke
    ([0, 2], 1, 0, "int32"), ([0, 2], -1, 0, "int64"), ([[0, 2], [1, 0]], 1, -1, "int32"), ([1], 0, 0, "int32"),
])
def test_constant_gather_indices_outside_the_axis_are_refused_at_load(idx, axis, batch_dims, idtype):
    """LiteRT's GATHER refuses an index outside [0, dim) (negative ones too) when it first runs: the Session was
    created and its run raised DeviceError. With constant indices the file is malformed: ModelFormatError at load,
    naming the operator and the index; the indices LiteRT takes load and run as LiteRT runs them."""
    import edgert

    idx = np.array(idx, idtype)
    m = tm.ModelSpec()
    x = m.tensor("x", "float32", (2, 3))
    i = m.tensor("idx", idtype, idx.shape, idx)
    yshape = (2, 2) if axis != 0 else (idx.size, 3)
    y = m.tensor("y", "float32", yshape)
    m.op("GATHER", [x, i], [y], "GatherOptions", Axis=axis, BatchDims=batch_dims)
    data = m.build([x], [y])
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    try:
        ref = tm.litert_reference(data, feeds, ["y"])[0]
    except RuntimeError as e:
        assert "gather" in str(e).lower()
        with pytest.raises(ModelFormatError, match="operator 0 \\(GATHER\\): index -?\\d+ at \\[.*\\] of tensor 1 "
                                                   "\\('idx'\\) lies outside \\[0, [23]\\)"):
            load_tflite(data)
        return
    np.testing.assert_array_equal(edgert.Session(data, telemetry=False).run(None, feeds)[0], ref)
