"""Benchmark: edgert eval on the default SmolLM2 model.

Two comparisons over a few thousand tokens of locally composed text (no downloads beyond the cached model):
  1. its own Q4_1 file against a q4_0 re-quantization made by `edgert quantize` (a quantization change);
  2. the same file on 1 vs 2 threads (a kernel/threading change: expected zero or float-noise drift).
Prints each full eval table and the time it took (evaluated tokens/s, both sides counted).

    python benchmarks/eval.py [--ctx 512] [--chunks 4]
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

SUBJECTS = ["The river", "A small robot", "The old library", "Our team", "The night train", "A quiet village",
            "The weather station", "My grandmother", "The new compiler", "A lighthouse keeper"]
VERBS = ["watched", "described", "carried", "remembered", "measured", "repaired", "explained", "followed"]
OBJECTS = ["the long winter", "a map of the coast", "the broken clock", "every letter it received",
           "the sound of the sea", "a recipe for bread", "the results of the experiment", "the way home"]
TAILS = ["before the sun went down.", "while everyone else was asleep.", "with great care and patience.",
         "because nobody else would.", "and wrote it all down in a notebook.", "for the first time in years."]


def compose_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    paras = []
    for _ in range(n_sentences // 6):
        paras.append(" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                              f"{rng.choice(TAILS)}" for _ in range(6)))
    return "\n\n".join(paras)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()

    import edgert
    from edgert.llm import store
    from edgert.quantize_model import quantize_gguf

    model = store.cached_path("smollm2-135m")
    if model is None or not os.path.exists(model):
        model = store.pull("smollm2-135m")
    text = compose_text(400)
    with tempfile.TemporaryDirectory() as d:
        q40 = os.path.join(d, "smollm2-135m.q4_0.gguf")
        t0 = time.perf_counter()
        quantize_gguf(model, q40, "q4_0")
        print(f"re-quantized {os.path.basename(model)} -> q4_0 in {time.perf_counter() - t0:.1f} s\n")
        runs = [("Q4_1 (reference) vs q4_0 re-quantization", model, q40, {}),
                ("same file, 1 thread (reference) vs 2 threads", f"{model}@threads=1", f"{model}@threads=2", {})]
        for title, ref, cand, kw in runs:
            t0 = time.perf_counter()
            rep = edgert.evaluate(ref, cand, text, ctx=args.ctx, chunks=args.chunks, **kw)
            dt = time.perf_counter() - t0
            n = rep.metrics["tokens_evaluated"]
            print(f"=== {title} ===")
            print(rep.table())
            print(f"time: {dt:.1f} s for {n} tokens per side ({2 * n / dt:.0f} evaluated tokens/s, both sides; "
                  f"greedy continuations and weight drift included)\n")


if __name__ == "__main__":
    main()
