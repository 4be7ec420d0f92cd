"""The partitioner: capability splits, acyclic islands, copy-aware demotion and merging, fallback="forbid",
min_nodes_per_partition / max_partitions, dynamic dims, transfer bytes, estimates, renderings and `edgert plan`.

Graphs are tiny ONNX models built here; profiles are synthetic (built in code or written as TOML), plus the shipped
imx8mp and coral-usb profiles with an int8 QDQ MLP quantized by onnxruntime."""
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import edgert
from edgert import plan as P
from edgert.formats.onnx import load_onnx
from edgert.graph import DTYPE_BITS
from edgert.profiles import ComputeUnit, DeviceProfile, Link, OpConstraint

import onnx_models as M
from cli_run import edgert_cmd
from profile_toml import npu_profile_toml

HOST_OPS_S = 1e9     # synthetic host: 1 GOP/s
NPU_OPS_S = 1e13     # synthetic accelerator: 10 TOP/s
ZERO_COPY = Link("shared-memory", True, 1e10, 1e-6)
UART = Link("uart", False, 11_520.0, 1e-3)   # 115200 baud


# ---- synthetic profiles and graphs ------------------------------------------------------------------------------
def cpu_unit():
    return ComputeUnit("cpu", "cpu", "host", {}, ("*",), {"*": OpConstraint("*")}, {"float32": HOST_OPS_S}, 8e9)


def npu_unit(ops, link=ZERO_COPY, dtypes=("float32",), static=False, memory=0.0, name="npu"):
    return ComputeUnit(name, "npu", "onnxruntime", {"providers": ["CPUExecutionProvider"]}, tuple(dtypes),
                       {o: OpConstraint(o) for o in ops}, {d: NPU_OPS_S for d in dtypes}, memory, link,
                       static_shapes=static)


def profile(*accels, power_w=10.0, price=3.6):
    return DeviceProfile("synthetic", "test device", [cpu_unit(), *accels], power_w, 1.0, price, "test")


def chain(ops, n=64, d=256, name="chain"):
    """x[n, d] -> ops[0] -> ops[1] -> ... -> y[n, d]; MatMul reads a d x d weight, Add a bias, others are unary."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i, op in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        if op == "MatMul":
            inits.append(numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out], name=f"n{i}"))
        elif op == "Add":
            inits.append(numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [cur, f"b{i}"], [out], name=f"n{i}"))
        else:
            nodes.append(helper.make_node(op, [cur], [out], name=f"n{i}"))
        cur = out
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", T.FLOAT, [n, d])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [n, d])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def diamond(d=256):
    """x -> a(MatMul) -> b(Softmax) -> dd(Add) ; a -> c(MatMul) -> dd: with Softmax on the host, {a, c, dd} on the
    accelerator as one island would depend on b and feed it at once (a cycle through the host)."""
    rng = np.random.default_rng(1)
    w = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["ta"], name="a"),
             helper.make_node("Softmax", ["ta"], ["tb"], name="b"),
             helper.make_node("MatMul", ["ta", "w1"], ["tc"], name="c"),
             helper.make_node("Add", ["tb", "tc"], ["y"], name="dd")]
    g = helper.make_graph(nodes, "diamond", [helper.make_tensor_value_info("x", T.FLOAT, [64, d])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [64, d])], initializer=w)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def assert_executable(plan):
    """Every node in exactly one partition; partitions in an order where each one's inputs already exist (so the
    contracted graph is acyclic); assignment and partitions agree."""
    g = plan.graph
    seen = [n for p in plan.partitions for n in p.nodes]
    assert sorted(seen) == sorted(n.name for n in g.nodes) and len(seen) == len(set(seen))
    have = set(g.inputs) | set(g.initializers())
    for p in plan.partitions:
        for x in p.inputs:
            assert x in have, f"partition {p.id} reads {x} before any earlier partition produced it"
        for n in p.nodes:
            assert plan.assignment[n] == p.unit
            have.update(o for o in g.node(n).outputs if o)
    assert [p.id for p in plan.partitions] == list(range(len(plan.partitions)))


def nbytes_of(graph, name, dims=None):
    t = graph.tensors[name]
    return math.prod(t.concrete_shape(dims)) * DTYPE_BITS[t.dtype] // 8


# ---- capability --------------------------------------------------------------------------------------------------
def test_capability_split_transfers_and_estimates():
    prof = profile(npu_unit(["MatMul", "Add"]))
    p = edgert.plan(chain(["MatMul", "Softmax", "MatMul"]), device=prof)
    assert_executable(p)
    assert [(q.unit, q.delegate, q.nodes) for q in p.partitions] == [
        ("npu", "onnxruntime", ["n0"]), ("cpu", "host", ["n1"]), ("npu", "onnxruntime", ["n2"])]
    assert p.assignment == {"n0": "npu", "n1": "cpu", "n2": "npu"}
    assert set(p.reasons) == {"n1"} and "Softmax not in the npu op list" in p.reasons["n1"]
    assert p.partitions[0].inputs == ["x"] and p.partitions[0].outputs == ["t0"]
    assert p.partitions[0].initializers == ["w0"]
    # graph input in, each crossing out and back, graph output home: bytes = elements x dtype size
    got = [(t.tensor, t.direction, t.src, t.dst, t.src_partition, t.dst_partition) for t in p.transfers]
    assert got == [("x", "to_device", "cpu", "npu", None, 0), ("t0", "to_host", "npu", "cpu", 0, 1),
                   ("t1", "to_device", "cpu", "npu", 1, 2), ("y", "to_host", "npu", "cpu", 2, None)]
    for t in p.transfers:
        assert t.nbytes == nbytes_of(p.graph, t.tensor) == 64 * 256 * 4
        assert t.link is ZERO_COPY and t.seconds == pytest.approx(ZERO_COPY.latency_s)
    e = p.estimates
    assert e["bytes_to_device"] == e["bytes_to_host"] == 2 * 64 * 256 * 4
    mm = 2 * 64 * 256 * 256
    assert e["compute_s"] == pytest.approx(2 * mm / NPU_OPS_S + 5 * 64 * 256 / HOST_OPS_S)
    assert e["transfer_s"] == pytest.approx(4 * ZERO_COPY.latency_s)
    assert e["latency_s"] == pytest.approx(e["compute_s"] + e["transfer_s"])
    assert e["energy_j"] == pytest.approx(10.0 * e["latency_s"])
    assert e["cost_usd"] == pytest.approx(3.6 * e["latency_s"] / 3600)
    assert p.transfers_into(2)[0].tensor == "t1" and [t.tensor for t in p.transfers_out_of(0)] == ["t0"]
    assert p.partition_of("n1").id == 1 and p.unit("npu").link is ZERO_COPY and p.host_unit == "cpu"


def test_dtype_and_first_accelerator_preference():
    int8_npu = npu_unit(["MatMul"], dtypes=("int8",), name="npu")
    f32_gpu = npu_unit(["MatMul", "Softmax"], name="gpu")
    p = edgert.plan(chain(["MatMul", "Softmax"]), device=profile(int8_npu, f32_gpu))
    assert p.assignment == {"n0": "gpu", "n1": "gpu"} and len(p.partitions) == 1
    p = edgert.plan(chain(["MatMul"]), device=profile(int8_npu))
    assert p.assignment == {"n0": "cpu"} and "dtype float32 not supported" in p.reasons["n0"]


def test_host_only_profile_runs_everything_on_the_host_with_reasons():
    p = edgert.plan(M.mlp(), device=profile(), dims={"batch": 2})
    assert len(p.partitions) == 1 and p.partitions[0].unit == "cpu" and p.transfers == []
    assert set(p.reasons) == {n.name for n in p.graph.nodes}
    assert p.estimates["bytes_to_device"] == 0 and p.estimates["transfer_s"] == 0
    # fallback="forbid" has nothing to forbid when the device is the host itself
    assert len(edgert.plan(M.mlp(), device=profile(), fallback="forbid").partitions) == 1


def test_memory_budget_sends_overflowing_nodes_to_host():
    # each 256x256 float32 weight is 256 KiB: a 400 KiB accelerator takes the first MatMul only
    p = edgert.plan(chain(["MatMul", "MatMul"]), device=profile(npu_unit(["MatMul"], memory=400 * 1024)))
    assert p.assignment == {"n0": "npu", "n1": "cpu"} and "npu memory" in p.reasons["n1"]


# ---- islands -----------------------------------------------------------------------------------------------------
def test_diamond_islands_stay_acyclic():
    p = edgert.plan(diamond(), device=profile(npu_unit(["MatMul", "Add"])))
    assert_executable(p)
    assert p.assignment["b"] == "cpu"
    assert all(p.assignment[n] == "npu" for n in ("a", "c", "dd"))
    # a and dd cannot share an island with b in between; every npu node is still on the accelerator
    assert p.partition_of("a").id != p.partition_of("dd").id
    assert len(p.partitions) == 3


def test_find_islands_merges_branches_of_one_unit():
    # x -> a -> b, x -> c; b, c -> d: all on one unit gives one island even though c does not follow b
    g = load_onnx(diamond())
    topo = P._Topology(g)
    assert P.find_islands(topo, ["npu"] * 4) == [[0, 1, 2, 3]]
    # with b on the host, d cannot join {a, c}: that island would both feed b and wait for it
    assert P.find_islands(topo, ["npu", "cpu", "npu", "npu"]) == [[0, 2], [1], [3]]


def reentrant(d=64):
    """x -> b(Relu) -> x1(Softmax) -> a1(Relu) -> a2(Relu); b, a2 -> v(Add) -> y. With Softmax on the host, v's two
    producer islands {b} and {a1, a2} cannot both take it: the merged island would feed x1 (through b) and wait for
    it (through a1). The larger island is tried first, so only the path from {b} back into {a1, a2} shows the cycle."""
    nodes = [helper.make_node("Relu", ["x"], ["tb"], name="b"),
             helper.make_node("Softmax", ["tb"], ["tx"], name="x1"),
             helper.make_node("Relu", ["tx"], ["ta1"], name="a1"),
             helper.make_node("Relu", ["ta1"], ["ta2"], name="a2"),
             helper.make_node("Add", ["tb", "ta2"], ["y"], name="v")]
    g = helper.make_graph(nodes, "reentrant", [helper.make_tensor_value_info("x", T.FLOAT, [64, d])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [64, d])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_merge_of_two_producer_islands_checks_paths_back_into_either():
    # regression: the reachability search skipped the merged islands themselves, so a path leaving one merged island
    # and re-entering the other was missed ("partitioner produced a cyclic island graph" on rapidocr QDQ models)
    topo = P._Topology(load_onnx(reentrant()))
    islands = P.find_islands(topo, ["npu", "cpu", "npu", "npu", "npu"])
    assert islands == [[0], [1], [2, 3, 4]]
    p = edgert.plan(reentrant(), device=profile(npu_unit(["Relu", "Add"])))
    assert_executable(p)
    assert p.partition_of("b").id != p.partition_of("v").id


def test_control_flow_node_is_atomic_and_judged_by_its_bodies():
    g = load_onnx(M.if_model())
    prof = profile(npu_unit(["ReduceSum", "Greater", "If", "Relu", "Mul"], dtypes=("float32", "bool")))
    # the else body's Sub is missing from the op list, so the whole If stays on the host
    p = edgert.plan(g, device=prof)
    assert p.assignment["branch"] == "cpu" and "else_sub" in p.reasons["branch"]
    assert_executable(p)
    assert P.node_ops(g.node("branch"), g) == 4  # the costlier branch: 4 elements


def outer_scope_if_model():
    """y = If(s > 0, then: Relu(sx @ w), else: Neg(sx @ w)), sx [8, 16] and w [16, 32] read from the outer graph."""
    vi = helper.make_tensor_value_info
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32), "w")
    then_g = helper.make_graph([helper.make_node("MatMul", ["sx", "w"], ["tm"], name="then_mm"),
                                helper.make_node("Relu", ["tm"], ["t"], name="then_relu")], "then", [],
                               [vi("t", T.FLOAT, [8, 32])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["sx", "w"], ["em"], name="else_mm"),
                                helper.make_node("Neg", ["em"], ["e"], name="else_neg")], "else", [],
                               [vi("e", T.FLOAT, [8, 32])])
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    g = helper.make_graph([helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                           helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g,
                                            else_branch=else_g)], "outer",
                          [vi("sx", T.FLOAT, [8, 16]), vi("s", T.FLOAT, [])], [vi("y", T.FLOAT, [8, 32])],
                          [zero, w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_bodies_reading_outer_scope_tensors_are_placed_and_costed():
    """The If's branches read sx and w from the outer graph: a unit running float32 and bool takes the If (it was
    refused for an "unknown dtype"), and the cost counts the branch MatMul as 2*8*16*32 ops (sx was a scalar)."""
    model = outer_scope_if_model()
    prof = profile(npu_unit(["Greater", "If", "MatMul", "Relu", "Neg"], dtypes=("float32", "bool")))
    p = edgert.plan(model, device=prof, fallback="forbid")
    assert p.assignment == {"gt": "npu", "branch": "npu"}
    assert not any("sx" in a or "'w'" in a for a in p.assumed), p.assumed
    g = load_onnx(model)
    assumed = set()
    assert P.node_ops(g.node("branch"), g, assumed=assumed) == 2 * 8 * 16 * 32 + 8 * 32
    assert assumed == set()
    s = edgert.Session(model, device=prof, fallback="forbid", emulate=True)
    rng = np.random.default_rng(3)
    for sign in (1.0, -1.0):
        feeds = {"sx": rng.standard_normal((8, 16)).astype(np.float32), "s": np.array(sign, np.float32)}
        np.testing.assert_array_equal(s.run(None, feeds)[0], M.ort_run(model, feeds)[0])


# ---- copy-aware --------------------------------------------------------------------------------------------------
def test_cheap_island_over_slow_link_returns_to_host_but_stays_over_zero_copy():
    model = chain(["Softmax", "Add", "Softmax"])
    slow = edgert.plan(model, device=profile(npu_unit(["Add"], link=UART)))
    assert slow.assignment["n1"] == "cpu" and len(slow.partitions) == 1 and slow.transfers == []
    assert slow.reasons["n1"].startswith("copy-aware") and "uart" in slow.reasons["n1"]
    fast = edgert.plan(model, device=profile(npu_unit(["Add"], link=ZERO_COPY)))
    assert fast.assignment["n1"] == "npu" and len(fast.partitions) == 3
    assert fast.estimates["latency_s"] < slow.estimates["latency_s"] * 1.01
    # forbid keeps it on the accelerator whatever the link costs
    locked = edgert.plan(chain(["Add"]), device=profile(npu_unit(["Add"], link=UART)), fallback="forbid")
    assert locked.assignment == {"n0": "npu"}
    assert locked.estimates["transfer_s"] == pytest.approx(2 * (1e-3 + 64 * 256 * 4 / 11_520.0))


def test_big_island_stays_even_over_uart():
    # 2*64*256*256 ops = 8.4 ms on the host; moving 2 x 64 KiB over UART costs ~11 s: host. With a 10 MB/s link
    # the transfer is ~13 ms; with a wider matmul the NPU wins.
    dev = profile(npu_unit(["MatMul"], link=Link("usb", False, 1e9, 1e-4)))
    p = edgert.plan(chain(["MatMul", "MatMul", "MatMul"]), device=dev)
    assert set(p.assignment.values()) == {"npu"} and len(p.partitions) == 1


def test_neighbouring_islands_merge_around_a_tiny_host_island():
    """The merge step on its own: two npu islands around a Relu the npu can run but that sits on the host (e.g.
    after an earlier demotion) become one island, because that saves four transfers."""
    g = load_onnx(chain(["MatMul", "Relu", "MatMul"]))
    prof = profile(npu_unit(["MatMul", "Relu"], link=Link("usb", False, 1e8, 1e-4)))
    cost = P.CostModel(g, prof, {})
    reasons = {"n1": "placed on the host by hand"}
    units = P.copy_aware(cost, ["npu", "cpu", "npu"], [{"npu"}] * 3, reasons)
    assert units == ["npu", "npu", "npu"] and "n1" not in reasons
    # not allowed when the npu cannot run it: the islands stay apart
    units = P.copy_aware(cost, ["npu", "cpu", "npu"], [{"npu"}, set(), {"npu"}], {})
    assert units == ["npu", "cpu", "npu"]
    # and through plan(): a Relu the npu runs never splits the MatMuls
    p = edgert.plan(chain(["MatMul", "Relu", "MatMul"]), device=prof)
    assert len(p.partitions) == 1 and p.partitions[0].unit == "npu"


# ---- fallback ----------------------------------------------------------------------------------------------------
def test_forbid_names_every_unsupported_node():
    model = chain(["MatMul", "Softmax", "MatMul", "Erf", "Add"])
    with pytest.raises(edgert.UnsupportedOpError) as exc:
        edgert.plan(model, device=profile(npu_unit(["MatMul", "Add"])), fallback="forbid")
    msg = str(exc.value)
    assert "2 of 5 nodes" in msg and "n1 (Softmax)" in msg and "n3 (Erf)" in msg
    listed = msg.split("accelerator(s): ")[1].split(". Use")[0]
    assert "n0 (" not in listed and "n2 (" not in listed and "n4 (" not in listed  # only the refused ones
    assert "fallback='allow'" in msg
    with pytest.raises(edgert.InvalidArgumentError, match="fallback must be one of"):
        edgert.plan(model, device=profile(), fallback="maybe")


def test_forbid_conflicting_with_min_nodes_is_an_error():
    with pytest.raises(edgert.InvalidArgumentError, match="min_nodes_per_partition=3"):
        edgert.plan(chain(["MatMul"]), device=profile(npu_unit(["MatMul"])), fallback="forbid",
                    min_nodes_per_partition=3)


# ---- options -----------------------------------------------------------------------------------------------------
def test_min_nodes_per_partition_moves_small_islands_to_host():
    model = chain(["MatMul", "MatMul", "Softmax", "MatMul"])
    prof = profile(npu_unit(["MatMul"]))
    p = edgert.plan(model, device=prof)
    assert [len(q.nodes) for q in p.partitions] == [2, 1, 1]
    p = edgert.plan(model, device=prof, min_nodes_per_partition=2)
    assert [(q.unit, q.nodes) for q in p.partitions] == [("npu", ["n0", "n1"]), ("cpu", ["n2", "n3"])]
    assert "min_nodes_per_partition" in p.reasons["n3"]
    assert_executable(p)
    with pytest.raises(edgert.InvalidArgumentError, match="min_nodes_per_partition"):
        edgert.plan(model, device=prof, min_nodes_per_partition=0)


def test_max_partitions_demotes_the_least_valuable_island():
    model = chain(["MatMul", "MatMul", "Softmax", "MatMul"])
    prof = profile(npu_unit(["MatMul"]))
    p = edgert.plan(model, device=prof, max_partitions=2)
    assert len(p.partitions) == 2 and p.assignment["n0"] == p.assignment["n1"] == "npu"  # the 2-MatMul island kept
    assert "max_partitions=2" in p.reasons["n3"]
    p1 = edgert.plan(model, device=prof, max_partitions=1)
    assert len(p1.partitions) == 1 and p1.partitions[0].unit == "cpu"
    assert p1.estimates["latency_s"] >= p.estimates["latency_s"]
    # forbid leaves no move that drops a partition: the npu islands cannot merge across the host-only Softmax
    with pytest.raises(edgert.InvalidArgumentError, match="cannot reach max_partitions=1"):
        edgert.plan(chain(["MatMul", "Softmax", "MatMul"]), device=profile(npu_unit(["MatMul"]),
                    npu_unit(["Softmax"], name="dsp")), fallback="forbid", max_partitions=1)
    with pytest.raises(edgert.InvalidArgumentError):
        edgert.plan(model, device=prof, max_partitions=0)


def branches(pairs, d=64):
    """Nodes ``(name, op, input)`` on x[16, d] ("x" or an earlier node's name), every node's output a graph output."""
    nodes = [helper.make_node(op, [x, x] if op == "Add" else [x], [name], name=name) for name, op, x in pairs]
    g = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", T.FLOAT, [16, d])],
                          [helper.make_tensor_value_info(name, T.FLOAT, [16, d]) for name, _, _ in pairs])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("device", ["host", "rpi5"])
def test_max_partitions_merges_independent_branches_of_one_unit(device):
    # two branches no path joins were two cpu partitions, and max_partitions=1 "cannot reach max_partitions=1"
    model = branches([("a", "Relu", "x"), ("b", "Neg", "x")])
    p = edgert.plan(model, device=device, max_partitions=1)
    assert [(q.unit, q.nodes) for q in p.partitions] == [("cpu", ["a", "b"])]
    assert_executable(p)
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    s = edgert.Session(model, device=device, max_partitions=1)
    assert len(s.plan.partitions) == 1
    for y, want in zip(s.run(None, {"x": x}), M.ort_run(model, {"x": x})):
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("device", ["host", "rpi5"])
def test_one_unit_runs_independent_branches_as_one_partition(device):
    """When one unit runs every node, branches no path links (each from a graph input) are one partition: on the
    host nothing crosses a link either way, and each partition was an onnxruntime session and a call of its own (4
    branches: 18.5 us a run against onnxruntime's 8.7). Plans over several units keep such islands apart."""
    model = branches([("a", "Relu", "x"), ("b", "Neg", "x"), ("c", "Abs", "b"), ("d", "Sigmoid", "x")])
    p = edgert.plan(model, device=device)
    assert [(q.unit, q.nodes) for q in p.partitions] == [("cpu", ["a", "b", "c", "d"])] and not p.transfers
    assert_executable(p)
    s = edgert.Session(model, device=device, telemetry=False)
    assert s._bound.fast is not None  # one partition: the session's one-call run
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    for y, want in zip(s.run(None, {"x": x}), M.ort_run(model, {"x": x})):
        np.testing.assert_array_equal(y, want)
    mixed = edgert.plan(branches([("a", "Add", "x"), ("b", "Neg", "x"), ("c", "Abs", "x")], d=4096),
                        device=profile(npu_unit(["Add"])))
    assert [(q.unit, q.nodes) for q in mixed.partitions] == [("npu", ["a"]), ("cpu", ["b"]), ("cpu", ["c"])]


def test_max_partitions_merges_independent_device_islands_under_forbid():
    # fallback forbid moves no node, but two independent npu islands still merge (nothing crosses between them)
    model = branches([("a", "Add", "x"), ("b", "Add", "x")])
    prof = profile(npu_unit(["Add"]))
    p = edgert.plan(model, device=prof, fallback="forbid", max_partitions=1)
    assert [(q.unit, q.nodes) for q in p.partitions] == [("npu", ["a", "b"])]
    # one copy of x to the device instead of one per island
    assert p.estimates["bytes_to_device"] == 16 * 64 * 4
    s = edgert.Session(model, device=prof, fallback="forbid", emulate=True, max_partitions=1)
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    for y, want in zip(s.run(None, {"x": x}), M.ort_run(model, {"x": x})):
        np.testing.assert_array_equal(y, want)
    assert s.stats()["bytes_to_device"] == p.estimates["bytes_to_device"]


def test_joining_independent_islands_never_closes_a_cycle():
    # a(npu) -> b(dsp) and c(dsp) -> dd(npu): either pair may join alone, not both (then a -> b..c -> dd -> a). b and
    # c join first (the earlier island), after which a reaches dd through them, so {a, dd} stay apart
    model = branches([("a", "Add", "x"), ("b", "Softmax", "a"), ("c", "Softmax", "x"), ("dd", "Add", "c")])
    prof = profile(npu_unit(["Add"]), npu_unit(["Softmax"], name="dsp"))
    p = edgert.plan(model, device=prof, fallback="forbid", max_partitions=3)
    assert [q.nodes for q in p.partitions] == [["a"], ["b", "c"], ["dd"]]
    assert_executable(p)
    with pytest.raises(edgert.InvalidArgumentError, match="cannot reach max_partitions=2: 3 partitions remain"):
        edgert.plan(model, device=prof, fallback="forbid", max_partitions=2)
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    s = edgert.Session(model, device=prof, fallback="forbid", emulate=True, max_partitions=3)
    for y, want in zip(s.run(None, {"x": x}), M.ort_run(model, {"x": x})):
        np.testing.assert_array_equal(y, want)


def test_dynamic_dims_bound_vs_unbound():
    prof = profile(npu_unit(["MatMul", "Add", "Relu"], static=True))
    unbound = edgert.plan(M.mlp(), device=prof)
    assert set(unbound.assignment.values()) == {"cpu"}
    assert "dynamic shape" in unbound.reasons["mm1"] and "batch" in unbound.reasons["mm1"]
    assert "dim 'batch' unbound: counted as 1" in unbound.assumed
    with pytest.raises(edgert.UnsupportedOpError, match="dynamic shape"):
        edgert.plan(M.mlp(), device=prof, fallback="forbid")
    bound = edgert.plan(M.mlp(), device=prof, dims={"batch": 512})
    assert set(bound.assignment.values()) == {"npu"} and bound.dims == {"batch": 512}
    assert bound.graph.tensors["x"].shape == (512, 8) and bound.assumed == []
    x_in = bound.transfers[0]
    assert (x_in.tensor, x_in.nbytes) == ("x", 512 * 8 * 4)
    # a Graph built without an ONNX source is bound by lookup rather than re-inference
    g = load_onnx(M.mlp())
    assert edgert.plan(g, device=prof, dims={"batch": 512}).assignment == bound.assignment


def test_transfer_bytes_follow_dtype_sizes():
    # a float16 tensor crossing costs 2 bytes per element, an int8 one 1 byte
    nodes = [helper.make_node("Cast", ["x"], ["h"], name="to16", to=T.FLOAT16),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["y"], name="to8", to=T.INT8)]
    g = helper.make_graph(nodes, "casts", [helper.make_tensor_value_info("x", T.FLOAT, [3, 5, 7])],
                          [helper.make_tensor_value_info("y", T.INT8, [3, 5, 7])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    whole = edgert.plan(m, device=profile(npu_unit(["Cast", "Relu"], dtypes=("float32", "float16", "int8"))),
                        fallback="forbid")
    assert [(t.tensor, t.direction, t.nbytes) for t in whole.transfers] == [("x", "to_device", 3 * 5 * 7 * 4),
                                                                            ("y", "to_host", 3 * 5 * 7 * 1)]
    # only the float16 Relu on the accelerator: what crosses is float16 both ways
    g = load_onnx(m)
    cost = P.CostModel(g, profile(npu_unit(["Relu"], dtypes=("float16",))), {})
    units = ["cpu", "npu", "cpu"]
    moved = cost.transfers(P.find_islands(cost.topo, units), units)
    assert [(t.tensor, t.direction, t.nbytes) for t in moved] == [("h", "to_device", 210), ("r", "to_host", 210)]
    assert all(t.nbytes == nbytes_of(g, t.tensor) for t in moved)
    assert P.tensor_nbytes(g, "y") == 105 and P.tensor_nbytes(g, "x") == 420


def test_node_ops_estimates():
    g = load_onnx(M.mlp(), dims={"batch": 4})
    assert P.node_ops(g.node("mm1"), g) == 2 * 4 * 8 * 16
    assert P.node_ops(g.node("add1"), g) == 4 * 16
    c = load_onnx(M.convnet())
    assert P.node_ops(c.node("conv1"), c) == 2 * (8 * 16 * 16) * (3 * 3 * 3)
    assert P.node_ops(c.node("flatten"), c) == 0
    gemm = helper.make_graph([helper.make_node("Gemm", ["a", "b"], ["c"], name="gemm", transA=1)], "gemm",
                             [helper.make_tensor_value_info("a", T.FLOAT, [6, 4]),
                              helper.make_tensor_value_info("b", T.FLOAT, [6, 5])],
                             [helper.make_tensor_value_info("c", T.FLOAT, [4, 5])])
    gm = helper.make_model(gemm, opset_imports=[helper.make_opsetid("", 17)])
    gm.ir_version = 8
    gg = load_onnx(gm)
    assert P.node_ops(gg.node("gemm"), gg) == 2 * 4 * 5 * 6


def test_node_ops_tflite_convolutions():
    """TFLite layouts: CONV_2D filters are OHWI (kh * kw * Cin per output), DEPTHWISE_CONV_2D filters (1, kh, kw, C)
    read one input channel per output (kh * kw)."""
    import tflite_models as tm
    from edgert.formats.tflite import load_tflite

    g = load_tflite(tm.int8_conv(hw=8, cin=4, cout=8))
    conv = next(n for n in g.nodes if n.attrs.get("tflite_op") == "CONV_2D")
    dw = next(n for n in g.nodes if n.attrs.get("tflite_op") == "DEPTHWISE_CONV_2D")
    assert g.tensors[conv.inputs[1]].shape == (8, 3, 3, 4) and g.tensors[dw.inputs[1]].shape == (1, 3, 3, 8)
    assert P.node_ops(conv, g) == 2 * (8 * 8 * 8) * (3 * 3 * 4)
    assert P.node_ops(dw, g) == 2 * (8 * 8 * 8) * (3 * 3)


# ---- the shipped profiles and a real int8 QDQ model ----------------------------------------------------------
@pytest.fixture(scope="module")
def qdq_mlp(tmp_path_factory):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("qdq")
    src, dst = d / "mlp.onnx", d / "mlp_qdq.onnx"
    onnx.save(M.mlp(batch=32, d_in=512, d_hidden=1024, d_out=256), src)
    quantize_static(str(src), str(dst), M.calibration_reader("x", (32, 512)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return dst


def test_qdq_mlp_on_imx8mp_runs_its_int8_core_on_the_npu(qdq_mlp):
    p = edgert.plan(qdq_mlp, device="imx8mp")
    assert_executable(p)
    g = p.graph
    for n in g.nodes:
        if n.op_type in ("MatMul", "Add", "Relu"):
            assert p.assignment[n.name] == "npu", (n.name, p.reasons.get(n.name))
    # the float edges stay on the CPU: quantizing the float input, dequantizing the float output
    first_q = next(n for n in g.nodes if n.op_type == "QuantizeLinear" and n.inputs[0] == "x")
    last_dq = next(n for n in g.nodes if n.op_type == "DequantizeLinear" and n.outputs[0] == "y")
    assert p.assignment[first_q.name] == p.assignment[last_dq.name] == "cpu"
    assert "float32" in p.reasons[first_q.name]
    # what crosses is int8: the quantized input in, the quantized output back
    assert {t.direction for t in p.transfers} == {"to_device", "to_host"}
    for t in p.transfers:
        assert g.tensors[t.tensor].dtype == "int8" and t.nbytes == nbytes_of(g, t.tensor)
    assert [q.delegate for q in p.partitions] == ["host", "litert", "host"]
    assert p.estimates["energy_j"] == pytest.approx(5.0 * p.estimates["latency_s"])
    with pytest.raises(edgert.UnsupportedOpError, match="QuantizeLinear"):
        edgert.plan(qdq_mlp, device="imx8mp", fallback="forbid")


def test_qdq_mlp_on_coral_usb(qdq_mlp):
    p = edgert.plan(qdq_mlp, device="coral-usb")
    assert_executable(p)
    assert p.profile.units[0].delegate == "host" and p.profile.units[1].name == "tpu"
    for n in p.graph.nodes:  # capability or cost: every node off the TPU says which
        if p.assignment[n.name] != "tpu":
            assert n.name in p.reasons
    # the TPU could take every MatMul: any that are on the host were moved there by the cost model
    for n in p.graph.nodes:
        if n.op_type == "MatMul" and p.assignment[n.name] == "cpu":
            assert p.reasons[n.name].startswith("copy-aware")
    # a symbolic batch keeps everything off the static-shape TPU until it is bound
    dyn = edgert.plan(M.mlp(), device="coral-usb")
    assert all(u == "cpu" for u in dyn.assignment.values())


# ---- renderings and the CLI --------------------------------------------------------------------------------------
@pytest.fixture()
def split_plan():
    return edgert.plan(chain(["MatMul", "Softmax", "MatMul"]), device=profile(npu_unit(["MatMul"])))


def test_copy_points_name_the_unit_each_partition_runs_on():
    """A tensor partition 0 (npu) makes, copied back to the host and on to partition 2 (npu): its to_device row read
    "cpu#0 -> npu#2", the link's host end with the producer's partition, which runs on the npu."""
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="a"), helper.make_node("Softmax", ["a"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["c"], name="c"), helper.make_node("MatMul", ["c", "w1"], ["d"], name="d")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [64, 256])],
                          [helper.make_tensor_value_info("d", T.FLOAT, [64, 256])], initializer=w)
    p = edgert.plan(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                    device=profile(npu_unit(["MatMul", "Add"])))
    assert [q.unit for q in p.partitions] == ["npu", "cpu", "npu"]
    lines = p.table().split("copy points")[1].split("estimates")[0].splitlines()
    rows = [line.split()[:5] for line in lines[2:] if line.strip()]
    assert rows == [["x", "65536", "to_device", "cpu", "npu#0"], ["a", "65536", "to_host", "npu#0", "cpu#1"],
                    ["a", "65536", "to_device", "npu#0", "npu#2"], ["b", "65536", "to_device", "cpu#1", "npu#2"],
                    ["d", "65536", "to_host", "npu#2", "cpu"]]
    for q in p.partitions:  # every "unit#id" the table shows is that partition's unit
        for line in lines:
            for word in line.split():
                if word.endswith(f"#{q.id}"):
                    assert word == f"{q.unit}#{q.id}", line


def test_plan_names_free_dims_as_a_session_does(tmp_path):
    """'?' dims (any size, unnamed): a Session names them <input>_<axis> and binds those; plan() and `edgert plan`
    refused the same names ("symbolic dims are ['?']") and took '?', which the Session refuses."""
    def io(n):
        return helper.make_tensor_value_info(n, T.FLOAT, ["?", 3])

    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", [io("x"), io("y")],
                                                [io("z")]), opset_imports=[helper.make_opsetid("", 17)])
    s = edgert.Session(model, dims={"x_0": 2, "y_0": 2})
    assert [i.shape for i in s.get_inputs()] == [["x_0", 3], ["y_0", 3]]
    p = edgert.plan(model, dims={"x_0": 2, "y_0": 2})
    assert p.dims == {"x_0": 2, "y_0": 2} and p.graph.tensors["z"].shape == (2, 3) and p.assumed == []
    assert edgert.plan(model).graph.symbolic_dims() == {"x_0", "y_0"}
    for api in (lambda: edgert.plan(model, dims={"?": 2}), lambda: edgert.Session(model, dims={"?": 2})):
        with pytest.raises(edgert.InvalidArgumentError, match="'\\?'"):
            api()
    onnx.save(model, tmp_path / "q.onnx")
    r = edgert_cmd("plan", str(tmp_path / "q.onnx"), "--dim", "x_0=2", "--dim", "y_0=2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dims"] == {"x_0": 2, "y_0": 2}


def test_binding_an_unknown_dim_lists_the_inputs_dims_only():
    """The refusal named every dim shape inference made up for intermediates (unk__0, ...: ~80 on a real model),
    which no caller can bind."""
    x = helper.make_tensor_value_info("x", T.FLOAT, ["N", 4])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ConstantOfShape", ["s"], ["c"]),
             helper.make_node("NonZero", ["c"], ["nz"]), helper.make_node("Cast", ["nz"], ["y"], to=T.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", T.FLOAT, None)]),
                              opset_imports=[helper.make_opsetid("", 17)])
    inner = {d for t in load_onnx(model).tensors.values() for d in (t.shape or ()) if isinstance(d, str)}
    assert inner - {"N"}  # shape inference's own names are there to be left out
    with pytest.raises(edgert.InvalidArgumentError, match="symbolic dims are \\['N'\\] \\(those of its inputs\\)$"):
        edgert.plan(model, dims={"batch": 2})
    with pytest.raises(edgert.InvalidArgumentError, match="cannot bind"):
        edgert.plan(model, dims={sorted(inner - {"N"})[0]: 2})


def test_table_json_dot_svg(split_plan, tmp_path):
    text = split_plan.table()
    for needle in ("partitions", "placement", "copy points", "estimates per inference", "to_device", "to_host",
                   "Softmax not in the npu op list", "latency", "energy", "cost"):
        assert needle in text
    data = json.loads(split_plan.to_json())
    assert [q["unit"] for q in data["partitions"]] == ["npu", "cpu", "npu"]
    assert data["transfers"][0] == {"tensor": "x", "nbytes": 65536, "src": "cpu", "dst": "npu",
                                    "direction": "to_device", "link": "shared-memory", "src_partition": None,
                                    "dst_partition": 0, "seconds": pytest.approx(1e-6)}
    assert set(data["estimates"]) >= {"latency_s", "compute_s", "transfer_s", "bytes_to_device", "bytes_to_host",
                                      "energy_j", "cost_usd"}
    dot = split_plan.to_dot()
    assert dot.startswith("digraph") and dot.count("subgraph cluster_p") == 3 and "color=red" in dot
    svg = split_plan.to_svg(tmp_path / "p.svg")
    assert (tmp_path / "p.svg").read_text() == svg and svg.lstrip().startswith("<svg")
    assert svg.count('class="transfer"') == 4 and 'data-delegate="onnxruntime"' in svg
    import xml.dom.minidom

    xml.dom.minidom.parseString(svg)  # well-formed


def test_svg_of_names_with_control_characters_is_well_formed():
    """A tensor or node name holding a C0 control character (XML 1.0 has none of them) made an SVG no parser reads:
    they are written as \\xNN."""
    import xml.dom.minidom

    x = helper.make_tensor_value_info("x\x01in", T.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y\x1f", T.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x\x01in"], ["y\x1f"], name="r\x08")],
                                                "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    svg = edgert.plan(model, device="rk3588").to_svg()
    xml.dom.minidom.parseString(svg)
    assert "x\\x01in" in svg and "r\\x08" in svg


PROFILE_TOML = npu_profile_toml("toy-npu", "a toy accelerator over a zero-copy link", "onnxruntime",
                                '{ providers = ["CPUExecutionProvider"] }', active_w=4.0, link_kind="shared-memory",
                                zero_copy=True)


def test_cli_plan(tmp_path):
    prof = tmp_path / "toy.toml"
    prof.write_text(PROFILE_TOML)
    model = tmp_path / "m.onnx"
    onnx.save(chain(["MatMul", "Softmax", "MatMul"]), model)
    r = edgert_cmd("plan", str(model), "--device", str(prof), "--svg", str(tmp_path / "p.svg"),
                   "--dot", str(tmp_path / "p.dot"))
    assert r.returncode == 0, r.stderr
    assert "placement" in r.stdout and "copy points" in r.stdout and "estimates per inference" in r.stdout
    assert "toy-npu" in r.stdout
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<svg")
    assert (tmp_path / "p.dot").read_text().startswith("digraph")
    r = edgert_cmd("plan", str(model), "--device", str(prof), "--json", "--max-partitions", "1")
    data = json.loads(r.stdout)
    assert len(data["partitions"]) == 1 and data["device"] == "toy-npu"
    r = edgert_cmd("plan", str(model), "--device", str(prof), "--fallback", "forbid")
    assert r.returncode == 1 and r.stderr.startswith("edgert: error:") and "n1 (Softmax)" in r.stderr
    assert "Traceback" not in r.stderr
    onnx.save(M.mlp(), tmp_path / "mlp.onnx")
    r = edgert_cmd("plan", str(tmp_path / "mlp.onnx"), "--device", "host", "--dim", "batch=4", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["dims"] == {"batch": 4}
    r = edgert_cmd("plan", str(tmp_path / "mlp.onnx"), "--dim", "batch")
    assert r.returncode == 1 and "NAME=VALUE" in r.stderr


def test_edgert_plan_is_callable_however_imported():
    import importlib

    mod = importlib.import_module("edgert.plan")
    assert edgert.plan is mod and callable(edgert.plan) and edgert.Plan is mod.Plan
    assert isinstance(edgert.plan(chain(["Relu"]), device=profile()), edgert.Plan)


def test_graph_built_with_the_ir_classes():
    """No ONNX source at all: a symbolic batch is bound by lookup; transfers and estimates still follow."""
    from edgert.graph import Graph, Node, Tensor

    w = np.ones((32, 32), np.float32)
    tensors = {"x": Tensor("x", "float32", ("n", 32)), "w": Tensor("w", "float32", (32, 32), initializer=w),
               "h": Tensor("h", "float32", ("n", 32)), "y": Tensor("y", "float32", ("n", 32))}
    nodes = [Node("mm", "MatMul", "", ["x", "w"], ["h"], index=0), Node("sm", "Softmax", "", ["h"], ["y"], index=1)]
    g = Graph("ir", nodes, tensors, ["x"], ["y"], {"": 17})
    prof = profile(npu_unit(["MatMul"], static=True))
    assert edgert.plan(g, device=prof).assignment["mm"] == "cpu"
    p = edgert.plan(g, device=prof, dims={"n": 4096})
    assert p.assignment == {"mm": "npu", "sm": "cpu"}
    assert [(t.tensor, t.nbytes) for t in p.transfers] == [("x", 4096 * 32 * 4), ("h", 4096 * 32 * 4)]
    assert p.partitions[0].inputs == ["x"] and p.partitions[1].outputs == ["y"]
    assert P.node_ops(g.node("mm"), g, {"n": 4096}) == 2 * 4096 * 32 * 32


@pytest.mark.parametrize("dims, match", [({"batch": "x"}, "integer"), ({"batch": 2.7}, "integer"),
                                         ({"batch": np.array(2.7)}, "integer"), ({"batch": True}, "integer"),
                                         ([1], "mapping")])
def test_plan_dims_must_be_a_mapping_of_integers(dims, match):
    # were ValueError (int('x')), AttributeError (a list), or 2.7 silently planned as batch 2
    with pytest.raises(edgert.errors.InvalidArgumentError, match=match):
        P.plan(M.mlp(), dims=dims)
    assert P.plan(M.mlp(), dims={"batch": np.int64(2)}).partitions


@pytest.mark.parametrize("kw", [dict(min_nodes_per_partition=True), dict(max_partitions=True),
                                dict(min_nodes_per_partition=0), dict(max_partitions=2.0)])
def test_plan_limits_must_be_integers_not_booleans(kw):
    with pytest.raises(edgert.errors.InvalidArgumentError, match="must be an integer"):
        P.plan(M.mlp(), **kw)
