"""Tokenizer wrapper, chat templates in the sandbox, and the streaming decoder's round trip."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import byte_level_tokenizer, sentencepiece_tokenizer, write_tokenizer
from localgpt.errors import TokenizerError
from localgpt.tokenizer import StreamDecoder, Tokenizer

HARD_TEXTS = ["a ,b", "東京は日本の首都です。", "emoji 😀🎉👍🏽!", "def f(x):\n    return x  # ok\n", "\n\n",
              "  spaced  ",
              "ümlaut ñ", "a\tb", "中文😀mixed ,, text"]

TOKENIZERS = {"byte-level": byte_level_tokenizer(), "sentencepiece": sentencepiece_tokenizer()}


class Wrapped:
    """The decoder only needs .decode(ids, skip_special_tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def streamed(tokenizer, ids) -> str:
    decoder = StreamDecoder(Wrapped(tokenizer))
    pieces = [decoder.add(token) for token in ids]
    pieces.append(decoder.flush())
    # Only the final flush may end in U+FFFD (ids that never complete a character).
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1]), "a delta ended in half a character"
    return "".join(pieces)


@pytest.mark.parametrize("kind", TOKENIZERS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stream_equals_one_shot_decode_on_random_ids(kind, data):
    tokenizer = TOKENIZERS[kind]
    ids = data.draw(st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=40))
    assert streamed(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", TOKENIZERS)
@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(HARD_TEXTS) | st.text(max_size=8), max_size=6))
def test_stream_equals_one_shot_decode_on_real_text(kind, pieces):
    tokenizer = TOKENIZERS[kind]
    ids = tokenizer.encode("".join(pieces)).ids
    assert streamed(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_hard_texts_round_trip_through_the_stream(text):
    tokenizer = TOKENIZERS["byte-level"]
    assert streamed(tokenizer, tokenizer.encode(text).ids) == text


def test_deltas_never_split_a_character():
    tokenizer = TOKENIZERS["byte-level"]
    decoder = StreamDecoder(Wrapped(tokenizer))
    for token in tokenizer.encode("😀🎉👍🏽東京").ids:
        assert not decoder.add(token).endswith("\ufffd")


@pytest.fixture
def model_folder(tmp_path):
    write_tokenizer(tmp_path)
    return tmp_path


def test_special_tokens_and_eos_ids(model_folder):
    tokenizer = Tokenizer(model_folder, config_eos_ids=(0,))
    assert tokenizer.special_tokens["eos_token"] == "<|im_end|>"
    assert tokenizer.eos_token_ids == {0, tokenizer.token_to_id("<|im_end|>")}


def test_special_token_objects_and_list_templates(model_folder):
    config = {"eos_token": {"content": "<|im_end|>", "special": True},
              "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "D"}]}
    (model_folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(model_folder)
    assert tokenizer.special_tokens["eos_token"] == "<|im_end|>"
    assert tokenizer.chat_template == "D"


def test_chat_template_jinja_file_wins(model_folder):
    (model_folder / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert Tokenizer(model_folder).render_chat([{"role": "user", "content": "hi"}]) == "Jhi"


def test_chat_template_renders_like_transformers(model_folder):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer(model_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(model_folder))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ,there 😀"}]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == expected
    expected_ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
    assert ours.encode_chat(messages) == list(expected_ids)


def test_no_second_bos_when_the_template_writes_one(tmp_path):
    from tokenizers import processors

    tokenizer = byte_level_tokenizer()
    bos = tokenizer.token_to_id("<|im_start|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}))
    ours = Tokenizer(tmp_path)
    assert ours.encode("hi")[0] == bos  # raw prompts get the tokenizer's BOS
    ids = ours.encode_chat([{"role": "user", "content": "hi"}])
    assert ids.count(bos) == 1 and ids[0] == bos


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ x }}",
])
def test_template_cannot_reach_python(model_folder, template):
    (model_folder / "chat_template.jinja").write_text(template)
    with pytest.raises(TokenizerError, match=re.escape(f"chat template in {model_folder / 'chat_template.jinja'}")):
        Tokenizer(model_folder).render_chat([{"role": "user", "content": "hi"}])


def test_template_raise_exception_is_a_clear_error(model_folder):
    (model_folder / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match=r"chat_template.jinja failed: roles must alternate — --raw sends"):
        Tokenizer(model_folder).render_chat([{"role": "user", "content": "hi"}])


def test_missing_and_broken_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        Tokenizer(tmp_path)

