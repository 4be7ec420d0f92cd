"""LLM benchmark: edgert vs llama.cpp (llama-cpp-python, when installed) on the same GGUF, same threads.

    python benchmarks/llm.py [MODEL] [--threads 1 2] [--prompt-tokens 128] [--gen-tokens 128] [--n-ctx 2048]

Each engine runs in its own subprocess (so peak RSS is its own), loads the model, prefills the same 128-token
prompt (same token ids for both), then decodes 128 tokens greedily, one forward call per token; the argmax is taken
in numpy for both. Reported: load time, time to first token, prefill and decode tokens/s, peak RSS, the decode
roofline (weight bytes streamed per token / read bandwidth measured by a streaming-read loop in the same run), and
the sampler's cost per token on the last logits with the chat defaults (temperature 0.8, top-k 40, top-p 0.95,
min-p 0.05) and a repeat penalty of 1.1 over the last 64 tokens: edgert's Sampler against llama.cpp's.

llama-cpp-python compiles llama.cpp when it installs (about 15 minutes on 2 cores; pip keeps the built wheel in its
cache). On CPUs that report AMX, llama.cpp's native build uses AMX tiles, which crash in virtual machines that do
not grant the tile state; build it without them:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" pip install llama-cpp-python
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

TEXT = (
    "The history of computing is a story of machines that became smaller, cheaper and more widespread. Early "
    "electronic computers filled rooms and consumed enormous amounts of power, yet they could only perform a few "
    "thousand operations per second. Over the following decades, transistors replaced vacuum tubes, integrated "
    "circuits replaced discrete components, and microprocessors put an entire central processing unit on a single "
    "chip. Today a small board that fits in a pocket has more memory and computing power than the mainframes that "
    "guided the first missions to the moon. This shift has moved computation to the edge of the network: sensors, "
    "cameras, appliances and vehicles now run models locally, close to the data they produce, without sending "
    "everything to a distant data center. Running language models on such devices raises new questions about "
    "memory bandwidth, quantization and energy, because every generated token has to stream the model's weights "
    "through the processor once. In this essay we look at how these constraints shape the design of inference "
    "runtimes, and why careful engineering of a few small kernels matters more than raw arithmetic throughput."
)


SAMPLE_REPS = 200  # sampler calls timed per engine
SAMPLE = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}


def per_call(fn, reps: int = SAMPLE_REPS) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def peak_rss_mb() -> float:
    # VmHWM is this process image's own high-water mark; ru_maxrss would carry over the parent's peak across exec
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_edgert(model: str, threads: int, prompt: list[int], gen: int, n_ctx: int) -> dict:
    import edgert
    from edgert.llm import LLM
    from edgert.llm.sampler import Sampler

    edgert.native.set_threads(threads)
    t0 = time.perf_counter()
    llm = LLM(model, n_ctx=n_ctx, threads=threads, progress=False)
    load = time.perf_counter() - t0
    m = llm.model
    t0 = time.perf_counter()
    logits = m.forward(prompt, 0, threads=threads)
    tok = int(np.argmax(logits))
    ttft = time.perf_counter() - t0
    pos = len(prompt)
    t1 = time.perf_counter()
    for _ in range(gen):
        logits = m.forward([tok], pos, threads=threads)
        tok = int(np.argmax(logits))
        pos += 1
    dec = time.perf_counter() - t1
    # prefill throughput on a fresh cache without the page-fault cost of the first touch
    t2 = time.perf_counter()
    m.forward(prompt, 0, threads=threads)
    pre = time.perf_counter() - t2
    sampler, history = Sampler(seed=0, repeat_last_n=64, **SAMPLE), prompt[-64:]
    sample = per_call(lambda: sampler.sample(logits, history))
    return {"load_s": load, "ttft_s": ttft, "prefill_tok_s": len(prompt) / pre, "decode_tok_s": gen / dec,
            "rss_mb": peak_rss_mb(), "weight_bytes": m.weight_bytes, "sample_s": sample}


def worker_llamacpp(model: str, threads: int, prompt: list[int], gen: int, n_ctx: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(gen):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    dec = time.perf_counter() - t1
    llm.reset()
    t2 = time.perf_counter()
    llm.eval(prompt)
    pre = time.perf_counter() - t2  # the prompt's last 64 ids are the penalty window (last_n_tokens_size 64)
    sample = per_call(lambda: llm.sample(top_k=SAMPLE["top_k"], top_p=SAMPLE["top_p"], min_p=SAMPLE["min_p"],
                                         temp=SAMPLE["temperature"], repeat_penalty=SAMPLE["repeat_penalty"]))
    return {"load_s": load, "ttft_s": ttft, "prefill_tok_s": len(prompt) / pre, "decode_tok_s": gen / dec,
            "rss_mb": peak_rss_mb(), "sample_s": sample}


def read_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    from edgert.native import ffi, lib

    import edgert

    buf = np.ones(nbytes, dtype=np.uint8)
    out = ffi.new("uint64_t *")
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        edgert.native.check(lib.et_stream_read(ffi.cast("void *", buf.ctypes.data), nbytes, threads, out))
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def run_worker(engine: str, model: str, threads: int, prompt: list[int], gen: int, n_ctx: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", engine, model, "--threads", str(threads), "--gen-tokens", str(gen),
           "--n-ctx", str(n_ctx), "--prompt-ids", ",".join(map(str, prompt))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{engine} at {threads} threads failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--worker", choices=["edgert", "llamacpp"], help="internal: one engine's run, in a subprocess")
    ap.add_argument("--prompt-ids", help="internal (with --worker): the prompt's token ids, comma-separated")
    args = ap.parse_args()

    if args.worker:
        if not args.prompt_ids:
            ap.error("--worker runs one engine on the parent's prompt: it needs --prompt-ids")
        prompt = [int(t) for t in args.prompt_ids.split(",")]
        fn = worker_edgert if args.worker == "edgert" else worker_llamacpp
        print(json.dumps(fn(args.model, args.threads[0], prompt, args.gen_tokens, args.n_ctx)))
        return 0

    from edgert.llm import store
    from edgert.llm.model import LlamaModel
    from edgert.llm.tokenizer import Tokenizer

    path = str(store.resolve(args.model))
    with LlamaModel(path, n_ctx=64) as m:
        tok = Tokenizer.from_gguf_metadata(m.gguf.metadata)
        weight_bytes = m.weight_bytes
    ids = tok.encode(TEXT * 4)[: args.prompt_tokens]
    try:
        import llama_cpp  # noqa: F401

        have_llamacpp = True
    except ImportError:
        have_llamacpp = False
        print("llama-cpp-python is not installed: measuring edgert only (pip install llama-cpp-python)",
              file=sys.stderr)

    rows = []
    for t in args.threads:
        bw = read_bandwidth(t)
        ours = run_worker("edgert", path, t, ids, args.gen_tokens, args.n_ctx)
        peer = run_worker("llamacpp", path, t, ids, args.gen_tokens, args.n_ctx) if have_llamacpp else None
        rows.append((t, bw, ours, peer))

    roof_note = f"weights streamed per token: {weight_bytes / 1e6:.1f} MB"
    print(f"\nedgert LLM benchmark — {os.path.basename(path)}, prompt {len(ids)} tokens, {args.gen_tokens} decoded, "
          f"n_ctx {args.n_ctx}; {roof_note}")
    hdr = f"{'threads':>7} {'engine':<10} {'load s':>7} {'TTFT ms':>8} {'prefill t/s':>12} {'decode t/s':>11} " \
          f"{'peak RSS MB':>12} {'read GB/s':>10} {'roofline t/s':>13} {'% roof':>7} {'sample ms':>10}"
    print(hdr)
    print("-" * len(hdr))
    for t, bw, ours, peer in rows:
        roof = bw / weight_bytes
        for name, r in (("edgert", ours), ("llama.cpp", peer)):
            if r is None:
                continue
            print(f"{t:>7} {name:<10} {r['load_s']:>7.3f} {r['ttft_s'] * 1e3:>8.1f} {r['prefill_tok_s']:>12.1f} "
                  f"{r['decode_tok_s']:>11.1f} {r['rss_mb']:>12.1f} {bw / 1e9:>10.1f} {roof:>13.1f} "
                  f"{100 * r['decode_tok_s'] / roof:>6.1f}% {r['sample_s'] * 1e3:>10.3f}")
        if ours and peer:
            print(f"{t:>7} {'ratio':<10} {peer['load_s'] / ours['load_s']:>6.2f}x {peer['ttft_s'] / ours['ttft_s']:>7.2f}x "
                  f"{ours['prefill_tok_s'] / peer['prefill_tok_s']:>11.2f}x {ours['decode_tok_s'] / peer['decode_tok_s']:>10.2f}x "
                  f"{peer['rss_mb'] / ours['rss_mb']:>11.2f}x {'':>10} {'':>13} {'':>7} "
                  f"{peer['sample_s'] / ours['sample_s']:>9.2f}x   (edgert advantage: >1 is better for edgert)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
