"""End to end on the real SmolLM2-135M-Instruct through the real CLI, with transformers as the reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import smollm2
from helpers import stored_weight
from localgpt.generate import generate_tokens
from localgpt.sampling import SamplingOptions
from localgpt.weights import load_model

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def folder():
    return smollm2.hf_folder()


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_cli_answers_paris(folder):
    result = subprocess.run([sys.executable, "-m", "localgpt", "generate", "-m", str(folder),
                             "What is the capital of France?", "-t", "0", "-n", "20"],
                            capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()
    assert "Paris" in result.stdout.decode()
    assert result.stderr == b""


def test_cli_reads_stdin(folder):
    result = subprocess.run([sys.executable, "-m", "localgpt", "generate", "-m", str(folder), "-t", "0", "-n", "12"],
                            input=b"What is the capital of France?\n", capture_output=True, timeout=300)
    assert result.returncode == 0 and "Paris" in result.stdout.decode()


@torch.no_grad()
def test_greedy_tokens_equal_transformers(folder, reference):
    model, tokenizer = reference
    ours = load_model(folder, dtype="float32", device="cpu")
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = ours.tokenizer.encode_chat(messages)
        theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert ids == list(theirs)
        prompt = torch.tensor([ids])
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False)
        greedy = SamplingOptions(temperature=0)
        actual = list(generate_tokens(ours.model, ids, greedy, 40, ours.tokenizer.eos_token_ids))
        assert actual == expected[0, len(ids):].tolist(), question


@torch.no_grad()
def test_logits_match_transformers(folder, reference):
    model, _ = reference
    ours = load_model(folder, dtype="float32", device="cpu").model
    ids = torch.arange(100, 140)[None]
    expected = model(ids).logits
    actual = ours(ids, ours.make_cache(1, 40), 0, last_only=False)
    assert (actual - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("flag, compute", [("8", "float32"), ("nf4", "bfloat16")])
@torch.no_grad()
def test_quantized_greedy_equals_transformers(folder, flag, compute):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from localgpt.quantize import DEFAULT_INT8_THRESHOLD, DEFAULT_SKIP

    dtype = getattr(torch, compute)
    bnb_args = dict(load_in_8bit=True, llm_int8_threshold=DEFAULT_INT8_THRESHOLD) if flag == "8" else dict(
        load_in_4bit=True, bnb_4bit_quant_type=flag, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=list(DEFAULT_SKIP[4]))
    reference = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**bnb_args),
                                                     dtype=dtype).eval()
    # bitsandbytes' modules, with transformers' options (it keeps the tied head)
    ours = load_model(folder, dtype=compute, device="cpu", quantize=flag, skip=",".join(DEFAULT_SKIP[4]) if flag != "8"
                      else "lm_head", backend="torch")
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    prompt = torch.tensor([ids])
    output = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                                output_scores=True, return_dict_in_generate=True)
    expected = output.sequences[0, len(ids):].tolist()
    actual = list(generate_tokens(ours.model, ids, SamplingOptions(temperature=0), 24, ours.tokenizer.eos_token_ids))
    forks = [i for i, (a, e) in enumerate(zip(actual, expected, strict=False)) if a != e]
    same = forks[0] if forks else min(len(actual), len(expected))
    assert "Paris" in ours.tokenizer.decode(actual[:same]), (actual, expected)
    if same < len(expected):
        # Two different programs agree to float rounding, not bit for bit: a fork is allowed only where the
        # reference's own two candidates were tied within that rounding (in bfloat16, 2 units in the last place of
        # the logit; bitsandbytes' CPU kernels differ between hosts, and so does the step where a near tie falls).
        scores = output.scores[same][0].float()
        theirs, ours_pick = scores[expected[same]].item(), scores[actual[same]].item()
        tie = 2 * abs(theirs) * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-20)
        assert theirs - ours_pick <= tie, (same, theirs, ours_pick, actual, expected)


@pytest.mark.parametrize("flag", ["8", "nf4", "fp4"])
@torch.no_grad()
def test_native_quantized_logits_equal_transformers_with_dequantized_weights(folder, flag):
    """The native backend's quantized SmolLM2 (8-bit, or 4-bit with our default skips; float32 compute, so the
    comparison is tight) against transformers' own float model holding bitsandbytes' dequantize(quantize(W)) for
    every layer we quantize: the prompt's logits, then each one-token decoding step's."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from localgpt import native
    from localgpt.backends.native import NativeQuantizedLinear
    from localgpt.quantize import DEFAULT_SKIP, load_bitsandbytes, skipped

    if native.library() is None:
        pytest.skip("no native kernels here")
    bnb = load_bitsandbytes(torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and not skipped(name, DEFAULT_SKIP[8 if flag == "8" else 4]):
            _, dequantized = stored_weight(module.weight.data, flag, bnb)
            module.weight = torch.nn.Parameter(dequantized)  # a new parameter: the tied head leaves the embedding
    ours = load_model(folder, dtype="float32", device="cpu", quantize=flag).model
    assert isinstance(ours.layers[0].mlp.gate_up_proj, NativeQuantizedLinear), ours.backend.describe()
    ids = torch.arange(100, 140)[None]
    cache = ours.make_cache(1, 48)
    steps = [ours(ids, cache)[0, -1]]
    for _ in range(6):
        ids = torch.cat([ids, steps[-1].argmax().view(1, 1)], 1)
        steps.append(ours(ids[:, -1:], cache)[0, -1])
    expected = reference(ids).logits[0, 39:]
    assert (torch.stack(steps) - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("head", [[], ["--quantize-head"]])
def test_cli_quantize_then_generate(folder, tmp_path, head):
    """4-bit, as written by default and with the head quantized too, answers the France question."""
    pytest.importorskip("bitsandbytes")
    quantized = tmp_path / "smol-q4"
    result = subprocess.run([sys.executable, "-m", "localgpt", "quantize", str(folder), "--bits", "4", *head, "-o",
                             str(quantized)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    size = sum(p.stat().st_size for p in quantized.iterdir())
    assert size < 0.3 * sum(p.stat().st_size for p in folder.iterdir())  # float32 → 4-bit weights, bf16 embedding
    answer = subprocess.run([sys.executable, "-m", "localgpt", "generate", "-m", str(quantized),
                             "What is the capital of France?", "-t", "0", "-n", "20"],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert answer.returncode == 0 and "Paris" in answer.stdout, answer.stderr


@pytest.mark.parametrize("code", ["nf4", "fp4"])
def test_int8_activations_answer_paris(folder, code):
    """4-bit with int8 activations (the kernels' integer products) still answers the France question."""
    pytest.importorskip("bitsandbytes")
    answer = subprocess.run([sys.executable, "-m", "localgpt", "generate", "-m", str(folder), "-q", code,
                             "--int8-activations", "What is the capital of France?", "-t", "0", "-n", "12", "--stats",
                             "--no-log"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert answer.returncode == 0 and "The capital of France is Paris" in answer.stdout, answer.stderr
    from localgpt import native

    if native.library() is not None:
        assert f"native 4-bit {code} · int8 activations" in answer.stderr


def interrupt_after(args: list[str], marker: str, env: dict | None = None):
    """Start the CLI, press Ctrl-C as soon as it says (under LOCALGPT_TEST_MARKERS=1) that it reached `marker`,
    or printed a line that holds it; return (code, stdout, stderr without the markers)."""
    import os
    import signal

    process = subprocess.Popen([sys.executable, "-m", "localgpt", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {}), "LOCALGPT_TEST_MARKERS": "1"})
    seen = ""
    while marker not in seen:
        line = process.stderr.readline()
        assert line, f"the command ended before {marker!r}: {seen}"
        seen += line
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    lines = [line for line in (seen + stderr).splitlines() if not line.startswith("localgpt-test-marker: ")]
    return process.returncode, stdout, "\n".join(lines)


# Every moment of a run, each marked by the program itself: Python importing the CLI, importing torch (a native
# extension that aborted the process on a Ctrl-C there, exit -6), reading the weights, tokenizing the prompt,
# prefilling, decoding. The signal lands at or just after the marker.
@pytest.mark.parametrize("moment", ["starting", "importing", "loading", "tokenizing", "generating", "decoding"])
def test_ctrl_c_at_any_moment_is_one_line_and_130(folder, moment):
    code, _, stderr = interrupt_after(["generate", "-m", str(folder), "Tell me a long story.", "-n", "400"],
                                      f"localgpt-test-marker: {moment}")
    assert code == 130, stderr
    assert [line for line in stderr.splitlines() if line] == ["Error: interrupted"], stderr


@pytest.mark.parametrize("moment", ["loading", "writing"])
def test_ctrl_c_during_quantize_leaves_nothing(folder, tmp_path, moment):
    home = tmp_path / "home"
    code, _, stderr = interrupt_after(["quantize", str(folder), "--bits", "4"], f"localgpt-test-marker: {moment}",
                                      env={"LOCALGPT_HOME": str(home)})
    assert code == 130 and stderr.strip().endswith("Error: interrupted"), stderr
    models = home / "models"
    assert not models.exists() or not any(models.iterdir())  # no folder, and no hidden scratch folder either
