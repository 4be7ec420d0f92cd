"""Serial NPU bridge benchmark (not a test): effective link throughput against the line rate, per-inference
latency breakdown (host compute, link, device compute), and bytes over the link against the plan's prediction.

    python benchmarks/bridge.py [--baud 921600] [--mbytes 1]

The emulator paces both directions at --baud (10 bits per byte), so "raw line rate" = baud / 10 bytes/s. The peer
for the latency rows is the same model on the host (onnxruntime CPU) in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import edgert  # noqa: E402
from edgert.bridge import NpuSim, SerialNpuDevice  # noqa: E402
from bridge_models import int8_cnn  # noqa: E402


def throughput(baud: float, nbytes: int) -> list[tuple]:
    rows = []
    with NpuSim(baud=baud) as sim:
        dev = SerialNpuDevice(sim.url, baudrate=int(baud))
        dev.hello()
        h = dev.alloc(nbytes)
        data = np.random.default_rng(0).integers(0, 256, nbytes).astype(np.uint8)
        raw = baud / 10
        for name, fn in (("write (host->device)", lambda: dev.write(h, data)),
                         ("read (device->host)", lambda: dev.read(h, np.empty_like(data)))):
            wire0 = dev.link.stats.bytes_tx + dev.link.stats.bytes_rx
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            wire = dev.link.stats.bytes_tx + dev.link.stats.bytes_rx - wire0
            rows.append((name, nbytes, wire, dt, nbytes / dt, nbytes / dt / raw))
        dev.close()
    return rows


def inference(baud: float, runs: int = 20) -> dict:
    model = int8_cnn(c=3, hw=16, classes=10)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.integers(-128, 128, (1, 3, 16, 16)).astype(np.int8)} for _ in range(runs)]
    import onnxruntime as ort

    host = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    for f in feeds:
        host.run(None, f)
    host_s = (time.perf_counter() - t0) / runs
    with NpuSim(baud=baud, ops_per_s=2e8) as sim:
        s = edgert.Session(model, device="serial-npu", fallback="forbid", device_options={"url": sim.url,
                           "baudrate": int(baud)}, telemetry=False)
        s.run(None, {"x": np.zeros((1, 3, 16, 16), np.int8)})  # first run: the graph (weights) is uploaded here
        part = s._bound.compiled[0]
        dev = part.state.device
        b0 = (dev.bytes_to_device, dev.bytes_to_host)
        link_s = device_s = 0.0
        t0 = time.perf_counter()
        for f in feeds:
            y = s.run(None, f)[0]
            assert np.array_equal(y, host.run(None, f)[0])  # bit for bit (counted in "host side")
            link_s += part.last_timing["link_s"]
            device_s += part.last_timing["device_s"]
        total = (time.perf_counter() - t0) / runs
        moved = ((dev.bytes_to_device - b0[0]) / runs, (dev.bytes_to_host - b0[1]) / runs)
        est = s.plan.estimates
        out = dict(host_s=host_s, total_s=total, link_s=link_s / runs, device_s=device_s / runs,
                   other_s=total - (link_s + device_s) / runs, moved=moved,
                   plan=(est["bytes_to_device"], est["bytes_to_host"]), graph_bytes=dev.bytes_graph,
                   stats=s.stats())
        s.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baud", type=float, default=921600)
    ap.add_argument("--mbytes", type=float, default=1.0)
    a = ap.parse_args()
    n = int(a.mbytes * 1e6)
    print(f"## link throughput at {a.baud:g} baud (raw line rate {a.baud / 10 / 1e3:.1f} kB/s), {n} bytes")
    print(f"{'direction':<22} {'tensor B':>10} {'wire B':>10} {'seconds':>8} {'kB/s':>8} {'of line':>8}")
    for name, nb, wire, dt, bps, frac in throughput(a.baud, n):
        print(f"{name:<22} {nb:>10} {wire:>10} {dt:>8.2f} {bps / 1e3:>8.1f} {frac:>7.1%}")
    r = inference(a.baud)
    print(f"\n## int8 CNN (1x3x16x16 -> 10) per inference, device at 2e8 ops/s, {a.baud:g} baud")
    print(f"{'':<28} {'ms':>8}")
    for k, label in (("host_s", "host only (onnxruntime CPU)"), ("total_s", "serial NPU, total"),
                     ("link_s", "  link"), ("device_s", "  device compute"), ("other_s", "  host side (session)")):
        print(f"{label:<28} {r[k] * 1e3:>8.2f}")
    print("\n## bytes over the link per inference vs the plan's prediction")
    print(f"{'':<16} {'measured':>9} {'plan':>9} {'equal':>6}")
    for i, d in enumerate(("to device", "to host")):
        print(f"{d:<16} {r['moved'][i]:>9.0f} {r['plan'][i]:>9.0f} {str(r['moved'][i] == r['plan'][i]):>6}")
    print(f"weights (graph blob) uploaded once: {r['graph_bytes']} bytes; link stats: "
          f"{ {k: r['stats'][k] for k in ('bytes_over_link', 'retransmits', 'resyncs', 'failovers')} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
