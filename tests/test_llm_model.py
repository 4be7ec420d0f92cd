"""The C llama decoder against a numpy float64 forward pass on the same dequantized weights (tiny random models
written with gguf.GGUFWriter), KV-cache consistency, chunked prefill, and the context limit."""
import numpy as np
import pytest

import edgert
from edgert.formats.gguf import GGUFFile
from edgert.llm.model import LlamaModel
from llama_tiny import reference_logits, write_tiny_llama

# Budgets, relative to the largest |logit| of the reference:
# float weights: only the fp16 KV cache and float32 accumulation differ from float64
FLOAT_LOGITS_RTOL = 1e-2
# block formats also quantize every activation row to 8 bits per block of 32 (as llama.cpp's q8 activations do)
QUANT_LOGITS_RTOL = 6e-2
# different ISAs differ by summation order, and a last-bit change can flip one 8-bit activation rounding in the next
# layer, so the budget is a few 8-bit steps. The same model on one ISA run two ways (batched vs token by token,
# chunked vs whole) is exact: every kernel computes each output with the same float operations whatever the batch.
SAME_MODEL_RTOL = 1e-2

FORMATS = ["f32", "f16", "q8_0", "q4_0", "q4_1"]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tokens():
    return [int(t) for t in np.random.default_rng(7).integers(0, 250, 24)]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "separate-head"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_float64_reference(tmp_path, fmt, tied, tokens):
    wts = write_tiny_llama(tmp_path / "m.gguf", fmt=fmt, tied=tied, embd_fmt="f32" if fmt == "f32" else "q8_0")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, n_batch=8) as m:
        got = m.forward(tokens, 0, logits_all=True)
    ref = reference_logits(wts, tokens)
    assert got.shape == (len(tokens), wts["_config"]["vocab"])
    budget = FLOAT_LOGITS_RTOL if fmt in ("f32", "f16") and not tied else QUANT_LOGITS_RTOL
    assert rel_err(got, ref) < budget
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 1), (6, 2), (2, 1)])
def test_grouped_query_attention_head_counts(tmp_path, n_heads, n_kv_heads, tokens):
    wts = write_tiny_llama(tmp_path / "m.gguf", fmt="f32", embd_fmt="f32", tied=False, dim=96, n_heads=n_heads,
                           n_kv_heads=n_kv_heads)
    with LlamaModel(tmp_path / "m.gguf", n_ctx=32) as m:
        got = m.forward(tokens, 0, logits_all=True)
    assert rel_err(got, reference_logits(wts, tokens)) < FLOAT_LOGITS_RTOL


def test_incremental_decode_equals_full_recompute(tmp_path, tokens, isa):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_1")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, n_batch=64) as m:
        full = m.forward(tokens, 0, logits_all=True)
        steps = np.stack([m.forward([t], i) for i, t in enumerate(tokens)])
        # prefill half, then step through the rest
        half = len(tokens) // 2
        mixed = [m.forward(tokens[:half], 0, logits_all=True)]
        mixed += [m.forward([t], half + i)[None] for i, t in enumerate(tokens[half:])]
    np.testing.assert_array_equal(steps, full)
    np.testing.assert_array_equal(np.concatenate(mixed), full)


@pytest.mark.parametrize("n_batch", [1, 5, 8, 64])
def test_prefill_chunks_equal_single_pass(tmp_path, tokens, n_batch, isa):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q8_0")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, n_batch=64) as m:
        whole = m.forward(tokens, 0, logits_all=True)
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, n_batch=n_batch) as m:
        chunked = m.forward(tokens, 0, logits_all=True)
        last = m.forward(tokens, 0)
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(last, whole[-1])


def test_every_isa_agrees_with_ref(tmp_path, tokens):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_0")
    before = edgert.native.info()["isa"]
    outs = {}
    try:
        for isa in edgert.native.info()["isas"]:
            edgert.native.set_isa(isa)
            with LlamaModel(tmp_path / "m.gguf", n_ctx=64) as m:
                outs[isa] = m.forward(tokens, 0, logits_all=True)
    finally:
        edgert.native.set_isa(before)
    for isa, out in outs.items():
        assert rel_err(out, outs["ref"]) < SAME_MODEL_RTOL, isa


def test_threads_do_not_change_results(tmp_path, tokens):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_1")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64) as m:
        one = m.forward(tokens, 0, logits_all=True, threads=1)
        two = m.forward(tokens, 0, logits_all=True, threads=2)
    np.testing.assert_array_equal(one, two)


def test_context_limit_is_a_clear_error(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_0")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=16) as m:
        m.forward(list(range(16)), 0)  # exactly full is fine
        with pytest.raises(edgert.InvalidArgumentError, match="context full"):
            m.forward([1], 16)
        with pytest.raises(edgert.InvalidArgumentError, match="context full"):
            m.forward(list(range(17)), 0)


def test_bad_tokens_and_arguments(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_0")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=16) as m:
        with pytest.raises(edgert.InvalidArgumentError, match="outside the vocabulary"):
            m.forward([m.vocab_size], 0)
        with pytest.raises(edgert.InvalidArgumentError, match="outside the vocabulary"):
            m.forward([-1], 0)
        with pytest.raises(edgert.InvalidArgumentError):
            m.forward([], 0)
    with pytest.raises(edgert.InvalidArgumentError, match="n_ctx"):
        LlamaModel(tmp_path / "m.gguf", n_ctx=100000)


@pytest.mark.parametrize("args, kwargs, match", [
    (([1], 1.5), {}, "pos must be an int >= 0"),
    (([1], None), {}, "pos must be an int >= 0"),
    (([1], -1), {}, "pos must be an int >= 0"),
    (([1], True), {}, "pos must be an int >= 0"),
    (([1], "0"), {}, "pos must be an int >= 0"),
    (([1], 2**40), {}, "context full"),
    ((None, 0), {}, "tokens must be a list of token ids"),
    ((7, 0), {}, "tokens must be a list of token ids"),
    (("ab", 0), {}, "tokens must be a list of token ids"),
    (([1.5], 0), {}, r"tokens\[0\] must be an int token id, got 1.5"),
    (([1, None], 0), {}, r"tokens\[1\] must be an int token id, got None"),
    (([2**40], 0), {}, r"tokens\[0\] = 1099511627776 is outside the vocabulary"),
    ((np.array([1.0]), 0), {}, "1-D integer array"),
    ((np.array([[1]]), 0), {}, "1-D integer array"),
    ((np.array([1, 2**40]), 0), {}, r"tokens\[1\] = 1099511627776 is outside the vocabulary"),
    (([1], 0), {"threads": 1.5}, r"threads must be an int in \[1, 256\] or None, got 1.5"),
    (([1], 0), {"threads": 0}, r"threads must be an int in \[1, 256\]"),
    (([1], 0), {"threads": 257}, r"threads must be an int in \[1, 256\]"),
    (([1], 0), {"threads": 2**40}, r"threads must be an int in \[1, 256\]"),
])
def test_bad_forward_arguments(tmp_path, args, kwargs, match):
    """Each of these used to escape as TypeError, ValueError or OverflowError (or, 1.5 as a token, run token 1)."""
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_0")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=16) as m:
        with pytest.raises(edgert.InvalidArgumentError, match=match):
            m.forward(*args, **kwargs)
        assert m.forward(np.array([1, 2], np.int64), np.int64(0), threads=np.int32(1)).shape == (m.vocab_size,)


def test_closed_model_is_a_clear_error(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_0")
    m = LlamaModel(tmp_path / "m.gguf", n_ctx=16)
    m.close()
    for call in (lambda: m.forward([1], 0), lambda: m.state_bytes):
        with pytest.raises(edgert.InvalidArgumentError, match="the model is closed"):
            call()
    m.close()


def test_state_is_sized_by_n_ctx(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_0")
    with LlamaModel(tmp_path / "m.gguf", n_ctx=32, n_batch=16) as small, \
            LlamaModel(tmp_path / "m.gguf", n_ctx=256, n_batch=16) as big:
        cfg = small.config
        kv_per_pos = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # K and V, fp16
        att_per_pos = cfg.n_heads * small.n_batch * 4
        assert big.state_bytes - small.state_bytes == (256 - 32) * (kv_per_pos + att_per_pos)


@pytest.mark.parametrize("fmt,tied", [("q4_0", True), ("q4_1", False), ("q8_0", True)])
def test_repacked_weights_give_the_same_logits(tmp_path, tokens, isa, fmt, tied, monkeypatch):
    """repack=True runs the projections and the output head on x16 copies (docs/formats.md) and releases the file's
    pages; on an ISA with its own x16 kernels the logits are the same bits as on the GGUF rows. Elsewhere the
    projections run on the reference kernel and the rest on the ISA's: the budget of two ISAs."""
    write_tiny_llama(tmp_path / "m.gguf", fmt=fmt, tied=tied, embd_fmt="q8_0", dim=64, hidden=160)
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, n_batch=8, repack=False) as m:
        want = m.forward(tokens, 0, logits_all=True)
        want_step = m.forward(tokens[:1], len(tokens))
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, n_batch=8, repack=True) as m:
        got = m.forward(tokens, 0, logits_all=True)
        got_step = m.forward(tokens[:1], len(tokens))
    if edgert.repack_pays(fmt):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_step, want_step)
    else:
        assert rel_err(got, want) < SAME_MODEL_RTOL and rel_err(got_step, want_step) < SAME_MODEL_RTOL

    def repacked_roles(m):
        """roles whose weights the C side reads from a copy rather than the file's mapping"""
        return {role for (role, info), view in zip(m.spec.tensors, m._views)
                if not np.shares_memory(view, m.gguf.tensor_bytes(info.name))}

    blocks = {edgert.FORMATS[f] for f in ("q4_0", "q4_1", "q8_0")}
    matrices = {role for role, info in m.spec.tensors if info.type_id in blocks and role != "token_embd"}
    released = []
    monkeypatch.setattr(GGUFFile, "release", lambda self, name: released.append(name))
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, n_batch=8, repack=True) as m:
        assert matrices and repacked_roles(m) == matrices  # every block-format projection and the head, not the embedding
        assert set(released) == {info.name for role, info in m.spec.tensors if role in matrices}
    released.clear()
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64) as m:  # the default repacks exactly when it pays
        assert repacked_roles(m) == (matrices if edgert.repack_pays(fmt) else set())  # q8_0 head: pays with fmt
        assert bool(released) == edgert.repack_pays(fmt)
    with LlamaModel(tmp_path / "m.gguf", n_ctx=64, repack=False) as m:
        assert repacked_roles(m) == set()


def test_repack_argument_is_checked(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", fmt="q4_0")
    for bad in ("yes", 1, np.True_, np.array([1, 0])):
        with pytest.raises(edgert.InvalidArgumentError, match="repack must be"):
            LlamaModel(tmp_path / "m.gguf", n_ctx=32, repack=bad)
