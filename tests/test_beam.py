"""Beam search against transformers' generate: the same token ids for every option, and a streamed prefix that is
always a prefix of the final answer."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import tiny_model
from localgpt.beam import BeamOptions, beam_search
from localgpt.errors import UsageError
from localgpt.families import load_config
from localgpt.sampling import SamplingOptions
from localgpt.weights import load_weights

pytest.importorskip("transformers")

EOS = list(range(2, 50))  # many end tokens, so that hypotheses finish early and often
# (num_beams, length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences): every value of every
# option and every pair of values of two options at least once (a covering design: 9 cases, not the 72 of the
# full product; test_grid_covers_every_pair_of_values holds it to that).
VALUES = [[2, 4], [0.5, 1.0, 2.0], [True, False, "never"], [0, 2], [1, 2]]
GRID = [
    (2, 0.5, True, 0, 2), (4, 0.5, False, 0, 1), (4, 0.5, "never", 2, 1),
    (4, 1.0, True, 2, 2), (4, 1.0, False, 0, 2), (2, 1.0, "never", 2, 1),
    (2, 2.0, True, 0, 1), (2, 2.0, False, 2, 1), (4, 2.0, "never", 0, 2),
]


def test_grid_covers_every_pair_of_values():
    for (i, first), (j, second) in itertools.combinations(enumerate(VALUES), 2):
        for a, b in itertools.product(first, second):
            assert any(case[i] == a and case[j] == b and type(case[i]) is type(a) for case in GRID), (i, a, j, b)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3", "phi3", "smollm3"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"beam-{request.param}")
    reference = tiny_model(folder, request.param, eos_token_id=EOS)
    ours = load_weights(folder, load_config(folder), torch.float32, torch.device("cpu"))
    return reference, ours


def reference_beams(reference, ids: list[int], new_tokens: int, **options) -> list[list[int]]:
    prompt = torch.tensor([ids])
    out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **options)
    return out[:, len(ids):].tolist()


def assert_same(ours, theirs, fill=EOS[0]):
    """transformers pads shorter beams with `pad_token_id or eos_token_id[0]`: 0 is falsy, so EOS[0]."""
    assert len(ours) == len(theirs)
    for hypothesis, row in zip(ours, theirs, strict=True):
        tokens = hypothesis.tokens
        assert row[: len(tokens)] == tokens
        assert all(t == fill for t in row[len(tokens):])


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, ngram, returns", GRID)
@torch.no_grad()
def test_beams_equal_transformers(pair, num_beams, length_penalty, early_stopping, ngram, returns):
    reference, ours = pair
    ids = torch.randint(50, 500, (10,), generator=torch.Generator().manual_seed(num_beams + ngram)).tolist()
    expected = reference_beams(reference, ids, 20, num_beams=num_beams, length_penalty=length_penalty,
                               early_stopping=early_stopping, no_repeat_ngram_size=ngram,
                               num_return_sequences=returns)
    beams = BeamOptions(num_beams, length_penalty, early_stopping, returns)
    sampling = SamplingOptions(temperature=0, no_repeat_ngram_size=ngram)
    actual = beam_search(ours, ids, sampling, beams, 20, set(EOS))
    assert_same(actual, expected)


@torch.no_grad()
def test_repetition_penalty_with_beams(pair):
    reference, ours = pair
    ids = [60, 61, 60, 61, 60, 61, 70, 71]
    expected = reference_beams(reference, ids, 16, num_beams=3, repetition_penalty=1.5)
    actual = beam_search(ours, ids, SamplingOptions(temperature=0, repetition_penalty=1.5), BeamOptions(3), 16,
                         set(EOS))
    assert_same(actual, expected)


@torch.no_grad()
def test_streamed_prefix_is_always_a_prefix_of_the_answer(pair):
    _, ours = pair
    for seed in range(6):
        ids = torch.randint(50, 500, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
        streamed: list[int] = []
        best = beam_search(ours, ids, SamplingOptions(temperature=0), BeamOptions(4, early_stopping="never"), 24,
                           set(EOS[:5]), on_commit=streamed.extend)[0]
        assert best.tokens[: len(streamed)] == streamed


@torch.no_grad()
def test_beam_sampling_is_seeded_and_valid(pair):
    _, ours = pair
    def sampled(seed: int) -> list[list[int]]:
        # hot enough that every tiny model's peaked distributions still give different draws
        sampling = SamplingOptions(temperature=3.0, top_k=20, seed=seed)
        beams = BeamOptions(3, do_sample=True, num_return_sequences=2)
        hypotheses = beam_search(ours, [60, 61, 62], sampling, beams, 12, set(EOS[10:]))
        assert hypotheses[0].score >= hypotheses[1].score
        return [h.tokens for h in hypotheses]

    assert sampled(3) == sampled(3)  # seeded: repeatable
    assert len({str(sampled(seed)) for seed in range(6)}) > 1  # and it samples: deterministic beams have one answer


@pytest.mark.parametrize("options", [BeamOptions(num_beams=0), BeamOptions(num_beams=2, num_return_sequences=3),
                                     BeamOptions(early_stopping="sometimes")])
def test_invalid_beam_options(options):
    with pytest.raises(UsageError):
        options.validate()


@pytest.mark.parametrize("path", ["native", "torch"])
def test_top_candidates_equal_one_flat_topk(path, monkeypatch):
    """The top candidates (in one pass in C where the kernels run, else per beam then merged) are torch.topk over
    the flattened scores, also where the best sit in one beam or in a row's last values (a vector's tail), where
    values tie or a NaN is present (torch.topk decides then) and where most scores are -inf (banned tokens)."""
    from localgpt import native
    from localgpt.beam import top_candidates

    if path == "torch":
        monkeypatch.setattr(native, "top_candidates", lambda scores, keep: None)
    elif native.library() is None:
        pytest.skip("no native kernels here")
    generator = torch.Generator().manual_seed(0)
    cases = [torch.randn(4, 1000 + i, generator=generator) for i in range(20)]
    one_beam_best = torch.randn(4, 1000, generator=generator)
    one_beam_best[2] += 100
    at_the_end = torch.randn(3, 1003, generator=generator)
    at_the_end[2, -3:] += 100
    tied = torch.randn(4, 1000, generator=generator).round(decimals=1)
    banned = torch.full((4, 1000), float("-inf"))
    banned[1, 5], banned[3, 7] = -1.0, -2.0
    not_a_number = torch.randn(4, 1000, generator=generator)
    not_a_number[3, 500] = float("nan")
    for scores in [*cases, one_beam_best, at_the_end, tied, banned, not_a_number,
                   torch.randn(1, 50, generator=generator)]:
        for keep in (2 * scores.shape[0], 3 * scores.shape[0]):
            values, indices = top_candidates(scores, keep)
            expected_values, expected_indices = torch.topk(scores.reshape(-1), keep)
            assert torch.equal(values, expected_values) or torch.equal(values.isnan(), expected_values.isnan())
            assert torch.equal(indices, expected_indices)


def test_native_top_candidates_leave_ties_and_nan_to_torch():
    """The C pass answers only where its answer is torch.topk's: with a tie among the best keep + 1, or a NaN, it
    declines (None) and top_candidates asks torch.topk."""
    from localgpt import native

    if native.library() is None:
        pytest.skip("no native kernels here")
    scores = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    assert native.top_candidates(scores, 8) is not None
    tied = scores.clone()
    tied[3, 999] = tied.max()  # ties the best
    assert native.top_candidates(tied, 8) is None
    low_tie = scores.clone()
    low_tie[0, 0] = low_tie[0, 1] = -100.0  # a tie far below the cut changes nothing
    assert native.top_candidates(low_tie, 8) is not None
    scores[0, 3] = float("nan")
    assert native.top_candidates(scores, 8) is None


SMOL_GRID = [  # every value of every option at least once, on the real model
    (2, 1.0, False, 0, 1), (4, 0.5, True, 2, 2), (4, 2.0, "never", 0, 2), (2, 2.0, True, 2, 1),
    (4, 1.0, "never", 2, 1), (2, 0.5, False, 0, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, ngram, returns", SMOL_GRID)
@torch.no_grad()
def test_beams_equal_transformers_on_smollm2(smol, num_beams, length_penalty, early_stopping, ngram, returns):
    reference, ours = smol
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": "Write a sentence about the moon."}])
    prompt = torch.tensor([ids])
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                  do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
                                  early_stopping=early_stopping, no_repeat_ngram_size=ngram,
                                  num_return_sequences=returns)[:, len(ids):].tolist()
    actual = beam_search(ours.model, ids, SamplingOptions(temperature=0, no_repeat_ngram_size=ngram),
                         BeamOptions(num_beams, length_penalty, early_stopping, returns), 24,
                         ours.tokenizer.eos_token_ids)
    fill = reference.generation_config.pad_token_id or ours.tokenizer.token_to_id("<|im_end|>")
    assert_same(actual, expected, fill=fill)


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM

    import smollm2
    from localgpt.weights import load_model

    folder = smollm2.hf_folder()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return reference, load_model(folder, "float32", "cpu")


@pytest.mark.slow
def test_cli_beam_example_streams_and_lists(smol):
    import json
    import subprocess
    import sys

    import smollm2

    folder = str(smollm2.hf_folder())
    base = [sys.executable, "-m", "localgpt", "generate", "-m", folder, "Write a short poem about the sea."]
    result = subprocess.run(base + ["-n", "50", "--num-beams", "4", "--no-repeat-ngram-size", "2"],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout.strip() and result.stderr == ""
    listed = subprocess.run(base + ["-n", "20", "--num-beams", "4", "--num-return-sequences", "2", "--json"],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    sequences = json.loads(listed.stdout)["sequences"]
    assert len(sequences) == 2 and sequences[0]["score"] >= sequences[1]["score"]
    bad = subprocess.run(base + ["--num-beams", "2", "--num-return-sequences", "3"], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and bad.stderr.startswith("Error: --num-return-sequences (3) cannot exceed")


@pytest.mark.slow
def test_stop_strings_cut_the_streamed_best_beam(smol):
    """Beam search streams through the same text layer as sampling: a stop string ends the best beam's text
    before it (never printed), with the stop-sequence finish reason."""
    from localgpt.beam import stream_beam_search

    _, loaded = smol
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    beams, greedy = BeamOptions(3, early_stopping="never"), SamplingOptions(temperature=0)

    def run(stop=()):
        records = list(stream_beam_search(loaded.model, loaded.tokenizer, ids, greedy, beams, 30, stop))
        return "".join(r.text for r in records), records[-1].finish_reason

    full, _ = run()
    words = full.split()
    stop = " " + words[len(words) // 2]
    cut, finish = run([stop])
    assert cut == full[: full.index(stop)] and finish == "stop-sequence"
