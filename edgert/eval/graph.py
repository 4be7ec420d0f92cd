"""Graph-model evaluation: a reference and a candidate ONNX or .tflite model, each run through ``edgert.Session`` on its own
device profile (emulated when the device is not on this machine), fed the same samples.

Compared: every graph output (float ones by drift, integer and bool ones exactly), and every float intermediate
tensor both graphs produce under the same name, unless one side's is an activation's output and the other's not
(``_computing_ops``, ``_same_value``: quantizers mostly keep the float tensor names of the nodes they rewrite, but a
fused activation leaves its name on the op before it). Intermediates
are read from a second pair of sessions whose models list them as extra outputs, so the timed sessions and their
bytes moved are those of the unmodified models. Tensors are visited in the reference's topological order; the
first one over a tensor threshold (cosine, SQNR, rel L2, max abs, mismatch) is ``first_divergence``. The gate
checks the outputs (worst output per metric, and top-1 of classifier-shaped outputs).

This module runs models and measures; it must not print.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping

import numpy as np

from ..errors import InvalidArgumentError
from ..formats.tflite import is_tflite_path
from . import metrics as M
from . import thresholds as T
from .report import MEASURED_HERE, EvalReport, Failure, Side, cost_model, needs_emulation, per_units, ratio_phrase

DEFAULT_RANDOM = 8
MIN_TIMED_RUNS = 20
TENSOR_METRICS = ("cosine", "sqnr_db", "rel_l2", "max_abs", "mismatch_pct")  # a row has the first four or the last
_FLOAT = ("float32", "float16", "float64", "bfloat16")


def random_samples(inputs, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """n feeds drawn from the input specs (symbolic dims -> 1): floats standard normal, ints in [0, 10), bools."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for io in inputs:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in (io.shape or []))
            dt = np.dtype(io.dtype or "float32")
            if dt.kind == "f":
                feed[io.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind in "iu":
                feed[io.name] = rng.integers(0, 10, size=shape).astype(dt)
            elif dt.kind == "b":
                feed[io.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise InvalidArgumentError(f"cannot draw random values for input {io.name!r} of dtype {dt}; "
                                           "pass --inputs DIR")
        out.append(feed)
    return out


def _samples(data, inputs, random: int | None, seed: int) -> list[dict[str, np.ndarray]]:
    names = [i.name for i in inputs]
    if data is None:
        return random_samples(inputs, DEFAULT_RANDOM if random is None else random, seed)
    if isinstance(data, (str, os.PathLike)):
        from ..quantize_model import read_samples

        return read_samples(data, names)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, (list, tuple)) or not all(isinstance(s, Mapping) for s in data):
        raise InvalidArgumentError("data must be a directory of samples, a feed dict (input name -> array), a list "
                                   f"of feed dicts, or None; got {type(data).__name__}"
                                   + (f" of {type(data[0]).__name__}" if isinstance(data, (list, tuple)) and data
                                      else ""))
    samples = [dict(s) for s in data]
    if not samples:
        raise InvalidArgumentError("no samples given: pass at least one feed dict, a directory, or None for random "
                                   "inputs")
    for i, s in enumerate(samples):
        missing = [n for n in names if n not in s]
        if missing:
            raise InvalidArgumentError(f"sample #{i} lacks input(s) {missing}")
    return samples


def _session(model, side: Side, emulate: bool):
    from ..session import Session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return Session(model, device=side.device or "host", fallback="allow", emulate=emulate, threads=side.threads,
                       telemetry=False)


def _shape_inferred(model):
    """``model`` with onnx's inferred value_info (the model as it is where inference fails): done once per side,
    read by _float_outputs and _with_outputs."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model


def _float_outputs(model) -> dict[str, int]:
    """Node output name -> position in topological order, for outputs whose type (``model``'s value_info: see
    _shape_inferred) is float or unknown."""
    import onnx

    elem = {}
    for vi in [*model.graph.value_info, *model.graph.output]:
        if vi.type.HasField("tensor_type"):
            elem[vi.name] = vi.type.tensor_type.elem_type
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    order = {}
    for node in model.graph.node:
        for o in node.output:
            if o and o not in order and elem.get(o, onnx.TensorProto.FLOAT) in floats:
                order[o] = len(order)
    return order


# quantized kernels by the float op they stand for: int8-dynamic, QOperator and int4 rewrites keep its output name
_FLOAT_OP = {"MatMulInteger": "MatMul", "MatMulNBits": "MatMul", "QLinearMatMul": "MatMul",
             "DynamicQuantizeMatMul": "MatMul", "ConvInteger": "Conv", "QLinearConv": "Conv", "QGemm": "Gemm",
             "QLinearAdd": "Add", "QLinearMul": "Mul", "QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu",
             "QLinearAveragePool": "AveragePool", "QLinearGlobalAveragePool": "GlobalAveragePool",
             "QLinearConcat": "Concat", "QLinearSoftmax": "Softmax"}
_INTEGER_OPS = ("MatMulInteger", "ConvInteger")  # int32 out: int8-dynamic rescales them with Cast -> Mul


def _computing_ops(model) -> dict[str, str]:
    """Node output name -> the op that computes it, seen as the float model would have it: through the Q/DQ pairs
    and Casts wrapped around a value and the Mul that rescales an integer MatMul/Conv, quantized kernels by their
    float op. Intermediates are matched on name and this op: onnxruntime's QDQ quantizer fuses a Relu into the Conv
    before it and gives the Conv's output, pre-activation, the Relu's output name."""
    prod = {o: n for n in model.graph.node for o in n.output if o}

    def through_cast(n):
        return prod.get(n.input[0], n) if n is not None and n.op_type == "Cast" else n

    def op(n) -> str:
        while True:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast") and n.input[0] in prod:
                n = prod[n.input[0]]
                continue
            if n.op_type == "Mul":
                src = [through_cast(prod.get(i)) for i in n.input]
                integer = next((p for p in src if p is not None and p.op_type in _INTEGER_OPS), None)
                if integer is not None:
                    n = integer
                    continue
            return _FLOAT_OP.get(n.op_type, n.op_type)

    return {o: op(n) for o, n in prod.items()}


# elementwise activations: a tensor of one name made by one of these on one side only is pre- vs post-activation
_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                          "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu"})


def _same_value(ref_op: str, cand_op: str) -> bool:
    """Whether tensors of one name made by these ops hold the same value: unless one is an activation's output and
    the other not. Other op differences keep the value: Gemm vs MatMul + Add, a Conv vs the bias Add after
    ConvInteger, a BatchNormalization folded into its Conv."""
    return (ref_op in _ACTIVATIONS) == (cand_op in _ACTIVATIONS)


def _ort_session(model):
    """A plain onnxruntime session of ``model`` with graph optimizations off, so every named tensor is kept."""
    from ..delegates.onnxruntime import inference_session
    from ..ort_options import onnxruntime_module, session_options

    ort = onnxruntime_module()
    so = session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # its notices about merging the shapes of the added outputs
    return inference_session(model, so)  # exact int8 products, as the sessions being compared use


def _with_outputs(model, names: list[str]):
    """``model`` with ``names`` as extra graph outputs, each with the element type and rank onnx.checker (so
    edgert's Session) requires of an output: from ``model``'s value_info (onnx's shape inference: _shape_inferred)
    or, for tensors behind an op it does not know (com.microsoft's MatMulNBits in an int4 model), from
    onnxruntime's, which runs that op."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {vi.name: vi for vi in m.graph.value_info if vi.type.HasField("tensor_type")}
    have = {o.name for o in m.graph.output}
    added = [n for n in names if n not in have]
    untyped_float = onnx.TensorProto.FLOAT  # until typed below: float is what the comparison reads
    for n in added:
        m.graph.output.append(known[n] if n in known else onnx.helper.make_tensor_value_info(n, untyped_float, None))
    untyped = [vi for vi in m.graph.output[len(m.graph.output) - len(added):]
               if not vi.type.tensor_type.HasField("shape")]
    if untyped:
        try:
            seen = {o.name: o for o in _ort_session(m).get_outputs()}
        except Exception:  # left as they are: the Session refuses them and they are read on onnxruntime
            seen = {}
        for vi in untyped:
            o = seen.get(vi.name)
            elem = o.type[len("tensor("):-1].upper() if o is not None and o.type.startswith("tensor(") else None
            if elem in onnx.TensorProto.DataType.keys():
                dims = [d if isinstance(d, str) or (isinstance(d, int) and d >= 0) else None for d in o.shape]
                vi.CopyFrom(onnx.helper.make_tensor_value_info(vi.name, onnx.TensorProto.DataType.Value(elem), dims))
    return m


def _run_intermediates(model, names, side, emulate, samples, notes) -> list[dict[str, np.ndarray]]:
    """The named tensors for every sample, through a Session on the side's device; plain onnxruntime if the
    Session cannot run the augmented model (noted)."""
    if not names:
        return [{} for _ in samples]
    aug = _with_outputs(model, names)
    try:
        sess = _session(aug, side, emulate)
        res = []
        for s in samples:
            outs = sess.run(names, s)
            res.append(dict(zip(names, outs)))
        sess.close()
        return res
    except Exception as exc:  # the plan or a delegate refused the augmented graph: read them on onnxruntime
        notes.append(f"{side.label}: intermediates read with plain onnxruntime (Session: {type(exc).__name__}: {exc})")
        sess = _ort_session(aug)
        return [dict(zip(names, sess.run(names, s))) for s in samples]


def _all_float(values) -> bool:
    return all(np.asarray(v).dtype.name in _FLOAT for v in values)


def _shape_mismatch(a: list, b: list):
    """The first (reference, candidate) pair of values whose shapes differ, or None."""
    return next(((x, y) for x, y in zip(a, b) if np.shape(x) != np.shape(y)), None)


def _check_outputs(outputs: dict, out_names: list[str]) -> None:
    """Refuse a candidate whose float output has another shape than the reference's, or whose output is float on
    one side only: it does not compute what the reference does, so there is no drift to measure and no point in
    reading intermediates. An integer output's shape may follow the data (NonZero, NMS indices): a sample whose
    shapes differ counts as all mismatched."""
    for name in out_names:
        a = [s[name] for s in outputs["reference"]]
        b = [s[name] for s in outputs["candidate"]]
        if _all_float(a) != _all_float(b):
            raise InvalidArgumentError(f"output {name!r} is {np.asarray(a[0]).dtype.name} in the reference but "
                                       f"{np.asarray(b[0]).dtype.name} in the candidate: the models do not compute "
                                       "the same outputs")
        bad = _shape_mismatch(a, b) if _all_float(a) else None  # integer ones may be data-dependent: mismatches
        if bad:
            raise InvalidArgumentError(f"output {name!r} has shape {list(np.shape(bad[0]))} in the reference but "
                                       f"{list(np.shape(bad[1]))} in the candidate: the models do not compute the "
                                       "same outputs")


def _flat(values: list) -> np.ndarray:
    """All samples' values as one vector: the tensor metrics pool elements, whatever each sample's shape."""
    return np.concatenate([np.ravel(v) for v in values])


def _class_rows(values: list) -> np.ndarray | None:
    """All samples' (rows, classes) stacked when every sample is classifier-shaped with one class count, else None.
    Top-1 is per row: the flat vector of samples of different batch sizes was one single row."""
    shapes = [np.shape(v) for v in values]
    if not all(M.classifier_shaped(s) for s in shapes) or len({s[-1] for s in shapes}) != 1:
        return None
    return np.concatenate([np.reshape(v, (-1, s[-1])) for v, s in zip(values, shapes)])


def _worst(values: list, direction: str) -> float:
    """The worst of the outputs' values for a threshold of ``direction`` ("min": the lowest); NaN (nothing measured)
    when any is NaN, which min and max would keep or drop by its place in the list."""
    if any(v != v for v in values):
        return float("nan")
    return min(values) if direction == "min" else max(values)


def evaluate_graph(reference: Side, candidate: Side, data, limits: dict, *, random: int | None = None,
                   seed: int = 0, runs: int | None = None, intermediates: bool = True, progress=None) -> EvalReport:
    t_start = time.perf_counter()
    for name, v in (("random", random), ("runs", runs)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")
    notes: list[str] = []
    sides_in = {"reference": reference, "candidate": candidate}
    tflite = [k for k, s in sides_in.items() if is_tflite_path(str(s.path))]
    if tflite and intermediates:
        # a .tflite graph's intermediates are not outputs of its interpreter; the comparison reads its outputs
        intermediates = False
        notes.append(f"{', '.join(sides_in[k].label for k in tflite)}: TFLite model, compared at its outputs only")

    emulate = {}
    sessions = {}
    for k, side in sides_in.items():
        emulate[k] = needs_emulation(side.device)
        if emulate[k]:
            notes.append(f"{side.label}: device {side.device!r} is not on this machine; emulated (device partitions "
                         "run on this CPU, link copies kept and counted)")
        sessions[k] = _session(side.path, side, emulate[k])
    inputs = sessions["reference"].get_inputs()
    cand_inputs = {i.name for i in sessions["candidate"].get_inputs()}
    if {i.name for i in inputs} != cand_inputs:
        raise InvalidArgumentError(f"the models' inputs differ: reference {[i.name for i in inputs]}, "
                                   f"candidate {sorted(cand_inputs)}")
    samples = _samples(data, inputs, random, seed)
    out_names = [o.name for o in sessions["reference"].get_outputs()]
    cand_out = {o.name for o in sessions["candidate"].get_outputs()}
    if not out_names:  # a gate over no outputs would pass whatever the candidate computes
        raise InvalidArgumentError("the reference model has no outputs: nothing to compare")
    missing = [n for n in out_names if n not in cand_out]
    if missing:
        raise InvalidArgumentError(f"the candidate lacks output(s) {missing} of the reference")

    # outputs, latency and bytes from the unmodified models
    outputs, perf = {}, {}
    n_timed = max(runs or MIN_TIMED_RUNS, len(samples))
    for k, sess in sessions.items():
        sess.run(out_names, samples[0])  # binding, first-run allocations: not timed
        outputs[k] = [dict(zip(out_names, sess.run(out_names, s))) for s in samples]
        perf[k] = {"lat": [], "moved": []}
    # timed runs alternate between the sides: one side timed wholly after the other carried the machine's drift
    # (clock, caches) into the comparison, and a model compared with itself came out 1.2-1.3x "cheaper"
    for i in range(n_timed):
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(out_names, samples[i % len(samples)])
            perf[k]["lat"].append(time.perf_counter() - t0)
            last = sess.stats()["last_run"]
            perf[k]["moved"].append(last["bytes_to_device"] + last["bytes_to_host"])
    for n, (k, sess) in enumerate(sessions.items()):
        perf[k].update(lat=np.array(perf[k]["lat"]), stats=sess.stats(), plan=sess.plan)
        sess.close()
        if progress:
            progress(n + 1, 3 if intermediates else 2)
    _check_outputs(outputs, out_names)

    # shared intermediates, topological order of the reference
    models, ref_order, cand_order = {}, {}, {}
    if intermediates:  # both ONNX, and both already loaded and checked by their sessions
        import onnx

        models = {k: _shape_inferred(onnx.load(s.path)) for k, s in sides_in.items()}
        ref_order, cand_order = _float_outputs(models["reference"]), _float_outputs(models["candidate"])
    same_name = [n for n in ref_order if n in cand_order and n not in out_names]
    ops = {k: _computing_ops(models[k]) for k in models}
    shared = [n for n in same_name if _same_value(ops["reference"][n], ops["candidate"][n])]
    dropped = [n for n in same_name if n not in shared]
    if dropped:
        notes.append("not compared, one side's tensor is an activation's output and the other's is not (a fused "
                     "activation leaves its output name on the op before it): "
                     + ", ".join(f"{n} ({ops['reference'][n]} vs {ops['candidate'][n]})" for n in dropped))
    inter = {k: _run_intermediates(models.get(k), shared, sides_in[k], emulate[k], samples, notes) for k in sides_in}
    if progress and intermediates:
        progress(3, 3)

    rows = []
    order = {n: i for i, n in enumerate(ref_order)}
    for name in sorted(set(shared) | set(out_names), key=lambda n: order.get(n, len(order))):
        is_out = name in out_names
        src = outputs if is_out else inter
        a = [s[name] for s in src["reference"]]
        b = [s[name] for s in src["candidate"]]
        exact = not _all_float(a + b)  # outputs: both sides (checked); intermediates read as float may not be
        if not is_out and (exact or _shape_mismatch(a, b)):  # outputs' shapes were checked before these were read
            continue
        row = {"name": name, "output": is_out, "shape": list(np.shape(a[0])), "dtype": np.asarray(a[0]).dtype.name}
        if exact:  # integer, bool: a class id or a mask is right or wrong, no drift to measure
            row["mismatch_pct"] = M.mismatch_fraction(a, b) * 100.0
        else:
            row.update(M.tensor_metrics(_flat(a), _flat(b)))
        rows_a = _class_rows(a) if is_out else None
        if rows_a is not None:  # b's shapes are a's: checked with the outputs
            row["top1_pct"] = M.top1_agreement(rows_a, _class_rows(b)) * 100.0
        row["crossed"] = [m for m, v, d, lim in T.check("graph", row, {k: limits.get(k) for k in TENSOR_METRICS})]
        rows.append(row)
    first = next((r["name"] for r in rows if r["crossed"]), None)
    unmeasured = [r["name"] for r in rows if any(r[k] != r[k] for k in TENSOR_METRICS if k in r)]
    if unmeasured:
        notes.append(f"{', '.join(unmeasured)}: no finite values to compare (NaN or ±inf in the same places on both "
                     "sides): their metrics are nan, which fails every threshold")

    outs = [r for r in rows if r["output"]]  # every output: float ones by drift, the others exactly
    m: dict = {k: _worst([r[k] for r in outs if k in r], t.direction)
               for k, t in T.GRAPH_THRESHOLDS.items() if any(k in r for r in outs)}
    m["samples"] = len(samples)
    m["outputs_compared"] = len(outs)
    m["intermediates_compared"] = len(rows) - len(outs)
    failures = [Failure(*f, where=f"first tensor over a threshold: {first}" if first else "")
                for f in T.check("graph", m, limits)]

    sides = {}
    for k, side in sides_in.items():
        p = perf[k]
        cm, prof = cost_model(side.device)
        run_s = float(np.median(p["lat"]))  # the typical run: one descheduled run moved a 20-run mean by 70%
        per_k = per_units(cm, run_s, 1000)
        sides[k] = {
            "label": side.label, "profile": prof, "emulated": emulate[k], "threads": side.threads or "default",
            "partitions": len(p["plan"].partitions),
            "latency_p50_ms": float(np.percentile(p["lat"], 50) * 1e3),
            "latency_p95_ms": float(np.percentile(p["lat"], 95) * 1e3),
            "bytes_moved_per_inference": int(np.median(p["moved"])),
            "bytes_to_device_per_inference": int(p["stats"]["last_run"]["bytes_to_device"]),
            "bytes_to_host_per_inference": int(p["stats"]["last_run"]["bytes_to_host"]),
            "power_w": cm.power_w, "price_usd_per_hour": cm.price_usd_per_hour,
            "energy_wh_per_1k": per_k["energy_wh"], "cost_usd_per_1k": per_k["cost_usd"],
            "timed_runs": int(p["lat"].size),
        }
    rs, cs = sides["reference"], sides["candidate"]
    if rs["cost_usd_per_1k"] > 0 and cs["cost_usd_per_1k"] > 0:
        phrase = ratio_phrase(rs["cost_usd_per_1k"], cs["cost_usd_per_1k"], "per 1,000 inferences")
    else:
        phrase = ratio_phrase(rs["energy_wh_per_1k"], cs["energy_wh_per_1k"], "energy per 1,000 inferences")
    q = [f"SQNR {m['sqnr_db']:.1f} dB, cosine {m['cosine']:.4f}"] if "cosine" in m else []
    if "top1_pct" in m:
        q.append(f"top-1 {m['top1_pct']:.1f}%")
    if "mismatch_pct" in m:
        q.append(f"{m['mismatch_pct']:.2f}% of integer/bool output elements differ")
    q = ", ".join(q)
    verdict = f"candidate: {phrase} at {q} — {'PASS' if not failures else 'FAIL'}"
    if first:
        verdict += f" (first divergence: {first})"
    if any(s.device for s in sides_in.values()):
        notes.append(MEASURED_HERE)
    return EvalReport(kind="graph", reference=reference, candidate=candidate, metrics=m, thresholds=dict(limits),
                      failures=failures, sides=sides, tensors=rows, first_divergence=first, verdict=verdict,
                      notes=notes, elapsed_s=time.perf_counter() - t_start)
