"""Text <-> token ids for GGUF language models, built from the file's ``tokenizer.ggml.*`` metadata.

The BPE itself is the ``tokenizers`` library's; this module only translates GGUF metadata into a ``tokenizers``
pipeline (pre-tokenizer regexes as llama.cpp names them, byte-level mapping, control tokens as special added
tokens) and keeps llama.cpp's conventions for BOS/EOS and end-of-generation tokens.

Two encoders exist on purpose. ``encode`` is for text a user or a model wrote: a string such as "<|im_start|>" in it
stays plain text and becomes ordinary BPE pieces, so nobody can forge chat-template markup from inside a message.
``encode_special`` is for template markup only, where control-token strings do become control tokens.
Decoding goes through each token's raw bytes so that streaming and whole-sequence decoding agree byte for byte.

This module takes plain metadata dicts; it must not open files or know about models, sampling or templates.
"""
from __future__ import annotations

import codecs
import operator
import re
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence

from ..errors import InvalidArgumentError, ModelFormatError, check_text

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("gpt2",)

# Pre-tokenizer regexes, as in llama.cpp's llm_tokenizer_bpe (each list is applied in order; text between matches is
# kept as its own piece, like llama.cpp's unicode_regex_split and tokenizers' Split(behavior="isolated")).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT = r"\p{N}"

# tokenizer.ggml.pre -> (regexes, ignore_merges, default add_bos). "default" means GPT-2's regex here; note that
# llama.cpp's own "default" case uses a llama3-like regex instead — we follow what byte-level GPT-2 vocabularies
# were trained with. "smollm" and its relatives split every digit on its own first (SmolLM2's tokenizer.json:
# Digits(individual_digits=True) then ByteLevel).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": ((_GPT2,), False, False),
    "gpt2": ((_GPT2,), False, False),
    "gpt-2": ((_GPT2,), False, False),
    "llama-bpe": ((_LLAMA3,), True, True),
    "llama3": ((_LLAMA3,), True, True),
    "smollm": ((_DIGIT, _GPT2), False, False),
    "starcoder": ((_DIGIT, _GPT2), False, False),
    "refact": ((_DIGIT, _GPT2), False, False),
    "qwen2": ((_QWEN2,), False, False),
}
FALLBACK_PRE = "gpt2"

# end-of-turn / end-of-text markers that stop generation when the vocabulary has them as control tokens
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>",
                      "<|end_of_text|>", "</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE vocabularies are spelled in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# a byte-fallback token's spelling (TOKEN_BYTE); llama.cpp reads the two characters after "<0x" with strtol, so a
# malformed one would decode to some other byte (often 0) without a word: edgert refuses it when the file loads
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _meta_int(meta: Mapping, key: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    try:  # numpy arrays have __index__ too, but only a one-element integer array gets through it
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise ModelFormatError(f"GGUF metadata {key} must be an integer, found {type(v).__name__} {v!r}") from None


def _meta_bool(meta: Mapping, key: str, default: bool) -> bool:
    v = meta.get(key)
    if v is None:
        return default
    if not isinstance(v, (bool, int)):
        raise ModelFormatError(f"GGUF metadata {key} must be a bool, found {type(v).__name__} {v!r}")
    return bool(v)



def _token_types(token_types) -> list[int]:
    """tokenizer.ggml.token_type as Python ints; integers only (int() would also take "3" or 1.5 from a hostile
    file), else ModelFormatError naming the first value that is not one."""
    bad = token_types
    try:
        types = []
        for bad in token_types:
            types.append(operator.index(bad))
        return types
    except TypeError:
        raise ModelFormatError("GGUF tokenizer.ggml.token_type must be an array of integers, found "
                               f"{type(bad).__name__} {bad!r}"[:300]) from None

class Tokenizer:
    """Byte-level BPE tokenizer for a GGUF model (``tokenizer.ggml.model == "gpt2"``).

    Build it with :meth:`from_gguf_metadata`. Ids are ints in ``range(vocab_size)``.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None, *,
                 pre: str = "gpt2", bos_id: int | None = None, eos_id: int | None = None,
                 unknown_id: int | None = None, padding_id: int | None = None,
                 add_bos: bool | None = None, add_eos: bool = False):
        from tokenizers import AddedToken, Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tokens = list(tokens)
        n = len(tokens)
        if n == 0:
            raise ModelFormatError("GGUF tokenizer.ggml.tokens is empty; expected the model's vocabulary")
        if not all(isinstance(t, str) for t in tokens):
            raise ModelFormatError("GGUF tokenizer.ggml.tokens must be a list of strings")
        types = [TOKEN_NORMAL] * n if token_types is None else _token_types(token_types)
        if len(types) != n:
            raise ModelFormatError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries, expected one per "
                                   f"token ({n})")
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TOKEN_BYTE and t.startswith("<0x") and not _BYTE_TOKEN.fullmatch(t):
                raise ModelFormatError(f"GGUF tokenizer.ggml.tokens[{i}] = {t[:40]!r} is a byte token (token_type "
                                       f"{TOKEN_BYTE}) but not spelled <0xHH> with two hex digits")
        for key, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("unknown_token_id", unknown_id),
                       ("padding_token_id", padding_id)):
            if v is not None and not 0 <= v < n:
                raise ModelFormatError(f"GGUF tokenizer.ggml.{key} = {v} is outside the vocabulary (0..{n - 1})")

        if pre not in PRE_TOKENIZERS:
            warnings.warn(f"edgert: unknown tokenizer.ggml.pre {pre!r}; falling back to the {FALLBACK_PRE!r} "
                          f"pre-tokenizer (known: {', '.join(sorted(PRE_TOKENIZERS))}); tokenization may differ from "
                          f"the model's training", RuntimeWarning, stacklevel=3)
            pre = FALLBACK_PRE
        regexes, ignore_merges, default_add_bos = PRE_TOKENIZERS[pre]
        self.pre = pre
        self.tokens = tokens
        self.token_types = types
        self.bos_id, self.eos_id, self.unknown_id, self.padding_id = bos_id, eos_id, unknown_id, padding_id
        self.add_bos = default_add_bos if add_bos is None else bool(add_bos)
        self.add_eos = bool(add_eos)
        if self.add_bos and bos_id is None:
            raise ModelFormatError("GGUF asks for a BOS token (add_bos_token) but has no tokenizer.ggml.bos_token_id")
        if self.add_eos and eos_id is None:
            raise ModelFormatError("GGUF asks for an EOS token (add_eos_token) but has no tokenizer.ggml.eos_token_id")

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # a duplicated spelling keeps its first id, like llama.cpp's token_to_id
        pairs = []
        for i, m in enumerate(merges):
            # llama.cpp splits at the first space after position 0, so a merge may start with a literal space
            cut = m.find(" ", 1) if isinstance(m, str) else -1
            if cut < 0:
                raise ModelFormatError(f"GGUF tokenizer.ggml.merges[{i}] = {m!r} is not a pair 'left right'")
            pairs.append((m[:cut], m[cut + 1:]))

        unk = tokens[unknown_id] if unknown_id is not None else None
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=False, byte_fallback=False,
                             ignore_merges=ignore_merges)
        except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge of a token not in the vocab
            raise ModelFormatError(f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {exc}") from None
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        added = []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TOKEN_CONTROL:
                added.append(AddedToken(t, special=True, normalized=False))
            elif ty == TOKEN_USER_DEFINED:
                # llama.cpp matches user-defined tokens in any text (parse_special or not); so do we
                added.append(AddedToken(t, special=False, normalized=False))
        if added:
            hf.add_tokens(added)
        for a in added:
            got = hf.token_to_id(a.content)
            if got is None or tokens[got] != a.content:
                raise ModelFormatError(f"GGUF special token {a.content!r} could not be registered")
        # One pipeline in two modes: encode() treats control-token spellings as plain text (user content),
        # encode_special() turns them into control ids (template markup). The mode is a flag on the tokenizer, so
        # switching it and encoding happen under one lock.
        self._hf = hf
        self._mode_lock = threading.Lock()

        # each token's bytes, worked out on first use: decoding touches a few hundred tokens, not the vocabulary
        self._pieces: list[bytes | None] = [None] * n
        self._is_control = [ty == TOKEN_CONTROL for ty in types]
        stops = [] if eos_id is None else [eos_id]
        for name in END_OF_TURN_TOKENS:
            i = vocab.get(name)
            if i is not None and types[i] == TOKEN_CONTROL and i not in stops:
                stops.append(i)
        self.stop_ids: tuple[int, ...] = tuple(stops)

    @staticmethod
    def _piece_bytes(token: str, ty: int) -> bytes:
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            return token.encode("utf-8")  # stored verbatim, not in the byte-level alphabet
        if ty == TOKEN_UNUSED:
            return b""
        m = _BYTE_TOKEN.fullmatch(token) if ty == TOKEN_BYTE else None
        if m:  # (a malformed <0x..> byte token was refused at load)
            return bytes([int(m.group(1), 16)])
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in token)
        except KeyError:
            return token.encode("utf-8")  # not byte-level spelled; llama.cpp would print it as is

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, object]) -> "Tokenizer":
        """Build the tokenizer from a GGUF metadata dict (``GGUFFile.metadata``)."""
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ModelFormatError("GGUF has no tokenizer.ggml.model; edgert needs an embedded tokenizer "
                                   f"(supported: {', '.join(SUPPORTED_MODELS)})")
        if not isinstance(model, str) or model not in SUPPORTED_MODELS:  # (an array cannot be tested with `in`)
            raise ModelFormatError(f"GGUF tokenizer.ggml.model is {model!r}; edgert supports "
                                   f"{', '.join(repr(m) for m in SUPPORTED_MODELS)} (byte-level BPE) only — "
                                   "use a model with a byte-level BPE vocabulary")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(tokens, (list, tuple)):
            raise ModelFormatError("GGUF tokenizer.ggml.tokens is missing or not a list of strings")
        if not isinstance(merges, (list, tuple)):
            raise ModelFormatError("GGUF tokenizer.ggml.merges is missing or not a list of strings "
                                   "(a gpt2 tokenizer needs its merges)")
        types = meta.get("tokenizer.ggml.token_type")
        pre = meta.get("tokenizer.ggml.pre")
        if pre is None:
            pre = "default"
        if not isinstance(pre, str):
            raise ModelFormatError(f"GGUF tokenizer.ggml.pre must be a string, found {pre!r}")
        pre = pre or "default"
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(tokens, merges, types, pre=pre,
                   bos_id=_meta_int(meta, "tokenizer.ggml.bos_token_id"),
                   eos_id=_meta_int(meta, "tokenizer.ggml.eos_token_id"),
                   unknown_id=_meta_int(meta, "tokenizer.ggml.unknown_token_id"),
                   padding_id=_meta_int(meta, "tokenizer.ggml.padding_token_id"),
                   add_bos=None if add_bos is None else _meta_bool(meta, "tokenizer.ggml.add_bos_token", False),
                   add_eos=_meta_bool(meta, "tokenizer.ggml.add_eos_token", False))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _wrap(self, ids: list[int], add_special: bool) -> list[int]:
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Tokenize user or model text. Control-token spellings in ``text`` stay text. ``add_special`` adds BOS/EOS
        as the model's add_bos_token/add_eos_token flags say."""
        text = check_text("text", text)
        if not isinstance(add_special, bool):  # "yes" was taken as true
            raise InvalidArgumentError(f"add_special must be True or False, got {add_special!r}")
        ids = self._encode(text, special=False) if text else []
        return self._wrap(ids, add_special)

    def encode_special(self, text: str, add_special: bool = False) -> list[int]:
        """Tokenize template markup: control-token spellings become their control ids."""
        text = check_text("text", text)
        ids = self._encode(text, special=True) if text else []
        return self._wrap(ids, add_special)

    def _encode(self, text: str, special: bool) -> list[int]:
        with self._mode_lock:
            self._hf.encode_special_tokens = not special
            # encode_batch releases the GIL while it works; encode holds it (bar a thread's first call), so a
            # megabyte tokenized on a server's worker thread stalled its event loop for seconds
            return list(self._hf.encode_batch([text], add_special_tokens=False)[0].ids)

    def _piece(self, j: int) -> bytes:
        p = self._pieces[j]
        if p is None:
            p = self._pieces[j] = self._piece_bytes(self.tokens[j], self.token_types[j])
        return p

    def _check_id(self, i) -> int:
        try:  # ints only: int() would also take 1.5 or "7"
            if isinstance(i, bool):
                raise TypeError
            j = operator.index(i)
        except TypeError:
            raise InvalidArgumentError(f"token id must be an int, got {i!r}") from None
        if not 0 <= j < len(self.tokens):
            raise InvalidArgumentError(f"token id {j} is outside the vocabulary (0..{len(self.tokens) - 1})")
        return j

    def token_to_piece(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (may be part of a UTF-8 sequence)."""
        return self._piece(self._check_id(token_id))

    def is_control(self, token_id: int) -> bool:
        return self._is_control[self._check_id(token_id)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Token ids -> text. Broken UTF-8 (e.g. a sequence cut mid-character) decodes to U+FFFD.
        ``skip_special`` leaves control tokens out."""
        if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
            raise InvalidArgumentError(f"ids must be a list of token ids (ints in [0, {len(self.tokens)})), got "
                                       f"{type(ids).__name__}")
        out = []
        for i in ids:
            j = self._check_id(i)
            if not (skip_special and self._is_control[j]):
                out.append(self._piece(j))
        return b"".join(out).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"Tokenizer(gpt2/{self.pre}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"add_bos={self.add_bos}, stop_ids={list(self.stop_ids)})")


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns only complete UTF-8 text and keeps a multi-byte character that
    is split over tokens (an emoji, a CJK character) until its last byte arrives. Invalid bytes become U+FFFD, so the
    concatenation of every ``push`` plus ``flush()`` equals ``Tokenizer.decode`` of the same ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        j = self._tok._check_id(token_id)
        if self._skip and self._tok._is_control[j]:
            return ""
        return self._dec.decode(self._tok._piece(j))

    def flush(self) -> str:
        """Emit what is still held (an incomplete sequence becomes U+FFFD) and reset."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
