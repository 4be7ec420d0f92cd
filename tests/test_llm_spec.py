"""edgert.llm.spec: a tiny llama written with gguf.GGUFWriter is read into the right config and tensor order, and
every way a file can disagree with the decoder (architecture, metadata, tensor presence/shape/type) is refused."""
import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert import ModelFormatError
from edgert.formats.gguf import GGML_TYPES, open_gguf
from edgert.llm.spec import LAYER_ROLES, SUPPORTED_TYPES, LlamaConfig, llama_spec

DIM, HIDDEN, N_LAYERS, N_HEADS, N_KV, VOCAB, CTX = 64, 96, 2, 4, 2, 128, 256
HEAD_DIM = DIM // N_HEADS

BASE_META = {
    "llama.embedding_length": DIM, "llama.feed_forward_length": HIDDEN, "llama.block_count": N_LAYERS,
    "llama.attention.head_count": N_HEADS, "llama.attention.head_count_kv": N_KV, "llama.context_length": CTX,
    "llama.rope.freq_base": 500000.0, "llama.attention.layer_norm_rms_epsilon": 1e-6,
    "llama.rope.dimension_count": HEAD_DIM,
}
# one of each type the decoder computes with, spread over the roles
ROLE_TYPES = {
    "token_embd": T.Q8_0, "output": T.F16, "output_norm": T.F32, "attn_norm": T.F32, "ffn_norm": T.F32,
    "attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.F16, "ffn_gate": T.Q4_0, "ffn_up": T.Q4_1,
    "ffn_down": T.F32,
}


def ggml_shapes(n_layers: int = N_LAYERS, dim: int = DIM, hidden: int = HIDDEN, kv: int = N_KV * HEAD_DIM):
    shapes = {"token_embd.weight": (dim, VOCAB), "output_norm.weight": (dim,), "output.weight": (dim, VOCAB)}
    for i in range(n_layers):
        for role, shape in {
            "attn_norm": (dim,), "attn_q": (dim, dim), "attn_k": (dim, kv), "attn_v": (dim, kv),
            "attn_output": (dim, dim), "ffn_norm": (dim,), "ffn_gate": (dim, hidden), "ffn_up": (dim, hidden),
            "ffn_down": (hidden, dim),
        }.items():
            shapes[f"blk.{i}.{role}.weight"] = shape
    return shapes


def _role(name: str) -> str:
    return name.split(".")[-2]


def _add_meta(w, key, v):
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v) if v >= 0 else w.add_int32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    else:
        w.add_array(key, v)


def write_llama(path, *, arch="llama", tied=False, meta=None, types=None, shapes=None, skip=(), extra=None,
                tokens=True, seed=0):
    """Write a tiny llama GGUF; meta/types/shapes override the defaults (a None meta value drops the key)."""
    rng = np.random.default_rng(seed)
    md = {**BASE_META, **(meta or {})}
    all_shapes = {**ggml_shapes(), **(extra or {}), **(shapes or {})}
    if tied:
        del all_shapes["output.weight"]
    w = gguf.GGUFWriter(str(path), arch)
    for key, v in md.items():
        if v is not None:
            _add_meta(w, key, v)
    if tokens:
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
    weights = {}
    for name, shape in all_shapes.items():
        if name in skip:
            continue
        t = (types or {}).get(name, ROLE_TYPES.get(_role(name), T.F32))
        a = rng.standard_normal(shape[::-1]).astype(np.float32)
        _, block, size = GGML_TYPES[int(t)]
        if t == T.F32:
            w.add_tensor(name, a)
        elif t == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif t in (T.Q4_0, T.Q4_1, T.Q8_0):
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        else:  # a type the decoder does not compute with: random blocks of the right size
            rows = math.prod(shape[1:])
            w.add_tensor(name, rng.integers(0, 256, (rows, shape[0] // block * size), dtype=np.uint8), raw_dtype=t)
        weights[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, weights


def spec_of(path):
    with open_gguf(path) as g:
        return llama_spec(g)


def refused(tmp_path, *needles, **kw):
    path, _ = write_llama(tmp_path / "m.gguf", **kw)
    with pytest.raises(ModelFormatError) as ei:
        spec_of(path)
    for n in needles:
        assert n in str(ei.value), f"{n!r} not in {str(ei.value)!r}"
    return str(ei.value)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_config_and_order(tmp_path, tied):
    path, weights = write_llama(tmp_path / "m.gguf", tied=tied)
    with open_gguf(path) as g:
        s = llama_spec(g)
        assert s.config == LlamaConfig(
            dim=DIM, hidden_dim=HIDDEN, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, head_dim=HEAD_DIM,
            vocab_size=VOCAB, context_length=CTX, rope_base=500000.0, norm_eps=pytest.approx(1e-6), rope_dim=HEAD_DIM,
            tied_output=tied,
        )
        roles = [r for r, _ in s.tensors]
        assert roles[:3] == ["token_embd", "output_norm", "output"]
        assert roles[3:] == [f"blk.{i}.{r}" for i in range(N_LAYERS) for r in LAYER_ROLES]
        out = dict(s.tensors)["output"]
        assert out.name == ("token_embd.weight" if tied else "output.weight")
        if tied:
            assert out is dict(s.tensors)["token_embd"]
        assert {t.type_name for _, t in s.tensors} == set(SUPPORTED_TYPES)
        for role, info in s.tensors:  # every matrix loads as a QTensor holding what was written
            if len(info.shape) == 2:
                q = g.qtensor(info.name)
                assert q.shape == weights[info.name].shape
                tol = {"F32": 0, "F16": 1e-2, "Q8_0": 0.05, "Q4_0": 0.6, "Q4_1": 0.6}[info.type_name]
                np.testing.assert_allclose(q.dequantize(), weights[info.name], atol=tol)
            else:
                np.testing.assert_array_equal(g.tensor_array(info.name), weights[info.name])


def test_metadata_defaults(tmp_path):
    meta = {k: None for k in ("llama.attention.head_count_kv", "llama.rope.freq_base",
                              "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count")}
    path, _ = write_llama(tmp_path / "m.gguf", meta=meta, shapes={
        n: (DIM, DIM) for n in ggml_shapes() if _role(n) in ("attn_k", "attn_v")})
    c = spec_of(path).config
    assert (c.n_kv_heads, c.rope_base, c.rope_dim) == (N_HEADS, 10000.0, HEAD_DIM)
    assert c.norm_eps == 1e-5


def test_wrong_architecture(tmp_path):
    refused(tmp_path, "'gpt2'", "supports llama", arch="gpt2")


@pytest.mark.parametrize("key, value, needle", [
    ("llama.embedding_length", None, "'llama.embedding_length' is missing"),
    ("llama.context_length", None, "'llama.context_length' is missing"),
    ("llama.embedding_length", "64", "must be an integer, found str"),
    ("llama.block_count", 2.0, "must be an integer, found float"),
    ("llama.block_count", True, "must be an integer, found bool"),
    ("llama.block_count", 0, "must be in 1..1048576, found 0"),
    ("llama.attention.head_count", -4, "found -4"),
    ("llama.feed_forward_length", 2**21, "found 2097152"),
    ("llama.context_length", 2**25, "must be in 1..16777216"),
    ("llama.attention.head_count", 5, "not divisible by llama.attention.head_count 5"),
    ("llama.attention.head_count_kv", 3, "must be a multiple of llama.attention.head_count_kv 3"),
    ("llama.attention.head_count_kv", 8, "must be a multiple of llama.attention.head_count_kv 8"),
    ("llama.rope.dimension_count", 8, "partial rotary"),
    ("llama.rope.freq_base", -1.0, "'llama.rope.freq_base' must be a finite number"),
    ("llama.rope.freq_base", float("inf"), "'llama.rope.freq_base' must be a finite number"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, "layer_norm_rms_epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", "tiny", "must be a number, found str"),
    ("llama.rope.scaling.type", "linear", "rope.scaling.type is 'linear'"),
    # llama.cpp takes a missing scaling type as 'linear' and divides positions by the factor
    ("llama.rope.scaling.factor", 4.0, "llama.rope.scaling.factor is 4.0"),
    ("llama.rope.scale_linear", 4.0, "llama.rope.scale_linear is 4.0"),
    ("llama.rope.scaling.factor", float("nan"), "llama.rope.scaling.factor is nan"),
    ("llama.rope.scaling.factor", "4", "llama.rope.scaling.factor is '4'"),
    ("llama.expert_count", 8, "mixture-of-experts"),
    # arrays where scalars belong: a numpy array's `!=` / `in` used to raise "truth value ... is ambiguous"
    ("llama.expert_count", [1, 2], "mixture-of-experts"),
    ("llama.rope.scaling.type", [1, 2], "rope.scaling.type is array"),
    ("llama.attention.key_length", 32, "unsupported head layout"),
    ("llama.vocab_size", 100, "llama.vocab_size is 100 but token_embd.weight holds 128 rows"),
])
def test_bad_metadata(tmp_path, key, value, needle):
    refused(tmp_path, needle, meta={key: value})


@pytest.mark.parametrize("meta", [{"llama.rope.scaling.factor": 1.0}, {"llama.rope.scale_linear": 0.0},
                                  {"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 1.0},
                                  {"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0},
                                  {"llama.rope.scaling.type": "none", "llama.rope.scale_linear": 8.0}])
def test_rope_scaling_factor_that_scales_nothing_is_accepted(tmp_path, meta):
    # llama.cpp: factor 0 means unset, 1 leaves positions as they are; an explicit type 'none' never scales
    # ("never scale if scaling type is none"), whatever factor the file also holds
    path, _ = write_llama(tmp_path / "m.gguf", meta=meta)
    assert spec_of(path).config.rope_base == BASE_META["llama.rope.freq_base"]


def test_odd_head_dim(tmp_path):
    # dim 64 over 64 heads: head_dim 1
    refused(tmp_path, "is odd", meta={"llama.attention.head_count": 64, "llama.attention.head_count_kv": 64})


def test_token_list_must_match_vocab(tmp_path):
    path, _ = write_llama(tmp_path / "m.gguf", tokens=False)
    assert spec_of(path).config.vocab_size == VOCAB  # no token list: nothing to compare
    refused(tmp_path, "tokenizer.ggml.tokens must be an array of strings, found int", tokens=False,
            meta={"tokenizer.ggml.tokens": 5})  # len(5) was a TypeError
    refused(tmp_path, "tokenizer.ggml.tokens has 128 entries but token_embd.weight holds 64 rows",
            shapes={"token_embd.weight": (DIM, 64), "output.weight": (DIM, 64)})


@pytest.mark.parametrize("name", ["token_embd.weight", "output_norm.weight", "blk.1.ffn_up.weight",
                                  "blk.0.attn_norm.weight", "blk.1.attn_output.weight"])
def test_missing_tensor(tmp_path, name):
    refused(tmp_path, repr(name), "missing", skip=(name,))


@pytest.mark.parametrize("name, shape, expected", [
    ("blk.0.attn_k.weight", (DIM, DIM), f"[{DIM}, {N_KV * HEAD_DIM}]"),
    ("blk.1.ffn_down.weight", (DIM, HIDDEN), f"[{HIDDEN}, {DIM}]"),
    ("blk.0.attn_norm.weight", (2 * DIM,), f"[{DIM}]"),
    ("blk.1.ffn_norm.weight", (DIM, 1), f"[{DIM}]"),
    ("output.weight", (DIM, VOCAB + 32), f"[{DIM}, {VOCAB}]"),
    ("token_embd.weight", (DIM + 32, VOCAB), "expected [64, vocab]"),
])
def test_wrong_shape(tmp_path, name, shape, expected):
    refused(tmp_path, repr(name), "expected " + expected if "vocab" not in expected else expected, shapes={name: shape})


@pytest.mark.parametrize("name, qtype, needle", [
    ("blk.0.attn_norm.weight", T.Q4_0, "unsupported type Q4_0 for tensor 'blk.0.attn_norm.weight' (norm weights must be F32)"),
    ("output_norm.weight", T.F16, "unsupported type F16 for tensor 'output_norm.weight' (norm weights must be F32)"),
    ("blk.1.attn_q.weight", T.Q5_0, "unsupported type Q5_0 for tensor 'blk.1.attn_q.weight' (supported: F32, F16, Q4_0, Q4_1, Q8_0)"),
    ("blk.0.ffn_down.weight", T.BF16, "unsupported type BF16 for tensor 'blk.0.ffn_down.weight'"),
    ("token_embd.weight", T.IQ4_NL, "unsupported type IQ4_NL for tensor 'token_embd.weight'"),
    ("output.weight", T.I8, "unsupported type I8 for tensor 'output.weight'"),
])
def test_wrong_type_for_role(tmp_path, name, qtype, needle):
    refused(tmp_path, needle, types={name: qtype})


def test_k_quant_parses_but_is_refused_by_the_spec(tmp_path):
    # Q6_K needs rows of 256: a wider feed-forward makes ffn_down's rows 256 long
    shapes = {f"blk.{i}.{r}.weight": s for i in range(N_LAYERS)
              for r, s in (("ffn_gate", (DIM, 256)), ("ffn_up", (DIM, 256)), ("ffn_down", (256, DIM)))}
    path, _ = write_llama(tmp_path / "m.gguf", meta={"llama.feed_forward_length": 256}, shapes=shapes,
                          types={"blk.1.ffn_down.weight": T.Q6_K})
    with open_gguf(path) as g:
        assert g.tensors["blk.1.ffn_down.weight"].type_name == "Q6_K"
        with pytest.raises(ModelFormatError, match=r"unsupported type Q6_K .*supported: F32, F16, Q4_0, Q4_1, Q8_0"):
            llama_spec(g)


@pytest.mark.parametrize("extra", [{"rope_freqs.weight": (HEAD_DIM // 2,)}, {"blk.2.attn_norm.weight": (DIM,)}])
def test_unused_tensors_refused(tmp_path, extra):
    refused(tmp_path, repr(next(iter(extra))), "does not use", extra=extra)


# ---------------------------------------------------------------- the real model

@pytest.mark.model
def test_real_smollm2_spec(smollm2_path):
    from collections import Counter
    path = smollm2_path
    with open_gguf(path) as g:
        s = llama_spec(g)
        assert s.config == LlamaConfig(
            dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
            context_length=8192, rope_base=100000.0, norm_eps=pytest.approx(1e-5), rope_dim=64, tied_output=True,
        )
        assert Counter(t.type_name for t in g.tensors.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
        ref = gguf.GGUFReader(path)
        assert [(t.name, t.data_offset, t.n_bytes) for t in ref.tensors] == \
               [(t.name, t.offset, t.nbytes) for t in g.tensors.values()]


# -- metadata of the wrong type, at random -------------------------------------------------------------------------
# Byte flips mostly break the container (tests/test_formats_gguf.py); these keep the container valid and put a
# value of a random type or range under one of the keys the llama spec, the tokenizer and the chat template read.
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from llama_tiny import write_tiny_llama

    path = tmp_path_factory.mktemp("spec_fuzz") / "tiny.gguf"
    write_tiny_llama(path, fmt="q8_0", dim=64, hidden=96, n_layers=1, ctx=64)
    g = open_gguf(path)
    yield g
    g.close()


_HOSTILE_VALUES = [0, 1, -1, 2**31, 2**64 - 1, 3, 0.0, -1.5, float("nan"), float("inf"), True, "", "none", "x",
                   "llama", np.array([1, 2], np.int32), np.array([], np.int32), np.array([1.5], np.float32),
                   np.array([True]), ["a", "b"], [], [np.array([1], np.int32)], ["zz yy"], ["<|im_end|>"] * 261,
                   np.full(261, 7, np.int32), np.full(261, -1, np.int32), np.arange(261, dtype=np.int64)]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_wrong_typed_metadata_raises_only_model_format_error(tiny_gguf, data):
    import warnings

    from edgert import EdgertError
    from edgert.llm import chat_template
    from edgert.llm.tokenizer import Tokenizer

    g = tiny_gguf
    original = g.metadata
    md = dict(original)
    keys = sorted(k for k in md if not k.startswith("general.")) + [
        "llama.expert_count", "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.vocab_size",
        "llama.attention.key_length",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_eos_token"]
    for _ in range(data.draw(st.integers(1, 2))):
        md[data.draw(st.sampled_from(keys))] = data.draw(st.sampled_from(_HOSTILE_VALUES))
    g.metadata = md
    try:
        llama_spec(g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an unknown tokenizer.ggml.pre falls back, warning
            tok = Tokenizer.from_gguf_metadata(md)
        template = md.get("tokenizer.chat_template")
        for text, markup in chat_template.render_segments(template, [{"role": "user", "content": "hi"}]):
            tok.encode_special(text) if markup else tok.encode(text)
    except EdgertError:
        pass
    finally:
        g.metadata = original
