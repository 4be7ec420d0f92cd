"""Next-token choice from a logits vector, in llama.cpp's default order:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.

The cut filters (top-k/top-p/min-p) see the un-tempered distribution, as in llama.cpp's sampler chain; temperature
only reshapes what survives them. Temperature 0 is greedy (after the penalty): argmax, ties to the lowest id.
Random draws come from ``numpy.random.Generator(PCG64(seed))``, so one seed gives one sequence on every platform.

This module sees only numbers: no tokenizer, no model, no allocation proportional to the vocabulary except one
copy of the logits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgumentError, ShapeError, check_count, check_number


_F32_MAX = float(np.finfo(np.float32).max)


class Sampler:
    """Samples a token id from logits.

    temperature: 0 = greedy, else logits / temperature before the draw (0..100).
    top_k: keep the k largest logits (0 = all). top_p: keep the smallest head whose probability reaches p (1 = off;
    0 keeps the most probable token, as llama.cpp keeps at least one). min_p: keep tokens with p >= min_p * p_max
    (0 = off; 1 keeps the most probable token and any tied with it). repeat_penalty: > 1 discourages the ids in the last
    ``repeat_last_n`` history entries — positive logits are divided by it, negative ones multiplied (1 = off).
    seed: None draws a fresh seed from the OS.
    """

    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, seed: int | None = None, repeat_last_n: int = 64):
        self.temperature = check_number("temperature", temperature, 0.0, 100.0)
        self.top_k = check_count("top_k", top_k, note=" (0 turns it off)")
        self.top_p = check_number("top_p", top_p, 0.0, 1.0)
        self.min_p = check_number("min_p", min_p, 0.0, 1.0)
        self.repeat_penalty = check_number("repeat_penalty", repeat_penalty, 0.0, 100.0, lo_open=True)
        self.repeat_last_n = check_count("repeat_last_n", repeat_last_n, note=" (0 turns it off)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InvalidArgumentError(f"seed must be an int >= 0 or None, got {seed!r}")
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream (same seed -> same draws as a fresh Sampler)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InvalidArgumentError(f"seed must be an int >= 0 or None, got {seed!r}")
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p}, repeat_penalty={self.repeat_penalty}, repeat_last_n={self.repeat_last_n}, "
                f"seed={self.seed})")

    def apply_penalty(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Return a float32 copy of ``logits`` with the repetition penalty applied (llama.cpp's formula)."""
        x = np.array(logits, dtype=np.float32, copy=True)
        if self.repeat_penalty != 1.0 and self.repeat_last_n > 0 and len(history) > 0:
            recent = np.unique(np.asarray(history[-self.repeat_last_n:], dtype=np.int64))
            if recent[0] < 0 or recent[-1] >= x.shape[0]:
                raise InvalidArgumentError(f"history holds token ids outside 0..{x.shape[0] - 1}")
            v = x[recent]
            with np.errstate(over="ignore", under="ignore"):
                v = np.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
            # a tiny penalty (1e-40) divided a logit past float32 (+inf: "nothing can be sampled", a 500 from the
            # server); the largest float stands for it, so the boosted token is simply the most likely
            x[recent] = np.clip(v, -_F32_MAX, _F32_MAX)
        return x

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The ids that survive penalty/top-k/top-p/min-p, best first, and their final probabilities (after
        temperature). Greedy (temperature 0) gives one id with probability 1. ``sample`` draws from exactly this."""
        x = self._check(logits)
        x = self.apply_penalty(x, history)
        n = x.shape[0]
        if self.temperature == 0.0 or self.top_k == 1:
            best = int(np.argmax(x))  # first maximum: ties go to the lowest id
            return np.array([best], dtype=np.int64), np.ones(1, dtype=np.float64)
        if 0 < self.top_k < n:
            idx = np.argpartition(-x, self.top_k - 1)[:self.top_k]
            idx.sort()  # equal logits then order by id, below
        else:
            idx = np.arange(n)
        lg = x[idx].astype(np.float64)
        top = lg.max()
        if not math.isfinite(top):
            raise InvalidArgumentError("every logit is -inf (or the best is +inf); nothing can be sampled")
        # top-p normalises over everything top-k left; min-p only compares with the maximum, so applying it before
        # sorting gives the same set (top-p just trims a tail) and keeps the sort small when top-k is off
        z = np.exp(lg - top).sum()
        if self.min_p > 0.0:
            head = np.flatnonzero(lg >= top + math.log(self.min_p))
            idx, lg = idx[head], lg[head]
        order = np.argsort(-lg, kind="stable")
        idx, lg = idx[order], lg[order]
        if self.top_p < 1.0:
            cum = np.cumsum(np.exp(lg - top))
            # keep through the first token whose cumulative probability reaches top_p (llama.cpp: cum >= p)
            keep = int(np.searchsorted(cum, self.top_p * z, side="left")) + 1
            idx, lg = idx[:keep], lg[:keep]
        p = np.exp((lg - lg[0]) / self.temperature)
        return idx, p / p.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Pick the next token id from ``logits`` (shape (vocab,)) given the ids generated so far."""
        idx, p = self.candidates(logits, history)
        if idx.shape[0] == 1:
            return int(idx[0])
        cdf = np.cumsum(p)
        j = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(idx[min(j, idx.shape[0] - 1)])

    @staticmethod
    def _check(logits) -> np.ndarray:
        x = np.asarray(logits)
        if x.ndim != 1 or x.shape[0] == 0:
            raise ShapeError(f"logits must have shape (vocab,), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidArgumentError(f"logits must be floating point, got {x.dtype}")
        if np.isnan(x).any():
            raise InvalidArgumentError("logits contain NaN; the model produced garbage (check the weights/inputs)")
        return x
