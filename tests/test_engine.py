"""The batch engine (localgpt/engine.py): several requests decoded as one batch give each the tokens it gets alone;
requests join and leave between steps; per-request sampling, logit bias, penalties and log-probs."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from localgpt.engine import Engine, Request, generate_batch
from localgpt.families import load_config
from localgpt.generate import generate_tokens
from localgpt.settings import SamplingOptions
from localgpt.weights import load_weights

GREEDY = SamplingOptions(temperature=0)


@pytest.fixture(scope="module",
                params=["llama", "gpt2", "mistral-window", "gemma2", "qwen3", "gemma3", "smollm3", "phi3"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    tiny_model(folder, request.param, eos_token_id=None)
    return load_weights(folder, load_config(folder), torch.float32, torch.device("cpu"))


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (3 + 4 * i,), generator=generator).tolist() for i in range(count)]


def alone(model, prompt: list[int], options=GREEDY, max_tokens: int = 12) -> list[int]:
    return list(generate_tokens(model, prompt, options, max_tokens))


def by_request(events) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for event in events:
        tokens.setdefault(event.request, []).append(event.token)
    return tokens


def test_batched_greedy_gives_each_prompt_its_own_tokens(model):
    """Four prompts of different lengths (so the rows sit at different positions, sliding windows and rings
    included), decoded together: each gets exactly the tokens it gets alone (float32)."""
    batch = prompts(4)
    got = by_request(generate_batch(model, [Request(p, GREEDY, 12) for p in batch]))
    assert [got[i] for i in range(4)] == [alone(model, p) for p in batch]


def test_requests_join_and_leave_between_steps(model):
    """Two rows for five requests of different budgets: each waits for a free row, and a request that joins a
    running batch still gets its own tokens."""
    batch = prompts(5)
    budgets = [3, 9, 5, 12, 7]
    got = by_request(generate_batch(model, [Request(p, GREEDY, n) for p, n in zip(batch, budgets, strict=True)],
                                    rows=2))
    assert [got[i] for i in range(5)] == [alone(model, p, max_tokens=n) for p, n in zip(batch, budgets, strict=True)]


def test_each_request_samples_with_its_own_settings(model):
    batch = prompts(3)
    seeded = SamplingOptions(temperature=0.9, top_k=20, seed=5)
    penalized = SamplingOptions(temperature=0, frequency_penalty=1.5, presence_penalty=0.5)
    requests = [Request(batch[0], seeded, 10), Request(batch[1], GREEDY, 10), Request(batch[2], penalized, 10)]
    got = by_request(generate_batch(model, requests))
    assert got[0] == alone(model, batch[0], seeded, 10)  # seeded sampling repeats, batched or not
    assert got[1] == alone(model, batch[1], max_tokens=10)
    assert got[2] == alone(model, batch[2], penalized, 10)


def test_logit_bias_and_logprobs(model):
    prompt = prompts(1)[0]
    free = alone(model, prompt, max_tokens=6)
    banned = Request(prompt, GREEDY, 6, logit_bias={free[0]: -100.0}, top_logprobs=3)
    events = list(generate_batch(model, [banned]))
    assert events[0].token != free[0]  # the greedy choice, banned
    for event in events:
        assert len(event.top_logprobs) == 3 and event.logprob is not None and event.logprob <= 0
        probabilities = [p for _, p in event.top_logprobs]
        assert probabilities == sorted(probabilities, reverse=True)
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_end_of_sequence_finishes_one_request_and_cancel_frees_a_row(model):
    batch = prompts(2)
    first = alone(model, batch[0], max_tokens=8)
    stop_at = first.index(first[-1])  # where the last token first appears: the request ends there
    engine = Engine(model, rows=2)
    stopping = engine.add(Request(batch[0], GREEDY, 8, eos_ids=frozenset({first[-1]})))
    other = engine.add(Request(batch[1], GREEDY, 16))
    finishes = {}
    for _ in range(stop_at + 1):
        for event in engine.step():
            finishes.setdefault(event.request, []).append(event.finish_reason)
    assert finishes[stopping] == [None] * stop_at + ["stop"] and engine.free_rows == 1
    engine.cancel(other)
    assert engine.free_rows == 2 and engine.step() == []


def test_rows_at_their_own_positions_take_the_native_kernels(model, monkeypatch):
    """Where the native backend runs, a batch of rows at different positions decodes through its _rows kernels
    (whole layers, or attention per op), not torch's per-row path."""
    from localgpt import native

    if model.backend.name != "native" or model.config.qk_norm:
        pytest.skip("no native per-row attention for this model here")
    calls = []
    for name in ("decoder_block_rows", "decode_attention_rows"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, _original=original, _name=name:
                            calls.append(_name) or _original(*args))
    batch = prompts(3)
    got = by_request(generate_batch(model, [Request(p, GREEDY, 6) for p in batch]))
    assert [got[i] for i in range(3)] == [alone(model, p, max_tokens=6) for p in batch]
    assert calls, "the per-row kernels never ran"


def test_a_request_that_continues_a_finished_one_prefills_only_the_rest(model):
    """The next turn of a conversation: its prompt starts with the tokens a finished request's row still holds,
    so only the new tokens are prefilled, and its answer is the one it gets alone."""
    first_prompt, other = prompts(2)
    engine = Engine(model, rows=2)
    engine.add(Request(first_prompt, GREEDY, 6))
    engine.add(Request(other, GREEDY, 9))  # keeps running while the first finishes: rows trade places
    answer = []
    while engine.running:
        answer += [e.token for e in engine.step() if e.request == 0]
    follow_up = first_prompt + answer + [17, 18, 19]
    engine.add(Request(follow_up, GREEDY, 8))
    held = len(first_prompt) + len(answer) - 1  # the last answer token was chosen, never fed
    switch = model.recompute_at  # (a longrope model past its switch runs the longer prompt anew)
    assert engine.reused_tokens == (0 if switch is not None and held <= switch < len(follow_up) else held)
    tokens = []
    while engine.running:
        tokens += [e.token for e in engine.step()]
    assert tokens == alone(model, follow_up, max_tokens=8)
