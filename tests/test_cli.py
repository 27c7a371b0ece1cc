"""The real CLI in a subprocess: stdin pipes, a reader that goes away, bad flags and bad model folders."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import assert_clean_error, run_cli, tiny_model
from localgpt.cli import main
from localgpt.errors import PromptError, UsageError
from localgpt.prompt import build_prompt
from localgpt.tokenizer import Tokenizer


def run(*args: str, stdin: str | bytes | None = "", env: dict | None = None, timeout: int = 120):
    return run_cli(*args, stdin=stdin, env=env, timeout=timeout)


def run_in_process(capsys, *args: str):
    """main() in this process, for checks that need no model: exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stdout=out, stderr=err)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat-model")
    tiny_model(folder, "llama", tokenizer=True, eos_token_id=None)
    return folder


def generate_json(model: Path, *args: str, stdin: str | bytes = "") -> dict:
    result = run("generate", "-m", str(model), "-t", "0", "--json", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_streams_the_answer_to_stdout_only(model):
    result = run("generate", "-m", str(model), "Hello", "-t", "0", "-n", "8")
    assert result.returncode == 0
    assert result.stdout.strip() and result.stderr == ""
    again = run("generate", "-m", str(model), "Hello", "-t", "0", "-n", "8")
    assert again.stdout == result.stdout  # greedy is deterministic


def test_json_and_stats(model):
    out = generate_json(model, "Hello", "-n", "6")
    assert out["tokens"] == 6 and out["finish_reason"] == "length" and isinstance(out["text"], str)
    assert set(out["timings"]) == {"time_to_first_token_s", "prompt_tokens_per_s", "generation_tokens_per_s"}
    result = run("generate", "-m", str(model), "Hello", "-t", "0", "-n", "4", "--stats")
    assert "answer: 4 tokens" in result.stderr and "first token" in result.stderr
    backend = result.stderr.splitlines()[-1]  # which backend and products ran (tiny llama: all of it native or torch)
    assert backend.startswith(("backend: native (", "backend: torch · products: ")) and "products: " in backend


def test_stdin_is_the_prompt_and_comes_before_the_argument(model):
    tokenizer = Tokenizer(model)
    alone = generate_json(model, "-n", "2", stdin="notes from stdin\n")
    assert alone["prompt_tokens"] == len(tokenizer.encode_chat([{"role": "user", "content": "notes from stdin"}]))
    both = generate_json(model, "Summarize:", "-n", "2", stdin="notes from stdin\n")
    combined = "notes from stdin\n\nSummarize:"
    assert both["prompt_tokens"] == len(tokenizer.encode_chat([{"role": "user", "content": combined}]))


def test_raw_and_system_prompts(model):
    tokenizer = Tokenizer(model)
    raw = generate_json(model, "Hello", "--raw", "-n", "1")
    assert raw["prompt_tokens"] == len(tokenizer.encode("Hello"))
    system = generate_json(model, "Hello", "-s", "Be brief.", "-n", "1")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert system["prompt_tokens"] == len(tokenizer.encode_chat(messages))


def test_stop_string_is_not_printed(model):
    text = generate_json(model, "Hello", "-n", "30")["text"]
    stop = text[5:8]
    assert stop
    stopped = generate_json(model, "Hello", "-n", "30", "--stop", stop)
    assert stopped["finish_reason"] == "stop-sequence"
    assert stopped["text"] == text[: text.find(stop)]


def test_invalid_utf8_and_nul_bytes_on_stdin(model):
    result = run("generate", "-m", str(model), "-t", "0", "-n", "2", stdin=b"caf\xe9 \x00 ok\xff")
    assert result.returncode == 0, result.stderr


def test_reader_going_away_is_quiet(model):
    process = subprocess.Popen([sys.executable, "-m", "localgpt", "generate", "-m", str(model), "Hi", "-n", "100"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head -c 0`: the reader is gone before the first token
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in stderr and "Error" not in stderr and "BrokenPipe" not in stderr, stderr


def test_head_closes_the_pipe_early(model):
    """`| head -c 3`: three bytes, nothing on stderr, and exit 141 as for SIGPIPE (not 1, a runtime failure)."""
    command = f"{sys.executable} -m localgpt generate -m {model} Hi -n 200 | head -c 3; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert len(result.stdout) == 3 and result.stderr == b"", result.stderr
    assert result.returncode == 141


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["-n", "0"], "--max-tokens must be >= 1"),
    (["--dtype", "float8"], "--dtype must be one of"),
    (["--bogus"], "No such option"),
    (["--top-p", "x"], "Invalid value for '--top-p'"),
])
def test_invalid_flags_are_usage_errors_before_loading(capsys, flags, message):
    result = run_in_process(capsys, "generate", "-m", "/does/not/matter", "hi", *flags)
    assert_clean_error(result, 2, message)


def test_missing_model_folder():
    assert_clean_error(run("generate", "-m", "/no/such/folder", "hi"), 1, "no model folder at /no/such/folder")


def test_empty_stdin_without_argument(model):
    assert_clean_error(run("generate", "-m", str(model), stdin="  \n"), 1, "the prompt is empty")


def test_no_prompt_on_a_terminal_is_an_error_not_a_hang(model):
    leader, follower = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "localgpt", "generate", "-m", str(model)], stdin=follower,
                                capture_output=True, text=True, timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert_clean_error(result, 2, "no prompt")


def test_prompt_longer_than_the_context(model):
    long_prompt = "word " * 400
    assert_clean_error(run("generate", "-m", str(model), long_prompt, "--raw"), 1, "model's context is 256 tokens")
    result = run("generate", "-m", str(model), long_prompt, "--raw", "--truncate", "-n", "2", "-t", "0")
    assert result.returncode == 0 and "kept its last" in result.stderr


def test_debug_shows_the_traceback():
    result = run("generate", "-m", "/no/such/folder", "hi", env={"LOCALGPT_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.fixture
def broken(model, tmp_path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(model, folder)
    return folder


def test_folder_without_config(broken):
    (broken / "config.json").unlink()
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "no config.json in")


def test_config_that_is_not_json(broken):
    (broken / "config.json").write_text("{ nope")
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "config.json is not valid JSON")


def test_unknown_model_type(broken):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "mamba"
    (broken / "config.json").write_text(json.dumps(config))
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "model_type 'mamba' is not supported")


def test_truncated_safetensors(broken):
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "is truncated or corrupt")


def test_header_claiming_more_than_the_file(broken):
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "is truncated or corrupt")


def test_pickle_only_checkpoint_is_refused(broken):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "never loads pickles")


def test_missing_tokenizer(broken):
    (broken / "tokenizer.json").unlink()
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "no tokenizer.json")


def test_wrong_tensor_shape_is_named(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1,
                       "tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 128], expected [64, 96]")


def test_missing_tensor_is_named(broken):
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    assert_clean_error(run("generate", "-m", str(broken), "hi"), 1, "missing tensors for layers.1.attn.qkv_proj")


def test_build_prompt_rules():
    assert build_prompt("arg", None) == "arg"
    assert build_prompt("arg", "piped\n") == "piped\n\narg"
    assert build_prompt(None, "piped") == "piped"
    with pytest.raises(UsageError):
        build_prompt(None, None)
    with pytest.raises(PromptError):
        build_prompt(None, "   ")


def test_help_version_and_usage_errors_answer_without_torch():
    """`--help`, `--version`, no command at all, a bad flag, `list`, `show` and `rm` answer without importing torch
    (seconds on a small machine); in a fresh interpreter, since this one has torch loaded already."""
    script = ("import sys\nfrom localgpt.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n"
              "    print('exit', exit.code, 'torch' in sys.modules, file=sys.stderr)\n")
    answers = {}
    for args in (["--help"], [], ["--version"], ["-V"], ["generate", "hi", "-t", "-1"], ["chat", "--top-p", "2"],
                 ["bench", "--dtype", "float8"], ["generate", "hi", "-q", "3"], ["list"], ["show", "nothing"],
                 ["rm", "nothing", "--yes"]):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60)
        answers[" ".join(args)] = result
        assert result.stderr.splitlines()[-1].split()[2] == "False", (args, result.stderr)  # torch not imported
    for args in ("--help", ""):
        assert answers[args].stdout.count("generate") >= 1 and answers[args].stderr.split()[-2] == "0"
    from localgpt import __version__

    assert answers["--version"].stdout == answers["-V"].stdout == f"localgpt {__version__}\n"
    for args, message in [("generate hi -t -1", "--temperature must be >= 0"), ("chat --top-p 2", "--top-p must be"),
                          ("bench --dtype float8", "--dtype must be one of"),
                          ("generate hi -q 3", "quantization must be one of")]:
        stderr = answers[args].stderr.splitlines()
        assert stderr[0].startswith("Error: ") and message in stderr[0] and stderr[1] == "exit 2 False", stderr


@pytest.mark.parametrize("command", ["generate", "chat", "bench", "convert", "download", "quantize", "list", "show",
                                     "rm"])
def test_help_shows_no_python_types(capsys, monkeypatch, command):
    """On/off flags take no value, so they show none (not `--raw <bool>`); lists and arguments are named for
    what they hold, not `<list[str]>` or `{gguf_file}`."""
    monkeypatch.setenv("COLUMNS", "120")
    result = run_in_process(capsys, command, "--help")
    assert result.returncode == 0
    for leak in ("<bool>", "list[", "{gguf_file}", "{repo_id}"):
        assert leak not in result.stdout, (leak, result.stdout)
