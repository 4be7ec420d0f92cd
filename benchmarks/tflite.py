"""TFLite benchmark: latency per inference of the test models (tests/tflite_models.py) with plain LiteRT, edgert on the
host profile and on emulated NPU profiles; edgert's orchestration overhead over plain LiteRT on a single-partition
plan (target <= 5%); the C core's INT8 FULLY_CONNECTED against LiteRT's XNNPACK on the same shapes (target >= 1.2x).

    python benchmarks/tflite.py [--threads 1] [--seconds 0.5]

Not a test: timings depend on the machine. Model figures are the median of repeated timed blocks; plain LiteRT and the
single-partition session behind the overhead figure are timed in alternating blocks (other work on the machine hits
both alike). The FC table times its two sides that way too and reports the best block of each (min-of-many) and the
ratio of their medians as well.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# this script is called tflite.py: keep its own directory off the path, or `import tflite` would import it
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import tflite_models as tm  # noqa: E402
import edgert  # noqa: E402
import edgert.profiles  # noqa: E402
from edgert.delegates.host_tflite import int8_fc_step  # noqa: E402
from edgert.formats.tflite import load_tflite  # noqa: E402
from edgert.timing import alternating, block_means  # noqa: E402


def timeit(fn, seconds: float) -> float:
    """Median seconds per call over 7 blocks of calls, each about seconds / 10 long."""
    return statistics.median(block_means(alternating([fn], 7, block_s=seconds / 10)[0]))


def timeit_pair(fa, fb, seconds: float, rounds: int = 15) -> tuple[float, float, float, float]:
    """Per-call seconds of fa and fb, timed in alternating blocks: (best a, best b, median a, median b)."""
    a, b = (block_means(t) for t in alternating([fa, fb], rounds, block_s=seconds / (2 * rounds)))
    return min(a), min(b), statistics.median(a), statistics.median(b)


def litert_runner(data: bytes, feeds: dict, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data, num_threads=threads)
    it.allocate_tensors()
    ins = [d["index"] for d in it.get_input_details()]
    outs = [d["index"] for d in it.get_output_details()]
    arrays = list(feeds.values())

    def run():  # the usual way: set_tensor / invoke / get_tensor
        for i, a in zip(ins, arrays):
            it.set_tensor(i, a)
        it.invoke()
        return [it.get_tensor(o) for o in outs]
    return run


def cheap(profile_name):
    prof = edgert.profiles.load(profile_name)
    units = [dataclasses.replace(u, link=dataclasses.replace(u.link, latency_s=0.0, bandwidth_bytes_s=1e18))
             if u.link is not None else u for u in prof.units]
    return dataclasses.replace(prof, units=units)


def us(s: float) -> str:
    return f"{s * 1e6:9.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.5)
    a = ap.parse_args()
    edgert.native.set_threads(a.threads)
    models = {"float_mlp": tm.float_mlp(batch=8), "int8_fc": tm.int8_fc(k=256, h=256, n=64, batch=8),
              "int8_conv": tm.int8_conv(hw=32, cin=8, cout=32), "int8_plumbing": tm.int8_plumbing()}
    tmp = tempfile.mkdtemp()
    print(f"# TFLite models, {a.threads} thread(s), C core ISA {edgert.native.info()['isa']}")
    print(f"{'model':<14} {'LiteRT us':>9} {'host us':>9} {'host/LRT':>8} {'host core=0':>11} {'overhead':>8} "
          f"{'tpu-emu us':>10} {'npu-emu us':>10}")
    for name, data in models.items():
        path = os.path.join(tmp, f"{name}.tflite")
        open(path, "wb").write(data)
        g = load_tflite(data)
        feeds = tm.feeds_for(g)
        row = {}
        # host: the default core="auto" (C-core FC steps kept where they measured faster at compile time)
        for key, dev, emu, core in (("host", "host", False, "auto"), ("nocore", "host", False, False),
                                    ("tpu", cheap("coral-usb"), True, "auto"), ("npu", cheap("imx8mp"), True, "auto")):
            s = edgert.Session(path, device=dev, emulate=emu, threads=a.threads, core=core, telemetry=False,
                               output_views=True)
            if key == "nocore":  # single partition, all in one interpreter: pure orchestration, timed in alternating
                # blocks with plain LiteRT so the machine's slow and fast phases hit both alike
                _, _, t_lrt, row[key] = timeit_pair(litert_runner(data, feeds, a.threads), lambda: s.run(None, feeds),
                                                    a.seconds)
            else:
                row[key] = timeit(lambda: s.run(None, feeds), a.seconds)
        overhead = row["nocore"] / t_lrt - 1
        print(f"{name:<14} {us(t_lrt)} {us(row['host'])} {row['host'] / t_lrt:8.2f} {us(row['nocore']):>11} "
              f"{overhead * 100:7.1f}% {us(row['tpu']):>10} {us(row['npu']):>10}")

    print()
    print("# INT8 FULLY_CONNECTED: C core (et_fc_s8) vs LiteRT (XNNPACK), same model, int8 in/out; best block of each "
          "(speedup), medians (med.)")
    print(f"{'m':>3} {'k':>5} {'n':>5} {'per-ch':>6} {'LiteRT us':>9} {'core us':>9} {'speedup':>7} {'med.':>5} "
          f"{'equal':>5}")
    for m, k, n in ((1, 256, 256), (1, 1024, 1024), (1, 4096, 1024), (8, 1024, 1024), (32, 512, 512),
                    (1, 2048, 2048)):
        for pc in (True, False):
            data, p = tm.int8_fc_single(k=k, n=n, batch=m, per_channel=pc)
            g = load_tflite(data)
            x = np.random.default_rng(0).integers(-128, 128, (m, k)).astype(np.int8)
            from ai_edge_litert.interpreter import Interpreter

            it = Interpreter(model_content=data, num_threads=a.threads)
            it.allocate_tensors()
            xi, yi = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
            xv = it.tensor(xi)()
            xv[...] = x
            del xv
            step = int8_fc_step(g, g.nodes[0], a.threads)
            y = np.zeros((m, n), np.int8)
            # LiteRT: input already in place, so the kernel, not set_tensor; core: the step's own buffers
            t_lrt, t_core, med_lrt, med_core = timeit_pair(it.invoke, lambda: step.compute_into(x, y), a.seconds)
            ref = it.get_tensor(yi)
            print(f"{m:>3} {k:>5} {n:>5} {str(pc):>6} {us(t_lrt)} {us(t_core)} {t_lrt / t_core:7.2f} "
                  f"{med_lrt / med_core:5.2f} {str(bool(np.array_equal(y, ref))):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
