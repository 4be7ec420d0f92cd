"""The reference firmware under the emulator (the AddressSanitizer + UBSan build): end to end bit-exact against
onnxruntime, graphs cached on the device, a fault soak, device reset and a killed emulator (failover), the q-block
matmul against the C core, version mismatch."""
import logging
import os
import time

import numpy as np
import pytest

import edgert
from edgert.bridge import DeviceResetError, DeviceStatusError, NpuSim, SerialNpuDevice
from edgert.bridge import protocol as P
from edgert.bridge.device import ProtocolVersionError
from edgert.delegates import serial_npu

from bridge_models import (int8_cnn, int8_conv_chain, int8_mlp, int8_split, int32_add_chain, int32_relu_neg_islands,
                           serial_npu_profile)
from onnx_models import ort_run

ASAN = os.environ.get("EDGERT_NPU_SIM_ASAN", "1") != "0"  # tests run the sanitizer build unless told otherwise


def sim(**kw):
    return NpuSim(asan=ASAN, **kw)


def feeds(model, rng):
    t = model.graph.input[0].type.tensor_type
    shape = [d.dim_value for d in t.shape.dim]
    dt = np.uint8 if t.elem_type == 2 else np.int8
    return {"x": rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1, shape).astype(dt)}


def session(model, url, **kw):
    return edgert.Session(model, device="serial-npu", fallback="forbid", device_options={"url": url, **kw},
                          telemetry=False)


@pytest.mark.parametrize("make", [int8_cnn, lambda: int8_cnn(seed=3, hw=7), int8_mlp])
def test_end_to_end_bit_exact_and_weights_sent_once(make):
    model = make()
    rng = np.random.default_rng(0)
    with sim() as s:
        sess = session(model, s.url)
        assert [p.delegate for p in sess.plan.partitions] == ["serial-npu"]
        for _ in range(5):
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        st = sess.stats()
        assert st["failovers"] == 0 and st["retransmits"] == 0
        part = sess._bound.compiled[0]
        sent = part.state.device.bytes_graph
        assert sent == len(part.blob) and part.state.device.graphs_sent == 1
        sess.close()
        # a second session (a new connection) finds the graph on the device by its hash: no weights sent again
        sess2 = session(model, s.url)
        f = feeds(model, rng)
        np.testing.assert_array_equal(sess2.run(None, f)[0], ort_run(model, f)[0])
        dev = sess2._bound.compiled[0].state.device
        assert dev.bytes_graph == 0 and dev.graphs_cached == 1
        # only boundary tensors crossed: tensor bytes equal the plan's transfers
        est = sess2.plan.estimates
        assert dev.bytes_to_device == est["bytes_to_device"] and dev.bytes_to_host == est["bytes_to_host"]
        stats = dev.stats()
        assert stats["invokes"] == 6 and stats["arena_used"] > 0 and stats["graphs"] == 1
        sess2.close()
    assert s.proc.returncode == 0, s.stderr.decode()


def test_many_sessions_one_after_another_free_their_tensors_and_evict_idle_graphs():
    """A process opening session after session (an appliance's usual life): each clean close frees its device
    tensors, graphs stay cached by hash until the device is out of graph slots, then idle ones are unloaded, so the
    12th distinct model still runs on the device (the emulator holds 8 graphs)."""
    rng = np.random.default_rng(5)
    with sim() as s:
        for seed in range(12):
            model = int8_mlp(seed=seed)
            sess = session(model, s.url)
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
            st = sess.stats()
            assert st["failovers"] == 0, seed
            sess.close()
        dev = SerialNpuDevice(s.url)
        try:
            stats = dev.stats()
            assert stats["tensors"] == 0 and stats["arena_used"] <= 8 * len(int8_mlp(seed=0).SerializeToString())
            assert 1 <= stats["graphs"] <= 8
        finally:
            dev.close()
    assert s.proc.returncode == 0, s.stderr.decode()


def test_a_new_host_session_frees_the_previous_ones_tensors_and_unfinished_loads():
    """A HELLO kept every tensor, so a host that lost its connection (a failover, a crash) leaked its handles and
    unfinished loads for good: the device filled up, for every process, until a reset. A HELLO from another host
    session frees them (PROTOCOL §2.5); a re-handshake of the same session keeps them."""
    import struct

    with sim() as s:
        a = SerialNpuDevice(s.url)
        a.hello()
        handles = [a.alloc(4096) for _ in range(3)]
        a._call(P.LOAD_BEGIN, struct.pack("<QI", 1234, 8000))  # a load left unfinished
        used = a.stats()["arena_used"]
        assert used >= 3 * 4096 + 8000
        a.hello()
        a.write(handles[0], b"kept")  # the same host session: nothing freed
        b = SerialNpuDevice(s.url)  # a new connection is a new host session
        st = b.stats()
        assert st["tensors"] == 0 and st["arena_used"] <= used - 3 * 4096 - 8000
        with pytest.raises(edgert.LinkError, match="ERR_HANDLE"):
            b.write(handles[0], b"gone")
        a.close()
        b.close()


def test_failovers_and_reconnects_leak_no_device_tensors():
    """Each failover forgot the connection's device tensors without FREE: after 24 the device's 48 handles were
    gone and every later run failed over (also in a new process). The next connection's HELLO frees them now."""
    import signal

    model = int8_mlp()
    rng = np.random.default_rng(10)
    with sim() as s:
        sess = session(model, s.url, timeout_s=0.02, retries=1, retry_after_s=0.0)
        f = feeds(model, rng)
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        part = sess._bound.compiled[0]
        for _ in range(30):  # what a failover does to the connection, more often than the device has handles for
            part.state.drop_connection()
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        for _ in range(3):  # real failovers: the device stops answering
            os.kill(s.proc.pid, signal.SIGSTOP)
            try:
                f = feeds(model, rng)
                np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
            finally:
                os.kill(s.proc.pid, signal.SIGCONT)
        f = feeds(model, rng)
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert sess.stats()["failovers"] == 3 and part.runs_on_host == 3 and part.runs_on_device == 32
        assert part.state.device.stats()["tensors"] == 2  # x and y of this connection, nothing older
        sess.close()


def test_a_new_host_session_gets_room_from_an_earlier_ones_cached_graphs():
    """Graphs stay loaded across sessions as a cache, and only the process that loaded them unloaded them: a device
    whose 8 graph slots another process had filled refused every new graph, for good. The device now drops the
    cached graphs the current host session has not named when it needs the room."""
    with sim() as s:
        other = SerialNpuDevice(s.url)
        for k in range(1, 9):
            other.load_graph(P.encode_graph([P.BlobTensor("int32", (k,)), P.BlobTensor("int32", (k,))],
                                            [P.BlobNode("Relu", [0], 1)], [0], [1]))
        assert other.stats()["graphs"] == 8
        other.close()  # that process ends, its graphs loaded
        model = int8_mlp()
        sess = session(model, s.url)
        f = feeds(model, np.random.default_rng(11))
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert sess.stats()["failovers"] == 0 and sess._bound.compiled[0].state.device.stats()["graphs"] == 1
        sess.close()


def _shrink_limits(monkeypatch, **kw):
    """The emulator's HELLO as a smaller device's (its limits only): what the host then sends must keep to them."""
    import dataclasses

    parse = P.HelloInfo.parse
    monkeypatch.setattr(P.HelloInfo, "parse", classmethod(
        lambda cls, p: dataclasses.replace(parse(p), limits=dataclasses.replace(parse(p).limits, **kw))))


def test_hello_reports_the_firmwares_limits():
    with sim() as s:
        dev = SerialNpuDevice(s.url)
        assert dev.hello().limits == P.DeviceLimits(max_tensors=64, max_nodes=64, max_io=16, max_handles=48,
                                                    max_graphs=8)
        dev.close()


@pytest.mark.parametrize("make, graphs", [(lambda: int8_conv_chain(12), 2), (lambda: int32_add_chain(70), 2)])
def test_a_partition_over_the_graph_limits_runs_on_the_device_as_several_graphs(make, graphs):
    """A 12-layer QLinearConv chain (~75 tensors) and a 70-node chain were one device graph over the firmware's 64
    tensors / 64 nodes: LOAD_COMMIT refused it at every run (a failover each time, even with fallback="forbid").
    They run as graphs that fit, the tensors between them staying on the device: no more bytes cross the link."""
    model = make()
    rng = np.random.default_rng(12)
    with sim() as s:
        sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="forbid",
                              device_options={"url": s.url}, telemetry=False)
        assert [p.delegate for p in sess.plan.partitions] == ["serial-npu"]
        part = sess._bound.compiled[0]
        assert len(part.graphs) == graphs
        for _ in range(2):
            x = rng.integers(-100, 100, sess.get_inputs()[0].shape).astype(sess.get_inputs()[0].dtype)
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})[0])
        dev = part.state.device
        assert sess.stats()["failovers"] == 0 and part.runs_on_device == 2
        assert dev.bytes_to_device == 2 * x.nbytes and dev.bytes_to_host == 2 * x.nbytes  # y is x's size
        sess.close()


def test_more_device_partitions_than_handles_run_on_the_device():
    """25 device partitions of two tensors each held 50 handles, one per tensor name, for good: ALLOC ran out of the
    device's 48 and every run failed over. The least recently used tensors are freed for new ones."""
    model = int32_relu_neg_islands(25)
    x = np.arange(-4, 4, dtype=np.int32)
    with sim() as s:
        sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                              device_options={"url": s.url}, telemetry=False)
        parts = [c for c, p in zip(sess._bound.compiled, sess.plan.partitions) if p.delegate == "serial-npu"]
        assert len(parts) == 25
        for _ in range(2):
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})[0])
        assert sess.stats()["failovers"] == 0 and all(p.runs_on_device == 2 for p in parts)
        # one device tensor per name the plan sends to or reads from the device (x, r0..r24, n0..n23): more than the
        # reference firmware's handles, so it holds exactly as many as those, every one in use
        names = {t for p in sess.plan.partitions if p.delegate == "serial-npu" for t in (*p.inputs, *p.outputs)}
        assert len(names) == 50
        assert parts[0].state.device.stats()["tensors"] == P.DeviceLimits().max_handles == 48
        sess.close()


def test_a_cortex_m4_sized_device_gets_graphs_and_tensors_that_fit(monkeypatch):
    """With the Cortex-M4 build's limits (32 tensors and 32 nodes per graph, 16 handles) every graph and the live
    tensors keep to them; with one node per graph the partition's 12 graphs outnumber the device's 8 slots, and the
    least recently used are unloaded for the next (reloaded at the next run), and the input the device holds is kept
    (it was freed with them, and sent again). The outputs stay exact."""
    model = int8_conv_chain(12)
    rng = np.random.default_rng(13)
    with sim() as s:
        for kw, graphs in (({"max_tensors": 32, "max_nodes": 32, "max_handles": 16, "max_graphs": 4}, 3),
                           ({"max_nodes": 1}, 12)):
            _shrink_limits(monkeypatch, **kw)
            sess = session(model, s.url)
            part = sess._bound.compiled[0]
            assert len(part.graphs) == graphs
            for _ in range(2):
                f = feeds(model, rng)
                np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
            assert sess.stats()["failovers"] == 0 and part.runs_on_device == 2
            assert part.state.device.stats()["tensors"] <= 16
            # graphs unloaded for slots, not the tensors: a run on the same input sends nothing again
            sent = part.state.device.bytes_to_device
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
            assert part.state.device.bytes_to_device == sent
            sess.close()


def test_a_model_with_a_symbolic_batch_runs_on_the_device():
    """compile got the model as written: a symbolic batch left the translation without static shapes, so the
    partition planned on the device ran on the host at every run (nothing over the link, the plan's bytes counted).
    It gets the graph with the session's dims bound: each batch size runs on the device, bit for bit."""
    model = int8_mlp()
    for v in (model.graph.input[0], model.graph.output[0]):
        d = v.type.tensor_type.shape.dim[0]
        d.ClearField("dim_value")
        d.dim_param = "B"
    with sim() as s:
        sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="forbid",
                              device_options={"url": s.url}, telemetry=False)
        for b in (4, 2, 4):
            x = np.random.default_rng(b).integers(-128, 128, (b, 64)).astype(np.int8)
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})[0])
            (part,) = [c for c, p in zip(sess._bound.compiled, sess.plan.partitions) if p.delegate == "serial-npu"]
            assert part.runs_on_device >= 1 and part.runs_on_host == 0
        assert sess.stats()["bytes_over_link"] > 0 and sess.stats()["failovers"] == 0
        sess.close()


def test_forbid_refuses_a_device_that_does_not_answer_at_creation():
    """fallback="forbid" on a serial NPU that gave no HELLO made a Session whose plan named the device, and every run
    then completed on the host: the CPU fallback forbid rules out. It is a DeviceError at creation; with "allow" the
    Session is made and runs fail over."""
    master, slave = os.openpty()  # a port nobody answers on
    try:
        url = os.ttyname(slave)
        opts = {"url": url, "timeout_s": 0.02, "retries": 1}
        with pytest.raises(edgert.DeviceError, match="does not answer.*fallback='forbid'"):
            edgert.Session(int8_mlp(), device="serial-npu", fallback="forbid", device_options=opts, telemetry=False)
        sess = edgert.Session(int8_mlp(), device="serial-npu", fallback="allow", device_options=opts, telemetry=False)
        f = feeds(int8_mlp(), np.random.default_rng(3))
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(int8_mlp(), f)[0])
        sess.close()
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("n, residual, handles", [(60, False, 48), (20, True, 3)])
def test_a_partition_split_in_more_graphs_than_handles_keeps_only_what_later_graphs_read(monkeypatch, n, residual,
                                                                                         handles):
    """A run of a split partition kept every tensor an earlier graph of it had made from eviction: a chain split in
    more graphs than the device has handles ran out of them (ERR_NOMEM, a failover at every run), and an input a later
    graph reads again (the residual x) was not kept, so it could be freed and sent twice. Only what a later graph
    reads is kept now: the chain runs on the device and x crosses the link once per run."""
    _shrink_limits(monkeypatch, max_nodes=1, max_handles=handles)
    model = int32_add_chain(n, residual=residual)
    with sim() as s:
        sess = session(model, s.url)
        part = sess._bound.compiled[0]
        assert len(part.graphs) == n
        for run in range(2):
            x = np.arange(-2, 2, dtype=np.int32) + run  # new data: sent again
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})[0])
        dev = part.state.device
        assert sess.stats()["failovers"] == 0 and part.runs_on_device == 2
        assert dev.bytes_to_device == 2 * x.nbytes and dev.bytes_to_host == 2 * x.nbytes
        assert dev.stats()["tensors"] <= handles
        sess.close()


def test_a_node_over_the_devices_limits_is_refused_when_planning(monkeypatch):
    """A QLinearConv reads 8 tensors and writes one: a device of 8 tensors per graph cannot take it. Under
    fallback="forbid" the Session is refused naming the limit for each such node; otherwise the plan puts them on
    the host (the limits are HELLO's, which the planner's check asks)."""
    model = int8_conv_chain(2)
    _shrink_limits(monkeypatch, max_tensors=8)
    with sim() as s:
        with pytest.raises(edgert.UnsupportedOpError, match="cannot run 2 of 2 nodes.*node 'conv0' needs more than "
                                                            "the device's limits per graph allow: tensors \\(9 > 8\\)"
                                                            ".*node 'conv1' needs more"):
            session(model, s.url)
        sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                              device_options={"url": s.url}, telemetry=False)
        f = feeds(model, np.random.default_rng(14))
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert [p.delegate for p in sess.plan.partitions] == ["host"] and sess.stats()["failovers"] == 0
        assert "tensors (9 > 8)" in sess.plan.reasons["conv0"]
        sess.close()


def _t(dtype, shape, const=False):
    return P.BlobTensor(dtype, tuple(shape), np.ones(shape, dtype).tobytes() if const else None)


def _one_node_blob(op, ins, y, attrs=()):
    """A graph of one node: ``ins`` (BlobTensors, constants with data; None: absent) -> ``y``."""
    tensors = [t for t in ins if t is not None] + [y]
    ids, k = [], 0
    for t in ins:
        ids.append(None if t is None else k)
        k += t is not None
    graph_in = [i for i in ids if i is not None and tensors[i].data is None]
    return P.encode_graph(tensors, [P.BlobNode(op, ids, len(tensors) - 1, list(attrs))], graph_in, [len(tensors) - 1])


def _tv(dtype, values):
    """a constant holding ``values`` (a scalar or a 1-D list)"""
    v = np.asarray(values, dtype)
    return P.BlobTensor(dtype, v.shape, v.tobytes())


I8, U8, I32, F32 = "int8", "uint8", "int32", "float32"
_CONV = [1, 1, 1, 1, 1, 1, 1, 1, 1]  # group, strides, pads (1 each side), dilations


def _qconv(y_shape=(1, 4, 8, 8), attrs=_CONV, w=(4, 4, 3, 3), bias=None, w_s=()):
    return ("QLinearConv", [_t(I8, (1, 4, 8, 8)), _t(F32, (), 1), _t(I8, (), 1), _t(I8, w, 1), _t(F32, w_s, 1),
                            _t(I8, (), 1), _t(F32, (), 1), _t(I8, (), 1), bias], _t(I8, y_shape), attrs)


MIRROR_CASES = [  # (op, inputs, output, attributes): accepted and refused nodes of each ONNX-side op
    ("MatMulInteger", [_t(I8, (2, 3, 8)), _t(I8, (8, 4), 1)], _t(I32, (2, 3, 4)), []),
    ("MatMulInteger", [_t(I8, (2, 3, 8)), _t(I8, (2, 8, 4), 1)], _t(I32, (2, 3, 4)), []),  # batched B
    ("MatMulInteger", [_t(U8, (8,)), _t(I8, (8, 4), 1)], _t(I32, (4,)), []),
    ("MatMulInteger", [_t(U8, (3, 8)), _t(I8, (8, 4), 1), _t(U8, (), 1), _t(I8, (4,), 1)], _t(I32, (3, 4)), []),
    ("MatMulInteger", [_t(I8, (3, 8)), _t(I8, (8, 4), 1), _t(I8, (3,), 1)], _t(I32, (3, 4)), []),  # a_zp per row
    ("MatMulInteger", [_t(I8, (3, 8)), _t(I8, (8, 4), 1), _t(I8, ())], _t(I32, (3, 4)), []),  # a_zp not constant
    ("MatMulInteger", [_t(I8, (3, 8)), _t(I8, (8, 4), 1)], _t(I8, (3, 4)), []),
    ("MatMulInteger", [_t(I32, (3, 8)), _t(I8, (8, 4), 1)], _t(I32, (3, 4)), []),
    ("QLinearMatMul", [_t(I8, (3, 8)), _t(F32, (), 1), _t(I8, (), 1), _t(I8, (8, 4), 1), _t(F32, (4,), 1),
                       _t(I8, (4,), 1), _t(F32, (), 1), _t(I8, (), 1)], _t(I8, (3, 4)), []),
    ("QLinearMatMul", [_t(I8, (3, 8)), _t(F32, (), 1), _t(I8, (), 1), _t(I8, (8, 4), 1), _t(F32, (), 1),
                       _t(I8, (), 1), _t(F32, (), 1), _t(U8, (), 1)], _t(I8, (3, 4)), []),  # y_zp's dtype
    # requantization scales s_a * s_b[c] / s_y: zero, negative, NaN, overflowing (refused); both negative (taken)
    *[("QLinearMatMul", [_t(I8, (3, 8)), _tv(F32, sa), _t(I8, (), 1), _t(I8, (8, 4), 1), _tv(F32, sb),
                         _t(I8, (4,), 1), _tv(F32, sy), _t(I8, (), 1)], _t(I8, (3, 4)), [])
      for sa, sb, sy in ((0.1, [0.2] * 4, 0.0), (0.1, [0.2, 0.3, -0.1, 0.2], 0.5), (np.nan, 0.2, 0.5),
                         (1e30, [1e30] * 4, 1.0), (0.1, 0.2, np.inf), (-0.1, -0.2, 0.5), (1e-30, 1e-30, 1e10))],
    ("QLinearConv", [_t(I8, (1, 4, 8, 8)), _tv(F32, 0.1), _t(I8, (), 1), _t(I8, (4, 4, 3, 3), 1),
                     _tv(F32, [0.2, 0.0, 0.2, 0.2]), _t(I8, (), 1), _tv(F32, 0.5), _t(I8, (), 1), None],
     _t(I8, (1, 4, 8, 8)), _CONV),
    _qconv(), _qconv(bias=_t(I32, (4,), 1)), _qconv(bias=_t(I32, (3,), 1)), _qconv(w_s=(4,)), _qconv(w_s=(3,)),
    _qconv(y_shape=(1, 4, 7, 7)), _qconv(attrs=[3] + _CONV[1:]), _qconv(attrs=[1, 0] + _CONV[2:]),
    _qconv(attrs=_CONV[:3] + [256] + _CONV[4:]), _qconv(w=(4, 2, 3, 3), attrs=[2] + _CONV[1:]),
    *[("ConvInteger", [_t(U8, (1, 2, 5, 5)), _t(I8, (3, 2, 3, 3), 1)], _t(I32, (1, 3, 3, 3)),
       [1, 1, 1, 0, 0, 0, 0, d, d]) for d in (1, 3)],  # dilation 3: the kernel spans 7 > 5
    ("Add", [_t(I32, (2, 3)), _t(I32, (3,), 1)], _t(I32, (2, 3)), []),
    ("Add", [_t(U8, (2, 3)), _t(U8, (3,), 1)], _t(U8, (2, 3)), []),
    ("Mul", [_t(I8, (2, 3)), _t(I8, (2,), 1)], _t(I8, (2, 3)), []),
    ("Relu", [_t(U8, (2, 3))], _t(U8, (2, 3)), []), ("Relu", [_t(F32, (2, 3))], _t(F32, (2, 3)), []),
    ("Clip", [_t(I8, (2, 3))], _t(I8, (3, 2)), [0, 6]), ("Clip", [_t(I8, (2, 3))], _t(I8, (2, 3)), [0]),
    ("Copy", [_t(I8, (2, 3))], _t(I8, (6,)), []), ("Copy", [_t(I8, (2, 3))], _t(I8, (5,)), []),
    ("Concat", [_t(I8, (2, 3)), _t(I8, (2, 2))], _t(I8, (2, 5)), [1]),
    ("Concat", [_t(I8, (2, 3)), _t(I8, (2, 2))], _t(I8, (2, 5)), [2]),
    ("Concat", [_t(I8, (2, 3)), _t(I8, (3, 2))], _t(I8, (2, 5)), [1]),
    ("Concat", [_t(I8, (2, 3)), _t(I8, (2, 2))], _t(I8, (2, 6)), [1]),
    ("Relu", [_t(I8, (1, 1, 1, 2, 3))], _t(I8, (1, 1, 1, 2, 3)), []),
]


def test_the_hosts_node_check_is_the_firmwares():
    """translate sent nodes the firmware refuses at LOAD_COMMIT (a MatMulInteger with a batched B): a failover at
    every run, even under fallback="forbid". protocol.node_problem mirrors graph.c's check_node: for each node here,
    it refuses exactly what the firmware refuses, with the firmware's message."""
    with sim() as s:
        dev = SerialNpuDevice(s.url)
        refused = 0
        for k, (op, ins, y, attrs) in enumerate(MIRROR_CASES):
            why = P.node_problem(op, ins, y, attrs)
            try:
                dev.unload_graph(dev.load_graph(_one_node_blob(op, ins, y, attrs)))
                firmware = None
            except edgert.LinkError as exc:
                firmware = str(exc).split(": ", 2)[-1]  # "serial NPU <url>: LOAD_COMMIT failed with <code>: <why>"
            assert why == firmware, (k, op)
            refused += why is not None
        assert 0 < refused < len(MIRROR_CASES)
        dev.close()


@pytest.mark.parametrize("y3s", [0.0, -0.2, np.nan])
def test_a_qlinear_node_without_a_usable_requantization_scale_runs_on_the_host(y3s):
    """The firmware requantized with whatever s_a * s_b / s_y came out (zero, negative, NaN): an answer nobody
    defines and onnxruntime's differs from. LOAD_COMMIT refuses such a node (graph.c: qlinear_scales_ok), the
    planner asks the same check, so the node runs on the host: outputs equal onnxruntime's; forbid names it."""
    from onnx import numpy_helper

    model = int8_cnn()
    for t in model.graph.initializer:
        if t.name == "y3s":
            t.CopyFrom(numpy_helper.from_array(np.array(y3s, np.float32), "y3s"))
    with sim() as s:
        with pytest.raises(edgert.UnsupportedOpError, match="node 'fc'.*s_a \\* s_b / s_y must be a positive finite"):
            session(model, s.url)
        sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                              device_options={"url": s.url}, telemetry=False)
        f = feeds(model, np.random.default_rng(5))
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert sess.plan.assignment["fc"] == "cpu" and sess.stats()["failovers"] == 0
        assert {sess.plan.assignment[n] for n in ("conv1", "dw2")} == {"npu"}
        sess.close()


# graphs a kernel would divide by zero on, every other rule kept: (op, inputs, output, attributes, why refused)
ZERO_DIVISOR_CASES = [
    ("MatMulInteger", [_t(I8, (2, 0)), _t(I8, (0, 3), 1)], _t(I32, (2, 3)), [], "matmul: K is 0"),
    ("MatMulInteger", [_t(U8, (4, 2, 0)), _t(I8, (0, 3), 1), _t(U8, (), 1)], _t(I32, (4, 2, 3)), [],
     "matmul: K is 0"),
    ("QLinearMatMul", [_t(I8, (2, 0)), _t(F32, (), 1), _t(I8, (), 1), _t(I8, (0, 3), 1), _t(F32, (), 1),
                       _t(I8, (), 1), _t(F32, (), 1), _t(I8, (), 1)], _t(I8, (2, 3)), [], "matmul: K is 0"),
    # H = 0 padded (2 above and below a window of 3) to an output of 2 rows: each window holds no tap of the input
    ("AveragePool2DS8", [_t(I8, (1, 0, 2, 1))], _t(I8, (1, 2, 2, 1)), [3, 1, 1, 1, 2, 0, 2, 0, -128, 127],
     "AVGPOOL_S8: input H or W is 0"),
]


def test_a_graph_a_kernel_would_divide_by_zero_on_is_refused_at_load():
    """A MatMulInteger or QLinearMatMul with K = 0 was accepted at LOAD_COMMIT (and by node_problem), then INVOKE
    divided by K (graph.c: M = numel(A) / K): the emulator died of SIGFPE (ASan: division by zero), and so did an
    average pool of an input with H = 0 padded to a non-empty output (a window with no tap, a count of 0). Both are
    ERR_SHAPE at LOAD_COMMIT now; node_problem says the same for the ONNX ops, so the host never sends them."""
    with sim() as s:
        dev = SerialNpuDevice(s.url)
        for op, ins, y, attrs, why in ZERO_DIVISOR_CASES:
            if op != "AveragePool2DS8":  # node_problem covers the ONNX-side ops (the TFLite ones: tflite_node)
                assert P.node_problem(op, ins, y, attrs) == why, op
            with pytest.raises(DeviceStatusError, match=f"LOAD_COMMIT failed with ERR_SHAPE: {why}"):
                dev.load_graph(_one_node_blob(op, ins, y, attrs))
        dev.close()
    assert s.proc.returncode == 0, s.stderr.decode()  # alive to the end, no sanitizer report


def test_a_node_the_device_refuses_is_kept_on_the_host_when_planning(caplog):
    """The batched-B MatMulInteger: a clear error at Session creation under fallback="forbid", the host otherwise
    (in the plan), with nothing sent to the device and no failover."""
    from onnx import TensorProto, helper, numpy_helper

    from bridge_models import _checked_model

    rng = np.random.default_rng(15)
    model = _checked_model([helper.make_node("MatMulInteger", ["x", "b"], ["y"], name="mm")], "batched_b",
                           [numpy_helper.from_array(rng.integers(-5, 5, (2, 8, 4)).astype(np.int8), "b")],
                           ("x", TensorProto.INT8, [2, 3, 8]), ("y", TensorProto.INT32, [2, 3, 4]))
    with sim() as s:
        with pytest.raises(edgert.UnsupportedOpError, match="node 'mm' \\(MatMulInteger\\): the device refuses it: "
                                                            "matmul: A \\(..,M,K\\) B \\(K,N\\)"):
            edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="forbid",
                           device_options={"url": s.url}, telemetry=False)
        sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                              device_options={"url": s.url}, telemetry=False)
        x = rng.integers(-5, 5, (2, 3, 8)).astype(np.int8)
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})[0])
        assert [p.delegate for p in sess.plan.partitions] == ["host"]
        assert sess.stats()["bytes_over_link"] == 0 and sess.stats()["failovers"] == 0
        sess.close()


def test_a_graph_the_device_refuses_at_load_is_not_sent_again(monkeypatch, caplog):
    """What node_problem does not foresee and the device refuses at LOAD_COMMIT (ERR_GRAPH, ERR_SHAPE,
    ERR_UNSUPPORTED) would be refused every time: it was sent again after every back-off, a failover each time, and
    bytes_graph counted none of it. Now: one failover, the partition on the host from then on, the blob's bytes
    counted once."""
    import dataclasses

    model = int8_mlp()
    monkeypatch.setattr(P, "node_problem", lambda *a: None)  # the host's check blind: only the device refuses
    encode = P.encode_graph
    monkeypatch.setattr(P, "encode_graph", lambda t, n, i, o: encode(  # a Clip without its two attributes
        t, [dataclasses.replace(x, op="Clip") if x.op == "Relu" else x for x in n], i, o))
    rng = np.random.default_rng(16)
    with sim() as s:
        sess = session(model, s.url, retry_after_s=0.0)
        part = sess._bound.compiled[0]
        with caplog.at_level(logging.ERROR, logger="edgert.serial_npu"):
            for _ in range(4):
                f = feeds(model, rng)
                np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        st = part.state.stats()
        assert sess.stats()["failovers"] == 1 and part.runs_on_host == 4 and part.runs_on_device == 0
        assert st["bytes_graph"] == len(part.blob) and part.state.device.graphs_sent == 0
        assert "ERR_GRAPH" in caplog.text and "runs on the host from now on" in caplog.text
        sess.close()


@pytest.mark.slow
def test_fault_soak_1000_invocations():
    """1% dropped and 1% corrupted bytes (each direction): 1000 invocations, none wrong, lost or duplicated."""
    model = int8_mlp(k=16, n=4, m=1)
    rng = np.random.default_rng(7)
    with sim(drop=0.01, corrupt=0.01, seed=11) as s:
        sess = session(model, s.url, timeout_s=0.05, retries=200)
        part = None
        for i in range(1000):
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0], err_msg=f"invocation {i}")
            part = sess._bound.compiled[0]
        st = sess.stats()
        dev = part.state.device.stats()
        sess.close()
    assert st["failovers"] == 0 and part.runs_on_device == 1000
    assert dev["invokes"] == 1000          # exactly once each: retransmitted INVOKEs were answered from the cache
    assert st["retransmits"] > 50 and st["resyncs"] > 50
    assert dev["duplicates"] > 0


def test_the_default_link_options_ride_out_the_soak_noise():
    """1% dropped and 1% corrupted bytes with the default link options: the suite's int8_mlp (256 bytes in, 512 out)
    ran 0 of 60 runs on the device (each failed over: right results, never from the device). Chunks are sized for
    the measured error rate from the first transfer, a frame ends with two delimiters (one lost cost a timeout), an
    unfinished graph load resumes, a failover of an unanswered request keeps the session (no HELLO), and immediate
    retransmissions (a NAK, a broken answer) have a budget of their own beside the default retries."""
    model = int8_mlp()
    rng = np.random.default_rng(8)
    with sim(drop=0.01, corrupt=0.01, seed=12) as s:
        sess = session(model, s.url, retry_after_s=0.0)  # after a failover the next run tries the device again
        for i in range(100):
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0], err_msg=f"run {i}")
        part = sess._bound.compiled[0]
        st = sess.stats()
        sess.close()
    assert part.runs_on_device >= 90, (part.runs_on_device, st)
    assert st["retransmits"] > 100


def test_reset_mid_inference_fails_over_then_recovers(caplog):
    model = int8_cnn()
    rng = np.random.default_rng(1)
    with sim(reset_after=12) as s:  # HELLO, LOAD x3, ALLOC, WRITE, ALLOC, INVOKE, READ = 9; the 2nd run dies
        sess = session(model, s.url, retry_after_s=0.0)
        with caplog.at_level(logging.WARNING, logger="edgert.serial_npu"):
            for _ in range(4):
                f = feeds(model, rng)
                np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        st = sess.stats()
        part = sess._bound.compiled[0]
        assert st["failovers"] == 1 and part.runs_on_host == 1 and part.runs_on_device == 3
        assert "completes on the host" in caplog.text
        assert part.state.device.graphs_sent == 1  # the new connection re-handshook and reloaded by hash
        sess.close()


def test_killed_emulator_fails_over_with_back_off():
    model = int8_mlp()
    rng = np.random.default_rng(2)
    s = sim().start()
    sess = session(model, s.url, retry_after_s=30.0, timeout_s=0.05, retries=2)
    f = feeds(model, rng)
    np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
    s.kill()
    for _ in range(3):
        f = feeds(model, rng)
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
    part = sess._bound.compiled[0]
    assert sess.stats()["failovers"] == 1 and part.runs_on_host == 3  # backed off: the device is not retried yet
    sess.close()


def test_a_session_dropped_without_close_gives_its_device_state_back():
    """A Session dropped without close() kept its DeviceState (one per URL, counted by reference) for good: a later
    Session on the URL inherited its options and back-off (30 s here, after a reset mid-run: every run of the new
    Session went to the host), its failovers and bytes. Its partitions give their reference back when they are
    collected now, also partitions that left a resident tensor on the device (the state's entry held them)."""
    import gc
    import warnings
    import weakref

    model = int8_cnn()
    rng = np.random.default_rng(3)
    with sim(reset_after=12) as s:  # 9 frames for the first run: the second run meets the reset
        old = session(model, s.url, retry_after_s=30.0)
        for _ in range(2):
            f = feeds(model, rng)
            np.testing.assert_array_equal(old.run(None, f)[0], ort_run(model, f)[0])
        st, gone = old._bound.compiled[0].state, weakref.ref(old._bound.compiled[0])
        assert old.stats()["failovers"] == 1 and time.monotonic() < st.down_until
        del old
        gc.collect()
        assert gone() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not "this process already has the device open with ... keeps those"
            new = session(model, s.url)
        part = new._bound.compiled[0]
        assert part.state is not st and part.state.retry_after_s == 1.0 and st.refs == 0
        f = feeds(model, rng)
        np.testing.assert_array_equal(new.run(None, f)[0], ort_run(model, f)[0])
        assert part.runs_on_device == 1 and new.stats()["failovers"] == 0
        new.close()

    model = int8_split()
    with sim() as s:
        sess = edgert.Session(model, device=serial_npu_profile(), fallback="allow", device_options={"url": s.url},
                              telemetry=False)
        sess.run(None, feeds(model, rng))
        parts = [c for c in sess._bound.compiled if isinstance(c, serial_npu.SerialNpuPartition)]
        st, gone = parts[0].state, [weakref.ref(c) for c in parts]
        assert len(parts) == 2 and len(st.on_device_only) == 1  # r, made by the first for the second
        del sess, parts
        gc.collect()
        assert all(g() is None for g in gone)
        serial_npu.device_state(s.url)  # gives back what collected partitions held
        assert st.refs == 0 and not st.on_device_only and serial_npu._STATES.pop(s.url) is not st


LINK_KEYS = ("bytes_over_link", "retransmits", "resyncs", "failovers")


def test_each_session_counts_its_own_link_traffic():
    """Two Sessions on one device each reported the device's totals in stats() (bytes_over_link of both, the other
    one's failovers). Each counts what its own runs moved now; together they make the device's traffic."""
    model = int8_mlp()
    rng = np.random.default_rng(8)
    with sim() as s:
        a, b = session(model, s.url), session(model, s.url)
        st = a._bound.compiled[0].state
        assert b._bound.compiled[0].state is st
        base = st.stats()["bytes_over_link"]  # the HELLOs the Sessions made when they planned: no run's
        for _ in range(2):
            a.run(None, feeds(model, rng))
        mine = {k: a.stats()[k] for k in LINK_KEYS}
        assert mine["bytes_over_link"] > 0 and {k: b.stats()[k] for k in LINK_KEYS} == dict.fromkeys(LINK_KEYS, 0)
        b.run(None, feeds(model, rng))
        assert {k: a.stats()[k] for k in LINK_KEYS} == mine
        assert 0 < b.stats()["bytes_over_link"] < mine["bytes_over_link"]  # one run, the graph already loaded
        assert a.stats()["bytes_over_link"] + b.stats()["bytes_over_link"] == st.stats()["bytes_over_link"] - base
        a.close()
        b.close()


def test_stalled_device_retransmits_and_executes_once():
    with sim(stall_ms=80) as s:
        dev = SerialNpuDevice(s.url, timeout=0.03, retries=10)
        dev.hello()
        h = dev.alloc(64)
        dev.write(h, np.arange(64, dtype=np.uint8))
        out = np.zeros(64, np.uint8)
        dev.read(h, out)
        assert (out == np.arange(64)).all()
        st = dev.stats()
        assert dev.link.stats.retransmits > 0 and st["duplicates"] > 0 and st["tensors"] == 1
        dev.close()


def test_a_reset_seen_through_no_session_is_counted_once():
    """A reset noticed by ERR_NO_SESSION (here another client's RESET) left generation and resets unchanged: the
    re-handshake forgot the old boot id before it compared the new one."""
    with sim() as s:
        dev = SerialNpuDevice(s.url)
        dev.link._seq = 1 << 30  # ahead of any other host's: a RESET sent before a HELLO of its own was stale
        boot = dev.hello().boot_id
        dev.alloc(16)
        other = SerialNpuDevice(s.url)
        other.reset()  # a fresh SerialNpuDevice: reset() opens its session first
        other.close()
        with pytest.raises(DeviceResetError, match=f"boot id {boot} -> {boot + 1}"):
            dev.alloc(16)
        assert dev.generation == 1 and dev.resets == 1 and dev.link_stats()["device_resets"] == 1
        dev.alloc(16)  # the session is open again
        dev.close()


def test_reset_is_idempotent_when_its_answer_is_lost():
    """The device resets before its answer goes out, and the reset wiped the response cache: a RESET retransmitted
    because its answer was lost got ERR_NO_SESSION. It gets the same OK now, and nothing runs twice."""
    with sim() as s:
        dev = SerialNpuDevice(s.url, timeout=0.05)
        boot = dev.hello().boot_id
        read, lost = dev.link._read, []

        def lossy(wait):  # the first bytes back after RESET goes out (its answer) are lost on the line
            data = read(wait)
            if data and not lost:
                lost.append(data)
                return b""
            return data

        dev.link._read = lossy
        dev.reset()
        dev.link._read = read
        assert lost and dev.link.stats.retransmits >= 1 and dev.generation == 1
        st = dev.stats()
        assert st["boot_id"] == boot + 1 and st["duplicates"] == 1  # reset once; the resent RESET answered again
        dev.close()


def test_a_refused_hello_keeps_the_sequence_memory():
    """A HELLO of another protocol version (ERR_VERSION) turned the device's duplicate and stale checks off: an ALLOC
    retransmitted after it (seq 11, older than the refused HELLO's 12) was executed again, a second tensor. As every
    HELLO it sets the remembered seq (PROTOCOL.md §2.2, §4): the ALLOC is stale, nothing runs twice, and the session
    the refused HELLO found open stays open."""
    import struct

    from edgert.bridge import SerialLink

    with sim() as s:
        link = SerialLink(s.url)

        def ask(type_, seq, payload=b""):
            link._seq = seq - 1  # the request goes out with exactly this seq
            f = link.transact(type_, payload, check=False)
            return P.ERRORS[f.status], f.payload

        assert ask(P.HELLO, 10, P.hello_request(host_session=77))[0] == "OK"
        status, handle = ask(P.ALLOC, 11, struct.pack("<I", 16))
        assert status == "OK" and handle == struct.pack("<I", 1)
        assert ask(P.HELLO, 12, P.hello_request(version=2, host_session=77))[0] == "ERR_VERSION"
        assert ask(P.ALLOC, 11, struct.pack("<I", 16))[0] == "ERR_STALE"  # the retransmission: not executed
        assert ask(P.ALLOC, 5, struct.pack("<I", 16))[0] == "ERR_STALE"
        status, stats = ask(P.STATS, 13)
        assert status == "OK" and P.parse_stats(stats)["tensors"] == 1 and P.parse_stats(stats)["stale"] == 2
        link.close()
    assert s.proc.returncode == 0, s.stderr.decode()


def test_clip_equals_onnxruntime_also_when_min_exceeds_max():
    """ONNX Clip is min(max(x, min), max): with min > max every element is max. The device clamped each element
    towards whichever bound it was past (min below, max above)."""
    from onnx import TensorProto, helper, numpy_helper

    from bridge_models import _checked_model

    rng = np.random.default_rng(8)
    with sim() as s:
        for dt, tp in ((np.int8, TensorProto.INT8), (np.uint8, TensorProto.UINT8), (np.int32, TensorProto.INT32)):
            for lo, hi in ((3, -3) if dt != np.uint8 else (200, 50), (-3, 3) if dt != np.uint8 else (50, 200),
                           (None, 2), (2, None)):
                inits = [numpy_helper.from_array(np.array(v, dt), k) for k, v in (("lo", lo), ("hi", hi))
                         if v is not None]
                node = helper.make_node("Clip", ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""],
                                        ["y"])
                model = _checked_model([node], "clip", inits, ("x", tp, [2, 8]), ("y", tp, [2, 8]))
                info = np.iinfo(dt)
                x = rng.integers(max(info.min, -300), min(info.max, 300) + 1, (2, 8)).astype(dt)
                sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="forbid",
                                      device_options={"url": s.url}, telemetry=False)
                np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ort_run(model, {"x": x})[0],
                                              err_msg=f"{dt.__name__} clip({lo}, {hi})")
                assert sess._bound.compiled[0].runs_on_device == 1
                sess.close()


def test_a_stalled_device_costs_the_configured_timeouts_not_a_fixed_write_timeout():
    """A device that stops reading fills the pty, and the host's write blocked for pyserial's fixed 10 s per
    attempt whatever timeout_s and retries said. The write timeout is now timeout_s plus the largest frame's time on
    the line."""
    import signal
    import time

    from edgert.bridge.link import SerialLink

    model = int8_mlp(k=4096, n=8, m=4)  # x is 16 KiB: 4 WRITE frames, more than the pty holds
    rng = np.random.default_rng(9)
    with sim() as s:
        link = SerialLink(s.url, baudrate=921600, timeout=0.02)
        assert link.port.write_timeout == pytest.approx(0.02 + (4112 + 4112 // 254 + 3) * 10 / 921600)
        link.max_payload = 1024
        assert link.port.write_timeout == pytest.approx(0.02 + (1040 + 1040 // 254 + 3) * 10 / 921600)
        link.close()
        sess = session(model, s.url, timeout_s=0.02, retries=1, retry_after_s=0.0)
        f = feeds(model, rng)
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(2):  # the stalled run, then one that reconnects to the still stalled device
                f = feeds(model, rng)
                t0 = time.monotonic()
                np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
                assert time.monotonic() - t0 < 3.0
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
        assert sess.stats()["failovers"] == 2
        sess.close()


@pytest.mark.parametrize("retries", [0, 3])
def test_a_stalled_device_gets_retries_retransmissions_also_for_large_chunks(retries):
    """PROTOCOL §4: from one answer to the next the host sends at most 1 + retries frames. A chunk over 32 bytes got
    3 retransmissions whatever retries said, then each half of it its own 3, down to 32 bytes: with retries=0 a
    stalled device got 12 retransmissions (3.4 s at timeout_s=0.05) before the run failed over."""
    import signal

    model = int8_mlp(k=64, n=8, m=8)  # a 512-byte input: one WRITE frame, halved down to 32 bytes before
    rng = np.random.default_rng(4)
    with sim() as s:
        sess = session(model, s.url, timeout_s=0.05, retries=retries, retry_after_s=0.0)
        f = feeds(model, rng)
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        before = sess.stats()
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            f = feeds(model, rng)
            t0 = time.monotonic()
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
            took = time.monotonic() - t0
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
        st = sess.stats()
        # the unanswered WRITE kept the connection and its host session: the next run needs no HELLO
        part = sess._bound.compiled[0]
        dev = part.state.device
        f = feeds(model, rng)
        np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert part.state.device is dev and dev.resets == 0 and part.runs_on_device == 2
        sess.close()
    assert st["failovers"] - before["failovers"] == 1
    assert st["retransmits"] - before["retransmits"] == retries
    assert took < 0.05 * (1 + 2 + 4 + 8) + 2.0  # loose: the stall costs one request's waits


@pytest.mark.parametrize("opset", [11, 13])  # axes an attribute, then an int64 constant input
def test_squeeze_and_unsqueeze_run_on_the_device(opset):
    """PROTOCOL §6 runs Squeeze and Unsqueeze as Copy and the delegate translates them, but the shipped profile
    listed only Reshape and Flatten: fallback='forbid' refused such a model. Bit-exact against onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_models import _model

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.integers(-128, 128, (8, 4)).astype(np.int8), "w"),
             numpy_helper.from_array(rng.integers(-999, 999, 4).astype(np.int32), "b")]
    if opset >= 13:
        inits += [numpy_helper.from_array(np.array([0, 2], np.int64), "ax")]
        nodes = [helper.make_node("Unsqueeze", ["a", "ax"], ["u"]), helper.make_node("Squeeze", ["r", "ax"], ["y"])]
    else:
        nodes = [helper.make_node("Unsqueeze", ["a"], ["u"], axes=[0, 2]),
                 helper.make_node("Squeeze", ["r"], ["y"], axes=[0, 2])]
    nodes = [helper.make_node("MatMulInteger", ["x", "w"], ["a"]), nodes[0],
             helper.make_node("Add", ["u", "b"], ["r"]), nodes[1]]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 4])], inits, opset=opset)
    with sim() as s:
        sess = edgert.Session(model, device="serial-npu", fallback="forbid", device_options={"url": s.url},
                              telemetry=False)
        assert [(p.delegate, len(p.nodes)) for p in sess.plan.partitions] == [("serial-npu", 4)]
        for _ in range(2):
            f = {"x": rng.integers(-128, 128, (2, 8)).astype(np.int8)}
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert sess._bound.compiled[0].runs_on_device == 2
        sess.close()


@pytest.mark.parametrize("arena", [24000, 24900])
def test_a_partition_over_the_devices_arena_is_split_to_fit(arena):
    """The planner checked a node's weights and its own activations, not every tensor the device holds while its
    graphs run: int8_mlp (16 KiB of weights) on a 24000-byte arena was planned whole on the device and failed over
    every run (ALLOC: ERR_NOMEM). A unit that keeps tensors resident now counts them: the Relu goes to the host,
    the rest fits and runs on the device; fallback='forbid' names the reason. At 24900 bytes the count left out the
    blob's tables and the arena's 8-byte blocks (the whole needs 24992): planned whole, refused at compile, the
    partition ran wholly on the host; it is split as at 24000 now."""
    model = int8_mlp(k=256, n=64, m=8)
    rng = np.random.default_rng(6)
    with sim(arena=arena) as s:
        with pytest.raises(edgert.UnsupportedOpError, match="relu \\(Relu\\): npu memory: .*more tensors for the "
                                                            "device to hold"):
            session(model, s.url)
        sess = edgert.Session(model, device=serial_npu_profile(free_link=True), fallback="allow",
                              device_options={"url": s.url, "retry_after_s": 0.0}, telemetry=False)
        assert [(p.delegate, p.nodes) for p in sess.plan.partitions] == [("serial-npu", ["mm", "bias"]),
                                                                         ("host", ["relu"])]
        for _ in range(3):
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert sess.stats()["failovers"] == 0 and sess._bound.compiled[0].runs_on_device == 3
        sess.close()


@pytest.mark.parametrize("short", [0, 8])
def test_the_hosts_arena_count_is_the_firmwares(short):
    """serial_npu.arena_need (blob, activations, one tensor per input and output) is what the firmware takes: a
    graph runs on an arena of exactly that size, and a compile for 8 bytes less refuses the partition (its every
    run would fail with ERR_NOMEM)."""
    from edgert.bridge.protocol import encode_graph
    from edgert.formats.onnx import load_onnx

    model = int8_cnn()  # activations between its nodes, a Reshape, per-channel weights
    g = load_onnx(model.SerializeToString())
    part = serial_npu._OneNode("p", tuple(n.name for n in g.nodes), tuple(g.inputs), tuple(g.outputs))
    tensors, nodes, _, ins, outs, _ = serial_npu._lower(part, g)
    blob = encode_graph(tensors, nodes, ins, outs)
    need = sum(serial_npu.arena_need([(blob, tensors, nodes, ins, outs, part.inputs, part.outputs)]))
    assert serial_npu.translate_pieces(part, g, P.DeviceLimits(), need)[0][0] == blob
    if short:
        with pytest.raises(edgert.UnsupportedOpError, match=f"needs {need} bytes of the device's arena"):
            serial_npu.translate_pieces(part, g, P.DeviceLimits(), need - short)
    f = feeds(model, np.random.default_rng(0))
    with sim(arena=need - short) as s:
        dev = SerialNpuDevice(s.url)
        h = dev.load_graph(blob)
        x = dev.alloc(f["x"].nbytes)
        y_shape = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
        if short:
            with pytest.raises(DeviceStatusError, match="ERR_NOMEM"):
                dev.alloc(int(np.prod(y_shape)))
        else:
            y = dev.alloc(int(np.prod(y_shape)))
            dev.write(x, f["x"])
            dev.invoke(h, [x], [y])
            out = np.zeros(y_shape, np.int8)
            dev.read(y, out)
            np.testing.assert_array_equal(out, ort_run(model, f)[0])
            assert dev.stats()["arena_used"] == need
        dev.close()


def test_qblock_matmul_is_the_c_core_reference():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = edgert.native.info()["isa"]
    edgert.native.set_isa("ref")
    try:
        for fmt in ("q4_0", "q4_1", "q8_0"):
            qw = edgert.quantize(w, fmt)
            want = edgert.matmul(x, qw, threads=1)
            blob = P.encode_graph([P.BlobTensor("float32", (3, 64)), P.BlobTensor(fmt, (24, 64), bytes(qw.raw)),
                                   P.BlobTensor("float32", (3, 24))], [P.BlobNode("MatMulQBlock", [0, 1], 2)], [0], [2])
            with sim() as s:
                dev = SerialNpuDevice(s.url)
                g = dev.load_graph(blob)
                hx, hy = dev.alloc(x.nbytes), dev.alloc(3 * 24 * 4)
                dev.write(hx, x)
                dev.invoke(g, [hx], [hy])
                y = np.zeros((3, 24), np.float32)
                dev.read(hy, y)
                dev.close()
            np.testing.assert_array_equal(y, want)
    finally:
        edgert.native.set_isa(before)


def test_protocol_errors_and_version_mismatch():
    with sim(arena=4096) as s:
        with pytest.raises(ProtocolVersionError, match="edgert speaks version 2, the device .* speaks version 1"):
            SerialNpuDevice(s.url, protocol_version=2).hello()
        dev = SerialNpuDevice(s.url)
        assert dev.hello().arena_bytes == 4096
        with pytest.raises(edgert.LinkError, match="ERR_NOMEM"):
            dev.alloc(8192)
        with pytest.raises(edgert.LinkError, match="ERR_HANDLE"):
            dev.write(99, b"x")
        with pytest.raises(edgert.LinkError, match="ERR_GRAPH"):
            dev.load_graph(b"not a graph at all")
        dev.close()


def test_malformed_hellos_and_truncated_graphs_get_their_own_errors():
    """A one-byte HELLO payload was answered ERR_VERSION (it is no version at all: ERR_BAD_REQUEST), and a graph blob
    cut short ERR_UNSUPPORTED ("unknown dtype": the reader gives 0 past the end) instead of ERR_GRAPH."""
    import struct

    from edgert.bridge import SerialLink
    from edgert.formats.onnx import load_onnx

    g = load_onnx(int8_mlp().SerializeToString())
    part = serial_npu._OneNode("p", tuple(n.name for n in g.nodes), tuple(g.inputs), tuple(g.outputs))
    blob = serial_npu.translate_pieces(part, g, P.DeviceLimits())[0][0]
    meta = struct.unpack_from("<I", blob, 12 + 12 + 4 + 8 + 4)[0]  # w's data offset (x, then w): the tables end there
    assert 100 < meta < 200
    with sim() as s:
        link = SerialLink(s.url)
        v = P.PROTOCOL_VERSION
        for payload, want in [(b"\x01", "ERR_BAD_REQUEST"), (struct.pack("<H", v), "ERR_BAD_REQUEST"),
                              (struct.pack("<HHH", v, 0, 0), "ERR_BAD_REQUEST"),
                              (struct.pack("<HHIB", v, 0, 5, 0), "ERR_BAD_REQUEST"),
                              (struct.pack("<H", v + 1), "ERR_VERSION"), (struct.pack("<HH", v, 0), "OK"),
                              (P.hello_request(host_session=5), "OK")]:
            f = link.transact(P.HELLO, payload, check=False)
            assert P.ERRORS[f.status] == want, payload
        link.close()
        dev = SerialNpuDevice(s.url)
        for n in [*range(1, meta + 1), len(blob) - 1]:
            with pytest.raises(DeviceStatusError) as e:
                dev.load_graph(blob[:n])
            assert e.value.name == "ERR_GRAPH", (n, str(e.value))
        dev.load_graph(blob)
        dev.close()


def test_tensor_between_two_device_partitions_stays_on_the_device():
    model = int8_split()
    rng = np.random.default_rng(4)
    with sim() as s:
        sess = edgert.Session(model, device=serial_npu_profile(), fallback="allow", device_options={"url": s.url},
                              telemetry=False)
        p = sess.plan
        assert [q.unit for q in p.partitions] == ["npu", "cpu", "npu"]
        assert "r" in p.partitions[0].outputs and "r" in p.partitions[2].inputs
        assert not [t for t in p.transfers if t.tensor == "r"]  # device -> device: no transfer at all
        est = p.estimates
        runs = 4
        for _ in range(runs):
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
            assert sess.stats()["last_run"] == {"bytes_to_device": est["bytes_to_device"],
                                                "bytes_to_host": est["bytes_to_host"]}
        first, second = sess._bound.compiled[0], sess._bound.compiled[2]
        assert first.runs_on_device == runs and second.runs_on_device == runs
        dev = first.state.device
        # over the link: exactly the plan's boundary tensors (r is neither read back nor written again)
        assert dev.bytes_to_device == runs * est["bytes_to_device"]
        assert dev.bytes_to_host == runs * est["bytes_to_host"]
        sess.close()
    assert s.proc.returncode == 0, s.stderr.decode()


def test_resident_tensor_lost_with_a_reset_is_recomputed_on_the_host():
    """A reset between the two device partitions loses r on the device: the second partition's run recomputes it
    on the host (the first partition again) instead of reading a stale host buffer; every output stays exact."""
    model = int8_split()
    failovers, lost = 0, 0
    for reset_after in range(9, 22):
        rng = np.random.default_rng(reset_after)
        with sim(reset_after=reset_after) as s:
            sess = edgert.Session(model, device=serial_npu_profile(), fallback="allow",
                                  device_options={"url": s.url, "retry_after_s": 0.0}, telemetry=False)
            for _ in range(3):
                f = feeds(model, rng)
                np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0],
                                              err_msg=f"reset_after={reset_after}")
            failovers += sess.stats()["failovers"]
            first, second = sess._bound.compiled[0], sess._bound.compiled[2]
            lost += first.runs_on_host == 0 and second.runs_on_host > 0  # r was only on the device when it reset
            sess.close()
    assert failovers > 0 and lost > 0


def test_emulated_device_partitions_copy_only_the_plans_transfers():
    model = int8_split()
    rng = np.random.default_rng(6)
    sess = edgert.Session(model, device=serial_npu_profile(), fallback="allow", emulate=True, telemetry=False)
    assert not [t for t in sess.plan.transfers if t.tensor == "r"]
    f = feeds(model, rng)
    np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
    est = sess.plan.estimates
    assert sess.stats()["last_run"] == {"bytes_to_device": est["bytes_to_device"], "bytes_to_host": est["bytes_to_host"]}
    sess.close()


def test_stopped_emulators_leave_no_open_pipes():
    """stop() left the emulator's stdout and stderr pipes open: two descriptors per emulator, and stdin too after
    kill()."""
    def fds():
        return len(os.listdir("/proc/self/fd"))

    sim().start().stop()  # built, and anything lazily opened on the first start is open
    before, kept = fds(), []  # kept alive: the pipes' finalizers do not close them for us
    for k in range(4):
        s = sim().start()
        if k % 2:
            s.kill()
        s.stop()
        assert s.stop() == s.proc.returncode  # a second stop is harmless
        kept.append(s)
    assert fds() == before


def test_the_emulator_is_built_from_its_own_sources(tmp_path, monkeypatch):
    """The emulator's build directory was one per EDGERT_HOME: a binary built from another checkout's sources was
    run ("make" compares only times, and these sources' files are older, as after an upgrade that keeps the
    packaged times). It is one per digest of the sources and compiler now: each tree runs its own firmware, and
    going back to a tree finds its binary built."""
    import shutil

    from edgert.bridge import sim as sim_module

    here = sim_module.firmware_dir().parent
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path / "home"))
    trees = {}
    for name in ("a", "b"):
        for top in ("firmware_bridge", "native"):
            shutil.copytree(here / top, tmp_path / name / top, ignore=shutil.ignore_patterns("build", "tests"))
        trees[name] = tmp_path / name / "firmware_bridge"
    fw_h = trees["b"] / "core" / "fw.h"
    fw_h.write_text(fw_h.read_text().replace('#define FW_VERSION_STRING "edgert-npu-ref ',
                                             '#define FW_VERSION_STRING "edgert-npu-ref b-'))
    for f in (tmp_path / "b").rglob("*"):
        os.utime(f, (1e9, 1e9))  # 2001: older than a's binary

    def firmware_version(name):
        monkeypatch.setenv("EDGERT_FIRMWARE_SRC", str(trees[name]))
        with NpuSim(asan=False) as s:
            dev = SerialNpuDevice(s.url)
            version = dev.hello().firmware_version
            dev.close()
        return version, sim_module.build(False)

    (va, exe_a), (vb, exe_b) = firmware_version("a"), firmware_version("b")
    assert vb == "edgert-npu-ref b-" + va.split()[-1] and exe_a != exe_b
    built = exe_a.stat().st_mtime_ns
    assert firmware_version("a") == (va, exe_a) and exe_a.stat().st_mtime_ns == built  # not built again


def test_stale_emulator_builds_are_removed(tmp_path, monkeypatch):
    """Every other source tree or compiler made a build directory of its own, and they accumulated for ever. A build
    unused for STALE_BUILD_S goes when a build is next asked for; a recent one stays, one whose lock is held (a
    process building there) stays, and anything that is not a build directory is left alone."""
    import fcntl

    from edgert.bridge import sim as sim_module

    monkeypatch.setenv("EDGERT_HOME", str(tmp_path))
    root = tmp_path / "npu-sim"
    old = time.time() - sim_module.STALE_BUILD_S - 60
    dirs = {}
    for name in ("stale", "recent", "locked", "foreign"):
        d = dirs[name] = root / name
        d.mkdir(parents=True)
        (d / "npu-sim").write_bytes(b"x")
        if name != "foreign":
            (d / ".lock").write_text("")
        os.utime(d, (old, old) if name != "recent" else None)
    with open(dirs["locked"] / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        exe = sim_module.build(False)
    assert exe.is_file() and exe.parent.parent == root
    assert sorted(p.name for p in root.iterdir()) == sorted([exe.parent.name, "recent", "locked", "foreign"])


@pytest.mark.parametrize("kw", [{"baud": -1}, {"baud": float("nan")}, {"ops_per_s": float("inf")}, {"drop": 2},
                                {"corrupt": -0.1}, {"duplicate": "x"}, {"arena": -1}, {"arena": 2**32},
                                {"stall_ms": 1.5},
                                {"reset_after": 0}, {"seed": True}])
def test_emulator_settings_are_checked_before_it_starts(kw):
    with pytest.raises(edgert.InvalidArgumentError, match=next(iter(kw))):
        NpuSim(**kw)


def test_an_emulator_that_refuses_its_arguments_says_why():
    """Its message was lost (the error showed ''): the stderr reader had not started when the error was built."""
    with pytest.raises(edgert.DeviceError, match="did not start: npu-sim: --arena 3000000000 is larger than this "
                                                 "build's"):
        NpuSim(arena=3_000_000_000).start()


@pytest.mark.parametrize("opts, match", [
    ({"timeout_s": float("inf")}, "timeout_s must be in \\(0.0, 3600.0\\], got inf"),  # waited for ever
    ({"timeout_s": -1}, "timeout_s must be in"), ({"timeout_s": "abc"}, "timeout_s must be a number"),
    ({"retries": -1}, "retries must be an int in \\[0, 10000\\]"), ({"baudrate": "fast"}, "baudrate must be an int"),
    ({"retry_after_s": float("nan")}, "retry_after_s must be in"),  # a NaN back-off never retried the device
])
def test_bad_device_options_are_refused_when_the_session_is_made(tmp_path, opts, match):
    import onnx

    from onnx_models import mlp

    onnx.save(mlp(), tmp_path / "m.onnx")
    with pytest.raises(edgert.InvalidArgumentError, match="device option " + match):
        edgert.Session(str(tmp_path / "m.onnx"), device="serial-npu", fallback="allow",
                       device_options={"url": str(tmp_path / f"nodev{len(str(opts))}"), **opts})


def test_unknown_device_options_are_refused_naming_the_known_ones(tmp_path):
    """A misspelt key ({"url": u, "timout_s": 5}) was dropped without a word: the session ran with the default
    timeout. device_options take what a profile's delegate_options for the device's delegate take (one table)."""
    import onnx

    from onnx_models import mlp

    onnx.save(mlp(), tmp_path / "m.onnx")
    with pytest.raises(edgert.InvalidArgumentError, match="device_options: unknown key 'timout_s' for device "
                                                          "'serial-npu' \\(serial-npu\\); known keys: baudrate, "
                                                          "port, retries, retry_after_s, timeout_s, url"):
        edgert.Session(str(tmp_path / "m.onnx"), device="serial-npu", fallback="allow",
                       device_options={"url": str(tmp_path / "nodev"), "timout_s": 5})
    # the onnxruntime delegate reads its options from the profile only: providers given here were dropped silently
    with pytest.raises(edgert.InvalidArgumentError, match="device_options: unknown key 'providers' for device "
                                                          "'snapdragon-x'"):
        edgert.Session(str(tmp_path / "m.onnx"), device="snapdragon-x", emulate=True,
                       device_options={"providers": ["CPUExecutionProvider"]})


def test_a_second_session_on_an_open_device_has_its_options_checked():
    """Options were checked only when a process first opened a URL: a later Session with timeout_s=-3 was made
    without a word, and one with other settings ran with the first Session's without saying so."""
    model = int8_mlp()
    with sim() as s:
        first = session(model, s.url, timeout_s=0.5)
        with pytest.raises(edgert.InvalidArgumentError, match="device option timeout_s must be in"):
            session(model, s.url, timeout_s=-3)
        with pytest.warns(RuntimeWarning, match="already has the device open with .*timeout_s=0.5.*keeps those"):
            other = session(model, s.url, timeout_s=0.25)  # shares the connection, and so its settings
        assert other.run(None, feeds(model, np.random.default_rng(1)))[0] is not None
        del other
        same = session(model, s.url, timeout_s=0.5)  # the same settings share the connection
        x = feeds(model, np.random.default_rng(0))
        np.testing.assert_array_equal(same.run(None, x)[0], first.run(None, x)[0])
        del first, same


def test_a_busy_device_is_waited_for_and_a_stalled_one_costs_what_timeout_and_retries_say():
    """INVOKE adds the graph's last compute time to its first wait only. It was inside the back-off (doubled up to 8x
    at every unanswered wait): a device stalled during a 1 s INVOKE held the run ~(timeout + 1 s) x 183, minutes.
    Now the stall costs the compute time plus what timeout and retries say; the slow graph itself, answered, is
    waited for without a retransmission."""
    import signal

    from edgert.bridge import SerialNpuDevice
    from edgert.formats.onnx import load_onnx

    model = int8_mlp(k=256, n=64, m=8)
    g = load_onnx(model.SerializeToString())
    part = serial_npu._OneNode("p", tuple(n.name for n in g.nodes), tuple(g.inputs), tuple(g.outputs))
    blob = serial_npu.translate_pieces(part, g, P.DeviceLimits())[0][0]
    with sim(ops_per_s=1_000_000) as s:  # ~0.26 s per INVOKE
        dev = SerialNpuDevice(s.url, timeout=0.02, retries=3)
        h, x, y = dev.load_graph(blob), dev.alloc(8 * 256), dev.alloc(8 * 64 * 4)
        dev.write(x, np.zeros(8 * 256, np.int8))
        compute, _ = dev.invoke(h, [x], [y])
        assert compute > 0.2
        before = dev.link.stats.retransmits
        dev.invoke(h, [x], [y])  # the compute time is known now: waited for, not retransmitted for
        assert dev.link.stats.retransmits == before
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(edgert.LinkError, match="no answer to INVOKE .* after 3 retransmissions"):
                dev.invoke(h, [x], [y])
            took = time.monotonic() - t0
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
        dev.close()
    # compute + 0.02 x (1 + 2 + 4 + 8) plus line time: about 0.6 s; inside the back-off it was (0.02 + 0.26) x 15
    assert took < 2.5, took


def test_a_device_that_answers_late_is_used_with_the_default_options():
    """A device answering 300 ms after each request (--stall-ms 300) with the defaults of the day (timeout 0.05 s)
    was never used: every request was retransmitted before its answer came, each duplicate answered 300 ms late
    again, the writes blocked and every run failed over. The default timeout leaves room for it."""
    model = int8_mlp()
    rng = np.random.default_rng(8)
    with sim(stall_ms=300) as s:
        sess = edgert.Session(model, device="serial-npu", fallback="forbid",
                              device_options={"url": s.url, "retry_after_s": 0}, telemetry=False)
        for _ in range(2):
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
        assert sess._bound.compiled[0].runs_on_device == 2 and sess.stats()["failovers"] == 0
        sess.close()


def test_the_emulator_sends_zero_rich_data_at_the_line_rate():
    """The emulator's pacing dropped each write's sleep overshoot, and COBS writes a zero-rich frame a byte or two at
    a time: a READ of zeros came at half the baud rate (an int32 ReLU output, mostly zeros, then timed out at a
    short timeout). Zeros and random bytes now take the same time."""
    from edgert.bridge import SerialNpuDevice

    n = 2048
    rand = np.random.default_rng(0).integers(1, 256, n).astype(np.uint8).tobytes()
    with sim(baud=115200) as s:
        dev = SerialNpuDevice(s.url, baudrate=115200, timeout=2.0)
        h, buf, took = dev.alloc(n), bytearray(n), {}
        for name, data in (("zeros", bytes(n)), ("random", rand), ("zeros again", bytes(n))):
            dev.write(h, data)
            t0 = time.monotonic()
            dev.read(h, buf)
            took[name] = time.monotonic() - t0
            assert bytes(buf) == data
        dev.close()
    assert min(took["zeros"], took["zeros again"]) < 1.3 * took["random"], took  # it was 2.1x


def test_a_graph_slower_than_the_wait_budget_is_learned_and_then_waited_for():
    """A graph computing longer than timeout and retries allow failed over at every run: only an answered INVOKE
    told the host its compute time, and none was ever answered. An unanswered one now teaches the time waited, so
    the waits grow until the device's answer comes; then every run is on the device."""
    model = int8_mlp(k=256, n=64, m=8)  # ~0.26 M ops: ~0.65 s at 400k ops/s, against ~0.3 s of waits
    rng = np.random.default_rng(12)
    with sim(ops_per_s=400_000) as s:
        sess = session(model, s.url, timeout_s=0.02, retries=3, retry_after_s=0.0)
        part = sess._bound.compiled[0]
        ran = []
        for _ in range(8):
            f = feeds(model, rng)
            np.testing.assert_array_equal(sess.run(None, f)[0], ort_run(model, f)[0])
            ran.append(part.runs_on_device)
        failovers = sess.stats()["failovers"]
        sess.close()
    assert failovers >= 1 and ran[-1] - ran[-3] == 2, (ran, failovers)  # the last runs all on the device
