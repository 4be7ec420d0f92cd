"""The one place where drift between a reference and a candidate is measured: KL divergence, perplexity, top-1
agreement, probability shift for language models; max abs error, relative L2, cosine similarity, SQNR for tensors.

Everything is computed in float64 from float32 inputs. Definitions (also in docs/migration.md):

- ``kl``: per position, KL(P_ref || P_cand) = sum_v P_ref(v) (log P_ref(v) - log P_cand(v)), in nats, over the
  softmax of each side's logits (the direction llama.cpp's ``--kl-divergence`` reports).
- ``perplexity``: exp(mean negative log-likelihood of the actual next tokens).
- ``top1``: the fraction of positions (or rows) where both sides' argmax agree.
- ``dp_top``: P_cand(t) - P_ref(t) for t the reference's top token at that position; its RMS is reported.
- ``rel_l2``: ||cand - ref||_2 / ||ref||_2 (inf when ref is all zeros and cand is not; 0 when both are).
- ``cosine``: <ref, cand> / (||ref|| ||cand||) over the flattened tensors (exactly 1 when they are equal, all zeros
  included).
- ``sqnr_db``: 10 log10(||ref||^2 / ||cand - ref||^2) (inf for identical tensors).
- ``mismatch``: the fraction of elements that differ, for integer and bool tensors (compared exactly).

Non-finite values the two sides share (NaN and NaN, inf and inf) are left out; one side's alone gives the worst
score. With no finite pair left to measure (every value NaN, or empty tensors) every tensor metric is NaN.

This module is pure numpy: it must not load models or import anything from edgert above the error types.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError


# ---- token distributions ---------------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 of (n, vocab) logits."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_stats(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position statistics of two sides' (n, vocab) logits for the same positions, ``targets`` the actual next
    tokens: ``kl``, ``nll_ref``, ``nll_cand``, ``same_top`` (bool), ``dp_top``. Arrays of length n."""
    if ref_logits.shape != cand_logits.shape or ref_logits.ndim != 2:
        raise ShapeError(f"logits must be two (n, vocab) arrays of one shape, got {ref_logits.shape} and "
                         f"{cand_logits.shape} (do the two models share a vocabulary?)")
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if targets.size != ref_logits.shape[0]:
        raise ShapeError(f"{targets.size} targets for {ref_logits.shape[0]} positions")
    lr, lc = log_softmax(ref_logits), log_softmax(cand_logits)
    pr = np.exp(lr)
    rows = np.arange(targets.size)
    top_r = lr.argmax(axis=-1)
    top_c = lc.argmax(axis=-1)
    kl = np.maximum((pr * (lr - lc)).sum(axis=-1), 0.0)  # tiny negatives are rounding
    return {
        "kl": kl,
        "nll_ref": -lr[rows, targets],
        "nll_cand": -lc[rows, targets],
        "same_top": top_r == top_c,
        "dp_top": np.exp(lc[rows, top_r]) - pr[rows, top_r],
    }


def perplexity(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll)))) if len(nll) else float("nan")


def distribution(values: np.ndarray, prefix: str) -> dict[str, float]:
    """mean / median / p99 / max of ``values`` as ``{prefix}_mean`` ...; p99 by linear interpolation."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "median", "p99", "max")}
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_median": float(np.median(v)),
            f"{prefix}_p99": float(np.percentile(v, 99)), f"{prefix}_max": float(v.max())}


def rms(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.sqrt(np.mean(v * v))) if v.size else float("nan")


def common_prefix(a, b) -> int:
    """How many leading items two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- tensors ---------------------------------------------------------------------------------------------------
def _pair(ref, cand, worst: float, equal: float) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Both tensors as flat float64, without the positions where both hold the same non-finite value (NaN and NaN,
    inf and inf: they agree exactly; identical models gave NaN metrics and failed the gate), and the value the
    metric is instead of a measurement, or None: ``equal`` (the metric of equal tensors) for empty ones, which are
    equal; ``worst`` when some non-finite value is not matched on the other side (a disagreement no finite metric
    can measure); NaN when every value is a matched non-finite one (nothing was measured, so a gate must not pass)."""
    r = np.asarray(ref)
    c = np.asarray(cand)
    if r.shape != c.shape:
        raise ShapeError(f"tensors differ in shape: reference {r.shape}, candidate {c.shape}")
    if r.size == 0:
        return r, c, equal
    r, c = r.astype(np.float64).reshape(-1), c.astype(np.float64).reshape(-1)
    finite = np.isfinite(r) & np.isfinite(c)
    if not finite.all():
        agree = (r == c) | (np.isnan(r) & np.isnan(c))
        if (~finite & ~agree).any():
            return r, c, worst
        r, c = r[finite], c[finite]
    return r, c, None if r.size else math.nan


def max_abs_error(ref, cand) -> float:
    r, c, instead = _pair(ref, cand, math.inf, 0.0)
    if instead is not None:
        return instead
    return float(np.max(np.abs(c - r)))


def relative_l2(ref, cand) -> float:
    r, c, instead = _pair(ref, cand, math.inf, 0.0)
    if instead is not None:
        return instead
    num, den = float(np.linalg.norm(c - r)), float(np.linalg.norm(r))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def cosine_similarity(ref, cand) -> float:
    r, c, instead = _pair(ref, cand, -1.0, 1.0)
    if instead is not None:
        return instead
    if np.array_equal(r, c):  # exactly 1: the quotient below rounds to 1 - 1 ulp for about 1 tensor in 4
        return 1.0
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if nr == 0.0 or nc == 0.0:
        return 0.0
    return float(np.clip(np.dot(r, c) / (nr * nc), -1.0, 1.0))


def sqnr_db(ref, cand) -> float:
    r, c, instead = _pair(ref, cand, -math.inf, math.inf)
    if instead is not None:
        return instead
    noise, signal = float(np.sum((c - r) ** 2)), float(np.sum(r * r))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def top1_agreement(ref, cand) -> float:
    """Fraction of rows (last axis = classes) whose argmax agrees."""
    r, c = np.asarray(ref), np.asarray(cand)
    if r.shape != c.shape:
        raise ShapeError(f"tensors differ in shape: reference {r.shape}, candidate {c.shape}")
    r = r.reshape(-1, r.shape[-1])
    c = c.reshape(-1, c.shape[-1])
    return float(np.mean(r.argmax(-1) == c.argmax(-1))) if r.shape[0] else float("nan")


def mismatch_fraction(refs, cands) -> float:
    """Fraction of elements that differ over sample pairs of tensors compared exactly (integer, bool); a pair of
    other shapes (a data-dependent output: NonZero, NMS indices) differs in all of its larger side's elements. 0 when
    every tensor is empty (they are equal)."""
    differ = total = 0
    for r, c in zip(refs, cands):
        r, c = np.asarray(r), np.asarray(c)
        size = max(r.size, c.size)
        differ += int(np.count_nonzero(r != c)) if r.shape == c.shape else size
        total += size
    return differ / total if total else 0.0


def classifier_shaped(shape) -> bool:
    """A (…, classes) float output with more than one class and at most one non-unit leading axis (batch):
    (1, 1000), (8, 10), (10,)."""
    shape = tuple(int(d) for d in shape)
    if not shape or shape[-1] < 2:
        return False
    return sum(1 for d in shape[:-1] if d != 1) <= 1


def tensor_metrics(ref, cand) -> dict[str, float]:
    """max_abs, rel_l2, cosine, sqnr_db of one tensor pair."""
    return {"max_abs": max_abs_error(ref, cand), "rel_l2": relative_l2(ref, cand),
            "cosine": cosine_similarity(ref, cand), "sqnr_db": sqnr_db(ref, cand)}
