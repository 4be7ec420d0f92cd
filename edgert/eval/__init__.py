"""edgert.eval — check a candidate model against a reference before migrating to it.

``evaluate(reference, candidate, data=None, thresholds=None)`` dispatches on the files: ``.gguf`` pairs are
language models (teacher-forced perplexity, KL, top-1 agreement, greedy match: ``edgert.eval.llm``), anything else
is a graph model run through ``edgert.Session`` (per-tensor error, SQNR, first diverging tensor:
``edgert.eval.graph``). Either returns an ``EvalReport``: ``.passed``, ``.metrics``, ``.failures``, ``.to_json()``,
``.plot(path)``. Metric definitions live in ``edgert.eval.metrics``; thresholds in ``edgert.eval.thresholds``.
"""
from __future__ import annotations

import os

from ..errors import InvalidArgumentError, check_count
from . import thresholds as _thresholds
from .report import EvalReport, Failure, Side, parse_side


def kind_of(reference: Side, candidate: Side) -> str:
    """The evaluation two sides take: "llm" for GGUF language models, "graph" for any other model; one of each
    cannot be compared."""
    is_llm = [s.path.lower().endswith(".gguf") for s in (reference, candidate)]
    if is_llm[0] != is_llm[1]:
        raise InvalidArgumentError(f"cannot compare {reference.path} with {candidate.path}: one is a GGUF language "
                                   "model and the other a graph model")
    return "llm" if is_llm[0] else "graph"


def evaluate(reference, candidate, data=None, thresholds=None, *, ctx: int | None = None, chunks: int | None = None,
             reference_threads: int | None = None, candidate_threads: int | None = None,
             reference_device: str | None = None, candidate_device: str | None = None,
             random: int | None = None, seed: int = 0, runs: int | None = None, intermediates: bool = True,
             progress=None) -> EvalReport:
    """Compare ``candidate`` with ``reference`` (paths, optionally ``MODEL@DEVICE`` / ``MODEL@threads=N``, or
    Sides from ``parse_side``).

    ``data``: for language models the text (a string or a path to a text file); for graph models a directory of
    .npy/.npz samples, a dict of arrays (one sample), a list of such dicts, or None (random inputs from the
    model's input specs: ``random`` samples, default 8, drawn with ``seed``). ``thresholds``: a dict
    (``{"kl_mean": 0.2}`` or ``{"llm": {...}, "graph": {...}}``) or a TOML path, over the documented defaults."""
    # the arguments as such, here: numpy and the models met them before (TypeError, ValueError from deep inside)
    for name, v in (("reference", reference), ("candidate", candidate)):
        if not isinstance(v, (str, os.PathLike, Side)):
            raise InvalidArgumentError(f"{name} must be a model path (str or path-like), got {type(v).__name__}")
    if chunks is not None:
        chunks = check_count("chunks", chunks, lo=1)
    seed = check_count("seed", seed)
    ref = parse_side(reference, reference_device, reference_threads)
    cand = parse_side(candidate, candidate_device, candidate_threads)
    kind = kind_of(ref, cand)
    # the other kind's arguments were silently ignored
    foreign = {"llm": {"random": random, "runs": runs, "intermediates": None if intermediates else False},
               "graph": {"ctx": ctx, "chunks": chunks}}[kind]
    wrong = [n for n, v in foreign.items() if v is not None]
    if wrong:
        raise InvalidArgumentError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for "
                                   f"{'graph' if kind == 'llm' else 'language'} models, and these are "
                                   f"{'language' if kind == 'llm' else 'graph'} models")
    if kind == "graph" and data is not None and random is not None:
        raise InvalidArgumentError("data and random are alternatives: pass samples, or random=N to draw them")
    limits = _thresholds.resolve(kind, thresholds)
    if kind == "llm":
        from .llm import DEFAULT_CTX, evaluate_llm

        return evaluate_llm(ref, cand, data, limits, ctx=DEFAULT_CTX if ctx is None else ctx, chunks=chunks, progress=progress)
    from .graph import evaluate_graph

    return evaluate_graph(ref, cand, data, limits, random=random, seed=seed, runs=runs, intermediates=intermediates,
                          progress=progress)


__all__ = ["EvalReport", "Failure", "Side", "evaluate", "parse_side"]
