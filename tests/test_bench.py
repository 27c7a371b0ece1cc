"""`localgpt bench` through the real CLI on a tiny model: figures that hang together, the transformers comparison,
and clear errors for what it cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_model
from localgpt.bench import BenchResult, format_table, prompt_ids
from test_cli import assert_clean_error, run, run_in_process


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench-model")
    tiny_model(folder, "llama", tokenizer=True)
    return folder


def test_prompt_ids_fit_the_vocabulary():
    assert max(prompt_ids(500, 512)) < 512 and min(prompt_ids(500, 512)) >= 100
    assert prompt_ids(3, 49152) == [100, 137, 174]


def test_bench_against_transformers_json(model):
    result = run("bench", "-m", str(model), "--prompt-tokens", "16", "--new-tokens", "6", "--repeats", "1",
                 "--compare", "transformers", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["memory_bandwidth_gb_s"] > 0 and report["prompt_tokens"] == 16
    ours, theirs = report["results"]
    assert (ours["implementation"], theirs["implementation"]) == ("localgpt", "transformers")
    assert ours["dtype"] == theirs["dtype"] == "float32"  # --dtype auto on CPU, and transformers is run the same
    # The tiny model: 512 x 64 embedding tied to the head, two layers; both count the same weights.
    assert ours["weight_bytes"] == theirs["weight_bytes"]
    for r in (ours, theirs):
        assert r["decode_tps"] > 0 and r["ttft_s"] > 0 and r["peak_rss_mb"] > 50
        assert r["prefill_tps"] == pytest.approx(16 / r["ttft_s"])
        assert r["gb_per_s"] == pytest.approx(r["weight_bytes"] * r["decode_tps"] / 1e9)


def test_bench_table(model):
    result = run("bench", "-m", str(model), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
                 "--dtype", "bfloat16", timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "memory bandwidth" in out and "decode tok/s" in out
    assert "localgpt      bfloat16" in out


def test_format_table_ratios():
    ours = BenchResult("localgpt", "float32", 0.1, 1280, 40.0, 540_000_000, 800, 1.0, 2)
    theirs = BenchResult("transformers", "float32", 0.2, 640, 20.0, 540_000_000, 1000, 2.0, 2)
    table = format_table([ours, theirs], bandwidth=28.0)
    assert "21.6" in table and "77%" in table  # 540 MB x 40 tok/s = 21.6 GB/s of 28
    ratio = table.splitlines()[-1].split()
    assert ratio[:3] == ["ratio", "vs", "transformers"] and ratio[3:6] == ["0.50x", "2.00x", "2.00x"]
    assert ratio[-1] == "0.80x"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "ollama"], "--compare takes transformers or llama.cpp"),
        (["--compare", "llama.cpp"], "--compare llama.cpp needs --gguf FILE"),
        (["--new-tokens", "1"], "--new-tokens >= 2"),
        (["--dtype", "int3"], "--dtype must be one of"),
        (["-q", "3"], "quantization must be one of 8, 4, nf4, fp4"),
    ],
)
def test_bad_flags(capsys, model, args, message):
    assert_clean_error(run_in_process(capsys, "bench", "-m", str(model), *args), 2, message)


def test_llama_cpp_missing_is_a_clear_error(model, tmp_path):
    try:
        import llama_cpp  # noqa: F401

        pytest.skip("llama-cpp-python is installed here")
    except ImportError:
        pass
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = run("bench", "-m", str(model), "--new-tokens", "2", "--prompt-tokens", "4", "--repeats", "1",
                 "--compare", "llama.cpp", "--gguf", str(gguf), timeout=300)
    assert_clean_error(result, 1, "pip install llama-cpp-python")


FAKE_LLAMA_BENCH = '''#!{python}
"""Stands in for llama.cpp's llama-bench: records each run's arguments, prints its rows in `-o json` format."""
import json, sys
args = sys.argv[1:]
open({record!r}, "a").write(json.dumps(args) + "\\n")
value = lambda flag, default=None: args[args.index(flag) + 1] if flag in args else default
prompt, generate, depth = int(value("-p")), int(value("-n")), int(value("-d", "0"))
rows = []
if prompt:
    rows.append(dict(model_type="llama 135M F32", n_threads=int(value("-t")), n_prompt=prompt, n_gen=0,
                     n_depth=depth, avg_ts=1234.5, stddev_ts=12.5, samples_ts=[1222.0, 1247.0]))
if generate:
    rows.append(dict(model_type="llama 135M F32", n_threads=int(value("-t")), n_prompt=0, n_gen=generate,
                     n_depth=depth, avg_ts=86.25 if depth == 16 else 99.0, stddev_ts=0.75, samples_ts=[85.5, 87.0]))
print(json.dumps(rows, indent=2))
'''


def test_llama_bench_rows_are_read_as_llama_cpp_reports_them(model, tmp_path):
    """--llama-bench PATH runs llama.cpp's own binary (here a stand-in that prints its JSON) on the same prompt and
    token counts and threads, and reports its pp/tg means with their standard deviations."""
    import os
    import sys

    record = tmp_path / "args.json"
    binary = tmp_path / "llama-bench"
    binary.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, record=str(record)))
    os.chmod(binary, 0o755)
    gguf = tmp_path / "model.F32.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    result = run("bench", "-m", str(model), "--prompt-tokens", "16", "--new-tokens", "6", "--repeats", "2",
                 "--compare", "llama.cpp", "--gguf", str(gguf), "--llama-bench", str(binary), "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    ours, theirs = json.loads(result.stdout)["results"]
    prompt_run, generation_run = [json.loads(line) for line in record.read_text().splitlines()]
    for args in prompt_run, generation_run:
        assert args[args.index("-r") + 1] == "2" and args[args.index("-t") + 1] == str(ours["threads"])
        assert args[args.index("-m") + 1] == str(gguf) and "json" in args
    # the prompt from an empty context; decoding after it, at its depth, as ours decodes
    assert prompt_run[prompt_run.index("-p") + 1] == "16" and prompt_run[prompt_run.index("-n") + 1] == "0"
    assert "-d" not in prompt_run
    flag = lambda name: generation_run[generation_run.index(name) + 1]  # noqa: E731
    assert (flag("-p"), flag("-n"), flag("-d")) == ("0", "6", "16")
    assert theirs["decode_tps"] == 86.25 and theirs["decode_sd"] == 0.75 and theirs["prefill_tps"] == 1234.5
    assert theirs["dtype"] == "F32" and theirs["source"].startswith("llama-bench pp16/tg6 @ d16")
    record.unlink()
    table = run("bench", "-m", str(model), "--prompt-tokens", "16", "--new-tokens", "6", "--repeats", "1",
                "--compare", "llama.cpp", "--gguf", str(gguf), "--llama-bench", str(binary), timeout=300)
    assert "± sd" in table.stdout and "llama.cpp: llama-bench pp16/tg6 @ d16, mean ± sd of 1" in table.stdout


def test_llama_bench_that_is_not_a_program_is_a_usage_error(capsys, model, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = run_in_process(capsys, "bench", "-m", str(model), "--compare", "llama.cpp", "--gguf", str(gguf),
                            "--llama-bench", str(tmp_path / "nothing"))
    assert_clean_error(result, 2, "is not an executable file")
