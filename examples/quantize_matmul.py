"""Quantize a weight matrix to each edgert format, multiply it, and see what each format costs in accuracy and size.

    python examples/quantize_matmul.py            # EDGERT_ISA=ref / EDGERT_THREADS=1 to compare variants
"""
import time

import numpy as np

import edgert

N, K, M = 1024, 4096, 8  # weights (N, K), activations (M, K)

rng = np.random.default_rng(0)
w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
x = rng.standard_normal((M, K)).astype(np.float32)
exact = x.astype(np.float64) @ w.astype(np.float64).T

info = edgert.native.info()
print(f"edgert {edgert.__version__}: ISA {info['isa']} (this CPU runs {', '.join(info['isas'])}), "
      f"{info['threads']} threads")
print(f"y = x @ w.T with x ({M}, {K}), w ({N}, {K}); error against float64 on the float32 weights")
print(f"{'format':<7}{'bytes/weight':>13}{'max |err|':>12}{'rel err':>10}{'matmul ms':>11}")
for fmt in edgert.FORMATS:
    q = edgert.quantize(w, fmt)
    y = edgert.matmul(x, q)  # first call warms up the thread pool
    t0 = time.perf_counter()
    y = edgert.matmul(x, q)
    ms = (time.perf_counter() - t0) * 1e3
    err = np.abs(y - exact)
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    print(f"{fmt:<7}{q.nbytes / (N * K):>13.4f}{err.max():>12.3g}{rel:>10.2e}{ms:>11.2f}")
