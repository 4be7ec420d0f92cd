"""The ``edgert`` command: pull, models, chat, generate, info, serve, report.

Each subcommand is a thin shell over the Python API; errors print one ``edgert: error: ...`` line and exit 1 (``eval``
exits 2, as argparse's usage errors do, so that a CI job tells an error from a failed gate, which exits 1), and
warnings one ``edgert: warning: ...`` line. Both name options as the command takes them (``--emulate``, not the API's
``emulate=True``: ``cli_spelling``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from .errors import ContextLengthError, EdgertError

DEFAULT_MODEL = "smollm2-135m"  # kept equal to edgert.llm.DEFAULT_MODEL without importing the LLM stack

# the API's spelling of an option in edgert's messages -> the command's flag
_CLI_SPELLINGS = (
    (re.compile(r"\bemulate=True\b"), "--emulate"),
    (re.compile(r"\bfallback=(['\"])(allow|forbid)\1"), r"--fallback \2"),
    (re.compile(r"\bmin_nodes_per_partition=(\d+)"), r"--min-nodes \1"),
    (re.compile(r"\bmin_nodes_per_partition\b"), "--min-nodes"),
    (re.compile(r"\bmax_partitions=(\d+)"), r"--max-partitions \1"),
    (re.compile(r"\bmax_partitions\b"), "--max-partitions"),
)
# the LLM commands' (generate, chat, serve) options; a plain word only where it names the option ("seed must ...")
_LLM_FLAGS = {
    "max_tokens_cap": "--max-tokens-cap", "max_tokens": "--max-tokens", "n_ctx": "--n-ctx", "top_k": "--top-k",
    "top_p": "--top-p", "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "max_queue": "--max-queue",
    "request_timeout_s": "--timeout", "shutdown_timeout_s": "--shutdown-timeout",
    "temperature": "--temperature", "seed": "--seed", "threads": "--threads", "stop": "--stop",
}


def _llm_flag(m: re.Match) -> str:  # "max_tokens=5" -> "--max-tokens 5", "max_tokens must" -> "--max-tokens must"
    return _LLM_FLAGS[m[1]] + (" " if m[0].endswith("=") else "")


_CLI_SPELLINGS += (
    # (not a syntax's placeholder, as eval's MODEL@threads=N: an '=' before a capital alone, or right after '@')
    (re.compile(r"\b(%s)\b(?:=(?=\S)(?![A-Z]\b)|(?=[ ,:;)]|$))" % "|".join(n for n in _LLM_FLAGS if "_" in n)),
     _llm_flag),
    (re.compile(r"(?<!@)\b(%s)(?:=(?=\S)(?![A-Z]\b)|(?= must\b))" % "|".join(n for n in _LLM_FLAGS if "_" not in n)),
     _llm_flag),
    (re.compile(r" or None(?=,)"), ""),  # a flag cannot be given None
)


def cli_spelling(message: str) -> str:
    """An edgert message with the Python API's option spellings (``emulate=True``, ``fallback='allow'``,
    ``max_partitions=1``...) as the command's flags (``--emulate``, ``--fallback allow``, ``--max-partitions 1``)."""
    for pattern, flag in _CLI_SPELLINGS:
        message = pattern.sub(flag, message)
    return message


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"edgert: warning: {cli_spelling(str(message))}", file=sys.stderr if file is None else file)


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_model(p: argparse.ArgumentParser) -> None:
    # no MODEL: None, and _load takes the default model by name (a file or directory named like it in the working
    # directory is not it)
    p.add_argument("model", nargs="?", default=None,
                   help=f"a known model name or a .gguf path (default {DEFAULT_MODEL}, by name)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length / KV cache size (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: physical cores)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the model file's")


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)


def _load(args):
    from .errors import InvalidArgumentError
    from .llm import DEFAULT_MODEL as default_model, LLM

    template = None
    if args.chat_template is not None:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"--chat-template {args.chat_template}: not a readable UTF-8 text file "
                                       f"({exc})") from None
    return LLM(default_model if args.model is None else args.model, n_ctx=args.n_ctx, threads=args.threads,
               chat_template=template)


def cmd_pull(args) -> int:
    from .llm import store

    path = store.pull(args.name, progress=not args.quiet)
    print(path)
    return 0


def cmd_models(args) -> int:
    from .llm import store

    rows = store.list_models()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no models in {store.models_dir()} (try: edgert pull {DEFAULT_MODEL})")
        return 0
    print(f"{'name':<36} {'size':>9}  {'arch':<8} {'ctx':>6}  quantization")
    for r in rows:
        if "error" in r:  # a damaged or partial file: say so, instead of a row of Nones
            print(f"{r['name']:<36} {r['size_bytes'] / 1e6:>7.1f}MB  unreadable: {r['error']}")
            continue
        mix = ", ".join(f"{k}:{v}" for k, v in sorted(r["quant_mix"].items(), key=lambda kv: -kv[1]))
        print(f"{r['name']:<36} {r['size_bytes'] / 1e6:>7.1f}MB  {str(r['architecture']):<8} "
              f"{str(r['context_length']):>6}  {mix}")
    return 0


def _stats_line(res) -> str:
    t = res.timings
    return (f"[{res.prompt_tokens} prompt, {len(res.tokens)} generated tokens | prefill {t['prefill_tok_s']:.1f} tok/s, "
            f"decode {t['decode_tok_s']:.1f} tok/s, first token {t['ttft_s'] * 1000:.0f} ms | {res.finish_reason}]")


def _telemetry_flag(args) -> None:
    if getattr(args, "no_telemetry", False):
        from . import telemetry

        telemetry.set_enabled(False)


def cmd_generate(args) -> int:
    _telemetry_flag(args)
    llm = _load(args)
    kw = _sampling(args)
    if args.json:
        res = llm.chat([{"role": "user", "content": args.prompt}], **kw) if args.chat else llm.generate(args.prompt, **kw)
        print(json.dumps(res.to_dict()))
        return 0
    pieces = llm.chat_stream([{"role": "user", "content": args.prompt}], **kw) if args.chat else llm.stream(args.prompt, **kw)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # the note on stderr: stdout holds only the generated text
        print("\n[stopped]", file=sys.stderr)
        return 130
    print()
    if llm.last_result is not None and not args.quiet:
        print(_stats_line(llm.last_result), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    _telemetry_flag(args)
    llm = _load(args)
    kw = _sampling(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    base = list(history)
    print(f"edgert chat — {llm.name} ({llm.path}), n_ctx {llm.n_ctx}. /reset clears the conversation, /exit quits; "
          "Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            history = list(base)
            llm.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        answer = []
        try:
            for piece in llm.chat_stream(history, **kw):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
            if llm.last_result is not None:
                print(_stats_line(llm.last_result), file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except EdgertError as exc:
            # e.g. the conversation outgrew the context: keep the chat alive, drop this turn
            hint = " (type /reset to start a new conversation)" if isinstance(exc, ContextLengthError) else ""
            print(f"\nedgert: error: {cli_spelling(str(exc))}{hint}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_serve(args) -> int:
    import ipaddress

    from . import telemetry
    from .errors import InvalidArgumentError
    from .serve import create_app, run_server
    from .serve.app import check_settings, listen

    _telemetry_flag(args)
    if not 0 <= args.port <= 65535:  # checked before the model loads, not by bind() after
        raise InvalidArgumentError(f"--port must be in 0..65535, got {args.port}")
    check_settings(args.max_queue, args.timeout, args.max_tokens_cap, args.shutdown_timeout)  # likewise
    if telemetry.enabled():
        telemetry.host_cost_model()  # a bad EDGERT_POWER_W... is refused here, not turned into costless events
    # bound before the model loads: a port in use or a bad --host is one error line at once, not uvicorn's after the
    # load; uvicorn serves these sockets (no window for another process to take the port)
    sockets = listen(args.host, args.port)
    llm = None
    try:
        api_key = args.api_key or None
        try:
            loopback = ipaddress.ip_address(args.host).is_loopback
        except ValueError:
            loopback = args.host == "localhost"
        if not loopback and not api_key and not os.environ.get("EDGERT_API_KEY"):
            print(f"edgert: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
                  file=sys.stderr)
        llm = _load(args)
        app = create_app(llm, api_key=api_key, max_queue=args.max_queue, request_timeout_s=args.timeout,
                         max_tokens_cap=args.max_tokens_cap, telemetry=not args.no_telemetry,
                         shutdown_timeout_s=args.shutdown_timeout)
        port = sockets[0].getsockname()[1]  # the port taken, for --port 0
        print(f"edgert serve — {llm.name} (n_ctx {llm.n_ctx}) on http://{args.host}:{port}/v1", file=sys.stderr)
        run_server(app, host=args.host, port=port, log_level=args.log_level, sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if llm is not None:  # the server's stop already gave a step still in flight (Ctrl+C) the shutdown timeout:
            llm.close(timeout=0)  # freed if it ended, else the process ends with the model
    return 0


def cmd_report(args) -> int:
    from . import telemetry

    rows = telemetry.query(since=args.since, by=args.by)  # errors: one line and exit 1, as every command
    print(telemetry.format_report(rows, args.format))
    return 0


def cmd_info(args) -> int:
    from . import native

    info = native.info()
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {', '.join(v) if isinstance(v, list) else v}")
    return 0


def cmd_devices(args) -> int:
    from .profiles import devices_report

    rep = devices_report()
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    m = rep["machine"]
    mem = f"{m['memory_bytes'] / 2**30:.1f} GiB" if m["memory_bytes"] else "unknown"
    ports = m["serial_ports"]
    print(f"this machine: {m['cpu']} ({m['machine']}), {m['physical_cores']} physical cores, {mem}")
    print(f"  C core ISA: {m['isa']} (available: {', '.join(m['isas'])}; features: {', '.join(m['features']) or '-'})")
    print(f"  onnxruntime: {m['onnxruntime'] or 'not installed'}"
          + (f" ({', '.join(m['onnxruntime_providers'])})" if m["onnxruntime_providers"] else ""))
    print(f"  LiteRT/TFLite: " + (f"{m.get('litert_package') or m['litert']} ({m['litert']})" if m["litert"] else
                                  "not installed (pip install ai-edge-litert)"))
    print("  serial ports: " + ("pyserial not installed" if ports is None else
                                ", ".join(p["device"] for p in ports) or "none"))
    print()
    for prof in rep["profiles"]:
        if "error" in prof:
            print(f"{prof['name']}: INVALID: {prof['error']}")
            continue
        print(f"{prof['name']}: {prof['description']}  [{prof['power_w']:g} W, ${prof['price_usd_per_hour']:.4f}/h]")
        for u in prof["units"]:
            mark = "yes" if u["available"] else "no "
            print(f"  {u['name']:<6} {u['kind']:<4} {u['delegate']:<12} available: {mark} {u['status']}")
    return 0


def cmd_npu_sim(args) -> int:
    from .bridge import NpuSim

    sim = NpuSim(baud=args.baud, ops_per_s=args.ops_per_s, arena=args.arena, drop=args.drop, corrupt=args.corrupt,
                 duplicate=args.duplicate, stall_ms=args.stall_ms, reset_after=args.reset_after, asan=args.asan)
    sim.start()
    print(sim.url, flush=True)
    print(f"edgert npu-sim: firmware on {sim.url} at {args.baud:g} baud; use --device serial-npu --device-url "
          f"{sim.url}; Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        sim.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


def _dims(args) -> dict[str, int]:
    """The --dim NAME=VALUE bindings of plan and run."""
    from .errors import InvalidArgumentError

    dims = {}
    for item in args.dim:
        name, _, value = item.partition("=")
        v = value.strip()
        if not name or not (v.isascii() and v.isdigit()):  # isdigit alone takes '²', which int refuses
            raise InvalidArgumentError(f"--dim expects NAME=VALUE with an integer VALUE >= 0 (0: an empty batch), "
                                       f"got {item!r}")
        if name.strip() in dims:
            raise InvalidArgumentError(f"--dim {name.strip()} is given twice")
        dims[name.strip()] = int(value)
    return dims


def cmd_plan(args) -> int:
    from .errors import InvalidArgumentError
    from .plan import plan

    result = plan(args.model, device=args.device, fallback=args.fallback, min_nodes_per_partition=args.min_nodes,
                  max_partitions=args.max_partitions, dims=_dims(args))

    def write_dot(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(result.to_dot())

    for flag, path, write in (("--dot", args.dot, write_dot), ("--svg", args.svg, result.to_svg)):
        if path:
            try:
                write(path)
            except OSError as exc:
                raise InvalidArgumentError(f"{flag} {path}: cannot write it: {exc.strerror or exc}") from None
    print(result.to_json() if args.json else result.table())
    return 0


def output_file_names(names: list[str]) -> list[str]:
    """One .npy file name per graph output for ``edgert run --output DIR``, all distinct: a name's path separators
    and ':' become '_'; where that (or a case-insensitive file system) would give two outputs one file, an output
    whose name needed no change keeps it and the others get ``~2``, ``~3``... (deterministic: model output order)."""
    bases = [n.replace("/", "_").replace("\\", "_").replace(":", "_").replace("\0", "_") for n in names]
    natural = {b.casefold() for b in bases}
    taken: set[str] = set()
    files: list[str | None] = [None] * len(names)
    # two passes: names kept as they are claim their file first, so `a_b` is never moved aside by `a/b`
    for unchanged in (True, False):
        for i, (name, base) in enumerate(zip(names, bases)):
            if (name == base) != unchanged:
                continue
            stem, k = base, 1
            while stem.casefold() in taken or (stem != base and stem.casefold() in natural):
                k += 1
                stem = f"{base}~{k}"
            taken.add(stem.casefold())
            files[i] = stem + ".npy"
    return files  # type: ignore[return-value]


def cmd_run(args) -> int:
    from pathlib import Path

    import numpy as np

    from .errors import InvalidArgumentError
    from .formats import array_file
    from .session import Session

    _telemetry_flag(args)
    feeds = {}
    for item in args.input:
        name, _, path = item.partition("=")
        if not name or not path:
            raise InvalidArgumentError(f"--input expects NAME=FILE.npy, got {item!r}")
        if name in feeds:
            raise InvalidArgumentError(f"--input {name} is given twice")
        try:
            feeds[name] = array_file(path)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"--input {name}: {exc}") from None
        if isinstance(feeds[name], dict):  # an .npz archive (whatever the file's name)
            raise InvalidArgumentError(f"--input {name}: {path} is an .npz archive, not a .npy array; save each input "
                                       "with np.save")
    sess = Session(args.model, device=args.device, fallback=args.fallback, emulate=args.emulate, dims=_dims(args),
                   device_options={"url": args.device_url} if getattr(args, "device_url", None) else None)
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    if args.output:
        try:
            Path(args.output).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(f"--output {args.output}: cannot create the directory: "
                                       f"{exc.strerror or exc}") from None
    for name, arr, file in zip(names, outs, output_file_names(names)):
        line = f"{name}: {arr.dtype} {list(arr.shape)}"
        if args.output:
            dest = Path(args.output) / file
            np.save(dest, arr)
            line += f" -> {dest}"
        elif arr.size and arr.dtype.kind in "fiub":
            line += f"  min {arr.min():.6g} max {arr.max():.6g} mean {arr.astype(np.float64).mean():.6g}"
        print(line)
    st, p = sess.stats(), sess.plan
    print(f"[{args.device}{' (emulated)' if args.emulate else ''}: {len(p.partitions)} partition(s), "
          f"{st['busy_s'] * 1000:.2f} ms, bytes to device {st['bytes_to_device']} (plan "
          f"{p.estimates['bytes_to_device']}), to host {st['bytes_to_host']} (plan {p.estimates['bytes_to_host']})]",
          file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .eval import evaluate, kind_of
    from .eval.plot import check_plot_path
    from rich.console import Console
    from rich.progress import Progress

    from .errors import InvalidArgumentError
    from .eval import thresholds as th
    from .eval.report import parse_side
    from .quantize_model import check_output_path

    rt = args.reference_threads if args.reference_threads is not None else args.threads
    ct = args.candidate_threads if args.candidate_threads is not None else args.threads
    ref, cand = parse_side(args.reference, threads=rt), parse_side(args.candidate, threads=ct)
    # each kind's own flags: one given for the other kind was silently ignored
    kind = kind_of(ref, cand)
    own = {"llm": {"--text": args.text, "--ctx": args.ctx, "--chunks": args.chunks},
           "graph": {"--inputs": args.inputs, "--random": args.random, "--seed": args.seed, "--runs": args.runs,
                     "--no-intermediates": args.no_intermediates or None}}
    wrong = [f for f, v in own["graph" if kind == "llm" else "llm"].items() if v is not None]
    if wrong:
        raise InvalidArgumentError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for " + (
            "graph models; language models take --text FILE [--ctx N] [--chunks N]" if kind == "llm" else
            "language models (.gguf); graph models take --inputs DIR or --random N [--seed S]"))
    if args.inputs is not None and (args.random is not None or args.seed is not None):
        raise InvalidArgumentError(f"--inputs DIR and {'--random N' if args.random is not None else '--seed S'} are "
                                   "alternatives: samples are read from DIR, or drawn at random (--random N --seed S)")
    # --text names a file; evaluate() also takes literal text, so a mistyped path would be scored as the text itself
    if args.text is not None and not os.path.isfile(args.text):
        raise InvalidArgumentError(f"--text {args.text}: no such file" if not os.path.exists(args.text) else
                                   f"--text {args.text}: not a file")
    # where the results go is checked before minutes of evaluation, not after
    inputs = [ref.path, cand.path, args.text, args.thresholds]  # a result written over one destroyed it
    for flag, dest in (("--json", args.json), ("--plot", args.plot)):
        if dest is not None:
            check_output_path(dest, flag, inputs)
            inputs.append(dest)  # --json and --plot the same file: the plot overwrote the report
    if args.plot is not None:
        check_plot_path(args.plot)
    thresholds = th.merge(args.thresholds, args.threshold, kind)  # checked by evaluate(), before any model is loaded
    with Progress(transient=True, disable=args.quiet or not sys.stderr.isatty(), console=Console(stderr=True)) as bar:
        task = bar.add_task("evaluating", total=None)
        rep = evaluate(ref, cand, data=args.text if args.text is not None else args.inputs, thresholds=thresholds,
                       ctx=args.ctx, chunks=args.chunks, random=args.random, seed=args.seed or 0, runs=args.runs,
                       intermediates=not args.no_intermediates,
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    print(rep.table())
    try:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(rep.to_json())
        if args.plot:
            rep.plot(args.plot)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write {exc.filename or args.json or args.plot}: "
                                   f"{exc.strerror or exc}") from None
    for note in rep.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.gate and not rep.passed:
        print("edgert: gate failed: " + "; ".join(rep.failures), file=sys.stderr)
        return 1
    return 0


def cmd_quantize(args) -> int:
    from .errors import InvalidArgumentError
    from .quantize_model import GGUF_TARGETS, ONNX_TARGETS, detect_kind, quantize_gguf, quantize_onnx

    kind = detect_kind(args.input)
    allowed = GGUF_TARGETS if kind == "gguf" else ONNX_TARGETS
    unsupported = f"is not a supported type: {'an' if kind == 'onnx' else 'a'} {kind.upper()} model quantizes to " \
                  f"{', '.join(allowed)}"
    rest = list(args.args)
    qtype = args.to
    for a in list(rest):
        if a in GGUF_TARGETS + ONNX_TARGETS and qtype is None:
            qtype = a
            rest.remove(a)
    # a word with no extension and no directory is a type, not the output's name (q5_k was taken for the output)
    word = next((a for a in rest if "." not in os.path.basename(a) and os.sep not in a), None)
    if qtype is None and word is not None:
        raise InvalidArgumentError(f"{word!r} {unsupported}")
    output = args.output or (rest.pop(0) if rest else None)
    if rest:
        raise InvalidArgumentError(f"unexpected argument(s) {rest}: edgert quantize INPUT OUTPUT TYPE")
    if qtype is None:
        raise InvalidArgumentError(f"give the target type: one of {', '.join(allowed)}")
    if qtype not in allowed:
        raise InvalidArgumentError(f"{qtype!r} {unsupported}")
    # flags for another target were silently ignored
    if args.calibration is not None and qtype != "int8-static":
        raise InvalidArgumentError(f"--calibration is for int8-static (ONNX); {qtype} takes no calibration samples")
    if args.keep_embeddings and kind != "gguf":
        raise InvalidArgumentError("--keep-embeddings is for GGUF models (token_embd); an ONNX model has none")
    if output is None:
        base, ext = os.path.splitext(args.input)
        output = f"{base}.{qtype}{ext}"
    if kind == "gguf":
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      transient=True, disable=args.quiet or not sys.stderr.isatty(),
                      console=Console(stderr=True)) as bar:
            task = bar.add_task(f"re-quantizing to {qtype}", total=None)
            summary = quantize_gguf(args.input, output, qtype, keep_embeddings=args.keep_embeddings,
                                    progress=lambda done, total, name: bar.update(task, completed=done, total=total,
                                                                                  description=name))
        print(f"{output}: {summary['requantized']} tensors re-quantized to {qtype}, {summary['kept']} kept; "
              f"{summary['bytes_in'] / 1e6:.2f} MB -> {summary['bytes_out'] / 1e6:.2f} MB of tensor data")
    else:
        from rich.console import Console

        with Console(stderr=True, quiet=args.quiet).status(f"quantizing to {qtype} (onnxruntime.quantization)"):
            summary = quantize_onnx(args.input, output, qtype, calibration=args.calibration)
        print(f"{output}: {qtype}; {summary['bytes_in'] / 1e6:.2f} MB -> {summary['bytes_out'] / 1e6:.2f} MB")
        if not summary["quantized_ops"]:  # onnxruntime.quantization found nothing it quantizes in this mode
            print(f"edgert: warning: nothing was quantized: {qtype} found no op it takes"
                  + (" (int4 quantizes MatMul with constant weights)" if qtype == "int4" else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgert", description="edgert — portable edge-inference runtime")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("pull", help="fetch a known model into the model cache")
    s.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("models", help="list cached models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("chat", help="interactive chat (streams; /reset, /exit)")
    _add_model(s)
    _add_sampling(s, temperature=0.8)
    s.add_argument("--system", default=None, help="system prompt")
    s.add_argument("--no-telemetry", action="store_true", help="record no events in $EDGERT_HOME/telemetry.db")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("generate", help="complete one prompt")
    _add_model(s)
    s.add_argument("-p", "--prompt", required=True)
    _add_sampling(s, temperature=0.8)
    s.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    s.add_argument("--json", action="store_true", help="print text, tokens and timings as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="no stats line")
    s.add_argument("--no-telemetry", action="store_true", help="record no event in $EDGERT_HOME/telemetry.db")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (loopback by default)")
    _add_model(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $EDGERT_API_KEY)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the model (default 64)")
    s.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds, queue included")
    s.add_argument("--max-tokens-cap", type=int, default=None, help="most tokens per request (default n_ctx)")
    s.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl+C generations stop at once; open responses get this long to end (default 5)")
    s.add_argument("--no-telemetry", action="store_true", help="record no events in $EDGERT_HOME/telemetry.db")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("report", help="latency, tokens/s, cost and errors from the local telemetry")
    s.add_argument("--since", default=None, help="only the last DURATION (e.g. 30m, 24h, 7d; default all)")
    s.add_argument("--by", choices=["model", "device", "delegate"], default=None)
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("info", help="the C core's ISA variant, threads and CPU features")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("devices", help="device profiles, and what this machine has (CPU, providers, ports)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("plan",
                       help="partition an ONNX or TFLite model for a device: placement, copy points, estimates")
    s.add_argument("model", help="an .onnx or .tflite file")
    s.add_argument("--device", default="host", help="a device profile name (see `edgert devices`) or a .toml path")
    s.add_argument("--fallback", choices=["allow", "forbid"], default="allow",
                   help="forbid: fail, naming every node the accelerators cannot run (default allow: host runs them)")
    s.add_argument("--min-nodes", type=int, default=1, help="smaller device partitions go to the host (default 1)")
    s.add_argument("--max-partitions", type=int, default=None, help="at most this many partitions")
    s.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE", help="bind a symbolic dim (repeatable)")
    s.add_argument("--svg", default=None, metavar="FILE", help="draw the partitioned graph as SVG")
    s.add_argument("--dot", default=None, metavar="FILE", help="write the partitioned graph as Graphviz dot")
    s.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run", help="run an ONNX or TFLite model on a device profile (outputs, bytes moved vs plan)")
    s.add_argument("model", help="an .onnx or .tflite file")
    s.add_argument("--device", default="host", help="a device profile name (see `edgert devices`) or a .toml path")
    s.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="a graph input (repeatable)")
    s.add_argument("--output", default=None, metavar="DIR", help="save each output as DIR/<name>.npy ('/' and ':' as '_'; "
                   "names that would share a file get ~2, ~3...)")
    s.add_argument("--emulate", action="store_true", help="run the device's partitions on the host, link copies kept")
    s.add_argument("--fallback", choices=["allow", "forbid"], default="allow",
                   help="forbid: fail when the device or an op is missing (default allow: run it on the host)")
    s.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                   help="bind a symbolic dim when the session is made (repeatable; a static-shape device plans with it)")
    s.add_argument("--no-telemetry", action="store_true", help="record no event in $EDGERT_HOME/telemetry.db")
    s.add_argument("--device-url", default=None, metavar="URL",
                   help="serial-npu: the device's pyserial URL (a port, socket://..., the path `edgert npu-sim` prints)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("npu-sim", help="run the reference NPU firmware as an emulator on a pty (prints its path)")
    s.add_argument("--baud", type=float, default=921600, help="line rate, 10 bits per byte (0: unpaced)")
    s.add_argument("--ops-per-s", type=float, default=0, help="device compute speed (0: as fast as this CPU)")
    s.add_argument("--arena", type=int, default=0, help="arena bytes (0: the build's 64 MiB)")
    s.add_argument("--drop", type=float, default=0, help="probability a byte is lost (each direction)")
    s.add_argument("--corrupt", type=float, default=0, help="probability a byte has a bit flipped")
    s.add_argument("--duplicate", type=float, default=0, help="probability a byte arrives twice")
    s.add_argument("--stall-ms", type=int, default=0, help="delay every answer by this much")
    s.add_argument("--reset-after", type=int, default=None, metavar="N", help="reset when the Nth frame ends")
    s.add_argument("--asan", action="store_true", help="the AddressSanitizer build")
    s.set_defaults(func=cmd_npu_sim)

    from .eval.thresholds import describe  # plain text, no models loaded

    s = sub.add_parser("eval", help="compare a candidate model with a reference: drift, gate, speed and cost",
                       description="Language models (.gguf): teacher-forced over --text in windows of --ctx tokens. "
                                   "Graph models (.onnx, .tflite): per output and shared intermediate tensor "
                                   "(a .tflite side: outputs only). "
                                   "MODEL@DEVICE picks a device profile (emulated when absent); MODEL@threads=N "
                                   f"a thread count. Default thresholds, llm: {describe('llm')}. "
                                   f"graph: {describe('graph')}.")
    s.add_argument("--reference", required=True, metavar="MODEL[@DEVICE|@threads=N]")
    s.add_argument("--candidate", required=True, metavar="MODEL[@DEVICE|@threads=N]")
    s.add_argument("--text", default=None, metavar="FILE", help="text to evaluate language models on")
    s.add_argument("--ctx", type=int, default=None, help="tokens per window (default 512)")
    s.add_argument("--chunks", type=int, default=None, help="evaluate at most N windows")
    s.add_argument("--threads", type=int, default=None, help="threads for both sides")
    s.add_argument("--reference-threads", type=int, default=None)
    s.add_argument("--candidate-threads", type=int, default=None)
    s.add_argument("--inputs", default=None, metavar="DIR", help="graph inputs: .npz per sample (or .npy)")
    s.add_argument("--random", type=int, default=None, metavar="N", help="N random inputs from the input specs")
    s.add_argument("--seed", type=int, default=None, help="seed of the --random inputs (default 0)")
    s.add_argument("--runs", type=int, default=None, help="timed runs per side (graph models, default 20)")
    s.add_argument("--no-intermediates", action="store_true", help="compare graph outputs only")
    s.add_argument("--thresholds", default=None, metavar="FILE.toml", help="thresholds ([llm] / [graph] tables)")
    s.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help="override one threshold (repeatable; VALUE 'off' disables it)")
    s.add_argument("--gate", action="store_true", help="exit 1 when any threshold is crossed (errors exit 2)")
    s.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="draw drift per layer and quality/cost (matplotlib)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval, error_status=2)  # 1 is a failed gate

    s = sub.add_parser("quantize", help="produce a candidate: GGUF -> q8_0/q4_0/q4_1, ONNX -> int8/int4",
                       description="edgert quantize INPUT [OUTPUT] [TYPE]. GGUF: q8_0, q4_0, q4_1 (edgert's "
                                   "quantizers; metadata and tokenizer kept). ONNX: int8-dynamic, int8-static "
                                   "(--calibration DIR), int4 (MatMulNBits).")
    s.add_argument("input")
    s.add_argument("args", nargs="*", metavar="OUTPUT TYPE")
    s.add_argument("--to", "--type", dest="to", default=None, metavar="TYPE")
    s.add_argument("-o", "--output", default=None)
    s.add_argument("--calibration", default=None, metavar="DIR", help="samples for int8-static (.npz/.npy)")
    s.add_argument("--keep-embeddings", action="store_true", help="GGUF: keep token_embd in its stored format")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_quantize)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # the command's own warning lines, in its spelling
    try:
        status = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, where it is handled, not as a warning at exit
        return status
    except EdgertError as exc:
        print(f"edgert: error: {cli_spelling(str(exc))}", file=sys.stderr)
        return getattr(args, "error_status", 1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`edgert plan m.onnx | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141  # 128 + SIGPIPE
    except Exception as exc:  # a bug: the traceback is for its report; the status keeps eval's meaning (1: gate)
        if getattr(args, "error_status", 1) == 1:
            raise
        import traceback

        traceback.print_exc()
        print(f"edgert: error: internal error ({type(exc).__name__}: {exc}); please report it with the traceback "
              "above", file=sys.stderr)
        return args.error_status
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
