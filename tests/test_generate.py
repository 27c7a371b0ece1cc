"""The generation loop and its text layer: stop strings, finish reasons, cache reuse, context limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import byte_level_tokenizer, tiny_model
from localgpt.errors import PromptError
from localgpt.generate import find_stop, generate_tokens, responses, stream_generate
from localgpt.sampling import SamplingOptions
from localgpt.weights import load_model

TOKENIZER = byte_level_tokenizer()
GREEDY = SamplingOptions(temperature=0)


class FakeTokenizer:
    eos_token_ids = frozenset({2})

    def decode(self, ids, skip_special_tokens=True):
        return TOKENIZER.decode(ids, skip_special_tokens=skip_special_tokens)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab ,\n😀", max_size=30), stops=st.lists(st.text(alphabet="ab ,😀", min_size=1,
                                                                              max_size=4), max_size=3))
def test_stop_strings_cut_exactly_and_stream_only_final_text(text, stops):
    ids = TOKENIZER.encode(text).ids
    full = TOKENIZER.decode(ids)
    # The stop that a reader of the text would see complete first: earliest end, then earliest start.
    matches = sorted((i + len(s), i) for s in stops if (i := full.find(s)) >= 0)
    cut = matches[0][1] if matches else -1
    expected = full if cut < 0 else full[:cut]
    records = list(responses(iter(ids), FakeTokenizer(), prompt_tokens=3, stop=stops))
    assert "".join(r.text for r in records) == expected
    assert records[-1].finish_reason == ("length" if cut < 0 else "stop-sequence")
    assert all(r.finish_reason is None for r in records[:-1])


def test_find_stop_holds_back_a_possible_start():
    assert find_stop("hello wor", ["world"]) == (-1, 3)
    assert find_stop("hello world", ["world"]) == (6, 0)
    assert find_stop("abc", ["x"]) == (-1, 0)


def test_eos_finishes_with_stop_and_is_not_printed():
    ids = TOKENIZER.encode("Hello").ids + [2] + TOKENIZER.encode(" never").ids
    records = list(responses(iter(ids), FakeTokenizer(), prompt_tokens=1))
    assert "".join(r.text for r in records) == "Hello"
    assert records[-1].finish_reason == "stop"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(folder, "llama", tokenizer=True, eos_token_id=None)
    return load_model(folder, dtype="float32", device="cpu")


def test_max_tokens_and_length_finish(tiny):
    prompt = tiny.tokenizer.encode("Hello")
    records = list(stream_generate(tiny.model, tiny.tokenizer, prompt, GREEDY, max_tokens=7))
    assert records[-1].generation_tokens == 7
    assert records[-1].finish_reason == "length"
    assert records[-1].prompt_tokens == len(prompt)


def test_generation_stops_at_the_context_end(tiny):
    context = tiny.config.context_length
    prompt = [5] * (context - 3)
    assert len(list(generate_tokens(tiny.model, prompt, GREEDY, max_tokens=50))) == 3
    with pytest.raises(PromptError, match=f"context is {context}"):
        list(generate_tokens(tiny.model, [5] * context, GREEDY, max_tokens=5))
    with pytest.raises(PromptError, match="empty"):
        list(generate_tokens(tiny.model, [], GREEDY, max_tokens=5))


def test_reused_cache_gives_the_same_tokens(tiny):
    """A chat keeps the cache of the conversation so far: only the new tokens are prefilled."""
    first = tiny.tokenizer.encode("Hello there")
    answer = list(generate_tokens(tiny.model, first, GREEDY, 5))
    follow_up = first + answer + tiny.tokenizer.encode(" and more")
    cache = tiny.model.make_cache(1, 8)
    list(generate_tokens(tiny.model, first, GREEDY, 5, cache=cache))
    reused = list(generate_tokens(tiny.model, follow_up, GREEDY, 6, cache=cache))
    fresh = list(generate_tokens(tiny.model, follow_up, GREEDY, 6))
    assert reused == fresh


def test_seed_makes_sampling_repeatable(tiny):
    """The same seed gives the same tokens; other seeds give other ones, and not greedy's (so it samples)."""
    prompt = tiny.tokenizer.encode("Once")

    def sampled(seed: int) -> list[int]:
        options = SamplingOptions(temperature=1.0, top_p=0.95, seed=seed)
        return list(generate_tokens(tiny.model, prompt, options, 12))

    assert sampled(1234) == sampled(1234)
    others = {tuple(sampled(seed)) for seed in range(5)}
    assert len(others) > 1 and tuple(generate_tokens(tiny.model, prompt, GREEDY, 12)) not in others


def test_long_prompt_prefills_in_chunks(tiny, monkeypatch):
    import localgpt.generate as generate_module

    prompt = tiny.tokenizer.encode("word " * 60)
    expected = list(generate_tokens(tiny.model, prompt, GREEDY, 4))
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 7)
    calls = []
    original = tiny.model.forward
    monkeypatch.setattr(tiny.model, "forward", lambda ids, cache, *a, **k: calls.append(ids.shape[1]) or
                        original(ids, cache, *a, **k))
    chunked = list(generate_module.generate_tokens(tiny.model, prompt, GREEDY, 4))
    assert chunked == expected
    assert max(calls) <= 7
