"""The edgert command, run as a user runs it (a subprocess) on a tiny model."""
import json
import shutil
from pathlib import Path
import subprocess

import pytest

from cli_run import edgert_cmd, edgert_popen
from llama_tiny import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_tiny_llama(path, fmt="q8_0", ctx=512)
    return path


def test_generate_json(tiny_path):
    r = edgert_cmd("generate", str(tiny_path), "-p", "the hat", "-n", "6", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "tokens", "timings", "finish_reason"}
    assert 1 <= len(out["tokens"]) <= 6
    assert {"load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"} <= set(out["timings"])
    again = json.loads(edgert_cmd("generate", str(tiny_path), "-p", "the hat", "-n", "6", "--temperature", "0",
                                  "--json").stdout)
    assert again["tokens"] == out["tokens"]


def test_generate_streams_text_and_stats(tiny_path):
    r = edgert_cmd("generate", str(tiny_path), "-p", "the", "-n", "5", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stderr and "tok/s" in r.stderr


def test_chat_session_with_reset_and_exit(tiny_path):
    r = edgert_cmd("chat", str(tiny_path), "-n", "4", "--temperature", "0", input="hello\n/reset\nthe hat\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("generated tokens") == 2  # a stats line after each answer
    assert "[conversation cleared]" in r.stderr


def test_chat_past_the_context_points_at_reset_and_goes_on(tiny_path):
    r = edgert_cmd("chat", str(tiny_path), "-n", "4", "--temperature", "0", "--n-ctx", "32",
                   input="the hat " * 40 + "\n/reset\nhi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "--n-ctx is 32" in r.stderr and "type /reset to start a new conversation" in r.stderr
    assert r.stderr.count("generated tokens") == 1  # the turn after /reset was answered


def test_chat_with_a_template_of_ones_own_across_turns(tiny_path, tmp_path):
    """--chat-template FILE: a template that drops the <think> part of past answers chats across turns (it was
    refused at the second turn, with advice no command could follow)."""
    from test_llm import THINK_CHATML

    template = tmp_path / "think.jinja"
    template.write_text(THINK_CHATML, encoding="utf-8")
    r = edgert_cmd("chat", str(tiny_path), "-n", "4", "--temperature", "0", "--stop", "\n", "--chat-template",
                   str(template), input="hello\nthe hat\nmore\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("generated tokens") == 3 and "error" not in r.stderr, r.stderr
    r = edgert_cmd("generate", str(tiny_path), "-p", "hi", "--chat-template", str(tmp_path / "missing.jinja"))
    assert r.returncode == 1 and r.stderr.startswith("edgert: error: --chat-template ") and \
        r.stderr.count("\n") == 1, r.stderr


def test_chat_ends_on_eof(tiny_path):
    r = edgert_cmd("chat", str(tiny_path), "-n", "2", input="hello\n")
    assert r.returncode == 0, r.stderr


def test_models_lists_cache(tmp_path, tiny_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_path, models / "tiny.gguf")
    r = edgert_cmd("models", "--json", env={"EDGERT_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["tiny"]
    assert rows[0]["architecture"] == "llama" and rows[0]["context_length"] == 512
    r = edgert_cmd("models", env={"EDGERT_HOME": str(tmp_path)})
    assert "tiny" in r.stdout and "Q8_0" in r.stdout


def test_errors_are_one_line_not_tracebacks(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    r = edgert_cmd("generate", str(bad), "-p", "x")
    assert r.returncode == 1
    assert r.stderr.startswith("edgert: error:") and "Traceback" not in r.stderr
    r = edgert_cmd("generate", "no-such-model", "-p", "x", env={"EDGERT_HOME": str(tmp_path)})
    assert r.returncode == 1 and "smollm2-135m" in r.stderr


def test_info_reports_isa():
    r = edgert_cmd("info", "--json")
    info = json.loads(r.stdout)
    assert info["isa"] in info["isas"] and info["threads"] >= 1


@pytest.mark.model
def test_ctrl_c_stops_an_answer_but_not_the_chat(smollm2_path):
    import signal
    import time

    p = edgert_popen("chat", str(smollm2_path), "-n", "1500", "--n-ctx", "2048", "--temperature", "0.9", "--seed", "1",
                     "--no-telemetry", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env={"PYTHONUNBUFFERED": "1"},
                     # Ctrl-C as a terminal delivers it: a runner started in the background (`cmd &`) hands SIGINT on
                     # ignored, and Python then installs no KeyboardInterrupt handler (the test failed that way)
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        p.stdin.write("Write a very long story about a dragon.\n")
        p.stdin.flush()
        first = p.stdout.read(20)  # the answer is streaming
        assert first
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        p.stdin.write("/exit\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "[stopped]" in err


def test_models_table_says_which_files_are_unreadable(tmp_path, tiny_path, capsys, monkeypatch):
    from edgert.cli import main

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_path, models / "tiny.gguf")
    (models / "part.gguf").write_bytes(Path(tiny_path).read_bytes()[:1000])  # a partial copy
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path))
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    part = next(line for line in lines if line.startswith("part "))
    assert "unreadable:" in part  # was a row of None, None and no reason
    assert "unreadable" not in next(line for line in lines if line.startswith("tiny "))


def test_graph_commands_bad_output_paths_are_one_line_errors(tmp_path, capsys, no_telemetry):
    import numpy as np
    import onnx

    from edgert.cli import main
    from onnx_models import mlp

    model, x, afile = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "afile"
    onnx.save(mlp(), model)
    np.save(x, np.ones((2, 8), np.float32))
    npz = tmp_path / "z.npz"
    np.savez(npz, x=np.ones((2, 8), np.float32))
    afile.write_text("x")
    empty, badzip, text = tmp_path / "empty.npy", tmp_path / "bad.npy", tmp_path / "text.npy"
    empty.write_bytes(b"")
    badzip.write_bytes(b"PK\x03\x04garbage")
    text.write_text("1 2 3")
    cases = [  # were FileNotFoundError / FileExistsError tracebacks, and a repeated --input was taken silently
        (["plan", str(model), "--dot", str(tmp_path / "no" / "g.dot")], "--dot"),
        (["plan", str(model), "--svg", str(tmp_path / "no" / "g.svg")], "--svg"),
        (["run", str(model), "--input", f"x={x}", "--output", str(afile)], "--output"),
        (["run", str(model), "--input", f"x={x}", "--input", f"x={x}"], "given twice"),
        (["plan", str(model), "--dim", "batch=2", "--dim", "batch=3"], "given twice"),
        # was "ONNX model ... is malformed: ValueError: Value out of range"
        (["plan", str(model), "--dim", "batch=99999999999999999999999"], "dim 'batch' must be bound to at most"),
        (["run", str(model), "--input", f"x={npz}"], ".npz archive"),  # was 'expected rank 2, got shape (1,)'
        # were EOFError and BadZipFile tracebacks, and numpy's "contains pickled (object) data" for a text file
        (["run", str(model), "--input", f"x={empty}"], "empty.npy: not a readable .npy array file (the file is empty)"),
        (["run", str(model), "--input", f"x={badzip}"], "bad.npy: not a readable .npy array file (BadZipFile"),
        (["run", str(model), "--input", f"x={text}"], "text.npy: not a readable .npy array file (no NumPy header)"),
    ]
    for argv, match in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("edgert: error: ") and match in err and err.count("\n") == 1, (argv, err)


@pytest.mark.parametrize("threads", ["99999999999", "0", "257"])
def test_bad_threads_option_is_one_error_line(tiny_path, threads):
    """--threads 99999999999 used to be accepted by LLM and end in an OverflowError traceback from the C call."""
    r = edgert_cmd("generate", str(tiny_path), "-p", "the", "-n", "2", "--threads", threads)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == f"edgert: error: --threads must be an int in [1, 256], got {threads}\n"


@pytest.mark.parametrize("argv, message", [
    (["-n", "-1"], "edgert: error: --max-tokens must be a positive int, got -1\n"),
    (["--n-ctx", "0"], "edgert: error: --n-ctx must be an int >= 2, got 0\n"),
    (["--top-k", "-1"], "edgert: error: --top-k must be an int >= 0 (0 turns it off), got -1\n"),
    (["--top-p", "1.5"], "edgert: error: --top-p must be in [0.0, 1.0], got 1.5\n"),
    (["--repeat-penalty", "0"], "edgert: error: --repeat-penalty must be in (0.0, 100.0], got 0.0\n"),
    (["--seed", "-1"], "edgert: error: --seed must be an int >= 0, got -1\n"),
])
def test_llm_option_errors_name_the_flags(tiny_path, argv, message):
    """The messages come from the Python API (max_tokens=..., n_ctx=...): the command names its own flags."""
    r = edgert_cmd("generate", str(tiny_path), "-p", "the", *argv)
    assert (r.returncode, r.stderr) == (1, message)


def test_n_ctx_past_the_model_warns_with_the_flag(tiny_path):
    r = edgert_cmd("generate", str(tiny_path), "-p", "the", "-n", "2", "--n-ctx", "100000", "--top-p", "0",
                   "--min-p", "1", "--temperature", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "edgert: warning: --n-ctx 100000 exceeds the model's context length; using 512\n"
    greedy = edgert_cmd("generate", str(tiny_path), "-p", "the", "-n", "2", "--temperature", "0", "--json")
    assert json.loads(r.stdout)["tokens"] == json.loads(greedy.stdout)["tokens"]  # top_p 0: greedy's choice


@pytest.mark.parametrize("env", [{"EDGERT_ISA": "bogus"}, {"EDGERT_THREADS": "0"}, {"EDGERT_THREADS": "abc"},
                                 {"EDGERT_THREADS": "99999999999"}, {"EDGERT_THREADS": "257"}])
def test_bad_environment_is_one_error_line(env):
    """The environment is read when edgert is imported, before main() runs: still one line and exit 1."""
    r = edgert_cmd("info", env=env)
    assert r.returncode == 1 and r.stderr.startswith("edgert: error: EDGERT_") and "Traceback" not in r.stderr, r.stderr


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`edgert plan m.onnx | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(200)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("t200", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    p = edgert_popen("plan", str(path), "--device", "imx8mp", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the plan is written (the command takes a while to start)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err  # the handled exit, not a crash or a clean exit that never wrote
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_run_output_names_that_share_a_file_name_get_distinct_files(tmp_path, capsys, no_telemetry):
    """Outputs 'a/b' and 'a_b' were both written to DIR/a_b.npy: the second silently replaced the first."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T, helper

    from edgert.cli import main
    from onnx_models import ort_run

    outs = [("a/b", "Relu"), ("a_b", "Neg"), ("a:b", "Abs"), ("A_B", "Sigmoid"), ("a_b~2", "Identity")]
    g = helper.make_graph([helper.make_node(op, ["x"], [name]) for name, op in outs], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info(name, T.FLOAT, [2, 3]) for name, _ in outs])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path, xfile, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "out"
    onnx.save(model, path)
    x = np.array([[-1.5, 0.0, 2.0], [3.0, -4.0, 0.25]], np.float32)
    np.save(xfile, x)
    assert main(["run", str(path), "--input", f"x={xfile}", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # names that need no change claim their file first ('a_b', 'a_b~2'; 'A_B' would share a_b.npy on a
    # case-insensitive file system); the rest get the next ~N no other output's file name uses
    files = {"a/b": "a_b~4.npy", "a_b": "a_b.npy", "a:b": "a_b~5.npy", "A_B": "A_B~3.npy", "a_b~2": "a_b~2.npy"}
    assert [line.split(" -> ")[1] for line in lines] == [str(out / files[name]) for name, _ in outs]
    assert sorted(p.name for p in out.iterdir()) == sorted(files.values())
    for (name, _), ref in zip(outs, ort_run(model, {"x": x})):
        np.testing.assert_array_equal(np.load(out / files[name]), ref)


def test_run_messages_name_the_commands_flags(tmp_path, capsys, no_telemetry):
    """A missing device said "Run with emulate=True ... or fallback='allow'" (the Python API's spelling), and its
    fall-back warning was a Python warning line pointing into edgert."""
    import numpy as np
    import onnx

    from edgert.cli import main
    from onnx_models import mlp, ort_run
    from test_session import TOY_NPU

    model, x, prof, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "toy.toml", tmp_path / "out"
    onnx.save(mlp(), model)
    np.save(x, np.ones((2, 8), np.float32))
    prof.write_text(TOY_NPU.replace('ops = ["MatMul", "Add"]', 'ops = ["MatMul", "Add", "Relu"]'))
    assert main(["run", str(model), "--device", str(prof), "--fallback", "forbid", "--input", f"x={x}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgert: error: device 'toy-npu' is not present") and err.count("\n") == 1, err
    assert "Run with --emulate to check" in err and "or --fallback allow to run" in err and "=" not in err
    assert main(["run", str(model), "--device", str(prof), "--input", f"x={x}", "--output", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("edgert: warning: device 'toy-npu' is not present") and err[0].endswith(
        "Use --emulate to emulate the device."), err
    np.testing.assert_array_equal(np.load(out / "y.npy"), ort_run(mlp(), {"x": np.ones((2, 8), np.float32)})[0])




def test_run_dim_binds_a_symbolic_dim_for_a_static_shape_device(tmp_path, capsys, no_telemetry):
    """`edgert run` had no --dim: with --fallback forbid a static-shape device refused a model with a symbolic batch
    dim although the input file fixes it (`edgert plan` and Session(dims=) could bind it)."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper

    from edgert.cli import main
    from onnx_models import ort_run
    from test_session import TOY_NPU

    w = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, ["B", 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["B", 4])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path, xfile, prof, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "npu.toml", tmp_path / "out"
    onnx.save(model, path)
    # test_session's toy NPU, present (onnxruntime's CPU provider drives it) and needing static shapes
    prof.write_text(TOY_NPU.replace("ToyNPUExecutionProvider", "CPUExecutionProvider")
                    .replace('ops = ["MatMul", "Add"]', 'ops = ["MatMul", "Relu"]\nstatic_shapes = true'))
    x = np.random.default_rng(6).standard_normal((3, 8)).astype(np.float32)
    np.save(xfile, x)
    args = ["run", str(path), "--device", str(prof), "--fallback", "forbid", "--input", f"x={xfile}", "--output",
            str(out)]
    for dim in ([], ["--dim", "B=3"]):  # unbound, the dims bind from the input at the first run, as with --emulate
        assert main(args + dim) == 0, capsys.readouterr().err
        assert "1 partition(s)" in capsys.readouterr().err  # all on the npu
        np.testing.assert_allclose(np.load(out / "y.npy"), ort_run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)
    for bad in ("B=x", "B=-1", "B=\u00b2"):  # '²' passed isdigit() and then int() raised: a traceback
        assert main(args + ["--dim", bad]) == 1 and "--dim expects NAME=VALUE" in capsys.readouterr().err
    np.save(xfile, x[:0])  # an empty batch, as Session(dims={"B": 0}) and onnxruntime take it
    assert main(args + ["--dim", "B=0"]) == 0, capsys.readouterr().err
    assert np.load(out / "y.npy").shape == ort_run(model, {"x": x[:0]})[0].shape == (0, 4)


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_no_model_argument_takes_the_default_by_name_not_a_path_in_the_cwd(tiny_path, tmp_path, monkeypatch, capsys,
                                                                          no_telemetry, kind):
    """`edgert generate` with no MODEL, run where a directory (or file) is named like the default model, failed
    ('smollm2-135m is a directory, not a model file') or loaded that file: the default resolves by name now."""
    from edgert.cli import main
    from edgert.llm import store

    home = tmp_path / "home"
    monkeypatch.setenv("EDGERT_HOME", str(home))
    km = store.KNOWN_MODELS["smollm2-135m"]
    monkeypatch.setitem(store.KNOWN_MODELS, "smollm2-135m", store.KnownModel(**{**km.__dict__, "size_bytes": None}))
    (home / "models").mkdir(parents=True)
    shutil.copy(tiny_path, home / "models" / km.filename)  # the default model, cached
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if kind == "directory":
        (cwd / "smollm2-135m").mkdir()
    else:
        (cwd / "smollm2-135m").write_bytes(b"not a model")
    monkeypatch.chdir(cwd)
    assert main(["generate", "-p", "the", "-n", "2", "--temperature", "0", "--json", "--n-ctx", "64"]) == 0, \
        capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["tokens"]
    if kind == "directory":  # named explicitly, a directory that is also a known name is the known model
        assert main(["generate", "smollm2-135m", "-p", "the", "-n", "2", "--json", "--n-ctx", "64"]) == 0
        capsys.readouterr()
    else:  # an explicit existing file is loaded, and refused here for what it is
        assert main(["generate", "smollm2-135m", "-p", "the", "-n", "2", "--n-ctx", "64"]) == 1
        assert "edgert: error:" in capsys.readouterr().err


def test_cli_spelling_leaves_the_eval_side_syntax_alone():
    """edgert eval's side syntax is MODEL@threads=N; the LLM flags' rewrite turned it into '@--threads N' (a syntax
    that does not exist) in every eval error, even in the user's own spec."""
    from edgert.cli import cli_spelling

    assert cli_spelling("give a path, optionally with @DEVICE or @threads=N") == \
        "give a path, optionally with @DEVICE or @threads=N"
    assert cli_spelling("big.onnx@foo=1: unknown option 'foo' after '@' (expected DEVICE, device=NAME or threads=N)") \
        .endswith("(expected DEVICE, device=NAME or threads=N)")
    assert cli_spelling("n_ctx=100000 exceeds 8192; threads must be an int in [1, 256] or None, got 0") == \
        "--n-ctx 100000 exceeds 8192; --threads must be an int in [1, 256], got 0"
