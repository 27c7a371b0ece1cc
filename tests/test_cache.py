"""The per-layer KV cache (localgpt/cache.py): rings for sliding-window layers, trimming, growing, reordering, and
logits that stay transformers' through every way of filling a ring."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from localgpt.families import load_config
from localgpt.generate import prefill
from localgpt.weights import load_weights

pytest.importorskip("transformers")
WINDOW = 4  # the helpers' sliding variants


@pytest.fixture(scope="module", params=["mistral-window", "qwen2-window", "gemma2", "gemma3"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = tiny_model(folder, request.param)
    return reference, load_weights(folder, load_config(folder), torch.float32, torch.device("cpu"), backend="auto")


def ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(seed))


def test_sliding_layers_hold_their_window_only(pair):
    _, model = pair
    cache = model.make_cache(2, 32768)  # a long context: the sliding layers still allocate WINDOW slots
    for index, layer in enumerate(cache.layers):
        window = model.config.layer(index).window
        assert layer.ring == (window is not None)
        assert layer.slots == (WINDOW if window else 32768), index
    assert any(layer.ring for layer in cache.layers)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
def test_every_way_of_filling_a_ring_gives_transformers_logits(pair, chunk):
    """Prompt chunks shorter than, equal to and longer than the window, each starting where the ring has already
    wrapped, then one-token steps: each position's logits are transformers' for the whole sequence."""
    reference, model = pair
    sequence = ids(22)
    expected = reference(sequence).logits[0]  # (22, vocab)
    cache = model.make_cache(1, 64)
    got = []
    for begin in range(0, 16, chunk):
        got.append(model(sequence[:, begin : min(begin + chunk, 16)], cache, last_only=False)[0])
    for position in range(16, 22):
        got.append(model(sequence[:, position : position + 1], cache)[0])
    assert cache.length == 22
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_trimming_a_wrapped_ring_forgets_everything_and_recomputes(pair):
    _, model = pair
    sequence = ids(12, seed=1)
    cache = model.make_cache(1, 32)
    prefill(model, sequence, cache)
    assert cache.trim(12) == 12  # not going back: nothing lost
    assert cache.trim(10) == 0  # the ring has wrapped: positions before its window are gone, for every layer
    assert all(layer.length == 0 for layer in cache.layers)
    short = model.make_cache(1, 32)
    prefill(model, sequence[:, :3], short)
    assert short.trim(2) == 2  # a ring that has not wrapped yet goes back like any layer


@torch.no_grad()
def test_a_cache_that_grows_past_the_window_becomes_a_ring_and_keeps_its_positions(pair):
    reference, model = pair
    sequence = ids(10, seed=2)
    cache = model.make_cache(1, 3)  # shorter than the window: plain layers at first
    assert not any(layer.ring for layer in cache.layers)
    prefill(model, sequence[:, :3], cache)
    cache.grow(10)
    assert all(layer.ring == (model.config.layer(i).window is not None) for i, layer in enumerate(cache.layers))
    logits = [model(sequence[:, position : position + 1], cache)[0, -1] for position in range(3, 10)]
    expected = reference(sequence).logits[0, 3:]
    torch.testing.assert_close(torch.stack(logits), expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_reordering_rows_moves_whole_rings(pair):
    _, model = pair
    rows = torch.cat([ids(9, seed=3), ids(9, seed=4)])
    cache = model.make_cache(2, 16)
    prefill(model, rows, cache)
    before = [layer.keys.clone() for layer in cache.layers]
    cache.reorder(torch.tensor([1, 1]))
    for layer, old in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys[0, :, layer.filled()], old[1, :, layer.filled()])
    step = model(torch.tensor([[7], [7]]), cache)  # both rows are now row 1: the same token gives the same logits
    assert torch.equal(step[0], step[1])


@torch.no_grad()
@pytest.mark.parametrize("length, shared", [(9, 6), (3, 2)])  # past the window (rings wrapped), and within it
def test_reordering_from_a_shared_prefix_moves_only_what_follows_it(pair, length, shared):
    """Beam search says the prompt's positions are every row's (cache.reorder(..., shared=P)): a layer in order
    moves only positions P on, a wrapped ring (no order to cut at) moves whole, and the rows then decode exactly as
    after a full copy."""
    _, model = pair
    rows = torch.cat([ids(length, seed=3), ids(length, seed=4)])
    full, partial = model.make_cache(2, 16), model.make_cache(2, 16)
    prefill(model, rows, full)
    prefill(model, rows, partial)
    before = [layer.keys.clone() for layer in partial.layers]
    full.reorder(torch.tensor([1, 1]))
    partial.reorder(torch.tensor([1, 1]), shared=shared)
    in_order = 0
    for layer, old in zip(partial.layers, before, strict=True):
        filled = layer.filled()
        if layer.ring and layer.length > layer.slots:
            assert torch.equal(layer.keys[0, :, filled], old[1, :, filled])
        else:
            in_order += 1
            assert torch.equal(layer.keys[0, :, :shared], old[0, :, :shared])  # row 0 kept its own shared positions
            assert torch.equal(layer.keys[0, :, shared:length], old[1, :, shared:length])
            assert torch.equal(layer.values[0, :, shared:length], layer.values[1, :, shared:length])
    assert in_order > 0 or length > WINDOW
    # Rows that truly share every position, as beam search makes them: one prefill, repeated. (Prefilling a batch of
    # two equal prompts is not that: torch's batched products may round its rows differently.)
    single = model.make_cache(1, 16)
    prefill(model, ids(length, seed=3), single)
    kept, copied = single.repeat_rows(2), single.repeat_rows(2)
    kept.reorder(torch.tensor([1, 0]), shared=length)
    copied.reorder(torch.tensor([1, 0]))
    step = torch.tensor([[7], [8]])
    assert torch.equal(model(step, kept), model(step, copied))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, shared", [(9, 6), (3, 2), (7, 0)])
def test_the_native_reorder_copies_what_the_torch_one_does(pair, dtype, length, shared):
    """KVCache.reorder's one kernel call for every layer (native.copy_rows) against each layer's torch copy: rows
    that swap, a three-row cycle, a row copied twice, rings wrapped and not; every buffer equal afterwards."""
    from localgpt import native

    if native.library() is None:
        pytest.skip("no native kernels here")
    _, model = pair
    cache = model.make_cache(4, 16)
    prefill(model, torch.cat([ids(length, seed=s) for s in range(4)]), cache)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    for order in ([1, 0, 3, 2], [1, 2, 0, 3], [2, 2, 0, 1]):
        expected = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        batch_indices = torch.tensor(order)
        moved = (batch_indices != torch.arange(4)).nonzero()[:, 0]
        for layer, (keys, values) in zip(cache.layers, expected, strict=True):
            span = layer.reordered_span(shared)
            keys[moved, :, span], values[moved, :, span] = keys[batch_indices[moved], :, span], \
                values[batch_indices[moved], :, span]
        assert native.copy_rows(cache.layers, moved, batch_indices[moved], shared)
        for layer, (keys, values) in zip(cache.layers, expected, strict=True):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values), order
    strided = cache.layers[0].rows(slice(0, 4))
    strided.keys = strided.keys.transpose(2, 3)
    assert not native.copy_rows([strided], moved, batch_indices[moved], shared)  # not contiguous: the torch path
