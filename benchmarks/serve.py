"""Serving benchmark: `edgert serve` under 1, 4 and 16 concurrent streaming clients, and the server's overhead
against LLM.generate called directly.

    python benchmarks/serve.py [MODEL] [--threads N] [--max-tokens 64] [--requests 2] [--clients 1 4 16]

MODEL is a .gguf path or a known name (default: a tiny random llama written to a temporary directory, so the
benchmark runs offline; pass smollm2-135m for the real model). The server runs in its own process (`edgert serve`
on 127.0.0.1, a free port, telemetry off) so client and server do not share a GIL. Each client sends --requests
greedy chat requests one after another with streaming on; reported per concurrency: aggregate completion tokens/s
(all clients' tokens / wall time), p50/p95 time to first token (request sent -> first content chunk) and p50/p95
request latency. The peer is the same prompts through LLM.generate in this process (server stopped), one at a time;
the ratio row is the server's 1-client tokens/s over it (target >= 0.95).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = ["Tell me about the sea.", "What is a transistor?", "Write a short poem about rain.",
           "Explain how a bicycle works.", "Why is the sky blue?", "Name three uses of copper.",
           "What do bees do in winter?", "Describe a quiet morning."]


def tiny_model(tmp: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from llama_tiny import write_tiny_llama

    path = tmp / "tiny.gguf"
    write_tiny_llama(path, fmt="q4_0", ctx=2048, dim=256, hidden=512, n_layers=4, n_heads=8, n_kv_heads=4)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(client, prompts, max_tokens, results):
    for p in prompts:
        t0 = time.perf_counter()
        ttft, n = None, 0
        async with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
        results.append((ttft, time.perf_counter() - t0, n))


async def load(base, clients, requests, max_tokens):
    import httpx

    results: list = []
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c, [PROMPTS[(i + k) % len(PROMPTS)] for k in range(requests)], max_tokens,
                                          results) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [r[0] for r in results if r[0] is not None]
    lat = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50_ms": 1e3 * np.percentile(ttft, 50), "ttft_p95_ms": 1e3 * np.percentile(ttft, 95),
            "lat_p50_ms": 1e3 * np.percentile(lat, 50), "lat_p95_ms": 1e3 * np.percentile(lat, 95)}


def direct(model, n_ctx, threads, requests, max_tokens):
    from edgert import telemetry
    from edgert.llm import LLM

    telemetry.set_enabled(False)
    llm = LLM(model, n_ctx=n_ctx, threads=threads, progress=False)
    llm.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=4, temperature=0)  # warm the weights' pages
    tokens, ttft = 0, []
    t0 = time.perf_counter()
    for k in range(requests):
        res = llm.chat([{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}], max_tokens=max_tokens, temperature=0)
        tokens += len(res.tokens)
        ttft.append(res.timings["ttft_s"])
    wall = time.perf_counter() - t0
    llm.close()
    return {"clients": "direct", "requests": requests, "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50_ms": 1e3 * np.percentile(ttft, 50), "ttft_p95_ms": 1e3 * np.percentile(ttft, 95),
            "lat_p50_ms": float("nan"), "lat_p95_ms": float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model or tiny_model(Path(tmp.name))
    port = free_port()
    cmd = [sys.executable, "-m", "edgert.cli", "serve", model, "--port", str(port), "--n-ctx", str(args.n_ctx),
           "--no-telemetry", "--log-level", "warning", "--max-queue", str(max(args.clients) + 4)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)  # a named model resolves through the user's model cache, as `edgert serve` would
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        import httpx

        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                print(server.stderr.read().decode(), file=sys.stderr)
                return 1
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 300:
                raise SystemExit("the server did not come up")
            time.sleep(0.1)
        asyncio.run(load(base, 1, 1, 4))  # warm-up
        for n in args.clients:
            rows.append(asyncio.run(load(base, n, args.requests, args.max_tokens)))
    finally:
        server.terminate()
        server.wait(30)
    peer = direct(model, args.n_ctx, args.threads, args.requests, args.max_tokens)  # the 1-client prompts
    one = next((r for r in rows if r["clients"] == 1), None)

    print(f"model: {Path(model).name}, {args.max_tokens} max tokens per request, greedy, streaming, "
          f"threads {args.threads or 'default'}")
    print(f"{'clients':>8} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} "
          f"{'lat p50':>9} {'lat p95':>9}")
    for r in rows + [peer]:
        print(f"{r['clients']!s:>8} {r['requests']:>8} {r['tokens']:>7} {r['tok_s']:>8.1f} {r['ttft_p50_ms']:>7.1f}ms "
              f"{r['ttft_p95_ms']:>7.1f}ms {r['lat_p50_ms']:>7.1f}ms {r['lat_p95_ms']:>7.1f}ms")
    if one:
        ratio = one["tok_s"] / peer["tok_s"]
        print(f"server/direct tokens/s at 1 client: {ratio:.3f} (overhead {100 * (1 - ratio):+.1f}%, target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
