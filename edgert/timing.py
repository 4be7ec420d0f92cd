"""Wall-clock timing of calls: how the host delegates pick between two compilations of a partition, and how
benchmarks/ set edgert beside its peers.

On a shared machine (a VM's slow and fast phases last seconds) two engines are compared only in alternating blocks,
so that a passing disturbance hits both alike. This module imports nothing from edgert: every layer may use it.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence


def median_s(fn: Callable[[], object], runs: int = 15, *, warmup: int = 1, budget_s: float | None = None) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls after ``warmup`` untimed ones; with ``budget_s``, fewer
    calls (at least 3) once they have taken that long in all."""
    for _ in range(warmup):
        fn()
    ts: list[float] = []
    while len(ts) < runs and (budget_s is None or len(ts) < 3 or sum(ts) < budget_s):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def alternating(fns: Sequence[Callable[[], object]], rounds: int, *, calls: int = 1, block_s: float | None = None,
                max_calls: int = 1_000_000, warmup: int = 0, warm_s: float = 0.0, flip: bool = False,
                settle: dict[int, float] | None = None, budget_s: float | None = None) -> list[list[list[float]]]:
    """Seconds of every timed call of each of ``fns``, run in alternating blocks (one block of each fn per round):
    ``result[i][r]`` lists the calls of ``fns[i]`` in round ``r``, in order.

    - A block times ``calls`` calls, one after another. With ``block_s`` a fn's blocks have as many calls as last
      ``block_s`` (counted once, after an untimed call; at most ``max_calls``).
    - A block of more than one call starts untimed: ``warmup`` calls, then calls for ``warm_s`` seconds. Its first
      call meets what the other fn left behind (caches, or worker threads still spinning on a small machine), which
      an engine running alone never does. A one-call block has no untimed start: what its call meets weighs little
      next to a call that long.
    - ``flip``: every other round runs the fns in reverse order. ``settle``: ``{i: s}`` sleeps ``s`` seconds after
      each block of ``fns[i]`` (onnxruntime's workers spin on for a while after a run).
    - ``budget_s``: no more rounds, once there are 3, after the blocks (untimed starts included) took this long.
    """
    settle = settle or {}
    if block_s is not None:
        sizes = []
        for fn in fns:
            fn()
            n, t0 = 0, time.perf_counter()
            while n < max_calls:
                fn()
                n += 1
                if time.perf_counter() - t0 >= block_s:
                    break
            sizes.append(max(n, 1))
    else:
        sizes = [calls] * len(fns)
    out: list[list[list[float]]] = [[] for _ in fns]
    spent = 0.0
    for r in range(rounds):
        if budget_s is not None and r >= 3 and spent >= budget_s:
            break
        order = range(len(fns) - 1, -1, -1) if flip and r % 2 else range(len(fns))
        for i in order:
            fn, n = fns[i], sizes[i]
            t_start = time.perf_counter()
            if n > 1:
                for _ in range(warmup):
                    fn()
                while time.perf_counter() - t_start < warm_s:
                    fn()
            ts = [time.perf_counter()]
            for _ in range(n):
                fn()
                ts.append(time.perf_counter())
            spent += ts[-1] - t_start
            out[i].append([b - a for a, b in zip(ts, ts[1:])])
            if i in settle:
                time.sleep(settle[i])
    return out


def block_means(blocks: list[list[float]]) -> list[float]:
    """Seconds per call of each block of :func:`alternating`'s result for one fn."""
    return [sum(b) / len(b) for b in blocks]
