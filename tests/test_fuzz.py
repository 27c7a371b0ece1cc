"""Fuzzing the parsers users feed: config.json (random and mutated) and the command line. Each either works or says
what is wrong in our own error type and words — never another exception, never a traceback."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import TINY, VARIANTS
from localgpt.cli import main
from localgpt.errors import LocalGPTError
from localgpt.families import config_from_dict

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MODEL_TYPES = sorted({model_type for model_type, _ in VARIANTS.values()} | {"mistral", "bert", ""})


def valid_config(model_type: str) -> dict:
    """A plausible config.json for model_type, as transformers writes it (the tiny test sizes)."""
    if model_type == "gpt2":
        return {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 512}
    return {"model_type": model_type, **TINY, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "head_dim": 16}


def assert_ours_or_valid(raw, generation=None):
    try:
        config = config_from_dict(raw, generation)
    except LocalGPTError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    # Accepted: the switches the model is built from must make sense.
    assert config.num_layers >= 1 and config.hidden_size >= 1 and config.vocab_size >= 1
    assert config.num_heads >= 1 and config.num_kv_heads >= 1 and config.num_heads % config.num_kv_heads == 0
    assert config.head_dim >= 1 and config.context_length >= 1


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(st.sampled_from(["model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                            "num_attention_heads", "rope_scaling", "eos_token_id", "n_embd"])
                           | st.text(max_size=6), JSON_VALUES, max_size=8))
@example(raw={"model_type": "\n"})  # found by this test: the name went into the message raw, on two lines
@example(raw={**valid_config("gemma2"), "num_hidden_layers": 2**40})  # found in CI: a spec per layer ran out of memory
def test_random_config_objects(raw):
    assert_ours_or_valid(raw)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), model_type=st.sampled_from(MODEL_TYPES))
def test_mutated_valid_configs(data, model_type):
    raw = valid_config(model_type)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(raw)) | st.sampled_from(
            ["rope_scaling", "rope_parameters", "sliding_window", "layer_types", "tie_word_embeddings",
             "num_key_value_heads", "max_position_embeddings", "eos_token_id", "attention_bias"]))
        if data.draw(st.booleans()):
            raw[key] = data.draw(JSON_VALUES | st.integers(-3, 300))
        else:
            raw.pop(key, None)
    generation = data.draw(st.none() | st.dictionaries(st.just("eos_token_id"), JSON_VALUES, max_size=1))
    assert_ours_or_valid(raw, generation)


FLAGS = ["-n", "--max-tokens", "-t", "--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty",
         "--seed", "--stop", "--dtype", "--device", "--num-beams", "--length-penalty", "--early-stopping",
         "--num-return-sequences", "--no-repeat-ngram-size", "-q", "--quantize", "--json", "--stats", "--raw",
         "--do-sample", "--truncate", "-s", "--bits", "--type", "--force", "--unknown", "-x"]
VALUES = ["0", "1", "-1", "2", "0.5", "1e309", "nan", "inf", "-0", "abc", "", "true", "never", "float32", "nf4",
          "cuda", "cuda:7", "9" * 30, "ü", "--"]


@pytest.fixture
def no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALGPT_MODEL", str(tmp_path / "no-such-model"))  # nothing is ever loaded or fetched
    monkeypatch.setenv("LOCALGPT_HOME", str(tmp_path / "home"))
    return tmp_path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["generate", "chat", "show", "quantize", "convert", "bench", "frobnicate"]),
       argv=st.lists(st.sampled_from(FLAGS) | st.sampled_from(VALUES) | st.text(max_size=6), max_size=8))
def test_random_command_lines(no_model, capsys, monkeypatch, command, argv):
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # noqa: SIM115 - a prompt never comes from the test's stdin
    with pytest.raises(SystemExit) as exit_info:
        main([command, *argv, "hello"])
    code = exit_info.value.code
    captured = capsys.readouterr()
    if code == 0:  # --help somewhere in argv, say
        return
    assert code in (1, 2), captured.err
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), captured.err
    assert "Traceback" not in captured.err and "a bug in localgpt" not in captured.err, captured.err


def test_config_fuzz_covers_every_family():
    for model_type in MODEL_TYPES[1:]:
        if model_type != "bert":
            config_from_dict(json.loads(json.dumps(valid_config(model_type))))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from helpers import tiny_model

    folder = tmp_path_factory.mktemp("fuzz-model")
    tiny_model(folder, "llama", tokenizer=True)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return folder


MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "model.safetensors"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(MODEL_FILES), content=st.binary(max_size=64) | st.sampled_from(
    [b"\xff\xfe{}", b'{"a": "\xe9"}', b"\x00" * 16, b"{}", b"[]", b"null", b"\xef\xbb\xbf{}"]))
@example(name="config.json", content=b"\x8b\x12 random \xff bytes")  # was "unexpected UnicodeDecodeError … a bug"
def test_random_bytes_in_any_model_file(tiny_folder, tmp_path_factory, capsys, monkeypatch, name, content):
    """Every file localgpt reads from a model folder, replaced by random bytes: the command works or says what is
    wrong in one line of its own — never "a bug in localgpt"."""
    import shutil

    folder = tmp_path_factory.mktemp("fuzzed")
    shutil.copytree(tiny_folder, folder, dirs_exist_ok=True)
    (folder / name).write_bytes(content)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # noqa: SIM115
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "-m", str(folder), "hello", "-n", "2", "-t", "0"])
    captured = capsys.readouterr()
    if exit_info.value.code == 0:
        return
    assert exit_info.value.code == 1, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), captured.err
    assert "a bug in localgpt" not in captured.err, captured.err
