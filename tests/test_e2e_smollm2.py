"""End to end on the real SmolLM2-135M-Instruct through the real CLI, with transformers as the reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import smollm2
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
    actual = ours(ids, ours.new_cache(1, 40), 0, last_only=False)
    assert (actual - expected).abs().max().item() < 1e-3
