"""End-to-end on the real SmolLM2-135M-Instruct (Q4_1 GGUF), pulled once into the model cache."""
import re

import pytest

from edgert.llm import LLM

pytestmark = pytest.mark.model

# questions whose greedy answer holds the fact on every kernel variant (ref, avx2, avx512): a 135M model at 4 bits
# answers some questions (a spider's legs, France's capital) right or wrong depending on last-bit rounding
FACTS = [
    ("What is the capital of Japan?", "tokyo"),
    ("What is 2 + 2?", "4"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("How many days are in a week?", "7"),
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with LLM(str(smollm2_path), n_ctx=512) as llm:
        yield llm


@pytest.mark.parametrize("question,word", FACTS)
def test_greedy_answers_contain_the_fact(smol, question, word):
    res = smol.chat([{"role": "user", "content": question}], temperature=0, max_tokens=48)
    assert re.search(rf"\b{word}\b", res.text.lower()), res.text  # a whole word: "4" must not match "14" or "40"


def test_chat_template_two_turns_is_chatml(smol):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ]
    text = smol.detokenize(smol.chat_tokens(messages))
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # the template supplies SmolLM's default system prompt when none is given
    default = smol.detokenize(smol.chat_tokens([{"role": "user", "content": "Hi"}]))
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_answer_ends_at_end_of_turn(smol):
    # a question whose greedy answer leads its runner-up by a logit or more at every step on every variant ("The
    # capital of Japan is Tokyo.", 7 tokens); "What is 2 + 2?" forks at its third token (" is" / " to", 0.02-0.3
    # apart with the rounding of the attention's exp and sums) into an answer longer than 64 tokens
    res = smol.chat([{"role": "user", "content": "What is the capital of Japan?"}], temperature=0, max_tokens=64)
    assert res.finish_reason == "stop"
    assert "<|im_end|>" not in res.text


def test_seeded_sampling_is_reproducible(smol):
    a = smol.generate("Once upon a time", max_tokens=24, seed=42)
    b = smol.generate("Once upon a time", max_tokens=24, seed=42)
    assert a.tokens == b.tokens and a.text == b.text
