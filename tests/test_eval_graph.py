"""edgert.eval on ONNX graphs: an honest int8 candidate passes, a perturbed weight fails and is located, identical
models have zero drift, devices are emulated, inputs from a directory, CLI exit codes, JSON schema, PNG."""
import json

import numpy as np
import pytest

import onnx
import onnxruntime  # noqa: F401
from onnx import numpy_helper

import edgert
from edgert.cli import main
from edgert.quantize_model import quantize_onnx
from onnx_models import mlp

N = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_graph")
    ref = d / "mlp.onnx"
    onnx.save(mlp(d_in=64, d_hidden=128, d_out=10), ref)
    i8 = d / "mlp_int8.onnx"
    quantize_onnx(ref, i8, "int8-dynamic")
    bad_model = mlp(d_in=64, d_hidden=128, d_out=10)
    for init in bad_model.graph.initializer:
        if init.name == "w2":  # the second layer's weights: h1..h3 stay exact, h4 is the first affected tensor
            a = numpy_helper.to_array(init).copy()
            a[5] += 10.0
            init.CopyFrom(numpy_helper.from_array(a, "w2"))
    bad = d / "mlp_bad.onnx"
    onnx.save(bad_model, bad)
    return d, ref, i8, bad


def test_honest_int8_passes_default_thresholds(models):
    _, ref, i8, _ = models
    rep = edgert.evaluate(ref, i8, random=N, seed=1)
    assert rep.passed, rep.failures
    assert rep.metrics["sqnr_db"] > 25 and rep.metrics["cosine"] > 0.999
    assert rep.metrics["top1_pct"] >= 90 and rep.metrics["samples"] == N
    names = [t["name"] for t in rep.tensors]
    assert names == ["h1", "h2", "h3", "h4", "h5", "y"]  # topological order, intermediates shared by name
    assert rep.first_divergence is None
    assert {"latency_p50_ms", "latency_p95_ms", "bytes_moved_per_inference", "energy_wh_per_1k",
            "cost_usd_per_1k"} <= set(rep.sides["candidate"])


def test_perturbed_weight_fails_and_names_first_tensor(models):
    _, ref, _, bad = models
    rep = edgert.evaluate(ref, bad, random=N)
    assert not rep.passed
    assert rep.first_divergence == "h4"
    assert any("h4" in f for f in rep.failures)
    rows = {t["name"]: t for t in rep.tensors}
    assert rows["h1"]["sqnr_db"] == float("inf") and rows["h4"]["crossed"]


def test_identical_zero_drift_on_emulated_device(models):
    _, ref, _, _ = models
    rep = edgert.evaluate(ref, f"{ref}@imx8mp", random=4)
    assert rep.passed
    for t in rep.tensors:
        assert t["max_abs"] == 0.0 and t["cosine"] == 1.0
    assert rep.sides["candidate"]["profile"] == "imx8mp"
    assert rep.sides["candidate"]["power_w"] != rep.sides["reference"]["power_w"]


def test_inputs_dir_and_thresholds(models, tmp_path):
    _, ref, i8, _ = models
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", rng.standard_normal((2, 64)).astype(np.float32))
    rep = edgert.evaluate(ref, i8, data=tmp_path, thresholds={"graph": {"sqnr_db": 200}})
    assert rep.metrics["samples"] == 3
    assert not rep.passed and [f.metric for f in rep.failures] == ["sqnr_db"]
    assert rep.first_divergence == "h1"
    # a flat dict is this evaluation's own: a language-model threshold in it would never be checked (it passed)
    with pytest.raises(edgert.InvalidArgumentError, match="'kl_mean' is a language-model threshold; a graph "):
        edgert.evaluate(ref, i8, data=tmp_path, thresholds={"kl_mean": 1e-4})
    # a file serves both kinds: its top-level key of the other kind is skipped
    (tmp_path / "both.toml").write_text("kl_mean = 1e-4\nsqnr_db = 200\n")
    assert [f.metric for f in edgert.evaluate(ref, i8, data=tmp_path, thresholds=tmp_path / "both.toml").failures] \
        == ["sqnr_db"]


def test_cli_exit_codes_json_png(models, tmp_path, capsys):
    _, ref, i8, bad = models
    j, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["eval", "--reference", str(ref), "--random", "8", "-q", "--gate"]
    assert main([*args, "--candidate", str(i8), "--json", str(j), "--plot", str(png)]) == 0
    rep = json.loads(j.read_text())
    assert rep["schema"] == "edgert.eval/1" and rep["kind"] == "graph" and rep["passed"] is True
    assert rep["failures"] == [] and rep["first_divergence"] is None
    assert png.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main([*args, "--candidate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "gate failed" in err and "h4" in err
    assert main([*args[:-1], "--candidate", str(bad)]) == 0  # no --gate: report only
    # errors exit 2, told apart from a failed gate (1); argparse's usage errors are 2 as well
    assert main([*args, "--candidate", str(bad), "--threshold", "nonsense=1"]) == 2
    # a result file that is an input, or the other result file, is refused before the run (it was overwritten)
    before = bad.read_bytes()
    assert main([*args, "--candidate", str(bad), "--json", str(bad)]) == 2
    assert bad.read_bytes() == before and "--json" in capsys.readouterr().err
    assert main([*args, "--candidate", str(i8), "--json", str(png), "--plot", str(png)]) == 2
    assert "--plot" in capsys.readouterr().err
    capsys.readouterr()
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert main([*args, "--candidate", str(i8), "--text", str(text)]) == 2  # --text is for language models
    assert "--text is for language models" in capsys.readouterr().err
    assert main([*args, "--candidate", str(tmp_path / "missing.onnx")]) == 2
    assert capsys.readouterr().err.startswith("edgert: error: model file not found")
    with pytest.raises(SystemExit) as usage:
        main([*args, "--candidate", str(i8), "--random", "two"])
    assert usage.value.code == 2


def test_tflite_models_are_compared_at_their_outputs(tmp_path):
    import tflite_models as tm

    ref, same, other = tmp_path / "ref.tflite", tmp_path / "same.tflite", tmp_path / "other.tflite"
    ref.write_bytes(tm.int8_fc(seed=1))
    same.write_bytes(tm.int8_fc(seed=1))
    other.write_bytes(tm.int8_fc(seed=2))
    ok = edgert.evaluate(str(ref), f"{same}@imx8mp", random=4)
    assert ok.passed and ok.metrics["sqnr_db"] == float("inf") and ok.metrics["outputs_compared"] == 1
    assert any("TFLite" in n for n in ok.notes)
    bad = edgert.evaluate(str(ref), str(other), random=4)
    assert not bad.passed and bad.first_divergence == "probs"


def test_a_file_that_is_not_a_model_is_a_model_format_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(edgert.ModelFormatError):
        edgert.evaluate(str(junk), str(junk), random=1)


def test_mismatched_models_and_bad_sample_options_are_clear_errors(models, tmp_path):
    from onnx import TensorProto, helper

    from onnx_models import _model

    d, ref, _, _ = models
    other = tmp_path / "mlp_out5.onnx"
    onnx.save(mlp(d_in=64, d_hidden=128, d_out=5), other)
    # an output of another shape used to be skipped, leaving nothing compared and the gate passing
    with pytest.raises(edgert.InvalidArgumentError, match=r"output 'y' has shape \[1, 10\].*\[1, 5\]"):
        edgert.evaluate(ref, other, random=2, runs=1)
    # an output that is float on one side only is not the same output either
    amax = mlp(d_in=64, d_hidden=128, d_out=10)
    amax.graph.node.append(helper.make_node("ArgMax", ["h5"], ["y_id"], name="argmax", axis=1))
    amax.graph.node[-2].output[0] = "y_relu"  # relu2 no longer produces y: the int64 ArgMax output takes its name
    amax.graph.node[-1].output[0] = "y"
    del amax.graph.output[:]
    amax.graph.output.append(helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 1]))
    ids = tmp_path / "argmax.onnx"
    onnx.save(amax, ids)
    with pytest.raises(edgert.InvalidArgumentError, match="output 'y' is float32 in the reference but int64 in the "
                                                          "candidate"):
        edgert.evaluate(ref, ids, random=2, runs=1)
    for kw in ({"random": 0}, {"random": -1}, {"runs": 0}):
        with pytest.raises(edgert.InvalidArgumentError, match="must be an int >= 1"):
            edgert.evaluate(ref, ref, **kw)
    with pytest.raises(edgert.InvalidArgumentError, match="no samples"):
        edgert.evaluate(ref, ref, data=[], runs=1)
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "0.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(edgert.InvalidArgumentError, match="0.npy: not a readable .npy"):
        edgert.evaluate(ref, ref, data=bad, runs=1)
    np.savez(bad / "1.npz", x=np.zeros((1, 64), np.float32))
    (bad / "0.npy").unlink()
    (bad / "1.npz").write_bytes((bad / "1.npz").read_bytes()[:40])
    with pytest.raises(edgert.InvalidArgumentError, match="1.npz: not a readable .npz"):
        edgert.evaluate(ref, ref, data=bad, runs=1)


def test_mismatched_output_shape_is_refused_before_intermediates_are_run(models, tmp_path, monkeypatch):
    from edgert.eval import graph
    from edgert.eval import metrics as M

    _, ref, _, _ = models
    other = tmp_path / "mlp_out5.onnx"
    onnx.save(mlp(d_in=64, d_hidden=128, d_out=5), other)  # h1..h5 shared by name, y of another shape
    compared, read = [], []
    real_metrics, real_read = M.tensor_metrics, graph._run_intermediates
    monkeypatch.setattr(M, "tensor_metrics", lambda a, b: compared.append(np.shape(a)) or real_metrics(a, b))
    monkeypatch.setattr(graph, "_run_intermediates", lambda *a, **k: read.append(a[1]) or real_read(*a, **k))
    with pytest.raises(edgert.InvalidArgumentError, match=r"output 'y' has shape \[1, 10\] in the reference but "
                                                          r"\[1, 5\] in the candidate"):
        edgert.evaluate(ref, other, random=2, runs=1)
    assert read == [] and compared == []  # refused before the intermediates were read or compared
    rep = edgert.evaluate(ref, ref, random=2, runs=1)  # the recorders do see a normal evaluation
    assert len(read) == 2 and len(compared) == len(rep.tensors) == 6


def test_identical_models_with_non_finite_outputs_pass(tmp_path):
    """Log of negative inputs gives NaN, x/0 inf: a model compared with itself scored cosine/SQNR NaN and failed
    the gate (with numpy warnings). Non-finite values both sides share are equal; one side's alone is the worst
    score, not NaN."""
    import warnings

    from onnx import TensorProto, helper

    from edgert.eval import metrics

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    for op in ("Log", "Reciprocal"):
        m = helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
        path = tmp_path / f"{op}.onnx"
        onnx.save(m, path)
        sample = {"x": np.array([[-1.0, 0.0, 2.0] + [0.5] * 13], np.float32)}  # NaN, -inf / inf, finite
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            rep = edgert.evaluate(str(path), str(path), data=sample, runs=1)
        assert rep.passed, rep.failures
    a = np.array([1.0, np.nan, np.inf, 2.0])
    assert metrics.cosine_similarity(a, a.copy()) == pytest.approx(1.0) and metrics.sqnr_db(a, a.copy()) == np.inf
    b = a.copy()
    b[1] = 0.0  # NaN on one side only
    assert (metrics.cosine_similarity(a, b), metrics.sqnr_db(a, b), metrics.relative_l2(a, b),
            metrics.max_abs_error(a, b)) == (-1.0, -np.inf, np.inf, np.inf)


def test_bad_api_arguments_are_edgert_errors(models, tmp_path):
    """Were TypeError / ValueError / FileNotFoundError from numpy, the sample reader and matplotlib."""
    _, ref, _, _ = models
    for kw, match in (({"data": [1, 2]}, "data must be a directory of samples, a feed dict"),
                      ({"seed": -1}, "seed must be an int >= 0"), ({"seed": "a"}, "seed must be an int >= 0")):
        with pytest.raises(edgert.InvalidArgumentError, match=match):
            edgert.evaluate(ref, ref, runs=1, **kw)
    with pytest.raises(edgert.InvalidArgumentError, match="reference must be a model path"):
        edgert.evaluate(None, ref)
    rep = edgert.evaluate(ref, ref, random=1, runs=1)
    with pytest.raises(edgert.InvalidArgumentError, match="cannot write the plot .*No such file or directory"):
        rep.plot(tmp_path / "no" / "x.png")


def test_identical_tensors_have_exactly_zero_drift(models):
    """cosine(a, a) was 1 - 1 ulp for about 1 random array in 4 (the dot/norm quotient rounds), so identical models
    showed drift."""
    from edgert.eval import metrics as M

    rng = np.random.default_rng(0)
    for _ in range(300):
        a = rng.standard_normal(rng.integers(2, 2000)).astype(np.float32)
        assert M.tensor_metrics(a, a.copy()) == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "sqnr_db": np.inf}
        b = a + rng.standard_normal(a.size).astype(np.float32) * 0.1
        r, c = a.astype(np.float64), b.astype(np.float64)
        assert M.cosine_similarity(a, b) == pytest.approx(r @ c / np.sqrt((r @ r) * (c @ c)), rel=1e-12)
    _, ref, _, _ = models
    rep = edgert.evaluate(ref, ref, random=8, runs=1)
    assert [(t["name"], t["cosine"], t["max_abs"]) for t in rep.tensors] == \
        [(t["name"], 1.0, 0.0) for t in rep.tensors]


def _swap_classes(model, a=4, b=5):
    """The mlp with output classes a and b swapped (w2's and b2's columns): every row whose top class is one of
    them disagrees, the others agree."""
    for init in model.graph.initializer:
        if init.name in ("w2", "b2"):
            w = numpy_helper.to_array(init).copy()
            w[..., [a, b]] = w[..., [b, a]]
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


def test_top1_and_drift_pool_rows_over_samples_of_different_batch_sizes(models, tmp_path):
    """Samples of batch 1, 3 and 5 were concatenated into one flat vector, and top-1 read it as a single row (100%
    for a candidate with two classes swapped)."""
    from onnx_models import ort_run

    _, ref, _, _ = models
    cand = tmp_path / "swapped.onnx"
    onnx.save(_swap_classes(mlp(d_in=64, d_hidden=128, d_out=10)), cand)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((b, 64)).astype(np.float32)} for b in (1, 3, 5, 2)]
    ya = np.concatenate([ort_run(ref, s)[0] for s in samples]).astype(np.float64)
    yb = np.concatenate([ort_run(cand, s)[0] for s in samples]).astype(np.float64)
    want = 100.0 * np.mean(ya.argmax(1) == yb.argmax(1))
    assert 0 < want < 100  # the samples hit both swapped and unswapped rows
    rep = edgert.evaluate(ref, cand, data=samples, runs=1)
    y = next(t for t in rep.tensors if t["name"] == "y")
    assert y["top1_pct"] == pytest.approx(want) and rep.metrics["top1_pct"] == pytest.approx(want)
    # the element-wise metrics pool every sample's values, whatever its shape
    ya, yb = ya.ravel(), yb.ravel()
    noise = yb - ya
    assert y["max_abs"] == pytest.approx(np.abs(noise).max(), rel=1e-5)
    assert y["rel_l2"] == pytest.approx(np.linalg.norm(noise) / np.linalg.norm(ya), rel=1e-5)
    assert y["cosine"] == pytest.approx(ya @ yb / (np.linalg.norm(ya) * np.linalg.norm(yb)), rel=1e-5)
    assert y["sqnr_db"] == pytest.approx(10 * np.log10((ya @ ya) / (noise @ noise)), rel=1e-5)


def test_outputs_with_no_finite_values_to_compare_fail_the_gate(tmp_path):
    """An output whose values are NaN in the same places on both sides left nothing to measure, yet scored cosine 1
    and SQNR inf and passed; and min() over the outputs dropped a NaN that came second."""
    from onnx import TensorProto, helper

    from edgert.eval import metrics as M
    from onnx_models import _model, ort_run

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("a", "b")]
    path = tmp_path / "abs_log.onnx"
    onnx.save(_model([helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Log", ["x"], ["b"])], [x], outs), path)
    sample = {"x": -np.arange(1, 5, dtype=np.float32).reshape(1, 4)}
    a, b = ort_run(path, sample)
    assert np.isfinite(a).all() and not np.isfinite(b).any()  # b: NaN everywhere, on both sides
    with np.errstate(invalid="ignore"):
        rep = edgert.evaluate(str(path), str(path), data=sample, runs=1)
    rows = {t["name"]: t for t in rep.tensors}
    assert rows["a"]["cosine"] == 1.0 and not rows["a"]["crossed"]
    assert all(np.isnan(rows["b"][k]) for k in ("cosine", "sqnr_db", "rel_l2", "max_abs"))
    assert not rep.passed and {"cosine", "sqnr_db", "rel_l2"} <= {f.metric for f in rep.failures}
    assert np.isnan(rep.metrics["cosine"]) and rep.first_divergence == "b"
    assert any(n.startswith("b: no finite values to compare") for n in rep.notes)
    nan = np.full(5, np.nan)
    assert all(np.isnan(v) for v in M.tensor_metrics(nan, nan).values())
    # empty tensors are equal: zero drift (they failed the gate as unmeasured)
    assert M.tensor_metrics(np.zeros(0), np.zeros((0, 3))[:, 0]) == {"cosine": 1.0, "sqnr_db": np.inf,
                                                                      "rel_l2": 0.0, "max_abs": 0.0}


def test_data_dependent_integer_outputs_and_empty_outputs(tmp_path):
    """A NonZero output whose shape follows the data was refused (shapes differ); a sample whose shapes differ now
    counts all its elements as mismatched. An output empty in every sample compared with itself failed the gate."""
    from onnx import TensorProto, helper

    from edgert.eval import metrics as M
    from onnx_models import _model, ort_run

    def build(t):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                helper.make_tensor_value_info("idx", TensorProto.INT64, [2, "n"])]
        c = helper.make_tensor("c", TensorProto.FLOAT, [], [t])
        nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Greater", ["x", "c"], ["g"]),
                 helper.make_node("NonZero", ["g"], ["idx"])]
        return _model(nodes, [x], outs, [c])

    rng = np.random.default_rng(5)
    samples = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(4)]
    paths = {}
    for name, t in (("never", 99.0), ("some", 0.5), ("more", 0.0)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(build(t), paths[name])
    same = edgert.evaluate(paths["never"], paths["never"], data=samples, runs=1)
    assert same.passed and same.metrics["mismatch_pct"] == 0.0 and same.metrics["cosine"] == 1.0
    rep = edgert.evaluate(paths["some"], paths["more"], data=samples, runs=1)
    a = [ort_run(paths["some"], s)[1] for s in samples]
    b = [ort_run(paths["more"], s)[1] for s in samples]
    assert any(p.shape != q.shape for p, q in zip(a, b))
    differ = sum(max(p.size, q.size) if p.shape != q.shape else int((p != q).sum()) for p, q in zip(a, b))
    want = 100.0 * differ / sum(max(p.size, q.size) for p, q in zip(a, b))
    rows = {t["name"]: t for t in rep.tensors}
    assert rows["idx"]["mismatch_pct"] == pytest.approx(want) and rep.metrics["cosine"] == 1.0
    assert M.mismatch_fraction([np.zeros(0, np.int64)], [np.zeros(0, np.int64)]) == 0.0


def test_integer_and_bool_outputs_are_compared_exactly(tmp_path):
    """An int64 ArgMax and a bool output were left out of the comparison and the gate (an ArgMin candidate passed),
    and an integer-only model was refused. They are compared element by element: mismatch_pct, gated at 10."""
    from onnx import TensorProto, helper

    from onnx_models import ort_run

    def build(op):
        m = mlp(d_in=8, d_hidden=16, d_out=4)
        m.graph.node.extend([helper.make_node(op, ["y"], ["label"], axis=1, keepdims=0),
                             helper.make_node("Greater", ["h5", "y"], ["neg"])])
        m.graph.output.extend([helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                               helper.make_tensor_value_info("neg", TensorProto.BOOL, ["batch", 4])])
        return m

    ref, cand = tmp_path / "argmax.onnx", tmp_path / "argmin.onnx"
    onnx.save(build("ArgMax"), ref)
    onnx.save(build("ArgMin"), cand)
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((b, 8)).astype(np.float32)} for b in (4, 3, 5)]
    la = np.concatenate([ort_run(ref, s)[1] for s in samples])
    lb = np.concatenate([ort_run(cand, s)[1] for s in samples])
    want = 100.0 * np.mean(la != lb)
    assert want > 0
    rep = edgert.evaluate(ref, cand, data=samples, runs=1)
    rows = {t["name"]: t for t in rep.tensors}
    assert rows["label"]["mismatch_pct"] == pytest.approx(want) and rows["label"]["dtype"] == "int64"
    assert rows["neg"]["mismatch_pct"] == 0.0 and rows["neg"]["dtype"] == "bool"  # the same mask on both sides
    assert rep.metrics["mismatch_pct"] == pytest.approx(want) and rep.metrics["outputs_compared"] == 3
    assert not rep.passed and [f.metric for f in rep.failures] == ["mismatch_pct"]
    assert rep.first_divergence == "label" and "label" in rep.failures[0]
    js = json.loads(rep.to_json())
    assert {t["name"] for t in js["tensors"] if t["output"]} == {"y", "label", "neg"}
    same = edgert.evaluate(ref, ref, data=samples, runs=1)
    assert same.passed and same.metrics["mismatch_pct"] == 0.0
    # an integer-only model is compared too (it was refused: "no output could be compared")
    only = build("ArgMax")
    del only.graph.output[:]
    only.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]))
    onnx.save(only, tmp_path / "only.onnx")
    rep = edgert.evaluate(tmp_path / "only.onnx", tmp_path / "only.onnx", data=samples, runs=1)
    assert rep.passed and set(rep.metrics) >= {"mismatch_pct"} and "cosine" not in rep.metrics


def _ort_tensors(path, names, feeds):
    """Named tensors of a model on plain onnxruntime (listed as extra outputs, graph optimizations off)."""
    import onnxruntime as ort

    m = onnx.load(path)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds)))


def test_a_tensor_made_by_another_op_with_the_same_value_is_compared(tmp_path):
    """Gemm vs MatMul + Add keep h's value: h was left out (ops differ), so a changed weight was first seen at r."""
    from onnx import TensorProto as T, helper, numpy_helper

    from onnx_models import _model

    rng = np.random.default_rng(0)
    w, b, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((16, 32), (32,), (32, 10)))

    def build(nodes, w):
        inits = [numpy_helper.from_array(v, n) for v, n in ((w, "w"), (b, "b"), (w2, "w2"))]
        return _model(nodes + [helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])],
                      [helper.make_tensor_value_info("x", T.FLOAT, ["n", 16])],
                      [helper.make_tensor_value_info("y", T.FLOAT, ["n", 10])], inits)

    bad = w.copy()
    bad[3] += 5
    onnx.save(build([helper.make_node("Gemm", ["x", "w", "b"], ["h"])], w), tmp_path / "gemm.onnx")
    onnx.save(build([helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["h"])],
                    bad), tmp_path / "mm_add.onnx")
    rep = edgert.evaluate(tmp_path / "gemm.onnx", tmp_path / "mm_add.onnx", random=4, runs=1)
    assert [t["name"] for t in rep.tensors] == ["h", "r", "y"] and rep.first_divergence == "h" and not rep.notes


def test_honest_int8_static_candidate_has_no_false_first_divergence(tmp_path):
    """onnxruntime's QDQ quantizer fuses Relu into the Conv before it and names the Conv's output after the Relu's
    (r1): matched by name alone, a pre-activation tensor was compared with a post-activation one and named as the
    first divergence of an honest int8-static candidate."""
    from onnx_models import convnet

    cal = tmp_path / "cal"
    cal.mkdir()
    for i in range(8):
        np.save(cal / f"{i}.npy", np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32))
    ref, cand = tmp_path / "f32.onnx", tmp_path / "int8.onnx"
    onnx.save(convnet(), ref)
    quantize_onnx(ref, cand, "int8-static", calibration=cal)
    rep = edgert.evaluate(ref, cand, data=cal, runs=1)
    assert rep.passed and rep.first_divergence is None, rep.failures
    assert [t["name"] for t in rep.tensors] == ["p1", "c2", "g", "y"]
    assert any("r1 (Relu vs Conv)" in n for n in rep.notes)
    feeds = [{"x": np.load(cal / f"{i}.npy")} for i in range(8)]
    a = [_ort_tensors(ref, ["r1", "c2"], f) for f in feeds]
    b = [_ort_tensors(cand, ["r1", "c2"], f) for f in feeds]
    assert all((s["r1"] >= 0).all() for s in a) and any((s["r1"] < 0).any() for s in b)  # pre- vs post-activation
    ra = np.concatenate([s["c2"].ravel() for s in a]).astype(np.float64)
    rb = np.concatenate([s["c2"].ravel() for s in b]).astype(np.float64)
    c2 = next(t for t in rep.tensors if t["name"] == "c2")
    assert c2["sqnr_db"] == pytest.approx(10 * np.log10((ra @ ra) / ((rb - ra) @ (rb - ra))), rel=1e-4)


def test_int4_candidate_intermediates_run_through_the_session(models, tmp_path):
    """onnx's shape inference cannot see through com.microsoft's MatMulNBits, so the intermediates added as outputs
    had no shape, onnx.checker (and so the Session) refused the model, and they were read on plain onnxruntime."""
    from edgert.eval import graph

    _, ref, _, _ = models
    int4 = tmp_path / "mlp_int4.onnx"
    quantize_onnx(ref, int4, "int4")
    aug = graph._with_outputs(onnx.load(int4), ["h1", "h4", "h5"])
    onnx.checker.check_model(aug)
    assert [(o.name, o.type.tensor_type.elem_type, len(o.type.tensor_type.shape.dim)) for o in aug.graph.output[1:]] \
        == [("h1", onnx.TensorProto.FLOAT, 2), ("h4", onnx.TensorProto.FLOAT, 2), ("h5", onnx.TensorProto.FLOAT, 2)]
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(3)]
    rep = edgert.evaluate(ref, int4, data=samples, runs=1)
    assert not any("plain onnxruntime" in n for n in rep.notes), rep.notes
    assert [t["name"] for t in rep.tensors] == ["h1", "h2", "h3", "h4", "h5", "y"]
    a = [_ort_tensors(ref, ["h1", "h4"], s) for s in samples]
    b = [_ort_tensors(int4, ["h1", "h4"], s) for s in samples]
    for name in ("h1", "h4"):
        ra = np.concatenate([s[name].ravel() for s in a]).astype(np.float64)
        rb = np.concatenate([s[name].ravel() for s in b]).astype(np.float64)
        row = next(t for t in rep.tensors if t["name"] == name)
        assert row["sqnr_db"] == pytest.approx(10 * np.log10((ra @ ra) / ((rb - ra) @ (rb - ra))), rel=1e-3)


def test_plot_format_is_checked_first_and_minus_inf_is_drawn_at_the_floor(models, tmp_path, capsys, monkeypatch):
    """--plot out.xyz was a matplotlib ValueError traceback after the whole evaluation; a -inf SQNR drew no bar, so
    a first divergence there had no red bar."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    from edgert import eval as ev

    _, ref, _, _ = models
    ran = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: ran.append(a))
    capsys.readouterr()
    argv = ["eval", "--reference", str(ref), "--candidate", str(ref), "-q", "--plot", str(tmp_path / "d.xyz")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgert: error: cannot write the plot") and "no .xyz format" in err and "png" in err
    assert ran == []  # refused before the evaluation
    monkeypatch.undo()

    nan_w = mlp(d_in=64, d_hidden=128, d_out=10)
    for init in nan_w.graph.initializer:
        if init.name == "w2":  # h4 on: NaN on the candidate's side only, so SQNR -inf
            a = numpy_helper.to_array(init).copy()
            a[5, 3] = np.nan
            init.CopyFrom(numpy_helper.from_array(a, "w2"))
    cand = tmp_path / "nan.onnx"
    onnx.save(nan_w, cand)
    rep = edgert.evaluate(ref, cand, random=2, runs=1)
    assert rep.first_divergence == "h4"
    with pytest.raises(edgert.InvalidArgumentError, match="no .xyz format"):
        rep.plot(tmp_path / "d.xyz")
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    rep.plot(tmp_path / "d.png")
    ax = figs[0].axes[0]
    floor = ax.get_ylim()[0]
    heights = {r["name"]: b.get_height() for r, b in zip(rep.tensors, ax.patches)}
    colors = {r["name"]: to_hex(b.get_facecolor()) for r, b in zip(rep.tensors, ax.patches)}
    for r in rep.tensors:
        want = 120.0 if r["sqnr_db"] == np.inf else floor if r["sqnr_db"] == -np.inf else r["sqnr_db"]
        assert heights[r["name"]] == pytest.approx(want)
    assert np.isfinite(floor) and floor < 0 and heights["h4"] == floor and colors["h4"] == to_hex("tab:red")
    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(ValueError("no such format")))
    with pytest.raises(edgert.InvalidArgumentError, match="cannot write the plot .*no such format"):
        rep.plot(tmp_path / "e.png")


def test_flags_for_language_models_or_two_sample_sources_are_refused(models, tmp_path, capsys):
    """--threshold kl_mean=..., --ctx and --chunks on a graph eval, and --inputs with --random or --seed, were
    silently ignored (the eval ran on the directory's samples)."""
    _, ref, i8, _ = models
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    np.save(inputs / "0.npy", np.zeros((1, 64), np.float32))
    base = ["eval", "--reference", str(ref), "--candidate", str(i8), "-q"]
    for extra, needle in ((["--threshold", "kl_mean=0"], "--threshold kl_mean is a language-model threshold; a graph "
                                                          "evaluation takes cosine"),
                          (["--ctx", "7", "--chunks", "3"], "--ctx, --chunks are for language models (.gguf)"),
                          (["--inputs", str(inputs), "--random", "50"], "--inputs DIR and --random N are alternatives"),
                          (["--inputs", str(inputs), "--seed", "9"], "--inputs DIR and --seed S are alternatives")):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("edgert: error: ") and needle in err, err
    for kw, needle in (({"ctx": 64}, "ctx is for language models"), ({"chunks": 2}, "chunks is for language models"),
                       ({"data": inputs, "random": 3}, "data and random are alternatives")):
        with pytest.raises(edgert.InvalidArgumentError, match=needle):
            edgert.evaluate(ref, i8, **kw)
