"""The delegate interface: what a backend must do to run a partition of a graph, and the registry of backends.

A delegate answers four questions, in this order:

1. ``available(unit)`` -> ``(ok, reason)``: is its runtime present on this machine for this compute unit?
2. ``supports(node, graph, unit)`` -> ``(ok, reason)``: can it run this node (the capability query; the profile's
   op list is the planner's view, this is the delegate's own)?
3. ``compile(partition, graph, unit, options)`` -> ``CompiledPartition``: prepare a partition once (import weights,
   build a runtime session); nothing here runs per inference.
4. ``CompiledPartition.run(inputs, outputs)``: run it, reading ``inputs`` (name -> array) and writing into the
   caller's ``outputs`` (name -> preallocated array from the session's pinned pool). Buffer exchange is the caller's
   business: a delegate never keeps or returns arrays of its own for boundary tensors. The one exception is an
   output whose shape the data decides (NonZero's): a partition with ``allocates_outputs`` takes ``None`` for it
   and puts the array its runtime made in ``outputs[name]`` after each run, as onnxruntime itself returns them (the
   same dict handed again, holding that array, still means "allocate it").

Adding a delegate is one module that subclasses ``Delegate`` plus one ``register("name", Cls)`` call
(docs/delegates.md). This module must not import the session or anything above it.
"""
from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np

from ..errors import DeviceError
from ..timing import alternating, block_means


class CompiledPartition(ABC):
    """One partition prepared by a delegate. ``inputs``/``outputs`` are its boundary tensor names."""

    inputs: list[str]
    outputs: list[str]
    # True: an output given as None is allocated by the runtime at each run (its shape may change from run to run)
    # and stored in ``outputs[name]`` after it
    allocates_outputs: bool = False

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray | None]) -> None:
        """Compute every name in ``self.outputs`` into the matching array of ``outputs`` (shape and dtype set by
        the caller; ``None`` with ``allocates_outputs``: the array made is stored there). Raises an ``edgert``
        error on failure."""

    def bound_run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        """A call that runs the partition on exactly these buffers, every time: the session's one-partition fast
        path calls it with no arguments once per run, having filled the input buffers. A delegate may check and
        bind the buffers once here rather than on every run."""
        return lambda: self.run(inputs, outputs)

    def output_shapes(self, inputs: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]] | None:
        """Shapes the outputs take for these inputs, when the delegate can tell without the caller's buffers
        (None: unknown; the session then probes)."""
        return None

    def close(self) -> None:
        """Release runtime resources (sessions, device handles)."""


AUTO_TIMING_RUNS = 15  # runs per variant when a delegate picks between two compilations of a partition
AUTO_TIMING_BUDGET_S = 0.25  # ... or fewer (at least 3) once a variant has run this long: a big model compiles fast
AUTO_TIMING_BLOCK_S = 500e-6  # timed calls per block: at least this long (a microsecond-sized partition repeats)
AUTO_TIMING_WARM_S = 200e-6  # untimed calls at the start of each block


def faster_of(first: CompiledPartition, second: CompiledPartition, specs, runs: int = AUTO_TIMING_RUNS):
    """The one of two compilations of the same partition that runs faster on zero-filled inputs; the other is
    closed. Ties keep ``first``. ``specs``: boundary tensor -> (shape, dtype). Each runs as a session runs it (its
    ``bound_run`` on its own tensor memory where it lends it), the two timed in alternation (``runs`` blocks each,
    fewer for a slow partition; a block repeats a fast partition for AUTO_TIMING_BLOCK_S after AUTO_TIMING_WARM_S
    untimed) so that a passing disturbance of the machine hits both. Used by ``core="auto"``: a C-core step can be faster alone and
    still slow the partition down, because the cut around it costs the surrounding runtime its fusions and adds a
    call."""

    def runner(c: CompiledPartition):
        views = getattr(c, "tensor_views", lambda: {})() or {}

        def buf(n):
            v = views.get(n)
            return v if v is not None and v.shape == specs[n][0] and v.dtype == specs[n][1] else np.zeros(*specs[n])
        return c.bound_run({n: buf(n) for n in c.inputs}, {n: buf(n) for n in c.outputs})

    # blocks of several calls start untimed (AUTO_TIMING_WARM_S): their first call meets what the other variant left
    # behind (on a small machine the C core's pool workers or the runtime's own threads still spinning), which a
    # session running one variant never does; one-call blocks picked the C core for a model it made 15% slower
    ts = [block_means(t) for t in alternating((runner(first), runner(second)), runs, block_s=AUTO_TIMING_BLOCK_S,
                                              max_calls=1000, warm_s=AUTO_TIMING_WARM_S,
                                              budget_s=2 * AUTO_TIMING_BUDGET_S)]
    if statistics.median(ts[1]) < statistics.median(ts[0]):
        first.close()
        return second
    second.close()
    return first


def cut_into_steps(nodes, anchors: Mapping[str, Any], claimed, segment) -> list:
    """A partition's ``nodes`` (topological order) as a list of steps: the step ``anchors[name]`` where its anchor
    node comes, and between them runtime segments ``segment(pending_nodes, index)`` of the nodes no step claims.
    The hosts' mixes of C-core steps and onnxruntime/LiteRT segments are cut this way."""
    steps: list = []
    pending: list[str] = []
    for name in nodes:
        if name in anchors:
            if pending:
                steps.append(segment(pending, len(steps)))
                pending = []
            steps.append(anchors[name])
        elif name not in claimed:
            pending.append(name)
    if pending:
        steps.append(segment(pending, len(steps)))
    return steps


class Delegate(ABC):
    """A backend that runs partitions. Subclasses are registered by name; the session creates one per unit."""

    name: str = ""
    # True: partitions of one unit share the device's tensor memory, so a tensor one partition produces and only later
    # partitions of the same unit read stays on the device (the planner emits no transfer for it and the session passes
    # the partition ``resident_outputs``/``resident_inputs`` options naming such tensors). False: every boundary
    # tensor goes through host buffers.
    keeps_tensors_resident: bool = False

    @classmethod
    def available(cls, unit: Any = None) -> tuple[bool, str]:
        """Whether this delegate can run on this machine for ``unit`` (its runtime, providers, device present)."""
        return True, ""

    def supports(self, node, graph, unit: Any = None) -> tuple[bool, str]:
        """Whether this delegate can run ``node``; by default whatever the unit's profile lists."""
        if unit is not None and hasattr(unit, "supports"):
            return unit.supports(node, graph)
        return True, ""

    @abstractmethod
    def compile(self, partition, graph, unit: Any = None, options: Mapping[str, Any] | None = None) -> CompiledPartition:
        """Prepare ``partition`` (a plan Partition: ``nodes``, ``inputs``, ``outputs``) of ``graph`` for ``unit``."""


_REGISTRY: dict[str, type[Delegate]] = {}


def register(name: str, cls: type[Delegate]) -> type[Delegate]:
    """Make ``cls`` the delegate called ``name`` (the ``delegate`` field of a profile unit). Re-registering a name
    replaces it (tests use this to swap in fakes)."""
    if not (isinstance(cls, type) and issubclass(cls, Delegate)):
        raise TypeError(f"register({name!r}, ...) needs a Delegate subclass, got {cls!r}")
    cls.name = name
    _REGISTRY[name] = cls
    from ..plan import RESIDENT_DELEGATES  # a lower layer: the planner's view of which delegates keep tensors resident

    if getattr(cls, "keeps_tensors_resident", False):
        RESIDENT_DELEGATES.add(name)
    else:
        RESIDENT_DELEGATES.discard(name)
    return cls


def get(name: str) -> type[Delegate]:
    """The delegate class registered as ``name``; DeviceError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DeviceError(f"edgert has no {name!r} delegate (registered: {', '.join(sorted(_REGISTRY))}); run the "
                          "partition with emulate=True, or add one (docs/delegates.md)") from None


def registered() -> list[str]:
    return sorted(_REGISTRY)


def is_registered(name: str) -> bool:
    return name in _REGISTRY
