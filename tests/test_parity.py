"""Parity with transformers (the reference) on tiny random models of every supported architecture and switch:
logits in one forward pass and token by token through the KV cache, and 32 greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import VARIANTS, tiny_model
from localgpt.backends.torch import PackedLinear, can_pack
from localgpt.families import load_config
from localgpt.generate import generate_tokens
from localgpt.model import Linear
from localgpt.sampling import SamplingOptions
from localgpt.weights import load_weights

pytest.importorskip("transformers")

PROMPT_LEN = 12
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = tiny_model(folder, request.param)
    ours = load_weights(folder, load_config(folder), torch.float32, torch.device("cpu"))
    return request.param, folder, reference, ours


def prompt_ids(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (1, PROMPT_LEN), generator=generator)


@torch.no_grad()
def reference_step_logits(reference, ids: torch.Tensor) -> torch.Tensor:
    """transformers, one token at a time through its own cache."""
    past, steps = None, []
    for i in range(ids.shape[1]):
        out = reference(ids[:, i : i + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@torch.no_grad()
def test_logits_one_pass(pair):
    _, _, reference, ours = pair
    ids = prompt_ids()
    expected = reference(ids).logits
    actual = ours(ids, ours.make_cache(1, PROMPT_LEN), 0, last_only=False)
    assert expected.abs().max() > 1.0  # the comparison is between meaningful logits
    assert (actual - expected).abs().max().item() < TOLERANCE


@torch.no_grad()
def test_logits_token_by_token(pair):
    _, _, reference, ours = pair
    ids = prompt_ids(1)
    expected = reference_step_logits(reference, ids)
    cache = ours.make_cache(1, PROMPT_LEN)
    actual = torch.cat([ours(ids[:, i : i + 1], cache) for i in range(PROMPT_LEN)], dim=1)
    assert cache.length == PROMPT_LEN
    assert (actual - expected).abs().max().item() < TOLERANCE


@torch.no_grad()
def test_greedy_32_tokens(pair):
    _, _, reference, ours = pair
    ids = prompt_ids(2)
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    expected = expected[0, PROMPT_LEN:].tolist()
    actual = list(generate_tokens(ours, ids[0].tolist(), SamplingOptions(temperature=0), 32, eos_ids={2}))
    assert actual == expected


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
@torch.no_grad()
def test_greedy_with_penalties_matches_transformers(tmp_path, variant):
    reference = tiny_model(tmp_path, variant)
    ours = load_weights(tmp_path, load_config(tmp_path), torch.float32, torch.device("cpu"))
    ids = torch.tensor([[7, 8, 7, 8, 7, 8, 9, 7, 8, 7, 8, 9]])
    for penalty, ngram in ((1.5, 0), (1.0, 2), (1.3, 3)):
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                      repetition_penalty=penalty, no_repeat_ngram_size=ngram)
        options = SamplingOptions(temperature=0, repetition_penalty=penalty, no_repeat_ngram_size=ngram)
        actual = list(generate_tokens(ours, ids[0].tolist(), options, 24, eos_ids={2}))
        assert actual == expected[0, PROMPT_LEN:].tolist()


def to_v4_config(folder, variant: str) -> None:
    """Rewrite a saved transformers 5.x config.json in the 4.x style hub checkpoints still use."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters", None)
    config.pop("layer_types", None)
    if params:
        config["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        if kind != "default":
            # 4.x wrote "type" in older files and "rope_type" in newer ones: use both spellings across variants.
            config["rope_scaling"] = {("type" if kind in ("linear", "dynamic") else "rope_type"): kind, **params}
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("variant", ["llama-rope-linear", "llama-rope-dynamic", "llama-rope-yarn",
                                     "llama-rope-llama3", "qwen2-window", "gemma2"])
@torch.no_grad()
def test_transformers_v4_config_style(tmp_path, variant):
    reference = tiny_model(tmp_path, variant)
    to_v4_config(tmp_path, variant)
    assert "rope_parameters" not in json.loads((tmp_path / "config.json").read_text())
    ours = load_weights(tmp_path, load_config(tmp_path), torch.float32, torch.device("cpu"))
    ids = prompt_ids(3)
    expected = reference(ids).logits
    actual = ours(ids, ours.make_cache(1, PROMPT_LEN), 0, last_only=False)
    assert (actual - expected).abs().max().item() < TOLERANCE


@torch.no_grad()
def test_sharded_checkpoint_loads_the_same(tmp_path):
    reference = tiny_model(tmp_path / "one", "llama")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = load_weights(tmp_path / "sharded", load_config(tmp_path / "sharded"), torch.float32, torch.device("cpu"))
    ids = prompt_ids(4)
    actual = ours(ids, ours.make_cache(1, PROMPT_LEN), 0, last_only=False)
    assert (actual - reference(ids).logits).abs().max().item() < TOLERANCE


@torch.no_grad()
def test_bfloat16_stays_close(tmp_path):
    reference = tiny_model(tmp_path, "llama").to(torch.bfloat16)
    ours = load_weights(tmp_path, load_config(tmp_path), torch.bfloat16, torch.device("cpu"))
    assert ours.dtype == torch.bfloat16
    ids = prompt_ids(5)
    expected = reference(ids).logits.float()
    actual = ours(ids, ours.make_cache(1, PROMPT_LEN), 0, last_only=False).float()
    assert (actual - expected).abs().max().item() < 0.1 * expected.abs().max().item()


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN bfloat16 is not available on this CPU")
@pytest.mark.parametrize("variant", ["llama", "qwen2"])  # untied head; tied head (kept plain) with q/k/v biases
@torch.no_grad()
def test_bfloat16_packed_layout_changes_no_bit(tmp_path, variant, monkeypatch):
    tiny_model(tmp_path, variant)
    config = load_config(tmp_path)
    plain = load_weights(tmp_path, config, torch.bfloat16, torch.device("cpu"), backend=None)
    packed = load_weights(tmp_path, config, torch.bfloat16, torch.device("cpu"), backend="torch")
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert all(isinstance(m, PackedLinear) for m in linears if m is not packed.lm_head)
    assert isinstance(packed.lm_head, PackedLinear) == (not config.tie_word_embeddings)
    assert packed.weight_bytes() == plain.weight_bytes()
    ids = prompt_ids(7)
    for model in (plain, packed):  # prefill (12 rows) then 8 one-token steps, and 4 rows at a time (beams)
        model.outputs = [model(ids, cache := model.make_cache(1, 32), 0, last_only=False)]
        model.outputs += [model(ids[:, i : i + 1], cache) for i in range(8)]
        model.outputs.append(model(ids[:, :4].t().contiguous(), model.make_cache(4, 4), 0))
    for expected, actual in zip(plain.outputs, packed.outputs, strict=True):
        assert torch.equal(expected, actual)
