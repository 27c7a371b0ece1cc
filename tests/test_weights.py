"""The safetensors loader: fused and oversized parts, header validation, memory layout."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import tiny_model
from localgpt.checkpoint import read_safetensors_header
from localgpt.errors import ModelError
from localgpt.families import load_config
from localgpt.weights import load_weights


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights")
    tiny_model(path, "llama")
    return path


def test_an_oversized_fused_part_is_refused_not_overlapped(folder, tmp_path):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelError, match=r"gate_proj.weight' has shape \[100, 64\], expected \[128, 64\]"):
        load_weights(tmp_path, load_config(tmp_path), torch.float32, torch.device("cpu"))


def test_weights_convert_dtype_on_load(folder, tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = load_weights(tmp_path, load_config(tmp_path), torch.float32, torch.device("cpu"))
    expected = tensors["model.embed_tokens.weight"].float()
    assert torch.equal(model.embed_tokens.weight, expected)


def test_tied_head_is_one_parameter(tmp_path):
    tiny_model(tmp_path, "qwen2")  # tie_word_embeddings=True
    model = load_weights(tmp_path, load_config(tmp_path), torch.float32, torch.device("cpu"))
    assert model.lm_head.weight is model.embed_tokens.weight
    unique = list(model.parameters())
    assert len(unique) < len(list(model.named_parameters(remove_duplicate=False)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_give_our_error_or_load(folder, tmp_path, data):
    """Fuzz: random byte edits in the header region never crash, hang or allocate wildly."""
    original = (folder / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", original[:8])
    mutated = bytearray(original[: 8 + header_len + 64])
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, 8 + header_len - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(mutated))
    try:
        entries = read_safetensors_header(path)
    except ModelError as exc:
        assert str(path) in str(exc)
    else:
        size = path.stat().st_size
        assert all(entry.offset + entry.nbytes <= size for entry in entries.values())


def test_header_entry_with_wrong_byte_count(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(ModelError, match="truncated or corrupt"):
        read_safetensors_header(path)
