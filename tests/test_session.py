"""Session: onnxruntime-shaped API, exact outputs where onnxruntime runs every node, emulated NPU partitions with
the bytes moved equal to the plan's, a run path that allocates nothing for boundary tensors, fallback rules,
telemetry, and the delegate registry."""
import re
import tracemalloc
import warnings

import numpy as np
import onnx
import pytest

import edgert
from edgert import delegates, telemetry
from edgert.delegates.base import CompiledPartition, Delegate
from edgert.errors import DeviceError, DTypeError, InvalidArgumentError, ShapeError

from cli_run import edgert_cmd
from onnx_models import convnet, mlp, ort_run
from profile_toml import npu_profile_toml

TOY_NPU = npu_profile_toml(
    "toy-npu", "a float NPU this machine does not have (its onnxruntime provider is not installed)", "onnxruntime",
    '{ providers = ["ToyNPUExecutionProvider"] }', cpu_float32="1.0e6")


@pytest.fixture
def toy(tmp_path):
    p = tmp_path / "toy.toml"
    p.write_text(TOY_NPU)
    return str(p)


@pytest.fixture
def mlp_path(tmp_path):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp(), p)
    return str(p)


pytestmark = pytest.mark.usefixtures("no_telemetry")


def x_of(batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 8)).astype(np.float32)


def test_host_matches_onnxruntime_exactly(mlp_path):
    s = edgert.Session(mlp_path)
    assert [i.name for i in s.get_inputs()] == ["x"]
    assert s.get_inputs()[0].shape == ["batch", 8] and s.get_inputs()[0].dtype == "float32"
    assert s.get_inputs()[0].dtype == np.float32  # a numpy dtype (equal to its name too, above)
    assert s.get_inputs()[0].type == "tensor(float)"
    assert [o.name for o in s.get_outputs()] == ["y"]
    x = x_of()
    (y,) = s.run(None, {"x": x})
    np.testing.assert_array_equal(y, ort_run(mlp_path, {"x": x})[0])
    assert s.run(["y"], {"x": x})[0].shape == (2, 4)
    assert len(s.plan.partitions) == 1 and s.plan.partitions[0].delegate == "host"
    st = s.stats()
    assert st["runs"] == 2 and st["bytes_to_device"] == 0 and st["bytes_to_host"] == 0
    assert st["pool_allocations"] == 1 and (st["pool_locked"] or st["lock_error"])


def test_static_model_binds_at_creation(tmp_path):
    p = tmp_path / "conv.onnx"
    onnx.save(convnet(), p)
    s = edgert.Session(str(p))
    assert s.stats()["partitions"] == 1  # laid out before any run
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], ort_run(str(p), {"x": x})[0])


def test_emulated_npu_outputs_and_bytes_equal_plan(mlp_path, toy):
    s = edgert.Session(mlp_path, device=toy, emulate=True)
    x = x_of()
    ref = ort_run(mlp_path, {"x": x})[0]
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], ref)
    p = s.plan
    assert {q.unit for q in p.partitions} == {"cpu", "npu"}
    assert p.estimates["bytes_to_device"] > 0 and p.estimates["bytes_to_host"] > 0
    st = s.stats()
    assert st["bytes_to_device"] == p.estimates["bytes_to_device"]
    assert st["bytes_to_host"] == p.estimates["bytes_to_host"]
    assert st["copies_to_device"] == sum(t.direction == "to_device" for t in p.transfers)
    for _ in range(4):
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], ref)
    st = s.stats()
    assert st["runs"] == 5
    assert st["bytes_to_device"] == 5 * p.estimates["bytes_to_device"]
    assert st["bytes_to_host"] == 5 * p.estimates["bytes_to_host"]
    assert st["last_run"] == {"bytes_to_device": p.estimates["bytes_to_device"],
                              "bytes_to_host": p.estimates["bytes_to_host"]}


def test_steady_state_run_allocates_nothing_for_boundary_tensors(mlp_path, toy):
    s = edgert.Session(mlp_path, device=toy, emulate=True, output_views=True)
    x = x_of(batch=8192)  # every boundary tensor >= 128 KiB, far above the run path's few small Python objects
    s.run(None, {"x": x})
    s.run(None, {"x": x})
    pools = s._bound.pools
    addrs = {(side, name): pools[side].view(name).ctypes.data for side in pools for name in pools[side].slots}
    allocations = s.stats()["pool_allocations"]
    boundary_bytes = min(pools[side].slots[name].nbytes for side, name in addrs if pools[side].slots[name].nbytes)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(20):
        (y,) = s.run(None, {"x": x})
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # nothing of a boundary tensor's size was allocated, let alone kept, across 20 runs
    assert peak - before < boundary_bytes, (peak - before, boundary_bytes)
    assert after - before < boundary_bytes
    assert s.stats()["pool_allocations"] == allocations
    assert {k: pools[k[0]].view(k[1]).ctypes.data for k in addrs} == addrs
    assert y.ctypes.data == pools["host"].view("y").ctypes.data  # output_views: the pool's own buffer


def test_outputs_are_copies_by_default(mlp_path):
    s = edgert.Session(mlp_path)
    x = x_of()
    (a,) = s.run(None, {"x": x})
    (b,) = s.run(None, {"x": x * 2})
    assert not np.array_equal(a, b)


def test_dynamic_dims_rebind(mlp_path):
    s = edgert.Session(mlp_path)
    for batch in (1, 5, 5, 3):
        x = x_of(batch, seed=batch)
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], ort_run(mlp_path, {"x": x})[0])
    assert s.stats()["rebinds"] == 2


def test_missing_device_forbid_raises_naming_device_and_emulate(mlp_path, tmp_path):
    every_op = tmp_path / "toy_all.toml"
    every_op.write_text(TOY_NPU.replace('ops = ["MatMul", "Add"]', 'ops = ["MatMul", "Add", "Relu"]'))
    with pytest.raises(DeviceError) as e:
        edgert.Session(mlp_path, device=str(every_op), fallback="forbid", emulate=False, dims={"batch": 2})
    msg = str(e.value)
    assert "toy-npu" in msg and "ToyNPUExecutionProvider" in msg and "emulate=True" in msg


def test_missing_device_allow_runs_on_host_with_warning(mlp_path, toy):
    with pytest.warns(RuntimeWarning, match="not present"):
        s = edgert.Session(mlp_path, device=toy, fallback="allow", emulate=False, dims={"batch": 2})
    x = x_of()
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], ort_run(mlp_path, {"x": x})[0])
    st = s.stats()
    assert st["bytes_to_device"] == 0 and st["bytes_to_host"] == 0 and st["fell_back"]
    assert {p.unit for p in s.plan.partitions} == {"cpu"}
    assert {p.unit for p in s.requested_plan.partitions} == {"cpu", "npu"}


def test_fall_back_warning_points_at_the_callers_line(mlp_path, toy):
    # it named edgert/session.py when the dims bound at the first run (a fixed stacklevel fits only one path)
    x = x_of()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = edgert.Session(mlp_path, device=toy, dims={"batch": 2}); line_made = _line()  # binds here
        s2 = edgert.Session(mlp_path, device=toy)  # binds at its first run
        y = s2.run(None, {"x": x})[0]; line_run = _line()
    assert [(r.category, r.filename, r.lineno) for r in w] == [(RuntimeWarning, __file__, line_made),
                                                               (RuntimeWarning, __file__, line_run)]
    np.testing.assert_array_equal(y, ort_run(mlp_path, {"x": x})[0])
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], y)


def _line() -> int:
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_failed_run_adds_no_bytes_to_stats(toy):
    # a run that failed in its second partition left the copies it had made in stats() (runs was not incremented)
    from onnx import TensorProto as T, helper

    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["a"]), helper.make_node("Gather", ["a", "idx"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", T.FLOAT, [4, 3]),
                                helper.make_tensor_value_info("idx", T.INT64, [2])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s = edgert.Session(model, device=toy, emulate=True)
    assert [p.unit for p in s.plan.partitions] == ["npu", "cpu"]
    est = s.plan.estimates
    x, good = np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 3], np.int64)
    np.testing.assert_array_equal(s.run(None, {"x": x, "idx": good})[0], ort_run(model, {"x": x, "idx": good})[0])
    with pytest.raises(DeviceError, match="onnxruntime failed running a partition"):
        s.run(None, {"x": x, "idx": np.array([0, 7], np.int64)})  # out of range: the cpu partition fails
    np.testing.assert_array_equal(s.run(None, {"x": x, "idx": good})[0], ort_run(model, {"x": x, "idx": good})[0])
    st = s.stats()
    assert st["runs"] == 2 and est["bytes_to_device"] > 0 and est["bytes_to_host"] > 0
    assert (st["bytes_to_device"], st["bytes_to_host"]) == (2 * est["bytes_to_device"], 2 * est["bytes_to_host"])
    assert st["copies_to_device"] == 2 * len([t for t in s.plan.transfers if t.direction == "to_device"])
    assert st["last_run"] == {"bytes_to_device": est["bytes_to_device"], "bytes_to_host": est["bytes_to_host"]}


def test_feed_errors(mlp_path):
    s = edgert.Session(mlp_path)
    with pytest.raises(InvalidArgumentError, match="missing feed"):
        s.run(None, {})
    # a misspelt name (as many feeds as inputs) was reported only as the missing input
    with pytest.raises(InvalidArgumentError, match="missing feed for input 'x'.*the feeds also name 'X', not an input"):
        s.run(None, {"X": x_of()})
    with pytest.raises(DTypeError, match="input 'x' must be an array \\(or a list of numbers\\), got a str"):
        s.run(None, {"x": "abc"})  # was "expected rank 2 ..., got shape ()"
    with pytest.raises(InvalidArgumentError, match="not an output"):
        s.run(["nope"], {"x": x_of()})
    s.run(None, {"x": x_of()})
    with pytest.raises(DTypeError, match="float32"):
        s.run(None, {"x": x_of().astype(np.float64)})


def test_one_telemetry_event_per_run(mlp_path, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path / "home"))
    telemetry.set_enabled(True)
    s = edgert.Session(mlp_path)
    for _ in range(3):
        s.run(None, {"x": x_of()})
    assert telemetry.flush(10)
    rows = [r for r in telemetry.events() if r["source"] == "session"]
    assert len(rows) == 3
    assert rows[0]["model"] == "mlp.onnx" and rows[0]["device"] == "host" and rows[0]["latency_s"] > 0


def test_a_run_records_its_event_without_per_run_setup(mlp_path, toy, tmp_path, monkeypatch):
    """Telemetry costs a run a tuple append: no request id, cost model, database path or queue put of its own (they
    cost ~40 us a run, 8x a small model's). The rows are still one per run, each with its id, latency, bytes moved,
    status and the device profile's energy and cost."""
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path / "home"))
    telemetry.set_enabled(True)
    s = edgert.Session(mlp_path, device=toy, emulate=True)
    s.run(None, {"x": x_of()})  # the first run binds the dims
    calls = {}

    def counted(name, fn):
        def wrapper(*a):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a)
        return wrapper

    for name in ("new_request_id", "host_cost_model", "db_path"):
        monkeypatch.setattr(telemetry, name, counted(name, getattr(telemetry, name)))
    monkeypatch.setattr(telemetry._writer, "put", counted("put", telemetry._writer.put))
    for _ in range(50):
        s.run(None, {"x": x_of()})
    with pytest.raises(ShapeError):
        s.run(None, {"x": np.ones((2, 3), np.float32)})
    setup = {k: v for k, v in calls.items() if k != "put"}
    assert not setup and calls.get("put", 0) <= 10, calls  # a queue put wakes the writer once per batch of runs
    assert telemetry.flush(10)
    rows = [r for r in telemetry.events() if r["source"] == "session"]
    assert len(rows) == 52 and len({r["request_id"] for r in rows}) == 52
    ok, (bad,) = rows[:-1], [r for r in rows if r["status"] != 200]
    moved = s.plan.estimates["bytes_to_device"] + s.plan.estimates["bytes_to_host"]
    for r in ok:
        assert (r["model"], r["device"], r["endpoint"], r["delegates"]) == ("mlp.onnx", "toy-npu", "run",
                                                                           "host,onnxruntime (emulated)")
        assert r["status"] == 200 and r["error"] is None and r["bytes_copied"] == moved
        assert r["latency_s"] == r["decode_s"] > 0 and r["queue_wait_s"] == 0.0
        assert r["energy_j"] == pytest.approx(5.0 * r["latency_s"]) and r["cost_usd"] == pytest.approx(
            0.36 / 3600 * r["latency_s"])
    assert bad["status"] == 500 and bad["error"].startswith("ShapeError: input 'x'") and bad["bytes_copied"] == 0


class _Doubler(CompiledPartition):
    def __init__(self, inner):
        self.inner, self.inputs, self.outputs = inner, inner.inputs, inner.outputs

    def run(self, inputs, outputs):
        self.inner.run(inputs, outputs)
        for a in outputs.values():
            a *= 2


class _FakeHost(Delegate):
    def compile(self, partition, graph, unit=None, options=None):
        from edgert.delegates.onnxruntime import OnnxruntimeDelegate

        return _Doubler(OnnxruntimeDelegate().compile(partition, graph, None, {}))


def test_registering_a_delegate(mlp_path):
    old = delegates.get("host")
    try:
        delegates.register("host", _FakeHost)
        s = edgert.Session(mlp_path)
        x = x_of()
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], 2 * ort_run(mlp_path, {"x": x})[0])
    finally:
        delegates.register("host", old)
    assert "host" in delegates.registered() and "onnxruntime" in delegates.registered()
    with pytest.raises(DeviceError, match="no 'tpu-x' delegate"):
        delegates.get("tpu-x")


def test_cli_run(tmp_path, mlp_path, toy):
    x = x_of()
    np.save(tmp_path / "x.npy", x)
    r = edgert_cmd("run", mlp_path, "--device", toy, "--emulate", "--input", f"x={tmp_path / 'x.npy'}", "--output",
                   str(tmp_path / "out"), "--no-telemetry")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), ort_run(mlp_path, {"x": x})[0])
    assert "bytes to device 192 (plan 192)" in r.stderr
    r = edgert_cmd("run", mlp_path, "--input", "x=/does/not/exist.npy")
    assert r.returncode == 1 and r.stderr.startswith("edgert: error:") and "Traceback" not in r.stderr


def test_model_as_bytes_path_object_or_proto_and_the_callers_proto_is_untouched(tmp_path):
    from pathlib import Path

    model = mlp()
    before = model.SerializeToString()
    x = x_of()
    want = ort_run(model, {"x": x})[0]
    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    for src in (model, before, Path(p), str(p)):
        np.testing.assert_array_equal(edgert.Session(src, telemetry=False).run(None, {"x": x})[0], want)
    assert model.SerializeToString() == before  # the dims Session names are named in its own copy
    with pytest.raises(edgert.ModelFormatError):
        edgert.Session(b"\x08\x07garbage that is not a model", telemetry=False)
    with pytest.raises(InvalidArgumentError, match="model must be"):
        edgert.Session(12345, telemetry=False)


@pytest.mark.parametrize("device,emulate", [("host", False), ("imx8mp", True)])
def test_constant_graph_output(device, emulate):
    """A graph output that is an initializer (no node makes it) is returned as the constant, run after run."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    c = np.array([[3.0, -4.0]], np.float32)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "const_out",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 2]),
                           helper.make_tensor_value_info("c", T.FLOAT, [1, 2])],
                          initializer=[numpy_helper.from_array(c, "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = edgert.Session(m, device, emulate=emulate, telemetry=False)
    x = np.array([[-1.0, 2.0]], np.float32)
    for _ in range(2):
        y, got = s.run(None, {"x": x})
        np.testing.assert_array_equal(y, ort_run(m, {"x": x})[0])
        np.testing.assert_array_equal(got, c)


def test_a_failed_rebind_leaves_the_session_usable(mlp_path, monkeypatch):
    import edgert.session as session_mod

    s = edgert.Session(mlp_path)
    x = x_of()
    (want,) = s.run(None, {"x": x})
    real = session_mod.make_plan

    def refuse_batch_5(graph, *a, **kw):
        if graph.tensors["x"].shape[0] == 5:
            raise InvalidArgumentError("no plan for batch 5")
        return real(graph, *a, **kw)

    monkeypatch.setattr(session_mod, "make_plan", refuse_batch_5)
    with pytest.raises(InvalidArgumentError, match="batch 5"):
        s.run(None, {"x": x_of(5)})
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], want)  # was: AttributeError from a closed partition
    np.testing.assert_array_equal(s.run(None, {"x": x_of(3)})[0], ort_run(mlp_path, {"x": x_of(3)})[0])


@pytest.mark.parametrize("kw", [{}, {"core": True}, {"device": "toy", "emulate": True}, {"dims": {"batch": 0}}])
def test_an_empty_batch_runs_as_onnxruntime_runs_it(mlp_path, kw, request):
    """A symbolic dim bound to 0 (from the feeds or dims=) runs: onnxruntime returns the empty outputs, the C core
    skips its product, pools hold zero-size buffers and nothing crosses a link. It was refused ('must be bound to a
    positive integer')."""
    if kw.get("device") == "toy":
        kw = {**kw, "device": request.getfixturevalue("toy")}
    s = edgert.Session(mlp_path, **kw)
    for batch in (0, 3, 0):
        x = x_of(batch, seed=batch)
        (y,) = s.run(None, {"x": x})
        want = ort_run(mlp_path, {"x": x})[0]
        assert y.shape == want.shape == (batch, 4) and y.dtype == want.dtype
        np.testing.assert_allclose(y, want, rtol=0, atol=3e-2 * max(np.abs(want).max(initial=0), 1))
        if batch == 0:
            assert s.stats()["last_run"] == {"bytes_to_device": 0, "bytes_to_host": 0}
    p = edgert.plan(mlp_path, dims={"batch": 0}, device=kw.get("device", "host"))
    assert p.estimates["bytes_to_device"] == 0 and "batch" not in " ".join(p.assumed)


def test_feeds_and_output_names_that_are_not_what_run_takes(mlp_path):
    s = edgert.Session(mlp_path)
    x = x_of()
    for bad in ([x], None, x):
        with pytest.raises(DTypeError, match="mapping"):
            s.run(None, bad)  # was ValueError (truth value of an array) / TypeError
    with pytest.raises(InvalidArgumentError, match="'xx', not an input"):
        s.run(None, {"x": x, "xx": x})  # a misspelt name was ignored silently
    for bad in ("y", 5):
        with pytest.raises(InvalidArgumentError, match="output_names"):
            s.run(bad, {"x": x})  # "y" was split into characters; 5 was a TypeError
    np.testing.assert_array_equal(s.run(["y"], {"x": x.tolist()})[0], s.run(None, {"x": x})[0])
    with pytest.raises(ShapeError, match="rectangular"):
        s.run(None, {"x": [[1.0] * 8, [1.0] * 7]})  # was numpy's ValueError (inhomogeneous shape)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("views", [False, True])
def test_one_partition_fast_path_checks_what_the_general_path_checks(tmp_path, fmt, views):
    """A one-partition host plan runs through its bound buffers without the general path's layout work; every
    feed it cannot take as it stands (missing, extra, a list, a new shape, another dtype, a strided view) still
    gets the general path's answer, and a failure inside the runtime leaves the next run correct."""
    import tflite_models as tm

    if fmt == "onnx":
        path = tmp_path / "mlp.onnx"
        onnx.save(mlp(), path)
        name, feed_shape = "x", (2, 8)

        def ref(x):
            return ort_run(str(path), {"x": x})[0]
    else:
        data = tm.float_mlp(batch=2)
        path = tmp_path / "mlp.tflite"
        path.write_bytes(data)
        name, feed_shape = "x", (2, 16)

        def ref(x):
            return tm.litert_reference(data, {name: x}, [])[0]
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(feed_shape).astype(np.float32) for _ in range(3)]
    s = edgert.Session(str(path), output_views=views)
    first = s.run(None, {name: xs[0]})[0]
    assert s._bound.fast is not None  # the path under test
    np.testing.assert_array_equal(first, ref(xs[0]))
    second = s.run(None, {name: xs[1]})[0]
    np.testing.assert_array_equal(second, ref(xs[1]))
    if views:
        assert second is first or second.ctypes.data == first.ctypes.data  # the session's buffer, as documented
    else:
        np.testing.assert_array_equal(first, ref(xs[0]))  # a copy: the second run left it alone
    with pytest.raises(InvalidArgumentError, match="missing feed"):
        s.run(None, {"y": xs[0]})
    with pytest.raises(InvalidArgumentError, match="not an input"):
        s.run(None, {name: xs[0], "extra": xs[0]})
    with pytest.raises(DTypeError, match="float32"):
        s.run(None, {name: xs[0].astype(np.float64)})
    np.testing.assert_array_equal(s.run(None, {name: xs[2].tolist()})[0], ref(xs[2]))
    strided = np.asfortranarray(xs[2])[:, ::-1][:, ::-1]
    np.testing.assert_array_equal(s.run(None, {name: strided})[0], ref(xs[2]))
    if fmt == "onnx":  # a dynamic batch: a new shape binds again, then the fast path serves it
        x5 = rng.standard_normal((5, 8)).astype(np.float32)
        for _ in range(2):
            np.testing.assert_array_equal(s.run(None, {name: x5})[0], ref(x5))
        assert s.stats()["rebinds"] == 1
        part = s._bound.compiled[0]._whole  # the onnxruntime partition under the host delegate
        part._bound.clear()  # what a failed onnxruntime run does to the partition's binding
        part._same.clear()
        part._new_binding()
        np.testing.assert_array_equal(s.run(None, {name: x5})[0], ref(x5))
    else:
        with pytest.raises(ShapeError):
            s.run(None, {name: np.zeros((3, 16), np.float32)})  # a TFLite model's shapes are fixed
    np.testing.assert_array_equal(s.run(None, {name: xs[1]})[0], ref(xs[1]))
    assert s.stats()["bytes_to_device"] == 0 and s.stats()["last_run"] == {"bytes_to_device": 0, "bytes_to_host": 0}


def test_a_sessions_plan_records_the_dims_it_was_bound_to(mlp_path):
    """Session(dims=...).plan.dims was {} while edgert.plan(dims=...).dims holds them (and the first run's binding
    was not recorded either)."""
    s = edgert.Session(mlp_path, dims={"batch": 5}, telemetry=False)
    assert s.plan.dims == edgert.plan(mlp_path, dims={"batch": 5}).dims == {"batch": 5}
    s = edgert.Session(mlp_path, telemetry=False)
    s.run(None, {"x": x_of(3)})
    assert s.plan.dims == {"batch": 3}


def test_get_outputs_lists_the_models_shapes_as_onnxruntime_does():
    """get_outputs() switched to the last run's bound shapes (inputs stayed symbolic), and a dim shape inference
    named itself leaked as 'unk__0' where onnxruntime says None."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    vi = h.make_tensor_value_info
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"]), h.make_node("Shape", ["x"], ["s"]),
                      h.make_node("Cast", ["x"], ["c"], to=T.FLOAT16)], "g", [vi("x", T.FLOAT, [None, 4])],
                     [vi("y", T.FLOAT, None), vi("s", T.INT64, None), vi("c", T.FLOAT16, ["a", "b"])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    want = [(o.name, o.shape, o.type) for o in ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]).get_outputs()]
    s = edgert.Session(model, telemetry=False)
    assert [(o.name, o.shape, o.type) for o in s.get_outputs()] == want
    s.run(None, {"x": np.ones((3, 4), np.float32)})
    assert [(o.name, o.shape, o.type) for o in s.get_outputs()] == want


@pytest.mark.parametrize("x_shape, declared", [([2, 3], [5, 5]), (["N", 3], [7, 3]), ([2, 3], [2, 3, 1])])
def test_a_stale_declared_output_shape_gives_way_to_the_computed_one(x_shape, declared):
    """An export that kept an old output shape: onnxruntime warns and returns what Relu computes, (2, 3); every run
    here was a DeviceError ("pre-allocated shapes"), the pool laid out for the declared shape."""
    from onnx import TensorProto as T
    from onnx import helper as h

    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
                     [h.make_tensor_value_info("y", T.FLOAT, declared)])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    x = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    (want,) = ort_run(model, {"x": x})
    s = edgert.Session(model)
    assert s.get_outputs()[0].shape == (["N", 3] if "N" in x_shape else [2, 3])
    assert edgert.plan(model).graph.tensors["y"].shape == tuple(s.get_outputs()[0].shape)
    for _ in range(2):
        (y,) = s.run(None, {"x": x})
        assert y.shape == want.shape == (2, 3)
        np.testing.assert_array_equal(y, want)


def _nonzero_model(npu_add: bool = False, static: str | None = None):
    """x[6] -> Greater(x, 0) -> NonZero -> Cast: y[1, n], n the count of positives (npu_add: then Add(y, y), which the
    toy NPU takes: the positions cross its link both ways). static "before"/"after": a static output r = Relu(x)
    before or after y."""
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes = [h.make_node("Greater", ["x", "zero"], ["m"]), h.make_node("NonZero", ["m"], ["nz"]),
             h.make_node("Cast", ["nz"], ["f" if npu_add else "y"], to=T.FLOAT)]
    if npu_add:
        nodes.append(h.make_node("Add", ["f", "f"], ["y"]))
    outs = [h.make_tensor_value_info("y", T.FLOAT, [1, "n"])]
    if static:
        nodes.append(h.make_node("Relu", ["x"], ["r"]))
        outs.insert(0 if static == "before" else 1, h.make_tensor_value_info("r", T.FLOAT, [6]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [6])], outs,
                     [h.make_tensor("zero", T.FLOAT, [], [0.0])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


DATA_SHAPED = ([1, -1, 2, -2, -3, -4], [1, 1, 1, -1, -1, 1], [1, 1, 1, -1, -1, 1], [-1] * 6, [1] * 6)


@pytest.mark.parametrize("static", [None, "before", "after"])
def test_a_data_dependent_graph_output_is_allocated_by_onnxruntime_each_run(static, capfd):
    """NonZero's count follows the values. Its output was a pool buffer of the probed size: every run with another
    count failed inside onnxruntime (two "[E:onnxruntime ...] OutputMLValue" lines on stderr), was laid out again
    and re-run, ~2 ms a run. Made on the host (NonZero sizes it by the values) and handed to no other partition, it
    is now bound with no buffer: onnxruntime allocates it, as its own run does. No re-layout, nothing on stderr,
    outputs equal onnxruntime's, on the fast path, the general one and with output_views (each run's array its own);
    the pool does not hold it."""
    model = _nonzero_model(static=static)
    y_at = 1 if static == "before" else 0
    for views in (False, True):
        s = edgert.Session(model, output_views=views)
        kept = []
        for x in DATA_SHAPED:
            x = np.array(x, np.float32)
            want = ort_run(model, {"x": x})
            got = s.run(None, {"x": x})
            assert [(a.dtype, a.shape) for a in got] == [(w.dtype, w.shape) for w in want]
            for a, w in zip(got, want):
                np.testing.assert_array_equal(a, w)
            (y,) = s.run(["y"], {"x": -x})  # the general path, on another count
            np.testing.assert_array_equal(y, ort_run(model, {"x": -x})[y_at])
            kept.append((got[y_at], want[y_at]))
        for a, w in kept:  # output_views: each run's array is its own, not overwritten by the next
            np.testing.assert_array_equal(a, w)
        assert s.stats()["rebinds"] == 0 and "onnxruntime" not in capfd.readouterr().err
        assert s.stats()["pool_bytes"] == 64 * (2 if static else 1)  # x (and r): 64-byte aligned
        assert s.get_outputs()[y_at].shape == [1, "n"]  # the model's, not the probe's first count
        b = s._bound
        assert b.fast is not None and b.probed and list(b.allocated) == ["y"]


def test_a_probed_output_whose_shape_stays_keeps_its_pool_buffer():
    """A graph output known only by probing, made by no op that sizes it by the values (an If branch's in silero_vad;
    here a Reshape to a shape fed in), keeps a pool buffer bound once while its shape stays: onnxruntime allocating
    it at each run cost silero_vad 8 us a run (11%). After its shape has changed, onnxruntime allocates it."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    g = h.make_graph([h.make_node("Concat", ["k", "rest"], ["shape"], axis=0),
                      h.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [12]), h.make_tensor_value_info("k", T.INT64, [1])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)],
                     initializer=[numpy_helper.from_array(np.array([-1], np.int64), "rest")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    s = edgert.Session(model)
    for x in (np.arange(12), np.arange(12) - 5, np.arange(12) * 2):
        f = {"x": x.astype(np.float32), "k": np.array([4], np.int64)}
        np.testing.assert_array_equal(s.run(None, f)[0], ort_run(model, f)[0])
    b = s._bound
    assert b.probed and b.allocated == {} and b.can_allocate == ("y",) and s.stats()["rebinds"] == 0
    # its shape changes with k: one re-layout, then onnxruntime allocates it
    for k in (2, 6, 3, 4):
        f = {"x": np.arange(12, dtype=np.float32), "k": np.array([k], np.int64)}
        np.testing.assert_array_equal(s.run(None, f)[0], ort_run(model, f)[0])
    assert s.stats()["rebinds"] == 1 and list(s._bound.allocated) == ["y"]


def test_a_data_dependent_shape_crossing_a_link_binds_again_when_it_changes(tmp_path):
    """NonZero's positions cross the toy NPU's link both ways in staging buffers of the probed size: when the count
    changes the failed run lays the session out again (once per new count) and the answer is right. (A 1 ns link
    keeps even one position's Add on the NPU.)"""
    toy = tmp_path / "toy.toml"
    toy.write_text(TOY_NPU.replace("latency_s = 1.0e-6", "latency_s = 1.0e-9"))
    model = _nonzero_model(npu_add=True)
    s = edgert.Session(model, device=str(toy), emulate=True)
    rebinds = []
    for x in ([1, -1, 2, -2, -3, -4], [1, 1, 1, -1, -1, 1], [1, 1, 1, -1, -1, 1], [1, -1, -1, -1, -1, -1], [1] * 6):
        x = np.array(x, np.float32)
        (y,) = s.run(None, {"x": x})
        np.testing.assert_array_equal(y, ort_run(model, {"x": x})[0])
        assert len(s.plan.partitions) == 2 and s._bound.probed and s._bound.allocated == {}
        rebinds.append(s.stats()["rebinds"])
    assert rebinds == [0, 1, 1, 2, 3]  # the same length again reuses the layout


@pytest.mark.parametrize("device", ["host", "toy"])
def test_a_data_dependent_shape_is_probed_on_the_values_the_run_uses(device, request):
    """The probe that learns a data-dependent shape got the feed as given: big-endian bytes (onnxruntime reads them
    raw: NonZero counted the wrong values, the buffers did not fit, every run a DeviceError) or a list (float64: the
    probe's onnxruntime refused it). The run byte-swaps and converts; the probe now sees those same values. On the
    toy NPU (emulated) the NonZero positions cross the link both ways, in staging buffers sized by the probe."""
    model = _nonzero_model(npu_add=True)
    x = np.array([1, -1, 2, -2, 3, 4], np.float32)
    (want,) = ort_run(model, {"x": x})
    assert want.shape == (1, 4)
    device = request.getfixturevalue("toy") if device == "toy" else device
    for feed in (x.astype(">f4"), x.tolist()):
        s = edgert.Session(model, device=device, emulate=device != "host")
        for _ in range(2):
            (got,) = s.run(None, {"x": feed})
            np.testing.assert_array_equal(got, want)
        assert len(s.plan.partitions) == (1 if device == "host" else 2)
    with pytest.raises(DTypeError, match="input 'x' must be float32, got int64"):
        edgert.Session(model).run(None, {"x": np.ones(6, np.int64)})  # the probe refuses it as the run does


def test_list_feed_of_an_integer_input_is_not_truncated(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["ids"], ["out"])], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                          [helper.make_tensor_value_info("out", TensorProto.INT64, [3])])
    s = edgert.Session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert s.run(None, {"ids": [1, 2, 3]})[0].tolist() == [1, 2, 3]
    with pytest.raises(DTypeError, match="int64"):
        s.run(None, {"ids": [1.5, 2.0, 3.0]})  # was silently truncated to [1, 2, 3]


@pytest.mark.parametrize("kw, match", [
    ({"device": 5}, "device must be"), ({"device": None}, "device must be"),
    ({"emulate": "false"}, "emulate must be"), ({"threads": -1}, "threads"), ({"threads": "a"}, "threads"),
    ({"core": "yes"}, "core must be"), ({"dims": [2]}, "dims must be"), ({"dims": {"batch": "x"}}, "integer"),
    ({"dims": {"batch": 2.7}}, "integer"), ({"dims": {"bacth": 2}}, "'bacth', not a symbolic dim"),
    ({"device_options": "url"}, "device_options must be"),
    # were accepted: 10**6 threads hung the first run, 2**40 was onnxruntime's TypeError there, 0 and 257 went to
    # the C pool; the partition limits were checked only when the first run planned (mlp has a symbolic batch)
    ({"threads": 0}, "threads must be an int in \\[1, 256\\] or None"), ({"threads": 257}, "in \\[1, 256\\]"),
    ({"threads": 10**6}, "got 1000000"), ({"threads": 2**40}, "threads must be"), ({"threads": 2.0}, "threads"),
    ({"threads": True}, "threads"), ({"min_nodes_per_partition": 0}, "min_nodes_per_partition must be an int >= 1"),
    ({"min_nodes_per_partition": "2"}, "min_nodes_per_partition"), ({"max_partitions": 0}, "max_partitions must be"),
    ({"max_partitions": -1}, "max_partitions"), ({"max_partitions": 1.5}, "max_partitions"),
])
def test_session_arguments_are_validated(mlp_path, kw, match):
    # were AttributeError (device), ValueError (int('x')), or accepted: "false" ran emulated, 2.7 bound batch=2
    with pytest.raises(InvalidArgumentError, match=match):
        edgert.Session(mlp_path, **kw)


def test_string_tensor_model_is_a_dtype_error():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "g",
                          [helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
                          [helper.make_tensor_value_info("o", TensorProto.STRING, [2])])
    with pytest.raises(DTypeError, match="string tensor"):  # was TypeError: data type 'string' not understood
        edgert.Session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _sequence_model(kind):
    """Models with an ONNX sequence. "inside": x[3,4] -> SplitToSequence(axis 0) -> ConcatFromSequence(axis 1) ->
    y[1,12].
    "crossing": x[2,64,64] -> SplitToSequence(keepdims 0) -> seq; t = SequenceAt(seq, 0); a = t @ t (the toy NPU's);
    y = ConcatFromSequence(SequenceInsert(seq, a), new_axis 1) [64,3,64]: seq is made before the NPU runs and read
    after it. "seq_in" / "seq_out" / "optional_out": a sequence or an optional as a graph input or output."""
    from onnx import TensorProto as T
    from onnx import helper as h

    V = h.make_tensor_value_info
    seq_t = h.make_sequence_type_proto(h.make_tensor_type_proto(T.FLOAT, None))
    if kind == "inside":
        nodes = [h.make_node("SplitToSequence", ["x"], ["seq"], axis=0),
                 h.make_node("ConcatFromSequence", ["seq"], ["y"], axis=1)]
        ins, outs = [V("x", T.FLOAT, [3, 4])], [V("y", T.FLOAT, [1, 12])]
    elif kind == "crossing":
        nodes = [h.make_node("SplitToSequence", ["x"], ["seq"], axis=0, keepdims=0),
                 h.make_node("SequenceAt", ["seq", "zero"], ["t"]), h.make_node("MatMul", ["t", "t"], ["a"]),
                 h.make_node("SequenceInsert", ["seq", "a"], ["seq2"]),
                 h.make_node("ConcatFromSequence", ["seq2"], ["y"], axis=1, new_axis=1)]
        ins, outs = [V("x", T.FLOAT, [2, 64, 64])], [V("y", T.FLOAT, [64, 3, 64])]
    elif kind == "seq_in":
        nodes = [h.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0)]
        ins, outs = [h.make_value_info("seq", seq_t)], [V("y", T.FLOAT, None)]
    elif kind == "seq_out":
        nodes = [h.make_node("SplitToSequence", ["x"], ["seq"], axis=0)]
        ins, outs = [V("x", T.FLOAT, [3, 4])], [h.make_value_info("seq", seq_t)]
    else:
        nodes = [h.make_node("Optional", ["x"], ["opt"])]
        ins = [V("x", T.FLOAT, [3, 4])]
        outs = [h.make_value_info("opt", h.make_optional_type_proto(h.make_tensor_type_proto(T.FLOAT, [3, 4])))]
    g = h.make_graph(nodes, "g", ins, outs, [h.make_tensor("zero", T.INT64, [], [0])] if kind == "crossing" else [])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("device", ["host", "toy", "rk3588"])
def test_a_sequence_inside_the_model_runs_as_onnxruntime_runs_it(device, request, tmp_path):
    """A sequence between two nodes (onnxruntime runs it) made Session.run raise a raw AttributeError ('list' object
    has no attribute 'shape': the shape probe took onnxruntime's list for an array) and `edgert run` print a
    traceback. Its nodes stay on the host, inside one partition; the sequence has no buffer."""
    model = _sequence_model("inside")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    (want,) = ort_run(model, {"x": x})
    device = request.getfixturevalue("toy") if device == "toy" else device
    s = edgert.Session(model, device=device, emulate=True)
    for _ in range(2):
        (y,) = s.run(None, {"x": x})
        assert y.shape == want.shape == (1, 12)
        np.testing.assert_array_equal(y, want)
    assert {p.unit for p in s.plan.partitions} == {s.plan.host_unit}
    if device != "host":
        assert "seq(tensor(float))" in s.plan.reasons["SplitToSequence_0"]
    else:
        onnx.save(model, tmp_path / "seq.onnx")
        np.save(tmp_path / "x.npy", x)
        r = edgert_cmd("run", str(tmp_path / "seq.onnx"), "--input", f"x={tmp_path / 'x.npy'}")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "y: float32 [1, 12]" in r.stdout


def test_a_sequence_passed_between_partitions_is_refused_at_creation(toy):
    """Only tensors have buffers between partitions: a sequence made before a device partition and read after it is
    a DTypeError naming it when the Session is made (one partition runs it, as onnxruntime does)."""
    model = _sequence_model("crossing")
    with pytest.raises(DTypeError, match="value 'seq' has type seq\\(tensor\\(float\\)\\), not a tensor, and the plan"):
        edgert.Session(model, device=toy, emulate=True)
    x = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
    (want,) = ort_run(model, {"x": x})
    for s in (edgert.Session(model, device=toy, emulate=True, max_partitions=1), edgert.Session(model)):
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], want)


@pytest.mark.parametrize("kind, what", [("seq_in", "input 'seq' has type seq(tensor(float))"),
                                        ("seq_out", "output 'seq' has type seq(tensor(float))"),
                                        ("optional_out", "output 'opt' has type optional(tensor(float))")])
def test_a_sequence_or_optional_graph_input_or_output_is_a_dtype_error_at_creation(kind, what):
    """A Session feeds and returns numpy arrays: such an input was accepted (get_inputs() said shape [], dtype None)
    and failed at the run ("cannot cut graph ... element type unknown")."""
    with pytest.raises(DTypeError, match=re.escape(what) + ", not a tensor"):
        edgert.Session(_sequence_model(kind))


def cast_model(x_type, y_type, dim=2):
    """y = Cast(x) between two element types; ``dim`` 2 or a symbolic batch "B" (bound at the first run)."""
    from onnx import TensorProto as T, helper

    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=getattr(T, y_type))], "g",
                          [helper.make_tensor_value_info("x", getattr(T, x_type), [dim, 3])],
                          [helper.make_tensor_value_info("y", getattr(T, y_type), [dim, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("x_type, y_type, bad", [
    # a bfloat16 input was onnxruntime's bare RuntimeError ("Numpy_type 256 can't be converted to MLDataType") at
    # Session(), a float8 output a DeviceError at the first run, an int4 output a bare RuntimeError
    ("BFLOAT16", "FLOAT", "input 'x' is bfloat16"), ("FLOAT", "BFLOAT16", "output 'y' is bfloat16"),
    ("FLOAT", "FLOAT8E4M3FN", "output 'y' is float8e4m3fn"), ("FLOAT8E5M2", "FLOAT", "input 'x' is float8e5m2"),
    ("FLOAT", "INT4", "output 'y' is int4"), ("UINT4", "FLOAT", "input 'x' is uint4"),
    ("FLOAT", "COMPLEX64", "output 'y' is complex64"),
])
def test_io_types_numpy_cannot_carry_are_refused_at_creation(x_type, y_type, bad):
    for dim in (2, "B"):  # also when the dims bind only at the first run
        with pytest.raises(DTypeError, match=f"^{bad}, a type a Session cannot feed or return as a numpy array "
                                             r"\(it takes bool, int8, .*float64\): add a Cast"):
            edgert.Session(cast_model(x_type, y_type, dim))


@pytest.mark.parametrize("x_type, y_type", [("FLOAT16", "UINT64"), ("BOOL", "DOUBLE"), ("INT16", "UINT32")])
def test_io_types_numpy_carries_run_as_onnxruntime(x_type, y_type):
    model = cast_model(x_type, y_type, "B")
    x = np.abs(np.arange(-3, 3).reshape(2, 3)).astype({"FLOAT16": np.float16, "BOOL": bool, "INT16": np.int16}[x_type])
    y = edgert.Session(model).run(None, {"x": x})[0]
    want = ort_run(model, {"x": x})[0]
    assert y.dtype == want.dtype
    np.testing.assert_array_equal(y, want)


def test_valid_threads_and_partition_limits_run(mlp_path):
    x = np.ones((2, 8), np.float32)
    want = ort_run(mlp(), {"x": x})[0]
    for kw in ({"threads": 1}, {"threads": np.int64(2)}, {"min_nodes_per_partition": np.int32(2), "max_partitions": 1}):
        np.testing.assert_array_equal(edgert.Session(mlp_path, **kw).run(None, {"x": x})[0], want)


def test_model_path_must_be_a_regular_file_named_as_given(tmp_path):
    import os

    from cli_run import run_python

    from edgert.errors import ModelFormatError, ModelNotFoundError

    # was "ONNX model '.'" (the path as pathlib spells it)
    with pytest.raises(ModelNotFoundError, match="ONNX model '' does not exist"):
        edgert.Session("")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match=f"ONNX model '{empty}' has no graph"):  # was "(in-memory model)"
        edgert.Session(str(empty))
    # /dev/null was parsed as an empty model, /dev/zero read until killed: the path was read before it was checked
    for path in ("/dev/null", "/dev/zero", str(tmp_path)):
        with pytest.raises(ModelNotFoundError, match=f"ONNX model '{path}' is not a regular file"):
            edgert.Session(path)
    # a FIFO blocked the open (in a child, so that a regression fails by its timeout rather than hanging the tests)
    for name, kind in (("model.fifo", "ONNX"), ("model.tflite", "TFLite")):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        code = (f"import edgert\ntry:\n    edgert.Session({str(fifo)!r})\nexcept edgert.ModelNotFoundError as e:\n"
                "    print(e)")
        r = run_python("-c", code, timeout=60)  # in a neutral directory: the installed edgert, not the checkout
        assert f"{kind} model '{fifo}' is not a regular file" in r.stdout, r.stderr


@pytest.mark.parametrize("case", ["softmax_axis", "add_types", "add_shapes"])
def test_a_model_that_breaks_the_onnx_spec_is_a_model_format_error(case):
    """Models onnxruntime refuses as invalid (an axis out of range, types or shapes that cannot meet) were reported as a
    DeviceError ("onnxruntime could not load the partition"), as if the device were at fault."""
    from onnx import TensorProto as T, helper

    V = helper.make_tensor_value_info
    node, ins = {
        "softmax_axis": (helper.make_node("Softmax", ["x"], ["y"], axis=5), [V("x", T.FLOAT, [2, 3])]),
        "add_types": (helper.make_node("Add", ["x", "z"], ["y"]), [V("x", T.FLOAT, [2, 3]), V("z", T.INT64, [2, 3])]),
        "add_shapes": (helper.make_node("Add", ["x", "z"], ["y"]), [V("x", T.FLOAT, [2, 3]), V("z", T.FLOAT, [4, 5])]),
    }[case]
    model = helper.make_model(helper.make_graph([node], "g", ins, [V("y", T.FLOAT, [2, 3])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(edgert.ModelFormatError, match="not valid ONNX"):
        edgert.Session(model)


@pytest.mark.parametrize("device,emulate", [("host", False), ("toy", True)])
def test_nodes_no_output_depends_on_are_dropped(device, emulate, request):
    """Dead code (an unused Constant, a branch nothing reads, a node reading an input only it reads) is dropped as
    onnxruntime drops it; each made a partition with no outputs, so no run could succeed."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    device = request.getfixturevalue("toy") if device == "toy" else device
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Constant", [], ["unused"], value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["dead"]),
             helper.make_node("Add", ["h", "h"], ["dead2"]), helper.make_node("Tanh", ["z"], ["dead3"]),
             helper.make_node("Relu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "dead", [helper.make_tensor_value_info(n, T.FLOAT, [2, 4]) for n in "xz"],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    feeds = {"x": x_of(2)[:, :4].copy(), "z": x_of(2)[:, 4:].copy()}
    s = edgert.Session(m, device, emulate=emulate)
    assert [n for p in s.plan.partitions for n in p.nodes] == ["MatMul_1", "Relu_5"]
    assert s.plan.graph.pruned == ["Constant_0", "Sigmoid_2", "Add_3", "Tanh_4"]
    assert "dropped 4 node(s) no graph output depends on" in s.plan.table()
    for _ in range(2):
        np.testing.assert_array_equal(s.run(None, feeds)[0], ort_run(m, feeds)[0])
    assert s.stats()["last_run"] == {k: s.plan.estimates[k] for k in ("bytes_to_device", "bytes_to_host")}
    if emulate:
        assert s.plan.estimates["bytes_to_device"] > 0  # the MatMul ran on the emulated NPU


def test_external_data_stays_in_its_file_for_every_partition(tmp_path, toy):
    """Partitions of a model whose weights live in external data reference the file (location, offset, length) as
    the model does, and onnxruntime reads it in place: each partition embedded a copy (a 256 MB weight: 1361 MB of
    RSS against plain onnxruntime's 578 MB; over 2 GB could not run). Outputs equal onnxruntime's whole model, on the
    host (with and without the C core's DequantizeLinear -> MatMul) and split across an emulated NPU."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgert.formats.onnx import load_onnx, save_onnx

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.integers(-127, 128, (64, 64)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("DequantizeLinear", ["wq", "ws"], ["w2"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", T.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["n", 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "model" / "ext.onnx"
    path.parent.mkdir()
    onnx.save_model(m, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = ort_run(str(path), {"x": x})[0]

    graph = load_onnx(str(path))
    part = graph.subgraph_model([n.name for n in graph.nodes])
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in part.graph.initializer)
    assert part.ByteSize() < 2000  # references, not the 20 KB of weights
    for kw in ({}, {"core": True}, {"core": False}, {"device": toy, "emulate": True}):
        s = edgert.Session(str(path), **kw)
        np.testing.assert_allclose(s.run(None, {"x": x})[0], want, rtol=0, atol=3e-2 * np.abs(want).max())
        if kw.get("core") is False or kw.get("emulate"):
            np.testing.assert_array_equal(s.run(None, {"x": x})[0], want)
    assert len(s.plan.partitions) > 1
    save_onnx(part, tmp_path / "standalone.onnx")  # written elsewhere: it carries its weights
    np.testing.assert_array_equal(ort_run(str(tmp_path / "standalone.onnx"), {"x": x})[0], want)


def test_alternating_shapes_reuse_their_layouts(mlp_path, monkeypatch):
    """A binding per shape is kept (up to LAYOUTS_KEPT, least recently used dropped and closed): shapes that
    alternate re-plan and recompile nothing (every run re-bound before: 4-19 ms a run against onnxruntime's 10 us)."""
    from edgert.session import LAYOUTS_KEPT

    s = edgert.Session(mlp_path)
    binds, real = [], s._bind
    monkeypatch.setattr(s, "_bind", lambda dims, *a: binds.append(dict(dims)) or real(dims, *a))
    for k in range(10):
        x = x_of(1 + k % 2, seed=k)
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], ort_run(mlp_path, {"x": x})[0])
    assert binds == [{"batch": 1}, {"batch": 2}] and s.stats()["rebinds"] == 1 and s.stats()["layouts"] == 2
    one = next(b for b in s._layouts.values() if b.dims == {"batch": 1})
    for b in range(3, 3 + LAYOUTS_KEPT - 1):  # batch 1 is now the least recently used of LAYOUTS_KEPT + 1
        s.run(None, {"x": x_of(b)})
    assert len(s._layouts) == LAYOUTS_KEPT and all(b.dims != {"batch": 1} for b in s._layouts.values())
    assert one.compiled[0].steps[0].ort.session is None  # closed when dropped
    np.testing.assert_array_equal(s.run(None, {"x": x_of(1)})[0], ort_run(mlp_path, {"x": x_of(1)})[0])
    assert binds[-1] == {"batch": 1}
    kept = list(s._layouts.values())
    s.close()
    assert not s._layouts and all(b.compiled[0].steps[0].ort.session is None for b in kept)
    np.testing.assert_array_equal(s.run(None, {"x": x_of(2)})[0], ort_run(mlp_path, {"x": x_of(2)})[0])


def test_layouts_are_kept_by_input_shape_even_for_a_dim_with_no_name():
    """A dim with neither a value nor a name ([None, 4] as onnx.helper writes it) is in no dims: layouts kept by dims
    handed batch 1 the batch-2 layout (its row broadcast into both rows, no error) and batch 3 a ValueError."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    s = edgert.Session(model.SerializeToString(), telemetry=False)
    rng = np.random.default_rng(3)
    for batch in (2, 1, 3, 1, 0, 2):
        a = rng.standard_normal((batch, 4)).astype(np.float32)
        (out,) = s.run(None, {"x": a})
        ref = ort_run(model, {"x": a})[0]
        assert out.shape == ref.shape == (batch, 4) and np.array_equal(out, ref)
    assert s.stats()["layouts"] == 4 and s.stats()["rebinds"] == 3


def test_a_binding_on_a_device_that_keeps_tensors_is_kept_alone():
    """A binding whose partitions hold tensors in a device's memory (serial NPU) is never kept beside another: the
    device's memory goes to the binding that runs."""
    from edgert.bridge import NpuSim

    from bridge_models import int8_mlp, serial_npu_profile

    model = int8_mlp()
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "m"
    rng = np.random.default_rng(0)
    with NpuSim(asan=False) as sim:
        s = edgert.Session(model, device=serial_npu_profile(free_link=True), device_options={"url": sim.url},
                           telemetry=False)
        for m in (4, 2, 4):
            x = {"x": rng.integers(-128, 128, (m, 64)).astype(np.int8)}
            np.testing.assert_array_equal(s.run(None, x)[0], ort_run(model, x)[0])
            assert [p.delegate for p in s.plan.partitions] == ["serial-npu"] and len(s._layouts) == 1
        assert s.stats()["rebinds"] == 2
        s.close()


@pytest.mark.parametrize("emulate", [False, True])
def test_forbid_on_a_static_shape_unit_binds_symbolic_dims_at_the_first_run(tmp_path, mlp_path, emulate):
    """fallback='forbid', a unit that needs static shapes and a model with a symbolic dim: the dims bind at the first
    run with or without emulate (without it, the creation checked the provisional plan over unbound dims and refused
    every node as dynamic). A missing device is still refused at creation; the planner's refusal of unbound dims
    says how to bind them."""
    from edgert.errors import UnsupportedOpError

    static = TOY_NPU.replace('ops = ["MatMul", "Add"]', 'ops = ["MatMul", "Add", "Relu"]\nstatic_shapes = true')
    prof = tmp_path / "static.toml"
    prof.write_text(static.replace("ToyNPUExecutionProvider", "CPUExecutionProvider"))
    s = edgert.Session(mlp_path, device=str(prof), fallback="forbid", emulate=emulate)
    for batch in (3, 1):
        x = x_of(batch, seed=batch)
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], ort_run(mlp_path, {"x": x})[0])
        assert {p.unit for p in s.plan.partitions} == {"npu"}
    with pytest.raises(UnsupportedOpError, match="dims 'batch' are unbound here.*dims={'batch': N, ...}"):
        edgert.plan(mlp_path, device=str(prof), fallback="forbid")
    absent = tmp_path / "absent.toml"
    absent.write_text(static)
    if not emulate:
        with pytest.raises(DeviceError, match="ToyNPUExecutionProvider.*emulate=True"):
            edgert.Session(mlp_path, device=str(absent), fallback="forbid")
        # a second accelerator, absent, that runs none of the model's ops: not needed, so not refused (every
        # accelerator of the profile was checked)
        dsp = "\n".join(ln.replace('"npu"', '"dsp"').replace("ToyNPUExecutionProvider", "ToyDSPExecutionProvider")
                        .replace('ops = ["MatMul", "Add"]', 'ops = ["Softmax"]') for ln in TOY_NPU[TOY_NPU.index(
                            "[[units]]\nname = \"npu\""):].splitlines())
        both = tmp_path / "both.toml"
        both.write_text(prof.read_text() + dsp)
        s = edgert.Session(mlp_path, device=str(both), fallback="forbid")
        np.testing.assert_array_equal(s.run(None, {"x": x_of(2)})[0], ort_run(mlp_path, {"x": x_of(2)})[0])


@pytest.mark.parametrize("emulate", [False, True])
def test_forbid_refuses_at_creation_what_no_binding_of_the_dims_would_run(tmp_path, mlp_path, emulate):
    """fallback='forbid' and a model with a symbolic batch: a node no accelerator takes at any binding (an op not in
    its list) made a Session that failed at its first run; it is refused at creation now, naming every such node,
    whatever emulate says. Nodes refused only for their unbound shapes still wait for the first run."""
    from edgert.errors import UnsupportedOpError
    from edgert.formats.onnx import load_onnx

    static = TOY_NPU.replace('ops = ["MatMul", "Add"]', 'ops = ["MatMul", "Add"]\nstatic_shapes = true')
    prof = tmp_path / "static.toml"
    prof.write_text(static.replace("ToyNPUExecutionProvider", "CPUExecutionProvider"))
    relu = [n.name for n in load_onnx(mlp_path).nodes if n.op_type == "Relu"]
    with pytest.raises(UnsupportedOpError) as ei:
        edgert.Session(mlp_path, device=str(prof), fallback="forbid", emulate=emulate)
    msg = str(ei.value)
    assert relu and all(f"{n} (Relu): npu: op Relu not in the npu op list" in msg for n in relu)
    assert "MatMul" not in msg and "dims={'batch': N, ...}" in msg  # refused for an op, not for a shape
    with pytest.raises(UnsupportedOpError) as bound:  # the same nodes as the plan of any binding refuses
        edgert.Session(mlp_path, device=str(prof), fallback="forbid", emulate=emulate, dims={"batch": 2})
    assert all(f"{n} (Relu)" in str(bound.value) for n in relu)


@pytest.mark.parametrize("device,emulate", [("host", False), ("toy", True)])
def test_what_onnxruntime_runs_runs(device, emulate, request):
    """onnxruntime's API where edgert differed: a fed overridable initializer (also a graph input, IR >= 4) is used,
    alternating with runs that leave it to its value; run([]) returns every output; a graph output declared without
    a shape runs (only edgert's own onnx.checker call refused it); a big-endian feed is byte-swapped (onnxruntime
    reads its raw bytes); an invalid node is named by edgert's label in onnxruntime's refusal."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    device = request.getfixturevalue("toy") if device == "toy" else device
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                          "over", [helper.make_tensor_value_info("x", T.FLOAT, ["n", 8]),
                                   helper.make_tensor_value_info("w", T.FLOAT, [8, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = edgert.Session(m, device, emulate=emulate)
    assert [i.name for i in s.get_inputs()] == ["x"] and [i.name for i in s.get_overridable_initializers()] == ["w"]
    x = x_of(3)
    for feeds in ({"x": x}, {"x": x, "w": 2 * w}, {"x": x}, {"x": x, "w": -w}, {"x": x, "w": -w}):
        want = ort_run(m, feeds)
        assert len(want) == 1
        np.testing.assert_array_equal(s.run(None, feeds)[0], want[0])
        assert s.stats()["last_run"] == {k: s.plan.estimates[k] for k in ("bytes_to_device", "bytes_to_host")}
    np.testing.assert_array_equal(s.run([], {"x": x})[0], ort_run(m, {"x": x})[0])
    big = x.astype(">f4")
    np.testing.assert_array_equal(s.run(None, {"x": big})[0], ort_run(m, {"x": x})[0])
    with pytest.raises(DTypeError, match="must be float32, got float64"):
        s.run(None, {"x": x.astype(np.float64)})
    with pytest.raises(InvalidArgumentError, match="not an input of the model.*overridable initializers \\['w'\\]"):
        s.run(None, {"x": x, "v": w})
    bad = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=5)], "bad",
                            [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                            [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])])
    bad = helper.make_model(bad, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(edgert.ModelFormatError, match="Node \\(Softmax_0\\)"):
        edgert.Session(bad, device, emulate=emulate)
