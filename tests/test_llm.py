"""The LLM facade on a tiny random model: greedy/seeded generation, stop handling, streaming, chat templating,
KV-prefix reuse across turns, teacher-forced logits, and argument errors."""
import textwrap
import threading
import time

import numpy as np
import pytest

import edgert
from edgert.llm import LLM, ContextLengthError
from edgert.llm.llm import STOPPABLE_PREFILL_CHUNK, _drain
from cli_run import run_python
from llama_tiny import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny.gguf"
    write_tiny_llama(path, fmt="q4_1", ctx=256)
    return path


@pytest.fixture()
def llm(tiny_path):
    with LLM(str(tiny_path), n_ctx=128) as model:
        yield model


def test_greedy_follows_teacher_forced_argmax(llm):
    res = llm.generate("the hat", max_tokens=12, temperature=0)
    prompt = llm.tokenize("the hat")
    assert res.tokens and len(res.tokens) <= 12
    seq = prompt + res.tokens
    logits = llm.logits(seq)
    # every generated token is the argmax of the logits at the position before it
    for i, tok in enumerate(res.tokens):
        row = logits[len(prompt) - 1 + i]
        assert row[tok] >= row.max() - 1e-3 * abs(row.max())


def test_greedy_is_deterministic_and_seed_reproducible(llm):
    a = llm.generate("the", max_tokens=10, temperature=0)
    b = llm.generate("the", max_tokens=10, temperature=0)
    assert a.tokens == b.tokens
    s1 = llm.generate("the", max_tokens=16, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    s2 = llm.generate("the", max_tokens=16, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    s3 = llm.generate("the", max_tokens=16, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=12)
    assert s1.tokens == s2.tokens
    assert s1.tokens != s3.tokens


def test_max_tokens_gives_length(llm):
    res = llm.generate("the", max_tokens=5, temperature=1.0, seed=0, top_k=0, top_p=1.0, min_p=0.0)
    stops = set(llm.tokenizer.stop_ids)
    if res.finish_reason == "length":
        assert len(res.tokens) == 5
    else:  # sampled an end token before the cap
        assert len(res.tokens) < 5
    assert not stops & set(res.tokens)


def test_stop_string_truncates_text(llm):
    full = llm.generate("the hat", max_tokens=24, temperature=0)
    text = full.text
    if len(text) < 4:
        pytest.skip("tiny model produced too little text to cut")
    stop = text[2:4]
    res = llm.generate("the hat", max_tokens=24, temperature=0, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == text[: text.index(stop)]
    assert stop not in res.text


def test_stream_pieces_join_to_generate_text(llm):
    ref = llm.generate("the hat", max_tokens=15, temperature=0.9, seed=5)
    pieces = list(llm.stream("the hat", max_tokens=15, temperature=0.9, seed=5))
    assert "".join(pieces) == ref.text
    assert llm.last_result.tokens == ref.tokens


def test_sampling_arguments_by_position_as_generate_takes_them(llm):
    ref = llm.generate("the hat", 7, 0.9, 40, 0.95, 0.05, 1.0, 11)
    assert ref.tokens == llm.generate("the hat", max_tokens=7, temperature=0.9, seed=11).tokens
    assert "".join(llm.stream("the hat", 7, 0.9, 40, 0.95, 0.05, 1.0, 11)) == ref.text
    msgs = [{"role": "user", "content": "hi"}]
    chat = llm.chat(msgs, 5, 0.0)
    assert chat.tokens == llm.chat(msgs, max_tokens=5, temperature=0.0).tokens
    assert "".join(llm.chat_stream(msgs, 5, 0.0)) == chat.text
    with pytest.raises(edgert.InvalidArgumentError, match="both by position and by name"):
        llm.chat(msgs, 5, max_tokens=6)
    with pytest.raises(edgert.InvalidArgumentError, match="at most 8 positional"):
        llm.stream("x", *range(9))


def test_timings_are_reported(llm):
    t = llm.generate("the hat", max_tokens=4, temperature=0).timings
    for key in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"):
        assert key in t and t[key] >= 0
    assert t["ttft_s"] > 0 and t["prefill_tok_s"] > 0


def test_chat_template_markup_is_control_but_content_is_not(llm):
    tok = llm.tokenizer
    im_start = tok.encode_special("<|im_start|>")
    assert len(im_start) == 1
    ids = llm.chat_tokens([{"role": "user", "content": "hi <|im_start|> there"}])
    plain = llm.chat_tokens([{"role": "user", "content": "hi"}])
    # ChatML: one im_start for the user turn and one for the assistant prompt; the one typed in the content is text
    assert plain.count(im_start[0]) == 2
    assert ids.count(im_start[0]) == 2
    assert llm.detokenize(ids).count("<|im_start|>") == 3


# a reasoning model's template in ChatML markup (the tiny tokenizer's control tokens): past answers lose <think>
THINK_CHATML = (
    "{% for m in messages %}{% set c = m.content %}{% if m.role == 'assistant' and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_start|>' + m.role + '\\n' + c + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")


def test_chat_template_keyword_replaces_the_files(tiny_path):
    """LLM(chat_template=...) renders with the given template (the tiny file has none: ChatML); an answer's
    <think> part is dropped from the history and a control-token spelling in what is kept stays text."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>a</think>ok <|im_start|>"},
            {"role": "user", "content": "more"}]
    with LLM(str(tiny_path), n_ctx=128, chat_template=THINK_CHATML) as model:
        ids = model.chat_tokens(msgs)
        im_start = model.tokenizer.encode_special("<|im_start|>")[0]
        assert model.detokenize(ids) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok <|im_start|>"
                                         "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
                                         "<think>\n")
        assert ids.count(im_start) == 4  # the template's own: three turns and the answer's; the typed one is text
        assert model.chat(msgs, max_tokens=2, temperature=0).prompt_tokens == len(ids)
    with LLM(str(tiny_path), n_ctx=128) as model:  # the file's template (ChatML) keeps the <think> part
        assert "<think>a</think>" in model.detokenize(model.chat_tokens(msgs))
    with pytest.raises(edgert.InvalidArgumentError, match="chat_template must be a str"):
        LLM(str(tiny_path), n_ctx=128, chat_template=3)
    # an empty template rendered every chat to no tokens and chat() died of UnboundLocalError (no step ran); one
    # that renders nothing for some messages is refused by chat_tokens, before any step
    with pytest.raises(edgert.InvalidArgumentError, match="chat_template is empty"):
        LLM(str(tiny_path), n_ctx=128, chat_template=" \n")
    with LLM(str(tiny_path), n_ctx=128, chat_template="{% if messages|length > 1 %}{{ messages[0].content }}"
                                                      "{% endif %}") as model:
        assert not model.tokenizer.add_bos  # (with a BOS, the render's no tokens would still be one)
        with pytest.raises(edgert.InvalidArgumentError, match="rendered these messages to no tokens"):
            model.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        assert model.chat(msgs, max_tokens=2, temperature=0).prompt_tokens > 0


def test_chat_second_turn_reuses_cache_and_matches_fresh_model(tiny_path, llm):
    turn1 = [{"role": "user", "content": "the hat"}]
    r1 = llm.chat(turn1, max_tokens=6, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "he t"}]
    r2 = llm.chat(turn2, max_tokens=6, temperature=0)
    assert r2.timings["prefill_tokens"] < r2.prompt_tokens  # only the new part was prefilled
    with LLM(str(tiny_path), n_ctx=128) as fresh:
        r2_fresh = fresh.chat(turn2, max_tokens=6, temperature=0)
    assert r2.tokens == r2_fresh.tokens


def test_logits_match_model_forward(llm):
    ids = llm.tokenize("the hat he")
    out = llm.logits(ids)
    assert out.shape == (len(ids), llm.model.vocab_size) and out.dtype == np.float32
    np.testing.assert_allclose(out[-1], llm.model.forward(ids, 0), rtol=1e-2, atol=1e-2)


def test_prompt_longer_than_context_is_refused(tiny_path):
    with LLM(str(tiny_path), n_ctx=16) as small:
        with pytest.raises(ContextLengthError, match="n_ctx"):
            small.generate("the " * 20, max_tokens=4)
        res = small.generate("the", max_tokens=100, temperature=1.0, seed=1, top_k=0, top_p=1.0, min_p=0.0)
        assert len(res.tokens) <= 16


def test_prompt_and_completion_never_exceed_n_ctx(tiny_path):
    """The loop stopped once the cache was full, but the token sampled from its last position came on top: a
    generation that filled the context had n_ctx + 1 tokens in all (the server's usage.total_tokens showed it)."""
    filled = 0
    with LLM(str(tiny_path), n_ctx=16) as small:
        for n_prompt in range(1, 16):
            for seed in range(3):
                res = small.generate("x" * n_prompt, max_tokens=100, temperature=1.0, seed=seed, top_k=0, top_p=1.0,
                                     min_p=0.0)
                assert res.prompt_tokens + len(res.tokens) <= small.n_ctx, (n_prompt, seed)
                filled += res.prompt_tokens + len(res.tokens) == small.n_ctx
    assert filled  # some runs reached the end of the context, so the bound was tested


def test_chat_bounds_messages_before_rendering_them(llm):
    """Content with a private-use code point in every block of n messages made chat_tokens raise ValueError
    (chat_template's sentinel search ran past U+10FFFF); n_ctx or more messages cannot fit (each renders to a token
    at least) and are refused before the template renders them (100,000 took seconds)."""
    n = 100
    marks = "".join(chr(c) for c in range(0xF0000, 0x110000, n))
    ids = llm.chat_tokens([{"role": "user", "content": marks}] + [{"role": "user", "content": "hi"}] * (n - 1))
    assert len(ids) > n
    with pytest.raises(ContextLengthError, match="6253 tokens"):  # too long for n_ctx: no ValueError
        llm.chat([{"role": "user", "content": marks}] + [{"role": "user", "content": "hi"}] * (n - 1))
    with pytest.raises(ContextLengthError, match=f"{llm.n_ctx} messages cannot fit n_ctx={llm.n_ctx}"):
        llm.chat_tokens([{"role": "user", "content": ""}] * llm.n_ctx)
    llm.chat_tokens([{"role": "user", "content": ""}] * (llm.n_ctx // 16))


def test_n_ctx_is_capped_at_model_context(tiny_path):
    with pytest.warns(UserWarning, match="context length"):
        big = LLM(str(tiny_path), n_ctx=100000)
    assert big.n_ctx == 256
    big.close()


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1.0}, {"top_p": 1.5}, {"max_tokens": 0}, {"stop": 3}, {"bogus": 1},
])
def test_bad_sampling_arguments(llm, kwargs):
    with pytest.raises(edgert.InvalidArgumentError):
        llm.chat([{"role": "user", "content": "hi"}], **kwargs)


def test_bad_messages(llm):
    with pytest.raises(edgert.InvalidArgumentError):
        llm.chat([{"role": "user"}])
    for call in (llm.chat, llm.chat_stream):  # [] answered the template's default system prompt
        with pytest.raises(edgert.InvalidArgumentError, match="messages is empty"):
            call([])
    with pytest.raises(edgert.InvalidArgumentError, match="add_special must be True or False"):
        llm.tokenize("hi", add_special="yes")
    for call in (lambda: llm.generate("the", temprature=0), lambda: llm.chat([{"role": "user", "content": "x"}],
                                                                             temprature=0)):
        with pytest.raises(edgert.InvalidArgumentError, match="unknown argument\\(s\\) \\['temprature'\\]"):
            call()  # generate raised TypeError
    with pytest.raises(edgert.InvalidArgumentError):
        llm.generate(123)
    with pytest.raises(edgert.InvalidArgumentError):
        llm.generate("")


def test_unknown_model_name_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path))
    with pytest.raises(edgert.EdgertError, match="smollm2-135m"):
        LLM("no-such-model")


def test_should_stop_ends_with_a_complete_result(llm):
    calls = []

    def stop_after_three():
        calls.append(1)
        return "cancelled" if len(calls) >= 3 else None

    it = llm._iterate(llm.tokenize("the hat"), max_tokens=50, temperature=0, record=False,
                      should_stop=stop_after_three)
    pieces = []
    while True:
        try:
            pieces.append(next(it))
        except StopIteration as done:
            res = done.value
            break
    assert res.finish_reason == "cancelled"
    assert len(res.tokens) == 3 and res.text == "".join(pieces)
    assert res.timings["ttft_s"] > 0


# ---------------------------------------------------------------- bad input: edgert errors, never crashes

@pytest.mark.parametrize("threads", [0, -1, 257, 2**40, 1.5, True, "2"])
def test_bad_threads_are_refused_at_construction(tiny_path, threads):
    """threads: None or an int in [1, 256] (the C pool's limit); 2**40 used to pass and overflow in generate()."""
    with pytest.raises(edgert.InvalidArgumentError, match=r"threads must be an int in \[1, 256\]"):
        LLM(str(tiny_path), n_ctx=32, threads=threads)


def test_threads_in_range_are_kept(tiny_path):
    with LLM(str(tiny_path), n_ctx=32, threads=2) as m:
        assert m.threads == 2 and m.generate("the", max_tokens=2, temperature=0).tokens


@pytest.mark.parametrize("call", [
    lambda m: m.generate("a\ud800b", max_tokens=2),
    lambda m: m.tokenize("\udfff"),
    lambda m: m.chat([{"role": "user", "content": "hi \ud800"}], max_tokens=2),
    lambda m: list(m.stream("\ud800", max_tokens=2)),
], ids=["generate", "tokenize", "chat", "stream"])
def test_lone_surrogates_are_refused(llm, call):
    with pytest.raises(edgert.InvalidArgumentError, match="lone surrogate code point"):
        call(llm)


@pytest.mark.parametrize("call, match", [
    (lambda m: m.logits([2**40]), r"ids\[0\] = 1099511627776 is outside the vocabulary \[0, 261\)"),
    (lambda m: m.logits([1, -1]), r"ids\[1\] = -1 is outside the vocabulary"),
    (lambda m: m.logits(["a"]), r"ids\[0\] must be an int token id, got 'a'"),
    (lambda m: m.logits([1.5]), r"ids\[0\] must be an int token id, got 1.5"),
    (lambda m: m.logits([True]), r"ids\[0\] must be an int token id"),
    (lambda m: m.logits(None), "ids must be a list of token ids"),
    (lambda m: m.logits("the"), "ids must be a list of token ids"),
    (lambda m: m.logits(np.zeros(3, np.float32)), "1-D integer array"),
    (lambda m: m.logits(np.zeros((1, 2), np.int32)), "1-D integer array"),
    (lambda m: m.logits([]), "at least one token id"),
    (lambda m: m.detokenize(None), "ids must be a list of token ids"),
    (lambda m: m.detokenize("the"), "ids must be a list of token ids"),
    (lambda m: m.detokenize([1.5]), "token id must be an int, got 1.5"),
    (lambda m: m.detokenize([2**40]), "outside the vocabulary"),
    (lambda m: m.tokenize(None), "text must be a str, got NoneType"),
    (lambda m: m.tokenize(0), "text must be a str, got int"),
    (lambda m: m.tokenize(b""), "text must be a str, got bytes"),
])
def test_bad_token_ids_and_text(llm, call, match):
    with pytest.raises(edgert.InvalidArgumentError, match=match):
        call(llm)


def test_good_token_ids_in_any_integer_form(llm):
    ids = llm.tokenize("the hat")
    want = llm.logits(ids)
    np.testing.assert_array_equal(llm.logits(np.array(ids, np.int64)), want)
    np.testing.assert_array_equal(llm.logits(tuple(np.int32(i) for i in ids)), want)
    assert llm.detokenize(np.array(ids)) == llm.detokenize(ids) == "the hat"


@pytest.mark.parametrize("call", [
    lambda m: m.generate("the", max_tokens=2),
    lambda m: list(m.stream("the", max_tokens=2)),
    lambda m: m.chat([{"role": "user", "content": "hi"}], max_tokens=2),
    lambda m: m.logits([1, 2]),
    lambda m: m.model.forward([1], 0),
    lambda m: m.model.state_bytes,
], ids=["generate", "stream", "chat", "logits", "forward", "state_bytes"])
def test_calls_after_close_say_the_model_is_closed(tiny_path, call):
    m = LLM(str(tiny_path), n_ctx=32)
    m.close()
    with pytest.raises(edgert.InvalidArgumentError, match="the model is closed") as e:
        call(m)
    assert "while this generation ran" not in str(e.value)  # it started after close()
    m.close()  # closing twice is fine


@pytest.mark.parametrize("template", ["", "  \n"])
def test_empty_chat_template_falls_back_to_chatml(tmp_path, template):
    """An empty tokenizer.chat_template is a missing one (ChatML), as template_from_metadata says; LLM used to take
    it as is and render nothing ("forward needs at least one token")."""
    from edgert.llm.chat_template import CHATML_TEMPLATE

    path = tmp_path / "m.gguf"
    write_tiny_llama(path, ctx=64, extra=lambda w: w.add_chat_template(template))
    with LLM(str(path), n_ctx=64) as m:
        assert m.template == CHATML_TEMPLATE
        assert m.detokenize(m.chat_tokens([{"role": "user", "content": "hi"}])) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        assert m.chat([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0).tokens


def test_chat_template_that_is_not_a_string_is_a_format_error(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_llama(path, ctx=64, extra=lambda w: w.add_uint32("tokenizer.chat_template", 7))
    with pytest.raises(edgert.ModelFormatError, match="GGUF tokenizer.chat_template must be a string, found int"):
        LLM(str(path), n_ctx=64)


def test_a_stream_interrupted_by_another_call_on_the_same_llm_raises(llm):
    """All calls share one KV cache: a second stream (or logits, or reset) taken while a stream was open made the
    first go on from the other call's cache, silently giving other text. It now stops with an error; a stream run
    to its end alone still equals generate."""
    solo = llm.generate("the cat", max_tokens=12, temperature=0).text
    for interrupt in (lambda: next(llm.stream("a dog", max_tokens=12, temperature=0)),
                      lambda: llm.logits([1, 2, 3]), llm.reset,
                      lambda: llm.generate("a dog", max_tokens=3, temperature=0)):
        s1 = llm.stream("the cat", max_tokens=12, temperature=0)
        next(s1)
        interrupt()
        with pytest.raises(edgert.InvalidArgumentError, match="this generation was interrupted"):
            list(s1)
    assert "".join(llm.stream("the cat", max_tokens=12, temperature=0)) == solo


def test_generations_from_several_threads_take_turns(llm):
    """Four threads generating on one LLM corrupted its cache ('activations became NaN or Inf (the weights may be
    corrupt)') or gave wrong text: generate and chat now hold the LLM for their whole run."""
    import threading

    prompts = ["the cat", "a dog", "the sun", "one two"]
    solo = {p: llm.generate(p, max_tokens=16, temperature=0).text for p in prompts}
    got, errors = {}, []

    def worker(p):
        try:
            for _ in range(3):
                got.setdefault(p, []).append(llm.generate(p, max_tokens=16, temperature=0).text)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(got[p] == [solo[p]] * 3 for p in prompts), (errors, got, solo)


_CLOSE_DURING_PREFILL = textwrap.dedent("""
    import sys, threading, time
    import edgert
    llm = edgert.LLM(sys.argv[1], n_ctx=2048)
    entered, real, out = threading.Event(), llm.model.forward, {}

    def forward(*args, **kwargs):
        entered.set()
        return real(*args, **kwargs)

    def run():
        try:
            out["finish"] = llm.generate("a " * 900, max_tokens=50, temperature=0).finish_reason
        except edgert.EdgertError as exc:
            out["error"] = str(exc)

    llm.model.forward = forward
    t = threading.Thread(target=run)
    t.start()
    entered.wait()
    time.sleep(0.02)  # well inside the C prefill of 1800 tokens (about 150 ms here)
    llm.close()
    t.join()
    print(out)
""")


def test_close_from_another_thread_during_a_prefill_does_not_crash(tmp_path):
    """close() freed the C model and unmapped the file while et_llama_forward ran on another thread (the GIL
    released): a segfault. It now waits for the step in flight; run in a child so a regression fails one test."""
    path = tmp_path / "wide.gguf"
    write_tiny_llama(path, dim=256, hidden=768, n_layers=4, ctx=2048)
    proc = run_python("-c", _CLOSE_DURING_PREFILL, str(path), timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "the model is closed" in proc.stdout and "LLM.close() was called" in proc.stdout, proc.stdout


def _generate_in_thread(llm, max_tokens: int):
    """A greedy generate on a new thread: (the started thread, the list its edgert error lands in)."""
    errors = []

    def run():
        try:
            llm.generate("the hat", max_tokens=max_tokens, temperature=0)
        except edgert.EdgertError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def test_close_from_another_thread_waits_for_the_step_in_flight(tiny_path):
    """close() during a generate on another thread: the step in flight finishes on a live model, the generation
    ends with the closed error at its next step (close waits for one step, not for the whole run)."""
    llm = LLM(str(tiny_path), n_ctx=128)
    real, calls, entered = llm.model.forward, [], threading.Event()

    def slow_forward(*args, **kwargs):
        calls.append("started")
        if len(calls) == 2:  # the first decode step: close() is called while it runs
            entered.set()
            time.sleep(0.3)
        out = real(*args, **kwargs)
        calls[-1] = "done"
        return out

    llm.model.forward = slow_forward
    t, errors = _generate_in_thread(llm, 50)
    assert entered.wait(10)
    llm.close()
    assert calls == ["done", "done"]  # close() returned after the step in flight, and no step ran after it
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], edgert.InvalidArgumentError)
    assert "the model is closed" in str(errors[0]) and "LLM.close() was called" in str(errors[0])
    with pytest.raises(edgert.InvalidArgumentError, match="the model is closed"):
        llm.generate("the", max_tokens=2)


def test_close_with_a_timeout_gives_up_on_a_step_that_outlasts_it(tiny_path):
    """edgert serve closes the model on Ctrl+C with its shutdown timeout: a prefill step longer than that made the
    process wait for the whole step. close(timeout) returns False then, the model left mapped, and the generation
    still ends with the closed error at its next step."""
    llm = LLM(str(tiny_path), n_ctx=128)
    real, entered, release = llm.model.forward, threading.Event(), threading.Event()

    def stuck_forward(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    llm.model.forward = stuck_forward
    t, errors = _generate_in_thread(llm, 5)
    assert entered.wait(10)
    t0 = time.perf_counter()
    assert llm.close(timeout=0.05) is False and time.perf_counter() - t0 < 1.0
    release.set()
    t.join(10)
    assert len(errors) == 1 and "LLM.close() was called while this generation ran" in str(errors[0])
    assert llm.close() is True  # nothing in flight now: freed


def test_close_inside_a_stream_loop_ends_the_stream_with_an_error(tiny_path):
    """close() from the stream's own loop: no deadlock (the lock is re-entrant and not held between pieces), and
    the next step raises instead of running on the freed model."""
    llm = LLM(str(tiny_path), n_ctx=128)
    stream = llm.stream("the hat", max_tokens=50, temperature=0)
    next(stream)
    llm.close()
    with pytest.raises(edgert.InvalidArgumentError, match=r"the model is closed .*LLM.close\(\) was called"):
        next(stream)


def _prefill_logits_and_tokens(llm, ids, should_stop=None, **sampling):
    """The logits the prefill's last forward call returned, the prefill's forward calls (tokens, position), and the
    generated tokens."""
    real, calls = llm.model.forward, []

    def forward(tokens, pos, **kwargs):
        out = real(tokens, pos, **kwargs)
        calls.append((len(tokens), pos, out.copy()))
        return out

    llm.model.forward = forward
    try:
        res = _drain(llm._iterate(list(ids), record=False, should_stop=should_stop, **sampling))
    finally:
        del llm.model.forward
    prefill = [c for c in calls if c[1] < len(ids)]  # decode steps run at positions past the prompt
    return prefill[-1][2], [(n, pos) for n, pos, _ in prefill], res.tokens


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=0, min_p=0.0, seed=3)],
                         ids=["greedy", "sampled"])
def test_a_prefill_split_into_chunks_equals_one_pass_bit_for_bit(tiny_path, sampling):
    """The prompt is prefilled in chunks (n_batch, or STOPPABLE_PREFILL_CHUNK when should_stop is given) so a stop
    or close() is seen between them; the logits and the tokens are exactly those of one pass."""
    with LLM(str(tiny_path), n_ctx=128, n_batch=128) as one:
        ids = one.tokenize("the hat sat on the mat, " * 6, add_special=True)[:100]
        want_logits, want_calls, want_tokens = _prefill_logits_and_tokens(one, ids, max_tokens=20, **sampling)
        assert want_calls == [(100, 0)]
        one.reset()
        got = _prefill_logits_and_tokens(one, ids, should_stop=lambda: None, max_tokens=20, **sampling)
        assert got[1] == [(STOPPABLE_PREFILL_CHUNK, 0), (100 - STOPPABLE_PREFILL_CHUNK, STOPPABLE_PREFILL_CHUNK)]
        np.testing.assert_array_equal(got[0], want_logits)
        assert got[2] == want_tokens
    with LLM(str(tiny_path), n_ctx=128, n_batch=7) as split:
        got = _prefill_logits_and_tokens(split, ids, max_tokens=20, **sampling)
        assert got[1] == [(min(7, 100 - p), p) for p in range(0, 100, 7)]
        np.testing.assert_array_equal(got[0], want_logits)
        assert got[2] == want_tokens


def test_should_stop_ends_a_long_prefill_between_chunks(tiny_path):
    """should_stop was first asked after the first sampled token, so a timeout or a client gone waited for the whole
    prompt's prefill (3.8 s on a 2000-word prompt with --timeout 1). It is asked between prefill chunks now; the
    result has no tokens, and the cache keeps the chunks that ran (a later call reuses them)."""
    with LLM(str(tiny_path), n_ctx=128, n_batch=8) as m:
        ids = m.tokenize("the hat sat on the mat, " * 6, add_special=True)[:100]
        asked = []

        def timeout_on_second_ask():
            asked.append(len(m._kv))
            return "timeout" if len(asked) == 2 else None

        res = _drain(m._iterate(ids, max_tokens=20, temperature=0, record=False,
                                should_stop=timeout_on_second_ask))
        assert asked == [8, 16]
        assert res.finish_reason == "timeout" and res.tokens == [] and res.text == ""
        assert res.prompt_tokens == 100 and res.timings["prefill_tokens"] == 16
        assert m._kv == ids[:16]
        again = m.generate(m.detokenize(ids), max_tokens=3, temperature=0)
        assert again.timings["prefill_tokens"] == 100 - 16
