"""Language-model evaluation: two GGUF models (or one model on two thread counts / profiles) teacher-forced over
the same text, the way llama.cpp's perplexity tool windows it.

The text is tokenized once (with the reference's tokenizer; the candidate must tokenize it identically) and cut
into chunks of ``ctx`` tokens. Each chunk is a fresh context (its first token becomes BOS when the model asks for
one); only the second half of each chunk is scored, so every scored token sees at least ctx/2 tokens of context.
Per scored position both sides' distributions are compared (KL, top-1, probability shift of the reference's top
token) and each side's negative log-likelihood of the actual next token gives its perplexity. A few greedy
continuations from prompts cut from the text give the match length and decode speed.

This module loads models through ``edgert.llm`` and measures; it must not print (the CLI does).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import InvalidArgumentError, check_count
from . import metrics as M
from . import thresholds as T
from .report import MEASURED_HERE, EvalReport, Failure, Side, cost_model, needs_emulation, per_units, ratio_phrase

DEFAULT_CTX = 512
GREEDY_PROMPTS = 3
GREEDY_PROMPT_TOKENS = 32
GREEDY_TOKENS = 32
WEIGHT_SQNR_DB_FLAG = 10.0  # a weight tensor this far from the reference's is named as where the models diverge


def _read_text(data) -> str:
    if data is None:
        raise InvalidArgumentError("a language-model evaluation needs text: pass data='...' or --text FILE")
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"the text is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    s = str(data)
    if "\n" not in s and len(s) < 4096:
        if os.path.isfile(s):
            try:
                with open(s, encoding="utf-8") as f:
                    return f.read()
            except UnicodeDecodeError as exc:
                raise InvalidArgumentError(f"text file {s} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                           "give a UTF-8 text file") from None
            except OSError as exc:
                raise InvalidArgumentError(f"cannot read text file {s}: {exc.strerror or exc}") from None
        # one line naming a file that is not there was scored as the text itself (a mistyped path passed)
        if s.endswith((".txt", ".text", ".md")) or (os.sep in s and " " not in s):
            raise InvalidArgumentError(f"text file {s} not found (pass the text itself, or the path of a file)")
    return s


def _greedy(llm, prompt: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after prompt (no sampling, no stop tokens) and the seconds the n-1 single-token steps took."""
    model = llm.model
    logits = model.forward(prompt, 0, threads=llm.threads)
    out = [int(np.argmax(logits))]
    t0 = time.perf_counter()
    for i in range(n - 1):
        if len(prompt) + len(out) >= model.n_ctx:
            break
        logits = model.forward([out[-1]], len(prompt) + i, threads=llm.threads)
        out.append(int(np.argmax(logits)))
    llm.reset()
    return out, time.perf_counter() - t0


def _weight_drift(ref_llm, cand_llm) -> list[dict]:
    """Per weight tensor present in both files with one shape, in the order the model computes with them (token
    embedding, blocks 0..n-1, output norm, output; the spec lists the last two after the embedding, as the C decoder
    takes them): SQNR, rel L2 and types."""
    rows = []
    rg, cg = ref_llm.model.gguf, cand_llm.model.gguf
    seen = set()
    for role, info in sorted(ref_llm.model.spec.tensors, key=lambda t: t[0] in ("output_norm", "output")):
        name = info.name
        if name in seen or name not in cg.tensors:
            continue
        seen.add(name)
        ci = cg.tensors[name]
        if ci.shape != info.shape:
            continue
        row = {"name": name, "reference_type": info.type_name, "candidate_type": ci.type_name}
        if ci.type_id == info.type_id and np.array_equal(rg.tensor_bytes(name), cg.tensor_bytes(name)):
            row.update(sqnr_db=float("inf"), rel_l2=0.0)
        else:
            a, b = _dequant(rg, name), _dequant(cg, name)
            row.update(sqnr_db=M.sqnr_db(a, b), rel_l2=M.relative_l2(a, b))
        rows.append(row)
    return rows


def _dequant(g, name: str) -> np.ndarray:
    info = g.tensors[name]
    if len(info.shape) == 1:
        return np.asarray(g.tensor_array(name), dtype=np.float32)
    return g.qtensor(name).dequantize()


def evaluate_llm(reference: Side, candidate: Side, text, limits: dict, *, ctx: int = DEFAULT_CTX,
                 chunks: int | None = None, greedy_prompts: int = GREEDY_PROMPTS,
                 greedy_tokens: int = GREEDY_TOKENS, progress=None) -> EvalReport:
    from ..llm import LLM

    t_start = time.perf_counter()
    text = _read_text(text)
    ctx = check_count("ctx", ctx, lo=4)  # a numpy integer too, as chunks and threads take
    ref = LLM(reference.path, n_ctx=ctx, threads=reference.threads, progress=False)
    cand = LLM(candidate.path, n_ctx=ctx, threads=candidate.threads, progress=False)
    try:
        if ref.n_ctx < ctx or cand.n_ctx < ctx:
            raise InvalidArgumentError(f"--ctx {ctx} exceeds a model's context length "
                                       f"({ref.n_ctx} / {cand.n_ctx}); use a smaller --ctx")
        if ref.model.vocab_size != cand.model.vocab_size:
            raise InvalidArgumentError(f"the models' vocabularies differ ({ref.model.vocab_size} vs "
                                       f"{cand.model.vocab_size} tokens): token distributions cannot be compared")
        tokens = ref.tokenize(text)
        if cand.tokenize(text[:2000]) != ref.tokenize(text[:2000]):
            raise InvalidArgumentError("the candidate tokenizes the text differently from the reference: "
                                       "KL and perplexity would compare different events")
        n_chunks = len(tokens) // ctx
        if n_chunks < 1:
            raise InvalidArgumentError(f"the text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}; "
                                       "give more text or a smaller --ctx")
        if chunks is not None:  # an int >= 1: evaluate checked it
            n_chunks = min(n_chunks, chunks)
        bos = ref.tokenizer.bos_id if ref.tokenizer.add_bos else None
        first = ctx // 2
        parts: dict[str, list] = {k: [] for k in ("kl", "nll_ref", "nll_cand", "same_top", "dp_top")}
        t_ref = t_cand = 0.0
        chunk_rows = []
        for c in range(n_chunks):
            ids = list(tokens[c * ctx:(c + 1) * ctx])
            if bos is not None:
                ids[0] = bos
            t0 = time.perf_counter()
            lr = ref.logits(ids)[first:ctx - 1]
            t1 = time.perf_counter()
            lc = cand.logits(ids)[first:ctx - 1]
            t2 = time.perf_counter()
            t_ref += t1 - t0
            t_cand += t2 - t1
            st = M.token_stats(lr, lc, ids[first + 1:ctx])
            for k in parts:
                parts[k].append(st[k])
            chunk_rows.append({"chunk": c, "ppl_reference": M.perplexity(st["nll_ref"]),
                               "ppl_candidate": M.perplexity(st["nll_cand"]), "kl_mean": float(st["kl"].mean())})
            if progress:
                progress(c + 1, n_chunks)
        stats = {k: np.concatenate(v) for k, v in parts.items()}

        # greedy continuations from prompts spread over the text
        starts = np.linspace(0, max(len(tokens) - GREEDY_PROMPT_TOKENS, 0), max(greedy_prompts, 0)).astype(int)
        plen = min(GREEDY_PROMPT_TOKENS, ctx // 2)
        gen = min(greedy_tokens, ctx - plen)
        matches, dec_r, dec_c, n_dec = [], 0.0, 0.0, 0
        for s in starts:
            prompt = list(tokens[s:s + plen])
            if bos is not None:
                prompt = [bos] + prompt[:-1]
            a, ta = _greedy(ref, prompt, gen)
            b, tb = _greedy(cand, prompt, gen)
            matches.append(M.common_prefix(a, b))
            dec_r, dec_c, n_dec = dec_r + ta, dec_c + tb, n_dec + len(a) - 1

        ppl_r, ppl_c = M.perplexity(stats["nll_ref"]), M.perplexity(stats["nll_cand"])
        n_scored = int(stats["kl"].size)
        m = {
            "ppl_reference": ppl_r, "ppl_candidate": ppl_c, "ppl_delta_pct": (ppl_c / ppl_r - 1.0) * 100.0,
            **M.distribution(stats["kl"], "kl"),
            "top1_pct": float(stats["same_top"].mean() * 100.0),
            "rms_dp_pct": M.rms(stats["dp_top"]) * 100.0,
            "greedy_match_mean": float(np.mean(matches)) if matches else float("nan"),
            "greedy_match_min": int(min(matches)) if matches else 0,
            "greedy_tokens": gen,
            "tokens_scored": n_scored, "tokens_evaluated": n_chunks * ctx, "chunks": n_chunks, "ctx": ctx,
        }
        weights = _weight_drift(ref, cand)
        sides = {}
        for key, side, llm, t_eval, t_dec in (("reference", reference, ref, t_ref, dec_r),
                                              ("candidate", candidate, cand, t_cand, dec_c)):
            cm, prof = cost_model(side.device)
            prefill = n_chunks * ctx / t_eval if t_eval > 0 else float("nan")
            decode = n_dec / t_dec if t_dec > 0 and n_dec else float("nan")
            spt = 1.0 / decode if decode == decode and decode > 0 else 1.0 / prefill
            per_m = per_units(cm, spt, 1e6)
            sides[key] = {
                "label": side.label, "profile": prof, "emulated": needs_emulation(side.device),
                "threads": side.threads or "default",
                "prefill_tok_s": prefill, "decode_tok_s": decode, "eval_s": t_eval,
                "weight_bytes": int(llm.model.weight_bytes), "bytes_moved": 0,
                "power_w": cm.power_w, "price_usd_per_hour": cm.price_usd_per_hour,
                "energy_wh_per_1m_tokens": per_m["energy_wh"], "cost_usd_per_1m_tokens": per_m["cost_usd"],
                "per_1m_tokens_basis": "decode" if decode == decode else "prefill",
            }
    finally:
        ref.close()
        cand.close()

    failures = [Failure(*f) for f in T.check("llm", m, limits)]
    first = next((w["name"] for w in weights if w["sqnr_db"] < WEIGHT_SQNR_DB_FLAG), None)
    if failures and first:
        failures = [Failure(f.metric, f.value, f.direction, f.limit, f"first changed weight: {first}")
                    if i == 0 else f for i, f in enumerate(failures)]
    rs, cs = sides["reference"], sides["candidate"]
    basis = "cost_usd_per_1m_tokens" if rs["cost_usd_per_1m_tokens"] > 0 and cs["cost_usd_per_1m_tokens"] > 0 \
        else "energy_wh_per_1m_tokens"
    phrase = ratio_phrase(rs[basis], cs[basis], "per 1M tokens" if basis.startswith("cost") else
                          "energy per 1M tokens")
    verdict = (f"candidate: {phrase} at {m['ppl_delta_pct']:+.1f}% perplexity, KL {m['kl_mean']:.4f}, "
               f"same top token {m['top1_pct']:.1f}% — {'PASS' if not failures else 'FAIL'}")
    notes = ["bytes moved host↔device are 0 for the C decoder: weights are read in place from the mapped file "
             "(weight_bytes is what one decode step streams from memory)"]
    for side, s in ((reference, rs), (candidate, cs)):
        if s["emulated"]:
            notes.append(f"{side.label}: device {side.device!r} is not on this machine; emulated (the C decoder "
                         "ran on this CPU)")
    if reference.device or candidate.device:
        notes.append(MEASURED_HERE)
    if rs["cost_usd_per_1m_tokens"] == 0 and cs["cost_usd_per_1m_tokens"] == 0:
        notes.append("both profiles price the machine at $0/h and electricity at $0/kWh: the verdict compares "
                     "energy (set a price in the profile or EDGERT_ELECTRICITY_USD_PER_KWH for dollars)")
    return EvalReport(
        kind="llm", reference=reference, candidate=candidate, metrics=m, thresholds=dict(limits), failures=failures,
        sides=sides, tensors=weights, first_divergence=first, verdict=verdict, notes=notes,
        details={"chunks": chunk_rows, "greedy_matches": matches, "kl_histogram": _histogram(stats["kl"])},
        elapsed_s=time.perf_counter() - t_start)


def _histogram(kl: np.ndarray, bins: int = 30) -> dict:
    """log10 KL per position in ``bins`` bins; positions whose KL is not finite (a candidate that made NaN or Inf
    logits) are counted apart, as ``nonfinite``"""
    finite = np.isfinite(kl)
    v = np.log10(np.maximum(kl[finite], 1e-8))
    counts, edges = np.histogram(v, bins=bins) if v.size else (np.zeros(bins, np.int64), np.linspace(-8, 0, bins + 1))
    return {"log10_kl_edges": edges.tolist(), "counts": counts.tolist(), "nonfinite": int(kl.size - finite.sum())}
