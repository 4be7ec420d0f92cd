"""Kernel benchmark: edgert.matmul (through edgert.BoundMatMul, as a run loop calls it) against onnxruntime
(MatMulNBits, MatMulInteger) and numpy, same shapes, same threads, one run, one table.

    python benchmarks/kernels.py [--quick]

Shapes are (N, K) weight matrices: 576x1536, 1536x576, 4096x4096, 49152x576 (small-LLM projections and an output
embedding). For each, at 1 and 2 threads:
  - GEMV (M=1), q4_0 / q4_1 / q8_0: edgert rotates through >= 1 GiB of distinct weight matrices, so every call
    streams its weights from DRAM (more than any L3 of this class of machine: 32 MB on a Zen 3 EPYC, hundreds of
    MB on large Xeons). Reported as GB/s of weight bytes and as % of the streaming-read bandwidth
    (lib.et_stream_read over the whole pool) measured in alternating rounds with the row's own timings: "% stream"
    through one edgert.BoundMatMul per matrix (a Python run loop), "C call" through et_matmul_ex straight (as the
    LLM's C forward pass calls the kernels: no per-call checks, one output buffer). "read/call" runs the
    streaming-read loop itself on each matrix of the same rotation, one call per matrix: the ceiling at this call
    size for a kernel that did nothing but read (every call starts its streams cold, and a call ends with its
    slowest thread).
  - "x16" rows: the same matrices repacked (edgert.repack) where the ISA reads that layout with its own kernels.
  - GEMV M=1 L3: rotating through 32 MiB, which this machine's L3 holds, as a small model's decode does: x16
    against the GGUF rows (the ratio column).
  - GEMM (M=64), GOP/s = 2*M*N*K / s, cache-resident weights (the kernel is compute bound); also "int8": per-tensor
    int8 weights through edgert.quant.BoundDynamicInt8, which computes MatMulInteger's chain exactly (the
    activations quantized per tensor as DynamicQuantizeLinear does, int32 sums, float out).
Peers: q4_0/q4_1 against onnxruntime MatMulNBits (bits=4, block_size=32, accuracy_level=4, symmetric), q8_0 and int8 against
MatMulInteger (int8 weights, activations through DynamicQuantizeLinear, output cast to float and rescaled), and
numpy float32 x @ w.T. The onnxruntime GEMV peers stream from DRAM too (marked "dram"): sessions of >= 16 distinct
matrices (chained output -> input when N == K, side by side on one input otherwise), rotated until they have read as
many weight bytes as edgert's rotation. GEMM peers, like edgert's GEMM, use one cached matrix ("warm"), and are
timed in alternating rounds with edgert's layouts of the same shape and threads (the VM's slow and fast phases,
seconds long, hit both alike).
The ratio is peer time / edgert time (> 1: edgert is faster). Timings: time.perf_counter, warm-up, best of
several repetitions (other processes share the CPU).

This script measures; it does not check results (tests/ do).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import edgert.quant as eq
from edgert import native
from edgert.native import ffi, lib
from edgert.timing import alternating

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (49152, 576)]
FORMATS = ["q4_0", "q4_1", "q8_0"]
THREADS = [1, 2]
GEMM_M = 64
GIB = 1 << 30
GEMM_WARM_S = 0.2  # warm-up per GEMM timing, the same for every engine: two threads can take a moment to run as two
ORT_SETTLE_S = 0.1  # onnxruntime's workers spin ~30 ms after a run (measured: CPU time while idle)
L3_ROTATION = 32 << 20  # distinct matrices an L3 of 32 MB or more holds (on a 32 MB L3, partly from DRAM)
PEER_OP = {"q4_0": "MatMulNBits", "q4_1": "MatMulNBits", "q8_0": "MatMulInteger", "int8": "MatMulInteger"}
GEMM_FORMATS = ("q4_0", "q4_1", "q8_0", "int8")  # int8: per-tensor int8 weights, MatMulInteger's own arithmetic
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
HALF_0_01 = np.array([0.01], dtype=np.float16).view(np.uint8)  # a scale whose products stay normal floats


def best_time(fn, reps: int, warmup: int = 1, warm_s: float = 0.0) -> float:
    """best of reps calls of fn, after warmup calls and at least warm_s seconds of calls"""
    return min(alternating([fn], 1, calls=reps, warmup=warmup, warm_s=warm_s)[0][0])


# ---- edgert ----


class WeightPool:
    """One >= 1 GiB buffer of random blocks, viewed as many distinct (N, K) matrices of one format."""

    def __init__(self, nbytes: int, rng: np.random.Generator):
        self.buf = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy()
        self.fmt = None

    def matrices(self, fmt: str, shape: tuple[int, int], min_bytes: int) -> list[eq.QTensor]:
        if fmt != self.fmt:  # valid fp16 scales (and q4_1 mins) where this format keeps them
            bs = BLOCK_BYTES[fmt]
            blocks = self.buf[: self.buf.size // bs * bs].reshape(-1, bs)
            blocks[:, 0], blocks[:, 1] = HALF_0_01
            if fmt == "q4_1":
                blocks[:, 2], blocks[:, 3] = HALF_0_01
            self.fmt = fmt
        n, k = shape
        size = n * eq.row_bytes(fmt, k)
        count = min(self.buf.size // size, -(-min_bytes // size))
        return [eq.QTensor.from_raw(fmt, shape, self.buf[i * size : (i + 1) * size]) for i in range(count)]


def stream_run(buf: np.ndarray, threads: int):
    """a call of the streaming-read loop over all of buf"""
    out = ffi.new("uint64_t *")
    ptr = ffi.cast("void *", buf.ctypes.data)
    return lambda: native.check(lib.et_stream_read(ptr, buf.nbytes, threads, out))


def stream_bandwidth(buf: np.ndarray, threads: int, reps: int) -> float:
    return buf.nbytes / best_time(stream_run(buf, threads), reps) / 1e9


def stream_per_call(mats: list, threads: int):
    """a pass of the streaming-read loop run on each matrix of the rotation in turn, one call each: what a kernel
    that only read its weights would reach at this call size (each call starts its streams cold and waits for the
    slowest thread)"""
    out = ffi.new("uint64_t *")
    calls = [(native.ptr(w.raw), w.nbytes) for w in mats]
    f = lib.et_stream_read
    native.check(f(*calls[0], threads, out))  # the timed loop does not look at the status

    def run():
        for p, nb in calls:
            f(p, nb, threads, out)

    return run


def edgert_gemv_run(mats: list, threads: int):
    """a pass over all matrices, each through its own edgert.BoundMatMul (how a Python run loop calls it: buffers
    kept per product, x checked per call)"""
    x = np.random.default_rng(1).standard_normal((1, mats[0].shape[1])).astype(np.float32)
    bound = [eq.BoundMatMul(w, 1, threads=threads) for w in mats]

    def run():
        for b in bound:
            b(x)

    return run


def edgert_gemv(mats: list, threads: int, passes: int) -> float:
    """seconds per call, best pass over all matrices (edgert_gemv_run)"""
    return best_time(edgert_gemv_run(mats, threads), passes) / len(mats)


def edgert_gemv_c(mats: list, threads: int):
    """a pass of the same rotation as one C call per matrix (et_matmul_ex, pointers made beforehand, one output and
    scratch), as the LLM's forward pass in C calls its kernels: the kernel without BoundMatMul's checks and
    per-product buffers, which the rotation leaves cold"""
    n, k = mats[0].shape
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    y = eq.aligned_empty(4 * n, np.float32)
    ss = int(lib.et_matmul_scratch_size(mats[0].type_id, 1, k))
    scratch = eq.aligned_empty(max(ss, 1))
    px, py, ps = native.ptr(x, "float *"), native.ptr(y, "float *"), native.ptr(scratch)
    ptrs, tid, f = [native.ptr(w.raw) for w in mats], mats[0].type_id, lib.et_matmul_ex
    native.check(f(px, 1, k, k, tid, ptrs[0], n, k, py, n, ps, ss, threads))  # the timed loop ignores the status

    def run():
        for pw in ptrs:
            f(px, 1, k, k, tid, pw, n, k, py, n, ps, ss, threads)

    return run


def _layouts(fmt: str, mats: list) -> list[tuple[str, list]]:
    """(label, matrices) to time: the GGUF rows, and their x16 repacking (edgert.repack) where the ISA reads it with
    its own kernels, into one arena as the LLM loader does (a large allocation gets huge pages, as the pool has)."""
    if fmt not in FORMATS or not eq.repack_pays(fmt):
        return [(fmt, mats)]
    size = eq.repack_size(mats[0])
    arena = eq.aligned_empty(size * len(mats))
    return [(fmt, mats), (f"{fmt} x16", [eq.repack(w, arena[i * size:]) for i, w in enumerate(mats)])]


def edgert_gemm(w, m: int, threads: int):
    """a call of the product of m rows with w. QTensor: the block-format product (BoundMatMul); Int8Weights:
    onnxruntime's dynamic int8 arithmetic (BoundDynamicInt8: per-tensor DynamicQuantizeLinear of x in C, int32 sums,
    float out)."""
    x = np.random.default_rng(2).standard_normal((m, w.shape[1])).astype(np.float32)
    b = eq.BoundDynamicInt8(w, m, threads) if isinstance(w, eq.Int8Weights) else eq.BoundMatMul(w, m, threads=threads)
    return lambda: b(x)


def alternating_best(fns: list, rounds: int, warm_s: float, settle_after: set) -> list[float]:
    """best seconds per call of each of fns, timed in alternating rounds (in each: a warm-up call and warm_s of
    calls, then two timed ones, per fn), so the machine's slow and fast phases (seconds long on a shared VM) hit every
    engine alike; after the fns in settle_after (onnxruntime: its workers spin on after a run) the next waits
    ORT_SETTLE_S"""
    times = alternating(fns, rounds, calls=2, warmup=1, warm_s=warm_s, settle={i: ORT_SETTLE_S for i in settle_after})
    return [min(min(block) for block in t) for t in times]


# ---- onnxruntime ----


def _ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _nbits_node(helper, numpy_helper, rng, n, k, inp, out, tag):
    nb = k // 32
    b = rng.integers(0, 256, size=(n, nb, 16), dtype=np.uint8)
    scales = np.full(n * nb, 1.0 / (4.6 * np.sqrt(k)), dtype=np.float32)  # keeps chained activations near unit size
    inits = [numpy_helper.from_array(b, f"B{tag}"), numpy_helper.from_array(scales, f"S{tag}")]
    node = helper.make_node(
        "MatMulNBits", [inp, f"B{tag}", f"S{tag}"], [out], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=32, accuracy_level=4,
    )
    return [node], inits


def _int8_node(helper, numpy_helper, rng, n, k, inp, out, tag):
    from onnx import TensorProto

    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    wscale = np.array(1.0 / (73.0 * np.sqrt(k)), dtype=np.float32)
    inits = [numpy_helper.from_array(w, f"W{tag}"), numpy_helper.from_array(wscale, f"WS{tag}")]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [inp], [f"xq{tag}", f"xs{tag}", f"xz{tag}"]),
        helper.make_node("MatMulInteger", [f"xq{tag}", f"W{tag}", f"xz{tag}"], [f"yi{tag}"]),
        helper.make_node("Cast", [f"yi{tag}"], [f"yf{tag}"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"yf{tag}", f"xs{tag}"], [f"ys{tag}"]),
        helper.make_node("Mul", [f"ys{tag}", f"WS{tag}"], [out]),
    ]
    return nodes, inits


def ort_session(ort, op: str, n: int, k: int, chain: int, threads: int, seed: int):
    """A session of `chain` distinct (N, K) matmuls: chained output -> input when N == K, else side by side on the
    same input, every output a graph output (copying them out costs < 2% of reading the weights)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    make = _nbits_node if op == "MatMulNBits" else _int8_node
    chained = n == k
    nodes, inits, outs = [], [], []
    for i in range(chain):
        if chained:
            inp = "x" if i == 0 else f"h{i}"
            out = "y" if i == chain - 1 else f"h{i + 1}"
        else:
            inp, out = "x", f"y{i}"
        nd, it = make(helper, numpy_helper, rng, n, k, inp, out, i)
        nodes += nd
        inits += it
        if out.startswith("y"):
            outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])], outs, initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_time(sessions, m: int, k: int, reps: int, per_call: int, warm_s: float = 0.0) -> float:
    """seconds per matmul: best pass over all sessions / matmuls in them"""
    x = np.random.default_rng(3).standard_normal((m, k)).astype(np.float32)

    def run():
        for s in sessions:
            s.run(None, {"x": x})

    t = best_time(run, reps, warm_s=warm_s) / (len(sessions) * per_call)
    time.sleep(ORT_SETTLE_S)  # onnxruntime's pool spins on after a run: let it stop before edgert's next row
    return t


def ort_weight_bytes(op: str, n: int, k: int) -> int:
    return n * k // 2 + n * (k // 32) * 4 if op == "MatMulNBits" else n * k


def _blas_set_threads():
    """numpy's OpenBLAS thread setter (found through the loaded library), or None"""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in paths:
        lib_ = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib_, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                return fn
    return None


def numpy_time(n: int, k: int, m: int, reps: int, threads: int, set_threads) -> float:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((n, k), dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    if set_threads:
        set_threads(threads)
    return best_time(lambda: x @ w.T, reps, warm_s=GEMM_WARM_S)


# ---- table ----


def fmt_us(t):
    return "-" if t is None else f"{t * 1e6:,.0f}" if t >= 1e-4 else f"{t * 1e6:.1f}"


def fmt_ratio(peer, mine):
    return "-" if peer is None or mine is None else f"{peer / mine:.2f}x"


def print_table(title: str, columns: list[str], rows: list[list[str]], notes: list[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        for n in notes:
            print(n)
        return
    table = Table(title=title, caption="\n".join(notes), caption_justify="left")
    for c in columns:
        table.add_column(c, justify="left" if c in ("op", "shape", "fmt", "peer") else "right")
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            table.add_section()
        prev = r[0]
        table.add_row(*r)
    Console(width=200).print(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller DRAM pools (< 1 minute)")
    args = ap.parse_args(argv)
    quick = args.quick
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    pool_bytes = (GIB // 4 if quick else GIB) + (64 << 20)
    min_rotation = pool_bytes - (64 << 20)
    ort = _ort()
    info = native.info()
    notes = [
        f"edgert {info['version']} isa={info['isa']} (features {','.join(info['features'])}); "
        f"numpy {np.__version__}; onnxruntime {ort.__version__ if ort else 'not installed'}",
        "ratio = peer time / edgert time (> 1: edgert faster). GEMV edgert rotates through "
        f"{min_rotation / GIB:.2f} GiB of distinct matrices per row; "
        "GEMV peer 'dram' = rotating sessions of distinct matrices (chained when N == K) over as many bytes; "
        "GEMM peers 'warm' = one cached matrix, as edgert's.",
    ]
    if quick:
        notes.append("--quick: 0.25 GiB rotations (may be served partly from L3), 2 repetitions, fewer peers.")

    blas_threads = _blas_set_threads()
    pool = WeightPool(pool_bytes, rng)
    stream = {t: stream_bandwidth(pool.buf, t, 3 if quick else 5) for t in THREADS}

    cols = ["op", "shape", "fmt", "T", "edgert us", "edgert rate", "% stream", "C call", "read/call", "peer",
            "peer us", "ratio", "numpy f32 us", "ratio np"]
    rows = []
    for t in THREADS:
        rows.append(["stream", f"{min_rotation / GIB:.2f} GiB", "-", str(t), "-", f"{stream[t]:.1f} GB/s", "100%",
                     "100%", "100%", "-", "-", "-", "-", "-"])

    # GEMV
    peer_cache = {}
    for n, k in SHAPES:
        np_t = {t: None for t in THREADS}
        for fmt in FORMATS:
            layouts = _layouts(fmt, pool.matrices(fmt, (n, k), min_rotation))
            for t in THREADS:
                # the stream over the whole pool, then per layout: BoundMatMul, C call, read per call, all in
                # alternating rounds, so every % below divides figures taken in the same phases of the machine
                fns = [stream_run(pool.buf, t)]
                for _, mats in layouts:
                    fns += [edgert_gemv_run(mats, t), edgert_gemv_c(mats, t), stream_per_call(mats, t)]
                times = alternating_best(fns, 2 if quick else 3, 0.0, set())
                st = pool.buf.nbytes / times[0] / 1e9
                for li, (label, mats) in enumerate(layouts):
                    wbytes = mats[0].nbytes
                    et, ec, sc = (tm / len(mats) for tm in times[1 + 3 * li: 4 + 3 * li])
                    gbs = wbytes / et / 1e9
                    op = PEER_OP[fmt]
                    key = (op, n, k, t)
                    if ort and key not in peer_cache:
                        # the peer rotates through as many weight bytes as edgert does (>= 64 MiB per session)
                        one = ort_weight_bytes(op, n, k)
                        chain = max(16, -(-(64 << 20) // one))
                        n_sess = max(1, -(-min_rotation // (one * chain)))
                        sessions = [ort_session(ort, op, n, k, chain, t, seed=10 + i) for i in range(n_sess)]
                        peer_cache[key] = (ort_time(sessions, 1, k, 2 if quick else 3, chain), "dram")
                        del sessions
                    pt, where = peer_cache.get(key, (None, ""))
                    if np_t[t] is None and not quick:
                        np_t[t] = numpy_time(n, k, 1, 20, t, blas_threads)
                    rows.append(["GEMV M=1", f"{n}x{k}", label, str(t), fmt_us(et), f"{gbs:.1f} GB/s",
                                 f"{100 * gbs / st:.0f}%", f"{100 * wbytes / ec / 1e9 / st:.0f}%",
                                 f"{100 * wbytes / sc / 1e9 / st:.0f}%",
                                 f"{op} ({where})" if pt else "-", fmt_us(pt),
                                 fmt_ratio(pt, et), fmt_us(np_t[t]), fmt_ratio(np_t[t], et)])
            del layouts

    # GEMV on weights a large L3 holds (a small model's decode on this machine): x16 against the GGUF rows
    for n, k in SHAPES[:3]:
        for fmt in FORMATS:
            layouts = _layouts(fmt, pool.matrices(fmt, (n, k), L3_ROTATION))
            for t in THREADS:
                base = None
                for label, mats in layouts:
                    et = edgert_gemv(mats, t, 5 if quick else 10)
                    peer = (base is not None) and ("GGUF rows", fmt_us(base), fmt_ratio(base, et))
                    rows.append(["GEMV M=1 L3", f"{n}x{k}", label, str(t), fmt_us(et),
                                 f"{mats[0].nbytes / et / 1e9:.1f} GB/s", "-", "-", "-", *(peer or ("-", "-", "-")), "-",
                                 "-"])
                    base = et if base is None else base
            del layouts

    # GEMM
    for n, k in SHAPES:
        np_t = {}
        for fmt in GEMM_FORMATS:
            if fmt == "int8":
                layouts = [(fmt, eq.Int8Weights(rng.integers(-128, 128, (n, k)).astype(np.int8), scale=0.01))]
            else:
                w = eq.QTensor.from_raw(fmt, (n, k), pool.matrices(fmt, (n, k), 1)[0].raw.copy())
                layouts = [(label, ws[0]) for label, ws in _layouts(fmt, [w])]
            op, ops = PEER_OP[fmt], 2.0 * GEMM_M * n * k
            for t in THREADS:
                # every layout and the peer in alternating rounds: their ratio does not depend on which of the
                # machine's phases each one happened to be timed in
                fns = [edgert_gemm(w, GEMM_M, t) for _, w in layouts]
                if ort:
                    sess = ort_session(ort, op, n, k, 1, t, seed=20)
                    xo = np.random.default_rng(3).standard_normal((GEMM_M, k)).astype(np.float32)
                    fns.append(lambda: sess.run(None, {"x": xo}))
                times = alternating_best(fns, 3 if quick else 6, GEMM_WARM_S / 4, {len(layouts)} if ort else set())
                pt = times[len(layouts)] if ort else None
                if t not in np_t:
                    np_t[t] = numpy_time(n, k, GEMM_M, 3 if quick else 6, t, blas_threads)
                for (label, _), et in zip(layouts, times):
                    rows.append(["GEMM M=64", f"{n}x{k}", label, str(t), fmt_us(et), f"{ops / et / 1e9:.0f} GOP/s",
                                 "-", "-", "-", f"{op} (warm)" if pt else "-", fmt_us(pt), fmt_ratio(pt, et),
                                 fmt_us(np_t[t]), fmt_ratio(np_t[t], et)])
    notes.append(
        f"numpy f32: x @ w.T on cached weights, BLAS threads {'set per row' if blas_threads else 'NOT set (BLAS default)'}. "
        f"edgert us include the Python call of edgert.BoundMatMul (~1-2 us). "
        f"Total run {time.perf_counter() - t_start:.0f} s."
    )
    print_table(f"edgert kernels vs peers (M=1 GEMV, M={GEMM_M} GEMM)", cols, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
