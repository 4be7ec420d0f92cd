"""edgert.eval on tiny random llama GGUFs: F32 vs its q4_0 re-quantization, a scrambled layer, identical models,
thread counts, the CLI gate, JSON schema and PNG."""
import json
import math
import random

import numpy as np
import pytest

import gguf

import edgert
from edgert.cli import main
from edgert.eval import metrics as M
from edgert.quantize_model import quantize_gguf
from llama_tiny import write_tiny_llama

CTX = 64
LOOSE = {"ppl_delta_pct": 25.0, "kl_mean": 0.5, "kl_p99": 4.0, "top1_pct": 60.0, "rms_dp_pct": 30.0}


def _text(n_words=900, seed=0) -> str:
    rng = random.Random(seed)
    words = ("the edge runtime reads a model and then quantizes its weights so that a small board can run "
             "it with less memory while the reference stays in float").split()
    return " ".join(rng.choice(words) for _ in range(n_words))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_llm")
    f32 = d / "f32.gguf"
    write_tiny_llama(f32, fmt="f32", embd_fmt="f32", seed=1)
    q40 = d / "q4_0.gguf"
    quantize_gguf(f32, q40, "q4_0")
    return d, f32, q40


def _scrambled(src, dst, layer=1, names=None, edit=None):
    """src with layer `layer`'s ffn_down rows (or those of the tensors `names`) permuted (same values, wrong
    places), or changed by ``edit(array) -> array``."""
    from edgert.formats.gguf import open_gguf

    w = gguf.GGUFWriter(str(dst), "llama")
    r = gguf.GGUFReader(str(src))
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    g = open_gguf(src)
    rng = np.random.default_rng(0)
    for name in g.tensors:
        a = np.array(g.tensor_array(name))
        if name in (names or [f"blk.{layer}.ffn_down.weight"]):
            a = edit(a) if edit else a[rng.permutation(a.shape[0])]
        w.add_tensor(name, a)
    g.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_metrics_definitions():
    ref = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    st = M.token_stats(ref, ref, [0, 1])
    assert np.allclose(st["kl"], 0) and st["same_top"].all() and np.allclose(st["dp_top"], 0)
    cand = np.array([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    st = M.token_stats(ref, cand, [0, 1])
    p = np.exp(ref[0]) / np.exp(ref[0]).sum()
    q = np.exp(cand[0]) / np.exp(cand[0]).sum()
    assert st["kl"][0] == pytest.approx(float((p * np.log(p / q)).sum()))
    assert not st["same_top"][0]
    assert st["dp_top"][0] == pytest.approx(q[0] - p[0])
    assert M.perplexity(np.array([math.log(4.0)] * 3)) == pytest.approx(4.0)
    x = np.arange(1, 9, dtype=np.float32)
    assert M.sqnr_db(x, x) == math.inf and M.cosine_similarity(x, -x) == pytest.approx(-1)
    assert M.sqnr_db(x, x * 1.1) == pytest.approx(20.0)
    assert M.relative_l2(x, x * 1.1) == pytest.approx(0.1)


def test_f32_vs_q4_0_drifts_but_passes_loose_thresholds(models):
    _, f32, q40 = models
    rep = edgert.evaluate(f32, q40, _text(), thresholds=LOOSE, ctx=CTX)
    m = rep.metrics
    assert rep.passed, rep.failures
    assert m["kl_mean"] > 0 and m["kl_max"] >= m["kl_p99"] >= m["kl_median"] > 0
    # perplexity close: mean NLL within 3% (random models have very large perplexities)
    assert abs(math.log(m["ppl_candidate"]) / math.log(m["ppl_reference"]) - 1) < 0.03
    assert 50 < m["top1_pct"] < 100
    assert m["chunks"] >= 8 and m["tokens_scored"] == m["chunks"] * (CTX // 2 - 1)
    assert "cheaper" in rep.verdict or "costlier" in rep.verdict
    assert rep.sides["candidate"]["weight_bytes"] < rep.sides["reference"]["weight_bytes"]


def test_scrambled_layer_fails_and_is_named(models, tmp_path):
    _, f32, _ = models
    bad = tmp_path / "bad.gguf"
    _scrambled(f32, bad, layer=1)
    rep = edgert.evaluate(f32, bad, _text(), thresholds=LOOSE, ctx=CTX)
    assert not rep.passed
    assert {f.metric for f in rep.failures} & {"kl_mean", "top1_pct", "ppl_delta_pct"}
    assert rep.first_divergence == "blk.1.ffn_down.weight"


def test_a_candidate_that_makes_nan_fails_the_gate(models, tmp_path, capsys):
    """One NaN weight made every later logit NaN: the KL histogram raised ValueError ("autodetected range of [nan,
    nan] is not finite"), so evaluate() raised and `edgert eval --gate` printed a traceback and exited 1 with no
    report, as a failed gate would without one. Now the report fails, names the weight, and counts the non-finite
    positions apart from the histogram."""
    _, f32, _ = models
    bad = tmp_path / "nan.gguf"

    def one_nan(a):
        a = a.copy()
        a.flat[7] = np.nan
        return a

    _scrambled(f32, bad, names=["blk.1.attn_v.weight"], edit=one_nan)
    rep = edgert.evaluate(f32, bad, _text(), thresholds=LOOSE, ctx=CTX, chunks=2)
    assert not rep.passed and {"kl_mean", "ppl_delta_pct"} <= {f.metric for f in rep.failures}
    assert rep.first_divergence == "blk.1.attn_v.weight"
    hist = rep.details["kl_histogram"]
    assert hist["nonfinite"] > 0 and sum(hist["counts"]) + hist["nonfinite"] == rep.metrics["tokens_scored"]
    text, out_json = tmp_path / "text.txt", tmp_path / "r.json"
    text.write_text(_text())
    rc = main(["eval", "--reference", str(f32), "--candidate", str(bad), "--text", str(text), "--ctx", str(CTX),
               "--chunks", "2", "--gate", "--json", str(out_json), "-q"])
    assert rc == 1 and "gate failed: " in capsys.readouterr().err
    assert json.loads(out_json.read_text())["metrics"]["kl_mean"] == "nan"


def test_eval_that_breaks_inside_exits_2_not_1(models, tmp_path, monkeypatch, capsys):
    """An exception that is not an edgert error (a bug) left `edgert eval --gate` with a traceback and status 1,
    which a CI job reads as a failed gate; it is an evaluation that could not run: status 2, the traceback kept."""
    import edgert.eval as ev

    _, f32, q40 = models
    text = tmp_path / "text.txt"
    text.write_text(_text())

    def broken(*a, **kw):
        raise ValueError("something inside")

    monkeypatch.setattr(ev, "evaluate", broken)
    rc = main(["eval", "--reference", str(f32), "--candidate", str(q40), "--text", str(text), "--gate", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "edgert: error: internal error (ValueError: something inside)" in err


def test_first_divergence_is_the_first_changed_weight_in_compute_order(tmp_path):
    """The weights were visited as the spec lists them (token_embd, output_norm, output, then the blocks), so a
    scrambled output head was named before a scrambled block 0, which the model computes with first."""
    from edgert.formats.gguf import open_gguf

    src, bad = tmp_path / "untied.gguf", tmp_path / "bad.gguf"
    write_tiny_llama(src, fmt="f32", embd_fmt="f32", tied=False, seed=5)
    _scrambled(src, bad, names=["output.weight", "blk.0.ffn_down.weight"])
    rep = edgert.evaluate(src, bad, _text(300), ctx=CTX, chunks=1)
    ga, gb = open_gguf(src), open_gguf(bad)
    n_layers = 1 + max(int(n.split(".")[1]) for n in ga.tensors if n.startswith("blk."))
    order = ["token_embd.weight", *(n for i in range(n_layers) for n in ga.tensors if n.startswith(f"blk.{i}.")),
             "output_norm.weight", "output.weight"]
    assert [t["name"] for t in rep.tensors] == order

    def sqnr(name):
        a, b = (np.array(g.tensor_array(name), dtype=np.float64) for g in (ga, gb))
        noise = ((b - a) ** 2).sum()
        return np.inf if noise == 0 else 10 * np.log10((a * a).sum() / noise)

    want = next(n for n in order if sqnr(n) < 10)
    ga.close()
    gb.close()
    assert want == "blk.0.ffn_down.weight" and rep.first_divergence == want
    assert "first changed weight: blk.0.ffn_down.weight" in rep.failures[0]


def test_device_profile_sides_are_flagged_and_noted_as_graph_sides_are(models, tmp_path):
    """A GGUF side on a device profile had no `emulated` flag and no note that its latency is this machine's while
    its power and price are the profile's; graph reports had both."""
    import onnx

    from edgert import profiles
    from onnx_models import mlp

    _, f32, _ = models
    onnx_path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), onnx_path)
    for device in ("imx8mp", "rpi5"):
        rep = edgert.evaluate(f32, f"{f32}@{device}", _text(300), ctx=CTX, chunks=1)
        graph = edgert.evaluate(onnx_path, f"{onnx_path}@{device}", random=1, runs=1)
        prof = profiles.load(device)
        absent = device == "imx8mp"  # its NPU is not on this machine; rpi5 is CPU only
        if absent and all(profiles.runtime_status(u)[0] for u in prof.units):
            pytest.skip("this machine has the i.MX 8M Plus NPU's runtime")
        for r in (rep, graph):
            assert r.sides["candidate"]["emulated"] is absent and r.sides["reference"]["emulated"] is False
            assert r.sides["candidate"]["power_w"] == prof.power_w
            assert "latency is measured on this machine; energy and cost apply each side's profile power and price " \
                   "to it" in r.notes
            assert any(f"device '{device}' is not on this machine" in n for n in r.notes) is absent


def test_identical_models_zero_drift_and_threads(models):
    _, f32, _ = models
    rep = edgert.evaluate(f32, f"{f32}@threads=1", _text(400), ctx=CTX, reference_threads=2)
    m = rep.metrics
    assert rep.passed
    assert m["kl_max"] == pytest.approx(0.0, abs=1e-9) and m["top1_pct"] == 100.0
    assert m["ppl_delta_pct"] == pytest.approx(0.0, abs=1e-6)
    assert m["greedy_match_mean"] == m["greedy_tokens"]
    assert rep.candidate.threads == 1 and rep.reference.threads == 2
    assert rep.first_divergence is None


def test_cli_gate_json_plot(models, tmp_path, capsys):
    _, f32, q40 = models
    text = tmp_path / "text.txt"
    text.write_text(_text())
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    strict = ["--threshold", "kl_mean=0.000001"]
    rc = main(["eval", "--reference", str(f32), "--candidate", str(q40), "--text", str(text), "--ctx", str(CTX),
               "--chunks", "4", "--gate", "--json", str(out_json), "--plot", str(out_png), "-q", *strict])
    assert rc == 1
    assert "kl_mean" in capsys.readouterr().err
    rep = json.loads(out_json.read_text())
    assert rep["schema"] == "edgert.eval/1" and rep["kind"] == "llm" and rep["passed"] is False
    assert {"metrics", "thresholds", "failures", "sides", "tensors", "verdict"} <= set(rep)
    assert rep["failures"][0]["metric"] == "kl_mean" and rep["metrics"]["chunks"] == 4
    assert {"prefill_tok_s", "decode_tok_s", "energy_wh_per_1m_tokens", "cost_usd_per_1m_tokens"} <= \
        set(rep["sides"]["candidate"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    toml = tmp_path / "t.toml"
    toml.write_text("[llm]\n" + "".join(f"{k} = {v}\n" for k, v in LOOSE.items()))
    rc = main(["eval", "--reference", str(f32), "--candidate", str(q40), "--text", str(text), "--ctx", str(CTX),
               "--chunks", "4", "--gate", "--thresholds", str(toml), "-q"])
    assert rc == 0
    assert "candidate:" in capsys.readouterr().out


def test_errors(models, tmp_path):
    _, f32, q40 = models
    with pytest.raises(edgert.InvalidArgumentError, match="fewer than one window"):
        edgert.evaluate(f32, q40, "short", ctx=CTX)
    with pytest.raises(edgert.InvalidArgumentError, match="unknown llm threshold"):
        edgert.evaluate(f32, q40, _text(), thresholds={"kl_meen": 1})
    with pytest.raises(edgert.InvalidArgumentError, match="not found"):
        edgert.evaluate(tmp_path / "nope.gguf", q40, _text())
    # a mistyped text path was scored as the text itself (its few tokens, passed)
    with pytest.raises(edgert.InvalidArgumentError, match="text file .*missing.txt not found"):
        edgert.evaluate(f32, q40, str(tmp_path / "missing.txt"))
    for kw in ({"chunks": 1.5}, {"chunks": "2"}, {"chunks": True}):  # were TypeErrors (True was taken as 1)
        with pytest.raises(edgert.InvalidArgumentError, match="chunks must be an int >= 1"):
            edgert.evaluate(f32, q40, _text(), **kw)
    # a thread count the pool cannot take is refused with the spec, before any model is opened
    for bad, what in (("0", "got 0"), ("9999", "got 9999"), ("two", "positive integer, got 'two'")):
        with pytest.raises(edgert.InvalidArgumentError, match=f"@threads={bad}: threads .*{what}"):
            edgert.evaluate(f32, f"{q40}@threads={bad}", _text())


def _cli_error(capsys, *argv) -> str:
    """Runs `edgert eval ARGV` in-process; it must fail with exit 2 (1 is a failed gate) and one `edgert: error:`
    line (an exception escaping main() is the traceback a user would see)."""
    capsys.readouterr()
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgert: error: ") and "\n" not in err, err
    return err


def test_cli_bad_text_thresholds_and_output_paths_are_one_line_errors(models, tmp_path, capsys):
    _, f32, q40 = models
    text = tmp_path / "text.txt"
    text.write_text(_text())
    base = ["--reference", str(f32), "--candidate", str(q40), "--ctx", str(CTX), "--chunks", "1", "-q"]
    # a mistyped --text path was scored as the text itself (the path string), not refused
    assert "no such file" in _cli_error(capsys, *base, "--text", str(tmp_path / "typo.txt"))
    assert "not a file" in _cli_error(capsys, *base, "--text", str(tmp_path))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 200)
    assert "not UTF-8" in _cli_error(capsys, *base, "--text", str(latin1))
    with pytest.raises(edgert.InvalidArgumentError, match="not UTF-8"):
        edgert.evaluate(f32, q40, b"\xff\xfe" * 100, ctx=CTX)
    # thresholds files of the wrong shape: a section that is not a table, NaN, not text at all
    for body, needle in (("llm = [1]\n", "must be a table"), ("llm = 5\n", "must be a table"),
                         ('graph = "x"\n', "must be a table"), ("llm = 0\n", "must be a table"),
                         ("[llm]\nkl_mean = nan\n", "NaN")):
        toml = tmp_path / "t.toml"
        toml.write_text(body)
        assert needle in _cli_error(capsys, *base, "--text", str(text), "--thresholds", str(toml)), body
    toml.write_bytes(b"\xff\xfe[llm]\n")
    assert "not UTF-8" in _cli_error(capsys, *base, "--text", str(text), "--thresholds", str(toml))
    assert "NaN" in _cli_error(capsys, *base, "--text", str(text), "--threshold", "kl_mean=nan")
    with pytest.raises(edgert.InvalidArgumentError, match="must be a table"):
        edgert.evaluate(f32, q40, _text(), ctx=CTX, thresholds={"llm": 0})
    # where the results go is checked before the evaluation runs
    assert "does not exist" in _cli_error(capsys, *base, "--text", str(text), "--json", str(tmp_path / "no" / "r.json"))
    assert "is a directory" in _cli_error(capsys, *base, "--text", str(text), "--plot", str(tmp_path))
    # --ctx 0 is refused as 0, not replaced by the default
    assert "got 0" in _cli_error(capsys, *base[:4], "--ctx", "0", "--text", str(text))
    assert "is a directory" in _cli_error(capsys, "--reference", str(tmp_path), "--candidate", str(q40))
    # the flag of the other model kind is named, not reported as a missing directory
    assert "graph models; language models take --text" in _cli_error(capsys, *base, "--inputs", str(tmp_path))
    # graph flags and thresholds were silently ignored on language models
    txt = ["--text", str(text)]
    assert "--threshold sqnr_db is a graph threshold; a language-model evaluation takes ppl_delta_pct" in \
        _cli_error(capsys, *base, *txt, "--threshold", "sqnr_db=1000", "--gate")
    assert "--random, --seed, --runs, --no-intermediates are for graph models" in \
        _cli_error(capsys, *base, *txt, "--random", "2", "--seed", "1", "--runs", "3", "--no-intermediates")
    for kw in ({"random": 2}, {"runs": 3}, {"intermediates": False}):
        with pytest.raises(edgert.InvalidArgumentError, match=f"{next(iter(kw))} is for graph models"):
            edgert.evaluate(f32, q40, _text(), ctx=CTX, **kw)
