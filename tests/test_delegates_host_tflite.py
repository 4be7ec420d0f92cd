"""The host delegate's TFLite path (edgert/delegates/host_tflite.py) and LiteRT's int8 clamps: every fused and
standalone ReLU-family activation (FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, ADD, AVERAGE_POOL_2D; RELU6,
RELU_N1_TO_1) gives LiteRT's whole-model outputs bit for bit over output scales and zero points that put a bound on or
next to a rounding tie, with the C core on, off and chosen by timing, and on emulated NPU profiles."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import edgert
import edgert.profiles as profiles
import tflite_models as tm
from edgert.delegates.host_tflite import _act_range, int8_fc_step
from edgert.formats.tflite import load_tflite

import ai_edge_litert  # noqa: F401

SCALE_IDS = [f"s{s:.4g}_zp{z}" for s, z in tm.ACTIVATION_SCALES]


def free_link(profile_name: str):
    """The profile with a free link, so every int8 op goes to its NPU."""
    prof = profiles.load(profile_name)
    return dataclasses.replace(prof, units=[
        dataclasses.replace(u, link=dataclasses.replace(u.link, latency_s=0.0, bandwidth_bytes_s=1e18))
        if u.link is not None else u for u in prof.units])


def assert_equals_litert(sess, data, seeds=(0, 1)):
    g = load_tflite(data)
    for seed in seeds:
        feeds = tm.clamping_feeds(g, seed)
        ref = tm.litert_reference(data, feeds, g.outputs)
        for name, a, b in zip(g.outputs, sess.run(None, feeds), ref):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("core", [True, False, "auto"])
@pytest.mark.parametrize("scale,zp", tm.ACTIVATION_SCALES, ids=SCALE_IDS)
def test_activation_clamps_on_the_host_equal_litert(scale, zp, core):
    data = tm.int8_activations(scale, zp)
    sess = edgert.Session(data, device="host", core=core, telemetry=False)
    (part,) = sess._bound.compiled
    if core is True:
        assert [s.nodes[0] for s in part.core] == ["fully_connected_0", "fully_connected_5", "fully_connected_10"]
    assert_equals_litert(sess, data)
    sess.close()


@pytest.mark.parametrize("act", ["RELU6", "RELU_N1_TO_1"])
@pytest.mark.parametrize("m", [1, 8])
def test_c_core_fc_clamps_equal_litert_on_every_isa(isa, m, act):
    """The C core's FULLY_CONNECTED (m rows of 1024 -> 1024: its VNNI, AMX and threaded paths where the CPU has
    them) with the clamp int8_fc_params gives it."""
    for scale, zp in tm.ACTIVATION_SCALES[:7]:
        data = tm.int8_fc_activation(m, 1024, 1024, scale, zp, tm.RELU_FAMILY[act])
        g = load_tflite(data)
        step = int8_fc_step(g, g.nodes[0])
        for seed in (0, 1):
            x = tm.clamping_feeds(g, seed)["x"]
            y = np.zeros((m, 1024), np.int8)
            step.compute_into(x, y)
            np.testing.assert_array_equal(y, tm.litert_reference(data, {"x": x}, ["y"])[0], err_msg=f"{scale} {zp}")


@pytest.mark.parametrize("device", ["coral-usb", "imx8mp"])
@pytest.mark.parametrize("scale,zp", tm.ACTIVATION_SCALES, ids=SCALE_IDS)
def test_activation_clamps_on_emulated_npus_equal_litert(scale, zp, device):
    data = tm.int8_activations(scale, zp)
    sess = edgert.Session(data, device=free_link(device), emulate=True, telemetry=False)
    assert [p.delegate for p in sess.plan.partitions] == ["litert"]
    assert_equals_litert(sess, data)
    sess.close()


@pytest.mark.parametrize("op", ["FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD"])
def test_xnnpack_ops_quantize_bounds_in_float32_adding_the_zero_point_before_rounding(op):
    assert _act_range(3, 0.8, 0, op) == (0, 8)  # 6 / 0.8f = 7.5f, to even (7 from a float64 quotient)
    assert _act_range(3, 0.48, 0, op) == (0, 12)  # 6 / 0.48f = 12.5f (12.500000279 in float64), to even
    assert _act_range(2, 0.4, 0, op) == (-2, 2)  # -1 / 0.4f = -2.5f
    assert _act_range(3, np.float32(6 / 7.4999995), 100, op) == (100, 108)  # 7.4999995f + 100 = 107.5f
    assert _act_range(1, 1e-30, -5, op) == (-5, 127)
    assert _act_range(3, 1.2e-38, 0, op) == (0, 127)  # 6 / s is inf in float32


@pytest.mark.parametrize("op", ["AVERAGE_POOL_2D", "RELU6", "RELU_N1_TO_1"])
def test_tflite_kernels_round_the_float32_quotient_half_away_from_zero(op):
    assert _act_range(3, 0.8, 0, op) == (0, 8)
    assert _act_range(3, 0.48, 0, op) == (0, 13)
    assert _act_range(2, 0.4, 0, op) == (-3, 3)
    assert _act_range(3, np.float32(6 / 7.4999995), 100, op) == (100, 107)
    assert _act_range(3, 3e-9, 0, op) == (0, 127)
    # 6 / s past int32: TFLite's cast is undefined (LiteRT clamped everything to the zero point here), so no range
    assert _act_range(3, 2e-9, 0, op) is None
    assert _act_range(2, 4e-10, 0, op) is None
    assert _act_range(1, 1e-30, -5, op) == (-5, 127)


@pytest.mark.parametrize("device", ["host-true", "host-false", "host-auto", "coral-usb", "imx8mp"])
@pytest.mark.parametrize("kind", tm.FOREIGN_OPTIONS)
def test_an_options_table_of_another_op_runs_as_litert_reads_it(kind, device):
    """A FULLY_CONNECTED with AddOptions(RELU) or Conv2DOptions(RELU), an ADD with FullyConnectedOptions(RELU6):
    LiteRT reads none of them (its own options type is null) and runs the op without an activation; the C core
    clamped at RELU (and a default Session took the core on a large FC), and segments of an ADD beside it keep
    LiteRT's reading."""
    data = tm.foreign_options(kind)
    if device.startswith("host"):
        core = {"true": True, "false": False, "auto": "auto"}[device[5:]]
        sess = edgert.Session(data, device="host", core=core, telemetry=False)
        if core is True and kind != "add_fc":
            assert [s.nodes[0] for s in sess._bound.compiled[0].core] == ["fully_connected_0"]
    else:
        sess = edgert.Session(data, device=free_link(device), emulate=True, telemetry=False)
    assert_equals_litert(sess, data, seeds=range(3))
    sess.close()


def _pruned(i, v, n=16):
    sw = np.random.default_rng(8).uniform(0.001, 0.003, n).astype(np.float32)
    sw[i] = v
    return sw


F = np.float32
# INT8 FULLY_CONNECTEDs around the edges of what LiteRT's XNNPACK delegate takes
XNNPACK_FC_CASES = {
    "plain": {},
    "per_tensor_weights": dict(sw=[0.002], bias=([F(0.05) * F(0.002)], [0])),
    "pruned_channel": dict(sw=_pruned(5, 0.0)),                      # its bias scale 0 too: declined
    "pruned_channel_no_bias": dict(sw=_pruned(5, 0.0), bias=None),   # refused
    "denormal_channel": dict(sw=_pruned(3, 1e-40)),
    "bias_unquantized": dict(bias="unquantized"),
    "bias_scale_x2": dict(bias=(F(0.05) * _pruned(0, 0.002) * 2, np.zeros(16))),  # not read: taken
    "bias_one_scale": dict(bias=([1e-4], [0])),
    "bias_zero_point": dict(bias=([1e-4], [3])),
    "bias_scale_0": dict(bias=(np.r_[np.full(15, 1e-4), 0.0].astype(F), np.zeros(16))),
    "x_quantized_dimension_1": dict(x_axis=1),
    "y_quantized_dimension_1": dict(y_axis=1),
    "version_8": dict(version=8),                                    # sparse weights' version
    "requant_255": dict(sw=np.full(16, 0.002, F), ys=F(0.05) * F(0.002) / F(255.5)),
    "requant_256": dict(sw=np.full(16, 0.002, F), ys=F(0.05) * F(0.002) / F(256)),
    "requant_1000_one_channel": dict(sw=np.r_[np.full(15, 1e-6), 0.002].astype(F), ys=1e-7),
    "requant_2^-40": dict(sw=np.full(16, 2.0 ** -20, F), xs=2.0 ** -20, ys=1.0),
    "requant_underflows_to_0": dict(sw=np.full(16, 2.0 ** -70, F), xs=2.0 ** -70, ys=2.0 ** 20, bias=None),
}


@pytest.mark.parametrize("case", sorted(XNNPACK_FC_CASES))
def test_the_c_core_takes_an_int8_fc_exactly_when_xnnpack_does(case):
    """The C core does XNNPACK's arithmetic; LiteRT runs an FC XNNPACK does not take with TFLite's own kernel (a step
    off here and there: a pruned channel of scale 0, an unquantized bias, a quantized_dimension other than 0 on x)
    or refuses the model (requantization scale 256 and up). The core took all of those, so outputs drifted, and
    core=True answered for a model LiteRT refuses. Now it takes an FC exactly when plain LiteRT's XNNPACK delegate
    does (LiteRT's own verdict is the reference), and outputs equal LiteRT's over 20 inputs either way."""
    data = tm.int8_fc_quant(**XNNPACK_FC_CASES[case])
    verdict = tm.xnnpack_verdict(data)
    g = load_tflite(data)
    assert (int8_fc_step(g, g.nodes[0]) is not None) == (verdict == "took"), verdict
    for core in (True, False, "auto"):
        if verdict == "refused":
            with pytest.raises(edgert.ModelFormatError, match="failed to create XNNPACK runtime|failed to prepare"):
                edgert.Session(data, device="host", core=core, telemetry=False)
            continue
        sess = edgert.Session(data, device="host", core=core, telemetry=False)
        assert_equals_litert(sess, data, seeds=range(20))
        sess.close()


def test_the_fc_cases_cover_every_litert_verdict():
    assert {tm.xnnpack_verdict(tm.int8_fc_quant(**kw)) for kw in XNNPACK_FC_CASES.values()} == {
        "took", "declined", "refused"}
