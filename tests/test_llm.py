"""The LLM facade on a tiny random model: greedy/seeded generation, stop handling, streaming, chat templating,
KV-prefix reuse across turns, teacher-forced logits, and argument errors."""
import numpy as np
import pytest

import edgert
from edgert.llm import LLM, ContextLengthError
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
