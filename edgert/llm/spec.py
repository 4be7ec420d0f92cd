"""What edgert's llama decoder needs from a GGUF file, checked before any weight reaches C.

``llama_spec`` reads the hyper-parameters into a LlamaConfig and walks the tensor list in the order the C model
takes it, checking presence, ggml shape and type for each role. Anything the decoder would silently compute wrong
(partial rotary, rope scaling, mixture-of-experts, tensors it would ignore) is refused with ModelFormatError.
It reads only the directory and metadata; it never touches tensor data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ModelFormatError
from ..formats.gguf import GGUFFile, TensorInfo

LAYER_ROLES = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
NORM_TYPES = ("F32",)

MAX_DIM = 1 << 20  # dims, heads, layers
MAX_CONTEXT = 1 << 24
MAX_VOCAB = 1 << 24


@dataclass(frozen=True)
class LlamaConfig:
    dim: int  # embedding width
    hidden_dim: int  # feed-forward width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # dim // n_heads
    vocab_size: int
    context_length: int
    rope_base: float
    norm_eps: float
    rope_dim: int  # == head_dim (partial rotary is refused)
    tied_output: bool  # output projection shares token_embd


@dataclass(frozen=True)
class LlamaSpec:
    config: LlamaConfig
    # ("token_embd", ..), ("output_norm", ..), ("output", ..: token_embd's info when tied),
    # then per layer the 9 LAYER_ROLES as ("blk.{i}.{role}", info)
    tensors: list[tuple[str, TensorInfo]]


def _int(md: dict, key: str, default=None, lo: int = 1, hi: int = MAX_DIM) -> int:
    if key not in md:
        if default is None:
            raise ModelFormatError(f"metadata {key!r} is missing; a llama GGUF must set it")
        return default
    v = md[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ModelFormatError(f"metadata {key!r} must be an integer, found {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise ModelFormatError(f"metadata {key!r} must be in {lo}..{hi}, found {v}")
    return v


def _float(md: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = md.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ModelFormatError(f"metadata {key!r} must be a number, found {type(v).__name__} {v!r}")
    v = float(v)
    if not (math.isfinite(v) and lo < v <= hi):
        raise ModelFormatError(f"metadata {key!r} must be a finite number in ({lo}, {hi}], found {v}")
    return v


def _config(g: GGUFFile) -> tuple[LlamaConfig, int]:
    md = g.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"general.architecture is {arch!r}; edgert's decoder supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    p = f"{arch}."
    dim = _int(md, p + "embedding_length")
    hidden = _int(md, p + "feed_forward_length")
    n_layers = _int(md, p + "block_count")
    n_heads = _int(md, p + "attention.head_count")
    n_kv = _int(md, p + "attention.head_count_kv", n_heads)
    ctx = _int(md, p + "context_length", hi=MAX_CONTEXT)
    rope_base = _float(md, p + "rope.freq_base", 10000.0, 0.0, 1e12)
    eps = _float(md, p + "attention.layer_norm_rms_epsilon", 1e-5, 0.0, 1.0)
    if dim % n_heads:
        raise ModelFormatError(f"{p}embedding_length {dim} is not divisible by {p}attention.head_count {n_heads}")
    head_dim = dim // n_heads
    if head_dim % 2:
        raise ModelFormatError(f"head_dim = {dim} / {n_heads} = {head_dim} is odd; rotary embedding needs it even")
    if n_kv > n_heads or n_heads % n_kv:
        raise ModelFormatError(
            f"{p}attention.head_count {n_heads} must be a multiple of {p}attention.head_count_kv {n_kv}"
        )
    rope_dim = _int(md, p + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelFormatError(
            f"{p}rope.dimension_count is {rope_dim} but head_dim is {head_dim}: partial rotary embedding is not supported"
        )
    for key in (p + "attention.key_length", p + "attention.value_length"):
        if key in md and _int(md, key) != head_dim:
            raise ModelFormatError(f"metadata {key!r} is {md[key]} but head_dim is {head_dim}: unsupported head layout")
    # metadata values may be arrays (numpy): `!=` / `in` on those compare elementwise and cannot be truth-tested
    scaling = md.get(p + "rope.scaling.type", "none")
    if not isinstance(scaling, str) or scaling != "none":
        raise ModelFormatError(f"{p}rope.scaling.type is {scaling!r}; edgert supports plain rotary embedding only ('none')")
    # llama.cpp reads a missing scaling type as 'linear' and applies the factor (positions / factor); 0 means unset.
    # An explicit 'none' never scales, whatever factor the file also holds
    for key in (p + "rope.scaling.factor", p + "rope.scale_linear") if p + "rope.scaling.type" not in md else ():
        factor = md.get(key, 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor not in (0.0, 1.0):
            raise ModelFormatError(
                f"{key} is {factor!r}; edgert supports plain rotary embedding only (no scaling factor, or 1)"
            )
    experts = md.get(p + "expert_count", 0)
    if not isinstance(experts, int) or experts not in (0, 1):
        raise ModelFormatError(f"{p}expert_count is {experts!r}: mixture-of-experts models are not supported")

    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelFormatError("tensor 'token_embd.weight' is missing")
    if len(emb.shape) != 2 or emb.shape[0] != dim:
        raise ModelFormatError(
            f"tensor 'token_embd.weight' has shape {list(emb.shape)}; expected [{dim}, vocab] (embedding_length {dim})"
        )
    vocab = emb.shape[1]
    if vocab > MAX_VOCAB:
        raise ModelFormatError(f"vocabulary of {vocab} tokens exceeds the supported {MAX_VOCAB}")
    if p + "vocab_size" in md and _int(md, p + "vocab_size", hi=MAX_VOCAB) != vocab:
        raise ModelFormatError(f"{p}vocab_size is {md[p + 'vocab_size']} but token_embd.weight holds {vocab} rows")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, (list, tuple)):
        raise ModelFormatError(f"tokenizer.ggml.tokens must be an array of strings, found {type(tokens).__name__}")
    if tokens is not None and len(tokens) != vocab:
        raise ModelFormatError(f"tokenizer.ggml.tokens has {len(tokens)} entries but token_embd.weight holds {vocab} rows")
    cfg = LlamaConfig(
        dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=vocab, context_length=ctx, rope_base=rope_base, norm_eps=eps, rope_dim=rope_dim,
        tied_output="output.weight" not in g.tensors,
    )
    return cfg, vocab


def _tensor(g: GGUFFile, name: str, shape: tuple[int, ...], types: tuple[str, ...]) -> TensorInfo:
    t = g.tensors.get(name)
    if t is None:
        raise ModelFormatError(f"tensor {name!r} is missing; a llama GGUF needs it")
    if t.shape != shape:
        raise ModelFormatError(f"tensor {name!r} has shape {list(t.shape)}; expected {list(shape)}")
    if t.type_name not in types:
        what = "norm weights must be" if types == NORM_TYPES else "supported:"
        raise ModelFormatError(
            f"unsupported type {t.type_name} for tensor {name!r} ({what} {', '.join(types)})"
        )
    return t


def llama_spec(g: GGUFFile) -> LlamaSpec:
    """Validate a llama GGUF and list its tensors in decoder order; raises ModelFormatError on any mismatch."""
    c, vocab = _config(g)
    d, h, q, kv = c.dim, c.hidden_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    mat = SUPPORTED_TYPES
    emb = _tensor(g, "token_embd.weight", (d, vocab), mat)
    out = [("token_embd", emb), ("output_norm", _tensor(g, "output_norm.weight", (d,), NORM_TYPES))]
    out.append(("output", emb if c.tied_output else _tensor(g, "output.weight", (d, vocab), mat)))
    shapes = {
        "attn_norm": ((d,), NORM_TYPES), "attn_q": ((d, q), mat), "attn_k": ((d, kv), mat), "attn_v": ((d, kv), mat),
        "attn_output": ((q, d), mat), "ffn_norm": ((d,), NORM_TYPES), "ffn_gate": ((d, h), mat),
        "ffn_up": ((d, h), mat), "ffn_down": ((h, d), mat),
    }
    for i in range(c.n_layers):
        for role in LAYER_ROLES:
            shape, types = shapes[role]
            out.append((f"blk.{i}.{role}", _tensor(g, f"blk.{i}.{role}.weight", shape, types)))
    used = {t.name for _, t in out}
    extra = [n for n in g.tensors if n not in used]
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ModelFormatError(
            f"{len(extra)} tensors a {c.n_layers}-layer llama does not use: {shown}; the model needs features edgert's "
            f"decoder lacks (or block_count is wrong)"
        )
    return LlamaSpec(config=c, tensors=out)
