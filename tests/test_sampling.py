"""Logits processors against transformers' own, and the validation of sampling values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from localgpt.errors import UsageError
from localgpt.sampling import (
    SamplingOptions,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    process_logits,
    sample,
)

lp = pytest.importorskip("transformers.generation.logits_process")


def random_logits(seed: int, batch: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def history(seed: int, batch: int = 3, length: int = 20, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(
        a.masked_fill(torch.isinf(a), 0), b.masked_fill(torch.isinf(b), 0), atol=1e-6
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), penalty=st.floats(0.5, 2.0))
def test_repetition_penalty_matches_transformers(seed, penalty):
    logits, ids = random_logits(seed), history(seed)
    expected = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert same(apply_repetition_penalty(logits, ids, penalty), expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4))
def test_no_repeat_ngram_matches_transformers(seed, n):
    logits = random_logits(seed)
    ids = torch.randint(0, 6, (3, 15), generator=torch.Generator().manual_seed(seed))  # small alphabet: repeats
    expected = lp.NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    assert same(apply_no_repeat_ngram(logits, ids.tolist(), n), expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.1, 3.0), top_k=st.integers(1, 60),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5), keep=st.integers(1, 3))
def test_warpers_match_transformers(seed, temperature, top_k, top_p, min_p, keep):
    logits = random_logits(seed)
    assert same(apply_temperature(logits, temperature), lp.TemperatureLogitsWarper(temperature)(None, logits.clone()))
    assert same(apply_top_k(logits, top_k, keep), lp.TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(None, logits))
    assert same(apply_top_p(logits, top_p, keep), lp.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, logits))
    if min_p > 0:
        expected = lp.MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(None, logits.clone())
        assert same(apply_min_p(logits, min_p, keep), expected)
    typical = min(top_p, 0.95)  # transformers' warper takes (0, 1); 1 is off for both
    expected = lp.TypicalLogitsWarper(typical, min_tokens_to_keep=keep)(None, logits.clone())
    assert same(apply_typical_p(logits, typical, keep), expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_processor_chain_in_transformers_order(seed):
    logits, ids = random_logits(seed), history(seed)
    options = SamplingOptions(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.8,
                              repetition_penalty=1.3, no_repeat_ngram_size=2)
    chain = lp.LogitsProcessorList([
        lp.RepetitionPenaltyLogitsProcessor(1.3), lp.NoRepeatNGramLogitsProcessor(2),
        lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05),
        lp.TypicalLogitsWarper(0.8),
    ])
    assert same(process_logits(logits, ids, options), chain(ids, logits.clone()))


def test_greedy_ignores_warpers_and_takes_argmax():
    logits = random_logits(1)
    options = SamplingOptions(temperature=0, top_k=1, top_p=0.01)
    assert torch.equal(process_logits(logits, history(1)[:, :0], options), logits)
    assert torch.equal(sample(logits, options, None), logits.argmax(-1))


def test_seeded_sampling_repeats_and_respects_filters():
    logits = random_logits(2)
    options = SamplingOptions(temperature=1.0, top_k=3, top_p=1.0, seed=7)
    warped = process_logits(logits, history(2)[:, :0], options)
    draws = [sample(warped, options, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    allowed = torch.topk(logits, 3).indices
    for _ in range(50):
        token = sample(warped, options, None)
        assert all(token[row] in allowed[row] for row in range(logits.shape[0]))


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("no_repeat_ngram_size", -1), ("typical_p", 0.0), ("typical_p", 1.5),
])
def test_invalid_values_are_refused(field, value):
    with pytest.raises(UsageError, match=f"^{field} must be "):  # the setting's name; the CLI says its flag
        SamplingOptions(**{field: value}).validate()


def test_presence_and_frequency_penalties_and_logit_bias():
    """OpenAI's definitions: logit - presence x [count > 0] - frequency x count, over the answer's counts; a bias
    added to the chosen ids. They run before the warpers, after transformers' own penalties."""
    from localgpt.sampling import apply_logit_bias, apply_presence_frequency

    logits = random_logits(3)
    counts = torch.zeros_like(logits, dtype=torch.long)
    counts[0, 5], counts[0, 9], counts[1, 5] = 1, 3, 2
    penalized = apply_presence_frequency(logits, counts, 0.5, 0.25)
    expected = logits.clone()
    expected[0, 5] -= 0.5 + 0.25
    expected[0, 9] -= 0.5 + 0.75
    expected[1, 5] -= 0.5 + 0.5
    assert torch.allclose(penalized, expected)
    biased = apply_logit_bias(logits, {7: -100.0, 8: 2.5})
    assert torch.equal(biased[:, 7], logits[:, 7] - 100) and torch.equal(biased[:, 8], logits[:, 8] + 2.5)
    options = SamplingOptions(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    chained = process_logits(logits, history(3)[:, :0], options, answer_counts=counts, logit_bias={7: -100.0})
    assert torch.allclose(chained, apply_logit_bias(expected, {7: -100.0}))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_over_a_whole_vocabulary_matches_transformers(top_p):
    """The CPU path sorts values with numpy and maps the removed prefix back by value: on a 49,152-token vocabulary
    (SmolLM2's), some of it already -inf as top-k leaves it, the mask is transformers' to the token."""
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(int(top_p * 100))) * 4
    logits[1, ::3] = float("-inf")
    logits[2, 100:] = float("-inf")  # a row with fewer tokens than min_tokens_to_keep would pass over
    for keep in (1, 3):
        expected = lp.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, logits.clone())
        assert same(apply_top_p(logits, top_p, keep), expected)


def test_top_p_with_tied_logits_at_the_boundary_keeps_transformers_count():
    """With tied logits straddling the boundary, which of the equal tokens goes is left to torch's unstable sort in
    transformers (it differs between torch builds and devices); ours removes the lowest-indexed ones. The number kept,
    and the values kept, are transformers' exactly."""
    straddled = 0
    for seed in range(60):
        logits = (torch.randn(3, 2000, generator=torch.Generator().manual_seed(seed)) * 6).round() / 2
        top_p = 0.1 + 0.85 * (seed % 20) / 20
        expected = lp.TopPLogitsWarper(top_p)(None, logits.clone())
        got = apply_top_p(logits, top_p)
        for row in range(3):
            kept, kept_expected = got[row][got[row] > float("-inf")], expected[row][expected[row] > float("-inf")]
            assert torch.equal(kept.sort().values, kept_expected.sort().values)
            boundary = kept.min()
            ties = (logits[row] == boundary).nonzero().squeeze(1)
            removed = torch.isinf(got[row, ties])
            assert not removed[removed.long().argmin():].any() or removed.all()  # lowest indexes go first
            straddled += int(removed.any() and not removed.all())
    assert straddled > 10  # the rounding made boundary ties common, so the rule above was exercised


def test_sampling_draws_the_softmax_distribution_and_never_a_removed_token():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0, float("-inf")]])
    options = SamplingOptions(temperature=1.0, top_p=1.0)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, options, generator) for _ in range(20000)]).squeeze(1)
    counts = torch.bincount(draws, minlength=6).double()
    probs = torch.softmax(logits[0].double(), dim=-1)
    assert counts[2] == 0 and counts[5] == 0
    sigma = (20000 * probs * (1 - probs)).sqrt()
    assert ((counts - 20000 * probs).abs() <= 5 * sigma + 1e-9).all()
    one_left = torch.full((2, 49152), float("-inf"))
    one_left[0, 0], one_left[1, -1] = 0.0, 3.0  # the first and the last token, each alone
    assert sample(one_left, options, generator).tolist() == [0, 49151]
    with pytest.raises(ValueError, match="no token can be sampled"):
        sample(torch.full((1, 8), float("-inf")), options, generator)
