"""LlamaModel: a validated GGUF llama model handed to the C decoder.

Weights are used in place: the C core gets pointers into the memory-mapped GGUF file, so loading costs one parse of
the header and the weights' pages are read from disk as the first forward pass touches them. Where the ISA in use
reads the x16 layout with its own kernels (``edgert.repack_pays``), the block-format projections and the output head
are repacked at load instead (``repack``): the copies replace the file's pages in memory (those are released), and
loading reads every weight once. Resident memory stays about the same, except that a tied output head is then held
twice: its x16 copy, and the embedding's pages as tokens bring them back (at most the embedding's size). The C side
owns the run state and the KV cache (fp16 K transposed in tiles of 32 positions, fp16 V by position); their size is ``state_bytes``. This module must not tokenize, sample or talk to users: that is llm.py's job.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .. import native
from ..errors import InvalidArgumentError, ModelFormatError
from ..formats.gguf import GGUFFile, open_gguf
from ..native import ffi, lib
from ..quant import BLOCK_FORMATS, FORMAT_BY_ID, QTensor, aligned_empty, repack, repack_pays, repack_size
from .spec import LlamaSpec, llama_spec

DEFAULT_N_BATCH = 64  # tokens per prefill pass: large enough for the GEMM path, small enough for L2-resident activations


class LlamaModel:
    """A loaded model: ``forward(tokens, pos)`` runs tokens at positions pos.. and returns logits."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_batch: int = DEFAULT_N_BATCH,
                 clamp_ctx: bool = False, repack: bool | None = None):
        """clamp_ctx: an n_ctx above the model's context length is lowered to it (else it is an error).
        repack: None repacks the block-format matrices (not the token embedding) when it pays, True always, False
        never; the logits are the same bits either way."""
        if repack is not None and not isinstance(repack, bool):
            raise InvalidArgumentError(f"repack must be None, True or False, got {repack!r}")
        self.repack = repack
        self.path = os.fspath(path)
        self.gguf: GGUFFile = open_gguf(self.path)
        try:
            self.spec: LlamaSpec = llama_spec(self.gguf)
            cfg = self.spec.config
            if not isinstance(n_ctx, int) or n_ctx < 1:
                raise InvalidArgumentError(f"n_ctx must be a positive int, got {n_ctx!r}")
            self.requested_n_ctx = n_ctx
            if n_ctx > cfg.context_length and clamp_ctx:
                n_ctx = cfg.context_length
            if n_ctx > cfg.context_length:
                raise InvalidArgumentError(
                    f"n_ctx={n_ctx} exceeds the model's context length {cfg.context_length}; use n_ctx <= {cfg.context_length}"
                )
            if not isinstance(n_batch, int) or n_batch < 1:
                raise InvalidArgumentError(f"n_batch must be a positive int, got {n_batch!r}")
            self.n_ctx = n_ctx
            self.n_batch = min(n_batch, n_ctx)
            self._build()
        except BaseException:
            self.gguf.close()
            raise

    def _build(self) -> None:
        c = self.spec.config
        cfg = ffi.new(
            "et_llama_config *",
            {
                "dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size, "n_ctx": self.n_ctx,
                "n_batch": self.n_batch, "rope_base": c.rope_base, "norm_eps": c.norm_eps,
            },
        )
        tensors = ffi.new("et_tensor[]", len(self.spec.tensors))
        self._views = []  # the mmap views and repacked copies the C side points into: kept alive with the model
        # tensor name -> its GGUF blocks, for the matrices repacked (a tied output head shares the embedding's name)
        to_pack = {info.name: QTensor.from_raw(FORMAT_BY_ID[info.type_id], info.shape[::-1],
                                               self.gguf.tensor_bytes(info.name))
                   for role, info in self.spec.tensors if role != "token_embd" and self._repacks(info.type_id)}
        # one arena for all of them: numpy advises huge pages for large arrays (MADV_HUGEPAGE, which THP's
        # madvise mode needs; measured: 63 of 64 MiB on huge pages), one TLB entry per 2 MiB of weights
        arena = aligned_empty(sum(repack_size(w) for w in to_pack.values()))
        packed, at = {}, 0
        for name, w in to_pack.items():
            packed[name] = repack(w, arena[at:]).raw
            at += packed[name].nbytes
            self.gguf.release(name)  # the copy replaces these pages; a tied embedding's rows come back as used
        for i, (role, info) in enumerate(self.spec.tensors):
            view, type_id = self.gguf.tensor_bytes(info.name), info.type_id
            if role != "token_embd" and info.name in packed:
                view, type_id = packed[info.name], info.type_id | lib.ET_TYPE_X16
            self._views.append(view)
            tensors[i].data = ffi.cast("void *", view.ctypes.data)
            tensors[i].type = type_id
            tensors[i].nbytes = view.nbytes
        out = ffi.new("et_llama **")
        st = lib.et_llama_build(cfg, tensors, len(self.spec.tensors), out)
        if st:
            msg = ffi.string(lib.et_last_error()).decode()
            if st == 1:
                raise ModelFormatError(f"{self.path}: {msg}")
            native.check(st)
        self._handle = ffi.gc(out[0], lib.et_llama_free)

    def _repacks(self, type_id: int) -> bool:
        fmt = FORMAT_BY_ID.get(type_id)
        return fmt in BLOCK_FORMATS and (repack_pays(fmt) if self.repack is None else self.repack)

    @property
    def config(self):
        return self.spec.config

    @property
    def vocab_size(self) -> int:
        return self.spec.config.vocab_size

    @property
    def state_bytes(self) -> int:
        """Bytes of run state and KV cache allocated by the C core."""
        return int(lib.et_llama_state_bytes(self._live()))

    def _live(self):
        """The C model, or InvalidArgumentError once close() has freed it."""
        h = getattr(self, "_handle", None)
        if h is None:
            raise InvalidArgumentError(f"the model is closed ({self.path}): load it again to use it")
        return h

    def token_ids(self, tokens, name: str = "tokens") -> np.ndarray:
        """``tokens`` (a list/tuple of ints or a 1-D integer array) as a contiguous int32 array, each id checked to
        be an int in [0, vocab_size); InvalidArgumentError naming ``name`` and the first bad id otherwise."""
        n = self.vocab_size
        if isinstance(tokens, np.ndarray):
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise InvalidArgumentError(f"{name} must be a 1-D integer array of token ids, got a "
                                           f"{tokens.ndim}-D {tokens.dtype} array")
            bad = (tokens < 0) | (tokens >= n)
            if bad.any():
                i = int(np.argmax(bad))
                raise InvalidArgumentError(f"{name}[{i}] = {tokens[i]} is outside the vocabulary [0, {n})")
            return np.ascontiguousarray(tokens, dtype=np.int32)
        if isinstance(tokens, (str, bytes, Mapping)) or not isinstance(tokens, Sequence):
            raise InvalidArgumentError(f"{name} must be a list of token ids (ints in [0, {n})), got "
                                       f"{type(tokens).__name__}")
        ids = []
        for i, t in enumerate(tokens):
            try:
                if isinstance(t, bool):
                    raise TypeError
                v = operator.index(t)
            except TypeError:
                raise InvalidArgumentError(f"{name}[{i}] must be an int token id, got {t!r}") from None
            if not 0 <= v < n:
                raise InvalidArgumentError(f"{name}[{i}] = {v} is outside the vocabulary [0, {n})")
            ids.append(v)
        return np.array(ids, dtype=np.int32)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step streams: every matrix including the output head (which is the
        embedding table when tied); the embedding lookup itself reads one row."""
        return sum(info.nbytes for role, info in self.spec.tensors if role != "token_embd")

    def forward(self, tokens, pos: int, logits_all: bool = False, threads: int | None = None) -> np.ndarray:
        """Run tokens at positions pos .. pos+len-1. Returns (len, vocab) logits when logits_all, else (vocab,).
        tokens: a list of token ids or a 1-D integer array (``token_ids``); pos: an int >= 0; threads: None (the
        pool's size) or an int in [1, native.MAX_THREADS]."""
        handle = self._live()
        ids = self.token_ids(tokens)
        n = int(ids.size)
        if n < 1:
            raise InvalidArgumentError("forward needs at least one token")
        if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or pos < 0:
            raise InvalidArgumentError(f"pos must be an int >= 0 (the position of the first token), got {pos!r}")
        pos = int(pos)
        if pos + n > self.n_ctx:
            raise InvalidArgumentError(
                f"context full: positions {pos}..{pos + n - 1} do not fit n_ctx={self.n_ctx}"
            )
        nth = native.check_threads(threads)
        out = np.empty((n, self.vocab_size) if logits_all else (self.vocab_size,), dtype=np.float32)
        native.check(
            lib.et_llama_forward(
                handle, native.ptr(ids, "int32_t *"), n, pos, native.ptr(out, "float *"),
                1 if logits_all else 0, nth or 0,
            )
        )
        return out

    def close(self) -> None:
        h = getattr(self, "_handle", None)
        if h is not None:
            ffi.release(h)  # runs et_llama_free now instead of at garbage collection
            self._handle = None
        self._views = []
        self.gguf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
