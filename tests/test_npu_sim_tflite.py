"""TFLite INT8 models on the serial NPU emulator (the AddressSanitizer + UBSan build): outputs equal to LiteRT's
whole-model outputs (XNNPACK, its default CPU path) with the INT8 nodes run by the device, bytes over the link equal
to the plan, failover to LiteRT when the emulator dies, and random shapes of the device's CONV_2D /
DEPTHWISE_CONV_2D / ADD / AVERAGE_POOL_2D against LiteRT op by op. Every op here is bit-exact: no budget."""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest

import edgert
import edgert.profiles as profiles
import tflite_models as tm
from bridge_models import serial_npu_profile
from edgert import UnsupportedOpError
from edgert.bridge import NpuSim
from edgert.delegates import serial_npu
from edgert.formats.tflite import load_tflite

import ai_edge_litert  # noqa: F401

ASAN = os.environ.get("EDGERT_NPU_SIM_ASAN", "1") != "0"  # the sanitizer build unless told otherwise

MODELS = {"int8_fc": tm.int8_fc, "int8_fc_int8io": lambda: tm.int8_fc(float_io=False), "int8_conv": tm.int8_conv,
          "int8_plumbing": tm.int8_plumbing}
# what the device must run of each: every INT8 node of a device op; QUANTIZE/SOFTMAX/DEQUANTIZE stay on the host
ON_DEVICE = {"int8_fc": {"fully_connected_1", "fully_connected_2", "add_3", "relu_4", "fully_connected_5"},
             "int8_fc_int8io": {"fully_connected_0", "fully_connected_1", "add_2", "relu_3", "fully_connected_4"},
             "int8_conv": {"conv_2d_1", "depthwise_conv_2d_2", "average_pool_2d_3"},
             "int8_plumbing": {"reshape_2", "concatenation_3", "fully_connected_4"}}


def sim(**kw):
    return NpuSim(asan=ASAN, **kw)


def session(data, url, device=None, **kw):
    return edgert.Session(data, device=device or serial_npu_profile(free_link=True), device_options={"url": url, **kw},
                          telemetry=False)


def device_parts(sess):
    return [(c, p) for c, p in zip(sess._bound.compiled, sess.plan.partitions) if p.delegate == "serial-npu"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_on_the_device_equals_litert(name):
    data = MODELS[name]()
    g = load_tflite(data)
    runs = 3
    with sim() as s:
        sess = session(data, s.url)
        placed = {n for p in sess.plan.partitions if p.delegate == "serial-npu" for n in p.nodes}
        assert placed == ON_DEVICE[name], sess.plan.table()
        est = sess.plan.estimates
        for i in range(runs):
            feeds = tm.feeds_for(g, seed=i)
            ref = tm.litert_reference(data, feeds, g.outputs)
            for a, b in zip(sess.run(None, feeds), ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
            assert sess.stats()["last_run"] == {"bytes_to_device": est["bytes_to_device"],
                                                "bytes_to_host": est["bytes_to_host"]}
        parts = device_parts(sess)
        assert parts and all(c.runs_on_device == runs and c.runs_on_host == 0 for c, _ in parts)
        st = sess.stats()
        assert st["failovers"] == 0 and st["bytes_over_link"] > 0
        dev = parts[0][0].state.device
        # over the link: the graph once, then exactly the plan's boundary tensors per run
        assert dev.graphs_sent == len(parts) and dev.bytes_graph == sum(len(c.blob) for c, _ in parts)
        assert dev.bytes_to_device == runs * est["bytes_to_device"] > 0
        assert dev.bytes_to_host == runs * est["bytes_to_host"] > 0
        assert dev.stats()["invokes"] == runs * len(parts)
        sess.close()
    assert s.proc.returncode == 0, s.stderr.decode()


def test_int8_model_runs_whole_on_the_device():
    """The real serial-npu profile, fallback forbidden: an INT8 model of device ops runs whole on the device, and
    only its int8 input and output cross the link."""
    data = conv_model(h=6, w=5, c=3, o=4, k=(3, 3), stride=(2, 1), dil=(1, 1), same=True, per_channel=True, act=3)
    g = load_tflite(data)
    with sim() as s:
        sess = edgert.Session(data, device="serial-npu", fallback="forbid", device_options={"url": s.url},
                              telemetry=False)
        assert [p.delegate for p in sess.plan.partitions] == ["serial-npu"]
        feeds = tm.feeds_for(g, seed=3)
        np.testing.assert_array_equal(sess.run(None, feeds)[0], tm.litert_reference(data, feeds, g.outputs)[0])
        (c, _), = device_parts(sess)
        dev = c.state.device
        assert c.runs_on_device == 1 and dev.bytes_to_device == feeds["x"].nbytes
        assert dev.bytes_to_host == int(np.prod(g.tensors[g.outputs[0]].shape))
        sess.close()


def test_killed_emulator_fails_over_to_litert():
    data = tm.int8_fc()
    g = load_tflite(data)
    s = sim().start()
    sess = session(data, s.url, retry_after_s=30.0, timeout_s=0.05, retries=2)
    feeds = tm.feeds_for(g, seed=0)
    np.testing.assert_array_equal(sess.run(None, feeds)[0], tm.litert_reference(data, feeds, g.outputs)[0])
    s.kill()
    for i in range(1, 4):
        feeds = tm.feeds_for(g, seed=i)
        np.testing.assert_array_equal(sess.run(None, feeds)[0], tm.litert_reference(data, feeds, g.outputs)[0])
    (c, _), = device_parts(sess)
    assert sess.stats()["failovers"] == 1 and c.runs_on_device == 1 and c.runs_on_host == 3
    from edgert.delegates.host_tflite import HostTFLitePartition

    assert isinstance(c._fallback, HostTFLitePartition)  # LiteRT, not onnxruntime
    sess.close()


def test_hello_lists_the_tflite_ops_and_refine_keeps_them():
    with sim() as s:
        from edgert.bridge import SerialNpuDevice

        dev = SerialNpuDevice(s.url)
        ops = set(dev.hello().ops)
        dev.close()
        assert {"FullyConnectedS8", "Conv2DS8", "DepthwiseConv2DS8", "AddS8", "AveragePool2DS8", "Concat"} <= ops
        unit = next(u for u in profiles.load("serial-npu").units if u.delegate == "serial-npu")
        refined = serial_npu.SerialNpuDelegate.refine_unit(unit, {"url": s.url})
        assert set(refined.ops) == set(unit.ops)
        assert refined.ops["Conv"].formats == ("tflite",)


def test_float_and_onnx_ops_stay_on_the_host(tmp_path):
    p = edgert.plan(tm.float_mlp(), device=serial_npu_profile(free_link=True))
    assert {q.delegate for q in p.partitions} == {"host"}
    # an ONNX QDQ model's Conv looks int8 to the partitioner, but the device's Conv is TFLite's
    from onnx_models import qdq_convnet

    p = edgert.plan(str(qdq_convnet(tmp_path)), device=serial_npu_profile(free_link=True))
    on_npu = [n for q in p.partitions if q.delegate == "serial-npu" for n in q.nodes]
    assert not [n for n in on_npu if p.graph.node(n).op_type in ("Conv", "Gemm", "AveragePool")]


def test_fc_parameters_are_the_host_c_cores():
    from edgert.delegates.host_tflite import int8_fc_step

    g = load_tflite(tm.int8_fc())
    for node in g.nodes:
        if node.attrs.get("tflite_op") != "FULLY_CONNECTED":
            continue
        op, ins, attrs = serial_npu.tflite_node(node, g)
        step = int8_fc_step(g, node)
        assert op == "FullyConnectedS8" and attrs == [step.n, step.k, step.y_zp, step.lo, step.hi]
        assert ins[3].dtype == np.float32 and ins[3].tobytes() == step.weights.scale.tobytes()
        w = np.asarray(g.tensors[node.inputs[1]].initializer, np.int64)
        b = np.asarray(g.tensors[node.inputs[2]].initializer, np.int64)
        np.testing.assert_array_equal(ins[2], b - step.x_zp * w.sum(axis=1))
        # byte for byte what the C core's plan holds (native/src/fc_s8/fc_s8.h: a 64-byte header, rowc_s[np],
        # rowc_u[np], scale[np], wsum[np], then the packed weights at w_off)
        plan = step.weights.plan.view(np.uint8)
        n, k, kp, n_pad, w_off = (int(v) for v in plan[24:64].view(np.int64))
        assert (n, k) == (step.n, step.k) and n_pad == ins[1].shape[0] * 16 and kp * 16 == ins[1].shape[1]
        assert plan[64:64 + 4 * step.n].tobytes() == ins[2].tobytes()
        assert plan[64 + 8 * n_pad:64 + 8 * n_pad + 4 * step.n].tobytes() == ins[3].tobytes()
        assert plan[w_off:w_off + n_pad * kp].tobytes() == ins[1].tobytes()


@pytest.mark.parametrize("op", ["AVERAGE_POOL_2D", "CONV_2D"])
def test_padding_other_than_same_or_valid_is_not_a_device_op(op):
    """TFLite's Padding enum has SAME (0) and VALID (1): a file with any other value is refused by name, not run
    as VALID."""
    q = (0.05, 3)
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (1, 4, 4, 2), q=q)
    y = m.tensor("y", "int8", (1, 2, 2, 2), q=q)
    if op == "CONV_2D":
        w = m.tensor("w", "int8", (2, 3, 3, 2), np.ones((2, 3, 3, 2), np.int8), q=(0.01, 0))
        b = m.tensor("b", "int32", (2,), np.zeros(2, np.int32), q=(0.0005, 0))  # without one: refused for that
        m.op(op, [x, w, b], [y], "Conv2DOptions", Padding=2, StrideH=1, StrideW=1)
    else:
        m.op(op, [x], [y], "Pool2DOptions", Padding=2, StrideH=2, StrideW=2, FilterHeight=2, FilterWidth=2)
    g = load_tflite(m.build([x], [y]))
    with pytest.raises(UnsupportedOpError, match="padding 2 is neither SAME"):
        serial_npu.tflite_node(g.nodes[0], g)


def test_an_average_pool_of_an_empty_input_is_not_a_device_op():
    """The firmware refuses an AVGPOOL_S8 whose input has H or W = 0 (a window could hold no tap: a count of 0 to
    divide by): the host does not send one (it was refused at LOAD_COMMIT, a failover)."""
    q = (0.05, 3)
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (1, 0, 4, 2), q=q)
    y = m.tensor("y", "int8", (1, 0, 2, 2), q=q)
    m.op("AVERAGE_POOL_2D", [x], [y], "Pool2DOptions", Padding=tm.SAME, StrideH=2, StrideW=2, FilterHeight=2,
         FilterWidth=2)
    g = load_tflite(m.build([x], [y]))
    with pytest.raises(UnsupportedOpError, match="AVGPOOL_S8: input H or W is 0"):
        serial_npu.tflite_node(g.nodes[0], g)


def test_nodes_the_translation_refuses_are_on_the_host_in_the_plan():
    """A RELU or RELU6 that requantizes is a Relu / Clip to the profile but not a device op. The plan put them on the
    device, then compile sent the whole partition to the host, the ADD the device runs with them, while stats()
    reported the plan's bytes; under fallback="forbid" only the first was named. The planner asks the translation
    node by node now: they are on the host in the plan, the ADD on the device, the bytes moved are the plan's, and
    forbid names both."""
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (2, 8), q=(0.05, 0))
    a = m.tensor("a", "int8", (2, 8), q=(0.04, -10))
    b = m.tensor("b", "int8", (2, 8), q=(0.06, 3))
    y = m.tensor("y", "int8", (2, 8), q=(0.03, -20))
    m.op("RELU", [x], [a])
    m.op("RELU6", [x], [b])
    m.op("ADD", [a, b], [y], "AddOptions", FusedActivationFunction=0)
    data = m.build([x], [y])
    g = load_tflite(data)
    with sim() as s:
        with pytest.raises(UnsupportedOpError, match="cannot run 2 of 3 nodes.*'relu_0': RELU with different input "
                                                     "and output quantization.*'relu6_1': RELU6 with different"):
            edgert.Session(data, device=serial_npu_profile(free_link=True), fallback="forbid",
                           device_options={"url": s.url}, telemetry=False)
        sess = session(data, s.url)
        assert {n: sess.plan.assignment[n] for n in ("relu_0", "relu6_1", "add_2")} == {
            "relu_0": "cpu", "relu6_1": "cpu", "add_2": "npu"}
        assert "different input and output quantization" in sess.plan.reasons["relu_0"]
        for seed in range(2):
            feeds = tm.feeds_for(g, seed=seed)
            np.testing.assert_array_equal(sess.run(None, feeds)[0], tm.litert_reference(data, feeds, g.outputs)[0])
        (c, _), = device_parts(sess)
        assert c.runs_on_device == 2 and c.runs_on_host == 0
        st, est = sess.stats(), sess.plan.estimates
        assert st["last_run"] == {k: est[k] for k in ("bytes_to_device", "bytes_to_host")} == {
            "bytes_to_device": 32, "bytes_to_host": 16}
        assert st["failovers"] == 0 and st["bytes_over_link"] > 0
        sess.close()


@pytest.mark.parametrize("op, xq, yq, feeds, refusal", [
    # a RELU that requantizes is a Relu to the partitioner but not a device op
    ("RELU", (0.05, 3), (0.04, -2), tm.feeds_for, "relu_0.*different input and output quantization"),
    # 6 / scale past int32: TFLite's RELU6 kernel casts it to int32, which C++ leaves undefined
    ("RELU6", (2e-9, 0), (2e-9, 0), tm.clamping_feeds, "relu6_0.*activation 3 on output scale 2e-09"),
])
def test_an_op_the_device_cannot_run_exactly_is_planned_on_the_host(op, xq, yq, feeds, refusal):
    """The device does not take the node: with fallback allowed the plan puts it on the host and LiteRT runs it,
    nothing crosses the link; forbidden, the session says why."""
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (2, 16), q=xq)
    y = m.tensor("y", "int8", (2, 16), q=yq)
    m.op(op, [x], [y])
    data = m.build([x], [y])
    g = load_tflite(data)
    f = feeds(g, seed=1)
    with sim() as s:
        sess = session(data, s.url)
        np.testing.assert_array_equal(sess.run(None, f)[0], tm.litert_reference(data, f, g.outputs)[0])
        assert re.search(refusal.split(".*")[1], sess.plan.reasons[f"{op.lower()}_0"])
        assert [p.unit for p in sess.plan.partitions] == ["cpu"] and sess.stats()["bytes_over_link"] == 0
        sess.close()
        with pytest.raises(UnsupportedOpError, match=refusal):
            edgert.Session(data, device=serial_npu_profile(free_link=True), fallback="forbid",
                           device_options={"url": s.url}, telemetry=False).close()
    assert s.proc.returncode == 0, s.stderr.decode()


# ---- single ops, random shapes, against LiteRT ------------------------------------------------------------------

def conv_model(h, w, c, o, k, stride, dil, same, per_channel, act, dw=False, seed=0, batch=1) -> bytes:
    """One int8 CONV_2D (o output channels) or DEPTHWISE_CONV_2D (o = depth multiplier) with random weights."""
    rng = np.random.default_rng(seed)
    oc = c * o if dw else o
    wshape = (1, k[0], k[1], oc) if dw else (oc, k[0], k[1], c)
    wq = rng.integers(-127, 128, wshape).astype(np.int8)
    ws = rng.uniform(0.002, 0.02, oc if per_channel else 1).astype(np.float32)
    sx, zx = float(rng.uniform(0.01, 0.05)), int(rng.integers(-20, 20))
    sy, zy = float(rng.uniform(0.05, 0.3)), int(rng.integers(-30, 30))
    ek = [(k[i] - 1) * dil[i] + 1 for i in range(2)]
    oh = -(-h // stride[0]) if same else (h - ek[0]) // stride[0] + 1
    ow = -(-w // stride[1]) if same else (w - ek[1]) // stride[1] + 1
    m = tm.ModelSpec()
    tx = m.tensor("x", "int8", (batch, h, w, c), q=(sx, zx))
    tw = m.tensor("w", "int8", wshape, wq, q=(ws, np.zeros(ws.size, np.int64)), axis=3 if dw else 0)
    tb = m.tensor("b", "int32", (oc,), rng.integers(-2000, 2000, oc).astype(np.int32),
                  q=(np.float32(sx) * ws, np.zeros(ws.size)))
    ty = m.tensor("y", "int8", (batch, oh, ow, oc), q=(sy, zy))
    common = dict(Padding=tm.SAME if same else tm.VALID, StrideH=stride[0], StrideW=stride[1],
                  DilationHFactor=dil[0], DilationWFactor=dil[1], FusedActivationFunction=act)
    if dw:
        m.op("DEPTHWISE_CONV_2D", [tx, tw, tb], [ty], "DepthwiseConv2DOptions", DepthMultiplier=o, **common)
    else:
        m.op("CONV_2D", [tx, tw, tb], [ty], "Conv2DOptions", **common)
    return m.build([tx], [ty])


def _run_on_device(url, data, seeds=(0, 1), feeds_for=tm.feeds_for):
    g = load_tflite(data)
    sess = edgert.Session(data, device="serial-npu", fallback="forbid", device_options={"url": url},
                          telemetry=False)
    assert [p.delegate for p in sess.plan.partitions] == ["serial-npu"]
    for seed in seeds:
        feeds = feeds_for(g, seed=seed)
        ref = tm.litert_reference(data, feeds, g.outputs)
        for name, a, b in zip(g.outputs, sess.run(None, feeds), ref):
            np.testing.assert_array_equal(a, b, err_msg=name)
    (c, _), = device_parts(sess)
    assert c.runs_on_device == len(seeds)
    sess.close()


@pytest.fixture
def device_url():  # one emulator per test: graphs stay loaded after a session closes, and it holds 8
    with sim() as s:
        yield s.url
    assert s.proc.returncode == 0, s.stderr.decode()


# (h, w, c, o or depth multiplier, kernel, stride, dilation, same, per_channel, fused activation)
CONV_CASES = [
    (7, 9, 3, 5, (3, 3), (1, 1), (1, 1), True, True, 0),
    (8, 8, 4, 6, (3, 3), (2, 2), (1, 1), True, False, 1),
    (9, 7, 2, 3, (3, 2), (2, 1), (2, 1), False, True, 3),
    (10, 11, 5, 4, (1, 1), (1, 2), (1, 1), False, False, 0),
    (6, 9, 3, 8, (5, 3), (1, 2), (1, 2), True, True, 1),
    (12, 6, 1, 2, (2, 2), (3, 1), (2, 2), True, True, 0),
]
DW_CASES = [
    (7, 9, 4, 1, (3, 3), (1, 1), (1, 1), True, True, 0),
    (8, 8, 3, 2, (3, 3), (2, 2), (1, 1), True, True, 1),
    (9, 7, 5, 2, (3, 2), (2, 1), (2, 2), False, False, 3),
    (6, 10, 2, 3, (2, 3), (1, 2), (1, 2), True, False, 0),
    (11, 5, 6, 1, (5, 1), (2, 1), (1, 1), False, True, 3),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_conv_shapes_vs_litert(device_url, case):
    h, w, c, o, k, st, dl, same, pc, act = case
    _run_on_device(device_url, conv_model(h, w, c, o, k, st, dl, same, pc, act, seed=h * w + c))


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_depthwise_shapes_vs_litert(device_url, case):
    h, w, c, dm, k, st, dl, same, pc, act = case
    _run_on_device(device_url, conv_model(h, w, c, dm, k, st, dl, same, pc, act, dw=True, seed=h * w + c,
                                          batch=2 if dm == 2 else 1))


@pytest.mark.parametrize("shape_b,act,seed", [((2, 3, 4, 5), 0, 0), ((1, 1, 1, 5), 1, 1), ((5,), 3, 2),
                                              ((2, 1, 4, 1), 0, 3)])
def test_add_vs_litert(device_url, shape_b, act, seed):
    rng = np.random.default_rng(seed)
    m = tm.ModelSpec()
    a = m.tensor("a", "int8", (2, 3, 4, 5), q=(float(rng.uniform(0.01, 0.1)), int(rng.integers(-50, 50))))
    b = m.tensor("b", "int8", shape_b, q=(float(rng.uniform(0.01, 0.1)), int(rng.integers(-50, 50))))
    y = m.tensor("y", "int8", (2, 3, 4, 5), q=(float(rng.uniform(0.02, 0.2)), int(rng.integers(-50, 50))))
    m.op("ADD", [a, b], [y], "AddOptions", FusedActivationFunction=act)
    _run_on_device(device_url, m.build([a, b], [y]))


@pytest.mark.parametrize("hw,k,stride,same,act", [((8, 8), (2, 2), (2, 2), False, 0), ((7, 9), (3, 3), (2, 2), True, 1),
                                                  ((5, 6), (3, 2), (1, 1), True, 3), ((9, 4), (4, 1), (3, 1), True, 0)])
def test_average_pool_vs_litert(device_url, hw, k, stride, same, act):
    rng = np.random.default_rng(hw[0])
    oh = -(-hw[0] // stride[0]) if same else (hw[0] - k[0]) // stride[0] + 1
    ow = -(-hw[1] // stride[1]) if same else (hw[1] - k[1]) // stride[1] + 1
    q = (float(rng.uniform(0.01, 0.1)), int(rng.integers(-40, 40)))
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (2, hw[0], hw[1], 3), q=q)
    y = m.tensor("y", "int8", (2, oh, ow, 3), q=q)
    m.op("AVERAGE_POOL_2D", [x], [y], "Pool2DOptions", Padding=tm.SAME if same else tm.VALID, StrideH=stride[0],
         StrideW=stride[1], FilterHeight=k[0], FilterWidth=k[1], FusedActivationFunction=act)
    _run_on_device(device_url, m.build([x], [y]))


def test_relu6_concat_reshape_vs_litert(device_url):
    q = (0.03, -7)
    m = tm.ModelSpec()
    a = m.tensor("a", "int8", (1, 3, 4, 2), q=q)
    b = m.tensor("b", "int8", (1, 3, 4, 5), q=q)
    ra = m.tensor("ra", "int8", (1, 3, 4, 2), q=q)
    cat = m.tensor("cat", "int8", (1, 3, 4, 7), q=q)
    shape = m.tensor("shape", "int32", (2,), np.array([3, 28], np.int32))
    y = m.tensor("y", "int8", (3, 28), q=q)
    m.op("RELU6", [a], [ra])
    m.op("CONCATENATION", [ra, b], [cat], "ConcatenationOptions", Axis=-1, FusedActivationFunction=0)
    m.op("RESHAPE", [cat, shape], [y], "ReshapeOptions", NewShape=np.array([3, 28], np.int32))
    _run_on_device(device_url, m.build([a, b], [y]))


def test_squeeze_vs_litert(device_url):
    """PROTOCOL §6.1 runs SQUEEZE as Copy, but the shipped profile did not list Squeeze: fallback='forbid' refused
    it."""
    q = (0.03, -7)
    m = tm.ModelSpec()
    a = m.tensor("a", "int8", (1, 3, 1, 4), q=q)
    r = m.tensor("r", "int8", (1, 3, 1, 4), q=q)
    y = m.tensor("y", "int8", (3, 4), q=q)
    m.op("RELU6", [a], [r])
    m.op("SQUEEZE", [r], [y], "SqueezeOptions", SqueezeDims=np.array([0, 2], np.int32))
    _run_on_device(device_url, m.build([a], [y]))


@pytest.mark.parametrize("scale,zp", tm.ACTIVATION_SCALES, ids=[f"s{s:.4g}_zp{z}" for s, z in tm.ACTIVATION_SCALES])
def test_activation_clamps_vs_litert(device_url, scale, zp):
    """Every fused ReLU-family clamp of the device's FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, ADD and
    AVERAGE_POOL_2D, and standalone RELU6 / RELU_N1_TO_1, over output scales and zero points that put a bound on or
    next to a rounding tie: XNNPACK's bounds for the first four, TFLite's own kernels' for the rest."""
    _run_on_device(device_url, tm.int8_activations(scale, zp), feeds_for=tm.clamping_feeds)


def test_profile_formats_are_checked(tmp_path):
    from edgert.errors import ProfileError

    from importlib import resources

    src = (resources.files("edgert") / "device_profiles" / "serial-npu.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(src.replace('formats = ["tflite"]', 'formats = ["caffe"]', 1))
    with pytest.raises(ProfileError, match=r"op\[\d+\]\.formats: expected a non-empty list of model formats"):
        profiles.load(bad)
    unit = next(u for u in profiles.load("serial-npu").units if u.delegate == "serial-npu")
    g = load_tflite(tm.int8_fc_single(k=8, n=4)[0])
    assert unit.supports(g.nodes[0], g) == (True, "")
    onnx_like = dataclasses.replace(g.nodes[0], attrs={})
    ok, why = unit.supports(onnx_like, g)
    assert not ok and "op Gemm from onnx not in the npu op list (only from tflite)" in why


@pytest.mark.parametrize("kind", tm.FOREIGN_OPTIONS)
def test_an_options_table_of_another_op_runs_as_litert_reads_it(device_url, kind):
    """LiteRT reads a FULLY_CONNECTED's FullyConnectedOptions, an ADD's AddOptions, and nothing else: the fused
    RELU of an AddOptions / Conv2DOptions table on an FC (RELU6 of a FullyConnectedOptions on an ADD) clamped the
    device's output; LiteRT runs them without one."""
    _run_on_device(device_url, tm.foreign_options(kind), seeds=range(3), feeds_for=tm.clamping_feeds)


def _windowed(op: str, options_type: str, **opts) -> bytes:
    q = (0.05, 3)
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (1, 4, 4, 2), q=q)
    y = m.tensor("y", "int8", (1, 4, 4, 2), q=q)
    if op == "AVERAGE_POOL_2D":
        m.op(op, [x], [y], options_type, **opts)
    else:
        w = m.tensor("w", "int8", (2, 3, 3, 2), np.ones((2, 3, 3, 2), np.int8), q=(0.01, 0))
        b = m.tensor("b", "int32", (2,), np.zeros(2, np.int32), q=(0.0005, 0))
        m.op(op, [x, w, b], [y], options_type, **opts)
    return m.build([x], [y])


@pytest.mark.parametrize("op, options_type", [("CONV_2D", "DepthwiseConv2DOptions"), ("CONV_2D", None),
                                              ("AVERAGE_POOL_2D", "Conv2DOptions")])
def test_a_window_without_its_own_options_is_not_a_device_op(device_url, op, options_type):
    """Without its own options table LiteRT's CONV_2D / pool has stride 0 and refuses the model; the device ran the
    window with another table's strides (or stride 1 and SAME padding when there was none)."""
    same = dict(Padding=tm.SAME, StrideW=1, StrideH=1, FusedActivationFunction=0)
    data = _windowed(op, options_type, **(same if options_type else {}),
                     **({"DepthMultiplier": 1} if options_type == "DepthwiseConv2DOptions" else {}))
    g = load_tflite(data)
    with pytest.raises(UnsupportedOpError, match="below 1 \\(LiteRT refuses the op\\)"):
        serial_npu.tflite_node(g.nodes[0], g)
    with pytest.raises(RuntimeError, match="stride_height > 0"):
        tm.litert_reference(data, tm.feeds_for(g), g.outputs)
    with pytest.raises(edgert.ModelFormatError, match="stride_height > 0"):
        session(data, device_url)
    # its own table: the device runs it as LiteRT does
    own = _windowed(op, "Pool2DOptions" if op == "AVERAGE_POOL_2D" else "Conv2DOptions", **same,
                    **({"FilterHeight": 1, "FilterWidth": 1} if op == "AVERAGE_POOL_2D" else
                       {"DilationHFactor": 1, "DilationWFactor": 1}))
    _run_on_device(device_url, own)


@pytest.mark.parametrize("shape_input, options_type, on_device", [
    (np.array([-1, 8], np.int32), "ReshapeOptions", True),   # the shape input wins, -1 takes the rest
    (np.array([-1, 8], np.int32), "SqueezeOptions", True),   # another op's table: the shape input still decides
    (None, "ReshapeOptions", True),                          # new_shape from the options
    (None, "SqueezeOptions", False),                         # no new_shape LiteRT reads: a scalar, refused
    (np.array([4, 4], np.int32), "ReshapeOptions", False),   # declared (2, 8), LiteRT computes (4, 4)
])
def test_reshape_on_the_device_only_to_the_shape_litert_computes(device_url, shape_input, options_type, on_device):
    """The device's RESHAPE is a copy into the declared output: it ran a RESHAPE whose shape LiteRT reads from
    nowhere (another op's options table, no shape input) or computes otherwise."""
    q = (0.03, -7)
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (4, 4), q=q)
    y = m.tensor("y", "int8", (2, 8), q=q)
    ins = [x] if shape_input is None else [x, m.tensor("shape", "int32", (2,), shape_input)]
    opts = {"NewShape": np.array([2, 8], np.int32)} if options_type == "ReshapeOptions" else {}
    m.op("RESHAPE", ins, [y], options_type, **opts)
    data = m.build([x], [y])
    if on_device:
        _run_on_device(device_url, data)
        return
    g = load_tflite(data)
    with pytest.raises(UnsupportedOpError, match="the shape LiteRT's RESHAPE computes is not the output's"):
        serial_npu.tflite_node(g.nodes[0], g)
    with pytest.raises(edgert.ModelFormatError):  # LiteRT refuses it, or computes another shape than declared
        session(data, device_url)


@pytest.mark.parametrize("case, on_device", [
    ("plain", True),
    ("requant_2^-40", True),               # XNNPACK's (the 2^-32 floor the device had was an older XNNPACK's)
    ("requant_underflows_to_0", False),    # XNNPACK's, not the device's: graph.c takes (0, 256)
    ("pruned_channel", False),             # TFLite's own kernel runs these
    ("denormal_channel", False),
    ("bias_unquantized", False),
    ("x_quantized_dimension_1", False),
    ("version_8", False),
])
def test_the_device_takes_an_int8_fc_only_when_xnnpack_does(device_url, case, on_device):
    """The device does XNNPACK's arithmetic (the host C core's plan): an FC LiteRT leaves to TFLite's own kernel (a
    pruned channel of scale 0, an unquantized bias...) ran on it a step off LiteRT here and there. The rule is the C
    core's (``host_tflite.int8_fc_params``); what the device adds is a positive scale."""
    from test_delegates_host_tflite import XNNPACK_FC_CASES

    data = tm.int8_fc_quant(**XNNPACK_FC_CASES[case])
    assert (tm.xnnpack_verdict(data) == "took") >= on_device
    g = load_tflite(data)
    if not on_device:
        with pytest.raises(UnsupportedOpError):
            serial_npu.tflite_node(g.nodes[0], g)
    sess = session(data, device_url)
    assert sess.plan.assignment["fully_connected_0"] == ("npu" if on_device else "cpu")
    for seed in range(5):
        feeds = tm.feeds_for(g, seed=seed)
        np.testing.assert_array_equal(sess.run(None, feeds)[0], tm.litert_reference(data, feeds, g.outputs)[0])
    sess.close()


@pytest.mark.parametrize("bias", ["none", "unquantized", "pruned_filter_channel"])
def test_a_conv_xnnpack_does_not_take_is_not_a_device_op(device_url, bias):
    """An int8 CONV_2D without a bias LiteRT refuses; with an unquantized bias or a filter channel of scale 0 it runs
    TFLite's own kernel. The device took all three."""
    q = (0.05, 3)
    m = tm.ModelSpec()
    x = m.tensor("x", "int8", (1, 5, 5, 2), q=q)
    sw = np.array([0.01, 0.0 if bias == "pruned_filter_channel" else 0.02], np.float32)
    w = m.tensor("w", "int8", (2, 3, 3, 2), np.random.default_rng(0).integers(-127, 128, (2, 3, 3, 2)).astype(np.int8),
                 q=(sw, np.zeros(2, np.int64)))
    ins = [x, w]
    if bias != "none":
        ins.append(m.tensor("b", "int32", (2,), np.array([100, -50], np.int32),
                            q=None if bias == "unquantized" else (np.float32(0.05) * np.array([0.01, 0.02], np.float32),
                                                                  np.zeros(2))))
    y = m.tensor("y", "int8", (1, 5, 5, 2), q=(0.1, -4))
    m.op("CONV_2D", ins, [y], "Conv2DOptions", Padding=tm.SAME, StrideW=1, StrideH=1, DilationWFactor=1,
         DilationHFactor=1)
    data = m.build([x], [y])
    g = load_tflite(data)
    assert tm.xnnpack_verdict(data) == ("refused" if bias == "none" else "declined")
    with pytest.raises(UnsupportedOpError):
        serial_npu.tflite_node(g.nodes[0], g)
    if bias == "none":
        with pytest.raises(edgert.ModelFormatError):
            session(data, device_url)
        return
    sess = session(data, device_url)
    assert sess.plan.assignment["conv_2d_0"] == "cpu"
    feeds = tm.feeds_for(g, seed=1)
    np.testing.assert_array_equal(sess.run(None, feeds)[0], tm.litert_reference(data, feeds, g.outputs)[0])
    sess.close()
