"""Graph IR: lookups, sizes, binding, cuts; a partition exported with subgraph_model and run in onnxruntime
reproduces the whole model's intermediate values."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import edgert
from edgert.formats.onnx import load_onnx
from edgert.graph import Tensor

import onnx_models as M


def run(model, feeds, outputs=None):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def run_with_intermediates(model, names, feeds):
    """The whole model run with extra tensors exposed as outputs (their types from shape inference)."""
    m = onnx.shape_inference.infer_shapes(model)
    vis = {v.name: v for v in m.graph.value_info}
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(vis[n] for n in names if n not in have and n in vis)  # graph inputs come from feeds
    return run(m, feeds)


def check_cut(model, node_names, feeds):
    g = load_onnx(model)
    sub = g.subgraph_model(node_names)
    onnx.checker.check_model(sub, full_check=True)
    ins, outs, _ = g.boundary(node_names)
    whole = run_with_intermediates(model, ins + outs, feeds)
    part = run(sub, {n: whole[n] if n in whole else feeds[n] for n in ins})
    assert set(part) == set(outs)
    for n in outs:
        np.testing.assert_array_equal(part[n], whole[n])
    return g, ins, outs


def test_tensor_nbytes():
    assert Tensor("a", "float32", (2, 3), None, None).nbytes() == 24
    assert Tensor("a", "float32", ("batch", 3), None, None).nbytes() is None
    assert Tensor("a", "float32", ("batch", 3), None, None).nbytes({"batch": 4}) == 48
    assert Tensor("a", "int4", (3,), None, None).nbytes() == 2
    assert Tensor("a", None, (3,), None, None).nbytes() is None
    assert Tensor("a", "float16", None, None, None).nbytes() is None
    assert Tensor("a", "float32", (2, None), None, None).nbytes() is None


def test_producer_consumers_and_dtypes():
    g = load_onnx(M.mlp())
    assert g.producer("h3").name == "relu1" and g.producer("x") is None and g.producer("w1") is None
    assert [n.name for n in g.consumers("h3")] == ["mm2"]
    assert g.consumers("y") == []
    assert g.node_dtypes(g.node("mm1")) == {"x": "float32", "w1": "float32", "h1": "float32"}
    with pytest.raises(edgert.InvalidArgumentError, match="no node named 'nope'"):
        g.node("nope")


def test_bind_returns_new_graph_and_reuses_initializers():
    g = load_onnx(M.mlp())
    b = g.bind({"batch": 4})
    assert g.tensors["h1"].shape == ("batch", 16) and b.tensors["h1"].shape == (4, 16)
    assert b.tensors["h1"].nbytes() == 4 * 16 * 4
    assert b.tensors["w1"].initializer is g.tensors["w1"].initializer  # no re-read, no copy
    with pytest.raises(edgert.InvalidArgumentError):
        g.bind({"nope": 1})


def test_dims_from_feeds():
    g = load_onnx(M.mlp())
    assert g.dims_from_feeds({"x": np.zeros((3, 8), np.float32)}) == {"batch": 3}
    with pytest.raises(edgert.ShapeError, match="expected shape"):
        g.dims_from_feeds({"x": np.zeros((3, 9), np.float32)})
    with pytest.raises(edgert.ShapeError, match="rank"):
        g.dims_from_feeds({"x": np.zeros((3,), np.float32)})


def test_boundary():
    g = load_onnx(M.mlp())
    assert g.boundary(["relu1", "mm2", "add2"]) == (["h2"], ["h5"], ["w2", "b2"])
    assert g.boundary(["relu2"]) == (["h5"], ["y"], [])
    assert g.boundary(["mm1", "add1", "relu1", "mm2", "add2", "relu2"]) == (["x"], ["y"], ["w1", "b1", "w2", "b2"])
    with pytest.raises(edgert.InvalidArgumentError, match="no node"):
        g.boundary(["ghost"])


def test_subgraph_model_mlp_middle_slice():
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}
    _, ins, outs = check_cut(M.mlp(), ["relu1", "mm2", "add2"], feeds)
    assert ins == ["h2"] and outs == ["h5"]


def test_subgraph_model_keeps_symbolic_dims():
    sub = load_onnx(M.mlp()).subgraph_model(["relu1", "mm2"])
    dims = sub.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 16


def test_subgraph_model_convnet_slices():
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    check_cut(M.convnet(), ["relu1", "pool1", "conv2"], feeds)
    check_cut(M.convnet(), ["conv1"], feeds)
    check_cut(M.convnet(), ["gap", "flatten"], feeds)


def test_subgraph_model_qdq_int8_slice(tmp_path):
    model = onnx.load(M.qdq_convnet(tmp_path))
    g = load_onnx(model)
    names = [n.name for n in g.nodes]
    mid = names[names.index("conv1"): names.index("conv2") + 1]  # conv1 .. conv2 with the Q/DQ pairs between
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    _, ins, outs = check_cut(model, mid, feeds)
    assert "c2" in outs


def test_subgraph_model_if_node_carries_outer_scope():
    feeds = {"x": np.array([1, -2, 3, 4], np.float32)}
    g, ins, outs = check_cut(M.if_model(), ["branch", "relu"], feeds)
    assert ins == ["cond", "x"] and outs == ["y"]
    feeds = {"x": np.array([-1, -2, 3, -4], np.float32)}
    check_cut(M.if_model(), ["branch"], feeds)


def test_subgraph_model_multiple_outputs_when_consumed_outside():
    # a tensor read both inside and outside the cut is an output of the cut
    m = M.mlp()
    m.graph.node.append(helper.make_node("Identity", ["h2"], ["h2_copy"], name="tap"))
    m.graph.output.append(helper.make_tensor_value_info("h2_copy", onnx.TensorProto.FLOAT, ["batch", 16]))
    g = load_onnx(m)
    _, outs, _ = g.boundary(["add1", "relu1"])
    assert outs == ["h2", "h3"]
    feeds = {"x": np.ones((2, 8), np.float32)}
    check_cut(m, ["add1", "relu1"], feeds)


def test_subgraph_model_unknown_type_refused():
    g = load_onnx(M.mlp())
    g.tensors["h2"].dtype = None
    with pytest.raises(edgert.InvalidArgumentError, match="tensor 'h2'"):
        g.subgraph_model(["relu1"])


def test_prune_drops_what_no_graph_output_depends_on_and_bind_keeps_it_dropped():
    from onnx import TensorProto as T

    nodes = [helper.make_node("Relu", ["x"], ["h"], name="live1"), helper.make_node("Neg", ["h"], ["d1"], name="dead1"),
             helper.make_node("Abs", ["d1"], ["d2"], name="dead2"), helper.make_node("Neg", ["h"], ["y"], name="live2")]
    m = M._model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["n", 2])],
                 [helper.make_tensor_value_info("y", T.FLOAT, ["n", 2])])
    g = load_onnx(m)
    assert [n.name for n in g.nodes] == ["live1", "live2"] and g.pruned == ["dead1", "dead2"]
    assert "d1" not in g.tensors and g.boundary(["live1"])[1] == ["h"]  # a dead reader makes no boundary output
    b = g.bind({"n": 3})
    assert [n.name for n in b.nodes] == ["live1", "live2"] and b.prune() is b
