"""Prompt building (localgpt/prompt.py): the chat template stays whole when a long prompt is truncated."""

from __future__ import annotations

import pytest

from helpers import write_tokenizer
from localgpt.errors import PromptError
from localgpt.prompt import encode_prompt
from localgpt.tokenizer import Tokenizer

CONTEXT = 256


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)  # ChatML, as SmolLM2 and Qwen use it
    return Tokenizer(folder)


def test_short_prompts_are_the_template_around_the_text(tokenizer):
    ids = encode_prompt(tokenizer, "Hello", CONTEXT, system="Be brief.")
    assert ids == tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello"}])
    assert encode_prompt(tokenizer, "Hello", CONTEXT, raw=True) == tokenizer.encode("Hello")


def test_truncation_cuts_the_message_not_the_template(tokenizer):
    """With a system prompt, the kept ids still open with the system message and the user header and end with
    the generation prompt: the text of the message is what loses its beginning. (Cutting the templated ids, as
    localgpt once did, left the model a headless fragment.)"""
    text = " ".join(f"word{i}" for i in range(600)) + " the very end"
    notices = []
    ids = encode_prompt(tokenizer, text, CONTEXT, system="Be brief.", truncate=True, notify=notices.append)
    rendered = tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert rendered.endswith("the very end<|im_end|>\n<|im_start|>assistant\n")
    assert "word0 " not in rendered  # the beginning of the message is what went
    assert CONTEXT // 2 - 8 <= len(ids) <= CONTEXT // 2  # half the context, leaving the rest to answer
    assert len(notices) == 1 and "kept the end of the message" in notices[0]


def test_raw_truncation_keeps_the_last_tokens(tokenizer):
    text = "word " * 400
    ids = encode_prompt(tokenizer, text, CONTEXT, raw=True, truncate=True)
    assert ids == tokenizer.encode(text)[-CONTEXT // 2 :]


def test_too_long_without_truncate_names_both_lengths(tokenizer):
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens but the model's context is 256 tokens"):
        encode_prompt(tokenizer, "word " * 400, CONTEXT, system="Be brief.")


def test_a_system_prompt_that_alone_fills_the_budget_is_refused(tokenizer):
    with pytest.raises(PromptError, match="shorten the system prompt"):
        encode_prompt(tokenizer, "word " * 400, CONTEXT, system="rule " * 300, truncate=True)
