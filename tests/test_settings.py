"""The one settings schema (localgpt/settings.py) and every front end that reads it: CLI flags, /set, /show, the
chat's saved file, the log."""

from __future__ import annotations

import dataclasses

import pytest

from localgpt.cli import app
from localgpt.errors import UsageError
from localgpt.settings import SETTINGS, BeamOptions, GenerationSettings, SamplingOptions, SettingError, resolve


def command_flags(name: str) -> set[str]:
    import typer.main

    command = typer.main.get_command(app).commands[name]
    return {option for parameter in command.params for option in parameter.opts}


def test_every_declared_field_is_a_setting_with_a_flag_in_generate_and_chat():
    declared = {f.name for cls in (SamplingOptions, BeamOptions) for f in dataclasses.fields(cls)}
    declared |= {f.name for f in dataclasses.fields(GenerationSettings)} - {"sampling", "beam"}
    assert set(SETTINGS) == declared
    generate, chat = command_flags("generate"), command_flags("chat")
    for name, setting in SETTINGS.items():
        assert setting.flag in generate, name
        assert (setting.flag in chat) == setting.chat, name
    assert "-t" in generate and "-n" in chat


def test_flat_names_round_trip():
    settings = GenerationSettings.of(temperature=0.3, top_k=5, num_beams=3, early_stopping="never", max_tokens=9)
    assert settings.sampling.top_k == 5 and settings.beam.num_beams == 3 and settings.beams() is settings.beam
    assert GenerationSettings.of(**settings.flat()) == settings
    assert settings.replace(num_beams=1).beams() is None


@pytest.mark.parametrize("values, message", [
    ({"top_p": 2}, "top_p must be in (0, 1], not 2"),
    ({"temperature": "-1"}, "temperature must be >= 0, not -1"),
    ({"top_k": "x"}, "'x' is not a valid value for top_k (an integer >= 0)"),
    ({"seed": True}, "True is not a valid value for seed (an integer, or none)"),  # JSON true is not 1
    ({"early_stopping": "sometimes"}, "'sometimes' is not a valid value for early_stopping (true, false or never)"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences (3) cannot exceed num_beams (2)"),
    ({"num_beams": 2, "presence_penalty": 0.5}, "presence_penalty and frequency_penalty work with one beam only"),
    ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2], not 3"),
    ({"bogus": 1}, "unknown setting 'bogus'"),
])
def test_values_are_checked_in_the_settings_words(values, message):
    with pytest.raises(SettingError) as refused:
        GenerationSettings.of(**values)
    assert str(refused.value).startswith(message)


def test_the_cli_says_the_flag_instead():
    error = SettingError("num_return_sequences (3) cannot exceed num_beams (2); 'top_p' stays as typed")
    assert str(error.for_flags()) == "--num-return-sequences (3) cannot exceed --num-beams (2); 'top_p' stays as typed"


def test_resolve_prefers_the_user_then_the_model_then_the_defaults():
    model = {"temperature": 0.2, "top_k": 50, "top_p": 7, "repetition_penalty": 1.1}  # top_p 7: not taken
    settings = resolve({"top_k": 3}, model)
    assert settings.sampling == SamplingOptions(temperature=0.2, top_k=3, top_p=0.9, repetition_penalty=1.1)
    assert resolve({}, {"do_sample": False, "temperature": 0.6}).sampling.greedy  # the model asks for greedy
    assert resolve({"temperature": 0.5}, {"do_sample": False}).sampling.temperature == 0.5
    assert resolve({}, None) == GenerationSettings()


def test_one_default_for_max_tokens_everywhere():
    assert GenerationSettings().max_tokens == SETTINGS["max_tokens"].default == 1024


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--top-p", "2"], "Error: --top-p must be in (0, 1], not 2\n"),
    (["generate", "hi", "--num-beams", "2", "--frequency-penalty", "1"],
     "Error: --presence-penalty and --frequency-penalty work with one beam only — drop them or --num-beams\n"),
    (["chat", "--early-stopping", "maybe"], "Error: 'maybe' is not a valid value for --early-stopping (true, false "
                                            "or never)\n"),
    (["generate", "hi", "-n", "0"], "Error: --max-tokens must be >= 1, not 0\n"),
])
def test_cli_flags_are_checked_before_loading(capsys, argv, message):
    from localgpt.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and capsys.readouterr().err == message


def test_usage_errors_are_setting_errors():
    assert issubclass(SettingError, UsageError)


def test_every_generation_config_key_a_setting_declares_is_read(tmp_path):
    """load_generation_defaults keeps the file's keys; resolve takes each setting's own (no second list of keys)."""
    import json

    from localgpt.config import load_generation_defaults

    keys = {setting.model_key: setting for setting in SETTINGS.values() if setting.model_key}
    values = {"temperature": 0.3, "top_k": 7, "top_p": 0.8, "min_p": 0.1, "typical_p": 0.6, "repetition_penalty": 1.2,
              "no_repeat_ngram_size": 3, "length_penalty": 0.5, "early_stopping": "never", "num_beams": 9,
              "bos_token_id": 1, "eos_token_id": None}
    assert set(keys) <= set(values)
    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    settings = resolve({}, load_generation_defaults(tmp_path))
    for key, setting in keys.items():
        assert settings.get(setting.name) == values[key], key
    assert settings.beam.num_beams == 1  # not a model_key: a model does not switch beam search on by itself
