"""The torch.compile'd decode step (--compile) passes the same parity checks as eager: greedy tokens equal to
transformers' for architectures that exercise every branch the step takes (fused q/k rotation, GQA, learned
positions, sliding windows with soft-capping, per-head q/k norms), beams through the batched cache, and a clean
fallback when compilation is unavailable."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from localgpt import native
from localgpt.beam import BeamOptions, beam_search
from localgpt.compiled import compile_decode
from localgpt.families import load_config
from localgpt.generate import generate_tokens
from localgpt.sampling import SamplingOptions
from localgpt.weights import load_weights
from test_cli import run

pytest.importorskip("transformers")

PROMPT = [5, 17, 99, 230, 7, 8, 7, 8, 301, 44, 12, 3]


def load_pair(folder, variant, backend="torch"):
    """--compile is for machines where the native backend cannot run (where it runs, compiling is skipped: see
    below): the torch backend, whose blocked products run inside the compiled step too."""
    reference = tiny_model(folder, variant)
    return reference, load_weights(folder, load_config(folder), torch.float32, torch.device("cpu"), backend=backend)


@pytest.mark.parametrize("variant", ["llama", "gpt2", "gemma2", "qwen3"])
def test_compiled_greedy_matches_transformers(tmp_path, variant):
    reference, model = load_pair(tmp_path, variant)
    ids = torch.tensor([PROMPT])
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    notices = []
    assert compile_decode(model, notify=notices.append)
    assert "compiling the decode step" in notices[0]
    compiled = model.compiled_step
    steps = []
    model.compiled_step = lambda *args: steps.append(1) or compiled(*args)  # count the steps that go through it
    actual = list(generate_tokens(model, PROMPT, SamplingOptions(temperature=0), 24, eos_ids={2}))
    assert actual == expected[0, len(PROMPT):].tolist()
    assert len(steps) == len(actual) - 1  # every decode step after the prefill ran compiled


def test_compiled_beams_equal_eager(tmp_path):
    _, model = load_pair(tmp_path, "llama")
    options, beams = SamplingOptions(temperature=0), BeamOptions(num_beams=4, num_return_sequences=2)
    eager = beam_search(model, PROMPT, options, beams, 16)
    compile_decode(model, notify=lambda message: None)
    compiled = beam_search(model, PROMPT, options, beams, 16)
    assert [h.tokens for h in compiled] == [h.tokens for h in eager]
    assert [h.score for h in compiled] == pytest.approx([h.score for h in eager], abs=1e-5)


def test_falls_back_to_eager_when_compilation_fails(tmp_path, monkeypatch):
    _, model = load_pair(tmp_path, "llama")
    expected = list(generate_tokens(model, PROMPT, SamplingOptions(temperature=0), 8))

    def no_compiler(function, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    notices = []
    assert not compile_decode(model, notify=notices.append)
    assert model.compiled_step is None
    assert "torch.compile is unavailable here (InvalidCxxCompiler: No working C++ compiler found)" in notices[-1]
    assert list(generate_tokens(model, PROMPT, SamplingOptions(temperature=0), 8)) == expected


def test_generate_compile_flag(tmp_path):
    tiny_model(tmp_path, "llama", tokenizer=True, eos_token_id=None)
    command = ("generate", "-m", str(tmp_path), "Hello", "-t", "0", "-n", "8")
    without_kernels = {"LOCALGPT_NATIVE": "0"}
    eager = run(*command, env=without_kernels, timeout=300)
    compiled = run(*command, "--compile", env=without_kernels, timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout
    assert "compiling the decode step" in compiled.stderr  # the user is told before the wait
    if native.library() is not None:  # where the kernels run, the flag is declined in one line
        skipped = run(*command, "--compile", timeout=300)
        assert skipped.returncode == 0 and skipped.stdout == eager.stdout
        assert skipped.stderr.splitlines() == ["localgpt: --compile skipped: the native kernels decode "
                                                         "faster than a compiled step here"]


def test_skipped_where_the_native_kernels_run(tmp_path):
    if native.library() is None:
        pytest.skip("no native kernels on this machine: --compile compiles")
    _, model = load_pair(tmp_path, "llama", backend="auto")
    notices = []
    assert not compile_decode(model, notify=notices.append)
    assert model.compiled_step is None and notices == ["--compile skipped: the native kernels decode faster than a "
                                                       "compiled step here"]
