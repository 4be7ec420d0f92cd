"""Tiny random llama models written with gguf.GGUFWriter, and a numpy float64 forward pass as the reference.

Shared by the LLM tests; not a test module itself.
"""
from __future__ import annotations

import gguf
import numpy as np

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}

TINY_VOCAB = 256 + 2 + 3  # every byte symbol, two merges, three control tokens

LAYER_ROLES = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def write_tiny_llama(path, *, fmt="q4_0", embd_fmt="q8_0", tied=True, dim=64, hidden=96, n_layers=2, n_heads=4,
                     n_kv_heads=2, vocab=TINY_VOCAB, ctx=256, rope_base=10000.0, eps=1e-5, seed=0, tokenizer=True,
                     extra=None):
    """Write a random llama GGUF; returns the float64 weights as they decode from the file (name -> array).
    extra: a function given the gguf.GGUFWriter, to add metadata (a chat template, ...)."""
    rng = np.random.default_rng(seed)
    hd = dim // n_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(ctx)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_block_count(n_layers)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_dimension_count(hd)
    if tokenizer:
        add_byte_tokenizer(w, vocab)
    if extra is not None:
        extra(w)
    decoded = {}

    def add(name, arr, f):
        arr = arr.astype(np.float32)
        if f in ("f32",) or arr.ndim == 1:
            data = arr
            w.add_tensor(name, data)
            decoded[name] = arr.astype(np.float64)
        elif f == "f16":
            data = arr.astype(np.float16)
            w.add_tensor(name, data)
            decoded[name] = data.astype(np.float64)
        else:
            q = gguf.quants.quantize(arr, QTYPES[f])
            w.add_tensor(name, q, raw_dtype=QTYPES[f])
            decoded[name] = gguf.quants.dequantize(q, QTYPES[f]).astype(np.float64)

    add("token_embd.weight", rng.standard_normal((vocab, dim)) * 0.5, embd_fmt)
    add("output_norm.weight", 1.0 + 0.1 * rng.standard_normal(dim), "f32")
    if not tied:
        add("output.weight", rng.standard_normal((vocab, dim)) * 0.2, fmt)
    s = 1.0 / np.sqrt(dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1.0 + 0.1 * rng.standard_normal(dim), "f32")
        add(p + "attn_q.weight", rng.standard_normal((n_heads * hd, dim)) * s, fmt)
        add(p + "attn_k.weight", rng.standard_normal((n_kv_heads * hd, dim)) * s, fmt)
        add(p + "attn_v.weight", rng.standard_normal((n_kv_heads * hd, dim)) * s, fmt)
        add(p + "attn_output.weight", rng.standard_normal((dim, n_heads * hd)) * s, fmt)
        add(p + "ffn_norm.weight", 1.0 + 0.1 * rng.standard_normal(dim), "f32")
        add(p + "ffn_gate.weight", rng.standard_normal((hidden, dim)) * s, fmt)
        add(p + "ffn_up.weight", rng.standard_normal((hidden, dim)) * s, fmt)
        add(p + "ffn_down.weight", rng.standard_normal((dim, hidden)) / np.sqrt(hidden), fmt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    decoded["_config"] = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                              vocab=vocab, rope_base=rope_base, eps=eps, tied=tied)
    return decoded


def add_byte_tokenizer(w, vocab):
    """A byte-level BPE vocabulary: the 256 byte symbols, two merges, and ChatML's control tokens at the end."""
    from tokenizers.pre_tokenizers import ByteLevel

    assert vocab == TINY_VOCAB, f"the tiny tokenizer has {TINY_VOCAB} tokens"
    tokens = sorted(ByteLevel.alphabet()) + ["\u0120t", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (vocab - 3) + [3, 3, 3]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["\u0120 t", "h e"])
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 3)
    w.add_add_bos_token(False)


def reference_logits(wts, tokens):
    """float64 llama forward over all positions of tokens; returns (len, vocab)."""
    c = wts["_config"]
    dim, nh, nkv = c["dim"], c["n_heads"], c["n_kv_heads"]
    hd = dim // nh
    eps = c["eps"]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    T = len(tokens)
    x = wts["token_embd.weight"][np.asarray(tokens)]
    pos = np.arange(T)[:, None]
    inv = c["rope_base"] ** (-2.0 * np.arange(hd // 2) / hd)
    ang = pos * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v, nheads):  # (T, nheads*hd): rotate adjacent pairs
        v = v.reshape(T, nheads, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        out = np.stack([a * cos[:, None] - b * sin[:, None], a * sin[:, None] + b * cos[:, None]], -1)
        return out.reshape(T, nheads * hd)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        h = rms(x, wts[p + "attn_norm.weight"])
        q = rope(h @ wts[p + "attn_q.weight"].T, nh).reshape(T, nh, hd)
        k = rope(h @ wts[p + "attn_k.weight"].T, nkv).reshape(T, nkv, hd)
        v = (h @ wts[p + "attn_v.weight"].T).reshape(T, nkv, hd)
        out = np.empty((T, nh, hd))
        for hh in range(nh):
            g = hh // (nh // nkv)
            s = q[:, hh] @ k[:, g].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            out[:, hh] = s @ v[:, g]
        x = x + out.reshape(T, nh * hd) @ wts[p + "attn_output.weight"].T
        h = rms(x, wts[p + "ffn_norm.weight"])
        gate = h @ wts[p + "ffn_gate.weight"].T
        up = h @ wts[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ wts[p + "ffn_down.weight"].T
    x = rms(x, wts["output_norm.weight"])
    head = wts["token_embd.weight"] if c["tied"] else wts["output.weight"]
    return x @ head.T
