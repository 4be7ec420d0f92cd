"""Re-quantized GGUF files (metadata, tokenizer, tensor types, bytes, logits) and ONNX quantization modes."""
import numpy as np
import pytest

import gguf

import edgert
from edgert.cli import main
from edgert.formats.gguf import open_gguf
from edgert.quantize_model import quantize_gguf
from llama_tiny import write_tiny_llama

IDS = [5, 70, 200, 33, 101, 9, 250, 17, 64, 128, 3, 99]


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    p = tmp_path_factory.mktemp("requant") / "f32.gguf"
    write_tiny_llama(p, fmt="f32", embd_fmt="f32", seed=3)
    return p


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_requantized_gguf_round_trips(f32, tmp_path, fmt):
    out = tmp_path / f"{fmt}.gguf"
    summary = quantize_gguf(f32, out, fmt)
    src, dst = gguf.GGUFReader(str(f32)), gguf.GGUFReader(str(out))
    # every metadata key and the tokenizer survive; only the file type changes
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        got = dst.fields[key].contents()
        assert got == field.contents(), key
    assert dst.fields["general.file_type"].contents() == {"q8_0": 7, "q4_0": 2, "q4_1": 3}[fmt]
    types = {t.name: t.tensor_type.name for t in dst.tensors}
    assert types["output_norm.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == fmt.upper() and types["token_embd.weight"] == fmt.upper()
    assert summary["requantized"] == sum(1 for t in types.values() if t != "F32")
    # the bytes equal edgert.quantize of the source in memory, and so do the logits
    g_src, g_dst = open_gguf(f32), open_gguf(out)
    for name in ("blk.0.attn_q.weight", "token_embd.weight"):
        mem = edgert.quantize(np.ascontiguousarray(g_src.tensor_array(name), dtype=np.float32), fmt)
        assert np.array_equal(g_dst.tensor_bytes(name).reshape(mem.raw.shape), mem.raw)
    g_src.close()
    g_dst.close()
    if fmt == "q4_0":  # write_tiny_llama quantizes the same float weights with gguf's own quantizer
        ref = tmp_path / "direct.gguf"
        write_tiny_llama(ref, fmt="q4_0", embd_fmt="q4_0", seed=3)
        a = edgert.LLM(str(out), n_ctx=32, progress=False).logits(IDS)
        b = edgert.LLM(str(ref), n_ctx=32, progress=False).logits(IDS)
        assert np.array_equal(a, b)


def test_requantize_from_quantized_and_keep_embeddings(tmp_path):
    src = tmp_path / "q8.gguf"
    write_tiny_llama(src, fmt="q8_0", embd_fmt="q8_0", seed=4)
    out = tmp_path / "q4_1.gguf"
    quantize_gguf(src, out, "q4_1", keep_embeddings=True)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q4_1"
    g_src, g_dst = open_gguf(src), open_gguf(out)
    assert np.array_equal(g_src.tensor_bytes("token_embd.weight"), g_dst.tensor_bytes("token_embd.weight"))
    mem = edgert.quantize(g_src.qtensor("blk.0.ffn_up.weight").dequantize(), "q4_1")
    assert np.array_equal(g_dst.qtensor("blk.0.ffn_up.weight").raw, mem.raw)
    g_src.close()
    g_dst.close()
    llm = edgert.LLM(str(out), n_ctx=32, progress=False)
    assert np.isfinite(llm.logits(IDS)).all()


def test_cli_quantize_gguf_and_errors(f32, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["quantize", str(f32), str(out), "q8_0", "-q"]) == 0
    assert "re-quantized to q8_0" in capsys.readouterr().out
    assert main(["quantize", str(f32), str(out), "int4"]) == 1
    assert "quantizes to q8_0" in capsys.readouterr().err
    assert main(["quantize", str(f32), str(f32), "q4_0"]) == 1
    # without -q, stdout piped: it holds the one summary line (the progress bar's blank line came first), the bar
    # goes to stderr and only to a terminal
    from cli_run import edgert_cmd

    r = edgert_cmd("quantize", str(f32), str(tmp_path / "piped.gguf"), "q4_0")
    assert r.returncode == 0 and r.stdout.startswith(str(tmp_path / "piped.gguf") + ": ") and r.stderr == ""


def test_onnx_modes(tmp_path, capsys):
    import onnx
    from onnx_models import convnet, mlp

    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(batch=1, d_in=64, d_hidden=64, d_out=8), src)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.savez(calib / f"s{i}.npz", x=rng.standard_normal((1, 64)).astype(np.float32))
    assert main(["quantize", str(src), str(tmp_path / "dyn.onnx"), "int8-dynamic", "-q"]) == 0
    assert main(["quantize", str(src), "-o", str(tmp_path / "st.onnx"), "--to", "int8-static",
                 "--calibration", str(calib), "-q"]) == 0
    ops = {n.op_type for n in onnx.load(tmp_path / "dyn.onnx").graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(tmp_path / "st.onnx").graph.node}
    assert main(["quantize", str(src), str(tmp_path / "st2.onnx"), "int8-static"]) == 1  # no calibration
    # int4 goes through onnxruntime's MatMulNBits quantizer, which needs onnx-ir (in the test extra)
    assert main(["quantize", str(src), str(tmp_path / "i4.onnx"), "int4", "-q"]) == 0
    assert "MatMulNBits" in {n.op_type for n in onnx.load(tmp_path / "i4.onnx").graph.node}
    assert "nothing was quantized" not in capsys.readouterr().err
    # a model int4 finds nothing in (no MatMul): it was reported written, the same model, without a word
    onnx.save(convnet(), tmp_path / "cnn.onnx")
    assert main(["quantize", str(tmp_path / "cnn.onnx"), str(tmp_path / "cnn4.onnx"), "int4", "-q"]) == 0
    assert "warning: nothing was quantized: int4 found no op it takes" in capsys.readouterr().err


def test_cli_quantize_bad_paths_are_one_line_errors(f32, tmp_path, capsys):
    import onnx

    from onnx_models import mlp

    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    garbage_gguf, garbage_onnx = tmp_path / "g.gguf", tmp_path / "g.onnx"
    garbage_gguf.write_bytes(b"GGUF" + b"\xff" * 100)
    garbage_onnx.write_bytes(b"\x08garbage" * 10)
    cases = [  # were FileNotFoundError, ValueError (gguf's reader) and onnx's ValidationError tracebacks
        ([str(tmp_path / "none.gguf"), str(tmp_path / "o.gguf"), "q8_0"], f"'{tmp_path / 'none.gguf'}' does not exist"),
        ([str(garbage_gguf), str(tmp_path / "o.gguf"), "q8_0"], "GGUF version"),
        ([str(f32), str(tmp_path / "nodir" / "o.gguf"), "q8_0"], "does not exist"),
        ([str(tmp_path / "none.onnx"), str(tmp_path / "o.onnx"), "int8-dynamic"], "does not exist"),
        ([str(garbage_onnx), str(tmp_path / "o.onnx"), "int8-dynamic"], "could not be parsed"),
        ([str(model), str(tmp_path / "nodir" / "o.onnx"), "int8-dynamic"], "does not exist"),
        ([str(model), str(model), "int8-dynamic"], "is the input file"),  # was overwritten in place
    ]
    before = model.read_bytes()
    for argv, match in cases:
        assert main(["quantize", *argv]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("edgert: error: ") and match in err and err.count("\n") == 1, (argv, err)
    assert model.read_bytes() == before and not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("sample, match", [(np.ones((2, 8)), "is float64, the model takes float32"),
                                           (np.ones((2, 7), np.float32), "has shape (2, 7)")])
def test_int8_static_calibration_samples_of_the_wrong_dtype_or_shape(tmp_path, sample, match):
    import onnx

    from edgert.quantize_model import quantize_onnx
    from onnx_models import mlp

    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    cal = tmp_path / "cal"
    cal.mkdir()
    np.save(cal / "a.npy", sample)
    with pytest.raises(edgert.errors.EdgertError, match=match.replace("(", r"\(").replace(")", r"\)")):
        quantize_onnx(model, tmp_path / "o.onnx", "int8-static", calibration=cal)  # was onnxruntime's exception


def test_output_that_is_a_link_to_the_input_is_refused(f32, tmp_path):
    import onnx

    from edgert.errors import InvalidArgumentError
    from edgert.quantize_model import quantize_onnx
    from onnx_models import mlp

    before = f32.read_bytes()
    link = tmp_path / "link.gguf"
    link.symlink_to(f32)
    with pytest.raises(InvalidArgumentError, match="is the input file"):
        quantize_gguf(f32, link, "q4_0")  # the writer truncated the file being read through the link
    assert f32.read_bytes() == before
    model, hard = tmp_path / "m.onnx", tmp_path / "hard.onnx"
    onnx.save(mlp(), model)
    hard.hardlink_to(model)
    with pytest.raises(InvalidArgumentError, match="is the input file"):
        quantize_onnx(model, hard, "int8-dynamic")


def test_a_failed_write_leaves_no_output_and_no_partial_file(f32, tmp_path, monkeypatch, capsys):
    """A write that fails half way (here: the disk fills while the tensors are written) leaves neither a partial
    model under the output name nor the temporary file, and is one edgert error; an earlier good output stays."""
    dst = tmp_path / "out.gguf"
    quantize_gguf(f32, dst, "q8_0")
    good = dst.read_bytes()

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(edgert.EdgertError, match="No space left"):
        quantize_gguf(f32, dst, "q4_0")
    assert dst.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    fresh = tmp_path / "fresh.gguf"
    assert main(["quantize", str(f32), str(fresh), "q4_0", "-q"]) == 1
    assert "No space left" in capsys.readouterr().err and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_flags_for_another_target_are_refused(f32, tmp_path, capsys):
    """--calibration on a GGUF (or int8-dynamic/int4) quantization and --keep-embeddings on an ONNX one were
    silently ignored."""
    import onnx

    from onnx_models import mlp

    cal = tmp_path / "cal"
    cal.mkdir()
    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    for argv, needle in (([str(f32), str(tmp_path / "o.gguf"), "q4_0", "--calibration", str(cal)],
                          "--calibration is for int8-static (ONNX); q4_0 takes no calibration samples"),
                         ([str(model), str(tmp_path / "o.onnx"), "int4", "--calibration", str(cal)],
                          "--calibration is for int8-static (ONNX); int4 takes"),
                         ([str(model), str(tmp_path / "o.onnx"), "int8-dynamic", "--keep-embeddings"],
                          "--keep-embeddings is for GGUF models")):
        capsys.readouterr()
        assert main(["quantize", *argv, "-q"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("edgert: error: ") and needle in err, err
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "o.onnx").exists()
    with pytest.raises(edgert.InvalidArgumentError, match="calibration samples are for int8-static"):
        edgert.quantize_model.quantize_onnx(model, tmp_path / "o.onnx", "int8-dynamic", calibration=cal)


def test_an_unsupported_type_is_named_not_taken_for_the_output(f32, tmp_path, capsys, monkeypatch):
    """`edgert quantize m.gguf q5_k` took q5_k for the output and asked for the target type; an ONNX model's
    message said "a ONNX model"."""
    import onnx

    from edgert.quantize_model import GGUF_TARGETS, ONNX_TARGETS
    from onnx_models import mlp

    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    monkeypatch.chdir(tmp_path)
    for argv, want in (([str(f32), "q5_k"], f"'q5_k' is not a supported type: a GGUF model quantizes to "
                                            f"{', '.join(GGUF_TARGETS)}"),
                       ([str(f32), "out.gguf", "q5_k"], "'q5_k' is not a supported type: a GGUF"),
                       ([str(model), "out.onnx", "--to", "q4_0"], f"'q4_0' is not a supported type: an ONNX model "
                                                                  f"quantizes to {', '.join(ONNX_TARGETS)}")):
        capsys.readouterr()
        assert main(["quantize", *argv, "-q"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("edgert: error: ") and want in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _float16_mlp():
    """x [batch, 64] float16 -> MatMul -> Relu -> MatMul -> y [batch, 8], float16 weights."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float16), "w1"),
             numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float16), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "f16", [helper.make_tensor_value_info("x", T.FLOAT16, ["batch", 64])],
                          [helper.make_tensor_value_info("y", T.FLOAT16, ["batch", 8])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_quantized_model_onnxruntime_cannot_load_is_an_error_and_not_written(tmp_path, capsys):
    """onnxruntime.quantization's int8 modes write an invalid model for a float16 model (DynamicQuantizeLinear /
    QuantizeLinear fed float16: onnxruntime's INVALID_GRAPH), which edgert reported as written, exit 0. The written
    model is now loaded in onnxruntime first: exit 1 (as quantize's other errors), one error line naming the cause,
    no output left. int4 works on the same model."""
    import onnx
    import onnxruntime as ort

    src = tmp_path / "f16.onnx"
    onnx.save(_float16_mlp(), src)
    cal = tmp_path / "cal"
    cal.mkdir()
    for i in range(4):
        np.save(cal / f"s{i}.npy", np.random.default_rng(i).standard_normal((2, 64)).astype(np.float16))
    for mode, extra in (("int8-dynamic", []), ("int8-static", ["--calibration", str(cal)])):
        dst = tmp_path / f"{mode}.onnx"
        capsys.readouterr()
        assert main(["quantize", str(src), str(dst), mode, "-q", *extra]) == 1, mode
        captured = capsys.readouterr()
        err = captured.err
        assert err.startswith("edgert: error: ") and err.count("\n") == 1, err
        assert "onnxruntime cannot load" in err and "float16" in err and "float32" in err, err
        assert captured.out == "" and not dst.exists()
        with pytest.raises(edgert.ModelFormatError, match="float16"):
            edgert.quantize_model.quantize_onnx(src, dst, mode, calibration=cal if extra else None)
        assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal", "f16.onnx"]
    dst = tmp_path / "i4.onnx"
    assert main(["quantize", str(src), str(dst), "int4", "-q"]) == 0
    s = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert s.run(None, {"x": np.ones((2, 64), np.float16)})[0].shape == (2, 8)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(dst).graph.node}
