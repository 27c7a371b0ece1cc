"""Gemma 3 as the hub ships it: the 4.x config form (rope_theta + rope_local_base_freq, sliding_window_pattern
instead of layer_types) and the image-text `gemma3` checkpoints whose text model sits under language_model. Each
is rewritten from a tiny random transformers model and must give that model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_model
from localgpt.families import load_config
from localgpt.weights import load_weights

pytest.importorskip("transformers")


def logits(model, ids):
    return model(ids, model.make_cache(1, ids.shape[1]), last_only=False)


@pytest.fixture
def reference(tmp_path):
    return tiny_model(tmp_path, "gemma3")


def ids() -> torch.Tensor:
    return torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_the_4x_config_form(tmp_path, reference):
    config = json.loads((tmp_path / "config.json").read_text())
    nested = config.pop("rope_parameters")
    config.pop("layer_types")
    config.update(rope_theta=nested["full_attention"]["rope_theta"], rope_scaling={"rope_type": "linear",
                  "factor": 2.0}, rope_local_base_freq=nested["sliding_attention"]["rope_theta"],
                  sliding_window_pattern=2)  # layers 0, 2, … slide; 1, 3, … are global: as layer_types said
    (tmp_path / "config.json").write_text(json.dumps(config))
    parsed = load_config(tmp_path)
    assert [layer.rope for layer in parsed.layers] == ["local", "global"]
    assert parsed.local_rope.theta == 100.0 and parsed.rope.rope_type == "linear"
    ours = load_weights(tmp_path, parsed, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(logits(ours, ids()), reference(ids()).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_an_image_text_checkpoint_loads_its_text_model(tmp_path, reference):
    """model_type gemma3 with text_config, weights under language_model (4.x) or model.language_model (5.x), and
    a vision tower that is not read."""
    text = json.loads((tmp_path / "config.json").read_text())
    for prefix in ("language_model.model.", "model.language_model."):
        folder = tmp_path / prefix.replace(".", "-")
        folder.mkdir()
        tensors = {prefix + key.removeprefix("model."): value for key, value in
                   load_file(tmp_path / "model.safetensors").items()}
        tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures":
                                                        ["Gemma3ForConditionalGeneration"], "text_config": text}))
        ours = load_weights(folder, load_config(folder), torch.float32, torch.device("cpu"))
        torch.testing.assert_close(logits(ours, ids()), reference(ids()).logits, rtol=1e-4, atol=1e-4)
